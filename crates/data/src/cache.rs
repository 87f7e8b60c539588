//! The token cache: a corpus tokenized once, packed into training examples, memory-mapped.
//!
//! Layout of a cache folder:
//!
//! ```text
//! manifest.json            format version, tokenizer hash, settings, sources, counts
//! train-00000.bin          tokens, little-endian u16 (vocab <= 65536) or u32, back to back
//! train-00000.idx          little-endian u64 offsets (in tokens) of each example, plus the end
//! validation-00000.bin/.idx
//! ```
//!
//! Packing `full` (HF `group_texts`, fairseq `--sample-break-mode complete`): documents are
//! concatenated, each followed by `</s>` as separator, and cut into examples of exactly
//! `max_seq_length` tokens framed as `<s> ... </s>`; the corpus's last example may be shorter.
//! Packing `line` (HF `--line_by_line`): one document per example, `<s> doc </s>`, truncated to
//! `max_seq_length`, padded per batch later.
//! Packing `documents`: the cache of `line`; training then packs several whole documents into
//! each row, none seeing another (see [`crate::StepSampler`]).
//!
//! The cache is built in `CACHE.partial` and renamed into place at the end, so an interrupted
//! run never leaves a cache that looks complete. A run whose manifest settings, tokenizer hash
//! and sources (paths, sizes, modification times) equal the existing cache's reuses it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;

use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::corpus::{CorpusOptions, CorpusStats, Documents, no_text_error, resolve_corpus_inputs};
use crate::{DataError, MlmTokenizer};

/// Version of the on-disk layout; bumped on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
/// Tokens per shard before a new one is started (512 MiB of u16).
const SHARD_TOKENS: u64 = 1 << 28;
/// Documents tokenized per parallel batch.
const CHUNK_DOCUMENTS: usize = 4096;

/// How documents become examples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Packing {
    /// Concatenate documents and cut fixed-length blocks.
    Full,
    /// One document per example, truncated.
    Line,
    /// One document per example, truncated, as `Line`; training packs several whole documents
    /// into each row, attending only within themselves (packing without padding).
    Documents,
}

impl Packing {
    /// Whether examples are whole (truncated) documents, one each: `line` and `documents`.
    pub fn per_document(self) -> bool {
        matches!(self, Packing::Line | Packing::Documents)
    }
}

impl std::str::FromStr for Packing {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "full" => Ok(Self::Full),
            "line" => Ok(Self::Line),
            "documents" => Ok(Self::Documents),
            other => Err(format!(
                "unknown packing {other:?}; use \"full\", \"line\" or \"documents\""
            )),
        }
    }
}

/// Where the validation examples come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Validation {
    /// A deterministic fraction of the input documents (by a hash of their index).
    Split(f64),
    /// Separate inputs.
    Inputs(Vec<String>),
    /// No validation split.
    None,
}

/// Settings of a cache; equal settings (and sources and tokenizer) mean the cache is reusable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareOptions {
    pub max_seq_length: usize,
    pub packing: Packing,
    pub validation: Validation,
    pub corpus: CorpusOptions,
}

/// One input file as it was when the cache was built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub path: PathBuf,
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub modified: u64,
}

/// One shard file pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    pub file: String,
    pub examples: u64,
    pub tokens: u64,
    /// SHA-256 of the `.bin` bytes followed by the `.idx` bytes, checked when the cache is
    /// opened (absent in caches made before masklm recorded it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// The SHA-256 of a shard's `.bin` then `.idx` bytes.
fn shard_sha256(bin: &[u8], idx: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(bin);
    hasher.update(idx);
    format!("{:x}", hasher.finalize())
}

/// A split's shards and counts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitInfo {
    pub shards: Vec<Shard>,
    pub examples: u64,
    pub tokens: u64,
    pub documents: u64,
    /// `line` / `documents` packing: documents longer than `max_seq_length` (with its two
    /// special tokens), cut to it (0 in caches made before masklm counted them).
    #[serde(default)]
    pub truncated: u64,
    /// The tokens those cuts dropped.
    #[serde(default)]
    pub truncated_tokens: u64,
}

impl SplitInfo {
    /// A notice for a person when documents were cut, naming how much of the text was lost:
    /// `what` says what the lost tokens miss (not trained on, not scored), `advice` what to do.
    pub fn truncation_notice(
        &self,
        max_seq_length: usize,
        what: &str,
        advice: &str,
    ) -> Option<String> {
        (self.truncated > 0).then(|| {
            let kept = self.tokens.saturating_sub(2 * self.examples);
            let share =
                100.0 * self.truncated_tokens as f64 / (kept + self.truncated_tokens).max(1) as f64;
            let (cut, documents) = (self.truncated, self.documents);
            let were = if cut == 1 { "was" } else { "were" };
            let (tokens, are) = match self.truncated_tokens {
                1 => ("token".to_string(), "is"),
                n => (format!("{n} tokens"), "are"),
            };
            let document_s = if documents == 1 { "" } else { "s" };
            format!(
                "{cut} of {documents} document{document_s} {were} longer than max_seq_length \
                 {max_seq_length} and cut to it: the last {tokens} ({share:.1}% of the text) \
                 {are} {what}; {advice}"
            )
        })
    }
}

