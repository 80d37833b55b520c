//! Launch geometry of every kernel, as pure functions of the shapes: the backend launches with them, and the
//! host emulation of the kernels (tests/kernel_emulation.rs) runs the same grids.

use crate::backend::{ConvShape, Precision};
use crate::kernel_abi::{PAD_K, PAD_PIXELS, PAD_ROWS, PAD_TAPS};
use crate::model::{GoodnessReduce, PatchGrid};

/// Threads per block of every kernel.
pub const THREADS: u32 = 256;

/// One thread per element.
pub fn grid1(n: usize) -> (u32, u32, u32) {
    ((n as u32).div_ceil(THREADS).max(1), 1, 1)
}

/// A conv forward kernel: its name, block tile (channels x pixels) and dynamic shared memory in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FwdKernel {
    pub name: &'static str,
    pub tile_m: u32,
    pub tile_n: u32,
    pub smem: u32,
}

/// The fewest blocks of the large fp16 forward tile worth launching: one wave on the 132 SMs of an H100 SXM or
/// H200 (one block a SM: 132 KB of shared memory, ~200 registers a thread) with 4 idle.
pub const LARGE_TILE_MIN_BLOCKS: usize = 128;

/// The conv forward's kernel: 64 x 64 in f32; in f16 the channels-last pipelines (kernels/conv_goodness_fwd.cu),
/// the 128 x 256 tile where there are at least 128 output channels and it still makes a wave of blocks
/// ([`LARGE_TILE_MIN_BLOCKS`]), the 64 x 128 tile below (the late, small layers keep its 4x more blocks). A
/// heuristic for the first GPU run to confirm.
pub fn conv_fwd_kernel(s: &ConvShape, p: Precision) -> FwdKernel {
    let large = CONV_FWD_F16[1];
    let large_blocks = (s.batch * s.h * s.w).div_ceil(large.tile_n as usize) * s.c_out.div_ceil(large.tile_m as usize);
    match p {
        Precision::F32 => FwdKernel { name: "conv_goodness_fwd_f32", tile_m: 64, tile_n: 64, smem: 0 },
        Precision::F16 if s.c_out >= 128 && large_blocks >= LARGE_TILE_MIN_BLOCKS => large,
        Precision::F16 => CONV_FWD_F16[0],
    }
}

/// The fp16 forward kernels: shared memory = the larger of the pipeline's, stages x (tile_m + tile_n) rows x
/// (K step + 8) halves, and the goodness epilogue's squares, tile_m x (tile_n + 1) floats.
pub const CONV_FWD_F16: [FwdKernel; 2] = [
    FwdKernel { name: "conv_fwd_nhwc_f16", tile_m: 64, tile_n: 128, smem: max(3 * (64 + 128) * 144, 64 * 129 * 4) },
    FwdKernel { name: "conv_fwd_nhwc_f16_l", tile_m: 128, tile_n: 256, smem: max(4 * (128 + 256) * 80, 128 * 257 * 4) },
];

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

const fn max(a: u32, b: u32) -> u32 {
    if a > b {
        a
    } else {
        b
    }
}

/// The layer output's split (kernels/layer_output.cu): `(channels per block, blocks per sample)`, so that a block
/// takes about 2048 of the sample's output values, but at least a channel for each of its 8 warps (maps of 32
/// values or more) or for each of its 256 threads (smaller maps) in the store pass, and at most 65,535 slices (the
/// grid's y). One block a sample, as before, left an H100's SMs mostly idle below ~130 samples and at small widths.
pub fn layer_output_split(c: usize, out_hw: usize) -> (usize, usize) {
    let c = c.max(1);
    let unit = if out_hw >= 32 { 8 } else { THREADS as usize };
    let slices = (c * out_hw).div_ceil(2048).max(1);
    let cpb = c.div_ceil(slices).max(unit).min(c).max(c.div_ceil(65_535));
    (cpb, c.div_ceil(cpb))
}

/// [`layer_output_split`] for the channels-last fp16 store (kernels/layer_output.cu, `layer_output_nhwc_f16`), for
/// `c` a multiple of 8: whole 8-channel groups a block, at most 256 of them (a thread each).
pub fn layer_output_split_nhwc(c: usize, out_hw: usize) -> (usize, usize) {
    let (cpb, _) = layer_output_split(c, out_hw);
    let cpb = cpb.next_multiple_of(8).min(c).min(8 * THREADS as usize);
    (cpb, c.div_ceil(cpb))
}

