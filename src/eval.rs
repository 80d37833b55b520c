//! Prediction strategies and top-k accuracy (docs/method.md §13):
//! - `last`: `argmax a_L`, the last layer's goodness through its fixed projection;
//! - `best-layer` (`best` on the command line before, still accepted, and in the files' keys): `argmax a_{l*}`,
//!   the single layer with the best validation accuracy (later layers can be dropped). Not to be confused with
//!   `best.safetensors`, the checkpoint of the best epoch;
//! - `fusion`: the trained linear heads on the pooled features of layers 2..L, logits summed.

use crate::backend::Backend;
use crate::data::augment::Augment;
use crate::data::loader::Prefetch;
use crate::data::ImageSource;
use crate::train::net::EvalLogits;
use crate::train::Net;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Last,
    #[value(name = "best-layer", alias = "best")]
    Best,
    Fusion,
    All,
}

impl Strategy {
    /// The name a person reads (tables, messages): `best-layer` for [`Strategy::Best`], whose key in the files
    /// (summary.json, the ONNX metadata) stays `best`.
    pub fn label(self) -> &'static str {
        match self {
            Strategy::Last => "last",
            Strategy::Best => "best-layer",
            Strategy::Fusion => "fusion",
            Strategy::All => "all",
        }
    }
}

/// One prediction strategy (what `asge predict` and `asge export` take).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OneStrategy {
    Last,
    #[value(name = "best-layer", alias = "best")]
    Best,
    Fusion,
}

impl From<OneStrategy> for Strategy {
    fn from(s: OneStrategy) -> Strategy {
        match s {
            OneStrategy::Last => Strategy::Last,
            OneStrategy::Best => Strategy::Best,
            OneStrategy::Fusion => Strategy::Fusion,
        }
    }
}

/// Top-1 / top-5 hit counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TopK {
    pub top1: usize,
    pub top5: usize,
    pub total: usize,
    /// Rows with a NaN or infinite logit: counted in `total`, never as a hit.
    #[serde(default)]
    pub nonfinite: usize,
    /// The summed softmax cross-entropy of the finite rows.
    #[serde(default)]
    pub loss_sum: f64,
}

impl TopK {
    /// Adds the rows of `logits` `[B, N]` against `labels`. A tie counts against the label: the label is in the
    /// top k when fewer than k classes score strictly higher and no earlier class ties it beyond k. A row with a
    /// non-finite logit is a miss (a NaN compares false with everything, so it would otherwise rank first).
    pub fn add(&mut self, logits: &[f32], labels: &[u32], classes: usize) {
        for (row, &label) in logits.chunks_exact(classes).zip(labels) {
            if !row.iter().all(|v| v.is_finite()) {
                self.nonfinite += 1;
                self.total += 1;
                continue;
            }
            let target = row[label as usize];
            let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
            let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
            self.loss_sum += lse - target as f64;
            // Rank = classes that beat the label (strictly higher, or equal with a smaller index: argmax order).
            let rank =
                row.iter().enumerate().filter(|&(i, &v)| v > target || (v == target && i < label as usize)).count();
            self.top1 += (rank < 1) as usize;
            self.top5 += (rank < 5) as usize;
            self.total += 1;
        }
    }
    pub fn top1_acc(&self) -> f64 {
        self.top1 as f64 / self.total.max(1) as f64
    }
    pub fn top5_acc(&self) -> f64 {
        self.top5 as f64 / self.total.max(1) as f64
    }
    /// The mean cross-entropy over the rows.
    pub fn loss(&self) -> f64 {
        self.loss_sum / self.total.max(1) as f64
    }
}

/// Accuracy of every layer's projection and of the fusion heads over a dataset.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct EvalResult {
    pub layers: Vec<TopK>,
    pub fusion: TopK,
}

/// The index of the largest value, the first on ties (as `argmax`).
pub fn argmax(v: &[f64]) -> usize {
    v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best })
}

impl EvalResult {
    pub fn layer_acc(&self) -> Vec<f64> {
        self.layers.iter().map(TopK::top1_acc).collect()
    }
    pub fn layer_loss(&self) -> Vec<f64> {
        self.layers.iter().map(TopK::loss).collect()
    }
}

