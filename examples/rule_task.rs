//! RLHF with a known answer: prefer replies that mention a word, and watch each optimiser
//! learn it.
//!
//! Everything is seeded, so one command reproduces every number:
//!
//! ```text
//! cargo run --release --example rule_task -- --data data/tinyshakespeare.txt
//! ```
//!
//! 1. **Pre-train** a tiny GPT with a byte-level BPE on Tiny Shakespeare.
//! 2. **SFT** it on conversations made of the play's text: the user says one line of a speech,
//!    the assistant answers with the next one. The policy so learns to reply with a
//!    Shakespeare-like line of varied content, ended by `<|end|>`.
//! 3. **Preferences decided by a rule** any code can check on any text: *a reply that mentions
//!    the word `--word` (default "my", as a whole word, any case) is preferred*. Pairs put a
//!    real line that mentions it (chosen) against a real line of about the same length that
//!    does not (rejected), after a prompt line; training pairs come from the first 90% of the
//!    play, held-out pairs and prompts from the last 10%. They are written as JSONL beside the
//!    checkpoints, so the `reward`, `ppo` and `dpo` examples can be run on them too.
//! 4. **Reward model** (Bradley–Terry) on the pairs: its held-out pairwise accuracy.
//! 5. **PPO** against the reward model with an adaptive KL penalty, and **DPO** on the pairs;
//!    for the SFT, PPO and DPO models: the fraction of sampled replies to held-out prompts that
//!    mention the word (temperature 1, the same seeds for every model) and the mean KL of each
//!    model to the SFT model on its own samples.
//!
//! The last line is a one-line summary; `results.json` in `--out` holds the figures.
//!
//! Ctrl-C (or SIGTERM) stops the stage in training after its current step and saves its state;
//! the same command with `--reuse` then keeps the stages that finished and trains the others
//! again.

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Parser;
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use tinygpt::chat::Message;
use tinygpt::rlhf::ppo::{mean_kl, sample_responses};
use tinygpt::rlhf::{
    Dpo, Ppo, PpoConfig, PreferenceDataset, PreferencePair, RewardModel, RewardTraining,
};
use tinygpt::sft::{prepare_for_chat, Sft, SftDataset};
use tinygpt::{
    checkpoint, data, ChatTemplate, Gpt, GptConfig, Objective, Pretraining, TokenDataset,
    Tokenizer, TrainConfig, Trainer,
};

