//! Every CPU op against naive f64 loops, and the gradients against finite differences of the f64 loss.
//! Shapes include the awkward cases: channels that are not multiples of 8, H not divisible by P (overlapping
//! bins), batch 1 and 3. Tolerances: the ops run in f32 (unit roundoff 6e-8) over sums of at most a few
//! thousand terms, so 1e-4 relative (+ a small absolute floor) is ~100x the expected roundoff and far below any
//! semantic error (a wrong bin, a missed ReLU mask or a wrong scale shows up at 1e-1 or worse).

mod common;

use asge::backend::cpu::CpuBackend;
use asge::backend::prelude::*;
use asge::backend::{AdamWStep, ConvShape, Dropout};
use asge::model::{GoodnessReduce, PatchGrid, PoolKind};
use common::randn;

fn assert_close(what: &str, got: &[f32], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(((g as f64) - w).abs() <= atol + rtol * w.abs(), "{what}[{i}]: got {g}, want {w}");
    }
}

/// f64 reference: `y = relu(conv(x, W) + b)`.
fn conv_ref(s: &ConvShape, x: &[f32], w: &[f64], b: &[f64]) -> Vec<f64> {
    let (h, wd) = (s.h as isize, s.w as isize);
    let mut y = vec![0.0; s.y_len()];
    for n in 0..s.batch {
        for co in 0..s.c_out {
            for i in 0..h {
                for j in 0..wd {
                    let mut acc = b[co];
                    for ci in 0..s.c_in {
                        for kh in 0..3 {
                            for kw in 0..3 {
                                let (ii, jj) = (i + kh - 1, j + kw - 1);
                                if ii >= 0 && jj >= 0 && ii < h && jj < wd {
                                    let xv = x[((n * s.c_in + ci) * s.h + ii as usize) * s.w + jj as usize] as f64;
                                    acc += xv * w[((co * s.c_in + ci) * 3 + kh as usize) * 3 + kw as usize];
                                }
                            }
                        }
                    }
                    y[((n * s.c_out + co) * s.h + i as usize) * s.w + j as usize] = acc.max(0.0);
                }
            }
        }
    }
    y
}

fn goodness_ref(s: &ConvShape, grid: &PatchGrid, reduce: GoodnessReduce, y: &[f64]) -> Vec<f64> {
    let p = grid.p;
    let mut g = vec![0.0; s.batch * s.c_out * p * p];
    for n in 0..s.batch {
        for c in 0..s.c_out {
            for i in 0..p {
                for j in 0..p {
                    let (r0, r1) = grid.rows[i];
                    let (c0, c1) = grid.cols[j];
                    let mut acc = 0.0;
                    for r in r0..r1 {
                        for q in c0..c1 {
                            acc += y[((n * s.c_out + c) * s.h + r) * s.w + q].powi(2);
                        }
                    }
                    if reduce == GoodnessReduce::Mean {
                        acc /= ((r1 - r0) * (c1 - c0)) as f64;
                    }
                    g[((n * s.c_out + c) * p + i) * p + j] = acc;
                }
            }
        }
    }
    g
}

/// f64 reference of the whole local loss: mean CE of `g R + r`.
fn loss_ref(g: &[f64], batch: usize, dim: usize, classes: usize, pw: &[f32], pb: &[f32], labels: &[u32]) -> f64 {
    let mut total = 0.0;
    for b in 0..batch {
        let a: Vec<f64> = (0..classes)
            .map(|n| pb[n] as f64 + (0..dim).map(|k| g[b * dim + k] * pw[k * classes + n] as f64).sum::<f64>())
            .collect();
        let m = a.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + a.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
        total += lse - a[labels[b] as usize];
    }
    total / batch as f64
}

struct Case {
    s: ConvShape,
    p: usize,
    reduce: GoodnessReduce,
}

fn cases() -> Vec<Case> {
    let c = |batch, c_in, c_out, h, p, reduce| Case { s: ConvShape { batch, c_in, c_out, h, w: h }, p, reduce };
    vec![
        c(3, 3, 5, 8, 4, GoodnessReduce::Mean),
        c(1, 1, 12, 7, 2, GoodnessReduce::Mean), // overlapping bins (0,4), (3,7)
        c(3, 5, 9, 6, 4, GoodnessReduce::Sum),   // 6 / 4: overlapping, sum
        c(2, 4, 8, 5, 1, GoodnessReduce::Mean),
        c(3, 2, 3, 1, 1, GoodnessReduce::Mean), // 1x1 maps: only the centre tap is inside
    ]
}

