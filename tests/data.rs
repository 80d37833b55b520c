//! Dataset readers on the real files (known values: the datasets' published sizes and sha256 sums, as tools/fetch-datasets.sh checks them), the exact Pillow resize, and
//! clear errors on corrupt input.

mod common;

use asge::data::resize::resize_bilinear_u8;
use asge::data::{self, DatasetKind};
use std::io::Write;
use std::path::Path;

#[test]
fn mnist_real_files() {
    let s = data::load(DatasetKind::Mnist, &common::data_dir(), None, None).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (60_000, 10_000));
    assert_eq!((s.train.channels, s.train.size, s.train.classes), (1, 32, 10));
    let mut hist = [0usize; 10];
    for &l in &s.test.labels {
        hist[l as usize] += 1;
    }
    assert_eq!(hist, [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]);
    // The 28 -> 32 resize equals Pillow 13's BILINEAR on the first 200 test images, byte for byte.
    let want = std::fs::read(common::fixture("pillow-resize/mnist-t10k-first200-32x32.u8")).unwrap();
    assert_eq!(&s.test.images[..want.len()], &want[..]);
}

#[test]
fn resize_matches_pillow_at_other_sizes() {
    for side in [20, 40] {
        let src = std::fs::read(common::fixture(&format!("pillow-resize/random-{side}x{side}.u8"))).unwrap();
        let want = std::fs::read(common::fixture(&format!("pillow-resize/random-{side}x{side}-to-32x32.u8"))).unwrap();
        assert_eq!(resize_bilinear_u8(&src, side, side, 32, 32), want, "{side}x{side}");
    }
}

#[test]
fn fashion_mnist_gz_and_parent_folder() {
    // --data may name the parent folder; the files are .gz.
    let s = data::load(DatasetKind::FashionMnist, &common::data_dir(), None, Some(100)).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (60_000, 100));
    let mut hist = [0usize; 10];
    for &l in &s.train.labels {
        hist[l as usize] += 1;
    }
    assert!(hist.iter().all(|&h| h == 6000), "{hist:?}");
}

#[test]
fn cifar10_real_files() {
    let dir = common::data_dir().join("cifar10");
    let s = data::load(DatasetKind::Cifar10, &dir, None, None).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (50_000, 10_000));
    assert_eq!((s.train.channels, s.train.size), (3, 32));
    assert_eq!(&s.train.image(0)[..8], &[59, 43, 50, 68, 98, 119, 139, 145]);
    assert_eq!(&s.test.image(0)[..8], &[158, 159, 165, 166, 160, 156, 162, 159]);
    assert_eq!(&s.train.labels[..10], &[6, 9, 9, 4, 1, 1, 2, 7, 8, 3]);
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::File::create(path).unwrap().write_all(bytes).unwrap();
}

fn idx_images(n: u32, side: u32, payload: usize) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 3];
    for d in [n, side, side] {
        v.extend(d.to_be_bytes());
    }
    v.extend(std::iter::repeat_n(7u8, payload));
    v
}

fn idx_labels(labels: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, 8, 1];
    v.extend((labels.len() as u32).to_be_bytes());
    v.extend(labels);
    v
}

