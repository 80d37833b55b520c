//! tests/bad_input.rs: inputs too large, damaged or changing under a job: sizes checked before anything is
//! allocated, gzip and image bombs, truncated JPEGs, exact class-folder names.

use super::*;

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
