//! Loading a model for inference, from whatever path a user gives, and the checks every
//! inference front end (fill-mask, eval, export) needs.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use masklm_data::MlmTokenizer;
use masklm_model::{MaskedLm, ModelConfig};

use crate::TrainError;
use crate::checkpoint::{is_checkpoint, load_model, resolve_checkpoint};

/// A model loaded for inference.
pub struct Loaded {
    /// The folder it came from (a `best`/`latest` pointer or a run folder resolved to its
    /// checkpoint); its tokenizer files sit beside the weights.
    pub dir: PathBuf,
    pub config: ModelConfig,
    pub model: MaskedLm,
    /// Tensors of a Hugging Face weight file that no parameter took.
    pub unused: Vec<String>,
}

/// Loads a masklm checkpoint (a step folder, its run folder, or a `best`/`latest` pointer) or
/// a Hugging Face folder.
pub fn load_for_inference(path: &Path, device: &Device) -> Result<Loaded, TrainError> {
    let dir = resolve_checkpoint(path);
    if is_checkpoint(&dir) {
        let (config, model) = load_model(&dir, device, &Default::default())?;
        return Ok(Loaded {
            dir,
            config,
            model,
            unused: Vec::new(),
        });
    }
    let (config, model, report) = masklm_hub::load_model(&dir, device)?;
    Ok(Loaded {
        dir,
        config,
        model,
        unused: report.unexpected,
    })
}

/// Every id the tokenizer can produce must index the model's embedding table.
pub fn check_tokenizer_fits(
    tokenizer: &MlmTokenizer,
    config: &ModelConfig,
) -> Result<(), TrainError> {
    if tokenizer.vocab_size() > config.vocab_size() {
        return Err(TrainError::Config {
            key: "vocab_size".to_string(),
            reason: format!(
                "{}/tokenizer.json has ids up to {} but the model's vocab_size is {}: this \
                 tokenizer does not belong to this model",
                tokenizer.dir.display(),
                tokenizer.vocab_size() - 1,
                config.vocab_size()
            ),
        });
    }
    Ok(())
}
