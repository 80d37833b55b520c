//! What Rust and the kernels share, written once: build.rs reads this file and writes it into the header every
//! kernel is compiled with (`#define NAME value` per constant, a C struct per `#[repr(C)]` struct), so a value
//! here is the value in `kernels/*.cu`, in the CUDA driver stand-in and in the host build of the kernels.
//!
//! build.rs reads the text, not the compiled items: keep to `pub const NAME: f32 | usize = literal;` and
//! `#[repr(C)]` structs of `f32` fields, one item per line as below (anything else here is a build error).

/// `exp(-50)`: the epsilon of the per-sample RMS norm, added *outside* the square root (released code;
/// docs/method.md §6).
pub const RMS_EPS: f32 = 1.928_749_8e-22;

/// The most classes the loss kernel (kernels/goodness_loss.cu) holds in shared memory.
pub const MAX_CLASSES: usize = 4096;

/// The fp16 forward's padded weights (kernels/layout.cu) have their rows (output channels) rounded up to the
/// largest block tile's channels ...
pub const PAD_ROWS: usize = 128;

/// ... and their K = 9 Cp rounded up to the K step of the forward's pipelines.
pub const PAD_K: usize = 64;

/// The tap tables' K is rounded up to the weight gradient's widest column tile (a multiple of every K step).
pub const PAD_TAPS: usize = 256;

/// The weight gradient's dz rows hold the pixels rounded up to its largest pixel step.
pub const PAD_PIXELS: usize = 64;

/// The f32 scalars of one AdamW step, computed in f64 as PyTorch computes them in Python
/// ([`crate::backend::AdamWStep::scalars`]). `adamw_f32` reads them from the step's parameters in device memory,
/// which the host fills before the step (a by-value kernel argument would be frozen in a captured step graph).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AdamWScalars {
    /// `1 - lr * wd`.
    pub decay: f32,
    /// `lr / (1 - b1^t)`.
    pub step_size: f32,
    /// `sqrt(1 - b2^t)`.
    pub bc2_sqrt: f32,
    /// `1 - b1`.
    pub w1: f32,
    /// `b2`.
    pub b2: f32,
    /// `1 - b2`.
    pub w2: f32,
    /// `eps`.
    pub eps: f32,
}
