//! Proximal Policy Optimization against a reward model, with a KL penalty to the SFT model.
//!
//! InstructGPT's RL stage (Ouyang et al. 2022, §3.5, after Stiennon et al. 2020 and Ziegler
//! et al. 2019, "Fine-Tuning Language Models from Human Preferences"), as TRL's `PPOTrainer`
//! implements it. One **iteration**:
//!
//! 1. **Rollout.** Draw `rollout_size` prompts; the policy samples a reply to each (temperature
//!    1, no filtering, so the tokens come from the policy's own distribution), stopping at
//!    `<|end|>` or after `max_new_tokens`. With no graph, record per response token `a_t`:
//!    the policy's `log π(a_t)`, the value head's `V(s_t)`, and the frozen reference's
//!    `log π_ref(a_t)`; and per reply the reward model's score `r_RM` at its last token.
//! 2. **Rewards.** Per token `r_t = −β · KL_t` with `KL_t = log π(a_t) − log π_ref(a_t)` (the
//!    k1 estimator of KL(π ‖ π_ref)), plus `r_RM` at the reply's last token — normalised by
//!    the running mean and standard deviation of every score so far when `score_norm` is on
//!    (the default; TRL's `use_score_scaling`), which keeps the value targets near unit scale
//!    whatever the reward model's. `β` is
//!    `kl_coef`; with `target_kl` set it follows Ziegler et al.'s adaptive controller after
//!    every rollout: `β ← β · (1 + clip(KL / target − 1, −0.2, 0.2) · n / horizon)` with `KL`
//!    the mean summed KL per reply and `n` the replies in the rollout.
//! 3. **Advantages.** GAE(γ, λ) (Schulman et al. 2016) over each reply's tokens,
//!    `δ_t = r_t + γ V(s_{t+1}) − V(s_t)` (`V = 0` after the last token),
//!    `A_t = δ_t + γλ A_{t+1}`; returns `R_t = A_t + V(s_t)`; advantages then whitened over the
//!    rollout (mean 0, variance 1).
//! 4. **Optimisation.** `ppo_epochs` passes over the rollout in minibatches of
//!    `minibatch_size` replies (a fixed random partition, visited in a fresh random order each
//!    epoch after the first). Per minibatch, with `ρ_t = exp(log π(a_t) − log π_old(a_t))`:
//!    `L = mean_t max(−A_t ρ_t, −A_t clip(ρ_t, 1 ± ε)) + vf_coef · ½ mean_t max((V − R)²,
//!    (V_old + clip(V − V_old, ±ε_v) − R)²)` over response tokens.
//!
//! **How it runs in the shared [`crate::Trainer`].** PPO is an [`Objective`] whose
//! [`Objective::train_loss`] is *one minibatch* of the current rollout: when the rollout is
//! used up (`ppo_epochs` passes), the call first collects the next one with the trainer's RNG.
//! So one trainer step is one PPO minibatch step, one iteration is
//! [`PpoConfig::steps_per_iteration`] steps, and PPO gets our AdamW, learning-rate schedule,
//! gradient clipping, atomic checkpoints, `metrics.jsonl` and resuming for free. The old
//! log-probabilities and values of a minibatch are computed at collection time by the same
//! code on the same padded batch as the new ones, so on the first minibatch of an iteration
//! (no step taken yet) the ratio is exactly 1. Every forward pass (the policy's, old and new,
//! the reference's and the reward model's) runs with dropout off, as TRL's do, so that holds
//! whatever the model's `dropout`, and the KL penalty compares the two models, not two
//! dropout masks. [`Objective::evaluate`] reports the last
//! complete iteration; setting the trainer's `eval_interval` to a multiple of
//! `steps_per_iteration` writes one `"kind": "eval"` `metrics.jsonl` row per iteration (or per
//! few; the `"kind": "train"` rows are the optimiser steps) and a
//! checkpoint at iteration boundaries (PPO reports no `val_loss`, so the trainer checkpoints at
//! every evaluation). A checkpoint written in the middle of an iteration drops that
//! iteration's rollout: a resumed run starts a new one.
//!
//! The policy and the value head share the transformer (TRL's `AutoModelForCausalLMWithValueHead`);
//! the value head is a zero-initialised [`ScalarHead`] saved as [`Ppo::VALUE_HEAD_FILE`]
//! (`value_head.safetensors`, tensors `v_head.weight` `(C,)`, `v_head.bias` `(1,)`) beside
//! `model.safetensors`, and the iteration count and current `kl_coef` as
//! [`Ppo::STATE_FILE`] (`ppo_state.json`). The policy's files are an ordinary model checkpoint.

use std::path::Path;

