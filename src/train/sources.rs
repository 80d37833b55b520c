//! A run's data: the training and test sources a config names, the input the model sees, and the model table
//! resolved against them.

use super::config::TrainConfig;
use crate::data::augment::Augment;
use crate::data::imagefolder::ResizeMode;
use crate::data::input::{InputResize, InputSpec};
use crate::data::shard::ShardSet;
use crate::data::{self, DatasetKind, ImageSource};
use crate::model::{self, ModelSpec};
use anyhow::{bail, Context, Result};
use std::sync::Arc;
/// A run's data: the training and test sources, the input side the model sees, and the evaluation transform.
pub struct Sources {
    pub train: Arc<dyn ImageSource>,
    pub test: Arc<dyn ImageSource>,
    pub input_size: usize,
    pub eval_aug: Augment,
    /// How an image file becomes an input like the training data, and the class names (kept in checkpoints).
    pub input: InputSpec,
}

/// Loads the data and resolves the model of a config.
pub fn prepare(cfg: &TrainConfig) -> Result<(Sources, ModelSpec)> {
    prepare_with(cfg, None)
}

/// [`prepare`], with the model's layer table given (a resumed run's, from its config.json) instead of resolved
/// from `--model` (whose JSON file may have changed since): it must fit the data.
pub(super) fn prepare_with(cfg: &TrainConfig, table: Option<ModelSpec>) -> Result<(Sources, ModelSpec)> {
    cfg.validate()?;
    let sources = if cfg.dataset == DatasetKind::Shards {
        let (train, test) = ShardSet::open_train_test(&cfg.data)?;
        let t = cfg.image_size.unwrap_or(train.size());
        if t == 0 || t > model::MAX_IMAGE_SIDE {
            bail!("--image-size {t}: the model takes 1 to {} pixels a side", model::MAX_IMAGE_SIDE);
        }
        let input = InputSpec {
            channels: train.channels(),
            stored_size: train.size(),
            resize: match train.index.resize {
                ResizeMode::ShortSide => InputResize::ShortSide,
                ResizeMode::Squash => InputResize::Squash,
            },
            crop: t,
            dataset: cfg.dataset.name().into(),
            class_names: train.index.classes.clone(),
        };
        let train: Arc<dyn ImageSource> = train;
        let test: Arc<dyn ImageSource> = test;
        Sources { train, test, input_size: t, eval_aug: Augment::CenterCrop(t), input }
    } else {
        if cfg.image_size.is_some_and(|s| s != data::IMAGE_SIZE) {
            bail!("--image-size: only --dataset shards takes another size; {} is 32x32", cfg.dataset.name());
        }
        let splits = data::load(cfg.dataset, &cfg.data, cfg.limit_train, cfg.limit_test)?;
        let size = splits.train.size;
        let input = InputSpec {
            channels: splits.train.channels,
            stored_size: size,
            resize: InputResize::PillowBilinear,
            crop: size,
            dataset: cfg.dataset.name().into(),
            class_names: splits.class_names,
        };
        Sources {
            train: Arc::new(splits.train),
            test: Arc::new(splits.test),
            input_size: size,
            eval_aug: Augment::None,
            input,
        }
    };
    if sources.train.is_empty() {
        bail!("--data {}: the training set is empty (--limit-train 0?)", cfg.data.display());
    }
    if sources.test.is_empty() {
        bail!("--data {}: the test set is empty", cfg.data.display());
    }
    let t = &sources.train;
    let spec = match table {
        Some(spec) => {
            spec.validate().context("the run's stored model table")?;
            if (spec.in_channels, spec.image_size, spec.classes) != (t.channels(), sources.input_size, t.classes()) {
                bail!(
                    "--data {}: {} channel(s) of {}px in {} classes, but the run's model takes {}, {}px, {}",
                    cfg.data.display(),
                    t.channels(),
                    sources.input_size,
                    t.classes(),
                    spec.in_channels,
                    spec.image_size,
                    spec.classes
                );
            }
            spec
        }
        None => {
            let spec = model::resolve(&cfg.model, t.channels(), sources.input_size, t.classes(), &cfg.model_options())?;
            spec.validate().with_context(|| format!("--model {}", cfg.model))?;
            spec
        }
    };
    Ok((sources, spec))
}
