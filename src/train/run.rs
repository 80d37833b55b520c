//! The run loop: data, model, epochs with validation and checkpoints, the final test evaluation, and the
//! run folder (`config.json`, `metrics.jsonl`, `best.safetensors`, `last.safetensors`, `summary.json`).
//!
//! A [`Run`] goes through [`Run::start`] (options checked, data and model loaded, the run folder locked, the
//! model and optimizer state built or restored), [`Run::epoch`] once per epoch, and [`Run::final_test`]. What it
//! guarantees:
//! - it never reports numbers computed from less data than it claims: a loader failure is an error, and an epoch
//!   that did not see every batch is not counted;
//! - it never trains on or saves non-finite numbers: a NaN or an infinity in a loss stops the run at that step,
//!   naming the layer, and a checkpoint is written only when every weight and moment is finite, so the last good
//!   one stays in place;
//! - it never writes over another run: see [`crate::files::RunFolder`];
//! - it stops cleanly on SIGINT, SIGTERM and SIGHUP (see [`super::interrupt`]), with a checkpoint a resumed run
//!   continues from bit for bit.

use super::checkpoint::{self, TrainState};
use super::interrupt;
use super::metrics::{
    append_line, append_metrics, epoch_line, plot_title, truncate_metrics, truncate_steps, wall_time_now, write_curves,
    EpochSums,
};
use super::net::{ensure_memory, AdamW, Net};
use super::progress::{Display, Progress};
use super::resume::{check_resume, data_identity, load_run_file, resume_point};
use super::schedule::{cosine_lr, lr_at};
use super::sources::{prepare_with, Sources};
use crate::backend::select::with_backend;
use crate::backend::Backend;
use crate::data::loader::Prefetch;
use crate::data::{self, DatasetKind};
use crate::eval::{self, EvalResult, Strategy};
use crate::files::{self, RunFolder, RunStart};
use crate::model::{ModelSpec, Params};
use crate::rng::{self, Rng};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub use super::config::{AugmentChoice, TrainConfig};
pub use super::resume::load_run_config;
pub use super::sources::prepare;

mod start;

/// Stream labels for the run's random draws.
const SHUFFLE: u64 = 1;
const AUGMENT: u64 = 2;
const DROPOUT: u64 = 3;
const VAL_AUGMENT: u64 = 4;

/// `summary.json`: the test result of the best checkpoint (the schema `asge eval` writes too).
pub type Summary = eval::Report;

/// Installs the SIGINT / SIGTERM / SIGHUP handlers that stop a run cleanly (see [`interrupt`]).
pub fn install_interrupt_handler() -> Result<()> {
    interrupt::install()
}

/// True once SIGINT, SIGTERM or SIGHUP arrived.
pub fn was_interrupted() -> bool {
    interrupt::received().is_some()
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
    /// Without a terminal, a progress line at most every this many seconds (`None`: 30; 0: every step).
    pub log_every: Option<f64>,
    /// Write every step's losses and accuracy counts to `steps.jsonl` (`--log-steps`).
    pub log_steps: bool,
    /// TensorBoard points of the training loss per layer and the lr every this many steps (`--tb-every`; `None`:
    /// [`DEFAULT_TB_EVERY`]; 0: none, the per-epoch curves only).
    pub tb_every: Option<u64>,
}

/// `--tb-every`'s default: a point every 50 steps (8 an epoch of 50,000 images at batch 128).
pub const DEFAULT_TB_EVERY: u64 = 50;

impl RunOptions {
    fn display(&self) -> Display {
        Display::detect(self.quiet, self.log_every.unwrap_or(30.0))
    }

    fn validate(&self) -> Result<()> {
        if self.stop_after == Some(0) {
            bail!("--stop-after 0: stops before the first epoch; give at least 1");
        }
        if self.checkpoint_every == Some(0) {
            bail!("--checkpoint-every 0: give a number of steps, at least 1");
        }
        if self.log_every.is_some_and(|s| !(s.is_finite() && s >= 0.0)) {
            bail!("--log-every {}: must be a number of seconds, 0 or more", self.log_every.unwrap_or_default());
        }
        Ok(())
    }
}

fn say(opts: RunOptions, msg: impl AsRef<str>) {
    super::progress::say(opts.quiet, msg)
}

