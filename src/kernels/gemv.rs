//! Products of a few rows with an f16 or f32 weight matrix, for decoding (one sequence, a
//! batch of sequences, or a short prompt).
//!
//! Decoding one token multiplies a single row by every weight matrix, so its speed is the
//! speed at which the weights stream from memory: a GPT-2 124M reads 500 MB of f32 weights per
//! token, half that in f16. candle's CPU matmul in f16 (gemm) converts and packs its operands
//! for a full matrix product and ends up no faster than f32 for one row. Here each weight is
//! read once, converted to f32 in registers and multiplied into f32 accumulators, the output
//! columns split over rayon's threads. f32 weights take the same kernels (without the
//! conversion) in inference through a KV cache ([`streaming_f32`], [`linear_into`]): candle's
//! gemm packs its operands for one row too, where streaming them reads each weight once.
//!
//! A few rows at once (a prompt, a batch of sequences) share each read of the weights: on
//! AVX-512 a tile of up to 8 rows × 32 outputs keeps its sums in registers over 64 weight
//! rows at a time (`in_out_rows_tiled`), with the one-row kernel's multiply-adds in its order,
//! so a row comes out the same bits alone or in a batch. On 2 cores (GPT-2 124M, a 16-token
//! prompt, `gguf bench`) that took f32 prompts from 176 to 307 tokens/s (they went through
//! candle's gemm) and left f16 ones at 350; a KV cache no longer zero-filled for 1024
//! positions at each new conversation then took them to 489 and 503 (BENCHMARKS.md).
//!
//! [`matmul`] takes `x (rows, in)` and a weight either in Hugging Face's Conv1D layout
//! `(in, out)` or as the transpose of a contiguous `(out, in)` matrix (the tied head
//! `wteᵀ`), and falls back to candle's `matmul` for anything else (more than [`MAX_ROWS`]
//! rows, another dtype or device). It is differentiable (the backward uses candle's matmul).

use std::cell::Cell;

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use crate::layers::multiversion;
use crate::Result;

/// Up to this many rows (tokens decoded at once, a batch of sequences, a short prompt) take the
/// streaming kernels; candle's f16 gemm takes longer ones. Measured on 2 cores (GPT-2 124M,
/// f16): prefilling 12 tokens took 43.7 ms through gemm and 22.2 ms here, 64 tokens 116.7 ms
/// and 82.2 ms, so the kernels still win at 64 rows.
pub(crate) const MAX_ROWS: usize = 64;

thread_local! {
    /// Whether [`matmul`] streams f32 weights on this thread ([`streaming_f32`]).
    static STREAM_F32: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with [`matmul`] streaming f32 weights (as it always streams f16 ones) on this
/// thread: for inference through a KV cache ([`crate::Gpt::forward_with_cache`]: prompts and
/// decoding). Elsewhere f32 weights keep candle's gemm, so that a frozen f32 model gives the
/// bits of the same model trained (whose tracked weights always take gemm): a PPO
/// reference's KL to the policy at initialisation, a fresh LoRA adapter's logits against its
/// base, are exactly zero and exactly the base's.
///
/// On one of rayon's own threads it leaves the switch off: a worker waiting inside the scope
/// (in a parallel loop of the kernels) may run a job stolen from any other work, which would
/// then stream too. Threads outside the pool only block while the pool works.
pub(crate) fn streaming_f32<T>(f: impl FnOnce() -> T) -> T {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    super::with_flag(&STREAM_F32, f)
}

/// From this many rows on, the AVX-512 `(in, out)` kernel keeps its sums in registers
/// (`in_out_rows_tiled`, the same bits as the one-row kernel).
const TILED_MIN_ROWS: usize = 2;

/// Below this many multiply-adds a product runs on the calling thread.
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// `x (rows, in) @ w (in, out)` for an f16 or f32 weight and f32 (or f16) activations, returned in
/// `x`'s dtype. Through the streaming kernels (f32 weights only inside [`streaming_f32`]) when
/// both are CPU tensors, `rows <= MAX_ROWS`,
/// `w` is contiguous `(in, out)` or the transpose of a contiguous `(out, in)`, and neither
/// needs gradients (the kernels have no backward); otherwise candle's `matmul`, with `x`
/// converted to `w`'s dtype and the result back where they differ.
///
/// # Errors
/// candle's errors for mismatched shapes, dtypes or devices.
pub(crate) fn matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    // f32 weights stream in inference through a KV cache ([`linear_into`], [`streaming_f32`])
    // only: another
    // forward pass of a constant f32 model stays candle's gemm, bit for bit the product a
    // trainable twin computes (the stages compare the two, e.g. PPO's ratio of exactly 1).
    let streaming = x.device().is_cpu()
        && (w.dtype() == DType::F16 || (w.dtype() == DType::F32 && STREAM_F32.with(Cell::get)))
        && matches!(x.dtype(), DType::F16 | DType::F32)
        && x.rank() == 2
        && x.dim(0)? <= MAX_ROWS
        && weight_layout(w.layout()).is_some()
        && w.dims().first() == x.dims().last()
        && !x.track_op()
        && !w.track_op();
    if streaming {
        return Ok(x.contiguous()?.apply_op2_no_bwd(w, &StreamMatmul)?);
    }
    if x.dtype() != w.dtype() {
        return Ok(matmul(&x.to_dtype(w.dtype())?, w)?.to_dtype(x.dtype())?);
    }
    if x.device().is_cpu() && x.rank() == 2 && w.rank() == 2 && x.track_op() && !w.track_op() {
        // A frozen weight (a LoRA model's base): only `dx` is needed.
        return Ok(x.apply_op2(w, FrozenRhsMatmul)?);
    }
    Ok(x.matmul(w)?)
}

/// `x (m, k) @ w (k, n)` by candle's own CPU gemm (`w` may be a transposed view), for a
/// constant `w`: the backward is `dx = dy @ wᵀ` and nothing for `w`. candle's matmul would
/// also compute, and keep until the backward pass ends, `dw`, a gradient of a frozen weight
/// that nothing reads.
struct FrozenRhsMatmul;

impl CustomOp2 for FrozenRhsMatmul {
    fn name(&self) -> &'static str {
        "frozen-rhs-matmul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (m, k) = l1.shape().dims2()?;
        let (k2, n) = l2.shape().dims2()?;
        if k != k2 {
            candle_core::bail!("frozen-rhs-matmul: ({m}, {k}) @ ({k2}, {n})");
        }
        Ok((s1.matmul(s2, (1, m, n, k), l1, l2)?, Shape::from((m, n))))
    }

    fn bwd(
        &self,
        _: &Tensor,
        w: &Tensor,
        _: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&w.t()?)?), None))
    }
}

