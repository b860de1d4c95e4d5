//! The one training loop every stage shares.
//!
//! Pre-training, SFT and the preference stages differ only in their data and their loss; each
//! is an [`Objective`]. The [`Trainer`] owns everything else, as nanoGPT's `train.py` does:
//! the learning-rate schedule, gradient accumulation, gradient clipping, the AdamW step,
//! periodic evaluation, checkpoints of the best model, metrics, and resuming.
//!
//! One iteration `it` (0-based), exactly as nanoGPT orders it:
//! 1. set the learning rate to `schedule.lr_at(it)`;
//! 2. every `eval_interval` iterations (and at the last), evaluate; if the validation loss
//!    improved (or `always_save_checkpoint`), write a checkpoint with `step = it`;
//! 3. stop if `it == max_iters`;
//! 4. accumulate gradients over `gradient_accumulation_steps` micro-batches (each loss divided
//!    by that count), clip their global norm to `grad_clip`, take one AdamW step; every
//!    `log_interval` steps (and at the last), report it.
//!
//! `metrics.jsonl` (in each checkpoint) has one JSON object a line, told apart by `"kind"`:
//! - `"kind": "eval"`, one per evaluation: `step`, the objective's metrics (`train_loss`,
//!   `val_loss`, …), `lr`, `tokens_per_sec` (since the previous evaluation) and `elapsed_s`
//!   (training time so far, evaluations excluded);
//! - `"kind": "train"`, one every `log_interval` optimiser steps (and at the last): `step`
//!   (steps done), `loss` (that step's mean micro-batch loss), `lr`, `grad_norm` (before
//!   clipping; `null` with clipping off), `tokens_per_sec` (since the previous such row) and
//!   `elapsed_s`; where the stage counts its FLOPs ([`Objective::flops_per_token`]) also
//!   `model_gflops` (model FLOP/s over those steps, in GFLOP/s) and, with
//!   [`TrainConfig::matmul_peak_gflops`] set, `mfu` (`model_gflops` over that peak).
//!
//! - `"kind": "skip"`, one per skipped step: `step` (the step's number, 1-based), `reason`,
//!   `loss`, `grad_norm`.
//!
//! Readers that want the evaluations filter on `"kind"` (rows written before it existed are all
//! evaluations).
//!
//! # Nothing lost
//! - **Latest state.** Besides the best checkpoint (`OUT`), the run writes its latest state,
//!   `OUT/checkpoint-STEP`, at the end of the run (when the last evaluation did not improve),
//!   on an interrupt ([`Trainer::with_stop_flag`]) and every `save_interval` steps; the newest
//!   `keep_last` are kept. A resumed run continues from the newest
//!   ([`crate::checkpoint::latest_state`]).
//! - **Bad steps.** A step whose loss or gradient norm is NaN or infinite (or, with
//!   `spike_zscore`, an outlier: llm.c's z-score over the last `spike_window` steps) is
//!   skipped: no parameter or moment changes. It is reported and counted; `max_bad_steps` in a
//!   row stop the run with [`Error::Training`], the checkpoints as they were.
//! - **Exact resume.** The optimiser's and schedule's settings, both RNGs, the skip detector's
//!   window and the optimiser's own step count are saved, so a resumed run takes the steps an
//!   uninterrupted one takes, bit for bit on the CPU. A caller's settings that differ from the
//!   saved ones apply only through [`Trainer::override_config`], which records the change.
//! - **One writer.** [`Trainer::fit`] holds a lock on `OUT` (a file beside it) and removes what
//!   a killed run left there ([`crate::checkpoint::clean_stale`]).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{
    self, files, load_safetensors, require_files, save_safetensors, CheckpointWriter,
};
use crate::durable::{self, DirLock};
use crate::optim::{clip_grad_norm, clip_grad_norm_slices, AdamW, AdamWConfig, LrSchedule};
use crate::{Error, Result};

/// A step's gradients: autograd's tensors, or a hand-written step's buffers.
enum Grads<'a> {
    Tensors(Vec<Tensor>),
    Slices(&'a [Vec<f32>]),
}

/// Mixed into the seed of the evaluation RNG, so it differs from the training RNG.
const EVAL_SEED: u64 = 0x5eed_e7a1;

/// What a stage contributes to training: its parameters, its loss and how to save its model.
///
/// `Send`, because the [`Trainer`] runs each step and each evaluation on a worker of rayon's
/// thread pool (the pool the matmuls and fused kernels split their work over).
pub trait Objective: Send {
    /// The stage's name (`"pretrain"`, `"sft"`, …), recorded in `trainer_state.json`.
    fn stage(&self) -> &str;

    /// The trainable parameters by name, in a stable order.
    ///
    /// # Errors
    /// If the model was loaded without trainable weights.
    fn parameters(&self) -> Result<Vec<(String, Var)>>;

    /// The loss on one training micro-batch drawn with `rng`, in training mode (dropout on),
    /// as a scalar f32 tensor with its autograd graph; and the number of tokens it covered.
    ///
    /// # Errors
    /// Data or tensor errors.
    fn train_loss(&mut self, rng: &mut ChaCha8Rng) -> Result<(Tensor, usize)>;

    /// Evaluation over `eval_iters` batches drawn with `rng` (no dropout): named metrics,
    /// with `val_loss` (the one the best checkpoint is chosen by) whenever there is a
    /// held-out set, and `train_loss` where it makes sense.
    ///
    /// # Errors
    /// Data or tensor errors.
    fn evaluate(&mut self, eval_iters: usize, rng: &mut ChaCha8Rng) -> Result<Vec<(String, f64)>>;

    /// Writes the model files (`config.json`, `model.safetensors`, `tokenizer.json`, and any
    /// extra head) into `dir`, which exists and is empty.
    ///
    /// # Errors
    /// File errors.
    fn save(&self, dir: &Path) -> Result<()>;

    /// Whether a state saved now resumes exactly: `false` while the objective holds work of
    /// the current step that [`Objective::save`] does not keep (PPO between the minibatch
    /// steps of one rollout). An interrupt and a periodic latest state then wait for the next
    /// step where it is `true`. Default: always.
    fn resumable_here(&self) -> bool {
        true
    }

    /// One training micro-batch through a hand-written forward and backward pass instead of
    /// candle's autograd, where the stage has one for its model
    /// (`src/kernels/train_step.rs`): draws the batch with `rng` as
    /// [`Objective::train_loss`] does, zeroes the gradient buffers first when `zero`, adds
    /// `loss_scale ·` the loss's gradient into them, and returns the loss and the tokens it
    /// covered. `None` (the default): no such step here, and nothing was drawn.
    ///
    /// # Errors
    /// Data errors, or a model the step does not fit.
    fn train_step_owned(
        &mut self,
        _rng: &mut ChaCha8Rng,
        _loss_scale: f32,
        _zero: bool,
    ) -> Option<Result<(f64, usize)>> {
        None
    }

    /// The gradients [`Objective::train_step_owned`] accumulated, one buffer per parameter in
    /// [`Objective::parameters`]'s order.
    fn owned_grads(&self) -> Option<&[Vec<f32>]> {
        None
    }

    /// Model FLOPs per trained token (forward and backward), where the stage knows them
    /// ([`crate::GptConfig::train_flops_per_token`]): the `model_gflops` and `mfu` of the
    /// `"kind": "train"` rows of `metrics.jsonl`.
    fn flops_per_token(&self) -> Option<f64> {
        None
    }
}

/// Training hyper-parameters, with nanoGPT's names. The defaults are nanoGPT's CPU recipe for
/// `shakespeare_char` (its README) with `config/train_shakespeare_char.py`'s settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Number of optimiser steps.
    pub max_iters: usize,
    /// Evaluate (and maybe checkpoint) every this many steps.
    pub eval_interval: usize,
    /// Batches averaged per evaluation and split.
    pub eval_iters: usize,
    /// Report training every this many optimiser steps (and at the last): a
    /// [`TrainEvent::Step`] to the event callback and a `"kind": "train"` row in
    /// `metrics.jsonl` (see the module docs). At least 1.
    pub log_interval: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimiser step.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Final learning rate of the cosine decay.
    pub min_lr: f64,
    /// Linear warm-up steps.
    pub warmup_iters: usize,
    /// Step at which the cosine decay reaches `min_lr`.
    pub lr_decay_iters: usize,
    /// Whether to decay the learning rate at all.
    pub decay_lr: bool,
    /// AdamW β1.
    pub beta1: f64,
    /// AdamW β2.
    pub beta2: f64,
    /// AdamW ε.
    pub eps: f64,
    /// AdamW decoupled weight decay (rank ≥ 2 tensors only).
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub grad_clip: f64,
    /// Seed of every random choice in training (batches, dropout).
    pub seed: u64,
    /// Checkpoint at every evaluation, not only when the validation loss improves.
    pub always_save_checkpoint: bool,
    /// Also write the latest state (`OUT/checkpoint-STEP`) every this many steps; 0: only at
    /// the end of the run and on an interrupt.
    pub save_interval: usize,
    /// How many latest states to keep, the newest; at least 1.
    pub keep_last: usize,
    /// Stop the run after this many skipped steps in a row (see the module docs); at least 1.
    pub max_bad_steps: usize,
    /// Skip a step whose loss or gradient norm lies more than this many standard deviations
    /// above the mean of the previous `spike_window` steps (llm.c's `skip_update_lossz`); 0
    /// disables it.
    pub spike_zscore: f64,
    /// Steps the spike detector looks back over (llm.c: 128); it acts once the window is full.
    pub spike_window: usize,
    /// The matrix-multiplication peak of this machine in GFLOP/s (the best of
    /// `cargo bench --bench matmul` at the same threads), against which `metrics.jsonl`'s
    /// `mfu` is stated; 0: unknown, no `mfu`.
    pub matmul_peak_gflops: f64,
    /// Train through candle's autograd even where the stage has a hand-written backward pass
    /// ([`Objective::train_step_owned`]; pre-training a GPT-2 without dropout). The two give
    /// the same gradients up to rounding (the tests hold them to 1e-5).
    pub autograd: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_iters: 2000,
            eval_interval: 250,
            eval_iters: 20,
            log_interval: 10,
            batch_size: 12,
            gradient_accumulation_steps: 1,
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_iters: 100,
            lr_decay_iters: 2000,
            decay_lr: true,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: 1.0,
            seed: 1337,
            always_save_checkpoint: false,
            save_interval: 0,
            keep_last: 1,
            max_bad_steps: 5,
            spike_zscore: 0.0,
            spike_window: 128,
            matmul_peak_gflops: 0.0,
            autograd: false,
        }
    }
}

