//! Using a trained checkpoint: `asge eval` on a built-in dataset, a shard folder or an ImageFolder (with
//! `--dump-logits`), and `asge predict` on image files. Both prepare images as the training data was prepared
//! ([`InputSpec`], stored in the checkpoint) and run the same evaluation forward as validation and test.

use crate::backend::select::with_backend;
use crate::backend::{Backend, Device, Precision};
use crate::data::augment::Augment;
use crate::data::input::{InputResize, InputSpec};
use crate::data::loader::make_pixels;
use crate::data::shard::ShardSet;
use crate::data::{self, imagefolder, Dataset, DatasetKind, ImageSource};
use crate::eval::{self, EvalResult, Report, Strategy};
use crate::files;
use crate::model::{ModelSpec, Params};
use crate::train::checkpoint::{self, Checkpoint, TrainState};
use crate::train::config::TrainConfig;
use crate::train::net::{ensure_memory, AdamW, Net};
use crate::train::progress::Display;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod predict;
pub use predict::*;

/// A checkpoint ready to run: its model, weights, input spec and the layer its `best` strategy reads.
pub struct Model {
    pub path: PathBuf,
    pub spec: ModelSpec,
    pub params: Params,
    pub input: InputSpec,
    /// 0-based.
    pub best_layer: usize,
    /// The run state and run config in its metadata (absent in exported and foreign files).
    pub state: Option<TrainState>,
    pub config: Option<serde_json::Value>,
}

impl Model {
    pub fn open(path: &Path) -> Result<Model> {
        files::note_input(path);
        Self::from_checkpoint(path, checkpoint::load(path)?)
    }

    /// The model of a checkpoint already read from `path`.
    pub fn from_checkpoint(path: &Path, ck: Checkpoint) -> Result<Model> {
        let spec = ck.spec.clone().with_context(|| {
            format!("{}: no asge.model metadata (not written by asge); train with --init to use it", path.display())
        })?;
        let params = ck.params_for(path, &spec)?;
        let input =
            ck.input.clone().unwrap_or_else(|| InputSpec::assumed(spec.in_channels, spec.image_size, spec.classes));
        let best_layer = ck.state.as_ref().map(|s| s.best_layer).unwrap_or(spec.layers.len() - 1);
        // The optimizer moments and the rest of the file are dropped here: only what inference needs stays.
        Ok(Model { path: path.to_path_buf(), spec, params, input, best_layer, state: ck.state, config: ck.config })
    }

    /// The evaluation transform of a stored image: the centre crop for shard-trained models, nothing otherwise.
    fn eval_aug(&self) -> Augment {
        match self.input.resize {
            InputResize::PillowBilinear => Augment::None,
            _ => Augment::CenterCrop(self.spec.image_size),
        }
    }

    /// `strategy` checked against the model: a one-layer model has no fusion heads.
    pub fn check_strategy(&self, strategy: Strategy) -> Result<()> {
        if strategy == Strategy::Fusion && self.spec.layers.len() < 2 {
            bail!("--strategy fusion: a one-layer model has no fusion heads (they start at layer 2)");
        }
        Ok(())
    }

    /// The strategy a prediction uses when none is asked for, and why (see [`default_strategy`]).
    pub fn default_strategy(&self) -> (Strategy, String) {
        default_strategy(self.spec.layers.len(), self.state.as_ref())
    }

    /// The strategy asked for, or the default and why ([`Model::default_strategy`]).
    pub fn strategy_or_default(&self, asked: Option<Strategy>) -> (Strategy, String) {
        match asked {
            Some(s) => (s, "as asked".into()),
            None => self.default_strategy(),
        }
    }
}

