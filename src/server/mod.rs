//! An OpenAI-compatible server for tinygpt models (feature `server`).
//!
//! [`engine`] decodes every active request together (continuous batching); the HTTP layer
//! translates the OpenAI chat and completions API to engine jobs:
//!
//! | route | what |
//! |---|---|
//! | `GET /v1/models` | the one model served, under [`ServerConfig::model_name`] |
//! | `POST /v1/chat/completions` | chat (needs a tokenizer with chat tokens), whole or streamed as server-sent events |
//! | `POST /v1/completions` | plain-text continuation of a `prompt`, whole or streamed |
//! | `GET /health` | `{"status": "ok", "slots": ..., "queue": ...}` (503 once shutdown began) |
//! | `GET /metrics` | Prometheus text: responses by status code, tokens, queue depth, slots, decode tokens/s |
//! | `GET /` | the web chat page |
//!
//! Requests follow OpenAI's API reference: `messages`, `max_tokens` /
//! `max_completion_tokens`, `temperature` (0 to 2), `top_p` (in (0, 1]), `stop` (up to 4
//! strings), `seed`, `stream`, `stream_options.include_usage` and `model`, plus vLLM's and
//! llama.cpp's extras `top_k`, `min_p`, `repetition_penalty` and `ignore_eos`. Unknown fields
//! are ignored; fields that ask for what tinygpt cannot do (`n > 1`, `tools`, `logprobs`,
//! JSON `response_format`, `frequency_penalty`/`presence_penalty`, `logit_bias`, `echo`,
//! `suffix`, `best_of > 1`) are refused with a 400 naming the field. Every error is in
//! OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`.
//!
//! Choices where the API leaves room:
//! - **max_tokens**: by default, whatever the context leaves after the prompt; a larger value
//!   is capped to that (not an error), and the reply then ends with `finish_reason: "length"`
//!   when it runs out. A prompt that fills the context is a 400 `context_length_exceeded`.
//! - **seed**: without one, each request draws a random seed from the process's RNG (as
//!   OpenAI's replies vary); with one, the same request gives the same reply, streamed or not,
//!   whatever else runs in the batch (bit for bit with f16 or f32 weights, see
//!   [`crate::decode`]). A negative seed is taken as its two's-complement bits.
//! - **system messages**: every `system` (or `developer`) message, wherever it stands, is
//!   folded in order into one system message at the start of the conversation, joined by a
//!   blank line (tinygpt models see the system message first only).
//! - **content parts**: a list of `{"type": "text", "text": ...}` parts is joined with
//!   newlines (as vLLM does); other part types are refused.
//! - **stop tokens**: a chat reply ends at `<|end|>`, `<|endoftext|>`, or a role token (the
//!   model opening a new turn); a completion at `<|endoftext|>`. `ignore_eos: true` removes
//!   them all (for benchmarks); `stop` strings still apply.
//! - **streams**: a failure part-way is sent as an SSE `error` event whose data is
//!   `{"error": {...}}`, and the stream ends there without `data: [DONE]`. A client that goes
//!   away cancels its request within one decode step.
//! - **queue**: a full queue is a 429 at once (`rate_limit_error`, with `Retry-After: 1`);
//!   after shutdown began, new requests get 503.
//!
//! # Embedding
//!
//! [`router`] gives an [`axum::Router`] to merge into your own app (it has a JSON 404
//! fallback, so merge it into an app without its own fallback, or nest it), and [`serve`]
//! runs any app until SIGINT or SIGTERM, letting the replies in flight finish:
//!
//! ```no_run
//! use std::time::Duration;
//! use tinygpt::candle::Device;
//! use tinygpt::server::{axum, tokio, Engine, EngineConfig, ServerConfig};
//! use tinygpt::{ChatTemplate, Gpt, GptConfig, Tokenizer};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A model and a chat tokenizer (untrained here; load yours with tinygpt::checkpoint).
//! let mut tokenizer = Tokenizer::train_char("Hello! How are you? I am fine.")?;
//! ChatTemplate::add_tokens(&mut tokenizer)?;
//! let cfg = GptConfig { vocab_size: tokenizer.vocab_size(), block_size: 64, n_layer: 2,
//!                       n_head: 2, n_embd: 32, dropout: 0.0, bias: true, ..Default::default() };
//! let model = Gpt::init(&cfg, 1337, &Device::Cpu)?;
//!
//! // The engine thread, and the OpenAI routes merged into your own app.
//! let engine = Engine::start(model, tokenizer, EngineConfig::default())?;
//! let config = ServerConfig { model_name: "tiny".into(), ..ServerConfig::default() };
//! let app = axum::Router::new()
//!     .route("/hello", axum::routing::get(|| async { "hello from my app" }))
//!     .merge(tinygpt::server::router(engine.clone(), config)?);
//!
//! let runtime = tokio::runtime::Runtime::new()?;
//! runtime.block_on(async {
//!     let listener = tokio::net::TcpListener::bind("127.0.0.1:8000").await?;
//!     println!("listening on http://{}", listener.local_addr()?);
//!     // Until Ctrl-C or SIGTERM; then up to 30 s for the replies in flight.
//!     tinygpt::server::serve(listener, app, engine, Duration::from_secs(30)).await?;
//!     Ok::<_, Box<dyn std::error::Error>>(())
//! })?;
//! # Ok(())
//! # }
//! ```

pub mod engine;

mod api;
mod error;
mod http;
mod metrics;
mod request;
mod stream;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

