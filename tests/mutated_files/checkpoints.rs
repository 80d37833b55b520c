//! Mutated safetensors checkpoints against a lenient independent reader.

use super::*;

type Tensors = BTreeMap<String, (Vec<usize>, Vec<u32>)>;

/// A safetensors file read from its definition, leniently: an 8-byte little-endian header length, a JSON object
/// of tensors (dtype, shape, data_offsets into the bytes after the header) and an optional `__metadata__` map of
/// strings. Every tensor must be F32 with offsets inside the data and `4 * prod(shape)` bytes. The values as
/// bits, and the metadata.
fn safetensors_independent(b: &[u8]) -> Option<(Tensors, BTreeMap<String, String>)> {
    let n = u64::from_le_bytes(b.get(..8)?.try_into().ok()?);
    let end = 8u64.checked_add(n)?;
    if end > b.len() as u64 {
        return None;
    }
    let header: serde_json::Value = serde_json::from_slice(&b[8..end as usize]).ok()?;
    let data = &b[end as usize..];
    let (mut tensors, mut meta) = (BTreeMap::new(), BTreeMap::new());
    for (k, v) in header.as_object()? {
        if k == "__metadata__" {
            for (mk, mv) in v.as_object()? {
                meta.insert(mk.clone(), mv.as_str()?.to_string());
            }
            continue;
        }
        if v.get("dtype")?.as_str()? != "F32" {
            return None;
        }
        let shape: Vec<usize> =
            v.get("shape")?.as_array()?.iter().map(|d| d.as_u64().map(|d| d as usize)).collect::<Option<_>>()?;
        let off = v.get("data_offsets")?.as_array()?;
        let (a, z) = (off.first()?.as_u64()? as usize, off.get(1)?.as_u64()? as usize);
        let elems = shape.iter().try_fold(1usize, |p, &d| p.checked_mul(d))?;
        if a > z || z > data.len() || z - a != elems.checked_mul(4)? {
            return None;
        }
        let vals = data[a..z].chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
        tensors.insert(k.clone(), (shape, vals));
    }
    Some((tensors, meta))
}

/// A tiny asge checkpoint (two conv layers of 8 channels on 8x8 one-channel images, 3 classes, with optimizer
/// state, run state and config): about 10 KB.
fn tiny_checkpoint(dir: &Path) -> Vec<u8> {
    use asge::model::{ArchLayer, ArchSpec, ModelOptions, ModelSpec, Params};
    let arch = ArchSpec {
        name: "tiny".into(),
        layers: vec![ArchLayer { channels: 8, pool: false }, ArchLayer { channels: 8, pool: true }],
    };
    let spec = ModelSpec::build(&arch, 1, 8, 3, &ModelOptions::default()).unwrap();
    let p = Params::init(&spec, 5);
    let mut net =
        asge::train::Net::new(asge::backend::cpu::CpuBackend::new(), spec, &p, Default::default(), 2).unwrap();
    // One real step, so that the moments are not zero.
    let x = common::randn(2 * 64, 1.0, 9);
    net.train_step(&x, &[0, 2], 1e-3, 1, None).unwrap();
    let state = asge::train::checkpoint::TrainState { epochs_done: 1, step: 1, best_epoch: 1, ..Default::default() };
    let path = dir.join("valid.safetensors");
    asge::train::checkpoint::save(&path, &net, &state, &serde_json::json!({"train": {}, "model": {}})).unwrap();
    std::fs::read(&path).unwrap()
}

