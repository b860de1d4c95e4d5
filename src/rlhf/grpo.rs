//! Group Relative Policy Optimization on rewards a program computes.
//!
//! GRPO (Shao et al. 2024, "DeepSeekMath", §4.1) is PPO without the value head and without a
//! learned reward model: the baseline of a completion is the mean reward of the other
//! completions of the same prompt. With a reward a program can check (the number after `####`
//! equals the known answer), it needs no preference data at all. This implementation follows
//! the paper with the changes TRL's `GRPOTrainer` now makes by default, after DAPO (Yu et al.
//! 2025) and Dr. GRPO (Liu et al. 2025). One **iteration**:
//!
//! 1. **Rollout.** Draw `prompts_per_iteration` prompts; the policy samples
//!    [`GrpoConfig::num_generations`] (`G`) completions of each at temperature 1 with no
//!    filtering, stopping at `<|end|>` or after `max_new_tokens`. Each completion's text (up to
//!    its `<|end|>`) is scored by the reward function, a plain Rust closure over the prompt and
//!    the completion ([`RewardFn`]). With no graph, record per completion token the policy's
//!    `log π_old(a_t)` and the frozen reference's `log π_ref(a_t)`.
//! 2. **Truncation.** A completion cut at `max_new_tokens` is kept, left out of the loss (TRL's
//!    `mask_truncated_completions`, DAPO's overlong filtering) or has a penalty added to its
//!    reward, by [`GrpoConfig::truncated`].
//! 3. **Advantages.** Per group, `A_i = r_i − mean(r)`, divided by `std(r) + 1e-4` (the
//!    unbiased standard deviation, as TRL) when `scale_rewards` is on; every token of a
//!    completion gets its `A_i`. A group whose rewards are all equal has `A = 0` everywhere: it
//!    carries no gradient, so it is skipped, and counted (`zero_std_fraction`).
//! 4. **Optimisation.** `grpo_epochs` passes (the paper's μ, TRL's `num_iterations`) over the
//!    completions kept, split evenly into [`GrpoConfig::minibatches`] minibatches (a fixed
//!    random partition, visited in a fresh random order each epoch after the first). Per
//!    minibatch, with `ρ_t = exp(log π(a_t) − log π_old(a_t))` and DAPO's separate clip range
//!    `[1 − ε_low, 1 + ε_high]`, the loss is normalised over tokens (DAPO's token-level loss,
//!    not the paper's mean of per-sequence means):
//!    `L = Σ_t [max(−A ρ_t, −A clip(ρ_t)) + β KL_t] / Σ_t 1` over the minibatch's completion
//!    tokens, with `KL_t = exp(q_t) − q_t − 1`, `q_t = log π_ref(a_t) − log π(a_t)` (the
//!    paper's unbiased k3 estimator of KL(π ‖ π_ref), Schulman 2020). `β = kl_coef` is 0 by
//!    default, as in TRL since DAPO: the reference then only measures the drift.
//!
//! **How it runs in the shared [`crate::Trainer`]**, as [`crate::Ppo`] does: one trainer step is
//! one minibatch step; when the rollout is used up, [`Objective::train_loss`] first collects the
//! next with the trainer's RNG, so an iteration is [`GrpoConfig::steps_per_iteration`] steps
//! whatever was skipped (a minibatch left with no completion is a step with zero loss and zero
//! gradient). The old log-probabilities come from the same code on the same padded batch as the
//! new ones, with dropout off in every pass, so on the first minibatch of an iteration the
//! ratio is exactly 1. [`Objective::evaluate`] reports the last complete iteration
//! ([`GrpoStats::metrics`]); GRPO reports no `val_loss`, so the trainer checkpoints at every
//! evaluation, and only between iterations ([`Objective::resumable_here`]).
//!
//! A GRPO checkpoint is the policy's model directory plus [`Grpo::STATE_FILE`]
//! (`grpo_state.json`: the iteration count and the last iteration's statistics).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::chat::{reply_text, ChatTemplate, Message};
use crate::checkpoint::{load_model, load_trainable, save_model};
use crate::model::Gpt;
use crate::rlhf::data::SequenceBatch;
use crate::rlhf::dpo::check_reference;
use crate::rlhf::logprobs::response_logprobs;
use crate::rlhf::ppo::sample_responses;
use crate::tokenizer::Tokenizer;
use crate::train::Objective;
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Settings, prompts and rewards
// ---------------------------------------------------------------------------------------------

/// What happens to a completion cut at `max_new_tokens` (one that did not end its turn).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Truncated {
    /// Scored and trained on like any other.
    Keep,
    /// Scored (it counts in its group's mean and std) but left out of the loss: TRL's
    /// `mask_truncated_completions`, DAPO's overlong filtering.
    Mask,
    /// This amount (usually negative) added to its reward.
    Penalty(f64),
}

