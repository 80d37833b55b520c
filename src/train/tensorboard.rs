//! TensorBoard event files in the run folder, so that `tensorboard --logdir runs` shows every layer's training
//! and validation curves and the learning rate.
//!
//! The format, written by hand because the crates that write it pull in old protobuf and image versions: a file
//! of TFRecords (`u64` length, its masked CRC-32C, the bytes, their masked CRC-32C; all little-endian), each an
//! `Event` protobuf message: `wall_time` (field 1, double), `step` (2, int64), then either `file_version` (3,
//! string: "brain.Event:2" in the first record) or `summary` (5), a `Summary` of repeated `Value`s, each a `tag`
//! (1, string) and a `simple_value` (2, float). `tests/workflow.rs` reads a run's file back with the tensorboard
//! Python package's own reader.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The prefix of every event file (TensorBoard's naming: `events.out.tfevents.<time>.<host>`).
pub const PREFIX: &str = "events.out.tfevents.";

/// TFRecord's CRC: CRC-32C, rotated right by 15 and offset.
fn masked_crc(bytes: &[u8]) -> u32 {
    let c = crc32c::crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A length-delimited field: its tag byte, the length, the bytes.
fn field_bytes(tag: u8, bytes: &[u8], out: &mut Vec<u8>) {
    out.push(tag);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// An `Event` with `wall_time`, `step` and one more field already encoded.
fn event(wall_time: f64, step: i64, rest: &[u8]) -> Vec<u8> {
    let mut e = vec![0x09]; // field 1, fixed64
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10); // field 2, varint
    varint(step as u64, &mut e);
    e.extend_from_slice(rest);
    e
}

/// An event file being appended to.
pub struct EventWriter {
    file: std::fs::File,
    path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `dir` (never reusing one: a resumed run adds a file, which TensorBoard reads
    /// together with the earlier ones).
    pub fn create(dir: &Path) -> Result<Self> {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "host".into());
        // TensorBoard's name (seconds, host, pid), plus a counter when the same process starts twice in one second
        // (a run resumed in-process): never opening an existing file.
        let base = format!("{PREFIX}{}.{}.{}", now.as_secs(), host.trim(), std::process::id());
        let mut n = 0;
        let (file, path) = loop {
            let name = if n == 0 { format!("{base}.asge") } else { format!("{base}.{n}.asge") };
            let path = dir.join(name);
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => break (f, path),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && n < 1000 => n += 1,
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("{}: cannot create the TensorBoard event file", path.display()))
                }
            }
        };
        let mut w = EventWriter { file, path };
        let mut version = Vec::new();
        field_bytes(0x1a, b"brain.Event:2", &mut version);
        w.record(&event(now.as_secs_f64(), 0, &version))?;
        Ok(w)
    }

    fn record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut r = Vec::with_capacity(data.len() + 16);
        r.extend_from_slice(&len);
        r.extend_from_slice(&masked_crc(&len).to_le_bytes());
        r.extend_from_slice(data);
        r.extend_from_slice(&masked_crc(data).to_le_bytes());
        self.file.write_all(&r).with_context(|| format!("{}: write failed", self.path.display()))
    }

    /// One event of scalars at `step` (each a tag and its value), flushed to the file.
    pub fn scalars(&mut self, step: i64, wall_time: f64, values: &[(String, f64)]) -> Result<()> {
        let mut summary = Vec::new();
        for (tag, v) in values {
            if !v.is_finite() {
                continue;
            }
            let mut value = Vec::new();
            field_bytes(0x0a, tag.as_bytes(), &mut value);
            value.push(0x15); // field 2, fixed32
            value.extend_from_slice(&(*v as f32).to_le_bytes());
            field_bytes(0x0a, &value, &mut summary);
        }
        let mut rest = Vec::new();
        field_bytes(0x2a, &summary, &mut rest);
        self.record(&event(wall_time, step, &rest))?;
        self.file.sync_data().with_context(|| format!("{}: sync failed", self.path.display()))
    }
}

/// The scalars of one epoch's metrics: every layer's training and validation loss and accuracy (layers counted
/// from 1), the fusion heads', the learning rate and the throughput.
pub fn epoch_scalars(m: &super::run::EpochMetrics) -> Vec<(String, f64)> {
    let mut v = vec![("lr".to_string(), m.lr), ("images_per_s".to_string(), m.images_per_s)];
    let per_layer = |v: &mut Vec<(String, f64)>, what: &str, xs: &[f64]| {
        for (l, x) in xs.iter().enumerate() {
            v.push((format!("{what}/layer{}", l + 1), *x));
        }
    };
    per_layer(&mut v, "train_loss", &m.train_layer_loss);
    per_layer(&mut v, "train_accuracy", &m.train_layer_acc);
    if let Some(l) = &m.val_layer_loss {
        per_layer(&mut v, "val_loss", l);
    }
    if let Some(a) = &m.val_layer_acc {
        per_layer(&mut v, "val_accuracy", a);
    }
    for (tag, x) in [
        ("train_loss/fusion", m.train_fusion_loss),
        ("train_accuracy/fusion", m.train_fusion_acc),
        ("val_loss/fusion", m.val_fusion_loss),
        ("val_accuracy/fusion", m.val_fusion_acc),
    ] {
        if let Some(x) = x {
            v.push((tag.to_string(), x));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_writers_in_one_second_get_two_files() {
        // A run resumed in the same process within a second of its start (the tests do it) must not collide.
        let dir = std::env::temp_dir().join(format!("asge-tb-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let a = EventWriter::create(&dir).unwrap();
        let b = EventWriter::create(&dir).unwrap();
        assert_ne!(a.path, b.path);
        assert!(crate::files::is_run_file(b.path.file_name().unwrap().to_str().unwrap()));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_crc_and_the_varints_are_the_formats() {
        // CRC-32C of "123456789" is 0xe3069283 (the standard check value); TFRecord masks it.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc(b"123456789"), 0xe306_9283u32.rotate_right(15).wrapping_add(0xa282_ead8));
        let mut v = Vec::new();
        varint(300, &mut v);
        assert_eq!(v, [0xac, 0x02]);
    }
}
