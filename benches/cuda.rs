//! Criterion benchmarks of the CUDA backend, in fp32 and in fp16: every op at every VGG8 layer (batch 128, 32x32,
//! width 1) and the whole training step, timed with CUDA events around the launches after a warm-up, inputs rotated
//! over several buffers so that the 50-60 MB L2 does not flatter the numbers. Throughput is FLOPs
//! for the convolutions (`Throughput::Elements`: read "elem/s" as FLOP/s), bytes for the memory-bound ops. Without a GPU every bench is skipped with a message.
//!
//! `cargo bench --bench cuda` on a GPU machine; tools/gpu-check.sh runs `asge bench --device cuda` instead
//! (the GPU machines have no Rust toolchain).

use asge::backend::cuda::{self, CudaBackend};
use asge::backend::prelude::*;
use asge::backend::{AdamWScalars, AdamWStep, ConvShape, Precision};
use asge::model::{self, ModelOptions, Params};
use asge::train::{AdamW, Net};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::Duration;

const BATCH: usize = 128;
const ROTATE: usize = 4;

/// Unit-normal inputs from `seed`.
fn randn(n: usize, seed: u64) -> Vec<f32> {
    asge::rng::randn(n, 1.0, seed)
}

fn gpu() -> Option<CudaBackend> {
    match cuda::probe().and_then(|_| CudaBackend::new(0)) {
        Ok(be) if be.is_standin() => {
            eprintln!("CUDA benches skipped: the CUDA stand-in's times would measure its host emulator");
            None
        }
        Ok(be) => Some(be),
        Err(e) => {
            eprintln!("CUDA benches skipped: {e:#}");
            None
        }
    }
}

/// criterion's `iter_custom` with CUDA event timing.
fn event_time(be: &CudaBackend, iters: u64, mut f: impl FnMut(u64)) -> Duration {
    let mut i = 0;
    let ms = be
        .time_ms(0, iters as usize, || {
            f(i);
            i += 1;
            Ok(())
        })
        .unwrap();
    Duration::from_secs_f64(ms * iters as f64 * 1e-3)
}

fn convs(c: &mut Criterion) {
    for precision in [Precision::F32, Precision::F16] {
        let Some(be) = gpu() else { return };
        ops(c, be.with_precision(precision));
    }
}

