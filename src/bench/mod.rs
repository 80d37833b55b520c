//! `asge bench`: every op of a training step at a model's layer shapes, and the whole step, timed on this
//! machine and compared with ceilings measured on the spot (a large GEMM through the same GEMM library the
//! backend uses, all threads; a large memory copy).

mod report;

use crate::backend::cpu::CpuBackend;
use crate::backend::{AdamWScalars, AdamWStep, Backend, ConvShape, Precision};
use crate::model::{self, ModelOptions, Params};
use crate::train::{AdamW, Net};
use anyhow::{Context, Result};
pub use report::{format_kernels, format_report};
use serde::Serialize;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub model: String,
    pub width: f64,
    pub batch: usize,
    pub channels: usize,
    pub classes: usize,
    /// Timed repetitions per op (the median is reported).
    pub reps: usize,
    /// On a device: the steps the step time is measured over, by the device's events (back to back, as training
    /// runs them).
    pub step_reps: usize,
    /// Time only the whole training step (no per-op table, no kernel table, no ceilings).
    pub step_only: bool,
    /// On a device: the eager steps whose every kernel is timed alone (0: no kernel table).
    pub kernel_steps: usize,
    /// The conv operands' precision.
    pub precision: Precision,
}

/// One row: what ran, its median time, and its rate against the matching ceiling.
#[derive(Clone, Debug, Serialize)]
pub struct BenchRow {
    pub op: String,
    pub layer: Option<usize>,
    pub ms: f64,
    /// FLOP/s (compute-bound ops) or bytes/s (memory-bound ops), per `unit`.
    pub rate: f64,
    pub unit: &'static str,
    pub pct_of_ceiling: f64,
    /// The kernel that ran, where the backend picks among several (CUDA conv tiles).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<&'static str>,
}

/// One kernel of the step on a device, timed alone with its events (see [`crate::backend::Schedule::time_kernels`]),
/// per step: all its launches at one layer added up.
#[derive(Clone, Debug, Serialize)]
pub struct KernelRow {
    /// The layer it served (1-based), or the layer count + 1 for the fusion heads.
    pub layer: usize,
    pub kernel: &'static str,
    pub launches: f64,
    pub us: f64,
    /// Useful FLOPs and the bytes it must move, per step (see `backend::cuda::Work`).
    pub flop: f64,
    pub bytes: f64,
    /// FLOP/s for a GEMM (FLOPs > 0), bytes/s for the others, per `unit`, and that against the matching ceiling.
    pub rate: f64,
    pub unit: &'static str,
    pub pct_of_ceiling: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchReport {
    /// "asge-bench": how `--save` recognises an earlier report it may replace.
    pub format: &'static str,
    pub device: String,
    /// True under the CUDA driver stand-in: every time measures the host emulator, not a GPU.
    pub emulated: bool,
    pub model: String,
    pub width: f64,
    pub batch: usize,
    pub channels: usize,
    pub classes: usize,
    /// Measured ceilings (absent with `step_only`).
    pub gemm_ceiling_gflops: Option<f64>,
    pub copy_ceiling_gbs: Option<f64>,
    pub ceiling_source: Option<String>,
    pub rows: Vec<BenchRow>,
    pub step_ms: f64,
    /// How the step was timed: the device's events over N steps, or the host's clock (median of N).
    #[serde(default)]
    pub step_clock: String,
    pub images_per_s: f64,
    /// Forward + weight-gradient FLOPs per image (the convs; everything else is < 1%).
    pub flop_per_image: f64,
    /// On a device: every kernel of the step, timed alone over `kernel_steps` eager steps (empty on the CPU).
    pub kernels: Vec<KernelRow>,
    pub kernel_steps: usize,
    /// The layer count (a kernel row's layer past it is the fusion heads').
    pub layers: usize,
}

/// Adds up the launches of `steps` steps by (layer, kernel), in the order first launched, per step.
pub fn kernel_rows(
    times: &[crate::backend::KernelTime],
    steps: usize,
    gemm_peak_gflops: f64,
    copy_peak_gbs: f64,
) -> Vec<KernelRow> {
    let mut rows: Vec<KernelRow> = Vec::new();
    let per = 1.0 / steps.max(1) as f64;
    for t in times {
        let i = match rows.iter().position(|r| r.layer == t.layer && r.kernel == t.kernel) {
            Some(i) => i,
            None => {
                rows.push(KernelRow {
                    layer: t.layer,
                    kernel: t.kernel,
                    launches: 0.0,
                    us: 0.0,
                    flop: 0.0,
                    bytes: 0.0,
                    rate: 0.0,
                    unit: "",
                    pct_of_ceiling: None,
                });
                rows.len() - 1
            }
        };
        let r = &mut rows[i];
        r.launches += per;
        r.us += t.us * per;
        r.flop += t.flop * per;
        r.bytes += t.bytes * per;
    }
    for r in &mut rows {
        let (amount, unit, peak) =
            if r.flop > 0.0 { (r.flop, "FLOP/s", gemm_peak_gflops) } else { (r.bytes, "B/s", copy_peak_gbs) };
        r.rate = amount / (r.us * 1e-6);
        r.unit = unit;
        r.pct_of_ceiling = peak.is_finite().then(|| 100.0 * r.rate / (peak * 1e9));
    }
    rows
}

fn median_ms(reps: usize, f: impl FnMut()) -> f64 {
    median_ms_after(1, reps, f)
}

/// [`median_ms`] after `warmup` untimed calls.
fn median_ms_after(warmup: usize, reps: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..warmup {
        f(); // warm-up: page faults, caches, lazy allocation
    }
    let mut t: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).unwrap());
    t[t.len() / 2]
}

