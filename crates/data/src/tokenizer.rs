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
use tokenizers::models::ModelWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder};

use crate::{DataError, MaskVocab, WordBoundary};

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
    /// Largest token id + 1 (ids may have gaps, so this can exceed the number of tokens).
    id_space: usize,
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
    options.validate()?;
    if out.is_file() {
        return Err(DataError::Config {
            key: "out".to_string(),
            reason: format!(
                "{} is a file; give a folder for the tokenizer",
                out.display()
            ),
        });
    }
    let min_vocab = SPECIAL_TOKENS.len() + ByteLevel::alphabet().len();
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
    // A `json!` value always serialises; `to_string` of a Value cannot fail.
    let text = format!("{value:#}\n");
    std::fs::write(path, text).map_err(|source| DataError::Write {
        path: path.to_path_buf(),
        source,
    })
}

impl TrainOptions {
    /// Rejects vocabulary sizes no byte-level BPE can have, before any text is read.
    pub fn validate(&self) -> Result<(), DataError> {
        let min_vocab = SPECIAL_TOKENS.len() + ByteLevel::alphabet().len();
        if self.vocab_size < min_vocab {
            return Err(DataError::Config {
                key: "vocab_size".to_string(),
                reason: format!(
                    "{} is too small: the 5 special tokens and 256 byte symbols alone take {min_vocab}",
                    self.vocab_size
                ),
            });
        }
        // The same bound as a model's vocab_size (masklm-model): far above any real tokenizer.
        if self.vocab_size > 1 << 24 {
            return Err(DataError::Config {
                key: "vocab_size".to_string(),
                reason: format!(
                    "{} is beyond any sane vocabulary (at most {}); typical sizes are 30000-250000",
                    self.vocab_size,
                    1 << 24
                ),
            });
        }
        Ok(())
    }
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
    // tokenizer_config.json is optional (many tokenizer.json-only folders work), but one that
    // is there must parse: silently ignoring it would lose its mask token.
    let config_path = dir.join("tokenizer_config.json");
    let config: serde_json::Value = match std::fs::read_to_string(&config_path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| {
            DataError::Tokenizer(format!("{}: not valid JSON: {e}", config_path.display()))
        })?,
        Err(_) => serde_json::Value::Null,
    };
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
    let id_space = tokenizer
        .get_vocab(true)
        .values()
        .max()
        .map_or(0, |&id| id as usize + 1);
    Ok(MlmTokenizer {
        id_space,
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
    /// The size of the id space: largest token id (added tokens included) + 1. This, not the
    /// number of tokens, is what sizes a model's embedding table, the cache's id width and the
    /// masker's tables, since a tokenizer's ids may have gaps.
    pub fn vocab_size(&self) -> usize {
        self.id_space
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

    /// How this tokenizer marks words, from its model type: WordPiece (and BPE with a
    /// continuing-subword prefix) mark continuations (`##`); byte-level BPE, Unigram and
    /// WordLevel mark word starts (`Ġ`, `▁`).
    pub fn word_boundary(&self) -> WordBoundary {
        match self.tokenizer.get_model() {
            ModelWrapper::WordPiece(wp) => {
                WordBoundary::ContinuationPrefix(wp.continuing_subword_prefix.clone())
            }
            ModelWrapper::BPE(bpe) => match bpe.get_continuing_subword_prefix() {
                Some(prefix) => WordBoundary::ContinuationPrefix(prefix.clone()),
                None => WordBoundary::StartMarkers(vec!['Ġ', '▁']),
            },
            ModelWrapper::Unigram(_) | ModelWrapper::WordLevel(_) => {
                WordBoundary::StartMarkers(vec!['Ġ', '▁'])
            }
        }
    }

    /// The tables the masker needs.
    pub fn mask_vocab(&self) -> Result<MaskVocab, DataError> {
        let n = self.vocab_size();
        let tokens: Vec<Option<String>> = (0..n as u32).map(|id| self.id_to_token(id)).collect();
        MaskVocab::new(
            &tokens,
            &self.special_ids(),
            self.mask_id,
            self.pad_id,
            &self.word_boundary(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> MlmTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer-go");
        load_tokenizer(&dir).unwrap()
    }

    #[test]
    fn whole_words_follow_the_model_type_not_the_spelling() {
        // A byte-level BPE vocabulary that happens to hold `##` tokens (code, markdown) is
        // still byte-level: `Ġ` starts words, and a token without it continues one.
        let mut tokenizer = fixture();
        tokenizer
            .tokenizer
            .add_tokens([
                AddedToken::from("##", false),
                AddedToken::from("##x", false),
            ])
            .unwrap();
        tokenizer.id_space = tokenizer
            .tokenizer
            .get_vocab(true)
            .values()
            .max()
            .map_or(0, |&id| id as usize + 1);
        assert_eq!(
            tokenizer.word_boundary(),
            WordBoundary::StartMarkers(vec!['Ġ', '▁'])
        );
        let vocab = tokenizer.mask_vocab().unwrap();
        let id = |t: &str| tokenizer.tokenizer.token_to_id(t).unwrap();
        let (start, inner) = (id("Ġthe"), id("tion"));
        assert!(vocab.starts_word(start));
        assert!(!vocab.starts_word(inner), "`tion` continues a word");

        // A WordPiece model marks continuations instead.
        let bert = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bert-tiny");
        let bert = load_tokenizer(&bert).unwrap();
        assert_eq!(
            bert.word_boundary(),
            WordBoundary::ContinuationPrefix("##".to_string())
        );
    }

    #[test]
    fn the_id_space_is_the_largest_id_plus_one_and_gaps_are_never_drawn() {
        // tokenizer.json with a gap: the fixture's `Ġthe` moved from its id to 70000.
        let dir = tempfile::tempdir().unwrap();
        let base = fixture();
        let mut json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(base.dir.join("tokenizer.json")).unwrap(),
        )
        .unwrap();
        let old = json["model"]["vocab"]["Ġthe"].as_u64().unwrap() as u32;
        json["model"]["vocab"]["Ġthe"] = serde_json::json!(70000);
        std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
        let tokenizer = load_tokenizer(dir.path()).unwrap();
        assert_eq!(tokenizer.vocab_size(), 70001);
        assert!(tokenizer.tokenizer.get_vocab_size(true) < 70001);
        let vocab = tokenizer.mask_vocab().unwrap();
        assert!(!vocab.is_special(70000), "the far token can be masked");
        assert_eq!(tokenizer.encode("a the").unwrap()[2], 70000);
        assert!(vocab.is_special(60000), "a gap is never masked nor drawn");
        assert!(vocab.is_special(old), "nor is the hole left behind");

        // Its cache holds u32 ids, and the far id reads back whole.
        for file in ["tokenizer_config.json", "special_tokens_map.json"] {
            std::fs::copy(base.dir.join(file), dir.path().join(file)).unwrap();
        }
        let tokenizer = load_tokenizer(dir.path()).unwrap();
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(&corpus, "a cell divides the cell\n".repeat(50)).unwrap();
        let options = crate::PrepareOptions {
            max_seq_length: 16,
            packing: crate::Packing::Full,
            validation: crate::Validation::None,
            corpus: crate::CorpusOptions::default(),
        };
        let cache = dir.path().join("cache");
        let inputs = [corpus.display().to_string()];
        let prepared =
            crate::prepare(&tokenizer, &inputs, &options, &cache, &crate::NoProgress).unwrap();
        assert_eq!(prepared.manifest.dtype, "u32");
        assert_eq!(prepared.manifest.vocab_size, 70001);
        let split = crate::SplitReader::open(&cache, &prepared.manifest, "train").unwrap();
        assert!(split.get(0).unwrap().contains(&70000));
    }
}
