//! Sampling: playing the next-token game out loud.
//!
//! The model gives one row of logits per step (length `vocab_size`, f32). A
//! [`LogitsProcessor`] turns that row into one token id, following the order Hugging Face
//! `generate` applies its logits processors and warpers
//! (`transformers/generation/logits_process.py`):
//!
//! 1. **repetition penalty** on the raw logits (`RepetitionPenaltyLogitsProcessor`, the CTRL rule
//!    of Keskar et al. 2019, arXiv:1909.05858): for each distinct token id seen so far, a
//!    positive logit is divided by the penalty, a negative one multiplied by it;
//! 2. **greedy shortcut**: with `temperature == 0` or `top_k == Some(1)` the answer is the
//!    argmax (ties go to the lowest id) and no randomness is used;
//! 3. **temperature** (`TemperatureLogitsWarper`): logits are divided by `temperature`;
//! 4. **top-k** (`TopKLogitsWarper`, Fan et al. 2018, arXiv:1805.04833): only the `k` largest
//!    logits survive;
//! 5. **softmax**, numerically stable (the max logit is subtracted first);
//! 6. **top-p / nucleus** (`TopPLogitsWarper`, Holtzman et al. 2019, arXiv:1904.09751): the
//!    smallest set of most likely tokens whose probabilities add up to at least `p` survives;
//! 7. **min-p** (`MinPLogitsWarper`, Nguyen et al. 2024, arXiv:2407.01082): tokens less likely
//!    than `min_p` times the most likely one are dropped;
//! 8. **renormalise** and draw with a seeded [`ChaCha8Rng`], so the same seed gives the same
//!    tokens on every platform.
//!
//! Internally the arithmetic is done in f64, so no setting allowed by
//! [`SamplingParams::validate`] can overflow an f32 logit into `inf` or `NaN`.
//!
//! ```
//! use tinygpt::sampler::{LogitsProcessor, SamplingParams};
//!
//! let params = SamplingParams::default().with_top_k(2).with_seed(7);
//! let mut sampler = LogitsProcessor::new(&params)?;
//! let logits = [1.0_f32, 3.0, 2.0, 0.0];
//! let probs = sampler.probs(&logits, &[])?;
//! assert_eq!((probs[0], probs[3]), (0.0, 0.0)); // top-k = 2 keeps ids 1 and 2
//! let id = sampler.sample(&logits, &[])?;
//! assert!(id == 1 || id == 2);
//! # Ok::<(), tinygpt::Error>(())
//! ```

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rand::distr::weighted::WeightedIndex;
use rand::distr::Distribution;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use candle_core::{DType, Tensor};

use crate::model::{Gpt, KvCache};
use crate::tokenizer::{TokenStream, Tokenizer};
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// Settings
// ---------------------------------------------------------------------------------------------

/// Sampling settings, with Hugging Face `GenerationConfig` names.
///
/// Plain data: build it with [`Default`] or [`SamplingParams::greedy`] and the `with_*`
/// setters, or load it from JSON (missing fields take their default values). Check it with
/// [`SamplingParams::validate`]; [`LogitsProcessor::new`] does so for you.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// The most tokens to generate after the prompt. Default 256.
    pub max_new_tokens: usize,
    /// Softmax temperature, `>= 0`: below 1 sharpens the distribution, above 1 flattens it.
    /// `0.0` means greedy decoding (argmax), never a division by zero. Default 1.0.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None` = off). `Some(1)` is greedy decoding;
    /// `Some(0)` is invalid. Default `None`.
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of most likely tokens whose probability reaches
    /// `p`, with `p` in `(0, 1]` (`None` = off). Default `None`.
    pub top_p: Option<f32>,
    /// Drop tokens whose probability is below `min_p` times the top token's, with `min_p` in
    /// `[0, 1]` (`None` = off). Default `None`.
    pub min_p: Option<f32>,
    /// CTRL repetition penalty, `> 0`: values above 1 discourage tokens already seen, `1.0` is
    /// off. Default 1.0.
    pub repetition_penalty: f32,
    /// Token ids that end generation when sampled; the stop token itself is not emitted.
    /// Default empty.
    pub stop_tokens: Vec<u32>,
    /// Seed of the sampler's [`ChaCha8Rng`]. Default 1337.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Plain sampling from the model's distribution: temperature 1, no filters, no penalty,
    /// 256 new tokens, seed 1337.
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            stop_tokens: Vec::new(),
            seed: 1337,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding: the defaults with `temperature = 0`, so every step takes the argmax.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Whether these settings always pick the argmax (`temperature == 0` or `top_k == Some(1)`).
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0 || self.top_k == Some(1)
    }

    /// Checks every field's range.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`], naming the field and its value, when `temperature` is
    /// negative or not finite, `top_k` is `Some(0)`, `top_p` is outside `(0, 1]`, `min_p` is
    /// outside `[0, 1]`, or `repetition_penalty` is not a finite number `> 0`.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidArgument(msg));
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad(format!(
                "temperature = {} must be a finite number >= 0 (0 means greedy)",
                self.temperature
            ));
        }
        if self.top_k == Some(0) {
            return bad("top_k = Some(0) must be None (off) or at least 1".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("top_p = {p} must be in (0, 1]"));
            }
        }
        if let Some(m) = self.min_p {
            if !(0.0..=1.0).contains(&m) {
                return bad(format!("min_p = {m} must be in [0, 1]"));
            }
        }
        let penalty = self.repetition_penalty;
        if !(penalty.is_finite() && penalty > 0.0) {
            return bad(format!(
                "repetition_penalty = {penalty} must be a finite number > 0 (1 means off)"
            ));
        }
        Ok(())
    }

    /// Sets [`max_new_tokens`](Self::max_new_tokens).
    pub fn with_max_new_tokens(mut self, max_new_tokens: usize) -> Self {
        self.max_new_tokens = max_new_tokens;
        self
    }

    /// Sets [`temperature`](Self::temperature).
    pub fn with_temperature(mut self, temperature: f32) -> Self {
        self.temperature = temperature;
        self
    }

    /// Sets [`top_k`](Self::top_k): `with_top_k(50)` or `with_top_k(None)`.
    pub fn with_top_k(mut self, top_k: impl Into<Option<usize>>) -> Self {
        self.top_k = top_k.into();
        self
    }

    /// Sets [`top_p`](Self::top_p): `with_top_p(0.9)` or `with_top_p(None)`.
    pub fn with_top_p(mut self, top_p: impl Into<Option<f32>>) -> Self {
        self.top_p = top_p.into();
        self
    }

    /// Sets [`min_p`](Self::min_p): `with_min_p(0.05)` or `with_min_p(None)`.
    pub fn with_min_p(mut self, min_p: impl Into<Option<f32>>) -> Self {
        self.min_p = min_p.into();
        self
    }

    /// Sets [`repetition_penalty`](Self::repetition_penalty).
    pub fn with_repetition_penalty(mut self, repetition_penalty: f32) -> Self {
        self.repetition_penalty = repetition_penalty;
        self
    }

    /// Sets [`stop_tokens`](Self::stop_tokens), from a `Vec`, slice or array of ids.
    pub fn with_stop_tokens(mut self, stop_tokens: impl Into<Vec<u32>>) -> Self {
        self.stop_tokens = stop_tokens.into();
        self
    }

    /// Sets [`seed`](Self::seed).
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }
}

