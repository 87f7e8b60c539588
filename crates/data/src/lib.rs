//! From raw text to masked training batches.
//!
//! The pipeline, one module per stage:
//!
//! 1. [`corpus`]: find input files (files, directories, globs), read plain text, JSON Lines,
//!    gzip or zstd as a stream of documents.
//! 2. [`tokenizer`]: train a tokenizer (byte-level BPE as RoBERTa, WordPiece as BERT, or
//!    Unigram as XLM-R), or load one.
//! 3. [`cache`]: tokenize in parallel, pack into blocks (`full` or `line`), and write a
//!    memory-mappable token cache with a manifest.
//! 4. [`masking`]: dynamic masking, a pure function of (tokens, seed, epoch, index).
//! 5. [`batch`]: masked examples padded into batch tensors, and the order an epoch visits them.
//! 6. [`sampler`]: the masked micro-batches of each optimizer step, a pure function of
//!    (seed, step).

pub mod batch;
pub mod cache;
pub mod corpus;
pub mod datasets;
pub mod lock;
pub mod masking;
pub mod sampler;
pub mod sniff;
mod structured;
pub mod tokenizer;
pub mod vocab;

use std::path::PathBuf;

pub use batch::{
    MlmBatch, MlmBatcher, Sample, collate, collate_packed, epoch_order, length_grouped,
};
pub use cache::{
    Manifest, NoProgress, Packing, PrepareOptions, Prepared, Progress, Rebuild, SplitReader, Stale,
    Validation, prepare, prepare_with, read_manifest, write_synced,
};
pub use corpus::{
    CorpusOptions, CorpusStats, Documents, resolve_corpus_inputs, resolve_inputs,
    resolve_inputs_reporting,
};
pub use lock::{FolderLock, lock_file, lock_folder};
pub use masking::{
    MaskVocab, MaskedExample, MaskingConfig, MaskingStrategy, SpanLengths, WordBoundary,
    mask_tokens,
};
pub use sampler::{StepBatches, StepSampler, source_seed};
pub use tokenizer::{MlmTokenizer, TokenizerModel, TrainOptions, load_tokenizer, train_tokenizer};

pub use masklm_splitmix::splitmix64;

/// Formats `path` or `path:line`.
fn at(path: &std::path::Path, line: &Option<u64>) -> String {
    match line {
        Some(line) => format!("{}:{line}", path.display()),
        None => path.display().to_string(),
    }
}

/// Errors of the data pipeline.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A configuration value is impossible.
    #[error("invalid `{key}`: {reason}")]
    Config { key: String, reason: String },
    /// The tokenizer cannot be used as configured.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The inputs name nothing readable, or hold no text.
    #[error("{0}")]
    Input(String),
    /// A file could not be read (missing, permissions, truncated compressed stream).
    #[error("cannot read {}: {source}", at(path, line))]
    Read {
        path: PathBuf,
        line: Option<u64>,
        #[source]
        source: std::io::Error,
    },
    /// A file could not be written (disk full, permissions).
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A line is not UTF-8 and `--strict` is on.
    #[error("{}:{line}: not UTF-8 (invalid byte at column {column}); convert the file to UTF-8, or drop --strict to skip such lines", path.display())]
    NotUtf8 {
        path: PathBuf,
        line: u64,
        column: usize,
    },
    /// A line holds a NUL byte (binary data, or a file padded with zeros) and `--strict` is
    /// on.
    #[error("{}:{line}: a NUL byte at column {column}: not text (binary data, or a file cut short and padded with zeros); remove those bytes, or drop --strict to skip such lines", path.display())]
    NulByte {
        path: PathBuf,
        line: u64,
        column: usize,
    },
    /// A file is UTF-16/32 or binary, found by its first bytes.
    #[error("{}: {}; masklm reads UTF-8 text: {}", path.display(), kind.what(), kind.fix(path))]
    NotText { path: PathBuf, kind: sniff::NotText },
    /// An example index past the end of a split.
    #[error("example {index} is out of range: the split has {len}")]
    OutOfRange { index: usize, len: usize },
    /// A token cache is damaged or not a cache.
    #[error("{}: {reason}", path.display())]
    Cache { path: PathBuf, reason: String },
    /// An existing cache does not match and [`cache::Rebuild::Refuse`] forbade rebuilding it.
    #[error("{} was prepared differently and was left as it is: {reason}; rebuilding it would change the examples of every run that uses it, so they could no longer resume: give this run another cache folder, or allow the rebuild", path.display())]
    WouldRebuild { path: PathBuf, reason: cache::Stale },
    /// Another process is using a run or cache folder.
    #[error("{} is in use by {holder} (another masklm {what}); wait for it to finish or stop it, or use another folder", path.display())]
    Locked {
        path: PathBuf,
        what: String,
        holder: String,
    },
    /// A Parquet or JSON-array record is malformed, lacks the text column, or the file is
    /// damaged.
    #[error("{}{}: {reason}", path.display(), record.map(|r| format!(": row {r}")).unwrap_or_default())]
    Record {
        path: PathBuf,
        /// 1-based row (Parquet), when known.
        record: Option<u64>,
        reason: String,
    },
    /// A JSON Lines record is malformed or lacks the text field.
    #[error("{}:{line}: {reason}", path.display())]
    Json {
        path: PathBuf,
        line: u64,
        reason: String,
    },
}