use candle_core::{Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::chat::{ChatTemplate, Message};
use crate::checkpoint::{load_model, load_trainable, save_model};
use crate::model::Gpt;
use crate::rlhf::data::SequenceBatch;
use crate::rlhf::dpo::check_reference;
use crate::rlhf::logprobs::{entropy, masked_mean, response_logprobs};
use crate::rlhf::reward::{RewardModel, ScalarHead};
use crate::sampler::{FinishReason, SamplingParams, TokenGenerator};
use crate::tokenizer::Tokenizer;
use crate::train::Objective;
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Settings and state
// ---------------------------------------------------------------------------------------------

/// PPO's settings, with TRL's names and (where they fit a tiny model) its defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PpoConfig {
    /// Prompts (and so replies) per rollout. Default 32.
    pub rollout_size: usize,
    /// Replies per minibatch. Default 8.
    pub minibatch_size: usize,
    /// Passes over each rollout. Default 4.
    pub ppo_epochs: usize,
    /// The longest reply sampled, in tokens. Default 32.
    pub max_new_tokens: usize,
    /// Discount γ. Default 1.
    pub gamma: f64,
    /// GAE λ. Default 0.95.
    pub lam: f64,
    /// Clip range ε of the probability ratio. Default 0.2.
    pub clip_range: f64,
    /// Clip range ε_v of the value update. Default 0.2.
    pub clip_range_value: f64,
    /// Weight of the value loss. Default 0.1.
    pub vf_coef: f64,
    /// The KL coefficient β (its start value with `target_kl`). Default 0.2.
    pub kl_coef: f64,
    /// Target of the adaptive KL controller: mean KL(π ‖ π_ref) per reply, in nats, summed
    /// over its tokens; `None` keeps `kl_coef` fixed. Default `Some(6.0)` (TRL's).
    pub target_kl: Option<f64>,
    /// Horizon of the adaptive controller, in replies. Default 10000.
    pub kl_horizon: f64,
    /// Normalise reward-model scores to mean 0 and variance 1 with running moments over every
    /// score seen (TRL's `use_score_scaling` + `use_score_norm`), so that `kl_coef` and
    /// `clip_range_value` mean the same whatever the reward model's scale. Default true.
    pub score_norm: bool,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            rollout_size: 32,
            minibatch_size: 8,
            ppo_epochs: 4,
            max_new_tokens: 32,
            gamma: 1.0,
            lam: 0.95,
            clip_range: 0.2,
            clip_range_value: 0.2,
            vf_coef: 0.1,
            kl_coef: 0.2,
            target_kl: Some(6.0),
            kl_horizon: 10000.0,
            score_norm: true,
        }
    }
}

impl PpoConfig {
    /// Checks the values make sense.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("rollout_size", self.rollout_size),
            ("minibatch_size", self.minibatch_size),
            ("ppo_epochs", self.ppo_epochs),
            ("max_new_tokens", self.max_new_tokens),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("{name} must be at least 1, got 0")));
            }
        }
        let unit = |name: &str, v: f64| -> Result<()> {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(Error::Config(format!("{name} must be in [0, 1], got {v}")))
            }
        };
        unit("gamma", self.gamma)?;
        unit("lam", self.lam)?;
        for (name, v) in [
            ("clip_range", self.clip_range),
            ("clip_range_value", self.clip_range_value),
            ("kl_horizon", self.kl_horizon),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(Error::Config(format!("{name} must be > 0, got {v}")));
            }
        }
        for (name, v) in [("vf_coef", self.vf_coef), ("kl_coef", self.kl_coef)] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(Error::Config(format!("{name} must be >= 0, got {v}")));
            }
        }
        if let Some(t) = self.target_kl {
            if !(t > 0.0 && t.is_finite()) {
                return Err(Error::Config(format!("target_kl must be > 0, got {t}")));
            }
        }
        Ok(())
    }

    /// Minibatches per rollout: `ceil(rollout_size / minibatch_size)`.
    pub fn minibatches(&self) -> usize {
        self.rollout_size.div_ceil(self.minibatch_size.max(1))
    }

    /// Trainer steps per iteration: `ppo_epochs × minibatches`.
    pub fn steps_per_iteration(&self) -> usize {
        self.ppo_epochs * self.minibatches()
    }
}

/// What `ppo_state.json` holds: the iteration count and the current KL coefficient.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PpoState {
    /// Iterations completed.
    pub iteration: usize,
    /// The KL coefficient β the next rollout uses.
    pub kl_coef: f64,
    /// Running moments of every reward-model score seen (for [`PpoConfig::score_norm`]).
    #[serde(default)]
    pub scores: RunningMoments,
    /// The statistics of the last complete iteration (what the next evaluation reports), so
    /// a resumed run reports them as the uninterrupted one does.
    #[serde(default)]
    pub last_iteration: Option<IterationStats>,
}

/// Running mean and variance of a stream of numbers (Welford; batches merged as Chan et al.
/// 1979), as TRL's `RunningMoments`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningMoments {
    /// Numbers seen.
    pub count: f64,
    /// Their mean.
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
}

impl RunningMoments {
    /// Adds a batch of numbers.
    pub fn update(&mut self, xs: &[f64]) {
        if xs.is_empty() {
            return;
        }
        let n = xs.len() as f64;
        let mean = xs.iter().sum::<f64>() / n;
        let m2: f64 = xs.iter().map(|x| (x - mean) * (x - mean)).sum();
        let total = self.count + n;
        let delta = mean - self.mean;
        self.m2 += m2 + delta * delta * self.count * n / total;
        self.mean += delta * n / total;
        self.count = total;
    }

    /// The standard deviation (population), never below `1e-8`; 1 before any number.
    pub fn std(&self) -> f64 {
        if self.count == 0.0 {
            1.0
        } else {
            (self.m2 / self.count).sqrt().max(1e-8)
        }
    }
}

