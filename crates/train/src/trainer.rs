//! The step-based training loop.
//!
//! Everything random is a pure function of the seed and the position in the run: the order of
//! epoch `e` is [`epoch_order`](masklm_data::epoch_order)`(n, seed, e)`, the masks of a sample
//! are keyed by (seed, epoch, sample index), and dropout is reseeded from (seed, step,
//! micro-batch). Step `k` therefore sees the same batches, masks and dropout in every run, and
//! `--resume` continues exactly from a checkpoint without replaying any data.
//!
//! [`train`] reads as the loop it is: [`Run::open`] (folders, lock, tokenizer, cache,
//! model/optimizer/state, logs), then per step [`Run::step`], [`Run::log_step`],
//! [`Run::evaluate`] when due, [`Run::save`] when due.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::Device;
use masklm_data::{
    FolderLock, MaskVocab, MlmTokenizer, NoProgress, PrepareOptions, SplitReader, StepSampler,
    Validation, load_tokenizer, lock_folder, prepare, read_manifest,
};
use masklm_model::{RobertaConfig, RobertaForMaskedLM};
use serde_json::json;
use tensorboard_rs::summary_writer::SummaryWriter;

use crate::checkpoint::{
    TrainState, has_checkpoints, is_checkpoint, load_model, load_optimizer_and_state, mark_best,
    resolve_checkpoint, resume_checkpoint, rotate, save_checkpoint, sha256_file,
};
use crate::config::VALIDATION;
use crate::eval::{EvalResult, EvalSettings, evaluate_splits};
use crate::probes::{Probe, ProbeReport, load_probes, run_probes};
use crate::{Precision, StepStats, TrainConfig, TrainError, train_step};

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
        let stopping = stop.load(Ordering::SeqCst);
        let mut improved = false;
        let mut early_stop = None;
        if run.eval_due(last)
            && let Some(report) = run.evaluate(observer)?
        {
            improved = run.track_best(&report);
            early_stop = run.patience_exhausted();
            outcome.record_eval(report);
        }
        if last || stopping || early_stop.is_some() || run.save_due() {
            outcome.checkpoint = run.save(improved, observer)?;
        }
        outcome.last_step = run.state.step;
        if let Some(reason) = early_stop.filter(|_| !last) {
            outcome.stopped_early = Some(reason);
            break;
        }
        if stopping && !last {
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

/// One training corpus: `data.inputs` (named "train"), or a `[data] sources` entry.
struct SourceCache {
    name: String,
    weight: f64,
    dir: PathBuf,
    reused: bool,
}

/// Resolves the token caches: `data.inputs` prepared into `data.cache` (or RUN_DIR/cache), or
/// an already prepared `data.cache`, or each `[data] sources` entry prepared into
/// CACHE/NAME. An up-to-date cache is reused; each is checked to be made with this tokenizer.
/// A resumed run never rebuilds an existing cache (its inputs may have changed since the run
/// began: the recorded cache hash is checked instead).
fn resolve_caches(
    config: &TrainConfig,
    tokenizer: &MlmTokenizer,
    run_dir: &Path,
    resuming: bool,
) -> Result<Vec<SourceCache>, TrainError> {
    let data = &config.data;
    let root = match (
        &data.cache,
        data.inputs.is_empty() && data.sources.is_empty(),
    ) {
        (Some(cache), _) => cache.clone(),
        (None, false) => run_dir.join("cache"),
        (None, true) => {
            return Err(TrainError::Config {
                key: "data.cache".to_string(),
                reason: "give a prepared cache, data.inputs or data.sources".to_string(),
            });
        }
    };
    let validation = if !data.validation_inputs.is_empty() {
        Validation::Inputs(data.validation_inputs.clone())
    } else if data.validation_split > 0.0 {
        Validation::Split(data.validation_split)
    } else {
        Validation::None
    };
    let options = PrepareOptions {
        max_seq_length: data.max_seq_length,
        packing: data.packing,
        validation,
        corpus: data.corpus_options(),
    };
    let corpora: Vec<(String, f64, Vec<String>, PathBuf)> = if data.sources.is_empty() {
        vec![("train".to_string(), 1.0, data.inputs.clone(), root)]
    } else {
        data.sources
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    s.weight,
                    s.inputs.to_vec(),
                    root.join(&s.name),
                )
            })
            .collect()
    };
    let mut caches = Vec::with_capacity(corpora.len());
    for (name, weight, inputs, dir) in corpora {
        let existing = dir.join("manifest.json").is_file();
        let reused = if !inputs.is_empty() && (!resuming || !existing) {
            prepare(tokenizer, &inputs, &options, &dir, &NoProgress)?.reused
        } else {
            check_cache_tokenizer(&dir, tokenizer)?;
            true
        };
        caches.push(SourceCache {
            name,
            weight,
            dir,
            reused,
        });
    }
    Ok(caches)
}

