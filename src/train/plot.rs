//! `curves.svg` in the run folder: panels over the epochs for every layer's projection and the fusion heads:
//! top-1 accuracy in percent, as the console prints it (validation when the run has it, training otherwise), the
//! training loss, the validation loss (when the run validates) and the learning rate. Every point has a marker (a
//! one-epoch run is not blank), both axes have ticks, the y axes are scaled to the data, and the layers' colours
//! are Tableau's ten (then repeated with a dash). Layer 1, far below the others in most runs, would squash them
//! into a band: where they would fill less than a quarter of the axis it gets a panel of its own. Plain SVG,
//! no dependencies; opens in any browser.

use super::metrics::EpochMetrics;
use std::fmt::Write;

const W: f64 = 760.0;
const PANEL_H: f64 = 230.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 150.0;
const TOP: f64 = 34.0;
const GAP: f64 = 46.0;

/// Ten colours told apart by most people (Tableau 10).
const COLOURS: [&str; 10] =
    ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac"];

/// Round tick values covering `[lo, hi]`: about `n` of them at 1, 2 or 5 times a power of ten.
fn ticks(lo: f64, hi: f64, n: usize) -> Vec<f64> {
    let span = (hi - lo).max(1e-12);
    let raw = span / n.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * mag).find(|s| *s >= raw).unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() * step;
    (0..).map(|i| first + i as f64 * step).take_while(|t| *t <= hi + step * 1e-9).collect()
}

fn label(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e4) {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// One line of points, with its style: colour, dashed or not, width.
struct Series {
    name: String,
    points: Vec<(f64, f64)>,
    colour: &'static str,
    dashed: bool,
    width: f64,
}

/// The smallest and largest finite values of `series` (`None` when there are none).
fn extent(series: &[Series]) -> Option<(f64, f64)> {
    let all = series.iter().flat_map(|x| x.points.iter().map(|p| p.1)).filter(|v| v.is_finite());
    let (lo, hi) = all.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
    lo.is_finite().then_some((lo, hi))
}

/// A panel's y range: the data's extent with 5% to spare (10% of the value, or 1, when it is flat).
fn y_range(series: &[Series]) -> (f64, f64) {
    let Some((lo, hi)) = extent(series) else { return (0.0, 1.0) };
    if hi - lo < 1e-12 {
        let pad = if hi.abs() > 0.0 { hi.abs() * 0.1 } else { 1.0 };
        (lo - pad, hi + pad)
    } else {
        let pad = (hi - lo) * 0.05;
        (lo - pad, hi + pad)
    }
}

/// True when the first series (layer 1) lies below all the others and, on one axis with them, would squash
/// them into a band of less than a quarter of its height.
fn first_apart(series: &[Series]) -> bool {
    match (extent(&series[..series.len().min(1)]), extent(series.get(1..).unwrap_or_default())) {
        (Some((first_lo, first_hi)), Some((lo, hi))) => first_hi < lo && hi - lo < 0.25 * (hi - first_lo),
        _ => false,
    }
}

/// A panel at vertical offset `top`: axes with ticks (the y range from `series`), the series, a legend (when
/// `legend`).
fn panel(s: &mut String, top: f64, title: &str, series: &[Series], epochs: f64, legend: bool) {
    let pw = W - LEFT - RIGHT;
    let (lo, hi) = y_range(series);
    let x = |e: f64| LEFT + pw * if epochs > 1.0 { (e - 1.0) / (epochs - 1.0) } else { 0.5 };
    let y = |v: f64| top + PANEL_H * (1.0 - (v - lo) / (hi - lo));
    let _ = writeln!(s, "<text x=\"{LEFT}\" y=\"{:.1}\" font-size=\"13\">{title}</text>", top - 8.0);
    let _ = writeln!(
        s,
        "<rect x=\"{LEFT}\" y=\"{top:.1}\" width=\"{pw:.1}\" height=\"{PANEL_H}\" fill=\"none\" stroke=\"#888\"/>"
    );
    for t in ticks(lo, hi, 5) {
        let _ = writeln!(
            s,
            "<line x1=\"{LEFT}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#eee\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            LEFT + pw,
            y(t),
            y(t),
            LEFT - 6.0,
            y(t) + 4.0,
            label(t)
        );
    }
    // The x axis's name at its right end, clear of the tick labels.
    let _ =
        writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" fill=\"#555\">epoch</text>", LEFT + pw + 8.0, top + PANEL_H + 16.0);
    for t in ticks(1.0, epochs, 8).into_iter().filter(|t| t.fract() == 0.0) {
        let _ = writeln!(
            s,
            "<line x1=\"{0:.1}\" x2=\"{0:.1}\" y1=\"{1:.1}\" y2=\"{2:.1}\" stroke=\"#888\"/><text x=\"{0:.1}\" y=\"{3:.1}\" text-anchor=\"middle\">{4}</text>",
            x(t),
            top + PANEL_H,
            top + PANEL_H + 4.0,
            top + PANEL_H + 16.0,
            t
        );
    }
    for (row, se) in series.iter().enumerate() {
        let dash = if se.dashed { " stroke-dasharray=\"5,3\"" } else { "" };
        let pts: Vec<String> =
            se.points.iter().filter(|p| p.1.is_finite()).map(|&(e, v)| format!("{:.1},{:.1}", x(e), y(v))).collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"{}\"{dash} points=\"{}\"/>",
            se.colour,
            se.width,
            pts.join(" ")
        );
        for &(e, v) in se.points.iter().filter(|p| p.1.is_finite()) {
            let _ = writeln!(s, "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"2.5\" fill=\"{}\"/>", x(e), y(v), se.colour);
        }
        if legend {
            let ly = top + 14.0 * row as f64 + 6.0;
            let _ = writeln!(
                s,
                "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{ly:.1}\" y2=\"{ly:.1}\" stroke=\"{}\" stroke-width=\"{}\"{dash}/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
                W - RIGHT + 10.0,
                W - RIGHT + 30.0,
                se.colour,
                se.width,
                W - RIGHT + 36.0,
                ly + 4.0,
                se.name
            );
        }
    }
}

