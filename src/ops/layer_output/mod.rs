//! `layer_output`: the layer's output from `y` `[B, C, H, W]`: optional 2x2 pool (floor, like `AvgPool2d(2)`),
//! optional dropout, then the per-sample RMS norm `o / (sqrt(mean_{c,h,w} o^2) + e^-50)`, into `out`; when `gap`
//! is given, the global average pool of `out`, `[B, C]` (the fusion heads' features; docs/method.md §7-§8).

pub mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[doc(hidden)]
pub mod parity;

use super::{fits, Checked, Len};
use crate::backend::Ops;
use crate::model::PoolKind;
use anyhow::{ensure, Result};

/// y `[B, C, H, W]`; writes out `[B, C, H', W']` (halved by a pool) and the pooled features `[B, C]`.
pub struct Args<'a, B> {
    /// The layer the op belongs to (0-based; the layer count for the fusion heads): on a GPU, its lane.
    pub layer: usize,
    pub batch: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub pool: Option<PoolKind>,
    /// Dropout's probability; its key is the step's for this layer (`Schedule::prepare_step`).
    pub dropout: Option<f32>,
    /// The index of the batch's first sample in the step's global batch (a rank's share in data-parallel
    /// training; 0 in one process): the masks are keyed by the global index (`backend::Dropout`).
    pub first_sample: usize,
    pub y: &'a B,
    pub out: &'a mut B,
    pub gap: Option<&'a mut B>,
}

impl<B> Args<'_, B> {
    /// The output's spatial size: halved (floor) by a pool.
    pub fn out_hw(&self) -> (usize, usize) {
        if self.pool.is_some() {
            (self.h / 2, self.w / 2)
        } else {
            (self.h, self.w)
        }
    }
}

impl<B: Len> Args<'_, B> {
    /// Every buffer holds what the op reads or writes for its shape; a pooled map is at least 2x2.
    pub fn check(&self, be: &str) -> Result<()> {
        let (batch, c, h, w) = (self.batch, self.c, self.h, self.w);
        ensure!(self.pool.is_none() || (h >= 2 && w >= 2), "{be} backend: a 2x2 pool of a {h}x{w} map");
        let (ho, wo) = self.out_hw();
        ensure!(
            self.dropout.is_none() || self.first_sample.checked_add(batch).is_some(),
            "{be} backend: a batch at sample {}",
            self.first_sample
        );
        fits(be, "y", self.y.len(), batch * c * h * w)?;
        fits(be, "layer output", self.out.len(), batch * c * ho * wo)?;
        if let Some(gap) = &self.gap {
            fits(be, "pooled features", gap.len(), batch * c)?;
        }
        Ok(())
    }
}

/// Runs the op on `be` after its checks.
pub fn run<Be: Ops + ?Sized>(be: &Be, a: Args<'_, Be::Buf>) -> Result<()> {
    a.check(be.kind())?;
    be.layer_output(Checked(a))
}
