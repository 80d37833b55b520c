//! The step as one CUDA graph, and the per-step values it reads from the device.
//!
//! A training step issues the same kernels with the same arguments every step of a given shape; what changes is
//! AdamW's scalars (the learning rate and the bias corrections) and the dropout keys. The kernels read those from
//! small device buffers ([`StepParams`]: per lane AdamW's scalars, per layer the key), which the host fills
//! before the step (`Schedule::prepare_step`) with a copy queued on the lane that reads them; a slot is written only
//! when its value changes, so an eager step issues one copy per lane and layer at most. With that, the step can be
//! captured: `begin_step` runs a shape's first step eagerly (it allocates scratch and uploads tables, which a
//! capture may not), captures its second on lane 0 and launches the graph, and replays the graph from then on.
//! Keys are (batch, activation parity, statistics set): a step's buffers depend on all three.
//!
//! Graphs are not used with `--trace` (timing events), `ASGE_CUDA_SYNC=1` (a synchronisation after every launch)
//! or `ASGE_CUDA_GRAPHS=0`. A scratch buffer that has to grow drops every graph (they point at the old one).
//!
//! Several lanes ([`LaneEvents`]). Eagerly they are ordered by cudarc's per-buffer events. Those cannot be
//! captured: a wait on an event recorded before the capture (the previous step's last use of a buffer) is a
//! dependency across the capture's boundary, which CUDA refuses (`CUDA_ERROR_STREAM_CAPTURE_ISOLATION`). So
//! cudarc's tracking is off while a step is captured, and the capture orders the lanes by the trainer's schedule
//! instead: layer `l` reads only what layer `l - 1`'s output wrote (its input) and what was written before the
//! step, and the heads read what the layers' outputs wrote. Every lane joins the capture at its start (a fork
//! from lane 0's position there, which is also the first hand-off); each layer output records its lane's
//! hand-off event, and a lane the trainer switches to waits on the latest hand-off. At the end lane 0 waits on
//! every other lane (a join), and the capture is one graph launched on lane 0. Around every launch of a step graph the lanes meet:
//! lane 0 first waits on where every other lane (and the input copies' stream) stands, since the graph does not
//! see cudarc's events, and after it every other stream waits on the graph, so that the per-buffer events (stale
//! for what the graph did) stay enough for the eager work that follows (the next upload, an evaluation). Graph
//! steps therefore run one after another, each one's lanes concurrent inside it.

use super::buf::LayoutMark;
use super::{drv, wait_for_streams, CudaBackend, CudaBuf};
use crate::backend::{AdamWScalars, StepMode};
use anyhow::{bail, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaContext, CudaEvent, CudaGraph, CudaSlice, CudaView};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

/// Layers (sites) with a dropout key slot: the trainer's layers and the heads.
pub const KEY_SLOTS: usize = 256;

/// The device buffers of the per-step values and what each slot holds now.
pub(crate) struct StepParams {
    /// Per lane, AdamW's scalars, and their bits as last written.
    hp: CudaSlice<AdamWScalars>,
    hp_held: Vec<Option<[u32; 7]>>,
    /// Per site (the layer index the trainer sets as the lane), the dropout key.
    keys: CudaSlice<u64>,
    keys_held: Vec<Option<u64>>,
}

impl StepParams {
    pub(super) fn new(be_lanes: usize, hp: CudaSlice<AdamWScalars>, keys: CudaSlice<u64>) -> Self {
        StepParams { hp, hp_held: vec![None; be_lanes], keys, keys_held: vec![None; KEY_SLOTS] }
    }
}

/// The events that order several lanes in a captured step, and around a step graph's launch (module notes).
pub(super) struct LaneEvents {
    /// Per lane, its latest hand-off (or join) while capturing.
    hand_off: Vec<CudaEvent>,
    /// The lane whose hand-off is the latest.
    latest: usize,
    /// Where each lane other than 0 (then the copy stream) stood before a graph launch.
    before: Vec<CudaEvent>,
    /// The end of the last graph launch, which every other stream waits on.
    after: CudaEvent,
}

