//! `conv_goodness_wgrad` (kernels/conv_goodness_wgrad.cu): dL/dg / |bin| per cell, then the weight gradient in
//! pixel slices and the deterministic reduction of the slices. In f32 one implicit GEMM computes dL/dz while its
//! tiles load; in fp16 dL/dz is computed once (`dz_f16`), and the GEMM runs over it and the channels-last input.

use super::Args;
use crate::backend::cuda::args::launch::{
    ConvGoodnessWgradF32, ConvWgradNhwcF16, ConvWgradNhwcF16L, DgPerCellF32, DzF16, WgradReduceF32, WgradReduceNhwcF32,
};
use crate::backend::cuda::{cfg, geometry, grid1, index32, operand_precision, CudaBackend, CudaBuf, Work};
use crate::backend::{dz_scale, Precision};
use crate::ops::Checked;
use anyhow::Result;
use cudarc::driver::LaunchConfig;

pub fn run(be: &CudaBackend, a: Checked<Args<'_, CudaBuf>>) -> Result<()> {
    let Args { layer, s, mean_over, grid, reduce, x, y, dg, dw, db } = a.into_inner();
    be.enter_layer(layer)?;
    let _timer = be.time_op("conv_goodness_wgrad");
    let precision = operand_precision(&[("x", x), ("y", y)])?;
    index32(s)?;
    let kernel = geometry::wgrad_choice(s, precision, be.tiles());
    let split = geometry::wgrad_split(s, &kernel);
    let (chunk, gz) = (split.chunk as i32, split.slices);
    let (bb, ci, co, h, ww, p) = (s.batch as i32, s.c_in as i32, s.c_out as i32, s.h as i32, s.w as i32, grid.p as i32);
    // The slices' partial sums (f16: the dz pass's bias partials, one per block column), and the per-cell
    // dL/dg / |bin| the kernels read instead of dividing.
    let cp = geometry::padded_channels(s.c_in);
    let k_part = if kernel.nhwc { 9 * cp } else { 9 * s.c_in };
    let db_slices = if kernel.nhwc { geometry::dz_grid(s).0 as usize } else { gz };
    let q_len = s.batch * s.c_out * grid.cells();
    let mut slot = be.wgrad_scratch();
    let part = be.scratch(&mut slot, gz * s.c_out * k_part + db_slices * s.c_out + q_len)?;
    let (mut part, mut q) = part.split_at_mut(gz * s.c_out * k_part + db_slices * s.c_out);
    let (mut part_w, mut part_b) = part.split_at_mut(gz * s.c_out * k_part);
    let cells = be.cell_table(grid, reduce)?;
    let stream = be.stream();
    // SAFETY: one thread per dL/dg value; q holds q_len floats, the divisors one per cell.
    be.launch("dg_per_cell_f32", Work::bytes(8.0 * q_len as f64), || {
        Ok(unsafe {
            DgPerCellF32 { dg: dg.f32("dL/dg")?, div: &cells.1, q: &mut q, n: q_len as i32, PP: grid.cells() as i32 }
                .launch(stream, be.f("dg_per_cell_f32")?, grid1(q_len))
        })
    })?;
    let q = q.slice(0..q_len);
    let f = be.f(kernel.name)?;
    // The GEMM's useful FLOPs (the real K, 9 C_in), and the per-slice partial sums it writes (f32) and the
    // reduction reads back.
    let n = s.batch * s.h * s.w;
    let flop = 2.0 * (n * s.c_out * 9 * s.c_in) as f64;
    let (part_w_bytes, part_b_bytes) = (4.0 * (gz * s.c_out * k_part) as f64, 4.0 * (db_slices * s.c_out) as f64);
    let reduce_work = Work::bytes(part_w_bytes + part_b_bytes + 4.0 * (s.w_len() + s.c_out) as f64);
    match precision {
        Precision::F32 => {
            let (x, y) = (x.f32("x")?, y.f32("y")?);
            let taps = be.tap_table(s)?;
            // SAFETY: the op's checks (crate::ops::conv_goodness_wgrad) bound x, y and dL/dg; part holds gz * (M*K + M) floats for gz = grid.z.
            // x, y and dL/dg / |bin| read; the slices' partials written.
            let work = Work::gemm(flop, 4.0 * (s.x_len() + s.y_len() + q_len) as f64 + part_w_bytes + part_b_bytes);
            be.launch(kernel.name, work, || {
                Ok(unsafe {
                    ConvGoodnessWgradF32 {
                        x,
                        y,
                        q: &q,
                        taps: &*taps,
                        cells: &cells.0,
                        part: &mut part_w,
                        part_db: &mut part_b,
                        B: bb,
                        Cin: ci,
                        Cout: co,
                        H: h,
                        W: ww,
                        P: p,
                        chunk,
                    }
                    .launch(stream, f, cfg(split.grid))
                })
            })?;
            let (part_w, part_b) = (part_w.slice(..), part_b.slice(..));
            let mk = s.w_len();
            // SAFETY: one thread per weight (M*K >= M); the partials hold Z slices of M*K and M.
            be.launch("wgrad_reduce_f32", reduce_work, || {
                Ok(unsafe {
                    WgradReduceF32 {
                        part: &part_w,
                        part_db: &part_b,
                        dw: dw.f32_mut("dL/dW")?,
                        db: db.f32_mut("dL/db")?,
                        MK: mk as i32,
                        M: co,
                        Z: gz as i32,
                    }
                    .launch(stream, be.f("wgrad_reduce_f32")?, grid1(mk))
                })
            })
        }
        Precision::F16 => {
            let scale = dz_scale(mean_over, grid, reduce);
            let y = y.f16("y")?;
            let taps = be.nhwc_tap_table(cp, s)?;
            let masks = be.pixel_masks(s)?;
            let mut layout = be.layout_scratch();
            // dz, [NHWC_MP(C_out)][WG_NP(N)], and the input channels-last: the forward's copy when the lane's
            // scratch still holds it (backend/cuda/layout.rs), else made again.
            let dz = be.scratch(&mut layout.dz, s.c_out.next_multiple_of(128) * geometry::wgrad_pixels(s))?;
            // SAFETY: y holds B*C_out*H*W values and q B*C_out*P*P (the op's checks (crate::ops::conv_goodness_wgrad)), dz its padded extent, and
            // part_b dz_grid.x * C_out floats; one block per channel and 2048 pixels.
            // y (fp16) and dL/dg / |bin| read; dz (fp16, [NHWC_MP(C_out)][WG_NP(N)], zero rows included) and the bias
            // partials written.
            let dz_len = s.c_out.next_multiple_of(128) * geometry::wgrad_pixels(s);
            let work = Work::bytes(2.0 * (s.y_len() + dz_len) as f64 + 4.0 * q_len as f64 + part_b_bytes);
            be.launch("dz_f16", work, || {
                Ok(unsafe {
                    DzF16 {
                        y,
                        q: &q,
                        cells: &cells.0,
                        dz: &mut *dz,
                        part_db: &mut part_b,
                        B: bb,
                        Cout: co,
                        H: h,
                        W: ww,
                        P: p,
                        scale,
                    }
                    .launch(stream, be.f("dz_f16")?, cfg(geometry::dz_grid(s)))
                })
            })?;
            crate::backend::cuda::layout::input(be, s, x, &mut layout, true)?;
            let (dz, xn) =
                (layout.dz.as_ref().expect("just filled"), crate::backend::cuda::layout::operand(x, &layout.x)?);
            let launch_cfg = LaunchConfig { shared_mem_bytes: kernel.smem, ..cfg(split.grid) };
            let (cpi, inv_scale) = (cp as i32, 1.0 / scale);
            // SAFETY: dz, xn, the chunk and pixel tables hold the padded extents of this shape; part holds
            // gz * C_out * 9 Cp floats for gz = grid.z; the shared memory is the kernel's (opted in at load).
            // dz's real rows and the channels-last input read; the slices' partials written.
            let work = Work::gemm(flop, 2.0 * (s.c_out * geometry::wgrad_pixels(s) + n * cp) as f64 + part_w_bytes);
            let r = be.launch(kernel.name, work, || {
                // The two tiles take the same arguments.
                macro_rules! tile {
                    ($k:ident) => {
                        $k {
                            dz,
                            x: xn,
                            taps: &*taps,
                            pmask: &*masks,
                            part: &mut part_w,
                            B: bb,
                            Cp: cpi,
                            Cout: co,
                            H: h,
                            W: ww,
                            chunk,
                            inv_scale,
                        }
                        .launch(stream, f, launch_cfg)
                    };
                }
                Ok(unsafe {
                    if kernel.name == ConvWgradNhwcF16L::NAME {
                        tile!(ConvWgradNhwcF16L)
                    } else {
                        tile!(ConvWgradNhwcF16)
                    }
                })
            });
            drop(layout);
            r?;
            let (part_w, part_b) = (part_w.slice(..), part_b.slice(..));
            let mk = s.w_len();
            // SAFETY: one thread per weight (M*C*9 >= M); the partials hold Z slices of M*9*Cp and Zd of M.
            be.launch("wgrad_reduce_nhwc_f32", reduce_work, || {
                Ok(unsafe {
                    WgradReduceNhwcF32 {
                        part: &part_w,
                        part_db: &part_b,
                        dw: dw.f32_mut("dL/dW")?,
                        db: db.f32_mut("dL/db")?,
                        M: co,
                        C: ci,
                        Cp: cpi,
                        Z: gz as i32,
                        Zd: db_slices as i32,
                    }
                    .launch(stream, be.f("wgrad_reduce_nhwc_f32")?, grid1(mk))
                })
            })
        }
    }
}
