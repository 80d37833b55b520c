//! Timing on the device: `--trace`'s per-op CUDA events, every kernel of a step timed alone (`asge bench`'s kernel
//! table), event-timed repetitions for `asge bench`, and the vendor ceilings (cuBLAS SGEMM and HGEMM on random data, a device copy) that the bench compares against.
//! Under the driver stand-in every time measures the host emulator, not a GPU; the bench labels it so.

use super::{drv, CudaBackend};
use crate::backend::KernelTime;
use crate::trace::DeviceSpan;
use anyhow::{bail, Result};
use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
use cudarc::driver::CudaEvent;

/// What the GPU reaches through vendor libraries (see [`CudaBackend::ceilings`]).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct GpuCeilings {
    pub sgemm_gflops: f64,
    pub hgemm_gflops: f64,
    pub copy_gbs: f64,
}

/// What one launch must do at the least: its useful FLOPs (the GEMMs' `2 M N K` with the real K, not the padded
/// one; 0 for the kernels that only move data) and the bytes it must move (each operand read once and each
/// result written once, at the precision it is stored in, split-K and pixel-slice partials included). A kernel
/// table's rates divide these by the measured time; `tools/perf_model.py` computes the same two numbers from
/// the shapes alone, and the GPU check compares them row by row.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Work {
    pub flop: f64,
    pub bytes: f64,
}

impl Work {
    /// A GEMM: `flop` useful FLOPs, `bytes` moved.
    pub fn gemm(flop: f64, bytes: f64) -> Work {
        Work { flop, bytes }
    }

    /// A kernel that moves `bytes` (its arithmetic is not what bounds it).
    pub fn bytes(bytes: f64) -> Work {
        Work { flop: 0.0, bytes }
    }
}