/// Samples of `c` channels on maps of `hw` values stored channels-last, `[B, hw, c]`, in NCHW order: how a
/// channels-last activation is read back (`Device::read`, and the emulation test of the store).
pub fn nchw_from_nhwc(v: &[f32], c: usize, hw: usize) -> Vec<f32> {
    (0..v.len()).map(|i| v[(i / (c * hw) * hw + i % hw) * c + i / hw % c]).collect()
}

/// The fp16 forward's goodness partials (kernels/conv_goodness_fwd.cu, `tile_goodness`): the most bands (a
/// sample's cells of one row bin) that one tile of `tile_n` consecutive pixels cuts, over the layer's tiles.
/// Tile t's partials are `[NB][P][C_out]` floats at `t * NB * P * C_out`.
fn goodness_bands(s: &ConvShape, grid: &PatchGrid, tile_n: usize) -> usize {
    let (h, w, p, n) = (s.h, s.w, grid.p, s.batch * s.h * s.w);
    // A row's first and last bin (bins may overlap), as band indices b * P + i.
    let first = |row: usize| (row / h) * p + (row % h) * p / h;
    let last = |row: usize| (row / h) * p + (((row % h) + 1) * p).div_ceil(h) - 1;
    // A tile's span depends on where it starts in its sample (and shrinks when the batch's end cuts it), so the
    // first period of starts covers every tile.
    let hw = h * w;
    let period = hw / gcd(hw, tile_n);
    (0..n.div_ceil(tile_n).min(period))
        .map(|t| last((((t + 1) * tile_n).min(n) - 1) / w) + 1 - first(t * tile_n / w))
        .max()
        .unwrap_or(1)
}

/// The goodness partials of kernel `k`'s tiles: `(NB, length)`, one `[NB][P][C_out]` block per tile of pixels.
pub fn goodness_partials(s: &ConvShape, grid: &PatchGrid, k: &FwdKernel) -> (usize, usize) {
    let (gx, _, _) = conv_fwd_grid(s, k.tile_m, k.tile_n);
    let nb = goodness_bands(s, grid, k.tile_n as usize);
    (nb, gx as usize * nb * grid.p * s.c_out)
}

// conv_fwd_splitk_f16 (kernels/conv_goodness_fwd.cu) hard-codes this tile as SPLITK_TM x SPLITK_TN: its goodness
// partials are laid out by it.
const _: () = assert!(CONV_FWD_F16[0].tile_m == 64 && CONV_FWD_F16[0].tile_n == 128);

/// A kernel variant forced instead of chosen by shape ([`conv_fwd_choice`], [`wgrad_choice`]): how the device
/// parity tests run every fp16 GEMM variant on every case, and how a benchmark compares them. `None` keeps the
/// shape's choice; f32 has one kernel each and ignores it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tiles {
    pub fwd: Option<FwdTile>,
    pub wgrad: Option<WgradTile>,
}

/// The fp16 forward's variants: the 64 x 128 tile, the 128 x 256 tile, and the 64 x 128 tile split over K.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FwdTile {
    Small,
    Large,
    SplitK,
}

/// The fp16 weight gradient's variants: the 64 x 128 and the 128 x 256 tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgradTile {
    Small,
    Large,
}

/// The K splits a forced split-K forward takes: three, as the emulation test runs it (on a layer of two K steps
/// one split is empty, which the kernel must handle too).
pub const FORCED_SPLITS: usize = 3;

/// The forward's kernel and its K splits for shape `s`: the shape's choice ([`conv_fwd_kernel`],
/// [`conv_fwd_splits`]), or the variant `tiles` forces.
pub fn conv_fwd_choice(s: &ConvShape, p: Precision, tiles: Tiles) -> (FwdKernel, usize) {
    match (p, tiles.fwd) {
        (Precision::F32, _) | (_, None) => {
            let k = conv_fwd_kernel(s, p);
            (k, conv_fwd_splits(s, &k))
        }
        (Precision::F16, Some(FwdTile::Small)) => (CONV_FWD_F16[0], 1),
        (Precision::F16, Some(FwdTile::Large)) => (CONV_FWD_F16[1], 1),
        (Precision::F16, Some(FwdTile::SplitK)) => (CONV_FWD_F16[0], FORCED_SPLITS),
    }
}

