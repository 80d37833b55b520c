//! `layer_output` (kernels/layer_output.cu): the 2x2 pool, dropout, the per-sample RMS norm and the pooled
//! features, one block per sample.

use super::super::args::launch::{LayerOutputF16, LayerOutputF32};
use super::super::args::{DevIn, DevOut};
use super::super::{cfg, operand_precision, CudaBackend, CudaBuf};
use crate::backend::{check, Dropout, Precision};
use crate::model::PoolKind;
use anyhow::Result;

#[allow(clippy::too_many_arguments)]
pub fn run(
    be: &CudaBackend,
    batch: usize,
    c: usize,
    h: usize,
    w: usize,
    pool: Option<PoolKind>,
    dropout: Option<Dropout>,
    y: &CudaBuf,
    out: &mut CudaBuf,
    gap: Option<&mut CudaBuf>,
) -> Result<()> {
    let _timer = be.time_op("layer_output");
    check::layer_output("cuda", batch, c, h, w, pool.is_some(), y.len(), out.len(), gap.as_ref().map(|g| g.len()))?;
    let precision = operand_precision(&[("y", y), ("layer output", &*out)])?;
    let pool_i: i32 = match pool {
        None => 0,
        Some(PoolKind::Avg) => 1,
        Some(PoolKind::Rms) => 2,
    };
    // The key from the step's parameters (the slot of the layer the trainer set as the lane); null without
    // dropout.
    let mut params = be.step_params.lock().unwrap();
    let site = be.lane.load(std::sync::atomic::Ordering::Relaxed);
    let (p, key, use_dropout) = match dropout {
        Some(d) => (d.p, Some(be.key_slot(&mut params, site, d.key)?), 1i32),
        None => (0.0f32, None, 0i32),
    };
    let key = key.as_ref().map(|k| k as &dyn DevIn<u64>);
    let use_gap = gap.is_some() as i32;
    // Without pooled features the kernel never touches gap: a null pointer (layer 0 allocates nothing).
    let gap = match gap {
        Some(g) => Some(g.f32_mut("pooled features")? as &mut dyn DevOut<f32>),
        None => None,
    };
    let (ci, hi, wi) = (c as i32, h as i32, w as i32);
    let launch_cfg = cfg((batch as u32, 1, 1));
    let stream = be.stream();
    match precision {
        // SAFETY: check::layer_output bounds y, out and gap for a grid of `batch` blocks.
        Precision::F32 => be.launched("layer_output_f32", unsafe {
            LayerOutputF32 {
                y: y.f32("y")?,
                out: out.f32_mut("layer output")?,
                gap,
                C: ci,
                H: hi,
                W: wi,
                pool: pool_i,
                p,
                key,
                use_dropout,
                use_gap,
            }
            .launch(stream, be.f("layer_output_f32")?, launch_cfg)
        }),
        // SAFETY: as above.
        Precision::F16 => be.launched("layer_output_f16", unsafe {
            LayerOutputF16 {
                y: y.f16("y")?,
                out: out.f16_mut("layer output")?,
                gap,
                C: ci,
                H: hi,
                W: wi,
                pool: pool_i,
                p,
                key,
                use_dropout,
                use_gap,
            }
            .launch(stream, be.f("layer_output_f16")?, launch_cfg)
        }),
    }
}