impl TrainConfig {
    /// Checks the values make sense.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("eval_interval", self.eval_interval),
            ("eval_iters", self.eval_iters),
            ("log_interval", self.log_interval),
            ("batch_size", self.batch_size),
            (
                "gradient_accumulation_steps",
                self.gradient_accumulation_steps,
            ),
            ("keep_last", self.keep_last),
            ("max_bad_steps", self.max_bad_steps),
            ("spike_window", self.spike_window),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("{name} must be at least 1, got 0")));
            }
        }
        if self.lr.is_nan() || self.lr <= 0.0 || self.min_lr.is_nan() || self.min_lr < 0.0 {
            return Err(Error::Config(format!(
                "lr must be > 0 and min_lr >= 0, got lr {} min_lr {}",
                self.lr, self.min_lr
            )));
        }
        if self.decay_lr && self.min_lr > self.lr {
            return Err(Error::Config(format!(
                "min_lr ({}) must not exceed lr ({}): the schedule decays from lr to min_lr",
                self.min_lr, self.lr
            )));
        }
        if self.grad_clip.is_nan()
            || self.grad_clip < 0.0
            || self.weight_decay.is_nan()
            || self.weight_decay < 0.0
        {
            return Err(Error::Config(format!(
                "grad_clip and weight_decay must be >= 0, got {} and {}",
                self.grad_clip, self.weight_decay
            )));
        }
        if !self.matmul_peak_gflops.is_finite() || self.matmul_peak_gflops < 0.0 {
            return Err(Error::Config(format!(
                "matmul_peak_gflops must be >= 0 (0: unknown), got {}",
                self.matmul_peak_gflops
            )));
        }
        if !self.spike_zscore.is_finite() || self.spike_zscore < 0.0 {
            return Err(Error::Config(format!(
                "spike_zscore must be >= 0 (0 turns spike skipping off), got {}",
                self.spike_zscore
            )));
        }
        Ok(())
    }

    /// The fields a resumed run takes from its checkpoint rather than from the caller (the
    /// optimiser, the schedule, the batches and the skip detector: what makes its steps the
    /// ones an uninterrupted run takes). The others (`max_iters`, the evaluation, logging and
    /// saving settings) are the caller's. See [`Trainer::override_config`].
    pub const RESTORED_ON_RESUME: [&'static str; 15] = [
        "batch_size",
        "gradient_accumulation_steps",
        "lr",
        "min_lr",
        "warmup_iters",
        "lr_decay_iters",
        "decay_lr",
        "beta1",
        "beta2",
        "eps",
        "weight_decay",
        "grad_clip",
        "seed",
        "spike_zscore",
        "spike_window",
    ];

    /// The learning-rate schedule these settings describe.
    pub fn schedule(&self) -> LrSchedule {
        LrSchedule {
            lr: self.lr,
            min_lr: self.min_lr,
            warmup_iters: self.warmup_iters,
            lr_decay_iters: self.lr_decay_iters,
            decay_lr: self.decay_lr,
        }
    }

    fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
}

/// The exact state of a ChaCha8 generator, to continue its stream after a resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RngState {
    /// The 32-byte seed, hex.
    pub seed: String,
    /// The stream number.
    pub stream: u64,
    /// The position in the stream (a u128, as a decimal string).
    pub word_pos: String,
}

impl RngState {
    /// Captures `rng`.
    pub fn of(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: rng.get_seed().iter().map(|b| format!("{b:02x}")).collect(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos().to_string(),
        }
    }

    /// Rebuilds the generator.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the fields are malformed.
    pub fn restore(&self) -> Result<ChaCha8Rng> {
        let bad_seed = || {
            Error::InvalidArgument(format!(
                "malformed RNG state: seed must be 64 hex digits, got {} characters{}",
                self.seed.chars().count(),
                if self.seed.len() == 64 {
                    " that are not all hex digits"
                } else {
                    ""
                }
            ))
        };
        if self.seed.len() != 64 {
            return Err(bad_seed());
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(self.seed.get(2 * i..2 * i + 2).ok_or_else(bad_seed)?, 16)
                .map_err(|_| bad_seed())?;
        }
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        let word_pos = self.word_pos.parse().map_err(|_| {
            let shown: String = self.word_pos.chars().take(40).collect();
            Error::InvalidArgument(format!(
                "malformed RNG state: word_pos must be a decimal number below 2^128, got {shown:?}"
            ))
        })?;
        rng.set_word_pos(word_pos);
        Ok(rng)
    }
}

/// `trainer_state.json`: everything besides weights and moments needed to continue a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimiser steps taken; a resumed run continues at this iteration.
    pub step: usize,
    /// Best validation loss seen so far (the one this checkpoint was saved for).
    pub best_val_loss: Option<f64>,
    /// The training RNG (batches, dropout) at `step`.
    pub rng: RngState,
    /// The evaluation RNG (which batches the next evaluation draws) at `step`.
    pub eval_rng: RngState,
    /// The stage that wrote it (`pretrain`, `sft`, …).
    pub stage: String,
    /// Training wall time so far, seconds.
    pub elapsed_s: f64,
    /// Training tokens processed so far.
    pub tokens_seen: u64,
    /// The settings of the run.
    pub train_config: TrainConfig,
    /// Stage-specific facts an example wants back on resume (data path, tokenizer kind, …).
    #[serde(default)]
    pub extra: serde_json::Value,
    /// Why this state was written: the best checkpoint, a latest state, or an interrupt.
    #[serde(default)]
    pub kind: StateKind,
    /// Whether the evaluation due at `step` has not run yet (a state written on an interrupt
    /// before it): the resumed run runs it first.
    #[serde(default)]
    pub pending_eval: bool,
    /// AdamW updates taken (fewer than `step` when steps were skipped); `None` in checkpoints
    /// written before steps could be skipped, where it equals `step`.
    #[serde(default)]
    pub optimizer_steps: Option<usize>,
    /// Steps skipped so far (non-finite or outlying loss or gradient norm).
    #[serde(default)]
    pub skipped_steps: usize,
    /// Skipped steps in a row just before `step`.
    #[serde(default)]
    pub bad_streak: usize,
    /// The spike detector's window: the losses and gradient norms of the last
    /// `spike_window` finite steps, oldest first.
    #[serde(default)]
    pub spike_history: Vec<(f64, f64)>,
    /// Settings changed on a resume ([`Trainer::override_config`]), in order.
    #[serde(default)]
    pub overrides: Vec<ConfigChange>,
}

/// Why a checkpoint was written ([`TrainerState::kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StateKind {
    /// The best checkpoint so far (`OUT`): the lowest validation loss, or the latest
    /// evaluation for stages without one or with `always_save_checkpoint`.
    #[default]
    Best,
    /// A latest state (`OUT/checkpoint-STEP`): the end of the run, or every `save_interval`.
    Latest,
    /// A latest state written because the run was asked to stop (Ctrl-C, SIGTERM).
    Interrupted,
}

/// One setting a resumed run changed from the value saved with its checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigChange {
    /// The [`TrainConfig`] field.
    pub field: String,
    /// The value saved in the checkpoint.
    pub saved: serde_json::Value,
    /// The value the run uses from now on.
    pub now: serde_json::Value,
    /// The step from which it applies.
    pub step: usize,
}

impl std::fmt::Display for ConfigChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} (saved) -> {} from step {}",
            self.field, self.saved, self.now, self.step
        )
    }
}

impl TrainerState {
    /// Reads `DIR/trainer_state.json`.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if it is missing, [`Error::BadFile`] if malformed.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        require_files(dir, &[files::TRAINER_STATE])?;
        let path = dir.join(files::TRAINER_STATE);
        let text = crate::data::read_utf8(&path)?;
        let state: Self = serde_json::from_str(&text).map_err(|e| Error::json(&path, None, &e))?;
        state.check(&path)?;
        Ok(state)
    }

    /// Refuses values no run writes: a step count past what AdamW's bias correction takes
    /// (`i32::MAX`), a negative or non-finite time, a non-finite best loss, an RNG state that
    /// does not parse.
    fn check(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Error::bad_file(path, None, msg);
        let limit = i32::MAX as usize;
        if self.step > limit || self.optimizer_steps.is_some_and(|s| s > limit) {
            return Err(bad(format!(
                "step {} (optimizer_steps {:?}) is past the {limit} steps a run can take",
                self.step, self.optimizer_steps
            )));
        }
        if !self.elapsed_s.is_finite() || self.elapsed_s < 0.0 {
            return Err(bad(format!(
                "elapsed_s must be a time in seconds (>= 0), got {}",
                self.elapsed_s
            )));
        }
        if self.best_val_loss.is_some_and(|v| !v.is_finite()) {
            return Err(bad(format!(
                "best_val_loss must be finite, got {:?}",
                self.best_val_loss
            )));
        }
        for (field, rng) in [("rng", &self.rng), ("eval_rng", &self.eval_rng)] {
            rng.restore().map_err(|e| bad(format!("{field}: {e}")))?;
        }
        Ok(())
    }

    /// Reads `DIR/trainer_state.json` of a run to be continued by the `stage` objective
    /// ([`Objective::stage`]), refusing a checkpoint another stage wrote (see
    /// [`TrainerState::check_stage`]).
    ///
    /// # Errors
    /// As [`TrainerState::load`]; [`Error::Checkpoint`] for a checkpoint of another stage.
    pub fn load_for_stage(dir: impl AsRef<Path>, stage: &str) -> Result<Self> {
        let dir = dir.as_ref();
        let state = Self::load(dir)?;
        state.check_stage(dir, stage)?;
        Ok(state)
    }

    /// Checks that this state, read from `dir`, was written by `stage`: resuming a checkpoint
    /// of one stage with another stage's objective would keep training the model on the wrong
    /// loss and compare its losses with a best loss of another kind. A state that records no
    /// stage passes.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] saying which stage the checkpoint is, which example continues
    /// it, and, where one stage starts from the other, how to start `stage` from it.
    pub fn check_stage(&self, dir: impl AsRef<Path>, stage: &str) -> Result<()> {
        if self.stage.is_empty() || self.stage == stage {
            return Ok(());
        }
        Err(Error::checkpoint(
            dir.as_ref(),
            stage_mismatch(&self.stage, stage, dir.as_ref()),
        ))
    }
}

