//! The GPT: a next-token predictor.
//!
//! This is GPT-2 (Radford et al. 2019) as Karpathy's nanoGPT `model.py` writes it, and the
//! file reads in the same order: LayerNorm → causal self-attention → MLP → Block → config →
//! GPT. Every tensor line carries its shape: `B` batch, `T` time (sequence), `C` channels
//! (`n_embd`), `nh` heads, `hs` head size (`C / nh`), `V` vocabulary.
//!
//! Weights carry Hugging Face GPT-2 names (`transformer.h.0.attn.c_attn.weight`) and HF's
//! `Conv1D` layout: a projection's weight is `(in, out)` and is applied as `x @ W + b`. So a
//! tinygpt `model.safetensors` and an HF GPT-2 one hold the same tensors under the same names.
//!
//! Everything here is built from differentiable candle primitives, so gradients reach every
//! parameter (candle's fused `layer_norm`/`softmax_last_dim` have no backward pass).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarBuilder;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::attention::{self, attention_probs, causal_attention, causal_attention_qkv, RowCache};
use crate::layers;
use crate::{Error, Result};

/// Epsilon of every LayerNorm, as in GPT-2 (`layer_norm_epsilon = 1e-5`) and nanoGPT.
pub const LAYER_NORM_EPS: f64 = 1e-5;

// ---------------------------------------------------------------------------------------------
// Building blocks
// ---------------------------------------------------------------------------------------------

/// LayerNorm over the last dimension (Ba et al. 2016). `bias` is optional, as in nanoGPT's
/// `bias=False` models. The math is one fused op with a hand-written backward
/// ([`layers::layer_norm`]); statistics are f32 whatever the weights' dtype.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,       // (C,)
    bias: Option<Tensor>, // (C,)
}

impl LayerNorm {
    fn new(c: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: get(&vb, &[c], "weight")?,
            bias: if bias {
                Some(get(&vb, &[c], "bias")?)
            } else {
                None
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = like(Some(&self.weight), x)?.unwrap_or_else(|| self.weight.clone());
        let bias = like(self.bias.as_ref(), x)?;
        layers::layer_norm(x, &weight, bias.as_ref(), LAYER_NORM_EPS) // (.., C)
    }
}

/// A projection in HF GPT-2's `Conv1D` layout: `y = x @ W + b` with `W: (in, out)`.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,       // (in, out)
    bias: Option<Tensor>, // (out,)
}

impl Linear {
    fn new(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: get(&vb, &[d_in, d_out], "weight")?,
            bias: if bias {
                Some(get(&vb, &[d_out], "bias")?)
            } else {
                None
            },
        })
    }

    /// (B, T, in) → (B, T, out): a gemm, then the bias as one fused op.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let bias = like(self.bias.as_ref(), x)?;
        layers::linear(x, &self.weight, bias.as_ref())
    }

    /// (B, T, in) → gelu(x @ W + b), (B, T, out): the bias add fused into the GELU.
    fn forward_gelu(&self, x: &Tensor) -> Result<Tensor> {
        let h = layers::linear(x, &self.weight, None)?; // (B, T, out)
        layers::bias_gelu(&h, like(self.bias.as_ref(), x)?.as_ref())
    }
}

/// A small parameter (LayerNorm scale or shift, a bias) in the dtype of the activations `x`.
/// On the CPU a half-precision model computes in f32 (see [`Gpt::to_dtype`]), so its f16
/// vectors are widened at each use (C or 4C elements: nothing beside the matmuls).
fn like(t: Option<&Tensor>, x: &Tensor) -> Result<Option<Tensor>> {
    Ok(match t {
        Some(t) if t.dtype() != x.dtype() => Some(t.to_dtype(x.dtype())?),
        Some(t) => Some(t.clone()),
        None => None,
    })
}

/// Softmax over the last dimension from primitives (candle's fused one has no backward).
/// The row maximum is subtracted for stability and detached: it cancels out mathematically.
pub(crate) fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// Inverted dropout with a caller-seeded RNG (candle's CPU `rand` is not seedable).
/// Each element is zeroed with probability `p` and the survivors scaled by `1 / (1 - p)`.
fn dropout(x: &Tensor, p: f32, rng: &mut ChaCha8Rng) -> candle_core::Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { scale })
        .collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    x.mul(&mask)
}

/// Dropout state threaded through a training forward pass; `None` in evaluation.
type Train<'a> = Option<(&'a mut ChaCha8Rng, f32)>;

fn maybe_dropout(x: Tensor, train: &mut Train) -> candle_core::Result<Tensor> {
    match train {
        Some((rng, p)) if *p > 0.0 => dropout(&x, *p, rng),
        _ => Ok(x),
    }
}

// ---------------------------------------------------------------------------------------------
// Attention, MLP, Block
// ---------------------------------------------------------------------------------------------

/// Multi-head causal self-attention (Vaswani et al. 2017), with the query, key and value
/// projections fused into one `c_attn` as GPT-2 stores them.
#[derive(Debug, Clone)]
struct CausalSelfAttention {
    c_attn: Linear, // C -> 3C
    c_proj: Linear, // C -> C
    n_head: usize,
}

