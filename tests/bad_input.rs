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
/// Inputs too large, damaged or changing: sizes checked before allocating, bombs, truncated files.
#[path = "bad_input/inputs.rs"]
mod inputs;

/// Interrupts, stops in every phase and resumes: what a stopped run leaves, and what a resume questions.
#[path = "bad_input/interrupts.rs"]
mod interrupts;

/// The files a command may write, replace or remove, and never more.
#[path = "bad_input/files.rs"]
mod files;
