//! The CPU reference of `goodness_loss`: one pass per sample, in parallel, the statistics summed in order.

use super::Args;
use crate::backend::cpu::CpuBackend;
use crate::backend::cpu::ops::{add_stats, check_labels, softmax_ce};
use crate::ops::Checked;
use anyhow::Result;
use rayon::prelude::*;

pub(crate) fn run(_be: &CpuBackend, a: Checked<Args<'_, Vec<f32>, Vec<u32>>>) -> Result<()> {
    let Args { layer: _, batch, mean_over, dim, classes, g, proj_w, proj_b, labels, logits, dg, stats } = a.into_inner();
    let dg = dg.map(|d| d.as_mut_slice());
    goodness_loss(batch, mean_over, dim, classes, g, proj_w, proj_b, labels, logits, dg, stats)
}

/// `a = g R + r`; CE; `dg = (softmax(a) - onehot) R^T / mean_over` (`mean_over` is `batch` in one process).
// The arguments one by one: the dispatch above and tests/ops.rs call the reference math with slices and the
// fp16 switches that the op's Args do not carry.
#[allow(clippy::too_many_arguments)]
pub fn goodness_loss(
    batch: usize,
    mean_over: usize,
    dim: usize,
    classes: usize,
    g: &[f32],
    proj_w: &[f32],
    proj_b: &[f32],
    labels: &[u32],
    logits: &mut [f32],
    dg: Option<&mut [f32]>,
    stats: &mut [f32],
) -> Result<()> {
    check_labels(labels, batch, classes)?;
    let scale = 1.0 / mean_over as f32;
    let (proj_w, proj_b) = (&proj_w[..dim * classes], &proj_b[..classes]);
    let row = |b: usize, a: &mut [f32], dg_row: Option<&mut [f32]>| {
        a.fill(0.0);
        for (k, &gk) in g[b * dim..][..dim].iter().enumerate() {
            for (av, &r) in a.iter_mut().zip(&proj_w[k * classes..][..classes]) {
                *av += gk * r;
            }
        }
        for (av, &r) in a.iter_mut().zip(proj_b) {
            *av += r;
        }
        let label = labels[b] as usize;
        match dg_row {
            None => softmax_ce(a, label, scale, None),
            Some(dg_row) => {
                let mut da = vec![0.0f32; classes];
                let res = softmax_ce(a, label, scale, Some(&mut da));
                for (k, d) in dg_row.iter_mut().enumerate() {
                    *d = proj_w[k * classes..][..classes].iter().zip(&da).map(|(&r, &x)| r * x).sum();
                }
                res
            }
        }
    };
    let logits = &mut logits[..batch * classes];
    let per_sample: Vec<(f64, bool)> = match dg {
        None => logits.par_chunks_mut(classes).enumerate().map(|(b, a)| row(b, a, None)).collect(),
        Some(dg) => logits
            .par_chunks_mut(classes)
            .zip(dg[..batch * dim].par_chunks_mut(dim))
            .enumerate()
            .map(|(b, (a, d))| row(b, a, Some(d)))
            .collect(),
    };
    add_stats(stats, &per_sample);
    Ok(())
}
