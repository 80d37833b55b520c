//! The files the engine writes, and the folders it writes them into.
//!
//! - [`write_atomic`] and [`TempFile`]: every file is written under a unique temporary name that is created
//!   exclusively (`O_CREAT | O_EXCL`, so a symlink or a file planted at that name is never followed or reused),
//!   synced, and renamed over the real name (`rename(2)` replaces a symlink there, it does not write through it).
//!   A temporary file that is not renamed into place (an error, a full disk) is removed.
//! - [`Output`]: the one guard for every file a user names (`--trace`, `--json`, `--dump-logits`,
//!   `export --out`): it replaces only a regular file that asge wrote as that kind of output (recognised by its
//!   content), never a file this command reads, a symlink, a folder, a socket or a block device; a character
//!   device or a FIFO (`/dev/null`, a pipe) is written into, not replaced. [`distinct_outputs`] refuses one path
//!   named for two outputs.
//! - Inputs: every file a command reads as its data, checkpoint or config is noted ([`note_input`]), by device and
//!   inode (kept open, so the number cannot be reused); [`write_atomic`] refuses to replace one, whatever name it
//!   is reached by (a hard link included).
//! - [`FolderLock`]: `flock(2)` locks on the folder itself and on `DIR/.asge.lock`, so two asge processes never
//!   write one run or shard folder at once: deleting the lock file does not unlock the folder, and the lock file,
//!   which also carries the lock to other hosts on a network file system, is only used when it is the one file
//!   at its name (never a link). The kernel releases both when the holder dies, however it dies (SIGKILL, the OOM
//!   killer), so a crashed run can always be resumed.
//! - [`RunFolder`]: `asge train --out`'s guard: it refuses a folder that holds a run unless the run is resumed or
//!   `--overwrite` is given, and then removes only the files a run writes.

use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

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
        // From here on Drop no longer sees the file: every early return removes the temporary file itself.
        let fail = |tmp: &Path, e: anyhow::Error| {
            let _ = std::fs::remove_file(tmp);
            Err(e)
        };
        let f = match w.into_inner() {
            Ok(f) => f,
            Err(e) => return fail(&self.tmp, anyhow::anyhow!("{}: write failed: {}", self.dest.display(), e.error())),
        };
        if let Err(e) = f.sync_all() {
            return fail(&self.tmp, anyhow::Error::new(e).context(format!("{}: sync failed", self.dest.display())));
        }
        drop(f);
        if let Err(e) = refuse_input(&self.dest) {
            return fail(&self.tmp, e);
        }
        if let Err(e) = std::fs::rename(&self.tmp, &self.dest) {
            return fail(
                &self.tmp,
                anyhow::Error::new(e).context(format!("{}: cannot rename into place", self.dest.display())),
            );
        }
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

/// The files this process reads as its inputs (data, checkpoints, configs): device, inode and the path they were
/// read by, for messages, and the file held open so that its inode number is not given to another file while
/// this process runs (a removed input's number could otherwise come back as a new checkpoint's).
static INPUTS: Mutex<Vec<(u64, u64, PathBuf, File)>> = Mutex::new(Vec::new());

/// Notes `path` (followed to the file it names) as an input of this command: no write replaces it afterwards.
/// A path that cannot be opened is not noted (reading it fails on its own).
pub fn note_input(path: &Path) {
    let Ok(f) = OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC).open(path) else {
        return;
    };
    if let Ok(m) = f.metadata() {
        let mut v = INPUTS.lock().unwrap_or_else(|e| e.into_inner());
        if !v.iter().any(|(d, i, _, _)| (*d, *i) == (m.dev(), m.ino())) {
            v.push((m.dev(), m.ino(), path.to_path_buf(), f));
        }
    }
}

/// The input that `path` names now (by device and inode, so a hard link or a symlink to it counts), if any.
fn input_at(path: &Path) -> Option<PathBuf> {
    let m = std::fs::metadata(path).ok()?;
    let v = INPUTS.lock().unwrap_or_else(|e| e.into_inner());
    v.iter().find(|(d, i, _, _)| (*d, *i) == (m.dev(), m.ino())).map(|(_, _, p, _)| p.clone())
}

/// An error when `path` names a file this command reads; `what` names the path in the message (`--json X`).
fn refuse_input_as(path: &Path, what: &str) -> Result<()> {
    if let Some(read) = input_at(path) {
        let same = if read == path { String::new() } else { format!(" (as {})", read.display()) };
        bail!("{what}: this command reads that file{same}; it is never replaced: choose another path");
    }
    Ok(())
}

