//! The model's matmuls, (M, K) × (K, N), at GPT-2-small shapes (M = B·T = 1024) and at the default
//! pre-training config (M = 12·64 = 768), f32 and f16, reported in GFLOP/s.
//!
//! `cargo bench --features bench --bench matmul` (threads: `RAYON_NUM_THREADS`, default 2).

#[path = "common.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tinygpt::candle::{DType, Device, Tensor};

/// (name, M, K, N)
fn shapes() -> Vec<(&'static str, usize, usize, usize)> {
    let (m, c, v) = (1024, 768, 50257); // GPT-2 small, one sequence of 1024
    let (m2, c2, v2) = (768, 128, 70); // default pretrain config: B 12 × T 64, C 128, ~70 chars
    vec![
        ("gpt2/c_attn", m, c, 3 * c),
        ("gpt2/c_fc", m, c, 4 * c),
        ("gpt2/mlp_c_proj", m, 4 * c, c),
        ("gpt2/lm_head", m, c, v),
        ("small/c_attn", m2, c2, 3 * c2),
        ("small/c_fc", m2, c2, 4 * c2),
        ("small/mlp_c_proj", m2, 4 * c2, c2),
        ("small/lm_head", m2, c2, v2),
    ]
}

fn bench(c: &mut Criterion) {
    common::init();
    for (dev_name, device) in common::devices() {
        for dtype in [DType::F32, DType::F16] {
            let mut group = c.benchmark_group(format!("matmul/{dev_name}/{dtype:?}"));
            group.sample_size(10);
            for (name, m, k, n) in shapes() {
                let a = Tensor::ones((m, k), dtype, &device).and_then(|t| t.affine(0.01, 0.0));
                let b = Tensor::ones((k, n), dtype, &device).and_then(|t| t.affine(0.01, 0.0));
                let (Ok(a), Ok(b)) = (a, b) else {
                    eprintln!("could not allocate {name} on {dev_name}");
                    continue;
                };
                group.throughput(Throughput::Elements((2 * m * k * n) as u64)); // FLOPs
                group.bench_with_input(
                    BenchmarkId::from_parameter(name),
                    &(a, b),
                    |bch, (a, b)| {
                        bch.iter(|| {
                            let y = a.matmul(b).expect("matmul");
                            common::sync(&device);
                            y
                        })
                    },
                );
            }
            group.finish();
        }
    }
}

/// Keeps `Device` in scope for the cfg'd CUDA path.
#[allow(dead_code)]
fn _device(_: Device) {}

criterion_group!(benches, bench);
criterion_main!(benches);