/// `CACHE/manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub tokenizer_hash: String,
    pub vocab_size: usize,
    /// `"u16"` or `"u32"`.
    pub dtype: String,
    pub options: PrepareOptions,
    pub sources: Vec<Source>,
    pub validation_sources: Vec<Source>,
    pub train: SplitInfo,
    pub validation: SplitInfo,
    pub corpus: CorpusStats,
}

/// Receives progress from long operations; the CLI draws it, tests ignore it.
pub trait Progress: Sync {
    /// A new phase; `total` in bytes when known.
    fn start(&self, _what: &str, _total: Option<u64>) {}
    /// `bytes` more input processed.
    fn advance(&self, _bytes: u64) {}
    /// The phase is over.
    fn finish(&self) {}
}

/// A [`Progress`] that shows nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// What [`prepare`] did.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub manifest: Manifest,
    /// The existing cache matched and was reused.
    pub reused: bool,
    /// Why an existing cache was rebuilt, if one was there.
    pub rebuilt_because: Option<Stale>,
}

/// Why an existing cache cannot be reused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Stale {
    /// Made by a masklm with another on-disk layout.
    #[error("it has format version {old}, this masklm writes {new}")]
    FormatVersion { old: u32, new: u32 },
    /// Made with another tokenizer (its hash differs).
    #[error("the tokenizer changed")]
    Tokenizer,
    /// Made with other settings, listed as `key old -> new`.
    #[error("the preparation settings changed ({0})")]
    Settings(String),
    /// An input file was added, removed, resized or modified since; the first one named.
    #[error("the input files changed ({0})")]
    Inputs(String),
    /// Its manifest cannot be read.
    #[error("its manifest is unreadable ({0})")]
    Unreadable(String),
}

/// What [`prepare_with`] may do with an existing cache that does not match.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Rebuild {
    /// Rebuild it, saying why in [`Prepared::rebuilt_because`].
    #[default]
    Allow,
    /// Leave it as it is and fail with [`DataError::WouldRebuild`]: runs whose state names the
    /// cache could no longer resume on it once it holds other examples.
    Refuse,
}

fn sources_of(files: &[PathBuf]) -> Result<Vec<Source>, DataError> {
    files
        .iter()
        .map(|path| {
            let meta = std::fs::metadata(path).map_err(|source| DataError::Read {
                path: path.clone(),
                line: None,
                source,
            })?;
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs())
                .unwrap_or(0);
            Ok(Source {
                path: std::fs::canonicalize(path).unwrap_or_else(|_| path.clone()),
                size: meta.len(),
                modified,
            })
        })
        .collect()
}

/// Why an existing manifest cannot be reused, or `None` if it can.
fn staleness(old: &Manifest, new: &Manifest) -> Option<Stale> {
    if old.format_version != new.format_version {
        return Some(Stale::FormatVersion {
            old: old.format_version,
            new: new.format_version,
        });
    }
    if old.tokenizer_hash != new.tokenizer_hash {
        return Some(Stale::Tokenizer);
    }
    if old.options != new.options {
        return Some(Stale::Settings(settings_changes(
            &old.options,
            &new.options,
        )));
    }
    let old_sources = old.sources.iter().chain(&old.validation_sources);
    let new_sources = new.sources.iter().chain(&new.validation_sources);
    if old.sources != new.sources || old.validation_sources != new.validation_sources {
        return Some(Stale::Inputs(first_source_change(old_sources, new_sources)));
    }
    None
}

/// The settings that differ, as `key old -> new`, comma-separated.
fn settings_changes(old: &PrepareOptions, new: &PrepareOptions) -> String {
    let validation = |v: &Validation| match v {
        Validation::Split(f) => format!("split {f}"),
        Validation::Inputs(inputs) => format!("inputs {}", inputs.join(" ")),
        Validation::None => "none".to_string(),
    };
    let pairs = [
        (
            "max_seq_length",
            old.max_seq_length.to_string(),
            new.max_seq_length.to_string(),
        ),
        (
            "packing",
            packing_name(old.packing),
            packing_name(new.packing),
        ),
        (
            "validation",
            validation(&old.validation),
            validation(&new.validation),
        ),
        (
            "text_field",
            old.corpus.text_field.clone(),
            new.corpus.text_field.clone(),
        ),
        (
            "paragraphs",
            old.corpus.paragraphs.to_string(),
            new.corpus.paragraphs.to_string(),
        ),
        (
            "strict",
            old.corpus.strict.to_string(),
            new.corpus.strict.to_string(),
        ),
    ];
    let changes: Vec<String> = pairs
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(key, a, b)| format!("{key} {a} -> {b}"))
        .collect();
    changes.join(", ")
}

/// `full` or `line`, as configs spell it.
fn packing_name(packing: Packing) -> String {
    format!("{packing:?}").to_lowercase()
}

