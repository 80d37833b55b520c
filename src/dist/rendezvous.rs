//! The rendezvous: rank 0's 128-byte NCCL id reaches every other rank, over TCP (rank 0 listens, the others
//! connect) or through a file on a shared file system. Every wait is bounded and its error names the address.

use super::{Launcher, World};
use anyhow::{bail, ensure, Context, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Where the ranks meet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rendezvous {
    /// Rank 0 listens on the port; the others connect to the host.
    Tcp { host: String, port: u16 },
    /// Rank 0 writes the id into the file; the others read it.
    File(PathBuf),
}

impl std::fmt::Display for Rendezvous {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rendezvous::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            Rendezvous::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// Parses `--rendezvous`: `tcp:HOST:PORT` or `file:PATH`.
pub fn parse(s: &str) -> Result<Rendezvous> {
    if let Some(p) = s.strip_prefix("file:") {
        ensure!(!p.is_empty(), "--rendezvous file:PATH: the path is empty");
        return Ok(Rendezvous::File(PathBuf::from(p)));
    }
    if let Some(hp) = s.strip_prefix("tcp:") {
        let (host, port) = hp.rsplit_once(':').with_context(|| format!("--rendezvous {s}: expected tcp:HOST:PORT"))?;
        let port: u16 = port.parse().ok().filter(|&p| p > 0).with_context(|| format!("--rendezvous {s}: bad port"))?;
        ensure!(!host.is_empty(), "--rendezvous {s}: the host is empty");
        return Ok(Rendezvous::Tcp { host: host.to_string(), port });
    }
    bail!("--rendezvous {s}: expected tcp:HOST:PORT or file:PATH")
}

/// The rendezvous when `--rendezvous` is not given: under torchrun, whose own store already serves
/// `MASTER_ADDR:MASTER_PORT`, a file in the temporary folder named from torchrun's run id and port (one
/// machine; across machines give `--rendezvous`); otherwise TCP on `MASTER_ADDR:MASTER_PORT`.
pub fn default_for(world: &World) -> Result<Rendezvous> {
    let (host, port) = world.master.clone().with_context(|| {
        format!(
            "{}: MASTER_ADDR and MASTER_PORT are not set; export them (the address of rank 0's machine and a free \
             port) or give --rendezvous tcp:HOST:PORT or file:PATH",
            world.launcher.name()
        )
    })?;
    if world.launcher == Launcher::Torchrun {
        let run = std::env::var("TORCHELASTIC_RUN_ID").unwrap_or_else(|_| "none".into());
        let run: String = run.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        return Ok(Rendezvous::File(std::env::temp_dir().join(format!("asge-rendezvous-{run}-{port}"))));
    }
    Ok(Rendezvous::Tcp { host, port })
}

const MAGIC: &[u8; 8] = b"asgerdv1";

/// What identifies one job's ranks to each other: the world size and the launcher's job marks, so that a file
/// or a listener of another job is never taken for this one's.
pub fn job_key(world: &World) -> String {
    let mut k = format!("world={}", world.size);
    for v in [
        "TORCHELASTIC_RUN_ID",
        "TORCHELASTIC_RESTART_COUNT",
        "SLURM_JOB_ID",
        "SLURM_STEP_ID",
        "OMPI_MCA_ess_base_jobid",
    ] {
        if let Ok(x) = std::env::var(v) {
            k += &format!(" {v}={x}");
        }
    }
    if let Some((a, p)) = &world.master {
        k += &format!(" master={a}:{p}");
    }
    k
}

/// Hands rank 0's id (`make_id`, called on rank 0 only) to every rank. Within `timeout`, or an error naming
/// the address and what did not arrive.
pub fn exchange(
    r: &Rendezvous,
    world: &World,
    timeout: Duration,
    make_id: impl FnOnce() -> Result<[u8; 128]>,
) -> Result<[u8; 128]> {
    let key = job_key(world);
    match r {
        Rendezvous::Tcp { host, port } => {
            if world.rank == 0 {
                serve_tcp(*port, world.size, &key, make_id()?, timeout)
            } else {
                fetch_tcp(host, *port, world.rank, &key, timeout)
            }
        }
        Rendezvous::File(p) => {
            if world.rank == 0 {
                let id = make_id()?;
                let mut bytes = MAGIC.to_vec();
                bytes.extend_from_slice(&id);
                bytes.extend_from_slice(key.as_bytes());
                crate::files::write_atomic(p, &bytes)
                    .with_context(|| format!("--rendezvous file:{}: cannot write the id", p.display()))?;
                Ok(id)
            } else {
                fetch_file(p, &key, timeout)
            }
        }
    }
}

/// Rank 0, after every rank joined NCCL: the rendezvous file is no longer needed.
pub fn finish(r: &Rendezvous, world: &World) {
    if let (Rendezvous::File(p), 0) = (r, world.rank) {
        let _ = std::fs::remove_file(p);
    }
}

fn serve_tcp(port: u16, size: usize, key: &str, id: [u8; 128], timeout: Duration) -> Result<[u8; 128]> {
    let l = TcpListener::bind(("0.0.0.0", port)).with_context(|| {
        format!(
            "rank 0 cannot listen on port {port} for the other ranks (MASTER_PORT); is it in use? Pick another \
             MASTER_PORT, or give --rendezvous file:PATH"
        )
    })?;
    l.set_nonblocking(true).context("rendezvous listener")?;
    let start = Instant::now();
    let mut joined = vec![false; size];
    joined[0] = true;
    while joined.iter().any(|j| !j) {
        match l.accept() {
            Ok((mut s, from)) => {
                s.set_nonblocking(false).context("rendezvous connection")?;
                s.set_read_timeout(Some(Duration::from_secs(10))).ok();
                // A rank says its number and the job key; a stranger (a port scan, another job) is turned away.
                let mut hdr = [0u8; 12];
                if s.read_exact(&mut hdr).is_err() || &hdr[..8] != MAGIC {
                    continue;
                }
                let rank = u32::from_le_bytes(hdr[8..12].try_into().unwrap()) as usize;
                let mut len = [0u8; 4];
                if s.read_exact(&mut len).is_err() {
                    continue;
                }
                let mut k = vec![0u8; (u32::from_le_bytes(len) as usize).min(4096)];
                if s.read_exact(&mut k).is_err() {
                    continue;
                }
                if k != key.as_bytes() {
                    let _ = s.write_all(b"N");
                    eprintln!(
                        "rank 0: a connection from {from} for another job ({}; this one is {key}), ignored",
                        String::from_utf8_lossy(&k)
                    );
                    continue;
                }
                if rank == 0 || rank >= size {
                    let _ = s.write_all(b"N");
                    continue;
                }
                let mut reply = vec![b'Y'];
                reply.extend_from_slice(&id);
                s.write_all(&reply).with_context(|| format!("rendezvous: sending the id to rank {rank} ({from})"))?;
                joined[rank] = true;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if start.elapsed() > timeout {
                    let missing: Vec<String> =
                        joined.iter().enumerate().filter(|(_, j)| !**j).map(|(r, _)| r.to_string()).collect();
                    bail!(
                        "rank 0 waited {} s on port {port} and rank(s) {} never connected (--timeout)",
                        timeout.as_secs(),
                        missing.join(", ")
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e).context("rendezvous: accepting a rank"),
        }
    }
    Ok(id)
}

fn fetch_tcp(host: &str, port: u16, rank: usize, key: &str, timeout: Duration) -> Result<[u8; 128]> {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() <= timeout {
        let addrs: Vec<_> = match (host, port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                last = format!("cannot resolve {host}: {e}");
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        for a in addrs {
            let Ok(mut s) = TcpStream::connect_timeout(&a, Duration::from_secs(2)) else {
                last = format!("nothing listens on {a}");
                continue;
            };
            s.set_read_timeout(Some(timeout.saturating_sub(start.elapsed()).max(Duration::from_secs(1)))).ok();
            let mut msg = MAGIC.to_vec();
            msg.extend_from_slice(&(rank as u32).to_le_bytes());
            msg.extend_from_slice(&(key.len() as u32).to_le_bytes());
            msg.extend_from_slice(key.as_bytes());
            if let Err(e) = s.write_all(&msg) {
                last = format!("{a}: {e}");
                continue;
            }
            let mut ok = [0u8; 1];
            if s.read_exact(&mut ok).is_err() {
                last = format!("{a} closed the connection");
                continue;
            }
            if ok[0] != b'Y' {
                bail!("rank {rank}: {host}:{port} answered, but for another job (MASTER_ADDR/MASTER_PORT of another run?)");
            }
            let mut id = [0u8; 128];
            s.read_exact(&mut id).with_context(|| format!("rank {rank}: reading the id from {a}"))?;
            return Ok(id);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("rank {rank}: rank 0 did not answer on {host}:{port} within {} s ({last}; --timeout)", timeout.as_secs())
}

fn fetch_file(p: &std::path::Path, key: &str, timeout: Duration) -> Result<[u8; 128]> {
    let start = Instant::now();
    loop {
        if let Ok(b) = std::fs::read(p) {
            if b.len() >= 136 && &b[..8] == MAGIC && &b[136..] == key.as_bytes() {
                return Ok(b[8..136].try_into().unwrap());
            }
        }
        if start.elapsed() > timeout {
            bail!(
                "rank 0's id did not appear in {} within {} s (is rank 0 running, and the file on a file system \
                 every rank sees? --timeout)",
                p.display(),
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_kinds() {
        assert_eq!(parse("tcp:node1:29500").unwrap(), Rendezvous::Tcp { host: "node1".into(), port: 29500 });
        assert_eq!(parse("file:/shared/x").unwrap(), Rendezvous::File("/shared/x".into()));
        for bad in ["tcp:node1", "tcp::5", "tcp:h:0", "file:", "udp:x:1"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
