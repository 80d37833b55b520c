//! `layer_output` (kernels/layer_output.cu): the 2x2 pool, dropout, the per-sample RMS norm and the pooled
//! features: each sample's channels split over blocks (`geometry::layer_output_split`), its slices' sums of
//! squares, then the store with the pooled features. In fp16, where C is a multiple of 8 (every VGG8 width from
//! 0.125 up), the store is channels-last, `[B, Ho, Wo, C]`: the next layer's conv reads its input as it is, with
//! no channels-last copy (backend/cuda/layout.rs), and the buffer says so (`CudaBuf::channels_last`). Elsewhere (fp32, odd
//! channel counts) it is NCHW.

use super::Args;
use crate::backend::cuda::args::launch::{
    LayerOutputF16, LayerOutputF32, LayerOutputNhwcF16, LayerOutputSumsqF16, LayerOutputSumsqF32,
};
use crate::backend::cuda::args::{DevIn, DevOut};
use crate::backend::cuda::{cfg, geometry, operand_precision, CudaBackend, CudaBuf, Work};
use crate::backend::Precision;
use crate::model::PoolKind;
use crate::ops::Checked;
use anyhow::Result;

/// Whether a layer output of `c` channels is stored channels-last (fp16, channels a multiple of 8).
pub(crate) fn stores_channels_last(precision: Precision, c: usize) -> bool {
    precision == Precision::F16 && c.is_multiple_of(8)
}

pub fn run(be: &CudaBackend, a: Checked<Args<'_, CudaBuf>>) -> Result<()> {
    let Args { layer, batch, c, h, w, pool, dropout, first_sample, y, out, gap } = a.into_inner();
    be.enter_layer(layer)?;
    let _timer = be.time_op("layer_output");
    let precision = operand_precision(&[("y", y), ("layer output", &*out)])?;
    let pool_i: i32 = match pool {
        None => 0,
        Some(PoolKind::Avg) => 1,
        Some(PoolKind::Rms) => 2,
    };
    // The key from the step's parameters (the layer's slot, which Schedule::prepare_step filled); null without
    // dropout.
    let params = be.step_params.lock().unwrap();
    let (p, key, use_dropout) = match dropout {
        Some(p) => (p, Some(be.key_slot(&params, layer)?), 1i32),
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
    let (ho, wo) = if pool.is_some() { (h / 2, w / 2) } else { (h, w) };
    let out_hw = ho * wo;
    // Where the batch starts in the global batch's flat index (the masks' key; wrapping, as on the CPU).
    let first = first_sample.wrapping_mul(c * out_hw) as u32;
    let channels_last = stores_channels_last(precision, c);
    let (cpb, slices) = if channels_last {
        geometry::layer_output_split_nhwc(c, out_hw)
    } else {
        geometry::layer_output_split(c, out_hw)
    };
    let launch_cfg = cfg((batch as u32, slices as u32, 1));
    let cpb = cpb as i32;
    let mut guard = be.layout_scratch();
    let part = be.scratch(&mut guard.sumsq, batch * slices)?;
    let stream = be.stream();
    // What the passes move: y read twice, the per-slice sums written and read, the output and the pooled
    // features written.
    let eb = match precision {
        Precision::F32 => 4.0,
        Precision::F16 => 2.0,
    };
    let (y_len, out_len) = ((batch * c * h * w) as f64, (batch * c * out_hw) as f64);
    let (part_len, gap_len) = ((batch * slices) as f64, if use_gap == 1 { (batch * c) as f64 } else { 0.0 });
    // The two passes, in either precision (the kernels differ only in y's and the output's element type).
    macro_rules! passes {
        ($sumsq:ident, $store:ident, $y:expr, $dst:expr) => {{
            let y = $y;
            // SAFETY (both launches): the op's checks (crate::ops::layer_output) bound y, out and gap for `batch` samples (the grid's
            // x), part holds batch x slices floats (its y).
            be.launch($sumsq::NAME, Work::bytes(eb * y_len + 4.0 * part_len), || {
                Ok(unsafe {
                    $sumsq { y, part: &mut *part, C: ci, H: hi, W: wi, pool: pool_i, p, key, first, use_dropout, CPB: cpb }
                        .launch(stream, be.f($sumsq::NAME)?, launch_cfg)
                })
            })?;
            be.launch($store::NAME, Work::bytes(eb * (y_len + out_len) + 4.0 * (part_len + gap_len)), || {
                Ok(unsafe {
                    $store {
                        y,
                        part: &*part,
                        out: $dst,
                        gap,
                        C: ci,
                        H: hi,
                        W: wi,
                        pool: pool_i,
                        p,
                        key,
                        first,
                        use_dropout,
                        use_gap,
                        CPB: cpb,
                    }
                    .launch(stream, be.f($store::NAME)?, launch_cfg)
                })
            })
        }};
    }
    match (precision, channels_last) {
        (Precision::F32, _) => passes!(LayerOutputSumsqF32, LayerOutputF32, y.f32("y")?, out.f32_mut("layer output")?),
        (Precision::F16, false) => {
            passes!(LayerOutputSumsqF16, LayerOutputF16, y.f16("y")?, out.f16_mut("layer output")?)
        }
        (Precision::F16, true) => {
            passes!(LayerOutputSumsqF16, LayerOutputNhwcF16, y.f16("y")?, out.f16_mut("layer output")?)
        }
    }?;
    if channels_last {
        be.mark_channels_last(out, [batch, c, ho, wo]);
    }
    // The next layer's input and the heads' features are written: in a captured step, the hand-off to the lane
    // that reads them (graph.rs).
    be.capture_hand_off()
}
