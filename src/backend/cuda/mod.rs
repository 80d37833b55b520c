//! The CUDA backend: hand-written kernels (`kernels/*.cu`) compiled at run time by NVRTC for the device's
//! architecture, launched through cudarc on one stream per lane (`ASGE_CUDA_LANES`), with the batch's input
//! staged through pinned host memory and copied on a stream of its own. Every library is opened at run time
//! (`dynamic-loading`), and [`CudaBackend::new`] probes for the driver, NVRTC and a device before the first
//! cudarc call, so a machine without them gets one clear error instead of cudarc's panic.
//!
//! Precision: buffers are [`CudaBuf`]s, f32 or fp16. [`CudaBackend::with_precision`] decides what
//! [`Backend::operand_zeros`] allocates; the conv ops and the layer output pick their kernel by the dtype of the
//! buffers they are given (`*_f32`, or `*_f16` on the tensor cores), and every other op is f32. Every op has a
//! parity test against the CPU reference in both precisions (`tests/cuda.rs`, ignored without a GPU).

pub mod nvrtc;
pub mod standin;

use super::{AdamWStep, Backend, ConvShape, DeviceSpan, Dropout, Precision, STATS_LEN};
use crate::model::{GoodnessReduce, PatchGrid, PoolKind};
use anyhow::{bail, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PinnedHostSlice, PushKernelArg};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Why CUDA cannot be used here, or `Ok(n)` devices. Never panics. With `ASGE_CUDA_STANDIN=1` it first loads
/// the driver stand-in ([`standin`]), or says why it cannot.
pub fn probe() -> Result<usize> {
    if standin::requested() {
        standin::load()?;
    }
    // SAFETY: is_culib_present only tries to dlopen the library; it calls no CUDA function.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        bail!("no CUDA driver (libcuda.so) on this machine");
    }
    if !nvrtc::available() {
        bail!("no NVRTC library (libnvrtc.so.13); put the CUDA toolkit's lib64 on LD_LIBRARY_PATH");
    }
    let n = CudaContext::device_count().map_err(|e| anyhow::anyhow!("the CUDA driver reports no device ({e:?})"))?;
    if n <= 0 {
        bail!("the CUDA driver reports no device");
    }
    Ok(n as usize)
}

/// Parses `cuda` or `cuda:N`.
pub fn parse_device(device: &str) -> Result<usize> {
    match device {
        "cuda" => Ok(0),
        d => d
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("--device {d}: expected cuda or cuda:N")),
    }
}

/// What the GPU reaches through vendor libraries (see [`CudaBackend::ceilings`]).
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct GpuCeilings {
    pub sgemm_gflops: f64,
    pub hgemm_gflops: f64,
    pub copy_gbs: f64,
}

/// A device buffer: f32, or fp16 (a conv operand in the fp16 path).
pub enum CudaBuf {
    F32(CudaSlice<f32>),
    F16(CudaSlice<half::f16>),
}

impl CudaBuf {
    pub fn len(&self) -> usize {
        match self {
            CudaBuf::F32(s) => s.len(),
            CudaBuf::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn precision(&self) -> Precision {
        match self {
            CudaBuf::F32(_) => Precision::F32,
            CudaBuf::F16(_) => Precision::F16,
        }
    }

    fn f32(&self, what: &str) -> Result<&CudaSlice<f32>> {
        match self {
            CudaBuf::F32(s) => Ok(s),
            CudaBuf::F16(_) => bail!("cuda backend: {what} is an fp16 buffer where the op reads f32"),
        }
    }

    fn f32_mut(&mut self, what: &str) -> Result<&mut CudaSlice<f32>> {
        match self {
            CudaBuf::F32(s) => Ok(s),
            CudaBuf::F16(_) => bail!("cuda backend: {what} is an fp16 buffer where the op writes f32"),
        }
    }

    fn f16(&self, what: &str) -> Result<&CudaSlice<half::f16>> {
        match self {
            CudaBuf::F16(s) => Ok(s),
            CudaBuf::F32(_) => bail!("cuda backend: {what} is an f32 buffer where the fp16 op reads fp16"),
        }
    }

    fn f16_mut(&mut self, what: &str) -> Result<&mut CudaSlice<half::f16>> {
        match self {
            CudaBuf::F16(s) => Ok(s),
            CudaBuf::F32(_) => bail!("cuda backend: {what} is an f32 buffer where the fp16 op writes fp16"),
        }
    }
}

pub struct CudaBackend {
    ordinal: usize,
    precision: Precision,
    name: String,
    ctx: Arc<CudaContext>,
    /// One stream per lane; lane 0 is the context's default stream.
    streams: Vec<Arc<CudaStream>>,
    /// The input uploads' stream (with several lanes; with one, lane 0's), and their two pinned staging buffers
    /// (the host fills one while the other's copy may still run); cudarc's per-buffer events order the copy before
    /// the kernels that read its target. With one lane there is no second stream on purpose: any second stream
    /// switches cudarc into multi-stream mode, which records an event per buffer per launch (host time on every
    /// op) to order streams that a single-lane schedule does not have.
    copy_stream: Option<Arc<CudaStream>>,
    staging: Mutex<Staging>,
    lane: std::sync::atomic::AtomicUsize,
    funcs: HashMap<&'static str, CudaFunction>,
    /// The fusion heads' `dL/ds`, grown on demand.
    head_scratch: Mutex<Option<CudaSlice<f32>>>,
    /// `read_many`'s gather buffer, grown on demand.
    gather_scratch: Mutex<Option<CudaSlice<f32>>>,
    /// The conv kernels' tap tables by (C_in, H, W) and cell tables by (H, W, P, mean), uploaded on first use.
    tap_tables: Tables<(usize, usize, usize), CudaSlice<i32>>,
    cell_tables: Tables<(usize, usize, usize, bool), CellTable>,
    /// The weight gradient's per-slice partial sums, one per lane (so lanes do not serialise on it).
    wgrad_scratch: Vec<Mutex<Option<CudaSlice<f32>>>>,
    /// With `--trace`: every op's start and end events, and the event all times are measured from.
    timed: Mutex<TimedOps>,
}

/// Device tables built once per shape and shared by every call (and lane) after.
type Tables<K, V> = Mutex<HashMap<K, Arc<V>>>;

/// A patch grid's cell table and divisors on the device (see `geometry::cell_table`).
type CellTable = (CudaSlice<i32>, CudaSlice<f32>);

#[derive(Default)]
struct Staging {
    f32: [Option<PinnedHostSlice<f32>>; 2],
    f16: [Option<PinnedHostSlice<half::f16>>; 2],
    next: usize,
}

/// `slot`, reallocated as `len` pinned values when it holds another length.
fn pinned<'a, T: cudarc::driver::DeviceRepr>(
    ctx: &Arc<CudaContext>,
    slot: &'a mut Option<PinnedHostSlice<T>>,
    len: usize,
) -> Result<&'a mut PinnedHostSlice<T>> {
    if slot.as_ref().is_none_or(|p| p.len() != len) {
        *slot = None;
        // SAFETY: the buffer is filled completely before its only use (one copy of `len` values).
        *slot = Some(drv(unsafe { ctx.alloc_pinned::<T>(len) }, "pinned host allocation")?);
    }
    Ok(slot.as_mut().unwrap())
}