impl LaneEvents {
    pub(super) fn new(ctx: &std::sync::Arc<CudaContext>, lanes: usize) -> Result<Self> {
        let event = || drv(ctx.new_event(None), "event");
        Ok(LaneEvents {
            hand_off: (0..lanes).map(|_| event()).collect::<Result<_>>()?,
            latest: 0,
            before: (0..lanes).map(|_| event()).collect::<Result<_>>()?,
            after: event()?,
        })
    }
}

/// A channels-last mark a captured layer output set, and what it set it to.
type MarkSet = (LayoutMark, [usize; 4]);

/// Captured step graphs by key, and the keys whose warm-up step has run.
#[derive(Default)]
pub(super) struct StepGraphs {
    /// Per key the graph, and the channels-last marks its layer outputs set, in capture order (set again after
    /// each replay: a replay runs no host code).
    graphs: HashMap<u64, (CudaGraph, Vec<MarkSet>)>,
    /// The marks set so far by the capture in progress.
    capture_marks: Vec<MarkSet>,
    warm: HashSet<u64>,
    pub(super) captured: usize,
    pub(super) replayed: usize,
}

// SAFETY: cudarc's CudaGraph holds raw driver handles, which the driver requires to be used from one thread at a
// time; every use here is under the backend's mutex around StepGraphs.
unsafe impl Send for StepGraphs {}

// SAFETY: a #[repr(C)] struct of plain f32 values, no padding or invalid bit patterns: a GPU may read it as
// written on the host, and zeroed memory is a valid value.
unsafe impl cudarc::driver::DeviceRepr for AdamWScalars {}
unsafe impl cudarc::driver::ValidAsZeroBits for AdamWScalars {}

/// The bits of AdamW's scalars: a slot is rewritten when any bit differs (`==` on f32 would take -0 for 0).
fn scalar_bits(s: &AdamWScalars) -> [u32; 7] {
    const _: () = assert!(std::mem::size_of::<AdamWScalars>() == 28);
    // SAFETY: seven f32 fields in a #[repr(C)] struct (size checked above) have the layout of [u32; 7].
    unsafe { std::mem::transmute::<AdamWScalars, [u32; 7]>(*s) }
}

impl CudaBackend {
    pub(super) fn capturing(&self) -> bool {
        self.capturing.load(Ordering::Relaxed)
    }

    /// Makes lane `lane`'s AdamW slot hold `s` (a copy queued on that lane when it does not).
    fn set_adamw_slot(&self, sp: &mut StepParams, lane: usize, s: &AdamWScalars) -> Result<()> {
        let bits = scalar_bits(s);
        if sp.hp_held[lane] != Some(bits) {
            if self.capturing() {
                bail!(
                    "cuda: AdamW's scalars changed inside a captured step (Schedule::prepare_step sets them before \
                     the step)"
                );
            }
            let mut dst = sp.hp.slice_mut(lane..lane + 1);
            drv(self.streams[lane].memcpy_htod(std::slice::from_ref(s), &mut dst), "copy AdamW scalars")?;
            sp.hp_held[lane] = Some(bits);
        }
        Ok(())
    }

