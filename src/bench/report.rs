//! `asge bench`'s tables: the ops and the step against the measured ceilings, and the kernels of a step timed
//! alone.

use super::BenchReport;

/// The report as a table.
pub fn format_report(r: &BenchReport) -> String {
    let mut s = format!("asge bench: {} on {}, batch {}\n", r.model, r.device, r.batch);
    if r.emulated {
        s += "NOT GPU NUMBERS: the CUDA driver stand-in ran this; every time below measures its host emulator\n";
    }
    if let (Some(gemm), Some(copy)) = (r.gemm_ceiling_gflops, r.copy_ceiling_gbs) {
        let source = r.ceiling_source.as_deref().unwrap_or("source unknown");
        s += &format!("ceilings (measured now): GEMM {gemm:.1} GFLOP/s ({source}), copy {copy:.1} GB/s\n\n");
        s += &format!("{:<22} {:>5} {:>10} {:>14} {:>9}\n", "op", "layer", "ms", "rate", "% ceil");
    }
    for row in &r.rows {
        let rate = if row.unit == "FLOP/s" {
            format!("{:.1} GFLOP/s", row.rate / 1e9)
        } else {
            format!("{:.1} GB/s", row.rate / 1e9)
        };
        // The same columns with or without ceilings (a `-` for the share), so that scripts read them alike.
        let pct = if r.gemm_ceiling_gflops.is_none() { "-".to_string() } else { share(row.unit, row.pct_of_ceiling) };
        s += &format!(
            "{:<22} {:>5} {:>10.3} {:>14} {:>9}{}\n",
            row.op,
            row.layer.map(|l| l.to_string()).unwrap_or_default(),
            row.ms,
            rate,
            pct,
            row.kernel.map(|k| format!("  {k}")).unwrap_or_default()
        );
    }
    if r.rows.iter().any(|row| row.unit == "B/s" && row.pct_of_ceiling > 100.0) {
        s += IN_CACHE_NOTE;
    }
    let achieved = r.flop_per_image * r.images_per_s / 1e9;
    s += &format!(
        "\ntrain step: {:.2} ms ({:.0} images/s; {})\nconv FLOPs (forward + weight gradient): {:.3} GFLOP/image -> {:.1} GFLOP/s",
        r.step_ms,
        r.images_per_s,
        r.step_clock,
        r.flop_per_image / 1e9,
        achieved,
    );
    if let Some(gemm) = r.gemm_ceiling_gflops {
        s += &format!(", {:.1}% of the GEMM ceiling", 100.0 * achieved / gemm);
    }
    s.push('\n');
    if !r.kernels.is_empty() {
        s += &format_kernels(r);
    }
    s
}

/// A row's share of its ceiling, as printed: a memory-bound op past the copy ceiling (measured on 1 GiB or 256 MiB,
/// so DRAM's) moved data that stayed in the caches, and its share says nothing: `in cache`, with
/// [`IN_CACHE_NOTE`] below the table.
pub(super) fn share(unit: &str, pct: f64) -> String {
    if unit == "B/s" && pct > 100.0 {
        "in cache".into()
    } else {
        format!("{pct:.1}%")
    }
}

/// The note under a table with an `in cache` row.
const IN_CACHE_NOTE: &str =
    "in cache: a memory-bound op faster than the copy ceiling (DRAM's): its data fits in the caches \
                             (its rate is in the JSON)\n";

/// The kernel table: every kernel of a step by layer, timed alone, with the work it must do and its rate.
pub fn format_kernels(r: &BenchReport) -> String {
    let who = if r.emulated { "the stand-in's emulator, NOT a GPU" } else { "CUDA events" };
    let mut s = format!(
        "\nkernels of a step, each run alone (eager steps, graphs off; {who}; mean of {} steps):\n",
        r.kernel_steps
    );
    s += &format!(
        "{:<6} {:<24} {:>8} {:>10} {:>10} {:>10} {:>16} {:>8}\n",
        "layer", "kernel", "launches", "us", "MFLOP", "KB", "achieved", "% ceil"
    );
    for k in &r.kernels {
        let layer = if k.layer > r.layers { "heads".to_string() } else { k.layer.to_string() };
        let achieved = if k.unit == "FLOP/s" {
            format!("{:.2} TFLOP/s", k.rate / 1e12)
        } else {
            format!("{:.1} GB/s", k.rate / 1e9)
        };
        let pct = k.pct_of_ceiling.map_or("-".to_string(), |p| share(k.unit, p));
        s += &format!(
            "{:<6} {:<24} {:>8} {:>10.1} {:>10.1} {:>10.1} {:>16} {:>8}\n",
            layer,
            k.kernel,
            k.launches,
            k.us,
            k.flop / 1e6,
            k.bytes / 1e3,
            achieved,
            pct
        );
    }
    if r.kernels.iter().any(|k| k.unit == "B/s" && k.pct_of_ceiling.is_some_and(|p| p > 100.0)) {
        s += IN_CACHE_NOTE;
    }
    let sum_us: f64 = r.kernels.iter().map(|k| k.us).sum();
    let launches: f64 = r.kernels.iter().map(|k| k.launches).sum();
    s += &format!(
        "kernels alone: {:.3} ms in {launches} launches per step, against the step's {:.3} ms ({})\n",
        sum_us / 1e3,
        r.step_ms,
        r.step_clock
    );
    s
}
