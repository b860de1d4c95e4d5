//! Evaluation: a report card for a checkpoint, in numbers that compare across runs.
//!
//! A training loss says how well a model fits its own tokens; these say how good it is, each
//! measured on held-out data, each over `n` items drawn with a seed (a run is repeatable from
//! its seed, and two checkpoints evaluated with the same seed see the same items):
//!
//! 1. **Bits per byte** ([`bits_per_byte`]) on held-out text, as nanochat's `evaluate_bpb`
//!    (`nanochat/loss_eval.py`): the summed cross-entropy of the target tokens, in nats,
//!    divided by `ln 2` times the UTF-8 bytes those tokens stand for. A loss per token depends
//!    on the tokenizer (a char model's tokens are shorter than a BPE model's); bits per byte
//!    does not, so models with different vocabularies compare. Special tokens stand for no
//!    text: they count 0 bytes and their loss is left out, as nanochat masks them
//!    ([`token_bytes`]). The text is cut into non-overlapping windows of `block_size + 1`
//!    tokens (inputs and shifted targets), and `n` of them are drawn with the seed
//!    ([`held_out_windows`]).
//! 2. **GSM8K exact match** ([`gsm8k_exact_match`]; Cobbe et al. 2021, "Training Verifiers to
//!    Solve Math Word Problems"): the model answers each held-out question in the chat
//!    template, and its final number ([`parse_gsm8k_answer`]: the number after the last
//!    `####`, else the reply's last number) must equal the reference's.
//! 3. **Turn-end rate** ([`turn_end_rate`]): the share of replies that end with `<|end|>`
//!    within the token budget ([`crate::sft::reply_stats`]).
//! 4. **Reward-model pairwise accuracy** ([`reward_accuracy`]): how often a reward model
//!    scores the preferred reply of a held-out pair higher
//!    ([`RewardModel::pair_metrics`]).
//! 5. **Multiple choice by log-likelihood** ([`multiple_choice`]), as the CORE benchmark
//!    (Li et al. 2024, "DataComp-LM", and nanochat's `core_eval.py`) scores a base model: each
//!    choice is scored by the log-probability of its tokens after the question, and the
//!    prediction is the likeliest. Accuracy is also reported **centered** as nanochat's
//!    ChatCORE (`scripts/chat_eval.py`) centers each task, `(acc − chance) / (1 − chance)`
//!    ([`centered`]), so guessing scores 0 and a perfect model 1 whatever the number of
//!    choices; with `k_i` choices for item `i`, chance is the accuracy of guessing,
//!    `mean_i(1 / k_i)`. GSM8K's chance is 0, so its centered score is its accuracy, and
//!    [`EvalReport::chat_core`] is the mean centered score of the tasks evaluated.
//!
//! An [`EvalReport`] holds the results for one checkpoint; [`format_table`] lays several side
//! by side (a row per metric, a column per checkpoint) and [`write_json`] saves them.
//!
//! ```
//! use tinygpt::eval::parse_gsm8k_answer;
//!
//! let reply = "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18 dollars.";
//! assert_eq!(parse_gsm8k_answer(reply).as_deref(), Some("18"));
//! assert_eq!(parse_gsm8k_answer("#### 1,234.50").as_deref(), Some("1234.5"));
//! assert_eq!(parse_gsm8k_answer("I do not know."), None);
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::chat::{ChatTemplate, Message, Role};
use crate::model::Gpt;
use crate::rlhf::data::{PreferenceDataset, PreferencePair, SequenceBatch};
use crate::rlhf::logprobs::{sequence_logprobs, token_logprobs};
use crate::rlhf::reward::{PairMetrics, RewardModel};
use crate::sampler::{FinishReason, SamplingParams, TokenGenerator};
use crate::sft::{reply_stats, ReplyStats};
use crate::tokenizer::{Tokenizer, TokenizerKind};
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Held-out items
// ---------------------------------------------------------------------------------------------

/// `n` distinct indices of `0..len` drawn with a [`ChaCha8Rng`] seeded by `seed`, in
/// increasing order; all of `0..len` when `n >= len`. Every evaluation picks its items so.
///
/// # Errors
/// [`Error::InvalidArgument`] if `n` is 0 or `len` is 0.
pub fn sample_indices(len: usize, n: usize, seed: u64) -> Result<Vec<usize>> {
    if n == 0 {
        return Err(Error::InvalidArgument(
            "n = 0: evaluate at least one held-out item".into(),
        ));
    }
    if len == 0 {
        return Err(Error::InvalidArgument(
            "there are no held-out items to evaluate".into(),
        ));
    }
    if n >= len {
        return Ok((0..len).collect());
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut picked = rand::seq::index::sample(&mut rng, len, n).into_vec();
    picked.sort_unstable();
    Ok(picked)
}

/// The [`ChaCha8Rng`] stream that per-item sampling seeds come from, apart from the one
/// [`sample_indices`] draws items with.
const SEED_STREAM: u64 = 1;

// ---------------------------------------------------------------------------------------------
// Bits per byte
// ---------------------------------------------------------------------------------------------

/// The number of UTF-8 bytes each token id stands for, `(vocab_size,)`: what bits per byte
/// divides by (nanochat's `token_bytes`).
///
/// - Special tokens (`<|endoftext|>`, the chat tokens) count 0: they stand for no text, and
///   [`bits_per_byte`] leaves their loss out.
/// - Byte-level BPE: each character of a token's spelling is one byte of GPT-2's byte
///   alphabet (`Ġ` is the space byte), so a token counts the characters of its spelling.
/// - Char-level: a token is one character, counting its UTF-8 length (1 to 4).
/// - Other tokenizers (loaded from a `tokenizer.json`): byte-fallback tokens (`<0x41>`) count
///   1, others the UTF-8 length of their spelling with SentencePiece's `▁` read as a space.
///   This is exact for SentencePiece BPE and approximate for the rest (a WordPiece `##`
///   prefix, for one, is counted).
pub fn token_bytes(tokenizer: &Tokenizer) -> Vec<u32> {
    let alphabet: HashSet<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    let n = u32::try_from(tokenizer.vocab_size()).unwrap_or(u32::MAX);
    (0..n)
        .map(|id| {
            if tokenizer.is_special(id) {
                return 0;
            }
            let Some(token) = tokenizer.id_to_token(id) else {
                return 0;
            };
            let bytes = match tokenizer.kind() {
                TokenizerKind::ByteLevelBpe if token.chars().all(|c| alphabet.contains(&c)) => {
                    token.chars().count()
                }
                TokenizerKind::ByteLevelBpe | TokenizerKind::Char => token.len(),
                TokenizerKind::Other => {
                    let fallback = token.len() == 6
                        && token.starts_with("<0x")
                        && token.ends_with('>')
                        && u8::from_str_radix(&token[3..5], 16).is_ok();
                    if fallback {
                        1
                    } else {
                        token.replace('\u{2581}', " ").len()
                    }
                }
            };
            u32::try_from(bytes).unwrap_or(u32::MAX)
        })
        .collect()
}

/// The start offsets of the windows [`bits_per_byte`] evaluates on a held-out token stream of
/// `len` tokens: the stream is cut into non-overlapping windows of `block_size + 1` tokens
/// sharing their edges (window `w` has inputs `w·block_size ..` and targets one further), and
/// `n` of the `(len − 1) / block_size` windows are drawn with `seed` ([`sample_indices`]), in
/// order. The tokens after the last whole window are not evaluated.
///
/// # Errors
/// [`Error::InvalidArgument`] if `n` or `block_size` is 0, or the stream holds fewer than
/// `block_size + 1` tokens.
pub fn held_out_windows(len: usize, block_size: usize, n: usize, seed: u64) -> Result<Vec<usize>> {
    if block_size == 0 {
        return Err(Error::InvalidArgument(
            "block_size must be at least 1".into(),
        ));
    }
    if len < block_size + 1 {
        return Err(Error::InvalidArgument(format!(
            "the held-out text has {len} tokens, fewer than block_size + 1 = {}: give a longer \
             text",
            block_size + 1
        )));
    }
    let windows = (len - 1) / block_size;
    Ok(sample_indices(windows, n, seed)?
        .into_iter()
        .map(|w| w * block_size)
        .collect())
}

/// Bits per byte on held-out text ([`bits_per_byte`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Bpb {
    /// Summed loss in nats over the counted target tokens / (`ln 2` × their bytes).
    pub bits_per_byte: f64,
    /// Mean loss per counted target token, in nats.
    pub loss: f64,
    /// Windows evaluated.
    pub windows: usize,
    /// Tokens per window (the model's `block_size`).
    pub block_size: usize,
    /// Target tokens counted (special tokens, which count no bytes, are not).
    pub tokens: usize,
    /// UTF-8 bytes those tokens stand for.
    pub bytes: u64,
}

