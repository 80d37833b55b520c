//! Datasets: readers for the official layouts, the exact 28 -> 32 resize, augmentation, and the loader
//! that prepares batches on worker threads ahead of the trainer.

pub mod augment;
pub mod cifar;
pub mod idx;
pub mod imagefolder;
pub mod input;
pub mod loader;
pub mod resize;
pub mod shard;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// The largest default validation split of a shard dataset.
pub const MAX_DEFAULT_VAL: usize = 50_000;

/// Side of the square images every model sees (the released code resizes MNIST to 32x32).
pub const IMAGE_SIZE: usize = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetKind {
    Mnist,
    FashionMnist,
    Cifar10,
    Cifar100,
    /// Any IDX pair named like MNIST's (`train-*`, `t10k-*`, raw or .gz), resized to 32x32.
    Idx,
    /// Shards made by `asge shard` from any ImageFolder (ImageNet's or a user's own): `DIR/train` and `DIR/val`
    /// (or `DIR/test`). `imagenet`, its name before, is still accepted (on the command line and in config files).
    #[value(alias = "imagenet")]
    #[serde(alias = "imagenet")]
    Shards,
}

impl DatasetKind {
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
            DatasetKind::Idx => "idx",
            DatasetKind::Shards => "shards",
        }
    }

    /// The name a run records its data under (the data identity a resume checks): [`DatasetKind::name`], but
    /// `imagenet` for shards, as runs recorded it before the name changed, so that they still resume.
    pub fn identity_name(self) -> &'static str {
        match self {
            DatasetKind::Shards => "imagenet",
            k => k.name(),
        }
    }

    /// Validation share of the training file in the released code (10k of 60k; 5k of 50k); for shards 1/10 of
    /// the training shards, as CIFAR's.
    pub fn default_val_fraction(self) -> f64 {
        match self {
            DatasetKind::Cifar10 | DatasetKind::Cifar100 | DatasetKind::Shards => 0.1,
            _ => 1.0 / 6.0,
        }
    }

    /// The default validation split of `n` training images (`--val` unset): the share above, and for shards at
    /// most [`MAX_DEFAULT_VAL`] images (ImageNet's 1.28 M would give 128,000).
    pub fn default_val(self, n: usize) -> usize {
        let v = (n as f64 * self.default_val_fraction()).round() as usize;
        match self {
            DatasetKind::Shards => v.min(MAX_DEFAULT_VAL),
            _ => v,
        }
    }
}

/// Where a loader reads images: u8 CHW `[C, S, S]` records with labels, in memory or memory-mapped.
pub trait ImageSource: Send + Sync {
    fn len(&self) -> usize;
    fn channels(&self) -> usize;
    /// Side of the stored square images.
    fn size(&self) -> usize;
    fn classes(&self) -> usize;
    fn label(&self, i: usize) -> u32;
    fn image(&self, i: usize) -> &[u8];
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Class `i`'s name, where the source knows it (a shard folder's ImageFolder names).
    fn class_names(&self) -> Option<Vec<String>> {
        None
    }
    /// Checks that the source is still what it was when opened (the trainer calls it before every epoch).
    fn verify(&self) -> Result<()> {
        Ok(())
    }
}

impl ImageSource for Dataset {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn channels(&self) -> usize {
        self.channels
    }
    fn size(&self) -> usize {
        self.size
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }
    fn image(&self, i: usize) -> &[u8] {
        Dataset::image(self, i)
    }
}

/// Images as u8 `[N, C, S, S]` plus labels.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub images: Vec<u8>,
    pub labels: Vec<u32>,
    pub channels: usize,
    pub size: usize,
    pub classes: usize,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn pixels(&self) -> usize {
        self.channels * self.size * self.size
    }
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * self.pixels()..][..self.pixels()]
    }
    fn truncate(&mut self, n: usize) {
        let n = n.min(self.len());
        self.labels.truncate(n);
        self.images.truncate(n * self.pixels());
    }
}

