//! The loader: turns index lists into normalised f32 batches on a worker thread (samples in parallel on
//! rayon), a bounded queue ahead of the trainer. Every random draw is keyed by (seed, epoch, position), so a
//! batch's content does not depend on timing, thread count, or whether the run was resumed.
//!
//! A worker that fails (a panic while it reads or augments an image) ends the pass with an error that names what
//! happened, never with an early end that would look like the end of the data: [`Prefetch`] yields `Err` and then
//! stops, and [`Prefetch::finish`] checks that every batch arrived.

use super::augment::{self, Augment};
use super::ImageSource;
use crate::rng::{self, Rng};
use anyhow::Result;
use rayon::prelude::*;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

/// One batch: images `[B, C, S, S]` after augmentation and the per-sample RMS norm, and labels.
#[derive(Clone, Debug)]
pub struct Batch {
    pub x: Vec<f32>,
    pub labels: Vec<u32>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Builds the batch of `indices` (positions `first..` in the epoch's order). The output side is the crop size
/// for the ImageNet augmentations and the stored size otherwise.
pub fn make_batch(data: &dyn ImageSource, indices: &[usize], aug: Augment, key: u64, first: usize) -> Batch {
    fill(data, indices, aug, key, first, true)
}

/// [`make_batch`] without the per-sample RMS norm: the augmented images in [0, 1] (what an exported model takes).
pub fn make_pixels(data: &dyn ImageSource, indices: &[usize], aug: Augment, key: u64, first: usize) -> Batch {
    fill(data, indices, aug, key, first, false)
}

/// Decodes and augments each sample into the batch, RMS-normalising it in the same pass when `normalize`.
fn fill(data: &dyn ImageSource, indices: &[usize], aug: Augment, key: u64, first: usize, normalize: bool) -> Batch {
    let (c, s) = (data.channels(), data.size());
    let t = aug.output_size().unwrap_or(s);
    let px = c * t * t;
    let mut x = vec![0.0f32; indices.len() * px];
    x.par_chunks_mut(px).zip(indices).enumerate().for_each(|(i, (out, &idx))| {
        let img = data.image(idx);
        let mut r = Rng::new(rng::derive(key, (first + i) as u64));
        match aug {
            Augment::ResizedCrop(_) | Augment::CenterCrop(_) => augment::crop_resize(aug, img, c, s, t, out, &mut r),
            _ => {
                for (o, &p) in out.iter_mut().zip(img) {
                    *o = p as f32 / 255.0;
                }
                augment::apply(aug, out, c, s, &mut r);
            }
        }
        if normalize {
            super::rms_normalize(out);
        }
    });
    Batch { x, labels: indices.iter().map(|&i| data.label(i)).collect() }
}

/// Batches of one pass over `order`, prepared ahead on a worker thread.
pub struct Prefetch {
    rx: Option<Receiver<Result<Batch>>>,
    worker: Option<JoinHandle<()>>,
    expected: usize,
    received: usize,
    failed: bool,
}

/// The text of a panic payload.
fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

impl Prefetch {
    /// `depth` batches are prepared ahead (bounded memory). The last batch may be smaller (not dropped).
    /// `order` starts at position `start` of the epoch (non-zero when a run resumes mid-epoch): the random
    /// draws are keyed by the position in the epoch, so a resumed epoch sees the same batches.
    pub fn new(
        data: Arc<dyn ImageSource>,
        order: Vec<usize>,
        start: usize,
        batch: usize,
        aug: Augment,
        key: u64,
        depth: usize,
    ) -> Self {
        let batches = order.chunks(batch.max(1)).enumerate().map(|(i, c)| (start + i * batch, c.to_vec())).collect();
        Self::batches(data, batches, aug, key, depth)
    }

    /// [`Prefetch::new`] for batches given one by one, each with the position of its first image in the epoch
    /// (a rank's shares of the epoch's batches, in data-parallel training).
    pub fn batches(
        data: Arc<dyn ImageSource>,
        batches: Vec<(usize, Vec<usize>)>,
        aug: Augment,
        key: u64,
        depth: usize,
    ) -> Self {
        let (tx, rx) = sync_channel(depth.max(1));
        let expected = batches.len();
        let worker = std::thread::Builder::new().name("asge-loader".into()).spawn(move || {
            for (i, (first, chunk)) in batches.iter().enumerate() {
                let span = crate::trace::span("prepare batch", crate::trace::LOADER, i as u64);
                let first = *first;
                let made = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    make_batch(data.as_ref(), chunk, aug, key, first)
                }));
                drop(span);
                let item = made.map_err(|p| {
                    anyhow::anyhow!("the data loader failed on the batch at position {first}: {}", panic_text(&*p))
                });
                let failed = item.is_err();
                if tx.send(item).is_err() || failed {
                    return; // the trainer stopped early, or this pass is over
                }
            }
        });
        match worker {
            Ok(w) => Prefetch { rx: Some(rx), worker: Some(w), expected, received: 0, failed: false },
            Err(e) => {
                // No thread: the first `next` reports it.
                let (tx, rx) = sync_channel(1);
                let _ = tx.send(Err(anyhow::anyhow!("cannot start the data loader thread: {e}")));
                Prefetch { rx: Some(rx), worker: None, expected, received: 0, failed: false }
            }
        }
    }

    /// After the pass: an error unless every batch of `order` was delivered (a worker that died without a word).
    pub fn finish(&self) -> Result<()> {
        if self.received != self.expected && !self.failed {
            anyhow::bail!("the data loader stopped after {} of {} batches", self.received, self.expected);
        }
        Ok(())
    }
}

impl Iterator for Prefetch {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        if self.failed {
            return None;
        }
        match self.rx.as_ref()?.recv() {
            Ok(Ok(b)) => {
                self.received += 1;
                Some(Ok(b))
            }
            Ok(Err(e)) => {
                self.failed = true;
                Some(Err(e))
            }
            // The worker ended: after the last batch, or without sending its error (it cannot, but say so).
            Err(_) if self.received == self.expected => None,
            Err(_) => {
                self.failed = true;
                Some(Err(anyhow::anyhow!(
                    "the data loader stopped after {} of {} batches",
                    self.received,
                    self.expected
                )))
            }
        }
    }
}

impl Drop for Prefetch {
    fn drop(&mut self) {
        self.rx.take(); // unblocks the worker's send
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}