/// The weight gradient's kernel for shape `s`: the shape's choice ([`wgrad_kernel`]) or the variant `tiles`
/// forces.
pub fn wgrad_choice(s: &ConvShape, p: Precision, tiles: Tiles) -> WgradKernel {
    match (p, tiles.wgrad) {
        (Precision::F32, _) | (_, None) => wgrad_kernel(s, p),
        (Precision::F16, Some(WgradTile::Small)) => WGRAD_F16[0],
        (Precision::F16, Some(WgradTile::Large)) => WGRAD_F16[1],
    }
}

/// The small fp16 forward tile split over K (`conv_fwd_nhwc_f16_sk`, then `conv_fwd_splitk_f16`).
pub const CONV_FWD_F16_SPLIT: FwdKernel = FwdKernel { name: "conv_fwd_nhwc_f16_sk", ..CONV_FWD_F16[0] };

/// How many K splits the fp16 forward takes: 1 (none) unless kernel `k` is the small tile and its grid gives
/// fewer than two blocks per SM (it holds two); then enough that it does, each split at least 4 K steps of 64
/// deep (the pipeline's depth, and the partials' extra traffic, want long runs).
pub fn conv_fwd_splits(s: &ConvShape, k: &FwdKernel) -> usize {
    if k.name != CONV_FWD_F16[0].name {
        return 1;
    }
    let (gx, gy, _) = conv_fwd_grid(s, k.tile_m, k.tile_n);
    let blocks = (gx * gy) as usize;
    let steps = (9 * padded_channels(s.c_in)).div_ceil(64);
    if blocks >= 2 * LARGE_TILE_MIN_BLOCKS || steps < 8 {
        return 1;
    }
    let per = steps.div_ceil((2 * LARGE_TILE_MIN_BLOCKS).div_ceil(blocks)).max(4);
    steps.div_ceil(per)
}

/// The channel count of the fp16 forward's channels-last operands: `c_in` rounded up to a multiple of 8 (one
/// 16-byte chunk of K holds 8 channels of one tap).
pub fn padded_channels(c_in: usize) -> usize {
    c_in.next_multiple_of(8)
}

/// The length of the fp16 forward's padded weights `[C_out, 3, 3, cp]` (kernels/prelude.cuh, `NHWC_MP` and
/// `NHWC_KP`): rows rounded up to `PAD_ROWS`, K = 9 cp up to `PAD_K`.
pub fn padded_weights_len(c_out: usize, cp: usize) -> usize {
    c_out.next_multiple_of(PAD_ROWS) * (9 * cp).next_multiple_of(PAD_K)
}

/// The fp16 forward's chunk table (kernels/conv_goodness_fwd.cu, `conv_fwd_nhwc`) over NHWC maps of `w` columns
/// and `cp` (padded) channels: entry j for k = 8 j = r*cp + ci (r = kh*3 + kw) is
/// `((kh*w + kw)*cp + ci) << 9 | 1 << r`, the chunk's offset from the pixel's window origin and its tap bit; 0
/// (no tap) from 9 cp up to K rounded up to `PAD_TAPS` (`NHWC_TAPS`: the weight gradient's widest column tile).
pub fn nhwc_tap_table(cp: usize, h: usize, w: usize) -> Result<Vec<i32>, String> {
    assert!(cp.is_multiple_of(8), "padded channels");
    if (2 * w + 3) * cp >= 1 << 23 {
        return Err(format!(
            "a {cp}-channel (padded) layer input {w} pixels wide is too large for the fp16 CUDA forward's chunk \
             offsets ((2W + 3) * C below 2^23); the CPU backend has no such limit (the map is {h}x{w})"
        ));
    }
    let mut t: Vec<i32> = (0..9 * cp / 8)
        .map(|j| {
            let (r, ci) = (8 * j / cp, 8 * j % cp);
            ((((r / 3) * w + r % 3) * cp + ci) << 9 | 1 << r) as u32 as i32
        })
        .collect();
    t.resize((9 * cp).next_multiple_of(PAD_TAPS) / 8, 0);
    Ok(t)
}

