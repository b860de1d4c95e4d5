//! Fused layers vs their plain-candle references, forward and forward + backward, at the
//! default pre-training config's shapes: B·T = 12·64 = 768 rows, C = 128, 4C = 512, a
//! char-level vocabulary of 70 and a BPE one of 2048.
//!
//! The Llama-style layers (RMSNorm, SwiGLU, RoPE on a packed qkv) run at GPT-2-small-ish
//! shapes instead: 1024 rows, C = 768, I = 2048, 12 heads (4 kv heads) of 64.
//!
//! `cargo bench --features bench --bench layers` (add `-- layer_norm` to run one group). Each
//! forward + backward bench seeds the backward pass with a fixed random `dy` through a
//! no-op [`SeedGrad`], so it times the op's backward and candle's own bookkeeping (a zeroed
//! gradient buffer plus an add per input), not a loss; `seed_overhead` times that alone.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use tinygpt::candle::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor, Var};
use tinygpt::kernels::{rms_norm, rope, swiglu};
use tinygpt::layers;

// The training examples run under mimalloc; so do the benches.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const B: usize = 12;
const T: usize = 64;
const C: usize = 128;

fn randn(rng: &mut ChaCha8Rng, dims: &[usize], std: f32) -> Tensor {
    let normal = Normal::new(0f32, std).expect("valid std");
    let n = dims.iter().product();
    let data: Vec<f32> = (0..n).map(|_| normal.sample(rng)).collect();
    Tensor::from_vec(data, dims, &Device::Cpu).expect("shape matches data")
}

fn var(rng: &mut ChaCha8Rng, dims: &[usize], std: f32) -> Var {
    Var::from_tensor(&randn(rng, dims, std)).expect("a var")
}

/// A scalar 0 whose backward hands a fixed `dy` to its argument.
struct SeedGrad(Tensor);

impl CustomOp1 for SeedGrad {
    fn name(&self) -> &'static str {
        "seed-grad"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> tinygpt::candle::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(vec![0.0]), Shape::from(())))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, _: &Tensor) -> tinygpt::candle::Result<Option<Tensor>> {
        Ok(Some(self.0.clone()))
    }
}

type Op<'a> = Box<dyn Fn(bool) -> Tensor + 'a>;

