//! Supervised fine-tuning: teach a pre-trained model to answer in turns.
//!
//! ```text
//! cargo run --release --example sft -- --base out/pretrain-bpe \
//!     --data ../shared/data/sft_gsm8k_train.jsonl --val-data ../shared/data/sft_gsm8k_test.jsonl \
//!     --out out/sft --eval-replies 100
//! ```

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use tinygpt::chat::Message;
use tinygpt::sft::{self, load_sft_file, reply_stats, Sft, SftDataset};
use tinygpt::{checkpoint, Objective, Tokenizer, TrainConfig, Trainer};

/// Fine-tune a pre-trained checkpoint on conversations (JSONL `messages`, or Alpaca records),
/// with the loss on the assistant's tokens only.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The pre-trained checkpoint directory (a BPE model: a char-level one knows only its
    /// corpus's characters).
    #[arg(long, required_unless_present = "resume")]
    base: Option<PathBuf>,
    /// Continue the SFT run saved in this directory (--data defaults to the run's).
    #[arg(long, conflicts_with = "base")]
    resume: Option<PathBuf>,
    /// Conversation files (JSONL `{"messages": […]}`, or Alpaca JSON/JSONL).
    #[arg(long, num_args = 1.., required_unless_present = "resume")]
    data: Vec<PathBuf>,
    /// Held-out conversations [default: the last --val-fraction of --data].
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// Fraction of --data held out when --val-data is not given.
    #[arg(long, default_value_t = 0.05)]
    val_fraction: f64,
    /// Checkpoint directory [default: out/sft, or the --resume directory].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip (and count) malformed records instead of stopping before training.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Train for this many passes over the data (sets --max-iters).
    #[arg(long)]
    epochs: Option<f64>,
    #[command(flatten)]
    train: common::TrainArgs,
    /// Generate replies to this many held-out prompts before and after, and report how many
    /// end with <|end|> within --max-new-tokens.
    #[arg(long, default_value_t = 0)]
    eval_replies: usize,
    #[command(flatten)]
    sampling: common::SamplingArgs,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// SFT defaults: a gentler learning rate than pre-training, short warm-up, no dropout.
fn sft_defaults() -> TrainConfig {
    TrainConfig {
        max_iters: 600,
        eval_interval: 100,
        eval_iters: 10,
        batch_size: 8,
        lr: 3e-4,
        min_lr: 3e-5,
        warmup_iters: 30,
        lr_decay_iters: 600,
        weight_decay: 0.0,
        ..TrainConfig::default()
    }
}

/// Reads conversation files, checking every message encodes with `tokenizer`.
fn read_all(paths: &[PathBuf], tokenizer: &Tokenizer, skip_bad: bool) -> Result<Vec<Vec<Message>>> {
    let mut all = Vec::new();
    for p in paths {
        let mut data = load_sft_file(p, skip_bad)?;
        data.check_encodable(p, tokenizer, skip_bad)?;
        if !data.skipped.is_empty() {
            println!(
                "{}: skipped {} bad records, first: {}",
                p.display(),
                data.skipped.len(),
                data.skipped[0]
            );
        }
        all.extend(data.conversations);
    }
    Ok(all)
}