/// Why a checkpoint of stage `found` cannot be resumed as `wanted`, and what to run instead.
fn stage_mismatch(found: &str, wanted: &str, dir: &Path) -> String {
    const EXAMPLES: [&str; 5] = ["pretrain", "sft", "reward", "dpo", "ppo"];
    let d = dir.display();
    let mut msg = format!("written by the `{found}` stage, not `{wanted}`");
    if EXAMPLES.contains(&found) {
        msg += &format!("; continue it with `{found} --resume {d}`");
    }
    let start = match (found, wanted) {
        ("pretrain", "sft") => Some(format!("`sft --base {d}`")),
        ("sft", "reward" | "dpo") => Some(format!("`{wanted} --sft {d}`")),
        ("sft", "ppo") => Some(format!("`ppo --sft {d} --reward REWARD_DIR`")),
        ("reward", "ppo") => Some(format!("`ppo --sft SFT_DIR --reward {d}`")),
        _ => None,
    };
    if let Some(start) = start {
        msg += &format!(", or start {wanted} from it with {start}");
    }
    msg
}

/// What happened, for progress bars and logs.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    /// One optimiser step finished (reported every `log_interval` steps and at the last; the
    /// same numbers go to `metrics.jsonl` as a `"kind": "train"` row).
    Step {
        /// Steps done.
        step: usize,
        /// Mean micro-batch loss of this step.
        loss: f64,
        /// Learning rate used.
        lr: f64,
        /// Global gradient norm before clipping.
        grad_norm: f64,
        /// Training throughput since the previous report.
        tokens_per_sec: f64,
    },
    /// An evaluation finished; the fields are those written to `metrics.jsonl`.
    Eval {
        /// The step evaluated.
        step: usize,
        /// Named metrics (`train_loss`, `val_loss`, `lr`, `tokens_per_sec`, `elapsed_s`, …).
        metrics: Vec<(String, f64)>,
    },
    /// A checkpoint was written.
    Checkpoint {
        /// Step it holds.
        step: usize,
        /// Where.
        dir: PathBuf,
    },
    /// A latest state was written (`OUT/checkpoint-STEP`).
    State {
        /// Step it holds.
        step: usize,
        /// Where.
        dir: PathBuf,
        /// Whether it was written because the run was asked to stop.
        interrupted: bool,
    },
    /// A step was skipped: nothing was updated (see the module docs).
    Skipped {
        /// The step's number (steps done after it).
        step: usize,
        /// Why (`"loss is NaN"`, `"gradient norm is inf"`, `"loss spike: z = 7.2"`).
        reason: String,
        /// Skipped steps in a row so far.
        in_a_row: usize,
    },
}

/// What [`Trainer::fit`] returns.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Steps done in total (including before a resume).
    pub steps: usize,
    /// Best validation loss, if any evaluation reported one.
    pub best_val_loss: Option<f64>,
    /// Training wall time, seconds (including before a resume; evaluations excluded).
    pub elapsed_s: f64,
    /// Training tokens per second over the whole run.
    pub tokens_per_sec: f64,
    /// Training tokens seen in all (including before a resume): what the objective counted
    /// for each micro-batch ([`Objective::train_loss`]).
    pub tokens_seen: u64,
    /// The last metrics line.
    pub last_metrics: Vec<(String, f64)>,
}

/// What one optimiser step did.
#[derive(Debug, Clone)]
pub struct StepStats {
    /// Mean micro-batch loss.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed.
    pub tokens: usize,
    /// Why the update was skipped (nothing was changed), if it was.
    pub skipped: Option<String>,
}

/// The training loop. See the module docs for the order of operations.
#[derive(Debug)]
pub struct Trainer {
    cfg: TrainConfig,
    opt: AdamW,
    state: TrainerState,
    out_dir: Option<PathBuf>,
    /// Whether `out_dir` holds this run's checkpoint (one written by this trainer, or the one
    /// it resumed from), so new metrics lines may be appended to it.
    out_dir_is_ours: bool,
    /// The checkpoint [`Trainer::resume_from`] read.
    resumed_from: Option<PathBuf>,
    metrics: Vec<String>,
    /// Whether the live `metrics.jsonl` holds rows [`Trainer::resume_from`] dropped (logged
    /// after its checkpoint), so the next write rewrites it rather than appends.
    metrics_file_stale: bool,
    rng: ChaCha8Rng,
    eval_rng: ChaCha8Rng,
    /// Raised to stop after the current step ([`Trainer::with_stop_flag`]).
    stop: Option<Arc<AtomicBool>>,
    /// The step and directory of the newest state on disk (written or resumed from).
    last_saved: Option<(usize, PathBuf)>,
    /// Settings of the caller's config that [`Trainer::resume_from`] replaced by the saved
    /// ones.
    ignored_on_resume: Vec<ConfigChange>,
    /// The spike detector's window (see [`TrainerState::spike_history`]).
    spike_history: VecDeque<(f64, f64)>,
    /// Whether `out_dir`'s latest states are another run's (one this run replaces), to be
    /// removed with this run's first checkpoint.
    foreign_states: bool,
}

