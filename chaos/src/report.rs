//! The results folder of a run: the history (JSON lines), the nemesis timeline, the verdict,
//! and a picture of throughput and latency over time with the fault windows shaded.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use chaos::{Outcome, Violation, KINDS};

use crate::nemesis::Window;
use crate::workload::Attempt;

pub fn write_jsonl<T: serde::Serialize>(path: &Path, items: &[T]) -> anyhow::Result<()> {
    let mut out = String::new();
    for item in items {
        out.push_str(&serde_json::to_string(item)?);
        out.push('\n');
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// The verdict as a table: each kind of violation with its count, then the first few
/// violations in full.
pub fn verdict(violations: &[Violation], attempts: &[Attempt]) -> String {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for v in violations {
        *counts.entry(v.kind()).or_default() += 1;
    }
    let mut by_outcome: BTreeMap<&str, usize> = BTreeMap::new();
    for a in attempts {
        for (_, o) in &a.outcomes {
            let name = match o {
                Outcome::Ok => "ok",
                Outcome::Fail => "fail",
                Outcome::Unknown => "unknown",
            };
            *by_outcome.entry(name).or_default() += 1;
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "deliveries per recipient: {} ok, {} failed, {} unknown ({} attempts)",
        by_outcome.get("ok").unwrap_or(&0),
        by_outcome.get("fail").unwrap_or(&0),
        by_outcome.get("unknown").unwrap_or(&0),
        attempts.len()
    );
    let _ = writeln!(out, "{:<30} {:>6}  verdict", "check", "found");
    for kind in KINDS {
        let n = counts.get(kind).copied().unwrap_or(0);
        let _ = writeln!(
            out,
            "{kind:<30} {n:>6}  {}",
            if n == 0 { "ok" } else { "VIOLATED" }
        );
    }
    for v in violations.iter().take(20) {
        let _ = writeln!(out, "  {v:?}");
    }
    if violations.len() > 20 {
        let _ = writeln!(out, "  ... and {} more", violations.len() - 20);
    }
    out
}

/// A fault window's caption: what was done, to which nodes.
fn label(win: &Window) -> String {
    let text = if win.detail.is_empty() {
        format!("{:?} {:?}", win.fault, win.nodes)
    } else {
        format!("{:?}: {}", win.fault, win.detail)
    };
    text.replace('&', "&amp;").replace('<', "&lt;")
}

/// An SVG of acknowledged deliveries per second and their median latency over time, with the
/// fault windows shaded and named.
pub fn timeline_svg(attempts: &[Attempt], windows: &[Window], duration_ms: u64) -> String {
    let seconds = (duration_ms / 1000 + 1) as usize;
    let mut ok = vec![0u32; seconds];
    let mut latencies: Vec<Vec<u64>> = vec![Vec::new(); seconds];
    for a in attempts {
        let s = ((a.completed_ms / 1000) as usize).min(seconds - 1);
        if a.outcomes.iter().any(|(_, o)| *o == Outcome::Ok) {
            ok[s] += 1;
            latencies[s].push(a.completed_ms - a.invoked_ms);
        }
    }
    let p50: Vec<u64> = latencies
        .iter_mut()
        .map(|l| {
            l.sort_unstable();
            l.get(l.len() / 2).copied().unwrap_or(0)
        })
        .collect();
    let (w, h, left, top, plot_h) = (900.0, 360.0, 60.0, 30.0, 260.0);
    let plot_w = w - left - 60.0;
    let max_ok = ok.iter().copied().max().unwrap_or(1).max(1) as f64;
    let max_lat = p50.iter().copied().max().unwrap_or(1).max(1) as f64;
    let x = |t_ms: f64| left + plot_w * t_ms / (seconds as f64 * 1000.0);
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(svg, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    for win in windows {
        let (x0, x1) = (x(win.start_ms as f64), x(win.end_ms as f64));
        let _ = writeln!(
            svg,
            r##"<rect x="{x0:.1}" y="{top}" width="{:.1}" height="{plot_h}" fill="#f4b6b6" opacity="0.6"/><text x="{x0:.1}" y="{:.1}" fill="#a00">{}</text>"##,
            (x1 - x0).max(1.0),
            top - 4.0,
            label(win)
        );
    }
    let line = |values: &[f64], max: f64, color: &str| {
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                format!(
                    "{:.1},{:.1}",
                    x(i as f64 * 1000.0 + 500.0),
                    top + plot_h - plot_h * v / max
                )
            })
            .collect();
        format!(
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            points.join(" ")
        )
    };
    let okf: Vec<f64> = ok.iter().map(|v| *v as f64).collect();
    let latf: Vec<f64> = p50.iter().map(|v| *v as f64).collect();
    let _ = writeln!(svg, "{}", line(&okf, max_ok, "#1f5fbf"));
    let _ = writeln!(svg, "{}", line(&latf, max_lat, "#e07b00"));
    let bottom = top + plot_h;
    let _ = writeln!(
        svg,
        r##"<line x1="{left}" y1="{bottom}" x2="{:.1}" y2="{bottom}" stroke="black"/><line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="black"/>"##,
        left + plot_w
    );
    let _ = writeln!(
        svg,
        r##"<text x="4" y="{:.1}" fill="#1f5fbf">{max_ok} ok/s</text><text x="{:.1}" y="{:.1}" fill="#e07b00">p50 {max_lat} ms</text>"##,
        top + 10.0,
        left + plot_w + 4.0,
        top + 10.0
    );
    let _ = writeln!(
        svg,
        r##"<text x="{left}" y="{:.1}">0 s</text><text x="{:.1}" y="{:.1}">{seconds} s</text><text x="{:.1}" y="{:.1}">blue: acknowledged deliveries per second; orange: their median latency; red: fault windows</text>"##,
        bottom + 14.0,
        left + plot_w - 20.0,
        bottom + 14.0,
        left,
        bottom + 34.0
    );
    svg.push_str("</svg>\n");
    svg
}