impl CausalSelfAttention {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.n_embd;
        Ok(Self {
            c_attn: Linear::new(c, 3 * c, cfg.bias, vb.pp("c_attn"))?,
            c_proj: Linear::new(c, c, cfg.bias, vb.pp("c_proj"))?,
            n_head: cfg.n_head,
        })
    }

    /// `x`: (B, T, C). With a cache `(slot, past, capacity)`, the new keys/values are written
    /// at positions `past..past+T` of the layer's buffers and the queries attend to everything
    /// cached (position `past + i` sees `0..=past + i`).
    fn forward(
        &self,
        x: &Tensor,
        layer_cache: Option<(&mut Option<LayerKv>, usize, usize)>,
        train: &mut Train,
    ) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (nh, hs) = (self.n_head, c / self.n_head);
        let qkv = self.c_attn.forward(x)?; // (B, T, 3C)
        let scale = 1.0 / (hs as f64).sqrt();
        let attn_dropout = matches!(train, Some((_, p)) if *p > 0.0);
        if layer_cache.is_none() && !attn_dropout {
            // Training and whole-sequence inference: heads split and merged inside one op.
            let y = causal_attention_qkv(&qkv, nh, scale)?; // (B, T, C)
            let y = self.c_proj.forward(&y)?;
            return Ok(maybe_dropout(y, train)?); // resid_dropout
        }
        let heads = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, i * c, c)? // (B, T, C)
                .reshape((b, t, nh, hs))? // (B, T, nh, hs)
                .transpose(1, 2)? // (B, nh, T, hs)
                .contiguous()
        };
        let (q, mut k, mut v) = (heads(0)?, heads(1)?, heads(2)?);
        if let Some((slot, past, capacity)) = layer_cache {
            let shape = [b, nh, capacity, hs];
            let fits = |kv: &LayerKv| kv.k.dims() == shape && kv.k.dtype() == k.dtype();
            match slot {
                Some(kv) if fits(kv) => {}
                Some(kv) if past > 0 => {
                    return Err(Error::InvalidArgument(format!(
                        "the KV cache holds keys of shape {:?} {:?}, this batch needs {shape:?} {:?}: reset the cache between batches of another size",
                        kv.k.dims(),
                        kv.k.dtype(),
                        k.dtype()
                    )))
                }
                _ => {
                    let zeros = || Tensor::zeros((b, nh, capacity, hs), k.dtype(), k.device());
                    *slot = Some(LayerKv { k: zeros()?, v: zeros()? });
                }
            }
            if let Some(kv) = slot.as_ref() {
                kv.k.slice_set(&k, 2, past)?; // written in place at past..past + T
                kv.v.slice_set(&v, 2, past)?;
                k = kv.k.narrow(2, 0, past + t)?; // (B, nh, past + T, hs), a view
                v = kv.v.narrow(2, 0, past + t)?;
            }
        }
        let y = match train {
            // Attention dropout needs the weights themselves: the plain-op path.
            Some((_, p)) if *p > 0.0 => {
                let att = attention_probs(&q, &k, scale)?; // (B, nh, T, T_k)
                maybe_dropout(att, train)?.matmul(&v)? // (B, nh, T, hs)
            }
            // Otherwise the fused kernel (FlashAttention-2 style on the CPU).
            _ => causal_attention(&q, &k, &v, scale)?, // (B, nh, T, hs)
        };
        let y = y.transpose(1, 2)?.reshape((b, t, c))?; // (B, T, C): re-assemble heads
        let y = self.c_proj.forward(&y)?;
        Ok(maybe_dropout(y, train)?) // resid_dropout
    }
}

/// The position-wise feed-forward network: C → 4C → GELU (tanh form, GPT-2's `gelu_new`) → C.
#[derive(Debug, Clone)]
struct Mlp {
    c_fc: Linear,   // C -> 4C
    c_proj: Linear, // 4C -> C
}

impl Mlp {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.n_embd;
        Ok(Self {
            c_fc: Linear::new(c, 4 * c, cfg.bias, vb.pp("c_fc"))?,
            c_proj: Linear::new(4 * c, c, cfg.bias, vb.pp("c_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor, train: &mut Train) -> Result<Tensor> {
        let h = self.c_fc.forward_gelu(x)?; // (B, T, 4C)
        let y = self.c_proj.forward(&h)?; // (B, T, C)
        Ok(maybe_dropout(y, train)?)
    }
}

/// A pre-LayerNorm transformer block: `x + attn(ln_1(x))`, then `x + mlp(ln_2(x))`.
#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: CausalSelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            ln_1: LayerNorm::new(cfg.n_embd, cfg.bias, vb.pp("ln_1"))?,
            attn: CausalSelfAttention::new(cfg, vb.pp("attn"))?,
            ln_2: LayerNorm::new(cfg.n_embd, cfg.bias, vb.pp("ln_2"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        layer_cache: Option<(&mut Option<LayerKv>, usize, usize)>,
        train: &mut Train,
    ) -> Result<Tensor> {
        let x = (x + self
            .attn
            .forward(&self.ln_1.forward(x)?, layer_cache, train)?)?;
        Ok((&x + self.mlp.forward(&self.ln_2.forward(&x)?, train)?)?)
    }
}

// ---------------------------------------------------------------------------------------------
// Config
// ---------------------------------------------------------------------------------------------

/// The shape of a GPT, with nanoGPT's field names. Serialised as the checkpoint's `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Number of token ids, including special tokens.
    pub vocab_size: usize,
    /// Context length: the most positions the model can see (learned position embeddings).
    pub block_size: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Number of attention heads; must divide `n_embd`.
    pub n_head: usize,
    /// Width of the residual stream (`C`).
    pub n_embd: usize,
    /// Dropout probability in training (embeddings, attention weights, residual branches).
    pub dropout: f32,
    /// Whether projections and LayerNorms carry biases (GPT-2: true).
    pub bias: bool,
}

impl Default for GptConfig {
    /// The default pre-training recipe: [`GptConfig::shakespeare_char_cpu`] with 65 characters
    /// plus `<|endoftext|>`.
    fn default() -> Self {
        Self::shakespeare_char_cpu(66)
    }
}

impl GptConfig {
    /// nanoGPT's CPU recipe for `shakespeare_char` (its README: `--n_layer=4 --n_head=4
    /// --n_embd=128 --block_size=64 --dropout=0.0`; no biases, nanoGPT's `bias = False`
    /// default): about 0.8M parameters.
    pub fn shakespeare_char_cpu(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            block_size: 64,
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            dropout: 0.0,
            bias: false,
        }
    }

    /// nanoGPT's GPU config `train_shakespeare_char.py`: 6 layers, 6 heads, 384 wide, context
    /// 256, dropout 0.2, no biases (about 10.7M parameters).
    pub fn shakespeare_char(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            block_size: 256,
            n_layer: 6,
            n_head: 6,
            n_embd: 384,
            dropout: 0.2,
            bias: false,
        }
    }

    /// GPT-2 small, 124M parameters (OpenAI's `gpt2`).
    pub fn gpt2() -> Self {
        Self::gpt2_sized(12, 12, 768)
    }

    /// GPT-2 medium, 350M parameters.
    pub fn gpt2_medium() -> Self {
        Self::gpt2_sized(24, 16, 1024)
    }

    /// GPT-2 large, 774M parameters.
    pub fn gpt2_large() -> Self {
        Self::gpt2_sized(36, 20, 1280)
    }

    /// GPT-2 XL, 1558M parameters.
    pub fn gpt2_xl() -> Self {
        Self::gpt2_sized(48, 25, 1600)
    }

