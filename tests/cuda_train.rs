//! `asge train --device cuda` end to end, as a user runs it: the real binary, the real CudaBackend host code, the
//! real kernels; on a GPU, or in CI under the driver stand-in (ASGE_CUDA_STANDIN=1, with its memory checking). A
//! short MNIST run on the device must reproduce the CPU backend's run of the same seed at the same precision:
//! every step's per-layer losses and the final weights, not just an accuracy (on 96 images accuracy would pass
//! for almost anything). And one stream per layer, under the stand-in's random delays, must give exactly the
//! one-stream numbers.
//!
//! Tolerances, from the parity tests (tests/cuda.rs): a loss is a sum the two sides order differently, 1e-4
//! relative in f32; in fp16 a stored value may sit one ulp (1.1e-3 relative) from the emulation's. The weights
//! after the run: Adam moves a weight by about lr times the sign of its gradient, so where a gradient is near zero
//! a last-bit difference can flip the step (2 lr apart, per step); everywhere else the two sides agree to 10% of
//! a step. So every weight must be within 2 lr per step taken, and all but a few (printed) within 10% of a step.
#![cfg(feature = "cuda")]

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const LR: f64 = 2e-4;

/// Runs `asge train` with the given options added, in `out`; returns stderr.
fn train(out: &Path, extra: &[&str], env: &[(&str, &str)]) -> String {
    let data = common::data_dir();
    let mut c = Command::new(env!("CARGO_BIN_EXE_asge"));
    c.args(["train", "--dataset", "mnist", "--data", data.to_str().unwrap(), "--width", "0.125", "--epochs", "1"])
        .args(["--limit-train", "96", "--limit-test", "32", "--val", "0", "--batch", "16", "--log-steps"])
        .args(["--log-every", "1000", "--threads", "2", "--out", out.to_str().unwrap()])
        .args(extra)
        .env("ASGE_KERNEL_CACHE", common::temp_dir("cuda-train-kernels"));
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "asge train {extra:?} failed: {err}");
    err
}

/// The device a run printed in its first line (`... cuda:0 (<name>, sm_90, ...)`).
fn device_of(stderr: &str) -> String {
    let line = stderr.lines().find(|l| l.contains("cuda:0 (")).unwrap_or_default();
    line.split("cuda:0 (").nth(1).and_then(|r| r.split(',').next()).unwrap_or("?").to_string()
}

/// Every step's per-layer and head losses (steps.jsonl).
fn step_losses(run: &Path) -> Vec<(u64, Vec<f64>)> {
    std::fs::read_to_string(run.join("steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let mut losses: Vec<f64> =
                v["layer_loss"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
            losses.push(v["head_loss"].as_f64().unwrap());
            (v["step"].as_u64().unwrap(), losses)
        })
        .collect()
}

/// The trained tensors (no optimizer state) of a checkpoint.
fn weights(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let ck = asge::train::checkpoint::load(path).unwrap();
    ck.params.into_iter().filter(|(k, _)| !k.starts_with("optim.")).map(|(k, (_, d))| (k, d)).collect()
}

#[test]
#[ignore = "needs a CUDA GPU or the stand-in (ASGE_CUDA_STANDIN=1)"]
fn training_on_cuda_matches_the_cpu_run_step_by_step() {
    for precision in ["fp32", "fp16"] {
        let dir = common::temp_dir(&format!("cuda-train-{precision}"));
        let (cpu, gpu) = (dir.join("cpu"), dir.join("cuda"));
        train(&cpu, &["--precision", precision], &[]);
        let err = train(&gpu, &["--precision", precision, "--device", "cuda"], &[]);
        println!("ran on: {}", device_of(&err));
        let (c, g) = (step_losses(&cpu), step_losses(&gpu));
        assert_eq!(c.len(), 6, "96 images in batches of 16");
        assert_eq!(c.iter().map(|s| s.0).collect::<Vec<_>>(), g.iter().map(|s| s.0).collect::<Vec<_>>());
        let rtol = if precision == "fp16" { 1.1e-3 } else { 1e-4 };
        let mut worst = 0.0f64;
        for ((step, a), (_, b)) in c.iter().zip(&g) {
            for (l, (x, y)) in a.iter().zip(b).enumerate() {
                let rel = (x - y).abs() / x.abs();
                worst = worst.max(rel);
                assert!(rel <= rtol, "{precision} step {step} loss {l}: cpu {x} cuda {y} ({rel:e} relative)");
            }
        }
        let (wc, wg) = (weights(&cpu.join("last.safetensors")), weights(&gpu.join("last.safetensors")));
        assert_eq!(wc.keys().collect::<Vec<_>>(), wg.keys().collect::<Vec<_>>());
        let bound = (2.0 * LR * c.len() as f64) as f32;
        let (mut beyond, mut total, mut max) = (0usize, 0usize, 0.0f32);
        for (name, a) in &wc {
            for (x, y) in a.iter().zip(&wg[name]) {
                let d = (x - y).abs();
                assert!(d <= bound, "{precision} {name}: cpu {x} cuda {y}, more than 2 lr per step apart");
                beyond += (d > 0.1 * LR as f32) as usize;
                max = max.max(d);
                total += 1;
            }
        }
        println!("{precision}: losses within {worst:.1e} relative; weights: largest difference {max:.1e}, {beyond} of {total} beyond 10% of a step");
        assert!(
            beyond * 200 <= total,
            "{precision}: {beyond} of {total} weights differ by more than 10% of an Adam step"
        );
    }
}

#[test]
#[ignore = "needs a CUDA GPU or the stand-in (ASGE_CUDA_STANDIN=1)"]
fn a_stream_per_layer_under_random_delays_equals_one_stream() {
    // Every kernel is deterministic: the schedule may only reorder, never change, a number. Under the stand-in,
    // ASGE_CUDA_STANDIN_DELAY sleeps a random time before every queued operation, so an ordering the streams miss
    // shows as a different result (the GPU ignores the variable).
    for precision in ["fp32", "fp16"] {
        let dir = common::temp_dir(&format!("cuda-lanes-{precision}"));
        let (one, eight) = (dir.join("one"), dir.join("eight"));
        let err = train(&one, &["--precision", precision, "--device", "cuda"], &[]);
        println!("ran on: {}", device_of(&err));
        train(
            &eight,
            &["--precision", precision, "--device", "cuda"],
            &[("ASGE_CUDA_LANES", "8"), ("ASGE_CUDA_STANDIN_DELAY", "7:200")],
        );
        assert_eq!(step_losses(&one), step_losses(&eight), "{precision}: per-step losses");
        assert_eq!(
            weights(&one.join("last.safetensors")),
            weights(&eight.join("last.safetensors")),
            "{precision}: weights"
        );
        let summary = |d: &Path| -> serde_json::Value {
            let v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap()).unwrap();
            v["test"].clone()
        };
        assert_eq!(summary(&one), summary(&eight), "{precision}: test results");
    }
}
