//! Memory-mapped shards: `asge shard` decodes an ImageFolder once into fixed-size u8 records (CHW, `3 x S x S`),
//! training maps them and gathers random batches from the page cache.
//!
//! A shard folder holds `shard-NNNNN.bin` (records back to back, at most `--shard-mb` each), `labels.u16` (one
//! little-endian u16 per record) and `index.json` ([`ShardIndex`]), written last. Every file is written under a
//! unique temporary name, synced and renamed ([`crate::files::TempFile`]), so an interrupted run leaves no shard
//! that looks complete, and a folder without `index.json` is not a shard set.
//!
//! The writer touches only what it writes: it holds the folder's lock while it works, names every file before it
//! creates it in `.asge-shard-partial.json`, and removes on failure (or, after a crash, on the next run) exactly
//! the files named there. A shard-like file it did not write stops it with an error; nothing else in the folder
//! is looked at.
//!
//! The reader checks the index with checked arithmetic (every count, size and offset), accepts only plain file
//! names inside the folder, and checks every file's size at open and again before each epoch
//! ([`ImageSource::verify`]): a memory map cannot survive a file that shrinks under it (the process would get
//! SIGBUS), so shard files must not change while a job reads them.

use super::imagefolder::{self, ResizeMode};
use super::ImageSource;
use crate::files::{self, write_atomic, FolderLock, TempFile};
use crate::limits;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub const FORMAT: &str = "asge-shards";

/// The in-progress manifest: every file an unfinished `asge shard` may have left in the folder.
const PARTIAL: &str = ".asge-shard-partial.json";

/// The largest stored image side.
pub const MAX_SIZE: usize = 1 << 14;

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

/// A file name that stays inside its folder: not empty, no separator, not `.` or `..`.
fn plain_name(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('\0')
}

/// `.asge-shard-partial.json`: the files this writer may have created, and what each one it did create is (its
/// device, inode, length and modification time, recorded once it is in place). A later run removes a named file
/// only when it is still that very file: a name read from a manifest alone (a planted or stale one) removes
/// nothing.
#[derive(Default, Serialize, Deserialize)]
struct Partial {
    files: Vec<String>,
    #[serde(default)]
    created: std::collections::BTreeMap<String, FileId>,
}

/// What identifies a file this writer created.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FileId {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i64,
}

impl FileId {
    /// The file at `path` now (never through a symlink).
    fn of(path: &Path) -> Option<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = path.symlink_metadata().ok().filter(|m| m.is_file())?;
        Some(FileId { dev: m.dev(), ino: m.ino(), len: m.len(), mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec() })
    }
}

/// The files of one unfinished `asge shard` in `dir`, removed on failure.
struct Owned {
    dir: PathBuf,
    partial: Partial,
    done: bool,
}

impl Owned {
    /// Names `file` in the manifest before it is created.
    fn claim(&mut self, file: &str) -> Result<()> {
        self.partial.files.push(file.to_string());
        self.save()
    }

    fn save(&self) -> Result<()> {
        write_atomic(&self.dir.join(PARTIAL), serde_json::to_string(&self.partial)?.as_bytes())
    }

    /// Records that `file` (claimed before) is now in place.
    fn created(&mut self, file: &str) -> Result<()> {
        if let Some(id) = FileId::of(&self.dir.join(file)) {
            self.partial.created.insert(file.to_string(), id);
            self.save()?;
        }
        Ok(())
    }

    /// Removes the files a manifest names that are still the files it recorded creating (and the temporary files
    /// of the names it claimed), then the manifest.
    fn remove_all(dir: &Path, partial: &Partial) -> Result<()> {
        let temps: Vec<PathBuf> = std::fs::read_dir(dir)
            .with_context(|| format!("{}: cannot read", dir.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| files::is_temp_name(n) && partial.files.iter().any(|f| n.starts_with(&format!(".{f}.asge-"))))
            .map(|n| dir.join(n))
            .collect();
        let ours = partial
            .files
            .iter()
            .filter(|f| plain_name(f))
            .filter(|f| partial.created.get(*f).is_some_and(|id| FileId::of(&dir.join(f)) == Some(*id)))
            .map(|f| dir.join(f));
        for f in ours.chain(temps) {
            match std::fs::remove_file(&f) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("{}: cannot remove", f.display())),
            }
        }
        match std::fs::remove_file(dir.join(PARTIAL)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("{}: cannot remove", dir.join(PARTIAL).display()))
            }
            _ => Ok(()),
        }
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if !self.done {
            let _ = Owned::remove_all(&self.dir, &self.partial);
        }
    }
}

