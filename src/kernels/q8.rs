//! GGUF's Q8_0 weights (ggml's `block_q8_0`) and their products with a few rows of f32
//! activations, for decoding from a quantized model.
//!
//! A Q8_0 block holds 32 consecutive weights along the input dimension: on disk 34 bytes, an
//! IEEE f16 scale `d` (little endian) then 32 `i8` values `qs`, each weight being
//! `d · qs[j]` (ggml-common.h, `block_q8_0`, `QK8_0 = 32`). A weight matrix of ggml shape
//! `ne = [in, out]` is stored row by row: `out` rows of `in / 32` blocks.
//!
//! [`Q8Matrix`] keeps the `i8` values of all rows in one array and the scales, widened to f32
//! (exactly), in another, so that the kernels read 32 aligned-in-order bytes per block and
//! one f32 scale. [`Q8Matrix::linear_into`] computes `y = x @ Wᵀ` for `rows` rows of `x`: the
//! outputs are split over rayon's threads, each thread writing its own outputs where they lie
//! in `y`; a block is widened to f32 in registers (`i8 → i32 → f32`), multiplied by its scale
//! (exact: a 7-bit integer times an 11-bit f16 significand fits in f32's 24 bits), and
//! multiply-added into f32 accumulators. So the products equal an f32 product with the
//! dequantized weights up to the order of the sums. Kernels: AVX-512F, AVX2 + FMA (chosen at
//! run time) and a portable one; for a given kernel each output is summed in the same order
//! whatever the number of rows or threads, so a row comes out bit for bit the same alone, in
//! a batch, or split differently.

use half::f16;
use rayon::prelude::*;

use crate::{Error, Result};

/// Weights per block (ggml's `QK8_0`).
pub(crate) const BLOCK: usize = 32;

/// Bytes of one block on disk: the f16 scale and 32 `i8` (`sizeof(block_q8_0)`).
pub(crate) const BLOCK_BYTES: usize = 2 + BLOCK;

/// Below this many multiply-adds (`rows · in · out`) a product runs on the calling thread.
/// The same threshold as the f16 kernels of [`crate::gemv`].
const PARALLEL_MIN_WORK: usize = 1 << 16;

/// A Q8_0 weight matrix `(out, in)` (ggml `ne = [in, out]`), for `y = x @ Wᵀ` with f32
/// activations `x (rows, in)` and outputs `y (rows, out)`.
///
/// Row `j` of the weights is `in / 32` blocks; block `b` of row `j` has the 32 values
/// `qs[j·in + 32·b ..][..32]` and the scale `scales[j·(in/32) + b]`, weight `i` of the row
/// being `scales[j·(in/32) + i/32] · qs[j·in + i]`, as ggml's `dequantize_row_q8_0`.
#[derive(Debug, Clone)]
pub(crate) struct Q8Matrix {
    /// Outputs: rows of the weight matrix.
    d_out: usize,
    /// Inputs: a multiple of [`BLOCK`].
    d_in: usize,
    /// The quantized weights, `(out, in)` row-major.
    qs: Vec<i8>,
    /// The blocks' f16 scales widened to f32 (exactly, NaN payloads included), `(out, in/32)`.
    scales: Vec<f32>,
}

impl Q8Matrix {
    /// Reads `d_out` rows of `d_in / 32` Q8_0 blocks from GGUF tensor data: each block the f16
    /// scale (little endian) then 32 `i8`, `d_out · d_in / 32 · 34` bytes in all.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `d_in` is not a multiple of 32 or `bytes` has another
    /// length (sizes whose byte count overflows `usize` included).
    pub(crate) fn from_blocks(bytes: &[u8], d_out: usize, d_in: usize) -> Result<Self> {
        check_d_in(d_in)?;
        let blocks = d_out.checked_mul(d_in / BLOCK);
        let want = blocks.and_then(|b| b.checked_mul(BLOCK_BYTES));
        let (Some(blocks), Some(want)) = (blocks, want) else {
            return Err(Error::InvalidArgument(format!(
                "Q8_0 weight ({d_out}, {d_in}): its size in bytes overflows"
            )));
        };
        if bytes.len() != want {
            return Err(Error::InvalidArgument(format!(
                "Q8_0 weight ({d_out}, {d_in}): {} bytes, expected {want} ({blocks} blocks of {BLOCK_BYTES})",
                bytes.len()
            )));
        }
        let mut qs = Vec::with_capacity(blocks * BLOCK);
        let mut scales = Vec::with_capacity(blocks);
        for block in bytes.chunks_exact(BLOCK_BYTES) {
            if let [lo, hi, values @ ..] = block {
                scales.push(widen_scale(u16::from_le_bytes([*lo, *hi])));
                qs.extend(values.iter().map(|&b| b as i8));
            }
        }
        Ok(Self {
            d_out,
            d_in,
            qs,
            scales,
        })
    }