/// GRPO's settings, with TRL's names where it has them and its defaults where they fit a tiny
/// model on two cores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GrpoConfig {
    /// Prompts per iteration. Default 8.
    pub prompts_per_iteration: usize,
    /// Completions sampled per prompt, the group size `G`. Default 8.
    pub num_generations: usize,
    /// Completions per minibatch (the largest; the ones kept are split evenly). Default 16.
    pub minibatch_size: usize,
    /// Passes over each rollout: the paper's μ, TRL's `num_iterations`. Default 1.
    pub grpo_epochs: usize,
    /// The longest completion sampled, in tokens. Default 32.
    pub max_new_tokens: usize,
    /// Lower clip range: the ratio is clipped below at `1 − epsilon_low`. Default 0.2.
    pub epsilon_low: f64,
    /// Upper clip range: the ratio is clipped above at `1 + epsilon_high`. Default 0.28
    /// (DAPO's "clip-higher").
    pub epsilon_high: f64,
    /// The KL coefficient β of the k3 penalty to the reference. Default 0 (TRL's).
    pub kl_coef: f64,
    /// Divide each group's advantages by its reward standard deviation (the paper's; Dr. GRPO
    /// argues against it). Default true.
    pub scale_rewards: bool,
    /// Completions cut at `max_new_tokens`. Default [`Truncated::Keep`].
    pub truncated: Truncated,
}

impl Default for GrpoConfig {
    fn default() -> Self {
        Self {
            prompts_per_iteration: 8,
            num_generations: 8,
            minibatch_size: 16,
            grpo_epochs: 1,
            max_new_tokens: 32,
            epsilon_low: 0.2,
            epsilon_high: 0.28,
            kl_coef: 0.0,
            scale_rewards: true,
            truncated: Truncated::Keep,
        }
    }
}

impl GrpoConfig {
    /// Checks the values make sense.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("prompts_per_iteration", self.prompts_per_iteration),
            ("minibatch_size", self.minibatch_size),
            ("grpo_epochs", self.grpo_epochs),
            ("max_new_tokens", self.max_new_tokens),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("{name} must be at least 1, got 0")));
            }
        }
        if self.num_generations < 2 {
            return Err(Error::Config(format!(
                "num_generations must be at least 2 (a group needs a baseline), got {}",
                self.num_generations
            )));
        }
        for (name, v) in [
            ("epsilon_low", self.epsilon_low),
            ("epsilon_high", self.epsilon_high),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(Error::Config(format!("{name} must be > 0, got {v}")));
            }
        }
        if self.epsilon_low >= 1.0 {
            return Err(Error::Config(format!(
                "epsilon_low must be below 1, got {}",
                self.epsilon_low
            )));
        }
        if !(self.kl_coef >= 0.0 && self.kl_coef.is_finite()) {
            return Err(Error::Config(format!(
                "kl_coef must be >= 0, got {}",
                self.kl_coef
            )));
        }
        if let Truncated::Penalty(p) = self.truncated {
            if !p.is_finite() {
                return Err(Error::Config(format!(
                    "truncated penalty must be finite, got {p}"
                )));
            }
        }
        Ok(())
    }

    /// Completions per iteration: `prompts_per_iteration × num_generations`.
    pub fn completions(&self) -> usize {
        self.prompts_per_iteration * self.num_generations
    }

    /// Minibatches per rollout: `ceil(completions / minibatch_size)`.
    pub fn minibatches(&self) -> usize {
        self.completions().div_ceil(self.minibatch_size.max(1))
    }

    /// Trainer steps per iteration: `grpo_epochs × minibatches`.
    pub fn steps_per_iteration(&self) -> usize {
        self.grpo_epochs * self.minibatches()
    }
}

/// A prompt with what its reward function needs to check a completion: the conversation
/// (ending with a user turn) and the known answer (for GSM8K, the number after `####` of the
/// reference solution).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrpoPrompt {
    /// The conversation so far, ending with a user turn.
    pub messages: Vec<Message>,
    /// The answer a reward function checks completions against.
    pub answer: String,
}

/// A reward function: the prompt and a completion's text (decoded up to its `<|end|>`, as
/// [`reply_text`] shows it) to a reward. Any finite value; for a 0/1 correctness reward,
/// [`GrpoStats::accuracy`] is the share correct.
pub type RewardFn = Arc<dyn Fn(&GrpoPrompt, &str) -> f64 + Send + Sync>;

