//! The step-based training loop.
//!
//! Everything random is a pure function of the seed and the position in the run: the order of
//! epoch `e` is [`epoch_order`]`(n, seed, e)`, the masks of a sample are keyed by
//! (seed, epoch, sample index), and dropout is reseeded from (seed, step, micro-batch). Step `k`
//! therefore sees the same batches, masks and dropout in every run, and `--resume` continues
//! exactly from a checkpoint without replaying any data.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::Device;
use masklm_data::{
    MaskVocab, MlmBatch, MlmTokenizer, NoProgress, PrepareOptions, SplitReader, Validation,
    collate, epoch_order, load_tokenizer, mask_tokens, prepare, read_manifest,
};
use masklm_model::{RobertaConfig, RobertaForMaskedLM};
use serde_json::json;
use tensorboard_rs::summary_writer::SummaryWriter;

use crate::checkpoint::{
    TrainState, is_checkpoint, latest_checkpoint, load_model, load_optimizer_and_state, mark_best,
    rotate, save_checkpoint,
};
use crate::eval::{EvalResult, EvalSettings, evaluate};
use crate::{Precision, TrainConfig, TrainError, train_step};

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
}

/// One logged training step.
#[derive(Debug, Clone, Copy)]
pub struct StepLog {
    /// Optimizer steps done (1 after the first step).
    pub step: usize,
    pub total_steps: usize,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens_per_second: f64,
}

/// Receives the run's events; the CLI draws a progress bar from them.
pub trait Observer {
    fn on_start(&self, _info: &RunInfo) {}
    fn on_step(&self, _log: &StepLog) {}
    fn on_eval(&self, _step: usize, _result: &EvalResult) {}
    fn on_checkpoint(&self, _path: &Path) {}
}

/// An observer that ignores everything.
pub struct Silent;
impl Observer for Silent {}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    pub last_step: usize,
    pub checkpoint: PathBuf,
    pub final_eval: Option<EvalResult>,
    /// The first evaluation of this run (for before/after comparisons).
    pub first_eval: Option<EvalResult>,
    /// Stopped early by the stop flag (Ctrl-C).
    pub interrupted: bool,
    /// Training losses of the steps run by this invocation, in order.
    pub losses: Vec<f64>,
}

/// The dropout seed of optimizer step `step`; its micro-batches continue one stream.
fn dropout_seed(seed: u64, step: usize) -> u64 {
    masklm_data::splitmix64(seed ^ ((step as u64) << 16))
}

