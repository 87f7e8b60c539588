//! `ModernBertConfig`: the HF `config.json` of a ModernBERT encoder.
//!
//! Field names and defaults are those of transformers' `ModernBertConfig`
//! (`transformers/models/modernbert/configuration_modernbert.py`, 5.24). Two spellings of the
//! attention pattern are read, as transformers reads them:
//!
//! - transformers 5 saves `layer_types` (`"full_attention"` / `"sliding_attention"` per layer)
//!   and `rope_parameters` (per layer type, each with `rope_type` and `rope_theta`);
//! - older files (ModernBERT-base on the Hub) say `global_attn_every_n_layers` (layer `i` is
//!   global when `i % n == 0`), `global_rope_theta` and `local_rope_theta`.
//!
//! Both are resolved once, on reading, into `layer_types` + `rope_parameters`
//! ([`ModernBertConfig::from_json`]); [`ModernBertConfig::layers`] turns them into one
//! [`LayerAttention`] per layer. `to_json` writes the transformers-5 spelling.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::{ConfigError, HiddenAct};

/// transformers' `ModernBertConfig.default_theta`: RoPE bases when a file names none.
const DEFAULT_GLOBAL_THETA: f64 = 160_000.0;
const DEFAULT_LOCAL_THETA: f64 = 10_000.0;
/// transformers' default of the old `global_attn_every_n_layers` key.
const DEFAULT_GLOBAL_EVERY: usize = 3;

/// The layer-type names of `layer_types` and the keys of `rope_parameters`.
pub const FULL_ATTENTION: &str = "full_attention";
pub const SLIDING_ATTENTION: &str = "sliding_attention";

/// One entry of `rope_parameters`. Only `rope_type: "default"` (plain RoPE) is implemented;
/// other keys a file may carry (scaling factors of other RoPE types) are kept for writing back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

fn default_rope_type() -> String {
    "default".to_string()
}

impl RopeParameters {
    fn with_theta(theta: f64) -> Self {
        Self {
            rope_type: default_rope_type(),
            rope_theta: Some(theta),
            other: BTreeMap::new(),
        }
    }
}

/// A token id key that transformers allows to be one id or a list (`eos_token_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(usize),
    Many(Vec<usize>),
}

impl TokenIds {
    fn ids(&self) -> Vec<usize> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// What one encoder layer attends to, resolved from the config.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerAttention {
    /// `Some(w)`: a sliding-attention layer where a query sees keys at distance `<= w`
    /// (`local_attention / 2`, transformers' `config.sliding_window`); `None`: full attention.
    pub half_window: Option<usize>,
    /// The RoPE base of this layer's type.
    pub rope_theta: f64,
}