/// Group-relative advantages of `rewards` laid out as consecutive groups of `group` (step 3
/// of the module docs): `r_i − mean`, divided by `std + 1e-4` (unbiased) when `scale`. Also
/// returns, per group, whether all its rewards are equal (no gradient).
///
/// # Errors
/// [`Error::InvalidArgument`] if `group < 2` or `rewards.len()` is not a multiple of it.
pub fn group_advantages(
    rewards: &[f64],
    group: usize,
    scale: bool,
) -> Result<(Vec<f64>, Vec<bool>)> {
    if group < 2 || rewards.len() % group != 0 {
        return Err(Error::InvalidArgument(format!(
            "{} rewards do not make groups of {group} (at least 2 each)",
            rewards.len()
        )));
    }
    let mut advantages = Vec::with_capacity(rewards.len());
    let mut flat = Vec::with_capacity(rewards.len() / group);
    for g in rewards.chunks(group) {
        let mean = g.iter().sum::<f64>() / group as f64;
        let var = g.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (group - 1) as f64;
        let equal = g.iter().all(|&r| r == g[0]);
        let div = if scale { var.sqrt() + 1e-4 } else { 1.0 };
        advantages.extend(
            g.iter()
                .map(|&r| if equal { 0.0 } else { (r - mean) / div }),
        );
        flat.push(equal);
    }
    Ok((advantages, flat))
}

// ---------------------------------------------------------------------------------------------
// Statistics and state
// ---------------------------------------------------------------------------------------------

/// Statistics of one minibatch step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GrpoMinibatchStats {
    /// The clipped surrogate loss (without the KL term).
    pub policy_loss: f64,
    /// Mean per-token k3 KL(π ‖ π_ref), nats.
    pub kl: f64,
    /// Fraction of tokens whose ratio lies outside `[1 − ε_low, 1 + ε_high]` where clipping
    /// binds (ratio below with a negative advantage, above with a positive one).
    pub clip_fraction: f64,
    /// Smallest ratio `ρ_t`.
    pub ratio_min: f64,
    /// Largest ratio `ρ_t`.
    pub ratio_max: f64,
    /// Completions in the minibatch.
    pub completions: usize,
    /// Completion tokens in the minibatch.
    pub tokens: usize,
}

/// Statistics of one iteration: its rollout and its optimisation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GrpoStats {
    /// 0-based iteration index.
    pub iteration: usize,
    /// Mean reward over every completion sampled (after any truncation penalty).
    pub reward_mean: f64,
    /// Standard deviation of the rewards over every completion.
    pub reward_std: f64,
    /// Share of completions with a positive reward.
    pub accuracy: f64,
    /// Mean per-token k3 KL(π_old ‖ π_ref) at collection, nats.
    pub kl: f64,
    /// Mean completion length in tokens (`<|end|>` not counted).
    pub response_length: f64,
    /// Share of completions cut at `max_new_tokens`.
    pub truncated: f64,
    /// Share of groups whose rewards were all equal (skipped).
    pub zero_std_fraction: f64,
    /// Completions trained on.
    pub completions_trained: usize,
    /// Mean clipped surrogate loss over the iteration's minibatch steps with completions.
    pub policy_loss: f64,
    /// Mean clip fraction over the same steps.
    pub clip_fraction: f64,
}

impl GrpoStats {
    /// The statistics as `metrics.jsonl` fields.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        [
            ("iteration", self.iteration as f64),
            ("reward_mean", self.reward_mean),
            ("reward_std", self.reward_std),
            ("accuracy", self.accuracy),
            ("kl", self.kl),
            ("response_length", self.response_length),
            ("truncated", self.truncated),
            ("zero_std_fraction", self.zero_std_fraction),
            ("completions_trained", self.completions_trained as f64),
            ("policy_loss", self.policy_loss),
            ("clip_fraction", self.clip_fraction),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

/// What `grpo_state.json` holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GrpoState {
    /// Iterations completed.
    pub iteration: usize,
    /// The statistics of the last complete iteration.
    #[serde(default)]
    pub last_iteration: Option<GrpoStats>,
}

impl GrpoState {
    /// Reads [`Grpo::STATE_FILE`] from a checkpoint directory.
    ///
    /// # Errors
    /// [`Error::Io`] or [`Error::BadFile`] naming the file.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join(Grpo::STATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::json(&path, None, &e))
    }
}

// ---------------------------------------------------------------------------------------------
// The rollout buffer
// ---------------------------------------------------------------------------------------------

/// One minibatch of a rollout, recorded at collection time (no graphs).
#[derive(Debug)]
struct Minibatch {
    batch: SequenceBatch,
    old_logprobs: Tensor, // (b, T-1), zero outside the completion
    ref_logprobs: Tensor, // (b, T-1), zero outside the completion
    advantages: Tensor,   // (b, T-1), the row's A on its completion tokens, zero elsewhere
    signs: Vec<f32>,      // per row, the sign of its advantage (for the clip fraction)
}

#[derive(Debug)]
struct Rollout {
    minibatches: Vec<Option<Minibatch>>,
    order: Vec<usize>,
    epoch: usize,
    pos: usize,
    stats: GrpoStats,
    trained_steps: usize, // minibatch steps with completions
}

impl Rollout {
    fn done(&self, epochs: usize) -> bool {
        self.epoch >= epochs
    }
}

// ---------------------------------------------------------------------------------------------
// The objective
// ---------------------------------------------------------------------------------------------