pub use engine::{Engine, EngineConfig, EngineStats, Event, Job, SubmitError};

/// axum, re-exported so users need not match its version ([`router`] returns its `Router`).
pub use axum;
/// tokio, re-exported for the runtime and the listener [`serve`] takes.
pub use tokio;

use crate::{Error, Result};

/// The HTTP layer's settings; [`Default`] gives the values each field names.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The model id of `/v1/models`; a request naming another `model` gets 404
    /// `model_not_found`. Must not be empty. Default `"tinygpt"`.
    pub model_name: String,
    /// When set, `/v1/*` needs `Authorization: Bearer KEY` (else 401); `/`, `/health` and
    /// `/metrics` stay open. Compared in constant time. Must not be empty. Default `None`.
    pub api_key: Option<String>,
    /// Largest request body, in bytes; larger ones get 413. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Most messages in one chat request (else 400). Default 256.
    pub max_messages: usize,
    /// Longest message content (and completions prompt), in bytes (else 400). Default 64 KiB.
    pub max_message_bytes: usize,
    /// Allow cross-origin requests from this origin (e.g. `"http://localhost:3000"`, or `"*"`
    /// for any); `None` sends no CORS headers, so browsers allow same-origin pages only.
    /// Default `None`.
    pub cors_origin: Option<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            model_name: "tinygpt".into(),
            api_key: None,
            max_body_bytes: 1 << 20,
            max_messages: 256,
            max_message_bytes: 64 << 10,
            cors_origin: None,
        }
    }
}

impl std::fmt::Debug for ServerConfig {
    /// As derived, with the API key redacted.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerConfig")
            .field("model_name", &self.model_name)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("max_body_bytes", &self.max_body_bytes)
            .field("max_messages", &self.max_messages)
            .field("max_message_bytes", &self.max_message_bytes)
            .field("cors_origin", &self.cors_origin)
            .finish()
    }
}

/// The OpenAI-compatible routes of the module docs over `engine`, ready to serve or to merge
/// into another [`axum::Router`]. Chat needs the engine's tokenizer to have the chat tokens
/// ([`crate::ChatTemplate::new`]); without them `/v1/chat/completions` answers 400 and
/// `/v1/completions` serves the model as a plain-text one.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty `model_name` or `api_key`, or a `cors_origin`
/// that is not a valid header value.
pub fn router(engine: Engine, config: ServerConfig) -> Result<axum::Router> {
    http::build(engine, config)
}

/// Serves `app` on `listener` until SIGINT (Ctrl-C) or SIGTERM, then shuts down gracefully
/// as [`serve_until`] does.
///
/// # Errors
/// As [`serve_until`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    engine: Engine,
    drain_timeout: Duration,
) -> Result<()> {
    serve_until(listener, app, engine, drain_timeout, shutdown_signal()).await
}

/// How long connections get to send their last bytes once every job has ended.
const FLUSH_GRACE: Duration = Duration::from_secs(1);

/// Serves `app` on `listener` until `shutdown` completes, then shuts down gracefully:
///
/// 1. the engine takes no new jobs ([`Engine::shutdown`]: requests still arriving on open
///    connections get 503) and the listener stops accepting;
/// 2. the jobs queued or running go on to their end, their streams with them, for at most
///    `drain_timeout` ([`Engine::drain`]);
/// 3. jobs still running when the time is out are ended with an error their clients see
///    (a stream gets an `error` event; [`Engine::abort`]), and a line on stderr says how
///    many were cut off;
/// 4. connections then get up to a second to send their last bytes; any still open after
///    that (an idle client, a request half sent) are closed.
///
/// Returns as soon as every connection has closed, if that comes first.
///
/// # Errors
/// [`Error::Io`] if serving fails.
pub async fn serve_until<F>(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    engine: Engine,
    drain_timeout: Duration,
    shutdown: F,
) -> Result<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    let began = Arc::new(tokio::sync::Notify::new());
    let graceful = {
        let engine = engine.clone();
        let began = Arc::clone(&began);
        async move {
            shutdown.await;
            engine.shutdown();
            began.notify_one();
        }
    };
    let server = axum::serve(listener, app).with_graceful_shutdown(graceful);
    let server = async { server.await.map_err(|e| Error::io("<http server>", e)) };
    tokio::pin!(server);
    let drain = |engine: Engine| async move {
        let waited = engine.clone();
        let done = tokio::task::spawn_blocking(move || waited.drain(drain_timeout)).await;
        if !matches!(done, Ok(true)) {
            // The time ran out: end what is left with an error its client sees.
            let cut = engine.abort();
            eprintln!(
                "tinygpt server: the drain timeout ({} s) ran out: {cut} repl{} cut off",
                drain_timeout.as_secs_f64(),
                if cut == 1 { "y" } else { "ies" }
            );
            let _ = tokio::task::spawn_blocking(move || engine.drain(FLUSH_GRACE)).await;
        }
    };

    tokio::select! {
        result = &mut server => return result,
        () = began.notified() => {}
    }
    // Dropping `server` (returning) closes the connections still open.
    tokio::select! {
        result = &mut server => {
            // Every client has gone; their jobs are cancelled within a step.
            drain(engine).await;
            return result;
        }
        () = drain(engine.clone()) => {}
    }
    tokio::select! {
        result = &mut server => result,
        () = tokio::time::sleep(FLUSH_GRACE) => Ok(()),
    }
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM. A signal whose handler cannot be
/// installed is not waited for.
pub async fn shutdown_signal() {
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
