//! Using a trained model outside the trainer: `asge predict` on image files, `asge eval` on an ImageFolder and a
//! shard folder, `--dump-logits`, and the exports checked by other programs: the ONNX graph with onnxruntime and
//! onnx.checker (`tools/onnx_check.py`), the PyTorch module `python/asge_torch.py` with torch. The Python
//! packages come from the folders tools/test.sh installs them into (`$ASGE_PYTOOLS`, `$ASGE_TORCH`); without them
//! these tests fail, they never skip.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

fn asge(args: &[&str]) -> (i32, String, String) {
    common::run_asge(None, args)
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = asge(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Two small MNIST models trained once per test binary: the default grid (every bin a partition of 32 x 32)
/// and `--alpha 1.25` (P = 5 on 32 x 32 and P = 3 on 16 x 16: overlapping bins), with their best checkpoints.
struct Models {
    root: PathBuf,
    plain: PathBuf,
    overlap: PathBuf,
}

fn models() -> &'static Models {
    static M: OnceLock<Models> = OnceLock::new();
    M.get_or_init(|| {
        let root = common::temp_dir("interop");
        let data = common::data_dir();
        let train = |name: &str, extra: &[&str]| -> PathBuf {
            let out = root.join(name);
            let mut args = vec![
                "train",
                "--dataset",
                "mnist",
                "--data",
                s(&data),
                "--width",
                "0.25",
                "--epochs",
                "1",
                "--lr",
                "2e-3",
                "--limit-train",
                "4000",
                "--limit-test",
                "256",
                "--quiet",
                "--out",
                s(&out),
            ];
            args.extend_from_slice(extra);
            ok(&args);
            out.join("best.safetensors")
        };
        let plain = train("plain", &[]);
        let overlap = train("overlap", &["--alpha", "1.25"]);
        // The grid really overlaps: P does not divide H somewhere.
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(root.join("overlap/config.json")).unwrap()).unwrap();
        let layers = cfg["model"]["layers"].as_array().unwrap();
        assert!(
            layers.iter().any(|l| l["h"].as_u64().unwrap() % l["p"].as_u64().unwrap() != 0),
            "alpha 1.25 should give a grid with overlapping bins: {layers:?}"
        );
        Models { root, plain, overlap }
    })
}

/// The first `n` MNIST test images and labels, 28 x 28.
fn mnist_test(n: usize) -> Vec<(Vec<u8>, u8)> {
    let d = common::data_dir().join("mnist");
    let img = std::fs::read(d.join("t10k-images-idx3-ubyte")).unwrap();
    let lab = std::fs::read(d.join("t10k-labels-idx1-ubyte")).unwrap();
    (0..n).map(|i| (img[16 + i * 784..][..784].to_vec(), lab[8 + i])).collect()
}

/// Writes the first `n` test images as an ImageFolder (`DIR/<digit>/<index>.png`): grey PNGs, and every third one
/// as an RGB PNG (three equal channels: the colour path must give the same grey image back).
fn write_image_folder(dir: &Path, n: usize) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for (i, (px, label)) in mnist_test(n).into_iter().enumerate() {
        let d = dir.join(label.to_string());
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(format!("{i:05}.png"));
        if i % 3 == 0 {
            let rgb: Vec<u8> = px.iter().flat_map(|&v| [v, v, v]).collect();
            image::RgbImage::from_raw(28, 28, rgb).unwrap().save(&p).unwrap();
        } else {
            image::GrayImage::from_raw(28, 28, px).unwrap().save(&p).unwrap();
        }
        files.push(p);
    }
    files
}

fn read_json(p: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// The tensors of a safetensors file (f32 as f32, i64 as f32 too: labels are small) and its metadata.
type Tensors = std::collections::HashMap<String, (Vec<usize>, Vec<f32>)>;

/// The tensors of a safetensors file (f32 as f32, i64 as f32 too: labels are small) and its metadata.
fn read_tensors(p: &Path) -> (Tensors, serde_json::Value) {
    let bytes = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = serde_json::to_value(header.metadata().clone().unwrap_or_default()).unwrap();
    let mut out = std::collections::HashMap::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let v: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
            safetensors::Dtype::I64 => {
                raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32).collect()
            }
            d => panic!("{name}: dtype {d:?}"),
        };
        out.insert(name, (view.shape().to_vec(), v));
    }
    (out, meta)
}