/// Every op at every VGG8 layer in the backend's precision (the conv operands fp16 or f32; the rest f32).
fn ops(c: &mut Criterion, be: CudaBackend) {
    let p = be.precision().as_str();
    // Bytes per stored conv operand.
    let ob = if be.precision() == Precision::F16 { 2 } else { 4 };
    let spec = model::resolve("vgg8", 3, 32, 10, &ModelOptions::default()).unwrap();
    let mut g = c.benchmark_group(format!("cuda-vgg8-w1-{p}"));
    g.sample_size(20).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(3));
    for (i, l) in spec.layers.iter().enumerate() {
        let s = ConvShape { batch: BATCH, c_in: l.c_in, c_out: l.c_out, h: l.h, w: l.w };
        let grid = l.grid();
        let d = l.goodness_dim();
        let xs: Vec<_> =
            (0..ROTATE).map(|r| be.upload_operand(&randn(s.x_len(), (10 * i + r) as u64)).unwrap()).collect();
        let w = be.upload_operand(&randn(s.w_len(), 7)).unwrap();
        let bias = be.zeros(l.c_out).unwrap();
        let (mut y, mut gd) = (be.operand_zeros(s.y_len()).unwrap(), be.zeros(BATCH * d).unwrap());
        let dg = be.upload(&randn(BATCH * d, 9)).unwrap();
        let (mut dw, mut db) = (be.zeros(s.w_len()).unwrap(), be.zeros(l.c_out).unwrap());
        g.throughput(Throughput::Elements(2 * l.conv_macs() as u64 * BATCH as u64));
        let layer = format!("layer{}", i + 1);
        g.bench_function(BenchmarkId::new(format!("conv_goodness_fwd_{p}"), &layer), |b| {
            b.iter_custom(|iters| {
                event_time(&be, iters, |k| {
                    let x = &xs[k as usize % ROTATE];
                    asge::ops::conv_goodness_fwd::run(
                        &be,
                        asge::ops::conv_goodness_fwd::Args {
                            layer: 0,
                            s: &s,
                            grid: &grid,
                            reduce: spec.goodness,
                            x,
                            w: &w,
                            b: &bias,
                            y: &mut y,
                            g: &mut gd,
                        },
                    )
                    .unwrap()
                })
            })
        });
        g.bench_function(BenchmarkId::new(format!("conv_goodness_wgrad_{p}"), &layer), |b| {
            b.iter_custom(|iters| {
                event_time(&be, iters, |k| {
                    let x = &xs[k as usize % ROTATE];
                    asge::ops::conv_goodness_wgrad::run(
                        &be,
                        asge::ops::conv_goodness_wgrad::Args {
                            layer: 0,
                            s: &s,
                            mean_over: s.batch,
                            grid: &grid,
                            reduce: spec.goodness,
                            x,
                            y: &y,
                            dg: &dg,
                            dw: &mut dw,
                            db: &mut db,
                        },
                    )
                    .unwrap()
                })
            })
        });
        // The memory-bound ops: bytes read + written.
        let labels = be.labels(&(0..BATCH as u32).map(|i| i % 10).collect::<Vec<_>>()).unwrap();
        let (proj, proj_b) = (be.upload(&randn(d * 10, 3)).unwrap(), be.zeros(10).unwrap());
        let (mut logits, mut dgo, mut stats) =
            (be.zeros(BATCH * 10).unwrap(), be.zeros(BATCH * d).unwrap(), be.zeros(2).unwrap());
        g.throughput(Throughput::Bytes(4 * (2 * BATCH * d + d * 10) as u64));
        g.bench_function(BenchmarkId::new(format!("goodness_loss_{p}"), &layer), |b| {
            b.iter_custom(|iters| {
                event_time(&be, iters, |_| {
                    asge::ops::goodness_loss::run(
                        &be,
                        asge::ops::goodness_loss::Args {
                            layer: 0,
                            batch: BATCH,
                            mean_over: BATCH,
                            dim: d,
                            classes: 10,
                            g: &gd,
                            proj_w: &proj,
                            proj_b: &proj_b,
                            labels: &labels,
                            logits: &mut logits,
                            dg: Some(&mut dgo),
                            stats: &mut stats,
                        },
                    )
                    .unwrap()
                })
            })
        });
        let (ho, wo) = l.out_hw();
        let (mut out, mut gap) =
            (be.operand_zeros(BATCH * l.c_out * ho * wo).unwrap(), be.zeros(BATCH * l.c_out).unwrap());
        let pool = l.pool.then_some(spec.pool_kind);
        g.throughput(Throughput::Bytes(ob * (s.y_len() + BATCH * l.c_out * ho * wo) as u64));
        g.bench_function(BenchmarkId::new(format!("layer_output_{p}"), &layer), |b| {
            b.iter_custom(|iters| {
                event_time(&be, iters, |k| {
                    // A new key every step, as training makes them: the step's, set before it.
                    be.prepare_step(&AdamWScalars::default(), &[Some(k)]).unwrap();
                    let drop = Some(0.1);
                    asge::ops::layer_output::run(
                        &be,
                        asge::ops::layer_output::Args {
                            layer: 0,
                            batch: BATCH,
                            first_sample: 0,
                            c: l.c_out,
                            h: l.h,
                            w: l.w,
                            pool,
                            dropout: drop,
                            y: &y,
                            out: &mut out,
                            gap: Some(&mut gap),
                        },
                    )
                    .unwrap()
                })
            })
        });
        let mut master = be.upload(&randn(s.w_len(), 4)).unwrap();
        let (mut m, mut v) = (be.zeros(s.w_len()).unwrap(), be.zeros(s.w_len()).unwrap());
        // The fp16 path also writes the weights' fp16 copy in the same pass.
        let mut copy = (be.precision() == Precision::F16).then(|| be.operand_zeros(s.w_len()).unwrap());
        let copy_bytes = if copy.is_some() { 2 } else { 0 };
        g.throughput(Throughput::Bytes((4 * 7 + copy_bytes) * s.w_len() as u64));
        g.bench_function(BenchmarkId::new(format!("adamw_{p}"), &layer), |b| {
            b.iter_custom(|iters| {
                event_time(&be, iters, |k| {
                    let h =
                        AdamWStep { lr: 1e-4, weight_decay: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: k + 1 };
                    be.prepare_step(&h.scalars(), &[]).unwrap();
                    asge::ops::adamw::run(
                        &be,
                        asge::ops::adamw::Args {
                            layer: 0,
                            len: s.w_len(),
                            p: &mut master,
                            grad: &dw,
                            m: &mut m,
                            v: &mut v,
                            copy: copy.as_mut(),
                        },
                    )
                    .unwrap()
                })
            })
        });
    }
    g.finish();
}

fn train_step(c: &mut Criterion) {
    for precision in [Precision::F32, Precision::F16] {
        let Some(be) = gpu() else { return };
        step_bench(c, be.with_precision(precision));
    }
}

fn step_bench(c: &mut Criterion, be: CudaBackend) {
    let p = be.precision().as_str();
    let spec = model::resolve("vgg8", 3, 32, 10, &ModelOptions::default()).unwrap();
    let params = Params::init(&spec, 1);
    let mut net = Net::new(be, spec.clone(), &params, AdamW::default(), BATCH).unwrap();
    let xs: Vec<Vec<f32>> = (0..ROTATE).map(|r| randn(BATCH * 3 * 32 * 32, 50 + r as u64)).collect();
    let labels: Vec<u32> = (0..BATCH as u32).map(|i| i % 10).collect();
    let mut g = c.benchmark_group("cuda-train_step");
    g.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(4 * spec.conv_macs() as u64 * BATCH as u64));
    let mut step = 0u64;
    // Wall time, as the training loop runs: each call queues a step (with its host-to-device batch copy) and
    // reads the previous step's losses, so in steady state a call lasts one step of device time.
    g.bench_function(BenchmarkId::new(format!("vgg8-{p}"), format!("w1-b{BATCH}")), |b| {
        b.iter(|| {
            step += 1;
            net.train_step_pipelined(&xs[step as usize % ROTATE], &labels, 1e-4, step, Some((0.1, step))).unwrap()
        })
    });
    g.finish();
    net.flush_stats().unwrap();
}

criterion_group!(benches, convs, train_step);
criterion_main!(benches);
