//! tests/bad_input.rs: the files a command may write, replace or remove (its own outputs only), under planted
//! symlinks, a full disk, deleted locks and outputs inside inputs.

use super::*;

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
