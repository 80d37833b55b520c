//! The shard pipeline: ImageFolder -> shards -> memory-mapped reader -> augmented batches, on generated images
//! and on real JPEGs from registry packages (foolbox's ImageNet samples, opencv-doc's images, skimage's
//! truncated JPEG); bad input; loader determinism; an epoch of vgg-imagenet from shards with a trace.

mod common;

use asge::data::augment::Augment;
use asge::data::imagefolder::{self, ResizeMode};
use asge::data::loader::make_batch;
use asge::data::shard::{write_shards, ShardIndex, ShardOptions, ShardSet};
use asge::data::{DatasetKind, ImageSource};
use asge::files::RunStart;
use asge::train::run::{self, RunOptions, TrainConfig};
use std::path::Path;

fn opts(size: usize) -> ShardOptions {
    ShardOptions { size, resize: ResizeMode::ShortSide, shard_bytes: 1 << 30, quiet: true }
}

/// An ImageFolder of solid-colour images: class c, image k has colour (40c + k, 100, 200 - k), sizes vary.
fn make_folder(root: &Path, classes: usize, per_class: usize) {
    for c in 0..classes {
        let dir = root.join(format!("class_{c}"));
        std::fs::create_dir_all(&dir).unwrap();
        for k in 0..per_class {
            let (w, h) = (20 + 7 * k as u32, 30 + 3 * c as u32);
            let img = image::RgbImage::from_pixel(w, h, image::Rgb([(40 * c + k) as u8, 100, (200 - k) as u8]));
            let ext = if k % 2 == 0 { "png" } else { "jpg" };
            img.save(dir.join(format!("img{k}.{ext}"))).unwrap();
        }
    }
}

#[test]
fn shard_round_trip_on_generated_images() {
    let root = common::temp_dir("sh-in");
    let out = common::temp_dir("sh-out");
    make_folder(&root, 3, 5);
    // A grayscale PNG and a corrupt "JPEG" in class 1.
    image::GrayImage::from_pixel(17, 40, image::Luma([77])).save(root.join("class_1/gray.png")).unwrap();
    std::fs::write(root.join("class_1/broken.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    let mut o = opts(16);
    o.shard_bytes = 5 * 3 * 16 * 16; // five records per shard
    let idx = write_shards(&root, &out, &o).unwrap();
    assert_eq!(idx.count, 16);
    assert_eq!(idx.classes, vec!["class_0", "class_1", "class_2"]);
    assert_eq!(idx.shards.len(), 4);
    assert_eq!(idx.skipped.len(), 1);
    assert!(idx.skipped[0].file.ends_with("broken.jpg"), "{:?}", idx.skipped);
    let set = ShardSet::open(&out).unwrap();
    assert_eq!((set.len(), set.size(), set.channels(), set.classes()), (16, 16, 3, 3));
    // Files are sorted within a class: class_1 = gray.png, img0..img4 (broken.jpg skipped).
    let labels: Vec<u32> = (0..16).map(|i| set.label(i)).collect();
    assert_eq!(labels, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]);
    let gray = set.image(5);
    assert!(gray.iter().all(|&v| v == 77), "grayscale becomes equal RGB planes");
    // PNG images are lossless: solid colours survive resizing exactly.
    let img = set.image(2); // class 0, img2.png
    assert!(img[..256].iter().all(|&v| v == 2) && img[256..512].iter().all(|&v| v == 100));
    assert!(img[512..].iter().all(|&v| v == 198));
    // Every record equals a fresh decode of its file.
    let direct = imagefolder::load_rgb(&root.join("class_2/img3.jpg"), 16, ResizeMode::ShortSide).unwrap();
    assert_eq!(set.image(14), &direct[..]);
    assert!(idx.mean.iter().all(|m| (0.0..=1.0).contains(m)) && idx.std.iter().all(|s| *s > 0.0));
    // A second run is a no-op: the index is not rewritten.
    let before = std::fs::metadata(out.join("index.json")).unwrap().modified().unwrap();
    let again = write_shards(&root, &out, &o).unwrap();
    assert_eq!(again, idx);
    assert_eq!(std::fs::metadata(out.join("index.json")).unwrap().modified().unwrap(), before);
    // Another size into the same folder is refused.
    assert!(write_shards(&root, &out, &opts(8)).unwrap_err().to_string().contains("choose another folder"));
}

#[test]
fn bad_shard_input_is_a_clear_error() {
    let root = common::temp_dir("sh-bad-in");
    let out = common::temp_dir("sh-bad-out");
    let e = format!("{:#}", write_shards(&root, &out, &opts(8)).unwrap_err());
    assert!(e.contains("no class folders"), "{e}");
    make_folder(&root, 2, 2);
    std::fs::create_dir_all(root.join("empty_class")).unwrap();
    let e = format!("{:#}", write_shards(&root, &out, &opts(8)).unwrap_err());
    assert!(e.contains("empty_class") && e.contains("no .jpg"), "{e}");
    std::fs::remove_dir(root.join("empty_class")).unwrap();
    assert!(write_shards(&root, &out, &opts(0)).unwrap_err().to_string().contains("--size 0"));
    write_shards(&root, &out, &opts(8)).unwrap();
    // A shard that does not match its index.
    let shard = out.join("shard-00000.bin");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() - 10]).unwrap();
    let e = format!("{:#}", ShardSet::open(&out).err().unwrap());
    assert!(e.contains("shard-00000.bin") && e.contains("do not match"), "{e}");
    // No index at all.
    let e = format!("{:#}", ShardSet::open(&root).err().unwrap());
    assert!(e.contains("no index.json"), "{e}");
    // Everything undecodable.
    let junk = common::temp_dir("sh-junk");
    std::fs::create_dir_all(junk.join("a")).unwrap();
    std::fs::write(junk.join("a/x.jpg"), b"nope").unwrap();
    let e = format!("{:#}", write_shards(&junk, &common::temp_dir("sh-junk-out"), &opts(8)).unwrap_err());
    assert!(e.contains("none of the 1 image files"), "{e}");
}

