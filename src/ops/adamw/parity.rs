//! The parity check of `adamw`: three steps of the CPU reference against a backend, on a length that is not a
//! multiple of any block, with the operand copy written in the backend's precision.

use super::{run, Args};
use crate::backend::cpu::CpuBackend;
use crate::backend::{AdamWStep, Backend};
use crate::ops::parity::{close, poisoned_operand};
use crate::rng::randn;
use anyhow::Result;

/// Values per tensor.
pub const LEN: usize = 100_003;

/// Three steps on `be`: the weights and their operand copy.
fn outputs<B: Backend>(be: &B) -> Result<[Vec<f32>; 2]> {
    let (mut p, grad) = (be.upload(&randn(LEN, 0.1, 7))?, be.upload(&randn(LEN, 0.01, 8))?);
    let (mut m, mut v, mut copy) = (be.zeros(LEN)?, be.zeros(LEN)?, poisoned_operand(be, LEN)?);
    for step in 1..=3 {
        let h = AdamWStep { lr: 2e-4, weight_decay: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, step };
        be.prepare_step(&h.scalars(), &[])?;
        let a = Args { layer: 0, len: LEN, p: &mut p, grad: &grad, m: &mut m, v: &mut v, copy: Some(&mut copy) };
        run(be, a)?;
    }
    Ok([be.read(&p, LEN)?, be.read(&copy, LEN)?])
}

/// Checks `dev` against the CPU reference. Elementwise and the same formula in f32: equal to an ulp or two of
/// the 0.1-sized weights (1e-6 of the largest); an fp16 copy to one fp16 ulp (2^-10 relative, 1.1e-3 with the
/// rounding of values near a binade's edge), an f32 one as the weights.
pub fn check<D: Backend>(dev: &D) -> Result<()> {
    let cpu = CpuBackend::new().with_precision(dev.precision());
    let ([p, copy], [pd, copyd]) = (outputs(&cpu)?, outputs(dev)?);
    let (rtol, atol) = if dev.precision() == crate::backend::Precision::F16 { (1.1e-3, 0.0) } else { (0.0, 1e-6) };
    close("adamw", &pd, &p, 0.0, 1e-6)?;
    close("adamw operand copy", &copyd, &copy, rtol, atol)?;
    Ok(())
}
