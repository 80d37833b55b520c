//! The parity check of `goodness_loss`: the CPU reference against a backend, on one sample, a goodness longer
//! than a block of threads, 100 classes over an odd batch, and one rank's share of a data-parallel batch (a mean
//! over more samples than it holds).

use super::{run, Args};
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::ops::parity::{close, poisoned};
use crate::rng::randn;
use anyhow::{ensure, Result};

/// (batch, goodness dimension, classes, the batch the loss is a mean over).
pub const CASES: [(usize, usize, usize, usize); 4] = [(1, 16, 10, 1), (3, 1000, 10, 3), (33, 512, 100, 33), (5, 64, 10, 15)];

/// The op on `be` for one case: the logits, `dL/dg` and the statistics.
fn outputs<B: Backend>(be: &B, (batch, dim, classes, mean_over): (usize, usize, usize, usize)) -> Result<[Vec<f32>; 3]> {
    let goodness: Vec<f32> = randn(batch * dim, 1.0, 1).iter().map(|v| v.abs()).collect();
    let std = 1.0 / (classes as f64).sqrt();
    let (g, proj_w, proj_b) =
        (be.upload(&goodness)?, be.upload(&randn(dim * classes, std, 2))?, be.upload(&randn(classes, std, 3))?);
    let labels = be.labels(&(0..batch as u32).map(|i| (i * 7) % classes as u32).collect::<Vec<_>>())?;
    let (mut logits, mut dg, mut stats) = (poisoned(be, batch * classes)?, poisoned(be, batch * dim)?, be.zeros(2)?);
    let a = Args {
        layer: 0,
        batch,
        mean_over,
        dim,
        classes,
        g: &g,
        proj_w: &proj_w,
        proj_b: &proj_b,
        labels: &labels,
        logits: &mut logits,
        dg: Some(&mut dg),
        stats: &mut stats,
    };
    run(be, a)?;
    Ok([be.read(&logits, batch * classes)?, be.read(&dg, batch * dim)?, be.read(&stats, 2)?])
}

/// Checks `dev` against the CPU reference. The logits are dot products over at most 1,000 terms and the
/// softmax is exact to a few f32 ulps: 1e-4 relative with an absolute floor of 1e-5 of the largest value (the
/// sum's order differs: a block reduction on a GPU); the count of correct predictions is exact.
pub fn check<D: Backend>(dev: &D) -> Result<()> {
    let cpu = CpuBackend::new().with_precision(dev.precision());
    for case in CASES {
        let ([lg, dg, st], [lgd, dgd, std]) = (outputs(&cpu, case)?, outputs(dev, case)?);
        let what = |o: &str| format!("goodness_loss {case:?}: {o}");
        close(&what("logits"), &lgd, &lg, 1e-4, 1e-5)?;
        close(&what("dL/dg"), &dgd, &dg, 1e-4, 1e-5)?;
        close(&what("loss"), &std[..1], &st[..1], 1e-4, 0.0)?;
        ensure!(std[1] == st[1], "{}: {} against {}", what("correct count"), std[1], st[1]);
    }
    Ok(())
}
