//! Pieces the examples share: device choice, sampling flags, the data files.
#![allow(dead_code)]

pub mod data;
pub mod plot;
pub mod report;
pub mod rlhf;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use tinygpt::candle::Device;
use tinygpt::checkpoint::{self, CheckpointWriter, Target};
use tinygpt::data::HeldOut;
use tinygpt::signals::StopSignal;
use tinygpt::train::{StateKind, TrainSummary, TrainerState};
use tinygpt::{Objective, SamplingParams, TrainConfig, TrainEvent, Trainer};

/// `mi_option_purge_delay` in mimalloc.h's `mi_option_e` (v2 and v3).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Process-wide settings every example starts with; call it first thing in `main`, before
/// any tensor op.
///
/// - candle's element-wise thread pool busy-waits between ops; with the small tensors of these
///   models and few cores it costs more than it gains (training the default config: 19.2k
///   tokens/s with it off, 15.3k on, 2 cores), so it is off unless `CANDLE_NUM_THREADS` is
///   set. Matmuls still use every core (rayon, `RAYON_NUM_THREADS`).
/// - mimalloc keeps freed pages instead of handing them back to the kernel every 10 ms, which
///   then zeroes them again on the next allocation (12% of a training step in `perf`).
/// - `RAYON_NUM_THREADS` is pinned to the count candle would choose (physical cores) when it is
///   unset: candle reads it before every matmul and, when it is missing, counts the cores by
///   parsing `/proc/cpuinfo` each time (3% of a training step in `perf`).
///
/// The two thread settings are [`tinygpt::threads::init`], which refuses (a warning here) once
/// other threads run.
pub fn init() {
    if let Err(e) = tinygpt::threads::init() {
        eprintln!("warning: {e}");
    }
    // SAFETY: sets a global option of the allocator this binary links; no pointers involved.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}

/// `--device cpu|cuda` (cuda needs the `cuda` cargo feature and a GPU).
pub fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Device::new_cuda(0)
            .context("--device cuda: build with `--features cuda` on a machine with an NVIDIA GPU"),
        other => bail!("--device must be cpu or cuda, got {other:?}"),
    }
}

/// The sampling flags of `generate`, `chat` and friends.
#[derive(Debug, Clone, clap::Args)]
pub struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = Self::MAX_NEW_TOKENS)]
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 = greedy.
    #[arg(long, default_value_t = Self::TEMPERATURE, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = Self::TOP_K)]
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens up to this total probability, in (0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Drop tokens less likely than min_p × the most likely one, in [0, 1].
    #[arg(long, allow_negative_numbers = true)]
    pub min_p: Option<f32>,
    /// CTRL repetition penalty (1 = off), > 0.
    #[arg(long, default_value_t = Self::REPETITION_PENALTY, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
}

impl SamplingArgs {
    const MAX_NEW_TOKENS: usize = 500;
    const TEMPERATURE: f32 = 0.8;
    const TOP_K: usize = 200;
    const REPETITION_PENALTY: f32 = 1.0;

    /// The sampling settings, drawing with `seed` (each example owns its `--seed` flag: the
    /// sampler's in `generate` and `chat`, the run's in the training examples).
    pub fn params(&self, seed: u64) -> SamplingParams {
        SamplingParams::default()
            .with_max_new_tokens(self.max_new_tokens)
            .with_temperature(self.temperature)
            .with_top_k((self.top_k > 0).then_some(self.top_k))
            .with_top_p(self.top_p)
            .with_min_p(self.min_p)
            .with_repetition_penalty(self.repetition_penalty)
            .with_seed(seed)
    }

    /// The flags that differ from their defaults, as given (to repeat them in a command).
    pub fn flags(&self) -> Vec<String> {
        let mut v = Vec::new();
        let mut push = |flag: &str, value: String, default: Option<String>| {
            if default.as_ref() != Some(&value) {
                v.extend([flag.to_string(), value]);
            }
        };
        let s = |x: &dyn std::fmt::Display| Some(x.to_string());
        push(
            "--max-new-tokens",
            self.max_new_tokens.to_string(),
            s(&Self::MAX_NEW_TOKENS),
        );
        push(
            "--temperature",
            self.temperature.to_string(),
            s(&Self::TEMPERATURE),
        );
        push("--top-k", self.top_k.to_string(), s(&Self::TOP_K));
        if let Some(p) = self.top_p {
            push("--top-p", p.to_string(), None);
        }
        if let Some(p) = self.min_p {
            push("--min-p", p.to_string(), None);
        }
        push(
            "--repetition-penalty",
            self.repetition_penalty.to_string(),
            s(&Self::REPETITION_PENALTY),
        );
        v
    }

