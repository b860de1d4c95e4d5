//! Fused CPU layers with hand-written backward passes.
//!
//! candle builds a LayerNorm, a bias add, a GELU or a cross-entropy from many small
//! element-wise ops, each allocating its output, and its backward of a broadcast op (a bias
//! add, LayerNorm's scale and shift) sums over batch and time one element at a time. Here
//! each layer is one candle custom op whose forward and backward are plain loops over rows,
//! written as Karpathy's llm.c writes them (`layernorm_forward/backward`, `gelu_forward/
//! backward`, `fused_classifier`): one output allocation per pass, parameter gradients
//! reduced over all rows in the same pass with per-thread partial sums.
//!
//! | function | shapes | backward gives |
//! |---|---|---|
//! | [`layer_norm`] | x (.., C), weight (C,), bias (C,) | dx, dweight, dbias |
//! | [`linear`] | x (.., in) @ weight (in, out) + bias (out,) | dx, dweight (candle's matmul), dbias |
//! | [`add_bias`] | x (.., K…) + bias (K…) | dx, dbias |
//! | [`bias_gelu`] | gelu(x (.., N) + bias (N,)) | dx, dbias |
//! | [`cross_entropy`] | logits (N, V), targets (N,) u32, mask (N,) | dlogits |
//!
//! Every function takes and returns candle [`Tensor`]s and has a `*_reference` twin built
//! from plain, differentiable candle ops. The fused path runs for f32 tensors on the CPU; on
//! any other device or dtype the function *is* its reference, so a model can call the fused
//! function unconditionally. The tests check the fused values and gradients against the
//! references.
//!
//! Rows are split over rayon's global pool (the one candle's matmul uses) only when a pass
//! is big enough to pay for the hand-off; see [`PAR_MIN_NS`]. Results do not depend on
//! timing: each thread reduces a fixed range of rows and the partial sums are added in
//! order.
//!
//! Gradients computed by these ops are plain tensors (no graph of their own), so
//! second-order gradients through them are not available.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, D};
use rayon::prelude::*;

use crate::{Error, Result};

/// Serial time (estimated, ns) below which a pass runs on the calling thread: handing rows
/// to rayon and waiting for them costs tens of microseconds, more on a busy machine.
/// Measured on a 2-core AMD EPYC at the default config (768 rows): LayerNorm (C = 128) and
/// the bias adds stay serial, GELU over 4C = 512 and cross-entropy over V = 2048 split.
pub const PAR_MIN_NS: usize = 250_000;

/// Estimated serial cost of each pass, in picoseconds per element (measured as above).
mod cost {
    pub const LAYER_NORM_FWD: usize = 500;
    pub const LAYER_NORM_BWD: usize = 1_000;
    pub const ADD_BIAS: usize = 250;
    pub const GELU_FWD: usize = 1_300;
    pub const GELU_BWD: usize = 2_000;
    pub const CROSS_ENTROPY_FWD: usize = 1_000;
    pub const CROSS_ENTROPY_BWD: usize = 1_000;
}

// ---------------------------------------------------------------------------------------------
// Plumbing: slices out of candle storage, row chunking
// ---------------------------------------------------------------------------------------------

/// Defines `fn name(args) -> ret` whose body is compiled three times, for AVX-512, for AVX2
/// with FMA and for the build's baseline (SSE2 on x86-64), and run in the best version the
/// CPU supports (`is_x86_feature_detected!`, a cached check). The crate is built for the
/// baseline, so without this the loops below vectorise only 4 floats wide. The versions
/// compute the same values: Rust never contracts `a * b + c` into an FMA on its own.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? { imp($($arg),*) }
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    if is_x86_feature_detected!("avx512f") {
                        // SAFETY: the CPU has the features `avx512` was compiled for.
                        return unsafe { avx512($($arg),*) };
                    }
                    // SAFETY: the CPU has the features `avx2` was compiled for.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}
pub(crate) use multiversion;

/// Whether every tensor is f32 on the CPU, i.e. whether the fused kernels apply.
pub(crate) fn fused(ts: &[&Tensor]) -> bool {
    ts.iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32)
}

/// The f32 elements a contiguous layout covers.
pub(crate) fn cpu_slice<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    if !layout.is_contiguous() {
        candle_core::bail!("{what}: expected a contiguous tensor");
    }
    let data = storage.as_slice::<f32>()?;
    let start = layout.start_offset();
    data.get(start..start + layout.shape().elem_count())
        .ok_or_else(|| candle_core::Error::Msg(format!("{what}: layout exceeds its storage")))
}

/// Runs `f` on the f32 elements of contiguous CPU tensors.
pub(crate) fn with_slices<R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[f32]]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let slices = guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            candle_core::Storage::Cpu(cpu) => cpu_slice(cpu, layout, "layers"),
            _ => candle_core::bail!("layers: fused kernels need CPU tensors"),
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    f(&slices)
}

/// A CPU tensor of `shape` owning `data`.
pub(crate) fn tensor(data: Vec<f32>, shape: &Shape) -> candle_core::Result<Tensor> {
    Tensor::from_vec(data, shape.clone(), &candle_core::Device::Cpu)
}

/// How many row chunks a pass over `rows` rows of `elems` elements at `ps_per_elem` (see
/// [`cost`]) is split into: 1 below [`PAR_MIN_NS`] or inside [`super::serial`], else one per
/// rayon thread. `forced`
/// (tests) overrides.
pub(crate) fn plan(rows: usize, elems: usize, ps_per_elem: usize, forced: Option<usize>) -> usize {
    if let Some(n) = forced {
        return n;
    }
    if elems.saturating_mul(ps_per_elem) / 1_000 < PAR_MIN_NS || super::is_serial() {
        1
    } else {
        rayon::current_num_threads().clamp(1, rows.max(1))
    }
}

/// Rows per chunk when `rows` rows are split into `chunks` chunks.
fn rows_per_chunk(rows: usize, chunks: usize) -> usize {
    rows.div_ceil(chunks.max(1)).max(1)
}

/// Calls `f(first_row, out_rows)` on chunks of `out` (rows of `row_len`), in parallel when
/// `chunks > 1`.
pub(crate) fn for_row_chunks<F>(out: &mut [f32], row_len: usize, chunks: usize, f: F)
where
    F: Fn(usize, &mut [f32]) + Sync,
{
    let rows = out.len() / row_len.max(1);
    if chunks <= 1 || rows <= 1 {
        f(0, out);
    } else {
        let rpc = rows_per_chunk(rows, chunks);
        out.par_chunks_mut(rpc * row_len)
            .enumerate()
            .for_each(|(i, o)| f(i * rpc, o));
    }
}

/// Like [`for_row_chunks`] over two outputs with the same rows: `f(first_row, a_rows,
/// b_rows)` with rows of `a_len` in `a` and of `b_len` in `b`.
fn for_row_chunks2<F>(a: &mut [f32], a_len: usize, b: &mut [f32], b_len: usize, chunks: usize, f: F)
where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync,
{
    let rows = a.len() / a_len.max(1);
    if chunks <= 1 || rows <= 1 {
        f(0, a, b);
    } else {
        let rpc = rows_per_chunk(rows, chunks);
        a.par_chunks_mut(rpc * a_len)
            .zip(b.par_chunks_mut(rpc * b_len))
            .enumerate()
            .for_each(|(i, (a, b))| f(i * rpc, a, b));
    }
}

/// Rows summed into one block partial before it is added to a chunk's total: two-level
/// summation keeps the rounding error of a reduction over many rows near that of
/// `BLOCK_ROWS + rows / BLOCK_ROWS` additions instead of `rows`.
const BLOCK_ROWS: usize = 32;