/// The first input file that differs between two source lists, and how.
fn first_source_change<'a>(
    old: impl Iterator<Item = &'a Source>,
    new: impl Iterator<Item = &'a Source>,
) -> String {
    let old: Vec<&Source> = old.collect();
    let new: Vec<&Source> = new.collect();
    let by_path = |list: &[&'a Source], path: &Path| list.iter().find(|s| s.path == path).copied();
    for source in &new {
        match by_path(&old, &source.path) {
            None => return format!("{} is new", source.path.display()),
            Some(before) if before != *source => {
                return format!("{} was modified", source.path.display());
            }
            Some(_) => {}
        }
    }
    match old.iter().find(|s| by_path(&new, &s.path).is_none()) {
        Some(gone) => format!("{} is no longer an input", gone.path.display()),
        None => "the inputs are in another order or split".to_string(),
    }
}

/// Reads `dir/manifest.json`.
pub fn read_manifest(dir: &Path) -> Result<Manifest, DataError> {
    let path = dir.join("manifest.json");
    let text = std::fs::read_to_string(&path).map_err(|source| DataError::Read {
        path: path.clone(),
        line: None,
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| DataError::Cache {
        path,
        reason: format!("not a masklm cache manifest ({e}); delete the folder and prepare again"),
    })
}

/// Tokenizes and packs `inputs` into a token cache at `out`, or reuses the one there; an
/// existing cache that does not match is rebuilt ([`prepare_with`] can refuse instead).
pub fn prepare(
    tokenizer: &MlmTokenizer,
    inputs: &[String],
    options: &PrepareOptions,
    out: &Path,
    progress: &dyn Progress,
) -> Result<Prepared, DataError> {
    prepare_with(tokenizer, inputs, options, out, progress, Rebuild::Allow)
}

/// [`prepare`], doing what `rebuild` says with an existing cache that does not match.
pub fn prepare_with(
    tokenizer: &MlmTokenizer,
    inputs: &[String],
    options: &PrepareOptions,
    out: &Path,
    progress: &dyn Progress,
    rebuild: Rebuild,
) -> Result<Prepared, DataError> {
    check_options(options)?;
    let split = options.corpus.split.as_deref();
    let (files, skipped_special) = resolve_corpus_inputs(inputs, split)?;
    let validation_files = match &options.validation {
        Validation::Inputs(v) => resolve_corpus_inputs(v, split)?.0,
        _ => Vec::new(),
    };
    let manifest = empty_manifest(tokenizer, options, &files, &validation_files)?;
    let _lock = lock_cache(out)?;
    let rebuilt_because = match existing_cache(out, &manifest)? {
        Existing::Absent => None,
        Existing::Matches(old) => {
            return Ok(Prepared {
                manifest: *old,
                reused: true,
                rebuilt_because: None,
            });
        }
        Existing::Stale(reason) if rebuild == Rebuild::Refuse => {
            return Err(DataError::WouldRebuild {
                path: out.to_path_buf(),
                reason,
            });
        }
        Existing::Stale(reason) => Some(reason),
    };
    let build = Build {
        tokenizer,
        files: &files,
        validation_files: &validation_files,
        options,
        progress,
    };
    let mut manifest = build.replace(out, manifest)?;
    manifest.corpus.skipped_special = skipped_special;
    Ok(Prepared {
        manifest,
        reused: false,
        rebuilt_because,
    })
}

fn check_options(options: &PrepareOptions) -> Result<(), DataError> {
    if options.max_seq_length < 3 {
        return Err(DataError::Config {
            key: "max_seq_length".to_string(),
            reason: format!(
                "{} leaves no room for a token between <s> and </s>",
                options.max_seq_length
            ),
        });
    }
    if let Validation::Split(f) = options.validation
        && !(0.0..1.0).contains(&f)
    {
        return Err(DataError::Config {
            key: "validation_split".to_string(),
            reason: format!("{f} is not a fraction in [0, 1)"),
        });
    }
    Ok(())
}

/// The manifest a cache of these inputs and settings would have, before any counts.
fn empty_manifest(
    tokenizer: &MlmTokenizer,
    options: &PrepareOptions,
    files: &[PathBuf],
    validation_files: &[PathBuf],
) -> Result<Manifest, DataError> {
    let vocab_size = tokenizer.vocab_size();
    let dtype = if vocab_size <= 1 << 16 { "u16" } else { "u32" };
    Ok(Manifest {
        format_version: FORMAT_VERSION,
        tokenizer_hash: tokenizer.hash.clone(),
        vocab_size,
        dtype: dtype.to_string(),
        options: options.clone(),
        sources: sources_of(files)?,
        validation_sources: sources_of(validation_files)?,
        train: SplitInfo::default(),
        validation: SplitInfo::default(),
        corpus: CorpusStats::default(),
    })
}

/// One prepare per cache at a time: `CACHE.lock` beside it (flock; a dead holder's lock is
/// released by the kernel, so a stale file is simply taken over).
fn lock_cache(out: &Path) -> Result<crate::FolderLock, DataError> {
    let lock_path = out.with_extension("lock");
    if let Some(parent) = lock_path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|source| DataError::Write {
            path: parent.to_path_buf(),
            source,
        })?;
    }
    crate::lock_file(&lock_path, out, "prepare")
}

/// What is at a cache's path already.
enum Existing {
    /// Nothing, or an empty folder.
    Absent,
    /// A cache of the same settings, sources and tokenizer.
    Matches(Box<Manifest>),
    /// A cache that cannot be reused, and why.
    Stale(Stale),
}

