//! The researcher's daily loop from the command line: config files with overrides, resume that obeys (and
//! refuses what would change the run), from any directory, and a --help that reads.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn asge(cwd: &Path, args: &[&str]) -> (i32, String, String) {
    common::run_asge(Some(cwd), args)
}

fn ok(cwd: &Path, args: &[&str]) -> (String, String) {
    let (code, out, err) = asge(cwd, args);
    assert_eq!(code, 0, "{args:?}: {err}");
    (out, err)
}

fn config(run: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(run.join("config.json")).unwrap()).unwrap()
}

/// A folder with a small MNIST (first 640 + 100 images) at `data/mnist`, as raw IDX.
fn sandbox(tag: &str) -> PathBuf {
    let root = common::temp_dir(&format!("wf-{tag}"));
    let src = common::data_dir().join("mnist");
    let dir = root.join("data/mnist");
    std::fs::create_dir_all(&dir).unwrap();
    for (split, n) in [("train", 640usize), ("t10k", 100)] {
        let img = std::fs::read(src.join(format!("{split}-images-idx3-ubyte"))).unwrap();
        let lab = std::fs::read(src.join(format!("{split}-labels-idx1-ubyte"))).unwrap();
        let mut i = vec![0, 0, 8, 3];
        for d in [n as u32, 28, 28] {
            i.extend(d.to_be_bytes());
        }
        i.extend_from_slice(&img[16..][..n * 784]);
        let mut l = vec![0, 0, 8, 1];
        l.extend((n as u32).to_be_bytes());
        l.extend_from_slice(&lab[8..][..n]);
        std::fs::write(dir.join(format!("{split}-images-idx3-ubyte")), i).unwrap();
        std::fs::write(dir.join(format!("{split}-labels-idx1-ubyte")), l).unwrap();
    }
    root
}

#[test]
fn a_config_file_then_flags_and_a_runs_own_config_json() {
    let sb = sandbox("config");
    // TOML, with a key spelled as the flag is (lr-min) and one as config.json spells it (weight_decay).
    std::fs::write(
        sb.join("exp.toml"),
        "dataset = \"mnist\"\ndata = \"data/mnist\"\nwidth = 0.125\nepochs = 1\nbatch = 64\nlr = 1e-3\nlr-min = 1e-5\nweight_decay = 0.0\nval = 0\n",
    )
    .unwrap();
    ok(&sb, &["train", "--config", "exp.toml", "--lr", "2e-3", "--out", "a", "--quiet", "--threads", "2"]);
    let c = config(&sb.join("a"));
    let t = &c["train"];
    assert_eq!(
        (t["width"].as_f64(), t["lr"].as_f64(), t["weight_decay"].as_f64()),
        (Some(0.125), Some(2e-3), Some(0.0))
    );
    // Defaults for what neither gave; exact values (0.1, not 0.10000000149011612); an absolute data path.
    assert_eq!(t["dropout"].as_f64(), Some(0.1));
    assert!(std::fs::read_to_string(sb.join("a/config.json")).unwrap().contains("\"dropout\": 0.1,"));
    assert!(Path::new(t["data"].as_str().unwrap()).is_absolute());
    // The run's own config.json is a valid --config: the same options, another run.
    ok(&sb, &["train", "--config", "a/config.json", "--out", "b", "--quiet", "--threads", "2"]);
    assert_eq!(config(&sb.join("a"))["train"], config(&sb.join("b"))["train"]);
    assert_eq!(
        std::fs::read(sb.join("a/last.safetensors")).unwrap().len(),
        std::fs::read(sb.join("b/last.safetensors")).unwrap().len()
    );
    // A key that is no option is an error naming it; so is a missing dataset.
    std::fs::write(sb.join("typo.toml"), "dataset = \"mnist\"\ndata = \"data/mnist\"\nlearning_rate = 1\n").unwrap();
    let (code, _, err) = asge(&sb, &["train", "--config", "typo.toml", "--out", "c"]);
    assert!(code == 1 && err.contains("unknown option 'learning_rate'") && err.contains("typo.toml"), "{err}");
    let (code, _, err) = asge(&sb, &["train", "--data", "data/mnist", "--out", "c"]);
    assert!(code == 1 && err.contains("--dataset is required"), "{err}");
}

