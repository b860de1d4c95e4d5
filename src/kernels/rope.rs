//! Rotary position embeddings (Su et al. 2021, "RoFormer"), in Hugging Face's "rotate-half"
//! layout (Llama, Qwen, Mistral), fused with a hand-written backward pass.
//!
//! Each head vector `x` of size `hs` is split into halves `x[..h]` and `x[h..]`
//! (`h = hs/2`), and pair `(x[i], x[i+h])` is rotated by the angle `pos · inv_freq[i]`:
//! `out[i] = x[i]·cos − x[i+h]·sin`, `out[i+h] = x[i+h]·cos + x[i]·sin`. This is HF's
//! `q * cos + rotate_half(q) * sin` with `cos = cat(cos_h, cos_h)`. The rotation is
//! orthogonal, so the backward pass is the inverse rotation (the same loop with `−sin`).
//!
//! [`rope_qkv`] works on the packed output of the attention's one input projection,
//! `[q heads | k heads | v heads]` per token, in place of the three narrows, six
//! multiplications and three concatenations of [`rope_qkv_reference`]; [`rope_rows`] does
//! the same on plain slices for the batched decoder. Angles come from a [`RopeTable`] built
//! once per model.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use crate::layers::{cpu_slice, for_row_chunks, fused, multiversion, plan, tensor, with_slices};
use crate::{Error, Result};

/// Estimated serial cost of each pass, in picoseconds per element of the packed rows (see
/// [`crate::layers::PAR_MIN_NS`]).
mod cost {
    pub const FWD: usize = 400;
    pub const BWD: usize = 400;
}

/// The cos and sin of every rotary angle, `(max_positions, head_dim/2)` each, f32.
///
/// Computed as Hugging Face `transformers` does (`_compute_default_rope_parameters` and
/// `LlamaRotaryEmbedding.forward`), in f32: `inv_freq[i] = 1 / theta^(2i / head_dim)` (the
/// exponent `2i / head_dim` in f32, `theta` rounded to f32, the power computed in f64 and
/// rounded to f32, the reciprocal in f32), the angle `pos · inv_freq[i]` as an f32 product,
/// and its cos and sin computed in f64 and rounded to f32. Every step is the correctly
/// rounded f32 value, so the table agrees with PyTorch's f32 kernels (≤ 1 ulp each) to
/// about 1e-7. Cloning is cheap: the two tables are shared.
#[derive(Debug, Clone)]
pub struct RopeTable {
    head_dim: usize,
    max_positions: usize,
    theta: f64,
    /// `inv_freq`, (head_dim/2,)
    inv_freq: Arc<[f32]>,
    /// (max_positions, head_dim/2), row-major
    cos: Arc<[f32]>,
    /// (max_positions, head_dim/2), row-major
    sin: Arc<[f32]>,
}

