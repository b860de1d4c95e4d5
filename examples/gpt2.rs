//! Generate with a real GPT-2 (124M … 1.5B) downloaded in Hugging Face format, and time it.
//!
//! ```text
//! # a directory with config.json, model.safetensors and tokenizer.json (or vocab.json +
//! # merges.txt), e.g. a clone of huggingface.co/openai-community/gpt2
//! cargo run --release --example gpt2 -- --model ~/models/gpt2 --prompt "Hello, I'm a language model,"
//!
//! # no model download: a randomly initialised GPT-2 124M with OpenAI's tokenizer (fetched into
//! # data/ on first use; --gpt2-files DIR to use another directory), to measure decoding speed
//! # (batch 1, f32, KV cache)
//! RAYON_NUM_THREADS=2 cargo run --release --example gpt2 -- --random-124m --max-new-tokens 100
//! ```
//!
//! Text is streamed as it is decoded; at the end the prompt time (one forward pass over the
//! prompt, filling the KV cache) and the decode speed (one token per step through the cache)
//! are reported separately.

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tinygpt::candle::DType;
use tinygpt::sampler::TokenGenerator;
use tinygpt::{Gpt, GptConfig, Tokenizer};

/// Generate text with a Hugging Face GPT-2 checkpoint and report tokens/s.
#[derive(Debug, Parser)]
#[command(version, args_override_self = true)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["model", "random_124m"])))]
struct Args {
    /// Hugging Face GPT-2 directory (config.json, model.safetensors, tokenizer.json or
    /// vocab.json + merges.txt).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Instead of --model: a randomly initialised GPT-2 124M (for timing without a download).
    #[arg(long)]
    random_124m: bool,
    /// Directory holding OpenAI's GPT-2 tokenizer, gpt2_encoder.json and gpt2_vocab.bpe (for
    /// --random-124m); files missing there are fetched from OpenAI into it, checked against
    /// their sha256 (or taken from $TINYGPT_DATA).
    #[arg(long, value_name = "DIR", default_value = "data")]
    gpt2_files: PathBuf,
    /// Text to continue ("" starts from <|endoftext|>).
    #[arg(long, default_value = "Hello, I'm a language model,")]
    prompt: String,
    #[command(flatten)]
    sampling: common::SamplingArgs,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Keep generating past <|endoftext|> (by default it ends generation).
    #[arg(long)]
    ignore_eos: bool,
    /// Weights dtype: f32, f16 or bf16. f16 halves the bytes read per token (on the CPU the
    /// arithmetic stays f32, see `Gpt::to_dtype`): the fastest choice for decoding. bf16 is
    /// for CUDA: on the CPU it decodes at about half the f32 speed.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> Result<()> {
    common::quiet_on_closed_pipe(run())
}

fn run() -> Result<()> {
    common::init();
    let args = Args::parse();
    let device = common::device(&args.device)?;
    let dtype = match args.dtype.as_str() {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        other => bail!("--dtype must be f32, f16 or bf16, got {other:?}"),
    };

    let t_load = Instant::now();
    let (model, tokenizer, source) = if let Some(dir) = &args.model {
        let model = Gpt::from_hf_dir_with_dtype(dir, &device, dtype)?;
        let tokenizer = tinygpt::hf::load_tokenizer(dir)?;
        (model, tokenizer, dir.display().to_string())
    } else {
        let (vocab, merges) = common::data::gpt2_files(&args.gpt2_files)?;
        let tokenizer = Tokenizer::from_gpt2_files(vocab, merges)
            .context("--random-124m needs OpenAI's tokenizer files (see --gpt2-files)")?;
        let cfg = GptConfig::gpt2();
        let init = Gpt::init(&cfg, args.seed, &device)?;
        // Constant weights (no autograd graph), in the requested dtype.
        let tensors = init
            .tensors()
            .into_iter()
            .map(|(name, t)| Ok((name, t.to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        let model = Gpt::from_tensors(&cfg, tensors, false)?;
        (model, tokenizer, "random GPT-2 124M".to_string())
    };
    let cfg = model.config().clone();
    eprintln!(
        "gpt2: {source}: {:.1}M parameters, {} layers, {} heads, {} wide, context {}, {:?} on {}, \
         loaded in {:.2} s",
        cfg.num_parameters() as f64 / 1e6,
        cfg.n_layer,
        cfg.n_head,
        cfg.n_embd,
        cfg.block_size,
        model.dtype(),
        args.device,
        t_load.elapsed().as_secs_f64()
    );

    let prompt_ids = if args.prompt.is_empty() {
        vec![tokenizer.eot_id()]
    } else {
        tokenizer.encode(&args.prompt)?
    };
    let mut params = args.sampling.params(args.seed);
    if !args.ignore_eos {
        params = params.with_stop_tokens([tokenizer.eot_id()]);
    }

    let mut generator =
        TokenGenerator::new(&model, &prompt_ids, &params)?.with_vocab_limit(tokenizer.vocab_size());
    let mut stream = tokenizer.stream();
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", args.prompt)?;
    stdout.flush()?;
    let t0 = Instant::now();
    let mut first_token_s = None;
    for id in generator.by_ref() {
        let id = id?;
        if first_token_s.is_none() {
            first_token_s = Some(t0.elapsed().as_secs_f64());
        }
        if let Some(piece) = stream.push(id)? {
            write!(stdout, "{piece}")?;
            stdout.flush()?;
        }
    }
    let total_s = t0.elapsed().as_secs_f64();
    if let Some(rest) = stream.finish()? {
        write!(stdout, "{rest}")?;
    }
    writeln!(stdout)?;

    let n = generator.generated().len();
    let prompt_s = first_token_s.unwrap_or(total_s);
    let decode_s = total_s - prompt_s;
    let decoded = n.saturating_sub(1);
    eprintln!(
        "gpt2: prompt of {} token(s) in {:.3} s ({:.1} tokens/s, first token included); \
         {decoded} more tokens in {decode_s:.2} s = {:.2} tokens/s decode; \
         {n} new tokens in {total_s:.2} s overall, {}",
        prompt_ids.len(),
        prompt_s,
        prompt_ids.len() as f64 / prompt_s.max(1e-9),
        decoded as f64 / decode_s.max(1e-9),
        match generator.finish_reason() {
            Some(tinygpt::sampler::FinishReason::Stop) => "stopped at <|endoftext|>",
            _ => "stopped at --max-new-tokens",
        }
    );
    Ok(())
}
