//! The GPT: a next-token predictor, in two families.
//!
//! - **GPT-2** (Radford et al. 2019) as Karpathy's nanoGPT `model.py` writes it: learned
//!   position embeddings, LayerNorm, a fused `c_attn`, a GELU MLP, a tied head.
//! - **Llama** (Touvron et al. 2023) and its descendants (Qwen2, Qwen3, SmolLM2, TinyLlama):
//!   rotary position embeddings, RMSNorm, grouped-query attention, a SwiGLU MLP, a tied or
//!   untied head, optional q/k/v biases (Qwen2) and q/k norms (Qwen3).
//!
//! One [`Gpt`] holds either ([`GptConfig::arch`]): every stage, the sampler and the server take
//! the same type, and the block reads the same for both, the families differing in three
//! pieces that are enums here (`Norm`, `Qkv`, `Mlp`) and in RoPE inside the attention. The
//! file reads top-down: norms → projections → attention → MLP → Block → config → the model.
//! Every tensor line carries its shape: `B` batch, `T` time (sequence), `C` channels
//! (`n_embd`), `nh` query heads, `nkv` key/value heads, `hs` head size, `I` MLP width, `V`
//! vocabulary.
//!
//! Weights carry Hugging Face names and layouts: GPT-2's (`transformer.h.0.attn.c_attn.weight`,
//! `Conv1D` `(in, out)`, applied as `x @ W + b`) or Llama's (`model.layers.0.self_attn.q_proj.weight`,
//! `nn.Linear` `(out, in)`, applied as `x @ Wᵀ + b`). So a tinygpt `model.safetensors` and a
//! Hugging Face one hold the same tensors under the same names.
//!
//! Everything here is built from differentiable ops: candle primitives and the fused kernels
//! of [`crate::kernels`], each with its own backward (candle's fused `layer_norm`, `rms_norm`,
//! `rotary_emb` and `softmax_last_dim` have none), so gradients reach every parameter.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var, D};
use candle_nn::VarBuilder;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use crate::attention::{
    self, attention_probs, causal_attention, causal_attention_gqa_qkv, causal_attention_qkv,
    repeat_kv, RowCache,
};
use crate::kernels::decode_step::{add_assign, add_rows, streamable, vector_f32};
use crate::kernels::dropout_mask::DropoutMask;
use crate::kernels::lora_linear::{lora_linear, LoraPart};
use crate::kernels::q8::Q8Matrix;
use crate::kernels::rms_norm::{rms_norm, rms_norm_rows};
use crate::kernels::rope::{rope_qkv, rope_rows, RopeTable};
use crate::kernels::swiglu::{swiglu, swiglu_rows};
use crate::layers;
use crate::lora::{LoraAdapter, LoraState};
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
    eps: f64,
}

impl LayerNorm {
    fn new(c: usize, bias: bool, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: get(&vb, &[c], "weight")?,
            bias: if bias {
                Some(get(&vb, &[c], "bias")?)
            } else {
                None
            },
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = like(Some(&self.weight), x)?.unwrap_or_else(|| self.weight.clone());
        let bias = like(self.bias.as_ref(), x)?;
        layers::layer_norm(x, &weight, bias.as_ref(), self.eps) // (.., C)
    }
}

/// RMSNorm over the last dimension (Zhang & Sennrich 2019), Llama's norm:
/// `x / sqrt(mean(x²) + eps) · weight`, no mean subtracted, no shift. One fused op with a
/// hand-written backward ([`crate::kernels::rms_norm`]), statistics in f32.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor, // (C,) or (hs,) for Qwen3's q/k norm
    eps: f64,
}

impl RmsNorm {
    fn new(c: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: get(&vb, &[c], "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let weight = like(Some(&self.weight), x)?.unwrap_or_else(|| self.weight.clone());
        rms_norm(x, &weight, self.eps) // (.., C)
    }

    /// [`RmsNorm::forward`] on plain rows of the weight's width, `x` → `y`.
    fn forward_rows(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        rms_norm_rows(x, &vector_f32(&self.weight)?, y, self.eps as f32);
        Ok(())
    }
}

/// The norm before each sub-layer and at the end: GPT-2's LayerNorm or Llama's RMSNorm.
#[derive(Debug, Clone)]
enum Norm {
    Layer(LayerNorm),
    Rms(RmsNorm),
}

impl Norm {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match cfg.arch {
            Arch::Gpt2 => Norm::Layer(LayerNorm::new(cfg.n_embd, cfg.bias, cfg.norm_eps, vb)?),
            Arch::Llama => Norm::Rms(RmsNorm::new(cfg.n_embd, cfg.norm_eps, vb)?),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Layer(n) => n.forward(x),
            Norm::Rms(n) => n.forward(x),
        }
    }

    /// [`Norm::forward`] on plain rows, `x` → `y` (R·C floats each), for a decoding step.
    fn forward_rows(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        match self {
            Norm::Layer(n) => {
                let w = vector_f32(&n.weight)?;
                let b = n.bias.as_ref().map(vector_f32).transpose()?;
                layers::layer_norm_rows(x, &w, b.as_deref(), y, n.eps as f32);
            }
            Norm::Rms(n) => n.forward_rows(x, y)?,
        }
        Ok(())
    }
}

/// A projection `y = x @ W + b`. GPT-2 stores `W` as HF's `Conv1D` does, `(in, out)`; Llama
/// as PyTorch's `nn.Linear`, `(out, in)`, applied as `x @ Wᵀ` (a transposed view: gemm reads
/// either layout, and so do the f16 and f32 decoding kernels).
///
/// A LoRA model's targeted projections carry an adapter ([`crate::lora`]): `x @ W + b` plus
/// `scale · (dropout(x) @ Aᵀ) @ Bᵀ`, `W` frozen.
#[derive(Debug, Clone)]
struct Linear {
    weight: Tensor,       // (in, out), or (out, in) when `out_in`
    bias: Option<Tensor>, // (out,)
    out_in: bool,
    lora: Option<LoraAdapter>,
    /// A Q8_0 model's weight, `(out, in)` ([`Gpt::from_gguf`], [`Gpt::quantize`]); `weight`
    /// is then a zero-stride placeholder of the right shape and every product reads this.
    q8: Option<Arc<Q8Matrix>>,
}

impl Linear {
    /// GPT-2's `Conv1D`: `weight` (in, out).
    fn new(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: get(&vb, &[d_in, d_out], "weight")?,
            bias: if bias {
                Some(get(&vb, &[d_out], "bias")?)
            } else {
                None
            },
            out_in: false,
            lora: None,
            q8: None,
        })
    }

    /// PyTorch's `nn.Linear`: `weight` (out, in).
    fn new_out_in(d_in: usize, d_out: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: get(&vb, &[d_out, d_in], "weight")?,
            bias: if bias {
                Some(get(&vb, &[d_out], "bias")?)
            } else {
                None
            },
            out_in: true,
            lora: None,
            q8: None,
        })
    }

    /// The weight as `(in, out)` (a Q8_0 weight widened to f32, for a product of many rows).
    fn w(&self) -> Result<Tensor> {
        if let Some(q) = &self.q8 {
            let w = q8_tensor(q, self.weight.device())?; // (out, in)
            return Ok(w.t()?);
        }
        Ok(if self.out_in {
            self.weight.t()?
        } else {
            self.weight.clone()
        })
    }

    /// (B, T, in) → (B, T, out): a gemm, then the bias as one fused op; with a LoRA adapter
    /// the one fused op of [`Linear::forward_lora`].
    fn forward(&self, x: &Tensor, train: &mut Train) -> Result<Tensor> {
        let bias = like(self.bias.as_ref(), x)?;
        if let Some(y) = self.q8_product(x)? {
            return Ok(match &bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            });
        }
        if let Some(l) = &self.lora {
            return self.forward_lora(l, &self.w()?, bias.as_ref(), x, train);
        }
        layers::linear(x, &self.w()?, bias.as_ref())
    }

    /// (B, T, in) → gelu(x @ W + b), (B, T, out): the bias add fused into the GELU.
    fn forward_gelu(&self, x: &Tensor, train: &mut Train) -> Result<Tensor> {
        let h = match (&self.lora, self.q8_product(x)?) {
            (_, Some(h)) => h,
            (Some(l), None) => self.forward_lora(l, &self.w()?, None, x, train)?,
            (None, None) => layers::linear(x, &self.w()?, None)?,
        }; // (B, T, out)
        layers::bias_gelu(&h, like(self.bias.as_ref(), x)?.as_ref())
    }

    /// [`Linear::forward`] of `rows` plain rows, `x` (rows, in) → `y` (rows, out), for an f16 or f32
    /// weight without an adapter (a decoding step; [`Gpt::decodes_by_rows`] checks).
    fn forward_rows(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        self.product_rows(x, rows, y)?;
        if let Some(b) = &self.bias {
            add_rows(y, &vector_f32(b)?);
        }
        Ok(())
    }

    /// `x (rows, in) @ W` into `y (rows, out)`, no bias: the Q8_0 kernel or the streaming f16/f32 one.
    fn product_rows(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        match &self.q8 {
            Some(q) => q.linear_into(x, rows, y),
            None => crate::gemv::linear_into(x, rows, &self.w()?, y),
        }
    }

    /// Whether [`Linear::forward_rows`] takes this projection.
    fn by_rows(&self) -> bool {
        self.lora.is_none() && (self.q8.is_some() || streamable(&self.weight))
    }

    /// `x (.., in) @ W` through the Q8_0 kernel, for a Q8_0 weight and at most
    /// [`crate::gemv::MAX_ROWS`] rows on the CPU (decoding, a short prompt); `None` otherwise
    /// (a longer prompt multiplies the widened weight, [`Linear::w`]).
    fn q8_product(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let Some(q) = &self.q8 else {
            return Ok(None);
        };
        let d_in = x.dim(D::Minus1)?;
        let rows = x.elem_count() / d_in.max(1);
        if rows > crate::gemv::MAX_ROWS || !x.device().is_cpu() {
            return Ok(None);
        }
        let xs = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut y = vec![0f32; rows * q.d_out()];
        q.linear_into(&xs, rows, &mut y)?;
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = q.d_out();
        }
        Ok(Some(Tensor::from_vec(y, dims, x.device())?))
    }

    /// `x W (+ b) + scale · (dropout(x) Aᵀ) Bᵀ`, (B, T, in) → (B, T, out), as one op with its
    /// own backward ([`lora_linear`]): the frozen `w` (in, out) gets no gradient and no
    /// activation beside the output is kept. Dropout (on the adapter's input) in training only.
    fn forward_lora(
        &self,
        l: &crate::lora::LoraAdapter,
        w: &Tensor,
        bias: Option<&Tensor>,
        x: &Tensor,
        train: &mut Train,
    ) -> Result<Tensor> {
        let parts = lora_parts(&[l], x, train)?;
        lora_product(x, w, bias, &l.a, &l.b, l.scale, &parts)
    }
}

/// The parts of one [`lora_linear`] over `adapters` of the same input `x` (…, in), in order:
/// each adapter's rank and, in training, its own dropout mask of `x` (PEFT's `lora_dropout`),
/// seeded from the training RNG.
fn lora_parts(adapters: &[&LoraAdapter], x: &Tensor, train: &mut Train) -> Result<Vec<LoraPart>> {
    let d_in = x.dim(D::Minus1)?;
    let rows = x.elem_count() / d_in.max(1);
    adapters
        .iter()
        .map(|l| {
            let dropout = match train {
                Some((rng, _)) if l.dropout > 0.0 => Some(Arc::new(DropoutMask::sample(
                    rows,
                    d_in,
                    l.dropout,
                    rng.random::<u64>(),
                )?)),
                _ => None,
            };
            Ok(LoraPart {
                rank: l.a.dim(0)?,
                dropout,
            })
        })
        .collect()
}

/// `x W (+ b) + scale · [(x ∘ m_i) A_iᵀ]_i Bᵀ`, (…, in) → (…, out), through [`lora_linear`]
/// on `x`'s rows.
fn lora_product(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    parts: &[LoraPart],
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let d_in = *dims
        .last()
        .ok_or_else(|| Error::InvalidArgument("linear input is a scalar".into()))?;
    let x2 = x.reshape(((), d_in))?; // (rows, in)
    let a = like(Some(a), x)?.unwrap_or_else(|| a.clone()); // (Σ r, in)
    let b = like(Some(b), x)?.unwrap_or_else(|| b.clone()); // (out, Σ r)
    let y = lora_linear(&x2, w, bias, &a, &b, scale, parts)?; // (rows, out)
    let mut out = dims;
    if let Some(last) = out.last_mut() {
        *last = y.dim(1)?;
    }
    Ok(y.reshape(out)?)
}