/// The strategy a prediction of a `layers`-layer model with run state `state` uses when none is asked for, and
/// why: of fusion and the best layer, the one with the higher validation accuracy the state records for its
/// epoch (fusion on a tie); fusion as the fallback when it records none (no validation set, or an exported or
/// foreign file); last for a one-layer model (no fusion heads, and its only layer is the best).
pub fn default_strategy(layers: usize, state: Option<&TrainState>) -> (Strategy, String) {
    if layers < 2 {
        return (Strategy::Last, "the model has one layer".into());
    }
    let recorded = state.and_then(|s| Some((s.best_val?, *s.best_layer_acc.get(s.best_layer)?, s.best_layer + 1)));
    match recorded {
        Some((fusion, layer, number)) if layer > fusion => (
            Strategy::Best,
            format!(
                "the higher validation top-1 at the checkpoint's epoch: layer {number} {:.2}%, fusion {:.2}%",
                100.0 * layer,
                100.0 * fusion
            ),
        ),
        Some((fusion, layer, number)) => (
            Strategy::Fusion,
            format!(
                "the higher validation top-1 at the checkpoint's epoch: fusion {:.2}%, best layer ({number}) {:.2}%",
                100.0 * fusion,
                100.0 * layer
            ),
        ),
        None => (Strategy::Fusion, "the fallback: the checkpoint records no validation accuracy to choose by".into()),
    }
}

/// What `asge eval` reads.
pub enum EvalData {
    /// A built-in dataset's test file.
    Builtin { kind: DatasetKind, dir: PathBuf },
    /// A folder: a shard folder (it has index.json) or an ImageFolder (one sub-folder of images per class).
    Folder(PathBuf),
}

impl EvalData {
    /// What `asge eval` reads: `--folder`, or `--dataset` and `--data`, each one not given taken from the run
    /// config stored in the checkpoint (read from `path`).
    pub fn choose(
        path: &Path,
        ck: &Checkpoint,
        folder: Option<PathBuf>,
        dataset: Option<DatasetKind>,
        data: Option<PathBuf>,
    ) -> Result<EvalData> {
        if let Some(dir) = folder {
            return Ok(EvalData::Folder(dir));
        }
        if let (Some(kind), Some(dir)) = (dataset, data.clone()) {
            return Ok(EvalData::Builtin { kind, dir });
        }
        let trained =
            ck.config.as_ref().and_then(|c| serde_json::from_value::<TrainConfig>(c.get("train")?.clone()).ok());
        let t = || {
            trained.clone().with_context(|| {
                format!("{}: no run config in the metadata; give --dataset and --data, or --folder", path.display())
            })
        };
        let kind = match dataset {
            Some(d) => d,
            None => t()?.dataset,
        };
        let dir = match data {
            Some(p) => p,
            None => t()?.data,
        };
        Ok(EvalData::Builtin { kind, dir })
    }

    /// `--json`'s default: `STEM.eval-TAG.json` beside the checkpoint, TAG the dataset or the folder's name.
    pub fn default_json_path(&self, checkpoint: &Path) -> PathBuf {
        let tag = match self {
            EvalData::Builtin { kind, .. } => kind.name().to_string(),
            EvalData::Folder(dir) => std::fs::canonicalize(dir)
                .ok()
                .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "folder".into()),
        };
        let stem = checkpoint.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        checkpoint.with_file_name(format!("{stem}.eval-{tag}.json"))
    }

    /// The result table's title.
    pub fn title(&self, checkpoint: &Path, report: &Report) -> String {
        match self {
            EvalData::Builtin { .. } => {
                format!("{} on {} test ({} images)", checkpoint.display(), report.dataset, report.test_images)
            }
            EvalData::Folder(dir) => format!(
                "{} on {} {} ({} images)",
                checkpoint.display(),
                report.dataset,
                dir.display(),
                report.test_images
            ),
        }
    }
}

/// `--dump-logits FILE [--dump-inputs]`.
pub struct Dump {
    pub path: PathBuf,
    pub inputs: bool,
}

fn is_logits_dump(p: &Path) -> bool {
    safetensors_format(p).as_deref() == Some(LOGITS_FORMAT)
}