/// The rule task: pre-train → SFT → preference pairs decided by a rule → reward model → PPO
/// and DPO, with the rule-satisfying rate of sampled replies before and after.
#[derive(Debug, Parser)]
#[command(version, args_override_self = true)]
struct Args {
    /// Tiny Shakespeare [default: downloaded into data/].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Directory for every stage's checkpoint and the generated data.
    #[arg(long, default_value = "out/rule")]
    out: PathBuf,
    /// The rule: a reply that mentions this word (whole word, any case) is preferred.
    #[arg(long, default_value = "my")]
    word: String,
    /// Seed of every random choice.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// A smoke run: tiny data and a few steps per stage (seconds, meaningless numbers).
    #[arg(long)]
    quick: bool,
    /// Reuse the pre-training, SFT and reward checkpoints already in --out that finished their
    /// steps (one stopped before its end, e.g. by Ctrl-C, is trained again, as are PPO and DPO;
    /// results.json there is replaced).
    #[arg(long)]
    reuse: bool,
    /// Replace an earlier run in --out (its checkpoints and results.json).
    #[arg(long)]
    overwrite: bool,
    /// Vocabulary of the byte-level BPE tokenizer.
    #[arg(long, default_value_t = 512)]
    vocab_size: usize,
    /// Transformer blocks.
    #[arg(long, default_value_t = 2)]
    n_layer: usize,
    /// Attention heads per block (must divide --n-embd).
    #[arg(long, default_value_t = 4)]
    n_head: usize,
    /// Embedding width.
    #[arg(long, default_value_t = 64)]
    n_embd: usize,
    /// Context length in tokens.
    #[arg(long, default_value_t = 64)]
    block_size: usize,
    /// Pre-training steps.
    #[arg(long, default_value_t = 600)]
    pretrain_iters: usize,
    /// SFT steps.
    #[arg(long, default_value_t = 400)]
    sft_iters: usize,
    /// Reward-model training steps.
    #[arg(long, default_value_t = 300)]
    reward_iters: usize,
    /// PPO iterations (each a rollout and ppo_epochs × minibatches steps).
    #[arg(long, default_value_t = 40)]
    ppo_iterations: usize,
    /// DPO steps.
    #[arg(long, default_value_t = 200)]
    dpo_iters: usize,
    /// Preference pairs generated for training.
    #[arg(long, default_value_t = 4000)]
    pairs: usize,
    /// Held-out prompts the rule rate is measured on.
    #[arg(long, default_value_t = 200)]
    eval_prompts: usize,
    /// The longest reply sampled, in tokens.
    #[arg(long, default_value_t = 24)]
    max_new_tokens: usize,
    /// PPO: target KL to the SFT model per reply, in nats.
    #[arg(long, default_value_t = 3.0)]
    target_kl: f64,
    /// PPO: initial KL coefficient.
    #[arg(long, default_value_t = 0.1)]
    kl_coef: f64,
    /// PPO: horizon of the adaptive KL controller, in replies (32 per iteration).
    #[arg(long, default_value_t = 64.0)]
    kl_horizon: f64,
    /// PPO learning rate.
    #[arg(long, default_value_t = 1e-4)]
    ppo_lr: f64,
    /// DPO's β.
    #[arg(long, default_value_t = 0.1)]
    beta: f64,
    /// DPO learning rate.
    #[arg(long, default_value_t = 1e-4)]
    dpo_lr: f64,
    /// CPU threads for candle (sets RAYON_NUM_THREADS unless it is set): a tiny model runs
    /// fastest on one, and candle's spinning pool on shared cores can be 8× slower.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// Whether `text` mentions `word` as a whole word, ignoring case: the rule.
fn mentions(text: &str, word: &str) -> bool {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .any(|w| w.eq_ignore_ascii_case(word))
}

/// (line, next line) of the same speech, in play order: a speech is the run of non-empty lines
/// after a speaker's `NAME:` line.
fn line_pairs(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut prev: Option<&str> = None;
    for line in text.lines().map(str::trim) {
        let is_body = !line.is_empty() && !line.ends_with(':');
        if let (Some(p), true) = (prev, is_body) {
            out.push((p.to_string(), line.to_string()));
        }
        prev = is_body.then_some(line);
    }
    out
}

/// Preference pairs decided by the rule: a prompt line, then a reply that mentions the word
/// (chosen) and one of about the same length that does not (rejected).
fn rule_pairs(
    prompts: &[String],
    replies: &[String],
    word: &str,
    n: usize,
    rng: &mut ChaCha8Rng,
) -> Vec<PreferencePair> {
    let (yes, mut no): (Vec<&String>, Vec<&String>) =
        replies.iter().partition(|r| mentions(r, word));
    no.sort_by_key(|r| r.len());
    if yes.is_empty() || no.is_empty() {
        return Vec::new();
    }
    (0..n)
        .filter_map(|_| {
            let chosen = *yes.choose(rng)?;
            let lo = no.partition_point(|r| r.len() + 5 < chosen.len());
            let hi = no.partition_point(|r| r.len() <= chosen.len() + 5);
            let pool = if hi > lo { &no[lo..hi] } else { &no[..] };
            let rejected = *pool.choose(rng)?;
            Some(PreferencePair {
                prompt: prompts.choose(rng)?.clone(),
                history: vec![],
                chosen: chosen.clone(),
                rejected: rejected.clone(),
            })
        })
        .collect()
}

/// The checkpoint directories this example writes inside --out.
const STAGES: [&str; 5] = ["pretrain", "sft", "reward", "ppo", "dpo"];

/// Refuses, before any training, an --out that is not this example's: a file, or a non-empty
/// directory without a stage checkpoint (its files could be overwritten), or one whose stage
/// directories are not checkpoints. An earlier run's stage checkpoints and results.json are
/// refused too unless `overwrite` (they are replaced) or `reuse` (pre-training, SFT and the
/// reward model are reused; PPO, DPO and results.json are replaced).
fn check_out(out: &Path, overwrite: bool, reuse: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        bail!(
            "--out {}: exists and is not a directory; choose a new or empty directory",
            out.display()
        );
    }
    let non_empty = std::fs::read_dir(out).is_ok_and(|mut d| d.next().is_some());
    // A stage interrupted before its first checkpoint holds only its latest state.
    let earlier: Vec<&str> = STAGES
        .iter()
        .copied()
        .filter(|s| {
            let dir = out.join(s);
            checkpoint::is_checkpoint_dir(&dir)
                || checkpoint::state_dirs(&dir).is_ok_and(|v| !v.is_empty())
        })
        .collect();
    if non_empty && earlier.is_empty() {
        bail!(
            "--out {}: is not empty and holds no checkpoint of an earlier run of this example \
             (in {}); its files could be overwritten, so choose a new or empty directory",
            out.display(),
            STAGES.join(", ")
        );
    }
    for stage in STAGES {
        common::fresh_out_dir(&out.join(stage), None, None, true)?;
    }
    if !earlier.is_empty() && !overwrite && !reuse {
        let results = if out.join("results.json").is_file() {
            " and results.json"
        } else {
            ""
        };
        bail!(
            "--out {} holds an earlier run (the {} checkpoint{}{results}): choose another --out, \
             pass --overwrite to replace it, or --reuse to keep its pre-training, SFT and reward \
             checkpoints and redo PPO and DPO",
            out.display(),
            earlier.join(", "),
            if earlier.len() == 1 { "" } else { "s" },
        );
    }
    Ok(())
}

