//! Every input and fault a user or a crash can produce, one test per class: the command ends with one clear
//! error line naming the file or option (or handles the case), never a panic, never an exit 0 with wrong
//! numbers, and never touches a file it did not create. Each command runs in a sandbox with a private HOME and
//! kernel cache, and the tests check that nothing outside the folders the command may write changed.

mod common;

use asge::data::shard::ShardSet;
use asge::data::ImageSource;
use asge::model::{self, ModelOptions, Params};
use asge::train::checkpoint;
use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A private folder tree: `home/` (HOME and the kernel cache), `data/mnist` (a 600 + 200 image MNIST cut from
/// the real files), and room for runs.
struct Sandbox {
    root: PathBuf,
}

impl Sandbox {
    fn new(tag: &str) -> Self {
        let root = common::temp_dir(&format!("bad-{tag}"));
        std::fs::create_dir_all(root.join("home")).unwrap();
        let sb = Sandbox { root };
        sb.mnist("data/mnist", 600, 200);
        sb
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn s(&self, rel: &str) -> String {
        self.p(rel).to_str().unwrap().to_string()
    }

    /// The first `n_train` / `n_test` images of the real MNIST files, as raw IDX in `rel`.
    fn mnist(&self, rel: &str, n_train: usize, n_test: usize) {
        let src = common::data_dir().join("mnist");
        let dir = self.p(rel);
        std::fs::create_dir_all(&dir).unwrap();
        for (split, n) in [("train", n_train), ("t10k", n_test)] {
            let img = std::fs::read(src.join(format!("{split}-images-idx3-ubyte"))).unwrap();
            let lab = std::fs::read(src.join(format!("{split}-labels-idx1-ubyte"))).unwrap();
            std::fs::write(
                dir.join(format!("{split}-images-idx3-ubyte")),
                idx_images(n as u32, 28, &img[16..][..n * 784]),
            )
            .unwrap();
            std::fs::write(dir.join(format!("{split}-labels-idx1-ubyte")), idx_labels(&lab[8..][..n])).unwrap();
        }
    }

    /// `asge args` with HOME and the kernel cache inside the sandbox, from the sandbox root.
    fn asge(&self, args: &[&str]) -> Out {
        self.asge_env(args, &[])
    }

    fn command(&self, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut c = Command::new(bin());
        c.args(args)
            .current_dir(&self.root)
            .env("HOME", self.p("home"))
            .env("ASGE_KERNEL_CACHE", self.p("home/kernels"))
            .env_remove("ASGE_MEMORY_LIMIT");
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    fn asge_env(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let o = self.command(args, env).output().unwrap();
        Out::of(o)
    }
}

/// The binary under test: this build's, or `ASGE_TEST_BIN` (another build, e.g. an older one, to see these tests
/// fail on its bugs).
fn bin() -> String {
    std::env::var("ASGE_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_asge").to_string())
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn of(o: std::process::Output) -> Out {
        use std::os::unix::process::ExitStatusExt;
        Out {
            code: o.status.code().unwrap_or_else(|| 128 + o.status.signal().unwrap_or(0)),
            stdout: String::from_utf8_lossy(&o.stdout).into(),
            stderr: String::from_utf8_lossy(&o.stderr).into(),
        }
    }

    /// Success, with what it printed in the message on failure.
    fn ok(&self) -> &Self {
        assert_eq!(self.code, 0, "failed: {}\n{}", self.stderr, self.stdout);
        no_panic(&self.stderr);
        self
    }

    /// Exit 1 with exactly one `error:` line that contains every needle.
    fn error(&self, needles: &[&str]) -> &Self {
        assert_eq!(self.code, 1, "expected exit 1, got {}: {}\n{}", self.code, self.stderr, self.stdout);
        no_panic(&self.stderr);
        let errors: Vec<&str> = self.stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "expected one error line: {}", self.stderr);
        for n in needles {
            assert!(errors[0].contains(n), "expected '{n}' in: {}", errors[0]);
        }
        self
    }
}

fn no_panic(stderr: &str) {
    assert!(
        !stderr.contains("panicked") && !stderr.contains("internal error") && !stderr.contains("RUST_BACKTRACE"),
        "a panic: {stderr}"
    );
}

fn idx_images(n: u32, side: u32, pixels: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 3];
    for d in [n, side, side] {
        v.extend(d.to_be_bytes());
    }
    v.extend_from_slice(pixels);
    v
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 1];
    v.extend((labels.len() as u32).to_be_bytes());
    v.extend_from_slice(labels);
    v
}

