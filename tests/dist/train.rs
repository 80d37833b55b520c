//! Data-parallel `asge train` over the stand-in's NCCL: a small model (3 layers of 8, 16 and 16 channels) on 256
//! MNIST images, 32 of them validation, so 224 train in batches of 48 (5 steps an epoch; the last batch of 32
//! splits unevenly over 3 ranks, 11, 11 and 10), 64 test images, fp32; one single-process run is the reference
//! every test shares.
//!
//! The tolerance against one process, argued from the summation order: a rank's share of a gradient is summed in
//! another order than one process sums the whole batch (the shares are f32 sums of at most 48 x 784 terms, then
//! added over the ranks), so each gradient element differs by a relative ~1e-6 (worst case ~1e-4). AdamW divides
//! the first moment by the root of the second, so such an error changes a step by about that fraction of the lr
//! (2e-4): ~1e-10, at worst 2e-8 a step, 2e-7 over the 10 steps of two epochs. 1e-5 on weights of magnitude ~1
//! is a 40x margin over the worst case and 20x below a step of the lr, which a lost or doubled share moves
//! every weight by.

use super::{asge, text, STANDIN};
use crate::common;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const MODEL: &str =
    r#"{"name": "small", "layers": [{"channels": 8}, {"channels": 16, "pool": true}, {"channels": 16}]}"#;
pub(super) const TOLERANCE: f32 = 1e-5;

pub(super) fn work() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = common::temp_dir("dist-train");
        std::fs::write(d.join("model.json"), MODEL).unwrap();
        d
    })
}

/// `asge train` of the shared recipe into `out` (under the work folder), with `extra` options.
/// (`--batch 48` and `--device cuda` unless `extra` gives them.)
pub(super) fn train(out: &str, extra: &[&str]) -> Command {
    let mut c = asge();
    c.args(["train", "--dataset", "mnist", "--data"]).arg(common::data_dir().join("mnist"));
    c.arg("--model").arg(work().join("model.json"));
    c.args(["--limit-train", "256", "--val", "32", "--limit-test", "64", "--lr", "2e-4"]);
    c.args(["--threads", "2", "--timeout", "120", "--out"]).arg(work().join(out));
    for (flag, default) in [("--batch", "48"), ("--device", "cuda")] {
        if !extra.contains(&flag) {
            c.args([flag, default]);
        }
    }
    c.args(extra);
    c
}

pub(super) fn ok(c: &mut Command) -> String {
    let o = c.output().unwrap();
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    t
}

/// The single-process reference: two epochs.
pub(super) fn reference() -> &'static Path {
    static DONE: OnceLock<PathBuf> = OnceLock::new();
    DONE.get_or_init(|| {
        ok(&mut train("one", &["--epochs", "2"]));
        work().join("one")
    })
}

/// Runs `c` (an `asge train` launcher), sends it SIGTERM once rank 0 has started (its handlers are in place), and
/// returns what it printed, once it exited with SIGTERM's code.
pub(super) fn signalled(c: &mut Command) -> String {
    use std::io::{BufRead, BufReader};
    let mut child = c.stderr(std::process::Stdio::piped()).stdout(std::process::Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        seen.push_str(&l);
        seen.push('\n');
        if l.contains("shows its curves") {
            // SAFETY: kill(2) on the launcher this test started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            break;
        }
    }
    seen.extend(lines.map(|l| l.unwrap() + "\n"));
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143), "{seen}");
    seen
}

/// The single-process reference in fp16: one epoch.
pub(super) fn reference_fp16() -> &'static Path {
    static DONE: OnceLock<PathBuf> = OnceLock::new();
    DONE.get_or_init(|| {
        ok(&mut train("one-fp16", &["--epochs", "1", "--precision", "fp16"]));
        work().join("one-fp16")
    })
}

/// Two ranks (`--nproc 2`), two epochs, and what rank 0 printed.
fn two_ranks() -> &'static (PathBuf, String) {
    static DONE: OnceLock<(PathBuf, String)> = OnceLock::new();
    DONE.get_or_init(|| {
        let t = ok(&mut train("two", &["--epochs", "2", "--nproc", "2"]));
        (work().join("two"), t)
    })
}

/// The trained tensors of a run's last checkpoint, by name.
fn weights(run: &Path) -> Vec<(String, Vec<f32>)> {
    let ck = asge::train::checkpoint::load(&run.join("last.safetensors")).unwrap();
    let mut v: Vec<_> = ck
        .params
        .into_iter()
        .filter(|(k, _)| k.ends_with("conv.weight") || k.ends_with("conv.bias") || k.starts_with("heads."))
        .map(|(k, (_, v))| (k, v))
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(v.len(), 10, "3 layers' conv weight and bias, 2 heads' weight and bias");
    v
}

