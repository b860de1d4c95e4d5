//! A GPT-2 training step written out by hand, after llm.c's `train_gpt2.c`: the forward pass
//! keeps what the backward pass needs in buffers sized once for `(B, T)`, and the backward
//! pass writes each parameter's gradient into a buffer of its own, adding to it, so that
//! micro-batches accumulate in place. No graph, no gradient tensors made and summed per op.
//!
//! candle's autograd ([`crate::model::Gpt::forward_train`] then `backward`) is the reference:
//! the tests hold this step's loss and every gradient to it. What is covered here: GPT-2
//! blocks (pre-LayerNorm, fused `c_attn`, causal attention, tanh GELU MLP), with or without
//! biases, a tied head, f32 on the CPU, no dropout. Anything else trains through autograd
//! ([`Gpt2Step::supports`] says which).
//!
//! Shapes, with `N = B·T` rows: the residual stream `(N, C)`, `qkv` `(N, 3C)`, the MLP's hidden
//! `(N, 4C)`, the logits `(N, V)`. Every matrix product is one call of the gemm crate
//! ([`super::gemm`]) on row-major slices, transposes given as strides.

use candle_core::{Storage, Var};
use rayon::prelude::*;

use super::attention::{
    qkv_attention_backward, qkv_attention_forward, QkvBackwardBuffers, QkvSaved,
};
use super::gemm::gemm_into;
use super::layers::{
    exp, gelu_grad_rows, gelu_rows, layer_norm_backward_rows, layer_norm_rows_stats, sum,
};
use crate::model::{Arch, GptConfig};
use crate::{Error, Result};

/// Where one block's parameters sit in the parameter list.
#[derive(Debug, Clone, Copy)]
struct BlockParams {
    ln_1: (usize, Option<usize>),
    c_attn: (usize, Option<usize>),
    attn_proj: (usize, Option<usize>),
    ln_2: (usize, Option<usize>),
    c_fc: (usize, Option<usize>),
    mlp_proj: (usize, Option<usize>),
}

/// What one block's forward keeps for its backward (each `(N, ·)` row-major).
struct BlockActs {
    /// `ln_1(x)` `(N, C)` and its row statistics `(N, 2)`.
    ln_1: Vec<f32>,
    ln_1_stats: Vec<f32>,
    /// `c_attn(ln_1)` `(N, 3C)`.
    qkv: Vec<f32>,
    /// The attention's output, heads merged, `(N, C)`, and its kernel's saved state.
    att: Vec<f32>,
    att_saved: QkvSaved,
    /// The residual stream after the attention, `x + c_proj(att)` `(N, C)`.
    x_mid: Vec<f32>,
    /// `ln_2(x_mid)` `(N, C)` and its statistics.
    ln_2: Vec<f32>,
    ln_2_stats: Vec<f32>,
    /// `c_fc(ln_2)` with its bias, before GELU `(N, 4C)`, and after `(N, 4C)`.
    h: Vec<f32>,
    g: Vec<f32>,
    /// The block's output, `x_mid + mlp_proj(g)` `(N, C)`.
    out: Vec<f32>,
}

/// One GPT-2 training step's buffers, for a batch of `(B, T)` and a parameter list.
pub(crate) struct Gpt2Step {
    b: usize,
    t: usize,
    c: usize,
    n_head: usize,
    vocab: usize,
    eps: f32,
    wte: usize,
    wpe: usize,
    blocks: Vec<BlockParams>,
    ln_f: (usize, Option<usize>),
    /// The embeddings, block 0's input `(N, C)`.
    x0: Vec<f32>,
    acts: Vec<BlockActs>,
    ln_f_out: Vec<f32>,
    ln_f_stats: Vec<f32>,
    /// The logits `(N, V)`; after the forward, their gradient.
    logits: Vec<f32>,
    // Backward scratch.
    d_res: Vec<f32>,
    d_ln: Vec<f32>,
    d_att: Vec<f32>,
    d_qkv: Vec<f32>,
    d_h: Vec<f32>,
    /// The attention backward's head-major buffers, shared by the blocks.
    att_bwd: QkvBackwardBuffers,
    /// Every parameter's gradient, in the parameter list's order, each its parameter's size.
    grads: Vec<Vec<f32>>,
}

impl std::fmt::Debug for Gpt2Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpt2Step")
            .field("b", &self.b)
            .field("t", &self.t)
            .field("n_layer", &self.blocks.len())
            .field("n_embd", &self.c)
            .finish_non_exhaustive()
    }
}

impl Gpt2Step {
    /// The attention kernel's `(B, T, nh, nkv)` and `1 / sqrt(hs)`.
    fn attention_dims(&self) -> ((usize, usize, usize, usize), f32) {
        let dims = (self.b, self.t, self.n_head, self.n_head);
        (dims, 1.0 / ((self.c / self.n_head) as f32).sqrt())
    }