/// Streams records into size-bounded shard files (temporary until complete).
struct ShardWriter {
    owned: Owned,
    per_shard: usize,
    shards: Vec<ShardFile>,
    current: Option<TempFile>,
    written: usize,
}

impl ShardWriter {
    fn push(&mut self, record: &[u8]) -> Result<()> {
        if self.current.is_some() && self.shards.last().is_some_and(|s| s.count >= self.per_shard) {
            self.finish_current()?;
        }
        if self.current.is_none() {
            let name = format!("shard-{:05}.bin", self.shards.len());
            self.owned.claim(&name)?;
            self.current = Some(TempFile::create(&self.owned.dir.join(&name))?);
            self.shards.push(ShardFile { file: name, first: self.written, count: 0 });
        }
        self.current.as_mut().expect("a shard is open").write_all(record)?;
        self.written += 1;
        self.shards.last_mut().expect("a shard is open").count += 1;
        Ok(())
    }

    fn finish_current(&mut self) -> Result<()> {
        if let Some(t) = self.current.take() {
            t.persist()?;
            let name = self.shards.last().expect("a shard was open").file.clone();
            self.owned.created(&name)?;
        }
        Ok(())
    }
}

/// `asge shard`: decodes `input` (an ImageFolder) into shards in `out`. Re-running on a finished output with the
/// same input and options is a no-op.
pub fn write_shards(input: &Path, out: &Path, o: &ShardOptions) -> Result<ShardIndex> {
    if o.size == 0 || o.size > MAX_SIZE {
        bail!("--size {}: the shard images take 1 to {MAX_SIZE} pixels a side", o.size);
    }
    if o.shard_bytes == 0 {
        bail!("--shard-mb 0: shards need room for at least one image");
    }
    let rec = limits::product("--size", &[3, o.size, o.size])?;
    // A batch of 256 decoded records, and the shard writer's buffer.
    limits::ensure_fits(&format!("--size {}", o.size), (rec as u64) * 512, "--size")?;
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
    // The output inside the input would be read as images of a class by the next run over that folder.
    let abs_out = files::resolved(out);
    if abs_out.starts_with(&source) {
        bail!(
            "--out {} is inside --input {}: its files would be read as part of the dataset; choose a folder outside it",
            out.display(),
            input.display()
        );
    }
    let scan = imagefolder::scan(input)?;
    let (files, classes) = (scan.files, scan.classes);
    if classes.len() > u16::MAX as usize + 1 {
        bail!("--input {}: {} classes; at most 65536 are supported", input.display(), classes.len());
    }
    std::fs::create_dir_all(out).with_context(|| format!("--out {}: cannot create", out.display()))?;
    let _lock = FolderLock::acquire(out)?;
    // What an earlier, interrupted run of this tool left (it named every file before creating it).
    let partial_path = out.join(PARTIAL);
    let mut named = Vec::new();
    if partial_path.symlink_metadata().is_ok() {
        let text = std::fs::read_to_string(&partial_path)
            .with_context(|| format!("{}: cannot read", partial_path.display()))?;
        let earlier: Partial = serde_json::from_str(&text)
            .with_context(|| format!("{}: not an asge shard manifest", partial_path.display()))?;
        Owned::remove_all(out, &earlier)?;
        named = earlier.files;
    }
    // A shard-like file still there was not written by this tool, or cannot be shown to be: leave it, and stop.
    for e in std::fs::read_dir(out).with_context(|| format!("--out {}: cannot read", out.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if (name.starts_with("shard-") && name.ends_with(".bin")) || name == "labels.u16" {
            let why = if named.contains(&name) {
                "an unfinished asge shard's manifest names it but does not record creating this very file (a run \
                 stopped between writing and recording it, a manifest from an older asge, or a planted one)"
            } else {
                "no index.json or unfinished asge shard names it"
            };
            bail!("--out {}: {name} is there but {why}; move it away or choose another folder", out.display());
        }
    }
    if !o.quiet {
        eprintln!(
            "asge shard: {} images of {} classes from {} into {}",
            files.len(),
            classes.len(),
            source,
            out.display()
        );
        if scan.ignored > 0 {
            eprintln!("asge shard: {} files that are not .jpg/.jpeg/.png were left out", scan.ignored);
        }
    }
    let pb = if o.quiet { ProgressBar::hidden() } else { ProgressBar::new(files.len() as u64) };
    pb.set_style(
        ProgressStyle::with_template("shard [{bar:30}] {pos}/{len} {per_sec} {eta} {msg}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    let owned = Owned { dir: out.to_path_buf(), partial: Partial::default(), done: false };
    let mut writer =
        ShardWriter { owned, per_shard: (o.shard_bytes / rec).max(1), shards: Vec::new(), current: None, written: 0 };
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
            skipped.first().map_or("-", |s: &Skipped| s.error.as_str())
        );
    }
    let px = (count * o.size * o.size) as f64 * 255.0;
    let mean: Vec<f64> = sum.iter().map(|s| s / px).collect();
    let std: Vec<f64> = (0..3).map(|c| (sum_sq[c] / (px * 255.0) - mean[c] * mean[c]).max(0.0).sqrt()).collect();
    let label_bytes: Vec<u8> = labels.iter().flat_map(|l| l.to_le_bytes()).collect();
    writer.owned.claim("labels.u16")?;
    write_atomic(&out.join("labels.u16"), &label_bytes)?;
    writer.owned.created("labels.u16")?;
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
        shards: writer.shards.clone(),
        labels_file: "labels.u16".into(),
        skipped,
    };
    writer.owned.claim("index.json")?;
    write_atomic(&index_path, serde_json::to_string_pretty(&index)?.as_bytes())?;
    // Complete: the files are the shard set's now, not an unfinished run's.
    writer.owned.done = true;
    std::fs::remove_file(&partial_path).with_context(|| format!("{}: cannot remove", partial_path.display()))?;
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
    dir: PathBuf,
}

