//! The seam between model families and everything that trains, evaluates or serves a model.
//!
//! A family is one module of this crate (its `Config` and `ForMaskedLM`) plus its weight-name
//! map in masklm-hub; [`ModelConfig`] and [`MaskedLm`] are the only types the rest of masklm
//! holds. The family is decided once, from `config.json`'s `model_type`, and carried as an
//! enum variant: nothing downstream compares strings (text-embeddings-inference does the
//! same).
//!
//! Why enums and not a trait: burn's `Module` derive, records, optimizers
//! (`OptimizerAdaptor<_, M>`) and `GradientsAccumulator<M>` need one concrete module type, and
//! a `dyn` model cannot be one. An enum of families is a burn module whose record is the
//! family's own, so checkpoints, mixed precision ([`burn::module::ModuleMapper`]) and the
//! optimizer work on every family unchanged. The cost of a new family is one variant here and
//! one arm in each method below.

use std::path::Path;

use burn::module::Module;
use burn::store::{ApplyResult, ModuleSnapshot, ModuleStore};
use burn::tensor::{Device, Int, Tensor};

use crate::{
    AttentionImpl, BatchMask, ConfigError, ModernBertConfig, ModernBertForMaskedLM, RobertaConfig,
    RobertaForMaskedLM,
};

/// A model family: one architecture and its conventions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// RoBERTa, BERT, XLM-R and CamemBERT: post-LayerNorm encoders with absolute positions
    /// ([`RobertaForMaskedLM`]; BERT's conventions are a flag of its config).
    Roberta,
    /// ModernBERT: pre-LayerNorm, rotary positions, alternating global and sliding-window
    /// attention, GeGLU ([`ModernBertForMaskedLM`]).
    ModernBert,
}

impl Family {
    /// Every family masklm has.
    pub const ALL: [Family; 2] = [Family::Roberta, Family::ModernBert];

    /// The `model_type` values of `config.json` each family reads.
    pub const MODEL_TYPES: [(&'static str, Family); 5] = [
        ("roberta", Family::Roberta),
        ("bert", Family::Roberta),
        ("xlm-roberta", Family::Roberta),
        ("camembert", Family::Roberta),
        ("modernbert", Family::ModernBert),
    ];

    /// The family of a `config.json` `model_type` (`None` for an unknown one). A missing
    /// `model_type` is RoBERTa's, transformers' `RobertaConfig` default.
    pub fn of_model_type(model_type: &str) -> Option<Family> {
        Self::MODEL_TYPES
            .iter()
            .find(|(name, _)| *name == model_type)
            .map(|&(_, family)| family)
    }

    /// The `model_type` values masklm accepts, for error messages.
    pub fn known_model_types() -> String {
        Self::MODEL_TYPES
            .iter()
            .map(|(name, _)| format!("\"{name}\""))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The family's name in messages and in `[model] model_type` of a run config.
    pub fn name(self) -> &'static str {
        match self {
            Family::Roberta => "roberta",
            Family::ModernBert => "modernbert",
        }
    }
}

/// The ids of a tokenizer's special tokens that a model config names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecialIds {
    pub pad: usize,
    /// The token a sequence starts with (`<s>`, `[CLS]`).
    pub start: usize,
    /// The token a sequence ends with (`</s>`, `[SEP]`).
    pub end: usize,
}

/// The `config.json` of a model of any family.
// A config is made a few times per run; boxing the larger variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum ModelConfig {
    Roberta(RobertaConfig),
    ModernBert(ModernBertConfig),
}

impl From<ModernBertConfig> for ModelConfig {
    fn from(config: ModernBertConfig) -> Self {
        ModelConfig::ModernBert(config)
    }
}

impl From<RobertaConfig> for ModelConfig {
    fn from(config: RobertaConfig) -> Self {
        ModelConfig::Roberta(config)
    }
}

