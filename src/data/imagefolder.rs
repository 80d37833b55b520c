//! ImageFolder input for `asge shard`: one sub-folder per class (sorted by name, as torchvision's ImageFolder
//! numbers them), JPEG and PNG files inside, decoded to RGB and brought to `S x S`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// How a decoded image becomes `S x S`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ResizeMode {
    /// Resize the short side to S (keeping the aspect ratio), then crop the centre S x S.
    ShortSide,
    /// Resize both sides to S (the aspect ratio changes).
    Squash,
}

/// An ImageFolder's image files with their class index, sorted by class then path.
pub type LabelledFiles = Vec<(PathBuf, u32)>;

/// What [`scan`] finds.
pub struct Scan {
    /// Every image file with its class index, in torchvision's order: classes sorted by name, then the files of
    /// each class sorted by their path.
    pub files: LabelledFiles,
    /// The class folder names, sorted.
    pub classes: Vec<String>,
    /// Files under the class folders that are not .jpg/.jpeg/.png (left out, counted).
    pub ignored: usize,
}

/// The files of an ImageFolder and the class names. As torchvision's `ImageFolder`, every file under a class
/// folder counts, in sub-folders too (symlinked folders are followed once). A class folder whose name is not
/// UTF-8 is an error (two such names could otherwise collapse into one class).
pub fn scan(root: &Path) -> Result<Scan> {
    let entries =
        std::fs::read_dir(root).with_context(|| format!("--input {}: cannot read the folder", root.display()))?;
    let mut classes = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("--input {}: cannot read the folder", root.display()))?;
        if !e.path().is_dir() {
            continue;
        }
        match e.file_name().into_string() {
            Ok(name) => classes.push(name),
            Err(raw) => bail!(
                "--input {}: class folder {:?} has a name that is not UTF-8; rename it (class names are stored as text)",
                root.display(),
                raw
            ),
        }
    }
    classes.sort();
    if classes.is_empty() {
        bail!("--input {}: no class folders (an ImageFolder has one sub-folder of images per class)", root.display());
    }
    let mut files = Vec::new();
    let mut ignored = 0;
    for (ci, class) in classes.iter().enumerate() {
        let dir = root.join(class);
        let mut all = Vec::new();
        let mut seen = std::collections::HashSet::new();
        walk(&dir, &mut all, &mut seen)?;
        let (mut imgs, other): (Vec<PathBuf>, Vec<PathBuf>) = all.into_iter().partition(|p| is_image_name(p));
        ignored += other.len();
        if imgs.is_empty() {
            bail!("{}: class folder '{class}' has no .jpg/.jpeg/.png files", dir.display());
        }
        imgs.sort();
        files.extend(imgs.into_iter().map(|p| (p, ci as u32)));
    }
    Ok(Scan { files, classes, ignored })
}

/// Every regular file under `dir`, recursively; `seen` holds the folders visited (by device and inode), so a
/// symlink loop is walked once.
fn walk(dir: &Path, out: &mut Vec<PathBuf>, seen: &mut std::collections::HashSet<(u64, u64)>) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(dir).with_context(|| format!("{}: cannot read", dir.display()))?;
    if !seen.insert((meta.dev(), meta.ino())) {
        return Ok(());
    }
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))? {
        let path = e.with_context(|| format!("{}: cannot read", dir.display()))?.path();
        // An entry that cannot be looked at (a path past the length limit, a link to nothing) is an error naming
        // it, never a file left out without a word.
        let m = match std::fs::metadata(&path) {
            Ok(m) => m,
            // A link to nothing: listed as a file, so that reading it fails with its reason (asge shard lists it as
            // skipped; eval and predict name it).
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && path.symlink_metadata().is_ok() => {
                out.push(path);
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
        };
        if m.is_dir() {
            walk(&path, out, seen)?;
        } else if m.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

/// Every .png/.jpg/.jpeg file under `dir`, recursively (symlinked folders followed once).
pub fn walk_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let mut all = Vec::new();
    walk(dir, &mut all, &mut std::collections::HashSet::new())?;
    out.extend(all.into_iter().filter(|p| is_image_name(p)));
    Ok(())
}

fn is_image_name(p: &Path) -> bool {
    let ext = p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
    matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png"))
}

/// Decodes a JPEG strictly: zune-jpeg in strict mode refuses truncated or corrupt entropy-coded data (the lenient
/// default fills what is missing with grey, which would store a damaged photo as a valid image).
pub(crate) fn decode_jpeg_strict(bytes: &[u8]) -> Result<image::RgbImage> {
    use zune_core::bytestream::ZCursor;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::DecoderOptions;
    let opts = DecoderOptions::default().set_strict_mode(true).jpeg_set_out_colorspace(ColorSpace::RGB);
    let mut d = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(bytes), opts);
    let pixels = d.decode().map_err(|e| anyhow::anyhow!("corrupt or truncated JPEG: {e:?}"))?;
    let info = d.info().ok_or_else(|| anyhow::anyhow!("corrupt JPEG: no header"))?;
    let (w, h) = (info.width as u32, info.height as u32);
    let colour = d.output_colorspace().unwrap_or(ColorSpace::RGB);
    if colour != ColorSpace::RGB || pixels.len() != (w as usize) * (h as usize) * 3 {
        bail!("JPEG decoded to {colour:?} with {} bytes for {w}x{h}", pixels.len());
    }
    image::RgbImage::from_raw(w, h, pixels).ok_or_else(|| anyhow::anyhow!("JPEG of {w}x{h}: wrong pixel count"))
}

