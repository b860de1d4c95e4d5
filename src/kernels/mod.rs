//! The engine: fused CPU kernels with hand-written backward passes, SIMD dispatch and f16
//! matrix-vector products. The story files (`model.rs`, the stages, the sampler) call these;
//! nothing here knows about tokens, checkpoints or training.
//!
//! - [`layers`]: LayerNorm, bias add, bias + GELU, cross-entropy (each forward and backward).
//! - [`attention`]: causal self-attention after FlashAttention-2, training and KV-cache decoding.
//! - [`lora_linear`]: a LoRA-adapted projection, frozen weight, one op.
//! - [`dropout_mask`]: inverted dropout masks as bits, drawn in parallel from a seed.
//! - [`rms_norm`]: RMSNorm (Llama, Qwen; also Qwen3's per-head q/k norm).
//! - [`rope`]: rotary position embeddings, Hugging Face's rotate-half layout, on packed qkv.
//! - [`swiglu`]: `silu(gate) · up` on a packed `[gate | up]` projection.
//! - `gemv`: matrix-vector products for decoding, f32 and f16 weights.
//! - `q8`: GGUF Q8_0 weights (ggml's `block_q8_0`) and their products with f32 rows, for
//!   decoding from a quantized model.
//! - `decode_step`: the row operations of one f16 or f32 decoding step on plain slices.
//! - `train_step`: a whole GPT-2 training step's forward and backward written by hand over
//!   buffers reused from step to step (llm.c's way), candle's autograd its reference.
//! - `gemm`: `C (+)= A · B` on plain slices through the gemm crate, transposes as strides.
//!
//! Each fused op has a `*_reference` twin written with plain candle ops that runs on every
//! device and dtype; the tests hold the two to 1e-4 in values and gradients.

use std::cell::Cell;
use std::thread::LocalKey;

pub mod attention;
pub(crate) mod decode_step;
pub mod dropout_mask;
pub(crate) mod gemm;
pub(crate) mod gemv;
pub mod layers;
pub mod lora_linear;
pub(crate) mod q8;
pub mod rms_norm;
pub mod rope;
pub mod swiglu;
pub(crate) mod train_step;

thread_local! {
    /// Whether this thread's kernels keep their work on this thread ([`serial`]).
    static SERIAL: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the thread-local switch `flag` on, restoring it when `f` ends, however it
/// ends.
pub(crate) fn with_flag<T>(flag: &'static LocalKey<Cell<bool>>, f: impl FnOnce() -> T) -> T {
    struct Restore(&'static LocalKey<Cell<bool>>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            self.0.with(|s| s.set(self.1));
        }
    }
    let _restore = Restore(flag, flag.with(|s| s.replace(true)));
    f()
}

/// Runs `f` with the kernels it calls on this thread (gemm, attention heads, row passes) kept
/// on this thread: for work that is itself one of several running side by side, one per
/// thread (a training step's shards of the batch, [`train_step::ShardedStep`]), where
/// splitting each product again would only hand work back and forth.
pub(crate) fn serial<T>(f: impl FnOnce() -> T) -> T {
    with_flag(&SERIAL, f)
}

/// Whether the calling thread is inside [`serial`].
pub(crate) fn is_serial() -> bool {
    SERIAL.with(Cell::get)
}