impl ModelConfig {
    /// Reads and validates a `config.json`, choosing the family by its `model_type`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&text).map_err(|e| e.in_file(path))
    }

    /// Parses and validates the text of a `config.json`, choosing the family by `model_type`.
    pub fn from_json(text: &str) -> Result<Self, ConfigError> {
        let value: serde_json::Value = serde_json::from_str(text)
            .map_err(|source| ConfigError::Parse { path: None, source })?;
        match Self::family_of(&value)? {
            Family::Roberta => RobertaConfig::from_json(text).map(ModelConfig::Roberta),
            Family::ModernBert => ModernBertConfig::from_json(text).map(ModelConfig::ModernBert),
        }
    }

    /// The family a parsed `config.json` names.
    pub fn family_of(value: &serde_json::Value) -> Result<Family, ConfigError> {
        let model_type = match value.get("model_type") {
            // transformers' AutoConfig needs model_type; older RoBERTa files lack it, so a
            // missing one is RoBERTa's unless `architectures` names another family's class.
            None => {
                let architectures = value.get("architectures").and_then(|a| a.as_array());
                let names_modernbert = architectures.is_some_and(|a| {
                    a.iter()
                        .any(|n| n.as_str().is_some_and(|n| n.starts_with("ModernBert")))
                });
                return Ok(if names_modernbert {
                    Family::ModernBert
                } else {
                    Family::Roberta
                });
            }
            Some(serde_json::Value::String(name)) => name.as_str(),
            Some(other) => {
                return Err(ConfigError::Invalid {
                    key: "model_type",
                    reason: format!("{other} is not a string"),
                    path: None,
                });
            }
        };
        Family::of_model_type(model_type).ok_or_else(|| ConfigError::Invalid {
            key: "model_type",
            reason: format!(
                "{model_type:?} is not a family masklm knows; it reads {}",
                Family::known_model_types()
            ),
            path: None,
        })
    }

    /// The default config of `family` (the base shape), whose keys are the ones a run
    /// config's `[model]` table may set.
    pub fn default_for(family: Family) -> Self {
        match family {
            Family::Roberta => ModelConfig::Roberta(RobertaConfig::default()),
            Family::ModernBert => ModelConfig::ModernBert(ModernBertConfig::default()),
        }
    }

    /// The `config.json` keys a config of `family` reads: those it writes, and the ones it
    /// accepts without writing them back (older spellings).
    pub fn accepted_keys(family: Family) -> Vec<String> {
        let mut keys: Vec<String> = Self::default_for(family)
            .to_value()
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        let extra: &[&str] = match family {
            Family::Roberta => &["position_embedding_type"],
            // The attention pattern in the spelling of transformers before 5.
            Family::ModernBert => &[
                "global_attn_every_n_layers",
                "global_rope_theta",
                "local_rope_theta",
                "layer_types",
                "rope_parameters",
            ],
        };
        keys.extend(extra.iter().map(|k| k.to_string()));
        keys
    }

    /// The special-token keys of `family`'s config.json and their ids in a tokenizer: what a
    /// run that trains from scratch fills in from its tokenizer when `[model]` does not say.
    /// RoBERTa's `bos_token_id`/`eos_token_id` are left at their defaults: BERT has none, and
    /// masklm's own tokenizers put `<s>`/`</s>` at RoBERTa's ids.
    pub fn special_token_keys(family: Family, ids: SpecialIds) -> Vec<(&'static str, usize)> {
        match family {
            Family::Roberta => vec![("pad_token_id", ids.pad)],
            Family::ModernBert => vec![
                ("pad_token_id", ids.pad),
                ("bos_token_id", ids.start),
                ("cls_token_id", ids.start),
                ("eos_token_id", ids.end),
                ("sep_token_id", ids.end),
            ],
        }
    }

    pub fn family(&self) -> Family {
        match self {
            ModelConfig::Roberta(_) => Family::Roberta,
            ModelConfig::ModernBert(_) => Family::ModernBert,
        }
    }

    /// The `config.json` text, pretty-printed as transformers writes it.
    pub fn to_json(&self) -> String {
        match self {
            ModelConfig::Roberta(c) => c.to_json(),
            ModelConfig::ModernBert(c) => c.to_json(),
        }
    }

    /// The config as JSON (the keys transformers reads).
    pub fn to_value(&self) -> serde_json::Value {
        // The family configs are plain data; serialising them cannot fail.
        serde_json::from_str(&self.to_json()).unwrap_or(serde_json::Value::Null)
    }

    /// This config with some keys replaced (`{"hidden_dropout_prob": 0.0}`), validated again.
    pub fn with_keys(
        &self,
        keys: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, ConfigError> {
        let mut value = self.to_value();
        if let Some(object) = value.as_object_mut() {
            for (key, v) in keys {
                object.insert(key.clone(), v.clone());
            }
        }
        Self::from_json(&value.to_string())
    }

    /// The keys of this family's dropout probabilities: the only ones a run that continues a
    /// trained model (`init_from`) may change.
    pub fn dropout_keys(&self) -> &'static [&'static str] {
        match self {
            ModelConfig::Roberta(_) => &["hidden_dropout_prob", "attention_probs_dropout_prob"],
            ModelConfig::ModernBert(_) => {
                &["embedding_dropout", "attention_dropout", "mlp_dropout"]
            }
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            ModelConfig::Roberta(c) => c.vocab_size,
            ModelConfig::ModernBert(c) => c.vocab_size,
        }
    }

    /// The same config with `vocab_size` rows in its embedding table (vocabulary extension).
    pub fn with_vocab_size(&self, vocab_size: usize) -> Self {
        match self {
            ModelConfig::Roberta(c) => ModelConfig::Roberta(RobertaConfig {
                vocab_size,
                ..c.clone()
            }),
            ModelConfig::ModernBert(c) => ModelConfig::ModernBert(ModernBertConfig {
                vocab_size,
                ..c.clone()
            }),
        }
    }

    pub fn hidden_size(&self) -> usize {
        match self {
            ModelConfig::Roberta(c) => c.hidden_size,
            ModelConfig::ModernBert(c) => c.hidden_size,
        }
    }

    pub fn num_hidden_layers(&self) -> usize {
        match self {
            ModelConfig::Roberta(c) => c.num_hidden_layers,
            ModelConfig::ModernBert(c) => c.num_hidden_layers,
        }
    }

    pub fn pad_token_id(&self) -> usize {
        match self {
            ModelConfig::Roberta(c) => c.pad_token_id,
            ModelConfig::ModernBert(c) => c.pad_token_id,
        }
    }

    /// The longest input, in tokens with the specials, the model can take.
    pub fn max_sequence_length(&self) -> usize {
        match self {
            ModelConfig::Roberta(c) => c.max_sequence_length(),
            ModelConfig::ModernBert(c) => c.max_sequence_length(),
        }
    }

    /// The number of parameters of the model built from this config.
    pub fn parameter_count(&self) -> u64 {
        match self {
            ModelConfig::Roberta(c) => c.parameter_count(),
            ModelConfig::ModernBert(c) => c.parameter_count(),
        }
    }

    /// Bytes the model's f32 parameters take.
    pub fn parameter_bytes(&self) -> u64 {
        self.parameter_count().saturating_mul(4)
    }

    /// A rough lower bound of a training step's peak bytes (see
    /// [`RobertaConfig::training_bytes`]).
    pub fn training_bytes(&self, batch: usize, seq: usize, mask_probability: f64) -> u64 {
        match self {
            ModelConfig::Roberta(c) => c.training_bytes(batch, seq, mask_probability),
            ModelConfig::ModernBert(c) => c.training_bytes(batch, seq, mask_probability),
        }
    }

    /// Refuses a model whose parameters do not fit in the memory available.
    pub fn check_memory(&self) -> Result<(), ConfigError> {
        match self {
            ModelConfig::Roberta(c) => c.check_memory(),
            ModelConfig::ModernBert(c) => c.check_memory(),
        }
    }

    /// Rejects values no model can be built from, naming the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match self {
            ModelConfig::Roberta(c) => c.validate(),
            ModelConfig::ModernBert(c) => c.validate(),
        }
    }
}

