//! The CPU reference of `conv_goodness_wgrad`: `dL/dz` produced chunk by chunk from `y` and `dL/dg` (never
//! stored for the whole batch), then `dW = dz x_col^T` by GEMM, summed over a fixed number of groups in a fixed
//! order (the same bits whatever the thread count). In fp16 x is read rounded and `round(dz * S)` is multiplied,
//! then divided by `S` (`backend::dz_scale`).

use super::Args;
use crate::backend::cpu::conv::{im2col_t, samples_per_chunk, sgemm, with_scratch, WGRAD_GROUPS};
use crate::backend::cpu::ops::sum;
use crate::backend::cpu::{rounded, CpuBackend};
use crate::backend::{dz_scale, ConvShape};
use crate::model::{GoodnessReduce, PatchGrid};
use crate::ops::Checked;
use anyhow::Result;
use rayon::prelude::*;

pub(crate) fn run(be: &CpuBackend, a: Checked<Args<'_, Vec<f32>>>) -> Result<()> {
    let Args { layer: _, s, mean_over, grid, reduce, x, y, dg, dw, db } = a.into_inner();
    if be.f16() {
        let x = rounded(&x[..s.x_len()]);
        let scale = dz_scale(mean_over, grid, reduce);
        conv_goodness_wgrad(s, grid, reduce, &x, y, dg, dw, db, Some(scale));
    } else {
        conv_goodness_wgrad(s, grid, reduce, x, y, dg, dw, db, None);
    }
    Ok(())
}

/// Weight gradient: `dW = dz x_col^T`, `db = sum dz`, with `dz` from [`goodness_dz`] chunk by chunk. With
/// `dz_scale = Some(S)` (the fp16 path), the GEMM multiplies `round_f16(dz * S)` and `dW` is divided by `S`;
/// `db` sums the unrounded `dz`.
// The arguments one by one: the dispatch above and tests/ops.rs call the reference math with slices and the
// fp16 switches that the op's Args do not carry.
#[allow(clippy::too_many_arguments)]
pub fn conv_goodness_wgrad(
    s: &ConvShape,
    grid: &PatchGrid,
    reduce: GoodnessReduce,
    x: &[f32],
    y: &[f32],
    dg: &[f32],
    dw: &mut [f32],
    db: &mut [f32],
    dz_scale: Option<f32>,
) {
    let hw = s.h * s.w;
    let k = s.c_in * 9;
    let d = s.c_out * grid.cells();
    let spc = samples_per_chunk(s.batch, hw, 2);
    let n_chunks = s.batch.div_ceil(spc);
    let groups = n_chunks.min(WGRAD_GROUPS);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = (0..groups)
        .into_par_iter()
        .map(|group| {
            let mut dw_acc = vec![0.0f32; s.c_out * k];
            let mut db_acc = vec![0.0f32; s.c_out];
            let chunks = (group * n_chunks / groups)..((group + 1) * n_chunks / groups);
            for chunk in chunks {
                let s0 = chunk * spc;
                let n_s = spc.min(s.batch - s0);
                let n = n_s * hw;
                with_scratch(k * n, s.c_out * n, |col, dz| {
                    im2col_t(&x[s0 * s.c_in * hw..][..n_s * s.c_in * hw], n_s, s.c_in, s.h, s.w, col);
                    for si in 0..n_s {
                        for c in 0..s.c_out {
                            let ymap = &y[((s0 + si) * s.c_out + c) * hw..][..hw];
                            let dgc = &dg[(s0 + si) * d + c * grid.cells()..][..grid.cells()];
                            let dzr = &mut dz[c * n + si * hw..][..hw];
                            goodness_dz(ymap, dgc, grid, reduce, dzr);
                            db_acc[c] += sum(dzr);
                            if let Some(scale) = dz_scale {
                                dzr.iter_mut().for_each(|d| *d = crate::backend::round_f16(*d * scale));
                            }
                        }
                    }
                    // dW[c, kk] += sum_n dz[c, n] * col_t[n, kk]
                    sgemm(s.c_out, k, n, &mut dw_acc, k, true, dz, n, 1, col, k, 1);
                });
            }
            (dw_acc, db_acc)
        })
        .collect();
    let (dw, db) = (&mut dw[..s.w_len()], &mut db[..s.c_out]);
    dw.fill(0.0);
    db.fill(0.0);
    for (pw, pb) in &partials {
        for (a, &v) in dw.iter_mut().zip(pw) {
            *a += v;
        }
        for (a, &v) in db.iter_mut().zip(pb) {
            *a += v;
        }
    }
    if let Some(scale) = dz_scale {
        let inv = 1.0 / scale;
        dw.iter_mut().for_each(|a| *a *= inv);
    }
}

/// `dz[h,w] = 1[y > 0] * sum_{bins containing (h,w)} (dg_ij / |bin_ij|) * 2 y` for one map (no `/|bin|` for sum).
pub fn goodness_dz(ymap: &[f32], dg: &[f32], grid: &PatchGrid, reduce: GoodnessReduce, dz: &mut [f32]) {
    let (p, w) = (grid.p, grid.w);
    if !grid.is_partition() {
        dz.fill(0.0);
    }
    for (i, &(r0, r1)) in grid.rows.iter().enumerate() {
        for (j, &(c0, c1)) in grid.cols.iter().enumerate() {
            let dpool = match reduce {
                GoodnessReduce::Mean => dg[i * p + j] / grid.area(i, j) as f32,
                GoodnessReduce::Sum => dg[i * p + j],
            };
            for r in r0..r1 {
                let ys = &ymap[r * w + c0..r * w + c1];
                let ds = &mut dz[r * w + c0..r * w + c1];
                if grid.is_partition() {
                    for (d, &y) in ds.iter_mut().zip(ys) {
                        *d = if y > 0.0 { dpool * (2.0 * y) } else { 0.0 };
                    }
                } else {
                    for (d, &y) in ds.iter_mut().zip(ys) {
                        if y > 0.0 {
                            *d += dpool * (2.0 * y);
                        }
                    }
                }
            }
        }
    }
}