    /// Whether this step can train a model of `cfg` on `device_is_cpu` with f32 weights: GPT-2,
    /// tied head, no dropout.
    pub(crate) fn supports(cfg: &GptConfig, tied_head: bool) -> bool {
        cfg.arch == Arch::Gpt2 && tied_head && cfg.dropout == 0.0
    }

    /// Buffers for batches of `(b, t)` of a model of `cfg` whose parameters are `params`
    /// (Hugging Face names; each f32 on the CPU, contiguous).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when a parameter the architecture needs is missing, has
    /// another shape, or is not f32 on the CPU; or the config is not one [`Self::supports`].
    pub(crate) fn new(
        cfg: &GptConfig,
        params: &[(String, Var)],
        b: usize,
        t: usize,
    ) -> Result<Self> {
        let (c, v) = (cfg.n_embd, cfg.vocab_size);
        let find = |name: &str, shape: &[usize]| -> Result<usize> {
            let i = params.iter().position(|(n, _)| n == name).ok_or_else(|| {
                Error::InvalidArgument(format!("training step: no parameter `{name}`"))
            })?;
            let p = params[i].1.as_tensor();
            if p.dims() != shape || p.dtype() != candle_core::DType::F32 || !p.device().is_cpu() {
                return Err(Error::InvalidArgument(format!(
                    "training step: `{name}` is {:?} {:?} on {:?}, expected {shape:?} f32 on the CPU",
                    p.dims(),
                    p.dtype(),
                    p.device()
                )));
            }
            Ok(i)
        };
        let bias = |name: &str, n: usize| -> Result<Option<usize>> {
            if cfg.bias {
                Ok(Some(find(name, &[n])?))
            } else {
                Ok(None)
            }
        };
        if !Self::supports(cfg, !params.iter().any(|(n, _)| n == "lm_head.weight")) {
            return Err(Error::InvalidArgument(
                "training step: GPT-2 with a tied head and no dropout only".into(),
            ));
        }
        if t == 0 || t > cfg.block_size || b == 0 {
            return Err(Error::InvalidArgument(format!(
                "training step: batch ({b}, {t}) for block_size {}",
                cfg.block_size
            )));
        }
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let p = |s: &str| format!("transformer.h.{l}.{s}");
            blocks.push(BlockParams {
                ln_1: (find(&p("ln_1.weight"), &[c])?, bias(&p("ln_1.bias"), c)?),
                c_attn: (
                    find(&p("attn.c_attn.weight"), &[c, 3 * c])?,
                    bias(&p("attn.c_attn.bias"), 3 * c)?,
                ),
                attn_proj: (
                    find(&p("attn.c_proj.weight"), &[c, c])?,
                    bias(&p("attn.c_proj.bias"), c)?,
                ),
                ln_2: (find(&p("ln_2.weight"), &[c])?, bias(&p("ln_2.bias"), c)?),
                c_fc: (
                    find(&p("mlp.c_fc.weight"), &[c, 4 * c])?,
                    bias(&p("mlp.c_fc.bias"), 4 * c)?,
                ),
                mlp_proj: (
                    find(&p("mlp.c_proj.weight"), &[4 * c, c])?,
                    bias(&p("mlp.c_proj.bias"), c)?,
                ),
            });
        }
        let n = b * t;
        let z = |len: usize| vec![0f32; len];
        let acts = (0..cfg.n_layer)
            .map(|_| BlockActs {
                ln_1: z(n * c),
                ln_1_stats: z(n * 2),
                qkv: z(n * 3 * c),
                att: z(n * c),
                att_saved: QkvSaved::default(),
                x_mid: z(n * c),
                ln_2: z(n * c),
                ln_2_stats: z(n * 2),
                h: z(n * 4 * c),
                g: z(n * 4 * c),
                out: z(n * c),
            })
            .collect();
        Ok(Self {
            b,
            t,
            c,
            n_head: cfg.n_head,
            vocab: v,
            eps: cfg.norm_eps as f32,
            wte: find("transformer.wte.weight", &[v, c])?,
            wpe: find("transformer.wpe.weight", &[cfg.block_size, c])?,
            blocks,
            ln_f: (
                find("transformer.ln_f.weight", &[c])?,
                bias("transformer.ln_f.bias", c)?,
            ),
            x0: z(n * c),
            acts,
            ln_f_out: z(n * c),
            ln_f_stats: z(n * 2),
            logits: z(n * v),
            d_res: z(n * c),
            d_ln: z(n * c),
            d_att: z(n * c),
            d_qkv: z(n * 3 * c),
            d_h: z(n * 4 * c),
            att_bwd: QkvBackwardBuffers::default(),
            grads: params.iter().map(|(_, p)| z(p.elem_count())).collect(),
        })
    }

    /// The gradients, in the parameter list's order.
    pub(crate) fn grads(&self) -> &[Vec<f32>] {
        &self.grads
    }

    /// Zeroes every gradient (before a step's first micro-batch).
    pub(crate) fn zero_grads(&mut self) {
        for g in &mut self.grads {
            g.fill(0.0);
        }
    }

    /// Forward and backward over one micro-batch: `ids` and `targets` `(B, T)` row-major.
    /// Returns the mean cross-entropy; adds `loss_scale ·` its gradient into the gradient
    /// buffers (`1 / micro-batches` when accumulating).
    ///
    /// # Errors
    /// A token id outside the vocabulary, ids of another length, or a parameter that is no
    /// longer f32 on the CPU.
    #[cfg(test)] // the trainer goes through [`ShardedStep`]
    pub(crate) fn forward_backward(
        &mut self,
        params: &[(String, Var)],
        ids: &[u32],
        targets: &[u32],
        loss_scale: f32,
    ) -> Result<f32> {
        self.run(params, ids, targets, Some(loss_scale))
    }

    /// The forward pass, then the backward with `backward`'s loss scale when it is given
    /// (without: an evaluation, the gradients untouched).
    fn run(
        &mut self,
        params: &[(String, Var)],
        ids: &[u32],
        targets: &[u32],
        backward: Option<f32>,
    ) -> Result<f32> {
        let n = self.b * self.t;
        if ids.len() != n || targets.len() != n {
            return Err(Error::InvalidArgument(format!(
                "training step: {} ids and {} targets for a batch of {n}",
                ids.len(),
                targets.len()
            )));
        }
        if let Some(&bad) = ids
            .iter()
            .chain(targets)
            .find(|&&i| i as usize >= self.vocab)
        {
            return Err(Error::InvalidArgument(format!(
                "training step: token id {bad} is outside the vocabulary of {}",
                self.vocab
            )));
        }
        let guards: Vec<_> = params
            .iter()
            .map(|(_, p)| p.as_tensor().storage_and_layout())
            .collect();
        let w = guards
            .iter()
            .map(|(s, l)| match (&**s, l.contiguous_offsets()) {
                (Storage::Cpu(candle_core::CpuStorage::F32(d)), Some((a, b))) => Ok(&d[a..b]),
                _ => Err(Error::InvalidArgument(
                    "training step: parameters must be contiguous f32 on the CPU".into(),
                )),
            })
            .collect::<Result<Vec<&[f32]>>>()?;
        let loss = self.forward(&w, ids, targets, backward.unwrap_or(0.0))?;
        if backward.is_some() {
            self.backward(&w, ids)?;
        }
        Ok(loss)
    }

    /// The forward pass; leaves the logits' gradient (times `loss_scale`) in `self.logits`.
    fn forward(
        &mut self,
        w: &[&[f32]],
        ids: &[u32],
        targets: &[u32],
        loss_scale: f32,
    ) -> Result<f32> {
        let (c, t, v) = (self.c, self.t, self.vocab);
        let n = self.b * t;
        // x0 = wte[ids] + wpe[pos]
        for (r, (row, &id)) in self.x0.chunks_exact_mut(c).zip(ids).enumerate() {
            let e = &w[self.wte][id as usize * c..][..c];
            let p = &w[self.wpe][(r % t) * c..][..c];
            for ((o, &a), &b) in row.iter_mut().zip(e).zip(p) {
                *o = a + b;
            }
        }
        let (dims, scale) = self.attention_dims();
        let eps = self.eps;
        for l in 0..self.acts.len() {
            let bp = self.blocks[l];
            let (before, rest) = self.acts.split_at_mut(l);
            let x = block_input(before, &self.x0, l);
            let a = &mut rest[0];
            ln_forward(w, bp.ln_1, x, (&mut a.ln_1, &mut a.ln_1_stats), eps);
            linear(w, bp.c_attn, &a.ln_1, &mut a.qkv, (n, c, 3 * c))?;
            qkv_attention_forward(&a.qkv, dims, scale, &mut a.att, &mut a.att_saved)?;
            linear(w, bp.attn_proj, &a.att, &mut a.x_mid, (n, c, c))?;
            super::layers::add_assign(&mut a.x_mid, x);
            ln_forward(w, bp.ln_2, &a.x_mid, (&mut a.ln_2, &mut a.ln_2_stats), eps);
            linear(w, bp.c_fc, &a.ln_2, &mut a.h, (n, c, 4 * c))?;
            gelu_rows(&a.h, None, &mut a.g, 4 * c);
            linear(w, bp.mlp_proj, &a.g, &mut a.out, (n, 4 * c, c))?;
            super::layers::add_assign(&mut a.out, &a.x_mid);
        }
        let x = block_input(&self.acts, &self.x0, self.acts.len());
        ln_forward(
            w,
            self.ln_f,
            x,
            (&mut self.ln_f_out, &mut self.ln_f_stats),
            eps,
        );
        // logits = ln_f @ wteᵀ: (N, C) @ (C, V)
        gemm_into(
            &mut self.logits,
            (n, v, c),
            (&self.ln_f_out, c as isize, 1),
            (w[self.wte], 1, c as isize),
            false,
            v,
        )?;
        let inv_n = 1.0 / n as f32;
        Ok(cross_entropy_in_place(&mut self.logits, targets, v, loss_scale * inv_n) * inv_n)
    }

    /// The backward pass, from the logits' gradient in `self.logits`.
    fn backward(&mut self, w: &[&[f32]], ids: &[u32]) -> Result<()> {
        let (c, t, v) = (self.c, self.t, self.vocab);
        let n = self.b * t;
        let (dims, scale) = self.attention_dims();
        let grads = &mut self.grads;
        // d wte += dlogitsᵀ @ ln_f: (V, N) @ (N, C); d ln_f = dlogits @ wte: (N, V) @ (V, C)
        gemm_into(
            &mut grads[self.wte],
            (v, c, n),
            (&self.logits, 1, v as isize),
            (&self.ln_f_out, c as isize, 1),
            true,
            c,
        )?;
        gemm_into(
            &mut self.d_ln,
            (n, c, v),
            (&self.logits, v as isize, 1),
            (w[self.wte], c as isize, 1),
            false,
            c,
        )?;
        let x_last = block_input(&self.acts, &self.x0, self.acts.len());
        ln_backward(
            grads,
            w,
            self.ln_f,
            (x_last, &self.ln_f_stats),
            &self.d_ln,
            &mut self.d_res,
            false,
        );
        for l in (0..self.acts.len()).rev() {
            let bp = self.blocks[l];
            let x = block_input(&self.acts, &self.x0, l);
            let a = &self.acts[l];
            // out = x_mid + g @ W_proj + b: d g = d_res @ W_projᵀ, d W_proj += gᵀ @ d_res
            linear_backward(
                grads,
                w,
                bp.mlp_proj,
                &a.g,
                &self.d_res,
                &mut self.d_h,
                (n, 4 * c, c),
            )?;
            // through GELU, in place: d h = d g · gelu'(h)
            gelu_grad_in_place(&a.h, &mut self.d_h);
            if let Some(bi) = bp.c_fc.1 {
                column_sums_into(&mut grads[bi], &self.d_h, 4 * c);
            }
            linear_backward(
                grads,
                w,
                (bp.c_fc.0, None),
                &a.ln_2,
                &self.d_h,
                &mut self.d_ln,
                (n, c, 4 * c),
            )?;
            ln_backward(
                grads,
                w,
                bp.ln_2,
                (&a.x_mid, &a.ln_2_stats),
                &self.d_ln,
                &mut self.d_res,
                true,
            );
            // x_mid = x + att @ W_proj + b
            linear_backward(
                grads,
                w,
                bp.attn_proj,
                &a.att,
                &self.d_res,
                &mut self.d_att,
                (n, c, c),
            )?;
            qkv_attention_backward(
                &a.att_saved,
                &mut self.att_bwd,
                &self.d_att,
                dims,
                scale,
                &mut self.d_qkv,
            )?;
            linear_backward(
                grads,
                w,
                bp.c_attn,
                &a.ln_1,
                &self.d_qkv,
                &mut self.d_ln,
                (n, c, 3 * c),
            )?;
            ln_backward(
                grads,
                w,
                bp.ln_1,
                (x, &a.ln_1_stats),
                &self.d_ln,
                &mut self.d_res,
                true,
            );
        }
        // x0 = wte[ids] + wpe[pos]
        for (r, (d, &id)) in self.d_res.chunks_exact(c).zip(ids).enumerate() {
            super::layers::add_assign(&mut grads[self.wte][id as usize * c..][..c], d);
            super::layers::add_assign(&mut grads[self.wpe][(r % t) * c..][..c], d);
        }
        Ok(())
    }
}