fn write_jsonl<T: serde::Serialize>(path: &Path, records: &[T]) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for r in records {
        writeln!(f, "{}", serde_json::to_string(r)?)?;
    }
    Ok(())
}

/// What to do after Ctrl-C: this example trains a stage again rather than continuing it.
const AFTER_INTERRUPT: &str = "rule_task does not continue a stage: run the same command with \
    --reuse added to keep the stages that finished (pre-training, SFT, reward model) and train \
    the others again, or with --overwrite to start over";

/// Runs `objective` under the shared trainer, with a progress bar; returns the last metrics.
/// Ctrl-C ends the process after saving the stage's state (see [`common::train`]).
fn fit(
    objective: &mut impl Objective,
    cfg: TrainConfig,
    out: &Path,
    extra: serde_json::Value,
    stop: &common::Stop,
) -> Result<Vec<(String, f64)>> {
    let mut trainer = Trainer::new(cfg.clone(), objective.parameters()?)?
        .with_out_dir(out)
        .with_extra(extra)
        .with_stop_flag(stop.flag());
    let progress = common::Progress::new(cfg.max_iters, 0);
    let summary = common::train(
        &mut trainer,
        objective,
        stop,
        &progress,
        |_| {},
        AFTER_INTERRUPT,
    )?;
    Ok(summary.last_metrics)
}

/// Whether `dir` holds a stage of an earlier run that trained all its `iters` steps (under
/// --reuse; one that stopped before, by Ctrl-C or a crash, is trained again, and it says so).
fn finished(dir: &Path, iters: usize, what: &str) -> bool {
    if !checkpoint::is_checkpoint_dir(dir)
        && !checkpoint::state_dirs(dir).is_ok_and(|v| !v.is_empty())
    {
        return false;
    }
    let step = checkpoint::latest_state(dir)
        .ok()
        .and_then(|d| tinygpt::train::TrainerState::load(d).ok())
        .map(|s| s.step);
    match step {
        Some(s) if s >= iters && checkpoint::is_checkpoint_dir(dir) => true,
        Some(s) => {
            println!(
                "--reuse: the {what} in {} stopped at step {s} of {iters}: training it again",
                dir.display()
            );
            false
        }
        None => false,
    }
}

/// What a model's replies to the held-out prompts look like.
#[derive(Debug, Clone, serde::Serialize)]
struct Replies {
    /// Fraction that mention the word.
    rate: f64,
    /// Mean KL to the SFT model on these samples, nats per reply.
    kl: f64,
    /// Mean reply length in tokens (`<|end|>` not counted).
    length: f64,
    /// The first reply, for a look.
    example: String,
}

