//! Stage three, learning from human preferences (RLHF).
//!
//! After SFT the model answers in turns, but nothing has told it which of two plausible
//! answers people prefer. Preference data does: a conversation and two replies to it, one
//! `chosen` and one `rejected` ([`data`]). This module turns such data into a better policy in
//! the two ways the literature does:
//!
//! 1. **A reward model, then PPO** (InstructGPT: Ouyang et al. 2022, "Training language models
//!    to follow instructions with human feedback"; Stiennon et al. 2020; Ziegler et al. 2019).
//!    - [`RewardModel`] ([`reward`]): the SFT model's transformer with its language-model head
//!      replaced by a scalar head read at the last token of `prompt + reply`. It learns the
//!      Bradley–Terry model of the preferences, `P(chosen ≻ rejected) = σ(r_c − r_r)`, by
//!      minimising `−log σ(r_c − r_r)` ([`RewardTraining`]).
//!    - [`Ppo`] ([`ppo`]): the policy (initialised from the SFT model, with a value head) samples
//!      replies to prompts; each reply earns the reward model's score at its end minus
//!      `kl_coef × (log π(a_t) − log π_ref(a_t))` at every token, a penalty for drifting from
//!      the frozen SFT model `π_ref`; advantages come from GAE(γ, λ) and the policy follows
//!      PPO's clipped surrogate (Schulman et al. 2017), with an optional adaptive KL
//!      coefficient (Ziegler et al. 2019).
//! 2. **DPO** ([`Dpo`], [`dpo`]; Rafailov et al. 2023, "Direct Preference Optimization: Your
//!    Language Model is Secretly a Reward Model"): no reward model and no sampling; the policy
//!    is trained directly on the pairs with
//!    `−log σ(β [(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))])`.
//! 3. **GRPO** ([`Grpo`], [`grpo`]; Shao et al. 2024, "DeepSeekMath") for answers a program
//!    can check: no reward model and no value head; `G` completions per prompt, each scored by
//!    a plain Rust closure, and the group's mean reward as the baseline of each, with PPO's
//!    clipped ratio (DAPO's separate low and high ranges) and an optional KL penalty.
//!
//! All four are [`crate::Objective`]s run by the one [`crate::Trainer`], so they share the
//! optimiser, the learning-rate schedule, gradient clipping, atomic checkpoints,
//! `metrics.jsonl` and resuming with pre-training and SFT. The frozen reference model of PPO
//! and DPO is the SFT checkpoint loaded a second time with constant weights
//! ([`crate::checkpoint::load_model`]): no optimiser sees it and no autograd graph is built
//! through it.
//!
//! A checkpoint of each stage is an ordinary model directory (`config.json`,
//! `model.safetensors`, `tokenizer.json`, …), so `chat` and `generate` load it as they are;
//! the reward model adds `reward_head.safetensors` and PPO adds `value_head.safetensors` and
//! `ppo_state.json` beside the weights.
//!
//! Sequences are `prompt + response`, where the prompt is the conversation rendered by
//! [`crate::ChatTemplate::render_prompt`] (ending in an open `<|assistant|>`) and the response
//! is the reply's tokens followed by `<|end|>`. Batches are right-padded; log-probabilities
//! are summed over response tokens only ([`SequenceBatch::response_mask`]).

pub mod data;
pub mod dpo;
pub mod grpo;
pub mod logprobs;
pub mod ppo;
pub mod reward;

pub use data::{
    load_preference_file, load_prompts, PreferenceData, PreferenceDataset, PreferenceExample,
    PreferencePair, SequenceBatch,
};
pub use dpo::{dpo_loss, Dpo};
pub use grpo::{Grpo, GrpoConfig, GrpoPrompt, GrpoStats, RewardFn, Truncated};
pub use logprobs::{log_sigmoid, sequence_logprobs, token_logprobs};
pub use ppo::{IterationStats, MinibatchStats, Ppo, PpoConfig, PpoState, RunningMoments};
pub use reward::{bradley_terry_loss, PairMetrics, RewardModel, RewardTraining, ScalarHead};
