//! The whole story in one command: pre-train a GPT on raw text, fine-tune it on
//! conversations, then ask it questions.
//!
//! ```text
//! cargo run --release --example chatgpt -- \
//!     --sft-data data/sft_identity.jsonl data/sft_alpaca_en_demo.jsonl \
//!     --ask "Who are you?" --ask "Write a short poem about the sea."
//! ```
//! Sized to finish in about ten minutes on two cores; every stage prints what it did. Ctrl-C
//! (or SIGTERM) stops the stage in training after its current step and saves its state.

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use tinygpt::sft::{load_sft_file, prepare_for_chat, Sft, SftDataset};
use tinygpt::{
    checkpoint, data, ChatSession, ChatTemplate, Gpt, GptConfig, Objective, Pretraining,
    SamplingParams, TokenDataset, Tokenizer, TrainConfig, Trainer,
};

/// Pre-train, fine-tune for chat, and talk: a tiny ChatGPT from scratch.
#[derive(Debug, Parser)]
#[command(version, args_override_self = true)]
struct Args {
    /// Raw text to pre-train on [default: Tiny Shakespeare, downloaded into data/].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Conversations to fine-tune on (JSONL `messages` or Alpaca records); the public sets
    /// (`data/sft_identity.jsonl`, `data/sft_alpaca_en_demo.jsonl`, …) are fetched when missing.
    #[arg(long, num_args = 1.., required = true)]
    sft_data: Vec<PathBuf>,
    /// A question to ask the finished model (repeatable).
    #[arg(long)]
    ask: Vec<String>,
    /// Where the checkpoints of both stages go (`DIR/pretrain`, `DIR/sft`).
    #[arg(long, default_value = "out/chatgpt")]
    out: PathBuf,
    /// Replace checkpoints already in --out.
    #[arg(long)]
    overwrite: bool,
    /// The assistant's name, put in place of `{{name}}` in the SFT data (LLaMA-Factory's
    /// identity set has such placeholders).
    #[arg(long, default_value = "tinygpt")]
    name: String,
    /// Its author, in place of `{{author}}`.
    #[arg(long, default_value = "the tinygpt authors")]
    author: String,
    /// Vocabulary of the byte-level BPE tokenizer.
    #[arg(long, default_value_t = 1024)]
    vocab_size: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 4)]
    n_layer: usize,
    /// Attention heads per block (must divide --n-embd).
    #[arg(long, default_value_t = 4)]
    n_head: usize,
    /// Embedding width.
    #[arg(long, default_value_t = 128)]
    n_embd: usize,
    /// Context length in tokens.
    #[arg(long, default_value_t = 128)]
    block_size: usize,
    /// Pre-training steps.
    #[arg(long, default_value_t = 1500)]
    pretrain_iters: usize,
    /// Fine-tuning steps.
    #[arg(long, default_value_t = 400)]
    sft_iters: usize,
    /// Tokens per reply.
    #[arg(long, default_value_t = 120)]
    max_new_tokens: usize,
    /// Seed of every random choice (initialisation, batches, held-out split, sampling).
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// What to do after Ctrl-C: this example has no --resume.
const AFTER_INTERRUPT: &str = "chatgpt does not continue a stage: run the same command with \
    --overwrite added to start over";

