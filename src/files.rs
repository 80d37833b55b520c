//! The files the engine writes, and the folders it writes them into.
//!
//! - [`write_atomic`] and [`TempFile`]: every file is written under a unique temporary name that is created
//!   exclusively (`O_CREAT | O_EXCL`, so a symlink or a file planted at that name is never followed or reused),
//!   synced, and renamed over the real name (`rename(2)` replaces a symlink there, it does not write through it).
//!   A temporary file that is not renamed into place (an error, a full disk) is removed.
//! - [`FolderLock`]: an `flock(2)` lock on `DIR/.asge.lock`, so two asge processes never write one run or shard
//!   folder at once. The kernel releases it when the holder dies, however it dies (SIGKILL, the OOM killer), so a
//!   crashed run can always be resumed; the holder's pid is written into the file only for the error message.
//! - [`RunFolder`]: `asge train --out`'s guard: it refuses a folder that holds a run unless the run is resumed or
//!   `--overwrite` is given, and then removes only the files a run writes.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// The lock file's name inside a locked folder.
pub const LOCK_FILE: &str = ".asge.lock";

/// A temporary name for `dest` in its own folder, unique to this process and call: `.NAME.asge-PID-N.tmp`.
fn temp_name(dest: &Path) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    dest.with_file_name(format!(".{name}.asge-{}-{n}-{nanos:08x}.tmp", std::process::id()))
}

/// True for a name [`temp_name`] makes (what an interrupted asge process may leave behind).
pub fn is_temp_name(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp") && name.contains(".asge-")
}

/// A file being written under a unique temporary name beside `dest`; [`TempFile::persist`] syncs it and renames
/// it to `dest`. Dropped without `persist` (an error on the way), it is removed.
pub struct TempFile {
    file: Option<std::io::BufWriter<File>>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl TempFile {
    /// Creates the temporary file exclusively (never an existing file, never through a symlink).
    pub fn create(dest: &Path) -> Result<Self> {
        let tmp = temp_name(dest);
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .with_context(|| format!("{}: cannot create a temporary file beside it", dest.display()))?;
        Ok(TempFile { file: Some(std::io::BufWriter::with_capacity(1 << 20, f)), tmp, dest: dest.to_path_buf() })
    }

    pub fn write_all(&mut self, bytes: &[u8]) -> Result<()> {
        let f = self.file.as_mut().expect("a TempFile is open until persisted");
        f.write_all(bytes).with_context(|| format!("{}: write failed", self.dest.display()))
    }

    /// The path the file will have.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Flushes, syncs and renames the file into place, then syncs the folder so that the rename survives a crash.
    pub fn persist(mut self) -> Result<()> {
        let w = self.file.take().expect("a TempFile is persisted once");
        let f = w.into_inner().map_err(|e| anyhow::anyhow!("{}: write failed: {}", self.dest.display(), e.error()))?;
        f.sync_all().with_context(|| format!("{}: sync failed", self.dest.display()))?;
        drop(f);
        std::fs::rename(&self.tmp, &self.dest)
            .with_context(|| format!("{}: cannot rename into place", self.dest.display()))?;
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Best effort: some filesystems refuse to sync a directory.
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes `bytes` to `path` atomically: a fresh exclusive temporary file, synced, renamed over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut t = TempFile::create(path)?;
    t.write_all(bytes)?;
    t.persist()
}

/// An exclusive `flock(2)` on `DIR/.asge.lock`, held until dropped (or until the process dies).
pub struct FolderLock {
    _file: File,
}

impl FolderLock {
    /// Takes the lock of `dir` (which must exist), or fails naming the holder.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&path)
            .with_context(|| format!("{}: cannot open the folder's lock file", path.display()))?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = f.read_to_string(&mut holder);
                let holder = holder.trim();
                let who = if holder.is_empty() { String::new() } else { format!(" (pid {holder})") };
                bail!(
                    "{}: another asge process{who} is using this folder; wait for it to end or choose another",
                    dir.display()
                );
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("{}: cannot lock", path.display()));
            }
        }
        // The pid only serves the message above; the lock itself is the flock.
        f.set_len(0).and_then(|_| f.write_all(format!("{}\n", std::process::id()).as_bytes())).ok();
        Ok(FolderLock { _file: f })
    }
}

/// The files a training run writes into its folder (besides the lock and temporary files).
pub const RUN_FILES: &[&str] = &[
    "config.json",
    "metrics.jsonl",
    "steps.jsonl",
    "last.safetensors",
    "best.safetensors",
    "summary.json",
    "curves.svg",
];

/// True for a file a training run writes: one of [`RUN_FILES`], or a TensorBoard event file of asge's.
pub fn is_run_file(name: &str) -> bool {
    RUN_FILES.contains(&name) || (name.starts_with("events.out.tfevents.") && name.ends_with(".asge"))
}

/// The run files present in `dir`.
fn run_files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| is_run_file(n))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// How a training run treats its `--out` folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStart {
    /// A new run: the folder must not hold one.
    Fresh,
    /// A new run that replaces the run in the folder (`--overwrite`): its files are removed first.
    Overwrite,
    /// Continue the run in the folder (`--resume`).
    Resume,
}

/// A locked run folder.
pub struct RunFolder {
    pub dir: PathBuf,
    start: RunStart,
    _lock: FolderLock,
}

