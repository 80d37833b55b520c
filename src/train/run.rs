//! The run loop: data, model, epochs with validation and checkpoints, the final test evaluation, and the
//! run folder (`config.json`, `metrics.jsonl`, `best.safetensors`, `last.safetensors`, `summary.json`).

use super::checkpoint::{self, TrainState};
use super::net::{AdamW, Net};
use super::schedule::cosine_lr;
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, Precision};
use crate::data::augment::Augment;
use crate::data::loader::Prefetch;
use crate::data::shard::ShardSet;
use crate::data::{self, DatasetKind, ImageSource};
use crate::eval::{self, EvalResult, Strategy, StrategyResult};
use crate::model::{self, GoodnessReduce, ModelOptions, ModelSpec, Params, PoolKind};
use crate::rng::{self, Rng};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// `--augment`: the dataset's released-recipe augmentation, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AugmentChoice {
    Default,
    None,
}

/// Everything that defines a run; saved as `config.json` and in every checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainConfig {
    pub dataset: DatasetKind,
    pub data: PathBuf,
    pub model: String,
    pub width: f64,
    pub alpha: f64,
    pub goodness: GoodnessReduce,
    pub pool: PoolKind,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub lr_min: f64,
    pub weight_decay: f64,
    pub dropout: f32,
    pub seed: u64,
    /// Validation images taken from the training file; `None`: the released split's share.
    pub val: Option<usize>,
    pub shuffle: bool,
    pub augment: AugmentChoice,
    pub limit_train: Option<usize>,
    pub limit_test: Option<usize>,
    pub init: Option<PathBuf>,
    pub device: String,
    /// Training and evaluation image side for `--dataset imagenet` (default: the shards' size).
    #[serde(default)]
    pub image_size: Option<usize>,
    /// Storage precision of the conv operands (fp16: the tensor-core path; on the CPU, its emulation).
    #[serde(default)]
    pub precision: Precision,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            dataset: DatasetKind::Mnist,
            data: PathBuf::from("data"),
            model: "vgg8".into(),
            width: 1.0,
            alpha: 1.0,
            goodness: GoodnessReduce::Mean,
            pool: PoolKind::Avg,
            epochs: 100,
            batch: 128,
            lr: 2e-4,
            lr_min: 1e-5,
            weight_decay: 1e-3,
            dropout: 0.1,
            seed: 42,
            val: None,
            shuffle: true,
            augment: AugmentChoice::Default,
            limit_train: None,
            limit_test: None,
            init: None,
            device: "cpu".into(),
            image_size: None,
            precision: Precision::F32,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 {
            bail!("--batch 0: the batch needs at least one image");
        }
        if !(0.0..1.0).contains(&self.dropout) {
            bail!("--dropout {}: must be in [0, 1)", self.dropout);
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            bail!("--lr {}: must be a positive number", self.lr);
        }
        if !(self.lr_min.is_finite() && self.lr_min >= 0.0) {
            bail!("--lr-min {}: must be a non-negative number", self.lr_min);
        }
        Ok(())
    }

    fn augmentation(&self, input_size: usize) -> Augment {
        match (self.augment, self.dataset) {
            (AugmentChoice::Default, DatasetKind::Imagenet) => Augment::ResizedCrop(input_size),
            (_, DatasetKind::Imagenet) => Augment::CenterCrop(input_size),
            (AugmentChoice::None, _) => Augment::None,
            (_, DatasetKind::FashionMnist) => Augment::Flip,
            (_, DatasetKind::Cifar10 | DatasetKind::Cifar100) => Augment::Cifar,
            _ => Augment::None,
        }
    }

    fn model_options(&self) -> ModelOptions {
        ModelOptions { width: self.width, alpha: self.alpha, goodness: self.goodness, pool_kind: self.pool }
    }
}

/// Stream labels for the run's random draws.
const SHUFFLE: u64 = 1;
const AUGMENT: u64 = 2;
const DROPOUT: u64 = 3;
const VAL_AUGMENT: u64 = 4;