    /// [`SamplingArgs::params`], checked up front: a bad flag is an error naming the flag
    /// even where the settings are only used later (or not at all).
    pub fn checked_params(&self, seed: u64) -> Result<SamplingParams> {
        let params = self.params(seed);
        if let Err(e) = params.validate() {
            let msg = match e {
                tinygpt::Error::InvalidArgument(m) => m,
                e => e.to_string(),
            };
            // "top_p = 3 must be …" → "--top-p 3 must be …"
            let (field, rest) = msg.split_once(" = ").unwrap_or(("", msg.as_str()));
            if field.is_empty() || field.contains(' ') {
                bail!("sampling flags: {msg}");
            }
            bail!("--{} {rest}", field.replace('_', "-"));
        }
        Ok(params)
    }
}

/// The held-out set of a run from `--val-data` / `--val-fraction`, else the resumed run's
/// (`resumed_extra`, its `trainer_state.json` `extra`), else `default_fraction` of --data;
/// prints what a resumed run changed or recovered.
pub fn held_out(
    val_data: Option<&Path>,
    val_fraction: Option<f64>,
    resumed_extra: Option<&serde_json::Value>,
    default_fraction: f64,
) -> Result<HeldOut> {
    let given = match (val_data, val_fraction) {
        (Some(p), _) => Some(HeldOut::File(p.to_path_buf())),
        (None, Some(f)) => Some(check_val_fraction(f)?),
        (None, None) => None,
    };
    let (held_out, note) =
        HeldOut::resolve(given, resumed_extra, HeldOut::fraction(default_fraction)?)?;
    if let Some(note) = note {
        println!("{note}");
    }
    Ok(held_out)
}

/// `--val-fraction f`, checked: in `[0, 1)`, so some data is left to train on.
pub fn check_val_fraction(f: f64) -> Result<HeldOut> {
    HeldOut::fraction(f).map_err(|_| {
        anyhow::anyhow!(
            "--val-fraction must be in [0, 1) (the share of --data held out; 0 = none), got {f}"
        )
    })
}

/// `--data` if given, else `data/tinyshakespeare.txt`; fetched (and checked) when missing
/// (see [`data::resolve`]).
pub fn corpus(data: Option<&Path>) -> Result<PathBuf> {
    data::corpus(data)
}

/// 83.4 → "1m23s", 3725 → "1h02m", 9.2 → "9s".
pub fn duration(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s / 60 % 60),
    }
}

/// A metric as the eval lines show it: counts (`iteration`, `epoch`) as integers, lengths in
/// tokens with one decimal, fractions of replies (`ended`) as a percentage, the rest with four
/// decimals.
pub fn metric_value(key: &str, v: f64) -> String {
    match key {
        "iteration" | "epoch" | "step" => format!("{v:.0}"),
        "ended" => format!("{:.1}%", 100.0 * v),
        k if k.ends_with("length") || k.ends_with("_tokens") => format!("{v:.1}"),
        _ => format!("{v:.4}"),
    }
}

/// 12345.6 → "12.3k".
pub fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// The training flags every training example shares (unset flags keep the example's
/// defaults, or the saved settings when resuming).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TrainArgs {
    /// Sequences per micro-batch [default: the stage's recipe; all settings are printed in the
    /// `training:` line at the start].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimiser step.
    #[arg(long)]
    pub gradient_accumulation_steps: Option<usize>,
    /// Optimiser steps [default: the stage's recipe; the `training:` line at the start shows
    /// it].
    #[arg(long)]
    pub max_iters: Option<usize>,
    /// Evaluate (and checkpoint on improvement) every N steps.
    #[arg(long)]
    pub eval_interval: Option<usize>,
    /// Batches per evaluation.
    #[arg(long)]
    pub eval_iters: Option<usize>,
    /// Report training every N optimiser steps: a `"kind": "train"` row in metrics.jsonl, and
    /// a line (step, loss, lr, tokens/s, ETA) on stdout when it is not a terminal (on a
    /// terminal the progress bar shows them) [default: 10, or the resumed run's].
    #[arg(long)]
    pub log_interval: Option<usize>,
    /// Peak learning rate [default: the stage's recipe; the `training:` line at the start
    /// shows it].
    #[arg(long, allow_negative_numbers = true)]
    pub lr: Option<f64>,
    /// Final learning rate [default: lr / 10 when --lr is given].
    #[arg(long, allow_negative_numbers = true)]
    pub min_lr: Option<f64>,
    /// Linear warm-up steps.
    #[arg(long)]
    pub warmup_iters: Option<usize>,
    /// Step where the cosine reaches min_lr [default: max_iters].
    #[arg(long)]
    pub lr_decay_iters: Option<usize>,
    /// AdamW's decay rate of the gradient's running mean [default: 0.9].
    #[arg(long, allow_negative_numbers = true)]
    pub beta1: Option<f64>,
    /// AdamW's decay rate of the squared gradient's running mean [default: the stage's
    /// recipe; the `training:` line at the start shows it].
    #[arg(long, allow_negative_numbers = true)]
    pub beta2: Option<f64>,
    /// Decoupled weight decay, applied to matrices only [default: 0.1].
    #[arg(long, allow_negative_numbers = true)]
    pub weight_decay: Option<f64>,
    /// Clip the global gradient norm (0 = off).
    #[arg(long, allow_negative_numbers = true)]
    pub grad_clip: Option<f64>,
    /// Checkpoint at every evaluation, not only on a new best validation loss.
    #[arg(long)]
    pub always_save_checkpoint: bool,
    /// Also save the latest state (OUT/checkpoint-STEP, what --resume continues from) every N
    /// steps; 0 = only at the end of the run and on Ctrl-C or SIGTERM [default: 0, or the
    /// resumed run's].
    #[arg(long)]
    pub save_interval: Option<usize>,
    /// How many latest states (OUT/checkpoint-STEP) to keep, the newest [default: 1, or the
    /// resumed run's].
    #[arg(long)]
    pub keep_last: Option<usize>,
    /// Stop the run after this many skipped steps in a row (a step whose loss or gradient norm
    /// is NaN or infinite, or a spike, is skipped: nothing is updated) [default: 5, or the
    /// resumed run's].
    #[arg(long)]
    pub max_bad_steps: Option<usize>,
    /// Also skip a step whose loss or gradient norm lies more than Z standard deviations above
    /// the mean of the previous 128 steps (llm.c's z-score); 0 = off [default: 0, or the
    /// resumed run's].
    #[arg(long, allow_negative_numbers = true)]
    pub spike_zscore: Option<f64>,
    /// Seed of every random choice in training.
    #[arg(long)]
    pub seed: Option<u64>,
    /// This machine's matrix-multiplication peak in GFLOP/s (the best figure of `cargo bench
    /// --bench matmul` at the same threads): metrics.jsonl's train rows then carry `mfu`, the
    /// model FLOP/s as a share of it.
    #[arg(long)]
    pub matmul_peak_gflops: Option<f64>,
    /// Compute gradients with candle's autograd even where the stage has a hand-written
    /// backward pass (pre-training a GPT-2 without dropout): the reference path, slower.
    #[arg(long)]
    pub autograd: bool,
    /// Start afresh even if --out already holds a checkpoint (it is replaced when the first
    /// new one is written). Anything else in --out (a file, a directory of other files) is
    /// never replaced.
    #[arg(long)]
    pub overwrite: bool,
}