// ---------------------------------------------------------------------------------------------
// The processor
// ---------------------------------------------------------------------------------------------

/// Turns one row of logits into a token id, with a seeded RNG.
///
/// Holds validated [`SamplingParams`] and a [`ChaCha8Rng`] seeded from
/// [`SamplingParams::seed`]: two processors built from equal params return the same token
/// sequence for the same logits, on any platform. Each non-greedy [`sample`](Self::sample)
/// advances the RNG; greedy steps and [`probs`](Self::probs) do not touch it.
#[derive(Debug, Clone)]
pub struct LogitsProcessor {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

/// What the pipeline decided for one row: a sure token, or a distribution to draw from.
enum Choice {
    /// Greedy decoding: this index, with probability 1.
    Greedy(usize),
    /// Renormalised probabilities (non-negative, summing to 1, length `vocab_size`).
    Weighted(Vec<f32>),
}

impl LogitsProcessor {
    /// A processor for `params`, its RNG seeded from `params.seed`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `params` fails [`SamplingParams::validate`].
    pub fn new(params: &SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(Self {
            params: params.clone(),
            rng: ChaCha8Rng::seed_from_u64(params.seed),
        })
    }

    /// The settings this processor samples with.
    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Picks the next token id.
    ///
    /// `logits`: one row, length `vocab_size`, f32; `-inf` marks a forbidden token.
    /// `previous`: every token id seen so far (prompt + generated), for the repetition penalty;
    /// order and repeats do not matter.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `logits` is empty, holds a NaN or `+inf`, is `-inf`
    /// everywhere, or when an id in `previous` is `>= logits.len()`.
    pub fn sample(&mut self, logits: &[f32], previous: &[u32]) -> Result<u32> {
        let index = match self.choose(logits, previous)? {
            Choice::Greedy(index) => index,
            Choice::Weighted(probs) => {
                // f64 weights, so a small probability is not lost in an f32 running sum.
                let dist =
                    WeightedIndex::new(probs.iter().map(|&p| f64::from(p))).map_err(|e| {
                        Error::InvalidArgument(format!("cannot sample from the logits: {e}"))
                    })?;
                dist.sample(&mut self.rng)
            }
        };
        u32::try_from(index).map_err(|_| {
            Error::InvalidArgument(format!(
                "token index {index} does not fit in a u32 token id (logits has {} entries)",
                logits.len()
            ))
        })
    }

    /// The probability distribution [`sample`](Self::sample) draws from, after every step of
    /// the pipeline: length `logits.len()`, non-negative, summing to 1 (one-hot for greedy
    /// settings). For tests and tools; it does not advance the RNG.
    ///
    /// # Errors
    /// As [`sample`](Self::sample).
    pub fn probs(&self, logits: &[f32], previous: &[u32]) -> Result<Vec<f32>> {
        Ok(match self.choose(logits, previous)? {
            Choice::Greedy(index) => {
                let mut one_hot = vec![0.0; logits.len()];
                one_hot[index] = 1.0;
                one_hot
            }
            Choice::Weighted(probs) => probs,
        })
    }

