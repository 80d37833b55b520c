//! The small ops of a layer step on the CPU: the fixed projection + softmax CE, the layer output (pool,
//! dropout, RMS norm, global average pool), the fusion heads and AdamW. All are memory-bound; each is one
//! pass, parallel over samples (or over parameter chunks for AdamW), with reductions in a fixed order.

use crate::backend::{AdamWStep, Dropout};
use crate::model::PoolKind;
use crate::rng;
use anyhow::{bail, Result};
use rayon::prelude::*;

/// `sum v^2` with 16 independent accumulators, so the compiler can keep it in vector registers (a single
/// f32 accumulator is a serial chain of adds that no compiler may reorder).
pub fn sum_squares(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x * x;
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().map(|&x| x * x).sum::<f32>()
}

/// `sum v`, vectorised like [`sum_squares`].
pub fn sum(v: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 16];
    let chunks = v.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += x;
        }
    }
    lanes.iter().sum::<f32>() + tail.iter().sum::<f32>()
}

/// Softmax cross-entropy of one row of logits: returns (loss, argmax == label) and writes
/// `da = (softmax(a) - onehot(label)) * scale` when asked.
pub fn softmax_ce(a: &[f32], label: usize, scale: f32, da: Option<&mut [f32]>) -> (f64, bool) {
    let max = a.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = a.iter().map(|&v| (v - max).exp()).sum();
    let lse = max + sum.ln();
    let loss = (lse - a[label]) as f64;
    // argmax, first index on ties (torch.argmax on CPU returns the first maximal index).
    let pred = a.iter().enumerate().fold(0, |best, (i, &v)| if v > a[best] { i } else { best });
    if let Some(da) = da {
        for (n, (d, &v)) in da.iter_mut().zip(a).enumerate() {
            let p = (v - lse).exp();
            *d = (p - if n == label { 1.0 } else { 0.0 }) * scale;
        }
    }
    (loss, pred == label)
}

fn check_labels(labels: &[u32], batch: usize, classes: usize) -> Result<()> {
    if labels.len() < batch {
        bail!("{} labels for a batch of {batch}", labels.len());
    }
    if let Some(&bad) = labels[..batch].iter().find(|&&l| l as usize >= classes) {
        bail!("label {bad} out of range for {classes} classes");
    }
    Ok(())
}

fn add_stats(stats: &mut [f32], per_sample: &[(f64, bool)]) {
    let loss: f64 = per_sample.iter().map(|p| p.0).sum();
    let correct = per_sample.iter().filter(|p| p.1).count();
    stats[0] += loss as f32;
    stats[1] += correct as f32;
}

/// `a = g R + r`; CE; `dg = (softmax(a) - onehot) R^T / B`.
#[allow(clippy::too_many_arguments)]
pub fn goodness_loss(
    batch: usize,
    dim: usize,
    classes: usize,
    g: &[f32],
    proj_w: &[f32],
    proj_b: &[f32],
    labels: &[u32],
    logits: &mut [f32],
    dg: Option<&mut [f32]>,
    stats: &mut [f32],
) -> Result<()> {
    check_labels(labels, batch, classes)?;
    let scale = 1.0 / batch as f32;
    let (proj_w, proj_b) = (&proj_w[..dim * classes], &proj_b[..classes]);
    let row = |b: usize, a: &mut [f32], dg_row: Option<&mut [f32]>| {
        a.fill(0.0);
        for (k, &gk) in g[b * dim..][..dim].iter().enumerate() {
            for (av, &r) in a.iter_mut().zip(&proj_w[k * classes..][..classes]) {
                *av += gk * r;
            }
        }
        for (av, &r) in a.iter_mut().zip(proj_b) {
            *av += r;
        }
        let label = labels[b] as usize;
        match dg_row {
            None => softmax_ce(a, label, scale, None),
            Some(dg_row) => {
                let mut da = vec![0.0f32; classes];
                let res = softmax_ce(a, label, scale, Some(&mut da));
                for (k, d) in dg_row.iter_mut().enumerate() {
                    *d = proj_w[k * classes..][..classes].iter().zip(&da).map(|(&r, &x)| r * x).sum();
                }
                res
            }
        }
    };
    let logits = &mut logits[..batch * classes];
    let per_sample: Vec<(f64, bool)> = match dg {
        None => logits.par_chunks_mut(classes).enumerate().map(|(b, a)| row(b, a, None)).collect(),
        Some(dg) => logits
            .par_chunks_mut(classes)
            .zip(dg[..batch * dim].par_chunks_mut(dim))
            .enumerate()
            .map(|(b, (a, d))| row(b, a, Some(d)))
            .collect(),
    };
    add_stats(stats, &per_sample);
    Ok(())
}

