//! A model living on a backend: parameters, optimizer state and workspace, and the two passes written once
//! against [`Backend`]: the training step (forward sweep with every layer's local update) and the
//! evaluation forward.

use crate::backend::{AdamWStep, Backend, ConvShape, Precision, StepMode, STATS_LEN};
pub use crate::dist::layers::Stage;
use crate::model::{HeadParams, LayerParams, ModelSpec, Params, PatchGrid, Tensor};
use anyhow::Result;

mod memory;
pub use memory::{ensure_memory, host_memory_estimate};

/// AdamW hyperparameters shared by every optimizer of a run (docs/method.md §10).
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamW {
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamW {
    fn default() -> Self {
        AdamW { weight_decay: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// One trained tensor with its Adam moments and gradient: `value` is the f32 master copy, and a conv weight
/// in fp16 also has `compute`, the operand copy the convolution reads, rewritten by every AdamW step.
pub struct Param<B: Backend> {
    pub value: B::Buf,
    pub compute: Option<B::Buf>,
    pub grad: B::Buf,
    pub exp_avg: B::Buf,
    pub exp_avg_sq: B::Buf,
    pub len: usize,
}

impl<B: Backend> Param<B> {
    /// A parameter; `operand` marks a conv weight, which gets a compute copy when the backend is not f32.
    fn new(be: &B, host: &[f32], operand: bool) -> Result<Self> {
        let compute = if operand && be.precision() != Precision::F32 { Some(be.upload_operand(host)?) } else { None };
        Ok(Param {
            value: be.upload(host)?,
            compute,
            // Written by the weight gradient (or the heads) before AdamW reads it.
            grad: be.uninit(host.len())?,
            exp_avg: be.zeros(host.len())?,
            exp_avg_sq: be.zeros(host.len())?,
            len: host.len(),
        })
    }

    /// What an op that multiplies by this parameter reads: the compute copy when there is one.
    fn operand(&self) -> &B::Buf {
        self.compute.as_ref().unwrap_or(&self.value)
    }

    /// One AdamW step of this tensor of `layer` (the layer count for a fusion head).
    fn step(&mut self, be: &B, layer: usize) -> Result<()> {
        let copy = self.compute.as_mut();
        crate::ops::adamw::run(
            be,
            crate::ops::adamw::Args {
                layer,
                len: self.len,
                p: &mut self.value,
                grad: &self.grad,
                m: &mut self.exp_avg,
                v: &mut self.exp_avg_sq,
                copy,
            },
        )
    }
}

pub struct Layer<B: Backend> {
    pub conv_w: Param<B>,
    pub conv_b: Param<B>,
    pub proj_w: B::Buf,
    pub proj_b: B::Buf,
    grid: PatchGrid,
}

pub struct Head<B: Backend> {
    pub w: Param<B>,
    pub b: Param<B>,
}

/// Per-step losses and accuracy counts: one entry per layer, plus the fusion heads. With several ranks they are
/// the whole global batch's (summed over the ranks).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StepStats {
    /// The optimizer step these statistics belong to.
    pub step: u64,
    /// The step's images: the global batch.
    pub batch: usize,
    /// The ranks that asked to stop with this step ([`Net::vote_stop`]): every rank reads the same count, so all
    /// stop after the same step.
    pub stop_votes: usize,
    pub layer_loss: Vec<f64>,
    pub layer_correct: Vec<usize>,
    pub head_loss: f64,
    pub head_correct: usize,
}

/// Logits of one evaluation batch: `[B, N]` per layer (fixed projection) and for the fusion heads.
pub struct EvalLogits {
    pub layers: Vec<Vec<f32>>,
    pub fusion: Vec<f32>,
}

/// One layer's scratch: its conv output, goodness, goodness gradient and projection logits.
struct Scratch<B: Backend> {
    y: B::Buf,
    g: B::Buf,
    dg: B::Buf,
    logits: B::Buf,
}

struct Workspace<B: Backend> {
    /// Activations between layers. In order (one lane): two buffers taken in turn, layer `l` reads
    /// `acts[l % 2]`. With several lanes: two slots per layer boundary, alternating by step, so that batch
    /// `t + 1` never overwrites an input that batch `t`'s weight gradient still reads.
    acts: Vec<B::Buf>,
    /// One scratch shared by every layer (one lane), or one per layer.
    scratch: Vec<Scratch<B>>,
    concurrent: bool,
    /// The step's slot of the double buffer (with several lanes).
    parity: usize,
    /// In layer-parallel training, while a tick's layers run: the boundary whose activations arrived from the
    /// previous rank, in their own buffer (`acts[2]`), so that the next tick's receive never overwrites what this
    /// rank's output, sent in that same tick, still holds.
    inbox: Option<usize>,
    /// Each layer's pooled features for the fusion heads: one set, or two in layer-parallel training (the set a
    /// tick's layers write and receive into, and the previous tick's, being sent on).
    gap: Vec<Vec<B::Buf>>,
    gap_set: usize,
    head_logits: B::Buf,
    labels: B::Labels,
    /// `[loss_sum, correct]` per layer, then the fusion heads', then the step's `[stop votes, 0]`, in two sets: a
    /// step writes `stats[stats_set]` while the previous step's set waits to be read (see
    /// `Net::train_step_pipelined`). With several ranks they are summed over the ranks in the step. In
    /// layer-parallel training `ranks + 1` sets, step `s` in set `s % len`, each with its batch: a step's
    /// statistics are summed once the last rank has trained it.
    stats: Vec<Vec<B::Buf>>,
    stats_set: usize,
    stats_batch: Vec<(u64, usize)>,
    max_batch: usize,
}

/// A queued training step whose statistics have not been read yet: the read, queued after the step's ops.
struct PendingStats<R> {
    read: R,
    batch: usize,
    step: u64,
}

/// A step one rank of layer-parallel training works on in a tick ([`Net::pipeline_tick`]): its batch (the inputs
/// are read on the first rank only), lr, optimizer step and dropout, as [`Net::train_step`] takes them.
pub struct TickStep<'a> {
    pub x: &'a [f32],
    pub labels: &'a [u32],
    pub lr: f64,
    pub step: u64,
    pub dropout: Option<(f32, u64)>,
}

/// The part of a step's global batch this process trains on: the index of its first sample and the global
/// batch's size. In data-parallel training every rank trains on its share, the losses are means over the global
/// batch (so the ranks' gradients sum to the global batch's gradient) and the dropout masks are keyed by the
/// global sample index (so a share draws the masks one process would).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Share {
    pub first: usize,
    pub global: usize,
}

impl<B: Backend> Workspace<B> {
    /// The index in `acts` of the activations entering layer `boundary` (`boundary = L`: the last output).
    fn act(&self, boundary: usize) -> usize {
        if self.inbox == Some(boundary) {
            2
        } else if self.concurrent {
            2 * boundary + self.parity
        } else {
            boundary % 2
        }
    }

    fn scratch_of(&self, layer: usize) -> usize {
        if self.concurrent {
            layer
        } else {
            0
        }
    }
}

/// `(&v[i], &mut v[j])` for `i != j`.
fn pair<T>(v: &mut [T], i: usize, j: usize) -> (&T, &mut T) {
    assert_ne!(i, j);
    if i < j {
        let (a, b) = v.split_at_mut(j);
        (&a[i], &mut b[0])
    } else {
        let (a, b) = v.split_at_mut(i);
        (&b[0], &mut a[j])
    }
}

/// The model on a backend.
pub struct Net<B: Backend> {
    pub spec: ModelSpec,
    pub layers: Vec<Layer<B>>,
    pub heads: Vec<Head<B>>,
    pub adamw: AdamW,
    ws: Workspace<B>,
    be: B,
    /// The step `train_step_pipelined` queued last, until its statistics are returned.
    pending: Option<PendingStats<B::PendingRead>>,
    /// The next step's share of its global batch ([`Net::set_share`]); `None`: the whole batch.
    share: Option<Share>,
    /// This rank asks to stop with the next step ([`Net::vote_stop`]).
    stop_vote: bool,
    /// Layer-parallel training: the layers this rank trains ([`Net::set_stage`]).
    stage: Option<Stage>,
    /// Layer-parallel training: the ticks run so far (their parity picks the pooled features' set).
    tick: u64,
}

impl<B: Backend> Net<B> {
    /// Puts `params` on the backend with fresh (zero) optimizer state and a workspace for `max_batch`.
    pub fn new(be: B, spec: ModelSpec, params: &Params, adamw: AdamW, max_batch: usize) -> Result<Self> {
        let layers = spec
            .layers
            .iter()
            .zip(&params.layers)
            .map(|(l, p)| {
                Ok(Layer {
                    conv_w: Param::new(&be, &p.conv_w, true)?,
                    conv_b: Param::new(&be, &p.conv_b, false)?,
                    proj_w: be.upload(&p.proj_w)?,
                    proj_b: be.upload(&p.proj_b)?,
                    grid: l.grid(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let heads = params
            .heads
            .iter()
            .map(|h| Ok(Head { w: Param::new(&be, &h.w, false)?, b: Param::new(&be, &h.b, false)? }))
            .collect::<Result<Vec<_>>>()?;
        let n = spec.classes;
        let b = max_batch;
        let concurrent = be.lanes() > 1;
        // Sizes of the activations entering each layer boundary, and of each layer's scratch.
        let boundary: Vec<usize> = (0..=spec.layers.len()).map(|i| boundary_len(&spec, i)).collect();
        let scratch_of = |l: &crate::model::LayerSpec| (l.c_out * l.h * l.w, l.goodness_dim());
        let (acts, scratch) = if concurrent {
            let acts =
                boundary.iter().flat_map(|&a| [a, a]).map(|a| be.operand_uninit(b * a)).collect::<Result<_>>()?;
            let scratch = spec.layers.iter().map(scratch_of).collect::<Vec<_>>();
            (acts, scratch)
        } else {
            let max_act = boundary.iter().copied().max().unwrap_or(0);
            let acts = vec![be.operand_uninit(b * max_act)?, be.operand_uninit(b * max_act)?];
            let (y, d) = spec.layers.iter().map(scratch_of).fold((0, 0), |m, s| (m.0.max(s.0), m.1.max(s.1)));
            (acts, vec![(y, d)])
        };
        let scratch = scratch
            .into_iter()
            .map(|(y, d)| {
                // Every scratch buffer is written by an op before another reads it.
                Ok(Scratch {
                    y: be.operand_uninit(b * y)?,
                    g: be.uninit(b * d)?,
                    dg: be.uninit(b * d)?,
                    logits: be.uninit(b * n)?,
                })
            })
            .collect::<Result<_>>()?;
        // Zeroed at the start of every step (load_batch).
        let stats_set = || (0..spec.layers.len() + 2).map(|_| be.uninit(STATS_LEN)).collect::<Result<Vec<_>>>();
        let ws = Workspace {
            acts,
            scratch,
            concurrent,
            parity: 0,
            inbox: None,
            // Written by layer_output (from layer 2 on) before the heads read them; the heads zero their logits.
            gap: vec![spec.layers.iter().map(|l| be.uninit(b * l.c_out)).collect::<Result<_>>()?],
            gap_set: 0,
            head_logits: be.uninit(b * n)?,
            labels: be.labels(&[])?,
            stats: vec![stats_set()?, stats_set()?],
            stats_set: 0,
            stats_batch: vec![(0, 0); 2],
            max_batch,
        };
        Ok(Net {
            spec,
            layers,
            heads,
            adamw,
            ws,
            be,
            pending: None,
            share: None,
            stop_vote: false,
            stage: None,
            tick: 0,
        })
    }

    /// Makes this net one rank's part of layer-parallel training: it trains `stage`'s layers (and the fusion heads
    /// on the last rank) through [`Net::pipeline_tick`] (docs/many-gpus.md).
    pub fn set_stage(&mut self, stage: Stage) -> Result<()> {
        let be = &self.be;
        anyhow::ensure!(
            !self.ws.concurrent,
            "layer-parallel training runs one lane per rank (ASGE_CUDA_LANES=1): several lanes are not supported yet"
        );
        anyhow::ensure!(self.ws.gap.len() == 1 && self.stage.is_none(), "Net::set_stage: called twice");
        let b = self.ws.max_batch;
        self.ws.acts.push(be.operand_uninit(b * boundary_len(&self.spec, stage.lo))?);
        self.ws.gap.push(self.spec.layers.iter().map(|l| be.uninit(b * l.c_out)).collect::<Result<_>>()?);
        // A set per step in flight, and one more: rank 0 zeroes step s's set while the read of step s - ranks's
        // (queued in the previous tick, on the read stream, which lane 0 does not wait for) may still be running.
        let sets = stage.ranks + 1;
        while self.ws.stats.len() < sets {
            let set = (0..self.spec.layers.len() + 2).map(|_| be.uninit(STATS_LEN)).collect::<Result<Vec<_>>>()?;
            self.ws.stats.push(set);
        }
        self.ws.stats_batch = vec![(u64::MAX, 0); sets];
        self.stage = Some(stage);
        Ok(())
    }

    /// This rank's layers in layer-parallel training.
    pub fn stage(&self) -> Option<Stage> {
        self.stage
    }

    pub fn backend(&self) -> &B {
        &self.be
    }

    pub fn max_batch(&self) -> usize {
        self.ws.max_batch
    }

    /// A queued step's statistics: waits for the step's read (`queue_read`), not for what was queued after it.
    fn read_stats(&self, p: PendingStats<B::PendingRead>) -> Result<StepStats> {
        let mut read = self.be.collect_read(p.read)?;
        let flags = read.pop().expect("the step's flags slot");
        let heads = read.pop().expect("the heads' stats slot");
        let per_sample = |s: &[f32]| s[0] as f64 / p.batch as f64;
        Ok(StepStats {
            step: p.step,
            batch: p.batch,
            stop_votes: flags[0].round() as usize,
            head_loss: per_sample(&heads),
            head_correct: heads[1].round() as usize,
            layer_loss: read.iter().map(|s| per_sample(s)).collect(),
            layer_correct: read.iter().map(|s| s[1].round() as usize).collect(),
        })
    }

    /// Writes a batch's inputs (unless `input` is false: a later rank of the layer pipeline, whose inputs arrive from
    /// the previous one) and labels, and zeroes the statistics set the step writes.
    fn load_batch(&mut self, x: &[f32], labels: &[u32], input: bool) -> Result<usize> {
        let batch = labels.len();
        anyhow::ensure!(
            batch > 0 && batch <= self.ws.max_batch,
            "batch of {batch} (workspace holds {})",
            self.ws.max_batch
        );
        let l0 = &self.spec.layers[0];
        anyhow::ensure!(
            x.len() == batch * l0.c_in * l0.h * l0.w,
            "input of {} values for a batch of {batch} {}x{}x{} images",
            x.len(),
            l0.c_in,
            l0.h,
            l0.w
        );
        if input {
            let a0 = self.ws.act(0);
            self.be.write_input(&mut self.ws.acts[a0], x)?;
        }
        self.be.write_labels(&mut self.ws.labels, labels)?;
        let set = &mut self.ws.stats[self.ws.stats_set];
        for slot in set.iter_mut() {
            self.be.fill_zero(slot, STATS_LEN)?;
        }
        // The stop vote (zero, as the fill left it, unless this rank votes): no host copy a step otherwise.
        if self.stop_vote {
            self.be.write(set.last_mut().expect("the step's flags slot"), &[1.0, 0.0])?;
        }
        Ok(batch)
    }

    /// The next training step's share of its global batch (data-parallel training; see [`Share`]): kept until
    /// changed; `None` trains on the whole batch.
    pub fn set_share(&mut self, share: Option<Share>) {
        self.share = share;
    }

    /// Whether this rank asks to stop with the next step: the steps' statistics count the ranks that did
    /// ([`StepStats::stop_votes`]), the same count on every rank.
    pub fn vote_stop(&mut self, stop: bool) {
        self.stop_vote = stop;
    }

    /// One training step on a batch of normalised inputs `[B, C, S, S]` (docs/method.md §8): every layer's forward,
    /// local loss, weight gradient and AdamW step, its output from the pre-step activations; then the fusion
    /// heads on the detached features. `dropout` is `(p, key)`: the masks are drawn per layer from `key`.
    /// Returns the step's statistics, so it waits for the step to finish; a training loop that need not
    /// (`train_step_pipelined`) keeps a GPU busy while the host queues the next step.
    pub fn train_step(
        &mut self,
        x: &[f32],
        labels: &[u32],
        lr: f64,
        step: u64,
        dropout: Option<(f32, u64)>,
    ) -> Result<StepStats> {
        anyhow::ensure!(
            self.pending.is_none(),
            "Net::train_step: a pipelined step's statistics are still pending (call flush_stats first)"
        );
        self.train_step_pipelined(x, labels, lr, step, dropout)?;
        Ok(self.flush_stats()?.expect("the step just queued"))
    }

    /// [`Net::train_step`] without waiting for it: queues the step and returns the statistics of the step queued
    /// before it (`None` for the first), reading them once that step is done, which on a GPU is while this one
    /// runs. The numbers are the same as `train_step`'s, one call later; [`Net::flush_stats`] returns the last.
    pub fn train_step_pipelined(
        &mut self,
        x: &[f32],
        labels: &[u32],
        lr: f64,
        step: u64,
        dropout: Option<(f32, u64)>,
    ) -> Result<Option<StepStats>> {
        self.ws.parity = (step % 2) as usize;
        anyhow::ensure!(self.stage.is_none(), "Net::train_step: a layer-parallel rank trains through pipeline_tick");
        let batch = self.load_batch(x, labels, true)?;
        let share = self.share.unwrap_or(Share { first: 0, global: batch });
        anyhow::ensure!(
            share.first.checked_add(batch).is_some_and(|end| end <= share.global),
            "Net::train_step: a share of {batch} samples from sample {} of a global batch of {}",
            share.first,
            share.global
        );
        let dropout = self.prepare_step(lr, step, dropout)?;
        // The step's ops depend on the batch size and on which activation and statistics buffers it uses: a
        // backend that records steps (CUDA graphs) keeps one recording per combination.
        // (A share's place in the global batch is in its kernels' arguments too.)
        let graph_key = [batch, self.ws.parity, self.ws.stats_set, share.first, share.global]
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, &v| (h ^ v as u64).wrapping_mul(0x0100_0000_01b3));
        let mode = self.be.begin_step(graph_key)?;
        if mode != StepMode::Replayed {
            let layers = self.layers.len();
            for li in 0..layers {
                self.layer_pass(li, batch, step, Some(dropout.map(|d| d.0)), share)?;
            }
            let span = crate::trace::span("fusion heads", crate::trace::HEADS, step);
            self.heads_pass(batch, true, share.global)?;
            std::mem::drop(span);
            if self.be.ranks() > 1 {
                self.reduce_and_update(step)?;
            }
            let _span = crate::trace::span("fusion heads", crate::trace::HEADS, step);
            self.heads_adamw()?;
            if self.be.ranks() > 1 {
                // The step's statistics and stop votes, summed over the ranks before the read below.
                let mut slots: Vec<(&mut B::Buf, usize)> =
                    self.ws.stats[self.ws.stats_set].iter_mut().map(|s| (s, STATS_LEN)).collect();
                self.be.all_reduce_sum(layers, &mut slots)?;
                self.be.join_collectives()?;
            }
            if mode == StepMode::Capture {
                self.be.end_step(graph_key)?;
            }
        }
        let slots: Vec<&B::Buf> = self.ws.stats[self.ws.stats_set].iter().collect();
        let queued = PendingStats { read: self.be.queue_read(&slots, STATS_LEN)?, batch: share.global, step };
        // The next step (or evaluation) writes the other set; this one is read first.
        self.ws.stats_set = (self.ws.stats_set + 1) % self.ws.stats.len();
        match self.pending.replace(queued) {
            Some(earlier) => self.read_stats(earlier).map(Some),
            None => Ok(None),
        }
    }

    /// Sets step `step`'s AdamW scalars and each layer's dropout key (`Schedule::prepare_step`); returns the dropout
    /// the ops apply, if any.
    fn prepare_step(&self, lr: f64, step: u64, dropout: Option<(f32, u64)>) -> Result<Option<(f32, u64)>> {
        let h = AdamWStep {
            lr,
            weight_decay: self.adamw.weight_decay,
            beta1: self.adamw.beta1,
            beta2: self.adamw.beta2,
            eps: self.adamw.eps,
            step,
        };
        // Each layer's dropout key: the step's (set once, by prepare_step); the ops take only the probability.
        let dropout = dropout.filter(|d| d.0 > 0.0);
        let keys: Vec<Option<u64>> =
            (0..self.layers.len()).map(|li| dropout.map(|(_, key)| crate::rng::derive(key, li as u64))).collect();
        self.be.prepare_step(&h.scalars(), &keys)?;
        Ok(dropout)
    }

    /// Several ranks, each on its share of every batch.
    fn data_parallel(&self) -> bool {
        self.be.ranks() > 1 && self.stage.is_none()
    }

    /// One tick of layer-parallel training, which every rank runs at once (docs/many-gpus.md). First the pipeline
    /// moves on: this rank sends the previous tick's output (and the pooled features of the layers up to it, for
    /// the fusion heads) to the next rank and receives this tick's input from the previous one, in one group on the
    /// communication stream. Then `work`, if any, is trained on this rank's layers: rank `r` works on step `s - r`
    /// while rank 0 works on step `s`, so every layer sees the inputs and weights it would see in one process. Last,
    /// `reduce`, the step the last rank has just finished, has its statistics summed over the ranks (each rank
    /// holds its own layers'). Returns the statistics of the step the previous tick reduced (as
    /// [`Net::train_step_pipelined`] returns the previous step's), `None` when it reduced none.
    pub fn pipeline_tick(&mut self, work: Option<TickStep<'_>>, reduce: Option<u64>) -> Result<Option<StepStats>> {
        let st = self.stage.ok_or_else(|| anyhow::anyhow!("Net::pipeline_tick: not a layer-parallel rank"))?;
        self.tick += 1;
        let now = (self.tick % 2) as usize;
        self.exchange(st, now)?;
        if let Some(w) = work {
            self.tick_layers(st, now, w)?;
        }
        let queued = reduce.map(|step| self.reduce_stats(step)).transpose()?;
        let earlier = match queued {
            Some(q) => self.pending.replace(q),
            None => self.pending.take(),
        };
        earlier.map(|p| self.read_stats(p)).transpose()
    }

    /// The pipeline's transfers of a tick (see [`Net::pipeline_tick`]): the previous tick's output and pooled
    /// features out, this tick's in (into the inbox and the pooled-feature set `now`).
    fn exchange(&mut self, st: Stage, now: usize) -> Result<()> {
        let b = self.ws.max_batch;
        let spec = &self.spec;
        let per_sample = |boundary: usize| boundary_len(spec, boundary);
        let ws = &mut self.ws;
        let (outputs, inbox) = ws.acts.split_at_mut(2);
        let (sent, arriving) = pair(&mut ws.gap, now ^ 1, now);
        let mut send: Vec<(&B::Buf, usize)> = Vec::new();
        if !st.last() {
            send.push((&outputs[st.hi % 2], b * per_sample(st.hi)));
            send.extend(spec.head_layers().filter(|&i| i < st.hi).map(|i| (&sent[i], b * spec.layers[i].c_out)));
        }
        let mut recv: Vec<(&mut B::Buf, usize)> = Vec::new();
        if st.rank > 0 {
            recv.push((&mut inbox[0], b * per_sample(st.lo)));
            let heads = spec.head_layers();
            for (i, g) in arriving.iter_mut().enumerate().filter(|(i, _)| heads.contains(i) && *i < st.lo) {
                recv.push((g, b * spec.layers[i].c_out));
            }
        }
        let next = (!st.last()).then_some(st.rank + 1);
        let prev = st.rank.checked_sub(1);
        self.be.exchange(&send, next, &mut recv, prev)?;
        self.be.join_collectives()
    }

    /// A tick's work on this rank's layers (see [`Net::pipeline_tick`]): the step's forward, losses and updates
    /// of layers `st.lo..st.hi`, and of the fusion heads on the last rank.
    fn tick_layers(&mut self, st: Stage, now: usize, w: TickStep<'_>) -> Result<()> {
        let set = (w.step % self.ws.stats.len() as u64) as usize;
        self.ws.stats_set = set;
        let batch = self.load_batch(w.x, w.labels, st.rank == 0)?;
        self.ws.stats_batch[set] = (w.step, batch);
        let dropout = self.prepare_step(w.lr, w.step, w.dropout)?;
        self.ws.gap_set = now;
        if st.rank > 0 {
            let l = &self.spec.layers[st.lo];
            self.be.received_output(&mut self.ws.acts[2], [batch, l.c_in, l.h, l.w]);
            self.ws.inbox = Some(st.lo);
        }
        let whole = Share { first: 0, global: batch };
        let mut run = || -> Result<()> {
            for li in st.lo..st.hi {
                self.layer_pass(li, batch, w.step, Some(dropout.map(|d| d.0)), whole)?;
            }
            if st.last() {
                let span = crate::trace::span("fusion heads", crate::trace::HEADS, w.step);
                self.heads_pass(batch, true, batch)?;
                self.heads_adamw()?;
                drop(span);
            }
            Ok(())
        };
        let r = run();
        self.ws.inbox = None;
        r
    }

    /// Queues the sum over the ranks of step `step`'s statistics (each rank holds its layers') and their read.
    fn reduce_stats(&mut self, step: u64) -> Result<PendingStats<B::PendingRead>> {
        let set = (step % self.ws.stats.len() as u64) as usize;
        let (held, batch) = self.ws.stats_batch[set];
        anyhow::ensure!(
            held == step,
            "Net::pipeline_tick: step {step}'s statistics were overwritten (by step {held}'s)"
        );
        let mut slots: Vec<(&mut B::Buf, usize)> = self.ws.stats[set].iter_mut().map(|s| (s, STATS_LEN)).collect();
        self.be.all_reduce_sum(self.layers.len(), &mut slots)?;
        self.be.join_collectives()?;
        let slots: Vec<&B::Buf> = self.ws.stats[set].iter().collect();
        Ok(PendingStats { read: self.be.queue_read(&slots, STATS_LEN)?, batch, step })
    }

    /// Layer-parallel training: gives every rank every trained tensor's value and AdamW moments as their owner
    /// (the rank that trains the layer; the last rank for the heads) holds them, for a checkpoint, an evaluation or
    /// the check that every rank holds the same weights. Each tensor is summed over the ranks with every rank but
    /// its owner contributing -0.0, which adds nothing to any value (-0.0 + x is x, +0.0 and NaN included), in
    /// whatever order NCCL sums. The fp16 copies of the conv weights this rank does not train are made again from
    /// the values. Call it with no tick's statistics pending (after the pipeline is drained).
    pub fn gather_stage(&mut self) -> Result<()> {
        let Some(st) = self.stage else { return Ok(()) };
        anyhow::ensure!(self.pending.is_none(), "Net::gather_stage: a tick's statistics are still pending");
        let be = &self.be;
        let mine = |t: Tensor| match t {
            Tensor::ConvW(l) | Tensor::ConvB(l) => (st.lo..st.hi).contains(&l),
            _ => st.last(),
        };
        let trained: Vec<Tensor> = self.spec.tensors().into_iter().filter(|t| t.trained()).collect();
        for &t in &trained {
            if !mine(t) {
                let p = trained_param_mut(&mut self.layers, &mut self.heads, t);
                let nothing = vec![-0.0f32; p.len];
                for buf in [&mut p.value, &mut p.exp_avg, &mut p.exp_avg_sq] {
                    be.write(buf, &nothing)?;
                }
            }
        }
        let layers = self.layers.len();
        let mut bufs: Vec<(&mut B::Buf, usize)> = Vec::with_capacity(3 * trained.len());
        let params = self.layers.iter_mut().flat_map(|l| [&mut l.conv_w, &mut l.conv_b]);
        for p in params.chain(self.heads.iter_mut().flat_map(|h| [&mut h.w, &mut h.b])) {
            let len = p.len;
            bufs.extend([(&mut p.value, len), (&mut p.exp_avg, len), (&mut p.exp_avg_sq, len)]);
        }
        be.all_reduce_sum(layers, &mut bufs)?;
        be.join_collectives()?;
        for (li, l) in self.layers.iter_mut().enumerate() {
            if !(st.lo..st.hi).contains(&li) && l.conv_w.compute.is_some() {
                let host = be.read(&l.conv_w.value, l.conv_w.len)?;
                l.conv_w.compute = Some(be.upload_operand(&host)?);
            }
        }
        Ok(())
    }

    /// Data-parallel training, after every layer's weight gradient and the heads': the heads' gradients summed over
    /// the ranks (the layers' were queued as each was computed, so that their transfer overlaps the next layers'
    /// work), then every layer's AdamW step once all sums are in. The heads' AdamW follows in the caller.
    fn reduce_and_update(&mut self, step: u64) -> Result<()> {
        let layers = self.layers.len();
        let mut grads: Vec<(&mut B::Buf, usize)> = Vec::with_capacity(2 * self.heads.len());
        for h in &mut self.heads {
            grads.push((&mut h.w.grad, h.w.len));
            grads.push((&mut h.b.grad, h.b.len));
        }
        self.be.all_reduce_sum(layers, &mut grads)?;
        self.be.join_collectives()?;
        for (li, layer) in self.layers.iter_mut().enumerate() {
            let _span = crate::trace::span("adamw", crate::trace::layer(li), step);
            layer.conv_w.step(&self.be, li)?;
            layer.conv_b.step(&self.be, li)?;
        }
        Ok(())
    }

    /// The statistics of the last step [`Net::train_step_pipelined`] queued and has not returned (waiting for
    /// it), or `None`.
    pub fn flush_stats(&mut self) -> Result<Option<StepStats>> {
        match self.pending.take() {
            Some(p) => self.read_stats(p).map(Some),
            None => Ok(None),
        }
    }

    /// Layer `li` on the batch in the workspace: forward with the fused goodness, the projection logits and
    /// loss; when training, the weight gradient and the AdamW step (after the forward, so the layer's output
    /// comes from the pre-step weights); then the layer output, which becomes the next layer's input. `train`
    /// is `None` to evaluate, else the dropout probability (AdamW's scalars and the dropout key are the step's:
    /// `Schedule::prepare_step`).
    /// `share` is the batch's place in the step's global batch (its whole self when evaluating). With several
    /// ranks the weight gradient's sum over the ranks is queued instead of the AdamW step (`reduce_and_update`).
    fn layer_pass(
        &mut self,
        li: usize,
        batch: usize,
        step: u64,
        train: Option<Option<f32>>,
        share: Share,
    ) -> Result<()> {
        let spec = &self.spec.layers[li];
        let s = ConvShape { batch, c_in: spec.c_in, c_out: spec.c_out, h: spec.h, w: spec.w };
        let data_parallel = self.data_parallel();
        let (be, ws, layer) = (&self.be, &mut self.ws, &mut self.layers[li]);
        let (a_in, a_out, k) = (ws.act(li), ws.act(li + 1), ws.scratch_of(li));
        let (x, x_next) = pair(&mut ws.acts, a_in, a_out);
        let sc = &mut ws.scratch[k];
        let reduce = self.spec.goodness;
        let track = crate::trace::layer(li);
        let span = crate::trace::span("conv_goodness_fwd", track, step);
        let (w, b) = (layer.conv_w.operand(), &layer.conv_b.value);
        crate::ops::conv_goodness_fwd::run(
            be,
            crate::ops::conv_goodness_fwd::Args {
                layer: li,
                s: &s,
                grid: &layer.grid,
                reduce,
                x,
                w,
                b,
                y: &mut sc.y,
                g: &mut sc.g,
            },
        )?;
        std::mem::drop(span);
        let span = crate::trace::span("goodness_loss", track, step);
        let dg = train.is_some().then_some(&mut sc.dg);
        let (d, n) = (spec.goodness_dim(), self.spec.classes);
        let (pw, pb) = (&layer.proj_w, &layer.proj_b);
        let stats = &mut ws.stats[ws.stats_set][li];
        crate::ops::goodness_loss::run(
            be,
            crate::ops::goodness_loss::Args {
                layer: li,
                batch,
                mean_over: share.global,
                dim: d,
                classes: n,
                g: &sc.g,
                proj_w: pw,
                proj_b: pb,
                labels: &ws.labels,
                logits: &mut sc.logits,
                dg,
                stats,
            },
        )?;
        std::mem::drop(span);
        // The output first: on a GPU the next layer's lane can start while this one computes its update.
        let span = crate::trace::span("layer_output", track, step);
        let pool = spec.pool.then_some(self.spec.pool_kind);
        let gap = (li >= 1).then_some(&mut ws.gap[ws.gap_set][li]);
        let dropout = train.flatten();
        crate::ops::layer_output::run(
            be,
            crate::ops::layer_output::Args {
                layer: li,
                batch,
                c: spec.c_out,
                h: spec.h,
                w: spec.w,
                pool,
                dropout,
                first_sample: share.first,
                y: &sc.y,
                out: x_next,
                gap,
            },
        )?;
        std::mem::drop(span);
        if train.is_some() {
            let span = crate::trace::span("conv_goodness_wgrad", track, step);
            let (dw, db) = (&mut layer.conv_w.grad, &mut layer.conv_b.grad);
            crate::ops::conv_goodness_wgrad::run(
                be,
                crate::ops::conv_goodness_wgrad::Args {
                    layer: li,
                    s: &s,
                    mean_over: share.global,
                    grid: &layer.grid,
                    reduce,
                    x,
                    y: &sc.y,
                    dg: &sc.dg,
                    dw,
                    db,
                },
            )?;
            std::mem::drop(span);
            if data_parallel {
                let _span = crate::trace::span("all-reduce", track, step);
                let (w, b) = (&mut layer.conv_w, &mut layer.conv_b);
                be.all_reduce_sum(li, &mut [(&mut w.grad, w.len), (&mut b.grad, b.len)])?;
            } else {
                let _span = crate::trace::span("adamw", track, step);
                layer.conv_w.step(be, li)?;
                layer.conv_b.step(be, li)?;
            }
        }
        Ok(())
    }

    /// The fusion heads' AdamW step, on their gradients.
    fn heads_adamw(&mut self) -> Result<()> {
        let layers = self.layers.len();
        for head in &mut self.heads {
            head.w.step(&self.be, layers)?;
            head.b.step(&self.be, layers)?;
        }
        Ok(())
    }

    /// The fusion heads on the workspace's batch; their loss is a mean over `mean_over` samples (the global batch).
    fn heads_pass(&mut self, batch: usize, with_grads: bool, mean_over: usize) -> Result<()> {
        let ws = &mut self.ws;
        let feats: Vec<(&B::Buf, usize)> =
            self.spec.head_layers().map(|i| (&ws.gap[ws.gap_set][i], self.spec.layers[i].c_out)).collect();
        let mut heads = Vec::with_capacity(self.heads.len());
        let mut grads = Vec::with_capacity(self.heads.len());
        for Head { w, b } in self.heads.iter_mut() {
            heads.push((&w.value, &b.value));
            grads.push((&mut w.grad, &mut b.grad));
        }
        let grads = if with_grads { Some(&mut grads[..]) } else { None };
        crate::ops::fusion_heads::run(
            &self.be,
            crate::ops::fusion_heads::Args {
                layer: self.layers.len(),
                batch,
                mean_over,
                classes: self.spec.classes,
                feats: &feats,
                heads: &heads,
                labels: &ws.labels,
                logits: &mut ws.head_logits,
                grads,
                stats: &mut ws.stats[ws.stats_set][self.layers.len()],
            },
        )
    }

    /// Evaluation forward (no dropout, no updates): every layer's projection logits and the fusion logits.
    pub fn eval_logits(&mut self, x: &[f32], labels: &[u32]) -> Result<EvalLogits> {
        let batch = self.load_batch(x, labels, true)?;
        let n = self.spec.classes;
        let mut out = EvalLogits { layers: Vec::with_capacity(self.layers.len()), fusion: Vec::new() };
        for li in 0..self.layers.len() {
            self.layer_pass(li, batch, 0, None, Share { first: 0, global: batch })?;
            let k = self.ws.scratch_of(li);
            out.layers.push(self.be.read(&self.ws.scratch[k].logits, batch * n)?);
        }
        self.heads_pass(batch, false, batch)?;
        out.fusion = self.be.read(&self.ws.head_logits, batch * n)?;
        Ok(out)
    }

    /// The activation at layer boundary `boundary` (0: the batch's input, `l`: layer `l - 1`'s output, which is
    /// layer `l`'s input) of the last step or evaluation, `[batch, C, H, W]`, for tests and debugging: on the
    /// backend's lane, so in order after what was queued there. With one lane the boundaries take turns in two
    /// buffers, so only the last two are still there (an error for the others).
    pub fn activation(&self, boundary: usize, batch: usize) -> Result<Vec<f32>> {
        let layers = &self.spec.layers;
        anyhow::ensure!(boundary <= layers.len(), "boundary {boundary} of a {}-layer net", layers.len());
        anyhow::ensure!(
            self.ws.concurrent || boundary + 1 >= layers.len(),
            "boundary {boundary}: with one lane only the last two layer boundaries' activations are kept"
        );
        let per_sample = boundary_len(&self.spec, boundary);
        self.be.read(&self.ws.acts[self.ws.act(boundary)], batch * per_sample)
    }

    /// The parameters, host side.
    pub fn params(&self) -> Result<Params> {
        let be = &self.be;
        Ok(Params {
            layers: self
                .layers
                .iter()
                .map(|l| {
                    Ok(LayerParams {
                        conv_w: be.read(&l.conv_w.value, l.conv_w.len)?,
                        conv_b: be.read(&l.conv_b.value, l.conv_b.len)?,
                        proj_w: be.read(&l.proj_w, self.spec.classes * l.grid.cells() * l.conv_b.len)?,
                        proj_b: be.read(&l.proj_b, self.spec.classes)?,
                    })
                })
                .collect::<Result<_>>()?,
            heads: self
                .heads
                .iter()
                .map(|h| Ok(HeadParams { w: be.read(&h.w.value, h.w.len)?, b: be.read(&h.b.value, h.b.len)? }))
                .collect::<Result<_>>()?,
        })
    }

    /// Every trained tensor with a name (`layers.0.conv.weight`, `heads.1.bias`, ...), for the optimizer state.
    pub fn named_params(&self) -> Vec<(String, &Param<B>)> {
        let trained = self.spec.tensors().into_iter().filter(|t| t.trained());
        trained.map(|t| (t.name(), trained_param(&self.layers, &self.heads, t))).collect()
    }

    /// Calls `f` on every trained tensor with its name, mutably, with the backend at hand, for its optimizer
    /// state (the values come from [`Net::new`], which also writes the conv weights' compute copies).
    pub fn for_each_param_mut(&mut self, mut f: impl FnMut(&B, &str, &mut Param<B>) -> Result<()>) -> Result<()> {
        for t in self.spec.tensors().into_iter().filter(|t| t.trained()) {
            let p = trained_param_mut(&mut self.layers, &mut self.heads, t);
            f(&self.be, &t.name(), p)?;
        }
        Ok(())
    }
}

impl<B: Backend> Drop for Net<B> {
    /// Waits for the work queued on the net's buffers before they are freed: a kernel still queued on another lane
    /// must never run on freed memory (a fusion-heads kernel read a freed buffer once under the stand-in, in a
    /// test that drops 3-lane nets and makes new ones).
    fn drop(&mut self) {
        if let Err(e) = self.be.synchronize() {
            eprintln!("asge: waiting for the device before freeing a model's buffers: {e:#}");
        }
    }
}

/// Values per sample of the activations at layer boundary `boundary` (0: the input, `l`: layer `l - 1`'s output,
/// the layer count: the last output).
fn boundary_len(spec: &ModelSpec, boundary: usize) -> usize {
    match spec.layers.get(boundary) {
        Some(l) => l.c_in * l.h * l.w,
        None => spec.layers.last().map_or(0, |l| l.c_out * l.out_hw().0 * l.out_hw().1),
    }
}

/// [`trained_param`], mutably.
fn trained_param_mut<'a, B: Backend>(
    layers: &'a mut [Layer<B>],
    heads: &'a mut [Head<B>],
    t: Tensor,
) -> &'a mut Param<B> {
    match t {
        Tensor::ConvW(l) => &mut layers[l].conv_w,
        Tensor::ConvB(l) => &mut layers[l].conv_b,
        Tensor::HeadW(l) => &mut heads[Tensor::head_index(l)].w,
        Tensor::HeadB(l) => &mut heads[Tensor::head_index(l)].b,
        Tensor::ProjW(_) | Tensor::ProjB(_) => unreachable!("the projection is not trained"),
    }
}

/// The trained tensor `t` of a net's layers and heads (the parameter table's [`Tensor`]; the projection, fixed,
/// is not one).
fn trained_param<'a, B: Backend>(layers: &'a [Layer<B>], heads: &'a [Head<B>], t: Tensor) -> &'a Param<B> {
    match t {
        Tensor::ConvW(l) => &layers[l].conv_w,
        Tensor::ConvB(l) => &layers[l].conv_b,
        Tensor::HeadW(l) => &heads[Tensor::head_index(l)].w,
        Tensor::HeadB(l) => &heads[Tensor::head_index(l)].b,
        Tensor::ProjW(_) | Tensor::ProjB(_) => unreachable!("the projection is not trained"),
    }
}
