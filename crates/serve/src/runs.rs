//! A run's curves, read from its metrics.jsonl and drawn as SVG: what the web page's run tabs
//! and `masklm report` show.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, BufReader, Read as _};
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
    /// Series name -> (step, value), by step, at most [`MAX_POINTS`] of them (see [`thin`]).
    /// A resumed run that redoes steps replaces them: a record at or before a series' last
    /// step drops that series' points from that step on (the abandoned branch).
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

/// Most points a series keeps. The chart's plot is ~440 px wide, and the page fetches the
/// points with the charts: a 174 MB metrics.jsonl once came back as a 169 MB answer.
pub const MAX_POINTS: usize = 1000;

/// Longest metrics line read whole: the trainer writes lines of a few KB (an evaluation with
/// its probes' details more); a longer one is damaged, and is not held in memory.
const MAX_LINE: u64 = 64 << 20;

impl RunView {
    /// Reads `dir/metrics.jsonl` (and `dir/config.toml`) and draws its charts. The file is read
    /// a line at a time and each series thinned as it grows, so a long run's file is never
    /// held in memory.
    pub fn load(dir: &Path) -> Result<RunView, RunError> {
        let path = dir.join("metrics.jsonl");
        let mut metrics = Metrics::default();
        match File::open(&path) {
            Ok(file) => metrics.read(BufReader::new(file), &path)?,
            // A run that has not logged yet: no charts, not an error.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && dir.is_dir() => {}
            Err(source) => return Err(RunError::Io { path, source }),
        }
        let step = metrics.step;
        let last_eval = std::mem::take(&mut metrics.last_eval);
        let config = std::fs::read_to_string(dir.join("config.toml")).ok();
        Ok(RunView {
            dir: dir.to_path_buf(),
            step,
            panels: metrics.panels(),
            last_eval,
            config,
        })
    }
}

/// What has been read of a metrics file so far.
#[derive(Default)]
struct Metrics {
    step: u64,
    last_eval: BTreeMap<String, f64>,
    /// (panel, series name) -> points.
    series: BTreeMap<(&'static str, String), Series>,
}

impl Metrics {
    /// Reads every record of `reader`. A line that is not a record is an error unless it is
    /// the last: the trainer may be writing it.
    fn read(&mut self, mut reader: impl BufRead, path: &Path) -> Result<(), RunError> {
        let io = |source| RunError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut bad: Option<(usize, String)> = None;
        let mut line = Vec::new();
        for number in 1.. {
            line.clear();
            let read = (&mut reader)
                .take(MAX_LINE)
                .read_until(b'\n', &mut line)
                .map_err(io)?;
            if read == 0 {
                break;
            }
            let cut = read as u64 == MAX_LINE && line.last() != Some(&b'\n');
            if cut {
                reader.skip_until(b'\n').map_err(io)?;
            }
            if line.trim_ascii().is_empty() {
                continue;
            }
            if let Some((at, reason)) = bad.take() {
                let path = path.to_path_buf();
                return Err(RunError::Record {
                    path,
                    line: at,
                    reason,
                });
            }
            let record = if cut {
                Err(format!("longer than {} MB", MAX_LINE >> 20))
            } else {
                serde_json::from_slice(&line).map_err(|e| e.to_string())
            };
            match record {
                Ok(record) => self.add(record),
                Err(reason) => bad = Some((number, reason)),
            }
        }
        Ok(())
    }

    fn add(&mut self, record: BTreeMap<String, Value>) {
        let Some(at) = record.get("step").and_then(Value::as_u64) else {
            return;
        };
        self.step = self.step.max(at);
        if record.contains_key("eval_loss") || record.keys().any(|k| k.starts_with("eval/")) {
            self.last_eval = record
                .iter()
                .filter(|(k, _)| k.as_str() != "step")
                .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                .collect();
        }
        for (key, value) in &record {
            let (Some(place), Some(value)) = (place(key), value.as_f64()) else {
                continue;
            };
            if value.is_finite() {
                self.series.entry(place).or_default().push(at, value);
            }
        }
    }