/// Like [`for_row_chunks`], and `f` also adds into a zeroed accumulator of `acc_len`. `f`
/// sees at most [`BLOCK_ROWS`] rows at a time; the block sums are added per chunk and the
/// chunk sums in chunk order, and the total is returned.
pub(crate) fn for_row_chunks_sum<F>(
    out: &mut [f32],
    row_len: usize,
    chunks: usize,
    acc_len: usize,
    f: F,
) -> Vec<f32>
where
    F: Fn(usize, &mut [f32], &mut [f32]) + Sync,
{
    let block_len = BLOCK_ROWS * row_len.max(1);
    let run = |r0: usize, out: &mut [f32]| {
        let mut total = vec![0f32; acc_len];
        let mut block = vec![0f32; acc_len];
        for (i, o) in out.chunks_mut(block_len).enumerate() {
            block.fill(0.0);
            f(r0 + i * BLOCK_ROWS, o, &mut block);
            add_assign(&mut total, &block);
        }
        total
    };
    let rows = out.len() / row_len.max(1);
    if chunks <= 1 || rows <= 1 {
        return run(0, out);
    }
    let rpc = rows_per_chunk(rows, chunks);
    let partials: Vec<Vec<f32>> = out
        .par_chunks_mut(rpc * row_len)
        .enumerate()
        .map(|(i, o)| run(i * rpc, o))
        .collect();
    sum_partials(partials, acc_len)
}

/// Σ of equally long partial sums, in order.
fn sum_partials(partials: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut parts = partials.into_iter();
    let mut acc = parts.next().unwrap_or_else(|| vec![0f32; len]);
    for p in parts {
        add_assign(&mut acc, &p);
    }
    acc
}

/// `acc += x`, element-wise.
#[inline]
pub(crate) fn add_assign(acc: &mut [f32], x: &[f32]) {
    for (a, &v) in acc.iter_mut().zip(x) {
        *a += v;
    }
}

/// Σ x, with eight running sums so the loop vectorises.
#[inline]
pub(crate) fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().sum::<f32>()
}

/// Σ (x - mean)², with eight running sums.
#[inline]
fn sum_sq_dev(x: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let d = v - mean;
            *a += d * d;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>()
}

/// e^x in f32, written so that loops of it vectorise (libm's `expf` is a call per element,
/// ~10× slower in a loop): Cody–Waite range reduction `x = n·ln2 + r` and Cephes' `expf`
/// polynomial for e^r, about 2 ulp. The argument is clamped to [-87, 88] first, so the
/// result stays a normal number: ~1.7e-38 instead of smaller values or 0 below, ~1.7e38
/// instead of infinity above (both only ever divided into or added to numbers of order 1
/// here). NaN stays NaN.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4; // 355/512, so n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND; // round(x / ln2), an integer in [-126, 127]
    let r = x - n * LN2_HI - n * LN2_LO; // |r| <= ln2 / 2
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * r * r + r + 1.0;
    // 2^n from its bits: t's low mantissa bits hold n
    let n_int = t.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    er * f32::from_bits(((n_int + 127) << 23) as u32)
}

/// The dtype the references compute statistics in: f64 stays f64, everything else is f32.
pub(crate) fn stats_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Checks `t` is a vector of `n` elements.
pub(crate) fn check_vector(t: &Tensor, n: usize, what: &str) -> Result<()> {
    if t.dims() != [n] {
        return Err(Error::InvalidArgument(format!(
            "{what} must have shape [{n}], got {:?}",
            t.dims()
        )));
    }
    Ok(())
}