/// The `(width, height)` a `w x h` image is resized to so that its short side is `s`, the long side rounded to
/// the nearest pixel (never below `s`): the resize before a centre crop.
pub fn short_side_size(w: usize, h: usize, s: usize) -> (usize, usize) {
    let long = |a: usize, b: usize| ((a as u64 * s as u64 + b as u64 / 2) / b as u64).max(s as u64) as usize;
    if w <= h {
        (s, long(h, w))
    } else {
        (long(w, h), s)
    }
}

/// The most pixels an image may have to be decoded: Pillow's `MAX_IMAGE_PIXELS` (89,478,485) unless
/// `--max-image-pixels` set another.
static MAX_PIXELS: AtomicU64 = AtomicU64::new(DEFAULT_MAX_PIXELS);

/// Pillow's default decode bound.
pub const DEFAULT_MAX_PIXELS: u64 = 89_478_485;

/// Sets the decode bound (`--max-image-pixels`).
pub fn set_max_pixels(n: u64) {
    MAX_PIXELS.store(n, Ordering::Relaxed);
}

/// What one worker may take to decode and resize one image: its share of the memory this process may take
/// (computed once), at least 64 MiB.
fn work_budget() -> u64 {
    static BUDGET: OnceLock<u64> = OnceLock::new();
    *BUDGET.get_or_init(|| {
        let avail = crate::limits::available_bytes().ok().flatten().unwrap_or(u64::MAX);
        (avail / rayon::current_num_threads().max(1) as u64).max(64 << 20)
    })
}

/// Checks an image before it is decoded, from the `w x h` its header declares: at most the decode bound in
/// pixels, and a decode plus a resize to `out_w x out_h` (its buffers: the decoded RGB, the resize's
/// intermediate rows of 4 f32 channels and its output) within one worker's share of memory. A file of a few
/// kilobytes can declare 10,000,000 x 1 pixels, whose resize to a 32-pixel short side alone would be 320 million
/// pixels.
pub fn check_image_size(w: u64, h: u64, out_w: u64, out_h: u64) -> Result<()> {
    let max = MAX_PIXELS.load(Ordering::Relaxed);
    let pixels = w.saturating_mul(h);
    if pixels > max {
        bail!(
            "{w}x{h} is {pixels} pixels, over the decode bound of {max} (a decompression bomb? \
             --max-image-pixels raises the bound)"
        );
    }
    let work = pixels
        .saturating_mul(3)
        .saturating_add(w.saturating_mul(out_h).saturating_mul(16))
        .saturating_add(out_w.saturating_mul(out_h).saturating_mul(3));
    let budget = work_budget();
    if work > budget {
        bail!(
            "{w}x{h} resized to {out_w}x{out_h} needs about {} of memory, over one worker's share of {} \
             (an extreme aspect ratio or a decompression bomb?)",
            crate::limits::human_bytes(work),
            crate::limits::human_bytes(budget)
        );
    }
    Ok(())
}

/// Checks a PNG or JPEG file's bytes before they are decoded and brought to `size` a side as `mode` says, from the
/// `(width, height)` its header declares ([`check_image_size`]).
pub fn check_declared(bytes: &[u8], size: usize, mode: ResizeMode) -> Result<()> {
    let (w, h) = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .into_dimensions()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let (ow, oh) = match mode {
        ResizeMode::ShortSide if w > 0 && h > 0 => short_side_size(w as usize, h as usize, size),
        _ => (size, size),
    };
    check_image_size(w as u64, h as u64, ow as u64, oh as u64)
}

/// Decodes a JPEG or PNG file to RGB and brings it to `size x size`, returned CHW (`3 * size * size` bytes).
pub fn load_rgb(path: &Path, size: usize, mode: ResizeMode) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    check_declared(&bytes, size, mode)?;
    let img = if bytes.starts_with(&[0xff, 0xd8]) {
        decode_jpeg_strict(&bytes)?
    } else {
        image::load_from_memory(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?.to_rgb8()
    };
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        bail!("empty image");
    }
    let s = size as u32;
    let filter = image::imageops::FilterType::Triangle;
    let out = match mode {
        ResizeMode::Squash => image::imageops::resize(&img, s, s, filter),
        ResizeMode::ShortSide => {
            let (nw, nh) = short_side_size(w as usize, h as usize, size);
            let (nw, nh) = (nw as u32, nh as u32);
            let r = image::imageops::resize(&img, nw, nh, filter);
            image::imageops::crop_imm(&r, (nw - s) / 2, (nh - s) / 2, s, s).to_image()
        }
    };
    let hwc = out.into_raw();
    let plane = size * size;
    let mut chw = vec![0u8; 3 * plane];
    for (p, px) in hwc.chunks_exact(3).enumerate() {
        for c in 0..3 {
            chw[c * plane + p] = px[c];
        }
    }
    Ok(chw)
}