impl Dump {
    /// The file as the output guard sees it: only an earlier logits dump is replaced.
    fn output(&self) -> files::Output<'_> {
        files::Output { path: &self.path, flag: "--dump-logits", kind: "an asge logits dump", ours: &is_logits_dump }
    }
}

pub struct EvalOptions<'a> {
    pub strategy: Strategy,
    pub batch: usize,
    pub limit: Option<usize>,
    pub device: &'a str,
    pub precision: Precision,
    pub dump: Option<Dump>,
    pub quiet: bool,
}

/// The file format of `--dump-logits` (in its metadata).
pub const LOGITS_FORMAT: &str = "asge-logits";

/// `asge eval`: the test result of a checkpoint (opened with [`Model::open`]) on `data`, in summary.json's schema.
pub fn eval(model: &Model, data: &EvalData, o: &EvalOptions) -> Result<(Report, EvalResult)> {
    if o.batch == 0 {
        bail!("--batch 0: the batch needs at least one image");
    }
    if o.limit == Some(0) {
        bail!("--limit-test 0: the evaluation needs at least one image");
    }
    if let Some(d) = &o.dump {
        d.output().check()?;
    }
    let (source, dataset, dir) = open_eval_data(model, data, o.limit)?;
    let n = source.len().min(o.limit.unwrap_or(usize::MAX));
    if n == 0 {
        bail!("{}: no images to evaluate", dir.display());
    }
    let strategy = o.strategy;
    if strategy != Strategy::All {
        model.check_strategy(strategy)?;
    }
    with_backend!(o.device, o.precision, |make| run_eval(model, make()?, &source, n, &dataset, &dir, o))
}

/// The evaluation on a backend `with_backend!` made: the model, the backend (moved into the net), the images with
/// their count, name and folder (as the report names them), and the options.
// The arguments are what the macro's arm has at hand; a struct for one call would only rename them.
#[allow(clippy::too_many_arguments)]
fn run_eval<B: Backend>(
    model: &Model,
    be: B,
    source: &Arc<dyn ImageSource>,
    n: usize,
    dataset: &str,
    dir: &Path,
    o: &EvalOptions,
) -> Result<(Report, EvalResult)> {
    let spec = &model.spec;
    let batch = o.batch.min(n);
    ensure_memory(spec, batch, spec.image_size, be.buffers_on_host(), "evaluation")?;
    let mut net = Net::new(be, spec.clone(), &model.params, AdamW::default(), batch)?;
    let display = Display::detect(o.quiet, 30.0);
    let aug = model.eval_aug();
    let has_fusion = spec.layers.len() >= 2;
    // The dump: each strategy's logits in image order, the labels, and the images as the model saw them.
    let mut dumped: Vec<(Strategy, Vec<f32>)> = [Strategy::Last, Strategy::Best, Strategy::Fusion]
        .into_iter()
        .filter(|&s| s != Strategy::Fusion || has_fusion)
        .map(|s| (s, Vec::new()))
        .collect();
    let mut labels: Vec<u32> = Vec::new();
    let mut inputs: Vec<f32> = Vec::new();
    let mut done = 0usize;
    let best = model.best_layer;
    let res = {
        let mut sink = |l: &[u32], logits: &crate::train::net::EvalLogits| -> Result<()> {
            if let Some(d) = &o.dump {
                for (s, v) in dumped.iter_mut() {
                    v.extend_from_slice(eval::strategy_logits(logits, *s, best));
                }
                labels.extend_from_slice(l);
                if d.inputs {
                    let idx: Vec<usize> = (done..done + l.len()).collect();
                    inputs.extend(make_pixels(source.as_ref(), &idx, aug, 0, done).x);
                }
            }
            done += l.len();
            Ok(())
        };
        eval::evaluate_with(&mut net, source, (0..n).collect(), aug, 0, Some((display, "evaluate")), &mut sink)?
    };
    let rows = eval::strategies(&res, o.strategy, best)?;
    let state = model.state.clone().unwrap_or_default();
    let report = Report {
        format: "asge-eval".into(),
        checkpoint: model.path.clone(),
        dataset: dataset.into(),
        data: dir.to_path_buf(),
        model: spec.arch.clone(),
        params_trainable: spec.conv_params() + spec.head_params(),
        epochs: state.epochs_done,
        best_epoch: state.best_epoch,
        stopped_early: None,
        best_val: state.best_val,
        test: rows,
        test_layer_top1: res.layer_acc(),
        test_layer_top5: res.layers.iter().map(|t| t.top5_acc()).collect(),
        test_images: n,
        train_seconds: None,
        train_images_per_s: None,
    };
    if let Some(d) = &o.dump {
        write_dump(d, model, &dumped, &labels, &inputs, n)?;
    }
    Ok((report, res))
}

