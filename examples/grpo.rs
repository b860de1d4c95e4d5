//! GRPO on answers a program can check: watch a tiny model get better at sums, or run the
//! same code on GSM8K.
//!
//! ```text
//! cargo run --release --example grpo                       # two-digit sums, a few minutes
//! cargo run --release --example grpo -- --task gsm8k       # grade-school maths, end to end
//! ```
//!
//! 1. **SFT** (skipped with `--sft DIR`): a tiny GPT learns the task's chat format from scratch
//!    on worked answers that end with `#### <number>`, briefly, so that it is right only some
//!    of the time. The task `sums` asks `What is 47+38?` and is answered `47+38=85 #### 85`;
//!    `gsm8k` uses `sft_gsm8k_train.jsonl` (a byte-level BPE tokenizer trained on it).
//! 2. **GRPO** from the SFT model: `--num-generations` completions per prompt, rewarded 1 when
//!    the number after `####` (else the last number, [`tinygpt::eval::parse_gsm8k_answer`])
//!    equals the known answer and 0 otherwise.
//! 3. **Held-out accuracy** of the SFT model and the GRPO model on `--eval-n` problems no
//!    training prompt contains (greedy decoding, the same problems for both).
//!
//! `metrics.jsonl` of the GRPO run (in `--out/grpo`) has one `"kind": "eval"` row per
//! iteration: reward, accuracy, KL to the SFT model, clip fraction, length, zero-variance
//! groups. The last line is a summary; `results.json` in `--out` holds the figures.

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::{Parser, ValueEnum};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tinygpt::chat::Message;
use tinygpt::eval::parse_gsm8k_answer;
use tinygpt::rlhf::grpo::{GrpoPrompt, RewardFn, Truncated};
use tinygpt::sft::{load_sft_file, Sft, SftDataset};
use tinygpt::{
    checkpoint, ChatSession, ChatTemplate, Gpt, GptConfig, Grpo, GrpoConfig, Objective,
    SamplingParams, Tokenizer, TrainConfig, Trainer,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Task {
    /// Sums of two numbers below --max-operand.
    Sums,
    /// Grade-school maths word problems (GSM8K).
    Gsm8k,
}

/// SFT, then GRPO on a reward a program computes, then held-out accuracy of both.
#[derive(Debug, Parser)]
#[command(version, args_override_self = true)]
struct Args {
    /// The task.
    #[arg(long, value_enum, default_value = "sums")]
    task: Task,
    /// Start GRPO from this SFT checkpoint instead of training one.
    #[arg(long)]
    sft: Option<PathBuf>,
    /// GSM8K training problems (task gsm8k).
    #[arg(long, default_value = "data/sft_gsm8k_train.jsonl")]
    gsm8k_train: PathBuf,
    /// GSM8K held-out problems (task gsm8k).
    #[arg(long, default_value = "data/sft_gsm8k_test.jsonl")]
    gsm8k_test: PathBuf,
    /// Operands are drawn from 0..max_operand (task sums).
    #[arg(long, default_value_t = 100)]
    max_operand: u32,
    /// Worked examples the SFT model learns from (task sums).
    #[arg(long, default_value_t = 4000)]
    sft_examples: usize,
    /// The share of worked sums whose teacher forgets the carry out of the units (`47+38=75
    /// #### 75`), task sums: the SFT model then often answers wrong although the right answer
    /// is among its samples, which GRPO's checker rewards. The prompts GRPO trains on and
    /// every held-out problem keep the true sum.
    #[arg(long, default_value_t = 0.7)]
    forget_carry: f64,
    /// SFT steps (when no --sft is given; default 1500 for sums, 400 for gsm8k).
    #[arg(long)]
    sft_iters: Option<usize>,
    /// GRPO iterations.
    #[arg(long, default_value_t = 60)]
    iterations: usize,
    /// Prompts per GRPO iteration.
    #[arg(long, default_value_t = 16)]
    prompts_per_iteration: usize,
    /// Completions per prompt (the group size G).
    #[arg(long, default_value_t = 16)]
    num_generations: usize,
    /// Completions per minibatch.
    #[arg(long, default_value_t = 64)]
    minibatch_size: usize,
    /// Passes over each rollout.
    #[arg(long, default_value_t = 1)]
    grpo_epochs: usize,
    /// The longest completion, in tokens.
    #[arg(long)]
    max_new_tokens: Option<usize>,
    /// GRPO learning rate (constant after the warm-up). RL gradients are noisy and Adam's
    /// first steps move every weight by about `lr`, so it is far below SFT's.
    #[arg(long, default_value_t = 5e-5)]
    lr: f64,
    /// Optimiser steps of linear learning-rate warm-up.
    #[arg(long, default_value_t = 20)]
    warmup_iters: usize,
    /// KL coefficient β (0: no penalty, the reference only measures the drift).
    #[arg(long, default_value_t = 0.0)]
    kl_coef: f64,
    /// Completions cut at the length limit: keep, mask, or a penalty added to the reward.
    #[arg(long, default_value = "keep")]
    truncated: String,
    /// Held-out problems scored before and after GRPO.
    #[arg(long, default_value_t = 200)]
    eval_n: usize,
    /// Transformer blocks of a model trained here.
    #[arg(long, default_value_t = 2)]
    n_layer: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 4)]
    n_head: usize,
    /// Embedding width.
    #[arg(long, default_value_t = 128)]
    n_embd: usize,
    /// Where the checkpoints go (`DIR/sft`, `DIR/grpo`) and `results.json`.
    #[arg(long, default_value = "out/grpo")]
    out: PathBuf,
    /// Replace checkpoints already in --out.
    #[arg(long)]
    overwrite: bool,
    /// Seed of every random choice (problems, initialisation, batches, sampling).
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    #[command(flatten)]
    report: common::report::ReportArgs,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