impl Trainer {
    /// A trainer for `params` (from [`Objective::parameters`]) starting at step 0.
    ///
    /// # Errors
    /// [`Error::Config`] for invalid settings.
    pub fn new(cfg: TrainConfig, params: Vec<(String, Var)>) -> Result<Self> {
        cfg.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(cfg.seed);
        let eval_rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ EVAL_SEED);
        let opt = AdamW::new(params, cfg.adamw())?;
        Ok(Self {
            state: TrainerState {
                step: 0,
                best_val_loss: None,
                rng: RngState::of(&rng),
                eval_rng: RngState::of(&eval_rng),
                stage: String::new(),
                elapsed_s: 0.0,
                tokens_seen: 0,
                train_config: cfg.clone(),
                extra: serde_json::Value::Null,
                kind: StateKind::Best,
                pending_eval: false,
                optimizer_steps: None,
                skipped_steps: 0,
                bad_streak: 0,
                spike_history: Vec::new(),
                overrides: Vec::new(),
            },
            cfg,
            opt,
            out_dir: None,
            out_dir_is_ours: false,
            resumed_from: None,
            metrics: Vec::new(),
            metrics_file_stale: false,
            rng,
            eval_rng,
            stop: None,
            last_saved: None,
            ignored_on_resume: Vec::new(),
            spike_history: VecDeque::new(),
            foreign_states: false,
        })
    }

    /// A flag that, once raised, makes [`Trainer::fit`] stop after the optimiser step it is
    /// in: it writes the latest state (marked interrupted) and returns
    /// [`Error::Interrupted`]. [`crate::signals::StopSignal`] raises one on Ctrl-C and
    /// SIGTERM.
    pub fn with_stop_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.stop = Some(flag);
        self
    }

    /// Where checkpoints go (created when the first one is written). Without it nothing is
    /// saved. It must not exist, or be an empty directory, or a checkpoint directory (which the
    /// first new checkpoint replaces); [`Trainer::fit`] checks that before training.
    pub fn with_out_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.out_dir = Some(dir.into());
        self
    }

    /// Stage-specific facts to store in `trainer_state.json` (read back with
    /// [`TrainerState::load`]).
    pub fn with_extra(mut self, extra: serde_json::Value) -> Self {
        self.state.extra = extra;
        self
    }

    /// Continues the run saved in `dir`: optimiser moments and settings, step, best
    /// validation loss, RNG state, the skip detector, elapsed time and metrics. The model's
    /// weights must already have been loaded from the same directory (e.g. with
    /// [`crate::checkpoint::load_trainable`]); for a run's directory, take the newest state
    /// with [`crate::checkpoint::latest_state`].
    ///
    /// The settings that decide which steps the run takes ([`TrainConfig::RESTORED_ON_RESUME`]:
    /// optimiser, schedule, batches, seed) are the saved ones; where the config given to
    /// [`Trainer::new`] differs, those values are set aside ([`Trainer::ignored_on_resume`])
    /// and apply only through [`Trainer::override_config`]. The rest (`max_iters`, the
    /// evaluation and saving settings) are the caller's.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for missing files or files that differ from the checkpoint's
    /// manifest, [`Error::MissingTensor`] / [`Error::ShapeMismatch`] if the optimiser state
    /// does not fit the parameters; [`Error::Config`] if the saved settings are invalid.
    pub fn resume_from(mut self, dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        require_files(dir, &[files::OPTIMIZER, files::TRAINER_STATE])?;
        checkpoint::verify_only(dir, Some(&[files::OPTIMIZER, files::TRAINER_STATE]))?;
        self.resumed_from = Some(dir.to_path_buf());
        let state = TrainerState::load(dir)?;
        let (cfg, ignored) = resumed_config(&state.train_config, &self.cfg, state.step);
        cfg.validate().map_err(|e| {
            Error::checkpoint(
                dir.join(files::TRAINER_STATE),
                format!("its saved training settings are invalid: {e}"),
            )
        })?;
        self.opt.set_config(cfg.adamw())?;
        self.cfg = cfg;
        self.ignored_on_resume = ignored;
        let device = match self.opt.params().first() {
            Some((_, v)) => v.device().clone(),
            None => candle_core::Device::Cpu,
        };
        let opt_path = dir.join(files::OPTIMIZER);
        let moments = load_safetensors(&opt_path, &device)?;
        let optimizer_steps = state.optimizer_steps.unwrap_or(state.step);
        self.opt
            .load_state(&moments, optimizer_steps)
            .map_err(|e| match e {
                Error::MissingTensor { name, .. } => Error::MissingTensor {
                    name,
                    path: Some(opt_path.clone()),
                },
                Error::ShapeMismatch {
                    name,
                    expected,
                    got,
                    ..
                } => Error::ShapeMismatch {
                    name,
                    expected,
                    got,
                    path: Some(opt_path.clone()),
                },
                e => e,
            })?;
        self.rng = state.rng.restore()?;
        self.eval_rng = state.eval_rng.restore()?;
        let metrics_path = dir.join(files::METRICS);
        if metrics_path.is_file() {
            // A log: bytes that are not UTF-8 (a damaged line) are replaced, not fatal.
            let bytes = std::fs::read(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
            let text = String::from_utf8_lossy(&bytes);
            let mut lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            // A last line without its newline was cut off by a crash while it was appended.
            if !text.ends_with('\n') {
                lines.pop();
            }
            // Rows past the checkpoint's step were logged after it was saved: the resumed run
            // logs those steps again.
            self.metrics = lines
                .iter()
                .filter(|l| !row_is_after(l, state.step))
                .map(|l| l.to_string())
                .collect();
            self.metrics_file_stale = true;
        }
        if self.state.extra.is_null() {
            self.state.extra = state.extra.clone();
        }
        self.spike_history = state.spike_history.iter().copied().collect();
        self.last_saved = Some((state.step, dir.to_path_buf()));
        self.state = TrainerState {
            train_config: self.cfg.clone(),
            extra: self.state.extra.clone(),
            optimizer_steps: Some(optimizer_steps),
            ..state
        };
        Ok(self)
    }

    /// The caller's settings that [`Trainer::resume_from`] did not take, because they differ
    /// from those saved with the checkpoint (each with the saved value, which is in use).
    pub fn ignored_on_resume(&self) -> &[ConfigChange] {
        &self.ignored_on_resume
    }

    /// Replaces the run's settings with `cfg`, also those a resume restored from the
    /// checkpoint (a new learning rate or weight decay for the rest of a run, say). Each
    /// change to a [`TrainConfig::RESTORED_ON_RESUME`] field is returned, and recorded in the
    /// next checkpoint's `trainer_state.json` (`overrides`). The optimiser keeps its moments.
    ///
    /// # Errors
    /// [`Error::Config`] for invalid settings (nothing is changed then).
    pub fn override_config(&mut self, cfg: TrainConfig) -> Result<Vec<ConfigChange>> {
        cfg.validate()?;
        let changes = config_changes(&self.cfg, &cfg, self.state.step);
        self.opt.set_config(AdamWConfig {
            lr: self.opt.lr(),
            ..cfg.adamw()
        })?;
        self.cfg = cfg;
        self.state.train_config = self.cfg.clone();
        self.state.overrides.extend(changes.iter().cloned());
        self.ignored_on_resume.clear();
        Ok(changes)
    }

    /// The step the next iteration will take (0 for a new run).
    pub fn step(&self) -> usize {
        self.state.step
    }

    /// The learning rate at iteration `it` under this run's schedule.
    pub fn lr_at(&self, it: usize) -> f64 {
        self.cfg.schedule().lr_at(it)
    }

    /// Runs iterations from the current step to `max_iters` (see the module docs), calling
    /// `on_event` as things happen.
    ///
    /// With an output directory, it first takes the directory's lock (refusing to start while
    /// another process trains into it) and removes what a killed run left there.
    ///
    /// # Errors
    /// Before the first step, [`Error::Checkpoint`] if the run was resumed from a checkpoint
    /// of another stage than `objective`'s ([`TrainerState::check_stage`]), if another process
    /// holds the output directory's lock, or naming the output directory if checkpoints could
    /// not be written there (see [`CheckpointWriter::preflight`]). Then any error of the
    /// objective, the optimiser or checkpoint writing (a full disk names the path and the
    /// bytes needed; the previous checkpoint stays); [`Error::Training`] after
    /// `max_bad_steps` skipped steps in a row; [`Error::Interrupted`] when the stop flag was
    /// raised, after the latest state was saved.
    pub fn fit<O: Objective + ?Sized>(
        &mut self,
        objective: &mut O,
        mut on_event: impl FnMut(&TrainEvent),
    ) -> Result<TrainSummary> {
        if let Some(dir) = &self.resumed_from {
            self.state.check_stage(dir, objective.stage())?;
        }
        let _lock = match self.out_dir.clone() {
            Some(dir) => {
                let lock = DirLock::acquire(&lock_path(&dir))?;
                checkpoint::clean_stale(&dir)?;
                CheckpointWriter::preflight(&dir)?;
                checkpoint::check_space(&dir, self.checkpoint_bytes())?;
                let inside = self
                    .resumed_from
                    .as_ref()
                    .is_some_and(|from| same_path(from, &dir) || is_state_of(from, &dir));
                self.out_dir_is_ours |= inside;
                self.foreign_states = !inside;
                Some(lock)
            }
            None => None,
        };
        self.state.stage = objective.stage().to_string();
        let schedule = self.cfg.schedule();
        let start_step = self.state.step;
        let pending_eval = self.state.pending_eval;
        let mut last_metrics = Vec::new();
        let mut window_tokens = 0u64;
        let mut window_time = 0f64;
        let mut eval_window = (0u64, 0f64); // tokens and seconds since the last evaluation
        for it in start_step..=self.cfg.max_iters {
            let lr = schedule.lr_at(it);
            self.opt.set_lr(lr);
            let is_eval = it % self.cfg.eval_interval == 0 || it == self.cfg.max_iters;
            let eval_now = is_eval && (it != start_step || start_step == 0 || pending_eval);

            if self.stop_requested() && objective.resumable_here() {
                let saved = if it == start_step {
                    self.last_saved.as_ref().map(|(_, d)| d.clone())
                } else {
                    self.save_latest(
                        objective,
                        it,
                        StateKind::Interrupted,
                        eval_now,
                        &mut on_event,
                    )?
                };
                return Err(Error::Interrupted { step: it, saved });
            }

            if eval_now {
                let tps = if eval_window.1 > 0.0 {
                    eval_window.0 as f64 / eval_window.1
                } else {
                    0.0
                };
                last_metrics = self.evaluate(objective, it, lr, tps)?;
                eval_window = (0, 0.0);
                on_event(&TrainEvent::Eval {
                    step: it,
                    metrics: last_metrics.clone(),
                });
                let val = last_metrics
                    .iter()
                    .find(|(k, _)| k == "val_loss")
                    .map(|(_, v)| *v);
                let improved = match (val, self.state.best_val_loss) {
                    (Some(v), Some(best)) => v < best,
                    (Some(_), None) => true,
                    (None, _) => false,
                };
                if improved {
                    self.state.best_val_loss = val;
                }
                let save = it > 0 && (improved || self.cfg.always_save_checkpoint || val.is_none());
                if let (true, Some(dir)) = (save, self.out_dir.clone()) {
                    self.state.step = it;
                    self.save_state(objective, it, StateKind::Best, false)?;
                    on_event(&TrainEvent::Checkpoint { step: it, dir });
                } else {
                    self.append_metrics_line()?;
                }
            }
            let periodic = self.cfg.save_interval > 0
                && it % self.cfg.save_interval == 0
                && objective.resumable_here();
            if it > start_step && (periodic || it == self.cfg.max_iters) {
                self.save_latest(objective, it, StateKind::Latest, false, &mut on_event)?;
            }
            if it == self.cfg.max_iters {
                break;
            }

            // One optimiser step over `accum` micro-batches.
            let t0 = Instant::now();
            let StepStats {
                loss,
                grad_norm,
                tokens,
                skipped,
            } = self.optimizer_step(objective, it, lr)?;
            let dt = t0.elapsed().as_secs_f64();

            self.state.step = it + 1;
            self.state.elapsed_s += dt;
            self.state.tokens_seen += tokens as u64;
            window_tokens += tokens as u64;
            window_time += dt;
            eval_window.0 += tokens as u64;
            eval_window.1 += dt;
            if let Some(reason) = skipped {
                self.state.skipped_steps += 1;
                self.state.bad_streak += 1;
                self.metrics
                    .push(skip_row(self.state.step, &reason, loss, grad_norm));
                self.append_metrics_line()?;
                on_event(&TrainEvent::Skipped {
                    step: self.state.step,
                    reason: reason.clone(),
                    in_a_row: self.state.bad_streak,
                });
                if self.state.bad_streak >= self.cfg.max_bad_steps {
                    let n = self.state.bad_streak;
                    return Err(Error::Training(format!(
                        "{n} steps in a row were skipped (steps {} to {}, the last because the \
                         {reason}): lower lr, check the data, or raise max_bad_steps; nothing \
                         was saved for those steps{}",
                        self.state.step + 1 - n,
                        self.state.step,
                        match (&self.out_dir, &self.last_saved) {
                            (Some(_), Some((s, d))) => format!(
                                ", and the checkpoints are as they were (newest: step {s} in {})",
                                d.display()
                            ),
                            _ => String::new(),
                        }
                    )));
                }
            } else {
                self.state.bad_streak = 0;
            }
            if self.state.step.is_multiple_of(self.cfg.log_interval)
                || self.state.step == self.cfg.max_iters
            {
                let tokens_per_sec = window_tokens as f64 / window_time.max(1e-9);
                let mut fields = vec![
                    ("loss", loss),
                    ("lr", lr),
                    ("grad_norm", grad_norm),
                    ("tokens_per_sec", tokens_per_sec),
                    ("elapsed_s", self.state.elapsed_s),
                ];
                if let Some(fpt) = objective.flops_per_token() {
                    let gflops = fpt * tokens_per_sec / 1e9;
                    fields.push(("model_gflops", gflops));
                    if self.cfg.matmul_peak_gflops > 0.0 {
                        fields.push(("mfu", gflops / self.cfg.matmul_peak_gflops));
                    }
                }
                let row = metrics_row("train", self.state.step, &fields);
                self.metrics.push(row);
                self.append_metrics_line()?;
                on_event(&TrainEvent::Step {
                    step: self.state.step,
                    loss,
                    lr,
                    grad_norm,
                    tokens_per_sec,
                });
                window_tokens = 0;
                window_time = 0.0;
            }
        }
        self.state.step = self.cfg.max_iters.max(start_step);
        Ok(TrainSummary {
            steps: self.state.step,
            best_val_loss: self.state.best_val_loss,
            elapsed_s: self.state.elapsed_s,
            tokens_per_sec: self.state.tokens_seen as f64 / self.state.elapsed_s.max(1e-9),
            tokens_seen: self.state.tokens_seen,
            last_metrics,
        })
    }

    /// About the bytes one checkpoint takes on disk: the weights and AdamW's two moments
    /// (besides the old checkpoint, which stays until the new one is complete).
    fn checkpoint_bytes(&self) -> u64 {
        let param_bytes: u64 = self
            .opt
            .params()
            .iter()
            .map(|(_, v)| (v.elem_count() * v.dtype().size_in_bytes()) as u64)
            .sum();
        3 * param_bytes
    }

    /// Whether the stop flag is up.
    fn stop_requested(&self) -> bool {
        self.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst))
    }

    /// The newest state on disk, written or resumed from: its step and directory.
    pub fn last_saved(&self) -> Option<(usize, &Path)> {
        self.last_saved.as_ref().map(|(s, d)| (*s, d.as_path()))
    }

    /// Writes the latest state of step `it` (unless the newest state on disk is of that step
    /// already), then reports it. Returns where the newest state is; `None` without an output
    /// directory.
    fn save_latest<O: Objective + ?Sized>(
        &mut self,
        objective: &O,
        it: usize,
        kind: StateKind,
        pending_eval: bool,
        on_event: &mut impl FnMut(&TrainEvent),
    ) -> Result<Option<PathBuf>> {
        if self.out_dir.is_none() {
            return Ok(None);
        }
        if let Some((step, dir)) = &self.last_saved {
            if *step == it && !pending_eval {
                return Ok(Some(dir.clone()));
            }
        }
        self.state.step = it;
        let dir = self.save_state(objective, it, kind, pending_eval)?;
        on_event(&TrainEvent::State {
            step: it,
            dir: dir.clone(),
            interrupted: kind == StateKind::Interrupted,
        });
        Ok(Some(dir))
    }

    /// One optimiser step at iteration `it` with learning rate `lr`: gradients accumulated over
    /// `gradient_accumulation_steps` micro-batches (each loss divided by their number), the
    /// global norm clipped to `grad_clip`, one AdamW update. A non-finite loss or gradient
    /// norm, or (with `spike_zscore`) an outlying one, skips the update: no parameter or moment
    /// changes, and [`StepStats::skipped`] says why. Does not advance the step count or write
    /// anything: [`Trainer::fit`] does that around it. Public for benchmarks.
    ///
    /// # Errors
    /// Errors of the objective or the optimiser.
    pub fn optimizer_step<O: Objective + ?Sized>(
        &mut self,
        objective: &mut O,
        it: usize,
        lr: f64,
    ) -> Result<StepStats> {
        // The step runs on a worker of rayon's global pool, the pool candle's matmuls and our
        // kernels split their work over: a call from outside the pool would hand each matmul
        // to the pool and sleep until it is done (a futex wait and a wake-up per matmul, and
        // a third thread competing for the cores), where a worker runs its share itself.
        rayon::scope(|_| self.optimizer_step_here(objective, it, lr))
    }

    fn optimizer_step_here<O: Objective + ?Sized>(
        &mut self,
        objective: &mut O,
        _it: usize,
        lr: f64,
    ) -> Result<StepStats> {
        self.opt.set_lr(lr);
        let accum = self.cfg.gradient_accumulation_steps;
        let params = self.opt.params().to_vec();
        let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut loss_sum = 0f64;
        let mut tokens = 0usize;
        if !self.cfg.autograd {
            // The hand-written step where the objective has one: it says so at the first
            // micro-batch (drawing nothing when it has none).
            let scale = 1.0 / accum as f32;
            let mut done = 0;
            while done < accum {
                let Some(step) = objective.train_step_owned(&mut self.rng, scale, done == 0) else {
                    break;
                };
                let (value, n) = step?;
                loss_sum += value;
                tokens += n;
                done += 1;
            }
            if done > 0 && done < accum {
                return Err(Error::InvalidArgument(
                    "the hand-written step stopped applying".into(),
                ));
            }
            if done == accum {
                let grads = objective.owned_grads().ok_or_else(|| {
                    Error::InvalidArgument("the hand-written step kept no gradients".into())
                })?;
                if grads.len() != params.len() {
                    return Err(Error::InvalidArgument(format!(
                        "the hand-written step has {} gradients for {} parameters",
                        grads.len(),
                        params.len()
                    )));
                }
                return self.finish_step(loss_sum / accum as f64, tokens, Grads::Slices(grads));
            }
        }
        // Every micro-batch is drawn even when one is bad, so the batches of later steps do
        // not depend on whether a step was skipped.
        for _ in 0..accum {
            let (loss, n) = objective.train_loss(&mut self.rng)?;
            let value = loss.to_scalar::<f32>()? as f64;
            loss_sum += value;
            tokens += n;
            if !value.is_finite() {
                continue;
            }
            let loss = if accum > 1 {
                (loss / accum as f64)?
            } else {
                loss
            };
            let store = loss.backward()?;
            for ((_, var), acc) in params.iter().zip(grads.iter_mut()) {
                if let Some(g) = store.get(var.as_tensor()) {
                    let g = g.detach(); // keep no reference to this step's graph
                    *acc = Some(match acc.take() {
                        Some(a) => (a + g)?,
                        None => g,
                    });
                }
            }
        }
        let loss = loss_sum / accum as f64;
        let grads = params
            .iter()
            .zip(grads)
            .map(|((_, v), g)| match g {
                Some(g) => Ok(g),
                None => Ok(v.zeros_like()?),
            })
            .collect::<Result<Vec<_>>>()?;
        self.finish_step(loss, tokens, Grads::Tensors(grads))
    }

    /// Clipping, the spike test and the optimiser's update, after a step's gradients.
    fn finish_step(&mut self, loss: f64, tokens: usize, grads: Grads) -> Result<StepStats> {
        let skip = |reason: String| StepStats {
            loss,
            grad_norm: f64::NAN,
            tokens,
            skipped: Some(reason),
        };
        if !loss.is_finite() {
            return Ok(skip(format!("loss is {loss}")));
        }
        let max_norm = if self.cfg.grad_clip > 0.0 {
            self.cfg.grad_clip
        } else {
            f64::INFINITY
        };
        let (grad_norm, grad_scale) = match &grads {
            Grads::Tensors(g) => clip_grad_norm(g, max_norm)?,
            Grads::Slices(g) => clip_grad_norm_slices(g, max_norm),
        };
        if !grad_norm.is_finite() {
            return Ok(StepStats {
                grad_norm,
                ..skip(format!("gradient norm is {grad_norm}"))
            });
        }
        let spike = self.spike(loss, grad_norm);
        self.spike_history.push_back((loss, grad_norm));
        while self.spike_history.len() > self.cfg.spike_window {
            self.spike_history.pop_front();
        }
        if let Some(reason) = spike {
            return Ok(StepStats {
                grad_norm,
                ..skip(reason)
            });
        }
        match grads {
            Grads::Tensors(g) => self.opt.step(&g, grad_scale)?,
            Grads::Slices(g) => self.opt.step_slices(g, grad_scale)?,
        }
        Ok(StepStats {
            loss,
            grad_norm,
            tokens,
            skipped: None,
        })
    }

    /// llm.c's outlier test: the z-score of this step's loss and gradient norm against the
    /// previous `spike_window` steps, once that many have been seen; why to skip, if either
    /// exceeds `spike_zscore`.
    fn spike(&self, loss: f64, grad_norm: f64) -> Option<String> {
        let z_max = self.cfg.spike_zscore;
        let n = self.spike_history.len();
        if z_max <= 0.0 || n < self.cfg.spike_window || n < 2 {
            return None;
        }
        let z = |value: f64, pick: fn(&(f64, f64)) -> f64| {
            let mean = self.spike_history.iter().map(pick).sum::<f64>() / n as f64;
            let var = self
                .spike_history
                .iter()
                .map(|p| (pick(p) - mean).powi(2))
                .sum::<f64>()
                / n as f64;
            let std = var.sqrt();
            if std > 0.0 {
                (value - mean) / std
            } else {
                0.0
            }
        };
        let zl = z(loss, |p| p.0);
        let zg = z(grad_norm, |p| p.1);
        if zl > z_max {
            Some(format!("loss spiked: {loss:.4}, z = {zl:.1}"))
        } else if zg > z_max {
            Some(format!("gradient norm spiked: {grad_norm:.4}, z = {zg:.1}"))
        } else {
            None
        }
    }

    /// Runs the objective's evaluation and records a metrics line. As nanoGPT's
    /// `estimate_loss()`, every evaluation draws fresh random batches (from an RNG of its own,
    /// so evaluating never changes the training batches).
    fn evaluate<O: Objective + ?Sized>(
        &mut self,
        objective: &mut O,
        step: usize,
        lr: f64,
        tokens_per_sec: f64,
    ) -> Result<Vec<(String, f64)>> {
        let mut metrics = vec![("step".to_string(), step as f64)];
        // On a rayon worker, as the training steps (see `optimizer_step`).
        let (eval_iters, eval_rng) = (self.cfg.eval_iters, &mut self.eval_rng);
        metrics.extend(rayon::scope(|_| objective.evaluate(eval_iters, eval_rng))?);
        metrics.push(("lr".into(), lr));
        metrics.push(("tokens_per_sec".into(), tokens_per_sec));
        metrics.push(("elapsed_s".into(), self.state.elapsed_s));
        let fields: Vec<(&str, f64)> = metrics
            .iter()
            .filter(|(k, _)| k != "step")
            .map(|(k, v)| (k.as_str(), *v))
            .collect();
        self.metrics.push(metrics_row("eval", step, &fields));
        Ok(metrics)
    }

    /// Appends the newest metrics line to the live checkpoint's `metrics.jsonl` (if one exists
    /// yet; otherwise it is written with the first checkpoint).
    fn append_metrics_line(&mut self) -> Result<()> {
        let (Some(dir), Some(line)) = (&self.out_dir, self.metrics.last()) else {
            return Ok(());
        };
        // Only into this run's own checkpoint: not into one an earlier run left there.
        let path = dir.join(files::METRICS);
        if !self.out_dir_is_ours || !dir.join(files::TRAINER_STATE).is_file() {
            return Ok(());
        }
        if self.metrics_file_stale {
            let mut text = self.metrics.join("\n");
            text.push('\n');
            durable::write_atomic(&path, text.as_bytes())?;
            self.metrics_file_stale = false;
            return Ok(());
        }
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        writeln!(f, "{line}").map_err(|e| Error::io(&path, e))
    }

    /// Writes model, optimiser, trainer state and metrics, atomically: the best checkpoint
    /// into `OUT`, a latest state into `OUT/checkpoint-STEP` (then keeps the newest
    /// `keep_last`). Returns the directory written.
    fn save_state<O: Objective + ?Sized>(
        &mut self,
        objective: &O,
        step: usize,
        kind: StateKind,
        pending_eval: bool,
    ) -> Result<PathBuf> {
        let Some(out) = self.out_dir.clone() else {
            return Err(Error::InvalidArgument(
                "no output directory to save a checkpoint into".into(),
            ));
        };
        let target = match kind {
            StateKind::Best => out.clone(),
            _ => out.join(format!("{}{step}", files::STATE_PREFIX)),
        };
        if kind != StateKind::Best && !out.exists() {
            std::fs::create_dir_all(&out).map_err(|e| Error::io(&out, e))?;
            durable::sync_dir(&durable::parent_of(&out))?;
        }
        let needed = self.checkpoint_bytes();
        checkpoint::check_space(&target, needed)?;
        let full = |e: Error| disk_full(e, &target, needed);
        let writer = CheckpointWriter::begin(&target)?;
        let tmp = writer.path().to_path_buf();
        objective.save(&tmp).map_err(full)?;
        save_safetensors(&self.opt.state_tensors()?, tmp.join(files::OPTIMIZER)).map_err(full)?;
        self.state.step = step;
        self.state.kind = kind;
        self.state.pending_eval = pending_eval;
        self.state.optimizer_steps = Some(self.opt.step_count());
        self.state.spike_history = self.spike_history.iter().copied().collect();
        self.state.rng = RngState::of(&self.rng);
        self.state.eval_rng = RngState::of(&self.eval_rng);
        self.state.train_config = self.cfg.clone();
        let state_path = tmp.join(files::TRAINER_STATE);
        let json = serde_json::to_string_pretty(&self.state)
            .map_err(|e| Error::bad_file(&state_path, None, e.to_string()))?;
        std::fs::write(&state_path, json + "\n").map_err(|e| full(Error::io(&state_path, e)))?;
        let metrics_path = tmp.join(files::METRICS);
        let mut text = self.metrics.join("\n");
        text.push('\n');
        std::fs::write(&metrics_path, text).map_err(|e| full(Error::io(&metrics_path, e)))?;
        writer.commit().map_err(full)?;
        if self.foreign_states {
            // The states another run left in OUT: this run's first checkpoint replaces them.
            let keep = usize::from(kind != StateKind::Best); // the state just written
            checkpoint::prune_states(&out, keep, step)?;
            self.foreign_states = false;
        }
        if kind != StateKind::Best {
            checkpoint::prune_states(&out, self.cfg.keep_last, step)?;
        }
        if kind == StateKind::Best {
            self.out_dir_is_ours = true;
            self.metrics_file_stale = false;
        }
        self.last_saved = Some((step, target.clone()));
        Ok(target)
    }
}

