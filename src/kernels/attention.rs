//! Causal self-attention: `softmax(q kᵀ · scale + causal mask) v`, two ways.
//!
//! - [`causal_attention_reference`] writes it with plain candle ops: a matmul, an additive
//!   `-inf` mask, softmax from primitives (in f32), a matmul. It materialises the
//!   `(B, nh, Tq, Tk)` score matrix, runs on every device and dtype, and is the reference the
//!   fused op is tested against.
//! - [`causal_attention`] is the one the model calls. On the CPU in f32 it runs a fused
//!   kernel with a forward *and* a backward pass, written after FlashAttention-2 (Dao 2023,
//!   "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
//!   arXiv:2307.08691, Algorithms 1 and 2) and adapted to a CPU; elsewhere (CUDA, f16, bf16)
//!   it falls back to the reference path. That fallback *is* the CUDA path for now: a CUDA
//!   kernel needs a GPU to be tested on, and cuBLAS matmuls already do the heavy lifting there.
//!
//! # The fused CPU kernel
//!
//! Work is split over the `B · nh` heads on candle's CPU thread pool (problems too small to
//! repay the hand-off run on the calling thread). Within a head:
//!
//! - **Forward** (FA2 Algorithm 1): queries in blocks of `BR` = 64 rows, keys in blocks of
//!   `BC` = 64. For each query block the key blocks are visited in order, keeping per row a
//!   running maximum `m` and sum `l` of the exponentials and an unnormalised output
//!   accumulator, rescaled by `exp(m_old - m_new)` when the maximum grows (the *online
//!   softmax*). Key blocks wholly in the causal future are never visited; a block straddling
//!   the diagonal is masked row by row. The `Tq × Tk` scores never exist at once, only one
//!   `BR × BC` tile. Each row's log-sum-exp `LSE = m + ln l` is kept for the backward pass.
//!   A few queries (`Tq <= 4`, KV-cache decoding) go row by row instead: dot products, an
//!   exact softmax over the row, `P V`.
//! - **Backward** (FA2 Algorithm 2): `D_i = rowsum(dO_i ∘ O_i)`; then key blocks outer and
//!   query blocks inner, recomputing `P_ij = exp(S_ij − LSE_i)` from the saved LSE, and
//!   `dV_j += P_ijᵀ dO_i`, `dP_ij = dO_i V_jᵀ`, `dS_ij = P_ij ∘ (dP_ij − D_i)`,
//!   `dQ_i += dS_ij K_j · scale`, `dK_j += dS_ijᵀ Q_i · scale`. A head belongs to one
//!   thread, so `dQ` is accumulated without atomics.
//!
//! The LSE is *stashed*, not recomputed: candle's [`CustomOp3::bwd`] sees only the inputs,
//! the output and its gradient, so the op instance — created afresh by every call and owned
//! by the graph node of that call's output — keeps the `B · nh · Tq` floats that its forward
//! computed in a [`OnceLock`]. Recomputing them would cost one more `Q Kᵀ` pass, a fifth of
//! the backward's matmul work, to save 4 bytes per query row.
//!
//! All tile products are one small matmul kernel (`C (+)= A · B`, `B` row-major, `A` either
//! way round) whose `4 × 64` register tile the compiler vectorises. The one operand it would
//! read along a column, `Kᵀ` (and `Vᵀ` in `dP = dO Vᵀ`), is first transposed into `hs × 64`
//! panels, so every inner loop reads contiguous memory. Blocks on the causal diagonal are
//! split into groups of 16 rows (keys) that each compute only as far as the mask lets them
//! see, which skips most of the masked half. The kernels are compiled three times —
//! AVX-512, AVX2+FMA and plain — and the best one the CPU supports is picked at run time.
//! `exp` is a polynomial that vectorises (Cephes' `expf`, relative error below 2e-7).
//!
//! Threads come from candle's CPU thread pool, as for candle's own ops: set
//! `CANDLE_NUM_THREADS` (or `RAYON_NUM_THREADS`, which candle also reads) to choose how many.
//! With `CANDLE_NUM_THREADS=1` (the examples' setting), a call from a rayon worker (the
//! trainer's steps) splits the heads over rayon's pool instead.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use candle_core::utils::barrier_pool;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor};

use crate::model::softmax_last_dim;
use crate::{Error, Result};

/// Query rows per block of the fused kernel.
const BR: usize = 64;
/// Keys per block of the fused kernel.
const BC: usize = 64;
/// Rows (forward) or keys (backward) per group when a block on the causal diagonal is split so
/// as to skip most of its masked half.
const GROUP: usize = 16;
/// Up to this many queries the forward goes row by row ([`forward_rows`]) rather than in tiles.
const ROWWISE_MAX_TQ: usize = 4;
/// Below this many multiply-adds (`B · nh · Tq · Tk · hs`) the fused op runs on the calling
/// thread: handing heads to the thread pool costs more than it saves. Measured on an idle
/// 2-core machine: one-token decoding against 64 cached keys (nh 12, 49k) takes 5 µs on one
/// thread and 7 µs on two, against 128 keys (98k) 9 µs either way, against 256 (197k) 20 µs
/// on one and 13 µs on two; fwd+bwd at B 1, nh 2, T 32 (131k) 19 µs and 22 µs, at nh 4
/// (262k) 35 µs either way, at T 64 (524k) 43 µs and 39 µs.
const PARALLEL_MIN_WORK: usize = 1 << 17;

/// From this much work (query heads × positions × head size) a decoding step's heads split
/// over the threads ([`decode_rows`]). Lower than [`PARALLEL_MIN_WORK`]: the other thread is
/// awake between the step's matrix-vector products anyway. GPT-2 124M decoding 128 f16
/// tokens on 2 cores: the attention took 0.38 ms of a 6.6 ms step on one thread, 0.20–0.27
/// ms split (12 heads from 22 positions on).
const DECODE_PARALLEL_MIN_WORK: usize = 1 << 14;
/// With grouped-query attention, the parallel backward gives each thread a whole group of
/// query heads (one kv head's `dK`, `dV` are then accumulated by one thread) unless that
/// makes fewer than this many pieces of work; then the groups are split (see
/// [`Dims::kv_parts`]).
const BWD_MIN_ITEMS: usize = 8;

/// Causal self-attention, `softmax(q kᵀ · scale + causal mask) v`, with multi-head (MHA),
/// grouped-query (GQA) or multi-query (MQA) heads.
///
/// Shapes: `q` is `(B, nh, Tq, hs)`, `k` and `v` are `(B, nkv, Tk, hs)` with `nkv` dividing
/// `nh` and `Tq <= Tk`. With `nkv < nh` this is grouped-query attention (Ainslie et al. 2023,
/// "GQA: Training Generalized Multi-Query Transformer Models from Multi-Head Checkpoints",
/// arXiv:2305.13245): the query heads come in `nkv` groups of `g = nh / nkv`, and query head
/// `h` attends with key/value head `h / g`, i.e. kv head `j` serves query heads
/// `j·g..(j + 1)·g` — Hugging Face's `repeat_kv` ([`repeat_kv`]). `nkv = nh` is ordinary
/// multi-head attention, `nkv = 1` multi-query attention. Query `i` sits at absolute position
/// `Tk - Tq + i` and sees keys `0..=Tk - Tq + i`, so training passes `Tq = Tk` and KV-cache
/// decoding passes the new queries against every cached key (often `Tq = 1`). Returns
/// `(B, nh, Tq, hs)` in the dtype of the inputs. `scale` is usually `1 / sqrt(hs)`.
///
/// Differentiable with respect to `q`, `k` and `v`; the gradient of a shared kv head is the sum
/// over the query heads of its group. On the CPU with f32 inputs this is the fused
/// FlashAttention-2 style op of this module (see the [module docs](self)), which reads each
/// group's kv head where it lies (K and V are never repeated); inputs that are not contiguous
/// are copied first, except `k` and `v` that are a prefix along T of a contiguous
/// `(B, nkv, capacity, hs)` buffer (a preallocated KV cache), which are read in place. On other
/// devices (CUDA) or dtypes (f16, bf16) it is [`causal_attention_reference`].
///
/// ```
/// use tinygpt::attention::causal_attention;
/// use tinygpt::candle::{DType, Device, Tensor};
///
/// // q = 0: every key a query sees scores the same, so output row i is the mean of v[0..=i].
/// let v = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((1, 1, 3, 2))?; // (B, nkv, T, hs)
/// let q = Tensor::zeros((1, 2, 3, 2), DType::F32, &Device::Cpu)?; // (B, nh, T, hs), nh = 2
/// let y = causal_attention(&q, &v, &v, 1.0 / 2f64.sqrt())?; // (1, 2, 3, 2)
/// let y = y.squeeze(0)?.to_vec3::<f32>()?;
/// assert_eq!(y[0], [[0.0, 1.0], [1.0, 2.0], [2.0, 3.0]]);
/// assert_eq!(y[1], y[0]); // both query heads read the one kv head
/// # Ok::<(), tinygpt::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidArgument`] if a tensor is not 4-D, the shapes disagree (batch, head size,
/// `nkv` not dividing `nh`, `k` and `v` not alike), `Tq > Tk` or the dtypes differ;
/// [`Error::Candle`] if a tensor operation fails (e.g. mixed devices).
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    check_shapes(q, k, v)?;
    let fused = matches!(q.device(), Device::Cpu)
        && matches!(k.device(), Device::Cpu)
        && matches!(v.device(), Device::Cpu)
        && q.dtype() == DType::F32;
    if !fused {
        return causal_attention_reference(q, k, v, scale);
    }
    // K and V may be a prefix of a preallocated KV cache (`narrow` along T of a contiguous
    // `(B, nkv, capacity, hs)` buffer): the kernel reads those in place.
    let q = q.contiguous()?;
    let keep = |t: &Tensor| -> Result<Tensor> {
        Ok(if head_strided(t.layout()).is_some() {
            t.clone()
        } else {
            t.contiguous()?
        })
    };
    let (k, v) = (keep(k)?, keep(v)?);
    let op = FusedCausalAttention {
        scale: scale as f32,
        lse: OnceLock::new(),
    };
    Ok(q.apply_op3(&k, &v, op)?)
}

/// Causal multi-head self-attention straight from the fused projection `c_attn`'s output:
/// [`causal_attention_gqa_qkv`] with `n_kv_head = n_head`. `qkv` (B, T, 3C) holds q, k and v
/// side by side along the last axis, each split into `n_head` heads of `hs = C / n_head`
/// columns; returns the heads' outputs re-assembled, (B, T, C), ready for `c_proj`.
///
/// # Errors
/// [`Error::InvalidArgument`] if `qkv` is not (B, T, 3C) with `C` a multiple of `n_head`;
/// [`Error::Candle`] if a tensor operation fails.
pub fn causal_attention_qkv(qkv: &Tensor, n_head: usize, scale: f64) -> Result<Tensor> {
    causal_attention_gqa_qkv(qkv, n_head, n_head, scale)
}