fn err_of(dir: &Path) -> String {
    match data::load(DatasetKind::Idx, dir, None, None) {
        Ok(_) => panic!("{} loaded without error", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn idx_generic_sizes_and_classes_from_labels() {
    let dir = common::temp_dir("idx-ok");
    write(&dir.join("train-images-idx3-ubyte"), &idx_images(4, 20, 4 * 400));
    write(&dir.join("train-labels-idx1-ubyte"), &idx_labels(&[0, 1, 2, 3]));
    write(&dir.join("t10k-images-idx3-ubyte"), &idx_images(2, 20, 2 * 400));
    write(&dir.join("t10k-labels-idx1-ubyte"), &idx_labels(&[4, 0]));
    let s = data::load(DatasetKind::Idx, &dir, None, None).unwrap();
    assert_eq!((s.train.size, s.train.classes, s.test.len()), (32, 5, 2));
    assert!(s.train.images.iter().all(|&p| p == 7));
}

#[test]
fn corrupt_idx_files_are_clear_errors() {
    let ok_labels = idx_labels(&[0, 1, 2, 3]);
    let cases: Vec<(&str, Vec<u8>, Vec<u8>, &str)> = vec![
        ("truncated", idx_images(4, 28, 4 * 784 - 10), ok_labels.clone(), "truncated"),
        ("magic", b"\x1f\x8b\x08\x00garbage-not-gzip".to_vec(), ok_labels.clone(), "gzip"),
        ("wrong-magic", vec![1, 2, 3, 4, 0, 0, 0, 0], ok_labels.clone(), "not an IDX file"),
        ("counts", idx_images(4, 28, 4 * 784), idx_labels(&[0, 1, 2]), "4 images but"),
        ("empty", vec![], ok_labels.clone(), "truncated IDX"),
    ];
    for (tag, images, labels, needle) in cases {
        let dir = common::temp_dir(&format!("idx-{tag}"));
        write(&dir.join("train-images-idx3-ubyte"), &images);
        write(&dir.join("train-labels-idx1-ubyte"), &labels);
        write(&dir.join("t10k-images-idx3-ubyte"), &idx_images(1, 28, 784));
        write(&dir.join("t10k-labels-idx1-ubyte"), &idx_labels(&[0]));
        let e = err_of(&dir);
        assert!(e.contains(needle) && e.contains("train-"), "{tag}: {e}");
    }
    // A label out of range for MNIST's 10 classes names the file.
    let dir = common::temp_dir("idx-label");
    write(&dir.join("train-images-idx3-ubyte"), &idx_images(2, 28, 2 * 784));
    write(&dir.join("train-labels-idx1-ubyte"), &idx_labels(&[0, 12]));
    write(&dir.join("t10k-images-idx3-ubyte"), &idx_images(1, 28, 784));
    write(&dir.join("t10k-labels-idx1-ubyte"), &idx_labels(&[0]));
    let e = format!("{:#}", data::load(DatasetKind::Mnist, &dir, None, None).err().unwrap());
    assert!(e.contains("label 12") && e.contains("train-labels"), "{e}");
    // A missing file.
    let dir = common::temp_dir("idx-missing");
    let e = format!("{:#}", data::load(DatasetKind::Mnist, &dir, None, None).err().unwrap());
    assert!(e.contains("no train-images"), "{e}");
}

#[test]
fn corrupt_cifar_files_are_clear_errors() {
    let dir = common::temp_dir("cifar-bad");
    let rec = |label: u8| {
        let mut r = vec![label];
        r.extend(std::iter::repeat_n(1u8, 3072));
        r
    };
    for i in 1..=5 {
        write(&dir.join(format!("data_batch_{i}.bin")), &rec(1));
    }
    let mut truncated = rec(2);
    truncated.truncate(3000);
    write(&dir.join("test_batch.bin"), &truncated);
    let e = format!("{:#}", data::load(DatasetKind::Cifar10, &dir, None, None).err().unwrap());
    assert!(e.contains("test_batch.bin") && e.contains("not a whole number"), "{e}");
    write(&dir.join("test_batch.bin"), &rec(10));
    let e = format!("{:#}", data::load(DatasetKind::Cifar10, &dir, None, None).err().unwrap());
    assert!(e.contains("label 10"), "{e}");
}

#[test]
fn split_is_seeded_and_disjoint() {
    let (t, v) = data::split(1000, 100, 42).unwrap();
    assert_eq!((t.len(), v.len()), (900, 100));
    let (t2, v2) = data::split(1000, 100, 42).unwrap();
    assert_eq!((&t, &v), (&t2, &v2));
    let mut all = [t.clone(), v.clone()].concat();
    all.sort();
    assert_eq!(all, (0..1000).collect::<Vec<_>>());
    assert_ne!(data::split(1000, 100, 43).unwrap().1, v);
    assert!(data::split(10, 10, 1).is_err());
}

#[test]
fn cifar100_binary_uses_the_fine_label() {
    // CIFAR-100 is in no reachable registry: a synthetic cifar-100-binary folder in the official record layout
    // (coarse label, fine label, 3072 pixels).
    let root = common::temp_dir("cifar100");
    let dir = root.join("cifar-100-binary");
    std::fs::create_dir_all(&dir).unwrap();
    let rec = |coarse: u8, fine: u8, px: u8| {
        let mut r = vec![coarse, fine];
        r.extend(std::iter::repeat_n(px, 3072));
        r
    };
    write(&dir.join("train.bin"), &[rec(3, 99, 10), rec(19, 0, 20)].concat());
    write(&dir.join("test.bin"), &rec(7, 42, 30));
    let s = data::load(DatasetKind::Cifar100, &root, None, None).unwrap();
    assert_eq!((s.train.len(), s.test.len(), s.train.classes), (2, 1, 100));
    assert_eq!(s.train.labels, vec![99, 0]);
    assert_eq!(s.test.labels, vec![42]);
    assert!(s.train.image(1).iter().all(|&p| p == 20));
    write(&dir.join("test.bin"), &rec(7, 100, 30));
    let e = format!("{:#}", data::load(DatasetKind::Cifar100, &root, None, None).err().unwrap());
    assert!(e.contains("label 100"), "{e}");
}
