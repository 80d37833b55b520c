//! Criterion benchmarks of the CPU backend: every op at the VGG8 layer shapes (batch 128, 32x32 inputs,
//! width 0.25 and 1.0), and the whole training step. Throughput is FLOP/s for the convolutions
//! (`Throughput::Elements` = FLOPs: read criterion's "elem/s" as FLOP/s) and bytes/s for the memory-bound ops.
//! Inputs rotate over several buffers so the caches do not flatter the numbers.
//!
//! `cargo bench --bench cpu` (all), `cargo bench --bench cpu -- 'w0.25/layer2'` (a subset),
//! `cargo test --benches` (each once, as CI does).

use asge::backend::cpu::CpuBackend;
use asge::backend::prelude::*;
use asge::backend::{AdamWScalars, AdamWStep, ConvShape};
use asge::model::{self, ModelOptions, Params};
use asge::rng::Rng;
use asge::train::{AdamW, Net};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::time::Duration;

const BATCH: usize = 128;
const ROTATE: usize = 3;

/// Unit-normal inputs from `seed`.
fn randn(n: usize, seed: u64) -> Vec<f32> {
    asge::rng::randn(n, 1.0, seed)
}

fn ops(c: &mut Criterion) {
    let be = CpuBackend::new();
    for width in [0.25, 1.0] {
        let spec = model::resolve("vgg8", 3, 32, 10, &ModelOptions { width, ..Default::default() }).unwrap();
        let mut g = c.benchmark_group(format!("vgg8-w{width}"));
        g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
        let labels: Vec<u32> = (0..BATCH as u32).map(|i| i % 10).collect();
        for (i, l) in spec.layers.iter().enumerate() {
            let s = ConvShape { batch: BATCH, c_in: l.c_in, c_out: l.c_out, h: l.h, w: l.w };
            let grid = l.grid();
            let d = l.goodness_dim();
            let xs: Vec<Vec<f32>> = (0..ROTATE).map(|r| randn(s.x_len(), (i * 10 + r) as u64)).collect();
            let w = randn(s.w_len(), 100 + i as u64);
            let bias = vec![0.01f32; l.c_out];
            let (mut y, mut gd, mut dg) = (vec![0.0; s.y_len()], vec![0.0; BATCH * d], vec![0.0; BATCH * d]);
            let flop = 2 * l.conv_macs() as u64 * BATCH as u64;
            let layer = format!("layer{}", i + 1);

            g.throughput(Throughput::Elements(flop));
            let mut r = 0;
            g.bench_function(BenchmarkId::new("conv_goodness_fwd", &layer), |b| {
                b.iter(|| {
                    r = (r + 1) % ROTATE;
                    asge::ops::conv_goodness_fwd::run(
                        &be,
                        asge::ops::conv_goodness_fwd::Args {
                            layer: 0,
                            s: &s,
                            grid: &grid,
                            reduce: spec.goodness,
                            x: &xs[r],
                            w: &w,
                            b: &bias,
                            y: &mut y,
                            g: &mut gd,
                        },
                    )
                    .unwrap();
                })
            });
            let proj = randn(d * 10, 7);
            let (mut logits, mut stats) = (vec![0.0; BATCH * 10], vec![0.0; 2]);
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
                    proj_b: &[0.0; 10].to_vec(),
                    labels: &labels,
                    logits: &mut logits,
                    dg: Some(&mut dg),
                    stats: &mut stats,
                },
            )
            .unwrap();
            let (mut dw, mut db) = (vec![0.0; s.w_len()], vec![0.0; l.c_out]);
            g.bench_function(BenchmarkId::new("conv_goodness_wgrad", &layer), |b| {
                b.iter(|| {
                    asge::ops::conv_goodness_wgrad::run(
                        &be,
                        asge::ops::conv_goodness_wgrad::Args {
                            layer: 0,
                            s: &s,
                            mean_over: s.batch,
                            grid: &grid,
                            reduce: spec.goodness,
                            x: &xs[0],
                            y: &y,
                            dg: &dg,
                            dw: &mut dw,
                            db: &mut db,
                        },
                    )
                    .unwrap()
                })
            });

            g.throughput(Throughput::Bytes(4 * (2 * BATCH * d + d * 10) as u64));
            let pb = vec![0.0f32; 10];
            g.bench_function(BenchmarkId::new("goodness_loss", &layer), |b| {
                b.iter(|| {
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
                            proj_b: &pb,
                            labels: &labels,
                            logits: &mut logits,
                            dg: Some(&mut dg),
                            stats: &mut stats,
                        },
                    )
                    .unwrap()
                })
            });
            let (ho, wo) = l.out_hw();
            let mut out = vec![0.0; BATCH * l.c_out * ho * wo];
            let mut gap = vec![0.0; BATCH * l.c_out];
            let pool = l.pool.then_some(spec.pool_kind);
            g.throughput(Throughput::Bytes(4 * (s.y_len() + out.len()) as u64));
            // Layer 0's dropout key, the step's.
            be.prepare_step(&AdamWScalars::default(), &[Some(3)]).unwrap();
            g.bench_function(BenchmarkId::new("layer_output", &layer), |b| {
                b.iter(|| {
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
            });
            let mut p = w.clone();
            let (mut m, mut v) = (vec![0.0; s.w_len()], vec![0.0; s.w_len()]);
            let h = AdamWStep { lr: 1e-4, weight_decay: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 1 };
            g.throughput(Throughput::Bytes(4 * 7 * s.w_len() as u64));
            be.prepare_step(&h.scalars(), &[]).unwrap();
            g.bench_function(BenchmarkId::new("adamw", &layer), |b| {
                b.iter(|| {
                    asge::ops::adamw::run(
                        &be,
                        asge::ops::adamw::Args {
                            layer: 0,
                            len: s.w_len(),
                            p: &mut p,
                            grad: &dw,
                            m: &mut m,
                            v: &mut v,
                            copy: None,
                        },
                    )
                    .unwrap()
                })
            });
            black_box((&y, &gd, &out));
        }
        g.finish();
    }
}

