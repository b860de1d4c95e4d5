//! The optimiser and its helpers: AdamW, the learning-rate schedule, gradient clipping.
//!
//! candle ships an AdamW, but it decays every tensor and hides its state; ours follows
//! PyTorch's `torch.optim.AdamW` (Loshchilov & Hutter 2019, "Decoupled Weight Decay
//! Regularization") as nanoGPT configures it: weight decay only on tensors of rank ≥ 2
//! (matmul weights and embeddings, not biases or LayerNorm gains), and the moments keyed by
//! parameter name so they can be saved and resumed.

use std::collections::HashMap;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// AdamW hyper-parameters, with PyTorch's names and nanoGPT's defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// Learning rate; the schedule overwrites it every step.
    pub lr: f64,
    /// Decay of the first moment (nanoGPT: 0.9).
    pub beta1: f64,
    /// Decay of the second moment (nanoGPT: 0.95; its shakespeare_char recipe: 0.99).
    pub beta2: f64,
    /// Added to the denominator for stability (PyTorch: 1e-8).
    pub eps: f64,
    /// Decoupled weight decay, applied to rank ≥ 2 tensors only (nanoGPT: 0.1).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW over named parameters.
///
/// Update for a parameter `p` with gradient `g` at step `t` (1-based), as PyTorch computes it:
/// ```text
/// p ← p · (1 − lr · wd)                      (only if rank(p) ≥ 2)
/// m ← β1 m + (1 − β1) g
/// v ← β2 v + (1 − β2) g²
/// p ← p − lr / (1 − β1ᵗ) · m / (sqrt(v) / sqrt(1 − β2ᵗ) + eps)
/// ```
/// On the CPU with f32 parameters each tensor is updated in place in one pass (the moments are
/// plain vectors); elsewhere the same arithmetic runs as candle tensor ops.
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    moments: Vec<Moments>, // one per parameter
    step: usize,
}

/// The first and second moments of one parameter.
#[derive(Debug)]
enum Moments {
    /// CPU, f32: updated in place by [`AdamWKernel`].
    Host { m: Vec<f32>, v: Vec<f32> },
    /// Any other device or dtype: f32 tensors, updated with tensor ops.
    Device { m: Tensor, v: Tensor },
}

impl Moments {
    fn zeros(p: &Var) -> Result<Self> {
        Ok(if fast_path(p.as_tensor()) {
            let n = p.elem_count();
            Moments::Host {
                m: vec![0.0; n],
                v: vec![0.0; n],
            }
        } else {
            let z = p.zeros_like()?.to_dtype(DType::F32)?.detach();
            Moments::Device { m: z.clone(), v: z }
        })
    }

    fn tensors(&self, p: &Var) -> Result<(Tensor, Tensor)> {
        Ok(match self {
            Moments::Host { m, v } => (
                Tensor::from_slice(m, p.shape(), p.device())?,
                Tensor::from_slice(v, p.shape(), p.device())?,
            ),
            Moments::Device { m, v } => (m.clone(), v.clone()),
        })
    }
}

/// Whether `t` can take the in-place CPU update.
fn fast_path(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous()
}