/// A write error from a full disk, as a message naming the checkpoint, the space it needs and
/// that the previous checkpoint is untouched; other errors as they are.
fn disk_full(e: Error, target: &Path, needed: u64) -> Error {
    let full = |io: &std::io::Error| io.raw_os_error() == Some(28); // ENOSPC
    match &e {
        Error::Io { path, error } if full(error) => Error::checkpoint(
            target,
            format!(
                "the disk filled up while writing {} (a checkpoint needs about {}): free some \
                 space or choose another output directory; the previous checkpoint is untouched",
                path.display(),
                durable::human_bytes(needed)
            ),
        ),
        _ => e,
    }
}

/// The caller's config `now` on a resume of a checkpoint saved with `saved`: the saved values
/// of [`TrainConfig::RESTORED_ON_RESUME`], the caller's for the rest; and the caller's values
/// that were set aside.
fn resumed_config(
    saved: &TrainConfig,
    now: &TrainConfig,
    step: usize,
) -> (TrainConfig, Vec<ConfigChange>) {
    let ignored = config_changes(saved, now, step);
    let (Ok(serde_json::Value::Object(saved_v)), Ok(serde_json::Value::Object(mut now_v))) =
        (serde_json::to_value(saved), serde_json::to_value(now))
    else {
        return (saved.clone(), ignored);
    };
    for field in TrainConfig::RESTORED_ON_RESUME {
        if let Some(v) = saved_v.get(field) {
            now_v.insert(field.to_string(), v.clone());
        }
    }
    match serde_json::from_value(serde_json::Value::Object(now_v)) {
        Ok(cfg) => (cfg, ignored),
        Err(_) => (saved.clone(), ignored),
    }
}

