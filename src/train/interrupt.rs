//! SIGINT (Ctrl-C), SIGTERM (what `timeout`, Slurm and Kubernetes send) and SIGHUP (a closed terminal) stop a
//! training run cleanly: the trainer finishes its step, writes a mid-epoch checkpoint and returns, and `asge`
//! exits with `128 + signal` (130, 143, 129), as a shell reports a process killed by it. A second signal while
//! the first is handled exits at once with the same code.
//!
//! The handlers only store the signal number (async-signal-safe); the trainer polls [`received`] between steps.

use anyhow::{Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

struct Flags {
    any: Arc<AtomicBool>,
    which: Arc<AtomicUsize>,
}

static FLAGS: OnceLock<Flags> = OnceLock::new();

/// Installs the handlers (once per process; later calls do nothing).
pub fn install() -> Result<()> {
    if FLAGS.get().is_some() {
        return Ok(());
    }
    let flags = Flags { any: Arc::new(AtomicBool::new(false)), which: Arc::new(AtomicUsize::new(0)) };
    for sig in [SIGINT, SIGTERM, SIGHUP] {
        // Registered first, so it sees the flag as the previous signal left it: set means "second signal".
        signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, flags.any.clone())
            .context("cannot install the signal handlers")?;
        signal_hook::flag::register_usize(sig, flags.which.clone(), sig as usize)
            .context("cannot install the signal handlers")?;
        signal_hook::flag::register(sig, flags.any.clone()).context("cannot install the signal handlers")?;
    }
    let _ = FLAGS.set(flags);
    Ok(())
}

/// The signal that asked the run to stop, if one came.
pub fn received() -> Option<i32> {
    let f = FLAGS.get()?;
    if !f.any.load(Ordering::SeqCst) {
        return None;
    }
    Some(f.which.load(Ordering::SeqCst) as i32)
}

/// The exit code after signal `sig`: `128 + sig`.
pub fn exit_code(sig: i32) -> i32 {
    128 + sig
}

/// `SIGTERM` for 15, and so on.
pub fn name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        _ => "a signal",
    }
}