#[test]
fn conv_goodness_fwd_matches_naive_f64() {
    for (ci, case) in cases().into_iter().enumerate() {
        let s = case.s;
        let grid = PatchGrid::new(case.p, s.h, s.w);
        let x = randn(s.x_len(), 1.0, 10 + ci as u64);
        let w = randn(s.w_len(), 0.5, 20 + ci as u64);
        let b = randn(s.c_out, 0.1, 30 + ci as u64);
        let mut y = vec![f32::NAN; s.y_len()];
        let mut g = vec![f32::NAN; s.batch * s.c_out * grid.cells()];
        asge::ops::conv_goodness_fwd::cpu::conv_goodness_fwd(&s, &grid, case.reduce, &x, &w, &b, &mut y, &mut g, false);
        let wf: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let bf: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let y_ref = conv_ref(&s, &x, &wf, &bf);
        assert_close(&format!("case {ci} y"), &y, &y_ref, 1e-4, 1e-5);
        assert_close(&format!("case {ci} g"), &g, &goodness_ref(&s, &grid, case.reduce, &y_ref), 1e-4, 1e-5);
    }
}

#[test]
fn goodness_loss_matches_naive_and_finite_differences() {
    let (batch, dim, classes) = (3, 12, 10);
    let g = randn(batch * dim, 1.0, 1).iter().map(|v| v.abs()).collect::<Vec<_>>();
    let pw = randn(dim * classes, 1.0 / (classes as f64).sqrt(), 2);
    let pb = randn(classes, 1.0 / (classes as f64).sqrt(), 3);
    let labels = vec![3u32, 0, 9];
    let mut logits = vec![0.0; batch * classes];
    let mut dg = vec![0.0; batch * dim];
    let mut stats = vec![0.0; 2];
    asge::ops::goodness_loss::cpu::goodness_loss(
        batch,
        batch,
        dim,
        classes,
        &g,
        &pw,
        &pb,
        &labels,
        &mut logits,
        Some(&mut dg),
        &mut stats,
    )
    .unwrap();
    let gf: Vec<f64> = g.iter().map(|&v| v as f64).collect();
    let l0 = loss_ref(&gf, batch, dim, classes, &pw, &pb, &labels);
    assert!((stats[0] as f64 / batch as f64 - l0).abs() < 1e-5 * l0.abs(), "loss {} vs {l0}", stats[0] / 3.0);
    // Logits
    for b in 0..batch {
        for n in 0..classes {
            let want: f64 = pb[n] as f64 + (0..dim).map(|k| gf[b * dim + k] * pw[k * classes + n] as f64).sum::<f64>();
            assert!((logits[b * classes + n] as f64 - want).abs() < 1e-5 * (1.0 + want.abs()));
        }
    }
    // dL/dg by central differences of the f64 loss.
    let eps = 1e-6;
    for k in 0..batch * dim {
        let mut gp = gf.clone();
        gp[k] += eps;
        let mut gm = gf.clone();
        gm[k] -= eps;
        let fd = (loss_ref(&gp, batch, dim, classes, &pw, &pb, &labels)
            - loss_ref(&gm, batch, dim, classes, &pw, &pb, &labels))
            / (2.0 * eps);
        assert!((dg[k] as f64 - fd).abs() <= 1e-6 + 1e-4 * fd.abs(), "dg[{k}] = {} vs finite difference {fd}", dg[k]);
    }
    // Wrong labels are an error, not a panic.
    let err = asge::ops::goodness_loss::cpu::goodness_loss(
        batch,
        batch,
        dim,
        classes,
        &g,
        &pw,
        &pb,
        &[3, 0, 10],
        &mut logits,
        None,
        &mut stats,
    );
    assert!(err.unwrap_err().to_string().contains("out of range"));
}

