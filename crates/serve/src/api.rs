//! The HTTP API: routes, request limits and JSON errors.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use masklm_train::fill::{FillError, encode_for_fill, excerpt, target_ids};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::engine::{Engine, Job, ModelInfo, Submit};
use crate::runs::RunView;

/// Request limits; each answered with a 4xx JSON error naming it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body, in bytes (413 beyond).
    pub max_body_bytes: usize,
    /// Most inputs in one request (422 beyond).
    pub max_inputs: usize,
    /// Largest `top_k` (422 beyond).
    pub max_top_k: usize,
    /// Longest a request may take, reading its body included (408 beyond).
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 1 << 20,
            max_inputs: 64,
            max_top_k: 100,
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
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
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

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    let models: Vec<Value> = state
        .models
        .iter()
        .map(|m| {
            json!({
                "name": m.name,
                "path": m.path.display().to_string(),
                "vocab_size": m.config.vocab_size,
                "max_length": m.config.max_sequence_length(),
                "mask_token": m.tokenizer.mask_token,
                "hidden_size": m.config.hidden_size,
                "num_hidden_layers": m.config.num_hidden_layers,
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
                        format!("unknown model {name:?}; this server has: {}", names()),
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
) -> Result<Json<Value>, ApiError> {
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
    let targets = match &request.targets {
        Some(words) if words.is_empty() => {
            return Err(ApiError::unprocessable(
                "`targets` is an empty list; leave it out to rank the whole vocabulary",
            ));
        }
        Some(words) => Some(
            target_ids(&info.tokenizer, words)
                .map_err(|e| ApiError::unprocessable(format!("targets: {e}")))?
                .0,
        ),
        None => None,
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
    let (reply, receiver) = oneshot::channel();
    state.submit(Job::Fill {
        model,
        texts: encoded,
        top_k,
        targets,
        reply,
    })?;
    drop(arriving);
    let mut docs = answer(receiver).await?;
    Ok(Json(match (single, docs.pop()) {
        (true, Some(doc)) => doc,
        (_, last) => Value::Array(docs.into_iter().chain(last).collect()),
    }))
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
    let max_len = info.config.max_sequence_length();
    let mut sequences = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let at = if single {
            String::new()
        } else {
            format!("inputs[{i}]: ")
        };
        let ids = info
            .tokenizer
            .encode(text)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{at}{e}")))?;
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
        sequences.push(ids);
    }
    let (reply, receiver) = oneshot::channel();
    state.submit(Job::Score {
        model,
        texts: sequences,
        reply,
    })?;
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

async fn runs(State(state): State<Arc<AppState>>) -> Json<Value> {
    let names: Vec<&str> = state.runs.iter().map(|(name, _)| name.as_str()).collect();
    Json(json!({"runs": names}))
}

async fn run(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
) -> Result<Json<RunView>, ApiError> {
    let Some((_, dir)) = state.runs.iter().find(|(n, _)| *n == name) else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("unknown run {name:?}; start the server with --run {name}=RUN_DIR"),
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