fn main() -> Result<()> {
    common::init();
    let stop = common::Stop::install()?;
    let args = Args::parse();
    let device = common::device(&args.device)?;
    let started = Instant::now();

    // Read every input first, so a bad file stops us before any training.
    let data_path = common::corpus(args.data.as_deref())?;
    let text = data::read_text(&data_path)?;
    for stage in ["pretrain", "sft"] {
        common::fresh_out_dir(&args.out.join(stage), None, None, args.overwrite)?;
    }
    let mut conversations = Vec::new();
    for p in &common::data::resolve_all("--sft-data", &args.sft_data)? {
        conversations.extend(load_sft_file(p, false)?.conversations);
    }
    common::fill_identity(conversations.iter_mut(), &args.name, &args.author);

    // Stage 1: text -> tokens -> a GPT that plays the next-token game.
    println!("== 1. pre-training on {} ==", data_path.display());
    let tokenizer = Tokenizer::train_bpe(&text, args.vocab_size)?;
    let cfg = GptConfig {
        vocab_size: tokenizer.vocab_size() + ChatTemplate::SPECIAL_TOKENS.len(),
        block_size: args.block_size,
        n_layer: args.n_layer,
        n_head: args.n_head,
        n_embd: args.n_embd,
        dropout: 0.0,
        bias: false,
        ..Default::default()
    };
    let dataset = TokenDataset::from_tokens(tokenizer.encode(&text)?, 0.1)?;
    println!(
        "byte-level BPE of {} tokens; {} training tokens; a {:.2}M-parameter GPT",
        tokenizer.vocab_size(),
        dataset.tokens(tinygpt::Split::Train).len(),
        cfg.num_parameters() as f64 / 1e6
    );
    let model = Gpt::init(&cfg, args.seed, &device)?;
    let pre_cfg = TrainConfig {
        max_iters: args.pretrain_iters,
        lr_decay_iters: args.pretrain_iters,
        eval_interval: (args.pretrain_iters / 4).max(1),
        seed: args.seed,
        ..TrainConfig::default()
    };
    let pre_dir = args.out.join("pretrain");
    let mut pretraining = Pretraining::new(model, tokenizer, dataset, pre_cfg.batch_size)?;
    let progress = common::Progress::new(pre_cfg.max_iters, 0);
    let mut trainer = Trainer::new(pre_cfg.clone(), pretraining.parameters()?)?
        .with_out_dir(&pre_dir)
        .with_stop_flag(stop.flag());
    let pre = common::train(
        &mut trainer,
        &mut pretraining,
        &stop,
        &progress,
        |_| {},
        AFTER_INTERRUPT,
    )?;
    println!(
        "pre-trained {} steps: best val loss {:.3} ({:.0} s)",
        pre.steps,
        pre.best_val_loss.unwrap_or(f64::NAN),
        pre.elapsed_s
    );

    // Stage 2: the same game on conversations, scored on the assistant's tokens only.
    println!(
        "== 2. supervised fine-tuning on {} conversations ==",
        conversations.len()
    );
    let (base, tokenizer) = checkpoint::load_model(&pre_dir, &device)?;
    let (model, tokenizer, template) = prepare_for_chat(&base, tokenizer)?;
    let (all, fit) = SftDataset::new(&conversations, &tokenizer, &template, args.block_size)?;
    let (train, val) = all.split(0.05, args.seed);
    println!(
        "{} train / {} held-out conversations ({} cut from the left to fit, {} too long to keep)",
        train.len(),
        val.len(),
        fit.truncated,
        fit.dropped
    );
    if train.is_empty() {
        bail!(
            "no conversation fits the context of {} tokens",
            args.block_size + 1
        );
    }
    if fit.dropped * 4 > conversations.len() {
        println!(
            "warning: {} of {} conversations are longer than the context even without their \
             earlier turns; a larger --block-size keeps more",
            fit.dropped,
            conversations.len()
        );
    }
    let sft_cfg = TrainConfig {
        max_iters: args.sft_iters,
        lr_decay_iters: args.sft_iters,
        eval_interval: (args.sft_iters / 4).max(1),
        eval_iters: 10,
        batch_size: 8,
        lr: 3e-4,
        min_lr: 3e-5,
        warmup_iters: 20,
        weight_decay: 0.0,
        seed: args.seed,
        ..TrainConfig::default()
    };
    let sft_dir = args.out.join("sft");
    let mut sft = Sft::new(model, tokenizer, train, val, sft_cfg.batch_size)?;
    let progress = common::Progress::new(sft_cfg.max_iters, 0);
    let mut trainer = Trainer::new(sft_cfg.clone(), sft.parameters()?)?
        .with_out_dir(&sft_dir)
        .with_stop_flag(stop.flag());
    let tuned = common::train(
        &mut trainer,
        &mut sft,
        &stop,
        &progress,
        |_| {},
        AFTER_INTERRUPT,
    )?;
    println!(
        "fine-tuned {} steps: held-out assistant loss {:.3} ({:.0} s)",
        tuned.steps,
        tuned.best_val_loss.unwrap_or(f64::NAN),
        tuned.elapsed_s
    );

    // Stage 3: talk.
    println!("== 3. chat ==");
    let (model, tokenizer) = checkpoint::load_model(&sft_dir, &device)?;
    let params = SamplingParams::default()
        .with_temperature(0.7)
        .with_top_k(50)
        .with_max_new_tokens(args.max_new_tokens)
        .with_seed(args.seed);
    for question in &args.ask {
        let mut session = ChatSession::new(&model, &tokenizer, params.clone())?;
        println!("user: {question}");
        print!("assistant: ");
        session.send(question, |piece| {
            print!("{piece}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
        })?;
        println!();
    }
    println!(
        "chatgpt: pre-train val loss {:.3} | SFT held-out loss {:.3} | {:.0} s in all | chat with: cargo run --release --example chat -- --ckpt {}",
        pre.best_val_loss.unwrap_or(f64::NAN),
        tuned.best_val_loss.unwrap_or(f64::NAN),
        started.elapsed().as_secs_f64(),
        sft_dir.display()
    );
    Ok(())
}