#[derive(Default)]
struct TimedOps {
    origin: Option<cudarc::driver::CudaEvent>,
    ops: Vec<(&'static str, usize, cudarc::driver::CudaEvent, cudarc::driver::CudaEvent)>,
}

/// At most this many ops are timed between two [`Backend::take_device_spans`] calls (events are a resource).
const MAX_TIMED_OPS: usize = 20_000;

/// Records an op's end event when dropped (see [`CudaBackend::time_op`]).
struct OpTimer<'a> {
    be: &'a CudaBackend,
    start: Option<(cudarc::driver::CudaEvent, &'static str, usize)>,
}

impl Drop for OpTimer<'_> {
    fn drop(&mut self) {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        if let Some((start, name, lane)) = self.start.take() {
            if let Ok(end) = self.be.streams[lane].record_event(Some(CU_EVENT_DEFAULT)) {
                self.be.timed.lock().unwrap().ops.push((name, lane, start, end));
            }
        }
    }
}

/// A scratch buffer of at least `len` floats, reallocated when too small.
fn scratch<'a>(be: &CudaBackend, slot: &'a mut Option<CudaSlice<f32>>, len: usize) -> Result<&'a mut CudaSlice<f32>> {
    if slot.as_ref().is_none_or(|s| s.len() < len) {
        *slot = Some(be.alloc_f32(len)?);
    }
    Ok(slot.as_mut().unwrap())
}

/// Launch geometry of every kernel, as pure functions of the shapes: the backend launches with them, and the
/// host emulation of the kernels (tests/kernel_emulation.rs) runs the same grids.
pub mod geometry {
    use crate::backend::{ConvShape, Precision};
    use crate::model::{GoodnessReduce, PatchGrid};

    /// Threads per block of every kernel.
    pub const THREADS: u32 = 256;

    /// One thread per element.
    pub fn grid1(n: usize) -> (u32, u32, u32) {
        ((n as u32).div_ceil(THREADS).max(1), 1, 1)
    }

    /// The conv forward's kernel and its block tile (channels, pixels): 64 x 64 in f32; in f16 64 x 128, or
    /// 128 x 128 (twice the MMAs for each gathered tap) where there are at least 128 output channels and the
    /// larger tile still makes 256 blocks (two waves of 2 blocks on a 132-SM H100 / H200 would be ~264: the
    /// small late layers keep the smaller tile's parallelism; a heuristic for the GPU to confirm).
    pub fn conv_fwd_kernel(s: &ConvShape, p: Precision) -> (&'static str, u32, u32) {
        let n_tiles = (s.batch * s.h * s.w).div_ceil(128);
        match p {
            Precision::F32 => ("conv_goodness_fwd_f32", 64, 64),
            Precision::F16 if s.c_out >= 128 && n_tiles * s.c_out.div_ceil(128) >= 256 => CONV_FWD_F16[1],
            Precision::F16 => CONV_FWD_F16[0],
        }
    }

    /// The fp16 forward kernels: (name, channels, pixels) of their block tiles.
    pub const CONV_FWD_F16: [(&str, u32, u32); 2] =
        [("conv_goodness_fwd_f16", 64, 128), ("conv_goodness_fwd_f16_m128", 128, 128)];

    /// The conv forward's grid for a block tile of `tile_m` channels x `tile_n` pixels.
    pub fn conv_fwd_grid(s: &ConvShape, tile_m: u32, tile_n: u32) -> (u32, u32, u32) {
        let n = (s.batch * s.h * s.w) as u32;
        (n.div_ceil(tile_n), (s.c_out as u32).div_ceil(tile_m), 1)
    }

    /// The conv forward's grid: one block per tile of [`conv_fwd_kernel`].
    pub fn conv_fwd(s: &ConvShape, p: Precision) -> (u32, u32, u32) {
        let (_, tile_m, tile_n) = conv_fwd_kernel(s, p);
        conv_fwd_grid(s, tile_m, tile_n)
    }

