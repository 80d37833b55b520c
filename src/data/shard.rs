//! Memory-mapped shards: `asge shard` decodes an ImageFolder once into fixed-size u8 records (CHW, `3 x S x S`),
//! training maps them and gathers random batches from the page cache.
//!
//! A shard folder holds `shard-NNNNN.bin` (records back to back, at most `--shard-mb` each), `labels.u16` (one
//! little-endian u16 per record) and `index.json` ([`ShardIndex`]), written last. Every file is written to a
//! `.tmp` name, synced and renamed, so an interrupted run leaves no shard that looks complete, and a folder
//! without `index.json` is not a shard set.

use super::imagefolder::{self, ResizeMode};
use super::ImageSource;
use crate::train::checkpoint::write_atomic;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FORMAT: &str = "asge-shards";

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardFile {
    pub file: String,
    pub first: usize,
    pub count: usize,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub file: String,
    pub error: String,
}

/// `index.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardIndex {
    pub format: String,
    pub version: u32,
    pub source: String,
    pub resize: ResizeMode,
    pub count: usize,
    pub channels: usize,
    pub size: usize,
    pub record_bytes: usize,
    pub classes: Vec<String>,
    /// Per-channel mean and standard deviation of the pixels, in [0, 1].
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
    pub shards: Vec<ShardFile>,
    pub labels_file: String,
    /// Files that could not be decoded, and why; they are not in the shards.
    pub skipped: Vec<Skipped>,
}

#[derive(Clone, Debug)]
pub struct ShardOptions {
    pub size: usize,
    pub resize: ResizeMode,
    pub shard_bytes: usize,
    pub quiet: bool,
}

/// Streams records into size-bounded shard files (`.tmp` until complete).
struct ShardWriter {
    dir: PathBuf,
    limit: usize,
    shards: Vec<ShardFile>,
    current: Option<(std::io::BufWriter<std::fs::File>, PathBuf, usize)>,
    written: usize,
}

impl ShardWriter {
    fn push(&mut self, record: &[u8]) -> Result<()> {
        let per_shard = (self.limit / record.len()).max(1);
        if self.current.as_ref().is_some_and(|c| c.2 >= per_shard) {
            self.finish_current()?;
        }
        if self.current.is_none() {
            let name = format!("shard-{:05}.bin", self.shards.len());
            let tmp = self.dir.join(format!("{name}.tmp"));
            let f = std::fs::File::create(&tmp).with_context(|| format!("{}: cannot create", tmp.display()))?;
            self.shards.push(ShardFile { file: name, first: self.written, count: 0 });
            self.current = Some((std::io::BufWriter::with_capacity(1 << 20, f), tmp, 0));
        }
        let (w, tmp, n) = self.current.as_mut().unwrap();
        w.write_all(record).with_context(|| format!("{}: write failed", tmp.display()))?;
        *n += 1;
        self.written += 1;
        self.shards.last_mut().unwrap().count += 1;
        Ok(())
    }

    fn finish_current(&mut self) -> Result<()> {
        if let Some((w, tmp, _)) = self.current.take() {
            let f = w.into_inner().map_err(|e| anyhow::anyhow!("{}: {e}", tmp.display()))?;
            f.sync_all()?;
            let done = self.dir.join(&self.shards.last().unwrap().file);
            std::fs::rename(&tmp, &done).with_context(|| format!("{}: cannot rename", done.display()))?;
        }
        Ok(())
    }
}

