//! [`CudaBuf`]: a device buffer of f32, or of fp16 (a conv operand in the fp16 path), with a version that every
//! mutable access advances, and the layout of an fp16 activation that the layer output stored channels-last.

use crate::backend::Precision;
use anyhow::{bail, Result};
use cudarc::driver::CudaSlice;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Where a buffer's channels-last mark lives: shared with the step graphs that write the buffer, which set it again
/// after each replay (graph.rs), since a replay runs no host code.
pub(crate) type LayoutMark = Arc<Mutex<Option<[usize; 4]>>>;

/// A device buffer: f32, or fp16 (a conv operand in the fp16 path).
///
/// Its [`version`](CudaBuf::version) (an id no other buffer of the process has, and a count of the mutable
/// accesses so far) tells a cache of something derived from the buffer whether the buffer may have changed since:
/// every way to write it goes through `&mut self` here, and each advances the count.
///
/// An fp16 layer output is stored channels-last (`[B, H, W, C]`, see ops/layer_output/cuda.rs), which the next layer's
/// conv reads as it is; the buffer says so ([`channels_last`](CudaBuf::channels_last): its logical `[B, C, H, W]`)
/// until the next write of any other kind. The accessors of NCHW data refuse such a buffer, and the backend's
/// `read` returns it in the logical NCHW order, so nothing reads it in the wrong order. A step graph that writes
/// layer outputs sets their marks again after each replay (graph.rs), so the marks stay true after replays too.
pub struct CudaBuf {
    data: Data,
    id: u64,
    writes: u64,
    channels_last: LayoutMark,
}

/// The buffer's storage.
pub(crate) enum Data {
    F32(CudaSlice<f32>),
    F16(CudaSlice<half::f16>),
}

impl Data {
    /// Bytes per value.
    pub(crate) fn elem_bytes(&self) -> usize {
        match self {
            Data::F32(_) => 4,
            Data::F16(_) => 2,
        }
    }

    /// The device address, for a transfer on `stream` (NCCL), with cudarc's guard (which records the use when
    /// cudarc tracks events; with one lane it does not, and the caller orders the transfer with lane 0 itself).
    pub(crate) fn device_ptr<'a>(
        &'a self,
        stream: &'a Arc<cudarc::driver::CudaStream>,
    ) -> (u64, cudarc::driver::SyncOnDrop<'a>) {
        match self {
            Data::F32(s) => cudarc::driver::DevicePtr::device_ptr(s, stream),
            Data::F16(s) => cudarc::driver::DevicePtr::device_ptr(s, stream),
        }
    }

    /// [`Data::device_ptr`] for a transfer that writes the buffer.
    pub(crate) fn device_ptr_mut<'a>(
        &'a mut self,
        stream: &'a Arc<cudarc::driver::CudaStream>,
    ) -> (u64, cudarc::driver::SyncOnDrop<'a>) {
        match self {
            Data::F32(s) => cudarc::driver::DevicePtrMut::device_ptr_mut(s, stream),
            Data::F16(s) => cudarc::driver::DevicePtrMut::device_ptr_mut(s, stream),
        }
    }
}

impl From<CudaSlice<f32>> for CudaBuf {
    fn from(s: CudaSlice<f32>) -> Self {
        CudaBuf::new(Data::F32(s))
    }
}

impl From<CudaSlice<half::f16>> for CudaBuf {
    fn from(s: CudaSlice<half::f16>) -> Self {
        CudaBuf::new(Data::F16(s))
    }
}

impl CudaBuf {
    fn new(data: Data) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        CudaBuf { data, id: NEXT_ID.fetch_add(1, Ordering::Relaxed), writes: 0, channels_last: LayoutMark::default() }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            Data::F32(s) => s.len(),
            Data::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn precision(&self) -> Precision {
        match &self.data {
            Data::F32(_) => Precision::F32,
            Data::F16(_) => Precision::F16,
        }
    }

    /// (the buffer's id, its mutable accesses so far): equal values mean unchanged contents.
    pub fn version(&self) -> (u64, u64) {
        (self.id, self.writes)
    }

    pub(crate) fn data(&self) -> &Data {
        &self.data
    }

    /// The storage, to write: advances the version, and the contents are NCHW again unless the writer says
    /// otherwise ([`set_channels_last`](CudaBuf::set_channels_last)).
    pub(crate) fn data_mut(&mut self) -> &mut Data {
        self.writes += 1;
        *self.channels_last.lock().unwrap() = None;
        &mut self.data
    }

    /// `Some([B, C, H, W])` when the contents are that tensor stored channels-last, `[B, H, W, C]`.
    pub fn channels_last(&self) -> Option<[usize; 4]> {
        *self.channels_last.lock().unwrap()
    }

    /// Says that the write just made stored `[B, C, H, W]` channels-last; returns the mark's cell, for a step
    /// graph being captured to set again after each replay.
    pub(crate) fn set_channels_last(&mut self, shape: [usize; 4]) -> LayoutMark {
        *self.channels_last.lock().unwrap() = Some(shape);
        self.channels_last.clone()
    }

    pub(crate) fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match &self.data {
            Data::F32(s) => Ok(s),
            Data::F16(_) => bail!("cuda backend: {what} is an fp16 buffer where the op reads f32"),
        }
    }

    pub(crate) fn f32_mut(&mut self, what: &str) -> Result<&mut CudaSlice<f32>> {
        match self.data_mut() {
            Data::F32(s) => Ok(s),
            Data::F16(_) => bail!("cuda backend: {what} is an fp16 buffer where the op writes f32"),
        }
    }

    /// The fp16 contents in NCHW (or flat) order: an error for a channels-last buffer.
    pub(crate) fn f16(&self, what: &str) -> Result<&CudaSlice<half::f16>> {
        if let Some([b, c, h, w]) = self.channels_last() {
            bail!("cuda backend: {what} holds a [{b}, {c}, {h}, {w}] tensor channels-last where the op reads NCHW");
        }
        self.f16_any_layout(what)
    }

    /// The fp16 contents whatever their layout (the caller checks [`channels_last`](CudaBuf::channels_last)).
    pub(crate) fn f16_any_layout(&self, what: &str) -> Result<&CudaSlice<half::f16>> {
        match &self.data {
            Data::F16(s) => Ok(s),
            Data::F32(_) => bail!("cuda backend: {what} is an f32 buffer where the fp16 op reads fp16"),
        }
    }

    pub(crate) fn f16_mut(&mut self, what: &str) -> Result<&mut CudaSlice<half::f16>> {
        match self.data_mut() {
            Data::F16(s) => Ok(s),
            Data::F32(_) => bail!("cuda backend: {what} is an f32 buffer where the fp16 op writes fp16"),
        }
    }
}

impl crate::ops::Len for CudaBuf {
    fn len(&self) -> usize {
        CudaBuf::len(self)
    }
}

impl crate::ops::Len for cudarc::driver::CudaSlice<u32> {
    fn len(&self) -> usize {
        cudarc::driver::CudaSlice::len(self)
    }
}