/// Trains a fresh run (or resumes or overwrites one, as `start` says) in `out`, then evaluates the best
/// checkpoint on the test set. Returns the summary that is also written to `out/summary.json` (none when the
/// run stopped early: `--stop-after`, a signal).
pub fn train(cfg: &TrainConfig, out: &Path, start: RunStart, opts: RunOptions) -> Result<Option<Summary>> {
    let result = train_inner(cfg, out, start, opts);
    // A trace going to a device or a pipe is written once, whatever ended the run.
    let traced = crate::trace::finish();
    let summary = result?;
    traced?;
    Ok(summary)
}

fn train_inner(cfg: &TrainConfig, out: &Path, start: RunStart, opts: RunOptions) -> Result<Option<Summary>> {
    with_backend!(&cfg.device, cfg.precision, |make| {
        let mut run = Run::start(cfg, out, start, opts, &make)?;
        let end = opts.stop_after.map_or(cfg.epochs, |n| n.min(cfg.epochs));
        let mut stopped_early = run.early_stop_due();
        for epoch in run.state.epochs_done..end {
            if stopped_early.is_some() {
                break;
            }
            if run.epoch(epoch)? == EpochEnd::Stopped {
                return Ok(None);
            }
            stopped_early = run.early_stop_due();
        }
        if let Some(at) = stopped_early {
            say(
                opts,
                format!(
                    "asge: --early-stop {}: no better validation accuracy since epoch {}; stopped after epoch {at} of {}",
                    cfg.early_stop.unwrap_or_default(),
                    run.state.best_epoch,
                    cfg.epochs
                ),
            );
        } else if end < cfg.epochs {
            say(
                opts,
                format!("asge: stopped after epoch {end} of {}; continue with --resume {}", cfg.epochs, out.display()),
            );
            return Ok(None);
        }
        match run.final_test(&make, stopped_early) {
            Ok(summary) => Ok(Some(summary)),
            Err(e) if interrupt::is_interrupted(&e) => {
                eprintln!(
                    "asge: {}: stopped during the final test; every epoch and checkpoint is complete: --resume {} runs \
                     the test",
                    interrupt::name(interrupt::received().unwrap_or(interrupt::REQUESTED_STOP)),
                    out.display()
                );
                Ok(None)
            }
            Err(e) => Err(e),
        }
    })
}

/// How an epoch ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EpochEnd {
    Done,
    /// A signal or `stop_at_step`: a checkpoint was written, the run returns.
    Stopped,
}

/// A training run in progress (see the module notes). One of several ranks trains on its share of every batch (data
/// parallel) or on its layers (layer parallel); rank 0 alone holds the run folder and writes to it.
pub struct Run<'c, B: Backend> {
    cfg: &'c TrainConfig,
    opts: RunOptions,
    /// The run folder, taken (rank 0 only), and its path.
    #[allow(dead_code)]
    folder: Option<RunFolder>,
    dir: PathBuf,
    rank: usize,
    ranks: usize,
    sources: Sources,
    spec: ModelSpec,
    net: Net<B>,
    pub state: TrainState,
    train_idx: Vec<usize>,
    val_idx: Vec<usize>,
    n_test: usize,
    /// The batch the workspace holds: `--batch`, or the training set's size when that is smaller.
    batch: usize,
    config_json: serde_json::Value,
    adamw: AdamW,
    train_seconds: f64,
    train_images: usize,
    /// The run's TensorBoard event file (a new one per start or resume; rank 0's).
    events: Option<super::tensorboard::EventWriter>,
    /// The steps' training losses since the last per-step TensorBoard point (`--tb-every`).
    tb_steps: StepLosses,
}

/// Per-image training losses of some steps, summed (their mean goes to TensorBoard every `--tb-every` steps).
#[derive(Default)]
struct StepLosses {
    images: usize,
    layer_loss: Vec<f64>,
    head_loss: f64,
}

impl<'c, B: Backend> Run<'c, B> {
    /// Rank 0, or a process alone: the one that writes the run folder.
    fn lead(&self) -> bool {
        self.rank == 0
    }

    /// With several ranks: checks that every rank holds the same weights (they must: the same sums, the same
    /// updates), comparing a hash of every trained tensor across the ranks; a difference is an error naming the
    /// tensor. Every rank calls it at the same points (each epoch, before each checkpoint).
    fn check_same_weights(&self) -> Result<()> {
        same_weights_on_every_rank(&self.net, self.rank, &format!("after step {}", self.state.step))
    }