/// A masked language model of any family.
#[derive(Module, Debug)]
pub enum MaskedLm {
    Roberta(RobertaForMaskedLM),
    ModernBert(ModernBertForMaskedLM),
}

impl From<ModernBertForMaskedLM> for MaskedLm {
    fn from(model: ModernBertForMaskedLM) -> Self {
        MaskedLm::ModernBert(model)
    }
}

impl From<RobertaForMaskedLM> for MaskedLm {
    fn from(model: RobertaForMaskedLM) -> Self {
        MaskedLm::Roberta(model)
    }
}

impl MaskedLm {
    /// A freshly initialised model of the config's family, initialised as transformers'
    /// `_init_weights` for that family.
    pub fn new(config: &ModelConfig, device: &Device) -> Result<Self, ConfigError> {
        Ok(match config {
            ModelConfig::Roberta(c) => MaskedLm::Roberta(RobertaForMaskedLM::new(c, device)?),
            ModelConfig::ModernBert(c) => {
                MaskedLm::ModernBert(ModernBertForMaskedLM::new(c, device)?)
            }
        })
    }

    pub fn family(&self) -> Family {
        match self {
            MaskedLm::Roberta(_) => Family::Roberta,
            MaskedLm::ModernBert(_) => Family::ModernBert,
        }
    }

    /// Logits over the vocabulary at every position.
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `[batch, seq]`
    /// - output: `[batch, seq, vocab]`
    pub fn forward(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: impl Into<BatchMask>,
    ) -> Tensor<3> {
        match self {
            MaskedLm::Roberta(m) => m.forward(input_ids, attention_mask),
            MaskedLm::ModernBert(m) => m.forward(input_ids, attention_mask),
        }
    }

