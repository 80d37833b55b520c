//! Training augmentations of the released recipe (docs/method.md §12), on f32 CHW images in [0, 1]:
//! Fashion-MNIST a horizontal flip; CIFAR RandomCrop(32, padding=4), RandomHorizontalFlip,
//! ColorJitter(0.4, 0.4, 0.4, 0.1) with its four parts in random order, RandomGrayscale(p=0.2).

use crate::rng::Rng;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Augment {
    None,
    Flip,
    Cifar,
    /// ImageNet training: RandomResizedCrop(T, scale 0.08-1, ratio 3/4-4/3) and a horizontal flip.
    ResizedCrop(usize),
    /// ImageNet evaluation: resize to T / 0.875, centre crop T.
    CenterCrop(usize),
}

impl Augment {
    /// The side of the output when it differs from the stored image.
    pub fn output_size(self) -> Option<usize> {
        match self {
            Augment::ResizedCrop(t) | Augment::CenterCrop(t) => Some(t),
            _ => None,
        }
    }
}

/// Bilinear sample of the source square `[y0, y0 + ch) x [x0, x0 + cw)` of a u8 CHW `s x s` image into an f32
/// `t x t` output in [0, 1] (pixel centres aligned, edges clamped), flipped horizontally when asked.
fn sample(
    img: &[u8],
    c: usize,
    s: usize,
    t: usize,
    (y0, x0, ch, cw): (f64, f64, f64, f64),
    flip: bool,
    out: &mut [f32],
) {
    let (sy, sx) = (ch / t as f64, cw / t as f64);
    let cols: Vec<(usize, usize, f32)> = (0..t)
        .map(|j| {
            let jj = if flip { t - 1 - j } else { j };
            let x = (x0 + (jj as f64 + 0.5) * sx - 0.5).clamp(0.0, (s - 1) as f64);
            let xi = x.floor() as usize;
            (xi, (xi + 1).min(s - 1), (x - xi as f64) as f32)
        })
        .collect();
    for i in 0..t {
        let y = (y0 + (i as f64 + 0.5) * sy - 0.5).clamp(0.0, (s - 1) as f64);
        let yi = y.floor() as usize;
        let (y1, fy) = ((yi + 1).min(s - 1), (y - yi as f64) as f32);
        for ch_i in 0..c {
            let plane = &img[ch_i * s * s..][..s * s];
            let (r0, r1) = (&plane[yi * s..][..s], &plane[y1 * s..][..s]);
            let o = &mut out[(ch_i * t + i) * t..][..t];
            for (v, &(xa, xb, fx)) in o.iter_mut().zip(&cols) {
                let top = r0[xa] as f32 + (r0[xb] as f32 - r0[xa] as f32) * fx;
                let bot = r1[xa] as f32 + (r1[xb] as f32 - r1[xa] as f32) * fx;
                *v = (top + (bot - top) * fy) / 255.0;
            }
        }
    }
}

