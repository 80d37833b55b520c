//! The training config: every option that defines a run, in one struct that is at once the command line
//! (`clap::Args`: the defaults are its attributes and nowhere else), the `--config` file format (JSON or TOML,
//! the same keys) and the run's `config.json`. [`TrainConfig::default`] is what the command line gives with no
//! flags, so `--help`, a config file and `config.json` cannot disagree.
//!
//! Precedence, as in timm and Lightning: the built-in defaults, then `--config FILE`, then the flags given.

use crate::backend::Precision;
use crate::data::augment::Augment;
use crate::data::DatasetKind;
use crate::model::{GoodnessReduce, ModelOptions, PoolKind};
use anyhow::{bail, Context, Result};
use clap::{ArgMatches, Args, FromArgMatches};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `--lr-schedule`: when the cosine moves (see `train::schedule`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// Once per epoch (the released recipe: PyTorch's CosineAnnealingLR stepped each epoch).
    #[default]
    Epoch,
    /// Every step, over all the run's steps (large global batches; with --warmup-epochs).
    Step,
}

/// `--augment`: the dataset's released-recipe augmentation, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AugmentChoice {
    Default,
    None,
}

/// Everything that defines a run; saved as `config.json` and in every checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// The dataset (required for a new run, unless a --config file names it).
    #[arg(long, value_enum, default_value = "mnist", hide_default_value = true, help_heading = "Data")]
    pub dataset: DatasetKind,
    /// The dataset's folder of files, or its parent (required for a new run, unless a --config file names it).
    #[arg(long, default_value = "data", hide_default_value = true, help_heading = "Data")]
    pub data: PathBuf,
    /// Keep the first N images of the training file.
    #[arg(long, value_name = "N", help_heading = "Data")]
    pub limit_train: Option<usize>,
    /// Keep the first N images of the test file.
    #[arg(long, value_name = "N", help_heading = "Data")]
    pub limit_test: Option<usize>,
    /// Validation images split from the training file (default: the released split, 1/6 or 1/10; shards: 1/10 of
    /// the training shards, at most 50,000; 0: none).
    #[arg(long, value_name = "N", help_heading = "Data")]
    pub val: Option<usize>,
    /// Batches in file order (no per-epoch shuffle).
    #[arg(long = "no-shuffle", action = clap::ArgAction::SetFalse, help_heading = "Data")]
    pub shuffle: bool,
    /// Training augmentation: the dataset's released-recipe one, or none.
    #[arg(long, value_enum, default_value = "default", help_heading = "Data")]
    pub augment: AugmentChoice,
    /// With --dataset shards, the side the model sees (random-resized crops for training, centre crops for
    /// evaluation; default: the shards' size).
    #[arg(long, value_name = "PIXELS", help_heading = "Data")]
    pub image_size: Option<usize>,

    /// vgg8, vgg11, vgg-imagenet, or an architecture JSON file (the run keeps its layer table).
    #[arg(long, default_value = "vgg8", help_heading = "Model")]
    pub model: String,
    /// Channel multiplier (channels rounded to a multiple of 8, at least 8).
    #[arg(long, default_value_t = 1.0, help_heading = "Model")]
    pub width: f64,
    /// Patch-grid granularity: P_l = alpha * C_L / C_l.
    #[arg(long, default_value_t = 1.0, help_heading = "Model")]
    pub alpha: f64,
    /// Patch goodness: mean of squares (released code) or sum.
    #[arg(long, value_enum, default_value = "mean", help_heading = "Model")]
    pub goodness: GoodnessReduce,
    /// Downsampling pool: avg (released code) or rms (the paper's text).
    #[arg(long, value_enum, default_value = "avg", help_heading = "Model")]
    pub pool: PoolKind,
    /// Start from the weights (and fixed projections) in this safetensors file.
    #[arg(long, value_name = "FILE", help_heading = "Model")]
    pub init: Option<PathBuf>,

    /// Images per step.
    #[arg(long, default_value_t = 128, help_heading = "Optimisation")]
    pub batch: usize,
    /// Initial learning rate, cosine-annealed per epoch to --lr-min. The default is the released recipe's, for
    /// its 100 epochs: short runs need a larger one (the quickstart trains 3 epochs at 2e-3; at 2e-4 one epoch of
    /// a few thousand images stays near chance, and the run warns at its start).
    #[arg(long, default_value_t = 2e-4, help_heading = "Optimisation")]
    pub lr: f64,
    /// The learning rate the cosine reaches at the end of the schedule.
    #[arg(long, default_value_t = 1e-5, help_heading = "Optimisation")]
    pub lr_min: f64,
    /// When the cosine moves: each epoch (the released recipe) or each step.
    #[arg(long, value_enum, default_value = "epoch", help_heading = "Optimisation")]
    pub lr_schedule: LrSchedule,
    /// Raise the lr linearly, step by step, from lr/steps to the schedule's over this many epochs (large global
    /// batches: docs/many-gpus.md). 0: none (the released recipe).
    #[arg(long, value_name = "EPOCHS", default_value_t = 0.0, help_heading = "Optimisation")]
    pub warmup_epochs: f64,
    /// AdamW's decoupled weight decay, on every parameter.
    #[arg(long, default_value_t = 1e-3, help_heading = "Optimisation")]
    pub weight_decay: f64,
    /// Dropout on every layer's output during training.
    #[arg(long, default_value_t = 0.1, help_heading = "Optimisation")]
    pub dropout: f64,
    /// Seeds every random draw: init, projection, split, order, augmentation, dropout.
    #[arg(long, default_value_t = 42, help_heading = "Optimisation")]
    pub seed: u64,

    /// Epochs, and the cosine schedule's length.
    #[arg(long, default_value_t = 100, help_heading = "Schedule")]
    pub epochs: usize,
    /// Stop when the validation accuracy that selects the best checkpoint (fusion's; the only layer's in a
    /// one-layer model) has not improved for PATIENCE epochs; the test then runs on the best checkpoint. The
    /// count survives --resume. Needs a validation set.
    #[arg(long, value_name = "PATIENCE", help_heading = "Schedule")]
    pub early_stop: Option<usize>,

    /// cpu, cuda or cuda:N (ASGE_CUDA_LANES=N puts every layer on its own CUDA stream).
    #[arg(long, default_value = "cpu", help_heading = "Device")]
    pub device: String,
    /// Storage of the conv operands (layer inputs, conv outputs, the weights' compute copy); every sum, the
    /// master weights and the optimizer state stay f32. fp16 runs on the tensor cores on CUDA and is an exact
    /// (slower) emulation on the CPU.
    #[arg(long, value_enum, default_value = "fp32", help_heading = "Device")]
    pub precision: Precision,
}

