//! ModernBERT (transformers' `ModernBertForMaskedLM`): a pre-LayerNorm encoder with rotary
//! positions, alternating full and sliding-window attention, and GeGLU feed-forward blocks.
//!
//! 1. [`ModernBertConfig`]: HF `config.json` names and defaults, in transformers 5's
//!    spelling (`layer_types`, `rope_parameters`) or the older one
//!    (`global_attn_every_n_layers`, `global_rope_theta`, `local_rope_theta`), resolved into
//!    one [`LayerAttention`] per layer.
//! 2. [`ModernBertEmbeddings`]: token embeddings and LayerNorm, no position table.
//! 3. [`ModernBertEncoderLayer`] x `num_hidden_layers`: [`rotary`] q/k, full or
//!    [`sliding_window_bias`] attention, [`geglu`] MLP.
//! 4. [`ModernBertPredictionHead`] and [`ModernBertDecoder`], whose weight is the
//!    token-embedding matrix.
//!
//! The loss is the shared [`crate::mlm_loss`] on [`ModernBertForMaskedLM::forward_at`].

mod config;
mod model;

pub use config::{
    FULL_ATTENTION, LayerAttention, ModernBertConfig, RopeParameters, SLIDING_ATTENTION, TokenIds,
};
pub(crate) use model::LayerInputs;
pub use model::{
    ModernBertAttention, ModernBertDecoder, ModernBertEmbeddings, ModernBertEncoderLayer,
    ModernBertForMaskedLM, ModernBertMLP, ModernBertModel, ModernBertPredictionHead, geglu, rotary,
    rotary_tables, sliding_window_bias,
};
