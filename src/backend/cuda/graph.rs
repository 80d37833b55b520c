//! The step as one CUDA graph, and the per-step values it reads from the device.
//!
//! A training step issues the same kernels with the same arguments every step of a given shape; what changes is
//! AdamW's scalars (the learning rate and the bias corrections) and the dropout keys. The kernels read those from
//! small device buffers ([`StepParams`]: per lane AdamW's seven scalars, per layer the key), which the host fills
//! before the step (`Backend::prepare_step`) with a copy queued on the lane that reads them; a slot is written only
//! when its value changes, so an eager step issues one copy per lane and layer at most. With that, the step can be
//! captured: `begin_step` runs a shape's first step eagerly (it allocates scratch and uploads tables, which a
//! capture may not), captures its second on lane 0 and launches the graph, and replays the graph from then on.
//! Keys are (batch, activation parity, statistics set): a step's buffers depend on all three.
//!
//! Graphs are used with one lane only, and not with `--trace` (timing events), `ASGE_CUDA_SYNC=1` (a
//! synchronisation after every launch) or `ASGE_CUDA_GRAPHS=0`. Several lanes are not captured yet: they are
//! ordered by cudarc's per-buffer events, and inside a capture a wait on an event recorded before it (the
//! previous step's last use of a buffer) is a dependency across the capture's boundary, which CUDA refuses
//! (`CUDA_ERROR_STREAM_CAPTURE_ISOLATION`). Capturing them needs the lanes' hand-offs as explicit events (a fork
//! from lane 0 at the step's start, one event per layer input handed to the next lane, a join at the end)
//! with cudarc's tracking off.
//! A scratch buffer that has to grow drops every graph (they point at the old one).

use super::{drv, CudaBackend};
use crate::backend::{AdamWScalars, AdamWStep, StepMode};
use anyhow::{bail, Result};
use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, CudaView};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

/// Layers (sites) with a dropout key slot: the trainer's layers and the heads.
pub const KEY_SLOTS: usize = 256;

/// The device buffers of the per-step values and what each slot holds now.
pub(super) struct StepParams {
    /// Per lane, AdamW's `{decay, w1, b2, w2, step_size, bc2_sqrt, eps}` at 8-float strides.
    hp: CudaSlice<f32>,
    hp_held: Vec<Option<[u32; 7]>>,
    /// Per site (the layer index the trainer sets as the lane), the dropout key.
    keys: CudaSlice<u64>,
    keys_held: Vec<Option<u64>>,
}

impl StepParams {
    pub(super) fn new(be_lanes: usize, hp: CudaSlice<f32>, keys: CudaSlice<u64>) -> Self {
        StepParams { hp, hp_held: vec![None; be_lanes], keys, keys_held: vec![None; KEY_SLOTS] }
    }
}

/// Captured step graphs by key, and the keys whose warm-up step has run.
#[derive(Default)]
pub(super) struct StepGraphs {
    graphs: HashMap<u64, CudaGraph>,
    warm: HashSet<u64>,
    pub(super) captured: usize,
    pub(super) replayed: usize,
}

// SAFETY: cudarc's CudaGraph holds raw driver handles, which the driver requires to be used from one thread at a
// time; every use here is under the backend's mutex around StepGraphs.
unsafe impl Send for StepGraphs {}

fn scalars_array(s: &AdamWScalars) -> [f32; 7] {
    [s.decay, s.w1, s.b2, s.w2, s.step_size, s.bc2_sqrt, s.eps]
}

impl CudaBackend {
    fn capturing(&self) -> bool {
        self.capturing.load(Ordering::Relaxed)
    }

    /// Makes lane `lane`'s AdamW slot hold `s` (a copy queued on that lane when it does not), and returns it.
    pub(super) fn adamw_slot<'a>(
        &self,
        sp: &'a mut StepParams,
        lane: usize,
        s: &AdamWScalars,
    ) -> Result<CudaView<'a, f32>> {
        let vals = scalars_array(s);
        let bits = vals.map(f32::to_bits);
        if sp.hp_held[lane] != Some(bits) {
            if self.capturing() {
                bail!(
                    "cuda: AdamW's scalars changed inside a captured step (Backend::prepare_step sets them before \
                     the step)"
                );
            }
            let mut dst = sp.hp.slice_mut(lane * 8..lane * 8 + 7);
            drv(self.streams[lane].memcpy_htod(&vals, &mut dst), "copy AdamW scalars")?;
            sp.hp_held[lane] = Some(bits);
        }
        Ok(sp.hp.slice(lane * 8..lane * 8 + 7))
    }

    /// Makes site `site`'s dropout slot hold `key` (a copy queued on the site's lane when it does not).
    pub(super) fn key_slot<'a>(&self, sp: &'a mut StepParams, site: usize, key: u64) -> Result<CudaView<'a, u64>> {
        anyhow::ensure!(site < KEY_SLOTS, "cuda backend: more than {KEY_SLOTS} layers");
        if sp.keys_held[site] != Some(key) {
            if self.capturing() {
                bail!("cuda: a dropout key changed inside a captured step (Backend::prepare_step sets them before the step)");
            }
            let lane = site % self.streams.len();
            drv(self.streams[lane].memcpy_htod(&[key], &mut sp.keys.slice_mut(site..site + 1)), "copy dropout key")?;
            sp.keys_held[site] = Some(key);
        }
        Ok(sp.keys.slice(site..site + 1))
    }

    pub(super) fn prepare_step_params(&self, h: &AdamWStep, keys: &[Option<u64>]) -> Result<()> {
        let mut sp = self.step_params.lock().unwrap();
        let s = h.scalars();
        for lane in 0..self.streams.len() {
            self.adamw_slot(&mut sp, lane, &s)?;
        }
        for (site, key) in keys.iter().enumerate() {
            if let Some(k) = key {
                self.key_slot(&mut sp, site, *k)?;
            }
        }
        Ok(())
    }

    fn graphs_on(&self) -> bool {
        self.graphs_allowed && self.streams.len() == 1 && !self.sync_each && !crate::trace::is_on()
    }

    pub(super) fn begin_step_graph(&self, key: u64) -> Result<StepMode> {
        if !self.graphs_on() {
            return Ok(StepMode::Eager);
        }
        let mut g = self.graphs.lock().unwrap();
        if self.capturing() {
            // A capture that an error interrupted: end it and drop what it recorded.
            self.capturing.store(false, Ordering::Relaxed);
            let _ =
                self.streams[0].end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
        }
        if let Some(graph) = g.graphs.get(&key) {
            drv(graph.launch(), "launch the step graph")?;
            g.replayed += 1;
            return Ok(StepMode::Replayed);
        }
        if g.warm.insert(key) {
            return Ok(StepMode::Eager);
        }
        drv(
            self.streams[0].begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
            "begin the step's capture",
        )?;
        self.capturing.store(true, Ordering::Relaxed);
        Ok(StepMode::Capture)
    }

    pub(super) fn end_step_graph(&self, key: u64) -> Result<()> {
        let mut g = self.graphs.lock().unwrap();
        self.capturing.store(false, Ordering::Relaxed);
        let graph = drv(
            self.streams[0].end_capture(CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH),
            "end the step's capture",
        )?
        .ok_or_else(|| anyhow::anyhow!("cuda: the step's capture recorded nothing"))?;
        // A capture records the step without running it: this step runs now, as the graph.
        drv(graph.launch(), "launch the step graph")?;
        g.graphs.insert(key, graph);
        g.captured += 1;
        Ok(())
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
