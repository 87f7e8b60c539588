//! Tokenizers in three conventions: training and loading.
//!
//! `masklm tokenizer train --model` picks one of [`TokenizerModel`]'s families, each written
//! exactly as the Hugging Face model family it suits writes its own:
//!
//! | model       | convention | specials, ids 0..4                     | suits             |
//! |-------------|------------|----------------------------------------|-------------------|
//! | `bpe`       | RoBERTa    | `<s> <pad> </s> <unk> <mask>`          | RoBERTa, ModernBERT |
//! | `wordpiece` | BERT       | `[PAD] [UNK] [CLS] [SEP] [MASK]`       | BERT (PubMedBERT) |
//! | `unigram`   | XLM-R      | `<s> <pad> </s> <unk> <mask>`          | XLM-R, RoBERTa    |
//!
//! A trained tokenizer folder holds `tokenizer.json` (the `tokenizers` pipeline),
//! `tokenizer_config.json` and `special_tokens_map.json`, so that transformers'
//! `AutoTokenizer.from_pretrained(DIR)` loads it and encodes exactly as masklm does.
//!
//! transformers 5 does not replay a `tokenizer.json` for a named tokenizer class: it takes the
//! vocabulary and post-processor from the file and rebuilds the normalizer, pre-tokenizer and
//! decoder from the class's `__init__` (`BertTokenizer`, `XLMRobertaTokenizer`) and
//! `tokenizer_config.json`. So each pipeline here is the one that `__init__` builds, and a
//! stage it would drop is never written: see [`TokenizerModel::Unigram`] for the normalizer.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde_json::json;
use sha2::{Digest, Sha256};
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::wordpiece::WordPiece as WordPieceDecoder;
use tokenizers::models::ModelWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::models::unigram::{Unigram, UnigramTrainerBuilder, UnigramTrainerError};
use tokenizers::models::wordpiece::{WordPiece, WordPieceTrainerBuilder};
use tokenizers::normalizers::{BertNormalizer, NormalizerWrapper};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::bert::BertPreTokenizer;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::whitespace::WhitespaceSplit;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Model, Tokenizer, TokenizerBuilder, TokenizerImpl, Trainer};

use crate::{DataError, MaskVocab, WordBoundary};

/// The tokenizer model [`train_tokenizer`] learns, each in the convention of the model family
/// it is usually paired with. Special tokens always take ids 0..4, in
/// [`TokenizerModel::special_tokens`] order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TokenizerModel {
    /// Byte-level BPE as roberta-base: no normalizer, GPT-2's 256 byte symbols (`Ġ` is the
    /// space), `<s> ... </s>`, `<mask>` strips the space before it.
    #[default]
    Bpe,
    /// WordPiece as bert-base-uncased / PubMedBERT (`BertWordPieceTokenizer`): BertNormalizer
    /// (clean text, spaces around CJK characters, lowercase and accent stripping by option),
    /// BertPreTokenizer (whitespace and punctuation), `##` continuations, `[UNK]` for words it
    /// cannot spell, `[CLS] ... [SEP]`.
    WordPiece,
    /// Unigram (SentencePiece) as xlm-roberta-base: whitespace split, Metaspace (`▁` before
    /// every word, the first included), `<s> ... </s>`, `<mask>` strips the space before it.
    ///
    /// No normalizer. XLM-R's own tokenizer.json normalizes with SentencePiece's compiled
    /// `nmt_nfkc` table (a `Precompiled` charsmap, NFKC plus a few extras), which only
    /// SentencePiece's builder makes; a plain `NFKC` normalizer in its place is silently
    /// dropped by transformers 5's `XLMRobertaTokenizer` (it keeps a `Precompiled` one only),
    /// so transformers and masklm would then encode `ﬁ`, full-width letters or `①`
    /// differently. Normalize the corpus beforehand if it needs it.
    ///
    /// `<mask>` is id 4, right after `<unk>`, not last as in xlm-roberta-base (where fairseq
    /// appended it after the SentencePiece vocabulary); transformers' `XLMRobertaTokenizer`
    /// finds it by name either way, and its own empty vocabulary puts it at 4 too.
    Unigram,
}

