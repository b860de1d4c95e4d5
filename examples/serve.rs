//! Serve a tinygpt checkpoint (or a Hugging Face GPT-2) over an OpenAI-compatible HTTP API,
//! with a web chat page at `/`.
//!
//! ```text
//! cargo run --release --features server --example serve -- --ckpt out/sft
//! curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
//!     -d '{"messages": [{"role": "user", "content": "What is 7 + 5?"}]}'
//!
//! # a Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer.json or
//! # vocab.json + merges.txt): a plain-text model, for /v1/completions
//! cargo run --release --features server --example serve -- --ckpt ~/models/gpt2 --dtype f16
//!
//! # no model download: a random GPT-2 124M with OpenAI's tokenizer (fetched into data/ on
//! # first use; --gpt2-files DIR to use another directory), to measure serving speed
//! cargo run --release --features server --example serve -- --random-124m
//! ```
//!
//! It prints `listening on http://ADDR` on stdout once it accepts connections (with
//! `--port 0`, ADDR has the port the system chose). SIGINT or SIGTERM stops it gracefully:
//! no new connections, replies in flight finish (at most `--drain-timeout-s`), exit status 0.

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tinygpt::candle::{DType, Device};
use tinygpt::server::{self, Engine, EngineConfig, ServerConfig};
use tinygpt::{ChatTemplate, Gpt, GptConfig, Tokenizer};

/// Serve a model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions,
/// /v1/models, /health, /metrics) and a web chat at /.
#[derive(Debug, Parser)]
#[command(version, args_override_self = true)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["ckpt", "random_124m"])))]
struct Args {
    /// A tinygpt checkpoint directory (any stage) or a Hugging Face GPT-2 directory.
    #[arg(long)]
    ckpt: Option<PathBuf>,
    /// Instead of --ckpt: a randomly initialised GPT-2 124M (for timing without a download).
    #[arg(long)]
    random_124m: bool,
    /// Directory holding OpenAI's GPT-2 tokenizer, gpt2_encoder.json and gpt2_vocab.bpe (for
    /// --random-124m); files missing there are fetched from OpenAI into it, checked against
    /// their sha256 (or taken from $TINYGPT_DATA).
    #[arg(long, value_name = "DIR", default_value = "data")]
    gpt2_files: PathBuf,
    /// Address to listen on; 127.0.0.1 serves this machine only, 0.0.0.0 every interface.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0 = any free port; the chosen one is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* [default: $TINYGPT_API_KEY, else open].
    #[arg(long)]
    api_key: Option<String>,
    /// The model id clients use [default: the checkpoint directory's name].
    #[arg(long)]
    model_name: Option<String>,
    /// Requests decoded together.
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Requests that may wait for a slot; beyond that, 429.
    #[arg(long, default_value_t = 16)]
    max_queue: usize,
    /// Largest request body in bytes (larger: 413).
    #[arg(long, default_value_t = 1 << 20)]
    max_body_bytes: usize,
    /// Allow browser pages from this origin (e.g. http://localhost:3000, or *) to call the API.
    #[arg(long)]
    cors_origin: Option<String>,
    /// Weights dtype: f32 or f16 (f16 halves the bytes read per token: faster decoding).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// On SIGINT/SIGTERM, how long replies in flight may take to finish.
    #[arg(long, default_value_t = 30)]
    drain_timeout_s: u64,
}

fn main() -> Result<()> {
    common::init();
    let args = Args::parse();
    let device = common::device(&args.device)?;
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        other => bail!("--dtype must be f32 or f16, got {other:?}"),
    };
    let api_key = match &args.api_key {
        Some(k) if k.is_empty() => bail!("--api-key must not be empty"),
        Some(k) => Some(k.clone()),
        None => std::env::var("TINYGPT_API_KEY")
            .ok()
            .filter(|k| !k.is_empty()),
    };

    // Settings checked before the (possibly long) load, so a typo fails at once.
    if args.max_batch == 0 {
        bail!("--max-batch must be at least 1");
    }
    if args.model_name.as_deref() == Some("") {
        bail!("--model-name must not be empty");
    }
    let t_load = Instant::now();
    let (model, tokenizer, default_name) = load(&args, &device)?;
    let model = if model.dtype() == dtype {
        model
    } else {
        model.to_dtype(dtype)?
    };
    let cfg = model.config().clone();
    let chat = ChatTemplate::new(&tokenizer).is_ok();
    let model_name = args.model_name.clone().unwrap_or(default_name);
    eprintln!(
        "serve: {model_name}: {:.1}M parameters, context {}, {:?} on {}, {}, loaded in {:.2} s; \
         batch {}, queue {}{}",
        cfg.num_parameters() as f64 / 1e6,
        cfg.block_size,
        model.dtype(),
        args.device,
        if chat {
            "chat model"
        } else {
            "plain-text model (no chat tokens: use /v1/completions)"
        },
        t_load.elapsed().as_secs_f64(),
        args.max_batch,
        args.max_queue,
        if api_key.is_some() {
            ", API key required"
        } else {
            ""
        },
    );

    let engine = Engine::start(
        model,
        tokenizer,
        EngineConfig {
            max_batch: args.max_batch,
            max_queue: args.max_queue,
        },
    )?;
    let config = ServerConfig {
        model_name,
        api_key,
        max_body_bytes: args.max_body_bytes,
        cors_origin: args.cors_origin.clone(),
        ..ServerConfig::default()
    };
    let app = server::router(engine.clone(), config)?;

    // The engine computes on its own thread (and rayon's); the async side only moves bytes.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(async {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let local = listener.local_addr()?;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on http://{local}")?;
        stdout.flush()?;
        drop(stdout);
        server::serve(
            listener,
            app,
            engine,
            Duration::from_secs(args.drain_timeout_s),
        )
        .await?;
        eprintln!("serve: shut down");
        anyhow::Ok(())
    })
}

/// The model, its tokenizer, and the default model name.
fn load(args: &Args, device: &Device) -> Result<(Gpt, Tokenizer, String)> {
    let Some(dir) = &args.ckpt else {
        let (vocab, merges) = common::data::gpt2_files(&args.gpt2_files)?;
        let tokenizer = Tokenizer::from_gpt2_files(vocab, merges)
            .context("--random-124m needs OpenAI's tokenizer files (see --gpt2-files)")?;
        let cfg = GptConfig::gpt2();
        let init = Gpt::init(&cfg, 1337, device)?;
        // Constant weights (no autograd graph).
        let model = Gpt::from_tensors(&cfg, init.tensors(), false)?;
        return Ok((model, tokenizer, "gpt2-random".into()));
    };
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "tinygpt".into());
    let (model, tokenizer) = if is_hf_dir(dir) {
        let model = Gpt::from_hf_dir(dir, device)?;
        let tokenizer = tinygpt::hf::load_tokenizer(dir)?;
        (model, tokenizer)
    } else {
        tinygpt::checkpoint::load_model(dir, device)
            .with_context(|| format!("--ckpt {}", dir.display()))?
    };
    Ok((model, tokenizer, name))
}

/// Whether `dir/config.json` is a Hugging Face config (`n_positions`, `model_type`) rather
/// than a tinygpt one (`block_size`). Anything unreadable counts as tinygpt, whose loader
/// then says what is missing or malformed.
fn is_hf_dir(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join("config.json")) else {
        return false;
    };
    let Ok(json) = serde_json::from_str::<serde_json::Value>(&text) else {
        return false;
    };
    json.get("block_size").is_none()
        && (json.get("n_positions").is_some() || json.get("model_type").is_some())
}
