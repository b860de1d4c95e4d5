//! PPO against a reward model with a KL penalty to the SFT model (InstructGPT's RL stage).
//!
//! ```text
//! cargo run --release --example ppo -- --sft out/rule/sft --reward out/rule/reward \
//!     --data out/rule/prompts_train.jsonl --out out/ppo --iterations 30
//! cargo run --release --example ppo -- --resume out/ppo --iterations 40
//! ```
//!
//! Ctrl-C (or SIGTERM) stops at the end of the iteration in progress (a rollout is not saved)
//! and saves the state in `OUT/checkpoint-STEP`; `--resume OUT` continues from it.

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use tinygpt::rlhf::{load_prompts, Ppo, PpoConfig};
use tinygpt::{Objective, TrainConfig, Trainer};

/// Fine-tune an SFT checkpoint with PPO: replies to --data's prompts are scored by the reward
/// model, minus a KL penalty to the SFT model. One iteration = one rollout and
/// ppo_epochs × minibatches optimiser steps; metrics.jsonl gets an evaluation row (`"kind":
/// "eval"`) per --log-every iterations, besides a `"kind": "train"` row every --log-interval
/// optimiser steps.
#[derive(Debug, Parser)]
#[command(version, args_override_self = true)]
struct Args {
    /// The SFT checkpoint: the policy's start and the frozen reference.
    #[arg(long, required_unless_present = "resume")]
    sft: Option<PathBuf>,
    /// The reward-model checkpoint (from the `reward` example).
    #[arg(long, required_unless_present = "resume")]
    reward: Option<PathBuf>,
    /// Prompts: preference JSONL (history + prompt) or SFT JSONL (messages before the reply).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Checkpoint directory, written every --log-every iterations, and the latest states
    /// (OUT/checkpoint-STEP) [default: the --resume directory, else out/ppo].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run saved in this directory (an earlier --out) from its newest state, the
    /// checkpoint or a later OUT/checkpoint-STEP (or from the OUT/checkpoint-STEP named);
    /// --sft, --reward, --data and the PPO settings default to the run's, training flags given
    /// override the saved settings.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// PPO iterations in total (rollout + optimisation) [default: 30, or the resumed run's].
    #[arg(long)]
    iterations: Option<usize>,
    /// Evaluate, log and checkpoint every N iterations [default: 1, or the resumed run's].
    #[arg(long)]
    log_every: Option<usize>,
    /// Replies per rollout.
    #[arg(long)]
    rollout_size: Option<usize>,
    /// Replies per minibatch.
    #[arg(long)]
    minibatch_size: Option<usize>,
    /// Passes over each rollout.
    #[arg(long)]
    ppo_epochs: Option<usize>,
    /// The longest reply, in tokens.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// The KL coefficient (its start value with --target-kl).
    #[arg(long)]
    kl_coef: Option<f64>,
    /// Target KL per reply for the adaptive controller (nats); 0 keeps --kl-coef fixed
    /// [default: 6].
    #[arg(long)]
    target_kl: Option<f64>,
    /// Horizon of the adaptive KL controller, in replies.
    #[arg(long)]
    kl_horizon: Option<f64>,
    /// Discount γ of future rewards in the advantages, in [0, 1] [default: 1].
    #[arg(long)]
    gamma: Option<f64>,
    /// GAE λ: how far the advantages look ahead before trusting the value head, in [0, 1]
    /// [default: 0.95].
    #[arg(long)]
    lam: Option<f64>,
    /// Clip range ε of the policy's probability ratio (PPO's clipped objective) [default: 0.2].
    #[arg(long)]
    clip_range: Option<f64>,
    /// Weight of the value head's loss in the total loss [default: 0.1].
    #[arg(long)]
    vf_coef: Option<f64>,
    #[command(flatten)]
    train: common::TrainArgs,
    #[command(flatten)]
    report: common::report::ReportArgs,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// PPO's optimiser defaults: constant small learning rate (TRL: 1.41e-5 for GPT-2; a tiny
/// model takes more), no weight decay.
fn ppo_defaults() -> TrainConfig {
    TrainConfig {
        lr: 1e-4,
        min_lr: 1e-4,
        decay_lr: false,
        warmup_iters: 0,
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
        .map(|dir| common::resume(dir, Ppo::STAGE))
        .transpose()?;
    let resumed = resume.as_ref().map(|r| r.run.as_path());
    let out = common::stage_out_dir(
        args.out.as_deref(),
        resumed,
        Ppo::STAGE,
        &[
            ("--sft", args.sft.as_deref()),
            ("--reward", args.reward.as_deref()),
        ],
        args.train.overwrite,
    )?;
    let args = Args {
        data: common::data::resolve_opt("--data", args.data.as_deref())?,
        ..args
    };
    let device = common::device(&args.device)?;
    let started = Instant::now();

    // 1. Settings: fresh, or those of the run to resume with the flags given on top.
    let state = resume.as_ref().map(|r| &r.state);
    let recorded = |k: &str| {
        state
            .as_ref()
            .and_then(|s| s.extra[k].as_str().map(PathBuf::from))
    };
    let sft = args.sft.clone().or_else(|| recorded("sft"));
    let reward = args.reward.clone().or_else(|| recorded("reward"));
    let data = args.data.clone().or_else(|| recorded("data"));
    let (Some(sft), Some(reward), Some(data)) = (sft, reward, data) else {
        bail!("--sft, --reward and --data are needed (or a run to --resume that records them)");
    };
    let mut ppo_cfg: PpoConfig = state
        .as_ref()
        .and_then(|s| serde_json::from_value(s.extra["ppo"].clone()).ok())
        .unwrap_or_default();
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = args.$f { ppo_cfg.$f = v; } )* };
    }
    set!(
        rollout_size,
        minibatch_size,
        ppo_epochs,
        max_new_tokens,
        kl_coef,
        kl_horizon,
        gamma,
        lam,
        clip_range,
        vf_coef
    );
    if let Some(t) = args.target_kl {
        ppo_cfg.target_kl = (t > 0.0).then_some(t);
    }
    let steps = ppo_cfg.steps_per_iteration();
    let base = state
        .as_ref()
        .map(|s| s.train_config.clone())
        .unwrap_or_else(ppo_defaults);
    // Iterations and --log-every as the run had them (in optimiser steps of its PPO
    // settings), unless given.
    let saved_steps = state
        .and_then(|s| serde_json::from_value::<PpoConfig>(s.extra["ppo"].clone()).ok())
        .map(|c| c.steps_per_iteration().max(1));
    let (iterations, log_every) = match (state, saved_steps) {
        (Some(s), Some(n)) => (
            args.iterations.unwrap_or(s.train_config.max_iters / n),
            args.log_every
                .unwrap_or((s.train_config.eval_interval / n).max(1)),
        ),
        _ => (args.iterations.unwrap_or(30), args.log_every.unwrap_or(1)),
    };
    let mut cfg = args.train.apply(base.clone());
    if args.train.max_iters.is_none() {
        cfg.max_iters = iterations * steps;
    }
    cfg.eval_interval = log_every.max(1) * steps;
    cfg.batch_size = ppo_cfg.minibatch_size;
    // The end of the decay follows the run's length, as in the other stages; a resumed run
    // keeps the saved one unless its length changes and its learning rate decays (PPO's is
    // constant unless the saved settings say otherwise).
    let longer = cfg.decay_lr && cfg.max_iters != base.max_iters;
    if args.train.lr_decay_iters.is_none() && (state.is_none() || longer) {
        cfg.lr_decay_iters = cfg.max_iters;
    }

    // 2. Policy, value head, reference and reward model.
    let prompts = load_prompts(&data)?;
    let mut objective = Ppo::load(
        &sft,
        &reward,
        resume.as_ref().map(|r| r.dir.as_path()),
        &prompts,
        ppo_cfg.clone(),
        &device,
    )?;
    let kl_control = match ppo_cfg.target_kl {
        Some(t) => format!("adaptive, target {t} nats per reply"),
        None => "fixed".into(),
    };
    println!(
        "ppo: {} prompts from {} | {} of {} replies, {} epochs × {} minibatches = {} steps each | kl_coef {:.4} ({kl_control})",
        prompts.len(),
        data.display(),
        common::plural(cfg.max_iters / steps, "iteration"),
        ppo_cfg.rollout_size,
        ppo_cfg.ppo_epochs,
        ppo_cfg.minibatches(),
        steps,
        objective.state().kl_coef,
    );

    // 3. Train.
    let extra = serde_json::json!({
        "sft": sft.display().to_string(),
        "reward": reward.display().to_string(),
        "data": data.display().to_string(),
        "ppo": ppo_cfg,
    });
    common::announce(&cfg)?;
    let mut trainer = Trainer::new(cfg.clone(), objective.parameters()?)?
        .with_out_dir(&out)
        .with_extra(extra)
        .with_stop_flag(stop.flag());
    if let Some(resume) = &resume {
        trainer = common::resume_trainer(trainer, resume, &cfg, "--iterations")?;
    }
    let first_step = trainer.step();
    let progress = common::Progress::new(cfg.max_iters, first_step);
    let done_before = trainer.step() / steps.max(1);
    // (iteration, mean reward) of the first rollout this run logged.
    let mut first: Option<(f64, f64)> = None;
    let summary = common::train(
        &mut trainer,
        &mut objective,
        &stop,
        &progress,
        |e| {
            if let tinygpt::TrainEvent::Eval { metrics, .. } = e {
                let get = |key: &str| metrics.iter().find(|(k, _)| k == key).map(|(_, v)| *v);
                if let (Some(i), Some(r)) = (get("iteration"), get("reward_mean")) {
                    first = first.or(Some((i, r)));
                }
            }
        },
        &common::continue_with("ppo", &out, &common::device_flag(&args.device)),
    )?;
    let holds = common::holds_run_checkpoint(&out, progress.saved(), resumed);

    let iterations = objective.state().iteration;
    // PPO has no validation loss: it checkpoints after every --log-every iterations.
    let note = common::checkpoint_note_because(
        &out,
        holds,
        "no PPO iteration ran (--iterations must exceed the iterations already done)",
        &trainer,
    );

    // The report card: OUT/report.md, the loss, reward and KL plots beside metrics.jsonl, and
    // the policy's replies to the first prompts.
    if !args.report.no_report {
        let mut card = common::report::card(
            "PPO",
            &out,
            objective.policy().config(),
            &cfg,
            &summary,
            first_step,
            started,
        );
        card.facts.push((
            "PPO settings".into(),
            format!(
                "{} iterations of {} replies, {} epochs × {} minibatches of {}; kl_coef {:.4} ({kl_control})",
                iterations,
                ppo_cfg.rollout_size,
                ppo_cfg.ppo_epochs,
                ppo_cfg.minibatches(),
                ppo_cfg.minibatch_size,
                objective.state().kl_coef
            ),
        ));
        if let Some(last) = objective.last_iteration() {
            card.facts.push((
                "last rollout".into(),
                format!(
                    "iteration {}: mean reward {}, KL to the SFT model {} nats per reply, mean reply length {:.1} tokens",
                    last.iteration + 1,
                    common::fixed(last.reward_mean, 3),
                    common::fixed(last.kl, 3),
                    last.response_length
                ),
            ));
        }
        card.facts.push((
            "models".into(),
            format!("SFT {}, reward {}", sft.display(), reward.display()),
        ));
        card.facts.push((
            "FLOPs note".into(),
            "the optimiser steps only: sampling the rollouts and the reference and reward \
             models' passes are not counted"
                .into(),
        ));
        let n = args.report.report_samples;
        if n > 0 {
            let params = common::report::sample_params(ppo_cfg.max_new_tokens, cfg.seed);
            card.samples = common::report::chat_samples(
                objective.policy(),
                objective.tokenizer(),
                &prompts,
                &params,
                n,
            );
        }
        common::report::write_stage(&args.report, &out, &trainer, Ppo::STAGE, card);
    }
    let Some(last) = objective.last_iteration().copied() else {
        println!(
            "ppo: no iteration ran ({iterations} done in all) in {:.1} s | {note}",
            started.elapsed().as_secs_f64()
        );
        return Ok(());
    };
    // Each rollout is sampled before its iteration's update: the figures are those of the
    // policy at the start of the first and the last logged iteration, not after the last update.
    // Iterations are counted from 1 here (the metrics' `iteration` from 0).
    let rewards = match first {
        Some((i, r)) if i as usize != last.iteration => format!(
            "mean reward of the rollouts (sampled before each update): iteration {} {} → \
             iteration {} {}",
            i as usize + 1,
            common::fixed(r, 3),
            last.iteration + 1,
            common::fixed(last.reward_mean, 3)
        ),
        _ => format!(
            "mean reward of the rollout of iteration {} (sampled before its update): {}",
            last.iteration + 1,
            common::fixed(last.reward_mean, 3)
        ),
    };
    let ran = iterations.saturating_sub(done_before);
    let count = if done_before > 0 {
        format!(
            "{} this run ({iterations} in all)",
            common::plural(ran, "iteration")
        )
    } else {
        common::plural(iterations, "iteration")
    };
    println!(
        "ppo: {rewards} | that rollout's KL to the SFT model {} nats per reply (kl_coef {:.4}), mean reply length {:.1} tokens | {count} in {:.1} s | {note}",
        common::fixed(last.kl, 3),
        last.kl_coef,
        last.response_length,
        started.elapsed().as_secs_f64(),
    );
    let _ = summary;
    Ok(())
}
