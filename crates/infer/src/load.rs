//! Loading a model for inference from whatever path a user gives (a masklm checkpoint, its run
//! folder, a `best`/`latest` pointer, a Hugging Face folder, or a Hub model id such as
//! `FacebookAI/roberta-base@main`, found in or downloaded into the Hub cache by
//! [`masklm_hub::resolve_model`]), with the tokenizer beside its weights. Every front end
//! (fill-mask, eval, probes, the server, export, inspect, vocabulary extension, a run's
//! `init_from`) loads through [`Source`].

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use masklm_data::{MlmTokenizer, load_tokenizer};
use masklm_hub::{HubError, LoadReport, Need};
use masklm_model::{ConfigError, MaskedLm, ModelConfig};

use crate::InferError;
use crate::checkpoint::{is_checkpoint, resolve_checkpoint};

/// A model folder opened for loading: resolved, a checkpoint's checksums verified, its
/// config.json read and validated; no weight read yet. A caller can look at [`Source::config`]
/// (and replace keys with [`Source::with_keys`]) before paying for the weights.
#[derive(Debug, Clone)]
pub struct Source {
    dir: PathBuf,
    config: ModelConfig,
    checkpoint: bool,
}

/// Where the weights came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// A masklm checkpoint (`model.bpk`, stored in f32).
    Checkpoint,
    /// A Hugging Face folder: its weights file, the tensors no parameter took, stored dtypes.
    Hub(LoadReport),
}

/// A model loaded for inference, with its tokenizer (`T = ()`: loaded without one, see
/// [`Source::load_model`]).
pub struct Loaded<T = MlmTokenizer> {
    /// The folder it came from (a `best`/`latest` pointer or a run folder resolved to its
    /// checkpoint); its tokenizer files sit beside the weights.
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub model: MaskedLm,
    pub tokenizer: T,
    pub origin: Origin,
}

impl<T> Loaded<T> {
    /// Tensors of a Hugging Face weight file that no parameter took (none for a checkpoint).
    pub fn unused(&self) -> &[String] {
        match &self.origin {
            Origin::Checkpoint => &[],
            Origin::Hub(report) => &report.unexpected,
        }
    }
}

/// Loads a masklm checkpoint (a step folder, its run folder, or a `best`/`latest` pointer), a
/// Hugging Face folder or a Hub model id, and the tokenizer beside its weights, checked to fit
/// the model.
pub fn load(path: &Path, device: &Device) -> Result<Loaded, InferError> {
    Source::open(path)?.load(device)
}

/// [`load`] without the tokenizer: for token ids, export and inspection.
pub fn load_model(path: &Path, device: &Device) -> Result<Loaded<()>, InferError> {
    Source::open(path)?.load_model(device)
}

impl Source {
    /// Resolves `path` (a model id to its Hub cache snapshot, see
    /// [`masklm_hub::resolve_model`]; a run folder or pointer to its checkpoint, see
    /// [`resolve_checkpoint`]) and reads its config: a checkpoint's after verifying its
    /// checksums, a Hugging Face folder's by its `model_type`.
    pub fn open(path: &Path) -> Result<Self, InferError> {
        let dir = masklm_hub::resolve_model(path, Need::Model).map_err(HubError::from)?;
        let dir = resolve_checkpoint(&dir);
        let checkpoint = is_checkpoint(&dir);
        let config = if checkpoint {
            crate::checkpoint::read_config(&dir)?
        } else {
            masklm_hub::read_config(&dir)?
        };
        Ok(Source {
            dir,
            config,
            checkpoint,
        })
    }

    /// The folder the weights are in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Whether this is a masklm checkpoint (not a Hugging Face folder).
    pub fn is_checkpoint(&self) -> bool {
        self.checkpoint
    }

    /// The same source with `keys` of its config replaced (a continuing run's dropout).
    pub fn with_keys(
        mut self,
        keys: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, ConfigError> {
        if !keys.is_empty() {
            self.config = self.config.with_keys(keys)?;
        }
        Ok(self)
    }

    /// Loads the weights onto `device`, and the tokenizer beside them (checked to fit).
    pub fn load(self, device: &Device) -> Result<Loaded, InferError> {
        let loaded = self.load_model(device)?;
        let tokenizer = load_tokenizer(&loaded.dir).map_err(InferError::Tokenizer)?;
        check_tokenizer_fits(&tokenizer, &loaded.config)?;
        Ok(Loaded {
            dir: loaded.dir,
            config: loaded.config,
            model: loaded.model,
            tokenizer,
            origin: loaded.origin,
        })
    }

    /// Loads the weights onto `device`, without the tokenizer.
    pub fn load_model(self, device: &Device) -> Result<Loaded<()>, InferError> {
        let Source {
            dir,
            config,
            checkpoint,
        } = self;
        let (model, origin) = if checkpoint {
            let model = crate::checkpoint::load_weights(&dir, &config, device)?;
            (model, Origin::Checkpoint)
        } else {
            masklm_hub::check_weights(&config, &dir)?;
            let mut model = MaskedLm::new(&config, device).map_err(HubError::from)?;
            let report = masklm_hub::load_weights(&mut model, &dir)?;
            (model, Origin::Hub(report))
        };
        Ok(Loaded {
            dir,
            config,
            model,
            tokenizer: (),
            origin,
        })
    }
}

/// Every id the tokenizer can produce must index the model's embedding table.
pub fn check_tokenizer_fits(
    tokenizer: &MlmTokenizer,
    config: &ModelConfig,
) -> Result<(), InferError> {
    if tokenizer.vocab_size() > config.vocab_size() {
        return Err(InferError::TokenizerTooLarge {
            dir: tokenizer.dir.clone(),
            tokenizer_vocab: tokenizer.vocab_size(),
            model_vocab: config.vocab_size(),
        });
    }
    Ok(())
}