impl TokenizerModel {
    /// Every model, in `--model` order.
    pub const ALL: [TokenizerModel; 3] = [Self::Bpe, Self::WordPiece, Self::Unigram];

    /// The `--model` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Bpe => "bpe",
            Self::WordPiece => "wordpiece",
            Self::Unigram => "unigram",
        }
    }

    /// The special tokens, in id order from 0.
    pub fn special_tokens(self) -> [&'static str; 5] {
        match self {
            Self::Bpe | Self::Unigram => ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
            Self::WordPiece => ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        }
    }

    /// The specials as the trainer adds them: RoBERTa and XLM-R's `<mask>` strips the space
    /// before it, so `"was <mask>"` gives the mask token rather than a space token + mask.
    fn added_specials(self) -> Vec<AddedToken> {
        self.special_tokens()
            .iter()
            .map(|&t| AddedToken::from(t, true).lstrip(t == "<mask>"))
            .collect()
    }

    /// The fewest tokens a vocabulary of this model can have, known before any text is read:
    /// the specials, plus BPE's 256 byte symbols. WordPiece and Unigram keep every character
    /// of the corpus, which [`train_tokenizer`] checks once it has seen them.
    fn min_vocab(self) -> usize {
        match self {
            Self::Bpe => 5 + ByteLevel::alphabet().len(),
            Self::WordPiece | Self::Unigram => 5 + 1,
        }
    }

    fn min_vocab_reason(self) -> String {
        match self {
            Self::Bpe => format!(
                "the 5 special tokens and 256 byte symbols alone take {}",
                self.min_vocab()
            ),
            Self::WordPiece | Self::Unigram => format!(
                "the 5 special tokens alone take 5, and a {} vocabulary also holds every \
                 character of the corpus",
                self.name()
            ),
        }
    }
}

impl std::fmt::Display for TokenizerModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for TokenizerModel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| format!("unknown tokenizer model {s:?}; use bpe, wordpiece or unigram"))
    }
}

/// Settings for [`train_tokenizer`]. `None` takes the model's default; a setting that does not
/// apply to the model is refused by [`TrainOptions::validate`] rather than ignored.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// Which model, and so which convention.
    pub model: TokenizerModel,
    /// Target vocabulary size, specials and the alphabet included.
    pub vocab_size: usize,
    /// Minimum pair frequency for a merge (BPE and WordPiece; default 2). Unigram has none.
    pub min_frequency: Option<u64>,
    /// WordPiece only: lowercase the text (default true, as bert-base-uncased and
    /// PubMedBERT-uncased).
    pub lowercase: Option<bool>,
    /// WordPiece only: strip accents (`é` -> `e`). `None` follows `lowercase`, as BERT does.
    pub strip_accents: Option<bool>,
    /// `model_max_length` written to tokenizer_config.json.
    pub model_max_length: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            model: TokenizerModel::Bpe,
            vocab_size: 8192,
            min_frequency: None,
            lowercase: None,
            strip_accents: None,
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

/// The generic tokenizer each family is built as before training.
type Builder<M> = TokenizerBuilder<
    M,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;
type Untrained<M> =
    TokenizerImpl<M, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>;

