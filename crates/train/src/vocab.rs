//! Vocabulary extension of a model: new tokens in its tokenizer (see
//! [`masklm_data::vocab`]), new embedding rows initialised from their old pieces, written out as
//! a Hugging Face folder that transformers and `[model] init_from` load as is.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use masklm_data::vocab::{Extension, NewToken, WordPieces, extend_tokenizer};
use masklm_data::{MlmTokenizer, lock_folder};
use serde::Serialize;
use tokenizers::models::ModelWrapper;

use crate::TrainError;

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
    /// Requested words left out, the last first, to keep within the token limit.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dropped: Vec<String>,
}

/// The words `vocab extend --add N` adds: the `ranked` candidates in order, each while the new
/// tokens it needs fit in what is left of `max_tokens`, and apart the better-ranked words that
/// did not fit. A WordPiece word needs one token; a BPE word of P pieces up to P - 1 (the
/// prefixes its merge chain builds, fewer where an earlier word built them), so one very long
/// word is skipped rather than taking the whole budget.
pub fn words_within(
    tokenizer: &MlmTokenizer,
    ranked: Vec<WordPieces>,
    max_tokens: usize,
) -> (Vec<WordPieces>, Vec<WordPieces>) {
    let wordpiece = matches!(tokenizer.tokenizer.get_model(), ModelWrapper::WordPiece(_));
    let mut left = max_tokens;
    let (mut chosen, mut skipped) = (Vec::new(), Vec::new());
    for (rank, word) in ranked.into_iter().enumerate() {
        if left == 0 {
            break;
        }
        let cost = if wordpiece {
            1
        } else {
            word.pieces.len().saturating_sub(1).max(1)
        };
        if cost <= left {
            left -= cost;
            chosen.push((rank, word));
        } else {
            skipped.push((rank, word));
        }
    }
    // Words ranked below the last chosen one would not have been added anyway.
    let last = chosen.last().map_or(0, |(rank, _)| *rank);
    let unzip = |words: Vec<(usize, WordPieces)>| words.into_iter().map(|(_, w)| w).collect();
    skipped.retain(|(rank, _)| *rank < last);
    (unzip(chosen), unzip(skipped))
}

/// The extension of `tokenizer` by `words`, dropping words from the end until it adds at most
/// `limit` tokens (estimates such as [`words_within`]'s can fall short when a later word's
/// merges pre-empt an earlier word's pair).
fn extend_within(
    tokenizer: &MlmTokenizer,
    words: &[String],
    first_id: u32,
    limit: Option<usize>,
) -> Result<(Extension, Vec<String>), TrainError> {
    let mut words = words.to_vec();
    let mut dropped = Vec::new();
    loop {
        let extension = extend_tokenizer(tokenizer, &words, first_id)?;
        match (limit, words.pop()) {
            (Some(max), Some(last)) if extension.added.len() > max => dropped.push(last),
            _ => return Ok((extension, dropped)),
        }
    }
}

/// Adds `words` to the model at `model` (a Hugging Face folder or a masklm checkpoint, with
/// its tokenizer) and writes the result to `out` as a Hugging Face folder, with
/// `vocab_extension.json` recording what was added; at most `limit` new tokens when given.
/// Old tokens keep their ids and their rows bit for bit; each new row is the mean of its old
/// pieces' rows.
///
/// `out` is locked for the whole run (a second extension onto it is refused), and its files
/// are built beside it and moved in only once all are written, so `out` never holds one run's
/// tokenizer with another's weights, nor a half-written folder.
pub fn extend_vocabulary(
    model: &Path,
    words: &[String],
    limit: Option<usize>,
    out: &Path,
    device: &Device,
) -> Result<ExtendReport, TrainError> {
    let _lock = lock_folder(out, "vocab extend")?;
    let loaded = masklm_infer::load(model, device)?;
    let tokenizer = &loaded.tokenizer;
    let old_vocab_size = loaded.config.vocab_size();
    let (extension, dropped) = extend_within(tokenizer, words, old_vocab_size as u32, limit)?;
    let sources: Vec<Vec<u32>> = extension.added.iter().map(|t| t.pieces.clone()).collect();
    let model = loaded.model.with_new_rows(&sources);
    let config = loaded
        .config
        .with_vocab_size(old_vocab_size + sources.len());
    let staging = masklm_hub::Staging::new(out)?;
    masklm_hub::export_model(&model, &config, Some(&loaded.dir), staging.path())?;
    let write =
        |name: &str, text: &str| crate::checkpoint::write_atomic(&staging.path().join(name), text);
    write("tokenizer.json", &extension.tokenizer_json)?;
    let report = ExtendReport {
        model: loaded.dir,
        out: out.to_path_buf(),
        old_vocab_size,
        new_vocab_size: config.vocab_size(),
        added: extension.added,
        already_single: extension.already_single,
        not_single: extension.not_single,
        dropped,
    };
    let json = serde_json::to_string_pretty(&report).map_err(|e| TrainError::Config {
        key: "vocab".to_string(),
        reason: e.to_string(),
    })?;
    write("vocab_extension.json", &(json + "\n"))?;
    staging.publish()?;
    Ok(report)
}