    /// With several ranks, a point every rank reaches before any goes on (after rank 0 wrote a checkpoint that the
    /// others' exit must not interrupt).
    fn barrier(&self) -> Result<()> {
        if self.ranks > 1 {
            self.net.backend().all_reduce_host(&mut [0.0], crate::backend::Reduction::Sum)?;
        }
        Ok(())
    }

    /// With several ranks: true on every rank when a signal reached any of them (every rank calls it at the same
    /// point); alone, whether one reached this process.
    fn agreed_signal(&self) -> Result<Option<i32>> {
        let mine = interrupt::received();
        if self.ranks == 1 {
            return Ok(mine);
        }
        let mut v = [mine.map_or(0.0, |s| s as f64)];
        self.net.backend().all_reduce_host(&mut v, crate::backend::Reduction::Max)?;
        Ok((v[0] > 0.0).then_some(mine.unwrap_or(v[0] as i32)))
    }

    /// How this run evaluates: split over the ranks (data parallel), or the whole set on every rank (alone; layer
    /// parallel, whose numbers must be a single process's bit for bit, and whose ranks all hold the whole model
    /// once it is gathered).
    fn evaluate(&self) -> EvalFn<B> {
        if self.net.stage().is_some() {
            eval::evaluate
        } else {
            eval::evaluate_shared
        }
    }

    fn last_path(&self) -> PathBuf {
        self.dir.join("last.safetensors")
    }

    fn best_path(&self) -> PathBuf {
        self.dir.join("best.safetensors")
    }

    /// A step's statistics (they arrive one call after the step, see `Net::train_step_pipelined`): with
    /// `--log-steps` a line of `steps.jsonl`, and every `--tb-every` steps a TensorBoard point of the mean
    /// training loss per layer and of the fusion heads since the last point, and the lr (tags `steps/...`, on
    /// the optimizer step's axis).
    fn log_step(&mut self, s: Option<&super::StepStats>, epoch: usize, lr: f64) -> Result<()> {
        let Some(s) = s else { return Ok(()) };
        if !self.lead() {
            return Ok(());
        }
        let every = self.opts.tb_every.unwrap_or(DEFAULT_TB_EVERY);
        if every > 0 {
            let acc = &mut self.tb_steps;
            acc.layer_loss.resize(s.layer_loss.len(), 0.0);
            for (a, l) in acc.layer_loss.iter_mut().zip(&s.layer_loss) {
                *a += l * s.batch as f64;
            }
            acc.head_loss += s.head_loss * s.batch as f64;
            acc.images += s.batch;
            if s.step.is_multiple_of(every) && acc.images > 0 {
                let acc = std::mem::take(&mut self.tb_steps);
                let n = acc.images as f64;
                let mut v: Vec<(String, f64)> = acc
                    .layer_loss
                    .iter()
                    .enumerate()
                    .map(|(l, x)| (format!("steps/train_loss/layer{}", l + 1), x / n))
                    .collect();
                v.push(("steps/train_loss/fusion".into(), acc.head_loss / n));
                v.push(("steps/lr".into(), lr));
                if let Some(events) = &mut self.events {
                    events.scalars(s.step as i64, wall_time_now(), &v)?;
                }
            }
        }
        if !self.opts.log_steps {
            return Ok(());
        }
        let row = serde_json::json!({
            "step": s.step,
            "epoch": epoch + 1,
            "lr": lr,
            "images": s.batch,
            "layer_loss": s.layer_loss,
            "layer_correct": s.layer_correct,
            "head_loss": s.head_loss,
            "head_correct": s.head_correct,
        });
        append_line(&self.dir.join("steps.jsonl"), &row.to_string())
    }

    /// Writes `last.safetensors` with the running sums of an unfinished epoch (a mid-epoch checkpoint).
    fn save_mid_epoch(&mut self, sums: &EpochSums) -> Result<()> {
        self.net.gather_stage()?;
        self.check_same_weights()?;
        if !self.lead() {
            return Ok(());
        }
        self.state.partial_epoch = Some(serde_json::to_value(sums)?);
        let r = checkpoint::save(&self.last_path(), &self.net, &self.state, &self.config_json);
        self.state.partial_epoch = None;
        r
    }