    /// The charts, in [`ORDER`].
    fn panels(self) -> Vec<Panel> {
        let mut panels: BTreeMap<&'static str, BTreeMap<String, BTreeMap<u64, f64>>> =
            BTreeMap::new();
        for ((panel, name), series) in self.series {
            let points = thin(&series.points, MAX_POINTS).into_iter().collect();
            panels.entry(panel).or_default().insert(name, points);
        }
        ORDER
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
            .collect()
    }
}

/// One series' points in step order, thinned whenever it doubles past [`MAX_POINTS`], so that a
/// run of millions of steps costs a few thousand points.
#[derive(Default)]
struct Series {
    points: Vec<(u64, f64)>,
}

impl Series {
    fn push(&mut self, step: u64, value: f64) {
        if self.points.last().is_some_and(|&(last, _)| step <= last) {
            let from = self.points.partition_point(|&(s, _)| s < step);
            self.points.truncate(from);
        }
        self.points.push((step, value));
        if self.points.len() >= 2 * MAX_POINTS {
            self.points = thin(&self.points, MAX_POINTS);
        }
    }
}

/// At most `max` (at least 4) of `points`: the first and the last, and between them, of each of
/// `(max - 2) / 2` runs of consecutive points, the lowest and the highest, in step order. A
/// spike stays visible where an average would hide it; a series of `max` points or fewer
/// (evaluations: one point each) is kept whole.
pub fn thin(points: &[(u64, f64)], max: usize) -> Vec<(u64, f64)> {
    let max = max.max(4);
    let [first, inner @ .., last] = points else {
        return points.to_vec();
    };
    if points.len() <= max {
        return points.to_vec();
    }
    let run = inner.len().div_ceil((max - 2) / 2);
    let mut kept = vec![*first];
    for chunk in inner.chunks(run) {
        let by_value = |a: &&(u64, f64), b: &&(u64, f64)| a.1.total_cmp(&b.1);
        let (Some(low), Some(high)) =
            (chunk.iter().min_by(by_value), chunk.iter().max_by(by_value))
        else {
            continue;
        };
        let (a, b) = if low.0 <= high.0 {
            (low, high)
        } else {
            (high, low)
        };
        kept.push(*a);
        if b.0 != a.0 {
            kept.push(*b);
        }
    }
    kept.push(*last);
    kept
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

const W: f64 = 520.0;
const H: f64 = 280.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 28.0;
const BOTTOM: f64 = 36.0;
/// The plot area's width and height.
const PW: f64 = W - LEFT - RIGHT;
const PH: f64 = H - TOP - BOTTOM;

/// A line chart of `series` over steps as an `<svg>` element: axes with five ticks each, one
/// polyline per series (with markers when it has few points, as evaluations do), a legend.
/// Each polyline carries `data-points`, the number of points drawn.
pub fn chart(title: &str, series: &BTreeMap<String, BTreeMap<u64, f64>>, log_y: bool) -> String {
    let title = if log_y {
        format!("{} (log scale)", escape(title))
    } else {
        escape(title)
    };
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" class="chart" role="img" aria-label="{title}"><rect width="{W}" height="{H}" fill="white"/><text x="{LEFT}" y="18" font-size="14" font-family="sans-serif" font-weight="bold">{title}</text>"#,
    );
    match Frame::around(series, log_y) {
        None => {
            let _ = write!(
                svg,
                r##"<text x="{}" y="{}" font-size="12" font-family="sans-serif" fill="#666">no data yet</text>"##,
                W / 2.0 - 30.0,
                H / 2.0
            );
        }
        Some(frame) => {
            frame.axes(&mut svg);
            for (i, (name, points)) in series.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                frame.line(&mut svg, name, points, color);
                legend_entry(&mut svg, i, name, color);
            }
        }
    }
    svg.push_str("</svg>");
    svg
}

/// The steps and values a chart spans; values in axis units (log10 on a log axis).
struct Frame {
    x0: u64,
    x1: u64,
    y0: f64,
    y1: f64,
    log_y: bool,
}

impl Frame {
    /// The span of every point of `series`, widened where it is one step or one value (so the
    /// scale never divides by zero); `None` without points.
    fn around(series: &BTreeMap<String, BTreeMap<u64, f64>>, log_y: bool) -> Option<Frame> {
        let mut frame = Frame {
            x0: u64::MAX,
            x1: 0,
            y0: f64::INFINITY,
            y1: f64::NEG_INFINITY,
            log_y,
        };
        for (&x, &v) in series.values().flat_map(|s| s.iter()) {
            let y = frame.axis(v);
            frame.x0 = frame.x0.min(x);
            frame.x1 = frame.x1.max(x);
            frame.y0 = frame.y0.min(y);
            frame.y1 = frame.y1.max(y);
        }
        if frame.x0 > frame.x1 {
            return None;
        }
        if frame.x0 == frame.x1 {
            frame.x1 = frame.x0 + 1;
        }
        if frame.y1 - frame.y0 < 1e-12 {
            let pad = if frame.y0 == 0.0 {
                1.0
            } else {
                frame.y0.abs() * 0.05
            };
            frame.y0 -= pad;
            frame.y1 += pad;
        }
        Some(frame)
    }

