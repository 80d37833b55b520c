//! Kernel arguments: the typed launch wrappers build.rs generates from each kernel's signature in
//! `kernels/*.cu` ([`launch`]: one struct per kernel whose fields are its parameters in order), and the traits
//! that let a wrapper take any device buffer of the right element type (a whole slice or a view of one).
//!
//! The wrappers are the one place a launch's argument order lives: a call site names every parameter, and a
//! buffer of the wrong element type (f32 for fp16, i32 for f32) does not compile. The stand-in's binding table
//! comes from the same signatures, so the launch code, the kernels and their host twins cannot drift apart.

use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, LaunchArgs, PushKernelArg};

/// The null device pointer, for a parameter the kernel is told (by a flag) not to touch.
pub static NULL: u64 = 0;

/// A device buffer of `T` that a kernel reads.
pub trait DevIn<T> {
    fn push<'a>(&'a self, l: &mut LaunchArgs<'a>);
}

/// A device buffer of `T` that a kernel writes.
pub trait DevOut<T> {
    fn push_mut<'a>(&'a mut self, l: &mut LaunchArgs<'a>);
}

impl<T> DevIn<T> for CudaSlice<T> {
    fn push<'a>(&'a self, l: &mut LaunchArgs<'a>) {
        l.arg(self);
    }
}

impl<T> DevIn<T> for CudaView<'_, T> {
    fn push<'a>(&'a self, l: &mut LaunchArgs<'a>) {
        l.arg(self);
    }
}

impl<T> DevOut<T> for CudaSlice<T> {
    fn push_mut<'a>(&'a mut self, l: &mut LaunchArgs<'a>) {
        l.arg(self);
    }
}

impl<T> DevOut<T> for CudaViewMut<'_, T> {
    fn push_mut<'a>(&'a mut self, l: &mut LaunchArgs<'a>) {
        l.arg(self);
    }
}

/// One struct per kernel, generated from `kernels/*.cu` (see the module notes).
pub mod launch {
    include!(concat!(env!("OUT_DIR"), "/launch.rs"));
}
