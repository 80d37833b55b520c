//! `adamw`: one AdamW step on the first `len` elements (PyTorch's semantics, docs/method.md §10):
//! `p *= 1 - lr wd`; `m = lerp(m, g, 1 - b1)`; `v = b2 v + (1 - b2) g^2`;
//! `p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)`; and, when `copy` is given (a conv operand
//! buffer), the new `p` stored into it in the same pass. The step's scalars are not an argument: they are the
//! step's, set once by `Schedule::prepare_step` (a captured CUDA step graph reads them from the device).

pub mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[doc(hidden)]
pub mod parity;

use super::{fits, Checked, Len};
use crate::backend::Ops;
use anyhow::Result;

/// The parameter, its gradient, both moments and the optional operand copy, each of at least `len` values.
pub struct Args<'a, B> {
    /// The layer the op belongs to (0-based; the layer count for the fusion heads): on a GPU, its lane.
    pub layer: usize,
    pub len: usize,
    pub p: &'a mut B,
    pub grad: &'a B,
    pub m: &'a mut B,
    pub v: &'a mut B,
    pub copy: Option<&'a mut B>,
}

impl<B: Len> Args<'_, B> {
    /// Every buffer holds `len` values.
    pub fn check(&self, be: &str) -> Result<()> {
        let lens = [("parameter", self.p.len()), ("gradient", self.grad.len()), ("exp_avg", self.m.len())];
        for (what, n) in lens.into_iter().chain([("exp_avg_sq", self.v.len())]) {
            fits(be, what, n, self.len)?;
        }
        if let Some(c) = &self.copy {
            fits(be, "weight copy", c.len(), self.len)?;
        }
        Ok(())
    }
}

/// Runs the op on `be` after its checks.
pub fn run<Be: Ops + ?Sized>(be: &Be, a: Args<'_, Be::Buf>) -> Result<()> {
    a.check(be.kind())?;
    be.adamw(Checked(a))
}