    /// The pipeline of the module docs, steps 1–8 (all but the draw itself).
    fn choose(&self, logits: &[f32], previous: &[u32]) -> Result<Choice> {
        let p = &self.params;
        let mut logits = check_logits(logits)?; // (vocab,) f64
        check_previous(previous, logits.len())?;

        apply_repetition_penalty(&mut logits, previous, f64::from(p.repetition_penalty));
        if p.is_greedy() {
            return Ok(Choice::Greedy(argmax(&logits)));
        }
        let temperature = f64::from(p.temperature);
        logits.iter_mut().for_each(|l| *l /= temperature);
        if let Some(k) = p.top_k {
            apply_top_k(&mut logits, k);
        }
        let mut probs = softmax(&logits);
        if let Some(top_p) = p.top_p {
            apply_top_p(&mut probs, f64::from(top_p));
        }
        if let Some(min_p) = p.min_p {
            apply_min_p(&mut probs, f64::from(min_p));
        }
        Ok(Choice::Weighted(renormalise(&probs)))
    }
}

// ---------------------------------------------------------------------------------------------
// The steps, in the order they run
// ---------------------------------------------------------------------------------------------

/// Checks a logits row and widens it to f64.
///
/// Rejects an empty row, NaN, `+inf` (it would turn the softmax into NaN) and a row that is
/// `-inf` everywhere (no token could be chosen). `-inf` entries are allowed: masked tokens.
fn check_logits(logits: &[f32]) -> Result<Vec<f64>> {
    if logits.is_empty() {
        return Err(Error::InvalidArgument(
            "logits is empty: expected one row of length vocab_size".into(),
        ));
    }
    if let Some(i) = logits
        .iter()
        .position(|l| l.is_nan() || *l == f32::INFINITY)
    {
        return Err(Error::InvalidArgument(format!(
            "logits[{i}] = {}: logits must be finite or -inf (a model that outputs this has \
             NaN or infinite weights: a corrupt checkpoint, or training that diverged)",
            logits[i]
        )));
    }
    if logits.iter().all(|l| *l == f32::NEG_INFINITY) {
        return Err(Error::InvalidArgument(format!(
            "all {} logits are -inf: no token can be sampled",
            logits.len()
        )));
    }
    Ok(logits.iter().map(|&l| f64::from(l)).collect())
}

/// Rejects a `previous` id that is not a row index of a `vocab_size`-long logits row.
fn check_previous(previous: &[u32], vocab_size: usize) -> Result<()> {
    match previous
        .iter()
        .position(|&id| usize::try_from(id).map_or(true, |id| id >= vocab_size))
    {
        Some(i) => Err(Error::InvalidArgument(format!(
            "previous[{i}] = {} is not a token id: the logits row has {vocab_size} entries",
            previous[i]
        ))),
        None => Ok(()),
    }
}

/// CTRL repetition penalty (Keskar et al. 2019; HF `RepetitionPenaltyLogitsProcessor`): for
/// each *distinct* id in `previous`, a positive logit is divided by `penalty`, a negative (or
/// zero) one multiplied by it, so with `penalty > 1` seen tokens always become less likely.
/// Ids must be `< logits.len()` (see `check_previous`); others are skipped.
pub(crate) fn apply_repetition_penalty(logits: &mut [f64], previous: &[u32], penalty: f64) {
    if penalty == 1.0 {
        return;
    }
    let mut seen = vec![false; logits.len()];
    for &id in previous {
        let Some(slot) = usize::try_from(id).ok().filter(|&i| i < logits.len()) else {
            continue;
        };
        if !std::mem::replace(&mut seen[slot], true) {
            let l = &mut logits[slot];
            *l = if *l > 0.0 { *l / penalty } else { *l * penalty };
        }
    }
}

/// Index of the largest logit; ties go to the lowest index. Expects a non-empty row without
/// NaN (returns 0 for an empty one).
pub(crate) fn argmax(logits: &[f64]) -> usize {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best
}

/// Top-k (HF `TopKLogitsWarper`): sets to `-inf` every logit strictly below the `k`-th largest.
///
/// Ties at the boundary are all kept, as in HF (`logits < topk(logits, k).values[-1]`), so
/// more than `k` tokens survive when several share the `k`-th largest value; the result does
/// not depend on token order. `k >= logits.len()` keeps everything; `k == 0` is treated as 1.
pub(crate) fn apply_top_k(logits: &mut [f64], k: usize) {
    if k >= logits.len() {
        return;
    }
    let mut sorted = logits.to_vec();
    // Partition descending, so that `sorted[k - 1]` is the k-th largest value.
    let (_, kth, _) = sorted.select_nth_unstable_by(k.max(1) - 1, |a, b| b.total_cmp(a));
    let threshold = *kth;
    for l in logits.iter_mut() {
        if *l < threshold {
            *l = f64::NEG_INFINITY;
        }
    }
}

/// Numerically stable softmax: `exp(l - max) / Σ exp(l - max)`, so the largest term is
/// `exp(0) = 1` and nothing overflows; `-inf` logits get probability 0. Expects at least one
/// finite logit (returns zeros otherwise).
pub(crate) fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !max.is_finite() {
        return vec![0.0; logits.len()];
    }
    let exps: Vec<f64> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f64 = exps.iter().sum(); // >= 1: the max contributes exp(0)
    exps.into_iter().map(|e| e / sum).collect()
}

/// How far below `p` a cumulative probability may fall and still count as reaching it, so that
/// hand-made cases such as `0.5 + 0.3` against `p = 0.8` are not decided by rounding.
const TOP_P_TOLERANCE: f64 = 1e-6;