/// A change to a checkpoint's JSON header (re-encoded with a correct length): a tensor's shape, offsets or dtype,
/// or a field of the model table in the metadata, set to an extreme value.
#[derive(Clone, Debug)]
enum HeaderEdit {
    Shape(usize, usize, u64),
    Offsets(usize, u64, u64),
    Dtype(usize, &'static str),
    ModelField(usize, &'static str, u64),
    StateField(&'static str, i64),
}

fn header_edit() -> impl Strategy<Value = HeaderEdit> {
    prop_oneof![
        (0..20usize, 0..4usize, extreme_u64()).prop_map(|(t, d, v)| HeaderEdit::Shape(t, d, v)),
        (0..20usize, extreme_u64(), extreme_u64()).prop_map(|(t, a, z)| HeaderEdit::Offsets(t, a, z)),
        (0..20usize, prop_oneof![Just("F16"), Just("I64"), Just("BF16"), Just("U8")])
            .prop_map(|(t, d)| HeaderEdit::Dtype(t, d)),
        (0..3usize, prop_oneof![Just("c_in"), Just("c_out"), Just("h"), Just("w"), Just("p")], extreme_u64())
            .prop_map(|(l, f, v)| HeaderEdit::ModelField(l, f, v)),
        (prop_oneof![Just("best_layer_number"), Just("epochs_done"), Just("batches_done"), Just("step")], -2i64..5)
            .prop_map(|(f, v)| HeaderEdit::StateField(f, v)),
    ]
}

fn edit_header(valid: &[u8], edits: &[HeaderEdit]) -> Vec<u8> {
    let n = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let mut h: serde_json::Value = serde_json::from_slice(&valid[8..8 + n]).unwrap();
    let names: Vec<String> = h.as_object().unwrap().keys().filter(|k| *k != "__metadata__").cloned().collect();
    for e in edits {
        match e {
            HeaderEdit::Shape(t, d, v) => {
                if let Some(s) = h[&names[t % names.len()]]["shape"].as_array_mut() {
                    if !s.is_empty() {
                        let i = d % s.len();
                        s[i] = (*v).into();
                    }
                }
            }
            HeaderEdit::Offsets(t, a, z) => h[&names[t % names.len()]]["data_offsets"] = serde_json::json!([a, z]),
            HeaderEdit::Dtype(t, d) => h[&names[t % names.len()]]["dtype"] = (*d).into(),
            HeaderEdit::ModelField(l, f, v) => {
                let mut m: serde_json::Value =
                    serde_json::from_str(h["__metadata__"]["asge.model"].as_str().unwrap()).unwrap();
                if let Some(layer) = m["layers"].get_mut(*l) {
                    layer[*f] = (*v).into();
                }
                h["__metadata__"]["asge.model"] = m.to_string().into();
            }
            HeaderEdit::StateField(f, v) => {
                let mut s: serde_json::Value =
                    serde_json::from_str(h["__metadata__"]["asge.state"].as_str().unwrap()).unwrap();
                s[*f] = (*v).into();
                h["__metadata__"]["asge.state"] = s.to_string().into();
            }
        }
    }
    let hb = serde_json::to_vec(&h).unwrap();
    [&(hb.len() as u64).to_le_bytes()[..], &hb, &valid[8 + n..]].concat()
}

#[test]
fn mutated_checkpoints() {
    in_child("checkpoints::mutated_checkpoints", || {
        let dir = case_dir("ckpt");
        let valid = tiny_checkpoint(&dir);
        let tally = Tally::default();
        let strategy = prop_oneof![
            mutations().prop_map(|m| (m, Vec::new())),
            prop::collection::vec(header_edit(), 1..3).prop_map(|e| (Vec::new(), e)),
        ];
        runner()
            .run(&strategy, |(muts, edits)| {
                let b = if edits.is_empty() { apply(&valid, &muts) } else { edit_header(&valid, &edits) };
                let path = dir.join("case.safetensors");
                std::fs::write(&path, &b).unwrap();
                let got = asge::train::checkpoint::load(&path).and_then(|ck| {
                    // What the engine does next with a loaded checkpoint: the tensors for its own model table.
                    if let Some(spec) = &ck.spec {
                        ck.params_for(&path, spec)?;
                    }
                    let t: Tensors = ck
                        .params
                        .iter()
                        .map(|(k, (s, d))| (k.clone(), (s.clone(), d.iter().map(|v| v.to_bits()).collect())))
                        .collect();
                    Ok((t, ck.metadata.into_iter().collect::<BTreeMap<_, _>>()))
                });
                // The engine is stricter than the format: it refuses non-finite values, negative moments, a model
                // table or state that does not hold together, and files the safetensors crate finds irregular
                // (overlapping or unordered offsets, trailing bytes).
                let stricter = |m: &str| {
                    [
                        "NaN or infinite",
                        "negative",
                        "bad asge.",
                        "not a safetensors file",
                        "bad safetensors header",
                        "no tensor",
                        "has shape",
                        "more layers",
                    ]
                    .iter()
                    .any(|k| m.contains(k))
                };
                judge(&tally, got, safetensors_independent(&b), Some(&path), stricter)
            })
            .unwrap();
    });
}
