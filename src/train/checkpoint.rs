//! Checkpoints: safetensors with PyTorch names and layouts (`layers.{i}.conv.weight` OIHW,
//! `layers.{i}.conv.bias`, `layers.{i}.proj.weight` `[D, N]`, `layers.{i}.proj.bias`, `heads.{i}.weight`
//! `[N, C]`, `heads.{i}.bias`), all f32; AdamW moments as `optim.<name>.exp_avg` / `.exp_avg_sq`; the model
//! spec, the run config and the training state in the metadata. Written through [`crate::files::write_atomic`]
//! (a unique temporary file, synced, renamed): a crash never leaves a half-written checkpoint under the real name.
//!
//! Nothing non-finite is ever saved or loaded: [`save`] refuses a model or optimizer state with a NaN or an
//! infinity (or a negative second moment), naming the layer and the tensor, so the last good checkpoint stays;
//! [`load`] refuses such a file, and checks the model table and run state in its metadata as strictly as a model
//! JSON is checked.

use super::net::Net;
use crate::backend::Backend;
use crate::data::input::InputSpec;
use crate::files::write_atomic;
use crate::model::{ModelSpec, Params, Tensor};
use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// Where a run stands, saved with every checkpoint (as [`StateFile`]: layers counted from 1, as everywhere a
/// person reads them).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(into = "StateFile", try_from = "StateFile")]
pub struct TrainState {
    /// Epochs completed.
    pub epochs_done: usize,
    /// AdamW steps taken (the bias-correction count).
    pub step: u64,
    /// Best validation accuracy (fusion) so far and its epoch (1-based).
    pub best_val: Option<f64>,
    pub best_epoch: usize,
    /// The layer with the best validation accuracy at the best epoch, as an index (0-based): the `best` strategy.
    pub best_layer: usize,
    /// Per-layer validation (or, without validation, training) accuracy at the best epoch.
    pub best_layer_acc: Vec<f64>,
    /// Batches of epoch `epochs_done` (0-based) already trained: non-zero only in a mid-epoch checkpoint.
    pub batches_done: usize,
    /// The running sums of that unfinished epoch's metrics.
    pub partial_epoch: Option<serde_json::Value>,
}

/// [`TrainState`] as the `asge.state` metadata spells it: `best_layer_number` counts from 1. Files written before
/// it existed have `best_layer`, 0-based; they still read.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateFile {
    epochs_done: usize,
    step: u64,
    best_val: Option<f64>,
    best_epoch: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    best_layer_number: Option<usize>,
    /// The 0-based index of earlier files.
    #[serde(default, skip_serializing)]
    best_layer: Option<usize>,
    best_layer_acc: Vec<f64>,
    #[serde(default)]
    batches_done: usize,
    #[serde(default)]
    partial_epoch: Option<serde_json::Value>,
}

impl From<TrainState> for StateFile {
    fn from(s: TrainState) -> Self {
        StateFile {
            epochs_done: s.epochs_done,
            step: s.step,
            best_val: s.best_val,
            best_epoch: s.best_epoch,
            best_layer_number: Some(s.best_layer + 1),
            best_layer: None,
            best_layer_acc: s.best_layer_acc,
            batches_done: s.batches_done,
            partial_epoch: s.partial_epoch,
        }
    }
}

impl TryFrom<StateFile> for TrainState {
    type Error = String;
    fn try_from(f: StateFile) -> std::result::Result<Self, String> {
        let best_layer = match (f.best_layer_number, f.best_layer) {
            (Some(0), _) => return Err("best_layer_number 0: layers count from 1".into()),
            (Some(n), _) => n - 1,
            (None, Some(i)) => i,
            (None, None) => return Err("no best_layer_number".into()),
        };
        Ok(TrainState {
            epochs_done: f.epochs_done,
            step: f.step,
            best_val: f.best_val,
            best_epoch: f.best_epoch,
            best_layer,
            best_layer_acc: f.best_layer_acc,
            batches_done: f.batches_done,
            partial_epoch: f.partial_epoch,
        })
    }
}

/// Everything a checkpoint file holds.
pub struct Checkpoint {
    pub spec: Option<ModelSpec>,
    pub params: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub state: Option<TrainState>,
    pub config: Option<serde_json::Value>,
    /// How image files become inputs, and the class names (absent in files written before asge kept them).
    pub input: Option<InputSpec>,
    pub metadata: HashMap<String, String>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Shapes and names of a spec's tensors (without the optimizer state).
pub fn tensor_shapes(spec: &ModelSpec) -> Vec<(String, Vec<usize>)> {
    spec.tensors().into_iter().map(|t| (t.name(), t.shape(spec))).collect()
}

fn flat_params(spec: &ModelSpec, p: &Params) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    spec.tensors().into_iter().map(|t| (t.name(), t.shape(spec), p.get(t).clone())).collect()
}