/// Causal self-attention with grouped-query heads straight from a fused q/k/v projection's
/// output, as a training step uses it.
///
/// `qkv` is `(B, T, (n_head + 2·n_kv_head)·hs)`, laid out `[q heads | k heads | v heads]`
/// along the last axis with each head's `hs` values contiguous: `n_head` query heads, then
/// `n_kv_head` key heads, then `n_kv_head` value heads. `hs` is inferred from the last
/// dimension, so it need not be `n_embd / n_head` (Qwen3 sets an explicit head size). Query
/// head `h` attends with kv head `h / (n_head / n_kv_head)`, as in [`causal_attention`] (GQA,
/// Ainslie et al. 2023); `n_kv_head = n_head` is multi-head attention
/// ([`causal_attention_qkv`]). Query `t` sees keys `0..=t`. Returns the heads' outputs
/// re-assembled, `(B, T, n_head·hs)`, ready for the output projection.
///
/// This is [`causal_attention`] with the head split and merge inside the op. On the CPU in
/// f32 it is one node of the autograd graph whose backward gives d`qkv` directly: the split
/// (three `narrow`s, `reshape`s, `transpose`s and copies) and the merge would otherwise be a
/// dozen nodes, and candle's backward of each allocates a zeroed gradient and adds into it
/// (the backward of a `narrow` also pads with zeros to the full width). Elsewhere (CUDA,
/// f16) it is exactly that split, [`causal_attention_reference`] and the merge.
///
/// # Errors
/// [`Error::InvalidArgument`] if `qkv` is not 3-D, `n_kv_head` is 0 or does not divide
/// `n_head`, or the last dimension is not a multiple of `n_head + 2·n_kv_head`;
/// [`Error::Candle`] if a tensor operation fails.
pub fn causal_attention_gqa_qkv(
    qkv: &Tensor,
    n_head: usize,
    n_kv_head: usize,
    scale: f64,
) -> Result<Tensor> {
    let (b, t, width) = qkv.dims3().map_err(|_| {
        Error::InvalidArgument(format!(
            "attention: qkv must be (B, T, (n_head + 2·n_kv_head)·hs), got shape {:?}",
            qkv.dims()
        ))
    })?;
    if n_kv_head == 0 || !n_head.is_multiple_of(n_kv_head) {
        return Err(Error::InvalidArgument(format!(
            "attention: n_kv_head ({n_kv_head}) must be at least 1 and divide n_head ({n_head})"
        )));
    }
    let heads = n_head + 2 * n_kv_head;
    if !width.is_multiple_of(heads) {
        return Err(Error::InvalidArgument(format!(
            "attention: qkv's last dimension {width} is not (n_head ({n_head}) + 2 · n_kv_head \
             ({n_kv_head})) · head size"
        )));
    }
    let hs = width / heads;
    if !(qkv.device().is_cpu() && qkv.dtype() == DType::F32) || qkv.elem_count() == 0 {
        let split = |col: usize, n: usize| -> Result<Tensor> {
            Ok(qkv
                .narrow(2, col * hs, n * hs)? // (B, T, n·hs)
                .reshape((b, t, n, hs))? // (B, T, n, hs)
                .transpose(1, 2)? // (B, n, T, hs)
                .contiguous()?)
        };
        let q = split(0, n_head)?;
        let k = split(n_head, n_kv_head)?;
        let v = split(n_head + n_kv_head, n_kv_head)?;
        let y = causal_attention_reference(&q, &k, &v, scale)?;
        return Ok(y.transpose(1, 2)?.reshape((b, t, n_head * hs))?); // (B, T, nh·hs)
    }
    let op = FusedQkvAttention {
        n_head,
        n_kv_head,
        scale: scale as f32,
        saved: OnceLock::new(),
    };
    Ok(qkv.contiguous()?.apply_op1(op)?)
}

/// Causal self-attention with plain candle ops: the reference for [`causal_attention`], and
/// its path on devices and dtypes the fused op does not cover.
///
/// Same contract as [`causal_attention`]: `q` `(B, nh, Tq, hs)`, `k`, `v` `(B, nkv, Tk, hs)`
/// with `nkv` dividing `nh`, `Tq <= Tk`, query `i` at absolute position `Tk - Tq + i`; returns
/// `(B, nh, Tq, hs)` in the inputs' dtype. Grouped-query heads (`nkv < nh`) are expanded with
/// [`repeat_kv`] first, so the gradient of a shared kv head is the sum over its group by
/// autograd. The scores are masked and softmaxed in f32 whatever the dtype. It builds the
/// whole `(B, nh, Tq, Tk)` score matrix, so it needs `O(Tq · Tk)` memory per head.
///
/// # Errors
/// As [`causal_attention`].
pub fn causal_attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (_, nh, nkv, ..) = check_shapes(q, k, v)?;
    let (k, v) = (repeat_kv(k, nh / nkv)?, repeat_kv(v, nh / nkv)?);
    let att = attention_probs(q, &k, scale)?; // (B, nh, Tq, Tk)
    Ok(att.matmul(&v.contiguous()?)?) // (B, nh, Tq, hs)
}

/// Grouped-query attention's key/value expansion, as Hugging Face's `repeat_kv`:
/// `(B, nkv, T, hs)` → `(B, nkv·n_rep, T, hs)`, kv head `j` repeated as heads
/// `j·n_rep..(j + 1)·n_rep`. Plain ops (differentiable: the gradient of head `j` is the sum
/// over its copies); `n_rep = 1` returns `x` itself.
///
/// # Errors
/// [`Error::InvalidArgument`] if `x` is not 4-D or `n_rep` is 0; [`Error::Candle`] if a
/// tensor operation fails.
pub(crate) fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    let (b, nkv, t, hs) = x.dims4().map_err(|_| {
        Error::InvalidArgument(format!(
            "attention: repeat_kv needs (B, nkv, T, hs), got shape {:?}",
            x.dims()
        ))
    })?;
    match n_rep {
        0 => Err(Error::InvalidArgument(
            "attention: repeat_kv needs n_rep >= 1".into(),
        )),
        1 => Ok(x.clone()),
        _ => Ok(x
            .unsqueeze(2)? // (B, nkv, 1, T, hs)
            .broadcast_as((b, nkv, n_rep, t, hs))?
            .reshape((b, nkv * n_rep, t, hs))?),
    }
}

/// The attention weights `softmax(q kᵀ · scale + causal mask)`, (B, nh, Tq, Tk), in the dtype
/// of `q` (masked and softmaxed in f32). `k` must have `nh` heads: with grouped-query
/// attention pass [`repeat_kv`]`(k, nh / nkv)` (and multiply by `repeat_kv(v, ..)`). The model
/// applies attention dropout to these when training with dropout, which the fused op does not
/// do.
pub(crate) fn attention_probs(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    let (tq, tk) = (q.dim(2)?, k.dim(2)?);
    let (q, k) = (q.contiguous()?, k.contiguous()?);
    let att = q.matmul(&k.t()?)?.to_dtype(DType::F32)?; // (B, nh, Tq, Tk)
    let att = (att * scale)?.broadcast_add(&causal_mask(tq, tk, q.device())?)?;
    Ok(softmax_last_dim(&att)?.to_dtype(q.dtype())?)
}