/// Every file, symlink and folder under `dir` (paths relative to it), with a content hash, for "nothing changed".
/// The folder lock files (`.asge.lock`, which every command that writes a folder takes) are left out.
fn tree(dir: &Path) -> BTreeMap<String, String> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.map(|e| e.unwrap()) {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().to_string_lossy().into_owned();
            if rel.ends_with(asge::files::LOCK_FILE) {
                continue;
            }
            let m = p.symlink_metadata().unwrap();
            if m.file_type().is_symlink() {
                out.insert(rel, format!("link {}", std::fs::read_link(&p).unwrap().display()));
            } else if m.is_dir() {
                out.insert(rel.clone(), "dir".into());
                walk(base, &p, out);
            } else if !m.is_file() {
                // A socket, FIFO or device: its kind, never its content (reading a FIFO would block).
                out.insert(rel, format!("special {:?}", m.file_type()));
            } else {
                let bytes = std::fs::read(&p).unwrap();
                let h =
                    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
                out.insert(rel, format!("{} bytes {h:016x}", bytes.len()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// `tree` without the entries under the given relative folders (the ones a command may write).
fn tree_outside(dir: &Path, allowed: &[&str]) -> BTreeMap<String, String> {
    tree(dir).into_iter().filter(|(k, _)| !allowed.iter().any(|a| k == a || k.starts_with(&format!("{a}/")))).collect()
}

/// The training options of a quick run on the sandbox's MNIST.
fn quick<'a>(sb: &'a Sandbox, out: &'a str) -> Vec<String> {
    let v = [
        "train",
        "--dataset",
        "mnist",
        "--data",
        "data/mnist",
        "--width",
        "0.125",
        "--epochs",
        "1",
        "--batch",
        "32",
        "--val",
        "0",
        "--threads",
        "2",
        "--quiet",
        "--out",
        out,
    ];
    let _ = sb;
    v.iter().map(|s| s.to_string()).collect()
}

/// `base` with `extra` applied: a `--flag value` already in `base` gets the new value, anything else is appended.
fn args<'a>(base: &'a [String], extra: &[&'a str]) -> Vec<&'a str> {
    let mut v: Vec<&str> = base.iter().map(|s| s.as_str()).collect();
    let mut i = 0;
    while i < extra.len() {
        let takes_value = extra.get(i + 1).is_some_and(|n| !n.starts_with("--"));
        match v.iter().position(|a| *a == extra[i]) {
            Some(j) if takes_value => {
                v[j + 1] = extra[i + 1];
                i += 2;
            }
            _ => {
                v.push(extra[i]);
                if takes_value {
                    v.push(extra[i + 1]);
                }
                i += 1 + takes_value as usize;
            }
        }
    }
    v
}

fn tensors(path: &Path) -> BTreeMap<String, Vec<u32>> {
    let ck = checkpoint::load(path).unwrap();
    ck.params.into_iter().map(|(k, (_, d))| (k, d.iter().map(|v| v.to_bits()).collect())).collect()
}

/// Rewrites a safetensors file with `f` applied to its tensors and metadata.
fn rewrite_checkpoint(
    path: &Path,
    f: impl FnOnce(&mut BTreeMap<String, (Vec<usize>, Vec<f32>)>, &mut std::collections::HashMap<String, String>),
) {
    let ck = checkpoint::load(path).unwrap();
    let mut t: BTreeMap<String, (Vec<usize>, Vec<f32>)> = ck.params.into_iter().collect();
    let mut meta = ck.metadata;
    f(&mut t, &mut meta);
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        t.into_iter().map(|(n, (s, d))| (n, s, d.iter().flat_map(|v| v.to_le_bytes()).collect())).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, s, b)| {
            (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())
        })
        .collect();
    std::fs::write(path, safetensors::tensor::serialize(views, Some(meta)).unwrap()).unwrap();
}

/// An ImageFolder of generated PNGs: `classes` folders of `per_class` images of `side` px.
fn image_folder(root: &Path, classes: usize, per_class: usize, side: u32) {
    for c in 0..classes {
        let dir = root.join(format!("class_{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for k in 0..per_class {
            let img = image::RgbImage::from_fn(side, side, |x, y| {
                image::Rgb([(x * 7 + y) as u8, (40 * c + k) as u8, (y * 3) as u8])
            });
            img.save(dir.join(format!("img{k}.png"))).unwrap();
        }
    }
}

/// A training of 50 epochs in `busy/` (batch 8, a checkpoint every 5 steps, a progress line every step): one
/// that is still running when a test looks at it.
const LONG_RUN: [&str; 21] = [
    "train",
    "--dataset",
    "mnist",
    "--data",
    "data/mnist",
    "--width",
    "0.125",
    "--epochs",
    "50",
    "--batch",
    "8",
    "--val",
    "0",
    "--threads",
    "1",
    "--log-every",
    "0",
    "--checkpoint-every",
    "5",
    "--out",
    "busy",
];

/// Starts `asge args` and reads its stderr until a line contains `at`: the running child, and its stderr (kept
/// open, so that the child can go on printing).
fn spawn_until(
    sb: &Sandbox,
    args: &[&str],
    at: &str,
) -> (std::process::Child, std::io::Lines<std::io::BufReader<std::process::ChildStderr>>) {
    let mut child = sb.command(args, &[]).stderr(Stdio::piped()).spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    for l in lines.by_ref() {
        let l = l.unwrap();
        seen += &l;
        seen.push('\n');
        if l.contains(at) {
            return (child, lines);
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("never printed '{at}': {seen}");
}

// 1. Wrong numbers reported as success.

#[test]
fn a_failed_loader_worker_is_an_error_not_the_end_of_the_epoch() {
    // A source whose image 40 panics, as an index that a bad header sized wrongly would.
    struct Faulty;
    impl ImageSource for Faulty {
        fn len(&self) -> usize {
            100
        }
        fn channels(&self) -> usize {
            1
        }
        fn size(&self) -> usize {
            4
        }
        fn classes(&self) -> usize {
            2
        }
        fn label(&self, _: usize) -> u32 {
            0
        }
        fn image(&self, i: usize) -> &[u8] {
            static PIXELS: [u8; 16] = [1; 16];
            assert!(i != 40, "record {i} is past the end of the data");
            &PIXELS
        }
    }
    let src: std::sync::Arc<dyn ImageSource> = std::sync::Arc::new(Faulty);
    let order: Vec<usize> = (0..100).collect();
    let mut p = asge::data::loader::Prefetch::new(src, order, 0, 16, asge::data::augment::Augment::None, 0, 2);
    let items: Vec<_> = p.by_ref().collect();
    // Two good batches (records 0..32), then the failing one as an error, then nothing.
    assert_eq!(items.len(), 3);
    assert!(items[..2].iter().all(|b| b.is_ok()));
    let e = items[2].as_ref().err().unwrap().to_string();
    assert!(e.contains("record 40 is past the end") && e.contains("position 32"), "{e}");

    // The inputs that made a worker fail: an IDX header whose dimensions wrap (2^22 x 2^21 x 2^21 = 2^64 = 0
    // bytes, the payload this file has) and a shard index with an absurd record count.
    let sb = Sandbox::new("loader");
    std::fs::write(sb.p("data/mnist/train-images-idx3-ubyte"), {
        let mut v = vec![0, 0, 8, 3];
        for d in [1u32 << 22, 1 << 21, 1 << 21] {
            v.extend(d.to_be_bytes());
        }
        v
    })
    .unwrap();
    let before = tree_outside(&sb.root, &["run"]);
    sb.asge(&args(&quick(&sb, "run"), &[])).error(&["train-images-idx3-ubyte", "overflows"]);
    assert!(!sb.p("run/summary.json").exists());
    assert_eq!(tree_outside(&sb.root, &["run"]), before);

    let shards = sb.p("shards");
    image_folder(&sb.p("folder"), 2, 3, 12);
    for split in ["train", "val"] {
        sb.asge(&[
            "shard",
            "--input",
            &sb.s("folder"),
            "--out",
            &sb.s(&format!("shards/{split}")),
            "--size",
            "8",
            "--quiet",
        ])
        .ok();
    }
    let index = shards.join("train/index.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    v["count"] = serde_json::json!(u64::MAX);
    v["shards"][0]["count"] = serde_json::json!(u64::MAX);
    std::fs::write(&index, serde_json::to_string(&v).unwrap()).unwrap();
    sb.asge(&[
        "train",
        "--dataset",
        "imagenet",
        "--data",
        "shards",
        "--model",
        "vgg-imagenet",
        "--width",
        "0.125",
        "--quiet",
        "--out",
        "run2",
    ])
    .error(&["index.json"]);
    assert!(!sb.p("run2").exists());
}

#[test]
fn non_finite_weights_are_refused_on_load_and_never_saved() {
    let sb = Sandbox::new("nan");
    let spec = model::resolve("vgg8", 1, 32, 10, &ModelOptions { width: 0.125, ..Default::default() }).unwrap();
    // --init with one NaN weight.
    let mut p = Params::init(&spec, 1);
    p.layers[2].conv_w[5] = f32::NAN;
    checkpoint::save_params(&sb.p("nan.safetensors"), &spec, &p).unwrap();
    let q = quick(&sb, "run");
    sb.asge(&args(&q, &["--init", "nan.safetensors"])).error(&[
        "nan.safetensors",
        "layer 3 (layers.2.conv.weight)",
        "NaN",
    ]);
    // eval of a checkpoint with an infinite fusion head: refused (it would have scored 100% fusion).
    let mut p = Params::init(&spec, 1);
    p.heads[1].w[0] = f32::INFINITY;
    checkpoint::save_params(&sb.p("inf.safetensors"), &spec, &p).unwrap();
    sb.asge(&["eval", "--checkpoint", "inf.safetensors", "--dataset", "mnist", "--data", "data/mnist"])
        .error(&["heads.2.weight", "infinite"]);

    // --resume with a negative second moment: refused, the file left as it was.
    sb.asge(&args(&quick(&sb, "stopped"), &["--epochs", "2", "--stop-after", "1"])).ok();
    let last = sb.p("stopped/last.safetensors");
    rewrite_checkpoint(&last, |t, _| t.get_mut("optim.layers.1.conv.weight.exp_avg_sq").unwrap().1[3] = -1.0);
    let before = tree(&sb.root);
    sb.asge(&["train", "--resume", "stopped", "--quiet"])
        .error(&["layer 2 (optim.layers.1.conv.weight.exp_avg_sq)", "negative"]);
    assert_eq!(tree(&sb.root), before);

    // A run that diverges (lr 1e30: the weights reach 1e30 after one step, the next forward overflows) stops at
    // the first non-finite loss, naming the layer; the checkpoint of step 1 stays and no summary is written.
    sb.asge(&args(&quick(&sb, "diverged"), &["--lr", "1e30", "--lr-min", "0", "--checkpoint-every", "1"])).error(&[
        "layer 1",
        "the loss became",
        "step 2",
    ]);
    let ck = checkpoint::load(&sb.p("diverged/last.safetensors")).unwrap();
    assert_eq!(ck.state.unwrap().step, 1);
    assert!(!sb.p("diverged/summary.json").exists());

    // The save itself refuses a poisoned model: the previous file stays.
    let mut p = Params::init(&spec, 1);
    let path = sb.p("good.safetensors");
    let net =
        asge::train::Net::new(asge::backend::cpu::CpuBackend::new(), spec.clone(), &p, Default::default(), 4).unwrap();
    checkpoint::save(&path, &net, &Default::default(), &serde_json::json!({})).unwrap();
    let good = std::fs::read(&path).unwrap();
    p.layers[0].conv_b[1] = f32::NAN;
    let net = asge::train::Net::new(asge::backend::cpu::CpuBackend::new(), spec, &p, Default::default(), 4).unwrap();
    let e = format!("{:#}", checkpoint::save(&path, &net, &Default::default(), &serde_json::json!({})).unwrap_err());
    assert!(e.contains("layer 1 (layers.0.conv.bias)") && e.contains("not written"), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), good);
}

// 2. Data destroyed or written where it must not be.

#[test]
fn a_run_folder_is_never_overwritten_or_shared() {
    let sb = Sandbox::new("folder");
    let q = quick(&sb, "run");
    sb.asge(&args(&q, &[])).ok();
    std::fs::write(sb.p("run/notes.txt"), b"mine").unwrap();
    // Again without a word: refused, nothing changed.
    let before = tree(&sb.root);
    sb.asge(&args(&q, &["--seed", "7"])).error(&["holds a run", "--resume", "--overwrite"]);
    assert_eq!(tree(&sb.root), before);
    // --overwrite replaces the run's files and leaves the others.
    let old = tensors(&sb.p("run/last.safetensors"));
    sb.asge(&args(&q, &["--seed", "7", "--overwrite"])).ok();
    assert_ne!(tensors(&sb.p("run/last.safetensors")), old);
    assert_eq!(std::fs::read(sb.p("run/notes.txt")).unwrap(), b"mine");
    // --overwrite does not replace a folder that an asge run did not write.
    std::fs::create_dir_all(sb.p("theirs")).unwrap();
    std::fs::write(sb.p("theirs/config.json"), b"{\"their\": \"config\"}").unwrap();
    let before = tree(&sb.root);
    sb.asge(&args(&quick(&sb, "theirs"), &["--overwrite"])).error(&["not an asge run config"]);
    assert_eq!(tree(&sb.root), before);

    // Two trainings in one folder: the second is refused with the holder's pid, even with --overwrite or
    // --resume; once the first is killed (SIGKILL: no handler runs), the lock is gone and the run resumes.
    // Step 12: a checkpoint (every 5 steps) exists.
    let long = LONG_RUN;
    let (mut child, _stderr) = spawn_until(&sb, &long, " step 12/");
    let pid = child.id().to_string();
    sb.asge(&["train", "--resume", "busy", "--quiet"]).error(&["another asge process", &pid]);
    let mut over: Vec<&str> = long.to_vec();
    over.push("--overwrite");
    sb.asge(&over).error(&["another asge process", &pid]);
    child.kill().unwrap();
    child.wait().unwrap();
    let state = checkpoint::load(&sb.p("busy/last.safetensors")).unwrap().state.unwrap();
    assert!(state.step >= 10, "{state:?}");
    sb.asge(&["train", "--resume", "busy", "--quiet", "--stop-after", "1"]).ok();
}

#[test]
fn shard_removes_only_the_files_it_wrote() {
    let sb = Sandbox::new("shard-own");
    image_folder(&sb.p("folder"), 2, 4, 16);
    let out = sb.p("out");
    std::fs::create_dir_all(&out).unwrap();
    // Files that look like an interrupted run's leftovers, but are the user's.
    for f in ["shard-00000.bin", "notes.tmp", "shard-00003.bin.tmp", "x.bin"] {
        std::fs::write(out.join(f), format!("user file {f}")).unwrap();
    }
    let before = tree(&sb.root);
    let shard = ["shard", "--input", "folder", "--out", "out", "--size", "8", "--quiet"];
    sb.asge(&shard).error(&["shard-00000.bin", "move it away"]);
    assert_eq!(tree(&sb.root), before);
    std::fs::remove_file(out.join("shard-00000.bin")).unwrap();
    sb.asge(&shard).ok();
    for f in ["notes.tmp", "shard-00003.bin.tmp", "x.bin"] {
        assert_eq!(std::fs::read_to_string(out.join(f)).unwrap(), format!("user file {f}"), "{f}");
    }
    ShardSet::open(&out).unwrap();

    // An interrupted run (the manifest names what it created, and records what each file it created is) is
    // cleaned up by the next one, and nothing else.
    use std::os::unix::fs::MetadataExt;
    let out2 = sb.p("out2");
    std::fs::create_dir_all(&out2).unwrap();
    std::fs::write(out2.join("shard-00000.bin"), b"half a shard").unwrap();
    let m = std::fs::metadata(out2.join("shard-00000.bin")).unwrap();
    let id = serde_json::json!({"dev": m.dev(), "ino": m.ino(), "len": m.len(),
        "mtime_ns": m.mtime() * 1_000_000_000 + m.mtime_nsec()});
    let manifest = serde_json::json!({"files": ["shard-00000.bin"], "created": {"shard-00000.bin": id}});
    std::fs::write(out2.join(".asge-shard-partial.json"), manifest.to_string()).unwrap();
    std::fs::write(out2.join(".shard-00000.bin.asge-1-2-3.tmp"), b"its temp file").unwrap();
    std::fs::write(out2.join("keep.txt"), b"mine").unwrap();
    sb.asge(&["shard", "--input", "folder", "--out", "out2", "--size", "8", "--quiet"]).ok();
    let names: Vec<String> = tree(&out2).into_keys().collect();
    assert_eq!(names, ["index.json", "keep.txt", "labels.u16", "shard-00000.bin"]);
    assert!(ShardSet::open(&out2).unwrap().len() == 8);

    // A planted manifest (a name alone, or a name whose file is not the one recorded) removes nothing.
    for (tag, manifest) in [
        ("name", serde_json::json!({"files": ["shard-00000.bin", "labels.u16"]})),
        ("stale", serde_json::json!({"files": ["shard-00000.bin"], "created": {"shard-00000.bin": id}})),
    ] {
        let out3 = sb.p(&format!("out3-{tag}"));
        std::fs::create_dir_all(&out3).unwrap();
        std::fs::write(out3.join("shard-00000.bin"), b"the user's file").unwrap();
        std::fs::write(out3.join(".asge-shard-partial.json"), manifest.to_string()).unwrap();
        sb.asge(&["shard", "--input", "folder", "--out", &format!("out3-{tag}"), "--size", "8", "--quiet"])
            .error(&["shard-00000.bin", "move it away"]);
        assert_eq!(std::fs::read(out3.join("shard-00000.bin")).unwrap(), b"the user's file", "{tag}");
    }
}

#[test]
fn temporary_files_never_follow_a_planted_symlink() {
    let sb = Sandbox::new("symlink");
    std::fs::write(sb.p("victim"), b"precious").unwrap();
    let run = sb.p("run");
    std::fs::create_dir_all(&run).unwrap();
    // The names the writers used before they made unique temporary names.
    for f in ["config.tmp", "last.tmp", "best.tmp", "metrics.tmp", "summary.tmp", "curves.tmp", "trace.tmp"] {
        std::os::unix::fs::symlink(sb.p("victim"), run.join(f)).unwrap();
    }
    sb.asge(&args(&quick(&sb, "run"), &["--trace", "run/trace.json"])).ok();
    image_folder(&sb.p("folder"), 2, 2, 12);
    let out = sb.p("shards");
    std::fs::create_dir_all(&out).unwrap();
    for f in ["index.tmp", "labels.tmp", "shard-00000.bin.tmp"] {
        std::os::unix::fs::symlink(sb.p("victim"), out.join(f)).unwrap();
    }
    sb.asge(&["shard", "--input", "folder", "--out", "shards", "--size", "8", "--quiet"]).ok();
    assert_eq!(std::fs::read(sb.p("victim")).unwrap(), b"precious");
    // The planted links are still there, untouched.
    assert!(run.join("config.tmp").symlink_metadata().unwrap().file_type().is_symlink());
}

#[test]
fn a_full_disk_leaves_no_partial_files() {
    let sb = Sandbox::new("fsize");
    image_folder(&sb.p("folder"), 2, 15, 160);
    std::fs::create_dir_all(sb.p("out")).unwrap();
    // RLIMIT_FSIZE makes a write past 1 MB fail (EFBIG) as a full disk would; SIGXFSZ is ignored so that the
    // write returns the error instead of killing the process.
    let bin = bin();
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "trap '' XFSZ; exec prlimit --fsize=1000000 -- {bin} shard --input folder --out out --size 128 --quiet"
        ))
        .current_dir(&sb.root)
        .env("HOME", sb.p("home"))
        .output()
        .unwrap();
    Out::of(o).error(&["out/"]);
    let names: Vec<String> = tree(&sb.p("out")).into_keys().collect();
    assert!(names.is_empty(), "left behind: {names:?}");
}

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

#[test]
fn sizes_from_files_and_options_are_checked_and_estimated() {
    let sb = Sandbox::new("sizes");
    let q = quick(&sb, "run");
    std::fs::write(sb.p("huge.json"), r#"{"name": "huge", "layers": [{"channels": 18446744073709551615}]}"#).unwrap();
    std::fs::write(sb.p("wide.json"), r#"{"name": "wide", "layers": [{"channels": 500000}]}"#).unwrap();
    let before = tree_outside(&sb.root, &["run"]);
    sb.asge(&args(&q, &["--model", "huge.json"])).error(&["huge.json", "18446744073709551615 channels"]);
    sb.asge(&args(&q, &["--width", "1e300"])).error(&["--width", "channels"]);
    sb.asge(&["shard", "--input", "data", "--out", "shards", "--size", "4294967296"]).error(&["--size 4294967296"]);
    // Past what the machine has (here: a limit of 2 GB, so the test does not depend on the machine).
    let limit = [("ASGE_MEMORY_LIMIT", "2000000000")];
    sb.asge_env(&args(&q, &["--width", "100"]), &limit).error(&["memory", "2.0 GB", "--width"]);
    sb.asge_env(&args(&q, &["--model", "wide.json"]), &limit).error(&["memory", "--batch"]);
    assert_eq!(tree_outside(&sb.root, &["run"]), before);
    assert!(!sb.p("run").exists(), "a refused run leaves no folder");
    // A batch larger than the training set (2^54 here) runs as one batch of the images that exist.
    let o = sb.asge(&args(&quick(&sb, "big-batch"), &["--batch", "18014398509481984", "--limit-test", "50"]));
    o.ok();
    // Evaluation batches are cut to the test set as well.
    sb.asge(&["eval", "--checkpoint", "big-batch/best.safetensors", "--batch", "1000000000", "--limit-test", "50"])
        .ok();

    // Checkpoint metadata is checked like a model table: p = 0, p > h, h * w wrapping, a short partial epoch.
    let ck = sb.p("big-batch/best.safetensors");
    let eval = |f: &str| sb.asge(&["eval", "--checkpoint", f, "--dataset", "mnist", "--data", "data/mnist"]);
    type Edit = fn(&mut serde_json::Value);
    let edits: [(&str, Edit); 3] = [
        ("p0", |m| m["layers"][0]["p"] = 0.into()),
        ("p-over", |m| m["layers"][6]["p"] = 3.into()),
        ("hw-wrap", |m| {
            m["image_size"] = (1u64 << 32).into();
            m["layers"][0]["h"] = (1u64 << 32).into();
            m["layers"][0]["w"] = (1u64 << 32).into();
        }),
    ];
    for (tag, edit) in edits {
        let f = format!("{tag}.safetensors");
        std::fs::copy(&ck, sb.p(&f)).unwrap();
        rewrite_checkpoint(&sb.p(&f), |_, meta| {
            let mut m: serde_json::Value = serde_json::from_str(&meta["asge.model"]).unwrap();
            edit(&mut m);
            meta.insert("asge.model".into(), m.to_string());
        });
        eval(&f).error(&[&f, "asge.model"]);
    }
    sb.asge(&args(&quick(&sb, "mid"), &["--epochs", "2", "--checkpoint-every", "5", "--stop-after", "1"])).ok();
    // Make the epoch-1 checkpoint a mid-epoch one whose running sums are short of the model's 7 layers.
    rewrite_checkpoint(&sb.p("mid/last.safetensors"), |_, meta| {
        let mut st: serde_json::Value = serde_json::from_str(&meta["asge.state"]).unwrap();
        st["batches_done"] = 3.into();
        st["step"] = (st["step"].as_u64().unwrap() + 3).into();
        st["partial_epoch"] = serde_json::json!({"images": 96, "layer_loss": [1.0, 2.0], "layer_correct": [1, 2],
            "head_loss": 1.0, "head_correct": 3});
        meta.insert("asge.state".into(), st.to_string());
    });
    sb.asge(&["train", "--resume", "mid", "--quiet"]).error(&["partial-epoch", "7 layers"]);
}

// 5. Readers that trust too much.

#[test]
fn a_gzip_bomb_is_stopped_at_the_size_its_header_declares() {
    let sb = Sandbox::new("gzbomb");
    let dir = sb.p("data/bomb");
    std::fs::create_dir_all(&dir).unwrap();
    let gz = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    // A header for 10 images, their pixels, then 32 gzip members of 64 MiB of zeros each (2 GiB inflated, 2 MB
    // on disk); the reader must stop one byte past the declared 7840.
    let mut bomb = gz(&idx_images(10, 28, &[7; 7840]));
    let zeros = gz(&vec![0u8; 64 << 20]);
    for _ in 0..32 {
        bomb.extend_from_slice(&zeros);
    }
    std::fs::write(dir.join("train-images-idx3-ubyte.gz"), &bomb).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx_labels(&[1; 10])).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte"), idx_images(1, 28, &[0; 784])).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), idx_labels(&[1])).unwrap();
    // Under a 1 GB address-space limit: inflating the whole stream first would abort.
    let bin = bin();
    let o = Command::new("prlimit")
        .args([
            "--as=1000000000",
            "--",
            &bin,
            "train",
            "--dataset",
            "idx",
            "--data",
            "data/bomb",
            "--out",
            "run",
            "--quiet",
        ])
        .current_dir(&sb.root)
        .env("HOME", sb.p("home"))
        .env("MALLOC_ARENA_MAX", "2")
        .output()
        .unwrap();
    Out::of(o).error(&["train-images-idx3-ubyte.gz", "oversized", "7840"]);

    // A header that declares 16 GiB (2^14 images of 1024 x 1024) over 768 MiB of zeros in 1 MB of gzip, under a
    // 1.5 GB address-space limit: refused before inflating, naming what the header declares and the memory there
    // is (inflating into a growing buffer ran out of memory).
    let mut header = vec![0, 0, 8, 3];
    for d in [1u32 << 14, 1024, 1024] {
        header.extend(d.to_be_bytes());
    }
    let mut bomb = gz(&header);
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(&vec![0u8; 64 << 20]).unwrap();
    let dense = e.finish().unwrap();
    for _ in 0..12 {
        bomb.extend_from_slice(&dense);
    }
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    std::fs::write(dir.join("train-images-idx3-ubyte.gz"), &bomb).unwrap();
    let o = Command::new("prlimit")
        .args(["--as=1500000000", "--", &bin, "train", "--dataset", "idx", "--data", "data/bomb", "--out", "run"])
        .current_dir(&sb.root)
        .env("HOME", sb.p("home"))
        .env("MALLOC_ARENA_MAX", "2")
        .output()
        .unwrap();
    Out::of(o).error(&["train-images-idx3-ubyte.gz", "declares [16384, 1024, 1024] (17179869184 bytes)", "available"]);
}

#[test]
fn truncated_jpegs_are_skipped_with_the_reason() {
    let sb = Sandbox::new("jpeg");
    let images = common::data_dir().join("images");
    let photo = std::fs::read(images.join("foolbox/imagenet_00_243.jpg")).unwrap();
    // A progressive JPEG (SOF2) cut in half.
    let progressive = std::fs::read(images.join("foolbox/imagenet_18_317.jpg")).unwrap();
    assert!(progressive.windows(2).any(|w| w == [0xff, 0xc2]), "the file is progressive");
    for c in ["a", "b"] {
        std::fs::create_dir_all(sb.p(&format!("folder/{c}"))).unwrap();
        std::fs::write(sb.p(&format!("folder/{c}/good.jpg")), &photo).unwrap();
    }
    std::fs::write(sb.p("folder/a/first2k.jpg"), &photo[..2048]).unwrap();
    std::fs::write(sb.p("folder/b/progressive-half.jpg"), &progressive[..progressive.len() / 2]).unwrap();
    sb.asge(&["shard", "--input", "folder", "--out", "out", "--size", "16", "--quiet"]).ok();
    let idx = ShardSet::open(&sb.p("out")).unwrap().index;
    assert_eq!(idx.count, 2);
    let mut skipped: Vec<(String, String)> = idx
        .skipped
        .iter()
        .map(|s| (Path::new(&s.file).file_name().unwrap().to_string_lossy().into_owned(), s.error.clone()))
        .collect();
    skipped.sort();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0].0, "first2k.jpg");
    assert_eq!(skipped[1].0, "progressive-half.jpg");
    assert!(skipped.iter().all(|s| s.1.contains("truncated")), "{skipped:?}");
}

#[test]
fn class_folders_keep_exact_names_and_nested_images_count() {
    use std::os::unix::ffi::OsStrExt;
    let sb = Sandbox::new("classes");
    image_folder(&sb.p("folder"), 2, 2, 12);
    // Images in a nested folder belong to their class, as in torchvision's ImageFolder.
    std::fs::create_dir_all(sb.p("folder/class_1/sub/deeper")).unwrap();
    image::RgbImage::new(9, 9).save(sb.p("folder/class_1/sub/deeper/n.png")).unwrap();
    std::fs::write(sb.p("folder/class_1/readme.txt"), b"not an image").unwrap();
    let o = sb.asge(&["shard", "--input", "folder", "--out", "out", "--size", "8"]);
    o.ok();
    assert!(o.stderr.contains("1 files that are not .jpg/.jpeg/.png were left out"), "{}", o.stderr);
    let set = ShardSet::open(&sb.p("out")).unwrap();
    assert_eq!((set.len(), set.label(4)), (5, 1));
    // Two folders whose names are not UTF-8 and the same after a lossy conversion: refused, never merged.
    let bad = sb.p("bad");
    for name in [&b"a\xff"[..], "a\u{FFFD}".as_bytes()] {
        let d = bad.join(std::ffi::OsStr::from_bytes(name));
        std::fs::create_dir_all(&d).unwrap();
        image::RgbImage::new(9, 9).save(d.join("x.png")).unwrap();
    }
    sb.asge(&["shard", "--input", "bad", "--out", "out-bad", "--size", "8"]).error(&["not UTF-8", "rename it"]);
    assert!(!sb.p("out-bad").exists());
}

#[test]
fn a_shard_file_that_changes_under_a_job_is_an_error() {
    let sb = Sandbox::new("shard-change");
    image_folder(&sb.p("folder"), 2, 3, 12);
    sb.asge(&["shard", "--input", "folder", "--out", "out", "--size", "8", "--quiet"]).ok();
    let set = ShardSet::open(&sb.p("out")).unwrap();
    set.verify().unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(sb.p("out/shard-00000.bin")).unwrap();
    f.set_len(100).unwrap();
    let e = format!("{:#}", set.verify().unwrap_err());
    assert!(e.contains("shard-00000.bin") && e.contains("must not change"), "{e}");
}

// 6. Options that make no sense.

#[test]
fn options_that_make_no_sense_are_refused() {
    let sb = Sandbox::new("options");
    let q = quick(&sb, "run");
    let before = tree(&sb.root);
    sb.asge(&args(&q, &["--lr", "1e-3", "--lr-min", "1e-2"])).error(&["--lr-min", "above --lr"]);
    sb.asge(&args(&q, &["--epochs", "0"])).error(&["--epochs 0"]);
    sb.asge(&args(&q, &["--stop-after", "0"])).error(&["--stop-after 0"]);
    sb.asge(&args(&q, &["--limit-test", "0"])).error(&["--limit-test 0"]);
    sb.asge(&args(&q, &["--checkpoint-every", "0"])).error(&["--checkpoint-every 0"]);
    assert_eq!(tree(&sb.root), before);
    // A test file with no images.
    std::fs::write(sb.p("data/mnist/t10k-images-idx3-ubyte"), idx_images(0, 28, &[])).unwrap();
    std::fs::write(sb.p("data/mnist/t10k-labels-idx1-ubyte"), idx_labels(&[])).unwrap();
    sb.asge(&args(&q, &[])).error(&["test set is empty"]);
    sb.mnist("data/mnist", 600, 200);
    // CIFAR-100 coarse labels are range-checked (20 superclasses).
    let c100 = sb.p("data/c100/cifar-100-binary");
    std::fs::create_dir_all(&c100).unwrap();
    let rec = |coarse: u8, fine: u8| [vec![coarse, fine], vec![9u8; 3072]].concat();
    std::fs::write(c100.join("train.bin"), [rec(3, 7), rec(25, 8)].concat()).unwrap();
    std::fs::write(c100.join("test.bin"), rec(1, 2)).unwrap();
    sb.asge(&["train", "--dataset", "cifar100", "--data", "data/c100", "--out", "c100"])
        .error(&["train.bin", "coarse label 25"]);
    // A one-layer model has no fusion heads: no fusion row, no fusion accuracy, and asking for one is an error.
    std::fs::write(sb.p("one.json"), r#"{"name": "one", "layers": [{"channels": 8}]}"#).unwrap();
    let o = sb.asge(&args(&quick(&sb, "one"), &["--model", "one.json"]));
    o.ok();
    assert!(o.stdout.contains("last") && !o.stdout.contains("fusion"), "{}", o.stdout);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.p("one/summary.json")).unwrap()).unwrap();
    let rows: Vec<&str> = summary["test"].as_array().unwrap().iter().map(|r| r["strategy"].as_str().unwrap()).collect();
    assert_eq!(rows, ["last", "best"]);
    let metrics = std::fs::read_to_string(sb.p("one/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"train_fusion_acc\":null"), "{metrics}");
    sb.asge(&["eval", "--checkpoint", "one/best.safetensors", "--strategy", "fusion"])
        .error(&["one-layer model", "fusion"]);
    // An index.json that names a file outside its folder.
    image_folder(&sb.p("folder"), 2, 2, 12);
    for split in ["train", "val"] {
        sb.asge(&["shard", "--input", "folder", "--out", &format!("shards/{split}"), "--size", "8", "--quiet"]).ok();
    }
    let index = sb.p("shards/val/index.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    v["shards"][0]["file"] = "../train/shard-00000.bin".into();
    std::fs::write(&index, v.to_string()).unwrap();
    sb.asge(&[
        "train",
        "--dataset",
        "imagenet",
        "--data",
        "shards",
        "--model",
        "vgg-imagenet",
        "--width",
        "0.125",
        "--out",
        "inet",
    ])
    .error(&["val/index.json", "../train/shard-00000.bin", "not a plain name"]);
    // eval's JSON never replaces a file that is not an eval result.
    std::fs::write(sb.p("mine.json"), b"{\"my\": \"data\"}").unwrap();
    sb.asge(&["eval", "--checkpoint", "one/best.safetensors", "--json", "mine.json"])
        .error(&["mine.json", "not an asge eval result"]);
    assert_eq!(std::fs::read(sb.p("mine.json")).unwrap(), b"{\"my\": \"data\"}");
}

// 7. Round 2: a command that succeeds does no harm.

/// The first bytes of an asge trace.
const TRACE_HEAD: &[u8] = b"{\"otherData\":{\"producer\":\"asge\"},";

#[test]
fn every_output_path_replaces_only_an_earlier_output_of_its_kind() {
    use std::os::unix::fs::FileTypeExt;
    let sb = Sandbox::new("outputs");
    let q = quick(&sb, "r1");
    sb.asge(&args(&q, &[])).ok();
    std::fs::write(sb.p("notes.txt"), b"my notes").unwrap();
    std::fs::create_dir_all(sb.p("adir")).unwrap();
    std::os::unix::fs::symlink(sb.p("notes.txt"), sb.p("link.json")).unwrap();
    let _socket = std::os::unix::net::UnixListener::bind(sb.p("sock")).unwrap();
    // --trace never replaces what the run did not write: a user's file, a link, a folder, a socket, the dataset
    // file it trains on, another run's checkpoint, its own --init, or a file of its own run folder.
    let before = tree_outside(&sb.root, &[]);
    let cases: &[(&[&str], &[&str])] = &[
        (&["--trace", "notes.txt"], &["--trace", "notes.txt", "not an asge trace"]),
        (&["--trace", "link.json"], &["--trace", "symbolic link"]),
        (&["--trace", "adir"], &["--trace", "a folder"]),
        (&["--trace", "sock"], &["--trace", "a socket"]),
        (&["--trace", "data/mnist/train-images-idx3-ubyte"], &["train-images-idx3-ubyte", "this command reads"]),
        (&["--trace", "r1/last.safetensors"], &["r1/last.safetensors", "not an asge trace"]),
        (&["--init", "r1/last.safetensors", "--trace", "r1/last.safetensors"], &["this command reads"]),
        (&["--out", "r2", "--trace", "r2/config.json"], &["--trace", "a file of the run folder itself"]),
        (&["--out", "r1", "--overwrite", "--trace", "r1/last.safetensors"], &["a file of the run folder itself"]),
    ];
    for (extra, needles) in cases {
        let mut a = args(&q, extra);
        if !extra.contains(&"--out") {
            a = args(&q, &[&["--out", "r3"][..], extra].concat());
        }
        sb.asge(&a).error(needles);
        assert_eq!(tree_outside(&sb.root, &[]), before, "{extra:?} changed a file");
    }
    // A character device and a FIFO are written into, never replaced; an earlier asge trace is replaced.
    let o = Command::new("mknod").args([sb.s("null").as_str(), "c", "1", "3"]).status().unwrap();
    assert!(o.success(), "mknod (the test runs as root, as CI does)");
    sb.asge(&args(&q, &["--out", "r4", "--trace", "null"])).ok();
    assert!(sb.p("null").symlink_metadata().unwrap().file_type().is_char_device());
    let fifo = sb.p("fifo");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let reader = std::thread::spawn(move || std::fs::read(fifo).unwrap());
    // Two epochs: the FIFO gets one whole trace at the end (a pipe's reader sees one JSON document, and the run
    // never waits for a reader between epochs).
    sb.asge(&args(&q, &["--out", "r5", "--epochs", "2", "--trace", "fifo"])).ok();
    let got = reader.join().unwrap();
    assert!(got.starts_with(TRACE_HEAD), "the FIFO's reader got {} bytes", got.len());
    serde_json::from_slice::<serde_json::Value>(&got).expect("one JSON document");
    assert!(sb.p("fifo").symlink_metadata().unwrap().file_type().is_fifo());
    sb.asge(&args(&q, &["--out", "r6", "--trace", "t.json"])).ok();
    sb.asge(&args(&q, &["--out", "r7", "--trace", "t.json"])).ok();
    assert!(std::fs::read(sb.p("t.json")).unwrap().starts_with(TRACE_HEAD));
    assert_eq!(std::fs::read(sb.p("notes.txt")).unwrap(), b"my notes");

    // eval: one path for two outputs is refused; export: a hard link to the checkpoint it reads is never
    // replaced, even when its content is an earlier export (only the inode tells).
    let before = tree(&sb.root);
    let ck = "r1/last.safetensors";
    sb.asge(&["eval", "--checkpoint", ck, "--json", "x.out", "--dump-logits", "x.out", "--quiet"])
        .error(&["the same file for two outputs"]);
    sb.asge(&["eval", "--checkpoint", ck, "--json", ck, "--quiet"]).error(&["--json", "this command reads"]);
    assert_eq!(tree(&sb.root), before);
    sb.asge(&["export", "--checkpoint", ck, "--format", "safetensors", "--out", "w.safetensors"]).ok();
    std::fs::hard_link(sb.p("w.safetensors"), sb.p("w-link.safetensors")).unwrap();
    let before = tree(&sb.root);
    sb.asge(&["export", "--checkpoint", "w.safetensors", "--format", "safetensors", "--out", "w-link.safetensors"])
        .error(&["w-link.safetensors", "this command reads"]);
    assert_eq!(tree(&sb.root), before);
}

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
fn the_folder_lock_survives_a_deleted_or_planted_lock_file() {
    let sb = Sandbox::new("lock2");
    let long = LONG_RUN;
    let (mut child, _stderr) = spawn_until(&sb, &long, " step 7/");
    // The lock file deleted under the running training: the folder is still locked.
    std::fs::remove_file(sb.p("busy/.asge.lock")).unwrap();
    sb.asge(&["train", "--resume", "busy", "--quiet"]).error(&["another asge process"]);
    let mut over: Vec<&str> = long.to_vec();
    over.push("--overwrite");
    sb.asge(&over).error(&["another asge process"]);
    child.kill().unwrap();
    child.wait().unwrap();
    // A lock file planted as a hard link to a file outside the folder is never written through.
    std::fs::write(sb.p("outside.txt"), b"precious").unwrap();
    let _ = std::fs::remove_file(sb.p("busy/.asge.lock"));
    std::fs::hard_link(sb.p("outside.txt"), sb.p("busy/.asge.lock")).unwrap();
    sb.asge(&["train", "--resume", "busy", "--quiet", "--stop-after", "1"]).ok();
    assert_eq!(std::fs::read(sb.p("outside.txt")).unwrap(), b"precious");
    // The same for asge shard's folder lock.
    image_folder(&sb.p("folder"), 2, 2, 12);
    std::fs::create_dir_all(sb.p("shards")).unwrap();
    std::fs::hard_link(sb.p("outside.txt"), sb.p("shards/.asge.lock")).unwrap();
    sb.asge(&["shard", "--input", "folder", "--out", "shards", "--size", "8", "--quiet"]).ok();
    assert_eq!(std::fs::read(sb.p("outside.txt")).unwrap(), b"precious");
}

#[test]
fn messages_name_the_option_the_file_or_the_variable() {
    let sb = Sandbox::new("messages2");
    let q = quick(&sb, "run");
    sb.asge(&args(&q, &["--lr", "NaN"])).error(&["--lr NaN", "not a finite number"]);
    std::fs::write(sb.p("bad.toml"), "lr = \"fast\"\n").unwrap();
    sb.asge(&args(&q, &["--config", "bad.toml"])).error(&["--config", "bad.toml", "'lr'", "\"fast\""]);
    // A JSON config with a byte-order mark is JSON.
    std::fs::write(sb.p("bom.json"), b"\xef\xbb\xbf{\"seed\": \"x\"}").unwrap();
    sb.asge(&args(&q, &["--config", "bom.json"])).error(&["--config", "bom.json", "'seed'"]);
    // ASGE_MEMORY_LIMIT takes units, and what it cannot read is an error, not ignored.
    sb.asge_env(&args(&q, &[]), &[("ASGE_MEMORY_LIMIT", "8Q")]).error(&["ASGE_MEMORY_LIMIT=8Q", "not a size"]);
    sb.asge_env(&args(&q, &[]), &[("ASGE_MEMORY_LIMIT", "1K")]).error(&["more than the 1 kB available"]);
    sb.asge_env(&args(&q, &[]), &[("ASGE_MEMORY_LIMIT", "8G")]).ok();
    // Class names are printed, not sent to the terminal as escape sequences.
    let ck = sb.p("run/last.safetensors");
    rewrite_checkpoint(&ck, |_, meta| {
        let mut input: serde_json::Value = serde_json::from_str(&meta["asge.input"]).unwrap();
        for n in input["class_names"].as_array_mut().unwrap() {
            *n = serde_json::json!(format!("\u{1b}]0;owned\u{7}\u{1b}[31m{}", n.as_str().unwrap()));
        }
        meta.insert("asge.input".into(), input.to_string());
    });
    image_folder(&sb.p("pics"), 1, 1, 28);
    let o = sb.asge(&["predict", "--checkpoint", "run/last.safetensors", "pics"]);
    o.ok();
    assert!(!o.stdout.contains('\u{1b}') && o.stdout.contains("\\u{1b}[31m"), "{}", o.stdout);
}

#[test]
fn an_image_bomb_is_refused_before_it_is_decoded_or_resized() {
    let sb = Sandbox::new("imgbomb");
    // A valid PNG of 10,000,000 x 1 pixels: a few kilobytes on disk, 320 million pixels once its short side is
    // resized to 32.
    image_folder(&sb.p("folder"), 2, 2, 24);
    let bomb = sb.p("folder/class_0/bomb.png");
    image::GrayImage::new(10_000_000, 1).save(&bomb).unwrap();
    let size = std::fs::metadata(&bomb).unwrap().len();
    assert!(size < 1 << 20, "the bomb is {size} bytes");
    let bin = bin();
    let under_limit = |args: &[&str]| -> Out {
        let o = Command::new("prlimit")
            .args(["--as=3000000000", "--", &bin])
            .args(args)
            .current_dir(&sb.root)
            .env("HOME", sb.p("home"))
            .env("MALLOC_ARENA_MAX", "2")
            .output()
            .unwrap();
        Out::of(o)
    };
    // asge shard: one skipped file, with its reason; every other image is stored.
    under_limit(&["shard", "--input", "folder", "--out", "shards", "--size", "32", "--quiet"]).ok();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.p("shards/index.json")).unwrap()).unwrap();
    assert_eq!(index["count"], 4, "{index}");
    let skipped = index["skipped"].as_array().unwrap();
    assert_eq!(skipped.len(), 1, "{index}");
    assert!(skipped[0]["file"].as_str().unwrap().ends_with("bomb.png"), "{index}");
    assert!(skipped[0]["error"].as_str().unwrap().contains("10000000x1"), "{index}");
    // predict and eval --folder: one error naming the file.
    sb.asge(&args(&quick(&sb, "run"), &[])).ok();
    under_limit(&["predict", "--checkpoint", "run/last.safetensors", "folder/class_0/bomb.png"])
        .error(&["bomb.png", "10000000x1"]);
    std::fs::create_dir_all(sb.p("digits/0")).unwrap();
    std::fs::copy(&bomb, sb.p("digits/0/bomb.png")).unwrap();
    under_limit(&["eval", "--checkpoint", "run/last.safetensors", "--folder", "digits", "--quiet"])
        .error(&["bomb.png", "10000000x1"]);
    // --max-image-pixels sets the decode bound.
    under_limit(&[
        "shard",
        "--input",
        "folder",
        "--out",
        "small",
        "--size",
        "8",
        "--max-image-pixels",
        "100",
        "--quiet",
    ])
    .error(&["none of the 5 image files", "over the decode bound of 100"]);
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

#[test]
fn shard_refuses_an_output_inside_its_input_and_names_what_it_cannot_read() {
    let sb = Sandbox::new("shard-paths");
    image_folder(&sb.p("folder"), 2, 2, 12);
    let before = tree(&sb.root);
    sb.asge(&["shard", "--input", "folder", "--out", "folder/class_0/shards", "--size", "8", "--quiet"])
        .error(&["--out", "inside --input"]);
    sb.asge(&["shard", "--input", "folder/../folder", "--out", "folder/new/deeper", "--size", "8", "--quiet"])
        .error(&["inside --input"]);
    assert_eq!(tree(&sb.root), before);
    // An image nested past the path-length limit (4096 bytes) is an error naming the entry, not left out silently.
    let mut deep = sb.p("folder/class_1");
    let name = "d".repeat(200);
    while deep.as_os_str().len() < 4000 {
        deep = deep.join(&name);
    }
    std::fs::create_dir_all(&deep).unwrap();
    // The last level is made relative to its parent: its full path is past the limit.
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!("cd {} && mkdir {name} && cp {} {name}/img.png", deep.display(), sb.s("folder/class_1/img0.png")))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    sb.asge(&["shard", "--input", "folder", "--out", "shards", "--size", "8", "--quiet"]).error(&["cannot read"]);
}
