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

use super::{round_f16, Backend, Precision};
use crate::ops::{adamw, conv_goodness_fwd, conv_goodness_wgrad, fusion_heads, goodness_loss, layer_output, Checked};
use anyhow::Result;

/// The CPU backend. Threads come from rayon's global pool (`--threads` sizes it).
#[derive(Clone, Debug)]
pub struct CpuBackend {
    lanes: usize,
    precision: Precision,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend { lanes: 1, precision: Precision::F32 }
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

    fn f16(&self) -> bool {
        self.precision == Precision::F16
    }
}

/// `v` with every value rounded to binary16 (what an fp16 operand holds).
fn rounded(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| round_f16(x)).collect()
}

fn fits(what: &str, have: usize, need: usize) -> Result<()> {
    crate::ops::fits("cpu", what, have, need)
}

impl Backend for CpuBackend {
    type Buf = Vec<f32>;
    type Labels = Vec<u32>;
    /// The CPU's ops run when issued: the values are read when the read is queued.
    type PendingRead = Vec<Vec<f32>>;

    fn queue_read(&self, srcs: &[&Vec<f32>], len: usize) -> Result<Vec<Vec<f32>>> {
        srcs.iter().map(|s| self.read(s, len)).collect()
    }

    fn collect_read(&self, pending: Vec<Vec<f32>>) -> Result<Vec<Vec<f32>>> {
        Ok(pending)
    }

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

    fn lanes(&self) -> usize {
        self.lanes
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

    fn conv_goodness_fwd(&self, a: Checked<conv_goodness_fwd::Args<'_, Vec<f32>>>) -> Result<()> {
        let conv_goodness_fwd::Args { s, grid, reduce, x, w, b, y, g } = a.into_inner();
        if self.f16() {
            let (x, w) = (rounded(&x[..s.x_len()]), rounded(&w[..s.w_len()]));
            conv::conv_goodness_fwd(s, grid, reduce, &x, &w, b, y, g, true);
        } else {
            conv::conv_goodness_fwd(s, grid, reduce, x, w, b, y, g, false);
        }
        Ok(())
    }

    fn goodness_loss(&self, a: Checked<goodness_loss::Args<'_, Vec<f32>, Vec<u32>>>) -> Result<()> {
        let goodness_loss::Args { batch, dim, classes, g, proj_w, proj_b, labels, logits, dg, stats } = a.into_inner();
        ops::goodness_loss(batch, dim, classes, g, proj_w, proj_b, labels, logits, dg.map(|d| d.as_mut_slice()), stats)
    }

    fn conv_goodness_wgrad(&self, a: Checked<conv_goodness_wgrad::Args<'_, Vec<f32>>>) -> Result<()> {
        let conv_goodness_wgrad::Args { s, grid, reduce, x, y, dg, dw, db } = a.into_inner();
        if self.f16() {
            let x = rounded(&x[..s.x_len()]);
            let scale = super::dz_scale(s.batch, grid, reduce);
            conv::conv_goodness_wgrad(s, grid, reduce, &x, y, dg, dw, db, Some(scale));
        } else {
            conv::conv_goodness_wgrad(s, grid, reduce, x, y, dg, dw, db, None);
        }
        Ok(())
    }

    fn layer_output(&self, a: Checked<layer_output::Args<'_, Vec<f32>>>) -> Result<()> {
        let a = a.into_inner();
        let (ho, wo) = a.out_hw();
        let layer_output::Args { batch, c, h, w, pool, dropout, y, out, gap } = a;
        ops::layer_output(batch, c, h, w, pool, dropout, y, out, gap.map(|g| g.as_mut_slice()));
        if self.f16() {
            out[..batch * c * ho * wo].iter_mut().for_each(|v| *v = round_f16(*v));
        }
        Ok(())
    }

    fn fusion_heads(&self, a: Checked<fusion_heads::Args<'_, Vec<f32>, Vec<u32>>>) -> Result<()> {
        let fusion_heads::Args { batch, classes, feats, heads, labels, logits, grads, stats } = a.into_inner();
        let feats: Vec<(&[f32], usize)> = feats.iter().map(|&(f, c)| (f.as_slice(), c)).collect();
        let heads: Vec<(&[f32], &[f32])> = heads.iter().map(|&(w, b)| (w.as_slice(), b.as_slice())).collect();
        let mut grads: Option<Vec<(&mut [f32], &mut [f32])>> =
            grads.map(|g| g.iter_mut().map(|(w, b)| (w.as_mut_slice(), b.as_mut_slice())).collect());
        ops::fusion_heads(batch, classes, &feats, &heads, labels, logits, grads.as_deref_mut(), stats)
    }

    fn adamw(&self, a: Checked<adamw::Args<'_, Vec<f32>>>) -> Result<()> {
        let adamw::Args { len, p, grad, m, v, h, copy } = a.into_inner();
        ops::adamw(&mut p[..len], &grad[..len], &mut m[..len], &mut v[..len], h);
        if let Some(copy) = copy {
            let f16 = self.f16();
            for (c, &v) in copy[..len].iter_mut().zip(&p[..len]) {
                *c = if f16 { round_f16(v) } else { v };
            }
        }
        Ok(())
    }
}