#[test]
fn resume_obeys_from_any_directory_and_refuses_what_would_change_the_run() {
    let sb = sandbox("resume");
    let base =
        ["train", "--dataset", "mnist", "--data", "data/mnist", "--width", "0.125", "--batch", "64", "--val", "0"];
    let mut first: Vec<&str> = base.to_vec();
    first.extend(["--epochs", "2", "--stop-after", "1", "--out", "run", "--quiet", "--threads", "2"]);
    ok(&sb, &first);
    let run = sb.join("run");
    let elsewhere = common::temp_dir("wf-resume-elsewhere");
    let run_s = run.to_str().unwrap();
    // A flag that would change the run is refused, naming it (and nothing is touched).
    let before = std::fs::read(run.join("last.safetensors")).unwrap();
    let (code, _, err) = asge(&elsewhere, &["train", "--resume", run_s, "--lr", "1e-3", "--no-shuffle"]);
    assert!(code == 1 && err.contains("cannot change when a run resumes"), "{err}");
    assert!(err.contains("--lr") && err.contains("--no-shuffle"), "{err}");
    assert_eq!(std::fs::read(run.join("last.safetensors")).unwrap(), before);
    // From another directory (the data path is stored absolute), extending the schedule: the message says where
    // it resumes and how the lr changes; config.json now says 3 epochs, and three epochs are logged.
    let (_, err) = ok(&elsewhere, &["train", "--resume", run_s, "--epochs", "3", "--threads", "2"]);
    assert!(err.contains("resuming at epoch 2 of 3, step 1 of 10"), "{err}");
    assert!(err.contains("--epochs 3 (was 2)") && err.contains("epoch 2's lr"), "{err}");
    assert_eq!(config(&run)["train"]["epochs"], 3);
    assert_eq!(std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().count(), 3);
    assert!(run.join("summary.json").exists());
    // A custom model is rebuilt from the table the run stored, not from its JSON file, which may have changed.
    std::fs::write(sb.join("m.json"), r#"{"name": "m", "layers": [{"channels": 8}, {"channels": 16, "pool": true}]}"#)
        .unwrap();
    let mut custom: Vec<&str> = base.to_vec();
    custom.extend(["--model", "m.json", "--epochs", "2", "--stop-after", "1", "--out", "custom", "--quiet"]);
    ok(&sb, &custom);
    std::fs::write(sb.join("m.json"), r#"{"name": "m", "layers": [{"channels": 64}]}"#).unwrap();
    ok(&elsewhere, &["train", "--resume", sb.join("custom").to_str().unwrap(), "--quiet"]);
    let ck = asge::train::checkpoint::load(&sb.join("custom/last.safetensors")).unwrap();
    assert_eq!(ck.spec.unwrap().layers.len(), 2, "the stored two-layer table, not the file's one layer");
}

#[test]
fn help_reads_with_headings_and_the_required_flags() {
    let (out, _) = ok(Path::new("."), &["train", "--help"]);
    for h in ["Data:", "Model:", "Optimisation:", "Schedule:", "Device:", "Run folder:", "Checkpointing:", "Output:"] {
        assert!(out.contains(h), "no heading {h} in:\n{out}");
    }
    assert!(out.contains("asge train --dataset DATASET --data DIR --out RUN"), "{out}");
    assert!(out.contains("asge train --resume RUN"), "{out}");
    // No doc-link syntax leaks into the help.
    assert!(!out.contains("[`") && !out.contains("`]"), "{out}");
    // Every flag of every command has a description: the line after a flag's is text, not the next flag, a blank
    // or only its default.
    for cmd in ["train", "eval", "predict", "export", "bench", "shard", "info"] {
        let (out, _) = ok(Path::new("."), &[cmd, "--help"]);
        let lines: Vec<&str> = out.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            if t.starts_with("--") || t.starts_with("-h,") {
                // A short help puts the description on the flag's line, after two spaces; a long one below it.
                let beside = t.split("  ").filter(|p| !p.trim().is_empty()).count() > 1;
                let next = lines.get(i + 1).map(|n| n.trim()).unwrap_or("");
                assert!(
                    beside || (!next.is_empty() && !next.starts_with('-') && !next.starts_with('[')),
                    "asge {cmd}: a flag without a description: {l}"
                );
            }
        }
    }
    assert!(out.contains("[default: 100]") && out.contains("[default: 0.0002]"), "{out}");
}

/// A Python script run with the packages tools/test.sh installs into `$ASGE_PYTOOLS` (tensorboard): its output.
fn python(script: &str, args: &[&str]) -> String {
    common::python("ASGE_PYTOOLS", "tensorboard", &[&["-c", script], args].concat())
}

#[test]
fn tensorboard_reads_every_layers_curves_and_the_lr() {
    let sb = sandbox("tensorboard");
    ok(
        &sb,
        &[
            "train",
            "--dataset",
            "mnist",
            "--data",
            "data/mnist",
            "--width",
            "0.125",
            "--batch",
            "64",
            "--val",
            "128",
            "--epochs",
            "2",
            "--out",
            "run",
            "--quiet",
            "--threads",
            "2",
            "--tb-every",
            "3",
            "--log-steps",
        ],
    );
    // TensorBoard's own reader, on the run folder as `tensorboard --logdir` would read it.
    let read = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1]); ea.Reload()