fn argmax_rows(v: &[f32], classes: usize) -> Vec<usize> {
    v.chunks_exact(classes).map(|r| r.iter().enumerate().fold(0, |b, (i, &x)| if x > r[b] { i } else { b })).collect()
}

fn repo(p: &str) -> String {
    format!("{}/{p}", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn predict_and_eval_on_image_files_equal_eval_on_the_test_set() {
    let m = models();
    let dir = m.root.join("predict");
    let folder = dir.join("digits");
    let n = 90;
    let files = write_image_folder(&folder, n);
    // The engine's own pass over the same images, in test-file order.
    let dump = dir.join("mnist.logits.safetensors");
    let json = dir.join("mnist.json");
    ok(&[
        "eval",
        "--checkpoint",
        s(&m.plain),
        "--limit-test",
        &n.to_string(),
        "--dump-logits",
        s(&dump),
        "--json",
        s(&json),
        "--quiet",
    ]);
    let (t, meta) = read_tensors(&dump);
    assert_eq!(meta["format"], "asge-logits");
    for strategy in ["last", "best", "fusion"] {
        let want = argmax_rows(&t[strategy].1, 10);
        let out = ok(&["predict", "--checkpoint", s(&m.plain), s(&folder), "--json", "--strategy", strategy]);
        let mut got = std::collections::HashMap::new();
        for line in out.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let top = (v["top"][0]["class"].as_u64().unwrap() as usize, v["top"][0]["logit"].as_f64().unwrap() as f32);
            got.insert(PathBuf::from(v["image"].as_str().unwrap()), top);
            // The class names are the digits, stored in the checkpoint.
            assert_eq!(v["top"][0]["name"], v["top"][0]["class"].to_string());
        }
        assert_eq!(got.len(), n, "{strategy}: one prediction per image");
        for (i, f) in files.iter().enumerate() {
            let (class, logit) = got[f];
            assert_eq!(class, want[i], "{strategy}: {} (test image {i})", f.display());
            // The same input gives the same logit, to the bit: the preprocessing is the evaluation's.
            assert_eq!(logit, t[strategy].1[i * 10 + class], "{strategy}: {} (test image {i})", f.display());
        }
    }
    // eval on the ImageFolder gives the test file's result: the same images, the same labels.
    let jf = dir.join("folder.json");
    ok(&["eval", "--checkpoint", s(&m.plain), "--folder", s(&folder), "--json", s(&jf), "--quiet"]);
    let (a, b) = (read_json(&json), read_json(&jf));
    // The same images in another order (the folder's is by class): the same hits; the mean loss equal up to the
    // order of its sum.
    for (x, y) in a["test"].as_array().unwrap().iter().zip(b["test"].as_array().unwrap()) {
        assert_eq!((&x["strategy"], &x["top1"], &x["top5"]), (&y["strategy"], &y["top1"], &y["top5"]));
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((lx - ly).abs() <= 1e-12 * lx.abs(), "{lx} {ly}");
    }
    assert_eq!(a["test_layer_top1"], b["test_layer_top1"]);
    assert_eq!((a["dataset"].as_str(), b["dataset"].as_str()), (Some("mnist"), Some("imagefolder")));
    // The table names the class and its probability.
    let table = ok(&["predict", "--checkpoint", s(&m.plain), s(&files[0]), "--top", "3"]);
    assert!(table.contains("00000.png") && table.contains('%'), "{table}");
    // Without --strategy the one with the higher validation accuracy in the checkpoint's state answers (fusion's
    // against the best layer's), says why, and predicts as asking for it does.
    let (_, meta) = read_tensors(&m.plain);
    let state: serde_json::Value = serde_json::from_str(meta["asge.state"].as_str().unwrap()).unwrap();
    let fusion = state["best_val"].as_f64().unwrap();
    let number = state["best_layer_number"].as_u64().unwrap() as usize;
    let layer = state["best_layer_acc"][number - 1].as_f64().unwrap();
    let want = if layer > fusion { "best-layer" } else { "fusion" };
    let head = table.lines().next().unwrap();
    assert!(head.contains(&format!("strategy {want} (the higher validation top-1")), "{head} ({layer} vs {fusion})");
    let asked = ok(&["predict", "--checkpoint", s(&m.plain), s(&files[0]), "--top", "3", "--strategy", want]);
    assert!(asked.lines().next().unwrap().contains(&format!("strategy {want} (as asked)")), "{asked}");
    assert_eq!(table.lines().skip(1).collect::<Vec<_>>(), asked.lines().skip(1).collect::<Vec<_>>());
}

/// Writes test images `range` as an ImageFolder of grey PNGs.
fn write_range(dir: &Path, range: std::ops::Range<usize>) -> Vec<PathBuf> {
    let imgs = mnist_test(range.end);
    let mut files = Vec::new();
    for i in range {
        let (px, label) = &imgs[i];
        let d = dir.join(label.to_string());
        std::fs::create_dir_all(&d).unwrap();
        let p = d.join(format!("{i:05}.png"));
        image::GrayImage::from_raw(28, 28, px.clone()).unwrap().save(&p).unwrap();
        files.push(p);
    }
    files.sort();
    files
}

#[test]
fn a_shard_trained_model_predicts_on_files_as_it_evaluates_its_shards() {
    let m = models();
    let dir = m.root.join("shards");
    write_range(&dir.join("train-img"), 0..400);
    let val_files = write_range(&dir.join("val-img"), 400..600);
    let data = dir.join("data");
    for (img, out) in [("train-img", "train"), ("val-img", "val")] {
        ok(&["shard", "--input", s(&dir.join(img)), "--out", s(&data.join(out)), "--size", "32", "--quiet"]);
    }
    // RGB shards of 32 px, a model of 28 px: evaluation takes the centre crop, and predict must do the same
    // from the PNG files (decoded and resized as `asge shard` did).
    let run = dir.join("run");
    ok(&[
        "train",
        "--dataset",
        "imagenet",
        "--data",
        s(&data),
        "--width",
        "0.25",
        "--epochs",
        "1",
        "--image-size",
        "28",
        "--lr",
        "2e-3",
        "--quiet",
        "--out",
        s(&run),
    ]);
    // `imagenet` is the shard dataset's old name: accepted, and recorded as `shards`. The run validates on 1/10
    // of the training shards (40 of 400, seeded), not on nothing, and its plot names the data's folder.
    let config = read_json(&run.join("config.json"));
    assert_eq!((config["train"]["dataset"].as_str(), config["train"]["val"].as_u64()), (Some("shards"), Some(40)));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let epoch: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert!(epoch["val_fusion_acc"].as_f64().is_some(), "no validation: {epoch}");
    let svg = std::fs::read_to_string(run.join("curves.svg")).unwrap();
    assert!(svg.contains("on data (shards)"), "the plot's title does not name the data's folder");
    let ck = run.join("best.safetensors");
    let (a, b) = (dir.join("a.json"), dir.join("b.json"));
    let dump = dir.join("val.logits.safetensors");
    ok(&["eval", "--checkpoint", s(&ck), "--json", s(&a), "--quiet", "--dump-logits", s(&dump)]);
    ok(&["eval", "--checkpoint", s(&ck), "--folder", s(&data.join("val")), "--json", s(&b), "--quiet"]);
    let (a, b) = (read_json(&a), read_json(&b));
    assert_eq!(a["test"], b["test"]);
    assert_eq!((a["dataset"].as_str(), b["dataset"].as_str()), (Some("shards"), Some("shards")));
    let (t, _) = read_tensors(&dump);
    let want = argmax_rows(&t["fusion"].1, 10);
    let out = ok(&["predict", "--checkpoint", s(&ck), s(&dir.join("val-img")), "--json", "--strategy", "fusion"]);
    let got: Vec<(String, usize)> = out
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["image"].as_str().unwrap().to_string(), v["top"][0]["class"].as_u64().unwrap() as usize)
        })
        .collect();
    assert_eq!(got.len(), val_files.len());
    for (i, (f, c)) in got.iter().enumerate() {
        assert_eq!(f, s(&val_files[i]));
        assert_eq!(*c, want[i], "{f}");
    }
    // The grey model refuses the RGB shards, naming both channel counts; a shard folder whose classes are not the
    // checkpoint's is refused, naming the first difference.
    let (code, _, err) = asge(&["eval", "--checkpoint", s(&m.plain), "--folder", s(&data.join("val")), "--quiet"]);
    assert_eq!(code, 1);
    assert!(err.contains("1 channel(s)") && err.contains("has 3"), "{err}");
    let few = dir.join("few");
    write_range(&dir.join("few-img"), 0..30);
    ok(&["shard", "--input", s(&dir.join("few-img")), "--out", s(&few), "--size", "32", "--quiet"]);
    let (code, _, err) = asge(&["eval", "--checkpoint", s(&ck), "--folder", s(&few), "--quiet"]);
    assert_eq!(code, 1);
    assert!(err.contains("are not the checkpoint's 10"), "{err}");
    // An ImageFolder with a class the checkpoint does not know.
    let odd = dir.join("val-img/eleven");
    std::fs::create_dir_all(&odd).unwrap();
    std::fs::copy(&val_files[0], odd.join("x.png")).unwrap();
    let (code, _, err) = asge(&["eval", "--checkpoint", s(&ck), "--folder", s(&dir.join("val-img")), "--quiet"]);
    assert_eq!(code, 1);
    assert!(err.contains("class folder 'eleven' is not a class of"), "{err}");
}