/// The GRPO [`Objective`] (see the module docs).
pub struct Grpo {
    policy: Gpt,
    reference: Gpt,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    prompts: Vec<GrpoPrompt>,
    rendered: Vec<Vec<u32>>, // rendered, cropped to fit with max_new_tokens
    reward: RewardFn,
    cfg: GrpoConfig,
    state: GrpoState,
    rollout: Option<Rollout>,
    last_minibatch: Option<GrpoMinibatchStats>,
}

impl std::fmt::Debug for Grpo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grpo")
            .field("cfg", &self.cfg)
            .field("state", &self.state)
            .field("prompts", &self.prompts.len())
            .finish_non_exhaustive()
    }
}

impl Grpo {
    /// The stage's name, [`Objective::stage`].
    pub const STAGE: &'static str = "grpo";
    /// The file holding [`GrpoState`].
    pub const STATE_FILE: &'static str = "grpo_state.json";

    /// GRPO of `policy` (trainable) against `reference` (the SFT model with constant weights)
    /// with `reward`, on `prompts` (each rendered with an open `<|assistant|>` and cropped from
    /// the left to leave room for `max_new_tokens`).
    ///
    /// # Errors
    /// [`Error::Config`] for invalid settings; [`Error::InvalidArgument`] if there are no
    /// prompts, a prompt has no messages, the tokenizer has no chat tokens, the reference is
    /// trainable or differs from the policy in shape, or `max_new_tokens` leaves no room for a
    /// prompt.
    pub fn new(
        policy: Gpt,
        reference: Gpt,
        tokenizer: Tokenizer,
        prompts: Vec<GrpoPrompt>,
        reward: RewardFn,
        cfg: GrpoConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        check_reference(&policy, &reference)?;
        let block = policy.config().block_size;
        if cfg.max_new_tokens >= block {
            return Err(Error::InvalidArgument(format!(
                "max_new_tokens ({}) leaves no room for a prompt in a context of {block}",
                cfg.max_new_tokens
            )));
        }
        if prompts.is_empty() {
            return Err(Error::InvalidArgument(
                "GRPO needs at least one prompt".into(),
            ));
        }
        if let Some(i) = prompts.iter().position(|p| p.messages.is_empty()) {
            return Err(Error::InvalidArgument(format!(
                "GRPO prompt {i} has no messages"
            )));
        }
        let template = ChatTemplate::new(&tokenizer)?;
        let room = block - cfg.max_new_tokens;
        let rendered = prompts
            .iter()
            .map(|p| {
                let mut ids = template.render_prompt(&tokenizer, &p.messages)?;
                if ids.len() > room {
                    ids.drain(..ids.len() - room);
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            policy,
            reference,
            tokenizer,
            template,
            prompts,
            rendered,
            reward,
            cfg,
            state: GrpoState::default(),
            rollout: None,
            last_minibatch: None,
        })
    }

    /// Builds GRPO from the SFT checkpoint `sft` (the policy and the reference), or with
    /// `resume` the policy and [`GrpoState`] from that GRPO checkpoint (resume the trainer
    /// from it too).
    ///
    /// # Errors
    /// Checkpoint errors naming the file; [`Error::InvalidArgument`] if the resumed policy's
    /// tokenizer differs from the SFT model's; as [`Grpo::new`].
    pub fn load(
        sft: impl AsRef<Path>,
        resume: Option<&Path>,
        prompts: Vec<GrpoPrompt>,
        reward: RewardFn,
        cfg: GrpoConfig,
        device: &Device,
    ) -> Result<Self> {
        let (reference, tokenizer) = load_model(sft.as_ref(), device)?;
        let (policy, policy_tok) = load_trainable(resume.unwrap_or(sft.as_ref()), device)?;
        if policy_tok.to_json(false)? != tokenizer.to_json(false)? {
            return Err(Error::InvalidArgument(
                "the resumed policy's tokenizer differs from the SFT model's".into(),
            ));
        }
        let mut grpo = Self::new(policy, reference, tokenizer, prompts, reward, cfg)?;
        if let Some(dir) = resume {
            grpo.state = GrpoState::load(dir)?;
        }
        Ok(grpo)
    }

    /// The policy being trained.
    pub fn policy(&self) -> &Gpt {
        &self.policy
    }

    /// The frozen reference.
    pub fn reference(&self) -> &Gpt {
        &self.reference
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The settings.
    pub fn config(&self) -> &GrpoConfig {
        &self.cfg
    }

    /// Iterations completed and the last one's statistics.
    pub fn state(&self) -> GrpoState {
        self.state
    }

    /// The statistics of the last complete iteration.
    pub fn last_iteration(&self) -> Option<&GrpoStats> {
        self.state.last_iteration.as_ref()
    }

    /// The statistics of the last minibatch step (`None` before the first, or when it had no
    /// completion).
    pub fn last_minibatch(&self) -> Option<&GrpoMinibatchStats> {
        self.last_minibatch.as_ref()
    }

    /// The rollout statistics of the iteration in progress, once its rollout is collected.
    pub fn current_rollout(&self) -> Option<&GrpoStats> {
        self.rollout.as_ref().map(|r| &r.stats)
    }

    /// Samples, scores and batches a rollout with the current policy (steps 1–3).
    fn collect(&mut self, rng: &mut ChaCha8Rng) -> Result<Rollout> {
        let cfg = &self.cfg;
        let g = cfg.num_generations;
        let picks: Vec<usize> = (0..cfg.prompts_per_iteration)
            .map(|_| rng.random_range(0..self.prompts.len()))
            .collect();
        let prompts: Vec<Vec<u32>> = picks
            .iter()
            .flat_map(|&p| std::iter::repeat_n(self.rendered[p].clone(), g))
            .collect();
        let seed: u64 = rng.random();
        let responses = sample_responses(
            &self.policy,
            &self.template,
            &prompts,
            cfg.max_new_tokens,
            seed,
        )?;
        let end = self.template.end_id();
        let n = responses.len();
        let mut stats = GrpoStats {
            iteration: self.state.iteration,
            ..Default::default()
        };
        let mut rewards = Vec::with_capacity(n);
        let mut truncated = Vec::with_capacity(n);
        for (i, response) in responses.iter().enumerate() {
            let ended = response.last() == Some(&end);
            let text = reply_text(&self.tokenizer, response)?;
            let mut r = (self.reward)(&self.prompts[picks[i / g]], &text);
            if !r.is_finite() {
                return Err(Error::InvalidArgument(format!(
                    "the reward function returned {r} for completion {i} of iteration {}",
                    self.state.iteration
                )));
            }
            if let (false, Truncated::Penalty(p)) = (ended, cfg.truncated) {
                r += p;
            }
            stats.response_length += (response.len() - usize::from(ended)) as f64;
            stats.truncated += f64::from(u8::from(!ended));
            stats.accuracy += f64::from(u8::from(r > 0.0));
            rewards.push(r);
            truncated.push(!ended);
        }
        stats.reward_mean = rewards.iter().sum::<f64>() / n as f64;
        stats.reward_std = (rewards
            .iter()
            .map(|r| (r - stats.reward_mean).powi(2))
            .sum::<f64>()
            / n as f64)
            .sqrt();
        stats.response_length /= n as f64;
        stats.truncated /= n as f64;
        stats.accuracy /= n as f64;
        let (advantages, flat) = group_advantages(&rewards, g, cfg.scale_rewards)?;
        stats.zero_std_fraction = flat.iter().filter(|&&f| f).count() as f64 / flat.len() as f64;

        // The completions trained on, split evenly over a fixed number of minibatches.
        let mut kept: Vec<usize> = (0..n)
            .filter(|&i| !flat[i / g] && !(truncated[i] && cfg.truncated == Truncated::Mask))
            .collect();
        kept.shuffle(rng);
        stats.completions_trained = kept.len();
        let m = cfg.minibatches();
        let pad = self.tokenizer.eot_id();
        let device = self.policy.device().clone();
        let (mut kl_sum, mut kl_tokens) = (0f64, 0usize);
        let mut minibatches = Vec::with_capacity(m);
        for j in 0..m {
            let rows: Vec<usize> = kept.iter().copied().skip(j).step_by(m).collect();
            if rows.is_empty() {
                minibatches.push(None);
                continue;
            }
            let pairs: Vec<(&[u32], &[u32])> = rows
                .iter()
                .map(|&i| (prompts[i].as_slice(), responses[i].as_slice()))
                .collect();
            let batch = SequenceBatch::new(&pairs, pad, &device)?;
            let (old_logprobs, _) = response_logprobs(&self.policy.forward(&batch.ids)?, &batch)?;
            let old_logprobs = old_logprobs.detach();
            let (ref_logprobs, _) =
                response_logprobs(&self.reference.forward(&batch.ids)?.detach(), &batch)?;
            let kl = k3(&old_logprobs, &ref_logprobs)?.mul(&batch.response_mask)?;
            kl_sum += kl.sum_all()?.to_scalar::<f32>()? as f64;
            kl_tokens += batch
                .prompt_lens
                .iter()
                .zip(&batch.lens)
                .map(|(p, l)| l - p)
                .sum::<usize>();
            let width = batch.ids.dim(1)? - 1;
            let mut adv = vec![0f32; rows.len() * width];
            for (row, &i) in rows.iter().enumerate() {
                for k in batch.prompt_lens[row] - 1..batch.lens[row] - 1 {
                    adv[row * width + k] = advantages[i] as f32;
                }
            }
            minibatches.push(Some(Minibatch {
                advantages: Tensor::from_vec(adv, (rows.len(), width), &device)?,
                signs: rows
                    .iter()
                    .map(|&i| advantages[i].signum() as f32)
                    .collect(),
                batch,
                old_logprobs,
                ref_logprobs,
            }));
        }
        stats.kl = kl_sum / kl_tokens.max(1) as f64;
        let mut order: Vec<usize> = (0..m).collect();
        order.shuffle(rng);
        Ok(Rollout {
            minibatches,
            order,
            epoch: 0,
            pos: 0,
            stats,
            trained_steps: 0,
        })
    }

    /// The GRPO loss of one minibatch (step 4 of the module docs) and its statistics.
    fn minibatch_loss(&self, mb: &Minibatch) -> Result<(Tensor, GrpoMinibatchStats)> {
        let cfg = &self.cfg;
        let mask = &mb.batch.response_mask; // (b, T-1)
        let logits = self.policy.forward(&mb.batch.ids)?; // (b, T, V), dropout off
        let (logprobs, _) = response_logprobs(&logits, &mb.batch)?; // (b, T-1)
        let log_ratio = (&logprobs - &mb.old_logprobs)?; // 0 outside the completion
        let ratio = log_ratio.exp()?;
        let neg_adv = mb.advantages.neg()?;
        let pg1 = (&neg_adv * &ratio)?;
        let pg2 = (&neg_adv * ratio.clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)?)?;
        let per_token = pg1.maximum(&pg2)?.mul(mask)?; // (b, T-1)
        let tokens = mask.sum_all()?.to_scalar::<f32>()? as f64;
        let policy_loss = (per_token.sum_all()? / tokens)?;
        let kl = (k3(&logprobs, &mb.ref_logprobs)?.mul(mask)?.sum_all()? / tokens)?;
        let loss = if cfg.kl_coef > 0.0 {
            (&policy_loss + (&kl * cfg.kl_coef)?)?
        } else {
            policy_loss.clone()
        };

        let r = ratio.detach().to_vec2::<f32>()?;
        let mut s = GrpoMinibatchStats {
            policy_loss: policy_loss.to_scalar::<f32>()? as f64,
            kl: kl.to_scalar::<f32>()? as f64,
            ratio_min: f64::INFINITY,
            ratio_max: f64::NEG_INFINITY,
            completions: mb.batch.len(),
            ..Default::default()
        };
        for row in 0..mb.batch.len() {
            let sign = mb.signs[row];
            for k in mb.batch.prompt_lens[row] - 1..mb.batch.lens[row] - 1 {
                let x = r[row][k] as f64;
                s.ratio_min = s.ratio_min.min(x);
                s.ratio_max = s.ratio_max.max(x);
                let low = sign < 0.0 && x < 1.0 - cfg.epsilon_low;
                let high = sign > 0.0 && x > 1.0 + cfg.epsilon_high;
                s.clip_fraction += f64::from(u8::from(low || high));
                s.tokens += 1;
            }
        }
        s.clip_fraction /= s.tokens.max(1) as f64;
        Ok((loss, s))
    }
}

/// The k3 estimator `exp(q) − q − 1`, `q = log π_ref − log π`, element-wise: `(B, T−1)` →
/// `(B, T−1)`, zero where both are zero (outside the completion). Differentiable in `logprobs`.
fn k3(logprobs: &Tensor, ref_logprobs: &Tensor) -> Result<Tensor> {
    let q = (ref_logprobs - logprobs)?;
    Ok(((q.exp()? - &q)? - 1.0)?)
}

impl Objective for Grpo {
    fn stage(&self) -> &str {
        Self::STAGE
    }

