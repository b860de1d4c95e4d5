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
//! `m` is the dropout mask of the adapter's input ([`DropoutMask`]: bits, zeros and
//! `1 / (1 − p)`), or none. Several adapters of the same input (Llama's q/k/v, or gate/up) run
//! as one op over their stacked frozen weights: their `A`s stacked `(Σ r, in)`, their `B`s on
//! the block diagonal of `(Σ out, Σ r)`, and each its own mask ([`LoraPart`]), as PEFT's
//! modules each drop their own input elements. CPU and f32 only; elsewhere
//! [`lora_linear_reference`].

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Tensor};

use super::dropout_mask::DropoutMask;
use super::gemm::gemm_into;
use super::layers::{cpu_slice, with_slices};
use crate::{Error, Result};

/// One adapter's share of a [`lora_linear`]: its rank (its rows of `a`, its columns of `b`, in
/// order) and the dropout mask of its input, `(rows, in)`, in training.
#[derive(Debug, Clone)]
pub struct LoraPart {
    /// The adapter's rank `r`.
    pub rank: usize,
    /// Dropout on the adapter's input, or `None`.
    pub dropout: Option<Arc<DropoutMask>>,
}

/// `x (rows, in) @ w (in, out) (+ bias) + scale · [(x ∘ m_i) @ a_iᵀ]_i @ bᵀ` with `a (Σ r, in)`
/// stacking the parts' `A`s, `b (out, Σ r)`, and `parts` the adapters' ranks and masks (empty:
/// one adapter of rank `Σ r`, no dropout). `w` and `bias` are constants (no gradient); `x`, `a`
/// and `b` get gradients. Returns `(rows, out)`.
///
/// # Errors
/// [`Error::InvalidArgument`] if the shapes disagree, the parts' ranks do not sum to `a`'s
/// rows, or a mask is not `(rows, in)`.
pub fn lora_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    parts: &[LoraPart],
) -> Result<Tensor> {
    check(x, w, a, b, parts)?;
    let fused = x.device().is_cpu()
        && [x, w, a, b].iter().all(|t| t.dtype() == DType::F32)
        && bias.is_none_or(|t| t.dtype() == DType::F32);
    if !fused {
        return lora_linear_reference(x, w, bias, a, b, scale, parts);
    }
    let op = LoraLinear {
        w: w.detach(),
        bias: bias.map(Tensor::detach),
        parts: parts.to_vec(),
        scale,
    };
    Ok(x.contiguous()?
        .apply_op3(&a.contiguous()?, &b.contiguous()?, op)?)
}

fn check(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, parts: &[LoraPart]) -> Result<()> {
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
    if !parts.is_empty() && parts.iter().map(|p| p.rank).sum::<usize>() != r {
        return Err(Error::InvalidArgument(format!(
            "lora_linear: the parts' ranks {:?} do not sum to a's {r} rows",
            parts.iter().map(|p| p.rank).collect::<Vec<_>>()
        )));
    }
    for m in parts.iter().filter_map(|p| p.dropout.as_ref()) {
        if m.dims() != (rows, d_in) {
            return Err(Error::InvalidArgument(format!(
                "lora_linear: dropout mask {:?} is not x's shape {:?}",
                m.dims(),
                x.dims()
            )));
        }
    }
    Ok(())
}

/// [`lora_linear`] from plain candle ops (each mask a dense tensor), its reference (and the
/// path off the CPU).
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
    parts: &[LoraPart],
) -> Result<Tensor> {
    let y = x.matmul(&w.detach())?;
    let y = match bias {
        Some(b) => y.broadcast_add(&b.detach())?,
        None => y,
    };
    let u = if parts.is_empty() {
        x.matmul(&a.t()?)?
    } else {
        let mut us = Vec::with_capacity(parts.len());
        let mut at = 0;
        for part in parts {
            let xd = match &part.dropout {
                Some(m) => x.mul(
                    &Tensor::from_vec(m.to_vec(), x.shape(), x.device())?.to_dtype(x.dtype())?,
                )?,
                None => x.clone(),
            };
            us.push(xd.matmul(&a.narrow(0, at, part.rank)?.t()?)?);
            at += part.rank;
        }
        Tensor::cat(&us, 1)?
    }; // (rows, Σ r)
    let d = u.matmul(&b.t()?)?.affine(scale, 0.0)?;
    Ok((y + d)?)
}