/// Checks that the cache at `cache` was prepared with `tokenizer`.
fn check_cache_tokenizer(cache: &Path, tokenizer: &MlmTokenizer) -> Result<(), TrainError> {
    let manifest = read_manifest(cache)?;
    if manifest.tokenizer_hash == tokenizer.hash && manifest.vocab_size != tokenizer.vocab_size() {
        return Err(TrainError::Config {
            key: "data.cache".to_string(),
            reason: format!(
                "{}/manifest.json says vocab_size {} but its tokenizer has ids up to {}; the \
                 manifest was edited or made by an older masklm: prepare the cache again",
                cache.display(),
                manifest.vocab_size,
                tokenizer.vocab_size().saturating_sub(1)
            ),
        });
    }
    if manifest.tokenizer_hash != tokenizer.hash {
        return Err(TrainError::Config {
            key: "data.tokenizer".to_string(),
            reason: format!(
                "{} is not the tokenizer that prepared {}; prepare the cache again with it",
                tokenizer.dir.display(),
                cache.display()
            ),
        });
    }
    Ok(())
}

/// The tokenizer folder of a new run: `data.tokenizer`, else the `init_from` folder when it
/// holds a tokenizer. Either may name a masklm run folder or its `best`/`latest` pointer, as
/// everywhere a checkpoint is accepted.
fn tokenizer_dir(config: &TrainConfig) -> Result<PathBuf, TrainError> {
    if let Some(dir) = &config.data.tokenizer {
        return Ok(resolve_checkpoint(dir));
    }
    match config.model.init_from.as_deref().map(resolve_checkpoint) {
        Some(dir) if dir.join("tokenizer.json").is_file() => Ok(dir),
        _ => Err(TrainError::Config {
            key: "data.tokenizer".to_string(),
            reason: "no tokenizer: set data.tokenizer to the folder the cache was prepared with \
                     (or init_from a folder holding tokenizer.json)"
                .to_string(),
        }),
    }
}