/// Top-p / nucleus filter (Holtzman et al. 2019; HF `TopPLogitsWarper`): zeroes every token
/// outside the smallest prefix of the probabilities sorted in descending order whose
/// cumulative sum reaches `p` (the token that crosses `p` is kept; at least one token always
/// is). Equal probabilities are ordered by lowest id first. `p >= 1` keeps everything.
/// Does not renormalise.
pub(crate) fn apply_top_p(probs: &mut [f64], p: f64) {
    if p >= 1.0 {
        return;
    }
    let mut order: Vec<usize> = (0..probs.len()).collect();
    // Stable sort: ties keep ascending id order.
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut cumulative = 0.0;
    let mut kept = 0;
    for &i in &order {
        cumulative += probs[i];
        kept += 1;
        if cumulative >= p - TOP_P_TOLERANCE {
            break;
        }
    }
    for &i in &order[kept..] {
        probs[i] = 0.0;
    }
}

/// Min-p filter (Nguyen et al. 2024; HF `MinPLogitsWarper`): zeroes tokens whose probability
/// is strictly below `min_p × max(probs)`. The most likely token always survives. The
/// threshold is relative, so it does not matter whether `probs` was renormalised after top-p.
/// Does not renormalise.
pub(crate) fn apply_min_p(probs: &mut [f64], min_p: f64) {
    let max = probs.iter().copied().fold(0.0, f64::max);
    let threshold = min_p * max;
    for q in probs.iter_mut() {
        if *q < threshold {
            *q = 0.0;
        }
    }
}

/// Divides by the sum so the kept probabilities add up to 1, and narrows to f32.
fn renormalise(probs: &[f64]) -> Vec<f32> {
    let sum: f64 = probs.iter().sum();
    probs.iter().map(|&q| (q / sum) as f32).collect()
}

// ---------------------------------------------------------------------------------------------
// The generation loop
// ---------------------------------------------------------------------------------------------

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// A stop token was sampled (it is not part of the output).
    Stop,
    /// `max_new_tokens` were generated.
    Length,
}

/// Generates token ids one at a time after a prompt: nanoGPT's `generate`, with a KV cache.
///
/// The context the model sees is always the last `block_size` tokens, as nanoGPT crops it
/// (`idx[:, -block_size:]`), so a prompt longer than `block_size` keeps only its end
/// ([`TokenGenerator::cropped_prompt_tokens`] says how many tokens were dropped; this
/// token-level type prints nothing, while [`generate`] and [`crate::ChatSession`] warn once, see
/// [`set_crop_warning`]). While
/// prompt and output fit the context, each step feeds one token through the cache; once they
/// no longer fit, the positions of every token shift, so each further step recomputes the
/// cropped window from scratch. The tokens are therefore exactly those of recomputing the whole
/// (cropped) sequence at every step.
///
/// As an [`Iterator`] it yields `Ok(id)` per new token and stops at a stop token or after
/// `max_new_tokens`; an `Err` ends it.
#[derive(Debug)]
pub struct TokenGenerator<'a> {
    model: &'a Gpt,
    processor: LogitsProcessor,
    tokens: Vec<u32>, // prompt + generated
    prompt_len: usize,
    cache: KvCache,
    finish: Option<FinishReason>,
    /// Ids at or above this are never sampled (rows the tokenizer has no token for).
    vocab_limit: usize,
    /// Prompt tokens the model never sees (`prompt_len - block_size`, or 0).
    cropped: usize,
}

impl<'a> TokenGenerator<'a> {
    /// Starts generating after `prompt_ids` (at least one id).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty prompt, an id outside the model's vocabulary,
    /// or invalid `params`.
    pub fn new(model: &'a Gpt, prompt_ids: &[u32], params: &SamplingParams) -> Result<Self> {
        if prompt_ids.is_empty() {
            return Err(Error::InvalidArgument(
                "the prompt has no tokens: give at least one (e.g. <|endoftext|>)".into(),
            ));
        }
        let vocab = model.config().vocab_size;
        if let Some(&id) = prompt_ids.iter().find(|&&id| id as usize >= vocab) {
            return Err(Error::InvalidArgument(format!(
                "prompt token id {id} is outside the model's vocabulary of {vocab}"
            )));
        }
        Ok(Self {
            model,
            processor: LogitsProcessor::new(params)?,
            tokens: prompt_ids.to_vec(),
            prompt_len: prompt_ids.len(),
            cache: KvCache::new(model.config().n_layer),
            finish: None,
            vocab_limit: vocab,
            cropped: prompt_ids.len().saturating_sub(model.config().block_size),
        })
    }

    /// How many tokens at the start of the prompt the model never sees: the prompt's length
    /// minus `block_size` when it is longer than the context, else 0.
    pub fn cropped_prompt_tokens(&self) -> usize {
        self.cropped
    }

    /// Never samples ids `>= n`: the model may have more embedding rows than its tokenizer has
    /// tokens (rows reserved for tokens added later, or padding), and those ids cannot be
    /// decoded. [`generate`], [`crate::ChatSession`] and the other text-level callers set this
    /// to the tokenizer's vocabulary size.
    pub fn with_vocab_limit(mut self, n: usize) -> Self {
        self.vocab_limit = n.clamp(1, self.model.config().vocab_size);
        self
    }

    /// Prompt and generated ids so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// The generated ids so far.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Why generation ended, once it has.
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish
    }

    /// The logits (vocab_size,) for the token after `self.tokens`.
    fn next_logits(&mut self) -> Result<Vec<f32>> {
        let block_size = self.model.config().block_size;
        let device = self.model.device();
        let fresh = self.cache.is_empty() || self.cache.len() >= block_size;
        let feed: &[u32] = if fresh {
            // (Re)start: the last block_size tokens at positions 0.., as nanoGPT crops.
            self.cache.reset();
            &self.tokens[self.tokens.len().saturating_sub(block_size)..]
        } else {
            // The cache holds every token but the newest: feed just that one.
            &self.tokens[self.tokens.len() - 1..]
        };
        let input = Tensor::from_slice(feed, (1, feed.len()), device)?; // (1, T)
        let logits = self.model.forward_with_cache(&input, &mut self.cache)?; // (1, V)
        Ok(logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
    }
}

