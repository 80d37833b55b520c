//! TensorBoard event files in the run folder, so that `tensorboard --logdir runs` shows every layer's training
//! and validation curves and the learning rate.
//!
//! The format, written by hand because the crates that write it pull in old protobuf and image versions: a file
//! of TFRecords (`u64` length, its masked CRC-32C, the bytes, their masked CRC-32C; all little-endian), each an
//! `Event` protobuf message: `wall_time` (field 1, double), `step` (2, int64), then either `file_version` (3,
//! string: "brain.Event:2" in the first record) or `summary` (5), a `Summary` of repeated `Value`s, each a `tag`
//! (1, string) and a `simple_value` (2, float).
//!
//! The run's options go to TensorBoard's HParams table as the hparams plugin's summaries
//! (`tensorboard/plugins/hparams`): a `Value` with the tag `_hparams_/session_start_info` (at the run's start)
//! or `_hparams_/session_end_info` (at its end), its `metadata` (9) a `SummaryMetadata` whose `plugin_data` (1)
//! names the plugin `hparams` (1) and holds as `content` (2) an `HParamsPluginData` (version 0;
//! `session_start_info` (3): the options as a map (1) of name to `google.protobuf.Value` (a double (2), a string
//! (3) or a bool (4)), the group name (4) and the start time (5); `session_end_info` (4): the status (1) and the
//! end time (2)), and a `tensor` (8), the empty float tensor the plugin's own writer puts there. The experiment
//! (which options and metrics to show) is left for TensorBoard to infer from the runs, so that every run folder
//! under one `--logdir` joins the table. `tests/workflow.rs` reads a run's file back with the tensorboard Python
//! package's own reader and its hparams parser.

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

/// `google.protobuf.Value` of a run option: a number, a string or a bool (`None`: not shown, e.g. null).
fn proto_value(v: &serde_json::Value) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    match v {
        serde_json::Value::Null => return None,
        serde_json::Value::Bool(b) => {
            out.push(0x20); // field 4, varint
            out.push(*b as u8);
        }
        serde_json::Value::Number(n) => {
            out.push(0x11); // field 2, fixed64
            out.extend_from_slice(&n.as_f64()?.to_le_bytes());
        }
        serde_json::Value::String(s) => field_bytes(0x1a, s.as_bytes(), &mut out),
        other => field_bytes(0x1a, other.to_string().as_bytes(), &mut out),
    }
    Some(out)
}

/// The hparams plugin's status of a finished run (`tensorboard.hparams.Status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunStatus {
    Success = 1,
    Failure = 2,
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

    /// One summary `Value` of the hparams plugin: `tag`, and `data` (an `HParamsPluginData` field, encoded) as its
    /// metadata's content.
    fn hparams_event(&mut self, tag: &str, wall_time: f64, data: &[u8]) -> Result<()> {
        let mut plugin = Vec::new();
        field_bytes(0x0a, b"hparams", &mut plugin);
        field_bytes(0x12, data, &mut plugin); // content: version 0 (the default, not written) and the data
        let mut metadata = Vec::new();
        field_bytes(0x0a, &plugin, &mut metadata);
        let mut value = Vec::new();
        field_bytes(0x0a, tag.as_bytes(), &mut value);
        // The empty float tensor: dtype DT_FLOAT (1), shape [0].
        field_bytes(0x42, &[0x08, 0x01, 0x12, 0x02, 0x12, 0x00], &mut value);
        field_bytes(0x4a, &metadata, &mut value);
        let mut summary = Vec::new();
        field_bytes(0x0a, &value, &mut summary);
        let mut rest = Vec::new();
        field_bytes(0x2a, &summary, &mut rest);
        self.record(&event(wall_time, 0, &rest))?;
        self.file.sync_data().with_context(|| format!("{}: sync failed", self.path.display()))
    }

    /// The run's options (`hparams`: a JSON object; null values are left out) as the HParams table's row for
    /// this run, in group `group`.
    pub fn hparams_start(&mut self, hparams: &serde_json::Value, group: &str, wall_time: f64) -> Result<()> {
        let mut info = Vec::new();
        for (name, v) in hparams.as_object().into_iter().flatten() {
            if let Some(value) = proto_value(v) {
                let mut entry = Vec::new();
                field_bytes(0x0a, name.as_bytes(), &mut entry);
                field_bytes(0x12, &value, &mut entry);
                field_bytes(0x0a, &entry, &mut info);
            }
        }
        field_bytes(0x22, group.as_bytes(), &mut info);
        info.push(0x29); // start_time_secs, field 5, fixed64
        info.extend_from_slice(&wall_time.to_le_bytes());
        let mut data = Vec::new();
        field_bytes(0x1a, &info, &mut data);
        self.hparams_event("_hparams_/session_start_info", wall_time, &data)
    }

    /// The end of the run in the HParams table, with its status.
    pub fn hparams_end(&mut self, status: RunStatus, wall_time: f64) -> Result<()> {
        let mut info = vec![0x08, status as u8]; // status, field 1, varint
        info.push(0x11); // end_time_secs, field 2, fixed64
        info.extend_from_slice(&wall_time.to_le_bytes());
        let mut data = Vec::new();
        field_bytes(0x22, &info, &mut data);
        self.hparams_event("_hparams_/session_end_info", wall_time, &data)
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
pub fn epoch_scalars(m: &super::metrics::EpochMetrics) -> Vec<(String, f64)> {
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