impl TrainArgs {
    /// `base` with the given flags applied (a resumed run's saved settings, or the stage's
    /// defaults); the flags not given change nothing, but --max-iters also moves the end of
    /// the decay (unless --lr-decay-iters is given) and --lr sets min_lr to lr / 10 (unless
    /// --min-lr is given).
    pub fn apply(&self, base: tinygpt::TrainConfig) -> tinygpt::TrainConfig {
        let mut c = base;
        macro_rules! set {
            ($($f:ident),*) => { $( if let Some(v) = self.$f { c.$f = v; } )* };
        }
        set!(
            batch_size,
            gradient_accumulation_steps,
            max_iters,
            eval_interval,
            eval_iters,
            log_interval,
            lr,
            min_lr,
            warmup_iters,
            lr_decay_iters,
            beta1,
            beta2,
            weight_decay,
            grad_clip,
            seed,
            save_interval,
            keep_last,
            max_bad_steps,
            spike_zscore,
            matmul_peak_gflops
        );
        if self.lr_decay_iters.is_none() && self.max_iters.is_some() {
            c.lr_decay_iters = c.max_iters;
        }
        if self.lr.is_some() && self.min_lr.is_none() {
            c.min_lr = c.lr / 10.0; // nanoGPT: min_lr ~= learning_rate / 10
        }
        c.always_save_checkpoint |= self.always_save_checkpoint;
        c.autograd |= self.autograd;
        c
    }
}

/// Prints training events: a progress bar with loss and throughput, eval and checkpoint lines.
///
/// On a terminal (stdout and stderr both) the bar shows step, loss, lr and tokens/s in place.
/// Otherwise (output redirected to a file, a pipe, CI) there is no bar: each `Step` event
/// (every `--log-interval` steps) prints one plain line to stdout, with an ETA.
pub struct Progress {
    bar: indicatif::ProgressBar,
    saved: std::cell::Cell<bool>,
    /// Plain lines instead of the bar.
    plain: bool,
    max_iters: usize,
    start: usize,
    started: std::time::Instant,
}