/// Logits of at most this many elements (`B × T × V`, 256 MB of f32) are computed at once.
const LOGITS_BUDGET: usize = 64 << 20;

/// Bits per byte of `model` on a held-out token stream `tokens` (e.g. the
/// [`crate::data::Split::Val`] split of a [`crate::TokenDataset`]), over `n` windows of the
/// model's `block_size` drawn with `seed` ([`held_out_windows`]). Target tokens that count no
/// bytes ([`token_bytes`]: special tokens) are left out of both sums, as nanochat does. The
/// forward passes are in evaluation mode (no dropout); per-token losses are summed in f64.
///
/// # Errors
/// As [`held_out_windows`]; [`Error::InvalidArgument`] if a token id is outside the model's
/// vocabulary or the windows hold no byte (only special tokens); tensor errors.
pub fn bits_per_byte(
    model: &Gpt,
    tokenizer: &Tokenizer,
    tokens: &[u32],
    n: usize,
    seed: u64,
) -> Result<Bpb> {
    let cfg = model.config();
    let (block, vocab) = (cfg.block_size, cfg.vocab_size);
    if let Some(&id) = tokens.iter().find(|&&id| id as usize >= vocab) {
        return Err(Error::InvalidArgument(format!(
            "token id {id} of the held-out text is outside the model's vocabulary of {vocab}"
        )));
    }
    let starts = held_out_windows(tokens.len(), block, n, seed)?;
    let table = token_bytes(tokenizer);
    let rows = (LOGITS_BUDGET / (block * vocab).max(1)).clamp(1, 64);
    let (mut nats, mut counted, mut bytes) = (0f64, 0usize, 0u64);
    for chunk in starts.chunks(rows) {
        let b = chunk.len();
        let mut x = Vec::with_capacity(b * block);
        let mut y = Vec::with_capacity(b * block);
        for &s in chunk {
            x.extend_from_slice(&tokens[s..s + block]);
            y.extend_from_slice(&tokens[s + 1..s + 1 + block]);
        }
        let x = Tensor::from_vec(x, (b, block), model.device())?;
        let targets = Tensor::from_slice(&y, (b, block), model.device())?;
        let logits = model.forward(&x)?; // (B, T, V)
        let logprobs = token_logprobs(&logits, &targets)?.flatten_all()?; // (B·T,)
        for (lp, &id) in logprobs.to_vec1::<f32>()?.into_iter().zip(&y) {
            let nb = table.get(id as usize).copied().unwrap_or(0);
            if nb > 0 {
                nats -= f64::from(lp);
                counted += 1;
                bytes += u64::from(nb);
            }
        }
    }
    if bytes == 0 {
        return Err(Error::InvalidArgument(
            "the held-out windows hold only special tokens: no text to measure".into(),
        ));
    }
    Ok(Bpb {
        bits_per_byte: nats / (std::f64::consts::LN_2 * bytes as f64),
        loss: nats / counted as f64,
        windows: starts.len(),
        block_size: block,
        tokens: counted,
        bytes,
    })
}

// ---------------------------------------------------------------------------------------------
// GSM8K
// ---------------------------------------------------------------------------------------------

/// The final answer of a GSM8K solution or reply, normalised: the first number after the last
/// `####`, or, in a text without `####`, its last number; `None` when there is none.
///
/// GSM8K's calculator annotations count as their result only (`<<48/2=24>>` reads as `24`,
/// its operands never as the answer); an annotation left open (a reply cut short) is dropped.
/// A number is normalised so that equal values compare equal: thousands separators are
/// dropped (`1,234` → `1234`: a comma then exactly three digits), so are leading zeros and
/// the trailing zeros of a fraction (`3.50` → `3.5`, `5.0` → `5`, `.5` → `0.5`); a minus sign
/// is kept when it does not follow a letter or digit (`-5`, but `5-3` is 5 and 3; `-0` → `0`).
/// Currency, percent signs, units and punctuation around the number are not part of it
/// (`#### $18.00 dollars.` → `18`). Fractions and exponents are not read as one number.
pub fn parse_gsm8k_answer(reply: &str) -> Option<String> {
    let text = annotation_results(reply);
    match text.rfind("####") {
        Some(at) => numbers(&text[at + 4..]).into_iter().next(),
        None => numbers(&text).pop(),
    }
}

/// `text` with each `<<expression=result>>` replaced by ` result ` and an unclosed `<<…`
/// dropped.
fn annotation_results(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(open) = rest.find("<<") {
        out.push_str(&rest[..open]);
        let inner = &rest[open + 2..];
        let Some(close) = inner.find(">>") else {
            return out;
        };
        if let Some((_, result)) = inner[..close].rsplit_once('=') {
            out.push(' ');
            out.push_str(result);
            out.push(' ');
        }
        rest = &inner[close + 2..];
    }
    out.push_str(rest);
    out
}

/// Every number of `text`, in order, normalised as [`parse_gsm8k_answer`] says.
fn numbers(text: &str) -> Vec<String> {
    let b = text.as_bytes(); // digits, '-', '.', ',' are ASCII: never inside a multi-byte char
    let digit = |k: usize| b.get(k).is_some_and(u8::is_ascii_digit);
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let after_word = i > 0 && b[i - 1].is_ascii_alphanumeric();
        let after_digit = i > 0 && b[i - 1].is_ascii_digit();
        let point_start = |k: usize| b.get(k) == Some(&b'.') && digit(k + 1);
        let negative = b[i] == b'-' && !after_word && (digit(i + 1) || point_start(i + 1));
        if !(digit(i) || (point_start(i) && !after_digit) || negative) {
            i += 1;
            continue;
        }
        if negative {
            i += 1;
        }
        let mut int = String::new();
        while digit(i) {
            int.push(char::from(b[i]));
            i += 1;
            // A thousands separator: a comma, then exactly three digits.
            if b.get(i) == Some(&b',') && (1..=3).all(|k| digit(i + k)) && !digit(i + 4) {
                i += 1;
            }
        }
        let mut frac = String::new();
        if point_start(i) {
            i += 1;
            while digit(i) {
                frac.push(char::from(b[i]));
                i += 1;
            }
        }
        let int = int.trim_start_matches('0');
        let frac = frac.trim_end_matches('0');
        let int = if int.is_empty() { "0" } else { int };
        let zero = int == "0" && frac.is_empty();
        let mut number = String::new();
        if negative && !zero {
            number.push('-');
        }
        number.push_str(int);
        if !frac.is_empty() {
            number.push('.');
            number.push_str(frac);
        }
        out.push(number);
    }
    out
}

/// One GSM8K item as answered ([`Gsm8kReport::examples`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gsm8kExample {
    /// The question (the last user message before the reference answer).
    pub question: String,
    /// The model's reply, as people would see it ([`crate::chat::reply_text`]).
    pub reply: String,
    /// The reference's answer, normalised.
    pub expected: String,
    /// The reply's answer, normalised; `None` when it holds no number.
    pub got: Option<String>,
}

