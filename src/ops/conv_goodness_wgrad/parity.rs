//! The parity check of `conv_goodness_wgrad`: after the forward's check of the same case
//! (`conv_goodness_fwd::parity`), the CPU reference against the backend, both reading the backend's `y`, as the
//! backend does in training.

use super::{run, Args};
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::model::PatchGrid;
use crate::ops::conv_goodness_fwd::parity::{inputs, ConvCase, Forward};
use crate::ops::parity::{close, poisoned};
use anyhow::Result;

/// The worst ratios of error to tolerance (1 would be the edge), and the seconds the backend took.
#[derive(Clone, Copy, Debug, Default)]
pub struct Worst {
    pub dw: f32,
    pub db: f32,
    pub seconds: f64,
}

/// The weight gradient of case `i` on `dev` (from `fwd`, its checked forward) and on the CPU reference,
/// compared. The reduction runs over B*H*W (up to 32k) pixels: roundoff grows with sqrt(N); 1e-3 relative. In
/// fp16 the scaled dz rounds identically on both sides except where the f32 dz differs in its last bit and
/// straddles an fp16 rounding boundary (~2^-13 of the terms, each off by one fp16 ulp).
///
/// Tensor cores that accumulate by truncation (Hopper's) lose up to one f32 ulp of the running sum per addition
/// instead of half, always toward zero, so the error no longer cancels: over a slice's n accumulations it is at
/// most n * 2^-23 of the running sums' magnitude. A slice holds at most a few thousand pixels
/// (`geometry::wgrad_split` cuts the pixels for ~512 blocks; 16 pixels an MMA step), so n stays below ~300 and the
/// bound below ~4e-5 of the partial sums: inside rtol 1e-3 unless cancellation makes a sum ~25x smaller than its
/// partial sums, which the absolute floor (1e-4 of the largest dW) covers. The stand-in reruns this check with
/// every addition truncated (ASGE_STANDIN_MMA_ROUNDING=truncate, a pessimistic model: the hardware truncates once
/// per group of products), and the printed worst ratios show the margin that is left.
pub fn check_case<D: Backend>(dev: &D, case: &ConvCase, i: usize, fwd: &Forward<D>, what: &str) -> Result<Worst> {
    let cpu = CpuBackend::new().with_precision(dev.precision());
    let s = case.s;
    let grid = PatchGrid::new(case.p, s.h, s.w);
    let (x, _, _, dg) = inputs(case, i);
    let (mut dw, mut db) = (vec![0.0; s.w_len()], vec![0.0; s.c_out]);
    let (y, reduce) = (&fwd.y_host, case.reduce);
    // Every other case as a rank's share of a batch twice as large (the fp16 dz scale is chosen from that).
    let mean_over = s.batch * (1 + i % 2);
    let a = Args { layer: 0, s: &s, mean_over, grid: &grid, reduce, x: &x, y, dg: &dg, dw: &mut dw, db: &mut db };
    run(&cpu, a)?;
    let dgd = dev.upload(&dg)?;
    let (mut dwd, mut dbd) = (poisoned(dev, s.w_len())?, poisoned(dev, s.c_out)?);
    dev.synchronize()?;
    let t0 = std::time::Instant::now();
    let (x, y) = (&fwd.x, &fwd.y);
    let a = Args { layer: 0, s: &s, mean_over, grid: &grid, reduce, x, y, dg: &dgd, dw: &mut dwd, db: &mut dbd };
    run(dev, a)?;
    dev.synchronize()?;
    let seconds = t0.elapsed().as_secs_f64();
    Ok(Worst {
        dw: close(&format!("{what} dW"), &dev.read(&dwd, s.w_len())?, &dw, 1e-3, 1e-4)?,
        db: close(&format!("{what} db"), &dev.read(&dbd, s.c_out)?, &db, 1e-3, 1e-4)?,
        seconds,
    })
}
