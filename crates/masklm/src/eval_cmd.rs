//! `masklm eval` and `masklm export`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use masklm_data::{
    MaskingConfig, NoProgress, Packing, PrepareOptions, SplitReader, Validation, prepare,
    read_manifest,
};
use masklm_infer::{EvalSettings, evaluate};
use serde_json::json;

use crate::data_cmd::CorpusArgs;
use crate::fill_mask::load_model_and_tokenizer;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A masklm checkpoint, a Hugging Face folder or a Hub model id (org/name[@revision]), with
    /// its tokenizer files.
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Tokens per example (default: 512, or less if the model's positions allow less).
    #[arg(long)]
    pub max_seq_length: Option<usize>,
    /// full: fixed-length blocks of concatenated documents; line (or documents): one document
    /// per example.
    #[arg(long, default_value = "full")]
    pub packing: Packing,
    /// Masking seed: the same seed gives the same masks, so results are comparable.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Also compute pseudo-perplexity (Salazar et al. 2020): mask each token of each line in
    /// turn. One forward pass per token: use on small sets. Reported per token and per word
    /// (the same log-likelihood over the text's words: comparable between a model and its
    /// `vocab extend`ed copy when the whole text is scored, e.g. `--packing full`).
    #[arg(long)]
    pub pseudo_perplexity: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn eval_cmd(args: EvalArgs, device: &Device) -> Result<()> {
    let loaded = load_model_and_tokenizer(&args.model, device, "to evaluate text")?;
    let (config, model, tokenizer) = (loaded.config, loaded.model, loaded.tokenizer);
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let max_seq_length = args
        .max_seq_length
        .unwrap_or(512)
        .min(config.max_sequence_length());
    let work = tempfile::tempdir().context("creating a temporary folder for the token cache")?;
    let cache = work.path().join("cache");
    let options = PrepareOptions {
        max_seq_length,
        packing: args.packing,
        validation: Validation::None,
        corpus: args.corpus.options(),
    };
    prepare(
        &tokenizer,
        &args.corpus.input,
        &options,
        &cache,
        &NoProgress,
    )?;
    let manifest = read_manifest(&cache)?;
    let split = SplitReader::open(&cache, &manifest, "train")?;
    // Cut documents are scored only up to the cut (perplexity and pseudo-perplexity alike).
    let cut = &manifest.train;
    let limit = config.max_sequence_length();
    let advice = if max_seq_length < limit {
        format!("raise --max-seq-length (this model takes up to {limit}) or use --packing full")
    } else {
        "use --packing full to score every token".to_string()
    };
    if let Some(note) = cut.truncation_notice(max_seq_length, "not scored", &advice) {
        eprintln!("note: {note}");
    }
    let vocab = tokenizer.mask_vocab()?;
    let settings = EvalSettings {
        masking: MaskingConfig::default(),
        seed: args.seed,
        batch_size: args.batch_size,
        max_batches: 0,
    };
    let result = evaluate(&model, &split, &vocab, &settings, device);
    if result.tokens == 0 {
        bail!("no token was masked: the input is too short to evaluate");
    }
    let pseudo = if args.pseudo_perplexity {
        let continuous = args.packing == Packing::Full;
        let p = masklm_infer::pseudo_perplexity(
            &model,
            &split,
            &vocab,
            args.batch_size,
            continuous,
            device,
        );
        Some(p.context("no maskable token for pseudo-perplexity")?)
    } else {
        None
    };
    if args.json {
        let mut doc = json!({
            "perplexity": result.perplexity,
            "loss": result.loss,
            "accuracy": result.accuracy,
            "tokens": result.tokens,
            "examples": split.len(),
            "seed": args.seed,
            "truncated_documents": cut.truncated,
            "truncated_tokens": cut.truncated_tokens,
        });
        if let (Some(p), Some(o)) = (pseudo, doc.as_object_mut()) {
            o.insert("pseudo_perplexity".to_string(), json!(p.per_token));
            o.insert("pseudo_perplexity_per_word".to_string(), json!(p.per_word));
            o.insert("pseudo_tokens".to_string(), json!(p.tokens));
            o.insert("words".to_string(), json!(p.words));
        }
        println!("{doc}");
    } else {
        println!(
            "perplexity {:.3}  loss {:.4}  accuracy {:.4}  masked tokens {}  examples {}",
            result.perplexity,
            result.loss,
            result.accuracy,
            result.tokens,
            split.len()
        );
        if let Some(p) = pseudo {
            println!(
                "pseudo-perplexity {:.3} per token ({} tokens), {:.3} per word ({} words)",
                p.per_token, p.tokens, p.per_word, p.words
            );
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// A masklm checkpoint folder (runs/NAME/checkpoints/step-..., `best`, `latest`, or the
    /// run folder for its latest).
    #[arg(long)]
    pub checkpoint: PathBuf,
    /// Output folder for the Hugging Face files (must be empty or absent unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Overwrite the files of a non-empty --out folder.
    #[arg(long)]
    pub force: bool,
}

pub fn export_cmd(args: ExportArgs, device: &Device) -> Result<()> {
    let checkpoint = masklm_infer::checkpoint::resolve_checkpoint(&args.checkpoint);
    if !masklm_infer::checkpoint::is_checkpoint(&checkpoint) {
        bail!(
            "{} is not a masklm checkpoint (no model.bpk + manifest.json); give a folder such as runs/NAME/checkpoints/step-0000100",
            args.checkpoint.display()
        );
    }
    if args.out.is_file() {
        bail!(
            "--out {} is a file; give a folder for the Hugging Face files",
            args.out.display()
        );
    }
    crate::out_path::refuse_overlap(&args.out, &checkpoint, "--checkpoint")?;
    if crate::out_path::occupied(&args.out) && !args.force {
        bail!(
            "--out {} is not empty; choose an empty folder, or add --force to overwrite its files",
            args.out.display()
        );
    }
    let _lock = masklm_data::lock_folder(&args.out, "export")?;
    let loaded = masklm_infer::load_model(&checkpoint, device)?;
    // Built beside --out and moved in whole: a failed export leaves --out as it was.
    let staging = masklm_hub::Staging::new(&args.out)?;
    masklm_hub::export_model(
        &loaded.model,
        &loaded.config,
        Some(&checkpoint),
        staging.path(),
    )?;
    staging.publish()?;
    println!(
        "exported {} -> {} (load with AutoModelForMaskedLM.from_pretrained or pipeline(\"fill-mask\", model=...))",
        args.checkpoint.display(),
        args.out.display()
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// A masklm checkpoint, a Hugging Face folder or a Hub model id (org/name[@revision]), with
    /// its tokenizer files.
    #[arg(long)]
    pub model: PathBuf,
    /// Tab-separated probes: a sentence with one <mask>, then its accepted answers.
    #[arg(long)]
    pub probes: PathBuf,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// `masklm probe`: the knowledge probes of `[eval] probes`, on any model.
pub fn probe_cmd(args: ProbeArgs, device: &Device) -> Result<()> {
    let loaded = load_model_and_tokenizer(&args.model, device, "to rank the probes' answers")?;
    let tokenizer = &loaded.tokenizer;
    let (probes, notices) = masklm_infer::load_probes_from(
        &args.probes,
        tokenizer,
        loaded.config.max_sequence_length(),
        "--probes",
    )
    .with_context(|| format!("reading --probes {}", args.probes.display()))?;
    for notice in notices {
        eprintln!("warning: {notice}");
    }
    let report = masklm_infer::run_probes(&loaded.model, &probes, tokenizer, device)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{:>5}  {:>6}  {:>8}  {:<16} {:<16} sentence",
        "line", "rank", "prob", "answer", "top"
    );
    for (result, probe) in report.probes.iter().zip(&probes) {
        println!(
            "{:>5}  {:>6}  {:>8.4}  {:<16} {:<16} {}",
            result.line, result.rank, result.probability, result.answer, result.top, probe.text
        );
    }
    println!(
        "MRR {:.3}  top-1 {:.2}  top-5 {:.2}  ({} probes)",
        report.mrr,
        report.top1,
        report.top5,
        report.probes.len()
    );
    Ok(())
}
