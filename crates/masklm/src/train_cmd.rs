//! `masklm train`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use masklm_train::{
    EvalResult, Observer, ProbeReport, RunInfo, Start, StepLog, TrainConfig, train,
};

#[derive(Args, Debug)]
pub struct TrainArgs {
    /// Training config (TOML), e.g. configs/quickstart.toml. With --resume: optional, a new
    /// config for the run (checked against the run's config.toml: only the keys a resume may
    /// change can differ); without it the run's own config.toml is used.
    #[arg(long, required_unless_present = "resume")]
    pub config: Option<PathBuf>,
    /// Run directory: config.toml, checkpoints/, metrics.jsonl, tensorboard/.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Override a config value: --set optimizer.lr=3e-4 (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    pub overrides: Vec<String>,
    /// Continue the run in RUN_DIR from its latest checkpoint, exactly.
    #[arg(long, value_name = "RUN_DIR", conflicts_with = "out")]
    pub resume: Option<PathBuf>,
    /// With --resume: the checkpoint to continue from (`step-0000100`, or a path) instead of
    /// the latest valid one.
    #[arg(long, value_name = "CHECKPOINT", requires = "resume")]
    pub from: Option<String>,
}

struct Bar {
    bar: ProgressBar,
}

impl Bar {
    /// A line above the bar, or on stdout when there is no terminal to draw the bar on.
    fn say(&self, line: String) {
        if self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }
}

impl Observer for Bar {
    fn on_start(&self, info: &RunInfo) {
        self.bar.set_length(info.total_steps as u64);
        self.bar.set_position(info.start_step as u64);
        self.say(format!(
            "model: {:.2}M parameters; data: {} train / {} validation examples from {}{}",
            info.parameters as f64 / 1e6,
            info.train_examples,
            info.validation_examples,
            info.cache.display(),
            if info.cache_reused {
                " (cache reused)"
            } else {
                ""
            }
        ));
        if let Some(checkpoint) = &info.resumed_from {
            self.say(format!(
                "resuming at step {} from {}",
                info.start_step,
                checkpoint.display()
            ));
        }
    }

    fn on_step(&self, log: &StepLog) {
        self.bar.set_position(log.step as u64);
        if log.skipped && log.masked == 0 {
            self.say(format!(
                "step {}: skipped: no token of the step's batches was masked (very short \
                 examples or a very small masking.probability: raise data.max_seq_length or \
                 the probability, or drop one-word lines); the weights are unchanged",
                log.step
            ));
        } else if log.skipped {
            self.say(format!(
                "step {}: skipped (loss {}, gradient norm {}); the weights are unchanged",
                log.step, log.loss, log.grad_norm
            ));
        }
        let loss = if log.skipped {
            "skipped".to_string()
        } else {
            format!("{:.4}", log.loss)
        };
        self.bar.set_message(format!(
            "loss {loss}  lr {:.2e}  {:.0} tok/s",
            log.lr, log.tokens_per_second
        ));
    }

    fn on_eval(&self, step: usize, set: &str, r: &EvalResult) {
        self.say(format!(
            "step {step}: {set} loss {:.4}  perplexity {:.2}  accuracy {:.3}  ({} masked tokens)",
            r.loss, r.perplexity, r.accuracy, r.tokens
        ));
    }

    fn on_probes(&self, step: usize, report: &ProbeReport) {
        self.say(format!(
            "step {step}: probes MRR {:.3}  top-1 {:.2}  top-5 {:.2}  ({} probes)",
            report.mrr,
            report.top1,
            report.top5,
            report.probes.len()
        ));
    }

    fn on_checkpoint(&self, path: &Path) {
        self.say(format!("saved {}", path.display()));
    }

    fn on_notice(&self, message: &str) {
        self.bar.suspend(|| eprintln!("warning: {message}"));
    }
}

pub fn train_cmd(args: TrainArgs, device: &Device) -> Result<()> {
    let (config_path, run_dir, resume) = match (&args.resume, &args.config) {
        (Some(run_dir), Some(config)) => (config.clone(), run_dir.clone(), true),
        (Some(run_dir), None) => (run_dir.join("config.toml"), run_dir.clone(), true),
        (None, Some(config)) => {
            let name = config
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "run".to_string());
            let run_dir = args
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("runs").join(name));
            (config.clone(), run_dir, false)
        }
        (None, None) => bail!("give --config FILE or --resume RUN_DIR"),
    };
    let config = TrainConfig::load(&config_path, &args.overrides)
        .with_context(|| format!("loading training config {}", config_path.display()))?;

    // Ctrl-C: finish the current step, save a checkpoint, and stop. A second Ctrl-C exits now.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupted: saving a checkpoint after this step (Ctrl-C again to quit now)");
    });

    let bar = ProgressBar::new(1);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let observer = Bar { bar };
    let start = if resume {
        Start::Resume {
            from: args.from.clone(),
        }
    } else {
        Start::New
    };
    let outcome = train(&config, &run_dir, start, device, &observer, &stop)
        .with_context(|| format!("training in {}", run_dir.display()))?;
    observer.bar.finish_and_clear();
    if outcome.interrupted {
        println!(
            "stopped at step {}; continue with: masklm train --resume {}",
            outcome.last_step,
            run_dir.display()
        );
    } else {
        println!(
            "finished {} steps; checkpoint {}",
            outcome.last_step,
            outcome.checkpoint.display()
        );
    }
    if let Some(reason) = &outcome.stopped_early {
        println!("{reason}");
    }
    if let (Some(first), Some(last)) = (&outcome.first_report, &outcome.final_report) {
        for (name, before) in &first.sets {
            let Some(after) = last.get(name) else {
                continue;
            };
            println!(
                "{name} perplexity {:.2} -> {:.2} ({:.2}x), accuracy {:.3} -> {:.3}",
                before.perplexity,
                after.perplexity,
                before.perplexity / after.perplexity,
                before.accuracy,
                after.accuracy
            );
        }
        if let (Some(before), Some(after)) = (&first.probes, &last.probes) {
            println!(
                "probes MRR {:.3} -> {:.3}, top-5 {:.2} -> {:.2}",
                before.mrr, after.mrr, before.top5, after.top5
            );
        }
    }
    println!("metrics: {}", run_dir.join("metrics.jsonl").display());
    Ok(())
}
