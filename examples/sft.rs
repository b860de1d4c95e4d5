//! Supervised fine-tuning: teach a pre-trained model to answer in turns.
//!
//! ```text
//! cargo run --release --example sft -- --base out/pretrain-bpe \
//!     --data data/sft_gsm8k_train.jsonl --val-data data/sft_gsm8k_test.jsonl \
//!     --out out/sft --eval-replies 100
//! cargo run --release --example sft -- --resume out/sft      # continue (e.g. after Ctrl-C)
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
use tinygpt::data::HeldOut;
use tinygpt::sft::{self, load_sft_file, reply_stats, Sft, SftDataset};
use tinygpt::{checkpoint, Objective, Tokenizer, TrainConfig, Trainer};

/// Fine-tune a pre-trained checkpoint on conversations (JSONL `messages`, or Alpaca records),
/// with the loss on the assistant's tokens only.
#[derive(Debug, Parser)]
#[command(version, args_override_self = true)]
struct Args {
    /// The pre-trained checkpoint directory (a BPE model: a char-level one knows only its
    /// corpus's characters), or a Hugging Face GPT-2 directory (e.g. OpenAI's gpt2).
    #[arg(long, required_unless_present = "resume")]
    base: Option<PathBuf>,
    /// Continue the SFT run saved in this directory (an earlier --out) from its newest state,
    /// the best checkpoint or a later OUT/checkpoint-STEP (or from the OUT/checkpoint-STEP
    /// named); --data, --val-data / --val-fraction and --skip-bad-lines default to the run's,
    /// training flags given override the saved settings.
    #[arg(long, conflicts_with = "base")]
    resume: Option<PathBuf>,
    /// Conversation files (JSONL `{"messages": […]}`, or Alpaca JSON/JSONL).
    #[arg(long, num_args = 1.., required_unless_present = "resume")]
    data: Vec<PathBuf>,
    /// Held-out conversations [default: the last --val-fraction of --data].
    #[arg(long, conflicts_with = "val_fraction")]
    val_data: Option<PathBuf>,
    /// Fraction of --data held out when --val-data is not given, in [0, 1); 0 holds out
    /// nothing (no held-out loss) [default: 0.05].
    #[arg(long, allow_negative_numbers = true)]
    val_fraction: Option<f64>,
    /// Checkpoint directory, holding the best checkpoint and the latest states
    /// (OUT/checkpoint-STEP) [default: out/sft, or the --resume directory].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Skip (and count) malformed records instead of stopping before training.
    #[arg(long)]
    skip_bad_lines: bool,
    /// The assistant's name, put in place of `{{name}}` in the data (LLaMA-Factory's identity
    /// set has such placeholders) [default: tinygpt, or the resumed run's].
    #[arg(long)]
    name: Option<String>,
    /// Its author, in place of `{{author}}` [default: the tinygpt authors, or the resumed
    /// run's].
    #[arg(long)]
    author: Option<String>,
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
    #[command(flatten)]
    report: common::report::ReportArgs,
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

/// The share of --data held out when neither the flags nor a resumed run say otherwise.
const DEFAULT_VAL_FRACTION: f64 = 0.05;

/// The value of metric `key` in a metrics line.
fn metric(metrics: &[(String, f64)], key: &str) -> Option<f64> {
    metrics.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

fn main() -> Result<()> {
    common::init();
    let stop = common::Stop::install()?;
    let args = Args::parse();
    // Flags are checked before anything is loaded, used or not.
    if let Some(f) = args.val_fraction {
        common::check_val_fraction(f)?;
    }
    let params = args
        .sampling
        .checked_params(args.train.seed.unwrap_or(1337))?;
    let device = common::device(&args.device)?;
    let started = Instant::now();
    let resume = args
        .resume
        .as_deref()
        .map(|dir| common::resume(dir, Sft::STAGE))
        .transpose()?;
    let resumed = resume.as_ref().map(|r| r.run.as_path());
    let out = common::stage_out_dir(
        args.out.as_deref(),
        resumed,
        Sft::STAGE,
        &[("--base", args.base.as_deref())],
        args.train.overwrite,
    )?;
    let args = Args {
        data: common::data::resolve_all("--data", &args.data)?,
        val_data: common::data::resolve_opt("--val-data", args.val_data.as_deref())?,
        ..args
    };

    // 1. The model: the base with the chat tokens added (if its tokenizer lacks them), or the
    //    SFT run to resume.
    let (model, tokenizer, template, base, saved_cfg, data_paths, held_out, skip_bad, recorded) =
        match &resume {
            Some(resume) => {
                let (dir, state) = (&resume.run, resume.state.clone());
                let (model, tokenizer) = checkpoint::load_trainable(&resume.dir, &device)?;
                let template = tinygpt::ChatTemplate::new(&tokenizer)?;
                let base = state
                    .extra
                    .get("base")
                    .and_then(|b| b.as_str())
                    .map(PathBuf::from)
                    .unwrap_or_default();
                let recorded = common::rlhf::paths_from_json(state.extra.get("data"));
                let data: Vec<PathBuf> = if args.data.is_empty() {
                    recorded
                } else {
                    if !recorded.is_empty() && recorded != args.data {
                        println!(
                            "note: --data replaces the run's data ({}): the training set changes",
                            recorded
                                .iter()
                                .map(|p| p.display().to_string())
                                .collect::<Vec<_>>()
                                .join(" ")
                        );
                    }
                    args.data.clone()
                };
                if data.is_empty() {
                    bail!("{}: no data recorded; pass --data", dir.display());
                }
                let held_out = common::held_out(
                    args.val_data.as_deref(),
                    args.val_fraction,
                    Some(&state.extra),
                    DEFAULT_VAL_FRACTION,
                )?;
                let recorded_skip = state.extra["skip_bad_lines"].as_bool() == Some(true);
                if recorded_skip && !args.skip_bad_lines {
                    println!("skipping bad records, as the run did (--skip-bad-lines)");
                }
                (
                    model,
                    tokenizer,
                    template,
                    base,
                    Some(state.train_config),
                    data,
                    held_out,
                    args.skip_bad_lines || recorded_skip,
                    state.extra,
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
                let held_out = common::held_out(
                    args.val_data.as_deref(),
                    args.val_fraction,
                    None,
                    DEFAULT_VAL_FRACTION,
                )?;
                (
                    model,
                    tokenizer,
                    template,
                    base,
                    None,
                    args.data.clone(),
                    held_out,
                    args.skip_bad_lines,
                    serde_json::Value::Null,
                )
            }
        };
    // What the placeholders of the identity data become: the flags, else the resumed run's.
    let identity = |flag: &Option<String>, key: &str, default: &str| {
        flag.clone()
            .or_else(|| recorded[key].as_str().map(String::from))
            .unwrap_or_else(|| default.to_string())
    };
    let name = identity(&args.name, "name", "tinygpt");
    let author = identity(&args.author, "author", "the tinygpt authors");

    // 2. Read all the data before training, so a bad record stops the run early.
    let mut train_convs = read_all(&data_paths, &tokenizer, skip_bad)?;
    let mut val_convs = match held_out.file() {
        Some(p) => Some(read_all(&[p.to_path_buf()], &tokenizer, skip_bad)?),
        None => None,
    };
    common::fill_identity(
        train_convs.iter_mut().chain(val_convs.iter_mut().flatten()),
        &name,
        &author,
    );
    let block_size = model.config().block_size;
    let (train, train_fit) = SftDataset::new(&train_convs, &tokenizer, &template, block_size)?;
    let (train, val, val_fit) = match &val_convs {
        Some(v) => {
            let (val, fit) = SftDataset::new(v, &tokenizer, &template, block_size)?;
            (train, val, Some(fit))
        }
        None => {
            let (t, v) = train.split(held_out.val_fraction(), 1337);
            (t, v, None)
        }
    };
    let fitted = train_fit.kept + train_fit.truncated;
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
    if train.is_empty() && fitted > 0 {
        bail!(
            "--val-fraction {} holds out all {fitted} conversations that fit: lower it, or pass \
             --val-data",
            held_out.val_fraction()
        );
    }
    if train.is_empty() {
        bail!(
            "no training conversation fits the context of {} tokens",
            block_size + 1
        );
    }
    let no_held_out = val.is_empty();
    if no_held_out {
        let why = match &held_out {
            HeldOut::Fraction(f) if *f == 0.0 => "--val-fraction 0".to_string(),
            HeldOut::Fraction(f) => {
                format!("--val-fraction {f} of {fitted} conversations rounds to none")
            }
            HeldOut::File(p) => format!("no conversation of {} fits the context", p.display()),
        };
        println!(
            "no held-out split ({why}): there is no held-out loss, so every evaluation writes a \
             checkpoint and the training loss is reported"
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
    let before = if args.eval_replies > 0 {
        let s = reply_stats(&model, &tokenizer, &probe, &params)?;
        // A resumed run starts from its saved state, not from the base.
        let when = match &resume {
            Some(r) => format!("at step {}", r.state.step),
            None => "before SFT".into(),
        };
        println!(
            "{when}: {}/{} replies end with <|end|> within {} tokens ({:.0}%), mean length {:.0}",
            s.ended,
            s.prompts,
            params.max_new_tokens,
            100.0 * s.end_rate(),
            s.mean_tokens
        );
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
    let (objective_train_len, objective_val_len) = (train.len(), val.len());
    let mut objective = Sft::new(model, tokenizer, train, val, cfg.batch_size)?;
    let data_json: Vec<String> = data_paths.iter().map(|p| p.display().to_string()).collect();
    common::announce(&cfg)?;
    let (val_data_json, val_fraction_json) = held_out.to_extra();
    let mut trainer = Trainer::new(cfg.clone(), objective.parameters()?)?
        .with_stop_flag(stop.flag())
        .with_out_dir(&out)
        .with_extra(serde_json::json!({
            "base": base.display().to_string(),
            "data": data_json,
            "val_data": val_data_json,
            "val_fraction": val_fraction_json,
            "skip_bad_lines": skip_bad,
            "name": name,
            "author": author,
        }));
    if let Some(resume) = &resume {
        trainer = common::resume_trainer(trainer, resume, &cfg, "--max-iters or --epochs")?;
    }
    let first_step = trainer.step();
    let progress = common::Progress::new(cfg.max_iters, first_step);
    // The run's first evaluation: in the resumed run's metrics, else this run's first.
    let recorded_first = |key: &str| {
        resume
            .as_ref()
            .and_then(|r| common::first_eval_metric(&r.dir, key))
    };
    let (mut first_val, mut first_train) =
        (recorded_first("val_loss"), recorded_first("train_loss"));
    // What the run needs again that is not saved with it: the device, and the reply checks.
    let mut again = common::device_flag(&args.device);
    if args.eval_replies > 0 {
        again.extend(["--eval-replies".into(), args.eval_replies.to_string()]);
        again.extend(args.sampling.flags());
    }
    let summary = common::train(
        &mut trainer,
        &mut objective,
        &stop,
        &progress,
        |e| {
            if let tinygpt::TrainEvent::Eval { metrics, .. } = e {
                first_val = first_val.or(metric(metrics, "val_loss"));
                first_train = first_train.or(metric(metrics, "train_loss"));
            }
        },
        &common::continue_with("sft", &out, &again),
    )?;
    let holds = common::holds_run_checkpoint(&out, progress.saved(), resumed);

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
    let fmt = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into());
    let losses = if no_held_out {
        format!(
            "no held-out set; training assistant loss {} → {}",
            fmt(first_train),
            fmt(metric(&summary.last_metrics, "train_loss"))
        )
    } else {
        format!(
            "held-out assistant loss {} → {} (best)",
            fmt(first_val),
            fmt(summary.best_val_loss)
        )
    };

    // 6. The report card: OUT/report.md and the plots beside metrics.jsonl.
    if !args.report.no_report {
        let mut card = common::report::card(
            "Supervised fine-tuning",
            &out,
            objective.model().config(),
            &cfg,
            &summary,
            first_step,
            started,
        );
        card.facts.push(("losses".into(), losses.clone()));
        if let (Some(b), Some(a)) = (&before, &after) {
            card.facts.push((
                "replies ending with <|end|>".into(),
                format!(
                    "{:.0}% → {:.0}% of {} held-out prompts",
                    100.0 * b.end_rate(),
                    100.0 * a.end_rate(),
                    a.prompts
                ),
            ));
        }
        card.facts.push((
            "data".into(),
            format!(
                "{} ({} train / {} held-out conversations)",
                data_paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
                objective_train_len,
                objective_val_len
            ),
        ));
        let n = args.report.report_samples;
        if n > 0 && holds {
            let convs = val_convs.as_ref().unwrap_or(&train_convs);
            let (model, tokenizer) = checkpoint::load_model(&out, &device)?;
            card.samples = common::report::chat_samples(&model, &tokenizer, convs, &params, n);
        }
        common::report::write_stage(&args.report, &out, &trainer, Sft::STAGE, card);
    }
    println!(
        "sft: {losses} | replies ending with <|end|>: {} → {} | {} steps, {:.1} s wall this run | {}",
        before.as_ref().map(|s| format!("{:.0}%", 100.0 * s.end_rate())).unwrap_or_else(|| "-".into()),
        after.as_ref().map(|s| format!("{:.0}%", 100.0 * s.end_rate())).unwrap_or_else(|| "-".into()),
        summary.steps,
        started.elapsed().as_secs_f64(),
        common::checkpoint_note(&out, holds, &trainer)
    );
    Ok(())
}