/// Benches `op(fused)` forward only and forward + backward from a random `dy`.
fn bench_pair(c: &mut Criterion, group: &str, op: Op) {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let y = op(true);
    let r = randn(&mut rng, y.dims(), 1.0);
    let scalar = y.rank() == 0;
    let mut g = c.benchmark_group(group);
    for (name, fused) in [("fused", true), ("reference", false)] {
        g.bench_function(BenchmarkId::new("fwd", name), |bench| {
            bench.iter(|| std::hint::black_box(op(fused)))
        });
        g.bench_function(BenchmarkId::new("fwd+bwd", name), |bench| {
            bench.iter(|| {
                let y = op(fused);
                let loss = if scalar {
                    y
                } else {
                    y.apply_op1(SeedGrad(r.clone())).expect("seed")
                };
                std::hint::black_box(loss.backward().expect("backward"))
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let rows = B * T;

    // LayerNorm (B, T, C) with weight and bias
    let x = var(&mut rng, &[B, T, C], 1.0);
    let w = var(&mut rng, &[C], 1.0);
    let b = var(&mut rng, &[C], 1.0);
    bench_pair(
        c,
        "layer_norm_768x128",
        Box::new(|fused| {
            let f = if fused {
                layers::layer_norm
            } else {
                layers::layer_norm_reference
            };
            f(&x, &w, Some(&b), 1e-5).expect("layer_norm")
        }),
    );

    // bias adds: c_fc's (768, 512) + (512,), and position embeddings (B, T, C) + (T, C)
    let h = var(&mut rng, &[rows, 4 * C], 1.0);
    let b4 = var(&mut rng, &[4 * C], 1.0);
    bench_pair(
        c,
        "add_bias_768x512",
        Box::new(|fused| {
            if fused {
                layers::add_bias(&h, &b4).expect("add_bias")
            } else {
                layers::add_bias_reference(&h, &b4).expect("add_bias")
            }
        }),
    );
    let pos = var(&mut rng, &[T, C], 1.0);
    bench_pair(
        c,
        "add_pos_emb_12x64x128",
        Box::new(|fused| {
            if fused {
                layers::add_bias(&x, &pos).expect("add_bias")
            } else {
                layers::add_bias_reference(&x, &pos).expect("add_bias")
            }
        }),
    );

    // Linear c_fc: (B, T, C) @ (C, 4C) + (4C,)
    let w_fc = var(&mut rng, &[C, 4 * C], 0.02);
    bench_pair(
        c,
        "linear_768x128x512",
        Box::new(|fused| {
            let f = if fused {
                layers::linear
            } else {
                layers::linear_reference
            };
            f(&x, &w_fc, Some(&b4)).expect("linear")
        }),
    );

    // bias + GELU on (B, T, 4C)
    let h3 = var(&mut rng, &[B, T, 4 * C], 1.0);
    bench_pair(
        c,
        "bias_gelu_768x512",
        Box::new(|fused| {
            if fused {
                layers::bias_gelu(&h3, Some(&b4)).expect("bias_gelu")
            } else {
                layers::bias_gelu_reference(&h3, Some(&b4)).expect("bias_gelu")
            }
        }),
    );

    // cross-entropy over V = 70 and V = 2048
    for v in [70usize, 2048] {
        let logits = var(&mut rng, &[rows, v], 2.0);
        let ids: Vec<u32> = (0..rows).map(|_| rng.random_range(0..v as u32)).collect();
        let targets = Tensor::from_vec(ids, rows, &Device::Cpu).expect("targets");
        bench_pair(
            c,
            &format!("cross_entropy_768x{v}"),
            Box::new(move |fused| {
                let f = if fused {
                    layers::cross_entropy
                } else {
                    layers::cross_entropy_reference
                };
                f(&logits, &targets, None).expect("cross_entropy")
            }),
        );
    }

    // Llama-style layers at GPT-2-small-ish shapes: 1024 rows, C = 768, I = 2048
    const LROWS: usize = 1024;
    const LC: usize = 768;
    const LI: usize = 2048;
    let xl = var(&mut rng, &[LROWS, LC], 1.0);
    let wl = var(&mut rng, &[LC], 1.0);
    bench_pair(
        c,
        "rms_norm_1024x768",
        Box::new(|fused| {
            let f = if fused {
                rms_norm::rms_norm
            } else {
                rms_norm::rms_norm_reference
            };
            f(&xl, &wl, 1e-6).expect("rms_norm")
        }),
    );
    let hl = var(&mut rng, &[LROWS, 2 * LI], 1.0);
    bench_pair(
        c,
        "swiglu_1024x2x2048",
        Box::new(|fused| {
            let f = if fused {
                swiglu::swiglu
            } else {
                swiglu::swiglu_reference
            };
            f(&hl).expect("swiglu")
        }),
    );
    // RoPE on a packed qkv (B = 4, T = 256): 12 q heads and 4 kv heads of 64
    let (n_head, n_kv_head, hs) = (12, 4, 64);
    let table = rope::RopeTable::new(hs, 256, 10_000.0).expect("rope table");
    let qkv = var(
        &mut rng,
        &[4, LROWS / 4, (n_head + 2 * n_kv_head) * hs],
        1.0,
    );
    bench_pair(
        c,
        "rope_qkv_1024x12+4+4x64",
        Box::new(|fused| {
            let f = if fused {
                rope::rope_qkv
            } else {
                rope::rope_qkv_reference
            };
            f(&qkv, &table, n_head, n_kv_head, 0).expect("rope_qkv")
        }),
    );

    // the seeded backward alone through a (768, 512) copy
    let r = randn(&mut rng, &[rows, 4 * C], 1.0);
    c.bench_function("seed_overhead_768x512", |bench| {
        bench.iter(|| {
            let y = h.as_tensor().copy().expect("copy");
            let loss = y.apply_op1(SeedGrad(r.clone())).expect("seed");
            std::hint::black_box(loss.backward().expect("backward"))
        })
    });
}

criterion_group! {
    name = layers_benches;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = benches
}
criterion_main!(layers_benches);