impl RunFolder {
    /// Applies `start`'s rule to what `dir` holds now, without creating or locking anything: lets a command
    /// refuse a folder before it does any work. [`RunFolder::open`] checks again under the lock.
    pub fn check(dir: &Path, start: RunStart) -> Result<()> {
        if start == RunStart::Resume && !dir.is_dir() {
            bail!("--resume {}: no such run folder", dir.display());
        }
        if !dir.exists() {
            return Ok(());
        }
        let present = run_files_in(dir);
        match start {
            RunStart::Resume => Ok(()),
            RunStart::Fresh if present.is_empty() => Ok(()),
            RunStart::Fresh => bail!(
                "--out {}: holds a run ({}); continue it with --resume {}, replace it with --overwrite, or choose another folder",
                dir.display(),
                present.join(", "),
                dir.display()
            ),
            RunStart::Overwrite => {
                let cfg = dir.join("config.json");
                if cfg.symlink_metadata().is_ok() && !is_run_config(&cfg) {
                    bail!(
                        "--out {}: config.json is not an asge run config; --overwrite replaces only asge runs",
                        dir.display()
                    );
                }
                Ok(())
            }
        }
    }

    /// Creates (a new run) and locks `dir`, and checks it as [`RunFolder::check`] does. Nothing is removed yet:
    /// `--overwrite` clears the old run only when the new one is ready to write ([`RunFolder::clear_old_run`]).
    pub fn open(dir: &Path, start: RunStart) -> Result<Self> {
        if start != RunStart::Resume {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("--out {}: cannot create the run folder", dir.display()))?;
        }
        RunFolder::check(dir, start)?;
        let lock = FolderLock::acquire(dir)?;
        RunFolder::check(dir, start)?;
        Ok(RunFolder { dir: dir.to_path_buf(), start, _lock: lock })
    }

    /// With `--overwrite`, removes the old run's files (only the files a run writes; anything else stays).
    pub fn clear_old_run(&self) -> Result<()> {
        if self.start != RunStart::Overwrite {
            return Ok(());
        }
        for f in run_files_in(&self.dir) {
            let p = self.dir.join(&f);
            match std::fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("--overwrite: cannot remove {}", p.display())),
            }
        }
        Ok(())
    }
}

/// True when `path` is a regular file holding an asge run config (`{"train": {...}, "model": {...}}`).
fn is_run_config(path: &Path) -> bool {
    let Ok(meta) = path.symlink_metadata() else { return false };
    if !meta.is_file() || meta.len() > 1 << 20 {
        return false;
    }
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .is_some_and(|v| v.get("train").is_some_and(|t| t.is_object()) && v.get("model").is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("asge-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn atomic_write_never_follows_a_planted_symlink() {
        let d = dir("symlink");
        let victim = d.join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let dest = d.join("config.json");
        std::os::unix::fs::symlink(&victim, &dest).unwrap();
        write_atomic(&dest, b"new").unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert_eq!(std::fs::read(&dest).unwrap(), b"new");
        assert!(!dest.symlink_metadata().unwrap().file_type().is_symlink());
        // Nothing else is left in the folder.
        let mut names: Vec<_> = std::fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, vec!["config.json", "victim"]);
    }

    #[test]
    fn a_temp_file_that_is_not_persisted_is_removed() {
        let d = dir("drop");
        let mut t = TempFile::create(&d.join("x.bin")).unwrap();
        t.write_all(b"partial").unwrap();
        drop(t);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
    }

    #[test]
    fn a_folder_lock_excludes_a_second_holder_until_dropped() {
        let d = dir("lock");
        let a = FolderLock::acquire(&d).unwrap();
        // flock locks belong to the open file description: a second open in this process conflicts as another
        // process would.
        let e = FolderLock::acquire(&d).err().unwrap().to_string();
        assert!(e.contains(&format!("pid {}", std::process::id())), "{e}");
        drop(a);
        FolderLock::acquire(&d).unwrap();
    }

    #[test]
    fn a_run_folder_is_refused_unless_resumed_or_overwritten() {
        let d = dir("run");
        drop(RunFolder::open(&d, RunStart::Fresh).unwrap());
        std::fs::write(d.join("last.safetensors"), b"x").unwrap();
        std::fs::write(d.join("notes.txt"), b"mine").unwrap();
        let e = RunFolder::open(&d, RunStart::Fresh).err().unwrap().to_string();
        assert!(e.contains("holds a run") && e.contains("--overwrite"), "{e}");
        drop(RunFolder::open(&d, RunStart::Resume).unwrap());
        let f = RunFolder::open(&d, RunStart::Overwrite).unwrap();
        assert!(d.join("last.safetensors").exists(), "removed before the new run is ready");
        f.clear_old_run().unwrap();
        drop(f);
        assert!(!d.join("last.safetensors").exists());
        assert_eq!(std::fs::read(d.join("notes.txt")).unwrap(), b"mine");
        // A config.json that asge did not write stops --overwrite.
        std::fs::write(d.join("config.json"), b"{\"mine\": 1}").unwrap();
        let e = RunFolder::check(&d, RunStart::Overwrite).err().unwrap().to_string();
        assert!(e.contains("not an asge run config"), "{e}");
        assert!(d.join("config.json").exists());
    }
}
