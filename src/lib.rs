//! asge: Adaptive Spatial Goodness Encoding (arXiv 2509.12394), forward-only training of CNNs.
//!
//! Every conv layer learns from its own local loss: the squared activations of its feature map, pooled over
//! a `P_l x P_l` grid of spatial patches (the *goodness*), go through a fixed random projection to class
//! scores and a softmax cross-entropy. No gradient crosses a layer, so one training step is a forward
//! sweep plus a weight-gradient-only update per layer.
//!
//! - [`model`]: architecture specs (vgg8, vgg11, JSON), the patch grid, parameter shapes and init.
//! - [`backend`]: the [`backend::Backend`] trait (the fused ops the method needs) and its CPU reference.
//! - [`train`]: the layer step written once against the trait, AdamW, the schedule, checkpoints, metrics.
//! - [`data`]: dataset readers, the exact Pillow resize, augmentation, the prefetching loader.
//! - [`eval`]: the prediction strategies (last, best, fusion) and top-k accuracy.
//! - [`export`]: ONNX and weights-only safetensors exports.
//! - [`files`]: atomic writes with exclusive temporary files, folder locks, the run-folder guard.
//! - [`kernel_abi`]: the constants and step-parameter struct Rust and the kernels share (build.rs writes them
//!   into the kernels' header).
//! - [`limits`]: checked sizes and memory estimates for everything a file or an option sizes.

pub mod backend;
pub mod bench;
pub mod data;
pub mod dist;
pub mod eval;
pub mod export;
pub mod files;
pub mod infer;
pub mod info;
pub mod kernel_abi;
pub mod limits;
pub mod model;
pub mod ops;
pub mod rng;
pub mod trace;
pub mod train;