/// The conv forward's grid for a block tile of `tile_m` channels x `tile_n` pixels.
pub fn conv_fwd_grid(s: &ConvShape, tile_m: u32, tile_n: u32) -> (u32, u32, u32) {
    let n = (s.batch * s.h * s.w) as u32;
    (n.div_ceil(tile_n), (s.c_out as u32).div_ceil(tile_m), 1)
}

/// The conv forward's grid: one block per tile of [`conv_fwd_kernel`].
pub fn conv_fwd(s: &ConvShape, p: Precision) -> (u32, u32, u32) {
    let k = conv_fwd_kernel(s, p);
    conv_fwd_grid(s, k.tile_m, k.tile_n)
}

/// The weight gradient's split: blocks of `tile_m` channels x `tile_k` columns of K, and the pixels cut into
/// `slices` slices of `chunk` (a multiple of the kernel's pixel step) so that at least ~512 blocks run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WgradSplit {
    pub grid: (u32, u32, u32),
    pub chunk: usize,
    pub slices: usize,
}

/// A weight-gradient GEMM kernel: its name, block tile (channels x columns of K), pixels a step, dynamic shared
/// memory in bytes, and whether it runs over the channels-last operands (K = 9 Cp, the pixels padded to
/// `WG_NP`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WgradKernel {
    pub name: &'static str,
    pub tile_m: usize,
    pub tile_k: usize,
    pub step: usize,
    pub smem: u32,
    pub nhwc: bool,
}

/// The fp16 weight-gradient kernels (kernels/conv_goodness_wgrad.cu): shared memory = stages x (tile_m x (step +
/// 8) + step x (tile_k + 8)) halves.
pub const WGRAD_F16: [WgradKernel; 2] = [
    WgradKernel { name: "conv_wgrad_nhwc_f16", tile_m: 64, tile_k: 128, step: 64, smem: 3 * 26_624, nhwc: true },
    WgradKernel { name: "conv_wgrad_nhwc_f16_l", tile_m: 128, tile_k: 256, step: 32, smem: 4 * 27_136, nhwc: true },
];

const WGRAD_F32: WgradKernel =
    WgradKernel { name: "conv_goodness_wgrad_f32", tile_m: 64, tile_k: 64, step: 16, smem: 0, nhwc: false };

/// The weight gradient's kernel: in f16 the 128 x 256 tile where there are at least 128 output channels and
/// K = 9 Cp reaches 1024 (rounding K up to 256 columns then wastes at most ~11% of the MMAs), the 64 x 128 tile
/// below.
pub fn wgrad_kernel(s: &ConvShape, p: Precision) -> WgradKernel {
    match p {
        Precision::F32 => WGRAD_F32,
        Precision::F16 if s.c_out >= 128 && 9 * padded_channels(s.c_in) >= 1024 => WGRAD_F16[1],
        Precision::F16 => WGRAD_F16[0],
    }
}

pub fn wgrad(s: &ConvShape, p: Precision) -> WgradSplit {
    wgrad_split(s, &wgrad_kernel(s, p))
}

/// The padded pixel count of the fp16 weight gradient's dz rows (`WG_NP`: a multiple of both pixel steps).
pub fn wgrad_pixels(s: &ConvShape) -> usize {
    (s.batch * s.h * s.w).next_multiple_of(PAD_PIXELS)
}

/// The split for kernel `k`'s block tile.
pub fn wgrad_split(s: &ConvShape, k: &WgradKernel) -> WgradSplit {
    let (n, kk) =
        if k.nhwc { (wgrad_pixels(s), 9 * padded_channels(s.c_in)) } else { (s.batch * s.h * s.w, s.c_in * 9) };
    let (gx, gy) = (kk.div_ceil(k.tile_k) as u32, s.c_out.div_ceil(k.tile_m) as u32);
    let want_z = (512 / (gx * gy) as usize).max(1);
    let chunk = n.div_ceil(want_z).next_multiple_of(k.step).max(256);
    let slices = n.div_ceil(chunk);
    WgradSplit { grid: (gx, gy, slices as u32), chunk, slices }
}

/// The fp16 weight gradient's dz pass (`dz_f16`): one block per channel (of `NHWC_MP(C_out)`) and 2048 pixels.
pub fn dz_grid(s: &ConvShape) -> (u32, u32, u32) {
    (wgrad_pixels(s).div_ceil(2048) as u32, s.c_out.next_multiple_of(PAD_ROWS) as u32, 1)
}

