//! How an image file becomes a model input, the same way the training data did: [`InputSpec`] is stored in
//! every checkpoint (`asge.input`), and `asge predict`, `asge eval --folder` and the exported ONNX graph follow it.
//!
//! The steps, for a checkpoint of `channels` x `size` x `size` inputs (docs/method.md, "Input"):
//! 1. Decode the PNG or JPEG.
//! 2. Channels. A 1-channel model takes a grey image as it is and a colour image converted as Pillow's
//!    `convert("L")` does (`L = (19595 R + 38470 G + 7471 B + 2^15) >> 16`, ITU-R 601 luma); a 3-channel model
//!    takes a grey image repeated into R, G and B. MNIST digits are light on dark: a photo of a dark digit on
//!    white paper must be inverted by the user first.
//! 3. Size. Built-in datasets (`resize: pillow-bilinear`): an image of the stored side is used as it is; a square
//!    image of another side is resized with Pillow's bilinear filter (the exact 28 -> 32 resize the MNIST loader
//!    does); any other image has its short side resized that way, then the centre cropped. Shard-trained models
//!    (`resize: short-side` or `squash`) decode exactly as `asge shard` did, to the shards' side.
//! 4. The evaluation crop: the centre `crop x crop` of the stored image (shard-trained models; the built-in
//!    datasets store the model's side, so there is nothing to crop), resized bilinearly as the training crops
//!    were; a crop larger than the stored side upsamples it.
//! 5. Pixels to [0, 1] and the per-sample RMS norm ([`super::to_input`]), inside the model.

use super::imagefolder::{self, ResizeMode};
use super::resize::resize_bilinear_u8;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// How the stored images of a training set were brought to their side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputResize {
    /// Pillow's bilinear filter, bit for bit (the built-in datasets).
    PillowBilinear,
    /// `asge shard --resize short-side`: short side to the shards' side, centre crop.
    ShortSide,
    /// `asge shard --resize squash`: both sides to the shards' side.
    Squash,
}

/// What a checkpoint's model expects as input, and the names of its classes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// Side of the stored square images of the training data (32 for the built-in datasets).
    pub stored_size: usize,
    pub resize: InputResize,
    /// Side of the model's input: the centre crop of a stored image at evaluation.
    pub crop: usize,
    /// The dataset the model was trained on (`mnist`, `imagenet`, ...).
    pub dataset: String,
    /// Class `i`'s name: digits for MNIST, CIFAR's names, the ImageFolder's folder names.
    pub class_names: Vec<String>,
}

impl InputSpec {
    /// Checks a spec read from a checkpoint against the model it came with.
    pub fn validate(&self, channels: usize, image_size: usize, classes: usize) -> Result<()> {
        if self.channels != channels || self.crop != image_size || self.class_names.len() != classes {
            bail!(
                "asge.input metadata says {} channel(s), {}px, {} class names; the model takes {channels}, \
                 {image_size}px, {classes} classes",
                self.channels,
                self.crop,
                self.class_names.len()
            );
        }
        // A stored side below the crop is an upsampling crop (the loader resizes the stored image's centre up):
        // any stored side the shards can have is one a model can be trained on.
        if self.stored_size == 0 || self.stored_size > super::shard::MAX_SIZE {
            bail!("asge.input metadata: stored side {} (1 to {})", self.stored_size, super::shard::MAX_SIZE);
        }
        Ok(())
    }

    /// The spec a model without `asge.input` metadata (files written before it existed, or elsewhere) is taken to
    /// have: its own side, Pillow's resize, classes named by number.
    pub fn assumed(channels: usize, image_size: usize, classes: usize) -> Self {
        InputSpec {
            channels,
            stored_size: image_size,
            resize: InputResize::PillowBilinear,
            crop: image_size,
            dataset: "unknown".into(),
            class_names: (0..classes).map(|i| i.to_string()).collect(),
        }
    }

    /// Decodes `path` into a stored image: `channels x stored_size x stored_size` bytes, CHW.
    pub fn load(&self, path: &Path) -> Result<Vec<u8>> {
        let s = self.stored_size;
        let chw = match self.resize {
            InputResize::ShortSide => imagefolder::load_rgb(path, s, ResizeMode::ShortSide)?,
            InputResize::Squash => imagefolder::load_rgb(path, s, ResizeMode::Squash)?,
            InputResize::PillowBilinear => {
                let (planes, h, w) = decode_planes(path, s)?;
                planes.iter().flat_map(|p| pillow_fit(p, h, w, s)).collect()
            }
        };
        let plane = s * s;
        let have = chw.len() / plane;
        match (have, self.channels) {
            (a, b) if a == b => Ok(chw),
            (3, 1) => Ok(pillow_luma(&chw[..plane], &chw[plane..2 * plane], &chw[2 * plane..])),
            (1, 3) => Ok([&chw[..], &chw[..], &chw[..]].concat()),
            (a, b) => bail!("{} channels for a {b}-channel model", a),
        }
    }
}

