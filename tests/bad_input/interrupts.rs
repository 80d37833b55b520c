//! tests/bad_input.rs: interrupts, stops in every phase and resumes (bit for bit, or refused with a reason).

use super::*;

/// The run the signal tests interrupt and resume: 900 training and 300 validation images of `data/m` (make it
/// with `sb.mnist("data/m", 1200, 200)`), batch 16, a progress line every step, into `out`.
fn interrupted_run(out: &str, epochs: usize) -> Vec<String> {
    let epochs = epochs.to_string();
    [
        "train",
        "--dataset",
        "mnist",
        "--data",
        "data/m",
        "--width",
        "0.125",
        "--epochs",
        &epochs,
        "--batch",
        "16",
        "--val",
        "300",
        "--lr",
        "1e-3",
        "--threads",
        "2",
        "--log-every",
        "0",
        "--out",
        out,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A run's summary.json without its timings (which differ between an interrupted and an uninterrupted run).
fn summary(sb: &Sandbox, dir: &str) -> serde_json::Value {
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.p(&format!("{dir}/summary.json"))).unwrap()).unwrap();
    let o = v.as_object_mut().unwrap();
    o.remove("train_seconds");
    o.remove("train_images_per_s");
    v
}

#[test]
fn sigterm_checkpoints_exits_143_and_the_resumed_run_is_bit_identical() {
    let sb = Sandbox::new("sigterm");
    sb.mnist("data/m", 1200, 200);
    let run = |out: &str| interrupted_run(out, 3);
    let straight = run("straight");
    sb.asge(&args(&straight, &[])).ok();
    for (sig, code) in [("TERM", 143), ("INT", 130)] {
        let out = format!("cut-{sig}");
        let a = run(&out);
        // Interrupt once the run has printed a step of its second epoch (not after a fixed sleep).
        let (got, seen) = stop_at(&sb, &args(&a, &[]), &[], "epoch 2/3 step 5/", sig);
        assert_eq!(got, code, "{seen}");
        no_panic(&seen);
        assert!(seen.contains(&format!("SIG{sig}: stopped at step")) && seen.contains("--resume"), "{seen}");
        let state = checkpoint::load(&sb.p(&format!("{out}/last.safetensors"))).unwrap().state.unwrap();
        assert!(state.epochs_done == 1 && state.batches_done >= 5, "{state:?}");
        assert!(!sb.p(&format!("{out}/summary.json")).exists());
        sb.asge(&["train", "--resume", &out, "--quiet"]).ok();
        for f in ["last.safetensors", "best.safetensors"] {
            assert_eq!(tensors(&sb.p(&format!("straight/{f}"))), tensors(&sb.p(&format!("{out}/{f}"))), "{sig}: {f}");
        }
        assert_eq!(summary(&sb, "straight"), summary(&sb, &out), "{sig}: the summary, best epoch included");
    }
}

// 3. Resume is bit-exact: run state survives JSON exactly.

#[test]
fn run_state_reads_back_from_json_to_the_same_bits() {
    // 4/85 is one of the values serde_json's default float parser reads back one ulp off.
    let state = checkpoint::TrainState {
        epochs_done: 3,
        best_val: Some(4.0 / 85.0),
        best_layer_acc: (1..200).map(|i| i as f64 / 997.0).chain([4.0 / 85.0, 0.1 + 0.2]).collect(),
        ..Default::default()
    };
    let back: checkpoint::TrainState = serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();
    assert_eq!(back.best_val.map(f64::to_bits), state.best_val.map(f64::to_bits));
    let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&back.best_layer_acc), bits(&state.best_layer_acc));
}

// 4. Sizes from files and options: checked, estimated, refused with one clear error.

/// Starts `asge args` (with `env`), reads its stderr until a line contains `at`, sends `signal` (`KILL`, `TERM`,
/// ...), and returns its exit code and everything it printed.
fn stop_at(sb: &Sandbox, args: &[&str], env: &[(&str, &str)], at: &str, signal: &str) -> (i32, String) {
    use std::os::unix::process::ExitStatusExt;
    let mut child = sb.command(args, env).stderr(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut l = String::new();
        if err.read_line(&mut l).unwrap() == 0 {
            break;
        }
        seen += &l;
        if l.contains(at) {
            break;
        }
    }
    assert!(seen.contains(at), "never printed '{at}': {seen}");
    assert!(Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap().success());
    err.read_to_string(&mut seen).unwrap();
    let status = child.wait().unwrap();
    (status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)), seen)
}

