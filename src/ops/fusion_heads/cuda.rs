//! `fusion_heads` (kernels/fusion_heads.cu): the heads' summed logits, softmax cross-entropy with its
//! statistics and dL/ds, and each head's gradient.

use super::Args;
use crate::backend::cuda::args::launch::{HeadsGradF32, HeadsLogitsF32, HeadsSoftmaxF32};
use crate::backend::cuda::{grid1, CudaBackend, CudaBuf, Work};
use crate::ops::Checked;
use anyhow::Result;
use cudarc::driver::CudaSlice;

pub fn run(be: &CudaBackend, a: Checked<Args<'_, CudaBuf, CudaSlice<u32>>>) -> Result<()> {
    let Args { layer, batch, mean_over, classes, feats, heads, labels, logits, grads, stats } = a.into_inner();
    be.enter_layer(layer)?;
    let _timer = be.time_op("fusion_heads");
    let logits = logits.f32_mut("head logits")?;
    be.zero(logits, batch * classes)?;
    let (b, n) = (batch as i32, classes as i32);
    let stream = be.stream();
    for (&(f, c), &(w, bias)) in feats.iter().zip(heads) {
        // SAFETY: the op's checks (crate::ops::fusion_heads) bound every head's features, weight and bias; one thread per (sample, class).
        // The features and the head's weights read, the logits read and written.
        let work = Work::bytes(4.0 * (batch * c + classes * c + 2 * batch * classes) as f64);
        be.launch("heads_logits_f32", work, || {
            Ok(unsafe {
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
            })
        })?;
    }
    let mut slot = be.head_scratch();
    let ds = be.scratch(&mut slot, batch * classes)?;
    // SAFETY: one thread per sample; ds holds batch * classes floats.
    // The logits and labels read, dL/ds written.
    be.launch("heads_softmax_f32", Work::bytes(4.0 * (2 * batch * classes + batch) as f64), || {
        Ok(unsafe {
            HeadsSoftmaxF32 {
                s: &*logits,
                labels,
                ds: &mut *ds,
                stats: stats.f32_mut("stats")?,
                B: b,
                N: n,
                M: i32::try_from(mean_over)?,
            }
            .launch(stream, be.f("heads_softmax_f32")?, grid1(batch))
        })
    })?;
    if let Some(grads) = grads {
        for ((gw, gb), &(f, c)) in grads.iter_mut().zip(feats) {
            // SAFETY: the op's checks (crate::ops::fusion_heads) bound every gradient; one thread per (class, feature).
            // The features and dL/ds read, the head's gradients written.
            let work = Work::bytes(4.0 * (batch * c + batch * classes + classes * c + classes) as f64);
            be.launch("heads_grad_f32", work, || {
                Ok(unsafe {
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
                })
            })?;
        }
    }
    Ok(())
}