impl ShardIndex {
    /// Checks an index read from a file: the format, plain file names, and every count, size and offset with
    /// checked arithmetic. `path` names the file in messages.
    fn validate(&self, path: &Path) -> Result<()> {
        let p = path.display();
        if self.format != FORMAT || self.version != 1 {
            bail!("{p}: format '{}' version {}, expected '{FORMAT}' version 1", self.format, self.version);
        }
        if !matches!(self.channels, 1 | 3) || self.size == 0 || self.size > MAX_SIZE {
            bail!(
                "{p}: {} channels of {}x{} pixels (1 or 3 channels, 1 to {MAX_SIZE} a side)",
                self.channels,
                self.size,
                self.size
            );
        }
        let rec = limits::product(format_args!("{p}: the record size"), &[self.channels, self.size, self.size])?;
        if self.record_bytes != rec {
            bail!(
                "{p}: record size {} does not match {}x{}x{}",
                self.record_bytes,
                self.channels,
                self.size,
                self.size
            );
        }
        if self.classes.is_empty() || self.classes.len() > u16::MAX as usize + 1 {
            bail!("{p}: {} classes (1 to 65536)", self.classes.len());
        }
        for f in self.shards.iter().map(|s| &s.file).chain([&self.labels_file]) {
            if !plain_name(f) {
                bail!("{p}: file name '{f}' is not a plain name inside the shard folder");
            }
        }
        let mut next = 0usize;
        for s in &self.shards {
            if s.first != next {
                bail!("{p}: {} starts at record {}, the shards before it end at {next}", s.file, s.first);
            }
            limits::product(format_args!("{p}: {}", s.file), &[s.count, rec])?;
            next = limits::checked(next.checked_add(s.count), || format!("{p}: the record count"))?;
        }
        if next != self.count {
            bail!("{p}: the shards hold {next} records, the index says {}", self.count);
        }
        Ok(())
    }
}

impl ShardSet {
    /// Opens `--dataset shards`' folders: `DIR/train` and `DIR/val` (or `DIR/test`).
    pub fn open_train_test(dir: &Path) -> Result<(Arc<ShardSet>, Arc<ShardSet>)> {
        let train = ShardSet::open(&dir.join("train"))
            .with_context(|| format!("--data {}: the training shards", dir.display()))?;
        let test_dir =
            ["val", "test"].iter().map(|d| dir.join(d)).find(|d| d.join("index.json").is_file()).with_context(
                || {
                    format!(
                    "--data {}: no val/ or test/ shard folder beside train/ (asge shard --input VAL_DIR --out {}/val)",
                    dir.display(),
                    dir.display()
                )
                },
            )?;
        let test = ShardSet::open(&test_dir)?;
        if test.index.classes != train.index.classes {
            bail!("{}: its classes differ from {}'s", test_dir.display(), dir.join("train").display());
        }
        Ok((Arc::new(train), Arc::new(test)))
    }

