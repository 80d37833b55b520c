//! `conv_goodness_fwd` (kernels/conv_goodness_fwd.cu): the implicit-GEMM conv with bias and ReLU, then the
//! deterministic patch-goodness pass over y.

use super::super::args::launch::{
    ConvGoodnessFwdF16, ConvGoodnessFwdF16M128, ConvGoodnessFwdF32, PatchGoodnessF16, PatchGoodnessF32,
};
use super::super::{cfg, geometry, grid1, index32, operand_precision, CudaBackend, CudaBuf};
use crate::backend::{check, ConvShape, Precision};
use crate::model::{GoodnessReduce, PatchGrid};
use anyhow::Result;

#[allow(clippy::too_many_arguments)]
pub fn run(
    be: &CudaBackend,
    s: &ConvShape,
    grid: &PatchGrid,
    reduce: GoodnessReduce,
    x: &CudaBuf,
    w: &CudaBuf,
    b: &CudaBuf,
    y: &mut CudaBuf,
    g: &mut CudaBuf,
) -> Result<()> {
    let _timer = be.time_op("conv_goodness_fwd");
    check::conv_fwd("cuda", s, grid, x.len(), w.len(), b.len(), y.len(), g.len())?;
    let g_len = s.batch * s.c_out * grid.cells();
    let precision = operand_precision(&[("x", x), ("conv weight", w), ("y", &*y)])?;
    index32(s)?;
    let (bb, ci, co, h, ww, p) = (s.batch as i32, s.c_in as i32, s.c_out as i32, s.h as i32, s.w as i32, grid.p as i32);
    let mean = (reduce == GoodnessReduce::Mean) as i32;
    let (bias, gs) = (b.f32("conv bias")?, g.f32_mut("goodness")?);
    let launch_cfg = cfg(geometry::conv_fwd(s, precision));
    let taps = be.tap_table(s)?;
    let (kernel, _, _) = geometry::conv_fwd_kernel(s, precision);
    let f = be.f(kernel)?;
    let stream = be.stream();
    match precision {
        Precision::F32 => {
            let ys = y.f32_mut("y")?;
            let (x, w) = (x.f32("x")?, w.f32("conv weight")?);
            // SAFETY: check::conv_fwd bounds every extent the kernel's signature states for this shape.
            be.launched(kernel, unsafe {
                ConvGoodnessFwdF32 { x, w, bias, taps: &*taps, y: &mut *ys, B: bb, Cin: ci, Cout: co, H: h, W: ww }
                    .launch(stream, f, launch_cfg)
            })?;
            // SAFETY: as above; one thread per goodness cell.
            be.launched("patch_goodness_f32", unsafe {
                PatchGoodnessF32 { y: &*ys, g: gs, B: bb, C: co, H: h, W: ww, P: p, reduce_mean: mean }.launch(
                    stream,
                    be.f("patch_goodness_f32")?,
                    grid1(g_len),
                )
            })
        }
        Precision::F16 => {
            let ys = y.f16_mut("y")?;
            let (x, w) = (x.f16("x")?, w.f16("conv weight")?);
            // SAFETY: check::conv_fwd bounds every extent the kernels' signatures state for this shape.
            let r = unsafe {
                if kernel == ConvGoodnessFwdF16M128::NAME {
                    ConvGoodnessFwdF16M128 {
                        x,
                        w,
                        bias,
                        taps: &*taps,
                        y: &mut *ys,
                        B: bb,
                        Cin: ci,
                        Cout: co,
                        H: h,
                        W: ww,
                    }
                    .launch(stream, f, launch_cfg)
                } else {
                    ConvGoodnessFwdF16 { x, w, bias, taps: &*taps, y: &mut *ys, B: bb, Cin: ci, Cout: co, H: h, W: ww }
                        .launch(stream, f, launch_cfg)
                }
            };
            be.launched(kernel, r)?;
            // SAFETY: as above; one thread per goodness cell.
            be.launched("patch_goodness_f16", unsafe {
                PatchGoodnessF16 { y: &*ys, g: gs, B: bb, C: co, H: h, W: ww, P: p, reduce_mean: mean }.launch(
                    stream,
                    be.f("patch_goodness_f16")?,
                    grid1(g_len),
                )
            })
        }
    }
}
