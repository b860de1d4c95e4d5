//! The arithmetic the preference stages share: per-token log-probabilities, their sums over
//! response tokens, entropies, and a stable `log σ`.
//!
//! Everything is written with differentiable candle primitives (candle's fused softmax has no
//! backward pass), in f32 whatever the model's dtype.

use candle_core::{DType, Tensor, D};
use rand_chacha::ChaCha8Rng;

use crate::model::Gpt;
use crate::rlhf::data::SequenceBatch;
use crate::{Error, Result};

/// `log softmax(logits)[target]` at every position: logits `(B, T, V)` and targets `(B, T)`
/// u32 → `(B, T)` f32. Differentiable in `logits`.
///
/// # Errors
/// [`Error::InvalidArgument`] if the shapes do not agree.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, t, _v) = logits.dims3()?;
    if targets.dims() != [b, t] {
        return Err(Error::InvalidArgument(format!(
            "targets must have shape [{b}, {t}], got {:?}",
            targets.dims()
        )));
    }
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?.detach(); // (B, T, 1)
    let shifted = logits.broadcast_sub(&max)?; // (B, T, V)
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // (B, T, 1)
    let picked = shifted.gather(
        &targets.to_dtype(DType::U32)?.unsqueeze(2)?.contiguous()?,
        2,
    )?; // (B, T, 1)
    Ok((picked - lse)?.squeeze(2)?) // (B, T)
}

/// The entropy `−Σ_v p_v log p_v` of `softmax(logits)` at every position: `(B, T, V)` →
/// `(B, T)` f32, in nats, without a graph (for logging).
///
/// # Errors
/// candle errors only.
pub fn entropy(logits: &Tensor) -> Result<Tensor> {
    let logits = logits.detach().to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let shifted = logits.broadcast_sub(&max)?; // (B, T, V)
    let e = shifted.exp()?;
    let z = e.sum_keepdim(D::Minus1)?; // (B, T, 1)
    let logp = shifted.broadcast_sub(&z.log()?)?; // (B, T, V)
    let p = e.broadcast_div(&z)?;
    Ok((p * logp)?.sum(D::Minus1)?.neg()?) // (B, T)
}

/// `log σ(x) = −(max(−x, 0) + log(1 + exp(−|x|)))`, element-wise, without overflow for any
/// finite `x`. Differentiable.
///
/// # Errors
/// candle errors only.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let softplus_neg = (x.neg()?.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok(softplus_neg.neg()?)
}

/// `Σ x·mask / Σ mask` over all elements: a scalar.
///
/// # Errors
/// [`Error::InvalidArgument`] for different shapes or a mask that selects nothing.
pub fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if x.dims() != mask.dims() {
        return Err(Error::InvalidArgument(format!(
            "masked_mean: values {:?} and mask {:?} differ in shape",
            x.dims(),
            mask.dims()
        )));
    }
    let count = mask.sum_all()?.to_scalar::<f32>()?;
    if count <= 0.0 {
        return Err(Error::InvalidArgument(
            "the mask selects no position".into(),
        ));
    }
    Ok((x.mul(mask)?.sum_all()? / count as f64)?)
}

/// The log-probabilities the model gives the batch's targets, `(B, T − 1)` per token (zero
/// outside the response) and `(B,)` summed over each row's response tokens: the
/// `log π(y | x)` of DPO and the per-token `log π(a_t)` of PPO. Prompt and padding positions
/// contribute exactly nothing, whatever their targets.
///
/// With `rng`, the forward pass is in training mode (dropout, if the model has any, draws from
/// it); without, in evaluation mode. A model with constant weights builds no graph.
///
/// # Errors
/// [`Error::InvalidArgument`] if the batch is longer than the model's context.
pub fn sequence_logprobs(
    model: &Gpt,
    batch: &SequenceBatch,
    rng: Option<&mut ChaCha8Rng>,
) -> Result<(Tensor, Tensor)> {
    let logits = match rng {
        Some(rng) => model.forward_train(&batch.ids, rng)?,
        None => model.forward(&batch.ids)?,
    }; // (B, T, V)
    response_logprobs(&logits, batch)
}

/// As [`sequence_logprobs`], from logits `(B, T, V)` already computed on `batch.ids`.
///
/// # Errors
/// [`Error::InvalidArgument`] if the logits do not fit the batch.
pub fn response_logprobs(logits: &Tensor, batch: &SequenceBatch) -> Result<(Tensor, Tensor)> {
    let t = logits.dim(1)?;
    let per_token = token_logprobs(&logits.narrow(1, 0, t - 1)?, &batch.targets)?; // (B, T-1)
    let per_token = per_token.mul(&batch.response_mask)?;
    let summed = per_token.sum(1)?; // (B,)
    Ok((per_token, summed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn token_logprobs_match_hand_computation() {
        // One position, logits [1, 2, 3], target 2: log(e^3 / (e + e^2 + e^3)).
        let logits = Tensor::new(&[[[1f32, 2.0, 3.0], [0.0, 0.0, 0.0]]], &Device::Cpu).unwrap();
        let targets = Tensor::new(&[[2u32, 1]], &Device::Cpu).unwrap();
        let lp = token_logprobs(&logits, &targets)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let e = std::f32::consts::E;
        let want = (e.powi(3) / (e + e * e + e.powi(3))).ln();
        assert!((lp[0][0] - want).abs() < 1e-6, "{} vs {want}", lp[0][0]);
        assert!((lp[0][1] + 3f32.ln()).abs() < 1e-6);
        let h = entropy(&logits).unwrap().to_vec2::<f32>().unwrap();
        assert!((h[0][1] - 3f32.ln()).abs() < 1e-6);
    }

    #[test]
    fn log_sigmoid_is_stable_and_exact_at_zero() {
        let x = Tensor::new(&[0f32, 1.0, -1.0, 100.0, -100.0], &Device::Cpu).unwrap();
        let y = log_sigmoid(&x).unwrap().to_vec1::<f32>().unwrap();
        assert!((y[0] + std::f32::consts::LN_2).abs() < 1e-7);
        assert!((y[1] - (1.0 / (1.0 + (-1f32).exp())).ln()).abs() < 1e-6);
        assert!((y[2] - (1.0 / (1.0 + 1f32.exp())).ln()).abs() < 1e-6);
        assert!(y[3].abs() < 1e-6);
        assert!((y[4] + 100.0).abs() < 1e-4);
    }
}