impl AdamW {
    /// An optimiser over `params` with zeroed moments.
    ///
    /// # Errors
    /// [`Error::Config`] for a negative learning rate or betas outside `[0, 1)`.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        check_config(&cfg)?;
        let moments = params
            .iter()
            .map(|(_, p)| Moments::zeros(p))
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            params,
            moments,
            step: 0,
        })
    }

    /// The parameters, in the order [`AdamW::step`] expects gradients.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Number of updates taken so far.
    pub fn step_count(&self) -> usize {
        self.step
    }

    /// The current learning rate.
    pub fn lr(&self) -> f64 {
        self.cfg.lr
    }

    /// Sets the learning rate (the schedule calls this before every step).
    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// The hyper-parameters in use.
    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    /// Replaces the hyper-parameters (betas, eps, weight decay, lr), keeping the moments and
    /// the step count: how a resumed run takes the settings saved with it.
    ///
    /// # Errors
    /// [`Error::Config`] as [`AdamW::new`].
    pub fn set_config(&mut self, cfg: AdamWConfig) -> Result<()> {
        check_config(&cfg)?;
        self.cfg = cfg;
        Ok(())
    }

    /// One update. `grads[i]` is the gradient of `params()[i]`, same shape; every gradient is
    /// multiplied by `grad_scale` first (how gradient clipping is applied without another pass).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the number or shapes of gradients do not match.
    pub fn step(&mut self, grads: &[Tensor], grad_scale: f64) -> Result<()> {
        let hyper = self.next_step(grads.len(), grad_scale)?;
        for (((name, p), g), moments) in self.params.iter().zip(grads).zip(self.moments.iter_mut())
        {
            if g.dims() != p.dims() {
                return Err(Error::InvalidArgument(format!(
                    "gradient of `{name}` has shape {:?}, parameter has {:?}",
                    g.dims(),
                    p.dims()
                )));
            }
            let decay = hyper.weight_decay != 0.0 && p.rank() >= 2;
            match moments {
                Moments::Host { m, v } if fast_path(g) => {
                    let kernel = AdamWKernel {
                        hyper,
                        decay,
                        state: std::sync::Mutex::new((m, v)),
                    };
                    p.as_tensor().inplace_op2(&g.detach(), &kernel)?;
                }
                Moments::Host { m, v } => {
                    // A gradient in another layout: go through tensors once.
                    let g = g.detach().to_dtype(DType::F32)?.contiguous()?;
                    let kernel = AdamWKernel {
                        hyper,
                        decay,
                        state: std::sync::Mutex::new((m, v)),
                    };
                    p.as_tensor().inplace_op2(&g, &kernel)?;
                }
                Moments::Device { m, v } => {
                    let (new_m, new_v, new_p) = hyper.tensor_update(p, &g.detach(), m, v, decay)?;
                    p.set(&new_p)?;
                    *m = new_m;
                    *v = new_v;
                }
            }
        }
        Ok(())
    }

    /// [`AdamW::step`] with the gradients as plain f32 slices (a hand-written training step's
    /// buffers, `src/kernels/train_step.rs`): the same update, no tensors made.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the number or lengths of gradients do not match, or a
    /// parameter is not f32 on the CPU.
    pub fn step_slices(&mut self, grads: &[Vec<f32>], grad_scale: f64) -> Result<()> {
        let hyper = self.next_step(grads.len(), grad_scale)?;
        for (((name, p), g), moments) in self.params.iter().zip(grads).zip(self.moments.iter_mut())
        {
            let Moments::Host { m, v } = moments else {
                return Err(Error::InvalidArgument(format!(
                    "AdamW on gradient slices: `{name}` is not an f32 parameter on the CPU"
                )));
            };
            if g.len() != p.elem_count() {
                return Err(Error::InvalidArgument(format!(
                    "gradient of `{name}` has {} elements, parameter has {}",
                    g.len(),
                    p.elem_count()
                )));
            }
            let kernel = AdamWKernel {
                hyper,
                decay: hyper.weight_decay != 0.0 && p.rank() >= 2,
                state: std::sync::Mutex::new((m, v)),
            };
            p.as_tensor().inplace_op1(&SliceGrad(&kernel, g))?;
        }
        Ok(())
    }

    /// Checks there is a gradient per parameter, counts the step and returns its update's
    /// coefficients.
    fn next_step(&mut self, n_grads: usize, grad_scale: f64) -> Result<Hyper> {
        if n_grads != self.params.len() {
            return Err(Error::InvalidArgument(format!(
                "AdamW got {n_grads} gradients for {} parameters",
                self.params.len()
            )));
        }
        self.step += 1;
        let c = &self.cfg;
        Ok(Hyper {
            lr: c.lr,
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            weight_decay: c.weight_decay,
            bias_correction1: 1.0 - c.beta1.powi(self.step as i32),
            bias_correction2_sqrt: (1.0 - c.beta2.powi(self.step as i32)).sqrt(),
            grad_scale,
        })
    }

    /// The moments by name, as PyTorch names them: `{param}.exp_avg`, `{param}.exp_avg_sq`.
    ///
    /// # Errors
    /// candle errors when copying the moments into tensors.
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for ((name, p), moments) in self.params.iter().zip(&self.moments) {
            let (m, v) = moments.tensors(p)?;
            out.insert(format!("{name}.exp_avg"), m);
            out.insert(format!("{name}.exp_avg_sq"), v);
        }
        Ok(out)
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the step count.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming the moment that is absent or
    /// of the wrong shape (e.g. an optimiser file from another model).
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        let mut loaded = Vec::with_capacity(self.params.len());
        for (name, p) in &self.params {
            let mut pair = Vec::with_capacity(2);
            for suffix in ["exp_avg", "exp_avg_sq"] {
                let key = format!("{name}.{suffix}");
                let t = state.get(&key).ok_or_else(|| Error::MissingTensor {
                    name: key.clone(),
                    path: None,
                })?;
                if t.dims() != p.dims() {
                    return Err(Error::ShapeMismatch {
                        name: key,
                        expected: p.dims().to_vec(),
                        got: t.dims().to_vec(),
                        path: None,
                    });
                }
                pair.push(t.to_device(p.device())?.to_dtype(DType::F32)?.detach());
            }
            let (m, v) = (pair.remove(0), pair.remove(0));
            loaded.push(if fast_path(p.as_tensor()) {
                Moments::Host {
                    m: m.flatten_all()?.to_vec1::<f32>()?,
                    v: v.flatten_all()?.to_vec1::<f32>()?,
                }
            } else {
                Moments::Device { m, v }
            });
        }
        self.moments = loaded;
        self.step = step;
        Ok(())
    }
}

