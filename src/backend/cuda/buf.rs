//! [`CudaBuf`]: a device buffer of f32, or of fp16 (a conv operand in the fp16 path).

use crate::backend::Precision;
use anyhow::{bail, Result};
use cudarc::driver::CudaSlice;

/// A device buffer: f32, or fp16 (a conv operand in the fp16 path).
pub enum CudaBuf {
    F32(CudaSlice<f32>),
    F16(CudaSlice<half::f16>),
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        match self {
            CudaBuf::F32(s) => s.len(),
            CudaBuf::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn precision(&self) -> Precision {
        match self {
            CudaBuf::F32(_) => Precision::F32,
            CudaBuf::F16(_) => Precision::F16,
        }
    }

    pub(crate) fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match self {
            CudaBuf::F32(s) => Ok(s),
            CudaBuf::F16(_) => bail!("cuda backend: {what} is an fp16 buffer where the op reads f32"),
        }
    }

    pub(crate) fn f32_mut(&mut self, what: &str) -> Result<&mut CudaSlice<f32>> {
        match self {
            CudaBuf::F32(s) => Ok(s),
            CudaBuf::F16(_) => bail!("cuda backend: {what} is an fp16 buffer where the op writes f32"),
        }
    }

    pub(crate) fn f16(&self, what: &str) -> Result<&CudaSlice<half::f16>> {
        match self {
            CudaBuf::F16(s) => Ok(s),
            CudaBuf::F32(_) => bail!("cuda backend: {what} is an f32 buffer where the fp16 op reads fp16"),
        }
    }

    pub(crate) fn f16_mut(&mut self, what: &str) -> Result<&mut CudaSlice<half::f16>> {
        match self {
            CudaBuf::F16(s) => Ok(s),
            CudaBuf::F32(_) => bail!("cuda backend: {what} is an f32 buffer where the fp16 op writes fp16"),
        }
    }
}