/// Builds or loads the model the run starts from.
fn initial_model(
    config: &TrainConfig,
    tokenizer: &MlmTokenizer,
    device: &Device,
) -> Result<(RobertaConfig, RobertaForMaskedLM), TrainError> {
    let dropout = |c: &mut RobertaConfig| {
        for (key, slot) in [
            ("hidden_dropout_prob", &mut c.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                &mut c.attention_probs_dropout_prob,
            ),
        ] {
            if let Some(v) = config.model.config.get(key).and_then(|v| v.as_float()) {
                *slot = v;
            }
        }
    };
    let (model_config, model) = match config.model.init_from.as_deref().map(resolve_checkpoint) {
        Some(dir) if is_checkpoint(&dir) => load_model(&dir, device, dropout)?,
        Some(dir) => {
            let dir = dir.as_path();
            let mut model_config = masklm_hub::read_config(dir)?;
            masklm_hub::check_weights(&model_config, dir)?;
            dropout(&mut model_config);
            let mut model =
                RobertaForMaskedLM::new(&model_config, device).map_err(|e| TrainError::Config {
                    key: "model".to_string(),
                    reason: e.to_string(),
                })?;
            masklm_hub::load_weights(&mut model, dir)?;
            (model_config, model)
        }
        None => {
            let model_config = config.model_config(tokenizer.vocab_size())?;
            // Initialise on the CPU backend, then move: each backend has its own random
            // generator, and this keeps the initial weights the same whatever the device.
            let host = Device::flex();
            host.seed(config.seed);
            let model = RobertaForMaskedLM::new(&model_config, &host)
                .map_err(|e| TrainError::Config {
                    key: "model".to_string(),
                    reason: e.to_string(),
                })?
                .fork(device)
                // `train` turns on gradient tracking on the autodiff device.
                .train();
            (model_config, model)
        }
    };
    if tokenizer.vocab_size() > model_config.vocab_size {
        return Err(TrainError::Config {
            key: "data.tokenizer".to_string(),
            reason: format!(
                "the tokenizer has {} tokens but the model's vocab_size is {}",
                tokenizer.vocab_size(),
                model_config.vocab_size
            ),
        });
    }
    Ok((model_config, model))
}

/// `metrics.jsonl` and TensorBoard.
struct Logs {
    metrics: std::fs::File,
    metrics_path: PathBuf,
    tensorboard: Option<SummaryWriter>,
}

impl Logs {
    /// Opens the run's logs. A new run starts them afresh (a crashed run that never saved a
    /// checkpoint may have left some); a resumed run drops the records after `resumed_at`,
    /// which the resumed steps write again.
    fn open(
        run_dir: &Path,
        tensorboard: bool,
        resumed_at: Option<usize>,
    ) -> Result<Self, TrainError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| TrainError::Io { path, source }
        };
        let metrics_path = run_dir.join("metrics.jsonl");
        let tensorboard_dir = run_dir.join("tensorboard");
        match resumed_at {
            None => {
                if tensorboard_dir.is_dir() {
                    std::fs::remove_dir_all(&tensorboard_dir).map_err(io(&tensorboard_dir))?;
                }
                std::fs::File::create(&metrics_path).map_err(io(&metrics_path))?;
            }
            Some(step) if metrics_path.is_file() => {
                let text = std::fs::read_to_string(&metrics_path).map_err(io(&metrics_path))?;
                let kept: String = text
                    .lines()
                    .filter(|line| {
                        serde_json::from_str::<serde_json::Value>(line)
                            .ok()
                            .and_then(|r| r.get("step").and_then(|s| s.as_u64()))
                            .is_some_and(|s| s as usize <= step)
                    })
                    .map(|line| format!("{line}\n"))
                    .collect();
                crate::checkpoint::write_atomic(&metrics_path, &kept)?;
            }
            Some(_) => {}
        }
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(io(&metrics_path))?;
        let tensorboard = if tensorboard {
            std::fs::create_dir_all(&tensorboard_dir).map_err(io(&tensorboard_dir))?;
            Some(SummaryWriter::new(&tensorboard_dir))
        } else {
            None
        };
        Ok(Self {
            metrics,
            metrics_path,
            tensorboard,
        })
    }

    fn write(
        &mut self,
        record: serde_json::Value,
        scalars: &[(impl AsRef<str>, f64)],
        step: usize,
    ) -> Result<(), TrainError> {
        writeln!(self.metrics, "{record}").map_err(|source| TrainError::Io {
            path: self.metrics_path.clone(),
            source,
        })?;
        if let Some(tb) = self.tensorboard.as_mut() {
            for (tag, value) in scalars {
                tb.add_scalar(tag.as_ref(), *value as f32, step);
            }
            tb.flush();
        }
        Ok(())
    }
}