/// Every launch timed since [`CudaBackend::time_kernels`] turned kernel timing on.
pub(super) type KernelLog = Vec<(&'static str, usize, Work, CudaEvent, CudaEvent)>;

#[derive(Default)]
pub(super) struct TimedOps {
    origin: Option<CudaEvent>,
    ops: Vec<(&'static str, usize, CudaEvent, CudaEvent)>,
}

/// At most this many ops are timed between two `take_device_spans` calls (events are a resource).
const MAX_TIMED_OPS: usize = 20_000;

/// Records an op's end event when dropped (see [`CudaBackend::time_op`]).
pub(crate) struct OpTimer<'a> {
    be: &'a CudaBackend,
    start: Option<(CudaEvent, &'static str, usize)>,
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        if let Some((start, name, lane)) = self.start.take() {
            if let Ok(end) = self.be.streams[lane].record_event(Some(CU_EVENT_DEFAULT)) {
                self.be.timed.lock().unwrap().ops.push((name, lane, start, end));
            }
        }
    }
}

impl CudaBackend {
    /// Times the op issued until the returned guard drops, with CUDA events on the current lane's stream,
    /// when `--trace` is on (a no-op otherwise).
    pub(crate) fn time_op(&self, name: &'static str) -> OpTimer<'_> {
        if !crate::trace::is_on() {
            return OpTimer { be: self, start: None };
        }
        let lane = self.lane_index();
        let mut timed = self.timed.lock().unwrap();
        if timed.ops.len() >= MAX_TIMED_OPS {
            return OpTimer { be: self, start: None };
        }
        if timed.origin.is_none() {
            timed.origin = self.streams[0].record_event(Some(CU_EVENT_DEFAULT)).ok();
        }
        drop(timed);
        let start = self.streams[lane].record_event(Some(CU_EVENT_DEFAULT)).ok().map(|e| (e, name, lane));
        OpTimer { be: self, start }
    }

    /// Turns kernel timing on or off (see [`crate::backend::Schedule::time_kernels`]); turning it on drops what
    /// an earlier timing left untaken.
    pub(super) fn set_kernel_timing(&self, on: bool) {
        *self.kernel_log.lock().unwrap() = on.then(Vec::new);
        self.kernel_timing.store(on, std::sync::atomic::Ordering::Relaxed);
    }

    pub(super) fn kernel_timing(&self) -> bool {
        self.kernel_timing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Launches one kernel through `go` with events around it when kernel timing is on, then waits for it, so
    /// that it runs alone on the GPU and its time is its own (no other lane's kernel beside it, no queue ahead of
    /// it). `layer` is where the launch belongs (the trainer's site, 1-based).
    pub(super) fn timed_launch(
        &self,
        kernel: &'static str,
        layer: usize,
        work: Work,
        go: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let stream = self.stream();
        let start = drv(stream.record_event(Some(CU_EVENT_DEFAULT)), "event")?;
        go()?;
        let end = drv(stream.record_event(Some(CU_EVENT_DEFAULT)), "event")?;
        drv(stream.synchronize(), "synchronize")?;
        if let Some(log) = self.kernel_log.lock().unwrap().as_mut() {
            log.push((kernel, layer, work, start, end));
        }
        Ok(())
    }

    /// The kernels timed since kernel timing was turned on or last taken, in launch order.
    pub(super) fn kernel_times(&self) -> Result<Vec<KernelTime>> {
        let log = std::mem::take(self.kernel_log.lock().unwrap().get_or_insert_with(Vec::new));
        log.into_iter()
            .map(|(kernel, layer, w, start, end)| {
                Ok(KernelTime {
                    kernel,
                    layer,
                    us: drv(start.elapsed_ms(&end), "event timing")? as f64 * 1e3,
                    flop: w.flop,
                    bytes: w.bytes,
                })
            })
            .collect()
    }

    /// The ops timed since the last call, on the device's clock.
    pub(super) fn device_spans(&self) -> Result<Vec<DeviceSpan>> {
        let mut timed = self.timed.lock().unwrap();
        let ops = std::mem::take(&mut timed.ops);
        let Some(origin) = timed.origin.as_ref() else { return Ok(Vec::new()) };
        ops.into_iter()
            .map(|(name, lane, start, end)| {
                Ok(DeviceSpan {
                    name,
                    lane,
                    start_us: drv(origin.elapsed_ms(&start), "event timing")? as f64 * 1e3,
                    dur_us: drv(start.elapsed_ms(&end), "event timing")? as f64 * 1e3,
                })
            })
            .collect()
    }

    /// Milliseconds per call of `f` on the device, timed with CUDA events around `reps` calls after `warmup`.
    pub fn time_ms(&self, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..warmup {
            f()?;
        }
        for s in &self.streams {
            drv(s.synchronize(), "synchronize")?;
        }
        let t0 = drv(self.stream().record_event(Some(CU_EVENT_DEFAULT)), "event")?;
        for _ in 0..reps.max(1) {
            f()?;
        }
        let t1 = drv(self.stream().record_event(Some(CU_EVENT_DEFAULT)), "event")?;
        Ok(drv(t0.elapsed_ms(&t1), "event timing")? as f64 / reps.max(1) as f64)
    }

    /// The ceilings this GPU reaches through vendor libraries, measured now on random data (zeros would let
    /// the tensor cores' power management run them faster than real work): cuBLAS SGEMM (fp32, no TF32) and
    /// HGEMM (fp16 in, fp32 accumulate: the tensor cores) on 4096^3, and a 1 GiB device-to-device copy.
    pub fn ceilings(&self) -> Result<GpuCeilings> {
        use cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N;
        use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
        if self.is_standin() {
            bail!("no cuBLAS under the CUDA stand-in: the bench reports no vendor ceiling");
        }
        // SAFETY: only tries to dlopen libcublas.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            bail!("cuBLAS (libcublas.so.13) cannot be loaded: no GEMM ceiling");
        }
        let blas = CudaBlas::new(self.stream().clone()).map_err(|e| anyhow::anyhow!("cuBLAS: {e:?}"))?;
        let n = 4096usize;
        let flop = 2.0 * (n * n * n) as f64;
        let ni = n as i32;
        let random = |seed: u64| -> Vec<f32> {
            let mut r = crate::rng::Rng::new(seed);
            (0..n * n).map(|_| r.normal() as f32).collect()
        };
        let (ha, hb) = (random(1), random(2));
        let a = drv(self.stream().clone_htod(&ha), "copy")?;
        let b = drv(self.stream().clone_htod(&hb), "copy")?;
        let mut c = self.alloc_f32(n * n)?;
        let cfg = GemmConfig {
            transa: CUBLAS_OP_N,
            transb: CUBLAS_OP_N,
            m: ni,
            n: ni,
            k: ni,
            alpha: 1.0f32,
            lda: ni,
            ldb: ni,
            beta: 0.0f32,
            ldc: ni,
        };
        // SAFETY: three n x n buffers; column-major n x n GEMM.
        let sgemm = self.time_ms(2, 10, || {
            unsafe { blas.gemm(cfg, &a, &b, &mut c) }.map_err(|e| anyhow::anyhow!("cuBLAS sgemm: {e:?}"))
        })?;
        let half = |v: &[f32]| v.iter().map(|&x| half::f16::from_f32(x)).collect::<Vec<_>>();
        let ah = drv(self.stream().clone_htod(&half(&ha)), "copy")?;
        let bh = drv(self.stream().clone_htod(&half(&hb)), "copy")?;
        let mut ch = drv(self.stream().alloc_zeros::<half::f16>(n * n), "alloc")?;
        let hcfg = GemmConfig {
            transa: CUBLAS_OP_N,
            transb: CUBLAS_OP_N,
            m: ni,
            n: ni,
            k: ni,
            alpha: half::f16::ONE,
            lda: ni,
            ldb: ni,
            beta: half::f16::ZERO,
            ldc: ni,
        };
        // SAFETY: three n x n half buffers.
        let hgemm = self.time_ms(2, 10, || {
            unsafe { blas.gemm(hcfg, &ah, &bh, &mut ch) }.map_err(|e| anyhow::anyhow!("cuBLAS hgemm: {e:?}"))
        })?;
        let words = 256usize << 20;
        let src = self.alloc_f32(words)?;
        let mut dst = self.alloc_f32(words)?;
        let copy = self.time_ms(1, 5, || drv(self.stream().memcpy_dtod(&src, &mut dst), "copy"))?;
        Ok(GpuCeilings {
            sgemm_gflops: flop / (sgemm * 1e-3) / 1e9,
            hgemm_gflops: flop / (hgemm * 1e-3) / 1e9,
            copy_gbs: (2 * 4 * words) as f64 / (copy * 1e-3) / 1e9,
        })
    }
}
