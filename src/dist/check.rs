//! `asge comm-check`: NCCL between the ranks of a launcher (or alone, a world of one), before a long run does it:
//! every rank all-reduces known values at a few sizes, checks the sums and maxima exactly, and times the
//! all-reduce (bus bandwidth as nccl-tests reports it: `2 (n - 1) / n` times the bytes over the time).
//! Rank 0 prints; a rank whose result is wrong says so and the command fails.

use super::nccl::Reduce;
use super::World;
use anyhow::{bail, ensure, Result};
use cudarc::driver::DevicePtrMut;
use std::time::{Duration, Instant};

pub struct CheckOptions {
    /// Values per all-reduce (f32), one check each.
    pub sizes: Vec<usize>,
    /// Timed all-reduces at the largest size.
    pub iters: usize,
    pub rendezvous: Option<String>,
    pub timeout: Duration,
}

/// The value rank `rank` contributes at index `i`: small integers, so every sum over up to 64 ranks is exact.
fn value(rank: usize, i: usize) -> f32 {
    ((i % 1021) as f32) * (rank + 1) as f32 - 500.0
}

pub fn run(o: &CheckOptions) -> Result<()> {
    let world = World::from_env()?.unwrap_or(World::alone());
    let (rank, size) = (world.rank, world.size);
    let say = |s: String| {
        if rank == 0 {
            println!("{s}");
        }
    };
    let group = super::group::join(&world, o.rendezvous.as_deref(), o.timeout)?;
    say(format!("NCCL: {} (NCCL {})", group.nccl.file, group.nccl.version));
    if size == 1 {
        say("1 rank(s) (alone: no launcher's variables), no rendezvous".into());
    } else {
        say(format!("{size} rank(s) ({}), rendezvous {}", world.launcher.name(), group.rendezvous));
    }
    let (comm, stream) = (&group.comm, &group.stream);
    let sync = |what: &str| -> Result<()> {
        stream.synchronize().map_err(|e| anyhow::anyhow!("{what}: {e:?}"))?;
        comm.async_error()?;
        group.beat();
        Ok(())
    };
    let mut wrong = Vec::new();
    for &n in &o.sizes {
        let host: Vec<f32> = (0..n).map(|i| value(rank, i)).collect();
        for (op, name) in [(Reduce::Sum, "sum"), (Reduce::Max, "max")] {
            let mut buf = stream.clone_htod(&host).map_err(|e| anyhow::anyhow!("upload ({e:?})"))?;
            {
                let (ptr, _sync) = buf.device_ptr_mut(stream);
                // SAFETY: `buf` holds n f32 values and nothing else uses it until the stream synchronises.
                unsafe { comm.all_reduce_raw::<f32>(ptr, n, op, stream.cu_stream()) }?;
            }
            sync("all-reduce")?;
            let got = stream.clone_dtoh(&buf).map_err(|e| anyhow::anyhow!("read back ({e:?})"))?;
            let bad = (0..n)
                .find(|&i| {
                    let want = match op {
                        Reduce::Sum => (0..size).map(|r| value(r, i)).sum::<f32>(),
                        _ => (0..size).map(|r| value(r, i)).fold(f32::MIN, f32::max),
                    };
                    got[i].to_bits() != want.to_bits()
                })
                .map(|i| format!("{name} of {n} values: index {i} is {}", got[i]));
            wrong.extend(bad);
        }
        if !wrong.is_empty() {
            bail!("{}wrong all-reduce results: {}", world.prefix(), wrong.join("; "));
        }
        say(format!("  all-reduce of {n} f32 values: sum and max exact on rank 0"));
    }
    // Point to point (what layers placed on different GPUs pass on): every rank sends to the next one and receives
    // from the previous one, in one group, and checks what arrived.
    if size > 1 {
        let n = 1000;
        let (next, prev) = ((rank + 1) % size, (rank + size - 1) % size);
        let mine: Vec<f32> = (0..n).map(|i| value(rank, i)).collect();
        let out = stream.clone_htod(&mine).map_err(|e| anyhow::anyhow!("upload ({e:?})"))?;
        let mut inb = stream.alloc_zeros::<f32>(n).map_err(|e| anyhow::anyhow!("alloc ({e:?})"))?;
        {
            let (src, _s) = cudarc::driver::DevicePtr::device_ptr(&out, stream);
            let (dst, _d) = inb.device_ptr_mut(stream);
            let cs = stream.cu_stream();
            // SAFETY: both buffers hold n f32 values and nothing else uses them until the stream synchronises.
            comm.group(|| unsafe {
                comm.send_raw::<f32>(src, n, next, cs)?;
                comm.recv_raw::<f32>(dst, n, prev, cs)
            })?;
        }
        sync("send/receive")?;
        let got = stream.clone_dtoh(&inb).map_err(|e| anyhow::anyhow!("read back ({e:?})"))?;
        if let Some(i) = (0..n).find(|&i| got[i].to_bits() != value(prev, i).to_bits()) {
            bail!("{}wrong values from rank {prev} (send/receive): index {i} is {}", world.prefix(), got[i]);
        }
        say(format!("  send/receive of {n} f32 values around the ring: exact on rank 0"));
    }
    let n = o.sizes.iter().copied().max().unwrap_or(0);
    if n > 0 && o.iters > 0 {
        let mut buf = stream.alloc_zeros::<f32>(n).map_err(|e| anyhow::anyhow!("alloc ({e:?})"))?;
        let t = Instant::now();
        for _ in 0..o.iters {
            let (ptr, _sync) = buf.device_ptr_mut(stream);
            // SAFETY: `buf` holds n f32 values, used only by these collectives, in order on one stream.
            unsafe { comm.all_reduce_raw::<f32>(ptr, n, Reduce::Sum, stream.cu_stream()) }?;
        }
        sync("timed all-reduces")?;
        let s = t.elapsed().as_secs_f64() / o.iters as f64;
        let bytes = 4.0 * n as f64;
        let bus = if size > 1 { 2.0 * (size - 1) as f64 / size as f64 * bytes / s } else { bytes / s };
        let what =
            if crate::backend::cuda::standin::active() { " (the stand-in: host memory, not a GPU link)" } else { "" };
        say(format!(
            "  {} all-reduces of {:.3} MB: {:.3} ms each, bus bandwidth {:.2} GB/s{what}",
            o.iters,
            bytes / 1e6,
            s * 1e3,
            bus / 1e9
        ));
    }
    ensure!(group.failure().is_none(), "{}", group.failure().unwrap_or_default());
    say(format!("comm-check: ok on {size} rank(s)"));
    drop(group);
    super::group::leave();
    Ok(())
}
