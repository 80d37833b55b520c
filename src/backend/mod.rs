//! The backend trait: the fused ops the method needs, cut at the level a GPU runs them.
//!
//! Each op has one CPU reference ([`cpu::CpuBackend`]), and a parity test for every other backend.
//! Layouts are PyTorch's: activations `[B, C, H, W]`, conv weights `[C_out, C_in, 3, 3]`, goodness
//! `[B, C * P * P]` flattened channel-major (`c * P^2 + i * P + j`), projections `[D, N]`, heads `[N, C]`.
//! No op computes an input gradient: a layer's input is a constant to it.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod select;

pub use crate::kernel_abi::AdamWScalars;
use crate::model::{GoodnessReduce, PatchGrid};
use crate::ops::{Checked, Len};
use crate::trace::DeviceSpan;
use anyhow::Result;

/// Where the conv operands live: layer inputs, conv outputs and the weights' compute copy. Every sum (GEMM
/// accumulators, goodness, loss, optimizer state, master weights) is f32 in both.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
pub enum Precision {
    #[default]
    #[serde(rename = "fp32")]
    #[value(name = "fp32")]
    F32,
    /// Operands stored in IEEE binary16 (round to nearest even) and multiplied on the tensor cores with f32
    /// accumulation; the weight gradient's dL/dz is scaled by a power of two (dz_scale) before it is rounded.
    #[serde(rename = "fp16")]
    #[value(name = "fp16")]
    F16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "fp32",
            Precision::F16 => "fp16",
        }
    }
}

/// `v` rounded to the nearest binary16 value (ties to even), back in f32: what an fp16 store keeps.
#[inline]
pub fn round_f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// The power of two that `dL/dz` is multiplied by before the fp16 weight gradient rounds it (and the f32
/// result divided by after), so that it stays in fp16's normal range. `dL/dz = 2 y dL/dg / |bin|` and
/// `dL/dg = (softmax - onehot) R^T / B`, so it is about `2 |y| |R| |softmax - onehot| / (B |bin|)`: with CIFAR's
/// 16-pixel cells, 10 classes (`|R|` ~ 0.3) and batch 128, ~3e-4 times `|softmax - onehot|`, which reaches
/// fp16's subnormals (< 6.1e-5, a few significant bits) once a layer is confident; at ImageNet scale (cells of
/// up to 784 pixels at 224 px, 1000 classes, `|R|` ~ 0.03, batch 256), ~3e-7 times it, subnormal from the
/// start and zero below 3e-8. Scaling by `B * max|bin|` (mean) or `B` (sum), rounded to a power of two so that
/// the scaling is exact, brings it to ~`|y| |R|`, far from the overflow at 65504 for the RMS-normalised inputs
/// every layer sees.
pub fn dz_scale(batch: usize, grid: &PatchGrid, reduce: GoodnessReduce) -> f32 {
    let bin = match reduce {
        GoodnessReduce::Mean => {
            (0..grid.p).flat_map(|i| (0..grid.p).map(move |j| (i, j))).map(|(i, j)| grid.area(i, j)).max().unwrap_or(1)
        }
        GoodnessReduce::Sum => 1,
    };
    let s = (batch.max(1) * bin.max(1)) as f32;
    2f32.powi(s.log2().round() as i32)
}

/// The shape of one 3x3 / stride 1 / padding 1 convolution over a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub c_in: usize,
    pub c_out: usize,
    pub h: usize,
    pub w: usize,
}

impl ConvShape {
    pub fn x_len(&self) -> usize {
        self.batch * self.c_in * self.h * self.w
    }
    pub fn y_len(&self) -> usize {
        self.batch * self.c_out * self.h * self.w
    }
    pub fn w_len(&self) -> usize {
        self.c_out * self.c_in * 9
    }
}

/// Dropout on a layer's output: element `i` (flat index in `[B, C, H', W']`) is kept when
/// `rng::dropout_uniform(key, first + i) >= p` (wrapping), and kept values are scaled by `1 / (1 - p)`. `first` is
/// where the batch starts in the step's global batch (one rank's share of it in data-parallel training, so that
/// it draws the masks one process would; 0 in one process).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f32,
    pub key: u64,
    pub first: u32,
}

/// One AdamW step's hyperparameters (PyTorch semantics: decoupled decay `p *= 1 - lr * wd`, then Adam with
/// bias correction; `step` counts from 1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub step: u64,
}

/// One kernel launch timed on the device by itself ([`Schedule::time_kernels`]): the kernel, the layer it served
/// (1-based; the layer count + 1 for the fusion heads), its device time, and the useful FLOPs and the bytes it
/// must move (see `backend::cuda::Work`).
#[derive(Clone, Debug, PartialEq)]
pub struct KernelTime {
    pub kernel: &'static str,
    pub layer: usize,
    pub us: f64,
    pub flop: f64,
    pub bytes: f64,
}

