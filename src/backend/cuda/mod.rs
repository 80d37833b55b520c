//! The CUDA backend: hand-written kernels (`kernels/*.cu`) compiled at run time by NVRTC for the device's
//! architecture, launched through cudarc on one stream per lane (`ASGE_CUDA_LANES`), with the batch's input
//! staged through pinned host memory. Every library is opened at run time (`dynamic-loading`), and
//! [`CudaBackend::new`] probes for the driver, NVRTC and a device before the first cudarc call, so a machine
//! without them gets one clear error instead of cudarc's panic.
//!
//! Layout: each op's launcher lives in its op's folder (`src/ops/<op>/cuda.rs` for `kernels/<op>.cu`), with the
//! op's arguments and checks; here are what they share: [`args`] the launch wrappers generated from the kernels'
//! signatures, [`layout`] the fp16 GEMMs' channels-last copies, [`buf`] the buffer type, [`geometry`] the launch geometry,
//! [`timing`] events and ceilings, [`nvrtc`] the compiler and its cache, [`standin`] the driver stand-in that runs
//! all of this without a GPU.
//!
//! Precision: buffers are [`CudaBuf`]s, f32 or fp16. [`CudaBackend::with_precision`] decides what
//! [`Device::operand_zeros`] allocates; the conv ops and the layer output pick their kernel by the dtype of the
//! buffers they are given (`*_f32`, or `*_f16` on the tensor cores), and every other op is f32. An fp16 layer
//! output whose channel count is a multiple of 8 is stored channels-last, which the buffer records
//! ([`CudaBuf::channels_last`]); the next conv reads it as it is, and `read` returns it in NCHW order.
//!
//! Ordering between streams. With one lane every op runs on the compute stream in order, and the only other
//! stream is the statistics readback's: cudarc's per-buffer event tracking is turned off (it records events on
//! every launch once a second stream exists, host time for nothing here) and the readback waits for an explicit
//! event. With several lanes the layers' streams share buffers in ways the trainer's schedule implies (layer l's
//! output is layer l + 1's input; the heads read every layer's pooled features); cudarc's tracking orders them by
//! construction, so it stays on for that mode, except while a training step is captured as a graph: then explicit
//! hand-off and join events order the lanes, and the lanes meet around each graph launch (graph.rs).
//!
//! `ASGE_CUDA_SYNC=1` synchronises after every launch and names the kernel and the layer of a failing one.

pub mod args;
pub mod buf;
pub mod geometry;
mod graph;
pub mod layout;
mod memory;
pub mod nvrtc;
pub mod selftest;
pub mod standin;
pub mod timing;

pub use buf::CudaBuf;
pub use timing::{GpuCeilings, Work};

use super::{AdamWScalars, ConvShape, Device, KernelTime, Ops, Precision, Schedule, StepMode};
use crate::model::{GoodnessReduce, PatchGrid};
use crate::trace::DeviceSpan;
use anyhow::{bail, Context, Result};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DriverError, LaunchConfig, PinnedHostSlice,
};
use geometry::THREADS;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

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
    // Without NVRTC the kernels must all be in the kernel cache (a GPU bundle carries them); with it, it must be
    // the right one.
    if nvrtc::available() {
        nvrtc::check_library()?;
    }
    // SAFETY: cuInit with flags 0; the library is present.
    let init = unsafe { cudarc::driver::sys::cuInit(0) };
    if init == cudarc::driver::sys::CUresult::CUDA_ERROR_STUB_LIBRARY {
        bail!(
            "the CUDA driver found is the toolkit's stub library (lib64/stubs/libcuda.so), not a driver: take the \
             stubs folder off LD_LIBRARY_PATH"
        );
    }
    let n = CudaContext::device_count().map_err(|e| anyhow::anyhow!("the CUDA driver reports no device ({e:?})"))?;
    if n <= 0 {
        bail!("the CUDA driver reports no device");
    }
    Ok(n as usize)
}

