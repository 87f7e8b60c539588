//! `masklm vocab audit` and `masklm vocab extend`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::{Args, Subcommand};
use masklm_data::vocab::{WordPieces, audit, candidates, count_words};
use masklm_data::{CorpusOptions, load_tokenizer};

#[derive(Subcommand)]
pub enum VocabCommand {
    /// How the model's tokenizer splits the words of a domain corpus.
    Audit(AuditArgs),
    /// Add domain words to a model's vocabulary; writes a Hugging Face folder.
    Extend(ExtendArgs),
}

#[derive(Args, Debug)]
pub struct CorpusArgs {
    /// Corpus files, folders or globs (text, JSON Lines, JSON arrays, Parquet, Arrow;
    /// .gz/.zst; `datasets` folders).
    #[arg(long, required = true, num_args = 1..)]
    pub input: Vec<String>,
    /// JSON/Parquet/Arrow field holding the text.
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// The split of a `datasets` folder with several [default: train].
    #[arg(long)]
    pub split: Option<String>,
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    /// A masklm checkpoint, a Hugging Face folder or a Hub model id (org/name[@revision]): its
    /// tokenizer is audited.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Rows in each table.
    #[arg(long, default_value_t = 20)]
    pub top: usize,
    /// Print the audit as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ExtendArgs {
    /// A masklm checkpoint, a Hugging Face folder or a Hub model id (org/name[@revision]),
    /// with its tokenizer.
    #[arg(long)]
    pub model: PathBuf,
    /// The corpus to pick words from (with --add).
    #[arg(long, num_args = 1.., required_unless_present = "words")]
    pub input: Vec<String>,
    #[arg(long, default_value = "text")]
    pub text_field: String,
    /// The split of a `datasets` folder with several [default: train].
    #[arg(long)]
    pub split: Option<String>,
    /// How many new tokens (vocabulary rows) to add at most. Words are taken by tokens saved
    /// (count x (pieces - 1)); a BPE word of P pieces needs up to P - 1 new tokens (the
    /// prefixes its merges build), a WordPiece word one; a word needing more than is left is
    /// skipped.
    #[arg(long, requires = "input")]
    pub add: Option<usize>,
    /// Only words seen at least this many times are candidates.
    #[arg(long, default_value_t = 10)]
    pub min_count: u64,
    /// Add these words instead (one per line; `#` comments), each with the new tokens it
    /// needs, however many.
    #[arg(long, conflicts_with = "add")]
    pub words: Option<PathBuf>,
    /// The Hugging Face folder to write.
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite files in a non-empty --out.
    #[arg(long)]
    pub force: bool,
}

pub fn vocab_cmd(command: VocabCommand, device: &Device) -> Result<()> {
    match command {
        VocabCommand::Audit(args) => audit_cmd(args),
        VocabCommand::Extend(args) => extend_cmd(args, device),
    }
}

fn options(text_field: &str, split: Option<&str>) -> CorpusOptions {
    CorpusOptions {
        text_field: text_field.to_string(),
        split: split.map(str::to_string),
        ..CorpusOptions::default()
    }
}

/// The tokenizer folder of a model path (a checkpoint's `best`/`latest`/run folder resolved,
/// a Hub model id found in the cache or downloaded).
fn tokenizer_of(model: &std::path::Path) -> Result<masklm_data::MlmTokenizer> {
    let dir = masklm_hub::resolve_model(model, masklm_hub::Need::Tokenizer)?;
    let dir = masklm_infer::checkpoint::resolve_checkpoint(&dir);
    load_tokenizer(&dir).with_context(|| format!("loading the tokenizer of {}", model.display()))
}

/// Reads the word counts of a corpus, warning about the lines it skipped.
fn counted(
    inputs: &[String],
    text_field: &str,
    split: Option<&str>,
) -> Result<masklm_data::vocab::WordCounts> {
    let counts = count_words(inputs, &options(text_field, split))?;
    if let Some(note) = counts.corpus.skipped_note() {
        eprintln!("warning: {note}: their words are not counted; convert the files to UTF-8");
    }
    Ok(counts)
}

fn print_table(title: &str, rows: &[WordPieces]) {
    println!("\n{title}");
    println!("  {:>9}  {:>6}  {:<24} pieces", "count", "tokens", "word");
    for row in rows {
        println!(
            "  {:>9}  {:>6}  {:<24} {}",
            row.count,
            row.pieces.len(),
            row.word,
            row.pieces.join(" ")
        );
    }
}

fn audit_cmd(args: AuditArgs) -> Result<()> {
    let tokenizer = tokenizer_of(&args.model)?;
    let counts = counted(
        &args.corpus.input,
        &args.corpus.text_field,
        args.corpus.split.as_deref(),
    )?;
    let audit = audit(&tokenizer, &counts, args.top.max(1))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&audit)?);
        return Ok(());
    }
    println!(
        "{} documents, {} words ({} distinct): {:.3} tokens per word; {:.3} over the {} most \
         frequent words",
        audit.documents,
        audit.words,
        audit.unique_words,
        audit.tokens_per_word,
        audit.top_tokens_per_word,
        audit.top.len()
    );
    print_table("most frequent words", &audit.top);
    print_table(
        "most frequent words split into 3+ tokens",
        &audit.fragmented,
    );
    Ok(())
}