impl PpoState {
    /// Reads `DIR/ppo_state.json`.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if it is missing, [`Error::BadFile`] if malformed.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join(Ppo::STATE_FILE);
        if !path.is_file() {
            return Err(Error::checkpoint(
                dir,
                format!("missing {} (not a PPO checkpoint)", Ppo::STATE_FILE),
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::json(&path, None, &e))
    }
}

/// Statistics of one minibatch step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MinibatchStats {
    /// The clipped surrogate loss.
    pub policy_loss: f64,
    /// The clipped value loss (with its ½, before `vf_coef`).
    pub value_loss: f64,
    /// Fraction of response tokens whose ratio lies outside `1 ± ε`.
    pub clip_fraction: f64,
    /// `½ mean (log ρ)²`, an estimate of KL(π_old ‖ π).
    pub approx_kl: f64,
    /// Smallest ratio `ρ_t` over the response tokens.
    pub ratio_min: f64,
    /// Largest ratio `ρ_t` over the response tokens.
    pub ratio_max: f64,
    /// Response tokens in the minibatch.
    pub tokens: usize,
}

/// Statistics of one iteration: its rollout and its optimisation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct IterationStats {
    /// 0-based iteration index.
    pub iteration: usize,
    /// Mean reward-model score of the replies.
    pub reward_mean: f64,
    /// Mean over replies of the summed per-token KL `Σ_t (log π − log π_ref)`, nats.
    pub kl: f64,
    /// Mean per-token KL over all response tokens, nats.
    pub kl_per_token: f64,
    /// The KL coefficient β the rollout's rewards used.
    pub kl_coef: f64,
    /// Mean entropy of the policy over response tokens, nats.
    pub entropy: f64,
    /// Mean reply length in tokens (`<|end|>` not counted).
    pub response_length: f64,
    /// Fraction of replies that ended with `<|end|>` within `max_new_tokens`.
    pub ended: f64,
    /// Mean clipped surrogate loss over the iteration's minibatch steps.
    pub policy_loss: f64,
    /// Mean value loss over the iteration's minibatch steps.
    pub value_loss: f64,
    /// Mean clip fraction over the iteration's minibatch steps.
    pub clip_fraction: f64,
    /// Mean approximate KL(π_old ‖ π) over the iteration's minibatch steps.
    pub approx_kl: f64,
}

impl IterationStats {
    /// The statistics as `metrics.jsonl` fields.
    pub fn metrics(&self) -> Vec<(String, f64)> {
        [
            ("iteration", self.iteration as f64),
            ("reward_mean", self.reward_mean),
            ("kl", self.kl),
            ("kl_per_token", self.kl_per_token),
            ("kl_coef", self.kl_coef),
            ("entropy", self.entropy),
            ("response_length", self.response_length),
            ("ended", self.ended),
            ("policy_loss", self.policy_loss),
            ("value_loss", self.value_loss),
            ("clip_fraction", self.clip_fraction),
            ("approx_kl", self.approx_kl),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling helpers
// ---------------------------------------------------------------------------------------------

/// Samples one reply to each prompt (ids ending with `<|assistant|>`) from `model` at
/// temperature 1 with no filtering, prompt `i` with seed `seed + i`: the response ids, with
/// `<|end|>` appended when the reply ended with it (so never empty).
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty prompt or `max_new_tokens == 0`; model errors.
pub fn sample_responses(
    model: &Gpt,
    template: &ChatTemplate,
    prompts: &[Vec<u32>],
    max_new_tokens: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    if max_new_tokens == 0 {
        return Err(Error::InvalidArgument(
            "max_new_tokens must be at least 1".into(),
        ));
    }
    let end = template.end_id();
    prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let params = SamplingParams::default()
                .with_max_new_tokens(max_new_tokens)
                .with_stop_tokens(vec![end])
                .with_seed(seed.wrapping_add(i as u64));
            let mut generator = TokenGenerator::new(model, prompt, &params)?;
            for id in generator.by_ref() {
                id?;
            }
            let mut response = generator.generated().to_vec();
            if generator.finish_reason() == Some(FinishReason::Stop) {
                response.push(end);
            }
            Ok(response)
        })
        .collect()
}

/// The mean over `(prompt, response)` rows of `Σ_t (log π(a_t) − log π_ref(a_t))` over the
/// response tokens: a Monte-Carlo estimate of KL(π ‖ π_ref) per reply when the responses were
/// sampled from `policy`. Computed in batches of `batch_size`, without a graph.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty row set or rows longer than the context.
pub fn mean_kl(
    policy: &Gpt,
    reference: &Gpt,
    rows: &[(Vec<u32>, Vec<u32>)],
    pad_id: u32,
    batch_size: usize,
) -> Result<f64> {
    if rows.is_empty() {
        return Err(Error::InvalidArgument(
            "mean_kl needs at least one row".into(),
        ));
    }
    let mut total = 0f64;
    for chunk in rows.chunks(batch_size.max(1)) {
        let refs: Vec<(&[u32], &[u32])> = chunk
            .iter()
            .map(|(p, r)| (p.as_slice(), r.as_slice()))
            .collect();
        let batch = SequenceBatch::new(&refs, pad_id, policy.device())?;
        let (_, lp) = response_logprobs(&policy.forward(&batch.ids)?.detach(), &batch)?;
        let (_, lr) = response_logprobs(&reference.forward(&batch.ids)?.detach(), &batch)?;
        total += (lp - lr)?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total / rows.len() as f64)
}

// ---------------------------------------------------------------------------------------------
// The rollout buffer
// ---------------------------------------------------------------------------------------------

/// One minibatch of a rollout, with everything recorded at collection time (no graphs).
#[derive(Debug)]
struct Minibatch {
    batch: SequenceBatch,
    old_logprobs: Tensor, // (b, T-1), zero outside the response
    old_values: Tensor,   // (b, T-1)
    advantages: Tensor,   // (b, T-1), whitened, zero outside the response
    returns: Tensor,      // (b, T-1)
}

#[derive(Debug)]
struct Rollout {
    minibatches: Vec<Minibatch>,
    order: Vec<usize>,
    epoch: usize,
    pos: usize,
    stats: IterationStats,
    steps: usize, // minibatch steps taken
}

impl Rollout {
    fn done(&self, epochs: usize) -> bool {
        self.epoch >= epochs
    }
}

// ---------------------------------------------------------------------------------------------
// The objective
// ---------------------------------------------------------------------------------------------

/// The PPO [`Objective`] (see the module docs).
#[derive(Debug)]
pub struct Ppo {
    policy: Gpt,
    value_head: ScalarHead,
    reference: Gpt,
    reward: RewardModel,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    prompts: Vec<Vec<u32>>, // rendered, cropped to fit with max_new_tokens
    cfg: PpoConfig,
    state: PpoState,
    rollout: Option<Rollout>,
    last_iteration: Option<IterationStats>,
    last_minibatch: Option<MinibatchStats>,
}

impl Ppo {
    /// The stage's name, [`Objective::stage`]: what `trainer_state.json` records, and the
    /// name of the example that runs it.
    pub const STAGE: &'static str = "ppo";

