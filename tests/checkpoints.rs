//! Every checkpoint a run writes loads in every reader: over the combinations of dataset kind, model, width,
//! image size (below, at and above the shards' stored side) and precision the command line accepts, a short run
//! (stopped after its first epoch and resumed, so `--resume` reads one) leaves best.safetensors and
//! last.safetensors that `asge eval` (every strategy), `asge predict` and `asge export` (ONNX of one strategy,
//! and safetensors) all take. The writer checks each checkpoint with the reader's own checks before writing it
//! (`checkpoint::check_readable`), and a run checks its first one before training; this test is the end-to-end
//! proof over the combinations.

mod common;

use asge::backend::Precision;
use asge::data::shard::{write_shards, ShardOptions};
use asge::data::DatasetKind;
use asge::eval::Strategy;
use asge::export::Format;
use asge::files::RunStart;
use asge::infer::{self, EvalData, EvalOptions, Model, PredictOptions};
use asge::train::run::{self, RunOptions, TrainConfig};
use std::path::{Path, PathBuf};

/// A PNG of `side` px with a pattern that depends on `seed`.
fn png(path: &Path, side: u32, seed: u32) {
    let img = image::RgbImage::from_fn(side, side, |x, y| {
        image::Rgb([(x * 7 + y * seed) as u8, (seed * 40 + x) as u8, (y * 3 + seed) as u8])
    });
    img.save(path).unwrap();
}

/// An ImageFolder of `classes` x `per_class` PNGs of `side` px, sharded at `stored` px into `data/{train,val}`.
fn shards(root: &Path, stored: usize) -> PathBuf {
    let folder = root.join(format!("folder{stored}"));
    for c in 0..3u32 {
        let d = folder.join(format!("class_{c}"));
        std::fs::create_dir_all(&d).unwrap();
        for k in 0..8 {
            png(&d.join(format!("{k}.png")), 20 + 3 * k, c * 8 + k + 1);
        }
    }
    let data = root.join(format!("shards{stored}"));
    let o = ShardOptions {
        size: stored,
        resize: asge::data::imagefolder::ResizeMode::ShortSide,
        shard_bytes: 1 << 20,
        quiet: true,
    };
    for split in ["train", "val"] {
        write_shards(&folder, &data.join(split), &o).unwrap();
    }
    data
}

/// CIFAR-100's binary layout (coarse label, fine label, 3072 pixels), `n` records per file.
fn cifar100(root: &Path) -> PathBuf {
    let dir = root.join("cifar100/cifar-100-binary");
    std::fs::create_dir_all(&dir).unwrap();
    for (f, n) in [("train.bin", 96), ("test.bin", 24)] {
        let mut v = Vec::new();
        for i in 0..n {
            v.extend([(i % 20) as u8, (i % 100) as u8]);
            v.extend((0..3072).map(|p| ((p * 7 + i * 13) % 251) as u8));
        }
        std::fs::write(dir.join(f), v).unwrap();
    }
    root.join("cifar100")
}

/// An IDX pair of 20 x 20 images in 3 classes (`--dataset idx` resizes them to 32).
fn idx(root: &Path) -> PathBuf {
    let dir = root.join("idx");
    std::fs::create_dir_all(&dir).unwrap();
    for (split, n) in [("train", 60u32), ("t10k", 20)] {
        let mut img = vec![0, 0, 8, 3];
        for d in [n, 20, 20] {
            img.extend(d.to_be_bytes());
        }
        img.extend((0..n * 400).map(|i| (i * 31 % 256) as u8));
        let mut lab = vec![0, 0, 8, 1];
        lab.extend(n.to_be_bytes());
        lab.extend((0..n).map(|i| (i % 3) as u8));
        std::fs::write(dir.join(format!("{split}-images-idx3-ubyte")), img).unwrap();
        std::fs::write(dir.join(format!("{split}-labels-idx1-ubyte")), lab).unwrap();
    }
    dir
}

struct Case {
    dataset: DatasetKind,
    data: PathBuf,
    model: &'static str,
    width: f64,
    image_size: Option<usize>,
    precision: Precision,
}