/// Unit-normal inputs from `seed`.
fn randn(n: usize, seed: u64) -> Vec<f32> {
    crate::rng::randn(n, 1.0, seed)
}

/// Best GFLOP/s of f32 GEMM through `gemm` (the backend's GEMM library) on all threads: the larger of one big
/// square product split by the library across the threads, and one conv-shaped product (256 x 1152 x 1024) per
/// thread, all threads at once (how the backend uses it).
pub fn gemm_ceiling_gflops() -> f64 {
    use rayon::prelude::*;
    let threads = rayon::current_num_threads();
    let run = |m: usize, n: usize, k: usize, par: gemm::Parallelism, a: &[f32], b: &[f32], c: &mut [f32]| {
        // SAFETY: a is m x k, b is k x n, c is m x n, all row-major and distinct.
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                c.as_mut_ptr(),
                1,
                n as isize,
                false,
                a.as_ptr(),
                1,
                k as isize,
                b.as_ptr(),
                1,
                n as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                par,
            )
        }
    };
    let best_ms = |f: &mut dyn FnMut()| {
        (0..4)
            .map(|_| {
                let t0 = Instant::now();
                f();
                t0.elapsed().as_secs_f64() * 1e3
            })
            .fold(f64::INFINITY, f64::min)
    };
    let n = 1536;
    let (a, b, mut c) = (randn(n * n, 1), randn(n * n, 2), vec![0.0f32; n * n]);
    let square = best_ms(&mut || run(n, n, n, gemm::Parallelism::Rayon(threads), &a, &b, &mut c));
    let square = 2.0 * (n * n * n) as f64 / (square * 1e-3) / 1e9;
    let (m, nn, k) = (256, 1024, 1152);
    let lhs = randn(m * k, 3);
    let rhs = randn(k * nn, 4);
    let mut outs: Vec<Vec<f32>> = (0..threads).map(|_| vec![0.0f32; m * nn]).collect();
    let per_thread = best_ms(&mut || {
        outs.par_iter_mut().for_each(|o| run(m, nn, k, gemm::Parallelism::None, &lhs, &rhs, o));
    });
    let per_thread = 2.0 * (threads * m * nn * k) as f64 / (per_thread * 1e-3) / 1e9;
    std::hint::black_box((&c, &outs));
    square.max(per_thread)
}

