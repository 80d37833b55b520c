//! The CPU reference of `layer_output`: one pass per sample (pool, dropout, the sum of squares, the RMS norm
//! and the pooled features), in parallel. In fp16 the output is stored rounded (the pooled features are not).

use super::Args;
use crate::backend::cpu::ops::{sum, sum_squares};
use crate::backend::cpu::CpuBackend;
use crate::backend::{round_f16, Dropout};
use crate::model::PoolKind;
use crate::ops::Checked;
use crate::rng;
use anyhow::Result;
use rayon::prelude::*;

pub(crate) fn run(be: &CpuBackend, a: Checked<Args<'_, Vec<f32>>>) -> Result<()> {
    let a = a.into_inner();
    let (ho, wo) = a.out_hw();
    let Args { layer, batch, c, h, w, pool, dropout, first_sample, y, out, gap } = a;
    // The element index where this batch starts in the global batch, as the kernels take it (wrapping).
    let first = first_sample.wrapping_mul(c * ho * wo) as u32;
    let dropout = dropout.map(|p| be.dropout_key(layer).map(|key| Dropout { p, key, first })).transpose()?;
    layer_output(batch, c, h, w, pool, dropout, y, out, gap.map(|g| g.as_mut_slice()));
    if be.f16() {
        out[..batch * c * ho * wo].iter_mut().for_each(|v| *v = round_f16(*v));
    }
    Ok(())
}

/// Pool (optional), dropout (optional), per-sample RMS norm, global average pool (optional).
// The arguments one by one: the dispatch above and tests/ops.rs call the reference math with slices and the
// fp16 switches that the op's Args do not carry.
#[allow(clippy::too_many_arguments)]
pub fn layer_output(
    batch: usize,
    c: usize,
    h: usize,
    w: usize,
    pool: Option<PoolKind>,
    dropout: Option<Dropout>,
    y: &[f32],
    out: &mut [f32],
    gap: Option<&mut [f32]>,
) {
    let (ho, wo) = if pool.is_some() { (h / 2, w / 2) } else { (h, w) };
    let per_in = c * h * w;
    let per_out = c * ho * wo;
    let body = |b: usize, o: &mut [f32], gap_row: Option<&mut [f32]>| {
        let yb = &y[b * per_in..][..per_in];
        match pool {
            None => o.copy_from_slice(yb),
            Some(kind) => {
                for ch in 0..c {
                    let ym = &yb[ch * h * w..][..h * w];
                    for i in 0..ho {
                        for j in 0..wo {
                            let (r0, r1) = (&ym[2 * i * w..], &ym[(2 * i + 1) * w..]);
                            let q = [r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]];
                            o[(ch * ho + i) * wo + j] = match kind {
                                PoolKind::Avg => (q[0] + q[1] + q[2] + q[3]) / 4.0,
                                PoolKind::Rms => ((q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]) / 4.0).sqrt(),
                            };
                        }
                    }
                }
            }
        }
        if let Some(Dropout { p, key, first }) = dropout {
            let keep_scale = 1.0 / (1.0 - p);
            let base = first.wrapping_add((b * per_out) as u32);
            for (i, v) in o.iter_mut().enumerate() {
                let keep = rng::dropout_uniform(key, base.wrapping_add(i as u32)) >= p;
                *v = if keep { *v * keep_scale } else { 0.0 };
            }
        }
        let denom = (sum_squares(o) / per_out as f32).sqrt() + crate::kernel_abi::RMS_EPS;
        for v in o.iter_mut() {
            *v /= denom;
        }
        if let Some(gap_row) = gap_row {
            let hw = ho * wo;
            for (ch, gv) in gap_row.iter_mut().enumerate() {
                *gv = sum(&o[ch * hw..][..hw]) / hw as f32;
            }
        }
    };
    let out = &mut out[..batch * per_out];
    match gap {
        None => out.par_chunks_mut(per_out).enumerate().for_each(|(b, o)| body(b, o, None)),
        Some(gap) => out
            .par_chunks_mut(per_out)
            .zip(gap[..batch * c].par_chunks_mut(c))
            .enumerate()
            .for_each(|(b, (o, gr))| body(b, o, Some(gr))),
    }
}