    fn gpt2_sized(n_layer: usize, n_head: usize, n_embd: usize) -> Self {
        Self {
            vocab_size: 50257,
            block_size: 1024,
            n_layer,
            n_head,
            n_embd,
            dropout: 0.0,
            bias: true,
        }
    }

    /// Checks the config describes a model we can build.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field: a zero size, `n_embd` not divisible by `n_head`, or
    /// `dropout` outside `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("block_size", self.block_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
        ] {
            if v == 0 {
                return Err(Error::Config(format!("{name} must be at least 1, got 0")));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::Config(format!(
                "n_embd ({}) must be divisible by n_head ({})",
                self.n_embd, self.n_head
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Config(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        Ok(())
    }

    /// Every parameter's HF GPT-2 name and shape, in the order of HF's state dict. The tied
    /// `lm_head.weight` is not listed: it is `transformer.wte.weight`.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let c = self.n_embd;
        let mut out = vec![
            (
                "transformer.wte.weight".to_string(),
                vec![self.vocab_size, c],
            ),
            (
                "transformer.wpe.weight".to_string(),
                vec![self.block_size, c],
            ),
        ];
        let ln = |out: &mut Vec<(String, Vec<usize>)>, p: &str| {
            out.push((format!("{p}.weight"), vec![c]));
            if self.bias {
                out.push((format!("{p}.bias"), vec![c]));
            }
        };
        let lin = |out: &mut Vec<(String, Vec<usize>)>, p: &str, d_in: usize, d_out: usize| {
            out.push((format!("{p}.weight"), vec![d_in, d_out]));
            if self.bias {
                out.push((format!("{p}.bias"), vec![d_out]));
            }
        };
        for i in 0..self.n_layer {
            let h = format!("transformer.h.{i}");
            ln(&mut out, &format!("{h}.ln_1"));
            lin(&mut out, &format!("{h}.attn.c_attn"), c, 3 * c);
            lin(&mut out, &format!("{h}.attn.c_proj"), c, c);
            ln(&mut out, &format!("{h}.ln_2"));
            lin(&mut out, &format!("{h}.mlp.c_fc"), c, 4 * c);
            lin(&mut out, &format!("{h}.mlp.c_proj"), 4 * c, c);
        }
        ln(&mut out, "transformer.ln_f");
        out
    }

    /// Number of parameters (the tied head counted once; position embeddings included),
    /// counted from the sizes without listing the tensors; `usize::MAX` for a config too
    /// large to count (see [`GptConfig::memory_estimate`]).
    pub fn num_parameters(&self) -> usize {
        crate::memory::parameter_count(self)
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(usize::MAX)
    }

    /// The memory a model of this config needs with f32 weights, for training (weights,
    /// gradients, AdamW moments, activations) or inference (weights, KV cache, one forward
    /// pass) on batches of `batch_size` sequences of `block_size` tokens. See
    /// [`crate::memory`].
    ///
    /// # Errors
    /// [`Error::Config`] if a size overflows 64 bits.
    pub fn memory_estimate(
        &self,
        training: bool,
        batch_size: usize,
    ) -> Result<crate::memory::MemoryEstimate> {
        crate::memory::MemoryEstimate::new(self, training, batch_size, DType::F32)
    }

    /// Checks that [`GptConfig::memory_estimate`] fits in the memory of `device` (or in
    /// `TINYGPT_MEMORY_LIMIT`); nothing is checked where the memory is unknown. Model
    /// constructors check with a batch of 1; a caller that knows its batch size can check it
    /// before training.
    ///
    /// # Errors
    /// [`Error::Config`] saying what the model needs and what was found, in GiB.
    pub fn check_fits(&self, training: bool, batch_size: usize, device: &Device) -> Result<()> {
        crate::memory::check_fits(self, training, batch_size, DType::F32, device)
    }

    /// Reads a `config.json` written by [`GptConfig::save`], and checks that the model it
    /// describes fits in memory for inference (its weights are read into memory next).
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, [`Error::BadFile`] if it is not a valid
    /// config, [`Error::Config`] (naming the file) if it fails [`GptConfig::validate`] or
    /// describes a model larger than the memory there is ([`GptConfig::check_fits`]).
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = crate::data::read_utf8(path)?;
        let cfg: Self = serde_json::from_str(&text).map_err(|e| Error::json(path, None, &e))?;
        cfg.validate().map_err(|e| match e {
            Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
            e => e,
        })?;
        crate::memory::check_fits_from(&cfg, false, 1, DType::F32, &Device::Cpu, Some(path))?;
        Ok(cfg)
    }

    /// Writes the config as pretty JSON.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be written.
    pub fn save(&self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let path = path.as_ref();
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| Error::bad_file(path, None, e.to_string()))?;
        std::fs::write(path, json + "\n").map_err(|e| Error::io(path, e))
    }
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// Keys and values of every layer for incremental decoding: feeding one new token attends to
/// all cached positions instead of recomputing them. Each layer's buffers are allocated once,
/// for `block_size` positions, on first use and written in place; the attention reads the
/// filled prefix where it lies. Not `Clone`: two caches must never share buffers.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<LayerKv>>,
    len: usize,
}

/// One layer's cache: k and v, each (B, nh, block_size, hs), the first `len` positions valid.
#[derive(Debug)]
pub(crate) struct LayerKv {
    pub(crate) k: Tensor,
    pub(crate) v: Tensor,
}

impl KvCache {
    /// An empty cache for a model of `n_layer` blocks.
    pub fn new(n_layer: usize) -> Self {
        Self {
            layers: (0..n_layer).map(|_| None).collect(),
            len: 0,
        }
    }

    /// Number of cached positions (the position of the next token fed).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets everything cached (the buffers are kept for reuse).
    pub fn reset(&mut self) {
        self.len = 0;
    }
}

/// GPT-2: token + position embeddings → `n_layer` blocks → `ln_f` → `lm_head` (tied to `wte`).
#[derive(Debug, Clone)]
pub struct Gpt {
    cfg: GptConfig,
    wte: Tensor, // (V, C), also the lm_head
    wpe: Tensor, // (block_size, C)
    h: Vec<Block>,
    ln_f: LayerNorm,
    /// Every parameter by HF name, in [`GptConfig::parameter_shapes`] order.
    params: Vec<(String, Tensor)>,
}