fn existing_cache(out: &Path, wanted: &Manifest) -> Result<Existing, DataError> {
    if out.join("manifest.json").is_file() {
        return Ok(match read_manifest(out) {
            Ok(old) => match staleness(&old, wanted) {
                None => Existing::Matches(Box::new(old)),
                Some(reason) => Existing::Stale(reason),
            },
            Err(e) => Existing::Stale(Stale::Unreadable(e.to_string())),
        });
    }
    let occupied = out.exists()
        && std::fs::read_dir(out)
            .map(|mut d| d.next().is_some())
            .unwrap_or(true);
    if occupied {
        return Err(DataError::Cache {
            path: out.to_path_buf(),
            reason: "exists and is not a masklm token cache; choose another --out".to_string(),
        });
    }
    Ok(Existing::Absent)
}

/// What a cache is built from.
struct Build<'a> {
    tokenizer: &'a MlmTokenizer,
    files: &'a [PathBuf],
    validation_files: &'a [PathBuf],
    options: &'a PrepareOptions,
    progress: &'a dyn Progress,
}

impl Build<'_> {
    /// Builds the cache in `CACHE.partial`, then puts it in place of `out`: an interrupted or
    /// failed build never leaves a cache that looks complete.
    fn replace(&self, out: &Path, manifest: Manifest) -> Result<Manifest, DataError> {
        let write_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DataError::Write { path, source }
        };
        let partial = out.with_extension("partial");
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(write_err(&partial))?;
        }
        std::fs::create_dir_all(&partial).map_err(write_err(&partial))?;
        let total: u64 = manifest
            .sources
            .iter()
            .chain(&manifest.validation_sources)
            .map(|s| s.size)
            .sum();
        self.progress.start("tokenizing", Some(total));
        let manifest = self.write(&partial, manifest).inspect_err(|_| {
            // Leave nothing half-written behind (the next prepare would remove it anyway).
            let _ = std::fs::remove_dir_all(&partial);
        })?;
        if out.exists() {
            std::fs::remove_dir_all(out).map_err(write_err(out))?;
        }
        std::fs::rename(&partial, out).map_err(write_err(out))?;
        Ok(manifest)
    }

    /// Tokenizes, packs and writes the shards and manifest into `partial`.
    fn write(&self, partial: &Path, mut manifest: Manifest) -> Result<Manifest, DataError> {
        let wide = manifest.dtype == "u32";
        let (options, tokenizer) = (self.options, self.tokenizer);
        let mut train = SplitWriter::new(partial, "train", wide, options, tokenizer);
        let mut validation = SplitWriter::new(partial, "validation", wide, options, tokenizer);
        manifest.corpus = self.tokenize_splits(&mut train, &mut validation)?;
        self.progress.finish();
        if manifest.corpus.documents == 0 {
            return Err(no_text_error(self.files, &manifest.corpus));
        }
        manifest.train = train.finish()?;
        manifest.validation = validation.finish()?;
        check_splits(&manifest)?;
        let manifest_path = partial.join("manifest.json");
        let text = serde_json::to_string_pretty(&manifest).map_err(|e| DataError::Cache {
            path: manifest_path.clone(),
            reason: format!("cannot serialise the manifest: {e}"),
        })? + "\n";
        write_synced(&manifest_path, text.as_bytes()).map_err(|source| DataError::Write {
            path: manifest_path.clone(),
            source,
        })?;
        Ok(manifest)
    }

    /// Sends each document to its split; returns what reading the training inputs found.
    fn tokenize_splits(
        &self,
        train: &mut SplitWriter,
        validation: &mut SplitWriter,
    ) -> Result<CorpusStats, DataError> {
        let (tokenizer, options, progress) = (self.tokenizer, self.options, self.progress);
        let files = self.files;
        match options.validation {
            Validation::Inputs(_) => {
                let stats = tokenize_into(tokenizer, files, options, progress, |_, doc| {
                    train.push(doc)
                })?;
                let validation_files = self.validation_files;
                let vstats =
                    tokenize_into(tokenizer, validation_files, options, progress, |_, doc| {
                        validation.push(doc)
                    })?;
                if vstats.documents == 0 {
                    return Err(no_text_error(validation_files, &vstats));
                }
                Ok(stats)
            }
            Validation::Split(fraction) => {
                tokenize_into(tokenizer, files, options, progress, |index, doc| {
                    if in_validation(index, fraction) {
                        validation.push(doc)
                    } else {
                        train.push(doc)
                    }
                })
            }
            Validation::None => tokenize_into(tokenizer, files, options, progress, |_, doc| {
                train.push(doc)
            }),
        }
    }
}

/// A built cache must have training examples, and validation examples if a split was asked
/// for.
fn check_splits(manifest: &Manifest) -> Result<(), DataError> {
    if manifest.train.examples == 0 {
        return Err(DataError::Input(format!(
            "no training examples: all {} documents went to validation",
            manifest.corpus.documents
        )));
    }
    if matches!(manifest.options.validation, Validation::Split(f) if f > 0.0)
        && manifest.validation.examples == 0
    {
        return Err(DataError::Input(format!(
            "the validation split is empty: {} documents are too few for the fraction given; \
             raise --validation-split or pass --validation-input",
            manifest.corpus.documents
        )));
    }
    Ok(())
}