#[test]
fn a_stop_in_any_phase_or_before_the_first_checkpoint_resumes_bit_for_bit() {
    let sb = Sandbox::new("phases");
    sb.mnist("data/m", 1200, 200);
    let run = |out: &str| interrupted_run(out, 2);
    sb.asge(&args(&run("straight"), &[])).ok();
    let same_as_straight = |out: &str, what: &str| {
        for f in ["last.safetensors", "best.safetensors"] {
            assert_eq!(tensors(&sb.p(&format!("straight/{f}"))), tensors(&sb.p(&format!("{out}/{f}"))), "{what}: {f}");
        }
        assert_eq!(summary(&sb, "straight"), summary(&sb, out), "{what}: the summary, best epoch included");
        let epochs = |d: &str| -> Vec<u64> {
            std::fs::read_to_string(sb.p(&format!("{d}/metrics.jsonl")))
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["epoch"].as_u64().unwrap())
                .collect()
        };
        assert_eq!(epochs(out), [1, 2], "{what}: metrics.jsonl");
    };
    // (phase, the line to stop at, signal, exit code, what the run says, test hook)
    type Cut<'a> = (&'a str, &'a str, &'a str, i32, &'a str, Option<&'a str>);
    let cuts: &[Cut] = &[
        ("validation", "validate 1/2 step 3/", "TERM", 143, "during the validation of epoch 1", None),
        ("checkpoint", "asge: test phase checkpoint", "HUP", 129, "stopped after epoch 1", Some("checkpoint")),
        ("final test", "asge: test step 2/", "INT", 130, "during the final test", None),
        ("first steps", "epoch 1/2 step 2/", "TERM", 143, "stopped at step", None),
    ];
    for (phase, at, sig, code, says, hook) in cuts {
        let out = format!("cut-{}", phase.replace(' ', "-"));
        let a = run(&out);
        let env: Vec<(&str, &str)> = hook.map(|h| ("ASGE_TEST_PHASE", h)).into_iter().collect();
        let (got, seen) = stop_at(&sb, &args(&a, &[]), &env, at, sig);
        assert_eq!(got, *code, "{phase}: {seen}");
        no_panic(&seen);
        assert!(seen.contains(says) && seen.contains("--resume"), "{phase}: {seen}");
        assert!(sb.p(&format!("{out}/last.safetensors")).exists(), "{phase}: no checkpoint");
        sb.asge(&["train", "--resume", &out, "--quiet"]).ok();
        same_as_straight(&out, phase);
    }

    // Killed (SIGKILL: no handler runs) before its first checkpoint: the folder has config.json and no
    // checkpoint; --resume starts the run again from the beginning, saying so.
    let (got, seen) = stop_at(&sb, &args(&run("killed"), &[]), &[], "epoch 1/2 step 3/", "KILL");
    assert_eq!(got, 128 + 9, "{seen}");
    assert!(!sb.p("killed/last.safetensors").exists() && sb.p("killed/config.json").exists());
    sb.asge(&args(&run("killed"), &[])).error(&["holds a run", "--resume"]);
    let o = sb.asge(&["train", "--resume", "killed"]);
    o.ok();
    assert!(o.stderr.contains("stopped before its first checkpoint"), "{}", o.stderr);
    same_as_straight("killed", "killed before the first checkpoint");

    // last.safetensors lost (its write failed on a full disk): best.safetensors, written just before it, is used.
    sb.asge(&args(&run("best-only"), &["--stop-after", "1"])).ok();
    std::fs::remove_file(sb.p("best-only/last.safetensors")).unwrap();
    let o = sb.asge(&["train", "--resume", "best-only"]);
    o.ok();
    assert!(o.stderr.contains("continuing from best.safetensors"), "{}", o.stderr);
    same_as_straight("best-only", "resumed from best.safetensors");

    // A damaged last.safetensors: an error that names it and the way out (never a silent step back to an older
    // best); nothing changes.
    sb.asge(&args(&run("damaged"), &["--stop-after", "1"])).ok();
    std::fs::remove_file(sb.p("damaged/best.safetensors")).unwrap();
    std::fs::write(sb.p("damaged/last.safetensors"), b"not a checkpoint").unwrap();
    let before = tree(&sb.p("damaged"));
    sb.asge(&["train", "--resume", "damaged"]).error(&[
        "last.safetensors cannot be used",
        "move it out",
        "--overwrite",
    ]);
    assert_eq!(tree(&sb.p("damaged")), before);
}