struct LoraLinear {
    w: Tensor,
    bias: Option<Tensor>,
    parts: Vec<LoraPart>,
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

/// A 2-D f32 CPU tensor's elements from its first one, with its row and column strides: what
/// [`gemm_into`] reads (a transposed view in place).
fn strided<'a>(
    storage: &'a candle_core::Storage,
    layout: &Layout,
) -> candle_core::Result<(&'a [f32], isize, isize)> {
    let candle_core::Storage::Cpu(cpu) = storage else {
        candle_core::bail!("lora_linear: the weight is not on the CPU");
    };
    let [rs, cs] = layout.stride() else {
        candle_core::bail!("lora_linear: the weight is not a matrix");
    };
    let data = cpu.as_slice::<f32>()?;
    let data = data
        .get(layout.start_offset()..)
        .ok_or_else(|| candle_core::Error::Msg("lora_linear: weight offset out of range".into()))?;
    Ok((data, *rs as isize, *cs as isize))
}

/// Our error as candle's, inside a custom op.
fn msg(e: Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// A part's adapter input: `x ∘ m` written into `buf` with a mask, `x` itself without.
fn part_input<'a>(
    x: &'a [f32],
    part: &LoraPart,
    buf: &'a mut Vec<f32>,
) -> candle_core::Result<&'a [f32]> {
    match &part.dropout {
        Some(m) => {
            buf.resize(x.len(), 0.0);
            m.apply(x, buf).map_err(msg)?;
            Ok(&buf[..])
        }
        None => Ok(x),
    }
}

