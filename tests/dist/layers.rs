//! Layer-parallel `asge train` (`--parallel layers`) over the stand-in's NCCL, on dist/train.rs's recipe (3 layers,
//! 5 steps an epoch, fp32) and its single-process reference. Here there is no tolerance: every layer sees the same
//! inputs, weights, dropout keys and lr in the same order as in one process, on the same kernels, so the weights,
//! the AdamW moments, the metrics and the test results must be the same bits.

use super::train::{largest_difference, ok, reference, reference_fp16, train, work, TOLERANCE};
use super::{asge, text};
use std::path::Path;

/// Every tensor of a run's checkpoint `file` (weights, fixed projections, AdamW moments), by name, as bits.
fn tensors(run: &Path, file: &str) -> Vec<(String, Vec<u32>)> {
    let ck = asge::train::checkpoint::load(&run.join(file)).unwrap();
    let mut v: Vec<_> = ck.params.into_iter().map(|(k, (_, v))| (k, v.iter().map(|x| x.to_bits()).collect())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// `metrics.jsonl` without its times.
fn metrics(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    text.lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            for k in ["wall_time", "seconds", "images_per_s"] {
                v.as_object_mut().unwrap().remove(k);
            }
            v
        })
        .collect()
}

/// `summary.json` without its times.
fn summary(run: &Path) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("summary.json")).unwrap()).unwrap();
    for k in ["train_seconds", "train_images_per_s"] {
        v.as_object_mut().unwrap().remove(k);
    }
    v
}

/// `run` is the single-process reference, bit for bit: both checkpoints, the metrics, the test summary.
fn assert_same_as_one_process(run: &Path) {
    assert_same_as(reference(), run)
}