/// `y (rows, out) = x (rows, in) @ w` into `y`, for the decoding steps of
/// [`crate::kernels::decode_step`]: `w` an f16 or f32 CPU weight that [`matmul`] would stream
/// (contiguous `(in, out)`, or the transpose of a contiguous `(out, in)`), `x` f32. The same
/// kernels and the same split as [`matmul`], so the outputs are bit for bit [`matmul`]'s,
/// without a tensor made for either side. One row of an `(out, in)` weight (a Llama
/// projection, the tied head) is written where it lies, each thread taking a block of outputs.
///
/// # Errors
/// [`crate::Error::InvalidArgument`] if `w` is not such a weight or the sizes disagree.
pub(crate) fn linear_into(x: &[f32], rows: usize, w: &Tensor, y: &mut [f32]) -> Result<()> {
    let (storage, layout) = w.storage_and_layout();
    let kind = weight_layout(layout);
    let (d_in, d_out) = match layout.dims() {
        [a, b] => (*a, *b),
        _ => (0, 0),
    };
    let range = layout.start_offset()..layout.start_offset() + d_in * d_out;
    let unfit = || {
        crate::Error::InvalidArgument(format!(
            "decoding: a weight of shape {:?} and dtype {:?} is not a streamable f16 or f32 CPU weight",
            layout.dims(),
            w.dtype()
        ))
    };
    let kind = kind.ok_or_else(unfit)?;
    if x.len() != rows * d_in || y.len() != rows * d_out {
        return Err(crate::Error::InvalidArgument(format!(
            "decoding: {rows} rows of {} inputs into {} outputs do not fit a ({d_in}, {d_out}) weight",
            x.len(),
            y.len()
        )));
    }
    match &*storage {
        candle_core::Storage::Cpu(CpuStorage::F16(v)) => {
            let w_all: &[u16] = v.reinterpret_cast();
            let w = w_all.get(range).ok_or_else(unfit)?;
            linear_rows_into(x, rows, d_in, w, d_out, kind, y);
        }
        candle_core::Storage::Cpu(CpuStorage::F32(v)) => {
            let w = v.get(range).ok_or_else(unfit)?;
            linear_rows_into(x, rows, d_in, w, d_out, kind, y);
        }
        _ => return Err(unfit()),
    }
    Ok(())
}

/// [`linear_into`] on the weight's elements, `w` holding the `(in, out)` or `(out, in)`
/// matrix that `kind` says.
fn linear_rows_into<W: Weight>(
    x: &[f32],
    rows: usize,
    d_in: usize,
    w: &[W],
    d_out: usize,
    kind: WeightLayout,
    y: &mut [f32],
) {
    match kind {
        WeightLayout::OutIn if rows == 1 => {
            let len = chunk_len(d_out, d_in * d_out);
            y.par_chunks_mut(len).enumerate().for_each(|(c, part)| {
                let j0 = c * len;
                out_in_chunk_best(x, d_in, &w[j0 * d_in..(j0 + part.len()) * d_in], part);
            });
        }
        WeightLayout::OutIn => y.copy_from_slice(&out_in(x, rows, d_in, w, d_out)),
        WeightLayout::InOut => y.copy_from_slice(&in_out(x, rows, d_in, w, d_out)),
    }
}

/// A weight element the streaming kernels read: f16 bits (`u16`) or `f32`.
trait Weight: Copy + Send + Sync + 'static {
    /// Whether the element is an f16 (bits), which the AVX-512 kernels convert with
    /// `vcvtph2ps`; otherwise an f32, loaded as it is.
    const HALF: bool;

    /// The element's value as f32.
    fn to_f32(self) -> f32;

    /// The portable (auto-vectorised) [`in_out_rows`] for this element type.
    fn in_out_rows(x: &[f32], d_in: usize, w: &[Self], d_out: usize, i0: usize, acc: &mut [f32]);

    /// The portable (auto-vectorised) [`out_in_chunk`] for this element type.
    fn out_in_chunk(x: &[f32], d_in: usize, w: &[Self], part: &mut [f32]);
}

impl Weight for u16 {
    const HALF: bool = true;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_to_f32(self)
    }

    fn in_out_rows(x: &[f32], d_in: usize, w: &[u16], d_out: usize, i0: usize, acc: &mut [f32]) {
        in_out_rows(x, d_in, w, d_out, i0, acc)
    }

    fn out_in_chunk(x: &[f32], d_in: usize, w: &[u16], part: &mut [f32]) {
        out_in_chunk(x, d_in, w, part)
    }
}

impl Weight for f32 {
    const HALF: bool = false;

    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    fn in_out_rows(x: &[f32], d_in: usize, w: &[f32], d_out: usize, i0: usize, acc: &mut [f32]) {
        in_out_rows_f32(x, d_in, w, d_out, i0, acc)
    }

    fn out_in_chunk(x: &[f32], d_in: usize, w: &[f32], part: &mut [f32]) {
        out_in_chunk_f32(x, d_in, w, part)
    }
}

/// How a weight `(in, out)` lies in memory.
#[derive(Debug, Clone, Copy, PartialEq)]
enum WeightLayout {
    /// Row-major `(in, out)`: row `i` holds the weights from input `i` to every output.
    InOut,
    /// The transpose of a row-major `(out, in)`: row `j` of the storage holds output `j`'s
    /// weights from every input (the tied head `wteᵀ`).
    OutIn,
}

fn weight_layout(l: &Layout) -> Option<WeightLayout> {
    let [d_in, d_out] = l.dims() else { return None };
    match l.stride() {
        [s0, 1] if *s0 == *d_out => Some(WeightLayout::InOut),
        [1, s1] if *s1 == *d_in => Some(WeightLayout::OutIn),
        _ => None,
    }
}

/// The op over `(x, w)`, forward only: [`matmul`] applies it where no gradient is needed.
struct StreamMatmul;

impl CustomOp2 for StreamMatmul {
    fn name(&self) -> &'static str {
        "tinygpt-gemv"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, d_in) = xl.shape().dims2()?;
        let (_, d_out) = wl.shape().dims2()?;
        let (Some((x0, x1)), Some(kind)) = (xl.contiguous_offsets(), weight_layout(wl)) else {
            candle_core::bail!("gemv: unexpected layouts")
        };
        let x: Vec<f32> = match xs {
            CpuStorage::F32(v) => v[x0..x1].to_vec(),
            CpuStorage::F16(v) => {
                let mut x = vec![0f32; rows * d_in];
                v[x0..x1].convert_to_f32_slice(&mut x);
                x
            }
            _ => candle_core::bail!("gemv: activations must be f32 or f16"),
        };
        let range = wl.start_offset()..wl.start_offset() + d_in * d_out;
        let too_big = || candle_core::Error::Msg("gemv: weight exceeds its storage".into());
        let y = match ws {
            CpuStorage::F16(v) => {
                let w_all: &[u16] = v.reinterpret_cast();
                let w = w_all.get(range).ok_or_else(too_big)?;
                match kind {
                    WeightLayout::InOut => in_out(&x, rows, d_in, w, d_out),
                    WeightLayout::OutIn => out_in(&x, rows, d_in, w, d_out),
                }
            }
            CpuStorage::F32(v) => {
                let w = v.get(range).ok_or_else(too_big)?;
                match kind {
                    WeightLayout::InOut => in_out(&x, rows, d_in, w, d_out),
                    WeightLayout::OutIn => out_in(&x, rows, d_in, w, d_out),
                }
            }
            _ => candle_core::bail!("gemv: weights must be f16 or f32"),
        };
        let out = match xs {
            CpuStorage::F16(_) => {
                let mut out = vec![f16::ZERO; y.len()];
                out.convert_from_f32_slice(&y);
                CpuStorage::F16(out)
            }
            _ => CpuStorage::F32(y),
        };
        Ok((out, Shape::from((rows, d_out))))
    }
}