    /// Logits only at the given flat positions (`batch_index * seq + position`).
    ///
    /// # Shapes
    /// - `input_ids`, `attention_mask`: `[batch, seq]`, `positions`: `[masked]`
    /// - output: `[masked, vocab]`
    pub fn forward_at(
        &self,
        input_ids: Tensor<2, Int>,
        attention_mask: impl Into<BatchMask>,
        positions: Tensor<1, Int>,
    ) -> Tensor<2> {
        match self {
            MaskedLm::Roberta(m) => m.forward_at(input_ids, attention_mask, positions),
            MaskedLm::ModernBert(m) => m.forward_at(input_ids, attention_mask, positions),
        }
    }

    /// Appends one vocabulary row per entry of `sources`, each the mean of those rows.
    pub fn with_new_rows(self, sources: &[Vec<u32>]) -> Self {
        match self {
            MaskedLm::Roberta(m) => MaskedLm::Roberta(m.with_new_rows(sources)),
            MaskedLm::ModernBert(m) => MaskedLm::ModernBert(m.with_new_rows(sources)),
        }
    }

    /// The same model with every self-attention computed by `implementation`.
    pub fn with_attention(self, implementation: AttentionImpl) -> Self {
        match self {
            MaskedLm::Roberta(m) => MaskedLm::Roberta(m.with_attention(implementation)),
            MaskedLm::ModernBert(m) => MaskedLm::ModernBert(m.with_attention(implementation)),
        }
    }

    /// The word-embedding matrix, which is also the decoder weight.
    pub fn word_embeddings(&self) -> Tensor<2> {
        match self {
            MaskedLm::Roberta(m) => m.word_embeddings(),
            MaskedLm::ModernBert(m) => m.word_embeddings(),
        }
    }

    /// Starts this model's dropout stream over at `seed` (each training step does, so that a
    /// resumed run draws the masks of the uninterrupted one). Other models are not touched.
    pub fn seed_dropout(&self, seed: u64, device: &Device) {
        match self {
            MaskedLm::Roberta(m) => m.dropout_stream().seed(seed, device),
            MaskedLm::ModernBert(m) => m.dropout_stream().seed(seed, device),
        }
    }

    /// Writes the family model's parameters into `store` under the family's own module paths
    /// (`roberta.encoder.layer.0...`), not under this enum's variant name, so a checkpoint's
    /// keys are those of the family's HF-named modules whatever enum holds them (and
    /// checkpoints written before the seam still load).
    pub fn save_weights_into<S: ModuleStore>(&self, store: &mut S) -> Result<(), S::Error> {
        match self {
            MaskedLm::Roberta(m) => m.save_into(store),
            MaskedLm::ModernBert(m) => m.save_into(store),
        }
    }

    /// Reads parameters written by [`MaskedLm::save_weights_into`] into this model.
    pub fn load_weights_from<S: ModuleStore>(
        &mut self,
        store: &mut S,
    ) -> Result<ApplyResult, S::Error> {
        match self {
            MaskedLm::Roberta(m) => m.load_from(store),
            MaskedLm::ModernBert(m) => m.load_from(store),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_family_comes_from_model_type_or_the_architecture_it_names() {
        let family = |text: &str| ModelConfig::family_of(&serde_json::from_str(text).unwrap());
        assert_eq!(
            family(r#"{"model_type": "xlm-roberta"}"#).unwrap(),
            Family::Roberta
        );
        assert_eq!(
            family(r#"{"model_type": "modernbert"}"#).unwrap(),
            Family::ModernBert
        );
        // No model_type: RoBERTa's default, unless the architecture is another family's.
        assert_eq!(family("{}").unwrap(), Family::Roberta);
        assert_eq!(
            family(r#"{"architectures": ["ModernBertForMaskedLM"]}"#).unwrap(),
            Family::ModernBert
        );
        let error = family(r#"{"model_type": "gpt2"}"#).unwrap_err().to_string();
        assert!(
            error.contains("model_type") && error.contains("gpt2"),
            "{error}"
        );
        assert!(
            error.contains("\"modernbert\""),
            "names what it reads: {error}"
        );
        // A config read without model_type is built as its family's class.
        let config = ModelConfig::from_json(
            r#"{"architectures": ["ModernBertForMaskedLM"], "vocab_size": 40, "hidden_size": 16,
                "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 8,
                "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "cls_token_id": 1,
                "sep_token_id": 2}"#,
        )
        .unwrap();
        assert_eq!(config.family(), Family::ModernBert);
    }
}