/// Writes the `--dump-logits` safetensors file: `last`, `best`, `fusion` `[N, classes]` f32, `labels` `[N]`
/// i64, with `--dump-inputs` `inputs` `[N, C, S, S]` f32 in [0, 1] (before the RMS norm).
fn write_dump(
    d: &Dump,
    model: &Model,
    dumped: &[(Strategy, Vec<f32>)],
    labels: &[u32],
    inputs: &[f32],
    n: usize,
) -> Result<()> {
    use safetensors::tensor::{Dtype, TensorView};
    let classes = model.spec.classes;
    let f32b = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let mut bufs: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (s, v) in dumped {
        let name = serde_json::to_value(s)?.as_str().unwrap_or_default().to_string();
        bufs.push((name, Dtype::F32, vec![n, classes], f32b(v)));
    }
    bufs.push(("labels".into(), Dtype::I64, vec![n], labels.iter().flat_map(|&l| (l as i64).to_le_bytes()).collect()));
    if d.inputs {
        let s = model.spec.image_size;
        bufs.push(("inputs".into(), Dtype::F32, vec![n, model.spec.in_channels, s, s], f32b(inputs)));
    }
    let views = bufs
        .iter()
        .map(|(name, dt, shape, b)| Ok((name.clone(), TensorView::new(*dt, shape.clone(), b)?)))
        .collect::<Result<Vec<_>>>()?;
    let meta = std::collections::HashMap::from([
        ("format".to_string(), LOGITS_FORMAT.to_string()),
        ("checkpoint".to_string(), model.path.display().to_string()),
        ("best_layer_number".to_string(), (model.best_layer + 1).to_string()),
        ("last_layer_number".to_string(), model.spec.layers.len().to_string()),
    ]);
    let bytes = safetensors::tensor::serialize(views, Some(meta))?;
    d.output().write(&bytes)?;
    eprintln!(
        "wrote {} ({n} images: {})",
        d.path.display(),
        bufs.iter().map(|b| b.0.as_str()).collect::<Vec<_>>().join(", ")
    );
    Ok(())
}

