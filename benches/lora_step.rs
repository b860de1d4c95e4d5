//! A fine-tuning step of a SmolLM2-135M-shaped Llama (30 layers, 576 wide, 9 query and 3
//! key/value heads, SwiGLU 1536, tied; random weights, context 128, batch 4): full fine-tuning
//! (every weight trained, AdamW moments for all 134.5M) against LoRA (Hu et al. 2021: r 8,
//! alpha 16, every linear layer, the base frozen: no weight gradients, moments for the adapters
//! only). Forward, backward, clipping and AdamW.
//!
//! `cargo bench --features bench --bench lora_step` (threads: `RAYON_NUM_THREADS`, default 2).
//! Each mode builds its model only when it runs, so `-- full` and `-- lora` alone measure their
//! own peak memory (e.g. under `/usr/bin/time -v`).

#[path = "common.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use tinygpt::candle::Device;
use tinygpt::{
    Gpt, GptConfig, LoraConfig, Objective, Pretraining, TokenDataset, Tokenizer, TrainConfig,
    Trainer,
};

const BLOCK: usize = 128;
const BATCH: usize = 4;

fn objective(lora: bool) -> (Pretraining, Trainer) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let text: String = (0..100_000)
        .map(|_| char::from(b'a' + rng.random_range(0..26u8)))
        .collect();
    let tokenizer = Tokenizer::train_char(&text).expect("tokenizer");
    let cfg = GptConfig {
        block_size: BLOCK,
        ..GptConfig::smollm2_135m()
    };
    let model = Gpt::init(&cfg, 0, &Device::Cpu).expect("model");
    let model = if lora {
        model.with_lora(&LoraConfig::default(), 1).expect("lora")
    } else {
        model
    };
    let data =
        TokenDataset::from_tokens(tokenizer.encode(&text).expect("encode"), 0.1).expect("data");
    let objective = Pretraining::new(model, tokenizer, data, BATCH).expect("objective");
    let train_cfg = TrainConfig {
        batch_size: BATCH,
        ..TrainConfig::default()
    };
    let trainer =
        Trainer::new(train_cfg, objective.parameters().expect("params")).expect("trainer");
    (objective, trainer)
}

fn bench(c: &mut Criterion) {
    common::init();
    let mut group = c.benchmark_group("lora_step/cpu/smollm2-135M");
    group.sample_size(10);
    group.throughput(Throughput::Elements((BATCH * BLOCK) as u64));
    for (name, lora) in [("full", false), ("lora", true)] {
        let mut state = None;
        let mut it = 0;
        group.bench_function(name, |b| {
            let (objective, trainer) = state.get_or_insert_with(|| objective(lora));
            b.iter(|| {
                it += 1;
                trainer.optimizer_step(objective, it, 1e-4).expect("step")
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
