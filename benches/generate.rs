//! Decoding speed of a GPT-2-small-shaped model and of a SmolLM2-135M-shaped Llama (30 layers,
//! 576 wide, 9 query and 3 key/value heads, tied; context cut to 1024 so that each fresh KV
//! cache is 47 MB rather than 377 MB) (random weights, batch 1): tokens per second with
//! the KV cache (one position per step) and, for GPT-2, without (the whole window recomputed
//! every step), f32 and f16 weights. `kv_cache` times a whole generation (the 16-token prompt's forward pass,
//! then 16 new tokens); `kv_cache_decode_only` the 16 decoding steps alone.
//!
//! `cargo bench --features bench --bench generate` (threads: `RAYON_NUM_THREADS`, default 2).

#[path = "common.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use tinygpt::candle::{DType, Tensor};
use tinygpt::{Gpt, GptConfig, KvCache};

const PROMPT: usize = 16;
const NEW: usize = 16;

fn bench(c: &mut Criterion) {
    common::init();
    for (dev_name, device) in common::devices() {
        let models = [
            ("gpt2-124M", GptConfig::gpt2()),
            (
                "smollm2-135M",
                GptConfig {
                    block_size: 1024,
                    ..GptConfig::smollm2_135m()
                },
            ),
        ];
        for (model_name, cfg) in models {
            let f32_model = Gpt::init(&cfg, 0, &device).expect("model");
            let prompt: Vec<u32> = (0..PROMPT as u32).map(|i| (i * 997) % 49152).collect();
            let mut group = c.benchmark_group(format!("generate/{dev_name}/{model_name}"));
            group.sample_size(10);
            group.throughput(Throughput::Elements(NEW as u64)); // tokens
            for dtype in [DType::F32, DType::F16] {
                let model = if dtype == DType::F32 {
                    f32_model.clone()
                } else {
                    match f32_model.to_dtype(dtype) {
                        Ok(m) => m,
                        Err(e) => {
                            eprintln!("{dtype:?} skipped: {e}");
                            continue;
                        }
                    }
                };
                group.bench_function(format!("kv_cache/{dtype:?}"), |b| {
                    b.iter(|| {
                        let mut cache = KvCache::new(cfg.n_layer);
                        let x = Tensor::from_slice(&prompt, (1, PROMPT), &device).expect("x");
                        let mut logits = model.forward_with_cache(&x, &mut cache).expect("prefill");
                        for _ in 0..NEW {
                            let next = logits.argmax(1).expect("argmax"); // (1,)
                            let x = next.unsqueeze(0).expect("x"); // (1, 1)
                            logits = model.forward_with_cache(&x, &mut cache).expect("step");
                        }
                        common::sync(&device);
                        logits
                    })
                });
                // The decoding steps alone, the prompt's forward pass (prefill) left out of the clock.
                group.bench_function(format!("kv_cache_decode_only/{dtype:?}"), |b| {
                    b.iter_custom(|iters| {
                        let mut total = std::time::Duration::ZERO;
                        for _ in 0..iters {
                            let mut cache = KvCache::new(cfg.n_layer);
                            let x = Tensor::from_slice(&prompt, (1, PROMPT), &device).expect("x");
                            let mut logits =
                                model.forward_with_cache(&x, &mut cache).expect("prefill");
                            common::sync(&device);
                            let start = std::time::Instant::now();
                            for _ in 0..NEW {
                                let next = logits.argmax(1).expect("argmax"); // (1,)
                                let x = next.unsqueeze(0).expect("x"); // (1, 1)
                                logits = model.forward_with_cache(&x, &mut cache).expect("step");
                            }
                            common::sync(&device);
                            total += start.elapsed();
                        }
                        total
                    })
                });
                if dtype == DType::F32 && cfg.arch == tinygpt::Arch::Gpt2 {
                    group.bench_function("recompute/F32", |b| {
                        b.iter(|| {
                            let mut ids = prompt.clone();
                            for _ in 0..NEW {
                                let x =
                                    Tensor::from_slice(&ids, (1, ids.len()), &device).expect("x");
                                let logits = model.forward(&x).expect("forward"); // (1, T, V)
                                let last = logits
                                    .get(0)
                                    .and_then(|l| l.get(ids.len() - 1))
                                    .expect("last");
                                let id = last
                                    .argmax(0)
                                    .and_then(|t| t.to_scalar::<u32>())
                                    .expect("argmax");
                                ids.push(id);
                            }
                            ids
                        })
                    });
                }
            }
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
