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

/// `|got - want| <= atol + rtol * |want|` elementwise, with `atol = atol_rel * max |want|`; a NaN (an output a
/// kernel never wrote into a poisoned buffer) fails. Returns the worst ratio of error to tolerance (1 would be
/// the edge), so that a near miss can be reported as one.
pub fn close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol_rel: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-30);
    let atol = atol_rel * scale;
    let mut bad = Vec::new();
    let mut worst = 0.0f32;
    for (i, (&g, &c)) in got.iter().zip(want).enumerate() {
        let tol = atol + rtol * c.abs();
        let ok = (g - c).abs() <= tol;
        if !ok {
            bad.push(format!("[{i}] got {g} want {c}"));
        }
        if tol > 0.0 {
            worst = worst.max((g - c).abs() / tol);
        } else if g != c {
            worst = f32::INFINITY;
        }
    }
    assert!(
        bad.is_empty(),
        "{what}: {} of {} differ (worst error/tolerance {worst:.2}), first: {:?}",
        bad.len(),
        want.len(),
        &bad[..bad.len().min(5)]
    );
    worst
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

/// The layer-output cases: (batch, channels, side, pool, dropout p): no pool, avg pool with dropout, rms pool
/// on an odd side with heavy dropout, and many channels of small maps (several blocks a sample, a thread a
/// channel).
#[allow(clippy::type_complexity)]
pub fn output_cases() -> Vec<(usize, usize, usize, Option<asge::model::PoolKind>, Option<f32>)> {
    use asge::model::PoolKind::{Avg, Rms};
    vec![
        (3, 5, 7, None, None),
        (2, 70, 16, Some(Avg), Some(0.1)),
        (4, 9, 9, Some(Rms), Some(0.5)),
        (2, 600, 4, Some(Avg), Some(0.1)),
        // Multiples of 8 channels: the fp16 CUDA store is channels-last (one block of 8 channels a sample slice,
        // then a pooled odd-sized map).
        (2, 64, 16, None, Some(0.2)),
        (3, 16, 12, Some(Rms), None),
    ]
}

/// A layer output's input as the conv stores it: non-negative, and fp16-representable in the fp16 path.
pub fn conv_output(len: usize, precision: asge::backend::Precision) -> Vec<f32> {
    randn(len, 1.0, 5)
        .iter()
        .map(|v| match precision {
            asge::backend::Precision::F32 => v.max(0.0),
            asge::backend::Precision::F16 => asge::backend::round_f16(v.max(0.0)),
        })
        .collect()
}

/// Two fusion heads (32 and 64 features, batch 5, 10 classes) and the CPU reference's results on them.
pub struct HeadsCase {
    pub batch: usize,
    pub classes: usize,
    pub dims: [usize; 2],
    pub feats: Vec<Vec<f32>>,
    pub ws: Vec<Vec<f32>>,
    pub bs: Vec<Vec<f32>>,
    pub labels: Vec<u32>,
    pub logits: Vec<f32>,
    pub stats: Vec<f32>,
    /// `(dW, db)` per head.
    pub grads: Vec<(Vec<f32>, Vec<f32>)>,
}

pub fn heads_case() -> HeadsCase {
    let (batch, classes, dims) = (5, 10, [32usize, 64]);
    let feats: Vec<Vec<f32>> = dims.iter().map(|&c| randn(batch * c, 1.0, c as u64)).collect();
    let ws: Vec<Vec<f32>> = dims.iter().map(|&c| randn(classes * c, 0.2, 100 + c as u64)).collect();
    let bs: Vec<Vec<f32>> = dims.iter().map(|&c| randn(classes, 0.2, 200 + c as u64)).collect();
    let labels: Vec<u32> = vec![0, 3, 9, 1, 1];
    let mut grads: Vec<(Vec<f32>, Vec<f32>)> =
        dims.iter().map(|&c| (vec![0.0; classes * c], vec![0.0; classes])).collect();
    let (mut logits, mut stats) = (vec![0.0; batch * classes], vec![0.0; 2]);
    {
        let f: Vec<(&Vec<f32>, usize)> = feats.iter().zip(dims).collect();
        let h: Vec<(&Vec<f32>, &Vec<f32>)> = ws.iter().zip(&bs).collect();
        let mut gr: Vec<(&mut Vec<f32>, &mut Vec<f32>)> = grads.iter_mut().map(|(a, b)| (a, b)).collect();
        let cpu = asge::backend::cpu::CpuBackend::new();
        let args = asge::ops::fusion_heads::Args {
            layer: 0,
            batch,
            classes,
            feats: &f,
            heads: &h,
            labels: &labels,
            logits: &mut logits,
            grads: Some(&mut gr),
            stats: &mut stats,
        };
        asge::ops::fusion_heads::run(&cpu, args).unwrap();
    }
    HeadsCase { batch, classes, dims, feats, ws, bs, labels, logits, stats, grads }
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