/// GSM8K exact match ([`gsm8k_exact_match`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gsm8kReport {
    /// Questions answered.
    pub items: usize,
    /// Replies whose answer equals the reference's.
    pub correct: usize,
    /// `correct / items`.
    pub accuracy: f64,
    /// Replies that ended with `<|end|>` (the rest ran out of `max_new_tokens`).
    pub ended: usize,
    /// Conversations left out before sampling: no assistant turn, or a reference without a
    /// number.
    pub unscorable: usize,
    /// The first few items, in order.
    pub examples: Vec<Gsm8kExample>,
}

/// How many answered items [`Gsm8kReport::examples`] keeps.
pub const GSM8K_EXAMPLES: usize = 4;

/// GSM8K exact match of a chat model: for each of `n` held-out conversations drawn with
/// `seed` ([`sample_indices`]), the prompt is every message before its last assistant turn
/// rendered by the chat template (ending with an open `<|assistant|>`), the model replies
/// with `params` until `<|end|>` or `<|endoftext|>` or `params.max_new_tokens`, and the
/// reply's answer ([`parse_gsm8k_answer`]) is compared with the reference's (that last
/// assistant turn's). Conversations without a scorable reference are left out first and
/// counted ([`Gsm8kReport::unscorable`]).
///
/// Greedy `params` (temperature 0, as nanochat evaluates) are deterministic. Sampled ones
/// draw each reply with its own seed, taken from a [`ChaCha8Rng`] seeded by `seed`
/// (`params.seed` is not used), so a run repeats from `seed` alone.
///
/// # Errors
/// [`Error::InvalidArgument`] if the tokenizer has no chat tokens, `n` is 0, no conversation
/// is scorable, `params` is invalid, or a message does not encode (naming the conversation);
/// generation errors.
pub fn gsm8k_exact_match(
    model: &Gpt,
    tokenizer: &Tokenizer,
    conversations: &[Vec<Message>],
    n: usize,
    params: &SamplingParams,
    seed: u64,
) -> Result<Gsm8kReport> {
    params.validate()?;
    let template = ChatTemplate::new(tokenizer)?;
    let scorable: Vec<(usize, usize, String)> = conversations
        .iter()
        .enumerate()
        .filter_map(|(i, conv)| {
            let last = conv.iter().rposition(|m| m.role == Role::Assistant)?;
            let expected = parse_gsm8k_answer(&conv[last].content)?;
            Some((i, last, expected))
        })
        .collect();
    if scorable.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "none of the {} conversations ends with an assistant turn holding a reference \
             answer (a number, after `####` in GSM8K)",
            conversations.len()
        )));
    }
    let picked = sample_indices(scorable.len(), n, seed)?;
    let mut seeds = ChaCha8Rng::seed_from_u64(seed);
    seeds.set_stream(SEED_STREAM);
    let stops = vec![template.end_id(), tokenizer.eot_id()];
    let mut report = Gsm8kReport {
        items: 0,
        correct: 0,
        accuracy: 0.0,
        ended: 0,
        unscorable: conversations.len() - scorable.len(),
        examples: Vec::new(),
    };
    for k in picked {
        let (i, last, expected) = &scorable[k];
        let conv = &conversations[*i];
        let prompt = template
            .render_prompt(tokenizer, &conv[..*last])
            .map_err(|e| in_conversation(*i, e))?;
        let item_params = params
            .clone()
            .with_stop_tokens(stops.clone())
            .with_seed(seeds.next_u64());
        let mut generator = TokenGenerator::new(model, &prompt, &item_params)?
            .with_vocab_limit(tokenizer.vocab_size());
        for id in generator.by_ref() {
            id?;
        }
        let reply = crate::chat::reply_text(tokenizer, generator.generated())?;
        let got = parse_gsm8k_answer(&reply);
        report.items += 1;
        report.correct += usize::from(got.as_ref() == Some(expected));
        report.ended += usize::from(generator.finish_reason() == Some(FinishReason::Stop));
        if report.examples.len() < GSM8K_EXAMPLES {
            let question = conv[..*last]
                .iter()
                .rev()
                .find(|m| m.role == Role::User)
                .map(|m| m.content.clone())
                .unwrap_or_default();
            report.examples.push(Gsm8kExample {
                question,
                reply,
                expected: expected.clone(),
                got,
            });
        }
    }
    report.accuracy = report.correct as f64 / report.items.max(1) as f64;
    Ok(report)
}

/// A tokenizer error on conversation `i` of a held-out set, saying which one it was.
fn in_conversation(i: usize, e: Error) -> Error {
    Error::InvalidArgument(format!("held-out conversation {i} (from 0): {e}"))
}

// ---------------------------------------------------------------------------------------------
// Turn-end rate and reward-model accuracy
// ---------------------------------------------------------------------------------------------

/// How replies to held-out prompts ended ([`turn_end_rate`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TurnEndReport {
    /// Prompts, replies ended with `<|end|>`, mean reply length.
    #[serde(flatten)]
    pub stats: ReplyStats,
    /// [`ReplyStats::end_rate`]: the fraction of replies that ended with `<|end|>`.
    pub end_rate: f64,
}

/// The turn-end rate of a chat model on `n` held-out conversations (those with an assistant
/// turn) drawn with `seed`: [`crate::sft::reply_stats`] on them, with `params` as given.
///
/// # Errors
/// [`Error::InvalidArgument`] if `n` is 0 or no conversation has an assistant turn; as
/// [`crate::sft::reply_stats`].
pub fn turn_end_rate(
    model: &Gpt,
    tokenizer: &Tokenizer,
    conversations: &[Vec<Message>],
    n: usize,
    params: &SamplingParams,
    seed: u64,
) -> Result<TurnEndReport> {
    let with_reply: Vec<&Vec<Message>> = conversations
        .iter()
        .filter(|c| c.iter().any(|m| m.role == Role::Assistant))
        .collect();
    if with_reply.is_empty() {
        return Err(Error::InvalidArgument(format!(
            "none of the {} conversations has an assistant turn to reply in",
            conversations.len()
        )));
    }
    let picked: Vec<Vec<Message>> = sample_indices(with_reply.len(), n, seed)?
        .into_iter()
        .map(|i| with_reply[i].clone())
        .collect();
    let stats = reply_stats(model, tokenizer, &picked, params)?;
    Ok(TurnEndReport {
        stats,
        end_rate: stats.end_rate(),
    })
}

/// A reward model's ranking of held-out pairs ([`reward_accuracy`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardReport {
    /// Pairs scored, loss, pairwise accuracy (ties count one half), margin, mean rewards.
    #[serde(flatten)]
    pub metrics: PairMetrics,
    /// Pairs drawn but dropped: not even one prompt token fit beside the longer reply.
    pub dropped: usize,
    /// Pairs scored with a cut prompt or reply.
    pub truncated: usize,
}

/// Pairs per forward pass in [`reward_accuracy`].
const REWARD_BATCH: usize = 8;

/// The pairwise accuracy of a reward model on `n` held-out pairs drawn with `seed`:
/// [`RewardModel::pair_metrics`] over them, each fitted to the context as reward training
/// fits them ([`PreferenceDataset::new`], replies cut to half the context).
///
/// # Errors
/// [`Error::InvalidArgument`] if `n` is 0, `pairs` is empty, the tokenizer has no chat tokens
/// or every pair drawn is too long to score; tokenizer and tensor errors.
pub fn reward_accuracy(
    model: &RewardModel,
    tokenizer: &Tokenizer,
    pairs: &[PreferencePair],
    n: usize,
    seed: u64,
) -> Result<RewardReport> {
    let template = ChatTemplate::new(tokenizer)?;
    let picked: Vec<PreferencePair> = sample_indices(pairs.len(), n, seed)?
        .into_iter()
        .map(|i| pairs[i].clone())
        .collect();
    let block = model.backbone().config().block_size;
    let (data, fit) =
        PreferenceDataset::new(&picked, tokenizer, &template, block, (block / 2).max(1))?;
    let metrics = model
        .pair_metrics(&data, tokenizer.eot_id(), REWARD_BATCH, usize::MAX)?
        .ok_or_else(|| {
            Error::InvalidArgument(format!(
                "none of the {} pairs drawn fits the context of {block} tokens",
                picked.len()
            ))
        })?;
    Ok(RewardReport {
        metrics,
        dropped: fit.dropped,
        truncated: fit.truncated,
    })
}