    /// The weight gradient's split: blocks of 64 channels x 64 (f32), 128 or 256 (f16) taps, and the pixels cut into
    /// `slices` slices of `chunk` (a multiple of the kernel's pixel step) so that at least ~512 blocks run.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct WgradSplit {
        pub grid: (u32, u32, u32),
        pub chunk: usize,
        pub slices: usize,
    }

    /// The fp16 weight-gradient kernels: (name, taps, pixels a step) of their block tiles (64 channels each).
    pub const WGRAD_F16: [(&str, usize, usize); 2] =
        [("conv_goodness_wgrad_f16", 128, 32), ("conv_goodness_wgrad_f16_n256", 256, 16)];

    /// The weight gradient's kernel: in f16 the 256-tap tile (half the dz work per MMA) from K = 1024 on, where
    /// rounding K up to it wastes at most ~11% of the MMAs; the 128-tap tile below.
    pub fn wgrad_kernel(s: &ConvShape, p: Precision) -> (&'static str, usize, usize) {
        match p {
            Precision::F32 => ("conv_goodness_wgrad_f32", 64, 16),
            Precision::F16 if s.c_in * 9 >= 1024 => WGRAD_F16[1],
            Precision::F16 => WGRAD_F16[0],
        }
    }

    pub fn wgrad(s: &ConvShape, p: Precision) -> WgradSplit {
        let (_, tile_k, step) = wgrad_kernel(s, p);
        wgrad_split(s, tile_k, step)
    }

    /// The split for a block tile of 64 channels x `tile_k` taps walking the pixels `step` at a time.
    pub fn wgrad_split(s: &ConvShape, tile_k: usize, step: usize) -> WgradSplit {
        let n = s.batch * s.h * s.w;
        let k = s.c_in * 9;
        let (gx, gy) = (k.div_ceil(tile_k) as u32, s.c_out.div_ceil(64) as u32);
        let want_z = (512 / (gx * gy) as usize).max(1);
        let chunk = n.div_ceil(want_z).next_multiple_of(step).max(256);
        let slices = n.div_ceil(chunk);
        WgradSplit { grid: (gx, gy, slices as u32), chunk, slices }
    }

    /// The conv GEMMs' tap table (kernels/prelude.cuh, `tap_fetch`) for a 3x3 conv over `c_in` maps of `h` x `w`:
    /// entry k = ci*9 + r (r = kh*3 + kw) is `(ci*h*w + kh*w + kw) << 9 | 1 << r`; from 9 `c_in` on, up to the
    /// next multiple of 256 (the largest weight-gradient tap tile, a multiple of every K step), it is 0: no tap.
    pub fn tap_table(c_in: usize, h: usize, w: usize) -> Result<Vec<i32>, String> {
        let k = c_in * 9;
        if c_in * h * w + 2 * w + 2 >= 1 << 23 {
            return Err(format!(
                "a {c_in}x{h}x{w} layer input is too large for the CUDA conv kernels' tap offsets (C*H*W below \
                 2^23); the CPU backend has no such limit"
            ));
        }
        let mut t: Vec<i32> = (0..k)
            .map(|k| {
                let (ci, r) = (k / 9, k % 9);
                (((ci * h * w + (r / 3) * w + r % 3) << 9) | 1 << r) as u32 as i32
            })
            .collect();
        t.resize(k.next_multiple_of(256).max(256), 0);
        Ok(t)
    }

    /// The weight gradients' cell table (kernels/prelude.cuh, `cells_q`): per pixel of the map, the
    /// bins holding it packed as `r0 | r1 << 8 | c0 << 16 | c1 << 24` (first and last row bin, first and last
    /// column bin); and per cell the divisor of its goodness gradient (its area for the mean, 1 for the sum).
    pub fn cell_table(grid: &PatchGrid, reduce: GoodnessReduce) -> Result<(Vec<i32>, Vec<f32>), String> {
        if grid.p > 256 {
            return Err(format!(
                "a patch grid of {} is too fine for the CUDA kernels' cell table (at most 256)",
                grid.p
            ));
        }
        // The bins holding coordinate c: a run of consecutive bins (they are ordered and overlap by at most one).
        let span = |bins: &[(usize, usize)], c: usize| {
            let first = bins.iter().position(|&(a, b)| a <= c && c < b).expect("every pixel lies in a bin");
            let last = bins.iter().rposition(|&(a, b)| a <= c && c < b).unwrap_or(first);
            (first, last)
        };
        let mut cells = Vec::with_capacity(grid.h * grid.w);
        for oh in 0..grid.h {
            let (r0, r1) = span(&grid.rows, oh);
            for ow in 0..grid.w {
                let (c0, c1) = span(&grid.cols, ow);
                cells.push((r0 | r1 << 8 | c0 << 16 | c1 << 24) as i32);
            }
        }
        let div = (0..grid.p)
            .flat_map(|i| (0..grid.p).map(move |j| (i, j)))
            .map(|(i, j)| match reduce {
                GoodnessReduce::Mean => grid.area(i, j) as f32,
                GoodnessReduce::Sum => 1.0,
            })
            .collect();
        Ok((cells, div))
    }

    /// AdamW: a grid-stride loop over at most 4096 blocks.
    pub fn adamw(len: usize) -> (u32, u32, u32) {
        ((len as u32).div_ceil(THREADS).clamp(1, 4096), 1, 1)
    }
}

use geometry::THREADS;

/// The conv kernels index x, y and dL/dg with 32-bit integers.
fn index32(s: &ConvShape) -> Result<()> {
    anyhow::ensure!(
        s.x_len().max(s.y_len()) < 1 << 31,
        "cuda backend: a batch of {} {}x{}x{} inputs to {} channels is too large for the conv kernels (2^31 \
         values per tensor); use a smaller batch",
        s.batch,
        s.c_in,
        s.h,
        s.w,
        s.c_out
    );
    Ok(())
}

/// A null device pointer, for a kernel argument the kernel is told (by a flag) not to touch.
const NULL: u64 = 0;

