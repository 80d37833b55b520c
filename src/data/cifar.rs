//! The CIFAR "binary version": CIFAR-10 records are `label, 1024 R, 1024 G, 1024 B`; CIFAR-100 records are
//! `coarse label, fine label, 3072 pixels` (the fine label is used; the coarse one is range-checked too).

use anyhow::{bail, Context, Result};
use std::path::Path;

/// Reads one CIFAR binary file into (CHW images, labels). `label_bytes` is 1 (CIFAR-10) or 2 (CIFAR-100);
/// the last label byte is the class.
pub fn read_cifar_bin(path: &Path, label_bytes: usize, classes: usize) -> Result<(Vec<u8>, Vec<u32>)> {
    let len = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?.len();
    crate::limits::ensure_fits(&format!("{}", path.display()), len.saturating_mul(2), "the dataset (a smaller file)")?;
    crate::files::note_input(path);
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let rec = label_bytes + 3072;
    if bytes.is_empty() || bytes.len() % rec != 0 {
        bail!(
            "{}: {} bytes is not a whole number of {rec}-byte CIFAR records (truncated or not a CIFAR binary file)",
            path.display(),
            bytes.len()
        );
    }
    let n = bytes.len() / rec;
    let mut images = Vec::with_capacity(n * 3072);
    let mut labels = Vec::with_capacity(n);
    for (i, r) in bytes.chunks_exact(rec).enumerate() {
        let label = r[label_bytes - 1] as usize;
        if label >= classes {
            bail!("{}: record {i} has label {label}, out of range for {classes} classes", path.display());
        }
        if label_bytes == 2 && r[0] >= 20 {
            bail!(
                "{}: record {i} has coarse label {}, out of range for CIFAR-100's 20 superclasses",
                path.display(),
                r[0]
            );
        }
        labels.push(label as u32);
        images.extend_from_slice(&r[label_bytes..]);
    }
    Ok((images, labels))
}