/// Trains a tokenizer of `options.model` on `documents` and writes it to `out`.
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
    let mut tokenizer = match options.model {
        TokenizerModel::Bpe => train_bpe(documents, options),
        TokenizerModel::WordPiece => train_wordpiece(documents, options),
        TokenizerModel::Unigram => train_unigram(documents, options),
    }
    .map_err(|e| {
        if e.downcast_ref::<UnigramTrainerError>().is_some() {
            DataError::Config {
                key: "vocab_size".to_string(),
                reason: format!(
                    "{} is too small for this corpus: a Unigram vocabulary holds every \
                     character the corpus uses, and it uses more; raise it",
                    options.vocab_size
                ),
            }
        } else {
            tokenizer_error(out, e)
        }
    })?;
    let processor = post_processor(options.model, &tokenizer)?;
    tokenizer.with_post_processor(Some(processor));
    check_learned(&tokenizer, options)?;

    std::fs::create_dir_all(out).map_err(|source| DataError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    tokenizer
        .save(out.join("tokenizer.json"), true)
        .map_err(|e| tokenizer_error(out, e))?;
    write_json(
        &out.join("tokenizer_config.json"),
        &tokenizer_config(options),
    )?;
    write_json(
        &out.join("special_tokens_map.json"),
        &special_tokens_map(options.model),
    )?;
    load_tokenizer(out)
}

/// Byte-level BPE as transformers' ByteLevelBPETokenizer / roberta-base: no prefix space,
/// offsets trimmed, all 256 byte symbols in the vocabulary.
fn train_bpe<I>(documents: I, options: &TrainOptions) -> tokenizers::Result<Tokenizer>
where
    I: Iterator<Item = String> + Send,
{
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(options.vocab_size)
        .min_frequency(options.min_frequency.unwrap_or(2))
        .special_tokens(options.model.added_specials())
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect::<HashSet<char>>())
        .build();
    let byte_level = ByteLevel::new(false, true, true);
    let tokenizer = Builder::<BPE>::new()
        .with_model(BPE::default())
        .with_pre_tokenizer(Some(byte_level.into()))
        .with_decoder(Some(byte_level.into()));
    train(tokenizer, &mut trainer, documents)
}

/// WordPiece as tokenizers' BertWordPieceTokenizer.train and transformers' BertTokenizer: at
/// most 1000 distinct characters (rarer ones become [UNK]), `##` continuations.
fn train_wordpiece<I>(documents: I, options: &TrainOptions) -> tokenizers::Result<Tokenizer>
where
    I: Iterator<Item = String> + Send,
{
    let mut trainer = WordPieceTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(options.vocab_size)
        .min_frequency(options.min_frequency.unwrap_or(2))
        .special_tokens(options.model.added_specials())
        .limit_alphabet(1000)
        .continuing_subword_prefix("##".to_string())
        .build();
    let model = WordPiece::builder()
        .unk_token("[UNK]".to_string())
        .continuing_subword_prefix("##".to_string())
        .build()?;
    // clean_text and handle_chinese_chars on, as BertTokenizer's `tokenize_chinese_chars`.
    let normalizer = BertNormalizer::new(true, true, options.strip_accents, options.lowercase());
    let tokenizer = Builder::<WordPiece>::new()
        .with_model(model)
        .with_normalizer(Some(normalizer.into()))
        .with_pre_tokenizer(Some(BertPreTokenizer.into()))
        .with_decoder(Some(WordPieceDecoder::new("##".to_string(), true).into()));
    train(tokenizer, &mut trainer, documents)
}

/// Unigram as transformers' XLMRobertaTokenizer.__init__ builds it: WhitespaceSplit, then
/// Metaspace (`▁` before every word), no normalizer (see [`TokenizerModel::Unigram`]).
fn train_unigram<I>(documents: I, options: &TrainOptions) -> tokenizers::Result<Tokenizer>
where
    I: Iterator<Item = String> + Send,
{
    let mut trainer = UnigramTrainerBuilder::default()
        .show_progress(false)
        // validate() bounds vocab_size far below u32::MAX.
        .vocab_size(u32::try_from(options.vocab_size)?)
        .special_tokens(options.model.added_specials())
        .unk_token(Some("<unk>".to_string()))
        .build()?;
    let metaspace = Metaspace::new('▁', PrependScheme::Always, true);
    let pre_tokenizer = Sequence::new(vec![WhitespaceSplit.into(), metaspace.clone().into()]);
    let tokenizer = Builder::<Unigram>::new()
        .with_model(Unigram::default())
        .with_pre_tokenizer(Some(pre_tokenizer.into()))
        .with_decoder(Some(metaspace.into()));
    train(tokenizer, &mut trainer, documents)
}