    /// Epoch `epoch` (0-based) of the schedule: every batch, the validation pass, the metrics, and the
    /// checkpoints.
    pub fn epoch(&mut self, epoch: usize) -> Result<EpochEnd> {
        let (cfg, opts) = (self.cfg, self.opts);
        self.sources.train.verify()?;
        let layers = self.spec.layers.len();
        let mut order = self.train_idx.clone();
        if cfg.shuffle {
            Rng::new(rng::derive(rng::derive(cfg.seed, SHUFFLE), epoch as u64)).shuffle(&mut order);
        }
        let n_batches = order.len().div_ceil(self.batch);
        // The step's lr (per epoch in the released recipe; see train::schedule); the metrics report the last one.
        let mut lr = lr_at(cfg, epoch, self.state.batches_done.min(n_batches.saturating_sub(1)), n_batches);
        // A mid-epoch checkpoint resumes at its batch, with the epoch's sums so far.
        // A checkpoint at batch n_batches is one written during validation: the epoch's training is complete and
        // only its validation (and what follows) is run again.
        let skip = self.state.batches_done;
        if skip > n_batches {
            bail!("the checkpoint is at batch {skip} of an epoch of {n_batches} batches (another --batch or data?)");
        }
        let mut sums = match (skip, self.state.partial_epoch.take()) {
            (1.., Some(v)) => {
                let s: EpochSums = serde_json::from_value(v).context("the checkpoint's partial-epoch metrics")?;
                s.check(layers).context("the checkpoint's partial-epoch metrics")?;
                s
            }
            _ => EpochSums::new(layers),
        };
        let stop_at = self.state.epochs_done.max(epoch);
        let later = self.opts.stop_after.map_or(cfg.epochs, |n| n.min(cfg.epochs)).saturating_sub(stop_at + 1);
        let label = format!("epoch {}/{}", epoch + 1, cfg.epochs);
        let mut pb = Progress::new(opts.display(), label, n_batches as u64, skip as u64, later as u64);
        let t0 = Instant::now();
        let (seconds_before, images_before) = (sums.seconds, sums.images);
        let aug_key = rng::derive(rng::derive(cfg.seed, AUGMENT), epoch as u64);
        // The batches left in the epoch, and this rank's share of each: its images, their positions in the epoch
        // (which key their augmentation) and its place in the global batch.
        let (mut mine, mut shares) = (Vec::new(), Vec::new());
        for k in skip..n_batches {
            let global = k * self.batch..((k + 1) * self.batch).min(order.len());
            let part = match self.net.stage() {
                // Layer parallel: every rank trains every image of a step, on its own layers.
                Some(_) => 0..global.len(),
                None => crate::dist::share(global.len(), self.ranks, self.rank),
            };
            let first = global.start + part.start;
            mine.push((first, order[first..first + part.len()].to_vec()));
            shares.push(super::net::Share { first: part.start, global: global.len() });
        }
        let aug = cfg.augmentation(self.sources.input_size);
        let mut batches = Prefetch::batches(self.sources.train.clone(), mine, aug, aug_key, 3);
        let mut steps = Stepper::new(self.net.stage());
        // With several ranks: the step after which every rank stops, once the ranks' stop votes arrived (a step
        // later; in layer-parallel training after the last rank's, and the step rank 0 has reached by then).
        let mut stop_at = None;
        // Whether any step's statistics so far carried a stop vote.
        let mut voted = false;
        // The lr of each step whose statistics have not arrived (they arrive a step later, or ranks steps later in
        // the layer pipeline), for their log.
        let mut lrs = std::collections::VecDeque::new();
        for (k, item) in batches.by_ref().enumerate() {
            let batch = item?;
            lr = lr_at(cfg, epoch, self.state.batches_done, n_batches);
            self.state.step += 1;
            let step = self.state.step;
            let drop_key = rng::derive(rng::derive(cfg.seed, DROPOUT), step);
            let wants_stop = opts.stop_at_step == Some(step) || interrupt::received().is_some();
            if self.ranks > 1 {
                // The ranks agree on a stop through the step's statistics: every rank reads the same votes, a step
                // later, and all stop after the same step.
                if steps.stage.is_none() {
                    self.net.set_share(Some(shares[k]));
                }
                self.net.vote_stop(wants_stop);
            }
            lrs.push_back((step, lr));
            let dropout = Some((cfg.dropout_p(), drop_key));
            let done = steps.step(&mut self.net, &batch.x, &batch.labels, lr, step, dropout)?;
            crate::dist::beat();
            let votes: usize = done.iter().map(|s| s.stop_votes).sum();
            voted |= votes > 0;
            for s in done {
                self.log_step(Some(&s), epoch, lr_of(&mut lrs, s.step, lr))?;
                sums.add_checked(Some(s), epoch)?;
            }
            self.state.batches_done += 1;
            if sums.images > 0 {
                let status = sums.status(t0.elapsed().as_secs_f64(), images_before, &self.spec);
                pb.set(self.state.batches_done as u64, &status);
            }
            let periodic = opts.checkpoint_every.is_some_and(|k| step.is_multiple_of(k));
            let signal = interrupt::received();
            if self.ranks > 1 && votes > 0 && stop_at.is_none() {
                // Rank 0 is this rank's rank steps ahead in the layer pipeline (the same step otherwise).
                stop_at = Some(step + steps.stage.map_or(0, |st| st.rank as u64));
            }
            let stop = if self.ranks > 1 { stop_at == Some(step) } else { wants_stop };
            if (periodic || stop) && self.state.batches_done < n_batches {
                let drained = steps.drain(&mut self.net)?;
                voted |= drained.iter().any(|s| s.stop_votes > 0);
                for s in drained {
                    self.log_step(Some(&s), epoch, lr_of(&mut lrs, s.step, lr))?;
                    sums.add_checked(Some(s), epoch)?;
                }
                // Drained, every rank has read the votes of every step up to this one, the same on every rank
                // (before the drain, some had read fewer than others): a vote among them stops every rank here,
                // whatever step each meant to stop after.
                let stop = stop || (self.ranks > 1 && voted);
                sums.seconds = seconds_before + t0.elapsed().as_secs_f64();
                self.save_mid_epoch(&sums)?;
                if stop {
                    // No rank exits (and has its launcher stop the others) before rank 0's checkpoint is written.
                    self.barrier()?;
                    pb.finish();
                    let why = signal.map_or("stopped".to_string(), |s| format!("{}: stopped", interrupt::name(s)));
                    let why =
                        if signal.is_none() && self.ranks > 1 { "another rank stopped: stopped".into() } else { why };
                    if self.lead() {
                        eprintln!(
                        "asge: {why} at step {step} (epoch {}, batch {} of {n_batches}) with a checkpoint; continue with --resume {}",
                        epoch + 1,
                        self.state.batches_done,
                        self.dir.display()
                        );
                    }
                    return Ok(EpochEnd::Stopped);
                }
            }
        }
        batches.finish()?;
        if self.state.batches_done != n_batches {
            bail!(
                "epoch {}: {} of {n_batches} batches trained (the data loader ended early)",
                epoch + 1,
                self.state.batches_done
            );
        }
        for s in steps.drain(&mut self.net)? {
            self.log_step(Some(&s), epoch, lr_of(&mut lrs, s.step, lr))?;
            sums.add_checked(Some(s), epoch)?;
        }
        pb.finish();
        drop(pb);
        // Layer-parallel: every rank gets every layer's weights, to validate and to check them.
        self.net.gather_stage()?;
        let seconds = seconds_before + t0.elapsed().as_secs_f64();
        sums.seconds = seconds;
        let val_res = if self.val_idx.is_empty() {
            None
        } else {
            // Validation images get the training augmentation, as in the released code, except on ImageNet
            // shards, where validation is the evaluation transform.
            let val_aug = if cfg.dataset == DatasetKind::Shards { self.sources.eval_aug } else { aug };
            let key = rng::derive(rng::derive(cfg.seed, VAL_AUGMENT), epoch as u64);
            let train = self.sources.train.clone();
            let label = format!("validate {}/{}", epoch + 1, cfg.epochs);
            // Data parallel: each rank validates its share, and the counts are summed.
            match self.evaluate()(
                &mut self.net,
                &train,
                self.val_idx.clone(),
                val_aug,
                key,
                Some((opts.display(), &label)),
            ) {
                Ok(r) => Some(r),
                Err(e) if interrupt::is_interrupted(&e) => {
                    // The epoch's training is complete: keep it (batches_done stays at n_batches) and validate again
                    // on resume.
                    self.save_mid_epoch(&sums)?;
                    eprintln!(
                        "asge: {}: stopped during the validation of epoch {} (its training is complete and checkpointed); \
                         --resume {} validates it again and continues",
                        interrupt::name(interrupt::received().unwrap_or(interrupt::REQUESTED_STOP)),
                        epoch + 1,
                        self.dir.display()
                    );
                    return Ok(EpochEnd::Stopped);
                }
                Err(e) => return Err(e),
            }
        };
        self.state.batches_done = 0;
        self.train_seconds += seconds;
        self.train_images += sums.images;
        let m = sums.metrics(epoch + 1, lr, seconds, val_res.as_ref());
        if let Some(events) = &mut self.events {
            append_metrics(&self.dir.join("metrics.jsonl"), &m)?;
            events.scalars((epoch + 1) as i64, m.wall_time, &super::tensorboard::epoch_scalars(&m))?;
            write_curves(&self.dir, &plot_title(&self.spec.arch, cfg))?;
        }
        say(opts, epoch_line(&m));

        // Model selection (released code): the best validation accuracy of the fusion prediction (of the only
        // layer, for a one-layer model); without validation, the latest epoch. Only a strictly better accuracy
        // replaces the best: on a tie the earlier epoch stays.
        let score = val_res.as_ref().map(|r| if layers >= 2 { r.fusion.top1_acc() } else { r.layers[0].top1_acc() });
        let improved = match (score, self.state.best_val) {
            (Some(s), Some(b)) => s > b,
            _ => true,
        };
        self.state.epochs_done = epoch + 1;
        interrupt::test_phase("checkpoint");
        self.check_same_weights()?;
        if improved {
            let layer_acc = val_res.as_ref().map(EvalResult::layer_acc).unwrap_or_else(|| m.train_layer_acc.clone());
            self.state.best_val = score;
            self.state.best_epoch = epoch + 1;
            self.state.best_layer = eval::argmax(&layer_acc);
            self.state.best_layer_acc = layer_acc;
            if self.lead() {
                checkpoint::save(&self.best_path(), &self.net, &self.state, &self.config_json)?;
            }
            if let Some(s) = score {
                say(opts, format!("asge: new best: epoch {} at {:.2}% validation top-1", epoch + 1, 100.0 * s));
            }
        }
        if self.lead() {
            checkpoint::save(&self.last_path(), &self.net, &self.state, &self.config_json)?;
        }
        if crate::trace::is_on() {
            crate::trace::add_device_spans(&self.net.backend().take_device_spans()?);
        }
        crate::trace::flush(layers)?;
        // With several ranks, also the point after which the others may read what rank 0 wrote.
        if let Some(sig) = self.agreed_signal()? {
            if self.lead() {
                eprintln!(
                    "asge: {}: stopped after epoch {} with a checkpoint; continue with --resume {}",
                    interrupt::name(sig),
                    epoch + 1,
                    self.dir.display()
                );
            }
            return Ok(EpochEnd::Stopped);
        }
        Ok(EpochEnd::Done)
    }

