//! What a run records: per epoch `metrics.jsonl` (read back by the plot and the TensorBoard writer) and its
//! progress line, the running sums of an epoch (kept in mid-epoch checkpoints), `steps.jsonl`, `curves.svg`,
//! and the truncation of those files to a resumed run's checkpoint.

use super::config::TrainConfig;
use crate::data::DatasetKind;
use crate::eval::EvalResult;
use crate::files::{self};
use crate::model::ModelSpec;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Per-epoch metrics, one JSON line in `metrics.jsonl`. The fusion fields are absent for a one-layer model
/// (it has no fusion heads).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub lr: f64,
    pub train_layer_loss: Vec<f64>,
    pub train_layer_acc: Vec<f64>,
    pub train_fusion_loss: Option<f64>,
    pub train_fusion_acc: Option<f64>,
    pub val_layer_acc: Option<Vec<f64>>,
    pub val_fusion_acc: Option<f64>,
    /// Validation cross-entropy per layer (through its projection) and of the fusion heads.
    #[serde(default)]
    pub val_layer_loss: Option<Vec<f64>>,
    #[serde(default)]
    pub val_fusion_loss: Option<f64>,
    pub images_per_s: f64,
    pub seconds: f64,
    /// When the epoch ended: seconds since the Unix epoch (what TensorBoard's wall time is).
    #[serde(default)]
    pub wall_time: f64,
}

#[derive(Serialize, Deserialize)]
pub(super) struct EpochSums {
    pub(super) images: usize,
    pub(super) layer_loss: Vec<f64>,
    pub(super) layer_correct: Vec<usize>,
    pub(super) head_loss: f64,
    pub(super) head_correct: usize,
    /// Training seconds of the epoch's earlier part (before a resume).
    #[serde(default)]
    pub(super) seconds: f64,
}

impl EpochSums {
    pub(super) fn new(layers: usize) -> Self {
        EpochSums {
            images: 0,
            layer_loss: vec![0.0; layers],
            layer_correct: vec![0; layers],
            head_loss: 0.0,
            head_correct: 0,
            seconds: 0.0,
        }
    }

    /// Checks sums read from a checkpoint against the model (one entry per layer, finite, counts in range).
    pub(super) fn check(&self, layers: usize) -> Result<()> {
        if self.layer_loss.len() != layers || self.layer_correct.len() != layers {
            bail!("{} and {} per-layer entries for {layers} layers", self.layer_loss.len(), self.layer_correct.len());
        }
        if !self.layer_loss.iter().chain([&self.head_loss, &self.seconds]).all(|v| v.is_finite()) {
            bail!("a non-finite sum");
        }
        if self.layer_correct.iter().chain([&self.head_correct]).any(|&c| c > self.images) {
            bail!("more correct predictions than images");
        }
        Ok(())
    }

    /// Adds a step's statistics, or stops the run when a loss is not finite (naming the layer: a diverged layer
    /// must not train on, and must not reach a checkpoint).
    pub(super) fn add_checked(&mut self, s: Option<super::StepStats>, epoch: usize) -> Result<()> {
        let Some(s) = s else { return Ok(()) };
        if let Some(l) = s.layer_loss.iter().position(|l| !l.is_finite()) {
            bail!(
                "layer {}: the loss became {} at step {} (epoch {}); the run stops, its last checkpoint is kept (try a lower --lr)",
                l + 1,
                s.layer_loss[l],
                s.step,
                epoch + 1
            );
        }
        if !s.head_loss.is_finite() {
            bail!(
                "the fusion heads: the loss became {} at step {} (epoch {}); the run stops",
                s.head_loss,
                s.step,
                epoch + 1
            );
        }
        self.images += s.batch;
        for (i, (&l, &c)) in s.layer_loss.iter().zip(&s.layer_correct).enumerate() {
            self.layer_loss[i] += l * s.batch as f64;
            self.layer_correct[i] += c;
        }
        self.head_loss += s.head_loss * s.batch as f64;
        self.head_correct += s.head_correct;
        Ok(())
    }

    /// The progress message: images/s, the last layer's running loss and accuracy, and the fusion accuracy.
    /// The progress line: the rate of the images trained in `seconds` since `before` of them were (a resumed
    /// epoch's restored sums are not this process's work), the epoch's loss and accuracy so far.
    pub(super) fn status(&self, seconds: f64, before: usize, spec: &ModelSpec) -> String {
        let n = self.images.max(1) as f64;
        let mut s = format!(
            "{:.0} img/s  loss {:.3}  acc L{} {:.2}%",
            self.images.saturating_sub(before) as f64 / seconds.max(1e-9),
            self.layer_loss.last().copied().unwrap_or(0.0) / n,
            spec.layers.len(),
            100.0 * self.layer_correct.last().copied().unwrap_or(0) as f64 / n,
        );
        if spec.layers.len() >= 2 {
            s += &format!("  fusion {:.2}%", 100.0 * self.head_correct as f64 / n);
        }
        s
    }

