//! masklm's HTTP server and run reports. Models are loaded and run through `masklm_infer`;
//! the server does not depend on the trainer.
//!
//! - [`engine`]: the model thread; requests that arrive together run as one batch;
//! - [`api`]: the routes (`/v1/fill-mask`, `/v1/score`, `/v1/models`, `/v1/runs`, `/healthz`,
//!   the web page at `/`), request limits and JSON errors;
//! - [`runs`]: a run's metrics.jsonl drawn as SVG charts;
//! - [`report`]: the same charts, the last evaluation and the config as one HTML file.
//!
//! ```no_run
//! # async fn f() -> Result<(), masklm_serve::ServeError> {
//! let options = masklm_serve::ServeOptions::new(vec![("tiny".into(), "runs/quickstart".into())]);
//! let server = masklm_serve::Server::load(options, burn::tensor::Device::flex())?;
//! println!("listening on http://{}", server.local_addr()?);
//! server.run(async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod api;
pub mod engine;
pub mod report;
pub mod runs;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use burn::module::Module;
use burn::tensor::Device;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use masklm_infer::InferError;

pub use api::Limits;
pub use engine::Batching;
pub use report::render_report;
pub use runs::{RunError, RunView};

/// Errors of starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A `--model` could not be loaded.
    #[error("model {name:?} ({}): {source}", path.display())]
    Load {
        name: String,
        path: PathBuf,
        // Boxed: InferError is large, and every Result of this crate would carry its size.
        #[source]
        source: Box<masklm_infer::InferError>,
    },
    /// A `--model` folder has no usable tokenizer.
    #[error("model {name:?} ({}): the server needs the tokenizer files beside the weights: {source}", path.display())]
    Tokenizer {
        name: String,
        path: PathBuf,
        #[source]
        source: masklm_data::DataError,
    },
    /// Two `--model`/`--run` share a name, or none was given.
    #[error("{0}")]
    Names(String),
    /// A `--run` folder does not exist.
    #[error("run {name:?}: {} is not a folder", path.display())]
    Run { name: String, path: PathBuf },
    /// The address cannot be bound (in use, not allowed).
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// Accepting connections or starting the model thread failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// What `masklm serve` runs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// (name, folder) of each model; the first answers requests that name none.
    pub models: Vec<(String, PathBuf)>,
    /// (name, run folder) of each run shown as a tab.
    pub runs: Vec<(String, PathBuf)>,
    pub host: IpAddr,
    /// 0 picks a free port (tests).
    pub port: u16,
    pub batching: Batching,
    pub limits: Limits,
    /// A client must send its request headers within this time, or the connection is closed.
    pub header_timeout: Duration,
}

impl ServeOptions {
    /// Loopback, port 8080, batches of up to 32 collected for 2 ms, the default limits.
    pub fn new(models: Vec<(String, PathBuf)>) -> Self {
        ServeOptions {
            models,
            runs: Vec::new(),
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 8080,
            batching: Batching {
                max_batch: 32,
                window: Duration::from_millis(2),
                queue: 1024,
            },
            limits: Limits::default(),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// A loaded, bound server.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: Arc<api::AppState>,
    worker: std::thread::JoinHandle<()>,
    header_timeout: Duration,
}

fn check_names<'a>(what: &str, names: impl Iterator<Item = &'a String>) -> Result<(), ServeError> {
    let mut seen = std::collections::BTreeSet::new();
    for name in names {
        if name.is_empty() {
            return Err(ServeError::Names(format!("a {what} has an empty name")));
        }
        if !seen.insert(name) {
            return Err(ServeError::Names(format!(
                "two {what}s are named {name:?}; name them apart with --{what} NAME=DIR"
            )));
        }
    }
    Ok(())
}

impl Server {
    /// Loads every model (with its tokenizer), starts the model thread and binds the address.
    /// Must run inside a tokio runtime (the listener is registered with it).
    pub fn load(options: ServeOptions, device: Device) -> Result<Server, ServeError> {
        if options.models.is_empty() {
            return Err(ServeError::Names("give at least one --model".to_string()));
        }
        check_names("model", options.models.iter().map(|(n, _)| n))?;
        check_names("run", options.runs.iter().map(|(n, _)| n))?;
        for (name, path) in &options.runs {
            if !path.is_dir() {
                return Err(ServeError::Run {
                    name: name.clone(),
                    path: path.clone(),
                });
            }
        }
        let mut models = Vec::new();
        let mut infos = Vec::new();
        for (name, path) in &options.models {
            let tokenizer_error = |source| ServeError::Tokenizer {
                name: name.clone(),
                path: path.clone(),
                source,
            };
            let loaded = masklm_infer::load(path, &device).map_err(|e| match e {
                InferError::Tokenizer(source) => tokenizer_error(source),
                e => ServeError::Load {
                    name: name.clone(),
                    path: path.clone(),
                    source: Box::new(e),
                },
            })?;
            let tokenizer = loaded.tokenizer;
            let vocab = tokenizer.mask_vocab().map_err(tokenizer_error)?;
            infos.push(engine::ModelInfo {
                name: name.clone(),
                path: path.clone(),
                parameters: loaded.model.num_params(),
                config: loaded.config,
                tokenizer,
                vocab,
            });
            models.push(loaded.model);
        }
        let infos = Arc::new(infos);
        let (engine, worker) = engine::Engine::start(
            models,
            infos.clone(),
            options.batching,
            options.limits.max_masks,
            device,
        )?;
        let addr = SocketAddr::new(options.host, options.port);
        let listener = std::net::TcpListener::bind(addr)
            .and_then(|l| {
                l.set_nonblocking(true)?;
                tokio::net::TcpListener::from_std(l)
            })
            .map_err(|source| ServeError::Bind { addr, source })?;
        let state = Arc::new(api::AppState {
            engine,
            models: infos,
            runs: options.runs,
            limits: options.limits,
        });
        Ok(Server {
            listener,
            state,
            worker,
            header_timeout: options.header_timeout,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets in-flight requests finish
    /// and stops the model thread.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
        let app = api::router(self.state);
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut builder = hyper::server::conn::http1::Builder::new();
        // Without a header timeout a client that never finishes its headers holds a
        // connection forever (axum::serve sets none).
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.header_timeout)
            // A client that closes its side while its request runs has left: the connection
            // ends, and with it the request and its reply channel (the model thread skips
            // its work). With half-close the job would run on for nobody.
            .half_close(false);
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let (stream, _) = match accepted {
                        Ok(accepted) => accepted,
                        // Out of file descriptors and the like: keep serving the others.
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    let connection = builder
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
                    let connection = graceful.watch(connection);
                    tokio::spawn(async move {
                        // A client hanging up or timing out is not the server's error.
                        let _ = connection.await;
                    });
                }
                () = &mut shutdown => break,
            }
        }
        drop(self.listener);
        graceful.shutdown().await;
        // The router (and with it the last Engine handle) is gone: the model thread drains
        // its queue and ends.
        drop(app);
        let worker = self.worker;
        tokio::task::spawn_blocking(move || worker.join())
            .await
            .ok();
        Ok(())
    }
}
