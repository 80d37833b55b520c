//! `CosineAnnealingLR(T_max = epochs, eta_min)`, stepped once per epoch (docs/method.md §10):
//! `lr_e = eta_min + (lr_0 - eta_min) * (1 + cos(pi * e / T)) / 2`.

pub fn cosine_lr(lr0: f64, eta_min: f64, epoch: usize, t_max: usize) -> f64 {
    if t_max == 0 {
        return lr0;
    }
    eta_min + (lr0 - eta_min) * (1.0 + (std::f64::consts::PI * epoch as f64 / t_max as f64).cos()) / 2.0
}

/// The most an AdamW-trained weight can move over epochs `from..epochs` of `steps_per_epoch` steps: AdamW
/// moves each weight by about the lr a step at most (its update is lr times a ratio of moment estimates near 1
/// in magnitude, plus the small decay), so the schedule's summed lr bounds the whole run's movement.
pub fn summed_lr(lr0: f64, eta_min: f64, epochs: usize, steps_per_epoch: usize) -> f64 {
    (0..epochs).map(|e| cosine_lr(lr0, eta_min, e, epochs)).sum::<f64>() * steps_per_epoch as f64
}

/// A warning when a run is far too short for its lr: when the summed lr ([`summed_lr`]) is below the layers'
/// typical initial weight size (`typical_init`, the median of their Kaiming std), no weight can travel as far as
/// its own size, and the layers stay close to their random init (a layer near chance after one epoch of a
/// couple of thousand images at the released lr, 2e-4). The released recipe (100 epochs of 50,000-60,000
/// images) sums to ~4 and the quickstart (3 epochs at 2e-3) to ~1.6, 50-150 times the threshold.
pub fn short_run_warning(
    lr0: f64,
    eta_min: f64,
    epochs: usize,
    steps_per_epoch: usize,
    typical_init: f64,
) -> Option<String> {
    let moved = summed_lr(lr0, eta_min, epochs, steps_per_epoch);
    (moved < typical_init).then(|| {
        format!(
            "asge: warning: --lr {lr0} over {} steps ({epochs} epoch(s) of {steps_per_epoch}) lets a weight move by at \
             most ~{moved:.2e} in all (AdamW moves each by about the lr a step), less than the layers' typical initial \
             size ({typical_init:.3}): expect accuracies near chance. The default lr is the released recipe's, for its \
             100 epochs; for a short run raise --lr (the README's quickstart uses 2e-3 for 3 epochs) or train longer",
            epochs * steps_per_epoch
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_spec_table() {
        let want = [(0, 2.0e-4), (25, 1.7218e-4), (50, 1.05e-4), (75, 3.7825e-5), (99, 1.0047e-5)];
        for (e, lr) in want {
            let got = cosine_lr(2e-4, 1e-5, e, 100);
            assert!((got - lr).abs() / lr < 1e-4, "epoch {e}: {got} vs {lr}");
        }
    }

    #[test]
    fn a_run_far_too_short_for_its_lr_is_warned_about() {
        // VGG8's median Kaiming std at width 1: sqrt(2 / (9 * 256)).
        let typical = (2.0f64 / (9.0 * 256.0)).sqrt();
        // The newcomer's run: the released lr, one epoch of 2,048 images at batch 128 (16 steps).
        let w = short_run_warning(2e-4, 1e-5, 1, 16, typical).expect("a warning");
        assert!(w.contains("--lr 0.0002 over 16 steps") && w.contains("raise --lr"), "{w}");
        // The quickstart (3 epochs of 50,000 MNIST images at 2e-3), the released recipe (100 epochs at 2e-4), and
        // one full epoch of MNIST at the released lr: no warning.
        assert!(short_run_warning(2e-3, 1e-5, 3, 391, typical).is_none());
        assert!(short_run_warning(2e-4, 1e-5, 100, 391, typical).is_none());
        assert!(short_run_warning(2e-4, 1e-5, 1, 469, typical).is_none());
        assert!((summed_lr(2e-4, 1e-5, 100, 391) - 391.0 * 100.0 * 1.0595e-4).abs() < 0.01);
    }
}