// ---------------------------------------------------------------------------------------------
// Multiple choice
// ---------------------------------------------------------------------------------------------

/// One multiple-choice item: a question, its choices, and the index of the right one.
///
/// In a file ([`load_choice_file`]) each line is
/// `{"question": "…", "choices": ["…", "…", …], "answer": A}`, where `A` is the 0-based index
/// of the right choice or its text (which must be exactly one of the choices).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChoiceItem {
    /// The question (not empty).
    pub question: String,
    /// At least two distinct, non-empty choices.
    pub choices: Vec<String>,
    /// The 0-based index of the right choice.
    pub answer: usize,
    /// The 1-based line of the item in its file, when it came from one (for messages).
    #[serde(skip)]
    pub line: Option<usize>,
}

impl ChoiceItem {
    /// Checks the item as [`load_choice_file`] does; the error says what is wrong.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty question, fewer than two choices, an empty or
    /// repeated choice, or an answer index out of range.
    pub fn validate(&self) -> Result<()> {
        self.check(None)
    }

    /// [`ChoiceItem::validate`], naming the item by its line or else by `index`.
    fn check(&self, index: Option<usize>) -> Result<()> {
        check_choices(&self.question, &self.choices)
            .and_then(|()| {
                if self.answer < self.choices.len() {
                    Ok(())
                } else {
                    Err(index_out_of_range(self.answer, self.choices.len()))
                }
            })
            .map_err(|msg| Error::InvalidArgument(format!("{}: {msg}", self.place(index))))
    }

    /// "line L" for an item from a file, else "item i" (from 0) when its index is known.
    fn place(&self, index: Option<usize>) -> String {
        match (self.line, index) {
            (Some(l), _) => format!("line {l}"),
            (None, Some(i)) => format!("item {i} (from 0)"),
            (None, None) => "the item".into(),
        }
    }
}

fn check_choices(question: &str, choices: &[String]) -> std::result::Result<(), String> {
    if question.trim().is_empty() {
        return Err("`question` is empty".into());
    }
    if choices.len() < 2 {
        return Err(format!(
            "`choices` has {} choice{}; a multiple-choice item needs at least 2",
            choices.len(),
            if choices.len() == 1 { "" } else { "s" }
        ));
    }
    for (j, c) in choices.iter().enumerate() {
        if c.is_empty() {
            return Err(format!("choice {j} (from 0) is empty"));
        }
        if let Some(k) = choices[..j].iter().position(|d| d == c) {
            return Err(format!("choices {k} and {j} (from 0) are the same, {c:?}"));
        }
    }
    Ok(())
}

fn index_out_of_range(answer: impl std::fmt::Display, k: usize) -> String {
    format!(
        "`answer` {answer} is out of range for {k} choices (a 0-based index: 0 to {})",
        k - 1
    )
}

/// Reads multiple-choice items from a JSONL file, one item per line (see [`ChoiceItem`]).
/// Blank lines and a leading byte-order mark are ignored; unknown fields are an error.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read; [`Error::BadFile`] naming the file and the
/// 1-based line for a line that is not UTF-8 or not JSON, a missing field, an empty question,
/// fewer than two choices, an empty or repeated choice, an answer index out of range, an
/// answer text that is none of the choices, or an answer of another type; without a line if
/// the file holds no item.
pub fn load_choice_file(path: impl AsRef<Path>) -> Result<Vec<ChoiceItem>> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Record {
        question: String,
        choices: Vec<String>,
        answer: serde_json::Value,
    }
    let path = path.as_ref();
    let mut items = Vec::new();
    for line in crate::data::read_lines(path)? {
        if line.is_blank() {
            continue;
        }
        let bad = |msg: String| Error::bad_file(path, Some(line.number), msg);
        let text = line.text.clone().map_err(bad)?;
        let r: Record =
            serde_json::from_str(&text).map_err(|e| Error::json(path, Some(line.number), &e))?;
        check_choices(&r.question, &r.choices).map_err(bad)?;
        let k = r.choices.len();
        let answer = match &r.answer {
            serde_json::Value::Number(x) => match x.as_u64() {
                Some(a) => match usize::try_from(a) {
                    Ok(a) if a < k => a,
                    _ => return Err(bad(index_out_of_range(a, k))),
                },
                None => {
                    return Err(bad(format!(
                        "`answer` {x} is not a 0-based choice index (0 to {})",
                        k - 1
                    )))
                }
            },
            serde_json::Value::String(s) => match r.choices.iter().position(|c| c == s) {
                Some(a) => a,
                None => {
                    return Err(bad(format!(
                        "`answer` {s:?} is none of the choices {:?}",
                        r.choices
                    )))
                }
            },
            other => {
                return Err(bad(format!(
                    "`answer` must be a 0-based choice index or the text of a choice, got {other}"
                )))
            }
        };
        items.push(ChoiceItem {
            question: r.question,
            choices: r.choices,
            answer,
            line: Some(line.number),
        });
    }
    if items.is_empty() {
        return Err(Error::bad_file(
            path,
            None,
            "no multiple-choice item in the file",
        ));
    }
    Ok(items)
}

/// The log-likelihood of each choice of an item ([`choice_logprobs`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChoiceScores {
    /// `Σ log p(token | everything before it)` over each choice's tokens, in nats.
    pub sum_logprob: Vec<f64>,
    /// The same divided by the choice's token count (length-normalised).
    pub mean_logprob: Vec<f64>,
    /// Each choice's token count.
    pub tokens: Vec<usize>,
}

/// The prompt of an item and the tokens of each of its choices, as [`choice_logprobs`] scores
/// them.
fn choice_rows(tokenizer: &Tokenizer, item: &ChoiceItem) -> Result<(Vec<u32>, Vec<Vec<u32>>)> {
    match ChatTemplate::new(tokenizer) {
        Ok(template) => {
            let prompt = template.render_prompt(tokenizer, &[Message::user(&item.question)])?;
            let choices = item
                .choices
                .iter()
                .map(|c| tokenizer.encode_text(c))
                .collect::<Result<_>>()?;
            Ok((prompt, choices))
        }
        Err(_) => {
            let prompt = tokenizer.encode_text(&item.question)?;
            let choices = item
                .choices
                .iter()
                .map(|c| tokenizer.encode_text(&format!(" {c}")))
                .collect::<Result<_>>()?;
            Ok((prompt, choices))
        }
    }
}

