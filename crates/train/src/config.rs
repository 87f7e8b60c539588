//! The training configuration: one TOML file, `--set section.key=value` overrides.
//!
//! ```toml
//! seed = 42
//! [model]          # HF config.json keys (vocab_size defaults to the tokenizer's), or
//! init_from = "..." # a Hugging Face folder, a Hub model id or a masklm checkpoint to continue from
//! [data]           # a prepared cache, or tokenizer + inputs (or weighted sources) to prepare;
//!                  # packing = full|line|documents
//! [masking]        # probability, mask_fraction, random_fraction,
//!                  # strategy = token|whole_word|span, span_geometric_p, span_min_length,
//!                  # span_max_length
//! [optimizer]      # name = adamw|stable_adamw, lr, betas, eps, weight_decay, max_grad_norm
//! [schedule]       # decay = linear|cosine|constant|wsd, warmup_steps | warmup_ratio;
//!                  # wsd: decay_steps | decay_fraction, warmup_type, decay_type, min_lr_ratio
//! [training]       # batch_size, grad_accum_steps, max_steps | epochs, group_by_length,
//!                  # batch_size_warmup_tokens, batch_size_warmup_min_size,
//!                  # gradient_checkpointing
//! [eval]           # eval_steps, batch_size, max_batches, seed, on_start, sets, best,
//!                  # patience, min_delta, probes
//! [checkpoint]     # save_steps, keep_last
//! [logging]        # log_steps, tensorboard
//! ```
//!
//! Unknown keys are errors that name the key; relative paths are relative to the directory the
//! command runs in.

use std::path::{Path, PathBuf};

use masklm_data::{CorpusOptions, MaskingConfig, Packing};
use masklm_model::{Family, ModelConfig, SpecialIds};
use serde::{Deserialize, Serialize};

use crate::{OptimizerConfig, ScheduleConfig, TrainError};

/// `[model]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ModelSection {
    /// Continue from a Hugging Face folder, a Hub model id (`org/name[@revision]`) or a masklm
    /// checkpoint (its config is used).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    /// HF `config.json` keys for a model trained from scratch.
    #[serde(flatten)]
    pub config: toml::Table,
}

/// `[data]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A cache made by `masklm prepare`, or where to prepare one from `inputs`.
    pub cache: Option<PathBuf>,
    /// Tokenizer folder or Hub model id (needed with `inputs` or `sources`; with only a
    /// prepared `cache`, the tokenizer that prepared it, or `model.init_from`'s when that
    /// folder holds one).
    pub tokenizer: Option<PathBuf>,
    /// Corpus files, directories or globs to prepare from.
    #[serde(default)]
    pub inputs: Vec<String>,
    #[serde(default)]
    pub validation_inputs: Vec<String>,
    #[serde(default = "default_validation_split")]
    pub validation_split: f64,
    #[serde(default = "default_max_seq_length")]
    pub max_seq_length: usize,
    #[serde(default = "default_packing")]
    pub packing: Packing,
    #[serde(default)]
    pub text_field: Option<String>,
    #[serde(default)]
    pub paragraphs: bool,
    /// The split of `datasets` folders among the inputs (`None`: `train`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    /// Rebuild a cache whose settings or inputs differ even when other runs still train on
    /// it (they can then no longer resume). Not part of the run's frozen settings.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rebuild_cache: bool,
    /// Several corpora mixed by weight, instead of `inputs`: each is prepared into
    /// `CACHE/NAME` (CACHE: `cache`, or RUN_DIR/cache) with its own validation split.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceSection>,
}

/// One `[data] sources` entry: `{ name = "pubmed", inputs = "data/pubmed", weight = 0.9 }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSection {
    /// Names its cache folder and its metrics (`tokens/NAME`).
    pub name: String,
    /// Files, folders or globs.
    pub inputs: Inputs,
    /// Its share of the training samples (weights are normalised to sum to 1).
    pub weight: f64,
}