const AFTER_INTERRUPT: &str = "grpo does not continue a stage: run the same command with \
    --overwrite added to start over";

/// A problem: the conversation to answer and the number that is right.
struct Problem {
    prompt: GrpoPrompt,
    /// A worked answer ending with `#### <answer>`, for SFT.
    solution: String,
}

/// `a + b`, with a worked solution that forgets the carry out of the units (`47+38=75`) when
/// `sloppy` and there is one.
fn sum_problem(a: u32, b: u32, sloppy: bool) -> Problem {
    let c = a + b;
    let written = if sloppy && a % 10 + b % 10 >= 10 {
        c - 10
    } else {
        c
    };
    Problem {
        prompt: GrpoPrompt {
            messages: vec![Message::user(format!("What is {a}+{b}?"))],
            answer: c.to_string(),
        },
        solution: format!("{a}+{b}={written} #### {written}"),
    }
}

/// The sums task: held-out problems first (distinct), then training problems that are none of
/// them.
fn sums(args: &Args, rng: &mut ChaCha8Rng) -> (Vec<Problem>, Vec<Problem>) {
    let m = args.max_operand.max(2);
    let mut seen = HashSet::new();
    let mut held_out = Vec::new();
    while held_out.len() < args.eval_n && seen.len() < (m * m / 2) as usize {
        let (a, b) = (rng.random_range(0..m), rng.random_range(0..m));
        if seen.insert((a, b)) {
            held_out.push(sum_problem(a, b, false));
        }
    }
    let mut train = Vec::new();
    while train.len() < args.sft_examples.max(args.prompts_per_iteration) {
        let (a, b) = (rng.random_range(0..m), rng.random_range(0..m));
        if !seen.contains(&(a, b)) {
            let sloppy = rng.random_bool(args.forget_carry.clamp(0.0, 1.0));
            train.push(sum_problem(a, b, sloppy));
        }
    }
    (train, held_out)
}

/// GSM8K: every problem of a file, with the number after `####` of its solution.
fn gsm8k(path: &Path) -> Result<Vec<Problem>> {
    let data = load_sft_file(path, false)?;
    let mut out = Vec::new();
    for conv in data.conversations {
        let Some(last) = conv
            .iter()
            .rposition(|m| m.role == tinygpt::Role::Assistant)
        else {
            continue;
        };
        let Some(answer) = parse_gsm8k_answer(&conv[last].content) else {
            bail!(
                "{}: a solution without a final number: {:?}",
                path.display(),
                conv[last].content
            );
        };
        out.push(Problem {
            solution: conv[last].content.clone(),
            prompt: GrpoPrompt {
                messages: conv[..last].to_vec(),
                answer,
            },
        });
    }
    Ok(out)
}

