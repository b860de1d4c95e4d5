//! Train a reward model on preference pairs (InstructGPT's Bradley–Terry reward model).
//!
//! ```text
//! cargo run --release --example reward -- --sft out/rule/sft \
//!     --data data/pref_hh_rlhf_harmless_test.jsonl --out out/reward-hh
//! cargo run --release --example reward -- --resume out/reward-hh --max-iters 600
//! ```

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use tinygpt::chat::reply_text;
use tinygpt::rlhf::{PreferenceDataset, RewardModel, RewardTraining};
use tinygpt::{ChatTemplate, Objective, TrainConfig, Trainer};

/// Train a reward model (SFT backbone + scalar head) on preference JSONL
/// (`{"prompt", "history", "chosen", "rejected"}`).
#[derive(Debug, Parser)]
#[command(version, args_override_self = true)]
struct Args {
    /// The SFT checkpoint the backbone starts from (or a chat model exported to Hugging Face
    /// format).
    #[arg(long, required_unless_present = "resume")]
    sft: Option<PathBuf>,
    /// Preference files (JSONL).
    #[arg(long, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Held-out pairs [default: the last --val-fraction of --data].
    #[arg(long, conflicts_with = "val_fraction")]
    val_data: Option<PathBuf>,
    /// Fraction of --data held out when --val-data is not given, in [0, 1) [default: 0.05,
    /// or the resumed run's].
    #[arg(long, allow_negative_numbers = true)]
    val_fraction: Option<f64>,
    /// Checkpoint directory, holding the best held-out loss and the latest states
    /// (OUT/checkpoint-STEP) [default: the --resume directory, else out/reward].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run saved in this directory (an earlier --out) from its newest state, the
    /// best checkpoint or a later OUT/checkpoint-STEP (or from the OUT/checkpoint-STEP named);
    /// training flags given override the saved settings.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Replies are cut to this many tokens [default: half the context, or the resumed run's].
    #[arg(long)]
    max_response_tokens: Option<usize>,
    /// Skip (and count) malformed records instead of stopping before training [default: off,
    /// or the resumed run's].
    #[arg(long)]
    skip_bad_lines: bool,
    #[command(flatten)]
    train: common::TrainArgs,
    #[command(flatten)]
    report: common::report::ReportArgs,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Reward-model defaults: SFT's gentle learning rate, no weight decay.
fn reward_defaults() -> TrainConfig {
    TrainConfig {
        max_iters: 300,
        eval_interval: 50,
        eval_iters: 10,
        batch_size: 8,
        lr: 3e-4,
        min_lr: 3e-5,
        warmup_iters: 20,
        lr_decay_iters: 300,
        weight_decay: 0.0,
        ..TrainConfig::default()
    }
}

/// The first `n` held-out pairs with the rewards `model` gives both replies, for the report.
fn pair_samples(
    model: &RewardModel,
    tokenizer: &tinygpt::Tokenizer,
    val: &PreferenceDataset,
    n: usize,
) -> Vec<String> {
    let pad = tokenizer.eot_id();
    (0..val.len().min(n))
        .map(|i| {
            let sample = || -> Result<String> {
                let (_, chosen, rejected) = model.pair_loss(val, &[i], pad, None)?;
                let score = |t: &tinygpt::candle::Tensor| -> Result<f32> {
                    Ok(t.to_vec1::<f32>()?.first().copied().unwrap_or(f32::NAN))
                };
                let ex = &val.examples()[i];
                Ok(format!(
                    "prompt: {}\nchosen, reward {:.3}: {}\nrejected, reward {:.3}: {}",
                    tokenizer.decode(&ex.prompt)?.trim(),
                    score(&chosen)?,
                    reply_text(tokenizer, &ex.chosen)?.trim(),
                    score(&rejected)?,
                    reply_text(tokenizer, &ex.rejected)?.trim(),
                ))
            };
            sample().unwrap_or_else(|e| format!("(no sample: {e:#})"))
        })
        .collect()
}

fn main() -> Result<()> {
    common::init();
    let stop = common::Stop::install()?;
    let args = Args::parse();
    let resume = args
        .resume
        .as_deref()
        .map(|dir| common::resume(dir, RewardTraining::STAGE))
        .transpose()?;
    let resumed = resume.as_ref().map(|r| r.run.as_path());
    let out = common::stage_out_dir(
        args.out.as_deref(),
        resumed,
        RewardTraining::STAGE,
        &[("--sft", args.sft.as_deref())],
        args.train.overwrite,
    )?;
    let args = Args {
        data: common::data::resolve_all("--data", &args.data)?,
        val_data: common::data::resolve_opt("--val-data", args.val_data.as_deref())?,
        ..args
    };
    let device = common::device(&args.device)?;
    let started = Instant::now();

    // 1. The model and the settings: fresh from --sft, or from the run to resume.
    let (model, tokenizer, cfg, data, val_data, sft) = match &resume {
        Some(resume) => {
            let state = resume.state.clone();
            let (model, tokenizer) = RewardModel::load_trainable(&resume.dir, &device)?;
            let data = if args.data.is_empty() {
                common::rlhf::paths_from_json(state.extra.get("data"))
            } else {
                args.data.clone()
            };
            let val = common::held_out(
                args.val_data.as_deref(),
                args.val_fraction,
                Some(&state.extra),
                0.05,
            )?;
            let sft = state.extra["sft"].as_str().unwrap_or_default().to_string();
            (
                model,
                tokenizer,
                args.train.apply(state.train_config),
                data,
                val,
                sft,
            )
        }
        None => {
            let sft = args.sft.clone().unwrap_or_default();
            let (model, tokenizer) = RewardModel::from_sft(&sft, &device)?;
            let cfg = args.train.apply(reward_defaults());
            let sft = sft.display().to_string();
            (
                model,
                tokenizer,
                cfg,
                args.data.clone(),
                common::held_out(args.val_data.as_deref(), args.val_fraction, None, 0.05)?,
                sft,
            )
        }
    };
    if data.is_empty() {
        bail!("no --data given");
    }
    let template = ChatTemplate::new(&tokenizer)?;
    let block_size = model.backbone().config().block_size;
    let (max_response, skip_bad) = common::rlhf::data_settings(
        args.max_response_tokens,
        args.skip_bad_lines,
        resume.as_ref().map(|r| &r.state.extra),
        block_size,
    );
    let (train, val) = common::rlhf::datasets(
        &data,
        &val_data,
        skip_bad,
        &tokenizer,
        &template,
        block_size,
        max_response,
    )?;

    // 2. Train.
    let mut objective = RewardTraining::new(model, tokenizer, train, val, cfg.batch_size)?;
    let extra = serde_json::json!({
        "sft": sft,
        "data": common::rlhf::paths_json(&data),
        "val_data": val_data.to_extra().0,
        "val_fraction": val_data.to_extra().1,
        "max_response_tokens": max_response,
        "skip_bad_lines": skip_bad,
    });
    common::announce(&cfg)?;
    let mut trainer = Trainer::new(cfg.clone(), objective.parameters()?)?
        .with_out_dir(&out)
        .with_extra(extra)
        .with_stop_flag(stop.flag());
    if let Some(resume) = &resume {
        trainer = common::resume_trainer(trainer, resume, &cfg, "--max-iters")?;
    }
    let first_step = trainer.step();
    let progress = common::Progress::new(cfg.max_iters, first_step);
    let again = common::device_flag(&args.device);
    let summary = common::train(
        &mut trainer,
        &mut objective,
        &stop,
        &progress,
        |_| {},
        &common::continue_with("reward", &out, &again),
    )?;
    let holds = common::holds_run_checkpoint(&out, progress.saved(), resumed);
    let note = common::checkpoint_note(&out, holds, &trainer);

    // 3. The best checkpoint (or, if none was written, the model as trained) on the whole
    // held-out set.
    let pad = objective.tokenizer().eot_id();
    let best = if holds && out.join(RewardModel::HEAD_FILE).is_file() {
        RewardModel::load(&out, &device)?.0
    } else {
        objective.model().clone()
    };
    let m = best.pair_metrics(objective.val(), pad, cfg.batch_size, usize::MAX)?;

    // 4. The report card: OUT/report.md and the plots beside metrics.jsonl.
    if !args.report.no_report {
        let mut card = common::report::card(
            "Reward model",
            &out,
            best.backbone().config(),
            &cfg,
            &summary,
            first_step,
            started,
        );
        card.facts.push(("SFT model".into(), sft.clone()));
        if let Some(m) = &m {
            card.facts.push((
                "held-out pairs (best checkpoint)".into(),
                format!(
                    "accuracy {:.1}% over {} pairs, mean margin {:.3}, loss {:.4}",
                    100.0 * m.accuracy,
                    m.pairs,
                    m.margin,
                    m.loss
                ),
            ));
        }
        card.samples = pair_samples(
            &best,
            objective.tokenizer(),
            objective.val(),
            args.report.report_samples,
        );
        common::report::write_stage(&args.report, &out, &trainer, RewardTraining::STAGE, card);
    }
    match m {
        Some(m) => println!(
            "reward: held-out accuracy {:.1}% over {} pairs, mean margin {:.3}, loss {:.4} | {} steps in {:.1} s | {note}",
            100.0 * m.accuracy,
            m.pairs,
            m.margin,
            m.loss,
            summary.steps,
            started.elapsed().as_secs_f64(),
        ),
        None => println!(
            "reward: no held-out pairs | {} steps in {:.1} s | {note}",
            summary.steps,
            started.elapsed().as_secs_f64(),
        ),
    }
    Ok(())
}