/// Several `nn.Linear` projections of the same input (Llama's q/k/v, or gate/up). For many rows
/// (training, prefill) they are one product, their `(out_i, in)` weights stacked along `out`:
/// one gemm instead of two or three, one pass over `x`; for a few rows (decoding) one product
/// per part. A model with constant weights stacks them once, when it is
/// built, and its parameters become views of the stack; a trainable one stacks its `Var`s at
/// every forward pass, so gradients reach each of them.
#[derive(Debug, Clone)]
struct Stacked {
    parts: Vec<Linear>,
    stacked: Option<Linear>,
}

impl Stacked {
    fn new(parts: Vec<Linear>) -> Result<Self> {
        let mut s = Self {
            parts,
            stacked: None,
        };
        if s.parts.iter().all(|p| !p.weight.is_variable()) {
            let stacked = s.stack()?;
            // Each part becomes a view of the stack, so the weights are held once.
            let mut at = 0;
            for part in &mut s.parts {
                let n = part.weight.dim(0)?;
                part.weight = stacked.weight.narrow(0, at, n)?;
                if let (Some(b), Some(sb)) = (part.bias.as_mut(), stacked.bias.as_ref()) {
                    *b = sb.narrow(0, at, n)?;
                }
                at += n;
            }
            s.stacked = Some(stacked);
        }
        Ok(s)
    }

    /// The parts' outputs side by side, one product over the stacked weight (decoding).
    fn forward_rows(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        match &self.stacked {
            Some(l) => l.forward_rows(x, rows, y),
            None => Err(Error::InvalidArgument(
                "decoding by rows needs constant (stacked) projections".into(),
            )),
        }
    }

    fn by_rows(&self) -> bool {
        self.parts.iter().all(|p| p.lora.is_none())
            && self.stacked.as_ref().is_some_and(Linear::by_rows)
    }

    fn stack(&self) -> Result<Linear> {
        let weights: Vec<&Tensor> = self.parts.iter().map(|p| &p.weight).collect();
        let biases: Option<Vec<&Tensor>> = self.parts.iter().map(|p| p.bias.as_ref()).collect();
        Ok(Linear {
            weight: Tensor::cat(&weights, 0)?, // (Σ out_i, in)
            bias: biases.map(|b| Tensor::cat(&b, 0)).transpose()?,
            out_in: true,
            lora: None,
            q8: None,
        })
    }

    /// (B, T, in) → (B, T, Σ out_i), the outputs side by side in the order of `parts`. The
    /// frozen product stays one gemm; the parts' LoRA deltas (zeros for a part without an
    /// adapter) are laid side by side and added to it.
    fn forward(&self, x: &Tensor, train: &mut Train) -> Result<Tensor> {
        // For a few rows (decoding, sampling) the products run part by part: stacking
        // trainable weights would copy more than the products compute, and constant ones then
        // compute the same numbers (the same products), so a model gives the same logits
        // whether loaded trainable or not. For many rows (training, prefill), one product.
        let rows = x.elem_count() / x.dim(D::Minus1)?.max(1);
        if rows < STACK_MIN_ROWS {
            let outs = self
                .parts
                .iter()
                .map(|p| p.forward(x, train))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&outs, D::Minus1)?);
        }
        if self.parts.iter().any(|p| p.lora.is_some()) {
            return self.forward_lora(x, train);
        }
        match &self.stacked {
            Some(l) => l.forward(x, train),
            None => self.stack()?.forward(x, train),
        }
    }
    /// The stacked product with LoRA adapters on some parts, as one [`lora_linear`]: the
    /// frozen weights stacked, the parts' `A`s stacked `(Σ r, in)` and their `B`s on the
    /// diagonal of `(Σ out, Σ r)` (zeros elsewhere, and for a part without an adapter), so
    /// each part's output gets exactly its own delta. With dropout in training each adapter
    /// draws its own mask of `x`, as PEFT's modules do. Adapters of different scales run one
    /// product per part.
    fn forward_lora(&self, x: &Tensor, train: &mut Train) -> Result<Tensor> {
        let adapters: Vec<_> = self.parts.iter().filter_map(|p| p.lora.as_ref()).collect();
        let scale = adapters.first().map(|l| l.scale).unwrap_or(1.0);
        if adapters.iter().any(|l| l.scale != scale) {
            let outs = self
                .parts
                .iter()
                .map(|p| p.forward(x, train))
                .collect::<Result<Vec<_>>>()?;
            return Ok(Tensor::cat(&outs, D::Minus1)?);
        }
        let stacked = match &self.stacked {
            Some(l) => l.clone(),
            None => self.stack()?,
        };
        let r_total: usize = adapters
            .iter()
            .map(|l| l.a.dim(0))
            .sum::<candle_core::Result<usize>>()?;
        let a = Tensor::cat(&adapters.iter().map(|l| &l.a).collect::<Vec<_>>(), 0)?; // (Σ r, in)
        let (device, dtype) = (x.device(), a.dtype());
        let mut rows = Vec::with_capacity(self.parts.len());
        let mut at = 0;
        for part in &self.parts {
            let out = part.weight.dim(0)?;
            rows.push(match &part.lora {
                Some(l) => {
                    let r = l.b.dim(1)?;
                    let mut blocks = Vec::with_capacity(3);
                    if at > 0 {
                        blocks.push(Tensor::zeros((out, at), dtype, device)?);
                    }
                    blocks.push(l.b.clone());
                    if at + r < r_total {
                        blocks.push(Tensor::zeros((out, r_total - at - r), dtype, device)?);
                    }
                    at += r;
                    Tensor::cat(&blocks, 1)? // (out_i, Σ r)
                }
                None => Tensor::zeros((out, r_total), dtype, device)?,
            });
        }
        let b = Tensor::cat(&rows, 0)?; // (Σ out, Σ r), block-diagonal
        let parts = lora_parts(&adapters, x, train)?;
        let bias = like(stacked.bias.as_ref(), x)?;
        lora_product(x, &stacked.w()?, bias.as_ref(), &a, &b, scale, &parts)
    }
}

/// Rows from which [`Stacked`] runs one product of its stacked weights rather than one per part
/// (stacking trainable weights copies about what `in · out` multiply-adds cost).
const STACK_MIN_ROWS: usize = 64;

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
    x.mul(&dropout_mask(x, p, rng)?)
}

/// The mask [`dropout`] multiplies `x` by: 0 with probability `p`, else `1 / (1 - p)`; `x`'s
/// shape, dtype and device.
fn dropout_mask(x: &Tensor, p: f32, rng: &mut ChaCha8Rng) -> candle_core::Result<Tensor> {
    let scale = 1.0 / (1.0 - p);
    let mask: Vec<f32> = (0..x.elem_count())
        .map(|_| if rng.random::<f32>() < p { 0.0 } else { scale })
        .collect();
    Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())
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

/// The query, key and value projections: GPT-2's fused `c_attn` `(C, 3C)`, or Llama's
/// `q_proj`, `k_proj`, `v_proj` (`n_head · hs`, `n_kv_head · hs` and `n_kv_head · hs` outputs)
/// computed as one product. Either way the output is `(B, T, (nh + 2·nkv)·hs)`, laid out
/// `[q heads | k heads | v heads]`.
#[derive(Debug, Clone)]
enum Qkv {
    CAttn(Linear),
    Split(Stacked),
}

impl Qkv {
    fn forward(&self, x: &Tensor, train: &mut Train) -> Result<Tensor> {
        match self {
            Qkv::CAttn(l) => l.forward(x, train),
            Qkv::Split(s) => s.forward(x, train),
        }
    }

    fn forward_rows(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        match self {
            Qkv::CAttn(l) => l.forward_rows(x, rows, y),
            Qkv::Split(s) => s.forward_rows(x, rows, y),
        }
    }

    fn by_rows(&self) -> bool {
        match self {
            Qkv::CAttn(l) => l.by_rows(),
            Qkv::Split(s) => s.by_rows(),
        }
    }
}

/// Causal self-attention (Vaswani et al. 2017). GPT-2: multi-head, the projections fused into
/// one `c_attn`, positions already in the input. Llama: grouped-query (`n_kv_head` key/value
/// heads shared by the `n_head` query heads), rotary position embeddings applied to queries
/// and keys (Su et al. 2021, Hugging Face's rotate-half layout), and for Qwen3 an RMSNorm over
/// each query and key head before the rotation.
#[derive(Debug, Clone)]
struct CausalSelfAttention {
    qkv: Qkv,
    c_proj: Linear, // nh·hs -> C (Llama's o_proj)
    n_head: usize,
    n_kv_head: usize,
    head_size: usize,
    qk_norm: Option<(RmsNorm, RmsNorm)>, // over hs
    rope: Option<Arc<RopeTable>>,
}

impl CausalSelfAttention {
    fn new(cfg: &GptConfig, rope: Option<Arc<RopeTable>>, vb: VarBuilder) -> Result<Self> {
        let (c, hs) = (cfg.n_embd, cfg.head_size());
        let (nh, nkv) = (cfg.n_head, cfg.n_kv_heads());
        Ok(match cfg.arch {
            Arch::Gpt2 => Self {
                qkv: Qkv::CAttn(Linear::new(c, 3 * c, cfg.bias, vb.pp("c_attn"))?),
                c_proj: Linear::new(c, c, cfg.bias, vb.pp("c_proj"))?,
                n_head: nh,
                n_kv_head: nh,
                head_size: hs,
                qk_norm: None,
                rope: None,
            },
            Arch::Llama => {
                let bias = cfg.bias || cfg.qkv_bias;
                let proj = |name: &str, out: usize| Linear::new_out_in(c, out, bias, vb.pp(name));
                let qkv = vec![
                    proj("q_proj", nh * hs)?,
                    proj("k_proj", nkv * hs)?,
                    proj("v_proj", nkv * hs)?,
                ];
                let qk_norm = if cfg.qk_norm {
                    Some((
                        RmsNorm::new(hs, cfg.norm_eps, vb.pp("q_norm"))?,
                        RmsNorm::new(hs, cfg.norm_eps, vb.pp("k_norm"))?,
                    ))
                } else {
                    None
                };
                Self {
                    qkv: Qkv::Split(Stacked::new(qkv)?),
                    c_proj: Linear::new_out_in(nh * hs, c, cfg.bias, vb.pp("o_proj"))?,
                    n_head: nh,
                    n_kv_head: nkv,
                    head_size: hs,
                    qk_norm,
                    rope,
                }
            }
        })
    }

    /// The projections and (Qwen3) q/k norms of `x` (B, T, C), before any rotation:
    /// (B, T, (nh + 2·nkv)·hs), laid out `[q | k | v]`.
    fn project(&self, x: &Tensor, train: &mut Train) -> Result<Tensor> {
        let qkv = self.qkv.forward(x, train)?; // (B, T, (nh + 2nkv)·hs)
        let Some((q_norm, k_norm)) = &self.qk_norm else {
            return Ok(qkv);
        };
        let (b, t, _) = qkv.dims3()?;
        let (nh, nkv, hs) = (self.n_head, self.n_kv_head, self.head_size);
        let q = qkv.narrow(2, 0, nh * hs)?.reshape((b, t, nh, hs))?;
        let k = qkv.narrow(2, nh * hs, nkv * hs)?.reshape((b, t, nkv, hs))?;
        let v = qkv.narrow(2, (nh + nkv) * hs, nkv * hs)?;
        let q = q_norm.forward(&q)?.reshape((b, t, nh * hs))?; // each head over hs
        let k = k_norm.forward(&k)?.reshape((b, t, nkv * hs))?;
        Ok(Tensor::cat(&[&q, &k, &v], 2)?)
    }

    /// [`Self::project`], then the rotary embeddings of positions `past..past + T`.
    fn qkv(&self, x: &Tensor, past: usize, train: &mut Train) -> Result<Tensor> {
        let qkv = self.project(x, train)?;
        match &self.rope {
            Some(rope) => rope_qkv(&qkv, rope, self.n_head, self.n_kv_head, past),
            None => Ok(qkv),
        }
    }

