//! `--resume`: which checkpoint a run continues from, and the checks that it is the same run on the same data
//! (the options that may not change, the data's identity), from the run folder's `config.json`.

use super::checkpoint::{self, TrainState};
use super::config::TrainConfig;
use super::progress::say;
use super::sources::Sources;
use crate::data::DatasetKind;
use crate::model::ModelSpec;
use crate::rng::{self};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
/// Where `--resume` continues a run from: the newer of its `last.safetensors` and `best.safetensors` (best is
/// newer when writing last failed, on a full disk say), with its checked state. `None` when the run has neither
/// (it stopped before its first checkpoint: it starts again from the beginning, with its config). A checkpoint
/// that exists but cannot be used is an error that names it and the way out: continuing from an older file
/// without being asked could quietly drop many epochs.
pub(super) fn resume_point(
    dir: &Path,
    spec: &ModelSpec,
    quiet: bool,
) -> Result<Option<(PathBuf, checkpoint::Checkpoint, TrainState)>> {
    let mut usable = Vec::new();
    let mut unusable = Vec::new();
    for name in ["last.safetensors", "best.safetensors"] {
        let path = dir.join(name);
        if path.symlink_metadata().is_err() {
            continue;
        }
        let checked = (|| -> Result<_> {
            let ck = checkpoint::load(&path)?;
            let state =
                ck.state.clone().with_context(|| format!("{}: no training state in the metadata", path.display()))?;
            state.validate(spec).with_context(|| format!("{}: the training state does not fit", path.display()))?;
            ck.check_fits(&path, spec)?;
            Ok((ck, state))
        })();
        match checked {
            Ok((ck, state)) => usable.push((path, ck, state)),
            Err(e) => unusable.push((name, format!("{e:#}"))),
        }
    }
    if let Some((name, why)) = unusable.first() {
        let other = usable.first().map_or(String::new(), |u| {
            format!(
                " or to continue from {} (step {})",
                u.0.file_name().unwrap_or_default().to_string_lossy(),
                u.2.step
            )
        });
        let restart = if usable.is_empty() { " to start the run again from the beginning" } else { "" };
        bail!(
            "--resume {}: {name} cannot be used ({why}); move it out of the folder{restart}{other} with --resume, or \
             replace the run with --overwrite",
            dir.display()
        );
    }
    // The newest: the most optimizer steps (on a tie, last: it is listed first).
    let newest = usable.iter().enumerate().max_by_key(|(i, u)| (u.2.step, std::cmp::Reverse(*i))).map(|(i, _)| i);
    let Some(i) = newest else {
        say(
            quiet,
            format!(
                "asge: --resume {}: the run stopped before its first checkpoint; starting it again from the beginning with its config.json",
                dir.display()
            ),
        );
        return Ok(None);
    };
    let chosen = usable.swap_remove(i);
    if chosen.0.file_name().is_some_and(|n| n == "best.safetensors") {
        let why = if usable.is_empty() { "there is no last.safetensors" } else { "it is newer than last.safetensors" };
        say(quiet, format!("asge: --resume: continuing from best.safetensors (step {}; {why})", chosen.2.step));
    }
    Ok(Some(chosen))
}

/// What identifies a run's data (kept in `config.json` and every checkpoint's `asge.config`): its kind, counts
/// and shape, and a hash of a few of its records (the first, the last and two between, of the training and the
/// test set). `--resume` with other data is refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataIdentity {
    pub kind: String,
    pub train_images: usize,
    pub test_images: usize,
    pub channels: usize,
    pub size: usize,
    pub classes: usize,
    /// FNV-1a (64 bits, hex) over the sampled records' labels and pixels.
    pub records: String,
}

pub(super) fn data_identity(kind: DatasetKind, s: &Sources) -> DataIdentity {
    let mut h = rng::FNV_OFFSET;
    for src in [&s.train, &s.test] {
        let n = src.len();
        let mut picks = vec![0, n / 3, 2 * n / 3, n.saturating_sub(1)];
        picks.dedup();
        for i in picks.into_iter().filter(|&i| i < n) {
            h = rng::fnv1a(rng::fnv1a(h, &src.label(i).to_le_bytes()), src.image(i));
        }
    }
    DataIdentity {
        kind: kind.identity_name().into(),
        train_images: s.train.len(),
        test_images: s.test.len(),
        channels: s.train.channels(),
        size: s.train.size(),
        classes: s.train.classes(),
        records: format!("{h:016x}"),
    }
}

/// True when a run config's option `key` has the same value in two spellings: equal JSON, or two names of one
/// dataset (`imagenet`, the shard dataset's name before `shards`).
pub(super) fn same_option(key: &str, a: &serde_json::Value, b: &serde_json::Value) -> bool {
    let kind = |v: &serde_json::Value| serde_json::from_value::<DatasetKind>(v.clone()).ok();
    a == b || (key == "dataset" && kind(a).is_some() && kind(a) == kind(b))
}

