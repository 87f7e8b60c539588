//! `RobertaConfig`: the HF `config.json` of a RoBERTa-family encoder.
//!
//! Field names and defaults are those of transformers' `RobertaConfig` class
//! (`transformers/models/roberta/configuration_roberta.py`), so a Hub `config.json`
//! deserialises as is and ours loads in transformers. A key missing from the file takes the
//! class default, not roberta-base's value: `layer_norm_eps` defaults to 1e-12 and
//! `type_vocab_size` to 2, while roberta-base's own file says 1e-5 and 1.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::ConfigError;

/// Activation of the encoder's feed-forward block (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))`: HF `"gelu"`.
    Gelu,
    /// tanh approximation of GELU: HF `"gelu_new"`.
    GeluNew,
    /// The same tanh approximation under PyTorch's name: HF `"gelu_pytorch_tanh"`.
    GeluPytorchTanh,
    /// HF `"relu"`.
    Relu,
}

/// Model hyper-parameters with transformers' `RobertaConfig` names and defaults.
///
/// Unknown keys in a `config.json` are ignored on reading (Hub files carry many);
/// [`RobertaConfig::validate`] rejects impossible values, naming the key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RobertaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    /// Kept as the string from the file so that an unsupported value gets an error naming the
    /// key from [`RobertaConfig::validate`] rather than an opaque serde message.
    pub hidden_act: String,
    pub hidden_dropout_prob: f64,
    pub attention_probs_dropout_prob: f64,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub initializer_range: f64,
    pub layer_norm_eps: f64,
    pub pad_token_id: usize,
    /// `null` in BERT configs, which have no such tokens.
    pub bos_token_id: Option<usize>,
    pub eos_token_id: Option<usize>,
    /// Only absolute positions are implemented; transformers 5 no longer writes this key, older
    /// files say `"absolute"`, and relative variants are rejected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position_embedding_type: Option<String>,
    /// The MLM decoder reuses the word-embedding matrix; untied checkpoints are rejected.
    pub tie_word_embeddings: bool,
    /// `"bert"` selects BERT's conventions ([`RobertaConfig::is_bert`]: positions from 0, the
    /// head's activation from `hidden_act`, BERT weight names); transformers' `AutoConfig`
    /// reads it too.
    pub model_type: String,
    /// Written for transformers' `AutoModel*` classes; not read by masklm.
    pub architectures: Vec<String>,
}

impl Default for RobertaConfig {
    /// transformers' `RobertaConfig()` with no arguments (roberta-base shape).
    fn default() -> Self {
        Self {
            vocab_size: 50265,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".to_string(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            initializer_range: 0.02,
            layer_norm_eps: 1e-12,
            pad_token_id: 1,
            bos_token_id: Some(0),
            eos_token_id: Some(2),
            position_embedding_type: None,
            tie_word_embeddings: true,
            model_type: "roberta".to_string(),
            architectures: vec!["RobertaForMaskedLM".to_string()],
        }
    }
}

impl RobertaConfig {
    /// Reads and validates a `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and validates the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let mut value: serde_json::Value = serde_json::from_str(text)
            .map_err(|source| ConfigError::Parse { path: None, source })?;
        // A BERT config's missing keys take transformers' BertConfig defaults instead.
        if let Some(object) = value.as_object_mut()
            && object.get("model_type").and_then(|v| v.as_str()) == Some("bert")
        {
            for (key, default) in [("vocab_size", 30522), ("pad_token_id", 0)] {
                object
                    .entry(key)
                    .or_insert(serde_json::Value::from(default));
            }
            // BertConfig has no bos/eos ids (RobertaConfig's 0 and 2 are [PAD] and [CLS] in a
            // BERT vocabulary).
            for key in ["bos_token_id", "eos_token_id"] {
                object.entry(key).or_insert(serde_json::Value::Null);
            }
            object
                .entry("architectures")
                .or_insert(serde_json::json!(["BertForMaskedLM"]));
        }
        // serde_path_to_error names the key of a wrongly typed value, which serde_json alone
        // does not ("invalid type: floating point `2.5`, expected usize").
        let config: Self = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Type {
                key,
                path: None,
                source: e.into_inner(),
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The `config.json` text, pretty-printed as transformers writes it.
    pub fn to_json(&self) -> String {
        // Serialising plain numbers, strings and vectors cannot fail.
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    /// The activation named by `hidden_act`.
    pub fn activation(&self) -> Result<HiddenAct, ConfigError> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(HiddenAct::Gelu),
            "gelu_new" => Ok(HiddenAct::GeluNew),
            "gelu_pytorch_tanh" => Ok(HiddenAct::GeluPytorchTanh),
            "relu" => Ok(HiddenAct::Relu),
            other => Err(ConfigError::Invalid {
                key: "hidden_act",
                path: None,
                reason: format!(
                    "{other:?} is not supported; use \"gelu\", \"gelu_new\", \"gelu_pytorch_tanh\" or \"relu\""
                ),
            }),
        }
    }