/// Checks the shapes and dtypes of `q`, `k`, `v`; returns `(B, nh, nkv, Tq, Tk, hs)`.
fn check_shapes(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(usize, usize, usize, usize, usize, usize)> {
    let dims4 = |t: &Tensor, name: &str| {
        t.dims4().map_err(|_| {
            Error::InvalidArgument(format!(
                "attention: {name} must be 4-D (B, nh, T, hs), got shape {:?}",
                t.dims()
            ))
        })
    };
    let (b, nh, tq, hs) = dims4(q, "q")?;
    let (kb, nkv, tk, khs) = dims4(k, "k")?;
    if (kb, khs) != (b, hs) || v.dims() != k.dims() {
        return Err(Error::InvalidArgument(format!(
            "attention: q {:?}, k {:?} and v {:?} must be (B, nh, Tq, hs), (B, nkv, Tk, hs) and \
             (B, nkv, Tk, hs)",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if nkv == 0 || !nh.is_multiple_of(nkv) {
        return Err(Error::InvalidArgument(format!(
            "attention: k and v have {nkv} heads, which must divide q's {nh} heads (grouped-query \
             attention)"
        )));
    }
    if tq > tk {
        return Err(Error::InvalidArgument(format!(
            "attention: {tq} queries but only {tk} keys; Tq must be at most Tk"
        )));
    }
    if k.dtype() != q.dtype() || v.dtype() != q.dtype() {
        return Err(Error::InvalidArgument(format!(
            "attention: q, k and v must share a dtype, got {:?}, {:?} and {:?}",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )));
    }
    Ok((b, nh, nkv, tq, tk, hs))
}

/// Additive mask (Tq, Tk) in f32: 0 where query `i` (absolute position `Tk - Tq + i`) may see
/// key `j`, `-inf` where `j` lies in its future.
fn causal_mask(tq: usize, tk: usize, device: &Device) -> Result<Tensor> {
    let past = tk - tq;
    let mask: Vec<f32> = (0..tq)
        .flat_map(|i| (0..tk).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Tensor::from_vec(mask, (tq, tk), device)?)
}

// ---------------------------------------------------------------------------------------------
// The candle op
// ---------------------------------------------------------------------------------------------

/// The fused op over `(q, k, v)`. One instance per call: it stashes that call's LSE.
struct FusedCausalAttention {
    scale: f32,
    /// Per query row `m + ln l`, `(B · nh · Tq)` floats, set by `cpu_fwd`, read by `bwd`.
    lse: OnceLock<Vec<f32>>,
}

/// Sizes of one call: `heads = B · nh` query heads, in groups of `group = nh / nkv` that share
/// one key/value head: query head `h` (counted over the batch too) reads kv head `h / group`.
#[derive(Debug, Clone, Copy)]
struct Dims {
    heads: usize,
    group: usize,
    tq: usize,
    tk: usize,
    hs: usize,
    scale: f32,
}

impl Dims {
    /// Keys before the first query: query `i` sits at position `past + i`.
    fn past(&self) -> usize {
        self.tk - self.tq
    }

    fn parallel(&self) -> bool {
        self.heads > 1
            && self.heads * self.tq * self.tk * self.hs >= PARALLEL_MIN_WORK
            && !super::is_serial()
    }

    /// Key/value heads, `B · nkv`.
    fn kv_heads(&self) -> usize {
        self.heads / self.group
    }

    /// Into how many parts the backward splits each group of query heads (a divisor of
    /// `group`): 1, a whole group to one thread, unless that leaves fewer than
    /// [`BWD_MIN_ITEMS`] pieces of work for a parallel call. Each part accumulates its own
    /// `dK`, `dV`, summed afterwards in a fixed order, so the result depends on the shape only,
    /// never on the threads.
    fn kv_parts(&self) -> usize {
        if self.group == 1 || !self.parallel() {
            return 1;
        }
        let kv_heads = self.kv_heads();
        (1..=self.group)
            .find(|&s| self.group.is_multiple_of(s) && kv_heads * s >= BWD_MIN_ITEMS)
            .unwrap_or(self.group)
    }

    fn from_layouts(q: &Layout, k: &Layout, scale: f32) -> candle_core::Result<Self> {
        let (b, nh, tq, hs) = q.shape().dims4()?;
        let (_, nkv, tk, _) = k.shape().dims4()?;
        if nkv == 0 || !nh.is_multiple_of(nkv) {
            candle_core::bail!("fused attention: {nkv} kv heads do not divide {nh} query heads");
        }
        Ok(Self {
            heads: b * nh,
            group: nh / nkv,
            tq,
            tk,
            hs,
            scale,
        })
    }
}

/// The f32 data of a contiguous CPU tensor.
fn cpu_f32<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> candle_core::Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused attention: {name} must be contiguous"),
    }
}

/// For a `(B, nh, T, hs)` layout whose heads are each a contiguous `T × hs` block, evenly
/// spaced (contiguous, or a prefix along T of a contiguous `(B, nh, capacity, hs)` buffer):
/// the start offset and the distance between heads, in elements.
fn head_strided(l: &Layout) -> Option<(usize, usize)> {
    let (_, nh, t, hs) = l.shape().dims4().ok()?;
    let st = l.stride();
    if l.is_contiguous() {
        return Some((l.start_offset(), t * hs));
    }
    let head = st[1];
    let ok = st[3] == 1 && st[2] == hs && head >= t * hs && st[0] == nh * head;
    ok.then_some((l.start_offset(), head))
}

/// The f32 data of a head-strided CPU tensor (see [`head_strided`]): the slice from its first
/// element, and the distance between heads.
fn cpu_f32_heads<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    name: &str,
) -> candle_core::Result<(&'a [f32], usize)> {
    let data = s.as_slice::<f32>()?;
    match head_strided(l) {
        Some((start, stride)) if start <= data.len() => Ok((&data[start..], stride)),
        _ => candle_core::bail!("fused attention: {name} must be contiguous per head"),
    }
}

impl CustomOp3 for FusedCausalAttention {
    fn name(&self) -> &'static str {
        "tinygpt-fused-causal-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = Dims::from_layouts(l1, l2, self.scale)?;
        let q = cpu_f32(s1, l1, "q")?;
        let k = cpu_f32_heads(s2, l2, "k")?;
        let v = cpu_f32_heads(s3, l3, "v")?;
        let (out, lse) = forward(Isa::detect(), q, k, v, d);
        // A fresh op per call, so the cell is empty; were it not, the first LSE stands.
        let _ = self.lse.set(lse);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Some(lse) = self.lse.get() else {
            candle_core::bail!("fused attention: backward before forward")
        };
        let grad_res = grad_res.contiguous()?;
        // K and V may have been read in place from a wider buffer; the backward wants them
        // contiguous (training never passes a KV cache, so this copies nothing there).
        let (k, v) = (&k.contiguous()?, &v.contiguous()?);
        let d = Dims::from_layouts(q.layout(), k.layout(), self.scale)?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (os, ol) = res.storage_and_layout();
        let (gs, gl) = grad_res.storage_and_layout();
        let (dq, dk, dv) = match (&*qs, &*ks, &*vs, &*os, &*gs) {
            (
                Storage::Cpu(qs),
                Storage::Cpu(ks),
                Storage::Cpu(vs),
                Storage::Cpu(os),
                Storage::Cpu(gs),
            ) => backward(
                Isa::detect(),
                BwdInputs {
                    q: cpu_f32(qs, ql, "q")?,
                    k: cpu_f32(ks, kl, "k")?,
                    v: cpu_f32(vs, vl, "v")?,
                    o: cpu_f32(os, ol, "output")?,
                    d_o: cpu_f32(gs, gl, "output gradient")?,
                    lse,
                },
                d,
            ),
            _ => candle_core::bail!("fused attention: backward needs CPU tensors"),
        };
        let dq = Tensor::from_vec(dq, q.shape(), q.device())?;
        let dk = Tensor::from_vec(dk, k.shape(), k.device())?;
        let dv = Tensor::from_vec(dv, v.shape(), v.device())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The fused op over `qkv` (B, T, (nh + 2·nkv)·hs) → (B, T, nh·hs). One instance per call: it
/// keeps what its forward computed for the backward.
struct FusedQkvAttention {
    n_head: usize,
    n_kv_head: usize,
    scale: f32,
    /// Head-major `q`, `o` `(B · nh, T, hs)`, `k`, `v` `(B · nkv, T, hs)` and the LSE, set by
    /// `cpu_fwd`.
    saved: OnceLock<QkvSaved>,
}

/// What [`FusedQkvAttention`]'s forward (and [`qkv_attention_forward`]) keeps for the
/// backward: head-major `q`, `o` `(B · nh, T, hs)`, `k`, `v` `(B · nkv, T, hs)`, and the LSE
/// `(B · nh, T)`. Empty by default; [`qkv_attention_forward`] fills one in place, reusing
/// its vectors from the last call.
#[derive(Default)]
pub(crate) struct QkvSaved {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    o: Vec<f32>,
    lse: Vec<f32>,
}

/// The backward's own head-major buffers (`dO`, `dQ`, `dK`, `dV`), kept by a caller that runs
/// [`qkv_attention_backward`] again and again so that no call allocates them anew.
#[derive(Default)]
pub(crate) struct QkvBackwardBuffers {
    d_o: Vec<f32>,
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
}

/// `v` resized to `len` zeros, its allocation kept when large enough.
fn zeroed(v: &mut Vec<f32>, len: usize) {
    v.clear();
    v.resize(len, 0.0);
}

/// Sizes of a `qkv` (B, T, (nh + 2·nkv)·hs) split into `nh` query heads and `nkv` key and
/// value heads.
#[derive(Debug, Clone, Copy)]
struct QkvDims {
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hs: usize,
}

impl QkvDims {
    fn new(shape: &Shape, nh: usize, nkv: usize) -> candle_core::Result<Self> {
        let (b, t, width) = shape.dims3()?;
        Self::of(b, t, width, nh, nkv)
    }

    fn of(b: usize, t: usize, width: usize, nh: usize, nkv: usize) -> candle_core::Result<Self> {
        let heads = nh + 2 * nkv;
        if nkv == 0 || !nh.is_multiple_of(nkv) || !width.is_multiple_of(heads) {
            candle_core::bail!("fused attention: qkv width {width} for {nh} + 2·{nkv} heads");
        }
        Ok(Self {
            b,
            t,
            nh,
            nkv,
            hs: width / heads,
        })
    }

    /// Width of the packed input, `(nh + 2·nkv)·hs`.
    fn width(&self) -> usize {
        (self.nh + 2 * self.nkv) * self.hs
    }

    /// Calls `f(head-major offset, row-major offset)` for each `hs`-long row of each of `n`
    /// heads: head `h` of sequence `i`, position `j` lies at `((i·n + h)·T + j)·hs` head-major
    /// and at `(i·T + j)·width + h·hs` in a row-major (B, T, width) tensor.
    fn rows(&self, width: usize, n: usize, mut f: impl FnMut(usize, usize)) {
        for i in 0..self.b {
            for h in 0..n {
                for j in 0..self.t {
                    f(
                        ((i * n + h) * self.t + j) * self.hs,
                        (i * self.t + j) * width + h * self.hs,
                    );
                }
            }
        }
    }

    /// Head-major copy of the `n` heads at column `col` of a (B, T, width) tensor, into `out`
    /// (resized; every element written).
    fn gather_into(&self, x: &[f32], width: usize, col: usize, n: usize, out: &mut Vec<f32>) {
        let hs = self.hs;
        out.resize(self.b * self.t * n * hs, 0.0);
        self.rows(width, n, |hm, rm| {
            out[hm..hm + hs].copy_from_slice(&x[rm + col..rm + col + hs])
        });
    }

    /// Writes `n` head-major heads `x` at column `col` of `out` (B, T, width).
    fn scatter(&self, x: &[f32], out: &mut [f32], width: usize, col: usize, n: usize) {
        let hs = self.hs;
        self.rows(width, n, |hm, rm| {
            out[rm + col..rm + col + hs].copy_from_slice(&x[hm..hm + hs])
        });
    }

    fn kernel_dims(&self, scale: f32) -> Dims {
        Dims {
            heads: self.b * self.nh,
            group: self.nh / self.nkv,
            tq: self.t,
            tk: self.t,
            hs: self.hs,
            scale,
        }
    }
}

impl candle_core::CustomOp1 for FusedQkvAttention {
    fn name(&self) -> &'static str {
        "tinygpt-fused-qkv-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let qd = QkvDims::new(l.shape(), self.n_head, self.n_kv_head)?;
        let mut y = vec![0f32; qd.b * qd.t * qd.nh * qd.hs];
        let saved = qkv_forward(qd, cpu_f32(s, l, "qkv")?, self.scale, &mut y);
        // A fresh op per call, so the cell is empty; were it not, the first forward stands.
        let _ = self.saved.set(saved);
        Ok((CpuStorage::F32(y), Shape::from((qd.b, qd.t, qd.nh * qd.hs))))
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let Some(saved) = self.saved.get() else {
            candle_core::bail!("fused attention: backward before forward")
        };
        let qd = QkvDims::new(qkv.shape(), self.n_head, self.n_kv_head)?;
        let grad_res = grad_res.contiguous()?;
        let (gs, gl) = grad_res.storage_and_layout();
        let Storage::Cpu(gs) = &*gs else {
            candle_core::bail!("fused attention: backward needs CPU tensors")
        };
        let mut dqkv = vec![0f32; qd.b * qd.t * qd.width()];
        qkv_backward(
            qd,
            saved,
            &mut QkvBackwardBuffers::default(),
            cpu_f32(gs, gl, "output gradient")?,
            self.scale,
            &mut dqkv,
        );
        Ok(Some(Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?))
    }
}

/// The fused forward over a packed `qkv` (B, T, width) into `y` (B, T, nh·hs), keeping what
/// the backward needs.
fn qkv_forward(qd: QkvDims, x: &[f32], scale: f32, y: &mut [f32]) -> QkvSaved {
    let mut saved = QkvSaved::default();
    qkv_forward_into(qd, x, scale, y, &mut saved);
    saved
}

/// [`qkv_forward`] into `saved`'s vectors (reused).
fn qkv_forward_into(qd: QkvDims, x: &[f32], scale: f32, y: &mut [f32], saved: &mut QkvSaved) {
    let (w, c, ckv) = (qd.width(), qd.nh * qd.hs, qd.nkv * qd.hs);
    let QkvSaved { q, k, v, o, lse } = saved;
    qd.gather_into(x, w, 0, qd.nh, q);
    qd.gather_into(x, w, c, qd.nkv, k);
    qd.gather_into(x, w, c + ckv, qd.nkv, v);
    let d = qd.kernel_dims(scale);
    forward_into(
        Isa::detect(),
        q,
        (k, d.tk * d.hs),
        (v, d.tk * d.hs),
        d,
        (o, lse),
    );
    qd.scatter(o, y, c, 0, qd.nh);
}

/// The fused backward: `dqkv` (B, T, width) from the output gradient `dy` (B, T, nh·hs),
/// through the head-major buffers `bufs` (reused).
fn qkv_backward(
    qd: QkvDims,
    saved: &QkvSaved,
    bufs: &mut QkvBackwardBuffers,
    dy: &[f32],
    scale: f32,
    dqkv: &mut [f32],
) {
    let (w, c, ckv) = (qd.width(), qd.nh * qd.hs, qd.nkv * qd.hs);
    let QkvBackwardBuffers { d_o, dq, dk, dv } = bufs;
    qd.gather_into(dy, c, 0, qd.nh, d_o);
    let inputs = BwdInputs {
        q: &saved.q,
        k: &saved.k,
        v: &saved.v,
        o: &saved.o,
        d_o,
        lse: &saved.lse,
    };
    backward_into(Isa::detect(), inputs, qd.kernel_dims(scale), (dq, dk, dv));
    qd.scatter(dq, dqkv, w, 0, qd.nh);
    qd.scatter(dk, dqkv, w, c, qd.nkv);
    qd.scatter(dv, dqkv, w, c + ckv, qd.nkv);
}

/// [`causal_attention_gqa_qkv`]'s CPU kernel on plain slices, for the hand-written training
/// step ([`super::train_step`]): `qkv` (B, T, (nh + 2·nkv)·hs) → `y` (B, T, nh·hs), and what
/// [`qkv_attention_backward`] needs into `saved` (its vectors reused: no allocation once they
/// have their size). `scale` is usually `1 / sqrt(hs)`.
///
/// # Errors
/// When `nkv` does not divide `nh`, the width is not `(nh + 2·nkv)·hs` or `y` has another size.
pub(crate) fn qkv_attention_forward(
    qkv: &[f32],
    (b, t, nh, nkv): (usize, usize, usize, usize),
    scale: f32,
    y: &mut [f32],
    saved: &mut QkvSaved,
) -> candle_core::Result<()> {
    let width = qkv.len() / (b * t).max(1);
    let qd = QkvDims::of(b, t, width, nh, nkv)?;
    if qkv.len() != b * t * width || y.len() != b * t * nh * qd.hs {
        candle_core::bail!(
            "fused attention: qkv of {} and y of {} for (B {b}, T {t})",
            qkv.len(),
            y.len()
        );
    }
    qkv_forward_into(qd, qkv, scale, y, saved);
    Ok(())
}

/// The backward of [`qkv_attention_forward`]: `dqkv` (B, T, (nh + 2·nkv)·hs), overwritten,
/// from `dy` (B, T, nh·hs), through the head-major buffers `bufs` (reused).
///
/// # Errors
/// As [`qkv_attention_forward`], for `dqkv` and `dy`.
pub(crate) fn qkv_attention_backward(
    saved: &QkvSaved,
    bufs: &mut QkvBackwardBuffers,
    dy: &[f32],
    (b, t, nh, nkv): (usize, usize, usize, usize),
    scale: f32,
    dqkv: &mut [f32],
) -> candle_core::Result<()> {
    let width = dqkv.len() / (b * t).max(1);
    let qd = QkvDims::of(b, t, width, nh, nkv)?;
    if dqkv.len() != b * t * width
        || dy.len() != b * t * nh * qd.hs
        || saved.lse.len() != b * nh * t
    {
        candle_core::bail!(
            "fused attention: dqkv of {} and dy of {} for (B {b}, T {t})",
            dqkv.len(),
            dy.len()
        );
    }
    qkv_backward(qd, saved, bufs, dy, scale, dqkv);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Driving the kernels over heads
// ---------------------------------------------------------------------------------------------

/// Forward over all heads: returns the output `(heads, Tq, hs)` and the LSE `(heads, Tq)`.
/// `k` and `v` come with the distance between their heads (`Tk · hs` when contiguous).
fn forward(
    isa: Isa,
    q: &[f32],
    (k, k_head): (&[f32], usize),
    (v, v_head): (&[f32], usize),
    d: Dims,
) -> (Vec<f32>, Vec<f32>) {
    let (mut out, mut lse) = (Vec::new(), Vec::new());
    forward_into(isa, q, (k, k_head), (v, v_head), d, (&mut out, &mut lse));
    (out, lse)
}

/// [`forward`] into `out` and `lse` (resized, zeroed, their allocations kept).
fn forward_into(
    isa: Isa,
    q: &[f32],
    (k, k_head): (&[f32], usize),
    (v, v_head): (&[f32], usize),
    d: Dims,
    (out, lse): (&mut Vec<f32>, &mut Vec<f32>),
) {
    let (tq, tk, hs) = (d.tq, d.tk, d.hs);
    zeroed(out, d.heads * tq * hs);
    zeroed(lse, d.heads * tq);
    if out.is_empty() {
        return;
    }
    let heads = out.chunks_mut(tq * hs).zip(lse.chunks_mut(tq)).collect();
    let run = |scratch: &mut FwdScratch, h: usize, (o, lse): (&mut [f32], &mut [f32])| {
        let kv = h / d.group; // the kv head this query head's group shares
        let job = FwdJob {
            q: &q[h * tq * hs..(h + 1) * tq * hs],
            k: &k[kv * k_head..kv * k_head + tk * hs],
            v: &v[kv * v_head..kv * v_head + tk * hs],
            o,
            lse,
            d,
        };
        isa.forward_head(job, scratch);
    };
    for_each_head(heads, d.parallel(), || FwdScratch::new(d), run);
}

/// One row's cache for [`decode_rows`]: keys and values `(nkv, capacity, hs)`, the first `len`
/// positions valid (the new token's included).
pub(crate) struct RowCache<'a> {
    pub(crate) k: &'a [f32],
    pub(crate) v: &'a [f32],
    pub(crate) len: usize,
}

/// Attention for one decoding step of several sequences, each against its own cache: row
/// `r`'s query `q[r]` (`nh · hs` floats, heads side by side, as `c_attn` writes them) sits at
/// position `caches[r].len - 1` and sees that row's keys `0..len`. `dims` is
/// `(nh, nkv, hs, capacity)`: each row's cache holds `nkv` key/value heads (`nkv` dividing
/// `nh`; `nkv = nh` for multi-head attention), and query head `h` reads kv head
/// `h / (nh / nkv)` (grouped-query attention, as [`causal_attention`]). Returns
/// `(R, nh · hs)`, heads side by side, ready for `c_proj`. Each (row, query head) is the
/// row-by-row forward of the fused kernel ([`forward_rows`]), so a row's output does not
/// depend on the other rows.
///
/// # Errors
/// [`Error::InvalidArgument`] if `nkv` does not divide `nh` or the slices are shorter than the
/// sizes say.
pub(crate) fn decode_rows(
    q: &[f32],
    caches: &[RowCache],
    (nh, nkv, hs, capacity): (usize, usize, usize, usize),
    scale: f32,
) -> Result<Vec<f32>> {
    if nkv == 0 || !nh.is_multiple_of(nkv) {
        return Err(Error::InvalidArgument(format!(
            "decode attention: {nkv} kv heads must divide {nh} query heads"
        )));
    }
    let group = nh / nkv;
    let c = nh * hs;
    let rows = caches.len();
    let bad = q.len() < rows * c
        || caches.iter().any(|rc| {
            rc.len == 0
                || rc.len > capacity
                || rc.k.len() < nkv * capacity * hs
                || rc.v.len() < nkv * capacity * hs
        });
    if bad {
        return Err(Error::InvalidArgument(format!(
            "decode attention: {rows} rows of {nh} heads × {hs} need q of {} floats and caches of {} ({nkv} kv heads) with 1..={capacity} positions",
            rows * c,
            nkv * capacity * hs
        )));
    }
    let mut out = vec![0f32; rows * c];
    let mut lse = vec![0f32; rows * nh];
    let max_len = caches.iter().map(|rc| rc.len).max().unwrap_or(1);
    let work: usize = caches.iter().map(|rc| nh * rc.len * hs).sum();
    let items: Vec<(&mut [f32], &mut [f32])> = out.chunks_mut(hs).zip(lse.chunks_mut(1)).collect();
    let isa = Isa::detect();
    let one = |tk: usize| Dims {
        heads: 1,
        group: 1,
        tq: 1,
        tk,
        hs,
        scale,
    };
    let run = |scratch: &mut FwdScratch, i: usize, (o, lse): (&mut [f32], &mut [f32])| {
        let (r, h) = (i / nh, i % nh);
        let rc = &caches[r];
        let head = (h / group) * capacity * hs; // the kv head of query head h's group
        let job = FwdJob {
            q: &q[r * c + h * hs..r * c + (h + 1) * hs],
            k: &rc.k[head..head + rc.len * hs],
            v: &rc.v[head..head + rc.len * hs],
            o,
            lse,
            d: one(rc.len),
        };
        isa.forward_head(job, scratch);
    };
    let parallel = rows * nh > 1 && work >= DECODE_PARALLEL_MIN_WORK;
    for_each_head(items, parallel, || FwdScratch::new(one(max_len)), run);
    Ok(out)
}

/// What the backward pass reads, all contiguous: `q`, `o`, `d_o` `(heads, Tq, hs)`, `k`, `v`
/// `(kv heads, Tk, hs)`, `lse` `(heads, Tq)`.
struct BwdInputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    d_o: &'a [f32],
    lse: &'a [f32],
}

/// Backward over all heads: returns `dq`, `dk`, `dv`, shaped as `q`, `k`, `v`.
///
/// One piece of work is one kv head and the query heads of its group that it serves (the
/// whole group, or a part of it: [`Dims::kv_parts`]); the query heads of a piece run one
/// after the other on one thread, adding into the same `dK`, `dV`. With parts, each part has
/// its own `dK`, `dV`, summed here afterwards. MHA (`group` 1) is one head a piece, as before.
fn backward(isa: Isa, x: BwdInputs, d: Dims) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (mut dq, mut dk, mut dv) = (Vec::new(), Vec::new(), Vec::new());
    backward_into(isa, x, d, (&mut dq, &mut dk, &mut dv));
    (dq, dk, dv)
}