impl SourceSection {
    /// Checks the `i`th `[data] sources` entry on its own.
    fn validate(&self, i: usize) -> Result<(), TrainError> {
        let key = format!("data.sources[{i}]");
        if !is_folder_name(&self.name) {
            return bad(
                &format!("{key}.name"),
                format!(
                    "{:?}: a source name is letters, digits, '_' or '-' (it names a cache \
                     folder and metric keys)",
                    self.name
                ),
            );
        }
        if !(self.weight.is_finite() && self.weight > 0.0) {
            return bad(
                &format!("{key}.weight"),
                format!("{} must be a positive number", self.weight),
            );
        }
        if self.inputs.to_vec().is_empty() {
            return bad(
                &format!("{key}.inputs"),
                "give a file, folder or glob (or a list of them)",
            );
        }
        Ok(())
    }
}

/// A config error naming `key`.
fn bad(key: &str, reason: impl Into<String>) -> Result<(), TrainError> {
    Err(TrainError::Config {
        key: key.to_string(),
        reason: reason.into(),
    })
}

/// Whether `name` can name a folder and a metric key: letters, digits, '_' or '-'.
fn is_folder_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

fn default_validation_split() -> f64 {
    0.05
}
fn default_max_seq_length() -> usize {
    512
}
fn default_packing() -> Packing {
    Packing::Full
}

impl DataSection {
    /// How the corpus is read.
    pub fn corpus_options(&self) -> CorpusOptions {
        CorpusOptions {
            text_field: self
                .text_field
                .clone()
                .unwrap_or_else(|| "text".to_string()),
            paragraphs: self.paragraphs,
            strict: false,
            split: self.split.clone(),
        }
    }
}

/// `[training]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainingSection {
    pub batch_size: usize,
    #[serde(default = "one")]
    pub grad_accum_steps: usize,
    /// Total optimizer steps; or give `epochs`.
    pub max_steps: Option<usize>,
    pub epochs: Option<f64>,
    /// "f32" (default), or mixed precision "bf16" / "f16" (matmuls in half precision, f32
    /// master weights; see masklm_train::precision).
    #[serde(default)]
    pub precision: crate::Precision,
    /// Stop after this many optimizer steps in a row were skipped (non-finite loss or
    /// gradients, or nothing masked). The weights of a skipped step stay as they were.
    #[serde(default = "ten")]
    pub max_skipped_steps: usize,
    /// Batch examples of similar length together (transformers' `group_by_length`): less
    /// padding with `packing = "line"` and documents of varied length.
    #[serde(default)]
    pub group_by_length: bool,
    /// Batch-size warmup (ModernBERT's `batch_size_warmup_tokens`, Cramming): the rows per
    /// micro-batch grow linearly from `batch_size_warmup_min_size` to `batch_size` over this
    /// many real (non-padding) training tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size_warmup_tokens: Option<u64>,
    /// The rows per micro-batch at the start of batch-size warmup (ModernBERT's
    /// `batch_size_warmup_min_size`, here per micro-batch); default `batch_size / 8`, at
    /// least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size_warmup_min_size: Option<usize>,
    /// Keep only each encoder layer's input in the forward and recompute the layer in the
    /// backward (transformers' `gradient_checkpointing=True`): the same gradients for much
    /// less activation memory and about a third more compute (see masklm_model's
    /// `MaskedLm::loss_gradients`).
    #[serde(default)]
    pub gradient_checkpointing: bool,
}

impl TrainingSection {
    /// Batch-size warmup as `(first rows per micro-batch, tokens)`, when configured.
    pub fn batch_size_warmup(&self) -> Option<(usize, u64)> {
        let tokens = self.batch_size_warmup_tokens?;
        let min = self
            .batch_size_warmup_min_size
            .unwrap_or((self.batch_size / 8).max(1));
        Some((min, tokens))
    }
}

fn one() -> usize {
    1
}
fn ten() -> usize {
    10
}

/// One `[eval] sets` entry: a path/glob, or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Inputs {
    One(String),
    Many(Vec<String>),
}

impl Inputs {
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Inputs::One(path) => vec![path.clone()],
            Inputs::Many(paths) => paths.clone(),
        }
    }
}

