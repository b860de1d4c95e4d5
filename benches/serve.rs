//! Serving throughput: one client alone against eight at once, over real HTTP.
//!
//! A random GPT-2-124M-shaped model with f16 weights is served in this process
//! (`tinygpt::server` on 127.0.0.1, engine batch 8), and streaming clients ask
//! `POST /v1/completions` for 128-token replies (`ignore_eos`, temperature 1, a seed each).
//! First each of the eight seeds runs alone, one after another; then all eight at once. The
//! bench prints decode tokens/s (one client, and all eight together), time to first token
//! (p50/p95) for both, checks that every client's text at eight equals its text alone, and
//! times the `gpt2` example's path (`TokenGenerator`, batch 1, no server) for comparison.
//!
//! `cargo bench --features server --bench serve` (threads: `RAYON_NUM_THREADS`, default 2).
//! OpenAI's GPT-2 tokenizer (`gpt2_encoder.json`, `gpt2_vocab.bpe`) is read from `data/` or
//! `$TINYGPT_DATA`, or fetched into `data/` as the examples do; when that fails (offline), a
//! small byte-level BPE is trained on the spot (sampling is then limited to its ids; the
//! model's work is the same).
//! Options after `--`: `--clients N` (default 8), `--tokens N` (default 128), `--quick`
//! (2 clients, 16 tokens: a smoke run).

#[path = "common.rs"]
mod common;
#[path = "../examples/common/data.rs"]
#[allow(dead_code)]
mod data;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tinygpt::candle::{DType, Device};
use tinygpt::sampler::TokenGenerator;
use tinygpt::server::{self, tokio, Engine, EngineConfig, ServerConfig};
use tinygpt::{Gpt, GptConfig, SamplingParams, Tokenizer};

const PROMPT: &str = "The quick brown fox jumps over the lazy dog, and then";

/// One streamed reply as a client saw it.
#[derive(Debug, Clone)]
struct Reply {
    text: String,
    tokens: usize,
    start: Instant,
    first: Option<Instant>,
    end: Instant,
}

impl Reply {
    fn ttft(&self) -> Duration {
        self.first.unwrap_or(self.end) - self.start
    }

    /// Tokens after the first, per second of the time after the first.
    fn decode_tokens_per_s(&self) -> f64 {
        let first = self.first.unwrap_or(self.start);
        (self.tokens.saturating_sub(1)) as f64 / (self.end - first).as_secs_f64().max(1e-9)
    }
}

fn tokenizer() -> Tokenizer {
    match data::gpt2_files(std::path::Path::new("data")) {
        Ok((vocab, merges)) => {
            return Tokenizer::from_gpt2_files(&vocab, &merges).expect("GPT-2 tokenizer")
        }
        Err(e) => eprintln!("no GPT-2 tokenizer files ({e:#}): training a 512-token BPE instead"),
    }
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(200);
    Tokenizer::train_bpe(&text, 512).expect("BPE")
}

/// Streams one completion and records when each piece arrived.
fn stream(addr: SocketAddr, seed: u64, max_tokens: usize) -> Reply {
    let body = json!({
        "prompt": PROMPT, "max_tokens": max_tokens, "stream": true, "seed": seed,
        "temperature": 1.0, "ignore_eos": true, "stream_options": {"include_usage": true},
    });
    let start = Instant::now();
    let resp = ureq::post(format!("http://{addr}/v1/completions"))
        .header("content-type", "application/json")
        .send(body.to_string())
        .expect("request");
    let mut reply = Reply {
        text: String::new(),
        tokens: 0,
        start,
        first: None,
        end: start,
    };
    for line in BufReader::new(resp.into_body().into_reader()).lines() {
        let line = line.expect("read");
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let chunk: Value = serde_json::from_str(data).expect("chunk JSON");
        if let Some(n) = chunk["usage"]["completion_tokens"].as_u64() {
            reply.tokens = n as usize;
        }
        if let Some(text) = chunk["choices"][0]["text"].as_str() {
            if !text.is_empty() {
                reply.first.get_or_insert_with(Instant::now);
                reply.text.push_str(text);
            }
        }
    }
    reply.end = Instant::now();
    reply
}