/// The file the loaded CUDA driver came from and its CUDA version (the stand-in names itself), once [`probe`]
/// found a driver.
pub fn driver_library() -> String {
    let mut version = 0;
    // SAFETY: one out-parameter; probe() found the library.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) };
    // The library cudarc loaded: the first of its candidate names already in the process.
    let mut file = "libcuda (path unknown)".to_string();
    for name in cudarc::get_lib_name_candidates("cuda") {
        let Ok(c) = std::ffi::CString::new(name) else { continue };
        // SAFETY: RTLD_NOLOAD only returns a library already loaded; dlsym and dladdr on its handle, closed after.
        unsafe {
            let h = libc::dlopen(c.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD);
            if h.is_null() {
                continue;
            }
            let sym = libc::dlsym(h, c"cuInit".as_ptr());
            let mut info: libc::Dl_info = std::mem::zeroed();
            if !sym.is_null() && libc::dladdr(sym, &mut info) != 0 && !info.dli_fname.is_null() {
                file = std::ffi::CStr::from_ptr(info.dli_fname).to_string_lossy().into_owned();
            }
            libc::dlclose(h);
            break;
        }
    }
    let what = if standin::active() { ", the asge CUDA stand-in (not a GPU)" } else { "" };
    format!("{file}, CUDA {}.{}{what}", version / 1000, (version % 1000) / 10)
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

pub struct CudaBackend {
    ordinal: usize,
    device: String,
    precision: Precision,
    name: String,
    ctx: Arc<CudaContext>,
    /// One stream per lane; lane 0 is the context's default stream.
    streams: Vec<Arc<CudaStream>>,
    /// The input uploads' stream with several lanes (with one, lane 0 copies), and their two pinned staging buffers
    /// (the host fills one while the other's copy may still run).
    copy_stream: Option<Arc<CudaStream>>,
    staging: Mutex<Staging>,
    /// The statistics readback ([`Schedule::queue_read`]): its own stream, events marking where every lane stood
    /// when the read was queued, a device gather buffer and two pinned host buffers.
    readback: Mutex<Readback>,
    rb_stream: Arc<CudaStream>,
    /// The layer of the op being launched ([`CudaBackend::enter_layer`], from the op's arguments): its lane is
    /// `layer % lanes`, its dropout key's slot `layer`.
    layer: std::sync::atomic::AtomicUsize,
    funcs: HashMap<&'static str, CudaFunction>,
    /// The fusion heads' `dL/ds`, grown on demand.
    head_scratch: Mutex<Option<CudaSlice<f32>>>,
    /// The conv kernels' tap tables by (C_in, H, W) and cell tables by (H, W, P, mean), uploaded on first use.
    tap_tables: Tables<(usize, usize, usize), CudaSlice<i32>>,
    cell_tables: Tables<(usize, usize, usize, bool), CellTable>,
    /// The fp16 forward's chunk tables by (padded C_in, H, W) (see `geometry::nhwc_tap_table`).
    nhwc_tables: Tables<(usize, usize, usize), CudaSlice<i32>>,
    /// The fp16 weight gradient's pixel tables by (batch, H, W) (see `geometry::pixel_masks`).
    pixel_tables: Tables<(usize, usize, usize), CudaSlice<u16>>,
    /// The weight gradient's per-slice partial sums, one per lane (so lanes do not serialise on it).
    wgrad_scratch: Vec<Mutex<Option<CudaSlice<f32>>>>,
    /// The fp16 forward's channels-last input and weights, one pair per lane.
    layout_scratch: Vec<Mutex<LayoutScratch>>,
    /// With `--trace`: every op's start and end events, and the event all times are measured from.
    timed: Mutex<timing::TimedOps>,
    /// Per-kernel timing ([`Schedule::time_kernels`]): on or off, and the launches timed so far.
    kernel_timing: std::sync::atomic::AtomicBool,
    kernel_log: Mutex<Option<timing::KernelLog>>,
    /// The events of [`Schedule::device_mark`], by handle.
    marks: Mutex<Vec<cudarc::driver::CudaEvent>>,
    /// `ASGE_CUDA_SYNC=1`: synchronise and check after every launch.
    sync_each: bool,
    /// A forced fp16 GEMM variant (tests and benchmarks); by default each shape's own choice.
    tiles: geometry::Tiles,
    /// The per-step values kernels read from the device, the captured step graphs, and whether lane 0 is
    /// capturing one (graph.rs).
    pub(crate) step_params: Mutex<graph::StepParams>,
    graphs: Mutex<graph::StepGraphs>,
    capturing: std::sync::atomic::AtomicBool,
    /// With several lanes: the events that order them in a captured step and around a graph's launch.
    lane_events: Mutex<graph::LaneEvents>,
    /// Weight gradients that used the forward's channels-last input copy (for tests: backend/cuda/layout.rs).
    input_copies_reused: std::sync::atomic::AtomicUsize,
    /// fp16 convs (forward or weight gradient) that read their input as the previous layer's output stored it,
    /// channels-last, with no copy (for tests: backend/cuda/layout.rs).
    inputs_read_as_stored: std::sync::atomic::AtomicUsize,
    /// Step graphs allowed (`ASGE_CUDA_GRAPHS=0` or [`CudaBackend::without_step_graphs`] turn them off).
    graphs_allowed: bool,
    /// With several ranks: the process's communicator (`crate::dist::group`) and the stream its collectives run on.
    comm: Option<Comm>,
}

/// The collectives' side of a backend in a run of several ranks: NCCL's communicator, one stream for all its
/// collectives (in the same order on every rank), the events that order that stream with lane 0, and whether a
/// collective was queued since the last join.
struct Comm {
    group: Arc<crate::dist::group::Group>,
    stream: Arc<CudaStream>,
    /// Recorded on lane 0 before a collective (the stream waits on it) and on the stream after the last one
    /// (lane 0 waits on it: [`Schedule::join_collectives`]).
    before: CudaEvent,
    after: CudaEvent,
    pending: std::sync::atomic::AtomicBool,
}

/// Device tables built once per shape and shared by every call (and lane) after.
type Tables<K, V> = Mutex<HashMap<K, Arc<V>>>;

/// A lane's scratch: the fp16 forward's channels-last copies of a layer's input and weights (kernels/layout.cu),
/// and the partials of the ops it runs.
#[derive(Default)]
pub(crate) struct LayoutScratch {
    pub(crate) x: Option<CudaSlice<half::f16>>,
    /// What `x` holds the copy of: the input buffer's version and the layer's shape (backend/cuda/layout.rs).
    x_from: Option<((u64, u64), ConvShape)>,
    pub(crate) w: Option<CudaSlice<half::f16>>,
    /// The weight gradient's dL/dz (scaled), `[NHWC_MP(C_out)][WG_NP(N)]`.
    pub(crate) dz: Option<CudaSlice<half::f16>>,
    /// The split forward's f32 partial tiles.
    pub(crate) part: Option<CudaSlice<f32>>,
    /// The fp16 forward's goodness partials per tile (kernels/conv_goodness_fwd.cu, `tile_goodness`).
    pub(crate) gpart: Option<CudaSlice<f32>>,
    /// The layer output's per-slice sums of squares (kernels/layer_output.cu).
    pub(crate) sumsq: Option<CudaSlice<f32>>,
}

/// A patch grid's cell table and divisors on the device (see `geometry::cell_table`).
type CellTable = (CudaSlice<i32>, CudaSlice<f32>);

/// The input's two pinned staging buffers and, per buffer, the event after its last copy: the host refills a
/// buffer only once that copy has run. (cudarc's pinned buffers carry such an event too, but record it only while
/// its per-buffer tracking is on.)
#[derive(Default)]
struct Staging {
    f32: [Option<PinnedHostSlice<f32>>; 2],
    f16: [Option<PinnedHostSlice<half::f16>>; 2],
    copied: [Option<CudaEvent>; 2],
    next: usize,
}

struct Readback {
    /// Where each lane stood when a read was queued.
    marks: Vec<CudaEvent>,
    gather: Option<CudaSlice<f32>>,
    pinned: [Option<PinnedHostSlice<f32>>; 2],
    /// After each pinned buffer's copy to the host.
    copied: [CudaEvent; 2],
    next: usize,
}

/// A statistics read queued on the readback stream: which pinned buffer, how many buffers of `len` values.
pub struct PendingRead {
    slot: usize,
    count: usize,
    len: usize,
}

/// `slot`, reallocated as `len` pinned values when it holds another length; `flags` 0 is plain pinned memory
/// (fast for the host to read), cudarc's default write-combined (fast to write, slow to read).
fn pinned<'a, T: cudarc::driver::DeviceRepr>(
    ctx: &Arc<CudaContext>,
    slot: &'a mut Option<PinnedHostSlice<T>>,
    len: usize,
    readable: bool,
) -> Result<&'a mut PinnedHostSlice<T>> {
    if slot.as_ref().is_none_or(|p| p.len() != len) {
        *slot = None;
        // SAFETY: the buffer is filled completely (by the host or a copy) before its only reads.
        let p = if readable {
            unsafe { ctx.alloc_pinned_with_flags::<T>(len, 0) }
        } else {
            unsafe { ctx.alloc_pinned::<T>(len) }
        };
        *slot = Some(drv(p, "pinned host allocation")?);
    }
    Ok(slot.as_mut().expect("just filled"))
}