impl LoraLinear {
    /// The parts, or one part of rank `r` without dropout when none were given.
    fn parts_or_whole(&self, r: usize) -> std::borrow::Cow<'_, [LoraPart]> {
        if self.parts.is_empty() {
            std::borrow::Cow::Owned(vec![LoraPart {
                rank: r,
                dropout: None,
            }])
        } else {
            std::borrow::Cow::Borrowed(&self.parts)
        }
    }

    /// `u = [(x ∘ m_i) A_iᵀ]_i`, (rows, Σ r), from `x` (rows, in) and `a` (Σ r, in).
    fn u_rows(
        &self,
        x: &[f32],
        a: &[f32],
        (rows, d_in, r): (usize, usize, usize),
    ) -> candle_core::Result<Vec<f32>> {
        let mut u = vec![0f32; rows * r];
        let mut xd = Vec::new();
        let mut at = 0;
        for part in self.parts_or_whole(r).iter() {
            let input = part_input(x, part, &mut xd)?;
            gemm_into(
                u.get_mut(at..).unwrap_or(&mut []),
                (rows, part.rank, d_in),
                (input, d_in as isize, 1),
                (a.get(at * d_in..).unwrap_or(&[]), 1, d_in as isize), // A_iᵀ
                false,
                r,
            )?;
            at += part.rank;
        }
        Ok(u)
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
        // y = x W (+ bias) straight into the output, then y += (s · u) Bᵀ: no copy of x or y.
        let x = cpu_slice(s1, l1, "lora_linear x")?;
        let (a, b) = (constant(s2, l2)?, constant(s3, l3)?);
        let (rows, d_in) = l1.shape().dims2()?;
        let (d_out, r) = b.dims2()?;
        let mut y = vec![0f32; rows * d_out];
        let bias = match &self.bias {
            Some(bias) => Some(bias.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        if let Some(bias) = &bias {
            if bias.len() != d_out {
                candle_core::bail!("lora_linear: bias of {} for {d_out} outputs", bias.len());
            }
            for row in y.chunks_exact_mut(d_out.max(1)) {
                row.copy_from_slice(bias);
            }
        }
        {
            let (w_storage, w_layout) = self.w.storage_and_layout();
            let w = strided(&w_storage, w_layout)?;
            gemm_into(
                &mut y,
                (rows, d_out, d_in),
                (x, d_in as isize, 1),
                w,
                bias.is_some(),
                d_out,
            )?;
        }
        // u = s · [(x ∘ m_i) A_iᵀ]_i, (rows, Σ r), then y += u Bᵀ.
        with_slices(&[&a, &b], |ab| {
            let mut u = self.u_rows(x, ab[0], (rows, d_in, r))?;
            let scale = self.scale as f32;
            u.iter_mut().for_each(|v| *v *= scale);
            gemm_into(
                &mut y,
                (rows, d_out, r),
                (&u, r as isize, 1),
                (ab[1], 1, r as isize), // Bᵀ
                true,
                d_out,
            )
        })?;
        Ok((CpuStorage::F32(y), Shape::from((rows, d_out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x, a, b, dy) = (
            x.detach().contiguous()?,
            a.detach().contiguous()?,
            b.detach().contiguous()?,
            dy.detach().contiguous()?,
        );
        let (rows, d_in) = x.dims2()?;
        let (d_out, r) = b.dims2()?;
        let (dx, da, db) = with_slices(&[&x, &a, &b, &dy], |s| {
            let (x, a, b, dy) = (s[0], s[1], s[2], s[3]);
            let scale = self.scale as f32;
            let u = self.u_rows(x, a, (rows, d_in, r))?; // (rows, Σ r)
                                                         // dB = s · dyᵀ u, (out, Σ r)
            let mut db = vec![0f32; d_out * r];
            gemm_into(
                &mut db,
                (d_out, r, rows),
                (dy, 1, d_out as isize),
                (&u, r as isize, 1),
                false,
                r,
            )?;
            db.iter_mut().for_each(|v| *v *= scale);
            // du = s · dy B, (rows, Σ r)
            let mut du = vec![0f32; rows * r];
            gemm_into(
                &mut du,
                (rows, r, d_out),
                (dy, d_out as isize, 1),
                (b, r as isize, 1),
                false,
                r,
            )?;
            du.iter_mut().for_each(|v| *v *= scale);
            // dx = dy Wᵀ, then + (du_i A_i) ∘ m_i for each part.
            let mut dx = vec![0f32; rows * d_in];
            {
                let (w_storage, w_layout) = self.w.storage_and_layout();
                let (w, w_rs, w_cs) = strided(&w_storage, w_layout)?;
                gemm_into(
                    &mut dx,
                    (rows, d_in, d_out),
                    (dy, d_out as isize, 1),
                    (w, w_cs, w_rs),
                    false,
                    d_in,
                )?;
            }
            let mut da = vec![0f32; r * d_in];
            let (mut xd, mut g) = (Vec::new(), Vec::new());
            let mut at = 0;
            for part in self.parts_or_whole(r).iter() {
                let input = part_input(x, part, &mut xd)?;
                // du_i (rows, r_i) of (rows, Σ r), A_i (r_i, in); dA_i = du_iᵀ (x ∘ m_i).
                let du_i = du.get(at..).unwrap_or(&[]);
                let a_i = a.get(at * d_in..).unwrap_or(&[]);
                let da_i = da.get_mut(at * d_in..).unwrap_or(&mut []);
                gemm_into(
                    da_i,
                    (part.rank, d_in, rows),
                    (du_i, 1, r as isize),
                    (input, d_in as isize, 1),
                    false,
                    d_in,
                )?;
                match &part.dropout {
                    None => gemm_into(
                        &mut dx,
                        (rows, d_in, part.rank),
                        (du_i, r as isize, 1),
                        (a_i, d_in as isize, 1),
                        true,
                        d_in,
                    )?,
                    Some(m) => {
                        g.resize(x.len(), 0.0);
                        gemm_into(
                            &mut g,
                            (rows, d_in, part.rank),
                            (du_i, r as isize, 1),
                            (a_i, d_in as isize, 1),
                            false,
                            d_in,
                        )?;
                        m.apply(&g, &mut xd).map_err(msg)?; // xd is free again
                        dx.iter_mut().zip(&xd).for_each(|(d, v)| *d += v);
                    }
                }
                at += part.rank;
            }
            Ok((dx, da, db))
        })?;
        Ok((
            Some(Tensor::from_vec(dx, (rows, d_in), &Device::Cpu)?),
            Some(Tensor::from_vec(da, (r, d_in), &Device::Cpu)?),
            Some(Tensor::from_vec(db, (d_out, r), &Device::Cpu)?),
        ))
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
        let part = |rank: usize, mask: Option<(usize, usize, u64)>| LoraPart {
            rank,
            dropout: mask.map(|(rows, d_in, seed)| {
                Arc::new(DropoutMask::sample(rows, d_in, 0.2, seed).unwrap())
            }),
        };
        // (rows, in, out, bias, parts): one adapter, or stacked ones each with its own mask.
        let cases: Vec<(usize, usize, usize, bool, Vec<LoraPart>)> = vec![
            (5, 7, 9, false, vec![part(2, None)]),
            (70, 33, 20, true, vec![]),
            (64, 16, 48, true, vec![part(8, Some((64, 16, 1)))]),
            (
                40,
                24,
                30,
                false,
                vec![
                    part(3, Some((40, 24, 2))),
                    part(2, None),
                    part(4, Some((40, 24, 3))),
                ],
            ),
        ];
        for (rows, d_in, d_out, bias, parts) in cases {
            let r = if parts.is_empty() {
                4
            } else {
                parts.iter().map(|p| p.rank).sum()
            };
            let x = Var::from_tensor(&randn(&[rows, d_in], &mut rng)).unwrap();
            let a = Var::from_tensor(&randn(&[r, d_in], &mut rng)).unwrap();
            let b = Var::from_tensor(&randn(&[d_out, r], &mut rng)).unwrap();
            let w = randn(&[d_in, d_out], &mut rng);
            let bias = bias.then(|| randn(&[d_out], &mut rng));
            let up = randn(&[rows, d_out], &mut rng);
            let run = |f: fn(
                &Tensor,
                &Tensor,
                Option<&Tensor>,
                &Tensor,
                &Tensor,
                f64,
                &[LoraPart],
            ) -> Result<Tensor>| {
                let y = f(
                    x.as_tensor(),
                    &w,
                    bias.as_ref(),
                    a.as_tensor(),
                    b.as_tensor(),
                    2.0,
                    &parts,
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
        let call = |b: &[usize], parts: &[LoraPart]| {
            lora_linear(
                &t(&[2, 3]),
                &t(&[3, 4]),
                None,
                &t(&[2, 3]),
                &t(b),
                1.0,
                parts,
            )
        };
        assert!(call(&[4, 3], &[]).is_err());
        assert!(call(&[4, 2], &[]).is_ok());
        let mask = |rows, cols| Some(Arc::new(DropoutMask::sample(rows, cols, 0.1, 0).unwrap()));
        let part = |rank, dropout| LoraPart { rank, dropout };
        assert!(call(&[4, 2], &[part(1, None)]).is_err()); // ranks sum to 1, a has 2 rows
        assert!(call(&[4, 2], &[part(2, mask(2, 2))]).is_err()); // mask not x's shape
        assert!(call(&[4, 2], &[part(1, mask(2, 3)), part(1, None)]).is_ok());
    }
}
