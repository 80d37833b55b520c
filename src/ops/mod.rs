//! The fused ops of one ASGE training step, one folder each. An op's `mod.rs` holds its formula, its argument
//! struct (every parameter named once) and the checks of those arguments; a backend implements the op over the
//! arguments only as [`Checked`], which only an op's `run` makes, after its checks: the checks run once, before
//! dispatch, and no backend can skip them. A backend may add limits of its own (the CUDA kernels' 32-bit
//! indexing, the loss kernel's class limit).
//!
//! Buffers are checked by their lengths in values ([`Len`]), so one check serves the CPU's vectors and the
//! GPU's buffers.

/// Every op, listed once, with the backend types its arguments take: its folder's module below, its method in
/// `backend::Ops` and each backend's implementation of it (`cpu::run`, `cuda::run` in the folder) are generated
/// from this list. Adding an op is a folder, its kernel, and a line here.
macro_rules! for_each_op {
    ($then:path) => {
        $then! {
            adamw<Buf>,
            conv_goodness_fwd<Buf>,
            conv_goodness_wgrad<Buf>,
            fusion_heads<Buf, Labels>,
            goodness_loss<Buf, Labels>,
            layer_output<Buf>,
        }
    };
}
pub(crate) use for_each_op;

macro_rules! op_modules {
    ($($op:ident<$($t:ident),*>),* $(,)?) => {
        $(pub mod $op;)*
    };
}
for_each_op!(op_modules);
#[doc(hidden)]
pub mod parity;

use crate::backend::ConvShape;
use crate::model::PatchGrid;
use anyhow::{ensure, Result};

/// An op's arguments that passed its checks (made by the op's `run` only).
pub struct Checked<A>(A);

impl<A> Checked<A> {
    /// The arguments.
    pub fn into_inner(self) -> A {
        self.0
    }
}

/// A buffer as the checks see it: how many values it holds.
pub trait Len {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Len for Vec<T> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
}

/// `what` must hold at least `need` values.
pub(crate) fn fits(backend: &str, what: &str, have: usize, need: usize) -> Result<()> {
    ensure!(have >= need, "{backend} backend: {what} buffer holds {have} values, the op needs {need}");
    Ok(())
}

/// The patch grid covers the conv's feature map.
pub(crate) fn grid_fits(backend: &str, s: &ConvShape, grid: &PatchGrid) -> Result<()> {
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
