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

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a child this process started and has not reaped (its waiter only watches, WNOWAIT), so the
    // pid is still this child's, even once it exited.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Blocks until child `pid` has exited, leaving it unreaped (a zombie keeps its pid), so that the launcher learns of
/// each exit the moment it happens and still signals only its own children.
fn watch_exit(pid: u32) {
    loop {
        // SAFETY: waitid(2) with WNOWAIT on our own child; `info` is an out-parameter.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return;
        }
    }
}

/// The exit code a shell would report: the process's own, or 128 + the signal that killed it.
fn code_of(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(1))
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
    let mut children: Vec<Child> = Vec::new();
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
            Ok(c) => children.push(c),
            Err(e) => {
                for c in &mut children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(e).with_context(|| format!("--nproc: starting rank {rank} ({})", exe.display()));
            }
        }
    }
    // One watcher per rank reports its exit the moment it happens, so the first failure is the first in time; the
    // launcher reaps it only then.
    let pids: Vec<u32> = children.iter().map(Child::id).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for (rank, &pid) in pids.iter().enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            watch_exit(pid);
            let _ = tx.send(rank);
        });
    }
    drop(tx);
    // After a signal was forwarded, a rank that stops for it (exit 128 + SIGHUP, SIGINT or SIGTERM) did what it
    // was asked: its code is returned, but it does not make the launcher stop the others.
    let mut signalled: Option<i32> = None;
    let mut running: Vec<bool> = vec![true; n];
    let to_running = |running: &[bool], sig: i32| {
        for (rank, _) in running.iter().enumerate().filter(|(_, r)| **r) {
            signal(pids[rank], sig);
        }
    };
    let mut first_failure: Option<(usize, i32)> = None;
    let mut forwarded = false;
    let (mut term_at, mut kill_at): (Option<Instant>, Option<Instant>) = (None, None);
    while running.iter().any(|r| *r) {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(rank) => {
                running[rank] = false;
                let status = children[rank].wait();
                let code = status.map(code_of).with_context(|| format!("--nproc: waiting for rank {rank}"))?;
                if forwarded && [129, 130, 143].contains(&code) {
                    signalled.get_or_insert(code);
                } else if code != 0 && first_failure.is_none() {
                    eprintln!("asge: rank {rank} failed (exit code {code})");
                    first_failure = Some((rank, code));
                }
                continue;
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
        // A signal to the launcher: every rank gets SIGTERM once (each checkpoints and stops at the same step).
        if crate::train::run::was_interrupted() && !forwarded {
            forwarded = true;
            to_running(&running, libc::SIGTERM);
        }
        // A failed rank: the others get 5 s to notice it through NCCL and say so themselves, then SIGTERM, then
        // 30 s later SIGKILL.
        if first_failure.is_some() {
            let now = Instant::now();
            match (term_at, kill_at) {
                (None, _) => {
                    eprintln!("asge: stopping the other ranks");
                    term_at = Some(now + Duration::from_secs(5));
                }
                (Some(t), None) if now > t => {
                    to_running(&running, libc::SIGTERM);
                    kill_at = Some(now + Duration::from_secs(30));
                }
                (_, Some(t)) if now > t => to_running(&running, libc::SIGKILL),
                _ => {}
            }
        }
    }
    Ok(first_failure.map(|(_, code)| code).or(signalled).unwrap_or(0))
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
