//! Pillow's bilinear resize on 8-bit images, bit for bit (docs/method.md §15).
//!
//! The released pipeline resizes MNIST-style 28x28 images to 32x32 with torchvision's `Resize` on a PIL
//! image, which is Pillow's fixed-point, two-pass (horizontal, then vertical, each rounded to u8) filter.

const PRECISION_BITS: u32 = 22;

/// Per-output taps: `(first source index, integer weights)`.
fn coefficients(n_in: usize, n_out: usize) -> Vec<(usize, Vec<i64>)> {
    let scale = n_in as f64 / n_out as f64;
    let fscale = scale.max(1.0);
    let support = fscale; // bilinear support 1.0, scaled when downsampling
    (0..n_out)
        .map(|o| {
            let center = (o as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize; // trunc toward zero, like a C cast
            let xmax = ((center + support + 0.5) as i64).min(n_in as i64) as usize;
            let count = xmax.saturating_sub(xmin);
            let mut w: Vec<f64> = (0..count)
                .map(|j| {
                    let t = ((xmin + j) as f64 - center + 0.5) / fscale;
                    (1.0 - t.abs()).max(0.0)
                })
                .collect();
            let sum: f64 = w.iter().sum();
            if sum != 0.0 {
                for v in &mut w {
                    *v /= sum;
                }
            }
            let k = w.iter().map(|&v| (v * (1u64 << PRECISION_BITS) as f64).round() as i64).collect();
            (xmin, k)
        })
        .collect()
}

fn apply(src: impl Fn(usize) -> u8, taps: &(usize, Vec<i64>)) -> u8 {
    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
    for (j, &k) in taps.1.iter().enumerate() {
        acc += src(taps.0 + j) as i64 * k;
    }
    if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS).min(255) as u8
    }
}

/// Resize one `h x w` single-channel u8 plane to `oh x ow` as Pillow's `Image.resize(.., BILINEAR)`.
pub fn resize_bilinear_u8(src: &[u8], h: usize, w: usize, oh: usize, ow: usize) -> Vec<u8> {
    assert_eq!(src.len(), h * w);
    let hc = coefficients(w, ow);
    let mut tmp = vec![0u8; h * ow];
    for r in 0..h {
        let row = &src[r * w..][..w];
        for (o, taps) in hc.iter().enumerate() {
            tmp[r * ow + o] = apply(|i| row[i], taps);
        }
    }
    let vc = coefficients(h, oh);
    let mut out = vec![0u8; oh * ow];
    for (o, taps) in vc.iter().enumerate() {
        for c in 0..ow {
            out[o * ow + c] = apply(|i| tmp[i * ow + c], taps);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_image_stays_constant() {
        let src = vec![200u8; 28 * 28];
        assert!(resize_bilinear_u8(&src, 28, 28, 32, 32).iter().all(|&v| v == 200));
    }

    #[test]
    fn weights_sum_to_one_in_fixed_point() {
        for (taps_in, out) in [(28, 32), (32, 32), (64, 32), (7, 32)] {
            for (_, k) in coefficients(taps_in, out) {
                let s: i64 = k.iter().sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= 2, "{taps_in}->{out}: {s}");
            }
        }
    }
}
