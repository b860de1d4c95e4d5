//! RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization"), the norm of
//! Llama, Qwen and most models after them, fused with a hand-written backward pass.
//!
//! candle's own `candle_nn::ops::rms_norm` has no backward pass, and the composition of plain
//! ops ([`rms_norm_reference`]) allocates five intermediate tensors and reduces dweight one
//! element at a time. Here the forward is one pass per row and the backward one more, with
//! dweight reduced over all rows in the same pass (per-thread partial sums added in order,
//! as [`crate::layers::layer_norm`] does).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, D};

use crate::layers::{
    check_vector, cpu_slice, for_row_chunks, for_row_chunks_sum, fused, last_dim, multiversion,
    plan, stats_dtype, tensor, with_slices,
};
use crate::Result;

/// Estimated serial cost of each pass, in picoseconds per element (see
/// [`crate::layers::PAR_MIN_NS`]).
mod cost {
    pub const FWD: usize = 400;
    pub const BWD: usize = 800;
}

/// RMSNorm over the last dimension, fused: `y = x · rsqrt(mean(x²) + eps) · weight`, as
/// Hugging Face's `LlamaRMSNorm` computes it (statistics in f32, `weight * (x * rstd)`).
///
/// `x`: (.., C), any number of leading dimensions (Qwen3 normalises q and k per head with
/// `x` (B, T, n_heads, head_dim) and `weight` (head_dim,)); `weight`: (C,). Returns (.., C).
/// A non-contiguous `x` is copied to a contiguous one first. The backward pass gives, per row
/// with `x̂ = x·rstd` and `g = dy·w`, `dx = rstd · (g − x̂ · mean(g·x̂))`, and
/// `dweight = Σ dy·x̂` over all rows in the same pass; rstd is recomputed, not stored. f32 on
/// the CPU; on any other device or dtype this is [`rms_norm_reference`].
///
/// # Errors
/// [`crate::Error::InvalidArgument`] if `x` is a scalar or `weight` is not (C,); candle
/// errors from the reference path.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    rms_norm_with(x, weight, eps, None)
}

pub(crate) fn rms_norm_with(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    chunks: Option<usize>,
) -> Result<Tensor> {
    let c = last_dim(x, "rms_norm input")?;
    check_vector(weight, c, "rms_norm weight")?;
    if !fused(&[x, weight]) || x.elem_count() == 0 {
        return rms_norm_reference(x, weight, eps);
    }
    let op = RmsNormOp {
        eps: eps as f32,
        c,
        chunks,
    };
    Ok(x.contiguous()?.apply_op2(&weight.contiguous()?, op)?)
}

/// RMSNorm from plain, differentiable candle ops (statistics in f32, or f64 for f64 input;
/// the normalised `x` is cast back to `x`'s dtype before the weight multiplies it, as in
/// `LlamaRMSNorm`), the reference [`rms_norm`] is tested against and its fallback off the CPU.
///
/// # Errors
/// [`crate::Error::InvalidArgument`] if `x` is a scalar or `weight` is not (C,); candle
/// errors otherwise.
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let c = last_dim(x, "rms_norm input")?;
    check_vector(weight, c, "rms_norm weight")?;
    let dtype = x.dtype();
    let x = x.to_dtype(stats_dtype(dtype))?;
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?; // (.., 1)
    let rstd = (ms + eps)?.sqrt()?.recip()?; // (.., 1)
    let xhat = x.broadcast_mul(&rstd)?; // (.., C)
    Ok(xhat.to_dtype(dtype)?.broadcast_mul(weight)?)
}

/// The fused RMSNorm: arguments (x, weight), rows of `c`.
struct RmsNormOp {
    eps: f32,
    c: usize,
    /// Row chunks forced by a test; `None` lets [`plan`] decide.
    chunks: Option<usize>,
}

/// Σ x², with eight running sums so the loop vectorises.
#[inline(always)]
fn sum_sq(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    acc.iter().sum::<f32>() + rest.iter().map(|&v| v * v).sum::<f32>()
}