fn main() -> Result<()> {
    common::init();
    let args = Args::parse();
    let device = common::device(&args.device)?;
    let started = Instant::now();
    let out = args
        .out
        .clone()
        .or_else(|| args.resume.clone())
        .unwrap_or_else(|| PathBuf::from("out/sft"));
    common::fresh_out_dir(&out, args.resume.is_some(), args.train.overwrite)?;

    // 1. The model: the base with the chat tokens added (if its tokenizer lacks them), or the
    //    SFT run to resume.
    let (model, tokenizer, template, base, saved_cfg, data_paths) = match &args.resume {
        Some(dir) => {
            let state = tinygpt::train::TrainerState::load(dir)?;
            let (model, tokenizer) = checkpoint::load_trainable(dir, &device)?;
            let template = tinygpt::ChatTemplate::new(&tokenizer)?;
            let base = state
                .extra
                .get("base")
                .and_then(|b| b.as_str())
                .map(PathBuf::from)
                .unwrap_or_default();
            let data: Vec<PathBuf> = if args.data.is_empty() {
                state
                    .extra
                    .get("data")
                    .and_then(|d| d.as_array())
                    .map(|a| {
                        a.iter()
                            .filter_map(|p| p.as_str())
                            .map(PathBuf::from)
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                args.data.clone()
            };
            if data.is_empty() {
                bail!("{}: no data recorded; pass --data", dir.display());
            }
            println!("resuming {} at step {}", dir.display(), state.step);
            (
                model,
                tokenizer,
                template,
                base,
                Some(state.train_config),
                data,
            )
        }
        None => {
            let base = args.base.clone().unwrap_or_default();
            let (base_model, tokenizer) = checkpoint::load_model(&base, &device)?;
            let before_vocab = tokenizer.vocab_size();
            let (model, tokenizer, template) = sft::prepare_for_chat(&base_model, tokenizer)?;
            println!(
                "base: {} ({} → {} tokens with the chat tokens)",
                base.display(),
                before_vocab,
                tokenizer.vocab_size()
            );
            (model, tokenizer, template, base, None, args.data.clone())
        }
    };

    // 2. Read all the data before training, so a bad record stops the run early.
    let train_convs = read_all(&data_paths, &tokenizer, args.skip_bad_lines)?;
    let val_convs = match &args.val_data {
        Some(p) => Some(read_all(
            std::slice::from_ref(p),
            &tokenizer,
            args.skip_bad_lines,
        )?),
        None => None,
    };
    let block_size = model.config().block_size;
    let (train, train_fit) = SftDataset::new(&train_convs, &tokenizer, &template, block_size)?;
    let (train, val, val_fit) = match &val_convs {
        Some(v) => {
            let (val, fit) = SftDataset::new(v, &tokenizer, &template, block_size)?;
            (train, val, Some(fit))
        }
        None => {
            let (t, v) = train.split(args.val_fraction, 1337);
            (t, v, None)
        }
    };
    println!(
        "data: {} train / {} held-out conversations; fitted to {} tokens: {} whole, {} cut from the left, {} dropped (train)",
        train.len(), val.len(), block_size + 1, train_fit.kept, train_fit.truncated, train_fit.dropped
    );
    if let Some(f) = val_fit {
        println!(
            "held-out: {} whole, {} cut, {} dropped",
            f.kept, f.truncated, f.dropped
        );
    }
    if train.is_empty() {
        bail!(
            "no training conversation fits the context of {} tokens",
            block_size + 1
        );
    }

    // 3. Replies before SFT.
    let probe: Vec<Vec<Message>> = val_convs
        .as_ref()
        .unwrap_or(&train_convs)
        .iter()
        .take(args.eval_replies)
        .cloned()
        .collect();
    let params = args.sampling.params(args.train.seed.unwrap_or(1337));
    let before = if args.eval_replies > 0 {
        let s = reply_stats(&model, &tokenizer, &probe, &params)?;
        println!("before SFT: {}/{} replies end with <|end|> within {} tokens ({:.0}%), mean length {:.0}",
                 s.ended, s.prompts, params.max_new_tokens, 100.0 * s.end_rate(), s.mean_tokens);
        Some(s)
    } else {
        None
    };

    // 4. Train.
    let mut cfg = args.train.apply(saved_cfg.unwrap_or_else(sft_defaults));
    if let Some(epochs) = args.epochs {
        cfg.max_iters = ((epochs * train.len() as f64) / cfg.batch_size as f64).ceil() as usize;
        if args.train.lr_decay_iters.is_none() {
            cfg.lr_decay_iters = cfg.max_iters;
        }
    }
    let mut objective = Sft::new(model, tokenizer, train, val, cfg.batch_size)?;
    let data_json: Vec<String> = data_paths.iter().map(|p| p.display().to_string()).collect();
    let mut trainer = Trainer::new(cfg.clone(), objective.parameters()?)?
        .with_out_dir(&out)
        .with_extra(serde_json::json!({ "base": base.display().to_string(), "data": data_json }));
    if let Some(dir) = &args.resume {
        trainer = trainer.resume_from(dir)?;
    }
    let progress = common::Progress::new(cfg.max_iters, trainer.step());
    let mut first_val = None;
    let summary = trainer.fit(&mut objective, |e| {
        if let tinygpt::TrainEvent::Eval { metrics, .. } = e {
            let val = metrics
                .iter()
                .find(|(k, _)| k == "val_loss")
                .map(|(_, v)| *v);
            first_val = first_val.or(val);
        }
        progress.event(e)
    })?;
    progress.finish();
    let holds = common::holds_run_checkpoint(&out, progress.saved(), args.resume.as_deref());

    // 5. Replies after SFT, from the best checkpoint.
    let after = if args.eval_replies > 0 && holds {
        let (model, tokenizer) = checkpoint::load_model(&out, &device)?;
        let s = reply_stats(&model, &tokenizer, &probe, &params)?;
        println!("after SFT:  {}/{} replies end with <|end|> within {} tokens ({:.0}%), mean length {:.0}",
                 s.ended, s.prompts, params.max_new_tokens, 100.0 * s.end_rate(), s.mean_tokens);
        if let Some(first) = probe.first() {
            let mut session = tinygpt::ChatSession::new(&model, &tokenizer, params.clone())?;
            let question = first
                .iter()
                .rev()
                .find(|m| m.role == tinygpt::Role::User)
                .map(|m| m.content.clone())
                .unwrap_or_default();
            println!(
                "--- sample ---\nuser: {question}\nassistant: {}\n--------------",
                session.send(&question, |_| {})?
            );
        }
        Some(s)
    } else {
        None
    };
    println!(
        "sft: held-out assistant loss {} → {} (best) | replies ending with <|end|>: {} → {} | {} steps, {:.1} s wall this run | {}",
        first_val.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into()),
        summary.best_val_loss.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into()),
        before.map(|s| format!("{:.0}%", 100.0 * s.end_rate())).unwrap_or_else(|| "-".into()),
        after.map(|s| format!("{:.0}%", 100.0 * s.end_rate())).unwrap_or_else(|| "-".into()),
        summary.steps,
        started.elapsed().as_secs_f64(),
        common::checkpoint_note(&out, holds)
    );
    Ok(())
}