    /// `x`: (B, T, C). With a cache `(slot, past, block_size)`, the new keys/values are
    /// written at positions `past..past+T` of the layer's buffers (grown as [`reserve_kv`]
    /// says) and the queries attend to everything cached (position `past + i` sees
    /// `0..=past + i`).
    fn forward(
        &self,
        x: &Tensor,
        layer_cache: Option<(&mut Option<LayerKv>, usize, usize)>,
        train: &mut Train,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hs) = (self.n_head, self.n_kv_head, self.head_size);
        let past = layer_cache.as_ref().map(|(_, past, _)| *past).unwrap_or(0);
        let qkv = self.qkv(x, past, train)?; // (B, T, (nh + 2nkv)·hs)
        let scale = 1.0 / (hs as f64).sqrt();
        let attn_dropout = matches!(train, Some((_, p)) if *p > 0.0);
        if layer_cache.is_none() && !attn_dropout {
            // Training and whole-sequence inference: heads split and merged inside one op.
            let y = if nkv == nh {
                causal_attention_qkv(&qkv, nh, scale)?
            } else {
                causal_attention_gqa_qkv(&qkv, nh, nkv, scale)?
            }; // (B, T, nh·hs)
            let y = self.c_proj.forward(&y, train)?;
            return Ok(maybe_dropout(y, train)?); // resid_dropout
        }
        let heads = |at: usize, n: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, at * hs, n * hs)? // (B, T, n·hs)
                .reshape((b, t, n, hs))? // (B, T, n, hs)
                .transpose(1, 2)? // (B, n, T, hs)
                .contiguous()
        };
        let (q, mut k, mut v) = (heads(0, nh)?, heads(nh, nkv)?, heads(nh + nkv, nkv)?);
        if let Some((slot, past, block_size)) = layer_cache {
            let dims = (b, nkv, hs, block_size);
            {
                let kv = reserve_kv(slot, dims, past, past + t, k.dtype(), k.device())?;
                kv.k.slice_set(&k, 2, past)?; // written in place at past..past + T
                kv.v.slice_set(&v, 2, past)?;
                k = kv.k.narrow(2, 0, past + t)?; // (B, nkv, past + T, hs), a view
                v = kv.v.narrow(2, 0, past + t)?;
            }
        }
        let y = match train {
            // Attention dropout needs the weights themselves: the plain-op path.
            Some((_, p)) if *p > 0.0 => {
                let (k, v) = (repeat_kv(&k, nh / nkv)?, repeat_kv(&v, nh / nkv)?);
                let att = attention_probs(&q, &k, scale)?; // (B, nh, T, T_k)
                maybe_dropout(att, train)?.matmul(&v)? // (B, nh, T, hs)
            }
            // Otherwise the fused kernel (FlashAttention-2 style on the CPU).
            _ => causal_attention(&q, &k, &v, scale)?, // (B, nh, T, hs)
        };
        let y = y.transpose(1, 2)?.reshape((b, t, nh * hs))?; // (B, T, nh·hs): heads merged
        let y = self.c_proj.forward(&y, train)?;
        Ok(maybe_dropout(y, train)?) // resid_dropout
    }
}

/// The position-wise feed-forward network. GPT-2: C → 4C → GELU (tanh form, `gelu_new`) →
/// C. Llama: SwiGLU (Shazeer 2020), `down_proj(silu(gate_proj(x)) · up_proj(x))`, C → I → C,
/// with gate and up computed as one product.
#[derive(Debug, Clone)]
enum Mlp {
    Gelu {
        c_fc: Linear,   // C -> 4C
        c_proj: Linear, // 4C -> C
    },
    SwiGlu {
        gate_up: Stacked, // C -> [gate (I) | up (I)]
        down: Linear,     // I -> C
    },
}

impl Mlp {
    fn new(cfg: &GptConfig, vb: VarBuilder) -> Result<Self> {
        let (c, i) = (cfg.n_embd, cfg.mlp_hidden());
        Ok(match cfg.arch {
            Arch::Gpt2 => Mlp::Gelu {
                c_fc: Linear::new(c, i, cfg.bias, vb.pp("c_fc"))?,
                c_proj: Linear::new(i, c, cfg.bias, vb.pp("c_proj"))?,
            },
            Arch::Llama => Mlp::SwiGlu {
                gate_up: Stacked::new(vec![
                    Linear::new_out_in(c, i, cfg.bias, vb.pp("gate_proj"))?,
                    Linear::new_out_in(c, i, cfg.bias, vb.pp("up_proj"))?,
                ])?,
                down: Linear::new_out_in(i, c, cfg.bias, vb.pp("down_proj"))?,
            },
        })
    }

    /// [`Mlp::forward`] of `rows` plain rows, `x` (rows, C) → `y` (rows, C), for a decoding step.
    fn forward_rows(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        match self {
            Mlp::Gelu { c_fc, c_proj } => {
                let n = c_fc.weight.dim(1)?;
                let mut h = vec![0f32; rows * n]; // (rows, 4C)
                c_fc.product_rows(x, rows, &mut h)?;
                let b = c_fc.bias.as_ref().map(vector_f32).transpose()?;
                let mut g = vec![0f32; rows * n];
                layers::gelu_rows(&h, b.as_deref(), &mut g, n); // gelu(h + b)
                c_proj.forward_rows(&g, rows, y)
            }
            Mlp::SwiGlu { gate_up, down } => {
                let i = down.weight.dim(1)?;
                let mut h = vec![0f32; rows * 2 * i]; // (rows, [gate | up])
                gate_up.forward_rows(x, rows, &mut h)?;
                let mut g = vec![0f32; rows * i];
                swiglu_rows(&h, &mut g, i); // silu(gate) · up, (rows, I)
                down.forward_rows(&g, rows, y)
            }
        }
    }

    fn by_rows(&self) -> bool {
        match self {
            Mlp::Gelu { c_fc, c_proj } => c_fc.by_rows() && c_proj.by_rows(),
            Mlp::SwiGlu { gate_up, down } => gate_up.by_rows() && down.by_rows(),
        }
    }

    fn forward(&self, x: &Tensor, train: &mut Train) -> Result<Tensor> {
        let y = match self {
            Mlp::Gelu { c_fc, c_proj } => {
                let h = c_fc.forward_gelu(x, train)?; // (B, T, 4C)
                c_proj.forward(&h, train)? // (B, T, C)
            }
            Mlp::SwiGlu { gate_up, down } => {
                let h = swiglu(&gate_up.forward(x, train)?)?; // (B, T, 2I) -> (B, T, I)
                down.forward(&h, train)? // (B, T, C)
            }
        };
        Ok(maybe_dropout(y, train)?)
    }
}

/// A pre-norm transformer block: `x + attn(norm_1(x))`, then `x + mlp(norm_2(x))` (GPT-2's
/// `ln_1`/`ln_2`, Llama's `input_layernorm`/`post_attention_layernorm`).
#[derive(Debug, Clone)]
struct Block {
    ln_1: Norm,
    attn: CausalSelfAttention,
    ln_2: Norm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &GptConfig, rope: Option<Arc<RopeTable>>, vb: VarBuilder) -> Result<Self> {
        Ok(match cfg.arch {
            Arch::Gpt2 => Self {
                ln_1: Norm::new(cfg, vb.pp("ln_1"))?,
                attn: CausalSelfAttention::new(cfg, None, vb.pp("attn"))?,
                ln_2: Norm::new(cfg, vb.pp("ln_2"))?,
                mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            },
            Arch::Llama => Self {
                ln_1: Norm::new(cfg, vb.pp("input_layernorm"))?,
                attn: CausalSelfAttention::new(cfg, rope, vb.pp("self_attn"))?,
                ln_2: Norm::new(cfg, vb.pp("post_attention_layernorm"))?,
                mlp: Mlp::new(cfg, vb.pp("mlp"))?,
            },
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

/// Which family of decoder a [`GptConfig`] describes: its layers and its Hugging Face layout.
///
/// Each family bundles the choices its checkpoints make together, so a tinygpt model of
/// either family is a Hugging Face model of that family, tensor for tensor:
///
/// | | position | norm | MLP | attention | weights |
/// |---|---|---|---|---|---|
/// | [`Arch::Gpt2`] | learned (`wpe`) | LayerNorm | GELU (tanh), 4C | fused `c_attn`, MHA | `Conv1D` `(in, out)` |
/// | [`Arch::Llama`] | RoPE (`rope_theta`) | RMSNorm | SwiGLU, `intermediate_size` | q/k/v/o, GQA | `nn.Linear` `(out, in)` |
///
/// Llama's switches ([`GptConfig::n_kv_head`], [`GptConfig::head_dim`],
/// [`GptConfig::qkv_bias`], [`GptConfig::qk_norm`], [`GptConfig::tie_word_embeddings`]) cover
/// Llama 2/3, TinyLlama, SmolLM2, minimind (`LlamaForCausalLM`), Qwen2/2.5
/// (`Qwen2ForCausalLM`: q/k/v biases) and Qwen3 (`Qwen3ForCausalLM`: RMSNorm on queries and
/// keys, an explicit head size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// GPT-2 (Radford et al. 2019), as nanoGPT writes it. The default, so every checkpoint
    /// written before the field existed loads unchanged.
    #[default]
    Gpt2,
    /// Llama (Touvron et al. 2023) and its descendants: rotary position embeddings (Su et al.
    /// 2021), RMSNorm (Zhang & Sennrich 2019), a SwiGLU MLP (Shazeer 2020) and grouped-query
    /// attention (Ainslie et al. 2023), under Hugging Face `LlamaForCausalLM` names.
    Llama,
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
        })
    }
}

/// The shape of a GPT, with nanoGPT's field names (and Hugging Face's for the Llama-only
/// ones). Serialised as the checkpoint's `config.json`; every field after `bias` has a serde
/// default, so configs written before they existed still load (as GPT-2).
///
/// Build one from a preset and change what you need:
///
/// ```
/// use tinygpt::{Arch, GptConfig};
/// let cfg = GptConfig { n_layer: 2, ..GptConfig::llama_tiny(66) };
/// assert_eq!((cfg.arch, cfg.n_kv_heads(), cfg.head_size()), (Arch::Llama, 2, 32));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GptConfig {
    /// Number of token ids, including special tokens.
    pub vocab_size: usize,
    /// Context length: the most positions the model can see (GPT-2's learned position
    /// embeddings; the RoPE table's length for Llama).
    pub block_size: usize,
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Number of attention (query) heads; must divide `n_embd` unless `head_dim` is set.
    pub n_head: usize,
    /// Width of the residual stream (`C`).
    pub n_embd: usize,
    /// Dropout probability in training (embeddings, attention weights, residual branches).
    pub dropout: f32,
    /// Whether projections carry biases (GPT-2: true; its LayerNorms then have a shift
    /// too). For Llama this is HF's `attention_bias` and `mlp_bias` together.
    pub bias: bool,
    /// The family: layers and weight layout ([`Arch`]). Default GPT-2.
    #[serde(default)]
    pub arch: Arch,
    /// Key/value heads for grouped-query attention: `n_head` query heads share `n_kv_head`
    /// key/value heads (query head `h` reads kv head `h / (n_head / n_kv_head)`, Hugging
    /// Face's `repeat_kv`). `None` means `n_head` (multi-head attention). Llama only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_kv_head: Option<usize>,
    /// Size of one attention head; `None` means `n_embd / n_head`. Qwen3 sets it (e.g. 128
    /// with `n_embd` 1024 and 16 heads). Llama only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Width of the MLP's hidden layer; `None` means 4C for GPT-2 and
    /// [`GptConfig::swiglu_hidden`] for Llama.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
    /// RoPE base: the angle of pair `i` at position `p` is `p · rope_theta^(-2i / head_size)`
    /// (Llama 10000, Qwen2.5 1000000). Llama only.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Epsilon of every norm (GPT-2's `layer_norm_epsilon`, Llama's `rms_norm_eps`).
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// Whether the language-model head shares the token embedding's weights (GPT-2 always;
    /// Llama 2 and TinyLlama do not, SmolLM2 and small Qwens do).
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    /// Biases on the query, key and value projections only (Qwen2). Llama only.
    #[serde(default)]
    pub qkv_bias: bool,
    /// RMSNorm over each query and key head before RoPE (Qwen3's `q_norm`/`k_norm`). Llama
    /// only.
    #[serde(default)]
    pub qk_norm: bool,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_norm_eps() -> f64 {
    LAYER_NORM_EPS
}

