//! `conv_goodness_wgrad` (kernels/conv_goodness_wgrad.cu): dL/dg / |bin| per cell, the implicit-GEMM weight
//! gradient in pixel slices (dL/dz computed while the tiles load), and the deterministic reduction of the slices.

use super::super::args::launch::{
    ConvGoodnessWgradF16, ConvGoodnessWgradF16N256, ConvGoodnessWgradF32, DgPerCellF32, WgradReduceF32,
};
use super::super::{cfg, geometry, grid1, index32, operand_precision, CudaBackend, CudaBuf};
use crate::backend::{check, dz_scale, ConvShape, Precision};
use crate::model::{GoodnessReduce, PatchGrid};
use anyhow::Result;

#[allow(clippy::too_many_arguments)]
pub fn run(
    be: &CudaBackend,
    s: &ConvShape,
    grid: &PatchGrid,
    reduce: GoodnessReduce,
    x: &CudaBuf,
    y: &CudaBuf,
    dg: &CudaBuf,
    dw: &mut CudaBuf,
    db: &mut CudaBuf,
) -> Result<()> {
    let _timer = be.time_op("conv_goodness_wgrad");
    check::conv_wgrad("cuda", s, grid, x.len(), y.len(), dg.len(), dw.len(), db.len())?;
    let precision = operand_precision(&[("x", x), ("y", y)])?;
    index32(s)?;
    let split = geometry::wgrad(s, precision);
    let (chunk, gz) = (split.chunk as i32, split.slices);
    let (bb, ci, co, h, ww, p) = (s.batch as i32, s.c_in as i32, s.c_out as i32, s.h as i32, s.w as i32, grid.p as i32);
    let mk = s.w_len();
    // The slices' partial sums, and the per-cell dL/dg / |bin| the GEMM reads instead of dividing.
    let q_len = s.batch * s.c_out * grid.cells();
    let mut slot = be.wgrad_scratch();
    let part = be.scratch(&mut slot, gz * (mk + s.c_out) + q_len)?;
    let (mut part, mut q) = part.split_at_mut(gz * (mk + s.c_out));
    let (mut part_w, mut part_b) = part.split_at_mut(gz * mk);
    let taps = be.tap_table(s)?;
    let cells = be.cell_table(grid, reduce)?;
    let stream = be.stream();
    // SAFETY: one thread per dL/dg value; q holds q_len floats, the divisors one per cell.
    be.launched("dg_per_cell_f32", unsafe {
        DgPerCellF32 { dg: dg.f32("dL/dg")?, div: &cells.1, q: &mut q, n: q_len as i32, PP: grid.cells() as i32 }
            .launch(stream, be.f("dg_per_cell_f32")?, grid1(q_len))
    })?;
    let q = q.slice(0..q_len);
    let (kernel, _, _) = geometry::wgrad_kernel(s, precision);
    let f = be.f(kernel)?;
    let launch_cfg = cfg(split.grid);
    let r = match precision {
        Precision::F32 => {
            let (x, y) = (x.f32("x")?, y.f32("y")?);
            // SAFETY: check::conv_wgrad bounds x, y and dL/dg; part holds gz * (M*K + M) floats for gz = grid.z.
            unsafe {
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
                .launch(stream, f, launch_cfg)
            }
        }
        Precision::F16 => {
            let scale = dz_scale(s.batch, grid, reduce);
            let inv_scale = 1.0 / scale;
            let (x, y) = (x.f16("x")?, y.f16("y")?);
            // SAFETY: as above, for both fp16 tiles.
            unsafe {
                if kernel == ConvGoodnessWgradF16N256::NAME {
                    ConvGoodnessWgradF16N256 {
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
                        scale,
                        inv_scale,
                    }
                    .launch(stream, f, launch_cfg)
                } else {
                    ConvGoodnessWgradF16 {
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
                        scale,
                        inv_scale,
                    }
                    .launch(stream, f, launch_cfg)
                }
            }
        }
    };
    be.launched(kernel, r)?;
    let (part_w, part_b) = (part_w.slice(..), part_b.slice(..));
    // SAFETY: one thread per weight (M*K >= M); the partials hold Z slices of M*K and M.
    be.launched("wgrad_reduce_f32", unsafe {
        WgradReduceF32 {
            part: &part_w,
            part_db: &part_b,
            dw: dw.f32_mut("dL/dW")?,
            db: db.f32_mut("dL/db")?,
            MK: mk as i32,
            M: s.c_out as i32,
            Z: gz as i32,
        }
        .launch(stream, be.f("wgrad_reduce_f32")?, grid1(mk))
    })
}