impl Progress {
    pub fn new(max_iters: usize, start: usize) -> Self {
        use std::io::IsTerminal;
        let bar = indicatif::ProgressBar::new(max_iters as u64);
        // The bar draws on stderr and hides itself when that is not a terminal; lines go to
        // stdout, so a redirected stdout gets plain lines too.
        let plain = bar.is_hidden() || !std::io::stdout().is_terminal();
        if plain {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        bar.set_position(start as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        Self {
            bar,
            saved: std::cell::Cell::new(false),
            plain,
            max_iters,
            start,
            started: std::time::Instant::now(),
        }
    }

    /// A line above the bar (plain stdout when the bar is hidden, e.g. not a terminal).
    pub fn say(&self, line: String) {
        if self.plain || self.bar.is_hidden() {
            println!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    pub fn event(&self, event: &tinygpt::TrainEvent) {
        use tinygpt::TrainEvent;
        match event {
            TrainEvent::Step {
                step,
                loss,
                tokens_per_sec,
                lr,
                ..
            } => {
                self.bar.set_position(*step as u64);
                self.bar.set_message(format!(
                    "loss {loss:.4} | lr {lr:.2e} | {} tok/s",
                    human(*tokens_per_sec)
                ));
                if self.plain {
                    println!(
                        "step {step:>5}/{}: loss {loss:.4}, lr {lr:.2e}, {} tok/s, ETA {}",
                        self.max_iters,
                        human(*tokens_per_sec),
                        self.eta(*step)
                    );
                }
            }
            TrainEvent::Eval { step, metrics } => {
                let shown: Vec<String> = metrics
                    .iter()
                    .filter(|(k, _)| {
                        !matches!(k.as_str(), "step" | "lr" | "elapsed_s" | "tokens_per_sec")
                    })
                    .map(|(k, v)| format!("{} {}", k.replace('_', " "), metric_value(k, *v)))
                    .collect();
                // An objective with nothing to report yet (PPO before its first iteration)
                // gets no line.
                if !shown.is_empty() {
                    self.say(format!("step {step:>5}: {}", shown.join(", ")));
                }
            }
            TrainEvent::Checkpoint { step, dir } => {
                self.saved.set(true);
                self.say(format!(
                    "step {step:>5}: saved checkpoint to {}",
                    dir.display()
                ));
            }
            TrainEvent::State {
                step,
                dir,
                interrupted,
            } => {
                self.say(format!(
                    "step {step:>5}: saved the {} state to {}",
                    if *interrupted {
                        "interrupted"
                    } else {
                        "latest"
                    },
                    dir.display()
                ));
            }
            TrainEvent::Skipped {
                step,
                reason,
                in_a_row,
            } => {
                self.say(format!(
                    "step {step:>5}: skipped ({reason}; {in_a_row} in a row), nothing updated"
                ));
            }
        }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    /// The time left after `step`, at this run's pace so far (evaluations included).
    fn eta(&self, step: usize) -> String {
        let done = step.saturating_sub(self.start);
        if done == 0 {
            return "?".into();
        }
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        duration(per_step * self.max_iters.saturating_sub(step) as f64)
    }

    /// Whether this run has written a checkpoint.
    pub fn saved(&self) -> bool {
        self.saved.get()
    }
}

/// Checks `out` before training, so that no run destroys what is already on disk: it must not
/// exist, or be an empty directory, or a checkpoint directory, and checkpoints must be
/// writable there (its parent is created and probed). A checkpoint already there would be
/// replaced at the new run's first improvement, so it is refused too unless it is the one the
/// run continues (`resuming`, the --resume directory) or `overwrite` is given. Nothing else is
/// ever replaced, whatever the flags.
///
/// `stage` is the stage the calling example trains when it has a `--resume` flag (its
/// objective's `STAGE`), `None` for one without (`chatgpt`, `rule_task`): the refusal's hint
/// names only flags the example has, and for a checkpoint of another stage (its
/// `trainer_state.json` says which) the example that continues it.
pub fn fresh_out_dir(
    out: &Path,
    stage: Option<&str>,
    resuming: Option<&Path>,
    overwrite: bool,
) -> Result<()> {
    not_locked(out)?;
    let found = CheckpointWriter::preflight(out).map_err(|e| anyhow!("--out: {e}"))?;
    let continued = resuming.is_some_and(|r| same_path(r, out));
    if found == Target::Checkpoint && !continued && !overwrite {
        let d = out.display();
        // The best checkpoint's stage, else (a run interrupted before its first one) its
        // newest state's.
        let found_stage = TrainerState::load(out)
            .or_else(|_| TrainerState::load(checkpoint::latest_state(out)?))
            .map(|s| s.stage)
            .unwrap_or_default();
        let what = if checkpoint::is_checkpoint_dir(out) {
            "a checkpoint"
        } else {
            "the saved state of an unfinished run"
        };
        const STAGES: [&str; 5] = ["pretrain", "sft", "reward", "dpo", "ppo"];
        let hint = match stage {
            // An example without --resume: only --out and --overwrite apply.
            None => String::new(),
            Some(own) if found_stage.is_empty() || found_stage == own => {
                format!(" (continue it with --resume {d})")
            }
            Some(own) if STAGES.contains(&found_stage.as_str()) => {
                let start = match (found_stage.as_str(), own) {
                    ("pretrain", "sft") => Some("--base"),
                    ("sft", "reward" | "dpo" | "ppo") => Some("--sft"),
                    ("reward", "ppo") => Some("--reward"),
                    _ => None,
                };
                let start = start
                    .map(|flag| format!("; to start {own} from it, pass it as {flag}"))
                    .unwrap_or_default();
                format!(
                    " of the `{found_stage}` stage (the {found_stage} example continues it: \
                     `{found_stage} --resume {d}`{start})"
                )
            }
            Some(_) => format!(" of the `{found_stage}` stage"),
        };
        bail!(
            "{d} already holds {what}{hint}: choose another --out, or pass --overwrite to \
             replace it"
        );
    }
    Ok(())
}

/// Refuses an `out` that is the directory of one of the checkpoints the run starts from
/// (`inputs`: the flag and its directory): the run's checkpoints would replace it.
pub fn out_is_not_input(out: &Path, inputs: &[(&str, Option<&Path>)]) -> Result<()> {
    for (flag, dir) in inputs {
        if let Some(dir) = dir {
            if same_path(dir, out) {
                bail!(
                    "--out {} is the {flag} directory: the run would replace the checkpoint it \
                     starts from; choose another --out",
                    out.display()
                );
            }
        }
    }
    Ok(())
}

/// The `--out` of a stage example: `--out`, else the `--resume` directory (the run directory,
/// [`Resume::run`]), else `out/STAGE`; refused when it is a directory the run starts from
/// ([`out_is_not_input`]) or holds what the run must not replace ([`fresh_out_dir`]).
pub fn stage_out_dir(
    out: Option<&Path>,
    resume: Option<&Path>,
    stage: &str,
    inputs: &[(&str, Option<&Path>)],
    overwrite: bool,
) -> Result<PathBuf> {
    let out = out
        .or(resume)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| Path::new("out").join(stage));
    out_is_not_input(&out, inputs)?;
    fresh_out_dir(&out, Some(stage), resume, overwrite)?;
    Ok(out)
}

/// `1 iteration`, `2 iterations`.
pub fn plural(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("{n} {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `v` with `decimals` decimals, without the sign of a value that rounds to zero (`0.00`, not
/// `-0.00`).
pub fn fixed(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    match s.strip_prefix('-') {
        Some(rest) if rest.chars().all(|c| c == '0' || c == '.') => rest.to_string(),
        _ => s,
    }
}

/// Puts `name` and `author` in place of the `{{name}}` and `{{author}}` placeholders (as in
/// LLaMA-Factory's identity set) in every message of `conversations`, and prints one line
/// saying how many messages changed, when any did.
pub fn fill_identity<'a>(
    conversations: impl IntoIterator<Item = &'a mut Vec<tinygpt::chat::Message>>,
    name: &str,
    author: &str,
) {
    let (mut names, mut authors) = (0, 0);
    for m in conversations.into_iter().flatten() {
        if m.content.contains("{{name}}") {
            names += 1;
            m.content = m.content.replace("{{name}}", name);
        }
        if m.content.contains("{{author}}") {
            authors += 1;
            m.content = m.content.replace("{{author}}", author);
        }
    }
    let mut done = Vec::new();
    if names > 0 {
        done.push(format!(
            "{{{{name}}}} → {name} in {}",
            plural(names, "message")
        ));
    }
    if authors > 0 {
        done.push(format!(
            "{{{{author}}}} → {author} in {}",
            plural(authors, "message")
        ));
    }
    if !done.is_empty() {
        println!("replaced {} (--name, --author)", done.join(", "));
    }
}

/// Checks the training settings and prints them in one line, with a warning for a schedule
/// that cannot do what it says (a warm-up as long as the run, a decay that ends before the
/// warm-up does).
///
/// # Errors
/// What [`tinygpt::TrainConfig::validate`] refuses.
pub fn announce(cfg: &tinygpt::TrainConfig) -> Result<()> {
    cfg.validate()?;
    // 1e30 as "1e30", not thirty-one digits.
    let num = |v: f64| {
        if v != 0.0 && !(1e-6..1e6).contains(&v.abs()) {
            format!("{v:e}")
        } else {
            v.to_string()
        }
    };
    let schedule = if cfg.decay_lr {
        format!(
            "lr {} → {} (warm-up {} steps, cosine to step {})",
            num(cfg.lr),
            num(cfg.min_lr),
            cfg.warmup_iters,
            cfg.lr_decay_iters
        )
    } else {
        format!("lr {} constant", num(cfg.lr))
    };
    eprintln!(
        "training: to step {}, {} sequences × {} micro-batch(es) a step, {schedule}, AdamW \
         betas ({}, {}), weight decay {}, grad clip {}, evaluation every {} steps over {} \
         batches, a log row every {} steps, seed {}",
        cfg.max_iters,
        cfg.batch_size,
        cfg.gradient_accumulation_steps,
        cfg.beta1,
        cfg.beta2,
        cfg.weight_decay,
        cfg.grad_clip,
        cfg.eval_interval,
        cfg.eval_iters,
        cfg.log_interval,
        cfg.seed
    );
    let mut safety = Vec::new();
    if cfg.save_interval > 0 {
        safety.push(format!(
            "the latest state saved every {} steps (the newest {} kept)",
            cfg.save_interval, cfg.keep_last
        ));
    } else if cfg.keep_last != 1 {
        safety.push(format!("the newest {} latest states kept", cfg.keep_last));
    }
    if cfg.spike_zscore > 0.0 {
        safety.push(format!(
            "steps with a loss or gradient norm z-score above {} skipped",
            cfg.spike_zscore
        ));
    }
    if cfg.max_bad_steps != TrainConfig::default().max_bad_steps {
        safety.push(format!(
            "stopping after {} skipped steps in a row",
            cfg.max_bad_steps
        ));
    }
    if !safety.is_empty() {
        eprintln!("training: {}", safety.join(", "));
    }
    if cfg.decay_lr && cfg.warmup_iters >= cfg.max_iters {
        eprintln!(
            "warning: the warm-up ({} steps) is not shorter than the run ({} steps): the learning \
             rate never reaches its peak ({}); pass a smaller --warmup-iters",
            cfg.warmup_iters, cfg.max_iters, cfg.lr
        );
    } else if cfg.decay_lr && cfg.lr_decay_iters <= cfg.warmup_iters {
        eprintln!(
            "warning: the decay ends (step {}) before the warm-up does (step {}): the learning \
             rate drops from the warm-up straight to min_lr; pass a larger --lr-decay-iters",
            cfg.lr_decay_iters, cfg.warmup_iters
        );
    }
    Ok(())
}

/// Ends quietly when the reader closed standard output (`… | head`), as command-line tools
/// do, instead of reporting the broken pipe as an error.
pub fn quiet_on_closed_pipe(result: Result<()>) -> Result<()> {
    match result {
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        r => r,
    }
}

/// Whether `out` holds this run's best checkpoint after training: one it `saved`, or the one
/// of the run it continued (`resumed`: [`Resume::run`], when that is `out` itself; a run
/// interrupted before its first best checkpoint has none yet).
pub fn holds_run_checkpoint(out: &Path, saved: bool, resumed: Option<&Path>) -> bool {
    let continued_in_place = resumed.is_some_and(|r| same_path(r, out));
    (saved || continued_in_place) && checkpoint::is_checkpoint_dir(out)
}

/// Whether `a` and `b` name the same file or directory (canonical paths; as given when
/// either does not exist).
pub fn same_path(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// The last line's "checkpoint DIR (best, step N)", or why there is none, and the latest
/// state when it is another directory (`trainer`'s newest state on disk). `holds`: from
/// [`holds_run_checkpoint`].
pub fn checkpoint_note(out: &Path, holds: bool, trainer: &Trainer) -> String {
    checkpoint_note_because(
        out,
        holds,
        "no evaluation improved on the run's best validation loss (step 0's is never saved)",
        trainer,
    )
}

/// [`checkpoint_note`] with the stage's own reason for writing none (`why`).
pub fn checkpoint_note_because(out: &Path, holds: bool, why: &str, trainer: &Trainer) -> String {
    let mut note = if holds {
        let what = match TrainerState::load(out) {
            Ok(s) if s.best_val_loss.is_some() && !s.train_config.always_save_checkpoint => {
                format!(" (best, step {})", s.step)
            }
            Ok(s) => format!(" (last evaluation, step {})", s.step),
            Err(_) => String::new(),
        };
        format!("checkpoint {}{what}", out.display())
    } else {
        let before = if checkpoint::is_checkpoint_dir(out) {
            " (it still holds the checkpoint that was there before)"
        } else {
            ""
        };
        format!("no checkpoint written to {}: {why}{before}", out.display())
    };
    if let Some((_, dir)) = trainer.last_saved() {
        if !same_path(dir, out) {
            note += &format!(" | latest state {}", dir.display());
        }
    }
    note
}

/// The value of `key` in the first evaluation row of `dir`'s `metrics.jsonl` (rows without a
/// `"kind"` are evaluations), if any.
pub fn first_eval_metric(dir: &Path, key: &str) -> Option<f64> {
    let text = std::fs::read_to_string(dir.join(checkpoint::files::METRICS)).ok()?;
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|row| row.get("kind").is_none_or(|k| k == "eval") && row.get(key).is_some())
        .and_then(|row| row[key].as_f64())
}

/// Refuses an output directory another process is training into (the lock file
/// `.NAME.lock` beside it that [`Trainer::fit`] holds), before anything is loaded: the run
/// would otherwise fail only when training starts, or be refused as if the other run's
/// checkpoint were an old one. Linux only (it reads `/proc/locks`, taking no lock itself, so
/// it never makes another run's start fail); elsewhere `fit` still refuses.
fn not_locked(out: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::MetadataExt;
        let dir = std::fs::canonicalize(out).unwrap_or_else(|_| out.to_path_buf());
        let Some(name) = dir.file_name() else {
            return Ok(());
        };
        let parent = dir.parent().unwrap_or(Path::new("."));
        let lock = parent.join(format!(".{}.lock", name.to_string_lossy()));
        let Ok(meta) = std::fs::metadata(&lock) else {
            return Ok(());
        };
        let Ok(locks) = std::fs::read_to_string("/proc/locks") else {
            return Ok(());
        };
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        let ino = meta.ino().to_string();
        let holder = locks.lines().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let held = f.get(1) == Some(&"FLOCK")
                && f.get(5).and_then(|d| d.rsplit(':').next()) == Some(ino.as_str());
            held.then(|| f.get(4).copied().unwrap_or_default().to_string())
        });
        if let Some(pid) = holder {
            bail!(
                "--out {}: another run (pid {pid}) is writing checkpoints into it (lock file \
                 {}): wait for it to finish or stop it (Ctrl-C saves its state), or choose \
                 another --out",
                out.display(),
                lock.display()
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = out;
    Ok(())
}

/// What the process is doing, for the signal watcher of [`Stop`].
const BEFORE: u8 = 0;
const TRAINING: u8 = 1;
const AFTER: u8 = 2;

/// Ctrl-C and SIGTERM in a training example ([`tinygpt::signals::StopSignal`]): during
/// [`train`] the first signal asks the trainer to stop after the step it is in and save its
/// state, and the example says how to continue; outside training (loading data, sampling at
/// the end) it ends the process at once, as it would without a handler, with the shell's
/// code (130 for SIGINT, 143 for SIGTERM). A second signal always ends it at once.
pub struct Stop {
    signal: StopSignal,
    phase: Arc<AtomicU8>,
}

impl Stop {
    /// Installs the handlers and the watcher thread; call it right after [`init`] (which
    /// wants the process to have one thread).
    pub fn install() -> Result<Self> {
        let signal = StopSignal::install().context("installing the Ctrl-C/SIGTERM handlers")?;
        let phase = Arc::new(AtomicU8::new(BEFORE));
        let (s, p) = (signal.clone(), Arc::clone(&phase));
        std::thread::Builder::new()
            .name("signal-watch".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_millis(50));
                let now = p.load(Ordering::SeqCst);
                if s.raised() && now != TRAINING {
                    let _ = std::io::stdout().flush();
                    if now == BEFORE {
                        eprintln!(
                            "stopped by {} before training started: nothing was saved",
                            s.name()
                        );
                    } else {
                        // On a line of its own after a sample cut short.
                        eprintln!(
                            "\nstopped by {} after training: every checkpoint written is complete",
                            s.name()
                        );
                    }
                    std::process::exit(s.exit_code());
                }
            })
            .context("starting the signal watcher thread")?;
        Ok(Self { signal, phase })
    }

    /// The flag to hand to [`Trainer::with_stop_flag`].
    pub fn flag(&self) -> Arc<std::sync::atomic::AtomicBool> {
        self.signal.flag()
    }

    /// The shell's exit code for the signal that arrived (130 for SIGINT, 143 for SIGTERM).
    pub fn exit_code(&self) -> i32 {
        self.signal.exit_code()
    }
}

/// Runs `trainer.fit` with `progress` (and `on_event`, for an example's own bookkeeping).
///
/// On Ctrl-C or SIGTERM ([`tinygpt::Error::Interrupted`], after the trainer saved its state)
/// it says where the state is and how to continue (`how`, e.g. `continue with: cargo run …`)
/// and ends the process with the signal's exit code; it returns only a finished run or
/// another error. A run stopped by too many skipped steps ([`tinygpt::Error::Training`]) is
/// an error naming the flags to change.
pub fn train<O: Objective + ?Sized>(
    trainer: &mut Trainer,
    objective: &mut O,
    stop: &Stop,
    progress: &Progress,
    mut on_event: impl FnMut(&TrainEvent),
    how: &str,
) -> Result<TrainSummary> {
    let start = trainer.step();
    stop.phase.store(TRAINING, Ordering::SeqCst);
    let result = trainer.fit(objective, |e| {
        on_event(e);
        progress.event(e)
    });
    progress.finish();
    match result {
        Ok(summary) => {
            stop.phase.store(AFTER, Ordering::SeqCst);
            Ok(summary)
        }
        Err(tinygpt::Error::Interrupted { step, saved }) => {
            let _ = std::io::stdout().flush();
            let name = stop.signal.name();
            match saved {
                Some(dir) if step == start && start > 0 => eprintln!(
                    "interrupted by {name} at step {step}, before any new step: the state is \
                     still the one in {}; {how}",
                    dir.display()
                ),
                Some(dir) => eprintln!(
                    "interrupted by {name} after step {step}: the state is saved in {}; {how}",
                    dir.display()
                ),
                None => eprintln!(
                    "interrupted by {name} before the first step finished: nothing was saved; \
                     run the same command again to start over"
                ),
            }
            std::process::exit(stop.exit_code());
        }
        Err(tinygpt::Error::Training(msg)) => {
            stop.phase.store(AFTER, Ordering::SeqCst);
            // The library names the settings; the examples' flags are these.
            let msg = msg
                .replace("lower lr", "lower --lr")
                .replace("raise max_bad_steps", "raise --max-bad-steps");
            Err(anyhow!("training stopped: {msg}"))
        }
        Err(e) => {
            stop.phase.store(AFTER, Ordering::SeqCst);
            Err(e.into())
        }
    }
}

/// `continue with: cargo run --release --example NAME -- --resume OUT ARGS…`: the command that
/// continues a stage example's run in `out`, with `args` (the flags that are not saved with
/// the run but that it needs, e.g. `--device cuda`).
pub fn continue_with(example: &str, out: &Path, args: &[String]) -> String {
    let mut cmd = format!(
        "continue with: cargo run --release --example {example} -- --resume {}",
        shell_word(&out.display().to_string())
    );
    for a in args {
        cmd.push(' ');
        cmd.push_str(&shell_word(a));
    }
    cmd
}

/// `--device NAME` when it is not the default (the device is not saved with a run).
pub fn device_flag(device: &str) -> Vec<String> {
    if device == "cpu" {
        Vec::new()
    } else {
        vec!["--device".into(), device.into()]
    }
}

/// `s` as one word for a POSIX shell: as it is when it is made of safe characters, else in
/// single quotes.
pub fn shell_word(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "_-./=:,+@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The run a `--resume DIR` continues.
#[derive(Debug, Clone)]
pub struct Resume {
    /// The run's directory: DIR, or its parent when DIR is one of the run's latest states
    /// (`RUN/checkpoint-STEP`). The default `--out`.
    pub run: PathBuf,
    /// The state it continues from: the newest of the run's best checkpoint and its latest
    /// states ([`checkpoint::latest_state`]), or the state DIR names.
    pub dir: PathBuf,
    /// That state's `trainer_state.json`.
    pub state: TrainerState,
}

/// The directory a run saved in `dir` continues from, for the `stage` example, said in one
/// line ("resuming out/pretrain from its latest state, step 2100
/// (out/pretrain/checkpoint-2100)").
///
/// # Errors
/// If `dir` holds no checkpoint or state, if its newest state fails its manifest, or if it is
/// another stage's run (the message names the example that continues it).
pub fn resume(dir: &Path, stage: &str) -> Result<Resume> {
    if !dir.is_dir() {
        bail!(
            "--resume {}: no such directory (pass the --out of the run to continue)",
            dir.display()
        );
    }
    let is_state = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix(checkpoint::files::STATE_PREFIX))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
    let (run, state_dir) = if is_state {
        let parent = dir
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        (parent.to_path_buf(), dir.to_path_buf())
    } else {
        let latest = checkpoint::latest_state(dir).map_err(|e| anyhow!("--resume: {e}"))?;
        (dir.to_path_buf(), latest)
    };
    let state = TrainerState::load_for_stage(&state_dir, stage)?;
    let kind = match state.kind {
        StateKind::Interrupted => ", saved on an interrupt",
        _ => "",
    };
    if is_state {
        let newer_states = checkpoint::state_dirs(&run)
            .unwrap_or_default()
            .iter()
            .filter(|(s, _)| *s > state.step)
            .count();
        let mut newer = Vec::new();
        if let Ok(best) = TrainerState::load(&run) {
            if best.step > state.step {
                newer.push(format!("its best checkpoint (step {})", best.step));
            }
        }
        if newer_states > 0 {
            newer.push(format!("{} newer", plural(newer_states, "latest state")));
        }
        let note = if newer.is_empty() {
            String::new()
        } else {
            format!(
                "; {} in {} will be replaced as this run goes on",
                newer.join(" and "),
                run.display()
            )
        };
        println!(
            "resuming {} from {}, step {}{kind}{note}",
            run.display(),
            state_dir.display(),
            state.step
        );
    } else if same_path(&state_dir, &run) {
        // Stages without a validation loss (PPO) keep the latest evaluation, not a best.
        let which = if state.best_val_loss.is_some() {
            "its best checkpoint"
        } else {
            "its checkpoint"
        };
        println!(
            "resuming {} from its latest state, step {} ({which}{kind})",
            run.display(),
            state.step
        );
    } else {
        println!(
            "resuming {} from its latest state, step {} ({}{kind})",
            run.display(),
            state.step,
            state_dir.display()
        );
    }
    Ok(Resume {
        run,
        dir: state_dir,
        state,
    })
}

/// `trainer` continued from `resume`'s state ([`Trainer::resume_from`], which restores the
/// saved optimiser, schedule and batch settings), then given `cfg`, the saved settings with
/// the flags of this command applied ([`TrainArgs::apply`]); each setting that changes is
/// printed ("--lr: 0.001 (saved) -> 0.0005 from step 200") and recorded in the run's
/// `trainer_state.json` ([`Trainer::override_config`]). Flags not given change nothing.
/// `more`: the flag that trains a finished run further (`--max-iters`), for the note when
/// there is nothing left to train.
pub fn resume_trainer(
    trainer: Trainer,
    resume: &Resume,
    cfg: &TrainConfig,
    more: &str,
) -> Result<Trainer> {
    let mut trainer = trainer.resume_from(&resume.dir)?;
    let changes = trainer
        .override_config(cfg.clone())
        .map_err(|e| anyhow!("the flags given with --resume: {e}"))?;
    for c in changes {
        let line = c.to_string();
        let rest = line.strip_prefix(c.field.as_str()).unwrap_or(&line);
        println!("--{}{rest}", c.field.replace('_', "-"));
    }
    if trainer.step() >= cfg.max_iters {
        println!(
            "note: the run already reached step {} of {}: nothing to train (pass a larger \
             {more} to go on)",
            trainer.step(),
            cfg.max_iters
        );
    }
    Ok(trainer)
}