/// Runs the evaluation forward over `indices` of `data` (no dropout). `aug` is applied with `key` (the released
/// code's validation images receive the training augmentations; test images never do). With `progress`, the
/// pass shows its own progress under that label.
pub fn evaluate<B: Backend>(
    net: &mut Net<B>,
    data: &Arc<dyn ImageSource>,
    indices: Vec<usize>,
    aug: Augment,
    key: u64,
    progress: Option<(crate::train::progress::Display, &str)>,
) -> Result<EvalResult> {
    evaluate_with(net, data, indices, aug, key, progress, &mut |_, _| Ok(()))
}

/// What [`evaluate_with`] hands its caller after every batch: the batch's labels and its logits.
pub type LogitSink<'a> = dyn FnMut(&[u32], &EvalLogits) -> Result<()> + 'a;

/// [`evaluate`], calling `sink` with every batch's logits, in the order of `indices` (`asge predict`,
/// `asge eval --dump-logits`).
pub fn evaluate_with<B: Backend>(
    net: &mut Net<B>,
    data: &Arc<dyn ImageSource>,
    indices: Vec<usize>,
    aug: Augment,
    key: u64,
    progress: Option<(crate::train::progress::Display, &str)>,
    sink: &mut LogitSink<'_>,
) -> Result<EvalResult> {
    let res = evaluate_part(net, data, indices, 0, aug, key, progress, sink)?;
    check_finite(&res)?;
    Ok(res)
}

/// [`evaluate`] with the work shared by the ranks of a data-parallel run: each evaluates its share of `indices`
/// (with the random draws of their positions, so the same images as one process), and the counts and loss sums
/// are added up over the ranks; every rank returns the whole result. A process alone evaluates everything. A
/// signal does not stop it (the ranks agree on stopping elsewhere).
pub fn evaluate_shared<B: Backend>(
    net: &mut Net<B>,
    data: &Arc<dyn ImageSource>,
    indices: Vec<usize>,
    aug: Augment,
    key: u64,
    progress: Option<(crate::train::progress::Display, &str)>,
) -> Result<EvalResult> {
    let ranks = net.backend().ranks();
    if ranks == 1 {
        return evaluate(net, data, indices, aug, key, progress);
    }
    let (rank, _) = crate::dist::place();
    let part = crate::dist::share(indices.len(), ranks, rank);
    let mine = indices[part.clone()].to_vec();
    let mut res = evaluate_part(net, data, mine, part.start, aug, key, progress, &mut |_, _| Ok(()))?;
    let tops: Vec<&mut TopK> = res.layers.iter_mut().chain([&mut res.fusion]).collect();
    let mut v: Vec<f64> = tops
        .iter()
        .flat_map(|t| [t.top1 as f64, t.top5 as f64, t.total as f64, t.nonfinite as f64, t.loss_sum])
        .collect();
    net.backend().all_reduce_host(&mut v, crate::backend::Reduction::Sum)?;
    for (t, s) in tops.into_iter().zip(v.chunks_exact(5)) {
        (t.top1, t.top5, t.total, t.nonfinite, t.loss_sum) =
            (s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize, s[4]);
    }
    check_finite(&res)?;
    Ok(res)
}