/// Per-epoch metrics, one JSON line in `metrics.jsonl`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub lr: f64,
    pub train_layer_loss: Vec<f64>,
    pub train_layer_acc: Vec<f64>,
    pub train_fusion_loss: f64,
    pub train_fusion_acc: f64,
    pub val_layer_acc: Option<Vec<f64>>,
    pub val_fusion_acc: Option<f64>,
    pub images_per_s: f64,
    pub seconds: f64,
}

/// `summary.json`: the test result of the best checkpoint.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    pub dataset: String,
    pub model: String,
    pub params_trainable: usize,
    pub epochs: usize,
    pub best_epoch: usize,
    pub best_val: Option<f64>,
    pub test: Vec<StrategyResult>,
    pub test_layer_top1: Vec<f64>,
    pub test_images: usize,
    pub train_seconds: f64,
    pub train_images_per_s: f64,
}

/// Set by Ctrl-C / SIGTERM (see [`install_interrupt_handler`]): the run stops after the current step with a
/// mid-epoch checkpoint.
static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Makes Ctrl-C and SIGTERM stop a training run cleanly after its current step, checkpointed (a second
/// Ctrl-C exits at once).
pub fn install_interrupt_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\nasge: interrupted; finishing this step and writing a checkpoint (Ctrl-C again to quit now)");
    })
    .context("cannot install the Ctrl-C handler")
}

/// True once Ctrl-C or SIGTERM arrived.
pub fn was_interrupted() -> bool {
    INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst)
}

/// Options that do not change the numbers.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    pub quiet: bool,
    /// Stop (with a checkpoint, before the test evaluation) once this many epochs of the schedule are done;
    /// `--resume` continues. One epoch of a 100-epoch schedule is `--epochs 100 --stop-after 1`.
    pub stop_after: Option<usize>,
    /// Also write `last.safetensors` every this many steps inside an epoch, so that an interrupted run resumes
    /// from the last such step instead of the last epoch (long ImageNet epochs).
    pub checkpoint_every: Option<u64>,
    /// Stop with a mid-epoch checkpoint once this many steps are done (tests the resume; not a CLI option).
    pub stop_at_step: Option<u64>,
}

fn say(opts: RunOptions, msg: impl AsRef<str>) {
    if !opts.quiet {
        eprintln!("{}", msg.as_ref());
    }
}

/// Which backend a `--device` names.
/// A `--device` value.
pub enum Device {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(usize),
}

/// Parses `--device`: `cpu`, `cuda` or `cuda:N` (a clear error for anything else, or for cuda in a build
/// without the CUDA backend).
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        d if d == "cuda" || d.starts_with("cuda:") => {
            #[cfg(feature = "cuda")]
            return Ok(Device::Cuda(crate::backend::cuda::parse_device(d)?));
            #[cfg(not(feature = "cuda"))]
            bail!("--device {d}: this build has no CUDA backend (build with the `cuda` feature)")
        }
        d => bail!("--device {d}: unknown device (expected cpu, cuda or cuda:N)"),
    }
}