fn refuse_input(path: &Path) -> Result<()> {
    refuse_input_as(path, &path.display().to_string())
}

/// True for a character device or a FIFO: an output written into, never replaced.
fn is_stream(m: &std::fs::Metadata) -> bool {
    m.file_type().is_char_device() || m.file_type().is_fifo()
}

/// How [`Output::write`] will write a path, from what it names now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputTarget {
    /// Nothing there: a new file.
    New,
    /// An earlier output of the same kind: replaced atomically.
    Replace,
    /// A character device or a FIFO (`/dev/null`, a pipe): written into, never replaced.
    Stream,
}

/// A file a user names for a command to write: the option that names it, what kind of file it is (for
/// messages: "an asge eval result"), and how to recognise an earlier one by its content.
pub struct Output<'a> {
    pub path: &'a Path,
    pub flag: &'a str,
    pub kind: &'a str,
    pub ours: &'a dyn Fn(&Path) -> bool,
}

impl Output<'_> {
    /// What the path names now, and whether this output may be written there: the one rule for every
    /// user-named output (see the module notes).
    pub fn check(&self) -> Result<OutputTarget> {
        let (path, flag) = (self.path, self.flag);
        let lmeta = match path.symlink_metadata() {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(OutputTarget::New),
            Err(e) => return Err(e).with_context(|| format!("{flag} {}: cannot inspect", path.display())),
        };
        // A device or a pipe is written into, also through a symlink (/dev/stdout -> /proc/self/fd/1).
        if std::fs::metadata(path).is_ok_and(|m| is_stream(&m)) {
            return Ok(OutputTarget::Stream);
        }
        let t = lmeta.file_type();
        let what = if t.is_symlink() {
            Some("a symbolic link (asge replaces files, never links)")
        } else if t.is_dir() {
            Some("a folder")
        } else if t.is_socket() {
            Some("a socket")
        } else if t.is_block_device() {
            Some("a block device")
        } else {
            None
        };
        if let Some(what) = what {
            bail!("{flag} {}: is {what}; choose a file path", path.display());
        }
        refuse_input_as(path, &format!("{flag} {}", path.display()))?;
        if !(self.ours)(path) {
            bail!(
                "{flag} {}: the file exists and is not {} (only that is replaced); choose another path",
                path.display(),
                self.kind
            );
        }
        Ok(OutputTarget::Replace)
    }

    /// Writes `bytes` as [`Output::check`] allows: a new or replaced file atomically, a device or FIFO in place.
    pub fn write(&self, bytes: &[u8]) -> Result<()> {
        let (path, flag) = (self.path, self.flag);
        match self.check()? {
            OutputTarget::Stream => {
                let mut f = OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(path)
                    .with_context(|| format!("{flag} {}: cannot open for writing", path.display()))?;
                f.write_all(bytes)
                    .and_then(|_| f.flush())
                    .with_context(|| format!("{flag} {}: write failed", path.display()))
            }
            OutputTarget::New | OutputTarget::Replace => {
                write_atomic(path, bytes).with_context(|| format!("{flag} {}", path.display()))
            }
        }
    }
}

/// `path` made absolute with its longest existing prefix resolved (symlinks, `..`) and the rest appended as
/// True when `path` is a regular JSON file (under 16 MiB) whose `format` key is `format`: an earlier output of
/// the kind a command may replace.
pub fn json_format_is(path: &std::path::Path, format: &str) -> bool {
    let Ok(meta) = path.symlink_metadata() else { return false };
    meta.is_file()
        && meta.len() < 1 << 24
        && std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .is_some_and(|v| v.get("format").and_then(|f| f.as_str()) == Some(format))
}

/// written (the file and its folders need not exist): to compare paths a command will write.
pub fn resolved(path: &Path) -> PathBuf {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut rest = Vec::new();
    let mut cur = abs.as_path();
    loop {
        if let Ok(c) = std::fs::canonicalize(cur) {
            return rest.iter().rev().fold(c, |p, n| p.join(n));
        }
        match (cur.parent(), cur.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                cur = parent;
            }
            _ => return abs,
        }
    }
}

