//! `goodness_loss` (kernels/goodness_loss.cu): the fixed projection, softmax cross-entropy, its statistics and
//! dL/dg, one block per sample.

use super::super::args::launch::GoodnessLossF32;
use super::super::{cfg, CudaBackend, CudaBuf, Work};
use crate::backend::check;
use anyhow::Result;
use cudarc::driver::CudaSlice;

/// The most classes the loss kernel holds in shared memory (kernels/goodness_loss.cu, MAX_CLASSES).
pub const MAX_CLASSES: usize = 4096;

#[allow(clippy::too_many_arguments)]
pub fn run(
    be: &CudaBackend,
    batch: usize,
    dim: usize,
    classes: usize,
    g: &CudaBuf,
    proj_w: &CudaBuf,
    proj_b: &CudaBuf,
    labels: &CudaSlice<u32>,
    logits: &mut CudaBuf,
    dg: Option<&mut CudaBuf>,
    stats: &mut CudaBuf,
) -> Result<()> {
    let _timer = be.time_op("goodness_loss");
    let dg_len = dg.as_ref().map(|d| d.len());
    check::goodness_loss(
        "cuda",
        batch,
        dim,
        classes,
        g.len(),
        proj_w.len(),
        proj_b.len(),
        labels.len(),
        logits.len(),
        dg_len,
        stats.len(),
    )?;
    anyhow::ensure!(
        classes <= MAX_CLASSES,
        "cuda backend: {classes} classes; the loss kernel takes at most {MAX_CLASSES}"
    );
    let with_grad = dg.is_some() as i32;
    let dg = match dg {
        Some(d) => Some(d.f32_mut("dL/dg")?),
        None => None,
    };
    // SAFETY: check::goodness_loss bounds every extent; without a gradient dg is null and the kernel never touches it.
    // g read (and dL/dg written), the projection read, the logits written.
    let work = Work::bytes(4.0 * (batch * dim * (1 + with_grad as usize) + dim * classes + batch * classes) as f64);
    be.launch("goodness_loss_f32", work, || {
        Ok(unsafe {
            GoodnessLossF32 {
                g: g.f32("goodness")?,
                pw: proj_w.f32("projection")?,
                pb: proj_b.f32("projection bias")?,
                labels,
                logits: logits.f32_mut("logits")?,
                dg: dg.map(|d| d as &mut dyn super::super::args::DevOut<f32>),
                stats: stats.f32_mut("stats")?,
                B: batch as i32,
                D: dim as i32,
                N: classes as i32,
                with_grad,
            }
            .launch(be.stream(), be.f("goodness_loss_f32")?, cfg((batch as u32, 1, 1)))
        })
    })
}
