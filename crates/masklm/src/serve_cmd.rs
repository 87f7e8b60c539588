//! `masklm serve` and `masklm report`.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;
use clap::Args;
use masklm_serve::{Batching, Limits, ServeOptions, Server};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// A model to serve: DIR (named after the folder) or NAME=DIR; repeat for several. DIR is
    /// a checkpoint, a run folder (its latest checkpoint) or a Hugging Face folder. The first
    /// answers requests that name no model.
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

/// `NAME=DIR` or `DIR` (named after its last component).
fn named(spec: &str, flag: &str) -> Result<(String, PathBuf)> {
    if let Some((name, dir)) = spec.split_once('=') {
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
    if args.max_batch == 0 || args.max_inputs == 0 || args.max_top_k == 0 || args.queue == 0 {
        bail!("--max-batch, --max-inputs, --max-top-k and --queue must be at least 1");
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
        request_timeout: Duration::from_secs(args.timeout.max(1)),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let server = Server::load(options, device.clone())?;
        let addr = server.local_addr()?;
        eprintln!("serving on http://{addr}/ (Ctrl-C drains in-flight requests and stops)");
        server
            .run(async {
                // Without a signal handler there is nothing to wait for but the process end.
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await;
                }
                eprintln!("stopping: finishing in-flight requests");
            })
            .await?;
        Ok::<_, anyhow::Error>(())
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