/// Builds `tokenizer`, trains it with `trainer` on `documents`, and returns it with its model
/// type erased.
fn train<M, T, I>(
    tokenizer: Builder<M>,
    trainer: &mut T,
    documents: I,
) -> tokenizers::Result<Tokenizer>
where
    M: Model<Trainer = T> + Into<ModelWrapper> + Send + Sync,
    T: Trainer<Model = M> + Sync,
    I: Iterator<Item = String> + Send,
{
    let mut tokenizer: Untrained<M> = tokenizer.build()?;
    tokenizer.train(trainer, documents)?;
    Ok(tokenizer.into())
}

/// The id of special `token` in a freshly trained tokenizer.
fn special_id(tokenizer: &Tokenizer, token: &str) -> Result<u32, DataError> {
    tokenizer
        .token_to_id(token)
        .ok_or_else(|| DataError::Tokenizer(format!("training lost the special token {token}")))
}

/// How each sequence is framed: `<s> A </s>` (pair `<s> A </s></s> B </s>`) for RoBERTa and
/// XLM-R, `[CLS] A [SEP]` (pair `[CLS] A [SEP] B [SEP]`, B with type id 1) for BERT.
fn post_processor(
    model: TokenizerModel,
    tokenizer: &Tokenizer,
) -> Result<PostProcessorWrapper, DataError> {
    let template = |single: &str, pair: &str, specials: [&str; 2]| {
        let ids = specials
            .iter()
            .map(|&t| Ok((t.to_string(), special_id(tokenizer, t)?)))
            .collect::<Result<Vec<(String, u32)>, DataError>>()?;
        let bad = |e: String| DataError::Tokenizer(format!("post-processor template: {e}"));
        TemplateProcessing::builder()
            .try_single(single)
            .map_err(bad)?
            .try_pair(pair)
            .map_err(bad)?
            .special_tokens(ids)
            .build()
            .map(PostProcessorWrapper::from)
            .map_err(|e| bad(e.to_string()))
    };
    match model {
        TokenizerModel::Bpe => Ok(RobertaProcessing::new(
            ("</s>".to_string(), special_id(tokenizer, "</s>")?),
            ("<s>".to_string(), special_id(tokenizer, "<s>")?),
        )
        .trim_offsets(true)
        .add_prefix_space(false)
        .into()),
        TokenizerModel::WordPiece => template(
            "[CLS] $A [SEP]",
            "[CLS] $A [SEP] $B:1 [SEP]:1",
            ["[CLS]", "[SEP]"],
        ),
        TokenizerModel::Unigram => {
            template("<s> $A </s>", "<s> $A </s> </s> $B </s>", ["<s>", "</s>"])
        }
    }
}

/// Refuses a vocabulary that outgrew `--vocab-size` because the corpus's alphabet alone is
/// larger, or that learned nothing beyond single characters (an empty or tiny corpus).
fn check_learned(tokenizer: &Tokenizer, options: &TrainOptions) -> Result<(), DataError> {
    let specials = options.model.special_tokens();
    let vocab = tokenizer.get_vocab(false);
    let learned = vocab
        .keys()
        .filter(|t| !specials.contains(&t.as_str()))
        .filter(|t| t.strip_prefix("##").unwrap_or(t).chars().count() > 1)
        .count();
    let size = tokenizer.get_vocab_size(true);
    if size > options.vocab_size {
        return Err(DataError::Config {
            key: "vocab_size".to_string(),
            reason: format!(
                "{} is too small for this corpus: its characters alone{} and the 5 specials take \
                 {size} {} tokens; raise it well above that",
                options.vocab_size,
                match options.model {
                    TokenizerModel::WordPiece => " (with their `##` continuation forms)",
                    _ => "",
                },
                options.model
            ),
        });
    }
    if learned == 0 {
        return Err(DataError::Tokenizer(match options.model {
            TokenizerModel::Bpe => {
                "training learned no merges: the corpus is too small or empty".to_string()
            }
            model => format!(
                "training learned no {model} pieces longer than one character: the corpus is \
                 too small or empty"
            ),
        }));
    }
    Ok(())
}