#[test]
fn real_jpegs_from_the_packages() {
    let images = common::data_dir().join("images");
    assert!(images.join(".complete").is_file(), "run tools/fetch-datasets.sh DIR images");
    let root = common::temp_dir("sh-real");
    for (class, src) in [("foolbox", "foolbox"), ("opencv", "opencv"), ("broken", "skimage")] {
        std::fs::create_dir_all(root.join(class)).unwrap();
        for e in std::fs::read_dir(images.join(src)).unwrap().filter_map(|e| e.ok()) {
            std::fs::copy(e.path(), root.join(class).join(e.file_name())).unwrap();
        }
    }
    // The broken class also needs one good image to be a class.
    std::fs::copy(images.join("foolbox/imagenet_00_243.jpg"), root.join("broken/good.jpg")).unwrap();
    let out = common::temp_dir("sh-real-out");
    let idx: ShardIndex = write_shards(&root, &out, &opts(64)).unwrap();
    // 20 + 59 + 1 decodable; truncated.jpg (400 bytes) is skipped and named.
    assert!(idx.skipped.iter().any(|s| s.file.ends_with("truncated.jpg")), "{:?}", idx.skipped);
    assert_eq!(idx.count + idx.skipped.len(), 20 + 59 + 2);
    assert!(idx.count >= 78, "only {} decoded: {:?}", idx.count, idx.skipped);
    let set = ShardSet::open(&out).unwrap();
    // Real photographs: not constant, mean in a plausible range.
    let img = set.image(0);
    let mean = img.iter().map(|&v| v as f64).sum::<f64>() / img.len() as f64;
    assert!(img.iter().any(|&v| v != img[0]) && (20.0..235.0).contains(&mean));
}

#[test]
fn imagenet_augmentation_is_seeded() {
    let root = common::temp_dir("sh-aug-in");
    let out = common::temp_dir("sh-aug-out");
    make_folder(&root, 2, 3);
    // Gradients, so that crops differ.
    let g = image::RgbImage::from_fn(50, 40, |x, y| image::Rgb([(x * 5) as u8, (y * 6) as u8, ((x + y) * 2) as u8]));
    g.save(root.join("class_0/grad.png")).unwrap();
    write_shards(&root, &out, &opts(24)).unwrap();
    let set = ShardSet::open(&out).unwrap();
    let idx: Vec<usize> = (0..set.len()).collect();
    let a = make_batch(&set, &idx, Augment::ResizedCrop(16), 7, 0);
    let b = make_batch(&set, &idx, Augment::ResizedCrop(16), 7, 0);
    let c = make_batch(&set, &idx, Augment::ResizedCrop(16), 8, 0);
    assert_eq!(a.x.len(), set.len() * 3 * 16 * 16);
    assert_eq!(a.x, b.x);
    assert_ne!(a.x, c.x);
    let e1 = make_batch(&set, &idx, Augment::CenterCrop(16), 1, 0);
    let e2 = make_batch(&set, &idx, Augment::CenterCrop(16), 2, 0);
    assert_eq!(e1.x, e2.x, "evaluation crops draw nothing random");
    assert!(a.x.iter().all(|v| v.is_finite()));
}

#[test]
fn vgg_imagenet_trains_from_shards_with_a_trace() {
    let root = common::temp_dir("sh-train-in");
    let data = common::temp_dir("sh-train-data");
    make_folder(&root, 4, 6);
    write_shards(&root, &data.join("train"), &opts(40)).unwrap();
    write_shards(&root, &data.join("val"), &opts(40)).unwrap();
    let cfg = TrainConfig {
        dataset: DatasetKind::Shards,
        data: data.clone(),
        model: "vgg-imagenet".into(),
        width: 0.125,
        epochs: 1,
        batch: 8,
        image_size: Some(32),
        ..Default::default()
    };
    let out = common::temp_dir("sh-train-run");
    asge::trace::enable(&out.join("trace.json"));
    let s = run::train(&cfg, &out, RunStart::Fresh, RunOptions { quiet: true, ..Default::default() }).unwrap().unwrap();
    assert_eq!(s.test_images, 24);
    assert_eq!(s.test_layer_top1.len(), 8);
    let fusion = s.test.iter().find(|r| r.strategy == "fusion").unwrap();
    assert!(fusion.top5 >= fusion.top1);
    let trace: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trace.json")).unwrap()).unwrap();
    let names: Vec<&str> = trace["traceEvents"].as_array().unwrap().iter().filter_map(|e| e["name"].as_str()).collect();
    for n in ["prepare batch", "conv_goodness_fwd", "conv_goodness_wgrad", "layer_output", "fusion heads"] {
        assert!(names.contains(&n), "trace has no {n} span");
    }
    // A shard folder without val/ is a clear error.
    std::fs::remove_dir_all(data.join("val")).unwrap();
    let e = format!(
        "{:#}",
        run::train(&cfg, &common::temp_dir("sh-train-run2"), RunStart::Fresh, RunOptions::default()).unwrap_err()
    );
    assert!(e.contains("no val/ or test/"), "{e}");
}
