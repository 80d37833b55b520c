//! `conv_goodness_wgrad`: `dL/dW`, `dL/db` of the conv from `x`, `y` and `dL/dg`, with
//! `dL/dz[b,c,h,w] = 1[y > 0] * 2 y * sum_{bins (i,j) containing (h,w)} dL/dg[b,c,i,j] / |bin_ij|` (no `/ |bin|`
//! for the sum reduction) produced on the fly (docs/method.md §5). Overwrites `dw` and `db`.

pub mod cpu;
#[doc(hidden)]
pub mod parity;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;

use super::{fits, grid_fits, Checked, Len};
use crate::backend::{ConvShape, Ops};
use crate::model::{GoodnessReduce, PatchGrid};
use anyhow::Result;

/// x, y and dL/dg as the forward's x, y and g; writes dL/dW `[C_out, C_in, 3, 3]` and dL/db `[C_out]`.
pub struct Args<'a, B> {
    /// The layer the op belongs to (0-based; the layer count for the fusion heads): on a GPU, its lane.
    pub layer: usize,
    pub s: &'a ConvShape,
    /// The batch `dg`'s loss is a mean over (`s.batch` in one process, the global batch for a rank's share): the
    /// fp16 path scales dL/dz by `backend::dz_scale` of it, so that a share rounds exactly as one process does.
    pub mean_over: usize,
    pub grid: &'a PatchGrid,
    pub reduce: GoodnessReduce,
    pub x: &'a B,
    pub y: &'a B,
    pub dg: &'a B,
    pub dw: &'a mut B,
    pub db: &'a mut B,
}

impl<B: Len> Args<'_, B> {
    /// Every buffer holds what the op reads or writes for its shape, and the grid covers the map.
    pub fn check(&self, be: &str) -> Result<()> {
        let s = self.s;
        anyhow::ensure!(
            self.mean_over >= s.batch,
            "{be} backend: a weight gradient of {} samples as a mean over {}",
            s.batch,
            self.mean_over
        );
        grid_fits(be, s, self.grid)?;
        fits(be, "x", self.x.len(), s.x_len())?;
        fits(be, "y", self.y.len(), s.y_len())?;
        fits(be, "dL/dg", self.dg.len(), s.batch * s.c_out * self.grid.cells())?;
        fits(be, "dL/dW", self.dw.len(), s.w_len())?;
        fits(be, "dL/db", self.db.len(), s.c_out)
    }
}

/// Runs the op on `be` after its checks.
pub fn run<Be: Ops + ?Sized>(be: &Be, a: Args<'_, Be::Buf>) -> Result<()> {
    a.check(be.kind())?;
    be.conv_goodness_wgrad(Checked(a))
}