/// Σ dy·w·x, with eight running sums.
#[inline(always)]
fn sum_dy_w_x(dy: &[f32], w: &[f32], x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let lanes = dy
        .chunks_exact(8)
        .zip(w.chunks_exact(8))
        .zip(x.chunks_exact(8));
    for ((ds, ws), xs) in lanes {
        for (((a, &d), &w), &v) in acc.iter_mut().zip(ds).zip(ws).zip(xs) {
            *a += d * w * v;
        }
    }
    let tail = x.len() / 8 * 8;
    let rest: f32 = dy[tail..]
        .iter()
        .zip(&w[tail..])
        .zip(&x[tail..])
        .map(|((&d, &w), &v)| d * w * v)
        .sum();
    acc.iter().sum::<f32>() + rest
}

/// 1 / √(mean(x²) + eps) of one row.
#[inline(always)]
fn rstd(x: &[f32], eps: f32) -> f32 {
    1.0 / (sum_sq(x) / x.len() as f32 + eps).sqrt()
}

multiversion! {
    /// `ys = x · rstd(x) · w` over rows of `w.len()`.
    pub(crate) fn rms_norm_rows(xs: &[f32], w: &[f32], ys: &mut [f32], eps: f32) {
        let c = w.len();
        for (xr, yr) in xs.chunks_exact(c).zip(ys.chunks_exact_mut(c)) {
            let r = rstd(xr, eps);
            for ((o, &v), &w) in yr.iter_mut().zip(xr).zip(w) {
                *o = (v * r) * w;
            }
        }
    }
}

