//! SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"), the MLP activation of Llama
//! and Qwen, fused with a hand-written backward pass.
//!
//! Hugging Face's `LlamaMLP` computes `down_proj(silu(gate_proj(x)) * up_proj(x))`. Packing
//! `gate_proj` and `up_proj` into one matmul gives `h = [gate (I) | up (I)]` per row, and
//! [`swiglu`] turns it into `silu(gate) · up` in one pass; its backward writes d_gate and
//! d_up into one packed gradient of `h` in one more, where candle's composition
//! ([`swiglu_reference`]: narrow, silu, mul) would allocate four intermediate tensors and
//! scatter two narrowed gradients back into zeroed copies of `h`.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, D};

use crate::layers::{
    cpu_slice, exp, for_row_chunks, fused, last_dim, multiversion, plan, tensor, with_slices,
};
use crate::{Error, Result};

/// Estimated serial cost of each pass, in picoseconds per output element (see
/// [`crate::layers::PAR_MIN_NS`]).
mod cost {
    pub const FWD: usize = 1_200;
    pub const BWD: usize = 2_000;
}

/// `silu(gate) · up` for `h = [gate | up]` packed in the last dimension, fused.
///
/// `h`: (.., 2I), the output of one matmul with the gate projection's I columns first and
/// the up projection's I after them. Returns (.., I). `silu(g) = g·σ(g)`. Backward, per
/// element: `d_gate = dy · up · σ(g)(1 + g(1 − σ(g)))`, `d_up = dy · silu(g)`, written into
/// one (.., 2I) gradient; `1 − σ(g)` is computed as `e^(−g)·σ(g)`, not by subtraction. f32
/// on the CPU (e^x by the crate's vectorisable polynomial); on any other device or dtype this
/// is [`swiglu_reference`].
///
/// # Errors
/// [`Error::InvalidArgument`] if `h` is a scalar or its last dimension is odd; candle errors
/// from the reference path.
pub fn swiglu(h: &Tensor) -> Result<Tensor> {
    swiglu_with(h, None)
}

pub(crate) fn swiglu_with(h: &Tensor, chunks: Option<usize>) -> Result<Tensor> {
    let i = half_width(h)?;
    if !fused(&[h]) || h.elem_count() == 0 {
        return swiglu_reference(h);
    }
    Ok(h.contiguous()?.apply_op1(SwigluOp { i, chunks })?)
}

/// [`swiglu`] from plain, differentiable candle ops:
/// `h.narrow(-1, 0, I).silu() * h.narrow(-1, I, I)`, its reference and its fallback off the
/// CPU.
///
/// # Errors
/// As [`swiglu`].
pub fn swiglu_reference(h: &Tensor) -> Result<Tensor> {
    let i = half_width(h)?;
    let gate = h.narrow(D::Minus1, 0, i)?;
    let up = h.narrow(D::Minus1, i, i)?;
    Ok((gate.silu()? * up)?)
}

/// I, half of `h`'s last dimension, which must be even.
fn half_width(h: &Tensor) -> Result<usize> {
    let n = last_dim(h, "swiglu input")?;
    if n % 2 != 0 {
        return Err(Error::InvalidArgument(format!(
            "swiglu input must end in a dimension of 2·I (gate | up), got shape {:?}",
            h.dims()
        )));
    }
    Ok(n / 2)
}

/// The fused SwiGLU of h (.., 2I).
struct SwigluOp {
    i: usize,
    /// Row chunks forced by a test; `None` lets [`plan`] decide.
    chunks: Option<usize>,
}

multiversion! {
    /// `ys = silu(gate) · up` over rows of `i` (rows of `2i` in `hs`).
    pub(crate) fn swiglu_rows(hs: &[f32], ys: &mut [f32], i: usize) {
        for (hr, yr) in hs.chunks_exact(2 * i).zip(ys.chunks_exact_mut(i)) {
            let (gate, up) = hr.split_at(i);
            for ((o, &g), &u) in yr.iter_mut().zip(gate).zip(up) {
                *o = g / (1.0 + exp(-g)) * u;
            }
        }
    }
}