/// An open run: everything the loop needs between steps.
struct Run<'a> {
    config: &'a TrainConfig,
    dir: PathBuf,
    device: Device,
    ad_device: Device,
    tokenizer_dir: PathBuf,
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
    model_config: RobertaConfig,
    /// `None` only while a step has taken it.
    model: Option<RobertaForMaskedLM>,
    optimizer: ModuleOptimizer,
    state: TrainState,
    total_steps: usize,
    eval_settings: EvalSettings,
    logs: Logs,
    /// Tokens and time since the last metrics line.
    window: (usize, Instant),
    /// Steps skipped in a row (non-finite, or nothing masked).
    skipped_in_row: usize,
    /// The newest checkpoint whose weights went on to a finite step, and the newest one not
    /// yet known to (see [`Run::step`]).
    known_good: Option<PathBuf>,
    unproven: Option<PathBuf>,
    _lock: FolderLock,
}

impl<'a> Run<'a> {
    fn open(
        config: &'a TrainConfig,
        run_dir: &Path,
        start: &Start,
        device: &Device,
        observer: &dyn Observer,
    ) -> Result<Self, TrainError> {
        if run_dir.is_file() {
            return Err(TrainError::Config {
                key: "--out".to_string(),
                reason: format!("{} is a file; give a folder for the run", run_dir.display()),
            });
        }
        let lock = lock_folder(run_dir, "run")?;
        let resume_from = match start {
            Start::New if has_checkpoints(run_dir) => {
                return Err(TrainError::Resume(format!(
                    "{} already holds a run; continue it with --resume {0}, or choose another --out",
                    run_dir.display()
                )));
            }
            Start::New => None,
            Start::Resume { from } => {
                let (checkpoint, passed) = resume_checkpoint(run_dir, from.as_deref())?;
                for note in passed {
                    observer.on_notice(&note);
                }
                check_resume_config(run_dir, config)?;
                Some(checkpoint)
            }
        };
        crate::checkpoint::write_atomic(&run_dir.join("config.toml"), &config.to_toml()?)?;

        // A resumed run trains with the tokenizer saved in its checkpoint.
        let tokenizer_dir = match &resume_from {
            Some(checkpoint) => checkpoint.clone(),
            None => tokenizer_dir(config)?,
        };
        let tokenizer = load_tokenizer(&tokenizer_dir)?;
        let vocab = tokenizer.mask_vocab()?;
        let caches = resolve_caches(config, &tokenizer, run_dir, resume_from.is_some())?;
        let mut manifests = Vec::with_capacity(caches.len());
        let mut train_splits = Vec::with_capacity(caches.len());
        let mut validations = Vec::with_capacity(caches.len());
        let mut hashes = Vec::with_capacity(caches.len());
        for source in &caches {
            let manifest = read_manifest(&source.dir)?;
            hashes.push(sha256_file(&source.dir.join("manifest.json"))?);
            let train = SplitReader::open(&source.dir, &manifest, "train")?;
            if train.is_empty() {
                return Err(TrainError::Config {
                    key: "data".to_string(),
                    reason: format!("{} has no training examples", source.dir.display()),
                });
            }
            train_splits.push(train);
            validations.push(SplitReader::open(&source.dir, &manifest, "validation")?);
            manifests.push(manifest);
        }
        // One cache: its manifest's hash (as before sources existed); several: a hash of
        // their names and hashes.
        let cache_hash = match hashes.as_slice() {
            [one] => one.clone(),
            _ => {
                use sha2::Digest;
                let mut hasher = sha2::Sha256::new();
                for (source, hash) in caches.iter().zip(&hashes) {
                    hasher.update(format!("{} {hash}\n", source.name));
                }
                format!("{:x}", hasher.finalize())
            }
        };
        let (eval_sets, tracked) =
            open_eval_sets(config, &tokenizer, &manifests[0], validations, run_dir)?;
        let cache = if caches.len() == 1 {
            caches[0].dir.clone()
        } else {
            config
                .data
                .cache
                .clone()
                .unwrap_or_else(|| run_dir.join("cache"))
        };
        let cache_reused = caches.iter().all(|c| c.reused);

        let precision = config.training.precision;
        precision
            .check(device)
            .map_err(|reason| TrainError::Config {
                key: "training.precision".to_string(),
                reason: format!(
                    "this backend cannot train in {} ({reason}); use \"f32\", or \
                     bf16/f16 on a backend with half-precision support (tch, or wgpu on a GPU \
                     with shader-f16)",
                    precision.name()
                ),
            })?;
        let ad_device = device.clone().autodiff();
        let (model_config, model, optimizer, state) = match &resume_from {
            Some(checkpoint) => {
                let (model_config, model) = load_model(checkpoint, &ad_device, |_| {})?;
                let optimizer = config.optimizer.build(&model);
                let (optimizer, state) = load_optimizer_and_state(checkpoint, optimizer)?;
                check_resume_state(&state, config, &tokenizer, &cache, &cache_hash)?;
                (model_config, model, optimizer, state)
            }
            None => {
                let (model_config, model) = initial_model(config, &tokenizer, &ad_device)?;
                let optimizer: ModuleOptimizer = config.optimizer.build(&model);
                let state = TrainState {
                    step: 0,
                    samples_seen: 0,
                    best_perplexity: None,
                    best_step: None,
                    seed: config.seed,
                    total_steps: 0,
                    loss_scaler: None,
                    tokenizer_hash: None,
                    cache_hash: None,
                    best_set: None,
                    evals_without_improvement: 0,
                    source_tokens: Vec::new(),
                };
                (model_config, model, optimizer, state)
            }
        };
        let mut state = state;
        state.tokenizer_hash = Some(tokenizer.hash.clone());
        state.cache_hash = Some(cache_hash);
        if state.best_set.as_deref().unwrap_or(VALIDATION) != tracked {
            // `best` now follows another set: its old best perplexity means nothing here.
            if state.best_perplexity.is_some() {
                observer.on_notice(&format!(
                    "`best` now follows eval set {tracked:?} (was {:?}); its record starts afresh",
                    state.best_set.as_deref().unwrap_or(VALIDATION)
                ));
            }
            state.best_perplexity = None;
            state.best_step = None;
            state.evals_without_improvement = 0;
        }
        state.best_set = Some(tracked.clone());
        let patience = config.eval.patience;
        if patience > 0 && state.evals_without_improvement >= patience {
            return Err(TrainError::Resume(format!(
                "{} stopped early at step {}: {} evaluations without improvement on {tracked:?} \
                 (eval.patience = {patience}); to train on, resume with --set eval.patience=N \
                 (N > {}) or 0",
                run_dir.display(),
                state.step,
                state.evals_without_improvement,
                state.evals_without_improvement
            )));
        }
        for (manifest, source) in manifests.iter().zip(&caches) {
            if manifest.vocab_size > model_config.vocab_size {
                return Err(TrainError::Config {
                    key: "data.cache".to_string(),
                    reason: format!(
                        "{} holds ids up to {} but the model's vocab_size is {}",
                        source.dir.display(),
                        manifest.vocab_size - 1,
                        model_config.vocab_size
                    ),
                });
            }
            if manifest.options.max_seq_length > model_config.max_sequence_length() {
                return Err(TrainError::Config {
                    key: "data.max_seq_length".to_string(),
                    reason: format!(
                        "{} tokens per example, but the model's position table allows {}",
                        manifest.options.max_seq_length,
                        model_config.max_sequence_length()
                    ),
                });
            }
        }
        let train_examples: usize = train_splits.iter().map(SplitReader::len).sum();
        if caches.len() > 1 && state.source_tokens.len() != caches.len() {
            state.source_tokens = vec![0; caches.len()];
        }

        let batch_size = config.training.batch_size;
        let accum = config.training.grad_accum_steps;
        state.total_steps = match (config.training.max_steps, config.training.epochs) {
            (Some(steps), _) => steps,
            (None, Some(epochs)) => {
                ((epochs * train_examples as f64) / (batch_size * accum) as f64).ceil() as usize
            }
            (None, None) => 1,
        }
        .max(1);
        let total_steps = state.total_steps;
        if state.step >= total_steps {
            return Err(TrainError::Resume(format!(
                "{} already reached step {} of {total_steps}; to train longer, resume with \
                 --set training.max_steps=N (N > {})",
                run_dir.display(),
                state.step,
                state.step
            )));
        }
        let eval_settings = EvalSettings {
            masking: config.masking.clone(),
            seed: config.eval.seed,
            batch_size: if config.eval.batch_size > 0 {
                config.eval.batch_size
            } else {
                batch_size
            },
            max_batches: config.eval.max_batches,
        };
        let probes = match &config.eval.probes {
            Some(path) => {
                let (probes, notices) =
                    load_probes(path, &tokenizer, model_config.max_sequence_length())?;
                for notice in notices {
                    observer.on_notice(&notice);
                }
                Some((probes, tokenizer.clone()))
            }
            None => None,
        };
        observer.on_start(&RunInfo {
            start_step: state.step,
            total_steps,
            train_examples,
            validation_examples: eval_sets
                .iter()
                .find(|(name, _)| name == VALIDATION)
                .map_or(0, |(_, splits)| splits.iter().map(SplitReader::len).sum()),
            parameters: model.num_params(),
            cache: cache.clone(),
            cache_reused,
            resumed_from: resume_from.clone(),
        });
        let logs = Logs::open(
            run_dir,
            config.logging.tensorboard,
            resume_from.as_ref().map(|_| state.step),
        )?;
        Ok(Self {
            config,
            dir: run_dir.to_path_buf(),
            device: device.clone(),
            ad_device,
            tokenizer_dir,
            vocab,
            sampler: StepSampler::mixed(
                train_splits.iter().map(SplitReader::len).collect(),
                &caches.iter().map(|c| c.weight).collect::<Vec<_>>(),
                batch_size,
                accum,
                config.seed,
            )
            .with_length_grouping(config.training.group_by_length),
            train_splits,
            source_names: caches.iter().map(|c| c.name.clone()).collect(),
            eval_sets,
            tracked,
            probes,
            model_config,
            model: Some(model),
            optimizer,
            state,
            total_steps,
            eval_settings,
            logs,
            window: (0, Instant::now()),
            skipped_in_row: 0,
            known_good: None,
            unproven: resume_from,
            _lock: lock,
        })
    }