/// The size of the last dimension of `x`, which must be at least 1-D.
pub(crate) fn last_dim(x: &Tensor, what: &str) -> Result<usize> {
    x.dims().last().copied().ok_or_else(|| {
        Error::InvalidArgument(format!(
            "{what} must have at least one dimension, got a scalar"
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// LayerNorm
// ---------------------------------------------------------------------------------------------

/// LayerNorm over the last dimension (Ba et al. 2016), fused:
/// `y = (x - mean) / sqrt(var + eps) * weight + bias`, with the biased variance as PyTorch.
///
/// `x`: (.., C); `weight`: (C,); `bias`: (C,) or `None` (nanoGPT's `bias=False`). Returns
/// (.., C). The backward pass is llm.c's `layernorm_backward`: per row
/// `dx = rstd · (dy·w − mean(dy·w) − x̂ · mean(dy·w·x̂))`, and `dweight = Σ dy·x̂`,
/// `dbias = Σ dy` over all rows in the same pass. The row statistics are recomputed in the
/// backward pass (a row of C floats is in cache, and it keeps the op stateless) rather than
/// stashed. f32 on the CPU; otherwise this is [`layer_norm_reference`].
///
/// # Errors
/// [`Error::InvalidArgument`] if `x` is a scalar or `weight`/`bias` are not (C,); candle
/// errors from the reference path.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    layer_norm_with(x, weight, bias, eps, None)
}

fn layer_norm_with(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
    chunks: Option<usize>,
) -> Result<Tensor> {
    let c = last_dim(x, "layer_norm input")?;
    check_vector(weight, c, "layer_norm weight")?;
    if let Some(b) = bias {
        check_vector(b, c, "layer_norm bias")?;
    }
    let mut all = vec![x, weight];
    all.extend(bias);
    if !fused(&all) || x.elem_count() == 0 {
        return layer_norm_reference(x, weight, bias, eps);
    }
    let op = LayerNormOp {
        eps: eps as f32,
        c,
        chunks,
    };
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    Ok(match bias {
        Some(b) => x.apply_op3(&w, &b.contiguous()?, op)?,
        None => x.apply_op2(&w, op)?,
    })
}

/// LayerNorm from plain candle ops (statistics in f32, or f64 for f64 input), the reference
/// [`layer_norm`] is tested against and its fallback off the CPU.
///
/// # Errors
/// Candle errors on mismatched shapes.
pub fn layer_norm_reference(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(stats_dtype(dtype))?;
    let mean = x.mean_keepdim(D::Minus1)?; // (.., 1)
    let xc = x.broadcast_sub(&mean)?; // (.., C)
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?; // (.., 1)
    let xhat = xc.broadcast_div(&(var + eps)?.sqrt()?)?; // (.., C)
    let y = xhat.to_dtype(dtype)?.broadcast_mul(weight)?;
    Ok(match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// The fused LayerNorm: arguments (x, weight) or (x, weight, bias).
struct LayerNormOp {
    eps: f32,
    c: usize,
    /// Row chunks forced by a test; `None` lets [`plan`] decide.
    chunks: Option<usize>,
}

/// Mean and 1/std of one row.
#[inline]
fn row_stats(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let var = sum_sq_dev(x, mean) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// LayerNorm over rows of `w.len()`, `ys = (x − mean)·rstd·w (+ b)`: the forward of
/// [`layer_norm`] on plain rows, which it runs per chunk of rows and decoding steps (which hold
/// their activations as slices) call directly.
pub(crate) fn layer_norm_rows(xs: &[f32], w: &[f32], b: Option<&[f32]>, ys: &mut [f32], eps: f32) {
    let c = w.len().max(1);
    for (xr, yr) in xs.chunks_exact(c).zip(ys.chunks_exact_mut(c)) {
        let (mean, rstd) = row_stats(xr, eps);
        normalize_row(xr, w, b, yr, mean, rstd);
    }
}

/// One row of LayerNorm's output from its statistics: `y = (x − mean)·rstd·w (+ b)`.
#[inline]
fn normalize_row(xr: &[f32], w: &[f32], b: Option<&[f32]>, yr: &mut [f32], mean: f32, rstd: f32) {
    match b {
        Some(b) => {
            for (((o, &v), &w), &b) in yr.iter_mut().zip(xr).zip(w).zip(b) {
                *o = (v - mean) * rstd * w + b;
            }
        }
        None => {
            for ((o, &v), &w) in yr.iter_mut().zip(xr).zip(w) {
                *o = (v - mean) * rstd * w;
            }
        }
    }
}

/// One row of LayerNorm's backward from its statistics: `dx` (overwritten, or added to with
/// `accumulate`), `dw += dy·x̂`, `db += dy`.
#[inline]
fn layer_norm_backward_row(
    (xr, dyr, w): (&[f32], &[f32], &[f32]),
    (mean, rstd): (f32, f32),
    dxr: &mut [f32],
    accumulate: bool,
    dw: &mut [f32],
    db: Option<&mut [f32]>,
) {
    let inv_c = 1.0 / w.len().max(1) as f32;
    // dnorm = dy·w: its mean and the mean of dnorm·x̂
    let (s1, s2) = dnorm_sums(xr, dyr, w, mean, rstd);
    let (m1, m2) = (s1 * inv_c, s2 * inv_c);
    for ((dw, &v), &d) in dw.iter_mut().zip(xr).zip(dyr) {
        *dw += d * ((v - mean) * rstd);
    }
    if let Some(db) = db {
        add_assign(db, dyr);
    }
    for (((o, &v), &d), &w) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
        let xhat = (v - mean) * rstd;
        let g = (d * w - m1 - xhat * m2) * rstd;
        *o = if accumulate { *o + g } else { g };
    }
}

/// [`layer_norm_rows`] that also keeps each row's mean and `1/std` in `stats` (two floats a
/// row), for [`layer_norm_backward_rows`]: the hand-written training step's LayerNorm.
pub(crate) fn layer_norm_rows_stats(
    xs: &[f32],
    w: &[f32],
    b: Option<&[f32]>,
    ys: &mut [f32],
    stats: &mut [f32],
    eps: f32,
) {
    let c = w.len().max(1);
    for ((xr, yr), st) in xs
        .chunks_exact(c)
        .zip(ys.chunks_exact_mut(c))
        .zip(stats.chunks_exact_mut(2))
    {
        let (mean, rstd) = row_stats(xr, eps);
        st[0] = mean;
        st[1] = rstd;
        normalize_row(xr, w, b, yr, mean, rstd);
    }
}

/// LayerNorm's backward over rows of `w.len()` from the saved `stats` of
/// [`layer_norm_rows_stats`]: `dx` (overwritten, or added to with `accumulate`), and
/// `dw += Σ dy·x̂`, `db += Σ dy` (the same arithmetic as [`layer_norm`]'s backward).
#[allow(clippy::too_many_arguments)]
pub(crate) fn layer_norm_backward_rows(
    xs: &[f32],
    w: &[f32],
    dy: &[f32],
    stats: &[f32],
    dx: &mut [f32],
    accumulate: bool,
    dw: &mut [f32],
    mut db: Option<&mut [f32]>,
) {
    let c = w.len().max(1);
    let rows = xs
        .chunks_exact(c)
        .zip(dy.chunks_exact(c))
        .zip(dx.chunks_exact_mut(c))
        .zip(stats.chunks_exact(2));
    for (((xr, dyr), dxr), st) in rows {
        let row = (xr, dyr, w);
        layer_norm_backward_row(row, (st[0], st[1]), dxr, accumulate, dw, db.as_deref_mut());
    }
}

/// LayerNorm backward's row sums `(Σ dy·w, Σ dy·w·x̂)` with `x̂ = (x − mean)·rstd`, eight
/// running sums each.
#[inline]
fn dnorm_sums(x: &[f32], dy: &[f32], w: &[f32], mean: f32, rstd: f32) -> (f32, f32) {
    let (mut s1, mut s2) = ([0f32; 8], [0f32; 8]);
    let lanes = x
        .chunks_exact(8)
        .zip(dy.chunks_exact(8))
        .zip(w.chunks_exact(8));
    for ((xs, dys), ws) in lanes {
        let terms = xs
            .iter()
            .zip(dys)
            .zip(ws)
            .zip(s1.iter_mut().zip(s2.iter_mut()));
        for (((&v, &d), &w), (a1, a2)) in terms {
            let dnorm = d * w;
            *a1 += dnorm;
            *a2 += dnorm * ((v - mean) * rstd);
        }
    }
    let tail = x.len() / 8 * 8;
    let (mut t1, mut t2) = (0f32, 0f32);
    for ((&v, &d), &w) in x[tail..].iter().zip(&dy[tail..]).zip(&w[tail..]) {
        t1 += d * w;
        t2 += d * w * ((v - mean) * rstd);
    }
    (s1.iter().sum::<f32>() + t1, s2.iter().sum::<f32>() + t2)
}

impl LayerNormOp {
    fn forward(
        &self,
        x: &[f32],
        w: &[f32],
        b: Option<&[f32]>,
        shape: &Shape,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = self.c;
        let mut y = vec![0f32; x.len()];
        let chunks = plan(x.len() / c, x.len(), cost::LAYER_NORM_FWD, self.chunks);
        for_row_chunks(&mut y, c, chunks, |r0, ys| {
            layer_norm_rows(&x[r0 * c..r0 * c + ys.len()], w, b, ys, self.eps);
        });
        Ok((CpuStorage::F32(y), shape.clone()))
    }

    /// (dx, dweight, dbias) from x, weight and dy.
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
        let c = self.c;
        let dy = grad.contiguous()?;
        let (dx, acc) = with_slices(&[x, w, &dy], |s| {
            let (x, w, dy) = (s[0], s[1], s[2]);
            let mut dx = vec![0f32; x.len()];
            let chunks = plan(x.len() / c, x.len(), cost::LAYER_NORM_BWD, self.chunks);
            let acc = for_row_chunks_sum(&mut dx, c, chunks, 2 * c, |r0, dxs, acc| {
                let range = r0 * c..r0 * c + dxs.len();
                let (dw, db) = acc.split_at_mut(c);
                let rows = x[range.clone()]
                    .chunks_exact(c)
                    .zip(dy[range].chunks_exact(c))
                    .zip(dxs.chunks_exact_mut(c));
                for ((xr, dyr), dxr) in rows {
                    let stats = row_stats(xr, self.eps);
                    layer_norm_backward_row((xr, dyr, w), stats, dxr, false, dw, Some(&mut *db));
                }
            });
            Ok((dx, acc))
        })?;
        let (dw, db) = acc.split_at(c);
        Ok((
            tensor(dx, x.shape())?,
            tensor(dw.to_vec(), w.shape())?,
            tensor(db.to_vec(), w.shape())?,
        ))
    }
}

impl CustomOp2 for LayerNormOp {
    fn name(&self) -> &'static str {
        "tinygpt-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s1, l1, "layer_norm input")?;
        let w = cpu_slice(s2, l2, "layer_norm weight")?;
        self.forward(x, w, None, l1.shape())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _db) = self.backward(x, w, grad)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "tinygpt-layer-norm"
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
        let x = cpu_slice(s1, l1, "layer_norm input")?;
        let w = cpu_slice(s2, l2, "layer_norm weight")?;
        let b = cpu_slice(s3, l3, "layer_norm bias")?;
        self.forward(x, w, Some(b), l1.shape())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, db) = self.backward(x, w, grad)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

// ---------------------------------------------------------------------------------------------
// Bias add and Linear
// ---------------------------------------------------------------------------------------------

/// `x + bias` where `bias`'s shape is a suffix of `x`'s: a bias `(N,)` on `(.., N)`, or
/// position embeddings `(T, C)` on `(B, T, C)`. Returns `x`'s shape.
///
/// The backward pass hands `dy` through to `x` and reduces it over the leading rows into
/// `dbias` with one vectorised pass (candle's broadcast backward sums element by element).
/// f32 on the CPU; otherwise this is [`add_bias_reference`].
///
/// # Errors
/// [`Error::InvalidArgument`] if `bias`'s shape is not a suffix of `x`'s.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    add_bias_with(x, bias, None)
}

fn add_bias_with(x: &Tensor, bias: &Tensor, chunks: Option<usize>) -> Result<Tensor> {
    if !x.dims().ends_with(bias.dims()) {
        return Err(Error::InvalidArgument(format!(
            "bias of shape {:?} does not broadcast over the trailing dimensions of {:?}",
            bias.dims(),
            x.dims()
        )));
    }
    let k = bias.elem_count();
    if !fused(&[x, bias]) || k == 0 || x.elem_count() == 0 {
        return add_bias_reference(x, bias);
    }
    let op = AddBiasOp { k, chunks };
    Ok(x.contiguous()?.apply_op2(&bias.contiguous()?, op)?)
}

/// `x.broadcast_add(bias)`, the reference [`add_bias`] is tested against.
///
/// # Errors
/// Candle errors on shapes that do not broadcast.
pub fn add_bias_reference(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_add(bias)?)
}

/// The fused bias add: arguments (x, bias), `bias` of `k` elements.
struct AddBiasOp {
    k: usize,
    /// Row chunks forced by a test; `None` lets [`plan`] decide.
    chunks: Option<usize>,
}

/// Σ over rows of `dy` (rows of `k`), in `chunks` row chunks of [`BLOCK_ROWS`]-row blocks.
fn sum_rows(dy: &[f32], k: usize, chunks: usize) -> Vec<f32> {
    let rows = dy.len() / k.max(1);
    let reduce = |rows: &[f32]| {
        let mut total = vec![0f32; k];
        let mut block = vec![0f32; k];
        for b in rows.chunks(BLOCK_ROWS * k) {
            block.copy_from_slice(&b[..k]);
            for r in b[k..].chunks_exact(k) {
                add_assign(&mut block, r);
            }
            add_assign(&mut total, &block);
        }
        total
    };
    if chunks <= 1 || rows <= 1 {
        return reduce(dy);
    }
    let rpc = rows_per_chunk(rows, chunks);
    let partials: Vec<Vec<f32>> = dy.par_chunks(rpc * k).map(reduce).collect();
    sum_partials(partials, k)
}

impl CustomOp2 for AddBiasOp {
    fn name(&self) -> &'static str {
        "tinygpt-add-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s1, l1, "add_bias input")?;
        let b = cpu_slice(s2, l2, "add_bias bias")?;
        let k = self.k;
        let mut y = vec![0f32; x.len()];
        let chunks = plan(x.len() / k, x.len(), cost::ADD_BIAS, self.chunks);
        for_row_chunks(&mut y, k, chunks, |r0, ys| {
            let xs = &x[r0 * k..r0 * k + ys.len()];
            for (xr, yr) in xs.chunks_exact(k).zip(ys.chunks_exact_mut(k)) {
                for ((o, &v), &b) in yr.iter_mut().zip(xr).zip(b) {
                    *o = v + b;
                }
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = grad.contiguous()?;
        let db = with_slices(&[&dy], |s| {
            let chunks = plan(s[0].len() / self.k, s[0].len(), cost::ADD_BIAS, self.chunks);
            Ok(sum_rows(s[0], self.k, chunks))
        })?;
        Ok((Some(grad.clone()), Some(tensor(db, b.shape())?)))
    }
}

/// A projection in HF GPT-2's `Conv1D` layout, `y = x @ W + b`.
///
/// `x`: (.., in) (the model passes (B, T, in)); `weight`: (in, out); `bias`: (out,) or
/// `None`. Returns (.., out). The product is candle's `matmul` (gemm), whose backward gives
/// dx and dW; the bias add is [`add_bias`], so dbias is one pass over dy. f32 on the CPU for
/// the fused bias; otherwise [`linear_reference`].
///
/// # Errors
/// [`Error::InvalidArgument`] if `x` is a scalar, `weight` is not (in, out) or `bias` is not
/// (out,).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, weight, bias, true)
}

/// [`linear`] from plain candle ops (`matmul` then `broadcast_add`), its reference.
///
/// # Errors
/// As [`linear`].
pub fn linear_reference(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    linear_impl(x, weight, bias, false)
}

fn linear_impl(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, fuse: bool) -> Result<Tensor> {
    let d_in = last_dim(x, "linear input")?;
    let d_out = match weight.dims() {
        [i, o] if *i == d_in => *o,
        dims => {
            let x_dims = x.dims();
            return Err(Error::InvalidArgument(format!(
                "linear weight must be [{d_in}, out] for an input of {x_dims:?}, got {dims:?}"
            )));
        }
    };
    if let Some(b) = bias {
        check_vector(b, d_out, "linear bias")?;
    }
    let lead = &x.dims()[..x.rank() - 1];
    let rows: usize = lead.iter().product();
    let y = crate::gemv::matmul(&x.reshape((rows, d_in))?, weight)?; // (rows, out)
    let y = match bias {
        Some(b) if fuse => add_bias(&y, b)?,
        Some(b) => add_bias_reference(&y, b)?,
        None => y,
    };
    let mut out_dims = lead.to_vec();
    out_dims.push(d_out);
    Ok(y.reshape(out_dims)?) // (.., out)
}

// ---------------------------------------------------------------------------------------------
// Bias + GELU
// ---------------------------------------------------------------------------------------------

/// √(2/π), the GELU tanh approximation's constant.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
/// The cubic coefficient of the GELU tanh approximation.
const GELU_CUBIC: f32 = 0.044_715;

/// GELU, tanh form: `0.5·h·(1 + tanh(u))` with `u = √(2/π)(h + 0.044715h³)`, written as
/// `h·σ(2u) = h / (1 + e^(−2u))` (the same function: 0.5(1 + tanh u) = σ(2u)), which needs
/// one [`exp`] instead of a `tanh` (libm's `tanhf` is ~10× slower than `expf`, which is
/// slower than ours) and has no cancellation.
#[inline(always)]
fn gelu(h: f32) -> f32 {
    let u = SQRT_2_OVER_PI * h * (1.0 + GELU_CUBIC * h * h);
    h / (1.0 + exp(-2.0 * u))
}

/// d gelu / dh: `s + h·2s(1 − s)·u'` with `s = σ(2u)`, `u' = √(2/π)(1 + 3·0.044715h²)`.
/// `1 − s` is computed as `e·s` with `e = e^(−2u)`, not by subtraction, which would lose
/// all precision where `s → 1` (large h) just where it is multiplied by a large `h·u'`.
#[inline(always)]
fn gelu_grad(h: f32) -> f32 {
    let h2 = h * h;
    let u = SQRT_2_OVER_PI * h * (1.0 + GELU_CUBIC * h2);
    let e = exp(-2.0 * u);
    let s = 1.0 / (1.0 + e);
    let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * h2);
    s + h * 2.0 * (e * s) * s * du
}

multiversion! {
    /// `ys = gelu(xs + b)` over rows of `n` (`b` (n,) or none).
    pub(crate) fn gelu_rows(xs: &[f32], b: Option<&[f32]>, ys: &mut [f32], n: usize) {
        match b {
            Some(b) => {
                for (xr, yr) in xs.chunks_exact(n).zip(ys.chunks_exact_mut(n)) {
                    for ((o, &v), &b) in yr.iter_mut().zip(xr).zip(b) {
                        *o = gelu(v + b);
                    }
                }
            }
            None => {
                for (o, &v) in ys.iter_mut().zip(xs) {
                    *o = gelu(v);
                }
            }
        }
    }
}

multiversion! {
    /// `dx = dy·gelu'(x + b)` over rows of `b.len()`, and `db += Σ_rows dx`.
    fn gelu_grad_rows_bias(x: &[f32], dy: &[f32], b: &[f32], dx: &mut [f32], db: &mut [f32]) {
        let n = b.len();
        let rows = x.chunks_exact(n).zip(dy.chunks_exact(n)).zip(dx.chunks_exact_mut(n));
        for ((xr, dyr), dxr) in rows {
            let cols = dxr.iter_mut().zip(xr).zip(dyr).zip(b).zip(db.iter_mut());
            for ((((o, &v), &d), &b), acc) in cols {
                let g = d * gelu_grad(v + b);
                *o = g;
                *acc += g;
            }
        }
    }
}

multiversion! {
    /// `dx = dy·gelu'(x)`, element-wise.
    pub(crate) fn gelu_grad_rows(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        for ((o, &v), &d) in dx.iter_mut().zip(x).zip(dy) {
            *o = d * gelu_grad(v);
        }
    }
}

/// `gelu(x + bias)`, the MLP's activation after `c_fc`, fused (GELU in the tanh form of
/// GPT-2 and candle's [`Tensor::gelu`]: `0.5·h·(1 + tanh(√(2/π)(h + 0.044715h³)))`).
///
/// `x`: (.., N); `bias`: (N,) or `None`. Returns (.., N). Backward: `dx = dy·gelu'(x + b)`,
/// `dbias = Σ_rows dx` in the same pass; `x + b` is recomputed, not stored. f32 on the CPU;
/// otherwise this is [`bias_gelu_reference`].
///
/// # Errors
/// [`Error::InvalidArgument`] if `x` is a scalar or `bias` is not (N,).
pub fn bias_gelu(x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    bias_gelu_with(x, bias, None)
}

fn bias_gelu_with(x: &Tensor, bias: Option<&Tensor>, chunks: Option<usize>) -> Result<Tensor> {
    let n = last_dim(x, "bias_gelu input")?;
    if let Some(b) = bias {
        check_vector(b, n, "bias_gelu bias")?;
    }
    let mut all = vec![x];
    all.extend(bias);
    if !fused(&all) || x.elem_count() == 0 {
        return bias_gelu_reference(x, bias);
    }
    let op = BiasGeluOp { n, chunks };
    let x = x.contiguous()?;
    Ok(match bias {
        Some(b) => x.apply_op2(&b.contiguous()?, op)?,
        None => x.apply_op1(op)?,
    })
}

/// `x.broadcast_add(bias)?.gelu()` from plain candle ops, the reference [`bias_gelu`] is
/// tested against.
///
/// # Errors
/// Candle errors on mismatched shapes.
pub fn bias_gelu_reference(x: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Ok(match bias {
        Some(b) => x.broadcast_add(b)?.gelu()?,
        None => x.gelu()?,
    })
}

/// The fused bias + GELU: arguments (x) or (x, bias), rows of `n`.
struct BiasGeluOp {
    n: usize,
    /// Row chunks forced by a test; `None` lets [`plan`] decide.
    chunks: Option<usize>,
}

impl BiasGeluOp {
    fn forward(
        &self,
        x: &[f32],
        b: Option<&[f32]>,
        shape: &Shape,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = self.n;
        let mut y = vec![0f32; x.len()];
        let chunks = plan(x.len() / n, x.len(), cost::GELU_FWD, self.chunks);
        for_row_chunks(&mut y, n, chunks, |r0, ys| {
            gelu_rows(&x[r0 * n..r0 * n + ys.len()], b, ys, n)
        });
        Ok((CpuStorage::F32(y), shape.clone()))
    }

    /// (dx, dbias) from x, bias and dy; dbias is `None` without a bias.
    fn backward(
        &self,
        x: &Tensor,
        b: Option<&Tensor>,
        grad: &Tensor,
    ) -> candle_core::Result<(Tensor, Option<Tensor>)> {
        let n = self.n;
        let dy = grad.contiguous()?;
        let chunks = plan(
            x.elem_count() / n,
            x.elem_count(),
            cost::GELU_BWD,
            self.chunks,
        );
        let (dx, db) = match b {
            Some(b) => with_slices(&[x, b, &dy], |s| {
                let (x, b, dy) = (s[0], s[1], s[2]);
                let mut dx = vec![0f32; x.len()];
                let db = for_row_chunks_sum(&mut dx, n, chunks, n, |r0, dxs, db| {
                    let range = r0 * n..r0 * n + dxs.len();
                    gelu_grad_rows_bias(&x[range.clone()], &dy[range], b, dxs, db)
                });
                Ok((dx, Some(db)))
            })?,
            None => with_slices(&[x, &dy], |s| {
                let (x, dy) = (s[0], s[1]);
                let mut dx = vec![0f32; x.len()];
                for_row_chunks(&mut dx, n, chunks, |r0, dxs| {
                    let range = r0 * n..r0 * n + dxs.len();
                    gelu_grad_rows(&x[range.clone()], &dy[range], dxs)
                });
                Ok((dx, None))
            })?,
        };
        let dx = tensor(dx, x.shape())?;
        let db = match (db, b) {
            (Some(db), Some(b)) => Some(tensor(db, b.shape())?),
            _ => None,
        };
        Ok((dx, db))
    }
}

impl CustomOp1 for BiasGeluOp {
    fn name(&self) -> &'static str {
        "tinygpt-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.forward(cpu_slice(s, l, "gelu input")?, None, l.shape())
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(self.backward(x, None, grad)?.0))
    }
}