fn default_true() -> bool {
    true
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
            ..Self::gpt2_extras()
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
            ..Self::gpt2_extras()
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
            ..Self::gpt2_extras()
        }
    }

    /// The fields after `bias` as a GPT-2 has them (what serde fills in for an old config).
    fn gpt2_extras() -> Self {
        Self {
            vocab_size: 0,
            block_size: 0,
            n_layer: 0,
            n_head: 0,
            n_embd: 0,
            dropout: 0.0,
            bias: false,
            arch: Arch::Gpt2,
            n_kv_head: None,
            head_dim: None,
            intermediate_size: None,
            rope_theta: default_rope_theta(),
            norm_eps: default_norm_eps(),
            tie_word_embeddings: true,
            qkv_bias: false,
            qk_norm: false,
        }
    }

    /// GPT-2 small, 124M parameters: [`GptConfig::gpt2`].
    pub fn gpt2_124m() -> Self {
        Self::gpt2()
    }

    /// A Llama of the given sizes, with Llama's defaults: multi-head attention, RoPE base
    /// 10000, RMSNorm eps 1e-5, SwiGLU of [`GptConfig::swiglu_hidden`], tied head, no biases,
    /// no dropout.
    pub fn llama(
        vocab_size: usize,
        block_size: usize,
        n_layer: usize,
        n_head: usize,
        n_embd: usize,
    ) -> Self {
        Self {
            vocab_size,
            block_size,
            n_layer,
            n_head,
            n_embd,
            arch: Arch::Llama,
            ..Self::gpt2_extras()
        }
    }

    /// The Llama-style twin of [`GptConfig::shakespeare_char_cpu`], the default of
    /// `pretrain --arch llama`: 4 layers, 128 wide, context 64, and grouped-query attention
    /// with 4 query and 2 key/value heads (32 each), whose saving is spent on a wider SwiGLU
    /// (384), so that every block holds 12C² weights like GPT-2's. Tied head, no biases; the
    /// two models differ in size only by GPT-2's position embeddings (`block_size · C`).
    pub fn llama_tiny(vocab_size: usize) -> Self {
        Self {
            n_kv_head: Some(2),
            intermediate_size: Some(384),
            ..Self::llama(vocab_size, 64, 4, 4, 128)
        }
    }

    /// HuggingFaceTB/SmolLM2-135M: 30 layers, 576 wide, 9 query and 3 key/value heads of 64,
    /// SwiGLU 1536, RoPE base 100000, context 8192, vocabulary 49152, tied head (134.5M
    /// parameters).
    pub fn smollm2_135m() -> Self {
        Self {
            n_kv_head: Some(3),
            intermediate_size: Some(1536),
            rope_theta: 100_000.0,
            ..Self::llama(49_152, 8192, 30, 9, 576)
        }
    }

    /// TinyLlama/TinyLlama-1.1B: 22 layers, 2048 wide, 32 query and 4 key/value heads, SwiGLU
    /// 5632, context 2048, vocabulary 32000, untied head.
    pub fn tinyllama_1_1b() -> Self {
        Self {
            n_kv_head: Some(4),
            intermediate_size: Some(5632),
            tie_word_embeddings: false,
            ..Self::llama(32_000, 2048, 22, 32, 2048)
        }
    }

    /// Qwen/Qwen2.5-0.5B: 24 layers, 896 wide, 14 query and 2 key/value heads of 64 with
    /// q/k/v biases, SwiGLU 4864, RoPE base 1e6, RMSNorm eps 1e-6, context 32768, vocabulary
    /// 151936, tied head.
    pub fn qwen2_5_0_5b() -> Self {
        Self {
            n_kv_head: Some(2),
            intermediate_size: Some(4864),
            rope_theta: 1_000_000.0,
            norm_eps: 1e-6,
            qkv_bias: true,
            ..Self::llama(151_936, 32_768, 24, 14, 896)
        }
    }

    /// Qwen/Qwen3-0.6B: 28 layers, 1024 wide, 16 query and 8 key/value heads of 128 (an
    /// explicit `head_dim`), RMSNorm on queries and keys, SwiGLU 3072, RoPE base 1e6, RMSNorm
    /// eps 1e-6, context 40960, vocabulary 151936, tied head.
    pub fn qwen3_0_6b() -> Self {
        Self {
            n_kv_head: Some(8),
            head_dim: Some(128),
            intermediate_size: Some(3072),
            rope_theta: 1_000_000.0,
            norm_eps: 1e-6,
            qk_norm: true,
            ..Self::llama(151_936, 40_960, 28, 16, 1024)
        }
    }

    /// Key/value heads: `n_kv_head`, or `n_head` when unset.
    pub fn n_kv_heads(&self) -> usize {
        self.n_kv_head.unwrap_or(self.n_head)
    }

    /// Size of one attention head (`hs`): `head_dim`, or `n_embd / n_head` when unset.
    pub fn head_size(&self) -> usize {
        match self.head_dim {
            Some(d) => d,
            None if self.n_head > 0 => self.n_embd / self.n_head,
            None => 0,
        }
    }

    /// Width of the MLP's hidden layer: `intermediate_size`, or 4C for GPT-2 and
    /// [`GptConfig::swiglu_hidden`] of C for Llama.
    pub fn mlp_hidden(&self) -> usize {
        match (self.intermediate_size, self.arch) {
            (Some(i), _) => i,
            (None, Arch::Gpt2) => self.n_embd.saturating_mul(4),
            (None, Arch::Llama) => Self::swiglu_hidden(self.n_embd),
        }
    }

    /// The SwiGLU width with as many weights as GPT-2's 4C MLP: three matrices of C × 8C/3
    /// instead of two of C × 4C, rounded up to a multiple of 32 (the rule of Llama's
    /// reference code, with `multiple_of` 32).
    pub fn swiglu_hidden(n_embd: usize) -> usize {
        (n_embd.saturating_mul(8) / 3)
            .div_ceil(32)
            .saturating_mul(32)
    }

    /// Checks the config describes a model we can build.
    ///
    /// # Errors
    /// [`Error::Config`] naming the field: a zero size, `n_embd` not divisible by `n_head`
    /// (without `head_dim`), `n_kv_head` not dividing `n_head`, an odd head size for RoPE, a
    /// `rope_theta` or `norm_eps` that is not a positive number, `dropout` outside `[0, 1)`,
    /// or a Llama-only setting on a GPT-2.
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
        for (name, v) in [
            ("n_kv_head", self.n_kv_head),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
        ] {
            if v == Some(0) {
                return Err(Error::Config(format!("{name} must be at least 1, got 0")));
            }
        }
        if self.head_dim.is_none() && !self.n_embd.is_multiple_of(self.n_head) {
            return Err(Error::Config(format!(
                "n_embd ({}) must be divisible by n_head ({})",
                self.n_embd, self.n_head
            )));
        }
        if !self.n_head.is_multiple_of(self.n_kv_heads()) {
            return Err(Error::Config(format!(
                "n_head ({}) must be a multiple of n_kv_head ({}): each key/value head serves \
                 the same number of query heads",
                self.n_head,
                self.n_kv_heads()
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Config(format!(
                "dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return Err(Error::Config(format!(
                "norm_eps must be a positive number, got {}",
                self.norm_eps
            )));
        }
        match self.arch {
            Arch::Gpt2 => {
                let llama_only = [
                    (
                        "n_kv_head",
                        self.n_kv_head.is_some_and(|k| k != self.n_head),
                    ),
                    (
                        "head_dim",
                        self.head_dim
                            .is_some_and(|d| d.checked_mul(self.n_head) != Some(self.n_embd)),
                    ),
                    (
                        "intermediate_size",
                        self.intermediate_size
                            .is_some_and(|i| Some(i) != self.n_embd.checked_mul(4)),
                    ),
                    ("tie_word_embeddings", !self.tie_word_embeddings),
                    ("qkv_bias", self.qkv_bias),
                    ("qk_norm", self.qk_norm),
                ];
                if let Some((name, _)) = llama_only.iter().find(|(_, set)| *set) {
                    return Err(Error::Config(format!(
                        "{name} is a Llama setting: a GPT-2 (arch \"gpt2\") has multi-head \
                         attention of n_embd / n_head, a 4C MLP and a tied head; set arch \
                         \"llama\" to use it"
                    )));
                }
            }
            Arch::Llama => {
                let width = |heads: usize| heads.checked_mul(self.head_size());
                if width(self.n_head).is_none() || width(self.n_kv_heads()).is_none() {
                    return Err(Error::Config(format!(
                        "n_head ({}) times the head size ({}) overflows",
                        self.n_head,
                        self.head_size()
                    )));
                }
                if !self.head_size().is_multiple_of(2) {
                    return Err(Error::Config(format!(
                        "the head size ({}) must be even: RoPE rotates pairs of channels",
                        self.head_size()
                    )));
                }
                if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
                    return Err(Error::Config(format!(
                        "rope_theta must be a number above 1, got {}",
                        self.rope_theta
                    )));
                }
            }
        }
        Ok(())
    }

    /// The name of the token embedding (`transformer.wte.weight` or
    /// `model.embed_tokens.weight`), which a tied head shares.
    pub fn embedding_name(&self) -> &'static str {
        match self.arch {
            Arch::Gpt2 => "transformer.wte.weight",
            Arch::Llama => "model.embed_tokens.weight",
        }
    }

    /// Every parameter's Hugging Face name and shape, in the order of HF's state dict. A tied
    /// head is not listed (`lm_head.weight` is the token embedding); an untied one is
    /// `lm_head.weight` `(V, C)`, last.
    ///
    /// GPT-2 projections are `Conv1D` `(in, out)`; Llama's are `nn.Linear` `(out, in)`.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        match self.arch {
            Arch::Gpt2 => self.gpt2_parameter_shapes(),
            Arch::Llama => self.llama_parameter_shapes(),
        }
    }

    fn gpt2_parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
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

    fn llama_parameter_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (c, hs, i) = (self.n_embd, self.head_size(), self.mlp_hidden());
        let (q, kv) = (self.n_head * hs, self.n_kv_heads() * hs);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, c],
        )];
        let lin = |out: &mut Vec<(String, Vec<usize>)>,
                   p: &str,
                   d_in: usize,
                   d_out: usize,
                   bias: bool| {
            out.push((format!("{p}.weight"), vec![d_out, d_in]));
            if bias {
                out.push((format!("{p}.bias"), vec![d_out]));
            }
        };
        let qkv_bias = self.bias || self.qkv_bias;
        for l in 0..self.n_layer {
            let p = format!("model.layers.{l}");
            lin(&mut out, &format!("{p}.self_attn.q_proj"), c, q, qkv_bias);
            lin(&mut out, &format!("{p}.self_attn.k_proj"), c, kv, qkv_bias);
            lin(&mut out, &format!("{p}.self_attn.v_proj"), c, kv, qkv_bias);
            lin(&mut out, &format!("{p}.self_attn.o_proj"), q, c, self.bias);
            if self.qk_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), vec![hs]));
                out.push((format!("{p}.self_attn.k_norm.weight"), vec![hs]));
            }
            lin(&mut out, &format!("{p}.mlp.gate_proj"), c, i, self.bias);
            lin(&mut out, &format!("{p}.mlp.up_proj"), c, i, self.bias);
            lin(&mut out, &format!("{p}.mlp.down_proj"), i, c, self.bias);
            out.push((format!("{p}.input_layernorm.weight"), vec![c]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![c]));
        }
        out.push(("model.norm.weight".to_string(), vec![c]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, c]));
        }
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

    /// Model FLOPs of training on one token, forward and backward, as nanoGPT's
    /// `estimate_mfu` counts them after the PaLM paper (Chowdhery et al. 2022, appendix B):
    /// `6·N + 12·L·C·T` with `N` the parameters but the position embedding (which is looked
    /// up, not multiplied) and `T = block_size`; the second term is attention's `q kᵀ` and
    /// `P v`, counted as if not causal.
    pub fn train_flops_per_token(&self) -> f64 {
        let wpe = match self.arch {
            Arch::Gpt2 => self.block_size * self.n_embd,
            Arch::Llama => 0,
        };
        let n = self.num_parameters().saturating_sub(wpe) as f64;
        let attn = 12.0 * self.n_layer as f64 * (self.n_head * self.head_size()) as f64;
        6.0 * n + attn * self.block_size as f64
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

/// A projection of the model as [`Gpt::linear_slots`] lists it: its HF module name (e.g.
/// `model.layers.0.self_attn.q_proj`), its sizes, and its LoRA adapter.
pub(crate) struct LinearSlot<'a> {
    pub(crate) name: String,
    pub(crate) d_in: usize,
    pub(crate) d_out: usize,
    pub(crate) lora: &'a mut Option<LoraAdapter>,
}

/// Keys and values of every layer for incremental decoding: feeding one new token attends to
/// all cached positions instead of recomputing them. Each layer's buffers are allocated on
/// first use for the positions then needed, rounded up to a power of two (at least 64, at
/// most `block_size`), reallocated the same way when a step needs more, and written in
/// place; the attention reads the filled prefix where it lies. Not `Clone`: two caches must never share buffers.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(crate) layers: Vec<Option<LayerKv>>,
    len: usize,
}

/// One layer's cache: k and v, each (B, nkv, capacity, hs), the first `len` positions valid;
/// the capacity grows to powers of two, up to `block_size` ([`reserve_kv`]).
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

/// Where [`Gpt::decode_by_rows`] keeps the keys and values of a step's rows: a batch's
/// [`KvCache`] (the same position in every row) or the decode slots' plain buffers. `dims`
/// is `(nh, nkv, hs, block_size)` throughout.
pub(crate) trait StepKv: Send {
    /// Keeps row `r`'s new key and value of layer `l` (`nkv · hs` floats each) at `pos`.
    fn store(
        &mut self,
        l: usize,
        r: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
        dims: Dims4,
    ) -> Result<()>;
    /// The attention output of layer `l`, (R, nh·hs), for the queries `q` (R, nh·hs): row `r`
    /// sees its positions `0..=pos[r]`.
    fn attend(
        &mut self,
        l: usize,
        q: &[f32],
        pos: &[usize],
        dims: Dims4,
        scale: f32,
    ) -> Result<Vec<f32>>;
}

