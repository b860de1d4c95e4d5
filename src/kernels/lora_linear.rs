//! A LoRA-adapted projection as one op: `y = x W (+ b) + s · ((x ∘ m) Aᵀ) Bᵀ` (Hu et al. 2021,
//! "LoRA: Low-Rank Adaptation of Large Language Models"), `W` frozen.
//!
//! Written with plain candle ops the adapter keeps, per layer and step, three activations the
//! size of the output alive until the backward pass (the delta `(x Aᵀ) Bᵀ`, its scaled copy and
//! the sum), and candle's matmul backward also computes a gradient for the frozen `W`. The
//! fused op keeps only its inputs and output, and its backward computes what training needs:
//!
//! ```text
//! xd = x ∘ m,   u = xd Aᵀ                       (rows, r), recomputed
//! dB = s · dyᵀ u                                (out, r)
//! du = s · dy B                                 (rows, r)
//! dA = duᵀ xd                                   (r, in)
//! dx = dy Wᵀ + (du A) ∘ m                       (rows, in)
//! ```
//!
//! `m` is the dropout mask of the adapter's input (zeros and `1 / (1 − p)`), or none. CPU and
//! f32 only; elsewhere [`lora_linear_reference`].

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};

use crate::{Error, Result};

/// `x (rows, in) @ w (in, out) (+ bias) + scale · ((x ∘ mask) @ aᵀ) @ bᵀ` with `a (r, in)`,
/// `b (out, r)`, `mask` `(rows, in)` or `None`. `w` and `bias` are constants (no gradient);
/// `x`, `a` and `b` get gradients. Returns `(rows, out)`.
///
/// # Errors
/// [`Error::InvalidArgument`] if the shapes disagree.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (rows, d_in) = x.dims2()?;
    let (w_in, d_out) = w.dims2()?;
    let (r, a_in) = a.dims2()?;
    let (b_out, b_r) = b.dims2()?;
    if w_in != d_in || a_in != d_in || b_out != d_out || b_r != r {
        return Err(Error::InvalidArgument(format!(
            "lora_linear: x {:?}, w {:?}, a {:?}, b {:?} do not fit (rows, in) (in, out) (r, in) (out, r)",
            x.dims(),
            w.dims(),
            a.dims(),
            b.dims()
        )));
    }
    if let Some(m) = mask {
        if m.dims() != [rows, d_in] {
            return Err(Error::InvalidArgument(format!(
                "lora_linear: mask {:?} is not x's shape {:?}",
                m.dims(),
                x.dims()
            )));
        }
    }
    let fused = x.device().is_cpu()
        && [x, w, a, b].iter().all(|t| t.dtype() == DType::F32)
        && bias.is_none_or(|t| t.dtype() == DType::F32)
        && mask.is_none_or(|t| t.dtype() == DType::F32);
    if !fused {
        return lora_linear_reference(x, w, bias, a, b, scale, mask);
    }
    let op = LoraLinear {
        w: w.detach(),
        bias: bias.map(Tensor::detach),
        mask: mask.map(Tensor::detach),
        scale,
    };
    Ok(x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?)
}

/// [`lora_linear`] from plain candle ops, its reference (and the path off the CPU).
///
/// # Errors
/// Candle errors on mismatched shapes.
pub fn lora_linear_reference(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let y = x.matmul(&w.detach())?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.detach())?,
        None => y,
    };
    let xd = match mask {
        Some(m) => x.mul(m)?,
        None => x.clone(),
    };
    let d = xd.matmul(&a.t()?)?.matmul(&b.t()?)?.affine(scale, 0.0)?;
    Ok((y + d)?)
}

struct LoraLinear {
    w: Tensor,
    bias: Option<Tensor>,
    mask: Option<Tensor>,
    scale: f64,
}

/// A contiguous f32 CPU storage as a constant tensor (a copy).
fn constant(s: &CpuStorage, l: &Layout) -> candle_core::Result<Tensor> {
    let data = s.as_slice::<f32>()?;
    let (start, end) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("lora_linear: input not contiguous".into()))?;
    Tensor::from_slice(&data[start..end], l.shape(), &Device::Cpu)
}