/// 1 when the completion's final number is the answer, else 0.
fn exact_match() -> RewardFn {
    Arc::new(|p: &GrpoPrompt, completion: &str| {
        f64::from(u8::from(
            parse_gsm8k_answer(completion).as_deref() == Some(&p.answer),
        ))
    })
}

/// Greedy held-out accuracy and a few (question, reply) samples.
fn accuracy(
    model: &Gpt,
    tokenizer: &Tokenizer,
    problems: &[Problem],
    max_new_tokens: usize,
) -> Result<(f64, Vec<(String, String)>)> {
    let params = SamplingParams::greedy().with_max_new_tokens(max_new_tokens);
    let mut right = 0usize;
    let mut samples = Vec::new();
    for p in problems {
        let mut session = ChatSession::new(model, tokenizer, params.clone())?;
        let question = &p.prompt.messages[p.prompt.messages.len() - 1].content;
        let reply = session.send(question, |_| {})?;
        let ok = parse_gsm8k_answer(&reply).as_deref() == Some(p.prompt.answer.as_str());
        right += usize::from(ok);
        if samples.len() < 4 {
            samples.push((question.clone(), reply));
        }
    }
    Ok((right as f64 / problems.len().max(1) as f64, samples))
}

fn truncated(flag: &str) -> Result<Truncated> {
    Ok(match flag {
        "keep" => Truncated::Keep,
        "mask" => Truncated::Mask,
        other => match other.parse::<f64>() {
            Ok(p) if p.is_finite() => Truncated::Penalty(p),
            _ => bail!("--truncated must be keep, mask or a number (the penalty), got {other:?}"),
        },
    })
}

