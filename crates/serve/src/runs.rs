//! A run's curves, read from its metrics.jsonl and drawn as SVG: what the web page's run tabs
//! and `masklm report` show.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

/// Why a run cannot be shown.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The run folder or its metrics file cannot be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line before the last is not a JSON object (the last may be half-written while the
    /// run trains, and is skipped).
    #[error("{}:{line}: not a metrics record ({reason}); the file is damaged", path.display())]
    Record {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// One chart: several named series over steps.
#[derive(Debug, Clone, Serialize)]
pub struct Panel {
    pub title: String,
    /// Series name -> (step, value), by step; a step logged twice (a resumed run redoing
    /// steps) keeps its last value.
    pub series: BTreeMap<String, BTreeMap<u64, f64>>,
    pub log_y: bool,
    /// The chart, as a standalone `<svg>` element.
    pub svg: String,
}

/// What the page and the report show of a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunView {
    pub dir: PathBuf,
    /// The last step logged.
    pub step: u64,
    pub panels: Vec<Panel>,
    /// The last evaluation record's figures (`eval_perplexity`, `eval/NAME/accuracy`,
    /// `probes/mrr`, ...).
    pub last_eval: BTreeMap<String, f64>,
    /// config.toml as written by the trainer, when present.
    pub config: Option<String>,
}

/// Which chart a metrics key belongs to, and under which series name.
fn place(key: &str) -> Option<(&'static str, String)> {
    let metric = |name: &str| match name {
        "loss" => Some("loss"),
        "perplexity" => Some("perplexity"),
        "accuracy" => Some("masked-token accuracy"),
        _ => None,
    };
    if let Some(rest) = key.strip_prefix("eval/") {
        let (set, name) = rest.rsplit_once('/')?;
        return metric(name).map(|panel| (panel, set.to_string()));
    }
    if let Some(name) = key.strip_prefix("eval_") {
        return metric(name).map(|panel| (panel, "validation".to_string()));
    }
    if let Some(source) = key.strip_prefix("tokens/") {
        return Some(("tokens seen per source", source.to_string()));
    }
    match key {
        "loss" => Some(("loss", "train".to_string())),
        "lr" => Some(("learning rate", "lr".to_string())),
        "grad_norm" => Some(("gradient norm", "grad_norm".to_string())),
        "tokens_per_second" => Some(("tokens per second", "train".to_string())),
        "probes/mrr" => Some(("knowledge probes", "MRR".to_string())),
        "probes/top1" => Some(("knowledge probes", "top-1".to_string())),
        "probes/top5" => Some(("knowledge probes", "top-5".to_string())),
        _ => None,
    }
}

const ORDER: [&str; 8] = [
    "loss",
    "perplexity",
    "masked-token accuracy",
    "knowledge probes",
    "learning rate",
    "gradient norm",
    "tokens per second",
    "tokens seen per source",
];

impl RunView {
    /// Reads `dir/metrics.jsonl` (and `dir/config.toml`) and draws its charts.
    pub fn load(dir: &Path) -> Result<RunView, RunError> {
        let path = dir.join("metrics.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            // A run that has not logged yet: no charts, not an error.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.is_dir() => String::new(),
            Err(source) => return Err(RunError::Io { path, source }),
        };
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut panels: BTreeMap<&'static str, BTreeMap<String, BTreeMap<u64, f64>>> =
            BTreeMap::new();
        let mut last_eval = BTreeMap::new();
        let mut step = 0;
        for (i, line) in lines.iter().enumerate() {
            let record: BTreeMap<String, Value> = match serde_json::from_str(line) {
                Ok(record) => record,
                Err(_) if i + 1 == lines.len() => break,
                Err(e) => {
                    return Err(RunError::Record {
                        path,
                        line: i + 1,
                        reason: e.to_string(),
                    });
                }
            };
            let Some(at) = record.get("step").and_then(Value::as_u64) else {
                continue;
            };
            step = step.max(at);
            if record.contains_key("eval_loss") || record.keys().any(|k| k.starts_with("eval/")) {
                last_eval = record
                    .iter()
                    .filter(|(k, _)| k.as_str() != "step")
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect();
            }
            for (key, value) in &record {
                let (Some((panel, series)), Some(value)) = (place(key), value.as_f64()) else {
                    continue;
                };
                if value.is_finite() {
                    panels
                        .entry(panel)
                        .or_default()
                        .entry(series)
                        .or_default()
                        .insert(at, value);
                }
            }
        }
        let panels = ORDER
            .iter()
            .filter_map(|&title| {
                let series = panels.remove(title)?;
                let log_y = title == "perplexity";
                let svg = chart(title, &series, log_y);
                Some(Panel {
                    title: title.to_string(),
                    series,
                    log_y,
                    svg,
                })
            })
            .collect();
        let config = std::fs::read_to_string(dir.join("config.toml")).ok();
        Ok(RunView {
            dir: dir.to_path_buf(),
            step,
            panels,
            last_eval,
            config,
        })
    }
}