/// `[eval]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Evaluate every this many steps (0: only at the end).
    pub eval_steps: usize,
    /// Evaluation batch size (0: the training batch size).
    pub batch_size: usize,
    /// Evaluate on at most this many batches (0: the whole validation split).
    pub max_batches: usize,
    /// Masking seed of evaluation, fixed so that evaluations are comparable.
    pub seed: u64,
    /// Also evaluate before the first step (the untrained baseline).
    pub on_start: bool,
    /// More held-out sets, by name: `{ domain = "data/pubmed/held-out.txt", general = [...] }`.
    /// Each is prepared into RUN_DIR/eval-cache/NAME with the run's tokenizer and sequence
    /// length, and reported as `eval/NAME/perplexity` etc. at every evaluation.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub sets: std::collections::BTreeMap<String, Inputs>,
    /// The set whose perplexity picks the `best` checkpoint and drives early stopping:
    /// "validation" (the data's validation split, the default when it has one) or a name
    /// from `sets` (the default is the first by name when there is no validation split).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best: Option<String>,
    /// Early stopping: end the run after this many evaluations in a row without an
    /// improvement of the tracked set's loss by more than `min_delta` (0: never).
    pub patience: usize,
    /// The smallest decrease of the tracked eval loss (nats per masked token) that counts as
    /// an improvement for `patience` (transformers' `early_stopping_threshold`).
    pub min_delta: f64,
    /// Knowledge probes: a tab-separated file of masked sentences and their expected
    /// answers (see `masklm_infer::probes`), ranked at every evaluation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub probes: Option<PathBuf>,
}

/// The name of the data's own validation split among the eval sets.
pub const VALIDATION: &str = "validation";

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            eval_steps: 0,
            batch_size: 0,
            max_batches: 0,
            seed: 1234,
            on_start: false,
            sets: Default::default(),
            best: None,
            patience: 0,
            min_delta: 0.0,
            probes: None,
        }
    }
}

/// `[checkpoint]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointSection {
    /// Save every this many steps (0: only at the end and on Ctrl-C).
    pub save_steps: usize,
    /// How many recent checkpoints to keep (the best by validation perplexity is kept too).
    pub keep_last: usize,
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            save_steps: 0,
            keep_last: 2,
        }
    }
}

/// `[logging]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingSection {
    /// Write a metrics line every this many steps.
    pub log_steps: usize,
    /// Write TensorBoard event files under RUN_DIR/tensorboard.
    pub tensorboard: bool,
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            log_steps: 10,
            tensorboard: true,
        }
    }
}

/// The whole `configs/*.toml`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub masking: MaskingConfig,
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    pub training: TrainingSection,
    #[serde(default)]
    pub eval: EvalSection,
    #[serde(default)]
    pub checkpoint: CheckpointSection,
    #[serde(default)]
    pub logging: LoggingSection,
}