/// Writes `bytes` to `path` and fsyncs it: the one durable-write helper of the workspace
/// (the cache manifest here, checkpoint files in masklm-train).
pub fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Whether document `index` belongs to the validation split: a hash of the index, so the
/// split is stable and independent of chunking.
fn in_validation(index: u64, fraction: f64) -> bool {
    (crate::splitmix64(index) >> 11) as f64 / (1u64 << 53) as f64 <= fraction && fraction > 0.0
}

/// Reads documents on a second thread and tokenizes them in parallel batches, calling `sink`
/// with (document index, tokens without specials) in corpus order.
fn tokenize_into(
    tokenizer: &MlmTokenizer,
    files: &[PathBuf],
    options: &PrepareOptions,
    progress: &dyn Progress,
    mut sink: impl FnMut(u64, &[u32]) -> Result<(), DataError>,
) -> Result<CorpusStats, DataError> {
    let (sender, receiver) = sync_channel::<(Vec<String>, u64)>(2);
    let mut documents = Documents::new(files.to_vec(), options.corpus.clone());
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> Result<CorpusStats, DataError> {
            let mut chunk = Vec::with_capacity(CHUNK_DOCUMENTS);
            let mut bytes = 0u64;
            let mut last = 0u64;
            while let Some(document) = documents.next() {
                chunk.push(document?);
                if chunk.len() == CHUNK_DOCUMENTS {
                    bytes = documents.stats().bytes;
                    if sender
                        .send((std::mem::take(&mut chunk), bytes - last))
                        .is_err()
                    {
                        break;
                    }
                    last = bytes;
                }
            }
            let end = documents.stats().bytes;
            if !chunk.is_empty() || end > bytes {
                let _ = sender.send((chunk, end - last));
            }
            Ok(documents.stats().clone())
        });
        // Consume until the end or the first error; then drop the receiver so that a reader
        // blocked on a full channel wakes up (its send fails) and the scope can end.
        let consumed = (move || -> Result<(), DataError> {
            let mut index = 0u64;
            for (mut chunk, bytes) in receiver.iter() {
                // Long documents are encoded apart, piece by piece (see `encode_long`).
                let long: Vec<(usize, String)> = chunk
                    .iter_mut()
                    .enumerate()
                    .filter(|(_, doc)| doc.len() > MAX_PIECE_BYTES)
                    .map(|(i, doc)| (i, std::mem::take(doc)))
                    .collect();
                let mut encoded = tokenizer.encode_batch_plain(chunk)?;
                for (i, doc) in long {
                    encoded[i] = encode_long(tokenizer, &doc)?;
                }
                for ids in encoded {
                    sink(index, &ids)?;
                    index += 1;
                }
                progress.advance(bytes);
            }
            Ok(())
        })();
        let read = reader.join().unwrap_or_else(|_| {
            Err(DataError::Input(
                "the corpus reader thread panicked".to_string(),
            ))
        });
        consumed?;
        read
    })
}

/// Documents longer than this are tokenized in pieces of at most this many bytes.
const MAX_PIECE_BYTES: usize = 64 * 1024;

/// Tokenizes a long document piece by piece, cutting before a whitespace character, so that
/// memory stays at one piece's encoding (a `tokenizers` Encoding costs ~100x its text: a 5 MB
/// line peaked at 659 MB in one piece) plus the ids. Byte-level BPE and WordPiece split words
/// at whitespace anyway, so the ids equal those of the whole document; only a piece without any
/// whitespace (64 KiB of one "word") is cut at a character boundary.
fn encode_long(tokenizer: &MlmTokenizer, text: &str) -> Result<Vec<u32>, DataError> {
    let mut ids = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rest.len();
        if cut > MAX_PIECE_BYTES {
            cut = MAX_PIECE_BYTES;
            while !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            // The last whitespace in the window (kept with the next piece, as `Ġ`), if any
            // beyond the start.
            if let Some(space) = rest[..cut].rfind(char::is_whitespace).filter(|&i| i > 0) {
                cut = space;
            }
        }
        let (piece, tail) = rest.split_at(cut);
        let mut encoded = tokenizer.encode_batch_plain(vec![piece.to_string()])?;
        ids.append(&mut encoded[0]);
        rest = tail;
    }
    Ok(ids)
}

/// Packs one split's documents into examples and writes its shards.
struct SplitWriter {
    dir: PathBuf,
    name: &'static str,
    wide: bool,
    packing: Packing,
    block: usize,
    bos: u32,
    eos: u32,
    carry: Vec<u32>,
    info: SplitInfo,
    shard: Option<ShardWriter>,
}

struct ShardWriter {
    bin: BufWriter<File>,
    idx: BufWriter<File>,
    bin_path: PathBuf,
    idx_path: PathBuf,
    offset: u64,
    examples: u64,
}

impl SplitWriter {
    fn new(
        dir: &Path,
        name: &'static str,
        wide: bool,
        options: &PrepareOptions,
        tok: &MlmTokenizer,
    ) -> Self {
        Self {
            dir: dir.to_path_buf(),
            name,
            wide,
            packing: options.packing,
            block: options.max_seq_length,
            bos: tok.bos_id,
            eos: tok.eos_id,
            carry: Vec::new(),
            info: SplitInfo::default(),
            shard: None,
        }
    }