/// The largest difference between two runs' trained tensors.
pub(super) fn largest_difference(a: &Path, b: &Path) -> f32 {
    let (wa, wb) = (weights(a), weights(b));
    let mut worst = 0f32;
    for ((ka, va), (kb, vb)) in wa.iter().zip(&wb) {
        assert_eq!((ka, va.len()), (kb, vb.len()));
        worst = va.iter().zip(vb).map(|(x, y)| (x - y).abs()).fold(worst, f32::max);
    }
    worst
}

fn same_bits(a: &Path, b: &Path) -> bool {
    weights(a).iter().zip(&weights(b)).all(|((_, x), (_, y))| x.iter().zip(y).all(|(p, q)| p.to_bits() == q.to_bits()))
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn two_and_three_ranks_train_as_one_process_does() {
    let _ = STANDIN;
    let one = reference();
    let (two, t) = two_ranks();
    assert!(t.contains("2 ranks data-parallel (24 images each a step)"), "{t}");
    // Rank 0 alone prints progress and writes the folder.
    assert_eq!(t.matches("asge: run folder").count(), 2, "{t}");
    let d = largest_difference(one, two);
    assert!(d <= TOLERANCE && d > 0.0, "2 ranks against one process: {d:e}");
    // Three ranks (shares of 16; the last batch as 11, 11 and 10), stopped after an epoch and resumed by one
    // process.
    ok(&mut train("three", &["--epochs", "2", "--nproc", "3", "--stop-after", "1"]));
    let t = ok(asge().args(["train", "--resume"]).arg(work().join("three")).args(["--threads", "2"]));
    assert!(t.contains("resuming at epoch 2 of 2"), "{t}");
    let d = largest_difference(one, &work().join("three"));
    assert!(d <= TOLERANCE, "3 ranks, resumed on one process, against one process: {d:e}");
    // The metrics agree too: the ranks' loss sums and hit counts add up to the global batch's.
    let metrics = |run: &str| std::fs::read_to_string(work().join(run).join("metrics.jsonl")).unwrap();
    let acc = |m: &str| m.split("\"val_fusion_acc\":").nth(2).map(|s| s.split(',').next().unwrap().to_string());
    assert_eq!(acc(&metrics("one")), acc(&metrics("two")), "{}\n{}", metrics("one"), metrics("two"));
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn resume_from_two_ranks_on_three_and_one_and_the_same_ranks_give_the_same_bits() {
    let one = reference();
    ok(&mut train("two-stopped", &["--epochs", "2", "--nproc", "2", "--stop-after", "1"]));
    for (copy, ranks) in [("on-three", Some("3")), ("on-one", None)] {
        let dir = work().join(copy);
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["config.json", "metrics.jsonl", "last.safetensors", "best.safetensors"] {
            std::fs::copy(work().join("two-stopped").join(f), dir.join(f)).unwrap();
        }
        let mut c = asge();
        c.args(["train", "--resume"]).arg(&dir).args(["--threads", "2", "--timeout", "120"]);
        if let Some(n) = ranks {
            c.args(["--nproc", n]);
        }
        ok(&mut c);
        let d = largest_difference(one, &dir);
        assert!(d <= TOLERANCE, "2 ranks, resumed {copy}, against one process: {d:e}");
    }
    // The same rank count twice: the same bits (the stand-in's NCCL reduces in rank order, as a ring does the
    // same way every time).
    ok(&mut train("two-again", &["--epochs", "2", "--nproc", "2"]));
    assert!(same_bits(&two_ranks().0, &work().join("two-again")), "two runs of 2 ranks differ");
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn torchrun_and_slurm_start_training_ranks_that_agree_with_nproc() {
    ok(&mut train("nproc-1ep", &["--epochs", "1", "--nproc", "2"]));
    // torchrun --no-python, as the README runs it.
    let torch = std::env::var("ASGE_TORCH").expect("ASGE_TORCH: the folder tools/test.sh installs PyTorch into");
    let mut c = Command::new("python3");
    c.args(["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--no-python"]);
    c.arg(env!("CARGO_BIN_EXE_asge")).env("PYTHONPATH", torch);
    let args = train("torchrun-1ep", &["--epochs", "1"]);
    c.args(args.get_args());
    ok(&mut c);
    assert!(same_bits(&work().join("nproc-1ep"), &work().join("torchrun-1ep")), "torchrun's run differs");
    // Slurm's variables on two ranks started by hand, as srun starts them.
    let port = super::free_port().to_string();
    let ranks: Vec<_> = (0..2)
        .map(|r| {
            train("slurm-1ep", &["--epochs", "1"])
                .envs([("SLURM_PROCID", r.to_string()), ("SLURM_NTASKS", "2".into()), ("SLURM_LOCALID", r.to_string())])
                .envs([("MASTER_ADDR", "127.0.0.1".to_string()), ("MASTER_PORT", port.clone())])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for r in ranks {
        let o = r.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", text(&o));
    }
    assert!(same_bits(&work().join("nproc-1ep"), &work().join("slurm-1ep")), "Slurm's run differs");
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn sigterm_mid_epoch_stops_every_rank_at_one_step_and_the_resumed_run_is_the_same() {
    let two = &two_ranks().0;
    // Every rank votes to stop with its next step, the ranks read the votes a step later, and all stop after that
    // step.
    let seen = signalled(&mut train("two-signalled", &["--epochs", "2", "--nproc", "2", "--log-every", "0"]));
    assert!(seen.contains("SIGTERM: stopped at step") && seen.contains("continue with --resume"), "{seen}");
    let t = ok(asge().args(["train", "--resume"]).arg(work().join("two-signalled")).args(["--nproc", "2"]));
    assert!(t.contains("resuming at epoch 1 of 2, step"), "{t}");
    assert!(same_bits(two, &work().join("two-signalled")), "the resumed run differs");
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn ranks_whose_weights_differ_a_killed_rank_and_the_cpu_are_refused() {
    // The weights' check across ranks: one bit of difference on rank 1 is an error naming the tensor.
    let o = train("differ", &["--epochs", "1", "--nproc", "2"]).env("ASGE_TEST_WEIGHTS_DIFFER_ON_RANK", "1").output();
    let (o, t) = (o.as_ref().unwrap(), text(o.as_ref().unwrap()));
    assert!(!o.status.success() && t.contains("the ranks' weights differ at layers.0.conv.weight"), "{t}");
    assert!(!work().join("differ").join("last.safetensors").exists(), "{t}");
    // Ranks that do not see the same data (here: told to use different numbers of images) stop before training.
    let port = super::free_port().to_string();
    let ranks: Vec<_> = [("0", "256"), ("1", "240")]
        .into_iter()
        .map(|(r, n)| {
            let mut c = asge();
            c.args(["train", "--dataset", "mnist", "--data"]).arg(common::data_dir().join("mnist"));
            c.arg("--model").arg(work().join("model.json")).args(["--limit-train", n, "--val", "32", "--epochs", "1"]);
            c.args(["--batch", "48", "--device", "cuda", "--timeout", "60", "--out"]).arg(work().join("unlike"));
            c.envs([("SLURM_PROCID", r), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", r), ("MASTER_ADDR", "127.0.0.1")]);
            c.env("MASTER_PORT", &port).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for r in ranks {
        let o = r.wait_with_output().unwrap();
        let t = text(&o);
        assert!(!o.status.success() && t.contains("the 2 ranks do not start alike: the training images is"), "{t}");
    }
    // A rank killed inside a collective: the other fails naming it, within seconds, not --timeout.
    let t0 = std::time::Instant::now();
    let o = train("killed", &["--epochs", "1", "--nproc", "2"]).env("ASGE_NCCL_STANDIN_KILL", "1:4").output().unwrap();
    let t = text(&o);
    assert!(!o.status.success() && t.contains("killing rank 1") && t.contains("rank 1 failed"), "{t}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(100), "{:?}: {t}", t0.elapsed());
    // Several ranks train on GPUs only.
    let o = train("cpu", &["--epochs", "1", "--nproc", "2", "--device", "cpu"]).output().unwrap();
    let t = text(&o);
    assert!(!o.status.success() && t.contains("--device cpu: --nproc started 2 ranks"), "{t}");
    assert!(!work().join("cpu").exists(), "{t}");
    // --batch must split evenly.
    let o = train("odd", &["--epochs", "1", "--nproc", "3", "--batch", "50"]).output().unwrap();
    let t = text(&o);
    assert!(!o.status.success() && t.contains("--batch 50: the global batch is split evenly over the 3 ranks"), "{t}");
}

#[test]
#[ignore = "needs the CUDA stand-in (ASGE_CUDA_STANDIN=1)"]
fn fp16_two_ranks_train_as_one_process_does() {
    // The same argument as in fp32: the forward is the same per sample, and the weight gradient's dL/dz is scaled
    // by a power of two chosen from the share's batch (half the global batch's: the same fp16 rounding, a binade
    // lower), so again only the order of the f32 sums differs.
    ok(&mut train("two-fp16", &["--epochs", "1", "--precision", "fp16", "--nproc", "2"]));
    let d = largest_difference(reference_fp16(), &work().join("two-fp16"));
    assert!(d <= TOLERANCE && d > 0.0, "2 ranks against one process in fp16: {d:e}");
}