/// Best GB/s (read + write) of copying 256 MiB, split over all threads.
pub fn copy_ceiling_gbs() -> f64 {
    use rayon::prelude::*;
    let n = 64 << 20;
    let src = vec![1.0f32; n];
    let mut dst = vec![0.0f32; n];
    let ms = (0..4)
        .map(|_| {
            let t0 = Instant::now();
            dst.par_chunks_mut(1 << 16).zip(src.par_chunks(1 << 16)).for_each(|(d, s)| d.copy_from_slice(s));
            t0.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min);
    std::hint::black_box(&dst);
    (2 * 4 * n) as f64 / (ms * 1e-3) / 1e9
}

/// Times every op at the model's layer shapes on the CPU backend, then the whole training step.
pub fn run_cpu(o: &BenchOptions) -> Result<BenchReport> {
    let ceilings = (!o.step_only).then(|| Ceilings {
        gemm_gflops: gemm_ceiling_gflops(),
        gemm_source: "gemm crate, all threads".into(),
        copy_gbs: copy_ceiling_gbs(),
    });
    run(CpuBackend::new().with_precision(o.precision), o, ceilings)
}

/// Times every op of a step on the CUDA backend (synchronised wall time per op; the criterion benches time with
/// events), against cuBLAS (SGEMM for fp32, HGEMM on the tensor cores for fp16) and a device copy measured now.
#[cfg(feature = "cuda")]
pub fn run_cuda(be: crate::backend::cuda::CudaBackend, o: &BenchOptions) -> Result<BenchReport> {
    let be = be.with_precision(o.precision);
    let ceilings = if o.step_only {
        None
    } else {
        match be.ceilings() {
            Ok(c) => Some(match o.precision {
                Precision::F32 => Ceilings {
                    gemm_gflops: c.sgemm_gflops,
                    gemm_source: format!(
                        "cuBLAS SGEMM 4096^3 (HGEMM on the tensor cores: {:.0} GFLOP/s)",
                        c.hgemm_gflops
                    ),
                    copy_gbs: c.copy_gbs,
                },
                Precision::F16 => Ceilings {
                    gemm_gflops: c.hgemm_gflops,
                    gemm_source: format!(
                        "cuBLAS HGEMM 4096^3, fp16 tensor cores (SGEMM: {:.0} GFLOP/s)",
                        c.sgemm_gflops
                    ),
                    copy_gbs: c.copy_gbs,
                },
            }),
            // The ops are still worth timing without the vendor ceilings.
            Err(e) => {
                eprintln!("asge bench: no ceilings ({e:#})");
                None
            }
        }
    };
    run(be, o, ceilings)
}

/// The rates an op is compared with.
#[derive(Clone, Debug, Serialize)]
pub struct Ceilings {
    pub gemm_gflops: f64,
    pub gemm_source: String,
    pub copy_gbs: f64,
}

/// Times every op at the model's layer shapes on `be`, then the whole training step.
pub fn run<B: Backend>(be: B, o: &BenchOptions, ceilings: Option<Ceilings>) -> Result<BenchReport> {
    anyhow::ensure!(o.batch > 0, "--batch 0: the batch needs at least one image");
    let spec =
        model::resolve(&o.model, o.channels, 32, o.classes, &ModelOptions { width: o.width, ..Default::default() })?;
    spec.validate().with_context(|| format!("--model {}", o.model))?;
    // The step's model and workspace, and the per-op buffers beside them (about as much again).
    let bytes = crate::train::net::host_memory_estimate(&spec, o.batch, o.channels * 32 * 32, be.buffers_on_host());
    crate::limits::ensure_fits("the benchmark", bytes.saturating_mul(2), "--batch or --width")?;
    let (gemm_peak, copy_peak) = ceilings.as_ref().map_or((f64::NAN, f64::NAN), |c| (c.gemm_gflops, c.copy_gbs));
    let b = o.batch;
    let n = o.classes;
    let labels: Vec<u32> = (0..b as u32).map(|i| i % n as u32).collect();
    let labels_dev = be.labels(&labels)?;
    // Every timed call ends with a synchronize, so a GPU's queued work is inside the timing.
    let timed = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        let mut err = None;
        // A device that times its own work (CUDA events around the kernels) is asked first.
        if let Some(ms) = be.device_time_ms(1, o.reps.max(1), f)? {
            return Ok(ms);
        }
        let ms = median_ms(o.reps, || {
            if err.is_none() {
                if let Err(e) = f().and_then(|_| be.synchronize()) {
                    err = Some(e);
                }
            }
        });
        err.map_or(Ok(ms), Err)
    };
    let mut rows = Vec::new();
    let mut flop_per_image = 0.0;
    // A rate against its ceiling: FLOP/s against the GEMM's, bytes/s against the copy's.
    let row = |op: &str, layer, ms: f64, amount: f64, unit: &'static str, peak_g: f64| BenchRow {
        op: op.into(),
        layer: Some(layer),
        ms,
        rate: amount / (ms * 1e-3),
        unit,
        pct_of_ceiling: 100.0 * amount / (ms * 1e-3) / (peak_g * 1e9),
        kernel: None,
    };
    let compute = |op: &str, layer, ms: f64, flop: f64| row(op, layer, ms, flop, "FLOP/s", gemm_peak);
    let memory = |op: &str, layer, ms: f64, bytes: f64| row(op, layer, ms, bytes, "B/s", copy_peak);
    // Each layer's input is the previous layer's output, as in a step (where the fp16 CUDA path stores it
    // channels-last and the next conv reads it with no copy); the first layer's is the batch.
    let mut layer_input = None;
    for (i, l) in spec.layers.iter().enumerate() {
        flop_per_image += 4.0 * l.conv_macs() as f64;
        if o.step_only {
            continue;
        }
        let s = ConvShape { batch: b, c_in: l.c_in, c_out: l.c_out, h: l.h, w: l.w };
        let grid = l.grid();
        let d = l.goodness_dim();
        // Bytes per stored operand value (x, y, the layer output, the weights' copy).
        let ob = match be.precision() {
            Precision::F32 => 4.0,
            Precision::F16 => 2.0,
        };
        let x = match layer_input.take() {
            Some(x) => x,
            None => be.upload_operand(&randn(s.x_len(), 10 + i as u64))?,
        };
        let w0 = randn(s.w_len(), 20 + i as u64);
        let (mut w, mut w_op) = (be.upload(&w0)?, be.upload_operand(&w0)?);
        let bias = be.upload(&vec![0.01f32; l.c_out])?;
        let proj = be.upload(&randn(d * n, 30 + i as u64))?;
        let proj_b = be.zeros(n)?;
        let (mut y, mut g, mut dg) = (be.operand_zeros(s.y_len())?, be.zeros(b * d)?, be.zeros(b * d)?);
        let (mut dw, mut db) = (be.zeros(s.w_len())?, be.zeros(l.c_out)?);
        let (mut logits, mut stats) = (be.zeros(b * n)?, be.zeros(2)?);
        let flop = 2.0 * (l.conv_macs() * b) as f64;
        let ms = timed(&mut || {
            crate::ops::conv_goodness_fwd::run(
                &be,
                crate::ops::conv_goodness_fwd::Args {
                    layer: i,
                    s: &s,
                    grid: &grid,
                    reduce: spec.goodness,
                    x: &x,
                    w: &w_op,
                    b: &bias,
                    y: &mut y,
                    g: &mut g,
                },
            )
        })?;
        let kernels = be.conv_kernels(&s);
        rows.push(BenchRow { kernel: kernels.map(|k| k[0]), ..compute("conv_goodness_fwd", i + 1, ms, flop) });
        let ms = timed(&mut || {
            crate::ops::goodness_loss::run(
                &be,
                crate::ops::goodness_loss::Args {
                    layer: i,
                    batch: b,
                    mean_over: b,
                    dim: d,
                    classes: n,
                    g: &g,
                    proj_w: &proj,
                    proj_b: &proj_b,
                    labels: &labels_dev,
                    logits: &mut logits,
                    dg: Some(&mut dg),
                    stats: &mut stats,
                },
            )
        })?;
        rows.push(memory("goodness_loss", i + 1, ms, 4.0 * (2 * b * d + d * n) as f64));
        let ms = timed(&mut || {
            crate::ops::conv_goodness_wgrad::run(
                &be,
                crate::ops::conv_goodness_wgrad::Args {
                    layer: i,
                    s: &s,
                    mean_over: s.batch,
                    grid: &grid,
                    reduce: spec.goodness,
                    x: &x,
                    y: &y,
                    dg: &dg,
                    dw: &mut dw,
                    db: &mut db,
                },
            )
        })?;
        rows.push(BenchRow { kernel: kernels.map(|k| k[1]), ..compute("conv_goodness_wgrad", i + 1, ms, flop) });
        let (mut m, mut v) = (be.zeros(s.w_len())?, be.zeros(s.w_len())?);
        let h = AdamWStep { lr: 1e-4, weight_decay: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 1 };
        // The fp16 path also writes the weights' fp16 copy; the f32 path has none.
        let (mut copy, copy_bytes) = match be.precision() {
            Precision::F32 => (None, 0.0),
            Precision::F16 => (Some(&mut w_op), 2.0),
        };
        be.prepare_step(&h.scalars(), &[])?;
        let ms = timed(&mut || {
            crate::ops::adamw::run(
                &be,
                crate::ops::adamw::Args {
                    layer: i,
                    len: s.w_len(),
                    p: &mut w,
                    grad: &dw,
                    m: &mut m,
                    v: &mut v,
                    copy: copy.as_deref_mut(),
                },
            )
        })?;
        rows.push(memory("adamw", i + 1, ms, (4.0 * 7.0 + copy_bytes) * s.w_len() as f64));
        let (ho, wo) = l.out_hw();
        let out_len = b * l.c_out * ho * wo;
        let mut out = be.operand_zeros(out_len)?;
        let mut gap = be.zeros(b * l.c_out)?;
        let pool = l.pool.then_some(spec.pool_kind);
        // The layer's dropout key, the step's (as a training step sets it).
        let mut keys = vec![None; i + 1];
        keys[i] = Some(7);
        be.prepare_step(&AdamWScalars::default(), &keys)?;
        let ms = timed(&mut || {
            let drop = Some(0.1);
            crate::ops::layer_output::run(
                &be,
                crate::ops::layer_output::Args {
                    layer: i,
                    batch: b,
                    c: l.c_out,
                    h: l.h,
                    w: l.w,
                    pool,
                    dropout: drop,
                    first_sample: 0,
                    y: &y,
                    out: &mut out,
                    gap: Some(&mut gap),
                },
            )
        })?;
        rows.push(memory("layer_output", i + 1, ms, ob * (s.y_len() + out_len) as f64 + 4.0 * (b * l.c_out) as f64));
        layer_input = Some(out);
    }
    let params = Params::init(&spec, 1);
    let mut net = Net::new(be, spec.clone(), &params, AdamW::default(), b)?;
    let x = randn(b * o.channels * 32 * 32, 99);
    let mut step = 0;
    // As the training loop runs it: each call queues a step and reads the previous one's statistics, so on a GPU
    // a call lasts one step of device time once the queue is full (the first, warm-up call waits for nothing).
    // The first error of a step (the steps are timed in closures that cannot return it).
    let failed = std::cell::Cell::new(None::<anyhow::Error>);
    // On a device a step graph's first step runs eagerly (allocations, tables) and its second is captured; the
    // statistics buffers' parity alternates, so a step has two graphs: steps 1-2 eager, 3-4 captured, replays
    // (the step to time) from step 5.
    let on_host = net.backend().buffers_on_host();
    let warmup = if on_host { 1 } else { 4 };
    let mut one_step = |net: &mut Net<B>| {
        step += 1;
        let first = failed.take();
        failed.set(match first {
            Some(e) => Some(e),
            None => net.train_step_pipelined(&x, &labels, 1e-4, step, Some((0.1, step))).err(),
        });
    };
    let (step_ms, step_clock) = if on_host {
        (median_ms_after(warmup, o.reps, || one_step(&mut net)), format!("host clock, median of {}", o.reps.max(1)))
    } else {
        // On a device: its own clock (events) over at least 20 replays of the step graph, as training runs them
        // back to back; a host clock around one call would time the queue, not the device.
        for _ in 0..warmup {
            one_step(&mut net);
        }
        let steps = o.step_reps.max(1);
        let a = net.backend().device_mark()?;
        for _ in 0..steps {
            one_step(&mut net);
        }
        let b = net.backend().device_mark()?;
        match (a, b) {
            (Some(a), Some(b)) => {
                (net.backend().device_elapsed_ms(a, b)? / steps as f64, format!("device events over {steps} steps"))
            }
            _ => anyhow::bail!("the device gave no timeline marks"),
        }
    };
    if let Some(e) = failed.take() {
        return Err(e.context("the training step"));
    }
    net.flush_stats()?;
    // Then every kernel of a few eager steps, each timed alone (where the backend can).
    let mut kernels = Vec::new();
    let kernel_steps = if o.step_only { 0 } else { o.kernel_steps };
    if kernel_steps > 0 && net.backend().time_kernels(true)? {
        for _ in 0..kernel_steps {
            one_step(&mut net);
        }
        let flushed = net.flush_stats();
        let times = net.backend().take_kernel_times();
        net.backend().time_kernels(false)?;
        if let Some(e) = failed.take() {
            return Err(e.context("the training step (kernels timed)"));
        }
        flushed?;
        kernels = kernel_rows(&times?, kernel_steps, gemm_peak, copy_peak);
    }
    let device = net.backend().name();
    Ok(BenchReport {
        format: "asge-bench",
        emulated: device.contains("CUDA stand-in"),
        device,
        model: format!("{} width {} ({}x32x32, N={})", spec.arch, o.width, o.channels, n),
        width: o.width,
        batch: b,
        channels: o.channels,
        classes: n,
        gemm_ceiling_gflops: ceilings.as_ref().map(|c| c.gemm_gflops),
        copy_ceiling_gbs: ceilings.as_ref().map(|c| c.copy_gbs),
        ceiling_source: ceilings.map(|c| c.gemm_source),
        rows,
        step_ms,
        step_clock,
        images_per_s: b as f64 / (step_ms * 1e-3),
        flop_per_image,
        kernels,
        kernel_steps,
        layers: spec.layers.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::report::share;
    use super::*;
    use crate::backend::KernelTime;

    #[test]
    fn kernel_rows_add_up_each_kernel_per_layer_and_step() {
        let t = |kernel, layer, us, flop, bytes| KernelTime { kernel, layer, us, flop, bytes };
        // Two steps: per step, layer 1's GEMM once and AdamW twice (weights and bias), layer 2's GEMM once.
        let step = [
            t("gemm", 1, 10.0, 2e9, 1e6),
            t("adamw_f32", 1, 1.0, 0.0, 3e5),
            t("adamw_f32", 1, 1.0, 0.0, 1e5),
            t("gemm", 2, 20.0, 4e9, 2e6),
        ];
        let times: Vec<KernelTime> = step.iter().chain(&step).cloned().collect();
        let rows = kernel_rows(&times, 2, 1000.0, 100.0);
        let got: Vec<(usize, &str, f64)> = rows.iter().map(|r| (r.layer, r.kernel, r.launches)).collect();
        assert_eq!(got, [(1, "gemm", 1.0), (1, "adamw_f32", 2.0), (2, "gemm", 1.0)]);
        // Layer 1's GEMM: 2 GFLOP in 10 us = 200 TFLOP/s, 20000% of a 1 TFLOP/s ceiling.
        assert_eq!((rows[0].us, rows[0].flop, rows[0].unit), (10.0, 2e9, "FLOP/s"));
        assert!((rows[0].rate - 2e14).abs() < 1.0 && (rows[0].pct_of_ceiling.unwrap() - 20_000.0).abs() < 1e-6);
        // AdamW: 400 KB in 2 us = 200 GB/s, 200% of a 100 GB/s copy.
        assert_eq!((rows[1].us, rows[1].bytes, rows[1].unit), (2.0, 4e5, "B/s"));
        assert!((rows[1].pct_of_ceiling.unwrap() - 200.0).abs() < 1e-9);
        // A memory-bound share past 100% reads "in cache"; a GEMM's does not.
        assert_eq!(
            (share("B/s", 200.0), share("B/s", 80.0), share("FLOP/s", 120.0)),
            ("in cache".into(), "80.0%".into(), "120.0%".into())
        );
        // Without ceilings: no share.
        assert!(kernel_rows(&times, 2, f64::NAN, f64::NAN).iter().all(|r| r.pct_of_ceiling.is_none()));
    }
}