    fn model(&self) -> &RobertaForMaskedLM {
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
        masklm_model::seed_dropout(dropout_seed(config.seed, step), &self.ad_device);
        let precision = config.training.precision;
        let mut scaler = self.state.loss_scaler.unwrap_or_default();
        let model = self
            .model
            .take()
            .expect("the model is in place between steps");
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
        self.state.samples_seen +=
            (config.training.batch_size * config.training.grad_accum_steps) as u64;
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
            if let Some(proven) = self.unproven.take() {
                self.known_good = Some(proven);
            }
        }
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
                last_checkpoint: self.known_good.clone(),
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
        };
        observer.on_step(&log);
        let log_steps = self.config.logging.log_steps.max(1);
        if !(step.is_multiple_of(log_steps) || step == self.total_steps || stats.skipped) {
            return Ok(());
        }
        let mut record = json!({"step": step, "loss": stats.loss, "lr": lr,
            "grad_norm": stats.grad_norm, "tokens_per_second": log.tokens_per_second,
            "skipped": stats.skipped});
        let mut scalars = vec![
            ("train/loss".to_string(), stats.loss),
            ("train/lr".to_string(), lr),
            ("train/grad_norm".to_string(), stats.grad_norm),
            ("train/tokens_per_second".to_string(), log.tokens_per_second),
        ];
        if let Some(o) = record.as_object_mut() {
            if let Some(scaler) = self.state.loss_scaler {
                o.insert("loss_scale".to_string(), json!(scaler.scale));
            }
            // Mixed sources: the tokens each has fed so far.
            for (name, tokens) in self.source_names.iter().zip(&self.state.source_tokens) {
                o.insert(format!("tokens/{name}"), json!(tokens));
                scalars.push((format!("data/tokens/{name}"), *tokens as f64));
            }
        }
        self.logs.write(record, &scalars, step)?;
        self.window = (0, Instant::now());
        Ok(())
    }

    fn eval_due(&self, last: bool) -> bool {
        let every = self.config.eval.eval_steps;
        last || (every > 0 && self.state.step.is_multiple_of(every))
    }

    fn save_due(&self) -> bool {
        let every = self.config.checkpoint.save_steps;
        every > 0 && self.state.step.is_multiple_of(every)
    }

    /// Evaluates every eval set and the probes, and logs them as one metrics record.
    fn evaluate(&mut self, observer: &dyn Observer) -> Result<Option<EvalReport>, TrainError> {
        if self.eval_sets.is_empty() && self.probes.is_none() {
            return Ok(None);
        }
        let model = self.model().valid();
        let step = self.state.step;
        let mut record = serde_json::Map::new();
        record.insert("step".to_string(), json!(step));
        let mut scalars: Vec<(String, f64)> = Vec::new();
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
            let (key, tag) = if name == VALIDATION {
                ("eval_".to_string(), "eval/".to_string())
            } else {
                (format!("eval/{name}/"), format!("eval/{name}/"))
            };
            for (metric, value) in [
                ("loss", result.loss),
                ("perplexity", result.perplexity),
                ("accuracy", result.accuracy),
            ] {
                record.insert(format!("{key}{metric}"), json!(value));
                scalars.push((format!("{tag}{metric}"), value));
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
                    scalars.push((format!("probes/{metric}"), value));
                }
                for p in &report.probes {
                    scalars.push((format!("probe/line{}/rank", p.line), p.rank as f64));
                    scalars.push((format!("probe/line{}/probability", p.line), p.probability));
                }
                record.insert("probes".to_string(), json!(report.probes));
                Some(report)
            }
            None => None,
        };
        self.logs
            .write(serde_json::Value::Object(record), &scalars, step)?;
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

    /// Writes a checkpoint (marking it best if `improved`) and rotates old ones.
    fn save(&mut self, improved: bool, observer: &dyn Observer) -> Result<PathBuf, TrainError> {
        let path = save_checkpoint(
            &self.dir,
            self.model(),
            &self.optimizer,
            &self.model_config,
            &self.tokenizer_dir,
            &self.state,
        )?;
        if improved {
            mark_best(&self.dir, &path)?;
        }
        if self.skipped_in_row == 0 {
            self.unproven = Some(path.clone());
        }
        rotate(
            &self.dir,
            self.config.checkpoint.keep_last,
            self.known_good.as_deref(),
        )?;
        observer.on_checkpoint(&path);
        self.window.1 = Instant::now();
        Ok(path)
    }
}