#[test]
fn conv_wgrad_matches_finite_differences_of_the_layer_loss() {
    for (ci, case) in cases().into_iter().enumerate() {
        let s = case.s;
        let grid = PatchGrid::new(case.p, s.h, s.w);
        let classes = 4;
        let dim = s.c_out * grid.cells();
        let x = randn(s.x_len(), 1.0, 40 + ci as u64);
        let w = randn(s.w_len(), 0.5, 50 + ci as u64);
        let b = randn(s.c_out, 0.2, 60 + ci as u64);
        let pw = randn(dim * classes, 0.5, 70 + ci as u64);
        let pb = randn(classes, 0.5, 80 + ci as u64);
        let labels: Vec<u32> = (0..s.batch as u32).map(|i| i % classes as u32).collect();

        let mut y = vec![0.0; s.y_len()];
        let mut g = vec![0.0; s.batch * dim];
        asge::ops::conv_goodness_fwd::cpu::conv_goodness_fwd(&s, &grid, case.reduce, &x, &w, &b, &mut y, &mut g, false);
        let (mut logits, mut dg, mut stats) = (vec![0.0; s.batch * classes], vec![0.0; s.batch * dim], vec![0.0; 2]);
        asge::ops::goodness_loss::cpu::goodness_loss(
            s.batch,
            s.batch,
            dim,
            classes,
            &g,
            &pw,
            &pb,
            &labels,
            &mut logits,
            Some(&mut dg),
            &mut stats,
        )
        .unwrap();
        let (mut dw, mut db) = (vec![f32::NAN; s.w_len()], vec![f32::NAN; s.c_out]);
        asge::ops::conv_goodness_wgrad::cpu::conv_goodness_wgrad(
            &s,
            &grid,
            case.reduce,
            &x,
            &y,
            &dg,
            &mut dw,
            &mut db,
            None,
        );

        let loss = |wf: &[f64], bf: &[f64]| {
            let y = conv_ref(&s, &x, wf, bf);
            loss_ref(&goodness_ref(&s, &grid, case.reduce, &y), s.batch, dim, classes, &pw, &pb, &labels)
        };
        let wf: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let bf: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let eps = 1e-6;
        // Every weight for the small cases, a stride of them otherwise.
        let stride = (s.w_len() / 60).max(1);
        for k in (0..s.w_len()).step_by(stride) {
            let (mut wp, mut wm) = (wf.clone(), wf.clone());
            wp[k] += eps;
            wm[k] -= eps;
            let fd = (loss(&wp, &bf) - loss(&wm, &bf)) / (2.0 * eps);
            assert!(
                (dw[k] as f64 - fd).abs() <= 1e-5 + 2e-4 * fd.abs(),
                "case {ci}: dW[{k}] = {} vs finite difference {fd}",
                dw[k]
            );
        }
        for c in 0..s.c_out {
            let (mut bp, mut bm) = (bf.clone(), bf.clone());
            bp[c] += eps;
            bm[c] -= eps;
            let fd = (loss(&wf, &bp) - loss(&wf, &bm)) / (2.0 * eps);
            assert!((db[c] as f64 - fd).abs() <= 1e-5 + 2e-4 * fd.abs(), "case {ci}: db[{c}] = {} vs {fd}", db[c]);
        }
    }
}

#[test]
fn wgrad_is_independent_of_chunking_and_batch_split() {
    // The batch-128 reduction runs in 16 groups; the sum over two half-batches must agree to f32 roundoff.
    let s = ConvShape { batch: 20, c_in: 8, c_out: 16, h: 8, w: 8 };
    let grid = PatchGrid::new(2, 8, 8);
    let x = randn(s.x_len(), 1.0, 1);
    let w = randn(s.w_len(), 0.3, 2);
    let b = vec![0.0; s.c_out];
    let mut y = vec![0.0; s.y_len()];
    let mut g = vec![0.0; s.batch * 64];
    asge::ops::conv_goodness_fwd::cpu::conv_goodness_fwd(
        &s,
        &grid,
        GoodnessReduce::Mean,
        &x,
        &w,
        &b,
        &mut y,
        &mut g,
        false,
    );
    let dg = randn(s.batch * 64, 1.0, 3);
    let (mut dw, mut db) = (vec![0.0; s.w_len()], vec![0.0; 16]);
    asge::ops::conv_goodness_wgrad::cpu::conv_goodness_wgrad(
        &s,
        &grid,
        GoodnessReduce::Mean,
        &x,
        &y,
        &dg,
        &mut dw,
        &mut db,
        None,
    );
    let half = ConvShape { batch: 10, ..s };
    let (mut dw1, mut db1, mut dw2, mut db2) =
        (vec![0.0; s.w_len()], vec![0.0; 16], vec![0.0; s.w_len()], vec![0.0; 16]);
    let (xh, yh, gh) = (s.x_len() / 2, s.y_len() / 2, 10 * 64);
    asge::ops::conv_goodness_wgrad::cpu::conv_goodness_wgrad(
        &half,
        &grid,
        GoodnessReduce::Mean,
        &x[..xh],
        &y[..yh],
        &dg[..gh],
        &mut dw1,
        &mut db1,
        None,
    );
    asge::ops::conv_goodness_wgrad::cpu::conv_goodness_wgrad(
        &half,
        &grid,
        GoodnessReduce::Mean,
        &x[xh..],
        &y[yh..],
        &dg[gh..],
        &mut dw2,
        &mut db2,
        None,
    );
    let sum: Vec<f64> = dw1.iter().zip(&dw2).map(|(a, b)| (a + b) as f64).collect();
    assert_close("dW split", &dw, &sum, 1e-5, 1e-5);
}