/// Calls `$body` with `$be` bound to a maker of the backend `--device` names, in `precision` (the trainer is
/// generic over backends).
macro_rules! with_backend {
    ($device:expr, $precision:expr, |$be:ident| $body:expr) => {
        match device($device)? {
            Device::Cpu => {
                let $be = || -> Result<CpuBackend> { Ok(CpuBackend::new().with_precision($precision)) };
                $body
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => {
                let $be = || crate::backend::cuda::CudaBackend::new(n).map(|b| b.with_precision($precision));
                $body
            }
        }
    };
}

/// A run's data: the training and test sources, the input side the model sees, and the evaluation transform.
pub struct Sources {
    pub train: Arc<dyn ImageSource>,
    pub test: Arc<dyn ImageSource>,
    pub input_size: usize,
    pub eval_aug: Augment,
}

/// Opens `--dataset imagenet`'s shard folders: `DIR/train` and `DIR/val` (or `DIR/test`).
fn open_shards(dir: &Path) -> Result<(Arc<ShardSet>, Arc<ShardSet>)> {
    let train =
        ShardSet::open(&dir.join("train")).with_context(|| format!("--data {}: the training shards", dir.display()))?;
    let test_dir =
        ["val", "test"].iter().map(|d| dir.join(d)).find(|d| d.join("index.json").is_file()).with_context(|| {
            format!(
                "--data {}: no val/ or test/ shard folder beside train/ (asge shard --input VAL_DIR --out {}/val)",
                dir.display(),
                dir.display()
            )
        })?;
    let test = ShardSet::open(&test_dir)?;
    if test.index.classes != train.index.classes {
        bail!("{}: its classes differ from {}'s", test_dir.display(), dir.join("train").display());
    }
    Ok((Arc::new(train), Arc::new(test)))
}

/// Loads the data and resolves the model of a config.
pub fn prepare(cfg: &TrainConfig) -> Result<(Sources, ModelSpec)> {
    cfg.validate()?;
    let sources = if cfg.dataset == DatasetKind::Imagenet {
        let (train, test) = open_shards(&cfg.data)?;
        let t = cfg.image_size.unwrap_or(train.size());
        if t == 0 {
            bail!("--image-size 0: images need at least one pixel");
        }
        let train: Arc<dyn ImageSource> = train;
        let test: Arc<dyn ImageSource> = test;
        Sources { train, test, input_size: t, eval_aug: Augment::CenterCrop(t) }
    } else {
        if cfg.image_size.is_some_and(|s| s != data::IMAGE_SIZE) {
            bail!("--image-size: only --dataset imagenet takes another size; {} is 32x32", cfg.dataset.name());
        }
        let splits = data::load(cfg.dataset, &cfg.data, cfg.limit_train, cfg.limit_test)?;
        let size = splits.train.size;
        Sources {
            train: Arc::new(splits.train),
            test: Arc::new(splits.test),
            input_size: size,
            eval_aug: Augment::None,
        }
    };
    if sources.train.is_empty() {
        bail!("--data {}: the training set is empty (--limit-train 0?)", cfg.data.display());
    }
    let t = &sources.train;
    let spec = model::resolve(&cfg.model, t.channels(), sources.input_size, t.classes(), &cfg.model_options())?;
    Ok((sources, spec))
}

/// Trains a fresh run (or resumes one when `resume` is set) in `out`, then evaluates the best checkpoint on
/// the test set. Returns the summary that is also written to `out/summary.json` (none when `stop_after` ended
/// the run early).
pub fn train(cfg: &TrainConfig, out: &Path, resume: bool, opts: RunOptions) -> Result<Option<Summary>> {
    with_backend!(&cfg.device, cfg.precision, |make| train_on(cfg, out, resume, opts, make))
}

fn train_on<B: Backend>(
    cfg: &TrainConfig,
    out: &Path,
    resume: bool,
    opts: RunOptions,
    make_backend: impl Fn() -> Result<B>,
) -> Result<Option<Summary>> {
    let be = make_backend()?;
    let (sources, spec) = prepare(cfg)?;
    std::fs::create_dir_all(out).with_context(|| format!("--out {}: cannot create the run folder", out.display()))?;
    let last_path = out.join("last.safetensors");
    let best_path = out.join("best.safetensors");
    let adamw = AdamW { weight_decay: cfg.weight_decay, ..AdamW::default() };

    let (params, mut state, ckpt) = if resume {
        let ck = checkpoint::load(&last_path).context("--resume: the run has no usable last.safetensors")?;
        let state =
            ck.state.clone().with_context(|| format!("{}: no training state in the metadata", last_path.display()))?;
        (ck.params_for(&last_path, &spec)?, state, Some(ck))
    } else if let Some(init) = &cfg.init {
        let ck = checkpoint::load(init).with_context(|| format!("--init {}", init.display()))?;
        (ck.params_for(init, &spec)?, TrainState::default(), None)
    } else {
        (Params::init(&spec, cfg.seed), TrainState::default(), None)
    };
    let mut net = Net::new(be, spec.clone(), &params, adamw, cfg.batch)?;
    if let Some(ck) = &ckpt {
        ck.restore_optimizer(&last_path, &mut net)?;
    }

    let train_data = sources.train.clone();
    // The in-memory readers applied the limits already; the shards apply them here (the first N records).
    let n = train_data.len().min(cfg.limit_train.unwrap_or(usize::MAX));
    let n_test = sources.test.len().min(cfg.limit_test.unwrap_or(usize::MAX));
    let val = cfg.val.unwrap_or_else(|| (n as f64 * cfg.dataset.default_val_fraction()).round() as usize);
    let (train_idx, val_idx) = data::split(n, val, cfg.seed)?;
    let mut resolved = cfg.clone();
    resolved.val = Some(val);
    let config_json = serde_json::json!({ "train": resolved, "model": spec });
    if !resume {
        checkpoint::write_atomic(&out.join("config.json"), serde_json::to_string_pretty(&config_json)?.as_bytes())?;
        std::fs::write(out.join("metrics.jsonl"), b"")
            .with_context(|| format!("{}: cannot write metrics", out.display()))?;
    } else {
        truncate_metrics(&out.join("metrics.jsonl"), state.epochs_done)?;
    }
    say(
        opts,
        format!(
            "asge: {} on {} ({} train / {} val / {} test), {} layers, {:.2}M trainable params, {} epochs, batch {}, {}",
            spec.arch,
            cfg.dataset.name(),
            train_idx.len(),
            val_idx.len(),
            n_test,
            spec.layers.len(),
            (spec.conv_params() + spec.head_params()) as f64 / 1e6,
            cfg.epochs,
            cfg.batch,
            net.backend().name()
        ),
    );
    if resume {
        say(opts, format!("asge: resuming after epoch {} (step {})", state.epochs_done, state.step));
    }

    let aug = cfg.augmentation(sources.input_size);
    // Validation images get the training augmentation, as in the released code, except on ImageNet shards,
    // where validation is the evaluation transform.
    let val_aug = if cfg.dataset == DatasetKind::Imagenet { sources.eval_aug } else { aug };
    let mut train_seconds = 0.0;
    let mut train_images = 0usize;
    let end = opts.stop_after.map_or(cfg.epochs, |n| n.min(cfg.epochs));
    for epoch in state.epochs_done..end {
        let lr = cosine_lr(cfg.lr, cfg.lr_min, epoch, cfg.epochs);
        let mut order = train_idx.clone();
        if cfg.shuffle {
            Rng::new(rng::derive(rng::derive(cfg.seed, SHUFFLE), epoch as u64)).shuffle(&mut order);
        }
        let n_batches = order.len().div_ceil(cfg.batch);
        // A mid-epoch checkpoint resumes at its batch, with the epoch's sums so far.
        let skip = state.batches_done.min(n_batches);
        let mut sums = match (skip, state.partial_epoch.take()) {
            (1.., Some(v)) => serde_json::from_value(v).context("the checkpoint's partial-epoch metrics")?,
            _ => EpochSums::new(spec.layers.len()),
        };
        let pb = progress(opts, n_batches as u64, format!("epoch {}/{}", epoch + 1, cfg.epochs));
        pb.set_position(skip as u64);
        let t0 = Instant::now();
        let seconds_before = sums.seconds;
        let aug_key = rng::derive(rng::derive(cfg.seed, AUGMENT), epoch as u64);
        let start = skip * cfg.batch;
        let rest = order[start.min(order.len())..].to_vec();
        // A step's statistics arrive with the next step (train_step_pipelined: the host queues step t + 1 while the
        // device runs step t), and are flushed before anything that must count every step (a checkpoint, the end
        // of the epoch).
        let add = |sums: &mut EpochSums, s: Option<super::StepStats>| -> Result<()> {
            if let Some(s) = s {
                if !s.layer_loss.iter().all(|l| l.is_finite()) || !s.head_loss.is_finite() {
                    bail!("epoch {}: the loss became non-finite at step {} ({:?})", epoch + 1, s.step, s.layer_loss);
                }
                sums.add(&s);
            }
            Ok(())
        };
        for batch in Prefetch::new(train_data.clone(), rest, start, cfg.batch, aug, aug_key, 3) {
            state.step += 1;
            let drop_key = rng::derive(rng::derive(cfg.seed, DROPOUT), state.step);
            let s = net.train_step_pipelined(&batch.x, &batch.labels, lr, state.step, Some((cfg.dropout, drop_key)))?;
            add(&mut sums, s)?;
            state.batches_done += 1;
            pb.inc(1);
            let periodic = opts.checkpoint_every.is_some_and(|k| k > 0 && state.step % k == 0);
            let interrupted = INTERRUPTED.load(std::sync::atomic::Ordering::SeqCst);
            let stop = opts.stop_at_step == Some(state.step) || interrupted;
            if (periodic || stop) && state.batches_done < n_batches {
                add(&mut sums, net.flush_stats()?)?;
                sums.seconds = seconds_before + t0.elapsed().as_secs_f64();
                state.partial_epoch = Some(serde_json::to_value(&sums)?);
                checkpoint::save(&last_path, &net, &state, &config_json)?;
                state.partial_epoch = None;
                if stop {
                    pb.finish_and_clear();
                    say(
                        opts,
                        format!("asge: stopped at step {}; continue with --resume {}", state.step, out.display()),
                    );
                    return Ok(None);
                }
            }
            if sums.images > 0 {
                pb.set_message(format!(
                    "{:.0} img/s  loss {:.3}  acc L{} {:.2}%  fusion {:.2}%",
                    sums.images as f64 / t0.elapsed().as_secs_f64(),
                    sums.layer_loss.last().unwrap() / sums.images as f64,
                    spec.layers.len(),
                    100.0 * *sums.layer_correct.last().unwrap() as f64 / sums.images as f64,
                    100.0 * sums.head_correct as f64 / sums.images as f64
                ));
            }
        }
        add(&mut sums, net.flush_stats()?)?;
        pb.finish_and_clear();
        state.batches_done = 0;
        let seconds = seconds_before + t0.elapsed().as_secs_f64();
        train_seconds += seconds;
        train_images += sums.images;
        let val_res = if val_idx.is_empty() {
            None
        } else {
            let key = rng::derive(rng::derive(cfg.seed, VAL_AUGMENT), epoch as u64);
            Some(eval::evaluate(&mut net, &train_data, val_idx.clone(), val_aug, key)?)
        };
        let m = sums.metrics(epoch + 1, lr, seconds, val_res.as_ref());
        append_metrics(&out.join("metrics.jsonl"), &m)?;
        write_curves(out, &format!("{} on {}", spec.arch, cfg.dataset.name()))?;
        say(opts, epoch_line(&m));

        // Model selection: best validation accuracy of the fusion prediction (released code); without
        // validation, the latest epoch.
        let score = val_res.as_ref().map(|r| r.fusion.top1_acc());
        let improved = match (score, state.best_val) {
            (Some(s), Some(b)) => s > b,
            _ => true,
        };
        state.epochs_done = epoch + 1;
        if improved {
            let layer_acc = val_res.as_ref().map(EvalResult::layer_acc).unwrap_or_else(|| m.train_layer_acc.clone());
            state.best_val = score;
            state.best_epoch = epoch + 1;
            state.best_layer = eval::argmax(&layer_acc);
            state.best_layer_acc = layer_acc;
            checkpoint::save(&best_path, &net, &state, &config_json)?;
        }
        checkpoint::save(&last_path, &net, &state, &config_json)?;
        if crate::trace::is_on() {
            crate::trace::add_device_spans(&net.backend().take_device_spans()?);
        }
        crate::trace::flush(spec.layers.len())?;
    }

    if end < cfg.epochs {
        say(
            opts,
            format!("asge: stopped after epoch {end} of {}; continue with --resume {}", cfg.epochs, out.display()),
        );
        return Ok(None);
    }

    // Test: reload the best checkpoint.
    let best = checkpoint::load(&best_path).context("the run has no best.safetensors")?;
    let best_state = best.state.clone().unwrap_or_default();
    let params = best.params_for(&best_path, &spec)?;
    drop(net);
    let mut net = Net::new(make_backend()?, spec.clone(), &params, adamw, cfg.batch)?;
    let test = sources.test.clone();
    let res = eval::evaluate(&mut net, &test, (0..n_test).collect(), sources.eval_aug, 0)?;
    let rows = eval::strategies(&res, Strategy::All, best_state.best_layer);
    let title = format!("test ({n_test} images), best epoch {} of {}", best_state.best_epoch, cfg.epochs);
    println!("{}", eval::format_table(&title, &rows, &res));
    let summary = Summary {
        dataset: cfg.dataset.name().into(),
        model: spec.arch.clone(),
        params_trainable: spec.conv_params() + spec.head_params(),
        epochs: cfg.epochs,
        best_epoch: best_state.best_epoch,
        best_val: best_state.best_val,
        test: rows,
        test_layer_top1: res.layer_acc(),
        test_images: n_test,
        train_seconds,
        train_images_per_s: if train_seconds > 0.0 { train_images as f64 / train_seconds } else { 0.0 },
    };
    checkpoint::write_atomic(&out.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    Ok(Some(summary))
}

/// Reads a run folder's config for `--resume`.
pub fn load_run_config(dir: &Path) -> Result<TrainConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("--resume {}: no config.json", dir.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    serde_json::from_value(v.get("train").cloned().unwrap_or_default())
        .with_context(|| format!("{}: not an asge run config", path.display()))
}

fn progress(opts: RunOptions, len: u64, prefix: String) -> ProgressBar {
    if opts.quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {elapsed_precise} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    pb.set_prefix(prefix);
    pb
}

#[derive(Serialize, Deserialize)]
struct EpochSums {
    images: usize,
    layer_loss: Vec<f64>,
    layer_correct: Vec<usize>,
    head_loss: f64,
    head_correct: usize,
    /// Training seconds of the epoch's earlier part (before a resume).
    #[serde(default)]
    seconds: f64,
}

impl EpochSums {
    fn new(layers: usize) -> Self {
        EpochSums {
            images: 0,
            layer_loss: vec![0.0; layers],
            layer_correct: vec![0; layers],
            head_loss: 0.0,
            head_correct: 0,
            seconds: 0.0,
        }
    }
    fn add(&mut self, s: &super::StepStats) {
        self.images += s.batch;
        for (i, (&l, &c)) in s.layer_loss.iter().zip(&s.layer_correct).enumerate() {
            self.layer_loss[i] += l * s.batch as f64;
            self.layer_correct[i] += c;
        }
        self.head_loss += s.head_loss * s.batch as f64;
        self.head_correct += s.head_correct;
    }
    fn metrics(&self, epoch: usize, lr: f64, seconds: f64, val: Option<&EvalResult>) -> EpochMetrics {
        let n = self.images.max(1) as f64;
        EpochMetrics {
            epoch,
            lr,
            train_layer_loss: self.layer_loss.iter().map(|l| l / n).collect(),
            train_layer_acc: self.layer_correct.iter().map(|&c| c as f64 / n).collect(),
            train_fusion_loss: self.head_loss / n,
            train_fusion_acc: self.head_correct as f64 / n,
            val_layer_acc: val.map(EvalResult::layer_acc),
            val_fusion_acc: val.map(|v| v.fusion.top1_acc()),
            images_per_s: self.images as f64 / seconds,
            seconds,
        }
    }
}

fn epoch_line(m: &EpochMetrics) -> String {
    let pct = |v: &[f64]| v.iter().map(|a| format!("{:.1}", 100.0 * a)).collect::<Vec<_>>().join(" ");
    let mut s = format!(
        "epoch {:>3}  lr {:.3e}  {:.0} img/s  {:.1}s  train acc [{}] fusion {:.2}%",
        m.epoch,
        m.lr,
        m.images_per_s,
        m.seconds,
        pct(&m.train_layer_acc),
        100.0 * m.train_fusion_acc
    );
    if let (Some(l), Some(f)) = (&m.val_layer_acc, m.val_fusion_acc) {
        s += &format!("  val [{}] fusion {:.2}%", pct(l), 100.0 * f);
    }
    s
}

fn append_metrics(path: &Path, m: &EpochMetrics) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .with_context(|| format!("{}: cannot append", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(m)?)?;
    f.sync_data()?;
    Ok(())
}

/// Redraws `curves.svg` from `metrics.jsonl`.
fn write_curves(out: &Path, title: &str) -> Result<()> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let metrics: Vec<EpochMetrics> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    checkpoint::write_atomic(&out.join("curves.svg"), super::plot::curves_svg(&metrics, title).as_bytes())
}

/// Drops metric lines of epochs past the checkpoint (an interrupted epoch may have logged before dying).
fn truncate_metrics(path: &Path, epochs_done: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<EpochMetrics>(l).map(|m| m.epoch <= epochs_done).unwrap_or(false))
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    checkpoint::write_atomic(path, body.as_bytes())
}