fn main() -> Result<()> {
    common::init();
    let stop = common::Stop::install()?;
    let args = Args::parse();
    let device = common::device(&args.device)?;
    let started = Instant::now();
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let truncated = truncated(&args.truncated)?;
    if args.eval_n == 0 {
        bail!("--eval-n must be at least 1");
    }

    // The problems, read or made before any training.
    let (train, mut held_out) = match args.task {
        Task::Sums => sums(&args, &mut rng),
        Task::Gsm8k => {
            let train = gsm8k(&common::data::resolve("--gsm8k-train", &args.gsm8k_train)?)?;
            let mut test = gsm8k(&common::data::resolve("--gsm8k-test", &args.gsm8k_test)?)?;
            rand::seq::SliceRandom::shuffle(test.as_mut_slice(), &mut rng);
            (train, test)
        }
    };
    held_out.truncate(args.eval_n);
    let max_new_tokens = args.max_new_tokens.unwrap_or(match args.task {
        Task::Sums => 24,
        Task::Gsm8k => 96,
    });
    for stage in ["sft", "grpo"] {
        common::fresh_out_dir(&args.out.join(stage), None, None, args.overwrite)?;
    }

    // 1. SFT, or the checkpoint given.
    let sft_dir = match &args.sft {
        Some(dir) => dir.clone(),
        None => {
            let conversations: Vec<Vec<Message>> = train
                .iter()
                .map(|p| {
                    let mut c = p.prompt.messages.clone();
                    c.push(Message::assistant(p.solution.clone()));
                    c
                })
                .collect();
            let text: String = conversations
                .iter()
                .flatten()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            let mut tokenizer = match args.task {
                Task::Sums => Tokenizer::train_char(&text)?,
                Task::Gsm8k => Tokenizer::train_bpe(&text, 1024)?,
            };
            let template = ChatTemplate::add_tokens(&mut tokenizer)?;
            let block_size = match args.task {
                Task::Sums => 48,
                Task::Gsm8k => 256,
            };
            let cfg = GptConfig {
                vocab_size: tokenizer.vocab_size(),
                block_size,
                n_layer: args.n_layer,
                n_head: args.n_head,
                n_embd: args.n_embd,
                dropout: 0.0,
                bias: false,
                ..Default::default()
            };
            let model = Gpt::init(&cfg, args.seed, &device)?;
            let (all, fit) = SftDataset::new(&conversations, &tokenizer, &template, block_size)?;
            let (train_set, val_set) = all.split(0.05, args.seed);
            println!(
                "== 1. SFT from scratch: {} conversations ({} cut, {} dropped), a {:.2}M-parameter GPT ==",
                train_set.len(),
                fit.truncated,
                fit.dropped,
                cfg.num_parameters() as f64 / 1e6
            );
            let sft_iters = args.sft_iters.unwrap_or(match args.task {
                Task::Sums => 1500,
                Task::Gsm8k => 400,
            });
            let sft_cfg = TrainConfig {
                max_iters: sft_iters,
                lr_decay_iters: sft_iters,
                eval_interval: (sft_iters / 3).max(1),
                eval_iters: 4,
                batch_size: 32,
                lr: 1e-3,
                min_lr: 1e-4,
                warmup_iters: 20.min(sft_iters / 2),
                weight_decay: 0.0,
                seed: args.seed,
                ..TrainConfig::default()
            };
            let dir = args.out.join("sft");
            let sft_started = Instant::now();
            let mut sft = Sft::new(model, tokenizer, train_set, val_set, sft_cfg.batch_size)?;
            let progress = common::Progress::new(sft_cfg.max_iters, 0);
            let mut trainer = Trainer::new(sft_cfg.clone(), sft.parameters()?)?
                .with_out_dir(&dir)
                .with_stop_flag(stop.flag());
            let s = common::train(
                &mut trainer,
                &mut sft,
                &stop,
                &progress,
                |_| {},
                AFTER_INTERRUPT,
            )?;
            println!(
                "fine-tuned {} steps: held-out assistant loss {:.3} ({:.0} s)",
                s.steps,
                s.best_val_loss.unwrap_or(f64::NAN),
                s.elapsed_s
            );
            if !args.report.no_report {
                let mut card = common::report::card(
                    "SFT (worked answers)",
                    &dir,
                    &cfg,
                    &sft_cfg,
                    &s,
                    0,
                    sft_started,
                );
                card.facts.push((
                    "data".into(),
                    format!(
                        "{} worked answers ({:?}{})",
                        conversations.len(),
                        args.task,
                        if args.task == Task::Sums {
                            format!(
                                ", the carry forgotten in {:.0}% of them",
                                100.0 * args.forget_carry
                            )
                        } else {
                            String::new()
                        }
                    ),
                ));
                common::report::write_stage(&args.report, &dir, &trainer, Sft::STAGE, card);
            }
            dir
        }
    };
    let (sft_model, tokenizer) = checkpoint::load_model(&sft_dir, &device)?;
    let t = Instant::now();
    let (before, samples) = accuracy(&sft_model, &tokenizer, &held_out, max_new_tokens)?;
    println!(
        "SFT model: held-out accuracy {:.1}% on {} problems ({:.0} s)",
        100.0 * before,
        held_out.len(),
        t.elapsed().as_secs_f64()
    );
    for (q, r) in &samples {
        println!("  {q} -> {r:?}");
    }

    // 2. GRPO.
    let cfg = GrpoConfig {
        prompts_per_iteration: args.prompts_per_iteration,
        num_generations: args.num_generations,
        minibatch_size: args.minibatch_size,
        grpo_epochs: args.grpo_epochs,
        max_new_tokens,
        kl_coef: args.kl_coef,
        truncated,
        ..Default::default()
    };
    let steps = args.iterations * cfg.steps_per_iteration();
    let prompts: Vec<GrpoPrompt> = train.into_iter().map(|p| p.prompt).collect();
    let mut grpo = Grpo::load(&sft_dir, None, prompts, exact_match(), cfg.clone(), &device)?;
    println!(
        "== 2. GRPO: {} iterations of {} prompts x {} completions ({} steps) ==",
        args.iterations, cfg.prompts_per_iteration, cfg.num_generations, steps
    );
    let report_prompts: Vec<Vec<Message>> =
        held_out.iter().map(|p| p.prompt.messages.clone()).collect();
    let grpo_cfg = TrainConfig {
        max_iters: steps,
        lr_decay_iters: steps,
        eval_interval: cfg.steps_per_iteration(),
        eval_iters: 1,
        lr: args.lr,
        min_lr: args.lr,
        decay_lr: false,
        warmup_iters: args.warmup_iters,
        beta2: 0.999,
        weight_decay: 0.0,
        seed: args.seed,
        ..TrainConfig::default()
    };
    let grpo_dir = args.out.join("grpo");
    let grpo_started = Instant::now();
    let progress = common::Progress::new(grpo_cfg.max_iters, 0);
    let mut trainer = Trainer::new(grpo_cfg.clone(), grpo.parameters()?)?
        .with_out_dir(&grpo_dir)
        .with_stop_flag(stop.flag());
    let g = common::train(
        &mut trainer,
        &mut grpo,
        &stop,
        &progress,
        |_| {},
        AFTER_INTERRUPT,
    )?;
    if let Some(it) = grpo.last_iteration() {
        println!(
            "last iteration: reward {:.3}, sampled accuracy {:.1}%, KL {:.4}, zero-variance groups {:.0}%",
            it.reward_mean,
            100.0 * it.accuracy,
            it.kl,
            100.0 * it.zero_std_fraction
        );
    }
    let t = Instant::now();
    let (after, samples) = accuracy(grpo.policy(), &tokenizer, &held_out, max_new_tokens)?;
    println!(
        "GRPO model: held-out accuracy {:.1}% ({:.0} s)",
        100.0 * after,
        t.elapsed().as_secs_f64()
    );
    for (q, r) in &samples {
        println!("  {q} -> {r:?}");
    }
    if !args.report.no_report {
        let mut card = common::report::card(
            "GRPO",
            &grpo_dir,
            grpo.policy().config(),
            &grpo_cfg,
            &g,
            0,
            grpo_started,
        );
        card.facts.push((
            "held-out accuracy (greedy)".into(),
            format!(
                "{:.1}% → {:.1}% ({:+.1} points) on {} problems no training prompt contains",
                100.0 * before,
                100.0 * after,
                100.0 * (after - before),
                held_out.len()
            ),
        ));
        card.facts.push((
            "GRPO settings".into(),
            format!(
                "{} iterations of {} prompts × {} completions, {} minibatches of {}, {} epoch(s); lr {:e}, kl_coef {}, ε {}/{}, scale_rewards {}, truncated {:?}",
                args.iterations,
                cfg.prompts_per_iteration,
                cfg.num_generations,
                cfg.minibatches(),
                cfg.minibatch_size,
                cfg.grpo_epochs,
                args.lr,
                cfg.kl_coef,
                cfg.epsilon_low,
                cfg.epsilon_high,
                cfg.scale_rewards,
                cfg.truncated
            ),
        ));
        if let Some(it) = grpo.last_iteration() {
            card.facts.push((
                "last rollout".into(),
                format!(
                    "iteration {}: reward {}, sampled accuracy {:.1}%, KL {} nats per token, zero-variance groups {:.0}%",
                    it.iteration + 1,
                    common::fixed(it.reward_mean, 3),
                    100.0 * it.accuracy,
                    common::fixed(it.kl, 4),
                    100.0 * it.zero_std_fraction
                ),
            ));
        }
        card.facts
            .push(("SFT model".into(), format!("{}", sft_dir.display())));
        card.facts.push((
            "FLOPs note".into(),
            "the optimiser steps only: sampling the rollouts and the reference's passes are not counted"
                .into(),
        ));
        let n = args.report.report_samples;
        if n > 0 {
            let params = common::report::sample_params(max_new_tokens, args.seed);
            card.samples = common::report::chat_samples(
                grpo.policy(),
                &tokenizer,
                &report_prompts,
                &params,
                n,
            );
        }
        common::report::write_stage(&args.report, &grpo_dir, &trainer, Grpo::STAGE, card);
    }
    let results = serde_json::json!({
        "task": format!("{:?}", args.task).to_lowercase(),
        "held_out": held_out.len(),
        "sft_accuracy": before,
        "grpo_accuracy": after,
        "grpo_steps": g.steps,
        "grpo_seconds": g.elapsed_s,
        "seconds": started.elapsed().as_secs_f64(),
        "last_iteration": grpo.last_iteration(),
    });
    std::fs::write(
        args.out.join("results.json"),
        serde_json::to_string_pretty(&results)? + "\n",
    )?;
    println!(
        "grpo: held-out accuracy {:.1}% -> {:.1}% ({:+.1} points) in {} GRPO steps, {:.0} s in all",
        100.0 * before,
        100.0 * after,
        100.0 * (after - before),
        g.steps,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