fn percentile(xs: &[Duration], p: f64) -> Duration {
    let mut v = xs.to_vec();
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v.get(i).copied().unwrap_or_default()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() {
    common::init();
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| -> Option<usize> {
        let i = args.iter().position(|a| a == name)?;
        args.get(i + 1).and_then(|v| v.parse().ok())
    };
    let quick = args.iter().any(|a| a == "--quick");
    let clients = flag("--clients").unwrap_or(if quick { 2 } else { 8 });
    let max_tokens = flag("--tokens").unwrap_or(if quick { 16 } else { 128 });
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_default();

    let tokenizer = tokenizer();
    let cfg = GptConfig {
        vocab_size: 50257,
        ..GptConfig::gpt2()
    };
    let model = Gpt::init(&cfg, 0, &Device::Cpu)
        .and_then(|m| m.to_dtype(DType::F16))
        .expect("model");

    // The gpt2 example's path: one sequence, TokenGenerator with the KV cache, no server.
    let prompt_ids = tokenizer.encode(PROMPT).expect("prompt");
    let params = SamplingParams::default()
        .with_max_new_tokens(max_tokens)
        .with_seed(0);
    let generator_tps = rayon::scope(|_| {
        let mut gen = TokenGenerator::new(&model, &prompt_ids, &params)
            .expect("generator")
            .with_vocab_limit(tokenizer.vocab_size());
        gen.next().expect("first token").expect("first token"); // prefill + first token
        let t = Instant::now();
        let n = gen.by_ref().count();
        n as f64 / t.elapsed().as_secs_f64()
    });

    let engine = Engine::start(
        model,
        tokenizer,
        EngineConfig {
            max_batch: clients.max(1),
            max_queue: 2 * clients.max(1),
        },
    )
    .expect("engine");
    let app = server::router(engine.clone(), ServerConfig::default()).expect("router");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    runtime.spawn(async move { axum_serve(listener, app).await });

    // Warm-up (first-use allocations of the slots), then each seed alone.
    let _ = stream(addr, 99, 4);
    let solo: Vec<Reply> = (0..clients as u64)
        .map(|s| stream(addr, s, max_tokens))
        .collect();
    // All at once.
    let t0 = Instant::now();
    let together: Vec<Reply> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..clients as u64)
            .map(|s| scope.spawn(move || stream(addr, s, max_tokens)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("client"))
            .collect()
    });
    let wall = t0.elapsed();

    let same = solo
        .iter()
        .zip(&together)
        .filter(|(a, b)| a.text == b.text && a.tokens == b.tokens)
        .count();
    let solo_tps: Vec<f64> = solo.iter().map(Reply::decode_tokens_per_s).collect();
    let solo_mean = solo_tps.iter().sum::<f64>() / solo_tps.len().max(1) as f64;
    // Aggregate decode rate at N clients: tokens after each client's first, over the time from
    // the first client's first token to the last client's end.
    let first_all = together.iter().filter_map(|r| r.first).min().unwrap_or(t0);
    let end_all = together.iter().map(|r| r.end).max().unwrap_or(t0);
    let decoded: usize = together.iter().map(|r| r.tokens.saturating_sub(1)).sum();
    let agg_tps = decoded as f64 / (end_all - first_all).as_secs_f64().max(1e-9);
    let total: usize = together.iter().map(|r| r.tokens).sum();
    let ttft1: Vec<Duration> = solo.iter().map(Reply::ttft).collect();
    let ttft_n: Vec<Duration> = together.iter().map(Reply::ttft).collect();

    println!("serve bench: random GPT-2 124M, f16 weights, RAYON_NUM_THREADS={threads}, {max_tokens}-token replies, batch {clients}");
    println!("  gpt2 example path (TokenGenerator, no server): {generator_tps:.1} tokens/s decode");
    println!(
        "  1 client:  {solo_mean:.1} tokens/s decode (mean of {} runs; min {:.1}, max {:.1}); TTFT p50 {:.1} ms, p95 {:.1} ms",
        solo.len(),
        solo_tps.iter().copied().fold(f64::INFINITY, f64::min),
        solo_tps.iter().copied().fold(0.0, f64::max),
        ms(percentile(&ttft1, 0.5)),
        ms(percentile(&ttft1, 0.95))
    );
    println!(
        "  {clients} clients: {agg_tps:.1} tokens/s decode in all ({:.2}x one client); {total} tokens in {:.2} s wall; TTFT p50 {:.1} ms, p95 {:.1} ms",
        agg_tps / solo_mean.max(1e-9),
        wall.as_secs_f64(),
        ms(percentile(&ttft_n, 0.5)),
        ms(percentile(&ttft_n, 0.95))
    );
    println!("  same tokens as alone: {same} of {clients} clients");
    let stats = engine.stats();
    println!(
        "  engine: {} prompt + {} generated tokens, {:.1} tokens/s over its decode steps",
        stats.prompt_tokens, stats.generated_tokens, stats.decode_tokens_per_s
    );
    if same != clients {
        eprintln!("a client's reply differed from its reply alone");
        std::process::exit(1);
    }
}

async fn axum_serve(listener: tokio::net::TcpListener, app: server::axum::Router) {
    if let Err(e) = server::axum::serve(listener, app).await {
        eprintln!("server: {e}");
    }
}