    fn push(&mut self, document: &[u32]) -> Result<(), DataError> {
        self.info.documents += 1;
        let body = self.block - 2;
        match self.packing {
            Packing::Line | Packing::Documents => {
                let take = document.len().min(body);
                if take < document.len() {
                    self.info.truncated += 1;
                    self.info.truncated_tokens += (document.len() - take) as u64;
                }
                let mut example = Vec::with_capacity(take + 2);
                example.push(self.bos);
                example.extend_from_slice(&document[..take]);
                example.push(self.eos);
                self.emit(&example)
            }
            Packing::Full => {
                self.carry.extend_from_slice(document);
                self.carry.push(self.eos);
                let mut start = 0;
                let mut example = Vec::with_capacity(self.block);
                while self.carry.len() - start >= body {
                    example.clear();
                    example.push(self.bos);
                    example.extend_from_slice(&self.carry[start..start + body]);
                    example.push(self.eos);
                    self.emit(&example)?;
                    start += body;
                }
                self.carry.drain(..start);
                Ok(())
            }
        }
    }

    fn emit(&mut self, example: &[u32]) -> Result<(), DataError> {
        let rolls_over = self
            .shard
            .as_ref()
            .is_some_and(|s| s.offset + example.len() as u64 > SHARD_TOKENS);
        if rolls_over {
            self.close_shard()?;
        }
        if self.shard.is_none() {
            let stem = format!("{}-{:05}", self.name, self.info.shards.len());
            let bin_path = self.dir.join(format!("{stem}.bin"));
            let idx_path = self.dir.join(format!("{stem}.idx"));
            let create = |path: &Path| {
                File::create(path)
                    .map(|f| BufWriter::with_capacity(1 << 20, f))
                    .map_err(|source| DataError::Write {
                        path: path.to_path_buf(),
                        source,
                    })
            };
            let mut idx = create(&idx_path)?;
            idx.write_all(&0u64.to_le_bytes())
                .map_err(|source| DataError::Write {
                    path: idx_path.clone(),
                    source,
                })?;
            self.shard = Some(ShardWriter {
                bin: create(&bin_path)?,
                idx,
                bin_path,
                idx_path,
                offset: 0,
                examples: 0,
            });
        }
        let Some(shard) = self.shard.as_mut() else {
            return Ok(());
        };
        let mut bytes = Vec::with_capacity(example.len() * 4);
        for &t in example {
            if self.wide {
                bytes.extend_from_slice(&t.to_le_bytes());
            } else {
                // The manifest chose u16 because the tokenizer's largest id is below 65536.
                let narrow = u16::try_from(t).map_err(|_| DataError::Cache {
                    path: shard.bin_path.clone(),
                    reason: format!(
                        "token id {t} does not fit the cache's u16 ids; the tokenizer produced \
                         an id above its own largest one: check tokenizer.json"
                    ),
                })?;
                bytes.extend_from_slice(&narrow.to_le_bytes());
            }
        }
        shard
            .bin
            .write_all(&bytes)
            .map_err(|source| DataError::Write {
                path: shard.bin_path.clone(),
                source,
            })?;
        shard.offset += example.len() as u64;
        shard.examples += 1;
        shard
            .idx
            .write_all(&shard.offset.to_le_bytes())
            .map_err(|source| DataError::Write {
                path: shard.idx_path.clone(),
                source,
            })?;
        self.info.examples += 1;
        self.info.tokens += example.len() as u64;
        Ok(())
    }

    fn close_shard(&mut self) -> Result<(), DataError> {
        if let Some(mut shard) = self.shard.take() {
            for (writer, path) in [
                (&mut shard.bin, &shard.bin_path),
                (&mut shard.idx, &shard.idx_path),
            ] {
                writer
                    .flush()
                    .and_then(|_| writer.get_ref().sync_all())
                    .map_err(|source| DataError::Write {
                        path: path.clone(),
                        source,
                    })?;
            }
            // Streamed back from disk: a shard is up to 1 GiB.
            let mut hasher = Sha256::new();
            for path in [&shard.bin_path, &shard.idx_path] {
                File::open(path)
                    .and_then(|mut f| std::io::copy(&mut f, &mut hasher))
                    .map_err(|source| DataError::Read {
                        path: path.clone(),
                        line: None,
                        source,
                    })?;
            }
            let sha256 = format!("{:x}", hasher.finalize());
            self.info.shards.push(Shard {
                file: format!("{}-{:05}", self.name, self.info.shards.len()),
                examples: shard.examples,
                tokens: shard.offset,
                sha256: Some(sha256),
            });
        }
        Ok(())
    }

    fn finish(mut self) -> Result<SplitInfo, DataError> {
        if self.packing == Packing::Full && !self.carry.is_empty() {
            // The corpus's tail: a shorter last example (fairseq `complete`), minus the
            // trailing separator, which would duplicate the closing </s>.
            let mut tail = std::mem::take(&mut self.carry);
            if tail.last() == Some(&self.eos) {
                tail.pop();
            }
            if !tail.is_empty() {
                let mut example = Vec::with_capacity(tail.len() + 2);
                example.push(self.bos);
                example.extend_from_slice(&tail);
                example.push(self.eos);
                self.emit(&example)?;
            }
        }
        self.close_shard()?;
        Ok(self.info)
    }
}