/// The numbers one AdamW step needs.
#[derive(Debug, Clone, Copy)]
struct Hyper {
    lr: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    bias_correction1: f64,
    bias_correction2_sqrt: f64,
    grad_scale: f64,
}

impl Hyper {
    /// The update with tensor ops (any device): returns the new m, v and parameter.
    fn tensor_update(
        &self,
        p: &Var,
        g: &Tensor,
        m: &Tensor,
        v: &Tensor,
        decay: bool,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let g = (g.to_dtype(DType::F32)? * self.grad_scale)?;
        let m = ((m * self.beta1)? + (&g * (1.0 - self.beta1))?)?;
        let v = ((v * self.beta2)? + (g.sqr()? * (1.0 - self.beta2))?)?;
        let denom = ((v.sqrt()? / self.bias_correction2_sqrt)? + self.eps)?;
        let update = ((&m / denom)? * (self.lr / self.bias_correction1))?;
        let mut new_p = p.as_tensor().detach().to_dtype(DType::F32)?;
        if decay {
            new_p = (new_p * (1.0 - self.lr * self.weight_decay))?;
        }
        let new_p = (new_p - update)?.to_dtype(p.dtype())?;
        Ok((m, v, new_p))
    }
}

/// The in-place CPU update of one f32 parameter from its gradient, in a single pass.
struct AdamWKernel<'a> {
    hyper: Hyper,
    decay: bool,
    state: std::sync::Mutex<(&'a mut Vec<f32>, &'a mut Vec<f32>)>,
}

/// The f32 coefficients of one AdamW update of one tensor.
struct Coefs {
    b1: f32,
    b2: f32,
    one_b1: f32,
    one_b2: f32,
    scale: f32,
    step: f32,
    inv_bc2: f32,
    eps: f32,
    keep: f32,
}

