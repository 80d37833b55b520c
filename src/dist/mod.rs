//! Many processes, one GPU each: the ranks a launcher started ([`World::from_env`]), the rendezvous that hands
//! NCCL's id from rank 0 to the others ([`rendezvous`]), NCCL itself ([`nccl`]), and `asge train --nproc N`, which
//! starts the ranks of one machine itself ([`launch`]). docs/many-gpus.md tells the whole story.

#[cfg(feature = "cuda")]
pub mod check;
#[cfg(feature = "cuda")]
pub mod group;
pub mod launch;
pub mod layers;
#[cfg(feature = "cuda")]
pub mod nccl;
pub mod rendezvous;

use anyhow::{bail, Context, Result};
#[cfg(feature = "cuda")]
use std::sync::atomic::{AtomicBool, Ordering};
#[cfg(feature = "cuda")]
use std::sync::{Arc, Mutex};
#[cfg(feature = "cuda")]
use std::time::{Duration, Instant};

/// What started the ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    /// torchrun (or anything setting torch's variables: `RANK`, `WORLD_SIZE`, ...).
    Torchrun,
    /// `asge train --nproc N`.
    Nproc,
    /// Slurm's `srun`.
    Slurm,
    /// Open MPI's `mpirun`.
    OpenMpi,
}

impl Launcher {
    pub fn name(self) -> &'static str {
        match self {
            Launcher::Torchrun => "torchrun",
            Launcher::Nproc => "--nproc",
            Launcher::Slurm => "Slurm",
            Launcher::OpenMpi => "Open MPI",
        }
    }
}

/// This process's place among the ranks of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// Its rank on this machine: the GPU it uses.
    pub local_rank: usize,
    /// The ranks on this machine.
    pub local_size: usize,
    pub launcher: Launcher,
    /// `MASTER_ADDR:MASTER_PORT`, where the launcher put it.
    pub master: Option<(String, u16)>,
}

/// The variable that marks the ranks `--nproc` started (torch's variables are set too).
pub const NPROC_VAR: &str = "ASGE_LAUNCHED_BY";