/// Most bytes of gradients [`ShardedStep::shards_for`] adds for the extra shards' copies
/// (16M parameters over 2 threads: nanoGPT's 6 × 384 char model has 10.7M). A larger model's
/// products are large enough for gemm to split them well, and its gradient copy would cost
/// memory a real-size run needs.
const SHARD_MAX_EXTRA_BYTES: usize = 64 << 20;

/// A training step split over the threads by rows of the batch (data parallelism, as
/// PyTorch's DistributedDataParallel splits it over processes): each shard is a [`Gpt2Step`]
/// of its own rows, run on one thread with every kernel kept there ([`super::serial`]), and
/// the shards' gradients are summed into the first's after each micro-batch. One shard is
/// the plain step. On 2 cores with the default config, splitting each product instead
/// handed half of every one of ~50 products a step to the other thread and back (10% of
/// the step in the scheduler) and left the element-wise passes on one thread.
pub(crate) struct ShardedStep {
    shards: Vec<Gpt2Step>,
    /// Batch rows per shard, in order.
    rows: Vec<usize>,
}

impl std::fmt::Debug for ShardedStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedStep")
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl ShardedStep {
    /// How many shards a batch of `b` rows of a model of `n_params` parameters takes on
    /// `threads` threads: one per thread (at most one per row) when the extra shards'
    /// gradient copies stay within `SHARD_MAX_EXTRA_BYTES`, else one.
    pub(crate) fn shards_for(n_params: usize, b: usize, threads: usize) -> usize {
        let shards = threads.clamp(1, b.max(1));
        let extra = (shards - 1).saturating_mul(n_params).saturating_mul(4);
        if extra <= SHARD_MAX_EXTRA_BYTES {
            shards
        } else {
            1
        }
    }

    /// A step for batches of `(b, t)` in `shards` shards (clamped to `1..=b`), the rows
    /// dealt out as evenly as they go, earlier shards taking the one extra.
    ///
    /// # Errors
    /// As [`Gpt2Step::new`].
    pub(crate) fn new(
        cfg: &GptConfig,
        params: &[(String, Var)],
        b: usize,
        t: usize,
        shards: usize,
    ) -> Result<Self> {
        let n = shards.clamp(1, b.max(1));
        let rows: Vec<usize> = (0..n).map(|i| b / n + usize::from(i < b % n)).collect();
        let shards = rows
            .iter()
            .map(|&bi| Gpt2Step::new(cfg, params, bi, t))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { shards, rows })
    }

    /// The gradients, in the parameter list's order (the sum over the shards).
    pub(crate) fn grads(&self) -> &[Vec<f32>] {
        self.shards.first().map_or(&[], |s| s.grads())
    }

    /// Zeroes every gradient (before a step's first micro-batch).
    pub(crate) fn zero_grads(&mut self) {
        for s in &mut self.shards {
            s.zero_grads();
        }
    }

    /// As [`Gpt2Step::forward_backward`] for the whole batch: each shard's rows on a thread
    /// of their own, the mean loss over all rows returned, its gradient (times `loss_scale`)
    /// added into [`ShardedStep::grads`].
    ///
    /// # Errors
    /// As [`Gpt2Step::forward_backward`]; ids or targets of another length than `(b, t)`.
    pub(crate) fn forward_backward(
        &mut self,
        params: &[(String, Var)],
        ids: &[u32],
        targets: &[u32],
        loss_scale: f32,
    ) -> Result<f32> {
        self.run(params, ids, targets, Some(loss_scale))
    }

    /// As [`Gpt2Step::loss`] for the whole batch, the shards side by side: an evaluation on
    /// the step's buffers, where candle's forward of the trained (tracked) weights would keep
    /// every intermediate of the batch for a backward pass that never comes.
    ///
    /// # Errors
    /// As [`ShardedStep::forward_backward`].
    pub(crate) fn loss(
        &mut self,
        params: &[(String, Var)],
        ids: &[u32],
        targets: &[u32],
    ) -> Result<f32> {
        self.run(params, ids, targets, None)
    }

    /// Each shard's [`Gpt2Step::run`] on its rows; the gradients summed into the first's.
    fn run(
        &mut self,
        params: &[(String, Var)],
        ids: &[u32],
        targets: &[u32],
        backward: Option<f32>,
    ) -> Result<f32> {
        if let [one] = self.shards.as_mut_slice() {
            return one.run(params, ids, targets, backward);
        }
        let b: usize = self.rows.iter().sum();
        let t = self.shards.first().map_or(0, |s| s.t);
        if ids.len() != b * t || targets.len() != b * t {
            return Err(Error::InvalidArgument(format!(
                "training step: {} ids and {} targets for a batch of {}",
                ids.len(),
                targets.len(),
                b * t
            )));
        }
        let starts: Vec<usize> = self
            .rows
            .iter()
            .scan(0, |at, &r| {
                let s = *at;
                *at += r;
                Some(s)
            })
            .collect();
        let jobs: Vec<(&mut Gpt2Step, usize, usize)> = self
            .shards
            .iter_mut()
            .zip(starts.iter().zip(&self.rows))
            .map(|(s, (&at, &r))| (s, at * t, r))
            .collect();
        // Each shard's mean, weighted by its share of the rows: the whole batch's mean.
        let losses = jobs
            .into_par_iter()
            .map(|(s, at, r)| {
                let share = r as f32 / b as f32;
                let span = at..at + r * t;
                let scale = backward.map(|s| s * share);
                super::serial(|| s.run(params, &ids[span.clone()], &targets[span], scale))
                    .map(|loss| loss * share)
            })
            .collect::<Result<Vec<f32>>>()?;
        if backward.is_none() {
            return Ok(losses.iter().sum());
        }
        let (first, rest) = self.shards.split_at_mut(1);
        for s in rest {
            first[0]
                .grads
                .par_iter_mut()
                .zip(s.grads.par_iter_mut())
                .for_each(|(acc, g)| {
                    super::layers::add_assign(acc, g);
                    g.fill(0.0);
                });
        }
        Ok(losses.iter().sum())
    }
}

