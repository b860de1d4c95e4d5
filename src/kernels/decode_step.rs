//! The row operations of one decoding step with f16 or f32 weights on the CPU, on plain f32
//! rows.
//!
//! Decoding one token reads every weight once and computes little else: for SmolLM2-135M,
//! 270 MB of f16 weights against a few thousand floats of activations per layer. Run as
//! candle ops, a step is ~12 ops per layer (norms, projections, concatenations, RoPE, the
//! cache writes, SwiGLU, the residual adds), each allocating its output and some converting a
//! vector's dtype: a quarter of the step went there (SmolLM2-135M, 2 cores: 17 ms a token, 13
//! ms of it in the matrix-vector products). [`crate::model::Gpt`]'s decoder calls these
//! instead, over buffers it allocates once per step: the products stream the weights
//! ([`crate::gemv::linear_into`]) and the rest are the same row kernels the fused ops run
//! ([`crate::kernels::rms_norm`], [`crate::layers`], [`crate::kernels::swiglu`]), so a step
//! computes the numbers the op-by-op path computes.

use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::slice::HalfFloatSliceExt;

use crate::{Error, Result};

/// A small parameter (a norm's weight, a bias) as f32, read from its storage: f32 copied, f16
/// and bf16 widened.
///
/// # Errors
/// [`Error::InvalidArgument`] for a non-CPU or non-contiguous tensor or another dtype.
pub(crate) fn vector_f32(t: &Tensor) -> Result<Vec<f32>> {
    let (storage, layout) = t.storage_and_layout();
    let n = layout.shape().elem_count();
    let at = layout.start_offset();
    let range = at..at + n;
    let out = match (&*storage, layout.is_contiguous()) {
        (Storage::Cpu(CpuStorage::F32(v)), true) => v.get(range).map(<[f32]>::to_vec),
        (Storage::Cpu(CpuStorage::F16(v)), true) => v.get(range).map(|h| {
            let mut out = vec![0f32; n];
            h.convert_to_f32_slice(&mut out);
            out
        }),
        (Storage::Cpu(CpuStorage::BF16(v)), true) => v.get(range).map(|h| {
            let mut out = vec![0f32; n];
            h.convert_to_f32_slice(&mut out);
            out
        }),
        _ => None,
    };
    out.ok_or_else(|| {
        Error::InvalidArgument(format!(
            "decoding: a parameter of shape {:?} ({:?}) is not a contiguous CPU vector",
            t.dims(),
            t.dtype()
        ))
    })
}

/// Whether `t` is a weight the streaming products take: f16 or f32 on the CPU, 2-D, contiguous
/// or the transpose of a contiguous matrix (what [`crate::gemv::linear_into`] accepts).
pub(crate) fn streamable(t: &Tensor) -> bool {
    let dtype_ok = matches!(t.dtype(), DType::F16 | DType::F32);
    if !t.device().is_cpu() || !dtype_ok || t.rank() != 2 {
        return false;
    }
    let (l, dims) = (t.layout(), t.dims());
    t.is_contiguous() || matches!(l.stride(), [1, s] if *s == dims[0])
}

/// `y[r] += b` for each row `r` of `y` (rows of `b.len()`).
pub(crate) fn add_rows(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len().max(1)) {
        for (o, &v) in row.iter_mut().zip(b) {
            *o += v;
        }
    }
}

/// `x += y`, element by element (the residual stream).
pub(crate) fn add_assign(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn vectors_widen_and_layouts_are_recognised() {
        let t = Tensor::new(&[1.5f32, -2.0, 0.25], &Device::Cpu).unwrap();
        assert_eq!(vector_f32(&t).unwrap(), [1.5, -2.0, 0.25]);
        let h = t.to_dtype(DType::F16).unwrap();
        assert_eq!(vector_f32(&h).unwrap(), [1.5, -2.0, 0.25]);
        assert_eq!(
            vector_f32(&h.narrow(0, 1, 2).unwrap()).unwrap(),
            [-2.0, 0.25]
        );
        let w = Tensor::zeros((3, 4), DType::F16, &Device::Cpu).unwrap();
        assert!(streamable(&w) && streamable(&w.t().unwrap()));
        let f = w.to_dtype(DType::F32).unwrap();
        assert!(streamable(&f) && streamable(&f.t().unwrap()));
        assert!(!streamable(&w.to_dtype(DType::BF16).unwrap()));
        assert!(!streamable(&f.narrow(1, 0, 2).unwrap()));
        assert!(!streamable(&w.narrow(1, 0, 2).unwrap()));
        let mut y = vec![1f32; 6];
        add_rows(&mut y, &[1.0, 2.0, 3.0]);
        assert_eq!(y, [2.0, 3.0, 4.0, 2.0, 3.0, 4.0]);
    }
}