    fn parameters(&self) -> Result<Vec<(String, Var)>> {
        self.policy.vars()
    }

    /// One GRPO minibatch step; collects a new rollout first when the current one is used up.
    /// The tokens reported are the minibatch's completion tokens.
    fn train_loss(&mut self, rng: &mut ChaCha8Rng) -> Result<(Tensor, usize)> {
        let epochs = self.cfg.grpo_epochs;
        let mut rollout = match self.rollout.take() {
            Some(r) if !r.done(epochs) => r,
            _ => self.collect(rng)?,
        };
        let index = rollout.order[rollout.pos];
        let (loss, stats) = match &rollout.minibatches[index] {
            Some(mb) => match self.minibatch_loss(mb) {
                Ok((loss, s)) => (loss, Some(s)),
                Err(e) => {
                    self.rollout = Some(rollout);
                    return Err(e);
                }
            },
            // Nothing to learn from here: zero loss, zero gradient.
            None => (Tensor::zeros((), DType::F32, self.policy.device())?, None),
        };
        if let Some(s) = &stats {
            rollout.stats.policy_loss += s.policy_loss;
            rollout.stats.clip_fraction += s.clip_fraction;
            rollout.trained_steps += 1;
        }
        rollout.pos += 1;
        if rollout.pos == rollout.order.len() {
            rollout.pos = 0;
            rollout.epoch += 1;
            if rollout.epoch < epochs {
                rollout.order.shuffle(rng);
            }
        }
        if rollout.done(epochs) {
            let mut done = rollout.stats;
            let k = rollout.trained_steps.max(1) as f64;
            done.policy_loss /= k;
            done.clip_fraction /= k;
            self.state.last_iteration = Some(done);
            self.state.iteration += 1;
        }
        self.last_minibatch = stats;
        self.rollout = Some(rollout);
        Ok((loss, stats.map_or(0, |s| s.tokens)))
    }

