//! Vocabulary extension of a model: new tokens in its tokenizer (see
//! [`masklm_data::vocab`]), new embedding rows initialised from their old pieces, written out as
//! a Hugging Face folder that transformers and `[model] init_from` load as is.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use masklm_data::load_tokenizer;
use masklm_data::vocab::{NewToken, extend_tokenizer};
use serde::Serialize;

use crate::{TrainError, check_tokenizer_fits, load_for_inference};

/// What [`extend_vocabulary`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ExtendReport {
    pub model: PathBuf,
    pub out: PathBuf,
    pub old_vocab_size: usize,
    pub new_vocab_size: usize,
    /// New tokens: requested words, and (BPE) the prefixes their merges build.
    pub added: Vec<NewToken>,
    pub already_single: Vec<String>,
    pub not_single: Vec<String>,
}

/// Adds `words` to the model at `model` (a Hugging Face folder or a masklm checkpoint, with
/// its tokenizer) and writes the result to `out` as a Hugging Face folder, with
/// `vocab_extension.json` recording what was added. Old tokens keep their ids and their rows
/// bit for bit; each new row is the mean of its old pieces' rows.
pub fn extend_vocabulary(
    model: &Path,
    words: &[String],
    out: &Path,
    device: &Device,
) -> Result<ExtendReport, TrainError> {
    let loaded = load_for_inference(model, device)?;
    let tokenizer = load_tokenizer(&loaded.dir)?;
    check_tokenizer_fits(&tokenizer, &loaded.config)?;
    let old_vocab_size = loaded.config.vocab_size;
    let extension = extend_tokenizer(&tokenizer, words, old_vocab_size as u32)?;
    let sources: Vec<Vec<u32>> = extension.added.iter().map(|t| t.pieces.clone()).collect();
    let model = loaded.model.with_new_rows(&sources);
    let mut config = loaded.config.clone();
    config.vocab_size = old_vocab_size + sources.len();
    masklm_hub::export_model(&model, &config, Some(&loaded.dir), out)?;
    let write = |name: &str, text: &str| crate::checkpoint::write_atomic(&out.join(name), text);
    write("tokenizer.json", &extension.tokenizer_json)?;
    let report = ExtendReport {
        model: loaded.dir,
        out: out.to_path_buf(),
        old_vocab_size,
        new_vocab_size: config.vocab_size,
        added: extension.added,
        already_single: extension.already_single,
        not_single: extension.not_single,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| TrainError::Config {
        key: "vocab".to_string(),
        reason: e.to_string(),
    })?;
    write("vocab_extension.json", &(json + "\n"))?;
    Ok(report)
}