    /// With `--early-stop PATIENCE`: the last epoch trained, when the selection's validation accuracy has not
    /// improved for PATIENCE epochs since the best (the state's count, so a resumed run goes on counting).
    pub fn early_stop_due(&self) -> Option<usize> {
        let patience = self.cfg.early_stop?;
        let done = self.state.epochs_done;
        (self.state.best_val.is_some() && done < self.cfg.epochs && done - self.state.best_epoch >= patience)
            .then_some(done)
    }

    /// The test evaluation of the best checkpoint, printed and written to `summary.json`; `stopped_early`: the
    /// epoch `--early-stop` ended the run after.
    pub fn final_test(self, make_backend: &impl Fn() -> Result<B>, stopped_early: Option<usize>) -> Result<Summary> {
        let (cfg, spec) = (self.cfg, &self.spec);
        self.sources.test.verify()?;
        let best_path = self.best_path();
        let best = checkpoint::load(&best_path).with_context(|| match self.ranks {
            1 => "the run has no best.safetensors".to_string(),
            n => format!(
                "rank {}: every one of the {n} ranks reads the run's best.safetensors for the test: the run folder \
                 must be on a file system every machine sees",
                self.rank
            ),
        })?;
        let best_state = best.state.clone().unwrap_or_default();
        let params = best.params_for(&best_path, spec)?;
        // Each rank tests its share (data parallel), in batches of its share of --batch.
        let split = if self.net.stage().is_some() { 1 } else { self.ranks };
        let batch = cfg.batch.min(self.n_test).div_ceil(split).max(1);
        let evaluate = self.evaluate();
        drop(self.net);
        let mut net = Net::new(make_backend()?, spec.clone(), &params, self.adamw, batch)?;
        // Every rank read best.safetensors itself: the same file, the same weights?
        same_weights_on_every_rank(&net, self.rank, "in best.safetensors as each rank read it")?;
        let test = self.sources.test.clone();
        let res = evaluate(
            &mut net,
            &test,
            (0..self.n_test).collect(),
            self.sources.eval_aug,
            0,
            Some((self.opts.display(), "test")),
        )?;
        let rows = eval::strategies(&res, Strategy::All, best_state.best_layer)?;
        let ran = match stopped_early {
            Some(at) => format!("{at} (stopped early; --epochs {})", cfg.epochs),
            None => cfg.epochs.to_string(),
        };
        let title = format!("test ({} images), best epoch {} of {ran}", self.n_test, best_state.best_epoch);
        let table = eval::format_table(&title, &rows, &res);
        let summary = Summary {
            format: "asge-summary".into(),
            checkpoint: "best.safetensors".into(),
            dataset: cfg.dataset.name().into(),
            data: cfg.data.clone(),
            model: spec.arch.clone(),
            params_trainable: spec.conv_params() + spec.head_params(),
            epochs: cfg.epochs,
            best_epoch: best_state.best_epoch,
            stopped_early,
            best_val: best_state.best_val,
            test: rows,
            test_layer_top1: res.layer_acc(),
            test_layer_top5: res.layers.iter().map(|t| t.top5_acc()).collect(),
            test_images: self.n_test,
            train_seconds: Some(self.train_seconds),
            train_images_per_s: Some(if self.train_seconds > 0.0 {
                self.train_images as f64 / self.train_seconds
            } else {
                0.0
            }),
        };
        let Some(mut events) = self.events else {
            // Not rank 0: rank 0 writes the summary and prints the table.
            return Ok(summary);
        };
        let path = self.dir.join("summary.json");
        files::write_atomic(&path, serde_json::to_string_pretty(&summary)?.as_bytes())?;
        events.hparams_end(super::tensorboard::RunStatus::Success, wall_time_now())?;
        // Printed once everything is written: a closed stdout (`| head`) loses no file.
        println!("{table}");
        say(self.opts, format!("asge: run folder {} (summary.json, best.safetensors, curves.svg)", self.dir.display()));
        Ok(summary)
    }
}