impl LoraLinear {
    fn masked(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.mask {
            Some(m) => x.mul(m),
            None => Ok(x.clone()),
        }
    }
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "tinygpt-lora-linear"
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
        let (x, a, b) = (constant(s1, l1)?, constant(s2, l2)?, constant(s3, l3)?);
        let mut y = x.matmul(&self.w)?; // (rows, out)
        if let Some(bias) = &self.bias {
            y = y.broadcast_add(bias)?;
        }
        let u = self.masked(&x)?.matmul(&a.t()?)?.affine(self.scale, 0.0)?; // (rows, r)
        let y = (y + u.matmul(&b.t()?)?)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b, dy) = (x.detach(), a.detach(), b.detach(), dy.detach());
        let xd = self.masked(&x)?; // (rows, in)
        let u = xd.matmul(&a.t()?)?; // (rows, r)
        let db = dy.t()?.matmul(&u)?.affine(self.scale, 0.0)?; // (out, r)
        let du = dy.matmul(&b)?.affine(self.scale, 0.0)?; // (rows, r)
        let da = du.t()?.matmul(&xd)?; // (r, in)
        let dx_lora = self.masked(&du.matmul(&a)?)?; // (rows, in)
        let dx = (dy.matmul(&self.w.t()?)? + dx_lora)?;
        Ok((Some(dx), Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use rand::{Rng, SeedableRng};

    fn randn(shape: &[usize], rng: &mut rand_chacha::ChaCha8Rng) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn lora_linear_matches_reference_in_values_and_gradients() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        for (rows, d_in, d_out, r, bias, dropout) in [
            (5, 7, 9, 2, false, false),
            (70, 33, 20, 4, true, false),
            (64, 16, 48, 8, true, true),
        ] {
            let x = Var::from_tensor(&randn(&[rows, d_in], &mut rng)).unwrap();
            let a = Var::from_tensor(&randn(&[r, d_in], &mut rng)).unwrap();
            let b = Var::from_tensor(&randn(&[d_out, r], &mut rng)).unwrap();
            let w = randn(&[d_in, d_out], &mut rng);
            let bias = bias.then(|| randn(&[d_out], &mut rng));
            let mask = dropout.then(|| {
                let m: Vec<f32> = (0..rows * d_in)
                    .map(|_| if rng.random::<f32>() < 0.2 { 0.0 } else { 1.25 })
                    .collect();
                Tensor::from_vec(m, (rows, d_in), &Device::Cpu).unwrap()
            });
            let up = randn(&[rows, d_out], &mut rng);
            let run = |f: fn(
                &Tensor,
                &Tensor,
                Option<&Tensor>,
                &Tensor,
                &Tensor,
                f64,
                Option<&Tensor>,
            ) -> Result<Tensor>| {
                let y = f(
                    x.as_tensor(),
                    &w,
                    bias.as_ref(),
                    a.as_tensor(),
                    b.as_tensor(),
                    2.0,
                    mask.as_ref(),
                )
                .unwrap();
                let g = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                let grads: Vec<Tensor> = [&x, &a, &b]
                    .iter()
                    .map(|v| g.get(v.as_tensor()).unwrap().clone())
                    .collect();
                (y, grads)
            };
            let (y1, g1) = run(lora_linear);
            let (y2, g2) = run(lora_linear_reference);
            assert!(max_diff(&y1, &y2) < 1e-4, "values {}", max_diff(&y1, &y2));
            for (n, (p, q)) in ["dx", "dA", "dB"].iter().zip(g1.iter().zip(&g2)) {
                assert!(max_diff(p, q) < 1e-4, "{n} {}", max_diff(p, q));
            }
        }
    }

    #[test]
    fn lora_linear_refuses_bad_shapes() {
        let t = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
        assert!(lora_linear(
            &t(&[2, 3]),
            &t(&[3, 4]),
            None,
            &t(&[2, 3]),
            &t(&[4, 3]),
            1.0,
            None
        )
        .is_err());
        assert!(lora_linear(
            &t(&[2, 3]),
            &t(&[3, 4]),
            None,
            &t(&[2, 3]),
            &t(&[4, 2]),
            1.0,
            Some(&t(&[2, 2]))
        )
        .is_err());
    }
}
