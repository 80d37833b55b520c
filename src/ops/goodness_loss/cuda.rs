//! `goodness_loss` (kernels/goodness_loss.cu): the fixed projection, softmax cross-entropy, its statistics and
//! dL/dg, one block per sample.

use super::Args;
use crate::backend::cuda::args::launch::GoodnessLossF32;
use crate::backend::cuda::{cfg, CudaBackend, CudaBuf, Work};
use crate::kernel_abi::MAX_CLASSES;
use crate::ops::Checked;
use anyhow::Result;
use cudarc::driver::CudaSlice;

pub fn run(be: &CudaBackend, a: Checked<Args<'_, CudaBuf, CudaSlice<u32>>>) -> Result<()> {
    let Args { layer, batch, mean_over, dim, classes, g, proj_w, proj_b, labels, logits, dg, stats } = a.into_inner();
    be.enter_layer(layer)?;
    let _timer = be.time_op("goodness_loss");
    anyhow::ensure!(
        classes <= MAX_CLASSES,
        "cuda backend: {classes} classes; the loss kernel takes at most {MAX_CLASSES}"
    );
    let with_grad = dg.is_some() as i32;
    let dg = match dg {
        Some(d) => Some(d.f32_mut("dL/dg")?),
        None => None,
    };
    // SAFETY: the op's checks (crate::ops::goodness_loss) bound every extent; without a gradient dg is null and the kernel never touches it.
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
                dg: dg.map(|d| d as &mut dyn crate::backend::cuda::args::DevOut<f32>),
                stats: stats.f32_mut("stats")?,
                B: batch as i32,
                D: dim as i32,
                N: classes as i32,
                M: i32::try_from(mean_over)?,
                with_grad,
            }
            .launch(be.stream(), be.f("goodness_loss_f32")?, cfg((batch as u32, 1, 1)))
        })
    })
}
