//! masklm's training loop: from a TOML config to checkpoints, metrics and perplexity.
//!
//! - [`config`]: the TOML file (`configs/*.toml`) and `--set` overrides, validated;
//! - [`adamw`]: AdamW as burn computes it, fused into one in-place pass on the CPU backend;
//! - [`optim`]: AdamW or StableAdamW with HF Trainer parameter groups, global-norm clipping,
//!   warmup/decay and warmup-stable-decay;
//! - [`stable_adamw`]: ModernBERT's StableAdamW (torch-optimi's) as a burn optimizer;
//! - [`step`]: one optimizer step with gradient accumulation;
//! - [`precision`]: mixed precision (bf16/f16 matmuls, f32 master weights, f16 loss scaling);
//! - [`checkpoint`]: atomic, checksummed, self-contained checkpoints (read back by
//!   `masklm_infer::checkpoint`);
//! - [`policy`]: what to save, mark best, keep and delete (one unit-tested object);
//! - [`vocab`]: vocabulary extension of a model (new tokens, rows from their pieces);
//! - [`trainer`]: the step-based loop with exact resume, metrics.jsonl and TensorBoard.
//!
//! Evaluation (held-out perplexity, knowledge probes) and loading a trained model or a Hub
//! folder (`init_from`) are `masklm_infer`'s: the trainer runs them, the server and the CLI
//! use them without it.

pub mod adamw;
pub mod checkpoint;
pub mod config;
pub mod optim;
pub mod policy;
pub mod precision;
pub mod stable_adamw;
pub mod step;
pub mod trainer;
pub mod vocab;

use std::path::PathBuf;

pub use config::TrainConfig;
// The evaluation results an [`Observer`] receives.
pub use masklm_infer::{EvalResult, ProbeReport};
pub use optim::{Decay, OptimizerConfig, OptimizerName, ScheduleConfig, WsdShape, no_decay_params};
pub use precision::{LossScaler, Precision};
pub use step::{StepStats, train_step};
pub use trainer::{EvalReport, Observer, RunInfo, RunOutcome, Silent, Start, StepLog, train};
pub use vocab::{ExtendReport, extend_vocabulary};

/// Probes in flight (see [`catch_backend_panic`]).
static PROBING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Installs, once per process, a panic hook that stays quiet while a probe runs and defers to
/// the previous hook otherwise. The quiet window covers every thread, because backends panic
/// on threads of their own too (cubecl's device setup), but nothing swaps the process-wide hook
/// per call, so concurrent probes cannot restore each other's hooks out of order.
fn install_quiet_hook() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if PROBING.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, turning a panic into its message's first line. burn's GPU backends (cubecl,
/// libtorch) report a missing driver or device, or an unsupported dtype, by panicking; the
/// device and precision probes use this to answer with advice instead. The default panic
/// message is silenced meanwhile (the caller reports the error).
pub fn catch_backend_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    use std::sync::atomic::Ordering;
    install_quiet_hook();
    PROBING.fetch_add(1, Ordering::SeqCst);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    PROBING.fetch_sub(1, Ordering::SeqCst);
    result.map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("the backend panicked");
        // libtorch appends a C++ backtrace, inside the Debug-escaped error text.
        message
            .trim_start_matches("called `Result::unwrap()` on an `Err` value: ")
            .lines()
            .next()
            .and_then(|line| line.split("\\n").next())
            .unwrap_or_default()
            .to_string()
    })
}

fn non_finite_message(
    step: usize,
    skipped: usize,
    loss: f64,
    grad_norm: f64,
    nothing_masked: bool,
    last_checkpoint: Option<&std::path::Path>,
    run_dir: &std::path::Path,
) -> String {
    if nothing_masked {
        return format!(
            "stopped at step {step}: {skipped} steps in a row masked no token; raise \
             masking.probability or training.batch_size"
        );
    }
    let advice = match last_checkpoint {
        Some(path) => format!(
            "The last checkpoint known to train on is {}: lower optimizer.lr or raise warmup, \
             then `masklm train --resume {} --from {} --set optimizer.lr=...`.",
            path.display(),
            run_dir.display(),
            path.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        ),
        None => "No checkpoint known to train on was saved; lower optimizer.lr or raise \
                 warmup and start again."
            .to_string(),
    };
    format!(
        "stopped at step {step}: {skipped} steps in a row had a non-finite loss or gradient \
         (loss {loss}, gradient norm {grad_norm}) and were skipped, so no NaN reached the \
         weights. {advice}"
    )
}

fn non_finite_eval_message(step: usize, set: &str, tokens: u64, loss: f64) -> String {
    if tokens == 0 {
        return format!(
            "evaluation at step {step}: eval set {set:?} has no masked token to score (its text \
             is empty, decodes to special tokens only, or is too short for masking.probability \
             to pick any token), so its loss is not a number; check its input files (UTF-8 \
             text, one document per line), give it more text, or remove the set"
        );
    }
    format!(
        "evaluation at step {step}: eval set {set:?} has loss {loss} over {tokens} masked tokens: \
         the weights diverged; no checkpoint was written after it. Resume from an earlier \
         checkpoint (`masklm train --resume RUN --from step-N`) with a lower optimizer.lr"
    )
}

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration value is impossible.
    #[error("invalid `{key}`: {reason}")]
    Config { key: String, reason: String },
    /// The config file is not valid TOML or has a wrong key or type.
    #[error("{}: {message}", path.display())]
    Toml { path: PathBuf, message: String },
    /// A `--set` override is malformed.
    #[error("--set {assignment}: {reason}")]
    Override { assignment: String, reason: String },
    /// A file could not be read or written (disk full, permissions).
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A checkpoint could not be written or read back.
    #[error("checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    /// `--resume` without a checkpoint, or a new run over an old one.
    #[error("{0}")]
    Resume(String),
    /// `training.max_skipped_steps` steps in a row were skipped: their loss or gradients were
    /// not finite (none of them reached the weights), or they masked nothing.
    #[error("{}", non_finite_message(*step, *skipped, *loss, *grad_norm, *nothing_masked, last_checkpoint.as_deref(), run_dir))]
    NonFinite {
        step: usize,
        skipped: usize,
        loss: f64,
        grad_norm: f64,
        nothing_masked: bool,
        /// The newest checkpoint whose weights went on to a finite step.
        last_checkpoint: Option<PathBuf>,
        run_dir: PathBuf,
    },
    /// An evaluation gave a loss that is not a number: nothing was masked in the set (its text
    /// decodes to nothing), or the weights diverged. Never taken for "no improvement".
    #[error("{}", non_finite_eval_message(*step, set, *tokens, *loss))]
    NonFiniteEval {
        step: usize,
        set: String,
        /// Masked tokens the evaluation scored.
        tokens: u64,
        loss: f64,
    },
    /// The data pipeline failed.
    #[error(transparent)]
    Data(#[from] masklm_data::DataError),
    /// A Hugging Face folder could not be loaded.
    #[error(transparent)]
    Hub(#[from] masklm_hub::HubError),
    /// A model could not be loaded, evaluated or probed.
    #[error(transparent)]
    Infer(#[from] masklm_infer::InferError),
}