/// [`backward`] into `dq`, `dk`, `dv` (resized, their allocations kept; with parts, the
/// parts' sums are vectors of their own).
fn backward_into(
    isa: Isa,
    x: BwdInputs,
    d: Dims,
    (dq, dk, dv): (&mut Vec<f32>, &mut Vec<f32>, &mut Vec<f32>),
) {
    let (tq, tk, hs) = (d.tq, d.tk, d.hs);
    let (kv_heads, parts) = (d.kv_heads(), d.kv_parts());
    let per = d.group / parts; // query heads per piece
    zeroed(dq, d.heads * tq * hs);
    if dq.is_empty() {
        zeroed(dk, kv_heads * tk * hs);
        zeroed(dv, kv_heads * tk * hs);
        return;
    }
    // Piece i: kv head i / parts, query heads i·per..(i + 1)·per (consecutive, so its dq is
    // one chunk), its own dk, dv.
    zeroed(dk, kv_heads * parts * tk * hs);
    zeroed(dv, kv_heads * parts * tk * hs);
    type Grads<'g> = ((&'g mut [f32], &'g mut [f32]), &'g mut [f32]);
    let pieces = dq
        .chunks_mut(per * tq * hs)
        .zip(dk.chunks_mut(tk * hs))
        .zip(dv.chunks_mut(tk * hs))
        .collect();
    let run = |scratch: &mut BwdScratch, i: usize, ((dq, dk), dv): Grads| {
        let kv = i / parts;
        let (q_rows, k_rows) = (
            i * per * tq * hs..(i + 1) * per * tq * hs,
            kv * tk * hs..(kv + 1) * tk * hs,
        );
        let job = BwdJob {
            q: &x.q[q_rows.clone()],
            k: &x.k[k_rows.clone()],
            v: &x.v[k_rows],
            o: &x.o[q_rows.clone()],
            d_o: &x.d_o[q_rows],
            lse: &x.lse[i * per * tq..(i + 1) * per * tq],
            dq,
            dk,
            dv,
            d,
        };
        isa.backward_head(job, scratch);
    };
    for_each_head(pieces, d.parallel(), || BwdScratch::new(d), run);
    if parts > 1 {
        // The parts of each kv head, summed in order.
        let reduce = |partial: Vec<f32>| -> Vec<f32> {
            let mut out = vec![0f32; kv_heads * tk * hs];
            for (out, parts) in out
                .chunks_exact_mut(tk * hs)
                .zip(partial.chunks_exact(parts * tk * hs))
            {
                for part in parts.chunks_exact(tk * hs) {
                    out.iter_mut().zip(part).for_each(|(o, p)| *o += p);
                }
            }
            out
        };
        *dk = reduce(std::mem::take(dk));
        *dv = reduce(std::mem::take(dv));
    }
}

/// Runs `run(scratch, h, item)` for every head `h`, on candle's CPU thread pool when
/// `parallel`, else on the calling thread. Each thread makes its scratch once.
///
/// The pool is candle's own ([`candle_core::utils::barrier_pool`], sized by
/// `CANDLE_NUM_THREADS` or else `RAYON_NUM_THREADS`), not rayon's global one: its workers spin
/// for a while after each candle op, so a second pool running next to them would share the
/// cores with spinning threads. Measured on a busy 2-core machine, fwd+bwd at B 4, nh 12,
/// T 64 had a median of 5–12 ms on a rayon pool beside them and 0.9 ms on theirs. When
/// candle's pool has no workers of its own and the caller is a rayon worker, the heads go to
/// rayon's pool.
fn for_each_head<T: Send, S>(
    items: Vec<T>,
    parallel: bool,
    new_scratch: impl Fn() -> S + Sync,
    run: impl Fn(&mut S, usize, T) + Sync,
) {
    if !parallel {
        let mut scratch = new_scratch();
        for (h, item) in items.into_iter().enumerate() {
            run(&mut scratch, h, item);
        }
        return;
    }
    // One task per thread; each takes heads one at a time until none are left, so a thread
    // the OS holds back delays at most the head it is on. A head's outputs are handed out
    // once, to whichever thread takes the head.
    let slots: Vec<Mutex<Option<T>>> = items.into_iter().map(|t| Mutex::new(Some(t))).collect();
    let next = AtomicUsize::new(0);
    let task = || {
        let mut scratch = None;
        loop {
            let h = next.fetch_add(1, Ordering::Relaxed);
            let Some(slot) = slots.get(h) else { break };
            let item = slot.lock().unwrap_or_else(PoisonError::into_inner).take();
            if let Some(item) = item {
                run(scratch.get_or_insert_with(&new_scratch), h, item);
            }
        }
    };
    let pool = barrier_pool();
    if pool.n_workers() == 0 && rayon::current_thread_index().is_some() {
        // candle's pool is the calling thread alone (`CANDLE_NUM_THREADS=1`, as the examples
        // run) and the caller is a worker of rayon's pool (the trainer runs its steps there):
        // split the heads over rayon's pool instead.
        rayon::broadcast(|_| task());
    } else {
        pool.execute_chunked(pool.n_workers() + 1, |_| task());
    }
}

/// The instruction set the kernels are compiled for, picked once per call at run time.
#[derive(Debug, Clone, Copy)]
enum Isa {
    /// Whatever the build target guarantees (SSE2 on x86-64, NEON on aarch64).
    Baseline,
    /// AVX2 with FMA (x86-64 since 2013).
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512F (with AVX2 and FMA): 16 floats a register, 32 registers.
    #[cfg(target_arch = "x86_64")]
    Avx512,
}

impl Isa {
    fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            if avx2 && is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if avx2 {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    }

    fn forward_head(self, job: FwdJob, scratch: &mut FwdScratch) {
        match self {
            Isa::Baseline => forward_head::<Baseline>(job, scratch),
            // SAFETY: `detect` chose these only after confirming the features at run time.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { forward_head_avx2(job, scratch) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { forward_head_avx512(job, scratch) },
        }
    }

