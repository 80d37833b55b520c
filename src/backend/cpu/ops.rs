//! What the CPU references of the small ops share (`crate::ops::<op>::cpu`): the vectorised sums, softmax
//! cross-entropy, the label check and the statistics slot.

use anyhow::{bail, Result};

/// `sum v^2` with 16 independent accumulators, so the compiler can keep it in vector registers (a single
/// f32 accumulator is a serial chain of adds that no compiler may reorder).
pub fn sum_squares(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x * x;
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().map(|&x| x * x).sum::<f32>()
}

/// `sum v`, vectorised like [`sum_squares`].
pub fn sum(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// Softmax cross-entropy of one row of logits: returns (loss, argmax == label) and writes
/// `da = (softmax(a) - onehot(label)) * scale` when asked.
pub fn softmax_ce(a: &[f32], label: usize, scale: f32, da: Option<&mut [f32]>) -> (f64, bool) {
    let max = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = a.iter().map(|&v| (v - max).exp()).sum();
    let lse = max + sum.ln();
    let loss = (lse - a[label]) as f64;
    // argmax, first index on ties (torch.argmax on CPU returns the first maximal index).
    let pred = a.iter().enumerate().fold(0, |best, (i, &v)| if v > a[best] { i } else { best });
    if let Some(da) = da {
        for (n, (d, &v)) in da.iter_mut().zip(a).enumerate() {
            let p = (v - lse).exp();
            *d = (p - if n == label { 1.0 } else { 0.0 }) * scale;
        }
    }
    (loss, pred == label)
}

pub(crate) fn check_labels(labels: &[u32], batch: usize, classes: usize) -> Result<()> {
    if labels.len() < batch {
        bail!("{} labels for a batch of {batch}", labels.len());
    }
    if let Some(&bad) = labels[..batch].iter().find(|&&l| l as usize >= classes) {
        bail!("label {bad} out of range for {classes} classes");
    }
    Ok(())
}

pub(crate) fn add_stats(stats: &mut [f32], per_sample: &[(f64, bool)]) {
    let loss: f64 = per_sample.iter().map(|p| p.0).sum();
    let correct = per_sample.iter().filter(|p| p.1).count();
    stats[0] += loss as f32;
    stats[1] += correct as f32;
}
