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

/// Runs `body` in a child process under the address-space limit (the parent's side of the test; `name` is the
/// test's path in this binary), or, in the child, runs it.
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

#[path = "mutated_files/checkpoints.rs"]
mod checkpoints;
#[path = "mutated_files/shards.rs"]
mod shards;

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