/// `asge eval`: evaluates a checkpoint on a dataset's test file.
#[allow(clippy::too_many_arguments)]
pub fn eval_checkpoint(
    path: &Path,
    dataset: DatasetKind,
    data_dir: &Path,
    strategy: Strategy,
    batch: usize,
    limit_test: Option<usize>,
    device_name: &str,
    precision: Precision,
) -> Result<(Vec<StrategyResult>, EvalResult, usize)> {
    with_backend!(device_name, precision, |make| {
        eval_on(path, dataset, data_dir, strategy, batch, limit_test, make()?)
    })
}

fn eval_on<B: Backend>(
    path: &Path,
    dataset: DatasetKind,
    data_dir: &Path,
    strategy: Strategy,
    batch: usize,
    limit_test: Option<usize>,
    be: B,
) -> Result<(Vec<StrategyResult>, EvalResult, usize)> {
    let ck = checkpoint::load(path)?;
    let spec = ck.spec.clone().with_context(|| {
        format!("{}: no asge.model metadata (not written by asge); train with --init to use it", path.display())
    })?;
    let (test, eval_aug): (Arc<dyn ImageSource>, Augment) = if dataset == DatasetKind::Imagenet {
        (open_shards(data_dir)?.1, Augment::CenterCrop(spec.image_size))
    } else {
        (Arc::new(data::load(dataset, data_dir, Some(0), limit_test)?.test), Augment::None)
    };
    let n_test = test.len().min(limit_test.unwrap_or(usize::MAX));
    if test.channels() != spec.in_channels || test.classes() != spec.classes {
        bail!(
            "{}: the model takes {} channel(s) and {} classes; --dataset {} has {} and {}",
            path.display(),
            spec.in_channels,
            spec.classes,
            dataset.name(),
            test.channels(),
            test.classes()
        );
    }
    let params = ck.params_for(path, &spec)?;
    let best_layer = ck.state.as_ref().map(|s| s.best_layer).unwrap_or(spec.layers.len() - 1);
    let mut net = Net::new(be, spec, &params, AdamW::default(), batch)?;
    let res = eval::evaluate(&mut net, &test, (0..n_test).collect(), eval_aug, 0)?;
    Ok((eval::strategies(&res, strategy, best_layer), res, n_test))
}