impl CustomOp2 for BiasGeluOp {
    fn name(&self) -> &'static str {
        "tinygpt-bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s1, l1, "bias_gelu input")?;
        let b = cpu_slice(s2, l2, "bias_gelu bias")?;
        self.forward(x, Some(b), l1.shape())
    }

    fn bwd(
        &self,
        x: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, db) = self.backward(x, Some(b), grad)?;
        Ok((Some(dx), db))
    }
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy
// ---------------------------------------------------------------------------------------------

/// Mean cross-entropy of `logits` against `targets`, fused: log-softmax and the negative
/// log-likelihood in one pass per row, and — when `logits` track gradients — the gradient
/// too, as llm.c's `fused_classifier` does.
///
/// `logits`: (N, V) f32; `targets`: (N,) u32 (any integer dtype is converted); `mask`:
/// (N,) f32 weights (1 = count, 0 = ignore) or `None`. Returns a scalar: the mean over the
/// masked-in rows, `Σ mask·nll / Σ mask` (over all N rows without a mask). Row maxima are
/// subtracted, so logits of ±80 or more stay finite.
///
/// Backward: `dlogits = (softmax − onehot(target)) · mask / Σ mask · dloss`; targets and
/// mask get no gradient. When `logits` track gradients, the forward pass already writes
/// `dlogits` for `dloss = 1` (it has the row's exponentials at hand) and the op keeps it
/// (N·V floats, until the graph is dropped); the backward pass takes it, scaling it by
/// `dloss` if that is not 1. A second backward pass through the same graph recomputes it.
/// f32 on the CPU; otherwise this is [`cross_entropy_reference`].
///
/// # Errors
/// [`Error::InvalidArgument`] on mismatched shapes, no rows, a target `>= V`, or a mask
/// that sums to 0.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    cross_entropy_with(logits, targets, mask, None)
}