/// Pool (optional), dropout (optional), per-sample RMS norm, global average pool (optional).
#[allow(clippy::too_many_arguments)]
pub fn layer_output(
    batch: usize,
    c: usize,
    h: usize,
    w: usize,
    pool: Option<PoolKind>,
    dropout: Option<Dropout>,
    y: &[f32],
    out: &mut [f32],
    gap: Option<&mut [f32]>,
) {
    let (ho, wo) = if pool.is_some() { (h / 2, w / 2) } else { (h, w) };
    let per_in = c * h * w;
    let per_out = c * ho * wo;
    let body = |b: usize, o: &mut [f32], gap_row: Option<&mut [f32]>| {
        let yb = &y[b * per_in..][..per_in];
        match pool {
            None => o.copy_from_slice(yb),
            Some(kind) => {
                for ch in 0..c {
                    let ym = &yb[ch * h * w..][..h * w];
                    for i in 0..ho {
                        for j in 0..wo {
                            let (r0, r1) = (&ym[2 * i * w..], &ym[(2 * i + 1) * w..]);
                            let q = [r0[2 * j], r0[2 * j + 1], r1[2 * j], r1[2 * j + 1]];
                            o[(ch * ho + i) * wo + j] = match kind {
                                PoolKind::Avg => (q[0] + q[1] + q[2] + q[3]) / 4.0,
                                PoolKind::Rms => ((q[0] * q[0] + q[1] * q[1] + q[2] * q[2] + q[3] * q[3]) / 4.0).sqrt(),
                            };
                        }
                    }
                }
            }
        }
        if let Some(Dropout { p, key }) = dropout {
            let keep_scale = 1.0 / (1.0 - p);
            let base = (b * per_out) as u32;
            for (i, v) in o.iter_mut().enumerate() {
                let keep = rng::dropout_uniform(key, base.wrapping_add(i as u32)) >= p;
                *v = if keep { *v * keep_scale } else { 0.0 };
            }
        }
        let denom = (sum_squares(o) / per_out as f32).sqrt() + crate::RMS_EPS;
        for v in o.iter_mut() {
            *v /= denom;
        }
        if let Some(gap_row) = gap_row {
            let hw = ho * wo;
            for (ch, gv) in gap_row.iter_mut().enumerate() {
                *gv = sum(&o[ch * hw..][..hw]) / hw as f32;
            }
        }
    };
    let out = &mut out[..batch * per_out];
    match gap {
        None => out.par_chunks_mut(per_out).enumerate().for_each(|(b, o)| body(b, o, None)),
        Some(gap) => out
            .par_chunks_mut(per_out)
            .zip(gap[..batch * c].par_chunks_mut(c))
            .enumerate()
            .for_each(|(b, (o, gr))| body(b, o, Some(gr))),
    }
}

/// Fusion heads: logits `s = sum_k f_k W_k^T + b_k`, CE, and the head gradients.
#[allow(clippy::too_many_arguments)]
pub fn fusion_heads(
    batch: usize,
    classes: usize,
    feats: &[(&[f32], usize)],
    heads: &[(&[f32], &[f32])],
    labels: &[u32],
    logits: &mut [f32],
    grads: Option<&mut [(&mut [f32], &mut [f32])]>,
    stats: &mut [f32],
) -> Result<()> {
    check_labels(labels, batch, classes)?;
    if feats.len() != heads.len() {
        bail!("{} feature sets for {} fusion heads", feats.len(), heads.len());
    }
    let scale = 1.0 / batch as f32;
    let mut ds = vec![0.0f32; batch * classes];
    let logits = &mut logits[..batch * classes];
    let per_sample: Vec<(f64, bool)> = logits
        .par_chunks_mut(classes)
        .zip(ds.par_chunks_mut(classes))
        .enumerate()
        .map(|(b, (s, d))| {
            s.fill(0.0);
            for (&(f, c), &(w, bias)) in feats.iter().zip(heads) {
                let fb = &f[b * c..][..c];
                for (n, sv) in s.iter_mut().enumerate() {
                    let dot: f32 = w[n * c..][..c].iter().zip(fb).map(|(&a, &x)| a * x).sum();
                    *sv += dot + bias[n];
                }
            }
            softmax_ce(s, labels[b] as usize, scale, Some(d))
        })
        .collect();
    add_stats(stats, &per_sample);
    if let Some(grads) = grads {
        grads.par_iter_mut().zip(feats).for_each(|((gw, gb), &(f, c))| {
            gw[..classes * c].fill(0.0);
            gb[..classes].fill(0.0);
            for b in 0..batch {
                let fb = &f[b * c..][..c];
                for n in 0..classes {
                    let dsv = ds[b * classes + n];
                    gb[n] += dsv;
                    for (gv, &x) in gw[n * c..][..c].iter_mut().zip(fb) {
                        *gv += dsv * x;
                    }
                }
            }
        });
    }
    Ok(())
}

/// AdamW, PyTorch's single-tensor algorithm, elementwise.
pub fn adamw(p: &mut [f32], grad: &[f32], m: &mut [f32], v: &mut [f32], h: &AdamWStep) {
    let crate::backend::AdamWScalars { decay, step_size, bc2_sqrt, w1, b2, w2, eps } = h.scalars();
    const CHUNK: usize = 16 * 1024;
    p.par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                let gi = g[i];
                p[i] *= decay;
                m[i] += w1 * (gi - m[i]);
                v[i] = v[i] * b2 + w2 * gi * gi;
                let denom = v[i].sqrt() / bc2_sqrt + eps;
                p[i] += -step_size * (m[i] / denom);
            }
        });
}