/// The input of block `l`: block `l − 1`'s output, or the embeddings `x0` for the first
/// (`l = acts.len()`: the last block's output, `ln_f`'s input).
fn block_input<'a>(acts: &'a [BlockActs], x0: &'a [f32], l: usize) -> &'a [f32] {
    match l.checked_sub(1) {
        Some(prev) => &acts[prev].out,
        None => x0,
    }
}

/// LayerNorm of the rows of `x` by the parameters at `(wi, bi)`, keeping the row statistics.
fn ln_forward(
    w: &[&[f32]],
    (wi, bi): (usize, Option<usize>),
    x: &[f32],
    (y, stats): (&mut [f32], &mut [f32]),
    eps: f32,
) {
    layer_norm_rows_stats(x, w[wi], bi.map(|i| w[i]), y, stats, eps);
}

/// `y (N, out) = x (N, in) @ W (in, out) [+ b]`, `W` and `b` the parameters at `(wi, bi)`.
fn linear(
    w: &[&[f32]],
    (wi, bi): (usize, Option<usize>),
    x: &[f32],
    y: &mut [f32],
    (n, d_in, d_out): (usize, usize, usize),
) -> Result<()> {
    gemm_into(
        y,
        (n, d_out, d_in),
        (x, d_in as isize, 1),
        (w[wi], d_out as isize, 1),
        false,
        d_out,
    )?;
    if let Some(b) = bi.map(|i| w[i]) {
        for row in y.chunks_exact_mut(d_out) {
            super::layers::add_assign(row, b);
        }
    }
    Ok(())
}

