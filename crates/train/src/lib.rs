//! masklm's training loop.
//!
//! [`optim`]: AdamW with HF Trainer parameter groups, global-norm clipping and the
//! warmup/decay schedule; [`step`]: one optimizer step with gradient accumulation.

pub mod optim;
pub mod step;

pub use optim::{Decay, OptimizerConfig, ScheduleConfig, clip_grad_norm};
pub use step::{StepStats, train_step};

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A configuration value is impossible.
    #[error("invalid `{key}`: {reason}")]
    Config { key: String, reason: String },
}