#[test]
fn eval_json_has_the_summary_schema_and_never_replaces_other_files() {
    let m = models();
    let dir = m.root.join("schema");
    std::fs::create_dir_all(&dir).unwrap();
    let j = dir.join("e.json");
    ok(&["eval", "--checkpoint", s(&m.plain), "--limit-test", "64", "--json", s(&j), "--quiet"]);
    let e = read_json(&j);
    let summary = read_json(&m.plain.with_file_name("summary.json"));
    let keys = |v: &serde_json::Value| {
        let mut k: Vec<String> = v.as_object().unwrap().keys().filter(|k| !k.starts_with("train_")).cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&e), keys(&summary));
    assert_eq!((e["format"].as_str(), summary["format"].as_str()), (Some("asge-eval"), Some("asge-summary")));
    // Files this command did not write are refused, byte for byte unchanged.
    let mine = dir.join("notes.txt");
    std::fs::write(&mine, "mine").unwrap();
    for args in [
        vec!["eval", "--checkpoint", s(&m.plain), "--limit-test", "8", "--json", s(&mine)],
        vec!["eval", "--checkpoint", s(&m.plain), "--limit-test", "8", "--json", s(&j), "--dump-logits", s(&mine)],
        vec!["export", "--checkpoint", s(&m.plain), "--format", "onnx", "--out", s(&mine)],
        vec!["export", "--checkpoint", s(&m.plain), "--format", "safetensors", "--out", s(&mine)],
        vec!["export", "--checkpoint", s(&m.plain), "--format", "safetensors", "--out", s(&m.plain)],
    ] {
        let (code, _, err) = asge(&args);
        assert_eq!(code, 1, "{args:?}");
        // Another kind of file, or the very file the command reads.
        let why = err.contains("the file exists and is not") || err.contains("this command reads that file");
        assert!(why && err.contains("choose another path"), "{args:?}: {err}");
    }
    assert_eq!(std::fs::read_to_string(&mine).unwrap(), "mine");
    // A second eval replaces its own earlier result.
    ok(&["eval", "--checkpoint", s(&m.plain), "--limit-test", "32", "--json", s(&j), "--quiet"]);
    assert_eq!(read_json(&j)["test_images"], 32);
}

