//! `conv_goodness_fwd`: `y = relu(conv3x3(x, W) + b)` and the patch goodness
//! `g[b, c*P^2 + i*P + j] = reduce_{(h,w) in bin_ij} y[b,c,h,w]^2` (mean or sum over the bin; docs/method.md §2-§4).

pub mod cpu;
#[doc(hidden)]
pub mod parity;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;

use super::{fits, grid_fits, Checked, Len};
use crate::backend::{ConvShape, Ops};
use crate::model::{GoodnessReduce, PatchGrid};
use anyhow::Result;

/// x `[B, C_in, H, W]`, w `[C_out, C_in, 3, 3]`, b `[C_out]`; writes y `[B, C_out, H, W]` and g
/// `[B, C_out * P^2]`.
pub struct Args<'a, B> {
    /// The layer the op belongs to (0-based; the layer count for the fusion heads): on a GPU, its lane.
    pub layer: usize,
    pub s: &'a ConvShape,
    pub grid: &'a PatchGrid,
    pub reduce: GoodnessReduce,
    pub x: &'a B,
    pub w: &'a B,
    pub b: &'a B,
    pub y: &'a mut B,
    pub g: &'a mut B,
}

impl<B: Len> Args<'_, B> {
    /// Every buffer holds what the op reads or writes for its shape, and the grid covers the map.
    pub fn check(&self, be: &str) -> Result<()> {
        let s = self.s;
        grid_fits(be, s, self.grid)?;
        fits(be, "x", self.x.len(), s.x_len())?;
        fits(be, "conv weight", self.w.len(), s.w_len())?;
        fits(be, "conv bias", self.b.len(), s.c_out)?;
        fits(be, "y", self.y.len(), s.y_len())?;
        fits(be, "goodness", self.g.len(), s.batch * s.c_out * self.grid.cells())
    }
}

/// Runs the op on `be` after its checks.
pub fn run<Be: Ops + ?Sized>(be: &Be, a: Args<'_, Be::Buf>) -> Result<()> {
    a.check(be.kind())?;
    be.conv_goodness_fwd(Checked(a))
}