#[test]
fn layer_output_pools_drops_and_normalises() {
    let (batch, c, h, w) = (3, 5, 6, 6);
    let y: Vec<f32> = randn(batch * c * h * w, 1.0, 9).iter().map(|v| v.abs() + 0.01).collect();
    for pool in [None, Some(PoolKind::Avg), Some(PoolKind::Rms)] {
        for dropout in [None, Some(Dropout { p: 0.25, key: 77, first: 0 })] {
            let (ho, wo) = if pool.is_some() { (3, 3) } else { (6, 6) };
            let mut out = vec![f32::NAN; batch * c * ho * wo];
            let mut gap = vec![f32::NAN; batch * c];
            asge::ops::layer_output::cpu::layer_output(batch, c, h, w, pool, dropout, &y, &mut out, Some(&mut gap));
            // Reference in f64.
            let per = c * ho * wo;
            let mut zeros = 0;
            for b in 0..batch {
                let mut o = vec![0.0f64; per];
                for ch in 0..c {
                    for i in 0..ho {
                        for j in 0..wo {
                            let at = |r: usize, q: usize| y[((b * c + ch) * h + r) * w + q] as f64;
                            o[(ch * ho + i) * wo + j] = match pool {
                                None => at(i, j),
                                Some(PoolKind::Avg) => {
                                    (at(2 * i, 2 * j)
                                        + at(2 * i, 2 * j + 1)
                                        + at(2 * i + 1, 2 * j)
                                        + at(2 * i + 1, 2 * j + 1))
                                        / 4.0
                                }
                                Some(PoolKind::Rms) => ((at(2 * i, 2 * j).powi(2)
                                    + at(2 * i, 2 * j + 1).powi(2)
                                    + at(2 * i + 1, 2 * j).powi(2)
                                    + at(2 * i + 1, 2 * j + 1).powi(2))
                                    / 4.0)
                                    .sqrt(),
                            };
                        }
                    }
                }
                if let Some(d) = dropout {
                    for (k, v) in o.iter_mut().enumerate() {
                        let keep = asge::rng::dropout_uniform(d.key, (b * per + k) as u32) >= d.p;
                        *v = if keep { *v / (1.0 - d.p as f64) } else { 0.0 };
                    }
                    zeros += o.iter().filter(|&&v| v == 0.0).count();
                }
                let rms = (o.iter().map(|v| v * v).sum::<f64>() / per as f64).sqrt();
                let want: Vec<f64> = o.iter().map(|v| v / rms).collect();
                assert_close(&format!("{pool:?} {dropout:?} sample {b}"), &out[b * per..][..per], &want, 1e-5, 1e-6);
                // Per-sample RMS of the output is 1.
                let got_rms =
                    (out[b * per..][..per].iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / per as f64).sqrt();
                assert!((got_rms - 1.0).abs() < 1e-5, "rms {got_rms}");
                for ch in 0..c {
                    let m = want[ch * ho * wo..][..ho * wo].iter().sum::<f64>() / (ho * wo) as f64;
                    assert!((gap[b * c + ch] as f64 - m).abs() < 1e-5);
                }
            }
            if dropout.is_some() {
                let frac = zeros as f64 / (batch * per) as f64;
                assert!(frac > 0.1 && frac < 0.45, "dropout zeroed {frac} of the values at p = 0.25");
            }
        }
    }
}

