//! # tinygpt: build a small ChatGPT from scratch
//!
//! A generative language model plays a word-chain game: given text, predict the next token.
//! tinygpt teaches a GPT that game and then plays it out loud, in the stages a ChatGPT is
//! built in, each a file of this crate:
//!
//! 1. **Text → tokens** ([`tokenizer`]): a character-level vocabulary or a byte-level BPE
//!    trained on your corpus, saved as a Hugging Face `tokenizer.json`.
//! 2. **The model** ([`model`]): GPT-2 — token and position embeddings, pre-LayerNorm blocks
//!    of causal self-attention and an MLP, a head tied to the embedding — under Hugging Face
//!    GPT-2's weight names.
//! 3. **Pre-training** ([`pretrain`] over [`data`]): next-token prediction on raw text, run by
//!    the one training loop every stage shares ([`train`], with our own AdamW, schedule and
//!    clipping in [`optim`]) and saved as checkpoint directories ([`checkpoint`]).
//! 4. **Sampling** ([`sampler`]): temperature, top-k, top-p, min-p, repetition penalty, stop
//!    tokens, a seed, and streaming text as it is generated.
//! 5. **Supervised fine-tuning** ([`sft`], with the chat template of [`chat`]): the same loss on
//!    conversations, counted on the assistant's turns only.
//! 6. **Learning from preferences** ([`rlhf`]): a Bradley–Terry reward model and PPO with a KL
//!    penalty to the SFT model (InstructGPT), or DPO directly on the preference pairs; and GRPO
//!    (DeepSeekMath) on rewards a program computes, such as a checked final answer.
//!
//! 7. **Serving** ([`decode`], and `server` with the `server` feature): many conversations
//!    decoded together, one batched forward pass per step with a KV cache per sequence, behind
//!    an OpenAI-compatible HTTP API and a web chat.
//! 8. **Evaluation** ([`eval`]): bits per byte on held-out text, GSM8K exact match, the
//!    turn-end rate, reward-model pairwise accuracy and multiple choice by log-likelihood, as
//!    a report card per checkpoint.
//!
//! Every training run can end with its report card ([`report`], as nanochat's `report.md`):
//! settings, parameters, tokens, FLOPs, time, evaluations, plots and samples, in markdown.
//!
//! On the CPU, [`threads`] chooses how many threads matrix products and element-wise ops use
//! (call it first thing in `main`).
//!
//! Real GPT-2 checkpoints in Hugging Face format load into the same model, and tinygpt models
//! save in that format for transformers and other tools ([`hf`]); GPT-2s also go out to
//! llama.cpp and ollama as GGUF files, F32, F16 or 8-bit Q8_0, and come back ([`gguf`]).
//!
//! ```
//! use tinygpt::candle::Device;
//! use tinygpt::{Gpt, GptConfig, SamplingParams, Tokenizer};
//!
//! // A tokenizer and an (untrained) model small enough for a doctest.
//! let text = "to be or not to be, that is the question";
//! let tokenizer = Tokenizer::train_char(text)?;
//! let cfg = GptConfig { vocab_size: tokenizer.vocab_size(), block_size: 16, n_layer: 2,
//!                       n_head: 2, n_embd: 16, dropout: 0.0, bias: true, ..Default::default() };
//! let model = Gpt::init(&cfg, 1337, &Device::Cpu)?;
//!
//! // Play the game: 20 new characters after a prompt, deterministic for a seed.
//! let params = SamplingParams::default().with_max_new_tokens(20).with_seed(42);
//! let mut generation = tinygpt::generate(&model, &tokenizer, "to be", &params)?;
//! let text: String = generation.by_ref().collect::<tinygpt::Result<_>>()?;
//! assert_eq!(generation.tokens().generated().len(), 20);
//! println!("to be{text}");
//! # Ok::<(), tinygpt::Error>(())
//! ```
//!
//! Shapes in the docs use nanoGPT's letters: `B` batch, `T` time, `C` channels (`n_embd`),
//! `V` vocabulary. Tensors are f32 unless said otherwise; token ids are u32.
#![warn(missing_docs)]

pub mod chat;
pub mod checkpoint;
pub mod data;
pub mod decode;
mod durable;
pub mod error;
pub mod eval;
pub mod gguf;
pub mod hf;
pub mod kernels;
pub mod lora;
pub mod memory;
pub mod model;
pub mod optim;
pub mod pretrain;
pub mod report;
pub mod rlhf;
pub mod sampler;
#[cfg(feature = "server")]
pub mod server;
pub mod sft;
pub mod signals;
#[cfg(test)]
mod testing;
pub mod threads;
pub mod tokenizer;
pub mod train;

/// candle, re-exported so users need not match its version.
pub use candle_core as candle;
/// candle-nn, re-exported for `VarBuilder` and friends.
pub use candle_nn;

pub(crate) use kernels::gemv;
pub use kernels::{attention, layers};

pub use chat::{ChatSession, ChatTemplate, Message, Role};
pub use data::{Split, TokenDataset};
pub use error::{Error, Result};
pub use eval::{bits_per_byte, gsm8k_exact_match, multiple_choice, parse_gsm8k_answer, EvalReport};
pub use gguf::{load_gguf_tokenizer, save_gguf, GgufType};
pub use hf::chat_template::HfChatTemplate;
pub use hf::Gpt2Config;
pub use lora::LoraConfig;
pub use model::{Arch, Gpt, GptConfig, KvCache};
pub use optim::{AdamW, AdamWConfig, LrSchedule};
pub use pretrain::Pretraining;
pub use rlhf::{Dpo, Grpo, GrpoConfig, Ppo, PpoConfig, RewardModel, RewardTraining};
pub use sampler::{generate, LogitsProcessor, SamplingParams};
pub use sft::Sft;
pub use tokenizer::Tokenizer;
pub use train::{Objective, TrainConfig, TrainEvent, Trainer};

/// The README's code blocks, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