/// Scores every choice of `item` by the log-probability the model gives its tokens after the
/// question, all choices in one forward pass (evaluation mode).
///
/// For a chat tokenizer the question is a user turn rendered by the chat template, ending
/// with an open `<|assistant|>`, and a choice is the reply's text (no `<|end|>` after it).
/// For a base model (no chat tokens) the question is plain text and a choice its continuation
/// after a space, `" " + choice`, as lm-evaluation-harness joins them. Both are encoded as
/// text ([`Tokenizer::encode_text`]). When question and choice overflow the context, the
/// question is cut from the left.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the item (its line, or `index`) if it is invalid
/// ([`ChoiceItem::validate`]), does not encode, or a choice alone does not fit the context
/// beside one question token; tensor errors.
pub fn choice_logprobs(
    model: &Gpt,
    tokenizer: &Tokenizer,
    item: &ChoiceItem,
    index: Option<usize>,
) -> Result<ChoiceScores> {
    item.check(index)?;
    let at = |msg: String| Error::InvalidArgument(format!("{}: {msg}", item.place(index)));
    let (prompt, choices) = choice_rows(tokenizer, item).map_err(|e| at(e.to_string()))?;
    let block = model.config().block_size;
    let mut rows: Vec<(&[u32], &[u32])> = Vec::with_capacity(choices.len());
    for (j, c) in choices.iter().enumerate() {
        if c.len() >= block {
            return Err(at(format!(
                "choice {j} (from 0) has {} tokens, more than the context of {block} leaves \
                 beside one question token",
                c.len()
            )));
        }
        let keep = prompt.len().min(block - c.len());
        rows.push((&prompt[prompt.len() - keep..], c.as_slice()));
    }
    let batch = SequenceBatch::new(&rows, tokenizer.eot_id(), model.device())?;
    let (_, summed) = sequence_logprobs(model, &batch, None)?; // (k,)
    let sum_logprob: Vec<f64> = summed
        .to_vec1::<f32>()?
        .into_iter()
        .map(f64::from)
        .collect();
    let tokens: Vec<usize> = choices.iter().map(Vec::len).collect();
    let mean_logprob = sum_logprob
        .iter()
        .zip(&tokens)
        .map(|(s, &t)| s / t as f64)
        .collect();
    Ok(ChoiceScores {
        sum_logprob,
        mean_logprob,
        tokens,
    })
}

/// The index of the largest score (the first of equal ones).
fn argmax(scores: &[f64]) -> usize {
    scores
        .iter()
        .enumerate()
        .fold((0, f64::NEG_INFINITY), |(bi, bs), (i, &s)| {
            if s > bs {
                (i, s)
            } else {
                (bi, bs)
            }
        })
        .0
}

/// An accuracy centered on its chance level, as nanochat's ChatCORE centers each task:
/// `(accuracy − chance) / (1 − chance)`, 0 for guessing and 1 for a perfect score (negative
/// below chance). `chance` must be below 1.
pub fn centered(accuracy: f64, chance: f64) -> f64 {
    (accuracy - chance) / (1.0 - chance)
}

/// Multiple-choice results ([`multiple_choice`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChoiceReport {
    /// Items scored.
    pub items: usize,
    /// Items whose likeliest choice (summed log-probability) is the answer.
    pub correct: usize,
    /// `correct / items`.
    pub accuracy: f64,
    /// Accuracy when choices are ranked by their mean log-probability per token instead
    /// (length-normalised, which favours long choices less).
    pub accuracy_per_token: f64,
    /// The accuracy of guessing, `mean(1 / k)` over the items' numbers of choices `k`.
    pub chance: f64,
    /// [`centered`]`(accuracy, chance)`: 0 for guessing, 1 for every item right.
    pub centered: f64,
}

/// Multiple-choice accuracy by log-likelihood on `n` items drawn with `seed`: each item's
/// choices are scored by [`choice_logprobs`] and the prediction is the choice with the largest
/// summed log-probability (also reported ranked by the mean per token), ties going to the
/// first choice.
///
/// # Errors
/// [`Error::InvalidArgument`] if `n` is 0 or `items` is empty; as [`choice_logprobs`].
pub fn multiple_choice(
    model: &Gpt,
    tokenizer: &Tokenizer,
    items: &[ChoiceItem],
    n: usize,
    seed: u64,
) -> Result<ChoiceReport> {
    let picked = sample_indices(items.len(), n, seed)?;
    let (mut correct, mut correct_mean, mut chance) = (0usize, 0usize, 0f64);
    for &i in &picked {
        let item = &items[i];
        let scores = choice_logprobs(model, tokenizer, item, Some(i))?;
        correct += usize::from(argmax(&scores.sum_logprob) == item.answer);
        correct_mean += usize::from(argmax(&scores.mean_logprob) == item.answer);
        chance += 1.0 / item.choices.len() as f64;
    }
    let k = picked.len() as f64;
    let accuracy = correct as f64 / k;
    let chance = chance / k;
    Ok(ChoiceReport {
        items: picked.len(),
        correct,
        accuracy,
        accuracy_per_token: correct_mean as f64 / k,
        chance,
        centered: centered(accuracy, chance),
    })
}

// ---------------------------------------------------------------------------------------------
// The report
// ---------------------------------------------------------------------------------------------

/// Every evaluation of one checkpoint (the ones not run are `None`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// The checkpoint directory (or any name for the column).
    pub checkpoint: String,
    /// Items asked for per evaluation.
    pub n: usize,
    /// The seed the items (and sampled replies) were drawn with.
    pub seed: u64,
    /// Bits per byte on held-out text.
    pub bpb: Option<Bpb>,
    /// GSM8K exact match.
    pub gsm8k: Option<Gsm8kReport>,
    /// Turn-end rate.
    pub turn_end: Option<TurnEndReport>,
    /// Reward-model pairwise accuracy (for a reward-model checkpoint).
    pub reward: Option<RewardReport>,
    /// Multiple-choice accuracy.
    pub choices: Option<ChoiceReport>,
    /// What was skipped or assumed, for people.
    pub notes: Vec<String>,
}

impl EvalReport {
    /// An empty report for `checkpoint`, evaluated on `n` items with `seed`.
    pub fn new(checkpoint: impl Into<String>, n: usize, seed: u64) -> Self {
        Self {
            checkpoint: checkpoint.into(),
            n,
            seed,
            ..Self::default()
        }
    }

    /// The mean centered score of the tasks evaluated, as nanochat's ChatCORE averages its
    /// tasks: GSM8K's accuracy (its chance is 0) and the multiple-choice [`centered`] score;
    /// `None` when neither ran.
    pub fn chat_core(&self) -> Option<f64> {
        let scores: Vec<f64> = [
            self.gsm8k.as_ref().map(|g| g.accuracy),
            self.choices.as_ref().map(|c| c.centered),
        ]
        .into_iter()
        .flatten()
        .collect();
        (!scores.is_empty()).then(|| scores.iter().sum::<f64>() / scores.len() as f64)
    }
}

/// A percentage with the counts behind it: `12.0% (12/100)`.
fn percent(part: usize, whole: usize) -> String {
    format!(
        "{:.1}% ({part}/{whole})",
        100.0 * part as f64 / whole.max(1) as f64
    )
}