/// The conv kernels index x, y and dL/dg with 32-bit integers.
pub(crate) fn index32(s: &ConvShape) -> Result<()> {
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

pub(crate) fn cfg(grid_dim: (u32, u32, u32)) -> LaunchConfig {
    LaunchConfig { grid_dim, block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

pub(crate) fn grid1(n: usize) -> LaunchConfig {
    cfg(geometry::grid1(n))
}

pub(crate) fn drv<T>(r: Result<T, DriverError>, what: &str) -> Result<T> {
    r.map_err(|e| anyhow::anyhow!("cuda: {what}: {e:?}"))
}

/// Makes `waiter` wait for where each of `streams` stands now, through its mark event (recorded on it here).
fn wait_for_streams<'a>(
    waiter: &CudaStream,
    marks: impl IntoIterator<Item = &'a CudaEvent>,
    streams: impl IntoIterator<Item = &'a Arc<CudaStream>>,
) -> Result<()> {
    for (mark, s) in marks.into_iter().zip(streams) {
        drv(mark.record(s), "event")?;
        drv(waiter.wait(mark), "stream wait")?;
    }
    Ok(())
}

/// The dtype the conv operands `(x, w, y)` agree on, or an error naming the odd one out.
pub(crate) fn operand_precision(parts: &[(&str, &CudaBuf)]) -> Result<Precision> {
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

fn fits(what: &str, have: usize, need: usize) -> Result<()> {
    crate::ops::fits("cuda", what, have, need)
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
    /// creates `lanes` streams (see the module notes on how they are ordered).
    pub fn with_lanes(ordinal: usize, lanes: usize) -> Result<Self> {
        let n = probe().with_context(|| format!("--device cuda:{ordinal}"))?;
        if ordinal >= n {
            bail!("--device cuda:{ordinal}: this machine has {n} CUDA device(s)");
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| anyhow::anyhow!("cuda:{ordinal}: cannot create a context ({e:?})"))?;
        let lanes = lanes.max(1);
        if lanes == 1 {
            // SAFETY: before any allocation; with one lane the only cross-stream ordering is the readback's, which
            // waits for an explicit event (queue_read), and every buffer the readback touches lives on its stream.
            unsafe { ctx.disable_event_tracking() };
        }
        let (major, minor) =
            ctx.compute_capability().map_err(|e| anyhow::anyhow!("cuda:{ordinal}: compute capability ({e:?})"))?;
        let arch = format!("sm_{major}{minor}");
        let device = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        let new_stream =
            || ctx.new_stream().map_err(|e| anyhow::anyhow!("cuda:{ordinal}: cannot create a stream ({e:?})"));
        let copy_stream = if lanes > 1 { Some(new_stream()?) } else { None };
        // Created streams only: the legacy default stream cannot be captured into a graph.
        let mut streams = vec![new_stream()?];
        for _ in 1..lanes {
            streams.push(new_stream()?);
        }
        let rb_stream = new_stream()?;
        let marks = (0..streams.len()).map(|_| drv(ctx.new_event(None), "event")).collect::<Result<_>>()?;
        let copied = [drv(ctx.new_event(None), "event")?, drv(ctx.new_event(None), "event")?];
        let mut driver = 0;
        // SAFETY: one out-parameter; the driver library is present (probe).
        unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver) };
        let format = if standin::active() { nvrtc::Format::Ptx } else { nvrtc::format_for(driver)? };
        if standin::active() && std::env::var("ASGE_KERNEL_FORMAT").is_ok_and(|f| f == "cubin") {
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
        // The kernels whose dynamic shared memory exceeds the 48 KB a launch may use without opting in.
        let dynamic = geometry::CONV_FWD_F16.iter().chain([&geometry::CONV_FWD_F16_SPLIT]).map(|k| (k.name, k.smem));
        for (name, smem) in dynamic.chain(geometry::WGRAD_F16.iter().map(|k| (k.name, k.smem))) {
            if smem <= 48 * 1024 {
                continue;
            }
            let f = funcs.get(name).with_context(|| format!("kernel {name} is not loaded"))?;
            f.set_attribute(
                cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(|e| anyhow::anyhow!("kernel {name}: cannot opt in to {smem} bytes of shared memory ({e:?})"))?;
        }
        let step_params = graph::StepParams::new(
            streams.len(),
            drv(streams[0].alloc_zeros::<AdamWScalars>(streams.len()), "alloc step parameters")?,
            drv(streams[0].alloc_zeros::<u64>(graph::KEY_SLOTS), "alloc step parameters")?,
        );
        drv(streams[0].synchronize(), "alloc step parameters")?;
        let lane_events = graph::LaneEvents::new(&ctx, streams.len())?;
        let comm = match crate::dist::group::current() {
            Some(group) if group.world.size > 1 => {
                if streams.len() > 1 {
                    bail!(
                        "ASGE_CUDA_LANES={}: several lanes are not yet supported with several ranks; leave it unset",
                        streams.len()
                    );
                }
                if group.world.local_rank != ordinal {
                    bail!(
                        "--device cuda:{ordinal}: rank {} joined its ranks on cuda:{} (its LOCAL_RANK)",
                        group.world.rank,
                        group.world.local_rank
                    );
                }
                Some(Comm {
                    stream: group.stream.clone(),
                    group,
                    before: drv(ctx.new_event(None), "event")?,
                    after: drv(ctx.new_event(None), "event")?,
                    pending: std::sync::atomic::AtomicBool::new(false),
                })
            }
            _ => None,
        };
        Ok(CudaBackend {
            ordinal,
            precision: Precision::F32,
            name: format!("cuda:{ordinal} ({device}, {arch}, {format:?}, {} lane(s))", streams.len()),
            device,
            wgrad_scratch: (0..streams.len()).map(|_| Mutex::new(None)).collect(),
            layout_scratch: (0..streams.len()).map(|_| Mutex::new(LayoutScratch::default())).collect(),
            streams,
            ctx,
            copy_stream,
            staging: Mutex::new(Staging::default()),
            readback: Mutex::new(Readback { marks, gather: None, pinned: [None, None], copied, next: 0 }),
            rb_stream,
            layer: std::sync::atomic::AtomicUsize::new(0),
            funcs,
            head_scratch: Mutex::new(None),
            tap_tables: Mutex::new(HashMap::new()),
            nhwc_tables: Mutex::new(HashMap::new()),
            pixel_tables: Mutex::new(HashMap::new()),
            cell_tables: Mutex::new(HashMap::new()),
            timed: Mutex::new(timing::TimedOps::default()),
            kernel_timing: std::sync::atomic::AtomicBool::new(false),
            kernel_log: Mutex::new(None),
            sync_each: std::env::var("ASGE_CUDA_SYNC").is_ok_and(|v| v == "1"),
            tiles: geometry::Tiles::default(),
            marks: Mutex::new(Vec::new()),
            step_params: Mutex::new(step_params),
            graphs: Mutex::new(graph::StepGraphs::default()),
            lane_events: Mutex::new(lane_events),
            capturing: std::sync::atomic::AtomicBool::new(false),
            input_copies_reused: std::sync::atomic::AtomicUsize::new(0),
            inputs_read_as_stored: std::sync::atomic::AtomicUsize::new(0),
            graphs_allowed: !std::env::var("ASGE_CUDA_GRAPHS").is_ok_and(|v| v == "0"),
            comm,
        })
    }

    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The device's name as the driver reports it (the stand-in's says "CUDA stand-in").
    pub fn device_name(&self) -> &str {
        &self.device
    }

    /// True when the device is the driver stand-in (timings then measure the emulator).
    pub fn is_standin(&self) -> bool {
        standin::active() && self.device.contains("CUDA stand-in")
    }

    /// This backend issuing every training step's ops (no step graphs): the reference the graph tests compare
    /// against.
    pub fn without_step_graphs(self) -> Self {
        CudaBackend { graphs_allowed: false, ..self }
    }

    /// This backend with its conv operands (layer inputs, conv outputs, weight copies) in `precision`.
    pub fn with_precision(self, precision: Precision) -> Self {
        CudaBackend { precision, ..self }
    }

    /// This backend with the fp16 GEMM variants `tiles` forces instead of each shape's choice: for the device
    /// parity tests, which run every variant on every case, and for benchmarks. The numbers of a step do not
    /// depend on it beyond rounding (the variants sum in different orders).
    pub fn with_tiles(self, tiles: geometry::Tiles) -> Self {
        CudaBackend { tiles, ..self }
    }

    /// The forced fp16 GEMM variants ([`CudaBackend::with_tiles`]).
    pub fn tiles(&self) -> geometry::Tiles {
        self.tiles
    }

    fn alloc_f32(&self, len: usize) -> Result<CudaSlice<f32>> {
        drv(self.stream().alloc_zeros::<f32>(len.max(1)), "alloc")
    }

    pub(crate) fn lane_index(&self) -> usize {
        self.layer.load(std::sync::atomic::Ordering::Relaxed) % self.streams.len()
    }

    /// The stream of the current lane: the op being issued is launched on it.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.streams[self.lane_index()]
    }

    /// Makes the lane of `layer` (the layer an op's arguments name; the layer count for the fusion heads) the
    /// current one, for the op about to be launched: `layer % lanes`, which while several lanes are captured first
    /// waits on the latest hand-off.
    pub(crate) fn enter_layer(&self, layer: usize) -> Result<()> {
        self.layer.store(layer, std::sync::atomic::Ordering::Relaxed);
        self.capture_switch_lane(self.lane_index())
    }

    /// The stream memory operations ([`Device`]'s uploads, reads, fills) are queued on: the first lane's, where a
    /// batch's input is written and a step graph is launched. cudarc's per-buffer events order it with the others.
    fn memory_stream(&self) -> &Arc<CudaStream> {
        &self.streams[0]
    }

    /// The statistics readback's stream (for tests that hold a stream in the stand-in).
    pub fn readback_stream(&self) -> &Arc<CudaStream> {
        &self.rb_stream
    }

    /// Every lane's stream, lane 0 first.
    pub fn streams(&self) -> &[Arc<CudaStream>] {
        &self.streams
    }

    pub(crate) fn f(&self, name: &str) -> Result<&CudaFunction> {
        self.funcs.get(name).with_context(|| format!("kernel {name} is not loaded"))
    }

    /// Where the current launch belongs, for errors: the trainer sets the lane to the layer (or, for the heads,
    /// to the layer count) whether or not the layers run on their own streams.
    fn site(&self) -> String {
        let layer = self.layer.load(std::sync::atomic::Ordering::Relaxed);
        format!("layer {} (lane {})", layer + 1, self.lane_index())
    }

    /// Launches `kernel` through `go` (which builds its arguments and launches it) and returns the result as an
    /// error naming the kernel and its layer. With `ASGE_CUDA_SYNC=1` the stream is synchronised first, so an
    /// error the kernel itself causes is reported here and not at a later call. With kernel timing on
    /// ([`Schedule::time_kernels`]) the launch is timed alone, with `work` beside its time.
    pub(crate) fn launch(
        &self,
        kernel: &'static str,
        work: Work,
        go: impl FnOnce() -> Result<Result<(), DriverError>>,
    ) -> Result<()> {
        let run = || -> Result<()> {
            go()?.map_err(|e| anyhow::anyhow!("cuda: launch of {kernel} at {}: {e:?}", self.site()))?;
            if self.sync_each {
                self.stream().synchronize().map_err(|e| {
                    anyhow::anyhow!("cuda: {kernel} at {} failed (ASGE_CUDA_SYNC=1): {e:?}", self.site())
                })?;
            }
            Ok(())
        };
        if self.kernel_timing() && !self.capturing() {
            let layer = self.layer.load(std::sync::atomic::Ordering::Relaxed) + 1;
            self.timed_launch(kernel, layer, work, run)
        } else {
            run()
        }
    }

    /// A scratch buffer of at least `len` values in `slot`, reallocated when too small.
    pub(crate) fn scratch<'a, T: cudarc::driver::DeviceRepr>(
        &self,
        slot: &'a mut Option<CudaSlice<T>>,
        len: usize,
    ) -> Result<&'a mut CudaSlice<T>> {
        if slot.as_ref().is_none_or(|s| s.len() < len) {
            // Captured graphs point at the buffer being replaced.
            self.drop_step_graphs("a scratch buffer grew")?;
            *slot = None;
            // SAFETY: every scratch user writes what it reads first (partials, dL/ds, the gather, the layouts).
            *slot = Some(drv(unsafe { self.stream().alloc::<T>(len.max(1)) }, "alloc")?);
        }
        Ok(slot.as_mut().expect("just filled"))
    }

    /// How many fp16 weight gradients used the forward's channels-last copy of their input instead of making
    /// it again (backend/cuda/layout.rs).
    pub fn input_copies_reused(&self) -> usize {
        self.input_copies_reused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many fp16 convs (forwards and weight gradients) read a channels-last layer output as their input, with
    /// no copy (backend/cuda/layout.rs).
    pub fn inputs_read_as_stored(&self) -> usize {
        self.inputs_read_as_stored.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn layout_scratch(&self) -> MutexGuard<'_, LayoutScratch> {
        self.layout_scratch[self.lane_index()].lock().unwrap()
    }

    pub(crate) fn wgrad_scratch(&self) -> MutexGuard<'_, Option<CudaSlice<f32>>> {
        self.wgrad_scratch[self.lane_index()].lock().unwrap()
    }

    pub(crate) fn head_scratch(&self) -> MutexGuard<'_, Option<CudaSlice<f32>>> {
        self.head_scratch.lock().unwrap()
    }

    /// Uploads a table and waits for the copy: tables are built once and then read from every lane.
    fn upload_table<T: cudarc::driver::DeviceRepr>(&self, host: &[T], what: &str) -> Result<CudaSlice<T>> {
        let t = drv(self.stream().clone_htod(host), what)?;
        drv(self.stream().synchronize(), what)?;
        Ok(t)
    }

    /// The layer's tap table on the device (see `geometry::tap_table`), built on first use.
    pub(crate) fn tap_table(&self, s: &ConvShape) -> Result<Arc<CudaSlice<i32>>> {
        let key = (s.c_in, s.h, s.w);
        let mut tables = self.tap_tables.lock().unwrap();
        if let Some(t) = tables.get(&key) {
            return Ok(t.clone());
        }
        let host = geometry::tap_table(s.c_in, s.h, s.w).map_err(|e| anyhow::anyhow!("cuda backend: {e}"))?;
        let t = Arc::new(self.upload_table(&host, "copy tap table")?);
        tables.insert(key, t.clone());
        Ok(t)
    }

    /// The fp16 forward's chunk table on the device (see `geometry::nhwc_tap_table`), built on first use.
    pub(crate) fn nhwc_tap_table(&self, cp: usize, s: &ConvShape) -> Result<Arc<CudaSlice<i32>>> {
        let key = (cp, s.h, s.w);
        let mut tables = self.nhwc_tables.lock().unwrap();
        if let Some(t) = tables.get(&key) {
            return Ok(t.clone());
        }
        let host = geometry::nhwc_tap_table(cp, s.h, s.w).map_err(|e| anyhow::anyhow!("cuda backend: {e}"))?;
        let t = Arc::new(self.upload_table(&host, "copy chunk table")?);
        tables.insert(key, t.clone());
        Ok(t)
    }

    /// The fp16 weight gradient's pixel table on the device (see `geometry::pixel_masks`), built on first use.
    pub(crate) fn pixel_masks(&self, s: &ConvShape) -> Result<Arc<CudaSlice<u16>>> {
        let key = (s.batch, s.h, s.w);
        let mut tables = self.pixel_tables.lock().unwrap();
        if let Some(t) = tables.get(&key) {
            return Ok(t.clone());
        }
        let t = Arc::new(self.upload_table(&geometry::pixel_masks(s), "copy pixel table")?);
        tables.insert(key, t.clone());
        Ok(t)
    }

    /// The grid's cell table and divisors on the device (see `geometry::cell_table`), built on first use.
    pub(crate) fn cell_table(&self, grid: &PatchGrid, reduce: GoodnessReduce) -> Result<Arc<CellTable>> {
        let key = (grid.h, grid.w, grid.p, reduce == GoodnessReduce::Mean);
        let mut tables = self.cell_tables.lock().unwrap();
        if let Some(t) = tables.get(&key) {
            return Ok(t.clone());
        }
        let (cells, div) = geometry::cell_table(grid, reduce).map_err(|e| anyhow::anyhow!("cuda backend: {e}"))?;
        let t = Arc::new((self.upload_table(&cells, "copy cell table")?, self.upload_table(&div, "copy cell table")?));
        tables.insert(key, t.clone());
        Ok(t)
    }

    /// Zeroes the first `len` values (the head logits, which the heads accumulate into).
    pub(crate) fn zero(&self, buf: &mut CudaSlice<f32>, len: usize) -> Result<()> {
        if len > 0 {
            drv(self.stream().memset_zeros(&mut buf.slice_mut(0..len)), "memset")?;
        }
        Ok(())
    }
}