multiversion! {
    /// `dh = [dy·up·silu'(gate) | dy·silu(gate)]` over rows of `2i`.
    fn swiglu_grad_rows(hs: &[f32], dys: &[f32], dhs: &mut [f32], i: usize) {
        let rows = hs.chunks_exact(2 * i).zip(dys.chunks_exact(i)).zip(dhs.chunks_exact_mut(2 * i));
        for ((hr, dyr), dhr) in rows {
            let (gate, up) = hr.split_at(i);
            let (dgate, dup) = dhr.split_at_mut(i);
            let cols = dgate.iter_mut().zip(dup.iter_mut()).zip(gate).zip(up).zip(dyr);
            for ((((dg, du), &g), &u), &d) in cols {
                let e = exp(-g);
                let s = 1.0 / (1.0 + e);
                let silu = g * s;
                *du = d * silu;
                *dg = d * u * (s * (1.0 + g * (e * s)));
            }
        }
    }
}

impl CustomOp1 for SwigluOp {
    fn name(&self) -> &'static str {
        "tinygpt-swiglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let h = cpu_slice(s, l, "swiglu input")?;
        let i = self.i;
        let mut dims = l.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = i;
        }
        let mut y = vec![0f32; h.len() / 2];
        let chunks = plan(y.len() / i, y.len(), cost::FWD, self.chunks);
        for_row_chunks(&mut y, i, chunks, |r0, ys| {
            swiglu_rows(&h[2 * r0 * i..2 * r0 * i + 2 * ys.len()], ys, i)
        });
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let i = self.i;
        let dy = grad.contiguous()?;
        let dh = with_slices(&[h, &dy], |s| {
            let (h, dy) = (s[0], s[1]);
            let mut dh = vec![0f32; h.len()];
            let chunks = plan(dy.len() / i, dy.len(), cost::BWD, self.chunks);
            for_row_chunks(&mut dh, 2 * i, chunks, |r0, dhs| {
                let range = 2 * r0 * i..2 * r0 * i + dhs.len();
                let dy = &dy[r0 * i..r0 * i + dhs.len() / 2];
                swiglu_grad_rows(&h[range], dy, dhs, i)
            });
            Ok(dh)
        })?;
        Ok(Some(tensor(dh, h.shape())?))
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
    fn swiglu_matches_reference() -> R<()> {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let mut worst = Diffs::default();
        let shapes: [&[usize]; 5] = [
            &[2, 5, 14],
            &[3, 66],
            &[2, 5, 2],
            &[12, 64, 512],
            &[4, 128, 4096],
        ];
        for dims in shapes {
            for chunks in [None, Some(1), Some(3)] {
                let h = var(&mut rng, dims, 2.0)?;
                let f = |t: &[&Tensor], fuse: bool| {
                    if fuse {
                        swiglu_with(t[0], chunks)
                    } else {
                        swiglu_reference(t[0])
                    }
                };
                let what = format!("swiglu {dims:?} chunks {chunks:?}");
                worst = worst.max(check(&mut rng, &[&h], f, 1e-5, &what)?);
            }
        }
        println!("swiglu: {worst:?}");
        Ok(())
    }

    #[test]
    fn swiglu_hand_values_tails_and_errors() -> R<()> {
        // silu(0) = 0, silu(1) = 1/(1+e^-1); far tails: silu(g) → g, → 0 (not NaN)
        let h = Tensor::new(
            &[[0f32, 1.0, -200.0, 30.0, 200.0, 3.0, 2.0, 5.0, 1.0, 1.0]],
            &Device::Cpu,
        )?;
        let y = swiglu(&h)?.to_vec2::<f32>()?;
        let s1 = 1.0 / (1.0 + (-1f32).exp());
        assert_eq!(y[0][0], 0.0);
        assert!((y[0][1] - 2.0 * s1).abs() < 1e-6, "{y:?}");
        assert!(y[0][2].abs() < 1e-30, "{y:?}");
        assert!((y[0][3] - 30.0).abs() < 1e-5 && (y[0][4] - 200.0).abs() < 1e-4);
        // errors: odd last dimension, a scalar
        let odd = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?;
        assert!(swiglu(&odd).is_err());
        assert!(swiglu_reference(&odd).is_err());
        assert!(swiglu(&Tensor::new(1f32, &Device::Cpu)?).is_err());
        // f64 falls back to the reference
        let mut rng = ChaCha8Rng::seed_from_u64(22);
        let h = randn(&mut rng, &[3, 8], 1.0)?.to_dtype(DType::F64)?;
        let y = swiglu(&h)?;
        assert_eq!(y.dtype(), DType::F64);
        assert_eq!(max_diff(&y, &swiglu_reference(&h)?)?, 0.0);
        Ok(())
    }
}