impl Default for TrainConfig {
    /// What the command line gives with no flags: the defaults live in the `#[arg]` attributes only.
    fn default() -> Self {
        let cmd = TrainConfig::augment_args(clap::Command::new("defaults").no_binary_name(true));
        let m = cmd.try_get_matches_from(Vec::<String>::new()).expect("every training option has a default");
        TrainConfig::from_arg_matches(&m).expect("the defaults parse")
    }
}

/// The options a resumed run may change: how long it trains, where, and where its data now is. Any other would
/// change the run it continues.
pub const RESUMABLE: &[&str] = &["epochs", "early_stop", "device", "precision", "data"];

impl TrainConfig {
    pub fn validate(&self) -> Result<()> {
        if self.batch == 0 {
            bail!("--batch 0: the batch needs at least one image");
        }
        if self.epochs == 0 {
            bail!("--epochs 0: a run needs at least one epoch (the cosine schedule spans --epochs)");
        }
        if self.early_stop == Some(0) {
            bail!("--early-stop 0: the patience is a number of epochs without improvement, at least 1");
        }
        if self.early_stop.is_some() && self.val == Some(0) {
            bail!("--early-stop needs a validation set to watch, and --val 0 gives none");
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
        if self.lr_min > self.lr {
            bail!("--lr-min {} is above --lr {}: the cosine schedule would raise the rate", self.lr_min, self.lr);
        }
        if !(self.warmup_epochs.is_finite() && self.warmup_epochs >= 0.0 && self.warmup_epochs <= self.epochs as f64) {
            bail!("--warmup-epochs {}: must be between 0 and --epochs ({})", self.warmup_epochs, self.epochs);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            bail!("--weight-decay {}: must be a non-negative number", self.weight_decay);
        }
        if self.limit_test == Some(0) {
            bail!("--limit-test 0: the test evaluation needs at least one image");
        }
        Ok(())
    }

    pub(crate) fn augmentation(&self, input_size: usize) -> Augment {
        match (self.augment, self.dataset) {
            (AugmentChoice::Default, DatasetKind::Shards) => Augment::ResizedCrop(input_size),
            (_, DatasetKind::Shards) => Augment::CenterCrop(input_size),
            (AugmentChoice::None, _) => Augment::None,
            (_, DatasetKind::FashionMnist) => Augment::Flip,
            (_, DatasetKind::Cifar10 | DatasetKind::Cifar100) => Augment::Cifar,
            _ => Augment::None,
        }
    }

    pub(crate) fn model_options(&self) -> ModelOptions {
        ModelOptions { width: self.width, alpha: self.alpha, goodness: self.goodness, pool_kind: self.pool }
    }

    /// The dropout probability as the kernels take it.
    pub fn dropout_p(&self) -> f32 {
        self.dropout as f32
    }

    /// The config with its paths absolute (`--data`, `--init`, a `--model` file), so that the run folder's
    /// config.json works from any directory.
    pub fn with_absolute_paths(mut self) -> Result<Self> {
        let abs = |p: &Path, what: &str| -> Result<PathBuf> {
            std::fs::canonicalize(p).with_context(|| format!("{what} {}: no such file or folder", p.display()))
        };
        self.data = abs(&self.data, "--data")?;
        if let Some(i) = &self.init {
            self.init = Some(abs(i, "--init")?);
        }
        if self.model.ends_with(".json") {
            self.model = abs(Path::new(&self.model), "--model")?.display().to_string();
        }
        Ok(self)
    }

    /// The options' names, as the command line and the config files spell them (`lr-min` and `lr_min` both).
    pub fn keys() -> Vec<String> {
        let cmd = TrainConfig::augment_args(clap::Command::new("keys"));
        cmd.get_arguments().map(|a| a.get_id().to_string()).collect()
    }
}

/// Reads a `--config` file: JSON or TOML (by its extension, or its first character), with the keys of
/// `config.json`'s `"train"` object (`lr_min` or `lr-min`); a run's own `config.json` (`{"train": ..., "model":
/// ...}`) is one too. Unknown keys are an error, naming them.
pub fn read_config_file(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>> {
    crate::files::note_input(path);
    let text = std::fs::read_to_string(path).with_context(|| format!("--config {}: cannot read", path.display()))?;
    // A byte-order mark (some editors write one) is not part of the document.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let toml = path.extension().is_some_and(|e| e == "toml") || !text.trim_start().starts_with('{');
    let mut v: serde_json::Value = if toml {
        let t: toml::Value =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("--config {}: not TOML ({e})", path.display()))?;
        serde_json::to_value(t).context("a TOML value")?
    } else {
        serde_json::from_str(text).with_context(|| format!("--config {}: not JSON", path.display()))?
    };
    if v.get("train").is_some_and(|t| t.is_object()) {
        v = v["train"].take();
    }
    let obj = v.as_object().with_context(|| format!("--config {}: not a table of options", path.display()))?;
    let keys = TrainConfig::keys();
    let mut out = serde_json::Map::new();
    for (k, val) in obj {
        let key = k.replace('-', "_");
        if !keys.contains(&key) {
            bail!("--config {}: unknown option '{k}' (options: {})", path.display(), keys.join(", "));
        }
        check_value(&key, val).map_err(|e| anyhow::anyhow!("--config {}: '{k}' = {val}: {e}", path.display()))?;
        out.insert(key, val.clone());
    }
    Ok(out)
}

/// Whether `val` is a valid value of the option `key` (alone, over the defaults), and why not.
fn check_value(key: &str, val: &serde_json::Value) -> std::result::Result<(), String> {
    let mut v = serde_json::to_value(TrainConfig::default()).map_err(|e| e.to_string())?;
    if val.is_null() && !v[key].is_null() {
        // A float option given a NaN or an infinity serializes to null.
        return Err("not a finite number".into());
    }
    v[key] = val.clone();
    serde_json::from_value::<TrainConfig>(v).map(|_| ()).map_err(|e| e.to_string())
}

/// `--lr-min` for `lr_min`, `--no-shuffle` for `shuffle`: the flag a user types for a config key.
pub fn flag(key: &str) -> String {
    let cmd = TrainConfig::augment_args(clap::Command::new("flags"));
    let long = cmd.get_arguments().find(|a| a.get_id() == key).and_then(|a| a.get_long()).map(str::to_string);
    format!("--{}", long.unwrap_or_else(|| key.replace('_', "-")))
}

/// Which of `TrainConfig`'s options the command line gave.
pub fn given(m: &ArgMatches) -> Vec<String> {
    TrainConfig::keys()
        .into_iter()
        .filter(|k| m.value_source(k) == Some(clap::parser::ValueSource::CommandLine))
        .collect()
}

/// The config: the defaults, then `file` (a `--config` file's or a run's stored options), then the options
/// the command line gave (`flags`, read from the matches `m`).
pub fn merge(
    file: Option<serde_json::Map<String, serde_json::Value>>,
    flags: &TrainConfig,
    m: &ArgMatches,
) -> Result<TrainConfig> {
    let mut v = serde_json::to_value(TrainConfig::default())?;
    let obj = v.as_object_mut().expect("a struct serializes to an object");
    if let Some(f) = file {
        obj.extend(f);
    }
    let flags = serde_json::to_value(flags)?;
    for k in given(m) {
        let val = flags[&k].clone();
        if let Err(e) = check_value(&k, &val) {
            let given = m.get_raw(&k).into_iter().flatten().map(|s| s.to_string_lossy()).collect::<Vec<_>>().join(" ");
            let long = flag(&k);
            bail!("{long} {given}: {e}");
        }
        obj.insert(k.clone(), val);
    }
    serde_json::from_value(v).context("the options")
}

/// Refuses, for `--resume DIR`, a command line that gives an option a resumed run cannot change.
pub fn check_resumable(dir: &Path, m: &ArgMatches) -> Result<()> {
    let refused: Vec<String> = given(m).iter().filter(|k| !RESUMABLE.contains(&k.as_str())).map(|k| flag(k)).collect();
    if !refused.is_empty() {
        bail!(
            "--resume {}: {} cannot change when a run resumes (the run would no longer be the one it continues); \
             a resumed run takes --epochs, --device, --precision and --data, and the output and checkpoint options",
            dir.display(),
            refused.join(", ")
        );
    }
    Ok(())
}

/// A resumed run's config: its `stored` options, then the command line's (a new `--data` made absolute).
pub fn for_resume(stored: TrainConfig, flags: &TrainConfig, m: &ArgMatches) -> Result<TrainConfig> {
    let file = serde_json::to_value(&stored)?.as_object().cloned();
    let mut cfg = merge(file, flags, m)?;
    if given(m).iter().any(|k| k == "data") {
        cfg.data = std::fs::canonicalize(&cfg.data)
            .with_context(|| format!("--data {}: no such folder", cfg.data.display()))?;
    }
    Ok(cfg)
}

/// A new run's `--config` file (`config_file`, read), after checking that `--dataset` and `--data` come from
/// it or from the command line.
pub fn new_run_file(
    config_file: Option<&Path>,
    m: &ArgMatches,
) -> Result<Option<serde_json::Map<String, serde_json::Value>>> {
    let file = config_file.map(read_config_file).transpose()?;
    let given = given(m);
    for key in ["dataset", "data"] {
        if !given.iter().any(|k| k == key) && !file.as_ref().is_some_and(|f| f.contains_key(key)) {
            bail!(
                "{} is required for a new run (mnist, fashion-mnist, cifar10, cifar100, idx, shards; and the data \
                 folder), on the command line or in a --config file",
                flag(key)
            );
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_released_recipe() {
        let d = TrainConfig::default();
        assert_eq!((d.model.as_str(), d.width, d.epochs, d.batch), ("vgg8", 1.0, 100, 128));
        assert_eq!((d.lr, d.lr_min, d.weight_decay, d.dropout, d.seed), (2e-4, 1e-5, 1e-3, 0.1, 42));
        assert!(d.shuffle && d.val.is_none() && d.init.is_none());
        // Exact in JSON: no 0.10000000149011612.
        assert!(serde_json::to_string(&d).unwrap().contains("\"dropout\":0.1,"));
        // Every key a file may use is an option.
        let keys = TrainConfig::keys();
        for k in serde_json::to_value(&d).unwrap().as_object().unwrap().keys() {
            assert!(keys.contains(k), "{k}");
        }
    }
}
