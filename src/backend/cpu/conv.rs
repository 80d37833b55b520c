//! What the CPU convolutions share (`crate::ops::conv_goodness_fwd::cpu`, `crate::ops::conv_goodness_wgrad::cpu`):
//! im2col and its transpose, the `gemm` crate's AVX-512/AVX2 GEMM, thread-local scratch, and the work split.
//!
//! Work split: the batch is cut into chunks of whole samples, about `TARGET_COLS` output pixels each (at least
//! eight chunks when the batch allows, so that every core has work). Chunks run in parallel on rayon; each
//! lowers its samples into a thread-local column matrix `[C_in*9, n]` and runs one single-threaded GEMM.
//! The weight gradient sums per-group partials (a fixed number of groups, in a fixed order), so a run gives
//! the same bits whatever the thread count.

use std::cell::RefCell;

/// Output pixels (GEMM columns) per chunk: large enough to amortise packing the weights, small enough that
/// the column matrix stays in the L2/L3 caches.
pub(crate) const TARGET_COLS: usize = 1024;
/// Fixed number of weight-gradient partial sums (bounded memory, thread-count-independent results).
pub(crate) const WGRAD_GROUPS: usize = 16;

thread_local! {
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with two thread-local scratch buffers of at least the given lengths (contents unspecified).
pub(crate) fn with_scratch<R>(a_len: usize, b_len: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
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
// A GEMM's shape, strides and operands, as the gemm crate takes them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sgemm(
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
