//! The loader: turns index lists into normalised f32 batches on a worker thread (samples in parallel on
//! rayon), a bounded queue ahead of the trainer. Every random draw is keyed by (seed, epoch, position), so a
//! batch's content does not depend on timing, thread count, or whether the run was resumed.

use super::augment::{self, Augment};
use super::ImageSource;
use crate::rng::{self, Rng};
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
        super::rms_normalize(out);
    });
    Batch { x, labels: indices.iter().map(|&i| data.label(i)).collect() }
}

/// Batches of one pass over `order`, prepared ahead on a worker thread.
pub struct Prefetch {
    rx: Option<Receiver<Batch>>,
    worker: Option<JoinHandle<()>>,
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
        let (tx, rx) = sync_channel(depth.max(1));
        let worker = std::thread::Builder::new()
            .name("asge-loader".into())
            .spawn(move || {
                for (i, chunk) in order.chunks(batch).enumerate() {
                    let span = crate::trace::span("prepare batch", crate::trace::LOADER, i as u64);
                    let b = make_batch(data.as_ref(), chunk, aug, key, start + i * batch);
                    drop(span);
                    if tx.send(b).is_err() {
                        return; // the trainer stopped early
                    }
                }
            })
            .expect("spawn loader thread");
        Prefetch { rx: Some(rx), worker: Some(worker) }
    }
}

impl Iterator for Prefetch {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        self.rx.as_ref()?.recv().ok()
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