impl AdamWStep {
    /// The step's f32 scalars, as the ops read them ([`Schedule::prepare_step`]).
    pub fn scalars(&self) -> AdamWScalars {
        let t = self.step as i32;
        AdamWScalars {
            decay: (1.0 - self.lr * self.weight_decay) as f32,
            step_size: (self.lr / (1.0 - self.beta1.powi(t))) as f32,
            bc2_sqrt: (1.0 - self.beta2.powi(t)).sqrt() as f32,
            w1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            w2: (1.0 - self.beta2) as f32,
            eps: self.eps as f32,
        }
    }
}

/// How a backend runs the training step about to be issued ([`Schedule::begin_step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepMode {
    /// Issue the step's ops; they run as issued.
    Eager,
    /// Issue the step's ops; the backend records them and runs them as one graph at [`Schedule::end_step`].
    Capture,
    /// The backend has launched the step's recorded graph: issue nothing.
    Replayed,
}

/// Running loss and accuracy of a loss op: `[loss_sum, correct]`, added to by every call.
pub const STATS_LEN: usize = 2;

/// What a device is: its buffers (allocation, upload, read), the precision of its conv operands. A
/// [`Backend`] is a device with the [`Ops`] and a [`Schedule`]. `Buf` is a device buffer of f32 (or of the operand
/// precision); lengths are given by the shapes, so a buffer may be longer than an op needs (buffers are sized
/// for the largest batch, the last batch is smaller). Memory operations run in issue order with the ops: on a
/// GPU on the first lane, ordered with the others by the buffers they share.
pub trait Device: Send + Sync {
    type Buf: Send + Sync + Len;
    type Labels: Send + Sync + Len;

    /// A short description, e.g. `cpu (2 threads)`.
    fn name(&self) -> String;

    /// The backend's kind as errors name it (`cpu`, `cuda`).
    fn kind(&self) -> &'static str;

    /// The precision of the conv operands (see [`Precision`]).
    fn precision(&self) -> Precision {
        Precision::F32
    }

    /// True when the backend's buffers live in host memory (the CPU backend), so that the trainer counts them in
    /// its memory estimate; a GPU backend's allocator checks device memory itself.
    fn buffers_on_host(&self) -> bool {
        true
    }

    /// Waits until every op queued so far has finished (a no-op where ops run synchronously).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn zeros(&self, len: usize) -> Result<Self::Buf>;

    /// A buffer whose contents are unspecified, for one that an op writes before anything reads it (a GPU skips
    /// the zeroing; the CUDA stand-in fills it with NaN so that a read of what nobody wrote shows).
    fn uninit(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }

    /// [`Device::uninit`] for a conv operand.
    fn operand_uninit(&self, len: usize) -> Result<Self::Buf> {
        self.operand_zeros(len)
    }

    /// A zeroed buffer for a conv operand (a layer input, a conv output `y`, a weights' compute copy), stored
    /// in [`Device::precision`]. [`Device::write`] rounds into it and [`Device::read`] widens from it.
    fn operand_zeros(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }

    /// [`Device::operand_zeros`] holding `data` (rounded to the operand precision).
    fn upload_operand(&self, data: &[f32]) -> Result<Self::Buf> {
        let mut b = self.operand_zeros(data.len())?;
        self.write(&mut b, data)?;
        Ok(b)
    }

    fn upload(&self, data: &[f32]) -> Result<Self::Buf>;

    /// Copy `data` into the first `data.len()` elements of `dst`.
    fn write(&self, dst: &mut Self::Buf, data: &[f32]) -> Result<()>;

    /// The first `len` elements of `src`.
    fn read(&self, src: &Self::Buf, len: usize) -> Result<Vec<f32>>;

    /// Zeroes the first `len` elements of `buf` (a GPU does it on the device, without a host copy).
    fn fill_zero(&self, buf: &mut Self::Buf, len: usize) -> Result<()> {
        self.write(buf, &vec![0.0; len])
    }

    /// [`Device::write`] for a batch's input, which the ops issued next read: a GPU stages it through pinned
    /// host memory and, with several lanes, copies it on its own stream, so the upload overlaps the compute still
    /// queued (with one lane it is queued behind that compute, on the same stream).
    fn write_input(&self, dst: &mut Self::Buf, data: &[f32]) -> Result<()> {
        self.write(dst, data)
    }

    fn labels(&self, labels: &[u32]) -> Result<Self::Labels>;

