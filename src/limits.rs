//! Sizes from files and options: checked arithmetic, and memory estimates checked before the allocation.
//!
//! Every size that comes from a file header, an index, a model table or a command-line option goes through
//! [`product`] (or [`checked`]), so that no count wraps into a small wrong one; and every allocation whose size a
//! user controls (the model, the training workspace, a batch) is estimated first and refused by [`ensure_fits`]
//! when it exceeds the memory this machine has available, with the estimate, the limit and the option to change.

use anyhow::{bail, Result};

/// `a * b * ...` or an error naming `what` (e.g. "train-images-idx3-ubyte: header dims [..]").
pub fn product(what: impl std::fmt::Display, factors: &[usize]) -> Result<usize> {
    let mut p: usize = 1;
    for &f in factors {
        match p.checked_mul(f) {
            Some(v) => p = v,
            None => {
                bail!("{what}: {} overflows", factors.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(" x "))
            }
        }
    }
    Ok(p)
}

/// `v` or an error naming `what` when it is `None` (an overflowing `checked_*`).
pub fn checked<T>(v: Option<T>, what: impl FnOnce() -> String) -> Result<T> {
    match v {
        Some(v) => Ok(v),
        None => bail!("{}: the size overflows", what()),
    }
}

/// Bytes this process may still allocate: `ASGE_MEMORY_LIMIT` (bytes) when set, otherwise the kernel's
/// `MemAvailable`, lowered to what the cgroup (v2 `memory.max - memory.current`) leaves, when that is smaller.
/// `None` when neither can be read (then nothing is refused).
pub fn available_bytes() -> Option<u64> {
    if let Some(v) = std::env::var("ASGE_MEMORY_LIMIT").ok().and_then(|v| v.trim().parse::<u64>().ok()) {
        return Some(v);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let read = |f: &str| std::fs::read_to_string(format!("/sys/fs/cgroup/{f}")).ok()?.trim().parse::<u64>().ok();
    let cgroup = match (read("memory.max"), read("memory.current")) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => None,
    };
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// `12.3 GB`.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.1} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else {
        format!("{:.0} kB", b / 1e3)
    }
}

/// Refuses an allocation of about `bytes` for `what` when it exceeds [`available_bytes`]; `hint` names the
/// options that change it (e.g. "--batch, --width").
pub fn ensure_fits(what: &str, bytes: u64, hint: &str) -> Result<()> {
    if let Some(avail) = available_bytes() {
        if bytes > avail {
            bail!(
                "{what} needs about {} of memory, more than the {} available on this machine; lower {hint}",
                human_bytes(bytes),
                human_bytes(avail)
            );
        }
    }
    Ok(())
}

/// Like [`ensure_fits`] for a count of f32 values given as a checked product.
pub fn ensure_f32s_fit(what: &str, values: usize, hint: &str) -> Result<()> {
    ensure_fits(what, (values as u64).saturating_mul(4), hint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_overflow_into_errors_not_small_numbers() {
        assert_eq!(product("x", &[3, 4, 5]).unwrap(), 60);
        // 2^32 * 2^32 wraps to 0 in unchecked arithmetic.
        let e = product("dims", &[1 << 32, 1 << 32]).unwrap_err().to_string();
        assert!(e.contains("dims") && e.contains("overflows"), "{e}");
    }

    #[test]
    fn an_estimate_past_the_limit_names_itself_and_the_option() {
        let e = ensure_fits("the workspace", u64::MAX / 2, "--batch").unwrap_err().to_string();
        assert!(e.contains("the workspace") && e.contains("--batch"), "{e}");
        ensure_fits("a byte", 1, "--batch").unwrap();
    }
}