    /// Lane `lane`'s AdamW slot, which [`Schedule::prepare_step`](crate::backend::Schedule::prepare_step) filled.
    pub(crate) fn adamw_slot<'a>(&self, sp: &'a StepParams, lane: usize) -> Result<CudaView<'a, AdamWScalars>> {
        anyhow::ensure!(
            sp.hp_held[lane].is_some(),
            "cuda: adamw before the step's scalars were set (Schedule::prepare_step)"
        );
        Ok(sp.hp.slice(lane..lane + 1))
    }

    /// Makes site `site`'s dropout slot hold `key` (a copy queued on the site's lane when it does not).
    fn set_key_slot(&self, sp: &mut StepParams, site: usize, key: u64) -> Result<()> {
        anyhow::ensure!(site < KEY_SLOTS, "cuda backend: more than {KEY_SLOTS} layers");
        if sp.keys_held[site] != Some(key) {
            if self.capturing() {
                bail!("cuda: a dropout key changed inside a captured step (Schedule::prepare_step sets them before the step)");
            }
            let lane = site % self.streams.len();
            drv(self.streams[lane].memcpy_htod(&[key], &mut sp.keys.slice_mut(site..site + 1)), "copy dropout key")?;
            sp.keys_held[site] = Some(key);
        }
        Ok(())
    }

    /// Layer `site`'s dropout slot, which [`Schedule::prepare_step`](crate::backend::Schedule::prepare_step)
    /// filled.
    pub(crate) fn key_slot<'a>(&self, sp: &'a StepParams, site: usize) -> Result<CudaView<'a, u64>> {
        anyhow::ensure!(
            sp.keys_held.get(site).is_some_and(Option::is_some),
            "cuda: layer {}'s dropout before the step's dropout key was set (Schedule::prepare_step)",
            site + 1
        );
        Ok(sp.keys.slice(site..site + 1))
    }

    pub(super) fn prepare_step_params(&self, s: &AdamWScalars, keys: &[Option<u64>]) -> Result<()> {
        let mut sp = self.step_params.lock().unwrap();
        for lane in 0..self.streams.len() {
            self.set_adamw_slot(&mut sp, lane, s)?;
        }
        for (site, key) in keys.iter().enumerate() {
            if let Some(k) = key {
                self.set_key_slot(&mut sp, site, *k)?;
            }
        }
        Ok(())
    }

    fn graphs_on(&self) -> bool {
        self.graphs_allowed && !self.sync_each && !crate::trace::is_on() && !self.kernel_timing()
    }

    fn several_lanes(&self) -> bool {
        self.streams.len() > 1
    }

    fn lanes_captured(&self) -> bool {
        self.capturing() && self.several_lanes()
    }

    /// The streams other than lane 0 that a graph launch must be ordered with: the other lanes, the copy stream.
    fn side_streams(&self) -> impl Iterator<Item = &std::sync::Arc<cudarc::driver::CudaStream>> {
        self.streams[1..].iter().chain(&self.copy_stream)
    }

    /// Before a step graph's launch (or capture): with several lanes, lane 0 waits on where the others stand.
    fn meet_before_graph(&self) -> Result<()> {
        if !self.several_lanes() {
            return Ok(());
        }
        let ev = self.lane_events.lock().unwrap();
        wait_for_streams(&self.streams[0], &ev.before, self.side_streams())
    }

    /// After a step graph's launch: with several lanes, every other stream waits on it.
    fn meet_after_graph(&self) -> Result<()> {
        if !self.several_lanes() {
            return Ok(());
        }
        let ev = self.lane_events.lock().unwrap();
        drv(ev.after.record(&self.streams[0]), "event")?;
        for s in self.side_streams() {
            drv(s.wait(&ev.after), "stream wait")?;
        }
        Ok(())
    }

    /// While several lanes are captured: the ops issued next go to `lane`, which first waits on the latest
    /// hand-off.
    pub(super) fn capture_switch_lane(&self, lane: usize) -> Result<()> {
        if !self.lanes_captured() {
            return Ok(());
        }
        let ev = self.lane_events.lock().unwrap();
        if ev.latest != lane {
            drv(self.streams[lane].wait(&ev.hand_off[ev.latest]), "capture: hand a lane over")?;
        }
        Ok(())
    }

    /// While several lanes are captured: the current lane has written a layer's output (the next layer's input
    /// and the heads' features), which the lane the trainer switches to next waits for.
    pub(crate) fn capture_hand_off(&self) -> Result<()> {
        if !self.lanes_captured() {
            return Ok(());
        }
        let lane = self.lane_index();
        let mut ev = self.lane_events.lock().unwrap();
        drv(ev.hand_off[lane].record(&self.streams[lane]), "capture: record a hand-off")?;
        ev.latest = lane;
        Ok(())
    }

    /// Begins the capture on lane 0; with several lanes, cudarc's tracking off and every lane forked into it
    /// (module notes).
    fn begin_capture(&self) -> Result<()> {
        let lanes = self.several_lanes();
        if lanes {
            // SAFETY: while capturing, the lanes are ordered by the explicit hand-off and join events (module notes);
            // no buffer is allocated or freed inside a capture (the driver refuses it), and tracking is back on when
            // the capture ends, before any eager op.
            unsafe { self.ctx.disable_event_tracking() };
        }
        drv(
            self.streams[0].begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
            "begin the step's capture",
        )?;
        self.capturing.store(true, Ordering::Relaxed);
        if lanes {
            let mut ev = self.lane_events.lock().unwrap();
            // The fork, and the first hand-off: lane 0 where the capture begins.
            drv(ev.hand_off[0].record(&self.streams[0]), "capture: fork")?;
            ev.latest = 0;
            for s in &self.streams[1..] {
                drv(s.wait(&ev.hand_off[0]), "capture: fork")?;
            }
        }
        Ok(())
    }

    /// Ends the capture: lane 0 joins every other lane, tracking is back on. The graph, if the capture made one.
    fn end_capture(&self) -> Result<Option<CudaGraph>> {
        self.capturing.store(false, Ordering::Relaxed);
        let mut joined = Ok(());
        if self.several_lanes() {
            let ev = self.lane_events.lock().unwrap();
            joined = (1..self.streams.len()).try_for_each(|lane| {
                drv(ev.hand_off[lane].record(&self.streams[lane]), "capture: join")?;
                drv(self.streams[0].wait(&ev.hand_off[lane]), "capture: join")
            });
            // SAFETY: every stream's capture ends here; from now on cudarc's events order the eager ops again, and
            // meet_after_graph orders them after any graph launch.
            unsafe { self.ctx.enable_event_tracking() };
        }
        let graph = drv(
            self.streams[0].end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH),
            "end the step's capture",
        );
        joined?;
        graph
    }

    /// Launches a step graph on lane 0; with several lanes the other streams then wait on it.
    fn launch_graph(&self, graph: &CudaGraph) -> Result<()> {
        drv(graph.launch(), "launch the step graph")?;
        self.meet_after_graph()
    }

    pub(super) fn begin_step_graph(&self, key: u64) -> Result<StepMode> {
        if !self.graphs_on() {
            return Ok(StepMode::Eager);
        }
        let mut g = self.graphs.lock().unwrap();
        if self.capturing() {
            // A capture that an error interrupted: end it and drop what it recorded.
            let _ = self.end_capture();
        }
        if g.warm.insert(key) {
            return Ok(StepMode::Eager);
        }
        // A replay, or a capture whose graph is launched at the step's end: either way on lane 0, after what the
        // other streams were given before the step.
        self.meet_before_graph()?;
        if let Some((graph, marks)) = g.graphs.get(&key) {
            self.launch_graph(graph)?;
            for (mark, shape) in marks {
                *mark.lock().unwrap() = Some(*shape);
            }
            g.replayed += 1;
            return Ok(StepMode::Replayed);
        }
        g.capture_marks.clear();
        self.begin_capture()?;
        Ok(StepMode::Capture)
    }

    pub(super) fn end_step_graph(&self, key: u64) -> Result<()> {
        let mut g = self.graphs.lock().unwrap();
        let graph = self.end_capture()?.ok_or_else(|| anyhow::anyhow!("cuda: the step's capture recorded nothing"))?;
        // A capture records the step without running it: this step runs now, as the graph.
        self.launch_graph(&graph)?;
        let marks = std::mem::take(&mut g.capture_marks);
        g.graphs.insert(key, (graph, marks));
        g.captured += 1;
        Ok(())
    }

    /// Marks `out`, just written, as `shape` stored channels-last; while a step is captured, also records the mark
    /// for each replay to set again.
    pub(crate) fn mark_channels_last(&self, out: &mut CudaBuf, shape: [usize; 4]) {
        let mark = out.set_channels_last(shape);
        if self.capturing() {
            self.graphs.lock().unwrap().capture_marks.push((mark, shape));
        }
    }

    /// Drops every captured graph (a buffer they point at is being replaced); an error while capturing.
    pub(super) fn drop_step_graphs(&self, what: &str) -> Result<()> {
        if self.capturing() {
            bail!("cuda: {what} inside a captured step (the step's first, eager run should have made it)");
        }
        self.graphs.lock().unwrap().graphs.clear();
        Ok(())
    }

    /// Step graphs captured and replayed so far (for tests and the bench).
    pub fn step_graph_counts(&self) -> (usize, usize) {
        let g = self.graphs.lock().unwrap();
        (g.captured, g.replayed)
    }
}