/// The SVG text for the metrics so far.
pub fn curves_svg(metrics: &[EpochMetrics], title: &str) -> String {
    let val = !metrics.is_empty() && metrics.iter().all(|m| m.val_layer_acc.is_some());
    let val_loss = val && metrics.iter().all(|m| m.val_layer_loss.is_some());
    let layers = metrics.first().map(|m| m.train_layer_acc.len()).unwrap_or(0);
    let epochs = metrics.last().map_or(1, |m| m.epoch).max(1) as f64;
    let style = |l: usize| (COLOURS[l % COLOURS.len()], l >= COLOURS.len());
    let pts = |f: &dyn Fn(&EpochMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
        metrics.iter().filter_map(|m| f(m).map(|v| (m.epoch as f64, v))).collect()
    };
    // Per layer, then fusion: accuracy (in percent), training loss, validation loss.
    let (mut acc, mut loss, mut vloss) = (Vec::new(), Vec::new(), Vec::new());
    let series = |name: &str, points, l: Option<usize>| {
        let (colour, dashed, width) = match l {
            Some(l) => (style(l).0, style(l).1, 1.5),
            None => ("#000", false, 3.0),
        };
        Series { name: name.into(), points, colour, dashed, width }
    };
    for l in 0..layers {
        let name = format!("layer {}", l + 1);
        let a = if val {
            pts(&|m| m.val_layer_acc.as_ref().and_then(|v| v.get(l)).map(|a| 100.0 * a))
        } else {
            pts(&|m| m.train_layer_acc.get(l).map(|a| 100.0 * a))
        };
        acc.push(series(&name, a, Some(l)));
        loss.push(series(&name, pts(&|m| m.train_layer_loss.get(l).copied()), Some(l)));
        vloss.push(series(&name, pts(&|m| m.val_layer_loss.as_ref().and_then(|v| v.get(l)).copied()), Some(l)));
    }
    let fusion_acc = if val { pts(&|m| m.val_fusion_acc) } else { pts(&|m| m.train_fusion_acc) };
    if !fusion_acc.is_empty() {
        let pct = fusion_acc.into_iter().map(|(e, a)| (e, 100.0 * a)).collect();
        acc.push(series("fusion", pct, None));
        loss.push(series("fusion", pts(&|m| m.train_fusion_loss), None));
        vloss.push(series("fusion", pts(&|m| m.val_fusion_loss), None));
    }
    let lr =
        vec![Series { name: "lr".into(), points: pts(&|m| Some(m.lr)), colour: "#333", dashed: false, width: 1.5 }];
    let which = if val { "validation" } else { "training" };
    let mut panels: Vec<(String, Vec<Series>, bool)> = Vec::new();
    if layers >= 2 && first_apart(&acc) {
        let first = acc.remove(0);
        panels.push((format!("top-1 accuracy, % ({which}), layers 2.. and fusion"), acc, true));
        panels.push((format!("top-1 accuracy, % ({which}), layer 1 on its own scale"), vec![first], true));
    } else {
        panels.push((format!("top-1 accuracy, % ({which})"), acc, true));
    }
    panels.push(("training loss (cross-entropy)".into(), loss, false));
    if val_loss {
        panels.push(("validation loss (cross-entropy)".into(), vloss, false));
    }
    panels.push(("learning rate".into(), lr, false));
    let h = TOP + 14.0 + panels.len() as f64 * (PANEL_H + GAP);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"11\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"16\" font-size=\"14\">{}</text>\n",
        xml_text(title)
    );
    for (i, (name, series, legend)) in panels.iter().enumerate() {
        panel(&mut s, TOP + 14.0 + i as f64 * (PANEL_H + GAP), name, series, epochs, *legend);
    }
    s.push_str("</svg>\n");
    s
}

