//! End to end on real MNIST: a short run clears an accuracy bar no untrained or broken model can; a run repeats
//! exactly under its seed; a resumed run equals the uninterrupted one; checkpoints round-trip.

mod common;

use asge::data::DatasetKind;
use asge::files::RunStart;
use asge::model::{self, ModelOptions, Params};
use asge::train::checkpoint;
use asge::train::run::{self, AugmentChoice, RunOptions, TrainConfig};
use std::path::Path;

fn tiny(out_tag: &str) -> (TrainConfig, std::path::PathBuf) {
    let cfg = TrainConfig {
        dataset: DatasetKind::Mnist,
        data: common::data_dir(),
        width: 0.125,
        epochs: 2,
        batch: 64,
        lr: 1e-3,
        limit_train: Some(640),
        limit_test: Some(200),
        val: Some(128),
        ..Default::default()
    };
    (cfg, common::temp_dir(out_tag))
}

/// VGG8 at width 0.125 on 6,000 MNIST images, 3 epochs at lr 1e-3, tested on 2,000.
fn mnist_6000() -> TrainConfig {
    TrainConfig {
        dataset: DatasetKind::Mnist,
        data: common::data_dir(),
        width: 0.125,
        epochs: 3,
        batch: 64,
        lr: 1e-3,
        limit_train: Some(6000),
        limit_test: Some(2000),
        val: Some(0),
        ..Default::default()
    }
}

fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let ck = checkpoint::load(path).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = ck.params.into_iter().map(|(k, (_, d))| (k, d)).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