#[test]
fn fusion_heads_match_finite_differences() {
    let (batch, classes) = (3, 4);
    let dims = [5usize, 7];
    let feats: Vec<Vec<f32>> = dims.iter().enumerate().map(|(i, &c)| randn(batch * c, 1.0, 100 + i as u64)).collect();
    let ws: Vec<Vec<f32>> = dims.iter().enumerate().map(|(i, &c)| randn(classes * c, 0.5, 200 + i as u64)).collect();
    let bs: Vec<Vec<f32>> = (0..2).map(|i| randn(classes, 0.5, 300 + i)).collect();
    let labels = vec![1u32, 3, 0];
    let loss_f64 = |ws: &[Vec<f64>], bs: &[Vec<f64>]| {
        let mut total = 0.0;
        for b in 0..batch {
            let s: Vec<f64> = (0..classes)
                .map(|n| {
                    (0..2)
                        .map(|k| {
                            bs[k][n]
                                + (0..dims[k])
                                    .map(|j| ws[k][n * dims[k] + j] * feats[k][b * dims[k] + j] as f64)
                                    .sum::<f64>()
                        })
                        .sum()
                })
                .collect();
            let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            total += m + s.iter().map(|v| (v - m).exp()).sum::<f64>().ln() - s[labels[b] as usize];
        }
        total / batch as f64
    };
    let fref: Vec<(&[f32], usize)> = feats.iter().zip(dims).map(|(f, c)| (f.as_slice(), c)).collect();
    let href: Vec<(&[f32], &[f32])> = ws.iter().zip(&bs).map(|(w, b)| (w.as_slice(), b.as_slice())).collect();
    let mut gw: Vec<Vec<f32>> = dims.iter().map(|&c| vec![0.0; classes * c]).collect();
    let mut gb: Vec<Vec<f32>> = vec![vec![0.0; classes]; 2];
    let mut grads: Vec<(&mut [f32], &mut [f32])> =
        gw.iter_mut().zip(gb.iter_mut()).map(|(w, b)| (w.as_mut_slice(), b.as_mut_slice())).collect();
    let (mut logits, mut stats) = (vec![0.0; batch * classes], vec![0.0; 2]);
    asge::ops::fusion_heads::cpu::fusion_heads(
        batch,
        batch,
        classes,
        &fref,
        &href,
        &labels,
        &mut logits,
        Some(&mut grads),
        &mut stats,
    )
    .unwrap();
    let wf: Vec<Vec<f64>> = ws.iter().map(|w| w.iter().map(|&v| v as f64).collect()).collect();
    let bf: Vec<Vec<f64>> = bs.iter().map(|w| w.iter().map(|&v| v as f64).collect()).collect();
    let l0 = loss_f64(&wf, &bf);
    assert!((stats[0] as f64 / batch as f64 - l0).abs() < 1e-5 * l0);
    let eps = 1e-6;
    for k in 0..2 {
        for i in 0..classes * dims[k] {
            let (mut wp, mut wm) = (wf.clone(), wf.clone());
            wp[k][i] += eps;
            wm[k][i] -= eps;
            let fd = (loss_f64(&wp, &bf) - loss_f64(&wm, &bf)) / (2.0 * eps);
            assert!((gw[k][i] as f64 - fd).abs() <= 1e-6 + 1e-4 * fd.abs(), "head {k} dW[{i}] {} vs {fd}", gw[k][i]);
        }
        for n in 0..classes {
            let (mut bp, mut bm) = (bf.clone(), bf.clone());
            bp[k][n] += eps;
            bm[k][n] -= eps;
            let fd = (loss_f64(&wf, &bp) - loss_f64(&wf, &bm)) / (2.0 * eps);
            assert!((gb[k][n] as f64 - fd).abs() <= 1e-6 + 1e-4 * fd.abs(), "head {k} db[{n}] {} vs {fd}", gb[k][n]);
        }
    }
}