/// The reports side by side as a plain-text table: a row per metric that any report has, a
/// column per report (headed by its checkpoint), `-` where a report lacks the metric. Each
/// line ends with a newline.
pub fn format_table(reports: &[EvalReport]) -> String {
    type Cell = fn(&EvalReport) -> Option<String>;
    let rows: [(&str, Cell); 13] = [
        ("bits per byte", |r| {
            r.bpb.map(|b| format!("{:.4}", b.bits_per_byte))
        }),
        ("loss (nats/token)", |r| {
            r.bpb.map(|b| format!("{:.4}", b.loss))
        }),
        ("gsm8k exact match", |r| {
            r.gsm8k.as_ref().map(|g| percent(g.correct, g.items))
        }),
        ("gsm8k replies ended", |r| {
            r.gsm8k.as_ref().map(|g| percent(g.ended, g.items))
        }),
        ("turn-end rate", |r| {
            r.turn_end.map(|t| percent(t.stats.ended, t.stats.prompts))
        }),
        ("mean reply tokens", |r| {
            r.turn_end.map(|t| format!("{:.1}", t.stats.mean_tokens))
        }),
        ("reward pair accuracy", |r| {
            r.reward.map(|m| {
                format!(
                    "{:.1}% ({} pairs)",
                    100.0 * m.metrics.accuracy,
                    m.metrics.pairs
                )
            })
        }),
        ("reward margin", |r| {
            r.reward.map(|m| format!("{:.4}", m.metrics.margin))
        }),
        ("choice accuracy", |r| {
            r.choices.map(|c| percent(c.correct, c.items))
        }),
        ("choice acc. (per token)", |r| {
            r.choices
                .map(|c| format!("{:.1}%", 100.0 * c.accuracy_per_token))
        }),
        ("choice chance", |r| {
            r.choices.map(|c| format!("{:.1}%", 100.0 * c.chance))
        }),
        ("choice centered", |r| {
            r.choices.map(|c| format!("{:.4}", c.centered))
        }),
        ("mean centered (ChatCORE)", |r| {
            r.chat_core().map(|v| format!("{v:.4}"))
        }),
    ];
    let mut table: Vec<Vec<String>> = vec![std::iter::once("metric".to_string())
        .chain(reports.iter().map(|r| r.checkpoint.clone()))
        .collect()];
    for (name, cell) in rows {
        let cells: Vec<Option<String>> = reports.iter().map(cell).collect();
        if cells.iter().any(Option::is_some) {
            table.push(
                std::iter::once(name.to_string())
                    .chain(cells.into_iter().map(|c| c.unwrap_or_else(|| "-".into())))
                    .collect(),
            );
        }
    }
    let widths: Vec<usize> = (0..=reports.len())
        .map(|c| {
            table
                .iter()
                .map(|row| row[c].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for (r, row) in table.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, &w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join(" | ").trim_end());
        out.push('\n');
        if r == 0 {
            let rule: Vec<String> = widths.iter().map(|&w| "-".repeat(w)).collect();
            out.push_str(&rule.join("-|-"));
            out.push('\n');
        }
    }
    out
}

/// A report as [`write_json`] writes it: its fields and [`EvalReport::chat_core`].
#[derive(Serialize)]
struct ReportJson<'a> {
    #[serde(flatten)]
    report: &'a EvalReport,
    chat_core: Option<f64>,
}