    fn write_labels(&self, dst: &mut Self::Labels, labels: &[u32]) -> Result<()>;
}

/// The methods of [`Ops`], one per op of `crate::ops::for_each_op!`.
macro_rules! ops_methods {
    ($($op:ident<$($t:ident),*>),* $(,)?) => {
        $(
            #[doc = concat!("`crate::ops::", stringify!($op), "` (see its folder).")]
            fn $op(&self, a: Checked<crate::ops::$op::Args<'_, $(Self::$t),*>>) -> Result<()>;
        )*
    };
}

/// The fused ops of one ASGE training step (`crate::ops`: each op's formula, arguments and checks). They take
/// their arguments checked: call them through the op's `run` (`ops::adamw::run(be, args)`), which checks first.
/// Every op's arguments name the layer it belongs to, which on a GPU picks the lane it runs on.
pub trait Ops: Device {
    crate::ops::for_each_op!(ops_methods);

    /// The kernels the conv forward and weight gradient run at this shape, where a backend picks among several
    /// (the CUDA backend's tiles); for reports such as `asge bench`.
    fn conv_kernels(&self, _s: &ConvShape) -> Option<[&'static str; 2]> {
        None
    }
}

/// A backend's implementation of every op: the op folder's `$backend::run` (`cpu`, `cuda`), named by the list.
macro_rules! ops_impl {
    ($backend:ident: $($op:ident<$($t:ident),*>),* $(,)?) => {
        $(
            fn $op(&self, a: crate::ops::Checked<crate::ops::$op::Args<'_, $(<Self as crate::backend::Device>::$t),*>>) -> anyhow::Result<()> {
                crate::ops::$op::$backend::run(self, a)
            }
        )*
    };
}
pub(crate) use ops_impl;

macro_rules! cpu_ops {
    ($($list:tt)*) => {
        crate::backend::ops_impl!(cpu: $($list)*);
    };
}
pub(crate) use cpu_ops;

#[cfg(feature = "cuda")]
macro_rules! cuda_ops {
    ($($list:tt)*) => {
        crate::backend::ops_impl!(cuda: $($list)*);
    };
}
#[cfg(feature = "cuda")]
pub(crate) use cuda_ops;

/// How [`Schedule::all_reduce_host`] combines the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    Sum,
    Max,
}

/// How a step is run: the lanes the layers spread over, the values a step reads from the device
/// ([`Schedule::prepare_step`]), recorded steps, the reads that overlap the next step, and the device's clock.
pub trait Schedule: Device {
    /// A read queued by [`Schedule::queue_read`], collected by [`Schedule::collect_read`].
    type PendingRead: Send;

    /// Independent execution lanes (CUDA streams) the trainer may spread its layers over; 1 means every op
    /// runs in the order it was issued. With more than one, the trainer gives every layer its own buffers and
    /// double-buffers the activations between layers, and the backend orders the lanes by the buffers they share.
    fn lanes(&self) -> usize {
        1
    }

    /// Sets what changes from one training step to the next, before the step is issued: AdamW's scalars (the
    /// one way they reach [`Ops::adamw`], which reads the last ones set) and the dropout key of each layer
    /// that drops. The CUDA backend keeps them in device buffers, so that a recorded step graph reads each
    /// step's values.
    fn prepare_step(&self, adamw: &AdamWScalars, dropout_keys: &[Option<u64>]) -> Result<()>;

    /// Called before a training step's ops with a key naming everything that makes two steps' op sequences
    /// differ (the batch, the buffers); says whether to issue them ([`StepMode`]).
    fn begin_step(&self, _key: u64) -> Result<StepMode> {
        Ok(StepMode::Eager)
    }

    /// After a step's ops when [`Schedule::begin_step`] said [`StepMode::Capture`]: runs what was recorded.
    fn end_step(&self, _key: u64) -> Result<()> {
        Ok(())
    }

    /// Queues a read of the first `len` elements of each of `srcs`, ordered after every op issued so far on
    /// every lane and before nothing else: a GPU gathers them on the device and copies them into pinned host memory
    /// on a stream of its own, so the step issued next runs while the copy waits for this one. [`Schedule::collect_read`]
    /// returns the values, waiting for that copy only.
    fn queue_read(&self, srcs: &[&Self::Buf], len: usize) -> Result<Self::PendingRead>;

    /// The values of a [`Schedule::queue_read`], in order.
    fn collect_read(&self, pending: Self::PendingRead) -> Result<Vec<Vec<f32>>>;

    /// The ranks this process trains with: its communicator's size (`crate::dist`), 1 for a process alone. With
    /// more than one, the trainer sums every gradient and the step's statistics over the ranks
    /// ([`Schedule::all_reduce_sum`]).
    fn ranks(&self) -> usize {
        1
    }