#[test]
fn adamw_matches_pytorch_formula_in_f64() {
    let n = 1000;
    let mut p = randn(n, 0.1, 1);
    let (mut m, mut v) = (vec![0.0f32; n], vec![0.0f32; n]);
    let mut pf: Vec<f64> = p.iter().map(|&x| x as f64).collect();
    let (mut mf, mut vf) = (vec![0.0f64; n], vec![0.0f64; n]);
    for t in 1..=5u64 {
        let g = randn(n, 0.01, 10 + t);
        let h = AdamWStep { lr: 2e-4, weight_decay: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: t };
        asge::ops::adamw::cpu::adamw(&mut p, &g, &mut m, &mut v, &h.scalars());
        for i in 0..n {
            let gi = g[i] as f64;
            pf[i] *= 1.0 - h.lr * h.weight_decay;
            mf[i] = 0.9 * mf[i] + 0.1 * gi;
            vf[i] = 0.999 * vf[i] + 0.001 * gi * gi;
            let mhat = mf[i] / (1.0 - 0.9f64.powi(t as i32));
            let vhat = vf[i] / (1.0 - 0.999f64.powi(t as i32));
            pf[i] -= h.lr * mhat / (vhat.sqrt() + h.eps);
        }
    }
    // Five steps of size ~2e-4 each; f32 carries ~1e-8 absolute on values of ~0.1.
    assert_close("adamw", &p, &pf, 0.0, 2e-7);
    // The first step moves every weight by ~lr (Adam's normalised step), after the decay.
    let mut q = vec![0.5f32];
    let h = AdamWStep { lr: 1e-3, weight_decay: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 1 };
    asge::ops::adamw::cpu::adamw(&mut q, &[3.0], &mut [0.0], &mut [0.0], &h.scalars());
    assert!((q[0] - 0.499).abs() < 1e-6, "{}", q[0]);
}

#[test]
fn goodness_is_flattened_channel_major() {
    // One bright pixel in channel 2 at (5, 1) of an 8x8 map with P = 4 lands in cell (i, j) = (2, 0):
    // flat index c * P^2 + i * P + j = 2 * 16 + 8 + 0 = 40, and nowhere else.
    let s = ConvShape { batch: 1, c_in: 1, c_out: 3, h: 8, w: 8 };
    let grid = PatchGrid::new(4, 8, 8);
    let mut x = vec![0.0f32; 64];
    x[5 * 8 + 1] = 1.0;
    // Only channel 2's centre tap is non-zero, so y is x copied into channel 2.
    let mut w = vec![0.0f32; s.w_len()];
    w[2 * 9 + 4] = 2.0;
    let (mut y, mut g) = (vec![0.0; s.y_len()], vec![0.0; 48]);
    asge::ops::conv_goodness_fwd::cpu::conv_goodness_fwd(
        &s,
        &grid,
        GoodnessReduce::Mean,
        &x,
        &w,
        &[0.0; 3],
        &mut y,
        &mut g,
        false,
    );
    let nonzero: Vec<usize> = g.iter().enumerate().filter(|(_, &v)| v != 0.0).map(|(i, _)| i).collect();
    assert_eq!(nonzero, vec![40]);
    assert_eq!(g[40], 4.0 / 4.0); // y = 2 -> y^2 = 4, over a 2x2 bin
}

/// `||a - b|| / ||b||`.
fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (num / den).sqrt()
}