fn read_words(path: &std::path::Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let head = &bytes[..bytes.len().min(masklm_data::sniff::SNIFF_BYTES)];
    if let Some(kind) = masklm_data::sniff::sniff(head) {
        let path = path.to_path_buf();
        return Err(masklm_data::DataError::NotText { path, kind }.into());
    }
    let text = String::from_utf8(bytes)
        .with_context(|| format!("{} is not UTF-8 text; convert it to UTF-8", path.display()))?;
    let words: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .collect();
    if let Some((n, line)) = text
        .lines()
        .enumerate()
        .find(|(_, l)| !l.trim().starts_with('#') && l.trim().contains(char::is_whitespace))
    {
        bail!(
            "{}:{}: {:?} holds a space; give one word per line",
            path.display(),
            n + 1,
            line.trim()
        );
    }
    if words.is_empty() {
        bail!("{} lists no word", path.display());
    }
    Ok(words)
}

/// Refuses an `--out` that is a file, holds files (without `--force`), or overlaps the model
/// or the corpus it is built from.
fn check_out(args: &ExtendArgs) -> Result<()> {
    if args.out.is_file() {
        bail!("--out {} is a file; give a folder", args.out.display());
    }
    let model = masklm_hub::resolve_model(&args.model, masklm_hub::Need::Model)?;
    let model = masklm_infer::checkpoint::resolve_checkpoint(&model);
    crate::out_path::refuse_overlap(&args.out, &model, "--model")?;
    crate::out_path::refuse_overlap_inputs(&args.out, &args.input, "--input")?;
    if let Some(words) = &args.words {
        crate::out_path::refuse_overlap(&args.out, words, "--words")?;
    }
    if crate::out_path::occupied(&args.out) && !args.force {
        bail!(
            "--out {} is not empty; choose an empty folder, or add --force to overwrite its files",
            args.out.display()
        );
    }
    Ok(())
}

/// The corpus words worth the most tokens saved that fit in `max_tokens` new tokens.
fn words_to_add(args: &ExtendArgs, max_tokens: usize) -> Result<Vec<String>> {
    let tokenizer = tokenizer_of(&args.model)?;
    let counts = counted(&args.input, &args.text_field, args.split.as_deref())?;
    let ranked = candidates(&tokenizer, &counts, usize::MAX, args.min_count)?;
    if ranked.is_empty() {
        bail!(
            "no word is seen {} times and split into 2+ tokens; lower --min-count",
            args.min_count
        );
    }
    let (chosen, skipped) = masklm_train::vocab::words_within(&tokenizer, ranked, max_tokens);
    if let Some(first) = skipped.first() {
        eprintln!(
            "note: skipped {} better-ranked word(s) needing more new tokens than --add {max_tokens} \
             left, e.g. {:?} ({} pieces)",
            skipped.len(),
            first.word,
            first.pieces.len()
        );
    }
    if chosen.is_empty() {
        bail!("no candidate word fits in --add {max_tokens} new tokens; raise --add");
    }
    print_table(
        "words to add (ranked by tokens saved = count x (pieces - 1))",
        &chosen,
    );
    Ok(chosen.into_iter().map(|w| w.word).collect())
}

fn extend_cmd(args: ExtendArgs, device: &Device) -> Result<()> {
    check_out(&args)?;
    let words: Vec<String> = match (&args.words, args.add) {
        (Some(path), _) => read_words(path)?,
        (None, Some(0)) => bail!("--add 0 adds nothing; give the number of new tokens to add"),
        (None, Some(n)) => words_to_add(&args, n)?,
        (None, None) => bail!("give --add N (with --input) or --words FILE"),
    };
    let report = masklm_train::extend_vocabulary(&args.model, &words, args.add, &args.out, device)
        .with_context(|| format!("extending the vocabulary of {}", args.model.display()))?;
    let whole = report.added.iter().filter(|t| t.word.is_some()).count();
    println!(
        "\nvocab_size {} -> {}: {} new tokens, {whole} words and {} BPE prefixes; rows \
         initialised as the mean of each word's old pieces",
        report.old_vocab_size,
        report.new_vocab_size,
        report.added.len(),
        report.added.len() - whole
    );
    if !report.dropped.is_empty() {
        println!(
            "left out to stay within --add: {}",
            report.dropped.join(", ")
        );
    }
    if !report.already_single.is_empty() {
        println!("already one token: {}", report.already_single.join(", "));
    }
    if !report.not_single.is_empty() {
        eprintln!(
            "warning: still split after extension: {}",
            report.not_single.join(", ")
        );
    }
    println!(
        "wrote {} (Hugging Face folder; continue training with [model] init_from = {:?})",
        report.out.display(),
        report.out.display().to_string()
    );
    Ok(())
}