impl Ops for CudaBackend {
    fn conv_kernels(&self, s: &ConvShape) -> Option<[&'static str; 2]> {
        let (fwd, splits) = geometry::conv_fwd_choice(s, self.precision, self.tiles);
        let fwd = if splits > 1 { geometry::CONV_FWD_F16_SPLIT.name } else { fwd.name };
        Some([fwd, geometry::wgrad_choice(s, self.precision, self.tiles).name])
    }

    crate::ops::for_each_op!(crate::backend::cuda_ops);
}

impl Schedule for CudaBackend {
    type PendingRead = PendingRead;

    fn lanes(&self) -> usize {
        self.streams.len()
    }

    fn ranks(&self) -> usize {
        self.comm.as_ref().map_or(1, |c| c.group.world.size)
    }

    fn all_reduce_sum(&self, layer: usize, bufs: &mut [(&mut CudaBuf, usize)]) -> Result<()> {
        let Some(c) = &self.comm else {
            bail!("cuda backend: layer {}'s gradients: this process has no communicator (one rank)", layer + 1)
        };
        // After everything lane 0 (the only lane with several ranks) has queued: the buffers' last writers.
        drv(c.before.record(&self.streams[0]), "event")?;
        drv(c.stream.wait(&c.before), "stream wait")?;
        let comm = &c.group.comm;
        comm.group(|| {
            for (buf, len) in bufs.iter_mut() {
                let s = buf.f32_mut("an all-reduced buffer")?;
                fits("all-reduced buffer", s.len(), *len)?;
                let (ptr, _sync) = cudarc::driver::DevicePtrMut::device_ptr_mut(s, &c.stream);
                // SAFETY: `s` holds at least `len` f32 values (checked); lane 0 touches it again only after
                // join_collectives, which waits for this stream.
                unsafe { comm.all_reduce_raw::<f32>(ptr, *len, crate::dist::nccl::Reduce::Sum, c.stream.cu_stream()) }
                    .with_context(|| format!("the all-reduce of layer {}'s buffers", layer + 1))?;
            }
            Ok(())
        })?;
        c.pending.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn exchange(
        &self,
        send: &[(&CudaBuf, usize)],
        next: Option<usize>,
        recv: &mut [(&mut CudaBuf, usize)],
        prev: Option<usize>,
    ) -> Result<()> {
        let Some(c) = &self.comm else {
            bail!("cuda backend: a transfer between ranks, and this process has no communicator")
        };
        drv(c.before.record(&self.streams[0]), "event")?;
        drv(c.stream.wait(&c.before), "stream wait")?;
        let (comm, cs) = (&c.group.comm, c.stream.cu_stream());
        comm.group(|| {
            for (peer, (buf, len)) in next.into_iter().flat_map(|p| send.iter().map(move |b| (p, b))) {
                let size = buf.data().elem_bytes();
                fits("sent buffer", buf.len(), *len)?;
                let (ptr, _sync) = buf.data().device_ptr(&c.stream);
                // SAFETY: the buffer holds at least `len` values of `size` bytes (checked); this stream waits for
                // lane 0's work so far (`before`), and lane 0 writes the buffer again only after join_collectives,
                // which waits for this stream (`after`): those events, not cudarc's, order it.
                unsafe { comm.send_raw::<u8>(ptr, len * size, peer, cs) }.context("a layer pipeline's send")?;
            }
            if let Some(peer) = prev {
                for (buf, len) in recv.iter_mut() {
                    let size = buf.data().elem_bytes();
                    fits("received buffer", buf.len(), *len)?;
                    let (ptr, _sync) = buf.data_mut().device_ptr_mut(&c.stream);
                    // SAFETY: as for the sends.
                    unsafe { comm.recv_raw::<u8>(ptr, *len * size, peer, cs) }.context("a layer pipeline's receive")?;
                }
            }
            Ok(())
        })?;
        c.pending.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    fn received_output(&self, buf: &mut CudaBuf, shape: [usize; 4]) {
        // As the layer output stored it on the rank that sent it.
        if crate::ops::layer_output::cuda::stores_channels_last(buf.precision(), shape[1]) {
            self.mark_channels_last(buf, shape);
        }
    }

    fn join_collectives(&self) -> Result<()> {
        let Some(c) = &self.comm else { return Ok(()) };
        if c.pending.swap(false, std::sync::atomic::Ordering::Relaxed) {
            drv(c.after.record(&c.stream), "event")?;
            drv(self.streams[0].wait(&c.after), "stream wait")?;
        }
        Ok(())
    }

    fn all_reduce_host(&self, values: &mut [f64], op: super::Reduction) -> Result<()> {
        let Some(c) = &self.comm else { return Ok(()) };
        if values.is_empty() {
            return Ok(());
        }
        // After every collective lane 0 has queued (a replayed step's), in the communicator's order.
        drv(c.before.record(&self.streams[0]), "event")?;
        drv(c.stream.wait(&c.before), "stream wait")?;
        let mut buf = drv(c.stream.clone_htod(values), "copy to the device")?;
        {
            let (ptr, _sync) = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut buf, &c.stream);
            let op = match op {
                super::Reduction::Sum => crate::dist::nccl::Reduce::Sum,
                super::Reduction::Max => crate::dist::nccl::Reduce::Max,
            };
            // SAFETY: `buf` holds values.len() f64 values, used by nothing else until the copy back below.
            unsafe { c.group.comm.all_reduce_raw::<f64>(ptr, values.len(), op, c.stream.cu_stream()) }?;
        }
        let back = c.stream.clone_dtoh(&buf).and_then(|v| c.stream.synchronize().map(|_| v));
        let back = back.map_err(|e| match c.group.failure() {
            Some(why) => anyhow::anyhow!("{why}"),
            None => anyhow::anyhow!("cuda: an all-reduce across ranks: {e:?}"),
        })?;
        // An abort releases the waits with whatever the buffers held: not a result.
        if let Some(why) = c.group.failure() {
            bail!("{why}");
        }
        c.group.comm.async_error()?;
        values.copy_from_slice(&back);
        c.group.beat();
        Ok(())
    }

    fn device_time_ms(&self, warmup: usize, reps: usize, f: &mut dyn FnMut() -> Result<()>) -> Result<Option<f64>> {
        self.time_ms(warmup, reps, f).map(Some)
    }

    fn device_mark(&self) -> Result<Option<usize>> {
        // On lane 0, where a step graph is launched, after it has waited for where every other lane stands (eager
        // work on several lanes included): the mark is past all the work issued so far.
        let lane0 = &self.streams[0];
        let others = &self.streams[1..];
        let waits: Vec<CudaEvent> = others
            .iter()
            .map(|s| drv(s.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)), "event"))
            .collect::<Result<_>>()?;
        wait_for_streams(lane0, &waits, others)?;
        let e = drv(lane0.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT)), "event")?;
        let mut marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        marks.push(e);
        Ok(Some(marks.len() - 1))
    }

    fn device_elapsed_ms(&self, a: usize, b: usize) -> Result<f64> {
        let marks = self.marks.lock().unwrap_or_else(|e| e.into_inner());
        let (ea, eb) = (marks.get(a).context("no such device mark")?, marks.get(b).context("no such device mark")?);
        Ok(drv(ea.elapsed_ms(eb), "event timing")? as f64)
    }

    fn prepare_step(&self, adamw: &AdamWScalars, dropout_keys: &[Option<u64>]) -> Result<()> {
        self.prepare_step_params(adamw, dropout_keys)
    }

    fn begin_step(&self, key: u64) -> Result<StepMode> {
        self.begin_step_graph(key)
    }

    fn end_step(&self, key: u64) -> Result<()> {
        self.end_step_graph(key)
    }

    fn take_device_spans(&self) -> Result<Vec<DeviceSpan>> {
        self.synchronize()?;
        self.device_spans()
    }

    fn time_kernels(&self, on: bool) -> Result<bool> {
        self.synchronize()?;
        self.set_kernel_timing(on);
        Ok(true)
    }

    fn take_kernel_times(&self) -> Result<Vec<KernelTime>> {
        self.synchronize()?;
        self.kernel_times()
    }

    fn queue_read(&self, srcs: &[&CudaBuf], len: usize) -> Result<PendingRead> {
        let f32s = srcs.iter().map(|s| s.f32("statistics")).collect::<Result<Vec<_>>>()?;
        for s in &f32s {
            fits("source", s.len(), len)?;
        }
        let mut rb = self.readback.lock().unwrap();
        let rb = &mut *rb;
        // The readback stream waits for everything queued so far on every lane (with several lanes cudarc's
        // per-buffer events also order it; with one lane this event is the only ordering), and nothing waits for
        // it: the lanes go on with the next step while the statistics are copied.
        wait_for_streams(&self.rb_stream, &rb.marks, &self.streams)?;
        let n = len * f32s.len();
        let slot = rb.next;
        rb.next ^= 1;
        if rb.gather.as_ref().is_none_or(|g| g.len() < n) {
            rb.gather = None;
            // SAFETY: written by the gather copies below before the copy to the host reads it.
            rb.gather = Some(drv(unsafe { self.rb_stream.alloc::<f32>(n.max(1)) }, "alloc")?);
        }
        let gather = rb.gather.as_mut().expect("just filled");
        for (i, s) in f32s.iter().enumerate() {
            drv(self.rb_stream.memcpy_dtod(&s.slice(0..len), &mut gather.slice_mut(i * len..(i + 1) * len)), "copy")?;
        }
        // Into pinned memory: truly asynchronous; `copied` marks its completion.
        let host = pinned(&self.ctx, &mut rb.pinned[slot], n.max(1), true)?;
        drv(self.rb_stream.memcpy_dtoh(&gather.slice(0..n.max(1)), host), "copy statistics to host")?;
        drv(rb.copied[slot].record(&self.rb_stream), "event")?;
        Ok(PendingRead { slot, count: f32s.len(), len })
    }

    fn collect_read(&self, p: PendingRead) -> Result<Vec<Vec<f32>>> {
        let rb = self.readback.lock().unwrap();
        // Waits for this copy only, not for the work queued after it.
        if let Err(e) = rb.copied[p.slot].synchronize() {
            // With several ranks, a collective the watchdog aborted (a lost rank) is the cause to name.
            if let Some(why) = self.comm.as_ref().and_then(|c| c.group.failure()) {
                bail!("{why}");
            }
            return drv(Err(e), "statistics readback");
        }
        if let Some(c) = &self.comm {
            if let Some(why) = c.group.failure() {
                bail!("{why}");
            }
            c.group.beat();
        }
        let host = rb.pinned[p.slot].as_ref().context("cuda: a statistics read without its buffer")?;
        let all = drv(host.as_slice(), "statistics readback")?;
        Ok(all[..p.count * p.len].chunks(p.len.max(1)).map(<[f32]>::to_vec).collect())
    }
}