/// The fp16 weight gradient's pixel table: per pixel n < `wgrad_pixels` the in-map mask of its 3x3 window's taps
/// (bit kh*3 + kw, as the kernels' `tap_mask`), 0 past the batch's B*H*W pixels.
pub fn pixel_masks(s: &ConvShape) -> Vec<u16> {
    let (h, w) = (s.h as i64, s.w as i64);
    let mut t: Vec<u16> = (0..s.batch * s.h * s.w)
        .map(|n| {
            let p = (n % (s.h * s.w)) as i64;
            let (oh, ow) = (p / w, p % w);
            (0..9)
                .filter(|r| (0..h).contains(&(oh + r / 3 - 1)) && (0..w).contains(&(ow + r % 3 - 1)))
                .fold(0, |m, r| m | 1 << r)
        })
        .collect();
    t.resize(wgrad_pixels(s), 0);
    t
}

/// The conv GEMMs' tap table (kernels/prelude.cuh, `tap_fetch`) for a 3x3 conv over `c_in` maps of `h` x `w`:
/// entry k = ci*9 + r (r = kh*3 + kw) is `(ci*h*w + kh*w + kw) << 9 | 1 << r`; from 9 `c_in` on, up to the
/// next multiple of `PAD_TAPS` (the largest weight-gradient tap tile, a multiple of every K step; `TAPS`), it
/// is 0: no tap.
pub fn tap_table(c_in: usize, h: usize, w: usize) -> Result<Vec<i32>, String> {
    let k = c_in * 9;
    if c_in * h * w + 2 * w + 2 >= 1 << 23 {
        return Err(format!(
            "a {c_in}x{h}x{w} layer input is too large for the CUDA conv kernels' tap offsets (C*H*W below \
             2^23); the CPU backend has no such limit"
        ));
    }
    let mut t: Vec<i32> = (0..k)
        .map(|k| {
            let (ci, r) = (k / 9, k % 9);
            (((ci * h * w + (r / 3) * w + r % 3) << 9) | 1 << r) as u32 as i32
        })
        .collect();
    t.resize(k.next_multiple_of(PAD_TAPS).max(PAD_TAPS), 0);
    Ok(t)
}

/// The weight gradients' cell table (kernels/prelude.cuh, `cells_q`): per pixel of the map, the
/// bins holding it packed as `r0 | r1 << 8 | c0 << 16 | c1 << 24` (first and last row bin, first and last
/// column bin); and per cell the divisor of its goodness gradient (its area for the mean, 1 for the sum).
pub fn cell_table(grid: &PatchGrid, reduce: GoodnessReduce) -> Result<(Vec<i32>, Vec<f32>), String> {
    if grid.p > 256 {
        return Err(format!("a patch grid of {} is too fine for the CUDA kernels' cell table (at most 256)", grid.p));
    }
    // The bins holding coordinate c: a run of consecutive bins (they are ordered and overlap by at most one).
    let span = |bins: &[(usize, usize)], c: usize| {
        let first = bins.iter().position(|&(a, b)| a <= c && c < b).expect("every pixel lies in a bin");
        let last = bins.iter().rposition(|&(a, b)| a <= c && c < b).unwrap_or(first);
        (first, last)
    };
    let mut cells = Vec::with_capacity(grid.h * grid.w);
    for oh in 0..grid.h {
        let (r0, r1) = span(&grid.rows, oh);
        for ow in 0..grid.w {
            let (c0, c1) = span(&grid.cols, ow);
            cells.push((r0 | r1 << 8 | c0 << 16 | c1 << 24) as i32);
        }
    }
    let div = (0..grid.p)
        .flat_map(|i| (0..grid.p).map(move |j| (i, j)))
        .map(|(i, j)| match reduce {
            GoodnessReduce::Mean => grid.area(i, j) as f32,
            GoodnessReduce::Sum => 1.0,
        })
        .collect();
    Ok((cells, div))
}

/// AdamW: a grid-stride loop over at most 4096 blocks.
pub fn adamw(len: usize) -> (u32, u32, u32) {
    ((len as u32).div_ceil(THREADS).clamp(1, 4096), 1, 1)
}