/// Whether perplexity `p` beats `best`: a NaN never does (it would otherwise be kept as the
/// best for ever, since nothing compares below it), and any finite value beats a NaN best.
fn improves(best: Option<f64>, p: f64) -> bool {
    p.is_finite() && best.is_none_or(|b| !b.is_finite() || p < b)
}

/// A held-out set: its name and its splits (several for the validation splits of several
/// sources), evaluated as one.
type EvalSet = (String, Vec<SplitReader>);

/// The held-out sets of a run: the data's validation split (when it has examples) and each
/// `[eval] sets` entry, prepared into RUN_DIR/eval-cache/NAME (reused while its inputs and the
/// tokenizer are unchanged) with the training cache's sequence length and packing; and the
/// name of the set `best` follows.
fn open_eval_sets(
    config: &TrainConfig,
    tokenizer: &MlmTokenizer,
    manifest: &masklm_data::Manifest,
    validations: Vec<SplitReader>,
    run_dir: &Path,
) -> Result<(Vec<EvalSet>, String), TrainError> {
    let mut sets = Vec::new();
    if validations.iter().any(|v| !v.is_empty()) {
        sets.push((VALIDATION.to_string(), validations));
    }
    for (name, inputs) in &config.eval.sets {
        let dir = run_dir.join("eval-cache").join(name);
        let options = PrepareOptions {
            max_seq_length: manifest.options.max_seq_length,
            packing: manifest.options.packing,
            validation: Validation::None,
            corpus: config.data.corpus_options(),
        };
        let prepared =
            prepare(tokenizer, &inputs.to_vec(), &options, &dir, &NoProgress).map_err(|e| {
                TrainError::Config {
                    key: format!("eval.sets.{name}"),
                    reason: e.to_string(),
                }
            })?;
        let split = SplitReader::open(&dir, &prepared.manifest, "train")?;
        if split.is_empty() {
            return Err(TrainError::Config {
                key: format!("eval.sets.{name}"),
                reason: "its inputs hold no text".to_string(),
            });
        }
        sets.push((name.clone(), vec![split]));
    }
    let tracked = match &config.eval.best {
        Some(name) if name == VALIDATION && sets.first().is_none_or(|(n, _)| n != VALIDATION) => {
            return Err(TrainError::Config {
                key: "eval.best".to_string(),
                reason: "the data has no validation split to follow; set data.validation_split \
                         or data.validation_inputs, or name one of [eval] sets"
                    .to_string(),
            });
        }
        Some(name) => name.clone(),
        None => sets
            .first()
            .map_or(VALIDATION.to_string(), |(name, _)| name.clone()),
    };
    Ok((sets, tracked))
}