    /// Opens and validates a shard folder: every file the index names exists with exactly the size it should have.
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("index.json");
        let meta = std::fs::metadata(&index_path).with_context(|| {
            format!("{}: no index.json (not a shard folder, or `asge shard` did not finish)", dir.display())
        })?;
        if meta.len() > 1 << 30 {
            bail!("{}: {} bytes, too large for a shard index", index_path.display(), meta.len());
        }
        files::note_input(&index_path);
        let text =
            std::fs::read_to_string(&index_path).with_context(|| format!("{}: cannot read", index_path.display()))?;
        let index: ShardIndex = serde_json::from_str(&text)
            .with_context(|| format!("{}: not an asge shard index", index_path.display()))?;
        index.validate(&index_path)?;
        let mut maps = Vec::new();
        for s in &index.shards {
            let p = dir.join(&s.file);
            files::note_input(&p);
            let f = std::fs::File::open(&p)
                .with_context(|| format!("{}: missing shard file named by index.json", p.display()))?;
            check_shard_len(&p, f.metadata()?.len(), s, index.record_bytes)?;
            // SAFETY: shard files are immutable once renamed into place; nothing in asge writes them afterwards, and
            // their sizes are checked again before every epoch (ShardSet::verify). A file that another program
            // shrinks while it is mapped faults the process (SIGBUS): the README says not to change them.
            maps.push(unsafe { Mmap::map(&f) }.with_context(|| format!("{}: cannot map", p.display()))?);
        }
        let lp = dir.join(&index.labels_file);
        let want = limits::product(format_args!("{}", lp.display()), &[index.count, 2])?;
        let have = std::fs::metadata(&lp).with_context(|| format!("{}: cannot read labels", lp.display()))?.len();
        if have != want as u64 {
            bail!("{}: {have} bytes for {} labels", lp.display(), index.count);
        }
        files::note_input(&lp);
        let lb = std::fs::read(&lp).with_context(|| format!("{}: cannot read labels", lp.display()))?;
        if lb.len() != want {
            bail!("{}: {} bytes for {} labels (it changed while being read)", lp.display(), lb.len(), index.count);
        }
        let labels: Vec<u32> = lb.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect();
        if let Some((i, l)) = labels.iter().enumerate().find(|(_, &l)| l as usize >= index.classes.len()) {
            bail!("{}: label {l} of record {i} is out of range for {} classes", lp.display(), index.classes.len());
        }
        Ok(ShardSet { index, maps, labels, dir: dir.to_path_buf() })
    }
}

fn check_shard_len(p: &Path, len: u64, s: &ShardFile, record_bytes: usize) -> Result<()> {
    let want = (s.count as u64).saturating_mul(record_bytes as u64);
    if len != want {
        bail!(
            "{}: {} bytes, index.json says {} records of {} bytes from record {} (the shards do not match their index)",
            p.display(),
            len,
            s.count,
            record_bytes,
            s.first
        );
    }
    Ok(())
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
    fn class_names(&self) -> Option<Vec<String>> {
        Some(self.index.classes.clone())
    }
    fn label(&self, i: usize) -> u32 {
        self.labels[i]
    }
    /// The shard files still have the sizes they had at open (before each epoch: a file truncated under the
    /// mapping would fault the process at the first read past its new end).
    fn verify(&self) -> Result<()> {
        for s in &self.index.shards {
            let p = self.dir.join(&s.file);
            let len = std::fs::metadata(&p).with_context(|| format!("{}: the shard file is gone", p.display()))?.len();
            check_shard_len(&p, len, s, self.index.record_bytes).context(
                "a shard file changed under the running job (shard files must not change while a job reads them)",
            )?;
        }
        Ok(())
    }
    fn image(&self, i: usize) -> &[u8] {
        let s = self.index.shards.partition_point(|s| s.first + s.count <= i);
        let shard = &self.index.shards[s];
        let rec = self.index.record_bytes;
        &self.maps[s][(i - shard.first) * rec..][..rec]
    }
}