/// `t` as SVG text: `&`, `<` and `>` escaped (a title names the user's data folder).
fn xml_text(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(epoch: usize, acc: f64) -> EpochMetrics {
        EpochMetrics {
            epoch,
            lr: 2e-4,
            train_layer_loss: vec![1.0; 10],
            train_layer_acc: vec![acc; 10],
            train_fusion_loss: Some(1.0),
            train_fusion_acc: Some(acc),
            val_layer_acc: None,
            val_fusion_acc: None,
            val_layer_loss: None,
            val_fusion_loss: None,
            images_per_s: 1.0,
            seconds: 1.0,
            wall_time: 0.0,
        }
    }

    #[test]
    fn a_one_epoch_run_draws_markers_ticks_and_three_panels() {
        let svg = curves_svg(&[m(1, 0.5)], "t");
        // One marker per series and panel: 10 layers + fusion in accuracy and loss, and the lr.
        assert_eq!(svg.matches("<circle").count(), 11 + 11 + 1);
        for p in ["top-1 accuracy, % (training)", "training loss", "learning rate"] {
            assert!(svg.contains(p), "{p}");
        }
        // Ten layers, ten colours.
        for c in COLOURS {
            assert!(svg.contains(c), "{c}");
        }
        assert!(svg.contains(">1</text>"), "an epoch tick");
    }

    /// The y tick labels of the panel titled `title` (up to the next panel's title).
    fn tick_labels(svg: &str, title: &str) -> Vec<f64> {
        let start = svg.find(title).unwrap_or_else(|| panic!("no panel {title}"));
        let rest = &svg[start + title.len()..];
        let end = rest.find("font-size=\"13\"").unwrap_or(rest.len());
        rest[..end].split("text-anchor=\"end\">").skip(1).filter_map(|t| t.split('<').next()?.parse().ok()).collect()
    }

    #[test]
    fn layer_one_far_below_gets_its_own_scale_and_accuracy_reads_in_percent() {
        // Layer 1 at 10-12%, the others and fusion at 95-99% (validation), over three epochs.
        let metrics: Vec<EpochMetrics> = (1..=3)
            .map(|e| {
                let mut x = m(e, 0.0);
                let mut acc = vec![0.95 + 0.01 * e as f64; 10];
                acc[0] = 0.10 + 0.01 * e as f64;
                x.val_layer_acc = Some(acc);
                x.val_fusion_acc = Some(0.96 + 0.01 * e as f64);
                x.val_layer_loss = Some(vec![0.5; 10]);
                x.val_fusion_loss = Some(0.4);
                x
            })
            .collect();
        let svg = curves_svg(&metrics, "vgg8 on <mine> & co");
        // The main panel spans the others' 96-99% (with 5% spare), in percent, not 10-99% or 0-1.
        let main = tick_labels(&svg, "layers 2.. and fusion");
        assert!(main.iter().all(|&t| (95.0..=100.0).contains(&t)) && main.len() >= 3, "{main:?}");
        let first = tick_labels(&svg, "layer 1 on its own scale");
        assert!(first.iter().all(|&t| (10.0..=14.0).contains(&t)) && !first.is_empty(), "{first:?}");
        // A validation-loss panel; the title escaped; "epoch" beside each x axis, never under a tick label.
        assert!(svg.contains("validation loss (cross-entropy)"));
        assert!(svg.contains("vgg8 on &lt;mine&gt; &amp; co"));
        assert_eq!(svg.matches(">epoch</text>").count(), 5);
        // Close layers share one panel.
        let mut close = metrics.clone();
        for x in &mut close {
            x.val_layer_acc.as_mut().unwrap()[0] = 0.9;
        }
        let svg = curves_svg(&close, "t");
        assert!(!svg.contains("own scale") && svg.contains("top-1 accuracy, % (validation)"));
    }

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        assert_eq!(ticks(0.0, 1.0, 5), vec![0.0, 0.2, 0.4, 0.6000000000000001, 0.8, 1.0]);
        let t = ticks(1.23e-5, 2.1e-4, 5);
        assert!(t.len() >= 3 && t[0] >= 1.23e-5 && *t.last().unwrap() <= 2.1e-4, "{t:?}");
    }
}