#[test]
fn fp16_weight_gradient_needs_and_gets_its_dz_scaling() {
    // An ImageNet-like layer: 56x56 maps in 2x2 cells of 784 pixels, 1000 classes with the projection drawn as
    // Params::init draws it (std 1/sqrt(N) = 0.03), inputs of RMS ~1 as every layer sees, batch 32. Then
    // dz = 2 y dL/dg / |bin| is ~1e-6 to 1e-5, in fp16's subnormal range (spacing 6e-8), where each value keeps
    // only a few significant bits. Measured: the unscaled product is off by ~6e-4 (relative, whole tensor; the
    // rounding is unbiased, so it averages down), the scaled one by ~2e-5, what the 2^-11 rounding of x and y
    // alone gives. The test asks for < 1e-3 scaled and a 10x gain from the scale: without the scale, or with a
    // wrong one, the two errors are alike.
    use asge::backend::{round_f16, Precision};
    let s = ConvShape { batch: 32, c_in: 8, c_out: 16, h: 56, w: 56 };
    let grid = PatchGrid::new(2, 56, 56);
    let (d, n) = (s.c_out * grid.cells(), 1000);
    let x: Vec<f32> = randn(s.x_len(), 1.0, 1).iter().map(|v| v.abs()).collect();
    let w = randn(s.w_len(), (2.0 / (s.c_in * 9) as f64).sqrt(), 2);
    let b = vec![0.0; s.c_out];
    let pw = randn(d * n, 1.0 / (n as f64).sqrt(), 3);
    let pb = vec![0.0; n];
    let labels: Vec<u32> = (0..s.batch as u32).map(|i| (i * 37) % n as u32).collect();
    let be = CpuBackend::new().with_precision(Precision::F16);
    let (mut y, mut g) = (vec![0.0; s.y_len()], vec![0.0; s.batch * d]);
    asge::ops::conv_goodness_fwd::run(
        &be,
        asge::ops::conv_goodness_fwd::Args {
            layer: 0,
            s: &s,
            grid: &grid,
            reduce: GoodnessReduce::Mean,
            x: &x,
            w: &w,
            b: &b,
            y: &mut y,
            g: &mut g,
        },
    )
    .unwrap();
    assert!(y.iter().all(|&v| round_f16(v) == v), "the fp16 path stores y in fp16");
    let (mut logits, mut dg, mut stats) = (vec![0.0; s.batch * n], vec![0.0; s.batch * d], vec![0.0; 2]);
    asge::ops::goodness_loss::run(
        &be,
        asge::ops::goodness_loss::Args {
            layer: 0,
            batch: s.batch,
            mean_over: s.batch,
            dim: d,
            classes: n,
            g: &g,
            proj_w: &pw,
            proj_b: &pb,
            labels: &labels,
            logits: &mut logits,
            dg: Some(&mut dg),
            stats: &mut stats,
        },
    )
    .unwrap();
    let xr: Vec<f32> = x.iter().map(|&v| round_f16(v)).collect();
    let grad = |scale: Option<f32>| {
        let (mut dw, mut db) = (vec![0.0; s.w_len()], vec![0.0; s.c_out]);
        asge::ops::conv_goodness_wgrad::cpu::conv_goodness_wgrad(
            &s,
            &grid,
            GoodnessReduce::Mean,
            &xr,
            &y,
            &dg,
            &mut dw,
            &mut db,
            scale,
        );
        (dw, db)
    };
    let (dw32, db32) = grad(None);
    let scale = asge::backend::dz_scale(s.batch, &grid, GoodnessReduce::Mean);
    assert_eq!(scale, 32768.0, "B * |bin| = 32 * 784, to the nearest power of two");
    let (dw16, db16) = grad(Some(scale));
    let (dw_raw, _) = grad(Some(1.0));
    let (scaled, raw) = (rel_err(&dw16, &dw32), rel_err(&dw_raw, &dw32));
    eprintln!("fp16 dW error: {scaled:.2e} scaled, {raw:.2e} unscaled");
    assert!(scaled < 1e-3, "scaled fp16 weight gradient off by {scaled:.2e}");
    assert!(raw > 10.0 * scaled, "the dz scale gains less than 10x: {raw:.2e} unscaled, {scaled:.2e} scaled");
    assert_eq!(db16, db32, "the bias gradient sums the unrounded dz");
    // And through the backend: the same numbers.
    let (mut dw, mut db) = (vec![0.0; s.w_len()], vec![0.0; s.c_out]);
    asge::ops::conv_goodness_wgrad::run(
        &be,
        asge::ops::conv_goodness_wgrad::Args {
            layer: 0,
            s: &s,
            mean_over: s.batch,
            grid: &grid,
            reduce: GoodnessReduce::Mean,
            x: &x,
            y: &y,
            dg: &dg,
            dw: &mut dw,
            db: &mut db,
        },
    )
    .unwrap();
    assert_eq!(dw, dw16);
}

/// AdamW's scalars reach a backend one way, `Schedule::prepare_step`: an adamw before it is an error that says so
/// (not a step with zeros), and after it the step is the formula's with those scalars.
#[test]
fn adamw_takes_the_scalars_the_step_prepared() {
    let be = CpuBackend::new();
    let (mut p, g, mut m, mut v) = (vec![0.5f32; 3], vec![3.0f32; 3], vec![0.0f32; 3], vec![0.0f32; 3]);
    let step = |p: &mut Vec<f32>, m: &mut Vec<f32>, v: &mut Vec<f32>| {
        asge::ops::adamw::run(&be, asge::ops::adamw::Args { layer: 0, len: 3, p, grad: &g, m, v, copy: None })
    };
    let e = step(&mut p, &mut m, &mut v).unwrap_err();
    assert!(format!("{e:#}").contains("prepare_step"), "{e:#}");
    assert_eq!(p, [0.5; 3], "a refused step changed the weights");
    let h = AdamWStep { lr: 1e-3, weight_decay: 0.0, beta1: 0.9, beta2: 0.999, eps: 1e-8, step: 1 };
    be.prepare_step(&h.scalars(), &[]).unwrap();
    step(&mut p, &mut m, &mut v).unwrap();
    let mut want = vec![0.5f32];
    asge::ops::adamw::cpu::adamw(&mut want, &[3.0], &mut [0.0], &mut [0.0], &h.scalars());
    assert_eq!(p, [want[0]; 3]);
    assert!((p[0] - 0.499).abs() < 1e-6, "{}", p[0]);
}