/// Refuses two outputs of one command that name the same file (by path, or by device and inode when it exists):
/// `--json X --dump-logits X` would leave only one of them. Devices and FIFOs may be shared.
pub fn distinct_outputs(outputs: &[(&str, &Path)]) -> Result<()> {
    let inode = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    for (i, (fa, a)) in outputs.iter().enumerate() {
        if std::fs::metadata(a).is_ok_and(|m| is_stream(&m)) {
            continue;
        }
        for (fb, b) in &outputs[..i] {
            if resolved(a) == resolved(b) || inode(a).is_some() && inode(a) == inode(b) {
                bail!(
                    "{fa} {} and {fb} {}: the same file for two outputs; give each its own path",
                    a.display(),
                    b.display()
                );
            }
        }
    }
    Ok(())
}

/// Refuses an output path (`flag`'s) that names a file of the run folder `dir`: a file a run writes, the lock,
/// a temporary file. Such a path would replace the run's own state (its checkpoints, its config).
pub fn outside_run_files(flag: &str, path: &Path, dir: &Path) -> Result<()> {
    let p = resolved(path);
    let d = resolved(dir);
    let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if p.parent() == Some(d.as_path()) && (is_run_file(&name) || name == LOCK_FILE || is_temp_name(&name)) {
        bail!("{flag} {}: a file of the run folder itself; choose a path outside the run's own files", path.display());
    }
    Ok(())
}

/// Exclusive `flock(2)` locks on a folder itself and on its `.asge.lock`, held until dropped (or until the process
/// dies).
///
/// The folder's own lock means that nothing planted or removed inside it can lend a second process the lock:
/// deleting `.asge.lock` leaves the folder locked. The lock file's lock is what other hosts see on a network
/// file system (where a folder's flock may stay local), and what older asge versions take; it is used only when
/// it is the single name of a regular file (a link planted there, hard or symbolic, is removed first, never
/// written through), and it then holds the holder's pid for the message.
pub struct FolderLock {
    _dir: File,
    _file: File,
}

impl FolderLock {
    /// Takes the locks of `dir` (which must exist), or fails naming the holder.
    pub fn acquire(dir: &Path) -> Result<Self> {
        let d = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(dir)
            .with_context(|| format!("{}: cannot open the folder to lock it", dir.display()))?;
        let busy = || {
            let holder = read_small(&dir.join(LOCK_FILE)).unwrap_or_default();
            let holder = holder.trim();
            let who = if !holder.is_empty() && holder.bytes().all(|b| b.is_ascii_digit()) {
                format!(" (pid {holder})")
            } else {
                String::new()
            };
            anyhow::anyhow!(
                "{}: another asge process{who} is using this folder; wait for it to end or choose another",
                dir.display()
            )
        };
        match d.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(busy()),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| {
                    format!("{}: cannot lock the folder (does its file system support flock?)", dir.display())
                });
            }
        }
        let path = dir.join(LOCK_FILE);
        for _ in 0..8 {
            // Anything but a regular file with one name is not ours to write: remove the name (never its target).
            if let Ok(m) = path.symlink_metadata() {
                if !m.is_file() || m.nlink() != 1 {
                    std::fs::remove_file(&path)
                        .with_context(|| format!("{}: cannot remove a planted lock file", path.display()))?;
                }
            }
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(&path)
                .with_context(|| format!("{}: cannot open the folder's lock file", path.display()))?;
            match f.try_lock() {
                Ok(()) => {}
                Err(std::fs::TryLockError::WouldBlock) => return Err(busy()),
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(e).with_context(|| format!("{}: cannot lock", path.display()));
                }
            }
            // Locked: it must still be the one regular file at that name, with no other name.
            let (held, now) = (f.metadata()?, path.symlink_metadata());
            let same = now.is_ok_and(|n| n.dev() == held.dev() && n.ino() == held.ino());
            if !(same && held.is_file() && held.nlink() == 1) {
                continue;
            }
            // The pid only serves the message above.
            f.set_len(0).and_then(|_| f.write_all(format!("{}\n", std::process::id()).as_bytes())).ok();
            return Ok(FolderLock { _dir: d, _file: f });
        }
        bail!("{}: the lock file keeps changing under this process; is another program writing it?", path.display())
    }
}

/// The first bytes of a regular file (never through a symlink, never more than 64 bytes).
fn read_small(path: &Path) -> Option<String> {
    let f = OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path).ok()?;
    if !f.metadata().ok()?.is_file() {
        return None;
    }
    let mut s = String::new();
    f.take(64).read_to_string(&mut s).ok()?;
    Some(s)
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
