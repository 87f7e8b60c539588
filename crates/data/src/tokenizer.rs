//! Byte-level BPE tokenizers in the RoBERTa convention: training and loading.
//!
//! A trained tokenizer folder holds `tokenizer.json` (the `tokenizers` pipeline),
//! `tokenizer_config.json` and `special_tokens_map.json`, so that transformers'
//! `AutoTokenizer.from_pretrained(DIR)` loads it and encodes exactly as masklm does.
//! Specials are `<s> <pad> </s> <unk> <mask>` with ids 0..4, the post-processor frames each
//! sequence as `<s> ... </s>`, and `<mask>` strips the space before it (`lstrip`), so that
//! `"The <mask> ..."` yields the mask token rather than `Ġ` + mask.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use crate::{DataError, MaskVocab};

/// The RoBERTa special tokens, in id order.
pub const SPECIAL_TOKENS: [&str; 5] = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"];

/// Settings for [`train_tokenizer`].
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Target vocabulary size, specials and the 256 byte symbols included.
    pub vocab_size: usize,
    /// Minimum pair frequency for a merge.
    pub min_frequency: u64,
    /// `model_max_length` written to tokenizer_config.json.
    pub model_max_length: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            vocab_size: 8192,
            min_frequency: 2,
            model_max_length: 512,
        }
    }
}

/// A tokenizer ready for masklm: the `tokenizers` pipeline plus the ids masking needs.
#[derive(Clone)]
pub struct MlmTokenizer {
    pub tokenizer: Tokenizer,
    /// The folder it was loaded from.
    pub dir: PathBuf,
    pub mask_token: String,
    pub mask_id: u32,
    pub pad_id: u32,
    pub bos_id: u32,
    pub eos_id: u32,
    /// SHA-256 of tokenizer.json, recorded in token caches to detect a changed tokenizer.
    pub hash: String,
}

impl std::fmt::Debug for MlmTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MlmTokenizer")
            .field("dir", &self.dir)
            .field("vocab_size", &self.vocab_size())
            .field("mask_token", &self.mask_token)
            .finish()
    }
}

fn tokenizer_error(dir: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Tokenizer(format!("{}: {e}", dir.display()))
}

/// Trains a byte-level BPE tokenizer on `documents` and writes it to `out`.
///
/// `documents` is consumed once, streaming; only the word counts are kept in memory.
pub fn train_tokenizer<I>(
    documents: I,
    options: &TrainOptions,
    out: &Path,
) -> Result<MlmTokenizer, DataError>
where
    I: Iterator<Item = String> + Send,
{
    let min_vocab = SPECIAL_TOKENS.len() + ByteLevel::alphabet().len();
    if options.vocab_size < min_vocab {
        return Err(DataError::Config {
            key: "vocab_size".to_string(),
            reason: format!(
                "{} is too small: the 5 special tokens and 256 byte symbols alone take {min_vocab}",
                options.vocab_size
            ),
        });
    }
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|&t| AddedToken::from(t, true).lstrip(t == "<mask>"))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(options.vocab_size)
        .min_frequency(options.min_frequency)
        .special_tokens(specials)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
        .build();
    // As transformers' ByteLevelBPETokenizer / roberta-base: no prefix space, offsets trimmed.
    let byte_level = ByteLevel::new(false, true, true);
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_pre_tokenizer(Some(byte_level.into()))
    .with_decoder(Some(byte_level.into()))
    .with_post_processor(Some(
        RobertaProcessing::new(("</s>".to_string(), 2), ("<s>".to_string(), 0))
            .trim_offsets(true)
            .add_prefix_space(false)
            .into(),
    ))
    .build()
    .map_err(|e| tokenizer_error(out, e))?;
    tokenizer
        .train(&mut trainer, documents)
        .map_err(|e| tokenizer_error(out, e))?;
    let tokenizer: Tokenizer = tokenizer.into();
    if tokenizer.get_vocab_size(true) <= min_vocab {
        return Err(DataError::Tokenizer(
            "training learned no merges: the corpus is too small or empty".to_string(),
        ));
    }

    std::fs::create_dir_all(out).map_err(|source| DataError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    tokenizer
        .save(out.join("tokenizer.json"), true)
        .map_err(|e| tokenizer_error(out, e))?;
    write_json(
        &out.join("tokenizer_config.json"),
        &tokenizer_config(options.model_max_length),
    )?;
    write_json(&out.join("special_tokens_map.json"), &special_tokens_map())?;
    load_tokenizer(out)
}

