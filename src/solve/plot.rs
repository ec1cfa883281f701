//! A hand-written SVG of a sweep: one panel per quality measure (objective error always;
//! perplexity and KL when measured) against latency, greedy and ILP as two series, so
//! where the ILP curve lies below the greedy one is visible at a glance. Deterministic
//! output (fixed number formatting), no dependencies.

use std::fmt::Write as _;

use super::sweep::{SolverKind, SweepPoint};

const W: f64 = 520.0;
const H: f64 = 380.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 48.0;
const BOTTOM: f64 = 58.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// About five round tick values covering `[lo, hi]`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let span = (hi - lo).max(f64::MIN_POSITIVE);
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let first = (lo / step).ceil() as i64;
    let mut out = Vec::new();
    for k in first.. {
        let t = k as f64 * step;
        if t > hi + step * 1e-9 || out.len() >= 20 {
            break;
        }
        out.push(t);
    }
    out
}

fn label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Padded data range (a flat range gets a small window around it).
fn range(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    if !lo.is_finite() {
        return None;
    }
    let pad = if hi > lo {
        (hi - lo) * 0.06
    } else {
        lo.abs().max(1e-12) * 0.05
    };
    Some((lo - pad, hi + pad))
}

fn panel(
    out: &mut String,
    x0: f64,
    title: &str,
    greedy_label: &str,
    points: &[&SweepPoint],
    y_of: &dyn Fn(&SweepPoint) -> Option<f64>,
) {
    let pts: Vec<(&SweepPoint, f64, f64)> = points
        .iter()
        .filter_map(|p| y_of(p).map(|y| (*p, p.latency * 1e6, y)))
        .collect();
    let (Some((xl, xh)), Some((yl, yh))) = (
        range(pts.iter().map(|p| p.1)),
        range(pts.iter().map(|p| p.2)),
    ) else {
        return;
    };
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let sx = |x: f64| x0 + LEFT + (x - xl) / (xh - xl) * pw;
    let sy = |y: f64| TOP + ph - (y - yl) / (yh - yl) * ph;
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>"##,
        x0 + LEFT + pw / 2.0,
        escape(title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{:.1}" y="{TOP}" width="{pw:.1}" height="{ph:.1}" fill="none" stroke="#444"/>"##,
        x0 + LEFT
    );
    for t in ticks(xl, xh) {
        let x = sx(t);
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" font-size="11">{}</text>"##,
            TOP + ph,
            TOP + ph + 16.0,
            label(t)
        );
    }
    for t in ticks(yl, yh) {
        let y = sy(t);
        let _ = writeln!(
            out,
            r##"<line x1="{:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end" font-size="11">{}</text>"##,
            x0 + LEFT,
            x0 + LEFT + pw,
            x0 + LEFT - 6.0,
            y + 4.0,
            label(t)
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12">latency of the planned layers (µs per step)</text>"##,
        x0 + LEFT + pw / 2.0,
        H - 14.0
    );
    for (solver, color) in [
        (SolverKind::Greedy, "#1f77b4"),
        (SolverKind::Ilp, "#d62728"),
    ] {
        let mut series: Vec<(f64, f64)> = pts
            .iter()
            .filter(|p| p.0.solver == solver)
            .map(|p| (sx(p.1), sy(p.2)))
            .collect();
        series.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
        let line: Vec<String> = series
            .iter()
            .map(|(x, y)| format!("{x:.1},{y:.1}"))
            .collect();
        let _ = writeln!(
            out,
            r##"<polyline points="{}" fill="none" stroke="{color}" stroke-width="1.5"/>"##,
            line.join(" ")
        );
        for (x, y) in &series {
            let _ = match solver {
                SolverKind::Greedy => writeln!(
                    out,
                    r##"<circle cx="{x:.1}" cy="{y:.1}" r="4" fill="{color}"/>"##
                ),
                SolverKind::Ilp => writeln!(
                    out,
                    r##"<rect x="{:.1}" y="{:.1}" width="7" height="7" fill="{color}"/>"##,
                    x - 3.5,
                    y - 3.5
                ),
            };
        }
    }
    // Legend, top right inside the panel.
    // ~6.8 px per character at font-size 12, plus the marker and margins.
    let chars = greedy_label.chars().count().max("ILP, same latency".len());
    let lw = 32.0 + 6.8 * chars as f64;
    let lx = x0 + LEFT + pw - lw - 8.0;
    let _ = writeln!(
        out,
        r##"<rect x="{lx:.1}" y="{:.1}" width="{lw:.1}" height="44" fill="white" stroke="#aaa"/><circle cx="{:.1}" cy="{:.1}" r="4" fill="#1f77b4"/><text x="{:.1}" y="{:.1}" font-size="12">{}</text><rect x="{:.1}" y="{:.1}" width="7" height="7" fill="#d62728"/><text x="{:.1}" y="{:.1}" font-size="12">ILP, same latency</text>"##,
        TOP + 6.0,
        lx + 12.0,
        TOP + 20.0,
        lx + 22.0,
        TOP + 24.0,
        escape(greedy_label),
        lx + 8.5,
        TOP + 32.5,
        lx + 22.0,
        TOP + 40.0
    );
}

