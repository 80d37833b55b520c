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

// Re-exported for the test binaries that include this module; each uses some of them.
#[allow(unused_imports)]
pub use asge::rng::randn;

/// [`asge::ops::parity::close`], panicking with its message: the worst ratio of error to tolerance.
pub fn close(what: &str, got: &[f32], want: &[f32], rtol: f32, atol_rel: f32) -> f32 {
    asge::ops::parity::close(what, got, want, rtol, atol_rel).unwrap_or_else(|e| panic!("{e:#}"))
}

#[allow(unused_imports)]
pub use asge::ops::conv_goodness_fwd::parity::{cases as conv_cases, inputs as conv_inputs, ConvCase};

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