multiversion! {
    /// dx over rows of `w.len()`, and `dw += Σ_rows dy·x̂`.
    fn rms_norm_grad_rows(
        xs: &[f32],
        dys: &[f32],
        w: &[f32],
        dxs: &mut [f32],
        dw: &mut [f32],
        eps: f32,
    ) {
        let c = w.len();
        let inv_c = 1.0 / c as f32;
        let rows = xs.chunks_exact(c).zip(dys.chunks_exact(c)).zip(dxs.chunks_exact_mut(c));
        for ((xr, dyr), dxr) in rows {
            let r = rstd(xr, eps);
            // mean(g·x̂) with g = dy·w, x̂ = x·r
            let m = sum_dy_w_x(dyr, w, xr) * r * inv_c;
            let cols = dxr.iter_mut().zip(xr).zip(dyr).zip(w).zip(dw.iter_mut());
            for ((((o, &v), &d), &w), acc) in cols {
                let xhat = v * r;
                *acc += d * xhat;
                *o = (d * w - xhat * m) * r;
            }
        }
    }
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "tinygpt-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = cpu_slice(s1, l1, "rms_norm input")?;
        let w = cpu_slice(s2, l2, "rms_norm weight")?;
        let c = self.c;
        let mut y = vec![0f32; x.len()];
        let chunks = plan(x.len() / c, x.len(), cost::FWD, self.chunks);
        for_row_chunks(&mut y, c, chunks, |r0, ys| {
            rms_norm_rows(&x[r0 * c..r0 * c + ys.len()], w, ys, self.eps)
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let c = self.c;
        let dy = grad.contiguous()?;
        let (dx, dw) = with_slices(&[x, w, &dy], |s| {
            let (x, w, dy) = (s[0], s[1], s[2]);
            let mut dx = vec![0f32; x.len()];
            let chunks = plan(x.len() / c, x.len(), cost::BWD, self.chunks);
            let dw = for_row_chunks_sum(&mut dx, c, chunks, c, |r0, dxs, dw| {
                let range = r0 * c..r0 * c + dxs.len();
                rms_norm_grad_rows(&x[range.clone()], &dy[range], w, dxs, dw, self.eps)
            });
            Ok((dx, dw))
        })?;
        Ok((Some(tensor(dx, x.shape())?), Some(tensor(dw, w.shape())?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::tests::{check, max_diff, randn, var, Diffs, R};
    use candle_core::{DType, Device, Var};
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn rms_norm_matches_reference() -> R<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut worst = Diffs::default();
        // odd widths, Qwen3's per-head (B, T, heads, head_dim), and rows enough to split
        let shapes: [&[usize]; 6] = [
            &[2, 5, 7],
            &[3, 33],
            &[2, 5, 4, 6],
            &[2, 5, 3, 10],
            &[4, 64, 128],
            &[8, 128, 768],
        ];
        for dims in shapes {
            let c = dims[dims.len() - 1];
            for chunks in [None, Some(1), Some(3)] {
                let x = var(&mut rng, dims, 1.0)?;
                // offset and scale so the statistics matter
                let x = Var::from_tensor(&((x.as_tensor() * 3.0)? + 0.5)?)?;
                let w = Var::from_tensor(&(randn(&mut rng, &[c], 0.5)? + 1.0)?)?;
                let f = |t: &[&Tensor], fuse: bool| {
                    if fuse {
                        rms_norm_with(t[0], t[1], 1e-6, chunks)
                    } else {
                        rms_norm_reference(t[0], t[1], 1e-6)
                    }
                };
                let what = format!("rms_norm {dims:?} chunks {chunks:?}");
                worst = worst.max(check(&mut rng, &[&x, &w], f, 1e-5, &what)?);
            }
        }
        println!("rms_norm: {worst:?}");
        Ok(())
    }

    #[test]
    fn rms_norm_of_a_view_matches_reference() -> R<()> {
        // a non-contiguous x: the q part of a packed (B, T, 3C) row, split into heads
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let (b, t, heads, hs) = (2, 5, 3, 10);
        let qkv = var(&mut rng, &[b, t, 3 * heads * hs], 1.0)?;
        let w = Var::from_tensor(&(randn(&mut rng, &[hs], 0.5)? + 1.0)?)?;
        let f = |ts: &[&Tensor], fuse: bool| {
            let q = ts[0]
                .narrow(2, heads * hs, heads * hs)?
                .reshape((b, t, heads, hs))?;
            let q = q.transpose(1, 2)?; // (B, heads, T, hs), strided
            if fuse {
                rms_norm(&q, ts[1], 1e-6)
            } else {
                rms_norm_reference(&q, ts[1], 1e-6)
            }
        };
        check(&mut rng, &[&qkv, &w], f, 1e-5, "rms_norm of a view")?;
        Ok(())
    }

    #[test]
    fn rms_norm_matches_hand_computation() -> R<()> {
        let x = Tensor::new(&[[3f32, 4.0]], &Device::Cpu)?;
        let w = Tensor::ones(2, DType::F32, &Device::Cpu)?;
        let y = rms_norm(&x, &w, 0.0)?.to_vec2::<f32>()?;
        let s = 12.5f32.sqrt();
        for (a, b) in y[0].iter().zip([3.0 / s, 4.0 / s]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        // the weight scales each column; eps enters under the root
        let w = Tensor::new(&[2f32, -1.0], &Device::Cpu)?;
        let y = rms_norm(&x, &w, 0.5)?.to_vec2::<f32>()?;
        let s = 13f32.sqrt();
        for (a, b) in y[0].iter().zip([6.0 / s, -4.0 / s]) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn rms_norm_rejects_bad_shapes_and_falls_back_off_f32() -> R<()> {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        let w = Tensor::ones(4, DType::F32, &Device::Cpu)?;
        assert!(rms_norm(&x, &w, 1e-6).is_err());
        assert!(rms_norm_reference(&x, &w, 1e-6).is_err());
        let w2 = Tensor::ones((1, 3), DType::F32, &Device::Cpu)?;
        assert!(rms_norm(&x, &w2, 1e-6).is_err());
        let scalar = Tensor::new(1f32, &Device::Cpu)?;
        assert!(rms_norm(&scalar, &w, 1e-6).is_err());
        // f64 is the reference, exactly
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let x = randn(&mut rng, &[2, 3, 8], 1.0)?.to_dtype(DType::F64)?;
        let w = Tensor::ones(8, DType::F64, &Device::Cpu)?;
        let y = rms_norm(&x, &w, 1e-6)?;
        assert_eq!(y.dtype(), DType::F64);
        assert_eq!(max_diff(&y, &rms_norm_reference(&x, &w, 1e-6)?)?, 0.0);
        Ok(())
    }
}
