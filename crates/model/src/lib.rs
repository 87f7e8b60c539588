//! The masklm models: masked-language-model encoders of several families, in burn.
//!
//! [`RobertaForMaskedLM`] mirrors transformers' class of the same name: on the same weights it
//! gives the same logits, loss and gradients (checked against fixtures dumped by
//! `scripts/make_reference.py`). The pieces, in the order data flows through them:
//!
//! 1. [`RobertaConfig`]: HF `config.json` names and defaults, validated.
//! 2. [`RobertaEmbeddings`]: word + position ([`position_ids`]) + token-type embeddings.
//! 3. [`RobertaLayer`] x `num_hidden_layers`: post-LayerNorm attention and FFN blocks, with the
//!    additive padding mask from [`attention_bias`].
//! 4. [`RobertaLMHead`]: dense, GELU, LayerNorm, and a decoder that *is* the word-embedding
//!    matrix.
//! 5. [`mlm_loss`]: cross-entropy over masked tokens only, on logits from
//!    [`RobertaForMaskedLM::forward_at`], which projects only the masked positions.
//!
//! [`ModernBertForMaskedLM`] (module [`modernbert`]) is transformers' ModernBERT with the same
//! public shape (`new`, `forward`, `forward_at`, `with_new_rows`, `with_attention`,
//! `word_embeddings`) and the same shared [`mlm_loss`]: rotary positions, alternating full and
//! sliding-window attention, GeGLU feed-forward blocks.
//!
//! Everything outside this crate holds a model through the family seam: [`ModelConfig`] and
//! [`MaskedLm`], enums over the families ([`Family`]) chosen once from `config.json`'s
//! `model_type`. Each model draws its dropout masks from its own [`DropoutStream`].
//!
//! ```no_run
//! use burn::tensor::{Device, Int, Tensor};
//! use masklm_model::{RobertaConfig, RobertaForMaskedLM, mlm_loss};
//!
//! let config = RobertaConfig { vocab_size: 1000, hidden_size: 64, num_hidden_layers: 2,
//!     num_attention_heads: 4, intermediate_size: 128, ..RobertaConfig::default() };
//! let device = Device::flex();
//! let model = RobertaForMaskedLM::new(&config, &device)?;
//! let ids = Tensor::<2, Int>::from_ints([[0, 10, 4, 12, 2]], &device);
//! let mask = Tensor::<2, Int>::ones([1, 5], &device);
//! let logits = model.forward_at(ids, mask, Tensor::from_ints([2], &device)); // [1, vocab]
//! let loss = mlm_loss(logits, Tensor::from_ints([11], &device));
//! # Ok::<(), masklm_model::ConfigError>(())
//! ```

mod checkpointing;
mod config;
mod cpu_ops;
mod dropout;
mod family;
pub mod memory;
mod model;
pub mod modernbert;
mod rows;

use std::path::PathBuf;

pub use config::{HiddenAct, RobertaConfig};
pub use dropout::{DropoutStream, MlmDropout};
pub use family::{Family, MaskedLm, ModelConfig, SpecialIds};
pub use model::{
    AttentionImpl, KeyMask, RobertaAttention, RobertaEmbeddings, RobertaEncoder,
    RobertaForMaskedLM, RobertaIntermediate, RobertaLMHead, RobertaLayer, RobertaModel,
    RobertaOutput, RobertaSelfAttention, attention_bias, mlm_loss, position_ids,
};
pub use modernbert::{ModernBertConfig, ModernBertForMaskedLM};
pub use rows::BatchMask;

/// Why a model configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read model config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid JSON or has a value of the wrong type.
    #[error("{}: {source}", path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "model config".to_string()))]
    Parse {
        path: Option<PathBuf>,
        #[source]
        source: serde_json::Error,
    },
    /// A key has a value of the wrong type (`num_hidden_layers: 2.5`).
    #[error("{}`{key}`: {source}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Type {
        key: String,
        path: Option<PathBuf>,
        #[source]
        source: serde_json::Error,
    },
    /// The model needs more memory than the machine has available.
    #[error(
        "{what} needs about {} but {} of memory is available ({} in bytes, or MemAvailable \
         in /proc/meminfo): {advice}",
        memory::human_bytes(*needed),
        memory::human_bytes(*available),
        memory::MEMORY_LIMIT_ENV
    )]
    Memory {
        what: String,
        needed: u64,
        available: u64,
        advice: String,
    },
    /// A value no model can be built from.
    #[error("{}invalid `{key}`: {reason}", path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Invalid {
        key: &'static str,
        reason: String,
        path: Option<PathBuf>,
    },
}

impl ConfigError {
    /// Attaches the file the config came from.
    pub(crate) fn in_file(self, file: &std::path::Path) -> Self {
        match self {
            Self::Parse { source, .. } => Self::Parse {
                path: Some(file.to_path_buf()),
                source,
            },
            Self::Invalid { key, reason, .. } => Self::Invalid {
                key,
                reason,
                path: Some(file.to_path_buf()),
            },
            Self::Type { key, source, .. } => Self::Type {
                key,
                source,
                path: Some(file.to_path_buf()),
            },
            other => other,
        }
    }
}