/// `(nh, nkv, hs, block_size)`.
type Dims4 = (usize, usize, usize, usize);

/// Writes one position's key or value heads `new` (`nkv · hs`) into a row's buffer laid out
/// `(nkv, capacity, hs)`.
fn put_heads(buf: &mut [f32], new: &[f32], pos: usize, (_, nkv, hs, cap): Dims4) -> Result<()> {
    if pos >= cap || buf.len() < nkv * cap * hs || new.len() != nkv * hs {
        return Err(Error::InvalidArgument(format!(
            "decoding: position {pos} of {nkv} heads × {hs} does not fit a cache of {cap} positions ({} floats)",
            buf.len()
        )));
    }
    for (h, head) in new.chunks_exact(hs).enumerate() {
        let at = (h * cap + pos) * hs;
        buf[at..at + hs].copy_from_slice(head);
    }
    Ok(())
}

/// The fewest positions a layer's cache holds: a short exchange never reallocates, and 64
/// positions of GPT-2 124M's keys are 196 KB, where the whole context's (1024) were 3 MB a
/// tensor, zero-filled for every new conversation.
const KV_MIN_CAPACITY: usize = 64;

/// A layer's cache tensors `(B, nkv, capacity, hs)` with room for `needed` positions, the
/// first `past` of them kept: the slot's own if they are the right shape and large enough,
/// else new ones (the `past` cached positions copied into them) whose capacity is `needed`
/// rounded up to a power of two, at least [`KV_MIN_CAPACITY`] (or `block_size` if smaller), at
/// most `block_size` (never below `needed`).
///
/// # Errors
/// [`Error::InvalidArgument`] when the slot holds cached positions (`past > 0`) of another
/// batch size, head count, head size or dtype.
fn reserve_kv<'s>(
    slot: &'s mut Option<LayerKv>,
    (b, nkv, hs, block_size): (usize, usize, usize, usize),
    past: usize,
    needed: usize,
    dtype: DType,
    device: &candle_core::Device,
) -> Result<&'s LayerKv> {
    let same = |kv: &LayerKv| {
        let d = kv.k.dims();
        d.len() == 4 && (d[0], d[1], d[3]) == (b, nkv, hs) && kv.k.dtype() == dtype
    };
    let cap = |kv: &LayerKv| kv.k.dims().get(2).copied().unwrap_or(0);
    match slot {
        Some(kv) if same(kv) && cap(kv) >= needed => {}
        Some(kv) if past > 0 && !same(kv) => {
            return Err(Error::InvalidArgument(format!(
                "the KV cache holds keys of shape {:?} {:?}, this batch needs ({b}, {nkv}, _, {hs}) {dtype:?}: reset the cache between batches of another size",
                kv.k.dims(),
                kv.k.dtype(),
            )))
        }
        _ => {
            let capacity = needed
                .next_power_of_two()
                .clamp(KV_MIN_CAPACITY.min(block_size), block_size)
                .max(needed);
            let zeros = || Tensor::zeros((b, nkv, capacity, hs), dtype, device);
            let grown = LayerKv { k: zeros()?, v: zeros()? };
            if let Some(old) = slot.as_ref().filter(|_| past > 0) {
                // Only more positions: the cached ones move over.
                grown.k.slice_set(&old.k.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
                grown.v.slice_set(&old.v.narrow(2, 0, past)?.contiguous()?, 2, 0)?;
            }
            return Ok(slot.insert(grown));
        }
    }
    slot.as_ref()
        .ok_or_else(|| Error::InvalidArgument("decoding: a layer cache went missing".into()))
}

/// The decode slots' buffers, one slot per row, per layer `(nkv, block_size, hs)`.
struct SlotRows<'a, 'b>(&'a mut [&'b mut crate::decode::SlotKv]);

impl StepKv for SlotRows<'_, '_> {
    fn store(
        &mut self,
        l: usize,
        r: usize,
        pos: usize,
        k: &[f32],
        v: &[f32],
        dims: Dims4,
    ) -> Result<()> {
        let missing =
            || Error::InvalidArgument(format!("decoding: no layer-{l} buffers for row {r}"));
        let slot = self.0.get_mut(r).ok_or_else(missing)?;
        put_heads(slot.k.get_mut(l).ok_or_else(missing)?, k, pos, dims)?;
        put_heads(slot.v.get_mut(l).ok_or_else(missing)?, v, pos, dims)
    }

    fn attend(
        &mut self,
        l: usize,
        q: &[f32],
        pos: &[usize],
        dims: Dims4,
        scale: f32,
    ) -> Result<Vec<f32>> {
        let caches = self
            .0
            .iter()
            .zip(pos)
            .map(|(s, &p)| match (s.k.get(l), s.v.get(l)) {
                (Some(k), Some(v)) => Ok(RowCache { k, v, len: p + 1 }),
                _ => Err(Error::InvalidArgument(format!(
                    "decoding: no layer-{l} buffers"
                ))),
            })
            .collect::<Result<Vec<_>>>()?;
        attention::decode_rows(q, &caches, dims, scale)
    }
}

/// A [`KvCache`] taking a step of B sequences × T positions `past..past + T` (B rows at one
/// position, or a prompt of T tokens of one sequence): the rows' keys and values gathered
/// `(B, T, nkv·hs)`, written into the layer's `(B, nkv, capacity, hs)` tensors in place, and
/// each row's query reading its sequence's positions up to its own (causal within a prompt).
struct CacheRows<'a> {
    cache: &'a mut KvCache,
    b: usize,
    t: usize,
    k: Vec<f32>, // (B, T, nkv·hs)
    v: Vec<f32>,
}

impl<'a> CacheRows<'a> {
    fn new(cache: &'a mut KvCache, b: usize, t: usize) -> Self {
        Self {
            cache,
            b,
            t,
            k: Vec::new(),
            v: Vec::new(),
        }
    }
}

impl StepKv for CacheRows<'_> {
    fn store(
        &mut self,
        _: usize,
        r: usize,
        _: usize,
        k: &[f32],
        v: &[f32],
        _: Dims4,
    ) -> Result<()> {
        if r == 0 {
            self.k.clear();
            self.v.clear();
        }
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
        Ok(())
    }

    fn attend(
        &mut self,
        l: usize,
        q: &[f32],
        pos: &[usize],
        dims: Dims4,
        scale: f32,
    ) -> Result<Vec<f32>> {
        let (nh, nkv, hs, block_size) = dims;
        let (b, t, past) = (self.b, self.t, pos.first().copied().unwrap_or(0));
        let device = candle_core::Device::Cpu;
        let slot = self.cache.layers.get_mut(l).ok_or_else(|| {
            Error::InvalidArgument(format!("decoding: the cache has no layer {l}"))
        })?;
        let kv = reserve_kv(
            slot,
            (b, nkv, hs, block_size),
            past,
            past + t,
            DType::F32,
            &device,
        )?;
        // (B, T, nkv, hs) → (B, nkv, T, hs), written in place at `past..past + T`.
        let new = |x: &[f32]| -> Result<Tensor> {
            let x = Tensor::from_slice(x, (b, t, nkv, hs), &device)?;
            Ok(if t == 1 {
                x.reshape((b, nkv, 1, hs))?
            } else {
                x.transpose(1, 2)?.contiguous()?
            })
        };
        kv.k.slice_set(&new(&self.k)?, 2, past)?;
        kv.v.slice_set(&new(&self.v)?, 2, past)?;
        let cap = kv.k.dim(2)?; // the buffers' positions, `block_size` at most
        let dims = (nh, nkv, hs, cap);
        let row = nkv * cap * hs;
        layers::with_slices(&[&kv.k, &kv.v], |s| {
            // Row r: sequence r / T at position pos[r], seeing its positions up to its own.
            let caches: Vec<RowCache> = pos
                .iter()
                .enumerate()
                .map(|(r, &p)| {
                    let i = r / t.max(1);
                    RowCache {
                        k: &s[0][i * row..(i + 1) * row],
                        v: &s[1][i * row..(i + 1) * row],
                        len: p + 1,
                    }
                })
                .collect();
            attention::decode_rows(q, &caches, dims, scale)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        })
        .map_err(Error::from)
    }
}

/// The decoder: token embeddings (+ GPT-2's learned position embeddings) → `n_layer` blocks →
/// final norm → `lm_head` (tied to the token embedding, or Llama's own `lm_head.weight`).
/// [`GptConfig::arch`] chooses GPT-2's or Llama's layers; everything else — the stages, the
/// sampler, the server — sees one model.
#[derive(Debug, Clone)]
pub struct Gpt {
    cfg: GptConfig,
    wte: Tensor,         // (V, C), also the head when tied
    wpe: Option<Tensor>, // (block_size, C), GPT-2 only
    h: Vec<Block>,
    ln_f: Norm,
    lm_head: Option<Tensor>, // (V, C), an untied head
    /// Every parameter by HF name, in [`GptConfig::parameter_shapes`] order.
    params: Vec<(String, Tensor)>,
    /// A LoRA model's adapter ([`Gpt::with_lora`]); its tensors are also in the layers.
    lora: Option<LoraState>,
    /// A Q8_0 model's 8-bit matrices by HF name ([`Gpt::quantize`], [`Gpt::from_gguf`]): the
    /// projections' (also in their [`Linear`]s) and the token embedding's, the tied head.
    /// Their entries in `params` are zero-stride placeholders; [`Gpt::tensors`] widens these.
    q8: HashMap<String, Arc<Q8Matrix>>,
}