    /// The GGUF bytes of the matrix: the exact inverse of [`Q8Matrix::from_blocks`] (each
    /// scale back to its f16 bits, NaNs included), `d_out · d_in / 32 · 34` bytes.
    pub(crate) fn to_blocks(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.scales.len() * BLOCK_BYTES);
        for (q, &s) in self.qs.chunks_exact(BLOCK).zip(&self.scales) {
            bytes.extend_from_slice(&narrow_scale(s).to_le_bytes());
            bytes.extend(q.iter().map(|&v| v as u8));
        }
        bytes
    }

    /// Quantizes `w (out, in)` (f32, row-major) to Q8_0 bit for bit as ggml's
    /// `quantize_row_q8_0_ref` (ggml-quants.c) does, block by block: `amax = max |x|` (ggml's
    /// `MAX`, NaNs as it treats them), `d = amax / 127`, `id = 1/d` (0 when `d` is 0), the
    /// scale stored as `f16(d)` (round to nearest even) and `q = round(x · id)` (halves away
    /// from zero; the f32 `d`, not its f16 rounding, divides).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `d_in` is not a multiple of 32 or `w.len()` is not
    /// `d_out · d_in` (sizes whose product overflows included).
    pub(crate) fn quantize(w: &[f32], d_out: usize, d_in: usize) -> Result<Self> {
        check_d_in(d_in)?;
        if d_out.checked_mul(d_in) != Some(w.len()) {
            return Err(Error::InvalidArgument(format!(
                "Q8_0 quantization: {} weights do not make a ({d_out}, {d_in}) matrix",
                w.len()
            )));
        }
        let mut qs = vec![0i8; w.len()];
        let mut scales = vec![0f32; w.len() / BLOCK];
        qs.par_chunks_exact_mut(BLOCK)
            .zip(scales.par_iter_mut())
            .zip(w.par_chunks_exact(BLOCK))
            .with_min_len(1024)
            .for_each(|((q, s), x)| *s = quantize_block(x, q));
        Ok(Self {
            d_out,
            d_in,
            qs,
            scales,
        })
    }

    /// Inputs: the width of `x` and of each weight row.
    pub(crate) fn d_in(&self) -> usize {
        self.d_in
    }

    /// Outputs: the width of `y`, the number of weight rows.
    pub(crate) fn d_out(&self) -> usize {
        self.d_out
    }

    /// The weights as f32, `(out, in)` row-major (ggml's `dequantize_row_q8_0` on each row).
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        let mut w = Vec::with_capacity(self.qs.len());
        for (q, &s) in self.qs.chunks_exact(BLOCK).zip(&self.scales) {
            w.extend(q.iter().map(|&v| v as f32 * s));
        }
        w
    }

    /// Row `i` of the dequantized weights into `out` (a token-embedding lookup when the
    /// matrix is `wte (vocab, n_embd)`). Writes `min(out.len(), in)` values; a row `i` past
    /// the last fills `out` with zeros.
    pub(crate) fn row_into(&self, i: usize, out: &mut [f32]) {
        let Some((q, s)) = self.weight_rows(i, 1) else {
            out.fill(0.0);
            return;
        };
        for ((o, q), &s) in out.chunks_mut(BLOCK).zip(q.chunks_exact(BLOCK)).zip(s) {
            for (o, &v) in o.iter_mut().zip(q) {
                *o = v as f32 * s;
            }
        }
    }

    /// `y (rows, out) = x (rows, in) @ Wᵀ`, f32 activations and outputs, row-major. The
    /// outputs are split over rayon's threads (below [`PARALLEL_MIN_WORK`] multiply-adds, the
    /// calling thread does it all), each writing its block of outputs in place: no
    /// allocation. Each weight block is read once from memory and used for every row (eight
    /// rows at a time with AVX-512, four otherwise).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `x.len() != rows · in` or `y.len() != rows · out`.
    pub(crate) fn linear_into(&self, x: &[f32], rows: usize, y: &mut [f32]) -> Result<()> {
        if rows.checked_mul(self.d_in) != Some(x.len())
            || rows.checked_mul(self.d_out) != Some(y.len())
        {
            return Err(Error::InvalidArgument(format!(
                "Q8_0 product: {rows} rows of {} inputs into {} outputs do not fit a ({}, {}) weight",
                x.len(),
                y.len(),
                self.d_out,
                self.d_in
            )));
        }
        self.linear_with(Kernel::best(), x, rows, y);
        Ok(())
    }

    /// [`Q8Matrix::linear_into`] with a given kernel, sizes already checked.
    fn linear_with(&self, kernel: Kernel, x: &[f32], rows: usize, y: &mut [f32]) {
        if rows == 0 || self.d_out == 0 {
            return;
        }
        let work = rows.saturating_mul(self.d_in).saturating_mul(self.d_out);
        let len = chunk_len(self.d_out, work);
        let tasks = self.d_out.div_ceil(len);
        let out = Out {
            ptr: y.as_mut_ptr(),
            len: y.len(),
        };
        let run = |c: usize| {
            let j0 = c * len;
            let j1 = (j0 + len).min(self.d_out);
            // SAFETY: task `c` writes only the outputs `j0..j1` of each row, and the tasks'
            // ranges are disjoint; `y` is not otherwise touched until every task is done.
            unsafe { self.chunk(kernel, x, rows, j0, j1, &out) };
        };
        if tasks <= 1 {
            run(0);
        } else {
            (0..tasks).into_par_iter().for_each(run);
        }
    }

    /// The `i8` values and scales of the `n` weight rows from row `j` (`None` past the end).
    fn weight_rows(&self, j: usize, n: usize) -> Option<(&[i8], &[f32])> {
        let nb = self.d_in / BLOCK;
        let end = j.checked_add(n)?;
        let q = self
            .qs
            .get(j.checked_mul(self.d_in)?..end.checked_mul(self.d_in)?)?;
        let s = self.scales.get(j.checked_mul(nb)?..end.checked_mul(nb)?)?;
        Some((q, s))
    }

    /// Outputs `j0..j1` of every row of `x (rows, in)`, written into `out` (`y (rows, out)`).
    /// One row: four weight rows at a time (four streams from memory in flight). Several
    /// rows: one weight row at a time, dotted with a group of rows that shares each widened
    /// block.
    ///
    /// # Safety
    /// No other thread reads or writes the outputs `j0..j1` of any row of `out` meanwhile.
    unsafe fn chunk(
        &self,
        kernel: Kernel,
        x: &[f32],
        rows: usize,
        j0: usize,
        j1: usize,
        out: &Out,
    ) {
        let (d_in, d_out) = (self.d_in, self.d_out);
        if rows == 1 {
            let mut j = j0;
            while j + 4 <= j1 {
                if let Some((q, s)) = self.weight_rows(j, 4) {
                    let [v] = kernel.tile::<4, 1>(x, d_in, q, s);
                    for (o, v) in v.into_iter().enumerate() {
                        // SAFETY: output j + o < j1 of row 0 is this caller's (contract).
                        unsafe { out.write(j + o, v) };
                    }
                }
                j += 4;
            }
            for j in j..j1 {
                if let Some((q, s)) = self.weight_rows(j, 1) {
                    let [[v]] = kernel.tile::<1, 1>(x, d_in, q, s);
                    // SAFETY: as above.
                    unsafe { out.write(j, v) };
                }
            }
            return;
        }
        let group = kernel.row_group();
        for j in j0..j1 {
            let Some((q, s)) = self.weight_rows(j, 1) else {
                continue;
            };
            let mut r0 = 0;
            while r0 < rows {
                let take = (rows - r0).min(group);
                let xr = x.get(r0 * d_in..).unwrap_or_default();
                macro_rules! group {
                    ($($n:literal)*) => {
                        match take {
                            $($n => {
                                let v = kernel.tile::<1, $n>(xr, d_in, q, s);
                                for (t, [v]) in v.into_iter().enumerate() {
                                    // SAFETY: output j of row r0 + t, j in j0..j1, is this
                                    // caller's (contract).
                                    unsafe { out.write((r0 + t) * d_out + j, v) };
                                }
                            })*
                            _ => {}
                        }
                    };
                }
                group!(1 2 3 4 5 6 7 8);
                r0 += take;
            }
        }
    }
}