    /// A value in axis units.
    fn axis(&self, v: f64) -> f64 {
        if self.log_y {
            v.max(f64::MIN_POSITIVE).log10()
        } else {
            v
        }
    }

    fn sx(&self, x: u64) -> f64 {
        LEFT + (x - self.x0) as f64 / (self.x1 - self.x0) as f64 * PW
    }

    /// The pixel row of `y`, in axis units.
    fn sy(&self, y: f64) -> f64 {
        TOP + (1.0 - (y - self.y0) / (self.y1 - self.y0)) * PH
    }

    /// Both axes, five ticks each with their grid lines and labels.
    fn axes(&self, svg: &mut String) {
        let (b, r) = (TOP + PH, LEFT + PW);
        let _ = write!(
            svg,
            r##"<g font-size="11" font-family="sans-serif" fill="#444"><line x1="{LEFT}" y1="{b}" x2="{r}" y2="{b}" stroke="#888"/><line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{b}" stroke="#888"/>"##,
        );
        for i in 0..=4 {
            let f = i as f64 / 4.0;
            let x = self.x0 as f64 + f * (self.x1 - self.x0) as f64;
            let px = LEFT + f * PW;
            let _ = write!(
                svg,
                r##"<line x1="{px:.1}" y1="{TOP}" x2="{px:.1}" y2="{b}" stroke="#eee"/><text x="{px:.1}" y="{ty}" text-anchor="middle">{}</text>"##,
                x.round() as i64,
                ty = TOP + PH + 14.0
            );
            let y = self.y0 + f * (self.y1 - self.y0);
            let py = self.sy(y);
            let shown = if self.log_y { 10f64.powf(y) } else { y };
            let _ = write!(
                svg,
                r##"<line x1="{LEFT}" y1="{py:.1}" x2="{r}" y2="{py:.1}" stroke="#eee"/><text x="{tx}" y="{py:.1}" text-anchor="end" dominant-baseline="middle">{}</text>"##,
                label(shown),
                tx = LEFT - 6.0
            );
        }
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="middle">step</text></g>"#,
            LEFT + PW / 2.0,
            H - 4.0,
        );
    }

    /// One series as a polyline, with a marker per point when there are few (evaluations).
    fn line(&self, svg: &mut String, name: &str, points: &BTreeMap<u64, f64>, color: &str) {
        let coords: Vec<String> = points
            .iter()
            .map(|(&x, &v)| format!("{:.1},{:.1}", self.sx(x), self.sy(self.axis(v))))
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
    }
}

/// The `i`-th line of the legend, top right.
fn legend_entry(svg: &mut String, i: usize, name: &str, color: &str) {
    let ly = TOP + 4.0 + 14.0 * i as f64;
    let _ = write!(
        svg,
        r#"<rect x="{lx}" y="{ly}" width="10" height="3" fill="{color}"/><text x="{tx}" y="{ty}" font-size="11" font-family="sans-serif">{}</text>"#,
        escape(name),
        lx = LEFT + PW - 130.0,
        tx = LEFT + PW - 116.0,
        ty = ly + 5.0
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thin_keeps_the_ends_and_each_stretch_extremes_within_the_bound() {
        let points: Vec<(u64, f64)> = (0..10_000u64)
            .map(|s| (s, if s == 4321 { 99.0 } else { (s % 7) as f64 }))
            .collect();
        let kept = thin(&points, 100);
        assert!(kept.len() <= 100, "{} points", kept.len());
        assert_eq!(kept.first(), Some(&(0, 0.0)));
        assert_eq!(kept.last(), Some(&(9999, (9999 % 7) as f64)));
        assert!(kept.contains(&(4321, 99.0)), "the spike is dropped");
        assert!(
            kept.windows(2).all(|w| w[0].0 < w[1].0),
            "not in step order"
        );
        assert_eq!(
            thin(&points[..100], 100),
            &points[..100],
            "short: kept whole"
        );
    }

    #[test]
    fn a_series_stays_bounded_and_a_redone_step_drops_the_abandoned_branch() {
        let mut series = Series::default();
        for step in 1..=100_000 {
            series.push(step, step as f64);
            assert!(series.points.len() < 2 * MAX_POINTS);
        }
        let mut series = Series::default();
        for step in 1..=10 {
            series.push(step, 1.0);
        }
        series.push(5, 2.0);
        assert_eq!(
            series.points,
            [(1, 1.0), (2, 1.0), (3, 1.0), (4, 1.0), (5, 2.0)]
        );
    }
}