crate::layers::multiversion! {
    /// AdamW on slices of equal length: `m, v` updated, then `p` (decayed by `keep`).
    fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], c: &Coefs) {
        for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let gi = g * c.scale;
            let mi = c.b1 * *m + c.one_b1 * gi;
            let vi = c.b2 * *v + c.one_b2 * gi * gi;
            *m = mi;
            *v = vi;
            *p = *p * c.keep - c.step * mi / (vi.sqrt() * c.inv_bc2 + c.eps);
        }
    }
}

crate::layers::multiversion! {
    /// Σ x² in f64, with eight running sums so the loop vectorises.
    fn sum_sq_f64(x: &[f32]) -> f64 {
        let mut acc = [0f64; 8];
        let chunks = x.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += (v as f64) * (v as f64);
            }
        }
        acc.iter().sum::<f64>() + rest.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()
    }
}

impl candle_core::InplaceOp2 for AdamWKernel<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        p: &mut candle_core::CpuStorage,
        p_layout: &candle_core::Layout,
        g: &candle_core::CpuStorage,
        g_layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let (candle_core::CpuStorage::F32(p), candle_core::CpuStorage::F32(g)) = (p, g) else {
            candle_core::bail!("adamw: parameters and gradients must be f32");
        };
        let (Some((p0, p1)), Some((g0, g1))) =
            (p_layout.contiguous_offsets(), g_layout.contiguous_offsets())
        else {
            candle_core::bail!("adamw: parameters and gradients must be contiguous");
        };
        self.update(&mut p[p0..p1], &g[g0..g1])
    }
}

/// [`AdamWKernel`] with its gradient as a slice: an in-place op on the parameter alone.
struct SliceGrad<'a, 'k>(&'a AdamWKernel<'k>, &'a [f32]);

impl candle_core::InplaceOp1 for SliceGrad<'_, '_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        p: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(p) = p else {
            candle_core::bail!("adamw: parameters must be f32");
        };
        let Some((p0, p1)) = layout.contiguous_offsets() else {
            candle_core::bail!("adamw: parameters must be contiguous");
        };
        self.0.update(&mut p[p0..p1], self.1)
    }
}

impl AdamWKernel<'_> {
    /// The update of one parameter `p` from its gradient `g`.
    fn update(&self, p: &mut [f32], g: &[f32]) -> candle_core::Result<()> {
        let mut state = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        let (m, v) = &mut *state;
        if m.len() != p.len() || v.len() != p.len() || g.len() != p.len() {
            candle_core::bail!("adamw: parameter, gradient and moments differ in length");
        }
        let h = &self.hyper;
        let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
        let (one_b1, one_b2) = ((1.0 - h.beta1) as f32, (1.0 - h.beta2) as f32);
        let scale = h.grad_scale as f32;
        let step = (h.lr / h.bias_correction1) as f32;
        let inv_bc2 = (1.0 / h.bias_correction2_sqrt) as f32;
        let eps = h.eps as f32;
        let keep = if self.decay {
            (1.0 - h.lr * h.weight_decay) as f32
        } else {
            1.0
        };
        let c = Coefs {
            b1,
            b2,
            one_b1,
            one_b2,
            scale,
            step,
            inv_bc2,
            eps,
            keep,
        };
        adamw_update(p, g, m, v, &c);
        Ok(())
    }
}

/// nanoGPT's learning-rate schedule: linear warm-up over `warmup_iters`, cosine decay to
/// `min_lr` at `lr_decay_iters`, then constant `min_lr` (Loshchilov & Hutter 2017, SGDR,
/// without restarts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// Peak learning rate, reached at the end of warm-up.
    pub lr: f64,
    /// Final learning rate (nanoGPT: lr / 10).
    pub min_lr: f64,
    /// Steps of linear warm-up.
    pub warmup_iters: usize,
    /// Step at which the cosine reaches `min_lr` (nanoGPT: = max_iters).
    pub lr_decay_iters: usize,
    /// If false, the learning rate is constant `lr`.
    pub decay_lr: bool,
}

