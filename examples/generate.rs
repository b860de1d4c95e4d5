//! Generate text from a checkpoint, streaming it as it comes.
//!
//! ```text
//! cargo run --release --example generate -- --ckpt out/pretrain --prompt "ROMEO:"
//! ```

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use clap::Parser;
use tinygpt::{checkpoint, sampler};

/// Sample from a trained model.
#[derive(Debug, Parser)]
#[command(version, args_override_self = true)]
struct Args {
    /// Checkpoint directory (config.json, model.safetensors, tokenizer.json), or a Hugging Face
    /// GPT-2 directory.
    #[arg(long)]
    ckpt: PathBuf,
    /// Text to continue ("" starts from <|endoftext|>).
    #[arg(long, default_value = "\n")]
    prompt: String,
    #[command(flatten)]
    sampling: common::SamplingArgs,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Keep generating past <|endoftext|> (by default it ends the text, as in gpt2) and, for a
    /// chat model, past <|end|>.
    #[arg(long)]
    ignore_eos: bool,
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
    let (model, tokenizer) = checkpoint::load_model(&args.ckpt, &device)?;
    let mut params = args.sampling.params(args.seed);
    // A chat model's text is turns: generate continues it as plain text, so a turn's end
    // (`<|end|>`) ends it too, as <|endoftext|> does.
    let chat_end = tinygpt::ChatTemplate::new(&tokenizer)
        .ok()
        .map(|t| t.end_id());
    if let Some(end) = chat_end {
        eprintln!(
            "generate: {} is a chat model: this continues the prompt as plain text and stops at \
             <|end|>; `chat --ckpt {0}` answers in turns",
            args.ckpt.display()
        );
        if !args.ignore_eos {
            params = params.with_stop_tokens(vec![tokenizer.eot_id(), end]);
        }
    } else if !args.ignore_eos {
        params = params.with_stop_tokens(vec![tokenizer.eot_id()]);
    }
    let t0 = Instant::now();
    let mut generation = sampler::generate(&model, &tokenizer, &args.prompt, &params)?;
    let mut stdout = std::io::stdout().lock();
    write!(stdout, "{}", args.prompt)?;
    for piece in generation.by_ref() {
        write!(stdout, "{}", piece?)?;
        stdout.flush()?;
    }
    let n = generation.tokens().generated().len();
    let dt = t0.elapsed().as_secs_f64();
    writeln!(stdout)?;
    eprintln!(
        "generate: {n} tokens in {dt:.2} s ({:.1} tokens/s), {}",
        n as f64 / dt.max(1e-9),
        match generation.tokens().finish_reason() {
            Some(tinygpt::sampler::FinishReason::Stop) if chat_end.is_some() =>
                "stopped at <|endoftext|> or <|end|>",
            Some(tinygpt::sampler::FinishReason::Stop) => "stopped at <|endoftext|>",
            _ => "stopped at --max-new-tokens",
        }
    );
    Ok(())
}
