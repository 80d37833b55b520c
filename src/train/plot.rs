//! `curves.svg` in the run folder: accuracy per epoch of every layer's projection and of the fusion heads
//! (validation when the run has it, training otherwise). Plain SVG, no dependencies; opens in any browser.

use super::run::EpochMetrics;
use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 420.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 50.0;

/// The SVG text for the metrics so far.
pub fn curves_svg(metrics: &[EpochMetrics], title: &str) -> String {
    let val = metrics.iter().all(|m| m.val_layer_acc.is_some());
    let series = |m: &EpochMetrics| -> (Vec<f64>, Option<f64>) {
        match &m.val_layer_acc {
            Some(l) if val => (l.clone(), m.val_fusion_acc),
            _ => (m.train_layer_acc.clone(), m.train_fusion_acc),
        }
    };
    let layers = metrics.first().map(|m| m.train_layer_acc.len()).unwrap_or(0);
    let epochs = metrics.len().max(2) as f64;
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |e: f64| LEFT + pw * (e - 1.0) / (epochs - 1.0);
    let y = |a: f64| TOP + ph * (1.0 - a);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"18\" font-size=\"14\">{title} ({} accuracy)</text>\n",
        if val { "validation" } else { "training" }
    );
    for i in 0..=10 {
        let a = i as f64 / 10.0;
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}%</text>",
            LEFT + pw,
            y(a),
            y(a),
            LEFT - 6.0,
            y(a) + 4.0,
            i * 10
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">epoch (1 to {})</text>",
        LEFT + pw / 2.0,
        H - 15.0,
        metrics.len()
    );
    let line = |s: &mut String, pts: &[(f64, f64)], color: &str, width: f64, label: &str, row: usize| {
        let path: Vec<String> = pts.iter().map(|&(e, a)| format!("{:.1},{:.1}", x(e), y(a))).collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"{width}\" points=\"{}\"/>",
            path.join(" ")
        );
        let ly = TOP + 16.0 * row as f64;
        let _ = writeln!(
            s,
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{ly:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" stroke-width=\"{width}\"/><text x=\"{:.1}\" y=\"{:.1}\">{label}</text>",
            W - RIGHT + 10.0,
            W - RIGHT + 30.0,
            W - RIGHT + 36.0,
            ly + 4.0
        );
    };
    for l in 0..layers {
        let hue = (l as f64 * 360.0 / layers.max(1) as f64) as u32;
        let pts: Vec<(f64, f64)> =
            metrics.iter().enumerate().filter_map(|(e, m)| series(m).0.get(l).map(|&a| ((e + 1) as f64, a))).collect();
        line(&mut s, &pts, &format!("hsl({hue},70%,45%)"), 1.5, &format!("layer {}", l + 1), l);
    }
    let pts: Vec<(f64, f64)> =
        metrics.iter().enumerate().filter_map(|(e, m)| series(m).1.map(|a| ((e + 1) as f64, a))).collect();
    if !pts.is_empty() {
        line(&mut s, &pts, "black", 3.0, "fusion", layers);
    }
    s.push_str("</svg>\n");
    s
}
