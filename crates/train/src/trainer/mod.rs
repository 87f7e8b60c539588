//! The step-based training loop.
//!
//! Everything random is a pure function of the seed and the position in the run: the order of
//! epoch `e` is [`epoch_order`](masklm_data::epoch_order)`(n, seed, e)`, the masks of a sample
//! are keyed by (seed, epoch, sample index), and dropout is reseeded from (seed, step) at each
//! optimizer step, its micro-batches continuing that one stream. Step `k` therefore sees the
//! same batches, masks and dropout in every run, and `--resume` continues exactly from a
//! checkpoint without replaying any data.
//!
//! [`train`] reads as the loop it is: [`Run::open`] (every refusal, then folders, tokenizer,
//! cache, model/optimizer/state, logs), then per step [`Run::step`], [`Run::log_step`],
//! [`Run::evaluate`] when due, and [`Run::checkpoint`], which carries out what the
//! [`CheckpointPolicy`] decides.

mod logs;
mod open;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::Device;
use masklm_data::{FolderLock, MaskVocab, MlmTokenizer, SplitReader, StepSampler};
use masklm_model::{MaskedLm, ModelConfig};
use serde_json::json;

use crate::checkpoint::{
    TokenizerFiles, TrainState, checkpoints_dir, mark_best, rotate, save_checkpoint,
};
use crate::config::VALIDATION;
use crate::policy::{CheckpointAction, CheckpointPolicy, StepEnd};
use crate::{Precision, StepStats, TrainConfig, TrainError, train_step};
use logs::Logs;
use masklm_infer::eval::{EvalResult, EvalSettings, evaluate_splits};
use masklm_infer::probes::{Probe, ProbeReport, run_probes};

/// How a run starts.
#[derive(Debug, Clone, PartialEq)]
pub enum Start {
    /// A new run in an empty (or checkpoint-less) folder.
    New,
    /// Continue the run in the folder: from its latest valid checkpoint, or from the one named
    /// (`step-0000100` or a path).
    Resume { from: Option<String> },
}

/// Facts about a run, given to the observer when it starts.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub start_step: usize,
    pub total_steps: usize,
    pub train_examples: usize,
    pub validation_examples: usize,
    pub parameters: usize,
    pub cache: PathBuf,
    pub cache_reused: bool,
    /// The checkpoint a resumed run continues from.
    pub resumed_from: Option<PathBuf>,
}

/// One training step.
#[derive(Debug, Clone, Copy)]
pub struct StepLog {
    /// Optimizer steps done (1 after the first step).
    pub step: usize,
    pub total_steps: usize,
    /// Not finite (or NaN when nothing was masked) on a skipped step.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
    /// The update was skipped; the weights are unchanged.
    pub skipped: bool,
    /// Masked tokens in the step's micro-batches (0: nothing to learn from, so skipped).
    pub masked: usize,
}