/// Model hyper-parameters with transformers' `ModernBertConfig` names and defaults.
///
/// Unknown keys are ignored on reading; [`ModernBertConfig::validate`] rejects impossible or
/// unsupported values, naming the key. Keys that only the classification heads use
/// (`classifier_pooling`, `classifier_dropout`) are kept so that a file round-trips.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ModernBertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// The GeGLU activation of the MLP. Kept as the file's string so that an unsupported value
    /// is an error naming the key.
    pub hidden_activation: String,
    /// Not a table size (positions are rotary): the longest input the model was trained for.
    pub max_position_embeddings: usize,
    pub initializer_range: f64,
    pub initializer_cutoff_factor: f64,
    pub norm_eps: f64,
    /// Whether every LayerNorm has a bias (ModernBERT's own checkpoints: no).
    pub norm_bias: bool,
    pub pad_token_id: usize,
    pub eos_token_id: Option<TokenIds>,
    pub bos_token_id: Option<usize>,
    pub cls_token_id: Option<usize>,
    pub sep_token_id: Option<usize>,
    /// Biases on `Wqkv` and the attention's `Wo`.
    pub attention_bias: bool,
    /// Dropout on the attention probabilities and after the attention's `Wo`.
    pub attention_dropout: f64,
    /// `"full_attention"` or `"sliding_attention"` per layer; `None` in older files, where
    /// `global_attn_every_n_layers` decides.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// RoPE per layer type; `None` in older files, where `global_rope_theta` and
    /// `local_rope_theta` (or the defaults) give the bases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<BTreeMap<String, RopeParameters>>,
    /// The total width of a sliding window; a query sees `local_attention / 2` keys each side.
    pub local_attention: usize,
    pub embedding_dropout: f64,
    /// Biases on the MLP's `Wi` and `Wo`.
    pub mlp_bias: bool,
    /// Dropout after the GeGLU product.
    pub mlp_dropout: f64,
    /// Whether the MLM decoder has a bias.
    pub decoder_bias: bool,
    pub classifier_pooling: String,
    pub classifier_dropout: f64,
    /// The bias of the MLM head's dense layer (`head.dense`), despite the name.
    pub classifier_bias: bool,
    /// The MLM head's activation (`head.act`), despite the name.
    pub classifier_activation: String,
    pub deterministic_flash_attn: bool,
    pub sparse_prediction: bool,
    pub sparse_pred_ignore_index: i64,
    /// The decoder is the token-embedding matrix; untied checkpoints are rejected.
    pub tie_word_embeddings: bool,
    /// Old spelling of `layer_types`, read and resolved, never written.
    #[serde(skip_serializing)]
    pub global_attn_every_n_layers: Option<usize>,
    /// Old spelling of `rope_parameters.full_attention.rope_theta`, never written.
    #[serde(skip_serializing)]
    pub global_rope_theta: Option<f64>,
    /// Old spelling of `rope_parameters.sliding_attention.rope_theta`, never written.
    #[serde(skip_serializing)]
    pub local_rope_theta: Option<f64>,
    /// Pre-transformers-5 RoPE scaling; only its absence is supported.
    #[serde(skip_serializing)]
    pub rope_scaling: Option<serde_json::Value>,
    pub model_type: String,
    pub architectures: Vec<String>,
}

impl Default for ModernBertConfig {
    /// transformers' `ModernBertConfig()` with no arguments (ModernBERT-base shape).
    fn default() -> Self {
        Self {
            vocab_size: 50368,
            hidden_size: 768,
            intermediate_size: 1152,
            num_hidden_layers: 22,
            num_attention_heads: 12,
            hidden_activation: "gelu".to_string(),
            max_position_embeddings: 8192,
            initializer_range: 0.02,
            initializer_cutoff_factor: 2.0,
            norm_eps: 1e-5,
            norm_bias: false,
            pad_token_id: 50283,
            eos_token_id: Some(TokenIds::One(50282)),
            bos_token_id: Some(50281),
            cls_token_id: Some(50281),
            sep_token_id: Some(50282),
            attention_bias: false,
            attention_dropout: 0.0,
            layer_types: None,
            rope_parameters: None,
            local_attention: 128,
            embedding_dropout: 0.0,
            mlp_bias: false,
            mlp_dropout: 0.0,
            decoder_bias: true,
            classifier_pooling: "cls".to_string(),
            classifier_dropout: 0.0,
            classifier_bias: false,
            classifier_activation: "gelu".to_string(),
            deterministic_flash_attn: false,
            sparse_prediction: false,
            sparse_pred_ignore_index: -100,
            tie_word_embeddings: true,
            global_attn_every_n_layers: None,
            global_rope_theta: None,
            local_rope_theta: None,
            rope_scaling: None,
            model_type: "modernbert".to_string(),
            architectures: vec!["ModernBertForMaskedLM".to_string()],
        }
    }
}

fn invalid(key: &'static str, reason: String) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        key,
        reason,
        path: None,
    })
}