/// Resolves the token cache: prepares it from `data.inputs` (or reuses an up-to-date one) or
/// opens `data.cache`, and checks it was made with this tokenizer.
fn resolve_cache(
    config: &TrainConfig,
    tokenizer: &MlmTokenizer,
    run_dir: &Path,
) -> Result<(PathBuf, bool), TrainError> {
    let data = &config.data;
    if !data.inputs.is_empty() {
        let cache = data.cache.clone().unwrap_or_else(|| run_dir.join("cache"));
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
        let prepared = prepare(tokenizer, &data.inputs, &options, &cache, &NoProgress)?;
        return Ok((cache, prepared.reused));
    }
    let cache = data.cache.clone().unwrap_or_default();
    let manifest = read_manifest(&cache)?;
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
    Ok((cache, true))
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
    let (model_config, model) = match &config.model.init_from {
        Some(dir) if is_checkpoint(dir) => load_model(dir, device, dropout)?,
        Some(dir) => {
            let mut model_config = masklm_hub::read_config(dir)?;
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

/// The samples of micro-batch `micro` of step `step`.
struct Feeder {
    n: usize,
    batch_size: usize,
    accum: usize,
    seed: u64,
    orders: HashMap<u64, Vec<usize>>,
}

impl Feeder {
    fn micro_batches(
        &mut self,
        step: usize,
        split: &SplitReader,
        vocab: &MaskVocab,
        masking: &masklm_data::MaskingConfig,
        device: &Device,
    ) -> (Vec<MlmBatch>, usize) {
        let per_step = (self.batch_size * self.accum) as u64;
        let mut batches = Vec::with_capacity(self.accum);
        let mut tokens = 0;
        // Orders of epochs before this step's first sample are no longer needed.
        let first_epoch = step as u64 * per_step / self.n as u64;
        self.orders.retain(|&e, _| e >= first_epoch);
        for micro in 0..self.accum {
            let start = step as u64 * per_step + (micro * self.batch_size) as u64;
            let examples: Vec<_> = (start..start + self.batch_size as u64)
                .filter_map(|g| {
                    let epoch = g / self.n as u64;
                    let seed = self.seed;
                    let n = self.n;
                    let order = self
                        .orders
                        .entry(epoch)
                        .or_insert_with(|| epoch_order(n, seed, epoch));
                    let index = order[(g % self.n as u64) as usize];
                    let sample = split.get(index)?;
                    tokens += sample.len();
                    Some(mask_tokens(
                        &sample,
                        vocab,
                        masking,
                        self.seed,
                        epoch,
                        index as u64,
                    ))
                })
                .collect();
            if let Some(batch) = collate(&examples, vocab.pad_id, device) {
                batches.push(batch);
            }
        }
        (batches, tokens)
    }
}

struct Logs {
    metrics: std::fs::File,
    metrics_path: PathBuf,
    tensorboard: Option<SummaryWriter>,
}

impl Logs {
    fn open(run_dir: &Path, tensorboard: bool) -> Result<Self, TrainError> {
        let metrics_path = run_dir.join("metrics.jsonl");
        let metrics = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&metrics_path)
            .map_err(|source| TrainError::Io {
                path: metrics_path.clone(),
                source,
            })?;
        let tensorboard = if tensorboard {
            let dir = run_dir.join("tensorboard");
            std::fs::create_dir_all(&dir).map_err(|source| TrainError::Io {
                path: dir.clone(),
                source,
            })?;
            Some(SummaryWriter::new(&dir))
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
        scalars: &[(&str, f64)],
        step: usize,
    ) -> Result<(), TrainError> {
        writeln!(self.metrics, "{record}").map_err(|source| TrainError::Io {
            path: self.metrics_path.clone(),
            source,
        })?;
        if let Some(tb) = self.tensorboard.as_mut() {
            for (tag, value) in scalars {
                tb.add_scalar(tag, *value as f32, step);
            }
            tb.flush();
        }
        Ok(())
    }
}

/// Trains according to `config` in `run_dir` on `device` (a plain device; the loop adds
/// autodiff). With `resume`, continues from the run's latest checkpoint.
pub fn train(
    config: &TrainConfig,
    run_dir: &Path,
    resume: bool,
    device: &Device,
    observer: &dyn Observer,
    stop: &AtomicBool,
) -> Result<RunOutcome, TrainError> {
    std::fs::create_dir_all(run_dir).map_err(|source| TrainError::Io {
        path: run_dir.to_path_buf(),
        source,
    })?;
    let latest = latest_checkpoint(run_dir);
    if resume && latest.is_none() {
        return Err(TrainError::Resume(format!(
            "{} has no checkpoint to resume from",
            run_dir.display()
        )));
    }
    if !resume && latest.is_some() {
        return Err(TrainError::Resume(format!(
            "{} already holds a run; continue it with --resume {0}, or choose another --out",
            run_dir.display()
        )));
    }
    if !resume {
        crate::checkpoint::write_atomic(&run_dir.join("config.toml"), &config.to_toml())?;
    }

    let tokenizer_dir = config.data.tokenizer.clone().unwrap_or_default();
    let tokenizer = load_tokenizer(&tokenizer_dir)?;
    let vocab = tokenizer.mask_vocab()?;
    let (cache, cache_reused) = resolve_cache(config, &tokenizer, run_dir)?;
    let manifest = read_manifest(&cache)?;
    let train_split = Arc::new(SplitReader::open(&cache, &manifest, "train")?);
    let validation = SplitReader::open(&cache, &manifest, "validation")?;
    if train_split.is_empty() {
        return Err(TrainError::Config {
            key: "data".to_string(),
            reason: format!("{} has no training examples", cache.display()),
        });
    }

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
    let (model_config, mut model, mut optimizer, mut state) = match &latest {
        Some(checkpoint) if resume => {
            let (model_config, model) = load_model(checkpoint, &ad_device, |_| {})?;
            let optimizer = config.optimizer.build(&model);
            let (optimizer, state) = load_optimizer_and_state(checkpoint, optimizer)?;
            (model_config, model, optimizer, state)
        }
        _ => {
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
            };
            (model_config, model, optimizer, state)
        }
    };
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

    let batch_size = config.training.batch_size;
    let accum = config.training.grad_accum_steps;
    let total_steps = match (config.training.max_steps, config.training.epochs) {
        (Some(steps), _) => steps,
        (None, Some(epochs)) => {
            ((epochs * train_split.len() as f64) / (batch_size * accum) as f64).ceil() as usize
        }
        (None, None) => 1,
    }
    .max(1);
    state.total_steps = total_steps;
    let eval_batch = if config.eval.batch_size > 0 {
        config.eval.batch_size
    } else {
        batch_size
    };

    observer.on_start(&RunInfo {
        start_step: state.step,
        total_steps,
        train_examples: train_split.len(),
        validation_examples: validation.len(),
        parameters: model.num_params(),
        cache: cache.clone(),
        cache_reused,
    });
    let mut logs = Logs::open(run_dir, config.logging.tensorboard)?;
    let mut feeder = Feeder {
        n: train_split.len(),
        batch_size,
        accum,
        seed: config.seed,
        orders: HashMap::new(),
    };
    let eval_settings = EvalSettings {
        masking: config.masking.clone(),
        seed: config.eval.seed,
        batch_size: eval_batch,
        max_batches: config.eval.max_batches,
    };
    let evaluate_now = |model: &RobertaForMaskedLM| {
        (!validation.is_empty())
            .then(|| evaluate(&model.valid(), &validation, &vocab, &eval_settings, device))
    };

    let mut outcome = RunOutcome {
        last_step: state.step,
        checkpoint: latest.clone().unwrap_or_default(),
        final_eval: None,
        first_eval: None,
        interrupted: false,
        losses: Vec::new(),
    };
    if config.eval.on_start
        && state.step == 0
        && let Some(result) = evaluate_now(&model)
    {
        observer.on_eval(0, &result);
        logs.write(
            json!({"step": 0, "eval_loss": result.loss, "eval_perplexity": result.perplexity,
                   "eval_accuracy": result.accuracy, "eval_tokens": result.tokens}),
            &[
                ("eval/loss", result.loss),
                ("eval/perplexity", result.perplexity),
                ("eval/accuracy", result.accuracy),
            ],
            0,
        )?;
        outcome.first_eval = Some(result);
    }
    let mut window_tokens = 0usize;
    let mut window_start = Instant::now();
    while state.step < total_steps {
        let step = state.step;
        let (batches, tokens) =
            feeder.micro_batches(step, &train_split, &vocab, &config.masking, &ad_device);
        let lr = config.schedule.lr(config.optimizer.lr, step, total_steps);
        masklm_model::seed_dropout(dropout_seed(config.seed, step));
        let mut scaler = state.loss_scaler.unwrap_or_default();
        let (next, stats) = train_step(
            model,
            &mut optimizer,
            &batches,
            lr,
            config.optimizer.max_grad_norm,
            precision,
            &mut scaler,
        );
        if precision == Precision::F16 {
            state.loss_scaler = Some(scaler);
        }
        model = next;
        state.step += 1;
        state.samples_seen += (batch_size * accum) as u64;
        window_tokens += tokens;
        let Some(stats) = stats else { continue };
        if !stats.loss.is_finite() {
            return Err(TrainError::NonFinite {
                step: state.step,
                loss: stats.loss,
                last_checkpoint: latest_checkpoint(run_dir),
            });
        }
        outcome.losses.push(stats.loss);
        let elapsed = window_start.elapsed().as_secs_f64();
        let log = StepLog {
            step: state.step,
            total_steps,
            loss: stats.loss,
            lr,
            grad_norm: stats.grad_norm,
            tokens_per_second: window_tokens as f64 / elapsed.max(1e-9),
        };
        observer.on_step(&log);
        let log_steps = config.logging.log_steps.max(1);
        if state.step % log_steps == 0 || state.step == total_steps {
            logs.write(
                {
                    let mut record = json!({"step": state.step, "loss": stats.loss, "lr": lr,
                        "grad_norm": stats.grad_norm, "tokens_per_second": log.tokens_per_second});
                    if let (Some(scaler), Some(o)) = (state.loss_scaler, record.as_object_mut()) {
                        // f16: overflowed steps were skipped (their grad_norm is not finite).
                        o.insert("loss_scale".to_string(), json!(scaler.scale));
                        o.insert("skipped".to_string(), json!(stats.skipped));
                    }
                    record
                },
                &[
                    ("train/loss", stats.loss),
                    ("train/lr", lr),
                    ("train/grad_norm", stats.grad_norm),
                    ("train/tokens_per_second", log.tokens_per_second),
                ],
                state.step,
            )?;
            window_tokens = 0;
            window_start = Instant::now();
        }

        let last = state.step == total_steps;
        let stopping = stop.load(Ordering::SeqCst);
        let eval_due =
            last || (config.eval.eval_steps > 0 && state.step % config.eval.eval_steps == 0);
        let mut improved = false;
        if eval_due && let Some(result) = evaluate_now(&model) {
            observer.on_eval(state.step, &result);
            logs.write(
                json!({"step": state.step, "eval_loss": result.loss,
                       "eval_perplexity": result.perplexity, "eval_accuracy": result.accuracy,
                       "eval_tokens": result.tokens}),
                &[
                    ("eval/loss", result.loss),
                    ("eval/perplexity", result.perplexity),
                    ("eval/accuracy", result.accuracy),
                ],
                state.step,
            )?;
            if state
                .best_perplexity
                .is_none_or(|best| result.perplexity < best)
            {
                state.best_perplexity = Some(result.perplexity);
                state.best_step = Some(state.step);
                improved = true;
            }
            outcome.first_eval.get_or_insert(result);
            outcome.final_eval = Some(result);
            window_start = Instant::now();
        }
        let save_due = last
            || stopping
            || (config.checkpoint.save_steps > 0 && state.step % config.checkpoint.save_steps == 0);
        if save_due {
            let path = save_checkpoint(
                run_dir,
                &model,
                &optimizer,
                &model_config,
                &tokenizer_dir,
                &state,
            )?;
            if improved {
                mark_best(run_dir, &path)?;
            }
            rotate(run_dir, config.checkpoint.keep_last)?;
            observer.on_checkpoint(&path);
            outcome.checkpoint = path;
            window_start = Instant::now();
        }
        outcome.last_step = state.step;
        if stopping && !last {
            outcome.interrupted = true;
            break;
        }
    }
    Ok(outcome)
}
