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

/// `ASGE_MEMORY_LIMIT`: bytes, or with a unit (`8G`, `512MiB`: K, M, G, T are powers of 1024 alone or with
/// `iB`; `KB`, `MB`, `GB`, `TB` powers of 1000). Unset or empty: `None`; anything else is an error naming it.
pub fn memory_limit_env() -> Result<Option<u64>> {
    match std::env::var("ASGE_MEMORY_LIMIT") {
        Ok(v) => parse_memory_limit(&v),
        Err(_) => Ok(None),
    }
}

/// [`memory_limit_env`]'s parser.
fn parse_memory_limit(v: &str) -> Result<Option<u64>> {
    let t = v.trim();
    if t.is_empty() {
        return Ok(None);
    }
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let unit = unit.trim();
    // One letter (any case) or with `iB`: powers of 1024; with `B` (`KB`, `GB`): powers of 1000.
    let power = match unit.chars().next().map(|c| c.to_ascii_uppercase()) {
        None => 0,
        Some('B') if unit.len() == 1 => 0,
        Some('K') => 1,
        Some('M') => 2,
        Some('G') => 3,
        Some('T') => 4,
        _ => bail!("ASGE_MEMORY_LIMIT={v}: not a size (bytes, or a number with K, M, G, T, KiB.., KB..)"),
    };
    let base: f64 = match &unit.get(1..).unwrap_or("").to_ascii_lowercase()[..] {
        "" | "ib" => 1024.0,
        "b" if power > 0 => 1000.0,
        _ => bail!("ASGE_MEMORY_LIMIT={v}: not a size (bytes, or a number with K, M, G, T, KiB.., KB..)"),
    };
    let n: f64 = number.parse().map_err(|_| anyhow::anyhow!("ASGE_MEMORY_LIMIT={v}: not a size"))?;
    let bytes = n * base.powi(power);
    if !(bytes.is_finite() && bytes < u64::MAX as f64) {
        bail!("ASGE_MEMORY_LIMIT={v}: the size overflows");
    }
    Ok(Some(bytes as u64))
}

/// What `RLIMIT_AS` (`ulimit -v`, `prlimit --as`) still leaves this process: the limit less the address space
/// it maps now. `None` when unlimited or unreadable.
fn address_space_left() -> Option<u64> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: one out-parameter of the right type.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut r) } != 0 || r.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    // /proc/self/statm's first field: the mapped size in pages.
    let pages: u64 = std::fs::read_to_string("/proc/self/statm").ok()?.split_whitespace().next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    Some(r.rlim_cur.saturating_sub(pages.saturating_mul(page)))
}

/// Bytes this process may still allocate: `ASGE_MEMORY_LIMIT` when set, otherwise the kernel's `MemAvailable`,
/// lowered to what the cgroup (v2 `memory.max - memory.current`) and `RLIMIT_AS` leave, when those are smaller.
/// `None` when none can be read (then nothing is refused).
pub fn available_bytes() -> Result<Option<u64>> {
    if let Some(v) = memory_limit_env()? {
        return Ok(Some(v));
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
    Ok([meminfo, cgroup, address_space_left()].into_iter().flatten().min())
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
    if let Some(avail) = available_bytes()? {
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

    #[test]
    fn the_memory_limit_takes_units_and_refuses_what_it_cannot_read() {
        let cases = [
            ("8G", Some(8 << 30)),
            ("8g", Some(8 << 30)),
            ("512MiB", Some(512 << 20)),
            ("2GB", Some(2_000_000_000)),
            ("1.5G", Some(3 << 29)),
            ("4096", Some(4096)),
            ("", None),
        ];
        for (v, want) in cases {
            assert_eq!(parse_memory_limit(v).unwrap(), want, "{v}");
        }
        for bad in ["8Q", "lots", "99999999999T"] {
            let e = parse_memory_limit(bad).unwrap_err().to_string();
            assert!(e.contains("ASGE_MEMORY_LIMIT") && e.contains(bad), "{e}");
        }
    }
}