fn cross_entropy_with(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
    chunks: Option<usize>,
) -> Result<Tensor> {
    let (n, v) = check_cross_entropy(logits, targets, mask)?;
    if !fused(&[logits]) {
        return cross_entropy_reference(logits, targets, mask);
    }
    let ids = targets.to_dtype(DType::U32)?.to_vec1::<u32>()?;
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= v) {
        return Err(Error::InvalidArgument(format!(
            "target id {bad} is out of range for {v} logits"
        )));
    }
    let weights = match mask {
        Some(m) => Some(m.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    let count = match &weights {
        Some(w) => w.iter().map(|&m| m as f64).sum::<f64>(),
        None => n as f64,
    };
    if count <= 0.0 {
        return Err(Error::InvalidArgument(
            "loss mask selects no position".into(),
        ));
    }
    let op = CrossEntropyOp {
        v,
        targets: ids,
        mask: weights,
        inv_count: (1.0 / count) as f32,
        chunks,
        stash: logits.track_op().then(|| Mutex::new(None)),
    };
    Ok(logits.contiguous()?.apply_op1(op)?)
}

/// Checks the shapes of a cross-entropy's arguments; returns (N, V).
fn check_cross_entropy(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
) -> Result<(usize, usize)> {
    let (n, v) = logits.dims2().map_err(|_| {
        Error::InvalidArgument(format!(
            "logits must be (N, V), got shape {:?}",
            logits.dims()
        ))
    })?;
    if n == 0 || v == 0 {
        return Err(Error::InvalidArgument(format!(
            "cross-entropy needs at least one row and one class, got logits of shape [{n}, {v}]"
        )));
    }
    check_vector(targets, n, "targets")?;
    if let Some(m) = mask {
        check_vector(m, n, "loss mask")?;
    }
    Ok((n, v))
}

/// Cross-entropy from plain candle ops (log-softmax, gather, mean), the reference
/// [`cross_entropy`] is tested against; the same function as [`crate::model::cross_entropy`].
///
/// # Errors
/// As [`cross_entropy`] (an out-of-range target is a candle error here).
pub fn cross_entropy_reference(
    logits: &Tensor,
    targets: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    check_cross_entropy(logits, targets, mask)?;
    let logits = logits.to_dtype(stats_dtype(logits.dtype()))?;
    let max = logits.max_keepdim(1)?.detach(); // (N, 1)
    let shifted = logits.broadcast_sub(&max)?; // (N, V)
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?; // (N, 1)
    let picked = shifted.gather(&targets.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?; // (N, 1)
    let nll = (lse - picked)?.squeeze(1)?; // (N,)
    match mask {
        None => Ok(nll.mean_all()?),
        Some(mask) => {
            let mask = mask.to_dtype(nll.dtype())?;
            let count = mask.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
            if count <= 0.0 {
                return Err(Error::InvalidArgument(
                    "loss mask selects no position".into(),
                ));
            }
            Ok((nll.mul(&mask)?.sum_all()? / count)?)
        }
    }
}

/// The fused cross-entropy of logits (N, V); targets and mask travel in the op.
struct CrossEntropyOp {
    v: usize,
    targets: Vec<u32>,
    mask: Option<Vec<f32>>,
    inv_count: f32,
    /// Row chunks forced by a test; `None` lets [`plan`] decide.
    chunks: Option<usize>,
    /// `Some` when the forward pass is to compute dlogits (for dloss = 1), which it leaves
    /// here for the backward pass to take.
    stash: Option<Mutex<Option<Vec<f32>>>>,
}

impl CrossEntropyOp {
    /// The weight of row `r` (its mask value).
    #[inline]
    fn weight(&self, r: usize) -> f32 {
        match &self.mask {
            Some(m) => m.get(r).copied().unwrap_or(0.0),
            None => 1.0,
        }
    }

    /// The target of row `r`.
    #[inline]
    fn target(&self, r: usize) -> usize {
        self.targets.get(r).copied().unwrap_or(0) as usize
    }

    /// dlogits for `dloss = g`: rows of `(softmax − onehot)·weight/count·g`, 0 for rows
    /// with weight 0; and the weighted sum of the rows' nll.
    fn gradient(&self, x: &[f32], g: f32, chunks: usize) -> (Vec<f32>, f32) {
        let v = self.v;
        let mut dx = vec![0f32; x.len()];
        let mut nll = vec![0f32; x.len() / v];
        for_row_chunks2(&mut dx, v, &mut nll, 1, chunks, |r0, dxs, nlls| {
            for (i, (d, o)) in dxs.chunks_exact_mut(v).zip(nlls.iter_mut()).enumerate() {
                let r = r0 + i;
                let m = self.weight(r);
                if m == 0.0 {
                    continue;
                }
                let row = &x[r * v..(r + 1) * v];
                let t = self.target(r);
                // d = e^(x - max); nll = ln Σd - (x_t - max); d = d / Σd · scale - onehot · scale
                let max = row_max(row);
                for (d, &z) in d.iter_mut().zip(row) {
                    *d = exp(z - max);
                }
                let s = sum(d);
                *o = m * (s.ln() - (row.get(t).copied().unwrap_or(0.0) - max));
                let scale = m * self.inv_count * g;
                let k = scale / s;
                for d in d.iter_mut() {
                    *d *= k;
                }
                if let Some(d) = d.get_mut(t) {
                    *d -= scale;
                }
            }
        });
        (dx, sum_in_order(&nll))
    }

    /// The weighted sum of the rows' nll alone.
    fn nll_sum(&self, x: &[f32], chunks: usize) -> f32 {
        let v = self.v;
        let mut nll = vec![0f32; x.len() / v];
        for_row_chunks(&mut nll, 1, chunks, |r0, out| {
            let mut e = vec![0f32; v]; // one scratch row per chunk
            for (i, o) in out.iter_mut().enumerate() {
                let r = r0 + i;
                let m = self.weight(r);
                if m == 0.0 {
                    continue;
                }
                let row = &x[r * v..(r + 1) * v];
                let max = row_max(row);
                for (e, &z) in e.iter_mut().zip(row) {
                    *e = exp(z - max);
                }
                let picked = row.get(self.target(r)).copied().unwrap_or(0.0) - max;
                *o = m * (sum(&e).ln() - picked);
            }
        });
        sum_in_order(&nll)
    }
}

/// Σ x in row order, in f64: the loss does not depend on how rows were split.
fn sum_in_order(x: &[f32]) -> f32 {
    x.iter().map(|&v| v as f64).sum::<f64>() as f32
}

/// The maximum of a row.
#[inline]
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = a.max(v);
        }
    }
    rest.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