#[test]
fn resume_questions_an_edited_config_another_runs_checkpoint_other_data_and_a_crafted_state() {
    let sb = Sandbox::new("resume-q");
    let q = quick(&sb, "a");
    sb.asge(&args(&q, &["--epochs", "2", "--stop-after", "1"])).ok();
    sb.asge(&args(&q, &["--epochs", "2", "--stop-after", "1", "--out", "b", "--seed", "7"])).ok();
    let keep = |f: &str| std::fs::read(sb.p(&format!("a/{f}"))).unwrap();
    let (config, last) = (keep("config.json"), keep("last.safetensors"));
    let restore = || {
        std::fs::write(sb.p("a/config.json"), &config).unwrap();
        std::fs::write(sb.p("a/last.safetensors"), &last).unwrap();
    };
    // config.json edited by hand.
    let edited = String::from_utf8(config.clone()).unwrap().replace("\"seed\": 42", "\"seed\": 43");
    assert_ne!(edited.as_bytes(), &config[..]);
    std::fs::write(sb.p("a/config.json"), edited).unwrap();
    let before = tree(&sb.p("a"));
    sb.asge(&["train", "--resume", "a", "--quiet"]).error(&["config.json differs", "seed"]);
    assert_eq!(tree(&sb.p("a")), before);
    restore();
    // Another run's checkpoint in the folder (and no best to fall back on).
    std::fs::copy(sb.p("b/last.safetensors"), sb.p("a/last.safetensors")).unwrap();
    std::fs::rename(sb.p("a/best.safetensors"), sb.p("best.keep")).unwrap();
    sb.asge(&["train", "--resume", "a", "--quiet"]).error(&["differs", "seed"]);
    std::fs::rename(sb.p("best.keep"), sb.p("a/best.safetensors")).unwrap();
    restore();
    // Other data: the same counts and shape, one training image changed (the last, which the identity reads).
    std::fs::create_dir_all(sb.p("data/other")).unwrap();
    for f in ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    {
        std::fs::copy(sb.p(&format!("data/mnist/{f}")), sb.p(&format!("data/other/{f}"))).unwrap();
    }
    let img = sb.p("data/other/train-images-idx3-ubyte");
    let mut bytes = std::fs::read(&img).unwrap();
    let n = bytes.len();
    bytes[n - 400] ^= 0xff;
    std::fs::write(&img, bytes).unwrap();
    sb.asge(&["train", "--resume", "a", "--data", "data/other", "--quiet"])
        .error(&["--data", "not the data this run trained on"]);
    // A crafted step count (2^31): refused, not trained on to NaN.
    rewrite_checkpoint(&sb.p("a/last.safetensors"), |_, meta| {
        let mut st: serde_json::Value = serde_json::from_str(&meta["asge.state"]).unwrap();
        st["step"] = serde_json::json!(1u64 << 31);
        meta.insert("asge.state".into(), st.to_string());
    });
    std::fs::rename(sb.p("a/best.safetensors"), sb.p("best.keep")).unwrap();
    sb.asge(&["train", "--resume", "a", "--quiet"]).error(&["last.safetensors", "step 2147483648"]);
    std::fs::rename(sb.p("best.keep"), sb.p("a/best.safetensors")).unwrap();
    restore();
    // The run's own data, relocated: resumes.
    std::fs::rename(sb.p("data/mnist"), sb.p("data/moved")).unwrap();
    sb.asge(&["train", "--resume", "a", "--data", "data/moved", "--quiet"]).ok();
}