impl Iterator for TokenGenerator<'_> {
    type Item = Result<u32>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.finish.is_some() {
            return None;
        }
        if self.generated().len() >= self.processor.params().max_new_tokens {
            self.finish = Some(FinishReason::Length);
            return None;
        }
        let limit = self.vocab_limit;
        let step = self.next_logits().and_then(|mut logits| {
            if limit < logits.len() {
                logits[limit..].fill(f32::NEG_INFINITY); // rows with no token
            }
            self.processor.sample(&logits, &self.tokens)
        });
        match step {
            Err(e) => {
                self.finish = Some(FinishReason::Stop);
                Some(Err(e))
            }
            Ok(id) if self.processor.params().stop_tokens.contains(&id) => {
                self.finish = Some(FinishReason::Stop);
                None
            }
            Ok(id) => {
                self.tokens.push(id);
                Some(Ok(id))
            }
        }
    }
}

/// Streams generated text: yields each new piece as soon as it decodes to complete UTF-8 (a
/// byte-level token can hold half a character), so pieces can be printed as they come.
///
/// ```no_run
/// # fn demo(model: &tinygpt::Gpt, tokenizer: &tinygpt::Tokenizer) -> tinygpt::Result<()> {
/// use std::io::Write;
/// let params = tinygpt::SamplingParams::default().with_max_new_tokens(100);
/// for piece in tinygpt::sampler::generate(model, tokenizer, "ROMEO:", &params)? {
///     print!("{}", piece?);
///     std::io::stdout().flush().ok();
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct TextGenerator<'a> {
    tokens: TokenGenerator<'a>,
    stream: Option<TokenStream<'a>>,
}

impl TextGenerator<'_> {
    /// The token generator underneath (ids, finish reason).
    pub fn tokens(&self) -> &TokenGenerator<'_> {
        &self.tokens
    }

    /// Runs to the end and returns all generated text.
    ///
    /// # Errors
    /// The first error of generation or decoding.
    pub fn text(self) -> Result<String> {
        self.collect()
    }
}

impl Iterator for TextGenerator<'_> {
    type Item = Result<String>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let stream = self.stream.as_mut()?;
            match self.tokens.next() {
                Some(Ok(id)) => match stream.push(id) {
                    Ok(Some(piece)) => return Some(Ok(piece)),
                    Ok(None) => continue,
                    Err(e) => return Some(Err(e)),
                },
                Some(Err(e)) => return Some(Err(e)),
                None => {
                    let rest = self.stream.take()?.finish();
                    return match rest {
                        Ok(Some(piece)) => Some(Ok(piece)),
                        Ok(None) => None,
                        Err(e) => Some(Err(e)),
                    };
                }
            }
        }
    }
}

/// Starts generating text after `prompt`. An empty prompt starts from `<|endoftext|>`, as
/// GPT-2 does unconditionally. A prompt longer than `block_size` tokens is cropped to its last
/// `block_size` tokens (see [`TokenGenerator`]): the first time in a process, a warning says so
/// on stderr ([`set_crop_warning`] turns it off), and
/// `generation.tokens().cropped_prompt_tokens()` tells every time.
///
/// # Errors
/// Tokenizer errors on the prompt (e.g. an unknown character for a char-level tokenizer) and
/// invalid `params`; errors during generation come out of the iterator.
pub fn generate<'a>(
    model: &'a Gpt,
    tokenizer: &'a Tokenizer,
    prompt: &str,
    params: &SamplingParams,
) -> Result<TextGenerator<'a>> {
    let ids = if prompt.is_empty() {
        vec![tokenizer.eot_id()]
    } else {
        tokenizer.encode(prompt)?
    };
    let tokens = TokenGenerator::new(model, &ids, params)?.with_vocab_limit(tokenizer.vocab_size());
    warn_if_cropped(ids.len(), model.config().block_size);
    Ok(TextGenerator {
        tokens,
        stream: Some(tokenizer.stream()),
    })
}

// ---------------------------------------------------------------------------------------------
// The crop warning
// ---------------------------------------------------------------------------------------------

/// A warning printed at most once a process, which can be turned off.
#[derive(Debug)]
pub(crate) struct WarnOnce {
    enabled: AtomicBool,
    fired: AtomicBool,
    /// Occasions seen, printed or not (for tests).
    seen: AtomicUsize,
}

impl WarnOnce {
    pub(crate) const fn new() -> Self {
        Self {
            enabled: AtomicBool::new(true),
            fired: AtomicBool::new(false),
            seen: AtomicUsize::new(0),
        }
    }

    /// Counts an occasion; `true` (print it) the first time while enabled, `false` after.
    pub(crate) fn fire(&self) -> bool {
        self.seen.fetch_add(1, Ordering::Relaxed);
        self.enabled.load(Ordering::Relaxed) && !self.fired.swap(true, Ordering::Relaxed)
    }
}

/// The warning of prompts cropped to the context.
pub(crate) static CROP_WARNING: WarnOnce = WarnOnce::new();