/// Questions a resume before it continues: the checkpoint's own run config (`asge.config`) must be the folder's
/// `config.json` (but for the options `--resume` may change), the data must be the data the run trained on
/// (when the checkpoint records it), and the state's step count must be the one its epoch and batch give.
pub(super) fn check_resume(
    (path, ck, state): &(PathBuf, checkpoint::Checkpoint, TrainState),
    stored: &(TrainConfig, Option<ModelSpec>),
    identity: &DataIdentity,
    data: &Path,
    per_epoch: usize,
    quiet: bool,
) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let Some(config) = &ck.config else {
        bail!("--resume: {} has no run config in its metadata (not a checkpoint of this run)", path.display())
    };
    let mine = serde_json::to_value(&stored.0)?;
    let theirs = config.get("train").cloned().unwrap_or_default();
    let differ: Vec<String> = mine
        .as_object()
        .into_iter()
        .flatten()
        // An option the checkpoint does not list is one added to asge after it was written: not compared.
        .filter(|(k, v)| {
            !super::config::RESUMABLE.contains(&k.as_str())
                && theirs.get(k.as_str()).is_some_and(|t| !same_option(k, t, v))
        })
        .map(|(k, _)| k.clone())
        .collect();
    let table_differs = stored.1.as_ref().is_some_and(|m| {
        config.get("model").is_some_and(|t| serde_json::from_value::<ModelSpec>(t.clone()).ok().as_ref() != Some(m))
    });
    if !differ.is_empty() || table_differs {
        let what = if table_differs { [differ, vec!["model table".into()]].concat() } else { differ };
        bail!(
            "--resume {}: config.json differs from the run config in {} ({}); edited by hand, or a checkpoint of \
             another run? Restore config.json, or start a new run with --out",
            dir.display(),
            path.display(),
            what.join(", ")
        );
    }
    match config.get("data").map(|d| serde_json::from_value::<DataIdentity>(d.clone())) {
        Some(Ok(trained)) if &trained != identity => bail!(
            "--resume {}: --data {} is not the data this run trained on ({} with {} training and {} test images \
             of {}x{}x{}, records {}; this is {} with {} and {} of {}x{}x{}, records {})",
            dir.display(),
            data.display(),
            trained.kind,
            trained.train_images,
            trained.test_images,
            trained.channels,
            trained.size,
            trained.size,
            trained.records,
            identity.kind,
            identity.train_images,
            identity.test_images,
            identity.channels,
            identity.size,
            identity.size,
            identity.records
        ),
        Some(Ok(_)) => {}
        Some(Err(e)) => bail!("{}: a bad data identity in asge.config ({e})", path.display()),
        None => say(
            quiet,
            format!(
                "asge: {} was written before asge recorded the data's identity: the data is not checked",
                path.display()
            ),
        ),
    }
    let want = (state.epochs_done as u64).saturating_mul(per_epoch as u64).saturating_add(state.batches_done as u64);
    if state.step != want {
        bail!(
            "{}: the training state says step {} at epoch {} batch {}, which is step {want} with {per_epoch} batches \
             an epoch (a damaged or edited checkpoint)",
            path.display(),
            state.step,
            state.epochs_done,
            state.batches_done
        );
    }
    Ok(())
}

/// Reads a run folder's config for `--resume`.
pub fn load_run_config(dir: &Path) -> Result<TrainConfig> {
    load_run_file(dir).map(|(c, _)| c)
}

/// A run folder's config.json: the options and the model's layer table (absent in runs made before it was
/// stored).
pub(super) fn load_run_file(dir: &Path) -> Result<(TrainConfig, Option<ModelSpec>)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("--resume {}: no config.json", dir.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let cfg = serde_json::from_value(v.get("train").cloned().unwrap_or_default())
        .with_context(|| format!("{}: not an asge run config", path.display()))?;
    let spec = v
        .get("model")
        .map(|m| serde_json::from_value(m.clone()))
        .transpose()
        .with_context(|| format!("{}: a bad model table", path.display()))?;
    Ok((cfg, spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_run_recorded_under_the_shard_datasets_old_name_is_the_same_run() {
        // config.json written as `imagenet` reads back as shards and is written as `shards`: a resume compares
        // the two spellings as one option value.
        assert!(same_option("dataset", &json!("imagenet"), &json!("shards")));
        assert!(!same_option("dataset", &json!("imagenet"), &json!("mnist")));
        assert!(!same_option("model", &json!("imagenet"), &json!("shards")));
        assert!(same_option("lr", &json!(2e-4), &json!(2e-4)) && !same_option("lr", &json!(2e-4), &json!(1e-3)));
        assert_eq!(DatasetKind::Shards.identity_name(), "imagenet");
        // The shard default split: 1/10, at most 50,000.
        assert_eq!((DatasetKind::Shards.default_val(400), DatasetKind::Shards.default_val(1_281_167)), (40, 50_000));
        assert_eq!(DatasetKind::Cifar10.default_val(50_000), 5_000);
    }
}