/// A dataset's training and test files.
pub struct Splits {
    pub kind: DatasetKind,
    pub train: Dataset,
    pub test: Dataset,
    /// Class `i`'s name (digits for the IDX datasets).
    pub class_names: Vec<String>,
}

/// Loads `kind` from `dir` (the folder of files or its parent), keeping at most `limit_train` / `limit_test`
/// images of each file (the first ones, in file order).
pub fn load(kind: DatasetKind, dir: &Path, limit_train: Option<usize>, limit_test: Option<usize>) -> Result<Splits> {
    if !dir.exists() {
        bail!(
            "--data {}: no such folder (tools/fetch-datasets.sh DIR fetches MNIST, Fashion-MNIST and CIFAR-10)",
            dir.display()
        );
    }
    let (mut train, mut test, names_dir) = match kind {
        DatasetKind::Shards => bail!("--dataset shards reads shard folders (asge shard), not an in-memory dataset"),
        DatasetKind::Mnist | DatasetKind::FashionMnist | DatasetKind::Idx => {
            let (a, b) = load_idx_pair(kind, dir)?;
            (a, b, None)
        }
        DatasetKind::Cifar10 => load_cifar(dir, &["cifar-10-batches-bin", "cifar10/cifar-10-batches-bin"], 10)?,
        DatasetKind::Cifar100 => load_cifar(dir, &["cifar-100-binary", "cifar100/cifar-100-binary"], 100)?,
    };
    let class_names = input::builtin_class_names(kind, names_dir.as_deref(), train.classes);
    if let Some(n) = limit_train {
        train.truncate(n);
    }
    if let Some(n) = limit_test {
        test.truncate(n);
    }
    Ok(Splits { kind, train, test, class_names })
}

fn subdirs(kind: DatasetKind) -> &'static [&'static str] {
    match kind {
        DatasetKind::Mnist => &["", "mnist", "MNIST/raw"],
        DatasetKind::FashionMnist => &["", "fashion-mnist", "FashionMNIST/raw", "fashion"],
        _ => &[""],
    }
}

/// Finds `<prefix>*` (e.g. `train-images`) in the first candidate folder that has one.
fn find_prefixed(dir: &Path, kind: DatasetKind, prefix: &str) -> Result<PathBuf> {
    for sub in subdirs(kind) {
        let d = if sub.is_empty() { dir.to_path_buf() } else { dir.join(sub) };
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        let mut hits: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(prefix)))
            .collect();
        hits.sort();
        // Prefer the raw file over the .gz when both exist.
        if let Some(p) = hits.iter().find(|p| p.extension().is_none_or(|e| e != "gz")).or(hits.first()) {
            return Ok(p.clone());
        }
    }
    bail!(
        "--data {}: no {prefix}* file for --dataset {} (looked in {})",
        dir.display(),
        kind.name(),
        subdirs(kind).iter().map(|s| if s.is_empty() { "." } else { s }).collect::<Vec<_>>().join(", ")
    )
}

