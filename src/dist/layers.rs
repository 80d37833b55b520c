//! Layer-parallel training's placement: which contiguous layers each rank trains (docs/many-gpus.md). A layer's
//! cost is its convolution's arithmetic, forward and weight gradient (the goodness, the loss and the layer output
//! are small beside it), and the automatic placement balances it: of the contiguous splits, the one whose most
//! loaded rank has the least (its step time is the pipeline's).

use crate::model::ModelSpec;
use anyhow::{bail, Result};
use std::sync::Mutex;

/// How the ranks of a run share its work (`--parallel`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Parallel {
    /// Each rank trains on its share of every batch.
    #[default]
    Data,
    /// Each rank trains contiguous layers; `Some`: `--placement`, the layers before each rank's first, for ranks
    /// 1, 2, ...
    Layers(Option<Vec<usize>>),
}

static PARALLEL: Mutex<Option<Parallel>> = Mutex::new(None);

/// Sets how this process's ranks share the work (the command line's `--parallel` and `--placement`).
pub fn set_parallel(p: Parallel) {
    *PARALLEL.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
}

/// How the ranks share the work: data parallel unless the command line said otherwise.
pub fn parallel() -> Parallel {
    PARALLEL.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_default()
}

/// The layers rank `rank` of `ranks` trains in layer-parallel training: `lo..hi`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage {
    pub rank: usize,
    pub ranks: usize,
    pub lo: usize,
    pub hi: usize,
}

impl Stage {
    /// The last rank, which also trains the fusion heads.
    pub fn last(&self) -> bool {
        self.rank + 1 == self.ranks
    }
}

/// Each layer's share of a training step's arithmetic: its convolution forward and weight gradient.
pub fn layer_costs(spec: &ModelSpec) -> Vec<f64> {
    let macs: Vec<f64> = spec.layers.iter().map(|l| l.conv_macs() as f64).collect();
    let total: f64 = macs.iter().sum();
    macs.iter().map(|m| m / total.max(1.0)).collect()
}

/// The first layer of each rank and the layer count, `[0, b1, ..., L]`: `manual` (`--placement`, checked) or
/// the balanced split.
pub fn placement(spec: &ModelSpec, ranks: usize, manual: Option<&[usize]>) -> Result<Vec<usize>> {
    let layers = spec.layers.len();
    if ranks > layers {
        bail!(
            "--parallel layers: {ranks} ranks for the {layers} layers of {} (each rank trains at least one layer; \
             use at most {layers} ranks, or --parallel data)",
            spec.arch
        );
    }
    if let Some(b) = manual {
        let shown = b.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",");
        if b.len() + 1 != ranks {
            bail!(
                "--placement {shown}: {} boundaries for {ranks} ranks (give {}: the layers before each rank's first, \
                 for ranks 1 to {})",
                b.len(),
                ranks - 1,
                ranks - 1
            );
        }
        let mut prev = 0;
        for &v in b {
            if v <= prev || v >= layers {
                bail!(
                    "--placement {shown}: each value must be more than the one before it (and than 0) and less than \
                     the {layers} layers of {}, so that every rank trains at least one layer",
                    spec.arch
                );
            }
            prev = v;
        }
        return Ok([0].into_iter().chain(b.iter().copied()).chain([layers]).collect());
    }
    Ok(balanced(&layer_costs(spec), ranks))
}

/// The contiguous split of `costs` into `parts` non-empty groups whose largest sum is least (on a tie, the
/// earliest such split), as boundaries `[0, ..., costs.len()]`.
pub fn balanced(costs: &[f64], parts: usize) -> Vec<usize> {
    let n = costs.len();
    let prefix: Vec<f64> =
        std::iter::once(0.0).chain(costs.iter().scan(0.0, |s, c| Some(*s + c).inspect(|v| *s = *v))).collect();
    let sum = |a: usize, b: usize| prefix[b] - prefix[a];
    // best[k][i]: the least largest group of the first i costs in k groups; cut[k][i] where the last group starts.
    let mut best = vec![vec![f64::INFINITY; n + 1]; parts + 1];
    let mut cut = vec![vec![0; n + 1]; parts + 1];
    best[0][0] = 0.0;
    for k in 1..=parts {
        for i in k..=n {
            for j in k - 1..i {
                let v = best[k - 1][j].max(sum(j, i));
                if v < best[k][i] {
                    best[k][i] = v;
                    cut[k][i] = j;
                }
            }
        }
    }
    let mut bounds = vec![n];
    let mut i = n;
    for k in (1..=parts).rev() {
        i = cut[k][i];
        bounds.push(i);
    }
    bounds.reverse();
    bounds
}

/// This rank's stage in `bounds` (from [`placement`]).
pub fn stage(bounds: &[usize], rank: usize) -> Stage {
    Stage { rank, ranks: bounds.len() - 1, lo: bounds[rank], hi: bounds[rank + 1] }
}

/// The placement as the start of a run prints it: each rank's layers (numbered from 1) and share of the step.
pub fn describe(spec: &ModelSpec, bounds: &[usize]) -> String {
    let costs = layer_costs(spec);
    let ranks = bounds.len() - 1;
    let parts: Vec<String> = (0..ranks)
        .map(|r| {
            let (lo, hi) = (bounds[r], bounds[r + 1]);
            let share: f64 = costs[lo..hi].iter().sum();
            let layers = if hi - lo == 1 { format!("layer {}", lo + 1) } else { format!("layers {}-{}", lo + 1, hi) };
            let heads = if r + 1 == ranks { " + fusion heads" } else { "" };
            format!("rank {r}: {layers}{heads} ({:.0}%)", 100.0 * share)
        })
        .collect();
    format!("{ranks} ranks layer-parallel, {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balanced_split_minimises_the_largest_group() {
        // Made-up shares, the third the largest.
        let costs = [0.05, 0.2, 0.35, 0.15, 0.15, 0.1];
        assert_eq!(balanced(&costs, 1), vec![0, 6]);
        assert_eq!(balanced(&costs, 2), vec![0, 3, 6]);
        // 3 groups: {0.05,0.2} {0.35} {0.15,0.15,0.1} has max 0.4; nothing does better.
        assert_eq!(balanced(&costs, 3), vec![0, 2, 3, 6]);
        assert_eq!(balanced(&costs, 6), vec![0, 1, 2, 3, 4, 5, 6]);
    }
}
