//! The thread setting the examples run with: candle's pool cut to the calling thread
//! (`CANDLE_NUM_THREADS=1`) and the work started from a rayon worker, as the trainer runs its
//! steps. The fused attention then splits its heads over rayon's pool; its values and
//! gradients must be those of the plain-op reference, and bit for bit those of a call from
//! outside the pool.
//!
//! One test in its own binary: candle reads `CANDLE_NUM_THREADS` once, when its pool starts.

mod common;
use common::max_abs_diff;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tinygpt::attention::{causal_attention_qkv, causal_attention_reference};
use tinygpt::candle::{Device, Tensor, Var};

fn random(rng: &mut ChaCha8Rng, dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    let data: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Tensor::from_vec(data, dims, &Device::Cpu).unwrap()
}

/// `Σ w ∘ attention(qkv)` and its gradient with respect to `qkv`, fused or reference.
fn value_and_grad(qkv: &Tensor, w: &Tensor, nh: usize, fused: bool) -> (Tensor, Tensor) {
    let (b, t, c3) = qkv.dims3().unwrap();
    let c = c3 / 3;
    let scale = 1.0 / ((c / nh) as f64).sqrt();
    let x = Var::from_tensor(qkv).unwrap();
    let y = if fused {
        causal_attention_qkv(x.as_tensor(), nh, scale).unwrap()
    } else {
        let heads = |i: usize| {
            x.as_tensor()
                .narrow(2, i * c, c)
                .and_then(|h| h.reshape((b, t, nh, c / nh)))
                .and_then(|h| h.transpose(1, 2))
                .and_then(|h| h.contiguous())
                .unwrap()
        };
        causal_attention_reference(&heads(0), &heads(1), &heads(2), scale)
            .unwrap()
            .transpose(1, 2)
            .and_then(|y| y.reshape((b, t, c)))
            .unwrap()
    };
    let grads = (&y * w).unwrap().sum_all().unwrap().backward().unwrap();
    (y, grads.get(x.as_tensor()).unwrap().clone())
}

#[test]
fn fused_attention_on_rayon_workers_matches_the_reference() {
    // Before any tensor op: candle starts its pool on the first one.
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    // B 4, T 64, 4 heads of 32: the default training config's attention, big enough to split.
    let (qkv, w) = (
        random(&mut rng, &[4, 64, 384]),
        random(&mut rng, &[4, 64, 128]),
    );
    let (y_ref, g_ref) = value_and_grad(&qkv, &w, 4, false);
    let (y_out, g_out) = value_and_grad(&qkv, &w, 4, true); // from the test's own thread
    let (y_in, g_in) = rayon::scope(|_| value_and_grad(&qkv, &w, 4, true)); // from a worker
    assert!(max_abs_diff(&y_in, &y_ref) <= 1e-4 && max_abs_diff(&g_in, &g_ref) <= 1e-4);
    // Each head is computed by one thread, whichever: the results are bit for bit the same.
    assert_eq!(max_abs_diff(&y_in, &y_out), 0.0);
    assert_eq!(max_abs_diff(&g_in, &g_out), 0.0);
}