/// Refuses a resume whose settings would change what the steps see (see
/// [`TrainConfig::frozen_differences`]), naming each key and both values.
fn check_resume_config(run_dir: &Path, config: &TrainConfig) -> Result<(), TrainError> {
    let saved_path = run_dir.join("config.toml");
    let saved = TrainConfig::load(&saved_path, &[])?;
    let differences = saved.frozen_differences(config);
    if differences.is_empty() {
        return Ok(());
    }
    let list: Vec<String> = differences
        .iter()
        .map(|(key, old, new)| format!("`{key}` was {old}, now {new}"))
        .collect();
    Err(TrainError::Resume(format!(
        "cannot resume {} with other data, model or sampling settings: {}. A resume may change \
         training.max_steps/epochs, [optimizer], [schedule], [eval], [checkpoint] and [logging]; \
         start a new run (with model.init_from) to change the rest",
        run_dir.display(),
        list.join("; ")
    )))
}

/// Checks a checkpoint's recorded seed, tokenizer and cache against what the resume found.
fn check_resume_state(
    state: &TrainState,
    config: &TrainConfig,
    tokenizer: &MlmTokenizer,
    cache: &Path,
    cache_hash: &str,
) -> Result<(), TrainError> {
    if state.seed != config.seed {
        return Err(TrainError::Resume(format!(
            "the checkpoint was trained with seed {} but the config says {}; a resume keeps the seed",
            state.seed, config.seed
        )));
    }
    if let Some(saved) = &state.tokenizer_hash
        && saved != &tokenizer.hash
    {
        return Err(TrainError::Resume(format!(
            "{}/tokenizer.json is not the tokenizer the run started with (sha256 {} vs {})",
            tokenizer.dir.display(),
            &tokenizer.hash[..12.min(tokenizer.hash.len())],
            &saved[..12.min(saved.len())]
        )));
    }
    if let Some(saved) = &state.cache_hash
        && saved != cache_hash
    {
        return Err(TrainError::Resume(format!(
            "the token cache {} changed since the run started (manifest sha256 {} vs {}); \
             restore it, or start a new run on the new data with model.init_from",
            cache.display(),
            &cache_hash[..12.min(cache_hash.len())],
            &saved[..12.min(saved.len())]
        )));
    }
    Ok(())
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
