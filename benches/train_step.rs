//! One optimiser step of the default pre-training config (nanoGPT's shakespeare_char CPU recipe:
//! 4 layers, 4 heads, 128 wide, context 64, batch 12), on generated characters: forward,
//! backward, clipping and AdamW.
//!
//! `cargo bench --features bench --bench train_step` (threads: `RAYON_NUM_THREADS`, default 2). Set
//! `TINYGPT_BIAS=1` for the GPT-2-style model with biases (what the PyTorch twin in
//! `../shared/bench/torch_train_bench.py` trains), `TINYGPT_ARCH=llama` for the Llama-style
//! default (`GptConfig::llama_tiny`, what `benches/torch_llama_train.py` trains).

#[path = "common.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use tinygpt::{
    Gpt, GptConfig, Objective, Pretraining, TokenDataset, Tokenizer, TrainConfig, Trainer,
};

fn bench(c: &mut Criterion) {
    common::init();
    let alphabet: Vec<char> = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.;:!?'\n-&$3"
        .chars()
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let text: String = (0..200_000)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())])
        .collect();
    for (dev_name, device) in common::devices() {
        let tokenizer = Tokenizer::train_char(&text).expect("tokenizer");
        let llama = std::env::var("TINYGPT_ARCH").is_ok_and(|v| v == "llama");
        let mut cfg = if llama {
            GptConfig::llama_tiny(tokenizer.vocab_size())
        } else {
            GptConfig::shakespeare_char_cpu(tokenizer.vocab_size())
        };
        cfg.bias = std::env::var("TINYGPT_BIAS").is_ok_and(|v| v == "1");
        let model = Gpt::init(&cfg, 0, &device).expect("model");
        let data =
            TokenDataset::from_tokens(tokenizer.encode(&text).expect("encode"), 0.1).expect("data");
        let train_cfg = TrainConfig::default();
        let mut objective =
            Pretraining::new(model, tokenizer, data, train_cfg.batch_size).expect("objective");
        let mut trainer = Trainer::new(train_cfg.clone(), objective.parameters().expect("params"))
            .expect("trainer");
        let mut group = c.benchmark_group(format!("train_step/{dev_name}"));
        group.sample_size(30);
        group.throughput(Throughput::Elements(
            (train_cfg.batch_size * cfg.block_size) as u64,
        ));
        let name = match (llama, cfg.bias) {
            (true, _) => "llama_default_config",
            (false, true) => "default_config_bias",
            (false, false) => "default_config",
        };
        let mut it = 0;
        group.bench_function(name, |b| {
            b.iter(|| {
                it += 1;
                let stats = trainer
                    .optimizer_step(&mut objective, it, 1e-3)
                    .expect("step");
                common::sync(&device);
                stats
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