fn cfg(grid_dim: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig { grid_dim, block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

fn grid1(n: usize) -> LaunchConfig {
    cfg(geometry::grid1(n))
}

impl CudaBackend {
    /// Opens device `ordinal` with `$ASGE_CUDA_LANES` lanes (default 1: every op on one stream, in order).
    pub fn new(ordinal: usize) -> Result<Self> {
        let lanes = match std::env::var("ASGE_CUDA_LANES") {
            Ok(v) => v
                .parse()
                .ok()
                .filter(|&n: &usize| n >= 1)
                .with_context(|| format!("ASGE_CUDA_LANES={v}: expected a count >= 1"))?,
            Err(_) => 1,
        };
        Self::with_lanes(ordinal, lanes)
    }

    /// Opens device `ordinal`, compiles (or loads from the disk cache) every kernel for its architecture, and
    /// creates `lanes` streams. With several lanes, layers run on their own streams; cudarc's per-buffer events
    /// order the streams wherever they share a buffer.
    pub fn with_lanes(ordinal: usize, lanes: usize) -> Result<Self> {
        let n = probe().with_context(|| format!("--device cuda:{ordinal}"))?;
        if ordinal >= n {
            bail!("--device cuda:{ordinal}: this machine has {n} CUDA device(s)");
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow::anyhow!("cuda:{ordinal}: cannot create a context ({e:?})"))?;
        let (major, minor) =
            ctx.compute_capability().map_err(|e| anyhow::anyhow!("cuda:{ordinal}: compute capability ({e:?})"))?;
        let arch = format!("sm_{major}{minor}");
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let copy_stream = match lanes {
            0 | 1 => None,
            _ => Some(ctx.new_stream().map_err(|e| anyhow::anyhow!("cuda:{ordinal}: cannot create a stream ({e:?})"))?),
        };
        let mut streams = vec![ctx.default_stream()];
        for _ in 1..lanes.max(1) {
            streams
                .push(ctx.new_stream().map_err(|e| anyhow::anyhow!("cuda:{ordinal}: cannot create a stream ({e:?})"))?);
        }
        let mut driver = 0;
        // SAFETY: one out-parameter; the driver library is present (probe).
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
        let format = nvrtc::format_for(driver)?;
        // The stand-in binds PTX entries to their host twins; it cannot read machine code.
        if standin::active() && format != nvrtc::Format::Ptx {
            bail!("ASGE_KERNEL_FORMAT=cubin: the CUDA stand-in loads PTX only");
        }
        let mut funcs = HashMap::new();
        for (module, source, hash) in nvrtc::KERNELS {
            let ptx = nvrtc::compile_cached(module, source, *hash, &arch, format)?;
            let m = ctx.load_module(ptx).map_err(|e| anyhow::anyhow!("kernel module {module}: cannot load ({e:?})"))?;
            for f in nvrtc::entry_points(source) {
                let func = m.load_function(f).map_err(|e| anyhow::anyhow!("kernel {f}: not found ({e:?})"))?;
                funcs.insert(f, func);
            }
        }
        Ok(CudaBackend {
            ordinal,
            precision: Precision::F32,
            name: format!("cuda:{ordinal} ({name}, {arch}, {format:?}, {} lane(s))", streams.len()),
            wgrad_scratch: (0..streams.len()).map(|_| Mutex::new(None)).collect(),
            streams,
            ctx,
            copy_stream,
            staging: Mutex::new(Staging::default()),
            lane: std::sync::atomic::AtomicUsize::new(0),
            funcs,
            head_scratch: Mutex::new(None),
            gather_scratch: Mutex::new(None),
            tap_tables: Mutex::new(HashMap::new()),
            cell_tables: Mutex::new(HashMap::new()),
            timed: Mutex::new(TimedOps::default()),
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// This backend with its conv operands (layer inputs, conv outputs, weight copies) in `precision`.
    pub fn with_precision(self, precision: Precision) -> Self {
        CudaBackend { precision, ..self }
    }

    fn alloc_f32(&self, len: usize) -> Result<CudaSlice<f32>> {
        drv(self.stream().alloc_zeros::<f32>(len.max(1)), "alloc")
    }

    /// Times the op issued until the returned guard drops, with CUDA events on the current lane's stream,
    /// when `--trace` is on (a no-op otherwise).
    fn time_op(&self, name: &'static str) -> OpTimer<'_> {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
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

    fn lane_index(&self) -> usize {
        self.lane.load(std::sync::atomic::Ordering::Relaxed) % self.streams.len()
    }

    /// The stream of the current lane: the ops issued now are launched on it.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.streams[self.lane_index()]
    }

    /// Milliseconds per call of `f` on the GPU, timed with CUDA events around `reps` calls after `warmup`.
    pub fn time_ms(&self, warmup: usize, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
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

    /// The ceilings this GPU reaches through vendor libraries, measured now: cuBLAS SGEMM (fp32, no TF32) and
    /// HGEMM (fp16 in, fp32 accumulate: the tensor cores) on 4096^3, and a 1 GiB device-to-device copy.
    pub fn ceilings(&self) -> Result<GpuCeilings> {
        use cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N;
        use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
        // SAFETY: only tries to dlopen libcublas.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            bail!("cuBLAS (libcublas.so.13) cannot be loaded: no GEMM ceiling");
        }
        let blas = CudaBlas::new(self.stream().clone()).map_err(|e| anyhow::anyhow!("cuBLAS: {e:?}"))?;
        let n = 4096usize;
        let flop = 2.0 * (n * n * n) as f64;
        let ni = n as i32;
        let (a, b) = (self.alloc_f32(n * n)?, self.alloc_f32(n * n)?);
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
        let zero = half::f16::ZERO;
        let (ah, bh) = (
            drv(self.stream().alloc_zeros::<half::f16>(n * n), "alloc")?,
            drv(self.stream().alloc_zeros::<half::f16>(n * n), "alloc")?,
        );
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
            beta: zero,
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

    fn f(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs.get(name).with_context(|| format!("kernel {name} is not loaded"))
    }

    /// The layer's tap table on the device (see `geometry::tap_table`), built on first use.
    fn tap_table(&self, s: &ConvShape) -> Result<Arc<CudaSlice<i32>>> {
        let key = (s.c_in, s.h, s.w);
        let mut tables = self.tap_tables.lock().unwrap();
        if let Some(t) = tables.get(&key) {
            return Ok(t.clone());
        }
        let host = geometry::tap_table(s.c_in, s.h, s.w).map_err(|e| anyhow::anyhow!("cuda backend: {e}"))?;
        let t = Arc::new(drv(self.stream().clone_htod(&host), "copy tap table")?);
        tables.insert(key, t.clone());
        Ok(t)
    }

    /// The grid's cell table and divisors on the device (see `geometry::cell_table`), built on first use.
    fn cell_table(&self, grid: &PatchGrid, reduce: GoodnessReduce) -> Result<Arc<CellTable>> {
        let key = (grid.h, grid.w, grid.p, reduce == GoodnessReduce::Mean);
        let mut tables = self.cell_tables.lock().unwrap();
        if let Some(t) = tables.get(&key) {
            return Ok(t.clone());
        }
        let (cells, div) = geometry::cell_table(grid, reduce).map_err(|e| anyhow::anyhow!("cuda backend: {e}"))?;
        let t = Arc::new((
            drv(self.stream().clone_htod(&cells), "copy cell table")?,
            drv(self.stream().clone_htod(&div), "copy cell table")?,
        ));
        tables.insert(key, t.clone());
        Ok(t)
    }

    /// Zeroes the first `len` values (the head logits, which the heads accumulate into).
    fn zero(&self, buf: &mut CudaSlice<f32>, len: usize) -> Result<()> {
        if len > 0 {
            self.stream()
                .memset_zeros(&mut buf.slice_mut(0..len))
                .map_err(|e| anyhow::anyhow!("cuda memset: {e:?}"))?;
        }
        Ok(())
    }
}

fn fits(what: &str, have: usize, need: usize) -> Result<()> {
    super::check_len("cuda", what, have, need)
}

fn drv<T>(r: Result<T, cudarc::driver::DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("cuda: {what}: {e:?}"))
}

/// The dtype the conv operands `(x, w, y)` agree on, or an error naming the odd one out.
fn operand_precision(parts: &[(&str, &CudaBuf)]) -> Result<Precision> {
    let p = parts[0].1.precision();
    for (what, b) in parts {
        if b.precision() != p {
            bail!(
                "cuda backend: {what} is {} but {} is {}; the conv operands share one precision",
                b.precision().as_str(),
                parts[0].0,
                p.as_str()
            );
        }
    }
    Ok(p)
}

impl Backend for CudaBackend {
    type Buf = CudaBuf;
    type Labels = CudaSlice<u32>;

    fn name(&self) -> String {
        format!("{} {}", self.name, self.precision.as_str())
    }

    fn precision(&self) -> Precision {
        self.precision
    }

    fn buffers_on_host(&self) -> bool {
        false
    }

    fn conv_kernels(&self, s: &ConvShape) -> Option<[&'static str; 2]> {
        Some([geometry::conv_fwd_kernel(s, self.precision).0, geometry::wgrad_kernel(s, self.precision).0])
    }

    fn synchronize(&self) -> Result<()> {
        for s in self.streams.iter().chain(&self.copy_stream) {
            s.synchronize().map_err(|e| anyhow::anyhow!("cuda: {e:?}"))?;
        }
        Ok(())
    }

    fn lanes(&self) -> usize {
        self.streams.len()
    }

    fn set_lane(&self, lane: usize) -> Result<()> {
        self.lane.store(lane, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn take_device_spans(&self) -> Result<Vec<DeviceSpan>> {
        self.synchronize()?;
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

    fn zeros(&self, len: usize) -> Result<CudaBuf> {
        self.alloc_f32(len).map(CudaBuf::F32)
    }

    fn operand_zeros(&self, len: usize) -> Result<CudaBuf> {
        match self.precision {
            Precision::F32 => self.zeros(len),
            Precision::F16 => drv(self.stream().alloc_zeros::<half::f16>(len.max(1)), "alloc").map(CudaBuf::F16),
        }
    }

    fn upload(&self, data: &[f32]) -> Result<CudaBuf> {
        let mut b = self.zeros(data.len())?;
        self.write(&mut b, data)?;
        Ok(b)
    }

    fn write(&self, dst: &mut CudaBuf, data: &[f32]) -> Result<()> {
        fits("destination", dst.len(), data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        match dst {
            CudaBuf::F32(d) => drv(self.stream().memcpy_htod(data, &mut d.slice_mut(0..data.len())), "copy to device"),
            CudaBuf::F16(d) => {
                use half::slice::HalfFloatSliceExt;
                let mut h = vec![half::f16::ZERO; data.len()];
                h.convert_from_f32_slice(data);
                drv(self.stream().memcpy_htod(&h, &mut d.slice_mut(0..data.len())), "copy to device")
            }
        }
    }

    fn read(&self, src: &CudaBuf, len: usize) -> Result<Vec<f32>> {
        fits("source", src.len(), len)?;
        if len == 0 {
            return Ok(Vec::new());
        }
        match src {
            CudaBuf::F32(s) => drv(self.stream().clone_dtoh(&s.slice(0..len)), "copy to host"),
            CudaBuf::F16(s) => {
                use half::slice::HalfFloatSliceExt;
                Ok(drv(self.stream().clone_dtoh(&s.slice(0..len)), "copy to host")?.to_f32_vec())
            }
        }
    }

    fn fill_zero(&self, buf: &mut CudaBuf, len: usize) -> Result<()> {
        fits("buffer", buf.len(), len)?;
        if len == 0 {
            return Ok(());
        }
        let done = match buf {
            CudaBuf::F32(d) => self.stream().memset_zeros(&mut d.slice_mut(0..len)),
            CudaBuf::F16(d) => self.stream().memset_zeros(&mut d.slice_mut(0..len)),
        };
        drv(done, "memset")
    }

    fn read_many(&self, srcs: &[&CudaBuf], len: usize) -> Result<Vec<Vec<f32>>> {
        let f32s: Option<Vec<&CudaSlice<f32>>> =
            srcs.iter().map(|s| if let CudaBuf::F32(d) = s { Some(d) } else { None }).collect();
        let Some(f32s) = f32s.filter(|_| len > 0 && srcs.len() > 1) else {
            return srcs.iter().map(|s| self.read(s, len)).collect();
        };
        for s in &f32s {
            fits("source", s.len(), len)?;
        }
        // Device-to-device copies into one buffer (each waits for its source's last writer, on any lane), then
        // one copy to the host: a single synchronisation.
        let mut slot = self.gather_scratch.lock().unwrap();
        let gather = scratch(self, &mut slot, len * f32s.len())?;
        for (i, s) in f32s.iter().enumerate() {
            drv(self.stream().memcpy_dtod(&s.slice(0..len), &mut gather.slice_mut(i * len..(i + 1) * len)), "copy")?;
        }
        let all = drv(self.stream().clone_dtoh(&gather.slice(0..len * f32s.len())), "copy to host")?;
        Ok(all.chunks(len).map(<[f32]>::to_vec).collect())
    }

    fn write_input(&self, dst: &mut CudaBuf, data: &[f32]) -> Result<()> {
        fits("destination", dst.len(), data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let mut st = self.staging.lock().unwrap();
        let i = st.next;
        st.next ^= 1;
        let n = data.len();
        let stream = self.copy_stream.as_ref().unwrap_or(&self.streams[0]);
        // as_mut_slice waits for this staging buffer's previous copy (two batches ago) to finish.
        match dst {
            CudaBuf::F32(d) => {
                let p = pinned(&self.ctx, &mut st.f32[i], n)?;
                drv(p.as_mut_slice(), "pinned buffer")?.copy_from_slice(data);
                drv(stream.memcpy_htod(&*p, &mut d.slice_mut(0..n)), "copy input to device")
            }
            CudaBuf::F16(d) => {
                use half::slice::HalfFloatSliceExt;
                let p = pinned(&self.ctx, &mut st.f16[i], n)?;
                drv(p.as_mut_slice(), "pinned buffer")?.convert_from_f32_slice(data);
                drv(stream.memcpy_htod(&*p, &mut d.slice_mut(0..n)), "copy input to device")
            }
        }
    }

    fn labels(&self, labels: &[u32]) -> Result<CudaSlice<u32>> {
        let mut b = drv(self.stream().alloc_zeros::<u32>(labels.len().max(1)), "alloc")?;
        if !labels.is_empty() {
            drv(self.stream().memcpy_htod(labels, &mut b.slice_mut(0..labels.len())), "copy labels")?;
        }
        Ok(b)
    }

    fn write_labels(&self, dst: &mut CudaSlice<u32>, labels: &[u32]) -> Result<()> {
        if dst.len() < labels.len() {
            *dst = self.labels(labels)?;
        } else if !labels.is_empty() {
            drv(self.stream().memcpy_htod(labels, &mut dst.slice_mut(0..labels.len())), "copy labels")?;
        }
        Ok(())
    }

    fn conv_goodness_fwd(
        &self,
        s: &ConvShape,
        grid: &PatchGrid,
        reduce: GoodnessReduce,
        x: &CudaBuf,
        w: &CudaBuf,
        b: &CudaBuf,
        y: &mut CudaBuf,
        g: &mut CudaBuf,
    ) -> Result<()> {
        let _timer = self.time_op("conv_goodness_fwd");
        let g_len = s.batch * s.c_out * grid.cells();
        fits("x", x.len(), s.x_len())?;
        fits("conv weight", w.len(), s.w_len())?;
        fits("conv bias", b.len(), s.c_out)?;
        fits("y", y.len(), s.y_len())?;
        fits("goodness", g.len(), g_len)?;
        let precision = operand_precision(&[("x", x), ("conv weight", w), ("y", &*y)])?;
        let (bb, ci, co, h, ww, p) =
            (s.batch as i32, s.c_in as i32, s.c_out as i32, s.h as i32, s.w as i32, grid.p as i32);
        let mean = (reduce == GoodnessReduce::Mean) as i32;
        let (bs, gs) = (b.f32("conv bias")?, g.f32_mut("goodness")?);
        let cfg = cfg(geometry::conv_fwd(s, precision));
        index32(s)?;
        let taps = self.tap_table(s)?;
        match precision {
            Precision::F32 => {
                let ys = y.f32_mut("y")?;
                let mut l = self.stream().launch_builder(self.f("conv_goodness_fwd_f32")?);
                l.arg(x.f32("x")?).arg(w.f32("w")?).arg(bs).arg(&*taps).arg(&mut *ys);
                l.arg(&bb).arg(&ci).arg(&co).arg(&h).arg(&ww);
                // SAFETY: argument order and types match the kernel signature (the layer's tap table as the
                // fourth); the fits() checks bound every index.
                drv(unsafe { l.launch(cfg) }, "conv_goodness_fwd_f32")?;
                let mut l = self.stream().launch_builder(self.f("patch_goodness_f32")?);
                l.arg(&*ys).arg(gs).arg(&bb).arg(&co).arg(&h).arg(&ww).arg(&p).arg(&mean);
                // SAFETY: matches patch_goodness_f32; one thread per goodness cell.
                drv(unsafe { l.launch(grid1(g_len)) }, "patch_goodness_f32").map(|_| ())
            }
            Precision::F16 => {
                let ys = y.f16_mut("y")?;
                let (kernel, _, _) = geometry::conv_fwd_kernel(s, precision);
                let mut l = self.stream().launch_builder(self.f(kernel)?);
                l.arg(x.f16("x")?).arg(w.f16("w")?).arg(bs).arg(&*taps).arg(&mut *ys);
                l.arg(&bb).arg(&ci).arg(&co).arg(&h).arg(&ww);
                // SAFETY: matches conv_goodness_fwd_f16{,_m128} (fp16 x, w, y; f32 bias; the layer's tap table);
                // fits() bounds every index.
                drv(unsafe { l.launch(cfg) }, kernel)?;
                let mut l = self.stream().launch_builder(self.f("patch_goodness_f16")?);
                l.arg(&*ys).arg(gs).arg(&bb).arg(&co).arg(&h).arg(&ww).arg(&p).arg(&mean);
                // SAFETY: matches patch_goodness_f16; one thread per goodness cell.
                drv(unsafe { l.launch(grid1(g_len)) }, "patch_goodness_f16").map(|_| ())
            }
        }
    }

    fn goodness_loss(
        &self,
        batch: usize,
        dim: usize,
        classes: usize,
        g: &CudaBuf,
        proj_w: &CudaBuf,
        proj_b: &CudaBuf,
        labels: &CudaSlice<u32>,
        logits: &mut CudaBuf,
        dg: Option<&mut CudaBuf>,
        stats: &mut CudaBuf,
    ) -> Result<()> {
        let _timer = self.time_op("goodness_loss");
        fits("goodness", g.len(), batch * dim)?;
        fits("projection", proj_w.len(), dim * classes)?;
        fits("logits", logits.len(), batch * classes)?;
        fits("labels", labels.len(), batch)?;
        fits("stats", stats.len(), STATS_LEN)?;
        // kernels/goodness_loss.cu keeps the logits and dL/da of one sample in 2 * MAX_CLASSES floats of shared memory.
        anyhow::ensure!(classes <= 4096, "cuda backend: {classes} classes; the loss kernel takes at most 4096");
        let cfg = cfg((batch as u32, 1, 1));
        let (b, d, n) = (batch as i32, dim as i32, classes as i32);
        let with_grad = dg.is_some() as i32;
        let mut l = self.stream().launch_builder(self.f("goodness_loss_f32")?);
        l.arg(g.f32("goodness")?).arg(proj_w.f32("projection")?).arg(proj_b.f32("projection bias")?).arg(labels);
        // Without a gradient the kernel never touches dg: a null pointer stands in (no allocation per call).
        l.arg(logits.f32_mut("logits")?);
        match dg {
            Some(dg) => {
                fits("dL/dg", dg.len(), batch * dim)?;
                l.arg(dg.f32_mut("dL/dg")?);
            }
            None => {
                l.arg(&NULL);
            }
        }
        l.arg(stats.f32_mut("stats")?).arg(&b).arg(&d).arg(&n).arg(&with_grad);
        // SAFETY: matches goodness_loss_f32's signature; shared memory holds 2 * N floats.
        drv(unsafe { l.launch(cfg) }, "goodness_loss_f32").map(|_| ())
    }

    fn conv_goodness_wgrad(
        &self,
        s: &ConvShape,
        grid: &PatchGrid,
        reduce: GoodnessReduce,
        x: &CudaBuf,
        y: &CudaBuf,
        dg: &CudaBuf,
        dw: &mut CudaBuf,
        db: &mut CudaBuf,
    ) -> Result<()> {
        let _timer = self.time_op("conv_goodness_wgrad");
        anyhow::ensure!(
            (grid.h, grid.w) == (s.h, s.w),
            "cuda backend: a patch grid over {}x{} for a {}x{} feature map",
            grid.h,
            grid.w,
            s.h,
            s.w
        );
        fits("x", x.len(), s.x_len())?;
        fits("y", y.len(), s.y_len())?;
        fits("dL/dg", dg.len(), s.batch * s.c_out * grid.cells())?;
        fits("dL/dW", dw.len(), s.w_len())?;
        fits("dL/db", db.len(), s.c_out)?;
        let precision = operand_precision(&[("x", x), ("y", y)])?;
        let split = geometry::wgrad(s, precision);
        let (chunk, gz) = (split.chunk, split.slices);
        let cfg = cfg(split.grid);
        let (bb, ci, co, h, ww, p) =
            (s.batch as i32, s.c_in as i32, s.c_out as i32, s.h as i32, s.w as i32, grid.p as i32);
        let chunk = chunk as i32;
        let mk = s.w_len();
        // The partials, and the per-cell dL/dg / |bin| (dg_per_cell_f32) the GEMM reads instead of dividing.
        let q_len = s.batch * s.c_out * grid.cells();
        let mut slot = self.wgrad_scratch[self.lane_index()].lock().unwrap();
        let part = scratch(self, &mut slot, gz * (mk + s.c_out) + q_len)?;
        let (mut part, mut q) = part.split_at_mut(gz * (mk + s.c_out));
        let (mut part_w, mut part_b) = part.split_at_mut(gz * mk);
        index32(s)?;
        let taps = self.tap_table(s)?;
        let cells = self.cell_table(grid, reduce)?;
        let (q_n, pp) = (q_len as i32, grid.cells() as i32);
        let mut l = self.stream().launch_builder(self.f("dg_per_cell_f32")?);
        l.arg(dg.f32("dL/dg")?).arg(&cells.1).arg(&mut q).arg(&q_n).arg(&pp);
        // SAFETY: matches dg_per_cell_f32; one thread per dL/dg value, q holds q_len floats.
        drv(unsafe { l.launch(grid1(q_len)) }, "dg_per_cell_f32")?;
        match precision {
            Precision::F32 => {
                let mut l = self.stream().launch_builder(self.f("conv_goodness_wgrad_f32")?);
                l.arg(x.f32("x")?).arg(y.f32("y")?).arg(&mut q).arg(&*taps).arg(&cells.0);
                l.arg(&mut part_w).arg(&mut part_b);
                l.arg(&bb).arg(&ci).arg(&co).arg(&h).arg(&ww).arg(&p).arg(&chunk);
                // SAFETY: matches conv_goodness_wgrad_f32's signature; part holds gz * (M*K + M) floats; the tables
                // are the layer's (tap) and its grid's (cell).
                drv(unsafe { l.launch(cfg) }, "conv_goodness_wgrad_f32")?;
            }
            Precision::F16 => {
                let scale = super::dz_scale(s.batch, grid, reduce);
                let inv = 1.0 / scale;
                let (kernel, _, _) = geometry::wgrad_kernel(s, precision);
                let mut l = self.stream().launch_builder(self.f(kernel)?);
                l.arg(x.f16("x")?).arg(y.f16("y")?).arg(&mut q).arg(&*taps).arg(&cells.0);
                l.arg(&mut part_w).arg(&mut part_b);
                l.arg(&bb).arg(&ci).arg(&co).arg(&h).arg(&ww).arg(&p).arg(&chunk).arg(&scale).arg(&inv);
                // SAFETY: matches conv_goodness_wgrad_f16{,_n256}'s signature; part holds gz * (M*K + M) floats;
                // the tables are the layer's (tap) and its grid's (cell).
                drv(unsafe { l.launch(cfg) }, kernel)?;
            }
        }
        let (mk_i, m_i, z_i) = (mk as i32, s.c_out as i32, gz as i32);
        let mut l = self.stream().launch_builder(self.f("wgrad_reduce_f32")?);
        l.arg(&mut part_w).arg(&mut part_b).arg(dw.f32_mut("dL/dW")?).arg(db.f32_mut("dL/db")?);
        l.arg(&mk_i).arg(&m_i).arg(&z_i);
        // SAFETY: matches wgrad_reduce_f32; one thread per weight (M*K >= M).
        drv(unsafe { l.launch(grid1(mk)) }, "wgrad_reduce_f32").map(|_| ())
    }

    fn layer_output(
        &self,
        batch: usize,
        c: usize,
        h: usize,
        w: usize,
        pool: Option<PoolKind>,
        dropout: Option<Dropout>,
        y: &CudaBuf,
        out: &mut CudaBuf,
        gap: Option<&mut CudaBuf>,
    ) -> Result<()> {
        let _timer = self.time_op("layer_output");
        let (ho, wo) = if pool.is_some() { (h / 2, w / 2) } else { (h, w) };
        fits("y", y.len(), batch * c * h * w)?;
        fits("layer output", out.len(), batch * c * ho * wo)?;
        let precision = operand_precision(&[("y", y), ("layer output", &*out)])?;
        let pool_i: i32 = match pool {
            None => 0,
            Some(PoolKind::Avg) => 1,
            Some(PoolKind::Rms) => 2,
        };
        let (p, key, use_drop) = match dropout {
            Some(d) => (d.p, d.key, 1i32),
            None => (0.0f32, 0u64, 0i32),
        };
        let (ci, hi, wi) = (c as i32, h as i32, w as i32);
        let cfg = cfg((batch as u32, 1, 1));
        let kernel = match precision {
            Precision::F32 => "layer_output_f32",
            Precision::F16 => "layer_output_f16",
        };
        let mut l = self.stream().launch_builder(self.f(kernel)?);
        match precision {
            Precision::F32 => l.arg(y.f32("y")?).arg(out.f32_mut("layer output")?),
            Precision::F16 => l.arg(y.f16("y")?).arg(out.f16_mut("layer output")?),
        };
        // Without pooled features the kernel never touches gap: a null pointer (layer 0, every step, allocates
        // nothing).
        let use_gap = gap.is_some() as i32;
        match gap {
            Some(gap) => {
                fits("pooled features", gap.len(), batch * c)?;
                l.arg(gap.f32_mut("pooled features")?);
            }
            None => {
                l.arg(&NULL);
            }
        }
        l.arg(&ci).arg(&hi).arg(&wi).arg(&pool_i).arg(&p).arg(&key).arg(&use_drop).arg(&use_gap);
        // SAFETY: matches layer_output_{f32,f16}'s signature (y and out of the kernel's dtype, gap f32); fits()
        // bounds every index.
        drv(unsafe { l.launch(cfg) }, kernel).map(|_| ())
    }

    fn fusion_heads(
        &self,
        batch: usize,
        classes: usize,
        feats: &[(&CudaBuf, usize)],
        heads: &[(&CudaBuf, &CudaBuf)],
        labels: &CudaSlice<u32>,
        logits: &mut CudaBuf,
        grads: Option<&mut [(&mut CudaBuf, &mut CudaBuf)]>,
        stats: &mut CudaBuf,
    ) -> Result<()> {
        let _timer = self.time_op("fusion_heads");
        anyhow::ensure!(feats.len() == heads.len(), "{} feature sets for {} fusion heads", feats.len(), heads.len());
        fits("logits", logits.len(), batch * classes)?;
        let logits = logits.f32_mut("head logits")?;
        self.zero(logits, batch * classes)?;
        let (b, n) = (batch as i32, classes as i32);
        for (&(f, c), &(w, bias)) in feats.iter().zip(heads) {
            fits("head features", f.len(), batch * c)?;
            fits("head weight", w.len(), classes * c)?;
            fits("head bias", bias.len(), classes)?;
            let ci = c as i32;
            let mut l = self.stream().launch_builder(self.f("heads_logits_f32")?);
            l.arg(f.f32("head features")?).arg(w.f32("head weight")?).arg(bias.f32("head bias")?);
            l.arg(&mut *logits).arg(&b).arg(&n).arg(&ci);
            // SAFETY: matches heads_logits_f32; one thread per (sample, class).
            drv(unsafe { l.launch(grid1(batch * classes)) }, "heads_logits_f32")?;
        }
        let mut slot = self.head_scratch.lock().unwrap();
        let ds = scratch(self, &mut slot, batch * classes)?;
        let mut l = self.stream().launch_builder(self.f("heads_softmax_f32")?);
        l.arg(&*logits).arg(labels).arg(&mut *ds).arg(stats.f32_mut("stats")?).arg(&b).arg(&n);
        // SAFETY: matches heads_softmax_f32; one thread per sample.
        drv(unsafe { l.launch(grid1(batch)) }, "heads_softmax_f32")?;
        if let Some(grads) = grads {
            for ((gw, gb), &(f, c)) in grads.iter_mut().zip(feats) {
                fits("head weight gradient", gw.len(), classes * c)?;
                fits("head bias gradient", gb.len(), classes)?;
                let ci = c as i32;
                let mut l = self.stream().launch_builder(self.f("heads_grad_f32")?);
                l.arg(f.f32("head features")?).arg(&*ds);
                l.arg(gw.f32_mut("head weight gradient")?).arg(gb.f32_mut("head bias gradient")?);
                l.arg(&b).arg(&n).arg(&ci);
                // SAFETY: matches heads_grad_f32; one thread per (class, feature).
                drv(unsafe { l.launch(grid1(classes * c)) }, "heads_grad_f32")?;
            }
        }
        Ok(())
    }

    fn adamw(
        &self,
        len: usize,
        p: &mut CudaBuf,
        grad: &CudaBuf,
        m: &mut CudaBuf,
        v: &mut CudaBuf,
        h: &AdamWStep,
        copy: Option<&mut CudaBuf>,
    ) -> Result<()> {
        let _timer = self.time_op("adamw");
        for (what, n) in
            [("parameter", p.len()), ("gradient", grad.len()), ("exp_avg", m.len()), ("exp_avg_sq", v.len())]
        {
            fits(what, n, len)?;
        }
        if let Some(c) = &copy {
            fits("weight copy", c.len(), len)?;
        }
        let super::AdamWScalars { decay, step_size, bc2_sqrt, w1, b2, w2, eps } = h.scalars();
        let n = len as i32;
        let cfg = cfg(geometry::adamw(len));
        let ps = p.f32_mut("parameter")?;
        let mut l = self.stream().launch_builder(self.f("adamw_f32")?);
        l.arg(&mut *ps).arg(grad.f32("gradient")?).arg(m.f32_mut("exp_avg")?).arg(v.f32_mut("exp_avg_sq")?);
        // The fp16 copy is written by the kernel; an f32 copy (an f32 backend's operand) is a device copy after.
        let mut f32_copy = None;
        match copy {
            Some(CudaBuf::F16(c)) => {
                l.arg(c);
            }
            Some(CudaBuf::F32(c)) => {
                f32_copy = Some(c);
                l.arg(&NULL);
            }
            None => {
                l.arg(&NULL);
            }
        }
        l.arg(&n).arg(&decay).arg(&w1).arg(&b2).arg(&w2).arg(&step_size).arg(&bc2_sqrt).arg(&eps);
        // SAFETY: matches adamw_f32 (copy is an fp16 buffer of >= len or a null pointer the kernel checks);
        // grid-stride loop over len elements, all buffers hold len.
        drv(unsafe { l.launch(cfg) }, "adamw_f32")?;
        if let Some(c) = f32_copy {
            drv(self.stream().memcpy_dtod(&ps.slice(0..len), &mut c.slice_mut(0..len)), "copy weights")?;
        }
        Ok(())
    }
}