/// An activation key's value as a [`HiddenAct`] (transformers' `ACT2FN` names).
fn activation(key: &'static str, name: &str) -> Result<HiddenAct, ConfigError> {
    match name {
        "gelu" => Ok(HiddenAct::Gelu),
        "gelu_new" => Ok(HiddenAct::GeluNew),
        "gelu_pytorch_tanh" => Ok(HiddenAct::GeluPytorchTanh),
        "relu" => Ok(HiddenAct::Relu),
        other => Err(ConfigError::Invalid {
            key,
            path: None,
            reason: format!(
                "{other:?} is not supported; use \"gelu\", \"gelu_new\", \"gelu_pytorch_tanh\" or \"relu\""
            ),
        }),
    }
}

impl ModernBertConfig {
    /// Reads, resolves and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| e.in_file(path))
    }

    /// Parses the text of a `config.json` in either spelling, resolves the old keys into
    /// `layer_types` + `rope_parameters` ([`ModernBertConfig::resolved`]) and validates it.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|source| ConfigError::Parse { path: None, source })?;
        let config: Self = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Type {
                key,
                path: None,
                source: e.into_inner(),
            }
        })?;
        config.validate()?;
        Ok(config.resolved())
    }

    /// The same config in transformers 5's spelling: `layer_types` and `rope_parameters`
    /// filled in as transformers' `__post_init__` / `convert_rope_params_to_dict` fill them
    /// (an explicit `layer_types` or `rope_theta` wins over the old keys), the old keys cleared.
    pub fn resolved(mut self) -> Self {
        if self.layer_types.is_none() {
            let every = self
                .global_attn_every_n_layers
                .unwrap_or(DEFAULT_GLOBAL_EVERY)
                .max(1);
            self.layer_types = Some(
                (0..self.num_hidden_layers)
                    .map(|i| {
                        if i % every == 0 {
                            FULL_ATTENTION
                        } else {
                            SLIDING_ATTENTION
                        }
                        .to_string()
                    })
                    .collect(),
            );
        }
        let mut rope = self.rope_parameters.take().unwrap_or_default();
        for (kind, old, default) in [
            (FULL_ATTENTION, self.global_rope_theta, DEFAULT_GLOBAL_THETA),
            (
                SLIDING_ATTENTION,
                self.local_rope_theta,
                DEFAULT_LOCAL_THETA,
            ),
        ] {
            let entry = rope
                .entry(kind.to_string())
                .or_insert_with(|| RopeParameters::with_theta(old.unwrap_or(default)));
            entry.rope_theta.get_or_insert(old.unwrap_or(default));
        }
        self.rope_parameters = Some(rope);
        self.global_attn_every_n_layers = None;
        self.global_rope_theta = None;
        self.local_rope_theta = None;
        self
    }

    /// The `config.json` text in transformers 5's spelling, pretty-printed.
    pub fn to_json(&self) -> String {
        // Serialising plain numbers, strings, maps and vectors cannot fail.
        serde_json::to_string_pretty(&self.clone().resolved()).unwrap_or_default()
    }

    /// The activation of the MLP's GeGLU (`hidden_activation`).
    pub fn activation(&self) -> Result<HiddenAct, ConfigError> {
        activation("hidden_activation", &self.hidden_activation)
    }

    /// The activation of the MLM head (`classifier_activation`).
    pub fn head_activation(&self) -> Result<HiddenAct, ConfigError> {
        activation("classifier_activation", &self.classifier_activation)
    }

    /// The dimension of one attention head, which is also RoPE's dimension.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Each layer's attention: window and RoPE base, from `layer_types` and `rope_parameters`
    /// (or their old spellings). The config must pass [`ModernBertConfig::validate`].
    pub fn layers(&self) -> Vec<LayerAttention> {
        let resolved = self.clone().resolved();
        let theta = |kind: &str| {
            resolved
                .rope_parameters
                .as_ref()
                .and_then(|r| r.get(kind))
                .and_then(|p| p.rope_theta)
                .unwrap_or(DEFAULT_GLOBAL_THETA)
        };
        resolved
            .layer_types
            .unwrap_or_default()
            .iter()
            .map(|kind| LayerAttention {
                half_window: (kind == SLIDING_ATTENTION).then_some(self.local_attention / 2),
                rope_theta: theta(kind),
            })
            .collect()
    }

    /// The longest input (in tokens, specials included) the model was trained for. Positions
    /// are rotary, so nothing indexes a table; longer inputs run but are out of distribution.
    pub fn max_sequence_length(&self) -> usize {
        self.max_position_embeddings
    }

    /// The number of parameters of [`crate::ModernBertForMaskedLM`] built from this config
    /// (the decoder is the token-embedding matrix, so it adds only its bias). Layer 0 has no
    /// `attn_norm`. Saturates rather than overflowing.
    pub fn parameter_count(&self) -> u64 {
        let [v, h, i, l] = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
        ]
        .map(|n| n as u128);
        let flag = |b: bool| u128::from(b);
        let norm = h * (1 + flag(self.norm_bias));
        let attention = (h * 3 * h + flag(self.attention_bias) * 3 * h)
            + (h * h + flag(self.attention_bias) * h);
        let mlp = (h * 2 * i + flag(self.mlp_bias) * 2 * i) + (i * h + flag(self.mlp_bias) * h);
        let layers = l * (attention + mlp + 2 * norm) - norm.min(l * norm);
        let embeddings = v * h + norm;
        let head = h * h + flag(self.classifier_bias) * h + norm + flag(self.decoder_bias) * v;
        (embeddings + layers + norm + head).min(u64::MAX as u128) as u64
    }

    /// Bytes the model's f32 parameters take.
    pub fn parameter_bytes(&self) -> u64 {
        self.parameter_count().saturating_mul(4)
    }

    /// A rough lower bound of the bytes one training step holds at its peak for `batch`
    /// sequences of `seq` tokens, f32 throughout: weights, gradients and AdamW's two moments,
    /// the activations each layer keeps for the backward pass (sliding layers are computed as
    /// full `[seq, seq]` score matrices for now), and the masked tokens' logits.
    pub fn training_bytes(&self, batch: usize, seq: usize, mask_probability: f64) -> u64 {
        let tokens = batch as f64 * seq as f64;
        let [h, i, heads, layers, v] = [
            self.hidden_size,
            self.intermediate_size,
            self.num_attention_heads,
            self.num_hidden_layers,
            self.vocab_size,
        ]
        .map(|n| n as f64);
        // Per token and layer: two LayerNorm inputs, Wqkv's output, rotated q and k, the
        // context, residuals (~12 hidden-sized tensors); Wi's 2i output, the activation and
        // the product (4i); each head's scores and probabilities over the sequence.
        let per_token_layer = 12.0 * h + 4.0 * i + 2.0 * heads * seq as f64;
        let activations = tokens * layers * per_token_layer;
        let logits = 2.0 * tokens * mask_probability * v;
        let floats = 4.0 * self.parameter_count() as f64 + activations + logits;
        (4.0 * floats) as u64
    }

    /// Refuses a model whose parameters do not fit in the memory available.
    pub fn check_memory(&self) -> Result<(), ConfigError> {
        let [v, h, i, l] = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
        ]
        .map(|n| n as f64);
        let bulk = if v * h >= l * (4.0 * h * h + 3.0 * h * i) {
            format!("most of them the token embeddings, vocab_size {v} x hidden_size {h}")
        } else {
            format!("most of them in {l} layers of hidden_size {h}, intermediate_size {i}")
        };
        crate::memory::check_memory(
            self.parameter_bytes(),
            &format!(
                "a model of {:.2e} f32 parameters ({bulk})",
                self.parameter_count() as f64
            ),
            "lower vocab_size, hidden_size or num_hidden_layers in config.json, or use a machine \
             with more memory",
        )
    }

    /// Rejects values no model can be built from, or that masklm does not implement, naming
    /// the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_sizes()?;
        self.check_token_ids()?;
        self.check_rates()?;
        self.check_attention_pattern()?;
        self.check_supported()?;
        self.activation()?;
        self.head_activation()?;
        Ok(())
    }

    fn check_sizes(&self) -> Result<(), ConfigError> {
        for (key, value, limit) in [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("num_hidden_layers", self.num_hidden_layers, 1024),
            ("num_attention_heads", self.num_attention_heads, 1024),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 24,
            ),
        ] {
            if value == 0 {
                return invalid(key, "must be at least 1, got 0".to_string());
            }
            if value > limit {
                return invalid(
                    key,
                    format!(
                        "{value} is beyond any sane model (at most {limit}); check config.json"
                    ),
                );
            }
        }
        let parameters = self.parameter_count() as f64;
        if parameters > 20e9 {
            return invalid(
                "hidden_size",
                format!(
                    "this config describes {:.1}e9 parameters (vocab_size {}, hidden_size {}, \
                     {} layers, intermediate_size {}); masklm refuses models above 20e9",
                    parameters / 1e9,
                    self.vocab_size,
                    self.hidden_size,
                    self.num_hidden_layers,
                    self.intermediate_size
                ),
            );
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return invalid(
                "hidden_size",
                format!(
                    "{} is not a multiple of num_attention_heads ({})",
                    self.hidden_size, self.num_attention_heads
                ),
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            return invalid(
                "num_attention_heads",
                format!(
                    "gives an odd head dimension ({} / {} = {}); rotary embeddings rotate pairs",
                    self.hidden_size,
                    self.num_attention_heads,
                    self.head_dim()
                ),
            );
        }
        Ok(())
    }

    fn check_token_ids(&self) -> Result<(), ConfigError> {
        let eos = self.eos_token_id.as_ref().map(TokenIds::ids);
        let ids = [
            ("pad_token_id", Some(vec![self.pad_token_id])),
            ("bos_token_id", self.bos_token_id.map(|id| vec![id])),
            ("eos_token_id", eos),
            ("cls_token_id", self.cls_token_id.map(|id| vec![id])),
            ("sep_token_id", self.sep_token_id.map(|id| vec![id])),
        ];
        for (key, ids) in ids {
            if let Some(id) = ids.into_iter().flatten().find(|&id| id >= self.vocab_size) {
                return invalid(
                    key,
                    format!(
                        "{id} is outside the vocabulary (vocab_size {})",
                        self.vocab_size
                    ),
                );
            }
        }
        Ok(())
    }

    fn check_rates(&self) -> Result<(), ConfigError> {
        for (key, p) in [
            ("embedding_dropout", self.embedding_dropout),
            ("attention_dropout", self.attention_dropout),
            ("mlp_dropout", self.mlp_dropout),
        ] {
            if !(0.0..1.0).contains(&p) {
                return invalid(key, format!("{p} is not a probability in [0, 1)"));
            }
        }
        if !(self.norm_eps > 0.0 && self.norm_eps.is_finite()) {
            return invalid(
                "norm_eps",
                format!("{} must be a positive number", self.norm_eps),
            );
        }
        for (key, value) in [
            ("initializer_range", self.initializer_range),
            ("initializer_cutoff_factor", self.initializer_cutoff_factor),
        ] {
            if !(value >= 0.0 && value.is_finite()) {
                return invalid(key, format!("{value} must be a non-negative number"));
            }
        }
        Ok(())
    }

    /// `layer_types` names one known type per layer; every RoPE is plain RoPE with a positive
    /// base; sliding windows are at least one token wide each side.
    fn check_attention_pattern(&self) -> Result<(), ConfigError> {
        if let Some(types) = &self.layer_types {
            if types.len() != self.num_hidden_layers {
                return invalid(
                    "layer_types",
                    format!(
                        "has {} entries but num_hidden_layers is {}",
                        types.len(),
                        self.num_hidden_layers
                    ),
                );
            }
            if let Some(other) = types
                .iter()
                .find(|t| *t != FULL_ATTENTION && *t != SLIDING_ATTENTION)
            {
                return invalid(
                    "layer_types",
                    format!("{other:?} is not \"{FULL_ATTENTION}\" or \"{SLIDING_ATTENTION}\""),
                );
            }
        }
        if self.global_attn_every_n_layers == Some(0) {
            return invalid(
                "global_attn_every_n_layers",
                "must be at least 1, got 0".to_string(),
            );
        }
        for (kind, params) in self.rope_parameters.iter().flatten() {
            if params.rope_type != "default" {
                return invalid(
                    "rope_parameters",
                    format!(
                        "{kind}: rope_type {:?} is not supported; only \"default\" RoPE is \
                         implemented",
                        params.rope_type
                    ),
                );
            }
        }
        let thetas = self
            .rope_parameters
            .iter()
            .flatten()
            .filter_map(|(_, p)| p.rope_theta)
            .map(|t| ("rope_parameters", t))
            .chain(self.global_rope_theta.map(|t| ("global_rope_theta", t)))
            .chain(self.local_rope_theta.map(|t| ("local_rope_theta", t)));
        for (key, theta) in thetas {
            if !(theta > 0.0 && theta.is_finite()) {
                return invalid(key, format!("RoPE base {theta} must be a positive number"));
            }
        }
        if self.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
            return invalid(
                "rope_scaling",
                "RoPE scaling is not supported; only plain RoPE is implemented".to_string(),
            );
        }
        let resolved = self.clone().resolved();
        let sliding = resolved
            .layer_types
            .iter()
            .flatten()
            .any(|t| t == SLIDING_ATTENTION);
        if sliding && self.local_attention < 2 {
            return invalid(
                "local_attention",
                format!(
                    "{} gives sliding layers a window of no key on either side; use at least 2",
                    self.local_attention
                ),
            );
        }
        Ok(())
    }

    fn check_supported(&self) -> Result<(), ConfigError> {
        if !self.tie_word_embeddings {
            return invalid(
                "tie_word_embeddings",
                "false is not supported: masklm's MLM decoder is the token-embedding matrix"
                    .to_string(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = r#"{"vocab_size": 100, "hidden_size": 48, "num_attention_heads": 3,
        "num_hidden_layers": 5, "global_attn_every_n_layers": 2, "local_attention": 9,
        "global_rope_theta": 1000.0, "local_rope_theta": 50, "pad_token_id": 3,
        "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1, "sep_token_id": 2}"#;

    #[test]
    fn the_old_spelling_resolves_as_transformers_does() {
        let config = ModernBertConfig::from_json(OLD).unwrap();
        let layers = config.layers();
        let global: Vec<bool> = layers.iter().map(|l| l.half_window.is_none()).collect();
        assert_eq!(global, [true, false, true, false, true]);
        assert_eq!(layers[0].rope_theta, 1000.0);
        assert_eq!(layers[1].rope_theta, 50.0);
        // local_attention // 2, as transformers' `config.sliding_window`.
        assert_eq!(layers[1].half_window, Some(4));
        assert_eq!(config.global_rope_theta, None, "resolved away");
        let json: serde_json::Value = serde_json::from_str(&config.to_json()).unwrap();
        assert_eq!(json["layer_types"][1], SLIDING_ATTENTION);
        assert_eq!(
            json["rope_parameters"][FULL_ATTENTION]["rope_theta"],
            1000.0
        );
        assert!(json.get("global_rope_theta").is_none());
        assert_eq!(
            ModernBertConfig::from_json(&config.to_json()).unwrap(),
            config
        );
    }

    #[test]
    fn missing_keys_take_transformers_class_defaults() {
        let config = ModernBertConfig::from_json(
            r#"{"vocab_size": 50368, "num_hidden_layers": 4, "dtype": "float32"}"#,
        )
        .unwrap();
        let layers = config.layers();
        assert_eq!(layers.len(), 4);
        assert_eq!(layers[0].half_window, None);
        assert_eq!(layers[0].rope_theta, 160_000.0);
        assert_eq!(layers[1].half_window, Some(64));
        assert_eq!(layers[1].rope_theta, 10_000.0);
        assert_eq!(layers[3].half_window, None);
        assert!(!config.norm_bias && config.decoder_bias);
        assert_eq!(config.pad_token_id, 50283);
    }

    #[test]
    fn explicit_layer_types_win_over_the_old_key() {
        let config = ModernBertConfig::from_json(
            r#"{"num_hidden_layers": 2, "global_attn_every_n_layers": 1,
                "layer_types": ["sliding_attention", "full_attention"],
                "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 7.0}}}"#,
        )
        .unwrap();
        let layers = config.layers();
        assert_eq!(layers[0].half_window, Some(64));
        assert_eq!(layers[0].rope_theta, 10_000.0);
        assert_eq!(layers[1].rope_theta, 7.0);
    }

    fn error_for(json: &str) -> String {
        ModernBertConfig::from_json(json).unwrap_err().to_string()
    }

    #[test]
    fn impossible_values_name_the_key() {
        for (json, key) in [
            (r#"{"hidden_activation": "swish"}"#, "hidden_activation"),
            (
                r#"{"classifier_activation": "tanh"}"#,
                "classifier_activation",
            ),
            (
                r#"{"hidden_size": 30, "num_attention_heads": 4}"#,
                "hidden_size",
            ),
            (
                r#"{"hidden_size": 36, "num_attention_heads": 4}"#,
                "num_attention_heads",
            ),
            (
                r#"{"num_hidden_layers": 2, "layer_types": ["full_attention"]}"#,
                "layer_types",
            ),
            (
                r#"{"num_hidden_layers": 1, "layer_types": ["global"]}"#,
                "layer_types",
            ),
            (
                r#"{"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 2}}}"#,
                "rope_parameters",
            ),
            (r#"{"local_attention": 1}"#, "local_attention"),
            (r#"{"vocab_size": 10, "pad_token_id": 10}"#, "pad_token_id"),
            (
                r#"{"vocab_size": 10, "pad_token_id": 0, "bos_token_id": null,
                    "cls_token_id": null, "sep_token_id": null, "eos_token_id": [2, 11]}"#,
                "eos_token_id",
            ),
            (r#"{"mlp_dropout": 1.0}"#, "mlp_dropout"),
            (r#"{"tie_word_embeddings": false}"#, "tie_word_embeddings"),
            (
                r#"{"global_attn_every_n_layers": 0}"#,
                "global_attn_every_n_layers",
            ),
        ] {
            let msg = error_for(json);
            assert!(msg.contains(key), "{json}: {msg}");
        }
        let msg = error_for(r#"{"hidden_activation": "swish"}"#);
        assert!(msg.contains("swish"), "{msg}");
    }

    #[test]
    fn training_bytes_grow_with_the_batch_and_saturate() {
        let config = ModernBertConfig::default();
        let params = config.parameter_count();
        let one = config.training_bytes(1, 512, 0.3);
        assert!(one > 16 * params, "{one}");
        assert!(config.training_bytes(64, 512, 0.3) > 32 * (one - 16 * params));
        assert_eq!(config.training_bytes(usize::MAX, usize::MAX, 1.0), u64::MAX);
        // ModernBERT-base: 149e6 parameters with the tied decoder counted once.
        assert!((148e6..151e6).contains(&(params as f64)), "{params}");
    }

    #[test]
    fn parameter_count_is_the_models_own() {
        use burn::module::Module;
        let device = burn::tensor::Device::flex();
        for (norm_bias, bias) in [(false, false), (true, true)] {
            let config = ModernBertConfig {
                vocab_size: 101,
                hidden_size: 12,
                intermediate_size: 20,
                num_hidden_layers: 4,
                num_attention_heads: 2,
                norm_bias,
                attention_bias: bias,
                mlp_bias: bias,
                classifier_bias: bias,
                decoder_bias: !bias,
                pad_token_id: 0,
                bos_token_id: None,
                eos_token_id: None,
                cls_token_id: None,
                sep_token_id: None,
                ..ModernBertConfig::default()
            };
            let model = crate::ModernBertForMaskedLM::new(&config, &device).unwrap();
            assert_eq!(config.parameter_count(), model.num_params() as u64);
        }
    }
}