impl RopeTable {
    /// The table for heads of `head_dim` at positions `0..max_positions`, with base `theta`
    /// (10 000 for Llama 2, 500 000 for Llama 3, 1 000 000 for Qwen2/3).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `head_dim` is 0 or odd, `max_positions` is 0 or the
    /// table would not fit in memory, or `theta` is not a finite number above 0.
    pub fn new(head_dim: usize, max_positions: usize, theta: f64) -> Result<Self> {
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::InvalidArgument(format!(
                "RoPE head_dim must be even and at least 2, got {head_dim}"
            )));
        }
        if max_positions == 0 {
            return Err(Error::InvalidArgument(
                "RoPE max_positions must be at least 1".into(),
            ));
        }
        if !(theta.is_finite() && theta > 0.0) {
            return Err(Error::InvalidArgument(format!(
                "RoPE theta must be a finite number above 0, got {theta}"
            )));
        }
        let h = head_dim / 2;
        let len = max_positions
            .checked_mul(h)
            .filter(|&n| n <= isize::MAX as usize / 8)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "RoPE table of {max_positions} positions × {h} angles is too large"
                ))
            })?;
        let base = theta as f32 as f64;
        let inv_freq: Vec<f32> = (0..h)
            .map(|i| {
                let e = (2 * i) as f32 / head_dim as f32;
                1.0 / (base.powf(e as f64) as f32)
            })
            .collect();
        let (mut cos, mut sin) = (Vec::with_capacity(len), Vec::with_capacity(len));
        for pos in 0..max_positions {
            for &f in &inv_freq {
                let angle = (pos as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Ok(Self {
            head_dim,
            max_positions,
            theta,
            inv_freq: inv_freq.into(),
            cos: cos.into(),
            sin: sin.into(),
        })
    }

    /// The head size the table is for.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// The number of positions the table covers (`0..max_positions`).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// The base the frequencies were computed from.
    pub fn theta(&self) -> f64 {
        self.theta
    }

    /// `inv_freq`, (head_dim/2,).
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// The cos and sin of the `head_dim/2` angles at position `pos`, or `None` if `pos` is
    /// not below [`max_positions`](Self::max_positions).
    pub fn at(&self, pos: usize) -> Option<(&[f32], &[f32])> {
        let h = self.head_dim / 2;
        let range = pos.checked_mul(h)?..pos.checked_add(1)?.checked_mul(h)?;
        Some((self.cos.get(range.clone())?, self.sin.get(range)?))
    }

    /// (cos, sin) rows of positions `past..past + t`, each `t · head_dim/2` long.
    fn rows(&self, past: usize, t: usize) -> Option<(&[f32], &[f32])> {
        let h = self.head_dim / 2;
        let end = past.checked_add(t)?.checked_mul(h)?;
        let range = past.checked_mul(h)?..end;
        Some((self.cos.get(range.clone())?, self.sin.get(range)?))
    }
}

/// Applies RoPE to the q and k heads of a packed projection, fused.
///
/// `qkv`: (B, T, (n_head + 2·n_kv_head)·hs), f32 on the CPU for the fused path, laid out per
/// token as `[q heads (n_head·hs) | k heads (n_kv_head·hs) | v heads (n_kv_head·hs)]`, each
/// head `hs` contiguous values, `hs = table.head_dim()`. Every q and k head of token `t` is
/// rotated to absolute position `past + t` (the same `past` for the whole batch: the length
/// of a KV cache); v is copied unchanged. Returns the same shape. n_kv_head < n_head is
/// grouped-query attention. Backward: the inverse rotation of `dy` on the q and k parts
/// (`dx[i] = dy[i]·cos + dy[i+h]·sin`, `dx[i+h] = dy[i+h]·cos − dy[i]·sin`), `dy` itself on
/// v. On any other device or dtype this is [`rope_qkv_reference`].
///
/// # Errors
/// [`Error::InvalidArgument`] if `qkv` is not 3-D, `n_head` or `n_kv_head` is 0, the last
/// dimension is not `(n_head + 2·n_kv_head)·table.head_dim()`, or `past + T` exceeds
/// `table.max_positions()`; candle errors from the reference path.
pub fn rope_qkv(
    qkv: &Tensor,
    table: &RopeTable,
    n_head: usize,
    n_kv_head: usize,
    past: usize,
) -> Result<Tensor> {
    rope_qkv_with(qkv, table, n_head, n_kv_head, past, None)
}

pub(crate) fn rope_qkv_with(
    qkv: &Tensor,
    table: &RopeTable,
    n_head: usize,
    n_kv_head: usize,
    past: usize,
    chunks: Option<usize>,
) -> Result<Tensor> {
    let (_, t, hs) = check_rope(qkv, table, n_head, n_kv_head, past)?;
    if !fused(&[qkv]) || qkv.elem_count() == 0 {
        return rope_qkv_reference(qkv, table, n_head, n_kv_head, past);
    }
    let op = RopeOp {
        table: table.clone(),
        row_len: (n_head + 2 * n_kv_head) * hs,
        rotated: (n_head + n_kv_head) * hs,
        t,
        past,
        chunks,
    };
    Ok(qkv.contiguous()?.apply_op1(op)?)
}

/// [`rope_qkv`] from plain, differentiable candle ops, as Hugging Face writes it: the q and
/// k parts narrowed out and reshaped to (B, T, heads, hs), `x * cos + rotate_half(x) * sin`
/// with `rotate_half(x) = cat(−x[h..], x[..h])` and cos/sin (T, hs) taken from `table`
/// (moved to `qkv`'s device and dtype), then the three parts concatenated again. The
/// reference [`rope_qkv`] is tested against and its fallback off the CPU.
///
/// # Errors
/// As [`rope_qkv`].
pub fn rope_qkv_reference(
    qkv: &Tensor,
    table: &RopeTable,
    n_head: usize,
    n_kv_head: usize,
    past: usize,
) -> Result<Tensor> {
    let (b, t, hs) = check_rope(qkv, table, n_head, n_kv_head, past)?;
    let h = hs / 2;
    let (cos, sin) = table
        .rows(past, t)
        .ok_or_else(|| out_of_range(table, past, t))?;
    let full = |half: &[f32]| -> Result<Tensor> {
        let half = Tensor::from_slice(half, (t, h), qkv.device())?.to_dtype(qkv.dtype())?;
        Ok(Tensor::cat(&[&half, &half], 1)?.reshape((1, t, 1, hs))?)
    };
    let (cos, sin) = (full(cos)?, full(sin)?);
    let rotate = |start: usize, heads: usize| -> Result<Tensor> {
        let x = qkv
            .narrow(2, start, heads * hs)?
            .reshape((b, t, heads, hs))?;
        let x1 = x.narrow(3, 0, h)?;
        let x2 = x.narrow(3, h, h)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
        let y = (x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
        Ok(y.reshape((b, t, heads * hs))?)
    };
    let q = rotate(0, n_head)?;
    let k = rotate(n_head * hs, n_kv_head)?;
    let v = qkv.narrow(2, (n_head + n_kv_head) * hs, n_kv_head * hs)?;
    Ok(Tensor::cat(&[&q, &k, &v], 2)?)
}

/// Rotates, in place, `n_heads` consecutive head vectors of `hs` values of one token to
/// position `pos`: `x` is `[head 0 | head 1 | …]`, `n_heads · hs` long (for a packed qkv
/// row, the q and k heads: `&mut row[..(n_head + n_kv_head) · hs]` with
/// `n_heads = n_head + n_kv_head`). The same values as [`rope_qkv`] gives for that token.
///
/// # Errors
/// [`Error::InvalidArgument`] if `hs` is not `table.head_dim()`, `x` is not `n_heads · hs`
/// long, or `pos` is not below `table.max_positions()`; `x` is left unchanged then.
// Only the tests call it until the batched decoder does.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) fn rope_rows(
    x: &mut [f32],
    n_heads: usize,
    hs: usize,
    pos: usize,
    table: &RopeTable,
) -> Result<()> {
    if hs != table.head_dim {
        return Err(Error::InvalidArgument(format!(
            "rope_rows: head size {hs} does not match the RoPE table's {}",
            table.head_dim
        )));
    }
    if Some(x.len()) != n_heads.checked_mul(hs) {
        return Err(Error::InvalidArgument(format!(
            "rope_rows: {} values are not {n_heads} heads of {hs}",
            x.len()
        )));
    }
    let (cos, sin) = table.at(pos).ok_or_else(|| out_of_range(table, pos, 1))?;
    rotate_heads(x, hs, cos, sin, 1.0);
    Ok(())
}

/// The error for positions `past..past + t` outside a table.
fn out_of_range(table: &RopeTable, past: usize, t: usize) -> Error {
    Error::InvalidArgument(format!(
        "RoPE positions {past}..{} exceed the table's {} positions",
        past.saturating_add(t),
        table.max_positions
    ))
}

/// Checks [`rope_qkv`]'s arguments; returns (B, T, hs).
fn check_rope(
    qkv: &Tensor,
    table: &RopeTable,
    n_head: usize,
    n_kv_head: usize,
    past: usize,
) -> Result<(usize, usize, usize)> {
    let (b, t, w) = qkv.dims3().map_err(|_| {
        Error::InvalidArgument(format!(
            "rope_qkv input must be (B, T, (n_head + 2·n_kv_head)·hs), got shape {:?}",
            qkv.dims()
        ))
    })?;
    if n_head == 0 || n_kv_head == 0 {
        return Err(Error::InvalidArgument(format!(
            "rope_qkv needs at least one q and one kv head, got n_head {n_head}, n_kv_head {n_kv_head}"
        )));
    }
    let hs = table.head_dim;
    let want = n_kv_head
        .checked_mul(2)
        .and_then(|k| k.checked_add(n_head))
        .and_then(|n| n.checked_mul(hs));
    if want != Some(w) {
        return Err(Error::InvalidArgument(format!(
            "rope_qkv input's last dimension {w} is not (n_head {n_head} + 2·n_kv_head \
             {n_kv_head})·head_dim {hs}"
        )));
    }
    if past
        .checked_add(t)
        .is_none_or(|end| end > table.max_positions)
    {
        return Err(out_of_range(table, past, t));
    }
    Ok((b, t, hs))
}

/// Rotates every head of `hs` in `x` by the angles whose cos and sin are `cos`, `sin`
/// (`hs/2` each); `sign = -1` rotates back.
#[inline(always)]
fn rotate_heads(x: &mut [f32], hs: usize, cos: &[f32], sin: &[f32], sign: f32) {
    let h = hs / 2;
    for head in x.chunks_exact_mut(hs) {
        let (x1, x2) = head.split_at_mut(h);
        for (((a, b), &c), &s) in x1.iter_mut().zip(x2.iter_mut()).zip(cos).zip(sin) {
            let s = sign * s;
            let (u, v) = (*a, *b);
            *a = u * c - v * s;
            *b = v * c + u * s;
        }
    }
}

/// The fused RoPE over packed qkv rows (B·T rows of `row_len`), the first `rotated` values of
/// each rotated.
struct RopeOp {
    table: RopeTable,
    row_len: usize,
    rotated: usize,
    t: usize,
    past: usize,
    /// Row chunks forced by a test; `None` lets [`plan`] decide.
    chunks: Option<usize>,
}

multiversion! {
    /// Copies rows `r0..` of `src` into `dst` and rotates the first `rotated` values of each,
    /// row `r` to position `past + r % t`; `sign = -1` rotates back.
    fn rope_packed_rows(
        src: &[f32],
        dst: &mut [f32],
        r0: usize,
        row_len: usize,
        rotated: usize,
        t: usize,
        past: usize,
        table: &RopeTable,
        sign: f32,
    ) {
        dst.copy_from_slice(src);
        for (i, row) in dst.chunks_exact_mut(row_len).enumerate() {
            // check_rope bounded past + t by the table, so `at` always finds the row
            if let Some((cos, sin)) = table.at(past + (r0 + i) % t.max(1)) {
                rotate_heads(&mut row[..rotated], table.head_dim, cos, sin, sign);
            }
        }
    }
}

impl RopeOp {
    /// `src` rotated (`sign = 1`) or rotated back (`sign = -1`), rows split by [`plan`].
    fn apply(&self, src: &[f32], ps_per_elem: usize, sign: f32) -> Vec<f32> {
        let n = self.row_len;
        let mut dst = vec![0f32; src.len()];
        let chunks = plan(src.len() / n, src.len(), ps_per_elem, self.chunks);
        for_row_chunks(&mut dst, n, chunks, |r0, ds| {
            let s = &src[r0 * n..r0 * n + ds.len()];
            rope_packed_rows(
                s,
                ds,
                r0,
                n,
                self.rotated,
                self.t,
                self.past,
                &self.table,
                sign,
            )
        });
        dst
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "tinygpt-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s, l, "rope_qkv input")?;
        Ok((
            CpuStorage::F32(self.apply(x, cost::FWD, 1.0)),
            l.shape().clone(),
        ))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = grad.contiguous()?;
        let dx = with_slices(&[&dy], |s| Ok(self.apply(s[0], cost::BWD, -1.0)))?;
        Ok(Some(tensor(dx, x.shape())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::tests::{check, max_diff, randn, var, Diffs, R};
    use candle_core::{DType, Device};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn rope_qkv_matches_reference() -> R<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(31);
        let mut worst = Diffs::default();
        // (B, T, n_head, n_kv_head, hs, past, theta)
        let cases = [
            (2, 5, 4, 2, 6, 0, 10_000.0),
            (2, 5, 3, 1, 10, 7, 10_000.0),
            (1, 3, 2, 2, 8, 0, 1e6),
            (2, 5, 1, 1, 2, 90, 500_000.0),
            (4, 128, 12, 4, 64, 100, 1e6), // big enough to split
        ];
        for (b, t, nh, nkv, hs, past, theta) in cases {
            let table = RopeTable::new(hs, 256, theta)?;
            for chunks in [None, Some(1), Some(3)] {
                let qkv = var(&mut rng, &[b, t, (nh + 2 * nkv) * hs], 1.0)?;
                let f = |x: &[&Tensor], fuse: bool| {
                    if fuse {
                        rope_qkv_with(x[0], &table, nh, nkv, past, chunks)
                    } else {
                        rope_qkv_reference(x[0], &table, nh, nkv, past)
                    }
                };
                let what = format!("rope_qkv B{b} T{t} heads {nh}/{nkv} hs {hs} past {past}");
                worst = worst.max(check(&mut rng, &[&qkv], f, 1e-5, &what)?);
            }
        }
        println!("rope_qkv: {worst:?}");
        Ok(())
    }

    #[test]
    fn rope_hand_values() -> R<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(32);
        // position 0 is the identity
        let table = RopeTable::new(6, 16, 10_000.0)?;
        let qkv = randn(&mut rng, &[1, 1, (3 + 2) * 6], 1.0)?;
        let y = rope_qkv(&qkv, &table, 3, 1, 0)?;
        assert_eq!(max_diff(&y, &qkv)?, 0.0);
        // hs = 2: inv_freq = [1], so position p is a 2-D rotation by p radians; v untouched
        let table = RopeTable::new(2, 16, 10_000.0)?;
        let (x0, x1) = (0.3f32, -1.7f32);
        let qkv = Tensor::new(&[[[x0, x1, x0, x1, 5.0, 6.0]]], &Device::Cpu)?;
        for p in [1usize, 3, 15] {
            let y = rope_qkv(&qkv, &table, 1, 1, p)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let (c, s) = ((p as f64).cos() as f32, (p as f64).sin() as f32);
            let want = [x0 * c - x1 * s, x1 * c + x0 * s];
            for (j, w) in want.iter().enumerate() {
                assert!(
                    (y[j] - w).abs() < 1e-6 && (y[j + 2] - w).abs() < 1e-6,
                    "{y:?}"
                );
            }
            assert_eq!(y[4..], [5.0, 6.0]);
        }
        // the table: exactly the f32 steps transformers takes
        let table = RopeTable::new(8, 4096, 10_000.0)?;
        assert_eq!(table.inv_freq(), [1.0, 0.1, 0.01, 0.001]);
        let (cos, sin) = table.at(4095).ok_or("no row 4095")?;
        for i in 0..4 {
            let angle = 4095f32 * table.inv_freq()[i];
            assert_eq!(cos[i], (angle as f64).cos() as f32);
            assert_eq!(sin[i], (angle as f64).sin() as f32);
            let exact = 4095.0 * 10_000f64.powf(-(i as f64) / 4.0);
            assert!((cos[i] as f64 - exact.cos()).abs() < 1e-4);
        }
        assert!(table.at(4096).is_none());
        Ok(())
    }

    #[test]
    fn rope_rows_matches_rope_qkv() -> R<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(33);
        for (nh, nkv, hs, past) in [(4, 2, 6, 3), (3, 1, 10, 0), (12, 4, 64, 40)] {
            let (b, t) = (2, 5);
            let table = RopeTable::new(hs, 64, 1e6)?;
            let w = (nh + 2 * nkv) * hs;
            let qkv = randn(&mut rng, &[b, t, w], 1.0)?;
            let want = rope_qkv(&qkv, &table, nh, nkv, past)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let mut got = qkv.flatten_all()?.to_vec1::<f32>()?;
            for (r, row) in got.chunks_exact_mut(w).enumerate() {
                rope_rows(
                    &mut row[..(nh + nkv) * hs],
                    nh + nkv,
                    hs,
                    past + r % t,
                    &table,
                )?;
            }
            assert_eq!(got, want, "heads {nh}/{nkv} hs {hs}");
        }
        Ok(())
    }

    #[test]
    fn rope_rejects_bad_arguments() -> R<()> {
        assert!(RopeTable::new(7, 16, 10_000.0).is_err());
        assert!(RopeTable::new(0, 16, 10_000.0).is_err());
        assert!(RopeTable::new(8, 0, 10_000.0).is_err());
        assert!(RopeTable::new(8, 16, 0.0).is_err());
        assert!(RopeTable::new(8, 16, f64::NAN).is_err());
        assert!(RopeTable::new(8, usize::MAX, 10_000.0).is_err());
        let table = RopeTable::new(6, 16, 10_000.0)?;
        let dev = &Device::Cpu;
        let good = Tensor::zeros((2, 5, 8 * 6), DType::F32, dev)?;
        for f in [rope_qkv, rope_qkv_reference] {
            assert!(f(&good, &table, 4, 2, 11).is_ok());
            assert!(
                f(&good, &table, 4, 2, 12).is_err(),
                "past + T > max_positions"
            );
            assert!(f(&good, &table, 4, 2, usize::MAX).is_err());
            assert!(f(&good, &table, 3, 2, 0).is_err(), "width is not (3 + 4)·6");
            assert!(f(&good, &table, 8, 0, 0).is_err());
            let bad = Tensor::zeros((2, 5, 8 * 6 + 1), DType::F32, dev)?;
            assert!(f(&bad, &table, 4, 2, 0).is_err());
            // hs 8 from a width of 6 heads (2 + 2·2): not the table's 6
            let other = Tensor::zeros((2, 5, 6 * 8), DType::F32, dev)?;
            assert!(f(&other, &table, 2, 2, 0).is_err());
            let flat = Tensor::zeros((10, 8 * 6), DType::F32, dev)?;
            assert!(f(&flat, &table, 4, 2, 0).is_err());
        }
        let mut x = vec![1f32; 12];
        assert!(rope_rows(&mut x, 2, 6, 16, &table).is_err());
        assert!(rope_rows(&mut x, 3, 6, 0, &table).is_err());
        assert!(rope_rows(&mut x, 3, 4, 0, &table).is_err());
        assert!(rope_rows(&mut x, 2, 6, 15, &table).is_ok());
        // f64 falls back to the reference
        let mut rng = ChaCha8Rng::seed_from_u64(34);
        let qkv = randn(&mut rng, &[2, 5, 8 * 6], 1.0)?.to_dtype(DType::F64)?;
        let y = rope_qkv(&qkv, &table, 4, 2, 3)?;
        assert_eq!(y.dtype(), DType::F64);
        assert_eq!(
            max_diff(&y, &rope_qkv_reference(&qkv, &table, 4, 2, 3)?)?,
            0.0
        );
        Ok(())
    }
}
