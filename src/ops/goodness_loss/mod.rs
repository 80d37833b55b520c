//! `goodness_loss`: `a = g R + r`, softmax cross-entropy against the labels, the logits `a` `[B, N]` written,
//! `dL/dg = (softmax(a) - onehot(y)) R^T / M` (`M`: `mean_over`, the batch in one process) when `dg` is given, and `[loss_sum, correct]` added to `stats`
//! (docs/method.md §6).

pub mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[doc(hidden)]
pub mod parity;

use super::{fits, Checked, Len};
use crate::backend::{Ops, STATS_LEN};
use anyhow::{ensure, Result};

/// g and dL/dg `[B, D]`, the projection `[D, N]` and its bias `[N]`, labels `[B]`, logits `[B, N]`, the stats
/// slot.
pub struct Args<'a, B, L> {
    /// The layer the op belongs to (0-based; the layer count for the fusion heads): on a GPU, its lane.
    pub layer: usize,
    pub batch: usize,
    /// The batch the loss is a mean over: `batch` in one process, the global batch when this is one rank's
    /// share of it (data-parallel training), so that the ranks' gradients sum to the global batch's.
    pub mean_over: usize,
    pub dim: usize,
    pub classes: usize,
    pub g: &'a B,
    pub proj_w: &'a B,
    pub proj_b: &'a B,
    pub labels: &'a L,
    pub logits: &'a mut B,
    pub dg: Option<&'a mut B>,
    pub stats: &'a mut B,
}

impl<B: Len, L: Len> Args<'_, B, L> {
    /// Every buffer holds what the op reads or writes for its shape; at least two classes.
    pub fn check(&self, be: &str) -> Result<()> {
        let (batch, dim, classes) = (self.batch, self.dim, self.classes);
        ensure!(
            batch > 0 && dim > 0 && classes >= 2,
            "{be} backend: a loss over {batch} x {dim} for {classes} classes"
        );
        ensure!(self.mean_over >= batch, "{be} backend: a loss of {batch} samples as a mean over {}", self.mean_over);
        fits(be, "goodness", self.g.len(), batch * dim)?;
        fits(be, "projection", self.proj_w.len(), dim * classes)?;
        fits(be, "projection bias", self.proj_b.len(), classes)?;
        fits(be, "labels", self.labels.len(), batch)?;
        fits(be, "logits", self.logits.len(), batch * classes)?;
        if let Some(dg) = &self.dg {
            fits(be, "dL/dg", dg.len(), batch * dim)?;
        }
        fits(be, "stats", self.stats.len(), STATS_LEN)
    }
}

/// Runs the op on `be` after its checks.
pub fn run<Be: Ops + ?Sized>(be: &Be, a: Args<'_, Be::Buf, Be::Labels>) -> Result<()> {
    a.check(be.kind())?;
    be.goodness_loss(Checked(a))
}
