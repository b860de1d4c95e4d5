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
//!   `elapsed_s`.
//!
//! Readers that want the evaluations filter on `"kind"` (rows written before it existed are all
//! evaluations).

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{
    files, load_safetensors, require_files, save_safetensors, CheckpointWriter,
};
use crate::optim::{clip_grad_norm, AdamW, AdamWConfig, LrSchedule};
use crate::{Error, Result};

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
        Ok(())
    }

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
        let bad = || Error::InvalidArgument(format!("malformed RNG state {self:?}"));
        if self.seed.len() != 64 {
            return Err(bad());
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(self.seed.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos.parse().map_err(|_| bad())?);
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
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::json(&path, None, &e))
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
    /// The last metrics line.
    pub last_metrics: Vec<(String, f64)>,
}

/// What one optimiser step did.
#[derive(Debug, Clone, Copy)]
pub struct StepStats {
    /// Mean micro-batch loss.
    pub loss: f64,
    /// Global gradient norm before clipping (NaN when clipping is off).
    pub grad_norm: f64,
    /// Tokens processed.
    pub tokens: usize,
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
        })
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

    /// Continues the run saved in `dir`: optimiser moments, step, best validation loss, RNG
    /// state, elapsed time and metrics. The model's weights must already have been loaded
    /// from the same directory (e.g. with [`crate::checkpoint::load_trainable`]).
    ///
    /// # Errors
    /// [`Error::Checkpoint`] for missing files, [`Error::MissingTensor`] /
    /// [`Error::ShapeMismatch`] if the optimiser state does not fit the parameters.
    pub fn resume_from(mut self, dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        require_files(dir, &[files::OPTIMIZER, files::TRAINER_STATE])?;
        self.resumed_from = Some(dir.to_path_buf());
        let state = TrainerState::load(dir)?;
        let device = match self.opt.params().first() {
            Some((_, v)) => v.device().clone(),
            None => candle_core::Device::Cpu,
        };
        let opt_path = dir.join(files::OPTIMIZER);
        let moments = load_safetensors(&opt_path, &device)?;
        self.opt
            .load_state(&moments, state.step)
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
            let text =
                std::fs::read_to_string(&metrics_path).map_err(|e| Error::io(&metrics_path, e))?;
            let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
            // Rows past the checkpoint's step were logged after it was saved: the resumed run
            // logs those steps again.
            self.metrics = lines
                .iter()
                .filter(|l| !row_is_after(l, state.step))
                .map(|l| l.to_string())
                .collect();
            self.metrics_file_stale = self.metrics.len() != lines.len();
        }
        if self.state.extra.is_null() {
            self.state.extra = state.extra.clone();
        }
        self.state = TrainerState {
            train_config: self.cfg.clone(),
            extra: self.state.extra.clone(),
            ..state
        };
        Ok(self)
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
    /// # Errors
    /// Before the first step, [`Error::Checkpoint`] if the run was resumed from a checkpoint
    /// of another stage than `objective`'s ([`TrainerState::check_stage`]), or naming the
    /// output directory if checkpoints could not be written there (see
    /// [`CheckpointWriter::preflight`]). Then any error of the objective, the optimiser or
    /// checkpoint writing; a NaN or infinite loss stops training with
    /// [`Error::InvalidArgument`] (nothing is saved for that step).
    pub fn fit<O: Objective + ?Sized>(
        &mut self,
        objective: &mut O,
        mut on_event: impl FnMut(&TrainEvent),
    ) -> Result<TrainSummary> {
        if let Some(dir) = &self.resumed_from {
            self.state.check_stage(dir, objective.stage())?;
        }
        if let Some(dir) = &self.out_dir {
            CheckpointWriter::preflight(dir)?;
            if let Some(from) = &self.resumed_from {
                self.out_dir_is_ours |= same_path(from, dir);
            }
        }
        self.state.stage = objective.stage().to_string();
        let schedule = self.cfg.schedule();
        let start_step = self.state.step;
        let mut last_metrics = Vec::new();
        let mut window_tokens = 0u64;
        let mut window_time = 0f64;
        let mut eval_window = (0u64, 0f64); // tokens and seconds since the last evaluation
        for it in start_step..=self.cfg.max_iters {
            let lr = schedule.lr_at(it);
            self.opt.set_lr(lr);

            let is_eval = it % self.cfg.eval_interval == 0 || it == self.cfg.max_iters;
            if is_eval && (it != start_step || start_step == 0) {
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
                    self.save_checkpoint(objective, &dir)?;
                    on_event(&TrainEvent::Checkpoint { step: it, dir });
                } else {
                    self.append_metrics_line()?;
                }
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
            } = self.optimizer_step(objective, it, lr)?;
            let dt = t0.elapsed().as_secs_f64();

            self.state.step = it + 1;
            self.state.elapsed_s += dt;
            self.state.tokens_seen += tokens as u64;
            window_tokens += tokens as u64;
            window_time += dt;
            eval_window.0 += tokens as u64;
            eval_window.1 += dt;
            if self.state.step.is_multiple_of(self.cfg.log_interval)
                || self.state.step == self.cfg.max_iters
            {
                let tokens_per_sec = window_tokens as f64 / window_time.max(1e-9);
                let row = metrics_row(
                    "train",
                    self.state.step,
                    &[
                        ("loss", loss),
                        ("lr", lr),
                        ("grad_norm", grad_norm),
                        ("tokens_per_sec", tokens_per_sec),
                        ("elapsed_s", self.state.elapsed_s),
                    ],
                );
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
            last_metrics,
        })
    }

    /// One optimiser step at iteration `it` with learning rate `lr`: gradients accumulated over
    /// `gradient_accumulation_steps` micro-batches (each loss divided by their number), the
    /// global norm clipped to `grad_clip`, one AdamW update. Does not advance the step count
    /// or write anything: [`Trainer::fit`] does that around it. Public for benchmarks.
    ///
    /// # Errors
    /// Errors of the objective or the optimiser; a NaN or infinite loss is
    /// [`Error::InvalidArgument`] (the parameters are then left as they were).
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
        it: usize,
        lr: f64,
    ) -> Result<StepStats> {
        self.opt.set_lr(lr);
        let accum = self.cfg.gradient_accumulation_steps;
        let params = self.opt.params().to_vec();
        let mut grads: Vec<Option<Tensor>> = vec![None; params.len()];
        let mut loss_sum = 0f64;
        let mut tokens = 0usize;
        for _ in 0..accum {
            let (loss, n) = objective.train_loss(&mut self.rng)?;
            let value = loss.to_scalar::<f32>()? as f64;
            if !value.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "training loss is {value} at step {it}: lower lr or check the data"
                )));
            }
            loss_sum += value;
            tokens += n;
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
        let grads = params
            .iter()
            .zip(grads)
            .map(|((_, v), g)| match g {
                Some(g) => Ok(g),
                None => Ok(v.zeros_like()?),
            })
            .collect::<Result<Vec<_>>>()?;
        let (grad_norm, grad_scale) = if self.cfg.grad_clip > 0.0 {
            clip_grad_norm(&grads, self.cfg.grad_clip)?
        } else {
            (f64::NAN, 1.0)
        };
        self.opt.step(&grads, grad_scale)?;
        Ok(StepStats {
            loss: loss_sum / accum as f64,
            grad_norm,
            tokens,
        })
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
            std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
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

    /// Writes model, optimiser, trainer state and metrics into `dir`, atomically.
    fn save_checkpoint<O: Objective + ?Sized>(&mut self, objective: &O, dir: &Path) -> Result<()> {
        let writer = CheckpointWriter::begin(dir)?;
        let tmp = writer.path().to_path_buf();
        objective.save(&tmp)?;
        save_safetensors(&self.opt.state_tensors()?, tmp.join(files::OPTIMIZER))?;
        self.state.rng = RngState::of(&self.rng);
        self.state.eval_rng = RngState::of(&self.eval_rng);
        self.state.train_config = self.cfg.clone();
        let state_path = tmp.join(files::TRAINER_STATE);
        let json = serde_json::to_string_pretty(&self.state)
            .map_err(|e| Error::bad_file(&state_path, None, e.to_string()))?;
        std::fs::write(&state_path, json + "\n").map_err(|e| Error::io(&state_path, e))?;
        let metrics_path = tmp.join(files::METRICS);
        let mut text = self.metrics.join("\n");
        text.push('\n');
        std::fs::write(&metrics_path, text).map_err(|e| Error::io(&metrics_path, e))?;
        writer.commit()?;
        self.out_dir_is_ours = true;
        self.metrics_file_stale = false;
        Ok(())
    }
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
}
