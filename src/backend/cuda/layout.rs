//! `layout` (kernels/layout.cu): the fp16 GEMMs' channels-last copies of a layer's input and weights, into the
//! lane's layout scratch. An input that the previous layer's output stored channels-last already
//! (`CudaBuf::channels_last`, ops/layer_output/cuda.rs) is read as it is; the others (the batch's input, whose 1 or 3
//! channels are padded to 8, and layers whose channel count is not a multiple of 8) are copied once per layer and
//! step: the forward makes the copy, the weight gradient after it reuses it (the trainer runs a layer's ops in a
//! row on one lane; a copy made from another buffer, another shape or a buffer written since is made again).

use super::args::launch::{KrscPadF16, NhwcPadF16};
use super::{geometry, grid1, CudaBackend, CudaBuf, LayoutScratch, Work};
use crate::backend::ConvShape;
use anyhow::Result;
use cudarc::driver::CudaSlice;
use half::f16;

/// `x` `[B, C, H, W]` as `[B, H, W, Cp]` in the lane's scratch (grown when too small), unless it is stored so
/// already; returns Cp. [`operand`] then gives the conv's channels-last input. With `reuse`,
/// the copy already there is used as it is when it was made from this very buffer, unchanged since (its
/// [`version`](CudaBuf::version)), for this shape: the weight gradient's case, after the layer's forward on the
/// same lane made it.
pub(crate) fn input(
    be: &CudaBackend,
    s: &ConvShape,
    x: &CudaBuf,
    scratch: &mut LayoutScratch,
    reuse: bool,
) -> Result<usize> {
    let cp = geometry::padded_channels(s.c_in);
    let len = s.batch * s.h * s.w * cp;
    anyhow::ensure!(
        len < 1 << 31,
        "cuda backend: a batch of {} {}x{}x{} inputs is too large for the fp16 conv kernels once its channels are \
         padded to {cp} (2^31 values); use a smaller batch",
        s.batch,
        s.c_in,
        s.h,
        s.w
    );
    if let Some(stored) = x.channels_last() {
        let want = [s.batch, s.c_in, s.h, s.w];
        anyhow::ensure!(
            stored == want && cp == s.c_in,
            "cuda backend: the conv's input is a channels-last {stored:?} tensor where the layer reads {want:?}"
        );
        be.inputs_read_as_stored.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(cp);
    }
    let made_from = (x.version(), *s);
    if reuse && scratch.x_from == Some(made_from) && scratch.x.as_ref().is_some_and(|xn| xn.len() >= len) {
        be.input_copies_reused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Ok(cp);
    }
    scratch.x_from = None;
    let x = x.f16("x")?;
    let xn = be.scratch(&mut scratch.x, len)?;
    let (bb, ci, h, w) = (s.batch as i32, s.c_in as i32, s.h as i32, s.w as i32);
    // SAFETY: the callers' checks bound x to B*C*H*W values, xn holds B*H*W*Cp; one thread per 8 channels.
    let work = Work::bytes(2.0 * (s.x_len() + len) as f64);
    be.launch("nhwc_pad_f16", work, || {
        Ok(unsafe {
            NhwcPadF16 { x, xn: &mut *xn, B: bb, C: ci, H: h, W: w, Cp: cp as i32 }.launch(
                be.stream(),
                be.f("nhwc_pad_f16")?,
                grid1(len / 8),
            )
        })
    })?;
    scratch.x_from = Some(made_from);
    Ok(cp)
}

/// The conv's channels-last input after [`input`]: `x` itself where it is stored so, else the copy in `copy` (the
/// lane's `LayoutScratch::x`).
pub(crate) fn operand<'a>(x: &'a CudaBuf, copy: &'a Option<CudaSlice<f16>>) -> Result<&'a CudaSlice<f16>> {
    if x.channels_last().is_some() {
        return x.f16_any_layout("x");
    }
    copy.as_ref().ok_or_else(|| anyhow::anyhow!("cuda backend: the conv's channels-last input was not made"))
}

/// The conv weights `[C_out, C, 3, 3]` as the padded `[C_out, 3, 3, Cp]` tiles in `slot`.
pub fn weights(be: &CudaBackend, s: &ConvShape, w: &CudaSlice<f16>, slot: &mut Option<CudaSlice<f16>>) -> Result<()> {
    let cp = geometry::padded_channels(s.c_in);
    let len = geometry::padded_weights_len(s.c_out, cp);
    let wn = be.scratch(slot, len)?;
    // SAFETY: the forward's checks (crate::ops::conv_goodness_fwd) bounds w to C_out*C*9 values, wn holds the padded length; one thread per value.
    be.launch("krsc_pad_f16", Work::bytes(2.0 * (s.w_len() + len) as f64), || {
        Ok(unsafe {
            KrscPadF16 { w, wn: &mut *wn, Cout: s.c_out as i32, C: s.c_in as i32, Cp: cp as i32 }.launch(
                be.stream(),
                be.f("krsc_pad_f16")?,
                grid1(len),
            )
        })
    })
}
