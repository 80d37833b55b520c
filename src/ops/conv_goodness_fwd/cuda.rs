//! `conv_goodness_fwd` (kernels/conv_goodness_fwd.cu): the implicit-GEMM conv with bias and ReLU, and the
//! deterministic patch goodness: in f32 a pass over y, in fp16 per-tile partials from the conv's epilogue, added in
//! tile order by `goodness_tiles_f32`. In fp16 the conv reads channels-last copies of x and W (kernels/layout.cu),
//! made here: the rest of the backend keeps PyTorch's layouts.

use super::Args;
use crate::backend::cuda::args::launch::{
    ConvFwdNhwcF16, ConvFwdNhwcF16L, ConvFwdNhwcF16Sk, ConvFwdSplitkF16, ConvGoodnessFwdF32, GoodnessTilesF32,
    PatchGoodnessF32,
};
use crate::backend::cuda::{cfg, geometry, grid1, index32, operand_precision, CudaBackend, CudaBuf, Work};
use crate::backend::Precision;
use crate::model::GoodnessReduce;
use crate::ops::Checked;
use anyhow::Result;
use cudarc::driver::LaunchConfig;

pub fn run(be: &CudaBackend, a: Checked<Args<'_, CudaBuf>>) -> Result<()> {
    let Args { layer, s, grid, reduce, x, w, b, y, g } = a.into_inner();
    be.enter_layer(layer)?;
    let _timer = be.time_op("conv_goodness_fwd");
    let g_len = s.batch * s.c_out * grid.cells();
    let precision = operand_precision(&[("x", x), ("conv weight", w), ("y", &*y)])?;
    index32(s)?;
    let (bb, ci, co, h, ww, p) = (s.batch as i32, s.c_in as i32, s.c_out as i32, s.h as i32, s.w as i32, grid.p as i32);
    let mean = (reduce == GoodnessReduce::Mean) as i32;
    let (bias, gs) = (b.f32("conv bias")?, g.f32_mut("goodness")?);
    let (kernel, splits) = geometry::conv_fwd_choice(s, precision, be.tiles());
    let launch_cfg =
        LaunchConfig { shared_mem_bytes: kernel.smem, ..cfg(geometry::conv_fwd_grid(s, kernel.tile_m, kernel.tile_n)) };
    let f = be.f(kernel.name)?;
    let stream = be.stream();
    // The conv's useful FLOPs (the real K, 9 C_in) and the bytes every variant moves at the least.
    let n = s.batch * s.h * s.w;
    let flop = 2.0 * (n * s.c_out * 9 * s.c_in) as f64;
    match precision {
        Precision::F32 => {
            let ys = y.f32_mut("y")?;
            let (x, w) = (x.f32("x")?, w.f32("conv weight")?);
            let taps = be.tap_table(s)?;
            let work = Work::gemm(flop, 4.0 * (s.x_len() + s.w_len() + s.c_out + s.y_len()) as f64);
            // SAFETY: the op's checks (crate::ops::conv_goodness_fwd) bound every extent the kernel's signature states for this shape.
            be.launch(kernel.name, work, || {
                Ok(unsafe {
                    ConvGoodnessFwdF32 { x, w, bias, taps: &*taps, y: &mut *ys, B: bb, Cin: ci, Cout: co, H: h, W: ww }
                        .launch(stream, f, launch_cfg)
                })
            })?;
            // SAFETY: as above; one thread per goodness cell.
            be.launch("patch_goodness_f32", Work::bytes(4.0 * (s.y_len() + g_len) as f64), || {
                Ok(unsafe {
                    PatchGoodnessF32 { y: &*ys, g: gs, B: bb, C: co, H: h, W: ww, P: p, reduce_mean: mean }.launch(
                        stream,
                        be.f("patch_goodness_f32")?,
                        grid1(g_len),
                    )
                })
            })
        }
        Precision::F16 => {
            let ys = y.f16_mut("y")?;
            let w = w.f16("conv weight")?;
            let mut guard = be.layout_scratch();
            let scratch = &mut *guard;
            let cp = crate::backend::cuda::layout::input(be, s, x, scratch, false)?;
            crate::backend::cuda::layout::weights(be, s, w, &mut scratch.w)?;
            let taps = be.nhwc_tap_table(cp, s)?;
            let (nb, gpart_len) = geometry::goodness_partials(s, grid, &kernel);
            // The channels-last input and weights read, y written (fp16), the goodness partials written (f32).
            let operands = 2.0 * (n * cp + s.c_out * 9 * cp) as f64 + 4.0 * s.c_out as f64;
            let (y_bytes, gpart_bytes) = (2.0 * s.y_len() as f64, 4.0 * gpart_len as f64);
            let cp = cp as i32;
            let gpart = be.scratch(&mut scratch.gpart, gpart_len)?;
            let nb_i = nb as i32;
            // SAFETY (the three branches): xn, wn and the table hold the padded extents of this shape, y and bias
            // are bounded by the op's checks (crate::ops::conv_goodness_fwd); the launch's shared memory is the kernel's (opted in at load where
            // above 48 KB).
            if splits > 1 {
                // Split-K: partial tiles (f32, written and read back), then their ordered sum with the bias and
                // ReLU.
                let k = geometry::CONV_FWD_F16_SPLIT;
                let (gx, gy, _) = geometry::conv_fwd_grid(s, k.tile_m, k.tile_n);
                let split_cfg = LaunchConfig { grid_dim: (gx, gy, splits as u32), ..launch_cfg };
                let part = be.scratch(&mut scratch.part, splits * s.c_out * n)?;
                let part_bytes = 4.0 * (splits * s.c_out * n) as f64;
                let (xn, wn) =
                    (crate::backend::cuda::layout::operand(x, &scratch.x)?, scratch.w.as_ref().expect("just filled"));
                be.launch(k.name, Work::gemm(flop, operands - 4.0 * s.c_out as f64 + part_bytes), || {
                    Ok(unsafe {
                        ConvFwdNhwcF16Sk {
                            x: xn,
                            w: wn,
                            taps: &*taps,
                            part: &mut *part,
                            B: bb,
                            Cp: cp,
                            Cout: co,
                            H: h,
                            W: ww,
                        }
                        .launch(stream, be.f(k.name)?, split_cfg)
                    })
                })?;
                // SAFETY: part holds splits * C_out * N floats, gpart the partials of this grid of tiles, y and
                // bias are bounded by the op's checks (crate::ops::conv_goodness_fwd).
                let sum = Work::bytes(part_bytes + 4.0 * s.c_out as f64 + y_bytes + gpart_bytes);
                be.launch("conv_fwd_splitk_f16", sum, || {
                    Ok(unsafe {
                        ConvFwdSplitkF16 {
                            part: &*part,
                            bias,
                            y: &mut *ys,
                            gpart: &mut *gpart,
                            B: bb,
                            Cout: co,
                            H: h,
                            W: ww,
                            Z: splits as i32,
                            P: p,
                            NB: nb_i,
                        }
                        .launch(stream, be.f("conv_fwd_splitk_f16")?, cfg((gx, gy, 1)))
                    })
                })?;
            } else {
                let (xn, wn) =
                    (crate::backend::cuda::layout::operand(x, &scratch.x)?, scratch.w.as_ref().expect("just filled"));
                be.launch(kernel.name, Work::gemm(flop, operands + y_bytes + gpart_bytes), || {
                    // The two tiles take the same arguments.
                    macro_rules! tile {
                        ($k:ident) => {
                            $k {
                                x: xn,
                                w: wn,
                                bias,
                                taps: &*taps,
                                y: &mut *ys,
                                gpart: &mut *gpart,
                                B: bb,
                                Cp: cp,
                                Cout: co,
                                H: h,
                                W: ww,
                                P: p,
                                NB: nb_i,
                            }
                            .launch(stream, f, launch_cfg)
                        };
                    }
                    Ok(unsafe {
                        if kernel.name == ConvFwdNhwcF16L::NAME {
                            tile!(ConvFwdNhwcF16L)
                        } else {
                            tile!(ConvFwdNhwcF16)
                        }
                    })
                })?;
            }
            let gpart = scratch.gpart.as_ref().expect("just filled");
            // SAFETY: gpart holds the partials of every tile of this layer (geometry::goodness_partials), g the cells;
            // one thread per goodness value.
            let r = be.launch("goodness_tiles_f32", Work::bytes(gpart_bytes + 4.0 * g_len as f64), || {
                Ok(unsafe {
                    GoodnessTilesF32 {
                        gpart,
                        g: gs,
                        B: bb,
                        C: co,
                        H: h,
                        W: ww,
                        P: p,
                        NB: nb_i,
                        TN: kernel.tile_n as i32,
                        reduce_mean: mean,
                    }
                    .launch(stream, be.f("goodness_tiles_f32")?, grid1(g_len))
                })
            });
            drop(guard);
            r
        }
    }
}