#[test]
fn every_checkpoint_a_run_writes_loads_in_every_reader() {
    let root = common::temp_dir("ck-readers");
    let real = common::data_dir();
    let s16 = shards(&root, 16);
    let s40 = shards(&root, 40);
    let (c100, idx) = (cifar100(&root), idx(&root));
    use DatasetKind::*;
    use Precision::{F16 as Fp16, F32 as Fp32};
    let case = |dataset, data: &PathBuf, model, width, image_size, precision| Case {
        dataset,
        data: data.clone(),
        model,
        width,
        image_size,
        precision,
    };
    let cases = [
        case(Mnist, &real.join("mnist"), "vgg8", 0.125, None, Fp32),
        case(FashionMnist, &real.join("fashion-mnist"), "vgg8", 0.25, None, Fp16),
        case(Cifar10, &real.join("cifar10"), "vgg11", 0.125, None, Fp32),
        case(Cifar100, &c100, "vgg8", 0.125, None, Fp16),
        case(Idx, &idx, "vgg11", 0.125, None, Fp32),
        // Shards stored at 16 px: a crop above the stored side (upsampling), at it, and below it.
        case(Shards, &s16, "vgg8", 0.125, Some(32), Fp32),
        case(Shards, &s16, "vgg-imagenet", 0.125, Some(48), Fp16),
        case(Shards, &s16, "vgg8", 0.125, Some(16), Fp32),
        case(Shards, &s40, "vgg11", 0.125, Some(32), Fp16),
        case(Shards, &s40, "vgg-imagenet", 0.25, None, Fp32),
    ];
    let picture = root.join("picture.png");
    png(&picture, 37, 3);
    for (i, c) in cases.iter().enumerate() {
        let what = format!(
            "case {i}: {} {} width {} size {:?} {:?}",
            c.dataset.name(),
            c.model,
            c.width,
            c.image_size,
            c.precision
        );
        let cfg = TrainConfig {
            dataset: c.dataset,
            data: c.data.clone(),
            model: c.model.into(),
            width: c.width,
            image_size: c.image_size,
            precision: c.precision,
            epochs: 2,
            batch: 8,
            limit_train: Some(40),
            limit_test: Some(12),
            val: if c.dataset == Shards { None } else { Some(8) },
            ..Default::default()
        };
        let out = root.join(format!("run{i}"));
        let quiet = RunOptions { quiet: true, ..Default::default() };
        let stopped = run::train(&cfg, &out, RunStart::Fresh, RunOptions { stop_after: Some(1), ..quiet });
        assert!(stopped.as_ref().is_ok_and(|s| s.is_none()), "{what}: {:?}", stopped.err());
        run::train(&cfg, &out, RunStart::Resume, quiet).unwrap_or_else(|e| panic!("{what}: --resume: {e:#}"));
        for name in ["best.safetensors", "last.safetensors"] {
            let ck = out.join(name);
            let what = format!("{what}: {name}");
            let model = Model::open(&ck).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            let data = match c.dataset {
                Shards => EvalData::Folder(c.data.join("val")),
                kind => EvalData::Builtin { kind, dir: c.data.clone() },
            };
            let o = EvalOptions {
                strategy: Strategy::All,
                batch: 8,
                limit: Some(8),
                device: "cpu",
                precision: Precision::F32,
                dump: None,
                quiet: true,
            };
            let (report, _) = infer::eval(&model, &data, &o).unwrap_or_else(|e| panic!("{what}: eval: {e:#}"));
            assert_eq!(report.test.len(), 3, "{what}: every strategy");
            let p = PredictOptions { strategy: None, top: 2, batch: 4, device: "cpu", precision: Precision::F32 };
            let (_, _, preds) = infer::predict(&ck, std::slice::from_ref(&picture), &p)
                .unwrap_or_else(|e| panic!("{what}: predict: {e:#}"));
            assert_eq!(preds.len(), 1, "{what}");
            let strategy = [Strategy::Last, Strategy::Best, Strategy::Fusion][i % 3];
            asge::export::export(&ck, Format::Onnx, Some(strategy), &root.join(format!("run{i}-{name}.onnx")))
                .unwrap_or_else(|e| panic!("{what}: export onnx: {e:#}"));
            asge::export::export(&ck, Format::Safetensors, None, &root.join(format!("run{i}-{name}.w")))
                .unwrap_or_else(|e| panic!("{what}: export safetensors: {e:#}"));
        }
    }
}
