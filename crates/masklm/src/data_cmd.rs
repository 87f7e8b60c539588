//! `masklm tokenizer train` and `masklm prepare`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Args;
use masklm_data::corpus::no_text_error;
use masklm_data::{
    CorpusOptions, DataError, Documents, Packing, PrepareOptions, Progress, TokenizerModel,
    TrainOptions, Validation, load_tokenizer, prepare, resolve_corpus_inputs, train_tokenizer,
};

use crate::progress::Bar;

/// How to read the corpus (shared by `tokenizer train` and `prepare`).
#[derive(Args, Debug, Clone)]
pub struct CorpusArgs {
    /// Input files, directories (recursive) or glob patterns: plain text, JSON Lines
    /// (.jsonl/.json/.ndjson), optionally .gz or .zst compressed, Parquet, Arrow, and
    /// `datasets` folders (save_to_disk, the load_dataset cache).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<String>,
    /// The field (JSON) or column (Parquet, Arrow, `datasets` folders) holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// Plain text: one document per blank-line-separated paragraph instead of per line.
    #[arg(long)]
    pub paragraphs: bool,
    /// Fail on a non-UTF-8 line (naming file:line) instead of skipping it.
    #[arg(long)]
    pub strict: bool,
    /// The split of a `datasets` folder (save_to_disk or the load_dataset cache) with several
    /// [default: train].
    #[arg(long)]
    pub split: Option<String>,
}

impl CorpusArgs {
    pub fn options(&self) -> CorpusOptions {
        CorpusOptions {
            text_field: self.text_field.clone(),
            paragraphs: self.paragraphs,
            strict: self.strict,
            split: self.split.clone(),
        }
    }
}

#[derive(Args, Debug)]
pub struct TokenizerTrainArgs {
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// The tokenizer model, each in its model family's convention: bpe (byte-level BPE, as
    /// RoBERTa), wordpiece (as BERT: [CLS] [SEP] [MASK], ## continuations), unigram
    /// (SentencePiece Unigram, as XLM-R: ▁ word starts).
    #[arg(long, default_value = "bpe")]
    pub model: TokenizerModel,
    /// Vocabulary size, the 5 specials and the alphabet (bpe: 256 byte symbols) included.
    #[arg(long, default_value_t = 8192)]
    pub vocab_size: usize,
    /// Minimum frequency of a pair to be merged (bpe and wordpiece; default 2).
    #[arg(long)]
    pub min_frequency: Option<u64>,
    /// wordpiece: lowercase the text (the default, as bert-base-uncased and PubMedBERT).
    #[arg(long, conflicts_with = "no_lowercase")]
    pub lowercase: bool,
    /// wordpiece: keep the case (as bert-base-cased).
    #[arg(long)]
    pub no_lowercase: bool,
    /// wordpiece: strip accents (é -> e). Without this or --no-strip-accents, accents are
    /// stripped exactly when the text is lowercased, as in BERT.
    #[arg(long, conflicts_with = "no_strip_accents")]
    pub strip_accents: bool,
    /// wordpiece: keep accents.
    #[arg(long)]
    pub no_strip_accents: bool,
    /// model_max_length written to tokenizer_config.json.
    #[arg(long, default_value_t = 512)]
    pub model_max_length: usize,
    /// Output folder for tokenizer.json, tokenizer_config.json, special_tokens_map.json.
    #[arg(long)]
    pub out: PathBuf,
}

