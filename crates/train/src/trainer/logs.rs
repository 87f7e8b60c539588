//! `metrics.jsonl` and TensorBoard.
//!
//! metrics.jsonl is the record; the TensorBoard events are derived from it, record by record
//! ([`scalars`]), so that a resumed run can rebuild them from the records it keeps.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tensorboard_rs::summary_writer::SummaryWriter;

use crate::TrainError;

pub(super) struct Logs {
    metrics: std::fs::File,
    metrics_path: PathBuf,
    tensorboard: Option<SummaryWriter>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Logs {
    /// Opens the run's logs. A new run starts them afresh (a crashed run that never saved a
    /// checkpoint may have left some). A resumed run keeps the records up to `resumed_at` (the
    /// steps after it are run again) and rebuilds the TensorBoard events from them; with an
    /// `archive` (a new branch), the whole metrics file and the old events are kept there.
    pub(super) fn open(
        run_dir: &Path,
        tensorboard: bool,
        resumed_at: Option<usize>,
        archive: Option<&Path>,
    ) -> Result<Self, TrainError> {
        let metrics_path = run_dir.join("metrics.jsonl");
        let tensorboard_dir = run_dir.join("tensorboard");
        let kept = match resumed_at {
            None => {
                std::fs::File::create(&metrics_path).map_err(io(&metrics_path))?;
                Vec::new()
            }
            Some(step) => keep_records(&metrics_path, step, archive)?,
        };
        if tensorboard_dir.is_dir() {
            match archive {
                Some(archive) => std::fs::rename(&tensorboard_dir, archive.join("tensorboard")),
                None => std::fs::remove_dir_all(&tensorboard_dir),
            }
            .map_err(io(&tensorboard_dir))?;
        }
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(io(&metrics_path))?;
        let tensorboard = if tensorboard {
            std::fs::create_dir_all(&tensorboard_dir).map_err(io(&tensorboard_dir))?;
            let mut writer = SummaryWriter::new(&tensorboard_dir);
            for record in &kept {
                add_scalars(&mut writer, record);
            }
            writer.flush();
            Some(writer)
        } else {
            None
        };
        Ok(Self {
            metrics,
            metrics_path,
            tensorboard,
        })
    }

    /// Appends `record` (which holds its `step`) to metrics.jsonl and its scalars to TensorBoard.
    pub(super) fn write(&mut self, record: Value) -> Result<(), TrainError> {
        writeln!(self.metrics, "{record}").map_err(|source| TrainError::Io {
            path: self.metrics_path.clone(),
            source,
        })?;
        if let Some(tb) = self.tensorboard.as_mut() {
            add_scalars(tb, &record);
            tb.flush();
        }
        Ok(())
    }
}

/// Rewrites metrics.jsonl with the records up to `step` (after copying it whole into
/// `archive`), and returns them.
fn keep_records(
    metrics_path: &Path,
    step: usize,
    archive: Option<&Path>,
) -> Result<Vec<Value>, TrainError> {
    if !metrics_path.is_file() {
        return Ok(Vec::new());
    }
    if let Some(archive) = archive {
        let copy = archive.join("metrics.jsonl");
        std::fs::copy(metrics_path, &copy).map_err(io(&copy))?;
    }
    let text = std::fs::read_to_string(metrics_path).map_err(io(metrics_path))?;
    // A line cut short by a crash does not parse and is dropped with the later records.
    let kept: Vec<Value> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|r| record_step(r).is_some_and(|s| s <= step))
        .collect();
    let kept_text: String = kept.iter().map(|r| format!("{r}\n")).collect();
    crate::checkpoint::write_atomic(metrics_path, &kept_text)?;
    Ok(kept)
}

fn record_step(record: &Value) -> Option<usize> {
    record.get("step")?.as_u64().map(|s| s as usize)
}

fn add_scalars(writer: &mut SummaryWriter, record: &Value) {
    let Some(step) = record_step(record) else {
        return;
    };
    for (tag, value) in scalars(record) {
        writer.add_scalar(&tag, value as f32, step);
    }
}

/// The TensorBoard scalars of one metrics record: a training step's `loss`, `lr`,
/// `grad_norm`, `tokens_per_second` as `train/*` and `tokens/NAME` as `data/tokens/NAME`; an
/// evaluation's `eval_*` (transformers' Trainer names) as `eval/*`, `eval/SET/*` and
/// `probes/*` as they are, and each probe's rank and probability as `probe/lineN/*`.
pub(super) fn scalars(record: &Value) -> Vec<(String, f64)> {
    let Some(object) = record.as_object() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (key, value) in object {
        let Some(value) = value.as_f64() else {
            continue;
        };
        let tag = match key.as_str() {
            "loss" | "lr" | "grad_norm" | "tokens_per_second" => format!("train/{key}"),
            "step" | "eval_tokens" | "loss_scale" | "tokens_seen" => continue,
            _ if key.starts_with("tokens/") => format!("data/{key}"),
            _ if key.starts_with("eval/") && key.ends_with("/tokens") => continue,
            _ if key.starts_with("eval/") || key.starts_with("probes/") => key.clone(),
            _ => match key.strip_prefix("eval_") {
                Some(metric) => format!("eval/{metric}"),
                None => continue,
            },
        };
        out.push((tag, value));
    }
    for probe in object
        .get("probes")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(line) = probe.get("line").and_then(Value::as_u64) else {
            continue;
        };
        for metric in ["rank", "probability"] {
            if let Some(value) = probe.get(metric).and_then(Value::as_f64) {
                out.push((format!("probe/line{line}/{metric}"), value));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::scalars;

    #[test]
    fn records_map_to_the_tensorboard_tags_the_loop_always_wrote() {
        let step = json!({"step": 10, "loss": 2.5, "lr": 1e-4, "grad_norm": 0.5,
            "tokens_per_second": 900.0, "skipped": false, "loss_scale": 1024.0,
            "tokens/pubmed": 5000});
        let mut tags: Vec<(String, f64)> = scalars(&step);
        tags.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            tags,
            vec![
                ("data/tokens/pubmed".to_string(), 5000.0),
                ("train/grad_norm".to_string(), 0.5),
                ("train/loss".to_string(), 2.5),
                ("train/lr".to_string(), 1e-4),
                ("train/tokens_per_second".to_string(), 900.0),
            ]
        );
        let eval = json!({"step": 10, "eval_loss": 3.0, "eval_perplexity": 20.0,
            "eval_accuracy": 0.3, "eval_tokens": 40, "eval/pubmed/loss": 4.0,
            "eval/pubmed/tokens": 12, "probes/mrr": 0.5,
            "probes": [{"line": 3, "answer": "cell", "rank": 2, "probability": 0.25, "top": "x"}]});
        let mut tags: Vec<(String, f64)> = scalars(&eval);
        tags.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            tags,
            vec![
                ("eval/accuracy".to_string(), 0.3),
                ("eval/loss".to_string(), 3.0),
                ("eval/perplexity".to_string(), 20.0),
                ("eval/pubmed/loss".to_string(), 4.0),
                ("probe/line3/probability".to_string(), 0.25),
                ("probe/line3/rank".to_string(), 2.0),
                ("probes/mrr".to_string(), 0.5),
            ]
        );
    }
}