impl LrSchedule {
    /// The learning rate for step `it` (0-based), exactly as nanoGPT's `get_lr(it)`.
    pub fn lr_at(&self, it: usize) -> f64 {
        if !self.decay_lr {
            return self.lr;
        }
        if it < self.warmup_iters {
            return self.lr * (it + 1) as f64 / (self.warmup_iters + 1) as f64;
        }
        if it > self.lr_decay_iters {
            return self.min_lr;
        }
        let span = self.lr_decay_iters.saturating_sub(self.warmup_iters).max(1);
        let ratio = (it - self.warmup_iters) as f64 / span as f64;
        let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos()); // 1 → 0
        self.min_lr + coeff * (self.lr - self.min_lr)
    }
}

/// lr ≥ 0 and betas in `[0, 1)`.
fn check_config(cfg: &AdamWConfig) -> Result<()> {
    if cfg.lr.is_nan()
        || cfg.lr < 0.0
        || !(0.0..1.0).contains(&cfg.beta1)
        || !(0.0..1.0).contains(&cfg.beta2)
    {
        return Err(Error::Config(format!(
            "AdamW needs lr >= 0 and betas in [0, 1), got lr {} beta1 {} beta2 {}",
            cfg.lr, cfg.beta1, cfg.beta2
        )));
    }
    Ok(())
}

/// The global L2 norm of `grads` and the factor that brings it down to `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` computes it: `max_norm / (norm + 1e-6)` when that is below
/// 1, else 1. Pass the factor to [`AdamW::step`], which scales while it updates.
///
/// # Errors
/// candle errors only.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Result<(f64, f64)> {
    let mut sq = 0f64;
    for g in grads {
        sq += sum_of_squares(g)?;
    }
    Ok(clip_coef(sq.sqrt(), max_norm))
}

/// [`clip_grad_norm`] of gradients held as plain f32 slices.
pub fn clip_grad_norm_slices(grads: &[Vec<f32>], max_norm: f64) -> (f64, f64) {
    let sq: f64 = grads.iter().map(|g| sum_sq_f64(g)).sum();
    clip_coef(sq.sqrt(), max_norm)
}

/// The norm and PyTorch's clipping factor for it.
fn clip_coef(norm: f64, max_norm: f64) -> (f64, f64) {
    let coef = max_norm / (norm + 1e-6);
    (norm, if coef < 1.0 { coef } else { 1.0 })
}