/// The [`TrainConfig::RESTORED_ON_RESUME`] fields that differ from `from` to `to`.
fn config_changes(from: &TrainConfig, to: &TrainConfig, step: usize) -> Vec<ConfigChange> {
    let (Ok(a), Ok(b)) = (serde_json::to_value(from), serde_json::to_value(to)) else {
        return Vec::new();
    };
    TrainConfig::RESTORED_ON_RESUME
        .iter()
        .filter_map(|f| {
            let (x, y) = (a.get(*f)?, b.get(*f)?);
            (x != y).then(|| ConfigChange {
                field: f.to_string(),
                saved: x.clone(),
                now: y.clone(),
                step,
            })
        })
        .collect()
}

/// A `"kind": "skip"` row of `metrics.jsonl`.
fn skip_row(step: usize, reason: &str, loss: f64, grad_norm: f64) -> String {
    let num = |v: f64| {
        serde_json::Number::from_f64(v)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null)
    };
    serde_json::json!({
        "kind": "skip",
        "step": step,
        "reason": reason,
        "loss": num(loss),
        "grad_norm": num(grad_norm),
    })
    .to_string()
}

/// The path to lock for checkpoints written to `dir`: the directory a link names, so two
/// paths to one directory share one lock.
fn lock_path(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf())
}

/// Whether `from` is one of `dir`'s latest states (`dir/checkpoint-STEP`).
fn is_state_of(from: &Path, dir: &Path) -> bool {
    from.parent().is_some_and(|p| same_path(p, dir))
        && from
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with(files::STATE_PREFIX))
}

/// One `metrics.jsonl` line: `kind`, `step` (an integer), then `fields` (a non-finite value,
/// e.g. the grad norm with clipping off, is `null`).
fn metrics_row(kind: &str, step: usize, fields: &[(&str, f64)]) -> String {
    let mut line = serde_json::Map::new();
    line.insert("kind".into(), kind.into());
    line.insert("step".into(), step.into());
    for (k, v) in fields {
        let value = serde_json::Number::from_f64(*v)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null);
        line.insert((*k).to_string(), value);
    }
    serde_json::Value::Object(line).to_string()
}

/// Whether a `metrics.jsonl` line is a row of a step after `step` (lines that do not parse, or
/// have no step, are kept).
fn row_is_after(line: &str, step: usize) -> bool {
    serde_json::from_str::<serde_json::Value>(line)
        .ok()
        .and_then(|v| v.get("step")?.as_u64())
        .is_some_and(|s| s > step as u64)
}

