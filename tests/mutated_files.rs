//! Property tests of every reader on mutated files: small valid IDX, CIFAR, safetensors checkpoint, shard index
//! and model JSON files (a few KB each) with bytes flipped, lengths cut, and header fields set to extreme values.
//! For each case the reader must not panic, must not abort, must stay within bounded memory, and must either
//! return a clean error or exactly the values that a small independent parser (written here, from the formats'
//! definitions) reads from the same bytes.
//!
//! Each property runs in a child process (this test binary again, told by an environment variable which test to
//! run) under `prlimit --as`, so that a reader that tries to allocate what a mutated header announces aborts the
//! child and fails the test, without capping the address space of the other tests. 200 cases per format, from a
//! fixed seed (`ASGE_PROPTEST_SEED=<hex>` draws others).

mod common;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

const CHILD: &str = "ASGE_MUTATION_CHILD";
const CASES: u32 = 200;
/// The child's address-space limit: far above what a reader of a few-KB file needs, far below what a mutated
/// header can announce.
const AS_LIMIT: &str = "--as=1500000000";

/// Runs `body` in a child process under the address-space limit (the parent's side of the test), or, in the
/// child, runs it.
fn in_child(name: &str, body: impl FnOnce()) {
    if std::env::var(CHILD).as_deref() == Ok(name) {
        body();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("prlimit")
        .args([AS_LIMIT, "--"])
        .arg(exe)
        .args([name, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD, name)
        .env("MALLOC_ARENA_MAX", "2")
        .env("RAYON_NUM_THREADS", "2")
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{name} in its child process ({}): {stdout}\n{stderr}",
        out.status
    );
    // The child prints its count of cases and their outcomes: both kinds must occur, and every case must count.
    let tally = stdout.split("cases: ").nth(1).and_then(|t| t.lines().next()).unwrap_or_default().to_string();
    let nums: Vec<usize> = tally.split_whitespace().filter_map(|w| w.trim_end_matches(',').parse().ok()).collect();
    println!("{name}: {tally}");
    assert!(
        nums.len() == 2 && nums[0] > 0 && nums[1] > 0 && nums[0] + nums[1] >= CASES as usize * 9 / 10,
        "{name}: too few cases ran, or only one outcome: '{tally}'"
    );
}

fn runner() -> TestRunner {
    let seed: Vec<u8> = match std::env::var("ASGE_PROPTEST_SEED") {
        Ok(hex) => {
            (0..32).map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2).unwrap_or("00"), 16).unwrap_or(0)).collect()
        }
        Err(_) => (0..32u8).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect(),
    };
    let cfg = Config { cases: CASES, failure_persistence: None, max_shrink_iters: 200, ..Config::default() };
    TestRunner::new_with_rng(cfg, TestRng::from_seed(RngAlgorithm::ChaCha, &seed))
}

/// One change to a file's bytes. Positions are fractions of the length, so that one strategy serves every file.
#[derive(Clone, Debug)]
enum Mutation {
    /// XOR a byte.
    Flip(f64, u8),
    /// Keep the first fraction of the file.
    Cut(f64),
    /// Overwrite 4 bytes at a 4-aligned offset among the first 64 (the binary headers) with a big-endian value.
    HeaderU32(usize, u32),
    /// Overwrite 8 bytes at an offset with a little-endian value (safetensors' header length).
    U64(f64, u64),
    /// Insert bytes.
    Insert(f64, Vec<u8>),
    /// Append bytes.
    Append(Vec<u8>),
}

fn extreme_u32() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(1), Just(u32::MAX), Just(0x8000_0000), Just(0x7fff_ffff), Just(1 << 16), any::<u32>()]
}