/// The backward of [`linear`] for `dy (N, out)`: `dx = dy @ wᵀ` (overwritten), `dw += xᵀ @ dy`,
/// `db += Σ_rows dy`.
fn linear_backward(
    grads: &mut [Vec<f32>],
    w: &[&[f32]],
    (wi, bi): (usize, Option<usize>),
    x: &[f32],
    dy: &[f32],
    dx: &mut [f32],
    (n, d_in, d_out): (usize, usize, usize),
) -> Result<()> {
    gemm_into(
        &mut grads[wi],
        (d_in, d_out, n),
        (x, 1, d_in as isize),
        (dy, d_out as isize, 1),
        true,
        d_out,
    )?;
    gemm_into(
        dx,
        (n, d_in, d_out),
        (dy, d_out as isize, 1),
        (w[wi], 1, d_out as isize),
        false,
        d_in,
    )?;
    if let Some(bi) = bi {
        column_sums_into(&mut grads[bi], dy, d_out);
    }
    Ok(())
}

/// `acc += Σ_rows x` over rows of `width`.
fn column_sums_into(acc: &mut [f32], x: &[f32], width: usize) {
    for row in x.chunks_exact(width) {
        super::layers::add_assign(acc, row);
    }
}

/// LayerNorm's backward into `dx` (overwritten, or added to with `accumulate`) and its
/// weight's (and bias's) gradient.
fn ln_backward(
    grads: &mut [Vec<f32>],
    w: &[&[f32]],
    (wi, bi): (usize, Option<usize>),
    (x, stats): (&[f32], &[f32]),
    dy: &[f32],
    dx: &mut [f32],
    accumulate: bool,
) {
    // Two parameters' gradients at once: take the bias's out for the call.
    let mut db = bi.map(|i| std::mem::take(&mut grads[i]));
    layer_norm_backward_rows(
        x,
        w[wi],
        dy,
        stats,
        dx,
        accumulate,
        &mut grads[wi],
        db.as_deref_mut(),
    );
    if let (Some(i), Some(db)) = (bi, db) {
        grads[i] = db;
    }
}