    /// Whether this is a BERT-family checkpoint (`model_type` "bert"): positions count from 0
    /// whatever the padding, and the MLM head's activation is `hidden_act`.
    pub fn is_bert(&self) -> bool {
        self.model_type == "bert"
    }

    /// The longest input (in tokens, specials included) the position table can index. RoBERTa
    /// positions start at `pad_token_id + 1`, so roberta-base (514 rows, pad 1) takes 512;
    /// BERT positions start at 0.
    pub fn max_sequence_length(&self) -> usize {
        if self.is_bert() {
            self.max_position_embeddings
        } else {
            self.max_position_embeddings
                .saturating_sub(self.pad_token_id + 1)
        }
    }

    /// The number of parameters of [`crate::RobertaForMaskedLM`] built from this config
    /// (the decoder is the word-embedding matrix, so it adds only its bias). Saturates rather
    /// than overflowing for configs that [`RobertaConfig::validate`] would refuse.
    pub fn parameter_count(&self) -> u64 {
        let [v, h, i, p, t, l] = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.max_position_embeddings,
            self.type_vocab_size,
            self.num_hidden_layers,
        ]
        .map(|n| n as u128);
        // Three embedding tables and their LayerNorm.
        let embeddings = (v + p + t) * h + 2 * h;
        // Q, K, V and output projections with biases, two LayerNorms, the FFN's two linears.
        let layer = 4 * (h * h + h) + 2 * 2 * h + (h * i + i) + (i * h + h);
        // Dense + LayerNorm + the decoder's bias.
        let head = h * h + h + 2 * h + v;
        (embeddings + l * layer + head).min(u64::MAX as u128) as u64
    }

    /// Bytes the model's f32 parameters take: what loading or building it allocates.
    pub fn parameter_bytes(&self) -> u64 {
        self.parameter_count().saturating_mul(4)
    }

    /// A rough lower bound of the bytes one training step holds at its peak for `batch`
    /// sequences of `seq` tokens, f32 throughout: weights, gradients and AdamW's two moments
    /// (4 x [`RobertaConfig::parameter_bytes`]), the activations each layer keeps for the
    /// backward pass, and the logits of the masked tokens with their gradient. For refusing a
    /// batch that cannot fit ([`crate::memory::check_memory`]), not for planning to the byte.
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
        // Per token and layer: about 13 hidden-sized tensors (projections, residuals,
        // LayerNorm inputs, dropout masks), the FFN before and after its activation, and each
        // head's attention scores and probabilities over the sequence.
        let per_token_layer = 13.0 * h + 2.0 * i + 2.0 * heads * seq as f64;
        let activations = tokens * layers * per_token_layer;
        let logits = 2.0 * tokens * mask_probability * v;
        let floats = 4.0 * self.parameter_count() as f64 + activations + logits;
        // `as` saturates: an absurd batch gives u64::MAX, which no machine has.
        (4.0 * floats) as u64
    }

    /// Refuses a model whose parameters do not fit in the memory the machine has available
    /// (see [`crate::memory`]), naming what makes it large.
    pub fn check_memory(&self) -> Result<(), ConfigError> {
        let [v, h, i, l] = [
            self.vocab_size,
            self.hidden_size,
            self.intermediate_size,
            self.num_hidden_layers,
        ]
        .map(|n| n as f64);
        let bulk = if v * h >= l * (4.0 * h * h + 2.0 * h * i) {
            format!("most of them the word embeddings, vocab_size {v} x hidden_size {h}")
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

    /// Rejects values no model can be built from, naming the offending key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_sizes()?;
        self.check_token_ids()?;
        self.check_probabilities()?;
        self.check_supported()?;
        self.activation()?;
        Ok(())
    }

    /// Every size is at least 1 and below a sanity limit, the model below 20e9 parameters,
    /// and the heads divide the hidden size.
    fn check_sizes(&self) -> Result<(), ConfigError> {
        // Each limit is far above any published encoder (XLM-R XXL: vocab 250k, hidden 4096,
        // 48 layers), so a typo such as vocab_size 10^9 is an error, not an allocator abort.
        for (key, value, limit) in [
            ("vocab_size", self.vocab_size, 1 << 24),
            ("hidden_size", self.hidden_size, 1 << 16),
            ("num_hidden_layers", self.num_hidden_layers, 1024),
            ("num_attention_heads", self.num_attention_heads, 1024),
            ("intermediate_size", self.intermediate_size, 1 << 18),
            (
                "max_position_embeddings",
                self.max_position_embeddings,
                1 << 20,
            ),
            ("type_vocab_size", self.type_vocab_size, 1 << 16),
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
        Ok(())
    }

    /// Special token ids index the vocabulary, and (RoBERTa) the position table has a row for
    /// a token after the padding offset.
    fn check_token_ids(&self) -> Result<(), ConfigError> {
        for (key, id) in [
            ("pad_token_id", Some(self.pad_token_id)),
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
        ] {
            if let Some(id) = id
                && id >= self.vocab_size
            {
                return invalid(
                    key,
                    format!(
                        "{id} is outside the vocabulary (vocab_size {})",
                        self.vocab_size
                    ),
                );
            }
        }
        if !self.is_bert() && self.pad_token_id + 1 >= self.max_position_embeddings {
            return invalid(
                "max_position_embeddings",
                format!(
                    "{} leaves no position for a token: RoBERTa positions start at pad_token_id + 1 = {}",
                    self.max_position_embeddings,
                    self.pad_token_id + 1
                ),
            );
        }
        Ok(())
    }

    /// Dropout rates are probabilities; epsilon and the initialiser's range are usable numbers.
    fn check_probabilities(&self) -> Result<(), ConfigError> {
        for (key, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return invalid(key, format!("{p} is not a probability in [0, 1)"));
            }
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return invalid(
                "layer_norm_eps",
                format!("{} must be a positive number", self.layer_norm_eps),
            );
        }
        if !(self.initializer_range >= 0.0 && self.initializer_range.is_finite()) {
            return invalid(
                "initializer_range",
                format!("{} must be a non-negative number", self.initializer_range),
            );
        }
        Ok(())
    }

    /// Variants of the architecture that masklm does not implement.
    fn check_supported(&self) -> Result<(), ConfigError> {
        if let Some(kind) = self
            .position_embedding_type
            .as_deref()
            .filter(|&k| k != "absolute")
        {
            return invalid(
                "position_embedding_type",
                format!("{kind:?} is not supported; only \"absolute\" positions are implemented"),
            );
        }
        if !self.tie_word_embeddings {
            return invalid(
                "tie_word_embeddings",
                "false is not supported: masklm's MLM decoder is the word-embedding matrix"
                    .to_string(),
            );
        }
        Ok(())
    }
}