/// Metadata that describes the model, in the keys the reference fixtures use, plus `asge.model`.
fn model_metadata(spec: &ModelSpec) -> HashMap<String, String> {
    let mut m = HashMap::new();
    m.insert("asge.model".into(), serde_json::to_string(spec).unwrap());
    m.insert("arch".into(), spec.arch.clone());
    m.insert("width".into(), spec.width.to_string());
    m.insert("in_ch".into(), spec.in_channels.to_string());
    m.insert("classes".into(), spec.classes.to_string());
    m.insert("img".into(), spec.image_size.to_string());
    m.insert("alpha".into(), spec.alpha.to_string());
    m.insert("goodness".into(), serde_json::to_value(spec.goodness).unwrap().as_str().unwrap().to_string());
    m.insert("downsample".into(), serde_json::to_value(spec.pool_kind).unwrap().as_str().unwrap().to_string());
    m.insert("P".into(), format!("{:?}", spec.layers.iter().map(|l| l.p).collect::<Vec<_>>()));
    m.insert("D".into(), format!("{:?}", spec.goodness_dims()));
    m
}

/// Who a tensor belongs to, for messages: `layer 3 (layers.2.conv.weight)`, with layers counted from 1 as every
/// table counts them, and the tensor's own 0-based name.
pub fn describe_tensor(name: &str) -> String {
    let base = name.strip_prefix("optim.").unwrap_or(name);
    let mut parts = base.split('.');
    match (parts.next(), parts.next().and_then(|i| i.parse::<usize>().ok())) {
        (Some("layers"), Some(i)) => format!("layer {} ({name})", i + 1),
        (Some("heads"), Some(i)) => format!("the fusion head of layer {} ({name})", i + 1),
        _ => name.to_string(),
    }
}

/// An error when `data` (the tensor `name`) holds a NaN or an infinity, or, for a second moment, a negative value.
pub fn check_finite(name: &str, data: &[f32]) -> Result<()> {
    let bad = data.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        bail!("{}: {bad} of {} values are NaN or infinite", describe_tensor(name), data.len());
    }
    if name.ends_with(".exp_avg_sq") {
        let neg = data.iter().filter(|&&v| v < 0.0).count();
        if neg > 0 {
            bail!("{}: {neg} of {} second moments are negative", describe_tensor(name), data.len());
        }
    }
    Ok(())
}

/// Saves the model, its optimizer state, the run state and config. Refuses (writing nothing) when any of it is
/// non-finite, so a diverged run never replaces its last good checkpoint.
pub fn save<B: Backend>(path: &Path, net: &Net<B>, state: &TrainState, config: &serde_json::Value) -> Result<()> {
    let bytes = encode(path, net, state, config)?;
    check_readable(&bytes, path).with_context(|| {
        format!(
            "{}: asge's own checkpoint reader would refuse this checkpoint; it was not written (a bug)",
            path.display()
        )
    })?;
    write_atomic(path, &bytes)
}

/// The bytes [`save`] writes to `path` (refused when any tensor is non-finite).
pub fn encode<B: Backend>(
    path: &Path,
    net: &Net<B>,
    state: &TrainState,
    config: &serde_json::Value,
) -> Result<Vec<u8>> {
    let be = net.backend();
    let mut tensors = flat_params(&net.spec, &net.params()?);
    for (name, p) in net.named_params() {
        let shape = tensors.iter().find(|t| t.0 == name).map(|t| t.1.clone()).unwrap_or_else(|| vec![p.len]);
        tensors.push((format!("optim.{name}.exp_avg"), shape.clone(), be.read(&p.exp_avg, p.len)?));
        tensors.push((format!("optim.{name}.exp_avg_sq"), shape, be.read(&p.exp_avg_sq, p.len)?));
    }
    for (name, _, data) in &tensors {
        check_finite(name, data).with_context(|| {
            format!(
                "after step {}: the model diverged; {} was not written (the previous checkpoint is kept)",
                state.step,
                path.display()
            )
        })?;
    }
    let mut meta = model_metadata(&net.spec);
    meta.insert("asge.state".into(), serde_json::to_string(state)?);
    meta.insert("asge.config".into(), serde_json::to_string(config)?);
    if let Some(input) = config.get("input") {
        meta.insert("asge.input".into(), serde_json::to_string(input)?);
    }
    serialize(&tensors, meta)
}