/// Turns on (the default) or off the warning [`generate`] and [`crate::ChatSession`] print to
/// stderr, once a process, the first time a prompt is longer than the model's context and loses
/// its start. Off, nothing is printed; a program that wants to report crops itself reads
/// [`TokenGenerator::cropped_prompt_tokens`] (`generation.tokens()`) or
/// [`crate::chat::ReplyInfo::cropped_prompt_tokens`] ([`crate::ChatSession::last_reply`]).
///
/// Why stderr and once: tinygpt has no logging framework, its one other message of this kind
/// (the server's drain timeout) is an `eprintln!` too, and a crop happens on every step of a
/// long chat once it starts, so one line says it without flooding a terminal or a log.
pub fn set_crop_warning(enabled: bool) {
    CROP_WARNING.enabled.store(enabled, Ordering::Relaxed);
}

/// Prints the crop warning (see [`set_crop_warning`]) if a prompt of `prompt_len` tokens
/// does not fit a context of `block_size`.
pub(crate) fn warn_if_cropped(prompt_len: usize, block_size: usize) {
    if prompt_len > block_size && CROP_WARNING.fire() {
        eprintln!(
            "tinygpt: warning: a prompt of {prompt_len} tokens is longer than the model's context \
             (block_size {block_size}): only its last {block_size} tokens are used (said once; \
             later prompts may be cropped too)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn processor(params: SamplingParams) -> LogitsProcessor {
        LogitsProcessor::new(&params).unwrap()
    }

    fn ln(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn softmax_f32(logits: &[f32]) -> Vec<f32> {
        let wide: Vec<f64> = logits.iter().map(|&l| f64::from(l)).collect();
        softmax(&wide).into_iter().map(|q| q as f32).collect()
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol,
                "[{i}]: got {g}, want {w} ({got:?} vs {want:?})"
            );
        }
    }

    fn invalid_message(r: Result<impl std::fmt::Debug>) -> String {
        match r {
            Err(Error::InvalidArgument(msg)) => msg,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn defaults_and_builders() {
        let d = SamplingParams::default();
        assert_eq!(d.max_new_tokens, 256);
        assert_eq!(d.temperature, 1.0);
        assert_eq!((d.top_k, d.top_p, d.min_p), (None, None, None));
        assert_eq!(d.repetition_penalty, 1.0);
        assert!(d.stop_tokens.is_empty());
        assert_eq!(d.seed, 1337);
        assert!(SamplingParams::greedy().is_greedy());
        assert!(!d.is_greedy());

        let p = SamplingParams::default()
            .with_max_new_tokens(10)
            .with_temperature(0.7)
            .with_top_k(40)
            .with_top_p(0.9)
            .with_min_p(0.05)
            .with_repetition_penalty(1.3)
            .with_stop_tokens([0, 2])
            .with_seed(42);
        assert_eq!(p.top_k, Some(40));
        assert_eq!(p.top_p, Some(0.9));
        assert_eq!(p.min_p, Some(0.05));
        assert_eq!(p.stop_tokens, vec![0, 2]);
        p.validate().unwrap();
        assert_eq!(p.clone().with_top_k(None).top_k, None);
    }

    #[test]
    fn serde_round_trip_and_missing_fields_default() {
        let p = SamplingParams::default()
            .with_top_p(0.9)
            .with_stop_tokens([5]);
        let json = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<SamplingParams>(&json).unwrap(), p);
        let partial: SamplingParams = serde_json::from_str(r#"{"temperature": 0.5}"#).unwrap();
        assert_eq!(partial, SamplingParams::default().with_temperature(0.5));
    }

    #[test]
    fn validate_names_each_bad_field() {
        let d = SamplingParams::default;
        let cases = [
            (d().with_temperature(-0.1), "temperature"),
            (d().with_temperature(f32::NAN), "temperature"),
            (d().with_temperature(f32::INFINITY), "temperature"),
            (d().with_top_k(0), "top_k"),
            (d().with_top_p(0.0), "top_p"),
            (d().with_top_p(1.5), "top_p"),
            (d().with_top_p(f32::NAN), "top_p"),
            (d().with_min_p(-0.1), "min_p"),
            (d().with_min_p(1.1), "min_p"),
            (d().with_min_p(f32::NAN), "min_p"),
            (d().with_repetition_penalty(0.0), "repetition_penalty"),
            (d().with_repetition_penalty(-1.0), "repetition_penalty"),
            (d().with_repetition_penalty(f32::NAN), "repetition_penalty"),
        ];
        for (params, field) in cases {
            let msg = invalid_message(params.validate());
            assert!(msg.starts_with(field), "{field}: {msg}");
            let msg = invalid_message(LogitsProcessor::new(&params));
            assert!(msg.starts_with(field), "{field}: {msg}");
        }
        // Boundaries that are allowed.
        for ok in [
            d().with_temperature(0.0),
            d().with_top_p(1.0),
            d().with_min_p(0.0),
            d().with_min_p(1.0),
            d().with_top_k(1),
        ] {
            ok.validate().unwrap();
        }
    }

    #[test]
    fn bad_logits_and_previous_are_rejected() {
        let s = processor(SamplingParams::default());
        let msg = invalid_message(s.probs(&[], &[]));
        assert!(msg.contains("empty"), "{msg}");
        let msg = invalid_message(s.probs(&[0.0, f32::NAN], &[]));
        assert!(msg.contains("logits[1]"), "{msg}");
        let msg = invalid_message(s.probs(&[f32::INFINITY, 0.0], &[]));
        assert!(msg.contains("logits[0]"), "{msg}");
        let msg = invalid_message(s.probs(&[f32::NEG_INFINITY; 3], &[]));
        assert!(msg.contains("-inf"), "{msg}");
        let msg = invalid_message(s.probs(&[0.0, 1.0], &[1, 7]));
        assert!(msg.contains("previous[1] = 7"), "{msg}");
        // The same checks guard `sample` and the greedy path.
        let mut g = processor(SamplingParams::greedy());
        assert!(g.sample(&[0.0, f32::NAN], &[]).is_err());
        assert!(g.sample(&[0.0, 1.0], &[2]).is_err());
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits = [0.1_f32, 0.0, -0.2, 0.3, 0.05];
        let draw = |seed| {
            let mut s = processor(SamplingParams::default().with_seed(seed));
            (0..100)
                .map(|_| s.sample(&logits, &[]).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn top_k_one_and_temperature_zero_are_argmax() {
        let logits = [0.5_f32, 2.0, -1.0, 1.9];
        for t in [0.01, 1.0, 100.0] {
            let mut s = processor(SamplingParams::default().with_top_k(1).with_temperature(t));
            for _ in 0..50 {
                assert_eq!(s.sample(&logits, &[]).unwrap(), 1);
            }
            assert_eq!(s.probs(&logits, &[]).unwrap(), vec![0.0, 1.0, 0.0, 0.0]);
        }
        let mut s = processor(SamplingParams::greedy());
        assert_eq!(s.sample(&logits, &[]).unwrap(), 1);
        let probs = s.probs(&logits, &[]).unwrap();
        assert!(probs.iter().all(|q| q.is_finite()));
        assert_eq!(probs, vec![0.0, 1.0, 0.0, 0.0]);
        // Ties go to the lowest id; -inf entries are fine.
        let tied = [f32::NEG_INFINITY, 3.0, 3.0, 1.0];
        assert_eq!(s.sample(&tied, &[]).unwrap(), 1);
    }

    #[test]
    fn top_p_keeps_the_token_that_crosses_p() {
        let logits = ln(&[0.5, 0.3, 0.15, 0.05]);
        let probs = |p: f32| {
            processor(SamplingParams::default().with_top_p(p))
                .probs(&logits, &[])
                .unwrap()
        };
        // 0.5 + 0.3 reaches 0.8 exactly: two tokens.
        assert_close(&probs(0.8), &[0.5 / 0.8, 0.3 / 0.8, 0.0, 0.0], 1e-6);
        // 0.81 needs the third token.
        assert_close(
            &probs(0.81),
            &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0],
            1e-6,
        );
        // 1.0 keeps all; a tiny p keeps only the top token.
        assert_close(&probs(1.0), &[0.5, 0.3, 0.15, 0.05], 1e-6);
        assert_eq!(probs(0.01), vec![1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn min_p_drops_tokens_below_a_fraction_of_the_top() {
        // threshold = 0.1 × 0.6 = 0.06: 0.02 goes, the rest is renormalised by 0.98.
        let logits = ln(&[0.6, 0.3, 0.08, 0.02]);
        let s = processor(SamplingParams::default().with_min_p(0.1));
        let want = [0.6 / 0.98, 0.3 / 0.98, 0.08 / 0.98, 0.0];
        assert_close(&s.probs(&logits, &[]).unwrap(), &want, 1e-6);
        assert_close(&want, &[0.612_244_9, 0.306_122_45, 0.081_632_65, 0.0], 1e-7);
    }

    #[test]
    fn repetition_penalty_follows_ctrl() {
        // 2.0 / 2 = 1.0; -1.0 × 2 = -2.0 (id 1 seen twice, penalised once); 0.5 and 3.0 unseen.
        let mut logits = vec![2.0, -1.0, 0.5, 3.0];
        apply_repetition_penalty(&mut logits, &[0, 1, 1], 2.0);
        assert_eq!(logits, vec![1.0, -2.0, 0.5, 3.0]);

        let s = processor(SamplingParams::default().with_repetition_penalty(2.0));
        let probs = s.probs(&[2.0, -1.0, 0.5, 3.0], &[0, 1, 1]).unwrap();
        assert_close(&probs, &softmax_f32(&[1.0, -2.0, 0.5, 3.0]), 1e-6);
        // It acts before the greedy shortcut: the penalised argmax loses.
        let mut g = processor(SamplingParams::greedy().with_repetition_penalty(2.0));
        assert_eq!(g.sample(&[3.0, 2.0], &[]).unwrap(), 0);
        assert_eq!(g.sample(&[3.0, 2.0], &[0]).unwrap(), 1);
    }

    #[test]
    fn temperature_scales_logits() {
        let logits = [1.0_f32, -0.5, 2.0, 0.25];
        let s = processor(SamplingParams::default().with_temperature(0.5));
        let scaled: Vec<f32> = logits.iter().map(|l| l / 0.5).collect();
        assert_close(&s.probs(&logits, &[]).unwrap(), &softmax_f32(&scaled), 1e-6);
        // A temperature that would overflow f32 logits stays finite.
        let s = processor(SamplingParams::default().with_temperature(1e-30));
        assert_eq!(s.probs(&[1e30, 0.0], &[]).unwrap(), vec![1.0, 0.0]);
    }

    #[test]
    fn top_k_keeps_the_k_largest() {
        let logits = [1.0_f32, 3.0, 2.0, 0.0];
        let s = processor(SamplingParams::default().with_top_k(2));
        let probs = s.probs(&logits, &[]).unwrap();
        let e = std::f32::consts::E;
        assert_close(&probs, &[0.0, e / (e + 1.0), 1.0 / (e + 1.0), 0.0], 1e-6);
        // Ties at the boundary are all kept; k beyond the vocabulary keeps everything.
        let mut tied = vec![1.0, 2.0, 2.0, 0.0];
        apply_top_k(&mut tied, 1);
        assert_eq!(tied, vec![f64::NEG_INFINITY, 2.0, 2.0, f64::NEG_INFINITY]);
        let mut all = vec![1.0, 2.0];
        apply_top_k(&mut all, 5);
        assert_eq!(all, vec![1.0, 2.0]);
    }

    #[test]
    fn the_crop_warning_fires_once_and_can_be_silenced() {
        let warn = WarnOnce::new();
        let fired: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..25).filter(|_| warn.fire()).count()))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(fired, 1, "once in a process, whichever thread crops first");
        assert_eq!(warn.seen.load(Ordering::Relaxed), 100);
        let silenced = WarnOnce::new();
        silenced.enabled.store(false, Ordering::Relaxed);
        assert!(!silenced.fire() && !silenced.fire());
    }

    #[test]
    fn a_cropped_prompt_is_reported() {
        use crate::Tokenizer;
        let tokenizer = Tokenizer::train_char("abcdefgh").unwrap();
        let model = crate::testing::tiny_gpt(tokenizer.vocab_size(), 8);
        let params = SamplingParams::greedy().with_max_new_tokens(2);
        let seen = || CROP_WARNING.seen.load(Ordering::Relaxed);
        let before = seen();
        let short = generate(&model, &tokenizer, "abcdefgh", &params).unwrap();
        assert_eq!(short.tokens().cropped_prompt_tokens(), 0);
        let long = generate(&model, &tokenizer, "abcdefghabc", &params).unwrap();
        assert_eq!(long.tokens().cropped_prompt_tokens(), 3);
        assert!(seen() > before, "generate reports the crop to the warning");
        assert_eq!(long.text().unwrap().chars().count(), 2);
    }

    #[test]
    fn softmax_is_stable() {
        let probs = softmax(&[1000.0, 1000.0, f64::NEG_INFINITY, -1000.0]);
        assert_eq!(probs, vec![0.5, 0.5, 0.0, 0.0]);
    }

    #[test]
    fn empirical_frequencies_match_probs() {
        let logits = [0.3_f32, -0.4, 1.2, 0.0, -2.0, 0.8];
        let params = SamplingParams::default()
            .with_temperature(0.9)
            .with_top_k(5)
            .with_top_p(0.95)
            .with_seed(2024);
        let mut s = processor(params);
        let probs = s.probs(&logits, &[]).unwrap();
        let n = 20_000;
        let mut counts = vec![0usize; logits.len()];
        for _ in 0..n {
            counts[s.sample(&logits, &[]).unwrap() as usize] += 1;
        }
        for (i, (&c, &q)) in counts.iter().zip(&probs).enumerate() {
            let freq = c as f32 / n as f32;
            // Binomial standard deviation is at most 0.0036 here; 0.01 is about 3 of them.
            assert!((freq - q).abs() < 0.01, "id {i}: freq {freq}, prob {q}");
            if q == 0.0 {
                assert_eq!(c, 0, "id {i} has probability 0 but was drawn");
            }
        }
    }

    /// Logits in a modest range with some `-inf` entries, at least one finite.
    fn logits_strategy() -> impl Strategy<Value = Vec<f32>> {
        prop::collection::vec(
            prop_oneof![9 => -30.0f32..30.0, 1 => Just(f32::NEG_INFINITY)],
            1..64,
        )
        .prop_filter("at least one finite logit", |l| {
            l.iter().any(|x| x.is_finite())
        })
    }

    fn params_strategy() -> impl Strategy<Value = SamplingParams> {
        (
            prop_oneof![1 => Just(0.0f32), 9 => 0.05f32..3.0],
            prop::option::of(1usize..80),
            prop::option::of(0.01f32..=1.0),
            prop::option::of(0.0f32..=1.0),
            0.5f32..3.0,
            any::<u64>(),
        )
            .prop_map(|(t, k, p, m, r, seed)| {
                SamplingParams::default()
                    .with_temperature(t)
                    .with_top_k(k)
                    .with_top_p(p)
                    .with_min_p(m)
                    .with_repetition_penalty(r)
                    .with_seed(seed)
            })
    }

    proptest! {
        #[test]
        fn probs_are_a_distribution_and_samples_lie_in_it(
            logits in logits_strategy(),
            params in params_strategy(),
            raw_previous in prop::collection::vec(any::<u32>(), 0..20),
        ) {
            let vocab = logits.len() as u32;
            let previous: Vec<u32> = raw_previous.iter().map(|id| id % vocab).collect();
            let mut s = LogitsProcessor::new(&params).unwrap();
            let probs = s.probs(&logits, &previous).unwrap();
            prop_assert_eq!(probs.len(), logits.len());
            prop_assert!(probs.iter().all(|&q| q >= 0.0 && q.is_finite()), "{:?}", probs);
            let sum: f32 = probs.iter().sum();
            prop_assert!((sum - 1.0).abs() <= 1e-5, "sum {}", sum);
            for _ in 0..5 {
                let id = s.sample(&logits, &previous).unwrap();
                prop_assert!(probs[id as usize] > 0.0, "drew id {} with prob 0", id);
            }
        }
    }
}