fn invalid(key: &'static str, reason: String) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        key,
        reason,
        path: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_keys_take_transformers_class_defaults() {
        let config = RobertaConfig::from_json(
            r#"{"vocab_size": 100, "hidden_size": 8, "num_attention_heads": 2}"#,
        )
        .unwrap();
        assert_eq!(config.layer_norm_eps, 1e-12);
        assert_eq!(config.type_vocab_size, 2);
        assert_eq!(config.pad_token_id, 1);
        assert_eq!(config.max_position_embeddings, 512);
        assert_eq!(config.hidden_act, "gelu");
        assert_eq!(config.intermediate_size, 3072);
    }

    #[test]
    fn a_bert_config_takes_bert_config_defaults() {
        let config = RobertaConfig::from_json(
            r#"{"model_type": "bert", "hidden_size": 8, "num_attention_heads": 2}"#,
        )
        .unwrap();
        assert_eq!(config.vocab_size, 30522);
        assert_eq!(config.pad_token_id, 0);
        assert_eq!((config.bos_token_id, config.eos_token_id), (None, None));
        assert_eq!(config.architectures, ["BertForMaskedLM"]);
    }

    #[test]
    fn unknown_keys_are_ignored() {
        let config = RobertaConfig::from_json(
            r#"{"vocab_size": 100, "hidden_size": 8, "num_attention_heads": 2,
                "transformers_version": "5.24.0", "use_cache": true, "torch_dtype": "float32"}"#,
        )
        .unwrap();
        assert_eq!(config.vocab_size, 100);
    }

    fn error_for(json: &str) -> String {
        RobertaConfig::from_json(json).unwrap_err().to_string()
    }

    #[test]
    fn impossible_values_name_the_key() {
        let msg = error_for(r#"{"hidden_size": 30, "num_attention_heads": 4}"#);
        assert!(
            msg.contains("hidden_size") && msg.contains("num_attention_heads"),
            "{msg}"
        );
        let msg = error_for(r#"{"num_hidden_layers": 0}"#);
        assert!(msg.contains("num_hidden_layers"), "{msg}");
        let msg = error_for(r#"{"vocab_size": 10, "pad_token_id": 10}"#);
        assert!(msg.contains("pad_token_id"), "{msg}");
        let msg = error_for(r#"{"hidden_act": "swish"}"#);
        assert!(msg.contains("hidden_act") && msg.contains("swish"), "{msg}");
        let msg = error_for(r#"{"hidden_dropout_prob": 1.0}"#);
        assert!(msg.contains("hidden_dropout_prob"), "{msg}");
        let msg = error_for(r#"{"position_embedding_type": "relative_key"}"#);
        assert!(msg.contains("position_embedding_type"), "{msg}");
        let msg = error_for(r#"{"hidden_size": "big"}"#);
        assert!(msg.contains("invalid type"), "{msg}");
    }

    #[test]
    fn parameter_count_is_the_models_own() {
        let device = burn::tensor::Device::flex();
        for model_type in ["roberta", "bert"] {
            let config = RobertaConfig {
                vocab_size: 101,
                hidden_size: 12,
                num_hidden_layers: 3,
                num_attention_heads: 2,
                intermediate_size: 20,
                max_position_embeddings: 40,
                model_type: model_type.to_string(),
                ..RobertaConfig::default()
            };
            let model = crate::RobertaForMaskedLM::new(&config, &device).unwrap();
            use burn::module::Module;
            assert_eq!(
                config.parameter_count(),
                model.num_params() as u64,
                "{model_type}"
            );
            assert_eq!(config.parameter_bytes(), 4 * config.parameter_count());
        }
    }

    #[test]
    fn training_bytes_grow_with_the_batch_and_saturate() {
        let config = RobertaConfig::default();
        let one = config.training_bytes(1, 512, 0.15);
        assert!(one > 16 * config.parameter_count(), "{one}");
        assert!(config.training_bytes(64, 512, 0.15) > 32 * (one - 16 * config.parameter_count()));
        assert!(config.training_bytes(100_000_000, 512, 0.15) > 1 << 50);
        assert_eq!(config.training_bytes(usize::MAX, usize::MAX, 1.0), u64::MAX);
    }

    #[test]
    fn round_trips_through_json() {
        let config = RobertaConfig {
            vocab_size: 1000,
            layer_norm_eps: 1e-5,
            ..RobertaConfig::default()
        };
        assert_eq!(RobertaConfig::from_json(&config.to_json()).unwrap(), config);
    }
}
