//! SIGINT (Ctrl-C), SIGTERM (what `timeout`, Slurm and Kubernetes send) and SIGHUP (a closed terminal) stop a
//! training run cleanly: the trainer finishes its step, writes a mid-epoch checkpoint and returns, and `asge`
//! exits with `128 + signal` (130, 143, 129), as a shell reports a process killed by it. A second signal while
//! the first is handled exits at once with the same code.
//!
//! The handlers only store the signal number (async-signal-safe); the trainer polls [`received`] between steps
//! and between the batches of validation and the test. A program that embeds asge (a Python binding on
//! KeyboardInterrupt) asks for the same stop with [`request_stop`]. Whatever the phase, the run ends with a
//! checkpoint it resumes from bit for bit:
//! - mid-epoch (the first step included): a mid-epoch checkpoint at the step it finished;
//! - during validation: the epoch's training is complete; the checkpoint says so, and the resumed run validates
//!   the epoch again (the same weights and the same images give the same numbers) before going on;
//! - while a checkpoint is written: the write completes, then the run stops;
//! - during the final test: every checkpoint is complete; the resumed run only runs the test.

use anyhow::{Context, Result};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

struct Flags {
    any: Arc<AtomicBool>,
    which: Arc<AtomicUsize>,
}

static FLAGS: OnceLock<Flags> = OnceLock::new();

/// Set by [`request_stop`].
static REQUESTED: AtomicBool = AtomicBool::new(false);

/// What [`received`] returns for a stop asked for by [`request_stop`] rather than by a signal.
pub const REQUESTED_STOP: i32 = 0;

/// Asks a running training to stop as a signal would (finish the step, checkpoint, return).
pub fn request_stop() {
    REQUESTED.store(true, Ordering::SeqCst);
}

/// The error an evaluation pass returns when a stop was asked for during it (the caller checkpoints).
#[derive(Debug)]
pub struct Interrupted(pub i32);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: stopped", name(self.0))
    }
}

impl std::error::Error for Interrupted {}

/// True when `e` is (or wraps) an [`Interrupted`].
pub fn is_interrupted(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.is::<Interrupted>())
}

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

/// The signal that asked the run to stop, if one came ([`REQUESTED_STOP`] for [`request_stop`]).
pub fn received() -> Option<i32> {
    if let Some(f) = FLAGS.get().filter(|f| f.any.load(Ordering::SeqCst)) {
        return Some(f.which.load(Ordering::SeqCst) as i32);
    }
    REQUESTED.load(Ordering::SeqCst).then_some(REQUESTED_STOP)
}

/// A test hook: with `ASGE_TEST_PHASE=name` in the environment, the run prints `asge: test phase NAME` when it
/// reaches the phase `name` and waits there (up to a minute) until a stop is asked for, so that a test can stop
/// it exactly there. Phases with a progress line of their own need no hook; `checkpoint` has one: it holds the
/// run just before the end-of-epoch checkpoints are written, and a stop asked for there is one that lands while they are
/// written (the run reads the stop only after writing them).
pub fn test_phase(phase: &str) {
    if std::env::var("ASGE_TEST_PHASE").is_ok_and(|p| p == phase) {
        eprintln!("asge: test phase {phase}");
        let t0 = std::time::Instant::now();
        while received().is_none() && t0.elapsed().as_secs() < 60 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
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
        REQUESTED_STOP => "stop requested",
        _ => "a signal",
    }
}