impl Gpt {
    /// Builds the model from the tensors `vb` provides (a `VarMap` for training, safetensors
    /// for inference), under HF GPT-2 names. First the weights, in `vb`'s dtype, with a KV
    /// cache and a forward pass of one sequence, are checked to fit in memory
    /// ([`crate::memory`]): a `VarBuilder` allocates what it is asked for.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config or one too large for the memory there is,
    /// [`Error::MissingTensor`] /
    /// [`Error::ShapeMismatch`] naming the tensor when `vb` lacks it or holds another shape.
    pub fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        crate::memory::check_fits(cfg, false, 1, vb.dtype(), vb.device())?;
        Self::build(cfg, vb)
    }

    /// As [`Gpt::new`] without the memory check: for tensors already in memory.
    fn build(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let params = cfg
            .parameter_shapes()
            .into_iter()
            .map(|(name, shape)| Ok((name.clone(), get(&vb, &shape, &name)?)))
            .collect::<Result<Vec<_>>>()?;
        let t = vb.pp("transformer");
        Ok(Self {
            cfg: cfg.clone(),
            wte: get(&t, &[cfg.vocab_size, cfg.n_embd], "wte.weight")?,
            wpe: get(&t, &[cfg.block_size, cfg.n_embd], "wpe.weight")?,
            h: (0..cfg.n_layer)
                .map(|i| Block::new(cfg, t.pp(format!("h.{i}"))))
                .collect::<Result<_>>()?,
            ln_f: LayerNorm::new(cfg.n_embd, cfg.bias, t.pp("ln_f"))?,
            params,
        })
    }

    /// A freshly initialised, trainable model (every parameter a candle `Var`), as nanoGPT
    /// initialises it: weights N(0, 0.02), the residual projections (`c_proj`) N(0, 0.02 /
    /// sqrt(2 · n_layer)) (GPT-2 paper, §2.3), biases 0, LayerNorm weights 1. Random numbers
    /// come from ChaCha8 seeded with `seed`, so the same seed gives the same model everywhere.
    ///
    /// The memory for training it (weights, gradients, AdamW moments and the activations of
    /// one sequence; see [`crate::memory`]) is checked before anything is allocated.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config or one too large for the memory there is
    /// ([`GptConfig::check_fits`]); candle errors on device allocation.
    pub fn init(cfg: &GptConfig, seed: u64, device: &Device) -> Result<Self> {
        cfg.validate()?;
        cfg.check_fits(true, 1, device)?;
        let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        let proj_std = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
        let mut tensors = HashMap::new();
        for (name, shape) in cfg.parameter_shapes() {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if name.ends_with(".bias") {
                vec![0.0; n]
            } else if shape.len() == 1 {
                vec![1.0; n] // LayerNorm weight
            } else {
                let std = if name.ends_with("c_proj.weight") {
                    proj_std
                } else {
                    0.02
                };
                let normal = Normal::new(0.0f32, std as f32)
                    .map_err(|e| Error::Config(format!("init std {std}: {e}")))?;
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            // Made a `Var` where it is allocated: no copy, so the check above holds.
            tensors.insert(name, Var::from_vec(data, shape, device)?.into_inner());
        }
        check_tensors(cfg, &tensors, None)?;
        Self::build(cfg, VarBuilder::from_tensors(tensors, DType::F32, device))
    }

    /// Builds the model from named tensors (HF GPT-2 names, `Conv1D` layout). With
    /// `trainable`, every tensor becomes a fresh candle `Var` (a copy) that training updates;
    /// otherwise the tensors are used as constants and no autograd graph is recorded.
    ///
    /// With `trainable`, the memory for the copy and for training it (gradients, AdamW moments,
    /// the activations of one sequence) is checked before the copy is made.
    ///
    /// # Errors
    /// As [`Gpt::new`], and [`Error::InvalidArgument`] naming a tensor the config does not
    /// account for (e.g. a layer beyond `n_layer`).
    pub fn from_tensors(
        cfg: &GptConfig,
        tensors: HashMap<String, Tensor>,
        trainable: bool,
    ) -> Result<Self> {
        cfg.validate()?;
        let device = match tensors.values().next() {
            Some(t) => t.device().clone(),
            None => {
                return Err(Error::MissingTensor {
                    name: "transformer.wte.weight".into(),
                    path: None,
                })
            }
        };
        check_tensors(cfg, &tensors, None)?;
        let dtype = tensors
            .get("transformer.wte.weight")
            .map(|t| t.dtype())
            .unwrap_or(DType::F32);
        if trainable {
            crate::memory::check_fits(cfg, true, 1, dtype, &device)?;
        }
        let tensors = tensors
            .into_iter()
            .map(|(name, t)| {
                let t = if trainable {
                    Var::from_tensor(&t.detach())?.into_inner() // a copy
                } else {
                    t.detach()
                };
                Ok((name, t))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        Self::build(cfg, VarBuilder::from_tensors(tensors, dtype, &device))
    }

    /// The model's configuration.
    pub fn config(&self) -> &GptConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.wte.device()
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.wte.dtype()
    }

    /// Every parameter by HF GPT-2 name, in state-dict order (the tied head appears once, as
    /// `transformer.wte.weight`).
    pub fn named_parameters(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The trainable parameters as candle `Var`s sharing storage with the model.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the model was built from constant weights (load it with
    /// `trainable = true`).
    pub fn vars(&self) -> Result<Vec<(String, Var)>> {
        self.params
            .iter()
            .map(|(name, t)| {
                if t.is_variable() {
                    Ok((name.clone(), Var::from_tensor(t)?))
                } else {
                    Err(Error::InvalidArgument(format!(
                        "parameter `{name}` is a constant: this model was loaded for inference, \
                         load it as trainable to train it"
                    )))
                }
            })
            .collect()
    }

    /// The logits for every position: `input_ids` (B, T) u32 → (B, T, vocab_size), in
    /// evaluation mode (no dropout, no cache). Requires `T <= block_size`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a wrong rank, an empty sequence or `T > block_size`.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let x = self.hidden_states(input_ids, None, None)?;
        self.lm_head(&x)
    }

    /// As [`Gpt::forward`], in training mode: dropout (if `config.dropout > 0`) draws from
    /// `rng`.
    ///
    /// # Errors
    /// As [`Gpt::forward`].
    pub fn forward_train(&self, input_ids: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let x = self.hidden_states(input_ids, None, Some((rng, self.cfg.dropout)))?;
        self.lm_head(&x)
    }

    /// Incremental decoding: feeds `input_ids` (B, T) at positions `cache.len()..` and returns
    /// the logits of the **last** position only, (B, vocab_size). The cache grows by T.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the cache would exceed `block_size` (positions past the
    /// context have no embedding: crop and start a new cache, as [`crate::sampler`] does).
    pub fn forward_with_cache(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if cache.layers.len() != self.cfg.n_layer {
            *cache = KvCache::new(self.cfg.n_layer);
        }
        let x = self.hidden_states(input_ids, Some(cache), None)?; // (B, T, C)
        let t = x.dim(1)?;
        let last = x.narrow(1, t - 1, 1)?; // (B, 1, C)
        Ok(self.lm_head(&last)?.squeeze(1)?) // (B, V)
    }

    /// One decoding step of R sequences whose caches are plain buffers (the CPU path of
    /// [`crate::decode`]): token `tokens[r]` at position `pos[r]`, its keys and values written
    /// into `kv[r]` (per layer `(nh, block_size, hs)`) at that position, its query attending to
    /// that row's positions `0..=pos[r]` only. Returns the logits (R, V). The caller checks
    /// ids and positions; activations must be f32 (the CPU computes in f32 for every dtype).
    pub(crate) fn decode_rows(
        &self,
        tokens: &[u32],
        pos: &[usize],
        kv: &mut [&mut crate::decode::SlotKv],
    ) -> Result<Tensor> {
        let (r, c, nh) = (tokens.len(), self.cfg.n_embd, self.cfg.n_head);
        let (hs, cap) = (c / nh, self.cfg.block_size);
        let device = self.wte.device();
        let ids = Tensor::from_slice(tokens, r, device)?; // (R,)
        let positions: Vec<u32> = pos.iter().map(|&p| p as u32).collect();
        let positions = Tensor::from_vec(positions, r, device)?; // (R,)
        let tok_emb = self.wte.embedding(&ids)?.to_dtype(DType::F32)?; // (R, C)
        let pos_emb = self.wpe.embedding(&positions)?.to_dtype(DType::F32)?; // (R, C)
        let mut x = (tok_emb + pos_emb)?.reshape((r, 1, c))?; // (R, 1, C)
        let scale = 1.0 / (hs as f32).sqrt();
        for (l, block) in self.h.iter().enumerate() {
            let attn = &block.attn;
            let qkv = attn.c_attn.forward(&block.ln_1.forward(&x)?)?; // (R, 1, 3C)
            let qkv = qkv.flatten_all()?.to_vec1::<f32>()?; // R rows of [q | k | v]
            let mut q = vec![0f32; r * c]; // (R, C)
            for (i, row) in qkv.chunks_exact(3 * c).enumerate() {
                q[i * c..(i + 1) * c].copy_from_slice(&row[..c]);
                let (k, v) = (&mut kv[i].k[l], &mut kv[i].v[l]);
                for h in 0..nh {
                    // head h of the new key/value goes to (h, pos, :) of the row's buffers
                    let at = (h * cap + pos[i]) * hs;
                    k[at..at + hs].copy_from_slice(&row[c + h * hs..c + (h + 1) * hs]);
                    v[at..at + hs].copy_from_slice(&row[2 * c + h * hs..2 * c + (h + 1) * hs]);
                }
            }
            let caches: Vec<RowCache> = kv
                .iter()
                .zip(pos)
                .map(|(s, &p)| RowCache {
                    k: &s.k[l],
                    v: &s.v[l],
                    len: p + 1,
                })
                .collect();
            // GQA: pass the model's n_kv_head here (and size the buffers (nkv, cap, hs)).
            let y = attention::decode_rows(&q, &caches, (nh, nh, hs, cap), scale)?; // (R, C)
            let y = Tensor::from_vec(y, (r, 1, c), device)?;
            x = (x + attn.c_proj.forward(&y)?)?; // (R, 1, C)
            x = (&x + block.mlp.forward(&block.ln_2.forward(&x)?, &mut None)?)?;
        }
        let x = self.ln_f.forward(&x)?; // (R, 1, C)
        Ok(self.lm_head(&x)?.squeeze(1)?) // (R, V)
    }

    /// The final hidden states after `ln_f`: (B, T) u32 → (B, T, C). The reward model and the
    /// PPO value head read these.
    pub(crate) fn hidden_states(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
        mut train: Train,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2().map_err(|_| {
            Error::InvalidArgument(format!(
                "input_ids must be (B, T), got shape {:?}",
                input_ids.dims()
            ))
        })?;
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        if t == 0 || past + t > self.cfg.block_size {
            return Err(Error::InvalidArgument(format!(
                "sequence of {} tokens (after {past} cached) does not fit block_size {}",
                t, self.cfg.block_size
            )));
        }
        let c = self.cfg.n_embd;
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?; // (B*T,)
        let tok_emb = self.wte.embedding(&ids)?; // (B*T, C)

        // Positions gathered per token rather than broadcast over the batch: the backward of a
        // gather is one scatter-add, where a broadcast's would reduce over B element by element.
        let positions: Vec<u32> = (0..b)
            .flat_map(|_| (past..past + t).map(|p| p as u32))
            .collect();
        let positions = Tensor::from_vec(positions, b * t, self.wpe.device())?;
        let pos_emb = self.wpe.embedding(&positions)?; // (B*T, C)
        let (tok_emb, pos_emb) =
            if tok_emb.device().is_cpu() && matches!(tok_emb.dtype(), DType::F16 | DType::BF16) {
                // Half-precision weights on the CPU: the activations are f32 (see `to_dtype`).
                (tok_emb.to_dtype(DType::F32)?, pos_emb.to_dtype(DType::F32)?)
            } else {
                (tok_emb, pos_emb)
            };
        let x = (tok_emb + pos_emb)?.reshape((b, t, c))?; // (B, T, C)
        let mut x = maybe_dropout(x, &mut train)?;
        match cache {
            Some(cache) => {
                let capacity = self.cfg.block_size;
                for (block, slot) in self.h.iter().zip(cache.layers.iter_mut()) {
                    x = block.forward(&x, Some((slot, past, capacity)), &mut train)?;
                }
                cache.len = past + t;
            }
            None => {
                for block in &self.h {
                    x = block.forward(&x, None, &mut train)?;
                }
            }
        }
        self.ln_f.forward(&x) // (B, T, C)
    }

    /// The language-model head, tied to the token embedding: (B, T, C) → (B, T, V).
    pub(crate) fn lm_head(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let logits = crate::gemv::matmul(&x.reshape((b * t, c))?, &self.wte.t()?)?; // (B*T, V)
        Ok(logits.reshape((b, t, self.cfg.vocab_size))?)
    }

    /// The weights as a name → tensor map (for saving).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.params.iter().cloned().collect()
    }

    /// A copy of the model with its weights in `dtype` (e.g. f16 for faster decoding: half the
    /// bytes to read per token). The copy holds constant weights (for inference).
    ///
    /// On the CPU the activations stay f32 whatever `dtype` is: decoding streams f16 weight
    /// matrices through kernels that widen each weight as it is read, and the small vectors
    /// (LayerNorm, biases) are widened at each use, so only the weights are rounded. On CUDA
    /// the whole forward pass runs in `dtype` (LayerNorm and the attention softmax in f32).
    ///
    /// # Errors
    /// candle errors on conversion.
    pub fn to_dtype(&self, dtype: DType) -> Result<Gpt> {
        let tensors = self
            .params
            .iter()
            .map(|(n, t)| Ok((n.clone(), t.detach().to_dtype(dtype)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Self::from_tensors(&self.cfg, tensors, false)
    }

    /// A copy of the model with `vocab_size` token ids, for a tokenizer that gained tokens
    /// (e.g. the chat tokens). Rows of `wte` for existing ids — and so the tied head's logits
    /// for them — are kept bit for bit; each new row starts as the mean of the existing rows
    /// (Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language Models"; what
    /// Hugging Face's `resize_token_embeddings` does), so a new token starts out as likely as
    /// an average one and its input embedding is a typical one. Shrinking is refused.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `vocab_size` is smaller than the current one.
    pub fn resize_vocab(&self, vocab_size: usize, trainable: bool) -> Result<Gpt> {
        let old = self.cfg.vocab_size;
        if vocab_size < old {
            return Err(Error::InvalidArgument(format!(
                "cannot shrink the vocabulary from {old} to {vocab_size} ids"
            )));
        }
        let mut cfg = self.cfg.clone();
        cfg.vocab_size = vocab_size;
        let mut tensors = self.tensors();
        if vocab_size > old {
            let wte = self.wte.detach(); // (V_old, C)
            let mean = wte
                .to_dtype(DType::F32)?
                .mean_keepdim(0)?
                .to_dtype(wte.dtype())?; // (1, C)
            let new_rows = mean
                .broadcast_as((vocab_size - old, self.cfg.n_embd))?
                .contiguous()?;
            tensors.insert(
                "transformer.wte.weight".to_string(),
                Tensor::cat(&[&wte, &new_rows], 0)?, // (V_new, C)
            );
        }
        Self::from_tensors(&cfg, tensors, trainable)
    }
}

/// Mean cross-entropy of `logits` (N, V) against `targets` (N,) u32, optionally weighted by
/// `mask` (N,) f32 (1 = count, 0 = ignore; the mean is over the counted positions). This is
/// the next-token loss of every stage: pre-training (no mask) and SFT (assistant tokens only).
///
/// # Errors
/// [`Error::InvalidArgument`] on mismatched shapes or an all-zero mask.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    // One fused op: log-softmax, the pick of the target, the masked mean, and its backward
    // (softmax − one-hot), in f32.
    let mask = mask.map(|m| m.to_dtype(DType::F32)).transpose()?;
    layers::cross_entropy(
        &logits.to_dtype(DType::F32)?,
        &targets.to_dtype(DType::U32)?,
        mask.as_ref(),
    )
}

/// Fetches `name` with `shape` from `vb`, turning candle's errors into ours.
fn get(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Tensor> {
    let full = if vb.prefix().is_empty() {
        name.to_string()
    } else {
        format!("{}.{name}", vb.prefix())
    };
    if !vb.contains_tensor(name) {
        return Err(Error::MissingTensor {
            name: full,
            path: None,
        });
    }
    vb.get(shape, name).map_err(|e| match e {
        candle_core::Error::UnexpectedShape { expected, got, .. } => Error::ShapeMismatch {
            name: full,
            expected: expected.dims().to_vec(),
            got: got.dims().to_vec(),
            path: None,
        },
        e => Error::Candle(e),
    })
}

/// Checks `tensors` holds every parameter of `cfg` with the right shape.
///
/// # Errors
/// [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming the first bad tensor and `path`.
pub(crate) fn check_tensors(
    cfg: &GptConfig,
    tensors: &HashMap<String, Tensor>,
    path: Option<&std::path::Path>,
) -> Result<()> {
    let expected = cfg.parameter_shapes();
    // A tensor the config does not account for (e.g. `h.3.*` with `n_layer: 2`) means the
    // config and the weights disagree: refuse rather than run a different model.
    let mut unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !expected.iter().any(|(n, _)| n == *k))
        .collect();
    unexpected.sort();
    if let Some(first) = unexpected.first() {
        let file = path
            .map(|p| format!(" in {}", p.display()))
            .unwrap_or_default();
        return Err(Error::InvalidArgument(format!(
            "unexpected tensor `{first}`{file}: not part of the model its config describes \
             (n_layer {}, bias {}){}",
            cfg.n_layer,
            cfg.bias,
            if unexpected.len() > 1 {
                format!(", nor are {} more", unexpected.len() - 1)
            } else {
                String::new()
            }
        )));
    }
    for (name, shape) in expected {
        match tensors.get(&name) {
            None => {
                return Err(Error::MissingTensor {
                    name,
                    path: path.map(|p| p.to_path_buf()),
                })
            }
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(Error::ShapeMismatch {
                    name,
                    expected: shape,
                    got: t.dims().to_vec(),
                    path: path.map(|p| p.to_path_buf()),
                })
            }
            Some(t) if !t.dtype().is_float() => {
                let file = path
                    .map(|p| format!(" in {}", p.display()))
                    .unwrap_or_default();
                return Err(Error::InvalidArgument(format!(
                    "tensor `{name}`{file} holds {:?} values; model weights must be floats",
                    t.dtype()
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> GptConfig {
        GptConfig {
            vocab_size: 11,
            block_size: 8,
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            dropout: 0.0,
            bias: true,
        }
    }

    fn ids(rows: &[&[u32]]) -> Tensor {
        let t = rows[0].len();
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
    }

    #[test]
    fn forward_shape_and_param_count() {
        let cfg = tiny();
        let m = Gpt::init(&cfg, 0, &Device::Cpu).unwrap();
        let logits = m.forward(&ids(&[&[1, 2, 3], &[4, 5, 6]])).unwrap();
        assert_eq!(logits.dims(), &[2, 3, 11]);
        // wte 88 + wpe 64 + per layer (2*16 + 8*24+24 + 64+8 + 8*32+32 + 32*8+8) + ln_f 16
        let per_layer = 32 + (192 + 24) + (64 + 8) + (256 + 32) + (256 + 8);
        assert_eq!(cfg.num_parameters(), 88 + 64 + 2 * per_layer + 16);
        assert_eq!(GptConfig::gpt2().num_parameters(), 124_439_808);
    }

    #[test]
    fn init_is_seeded() {
        let cfg = tiny();
        let a = Gpt::init(&cfg, 7, &Device::Cpu).unwrap();
        let b = Gpt::init(&cfg, 7, &Device::Cpu).unwrap();
        let c = Gpt::init(&cfg, 8, &Device::Cpu).unwrap();
        let w = |m: &Gpt| m.wte.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(w(&a), w(&b));
        assert_ne!(w(&a), w(&c));
    }

    #[test]
    fn layer_norm_matches_hand_computation() {
        let ln = LayerNorm {
            weight: Tensor::new(&[1f32, 2.0, 1.0, 1.0], &Device::Cpu).unwrap(),
            bias: Some(Tensor::new(&[0f32, 0.0, 0.0, 1.0], &Device::Cpu).unwrap()),
        };
        // x = [1, 2, 3, 4]: mean 2.5, biased var 1.25
        let x = Tensor::new(&[[1f32, 2.0, 3.0, 4.0]], &Device::Cpu).unwrap();
        let y = ln.forward(&x).unwrap().to_vec2::<f32>().unwrap();
        let s = (1.25f32 + 1e-5).sqrt();
        let want = [-1.5 / s, 2.0 * -0.5 / s, 0.5 / s, 1.5 / s + 1.0];
        for (a, b) in y[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn attention_is_causal() {
        // Changing a later token must not change earlier logits.
        let m = Gpt::init(&tiny(), 1, &Device::Cpu).unwrap();
        let a = m.forward(&ids(&[&[1, 2, 3, 4]])).unwrap();
        let b = m.forward(&ids(&[&[1, 2, 3, 9]])).unwrap();
        let a3 = a.narrow(1, 0, 3).unwrap().flatten_all().unwrap();
        let b3 = b.narrow(1, 0, 3).unwrap().flatten_all().unwrap();
        assert_eq!(a3.to_vec1::<f32>().unwrap(), b3.to_vec1::<f32>().unwrap());
        let a4 = a.narrow(1, 3, 1).unwrap().flatten_all().unwrap();
        let b4 = b.narrow(1, 3, 1).unwrap().flatten_all().unwrap();
        assert_ne!(a4.to_vec1::<f32>().unwrap(), b4.to_vec1::<f32>().unwrap());
    }

    /// f16 weights on the CPU: activations and logits stay f32, and the logits are those of
    /// the f32 model up to the weights' rounding (relative 2^-11), in the whole-sequence pass
    /// and in KV-cache decoding (where the f16 matrix-vector kernels run).
    #[test]
    fn f16_weights_compute_in_f32() {
        let m = Gpt::init(&tiny(), 3, &Device::Cpu).unwrap();
        let half = m.to_dtype(DType::F16).unwrap();
        assert_eq!(half.dtype(), DType::F16);
        let seq = ids(&[&[3u32, 1, 4, 1, 5]]);
        let (want, got) = (m.forward(&seq).unwrap(), half.forward(&seq).unwrap());
        assert_eq!(got.dtype(), DType::F32);
        assert!(crate::testing::max_abs_diff(&got, &want) < 1e-2);
        let mut cache = KvCache::new(2);
        let step = half.forward_with_cache(&seq, &mut cache).unwrap(); // (1, V)
        assert_eq!(step.dtype(), DType::F32);
        let last = want.narrow(1, 4, 1).unwrap().squeeze(1).unwrap();
        assert!(crate::testing::max_abs_diff(&step, &last) < 1e-2);
    }

    #[test]
    fn cache_matches_full_forward() {
        let m = Gpt::init(&tiny(), 2, &Device::Cpu).unwrap();
        let seq = [3u32, 1, 4, 1, 5, 9, 2, 6];
        let full = m.forward(&ids(&[&seq])).unwrap(); // (1, 8, V)
        let mut cache = KvCache::new(2);
        // prompt of 3, then one at a time
        let mut got = vec![m
            .forward_with_cache(&ids(&[&seq[..3]]), &mut cache)
            .unwrap()];
        for i in 3..8 {
            got.push(
                m.forward_with_cache(&ids(&[&seq[i..i + 1]]), &mut cache)
                    .unwrap(),
            );
        }
        assert_eq!(cache.len(), 8);
        for (k, g) in got.iter().enumerate() {
            let pos = k + 2;
            let want = full.narrow(1, pos, 1).unwrap().flatten_all().unwrap();
            let diff = (g.flatten_all().unwrap() - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "position {pos}: {diff}");
        }
        // the cache is full: one more token does not fit
        assert!(m
            .forward_with_cache(&ids(&[&[1]]), &mut cache)
            .unwrap_err()
            .to_string()
            .contains("block_size"));
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        // dropout 0: the fused attention kernel; dropout 0.1: the plain-op path.
        for dropout in [0.0, 0.1] {
            every_parameter_gets_a_gradient_with(dropout);
        }
    }

    fn every_parameter_gets_a_gradient_with(dropout: f32) {
        let mut cfg = tiny();
        cfg.dropout = dropout;
        let m = Gpt::init(&cfg, 3, &Device::Cpu).unwrap();
        let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        let x = ids(&[&[1, 2, 3, 4, 5], &[6, 7, 8, 9, 10]]);
        let y = ids(&[&[2, 3, 4, 5, 6], &[7, 8, 9, 10, 0]]);
        let logits = m.forward_train(&x, &mut rng).unwrap();
        let loss = cross_entropy(
            &logits.reshape((10, 11)).unwrap(),
            &y.flatten_all().unwrap(),
            None,
        )
        .unwrap();
        let grads = loss.backward().unwrap();
        let vars = m.vars().unwrap();
        assert_eq!(vars.len(), cfg.parameter_shapes().len());
        for (name, var) in vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "zero gradient for {name}");
        }
    }

    #[test]
    fn cross_entropy_of_uniform_logits_is_ln_v() {
        let logits = Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap();
        let t = Tensor::new(&[0u32, 3, 4], &Device::Cpu).unwrap();
        let l = cross_entropy(&logits, &t, None)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - 5f32.ln()).abs() < 1e-6);
        // hand computation: logits [1, 2, 3], target 2 -> -log(e^3 / (e + e^2 + e^3))
        let logits = Tensor::new(&[[1f32, 2.0, 3.0], [0.0, 0.0, 0.0]], &Device::Cpu).unwrap();
        let t = Tensor::new(&[2u32, 1], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[1f32, 0.0], &Device::Cpu).unwrap();
        let l = cross_entropy(&logits, &t, Some(&mask))
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let e = std::f32::consts::E;
        let want = -(e.powi(3) / (e + e * e + e.powi(3))).ln();
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
    }

    #[test]
    fn bad_config_is_an_error() {
        let mut cfg = tiny();
        cfg.n_head = 3;
        let e = Gpt::init(&cfg, 0, &Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("n_embd (8) must be divisible by n_head (3)"),
            "{e}"
        );
    }

    #[test]
    fn absurd_configs_are_refused_by_field() {
        for (field, cfg) in [
            (
                "vocab_size",
                GptConfig {
                    vocab_size: 0,
                    ..tiny()
                },
            ),
            (
                "block_size",
                GptConfig {
                    block_size: 0,
                    ..tiny()
                },
            ),
            (
                "n_layer",
                GptConfig {
                    n_layer: 0,
                    ..tiny()
                },
            ),
            (
                "n_head",
                GptConfig {
                    n_head: 0,
                    ..tiny()
                },
            ),
            (
                "n_embd",
                GptConfig {
                    n_embd: 0,
                    ..tiny()
                },
            ),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert_eq!(
                e,
                format!("invalid config: {field} must be at least 1, got 0")
            );
        }
        let e = GptConfig {
            n_head: 16,
            ..tiny()
        }
        .validate()
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid config: n_embd (8) must be divisible by n_head (16)"
        );
        for dropout in [f32::NAN, -0.1, 1.0] {
            let e = GptConfig { dropout, ..tiny() }.validate().unwrap_err();
            assert!(e.to_string().contains("dropout must be in [0, 1)"), "{e}");
        }
    }

    #[test]
    fn a_model_larger_than_memory_is_refused_before_allocation() {
        // Sizes that overflow 64 bits: refused wherever the memory is known or not.
        let huge = GptConfig {
            n_embd: 1_000_000_000_000,
            ..tiny()
        };
        let e = Gpt::init(&huge, 0, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("n_embd 1000000000000"), "{e}");
        assert!(e.contains("overflows 64 bits"), "{e}");
        let dir = std::env::temp_dir().join(format!("tinygpt-huge-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        huge.save(&path).unwrap();
        let e = GptConfig::load(&path).unwrap_err().to_string();
        std::fs::remove_dir_all(&dir).ok();
        assert!(
            e.starts_with(&format!("invalid config: {}: a model of", path.display())),
            "{e}"
        );
        // n_embd 10^8: about 7000 GiB to train, more than any machine this runs on. Where the
        // memory is unknown (not Linux, TINYGPT_MEMORY_LIMIT=off) nothing is checked, so the
        // model is not built either.
        if crate::memory::MemoryBudget::detect(&Device::Cpu)
            .unwrap()
            .is_none()
        {
            return;
        }
        let big = GptConfig {
            n_embd: 100_000_000,
            ..tiny()
        };
        let e = Gpt::init(&big, 0, &Device::Cpu).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e:?}");
        let e = e.to_string();
        assert!(e.contains("GiB to train (weights "), "{e}");
        assert!(e.contains(" GiB "), "{e}");
        let mut t = HashMap::new();
        t.insert(
            "transformer.wte.weight".to_string(),
            Tensor::zeros((1, 1), DType::F32, &Device::Cpu).unwrap(),
        );
        // Before the tensors are looked at, for an inference load.
        let vb = VarBuilder::from_tensors(t, DType::F32, &Device::Cpu);
        let e = Gpt::new(&big, vb).unwrap_err().to_string();
        assert!(e.contains("GiB to run (weights "), "{e}");
    }

    #[test]
    fn integer_weights_are_refused_by_name() {
        let cfg = tiny();
        let m = Gpt::init(&cfg, 0, &Device::Cpu).unwrap();
        let mut t = m.tensors();
        t.insert(
            "transformer.ln_f.weight".into(),
            Tensor::ones(8, DType::U32, &Device::Cpu).unwrap(),
        );
        let e = Gpt::from_tensors(&cfg, t, false).unwrap_err().to_string();
        assert!(
            e.contains("`transformer.ln_f.weight` holds U32 values"),
            "{e}"
        );
    }

    #[test]
    fn wrong_shape_names_the_tensor() {
        let cfg = tiny();
        let m = Gpt::init(&cfg, 0, &Device::Cpu).unwrap();
        let mut t = m.tensors();
        t.insert(
            "transformer.h.1.attn.c_attn.weight".into(),
            Tensor::zeros((8, 20), DType::F32, &Device::Cpu).unwrap(),
        );
        let e = Gpt::from_tensors(&cfg, t.clone(), false)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "tensor `transformer.h.1.attn.c_attn.weight` has shape [8, 20], expected [8, 24]"
        );
        t.remove("transformer.ln_f.bias");
        t.insert(
            "transformer.h.1.attn.c_attn.weight".into(),
            Tensor::zeros((8, 24), DType::F32, &Device::Cpu).unwrap(),
        );
        let e = Gpt::from_tensors(&cfg, t, false).unwrap_err().to_string();
        assert_eq!(e, "tensor `transformer.ln_f.bias` is missing");
    }
}
