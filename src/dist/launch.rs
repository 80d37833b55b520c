//! `asge train --nproc N`: the N ranks of one machine, started by asge itself. Each rank is this program again,
//! with torch's variables set as torchrun sets them (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR=127.0.0.1`, `MASTER_PORT` a free port) and `--threads` the cores divided among them. A signal to
//! the launcher goes to every rank (each stops at a checkpoint, as a single process does); when a rank fails, the
//! others get 5 s to notice it themselves, then SIGTERM and, 30 s later, SIGKILL; the launcher exits with the first
//! failing rank's code.

use super::NPROC_VAR;
use anyhow::{bail, Context, Result};
use std::ffi::OsString;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// A free TCP port on this machine (the OS picks it; it is free again when this returns).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0)).context("--nproc: finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn signal(c: &Child, sig: i32) {
    // SAFETY: kill(2) on a child this process started and has not yet reaped.
    unsafe { libc::kill(c.id() as i32, sig) };
}

/// Starts `n` ranks of this program with `args` (the command line without `--nproc`) and waits for them. Returns
/// the exit code to leave with.
pub fn run(n: usize, args: &[OsString], threads: Option<usize>) -> Result<i32> {
    if n == 0 {
        bail!("--nproc 0: at least one process");
    }
    if std::env::var_os("RANK").is_some() || std::env::var_os("SLURM_PROCID").is_some() {
        bail!("--nproc under a launcher (RANK or SLURM_PROCID is set): let the launcher start the ranks, or use one");
    }
    let exe = std::env::current_exe().context("--nproc: this program's path")?;
    let port = free_port()?;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let per = threads.unwrap_or((cores / n).max(1));
    let mut children: Vec<Option<Child>> = Vec::new();
    for rank in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.arg("--threads").arg(per.to_string()).args(args);
        cmd.env("RANK", rank.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env(NPROC_VAR, "nproc");
        match cmd.spawn() {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                for c in children.iter().flatten() {
                    signal(c, libc::SIGKILL);
                }
                return Err(e).with_context(|| format!("--nproc: starting rank {rank} ({})", exe.display()));
            }
        }
    }
    let mut first_failure: Option<(usize, i32)> = None;
    let mut forwarded = false;
    let (mut term_at, mut kill_at): (Option<Instant>, Option<Instant>) = (None, None);
    loop {
        let mut running = 0;
        for (rank, slot) in children.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            match c.try_wait() {
                Ok(Some(status)) => {
                    let code = status.code().unwrap_or_else(|| {
                        use std::os::unix::process::ExitStatusExt;
                        128 + status.signal().unwrap_or(1)
                    });
                    if code != 0 && first_failure.is_none() {
                        first_failure = Some((rank, code));
                    }
                    *slot = None;
                }
                Ok(None) => running += 1,
                Err(e) => return Err(e).with_context(|| format!("--nproc: waiting for rank {rank}")),
            }
        }
        if running == 0 {
            break;
        }
        // A signal to the launcher: every rank gets SIGTERM once (each checkpoints and stops at the same step).
        if crate::train::run::was_interrupted() && !forwarded {
            forwarded = true;
            for c in children.iter().flatten() {
                signal(c, libc::SIGTERM);
            }
        }
        // A failed rank: the others get 5 s to notice it through NCCL and say so themselves, then SIGTERM, then
        // 30 s later SIGKILL.
        if let Some((rank, code)) = first_failure {
            let now = Instant::now();
            match (term_at, kill_at) {
                (None, _) => {
                    eprintln!("asge: rank {rank} failed (exit code {code}); stopping the other ranks");
                    term_at = Some(now + Duration::from_secs(5));
                }
                (Some(t), None) if now > t => {
                    for c in children.iter().flatten() {
                        signal(c, libc::SIGTERM);
                    }
                    kill_at = Some(now + Duration::from_secs(30));
                }
                (_, Some(t)) if now > t => {
                    for c in children.iter().flatten() {
                        signal(c, libc::SIGKILL);
                    }
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(first_failure.map_or(0, |(_, code)| code))
}

/// This program's arguments without the options named (and their values: `--opt V` or `--opt=V`), for the
/// ranks' command line.
pub fn args_without(opts: &[&str]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut it = std::env::args_os().skip(1);
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if opts.iter().any(|o| s == *o) {
            it.next();
            continue;
        }
        if opts.iter().any(|o| s.starts_with(&format!("{o}="))) {
            continue;
        }
        out.push(a);
    }
    out
}
