//! `fusion_heads`: `s = sum_k feats[k] W_k^T + b_k` into the logits `[B, N]`, softmax cross-entropy into `stats`,
//! and when `grads` is given, `dL/dW_k`, `dL/db_k` (overwritten) for every head `k` (docs/method.md §7).

pub mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[doc(hidden)]
pub mod parity;

use super::{fits, Checked, Len};
use crate::backend::{Ops, STATS_LEN};
use anyhow::{ensure, Result};

/// Per head its features `[B, C_k]` (with `C_k`), weight `[N, C_k]` and bias `[N]` (and their gradients),
/// labels `[B]`, logits `[B, N]`, the stats slot. Head `k` reads layer `k + 2` (layers count from 1; layer 1
/// has no head).
pub struct Args<'a, B, L> {
    /// The layer the op belongs to (0-based; the layer count for the fusion heads): on a GPU, its lane.
    pub layer: usize,
    pub batch: usize,
    /// The batch the loss is a mean over: `batch` in one process, the global batch when this is one rank's
    /// share of it (data-parallel training), so that the ranks' gradients sum to the global batch's.
    pub mean_over: usize,
    pub classes: usize,
    pub feats: &'a [(&'a B, usize)],
    pub heads: &'a [(&'a B, &'a B)],
    pub labels: &'a L,
    pub logits: &'a mut B,
    pub grads: Option<&'a mut [(&'a mut B, &'a mut B)]>,
    pub stats: &'a mut B,
}

impl<B: Len, L: Len> Args<'_, B, L> {
    /// As many feature sets (and gradient pairs) as heads, and every buffer holds what the op reads or writes.
    pub fn check(&self, be: &str) -> Result<()> {
        let (batch, classes) = (self.batch, self.classes);
        ensure!(self.mean_over >= batch, "{be} backend: a loss of {batch} samples as a mean over {}", self.mean_over);
        let (feats, heads) = (self.feats, self.heads);
        ensure!(
            feats.len() == heads.len(),
            "{be} backend: {} feature sets for {} fusion heads",
            feats.len(),
            heads.len()
        );
        let grads = self.grads.as_deref();
        if let Some(g) = grads {
            ensure!(
                g.len() == heads.len(),
                "{be} backend: {} gradient pairs for {} fusion heads",
                g.len(),
                heads.len()
            );
        }
        for (k, (&(f, c), &(w, b))) in feats.iter().zip(heads).enumerate() {
            let head = format!("the fusion head of layer {}", k + 2);
            fits(be, &format!("{head}: features"), f.len(), batch * c)?;
            fits(be, &format!("{head}: weight"), w.len(), classes * c)?;
            fits(be, &format!("{head}: bias"), b.len(), classes)?;
            if let Some((gw, gb)) = grads.and_then(|g| g.get(k)) {
                fits(be, &format!("{head}: weight gradient"), gw.len(), classes * c)?;
                fits(be, &format!("{head}: bias gradient"), gb.len(), classes)?;
            }
        }
        fits(be, "labels", self.labels.len(), batch)?;
        fits(be, "head logits", self.logits.len(), batch * classes)?;
        fits(be, "stats", self.stats.len(), STATS_LEN)
    }
}

/// Runs the op on `be` after its checks.
pub fn run<Be: Ops + ?Sized>(be: &Be, a: Args<'_, Be::Buf, Be::Labels>) -> Result<()> {
    a.check(be.kind())?;
    be.fusion_heads(Checked(a))
}
