//! `masklm report`: a run's curves, final figures and config as one static HTML file.

use std::fmt::Write as _;
use std::path::Path;

use crate::runs::{RunError, RunView, escape};

/// The report of the run in `dir` as a self-contained HTML document (inline CSS and SVG, no
/// script, nothing fetched).
pub fn render_report(dir: &Path) -> Result<String, RunError> {
    let view = RunView::load(dir)?;
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string());
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>masklm run {n}</title>\
         <style>body{{font-family:sans-serif;margin:2em;color:#222}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:2px 8px;text-align:left}}td.num{{text-align:right;font-family:monospace}}\
         .charts{{display:flex;flex-wrap:wrap;gap:12px}}pre{{background:#f6f6f6;padding:1em;overflow:auto}}</style>\
         </head><body>\n<h1>masklm run <code>{n}</code></h1>\n<p>{d}: last logged step {s}.</p>\n",
        n = escape(&name),
        d = escape(&view.dir.display().to_string()),
        s = view.step
    );
    if view.last_eval.is_empty() {
        html.push_str("<p>No evaluation logged yet.</p>\n");
    } else {
        html.push_str("<h2>Last evaluation</h2>\n<table><tr><th>metric</th><th>value</th></tr>\n");
        for (key, value) in &view.last_eval {
            let _ = writeln!(
                html,
                "<tr><td>{}</td><td class=\"num\">{value:.6}</td></tr>",
                escape(key)
            );
        }
        html.push_str("</table>\n");
    }
    html.push_str("<h2>Curves</h2>\n<div class=\"charts\">\n");
    for panel in &view.panels {
        html.push_str(&panel.svg);
        html.push('\n');
    }
    html.push_str("</div>\n");
    if let Some(config) = &view.config {
        let _ = write!(
            html,
            "<h2>Configuration (config.toml)</h2>\n<pre>{}</pre>\n",
            escape(config)
        );
    }
    html.push_str("</body></html>\n");
    Ok(html)
}