impl Gpt {
    /// Builds the model from the tensors `vb` provides (a `VarMap` for training, safetensors
    /// for inference), under Hugging Face names ([`GptConfig::parameter_shapes`]). First the
    /// weights, in `vb`'s dtype, with a KV cache and a forward pass of one sequence, are
    /// checked to fit in memory ([`crate::memory`]): a `VarBuilder` allocates what it is
    /// asked for.
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
        let (v, c) = (cfg.vocab_size, cfg.n_embd);
        let mut model = match cfg.arch {
            Arch::Gpt2 => {
                let t = vb.pp("transformer");
                Self {
                    cfg: cfg.clone(),
                    wte: get(&t, &[v, c], "wte.weight")?,
                    wpe: Some(get(&t, &[cfg.block_size, c], "wpe.weight")?),
                    h: (0..cfg.n_layer)
                        .map(|i| Block::new(cfg, None, t.pp(format!("h.{i}"))))
                        .collect::<Result<_>>()?,
                    ln_f: Norm::new(cfg, t.pp("ln_f"))?,
                    lm_head: None,
                    params,
                    lora: None,
                    q8: HashMap::new(),
                }
            }
            Arch::Llama => {
                let m = vb.pp("model");
                let rope = Arc::new(RopeTable::new(
                    cfg.head_size(),
                    cfg.block_size,
                    cfg.rope_theta,
                )?);
                Self {
                    cfg: cfg.clone(),
                    wte: get(&m, &[v, c], "embed_tokens.weight")?,
                    wpe: None,
                    h: (0..cfg.n_layer)
                        .map(|i| Block::new(cfg, Some(rope.clone()), m.pp(format!("layers.{i}"))))
                        .collect::<Result<_>>()?,
                    ln_f: Norm::new(cfg, m.pp("norm"))?,
                    lm_head: if cfg.tie_word_embeddings {
                        None
                    } else {
                        Some(get(&vb, &[v, c], "lm_head.weight")?)
                    },
                    params,
                    lora: None,
                    q8: HashMap::new(),
                }
            }
        };
        if cfg.arch == Arch::Llama {
            // The stacked projections of a constant model hold the weights: name their views.
            model.params = model.llama_parameters();
        }
        Ok(model)
    }

    /// A Llama's parameters in [`GptConfig::parameter_shapes`] order, read off its layers.
    fn llama_parameters(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.wte.clone())];
        let lin = |out: &mut Vec<(String, Tensor)>, name: String, l: &Linear| {
            if let Some(b) = &l.bias {
                out.push((format!("{name}.weight"), l.weight.clone()));
                out.push((format!("{name}.bias"), b.clone()));
            } else {
                out.push((format!("{name}.weight"), l.weight.clone()));
            }
        };
        let norm_weight = |n: &Norm| match n {
            Norm::Layer(n) => n.weight.clone(),
            Norm::Rms(n) => n.weight.clone(),
        };
        for (i, block) in self.h.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let a = &block.attn;
            if let Qkv::Split(s) = &a.qkv {
                for (part, name) in s.parts.iter().zip(["q_proj", "k_proj", "v_proj"]) {
                    lin(&mut out, format!("{p}.self_attn.{name}"), part);
                }
            }
            lin(&mut out, format!("{p}.self_attn.o_proj"), &a.c_proj);
            if let Some((q, k)) = &a.qk_norm {
                out.push((format!("{p}.self_attn.q_norm.weight"), q.weight.clone()));
                out.push((format!("{p}.self_attn.k_norm.weight"), k.weight.clone()));
            }
            if let Mlp::SwiGlu { gate_up, down } = &block.mlp {
                for (part, name) in gate_up.parts.iter().zip(["gate_proj", "up_proj"]) {
                    lin(&mut out, format!("{p}.mlp.{name}"), part);
                }
                lin(&mut out, format!("{p}.mlp.down_proj"), down);
            }
            out.push((
                format!("{p}.input_layernorm.weight"),
                norm_weight(&block.ln_1),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                norm_weight(&block.ln_2),
            ));
        }
        out.push(("model.norm.weight".to_string(), norm_weight(&self.ln_f)));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".to_string(), head.clone()));
        }
        out
    }

    /// A freshly initialised, trainable model (every parameter a candle `Var`), as nanoGPT
    /// initialises it: weights N(0, 0.02), the residual projections (`c_proj`; a Llama's
    /// `o_proj` and `down_proj` alike) N(0, 0.02 / sqrt(2 · n_layer)) (GPT-2 paper, §2.3),
    /// biases 0, norm weights 1. Random numbers
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
                let residual = ["c_proj.weight", "o_proj.weight", "down_proj.weight"];
                let std = if residual.iter().any(|r| name.ends_with(r)) {
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
                    name: cfg.embedding_name().into(),
                    path: None,
                })
            }
        };
        check_tensors(cfg, &tensors, None)?;
        let dtype = tensors
            .get(cfg.embedding_name())
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

    /// The trainable parameters as candle `Var`s sharing storage with the model. A LoRA model's
    /// are its adapter's alone ([`Gpt::with_lora`]): each targeted projection's `lora_A` and
    /// `lora_B` under PEFT's names (`base_model.model.<module>.lora_A.weight`), layer by layer;
    /// its base weights are constants.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the model was built from constant weights (load it with
    /// `trainable = true`).
    pub fn vars(&self) -> Result<Vec<(String, Var)>> {
        if let Some(lora) = &self.lora {
            return lora.vars();
        }
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
    /// the logits of the **last** position only, (B, vocab_size). The cache grows by T. On the
    /// CPU with f16, f32 or Q8_0 weights a step of one position per row, and a prompt of one
    /// sequence of up to 64 tokens, run on plain rows ([`crate::kernels::decode_step`]): the
    /// prompt's tokens as the rows of one step, each attending to the positions up to its
    /// own, the head applied to the last row only.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the cache would exceed `block_size` (positions past the
    /// context have no embedding: crop and start a new cache, as [`crate::sampler`] does).
    pub fn forward_with_cache(&self, input_ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if cache.layers.len() != self.cfg.n_layer {
            *cache = KvCache::new(self.cfg.n_layer);
        }
        if let (Ok((b, 1)), true) = (input_ids.dims2(), self.decodes_by_rows()) {
            // One new position per row: a decoding step on plain rows.
            let past = cache.len();
            if past < self.cfg.block_size {
                let tokens = input_ids
                    .to_dtype(DType::U32)?
                    .flatten_all()?
                    .to_vec1::<u32>()?;
                let logits = self.decode_by_rows(
                    &tokens,
                    &vec![past; b],
                    &mut CacheRows::new(cache, b, 1),
                    false,
                )?;
                cache.len = past + 1;
                return Ok(logits); // (B, V)
            }
        }
        if let (Ok((1, t)), true) = (input_ids.dims2(), self.decodes_by_rows()) {
            // A short prompt of one sequence: its tokens as the rows of one step, each
            // attending to the positions up to its own; the head for the last row only.
            let past = cache.len();
            if (2..=crate::gemv::MAX_ROWS).contains(&t) && past + t <= self.cfg.block_size {
                let tokens = input_ids
                    .to_dtype(DType::U32)?
                    .flatten_all()?
                    .to_vec1::<u32>()?;
                let pos: Vec<usize> = (past..past + t).collect();
                let mut rows = CacheRows::new(cache, 1, t);
                let logits = self.decode_by_rows(&tokens, &pos, &mut rows, true)?;
                cache.len = past + t;
                return Ok(logits); // (1, V)
            }
        }
        // A prompt through the cache: f32 weights stream too (inference only, so no trained
        // model's numbers are compared with these bit for bit).
        crate::gemv::streaming_f32(|| {
            let x = self.hidden_states(input_ids, Some(cache), None)?; // (B, T, C)
            let t = x.dim(1)?;
            let last = x.narrow(1, t - 1, 1)?; // (B, 1, C)
            Ok(self.lm_head(&last)?.squeeze(1)?) // (B, V)
        })
    }

    /// One decoding step of R sequences whose caches are plain buffers (the CPU path of
    /// [`crate::decode`]): token `tokens[r]` at position `pos[r]`, its keys and values written
    /// into `kv[r]` (per layer `(nkv, block_size, hs)`) at that position, its query attending
    /// to that row's positions `0..=pos[r]` only. Returns the logits (R, V). The caller checks
    /// ids and positions; activations must be f32 (the CPU computes in f32 for every dtype).
    pub(crate) fn decode_rows(
        &self,
        tokens: &[u32],
        pos: &[usize],
        kv: &mut [&mut crate::decode::SlotKv],
    ) -> Result<Tensor> {
        let mut slots = SlotRows(kv);
        if self.decodes_by_rows() {
            return self.decode_by_rows(tokens, pos, &mut slots, false);
        }
        let cfg = &self.cfg;
        let (r, c) = (tokens.len(), cfg.n_embd);
        let (nh, nkv, hs, cap) = (
            cfg.n_head,
            cfg.n_kv_heads(),
            cfg.head_size(),
            cfg.block_size,
        );
        let (qw, kvw) = (nh * hs, nkv * hs); // floats of the queries, of the keys
        let device = self.wte.device();
        let mut x = self.embed_rows(tokens, pos)?.reshape((r, 1, c))?; // (R, 1, C)
        let scale = 1.0 / (hs as f32).sqrt();
        let dims = (nh, nkv, hs, cap);
        for (l, block) in self.h.iter().enumerate() {
            let attn = &block.attn;
            let qkv = attn.project(&block.ln_1.forward(&x)?, &mut None)?; // (R, 1, qw + 2kvw)
            let mut qkv = qkv.flatten_all()?.to_vec1::<f32>()?; // R rows of [q | k | v]
            let mut q = vec![0f32; r * qw]; // (R, nh·hs)
            for (i, row) in qkv.chunks_exact_mut(qw + 2 * kvw).enumerate() {
                if let Some(rope) = &attn.rope {
                    rope_rows(&mut row[..qw], nh, hs, pos[i], rope)?; // queries
                    rope_rows(&mut row[qw..qw + kvw], nkv, hs, pos[i], rope)?; // keys
                }
                q[i * qw..(i + 1) * qw].copy_from_slice(&row[..qw]);
                slots.store(l, i, pos[i], &row[qw..qw + kvw], &row[qw + kvw..], dims)?;
            }
            let y = slots.attend(l, &q, pos, dims, scale)?; // (R, nh·hs)
            let y = Tensor::from_vec(y, (r, 1, qw), device)?;
            x = (x + attn.c_proj.forward(&y, &mut None)?)?; // (R, 1, C)
            x = (&x + block.mlp.forward(&block.ln_2.forward(&x)?, &mut None)?)?;
        }
        let x = self.ln_f.forward(&x)?; // (R, 1, C)
        Ok(self.lm_head(&x)?.squeeze(1)?) // (R, V)
    }

    /// The input of a decoding step's rows: token `tokens[r]`'s embedding (+ GPT-2's position
    /// `pos[r]`), (R, C) f32.
    fn embed_rows(&self, tokens: &[u32], pos: &[usize]) -> Result<Tensor> {
        let (r, device) = (tokens.len(), self.wte.device());
        let ids = Tensor::from_slice(tokens, r, device)?; // (R,)
        let mut x = self.embed_tokens(&ids)?.to_dtype(DType::F32)?; // (R, C)
        if let Some(wpe) = &self.wpe {
            let positions: Vec<u32> = pos.iter().map(|&p| p as u32).collect();
            let positions = Tensor::from_vec(positions, r, device)?; // (R,)
            x = (x + wpe.embedding(&positions)?.to_dtype(DType::F32)?)?; // (R, C)
        }
        Ok(x)
    }

    /// Whether a decoding step can run on plain rows ([`Gpt::decode_by_rows`]): CPU, every
    /// projection and the head an f16 or f32 weight the streaming products take, no LoRA adapter.
    pub(crate) fn decodes_by_rows(&self) -> bool {
        let head = self.lm_head.as_ref().unwrap_or(&self.wte);
        self.wte.device().is_cpu()
            && self.lora.is_none()
            && (streamable(head) || self.head_q8().is_some())
            && self
                .h
                .iter()
                .all(|b| b.attn.qkv.by_rows() && b.attn.c_proj.by_rows() && b.mlp.by_rows())
    }

    /// One decoding step of R rows on plain f32 buffers, f16 or f32 weights streamed
    /// ([`crate::kernels::decode_step`]): token `tokens[r]` at position `pos[r]`, its key and
    /// value stored through `kv`, its query attending to its row's positions `0..=pos[r]`.
    /// The same layers as [`Gpt::hidden_states`], in the same order and with the same row
    /// kernels, without a tensor per op. Returns the logits (R, V), or with `last_only` those
    /// of the last row (1, V) (a prompt, whose other rows' predictions nobody reads).
    fn decode_by_rows(
        &self,
        tokens: &[u32],
        pos: &[usize],
        kv: &mut impl StepKv,
        last_only: bool,
    ) -> Result<Tensor> {
        if rayon::current_thread_index().is_none() {
            // Run the step on one of rayon's threads: each product then splits from there,
            // its other half taken by a thread still awake from the last one, where a call
            // from outside the pool would wake a sleeping thread ~150 times a token.
            return rayon::scope(|_| self.decode_by_rows(tokens, pos, kv, last_only));
        }
        let cfg = &self.cfg;
        let (r, c, v) = (tokens.len(), cfg.n_embd, cfg.vocab_size);
        let (nh, nkv, hs) = (cfg.n_head, cfg.n_kv_heads(), cfg.head_size());
        let (qw, kvw) = (nh * hs, nkv * hs); // floats of the queries, of the keys
        let device = self.wte.device();
        let mut x = self
            .embed_rows(tokens, pos)?
            .flatten_all()?
            .to_vec1::<f32>()?; // (R, C), the residual stream
        let mut h = vec![0f32; r * c]; // (R, C), normed
        let mut y = vec![0f32; r * c]; // (R, C), a sub-layer's output
        let mut qkv = vec![0f32; r * (qw + 2 * kvw)]; // R rows of [q | k | v]
        let mut q = vec![0f32; r * qw]; // (R, nh·hs)
        let scale = 1.0 / (hs as f32).sqrt();
        let dims = (nh, nkv, hs, cfg.block_size);
        for (l, block) in self.h.iter().enumerate() {
            let attn = &block.attn;
            block.ln_1.forward_rows(&x, &mut h)?;
            attn.qkv.forward_rows(&h, r, &mut qkv)?; // (R, qw + 2kvw)
            for (i, row) in qkv.chunks_exact_mut(qw + 2 * kvw).enumerate() {
                if let Some((q_norm, k_norm)) = &attn.qk_norm {
                    // Qwen3: each query and key head normed over hs, before the rotation.
                    let (qs, ks) = row[..qw + kvw].split_at_mut(qw);
                    let (q0, k0) = (qs.to_vec(), ks.to_vec());
                    q_norm.forward_rows(&q0, qs)?;
                    k_norm.forward_rows(&k0, ks)?;
                }
                if let Some(rope) = &attn.rope {
                    rope_rows(&mut row[..qw], nh, hs, pos[i], rope)?; // queries
                    rope_rows(&mut row[qw..qw + kvw], nkv, hs, pos[i], rope)?; // keys
                }
                q[i * qw..(i + 1) * qw].copy_from_slice(&row[..qw]);
                kv.store(l, i, pos[i], &row[qw..qw + kvw], &row[qw + kvw..], dims)?;
            }
            let att = kv.attend(l, &q, pos, dims, scale)?; // (R, nh·hs)
            attn.c_proj.forward_rows(&att, r, &mut y)?; // (R, C)
            add_assign(&mut x, &y);
            block.ln_2.forward_rows(&x, &mut h)?;
            block.mlp.forward_rows(&h, r, &mut y)?; // (R, C)
            add_assign(&mut x, &y);
        }
        let (r, x) = if last_only && r > 0 {
            (1, &x[(r - 1) * c..]) // the last row's residual stream
        } else {
            (r, &x[..])
        };
        let h = &mut h[..r * c];
        self.ln_f.forward_rows(x, h)?;
        let head = self.lm_head.as_ref().unwrap_or(&self.wte); // (V, C)
        let mut logits = vec![0f32; r * v];
        match self.head_q8() {
            Some(q) => q.linear_into(h, r, &mut logits)?,
            None => crate::gemv::linear_into(h, r, &head.t()?, &mut logits)?, // (R, V)
        }
        Ok(Tensor::from_vec(logits, (r, v), device)?)
    }

    /// The final hidden states after the final norm: (B, T) u32 → (B, T, C). The reward model
    /// and the PPO value head read these.
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
                                                                  // Half-precision weights on the CPU: the activations are f32 (see `to_dtype`).
        let widen = |x: Tensor| -> Result<Tensor> {
            Ok(
                if x.device().is_cpu() && matches!(x.dtype(), DType::F16 | DType::BF16) {
                    x.to_dtype(DType::F32)?
                } else {
                    x
                },
            )
        };
        let mut x = widen(self.embed_tokens(&ids)?)?; // (B*T, C)
        if let Some(wpe) = &self.wpe {
            // Positions gathered per token rather than broadcast over the batch: the backward
            // of a gather is one scatter-add, where a broadcast's would reduce over B element
            // by element.
            let positions: Vec<u32> = (0..b)
                .flat_map(|_| (past..past + t).map(|p| p as u32))
                .collect();
            let positions = Tensor::from_vec(positions, b * t, wpe.device())?;
            x = (x + widen(wpe.embedding(&positions)?)?)?; // (B*T, C)
        }
        let x = x.reshape((b, t, c))?; // (B, T, C)
        let mut x = maybe_dropout(x, &mut train)?;
        match cache {
            Some(cache) => {
                let block_size = self.cfg.block_size;
                for (block, slot) in self.h.iter().zip(cache.layers.iter_mut()) {
                    x = block.forward(&x, Some((slot, past, block_size)), &mut train)?;
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

    /// The language-model head, tied to the token embedding or untied: (B, T, C) → (B, T, V).
    pub(crate) fn lm_head(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        if let Some(q) = self.head_q8() {
            let rows = b * t;
            let head = Linear {
                weight: self.wte.t()?,
                bias: None,
                out_in: false,
                lora: None,
                q8: Some(q.clone()),
            };
            let logits = match head.q8_product(&x.reshape((rows, c))?)? {
                Some(l) => l,
                None => x
                    .reshape((rows, c))?
                    .matmul(&q8_tensor(q, x.device())?.t()?)?,
            }; // (B*T, V)
            return Ok(logits.reshape((b, t, self.cfg.vocab_size))?);
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.wte); // (V, C)
        let logits = crate::gemv::matmul(&x.reshape((b * t, c))?, &head.t()?)?; // (B*T, V)
        Ok(logits.reshape((b, t, self.cfg.vocab_size))?)
    }

    /// The weights as a name → tensor map (for saving). A Q8_0 model's 8-bit matrices come
    /// widened to f32 (`d · q`, exactly).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|(name, t)| {
                let t = match self.q8.get(name) {
                    Some(q) => self.q8_param(name, q).unwrap_or_else(|_| t.clone()),
                    None => t.clone(),
                };
                (name.clone(), t)
            })
            .collect()
    }

    /// The weights as [`Gpt::tensors`] does, every one in f32 (f16 ones widened).
    ///
    /// # Errors
    /// candle errors on conversion.
    pub fn tensors_f32(&self) -> Result<HashMap<String, Tensor>> {
        self.tensors()
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)))
            .collect()
    }

    /// Whether the model's matrices are Q8_0 ([`Gpt::quantize`], [`Gpt::from_gguf`]).
    pub fn is_quantized(&self) -> bool {
        !self.q8.is_empty()
    }

    /// A copy of the model with its matrices (the projections and the tied token embedding)
    /// in ggml's Q8_0 (blocks of 32 weights along each row of `(out, in)`: an f16 scale
    /// `d = max|w| / 127` and 32 `i8`s, weight = `d · q`; ggml's `quantize_row_q8_0_ref`, so
    /// the same bits as llama.cpp's converter), for decoding at a quarter of f32's weight
    /// bytes per token (8.5 bits a weight). Decoding multiplies f32 activations with the 8-bit
    /// weights directly ([`crate::kernels::q8`]); the vectors (norms, biases) and the position
    /// embedding stay f32. CPU only; constant weights (inference).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a Llama-style model, a LoRA model, a model not on the
    /// CPU, or rows (`n_embd`, the MLP width) that are not multiples of 32.
    pub fn quantize(&self) -> Result<Gpt> {
        self.refuse_lora("quantize")?;
        if self.cfg.arch != Arch::Gpt2 || !self.device().is_cpu() {
            return Err(Error::InvalidArgument(format!(
                "Q8_0 models are GPT-2s on the CPU; this is a {} on {:?}",
                self.cfg.arch,
                self.device()
            )));
        }
        let mut dense = self.tensors_f32()?;
        let mut q8 = HashMap::new();
        for name in self.q8_names() {
            let Some(t) = dense.remove(&name) else {
                continue;
            };
            // tinygpt's GPT-2 matrices are (in, out) but the embedding (V, C): Q8_0 rows are
            // along `in`, as ggml's.
            let t = if name == self.cfg.embedding_name() {
                t
            } else {
                t.t()?.contiguous()?
            };
            let (rows, cols) = t.dims2()?;
            let m = Q8Matrix::quantize(&t.flatten_all()?.to_vec1::<f32>()?, rows, cols)?;
            q8.insert(name, m);
        }
        Gpt::from_q8_parts(&self.cfg, dense, q8, self.device())
    }

    /// The HF names of the matrices a Q8_0 GPT-2 holds in 8 bits.
    fn q8_names(&self) -> Vec<String> {
        let mut out = vec![self.cfg.embedding_name().to_string()];
        for i in 0..self.cfg.n_layer {
            for p in ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"] {
                out.push(format!("transformer.h.{i}.{p}.weight"));
            }
        }
        out
    }

    /// A GPT-2 from its dense tensors (`dense`: vectors, the position embedding, any matrix
    /// not in `q8`) and its Q8_0 matrices (`q8`, HF names, each `(out, in)`; the token
    /// embedding `(V, C)`). Off the CPU the matrices are widened to f16 tensors instead.
    pub(crate) fn from_q8_parts(
        cfg: &GptConfig,
        mut dense: HashMap<String, Tensor>,
        q8: HashMap<String, Q8Matrix>,
        device: &Device,
    ) -> Result<Gpt> {
        if cfg.arch != Arch::Gpt2 {
            return Err(Error::InvalidArgument(format!(
                "Q8_0 weights are read for GPT-2s only, not a {}",
                cfg.arch
            )));
        }
        let shapes: HashMap<String, Vec<usize>> = cfg.parameter_shapes().into_iter().collect();
        let placeholder = Tensor::zeros((), DType::F32, device)?;
        let mut q8_arcs = HashMap::new();
        for (name, m) in q8 {
            let shape = shapes.get(&name).ok_or_else(|| {
                Error::InvalidArgument(format!("Q8_0 tensor `{name}` is not part of the model"))
            })?;
            let (d_out, d_in) = if name == cfg.embedding_name() {
                (shape[0], shape[1])
            } else {
                (shape[1], shape[0]) // tinygpt's (in, out)
            };
            if (m.d_out(), m.d_in()) != (d_out, d_in) {
                return Err(Error::ShapeMismatch {
                    name,
                    expected: vec![d_out, d_in],
                    got: vec![m.d_out(), m.d_in()],
                    path: None,
                });
            }
            if device.is_cpu() {
                dense.insert(name.clone(), placeholder.broadcast_as(shape.as_slice())?);
                q8_arcs.insert(name, Arc::new(m));
            } else {
                let w = q8_tensor(&m, device)?; // (out, in)
                let w = if name == cfg.embedding_name() {
                    w
                } else {
                    w.t()?.contiguous()?
                };
                dense.insert(name, w.to_dtype(DType::F16)?);
            }
        }
        let mut model = Gpt::from_tensors(cfg, dense, false)?;
        for (i, block) in model.h.iter_mut().enumerate() {
            let p = |n: &str| format!("transformer.h.{i}.{n}.weight");
            if let Qkv::CAttn(l) = &mut block.attn.qkv {
                l.q8 = q8_arcs.get(&p("attn.c_attn")).cloned();
            }
            block.attn.c_proj.q8 = q8_arcs.get(&p("attn.c_proj")).cloned();
            if let Mlp::Gelu { c_fc, c_proj } = &mut block.mlp {
                c_fc.q8 = q8_arcs.get(&p("mlp.c_fc")).cloned();
                c_proj.q8 = q8_arcs.get(&p("mlp.c_proj")).cloned();
            }
        }
        model.q8 = q8_arcs;
        Ok(model)
    }

    /// The tied head's Q8_0 matrix `(V, C)`, for a Q8_0 model.
    fn head_q8(&self) -> Option<&Arc<Q8Matrix>> {
        match self.lm_head {
            None => self.q8.get(self.cfg.embedding_name()),
            Some(_) => None,
        }
    }

    /// Rows of the token embedding for `ids` (N,) u32 → (N, C), widened from Q8_0 when the
    /// embedding is 8-bit.
    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        let Some(q) = self.q8.get(self.cfg.embedding_name()) else {
            return Ok(self.wte.embedding(ids)?);
        };
        let c = q.d_in();
        let ids = ids.to_vec1::<u32>()?;
        let mut out = vec![0f32; ids.len() * c];
        for (row, &id) in out.chunks_exact_mut(c.max(1)).zip(&ids) {
            if id as usize >= q.d_out() {
                return Err(Error::InvalidArgument(format!(
                    "token id {id} is outside the vocabulary of {} ids",
                    q.d_out()
                )));
            }
            q.row_into(id as usize, row);
        }
        Ok(Tensor::from_vec(out, (ids.len(), c), self.wte.device())?)
    }

    /// A Q8_0 parameter widened to f32 in tinygpt's layout (`(in, out)` but the embedding).
    fn q8_param(&self, name: &str, q: &Q8Matrix) -> Result<Tensor> {
        let w = q8_tensor(q, self.device())?; // (out, in)
        Ok(if name == self.cfg.embedding_name() {
            w
        } else {
            w.t()?.contiguous()?
        })
    }

    /// Every projection a LoRA adapter can attach to, in PEFT's state-dict order (layer by
    /// layer; q, k, v, o, gate, up, down, or c_attn, attn.c_proj, c_fc, mlp.c_proj).
    pub(crate) fn linear_slots(&mut self) -> Vec<LinearSlot<'_>> {
        fn slot(name: String, l: &mut Linear) -> LinearSlot<'_> {
            let (d0, d1) = match l.weight.dims() {
                [d0, d1] => (*d0, *d1),
                _ => (0, 0), // never: projection weights are matrices
            };
            let (d_in, d_out) = if l.out_in { (d1, d0) } else { (d0, d1) };
            LinearSlot {
                name,
                d_in,
                d_out,
                lora: &mut l.lora,
            }
        }
        let arch = self.cfg.arch;
        let mut out = Vec::new();
        for (i, block) in self.h.iter_mut().enumerate() {
            let (attn, mlp) = match arch {
                Arch::Gpt2 => (
                    format!("transformer.h.{i}.attn"),
                    format!("transformer.h.{i}.mlp"),
                ),
                Arch::Llama => (
                    format!("model.layers.{i}.self_attn"),
                    format!("model.layers.{i}.mlp"),
                ),
            };
            match &mut block.attn.qkv {
                Qkv::CAttn(l) => out.push(slot(format!("{attn}.c_attn"), l)),
                Qkv::Split(s) => {
                    for (part, n) in s.parts.iter_mut().zip(["q_proj", "k_proj", "v_proj"]) {
                        out.push(slot(format!("{attn}.{n}"), part));
                    }
                }
            }
            let o = if arch == Arch::Gpt2 {
                "c_proj"
            } else {
                "o_proj"
            };
            out.push(slot(format!("{attn}.{o}"), &mut block.attn.c_proj));
            match &mut block.mlp {
                Mlp::Gelu { c_fc, c_proj } => {
                    out.push(slot(format!("{mlp}.c_fc"), c_fc));
                    out.push(slot(format!("{mlp}.c_proj"), c_proj));
                }
                Mlp::SwiGlu { gate_up, down } => {
                    for (part, n) in gate_up.parts.iter_mut().zip(["gate_proj", "up_proj"]) {
                        out.push(slot(format!("{mlp}.{n}"), part));
                    }
                    out.push(slot(format!("{mlp}.down_proj"), down));
                }
            }
        }
        out
    }

    /// The model's LoRA adapter, if it carries one.
    pub(crate) fn lora_state(&self) -> Option<&LoraState> {
        self.lora.as_ref()
    }

    /// Records the adapter whose tensors [`Gpt::linear_slots`] were given.
    pub(crate) fn set_lora_state(&mut self, state: Option<LoraState>) {
        self.lora = state;
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
    /// candle errors on conversion; [`Error::InvalidArgument`] for a model carrying a LoRA
    /// adapter (merge it first: [`Gpt::merge_lora`]).
    pub fn to_dtype(&self, dtype: DType) -> Result<Gpt> {
        self.refuse_lora("to_dtype")?;
        let tensors = self
            .tensors()
            .into_iter()
            .map(|(n, t)| Ok((n, t.detach().to_dtype(dtype)?)))
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
    /// [`Error::InvalidArgument`] if `vocab_size` is smaller than the current one, or for a
    /// model carrying a LoRA adapter (merge it first: [`Gpt::merge_lora`]).
    pub fn resize_vocab(&self, vocab_size: usize, trainable: bool) -> Result<Gpt> {
        self.refuse_lora("resize_vocab")?;
        if self.is_quantized() {
            return self
                .to_dtype(DType::F32)?
                .resize_vocab(vocab_size, trainable);
        }
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
            let grow = |w: &Tensor| -> Result<Tensor> {
                let w = w.detach(); // (V_old, C)
                let mean = w
                    .to_dtype(DType::F32)?
                    .mean_keepdim(0)?
                    .to_dtype(w.dtype())?; // (1, C)
                let new_rows = mean
                    .broadcast_as((vocab_size - old, self.cfg.n_embd))?
                    .contiguous()?;
                Ok(Tensor::cat(&[&w, &new_rows], 0)?) // (V_new, C)
            };
            tensors.insert(self.cfg.embedding_name().to_string(), grow(&self.wte)?);
            if let Some(head) = &self.lm_head {
                tensors.insert("lm_head.weight".to_string(), grow(head)?);
            }
        }
        Self::from_tensors(&cfg, tensors, trainable)
    }
}