/// `d_in` must be whole blocks.
fn check_d_in(d_in: usize) -> Result<()> {
    if !d_in.is_multiple_of(BLOCK) {
        return Err(Error::InvalidArgument(format!(
            "Q8_0 weight: {d_in} inputs are not a multiple of the block size {BLOCK}"
        )));
    }
    Ok(())
}

/// One block of ggml's `quantize_row_q8_0_ref`: the 32 values `x` into `q`, returning the
/// scale (the f16 `GGML_FP32_TO_FP16(d)`, widened to f32).
fn quantize_block(x: &[f32], q: &mut [i8]) -> f32 {
    // ggml: `amax = MAX(amax, fabsf(v))` with `MAX(a, b) = a > b ? a : b`.
    let amax = x.iter().fold(0f32, |m, v| {
        let a = v.abs();
        if m > a {
            m
        } else {
            a
        }
    });
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    for (q, &v) in q.iter_mut().zip(x) {
        // `roundf`, halves away from zero; the cast saturates (and maps NaN to 0) where C's
        // would be undefined.
        *q = (v * id).round() as i8;
    }
    widen_scale(f16::from_f32(d).to_bits())
}

/// An f16 scale's bits as f32: exact, and a NaN keeps its sign and payload (not quietened),
/// so that [`narrow_scale`] gives the same bits back.
fn widen_scale(bits: u16) -> f32 {
    let h = f16::from_bits(bits);
    if h.is_nan() {
        let b = bits as u32;
        f32::from_bits(((b & 0x8000) << 16) | 0x7f80_0000 | ((b & 0x03ff) << 13))
    } else {
        h.to_f32()
    }
}

