//! The HTTP API: routes, request limits and JSON errors.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::header::WARNING;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use masklm_infer::fill::{FillError, FillText, encode_for_fill, excerpt, target_ids};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::engine::{Engine, FillJob, Job, ModelInfo, ScoreJob, Submit};
use crate::runs::RunView;

/// Request limits; each answered with a 4xx JSON error naming it. The work and the answer of
/// a request are bounded before the model runs, not only its body: a 56 KB body of many
/// inputs with many masks and a large `top_k` once asked for a 665 MB answer.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Most inputs in one request (422 beyond).
    pub max_inputs: usize,
    /// Largest `top_k` (422 beyond).
    pub max_top_k: usize,
    /// Most masks in one fill-mask request, all inputs together (413 beyond). Each mask holds
    /// a distribution over the whole vocabulary while its batch runs (256 masks of a 50k
    /// vocabulary: 51 MB), and the model thread never holds more than this many at once.
    pub max_masks: usize,
    /// Most candidates one fill-mask request may ask for: masks x top_k over all inputs (413
    /// beyond). Each candidate carries its whole filled-in text, so this bounds the answer.
    pub max_candidates: usize,
    /// Most tokens one `/v1/score` request may score, all inputs together (413 beyond). Each
    /// token is one masked copy of its text through the model.
    pub max_score_tokens: usize,
    /// Longest a request may take, reading its body included (408 beyond).
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_inputs: 64,
            max_top_k: 100,
            // Four masks per input at the default --max-inputs.
            max_masks: 256,
            // Every request of one mask per input the other defaults allow (64 x top_k 100):
            // about 4 MB of JSON for texts of 128 tokens.
            max_candidates: 6400,
            // 64 sentence-length texts (64 tokens) per request, ~128 forward passes of 32
            // copies: within the default timeout for a small model on a CPU. The case,
            // 64 texts of 512 tokens, is 32768 tokens (~1,000 passes): a corpus, for
            // `masklm eval --pseudo-perplexity`, which has no request timeout.
            max_score_tokens: 4096,
            request_timeout: Duration::from_secs(30),
        }
    }
}

pub struct AppState {
    pub engine: Engine,
    pub models: Arc<Vec<ModelInfo>>,
    pub runs: Vec<(String, std::path::PathBuf)>,
    pub limits: Limits,
}

/// An error answered as `{"error": "..."}` with its status, the shape of the Hugging Face
/// Inference API's errors.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn unprocessable(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({"error": self.message}))).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let status = rejection.status();
        let message = match &rejection {
            JsonRejection::MissingJsonContentType(_) => {
                "send the body as JSON with `Content-Type: application/json`".to_string()
            }
            _ if status == StatusCode::PAYLOAD_TOO_LARGE => {
                "the request body is larger than the server's limit (--max-body-bytes); send \
                 fewer or shorter inputs per request"
                    .to_string()
            }
            _ => rejection.body_text(),
        };
        ApiError::new(status, message)
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let limits = state.limits;
    Router::new()
        .route("/", get(page))
        .route("/healthz", get(health))
        .route("/v1/models", get(models))
        .route("/v1/fill-mask", post(fill_mask))
        .route("/v1/score", post(score))
        .route("/v1/runs", get(runs))
        .route("/v1/runs/{name}", get(run))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "no such route; the API is GET /v1/models, POST /v1/fill-mask, POST /v1/score, \
                 GET /v1/runs, GET /healthz",
            )
        })
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(axum::middleware::from_fn(
            move |request: Request, next: Next| async move {
                match tokio::time::timeout(limits.request_timeout, next.run(request)).await {
                    Ok(response) => response,
                    Err(_) => ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "the request took longer than {} s (body upload included)",
                            limits.request_timeout.as_secs_f64()
                        ),
                    )
                    .into_response(),
                }
            },
        ))
        .with_state(state)
}

async fn page() -> Html<&'static str> {
    Html(include_str!("page.html"))
}

/// Up, and what the model thread did with the jobs it received: `abandoned` counts jobs whose
/// client left (timed out or disconnected) before its answer, whose remaining work was skipped;
/// the others are queued or running.
async fn health(State(state): State<Arc<AppState>>) -> Json<Value> {
    let counts = state.engine.counts();
    let count = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
    Json(json!({"status": "ok", "jobs": {
        "received": count(&counts.received),
        "finished": count(&counts.finished),
        "abandoned": count(&counts.abandoned),
    }}))
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let models: Vec<Value> = state
        .models
        .iter()
        .map(|m| {
            json!({
                "name": m.name,
                "path": m.path.display().to_string(),
                "vocab_size": m.config.vocab_size(),
                "max_length": m.config.max_sequence_length(),
                "mask_token": m.tokenizer.mask_token,
                "hidden_size": m.config.hidden_size(),
                "num_hidden_layers": m.config.num_hidden_layers(),
                "parameters": m.parameters,
            })
        })
        .collect();
    Json(json!({"models": models}))
}