/// The lr step `step` trained with, from `lrs` (the steps in flight, in order; the ones before it are dropped);
/// `current` if it is not there.
fn lr_of(lrs: &mut std::collections::VecDeque<(u64, f64)>, step: u64, current: f64) -> f64 {
    while lrs.front().is_some_and(|&(s, _)| s < step) {
        lrs.pop_front();
    }
    lrs.front().filter(|&&(s, _)| s == step).map_or(current, |&(_, lr)| lr)
}

/// [`eval::evaluate`]'s signature (and [`eval::evaluate_shared`]'s).
type EvalFn<B> = fn(
    &mut Net<B>,
    &std::sync::Arc<dyn data::ImageSource>,
    Vec<usize>,
    data::augment::Augment,
    u64,
    Option<(super::progress::Display, &str)>,
) -> Result<EvalResult>;

/// How a rank's training steps reach the net: one call a step ([`Net::train_step_pipelined`]: one process, data
/// parallel), or the ticks of the layer pipeline ([`Net::pipeline_tick`]), where rank `r` works on the step rank 0
/// worked on `r` ticks earlier. The pipeline runs in segments, from empty to empty: a segment's first step waits
/// `r` ticks on rank `r` (the fill), and [`Stepper::drain`] runs the ticks that finish every step given (the
/// drain), before a checkpoint or the end of an epoch.
struct Stepper {
    stage: Option<super::net::Stage>,
    /// Whether a segment is under way, its ticks so far, and the optimizer step before its first step.
    filled: bool,
    tick: u64,
    base: u64,
}