fn var(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

fn number(name: &str) -> Result<Option<usize>> {
    match var(name) {
        None => Ok(None),
        Some(v) => {
            v.trim().parse().map(Some).with_context(|| format!("the launcher's {name}={v:?} is not a whole number"))
        }
    }
}

/// The leading count of Slurm's `SLURM_TASKS_PER_NODE` (`4(x2),3` means 4 on this kind of node).
fn slurm_tasks_per_node() -> Option<usize> {
    let v = var("SLURM_TASKS_PER_NODE")?;
    v.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()
}

impl World {
    /// The ranks from the launcher's variables: torch's (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
    /// `MASTER_ADDR`, `MASTER_PORT`, set by torchrun and by `--nproc`), else Open MPI's, else Slurm's. `None` for
    /// one process (no launcher, or a world of one). Inconsistent variables are an error naming them.
    pub fn from_env() -> Result<Option<World>> {
        let (launcher, rank, size, local_rank, local_size) = if let Some(rank) = number("RANK")? {
            let size = number("WORLD_SIZE")?.context("the launcher set RANK but not WORLD_SIZE")?;
            let launcher =
                if var(NPROC_VAR).as_deref() == Some("nproc") { Launcher::Nproc } else { Launcher::Torchrun };
            let local_rank = number("LOCAL_RANK")?.unwrap_or(rank);
            let local_size = number("LOCAL_WORLD_SIZE")?.unwrap_or(size);
            (launcher, rank, size, local_rank, local_size)
        } else if let Some(rank) = number("OMPI_COMM_WORLD_RANK")? {
            let size = number("OMPI_COMM_WORLD_SIZE")?.context("OMPI_COMM_WORLD_RANK is set but not _SIZE")?;
            let local_rank = number("OMPI_COMM_WORLD_LOCAL_RANK")?.unwrap_or(0);
            let local_size = number("OMPI_COMM_WORLD_LOCAL_SIZE")?.unwrap_or(size);
            (Launcher::OpenMpi, rank, size, local_rank, local_size)
        } else if let Some(rank) = number("SLURM_PROCID")? {
            let size = number("SLURM_NTASKS")?.context("SLURM_PROCID is set but not SLURM_NTASKS")?;
            let local_rank = number("SLURM_LOCALID")?.unwrap_or(0);
            // The ranks on this machine: Slurm's count for the first kind of node, at least this rank's.
            let local_size = slurm_tasks_per_node().unwrap_or(size).max(local_rank + 1);
            (Launcher::Slurm, rank, size, local_rank, local_size)
        } else {
            return Ok(None);
        };
        let who = launcher.name();
        if size == 0 || rank >= size {
            bail!("{who}: rank {rank} of a world of {size}");
        }
        if local_size == 0 || local_rank >= local_size.max(1) {
            bail!("{who}: local rank {local_rank} of {local_size} ranks on this machine");
        }
        if size == 1 {
            return Ok(None);
        }
        let master = match (var("MASTER_ADDR"), var("MASTER_PORT")) {
            (Some(a), Some(p)) => {
                let port =
                    p.trim().parse().with_context(|| format!("MASTER_PORT={p:?} is not a port number (1 to 65535)"))?;
                if port == 0 {
                    bail!("MASTER_PORT=0 is not a port number (1 to 65535)");
                }
                Some((a.trim().to_string(), port))
            }
            (None, None) => None,
            (Some(_), None) => bail!("{who}: MASTER_ADDR is set but not MASTER_PORT"),
            (None, Some(_)) => bail!("{who}: MASTER_PORT is set but not MASTER_ADDR"),
        };
        Ok(Some(World { rank, size, local_rank, local_size, launcher, master }))
    }

    /// One process alone (a world of one, rank 0).
    pub fn alone() -> World {
        World { rank: 0, size: 1, local_rank: 0, local_size: 1, launcher: Launcher::Nproc, master: None }
    }

    /// How the rank's messages begin: `rank 2: `.
    pub fn prefix(&self) -> String {
        format!("rank {}: ", self.rank)
    }
}

/// This process's rank and the number of ranks: `(0, 1)` for a process alone.
pub fn place() -> (usize, usize) {
    #[cfg(feature = "cuda")]
    if let Some(g) = group::current() {
        return (g.world.rank, g.world.size);
    }
    (0, 1)
}

/// Rank `rank`'s share of `len` items split over `ranks` as evenly as possible (the first `len % ranks` ranks
/// get one more), as a range: the shares are contiguous and in rank order.
pub fn share(len: usize, ranks: usize, rank: usize) -> std::ops::Range<usize> {
    let (base, extra) = (len / ranks.max(1), len % ranks.max(1));
    let first = rank * base + rank.min(extra);
    first..first + base + usize::from(rank < extra)
}

/// Progress, for the watchdog of the process's rank (a no-op for a process alone): a step, a batch or a
/// collective finished.
pub fn beat() {
    #[cfg(feature = "cuda")]
    group::beat();
}

/// `--timeout`'s default in seconds: how long a rank waits for the others (at the rendezvous, in a collective)
/// before it gives up with an error.
pub const DEFAULT_TIMEOUT_S: u64 = 600;

/// Watches a communicator from a thread of its own: an asynchronous error (a peer gone, a network failure) or no
/// progress ([`Watchdog::beat`]) for `timeout` aborts the communicator, which releases whatever waits on it; if
/// the process has not finished 10 s later, the watchdog prints the reason and exits with code 1, so a rank
/// never hangs.
#[cfg(feature = "cuda")]
pub struct Watchdog {
    state: Arc<DogState>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[cfg(feature = "cuda")]
struct DogState {
    last: Mutex<Instant>,
    stop: AtomicBool,
    failure: Mutex<Option<String>>,
}

#[cfg(feature = "cuda")]
impl Watchdog {
    pub fn start(comm: Arc<nccl::Comm>, timeout: Duration, rank: usize) -> Watchdog {
        let state = Arc::new(DogState {
            last: Mutex::new(Instant::now()),
            stop: AtomicBool::new(false),
            failure: Mutex::new(None),
        });
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            let tick = Duration::from_millis(100);
            let why = loop {
                if st.stop.load(Ordering::Relaxed) {
                    return;
                }
                if let Err(e) = comm.async_error() {
                    break format!("rank {rank}: {e:#}");
                }
                if st.last.lock().unwrap().elapsed() > timeout {
                    break format!(
                        "rank {rank}: no collective finished in {} s: another rank died or hangs (--timeout)",
                        timeout.as_secs()
                    );
                }
                std::thread::sleep(tick);
            };
            *st.failure.lock().unwrap() = Some(why.clone());
            comm.abort();
            for _ in 0..100 {
                if st.stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(tick);
            }
            eprintln!("asge: {why}; exiting");
            std::process::exit(1);
        });
        Watchdog { state, thread: Some(thread) }
    }

    /// Progress: a collective (or a step) finished.
    pub fn beat(&self) {
        *self.state.last.lock().unwrap() = Instant::now();
    }

    /// Why the watchdog aborted the communicator, if it did.
    pub fn failure(&self) -> Option<String> {
        self.state.failure.lock().unwrap().clone()
    }
}

#[cfg(feature = "cuda")]
impl Drop for Watchdog {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