pub fn tokenizer_train(args: TokenizerTrainArgs) -> Result<()> {
    let either = |yes: bool, no: bool| (yes || no).then_some(yes);
    let options = TrainOptions {
        model: args.model,
        vocab_size: args.vocab_size,
        min_frequency: args.min_frequency,
        lowercase: either(args.lowercase, args.no_lowercase),
        strip_accents: either(args.strip_accents, args.no_strip_accents),
        model_max_length: args.model_max_length,
    };
    options.validate().map_err(option_error)?;
    if args.out.is_file() {
        bail!(
            "--out {} is a file; give a folder for the tokenizer",
            args.out.display()
        );
    }
    crate::out_path::refuse_overlap_inputs(&args.out, &args.corpus.input, "--input")?;
    let (files, special) = resolve_corpus_inputs(&args.corpus.input, args.corpus.split.as_deref())?;
    warn_special(&special);
    let total = files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let bar = Bar::new();
    bar.start("reading", Some(total));
    let mut documents = Documents::new(files.clone(), args.corpus.options());
    let mut error = None;
    let mut read = 0u64;
    let start = Instant::now();
    let stream = std::iter::from_fn(|| match documents.next()? {
        Ok(doc) => {
            let bytes = documents.stats().bytes;
            bar.advance(bytes - read);
            read = bytes;
            Some(doc)
        }
        Err(e) => {
            error = Some(e);
            None
        }
    });
    let trained = train_tokenizer(stream, &options, &args.out);
    bar.finish();
    if let Some(e) = error {
        return Err(e).context("reading the corpus");
    }
    let stats = documents.stats().clone();
    if stats.documents == 0 {
        return Err(no_text_error(&files, &stats).into());
    }
    let tokenizer = trained
        .map_err(option_error)
        .with_context(|| format!("training a tokenizer into {}", args.out.display()))?;
    warn_skipped(&stats);
    println!(
        "tokenizer: {} {} tokens from {} documents ({:.1} MB) in {:.1} s -> {}",
        tokenizer.vocab_size(),
        args.model,
        stats.documents,
        stats.bytes as f64 / 1e6,
        start.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// A refused option, under the flag that sets it.
fn option_error(e: DataError) -> anyhow::Error {
    let flag = match &e {
        DataError::Config { key, .. } => match key.as_str() {
            "lowercase" => "--lowercase/--no-lowercase".to_string(),
            "strip_accents" => "--strip-accents/--no-strip-accents".to_string(),
            key => format!("--{}", key.replace('_', "-")),
        },
        _ => return e.into(),
    };
    anyhow::Error::new(e).context(flag)
}

fn warn_special(files: &[std::path::PathBuf]) {
    if let Some(first) = files.first() {
        eprintln!(
            "warning: skipped {} special file(s) (FIFO, socket or device) under the inputs, e.g. {}",
            files.len(),
            first.display()
        );
    }
}

fn warn_skipped(stats: &masklm_data::CorpusStats) {
    warn_special(&stats.skipped_special);
    if let Some(note) = stats.skipped_note() {
        eprintln!("warning: {note}; --strict makes this an error");
    }
}

#[derive(Args, Debug)]
pub struct PrepareArgs {
    /// Tokenizer folder (tokenizer.json), or a Hub model id (org/name[@revision]) whose
    /// tokenizer to use.
    #[arg(long)]
    pub tokenizer: PathBuf,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Cache folder to write (or reuse).
    #[arg(long)]
    pub out: PathBuf,
    /// Tokens per example, <s> and </s> included.
    #[arg(long, default_value_t = 512)]
    pub max_seq_length: usize,
    /// full: concatenate documents into fixed-length blocks; line: one document per example;
    /// documents: as line, and `train` packs several whole documents per row.
    #[arg(long, default_value = "full")]
    pub packing: Packing,
    /// Fraction of documents held out for validation.
    #[arg(long, default_value_t = 0.05, conflicts_with = "validation_input")]
    pub validation_split: f64,
    /// Separate validation inputs instead of a split.
    #[arg(long, num_args = 1..)]
    pub validation_input: Option<Vec<String>>,
}

pub fn prepare_cmd(args: PrepareArgs) -> Result<()> {
    // A rebuild replaces --out whole, and a corpus folder holding it would read it back.
    crate::out_path::refuse_overlap_inputs(&args.out, &args.corpus.input, "--input")?;
    let validation_inputs = args.validation_input.as_deref().unwrap_or_default();
    crate::out_path::refuse_overlap_inputs(&args.out, validation_inputs, "--validation-input")?;
    let tokenizer_dir = masklm_hub::resolve_model(&args.tokenizer, masklm_hub::Need::Tokenizer)?;
    crate::out_path::refuse_overlap(&args.out, &tokenizer_dir, "--tokenizer")?;
    let tokenizer = load_tokenizer(&tokenizer_dir)?;
    let validation = match args.validation_input {
        Some(inputs) => Validation::Inputs(inputs),
        None if args.validation_split > 0.0 => Validation::Split(args.validation_split),
        None => Validation::None,
    };
    let options = PrepareOptions {
        max_seq_length: args.max_seq_length,
        packing: args.packing,
        validation,
        corpus: args.corpus.options(),
    };
    let start = Instant::now();
    let bar = Bar::new();
    let prepared = prepare(&tokenizer, &args.corpus.input, &options, &args.out, &bar)
        .with_context(|| format!("preparing the token cache {}", args.out.display()))?;
    let m = &prepared.manifest;
    for (split, name) in [(&m.train, "train"), (&m.validation, "validation")] {
        let (what, advice) = (
            "left out of the cache",
            "raise --max-seq-length or use --packing full to keep every token",
        );
        if let Some(note) = split.truncation_notice(m.options.max_seq_length, what, advice) {
            eprintln!("note ({name}): {note}");
        }
    }
    if prepared.reused {
        println!(
            "{}: up to date ({} train / {} validation examples); nothing to do",
            args.out.display(),
            m.train.examples,
            m.validation.examples
        );
        return Ok(());
    }
    if let Some(reason) = &prepared.rebuilt_because {
        eprintln!("note: rebuilt {} because {reason}", args.out.display());
    }
    warn_skipped(&m.corpus);
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{}: {} documents, {:.1} MB in {:.1} s ({:.1} MB/s); train {} examples / {} tokens, validation {} examples / {} tokens",
        args.out.display(),
        m.corpus.documents,
        m.corpus.bytes as f64 / 1e6,
        seconds,
        m.corpus.bytes as f64 / 1e6 / seconds.max(1e-9),
        m.train.examples,
        m.train.tokens,
        m.validation.examples,
        m.validation.tokens
    );
    Ok(())
}