/// The f16 bits of a scale made by [`widen_scale`] (exact for those; other values are rounded
/// to nearest even).
fn narrow_scale(s: f32) -> u16 {
    if s.is_nan() {
        let b = s.to_bits();
        let mantissa = ((b >> 13) & 0x03ff) as u16;
        let sign = ((b >> 16) & 0x8000) as u16;
        sign | 0x7c00 | if mantissa == 0 { 0x0200 } else { mantissa }
    } else {
        f16::from_f32(s).to_bits()
    }
}

/// Output chunks for the threads over `n` outputs, in multiples of 16 (as [`crate::gemv`]
/// splits them): one chunk per thread, or a single one below [`PARALLEL_MIN_WORK`].
fn chunk_len(n: usize, work: usize) -> usize {
    let threads = if work >= PARALLEL_MIN_WORK {
        rayon::current_num_threads().max(1)
    } else {
        1
    };
    n.div_ceil(threads).div_ceil(16).max(1) * 16
}

/// `y`'s buffer, shared by the threads of one product, each writing its own outputs.
struct Out {
    /// `y.as_mut_ptr()`.
    ptr: *mut f32,
    /// `y.len()`.
    len: usize,
}

// SAFETY: `Out` only hands out writes through `write`, whose callers promise that no two
// threads touch the same element; the buffer outlives the product that shares it.
unsafe impl Sync for Out {}

impl Out {
    /// Writes `v` into `y[i]` (nothing if `i` is out of range).
    ///
    /// # Safety
    /// No other thread reads or writes `y[i]` during the product.
    unsafe fn write(&self, i: usize, v: f32) {
        if i < self.len {
            // SAFETY: `i < len`, inside `y`; the caller rules out concurrent access.
            unsafe { self.ptr.add(i).write(v) };
        }
    }
}

/// The kernels: each computes a tile of outputs with the same per-output arithmetic, so
/// results do not depend on the tile shape (see [`Kernel::tile`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
enum Kernel {
    /// Plain Rust, auto-vectorised; every CPU.
    Portable,
    /// AVX2 + FMA intrinsics, 8 lanes.
    Avx2,
    /// AVX-512F intrinsics, 16 lanes.
    Avx512,
}

impl Kernel {
    /// The fastest kernel this CPU runs.
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Kernel::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Kernel::Avx2;
            }
        }
        Kernel::Portable
    }

    /// Rows of `x` that share one widened weight block: as many as the accumulators fit in
    /// the vector registers (two per row and output; 32 registers with AVX-512, 16 without).
    fn row_group(self) -> usize {
        match self {
            Kernel::Avx512 => 8,
            Kernel::Avx2 | Kernel::Portable => 4,
        }
    }

    /// `out[r][o] = Σ_i x[r·in + i] · w[o·in + i]` for `R` rows of `x` (row-major, `in`
    /// wide) and `N` weight rows (`qs`, `in` wide, `scales`, `in/32` wide). A kernel whose
    /// features this CPU lacks runs the portable one. All zeros if the slices are too
    /// short (never: the callers pass whole rows).
    fn tile<const N: usize, const R: usize>(
        self,
        x: &[f32],
        d_in: usize,
        qs: &[i8],
        scales: &[f32],
    ) -> [[f32; N]; R] {
        #[cfg(target_arch = "x86_64")]
        match self {
            Kernel::Avx512 if is_x86_feature_detected!("avx512f") => {
                // SAFETY: the CPU has AVX-512F, the feature `avx512::tile` is compiled for.
                return unsafe { avx512::tile::<N, R>(x, d_in, qs, scales) };
            }
            Kernel::Avx2 if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") => {
                // SAFETY: the CPU has AVX2 and FMA, the features `avx2::tile` is compiled for.
                return unsafe { avx2::tile::<N, R>(x, d_in, qs, scales) };
            }
            _ => {}
        }
        portable_tile::<N, R>(x, d_in, qs, scales)
    }
}

/// The portable kernel: per output and row, 32 running sums (one per position in a block)
/// of `x · (q · d)`, added up at the end. The loops vectorise (SSE2, NEON).
fn portable_tile<const N: usize, const R: usize>(
    x: &[f32],
    d_in: usize,
    qs: &[i8],
    scales: &[f32],
) -> [[f32; N]; R] {
    let mut out = [[0f32; N]; R];
    let nb = d_in / BLOCK;
    for (r, out_r) in out.iter_mut().enumerate() {
        let Some(xr) = x.get(r * d_in..(r + 1) * d_in) else {
            break;
        };
        for (o, v) in out_r.iter_mut().enumerate() {
            let (Some(q), Some(s)) = (
                qs.get(o * d_in..(o + 1) * d_in),
                scales.get(o * nb..(o + 1) * nb),
            ) else {
                break;
            };
            let mut acc = [0f32; BLOCK];
            for ((xb, qb), &s) in xr.chunks_exact(BLOCK).zip(q.chunks_exact(BLOCK)).zip(s) {
                for ((a, &xv), &qv) in acc.iter_mut().zip(xb).zip(qb) {
                    *a += xv * (qv as f32 * s);
                }
            }
            *v = acc.iter().sum();
        }
    }
    out
}