/// Receives the run's events; the CLI draws a progress bar from them.
pub trait Observer {
    fn on_start(&self, _info: &RunInfo) {}
    fn on_step(&self, _log: &StepLog) {}
    /// One eval set's result (`set` is "validation" or a name from `[eval] sets`).
    fn on_eval(&self, _step: usize, _set: &str, _result: &EvalResult) {}
    fn on_probes(&self, _step: usize, _report: &ProbeReport) {}
    fn on_checkpoint(&self, _path: &Path) {}
    /// Something the user should know that does not stop the run.
    fn on_notice(&self, _message: &str) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// Everything one evaluation measured.
#[derive(Debug, Clone)]
pub struct EvalReport {
    pub step: usize,
    /// Each eval set's result: "validation" first (when the data has a validation split),
    /// then `[eval] sets` by name.
    pub sets: Vec<(String, EvalResult)>,
    /// The set that picks `best` and drives early stopping.
    pub tracked: String,
    pub probes: Option<ProbeReport>,
}

impl EvalReport {
    /// The result of set `name`.
    pub fn get(&self, name: &str) -> Option<&EvalResult> {
        self.sets.iter().find(|(n, _)| n == name).map(|(_, r)| r)
    }
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub last_step: usize,
    /// The checkpoint written last (every run that returns Ok writes one).
    pub checkpoint: PathBuf,
    /// The tracked set's result at the last and the first evaluation of this run.
    pub final_eval: Option<EvalResult>,
    pub first_eval: Option<EvalResult>,
    /// All results of the last and the first evaluation (for before/after comparisons).
    pub final_report: Option<EvalReport>,
    pub first_report: Option<EvalReport>,
    /// Stopped early by the stop flag (Ctrl-C).
    pub interrupted: bool,
    /// Stopped by early stopping (`[eval] patience`): why.
    pub stopped_early: Option<String>,
    /// Training losses of the steps run by this invocation, in order (skipped steps too).
    pub losses: Vec<f64>,
}

impl RunOutcome {
    fn record_eval(&mut self, report: EvalReport) {
        let tracked = report.get(&report.tracked).copied();
        if self.first_report.is_none() {
            self.first_eval = tracked;
            self.first_report = Some(report.clone());
        }
        self.final_eval = tracked;
        self.final_report = Some(report);
    }
}

/// Trains according to `config` in `run_dir` on `device` (a plain device; the loop adds
/// autodiff). Stops after the step during which `stop` is set, with a checkpoint.
pub fn train(
    config: &TrainConfig,
    run_dir: &Path,
    start: Start,
    device: &Device,
    observer: &dyn Observer,
    stop: &AtomicBool,
) -> Result<RunOutcome, TrainError> {
    let mut run = Run::open(config, run_dir, &start, device, observer)?;
    let mut outcome = RunOutcome {
        last_step: run.state.step,
        checkpoint: PathBuf::new(),
        final_eval: None,
        first_eval: None,
        final_report: None,
        first_report: None,
        interrupted: false,
        stopped_early: None,
        losses: Vec::new(),
    };
    if config.eval.on_start
        && run.state.step == 0
        && let Some(report) = run.evaluate(observer)?
    {
        outcome.record_eval(report);
    }
    while run.state.step < run.total_steps {
        let (stats, lr) = run.step();
        outcome.losses.push(stats.loss);
        run.log_step(&stats, lr, observer)?;
        run.stop_if_stuck(&stats)?;
        let last = run.state.step == run.total_steps;
        let interrupted = stop.load(Ordering::SeqCst) && !last;
        let mut end = StepEnd {
            step: run.state.step,
            last,
            stopping: interrupted,
            improved: None,
        };
        let mut early_stop = None;
        if run.eval_due(last)
            && let Some(report) = run.evaluate(observer)?
        {
            end.improved = Some(run.track_best(&report));
            early_stop = run.patience_exhausted().filter(|_| !last);
            end.stopping |= early_stop.is_some();
            outcome.record_eval(report);
        }
        if let Some(path) = run.checkpoint(&end, observer)? {
            outcome.checkpoint = path;
        }
        outcome.last_step = run.state.step;
        if let Some(reason) = early_stop {
            outcome.stopped_early = Some(reason);
            break;
        }
        if interrupted {
            outcome.interrupted = true;
            break;
        }
    }
    Ok(outcome)
}

/// The dropout seed of optimizer step `step`; its micro-batches continue one stream.
fn dropout_seed(seed: u64, step: usize) -> u64 {
    masklm_data::splitmix64(seed ^ ((step as u64) << 16))
}

/// A held-out set: its name and its splits (several for the validation splits of several
/// sources), evaluated as one.
type EvalSet = (String, Vec<SplitReader>);

/// An open run: everything the loop needs between steps.
struct Run<'a> {
    config: &'a TrainConfig,
    dir: PathBuf,
    device: Device,
    ad_device: Device,
    /// The tokenizer files every checkpoint is written with.
    tokenizer: TokenizerFiles,
    vocab: MaskVocab,
    /// One training split per source (`data.inputs` is the one source "train").
    train_splits: Vec<SplitReader>,
    source_names: Vec<String>,
    /// The held-out sets: "validation" (when the data has one), then `[eval] sets`.
    eval_sets: Vec<EvalSet>,
    /// The eval set that picks `best` and drives early stopping.
    tracked: String,
    probes: Option<(Vec<Probe>, MlmTokenizer)>,
    sampler: StepSampler,
    model_config: ModelConfig,
    /// `None` only while a step has taken it.
    model: Option<MaskedLm>,
    optimizer: ModuleOptimizer,
    state: TrainState,
    total_steps: usize,
    eval_settings: EvalSettings,
    logs: Logs,
    /// Tokens and time since the last metrics line.
    window: (usize, Instant),
    /// Steps skipped in a row (non-finite, or nothing masked).
    skipped_in_row: usize,
    /// What to save, mark best and delete.
    policy: CheckpointPolicy,
    _lock: FolderLock,
}

