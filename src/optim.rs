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
#[derive(Debug)]
pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    exp_avg: Vec<Tensor>,    // m, same shapes as params
    exp_avg_sq: Vec<Tensor>, // v
    step: usize,
}

impl AdamW {
    /// An optimiser over `params` with zeroed moments.
    ///
    /// # Errors
    /// [`Error::Config`] for a non-positive learning rate or betas outside `[0, 1)`.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
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
        let zeros = |v: &Var| v.zeros_like().map(|t| t.detach());
        let exp_avg = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        let exp_avg_sq = params
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            cfg,
            params,
            exp_avg,
            exp_avg_sq,
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

    /// One update. `grads[i]` is the gradient of `params()[i]`, same shape.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the number or shapes of gradients do not match.
    pub fn step(&mut self, grads: &[Tensor]) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::InvalidArgument(format!(
                "AdamW got {} gradients for {} parameters",
                grads.len(),
                self.params.len()
            )));
        }
        self.step += 1;
        let AdamWConfig {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let bias_correction1 = 1.0 - beta1.powi(self.step as i32);
        let bias_correction2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        for (i, ((name, p), g)) in self.params.iter().zip(grads).enumerate() {
            if g.dims() != p.dims() {
                return Err(Error::InvalidArgument(format!(
                    "gradient of `{name}` has shape {:?}, parameter has {:?}",
                    g.dims(),
                    p.dims()
                )));
            }
            let g = g.detach().to_dtype(DType::F32)?; // no autograd history in the state
            let m = ((&self.exp_avg[i] * beta1)? + (&g * (1.0 - beta1))?)?;
            let v = ((&self.exp_avg_sq[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = ((v.sqrt()? / bias_correction2_sqrt)? + eps)?;
            let update = ((&m / denom)? * (lr / bias_correction1))?;
            let mut new_p = p.as_tensor().detach();
            if weight_decay != 0.0 && p.rank() >= 2 {
                new_p = (new_p * (1.0 - lr * weight_decay))?;
            }
            p.set(&(new_p - update)?)?;
            self.exp_avg[i] = m.detach();
            self.exp_avg_sq[i] = v.detach();
        }
        Ok(())
    }

    /// The moments by name, as PyTorch names them: `{param}.exp_avg`, `{param}.exp_avg_sq`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            out.insert(format!("{name}.exp_avg"), self.exp_avg[i].clone());
            out.insert(format!("{name}.exp_avg_sq"), self.exp_avg_sq[i].clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the step count.
    ///
    /// # Errors
    /// [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming the moment that is absent or
    /// of the wrong shape (e.g. an optimiser file from another model).
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        let device = self.params.first().map(|(_, v)| v.device().clone());
        let mut m = Vec::with_capacity(self.params.len());
        let mut v = Vec::with_capacity(self.params.len());
        for (name, p) in &self.params {
            for (suffix, out) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
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
                let t = match &device {
                    Some(d) => t.to_device(d)?,
                    None => t.clone(),
                };
                out.push(t.to_dtype(DType::F32)?);
            }
        }
        self.exp_avg = m;
        self.exp_avg_sq = v;
        self.step = step;
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

/// Scales `grads` in place so their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_` does (factor `max_norm / (norm + 1e-6)`, only when below
/// 1). Returns the norm before clipping.
///
/// # Errors
/// candle errors only.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.iter() {
        sq += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
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
        opt.step(&[gw, gb]).unwrap();
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
        let st = opt.state_tensors();
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
        let mut g = vec![
            Tensor::new(&[3f32], &Device::Cpu).unwrap(),
            Tensor::new(&[[4f32]], &Device::Cpu).unwrap(),
        ];
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let a = g[0].to_vec1::<f32>().unwrap()[0];
        assert!((a - 0.6).abs() < 1e-6);
        let mut small = vec![Tensor::new(&[0.3f32], &Device::Cpu).unwrap()];
        clip_grad_norm(&mut small, 1.0).unwrap();
        assert_eq!(small[0].to_vec1::<f32>().unwrap(), vec![0.3]);
    }
}
