//! The router: routes, middleware (API key, request counting, body limit, CORS) and handlers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, Request, State};
use axum::http::{header, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::Value;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::api::{
    AssistantMessage, ChatChoice, ChatCompletion, Health, ModelCard, ModelList, Queue, Slots,
    TextChoice, TextCompletion, Usage,
};
use super::engine::{Engine, Event, SubmitError};
use super::error::ApiError;
use super::metrics::Metrics;
use super::request::{self, Prepared};
use super::stream::{reason, EventStream, Kind, Meta};
use super::ServerConfig;
use crate::chat::ChatTemplate;
use crate::{Error, Result};

/// The web chat page (written by the web helper; served at `/`).
const INDEX_HTML: &str = include_str!("web/index.html");

/// The page's Content-Security-Policy: scripts and styles only from the page itself.
const CSP: &str = "default-src 'self'; script-src 'self' 'unsafe-inline'; \
                   style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
                   connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; \
                   form-action 'self'";

/// What every handler shares.
#[derive(Debug)]
pub(crate) struct AppState {
    pub engine: Engine,
    pub config: ServerConfig,
    /// The chat template, or why the tokenizer has none (a plain-text model).
    pub template: std::result::Result<ChatTemplate, String>,
    pub metrics: Metrics,
    /// Unix seconds when the router was built (`created` of the model card).
    started: u64,
    /// A random tag that keeps response ids unique across restarts.
    instance: u32,
    next_id: AtomicU64,
}

impl AppState {
    fn next_id(&self, kind: Kind) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let prefix = match kind {
            Kind::Chat => "chatcmpl",
            Kind::Completion => "cmpl",
        };
        format!("{prefix}-{:08x}-{n}", self.instance)
    }

    fn card(&self) -> ModelCard {
        ModelCard {
            id: self.config.model_name.clone(),
            object: "model",
            created: self.started,
            owned_by: "tinygpt",
            max_model_len: self.engine.model_config().block_size,
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Builds the router (see [`super::router`]).
pub(crate) fn build(engine: Engine, config: ServerConfig) -> Result<Router> {
    if config.model_name.is_empty() {
        return Err(Error::InvalidArgument(
            "the model name must not be empty".into(),
        ));
    }
    if config.api_key.as_deref() == Some("") {
        return Err(Error::InvalidArgument(
            "the API key must not be empty (leave it unset for an open server)".into(),
        ));
    }
    let cors = match &config.cors_origin {
        None => None,
        Some(origin) => Some(cors_layer(origin)?),
    };
    let body_limit = config.max_body_bytes;
    let template = ChatTemplate::new(engine.tokenizer()).map_err(|e| e.to_string());
    let state = Arc::new(AppState {
        engine,
        config,
        template,
        metrics: Metrics::default(),
        started: unix_now(),
        instance: rand::random(),
        next_id: AtomicU64::new(1),
    });

    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*model}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&state),
            require_key,
        ));
    let open = Router::new()
        .route("/", get(index))
        .route("/health", get(health))
        .route("/metrics", get(metrics));
    let mut app = v1
        .merge(open)
        .fallback(not_found)
        .method_not_allowed_fallback(wrong_method)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(Arc::clone(&state), count))
        .with_state(state);
    if let Some(cors) = cors {
        app = app.layer(cors);
    }
    Ok(app)
}

/// CORS for one origin (or `*`): the methods and headers the API uses.
fn cors_layer(origin: &str) -> Result<CorsLayer> {
    let allow = if origin == "*" {
        AllowOrigin::any()
    } else {
        let value = HeaderValue::from_str(origin).map_err(|_| {
            Error::InvalidArgument(format!(
                "CORS origin {origin:?} is not a valid header value"
            ))
        })?;
        AllowOrigin::exact(value)
    };
    Ok(CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .max_age(Duration::from_secs(600)))
}

// ---------------------------------------------------------------------------------------------
// Middleware and extractors
// ---------------------------------------------------------------------------------------------

/// Counts every response by status code for `/metrics`.
async fn count(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    state.metrics.record(response.status().as_u16());
    response
}

/// With an API key configured: `Authorization: Bearer KEY` or 401.
async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        match given {
            None => {
                return ApiError::unauthorized(
                    "You didn't provide an API key. You need to provide your API key in an \
                     Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                )
                .into_response()
            }
            Some(token) if !constant_time_eq(token.as_bytes(), key.as_bytes()) => {
                return ApiError::unauthorized("Incorrect API key provided.").into_response()
            }
            Some(_) => {}
        }
    }
    next.run(req).await
}

/// Byte-wise equality whose time depends on the lengths only, not on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a
        .iter()
        .zip(b)
        .fold(0u8, |acc, (x, y)| acc | std::hint::black_box(x ^ y));
    std::hint::black_box(diff) == 0
}

/// A JSON body, read as bytes and parsed by hand so that every failure (too large, not
/// UTF-8, not JSON) is an error in OpenAI's shape, whatever the content type; with the
/// body's length in bytes.
struct JsonBody(Value, usize);

impl FromRequest<Arc<AppState>> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(
        req: Request,
        state: &Arc<AppState>,
    ) -> std::result::Result<Self, ApiError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::too_large(state.config.max_body_bytes)
            } else {
                ApiError::invalid(
                    format!("could not read the request body: {}", rejection.body_text()),
                    None,
                )
            }
        })?;
        let len = bytes.len();
        serde_json::from_slice(&bytes)
            .map(|v| JsonBody(v, len))
            .map_err(|e| {
                ApiError::invalid(
                    format!(
                    "We could not parse the JSON body of your request: {e}. The body must be a \
                     JSON object (with Content-Type: application/json)."
                ),
                    None,
                )
            })
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------

