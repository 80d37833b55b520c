//! The learning rate of every step. The released recipe: `CosineAnnealingLR(T_max = epochs, eta_min)`, stepped
//! once per epoch (docs/method.md §10): `lr_e = eta_min + (lr_0 - eta_min) * (1 + cos(pi * e / T)) / 2`. For large
//! global batches (docs/many-gpus.md), `--lr-schedule step` moves the same cosine every step (`e` becomes the step
//! over the steps per epoch, a fraction), and `--warmup-epochs W` multiplies the first `W` epochs' steps by a
//! linear ramp, `(s + 1) / (W * steps per epoch)` for step `s` counted from 0, so the first step takes a
//! fraction of the lr and the ramp meets the schedule at the end of the warmup. The lr is never changed otherwise
//! (not with the number of GPUs).

use super::config::{LrSchedule, TrainConfig};

/// The lr of step `batch` (0-based) of epoch `epoch` (0-based) of a run of `steps_per_epoch` steps an epoch.
pub fn lr_at(cfg: &TrainConfig, epoch: usize, batch: usize, steps_per_epoch: usize) -> f64 {
    let per = steps_per_epoch.max(1) as f64;
    let base = match cfg.lr_schedule {
        LrSchedule::Epoch => cosine_lr(cfg.lr, cfg.lr_min, epoch, cfg.epochs),
        LrSchedule::Step => cosine_at(cfg.lr, cfg.lr_min, epoch as f64 + batch as f64 / per, cfg.epochs),
    };
    let warmup_steps = cfg.warmup_epochs * per;
    let s = (epoch as f64) * per + batch as f64;
    if s + 1.0 < warmup_steps {
        base * (s + 1.0) / warmup_steps
    } else {
        base
    }
}

/// The cosine at a fractional epoch `t` of `t_max`.
fn cosine_at(lr0: f64, eta_min: f64, t: f64, t_max: usize) -> f64 {
    if t_max == 0 {
        return lr0;
    }
    eta_min + (lr0 - eta_min) * (1.0 + (std::f64::consts::PI * t / t_max as f64).cos()) / 2.0
}

pub fn cosine_lr(lr0: f64, eta_min: f64, epoch: usize, t_max: usize) -> f64 {
    cosine_at(lr0, eta_min, epoch as f64, t_max)
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

    fn cfg(schedule: LrSchedule, warmup: f64) -> TrainConfig {
        TrainConfig {
            lr: 1e-3,
            lr_min: 0.0,
            epochs: 4,
            lr_schedule: schedule,
            warmup_epochs: warmup,
            ..Default::default()
        }
    }

    #[test]
    fn the_released_schedule_is_unchanged_and_warmup_ramps_per_step() {
        let c = cfg(LrSchedule::Epoch, 0.0);
        for (e, b) in [(0, 0), (1, 3), (3, 9)] {
            assert_eq!(lr_at(&c, e, b, 10), cosine_lr(1e-3, 0.0, e, 4), "epoch {e} batch {b}");
        }
        // Per step: the cosine of the fractional epoch, so mid-epoch values lie between the epochs' own.
        let s = cfg(LrSchedule::Step, 0.0);
        assert_eq!(lr_at(&s, 1, 0, 10), cosine_lr(1e-3, 0.0, 1, 4));
        let mid = lr_at(&s, 1, 5, 10);
        assert!(mid < cosine_lr(1e-3, 0.0, 1, 4) && mid > cosine_lr(1e-3, 0.0, 2, 4), "{mid}");
        // A warmup of 1.5 epochs of 10 steps: step s takes (s + 1) / 15 of the schedule's lr, then the schedule.
        let w = cfg(LrSchedule::Step, 1.5);
        assert!((lr_at(&w, 0, 0, 10) - lr_at(&s, 0, 0, 10) / 15.0).abs() < 1e-18);
        assert!((lr_at(&w, 1, 2, 10) - lr_at(&s, 1, 2, 10) * 13.0 / 15.0).abs() < 1e-18);
        assert_eq!(lr_at(&w, 1, 4, 10), lr_at(&s, 1, 4, 10));
        assert_eq!(lr_at(&w, 3, 9, 10), lr_at(&s, 3, 9, 10));
    }
}
