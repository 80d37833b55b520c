//! ImageFolder input for `asge shard`: one sub-folder per class (sorted by name, as torchvision's ImageFolder
//! numbers them), JPEG and PNG files inside, decoded to RGB and brought to `S x S`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

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

/// The files of an ImageFolder and the class names (sorted, as torchvision numbers them).
pub fn scan(root: &Path) -> Result<(LabelledFiles, Vec<String>)> {
    let entries =
        std::fs::read_dir(root).with_context(|| format!("--input {}: cannot read the folder", root.display()))?;
    let mut classes: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    classes.sort();
    if classes.is_empty() {
        bail!("--input {}: no class folders (an ImageFolder has one sub-folder of images per class)", root.display());
    }
    let mut files = Vec::new();
    for (ci, class) in classes.iter().enumerate() {
        let dir = root.join(class);
        let mut imgs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .with_context(|| format!("{}: cannot read", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_image_name(p))
            .collect();
        if imgs.is_empty() {
            bail!("{}: class folder '{class}' has no .jpg/.jpeg/.png files", dir.display());
        }
        imgs.sort();
        files.extend(imgs.into_iter().map(|p| (p, ci as u32)));
    }
    Ok((files, classes))
}

fn is_image_name(p: &Path) -> bool {
    let ext = p.extension().and_then(|e| e.to_str()).map(|e| e.to_ascii_lowercase());
    matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png"))
}

/// Decodes a JPEG or PNG file to RGB and brings it to `size x size`, returned CHW (`3 * size * size` bytes).
pub fn load_rgb(path: &Path, size: usize, mode: ResizeMode) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let img = image::load_from_memory(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?.to_rgb8();
    let (w, h) = img.dimensions();
    if w == 0 || h == 0 {
        bail!("empty image");
    }
    let s = size as u32;
    let filter = image::imageops::FilterType::Triangle;
    let out = match mode {
        ResizeMode::Squash => image::imageops::resize(&img, s, s, filter),
        ResizeMode::ShortSide => {
            let (nw, nh) = if w <= h {
                (s, ((h as u64 * s as u64 + w as u64 / 2) / w as u64).max(s as u64) as u32)
            } else {
                (((w as u64 * s as u64 + h as u64 / 2) / h as u64).max(s as u64) as u32, s)
            };
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
