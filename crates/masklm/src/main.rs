//! `masklm`: masked-language-model pre-training and domain adaptation on burn.
//!
//! The binary is a thin layer: argument parsing (clap), error reporting (anyhow), and calls
//! into the library crates.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use burn::tensor::activation::softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use clap::{Parser, Subcommand};

mod data_cmd;
mod progress;

#[derive(Parser)]
#[command(
    name = "masklm",
    version,
    about = "Masked-language-model pre-training on burn"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tokenizer tools.
    Tokenizer {
        #[command(subcommand)]
        command: TokenizerCommand,
    },
    /// Tokenize and pack a corpus into a memory-mapped token cache (reused when up to date).
    Prepare(data_cmd::PrepareArgs),
    /// Print a checkpoint's configuration and parameter count.
    Inspect {
        /// A Hugging Face checkpoint folder (config.json + model.safetensors).
        #[arg(long)]
        model: PathBuf,
    },
    /// Rank the vocabulary at each <mask> of a token-id sequence.
    ///
    /// Until tokenizers land, the input is token ids: `--ids "0 17 4 9 2"`, where the mask id is
    /// given by --mask-id (RoBERTa convention: 4).
    FillMask {
        /// A Hugging Face checkpoint folder (config.json + model.safetensors).
        #[arg(long)]
        model: PathBuf,
        /// Space-separated token ids, specials included.
        #[arg(long)]
        ids: String,
        /// The id of the mask token.
        #[arg(long, default_value_t = 4)]
        mask_id: i64,
        /// How many candidates to print per mask.
        #[arg(long, default_value_t = 5)]
        top_k: usize,
    },
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a byte-level BPE tokenizer (RoBERTa convention) on a corpus.
    Train(data_cmd::TokenizerTrainArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            // Print the whole chain, one cause per line, for a person to act on.
            let mut stderr = std::io::stderr().lock();
            let _ = writeln!(stderr, "error: {error}");
            for cause in error.chain().skip(1) {
                let _ = writeln!(stderr, "  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let device = Device::flex();
    match cli.command {
        Command::Tokenizer {
            command: TokenizerCommand::Train(args),
        } => data_cmd::tokenizer_train(args),
        Command::Prepare(args) => data_cmd::prepare_cmd(args),
        Command::Inspect { model } => inspect(&model, &device),
        Command::FillMask {
            model,
            ids,
            mask_id,
            top_k,
        } => fill_mask_ids(&model, &ids, mask_id, top_k, &device),
    }
}

fn inspect(dir: &std::path::Path, device: &Device) -> Result<()> {
    let (config, model, report) = masklm_hub::load_roberta(dir, device)?;
    use burn::module::Module;
    println!("{}", config.to_json());
    println!("parameters: {}", model.num_params());
    for name in &report.unexpected {
        println!(
            "warning: unused tensor {name} in {}",
            report.weights.display()
        );
    }
    Ok(())
}

fn fill_mask_ids(
    dir: &std::path::Path,
    ids: &str,
    mask_id: i64,
    top_k: usize,
    device: &Device,
) -> Result<()> {
    let ids: Vec<i64> = ids
        .split_whitespace()
        .map(|t| {
            t.parse::<i64>()
                .with_context(|| format!("--ids: {t:?} is not a token id"))
        })
        .collect::<Result<_>>()?;
    if ids.is_empty() {
        bail!("--ids is empty: give the token ids of one sequence, e.g. --ids \"0 17 4 9 2\"");
    }
    let (config, model, report) = masklm_hub::load_roberta(dir, device)
        .with_context(|| format!("loading checkpoint {}", dir.display()))?;
    for name in &report.unexpected {
        eprintln!(
            "warning: unused tensor {name} in {}",
            report.weights.display()
        );
    }
    if let Some(bad) = ids
        .iter()
        .find(|&&id| id < 0 || id as usize >= config.vocab_size)
    {
        bail!(
            "--ids: token id {bad} is outside the vocabulary (vocab_size {})",
            config.vocab_size
        );
    }
    if ids.len() > config.max_sequence_length() {
        bail!(
            "--ids: {} tokens, but this model takes at most {}",
            ids.len(),
            config.max_sequence_length()
        );
    }
    let masks: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == mask_id).collect();
    if masks.is_empty() {
        bail!(
            "--ids has no mask token (id {mask_id}); put {mask_id} where a token should be predicted"
        );
    }
    let seq = ids.len();
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [1, seq]), device);
    let attention = Tensor::<2, Int>::ones([1, seq], device);
    let positions: Vec<i64> = masks.iter().map(|&p| p as i64).collect();
    let positions = Tensor::<1, Int>::from_data(TensorData::new(positions, [masks.len()]), device);
    let probs = softmax(model.forward_at(input, attention, positions), 1);
    let probs: Vec<f32> = probs
        .into_data()
        .try_to_vec()
        .map_err(|e| anyhow::anyhow!("reading model output: {e:?}"))?;
    let vocab = config.vocab_size;
    for (i, &position) in masks.iter().enumerate() {
        let row = &probs[i * vocab..(i + 1) * vocab];
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]));
        println!("mask at position {position}:");
        for &id in order.iter().take(top_k) {
            println!("  {id:>6}  {:.4}", row[id]);
        }
    }
    Ok(())
}