/// `asge shard`: decodes `input` (an ImageFolder) into shards in `out`. Re-running on a finished output with the
/// same input and options is a no-op.
pub fn write_shards(input: &Path, out: &Path, o: &ShardOptions) -> Result<ShardIndex> {
    if o.size == 0 {
        bail!("--size 0: the shard images need at least one pixel");
    }
    if o.shard_bytes == 0 {
        bail!("--shard-mb 0: shards need room for at least one image");
    }
    let source = std::fs::canonicalize(input)
        .with_context(|| format!("--input {}: no such folder", input.display()))?
        .display()
        .to_string();
    let index_path = out.join("index.json");
    if let Ok(text) = std::fs::read_to_string(&index_path) {
        let idx: ShardIndex = serde_json::from_str(&text)
            .with_context(|| format!("{}: not an asge shard index", index_path.display()))?;
        if idx.source == source && idx.size == o.size && idx.resize == o.resize {
            ShardSet::open(out).with_context(|| format!("{}: the existing shards are damaged", out.display()))?;
            if !o.quiet {
                eprintln!("asge shard: {} is up to date ({} images)", out.display(), idx.count);
            }
            return Ok(idx);
        }
        bail!(
            "--out {}: holds shards of {} at {}px; choose another folder or delete it",
            out.display(),
            idx.source,
            idx.size
        );
    }
    let (files, classes) = imagefolder::scan(input)?;
    if classes.len() > u16::MAX as usize {
        bail!("--input {}: {} classes; at most 65535 are supported", input.display(), classes.len());
    }
    std::fs::create_dir_all(out).with_context(|| format!("--out {}: cannot create", out.display()))?;
    // Leftovers of an interrupted run.
    for e in std::fs::read_dir(out)?.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        if (name.starts_with("shard-") && name.contains(".bin")) || name.ends_with(".tmp") {
            std::fs::remove_file(e.path())?;
        }
    }
    let pb = if o.quiet { ProgressBar::hidden() } else { ProgressBar::new(files.len() as u64) };
    pb.set_style(
        ProgressStyle::with_template("shard [{bar:30}] {pos}/{len} {per_sec} {eta} {msg}")
            .unwrap()
            .progress_chars("=> "),
    );
    let rec = 3 * o.size * o.size;
    let mut writer =
        ShardWriter { dir: out.to_path_buf(), limit: o.shard_bytes, shards: Vec::new(), current: None, written: 0 };
    let mut labels: Vec<u16> = Vec::new();
    let mut skipped = Vec::new();
    let (mut sum, mut sum_sq) = ([0f64; 3], [0f64; 3]);
    for batch in files.chunks(256) {
        let decoded: Vec<Result<Vec<u8>>> =
            batch.par_iter().map(|(p, _)| imagefolder::load_rgb(p, o.size, o.resize)).collect();
        for ((path, label), img) in batch.iter().zip(decoded) {
            match img {
                Ok(img) => {
                    for c in 0..3 {
                        let plane = &img[c * o.size * o.size..][..o.size * o.size];
                        sum[c] += plane.iter().map(|&v| v as f64).sum::<f64>();
                        sum_sq[c] += plane.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
                    }
                    writer.push(&img)?;
                    labels.push(*label as u16);
                }
                Err(e) => skipped.push(Skipped { file: path.display().to_string(), error: format!("{e:#}") }),
            }
        }
        pb.inc(batch.len() as u64);
        pb.set_message(format!("{} skipped", skipped.len()));
    }
    writer.finish_current()?;
    pb.finish_and_clear();
    let count = labels.len();
    if count == 0 {
        bail!(
            "--input {}: none of the {} image files could be decoded (first: {})",
            input.display(),
            files.len(),
            skipped[0].error
        );
    }
    let px = (count * o.size * o.size) as f64 * 255.0;
    let mean: Vec<f64> = sum.iter().map(|s| s / px).collect();
    let std: Vec<f64> = (0..3).map(|c| (sum_sq[c] / (px * 255.0) - mean[c] * mean[c]).max(0.0).sqrt()).collect();
    let label_bytes: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
    write_atomic(&out.join("labels.u16"), &label_bytes)?;
    let index = ShardIndex {
        format: FORMAT.into(),
        version: 1,
        source,
        resize: o.resize,
        count,
        channels: 3,
        size: o.size,
        record_bytes: rec,
        classes,
        mean,
        std,
        shards: writer.shards,
        labels_file: "labels.u16".into(),
        skipped,
    };
    write_atomic(&index_path, serde_json::to_string_pretty(&index)?.as_bytes())?;
    if !o.quiet {
        eprintln!(
            "asge shard: {} images of {} classes into {} shard(s) in {} ({} skipped, listed in index.json)",
            count,
            index.classes.len(),
            index.shards.len(),
            out.display(),
            index.skipped.len()
        );
    }
    Ok(index)
}

/// A shard set, memory-mapped.
pub struct ShardSet {
    pub index: ShardIndex,
    maps: Vec<Mmap>,
    labels: Vec<u32>,
}

impl ShardSet {
    /// Opens and validates a shard folder: every file the index names exists with exactly the size it should have.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("index.json");
        let text = std::fs::read_to_string(&index_path).with_context(|| {
            format!("{}: no index.json (not a shard folder, or `asge shard` did not finish)", dir.display())
        })?;
        let index: ShardIndex = serde_json::from_str(&text)
            .with_context(|| format!("{}: not an asge shard index", index_path.display()))?;
        if index.format != FORMAT {
            bail!("{}: format '{}', expected '{FORMAT}'", index_path.display(), index.format);
        }
        if index.record_bytes != index.channels * index.size * index.size || index.size == 0 {
            bail!(
                "{}: record size {} does not match {}x{}x{}",
                index_path.display(),
                index.record_bytes,
                index.channels,
                index.size,
                index.size
            );
        }
        let mut maps = Vec::new();
        let mut expected_first = 0;
        for s in &index.shards {
            let p = dir.join(&s.file);
            let f = std::fs::File::open(&p)
                .with_context(|| format!("{}: missing shard file named by index.json", p.display()))?;
            let len = f.metadata()?.len() as usize;
            if len != s.count * index.record_bytes || s.first != expected_first {
                bail!(
                    "{}: {} bytes, index.json says {} records of {} bytes from record {} (the shards do not match their index)",
                    p.display(),
                    len,
                    s.count,
                    index.record_bytes,
                    s.first
                );
            }
            expected_first += s.count;
            // SAFETY: shard files are immutable once renamed into place; nothing in asge writes them afterwards.
            maps.push(unsafe { Mmap::map(&f) }.with_context(|| format!("{}: cannot map", p.display()))?);
        }
        if expected_first != index.count {
            bail!("{}: the shards hold {expected_first} records, the index says {}", index_path.display(), index.count);
        }
        let lp = dir.join(&index.labels_file);
        let lb = std::fs::read(&lp).with_context(|| format!("{}: cannot read labels", lp.display()))?;
        if lb.len() != 2 * index.count {
            bail!("{}: {} bytes for {} labels", lp.display(), lb.len(), index.count);
        }
        let labels: Vec<u32> = lb.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect();
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= index.classes.len()) {
            bail!("{}: label {l} of record {i} is out of range for {} classes", lp.display(), index.classes.len());
        }
        Ok(ShardSet { index, maps, labels })
    }
}

impl ImageSource for ShardSet {
    fn len(&self) -> usize {
        self.index.count
    }
    fn channels(&self) -> usize {
        self.index.channels
    }
    fn size(&self) -> usize {
        self.index.size
    }
    fn classes(&self) -> usize {
        self.index.classes.len()
    }
    fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }
    fn image(&self, i: usize) -> &[u8] {
        let s = self.index.shards.partition_point(|s| s.first + s.count <= i);
        let shard = &self.index.shards[s];
        let rec = self.index.record_bytes;
        &self.maps[s][(i - shard.first) * rec..][..rec]
    }
}