/// One text or several, as the pipeline takes them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Inputs {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FillRequest {
    inputs: Inputs,
    top_k: Option<usize>,
    targets: Option<Vec<String>>,
    model: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ScoreRequest {
    inputs: Inputs,
    model: Option<String>,
}

impl AppState {
    fn model(&self, name: Option<&str>) -> Result<usize, ApiError> {
        let names = || {
            self.models
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match name {
            None => Ok(0),
            Some(name) => self
                .models
                .iter()
                .position(|m| m.name == name)
                .ok_or_else(|| {
                    ApiError::new(
                        StatusCode::NOT_FOUND,
                        format!(
                            "unknown model {}; this server has: {}",
                            excerpt(name),
                            names()
                        ),
                    )
                }),
        }
    }

    /// The texts of a request, checked against the input-count limit.
    fn texts(&self, inputs: Inputs) -> Result<(Vec<String>, bool), ApiError> {
        let (texts, single) = match inputs {
            Inputs::One(text) => (vec![text], true),
            Inputs::Many(texts) => (texts, false),
        };
        if texts.is_empty() {
            return Err(ApiError::unprocessable(
                "`inputs` is an empty list; give a text or a list of texts",
            ));
        }
        if texts.len() > self.limits.max_inputs {
            return Err(ApiError::unprocessable(format!(
                "{} inputs in one request; the limit is {} (--max-inputs)",
                texts.len(),
                self.limits.max_inputs
            )));
        }
        Ok((texts, single))
    }

    fn submit(&self, job: Job) -> Result<(), ApiError> {
        self.engine.submit(job).map_err(|e| match e {
            Submit::Busy => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server's queue is full; retry shortly",
            ),
            Submit::Stopped => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the server is shutting down",
            ),
        })
    }
}

async fn answer<T>(receiver: oneshot::Receiver<Result<T, String>>) -> Result<T, ApiError> {
    match receiver.await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(message)) => Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, message)),
        Err(_) => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the model thread stopped before answering",
        )),
    }
}

fn fill_error(index: usize, single: bool, error: FillError) -> ApiError {
    let status = match error {
        FillError::Data(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::UNPROCESSABLE_ENTITY,
    };
    let at = if single {
        String::new()
    } else {
        format!("inputs[{index}]: ")
    };
    ApiError::new(status, format!("{at}{error}"))
}

async fn fill_mask(
    State(state): State<Arc<AppState>>,
    request: Result<Json<FillRequest>, JsonRejection>,
) -> Result<(HeaderMap, Json<Value>), ApiError> {
    let Json(request) = request?;
    let arriving = state.engine.arriving();
    let model = state.model(request.model.as_deref())?;
    let info = &state.models[model];
    let top_k = request.top_k.unwrap_or(5);
    if top_k == 0 || top_k > state.limits.max_top_k {
        return Err(ApiError::unprocessable(format!(
            "top_k is {top_k}; it must be between 1 and {}",
            state.limits.max_top_k
        )));
    }
    let (targets, notices) = match &request.targets {
        Some(words) if words.is_empty() => {
            return Err(ApiError::unprocessable(
                "`targets` is an empty list; leave it out to rank the whole vocabulary",
            ));
        }
        Some(words) => {
            let (ids, notices) = target_ids(&info.tokenizer, words)
                .map_err(|e| ApiError::unprocessable(format!("targets: {e}")))?;
            (Some(ids), notices)
        }
        None => (None, Vec::new()),
    };
    let (texts, single) = state.texts(request.inputs)?;
    let max_len = info.config.max_sequence_length();
    let encoded = texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            encode_for_fill(&info.tokenizer, text, max_len).map_err(|e| fill_error(i, single, e))
        })
        .collect::<Result<Vec<_>, _>>()?;
    // The pipeline answers at most len(targets) candidates per mask.
    let per_mask = targets.as_ref().map_or(top_k, |t| top_k.min(t.len()));
    state.limits.check_fill(&encoded, per_mask)?;
    let (reply, receiver) = oneshot::channel();
    state.submit(Job::Fill(FillJob {
        model,
        texts: encoded,
        top_k,
        targets,
        reply,
    }))?;
    drop(arriving);
    let mut docs = answer(receiver).await?;
    let doc = match (single, docs.pop()) {
        (true, Some(doc)) => doc,
        (_, last) => Value::Array(docs.into_iter().chain(last).collect()),
    };
    Ok((warning_headers(&notices), Json(doc)))
}

impl Limits {
    /// Refuses a fill-mask request whose work or answer is beyond the limits, before it runs.
    fn check_fill(&self, texts: &[FillText], per_mask: usize) -> Result<(), ApiError> {
        let masks: usize = texts.iter().map(|t| t.masks.len()).sum();
        if masks > self.max_masks {
            return Err(too_large(format!(
                "{masks} masks in this request; the limit is {} (the server's --max-masks); \
                 send fewer masks per request, or raise --max-masks",
                self.max_masks
            )));
        }
        let candidates = masks.saturating_mul(per_mask);
        if candidates > self.max_candidates {
            return Err(too_large(format!(
                "this request asks for {candidates} candidates ({masks} masks x top_k \
                 {per_mask}); the limit is {} (the server's --max-candidates); lower top_k, \
                 send fewer masks per request, or raise --max-candidates",
                self.max_candidates
            )));
        }
        Ok(())
    }

