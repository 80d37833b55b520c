//! The parity check of `fusion_heads`: two heads (32 and 64 features, batch 5, 10 classes), the CPU reference
//! against a backend, as one process's batch and as one rank's share of a batch of 20.

use super::{run, Args};
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::ops::parity::{close, poisoned};
use crate::rng::randn;
use anyhow::{ensure, Result};

/// Batch, classes, and each head's features.
pub const BATCH: usize = 5;
pub const CLASSES: usize = 10;
pub const DIMS: [usize; 2] = [32, 64];
/// Labels with a repeat, the first and the last class.
pub const LABELS: [u32; BATCH] = [0, 3, 9, 1, 1];

/// The host inputs: per head its features, weights and bias.
#[allow(clippy::type_complexity)]
pub fn inputs() -> (Vec<Vec<f32>>, Vec<Vec<f32>>, Vec<Vec<f32>>) {
    let feats = DIMS.iter().map(|&c| randn(BATCH * c, 1.0, c as u64)).collect();
    let ws = DIMS.iter().map(|&c| randn(CLASSES * c, 0.2, 100 + c as u64)).collect();
    let bs = DIMS.iter().map(|&c| randn(CLASSES, 0.2, 200 + c as u64)).collect();
    (feats, ws, bs)
}

/// The op on `be`: the summed logits, the statistics, and each head's `(dW, db)`.
#[allow(clippy::type_complexity)]
pub fn outputs<B: Backend>(be: &B, mean_over: usize) -> Result<(Vec<f32>, Vec<f32>, Vec<(Vec<f32>, Vec<f32>)>)> {
    let (feats, ws, bs) = inputs();
    let up = |v: &Vec<Vec<f32>>| v.iter().map(|x| be.upload(x)).collect::<Result<Vec<_>>>();
    let (fd, wd, bd) = (up(&feats)?, up(&ws)?, up(&bs)?);
    let mut grads =
        DIMS.iter().map(|&c| Ok((poisoned(be, CLASSES * c)?, poisoned(be, CLASSES)?))).collect::<Result<Vec<_>>>()?;
    let (mut logits, mut stats) = (poisoned(be, BATCH * CLASSES)?, be.zeros(2)?);
    {
        let f: Vec<_> = fd.iter().zip(DIMS).collect();
        let h: Vec<_> = wd.iter().zip(&bd).collect();
        let mut gr: Vec<_> = grads.iter_mut().map(|(a, b)| (a, b)).collect();
        let labels = be.labels(&LABELS)?;
        let a = Args {
            layer: 0,
            batch: BATCH,
            mean_over,
            classes: CLASSES,
            feats: &f,
            heads: &h,
            labels: &labels,
            logits: &mut logits,
            grads: Some(&mut gr),
            stats: &mut stats,
        };
        run(be, a)?;
    }
    let grads = grads
        .iter()
        .zip(DIMS)
        .map(|((w, b), c)| Ok((be.read(w, CLASSES * c)?, be.read(b, CLASSES)?)))
        .collect::<Result<_>>()?;
    Ok((be.read(&logits, BATCH * CLASSES)?, be.read(&stats, 2)?, grads))
}

/// Checks `dev` against the CPU reference: the logits and gradients are sums over at most 64 features and 5
/// samples (1e-4 relative, a floor of 1e-5 of the largest); the count of correct predictions is exact.
pub fn check<D: Backend>(dev: &D) -> Result<()> {
    let cpu = CpuBackend::new().with_precision(dev.precision());
    for mean_over in [BATCH, 4 * BATCH] {
        let ((lg, st, grads), (lgd, std, gradsd)) = (outputs(&cpu, mean_over)?, outputs(dev, mean_over)?);
        let what = |o: &str| format!("fusion heads (a mean over {mean_over}): {o}");
        close(&what("logits"), &lgd, &lg, 1e-4, 1e-5)?;
        close(&what("loss"), &std[..1], &st[..1], 1e-4, 0.0)?;
        ensure!(std[1] == st[1], "{}: {} against {}", what("correct count"), std[1], st[1]);
        for (k, ((gw, gb), (cw, cb))) in gradsd.iter().zip(&grads).enumerate() {
            close(&what(&format!("head {k} dW")), gw, cw, 1e-4, 1e-5)?;
            close(&what(&format!("head {k} db")), gb, cb, 1e-4, 1e-5)?;
        }
    }
    Ok(())
}
