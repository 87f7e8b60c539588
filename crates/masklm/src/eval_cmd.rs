//! `masklm eval` and `masklm export`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use clap::Args;
use masklm_data::{
    MaskingConfig, NoProgress, Packing, PrepareOptions, SplitReader, Validation, load_tokenizer,
    prepare, read_manifest,
};
use masklm_model::RobertaForMaskedLM;
use masklm_train::{EvalSettings, evaluate};
use serde_json::json;

use crate::data_cmd::CorpusArgs;
use crate::fill_mask::load_model;

#[derive(Args, Debug)]
pub struct EvalArgs {
    /// A masklm checkpoint or a Hugging Face folder (with its tokenizer files).
    #[arg(long)]
    pub model: PathBuf,
    #[command(flatten)]
    pub corpus: CorpusArgs,
    /// Tokens per example (default: 512, or less if the model's positions allow less).
    #[arg(long)]
    pub max_seq_length: Option<usize>,
    /// full: fixed-length blocks of concatenated documents; line: one document per example.
    #[arg(long, default_value = "full")]
    pub packing: Packing,
    /// Masking seed: the same seed gives the same masks, so results are comparable.
    #[arg(long, default_value_t = 1234)]
    pub seed: u64,
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Also compute pseudo-perplexity (Salazar et al. 2020): mask each token of each line in
    /// turn. One forward pass per token: use on small line-by-line sets.
    #[arg(long)]
    pub pseudo_perplexity: bool,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

pub fn eval_cmd(args: EvalArgs, device: &Device) -> Result<()> {
    let loaded = load_model(&args.model, device)
        .with_context(|| format!("loading {}", args.model.display()))?;
    let (config, model) = (loaded.config, loaded.model);
    let tokenizer = load_tokenizer(&loaded.dir).with_context(|| {
        format!(
            "{} needs its tokenizer files to evaluate text",
            loaded.dir.display()
        )
    })?;
    masklm_train::check_tokenizer_fits(&tokenizer, &config)?;
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
        Some(pseudo_perplexity(
            &model,
            &split,
            &vocab,
            args.batch_size,
            device,
        )?)
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
        });
        if let (Some(p), Some(o)) = (pseudo, doc.as_object_mut()) {
            o.insert("pseudo_perplexity".to_string(), json!(p));
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
            println!("pseudo-perplexity {p:.3}");
        }
    }
    Ok(())
}

/// exp of the mean of -log p(token | all other tokens), masking each non-special token once.
fn pseudo_perplexity(
    model: &RobertaForMaskedLM,
    split: &SplitReader,
    vocab: &masklm_data::MaskVocab,
    batch_size: usize,
    device: &Device,
) -> Result<f64> {
    let mut nll = 0.0f64;
    let mut count = 0u64;
    for i in 0..split.len() {
        let Some(tokens) = split.get(i) else { continue };
        let seq = tokens.len();
        let targets: Vec<usize> = (0..seq).filter(|&p| !vocab.is_special(tokens[p])).collect();
        for chunk in targets.chunks(batch_size) {
            let rows = chunk.len();
            let mut ids = Vec::with_capacity(rows * seq);
            for &p in chunk {
                ids.extend(tokens.iter().enumerate().map(|(j, &t)| {
                    if j == p {
                        vocab.mask_id as i64
                    } else {
                        t as i64
                    }
                }));
            }
            let positions: Vec<i64> = chunk
                .iter()
                .enumerate()
                .map(|(r, &p)| (r * seq + p) as i64)
                .collect();
            let labels: Vec<i64> = chunk.iter().map(|&p| tokens[p] as i64).collect();
            let input = Tensor::<2, Int>::from_data(TensorData::new(ids, [rows, seq]), device);
            let attention = Tensor::<2, Int>::ones([rows, seq], device);
            let positions = Tensor::<1, Int>::from_data(TensorData::new(positions, [rows]), device);
            let labels = Tensor::<2, Int>::from_data(TensorData::new(labels, [rows, 1]), device);
            let log_probs = log_softmax(model.forward_at(input, attention, positions), 1);
            nll -= log_probs.gather(1, labels).sum().into_scalar::<f32>() as f64;
            count += rows as u64;
        }
    }
    if count == 0 {
        bail!("no maskable token for pseudo-perplexity");
    }
    Ok((nll / count as f64).exp())
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
    let checkpoint = masklm_train::checkpoint::resolve_checkpoint(&args.checkpoint);
    if !masklm_train::checkpoint::is_checkpoint(&checkpoint) {
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
    let occupied = std::fs::read_dir(&args.out).is_ok_and(|mut entries| entries.next().is_some());
    if occupied && !args.force {
        bail!(
            "--out {} is not empty; choose an empty folder, or add --force to overwrite its files",
            args.out.display()
        );
    }
    let (config, model) = masklm_train::checkpoint::load_model(&checkpoint, device, |_| {})?;
    masklm_hub::export_model(&model, &config, Some(&checkpoint), &args.out)?;
    println!(
        "exported {} -> {} (load with AutoModelForMaskedLM.from_pretrained or pipeline(\"fill-mask\", model=...))",
        args.checkpoint.display(),
        args.out.display()
    );
    Ok(())
}