/// The evaluation of `indices`, the first at position `first` of the pass (which keys its random draws), without
/// the check of [`check_finite`].
// The arguments one by one: evaluate_with and evaluate_shared each pass their own.
#[allow(clippy::too_many_arguments)]
fn evaluate_part<B: Backend>(
    net: &mut Net<B>,
    data: &Arc<dyn ImageSource>,
    indices: Vec<usize>,
    first: usize,
    aug: Augment,
    key: u64,
    progress: Option<(crate::train::progress::Display, &str)>,
    sink: &mut LogitSink<'_>,
) -> Result<EvalResult> {
    let shared = net.backend().ranks() > 1;
    let classes = net.spec.classes;
    let mut res = EvalResult { layers: vec![TopK::default(); net.layers.len()], fusion: TopK::default() };
    let n_batches = indices.len().div_ceil(net.max_batch().max(1)) as u64;
    let mut pb = progress.map(|(d, label)| crate::train::progress::Progress::new(d, label, n_batches, 0, 0));
    let mut batches = Prefetch::new(data.clone(), indices, first, net.max_batch(), aug, key, 2);
    for (i, batch) in batches.by_ref().enumerate() {
        let batch = batch?;
        if let Some(pb) = &mut pb {
            pb.set(i as u64 + 1, "");
        }
        if let Some(sig) = crate::train::interrupt::received().filter(|_| !shared) {
            return Err(crate::train::interrupt::Interrupted(sig).into());
        }
        crate::dist::beat();
        let logits = net.eval_logits(&batch.x, &batch.labels)?;
        for (acc, l) in res.layers.iter_mut().zip(&logits.layers) {
            acc.add(l, &batch.labels, classes);
        }
        res.fusion.add(&logits.fusion, &batch.labels, classes);
        sink(&batch.labels, &logits)?;
    }
    batches.finish()?;
    Ok(res)
}

/// Non-finite logits mean broken weights or inputs: an accuracy computed around them would be a wrong number.
fn check_finite(res: &EvalResult) -> Result<()> {
    let bad = res.layers.iter().map(|t| t.nonfinite).chain([res.fusion.nonfinite]).enumerate().find(|(_, n)| *n > 0);
    if let Some((i, n)) = bad {
        let what = if i < res.layers.len() { format!("layer {}", i + 1) } else { "the fusion heads".into() };
        anyhow::bail!("{what} gave non-finite logits for {n} of {} images (broken weights or input)", res.fusion.total);
    }
    Ok(())
}

/// The test result of a checkpoint, in one schema for `summary.json` (written after training, with the training
/// time) and `asge eval`'s JSON (`format` tells them apart).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// `asge-summary` (a run's summary.json) or `asge-eval`.
    pub format: String,
    /// The checkpoint evaluated (`best.safetensors` in a run folder's summary).
    pub checkpoint: std::path::PathBuf,
    /// The data: `mnist`, `cifar10`, ..., `imagefolder` or `shards`, and where it was read.
    pub dataset: String,
    pub data: std::path::PathBuf,
    pub model: String,
    pub params_trainable: usize,
    /// Epochs the checkpoint was trained for, and the epoch it is from (the best validation accuracy).
    pub epochs: usize,
    pub best_epoch: usize,
    /// The epoch after which `--early-stop` ended the run (absent when it ran its schedule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped_early: Option<usize>,
    /// The best validation (fusion) accuracy, when the run had a validation set.
    pub best_val: Option<f64>,
    pub test: Vec<StrategyResult>,
    /// Every layer's own top-1 and top-5 through its projection, layer 1 first.
    pub test_layer_top1: Vec<f64>,
    pub test_layer_top5: Vec<f64>,
    pub test_images: usize,
    /// Training wall time and rate (summary.json only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_images_per_s: Option<f64>,
}

/// The logits of one strategy in a batch's [`EvalLogits`]: the last layer's, the best layer's, or the fusion
/// heads'.
pub fn strategy_logits(l: &EvalLogits, which: Strategy, best_layer: usize) -> &[f32] {
    match which {
        Strategy::Last | Strategy::All => l.layers.last().map(Vec::as_slice).unwrap_or(&[]),
        Strategy::Best => &l.layers[best_layer],
        Strategy::Fusion => &l.fusion,
    }
}

/// One row of a result table: strategy name, the layer it reads, top-1, top-5.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StrategyResult {
    pub strategy: String,
    /// 1-based layer whose projection predicts (`last`, `best`); absent for `fusion`.
    pub layer: Option<usize>,
    pub top1: f64,
    pub top5: f64,
    /// Mean softmax cross-entropy of the strategy's logits.
    #[serde(default)]
    pub loss: f64,
}