/// Checks `bytes`, a checkpoint about to be written as `path`, with what every reader of a run checkpoint does
/// (`--resume`, `eval`, `predict`, `export`): the file parses, its metadata passes the checks [`load`] makes (the
/// model table, the training state, the input spec), its run config's options read back, and its tensors fit its
/// model table. The writer calls it before every write and a run calls it on its first state before training,
/// so a run can never end with checkpoints its own loader refuses.
pub fn check_readable(bytes: &[u8], path: &Path) -> Result<()> {
    // The values were checked finite as they were encoded; the names, shapes and metadata are checked here.
    let ck = parse_with(bytes, path, false)?;
    let spec = ck.spec.as_ref().with_context(|| format!("{}: no asge.model metadata", path.display()))?;
    ck.state.as_ref().with_context(|| format!("{}: no asge.state metadata", path.display()))?;
    if let Some(train) = ck.config.as_ref().and_then(|c| c.get("train")) {
        serde_json::from_value::<super::config::TrainConfig>(train.clone())
            .with_context(|| format!("{}: asge.config's train options do not read back", path.display()))?;
    }
    ck.check_fits(path, spec)?;
    Ok(())
}

/// Saves parameters only (no optimizer state), e.g. for `--init` files. Unlike [`save`] it writes what it is
/// given, finite or not (tests use it to make damaged files; [`load`] refuses those).
pub fn save_params(path: &Path, spec: &ModelSpec, params: &Params) -> Result<()> {
    write_atomic(path, &weights_only(spec, params, None, false)?)
}

/// The `format` metadata of a weights-only export (`asge export --format safetensors`).
pub const WEIGHTS_FORMAT: &str = "asge-weights";

/// A weights-only safetensors file (the model's tensors, no optimizer state) with the model table and, given,
/// the input spec and class names in the metadata: `asge export --format safetensors`.
pub fn weights_only(spec: &ModelSpec, params: &Params, input: Option<&InputSpec>, export: bool) -> Result<Vec<u8>> {
    let mut meta = model_metadata(spec);
    if export {
        meta.insert("format".into(), WEIGHTS_FORMAT.into());
    }
    if let Some(input) = input {
        meta.insert("asge.input".into(), serde_json::to_string(input)?);
    }
    serialize(&flat_params(spec, params), meta)
}

fn serialize(tensors: &[(String, Vec<usize>, Vec<f32>)], meta: HashMap<String, String>) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|(n, s, d)| (n.clone(), s.clone(), f32_bytes(d))).collect();
    let views: Vec<(String, TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| Ok((n.clone(), TensorView::new(Dtype::F32, s.clone(), b)?)))
        .collect::<Result<_>>()?;
    Ok(safetensors::tensor::serialize(views, Some(meta))?)
}

/// Reads a checkpoint. Every tensor must be f32.
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read checkpoint", path.display()))?;
    parse(&bytes, path)
}

/// Reads a checkpoint from its bytes (`path` names it in messages).
pub fn parse(bytes: &[u8], path: &Path) -> Result<Checkpoint> {
    parse_with(bytes, path, true)
}

/// [`parse`]; without `data`, only the tensors' names and shapes are kept (their values are neither copied nor
/// checked), for [`check_readable`].
fn parse_with(bytes: &[u8], path: &Path, data: bool) -> Result<Checkpoint> {
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file ({e})", path.display()))?;
    let (_, header) = SafeTensors::read_metadata(bytes)
        .map_err(|e| anyhow::anyhow!("{}: bad safetensors header ({e})", path.display()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let mut params = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            bail!("{}: tensor {name} is {:?}; asge checkpoints are f32", path.display(), view.dtype());
        }
        if !data {
            params.insert(name, (view.shape().to_vec(), Vec::new()));
            continue;
        }
        let values: Vec<f32> =
            view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        check_finite(&name, &values).with_context(|| format!("{}: a damaged checkpoint", path.display()))?;
        params.insert(name, (view.shape().to_vec(), values));
    }
    // The three JSON documents asge keeps in the metadata; absent in files written elsewhere.
    fn json<T: serde::de::DeserializeOwned>(
        meta: &HashMap<String, String>,
        key: &str,
        path: &Path,
    ) -> Result<Option<T>> {
        meta.get(key)
            .map(|s| serde_json::from_str(s).with_context(|| format!("{}: bad {key} metadata", path.display())))
            .transpose()
    }
    let spec: Option<ModelSpec> = json(&metadata, "asge.model", path)?;
    let state: Option<TrainState> = json(&metadata, "asge.state", path)?;
    let config = json(&metadata, "asge.config", path)?;
    let input: Option<InputSpec> = json(&metadata, "asge.input", path)?;
    if let Some(spec) = &spec {
        spec.validate().with_context(|| format!("{}: bad asge.model metadata", path.display()))?;
        if let Some(state) = &state {
            state.validate(spec).with_context(|| format!("{}: bad asge.state metadata", path.display()))?;
        }
        if let Some(input) = &input {
            input
                .validate(spec.in_channels, spec.image_size, spec.classes)
                .with_context(|| format!("{}: bad asge.input metadata", path.display()))?;
        }
    }
    Ok(Checkpoint { spec, params, state, config, input, metadata })
}

