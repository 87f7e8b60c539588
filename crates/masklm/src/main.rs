//! `masklm`: masked-language-model pre-training and domain adaptation on burn.
//!
//! The binary is a thin layer: argument parsing (clap), error reporting (anyhow), and calls
//! into the library crates.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use burn::tensor::Device;
use clap::{Parser, Subcommand};

mod backend;
mod data_cmd;
mod eval_cmd;
mod fill_mask;
mod out_path;
mod progress;
mod serve_cmd;
mod train_cmd;
mod vocab_cmd;

#[derive(Parser)]
#[command(
    name = "masklm",
    version,
    about = "Masked-language-model pre-training on burn"
)]
struct Cli {
    /// Compute backend: cpu (pure Rust, always built), wgpu or tch (optional Cargo features).
    #[arg(long, global = true, value_enum, default_value = "cpu")]
    backend: backend::Backend,
    /// Device of the backend: cpu; wgpu: auto, discrete[:N], integrated[:N], virtual[:N];
    /// tch: cpu, cuda[:N], mps.
    #[arg(long, global = true)]
    device: Option<String>,
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
    /// Pre-train from scratch or continue a checkpoint, evaluating and checkpointing.
    Train(train_cmd::TrainArgs),
    /// Perplexity and masked accuracy of a checkpoint on held-out text.
    Eval(eval_cmd::EvalArgs),
    /// Write a checkpoint as a Hugging Face folder (transformers loads it as is).
    Export(eval_cmd::ExportArgs),
    /// Tokenize and pack a corpus into a memory-mapped token cache (reused when up to date).
    Prepare(data_cmd::PrepareArgs),
    /// Print a checkpoint's configuration and parameter count.
    Inspect {
        /// A masklm checkpoint, a Hugging Face folder (config.json + model.safetensors), or a
        /// Hub model id (org/name[@revision]).
        #[arg(long)]
        model: PathBuf,
    },
    /// Rank predictions at each mask of a text, like transformers' pipeline("fill-mask").
    FillMask(fill_mask::FillMaskArgs),
    /// Rank the expected answers of knowledge probes (cloze sentences) under a model.
    Probe(eval_cmd::ProbeArgs),
    /// Audit how a tokenizer splits a domain's words, and extend a model's vocabulary.
    Vocab {
        #[command(subcommand)]
        command: vocab_cmd::VocabCommand,
    },
    /// Serve fill-mask and scoring over HTTP, with a web page to compare models and watch runs.
    Serve(serve_cmd::ServeArgs),
    /// Write a run's curves, last evaluation and config as one static HTML file.
    Report(serve_cmd::ReportArgs),
}

#[derive(Subcommand)]
enum TokenizerCommand {
    /// Train a tokenizer on a corpus: byte-level BPE (RoBERTa), WordPiece (BERT) or Unigram (XLM-R).
    Train(data_cmd::TokenizerTrainArgs),
}

fn main() -> ExitCode {
    // `masklm ... | head` should end quietly when the reader goes away, as other Unix tools
    // do, not panic in println!: restore the default SIGPIPE action that Rust's runtime ignores.
    #[cfg(unix)]
    // SAFETY: called before any other thread exists; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    // burn loads a checkpoint's optimizer state onto its default device, the first backend
    // compiled in (wgpu in a wgpu build: Vulkan opened, and the moments uploaded, for a CPU
    // run), until the first step moves it. The chosen backend is the default instead.
    if std::env::var_os("BURN_DEVICE").is_none() {
        let name = match cli.backend {
            backend::Backend::Cpu => "flex",
            other => other.name(),
        };
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("BURN_DEVICE", name) };
    }
    // Models named by Hub id are downloaded deep inside the loaders; their bar is this one.
    masklm_hub::set_download_progress(Box::new(progress::Bar::new()));
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
    let device = backend::device(cli.backend, cli.device.as_deref())?;
    match cli.command {
        Command::Tokenizer {
            command: TokenizerCommand::Train(args),
        } => data_cmd::tokenizer_train(args),
        Command::Prepare(args) => data_cmd::prepare_cmd(args),
        Command::Train(args) => train_cmd::train_cmd(args, &device),
        Command::Eval(args) => eval_cmd::eval_cmd(args, &device),
        Command::Export(args) => eval_cmd::export_cmd(args, &device),
        Command::Inspect { model } => inspect(&model, &device),
        Command::FillMask(args) => fill_mask::fill_mask(args, &device),
        Command::Probe(args) => eval_cmd::probe_cmd(args, &device),
        Command::Vocab { command } => vocab_cmd::vocab_cmd(command, &device),
        Command::Serve(args) => serve_cmd::serve_cmd(args, &device),
        Command::Report(args) => serve_cmd::report_cmd(args),
    }
}

/// Prints a model's config, size and stored dtypes: a Hugging Face folder or a masklm
/// checkpoint (step folder, run folder, `best`/`latest`).
fn inspect(path: &std::path::Path, device: &Device) -> Result<()> {
    use burn::module::Module;
    let loaded = masklm_infer::load_model(path, device)?;
    println!("{}", loaded.config.to_json());
    match &loaded.origin {
        masklm_infer::Origin::Checkpoint => {
            println!("masklm checkpoint: {}", loaded.dir.display());
            println!("parameters: {}", loaded.model.num_params());
            println!("stored dtype: F32");
        }
        masklm_infer::Origin::Hub(report) => {
            println!("parameters: {}", loaded.model.num_params());
            println!(
                "stored dtype: {} (loaded as F32)",
                report.stored_dtypes.join(", ")
            );
            for name in &report.unexpected {
                println!(
                    "warning: unused tensor {name} in {}",
                    report.weights.display()
                );
            }
        }
    }
    Ok(())
}
