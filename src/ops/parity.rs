//! What every op's parity check shares (each op's `parity.rs` holds its cases and its check, written once for
//! every backend): the comparison, and device buffers poisoned with NaN so that an output a backend leaves
//! unwritten shows. The checks run on whatever backend they are given; `tests/cuda.rs` runs them on a GPU or on
//! the CUDA driver stand-in, against the CPU reference in the same precision.

use crate::backend::Backend;
use anyhow::{ensure, Result};

/// `|got - want| <= atol + rtol * |want|` elementwise, with `atol = atol_rel * max |want|`; a NaN (an output a
/// kernel never wrote into a poisoned buffer) fails. Returns the worst ratio of error to tolerance (1 would be
/// the edge), so that a near miss can be reported as one.
pub fn close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol_rel: f32) -> Result<f32> {
    ensure!(got.len() == want.len(), "{what}: {} values, the reference has {}", got.len(), want.len());
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    let atol = atol_rel * scale;
    let mut bad = Vec::new();
    let mut worst = 0.0f32;
    for (i, (&g, &c)) in got.iter().zip(want).enumerate() {
        let tol = atol + rtol * c.abs();
        let ok = (g - c).abs() <= tol;
        if !ok {
            bad.push(format!("[{i}] got {g} want {c}"));
        }
        if tol > 0.0 {
            worst = worst.max((g - c).abs() / tol);
        } else if g != c {
            worst = f32::INFINITY;
        }
    }
    ensure!(
        bad.is_empty(),
        "{what}: {} of {} differ (worst error/tolerance {worst:.2}), first: {:?}",
        bad.len(),
        want.len(),
        &bad[..bad.len().min(5)]
    );
    Ok(worst)
}

/// An f32 output buffer of `len` values, all NaN.
pub fn poisoned<B: Backend>(be: &B, len: usize) -> Result<B::Buf> {
    be.upload(&vec![f32::NAN; len])
}

/// A conv-operand output buffer (the backend's precision) of `len` values, all NaN.
pub fn poisoned_operand<B: Backend>(be: &B, len: usize) -> Result<B::Buf> {
    be.upload_operand(&vec![f32::NAN; len])
}
