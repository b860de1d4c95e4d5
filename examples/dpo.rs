//! Direct Preference Optimization of an SFT model on preference pairs (Rafailov et al. 2023).
//!
//! ```text
//! cargo run --release --example dpo -- --sft out/rule/sft --data out/rule/pref_train.jsonl \
//!     --val-data out/rule/pref_val.jsonl --out out/dpo
//! cargo run --release --example dpo -- --resume out/dpo --max-iters 400
//! ```

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tinygpt::rlhf::Dpo;
use tinygpt::{checkpoint, ChatTemplate, Objective, TrainConfig, Trainer};

/// Fine-tune an SFT checkpoint with DPO on preference JSONL
/// (`{"prompt", "history", "chosen", "rejected"}`); the SFT model is the frozen reference.
#[derive(Debug, Parser)]
#[command(version, args_override_self = true)]
struct Args {
    /// The SFT checkpoint: the policy's start and the frozen reference (or a chat model
    /// exported to Hugging Face format).
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
    /// (OUT/checkpoint-STEP) [default: the --resume directory, else out/dpo].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run saved in this directory (an earlier --out) from its newest state, the
    /// best checkpoint or a later OUT/checkpoint-STEP (or from the OUT/checkpoint-STEP named);
    /// training flags given override the saved settings.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// DPO's β: how far the policy may move from the reference (the paper: 0.1).
    #[arg(long)]
    beta: Option<f64>,
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

/// DPO defaults: a small learning rate (the paper: 1e-6 for billions of parameters; a tiny
/// model takes more), no weight decay.
fn dpo_defaults() -> TrainConfig {
    TrainConfig {
        max_iters: 200,
        eval_interval: 50,
        eval_iters: 10,
        batch_size: 8,
        lr: 1e-4,
        min_lr: 1e-5,
        warmup_iters: 10,
        lr_decay_iters: 200,
        weight_decay: 0.0,
        ..TrainConfig::default()
    }
}

fn main() -> Result<()> {
    common::init();
    let stop = common::Stop::install()?;
    let args = Args::parse();
    let resume = args
        .resume
        .as_deref()
        .map(|dir| common::resume(dir, Dpo::STAGE))
        .transpose()?;
    let resumed = resume.as_ref().map(|r| r.run.as_path());
    let out = common::stage_out_dir(
        args.out.as_deref(),
        resumed,
        Dpo::STAGE,
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

    // 1. Policy, reference and settings: fresh from --sft, or from the run to resume.
    let (policy_dir, sft, cfg, data, val_data, beta) = match &resume {
        Some(resume) => {
            let (dir, state) = (&resume.run, resume.state.clone());
            let sft = match (&args.sft, state.extra["sft"].as_str()) {
                (Some(s), _) => s.clone(),
                (None, Some(s)) => PathBuf::from(s),
                (None, None) => bail!("{}: no SFT path recorded; pass --sft", dir.display()),
            };
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
            let beta = args.beta.or(state.extra["beta"].as_f64()).unwrap_or(0.1);
            (
                resume.dir.clone(),
                sft,
                args.train.apply(state.train_config),
                data,
                val,
                beta,
            )
        }
        None => {
            let sft = args.sft.clone().unwrap_or_default();
            let cfg = args.train.apply(dpo_defaults());
            let beta = args.beta.unwrap_or(0.1);
            (
                sft.clone(),
                sft,
                cfg,
                args.data.clone(),
                common::held_out(args.val_data.as_deref(), args.val_fraction, None, 0.05)?,
                beta,
            )
        }
    };
    if data.is_empty() {
        bail!("no --data given");
    }
    let (policy, tokenizer) = checkpoint::load_trainable(&policy_dir, &device)?;
    let (reference, _) = checkpoint::load_model(&sft, &device)
        .with_context(|| format!("loading the reference {}", sft.display()))?;
    let template = ChatTemplate::new(&tokenizer)?;
    let block_size = policy.config().block_size;
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
    let mut objective = Dpo::new(
        policy,
        reference,
        tokenizer,
        train,
        val,
        cfg.batch_size,
        beta,
    )?;
    let extra = serde_json::json!({
        "sft": sft.display().to_string(),
        "data": common::rlhf::paths_json(&data),
        "val_data": val_data.to_extra().0,
        "val_fraction": val_data.to_extra().1,
        "max_response_tokens": max_response,
        "skip_bad_lines": skip_bad,
        "beta": beta,
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
        &common::continue_with("dpo", &out, &again),
    )?;
    let holds = common::holds_run_checkpoint(&out, progress.saved(), resumed);

    // 3. Summary from the last evaluation.
    let get = |k: &str| {
        summary
            .last_metrics
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| format!("{v:.4}"))
            .unwrap_or_else(|| "n/a".into())
    };

    // 4. The report card: OUT/report.md and the plots beside metrics.jsonl; the samples are
    // the best checkpoint's replies to held-out prompts.
    if !args.report.no_report {
        let mut card = common::report::card(
            "DPO",
            &out,
            objective.policy().config(),
            &cfg,
            &summary,
            first_step,
            started,
        );
        card.facts.push((
            "last evaluation".into(),
            format!(
                "β {beta}, held-out loss {}, implicit-reward accuracy {}, margin {}",
                get("val_loss"),
                get("reward_accuracy"),
                get("reward_margin")
            ),
        ));
        card.facts
            .push(("SFT model (reference)".into(), sft.display().to_string()));
        let n = args.report.report_samples;
        if n > 0 && holds {
            let (model, tokenizer) = checkpoint::load_model(&out, &device)?;
            let prompts: Vec<Vec<u32>> = objective
                .val()
                .examples()
                .iter()
                .take(n)
                .map(|ex| ex.prompt.clone())
                .collect();
            let params = common::report::sample_params(max_response, cfg.seed);
            card.samples = common::report::prompt_samples(&model, &tokenizer, &prompts, &params, n);
        }
        common::report::write_stage(&args.report, &out, &trainer, Dpo::STAGE, card);
    }
    println!(
        "dpo: β {beta} | held-out loss {} (best {}) | implicit-reward accuracy {} margin {} | {} steps in {:.1} s | {}",
        get("val_loss"),
        summary.best_val_loss.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into()),
        get("reward_accuracy"),
        get("reward_margin"),
        summary.steps,
        started.elapsed().as_secs_f64(),
        common::checkpoint_note(&out, holds, &trainer)
    );
    Ok(())
}
