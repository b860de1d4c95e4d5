//! Helpers the unit tests share.

use candle_core::Tensor;

/// max |a − b| over all elements, as f32; the shapes must agree.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_dtype(candle_core::DType::F32))
        .and_then(|d| d.to_scalar::<f32>())
        .unwrap()
}

/// A one-layer, one-head GPT 8 wide with context `block_size` for `vocab_size` tokens, seeded.
pub(crate) fn tiny_gpt(vocab_size: usize, block_size: usize) -> crate::Gpt {
    let cfg = crate::GptConfig {
        vocab_size,
        block_size,
        n_layer: 1,
        n_head: 1,
        n_embd: 8,
        dropout: 0.0,
        bias: true,
        ..Default::default()
    };
    crate::Gpt::init(&cfg, 1, &candle_core::Device::Cpu).unwrap()
}

/// The model's weights as fresh copies (new storage), for a frozen reference that training
/// the model cannot move.
pub(crate) fn copies(model: &crate::Gpt) -> std::collections::HashMap<String, Tensor> {
    model
        .tensors()
        .into_iter()
        .map(|(name, t)| (name, t.copy().unwrap()))
        .collect()
}