fn extreme_u64() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(1), Just(u64::MAX), Just(1 << 32), Just(1 << 63), any::<u64>(), 0u64..20_000]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (0.0..1.0f64, 1..=255u8).prop_map(|(p, x)| Mutation::Flip(p, x)),
        2 => (0.0..1.0f64).prop_map(Mutation::Cut),
        3 => (0..16usize, extreme_u32()).prop_map(|(i, v)| Mutation::HeaderU32(i, v)),
        1 => (0.0..0.2f64, extreme_u64()).prop_map(|(p, v)| Mutation::U64(p, v)),
        1 => (0.0..1.0f64, prop::collection::vec(any::<u8>(), 1..16)).prop_map(|(p, b)| Mutation::Insert(p, b)),
        1 => prop::collection::vec(any::<u8>(), 1..64).prop_map(Mutation::Append),
    ]
}

fn mutations() -> impl Strategy<Value = Vec<Mutation>> {
    prop::collection::vec(mutation(), 1..4)
}

fn apply(bytes: &[u8], muts: &[Mutation]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let at = |len: usize, p: f64| ((p * len as f64) as usize).min(len.saturating_sub(1));
    for m in muts {
        match m {
            Mutation::Flip(p, x) if !b.is_empty() => {
                let i = at(b.len(), *p);
                b[i] ^= x;
            }
            Mutation::Cut(p) => b.truncate((p * b.len() as f64) as usize),
            Mutation::HeaderU32(i, v) if 4 * i + 4 <= b.len() => b[4 * i..4 * i + 4].copy_from_slice(&v.to_be_bytes()),
            Mutation::U64(p, v) if b.len() >= 8 => {
                let i = at(b.len() - 7, *p);
                b[i..i + 8].copy_from_slice(&v.to_le_bytes());
            }
            Mutation::Insert(p, ins) => {
                let i = at(b.len() + 1, *p);
                b.splice(i..i, ins.iter().copied());
            }
            Mutation::Append(extra) => b.extend_from_slice(extra),
            _ => {}
        }
    }
    b
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

/// Tallies of what the reader did, printed by the child.
#[derive(Default)]
struct Tally {
    accepted: std::cell::Cell<usize>,
    refused: std::cell::Cell<usize>,
}

impl Drop for Tally {
    fn drop(&mut self) {
        println!(
            "cases: {} accepted with the independent parser's values, {} refused with a clean error",
            self.accepted.get(),
            self.refused.get()
        );
    }
}

/// The reader's result against the independent parser's: equal values, or a clean error (naming `path`, when
/// given) where the bytes are not a valid file; a valid file that the reader refuses is allowed only when the
/// reader's stricter checks say why (`refusal_ok`).
fn judge<T: PartialEq + std::fmt::Debug>(
    tally: &Tally,
    got: anyhow::Result<T>,
    want: Option<T>,
    path: Option<&Path>,
    refusal_ok: impl Fn(&str) -> bool,
) -> Result<(), TestCaseError> {
    match (got, want) {
        (Ok(g), Some(w)) => {
            prop_assert_eq!(g, w);
            tally.accepted.set(tally.accepted.get() + 1);
        }
        (Ok(g), None) => return Err(TestCaseError::fail(format!("accepted an invalid file as {g:?}"))),
        (Err(e), want) => {
            let msg = format!("{e:#}");
            if let Some(p) = path {
                prop_assert!(msg.contains(&p.display().to_string()), "the error does not name the file: {}", msg);
            }
            if want.is_some() && !refusal_ok(&msg) {
                return Err(TestCaseError::fail(format!("refused a valid file: {msg}")));
            }
            tally.refused.set(tally.refused.get() + 1);
        }
    }
    Ok(())
}

fn case_dir(tag: &str) -> PathBuf {
    common::temp_dir(&format!("mut-{tag}"))
}

// IDX ---------------------------------------------------------------------------------------------------------

/// An IDX file of u8 with `ndim` dimensions, read from its definition: magic 0 0 8 ndim, ndim big-endian u32
/// dimensions, then exactly their product of bytes.
fn idx_independent(b: &[u8], ndim: usize) -> Option<(Vec<usize>, Vec<u8>)> {
    if b.len() < 4 || b[..3] != [0, 0, 8] || b[3] as usize != ndim || b.len() < 4 + 4 * ndim {
        return None;
    }
    let dims: Vec<usize> =
        (0..ndim).map(|i| u32::from_be_bytes(b[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let n: u128 = dims.iter().map(|&d| d as u128).product();
    (n == (b.len() - 4 - 4 * ndim) as u128).then(|| (dims, b[4 + 4 * ndim..].to_vec()))
}

/// Gunzips (every member) with a cap, as the independent side of the gzip cases.
fn gunzip(b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::MultiGzDecoder::new(b).take(1 << 24).read_to_end(&mut out).ok()?;
    Some(out)
}

#[test]
fn mutated_idx_files() {
    in_child("mutated_idx_files", || {
        let dir = case_dir("idx");
        let pixels = common::randn(10 * 36, 1.0, 3).iter().map(|v| (v.abs() * 60.0) as u8).collect::<Vec<_>>();
        let mut valid = vec![0, 0, 8, 3];
        for d in [10u32, 6, 6] {
            valid.extend(d.to_be_bytes());
        }
        valid.extend(&pixels);
        let tally = Tally::default();
        // mode 0: raw, mode 1: the mutated bytes gzipped, mode 2: the gzip stream mutated, mode 3: dimensions
        // whose product wraps around 2^64 to the payload's size (2^22 x 2^21 x 2^21 = 2^64 = 0 bytes), mutated.
        let wraps: Vec<u8> = [0x0000_0803u32, 1 << 22, 1 << 21, 1 << 21].iter().flat_map(|d| d.to_be_bytes()).collect();
        runner()
            .run(&(mutations(), 0..4u8), |(muts, mode)| {
                let path = dir.join("train-images-idx3-ubyte.gz");
                let (file, want) = match mode {
                    0 => {
                        let b = apply(&valid, &muts);
                        // A raw file that happens to start with the gzip magic is read as gzip: mode 2 covers that.
                        prop_assume!(!b.starts_with(&[0x1f, 0x8b]));
                        (b.clone(), idx_independent(&b, 3))
                    }
                    1 => {
                        let b = apply(&valid, &muts);
                        (gzip(&b), idx_independent(&b, 3))
                    }
                    3 => {
                        let b = apply(&wraps, &muts[1..]);
                        (b.clone(), idx_independent(&b, 3))
                    }
                    _ => {
                        let z = apply(&gzip(&valid), &muts);
                        let want = if z.starts_with(&[0x1f, 0x8b]) { gunzip(&z) } else { Some(z.clone()) };
                        (z, want.and_then(|b| idx_independent(&b, 3)))
                    }
                };
                std::fs::write(&path, &file).unwrap();
                let got = asge::data::idx::read_idx_u8(&path, 3).map(|r| (r.dims, r.data));
                judge(&tally, got, want, Some(&path), |_| false)
            })
            .unwrap();
    });
}

// CIFAR -------------------------------------------------------------------------------------------------------

/// CIFAR binary records: `label_bytes` label bytes (the last is the class; CIFAR-100's first, the coarse label,
/// is below 20) and 3072 pixels, a whole number of records, at least one.
fn cifar_independent(b: &[u8], label_bytes: usize, classes: usize) -> Option<(Vec<u8>, Vec<u32>)> {
    let rec = label_bytes + 3072;
    if b.is_empty() || !b.len().is_multiple_of(rec) {
        return None;
    }
    let (mut images, mut labels) = (Vec::new(), Vec::new());
    for r in b.chunks(rec) {
        if (r[label_bytes - 1] as usize) >= classes || (label_bytes == 2 && r[0] >= 20) {
            return None;
        }
        labels.push(r[label_bytes - 1] as u32);
        images.extend_from_slice(&r[label_bytes..]);
    }
    Some((images, labels))
}

#[test]
fn mutated_cifar_files() {
    in_child("mutated_cifar_files", || {
        let dir = case_dir("cifar");
        let tally = Tally::default();
        runner()
            .run(&(mutations(), any::<bool>()), |(muts, hundred)| {
                let (lb, classes) = if hundred { (2, 100) } else { (1, 10) };
                let mut valid = Vec::new();
                for i in 0..2u8 {
                    if hundred {
                        valid.push(i + 3);
                    }
                    valid.push(i + 1);
                    valid.extend((0..3072).map(|k| (k * 7 + i as usize) as u8));
                }
                // Put mutations in the labels often: flip the first byte of a record.
                let b = apply(&valid, &muts);
                let path = dir.join("data_batch_1.bin");
                std::fs::write(&path, &b).unwrap();
                let got = asge::data::cifar::read_cifar_bin(&path, lb, classes);
                judge(&tally, got, cifar_independent(&b, lb, classes), Some(&path), |_| false)
            })
            .unwrap();
    });
}

// safetensors checkpoints ---------------------------------------------------------------------------------------

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
    in_child("mutated_checkpoints", || {
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

// Shard folders ---------------------------------------------------------------------------------------------

/// A shard folder's records read from its index's definition: the shards in order, each `count` records of
/// `channels * size * size` bytes in a file of exactly that size, and one little-endian u16 label per record,
/// each below the class count; every file name a plain name in the folder.
fn shards_independent(dir: &Path) -> Option<Vec<(Vec<u8>, u32)>> {
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("index.json")).ok()?).ok()?;
    let u = |v: &serde_json::Value| v.as_u64().map(|x| x as usize);
    let (c, s, rec) = (u(&idx["channels"])?, u(&idx["size"])?, u(&idx["record_bytes"])?);
    if idx["format"] != "asge-shards" || idx["version"] != 1 || !(c == 1 || c == 3) || s == 0 || s > 1 << 14 {
        return None;
    }
    if c.checked_mul(s)?.checked_mul(s)? != rec {
        return None;
    }
    let classes = idx["classes"].as_array()?.len();
    let plain = |n: &str| !n.is_empty() && n != "." && n != ".." && !n.contains('/') && !n.contains('\0');
    let labels_file = idx["labels_file"].as_str()?;
    if classes == 0 || !plain(labels_file) {
        return None;
    }
    let mut records = Vec::new();
    for sh in idx["shards"].as_array()? {
        let (file, first, count) = (sh["file"].as_str()?, u(&sh["first"])?, u(&sh["count"])?);
        if !plain(file) || first != records.len() {
            return None;
        }
        let bytes = std::fs::read(dir.join(file)).ok()?;
        if bytes.len() != count.checked_mul(rec)? {
            return None;
        }
        records.extend(bytes.chunks(rec).map(|r| r.to_vec()));
    }
    if records.len() != u(&idx["count"])? {
        return None;
    }
    let lb = std::fs::read(dir.join(labels_file)).ok()?;
    if lb.len() != 2 * records.len() {
        return None;
    }
    let labels: Vec<u32> = lb.chunks(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect();
    if labels.iter().any(|&l| l as usize >= classes) {
        return None;
    }
    Some(records.into_iter().zip(labels).collect())
}

#[derive(Clone, Debug)]
enum ShardEdit {
    /// Set an index field (by JSON pointer) to a number.
    Number(&'static str, i64),
    Huge(&'static str),
    Text(&'static str, &'static str),
    /// Mutate a file's bytes.
    File(&'static str, Vec<Mutation>),
    /// Mutate index.json's text.
    IndexBytes(Vec<Mutation>),
}

fn shard_edit() -> impl Strategy<Value = ShardEdit> {
    let field = prop_oneof![
        Just("/count"),
        Just("/channels"),
        Just("/size"),
        Just("/record_bytes"),
        Just("/shards/0/count"),
        Just("/shards/1/first"),
        Just("/shards/2/count"),
        Just("/version"),
    ];
    let file_field = prop_oneof![Just("/shards/0/file"), Just("/labels_file"), Just("/shards/1/file")];
    let name = prop_oneof![
        Just("../index.json"),
        Just("/etc/passwd"),
        Just(""),
        Just("."),
        Just("shard-00000.bin"),
        Just("labels.u16")
    ];
    prop_oneof![
        (field.clone(), -3i64..40).prop_map(|(f, v)| ShardEdit::Number(f, v)),
        field.prop_map(ShardEdit::Huge),
        (file_field, name).prop_map(|(f, n)| ShardEdit::Text(f, n)),
        (prop_oneof![Just("shard-00000.bin"), Just("labels.u16"), Just("shard-00002.bin")], mutations())
            .prop_map(|(f, m)| ShardEdit::File(f, m)),
        mutations().prop_map(ShardEdit::IndexBytes),
    ]
}

#[test]
fn mutated_shard_folders() {
    in_child("mutated_shard_folders", || {
        let base = case_dir("shard-base");
        for c in 0..2 {
            std::fs::create_dir_all(base.join(format!("in/c{c}"))).unwrap();
            for k in 0..3 {
                image::RgbImage::from_fn(10, 10, |x, y| image::Rgb([(x + k) as u8, (y * c) as u8, 9]))
                    .save(base.join(format!("in/c{c}/{k}.png")))
                    .unwrap();
            }
        }
        let o = asge::data::shard::ShardOptions {
            size: 4,
            resize: asge::data::imagefolder::ResizeMode::Squash,
            shard_bytes: 2 * 48,
            quiet: true,
        };
        asge::data::shard::write_shards(&base.join("in"), &base.join("out"), &o).unwrap();
        let files = ["index.json", "labels.u16", "shard-00000.bin", "shard-00001.bin", "shard-00002.bin"];
        let dir = case_dir("shard-case");
        let tally = Tally::default();
        runner()
            .run(&prop::collection::vec(shard_edit(), 1..3), |edits| {
                for f in files {
                    std::fs::copy(base.join("out").join(f), dir.join(f)).unwrap();
                }
                for e in &edits {
                    let ip = dir.join("index.json");
                    let mut idx: serde_json::Value =
                        serde_json::from_slice(&std::fs::read(&ip).unwrap()).unwrap_or_default();
                    match e {
                        ShardEdit::Number(f, v) => {
                            if let Some(x) = idx.pointer_mut(f) {
                                *x = (*v).into();
                            }
                        }
                        ShardEdit::Huge(f) => {
                            if let Some(x) = idx.pointer_mut(f) {
                                *x = u64::MAX.into();
                            }
                        }
                        ShardEdit::Text(f, t) => {
                            if let Some(x) = idx.pointer_mut(f) {
                                *x = (*t).into();
                            }
                        }
                        ShardEdit::File(f, m) => {
                            let b = std::fs::read(dir.join(f)).unwrap();
                            std::fs::write(dir.join(f), apply(&b, m)).unwrap();
                            continue;
                        }
                        ShardEdit::IndexBytes(m) => {
                            let b = std::fs::read(&ip).unwrap();
                            std::fs::write(&ip, apply(&b, m)).unwrap();
                            continue;
                        }
                    }
                    std::fs::write(&ip, serde_json::to_vec(&idx).unwrap()).unwrap();
                }
                let got = asge::data::shard::ShardSet::open(&dir).map(|set| {
                    use asge::data::ImageSource;
                    (0..set.len()).map(|i| (set.image(i).to_vec(), set.label(i))).collect::<Vec<_>>()
                });
                judge(&tally, got, shards_independent(&dir), Some(&dir), |_| false)
            })
            .unwrap();
    });
}

// Model JSON ------------------------------------------------------------------------------------------------

/// The layer table a model JSON describes, from its definition: `{"name", "layers": [{"channels", "pool"}]}`,
/// channels scaled by the width to a multiple of 8 (at least 8), maps halved after a pooling layer, every layer
/// given a non-empty map. `(c_in, c_out, side, pool)` per layer.
fn model_independent(text: &[u8], width: f64) -> Option<Vec<(usize, usize, usize, bool)>> {
    let v: serde_json::Value = serde_json::from_slice(text).ok()?;
    let o = v.as_object()?;
    if !o.keys().all(|k| k == "name" || k == "layers") {
        return None;
    }
    o.get("name")?.as_str()?;
    let layers = o.get("layers")?.as_array()?;
    if layers.is_empty() {
        return None;
    }
    let (mut c_in, mut side, mut out) = (1usize, 32usize, Vec::new());
    for l in layers {
        let lo = l.as_object()?;
        if !lo.keys().all(|k| k == "channels" || k == "pool") {
            return None;
        }
        let c = lo.get("channels")?.as_u64()?;
        let pool = match lo.get("pool") {
            None => false,
            Some(p) => p.as_bool()?,
        };
        let scaled = ((c as f64 * width / 8.0).round() * 8.0).max(8.0);
        if c == 0 || side == 0 || (pool && side < 2) || c as f64 * width < 1.0 {
            return None;
        }
        out.push((c_in, scaled as usize, side, pool));
        c_in = scaled as usize;
        if pool {
            side /= 2;
        }
    }
    Some(out)
}

#[test]
fn mutated_model_json() {
    in_child("mutated_model_json", || {
        let dir = case_dir("model");
        let valid = br#"{"name": "m", "layers": [{"channels": 16}, {"channels": 32, "pool": true}, {"channels": 64, "pool": true}, {"channels": 64}]}"#;
        let tally = Tally::default();
        let channel = prop_oneof![
            1 => Just(serde_json::json!(0)),
            1 => Just(serde_json::json!(7)),
            1 => Just(serde_json::json!(u64::MAX)),
            1 => Just(serde_json::json!(1u64 << 20)),
            1 => Just(serde_json::json!((1u64 << 20) + 1)),
            1 => Just(serde_json::json!(-1)),
            1 => Just(serde_json::json!(1.5)),
            1 => Just(serde_json::json!("8")),
            8 => (1u64..5000).prop_map(|c| serde_json::json!(c)),
        ];
        let edit = prop_oneof![
            (0..6usize, channel).prop_map(|(l, c)| (l, "channels", c)),
            (
                0..6usize,
                prop_oneof![Just(serde_json::json!(true)), Just(serde_json::json!(1)), Just(serde_json::json!(null))]
            )
                .prop_map(|(l, p)| (l, "pool", p)),
            (0..6usize).prop_map(|l| (l, "extra", serde_json::json!(1))),
        ];
        let width = prop_oneof![4 => Just(0.125), 4 => Just(1.0), 2 => Just(0.5), 1 => Just(0.01), 1 => Just(3.7), 1 => Just(1e6), 1 => Just(1e300)];
        let strategy = (
            prop_oneof![
                1 => mutations().prop_map(|m| (m, Vec::new(), 0usize)),
                2 => (prop::collection::vec(edit, 0..3), 0..8usize).prop_map(|(e, extra)| (Vec::new(), e, extra)),
            ],
            width,
        );
        runner()
            .run(&strategy, |((muts, edits, extra_layers), width)| {
                let text = if edits.is_empty() && extra_layers == 0 {
                    apply(valid, &muts)
                } else {
                    let mut v: serde_json::Value = serde_json::from_slice(valid).unwrap();
                    let layers = v["layers"].as_array_mut().unwrap();
                    for i in 0..extra_layers {
                        layers.push(serde_json::json!({"channels": 8 * (i + 1), "pool": i % 2 == 0}));
                    }
                    for (l, f, val) in &edits {
                        let n = layers.len();
                        layers[l % n][*f] = val.clone();
                    }
                    serde_json::to_vec(&v).unwrap()
                };
                let path = dir.join("arch.json");
                std::fs::write(&path, &text).unwrap();
                let opts = asge::model::ModelOptions { width, ..Default::default() };
                let got = asge::model::resolve(path.to_str().unwrap(), 1, 32, 10, &opts).and_then(|spec| {
                    spec.validate()?;
                    // The estimate that guards the allocation must itself never overflow or panic.
                    let _ = asge::train::net::host_memory_estimate(&spec, 128, 1024, true);
                    Ok(spec.layers.iter().map(|l| (l.c_in, l.c_out, l.h, l.pool)).collect::<Vec<_>>())
                });
                // Refusals the format does not know about: the engine's channel cap.
                judge(&tally, got, model_independent(&text, width), None, |m| {
                    m.contains("at most") || m.contains("1 to")
                })
            })
            .unwrap();
    });
}
