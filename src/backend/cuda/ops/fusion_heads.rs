//! `fusion_heads` (kernels/fusion_heads.cu): the heads' summed logits, softmax cross-entropy with its
//! statistics and dL/ds, and each head's gradient.

use super::super::args::launch::{HeadsGradF32, HeadsLogitsF32, HeadsSoftmaxF32};
use super::super::{grid1, CudaBackend, CudaBuf};
use crate::backend::check;
use anyhow::Result;
use cudarc::driver::CudaSlice;

#[allow(clippy::too_many_arguments)]
pub fn run(
    be: &CudaBackend,
    batch: usize,
    classes: usize,
    feats: &[(&CudaBuf, usize)],
    heads: &[(&CudaBuf, &CudaBuf)],
    labels: &CudaSlice<u32>,
    logits: &mut CudaBuf,
    grads: Option<&mut [(&mut CudaBuf, &mut CudaBuf)]>,
    stats: &mut CudaBuf,
) -> Result<()> {
    let _timer = be.time_op("fusion_heads");
    check::fusion_heads(
        "cuda",
        batch,
        classes,
        feats,
        heads,
        grads.as_deref(),
        labels.len(),
        logits.len(),
        stats.len(),
        CudaBuf::len,
    )?;
    let logits = logits.f32_mut("head logits")?;
    be.zero(logits, batch * classes)?;
    let (b, n) = (batch as i32, classes as i32);
    let stream = be.stream();
    for (&(f, c), &(w, bias)) in feats.iter().zip(heads) {
        // SAFETY: check::fusion_heads bounds every head's features, weight and bias; one thread per (sample, class).
        be.launched("heads_logits_f32", unsafe {
            HeadsLogitsF32 {
                f: f.f32("head features")?,
                w: w.f32("head weight")?,
                bias: bias.f32("head bias")?,
                s: &mut *logits,
                B: b,
                N: n,
                C: c as i32,
            }
            .launch(stream, be.f("heads_logits_f32")?, grid1(batch * classes))
        })?;
    }
    let mut slot = be.head_scratch();
    let ds = be.scratch(&mut slot, batch * classes)?;
    // SAFETY: one thread per sample; ds holds batch * classes floats.
    be.launched("heads_softmax_f32", unsafe {
        HeadsSoftmaxF32 { s: &*logits, labels, ds: &mut *ds, stats: stats.f32_mut("stats")?, B: b, N: n }.launch(
            stream,
            be.f("heads_softmax_f32")?,
            grid1(batch),
        )
    })?;
    if let Some(grads) = grads {
        for ((gw, gb), &(f, c)) in grads.iter_mut().zip(feats) {
            // SAFETY: check::fusion_heads bounds every gradient; one thread per (class, feature).
            be.launched("heads_grad_f32", unsafe {
                HeadsGradF32 {
                    f: f.f32("head features")?,
                    ds: &*ds,
                    dw: gw.f32_mut("head weight gradient")?,
                    db: gb.f32_mut("head bias gradient")?,
                    B: b,
                    N: n,
                    C: c as i32,
                }
                .launch(stream, be.f("heads_grad_f32")?, grid1(classes * c))
            })?;
        }
    }
    Ok(())
}