/// The AVX-512F kernel.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::BLOCK;

    /// How far ahead, in bytes, each weight stream is prefetched. Measured on one core
    /// streaming 537 MB from memory (4 weight rows of 768 at a time): no prefetch 6.3 GB/s,
    /// 1 KiB ahead 8.5, 2 KiB 9.6, 3-8 KiB 10.4-11.2.
    const PREFETCH: usize = 4096;

    /// As [`super::Kernel::tile`]. Per block and weight row: 32 `i8` widened to two vectors
    /// of 16 f32 (`vpmovsxbd`, `vcvtdq2ps`), multiplied by the broadcast scale (exact), and
    /// multiply-added with the row's activations into two accumulators (positions 0-15 and
    /// 16-31 of the blocks); one horizontal sum per output at the end. With `N` weight rows
    /// the `N` streams are read at once; with `R` rows each widened block serves all `R`.
    #[target_feature(enable = "avx512f")]
    pub(super) fn tile<const N: usize, const R: usize>(
        x: &[f32],
        d_in: usize,
        qs: &[i8],
        scales: &[f32],
    ) -> [[f32; N]; R] {
        let mut out = [[0f32; N]; R];
        let nb = d_in / BLOCK;
        if !d_in.is_multiple_of(BLOCK)
            || x.len() < R * d_in
            || qs.len() < N * d_in
            || scales.len() < N * nb
        {
            return out; // never: the callers pass whole rows
        }
        let mut acc = [[[_mm512_setzero_ps(); 2]; N]; R];
        for b in 0..nb {
            let i = b * BLOCK;
            for o in 0..N {
                // SAFETY: o·in + i + 32 <= N·in <= qs.len(), o·nb + b < N·nb <= scales.len(),
                // r·in + i + 32 <= R·in <= x.len() (checked above); prefetches never fault.
                unsafe {
                    let p = qs.as_ptr().add(o * d_in + i);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH));
                    let s = _mm512_set1_ps(*scales.get_unchecked(o * nb + b));
                    let lo = _mm512_cvtepi8_epi32(_mm_loadu_si128(p as *const __m128i));
                    let hi = _mm512_cvtepi8_epi32(_mm_loadu_si128(p.add(16) as *const __m128i));
                    let w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(lo), s);
                    let w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(hi), s);
                    for (r, acc_r) in acc.iter_mut().enumerate() {
                        let xp = x.as_ptr().add(r * d_in + i);
                        let a = &mut acc_r[o];
                        a[0] = _mm512_fmadd_ps(_mm512_loadu_ps(xp), w0, a[0]);
                        a[1] = _mm512_fmadd_ps(_mm512_loadu_ps(xp.add(16)), w1, a[1]);
                    }
                }
            }
        }
        for (out_r, acc_r) in out.iter_mut().zip(&acc) {
            for (v, a) in out_r.iter_mut().zip(acc_r) {
                *v = _mm512_reduce_add_ps(_mm512_add_ps(a[0], a[1]));
            }
        }
        out
    }
}

