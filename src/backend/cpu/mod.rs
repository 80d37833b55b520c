//! The CPU reference backend: f32 everywhere, rayon over samples, im2col + GEMM for the convolution.
//! It is the reference every other backend is tested against, and a usable trainer in its own right.
//!
//! With [`Precision::F16`] it emulates the GPU's fp16 path exactly where it rounds: the conv reads its input
//! and weights rounded to binary16, stores `y` rounded (the goodness is summed from the stored values), the
//! layer output is stored rounded (its pooled features are not), the weight gradient multiplies
//! `round(dz * S)` ([`super::dz_scale`]) by the rounded input and divides by `S`, and AdamW's copy is rounded.
//! Buffers stay f32 vectors: a value that went through an fp16 store is simply a representable one.

pub mod conv;
pub mod ops;

use super::{round_f16, AdamWScalars, Device, Ops, Precision, Schedule};
use anyhow::Result;

/// The CPU backend. Threads come from rayon's global pool (`--threads` sizes it).
#[derive(Debug)]
pub struct CpuBackend {
    lanes: usize,
    precision: Precision,
    /// AdamW's scalars for the step, as [`Schedule::prepare_step`] last set them.
    adamw: std::sync::Mutex<Option<AdamWScalars>>,
    /// Each layer's dropout key for the step, as [`Schedule::prepare_step`] last set them.
    dropout_keys: std::sync::Mutex<Vec<Option<u64>>>,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend { lanes: 1, precision: Precision::F32, adamw: Default::default(), dropout_keys: Default::default() }
    }
}

impl CpuBackend {
    pub fn new() -> Self {
        Self::default()
    }

    /// A CPU backend that reports `lanes` lanes, so that the trainer uses its concurrent-lanes buffer layout
    /// (per-layer buffers, double-buffered activations). Ops still run in order: this is how the tests check
    /// that the GPU's schedule computes exactly what the sequential one does.
    pub fn with_lanes(lanes: usize) -> Self {
        CpuBackend { lanes: lanes.max(1), ..Self::default() }
    }

    /// This backend with its conv operands in `precision` (see the module notes on what fp16 emulates).
    pub fn with_precision(self, precision: Precision) -> Self {
        CpuBackend { precision, ..self }
    }

    pub(crate) fn f16(&self) -> bool {
        self.precision == Precision::F16
    }

    /// Layer `layer`'s dropout key for the step ([`Schedule::prepare_step`]).
    pub(crate) fn dropout_key(&self, layer: usize) -> Result<u64> {
        let key = self.dropout_keys.lock().unwrap().get(layer).copied().flatten();
        key.ok_or_else(|| {
            anyhow::anyhow!(
                "cpu: layer {}'s dropout before the step's dropout key was set (Schedule::prepare_step)",
                layer + 1
            )
        })
    }

    /// AdamW's scalars for the step ([`Schedule::prepare_step`]).
    pub(crate) fn adamw_scalars(&self) -> Result<AdamWScalars> {
        let s = *self.adamw.lock().unwrap();
        s.ok_or_else(|| anyhow::anyhow!("cpu: adamw before the step's scalars were set (Schedule::prepare_step)"))
    }
}

/// `v` with every value rounded to binary16 (what an fp16 operand holds).
pub(crate) fn rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| round_f16(x)).collect()
}

fn fits(what: &str, have: usize, need: usize) -> Result<()> {
    crate::ops::fits("cpu", what, have, need)
}

impl Device for CpuBackend {
    type Buf = Vec<f32>;

    type Labels = Vec<u32>;

    fn name(&self) -> String {
        match self.precision {
            Precision::F32 => format!("cpu ({} threads)", rayon::current_num_threads()),
            Precision::F16 => format!("cpu ({} threads, fp16 emulated)", rayon::current_num_threads()),
        }
    }

    fn kind(&self) -> &'static str {
        "cpu"
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }

    fn upload(&self, data: &[f32]) -> Result<Vec<f32>> {
        Ok(data.to_vec())
    }

    fn write(&self, dst: &mut Vec<f32>, data: &[f32]) -> Result<()> {
        fits("destination", dst.len(), data.len())?;
        dst[..data.len()].copy_from_slice(data);
        Ok(())
    }

    fn read(&self, src: &Vec<f32>, len: usize) -> Result<Vec<f32>> {
        fits("source", src.len(), len)?;
        Ok(src[..len].to_vec())
    }

    fn labels(&self, labels: &[u32]) -> Result<Vec<u32>> {
        Ok(labels.to_vec())
    }

    fn write_labels(&self, dst: &mut Vec<u32>, labels: &[u32]) -> Result<()> {
        dst.clear();
        dst.extend_from_slice(labels);
        Ok(())
    }
}

impl Ops for CpuBackend {
    crate::ops::for_each_op!(crate::backend::cpu_ops);
}

impl Schedule for CpuBackend {
    /// The CPU's ops run when issued: the values are read when the read is queued.
    type PendingRead = Vec<Vec<f32>>;

    fn queue_read(&self, srcs: &[&Vec<f32>], len: usize) -> Result<Vec<Vec<f32>>> {
        srcs.iter().map(|s| self.read(s, len)).collect()
    }

    fn collect_read(&self, pending: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        Ok(pending)
    }

    fn lanes(&self) -> usize {
        self.lanes
    }

    fn prepare_step(&self, adamw: &AdamWScalars, dropout_keys: &[Option<u64>]) -> Result<()> {
        *self.adamw.lock().unwrap() = Some(*adamw);
        let mut keys = self.dropout_keys.lock().unwrap();
        keys.clear();
        keys.extend_from_slice(dropout_keys);
        Ok(())
    }
}