/// Output chunks for the threads over `n` outputs, in multiples of 16.
fn chunk_len(n: usize, work: usize) -> usize {
    let threads = if work >= PARALLEL_MIN_WORK {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    n.div_ceil(threads).div_ceil(16).max(1) * 16
}

/// `y (rows, out) = x (rows, in) @ w`, `w` row-major `(in, out)` (f16 bits or f32). The inputs
/// (rows of `w`) are split over the threads, so each thread streams one contiguous block of
/// the weights into a whole-width partial sum; the partial sums are added in order.
fn in_out<W: Weight>(x: &[f32], rows: usize, d_in: usize, w: &[W], d_out: usize) -> Vec<f32> {
    // Decided by one row's work, not all rows': the split sets the order in which a row's
    // partial sums are added, and a row must come out the same alone or in a batch.
    let threads = if d_in * d_out >= PARALLEL_MIN_WORK {
        rayon::current_num_threads().clamp(1, d_in.max(1))
    } else {
        1
    };
    let len = d_in.div_ceil(threads).div_ceil(4).max(1) * 4;
    let starts: Vec<usize> = (0..d_in).step_by(len).collect();
    let parts: Vec<Vec<f32>> = starts
        .par_iter()
        .map(|&i0| {
            let i1 = (i0 + len).min(d_in);
            let mut acc = vec![0f32; rows * d_out];
            in_out_rows_best(x, d_in, &w[i0 * d_out..i1 * d_out], d_out, i0, &mut acc);
            acc
        })
        .collect();
    let mut parts = parts.into_iter();
    let mut y = parts.next().unwrap_or_else(|| vec![0f32; rows * d_out]);
    for p in parts {
        for (a, b) in y.iter_mut().zip(&p) {
            *a += b;
        }
    }
    y
}

/// `y (rows, out) = x (rows, in) @ wᵀ`, `w` row-major `(out, in)` (f16 bits or f32).
fn out_in<W: Weight>(x: &[f32], rows: usize, d_in: usize, w: &[W], d_out: usize) -> Vec<f32> {
    let len = chunk_len(d_out, rows * d_in * d_out);
    let starts: Vec<usize> = (0..d_out).step_by(len).collect();
    let parts: Vec<Vec<f32>> = starts
        .par_iter()
        .map(|&j0| {
            let n = len.min(d_out - j0);
            let mut part = vec![0f32; rows * n];
            out_in_chunk_best(x, d_in, &w[j0 * d_in..(j0 + n) * d_in], &mut part);
            part
        })
        .collect();
    let mut y = vec![0f32; rows * d_out];
    for (&j0, part) in starts.iter().zip(&parts) {
        let n = part.len() / rows.max(1);
        for r in 0..rows {
            y[r * d_out + j0..r * d_out + j0 + n].copy_from_slice(&part[r * n..(r + 1) * n]);
        }
    }
    y
}

/// f16 bits to f32, branch-free so that loops of it vectorise: the exponent and mantissa
/// shifted into an f32 and rescaled by 2¹¹² (exact for normal and subnormal halves, whose
/// f32 images are then normal or subnormal), infinities and NaNs given the f32's all-ones
/// exponent, then the sign.
#[inline(always)]
fn f16_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let em = h & 0x7fff;
    let scaled = f32::from_bits(em << 13) * f32::from_bits(0x7780_0000); // × 2^112
    let v = if em >= 0x7c00 {
        f32::from_bits((em << 13) | 0x7f80_0000)
    } else {
        scaled
    };
    f32::from_bits(v.to_bits() | ((h & 0x8000) << 16))
}

/// Adds `x[.., i0 + k] · w[k, ..]` over the weight rows `w` (row-major, `d_out` wide) into
/// each row's accumulator `acc[r·d_out..]`. Four weight rows at a time: each pass over the
/// accumulator then adds four (a quarter of the accumulator traffic). Inlined into the
/// multiversioned [`in_out_rows`] (f16) and [`in_out_rows_f32`].
#[inline(always)]
fn in_out_rows_generic<W: Weight>(
    x: &[f32],
    d_in: usize,
    w: &[W],
    d_out: usize,
    i0: usize,
    acc: &mut [f32],
) {
    let n_w = w.len() / d_out.max(1);
    let row = |k: usize| &w[k * d_out..(k + 1) * d_out];
    let mut k = 0;
    while k + 4 <= n_w {
        let (w0, w1, w2, w3) = (row(k), row(k + 1), row(k + 2), row(k + 3));
        for (out, xr) in acc.chunks_exact_mut(d_out).zip(x.chunks_exact(d_in)) {
            let i = i0 + k;
            let (a0, a1, a2, a3) = (xr[i], xr[i + 1], xr[i + 2], xr[i + 3]);
            let cols = out.iter_mut().zip(w0).zip(w1).zip(w2).zip(w3);
            for ((((o, &h0), &h1), &h2), &h3) in cols {
                *o += a0 * h0.to_f32() + a1 * h1.to_f32() + a2 * h2.to_f32() + a3 * h3.to_f32();
            }
        }
        k += 4;
    }
    for k in k..n_w {
        let w0 = row(k);
        for (out, xr) in acc.chunks_exact_mut(d_out).zip(x.chunks_exact(d_in)) {
            let a0 = xr[i0 + k];
            for (o, &h0) in out.iter_mut().zip(w0) {
                *o += a0 * h0.to_f32();
            }
        }
    }
}

/// Outputs `0..w.len() / in` of `x @ wᵀ` for weight rows `w` (row-major, `in` wide), into
/// `part` (rows, n): each weight row dotted with every row of `x`. Inlined into the
/// multiversioned [`out_in_chunk`] (f16) and [`out_in_chunk_f32`].
#[inline(always)]
fn out_in_chunk_generic<W: Weight>(x: &[f32], d_in: usize, w: &[W], part: &mut [f32]) {
    let n = w.len() / d_in.max(1);
    for (j, wr) in w.chunks_exact(d_in).enumerate() {
        for (r, xr) in x.chunks_exact(d_in).enumerate() {
            part[r * n + j] = dot(xr, wr);
        }
    }
}

multiversion! {
    /// [`in_out_rows_generic`] for f16 weights (bits).
    fn in_out_rows(x: &[f32], d_in: usize, w: &[u16], d_out: usize, i0: usize, acc: &mut [f32]) {
        in_out_rows_generic(x, d_in, w, d_out, i0, acc)
    }
}

