//! The argument checks of every op, written once and made by every backend before it computes: each buffer
//! holds what the op reads or writes for its shape, and the shapes agree with each other. A backend may add limits
//! of its own (the CUDA kernels' 32-bit indexing, the loss kernel's class limit), never skip these.
//!
//! Buffers are given by their lengths (in values), so one check serves the CPU's vectors and the GPU's buffers.

use super::{ConvShape, STATS_LEN};
use crate::model::PatchGrid;
use anyhow::{ensure, Result};

/// `what` must hold at least `need` values.
pub fn fits(backend: &str, what: &str, have: usize, need: usize) -> Result<()> {
    ensure!(have >= need, "{backend} backend: {what} buffer holds {have} values, the op needs {need}");
    Ok(())
}

fn grid_fits(backend: &str, s: &ConvShape, grid: &PatchGrid) -> Result<()> {
    ensure!(
        (grid.h, grid.w) == (s.h, s.w) && grid.p >= 1 && grid.p <= s.h.min(s.w),
        "{backend} backend: a {0}x{0} patch grid over {1}x{2} for a {3}x{4} feature map",
        grid.p,
        grid.h,
        grid.w,
        s.h,
        s.w
    );
    Ok(())
}

/// `conv_goodness_fwd`: x `[B, C_in, H, W]`, w `[C_out, C_in, 3, 3]`, b `[C_out]`, y `[B, C_out, H, W]`, g
/// `[B, C_out * P^2]`.
#[allow(clippy::too_many_arguments)]
pub fn conv_fwd(
    be: &str,
    s: &ConvShape,
    grid: &PatchGrid,
    x: usize,
    w: usize,
    b: usize,
    y: usize,
    g: usize,
) -> Result<()> {
    grid_fits(be, s, grid)?;
    fits(be, "x", x, s.x_len())?;
    fits(be, "conv weight", w, s.w_len())?;
    fits(be, "conv bias", b, s.c_out)?;
    fits(be, "y", y, s.y_len())?;
    fits(be, "goodness", g, s.batch * s.c_out * grid.cells())
}

/// `conv_goodness_wgrad`: x, y, dL/dg as in [`conv_fwd`]; dL/dW and dL/db as w and b.
#[allow(clippy::too_many_arguments)]
pub fn conv_wgrad(
    be: &str,
    s: &ConvShape,
    grid: &PatchGrid,
    x: usize,
    y: usize,
    dg: usize,
    dw: usize,
    db: usize,
) -> Result<()> {
    grid_fits(be, s, grid)?;
    fits(be, "x", x, s.x_len())?;
    fits(be, "y", y, s.y_len())?;
    fits(be, "dL/dg", dg, s.batch * s.c_out * grid.cells())?;
    fits(be, "dL/dW", dw, s.w_len())?;
    fits(be, "dL/db", db, s.c_out)
}

/// `goodness_loss`: g and dL/dg `[B, D]`, the projection `[D, N]` and its bias `[N]`, labels `[B]`, logits
/// `[B, N]`, the stats slot.
#[allow(clippy::too_many_arguments)]
pub fn goodness_loss(
    be: &str,
    batch: usize,
    dim: usize,
    classes: usize,
    g: usize,
    pw: usize,
    pb: usize,
    labels: usize,
    logits: usize,
    dg: Option<usize>,
    stats: usize,
) -> Result<()> {
    ensure!(batch > 0 && dim > 0 && classes >= 2, "{be} backend: a loss over {batch} x {dim} for {classes} classes");
    fits(be, "goodness", g, batch * dim)?;
    fits(be, "projection", pw, dim * classes)?;
    fits(be, "projection bias", pb, classes)?;
    fits(be, "labels", labels, batch)?;
    fits(be, "logits", logits, batch * classes)?;
    if let Some(dg) = dg {
        fits(be, "dL/dg", dg, batch * dim)?;
    }
    fits(be, "stats", stats, STATS_LEN)
}

/// `layer_output`: y `[B, C, H, W]`, out `[B, C, H', W']` (halved by a pool), the pooled features `[B, C]`.
#[allow(clippy::too_many_arguments)]
pub fn layer_output(
    be: &str,
    batch: usize,
    c: usize,
    h: usize,
    w: usize,
    pool: bool,
    y: usize,
    out: usize,
    gap: Option<usize>,
) -> Result<()> {
    ensure!(!pool || (h >= 2 && w >= 2), "{be} backend: a 2x2 pool of a {h}x{w} map");
    let (ho, wo) = if pool { (h / 2, w / 2) } else { (h, w) };
    fits(be, "y", y, batch * c * h * w)?;
    fits(be, "layer output", out, batch * c * ho * wo)?;
    if let Some(gap) = gap {
        fits(be, "pooled features", gap, batch * c)?;
    }
    Ok(())
}

/// `fusion_heads`: per head its features `[B, C_k]`, weight `[N, C_k]` and bias `[N]` (and their gradients),
/// labels `[B]`, logits `[B, N]`, the stats slot. `len` is a buffer's length in values (the backends' buffer
/// types differ). Head `k` reads layer `k + 2` (layers count from 1; layer 1 has no head).
#[allow(clippy::too_many_arguments)]
pub fn fusion_heads<T>(
    be: &str,
    batch: usize,
    classes: usize,
    feats: &[(&T, usize)],
    heads: &[(&T, &T)],
    grads: Option<&[(&mut T, &mut T)]>,
    labels: usize,
    logits: usize,
    stats: usize,
    len: impl Fn(&T) -> usize,
) -> Result<()> {
    ensure!(feats.len() == heads.len(), "{be} backend: {} feature sets for {} fusion heads", feats.len(), heads.len());
    if let Some(g) = grads {
        ensure!(g.len() == heads.len(), "{be} backend: {} gradient pairs for {} fusion heads", g.len(), heads.len());
    }
    for (k, (&(f, c), &(w, b))) in feats.iter().zip(heads).enumerate() {
        let head = format!("the fusion head of layer {}", k + 2);
        fits(be, &format!("{head}: features"), len(f), batch * c)?;
        fits(be, &format!("{head}: weight"), len(w), classes * c)?;
        fits(be, &format!("{head}: bias"), len(b), classes)?;
        if let Some((gw, gb)) = grads.and_then(|g| g.get(k)) {
            fits(be, &format!("{head}: weight gradient"), len(gw), classes * c)?;
            fits(be, &format!("{head}: bias gradient"), len(gb), classes)?;
        }
    }
    fits(be, "labels", labels, batch)?;
    fits(be, "head logits", logits, batch * classes)?;
    fits(be, "stats", stats, STATS_LEN)
}

/// `adamw`: the parameter, its gradient, both moments and the optional operand copy hold `len` values.
pub fn adamw(be: &str, len: usize, p: usize, grad: usize, m: usize, v: usize, copy: Option<usize>) -> Result<()> {
    for (what, n) in [("parameter", p), ("gradient", grad), ("exp_avg", m), ("exp_avg_sq", v)] {
        fits(be, what, n, len)?;
    }
    if let Some(c) = copy {
        fits(be, "weight copy", c, len)?;
    }
    Ok(())
}
