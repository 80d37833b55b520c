//! IDX files (MNIST, Fashion-MNIST and anything laid out like them), raw or gzipped.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

/// Reads a whole file, gunzipping it when it starts with the gzip magic.
pub fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{}: corrupt or truncated gzip data", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// An IDX tensor of unsigned bytes: its dimensions and data.
pub struct IdxU8 {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Parses an IDX file of u8 with `ndim` dimensions (3 for images, 1 for labels).
pub fn read_idx_u8(path: &Path, ndim: usize) -> Result<IdxU8> {
    let bytes = read_maybe_gz(path)?;
    let p = path.display();
    if bytes.len() < 4 {
        bail!("{p}: truncated IDX file ({} bytes, no header)", bytes.len());
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        bail!("{p}: not an IDX file (magic {:02x}{:02x}{:02x}{:02x})", bytes[0], bytes[1], bytes[2], bytes[3]);
    }
    if bytes[2] != 0x08 {
        bail!("{p}: IDX element type 0x{:02x}, expected 0x08 (unsigned byte)", bytes[2]);
    }
    if bytes[3] as usize != ndim {
        bail!("{p}: IDX file has {} dimensions, expected {ndim}", bytes[3]);
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        bail!("{p}: truncated IDX header");
    }
    let dims: Vec<usize> =
        (0..ndim).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let expected = dims.iter().product::<usize>();
    let have = bytes.len() - header;
    if have != expected {
        bail!(
            "{p}: {} IDX payload: header {:?} needs {expected} bytes, the file has {have}",
            if have < expected { "truncated" } else { "oversized" },
            dims
        );
    }
    Ok(IdxU8 { dims, data: bytes[header..].to_vec() })
}
