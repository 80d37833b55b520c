//! `asge export`: a checkpoint as an ONNX inference graph of one prediction strategy, or as a weights-only
//! safetensors file (the model's tensors under their checkpoint names, the model table, the input spec and the
//! class names in the metadata; no optimizer state).

pub mod onnx;
pub mod proto;

use crate::eval::Strategy;
use crate::files;
use crate::infer::Model;
use crate::train::checkpoint;
use anyhow::{bail, Result};
use std::path::Path;

pub use crate::train::checkpoint::WEIGHTS_FORMAT;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Onnx,
    Safetensors,
}

/// Writes the export of `checkpoint` to `out` (refusing a file it did not write: only an earlier export of the
/// same format is replaced). Returns a one-line description of what was written.
pub fn export(checkpoint: &Path, format: Format, strategy: Option<Strategy>, out: &Path) -> Result<String> {
    let ours = |p: &Path| match format {
        Format::Onnx => onnx_producer_is_asge(p),
        Format::Safetensors => {
            checkpoint::load(p).is_ok_and(|c| c.metadata.get("format").map(String::as_str) == Some("asge-weights"))
        }
    };
    let kind = match format {
        Format::Onnx => "an ONNX file asge exported",
        Format::Safetensors => "a weights file asge exported",
    };
    files::note_input(checkpoint);
    let output = files::Output { path: out, flag: "--out", kind, ours: &ours };
    output.check()?;
    let model = Model::open(checkpoint)?;
    let spec = &model.spec;
    let (bytes, what) = match format {
        Format::Safetensors => {
            if strategy.is_some() {
                bail!("--strategy: a safetensors export holds the whole model (every strategy); it applies to --format onnx");
            }
            let bytes = checkpoint::weights_only(spec, &model.params, Some(&model.input), true)?;
            (
                bytes,
                format!(
                    "the weights of {} layers and {} heads, no optimizer state",
                    spec.layers.len(),
                    spec.head_layers().len()
                ),
            )
        }
        Format::Onnx => {
            let (strategy, why) = model.strategy_or_default(strategy);
            if strategy == Strategy::All {
                bail!("--strategy all: an ONNX export computes one strategy (last, best-layer or fusion)");
            }
            model.check_strategy(strategy)?;
            let layer = match strategy {
                Strategy::Best => format!("layer {}", model.best_layer + 1),
                Strategy::Fusion => {
                    format!("layers 1..{} and the heads of 2..{}", spec.layers.len(), spec.layers.len())
                }
                _ => format!("layer {}", spec.layers.len()),
            };
            let doc = format!(
                "asge {} {}: strategy {} ({layer}); input [N, {}, {}, {}] in [0, 1], output logits [N, {}]",
                spec.arch,
                checkpoint.display(),
                strategy.label(),
                spec.in_channels,
                spec.image_size,
                spec.image_size,
                spec.classes
            );
            let bytes = onnx::build(spec, &model.params, &model.input, strategy, model.best_layer, &doc);
            (bytes, format!("ONNX opset {}, strategy {} ({layer}; {why})", onnx::OPSET, strategy.label()))
        }
    };
    output.write(&bytes)?;
    Ok(format!("wrote {} ({:.1} MB): {what}", out.display(), bytes.len() as f64 / 1e6))
}

/// True for an ONNX file whose producer is asge: the first fields of its ModelProto hold
/// `producer_name: "asge"` (field 2) within its first bytes.
fn onnx_producer_is_asge(p: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 64];
    let Ok(mut f) = std::fs::File::open(p) else { return false };
    let n = f.read(&mut head).unwrap_or(0);
    head[..n].windows(6).any(|w| w == b"\x12\x04asge")
}