    /// The statistics of the last complete iteration ([`GrpoStats::metrics`]); nothing before
    /// the first. No `val_loss`: the trainer checkpoints at every evaluation.
    fn evaluate(
        &mut self,
        _eval_iters: usize,
        _rng: &mut ChaCha8Rng,
    ) -> Result<Vec<(String, f64)>> {
        Ok(self
            .state
            .last_iteration
            .map(|s| s.metrics())
            .unwrap_or_default())
    }

    /// Between iterations only: a rollout being trained on is not saved.
    fn resumable_here(&self) -> bool {
        self.rollout
            .as_ref()
            .is_none_or(|r| r.done(self.cfg.grpo_epochs))
    }

    /// The policy's model files and [`Grpo::STATE_FILE`].
    fn save(&self, dir: &Path) -> Result<()> {
        save_model(dir, &self.policy, &self.tokenizer)?;
        let path = dir.join(Self::STATE_FILE);
        let json = serde_json::to_string_pretty(&self.state)
            .map_err(|e| Error::bad_file(&path, None, e.to_string()))?;
        std::fs::write(&path, json + "\n").map_err(|e| Error::io(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::copies;
    use crate::{GptConfig, TrainConfig, Trainer};
    use rand::SeedableRng;

    fn setup(cfg: GrpoConfig, reward: RewardFn) -> Grpo {
        let mut tok = Tokenizer::train_char("abcdefgh").unwrap();
        ChatTemplate::add_tokens(&mut tok).unwrap();
        let gcfg = GptConfig {
            vocab_size: tok.vocab_size(),
            block_size: 24,
            n_layer: 1,
            n_head: 2,
            n_embd: 16,
            dropout: 0.1, // dropout must not disturb the ratio: every pass runs without it
            bias: true,
            ..Default::default()
        };
        let policy = Gpt::init(&gcfg, 11, &Device::Cpu).unwrap();
        let reference = Gpt::from_tensors(&gcfg, copies(&policy), false).unwrap();
        let prompts = ["abc", "de", "fgh", "a", "bb"]
            .iter()
            .map(|p| GrpoPrompt {
                messages: vec![Message::user(*p)],
                answer: "a".into(),
            })
            .collect();
        Grpo::new(policy, reference, tok, prompts, reward, cfg).unwrap()
    }

    fn small_cfg() -> GrpoConfig {
        GrpoConfig {
            prompts_per_iteration: 3,
            num_generations: 4,
            minibatch_size: 5,
            grpo_epochs: 2,
            max_new_tokens: 6,
            ..Default::default()
        }
    }

    /// Reward: how many times the answer's letter occurs in the completion.
    fn count_reward() -> RewardFn {
        Arc::new(|p: &GrpoPrompt, c: &str| c.matches(p.answer.as_str()).count() as f64)
    }

    #[test]
    fn advantages_sum_to_zero_per_group() {
        let rewards = [1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0, -2.0, 5.0, 0.5, 0.25];
        for scale in [false, true] {
            let (a, flat) = group_advantages(&rewards, 4, scale).unwrap();
            assert_eq!(flat, [false, true, false]);
            for g in a.chunks(4) {
                assert!(g.iter().sum::<f64>().abs() < 1e-12, "{g:?}");
            }
            assert_eq!(&a[4..8], &[0.0; 4]);
        }
        // By hand: group 1 has mean 0.5 and unbiased std sqrt(1/3).
        let (a, _) = group_advantages(&rewards, 4, true).unwrap();
        let want = 0.5 / ((1.0f64 / 3.0).sqrt() + 1e-4);
        assert!((a[0] - want).abs() < 1e-12 && (a[1] + want).abs() < 1e-12);
        let (a, _) = group_advantages(&rewards, 4, false).unwrap();
        assert_eq!(a[0], 0.5);
        assert!(group_advantages(&rewards, 5, true).is_err());
        assert!(group_advantages(&rewards, 1, true).is_err());
    }

    #[test]
    fn ratio_is_exactly_one_on_the_first_minibatch() {
        let mut grpo = setup(small_cfg(), count_reward());
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (loss, tokens) = grpo.train_loss(&mut rng).unwrap();
        assert!(tokens > 0);
        assert!(loss.to_scalar::<f32>().unwrap().is_finite());
        let s = *grpo.last_minibatch().unwrap();
        assert_eq!((s.ratio_min, s.ratio_max), (1.0, 1.0), "{s:?}");
        assert_eq!(s.clip_fraction, 0.0);
        // Policy = reference at initialisation: the k3 KL is exactly 0.
        assert_eq!(s.kl, 0.0);
        let r = *grpo.current_rollout().unwrap();
        assert_eq!(r.kl, 0.0, "{r:?}");
        assert!(
            r.response_length > 0.0 && r.zero_std_fraction < 1.0,
            "{r:?}"
        );
    }

    #[test]
    fn equal_rewards_give_a_zero_gradient() {
        // Every group's rewards are equal: every group is skipped and every step is a zero
        // loss with no gradient at all.
        let cfg = GrpoConfig {
            kl_coef: 0.1,
            ..small_cfg()
        };
        let mut grpo = setup(cfg.clone(), Arc::new(|_: &GrpoPrompt, _: &str| 1.0));
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..cfg.steps_per_iteration() {
            let (loss, tokens) = grpo.train_loss(&mut rng).unwrap();
            assert_eq!((loss.to_scalar::<f32>().unwrap(), tokens), (0.0, 0));
            let grads = loss.backward().unwrap();
            for (name, var) in grpo.parameters().unwrap() {
                assert!(
                    grads.get(var.as_tensor()).is_none(),
                    "{name} got a gradient"
                );
            }
        }
        let it = *grpo.last_iteration().unwrap();
        assert_eq!((it.zero_std_fraction, it.completions_trained), (1.0, 0));

        // And the loss itself on a minibatch of such a group, advantages zero, β = 0: its
        // gradient is exactly zero for every parameter.
        let mut grpo = setup(small_cfg(), count_reward());
        let rollout = grpo.collect(&mut rng).unwrap();
        let mb = rollout.minibatches.into_iter().flatten().next().unwrap();
        let mb = Minibatch {
            advantages: mb.advantages.zeros_like().unwrap(),
            ..mb
        };
        let (loss, _) = grpo.minibatch_loss(&mb).unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in grpo.parameters().unwrap() {
            let g = grads.get(var.as_tensor()).unwrap();
            let max = g
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(max, 0.0, "{name}");
        }
        grpo.rollout = None;
    }

    #[test]
    fn training_moves_the_policy_and_never_the_reference() {
        let cfg = GrpoConfig {
            kl_coef: 0.05,
            ..small_cfg()
        };
        let steps = 2 * cfg.steps_per_iteration();
        let mut grpo = setup(cfg, count_reward());
        let before: Vec<Vec<f32>> = grpo
            .reference()
            .named_parameters()
            .iter()
            .map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        let policy_before = copies(grpo.policy());
        let tcfg = TrainConfig {
            max_iters: steps,
            eval_interval: steps,
            eval_iters: 1,
            lr: 1e-2,
            warmup_iters: 0,
            ..Default::default()
        };
        let mut trainer = Trainer::new(tcfg, grpo.parameters().unwrap()).unwrap();
        trainer.fit(&mut grpo, |_| {}).unwrap();
        assert_eq!(grpo.state().iteration, 2);
        let after: Vec<Vec<f32>> = grpo
            .reference()
            .named_parameters()
            .iter()
            .map(|(_, t)| t.flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        assert_eq!(before, after);
        let moved = grpo.policy().tensors().iter().any(|(name, t)| {
            let a: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            let b: Vec<f32> = policy_before[name]
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            a != b
        });
        assert!(moved, "the policy did not move");
        let it = grpo.last_iteration().unwrap();
        assert_eq!(it.iteration, 1);
        assert!(it.kl > 0.0, "{it:?}");
    }

    #[test]
    fn truncated_completions_are_masked_or_penalised() {
        // max_new_tokens 1 with an untrained model: (nearly) every completion is cut.
        let base = GrpoConfig {
            max_new_tokens: 1,
            ..small_cfg()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut grpo = setup(
            GrpoConfig {
                truncated: Truncated::Mask,
                ..base.clone()
            },
            count_reward(),
        );
        let r = grpo.collect(&mut rng).unwrap();
        let cut = (r.stats.truncated * base.completions() as f64).round() as usize;
        assert!(cut > 0);
        assert!(r.stats.completions_trained <= base.completions() - cut);
        let mut grpo = setup(
            GrpoConfig {
                truncated: Truncated::Penalty(-10.0),
                ..base.clone()
            },
            count_reward(),
        );
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let r = grpo.collect(&mut rng).unwrap();
        assert!(r.stats.reward_mean < -5.0, "{:?}", r.stats);
    }

    #[test]
    fn bad_settings_are_named() {
        let e = GrpoConfig {
            num_generations: 1,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(
            e.to_string().contains("num_generations must be at least 2"),
            "{e}"
        );
        let e = GrpoConfig {
            epsilon_high: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("epsilon_high must be > 0"), "{e}");
        assert_eq!(GrpoConfig::default().steps_per_iteration(), 4);
    }
}
