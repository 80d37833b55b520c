//! How much host memory a run needs, estimated before anything is allocated, and the refusal when it does not fit.

use super::*;

/// What a run holds in host memory, in bytes, about: the model and its optimizer state, the workspace of a
/// `batch`, and the batches the loader prepares ahead, for `in_pixels` values per input image. With
/// `workspace_on_host` (the CPU backend) the backend's buffers and its per-thread convolution scratch count too;
/// a GPU backend keeps those in device memory, which its own allocator checks. Saturates instead of wrapping, so
/// an absurd option gives an absurd (refused) estimate rather than a small one.
pub fn host_memory_estimate(spec: &ModelSpec, batch: usize, in_pixels: usize, workspace_on_host: bool) -> u64 {
    let m = |a: usize, b: usize| (a as u64).saturating_mul(b as u64);
    let b = batch;
    let n = spec.classes;
    let conv: u64 = spec.layers.iter().map(|l| m(l.weight_len(), 1).saturating_add(l.c_out as u64)).sum();
    let heads: u64 = spec.head_layers().map(|i| m(spec.layers[i].c_out + 1, n)).sum();
    let proj: u64 = spec.layers.iter().map(|l| m(l.goodness_dim() + 1, n)).sum();
    // Host copies: the initial parameters, and a checkpoint being written (values and moments as f32 and as
    // bytes, with the serializer's own buffer).
    let mut values = (conv + heads).saturating_mul(10).saturating_add(proj.saturating_mul(4));
    // The loader: the batches queued ahead (3), the one being made and the one in use.
    values = values.saturating_add(m(b, in_pixels).saturating_mul(5));
    if workspace_on_host {
        // Value, gradient, two moments, and an operand copy for the conv weights.
        values = values.saturating_add((conv + heads).saturating_mul(5)).saturating_add(proj);
        let act = spec.layers.iter().map(|l| l.c_in * l.h * l.w).chain(spec.layers.iter().map(|l| {
            let (h, w) = l.out_hw();
            l.c_out * h * w
        }));
        let max_act = act.max().unwrap_or(0);
        let max_y = spec.layers.iter().map(|l| l.c_out * l.h * l.w).max().unwrap_or(0);
        let max_d = spec.layers.iter().map(|l| l.goodness_dim()).max().unwrap_or(0);
        let gap: usize = spec.layers.iter().map(|l| l.c_out).sum();
        for v in [m(b, max_act).saturating_mul(2), m(b, max_y), m(b, max_d).saturating_mul(2), m(b, n * 2), m(b, gap)] {
            values = values.saturating_add(v);
        }
        // The convolution's per-thread column matrices (about 1024 output pixels, or one whole map; they grow to
        // the largest layer's and stay) and the weight gradient's 16 partial sums (while it runs).
        let threads = rayon::current_num_threads() as u64;
        let scratch = spec.layers.iter().map(|l| m(l.c_in * 9 + l.c_out, (l.h * l.w).max(1024))).max().unwrap_or(0);
        let partials = spec.layers.iter().map(|l| m(l.weight_len() + l.c_out, 16)).max().unwrap_or(0);
        values = values.saturating_add(scratch.saturating_mul(threads)).saturating_add(partials);
    }
    values.saturating_mul(4)
}

/// Refuses a workspace for `batch` images that would not fit in this machine's memory (before anything is
/// allocated), naming the options that size it.
pub fn ensure_memory(spec: &ModelSpec, batch: usize, input_size: usize, on_host: bool, what: &str) -> Result<()> {
    let in_pixels = spec.in_channels.saturating_mul(input_size).saturating_mul(input_size);
    let bytes = host_memory_estimate(spec, batch, in_pixels, on_host);
    crate::limits::ensure_fits(
        &format!("{what} ({} model, batch {batch})", spec.arch),
        bytes,
        "--batch, --width or --image-size (or the model's channel counts)",
    )
}