impl Stepper {
    fn new(stage: Option<super::net::Stage>) -> Self {
        Stepper { stage, filled: false, tick: 0, base: 0 }
    }

    /// Step `step` on this rank; returns the statistics of the steps that finished meanwhile, in order.
    fn step<B: Backend>(
        &mut self,
        net: &mut Net<B>,
        x: &[f32],
        labels: &[u32],
        lr: f64,
        step: u64,
        dropout: Option<(f32, u64)>,
    ) -> Result<Vec<super::StepStats>> {
        let Some(st) = self.stage else {
            return Ok(net.train_step_pipelined(x, labels, lr, step, dropout)?.into_iter().collect());
        };
        let mut done = Vec::new();
        if !self.filled {
            (self.filled, self.tick, self.base) = (true, 0, step - 1);
            for _ in 0..st.rank {
                done.extend(self.tick(net, st, None)?);
            }
        }
        let work = super::net::TickStep { x, labels, lr, step, dropout };
        done.extend(self.tick(net, st, Some(work))?);
        Ok(done)
    }

    /// One tick; from the tick the last rank works on the segment's first step, the statistics of the step it
    /// works on are summed.
    fn tick<B: Backend>(
        &mut self,
        net: &mut Net<B>,
        st: super::net::Stage,
        work: Option<super::net::TickStep<'_>>,
    ) -> Result<Option<super::StepStats>> {
        let last = st.ranks as u64 - 1;
        let reduce = (self.tick >= last).then(|| self.base + 1 + self.tick - last);
        self.tick += 1;
        net.pipeline_tick(work, reduce)
    }