/// A layer's dropout key reaches a backend one way too, `Schedule::prepare_step` (per layer): a layer output with
/// dropout before it is an error naming the layer, and after it the mask is the one that key draws.
#[test]
fn layer_output_takes_the_dropout_key_the_step_prepared() {
    let be = CpuBackend::new();
    let (batch, c, h) = (2, 3, 4);
    let y: Vec<f32> = randn(batch * c * h * h, 1.0, 9).iter().map(|v| v.abs() + 0.01).collect();
    let mut out = vec![0.0f32; y.len()];
    let run = |out: &mut Vec<f32>| {
        let a = asge::ops::layer_output::Args {
            layer: 1,
            batch,
            c,
            h,
            w: h,
            pool: None,
            dropout: Some(0.5),
            first_sample: 0,
            y: &y,
            out,
            gap: None,
        };
        asge::ops::layer_output::run(&be, a)
    };
    let e = run(&mut out).unwrap_err();
    assert!(format!("{e:#}").contains("layer 2's dropout") && format!("{e:#}").contains("prepare_step"), "{e:#}");
    be.prepare_step(&Default::default(), &[None, Some(77)]).unwrap();
    run(&mut out).unwrap();
    let mut want = vec![0.0f32; y.len()];
    let d = Some(Dropout { p: 0.5, key: 77, first: 0 });
    asge::ops::layer_output::cpu::layer_output(batch, c, h, h, None, d, &y, &mut want, None);
    assert_eq!(out, want);
}

/// Data-parallel training: a rank's share of a batch (its first sample's index in the global batch, the loss a
/// mean over the global batch) gives exactly the rows one process computes for the whole batch: the same dropout
/// masks and the same dL/dg, bit for bit.
#[test]
fn a_share_of_a_batch_draws_the_whole_batchs_masks_and_gradients() {
    use asge::backend::cpu::CpuBackend;
    use asge::backend::prelude::*;
    let be = CpuBackend::new();
    let (batch, c, h, first) = (6, 3, 4, 2);
    let per = c * h * h;
    let y: Vec<f32> = randn(batch * per, 1.0, 9).iter().map(|v| v.abs() + 0.01).collect();
    be.prepare_step(&Default::default(), &[Some(1234)]).unwrap();
    let output = |rows: std::ops::Range<usize>, first_sample: usize| {
        let yb = be.upload(&y[rows.start * per..rows.end * per]).unwrap();
        let mut out = be.zeros(rows.len() * per).unwrap();
        let a = asge::ops::layer_output::Args {
            layer: 0,
            batch: rows.len(),
            c,
            h,
            w: h,
            pool: None,
            dropout: Some(0.5),
            first_sample,
            y: &yb,
            out: &mut out,
            gap: None,
        };
        asge::ops::layer_output::run(&be, a).unwrap();
        be.read(&out, rows.len() * per).unwrap()
    };
    let whole = output(0..batch, 0);
    assert_eq!(output(first..batch, first), whole[first * per..], "the share's masks");
    // Without its offset the share would draw the first samples' masks: the test tells them apart.
    assert_ne!(output(first..batch, 0), whole[first * per..]);

    let (dim, classes) = (12, 10);
    let g: Vec<f32> = randn(batch * dim, 1.0, 1).iter().map(|v| v.abs()).collect();
    let (pw, pb) = (randn(dim * classes, 0.3, 2), randn(classes, 0.3, 3));
    let labels: Vec<u32> = (0..batch as u32).map(|i| (i * 3) % 10).collect();
    let dg = |rows: std::ops::Range<usize>, mean_over: usize| {
        let (n, mut logits, mut dg, mut stats) =
            (rows.len(), vec![0.0; rows.len() * classes], vec![0.0; rows.len() * dim], vec![0.0; 2]);
        asge::ops::goodness_loss::cpu::goodness_loss(
            n,
            mean_over,
            dim,
            classes,
            &g[rows.start * dim..rows.end * dim],
            &pw,
            &pb,
            &labels[rows],
            &mut logits,
            Some(&mut dg),
            &mut stats,
        )
        .unwrap();
        dg
    };
    let whole = dg(0..batch, batch);
    assert_eq!(dg(first..batch, batch), whole[first * dim..], "the share's dL/dg");
    assert_ne!(dg(first..batch, batch - first), whole[first * dim..]);
}