/// The `format` metadata of a safetensors file, reading only its header.
pub(crate) fn safetensors_format(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > 1 << 24 {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    v.get("__metadata__")?.get("format")?.as_str().map(String::from)
}

/// The source `asge eval` reads, the dataset's name for the report, and its folder.
fn open_eval_data(
    model: &Model,
    data: &EvalData,
    limit: Option<usize>,
) -> Result<(Arc<dyn ImageSource>, String, PathBuf)> {
    let spec = &model.spec;
    let (source, name, dir): (Arc<dyn ImageSource>, String, PathBuf) = match data {
        EvalData::Builtin { kind: DatasetKind::Shards, dir } => {
            (ShardSet::open_train_test(dir)?.1, DatasetKind::Shards.name().into(), dir.clone())
        }
        EvalData::Builtin { kind, dir } => {
            (Arc::new(data::load(*kind, dir, Some(0), limit)?.test), kind.name().into(), dir.clone())
        }
        EvalData::Folder(dir) if dir.join("index.json").exists() => {
            let set = ShardSet::open(dir)?;
            check_class_names(model, dir, &set.index.classes, true)?;
            (Arc::new(set), "shards".into(), dir.clone())
        }
        EvalData::Folder(dir) => {
            let scan = imagefolder::scan(dir)
                .with_context(|| format!("--folder {}: neither a shard folder nor an ImageFolder", dir.display()))?;
            let class_of = check_class_names(model, dir, &scan.classes, false)?;
            let mut files = scan.files;
            files.truncate(limit.unwrap_or(usize::MAX));
            let ds = decode_files(&model.input, &files.iter().map(|f| f.0.clone()).collect::<Vec<_>>())?;
            let labels = files.iter().map(|f| class_of[f.1 as usize]).collect();
            (Arc::new(Dataset { labels, classes: spec.classes, ..ds }), "imagefolder".into(), dir.clone())
        }
    };
    if source.channels() != spec.in_channels || source.classes() != spec.classes {
        bail!(
            "{}: the model takes {} channel(s) and {} classes; {} has {} and {}",
            model.path.display(),
            spec.in_channels,
            spec.classes,
            dir.display(),
            source.channels(),
            source.classes()
        );
    }
    if model.eval_aug() == Augment::None && source.size() != spec.image_size {
        bail!(
            "{}: the model takes {}px images; {} has {}px",
            model.path.display(),
            spec.image_size,
            dir.display(),
            source.size()
        );
    }
    Ok((source, name, dir))
}

/// For each of a folder's classes, the checkpoint's class index of the same name. A shard folder (`exact`) must
/// list the checkpoint's classes in its order, since its labels are indices; an ImageFolder may hold some of them.
fn check_class_names(model: &Model, dir: &Path, names: &[String], exact: bool) -> Result<Vec<u32>> {
    let known = &model.input.class_names;
    if exact {
        if names != known.as_slice() {
            let first = names.iter().zip(known).position(|(a, b)| a != b).unwrap_or(names.len().min(known.len()));
            bail!(
                "{}: its {} classes are not the checkpoint's {} (they differ at class {}: '{}' here, '{}' in {})",
                dir.display(),
                names.len(),
                known.len(),
                first,
                names.get(first).map(String::as_str).unwrap_or("(none)"),
                known.get(first).map(String::as_str).unwrap_or("(none)"),
                model.path.display()
            );
        }
        return Ok((0..names.len() as u32).collect());
    }
    names
        .iter()
        .map(|n| {
            known.iter().position(|k| k == n).map(|i| i as u32).with_context(|| {
                format!(
                    "{}: class folder '{n}' is not a class of {} (its classes: {})",
                    dir.display(),
                    model.path.display(),
                    preview(known)
                )
            })
        })
        .collect()
}

/// The first few names of a list, for messages.
fn preview(names: &[String]) -> String {
    let mut s = names.iter().take(12).map(String::as_str).collect::<Vec<_>>().join(", ");
    if names.len() > 12 {
        s += &format!(", ... ({} in all)", names.len());
    }
    s
}

/// Decodes image files as `input` says, in parallel, into an in-memory dataset (labels 0). A file that does not
/// decode is an error naming it.
pub fn decode_files(input: &InputSpec, files: &[PathBuf]) -> Result<Dataset> {
    let s = input.stored_size;
    let per = input.channels * s * s;
    crate::limits::ensure_fits(
        &format!("{} decoded images of {}x{s}x{s}", files.len(), input.channels),
        (files.len() as u64).saturating_mul(per as u64),
        "fewer images at a time",
    )?;
    let images: Vec<Vec<u8>> = files
        .par_iter()
        .map(|p| input.load(p).with_context(|| format!("{}: cannot use this image", p.display())))
        .collect::<Result<_>>()?;
    Ok(Dataset {
        images: images.concat(),
        labels: vec![0; files.len()],
        channels: input.channels,
        size: s,
        classes: input.class_names.len(),
    })
}