#[test]
fn safetensors_export_is_the_model_without_optimizer_state() {
    let m = models();
    let dir = m.root.join("st");
    std::fs::create_dir_all(&dir).unwrap();
    let w = dir.join("w.safetensors");
    ok(&["export", "--checkpoint", s(&m.plain), "--format", "safetensors", "--out", s(&w)]);
    let (t, meta) = read_tensors(&w);
    let (full, _) = read_tensors(&m.plain);
    assert!(t.keys().all(|k| !k.starts_with("optim.")));
    assert_eq!(t.len(), full.keys().filter(|k| !k.starts_with("optim.")).count());
    for (k, v) in &t {
        assert_eq!(v, &full[k], "{k}");
    }
    assert!(meta["asge.input"].as_str().unwrap().contains("class_names"));
    // It evaluates as the checkpoint does.
    let (a, b) = (dir.join("a.json"), dir.join("b.json"));
    ok(&["eval", "--checkpoint", s(&m.plain), "--limit-test", "64", "--json", s(&a), "--quiet"]);
    let (code, _, err) = asge(&["eval", "--checkpoint", s(&w), "--limit-test", "64", "--json", s(&b), "--quiet"]);
    // The export has no run config: the dataset must be named.
    assert_eq!(code, 1, "{err}");
    let data = common::data_dir();
    ok(&[
        "eval",
        "--checkpoint",
        s(&w),
        "--dataset",
        "mnist",
        "--data",
        s(&data),
        "--limit-test",
        "64",
        "--json",
        s(&b),
        "--quiet",
    ]);
    assert_eq!(read_json(&a)["test_layer_top1"], read_json(&b)["test_layer_top1"]);
    let (code, _, err) =
        asge(&["export", "--checkpoint", s(&m.plain), "--format", "safetensors", "--strategy", "best", "--out", s(&w)]);
    assert_eq!(code, 1);
    assert!(err.contains("--strategy"), "{err}");
}