impl TrainConfig {
    /// Reads `path`, applies `--set` overrides, and validates.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut table: toml::Table =
            text.parse()
                .map_err(|e: toml::de::Error| TrainError::Toml {
                    path: path.to_path_buf(),
                    message: e.to_string(),
                })?;
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        Self::from_table(table).map_err(|e| match e {
            TrainError::Toml { message, .. } => TrainError::Toml {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    /// Parses an already-read TOML table and validates it.
    pub fn from_table(table: toml::Table) -> Result<Self, TrainError> {
        let config: Self = table
            .try_into()
            .map_err(|e: toml::de::Error| TrainError::Toml {
                path: PathBuf::new(),
                message: e.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }

    /// The settings a resumed run may not change, where `self` (the run's saved config)
    /// and `now` differ: `(key, saved value, new value)`.
    ///
    /// A resume may extend or shorten the run (`training.max_steps`/`epochs`), change the
    /// optimizer and schedule (as after a divergence), precision, evaluation, checkpointing and
    /// logging. Everything that decides which examples, masks and model a step sees is fixed:
    /// `seed`, `[model]`, `[data]`, `[masking]`, `training.batch_size`,
    /// `training.grad_accum_steps`, `training.group_by_length` and batch-size warmup.
    pub fn frozen_differences(&self, now: &TrainConfig) -> Vec<(String, String, String)> {
        const FROZEN: [&str; 9] = [
            "seed",
            "model",
            "data",
            "masking",
            "training.batch_size",
            "training.grad_accum_steps",
            "training.group_by_length",
            "training.batch_size_warmup_tokens",
            "training.batch_size_warmup_min_size",
        ];
        let flat = |config: &TrainConfig| {
            let mut out = std::collections::BTreeMap::new();
            if let Ok(value) = toml::Value::try_from(config) {
                flatten("", &value, &mut out);
            }
            out
        };
        let (saved, new) = (flat(self), flat(now));
        let keys: std::collections::BTreeSet<&String> = saved.keys().chain(new.keys()).collect();
        keys.into_iter()
            .filter(|key| {
                FROZEN
                    .iter()
                    .any(|f| *key == f || key.starts_with(&format!("{f}.")))
            })
            .filter(|key| saved.get(*key) != new.get(*key) && key.as_str() != "data.rebuild_cache")
            .map(|key| {
                let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(unset)".into());
                (key.clone(), show(saved.get(key)), show(new.get(key)))
            })
            .collect()
    }

    /// The config as TOML, as saved in the run directory.
    pub fn to_toml(&self) -> Result<String, TrainError> {
        toml::to_string_pretty(self).map_err(|e| TrainError::Config {
            key: "config".to_string(),
            reason: format!("cannot be written as TOML: {e}"),
        })
    }

    /// Rejects impossible values, naming the key.
    pub fn validate(&self) -> Result<(), TrainError> {
        self.optimizer.validate()?;
        self.schedule.validate()?;
        self.validate_masking()?;
        self.validate_training()?;
        self.validate_data()?;
        self.validate_sources()?;
        self.validate_eval()?;
        self.validate_model()
    }

    fn validate_masking(&self) -> Result<(), TrainError> {
        self.masking.validate().map_err(|e| TrainError::Config {
            key: "masking".to_string(),
            reason: e.to_string(),
        })?;
        if self.masking.probability == 0.0 {
            return bad(
                "masking.probability",
                "0 masks no token, so no step could learn anything; use e.g. 0.15",
            );
        }
        Ok(())
    }

    fn validate_training(&self) -> Result<(), TrainError> {
        if self.training.batch_size == 0 {
            return bad("training.batch_size", "must be at least 1");
        }
        if self.training.grad_accum_steps == 0 {
            return bad("training.grad_accum_steps", "must be at least 1");
        }
        match (
            self.training.batch_size_warmup_tokens,
            self.training.batch_size_warmup_min_size,
        ) {
            (Some(0), _) => {
                return bad(
                    "training.batch_size_warmup_tokens",
                    "must be at least 1 (leave it out for no batch-size warmup)",
                );
            }
            (None, Some(_)) => {
                return bad(
                    "training.batch_size_warmup_min_size",
                    "applies only with training.batch_size_warmup_tokens; set that too",
                );
            }
            (Some(_), Some(min)) if min == 0 || min > self.training.batch_size => {
                return bad(
                    "training.batch_size_warmup_min_size",
                    format!(
                        "{min} must be between 1 and training.batch_size ({})",
                        self.training.batch_size
                    ),
                );
            }
            _ => {}
        }
        match (self.training.max_steps, self.training.epochs) {
            (None, None) => bad(
                "training.max_steps",
                "give max_steps or epochs to say how long to train",
            ),
            (Some(0), _) => bad("training.max_steps", "must be at least 1"),
            (_, Some(e)) if e.is_nan() || e <= 0.0 => {
                bad("training.epochs", format!("{e} must be positive"))
            }
            _ => Ok(()),
        }
    }

    fn validate_data(&self) -> Result<(), TrainError> {
        let data = &self.data;
        if data.cache.is_none() && data.inputs.is_empty() {
            return bad(
                "data.cache",
                "give a prepared cache (data.cache) or a corpus (data.inputs + data.tokenizer)",
            );
        }
        if !data.inputs.is_empty() && data.tokenizer.is_none() {
            return bad(
                "data.tokenizer",
                "data.inputs needs a tokenizer folder to prepare the corpus",
            );
        }
        Ok(())
    }

    fn validate_sources(&self) -> Result<(), TrainError> {
        let data = &self.data;
        let mut names = std::collections::BTreeSet::new();
        for (i, source) in data.sources.iter().enumerate() {
            source.validate(i)?;
            if !names.insert(source.name.as_str()) {
                return bad(
                    &format!("data.sources[{i}].name"),
                    format!("{:?} names two sources", source.name),
                );
            }
        }
        if data.sources.is_empty() {
            return Ok(());
        }
        if !data.inputs.is_empty() {
            return bad(
                "data.sources",
                "give either data.inputs or data.sources (a source per corpus), not both",
            );
        }
        if !data.validation_inputs.is_empty() {
            return bad(
                "data.validation_inputs",
                "with data.sources each source holds out data.validation_split of its own \
                 documents; give separate held-out files as [eval] sets instead",
            );
        }
        if data.tokenizer.is_none() {
            return bad(
                "data.tokenizer",
                "data.sources needs a tokenizer folder to prepare the corpora",
            );
        }
        Ok(())
    }

    fn validate_eval(&self) -> Result<(), TrainError> {
        for (name, inputs) in &self.eval.sets {
            if !is_folder_name(name) || name == VALIDATION {
                return bad(
                    &format!("eval.sets.{name}"),
                    format!(
                        "a set name is letters, digits, '_' or '-' (it names a cache folder and \
                         metric keys), and not \"{VALIDATION}\", which is the data's own split"
                    ),
                );
            }
            if inputs.to_vec().is_empty() {
                return bad(
                    &format!("eval.sets.{name}"),
                    "give a file, folder or glob (or a list of them)",
                );
            }
        }
        if let Some(best) = &self.eval.best
            && best != VALIDATION
            && !self.eval.sets.contains_key(best)
        {
            let names: Vec<&str> = std::iter::once(VALIDATION)
                .chain(self.eval.sets.keys().map(String::as_str))
                .collect();
            return bad(
                "eval.best",
                format!(
                    "{best:?} is not an eval set; use one of {}",
                    names.join(", ")
                ),
            );
        }
        if !(self.eval.min_delta >= 0.0 && self.eval.min_delta.is_finite()) {
            return bad(
                "eval.min_delta",
                format!("{} must be a finite number >= 0", self.eval.min_delta),
            );
        }
        if let Some(path) = &self.eval.probes
            && !path.is_file()
        {
            return bad("eval.probes", format!("{} is not a file", path.display()));
        }
        Ok(())
    }

    fn validate_model(&self) -> Result<(), TrainError> {
        // A model id is resolved (and downloaded) when the run opens, not here.
        if let Some(path) = &self.model.init_from
            && !path.exists()
            && let Some(id) = path.to_str()
            && let Err(reason) = masklm_hub::ModelId::parse(id)
        {
            return bad(
                "model.init_from",
                format!(
                    "{} does not exist, and is not a Hugging Face model id either ({reason})",
                    path.display()
                ),
            );
        }
        let family = self.family()?;
        if self.model.init_from.is_some() {
            // The family is the loaded folder's; open_model checks the keys against it.
            let dropout: Vec<&str> = Family::ALL
                .iter()
                .flat_map(|&f| ModelConfig::default_for(f).dropout_keys())
                .copied()
                .collect();
            if let Some(key) = self
                .model
                .config
                .keys()
                .find(|k| !dropout.contains(&k.as_str()))
            {
                return bad(
                    &format!("model.{key}"),
                    format!(
                        "cannot change the architecture of a model loaded with init_from; only \
                         its dropout may be set ({})",
                        Family::ALL
                            .iter()
                            .map(|&f| format!(
                                "{}: {}",
                                f.name(),
                                ModelConfig::default_for(f).dropout_keys().join(", ")
                            ))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                );
            }
            return Ok(());
        }
        let allowed = ModelConfig::accepted_keys(family);
        if let Some(key) = self.model.config.keys().find(|k| !allowed.contains(k)) {
            return bad(
                &format!("model.{key}"),
                format!(
                    "unknown key for a {} model; [model] takes Hugging Face config.json keys \
                     (hidden_size, num_hidden_layers, ...), model_type, or init_from",
                    family.name()
                ),
            );
        }
        Ok(())
    }

    /// The family `[model] model_type` names (RoBERTa when it names none).
    pub fn family(&self) -> Result<Family, TrainError> {
        match self.model.config.get("model_type") {
            None => Ok(Family::Roberta),
            Some(toml::Value::String(name)) => {
                Family::of_model_type(name).ok_or_else(|| TrainError::Config {
                    key: "model.model_type".to_string(),
                    reason: format!(
                        "{name:?} is not a family masklm knows; it trains {}",
                        Family::known_model_types()
                    ),
                })
            }
            Some(other) => Err(TrainError::Config {
                key: "model.model_type".to_string(),
                reason: format!("{other} is not a string; write e.g. model_type = \"roberta\""),
            }),
        }
    }

    /// The model config for training from scratch: `[model]`'s keys, with `vocab_size` and the
    /// special-token ids from the tokenizer where the file does not give them.
    pub fn model_config(
        &self,
        tokenizer_vocab: usize,
        specials: SpecialIds,
    ) -> Result<ModelConfig, TrainError> {
        let mut json =
            serde_json::to_value(&self.model.config).map_err(|e| TrainError::Config {
                key: "model".to_string(),
                reason: e.to_string(),
            })?;
        if let Some(object) = json.as_object_mut() {
            object
                .entry("vocab_size")
                .or_insert(serde_json::Value::from(tokenizer_vocab));
            for (key, id) in ModelConfig::special_token_keys(self.family()?, specials) {
                object.entry(key).or_insert(serde_json::Value::from(id));
            }
        }
        let text = json.to_string();
        ModelConfig::from_json(&text).map_err(|e| TrainError::Config {
            key: "model".to_string(),
            reason: e.to_string(),
        })
    }
}

/// Applies `section.key=value` (value in TOML syntax; bare words are strings).
pub fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<(), TrainError> {
    let bad = |reason: String| TrainError::Override {
        assignment: assignment.to_string(),
        reason,
    };
    let (path, raw) = assignment
        .split_once('=')
        .ok_or_else(|| bad("expected section.key=value".to_string()))?;
    let value: toml::Value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let keys: Vec<&str> = path.trim().split('.').collect();
    let (last, parents) = keys
        .split_last()
        .ok_or_else(|| bad("empty key".to_string()))?;
    let mut current = table;
    for key in parents {
        current = current
            .entry(key.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .ok_or_else(|| bad(format!("{key} is not a section")))?;
    }
    current.insert(last.to_string(), value);
    Ok(())
}

/// `table.key = value` pairs of a TOML value, with dotted keys.
fn flatten(
    prefix: &str,
    value: &toml::Value,
    out: &mut std::collections::BTreeMap<String, String>,
) {
    match value {
        toml::Value::Table(table) => {
            for (key, value) in table {
                let key = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten(&key, value, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        seed = 1
        [model]
        hidden_size = 32
        num_attention_heads = 2
        [data]
        cache = "cache"
        [optimizer]
        lr = 1e-3
        [training]
        batch_size = 4
        max_steps = 10
    "#;

    fn parse(text: &str, overrides: &[&str]) -> Result<TrainConfig, TrainError> {
        let mut table: toml::Table = text.parse().unwrap();
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        TrainConfig::from_table(table)
    }

    #[test]
    fn parses_and_overrides() {
        let config = parse(
            BASE,
            &[
                "optimizer.lr=5e-4",
                "training.max_steps=3",
                "data.packing=\"line\"",
            ],
        )
        .unwrap();
        assert_eq!(config.optimizer.lr, 5e-4);
        assert_eq!(config.training.max_steps, Some(3));
        assert_eq!(config.data.packing, Packing::Line);
        let model = config
            .model_config(
                300,
                SpecialIds {
                    pad: 1,
                    start: 0,
                    end: 2,
                },
            )
            .unwrap();
        assert_eq!(model.vocab_size(), 300);
        assert_eq!(model.hidden_size(), 32);
    }

    #[test]
    fn bad_configs_name_the_key() {
        let msg = parse(BASE, &["optimizer.lr=0"]).unwrap_err().to_string();
        assert!(msg.contains("optimizer.lr"), "{msg}");
        let msg = parse(BASE, &["optimizer.learning_rate=1"])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("learning_rate"), "{msg}");
        let msg = parse(BASE, &["training.batch_size=\"big\""])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("batch_size") && msg.contains("invalid type"),
            "{msg}"
        );
        let msg = parse(BASE, &["model.hidden_sise=3"])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("model.hidden_sise"), "{msg}");
        let msg = parse(&BASE.replace("cache = \"cache\"", ""), &[])
            .unwrap_err()
            .to_string();
        assert!(msg.contains("data.cache"), "{msg}");
        let msg = parse(BASE, &["model.init_from=\"/nonexistent/dir\""])
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("model.init_from") && msg.contains("does not exist"),
            "{msg}"
        );
        let msg = parse(BASE, &["nokey"]).unwrap_err().to_string();
        assert!(msg.contains("section.key=value"), "{msg}");
    }

    #[test]
    fn masking_strategy_is_one_key_and_the_old_whole_word_flag_still_loads() {
        use masklm_data::{MaskingStrategy, SpanLengths};
        let strategy = |sets: &[&str]| parse(BASE, sets).map(|c| c.masking.strategy);
        assert_eq!(strategy(&[]).unwrap(), MaskingStrategy::Token);
        assert_eq!(
            strategy(&["masking.strategy=\"whole_word\""]).unwrap(),
            MaskingStrategy::WholeWord
        );
        assert_eq!(
            strategy(&["masking.strategy=\"span\""]).unwrap(),
            MaskingStrategy::Span(SpanLengths::default())
        );
        assert_eq!(
            strategy(&[
                "masking.strategy=\"span\"",
                "masking.span_geometric_p=0.4",
                "masking.span_max_length=5"
            ])
            .unwrap(),
            MaskingStrategy::Span(SpanLengths {
                geometric_p: 0.4,
                min_length: 1,
                max_length: 5
            })
        );

        // A run saved before `strategy` existed says `whole_word = true/false`: it loads as
        // the same strategy, is written back with `strategy`, and resumes (no frozen key
        // differs from the same config spelled the new way).
        for (flag, name, expected) in [
            (true, "whole_word", MaskingStrategy::WholeWord),
            (false, "token", MaskingStrategy::Token),
        ] {
            let old = parse(BASE, &[&format!("masking.whole_word={flag}")]).unwrap();
            assert_eq!(old.masking.strategy, expected);
            let new = parse(BASE, &[&format!("masking.strategy=\"{name}\"")]).unwrap();
            assert!(old.frozen_differences(&new).is_empty());
            let written = old.to_toml().unwrap();
            assert!(
                written.contains(&format!("strategy = \"{name}\""))
                    && !written.contains("whole_word ="),
                "{written}"
            );
            assert_eq!(
                TrainConfig::from_table(written.parse().unwrap()).unwrap(),
                old
            );
            // Both spellings, agreeing, are accepted.
            let both = [
                format!("masking.whole_word={flag}"),
                format!("masking.strategy=\"{name}\""),
            ];
            let both: Vec<&str> = both.iter().map(String::as_str).collect();
            assert_eq!(strategy(&both).unwrap(), expected);
        }
        // A span run's lengths are written out, so a resume compares them.
        let span = parse(BASE, &["masking.strategy=\"span\""]).unwrap();
        let written = span.to_toml().unwrap();
        assert!(written.contains("span_geometric_p = 0.2"), "{written}");
        let longer = parse(
            BASE,
            &["masking.strategy=\"span\"", "masking.span_max_length=12"],
        )
        .unwrap();
        let diff = span.frozen_differences(&longer);
        assert_eq!(
            diff,
            [(
                "masking.span_max_length".to_string(),
                "10".to_string(),
                "12".to_string()
            )]
        );
    }

    #[test]
    fn bad_masking_strategies_name_the_key_and_the_fix() {
        let msg = |sets: &[&str]| parse(BASE, sets).unwrap_err().to_string();
        let m = msg(&["masking.strategy=\"spans\""]);
        assert!(m.contains("spans") && m.contains("`span`"), "{m}");
        let m = msg(&["masking.whole_word=true", "masking.strategy=\"span\""]);
        assert!(
            m.contains("masking.whole_word") && m.contains("remove `whole_word`"),
            "{m}"
        );
        let m = msg(&["masking.span_geometric_p=0.3"]);
        assert!(
            m.contains("masking.span_geometric_p") && m.contains("strategy = \"span\""),
            "{m}"
        );
        let m = msg(&[
            "masking.strategy=\"whole_word\"",
            "masking.span_max_length=3",
        ]);
        assert!(m.contains("masking.span_max_length"), "{m}");
        for (set, key) in [
            ("masking.span_geometric_p=0", "masking.span_geometric_p"),
            ("masking.span_geometric_p=1.5", "masking.span_geometric_p"),
            ("masking.span_min_length=0", "masking.span_min_length"),
            ("masking.span_min_length=11", "masking.span_max_length"),
            ("masking.span_max_length=-1", "span_max_length"),
        ] {
            let m = msg(&["masking.strategy=\"span\"", set]);
            assert!(m.contains(key), "{set}: {m}");
        }
    }
}
