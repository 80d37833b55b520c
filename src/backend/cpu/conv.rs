//! The convolution on the CPU: im2col + GEMM (the `gemm` crate's AVX-512/AVX2 kernels), with bias, ReLU and
//! the patch goodness fused into the pass that scatters the GEMM result, and the weight gradient whose
//! `dL/dz` is produced chunk by chunk from `y` and `dL/dg`, never stored for the whole batch.
//!
//! Work split: the batch is cut into chunks of whole samples, about `TARGET_COLS` output pixels each (at least
//! eight chunks when the batch allows, so that every core has work). Chunks run in parallel on rayon; each
//! lowers its samples into a thread-local column matrix `[C_in*9, n]` and runs one single-threaded GEMM.
//! The weight gradient sums per-group partials (a fixed number of groups, in a fixed order), so a run gives
//! the same bits whatever the thread count.

use crate::backend::ConvShape;
use crate::model::{GoodnessReduce, PatchGrid};
use rayon::prelude::*;
use std::cell::RefCell;

/// Output pixels (GEMM columns) per chunk: large enough to amortise packing the weights, small enough that
/// the column matrix stays in the L2/L3 caches.
const TARGET_COLS: usize = 1024;
/// Fixed number of weight-gradient partial sums (bounded memory, thread-count-independent results).
const WGRAD_GROUPS: usize = 16;

thread_local! {
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with two thread-local scratch buffers of at least the given lengths (contents unspecified).
fn with_scratch<R>(a_len: usize, b_len: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut guard = cell.borrow_mut();
        let (a, b) = &mut *guard;
        if a.len() < a_len {
            a.resize(a_len, 0.0);
        }
        if b.len() < b_len {
            b.resize(b_len, 0.0);
        }
        f(&mut a[..a_len], &mut b[..b_len])
    })
}

/// Samples per chunk for a batch of `batch` maps of `hw` pixels, cut into at least `min_chunks` chunks when
/// the batch allows. The forward asks for 8 (load balance, no reduction); the weight gradient for 2, since its
/// GEMMs contract over the chunk and a short contraction spends its time re-reading the `dW` partial.
pub fn samples_per_chunk(batch: usize, hw: usize, min_chunks: usize) -> usize {
    let by_cols = TARGET_COLS.div_ceil(hw);
    let by_parallelism = batch.div_ceil(min_chunks);
    by_cols.min(by_parallelism).clamp(1, batch.max(1))
}

/// Lowers `n_samples` maps `[C_in, H, W]` into `col[(ci*9 + kh*3 + kw), s*H*W + oh*W + ow] =
/// x[s, ci, oh + kh - 1, ow + kw - 1]` (zero outside the map).
pub fn im2col(x: &[f32], n_samples: usize, c_in: usize, h: usize, w: usize, col: &mut [f32]) {
    let hw = h * w;
    let n = n_samples * hw;
    debug_assert!(x.len() >= n_samples * c_in * hw && col.len() >= c_in * 9 * n);
    for ci in 0..c_in {
        for kh in 0..3 {
            for kw in 0..3 {
                let row = &mut col[(ci * 9 + kh * 3 + kw) * n..][..n];
                for s in 0..n_samples {
                    let src = &x[(s * c_in + ci) * hw..][..hw];
                    for oh in 0..h {
                        let dst = &mut row[s * hw + oh * w..][..w];
                        let ih = oh + kh;
                        if ih == 0 || ih > h {
                            dst.fill(0.0);
                            continue;
                        }
                        let srow = &src[(ih - 1) * w..][..w];
                        match kw {
                            0 => {
                                dst[0] = 0.0;
                                dst[1..].copy_from_slice(&srow[..w - 1]);
                            }
                            1 => dst.copy_from_slice(srow),
                            _ => {
                                dst[..w - 1].copy_from_slice(&srow[1..]);
                                dst[w - 1] = 0.0;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The transposed lowering for the weight gradient: `col_t[s*H*W + oh*W + ow, ci*9 + kh*3 + kw] =
/// x[s, ci, oh + kh - 1, ow + kw - 1]`, one contiguous row of `C_in*9` taps per output pixel, so that
/// `dW = dz col_t` is a GEMM over two row-major operands.
pub fn im2col_t(x: &[f32], n_samples: usize, c_in: usize, h: usize, w: usize, col_t: &mut [f32]) {
    let hw = h * w;
    let k = c_in * 9;
    debug_assert!(x.len() >= n_samples * c_in * hw && col_t.len() >= n_samples * hw * k);
    for s in 0..n_samples {
        let xs = &x[s * c_in * hw..][..c_in * hw];
        for oh in 0..h {
            for ow in 0..w {
                let dst = &mut col_t[(s * hw + oh * w + ow) * k..][..k];
                for ci in 0..c_in {
                    let map = &xs[ci * hw..][..hw];
                    for kh in 0..3 {
                        let taps = &mut dst[ci * 9 + kh * 3..][..3];
                        let ih = oh + kh;
                        if ih == 0 || ih > h {
                            taps.fill(0.0);
                            continue;
                        }
                        let row = &map[(ih - 1) * w..][..w];
                        taps[0] = if ow > 0 { row[ow - 1] } else { 0.0 };
                        taps[1] = row[ow];
                        taps[2] = if ow + 1 < w { row[ow + 1] } else { 0.0 };
                    }
                }
            }
        }
    }
}

/// `dst[m, n] (+)= lhs[m, k] * rhs[k, n]` with explicit row/column strides, single-threaded.
#[allow(clippy::too_many_arguments)]
fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: &[f32],
    rhs_rs: usize,
    rhs_cs: usize,
) {
    assert!(m == 0 || n == 0 || dst.len() > (m - 1) * dst_rs + (n - 1));
    assert!(m == 0 || k == 0 || lhs.len() > (m - 1) * lhs_rs + (k - 1) * lhs_cs);
    assert!(k == 0 || n == 0 || rhs.len() > (k - 1) * rhs_rs + (n - 1) * rhs_cs);
    // SAFETY: the asserts above bound every index the GEMM touches inside the three slices; dst does not
    // alias lhs or rhs (it is a distinct &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The goodness of one `[H, W]` map: `g[i*P + j] = reduce_{bin_ij} y^2`.
pub fn patch_goodness(ymap: &[f32], grid: &PatchGrid, reduce: GoodnessReduce, g: &mut [f32]) {
    let (p, w) = (grid.p, grid.w);
    for (i, &(r0, r1)) in grid.rows.iter().enumerate() {
        for (j, &(c0, c1)) in grid.cols.iter().enumerate() {
            let mut acc = 0.0f32;
            for r in r0..r1 {
                acc += super::ops::sum_squares(&ymap[r * w + c0..r * w + c1]);
            }
            g[i * p + j] = match reduce {
                GoodnessReduce::Mean => acc / grid.area(i, j) as f32,
                GoodnessReduce::Sum => acc,
            };
        }
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

/// Forward: `y = relu(conv3x3(x, W) + b)`, `g` = patch goodness of `y`. With `round_y`, `y` is stored rounded
/// to binary16 and the goodness summed from the stored values (the fp16 path).
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

/// Weight gradient: `dW = dz x_col^T`, `db = sum dz`, with `dz` from [`goodness_dz`] chunk by chunk. With
/// `dz_scale = Some(S)` (the fp16 path), the GEMM multiplies `round_f16(dz * S)` and `dW` is divided by `S`;
/// `db` sums the unrounded `dz`.
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
                            db_acc[c] += super::ops::sum(dzr);
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