/// `asge eval --dump-logits --dump-inputs` on the first 256 test images of a model.
fn dump(model: &Path, name: &str) -> PathBuf {
    let d = model.parent().unwrap().join(format!("{name}.logits.safetensors"));
    let j = model.parent().unwrap().join(format!("{name}.eval.json"));
    ok(&[
        "eval",
        "--checkpoint",
        s(model),
        "--limit-test",
        "256",
        "--dump-logits",
        s(&d),
        "--dump-inputs",
        "--json",
        s(&j),
        "--quiet",
    ]);
    d
}

#[test]
fn onnx_exports_match_the_engine_with_onnxruntime() {
    let m = models();
    for (name, model) in [("plain", &m.plain), ("overlap", &m.overlap)] {
        let d = dump(model, name);
        let mut graphs = Vec::new();
        for strategy in ["last", "best", "fusion"] {
            let f = model.with_file_name(format!("{strategy}.onnx"));
            ok(&["export", "--checkpoint", s(model), "--format", "onnx", "--strategy", strategy, "--out", s(&f)]);
            graphs.push(format!("{strategy}={}", s(&f)));
        }
        let script = repo("tools/onnx_check.py");
        let mut args = vec![script.as_str(), s(&d)];
        args.extend(graphs.iter().map(String::as_str));
        // rtol 1e-4 of the row's largest logit: see docs/interop.md for the bound.
        args.extend(["--rtol", "1e-4"]);
        let out = common::python("ASGE_PYTOOLS", "onnxruntime and onnx", &args);
        println!("{name}:\n{out}");
        assert_eq!(out.matches("0 rows over tolerance").count(), 3, "{out}");
    }
}

#[test]
fn torch_module_loads_every_checkpoint_strictly_and_reproduces_eval() {
    let m = models();
    for (name, model) in [("plain", &m.plain), ("overlap", &m.overlap)] {
        let d = dump(model, &format!("torch-{name}"));
        let out =
            common::python("ASGE_TORCH", "torch", &[&repo("python/asge_torch.py"), s(model), s(&d), "--rtol", "1e-4"]);
        println!("{name}:\n{out}");
        assert!(out.contains("loaded with strict=True"), "{out}");
        assert_eq!(out.matches("0 rows over tolerance").count(), 3, "{out}");
    }
    // The PyTorch fixture (no asge metadata beyond the reference keys), a last checkpoint with its optimizer
    // state, and a weights-only export all load with strict=True.
    let w = m.plain.with_file_name("torch-weights.safetensors");
    ok(&["export", "--checkpoint", s(&m.plain), "--format", "safetensors", "--out", s(&w)]);
    let fixture = common::fixture("vgg8-w0.125-mnist/after2.safetensors");
    let last = m.plain.with_file_name("last.safetensors");
    let script = format!(
        "import sys; sys.path.insert(0, {:?})\nfrom asge_torch import ASGE\nfor p in sys.argv[1:]:\n    m = ASGE.from_checkpoint(p)\n    print(p, len(m.layers), 'layers')\n",
        repo("python")
    );
    let out = common::python("ASGE_TORCH", "torch", &["-c", &script, s(&fixture), s(&last), s(&w)]);
    assert_eq!(out.matches("7 layers").count(), 3, "{out}");
}