/// A Q8_0 matrix widened to an f32 tensor `(out, in)` on `device`.
fn q8_tensor(q: &Q8Matrix, device: &Device) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        q.dequantize(),
        (q.d_out(), q.d_in()),
        device,
    )?)
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
            ..Default::default()
        }
    }

    /// Llama-style tiny models covering every switch: GQA, untied head, q/k/v bias (Qwen2),
    /// q/k norm with an explicit head size (Qwen3), all biases.
    fn tiny_llamas() -> Vec<GptConfig> {
        let base = GptConfig {
            vocab_size: 11,
            block_size: 8,
            n_layer: 2,
            n_head: 4,
            n_embd: 8,
            n_kv_head: Some(2),
            intermediate_size: Some(12),
            rope_theta: 500.0,
            norm_eps: 1e-6,
            ..GptConfig::llama(11, 8, 2, 4, 8)
        };
        vec![
            GptConfig {
                tie_word_embeddings: false,
                ..base.clone()
            },
            GptConfig {
                qkv_bias: true,
                n_kv_head: Some(1),
                ..base.clone()
            },
            GptConfig {
                qk_norm: true,
                head_dim: Some(6),
                n_head: 2,
                n_kv_head: Some(1),
                ..base.clone()
            },
            GptConfig {
                bias: true,
                n_kv_head: None,
                ..base
            },
        ]
    }

    fn ids(rows: &[&[u32]]) -> Tensor {
        let t = rows[0].len();
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
    }

    #[test]
    fn llama_parameter_counts_match_their_tensors_and_the_published_models() {
        let listed = |cfg: &GptConfig| -> usize {
            cfg.parameter_shapes()
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum()
        };
        for cfg in tiny_llamas().into_iter().chain([
            GptConfig::llama_tiny(66),
            GptConfig::tinyllama_1_1b(),
            GptConfig::qwen3_0_6b(),
        ]) {
            assert_eq!(cfg.num_parameters(), listed(&cfg), "{cfg:?}");
            if cfg.n_embd < 200 {
                let m = Gpt::init(&cfg, 0, &Device::Cpu).unwrap();
                assert_eq!(m.named_parameters().len(), cfg.parameter_shapes().len());
                let logits = m.forward(&ids(&[&[1, 2, 3]])).unwrap();
                assert_eq!(logits.dims(), &[1, 3, cfg.vocab_size]);
            }
        }
        // Hugging Face's counts of the real models.
        assert_eq!(GptConfig::smollm2_135m().num_parameters(), 134_515_008);
        assert_eq!(GptConfig::qwen2_5_0_5b().num_parameters(), 494_032_768);
        // The Llama twin of the default recipe: GPT-2's size less its position embeddings.
        let (gpt, llama) = (
            GptConfig::shakespeare_char_cpu(66),
            GptConfig::llama_tiny(66),
        );
        assert_eq!(gpt.num_parameters() - llama.num_parameters(), 64 * 128);
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
            eps: LAYER_NORM_EPS,
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

    /// The decoding step on plain rows ([`Gpt::decode_by_rows`]) against the op-by-op path it
    /// replaces, for every architecture, with f32 and with f16 weights: a batch of two through
    /// one `KvCache`, eight steps after a three-token prompt; the same row kernels in the same
    /// order, so the same logits to rounding (the bound leaves room for FMA contraction
    /// differences only).
    #[test]
    fn decoding_by_rows_matches_the_op_by_op_step() {
        for cfg in std::iter::once(tiny()).chain(tiny_llamas()) {
            let m = Gpt::init(&cfg, 5, &Device::Cpu).unwrap();
            for dtype in [DType::F32, DType::F16] {
                decoding_by_rows_matches_with(&cfg, &m.to_dtype(dtype).unwrap());
            }
        }
    }

    /// [`decoding_by_rows_matches_the_op_by_op_step`] for one model `m`.
    fn decoding_by_rows_matches_with(cfg: &GptConfig, m: &Gpt) {
        assert!(m.decodes_by_rows(), "{cfg:?} {:?}", m.dtype());
        let (mut fast, mut slow) = (KvCache::new(cfg.n_layer), KvCache::new(cfg.n_layer));
        let prompt = ids(&[&[3, 1, 4], &[2, 7, 1]]);
        m.forward_with_cache(&prompt, &mut fast).unwrap();
        m.forward_with_cache(&prompt, &mut slow).unwrap();
        for step in 0..cfg.block_size - 3 {
            let tok = ids(&[&[(step as u32 * 3) % 11], &[(step as u32 * 5 + 1) % 11]]);
            let got = m.forward_with_cache(&tok, &mut fast).unwrap(); // (2, V)
            let h = m.hidden_states(&tok, Some(&mut slow), None).unwrap(); // (2, 1, C)
            let want = m.lm_head(&h).unwrap().squeeze(1).unwrap();
            let diff = crate::testing::max_abs_diff(&got, &want);
            assert!(
                diff < 1e-5,
                "{:?} {:?} step {step}: {diff}",
                cfg.arch,
                m.dtype()
            );
            assert_eq!(fast.len(), slow.len());
        }
        // A full cache: the next step is refused, as the op-by-op path refuses it.
        let tok = ids(&[&[1], &[1]]);
        assert!(m.forward_with_cache(&tok, &mut fast).is_err());
    }

    #[test]
    fn cache_matches_full_forward() {
        for cfg in std::iter::once(tiny()).chain(tiny_llamas()) {
            cache_matches_full_forward_with(&cfg);
        }
    }

    fn cache_matches_full_forward_with(cfg: &GptConfig) {
        let m = Gpt::init(cfg, 2, &Device::Cpu).unwrap();
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
            assert!(diff < 1e-5, "{cfg:?} position {pos}: {diff}");
        }
        // the cache is full: one more token does not fit
        assert!(m
            .forward_with_cache(&ids(&[&[1]]), &mut cache)
            .unwrap_err()
            .to_string()
            .contains("block_size"));
    }

    /// A cache starts at 64 positions and doubles up to `block_size` (150 here), through
    /// prompts (positions 0..10, then 10..70 across the first boundary) and single decoding
    /// steps (across 128): every logit as the full forward pass's, f32 and f16.
    #[test]
    fn cache_grows_past_its_first_capacity() {
        for base in [tiny(), tiny_llamas()[0].clone()] {
            let cfg = GptConfig {
                block_size: 150,
                ..base
            };
            for dtype in [DType::F32, DType::F16] {
                let m = Gpt::init(&cfg, 2, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let seq: Vec<u32> = (0..150u32).map(|i| (i * 7 + 3) % 11).collect();
                let full = m.forward(&ids(&[&seq])).unwrap(); // (1, 150, V)
                let mut cache = KvCache::new(cfg.n_layer);
                let capacity = |c: &KvCache| c.layers[0].as_ref().unwrap().k.dim(2).unwrap();
                let check = |got: Tensor, pos: usize| {
                    let want = full.narrow(1, pos, 1).unwrap().flatten_all().unwrap();
                    let got = got.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                    let want = want.to_dtype(DType::F32).unwrap();
                    let diff = crate::testing::max_abs_diff(&got, &want);
                    let tol = if dtype == DType::F16 { 2e-2 } else { 1e-5 };
                    assert!(
                        diff < tol,
                        "{:?} {dtype:?} position {pos}: {diff}",
                        cfg.arch
                    );
                };
                check(
                    m.forward_with_cache(&ids(&[&seq[..10]]), &mut cache)
                        .unwrap(),
                    9,
                );
                assert_eq!(capacity(&cache), 64);
                check(
                    m.forward_with_cache(&ids(&[&seq[10..70]]), &mut cache)
                        .unwrap(),
                    69,
                );
                assert_eq!(capacity(&cache), 128);
                for pos in 70..150 {
                    let got = m.forward_with_cache(&ids(&[&seq[pos..pos + 1]]), &mut cache);
                    check(got.unwrap(), pos);
                }
                assert_eq!((capacity(&cache), cache.len()), (150, 150));
                assert!(m.forward_with_cache(&ids(&[&[1]]), &mut cache).is_err());
            }
        }
    }

    #[test]
    fn every_parameter_gets_a_gradient() {
        // dropout 0: the fused attention kernel; dropout 0.1: the plain-op path.
        // Every architecture: GPT-2, and Llama with each of its switches.
        for cfg in std::iter::once(tiny()).chain(tiny_llamas()) {
            for dropout in [0.0, 0.1] {
                every_parameter_gets_a_gradient_with(&cfg, dropout);
            }
        }
    }

    fn every_parameter_gets_a_gradient_with(cfg: &GptConfig, dropout: f32) {
        let mut cfg = cfg.clone();
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
                .unwrap_or_else(|| panic!("no gradient for {name} in {cfg:?}"));
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "zero gradient for {name} in {cfg:?}");
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
    fn llama_settings_are_checked_by_name() {
        let llama = GptConfig::llama(11, 8, 2, 4, 8);
        let cases = [
            (
                GptConfig {
                    n_kv_head: Some(3),
                    ..llama.clone()
                },
                "multiple of n_kv_head",
            ),
            (
                GptConfig {
                    head_dim: Some(3),
                    ..llama.clone()
                },
                "must be even",
            ),
            (
                GptConfig {
                    head_dim: Some(usize::MAX / 2),
                    ..llama.clone()
                },
                "overflows",
            ),
            (
                GptConfig {
                    rope_theta: f64::NAN,
                    ..llama.clone()
                },
                "rope_theta",
            ),
            (
                GptConfig {
                    norm_eps: 0.0,
                    ..llama.clone()
                },
                "norm_eps",
            ),
            (
                GptConfig {
                    n_kv_head: Some(0),
                    ..llama.clone()
                },
                "n_kv_head must be at least 1",
            ),
            (
                GptConfig {
                    qk_norm: true,
                    ..tiny()
                },
                "qk_norm is a Llama setting",
            ),
            (
                GptConfig {
                    n_kv_head: Some(1),
                    ..tiny()
                },
                "n_kv_head is a Llama setting",
            ),
            (
                GptConfig {
                    head_dim: Some(usize::MAX),
                    ..tiny()
                },
                "head_dim is a Llama setting",
            ),
            (
                GptConfig {
                    intermediate_size: Some(7),
                    ..tiny()
                },
                "intermediate_size is a Llama",
            ),
            (
                GptConfig {
                    tie_word_embeddings: false,
                    ..tiny()
                },
                "tie_word_embeddings is a",
            ),
        ];
        for (cfg, needle) in cases {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        // GPT-2 with the Llama fields at their GPT-2 values is a GPT-2.
        let same = GptConfig {
            n_kv_head: Some(2),
            head_dim: Some(4),
            intermediate_size: Some(32),
            ..tiny()
        };
        assert!(same.validate().is_ok());
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
