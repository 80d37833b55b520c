//! The parity check of `layer_output`: the CPU reference against a backend on the cases below, in the backend's
//! precision (in fp16 a map with a multiple of 8 channels takes the channels-last store).

use super::{run, Args};
use crate::backend::cpu::CpuBackend;
use crate::backend::{round_f16, AdamWScalars, Backend, Precision};
use crate::model::PoolKind::{self, Avg, Rms};
use crate::ops::parity::{close, poisoned, poisoned_operand};
use crate::rng::randn;
use anyhow::Result;

/// One case: batch, channels, side, pool, dropout p.
pub type Case = (usize, usize, usize, Option<PoolKind>, Option<f32>);

/// The cases: no pool, avg pool with dropout, rms pool on an odd side with heavy
/// dropout, and many channels of small maps (several blocks a sample, a thread a channel); then multiples of 8
/// channels (the fp16 CUDA store is channels-last: one block of 8 channels a sample slice, then a pooled
/// odd-sized map).
pub const CASES: [Case; 6] = [
    (3, 5, 7, None, None),
    (2, 70, 16, Some(Avg), Some(0.1)),
    (4, 9, 9, Some(Rms), Some(0.5)),
    (2, 600, 4, Some(Avg), Some(0.1)),
    (2, 64, 16, None, Some(0.2)),
    (3, 16, 12, Some(Rms), None),
];

/// A layer output's input as the conv stores it: non-negative, and fp16-representable in the fp16 path.
pub fn conv_output(len: usize, precision: Precision) -> Vec<f32> {
    let relu = randn(len, 1.0, 5).into_iter().map(|v| v.max(0.0));
    match precision {
        Precision::F32 => relu.collect(),
        Precision::F16 => relu.map(round_f16).collect(),
    }
}

/// The op on `be` for one case, as a batch starting at sample `first_sample` of a step's global batch: the output
/// and the pooled features.
fn outputs<B: Backend>(
    be: &B,
    (batch, c, h, pool, drop): (usize, usize, usize, Option<PoolKind>, Option<f32>),
    first_sample: usize,
) -> Result<[Vec<f32>; 2]> {
    let y = be.upload_operand(&conv_output(batch * c * h * h, be.precision()))?;
    let (ho, wo) = if pool.is_some() { (h / 2, h / 2) } else { (h, h) };
    let (mut out, mut gap) = (poisoned_operand(be, batch * c * ho * wo)?, poisoned(be, batch * c)?);
    // Layer 0's dropout key, the step's.
    be.prepare_step(&AdamWScalars::default(), &[Some(0x1234_5678_9abc_def0)])?;
    let gap_out = Some(&mut gap);
    let a = Args { layer: 0, batch, c, h, w: h, pool, dropout: drop, first_sample, y: &y, out: &mut out, gap: gap_out };
    run(be, a)?;
    Ok([be.read(&out, batch * c * ho * wo)?, be.read(&gap, batch * c)?])
}

/// Checks `dev` against the CPU reference: the same dropout mask bit for bit (for a batch of its own, and, with
/// dropout, as a rank's share starting at sample 5 of a global batch); the RMS is a reduction over at most 18k
/// values (1e-4 relative); an fp16 store to one fp16 ulp (1.1e-3); the pooled features are f32 in both precisions.
pub fn check<D: Backend>(dev: &D) -> Result<()> {
    let cpu = CpuBackend::new().with_precision(dev.precision());
    let store_rtol = if dev.precision() == Precision::F16 { 1.1e-3 } else { 1e-4 };
    let shares = CASES.iter().filter(|c| c.4.is_some()).map(|&c| (c, 5));
    for (case, first) in CASES.iter().map(|&c| (c, 0)).chain(shares) {
        let ([out, gap], [outd, gapd]) = (outputs(&cpu, case, first)?, outputs(dev, case, first)?);
        let what = format!(
            "{} layer output {}x{}x{} {:?} {:?} from sample {first}",
            dev.precision().as_str(),
            case.0,
            case.1,
            case.2,
            case.3,
            case.4
        );
        close(&what, &outd, &out, store_rtol, 1e-6)?;
        close(&format!("{what} gap"), &gapd, &gap, 1e-4, 1e-6)?;
    }
    Ok(())
}