/// Escapes text for HTML/SVG.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

/// A short number for an axis label.
fn label(value: f64) -> String {
    let a = value.abs();
    if a == 0.0 {
        "0".to_string()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{value:.1e}")
    } else if a >= 100.0 {
        format!("{value:.0}")
    } else if a >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.4}")
    }
}

/// A line chart of `series` over steps as an `<svg>` element: axes with five ticks each, one
/// polyline per series (with markers when it has few points, as evaluations do), a legend.
/// Each polyline carries `data-points`, the number of points drawn.
pub fn chart(title: &str, series: &BTreeMap<String, BTreeMap<u64, f64>>, log_y: bool) -> String {
    const W: f64 = 520.0;
    const H: f64 = 280.0;
    const LEFT: f64 = 64.0;
    const RIGHT: f64 = 16.0;
    const TOP: f64 = 28.0;
    const BOTTOM: f64 = 36.0;
    let y_of = |v: f64| {
        if log_y {
            v.max(f64::MIN_POSITIVE).log10()
        } else {
            v
        }
    };
    let points = series.values().flat_map(|s| s.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (u64::MAX, 0u64, f64::INFINITY, f64::NEG_INFINITY);
    for (&x, &v) in points {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y_of(v));
        y1 = y1.max(y_of(v));
    }
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" class="chart" role="img" aria-label="{t}"><rect width="{W}" height="{H}" fill="white"/><text x="{LEFT}" y="18" font-size="14" font-family="sans-serif" font-weight="bold">{t}</text>"#,
        t = if log_y {
            format!("{} (log scale)", escape(title))
        } else {
            escape(title)
        }
    );
    if x0 > x1 {
        let _ = write!(
            svg,
            r##"<text x="{}" y="{}" font-size="12" font-family="sans-serif" fill="#666">no data yet</text></svg>"##,
            W / 2.0 - 30.0,
            H / 2.0
        );
        return svg;
    }
    if x0 == x1 {
        x1 = x0 + 1;
    }
    if y1 - y0 < 1e-12 {
        let pad = if y0 == 0.0 { 1.0 } else { y0.abs() * 0.05 };
        y0 -= pad;
        y1 += pad;
    }
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let sx = |x: u64| LEFT + (x - x0) as f64 / (x1 - x0) as f64 * pw;
    let sy = |y: f64| TOP + (1.0 - (y - y0) / (y1 - y0)) * ph;
    let _ = write!(
        svg,
        r##"<g font-size="11" font-family="sans-serif" fill="#444"><line x1="{LEFT}" y1="{b}" x2="{r}" y2="{b}" stroke="#888"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b}" stroke="#888"/>"##,
        b = TOP + ph,
        r = LEFT + pw
    );
    for i in 0..=4 {
        let f = i as f64 / 4.0;
        let x = x0 as f64 + f * (x1 - x0) as f64;
        let px = LEFT + f * pw;
        let _ = write!(
            svg,
            r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{b}" stroke="#eee"/><text x="{px:.1}" y="{ty}" text-anchor="middle">{}</text>"##,
            x.round() as i64,
            b = TOP + ph,
            ty = TOP + ph + 14.0
        );
        let y = y0 + f * (y1 - y0);
        let py = sy(y);
        let shown = if log_y { 10f64.powf(y) } else { y };
        let _ = write!(
            svg,
            r##"<line x1="{LEFT}" y1="{py:.1}" x2="{r}" y2="{py:.1}" stroke="#eee"/><text x="{tx}" y="{py:.1}" text-anchor="end" dominant-baseline="middle">{}</text>"##,
            label(shown),
            r = LEFT + pw,
            tx = LEFT - 6.0
        );
    }
    let _ = write!(
        svg,
        r#"<text x="{}" y="{}" text-anchor="middle">step</text></g>"#,
        LEFT + pw / 2.0,
        H - 4.0,
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let coords: Vec<String> = points
            .iter()
            .map(|(&x, &v)| format!("{:.1},{:.1}", sx(x), sy(y_of(v))))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}" data-series="{}" data-points="{}"/>"#,
            coords.join(" "),
            escape(name),
            coords.len()
        );
        if points.len() <= 40 {
            for c in &coords {
                let (cx, cy) = c.split_once(',').unwrap_or(("0", "0"));
                let _ = write!(
                    svg,
                    r#"<circle cx="{cx}" cy="{cy}" r="2.5" fill="{color}"/>"#
                );
            }
        }
        let ly = TOP + 4.0 + 14.0 * i as f64;
        let _ = write!(
            svg,
            r#"<rect x="{lx}" y="{ly}" width="10" height="3" fill="{color}"/><text x="{tx}" y="{ty}" font-size="11" font-family="sans-serif">{}</text>"#,
            escape(name),
            lx = LEFT + pw - 130.0,
            tx = LEFT + pw - 116.0,
            ty = ly + 5.0
        );
    }
    svg.push_str("</svg>");
    svg
}