multiversion! {
    /// [`in_out_rows_generic`] for f32 weights.
    fn in_out_rows_f32(x: &[f32], d_in: usize, w: &[f32], d_out: usize, i0: usize, acc: &mut [f32]) {
        in_out_rows_generic(x, d_in, w, d_out, i0, acc)
    }
}

multiversion! {
    /// [`out_in_chunk_generic`] for f16 weights (bits).
    fn out_in_chunk(x: &[f32], d_in: usize, w: &[u16], part: &mut [f32]) {
        out_in_chunk_generic(x, d_in, w, part)
    }
}

multiversion! {
    /// [`out_in_chunk_generic`] for f32 weights.
    fn out_in_chunk_f32(x: &[f32], d_in: usize, w: &[f32], part: &mut [f32]) {
        out_in_chunk_generic(x, d_in, w, part)
    }
}

/// Σ a·f32(b) with sixteen running sums, so the loop vectorises.
#[inline(always)]
fn dot<W: Weight>(a: &[f32], b: &[W]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let rest: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &h)| x * h.to_f32())
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for ((s, &x), &h) in acc.iter_mut().zip(xa).zip(xb) {
            *s += x * h.to_f32();
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// [`in_out_rows`] (or [`in_out_rows_f32`]) with AVX-512F intrinsics where the CPU has them.
fn in_out_rows_best<W: Weight>(
    x: &[f32],
    d_in: usize,
    w: &[W],
    d_out: usize,
    i0: usize,
    acc: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, the one feature the functions are compiled for.
        return unsafe {
            if acc.len() >= TILED_MIN_ROWS * d_out {
                avx512::in_out_rows_tiled(x, d_in, w, d_out, i0, acc)
            } else {
                avx512::in_out_rows(x, d_in, w, d_out, i0, acc)
            }
        };
    }
    W::in_out_rows(x, d_in, w, d_out, i0, acc)
}

/// [`out_in_chunk`] (or [`out_in_chunk_f32`]) with AVX-512F intrinsics where the CPU has them.
fn out_in_chunk_best<W: Weight>(x: &[f32], d_in: usize, w: &[W], part: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F, the one feature the function is compiled for.
        return unsafe { avx512::out_in_chunk(x, d_in, w, part) };
    }
    W::out_in_chunk(x, d_in, w, part)
}

