//! The process's place in a run of several ranks: NCCL's communicator, joined once ([`join`]) and then found by
//! the CUDA backend ([`current`]) and the trainer, with the watchdog that keeps a lost rank from hanging the
//! others. A process alone has none.

use super::nccl::{self, Comm, Nccl};
use super::rendezvous::{self, Rendezvous};
use super::{Watchdog, World};
use anyhow::{Context, Result};
use cudarc::driver::{CudaContext, CudaStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The communicator of the process's rank, and how it was made.
pub struct Group {
    pub world: World,
    pub comm: Arc<Comm>,
    pub nccl: &'static Nccl,
    /// Where the ranks met (`tcp:HOST:PORT`, `file:PATH`), or "none" for a world of one.
    pub rendezvous: String,
    pub timeout: Duration,
    /// The one stream every collective of the communicator runs on, in issue order (the same order on every
    /// rank), whichever backend issues it.
    pub stream: Arc<CudaStream>,
    dog: Watchdog,
}

static GROUP: Mutex<Option<Arc<Group>>> = Mutex::new(None);

/// Joins the ranks of `world` (every rank calls it; it returns once all have): device `cuda:LOCAL_RANK` made
/// current on this thread, NCCL loaded, the id handed from rank 0 through `rendezvous` (the launcher's default
/// when `None`), the communicator made and watched. Every wait is bounded by `timeout`.
pub fn join(world: &World, rendezvous: Option<&str>, timeout: Duration) -> Result<Arc<Group>> {
    let (rank, size) = (world.rank, world.size);
    crate::backend::cuda::probe().with_context(|| format!("cuda:{} (this rank's LOCAL_RANK)", world.local_rank))?;
    let ctx = CudaContext::new(world.local_rank)
        .map_err(|e| anyhow::anyhow!("cuda:{}: cannot create a context ({e:?})", world.local_rank))?;
    ctx.bind_to_thread().map_err(|e| anyhow::anyhow!("cuda:{}: cannot bind the context ({e:?})", world.local_rank))?;
    let nccl = nccl::load()?;
    let rdv = match rendezvous {
        Some(r) => rendezvous::parse(r)?,
        None if size == 1 => Rendezvous::File(Default::default()),
        None => rendezvous::default_for(world)?,
    };
    let id =
        if size == 1 { nccl.unique_id()? } else { rendezvous::exchange(&rdv, world, timeout, || nccl.unique_id())? };
    let comm = Arc::new(Comm::init(nccl, &id, rank, size)?);
    if size > 1 {
        rendezvous::finish(&rdv, world);
    }
    let stream =
        ctx.new_stream().map_err(|e| anyhow::anyhow!("cuda:{}: cannot create a stream ({e:?})", world.local_rank))?;
    let dog = Watchdog::start(comm.clone(), timeout, rank);
    let group = Arc::new(Group {
        world: world.clone(),
        comm,
        nccl,
        rendezvous: if size == 1 { "none".into() } else { rdv.to_string() },
        timeout,
        stream,
        dog,
    });
    *GROUP.lock().unwrap_or_else(|e| e.into_inner()) = Some(group.clone());
    Ok(group)
}

/// The group this process joined, if it did.
pub fn current() -> Option<Arc<Group>> {
    GROUP.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Leaves the group: its watchdog stops and the communicator is destroyed once nothing holds it.
pub fn leave() {
    GROUP.lock().unwrap_or_else(|e| e.into_inner()).take();
}

/// Progress, for the watchdog: a step or a collective finished (a no-op without a group).
pub fn beat() {
    if let Some(g) = current() {
        g.beat();
    }
}

impl Group {
    pub fn beat(&self) {
        self.dog.beat();
    }

    /// Why the watchdog aborted the communicator, if it did.
    pub fn failure(&self) -> Option<String> {
        self.dog.failure()
    }
}
