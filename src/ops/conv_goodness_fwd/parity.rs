//! The parity check of `conv_goodness_fwd`: the CPU reference (f32, or its fp16 emulation) against a backend on
//! the awkward shapes below; `conv_goodness_wgrad`'s check continues from the backend's output.

use super::{run, Args};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, ConvShape, Precision};
use crate::model::{GoodnessReduce, PatchGrid};
use crate::ops::parity::{close, poisoned, poisoned_operand};
use crate::rng::randn;
use anyhow::Result;

/// A convolution with its patch grid.
#[derive(Clone, Copy, Debug)]
pub struct ConvCase {
    pub s: ConvShape,
    pub p: usize,
    pub reduce: GoodnessReduce,
}

/// The awkward shapes every conv kernel is checked on: batch 1 and 3, channels not a multiple of the tiles,
/// H not divisible by P (overlapping cells), 1x1 cells; `vgg_batch` scales the VGG8-like cases.
pub fn cases(vgg_batch: usize) -> Vec<ConvCase> {
    use GoodnessReduce::{Mean, Sum};
    let c = |batch, c_in, c_out, h, p, reduce| ConvCase { s: ConvShape { batch, c_in, c_out, h, w: h }, p, reduce };
    vec![
        c(1, 1, 8, 32, 4, Mean),
        c(3, 3, 70, 28, 8, Mean), // channels not a multiple of the tile, H not divisible by P
        c(3, 67, 129, 7, 2, Sum), // overlapping bins, odd everything
        c(vgg_batch, 32, 64, 16, 2, Mean), // a VGG8-like layer
        c(5, 120, 40, 2, 1, Mean), // K = 1080: several K tiles of either weight-gradient tile, 2x2 maps
        // fp16 picks the 128 x 256 forward tile at batch 128 (128 blocks, 122 KB of shared memory)
        c(vgg_batch, 16, 128, 16, 2, Mean),
        // rows wider than either fp16 forward tile: a cell's rows are runs in tiles that skip the tiles between
        ConvCase { s: ConvShape { batch: 2, c_in: 3, c_out: 8, h: 3, w: 300 }, p: 2, reduce: Sum },
    ]
}

/// Inputs for case `i`: x ~ N(0, 1), Kaiming-scaled weights, small biases, and a dL/dg of the size the loss
/// makes (~1/B), so that fp16 underflow would show.
pub fn inputs(case: &ConvCase, i: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = &case.s;
    let d = s.c_out * case.p * case.p;
    (
        randn(s.x_len(), 1.0, 10 + i as u64),
        randn(s.w_len(), (2.0 / (s.c_in * 9) as f64).sqrt(), 20 + i as u64),
        randn(s.c_out, 0.1, 30 + i as u64),
        randn(s.batch * d, 1.0 / s.batch as f64, 40 + i as u64),
    )
}

/// The backend's side of a checked forward, for the weight gradient's check: its input and output buffers, and
/// the output read back.
pub struct Forward<B: Backend> {
    pub x: B::Buf,
    pub y: B::Buf,
    pub y_host: Vec<f32>,
}

/// The worst ratios of error to tolerance of a check (1 would be the edge), and the seconds the backend took for
/// its ops and reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct Worst {
    pub y: f32,
    pub goodness: f32,
    pub seconds: f64,
}

/// The forward of case `i` on `dev` and on the CPU reference in `dev`'s precision, compared: a stored fp16
/// value may sit one fp16 ulp from the emulation's (1.1e-3 relative), a mean of their squares two (2e-3); in
/// f32 the sums differ in order only (1e-4); an absolute floor of 1e-5 of the largest value.
pub fn check_case<D: Backend>(dev: &D, case: &ConvCase, i: usize, what: &str) -> Result<(Worst, Forward<D>)> {
    let f16 = dev.precision() == Precision::F16;
    let (store_rtol, goodness_rtol) = if f16 { (1.1e-3, 2e-3) } else { (1e-4, 1e-4) };
    let cpu = CpuBackend::new().with_precision(dev.precision());
    let s = case.s;
    let grid = PatchGrid::new(case.p, s.h, s.w);
    let d = s.c_out * grid.cells();
    let (x, w, b, _) = inputs(case, i);
    let (mut y, mut g) = (vec![0.0; s.y_len()], vec![0.0; s.batch * d]);
    let a = Args { layer: 0, s: &s, grid: &grid, reduce: case.reduce, x: &x, w: &w, b: &b, y: &mut y, g: &mut g };
    run(&cpu, a)?;
    let (xd, wd, bd) = (dev.upload_operand(&x)?, dev.upload_operand(&w)?, dev.upload(&b)?);
    let (mut yd, mut gd) = (poisoned_operand(dev, s.y_len())?, poisoned(dev, s.batch * d)?);
    dev.synchronize()?;
    let t0 = std::time::Instant::now();
    let a = Args { layer: 0, s: &s, grid: &grid, reduce: case.reduce, x: &xd, w: &wd, b: &bd, y: &mut yd, g: &mut gd };
    run(dev, a)?;
    let y_dev = dev.read(&yd, s.y_len())?;
    let seconds = t0.elapsed().as_secs_f64();
    let worst = Worst {
        y: close(&format!("{what} y"), &y_dev, &y, store_rtol, 1e-5)?,
        goodness: close(&format!("{what} goodness"), &dev.read(&gd, s.batch * d)?, &g, goodness_rtol, 1e-5)?,
        seconds,
    };
    Ok((worst, Forward { x: xd, y: yd, y_host: y_dev }))
}