    /// Finishes every step given so far on every rank; returns the statistics not returned yet, in order.
    fn drain<B: Backend>(&mut self, net: &mut Net<B>) -> Result<Vec<super::StepStats>> {
        let mut done = Vec::new();
        if let Some(st) = self.stage.filter(|_| self.filled) {
            for _ in st.rank + 1..st.ranks {
                done.extend(self.tick(net, st, None)?);
            }
            self.filled = false;
        }
        done.extend(net.flush_stats()?);
        Ok(done)
    }
}

/// With several ranks, checks that every rank holds the same weights in `net` (they must: the same sums, the same
/// updates), comparing a hash of every trained tensor across the ranks; a difference is an error naming the
/// tensor. Every rank calls it at the same points. `when` says which (`after step 120`).
fn same_weights_on_every_rank<B: Backend>(net: &Net<B>, rank: usize, when: &str) -> Result<()> {
    let be = net.backend();
    if be.ranks() == 1 {
        return Ok(());
    }
    let named = net.named_params();
    let mut local = Vec::with_capacity(4 * named.len());
    // For the tests of this check: the named rank hashes its first tensor as if one bit of it differed.
    let planted = std::env::var("ASGE_TEST_WEIGHTS_DIFFER_ON_RANK").is_ok_and(|r| r == rank.to_string());
    for (i, (_, p)) in named.iter().enumerate() {
        let v = be.read(&p.value, p.len)?;
        let h = v.iter().fold(rng::FNV_OFFSET, |h, x| rng::fnv1a(h, &x.to_bits().to_le_bytes()));
        let h = if planted && i == 0 { rng::fnv1a(h, &[1]) } else { h };
        let (hi, lo) = ((h >> 32) as f64, (h & 0xffff_ffff) as f64);
        local.extend([hi, lo, -hi, -lo]);
    }
    // The maxima of the hashes and of their negatives: equal to this rank's on every rank only when all agree.
    let mut all = local.clone();
    be.all_reduce_host(&mut all, crate::backend::Reduction::Max)?;
    for (i, (name, _)) in named.iter().enumerate() {
        let (mine, max) = (&local[4 * i..4 * i + 2], &all[4 * i..4 * i + 4]);
        if max[0] != mine[0] || max[1] != mine[1] || -max[2] != mine[0] || -max[3] != mine[1] {
            bail!(
                "the ranks' weights differ at {name} {when} (they must be identical: a faulty GPU or link, ranks \
                 that did not run the same program, or a run folder that not every rank sees the same)"
            );
        }
    }
    Ok(())
}