fn load_idx_pair(kind: DatasetKind, dir: &Path) -> Result<(Dataset, Dataset)> {
    let mut parts = Vec::new();
    for split in ["train", "t10k"] {
        let img_path = find_prefixed(dir, kind, &format!("{split}-images"))?;
        let lab_path = find_prefixed(dir, kind, &format!("{split}-labels"))?;
        let img = idx::read_idx_u8(&img_path, 3)?;
        let lab = idx::read_idx_u8(&lab_path, 1)?;
        let (n, h, w) = (img.dims[0], img.dims[1], img.dims[2]);
        if n != lab.dims[0] {
            bail!("{}: {n} images but {}: {} labels", img_path.display(), lab_path.display(), lab.dims[0]);
        }
        if h != w || h == 0 {
            bail!("{}: images are {h}x{w}; square images are expected", img_path.display());
        }
        parts.push((img_path, lab_path, n, h, img.data, lab.data));
    }
    let classes = match kind {
        DatasetKind::Idx => parts.iter().flat_map(|p| p.5.iter()).map(|&l| l as usize + 1).max().unwrap_or(0),
        _ => 10,
    };
    if classes < 2 {
        bail!("--data {}: the labels name fewer than 2 classes", dir.display());
    }
    let mut out = Vec::new();
    for (img_path, lab_path, n, side, data, labels) in parts {
        if let Some((i, &l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= classes) {
            bail!("{}: label {l} at index {i} is out of range for {classes} classes", lab_path.display());
        }
        let images = if side == IMAGE_SIZE {
            data
        } else {
            use rayon::prelude::*;
            let plane = side * side;
            let resized: Vec<Vec<u8>> = data
                .par_chunks(plane)
                .map(|im| resize::resize_bilinear_u8(im, side, side, IMAGE_SIZE, IMAGE_SIZE))
                .collect();
            resized.concat()
        };
        let _ = (img_path, n);
        out.push(Dataset {
            images,
            labels: labels.into_iter().map(u32::from).collect(),
            channels: 1,
            size: IMAGE_SIZE,
            classes,
        });
    }
    let test = out.pop().unwrap();
    let train = out.pop().unwrap();
    Ok((train, test))
}

/// The training and test files of a CIFAR binary version, and the folder they are in.
fn load_cifar(dir: &Path, subs: &[&str], classes: usize) -> Result<(Dataset, Dataset, Option<PathBuf>)> {
    let (train_files, test_file, label_bytes): (Vec<String>, &str, usize) = if classes == 10 {
        ((1..=5).map(|i| format!("data_batch_{i}.bin")).collect(), "test_batch.bin", 1)
    } else {
        (vec!["train.bin".to_string()], "test.bin", 2)
    };
    let base = std::iter::once(dir.to_path_buf())
        .chain(subs.iter().map(|s| dir.join(s)))
        .find(|d| d.join(test_file).is_file())
        .with_context(|| {
            format!(
                "--data {}: no {test_file} here or in {} (the CIFAR binary version is expected)",
                dir.display(),
                subs.join(", ")
            )
        })?;
    let read = |files: &[String]| -> Result<Dataset> {
        let (mut images, mut labels) = (Vec::new(), Vec::new());
        for f in files {
            let (i, l) = cifar::read_cifar_bin(&base.join(f), label_bytes, classes)?;
            images.extend(i);
            labels.extend(l);
        }
        Ok(Dataset { images, labels, channels: 3, size: 32, classes })
    };
    Ok((read(&train_files)?, read(&[test_file.to_string()])?, Some(base.clone())))
}

/// A seeded train/validation split of `n` training images: `(train, val)` index lists, each in file order.
pub fn split(n: usize, val: usize, seed: u64) -> Result<(Vec<usize>, Vec<usize>)> {
    if val >= n {
        bail!("--val {val}: the training file has only {n} images");
    }
    let mut perm: Vec<usize> = (0..n).collect();
    crate::rng::Rng::new(crate::rng::derive(seed, 0x5917)).shuffle(&mut perm);
    let mut v = perm[..val].to_vec();
    let mut t = perm[val..].to_vec();
    v.sort_unstable();
    t.sort_unstable();
    Ok((t, v))
}

/// u8 pixels to [0, 1] (`ToTensor`), then the per-sample RMS norm `x / (sqrt(mean x^2) + e^-50)`.
pub fn to_input(pixels: &[u8], out: &mut [f32]) {
    for (o, &p) in out.iter_mut().zip(pixels) {
        *o = p as f32 / 255.0;
    }
    rms_normalize(out);
}

/// In-place per-sample RMS norm (docs/method.md §2).
pub fn rms_normalize(x: &mut [f32]) {
    let ms = x.iter().map(|&v| v * v).sum::<f32>() / x.len() as f32;
    let denom = ms.sqrt() + crate::kernel_abi::RMS_EPS;
    for v in x.iter_mut() {
        *v /= denom;
    }
}