/// The two kernels with AVX-512F intrinsics, generic over the weight element: `vcvtph2ps`
/// turns 16 halves into 16 floats in one instruction, where the portable conversion takes
/// about seven, which made the portable kernels compute-bound below the memory bandwidth; f32
/// weights are loaded as they are, the sums taken in the same order. Multiply-adds are fused here, so results
/// may differ from the portable kernels' in the last bit.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::Weight;

    /// Sixteen weights from `p` as f32: f16 bits converted by `vcvtph2ps`, f32 loaded. `W`'s
    /// `HALF` is a constant, so each instance keeps one of the two.
    macro_rules! load16 {
        ($w:ty, $p:expr) => {{
            let p = $p;
            if <$w as Weight>::HALF {
                _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
            } else {
                _mm512_loadu_ps(p as *const f32)
            }
        }};
    }

    /// Prefetches the weights `OUT_IN_PREFETCH_BYTES` past `p`: one 64-byte line per 32 f16
    /// weights, two per 32 f32 weights.
    macro_rules! prefetch {
        ($w:ty, $p:expr) => {{
            let ahead = ($p as *const i8).wrapping_add(OUT_IN_PREFETCH_BYTES);
            _mm_prefetch::<_MM_HINT_T0>(ahead);
            if !<$w as Weight>::HALF {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
            }
        }};
    }

    /// Weight rows per pass of [`in_out_rows`]: each pass loads and stores every row's
    /// accumulator once, for this many multiply-adds per element.
    const GROUP: usize = 8;

    /// `sum + Σ c[q] · wv[q]` over one group of `GROUP` weight rows, in two chains of
    /// multiply-adds (even and odd rows, so each waits on half as many) added at the end:
    /// the one order both `(in, out)` kernels sum in, so their rows agree bit for bit.
    ///
    /// # Safety
    /// AVX-512F, and `c` points at `GROUP` readable floats.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn add_group(sum: __m512, c: *const f32, wv: &[__m512; GROUP]) -> __m512 {
        // SAFETY: `c` holds GROUP floats (the caller's guarantee).
        unsafe {
            let mut even = sum;
            let mut odd = _mm512_mul_ps(_mm512_set1_ps(*c.add(1)), wv[1]);
            for q in (0..GROUP).step_by(2) {
                even = _mm512_fmadd_ps(_mm512_set1_ps(*c.add(q)), wv[q], even);
                if q > 0 {
                    odd = _mm512_fmadd_ps(_mm512_set1_ps(*c.add(q + 1)), wv[q + 1], odd);
                }
            }
            _mm512_add_ps(even, odd)
        }
    }

    /// As [`super::in_out_rows`]. Each pass converts a 16-wide strip of `GROUP` weight rows
    /// once and adds it into every activation row's accumulator, so several rows share one
    /// read and one conversion of the weights. A row's sums are taken in the same order
    /// whatever the number of rows (bit-identical results alone or in a batch).
    #[target_feature(enable = "avx512f")]
    pub(super) fn in_out_rows<W: Weight>(
        x: &[f32],
        d_in: usize,
        w: &[W],
        d_out: usize,
        i0: usize,
        acc: &mut [f32],
    ) {
        let n_w = w.len() / d_out.max(1);
        let rows = (acc.len() / d_out.max(1)).min(x.len() / d_in.max(1));
        if rows > super::MAX_ROWS {
            // Never taken (`matmul` sends at most MAX_ROWS rows); kept for safety.
            for (a, xr) in acc.chunks_exact_mut(d_out).zip(x.chunks_exact(d_in)) {
                in_out_rows::<W>(xr, d_in, w, d_out, i0, a);
            }
            return;
        }
        let row = |k: usize| &w[k * d_out..(k + 1) * d_out];
        let vec_end = d_out / 16 * 16;
        let mut coef = [0f32; GROUP * super::MAX_ROWS];
        let mut k = 0;
        while k < n_w {
            let take = (n_w - k).min(GROUP);
            // Rows past `take` repeat the last one with a zero coefficient.
            let ws: [&[W]; GROUP] = std::array::from_fn(|q| row(k + q.min(take - 1)));
            for r in 0..rows {
                for q in 0..GROUP {
                    coef[r * GROUP + q] = if q < take {
                        x[r * d_in + i0 + k + q]
                    } else {
                        0.0
                    };
                }
            }
            let mut j = 0;
            while j < vec_end {
                // SAFETY: j + 16 <= d_out, the length of every `ws[q]` and of each row's
                // accumulator `acc[r·d_out..(r+1)·d_out]` (r < rows <= acc.len() / d_out).
                unsafe {
                    let wv: [__m512; GROUP] =
                        std::array::from_fn(|q| load16!(W, ws[q].as_ptr().add(j)));
                    for r in 0..rows {
                        let p = acc.as_mut_ptr().add(r * d_out + j);
                        let c = coef.as_ptr().add(r * GROUP);
                        _mm512_storeu_ps(p, add_group(_mm512_loadu_ps(p), c, &wv));
                    }
                }
                j += 16;
            }
            for r in 0..rows {
                let out = &mut acc[r * d_out..(r + 1) * d_out];
                for j in vec_end..d_out {
                    for q in 0..GROUP {
                        out[j] += coef[r * GROUP + q] * ws[q][j].to_f32();
                    }
                }
            }
            k += take;
        }
    }

    /// Activation rows per register tile of [`in_out_rows_tiled`].
    const TILE_ROWS: usize = 8;
    /// 16-wide output strips per register tile: `TILE_ROWS × TILE_STRIPS` accumulators and
    /// `GROUP` weight vectors stay in the 32 registers.
    const TILE_STRIPS: usize = 2;
    /// Weight rows per block of [`in_out_rows_tiled`] (a multiple of `GROUP`): a block's
    /// panel (`KBLOCK × 16·TILE_STRIPS` weights, 8 KB in f32) stays in L1 while every row
    /// tile passes over it.
    const KBLOCK: usize = 64;
    // `in_out_rows_tiled`'s dispatch lists every tile shape up to these.
    const _: () = assert!(TILE_ROWS == 8 && TILE_STRIPS == 2 && KBLOCK.is_multiple_of(GROUP));

    /// As [`in_out_rows`], bit for bit (the same multiply-adds in the same order for every
    /// output), for several activation rows: each tile of `TILE_ROWS` rows by
    /// `TILE_STRIPS` strips keeps its sums in registers over a block of `KBLOCK` weight rows,
    /// where [`in_out_rows`] loads and stores every row's accumulator once per `GROUP` weight
    /// rows (for a 16-token prompt that traffic came from L2 and bounded the speed). The
    /// first row tile over a panel prefetches the next two panels' weights.
    #[target_feature(enable = "avx512f")]
    pub(super) fn in_out_rows_tiled<W: Weight>(
        x: &[f32],
        d_in: usize,
        w: &[W],
        d_out: usize,
        i0: usize,
        acc: &mut [f32],
    ) {
        let n_w = w.len() / d_out.max(1);
        let rows = (acc.len() / d_out.max(1)).min(x.len() / d_in.max(1));
        debug_assert!(x.len() >= rows * d_in && i0 + n_w <= d_in);
        if rows == 0 || n_w == 0 || x.len() < rows * d_in || i0 + n_w > d_in {
            return; // never: the caller passes whole rows and a slab of `w` inside `x`'s width
        }
        let vec_end = d_out / 16 * 16;
        let mut kb = 0;
        while kb < n_w {
            let kb_end = (kb + KBLOCK).min(n_w);
            let mut j = 0;
            while j < vec_end {
                let strips = ((vec_end - j) / 16).min(TILE_STRIPS);
                let mut r = 0;
                while r < rows {
                    let rt = (rows - r).min(TILE_ROWS);
                    let at = Tile {
                        d_in,
                        d_out,
                        n_w,
                        i0,
                        k0: kb,
                        k1: kb_end,
                        j,
                        r0: r,
                    };
                    let prefetch = r == 0;
                    macro_rules! dispatch {
                        ($(($rn:literal, $sn:literal))*) => {
                            match (rt, strips) {
                                // SAFETY: r + rt <= rows and j + 16·strips <= vec_end <= d_out,
                                // and the weight rows kb..kb_end lie in `w` (checked above).
                                $(($rn, $sn) => unsafe {
                                    tile::<W, $rn, $sn>(x, w, acc, &at, prefetch)
                                },)*
                                _ => {}
                            }
                        };
                    }
                    dispatch!(
                        (1, 1)(2, 1)(3, 1)(4, 1)(5, 1)(6, 1)(7, 1)(8, 1)(1, 2)(2, 2)(3, 2)(4, 2)(
                            5, 2
                        )(6, 2)(7, 2)(8, 2)
                    );
                    r += rt;
                }
                j += strips * 16;
            }
            kb = kb_end;
        }
        // The last `d_out % 16` outputs as [`in_out_rows`] sums them.
        if vec_end < d_out {
            let mut k = 0;
            while k < n_w {
                let take = (n_w - k).min(GROUP);
                for r in 0..rows {
                    let out = &mut acc[r * d_out..(r + 1) * d_out];
                    for jj in vec_end..d_out {
                        for q in 0..GROUP {
                            let c = if q < take {
                                x[r * d_in + i0 + k + q]
                            } else {
                                0.0
                            };
                            out[jj] += c * w[(k + q.min(take - 1)) * d_out + jj].to_f32();
                        }
                    }
                }
                k += take;
            }
        }
    }

    /// Where a register tile of [`in_out_rows_tiled`] lies: weight rows `k0..k1` of `n_w`
    /// (inputs `i0 + k`), outputs from `j`, activation rows from `r0`.
    #[derive(Clone, Copy)]
    struct Tile {
        d_in: usize,
        d_out: usize,
        n_w: usize,
        i0: usize,
        k0: usize,
        k1: usize,
        j: usize,
        r0: usize,
    }

    /// One register tile: `R` rows × `S` strips of sums, loaded from `acc`, given the
    /// weight rows `k0..k1` in groups of `GROUP` (as [`in_out_rows`] takes them: an even
    /// and an odd chain per group, the last group padded with the last row at a zero
    /// coefficient), and stored back.
    ///
    /// # Safety
    /// AVX-512F; rows `r0..r0 + R` of `x` and `acc`, outputs `j..j + 16·S` and weight rows
    /// `k0..k1` (inputs `i0 + k`) in bounds.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // `t` and `s` index the tile and its rows alike
    unsafe fn tile<W: Weight, const R: usize, const S: usize>(
        x: &[f32],
        w: &[W],
        acc: &mut [f32],
        at: &Tile,
        prefetch: bool,
    ) {
        let Tile {
            d_in,
            d_out,
            n_w,
            i0,
            k0,
            k1,
            j,
            r0,
        } = *at;
        let (xp, wp, ap) = (x.as_ptr(), w.as_ptr(), acc.as_mut_ptr());
        // SAFETY (all pointer arithmetic below): the bounds the caller guarantees.
        unsafe {
            let mut a = [[_mm512_setzero_ps(); S]; R];
            for t in 0..R {
                for s in 0..S {
                    a[t][s] = _mm512_loadu_ps(ap.add((r0 + t) * d_out + j + 16 * s));
                }
            }
            let mut pad = [[0f32; GROUP]; R];
            let mut k = k0;
            while k < k1 {
                let take = (n_w - k).min(GROUP);
                let c: [*const f32; R] = if take == GROUP {
                    std::array::from_fn(|t| xp.add((r0 + t) * d_in + i0 + k))
                } else {
                    for (t, p) in pad.iter_mut().enumerate() {
                        for (q, v) in p.iter_mut().enumerate() {
                            *v = if q < take {
                                *xp.add((r0 + t) * d_in + i0 + k + q)
                            } else {
                                0.0
                            };
                        }
                    }
                    std::array::from_fn(|t| pad[t].as_ptr())
                };
                let wr: [*const W; GROUP] =
                    std::array::from_fn(|q| wp.add((k + q.min(take - 1)) * d_out + j));
                if prefetch {
                    // The next panel's weights for these rows into L1, the one after into
                    // L2 (past a row's end: the next row's first; a prefetch never faults).
                    // Without them a 16-token f32 prompt ran at 0.6× the speed, the next
                    // panel alone gave 0.9× (measured on 2 cores, GPT-2 124M).
                    let lines = (16 * S * std::mem::size_of::<W>()).div_ceil(64);
                    for p in wr {
                        let next = p.wrapping_add(16 * S) as *const i8;
                        let after = p.wrapping_add(32 * S) as *const i8;
                        for line in 0..lines {
                            _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64 * line));
                            _mm_prefetch::<_MM_HINT_T1>(after.wrapping_add(64 * line));
                        }
                    }
                }
                for s in 0..S {
                    let wv: [__m512; GROUP] =
                        std::array::from_fn(|q| load16!(W, wr[q].add(16 * s)));
                    for t in 0..R {
                        a[t][s] = add_group(a[t][s], c[t], &wv);
                    }
                }
                k += take;
            }
            for t in 0..R {
                for s in 0..S {
                    _mm512_storeu_ps(ap.add((r0 + t) * d_out + j + 16 * s), a[t][s]);
                }
            }
        }
    }

    /// Weight rows per register tile of [`out_in_chunk`].
    const OUT_TILE_W: usize = 4;
    /// Activation rows per register tile of [`out_in_chunk`]: `OUT_TILE_W × OUT_TILE_X` sums,
    /// the tile's weight vectors and one activation vector fill 29 of the 32 registers.
    const OUT_TILE_X: usize = 6;
    // `out_in_chunk`'s dispatch lists every tile shape up to these.
    const _: () = assert!(OUT_TILE_W == 4 && OUT_TILE_X == 6);

    /// As [`super::out_in_chunk`], in register tiles of up to `OUT_TILE_W` weight rows ×
    /// `OUT_TILE_X` activation rows (tinyBLAS's shape in llama.cpp): per 16 inputs the tile
    /// loads (and converts) each of its weight rows once and each activation row once, for
    /// 24 multiply-adds from 10 loads, where one weight row against one activation row at a
    /// time took a load per multiply-add and held a 16-token prompt to 0.6× llama.cpp's
    /// speed. Every (weight row, activation row) pair is one 16-lane running sum over the
    /// inputs in order, reduced, then the last `in % 16` inputs added in order: the same
    /// whatever the tile, so a row comes out the same bits alone or in a batch. A decoding
    /// step (one row) takes tiles of four weight rows, four streams from memory in flight.
    #[target_feature(enable = "avx512f")]
    pub(super) fn out_in_chunk<W: Weight>(x: &[f32], d_in: usize, w: &[W], part: &mut [f32]) {
        let n = w.len() / d_in.max(1);
        let rows = (x.len() / d_in.max(1)).min(part.len() / n.max(1));
        let mut j = 0;
        while j < n {
            // (Eight weight rows for one activation row decoded f16 ~5% slower than four.)
            let wt = (n - j).min(OUT_TILE_W);
            // One row streams the weights from memory a few KB ahead of its loads. Several
            // rows find the tile's weights in cache after the first activation tile, so every
            // activation tile asks for its share of the next weight tile's rows: the loads
            // from memory spread over all the tile's work instead of stalling the first.
            let next = w.as_ptr().wrapping_add((j + wt) * d_in) as *const i8;
            let next_bytes = (n - j - wt).min(wt) * d_in * std::mem::size_of::<W>();
            let tiles = rows.div_ceil(OUT_TILE_X);
            let mut r = 0;
            while r < rows {
                let xt = (rows - r).min(OUT_TILE_X);
                let g = r / OUT_TILE_X;
                let prefetch = if rows == 1 {
                    Prefetch::Ahead
                } else {
                    let (a, b) = (g * next_bytes / tiles, (g + 1) * next_bytes / tiles);
                    Prefetch::Range(next.wrapping_add(a), b - a)
                };
                macro_rules! dispatch {
                    ($(($wn:literal, $xn:literal))*) => {
                        match (wt, xt) {
                            // SAFETY: j + wt <= n weight rows of `d_in` lie in `w`, r + xt
                            // <= rows activation rows in `x`.
                            $(($wn, $xn) => {
                                let s = unsafe {
                                    out_in_tile::<W, $wn, $xn>(x, w, d_in, (j, r), prefetch)
                                };
                                for (q, col) in s.iter().enumerate() {
                                    for (t, &v) in col.iter().enumerate() {
                                        part[(r + t) * n + j + q] = v;
                                    }
                                }
                            })*
                            _ => {}
                        }
                    };
                }
                dispatch!(
                    (1, 1)(1, 2)(1, 3)(1, 4)(1, 5)(1, 6)(2, 1)(2, 2)(2, 3)(2, 4)(2, 5)(2, 6)(3, 1)(
                        3, 2
                    )(3, 3)(3, 4)(3, 5)(3, 6)(4, 1)(4, 2)(4, 3)(4, 4)(4, 5)(
                        4, 6
                    )
                );
                r += xt;
            }
            j += wt;
        }
    }

    /// How far ahead, in bytes, [`out_in_tile`] prefetches the weights of one row.
    const OUT_IN_PREFETCH_BYTES: usize = 8192;

    /// What [`out_in_tile`] prefetches while it computes.
    #[derive(Clone, Copy)]
    enum Prefetch {
        /// Its weight rows, `OUT_IN_PREFETCH_BYTES` ahead of each load (one activation row).
        Ahead,
        /// These bytes (a share of the next tile's weight rows), spread over its loop.
        Range(*const i8, usize),
    }

    /// The dot products of weight rows `j..j + WN` with activation rows `r..r + XN` (both
    /// row-major, `d_in` wide), as `[weight row][activation row]`.
    ///
    /// # Safety
    /// AVX-512F; `w` holds `j + WN` rows and `x` holds `r + XN` rows of `d_in`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::needless_range_loop)] // `q` and `t` index the tile and its rows alike
    unsafe fn out_in_tile<W: Weight, const WN: usize, const XN: usize>(
        x: &[f32],
        w: &[W],
        d_in: usize,
        (j, r): (usize, usize),
        prefetch: Prefetch,
    ) -> [[f32; XN]; WN] {
        // SAFETY (all pointer arithmetic below): the bounds the caller guarantees.
        unsafe {
            let wp: [*const W; WN] = std::array::from_fn(|q| w.as_ptr().add((j + q) * d_in));
            let xp: [*const f32; XN] = std::array::from_fn(|t| x.as_ptr().add((r + t) * d_in));
            let mut s = [[_mm512_setzero_ps(); XN]; WN];
            macro_rules! step {
                ($i:expr) => {{
                    let i = $i;
                    let wv: [__m512; WN] = std::array::from_fn(|q| load16!(W, wp[q].add(i)));
                    for t in 0..XN {
                        let xv = _mm512_loadu_ps(xp[t].add(i));
                        for q in 0..WN {
                            s[q][t] = _mm512_fmadd_ps(xv, wv[q], s[q][t]);
                        }
                    }
                }};
            }
            let (end32, vec_end) = (d_in / 32 * 32, d_in / 16 * 16);
            let (mut line, per_pass, range_end) = match prefetch {
                Prefetch::Range(p, bytes) => (
                    p,
                    (bytes / 64).div_ceil(end32 / 32 + 1),
                    p.wrapping_add(bytes),
                ),
                Prefetch::Ahead => (std::ptr::null(), 0, std::ptr::null()),
            };
            let mut i = 0;
            while i < end32 {
                match prefetch {
                    // Past the end of a row this reads the next one; a prefetch never faults.
                    Prefetch::Ahead => {
                        for p in wp {
                            prefetch!(W, p.add(i));
                        }
                    }
                    Prefetch::Range(..) => {
                        for _ in 0..per_pass {
                            if line < range_end {
                                _mm_prefetch::<_MM_HINT_T0>(line);
                                line = line.wrapping_add(64);
                            }
                        }
                    }
                }
                step!(i);
                step!(i + 16);
                i += 32;
            }
            if i < vec_end {
                step!(i);
            }
            let mut out = [[0f32; XN]; WN];
            for q in 0..WN {
                for t in 0..XN {
                    let mut total = _mm512_reduce_add_ps(s[q][t]);
                    for i in vec_end..d_in {
                        total += *xp[t].add(i) * (*wp[q].add(i)).to_f32();
                    }
                    out[q][t] = total;
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::max_abs_diff;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};

    #[test]
    fn f16_conversion_is_exact_for_every_half() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_to_f32(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    fn random(rng: &mut rand_chacha::ChaCha8Rng, dims: (usize, usize)) -> Tensor {
        let data: Vec<f32> = (0..dims.0 * dims.1)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        Tensor::from_vec(data, dims, &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F16))
            .unwrap()
    }

    /// Both layouts, one and several rows, sizes that are not multiples of 16, serial and
    /// split: the streaming kernels against candle's f32 matmul of the same f16 values.
    #[test]
    fn matches_candle_matmul() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for &(rows, d_in, d_out) in &[(1, 8, 5), (3, 37, 70), (1, 768, 2304), (8, 129, 1000)] {
            let x = random(&mut rng, (rows, d_in));
            let w = random(&mut rng, (d_in, d_out));
            let w_t = random(&mut rng, (d_out, d_in)); // used as w_tᵀ: (in, out)
            let layouts = [w.clone(), w_t.t().unwrap()];
            for (w, x) in layouts
                .iter()
                .flat_map(|w| [(w, x.clone()), (w, x.to_dtype(DType::F32).unwrap())])
            {
                let got = matmul(&x, w).unwrap();
                assert_eq!(got.dtype(), x.dtype());
                let want = x
                    .to_dtype(DType::F32)
                    .unwrap()
                    .matmul(&w.to_dtype(DType::F32).unwrap())
                    .unwrap();
                let diff = max_abs_diff(&got.to_dtype(DType::F32).unwrap(), &want);
                let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                let scale = scale.to_scalar::<f32>().unwrap();
                // f32 accumulation, then one rounding to f16 (relative 2^-11).
                assert!(
                    diff <= scale * 1e-3,
                    "{rows}x{d_in}x{d_out}: {diff} vs {scale}"
                );
            }
        }
    }

    /// The portable kernels (what CPUs without AVX-512 run) against the AVX-512 ones.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn portable_kernels_match_avx512() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
        let (rows, d_in, d_out) = (3, 45, 77);
        let x: Vec<f32> = (0..rows * d_in)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let w: Vec<u16> = (0..d_in * d_out)
            .map(|_| f16::from_f32(rng.random_range(-1.0..1.0)).to_bits())
            .collect();
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(p, q)| (p - q).abs() <= 1e-5 * (1.0 + q.abs()))
        };
        let (mut a, mut b) = (vec![0f32; rows * d_out], vec![0f32; rows * d_out]);
        in_out_rows(&x, d_in, &w[5 * d_out..], d_out, 5, &mut a);
        // SAFETY: checked above that the CPU has AVX-512F.
        unsafe { avx512::in_out_rows(&x, d_in, &w[5 * d_out..], d_out, 5, &mut b) };
        assert!(close(&a, &b));
        let (mut a, mut b) = (vec![0f32; rows * d_out], vec![0f32; rows * d_out]);
        out_in_chunk(&x, d_in, &w[..d_out * d_in], &mut a);
        // SAFETY: as above.
        unsafe { avx512::out_in_chunk(&x, d_in, &w[..d_out * d_in], &mut b) };
        assert!(close(&a, &b));
    }

    fn random_f32(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// f32 weights: both layouts, 1, 3, 16 and 64 rows, odd sizes, serial and split, against
    /// candle's matmul (relative 1e-5); [`linear_into`] gives [`matmul`]'s bits; each row
    /// comes out the same alone as in the batch.
    #[test]
    fn f32_weights_match_candle_matmul() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(9);
        let dev = &Device::Cpu;
        for &(d_in, d_out) in &[(8, 5), (37, 70), (129, 1000), (768, 2304), (2304, 768)] {
            let w =
                Tensor::from_vec(random_f32(&mut rng, d_in * d_out), (d_in, d_out), dev).unwrap();
            let w_t =
                Tensor::from_vec(random_f32(&mut rng, d_in * d_out), (d_out, d_in), dev).unwrap();
            for rows in [1, 3, 16, 64] {
                let x =
                    Tensor::from_vec(random_f32(&mut rng, rows * d_in), (rows, d_in), dev).unwrap();
                let xs = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for w in [w.clone(), w_t.t().unwrap()] {
                    assert!(weight_layout(w.layout()).is_some());
                    // f32 weights stream through `linear_into` (decoding); `matmul` keeps
                    // candle's gemm for them.
                    let mut y = vec![0f32; rows * d_out];
                    linear_into(&xs, rows, &w, &mut y).unwrap();
                    let got = Tensor::from_vec(y, (rows, d_out), dev).unwrap();
                    let want = x.matmul(&w).unwrap();
                    let diff = max_abs_diff(&got, &want);
                    let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                    let scale = scale.to_scalar::<f32>().unwrap();
                    assert!(
                        diff <= scale * 1e-5,
                        "{rows}x{d_in}x{d_out}: {diff} vs {scale}"
                    );
                    let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                    let last = &xs[(rows - 1) * d_in..];
                    let mut alone = vec![0f32; d_out];
                    linear_into(last, 1, &w, &mut alone).unwrap();
                    assert_eq!(
                        alone,
                        got[(rows - 1) * d_out..],
                        "alone {rows}x{d_in}x{d_out}"
                    );
                }
            }
        }
    }

    /// The portable f32 kernels against the AVX-512 ones, 1 to 64 rows, odd sizes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn portable_f32_kernels_match_avx512() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(10);
        let close = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .all(|(p, q)| (p - q).abs() <= 1e-5 * (1.0 + q.abs()))
        };
        for &(d_in, d_out) in &[(45, 77), (100, 33), (67, 130)] {
            for rows in [1, 3, 16, 64] {
                let x = random_f32(&mut rng, rows * d_in);
                let w = random_f32(&mut rng, d_in * d_out);
                let (mut a, mut b) = (vec![0f32; rows * d_out], vec![0f32; rows * d_out]);
                in_out_rows_f32(&x, d_in, &w[5 * d_out..], d_out, 5, &mut a);
                // SAFETY: checked above that the CPU has AVX-512F.
                unsafe { avx512::in_out_rows(&x, d_in, &w[5 * d_out..], d_out, 5, &mut b) };
                assert!(close(&a, &b), "in_out {rows}x{d_in}x{d_out}");
                let (mut a, mut b) = (vec![0f32; rows * d_out], vec![0f32; rows * d_out]);
                out_in_chunk_f32(&x, d_in, &w, &mut a);
                // SAFETY: as above.
                unsafe { avx512::out_in_chunk(&x, d_in, &w, &mut b) };
                assert!(close(&a, &b), "out_in {rows}x{d_in}x{d_out}");
            }
        }
    }

    /// f32 weights take candle's gemm itself in [`matmul`] (its bits), and the streaming
    /// kernels inside [`streaming_f32`] (those of [`linear_into`]); the switch is off again after.
    #[test]
    fn f32_weights_stream_only_inside_streaming_f32() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        let dev = &Device::Cpu;
        let (rows, d_in, d_out) = (16, 129, 300);
        let w = Tensor::from_vec(random_f32(&mut rng, d_in * d_out), (d_in, d_out), dev).unwrap();
        let xs = random_f32(&mut rng, rows * d_in);
        let x = Tensor::from_vec(xs.clone(), (rows, d_in), dev).unwrap();
        let gemm = x.matmul(&w).unwrap();
        assert_eq!(max_abs_diff(&matmul(&x, &w).unwrap(), &gemm), 0.0);
        let mut y = vec![0f32; rows * d_out];
        linear_into(&xs, rows, &w, &mut y).unwrap();
        let streamed = streaming_f32(|| matmul(&x, &w)).unwrap();
        assert_eq!(streamed.flatten_all().unwrap().to_vec1::<f32>().unwrap(), y);
        assert_eq!(max_abs_diff(&matmul(&x, &w).unwrap(), &gemm), 0.0);
        // On a rayon worker the switch stays off (a stolen job must not stream).
        let on_worker = rayon::scope(|_| streaming_f32(|| matmul(&x, &w))).unwrap();
        assert_eq!(max_abs_diff(&on_worker, &gemm), 0.0);
    }

    /// The register-tiled AVX-512 kernel gives, for every row, the one-row kernel's bits:
    /// 1 to 20 rows (whole and partial tiles), weight slabs with a partial last group and
    /// more than one block, widths with partial panels and a scalar tail, f16 and f32.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tiled_kernel_gives_the_one_row_kernels_bits() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        fn check<W: Weight>(x: &[f32], d_in: usize, w: &[W], d_out: usize, i0: usize, rows: usize) {
            let mut tiled = vec![0f32; rows * d_out];
            // SAFETY: checked by the caller that the CPU has AVX-512F.
            unsafe { avx512::in_out_rows_tiled(x, d_in, w, d_out, i0, &mut tiled) };
            for r in 0..rows {
                let mut alone = vec![0f32; d_out];
                let xr = &x[r * d_in..(r + 1) * d_in];
                // SAFETY: as above.
                unsafe { avx512::in_out_rows(xr, d_in, w, d_out, i0, &mut alone) };
                let got = &tiled[r * d_out..(r + 1) * d_out];
                let same = got
                    .iter()
                    .zip(&alone)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "row {r} of {rows}, {d_in}x{d_out} from {i0}");
            }
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        let sizes = [
            (150, 77, 5),
            (64, 32, 0),
            (200, 131, 3),
            (20, 16, 1),
            (12, 5, 7),
            (70, 48, 2),
        ];
        for &(d_in, d_out, i0) in &sizes {
            for rows in [1, 2, 3, 7, 8, 9, 16, 20] {
                let x = random_f32(&mut rng, rows * d_in);
                let w = random_f32(&mut rng, (d_in - i0) * d_out);
                check(&x, d_in, &w, d_out, i0, rows);
                let w16: Vec<u16> = w.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
                check(&x, d_in, &w16, d_out, i0, rows);
            }
        }
    }

    /// The `(out, in)` AVX-512 kernel gives every row the bits it gives that row alone: 1 to
    /// 14 rows (whole and partial register tiles), weight-row counts with partial tiles,
    /// widths with a 16-wide step and a scalar tail, f16 and f32.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn out_in_tiles_give_the_one_row_bits() {
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        fn check<W: Weight>(x: &[f32], d_in: usize, w: &[W], rows: usize) {
            let n = w.len() / d_in;
            let mut all = vec![0f32; rows * n];
            // SAFETY: checked by the caller that the CPU has AVX-512F.
            unsafe { avx512::out_in_chunk(x, d_in, w, &mut all) };
            for r in 0..rows {
                let mut alone = vec![0f32; n];
                // SAFETY: as above.
                unsafe { avx512::out_in_chunk(&x[r * d_in..(r + 1) * d_in], d_in, w, &mut alone) };
                let got = &all[r * n..(r + 1) * n];
                let same = got
                    .iter()
                    .zip(&alone)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "row {r} of {rows}, {n} outputs of {d_in}");
            }
        }
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        for &(d_in, n) in &[(45, 77), (64, 9), (77, 4), (16, 13), (100, 6), (7, 5)] {
            for rows in [1, 2, 5, 6, 7, 12, 14] {
                let x = random_f32(&mut rng, rows * d_in);
                let w = random_f32(&mut rng, n * d_in);
                check(&x, d_in, &w, rows);
                let w16: Vec<u16> = w.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
                check(&x, d_in, &w16, rows);
            }
        }
    }

    #[test]
    fn other_inputs_fall_back_to_candle() {
        let x = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones((3, 4), DType::BF16, &Device::Cpu).unwrap();
        assert_eq!(
            matmul(&x, &w).unwrap().to_vec2::<f32>().unwrap(),
            [[3f32; 4]; 2]
        );
        let x = Tensor::ones((MAX_ROWS + 1, 3), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(matmul(&x, &w).unwrap().dims(), [MAX_ROWS + 1, 4]);
        let x = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(
            matmul(&x, &w).unwrap().to_vec2::<f32>().unwrap(),
            [[3f32; 4]; 2]
        );
        assert!(matmul(&x, &w.t().unwrap()).is_err()); // (4, 3): shapes disagree
    }
}
