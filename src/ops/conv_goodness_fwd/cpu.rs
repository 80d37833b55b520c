//! The CPU reference of `conv_goodness_fwd`: im2col + GEMM (`backend/cpu/conv.rs`), with bias, ReLU and the
//! patch goodness fused into the pass that scatters the GEMM result. In fp16 (the GPU path's emulation) x and W
//! are read rounded to binary16 and y is stored rounded, the goodness summed from the stored values.

use super::Args;
use crate::backend::cpu::conv::{im2col, samples_per_chunk, sgemm, with_scratch};
use crate::backend::cpu::{ops::sum_squares, rounded, CpuBackend};
use crate::backend::ConvShape;
use crate::model::{GoodnessReduce, PatchGrid};
use crate::ops::Checked;
use anyhow::Result;
use rayon::prelude::*;

pub(crate) fn run(be: &CpuBackend, a: Checked<Args<'_, Vec<f32>>>) -> Result<()> {
    let Args { layer: _, s, grid, reduce, x, w, b, y, g } = a.into_inner();
    if be.f16() {
        let (x, w) = (rounded(&x[..s.x_len()]), rounded(&w[..s.w_len()]));
        conv_goodness_fwd(s, grid, reduce, &x, &w, b, y, g, true);
    } else {
        conv_goodness_fwd(s, grid, reduce, x, w, b, y, g, false);
    }
    Ok(())
}

/// Forward: `y = relu(conv3x3(x, W) + b)`, `g` = patch goodness of `y`. With `round_y`, `y` is stored rounded
/// to binary16 and the goodness summed from the stored values (the fp16 path).
// The arguments one by one: the dispatch above and tests/ops.rs call the reference math with slices and the
// fp16 switches that the op's Args do not carry.
#[allow(clippy::too_many_arguments)]
pub fn conv_goodness_fwd(
    s: &ConvShape,
    grid: &PatchGrid,
    reduce: GoodnessReduce,
    x: &[f32],
    w: &[f32],
    b: &[f32],
    y: &mut [f32],
    g: &mut [f32],
    round_y: bool,
) {
    let hw = s.h * s.w;
    let k = s.c_in * 9;
    let d = s.c_out * grid.cells();
    let spc = samples_per_chunk(s.batch, hw, 8);
    let (x, w, b) = (&x[..s.x_len()], &w[..s.w_len()], &b[..s.c_out]);
    y[..s.y_len()]
        .par_chunks_mut(spc * s.c_out * hw)
        .zip(g[..s.batch * d].par_chunks_mut(spc * d))
        .enumerate()
        .for_each(|(chunk, (y_chunk, g_chunk))| {
            let n_s = y_chunk.len() / (s.c_out * hw);
            let n = n_s * hw;
            let x_chunk = &x[chunk * spc * s.c_in * hw..][..n_s * s.c_in * hw];
            with_scratch(k * n, s.c_out * n, |col, out| {
                im2col(x_chunk, n_s, s.c_in, s.h, s.w, col);
                sgemm(s.c_out, n, k, out, n, false, w, k, 1, col, n, 1);
                // Epilogue: bias + ReLU, scattered into [B, C, H, W], and the goodness of each map.
                for si in 0..n_s {
                    for c in 0..s.c_out {
                        let src = &out[c * n + si * hw..][..hw];
                        let dst = &mut y_chunk[(si * s.c_out + c) * hw..][..hw];
                        let bias = b[c];
                        for (o, &v) in dst.iter_mut().zip(src) {
                            *o = (v + bias).max(0.0);
                        }
                        if round_y {
                            dst.iter_mut().for_each(|o| *o = crate::backend::round_f16(*o));
                        }
                        patch_goodness(dst, grid, reduce, &mut g_chunk[si * d + c * grid.cells()..][..grid.cells()]);
                    }
                }
            });
        });
}

/// The goodness of one `[H, W]` map: `g[i*P + j] = reduce_{bin_ij} y^2`.
pub fn patch_goodness(ymap: &[f32], grid: &PatchGrid, reduce: GoodnessReduce, g: &mut [f32]) {
    let (p, w) = (grid.p, grid.w);
    for (i, &(r0, r1)) in grid.rows.iter().enumerate() {
        for (j, &(c0, c1)) in grid.cols.iter().enumerate() {
            let mut acc = 0.0f32;
            for r in r0..r1 {
                acc += sum_squares(&ymap[r * w + c0..r * w + c1]);
            }
            g[i * p + j] = match reduce {
                GoodnessReduce::Mean => acc / grid.area(i, j) as f32,
                GoodnessReduce::Sum => acc,
            };
        }
    }
}