fn replies(
    model: &Gpt,
    sft: &Gpt,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    word: &str,
    max_new_tokens: usize,
    seed: u64,
) -> Result<Replies> {
    let template = ChatTemplate::new(tokenizer)?;
    let responses = sample_responses(model, &template, prompts, max_new_tokens, seed)?;
    let mut hits = 0;
    let mut tokens = 0;
    let mut example = String::new();
    for (i, r) in responses.iter().enumerate() {
        let content: Vec<u32> = r
            .iter()
            .copied()
            .filter(|&id| id != template.end_id())
            .collect();
        tokens += content.len();
        let text = tokenizer.decode(&content)?;
        hits += usize::from(mentions(&text, word));
        if i == 0 {
            // As a chat shows it: up to a control token, without broken UTF-8.
            example = tinygpt::chat::reply_text(tokenizer, &content)?;
        }
    }
    let rows: Vec<(Vec<u32>, Vec<u32>)> = prompts.iter().cloned().zip(responses).collect();
    let kl = mean_kl(model, sft, &rows, tokenizer.eot_id(), 32)?;
    let n = prompts.len().max(1) as f64;
    Ok(Replies {
        rate: hits as f64 / n,
        kl,
        length: tokens as f64 / n,
        example,
    })
}

fn main() -> Result<()> {
    let mut args = Args::parse();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // --threads, before candle's first operation and before `init` pins the default.
        tinygpt::threads::Threads {
            num_threads: args.threads.max(1),
            ..tinygpt::threads::Threads::recommended()
        }
        .apply()?;
    }
    common::init();
    let stop = common::Stop::install()?;
    if args.quick {
        args.vocab_size = args.vocab_size.min(300);
        args.n_embd = args.n_embd.min(32);
        args.pretrain_iters = args.pretrain_iters.min(20);
        args.sft_iters = args.sft_iters.min(10);
        args.reward_iters = args.reward_iters.min(10);
        args.ppo_iterations = args.ppo_iterations.min(2);
        args.dpo_iters = args.dpo_iters.min(10);
        args.pairs = args.pairs.min(200);
        args.eval_prompts = args.eval_prompts.min(16);
        args.max_new_tokens = args.max_new_tokens.min(12);
    }
    let device = common::device(&args.device)?;
    let started = Instant::now();
    let out = args.out.clone();
    check_out(&out, args.overwrite, args.reuse)?;
    std::fs::create_dir_all(&out)?;
    let mut rng = ChaCha8Rng::seed_from_u64(args.seed);
    let word = args.word.to_lowercase();

    // The text, its (line, next line) pairs, and the 90/10 split by position in the play.
    let path = common::corpus(args.data.as_deref())?;
    let mut text = data::read_text(&path)?;
    if args.quick {
        text = text.chars().take(100_000).collect();
    }
    let pairs = line_pairs(&text);
    let cut = pairs.len() * 9 / 10;
    let (train_lines, val_lines) = pairs.split_at(cut);
    let base_rate = train_lines
        .iter()
        .filter(|(_, r)| mentions(r, &word))
        .count() as f64
        / cut.max(1) as f64;
    println!(
        "rule: a reply that mentions {word:?} is preferred | {} (line, next line) pairs, {} train / {} held-out | {:.1}% of training replies mention it",
        pairs.len(),
        train_lines.len(),
        val_lines.len(),
        100.0 * base_rate
    );
    if val_lines.is_empty() {
        bail!("too little text: no held-out lines");
    }

    // 1. Pre-training.
    let pre_dir = out.join("pretrain");
    if !(args.reuse && finished(&pre_dir, args.pretrain_iters, "pre-training")) {
        println!("== 1. pre-training ==");
        let tokenizer = Tokenizer::train_bpe(&text, args.vocab_size)?;
        let reserved = ChatTemplate::SPECIAL_TOKENS.len();
        let cfg = GptConfig {
            vocab_size: tokenizer.vocab_size() + reserved,
            block_size: args.block_size,
            n_layer: args.n_layer,
            n_head: args.n_head,
            n_embd: args.n_embd,
            dropout: 0.0,
            bias: false,
            ..Default::default()
        };
        let model = Gpt::init(&cfg, args.seed, &device)?;
        let dataset = TokenDataset::from_tokens(tokenizer.encode(&text)?, 0.1)?;
        let train_cfg = TrainConfig {
            max_iters: args.pretrain_iters,
            eval_interval: args.pretrain_iters.max(1),
            eval_iters: 5,
            batch_size: 16,
            lr: 2e-3,
            min_lr: 2e-4,
            warmup_iters: 50.min(args.pretrain_iters / 5),
            lr_decay_iters: args.pretrain_iters,
            seed: args.seed,
            ..TrainConfig::default()
        };
        let mut obj = Pretraining::new(model, tokenizer, dataset, train_cfg.batch_size)?;
        fit(&mut obj, train_cfg, &pre_dir, serde_json::json!({}), &stop)?;
    }

    // 2. SFT on (line → next line) conversations.
    let sft_dir = out.join("sft");
    if !(args.reuse && finished(&sft_dir, args.sft_iters, "SFT")) {
        println!("== 2. SFT ==");
        let (base, tokenizer) = checkpoint::load_model(&pre_dir, &device)?;
        let (model, tokenizer, template) = prepare_for_chat(&base, tokenizer)?;
        let convs = |lines: &[(String, String)]| -> Vec<Vec<Message>> {
            lines
                .iter()
                .map(|(p, r)| vec![Message::user(p.clone()), Message::assistant(r.clone())])
                .collect()
        };
        let bs = model.config().block_size;
        let (train, _) = SftDataset::new(&convs(train_lines), &tokenizer, &template, bs)?;
        let (val, _) = SftDataset::new(&convs(val_lines), &tokenizer, &template, bs)?;
        let train_cfg = TrainConfig {
            max_iters: args.sft_iters,
            eval_interval: args.sft_iters.max(1),
            eval_iters: 5,
            batch_size: 16,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_iters: 20.min(args.sft_iters / 5),
            lr_decay_iters: args.sft_iters,
            weight_decay: 0.0,
            seed: args.seed,
            always_save_checkpoint: true,
            ..TrainConfig::default()
        };
        let mut obj = Sft::new(model, tokenizer, train, val, train_cfg.batch_size)?;
        fit(&mut obj, train_cfg, &sft_dir, serde_json::json!({}), &stop)?;
    }
    let (sft, tokenizer) = checkpoint::load_model(&sft_dir, &device)?;
    let template = ChatTemplate::new(&tokenizer)?;
    let block_size = sft.config().block_size;

    // 3. Preference pairs decided by the rule, and prompts; written as JSONL.
    let prompt_lines = |lines: &[(String, String)]| -> Vec<String> {
        lines.iter().map(|(p, _)| p.clone()).collect()
    };
    let reply_lines = |lines: &[(String, String)]| -> Vec<String> {
        lines.iter().map(|(_, r)| r.clone()).collect()
    };
    let train_pairs = rule_pairs(
        &prompt_lines(train_lines),
        &reply_lines(train_lines),
        &word,
        args.pairs,
        &mut rng,
    );
    let val_pairs = rule_pairs(
        &prompt_lines(val_lines),
        &reply_lines(val_lines),
        &word,
        (args.pairs / 10).max(20),
        &mut rng,
    );
    if train_pairs.is_empty() || val_pairs.is_empty() {
        bail!("no reply (or every reply) mentions {word:?}: choose another --word");
    }
    let user = |p: &String| serde_json::json!({ "messages": [Message::user(p.clone())] });
    let train_prompts: Vec<serde_json::Value> =
        prompt_lines(train_lines).iter().map(user).collect();
    let mut held_out: Vec<String> = prompt_lines(val_lines);
    held_out.truncate(args.eval_prompts);
    write_jsonl(&out.join("pref_train.jsonl"), &train_pairs)?;
    write_jsonl(&out.join("pref_val.jsonl"), &val_pairs)?;
    write_jsonl(&out.join("prompts_train.jsonl"), &train_prompts)?;
    write_jsonl(
        &out.join("prompts_val.jsonl"),
        &held_out.iter().map(user).collect::<Vec<_>>(),
    )?;
    let max_response = block_size / 2;
    let (pref_train, _) = PreferenceDataset::new(
        &train_pairs,
        &tokenizer,
        &template,
        block_size,
        max_response,
    )?;
    let (pref_val, _) =
        PreferenceDataset::new(&val_pairs, &tokenizer, &template, block_size, max_response)?;
    let eval_prompts: Vec<Vec<u32>> = held_out
        .iter()
        .map(|p| {
            let mut ids = template.render_prompt(&tokenizer, &[Message::user(p.clone())])?;
            let room = block_size - args.max_new_tokens;
            if ids.len() > room {
                ids.drain(..ids.len() - room);
            }
            Ok(ids)
        })
        .collect::<tinygpt::Result<_>>()?;
    println!(
        "pairs: {} train, {} held-out; {} held-out prompts for the rule rate",
        pref_train.len(),
        pref_val.len(),
        eval_prompts.len()
    );
    let eval_seed = args.seed ^ 0xe7a1;
    let before = replies(
        &sft,
        &sft,
        &tokenizer,
        &eval_prompts,
        &word,
        args.max_new_tokens,
        eval_seed,
    )?;
    println!(
        "SFT model: {:.1}% of replies mention {word:?} (mean length {:.1} tokens), e.g. {:?}",
        100.0 * before.rate,
        before.length,
        before.example
    );

    // 4. Reward model.
    let rm_dir = out.join("reward");
    if !(args.reuse
        && finished(&rm_dir, args.reward_iters, "reward model")
        && rm_dir.join(RewardModel::HEAD_FILE).is_file())
    {
        println!("== 3. reward model ==");
        let (model, tok) = RewardModel::from_sft(&sft_dir, &device)?;
        let cfg = TrainConfig {
            max_iters: args.reward_iters,
            eval_interval: (args.reward_iters / 3).max(1),
            eval_iters: 4,
            batch_size: 16,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_iters: 20.min(args.reward_iters / 5),
            lr_decay_iters: args.reward_iters,
            weight_decay: 0.0,
            seed: args.seed,
            ..TrainConfig::default()
        };
        let mut obj = RewardTraining::new(model, tok, pref_train.clone(), pref_val.clone(), 16)?;
        fit(
            &mut obj,
            cfg,
            &rm_dir,
            serde_json::json!({ "sft": sft_dir.display().to_string() }),
            &stop,
        )?;
    }
    let (rm, _) = RewardModel::load(&rm_dir, &device)?;
    let rm_metrics = rm
        .pair_metrics(&pref_val, tokenizer.eot_id(), 32, usize::MAX)?
        .unwrap_or_default();
    println!(
        "reward model: held-out accuracy {:.1}% over {} pairs, mean margin {:.2}",
        100.0 * rm_metrics.accuracy,
        rm_metrics.pairs,
        rm_metrics.margin
    );

    // 5. PPO.
    println!("== 4. PPO ==");
    let ppo_cfg = PpoConfig {
        rollout_size: 32,
        minibatch_size: 8,
        ppo_epochs: 4,
        max_new_tokens: args.max_new_tokens,
        kl_coef: args.kl_coef,
        target_kl: Some(args.target_kl),
        kl_horizon: args.kl_horizon,
        ..PpoConfig::default()
    };
    let steps = ppo_cfg.steps_per_iteration();
    let prompts: Vec<Vec<Message>> = prompt_lines(train_lines)
        .into_iter()
        .map(|p| vec![Message::user(p)])
        .collect();
    let mut ppo = Ppo::load(&sft_dir, &rm_dir, None, &prompts, ppo_cfg.clone(), &device)?;
    let cfg = TrainConfig {
        max_iters: args.ppo_iterations * steps,
        eval_interval: steps,
        eval_iters: 1,
        batch_size: ppo_cfg.minibatch_size,
        lr: args.ppo_lr,
        min_lr: args.ppo_lr,
        decay_lr: false,
        warmup_iters: 0,
        weight_decay: 0.0,
        seed: args.seed,
        ..TrainConfig::default()
    };
    let extra = serde_json::json!({
        "sft": sft_dir.display().to_string(),
        "reward": rm_dir.display().to_string(),
        "data": out.join("prompts_train.jsonl").display().to_string(),
        "ppo": ppo_cfg,
    });
    let ppo_dir = out.join("ppo");
    fit(&mut ppo, cfg, &ppo_dir, extra, &stop)?;
    let last = ppo.last_iteration().copied().unwrap_or_default();
    // The rollout KL of the last 10 iterations, from metrics.jsonl.
    let kls: Vec<f64> = std::fs::read_to_string(ppo_dir.join(checkpoint::files::METRICS))?
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["kl"].as_f64())
        .collect();
    let tail = &kls[kls.len().saturating_sub(10)..];
    let tail_kl = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
    let (tail_min, tail_max) = tail
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &k| {
            (a.min(k), b.max(k))
        });
    let after_ppo = replies(
        ppo.policy(),
        &sft,
        &tokenizer,
        &eval_prompts,
        &word,
        args.max_new_tokens,
        eval_seed,
    )?;
    println!(
        "PPO: {:.1}% of replies mention {word:?} (mean length {:.1}), KL to SFT {} nats per reply (target {}; rollouts of the last {}: mean {}, range {}–{}; kl_coef {:.3}), e.g. {:?}",
        100.0 * after_ppo.rate,
        after_ppo.length,
        common::fixed(after_ppo.kl, 2),
        args.target_kl,
        common::plural(tail.len(), "iteration"),
        common::fixed(tail_kl, 2),
        common::fixed(tail_min, 2),
        common::fixed(tail_max, 2),
        last.kl_coef,
        after_ppo.example
    );

    // 6. DPO.
    println!("== 5. DPO ==");
    let (policy, tok) = checkpoint::load_trainable(&sft_dir, &device)?;
    let (reference, _) = checkpoint::load_model(&sft_dir, &device)?;
    let mut dpo = Dpo::new(policy, reference, tok, pref_train, pref_val, 16, args.beta)?;
    let cfg = TrainConfig {
        max_iters: args.dpo_iters,
        eval_interval: (args.dpo_iters / 2).max(1),
        eval_iters: 4,
        batch_size: 16,
        lr: args.dpo_lr,
        min_lr: args.dpo_lr / 10.0,
        warmup_iters: 10.min(args.dpo_iters / 5),
        lr_decay_iters: args.dpo_iters,
        weight_decay: 0.0,
        seed: args.seed,
        always_save_checkpoint: true,
        ..TrainConfig::default()
    };
    let dpo_dir = out.join("dpo");
    let dpo_metrics = fit(
        &mut dpo,
        cfg,
        &dpo_dir,
        serde_json::json!({ "sft": sft_dir.display().to_string(), "beta": args.beta }),
        &stop,
    )?;
    let after_dpo = replies(
        dpo.policy(),
        &sft,
        &tokenizer,
        &eval_prompts,
        &word,
        args.max_new_tokens,
        eval_seed,
    )?;
    let get = |k: &str| dpo_metrics.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
    println!(
        "DPO: {:.1}% of replies mention {word:?} (mean length {:.1}), KL to SFT {} nats per reply; held-out implicit-reward accuracy {:.1}%, e.g. {:?}",
        100.0 * after_dpo.rate,
        after_dpo.length,
        common::fixed(after_dpo.kl, 2),
        100.0 * get("reward_accuracy").unwrap_or(f64::NAN),
        after_dpo.example
    );

    let results = serde_json::json!({
        "word": word,
        "seed": args.seed,
        "eval_prompts": eval_prompts.len(),
        "reward_model": { "accuracy": rm_metrics.accuracy, "margin": rm_metrics.margin, "pairs": rm_metrics.pairs },
        "sft": before,
        "ppo": after_ppo,
        "ppo_last_iteration": { "reward_mean": last.reward_mean, "kl": last.kl, "kl_coef": last.kl_coef, "target_kl": args.target_kl },
        "ppo_rollout_kl_last_10": { "mean": tail_kl, "min": tail_min, "max": tail_max },
        "dpo": after_dpo,
        "elapsed_s": started.elapsed().as_secs_f64(),
    });
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)? + "\n",
    )?;
    println!(
        "rule_task: replies mentioning {word:?}: SFT {:.1}% → PPO {:.1}% (KL {}; last {}: {}; target {}) | DPO {:.1}% (KL {}) | reward model held-out accuracy {:.1}% | {:.0} s | {}",
        100.0 * before.rate,
        100.0 * after_ppo.rate,
        common::fixed(after_ppo.kl, 2),
        common::plural(tail.len(), "rollout"),
        common::fixed(tail_kl, 2),
        args.target_kl,
        100.0 * after_dpo.rate,
        common::fixed(after_dpo.kl, 2),
        100.0 * rm_metrics.accuracy,
        started.elapsed().as_secs_f64(),
        out.join("results.json").display()
    );
    Ok(())
}