    pub(super) fn metrics(&self, epoch: usize, lr: f64, seconds: f64, val: Option<&EvalResult>) -> EpochMetrics {
        let n = self.images.max(1) as f64;
        let fusion = self.layer_loss.len() >= 2;
        EpochMetrics {
            epoch,
            lr,
            train_layer_loss: self.layer_loss.iter().map(|l| l / n).collect(),
            train_layer_acc: self.layer_correct.iter().map(|&c| c as f64 / n).collect(),
            train_fusion_loss: fusion.then(|| self.head_loss / n),
            train_fusion_acc: fusion.then(|| self.head_correct as f64 / n),
            val_layer_acc: val.map(EvalResult::layer_acc),
            val_fusion_acc: val.filter(|_| fusion).map(|v| v.fusion.top1_acc()),
            val_layer_loss: val.map(EvalResult::layer_loss),
            val_fusion_loss: val.filter(|_| fusion).map(|v| v.fusion.loss()),
            images_per_s: self.images as f64 / seconds,
            seconds,
            wall_time: wall_time_now(),
        }
    }
}

pub(super) fn epoch_line(m: &EpochMetrics) -> String {
    let pct = |v: &[f64]| v.iter().map(|a| format!("{:.1}", 100.0 * a)).collect::<Vec<_>>().join(" ");
    let mut s = format!(
        "epoch {:>3}  lr {:.3e}  {:.0} img/s  {:.1}s  train acc [{}]",
        m.epoch,
        m.lr,
        m.images_per_s,
        m.seconds,
        pct(&m.train_layer_acc),
    );
    if let Some(f) = m.train_fusion_acc {
        s += &format!(" fusion {:.2}%", 100.0 * f);
    }
    if let Some(l) = &m.val_layer_acc {
        s += &format!("  val [{}]", pct(l));
    }
    if let Some(f) = m.val_fusion_acc {
        s += &format!(" fusion {:.2}%", 100.0 * f);
    }
    s
}

/// Appends one line to `metrics.jsonl` (the file is rewritten atomically: a crash leaves the old or the new one).
pub(super) fn append_metrics(path: &Path, m: &EpochMetrics) -> Result<()> {
    let mut text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text += &serde_json::to_string(m)?;
    text.push('\n');
    files::write_atomic(path, text.as_bytes())
}

/// Redraws `curves.svg` from `metrics.jsonl`.
/// The plot's title: the model and the data, by the folder it came from where that says more than the kind
/// (`vgg8 on mnist`, `vgg-imagenet on my-photos (shards)`).
pub(super) fn plot_title(arch: &str, cfg: &TrainConfig) -> String {
    let folder = cfg.data.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    match cfg.dataset {
        DatasetKind::Shards if !folder.is_empty() => format!("{arch} on {folder} (shards)"),
        kind => format!("{arch} on {}", kind.name()),
    }
}

pub(super) fn write_curves(out: &Path, title: &str) -> Result<()> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default();
    let metrics: Vec<EpochMetrics> = text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    files::write_atomic(&out.join("curves.svg"), super::plot::curves_svg(&metrics, title).as_bytes())
}

/// Appends `line` to `path` (created if absent, never through a symlink).
pub(super) fn append_line(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .with_context(|| format!("{}: cannot append", path.display()))?;
    // One write of the whole line (writeln! would write the text and the newline apart: a kill between them
    // leaves a torn line that the next append runs on).
    f.write_all(format!("{line}\n").as_bytes()).with_context(|| format!("{}: cannot append", path.display()))
}

/// Drops `steps.jsonl` lines of steps past the checkpoint.
pub(super) fn truncate_steps(path: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    files::write_atomic(path, body.as_bytes())
}

/// Drops metric lines of epochs past the checkpoint (an interrupted epoch may have logged before dying).
pub(super) fn truncate_metrics(path: &Path, epochs_done: usize) -> Result<()> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| serde_json::from_str::<EpochMetrics>(l).map(|m| m.epoch <= epochs_done).unwrap_or(false))
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    files::write_atomic(path, body.as_bytes())
}

/// Seconds since the Unix epoch (TensorBoard's wall time).
pub(super) fn wall_time_now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_epochs_rate_counts_only_the_images_trained_since() {
        // 900 images restored from a mid-epoch checkpoint, 100 trained in the last second: 100 img/s, not 1000.
        let mut sums = EpochSums::new(1);
        sums.images = 1000;
        let spec = crate::model::resolve("vgg8", 1, 32, 10, &Default::default()).unwrap();
        assert!(sums.status(1.0, 900, &spec).starts_with("100 img/s"), "{}", sums.status(1.0, 900, &spec));
    }
}