/// The ImageNet augmentations: from a u8 CHW `s x s` image to an f32 CHW `t x t` image in [0, 1].
pub fn crop_resize(aug: Augment, img: &[u8], c: usize, s: usize, t: usize, out: &mut [f32], rng: &mut Rng) {
    let sf = s as f64;
    match aug {
        Augment::ResizedCrop(_) => {
            // torchvision's RandomResizedCrop: 10 tries at a random area and aspect ratio, else the whole image.
            let area = sf * sf;
            let mut region = (0.0, 0.0, sf, sf);
            for _ in 0..10 {
                let target = area * rng.uniform(0.08, 1.0);
                let ratio = rng.uniform((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln()).exp();
                let w = (target * ratio).sqrt().round();
                let h = (target / ratio).sqrt().round();
                if w > 0.0 && h > 0.0 && w <= sf && h <= sf {
                    let y0 = rng.below((sf - h) as u64 + 1) as f64;
                    let x0 = rng.below((sf - w) as u64 + 1) as f64;
                    region = (y0, x0, h, w);
                    break;
                }
            }
            let flip = rng.next_f64() < 0.5;
            sample(img, c, s, t, region, flip, out);
        }
        _ => {
            // Resize to t / 0.875 then centre-crop t: the crop covers 0.875 of the stored image.
            let side = sf * 0.875;
            let off = (sf - side) / 2.0;
            sample(img, c, s, t, (off, off, side, side), false, out);
        }
    }
}

/// Applies `aug` to one image `[C, S, S]` in place, drawing from `rng`.
pub fn apply(aug: Augment, img: &mut [f32], channels: usize, size: usize, rng: &mut Rng) {
    match aug {
        Augment::None | Augment::ResizedCrop(_) | Augment::CenterCrop(_) => {}
        Augment::Flip => {
            if rng.next_f64() < 0.5 {
                hflip(img, channels, size);
            }
        }
        Augment::Cifar => {
            random_crop(img, channels, size, 4, rng);
            if rng.next_f64() < 0.5 {
                hflip(img, channels, size);
            }
            if channels == 3 {
                color_jitter(img, size * size, rng);
                if rng.next_f64() < 0.2 {
                    grayscale(img, size * size);
                }
            }
        }
    }
}

fn hflip(img: &mut [f32], channels: usize, size: usize) {
    for row in img[..channels * size * size].chunks_exact_mut(size) {
        row.reverse();
    }
}

fn random_crop(img: &mut [f32], channels: usize, size: usize, pad: usize, rng: &mut Rng) {
    let top = rng.below(2 * pad as u64 + 1) as isize - pad as isize;
    let left = rng.below(2 * pad as u64 + 1) as isize - pad as isize;
    let src = img.to_vec();
    for c in 0..channels {
        for i in 0..size {
            for j in 0..size {
                let (si, sj) = (i as isize + top, j as isize + left);
                let inside = si >= 0 && sj >= 0 && (si as usize) < size && (sj as usize) < size;
                img[(c * size + i) * size + j] =
                    if inside { src[(c * size + si as usize) * size + sj as usize] } else { 0.0 };
            }
        }
    }
}

fn gray(r: f32, g: f32, b: f32) -> f32 {
    0.299 * r + 0.587 * g + 0.114 * b
}

fn grayscale(img: &mut [f32], hw: usize) {
    for p in 0..hw {
        let v = gray(img[p], img[hw + p], img[2 * hw + p]);
        img[p] = v;
        img[hw + p] = v;
        img[2 * hw + p] = v;
    }
}

fn blend(img: &mut [f32], other: impl Fn(usize) -> f32, factor: f32, hw: usize) {
    for c in 0..3 {
        for p in 0..hw {
            let v = &mut img[c * hw + p];
            *v = (factor * *v + (1.0 - factor) * other(p)).clamp(0.0, 1.0);
        }
    }
}

/// torchvision's ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1).
fn color_jitter(img: &mut [f32], hw: usize, rng: &mut Rng) {
    let mut order = [0usize, 1, 2, 3];
    rng.shuffle(&mut order);
    let b = rng.uniform(0.6, 1.4) as f32;
    let c = rng.uniform(0.6, 1.4) as f32;
    let s = rng.uniform(0.6, 1.4) as f32;
    let h = rng.uniform(-0.1, 0.1) as f32;
    for op in order {
        match op {
            0 => blend(img, |_| 0.0, b, hw),
            1 => {
                let mean = (0..hw).map(|p| gray(img[p], img[hw + p], img[2 * hw + p])).sum::<f32>() / hw as f32;
                blend(img, |_| mean, c, hw);
            }
            2 => {
                let g: Vec<f32> = (0..hw).map(|p| gray(img[p], img[hw + p], img[2 * hw + p])).collect();
                blend(img, |p| g[p], s, hw);
            }
            _ => hue_shift(img, hw, h),
        }
    }
}

fn hue_shift(img: &mut [f32], hw: usize, shift: f32) {
    for p in 0..hw {
        let (r, g, b) = (img[p], img[hw + p], img[2 * hw + p]);
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let d = max - min;
        let v = max;
        let s = if max > 0.0 { d / max } else { 0.0 };
        let mut hue = if d == 0.0 {
            0.0
        } else if max == r {
            ((g - b) / d).rem_euclid(6.0) / 6.0
        } else if max == g {
            ((b - r) / d + 2.0) / 6.0
        } else {
            ((r - g) / d + 4.0) / 6.0
        };
        hue = (hue + shift).rem_euclid(1.0);
        let i = (hue * 6.0).floor();
        let f = hue * 6.0 - i;
        let (pp, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
        let (r2, g2, b2) = match i as i32 % 6 {
            0 => (v, t, pp),
            1 => (q, v, pp),
            2 => (pp, v, t),
            3 => (pp, q, v),
            4 => (t, pp, v),
            _ => (v, pp, q),
        };
        img[p] = r2;
        img[hw + p] = g2;
        img[2 * hw + p] = b2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flip_twice_is_identity_and_crop_keeps_shape() {
        let img: Vec<f32> = (0..3 * 32 * 32).map(|i| (i % 97) as f32 / 97.0).collect();
        let mut a = img.clone();
        hflip(&mut a, 3, 32);
        assert_ne!(a, img);
        hflip(&mut a, 3, 32);
        assert_eq!(a, img);
        let mut rng = Rng::new(1);
        for _ in 0..20 {
            let mut b = img.clone();
            apply(Augment::Cifar, &mut b, 3, 32, &mut rng);
            assert_eq!(b.len(), img.len());
            assert!(b.iter().all(|v| (0.0..=1.0).contains(v)));
        }
    }

    #[test]
    fn hue_shift_of_zero_is_identity() {
        let mut img: Vec<f32> = (0..3 * 16).map(|i| (i * 7 % 16) as f32 / 16.0).collect();
        let orig = img.clone();
        hue_shift(&mut img, 16, 0.0);
        for (a, b) in img.iter().zip(&orig) {
            assert!((a - b).abs() < 1e-5);
        }
    }
}