/// Σ g², read straight from memory on the CPU.
fn sum_of_squares(g: &Tensor) -> Result<f64> {
    if fast_path(g) {
        let (storage, layout) = g.storage_and_layout();
        if let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((a, b))) =
            (&*storage, layout.contiguous_offsets())
        {
            return Ok(sum_sq_f64(&data[a..b]));
        }
    }
    Ok(g.to_dtype(DType::F32)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f32>()? as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_matches_nanogpt() {
        let s = LrSchedule {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_iters: 100,
            lr_decay_iters: 2000,
            decay_lr: true,
        };
        assert!((s.lr_at(0) - 1e-3 / 101.0).abs() < 1e-15);
        assert!((s.lr_at(99) - 1e-3 * 100.0 / 101.0).abs() < 1e-15);
        assert!((s.lr_at(100) - 1e-3).abs() < 1e-15);
        assert!((s.lr_at(1050) - 5.5e-4).abs() < 1e-12); // half way: (lr + min_lr) / 2
        assert!((s.lr_at(2000) - 1e-4).abs() < 1e-15);
        assert_eq!(s.lr_at(5000), 1e-4);
    }

    #[test]
    fn adamw_matches_hand_computation() {
        // One parameter matrix [[1, -2]] (decayed) and a bias [0.5] (not decayed).
        let w = Var::new(&[[1f32, -2.0]], &Device::Cpu).unwrap();
        let b = Var::new(&[0.5f32], &Device::Cpu).unwrap();
        let cfg = AdamWConfig {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt =
            AdamW::new(vec![("w".into(), w.clone()), ("b".into(), b.clone())], cfg).unwrap();
        let gw = Tensor::new(&[[0.5f32, -1.0]], &Device::Cpu).unwrap();
        let gb = Tensor::new(&[2f32], &Device::Cpu).unwrap();
        opt.step(&[gw, gb], 1.0).unwrap();
        // Step 1: m̂ = g, v̂ = g², so the update is lr · g / (|g| + eps) ≈ lr · sign(g).
        let w1 = w.as_tensor().to_vec2::<f32>().unwrap();
        let want_w = [1.0 * (1.0 - 0.01) - 0.1, -2.0 * (1.0 - 0.01) + 0.1];
        assert!(
            (w1[0][0] - want_w[0]).abs() < 1e-6 && (w1[0][1] - want_w[1]).abs() < 1e-6,
            "{w1:?}"
        );
        let b1 = b.as_tensor().to_vec1::<f32>().unwrap();
        assert!((b1[0] - 0.4).abs() < 1e-6, "bias not decayed: {b1:?}");
        // State round-trip keeps the step and moments.
        let st = opt.state_tensors().unwrap();
        assert_eq!(
            st["w.exp_avg"].to_vec2::<f32>().unwrap(),
            vec![vec![0.05f32, -0.1]]
        );
        let mut opt2 = AdamW::new(opt.params().to_vec(), opt.cfg.clone()).unwrap();
        opt2.load_state(&st, 1).unwrap();
        assert_eq!(opt2.step_count(), 1);
        let mut bad = st.clone();
        bad.remove("b.exp_avg_sq");
        assert_eq!(
            opt2.load_state(&bad, 1).unwrap_err().to_string(),
            "tensor `b.exp_avg_sq` is missing"
        );
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let g = vec![
            Tensor::new(&[3f32], &Device::Cpu).unwrap(),
            Tensor::new(&[[4f32]], &Device::Cpu).unwrap(),
        ];
        let (norm, scale) = clip_grad_norm(&g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        assert!((scale - 1.0 / (5.0 + 1e-6)).abs() < 1e-12);
        let small = vec![Tensor::new(&[0.3f32], &Device::Cpu).unwrap()];
        assert_eq!(clip_grad_norm(&small, 1.0).unwrap().1, 1.0);
    }

    #[test]
    fn host_and_tensor_paths_agree() {
        // The in-place CPU kernel and the tensor-op path compute the same update.
        let cfg = AdamWConfig {
            lr: 0.01,
            ..AdamWConfig::default()
        };
        let w0 = Tensor::new(&[[0.5f32, -1.5, 2.0], [0.1, 0.0, -0.3]], &Device::Cpu).unwrap();
        let g = Tensor::new(&[[0.2f32, -0.7, 1.1], [0.05, 3.0, -0.2]], &Device::Cpu).unwrap();
        let a = Var::from_tensor(&w0).unwrap();
        let mut fast = AdamW::new(vec![("w".into(), a.clone())], cfg.clone()).unwrap();
        let b = Var::from_tensor(&w0).unwrap();
        let mut slow = AdamW::new(vec![("w".into(), b.clone())], cfg).unwrap();
        slow.moments = vec![Moments::Device {
            m: w0.zeros_like().unwrap(),
            v: w0.zeros_like().unwrap(),
        }];
        for _ in 0..3 {
            fast.step(std::slice::from_ref(&g), 0.5).unwrap();
            slow.step(std::slice::from_ref(&g), 0.5).unwrap();
        }
        let (x, y) = (
            a.as_tensor().to_vec2::<f32>().unwrap(),
            b.as_tensor().to_vec2::<f32>().unwrap(),
        );
        for (r, s) in x.iter().zip(&y) {
            for (p, q) in r.iter().zip(s) {
                assert!((p - q).abs() < 1e-6, "{p} vs {q}");
            }
        }
    }
}