/// Pillow's RGB -> L conversion, exact (a grey image stored as RGB comes back unchanged).
fn pillow_luma(r: &[u8], g: &[u8], b: &[u8]) -> Vec<u8> {
    r.iter()
        .zip(g)
        .zip(b)
        .map(|((&r, &g), &b)| ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8)
        .collect()
}

/// Decodes a PNG or JPEG into 1 (grey) or 3 (RGB) planes of `h x w`, after checking its declared size for a
/// resize to a short side of `s` ([`imagefolder::check_declared`]).
fn decode_planes(path: &Path, s: usize) -> Result<(Vec<Vec<u8>>, usize, usize)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    // Pillow's fit is a short-side resize (both sides for a square image).
    imagefolder::check_declared(&bytes, s, ResizeMode::ShortSide)?;
    let img = if bytes.starts_with(&[0xff, 0xd8]) {
        image::DynamicImage::ImageRgb8(imagefolder::decode_jpeg_strict(&bytes)?)
    } else {
        image::load_from_memory(&bytes).map_err(|e| anyhow::anyhow!("{e}"))?
    };
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        bail!("empty image");
    }
    let grey = matches!(img.color(), image::ColorType::L8 | image::ColorType::La8 | image::ColorType::L16);
    if grey {
        // 16-bit grey to 8 bits as Pillow reads it (the high byte, rounded by image's own conversion).
        return Ok((vec![img.to_luma8().into_raw()], h, w));
    }
    let rgb = img.to_rgb8().into_raw();
    let planes = (0..3).map(|c| rgb.iter().skip(c).step_by(3).copied().collect()).collect();
    Ok((planes, h, w))
}

/// One `h x w` plane to `s x s`: unchanged when it is already, Pillow's bilinear resize of the short side to `s`
/// (both sides when square), then the centre `s x s`.
fn pillow_fit(plane: &[u8], h: usize, w: usize, s: usize) -> Vec<u8> {
    if h == s && w == s {
        return plane.to_vec();
    }
    let (nw, nh) = imagefolder::short_side_size(w, h, s);
    let r = resize_bilinear_u8(plane, h, w, nh, nw);
    let (top, left) = ((nh - s) / 2, (nw - s) / 2);
    (0..s).flat_map(|y| r[(top + y) * nw + left..][..s].to_vec()).collect()
}

/// The class names of a built-in dataset: digits for the IDX datasets, Fashion-MNIST's and CIFAR's names (from
/// the CIFAR folder's own list when it has one).
pub fn builtin_class_names(kind: super::DatasetKind, cifar_dir: Option<&Path>, classes: usize) -> Vec<String> {
    use super::DatasetKind::*;
    let fixed: &[&str] = match kind {
        FashionMnist => {
            &["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
        }
        Cifar10 => &["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        _ => &[],
    };
    let from_file = |name: &str| -> Option<Vec<String>> {
        let text = std::fs::read_to_string(cifar_dir?.join(name)).ok()?;
        let names: Vec<String> = text.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
        (names.len() == classes).then_some(names)
    };
    let listed = match kind {
        Cifar10 => from_file("batches.meta.txt"),
        Cifar100 => from_file("fine_label_names.txt"),
        _ => None,
    };
    listed.unwrap_or_else(|| {
        if fixed.len() == classes {
            fixed.iter().map(|s| s.to_string()).collect()
        } else {
            (0..classes).map(|i| i.to_string()).collect()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luma_is_pillows_and_keeps_grey() {
        assert_eq!(pillow_luma(&[255, 0, 0, 7], &[0, 255, 0, 7], &[0, 0, 255, 7]), vec![76, 150, 29, 7]);
        let v: Vec<u8> = (0..=255).collect();
        assert_eq!(pillow_luma(&v, &v, &v), v);
    }

    #[test]
    fn fit_resizes_the_short_side_and_crops_the_centre() {
        // 2 x 4 -> short side 2 stays, width 4 cropped to the middle 2.
        let p = [1, 2, 3, 4, 5, 6, 7, 8];
        assert_eq!(pillow_fit(&p, 2, 4, 2), vec![2, 3, 6, 7]);
        // Square of another side: the plain Pillow resize.
        let sq: Vec<u8> = (0..28 * 28).map(|i| (i % 251) as u8).collect();
        assert_eq!(pillow_fit(&sq, 28, 28, 32), resize_bilinear_u8(&sq, 28, 28, 32, 32));
    }
}
