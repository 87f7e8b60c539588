//! `masklm serve` and `masklm report`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use masklm_serve::{Batching, Limits, ServeOptions, Server};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// A model to serve: DIR (named after the folder) or NAME=DIR; repeat for several. DIR is
    /// a checkpoint, a run folder (its latest checkpoint), a Hugging Face folder or a Hub model
    /// id (org/name[@revision]). The first answers requests that name no model.
    #[arg(long = "model", required = true)]
    pub models: Vec<String>,
    /// A training run to show as a tab of the web page (its curves, refreshed while it
    /// trains): RUN_DIR or NAME=RUN_DIR; repeat for several.
    #[arg(long = "run")]
    pub runs: Vec<String>,
    /// Address to listen on. The default answers this machine only; 0.0.0.0 opens the API to
    /// anyone who can reach the port (it has no authentication).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: IpAddr,
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most sequences run as one batch; 1 turns batching off.
    #[arg(long, default_value_t = 32)]
    pub max_batch: usize,
    /// How long (milliseconds) the first request of a batch waits for others.
    #[arg(long, default_value_t = 2)]
    pub batch_window_ms: u64,
    /// Requests waiting for the model before the server answers 503.
    #[arg(long, default_value_t = 1024)]
    pub queue: usize,
    /// Largest request body in bytes (413 beyond).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Most inputs in one request (422 beyond).
    #[arg(long, default_value_t = 64)]
    pub max_inputs: usize,
    /// Largest top_k a request may ask for.
    #[arg(long, default_value_t = 100)]
    pub max_top_k: usize,
    /// Most masks in one fill-mask request, all inputs together (413 beyond): each holds a
    /// distribution over the vocabulary in memory while it runs.
    #[arg(long, default_value_t = Limits::default().max_masks)]
    pub max_masks: usize,
    /// Most candidates one fill-mask request may ask for, masks x top_k over its inputs (413
    /// beyond): bounds the size of the answer.
    #[arg(long, default_value_t = Limits::default().max_candidates)]
    pub max_candidates: usize,
    /// Most tokens one /v1/score request may score, all inputs together (413 beyond): each is
    /// one forward pass of a masked copy of its text.
    #[arg(long, default_value_t = Limits::default().max_score_tokens)]
    pub max_score_tokens: usize,
    /// Seconds a request may take, body upload included (408 beyond).
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The run folder (runs/NAME, with metrics.jsonl and config.toml).
    pub run: PathBuf,
    /// The HTML file to write.
    #[arg(long, default_value = "report.html")]
    pub out: PathBuf,
}

/// `NAME=DIR` or `DIR` (named after its last component). A spec is NAME=DIR only when the
/// part before its first `=` has no path separator and the whole spec is not an existing path:
/// `runs/lr=3e-4` and an existing folder `lr=3e-4` are folders, `tiny=runs/lr=3e-4` is named
/// `tiny`.
fn named(spec: &str, flag: &str) -> Result<(String, PathBuf)> {
    let split = spec
        .split_once('=')
        .filter(|(name, _)| !name.contains(std::path::is_separator))
        .filter(|_| !Path::new(spec).exists());
    if let Some((name, dir)) = split {
        if name.is_empty() || dir.is_empty() {
            bail!("--{flag} {spec:?}: write NAME=DIR or DIR");
        }
        return Ok((name.to_string(), PathBuf::from(dir)));
    }
    let path = PathBuf::from(spec);
    let name = path
        .components()
        .rev()
        .find_map(|c| match c {
            std::path::Component::Normal(n) => Some(n.to_string_lossy().into_owned()),
            _ => None,
        })
        .with_context(|| format!("--{flag} {spec:?}: name it with NAME={spec}"))?;
    Ok((name, path))
}

pub fn serve_cmd(args: ServeArgs, device: &Device) -> Result<()> {
    let counts = [
        args.max_batch,
        args.max_inputs,
        args.max_top_k,
        args.queue,
        args.max_masks,
        args.max_candidates,
        args.max_score_tokens,
    ];
    if counts.contains(&0) {
        bail!(
            "--max-batch, --max-inputs, --max-top-k, --queue, --max-masks, --max-candidates \
             and --max-score-tokens must be at least 1"
        );
    }
    let models = args
        .models
        .iter()
        .map(|m| named(m, "model"))
        .collect::<Result<Vec<_>>>()?;
    let runs = args
        .runs
        .iter()
        .map(|r| named(r, "run"))
        .collect::<Result<Vec<_>>>()?;
    let mut options = ServeOptions::new(models);
    options.runs = runs;
    options.host = args.host;
    options.port = args.port;
    options.batching = Batching {
        max_batch: args.max_batch,
        window: Duration::from_millis(args.batch_window_ms),
        queue: args.queue,
    };
    options.limits = Limits {
        max_body_bytes: args.max_body_bytes,
        max_inputs: args.max_inputs,
        max_top_k: args.max_top_k,
        max_masks: args.max_masks,
        max_candidates: args.max_candidates,
        max_score_tokens: args.max_score_tokens,
        request_timeout: Duration::from_secs(args.timeout.max(1)),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let server = Server::load(options, device.clone())?;
        let addr = server.local_addr()?;
        // Installed before the address is printed: whoever reads it may stop us at once.
        let stop = stop_signal().context("installing the signal handlers")?;
        eprintln!(
            "serving on http://{addr}/ (Ctrl-C or SIGTERM drains in-flight requests and stops)"
        );
        server
            .run(async {
                stop.await;
                eprintln!("stopping: finishing in-flight requests");
            })
            .await?;
        Ok::<_, anyhow::Error>(())
    })
}

/// Resolves on Ctrl-C, or on SIGTERM: what systemd, docker and kubernetes send to stop a
/// service, whose default action would kill the requests in flight.
#[cfg(unix)]
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

#[cfg(not(unix))]
fn stop_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        // Without a signal handler there is nothing to wait for but the process end.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    })
}

pub fn report_cmd(args: ReportArgs) -> Result<()> {
    for file in ["metrics.jsonl", "config.toml"] {
        crate::out_path::refuse_overlap(&args.out, &args.run.join(file), "the run's")?;
    }
    let html = masklm_serve::render_report(&args.run)
        .with_context(|| format!("reading the run {}", args.run.display()))?;
    std::fs::write(&args.out, html).with_context(|| format!("writing {}", args.out.display()))?;
    println!("wrote {}", args.out.display());
    Ok(())
}