/// `d = d · gelu'(h)` element-wise, in place.
fn gelu_grad_in_place(h: &[f32], d: &mut [f32]) {
    // gelu_grad_rows reads dy and writes dx: chunk by chunk through a small stack buffer.
    let mut tmp = [0f32; 256];
    for (hc, dc) in h.chunks(256).zip(d.chunks_mut(256)) {
        let t = &mut tmp[..dc.len()];
        t.copy_from_slice(dc);
        gelu_grad_rows(hc, t, dc);
    }
}

/// Cross-entropy of rows of `v` logits against `targets`, in place: returns `Σ nll` over the
/// rows and leaves `(softmax − onehot) · scale` in `logits` (the loss's gradient for
/// `scale = 1 / rows`). Rows' nll summed in f64, in order, as [`super::layers::cross_entropy`].
fn cross_entropy_in_place(logits: &mut [f32], targets: &[u32], v: usize, scale: f32) -> f32 {
    let mut total = 0f64;
    for (row, &tgt) in logits.chunks_exact_mut(v).zip(targets) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z));
        let picked = row[tgt as usize] - max;
        for z in row.iter_mut() {
            *z = exp(*z - max);
        }
        let s = sum(row);
        total += (s.ln() - picked) as f64;
        let k = scale / s;
        for z in row.iter_mut() {
            *z *= k;
        }
        row[tgt as usize] -= scale;
    }
    total as f32
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use super::*;
    use crate::model::{cross_entropy, Gpt};

    fn cfg(bias: bool) -> GptConfig {
        GptConfig {
            vocab_size: 13,
            block_size: 8,
            n_layer: 2,
            n_head: 2,
            n_embd: 16,
            dropout: 0.0,
            bias,
            ..Default::default()
        }
    }

    /// A model whose every parameter (biases and LayerNorm gains included) is random, so that
    /// no gradient is trivially zero.
    fn model(cfg: &GptConfig, seed: u64) -> (Gpt, Vec<(String, Var)>) {
        let m = Gpt::init(cfg, seed, &Device::Cpu).unwrap();
        let params = m.vars().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (_, p) in &params {
            let v: Vec<f32> = (0..p.elem_count())
                .map(|_| rng.random_range(-0.5..0.5))
                .collect();
            p.set(&Tensor::from_vec(v, p.dims(), &Device::Cpu).unwrap())
                .unwrap();
        }
        (m, params)
    }

    fn batch(cfg: &GptConfig, b: usize, t: usize, seed: u64) -> (Vec<u32>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut draw = || {
            (0..b * t)
                .map(|_| rng.random_range(0..cfg.vocab_size as u32))
                .collect()
        };
        (draw(), draw())
    }

    /// candle's autograd on the same batch: the loss and every parameter's gradient.
    fn autograd(
        m: &Gpt,
        params: &[(String, Var)],
        ids: &[u32],
        tgt: &[u32],
        (b, t): (usize, usize),
    ) -> (f32, Vec<Vec<f32>>) {
        let x = Tensor::from_vec(ids.to_vec(), (b, t), &Device::Cpu).unwrap();
        let y = Tensor::from_vec(tgt.to_vec(), b * t, &Device::Cpu).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let logits = m.forward_train(&x, &mut rng).unwrap();
        let v = m.config().vocab_size;
        let loss = cross_entropy(&logits.reshape((b * t, v)).unwrap(), &y, None).unwrap();
        let store = loss.backward().unwrap();
        let grads = params
            .iter()
            .map(|(n, p)| {
                let g = store
                    .get(p.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {n}"));
                g.flatten_all().unwrap().to_vec1::<f32>().unwrap()
            })
            .collect();
        (loss.to_scalar::<f32>().unwrap(), grads)
    }

    /// max |a − b| over max |b|: the error relative to the tensor's scale.
    fn rel_err(a: &[f32], b: &[f32]) -> f32 {
        let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        diff / scale.max(f32::MIN_POSITIVE)
    }

    #[test]
    fn gradients_equal_autograds_for_every_parameter() {
        for bias in [false, true] {
            let cfg = cfg(bias);
            let (m, params) = model(&cfg, 7);
            // T below block_size too: the position embedding's later rows get no gradient.
            for (b, t) in [(3, 8), (2, 5)] {
                let (ids, tgt) = batch(&cfg, b, t, 11);
                let (want_loss, want) = autograd(&m, &params, &ids, &tgt, (b, t));
                let mut step = Gpt2Step::new(&cfg, &params, b, t).unwrap();
                let loss = step.forward_backward(&params, &ids, &tgt, 1.0).unwrap();
                assert!(
                    (loss - want_loss).abs() <= 1e-6 * want_loss.abs(),
                    "{loss} vs {want_loss}"
                );
                for (((name, _), got), want) in params.iter().zip(step.grads()).zip(&want) {
                    let err = rel_err(got, want);
                    assert!(
                        err <= 1e-5,
                        "bias {bias}, ({b}, {t}): `{name}` off by {err:e}"
                    );
                    assert!(
                        want.iter().any(|&g| g != 0.0),
                        "`{name}` has no gradient to compare"
                    );
                }
            }
        }
    }

    #[test]
    fn micro_batches_accumulate_in_place() {
        let cfg = cfg(true);
        let (m, params) = model(&cfg, 3);
        let (b, t) = (2, 8);
        let (ids_1, tgt_1) = batch(&cfg, b, t, 1);
        let (ids_2, tgt_2) = batch(&cfg, b, t, 2);
        let (_, g1) = autograd(&m, &params, &ids_1, &tgt_1, (b, t));
        let (_, g2) = autograd(&m, &params, &ids_2, &tgt_2, (b, t));
        let mut step = Gpt2Step::new(&cfg, &params, b, t).unwrap();
        // A stale gradient first: zero_grads must clear it.
        step.forward_backward(&params, &ids_2, &tgt_2, 1.0).unwrap();
        step.zero_grads();
        step.forward_backward(&params, &ids_1, &tgt_1, 0.5).unwrap();
        step.forward_backward(&params, &ids_2, &tgt_2, 0.5).unwrap();
        for (((name, _), got), (a, b)) in params.iter().zip(step.grads()).zip(g1.iter().zip(&g2)) {
            let want: Vec<f32> = a.iter().zip(b).map(|(x, y)| 0.5 * x + 0.5 * y).collect();
            let err = rel_err(got, &want);
            assert!(err <= 1e-5, "`{name}` off by {err:e}");
        }
    }

    /// Two and three shards (rows dealt 2 + 1, 1 + 1 + 1) give the whole batch's loss and
    /// gradients, also accumulated over two micro-batches after a stale one is zeroed.
    #[test]
    fn shards_give_the_whole_batchs_loss_and_gradients() {
        let cfg = cfg(true);
        let (_, params) = model(&cfg, 5);
        let (b, t) = (3, 8);
        let (ids_1, tgt_1) = batch(&cfg, b, t, 3);
        let (ids_2, tgt_2) = batch(&cfg, b, t, 4);
        let mut whole = Gpt2Step::new(&cfg, &params, b, t).unwrap();
        let want_loss = whole
            .forward_backward(&params, &ids_1, &tgt_1, 0.5)
            .unwrap();
        whole
            .forward_backward(&params, &ids_2, &tgt_2, 0.5)
            .unwrap();
        for shards in [2, 3] {
            let mut step = ShardedStep::new(&cfg, &params, b, t, shards).unwrap();
            assert_eq!(step.rows.len(), shards);
            step.forward_backward(&params, &ids_2, &tgt_2, 1.0).unwrap();
            step.zero_grads();
            let loss = step.forward_backward(&params, &ids_1, &tgt_1, 0.5).unwrap();
            step.forward_backward(&params, &ids_2, &tgt_2, 0.5).unwrap();
            assert!(
                (loss - want_loss).abs() <= 1e-6 * want_loss,
                "{loss} vs {want_loss}"
            );
            for (((name, _), got), want) in params.iter().zip(step.grads()).zip(whole.grads()) {
                let err = rel_err(got, want);
                assert!(err <= 1e-6, "{shards} shards: `{name}` off by {err:e}");
            }
            assert!(step
                .forward_backward(&params, &ids_1[1..], &tgt_1, 1.0)
                .is_err());
            // The forward alone: the same loss, the gradients untouched.
            let before = step.grads().to_vec();
            let eval = step.loss(&params, &ids_1, &tgt_1).unwrap();
            assert!(
                (eval - want_loss).abs() <= 1e-6 * want_loss,
                "{eval} vs {want_loss}"
            );
            assert_eq!(step.grads(), &before[..]);
        }
        assert_eq!(ShardedStep::shards_for(1 << 20, 12, 2), 2);
        assert_eq!(ShardedStep::shards_for(1 << 20, 1, 2), 1);
        assert_eq!(ShardedStep::shards_for(100 << 20, 12, 2), 1);
    }

    #[test]
    fn refuses_what_it_does_not_cover_and_bad_ids() {
        let cfg = cfg(false);
        let (_, params) = model(&cfg, 1);
        let dropout = GptConfig {
            dropout: 0.1,
            ..cfg.clone()
        };
        assert!(Gpt2Step::new(&dropout, &params, 2, 8).is_err());
        assert!(
            Gpt2Step::new(&cfg, &params, 2, 9).is_err(),
            "T past block_size"
        );
        assert!(
            Gpt2Step::new(&cfg, &params[1..], 2, 8).is_err(),
            "a missing parameter"
        );
        let mut step = Gpt2Step::new(&cfg, &params, 1, 4).unwrap();
        let err = step
            .forward_backward(&params, &[0, 1, 2, 13], &[0; 4], 1.0)
            .unwrap_err();
        assert!(err.to_string().contains("token id 13"), "{err}");
        assert!(step
            .forward_backward(&params, &[0; 3], &[0; 3], 1.0)
            .is_err());
    }
}
