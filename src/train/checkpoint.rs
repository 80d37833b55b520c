//! Checkpoints: safetensors with PyTorch names and layouts (`layers.{i}.conv.weight` OIHW,
//! `layers.{i}.conv.bias`, `layers.{i}.proj.weight` `[D, N]`, `layers.{i}.proj.bias`, `heads.{i}.weight`
//! `[N, C]`, `heads.{i}.bias`), all f32; AdamW moments as `optim.<name>.exp_avg` / `.exp_avg_sq`; the model
//! spec, the run config and the training state in the metadata. Written to `<file>.tmp`, synced, renamed:
//! a crash never leaves a half-written checkpoint under the real name.

use super::net::Net;
use crate::backend::Backend;
use crate::model::{HeadParams, LayerParams, ModelSpec, Params};
use anyhow::{bail, Context, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

/// Where a run stands, saved with every checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs completed.
    pub epochs_done: usize,
    /// AdamW steps taken (the bias-correction count).
    pub step: u64,
    /// Best validation accuracy (fusion) so far and its epoch (1-based).
    pub best_val: Option<f64>,
    pub best_epoch: usize,
    /// The layer with the best validation accuracy at the best epoch (0-based): the `best` strategy.
    pub best_layer: usize,
    /// Per-layer validation (or, without validation, training) accuracy at the best epoch.
    pub best_layer_acc: Vec<f64>,
    /// Batches of epoch `epochs_done` (0-based) already trained: non-zero only in a mid-epoch checkpoint.
    #[serde(default)]
    pub batches_done: usize,
    /// The running sums of that unfinished epoch's metrics.
    #[serde(default)]
    pub partial_epoch: Option<serde_json::Value>,
}

/// Everything a checkpoint file holds.
pub struct Checkpoint {
    pub spec: Option<ModelSpec>,
    pub params: HashMap<String, (Vec<usize>, Vec<f32>)>,
    pub state: Option<TrainState>,
    pub config: Option<serde_json::Value>,
    pub metadata: HashMap<String, String>,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Shapes and names of a spec's tensors (without the optimizer state).
pub fn tensor_shapes(spec: &ModelSpec) -> Vec<(String, Vec<usize>)> {
    let n = spec.classes;
    let mut v = Vec::new();
    for (i, l) in spec.layers.iter().enumerate() {
        v.push((format!("layers.{i}.conv.weight"), vec![l.c_out, l.c_in, 3, 3]));
        v.push((format!("layers.{i}.conv.bias"), vec![l.c_out]));
        v.push((format!("layers.{i}.proj.weight"), vec![l.goodness_dim(), n]));
        v.push((format!("layers.{i}.proj.bias"), vec![n]));
    }
    for i in spec.head_layers() {
        v.push((format!("heads.{i}.weight"), vec![n, spec.layers[i].c_out]));
        v.push((format!("heads.{i}.bias"), vec![n]));
    }
    v
}

fn flat_params(spec: &ModelSpec, p: &Params) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let mut data: Vec<&Vec<f32>> = Vec::new();
    for l in &p.layers {
        data.extend([&l.conv_w, &l.conv_b, &l.proj_w, &l.proj_b]);
    }
    for h in &p.heads {
        data.extend([&h.w, &h.b]);
    }
    tensor_shapes(spec).into_iter().zip(data).map(|((name, shape), d)| (name, shape, d.clone())).collect()
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

/// Writes `bytes` to `path` atomically (temp file, fsync, rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("{}: write failed", tmp.display()))?;
    f.sync_all().with_context(|| format!("{}: sync failed", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    Ok(())
}

/// Saves the model, its optimizer state, the run state and config.
pub fn save<B: Backend>(path: &Path, net: &Net<B>, state: &TrainState, config: &serde_json::Value) -> Result<()> {
    let be = net.backend();
    let mut tensors = flat_params(&net.spec, &net.params()?);
    for (name, p) in net.named_params() {
        let shape = tensors.iter().find(|t| t.0 == name).map(|t| t.1.clone()).unwrap_or_else(|| vec![p.len]);
        tensors.push((format!("optim.{name}.exp_avg"), shape.clone(), be.read(&p.exp_avg, p.len)?));
        tensors.push((format!("optim.{name}.exp_avg_sq"), shape, be.read(&p.exp_avg_sq, p.len)?));
    }
    let mut meta = model_metadata(&net.spec);
    meta.insert("asge.state".into(), serde_json::to_string(state)?);
    meta.insert("asge.config".into(), serde_json::to_string(config)?);
    write_atomic(path, &serialize(&tensors, meta)?)
}

/// Saves parameters only (no optimizer state), e.g. for `--init` files.
pub fn save_params(path: &Path, spec: &ModelSpec, params: &Params) -> Result<()> {
    write_atomic(path, &serialize(&flat_params(spec, params), model_metadata(spec))?)
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
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file ({e})", path.display()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: bad safetensors header ({e})", path.display()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let mut params = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            bail!("{}: tensor {name} is {:?}; asge checkpoints are f32", path.display(), view.dtype());
        }
        let data = view.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        params.insert(name, (view.shape().to_vec(), data));
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
    let spec = json(&metadata, "asge.model", path)?;
    let state = json(&metadata, "asge.state", path)?;
    let config = json(&metadata, "asge.config", path)?;
    Ok(Checkpoint { spec, params, state, config, metadata })
}

impl Checkpoint {
    fn tensor(&self, path: &Path, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let (have, data) = self
            .params
            .get(name)
            .with_context(|| format!("{}: no tensor {name} (the checkpoint does not fit the model)", path.display()))?;
        if have != shape {
            bail!("{}: tensor {name} has shape {have:?}, the model needs {shape:?}", path.display());
        }
        Ok(data.clone())
    }

    /// The parameters for `spec`, checking every name and shape.
    pub fn params_for(&self, path: &Path, spec: &ModelSpec) -> Result<Params> {
        let mut layers = Vec::new();
        let n = spec.classes;
        for (i, l) in spec.layers.iter().enumerate() {
            layers.push(LayerParams {
                conv_w: self.tensor(path, &format!("layers.{i}.conv.weight"), &[l.c_out, l.c_in, 3, 3])?,
                conv_b: self.tensor(path, &format!("layers.{i}.conv.bias"), &[l.c_out])?,
                proj_w: self.tensor(path, &format!("layers.{i}.proj.weight"), &[l.goodness_dim(), n])?,
                proj_b: self.tensor(path, &format!("layers.{i}.proj.bias"), &[n])?,
            });
        }
        let mut heads = Vec::new();
        for i in spec.head_layers() {
            heads.push(HeadParams {
                w: self.tensor(path, &format!("heads.{i}.weight"), &[n, spec.layers[i].c_out])?,
                b: self.tensor(path, &format!("heads.{i}.bias"), &[n])?,
            });
        }
        if self.params.contains_key(&format!("layers.{}.conv.weight", spec.layers.len())) {
            bail!("{}: the checkpoint has more layers than the model ({})", path.display(), spec.layers.len());
        }
        Ok(Params { layers, heads })
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