    /// Refuses a score request of more tokens than `max_score_tokens`, before it runs.
    fn check_score(&self, tokens: usize) -> Result<(), ApiError> {
        if tokens > self.max_score_tokens {
            return Err(too_large(format!(
                "{tokens} tokens to score in this request; the limit is {} (the server's \
                 --max-score-tokens); each token is one masked copy of its text through the \
                 model: send fewer or shorter texts per request, raise --max-score-tokens, or \
                 score a corpus with `masklm eval --pseudo-perplexity`",
                self.max_score_tokens
            )));
        }
        Ok(())
    }
}

fn too_large(message: String) -> ApiError {
    ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, message)
}

/// The CLI's notices (a target word scored by its first piece) as `Warning: 299` headers: the
/// body keeps the pipeline's shape, a bare list. Header values must be visible ASCII, so
/// anything else is escaped, and a long notice or a long list of them is cut.
fn warning_headers(notices: &[String]) -> HeaderMap {
    const MOST: usize = 8;
    let mut headers = HeaderMap::new();
    let cut = notices.len().saturating_sub(MOST);
    let more = (cut > 0).then(|| format!("and {cut} more target notices"));
    for notice in notices.iter().take(MOST).chain(&more) {
        let text: String = notice
            .chars()
            .take(300)
            .flat_map(|c| match c {
                '"' | '\\' => vec!['\\', c],
                ' '..='~' => vec![c],
                _ => c.escape_unicode().collect(),
            })
            .collect();
        if let Ok(value) = HeaderValue::from_str(&format!("299 masklm \"{text}\"")) {
            headers.append(WARNING, value);
        }
    }
    headers
}

async fn score(
    State(state): State<Arc<AppState>>,
    request: Result<Json<ScoreRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(request) = request?;
    let arriving = state.engine.arriving();
    let model = state.model(request.model.as_deref())?;
    let info = &state.models[model];
    let (texts, single) = state.texts(request.inputs)?;
    let sequences = texts
        .iter()
        .enumerate()
        .map(|(i, text)| encode_for_score(info, text, (!single).then_some(i)))
        .collect::<Result<Vec<_>, _>>()?;
    let tokens = sequences
        .iter()
        .flatten()
        .filter(|&&id| !info.vocab.is_special(id))
        .count();
    state.limits.check_score(tokens)?;
    let (reply, receiver) = oneshot::channel();
    state.submit(Job::Score(ScoreJob {
        model,
        texts: sequences,
        reply,
    }))?;
    drop(arriving);
    let scored = answer(receiver).await?;
    let (mut total_ll, mut total_tokens) = (0.0, 0u64);
    let results: Vec<Value> = scored
        .iter()
        .map(|&(log_likelihood, tokens)| {
            total_ll += log_likelihood;
            total_tokens += tokens;
            json!({
                "pseudo_log_likelihood": log_likelihood,
                "pseudo_perplexity": (-log_likelihood / tokens as f64).exp(),
                "tokens": tokens,
            })
        })
        .collect();
    Ok(Json(json!({
        "scores": results,
        "pseudo_perplexity": (-total_ll / total_tokens as f64).exp(),
        "tokens": total_tokens,
    })))
}

/// A text's token ids for scoring; `index`: its place in a list of inputs, for the message.
fn encode_for_score(
    info: &ModelInfo,
    text: &str,
    index: Option<usize>,
) -> Result<Vec<u32>, ApiError> {
    let at = index.map(|i| format!("inputs[{i}]: ")).unwrap_or_default();
    let ids = info
        .tokenizer
        .encode(text)
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{at}{e}")))?;
    let max_len = info.config.max_sequence_length();
    if ids.len() > max_len {
        return Err(ApiError::unprocessable(format!(
            "{at}{} is {} tokens long; this model takes at most {max_len}",
            excerpt(text),
            ids.len()
        )));
    }
    if ids.iter().all(|&id| info.vocab.is_special(id)) {
        return Err(ApiError::unprocessable(format!(
            "{at}{} has no token to score; give a non-empty text",
            excerpt(text)
        )));
    }
    Ok(ids)
}

async fn runs(State(state): State<Arc<AppState>>) -> Json<Value> {
    let names: Vec<&str> = state.runs.iter().map(|(name, _)| name.as_str()).collect();
    Json(json!({"runs": names}))
}

async fn run(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<RunView>, ApiError> {
    let Some((_, dir)) = state.runs.iter().find(|(n, _)| *n == name) else {
        let names: Vec<&str> = state.runs.iter().map(|(n, _)| n.as_str()).collect();
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "unknown run {}; this server shows: [{}] (start it with --run NAME=RUN_DIR)",
                excerpt(&name),
                names.join(", ")
            ),
        ));
    };
    let dir = dir.clone();
    // Reading and drawing a long metrics.jsonl is blocking work.
    let view = tokio::task::spawn_blocking(move || RunView::load(&dir))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok(Json(view))
}