    /// The value head's file in a PPO checkpoint.
    pub const VALUE_HEAD_FILE: &'static str = "value_head.safetensors";
    /// The value head's tensor prefix (`v_head.weight`, `v_head.bias`), as TRL names it.
    pub const VALUE_HEAD_NAME: &'static str = "v_head";
    /// The file holding [`PpoState`].
    pub const STATE_FILE: &'static str = "ppo_state.json";

    /// PPO of `policy` (trainable) with `value_head` (trainable) against `reference` (the SFT
    /// model with constant weights) and `reward`, on `prompts` (conversations ending with a
    /// user turn; each is rendered with an open `<|assistant|>` and cropped from the left to
    /// leave room for `max_new_tokens`).
    ///
    /// # Errors
    /// [`Error::Config`] for invalid settings; [`Error::InvalidArgument`] if there are no
    /// prompts, the tokenizer has no chat tokens, the reference is trainable or differs from
    /// the policy in shape, the reward model's vocabulary differs from the policy's, the value
    /// head is constant or of the wrong width, or `max_new_tokens` leaves no room for a prompt.
    pub fn new(
        policy: Gpt,
        value_head: ScalarHead,
        reference: Gpt,
        reward: RewardModel,
        tokenizer: Tokenizer,
        prompts: &[Vec<Message>],
        cfg: PpoConfig,
    ) -> Result<Self> {
        cfg.validate()?;
        check_reference(&policy, &reference)?;
        value_head.vars()?;
        let c = policy.config().n_embd;
        if value_head.width() != c {
            return Err(Error::InvalidArgument(format!(
                "the value head has width {}, the policy {c}",
                value_head.width()
            )));
        }
        let rm = reward.backbone().config();
        if rm.vocab_size != policy.config().vocab_size {
            return Err(Error::InvalidArgument(format!(
                "the reward model's vocabulary ({}) differs from the policy's ({})",
                rm.vocab_size,
                policy.config().vocab_size
            )));
        }
        let block = rm.block_size.min(policy.config().block_size);
        if cfg.max_new_tokens >= block {
            return Err(Error::InvalidArgument(format!(
                "max_new_tokens ({}) leaves no room for a prompt in a context of {block}",
                cfg.max_new_tokens
            )));
        }
        if prompts.is_empty() {
            return Err(Error::InvalidArgument(
                "PPO needs at least one prompt".into(),
            ));
        }
        let template = ChatTemplate::new(&tokenizer)?;
        let room = block - cfg.max_new_tokens;
        let prompts = prompts
            .iter()
            .map(|m| {
                let mut ids = template.render_prompt(&tokenizer, m)?;
                if ids.len() > room {
                    ids.drain(..ids.len() - room);
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>>>()?;
        let state = PpoState {
            iteration: 0,
            kl_coef: cfg.kl_coef,
            scores: RunningMoments::default(),
            last_iteration: None,
        };
        Ok(Self {
            policy,
            value_head,
            reference,
            reward,
            tokenizer,
            template,
            prompts,
            cfg,
            state,
            rollout: None,
            last_iteration: None,
            last_minibatch: None,
        })
    }

    /// Builds PPO from checkpoint directories: the policy and the reference from the SFT
    /// checkpoint `sft` (the policy with a zero value head), the reward model from `reward`.
    /// With `resume`, the policy, its value head and [`PpoState`] come from that PPO
    /// checkpoint instead (resume the trainer from it too).
    ///
    /// # Errors
    /// Checkpoint errors naming the file; [`Error::InvalidArgument`] if the reward model's or
    /// the resumed policy's tokenizer differs from the SFT model's; as [`Ppo::new`].
    pub fn load(
        sft: impl AsRef<Path>,
        reward: impl AsRef<Path>,
        resume: Option<&Path>,
        prompts: &[Vec<Message>],
        cfg: PpoConfig,
        device: &Device,
    ) -> Result<Self> {
        let (reference, tokenizer) = load_model(sft.as_ref(), device)?;
        let (reward, reward_tok) = RewardModel::load(reward.as_ref(), device)?;
        let (policy, policy_tok) = load_trainable(resume.unwrap_or(sft.as_ref()), device)?;
        let json = tokenizer.to_json(false)?;
        for (what, tok) in [("reward model", &reward_tok), ("policy", &policy_tok)] {
            if tok.to_json(false)? != json {
                return Err(Error::InvalidArgument(format!(
                    "the {what}'s tokenizer differs from the SFT model's"
                )));
            }
        }
        let c = policy.config().n_embd;
        let value_head = match resume {
            Some(dir) => ScalarHead::load(
                dir.join(Self::VALUE_HEAD_FILE),
                Self::VALUE_HEAD_NAME,
                c,
                device,
                true,
            )?,
            None => ScalarHead::zeros(Self::VALUE_HEAD_NAME, c, device, true)?,
        };
        let mut ppo = Self::new(
            policy, value_head, reference, reward, tokenizer, prompts, cfg,
        )?;
        if let Some(dir) = resume {
            ppo.state = PpoState::load(dir)?;
            ppo.last_iteration = ppo.state.last_iteration;
        }
        Ok(ppo)
    }

    /// The policy being trained.
    pub fn policy(&self) -> &Gpt {
        &self.policy
    }

    /// The frozen reference.
    pub fn reference(&self) -> &Gpt {
        &self.reference
    }

    /// The reward model.
    pub fn reward_model(&self) -> &RewardModel {
        &self.reward
    }

    /// The value head.
    pub fn value_head(&self) -> &ScalarHead {
        &self.value_head
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The settings.
    pub fn config(&self) -> &PpoConfig {
        &self.cfg
    }

    /// Iterations completed and the current KL coefficient.
    pub fn state(&self) -> PpoState {
        self.state
    }

    /// The statistics of the last complete iteration.
    pub fn last_iteration(&self) -> Option<&IterationStats> {
        self.last_iteration.as_ref()
    }

    /// The statistics of the last minibatch step.
    pub fn last_minibatch(&self) -> Option<&MinibatchStats> {
        self.last_minibatch.as_ref()
    }

    /// The rollout statistics of the iteration in progress (reward, KL, entropy, length),
    /// once its rollout is collected.
    pub fn current_rollout(&self) -> Option<&IterationStats> {
        self.rollout.as_ref().map(|r| &r.stats)
    }

    /// One forward pass of the policy on a batch, without dropout (like the reference's):
    /// per-token log-probabilities `(B, T−1)` (zero outside the response), values `(B, T−1)`
    /// and logits `(B, T, V)`, with a graph.
    fn policy_outputs(&self, batch: &SequenceBatch) -> Result<(Tensor, Tensor, Tensor)> {
        let hidden = self.policy.hidden_states(&batch.ids, None, None)?; // (B, T, C)
        let logits = self.policy.lm_head(&hidden)?; // (B, T, V)
        let (logprobs, _) = response_logprobs(&logits, batch)?; // (B, T-1)
        let t = hidden.dim(1)?;
        let values = self.value_head.forward(&hidden.narrow(1, 0, t - 1)?)?; // (B, T-1)
        Ok((logprobs, values, logits))
    }

    /// Samples and scores a rollout with the current policy (step 1–3 of the module docs).
    fn collect(&mut self, rng: &mut ChaCha8Rng) -> Result<Rollout> {
        let cfg = &self.cfg;
        let n = cfg.rollout_size;
        let prompts: Vec<Vec<u32>> = (0..n)
            .map(|_| self.prompts[rng.random_range(0..self.prompts.len())].clone())
            .collect();
        let seed: u64 = rng.random();
        let responses = sample_responses(
            &self.policy,
            &self.template,
            &prompts,
            cfg.max_new_tokens,
            seed,
        )?;
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(rng);

        let beta = self.state.kl_coef;
        let pad = self.tokenizer.eot_id();
        let device = self.policy.device().clone();
        let end = self.template.end_id();
        let mut stats = IterationStats {
            iteration: self.state.iteration,
            kl_coef: beta,
            ..Default::default()
        };
        let mut response_tokens = 0usize;
        let mut entropy_sum = 0f64;
        // Pass 1, per minibatch: the batch, the policy's log-probs and values, the reference's
        // log-probs and the reward model's scores.
        let mut parts = Vec::new();
        for chunk in order.chunks(cfg.minibatch_size) {
            let rows: Vec<(&[u32], &[u32])> = chunk
                .iter()
                .map(|&i| (prompts[i].as_slice(), responses[i].as_slice()))
                .collect();
            let batch = SequenceBatch::new(&rows, pad, &device)?;
            let (logprobs, values, logits) = self.policy_outputs(&batch)?;
            let (logprobs, values) = (logprobs.detach(), values.detach());
            let t = logits.dim(1)?;
            let ent = entropy(&logits.narrow(1, 0, t - 1)?)?; // (b, T-1)
            entropy_sum += ent
                .mul(&batch.response_mask)?
                .sum_all()?
                .to_scalar::<f32>()? as f64;
            let ref_logits = self.reference.forward(&batch.ids)?.detach();
            let (ref_logprobs, _) = response_logprobs(&ref_logits, &batch)?;
            let scores: Vec<f64> = self
                .reward
                .score(&batch, None)?
                .detach()
                .to_vec1::<f32>()?
                .into_iter()
                .map(f64::from)
                .collect();
            parts.push((chunk, batch, logprobs, values, ref_logprobs, scores));
        }
        if cfg.score_norm {
            for (.., scores) in &parts {
                self.state.scores.update(scores);
            }
        }
        let (score_mean, score_std) = match cfg.score_norm {
            true => (self.state.scores.mean, self.state.scores.std()),
            false => (0.0, 1.0),
        };

        // Pass 2: per-token rewards, GAE advantages and returns (raw, whitened below).
        let mut raw = Vec::with_capacity(parts.len());
        for (chunk, batch, logprobs, values, ref_logprobs, scores) in parts {
            let lp = logprobs.to_vec2::<f32>()?;
            let rl = ref_logprobs.to_vec2::<f32>()?;
            let v = values.to_vec2::<f32>()?;
            let width = batch.ids.dim(1)? - 1;
            let mut adv = vec![vec![0f32; width]; chunk.len()];
            let mut ret = vec![vec![0f32; width]; chunk.len()];
            for row in 0..chunk.len() {
                let (p, len) = (batch.prompt_lens[row], batch.lens[row]);
                let span = p - 1..len - 1; // positions whose target is a response token
                let mut kl_sum = 0f64;
                let mut rewards = Vec::with_capacity(span.len());
                for k in span.clone() {
                    let kl = (lp[row][k] - rl[row][k]) as f64;
                    kl_sum += kl;
                    rewards.push(-beta * kl);
                }
                if let Some(r) = rewards.last_mut() {
                    *r += (scores[row] - score_mean) / score_std;
                }
                // GAE, backwards over the response.
                let mut next_value = 0f64;
                let mut running = 0f64;
                for (j, k) in span.clone().enumerate().rev() {
                    let value = v[row][k] as f64;
                    let delta = rewards[j] + cfg.gamma * next_value - value;
                    running = delta + cfg.gamma * cfg.lam * running;
                    adv[row][k] = running as f32;
                    ret[row][k] = (running + value) as f32;
                    next_value = value;
                }
                stats.reward_mean += scores[row];
                stats.kl += kl_sum;
                response_tokens += span.len();
                let reply = &responses[chunk[row]];
                let ended = reply.last() == Some(&end);
                stats.response_length += (reply.len() - usize::from(ended)) as f64;
                stats.ended += f64::from(u8::from(ended));
            }
            raw.push((batch, logprobs, values, adv, ret));
        }
        stats.kl_per_token = stats.kl / response_tokens.max(1) as f64;
        stats.entropy = entropy_sum / response_tokens.max(1) as f64;
        for x in [
            &mut stats.reward_mean,
            &mut stats.kl,
            &mut stats.response_length,
            &mut stats.ended,
        ] {
            *x /= n as f64;
        }

        // Whiten the advantages over every response token of the rollout.
        let (mut sum, mut sq, mut count) = (0f64, 0f64, 0f64);
        for (batch, _, _, adv, _) in &raw {
            for (row, a) in adv.iter().enumerate() {
                for &x in &a[batch.prompt_lens[row] - 1..batch.lens[row] - 1] {
                    sum += x as f64;
                    sq += (x as f64) * (x as f64);
                    count += 1.0;
                }
            }
        }
        let mean = sum / count.max(1.0);
        let var = (sq / count.max(1.0) - mean * mean).max(0.0);
        let scale = 1.0 / (var + 1e-8).sqrt();
        let mut minibatches = Vec::with_capacity(raw.len());
        for (batch, old_logprobs, old_values, mut adv, ret) in raw {
            for (row, a) in adv.iter_mut().enumerate() {
                for x in &mut a[batch.prompt_lens[row] - 1..batch.lens[row] - 1] {
                    *x = ((*x as f64 - mean) * scale) as f32;
                }
            }
            minibatches.push(Minibatch {
                advantages: Tensor::new(adv, &device)?,
                returns: Tensor::new(ret, &device)?,
                batch,
                old_logprobs,
                old_values,
            });
        }

        // Ziegler et al.'s adaptive KL controller, for the next rollout.
        if let Some(target) = cfg.target_kl {
            let error = (stats.kl / target - 1.0).clamp(-0.2, 0.2);
            self.state.kl_coef *= 1.0 + error * n as f64 / cfg.kl_horizon;
        }
        let m = minibatches.len();
        Ok(Rollout {
            minibatches,
            order: (0..m).collect(),
            epoch: 0,
            pos: 0,
            stats,
            steps: 0,
        })
    }

    /// The PPO loss of one minibatch (step 4 of the module docs) and its statistics.
    fn minibatch_loss(&self, mb: &Minibatch) -> Result<(Tensor, MinibatchStats)> {
        let cfg = &self.cfg;
        let mask = &mb.batch.response_mask;
        let (logprobs, values, _) = self.policy_outputs(&mb.batch)?;
        let log_ratio = (&logprobs - &mb.old_logprobs)?; // (b, T-1), 0 outside the response
        let ratio = log_ratio.exp()?;
        let neg_adv = mb.advantages.neg()?;
        let pg1 = (&neg_adv * &ratio)?;
        let pg2 = (&neg_adv * ratio.clamp(1.0 - cfg.clip_range, 1.0 + cfg.clip_range)?)?;
        let policy_loss = masked_mean(&pg1.maximum(&pg2)?, mask)?;
        let delta =
            (&values - &mb.old_values)?.clamp(-cfg.clip_range_value, cfg.clip_range_value)?;
        let clipped = (&mb.old_values + delta)?;
        let vf1 = (&values - &mb.returns)?.sqr()?;
        let vf2 = (clipped - &mb.returns)?.sqr()?;
        let value_loss = (masked_mean(&vf1.maximum(&vf2)?, mask)? * 0.5)?;
        let loss = (&policy_loss + (&value_loss * cfg.vf_coef)?)?;

        // Statistics over response tokens.
        let r = ratio.detach().to_vec2::<f32>()?;
        let lr = log_ratio.detach().to_vec2::<f32>()?;
        let mut s = MinibatchStats {
            policy_loss: policy_loss.to_scalar::<f32>()? as f64,
            value_loss: value_loss.to_scalar::<f32>()? as f64,
            ratio_min: f64::INFINITY,
            ratio_max: f64::NEG_INFINITY,
            ..Default::default()
        };
        for row in 0..mb.batch.len() {
            for k in mb.batch.prompt_lens[row] - 1..mb.batch.lens[row] - 1 {
                let x = r[row][k] as f64;
                s.ratio_min = s.ratio_min.min(x);
                s.ratio_max = s.ratio_max.max(x);
                if (x - 1.0).abs() > cfg.clip_range {
                    s.clip_fraction += 1.0;
                }
                s.approx_kl += 0.5 * (lr[row][k] as f64).powi(2);
                s.tokens += 1;
            }
        }
        s.clip_fraction /= s.tokens.max(1) as f64;
        s.approx_kl /= s.tokens.max(1) as f64;
        Ok((loss, s))
    }
}

impl Objective for Ppo {
    fn stage(&self) -> &str {
        Self::STAGE
    }

    /// The policy's parameters and the value head's (`v_head.weight`, `v_head.bias`).
    fn parameters(&self) -> Result<Vec<(String, Var)>> {
        let mut p = self.policy.vars()?;
        p.extend(self.value_head.vars()?);
        Ok(p)
    }

    /// One PPO minibatch step; collects a new rollout first when the current one is used up.
    /// The tokens reported are the minibatch's response tokens.
    fn train_loss(&mut self, rng: &mut ChaCha8Rng) -> Result<(Tensor, usize)> {
        let epochs = self.cfg.ppo_epochs;
        let mut rollout = match self.rollout.take() {
            Some(r) if !r.done(epochs) => r,
            _ => self.collect(rng)?,
        };
        let index = rollout.order[rollout.pos];
        let result = self.minibatch_loss(&rollout.minibatches[index]);
        let (loss, stats) = match result {
            Ok(x) => x,
            Err(e) => {
                self.rollout = Some(rollout);
                return Err(e);
            }
        };
        let it = &mut rollout.stats;
        it.policy_loss += stats.policy_loss;
        it.value_loss += stats.value_loss;
        it.clip_fraction += stats.clip_fraction;
        it.approx_kl += stats.approx_kl;
        rollout.steps += 1;
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
            let k = rollout.steps.max(1) as f64;
            done.policy_loss /= k;
            done.value_loss /= k;
            done.clip_fraction /= k;
            done.approx_kl /= k;
            self.last_iteration = Some(done);
            self.state.iteration += 1;
        }
        self.last_minibatch = Some(stats);
        self.rollout = Some(rollout);
        Ok((loss, stats.tokens))
    }

    /// The statistics of the last complete iteration ([`IterationStats::metrics`]): `iteration`,
    /// `reward_mean`, `kl`, `kl_per_token`, `kl_coef`, `entropy`, `response_length`, `ended`,
    /// `policy_loss`, `value_loss`, `clip_fraction`, `approx_kl`; nothing before the first.
    /// No `val_loss`: the trainer checkpoints at every evaluation.
    fn evaluate(
        &mut self,
        _eval_iters: usize,
        _rng: &mut ChaCha8Rng,
    ) -> Result<Vec<(String, f64)>> {
        Ok(self.last_iteration.map(|s| s.metrics()).unwrap_or_default())
    }

    /// Between iterations only: a rollout being trained on is not saved (a resumed run
    /// collects a new one), so a state saved in the middle of one would not resume exactly.
    fn resumable_here(&self) -> bool {
        self.rollout
            .as_ref()
            .is_none_or(|r| r.done(self.cfg.ppo_epochs))
    }

    /// The policy's model files, [`Ppo::VALUE_HEAD_FILE`] and [`Ppo::STATE_FILE`].
    fn save(&self, dir: &Path) -> Result<()> {
        save_model(dir, &self.policy, &self.tokenizer)?;
        self.value_head.save(dir.join(Self::VALUE_HEAD_FILE))?;
        let path = dir.join(Self::STATE_FILE);
        let state = PpoState {
            last_iteration: self.last_iteration,
            ..self.state
        };
        let json = serde_json::to_string_pretty(&state)
            .map_err(|e| Error::bad_file(&path, None, e.to_string()))?;
        std::fs::write(&path, json + "\n").map_err(|e| Error::io(&path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::copies;
    use crate::GptConfig;
    use rand::SeedableRng;

    fn setup(cfg: PpoConfig) -> Ppo {
        let mut tok = Tokenizer::train_char("abcdefgh").unwrap();
        ChatTemplate::add_tokens(&mut tok).unwrap();
        let gcfg = GptConfig {
            vocab_size: tok.vocab_size(),
            block_size: 24,
            n_layer: 1,
            n_head: 2,
            n_embd: 16,
            dropout: 0.0,
            bias: true,
            ..Default::default()
        };
        let policy = Gpt::init(&gcfg, 11, &Device::Cpu).unwrap();
        let reference = Gpt::from_tensors(&gcfg, copies(&policy), false).unwrap();
        let rm_backbone = Gpt::init(&gcfg, 12, &Device::Cpu).unwrap();
        let rm_backbone = Gpt::from_tensors(&gcfg, rm_backbone.tensors(), false).unwrap();
        // A non-zero reward head, so scores differ between replies.
        let w: Vec<f32> = (0..16).map(|i| ((i % 5) as f32 - 2.0) * 0.5).collect();
        let rm_head = ScalarHead::from_tensors(
            "score",
            Tensor::new(w, &Device::Cpu).unwrap(),
            Tensor::new(&[0.1f32], &Device::Cpu).unwrap(),
            false,
        )
        .unwrap();
        let reward = RewardModel::from_parts(rm_backbone, rm_head).unwrap();
        let head = ScalarHead::zeros(Ppo::VALUE_HEAD_NAME, 16, &Device::Cpu, true).unwrap();
        let prompts: Vec<Vec<Message>> = ["abc", "de", "fgh", "a", "bb"]
            .iter()
            .map(|p| vec![Message::user(*p)])
            .collect();
        Ppo::new(policy, head, reference, reward, tok, &prompts, cfg).unwrap()
    }

    fn small_cfg() -> PpoConfig {
        PpoConfig {
            rollout_size: 6,
            minibatch_size: 4,
            ppo_epochs: 2,
            max_new_tokens: 6,
            kl_coef: 0.1,
            target_kl: None,
            ..Default::default()
        }
    }

    #[test]
    fn ratio_is_exactly_one_on_the_first_minibatch_and_kl_starts_at_zero() {
        let mut ppo = setup(small_cfg());
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (loss, tokens) = ppo.train_loss(&mut rng).unwrap();
        assert!(tokens > 0);
        assert!(loss.to_scalar::<f32>().unwrap().is_finite());
        let s = *ppo.last_minibatch().unwrap();
        assert_eq!((s.ratio_min, s.ratio_max), (1.0, 1.0), "{s:?}");
        assert_eq!((s.clip_fraction, s.approx_kl), (0.0, 0.0));
        // Policy = reference at initialisation: every per-token KL is exactly 0.
        let r = *ppo.current_rollout().unwrap();
        assert_eq!((r.kl, r.kl_per_token), (0.0, 0.0), "{r:?}");
        assert!(r.entropy > 0.0 && r.response_length > 0.0);
    }

    #[test]
    fn an_iteration_is_epochs_times_minibatches_steps() {
        let cfg = small_cfg();
        assert_eq!(cfg.minibatches(), 2);
        assert_eq!(cfg.steps_per_iteration(), 4);
        let mut ppo = setup(cfg);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for step in 0..4 {
            assert_eq!(ppo.state().iteration, 0, "step {step}");
            ppo.train_loss(&mut rng).unwrap();
        }
        assert_eq!(ppo.state().iteration, 1);
        let it = *ppo.last_iteration().unwrap();
        assert_eq!(it.iteration, 0);
        assert!(it.value_loss > 0.0, "{it:?}");
        // The next call collects iteration 1's rollout.
        ppo.train_loss(&mut rng).unwrap();
        assert_eq!(ppo.current_rollout().unwrap().iteration, 1);
    }

    #[test]
    fn adaptive_controller_moves_kl_coef_toward_the_target() {
        let c = PpoConfig {
            target_kl: Some(1.0),
            kl_horizon: 60.0,
            ..small_cfg()
        };
        let mut ppo = setup(c);
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        ppo.train_loss(&mut rng).unwrap();
        // KL 0 < target: error clipped to -0.2, β ← β (1 − 0.2 · 6 / 60) = 0.98 β.
        assert!(
            (ppo.state().kl_coef - 0.1 * 0.98).abs() < 1e-12,
            "{:?}",
            ppo.state()
        );
    }

    #[test]
    fn running_moments_match_the_whole_stream() {
        let xs = [1.0, 2.0, 4.0, 7.0, -3.0, 0.5];
        let mut m = RunningMoments::default();
        assert_eq!(m.std(), 1.0);
        m.update(&xs[..2]);
        m.update(&xs[2..5]);
        m.update(&xs[5..]);
        let mean = xs.iter().sum::<f64>() / 6.0;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 6.0;
        assert_eq!(m.count, 6.0);
        assert!((m.mean - mean).abs() < 1e-12);
        assert!((m.std() - var.sqrt()).abs() < 1e-12);
    }

    #[test]
    fn bad_settings_are_named() {
        let e = PpoConfig {
            ppo_epochs: 0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid config: ppo_epochs must be at least 1, got 0"
        );
        let e = PpoConfig {
            lam: 1.5,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("lam must be in [0, 1]"), "{e}");
    }
}