fn special_tokens_map() -> serde_json::Value {
    json!({
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "cls_token": "<s>",
        "mask_token": {"content": "<mask>", "lstrip": true, "rstrip": false,
                       "normalized": false, "single_word": false, "special": true},
    })
}

fn tokenizer_config(model_max_length: usize) -> serde_json::Value {
    json!({
        "tokenizer_class": "RobertaTokenizer",
        "add_prefix_space": false,
        "trim_offsets": true,
        "errors": "replace",
        "model_max_length": model_max_length,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "cls_token": "<s>",
        "mask_token": "<mask>",
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), DataError> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default() + "\n";
    std::fs::write(path, text).map_err(|source| DataError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Loads `DIR/tokenizer.json` and finds its mask, pad, bos and eos tokens.
///
/// The mask token is `tokenizer_config.json`'s `mask_token` when present, else `<mask>` or
/// `[MASK]`; a tokenizer without one is an error, since it cannot be used for MLM.
pub fn load_tokenizer(dir: &Path) -> Result<MlmTokenizer, DataError> {
    let path = dir.join("tokenizer.json");
    let bytes = std::fs::read(&path).map_err(|source| DataError::Read {
        path: path.clone(),
        line: None,
        source,
    })?;
    let tokenizer = Tokenizer::from_bytes(&bytes).map_err(|e| tokenizer_error(&path, e))?;
    let config: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default();
    let named = |key: &str| -> Option<String> {
        match config.get(key)? {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
            _ => None,
        }
    };
    let find = |key: &str, defaults: &[&str]| -> Option<(String, u32)> {
        named(key)
            .into_iter()
            .chain(defaults.iter().map(|s| s.to_string()))
            .find_map(|t| tokenizer.token_to_id(&t).map(|id| (t, id)))
    };
    let (mask_token, mask_id) = find("mask_token", &["<mask>", "[MASK]"]).ok_or_else(|| {
        DataError::Tokenizer(format!(
            "{}: no mask token (looked for tokenizer_config.json's mask_token, <mask> and [MASK]); \
             MLM needs one: train a tokenizer with `masklm tokenizer train`",
            path.display()
        ))
    })?;
    let (_, pad_id) = find("pad_token", &["<pad>", "[PAD]"]).ok_or_else(|| {
        DataError::Tokenizer(format!(
            "{}: no padding token (<pad> or [PAD])",
            path.display()
        ))
    })?;
    let (_, bos_id) = find("cls_token", &["<s>", "[CLS]"]).ok_or_else(|| {
        DataError::Tokenizer(format!("{}: no start token (<s> or [CLS])", path.display()))
    })?;
    let (_, eos_id) = find("sep_token", &["</s>", "[SEP]"]).ok_or_else(|| {
        DataError::Tokenizer(format!("{}: no end token (</s> or [SEP])", path.display()))
    })?;
    let hash = format!("{:x}", Sha256::digest(&bytes));
    Ok(MlmTokenizer {
        tokenizer,
        dir: dir.to_path_buf(),
        mask_token,
        mask_id,
        pad_id,
        bos_id,
        eos_id,
        hash,
    })
}

impl MlmTokenizer {
    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Encodes one text with the post-processor's specials (`<s> ... </s>`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, DataError> {
        self.tokenizer
            .encode(text, true)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| tokenizer_error(&self.dir, e))
    }

    /// Encodes texts in parallel, without specials (for packing).
    pub fn encode_batch_plain(&self, texts: Vec<String>) -> Result<Vec<Vec<u32>>, DataError> {
        self.tokenizer
            .encode_batch(texts, false)
            .map(|encodings| {
                encodings
                    .into_iter()
                    .map(|e| e.get_ids().to_vec())
                    .collect()
            })
            .map_err(|e| tokenizer_error(&self.dir, e))
    }

    /// The token string of `id`.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.tokenizer.id_to_token(id)
    }

    /// Ids of the special (added, special) tokens.
    pub fn special_ids(&self) -> Vec<u32> {
        self.tokenizer
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(&id, _)| id)
            .collect()
    }

    /// The tables the masker needs.
    pub fn mask_vocab(&self) -> Result<MaskVocab, DataError> {
        let n = self.vocab_size();
        let tokens: Vec<String> = (0..n as u32)
            .map(|id| self.id_to_token(id).unwrap_or_default())
            .collect();
        MaskVocab::new(&tokens, &self.special_ids(), self.mask_id, self.pad_id)
    }
}
