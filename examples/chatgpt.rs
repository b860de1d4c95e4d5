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
//!
//! The whole story ends up in `OUT/report.md`: the machine and build, a summary of the
//! evaluations by stage, then each stage's report card (also appended to
//! `OUT/pretrain/report.md` and `OUT/sft/report.md`) with its loss plot.

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
    /// Held-out conversations whose replies are checked for <|end|> before and after SFT,
    /// for the report's summary (0 = none).
    #[arg(long, default_value_t = 8)]
    eval_replies: usize,
    #[command(flatten)]
    report: common::report::ReportArgs,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// `v` with `decimals` decimals, or `n/a`.
fn fmt(v: Option<f64>, decimals: usize) -> String {
    v.map(|v| format!("{v:.decimals$}"))
        .unwrap_or_else(|| "n/a".into())
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
    let environment = tinygpt::report::Environment::detect();

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
    // Bytes of the held-out text, for the report's bits per byte.
    let val_tokens = dataset.tokens(tinygpt::Split::Val);
    let val_bytes = tokenizer.decode(val_tokens).map(|t| t.len()).unwrap_or(0);
    let val_tokens = val_tokens.len();
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
    let stage_started = Instant::now();
    // What the pretrain example records too: `eval` then knows the split this run held out.
    let extra = serde_json::json!({
        "data": data_path.display().to_string(),
        "tokenizer": "bpe",
    });
    let mut trainer = Trainer::new(pre_cfg.clone(), pretraining.parameters()?)?
        .with_out_dir(&pre_dir)
        .with_extra(extra)
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
    let pre_card = (!args.report.no_report).then(|| {
        let mut card = common::report::card(
            "Pre-training",
            &pre_dir,
            base.config(),
            &pre_cfg,
            &pre,
            0,
            stage_started,
        );
        card.bits_per_byte = pre
            .best_val_loss
            .and_then(|l| tinygpt::report::bpb_from_loss(l, val_tokens, val_bytes));
        card.facts.push((
            "data".into(),
            format!(
                "{} (byte-level BPE, {} tokens in the vocabulary)",
                data_path.display(),
                tokenizer.vocab_size()
            ),
        ));
        if args.report.report_samples > 0 {
            let params = common::report::sample_params(200, args.seed);
            match tinygpt::generate(&base, &tokenizer, "\n", &params)
                .and_then(|g| g.collect::<tinygpt::Result<String>>())
            {
                Ok(text) => card.samples.push(text),
                Err(e) => card.samples.push(format!("(no sample: {e})")),
            }
        }
        common::report::write_stage(&args.report, &pre_dir, &trainer, "pretrain", card)
    });
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
    // Replies to held-out prompts before SFT (the base model with the chat tokens added).
    let probe: Vec<Vec<u32>> = common::report::last_turn_prompts(val.examples())
        .into_iter()
        .take(args.eval_replies)
        .collect();
    let reply_params = SamplingParams::default()
        .with_temperature(0.7)
        .with_top_k(50)
        .with_max_new_tokens(args.max_new_tokens)
        .with_seed(args.seed);
    let before = if probe.is_empty() {
        None
    } else {
        Some(common::report::prompt_reply_stats(
            &model,
            &tokenizer,
            &probe,
            &reply_params,
        )?)
    };
    let mut sft = Sft::new(model, tokenizer, train, val, sft_cfg.batch_size)?;
    let progress = common::Progress::new(sft_cfg.max_iters, 0);
    let stage_started = Instant::now();
    let mut trainer = Trainer::new(sft_cfg.clone(), sft.parameters()?)?
        .with_out_dir(&sft_dir)
        .with_stop_flag(stop.flag());
    // The held-out loss at step 0: the base model's, before any fine-tuning.
    let mut first_val = None;
    let tuned = common::train(
        &mut trainer,
        &mut sft,
        &stop,
        &progress,
        |e| {
            if let tinygpt::TrainEvent::Eval { metrics, .. } = e {
                first_val = first_val.or(metrics
                    .iter()
                    .find(|(k, _)| k == "val_loss")
                    .map(|(_, v)| *v));
            }
        },
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
    let mut answers = Vec::new();
    for question in &args.ask {
        let mut session = ChatSession::new(&model, &tokenizer, params.clone())?;
        println!("user: {question}");
        print!("assistant: ");
        let answer = session.send(question, |piece| {
            print!("{piece}");
            let _ = std::io::Write::flush(&mut std::io::stdout());
        })?;
        println!();
        answers.push(format!("user: {question}\nassistant: {}", answer.trim()));
    }
    let after = if probe.is_empty() {
        None
    } else {
        Some(common::report::prompt_reply_stats(
            &model,
            &tokenizer,
            &probe,
            &reply_params,
        )?)
    };

    // The report cards of the fine-tuning and of the whole story.
    if !args.report.no_report {
        let mut card = common::report::card(
            "Supervised fine-tuning",
            &sft_dir,
            model.config(),
            &sft_cfg,
            &tuned,
            0,
            stage_started,
        );
        card.facts.push((
            "held-out assistant loss".into(),
            format!(
                "{} → {} (best)",
                fmt(first_val, 4),
                fmt(tuned.best_val_loss, 4)
            ),
        ));
        card.samples = if answers.is_empty() {
            common::report::prompt_samples(
                &model,
                &tokenizer,
                &probe,
                &params,
                args.report.report_samples,
            )
        } else {
            answers.clone()
        };
        let sft_card = common::report::write_stage(&args.report, &sft_dir, &trainer, "sft", card);

        let mut score = tinygpt::report::Scorecard::new(["base", "SFT", "RLHF"]);
        if let Some(v) = pre.best_val_loss {
            score.set(
                "val loss on the text (nats/token)",
                "base",
                format!("{v:.4}"),
            );
        }
        if let Some(b) = pre_card.as_ref().and_then(|c| c.as_ref()?.bits_per_byte) {
            score.set("bits per byte on the text", "base", format!("{b:.4}"));
        }
        if let Some(v) = first_val {
            score.set(
                "held-out assistant loss (nats/token)",
                "base",
                format!("{v:.4}"),
            );
        }
        if let Some(v) = tuned.best_val_loss {
            score.set(
                "held-out assistant loss (nats/token)",
                "SFT",
                format!("{v:.4}"),
            );
        }
        for (stage, stats) in [("base", &before), ("SFT", &after)] {
            if let Some(s) = stats {
                score.set(
                    "held-out replies ending with <|end|>",
                    stage,
                    format!("{:.0}% of {}", 100.0 * s.end_rate(), s.prompts),
                );
                score.set(
                    "mean reply length (tokens)",
                    stage,
                    format!("{:.1}", s.mean_tokens),
                );
            }
        }
        for (stage, summary, cfg) in [
            ("base", &pre, base.config()),
            ("SFT", &tuned, model.config()),
        ] {
            score.set("optimiser steps", stage, summary.steps.to_string());
            score.set(
                "training tokens",
                stage,
                tinygpt::report::si(summary.tokens_seen as f64),
            );
            let flops = tinygpt::report::flops_per_token(cfg, cfg.block_size);
            score.set(
                "training FLOPs",
                stage,
                tinygpt::report::si(flops.total(summary.tokens_seen)),
            );
            score.set(
                "training time",
                stage,
                tinygpt::report::duration(summary.elapsed_s),
            );
        }
        let summary = score.section("Summary").paragraph(format!(
            "Evaluations by stage; — where a stage was not measured (chatgpt runs no RLHF \
             stage: the reward, dpo and ppo examples do). Held-out replies: {} prompts, up to \
             {} tokens, temperature 0.7. {} in all.",
            probe.len(),
            args.max_new_tokens,
            tinygpt::report::duration(started.elapsed().as_secs_f64())
        ));
        let mut report = tinygpt::report::Report::new("tinygpt: a small ChatGPT from scratch")
            .section(environment.section("Environment"))
            .section(summary);
        for (card, dir) in [(pre_card.flatten(), "pretrain/"), (sft_card, "sft/")] {
            if let Some(card) = card {
                let card = common::report::with_image_prefix(&card, dir);
                match card.section() {
                    Ok(s) => report = report.section(s),
                    Err(e) => eprintln!("warning: report: {e}"),
                }
            }
        }
        let path = args.out.join(tinygpt::report::REPORT_FILE);
        match report.write_to(&path) {
            Ok(()) => println!("report: {} (the whole story)", path.display()),
            Err(e) => eprintln!("warning: no report written: {e}"),
        }
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