impl Run<'_> {
    fn model(&self) -> &MaskedLm {
        // Taken only inside `step`, which always puts it back.
        self.model
            .as_ref()
            .expect("the model is in place between steps")
    }

    /// One optimizer step: its batches, learning rate and dropout seed, then [`train_step`].
    /// A skipped step leaves the weights as they were (see [`Run::stop_if_stuck`]).
    fn step(&mut self) -> (StepStats, f64) {
        let config = self.config;
        let step = self.state.step;
        let batches = self.sampler.step(
            step,
            &self.train_splits.iter().collect::<Vec<_>>(),
            &self.vocab,
            &config.masking,
            &self.ad_device,
        );
        let lr = config
            .schedule
            .lr(config.optimizer.lr, step, self.total_steps);
        let precision = config.training.precision;
        let mut scaler = self.state.loss_scaler.unwrap_or_default();
        let model = self
            .model
            .take()
            .expect("the model is in place between steps");
        model.seed_dropout(dropout_seed(config.seed, step), &self.ad_device);
        let (model, stats) = train_step(
            model,
            &mut self.optimizer,
            &batches.batches,
            lr,
            config.optimizer.max_grad_norm,
            precision,
            &mut scaler,
        );
        self.model = Some(model);
        if precision == Precision::F16 {
            self.state.loss_scaler = Some(scaler);
        }
        self.state.step += 1;
        self.state.samples_seen += batches.samples as u64;
        self.state.tokens_seen += batches.tokens as u64;
        self.window.0 += batches.tokens;
        if self.train_splits.len() > 1 {
            for (total, fed) in self
                .state
                .source_tokens
                .iter_mut()
                .zip(&batches.source_tokens)
            {
                *total += fed;
            }
        }
        if stats.skipped {
            self.skipped_in_row += 1;
        } else {
            // The weights before this step trained on finitely: so does a checkpoint of them.
            self.skipped_in_row = 0;
        }
        self.policy.stepped(!stats.skipped);
        (stats, lr)
    }

    /// Ends the run after `training.max_skipped_steps` skipped steps in a row, naming the
    /// newest checkpoint known to go on to a finite step. (An f16 overflow now and then is
    /// normal: the loss scaler halves and the next step retries.)
    fn stop_if_stuck(&self, stats: &StepStats) -> Result<(), TrainError> {
        if self.skipped_in_row >= self.config.training.max_skipped_steps.max(1) {
            return Err(TrainError::NonFinite {
                step: self.state.step,
                skipped: self.skipped_in_row,
                loss: stats.loss,
                grad_norm: stats.grad_norm,
                nothing_masked: stats.masked == 0,
                last_checkpoint: self
                    .policy
                    .known_good()
                    .map(|name| checkpoints_dir(&self.dir).join(name)),
                run_dir: self.dir.clone(),
            });
        }
        Ok(())
    }

    /// Reports the step to the observer and, every `log_steps`, to metrics.jsonl/TensorBoard.
    fn log_step(
        &mut self,
        stats: &StepStats,
        lr: f64,
        observer: &dyn Observer,
    ) -> Result<(), TrainError> {
        let step = self.state.step;
        let (tokens, since) = self.window;
        let log = StepLog {
            step,
            total_steps: self.total_steps,
            loss: stats.loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens_per_second: tokens as f64 / since.elapsed().as_secs_f64().max(1e-9),
            skipped: stats.skipped,
            masked: stats.masked,
        };
        observer.on_step(&log);
        let log_steps = self.config.logging.log_steps.max(1);
        if !(step.is_multiple_of(log_steps) || step == self.total_steps || stats.skipped) {
            return Ok(());
        }
        let mut record = json!({"step": step, "loss": stats.loss, "lr": lr,
            "grad_norm": stats.grad_norm, "tokens_per_second": log.tokens_per_second,
            "tokens_seen": self.state.tokens_seen, "skipped": stats.skipped});
        if let Some(o) = record.as_object_mut() {
            if let Some(scaler) = self.state.loss_scaler {
                o.insert("loss_scale".to_string(), json!(scaler.scale));
            }
            // Mixed sources: the tokens each has fed so far.
            for (name, tokens) in self.source_names.iter().zip(&self.state.source_tokens) {
                o.insert(format!("tokens/{name}"), json!(tokens));
            }
        }
        self.logs.write(record)?;
        self.window = (0, Instant::now());
        Ok(())
    }

    fn eval_due(&self, last: bool) -> bool {
        let every = self.config.eval.eval_steps;
        last || (every > 0 && self.state.step.is_multiple_of(every))
    }

    /// Evaluates every eval set and the probes, and logs them as one metrics record. A set
    /// whose loss is not a number (nothing to score, or diverged weights) is an error, after
    /// the record is written.
    fn evaluate(&mut self, observer: &dyn Observer) -> Result<Option<EvalReport>, TrainError> {
        if self.eval_sets.is_empty() && self.probes.is_none() {
            return Ok(None);
        }
        let model = self.model().valid();
        let step = self.state.step;
        let mut record = serde_json::Map::new();
        record.insert("step".to_string(), json!(step));
        let mut sets = Vec::with_capacity(self.eval_sets.len());
        for (name, split) in &self.eval_sets {
            let splits: Vec<&SplitReader> = split.iter().collect();
            let result = evaluate_splits(
                &model,
                &splits,
                &self.vocab,
                &self.eval_settings,
                &self.device,
            );
            observer.on_eval(step, name, &result);
            // The validation split keeps transformers' Trainer names (eval_loss, ...).
            let key = if name == VALIDATION {
                "eval_".to_string()
            } else {
                format!("eval/{name}/")
            };
            for (metric, value) in [
                ("loss", result.loss),
                ("perplexity", result.perplexity),
                ("accuracy", result.accuracy),
            ] {
                record.insert(format!("{key}{metric}"), json!(value));
            }
            record.insert(format!("{key}tokens"), json!(result.tokens));
            sets.push((name.clone(), result));
        }
        let probes = match &self.probes {
            Some((probes, tokenizer)) => {
                let report = run_probes(&model, probes, tokenizer, &self.device)?;
                observer.on_probes(step, &report);
                for (metric, value) in [
                    ("mrr", report.mrr),
                    ("top1", report.top1),
                    ("top5", report.top5),
                ] {
                    record.insert(format!("probes/{metric}"), json!(value));
                }
                record.insert("probes".to_string(), json!(report.probes));
                Some(report)
            }
            None => None,
        };
        self.logs.write(serde_json::Value::Object(record))?;
        if let Some((set, result)) = sets
            .iter()
            .find(|(_, r)| r.tokens == 0 || !r.loss.is_finite())
        {
            return Err(TrainError::NonFiniteEval {
                step,
                set: set.clone(),
                tokens: result.tokens,
                loss: result.loss,
            });
        }
        self.window.1 = Instant::now();
        Ok(Some(EvalReport {
            step,
            sets,
            tracked: self.tracked.clone(),
            probes,
        }))
    }

    /// Whether the tracked set's perplexity is the best so far (a NaN never is, and any
    /// finite one beats a NaN left by an older masklm); counts early stopping's patience as
    /// transformers' `EarlyStoppingCallback` does: an improvement of at most `min_delta` (in
    /// loss) still moves `best` but does not reset the count.
    fn track_best(&mut self, report: &EvalReport) -> bool {
        let Some(result) = report.get(&self.tracked) else {
            return false;
        };
        let p = result.perplexity;
        let better = improves(self.state.best_perplexity, p);
        let enough = better
            && self
                .state
                .best_perplexity
                .is_none_or(|b| !b.is_finite() || b.ln() - p.ln() > self.config.eval.min_delta);
        if enough {
            self.state.evals_without_improvement = 0;
        } else {
            self.state.evals_without_improvement += 1;
        }
        if better {
            self.state.best_perplexity = Some(p);
            self.state.best_step = Some(self.state.step);
        }
        better
    }

    /// Why the run should stop now, when `[eval] patience` evaluations in a row brought no
    /// improvement.
    fn patience_exhausted(&self) -> Option<String> {
        let patience = self.config.eval.patience;
        (patience > 0 && self.state.evals_without_improvement >= patience).then(|| {
            format!(
                "early stopping at step {}: {} evaluations without an improvement of eval set \
                 {:?} by more than {} in loss (eval.patience = {patience}); best perplexity {} \
                 at step {}",
                self.state.step,
                self.state.evals_without_improvement,
                self.tracked,
                self.config.eval.min_delta,
                self.state
                    .best_perplexity
                    .map_or("none".to_string(), |p| format!("{p:.3}")),
                self.state
                    .best_step
                    .map_or("none".to_string(), |s| s.to_string()),
            )
        })
    }

    /// Carries out the policy's decisions after a step; returns the checkpoint saved, if any.
    fn checkpoint(
        &mut self,
        end: &StepEnd,
        observer: &dyn Observer,
    ) -> Result<Option<PathBuf>, TrainError> {
        let mut saved = None;
        for action in self.policy.after_step(end) {
            match action {
                CheckpointAction::Save => saved = Some(self.save(observer)?),
                CheckpointAction::MarkBest => {
                    if let Some(path) = &saved {
                        mark_best(&self.dir, path)?;
                    }
                }
            }
        }
        if saved.is_some() {
            rotate(&self.dir, &self.policy)?;
            self.window.1 = Instant::now();
        }
        Ok(saved)
    }

    /// Writes a checkpoint of the current weights, optimizer, state and tokenizer.
    fn save(&mut self, observer: &dyn Observer) -> Result<PathBuf, TrainError> {
        let path = save_checkpoint(
            &self.dir,
            self.model(),
            &self.optimizer,
            &self.model_config,
            &self.tokenizer,
            &self.state,
        )?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.policy.saved(&name, self.skipped_in_row == 0);
        observer.on_checkpoint(&path);
        Ok(path)
    }
}

/// Whether perplexity `p` beats `best`: a NaN never does (it would otherwise be kept as the
/// best for ever, since nothing compares below it), and any finite value beats a NaN best.
fn improves(best: Option<f64>, p: f64) -> bool {
    p.is_finite() && best.is_none_or(|b| !b.is_finite() || p < b)
}

#[cfg(test)]
mod tests {
    use super::improves;

    #[test]
    fn a_nan_perplexity_is_never_best_and_never_blocks_a_better_one() {
        assert!(improves(None, 300.0));
        assert!(!improves(None, f64::NAN));
        assert!(!improves(Some(300.0), f64::NAN));
        assert!(improves(Some(f64::NAN), 1e6));
        assert!(improves(Some(300.0), 299.0));
        assert!(!improves(Some(300.0), 300.0));
    }
}
