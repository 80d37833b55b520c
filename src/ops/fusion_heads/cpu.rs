//! The CPU reference of `fusion_heads`: the heads' summed logits and the cross-entropy per sample, then each
//! head's gradient, in parallel over its classes.

use super::Args;
use crate::backend::cpu::CpuBackend;
use crate::backend::cpu::ops::{add_stats, check_labels, softmax_ce};
use crate::ops::Checked;
use anyhow::{bail, Result};
use rayon::prelude::*;

pub(crate) fn run(_be: &CpuBackend, a: Checked<Args<'_, Vec<f32>, Vec<u32>>>) -> Result<()> {
    let Args { layer: _, batch, mean_over, classes, feats, heads, labels, logits, grads, stats } = a.into_inner();
    let feats: Vec<(&[f32], usize)> = feats.iter().map(|&(f, c)| (f.as_slice(), c)).collect();
    let heads: Vec<(&[f32], &[f32])> = heads.iter().map(|&(w, b)| (w.as_slice(), b.as_slice())).collect();
    let mut grads: Option<Vec<(&mut [f32], &mut [f32])>> =
        grads.map(|g| g.iter_mut().map(|(w, b)| (w.as_mut_slice(), b.as_mut_slice())).collect());
    fusion_heads(batch, mean_over, classes, &feats, &heads, labels, logits, grads.as_deref_mut(), stats)
}

/// Fusion heads: logits `s = sum_k f_k W_k^T + b_k`, CE, and the head gradients.
// The arguments one by one: the dispatch above and tests/ops.rs call the reference math with slices and the
// fp16 switches that the op's Args do not carry.
#[allow(clippy::too_many_arguments)]
pub fn fusion_heads(
    batch: usize,
    mean_over: usize,
    classes: usize,
    feats: &[(&[f32], usize)],
    heads: &[(&[f32], &[f32])],
    labels: &[u32],
    logits: &mut [f32],
    grads: Option<&mut [(&mut [f32], &mut [f32])]>,
    stats: &mut [f32],
) -> Result<()> {
    check_labels(labels, batch, classes)?;
    if feats.len() != heads.len() {
        bail!("{} feature sets for {} fusion heads", feats.len(), heads.len());
    }
    let scale = 1.0 / mean_over as f32;
    let mut ds = vec![0.0f32; batch * classes];
    let logits = &mut logits[..batch * classes];
    let per_sample: Vec<(f64, bool)> = logits
        .par_chunks_mut(classes)
        .zip(ds.par_chunks_mut(classes))
        .enumerate()
        .map(|(b, (s, d))| {
            s.fill(0.0);
            for (&(f, c), &(w, bias)) in feats.iter().zip(heads) {
                let fb = &f[b * c..][..c];
                for (n, sv) in s.iter_mut().enumerate() {
                    let dot: f32 = w[n * c..][..c].iter().zip(fb).map(|(&a, &x)| a * x).sum();
                    *sv += dot + bias[n];
                }
            }
            softmax_ce(s, labels[b] as usize, scale, Some(d))
        })
        .collect();
    add_stats(stats, &per_sample);
    if let Some(grads) = grads {
        grads.par_iter_mut().zip(feats).for_each(|((gw, gb), &(f, c))| {
            gw[..classes * c].fill(0.0);
            gb[..classes].fill(0.0);
            for b in 0..batch {
                let fb = &f[b * c..][..c];
                for n in 0..classes {
                    let dsv = ds[b * classes + n];
                    gb[n] += dsv;
                    for (gv, &x) in gw[n * c..][..c].iter_mut().zip(fb) {
                        *gv += dsv * x;
                    }
                }
            }
        });
    }
    Ok(())
}