print(json.dumps({t: [[e.step, e.value] for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}))
"#;
    let got: serde_json::Value = serde_json::from_str(&python(read, &[sb.join("run").to_str().unwrap()])).unwrap();
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(sb.join("run/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let series = |tag: &str| -> Vec<(i64, f32)> {
        got[tag]
            .as_array()
            .unwrap_or_else(|| panic!("no scalar {tag} in {got}"))
            .iter()
            .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap() as f32))
            .collect()
    };
    let want = |f: &dyn Fn(&serde_json::Value) -> f64| -> Vec<(i64, f32)> {
        metrics.iter().map(|m| (m["epoch"].as_i64().unwrap(), f(m) as f32)).collect()
    };
    assert_eq!(series("lr"), want(&|m| m["lr"].as_f64().unwrap()));
    for l in 0..7 {
        assert_eq!(
            series(&format!("train_loss/layer{}", l + 1)),
            want(&|m| m["train_layer_loss"][l].as_f64().unwrap())
        );
        assert_eq!(series(&format!("val_accuracy/layer{}", l + 1)), want(&|m| m["val_layer_acc"][l].as_f64().unwrap()));
        assert_eq!(series(&format!("val_loss/layer{}", l + 1)), want(&|m| m["val_layer_loss"][l].as_f64().unwrap()));
    }
    assert_eq!(series("val_accuracy/fusion"), want(&|m| m["val_fusion_acc"].as_f64().unwrap()));
    // Every 3 steps (16 in all: 512 training images at batch 64, 2 epochs): the mean training loss of the steps
    // since the last point, per layer and for the heads, and the lr, as steps.jsonl has them step by step.
    let steps: Vec<serde_json::Value> = std::fs::read_to_string(sb.join("run/steps.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(steps.len(), 16);
    let windows: Vec<&[serde_json::Value]> = steps.chunks_exact(3).collect();
    let mean = |w: &[serde_json::Value], f: &dyn Fn(&serde_json::Value) -> f64| -> f32 {
        let n: f64 = w.iter().map(|s| s["images"].as_f64().unwrap()).sum();
        (w.iter().map(|s| f(s) * s["images"].as_f64().unwrap()).sum::<f64>() / n) as f32
    };
    let at = |f: &dyn Fn(&[serde_json::Value]) -> f32| -> Vec<(i64, f32)> {
        windows.iter().map(|w| (w[2]["step"].as_i64().unwrap(), f(w))).collect()
    };
    for l in 0..7 {
        assert_eq!(
            series(&format!("steps/train_loss/layer{}", l + 1)),
            at(&|w| mean(w, &|s| s["layer_loss"][l].as_f64().unwrap()))
        );
    }
    assert_eq!(series("steps/train_loss/fusion"), at(&|w| mean(w, &|s| s["head_loss"].as_f64().unwrap())));
    assert_eq!(series("steps/lr"), at(&|w| w[2]["lr"].as_f64().unwrap() as f32));
    // The run's options in TensorBoard's HParams table: the plugin's own parser reads the session's start (every
    // option of config.json with a value) and its end (success).
    let hparams = r#"
import json, sys
from google.protobuf import json_format
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata
ea = EventAccumulator(sys.argv[1]); ea.Reload()
content = ea.PluginTagToContent(metadata.PLUGIN_NAME)
start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
end = metadata.parse_session_end_info_plugin_data(content[metadata.SESSION_END_INFO_TAG])
print(json.dumps({"hparams": {k: json_format.MessageToDict(v) for k, v in start.hparams.items()},
                  "start": start.start_time_secs, "status": end.status, "end": end.end_time_secs}))
"#;
    let got: serde_json::Value = serde_json::from_str(&python(hparams, &[sb.join("run").to_str().unwrap()])).unwrap();
    let train = &config(&sb.join("run"))["train"];
    let shown = got["hparams"].as_object().unwrap();
    for (k, v) in train.as_object().unwrap() {
        if v.is_null() {
            assert!(!shown.contains_key(k), "{k} is null but shown");
        } else if v.is_number() {
            assert_eq!(shown[k].as_f64(), v.as_f64(), "hparam {k}");
        } else {
            assert_eq!(&shown[k], v, "hparam {k}");
        }
    }
    assert_eq!((got["hparams"]["lr"].as_f64(), got["hparams"]["dataset"].as_str()), (Some(2e-4), Some("mnist")));
    assert_eq!(got["status"], 1, "STATUS_SUCCESS");
    assert!(got["end"].as_f64().unwrap() >= got["start"].as_f64().unwrap());
}

/// Without a terminal (a job log), `--log-every` plain lines with the epoch's and the run's ETA; the run folder
/// named at the start and the end; a new best announced.
#[test]
fn a_job_log_gets_plain_progress_lines_with_the_eta() {
    let sb = sandbox("lines");
    let args = [
        "train",
        "--dataset",
        "mnist",
        "--data",
        "data/mnist",
        "--width",
        "0.125",
        "--epochs",
        "2",
        "--batch",
        "32",
        "--out",
        "run",
        "--log-every",
        "0",
        "--threads",
        "2",
    ];
    let (_, err) = ok(&sb, &args);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("asge: epoch 1/2 step ")).collect();
    // 533 training images in batches of 32 (17 steps): with --log-every 0 a line for every step from the second
    // (a step's statistics arrive as the next one starts), the last one included.
    assert_eq!(lines.len(), 16, "{err}");
    assert!(lines[15].starts_with("asge: epoch 1/2 step 17/17 "), "{err}");
    assert!(lines[1].contains("eta ") && lines[1].contains("(run "), "{}", lines[1]);
    assert!(err.lines().any(|l| l.starts_with("asge: validate 1/2 step ")), "{err}");
    assert!(err.lines().any(|l| l.starts_with("asge: test step ")), "{err}");
    assert!(err.contains("asge: new best: epoch 1"), "{err}");
    assert_eq!(err.matches("asge: run folder").count(), 2, "{err}");
    // --log-every 30: the first line and the last of each pass only, in a run this short.
    let (_, err) = ok(&sb, &[&args[..12], &["run2", "--log-every", "30", "--threads", "2"]].concat());
    assert_eq!(err.lines().filter(|l| l.starts_with("asge: epoch 1/2 step ")).count(), 2, "{err}");
}

/// In a terminal (a pseudo-terminal from `script`), the progress bar with the ETA.
#[test]
fn a_terminal_gets_a_progress_bar_with_the_eta() {
    let sb = sandbox("bar");
    let bin = env!("CARGO_BIN_EXE_asge");
    let cmd = format!(
        "{bin} train --dataset mnist --data data/mnist --width 0.125 --epochs 2 --batch 16 --out run --threads 2"
    );
    let o = Command::new("script").args(["-qfec", &cmd, "/dev/null"]).current_dir(&sb).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}");
    // indicatif's bar: the label, the bar, position/length, the ETA of the epoch and of the run.
    assert!(out.contains("epoch 1/2 ["), "{out}");
    assert!(out.contains("/34 "), "{out}");
    assert!(out.contains("eta ") && out.contains("(run "), "{out}");
    // No plain log lines in a terminal.
    assert!(!out.contains("asge: epoch 1/2 step"), "{out}");
}