/// A memory-mapped split of a token cache.
pub struct SplitReader {
    shards: Vec<(Mmap, Vec<u64>)>,
    /// Cumulative example counts: shard `s` holds examples `starts[s]..starts[s + 1]`.
    starts: Vec<u64>,
    wide: bool,
}

impl SplitReader {
    /// Opens `split` ("train" or "validation") of the cache at `dir`.
    pub fn open(dir: &Path, manifest: &Manifest, split: &str) -> Result<Self, DataError> {
        let info = match split {
            "train" => &manifest.train,
            "validation" => &manifest.validation,
            other => {
                return Err(DataError::Cache {
                    path: dir.to_path_buf(),
                    reason: format!("no split {other:?}"),
                });
            }
        };
        let wide = manifest.dtype == "u32";
        let width = if wide { 4 } else { 2 };
        let mut shards = Vec::new();
        let mut starts = vec![0u64];
        for shard in &info.shards {
            let bin_path = dir.join(format!("{}.bin", shard.file));
            let idx_path = dir.join(format!("{}.idx", shard.file));
            let corrupt = |reason: String| DataError::Cache {
                path: bin_path.clone(),
                reason: format!("{reason}; the cache is damaged: delete it and prepare again"),
            };
            let idx_bytes = std::fs::read(&idx_path).map_err(|source| DataError::Read {
                path: idx_path.clone(),
                line: None,
                source,
            })?;
            let offsets: Vec<u64> = idx_bytes
                .chunks_exact(8)
                .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
                .collect();
            let file = File::open(&bin_path).map_err(|source| DataError::Read {
                path: bin_path.clone(),
                line: None,
                source,
            })?;
            // SAFETY: the cache files are written once and only read afterwards; a concurrent
            // writer would be a second `prepare`, which builds in `.partial` and renames.
            let map = unsafe { Mmap::map(&file) }.map_err(|source| DataError::Read {
                path: bin_path.clone(),
                line: None,
                source,
            })?;
            if offsets.len() as u64 != shard.examples + 1 {
                return Err(corrupt(format!(
                    "index has {} entries, manifest says {} examples",
                    offsets.len().saturating_sub(1),
                    shard.examples
                )));
            }
            if map.len() as u64 != shard.tokens * width || offsets.last() != Some(&shard.tokens) {
                return Err(corrupt(format!(
                    "{} bytes, manifest says {} tokens of {width} bytes",
                    map.len(),
                    shard.tokens
                )));
            }
            if offsets.windows(2).any(|w| w[0] > w[1]) {
                return Err(corrupt("index offsets are not ascending".to_string()));
            }
            if let Some(expected) = &shard.sha256
                && &shard_sha256(&map, &idx_bytes) != expected
            {
                return Err(corrupt(
                    "checksum mismatch: the shard was modified or damaged after prepare"
                        .to_string(),
                ));
            }
            // Every id must index the vocabulary the cache was made with; checked once here
            // rather than as an index panic in the middle of training.
            let largest = if wide {
                map.chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .max()
            } else {
                map.chunks_exact(2)
                    .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
                    .max()
            };
            if let Some(largest) = largest
                && largest as usize >= manifest.vocab_size
            {
                return Err(corrupt(format!(
                    "token id {largest} is outside the vocabulary of {} the cache was made with",
                    manifest.vocab_size
                )));
            }
            starts.push(starts.last().copied().unwrap_or(0) + shard.examples);
            shards.push((map, offsets));
        }
        Ok(Self {
            shards,
            starts,
            wide,
        })
    }

    /// Number of examples.
    pub fn len(&self) -> usize {
        self.starts.last().copied().unwrap_or(0) as usize
    }

    /// Whether the split has no example.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where example `index` lies: its shard's map and its token range there (`None` past the
    /// end, or for offsets out of order).
    fn span(&self, index: usize) -> Option<(&Mmap, usize, usize)> {
        let index = index as u64;
        let shard = self
            .starts
            .partition_point(|&s| s <= index)
            .checked_sub(1)?;
        let (map, offsets) = self.shards.get(shard)?;
        let local = (index - self.starts[shard]) as usize;
        let (start, end) = (*offsets.get(local)?, *offsets.get(local + 1)?);
        (start <= end).then_some((map, start as usize, end as usize))
    }

    /// The number of tokens of example `index` (`None` past the end), without reading them.
    pub fn example_len(&self, index: usize) -> Option<usize> {
        self.span(index).map(|(_, start, end)| end - start)
    }

