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