/// Writes the reports to `path` as a pretty-printed JSON array (each report's fields and its
/// `chat_core`), atomically: a crash leaves the old file or the new one.
///
/// # Errors
/// [`Error::Io`] naming the file (or its directory, which must exist).
pub fn write_json(path: impl AsRef<Path>, reports: &[EvalReport]) -> Result<()> {
    let path: PathBuf = path.as_ref().to_path_buf();
    let rows: Vec<ReportJson<'_>> = reports
        .iter()
        .map(|report| ReportJson {
            report,
            chat_core: report.chat_core(),
        })
        .collect();
    let mut json = serde_json::to_string_pretty(&rows).map_err(|e| {
        Error::io(
            &path,
            std::io::Error::other(format!("serialising the reports: {e}")),
        )
    })?;
    json.push('\n');
    crate::durable::write_atomic(&path, json.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::cross_entropy;
    use crate::testing::tiny_gpt;
    use candle_core::{Device, D};

    const ASCII: &str = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n\
        All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to \
        famish?\n\nAll:\nResolved. resolved.\n";

    #[test]
    fn bpb_of_a_char_model_on_ascii_is_its_mean_loss_over_ln_2() {
        let tok = Tokenizer::train_char(ASCII).unwrap();
        let model = tiny_gpt(tok.vocab_size(), 16);
        let tokens = tok.encode(&ASCII.repeat(3)).unwrap();
        let (n, seed) = (5, 7);
        let bpb = bits_per_byte(&model, &tok, &tokens, n, seed).unwrap();
        // The same windows, through the training loss.
        let starts = held_out_windows(tokens.len(), 16, n, seed).unwrap();
        assert_eq!(starts.len(), n);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for &s in &starts {
            x.extend_from_slice(&tokens[s..s + 16]);
            y.extend_from_slice(&tokens[s + 1..s + 17]);
        }
        let x = Tensor::from_vec(x, (n, 16), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(y, n * 16, &Device::Cpu).unwrap();
        let logits = model
            .forward(&x)
            .unwrap()
            .reshape((n * 16, tok.vocab_size()))
            .unwrap();
        let mean = cross_entropy(&logits, &y, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        assert!(
            (bpb.bits_per_byte - mean / std::f64::consts::LN_2).abs() < 1e-6,
            "{bpb:?} vs mean loss {mean}"
        );
        assert!((bpb.loss - mean).abs() < 1e-6, "{bpb:?} vs {mean}");
        assert_eq!(
            (bpb.windows, bpb.tokens, bpb.bytes),
            (n, n * 16, n as u64 * 16)
        );
        // Same seed, same windows; the windows never overlap.
        assert_eq!(bits_per_byte(&model, &tok, &tokens, n, seed).unwrap(), bpb);
        assert!(starts.windows(2).all(|w| w[1] >= w[0] + 16));
        let all = held_out_windows(tokens.len(), 16, usize::MAX, seed).unwrap();
        assert_eq!(all.len(), (tokens.len() - 1) / 16);
        assert_eq!(all[1], 16);
    }

    #[test]
    fn bpe_token_bytes_sum_to_the_text_bytes() {
        let tok = Tokenizer::train_bpe(&ASCII.repeat(4), 300).unwrap();
        let table = token_bytes(&tok);
        assert_eq!(table.len(), tok.vocab_size());
        assert_eq!(table[tok.eot_id() as usize], 0);
        let text = "Speak, speak — 中文 🦀👍🏽 naïve\r\n\tresolved  ";
        let bytes: u32 = tok
            .encode(text)
            .unwrap()
            .iter()
            .map(|&id| table[id as usize])
            .sum();
        assert_eq!(bytes as usize, text.len());
        // A special token stands for no text.
        let with_eot = format!("{text}<|endoftext|>{text}");
        let bytes: u32 = tok
            .encode(&with_eot)
            .unwrap()
            .iter()
            .map(|&id| table[id as usize])
            .sum();
        assert_eq!(bytes as usize, 2 * text.len());
        // Char tokens count their UTF-8 length; chat tokens count nothing.
        let mut chars = Tokenizer::train_char("aé中🦀").unwrap();
        ChatTemplate::add_tokens(&mut chars).unwrap();
        let table = token_bytes(&chars);
        let ids = chars.encode("aé中🦀").unwrap();
        let lens: Vec<u32> = ids.iter().map(|&id| table[id as usize]).collect();
        assert_eq!(lens, [1, 2, 3, 4]);
        let end = chars.token_to_id(crate::chat::END).unwrap();
        assert_eq!(table[end as usize], 0);
    }

    #[test]
    fn bpb_errors_are_clear() {
        let tok = Tokenizer::train_char(ASCII).unwrap();
        let model = tiny_gpt(tok.vocab_size(), 16);
        let tokens = tok.encode(ASCII).unwrap();
        let e = bits_per_byte(&model, &tok, &tokens, 0, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("n = 0"), "{e}");
        let e = bits_per_byte(&model, &tok, &tokens[..10], 4, 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("10 tokens, fewer than block_size + 1 = 17"),
            "{e}"
        );
        let only_eot = vec![tok.eot_id(); 40];
        let e = bits_per_byte(&model, &tok, &only_eot, 4, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("only special tokens"), "{e}");
    }

    #[test]
    fn gsm8k_answers_parse() {
        let cases: &[(&str, Option<&str>)] = &[
            ("#### 18", Some("18")),
            (
                "She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18",
                Some("18"),
            ),
            ("#### 1,234", Some("1234")),
            ("#### 1,000,000 people", Some("1000000")),
            ("#### -5", Some("-5")),
            ("The change is -12.", Some("-12")),
            ("#### 3.50", Some("3.5")),
            ("#### 5.0", Some("5")),
            ("#### $18.00", Some("18")),
            ("#### 18 dollars.", Some("18")),
            ("#### 50%", Some("50")),
            ("#### .5", Some("0.5")),
            ("#### -0.0", Some("0")),
            ("#### 007", Some("7")),
            ("So the answer is 42.", Some("42")),
            ("It costs $1,234.56 in all", Some("1234.56")),
            ("#### 3\nwait, no\n#### 7", Some("7")),
            ("#### 10\nThat is 10 apples, or 12 pears", Some("10")),
            ("5-3=2", Some("2")),
            ("#### 5-3", Some("5")),
            ("3,4 and 5", Some("5")),
            ("1,2345", Some("2345")),
            ("Natalia sold 48/2 = <<48/2=24>>24 clips.", Some("24")),
            ("He had <<3+4=7>>", Some("7")),
            ("#### <<2+2=4>>4", Some("4")),
            ("The total is 5 and <<5*", Some("5")),
            ("I don't know.", None),
            ("", None),
            ("#### ", None),
            ("3 apples\n#### many", None),
            ("item v2", Some("2")),
        ];
        for (reply, want) in cases {
            assert_eq!(
                parse_gsm8k_answer(reply).as_deref(),
                *want,
                "reply {reply:?}"
            );
        }
        assert!(cases.len() >= 12);
    }

    fn chat_tokenizer() -> Tokenizer {
        let mut tok =
            Tokenizer::train_char("0123456789 #abcdefghijklmnopqrstuvwxyz?.,$\n").unwrap();
        ChatTemplate::add_tokens(&mut tok).unwrap();
        tok
    }

    #[test]
    fn gsm8k_exact_match_scores_a_seeded_sample() {
        let tok = chat_tokenizer();
        let model = tiny_gpt(tok.vocab_size(), 32);
        let conv = |q: &str, a: &str| vec![Message::user(q), Message::assistant(a)];
        let convs = vec![
            conv("how many? 1", "it is 1.\n#### 1"),
            conv("how many? 2", "#### 2"),
            vec![Message::user("no reply")],
            conv("how many? 3", "no number"),
            conv("how many? 4", "#### 4,000"),
        ];
        let params = SamplingParams::greedy().with_max_new_tokens(6);
        let r = gsm8k_exact_match(&model, &tok, &convs, 2, &params, 3).unwrap();
        assert_eq!((r.items, r.unscorable, r.examples.len()), (2, 2, 2));
        assert!(r.correct <= r.items && (0.0..=1.0).contains(&r.accuracy));
        assert!(r.examples[0].question.starts_with("how many?"));
        assert!(["1", "2", "4000"].contains(&r.examples[0].expected.as_str()));
        assert_eq!(
            r,
            gsm8k_exact_match(&model, &tok, &convs, 2, &params, 3).unwrap()
        );
        let all = gsm8k_exact_match(&model, &tok, &convs, 100, &params, 3).unwrap();
        assert_eq!(all.items, 3);
        let e = gsm8k_exact_match(&model, &tok, &convs, 0, &params, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("n = 0"), "{e}");
        let e = gsm8k_exact_match(&model, &tok, &convs[2..4], 5, &params, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("none of the 2 conversations"), "{e}");
        let plain = Tokenizer::train_char("abc").unwrap();
        let e = gsm8k_exact_match(&model, &plain, &convs, 1, &params, 3)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a chat tokenizer"), "{e}");
    }

    #[test]
    fn turn_end_and_reward_reuse_their_stages_metrics() {
        let tok = chat_tokenizer();
        let model = tiny_gpt(tok.vocab_size(), 32);
        let convs: Vec<Vec<Message>> = (0..5)
            .map(|i| vec![Message::user(format!("q {i}")), Message::assistant("a")])
            .collect();
        let params = SamplingParams::greedy().with_max_new_tokens(4);
        let t = turn_end_rate(&model, &tok, &convs, 3, &params, 1).unwrap();
        assert_eq!(t.stats.prompts, 3);
        assert_eq!(t.end_rate, t.stats.end_rate());
        let json = serde_json::to_value(t).unwrap();
        assert_eq!(json["prompts"], 3);
        // A zero head ties every pair: accuracy 1/2, loss ln 2.
        let rm = RewardModel::new(model).unwrap();
        let pairs: Vec<PreferencePair> = (0..4)
            .map(|i| PreferencePair {
                prompt: format!("q {i}"),
                history: vec![],
                chosen: "yes".into(),
                rejected: "no".into(),
            })
            .collect();
        let r = reward_accuracy(&rm, &tok, &pairs, 3, 1).unwrap();
        assert_eq!((r.metrics.pairs, r.metrics.accuracy), (3, 0.5));
        assert!((r.metrics.loss - std::f64::consts::LN_2).abs() < 1e-6);
        assert!(reward_accuracy(&rm, &tok, &[], 3, 1).is_err());
    }

    fn write(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        (dir, p)
    }

    #[test]
    fn choice_files_are_validated_and_errors_name_the_line() {
        let ok = concat!(
            r#"{"question": "2+2?", "choices": ["3", "4"], "answer": 1}"#,
            "\n\n",
            r#"{"question": "sky?", "choices": ["green", "blue", "red"], "answer": "blue"}"#,
            "\n"
        );
        let (_d, p) = write("ok.jsonl", ok);
        let items = load_choice_file(&p).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!((items[0].answer, items[0].line), (1, Some(1)));
        assert_eq!((items[1].answer, items[1].line), (1, Some(3)));
        let bad = [
            (
                r#"{"question": "q", "choices": ["a", "b"], "answer": 2}"#,
                "`answer` 2 is out of range for 2 choices (a 0-based index: 0 to 1)",
            ),
            (
                r#"{"question": "q", "choices": ["a", "b"], "answer": -1}"#,
                "`answer` -1 is not a 0-based choice index",
            ),
            (
                r#"{"question": "q", "choices": ["a", "b"], "answer": 1.5}"#,
                "`answer` 1.5 is not a 0-based choice index",
            ),
            (
                r#"{"question": "q", "choices": ["a", "b"], "answer": "c"}"#,
                r#"`answer` "c" is none of the choices"#,
            ),
            (
                r#"{"question": "q", "choices": ["a", "b"], "answer": true}"#,
                "`answer` must be a 0-based choice index or the text of a choice, got true",
            ),
            (
                r#"{"question": "q", "choices": ["a"], "answer": 0}"#,
                "`choices` has 1 choice; a multiple-choice item needs at least 2",
            ),
            (
                r#"{"question": "q", "choices": ["a", "a"], "answer": 0}"#,
                "choices 0 and 1 (from 0) are the same",
            ),
            (
                r#"{"question": "q", "choices": ["a", ""], "answer": 0}"#,
                "choice 1 (from 0) is empty",
            ),
            (
                r#"{"question": " ", "choices": ["a", "b"], "answer": 0}"#,
                "`question` is empty",
            ),
            (
                r#"{"question": "q", "choices": ["a", "b"]}"#,
                "missing field `answer`",
            ),
            (
                r#"{"question": "q", "choices": ["a", "b"], "answer": 0, "x": 1}"#,
                "unknown field `x`",
            ),
            (
                r#"{"question": "q", "choices": ["a", "#,
                "EOF while parsing",
            ),
        ];
        for (line, want) in bad {
            let (_d, p) = write("bad.jsonl", &format!("{ok}{line}\n"));
            let e = load_choice_file(&p).unwrap_err().to_string();
            assert!(e.contains("bad.jsonl:4: ") && e.contains(want), "{e}");
        }
        let (_d, p) = write("empty.jsonl", "\n\n");
        let e = load_choice_file(&p).unwrap_err().to_string();
        assert!(
            e.ends_with("empty.jsonl: no multiple-choice item in the file"),
            "{e}"
        );
        let e = load_choice_file(p.with_file_name("missing.jsonl"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.jsonl"), "{e}");
    }

    #[test]
    fn the_choice_fixture_loads() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/eval_choices.jsonl"
        );
        let items = load_choice_file(path).unwrap();
        assert_eq!(items.len(), 12);
        assert!(items.iter().all(|it| it.validate().is_ok()));
        assert_eq!((items[1].answer, items[8].answer), (0, 1)); // given as text
    }

    #[test]
    fn choice_logprobs_match_a_direct_computation() {
        let tok = chat_tokenizer();
        let model = tiny_gpt(tok.vocab_size(), 64);
        let item = ChoiceItem {
            question: "what is the sky?".into(),
            choices: vec!["blue".into(), "a big green thing".into()],
            answer: 0,
            line: None,
        };
        let s = choice_logprobs(&model, &tok, &item, Some(0)).unwrap();
        let template = ChatTemplate::new(&tok).unwrap();
        let prompt = template
            .render_prompt(&tok, &[Message::user("what is the sky?")])
            .unwrap();
        for (j, choice) in item.choices.iter().enumerate() {
            let c = tok.encode_text(choice).unwrap();
            let seq: Vec<u32> = prompt.iter().chain(&c).copied().collect();
            let x = Tensor::from_slice(&seq, (1, seq.len()), &Device::Cpu).unwrap();
            let logits = model.forward(&x).unwrap().squeeze(0).unwrap();
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            // The token at position p is predicted by the logits at p - 1.
            let want: f64 = (prompt.len()..seq.len())
                .map(|p| f64::from(logp[p - 1][seq[p] as usize]))
                .sum();
            assert!((s.sum_logprob[j] - want).abs() < 1e-4, "{s:?} vs {want}");
            assert_eq!(s.tokens[j], c.len());
            assert!((s.mean_logprob[j] - want / c.len() as f64).abs() < 1e-4);
        }
        // A question longer than the context is cut from the left: still scored.
        let long = ChoiceItem {
            question: "what is the sky? ".repeat(10),
            ..item.clone()
        };
        assert!(choice_logprobs(&model, &tok, &long, None).is_ok());
        let huge = ChoiceItem {
            choices: vec!["a".into(), "b".repeat(80)],
            ..item.clone()
        };
        let e = choice_logprobs(&model, &tok, &huge, Some(3))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("item 3 (from 0): choice 1 (from 0) has 80 tokens"),
            "{e}"
        );
        let bad = ChoiceItem {
            answer: 2,
            line: Some(9),
            ..item
        };
        let e = choice_logprobs(&model, &tok, &bad, Some(0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("line 9: `answer` 2 is out of range"), "{e}");
    }

    #[test]
    fn a_trained_model_picks_the_choice_it_learned() {
        use crate::{Objective, Pretraining, TokenDataset, TrainConfig, Trainer};
        let corpus = "Q: sky? A: blue.\n".repeat(200);
        let tok = Tokenizer::train_char(&format!("{corpus} green red")).unwrap();
        let cfg = crate::GptConfig {
            vocab_size: tok.vocab_size(),
            block_size: 16,
            n_layer: 1,
            n_head: 2,
            n_embd: 32,
            dropout: 0.0,
            bias: true,
            ..Default::default()
        };
        let model = Gpt::init(&cfg, 0, &Device::Cpu).unwrap();
        let data = TokenDataset::from_tokens(tok.encode(&corpus).unwrap(), 0.1).unwrap();
        let train = TrainConfig {
            max_iters: 150,
            eval_interval: 150,
            eval_iters: 1,
            log_interval: 150,
            batch_size: 8,
            lr: 1e-2,
            min_lr: 1e-3,
            warmup_iters: 10,
            lr_decay_iters: 150,
            weight_decay: 0.0,
            ..TrainConfig::default()
        };
        let mut obj = Pretraining::new(model, tok.clone(), data, train.batch_size).unwrap();
        let mut trainer = Trainer::new(train, obj.parameters().unwrap()).unwrap();
        trainer.fit(&mut obj, |_| {}).unwrap();
        let model = obj.model();
        let items = vec![
            ChoiceItem {
                question: "Q: sky? A:".into(),
                choices: vec!["blue.".into(), "green.".into(), "red.".into()],
                answer: 0,
                line: None,
            },
            ChoiceItem {
                question: "Q: sky? A:".into(),
                choices: vec!["red.".into(), "blue.".into()],
                answer: 1,
                line: None,
            },
        ];
        let s = choice_logprobs(model, &tok, &items[0], None).unwrap();
        assert!(
            s.sum_logprob[0] > s.sum_logprob[1] + 5.0 && s.sum_logprob[0] > s.sum_logprob[2] + 5.0,
            "{s:?}"
        );
        let r = multiple_choice(model, &tok, &items, 10, 0).unwrap();
        assert_eq!((r.items, r.correct), (2, 2));
        assert_eq!(
            (r.accuracy, r.accuracy_per_token, r.centered),
            (1.0, 1.0, 1.0)
        );
        assert!((r.chance - (1.0 / 3.0 + 0.5) / 2.0).abs() < 1e-12);
        // Answers flipped: every item wrong, below chance.
        let flipped: Vec<ChoiceItem> = items
            .iter()
            .map(|it| ChoiceItem {
                answer: it.choices.len() - 1 - it.answer,
                ..it.clone()
            })
            .collect();
        let r = multiple_choice(model, &tok, &flipped, 10, 0).unwrap();
        assert_eq!(r.correct, 0);
        assert!(r.centered < 0.0);
        assert_eq!(centered(r.chance, r.chance), 0.0);
        assert!(multiple_choice(model, &tok, &items, 0, 0).is_err());
    }

    #[test]
    fn indices_are_a_seeded_sample() {
        assert!(sample_indices(5, 0, 1).is_err());
        assert!(sample_indices(0, 5, 1).is_err());
        assert_eq!(sample_indices(3, 5, 1).unwrap(), [0, 1, 2]);
        let a = sample_indices(1000, 10, 42).unwrap();
        assert_eq!(a, sample_indices(1000, 10, 42).unwrap());
        assert_ne!(a, sample_indices(1000, 10, 43).unwrap());
        assert!(a.windows(2).all(|w| w[0] < w[1]) && a.len() == 10);
    }

    #[test]
    fn reports_print_as_a_table_and_save_as_json() {
        let mut a = EvalReport::new("out/sft", 10, 1);
        a.bpb = Some(Bpb {
            bits_per_byte: 2.5,
            loss: 1.7329,
            windows: 3,
            block_size: 64,
            tokens: 192,
            bytes: 192,
        });
        a.gsm8k = Some(Gsm8kReport {
            items: 10,
            correct: 2,
            accuracy: 0.2,
            ended: 9,
            unscorable: 0,
            examples: vec![],
        });
        a.choices = Some(ChoiceReport {
            items: 4,
            correct: 3,
            accuracy: 0.75,
            accuracy_per_token: 0.5,
            chance: 0.25,
            centered: centered(0.75, 0.25),
        });
        let b = EvalReport::new("out/pretrain", 10, 1);
        let table = format_table(&[a.clone(), b]);
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[0].starts_with("metric") && lines[0].ends_with("out/pretrain"),
            "{table}"
        );
        assert!(table.contains("2.5000"), "{table}");
        assert!(table.contains("20.0% (2/10)"), "{table}");
        assert!(!table.contains("turn-end rate"), "{table}");
        let core = lines.iter().find(|l| l.contains("ChatCORE")).unwrap();
        assert!(core.contains("0.4333") && core.ends_with('-'), "{table}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("eval.json");
        write_json(&p, &[a.clone()]).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert_eq!(v[0]["checkpoint"], "out/sft");
        assert!((v[0]["chat_core"].as_f64().unwrap() - (0.2 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        let back: EvalReport = serde_json::from_value(v[0].clone()).unwrap();
        assert_eq!(back, a);
        let e = write_json(dir.path().join("no/such/dir.json"), &[a]).unwrap_err();
        assert!(e.to_string().contains("no/such"), "{e}");
    }
}
