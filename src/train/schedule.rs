//! `CosineAnnealingLR(T_max = epochs, eta_min)`, stepped once per epoch (docs/method.md §10):
//! `lr_e = eta_min + (lr_0 - eta_min) * (1 + cos(pi * e / T)) / 2`.

pub fn cosine_lr(lr0: f64, eta_min: f64, epoch: usize, t_max: usize) -> f64 {
    if t_max == 0 {
        return lr0;
    }
    eta_min + (lr0 - eta_min) * (1.0 + (std::f64::consts::PI * epoch as f64 / t_max as f64).cos()) / 2.0
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
}