fn special_tokens_map(model: TokenizerModel) -> serde_json::Value {
    match model {
        TokenizerModel::Bpe | TokenizerModel::Unigram => json!({
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "sep_token": "</s>",
            "pad_token": "<pad>",
            "cls_token": "<s>",
            "mask_token": {"content": "<mask>", "lstrip": true, "rstrip": false,
                           "normalized": false, "single_word": false, "special": true},
        }),
        TokenizerModel::WordPiece => json!({
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
        }),
    }
}

/// tokenizer_config.json: the class transformers rebuilds the pipeline with, and the
/// arguments its `__init__` takes (which must say what tokenizer.json does).
fn tokenizer_config(options: &TrainOptions) -> serde_json::Value {
    match options.model {
        TokenizerModel::Bpe => json!({
            "tokenizer_class": "RobertaTokenizer",
            "add_prefix_space": false,
            "trim_offsets": true,
            "errors": "replace",
            "model_max_length": options.model_max_length,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "sep_token": "</s>",
            "pad_token": "<pad>",
            "cls_token": "<s>",
            "mask_token": "<mask>",
        }),
        TokenizerModel::WordPiece => json!({
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": options.lowercase(),
            "strip_accents": options.strip_accents,
            "tokenize_chinese_chars": true,
            "model_max_length": options.model_max_length,
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
        }),
        TokenizerModel::Unigram => json!({
            "tokenizer_class": "XLMRobertaTokenizer",
            "add_prefix_space": true,
            "model_max_length": options.model_max_length,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "sep_token": "</s>",
            "pad_token": "<pad>",
            "cls_token": "<s>",
            "mask_token": "<mask>",
        }),
    }
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
    /// WordPiece's lowercasing, on unless turned off.
    fn lowercase(&self) -> bool {
        self.lowercase.unwrap_or(true)
    }

    /// Rejects settings no tokenizer of `model` can have, or that do not apply to it, before
    /// any text is read. Each error's key is the option's name (`vocab_size`, `lowercase`).
    pub fn validate(&self) -> Result<(), DataError> {
        let model = self.model;
        let min_vocab = model.min_vocab();
        if self.vocab_size < min_vocab {
            return Err(DataError::Config {
                key: "vocab_size".to_string(),
                reason: format!(
                    "{} is too small: {}",
                    self.vocab_size,
                    model.min_vocab_reason()
                ),
            });
        }
        if model == TokenizerModel::Bpe && self.vocab_size == min_vocab {
            return Err(DataError::Config {
                key: "vocab_size".to_string(),
                reason: format!(
                    "{} leaves no room for merges: {}; give more",
                    self.vocab_size,
                    model.min_vocab_reason()
                ),
            });
        }
        if self.model_max_length == 0 {
            return Err(DataError::Config {
                key: "model_max_length".to_string(),
                reason: "0 tokens per input leaves no room for text; give the model's input \
                         length (e.g. 512)"
                    .to_string(),
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
        let not_for = |key: &str, what: &str| DataError::Config {
            key: key.to_string(),
            reason: format!("{what}; it does not apply to a {model} tokenizer"),
        };
        if model != TokenizerModel::WordPiece {
            if self.lowercase.is_some() {
                return Err(not_for(
                    "lowercase",
                    "lowercasing is a WordPiece (BERT) option, for --model wordpiece",
                ));
            }
            if self.strip_accents.is_some() {
                return Err(not_for(
                    "strip_accents",
                    "accent stripping is a WordPiece (BERT) option, for --model wordpiece",
                ));
            }
        }
        if model == TokenizerModel::Unigram && self.min_frequency.is_some() {
            return Err(not_for(
                "min_frequency",
                "Unigram training prunes pieces by likelihood, not by a pair count",
            ));
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