    /// The tokens of example `index` (`None` past the end).
    pub fn get(&self, index: usize) -> Option<Vec<u32>> {
        let (map, start, end) = self.span(index)?;
        let tokens = if self.wide {
            map.get(start * 4..end * 4)?
                .chunks_exact(4)
                .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        } else {
            map.get(start * 2..end * 2)?
                .chunks_exact(2)
                .map(|b| u16::from_le_bytes([b[0], b[1]]) as u32)
                .collect()
        };
        Some(tokens)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_sink_ends_tokenizing_promptly() {
        // Ten chunks of documents: the reader fills the two-slot channel long before the end,
        // and must not stay blocked on it once the consumer has failed (disk full).
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(&corpus, "a cell divides\n".repeat(CHUNK_DOCUMENTS * 10)).unwrap();
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer-go");
        let tokenizer = crate::load_tokenizer(&fixture).unwrap();
        let options = PrepareOptions {
            max_seq_length: 16,
            packing: Packing::Full,
            validation: Validation::None,
            corpus: CorpusOptions::default(),
        };
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let outcome = tokenize_into(&tokenizer, &[corpus], &options, &NoProgress, |_, _| {
                Err(DataError::Input("disk full".to_string()))
            });
            let _ = done.send(outcome.map(|_| ()));
        });
        let outcome = result
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("tokenizing hung after its sink failed");
        let err = outcome.unwrap_err().to_string();
        assert!(err.contains("disk full"), "{err}");
    }

    fn go_tokenizer() -> MlmTokenizer {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer-go");
        crate::load_tokenizer(&fixture).unwrap()
    }

    fn options(packing: Packing) -> PrepareOptions {
        PrepareOptions {
            max_seq_length: 16,
            packing,
            validation: Validation::None,
            corpus: CorpusOptions::default(),
        }
    }

    #[test]
    fn a_refused_rebuild_leaves_the_cache_as_it_was_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus.txt");
        std::fs::write(&corpus, "a cell divides the cell\n".repeat(50)).unwrap();
        let (tokenizer, cache) = (go_tokenizer(), dir.path().join("cache"));
        let inputs = [corpus.display().to_string()];
        let full = options(Packing::Full);
        let first = prepare(&tokenizer, &inputs, &full, &cache, &NoProgress).unwrap();
        let tokens = |manifest: &Manifest| {
            let split = SplitReader::open(&cache, manifest, "train").unwrap();
            (0..split.len())
                .map(|i| split.get(i).unwrap())
                .collect::<Vec<_>>()
        };
        let before = tokens(&first.manifest);

        let refuse = |options: &PrepareOptions| {
            prepare_with(
                &tokenizer,
                &inputs,
                options,
                &cache,
                &NoProgress,
                Rebuild::Refuse,
            )
        };
        let err = refuse(&options(Packing::Line)).unwrap_err();
        let message = err.to_string();
        let DataError::WouldRebuild { path, reason } = err else {
            panic!("not WouldRebuild: {message}");
        };
        assert_eq!(path, cache);
        assert_eq!(reason, Stale::Settings("packing full -> line".to_string()));
        assert!(
            message.contains("packing full -> line") && message.contains("resume"),
            "{message}"
        );
        let kept = read_manifest(&cache).unwrap();
        assert_eq!(kept, first.manifest);
        assert_eq!(tokens(&kept), before);

        // A matching cache is reused even when rebuilds are refused.
        assert!(refuse(&full).unwrap().reused);

        std::fs::write(&corpus, "another corpus altogether\n".repeat(40)).unwrap();
        let Err(DataError::WouldRebuild { reason, .. }) = refuse(&full) else {
            panic!("a changed input was rebuilt");
        };
        assert!(matches!(&reason, Stale::Inputs(why) if why.ends_with("corpus.txt was modified")));
        assert_eq!(tokens(&read_manifest(&cache).unwrap()), before);

        // Allowed (the default), the same change rebuilds and reports it.
        let rebuilt = prepare(&tokenizer, &inputs, &full, &cache, &NoProgress).unwrap();
        assert_eq!(rebuilt.rebuilt_because, Some(reason));
        assert_ne!(tokens(&rebuilt.manifest), before);
    }

    #[test]
    fn staleness_names_each_changed_setting_and_input() {
        let old = options(Packing::Full);
        let mut new = options(Packing::Line);
        new.max_seq_length = 512;
        new.validation = Validation::Split(0.1);
        new.corpus.text_field = "body".to_string();
        assert_eq!(
            settings_changes(&old, &new),
            "max_seq_length 16 -> 512, packing full -> line, validation none -> split 0.1, \
             text_field text -> body"
        );
        let source = |name: &str, size: u64| Source {
            path: PathBuf::from(name),
            size,
            modified: 7,
        };
        let (a, b, b2) = (source("a", 1), source("b", 2), source("b", 3));
        let change = |old: &[&Source], new: &[&Source]| {
            first_source_change(old.iter().copied(), new.iter().copied())
        };
        assert_eq!(change(&[&a], &[&a, &b]), "b is new");
        assert_eq!(change(&[&a, &b], &[&a, &b2]), "b was modified");
        assert_eq!(change(&[&a, &b], &[&a]), "b is no longer an input");
    }

    #[test]
    fn long_documents_are_encoded_in_pieces_to_the_same_ids() {
        let fixture =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer-go");
        let tokenizer = crate::load_tokenizer(&fixture).unwrap();
        let sentence = "Catalysis of the reaction: ATP + H2O = ADP + phosphate.  ";
        let text = sentence.repeat(3 * MAX_PIECE_BYTES / sentence.len());
        assert!(text.len() > 2 * MAX_PIECE_BYTES);
        let whole = tokenizer.encode_batch_plain(vec![text.clone()]).unwrap();
        assert_eq!(encode_long(&tokenizer, &text).unwrap(), whole[0]);
    }
}
