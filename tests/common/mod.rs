//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The datasets folder: `$ASGE_DATA`, or `data/` in the repository (filled by tools/fetch-datasets.sh).
/// A test that needs real data fails (never skips) when it is missing.
pub fn data_dir() -> PathBuf {
    let dir = std::env::var_os("ASGE_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data"));
    assert!(
        dir.join("mnist").is_dir(),
        "real datasets not found in {} (run tools/fetch-datasets.sh {} or set ASGE_DATA)",
        dir.display(),
        dir.display()
    );
    dir
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// A fresh, empty temporary folder.
pub fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("asge-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// `n` values drawn N(0, std^2) from `seed`.
pub fn randn(n: usize, std: f64, seed: u64) -> Vec<f32> {
    let mut r = asge::rng::Rng::new(seed);
    (0..n).map(|_| (r.normal() * std) as f32).collect()
}

/// `|got - want| <= atol + rtol * |want|` elementwise, with `atol = atol_rel * max |want|`; a NaN (an output a
/// kernel never wrote into a poisoned buffer) fails.
pub fn close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol_rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    let atol = atol_rel * scale;
    let mut bad = Vec::new();
    for (i, (&g, &c)) in got.iter().zip(want).enumerate() {
        let ok = (g - c).abs() <= atol + rtol * c.abs();
        if !ok {
            bad.push(format!("[{i}] got {g} want {c}"));
        }
    }
    assert!(bad.is_empty(), "{what}: {} of {} differ, first: {:?}", bad.len(), want.len(), &bad[..bad.len().min(5)]);
}

/// A convolution with its patch grid, for the kernel parity tests.
pub struct ConvCase {
    pub s: asge::backend::ConvShape,
    pub p: usize,
    pub reduce: asge::model::GoodnessReduce,
}

/// The awkward shapes every conv kernel is checked on: batch 1 and 3, channels not a multiple of the tiles,
/// H not divisible by P (overlapping cells), 1x1 cells; `batch` scales the VGG8-like case.
pub fn conv_cases(vgg_batch: usize) -> Vec<ConvCase> {
    use asge::model::GoodnessReduce::{Mean, Sum};
    let c = |batch, c_in, c_out, h, p, reduce| ConvCase {
        s: asge::backend::ConvShape { batch, c_in, c_out, h, w: h },
        p,
        reduce,
    };
    vec![
        c(1, 1, 8, 32, 4, Mean),
        c(3, 3, 70, 28, 8, Mean), // channels not a multiple of the tile, H not divisible by P
        c(3, 67, 129, 7, 2, Sum), // overlapping bins, odd everything
        c(vgg_batch, 32, 64, 16, 2, Mean), // a VGG8-like layer
        c(5, 96, 40, 2, 1, Mean),
    ]
}
