//! IDX files (MNIST, Fashion-MNIST and anything laid out like them), raw or gzipped.
//!
//! The header is read first, its dimensions multiplied with checked arithmetic, and the payload is read to
//! exactly the size the header declares: a raw file's length is compared before anything is read, and a gzip
//! stream is inflated through `Read::take` up to one byte past the declared size, so a stream that is longer (a
//! decompression bomb) or shorter is an error after reading at most what the header announced. The announced
//! size itself is checked against the memory this process may take (`MemAvailable`, the cgroup, `RLIMIT_AS`)
//! before it is allocated, and the message names what the header declares.

use crate::limits;
use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;

/// An IDX tensor of unsigned bytes: its dimensions and data.
pub struct IdxU8 {
    pub dims: Vec<usize>,
    pub data: Vec<u8>,
}

/// Parses an IDX file of u8 with `ndim` dimensions (3 for images, 1 for labels).
pub fn read_idx_u8(path: &Path, ndim: usize) -> Result<IdxU8> {
    let p = path.display();
    crate::files::note_input(path);
    let file = std::fs::File::open(path).with_context(|| format!("{p}: cannot read"))?;
    let file_len = file.metadata().with_context(|| format!("{p}: cannot read"))?.len();
    let mut raw = std::io::BufReader::new(file);
    let mut magic2 = [0u8; 2];
    let got = read_up_to(&mut raw, &mut magic2).with_context(|| format!("{p}: cannot read"))?;
    let gz = got == 2 && magic2 == [0x1f, 0x8b];
    // Re-chain the two bytes already read in front of the rest.
    let head = std::io::Cursor::new(magic2[..got].to_vec());
    let mut reader: Box<dyn Read> =
        if gz { Box::new(flate2::read::MultiGzDecoder::new(head.chain(raw))) } else { Box::new(head.chain(raw)) };
    let what = if gz { "gzip data" } else { "file" };
    let io_err = |e: std::io::Error| anyhow::anyhow!("{p}: corrupt or truncated {what} ({e})");

    let mut magic = [0u8; 4];
    let n = read_up_to(&mut reader, &mut magic).map_err(io_err)?;
    if n < 4 {
        bail!("{p}: truncated IDX file ({n} bytes, no header)");
    }
    if magic[0] != 0 || magic[1] != 0 {
        bail!("{p}: not an IDX file (magic {:02x}{:02x}{:02x}{:02x})", magic[0], magic[1], magic[2], magic[3]);
    }
    if magic[2] != 0x08 {
        bail!("{p}: IDX element type 0x{:02x}, expected 0x08 (unsigned byte)", magic[2]);
    }
    if magic[3] as usize != ndim {
        bail!("{p}: IDX file has {} dimensions, expected {ndim}", magic[3]);
    }
    let mut dim_bytes = vec![0u8; 4 * ndim];
    if read_up_to(&mut reader, &mut dim_bytes).map_err(io_err)? < dim_bytes.len() {
        bail!("{p}: truncated IDX header");
    }
    let dims: Vec<usize> =
        dim_bytes.chunks_exact(4).map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
    let expected = limits::product(format_args!("{p}: IDX header dimensions {dims:?}"), &dims)?;
    let header = (4 + 4 * ndim) as u64;
    if !gz {
        let have = file_len.saturating_sub(header);
        if have != expected as u64 {
            bail!(
                "{p}: {} IDX payload: header {dims:?} needs {expected} bytes, the file has {have}",
                if have < expected as u64 { "truncated" } else { "oversized" }
            );
        }
    }
    // Checked against the memory this process may still take (RLIMIT_AS included) before anything is inflated,
    // then reserved whole: the inflated bytes never grow the buffer past what the header declared.
    limits::ensure_fits(
        &format!("{p}: the IDX header declares {dims:?} ({expected} bytes), which"),
        expected as u64,
        "the dataset (a smaller file)",
    )?;
    let mut data = Vec::new();
    data.try_reserve_exact(expected).map_err(|_| {
        anyhow::anyhow!("{p}: the IDX header declares {dims:?} ({expected} bytes): cannot allocate that much memory")
    })?;
    reader.by_ref().take(expected as u64 + 1).read_to_end(&mut data).map_err(io_err)?;
    if data.len() != expected {
        bail!(
            "{p}: {} IDX payload: header {dims:?} needs {expected} bytes, the {what} holds {}",
            if data.len() < expected { "truncated" } else { "oversized" },
            if data.len() > expected { "more".to_string() } else { data.len().to_string() }
        );
    }
    Ok(IdxU8 { dims, data })
}

/// Reads until `buf` is full or the stream ends; the bytes read.
fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}