/// Whether `a` and `b` name the same file or directory (their paths, if either cannot be
/// resolved).
fn same_path(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_state_round_trips_mid_stream() {
        use rand::Rng;
        let mut a = ChaCha8Rng::seed_from_u64(42);
        for _ in 0..37 {
            a.random::<u32>();
        }
        let saved = RngState::of(&a);
        let json = serde_json::to_string(&saved).unwrap();
        let mut b = serde_json::from_str::<RngState>(&json)
            .unwrap()
            .restore()
            .unwrap();
        for _ in 0..10 {
            assert_eq!(a.random::<u64>(), b.random::<u64>());
        }
    }

    #[test]
    fn a_stage_mismatch_names_both_stages_and_the_commands() {
        let mut state = TrainerState {
            step: 5,
            best_val_loss: Some(1.0),
            rng: RngState::of(&ChaCha8Rng::seed_from_u64(0)),
            eval_rng: RngState::of(&ChaCha8Rng::seed_from_u64(1)),
            stage: "sft".into(),
            elapsed_s: 0.0,
            tokens_seen: 0,
            train_config: TrainConfig::default(),
            extra: serde_json::Value::Null,
            kind: StateKind::Best,
            pending_eval: false,
            optimizer_steps: None,
            skipped_steps: 0,
            bad_streak: 0,
            spike_history: Vec::new(),
            overrides: Vec::new(),
        };
        assert!(state.check_stage("out/sft", "sft").is_ok());
        assert_eq!(
            state
                .check_stage("out/sft", "pretrain")
                .unwrap_err()
                .to_string(),
            "checkpoint out/sft: written by the `sft` stage, not `pretrain`; continue it with \
             `sft --resume out/sft`"
        );
        assert!(state
            .check_stage("out/sft", "dpo")
            .unwrap_err()
            .to_string()
            .ends_with("or start dpo from it with `dpo --sft out/sft`"));
        state.stage = "pretrain".into();
        assert_eq!(
            state.check_stage("out/p", "sft").unwrap_err().to_string(),
            "checkpoint out/p: written by the `pretrain` stage, not `sft`; continue it with \
             `pretrain --resume out/p`, or start sft from it with `sft --base out/p`"
        );
        state.stage = String::new();
        assert!(state.check_stage("old", "ppo").is_ok());
    }

    /// A tiny pre-training run into a temporary directory: its `metrics.jsonl` rows, and the
    /// directory (removed when dropped).
    fn tiny_run(cfg: TrainConfig) -> (Vec<serde_json::Value>, tempfile::TempDir) {
        use crate::{Pretraining, TokenDataset, Tokenizer};
        let text = "to be or not to be, that is the question. ".repeat(20);
        let tokenizer = Tokenizer::train_char(&text).unwrap();
        let data = TokenDataset::from_tokens(tokenizer.encode(&text).unwrap(), 0.2).unwrap();
        let model = crate::testing::tiny_gpt(tokenizer.vocab_size(), 8);
        let mut objective = Pretraining::new(model, tokenizer, data, 2).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ckpt");
        let mut trainer = Trainer::new(cfg, objective.parameters().unwrap())
            .unwrap()
            .with_out_dir(&out);
        let mut steps = Vec::new();
        trainer
            .fit(&mut objective, |e| {
                if let TrainEvent::Step { step, .. } = e {
                    steps.push(*step);
                }
            })
            .unwrap();
        let text = std::fs::read_to_string(out.join(files::METRICS)).unwrap();
        let rows: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let logged: Vec<usize> = rows
            .iter()
            .filter(|r| r["kind"] == "train")
            .map(|r| r["step"].as_u64().unwrap() as usize)
            .collect();
        assert_eq!(logged, steps, "a train row for every Step event");
        (rows, dir)
    }

    #[test]
    fn metrics_have_a_train_row_every_log_interval_and_eval_rows_as_before() {
        let cfg = TrainConfig {
            max_iters: 7,
            eval_interval: 3,
            eval_iters: 1,
            log_interval: 2,
            batch_size: 2,
            always_save_checkpoint: true,
            ..TrainConfig::default()
        };
        let (rows, _dir) = tiny_run(cfg);
        let kinds: Vec<(&str, u64)> = rows
            .iter()
            .map(|r| (r["kind"].as_str().unwrap(), r["step"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            kinds,
            [
                ("eval", 0),
                ("train", 2),
                ("eval", 3),
                ("train", 4),
                ("train", 6),
                ("eval", 6),
                ("train", 7), // the last step is always reported
                ("eval", 7),
            ]
        );
        let train = &rows[1];
        for key in ["loss", "lr", "grad_norm", "tokens_per_sec", "elapsed_s"] {
            assert!(
                train[key].as_f64().is_some_and(f64::is_finite),
                "{key}: {train}"
            );
        }
        assert!(train.get("val_loss").is_none());
        // Evaluation rows keep every field they had.
        let eval = &rows[2];
        for key in [
            "train_loss",
            "val_loss",
            "lr",
            "tokens_per_sec",
            "elapsed_s",
        ] {
            assert!(eval[key].as_f64().is_some(), "{key}: {eval}");
        }
        assert!(eval["step"].is_u64());
    }

    #[test]
    fn log_interval_zero_is_refused_and_rows_after_a_checkpoint_are_recognised() {
        let cfg = TrainConfig {
            log_interval: 0,
            ..Default::default()
        };
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "invalid config: log_interval must be at least 1, got 0"
        );
        assert!(row_is_after(r#"{"kind":"train","step":11}"#, 10));
        assert!(!row_is_after(r#"{"kind":"eval","step":10}"#, 10));
        assert!(!row_is_after("not json", 10));
        let row = metrics_row("train", 3, &[("loss", 1.5), ("grad_norm", f64::NAN)]);
        assert_eq!(
            row,
            r#"{"grad_norm":null,"kind":"train","loss":1.5,"step":3}"#
        );
    }

    #[test]
    fn config_validation_names_the_field() {
        let cfg = TrainConfig {
            batch_size: 0,
            ..Default::default()
        };
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "invalid config: batch_size must be at least 1, got 0"
        );
        let cfg = TrainConfig {
            lr: 1e-3,
            min_lr: 1.0,
            ..Default::default()
        };
        assert!(cfg
            .validate()
            .unwrap_err()
            .to_string()
            .contains("min_lr (1) must not exceed lr"));
    }

    /// A pre-training objective on a tiny model that, at the calls in `bad`, adds a term
    /// whose value is 0 and whose gradient is infinite (√(w − w) at 0), or, at `nan`, makes
    /// the loss NaN.
    struct Inject {
        inner: crate::Pretraining,
        calls: usize,
        bad_grad: Vec<usize>,
        nan: Vec<usize>,
        spike: Vec<usize>,
    }

    impl Objective for Inject {
        fn stage(&self) -> &str {
            self.inner.stage()
        }
        fn parameters(&self) -> Result<Vec<(String, Var)>> {
            self.inner.parameters()
        }
        fn train_loss(&mut self, rng: &mut ChaCha8Rng) -> Result<(Tensor, usize)> {
            let (loss, n) = self.inner.train_loss(rng)?;
            let call = self.calls;
            self.calls += 1;
            if self.bad_grad.contains(&call) {
                let (_, w) = &self.inner.parameters()?[0];
                let zero = (w.as_tensor() - w.as_tensor().detach())?;
                return Ok(((loss + zero.sqrt()?.sum_all()?)?, n));
            }
            if self.nan.contains(&call) {
                return Ok(((loss * f64::NAN)?, n));
            }
            if self.spike.contains(&call) {
                return Ok(((loss * 50.0)?, n));
            }
            Ok((loss, n))
        }
        fn evaluate(&mut self, i: usize, rng: &mut ChaCha8Rng) -> Result<Vec<(String, f64)>> {
            self.inner.evaluate(i, rng)
        }
        fn save(&self, dir: &Path) -> Result<()> {
            self.inner.save(dir)
        }
    }

    fn tiny_objective(bad_grad: Vec<usize>, nan: Vec<usize>) -> Inject {
        use crate::{Pretraining, TokenDataset, Tokenizer};
        let text = "to be or not to be, that is the question. ".repeat(20);
        let tokenizer = Tokenizer::train_char(&text).unwrap();
        let data = TokenDataset::from_tokens(tokenizer.encode(&text).unwrap(), 0.2).unwrap();
        let model = crate::testing::tiny_gpt(tokenizer.vocab_size(), 8);
        Inject {
            inner: Pretraining::new(model, tokenizer, data, 2).unwrap(),
            calls: 0,
            bad_grad,
            nan,
            spike: vec![],
        }
    }

    fn weights(o: &Inject) -> Vec<Vec<f32>> {
        o.parameters()
            .unwrap()
            .iter()
            .map(|(_, v)| {
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            })
            .collect()
    }

    fn small_cfg(max_iters: usize) -> TrainConfig {
        TrainConfig {
            max_iters,
            eval_interval: 3,
            eval_iters: 1,
            log_interval: 1,
            batch_size: 2,
            warmup_iters: 2,
            lr_decay_iters: max_iters,
            ..TrainConfig::default()
        }
    }

    #[test]
    fn a_bad_gradient_or_loss_skips_exactly_that_step() {
        for (bad_grad, nan) in [(vec![4], vec![]), (vec![], vec![4])] {
            let k = 4;
            // With the bad step: skipped by the guard.
            let mut a = tiny_objective(bad_grad, nan);
            let mut ta = Trainer::new(small_cfg(8), a.parameters().unwrap()).unwrap();
            let mut skipped = Vec::new();
            ta.fit(&mut a, |e| {
                if let TrainEvent::Skipped { step, reason, .. } = e {
                    skipped.push((*step, reason.clone()));
                }
            })
            .unwrap();
            assert_eq!(skipped.len(), 1, "{skipped:?}");
            assert_eq!(skipped[0].0, k + 1);
            assert!(
                skipped[0].1 == "gradient norm is inf" || skipped[0].1 == "loss is NaN",
                "{skipped:?}"
            );
            assert_eq!(ta.state.skipped_steps, 1);
            assert_eq!(ta.opt.step_count(), 7);
            // The reference: the same run by hand, step k drawing its batch and updating
            // nothing.
            let mut b = tiny_objective(vec![], vec![]);
            let mut tb = Trainer::new(small_cfg(8), b.parameters().unwrap()).unwrap();
            for it in 0..8 {
                let lr = tb.lr_at(it);
                if it == k {
                    b.train_loss(&mut tb.rng).unwrap();
                } else {
                    tb.optimizer_step(&mut b, it, lr).unwrap();
                }
            }
            assert_eq!(
                weights(&a),
                weights(&b),
                "weights equal the run without step k"
            );
        }
    }

    #[test]
    fn bad_steps_in_a_row_stop_the_run_and_leave_the_best_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ckpt");
        let mut o = tiny_objective(vec![3, 5], vec![4]);
        let cfg = TrainConfig {
            max_bad_steps: 3,
            always_save_checkpoint: true,
            ..small_cfg(10)
        };
        let mut t = Trainer::new(cfg, o.parameters().unwrap())
            .unwrap()
            .with_out_dir(&out);
        let mut best = None;
        let e = t
            .fit(&mut o, |e| {
                if let TrainEvent::Checkpoint { step, dir } = e {
                    best = Some((*step, std::fs::read(dir.join(files::MODEL)).unwrap()));
                }
            })
            .unwrap_err();
        assert!(matches!(e, Error::Training(_)), "{e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with("training stopped: 3 steps in a row were skipped (steps 4 to 6")
                && msg.contains("newest: step 3 in"),
            "{msg}"
        );
        let (step, bytes) = best.unwrap();
        assert_eq!(step, 3);
        assert_eq!(std::fs::read(out.join(files::MODEL)).unwrap(), bytes);
        assert_eq!(TrainerState::load(&out).unwrap().step, 3);
        assert!(checkpoint::verify(&out).unwrap());
        assert!(checkpoint::state_dirs(&out).unwrap().is_empty());
        let skips = std::fs::read_to_string(out.join(files::METRICS))
            .unwrap()
            .lines()
            .filter(|l| l.contains(r#""kind":"skip""#))
            .count();
        assert_eq!(skips, 3);
    }

    #[test]
    fn an_interrupt_saves_the_step_and_resume_reaches_the_uninterrupted_weights() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = small_cfg(12);
        // Uninterrupted.
        let full_out = dir.path().join("full");
        let mut full = tiny_objective(vec![], vec![]);
        let mut t = Trainer::new(cfg.clone(), full.parameters().unwrap())
            .unwrap()
            .with_out_dir(&full_out);
        t.fit(&mut full, |_| {}).unwrap();
        let end = checkpoint::latest_state(&full_out).unwrap();
        assert_eq!(TrainerState::load(&end).unwrap().step, 12);
        // Stopped after step 5 (the flag raised while step 5 ran, as a signal would).
        let out = dir.path().join("run");
        let stop = Arc::new(AtomicBool::new(false));
        let mut o = tiny_objective(vec![], vec![]);
        let mut t = Trainer::new(cfg.clone(), o.parameters().unwrap())
            .unwrap()
            .with_out_dir(&out)
            .with_stop_flag(Arc::clone(&stop));
        let e = t
            .fit(&mut o, |e| {
                if let TrainEvent::Step { step: 5, .. } = e {
                    stop.store(true, Ordering::SeqCst);
                }
            })
            .unwrap_err();
        let saved = out.join("checkpoint-5");
        match &e {
            Error::Interrupted {
                step: 5,
                saved: Some(p),
            } => assert_eq!(p, &saved),
            e => panic!("{e}"),
        }
        let state = TrainerState::load(&saved).unwrap();
        assert_eq!((state.step, state.kind), (5, StateKind::Interrupted));
        assert!(checkpoint::verify(&saved).unwrap());
        assert_eq!(checkpoint::latest_state(&out).unwrap(), saved);
        assert!(
            !dir.path().join(".run.lock").exists(),
            "the lock goes with the run"
        );
        // Resumed from the newest state: the same weights and the same rows as the full run.
        let from = checkpoint::latest_state(&out).unwrap();
        let (model, tok) =
            crate::checkpoint::load_trainable(&from, &candle_core::Device::Cpu).unwrap();
        let data_text = "to be or not to be, that is the question. ".repeat(20);
        let data = crate::TokenDataset::from_tokens(tok.encode(&data_text).unwrap(), 0.2).unwrap();
        let mut r = Inject {
            inner: crate::Pretraining::new(model, tok, data, 2).unwrap(),
            calls: 0,
            bad_grad: vec![],
            nan: vec![],
            spike: vec![],
        };
        let mut t = Trainer::new(cfg, r.parameters().unwrap())
            .unwrap()
            .with_out_dir(&out)
            .resume_from(&from)
            .unwrap();
        t.fit(&mut r, |_| {}).unwrap();
        assert_eq!(weights(&r), weights(&full));
        let end_r = checkpoint::latest_state(&out).unwrap();
        for f in [files::MODEL, files::OPTIMIZER] {
            assert_eq!(
                std::fs::read(end.join(f)).unwrap(),
                std::fs::read(end_r.join(f)).unwrap(),
                "{f}"
            );
        }
        let rows = |d: &Path| {
            std::fs::read_to_string(d.join(files::METRICS))
                .unwrap()
                .lines()
                .map(|l| {
                    let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                    for k in ["tokens_per_sec", "elapsed_s"] {
                        v.as_object_mut().unwrap().remove(k);
                    }
                    v
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(rows(&end), rows(&end_r));
        // keep_last 1: only the newest latest state is left.
        let states = checkpoint::state_dirs(&out).unwrap();
        assert!(states.len() <= 1, "{states:?}");
    }

    #[test]
    fn resume_takes_the_saved_optimiser_settings_unless_overridden() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ckpt");
        let cfg = TrainConfig {
            always_save_checkpoint: true,
            ..small_cfg(3)
        };
        let mut o = tiny_objective(vec![], vec![]);
        Trainer::new(cfg.clone(), o.parameters().unwrap())
            .unwrap()
            .with_out_dir(&out)
            .fit(&mut o, |_| {})
            .unwrap();
        let mine = TrainConfig {
            max_iters: 6,
            beta2: 0.95,
            weight_decay: 0.0,
            ..cfg.clone()
        };
        let mut t = Trainer::new(mine.clone(), o.parameters().unwrap())
            .unwrap()
            .resume_from(&out)
            .unwrap();
        assert_eq!(t.cfg.beta2, 0.99);
        assert_eq!(t.cfg.weight_decay, 0.1);
        assert_eq!(t.cfg.max_iters, 6, "max_iters is the caller's");
        assert_eq!(t.opt.config().beta2, 0.99);
        let ignored: Vec<String> = t
            .ignored_on_resume()
            .iter()
            .map(|c| c.to_string())
            .collect();
        assert_eq!(
            ignored,
            [
                "beta2: 0.99 (saved) -> 0.95 from step 3",
                "weight_decay: 0.1 (saved) -> 0.0 from step 3"
            ]
        );
        let changes = t.override_config(mine).unwrap();
        assert_eq!(changes.len(), 2);
        assert_eq!(t.opt.config().beta2, 0.95);
        assert_eq!(t.state.overrides, changes);
        assert!(t.ignored_on_resume().is_empty());
    }

    #[test]
    fn a_second_trainer_into_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("ckpt");
        let held = DirLock::acquire(&out).unwrap();
        let mut o = tiny_objective(vec![], vec![]);
        let e = Trainer::new(small_cfg(2), o.parameters().unwrap())
            .unwrap()
            .with_out_dir(&out)
            .fit(&mut o, |_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("another run") && e.contains(".ckpt.lock"), "{e}");
        drop(held);
    }

    #[test]
    fn a_full_disk_is_named_with_the_bytes_needed() {
        let io = Error::io(
            "out/.ckpt.tmp-1/model.safetensors",
            std::io::Error::from_raw_os_error(28),
        );
        let e = disk_full(io, Path::new("out/ckpt"), 38_569_912).to_string();
        assert_eq!(
            e,
            "checkpoint out/ckpt: the disk filled up while writing \
             out/.ckpt.tmp-1/model.safetensors (a checkpoint needs about 38.6 MB): free some \
             space or choose another output directory; the previous checkpoint is untouched"
        );
        let other = Error::io("x", std::io::Error::from_raw_os_error(13));
        assert!(matches!(
            disk_full(other, Path::new("o"), 1),
            Error::Io { .. }
        ));
    }

    #[test]
    fn a_loss_spike_is_skipped_once_the_window_is_full() {
        let cfg = TrainConfig {
            spike_zscore: 6.0,
            spike_window: 8,
            ..small_cfg(16)
        };
        // A spike at call 4 comes before the window is full: trained on. At 13, once it has
        // left the window: skipped.
        let mut o = tiny_objective(vec![], vec![]);
        o.spike = vec![4, 13];
        let mut t = Trainer::new(cfg, o.parameters().unwrap()).unwrap();
        let mut skipped = Vec::new();
        t.fit(&mut o, |e| {
            if let TrainEvent::Skipped { step, reason, .. } = e {
                skipped.push((*step, reason.clone()));
            }
        })
        .unwrap();
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].0, 14);
        assert!(skipped[0].1.starts_with("loss spiked: "), "{skipped:?}");
        assert_eq!(t.opt.step_count(), 15);
        assert_eq!(t.spike_history.len(), 8);
    }
}