    /// Queues the sum over the ranks of the first `len` values of each buffer, in place, ordered after every op
    /// issued so far; the ops issued after the next [`Schedule::join_collectives`] see the sums. Every rank issues
    /// the same collectives in the same order. A GPU runs them on a communication stream of their own (NCCL), so
    /// that they overlap the ops issued meanwhile (which must not touch these buffers). `layer` is the layer the
    /// buffers belong to (the layer count for the fusion heads). Only a backend with a communicator has it.
    fn all_reduce_sum(&self, layer: usize, _bufs: &mut [(&mut Self::Buf, usize)]) -> Result<()> {
        anyhow::bail!(
            "{} backend: layer {}'s gradients cannot be summed over ranks (several ranks need --device cuda)",
            self.kind(),
            layer + 1
        )
    }

    /// Layer-parallel training: queues, in one group, the send of the first `len` values of each of `send` to rank
    /// `next` and the receive of `recv`'s from rank `prev`, ordered after every op issued so far (like
    /// [`Schedule::all_reduce_sum`], on the communication stream; the ops issued after the next
    /// [`Schedule::join_collectives`] see what arrived). The buffers are sent as they are stored; a receive pairs
    /// with the peer's send of the same size, in order.
    fn exchange(
        &self,
        _send: &[(&Self::Buf, usize)],
        _next: Option<usize>,
        _recv: &mut [(&mut Self::Buf, usize)],
        _prev: Option<usize>,
    ) -> Result<()> {
        anyhow::bail!("{} backend: no transfers between ranks (several ranks need --device cuda)", self.kind())
    }

    /// Says that `buf` now holds a layer output of logical shape `shape` (`[B, C, H, W]`) stored as this backend's
    /// layer output stores it: one received from the previous rank of the layer pipeline.
    fn received_output(&self, _buf: &mut Self::Buf, _shape: [usize; 4]) {}

    /// Makes the ops issued next wait for every collective queued so far ([`Schedule::all_reduce_sum`]).
    fn join_collectives(&self) -> Result<()> {
        Ok(())
    }

    /// Combines `values` over the ranks (the same length on every rank), in place, and waits for the result: the
    /// validation and test counts, the weights' checksums. A process alone keeps its values.
    fn all_reduce_host(&self, _values: &mut [f64], _op: Reduction) -> Result<()> {
        anyhow::ensure!(self.ranks() == 1, "{} backend: no collectives across ranks", self.kind());
        Ok(())
    }

    /// The kernels timed on the device since the last call, while `--trace` is on (none on the CPU, whose ops
    /// the host-side trace already times).
    fn take_device_spans(&self) -> Result<Vec<DeviceSpan>> {
        Ok(Vec::new())
    }

    /// Turns per-kernel timing on or off; true where the backend has it (a GPU: CUDA events around each kernel,
    /// each run alone, with step graphs off while it is on). The CPU has none: its ops are the timed unit.
    fn time_kernels(&self, _on: bool) -> Result<bool> {
        Ok(false)
    }

    /// The kernels timed since [`Schedule::time_kernels`] turned timing on or since the last call, in launch order.
    fn take_kernel_times(&self) -> Result<Vec<KernelTime>> {
        Ok(Vec::new())
    }

    /// Milliseconds per call of `f` measured by the device itself (a GPU's events around the calls, after
    /// `warmup` untimed ones), or `None` where the host's clock is the measure (the CPU).
    fn device_time_ms(&self, _warmup: usize, _reps: usize, _f: &mut dyn FnMut() -> Result<()>) -> Result<Option<f64>> {
        Ok(None)
    }

    /// Records a point in the device's timeline (an event on the step's stream) and returns its handle, or `None`
    /// where the host's clock is the measure (the CPU). [`Schedule::device_elapsed_ms`] measures between two.
    fn device_mark(&self) -> Result<Option<usize>> {
        Ok(None)
    }

    /// Milliseconds of device time from mark `a` to mark `b` (both from [`Schedule::device_mark`]); waits for `b`.
    fn device_elapsed_ms(&self, _a: usize, _b: usize) -> Result<f64> {
        anyhow::bail!("this backend keeps no device timeline")
    }
}

/// A device with the ops and a schedule: what the trainer, evaluation and the benchmarks are written against.
pub trait Backend: Device + Ops + Schedule {}

/// The backend traits, for code that calls their methods on a concrete backend (`use asge::backend::prelude::*`).
pub mod prelude {
    pub use super::{Backend, Device, Ops, Schedule};
}

impl<T: Device + Ops + Schedule> Backend for T {}
