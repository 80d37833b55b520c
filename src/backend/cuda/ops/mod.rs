//! The backend's ops, one file per kernel source (`kernels/<op>.cu`): each takes its arguments checked by the op
//! (`crate::ops`), adds this backend's own limits, picks the kernel for the shape and precision, and launches it through the wrapper generated from the kernel's signature
//! ([`super::args::launch`]).

pub mod adamw;
pub mod conv_goodness_fwd;
pub mod conv_goodness_wgrad;
pub mod fusion_heads;
pub mod goodness_loss;
pub mod layer_output;
pub mod layout;