    fn backward_head(self, job: BwdJob, scratch: &mut BwdScratch) {
        match self {
            Isa::Baseline => backward_head::<Baseline>(job, scratch),
            // SAFETY: `detect` chose these only after confirming the features at run time.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { backward_head_avx2(job, scratch) },
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { backward_head_avx512(job, scratch) },
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn forward_head_avx2(job: FwdJob, scratch: &mut FwdScratch) {
    forward_head::<Avx2>(job, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn forward_head_avx512(job: FwdJob, scratch: &mut FwdScratch) {
    forward_head::<Avx512>(job, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn backward_head_avx2(job: BwdJob, scratch: &mut BwdScratch) {
    backward_head::<Avx2>(job, scratch)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn backward_head_avx512(job: BwdJob, scratch: &mut BwdScratch) {
    backward_head::<Avx512>(job, scratch)
}

// ---------------------------------------------------------------------------------------------
// Per-head kernels. Everything below is `#[inline(always)]`, so that it is compiled into each
// `*_avx2` / `*_avx512` wrapper with that wrapper's instruction set, except the register
// tiles, which are functions of their own for each instruction set (see `Arith::tile`).
// ---------------------------------------------------------------------------------------------

/// How a kernel build multiplies and adds, and its register tile.
trait Arith {
    /// Register tile width in floats: 64 = four AVX-512 registers a row, else 16.
    const WIDE: bool;
    /// `a * b + c`, fused where the instruction set has FMA.
    fn fma(a: f32, b: f32, c: f32) -> f32;
    /// [`tile_kernel`] for this instruction set, compiled as a function of its own: inlined
    /// into the large per-head kernels, the compiler does not reliably keep its accumulators
    /// in registers.
    #[allow(clippy::too_many_arguments)]
    fn tile<const R: usize, const W: usize, const TA: bool>(
        k: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    );
}

/// The baseline build: FMA only where the target guarantees it (aarch64).
struct Baseline;
/// The AVX2 + FMA build.
#[cfg(target_arch = "x86_64")]
struct Avx2;
/// The AVX-512 build.
#[cfg(target_arch = "x86_64")]
struct Avx512;

impl Arith for Baseline {
    const WIDE: bool = false;
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        if cfg!(target_arch = "aarch64") {
            a.mul_add(b, c)
        } else {
            a * b + c
        }
    }
    #[inline(always)]
    fn tile<const R: usize, const W: usize, const TA: bool>(
        k: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        tile_baseline::<R, W, TA>(k, a, lda, b, ldb, c, ldc, accumulate)
    }
}

#[cfg(target_arch = "x86_64")]
impl Arith for Avx2 {
    const WIDE: bool = false;
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
    #[inline(always)]
    fn tile<const R: usize, const W: usize, const TA: bool>(
        k: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        // SAFETY: `Avx2` kernels run only after `Isa::detect` found AVX2 and FMA.
        unsafe { tile_avx2::<R, W, TA>(k, a, lda, b, ldb, c, ldc, accumulate) }
    }
}

#[cfg(target_arch = "x86_64")]
impl Arith for Avx512 {
    const WIDE: bool = true;
    #[inline(always)]
    fn fma(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
    #[inline(always)]
    fn tile<const R: usize, const W: usize, const TA: bool>(
        k: usize,
        a: &[f32],
        lda: usize,
        b: &[f32],
        ldb: usize,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        // SAFETY: `Avx512` kernels run only after `Isa::detect` found AVX-512F, AVX2 and FMA.
        unsafe { tile_avx512::<R, W, TA>(k, a, lda, b, ldb, c, ldc, accumulate) }
    }
}

#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn tile_baseline<const R: usize, const W: usize, const TA: bool>(
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    tile_kernel::<Baseline, R, W, TA>(k, a, lda, b, ldb, c, ldc, accumulate)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn tile_avx2<const R: usize, const W: usize, const TA: bool>(
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    tile_kernel::<Avx2, R, W, TA>(k, a, lda, b, ldb, c, ldc, accumulate)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn tile_avx512<const R: usize, const W: usize, const TA: bool>(
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    tile_kernel::<Avx512, R, W, TA>(k, a, lda, b, ldb, c, ldc, accumulate)
}

/// One head's forward: `q` `(Tq, hs)`, `k`, `v` `(Tk, hs)` in; `o` `(Tq, hs)`, `lse` `(Tq,)`
/// out.
struct FwdJob<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a mut [f32],
    lse: &'a mut [f32],
    d: Dims,
}

/// A forward worker's buffers, allocated once per thread and call, reused across heads.
struct FwdScratch {
    /// `Kᵀ` in panels of [`BC`] keys: panel `p` is `(hs, BC)` at `p · BC · hs`.
    kt: Vec<f32>,
    /// Scores, then probabilities, of one tile: `(BR, BC)`.
    s: Vec<f32>,
    /// Unnormalised output of one query block: `(BR, hs)`.
    acc: Vec<f32>,
    /// Running row maximum (of scaled scores) and running sum of exponentials: `(BR,)` each.
    m: Vec<f32>,
    l: Vec<f32>,
}

impl FwdScratch {
    fn new(d: Dims) -> Self {
        if d.tq <= ROWWISE_MAX_TQ {
            // `forward_rows` needs one row of scores and nothing else.
            return Self {
                kt: Vec::new(),
                s: vec![0.0; d.tk],
                acc: Vec::new(),
                m: Vec::new(),
                l: Vec::new(),
            };
        }
        Self {
            kt: vec![0.0; d.tk.div_ceil(BC) * BC * d.hs],
            s: vec![0.0; BR * BC],
            acc: vec![0.0; BR * d.hs],
            m: vec![0.0; BR],
            l: vec![0.0; BR],
        }
    }
}

/// The forward for a few queries (KV-cache decoding), one query row at a time: scores by dot
/// products along `hs`, an exact softmax over the row, then `P V`. Tiling would first
/// transpose all of `K`, which costs more than the whole product when `Tq` is this small.
#[inline(always)]
fn forward_rows<F: Arith>(job: FwdJob, sc: &mut FwdScratch) {
    let FwdJob { q, k, v, o, lse, d } = job;
    let (hs, scale, past) = (d.hs, d.scale, d.past());
    let rows = q.chunks_exact(hs).zip(o.chunks_exact_mut(hs)).zip(lse);
    for (r, ((q, o), lse)) in rows.enumerate() {
        let row = &mut sc.s[..past + r + 1]; // the keys query r sees
        for (s, k) in row.iter_mut().zip(k.chunks_exact(hs)) {
            *s = dot::<F>(q, k);
        }
        let m = scale_max(row, scale);
        let l = exp_sub_sum::<F>(row, m);
        // o = P V / l: (1, seen) · (seen, hs)
        let seen = row.len();
        matmul::<F, false>(1, hs, seen, row, seen, v, hs, o, hs, false);
        let inv = 1.0 / l;
        o.iter_mut().for_each(|o| *o *= inv);
        *lse = m + l.ln();
    }
}

/// FlashAttention-2's forward (Algorithm 1) for one head.
#[inline(always)]
fn forward_head<F: Arith>(job: FwdJob, sc: &mut FwdScratch) {
    if job.d.tq <= ROWWISE_MAX_TQ {
        return forward_rows::<F>(job, sc);
    }
    let FwdJob { q, k, v, o, lse, d } = job;
    let (tq, tk, hs, scale, past) = (d.tq, d.tk, d.hs, d.scale, d.past());
    to_panels(k, tk, hs, BC, &mut sc.kt);
    for i0 in (0..tq).step_by(BR) {
        let br = BR.min(tq - i0);
        sc.m[..br].fill(f32::NEG_INFINITY);
        sc.l[..br].fill(0.0);
        sc.acc[..br * hs].fill(0.0);
        // The last row of the block sees keys up to `past + i0 + br - 1`.
        let k_end = past + i0 + br;
        for j0 in (0..k_end).step_by(BC) {
            let bc = BC.min(k_end - j0);
            // Row r (position past + i0 + r) sees the first seen(r) keys of this block.
            let seen = |r: usize| (past + i0 + r + 1).saturating_sub(j0).min(bc);
            // A block below the diagonal is one group of rows; one on the diagonal goes in
            // groups of GROUP rows, each as wide as its last row sees.
            let group = if seen(0) == bc { br } else { GROUP };
            let (kt, v_j) = (&sc.kt[j0 * hs..], &v[j0 * hs..]);
            for g0 in (0..br).step_by(group) {
                let g1 = (g0 + group).min(br);
                let n = seen(g1 - 1).next_multiple_of(GROUP).min(bc);
                if n == 0 {
                    continue;
                }
                // S = Q_i K_jᵀ: (g, hs) · (hs, n)
                let (q_g, s_g) = (&q[(i0 + g0) * hs..], &mut sc.s[g0 * BC..]);
                matmul::<F, false>(g1 - g0, n, hs, q_g, hs, kt, BC, s_g, BC, false);
                for r in g0..g1 {
                    let seen = seen(r);
                    let row = &mut sc.s[r * BC..r * BC + n];
                    row[seen..].fill(0.0);
                    if seen == 0 {
                        continue;
                    }
                    let row = &mut row[..seen];
                    let m_old = sc.m[r];
                    let m_new = scale_max(row, scale).max(m_old);
                    let alpha = if m_old == f32::NEG_INFINITY {
                        0.0 // the first block this row sees
                    } else {
                        exp::<F>(m_old - m_new)
                    };
                    let sum = exp_sub_sum::<F>(row, m_new);
                    sc.l[r] = sc.l[r] * alpha + sum;
                    if alpha != 1.0 {
                        let acc = &mut sc.acc[r * hs..(r + 1) * hs];
                        acc.iter_mut().for_each(|a| *a *= alpha);
                    }
                    sc.m[r] = m_new;
                }
                // O_i += P V_j: (g, n) · (n, hs)
                let (s_g, acc_g) = (&sc.s[g0 * BC..], &mut sc.acc[g0 * hs..]);
                matmul::<F, false>(g1 - g0, hs, n, s_g, BC, v_j, hs, acc_g, hs, true);
            }
        }
        for r in 0..br {
            let inv = 1.0 / sc.l[r];
            let out = &mut o[(i0 + r) * hs..(i0 + r + 1) * hs];
            for (o, a) in out.iter_mut().zip(&sc.acc[r * hs..(r + 1) * hs]) {
                *o = a * inv;
            }
            lse[i0 + r] = sc.m[r] + sc.l[r].ln();
        }
    }
}

/// One kv head's backward for `n` of the query heads that share it: `q`, `o`, `d_o`
/// `(n, Tq, hs)`, `k`, `v` `(Tk, hs)`, `lse` `(n, Tq)` in; `dq` `(n, Tq, hs)`, `dk`, `dv`
/// `(Tk, hs)` out (zeroed by the caller; `dk`, `dv` summed over the `n` query heads).
struct BwdJob<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    o: &'a [f32],
    d_o: &'a [f32],
    lse: &'a [f32],
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
    d: Dims,
}

/// A backward worker's buffers, allocated once per thread and call, reused across heads.
struct BwdScratch {
    /// `Kᵀ` and `Vᵀ` in panels of [`BC`] keys: `(hs, BC)` each.
    kt: Vec<f32>,
    vt: Vec<f32>,
    /// `D_i = rowsum(dO ∘ O)`: `(Tq,)`.
    delta: Vec<f32>,
    /// `P` and `dS · scale` (first `dP`) of one tile: `(BR, BC)`.
    p: Vec<f32>,
    ds: Vec<f32>,
}

impl BwdScratch {
    fn new(d: Dims) -> Self {
        let k_panels = d.tk.div_ceil(BC) * BC * d.hs;
        Self {
            kt: vec![0.0; k_panels],
            vt: vec![0.0; k_panels],
            delta: vec![0.0; d.tq],
            p: vec![0.0; BR * BC],
            ds: vec![0.0; BR * BC],
        }
    }
}

/// FlashAttention-2's backward (Algorithm 2) for one kv head and the query heads of a
/// [`BwdJob`]: `Kᵀ`, `Vᵀ` transposed once, then for each query head in turn key blocks outer,
/// query blocks inner, `dK_j`, `dV_j` accumulated in place and `dQ_i` added to in memory.
#[inline(always)]
fn backward_head<F: Arith>(job: BwdJob, sc: &mut BwdScratch) {
    let BwdJob {
        q,
        k,
        v,
        o,
        d_o,
        lse,
        dq,
        dk,
        dv,
        d,
    } = job;
    let (tq, tk, hs) = (d.tq, d.tk, d.hs);
    to_panels(k, tk, hs, BC, &mut sc.kt);
    to_panels(v, tk, hs, BC, &mut sc.vt);
    let n = tq * hs; // one query head's rows (not 0: the caller returns early then)
    let heads = q
        .chunks_exact(n)
        .zip(o.chunks_exact(n))
        .zip(d_o.chunks_exact(n));
    let heads = heads.zip(lse.chunks_exact(tq)).zip(dq.chunks_exact_mut(n));
    for ((((q, o), d_o), lse), dq) in heads {
        backward_query_head::<F>(q, k, o, d_o, lse, dq, &mut *dk, &mut *dv, d, sc);
    }
}

/// [`backward_head`] for one query head, after `Kᵀ` and `Vᵀ` are in `sc`'s panels.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_query_head<F: Arith>(
    q: &[f32],
    k: &[f32],
    o: &[f32],
    d_o: &[f32],
    lse: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
    d: Dims,
    sc: &mut BwdScratch,
) {
    let (tq, tk, hs, scale, past) = (d.tq, d.tk, d.hs, d.scale, d.past());
    let rows = o.chunks_exact(hs).zip(d_o.chunks_exact(hs));
    for (delta, (o, d_o)) in sc.delta.iter_mut().zip(rows) {
        *delta = dot::<F>(o, d_o);
    }
    for j0 in (0..tk).step_by(BC) {
        let bc = BC.min(tk - j0);
        let (kt, vt, k_j) = (&sc.kt[j0 * hs..], &sc.vt[j0 * hs..], &k[j0 * hs..]);
        // The first query that sees key j0 is row j0 - past; start at its block.
        let i_first = j0.saturating_sub(past) / BR * BR;
        for i0 in (i_first..tq).step_by(BR) {
            let br = BR.min(tq - i0);
            // Row r (position past + i0 + r) sees the first seen(r) keys of this block; key c
            // is seen by rows r >= first(c).
            let seen = |r: usize| (past + i0 + r + 1).saturating_sub(j0).min(bc);
            let first = |c: usize| (j0 + c).saturating_sub(past + i0).min(br);
            // A block below the diagonal is one group; one on the diagonal goes in groups of
            // GROUP rows (keys), each as wide (long) as the causal mask lets it be.
            let group = if seen(0) == bc { br } else { GROUP };
            for g0 in (0..br).step_by(group) {
                let g1 = (g0 + group).min(br);
                let n = seen(g1 - 1).next_multiple_of(GROUP).min(bc);
                if n == 0 {
                    continue;
                }
                // S = Q_i K_jᵀ and dP = dO_i V_jᵀ: (g, hs) · (hs, n)
                let (q_g, d_o_g) = (&q[(i0 + g0) * hs..], &d_o[(i0 + g0) * hs..]);
                let (p, ds) = (&mut sc.p[g0 * BC..], &mut sc.ds[g0 * BC..]);
                matmul::<F, false>(g1 - g0, n, hs, q_g, hs, kt, BC, p, BC, false);
                matmul::<F, false>(g1 - g0, n, hs, d_o_g, hs, vt, BC, ds, BC, false);
                for r in g0..g1 {
                    let (seen, lse, delta) = (seen(r), lse[i0 + r], sc.delta[i0 + r]);
                    let p = &mut sc.p[r * BC..r * BC + bc];
                    let ds = &mut sc.ds[r * BC..r * BC + bc];
                    p[seen..].fill(0.0);
                    ds[seen..].fill(0.0);
                    softmax_grad::<F>(&mut p[..seen], &mut ds[..seen], lse, delta, scale);
                }
                // dQ_i += dS_ij K_j · scale: (g, n) · (n, hs)
                let (ds, dq) = (&sc.ds[g0 * BC..], &mut dq[(i0 + g0) * hs..]);
                matmul::<F, false>(g1 - g0, hs, n, ds, BC, k_j, hs, dq, hs, true);
            }
            // dV_j += P_ijᵀ dO_i and dK_j += dS_ijᵀ Q_i · scale: (g, br - f) · (br - f, hs),
            // summing over the rows f.. that see the group's first key.
            let group = if seen(0) == bc { bc } else { GROUP };
            for c0 in (0..bc).step_by(group) {
                let (c1, f) = ((c0 + group).min(bc), first(c0));
                if f == br {
                    break; // these keys and the rest are in every row's future
                }
                let (p, ds) = (&sc.p[f * BC + c0..], &sc.ds[f * BC + c0..]);
                let (d_o, q) = (&d_o[(i0 + f) * hs..], &q[(i0 + f) * hs..]);
                let (dv, dk) = (&mut dv[(j0 + c0) * hs..], &mut dk[(j0 + c0) * hs..]);
                matmul::<F, true>(c1 - c0, hs, br - f, p, BC, d_o, hs, dv, hs, true);
                matmul::<F, true>(c1 - c0, hs, br - f, ds, BC, q, hs, dk, hs, true);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Inner loops
// ---------------------------------------------------------------------------------------------

/// Writes `x` `(n, hs)` transposed into panels of `w` rows: panel `p` holds rows
/// `p·w..p·w + w` as an `(hs, w)` matrix at offset `p · w · hs`.
#[inline(always)]
fn to_panels(x: &[f32], n: usize, hs: usize, w: usize, panels: &mut [f32]) {
    // 8 × 8 blocks go through small arrays the compiler keeps in registers: twice as fast as
    // moving one element at a time, which the rest of the rows do.
    const T: usize = 8;
    for (p, rows) in x[..n * hs].chunks(w * hs).enumerate() {
        let panel = &mut panels[p * w * hs..(p + 1) * w * hs];
        let n_rows = rows.len() / hs;
        let in_blocks = if hs.is_multiple_of(T) {
            n_rows / T * T
        } else {
            0
        };
        for c0 in (0..in_blocks).step_by(T) {
            for d0 in (0..hs).step_by(T) {
                let block: [[f32; T]; T] = std::array::from_fn(|i| {
                    let start = (c0 + i) * hs + d0;
                    let mut row = [0.0; T];
                    row.copy_from_slice(&rows[start..start + T]);
                    row
                });
                let panel_rows = panel[d0 * w..].chunks_exact_mut(w).take(T);
                for (j, panel_row) in panel_rows.enumerate() {
                    let column: [f32; T] = std::array::from_fn(|i| block[i][j]);
                    panel_row[c0..c0 + T].copy_from_slice(&column);
                }
            }
        }
        for (c, row) in rows.chunks_exact(hs).enumerate().skip(in_blocks) {
            for (dd, &value) in row.iter().enumerate() {
                panel[dd * w + c] = value;
            }
        }
    }
}

/// `C (m, n) = [C +] A (m, k) · B (k, n)`, all row-major with row strides `lda`, `ldb`, `ldc`;
/// with `TA`, `A` is stored transposed: element `(i, l)` at `a[l · lda + i]`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn matmul<F: Arith, const TA: bool>(
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let mut j = 0;
    while j < n {
        let left = n - j;
        let (b, c) = (&b[j..], &mut c[j..]);
        if F::WIDE && left >= 64 {
            row_tiles::<F, 64, TA>(m, k, a, lda, b, ldb, c, ldc, accumulate);
            j += 64;
        } else if F::WIDE && left >= 32 {
            row_tiles::<F, 32, TA>(m, k, a, lda, b, ldb, c, ldc, accumulate);
            j += 32;
        } else if left >= 16 {
            row_tiles::<F, 16, TA>(m, k, a, lda, b, ldb, c, ldc, accumulate);
            j += 16;
        } else {
            row_tiles::<F, 1, TA>(m, k, a, lda, b, ldb, c, ldc, accumulate);
            j += 1;
        }
    }
}

/// [`matmul`] for one strip of `W` columns, four rows at a time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn row_tiles<F: Arith, const W: usize, const TA: bool>(
    m: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    // Where row i of A starts.
    let a_row = |i: usize| if TA { i } else { i * lda };
    let mut i = 0;
    while i + 4 <= m {
        let (a, c) = (&a[a_row(i)..], &mut c[i * ldc..]);
        F::tile::<4, W, TA>(k, a, lda, b, ldb, c, ldc, accumulate);
        i += 4;
    }
    let rest = m - i;
    if rest > 0 {
        let (a, c) = (&a[a_row(i)..], &mut c[i * ldc..]);
        match rest {
            3 => F::tile::<3, W, TA>(k, a, lda, b, ldb, c, ldc, accumulate),
            2 => F::tile::<2, W, TA>(k, a, lda, b, ldb, c, ldc, accumulate),
            _ => F::tile::<1, W, TA>(k, a, lda, b, ldb, c, ldc, accumulate),
        }
    }
}

/// The register tile: `C (R, W) = [C +] A (R, k) · B (k, W)` (`A` transposed with `TA`). The
/// `R × W` accumulators stay in registers (16 AVX-512 registers for 4 × 64) while `k` rows of
/// `B` stream past.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_kernel<F: Arith, const R: usize, const W: usize, const TA: bool>(
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[0f32; W]; R];
    if accumulate {
        for (r, acc) in acc.iter_mut().enumerate() {
            acc.copy_from_slice(&c[r * ldc..r * ldc + W]);
        }
    }
    if TA {
        for kk in 0..k {
            let (a, b) = (&a[kk * lda..kk * lda + R], &b[kk * ldb..kk * ldb + W]);
            for (acc, &x) in acc.iter_mut().zip(a) {
                for (acc, &b) in acc.iter_mut().zip(b) {
                    *acc = F::fma(x, b, *acc);
                }
            }
        }
    } else {
        let a: [&[f32]; R] = std::array::from_fn(|r| &a[r * lda..r * lda + k]);
        for kk in 0..k {
            let b = &b[kk * ldb..kk * ldb + W];
            for (acc, a) in acc.iter_mut().zip(&a) {
                let x = a[kk];
                for (acc, &b) in acc.iter_mut().zip(b) {
                    *acc = F::fma(x, b, *acc);
                }
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        c[r * ldc..r * ldc + W].copy_from_slice(acc);
    }
}

/// Lanes of the vectorised reductions: one AVX-512 register.
const LANES: usize = 16;

/// Multiplies `row` by `scale` in place and returns its maximum.
#[inline(always)]
fn scale_max(row: &mut [f32], scale: f32) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (x, m) in chunk.iter_mut().zip(lanes.iter_mut()) {
            *x *= scale;
            *m = if *x > *m { *x } else { *m };
        }
    }
    let mut max = lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for x in chunks.into_remainder() {
        *x *= scale;
        max = max.max(*x);
    }
    max
}

/// Replaces each `x` of `row` by `exp(x - m)` and returns their sum.
#[inline(always)]
fn exp_sub_sum<F: Arith>(row: &mut [f32], m: f32) -> f32 {
    let mut lanes = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (x, s) in chunk.iter_mut().zip(lanes.iter_mut()) {
            *x = exp::<F>(*x - m);
            *s += *x;
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for x in chunks.into_remainder() {
        *x = exp::<F>(*x - m);
        sum += *x;
    }
    sum
}

/// The softmax backward of one row of a tile: takes scores in `p` and `dP` in `ds`, leaves
/// `P = exp(scale · s − LSE)` in `p` and `dS · scale = P ∘ (dP − D) · scale` in `ds`.
#[inline(always)]
fn softmax_grad<F: Arith>(p: &mut [f32], ds: &mut [f32], lse: f32, delta: f32, scale: f32) {
    for (p, ds) in p.iter_mut().zip(ds.iter_mut()) {
        let e = exp::<F>(F::fma(*p, scale, -lse));
        *p = e;
        *ds = e * (*ds - delta) * scale;
    }
}

/// `Σ a_i b_i`.
#[inline(always)]
fn dot<F: Arith>(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (ca, cb) in ca.zip(cb) {
        for ((s, &x), &y) in lanes.iter_mut().zip(ca).zip(cb) {
            *s = F::fma(x, y, *s);
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for (&x, &y) in ra.iter().zip(rb) {
        sum = F::fma(x, y, sum);
    }
    sum
}

/// `e^x` for `x <= 88`, as Cephes' `expf`: `x = n ln 2 + r` with `|r| <= ln 2 / 2`, a degree-6
/// polynomial for `e^r`, and `2^n` built in the exponent bits. Relative error below 2e-7;
/// inputs below -87.3 give a number below 2e-38 rather than a denormal or 0. Branch-free, so
/// loops over it vectorise.
#[inline(always)]
fn exp<F: Arith>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 · 2^23 rounds to an integer, which lands in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = if x < -87.3 { -87.3 } else { x };
    let x = if x > 88.0 { 88.0 } else { x };
    let shifted = F::fma(x, LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = F::fma(n, -LN2_LO, F::fma(n, -LN2_HI, x));
    let mut p = 1.987_569_1e-4;
    p = F::fma(p, r, 1.398_199_9e-3);
    p = F::fma(p, r, 8.333_452e-3);
    p = F::fma(p, r, 4.166_579_6e-2);
    p = F::fma(p, r, 1.666_666_5e-1);
    p = F::fma(p, r, 0.5);
    let p = F::fma(p, r * r, r) + 1.0;
    // The bits of `shifted` are those of ROUND plus n; rebias n by 127 into the exponent.
    let pow2n = f32::from_bits(shifted.to_bits().wrapping_sub(ROUND.to_bits() - 127) << 23);
    p * pow2n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use candle_core::Var;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    fn randn(rng: &mut ChaCha8Rng, shape: &[usize], std: f32) -> Tensor {
        let normal = Normal::new(0f32, std).unwrap();
        let n = shape.iter().product();
        let data: Vec<f32> = (0..n).map(|_| normal.sample(rng)).collect();
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// Values and gradients of `loss = Σ y ∘ w` through `f`.
    fn value_and_grads(
        f: fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        w: &Tensor,
        scale: f64,
    ) -> [Tensor; 4] {
        let (q, k, v) = (
            Var::from_tensor(q).unwrap(),
            Var::from_tensor(k).unwrap(),
            Var::from_tensor(v).unwrap(),
        );
        let y = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale).unwrap();
        let grads = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
        let g = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
        [y, g(&q), g(&k), g(&v)]
    }

    /// Fused against the reference on random inputs: values and the gradients of q, k, v.
    fn check(b: usize, nh: usize, tq: usize, tk: usize, hs: usize, std: f32, seed: u64) -> f32 {
        check_gqa(b, nh, nh, tq, tk, hs, std, seed)
    }

    /// [`check`] with `nkv` key/value heads (grouped-query attention when `nkv < nh`).
    #[allow(clippy::too_many_arguments)]
    fn check_gqa(
        b: usize,
        nh: usize,
        nkv: usize,
        tq: usize,
        tk: usize,
        hs: usize,
        std: f32,
        seed: u64,
    ) -> f32 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let q = randn(&mut rng, &[b, nh, tq, hs], std);
        let k = randn(&mut rng, &[b, nkv, tk, hs], std);
        let v = randn(&mut rng, &[b, nkv, tk, hs], 1.0);
        let w = randn(&mut rng, &[b, nh, tq, hs], 1.0);
        let scale = 1.0 / (hs as f64).sqrt();
        let fused = value_and_grads(causal_attention, &q, &k, &v, &w, scale);
        let reference = value_and_grads(causal_attention_reference, &q, &k, &v, &w, scale);
        let mut worst = 0f32;
        for (name, (f, r)) in ["y", "dq", "dk", "dv"]
            .iter()
            .zip(fused.iter().zip(&reference))
        {
            let values = f.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(values.iter().all(|x| x.is_finite()), "{name} is not finite");
            let diff = max_abs_diff(f, r);
            eprintln!(
                "B{b} nh{nh} nkv{nkv} Tq{tq} Tk{tk} hs{hs}: {name} max |fused - reference| = \
                 {diff:.2e}"
            );
            assert!(
                diff <= 1e-4,
                "{name}: {diff} for B{b} nh{nh} nkv{nkv} Tq{tq} Tk{tk} hs{hs}"
            );
            worst = worst.max(diff);
        }
        worst
    }

    #[test]
    fn single_token() {
        check(1, 1, 1, 1, 8, 1.0, 1);
    }

    /// The split, reference attention and merge that [`causal_attention_qkv`] fuses.
    fn qkv_reference(qkv: &Tensor, nh: usize, scale: f64) -> Tensor {
        let (b, t, c3) = qkv.dims3().unwrap();
        let c = c3 / 3;
        let heads = |i: usize| {
            qkv.narrow(2, i * c, c)
                .unwrap()
                .reshape((b, t, nh, c / nh))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let y = causal_attention_reference(&heads(0), &heads(1), &heads(2), scale).unwrap();
        y.transpose(1, 2).unwrap().reshape((b, t, c)).unwrap()
    }

    /// `causal_attention_qkv` against the split/merge around the reference: values and d(qkv).
    fn check_qkv(b: usize, t: usize, nh: usize, hs: usize, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let c = nh * hs;
        let qkv = randn(&mut rng, &[b, t, 3 * c], 1.0);
        let w = randn(&mut rng, &[b, t, c], 1.0);
        let scale = 1.0 / (hs as f64).sqrt();
        let run = |fused: bool| {
            let x = Var::from_tensor(&qkv).unwrap();
            let y = if fused {
                causal_attention_qkv(x.as_tensor(), nh, scale).unwrap()
            } else {
                qkv_reference(x.as_tensor(), nh, scale)
            };
            let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(x.as_tensor()).unwrap().clone())
        };
        let ((y, g), (y_ref, g_ref)) = (run(true), run(false));
        assert_eq!(y.dims(), &[b, t, c]);
        let (dy, dg) = (max_abs_diff(&y, &y_ref), max_abs_diff(&g, &g_ref));
        eprintln!("qkv B{b} T{t} nh{nh} hs{hs}: y {dy:.2e}, dqkv {dg:.2e}");
        assert!(dy <= 1e-4 && dg <= 1e-4, "y {dy}, dqkv {dg}");
    }

    #[test]
    fn qkv_attention_matches_split_heads() {
        check_qkv(1, 1, 1, 8, 21);
        check_qkv(2, 17, 3, 8, 22);
        check_qkv(3, 64, 4, 32, 23);
        // From a rayon worker, as the trainer calls it: heads split over rayon's pool.
        rayon::scope(|_| check_qkv(2, 70, 4, 16, 24));
        rayon::scope(|_| {
            check(2, 4, 64, 64, 32, 1.0, 25);
        });
    }

    #[test]
    fn qkv_attention_bad_shapes_are_errors() {
        let x = Tensor::zeros((2, 4, 10), DType::F32, &Device::Cpu).unwrap();
        assert!(causal_attention_qkv(&x, 2, 1.0).is_err()); // 10 is not 3 · 2 · hs
        let x = Tensor::zeros((4, 12), DType::F32, &Device::Cpu).unwrap();
        assert!(causal_attention_qkv(&x, 2, 1.0).is_err()); // not (B, T, 3C)
        assert!(causal_attention_qkv(&x.unsqueeze(0).unwrap(), 0, 1.0).is_err());
    }

    /// Grouped-query heads `(nh, nkv)`: MHA, groups of 2 and 3, and MQA.
    const GQA_HEADS: [(usize, usize); 4] = [(4, 4), (4, 2), (6, 3), (4, 1)];

    #[test]
    fn gqa_matches_reference() {
        let mut seed = 100;
        for (nh, nkv) in GQA_HEADS {
            for hs in [6, 16] {
                // Training lengths (odd, across tiles and the diagonal split), then KV-cache
                // steps: one query and three against cached keys.
                for (tq, tk) in [(5, 5), (67, 67), (130, 130), (1, 67), (3, 130)] {
                    seed += 1;
                    check_gqa(2, nh, nkv, tq, tk, hs, 1.0, seed);
                }
            }
        }
        // Groups whole to one thread (8 kv heads: no split) and split in parts, from a rayon
        // worker as the trainer calls it.
        check_gqa(2, 8, 4, 130, 130, 16, 1.0, 150);
        rayon::scope(|_| {
            check_gqa(2, 8, 4, 67, 67, 16, 1.0, 151);
            check_gqa(1, 6, 2, 130, 130, 16, 1.0, 152);
        });
    }

    #[test]
    fn kv_parts_divide_the_group() {
        // The backward splits a group into parts that divide it, and only when short of work.
        for (b, nh, nkv) in [(1, 8, 4), (2, 4, 2), (1, 4, 1), (8, 8, 4)] {
            let d = Dims {
                heads: b * nh,
                group: nh / nkv,
                tq: 70,
                tk: 70,
                hs: 16,
                scale: 0.25,
            };
            assert!(d.parallel());
            let parts = d.kv_parts();
            assert!(d.group.is_multiple_of(parts));
            assert!(parts == d.group || d.kv_heads() * parts >= BWD_MIN_ITEMS);
        }
    }

    #[test]
    fn gqa_reads_a_kv_cache_prefix_in_place() {
        // k, v a prefix along T of a (B, nkv, capacity, hs) buffer, as the model's KV cache.
        let mut rng = ChaCha8Rng::seed_from_u64(160);
        let (b, nh, nkv, hs, cap) = (2, 6, 2, 16, 90);
        let kbuf = randn(&mut rng, &[b, nkv, cap, hs], 1.0);
        let vbuf = randn(&mut rng, &[b, nkv, cap, hs], 1.0);
        for (tq, tk) in [(1, 40), (3, 41), (70, 70)] {
            let q = randn(&mut rng, &[b, nh, tq, hs], 1.0);
            let (k, v) = (
                kbuf.narrow(2, 0, tk).unwrap(),
                vbuf.narrow(2, 0, tk).unwrap(),
            );
            assert!(!k.is_contiguous() && head_strided(k.layout()).is_some());
            let fused = causal_attention(&q, &k, &v, 0.25).unwrap();
            let reference = causal_attention_reference(&q, &k, &v, 0.25).unwrap();
            assert_eq!(fused.dims(), &[b, nh, tq, hs]);
            let diff = max_abs_diff(&fused, &reference);
            assert!(diff <= 1e-5, "Tq{tq} Tk{tk}: {diff}");
        }
    }

    #[test]
    fn gqa_forward_reads_the_groups_kv_head() {
        // Forward and dq of GQA are bit for bit those of MHA on explicitly repeated K and V:
        // each query head runs the same kernel on the same keys.
        let mut rng = ChaCha8Rng::seed_from_u64(170);
        let (b, nh, nkv, t, hs) = (2, 6, 2, 67, 16);
        let q = randn(&mut rng, &[b, nh, t, hs], 1.0);
        let k = randn(&mut rng, &[b, nkv, t, hs], 1.0);
        let v = randn(&mut rng, &[b, nkv, t, hs], 1.0);
        let w = randn(&mut rng, &[b, nh, t, hs], 1.0);
        let (kr, vr) = (repeat_kv(&k, 3).unwrap(), repeat_kv(&v, 3).unwrap());
        assert_eq!(kr.dims(), &[b, nh, t, hs]);
        // HF semantics: kv head j is query heads 3j, 3j+1, 3j+2.
        let head = |x: &Tensor, h: usize| x.narrow(1, h, 1).unwrap();
        assert_eq!(max_abs_diff(&head(&kr, 4), &head(&k, 1)), 0.0);
        let gqa = value_and_grads(causal_attention, &q, &k, &v, &w, 0.25);
        let mha = value_and_grads(causal_attention, &q, &kr, &vr, &w, 0.25);
        assert_eq!(max_abs_diff(&gqa[0], &mha[0]), 0.0);
        assert_eq!(max_abs_diff(&gqa[1], &mha[1]), 0.0);
        // dK of a kv head: the sum over its group of MHA's per-head dK.
        let summed = mha[2].reshape((b, nkv, 3, t, hs)).unwrap().sum(2).unwrap();
        assert!(max_abs_diff(&gqa[2], &summed) <= 1e-5);
    }

    #[test]
    fn mha_is_unchanged() {
        // Fixed-seed MHA values and gradients of the baseline kernels (deterministic on every
        // x86-64 CPU: no FMA, fixed summation order), against sums of their bit patterns as
        // the kernels computed them before grouped-query attention (commit a9e40b8): any
        // change of a bit shows.
        let mut rng = ChaCha8Rng::seed_from_u64(180);
        let (b, nh, t, hs) = (2, 3, 70, 16);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut x = || flat(&randn(&mut rng, &[b, nh, t, hs], 1.0));
        let (q, k, v, w) = (x(), x(), x(), x());
        let d = Dims {
            heads: b * nh,
            group: 1,
            tq: t,
            tk: t,
            hs,
            scale: 0.25,
        };
        let (o, lse) = forward(Isa::Baseline, &q, (&k, t * hs), (&v, t * hs), d);
        let inputs = BwdInputs {
            q: &q,
            k: &k,
            v: &v,
            o: &o,
            d_o: &w,
            lse: &lse,
        };
        let (dq, dk, dv) = backward(Isa::Baseline, inputs, d);
        let bits = |x: &Vec<f32>| -> u64 {
            x.iter().enumerate().fold(0u64, |h, (i, f)| {
                h.wrapping_add((f.to_bits() as u64).wrapping_mul(i as u64 * 2 + 1))
            })
        };
        let got: Vec<u64> = [&o, &dq, &dk, &dv].into_iter().map(bits).collect();
        eprintln!("MHA bit sums: {got:?}");
        if cfg!(target_arch = "x86_64") {
            assert_eq!(got, MHA_BITS);
        }
    }

    /// [`mha_is_unchanged`]'s sums, computed by the baseline kernels before GQA (commit
    /// a9e40b8) on x86-64.
    const MHA_BITS: [u64; 4] = [
        94330551061952011,
        94376480769305055,
        94792822685011154,
        93232041069054053,
    ];

    /// The split, reference attention and merge that [`causal_attention_gqa_qkv`] fuses.
    fn gqa_qkv_reference(qkv: &Tensor, nh: usize, nkv: usize, scale: f64) -> Tensor {
        let (b, t, width) = qkv.dims3().unwrap();
        let hs = width / (nh + 2 * nkv);
        let split = |col: usize, n: usize| {
            qkv.narrow(2, col * hs, n * hs)
                .unwrap()
                .reshape((b, t, n, hs))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(0, nh), split(nh, nkv), split(nh + nkv, nkv));
        let y = causal_attention_reference(&q, &k, &v, scale).unwrap();
        y.transpose(1, 2).unwrap().reshape((b, t, nh * hs)).unwrap()
    }

    fn check_gqa_qkv(b: usize, t: usize, nh: usize, nkv: usize, hs: usize, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let qkv = randn(&mut rng, &[b, t, (nh + 2 * nkv) * hs], 1.0);
        let w = randn(&mut rng, &[b, t, nh * hs], 1.0);
        let scale = 1.0 / (hs as f64).sqrt();
        let run = |fused: bool| {
            let x = Var::from_tensor(&qkv).unwrap();
            let y = if fused {
                causal_attention_gqa_qkv(x.as_tensor(), nh, nkv, scale).unwrap()
            } else {
                gqa_qkv_reference(x.as_tensor(), nh, nkv, scale)
            };
            let grads = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (y, grads.get(x.as_tensor()).unwrap().clone())
        };
        let ((y, g), (y_ref, g_ref)) = (run(true), run(false));
        assert_eq!(y.dims(), &[b, t, nh * hs]);
        let (dy, dg) = (max_abs_diff(&y, &y_ref), max_abs_diff(&g, &g_ref));
        eprintln!("gqa qkv B{b} T{t} nh{nh} nkv{nkv} hs{hs}: y {dy:.2e}, dqkv {dg:.2e}");
        assert!(dy <= 1e-4 && dg <= 1e-4, "y {dy}, dqkv {dg}");
    }

    #[test]
    fn gqa_qkv_attention_matches_split_heads() {
        let mut seed = 200;
        for (nh, nkv) in GQA_HEADS {
            for (t, hs) in [(5, 6), (67, 16), (130, 6)] {
                seed += 1;
                check_gqa_qkv(2, t, nh, nkv, hs, seed);
            }
        }
        rayon::scope(|_| check_gqa_qkv(2, 70, 6, 2, 16, 220));
        // n_kv_head = n_head is causal_attention_qkv, bit for bit.
        let mut rng = ChaCha8Rng::seed_from_u64(221);
        let qkv = randn(&mut rng, &[2, 33, 3 * 4 * 8], 1.0);
        let a = causal_attention_gqa_qkv(&qkv, 4, 4, 0.3).unwrap();
        let b = causal_attention_qkv(&qkv, 4, 0.3).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        // f16 takes the split + reference path.
        let h = qkv.narrow(2, 0, 64).unwrap().to_dtype(DType::F16).unwrap(); // nh 4, nkv 2, hs 8
        let y = causal_attention_gqa_qkv(&h, 4, 2, 0.3).unwrap();
        let y32 = causal_attention_gqa_qkv(&h.to_dtype(DType::F32).unwrap(), 4, 2, 0.3).unwrap();
        assert_eq!(y.dims(), &[2, 33, 32]);
        assert!(max_abs_diff(&y.to_dtype(DType::F32).unwrap(), &y32) < 1e-2);
    }

    #[test]
    fn decode_rows_gqa_matches_reference() {
        // Three rows at different lengths, each against its own (nkv, cap, hs) buffers.
        let mut rng = ChaCha8Rng::seed_from_u64(230);
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (nh, nkv) in GQA_HEADS {
            for hs in [6, 16] {
                let cap = 40;
                let lens = [1, 17, 40];
                let q = randn(&mut rng, &[lens.len(), nh * hs], 1.0);
                let bufs: Vec<(Tensor, Tensor)> = lens
                    .iter()
                    .map(|_| {
                        (
                            randn(&mut rng, &[1, nkv, cap, hs], 1.0),
                            randn(&mut rng, &[1, nkv, cap, hs], 1.0),
                        )
                    })
                    .collect();
                let data: Vec<(Vec<f32>, Vec<f32>)> =
                    bufs.iter().map(|(k, v)| (flat(k), flat(v))).collect();
                let caches: Vec<RowCache> = data
                    .iter()
                    .zip(lens)
                    .map(|((k, v), len)| RowCache { k, v, len })
                    .collect();
                let scale = 1.0 / (hs as f32).sqrt();
                let q_flat = flat(&q);
                let got = decode_rows(&q_flat, &caches, (nh, nkv, hs, cap), scale).unwrap();
                assert_eq!(got.len(), lens.len() * nh * hs);
                for (r, ((k, v), len)) in bufs.iter().zip(lens).enumerate() {
                    // (1, nh · hs) → (1, nh, 1, hs)
                    let q_r = q.narrow(0, r, 1).unwrap().reshape((1, nh, 1, hs)).unwrap();
                    let (k, v) = (k.narrow(2, 0, len).unwrap(), v.narrow(2, 0, len).unwrap());
                    let want = causal_attention_reference(&q_r, &k, &v, scale as f64).unwrap();
                    let row = &got[r * nh * hs..(r + 1) * nh * hs];
                    let diff = row
                        .iter()
                        .zip(flat(&want))
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(diff <= 1e-5, "nh{nh} nkv{nkv} hs{hs} row {r}: {diff}");
                }
            }
        }
    }

    #[test]
    fn gqa_bad_shapes_are_errors() {
        let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let (q, k3) = (t(&[1, 4, 5, 8]), t(&[1, 3, 5, 8]));
        for f in [causal_attention, causal_attention_reference] {
            // 3 kv heads do not divide 4 query heads.
            let e = f(&q, &k3, &k3, 1.0).unwrap_err().to_string();
            assert!(e.contains("must divide"), "{e}");
            // Head sizes differ.
            let k = t(&[1, 2, 5, 4]);
            assert!(f(&q, &k, &k, 1.0).is_err());
            // k and v disagree.
            assert!(f(&q, &t(&[1, 2, 5, 8]), &t(&[1, 1, 5, 8]), 1.0).is_err());
        }
        let qkv = t(&[2, 5, (4 + 2 * 2) * 8]);
        assert!(causal_attention_gqa_qkv(&qkv, 4, 2, 1.0).is_ok());
        assert!(causal_attention_gqa_qkv(&qkv, 4, 3, 1.0).is_err()); // 3 ∤ 4
        assert!(causal_attention_gqa_qkv(&qkv, 4, 0, 1.0).is_err());
        assert!(causal_attention_gqa_qkv(&qkv, 6, 3, 1.0).is_err()); // 64 ∤ 12 heads
        assert!(causal_attention_gqa_qkv(&t(&[5, 64]), 4, 2, 1.0).is_err());
        assert!(repeat_kv(&t(&[1, 2, 5, 8]), 0).is_err());
        assert!(repeat_kv(&t(&[2, 5, 8]), 2).is_err());
        let (kv, q) = (vec![0f32; 2 * 4 * 8], vec![0f32; 4 * 8]);
        let caches = [RowCache {
            k: &kv,
            v: &kv,
            len: 3,
        }];
        assert!(decode_rows(&q, &caches, (4, 2, 8, 4), 1.0).is_ok());
        assert!(decode_rows(&q, &caches, (4, 3, 8, 4), 1.0).is_err()); // 3 ∤ 4
        assert!(decode_rows(&q, &caches, (4, 0, 8, 4), 1.0).is_err());
        assert!(decode_rows(&q, &caches, (4, 4, 8, 4), 1.0).is_err()); // buffers too short
    }

    #[test]
    fn odd_length() {
        check(2, 3, 17, 17, 8, 1.0, 2);
        check(1, 2, 33, 33, 12, 1.0, 12); // hs not a multiple of 8 either
    }

    #[test]
    fn one_tile() {
        check(2, 4, 64, 64, 32, 1.0, 3);
    }

    #[test]
    fn crossing_tile_boundaries() {
        check(1, 2, 130, 130, 64, 1.0, 4);
    }

    #[test]
    fn fewer_queries_than_keys() {
        // KV-cache decoding: one new query, then a chunk of five, against cached keys.
        check(2, 2, 1, 9, 16, 1.0, 5);
        check(1, 3, 5, 12, 8, 1.0, 6);
        check(1, 2, 70, 150, 64, 1.0, 7);
        check(2, 3, 4, 300, 64, 1.0, 11); // the row-by-row forward
    }

    #[test]
    fn every_instruction_set_agrees() {
        // The kernels are built per instruction set; test each this CPU can run, not only
        // the one `causal_attention` picks. hs = 24 exercises the 16-wide and 1-wide strips.
        let mut isas = vec![Isa::Baseline];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                isas.push(Isa::Avx2);
                if is_x86_feature_detected!("avx512f") {
                    isas.push(Isa::Avx512);
                }
            }
        }
        let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (b, nh, tq, tk, hs) in [(2, 3, 70, 70, 24), (1, 2, 130, 200, 64), (1, 2, 3, 77, 24)] {
            let mut rng = ChaCha8Rng::seed_from_u64(10);
            let q = randn(&mut rng, &[b, nh, tq, hs], 1.0);
            let k = randn(&mut rng, &[b, nh, tk, hs], 1.0);
            let v = randn(&mut rng, &[b, nh, tk, hs], 1.0);
            let w = randn(&mut rng, &[b, nh, tq, hs], 1.0);
            let scale = 1.0 / (hs as f64).sqrt();
            let want = value_and_grads(causal_attention_reference, &q, &k, &v, &w, scale);
            let want: Vec<Vec<f32>> = want.iter().map(flat).collect();
            let d = Dims {
                heads: b * nh,
                group: 1,
                tq,
                tk,
                hs,
                scale: scale as f32,
            };
            let (q, k, v, w) = (flat(&q), flat(&k), flat(&v), flat(&w));
            for &isa in &isas {
                let (o, lse) = forward(isa, &q, (&k, d.tk * d.hs), (&v, d.tk * d.hs), d);
                let x = BwdInputs {
                    q: &q,
                    k: &k,
                    v: &v,
                    o: &o,
                    d_o: &w,
                    lse: &lse,
                };
                let (dq, dk, dv) = backward(isa, x, d);
                for (name, got, want) in [
                    ("y", &o, &want[0]),
                    ("dq", &dq, &want[1]),
                    ("dk", &dk, &want[2]),
                    ("dv", &dv, &want[3]),
                ] {
                    let diff = got
                        .iter()
                        .zip(want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(diff <= 1e-4, "{isa:?} {name}: {diff}");
                }
            }
        }
    }

    #[test]
    fn large_scores_stay_finite() {
        // q, k ~ N(0, 7²): scores q·k/sqrt(hs) have a standard deviation of 49, so rows are
        // dominated by one key and exp(s) alone would overflow f32 for scores above 88.
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (q, k) = (
            randn(&mut rng, &[1, 2, 80, 16], 7.0),
            randn(&mut rng, &[1, 2, 80, 16], 7.0),
        );
        let s = (q.matmul(&k.t().unwrap()).unwrap() * 0.25).unwrap();
        let s_max = s
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(s_max > 100.0, "scores reach only {s_max}");
        check(1, 2, 80, 80, 16, 7.0, 8);
    }

    #[test]
    fn uniform_attention_averages_the_values() {
        // q = 0: every visible key scores the same, so output row i is the mean of v[0..=i].
        let v = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 6, 2))
            .unwrap();
        let q = Tensor::zeros((1, 1, 6, 2), DType::F32, &Device::Cpu).unwrap();
        let want = [
            [0.0, 1.0],
            [1.0, 2.0],
            [2.0, 3.0],
            [3.0, 4.0],
            [4.0, 5.0],
            [5.0, 6.0],
        ];
        for f in [causal_attention, causal_attention_reference] {
            let y = f(&q, &v, &v, 0.7)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap();
            let y = y.to_vec2::<f32>().unwrap();
            for (got, want) in y.iter().zip(want) {
                assert!(
                    (got[0] - want[0]).abs() < 1e-6 && (got[1] - want[1]).abs() < 1e-6,
                    "{got:?} vs {want:?}"
                );
            }
        }
        // The last query of a KV-cache step sees everything: Tq = 2 against Tk = 6.
        let q = q.narrow(2, 0, 2).unwrap();
        let y = causal_attention(&q, &v, &v, 0.7)
            .unwrap()
            .flatten_all()
            .unwrap();
        assert_eq!(y.to_vec1::<f32>().unwrap(), vec![4.0, 5.0, 5.0, 6.0]);
    }

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let (got, want) = (exp::<Baseline>(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 2e-7, "relative error {worst}");
        assert!(exp::<Baseline>(-1e30) < 2e-38 && exp::<Baseline>(-1e30) >= 0.0);
    }

    #[test]
    fn non_contiguous_and_f16_inputs() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // (B, T, nh, hs) transposed to (B, nh, T, hs), as the model makes them.
        let x = randn(&mut rng, &[2, 10, 3, 8], 1.0)
            .transpose(1, 2)
            .unwrap();
        assert!(!x.is_contiguous());
        let fused = causal_attention(&x, &x, &x, 0.3).unwrap();
        let reference = causal_attention_reference(&x, &x, &x, 0.3).unwrap();
        assert!(max_abs_diff(&fused, &reference) <= 1e-5);
        // f16 takes the reference path and stays close to f32.
        let h = x.to_dtype(DType::F16).unwrap();
        let y = causal_attention(&h, &h, &h, 0.3).unwrap();
        assert_eq!(y.dtype(), DType::F16);
        assert!(max_abs_diff(&y.to_dtype(DType::F32).unwrap(), &reference) < 1e-2);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let e = causal_attention(&t(&[1, 2, 5, 8]), &t(&[1, 2, 4, 8]), &t(&[1, 2, 4, 8]), 1.0);
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("5 queries but only 4 keys"));
        let e = causal_attention(&t(&[1, 2, 4, 8]), &t(&[1, 2, 4, 4]), &t(&[1, 2, 4, 4]), 1.0);
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("must be (B, nh, Tq, hs)"));
        let e = causal_attention_reference(&t(&[2, 4, 8]), &t(&[2, 4, 8]), &t(&[2, 4, 8]), 1.0);
        assert!(e.unwrap_err().to_string().contains("q must be 4-D"));
    }
}