/// The sweep as an SVG document: error vs latency, plus perplexity and KL panels when any
/// point has them. `error_label` names the objective (e.g. "total eps"), `greedy_label` the
/// greedy series (e.g. "greedy-gamma (paper)").
pub fn svg(points: &[SweepPoint], title: &str, error_label: &str, greedy_label: &str) -> String {
    let refs: Vec<&SweepPoint> = points.iter().collect();
    type YOf = Box<dyn Fn(&SweepPoint) -> Option<f64>>;
    let mut panels: Vec<(String, YOf)> = vec![(
        error_label.to_string(),
        Box::new(|p: &SweepPoint| Some(p.error)),
    )];
    if points.iter().any(|p| p.perplexity.is_some()) {
        panels.push((
            "perplexity (held-out text)".into(),
            Box::new(|p| p.perplexity),
        ));
    }
    if points.iter().any(|p| p.kl.is_some()) {
        panels.push((
            "KL(full || plan) (held-out text)".into(),
            Box::new(|p| p.kl),
        ));
    }
    let width = W * panels.len() as f64;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{}" viewBox="0 0 {width} {}" font-family="sans-serif">"##,
        H + 24.0,
        H + 24.0
    );
    let _ = writeln!(out, r##"<rect width="100%" height="100%" fill="white"/>"##);
    for (i, (name, y_of)) in panels.iter().enumerate() {
        panel(
            &mut out,
            i as f64 * W,
            name,
            greedy_label,
            &refs,
            y_of.as_ref(),
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="12" fill="#555">{}</text>"##,
        width / 2.0,
        H + 16.0,
        escape(title)
    );
    out.push_str("</svg>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_range() {
        let labels: Vec<String> = ticks(0.0, 1.0).into_iter().map(label).collect();
        assert_eq!(labels, ["0", "0.2", "0.4", "0.6", "0.8", "1"]);
        assert_eq!(ticks(412.3, 437.9), vec![420.0, 430.0]);
        assert_eq!(ticks(412.3, 427.9), vec![415.0, 420.0, 425.0]);
        assert_eq!(label(0.25), "0.25");
        assert_eq!(label(1.5e-6), "1.50e-6");
    }

    #[test]
    fn svg_has_one_panel_per_measure_and_both_series() {
        let p = |solver, latency, error, ppl| SweepPoint {
            solver,
            gamma: 0.0,
            achieved_gamma: 0.0,
            latency,
            step_latency: latency,
            error,
            eps: error,
            weight_bytes: 0,
            formats: Default::default(),
            status: None,
            lower_bound: None,
            solve_seconds: 0.0,
            plan: None,
            perplexity: ppl,
            kl: None,
        };
        let pts = [
            p(SolverKind::Greedy, 4e-4, 1.0, Some(12.0)),
            p(SolverKind::Greedy, 3e-4, 2.0, Some(13.0)),
            p(SolverKind::Ilp, 3e-4, 1.5, Some(12.5)),
        ];
        let s = svg(&pts, "a <b> & c", "total eps", "greedy-gamma (paper)");
        assert!(s.starts_with("<svg") && s.ends_with("</svg>\n"));
        assert_eq!(s.matches("<polyline").count(), 4, "2 panels x 2 series");
        assert!(s.contains("perplexity (held-out text)") && !s.contains("KL(full"));
        assert!(s.contains("a &lt;b&gt; &amp; c"));
    }
}