impl CustomOp1 for CrossEntropyOp {
    fn name(&self) -> &'static str {
        "tinygpt-cross-entropy"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l, "cross_entropy logits")?;
        let n = x.len() / self.v;
        let total = match &self.stash {
            Some(stash) => {
                let work = cost::CROSS_ENTROPY_FWD + cost::CROSS_ENTROPY_BWD;
                let (dx, total) = self.gradient(x, 1.0, plan(n, x.len(), work, self.chunks));
                if let Ok(mut slot) = stash.lock() {
                    *slot = Some(dx);
                }
                total
            }
            None => {
                let chunks = plan(n, x.len(), cost::CROSS_ENTROPY_FWD, self.chunks);
                self.nll_sum(x, chunks)
            }
        };
        let loss = total * self.inv_count;
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.reshape(())?.to_dtype(DType::F32)?.to_scalar::<f32>()?;
        let stashed = self
            .stash
            .as_ref()
            .and_then(|s| s.lock().ok().and_then(|mut slot| slot.take()));
        let dx = match stashed {
            Some(mut dx) => {
                if g != 1.0 {
                    for d in dx.iter_mut() {
                        *d *= g;
                    }
                }
                dx
            }
            None => with_slices(&[logits], |s| {
                let x = s[0];
                let chunks = plan(
                    x.len() / self.v,
                    x.len(),
                    cost::CROSS_ENTROPY_BWD,
                    self.chunks,
                );
                Ok(self.gradient(x, g, chunks).0)
            })?,
        };
        Ok(Some(tensor(dx, logits.shape())?))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, Normal};

    pub(crate) type R<T> = std::result::Result<T, Box<dyn std::error::Error>>;

    pub(crate) fn randn(rng: &mut ChaCha8Rng, dims: &[usize], std: f32) -> R<Tensor> {
        let normal = Normal::new(0f32, std)?;
        let n = dims.iter().product();
        let data: Vec<f32> = (0..n).map(|_| normal.sample(rng)).collect();
        Ok(Tensor::from_vec(data, dims, &Device::Cpu)?)
    }

    pub(crate) fn var(rng: &mut ChaCha8Rng, dims: &[usize], std: f32) -> R<Var> {
        Ok(Var::from_tensor(&randn(rng, dims, std)?)?)
    }

    pub(crate) fn max_abs(a: &Tensor) -> R<f64> {
        Ok(a.to_dtype(DType::F64)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?)
    }

    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> R<f64> {
        assert_eq!(a.dims(), b.dims());
        max_abs(&(a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?)
    }

    /// The largest differences [`check`] saw.
    #[derive(Debug, Default, Clone, Copy)]
    pub(crate) struct Diffs {
        /// fused vs f32 reference, values and gradients, absolute
        abs: f64,
        /// the same over max(1, largest |f64 truth|) of the tensor
        scaled: f64,
        /// fused vs the f64 truth, scaled
        fused_vs_f64: f64,
        /// f32 reference vs the f64 truth, scaled
        reference_vs_f64: f64,
    }

    impl Diffs {
        pub(crate) fn max(self, o: Diffs) -> Diffs {
            Diffs {
                abs: self.abs.max(o.abs),
                scaled: self.scaled.max(o.scaled),
                fused_vs_f64: self.fused_vs_f64.max(o.fused_vs_f64),
                reference_vs_f64: self.reference_vs_f64.max(o.reference_vs_f64),
            }
        }
    }

    /// Runs `f` on `inputs` fused, as the f32 reference, and as the reference in f64 (the
    /// truth), each with the scalar loss `Σ y · r` for a fixed random `r`, and compares the
    /// values and the gradient of every input. A difference must be at most
    /// `tol · max(1, largest |truth|)`: an absolute `tol` for values of order 1, a relative
    /// one for gradients summed over many rows (dbias over 768 rows is ~30, where one f32 ulp
    /// is 2e-6 and the reference's own rounding exceeds 1e-5).
    pub(crate) fn check<F>(
        rng: &mut ChaCha8Rng,
        inputs: &[&Var],
        f: F,
        tol: f64,
        what: &str,
    ) -> R<Diffs>
    where
        F: Fn(&[&Tensor], bool) -> Result<Tensor>,
    {
        let ts: Vec<&Tensor> = inputs.iter().map(|v| v.as_tensor()).collect();
        let vars64 = ts
            .iter()
            .map(|t| Ok(Var::from_tensor(&t.to_dtype(DType::F64)?)?))
            .collect::<R<Vec<Var>>>()?;
        let ts64: Vec<&Tensor> = vars64.iter().map(|v| v.as_tensor()).collect();
        let y = f(&ts, true)?;
        let y_ref = f(&ts, false)?;
        let y64 = f(&ts64, false)?;
        let r = randn(rng, y.dims(), 1.0)?;
        let r64 = r.to_dtype(DType::F64)?;
        let g = (&y * &r)?.sum_all()?.backward()?;
        let g_ref = (&y_ref * &r)?.sum_all()?.backward()?;
        let g64 = (&y64 * &r64)?.sum_all()?.backward()?;
        let mut pairs = vec![("values".to_string(), y, y_ref, y64)];
        for (i, (t, t64)) in ts.iter().zip(&ts64).enumerate() {
            let (Some(a), Some(b), Some(c)) = (g.get(t), g_ref.get(t), g64.get(t64)) else {
                panic!("{what}: input {i} has no gradient");
            };
            pairs.push((
                format!("gradient of input {i}"),
                a.clone(),
                b.clone(),
                c.clone(),
            ));
        }
        let mut d = Diffs::default();
        for (name, fused, reference, truth) in pairs {
            let scale = max_abs(&truth)?.max(1.0);
            let abs = max_diff(&fused, &reference)?;
            let vs_truth = max_diff(&fused, &truth)? / scale;
            let ref_vs_truth = max_diff(&reference, &truth)? / scale;
            assert!(
                abs / scale <= tol && vs_truth <= tol,
                "{what}: {name}: fused vs reference {abs:e} (scale {scale}), vs f64 {vs_truth:e}"
            );
            d = d.max(Diffs {
                abs,
                scaled: abs / scale,
                fused_vs_f64: vs_truth,
                reference_vs_f64: ref_vs_truth,
            });
        }
        Ok(d)
    }

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=175_000 {
            let x = (-87.0 + i as f64 * 1e-3).clamp(-87.0, 88.0) as f32;
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        println!("exp: max relative error {worst:e}");
        assert!(worst < 3e-7, "{worst:e}");
        assert_eq!(exp(0.0), 1.0);
        assert!(exp(f32::NAN).is_nan());
        assert!(exp(-1000.0) < 2e-38 && exp(-1000.0) > 0.0);
        assert!(exp(1000.0).is_finite() && exp(1000.0) > 1e38);
    }

    const SHAPES: [[usize; 3]; 3] = [[2, 3, 8], [12, 64, 128], [3, 7, 33]];

    #[test]
    fn layer_norm_matches_reference() -> R<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut worst = Diffs::default();
        for dims in SHAPES {
            let c = dims[2];
            for with_bias in [false, true] {
                for chunks in [None, Some(1), Some(3)] {
                    let x = var(&mut rng, &dims, 1.0)?;
                    // offset and scale rows differently so the statistics matter
                    let x = Var::from_tensor(&((x.as_tensor() * 3.0)? + 0.5)?)?;
                    let w = Var::from_tensor(&(randn(&mut rng, &[c], 0.5)? + 1.0)?)?;
                    let b = var(&mut rng, &[c], 0.5)?;
                    let mut inputs = vec![&x, &w];
                    if with_bias {
                        inputs.push(&b);
                    }
                    let f = |t: &[&Tensor], fuse: bool| {
                        let b = t.get(2).copied();
                        if fuse {
                            layer_norm_with(t[0], t[1], b, 1e-5, chunks)
                        } else {
                            layer_norm_reference(t[0], t[1], b, 1e-5)
                        }
                    };
                    let what = format!("layer_norm {dims:?} bias {with_bias} chunks {chunks:?}");
                    worst = worst.max(check(&mut rng, &inputs, f, 1e-5, &what)?);
                }
            }
        }
        println!("layer_norm: {worst:?}");
        Ok(())
    }

    #[test]
    fn layer_norm_matches_hand_computation() -> R<()> {
        let w = Tensor::new(&[1f32, 2.0, 1.0, 1.0], &Device::Cpu)?;
        let b = Tensor::new(&[0f32, 0.0, 0.0, 1.0], &Device::Cpu)?;
        // x = [1, 2, 3, 4]: mean 2.5, biased variance 1.25
        let x = Tensor::new(&[[1f32, 2.0, 3.0, 4.0]], &Device::Cpu)?;
        let y = layer_norm(&x, &w, Some(&b), 1e-5)?.to_vec2::<f32>()?;
        let s = (1.25f32 + 1e-5).sqrt();
        let want = [-1.5 / s, 2.0 * -0.5 / s, 0.5 / s, 1.5 / s + 1.0];
        for (a, b) in y[0].iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn linear_and_add_bias_match_reference() -> R<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut worst = Diffs::default();
        for dims in SHAPES {
            let d_in = dims[2];
            for d_out in [d_in, 4 * d_in, 5] {
                for with_bias in [false, true] {
                    let x = var(&mut rng, &dims, 1.0)?;
                    let w = var(&mut rng, &[d_in, d_out], 0.1)?;
                    let b = var(&mut rng, &[d_out], 0.5)?;
                    let mut inputs = vec![&x, &w];
                    if with_bias {
                        inputs.push(&b);
                    }
                    let f = |t: &[&Tensor], fuse: bool| {
                        let b = t.get(2).copied();
                        if fuse {
                            linear(t[0], t[1], b)
                        } else {
                            linear_reference(t[0], t[1], b)
                        }
                    };
                    let what = format!("linear {dims:?} -> {d_out} bias {with_bias}");
                    worst = worst.max(check(&mut rng, &inputs, f, 1e-5, &what)?);
                }
            }
            // position-embedding style: a (T, C) "bias" over (B, T, C), serial and parallel
            for chunks in [None, Some(1), Some(3)] {
                let x = var(&mut rng, &dims, 1.0)?;
                let p = var(&mut rng, &dims[1..], 1.0)?;
                let f = |t: &[&Tensor], fuse: bool| {
                    if fuse {
                        add_bias_with(t[0], t[1], chunks)
                    } else {
                        add_bias_reference(t[0], t[1])
                    }
                };
                let what = format!("add_bias {dims:?} chunks {chunks:?}");
                worst = worst.max(check(&mut rng, &[&x, &p], f, 1e-5, &what)?);
            }
        }
        println!("linear/add_bias: {worst:?}");
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let b = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
        assert!(add_bias(&x, &b).is_err());
        Ok(())
    }

    #[test]
    fn bias_gelu_matches_reference() -> R<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut worst = Diffs::default();
        for dims in SHAPES {
            let n = dims[2];
            for with_bias in [false, true] {
                for chunks in [None, Some(1), Some(3)] {
                    let x = var(&mut rng, &dims, 2.0)?;
                    let b = var(&mut rng, &[n], 0.5)?;
                    let mut inputs = vec![&x];
                    if with_bias {
                        inputs.push(&b);
                    }
                    let f = |t: &[&Tensor], fuse: bool| {
                        let b = t.get(1).copied();
                        if fuse {
                            bias_gelu_with(t[0], b, chunks)
                        } else {
                            bias_gelu_reference(t[0], b)
                        }
                    };
                    let what = format!("bias_gelu {dims:?} bias {with_bias} chunks {chunks:?}");
                    worst = worst.max(check(&mut rng, &inputs, f, 1e-5, &what)?);
                }
            }
        }
        println!("bias_gelu: {worst:?}");
        // far tails: gelu(x) → x for large x, → 0 (not NaN) for very negative x
        let x = Tensor::new(&[-200f32, -30.0, 0.0, 30.0, 200.0], &Device::Cpu)?;
        let y = bias_gelu(&x, None)?.to_vec1::<f32>()?;
        assert!(y[0].abs() < 1e-30 && y[1].abs() < 1e-30, "{y:?}");
        assert_eq!(y[2..], [0.0, 30.0, 200.0]);
        Ok(())
    }

    fn targets(rng: &mut ChaCha8Rng, n: usize, v: usize) -> R<Tensor> {
        let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..v as u32)).collect();
        Ok(Tensor::from_vec(ids, n, &Device::Cpu)?)
    }

    #[test]
    fn cross_entropy_matches_reference() -> R<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut worst = Diffs::default();
        for (n, v, tol) in [
            (6, 8, 1e-5),
            (768, 70, 1e-5),
            (21, 33, 1e-5),
            (768, 2048, 1e-4),
        ] {
            for masked in [false, true] {
                for chunks in [None, Some(1), Some(3)] {
                    let logits = var(&mut rng, &[n, v], 3.0)?;
                    let t = targets(&mut rng, n, v)?;
                    let m: Vec<f32> = (0..n).map(|i| (i % 3 != 1) as u8 as f32).collect();
                    let m = Tensor::from_vec(m, n, &Device::Cpu)?;
                    let mask = masked.then_some(&m);
                    let f = |x: &[&Tensor], fuse: bool| {
                        if fuse {
                            cross_entropy_with(x[0], &t, mask, chunks)
                        } else {
                            cross_entropy_reference(x[0], &t, mask)
                        }
                    };
                    let what = format!("cross_entropy [{n}, {v}] mask {masked} chunks {chunks:?}");
                    worst = worst.max(check(&mut rng, &[&logits], f, tol, &what)?);
                }
            }
        }
        println!("cross_entropy: {worst:?}");
        Ok(())
    }

    #[test]
    fn cross_entropy_hand_values() -> R<()> {
        let logits = Tensor::zeros((3, 5), DType::F32, &Device::Cpu)?;
        let t = Tensor::new(&[0u32, 3, 4], &Device::Cpu)?;
        let l = cross_entropy(&logits, &t, None)?.to_scalar::<f32>()?;
        assert!((l - 5f32.ln()).abs() < 1e-6);
        // logits [1, 2, 3], target 2: -log(e^3 / (e + e^2 + e^3)); row 2 masked out
        let logits = Tensor::new(&[[1f32, 2.0, 3.0], [0.0, 0.0, 0.0]], &Device::Cpu)?;
        let t = Tensor::new(&[2u32, 1], &Device::Cpu)?;
        let mask = Tensor::new(&[1f32, 0.0], &Device::Cpu)?;
        let l = cross_entropy(&logits, &t, Some(&mask))?.to_scalar::<f32>()?;
        let e = std::f32::consts::E;
        let want = -(e.powi(3) / (e + e * e + e.powi(3))).ln();
        assert!((l - want).abs() < 1e-6, "{l} vs {want}");
        // errors: all-zero mask, out-of-range target, wrong shapes
        let zero = Tensor::zeros(2, DType::F32, &Device::Cpu)?;
        let e = cross_entropy(&logits, &t, Some(&zero))
            .unwrap_err()
            .to_string();
        assert!(e.contains("selects no position"), "{e}");
        let bad = Tensor::new(&[3u32, 0], &Device::Cpu)?;
        let e = cross_entropy(&logits, &bad, None).unwrap_err().to_string();
        assert!(
            e.contains("target id 3 is out of range for 3 logits"),
            "{e}"
        );
        assert!(cross_entropy(&logits, &Tensor::new(&[1u32], &Device::Cpu)?, None).is_err());
        Ok(())
    }

    #[test]
    fn cross_entropy_gradient_stash() -> R<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let (n, v) = (50, 13);
        let logits = var(&mut rng, &[n, v], 2.0)?;
        let t = targets(&mut rng, n, v)?;
        let grad = |loss: &Tensor| -> R<Tensor> {
            match loss.backward()?.get(&logits) {
                Some(g) => Ok(g.clone()),
                None => panic!("no gradient for the logits"),
            }
        };
        let loss = cross_entropy(&logits, &t, None)?;
        let from_stash = grad(&loss)?;
        let recomputed = grad(&loss)?; // the stash was taken: computed again
        assert!(max_diff(&from_stash, &recomputed)? <= 1e-7);
        let want = cross_entropy_reference(&logits, &t, None)?;
        assert!(max_diff(&from_stash, &grad(&want)?)? <= 1e-6);
        // dloss != 1, from the stash and recomputed
        let scaled = (cross_entropy(&logits, &t, None)? * 0.25)?;
        let quarter = (&from_stash * 0.25)?;
        assert!(max_diff(&grad(&scaled)?, &quarter)? <= 1e-7);
        assert!(max_diff(&grad(&scaled)?, &quarter)? <= 1e-7);
        // logits without a graph: no stash, the same loss
        let plain = logits.as_tensor().detach();
        let a = cross_entropy(&plain, &t, None)?.to_scalar::<f32>()?;
        assert_eq!(a, loss.to_scalar::<f32>()?);
        Ok(())
    }

    #[test]
    fn masked_out_targets_change_nothing() -> R<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let (n, v) = (40, 17);
        let logits = var(&mut rng, &[n, v], 2.0)?;
        let m: Vec<f32> = (0..n).map(|i| (i % 2) as f32).collect();
        let mask = Tensor::from_vec(m.clone(), n, &Device::Cpu)?;
        let t1 = targets(&mut rng, n, v)?;
        // change every masked-out target
        let t2: Vec<u32> = t1
            .to_vec1::<u32>()?
            .iter()
            .zip(&m)
            .map(|(&t, &m)| if m == 0.0 { (t + 5) % v as u32 } else { t })
            .collect();
        let t2 = Tensor::from_vec(t2, n, &Device::Cpu)?;
        let l1 = cross_entropy(&logits, &t1, Some(&mask))?;
        let l2 = cross_entropy(&logits, &t2, Some(&mask))?;
        assert_eq!(l1.to_scalar::<f32>()?, l2.to_scalar::<f32>()?);
        let g1 = l1.backward()?;
        let g2 = l2.backward()?;
        let (Some(g1), Some(g2)) = (g1.get(&logits), g2.get(&logits)) else {
            panic!("no gradient for the logits");
        };
        assert_eq!(max_diff(g1, g2)?, 0.0);
        // masked-out rows get no gradient at all
        let rows = g1.to_vec2::<f32>()?;
        for (r, row) in rows.iter().enumerate() {
            let norm: f32 = row.iter().map(|g| g.abs()).sum();
            assert_eq!(norm == 0.0, m[r] == 0.0, "row {r}");
            // softmax − onehot sums to zero in every counted row
            assert!(row.iter().sum::<f32>().abs() < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn cross_entropy_of_large_logits_is_finite() -> R<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let (n, v) = (16, 70);
        let signs: Vec<f32> = (0..n * v)
            .map(|_| if rng.random::<bool>() { 80.0 } else { -80.0 })
            .collect();
        let logits = Var::from_tensor(&Tensor::from_vec(signs, (n, v), &Device::Cpu)?)?;
        let t = targets(&mut rng, n, v)?;
        let l = cross_entropy(&logits, &t, None)?;
        let l_ref = cross_entropy_reference(&logits, &t, None)?;
        let (a, b) = (l.to_scalar::<f32>()?, l_ref.to_scalar::<f32>()?);
        assert!(
            a.is_finite() && (a - b).abs() <= 1e-4 * b.abs().max(1.0),
            "{a} vs {b}"
        );
        let g = l.backward()?;
        let Some(g) = g.get(&logits) else {
            panic!("no gradient for the logits");
        };
        let all_finite = g
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|v| v.is_finite());
        assert!(all_finite);
        Ok(())
    }

    #[test]
    fn non_f32_falls_back_to_the_reference() -> R<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let x = randn(&mut rng, &[2, 3, 8], 1.0)?.to_dtype(DType::F64)?;
        let w = Tensor::ones(8, DType::F64, &Device::Cpu)?;
        let y = layer_norm(&x, &w, None, 1e-5)?;
        let y_ref = layer_norm_reference(&x, &w, None, 1e-5)?;
        assert_eq!(y.dtype(), DType::F64);
        assert_eq!(max_diff(&y, &y_ref)?, 0.0);
        let y = bias_gelu(&x, None)?;
        assert_eq!(max_diff(&y, &x.gelu()?)?, 0.0);
        Ok(())
    }
}
