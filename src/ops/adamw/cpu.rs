//! The CPU reference of `adamw`: PyTorch's single-tensor algorithm, elementwise, in parallel over chunks; the
//! operand copy written after it (rounded in fp16).

use super::Args;
use crate::backend::cpu::CpuBackend;
use crate::backend::{round_f16, AdamWScalars};
use crate::ops::Checked;
use anyhow::Result;
use rayon::prelude::*;

pub(crate) fn run(be: &CpuBackend, a: Checked<Args<'_, Vec<f32>>>) -> Result<()> {
    let Args { layer: _, len, p, grad, m, v, copy } = a.into_inner();
    adamw(&mut p[..len], &grad[..len], &mut m[..len], &mut v[..len], &be.adamw_scalars()?);
    if let Some(copy) = copy {
        let f16 = be.f16();
        for (c, &v) in copy[..len].iter_mut().zip(&p[..len]) {
            *c = if f16 { round_f16(v) } else { v };
        }
    }
    Ok(())
}

/// AdamW, PyTorch's single-tensor algorithm, elementwise.
pub fn adamw(p: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamWScalars) {
    let AdamWScalars { decay, step_size, bc2_sqrt, w1, b2, w2, eps } = *h;
    const CHUNK: usize = 16 * 1024;
    p.par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                let gi = g[i];
                p[i] *= decay;
                m[i] += w1 * (gi - m[i]);
                v[i] = v[i] * b2 + w2 * gi * gi;
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                p[i] += -step_size * (m[i] / denom);
            }
        });
}