impl TrainState {
    /// Checks the state against the model it belongs to (layer indices and per-layer lists in range).
    pub fn validate(&self, spec: &ModelSpec) -> Result<()> {
        let layers = spec.layers.len();
        if self.best_layer >= layers {
            bail!("best layer {} of a {layers}-layer model", self.best_layer + 1);
        }
        if !self.best_layer_acc.is_empty() && self.best_layer_acc.len() != layers {
            bail!("best_layer_acc has {} entries for {layers} layers", self.best_layer_acc.len());
        }
        if self.best_layer_acc.iter().chain(self.best_val.iter()).any(|a| !(0.0..=1.0).contains(a)) {
            bail!("an accuracy outside [0, 1]");
        }
        if self.best_epoch > self.epochs_done {
            bail!("best epoch {} after {} epochs done", self.best_epoch, self.epochs_done);
        }
        if (self.batches_done > 0) != self.partial_epoch.is_some() {
            bail!("batches_done {} without the matching partial-epoch metrics", self.batches_done);
        }
        Ok(())
    }
}

impl Checkpoint {
    fn tensor_ref(&self, path: &Path, name: &str, shape: &[usize]) -> Result<&Vec<f32>> {
        let (have, data) = self
            .params
            .get(name)
            .with_context(|| format!("{}: no tensor {name} (the checkpoint does not fit the model)", path.display()))?;
        if have != shape {
            bail!("{}: tensor {name} has shape {have:?}, the model needs {shape:?}", path.display());
        }
        Ok(data)
    }

    fn tensor(&self, path: &Path, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.tensor_ref(path, name, shape).cloned()
    }

    /// Checks that the file holds every tensor `spec` needs, with its shape, and no layer more, without copying
    /// anything ([`Checkpoint::params_for`] copies them).
    pub fn check_fits(&self, path: &Path, spec: &ModelSpec) -> Result<()> {
        for (name, shape) in tensor_shapes(spec) {
            self.tensor_ref(path, &name, &shape)?;
        }
        if self.params.contains_key(&Tensor::ConvW(spec.layers.len()).name()) {
            bail!("{}: the checkpoint has more layers than the model ({})", path.display(), spec.layers.len());
        }
        Ok(())
    }

    /// The parameters for `spec`, checking every name and shape.
    pub fn params_for(&self, path: &Path, spec: &ModelSpec) -> Result<Params> {
        self.check_fits(path, spec)?;
        let mut params = Params::empty(spec);
        for t in spec.tensors() {
            *params.get_mut(t) = self.tensor(path, &t.name(), &t.shape(spec))?;
        }
        Ok(params)
    }

    /// Puts the saved AdamW moments into `net`'s optimizer state.
    pub fn restore_optimizer<B: Backend>(&self, path: &Path, net: &mut Net<B>) -> Result<()> {
        net.for_each_param_mut(|be, name, p| {
            let shape = self.params.get(name).map(|t| t.0.clone()).unwrap_or_else(|| vec![p.len]);
            be.write(&mut p.exp_avg, &self.tensor(path, &format!("optim.{name}.exp_avg"), &shape)?)?;
            be.write(&mut p.exp_avg_sq, &self.tensor(path, &format!("optim.{name}.exp_avg_sq"), &shape)?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_file_counts_layers_from_one_and_reads_the_old_zero_based_key() {
        let s = TrainState { best_layer: 2, best_layer_acc: vec![0.5; 4], ..Default::default() };
        let text = serde_json::to_string(&s).unwrap();
        assert!(text.contains("\"best_layer_number\":3") && !text.contains("\"best_layer\":"), "{text}");
        assert_eq!(serde_json::from_str::<TrainState>(&text).unwrap(), s);
        let old = text.replace("\"best_layer_number\":3", "\"best_layer\":2");
        assert_eq!(serde_json::from_str::<TrainState>(&old).unwrap(), s);
        let zero = text.replace("\"best_layer_number\":3", "\"best_layer_number\":0");
        assert!(serde_json::from_str::<TrainState>(&zero).is_err());
    }
}