#[test]
fn short_mnist_run_learns() {
    // VGG8 at width 0.125 on 6,000 MNIST images, 3 epochs at lr 1e-3: ~80% test top-1 from the last layer.
    // An untrained network scores ~10%; a wrong gradient sign, scale or mask does not get past ~20%.
    let cfg = mnist_6000();
    let out = common::temp_dir("learns");
    let s = run::train(&cfg, &out, RunStart::Fresh, RunOptions { quiet: true, ..Default::default() }).unwrap().unwrap();
    let get = |name: &str| s.test.iter().find(|r| r.strategy == name).unwrap().clone();
    assert!(get("last").top1 > 0.70, "last-layer test top-1 {}", get("last").top1);
    assert!(get("best").top1 > 0.70, "best-layer test top-1 {}", get("best").top1);
    assert!(get("fusion").top1 > 0.25, "fusion test top-1 {}", get("fusion").top1);
    assert!(get("last").top5 > 0.95);
    // The run folder holds what the README promises.
    for f in ["config.json", "metrics.jsonl", "best.safetensors", "last.safetensors", "summary.json", "curves.svg"] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 3);
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    assert_eq!(last["epoch"], 3);
    assert_eq!(last["train_layer_acc"].as_array().unwrap().len(), 7);
    let svg = std::fs::read_to_string(out.join("curves.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("layer 7") && svg.contains("fusion"));
}

#[test]
fn fp16_emulation_trains_like_fp32() {
    // The fp16 path's numerics (operands stored in fp16, dL/dz scaled, f32 sums and master weights), emulated
    // on the CPU where the GPU rounds, must reach the fp32 run's accuracy: same data, seed and schedule as
    // short_mnist_run_learns, both precisions; the test top-1 of the last and best layers within 2 points.
    let cfg = mnist_6000();
    let quiet = RunOptions { quiet: true, ..Default::default() };
    let out = common::temp_dir("fp16");
    let s32 = run::train(&cfg, &out.join("fp32"), RunStart::Fresh, quiet).unwrap().unwrap();
    let cfg16 = TrainConfig { precision: asge::backend::Precision::F16, ..cfg };
    let s16 = run::train(&cfg16, &out.join("fp16"), RunStart::Fresh, quiet).unwrap().unwrap();
    let top1 = |s: &run::Summary, name: &str| s.test.iter().find(|r| r.strategy == name).unwrap().top1;
    for name in ["last", "best"] {
        let (a, b) = (top1(&s32, name), top1(&s16, name));
        eprintln!("{name}: fp32 {a:.4} fp16 {b:.4}");
        assert!(b > 0.70 && (a - b).abs() <= 0.02, "{name} top-1: fp32 {a}, fp16 {b}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("fp16/config.json")).unwrap()).unwrap();
    assert_eq!(config["train"]["precision"], "fp16", "the run config records the precision (resume keeps it)");
}

#[test]
fn seeded_runs_repeat_and_resume_exactly() {
    let (cfg, a) = tiny("straight");
    let quiet = RunOptions { quiet: true, ..Default::default() };
    run::train(&cfg, &a, RunStart::Fresh, quiet).unwrap();
    // Same seed again: the same bits.
    let (_, a2) = tiny("straight-again");
    run::train(&cfg, &a2, RunStart::Fresh, quiet).unwrap();
    assert_eq!(tensors(&a.join("last.safetensors")), tensors(&a2.join("last.safetensors")));
    // Interrupted after epoch 1, resumed: the same bits as the straight run.
    let (_, b) = tiny("resumed");
    let stopped =
        run::train(&cfg, &b, RunStart::Fresh, RunOptions { quiet: true, stop_after: Some(1), ..Default::default() })
            .unwrap();
    assert!(stopped.is_none());
    assert_ne!(tensors(&a.join("last.safetensors")), tensors(&b.join("last.safetensors")));
    let cfg_b = run::load_run_config(&b).unwrap();
    run::train(&cfg_b, &b, RunStart::Resume, quiet).unwrap();
    assert_eq!(tensors(&a.join("last.safetensors")), tensors(&b.join("last.safetensors")));
    let lines = |d: &Path| std::fs::read_to_string(d.join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(lines(&b), 2);
    // Interrupted mid-epoch (steps 5 and 11 of 16; periodic checkpoints every 3 steps in between), resumed twice:
    // the same bits, and the same metrics (but for the timings).
    let (_, m) = tiny("mid-epoch");
    let stop =
        |step| RunOptions { quiet: true, stop_at_step: Some(step), checkpoint_every: Some(3), ..Default::default() };
    assert!(run::train(&cfg, &m, RunStart::Fresh, stop(5)).unwrap().is_none());
    assert!(run::train(&cfg, &m, RunStart::Resume, stop(11)).unwrap().is_none());
    let state = checkpoint::load(&m.join("last.safetensors")).unwrap().state.unwrap();
    assert_eq!((state.epochs_done, state.batches_done, state.step), (1, 3, 11));
    run::train(&cfg, &m, RunStart::Resume, quiet).unwrap();
    assert_eq!(tensors(&a.join("last.safetensors")), tensors(&m.join("last.safetensors")));
    let metrics = |d: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().retain(|k, _| k != "seconds" && k != "images_per_s" && k != "wall_time");
                v
            })
            .collect()
    };
    assert_eq!(metrics(&a), metrics(&m));
    // Another seed draws other weights.
    let (mut cfg_c, c) = tiny("other-seed");
    cfg_c.seed = 7;
    cfg_c.augment = AugmentChoice::None;
    run::train(&cfg_c, &c, RunStart::Fresh, quiet).unwrap();
    assert_ne!(tensors(&a.join("last.safetensors")), tensors(&c.join("last.safetensors")));
}

#[test]
fn checkpoint_round_trip_and_shape_errors() {
    let spec = model::resolve("vgg8", 1, 32, 10, &ModelOptions { width: 0.125, ..Default::default() }).unwrap();
    let p = Params::init(&spec, 3);
    let dir = common::temp_dir("ckpt");
    let path = dir.join("p.safetensors");
    checkpoint::save_params(&path, &spec, &p).unwrap();
    let ck = checkpoint::load(&path).unwrap();
    assert_eq!(ck.spec.as_ref(), Some(&spec));
    assert_eq!(ck.params_for(&path, &spec).unwrap(), p);
    // The layout is PyTorch's.
    assert_eq!(ck.params["layers.1.conv.weight"].0, vec![32, 16, 3, 3]);
    assert_eq!(ck.params["layers.0.proj.weight"].0, vec![256, 10]);
    assert_eq!(ck.params["heads.1.weight"].0, vec![10, 32]);
    assert!(!ck.params.contains_key("heads.0.weight"));
    // A model of another width does not fit: the error names the file and the tensor.
    let wide = model::resolve("vgg8", 1, 32, 10, &ModelOptions { width: 0.25, ..Default::default() }).unwrap();
    let e = ck.params_for(&path, &wide).unwrap_err().to_string();
    assert!(e.contains("p.safetensors") && e.contains("layers.0.conv.weight") && e.contains("shape"), "{e}");
    // The fixture (written by PyTorch) loads into the same spec.
    let fx = common::fixture("vgg8-w0.125-mnist/init.safetensors");
    checkpoint::load(&fx).unwrap().params_for(&fx, &spec).unwrap();
    // Not a safetensors file.
    std::fs::write(dir.join("junk.safetensors"), b"hello").unwrap();
    assert!(checkpoint::load(&dir.join("junk.safetensors")).is_err());
}

#[test]
fn vgg11_on_cifar10_with_augmentation_runs() {
    let cfg = TrainConfig {
        dataset: DatasetKind::Cifar10,
        data: common::data_dir().join("cifar10"),
        model: "vgg11".into(),
        width: 0.125,
        epochs: 1,
        batch: 32,
        limit_train: Some(320),
        limit_test: Some(64),
        ..Default::default()
    };
    let out = common::temp_dir("vgg11");
    let s = run::train(&cfg, &out, RunStart::Fresh, RunOptions { quiet: true, ..Default::default() }).unwrap().unwrap();
    assert_eq!(s.test_layer_top1.len(), 10);
    assert_eq!(s.test_images, 64);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    // The released CIFAR split keeps a tenth for validation.
    assert_eq!(config["train"]["val"], 32);
    assert_eq!(config["model"]["layers"].as_array().unwrap().len(), 10);
}

#[test]
fn the_concurrent_lanes_schedule_equals_the_sequential_one() {
    // The buffer layout and op order the trainer uses when a backend has several lanes (CUDA streams: one per
    // layer, double-buffered activations, each layer's output issued before its update), run here on the CPU,
    // must give exactly the sequential schedule's numbers.
    use asge::backend::cpu::CpuBackend;
    use asge::rng::Rng;
    use asge::train::{AdamW, Net};
    let spec = model::resolve("vgg8", 1, 32, 10, &ModelOptions { width: 0.125, ..Default::default() }).unwrap();
    let params = Params::init(&spec, 11);
    let run = |be: CpuBackend| {
        let mut net = Net::new(be, spec.clone(), &params, AdamW::default(), 32).unwrap();
        let mut losses = Vec::new();
        let mut r = Rng::new(3);
        for step in 1..=3u64 {
            let x: Vec<f32> = (0..32 * 32 * 32).map(|_| r.normal().abs() as f32).collect();
            let labels: Vec<u32> = (0..32).map(|i| (i + step as u32) % 10).collect();
            let s = net.train_step(&x, &labels, 1e-3, step, Some((0.1, step))).unwrap();
            losses.push((s.layer_loss, s.head_loss));
        }
        let x: Vec<f32> = (0..7 * 32 * 32).map(|_| r.normal().abs() as f32).collect();
        let eval = net.eval_logits(&x, &[1, 2, 3, 4, 5, 6, 7]).unwrap();
        (losses, net.params().unwrap(), eval.layers, eval.fusion)
    };
    let sequential = run(CpuBackend::new());
    let lanes = run(CpuBackend::with_lanes(4));
    assert_eq!(sequential.0, lanes.0, "losses");
    assert_eq!(sequential.1, lanes.1, "weights after three steps");
    assert_eq!((sequential.2, sequential.3), (lanes.2, lanes.3), "evaluation logits");
}

#[test]
fn pipelined_steps_report_the_same_statistics_one_call_later() {
    // train_step_pipelined returns the previous step's statistics (a GPU runs step t while the host reads step
    // t - 1's); the numbers, the weights and an evaluation in between must be exactly train_step's.
    use asge::backend::cpu::CpuBackend;
    use asge::rng::Rng;
    use asge::train::{AdamW, Net};
    let spec = model::resolve("vgg8", 1, 32, 10, &ModelOptions { width: 0.125, ..Default::default() }).unwrap();
    let params = Params::init(&spec, 5);
    let mut r = Rng::new(9);
    let batches: Vec<(Vec<f32>, Vec<u32>)> = (0..3u32)
        .map(|t| {
            ((0..16 * 32 * 32).map(|_| r.normal().abs() as f32).collect(), (0..16).map(|i| (i + t) % 10).collect())
        })
        .collect();
    let x_eval: Vec<f32> = (0..5 * 32 * 32).map(|_| r.normal().abs() as f32).collect();
    let labels_eval = [0, 1, 2, 3, 4];

    let mut net = Net::new(CpuBackend::new(), spec.clone(), &params, AdamW::default(), 16).unwrap();
    let mut direct = Vec::new();
    for (t, (x, l)) in batches.iter().enumerate() {
        let step = t as u64 + 1;
        direct.push(net.train_step(x, l, 1e-3, step, Some((0.1, step))).unwrap());
        if step == 2 {
            net.eval_logits(&x_eval, &labels_eval).unwrap();
        }
    }
    let direct_eval = net.eval_logits(&x_eval, &labels_eval).unwrap().fusion;

    let mut net = Net::new(CpuBackend::new(), spec, &params, AdamW::default(), 16).unwrap();
    let mut piped = Vec::new();
    for (t, (x, l)) in batches.iter().enumerate() {
        let step = t as u64 + 1;
        let earlier = net.train_step_pipelined(x, l, 1e-3, step, Some((0.1, step))).unwrap();
        assert_eq!(earlier.is_none(), step == 1, "step {step} returns the previous step's statistics");
        piped.extend(earlier);
        if step == 2 {
            // An evaluation while step 2's statistics are pending writes the other set of slots.
            net.eval_logits(&x_eval, &labels_eval).unwrap();
        }
    }
    let err = net.train_step(&batches[0].0, &batches[0].1, 1e-3, 4, None).unwrap_err();
    assert!(format!("{err:#}").contains("flush_stats"), "{err:#}");
    piped.extend(net.flush_stats().unwrap());
    assert!(net.flush_stats().unwrap().is_none(), "nothing pending after a flush");
    assert_eq!(piped, direct, "statistics");
    assert_eq!(piped.iter().map(|s| s.step).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(net.eval_logits(&x_eval, &labels_eval).unwrap().fusion, direct_eval, "weights after the steps");
}

#[test]
fn early_stop_ends_a_run_whose_validation_stalls_and_keeps_counting_across_a_resume() {
    // An lr so small that no prediction changes: epoch 1 sets the best validation accuracy, and no later epoch
    // beats it (only a strictly better one counts). With a patience of 2 the run ends after epoch 3 of 6, even
    // when it is stopped after epoch 2 and resumed (a count that restarted on resume would train epochs 3 and 4).
    let (mut cfg, out) = tiny("early-stop");
    cfg.epochs = 6;
    cfg.lr = 1e-12;
    cfg.lr_min = 0.0;
    cfg.early_stop = Some(2);
    let quiet = RunOptions { quiet: true, ..Default::default() };
    let stopped = run::train(&cfg, &out, RunStart::Fresh, RunOptions { stop_after: Some(2), ..quiet }).unwrap();
    assert!(stopped.is_none(), "stopped after epoch 2, before the test");
    let s = run::train(&cfg, &out, RunStart::Resume, quiet).unwrap().expect("the test ran");
    assert_eq!((s.stopped_early, s.best_epoch, s.epochs), (Some(3), 1, 6));
    let epochs = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(epochs, 3, "epochs trained");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["stopped_early"], 3);
    // Without validation there is nothing to watch.
    let (mut none, out2) = tiny("early-stop-noval");
    none.early_stop = Some(2);
    none.val = Some(0);
    let e = format!("{:#}", run::train(&none, &out2, RunStart::Fresh, quiet).unwrap_err());
    assert!(e.contains("--early-stop needs a validation set"), "{e}");
}

#[test]
fn every_step_is_logged_with_the_lr_it_trained_with() {
    // With the lr moving every step (--lr-schedule step, --warmup-epochs), steps.jsonl's and TensorBoard's lr is
    // the step's own, though a step's statistics arrive a step later (a layer pipeline's, ranks steps later).
    let (mut cfg, out) = tiny("step-lr");
    cfg.lr_schedule = asge::train::config::LrSchedule::Step;
    cfg.warmup_epochs = 1.0;
    let opts = RunOptions { quiet: true, log_steps: true, ..Default::default() };
    run::train(&cfg, &out, RunStart::Fresh, opts).unwrap();
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(out.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let per_epoch = (640 - 128usize).div_ceil(64);
    assert_eq!(rows.len(), 2 * per_epoch);
    for (i, r) in rows.iter().enumerate() {
        let want = asge::train::schedule::lr_at(&cfg, i / per_epoch, i % per_epoch, per_epoch);
        assert_eq!((r["step"].as_u64().unwrap(), r["lr"].as_f64().unwrap()), (i as u64 + 1, want), "row {i}");
    }
}