/// `run` is the run `one`, bit for bit.
fn assert_same_as(one: &Path, run: &Path) {
    for file in ["last.safetensors", "best.safetensors"] {
        let (a, b) = (tensors(one, file), tensors(run, file));
        assert_eq!(a.len(), b.len(), "{file}");
        assert!(a.len() > 10, "{file}: weights, projections and moments");
        for ((ka, va), (kb, vb)) in a.iter().zip(&b) {
            assert_eq!(ka, kb);
            assert!(va == vb, "{}: {file}'s {ka} differs from one process's", run.display());
        }
    }
    assert_eq!(metrics(one), metrics(run), "{}: metrics.jsonl", run.display());
    assert_eq!(summary(one), summary(run), "{}: summary.json (the test of the best epoch)", run.display());
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn layers_on_two_and_three_ranks_and_an_uneven_placement_are_one_process_bit_for_bit() {
    // Two ranks, the balanced placement: layers 1-2 (68% of the arithmetic) and layer 3 with the heads.
    let t = ok(&mut train("layers-two", &["--epochs", "2", "--nproc", "2", "--parallel", "layers"]));
    assert!(
        t.contains("2 ranks layer-parallel, rank 0: layers 1-2 (68%), rank 1: layer 3 + fusion heads (32%)"),
        "{t}"
    );
    assert_same_as_one_process(&work().join("layers-two"));
    // Three ranks, a layer each, stopped after the first epoch and resumed by one process.
    let three = ["--epochs", "2", "--nproc", "3", "--parallel", "layers", "--stop-after", "1"];
    ok(&mut train("layers-three", &three));
    let t = ok(asge().args(["train", "--resume"]).arg(work().join("layers-three")).args(["--threads", "2"]));
    assert!(t.contains("resuming at epoch 2 of 2"), "{t}");
    assert_same_as_one_process(&work().join("layers-three"));
    // An uneven placement by hand (layer 1 alone: 4% of the step), resumed data parallel on 3 ranks: the first
    // epoch bit for bit, the second within data parallelism's tolerance (dist/train.rs).
    let uneven = ["--epochs", "2", "--nproc", "2", "--parallel", "layers", "--placement", "1", "--stop-after", "1"];
    let t = ok(&mut train("layers-uneven", &uneven));
    assert!(t.contains("rank 0: layer 1 (4%), rank 1: layers 2-3 + fusion heads (96%)"), "{t}");
    assert_eq!(metrics(reference())[..1], metrics(&work().join("layers-uneven"))[..], "the first epoch");
    let mut c = asge();
    c.args(["train", "--resume"]).arg(work().join("layers-uneven")).args(["--nproc", "3", "--threads", "2"]);
    ok(&mut c);
    let d = largest_difference(reference(), &work().join("layers-uneven"));
    assert!(d <= TOLERANCE, "layers on 2 ranks resumed data parallel on 3, against one process: {d:e}");
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn fp16_layers_on_two_ranks_are_one_process_bit_for_bit() {
    // Layer 2's output (16 channels) goes to rank 1 channels-last, as the layer output stores it in fp16, and rank 1's
    // conv reads it as it arrived.
    ok(&mut train("layers-fp16", &["--epochs", "1", "--precision", "fp16", "--nproc", "2", "--parallel", "layers"]));
    assert_same_as(reference_fp16(), &work().join("layers-fp16"));
}

/// `asge train` of the shared recipe into `out` on 2 ranks in layer mode with `extra`, signalled (see
/// [`super::train::signalled`]).
fn signalled(out: &str, extra: &[&str]) -> String {
    let mut args = vec!["--epochs", "2", "--nproc", "2", "--parallel", "layers", "--log-every", "0"];
    args.extend(extra);
    super::train::signalled(&mut train(out, &args))
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn sigterm_mid_pipeline_drains_to_one_step_and_the_resumed_run_is_one_process_bit_for_bit() {
    // Rank 1 reads the votes a step after the one they rode in, rank 0 two: the pipeline drains to the step rank 0
    // has reached, inside the first epoch, and that checkpoint is a single process's. With a checkpoint every step
    // (every step its own segment, drained) the votes are read in the drains: every rank stops at the first
    // checkpoint after them.
    for (out, extra) in [("layers-signalled", &[][..]), ("layers-signalled-every", &["--checkpoint-every", "1"][..])] {
        let seen = signalled(out, extra);
        assert!(seen.contains("SIGTERM: stopped at step") && seen.contains("continue with --resume"), "{seen}");
        let run = work().join(out);
        let mut resume = asge();
        resume.args(["train", "--resume"]).arg(&run).args(["--nproc", "2", "--parallel", "layers", "--threads", "2"]);
        let t = ok(&mut resume);
        assert!(t.contains("resuming at epoch 1 of 2, step"), "{t}");
        assert_same_as_one_process(&run);
    }
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn a_rank_killed_mid_pipeline_fails_the_others_naming_it_and_placements_are_checked() {
    let t0 = std::time::Instant::now();
    let mut c = train("layers-killed", &["--epochs", "1", "--nproc", "3", "--parallel", "layers"]);
    let o = c.env("ASGE_NCCL_STANDIN_KILL", "1:12").output().unwrap();
    let t = text(&o);
    assert!(!o.status.success() && t.contains("killing rank 1") && t.contains("rank 1 failed"), "{t}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(100), "{:?}: {t}", t0.elapsed());
    for (placement, ranks, why) in [
        ("1", "3", "--placement 1: 1 boundaries for 3 ranks (give 2"),
        ("2,1", "3", "--placement 2,1: each value must be more than the one before it"),
        ("3", "2", "--placement 3: each value must be more than the one before it"),
    ] {
        let args = ["--epochs", "1", "--nproc", ranks, "--parallel", "layers", "--placement", placement];
        let o = train("layers-placed", &args).output().unwrap();
        let t = text(&o);
        assert!(!o.status.success() && t.contains(why), "{placement}: {t}");
        assert!(!work().join("layers-placed").join("last.safetensors").exists(), "{t}");
    }
    let o = train("layers-four", &["--epochs", "1", "--nproc", "4", "--parallel", "layers"]).output().unwrap();
    let t = text(&o);
    assert!(!o.status.success() && t.contains("--parallel layers: 4 ranks for the 3 layers of small"), "{t}");
    let o = train("layers-data", &["--epochs", "1", "--placement", "1"]).output().unwrap();
    assert!(text(&o).contains("--placement places layers on ranks: it needs --parallel layers"), "{}", text(&o));
}