fn train_step(c: &mut Criterion) {
    for width in [0.25, 1.0] {
        let spec = model::resolve("vgg8", 3, 32, 10, &ModelOptions { width, ..Default::default() }).unwrap();
        let params = Params::init(&spec, 1);
        let mut net = Net::new(CpuBackend::new(), spec.clone(), &params, AdamW::default(), BATCH).unwrap();
        let xs: Vec<Vec<f32>> = (0..ROTATE).map(|r| randn(BATCH * 3 * 32 * 32, 50 + r as u64)).collect();
        let labels: Vec<u32> = (0..BATCH as u32).map(|i| i % 10).collect();
        let mut g = c.benchmark_group("train_step");
        g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
        // Forward + weight-gradient FLOPs of the convolutions; the rest of the step is < 1% of the FLOPs.
        g.throughput(Throughput::Elements(4 * spec.conv_macs() as u64 * BATCH as u64));
        let mut step = 0u64;
        g.bench_function(BenchmarkId::new("vgg8", format!("w{width}-b{BATCH}")), |b| {
            b.iter(|| {
                step += 1;
                let x = &xs[step as usize % ROTATE];
                net.train_step(x, &labels, 1e-4, step, Some((0.1, step))).unwrap()
            })
        });
        g.finish();
    }
}

criterion_group!(benches, ops, train_step);

/// The ImageNet loader: augmented 64x64 batches (random resized crop + flip + RMS norm) gathered from
/// memory-mapped 72x72 shards in the page cache. Throughput in images.
fn loader(c: &mut Criterion) {
    use asge::data::augment::Augment;
    use asge::data::imagefolder::ResizeMode;
    use asge::data::shard::{write_shards, ShardOptions, ShardSet};
    let dir = std::env::temp_dir().join(format!("asge-bench-shards-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let input = dir.join("in");
    let mut rng = Rng::new(5);
    for class in 0..4 {
        let d = input.join(format!("c{class}"));
        std::fs::create_dir_all(&d).unwrap();
        for k in 0..64 {
            let img =
                image::RgbImage::from_fn(96, 80, |_, _| image::Rgb([rng.below(256) as u8, rng.below(256) as u8, 90]));
            img.save(d.join(format!("{k}.png"))).unwrap();
        }
    }
    let o = ShardOptions { size: 72, resize: ResizeMode::ShortSide, shard_bytes: 1 << 30, quiet: true };
    write_shards(&input, &dir.join("shards"), &o).unwrap();
    let set = ShardSet::open(&dir.join("shards")).unwrap();
    let mut g = c.benchmark_group("loader");
    g.sample_size(20).measurement_time(Duration::from_secs(3));
    let batch = 256;
    g.throughput(Throughput::Elements(batch as u64));
    let mut order: Vec<usize> = (0..batch).map(|i| (i * 97) % asge::data::ImageSource::len(&set)).collect();
    let mut step = 0u64;
    g.bench_function("imagenet-64px-resized-crop-b256", |b| {
        b.iter(|| {
            step += 1;
            order.rotate_left(1);
            black_box(asge::data::loader::make_batch(&set, &order, Augment::ResizedCrop(64), step, 0))
        })
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(loader_benches, loader);
criterion_main!(benches, loader_benches);