async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![state.card()],
    })
}

async fn model(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> std::result::Result<Json<ModelCard>, ApiError> {
    if id == state.config.model_name {
        Ok(Json(state.card()))
    } else {
        Err(ApiError::model_not_found(&id, &state.config.model_name))
    }
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    JsonBody(body, len): JsonBody,
) -> std::result::Result<Response, ApiError> {
    let prepared = prepare(&state, body, len, request::chat).await?;
    run(&state, prepared, Kind::Chat).await
}

async fn completions(
    State(state): State<Arc<AppState>>,
    JsonBody(body, len): JsonBody,
) -> std::result::Result<Response, ApiError> {
    let prepared = prepare(&state, body, len, request::completion).await?;
    run(&state, prepared, Kind::Completion).await
}

/// Bodies up to this many bytes are checked and tokenised on the async worker (well under a
/// millisecond); larger ones on tokio's blocking pool.
const INLINE_BODY_BYTES: usize = 16 * 1024;

/// Checks a body (`len` bytes as received) and renders its prompt. Tokenising up to a whole
/// request body (1 MiB by default) takes long enough to hold up every other connection, so
/// large bodies go to tokio's blocking pool; small ones, nearly all, are done in place, which
/// costs less than handing them over (a thread wake-up, and under load a scheduling delay).
async fn prepare(
    state: &Arc<AppState>,
    body: Value,
    len: usize,
    f: fn(&AppState, &Value) -> std::result::Result<Prepared, ApiError>,
) -> std::result::Result<Prepared, ApiError> {
    if state.engine.is_full() {
        // A full server says so at once, before any work on the request.
        let max_queue = state.engine.engine_config().max_queue;
        return Err(SubmitError::QueueFull(max_queue).into());
    }
    if len <= INLINE_BODY_BYTES {
        return f(state, &body);
    }
    let state = Arc::clone(state);
    tokio::task::spawn_blocking(move || f(&state, &body))
        .await
        .map_err(|e| ApiError::server(format!("preparing the request failed: {e}")))?
}

/// Submits the job; streams its events or collects them into one response.
async fn run(
    state: &AppState,
    prepared: Prepared,
    kind: Kind,
) -> std::result::Result<Response, ApiError> {
    let mut rx = state.engine.submit(prepared.job)?;
    let meta = Meta {
        kind,
        id: state.next_id(kind),
        created: unix_now(),
        model: state.config.model_name.clone(),
        include_usage: prepared.include_usage,
    };
    if prepared.stream {
        let stream = EventStream::new(rx, meta);
        let mut response = Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response();
        response.headers_mut().insert(
            HeaderName::from_static("x-accel-buffering"),
            HeaderValue::from_static("no"),
        );
        return Ok(response);
    }
    // Dropping this future (the client went away) drops `rx`, which cancels the job.
    let mut text = String::new();
    let (finish, usage) = loop {
        match rx.recv().await {
            Some(Event::Delta(piece)) => text.push_str(&piece),
            Some(Event::Finished {
                reason: r,
                prompt_tokens,
                completion_tokens,
            }) => break (reason(r), Usage::new(prompt_tokens, completion_tokens)),
            Some(Event::Failed(msg)) => return Err(ApiError::server(msg)),
            None => {
                return Err(ApiError::server(
                    "the engine stopped before the reply was finished",
                ))
            }
        }
    };
    let response = match kind {
        Kind::Chat => Json(ChatCompletion {
            id: meta.id,
            object: "chat.completion",
            created: meta.created,
            model: meta.model,
            choices: vec![ChatChoice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: text,
                },
                logprobs: None,
                finish_reason: finish,
            }],
            usage,
        })
        .into_response(),
        Kind::Completion => Json(TextCompletion {
            id: &meta.id,
            object: "text_completion",
            created: meta.created,
            model: &meta.model,
            choices: vec![TextChoice {
                index: 0,
                text,
                logprobs: None,
                finish_reason: Some(finish),
            }],
            usage: Some(Some(usage)),
        })
        .into_response(),
    };
    Ok(response)
}

/// `GET /health`: 200 `{"status": "ok", ...}`, or 503 with `"shutting_down"` once shutdown
/// began (so load balancers stop sending).
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let stats = state.engine.stats();
    let shutting_down = state.engine.is_shutting_down();
    let body = Health {
        status: if shutting_down { "shutting_down" } else { "ok" },
        model: &state.config.model_name,
        slots: Slots {
            active: stats.active_slots,
            total: stats.max_batch,
        },
        queue: Queue {
            waiting: stats.queue_depth,
            max: state.engine.engine_config().max_queue,
        },
    };
    let status = if shutting_down {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let text = state.metrics.render(&state.engine.stats());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

/// `GET /`: the web chat page.
async fn index() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
        ],
        INDEX_HTML,
    )
        .into_response()
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::no_route(method.as_str(), uri.path())
}

async fn wrong_method(method: Method, uri: Uri) -> ApiError {
    ApiError::wrong_method(method.as_str(), uri.path())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_time_eq_is_eq() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret!"));
        assert!(constant_time_eq(b"", b""));
    }
}