/// The AVX2 + FMA kernel.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::BLOCK;

    /// How far ahead, in bytes, each weight stream is prefetched (as the AVX-512 kernel).
    const PREFETCH: usize = 4096;

    /// As [`super::Kernel::tile`], 8 lanes: per block and weight row, four groups of eight
    /// `i8` widened to f32 (`vpmovsxbd`, `vcvtdq2ps`), scaled (exact) and multiply-added with
    /// the activations into two accumulators (groups 0, 2 and 1, 3); one horizontal sum per
    /// output at the end.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn tile<const N: usize, const R: usize>(
        x: &[f32],
        d_in: usize,
        qs: &[i8],
        scales: &[f32],
    ) -> [[f32; N]; R] {
        let mut out = [[0f32; N]; R];
        let nb = d_in / BLOCK;
        if !d_in.is_multiple_of(BLOCK)
            || x.len() < R * d_in
            || qs.len() < N * d_in
            || scales.len() < N * nb
        {
            return out; // never: the callers pass whole rows
        }
        let mut acc = [[[_mm256_setzero_ps(); 2]; N]; R];
        for b in 0..nb {
            let i = b * BLOCK;
            for o in 0..N {
                // SAFETY: as in the AVX-512 kernel: every read lies inside the slices,
                // whose lengths are checked above; prefetches never fault.
                unsafe {
                    let p = qs.as_ptr().add(o * d_in + i);
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(PREFETCH));
                    let s = _mm256_set1_ps(*scales.get_unchecked(o * nb + b));
                    for k in 0..4 {
                        let q = _mm_loadl_epi64(p.add(8 * k) as *const __m128i);
                        let w = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), s);
                        for (r, acc_r) in acc.iter_mut().enumerate() {
                            let xv = _mm256_loadu_ps(x.as_ptr().add(r * d_in + i + 8 * k));
                            let a = &mut acc_r[o][k % 2];
                            *a = _mm256_fmadd_ps(xv, w, *a);
                        }
                    }
                }
            }
        }
        for (out_r, acc_r) in out.iter_mut().zip(&acc) {
            for (v, a) in out_r.iter_mut().zip(acc_r) {
                *v = hsum(_mm256_add_ps(a[0], a[1]));
            }
        }
        out
    }

    /// The sum of the eight lanes of `v`.
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rng(seed: u64) -> rand_chacha::ChaCha8Rng {
        rand_chacha::ChaCha8Rng::seed_from_u64(seed)
    }

    fn random(rng: &mut rand_chacha::ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// The kernels this CPU runs, the portable one first.
    fn kernels() -> Vec<Kernel> {
        let mut ks = vec![Kernel::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                ks.push(Kernel::Avx2);
            }
            if is_x86_feature_detected!("avx512f") {
                ks.push(Kernel::Avx512);
            }
        }
        ks
    }

    /// Every kernel, for 1, 3, 16 and 64 rows and an odd number of outputs (serial, and split
    /// over the threads for the larger ones), against an f64 dot of the dequantized weights:
    /// within 1e-5 of `Σ |x · w|`. Each row also comes out bit for bit as it does alone, and
    /// `linear_into` gives the best kernel's bits.
    #[test]
    fn kernels_match_an_f64_reference() {
        let mut rng = rng(1);
        for &(d_out, d_in) in &[(37, 64), (37, 2048), (5, 32), (130, 768)] {
            let w = random(&mut rng, d_out * d_in);
            let m = Q8Matrix::quantize(&w, d_out, d_in).unwrap();
            let wd = m.dequantize();
            for rows in [1, 3, 16, 64] {
                let x = random(&mut rng, rows * d_in);
                let mut want = vec![0f64; rows * d_out];
                let mut mag = vec![0f64; rows * d_out];
                for r in 0..rows {
                    for j in 0..d_out {
                        for i in 0..d_in {
                            let p = x[r * d_in + i] as f64 * wd[j * d_in + i] as f64;
                            want[r * d_out + j] += p;
                            mag[r * d_out + j] += p.abs();
                        }
                    }
                }
                for k in kernels() {
                    let mut y = vec![f32::NAN; rows * d_out];
                    m.linear_with(k, &x, rows, &mut y);
                    for (t, ((&g, &e), &s)) in y.iter().zip(&want).zip(&mag).enumerate() {
                        assert!(
                            (g as f64 - e).abs() <= 1e-5 * s + 1e-30,
                            "{k:?} rows {rows} ({d_out}, {d_in}) #{t}: {g} vs {e}"
                        );
                    }
                    for r in [0, rows - 1] {
                        let mut alone = vec![0f32; d_out];
                        m.linear_with(k, &x[r * d_in..(r + 1) * d_in], 1, &mut alone);
                        assert_eq!(
                            alone.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                            y[r * d_out..(r + 1) * d_out]
                                .iter()
                                .map(|v| v.to_bits())
                                .collect::<Vec<_>>(),
                            "{k:?}: row {r} of {rows} differs from the row alone"
                        );
                    }
                    if k == Kernel::best() {
                        let mut y2 = vec![0f32; rows * d_out];
                        m.linear_into(&x, rows, &mut y2).unwrap();
                        assert_eq!(y, y2);
                    }
                }
            }
        }
    }

    /// The SIMD kernels against the portable one on every tile shape the callers use.
    #[test]
    fn simd_tiles_match_portable() {
        let mut rng = rng(2);
        let d_in = 96;
        let x = random(&mut rng, 8 * d_in);
        let w = random(&mut rng, 4 * d_in);
        let m = Q8Matrix::quantize(&w, 4, d_in).unwrap();
        let (q, s) = (&m.qs[..], &m.scales[..]);
        let close = |a: f32, b: f32| (a - b).abs() <= 1e-5 * (1.0 + b.abs());
        for k in kernels() {
            let (got, want) = (
                k.tile::<4, 1>(&x, d_in, q, s),
                portable_tile::<4, 1>(&x, d_in, q, s),
            );
            assert!(got[0].iter().zip(&want[0]).all(|(a, b)| close(*a, *b)));
            let (got, want) = (
                k.tile::<1, 8>(&x, d_in, q, s),
                portable_tile::<1, 8>(&x, d_in, q, s),
            );
            assert!(got.iter().zip(&want).all(|(a, b)| close(a[0], b[0])));
        }
    }

    #[test]
    fn blocks_round_trip() {
        let mut rng = rng(3);
        let (d_out, d_in) = (3, 64);
        let mut bytes: Vec<u8> = (0..d_out * d_in / 32 * 34).map(|_| rng.random()).collect();
        bytes[0..2].copy_from_slice(&0x7c01u16.to_le_bytes()); // a signalling NaN scale
        let m = Q8Matrix::from_blocks(&bytes, d_out, d_in).unwrap();
        assert_eq!((m.d_out(), m.d_in()), (d_out, d_in));
        assert_eq!(m.to_blocks(), bytes);
        // Block 1 of row 2, weight 5: scale bytes at 34·5, value at 34·5 + 2 + 5.
        let blk = &bytes[34 * 5..34 * 6];
        let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        let want = d * (blk[7] as i8) as f32;
        let got = m.dequantize()[2 * d_in + 32 + 5];
        assert!(got == want || (got.is_nan() && want.is_nan()));
        let mut row = vec![0f32; d_in];
        m.row_into(2, &mut row);
        assert_eq!(
            row.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            m.dequantize()[2 * d_in..]
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        );
        m.row_into(3, &mut row); // past the end
        assert!(row.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn every_scale_bit_pattern_round_trips() {
        for bits in 0..=u16::MAX {
            let s = widen_scale(bits);
            assert_eq!(narrow_scale(s), bits, "{bits:#06x}");
            if !f16::from_bits(bits).is_nan() {
                assert_eq!(s.to_bits(), f16::from_bits(bits).to_f32().to_bits());
            }
        }
    }

    /// Blocks worked by hand as `quantize_row_q8_0_ref` does them.
    #[test]
    fn quantize_matches_ggml_by_hand() {
        let mut w = vec![0f32; 3 * 32];
        // Block 0: max |x| = 127, so d = 1, id = 1 and q = round(x), halves away from zero.
        w[0] = 127.0;
        w[1] = -127.0;
        w[2] = 2.5;
        w[3] = -2.5;
        w[4] = 0.5;
        w[5] = -0.5;
        w[6] = 1.4999;
        w[7] = 3.0;
        // Block 1 stays zero: d = 0, id = 0, every q 0.
        // Block 2: max |x| = 254 (negative), d = 2, id = 0.5: 3 → 1.5 → 2, -5 → -2.5 → -3.
        w[64] = -254.0;
        w[65] = 3.0;
        w[66] = -5.0;
        w[67] = 1.0;
        let m = Q8Matrix::quantize(&w, 1, 96).unwrap();
        assert_eq!(m.scales, [1.0, 0.0, 2.0]);
        assert_eq!(&m.qs[..8], &[127, -127, 3, -3, 1, -1, 1, 3]);
        assert!(m.qs[8..64].iter().all(|&q| q == 0));
        assert_eq!(&m.qs[64..68], &[-127, 2, -3, 1]);
        let bytes = m.to_blocks();
        assert_eq!(&bytes[..4], &[0x00, 0x3c, 127, 0x81]); // f16 1.0 = 0x3c00, -127 = 0x81
        assert_eq!(&bytes[34..36], &[0, 0]);
        assert_eq!(&bytes[68..70], &[0x00, 0x40]); // f16 2.0

        // amax = 1: d = 1/127 in f32 divides, its f16 rounding is stored.
        let mut w = vec![0f32; 32];
        w[0] = 1.0;
        w[1] = 0.5; // 0.5 · 127 = 63.5 → 64
        w[2] = -0.25; // -31.75 → -32
        let m = Q8Matrix::quantize(&w, 1, 32).unwrap();
        let d = 1.0f32 / 127.0;
        assert_eq!(m.scales, [f16::from_f32(d).to_f32()]);
        let id = 1.0 / d;
        assert_eq!(
            &m.qs[..3],
            &[
                (id).round() as i8,
                (0.5 * id).round() as i8,
                (-0.25 * id).round() as i8
            ]
        );
        assert_eq!(&m.qs[..3], &[127, 64, -32]);
    }

    #[test]
    fn bad_sizes_are_errors() {
        let err = |r: Result<Q8Matrix>| matches!(r, Err(Error::InvalidArgument(_)));
        assert!(err(Q8Matrix::from_blocks(&[0; 34], 1, 31)));
        assert!(err(Q8Matrix::from_blocks(&[0; 33], 1, 32)));
        assert!(err(Q8Matrix::from_blocks(&[0; 68], 1, 32)));
        assert!(err(Q8Matrix::quantize(&[0.0; 32], 1, 16)));
        assert!(err(Q8Matrix::quantize(&[0.0; 31], 1, 32)));
        // Sizes whose products overflow: errors, not panics.
        let huge = usize::MAX / 32 * 32;
        assert!(err(Q8Matrix::from_blocks(&[0; 34], usize::MAX, huge)));
        assert!(err(Q8Matrix::from_blocks(&[0; 34], usize::MAX, 32)));
        assert!(err(Q8Matrix::from_blocks(&[], 2, huge)));
        assert!(err(Q8Matrix::quantize(&[0.0; 32], usize::MAX, huge)));
        assert!(err(Q8Matrix::quantize(&[], usize::MAX, 64)));

        let m = Q8Matrix::quantize(&[0.5; 64], 2, 32).unwrap();
        let mut y = [0f32; 2];
        assert!(m.linear_into(&[0.0; 32], 1, &mut y).is_ok());
        assert!(m.linear_into(&[0.0; 31], 1, &mut y).is_err());
        assert!(m.linear_into(&[0.0; 32], 1, &mut [0f32; 3]).is_err());
        assert!(m.linear_into(&[0.0; 32], 2, &mut y).is_err());
        assert!(m.linear_into(&[0.0; 32], usize::MAX, &mut y).is_err());
        assert_eq!(y, [8.0 * 0.0; 2]);

        // Empty matrices and zero rows do nothing.
        let e = Q8Matrix::from_blocks(&[], 0, 0).unwrap();
        assert!(e.to_blocks().is_empty());
        assert!(e.linear_into(&[], 5, &mut []).is_ok());
        assert!(m.linear_into(&[], 0, &mut []).is_ok());
    }

    /// Effective bandwidth of `linear_into` against the f16 kernel at GPT-2 124M's shapes, on
    /// rayon's threads (`RAYON_NUM_THREADS=2 cargo test --release --lib q8::tests::bandwidth
    /// -- --ignored --nocapture`). Prints figures, asserts nothing about time. "hot" repeats one
    /// matrix (which then sits in the caches); "cold" cycles through copies of the head that
    /// together exceed the last-level cache.
    #[test]
    #[ignore]
    fn bandwidth() {
        use candle_core::{DType, Device, Tensor};
        use std::time::Instant;

        fn time(mut f: impl FnMut(usize)) -> f64 {
            f(0);
            let (start, mut n) = (Instant::now(), 0);
            while start.elapsed().as_secs_f64() < 0.4 || n < 5 {
                f(n);
                n += 1;
            }
            start.elapsed().as_secs_f64() / n as f64
        }

        let mut rng = rng(4);
        println!(
            "threads {}, kernel {:?}",
            rayon::current_num_threads(),
            Kernel::best()
        );
        println!("shape (out, in)   rows  q8 µs   q8 GB/s  f16 µs  f16 GB/s  (weights GB/s)");
        let shapes = [
            (2304, 768),
            (768, 768),
            (3072, 768),
            (768, 3072),
            (50257, 768),
        ];
        for &(d_out, d_in) in &shapes {
            let w = random(&mut rng, d_out * d_in);
            let q8 = Q8Matrix::quantize(&w, d_out, d_in).unwrap();
            let wt = Tensor::from_vec(w, (d_out, d_in), &Device::Cpu)
                .and_then(|t| t.to_dtype(DType::F16))
                .unwrap();
            let wt_t = wt.t().unwrap();
            let q8_bytes = (d_out * d_in + d_out * d_in / 32 * 4) as f64;
            let f16_bytes = (d_out * d_in * 2) as f64;
            for rows in [1, 16] {
                let x = random(&mut rng, rows * d_in);
                let mut y = vec![0f32; rows * d_out];
                let tq = time(|_| q8.linear_into(&x, rows, &mut y).unwrap());
                let tf = time(|_| crate::gemv::linear_into(&x, rows, &wt_t, &mut y).unwrap());
                println!(
                    "hot  ({d_out:5}, {d_in:4}) {rows:3} {:8.1} {:8.1} {:8.1} {:8.1}   q8 {:.2}x the weights/s of f16",
                    tq * 1e6,
                    q8_bytes / tq / 1e9,
                    tf * 1e6,
                    f16_bytes / tf / 1e9,
                    tf / tq
                );
            }
            if d_out == 50257 {
                let copies = 16; // 16 × 38.6 MB (q8), 16 × 77 MB (f16)
                let q8s: Vec<Q8Matrix> = (0..copies).map(|_| q8.clone()).collect();
                let wts: Vec<Tensor> = (0..copies).map(|_| wt.copy().unwrap()).collect();
                let wts_t: Vec<Tensor> = wts.iter().map(|t| t.t().unwrap()).collect();
                for rows in [1, 16] {
                    let x = random(&mut rng, rows * d_in);
                    let mut y = vec![0f32; rows * d_out];
                    let tq = time(|n| q8s[n % copies].linear_into(&x, rows, &mut y).unwrap());
                    let tf = time(|n| {
                        crate::gemv::linear_into(&x, rows, &wts_t[n % copies], &mut y).unwrap()
                    });
                    println!(
                        "cold ({d_out:5}, {d_in:4}) {rows:3} {:8.1} {:8.1} {:8.1} {:8.1}   q8 {:.2}x the weights/s of f16",
                        tq * 1e6,
                        q8_bytes / tq / 1e9,
                        tf * 1e6,
                        f16_bytes / tf / 1e9,
                        tf / tq
                    );
                }
            }
        }
    }
}