/// The strategies asked for, from an evaluation and the best layer picked on validation. A one-layer model has
/// no fusion heads (they start at the second layer): `all` leaves fusion out, and asking for it is an error.
pub fn strategies(res: &EvalResult, which: Strategy, best_layer: usize) -> Result<Vec<StrategyResult>> {
    let last = res.layers.len().checked_sub(1).ok_or_else(|| anyhow::anyhow!("the model has no layers"))?;
    anyhow::ensure!(best_layer <= last, "best layer {} of a {}-layer model", best_layer + 1, last + 1);
    let has_fusion = res.layers.len() >= 2;
    if which == Strategy::Fusion && !has_fusion {
        anyhow::bail!("--strategy fusion: a one-layer model has no fusion heads (they start at layer 2)");
    }
    let row = |name: &str, layer: Option<usize>, t: &TopK| StrategyResult {
        strategy: name.to_string(),
        layer: layer.map(|l| l + 1),
        top1: t.top1_acc(),
        top5: t.top5_acc(),
        loss: t.loss(),
    };
    let mut out = Vec::new();
    if matches!(which, Strategy::Last | Strategy::All) {
        out.push(row("last", Some(last), &res.layers[last]));
    }
    if matches!(which, Strategy::Best | Strategy::All) {
        out.push(row("best", Some(best_layer), &res.layers[best_layer]));
    }
    if matches!(which, Strategy::Fusion | Strategy::All) && has_fusion {
        out.push(row("fusion", None, &res.fusion));
    }
    Ok(out)
}

/// A plain-text table of strategy results and per-layer accuracies.
pub fn format_table(title: &str, rows: &[StrategyResult], res: &EvalResult) -> String {
    let mut s = format!("{title}\n  strategy    layer   top-1    top-5\n");
    for r in rows {
        let layer = r.layer.map(|l| l.to_string()).unwrap_or_else(|| "2..L".into());
        // The files' key `best` reads as `best-layer` (the best epoch is the checkpoint's, not this row's).
        let name = if r.strategy == "best" { "best-layer" } else { r.strategy.as_str() };
        s += &format!("  {:<10}  {:>5}  {:>6.2}%  {:>6.2}%\n", name, layer, 100.0 * r.top1, 100.0 * r.top5);
    }
    s += "  per layer (top-1): ";
    s += &res
        .layers
        .iter()
        .enumerate()
        .map(|(i, t)| format!("{}:{:.2}%", i + 1, 100.0 * t.top1_acc()))
        .collect::<Vec<_>>()
        .join(" ");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_counts() {
        let mut t = TopK::default();
        // label 2 is the argmax; label 0 ranks 3rd of 6; label 5 ranks last.
        let logits = [
            0.1, 0.5, 0.9, 0.0, 0.2, 0.3, /**/ 0.3, 0.5, 0.9, 0.0, 0.2, 0.1, /**/ 0.6, 0.5, 0.9, 0.8, 0.7,
            0.0,
        ];
        t.add(&logits, &[2, 0, 5], 6);
        assert_eq!((t.top1, t.top5, t.total, t.nonfinite), (1, 2, 3, 0));
        // The cross-entropy of the first row (label 2): logsumexp - 0.9.
        let lse = logits[..6].iter().map(|&v| (v as f64).exp()).sum::<f64>().ln();
        let mut one = TopK::default();
        one.add(&logits[..6], &[2], 6);
        assert!((one.loss() - (lse - 0.9f32 as f64)).abs() < 1e-12);
    }

    #[test]
    fn non_finite_logits_never_count_as_hits() {
        let mut t = TopK::default();
        // A NaN compares false with everything: counted naively, the label would rank first.
        t.add(&[f32::NAN, 0.0, 0.0], &[0], 3);
        t.add(&[0.0, f32::NAN, 0.0], &[0], 3);
        t.add(&[f32::INFINITY, 0.0, 0.0], &[0], 3);
        t.add(&[f32::NAN; 3], &[2], 3);
        assert_eq!((t.top1, t.top5, t.total, t.nonfinite), (0, 0, 4, 4));
    }

    #[test]
    fn ties_go_to_the_lower_index_like_argmax() {
        let mut t = TopK::default();
        t.add(&[1.0, 1.0, 0.0], &[1], 3);
        assert_eq!(t.top1, 0);
        t.add(&[1.0, 1.0, 0.0], &[0], 3);
        assert_eq!(t.top1, 1);
    }
}
