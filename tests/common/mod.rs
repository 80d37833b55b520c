//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

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

pub use asge::rng::randn;

/// [`asge::ops::parity::close`], panicking with its message: the worst ratio of error to tolerance.
pub fn close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol_rel: f32) -> f32 {
    asge::ops::parity::close(what, got, want, rtol, atol_rel).unwrap_or_else(|e| panic!("{e:#}"))
}

/// A convolution with its patch grid, for the kernel parity tests.
pub struct ConvCase {
    pub s: asge::backend::ConvShape,
    pub p: usize,
    pub reduce: asge::model::GoodnessReduce,
}

/// Inputs for case `i`: x ~ N(0, 1), Kaiming-scaled weights, small biases, and a dL/dg of the size the loss
/// makes (~1/B), so that fp16 underflow would show.
pub fn conv_inputs(case: &ConvCase, i: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
    let s = &case.s;
    let d = s.c_out * case.p * case.p;
    (
        randn(s.x_len(), 1.0, 10 + i as u64),
        randn(s.w_len(), (2.0 / (s.c_in * 9) as f64).sqrt(), 20 + i as u64),
        randn(s.c_out, 0.1, 30 + i as u64),
        randn(s.batch * d, 1.0 / s.batch as f64, 40 + i as u64),
    )
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
        c(5, 120, 40, 2, 1, Mean), // K = 1080: several K tiles of either weight-gradient tile, 2x2 maps
        // fp16 picks the 128 x 256 forward tile at batch 128 (128 blocks, 122 KB of shared memory)
        c(vgg_batch, 16, 128, 16, 2, Mean),
        // rows wider than either fp16 forward tile: a cell's rows are runs in tiles that skip the tiles between
        ConvCase { s: asge::backend::ConvShape { batch: 2, c_in: 3, c_out: 8, h: 3, w: 300 }, p: 2, reduce: Sum },
    ]
}

/// Runs the `asge` binary this test build made (in `cwd`, or here): exit code, stdout, stderr.
pub fn run_asge(cwd: Option<&Path>, args: &[&str]) -> (i32, String, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_asge"));
    c.args(args);
    if let Some(d) = cwd {
        c.current_dir(d);
    }
    let o = c.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// `python3 ARGS` with the folder in `$path_env` (where tools/test.sh installs `what`) on its module path: its
/// stdout and stderr; a failure (or an unset variable) fails the test, it never skips.
pub fn python(path_env: &str, what: &str, args: &[&str]) -> String {
    let dir = std::env::var(path_env)
        .unwrap_or_else(|_| panic!("{path_env}: the folder tools/test.sh installs {what} into is not set"));
    let o = Command::new("python3").args(args).env("PYTHONPATH", &dir).output().unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "python3 {args:?} failed:\n{out}");
    out
}
