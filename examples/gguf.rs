//! GGUF for llama.cpp and ollama: export a model, read one back, decode greedily, and time
//! decoding the way `llama-bench` does.
//!
//! ```text
//! # a checkpoint (or a Hugging Face GPT-2 directory) as GGUF, weights in f32, f16 or q8_0
//! cargo run --release --example gguf -- export --ckpt out/pretrain --out out/model.gguf --type f16
//! llama-cli -m out/model.gguf -p "ROMEO:" -n 50            # llama.cpp reads it
//! # a random GPT-2 124M with OpenAI's tokenizer (for timing)
//! cargo run --release --example gguf -- export --random-124m --out gpt2.gguf --type q8_0
//! # tinygpt reads any gpt2 GGUF back (its own, or llama.cpp's convert_hf_to_gguf.py output)
//! cargo run --release --example gguf -- greedy --model out/model.gguf --prompt-ids 1,2,3 -n 32
//! cargo run --release --example gguf -- bench --model gpt2.gguf     # pp16 and tg128 tokens/s
//! ```
//!
//! `greedy` prints one JSON line, `{"ids": [...]}`, the 32 (`-n`) greedy token ids after the
//! prompt ids, decoded by tinygpt from the GGUF's weights in their own type (Q8_0 by the 8-bit
//! kernels). `bench` prints llama-bench's two figures: prompt processing (`pp`: the prompt's
//! tokens in one forward pass, from an empty cache) and text generation (`tg`: tokens one at a
//! time from an empty cache), in tokens per second, the median of `--reps` runs.

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use tinygpt::candle::{Device, Tensor};
use tinygpt::sampler::TokenGenerator;
use tinygpt::{checkpoint, GgufType, Gpt, GptConfig, KvCache, SamplingParams, Tokenizer};

#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a model as a GGUF file (llama.cpp's gpt2 architecture).
    Export {
        /// A tinygpt checkpoint directory, or a Hugging Face GPT-2 directory.
        #[arg(long, required_unless_present = "random_124m")]
        ckpt: Option<PathBuf>,
        /// Instead of --ckpt: a randomly initialised GPT-2 124M with OpenAI's tokenizer.
        #[arg(long, conflicts_with = "ckpt")]
        random_124m: bool,
        /// Seed of --random-124m's weights.
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        /// Directory holding OpenAI's gpt2_encoder.json and gpt2_vocab.bpe (--random-124m).
        #[arg(long, value_name = "DIR", default_value = "data")]
        gpt2_files: PathBuf,
        /// The GGUF file to write (replaced if it exists, atomically).
        #[arg(long)]
        out: PathBuf,
        /// Type of the weight matrices: f32, f16 or q8_0 (vectors are f32).
        #[arg(long = "type", default_value = "f16")]
        dtype: GgufType,
    },
    /// Greedy token ids after the prompt ids, decoded by tinygpt from a GGUF file.
    Greedy {
        /// A gpt2 GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// Prompt token ids, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        prompt_ids: Vec<u32>,
        /// How many tokens to generate.
        #[arg(short, default_value_t = 32)]
        n: usize,
        /// Token ids never to pick (llama-server's `ignore_eos` bans its end-of-generation
        /// tokens the same way), comma-separated.
        #[arg(long, value_delimiter = ',')]
        ban_ids: Vec<u32>,
    },
    /// tinygpt's logits for a text from a GGUF file, for `scripts/reference.py check`:
    /// `input_ids` (2, T) (the text's ids by the GGUF's tokenizer, and them reversed) and
    /// `logits` (2, T, V) in FILE (safetensors), the text and its ids beside it (FILE with
    /// the extension `.json`).
    Logits {
        /// A gpt2 GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// The safetensors file to write.
        #[arg(long)]
        out: PathBuf,
        /// The text.
        #[arg(
            long,
            default_value = "First Citizen:\nBefore we proceed any further, hear me speak."
        )]
        text: String,
    },
    /// Tokens per second for a prompt (pp) and for generation (tg), as llama-bench reports.
    Bench {
        /// A gpt2 GGUF file.
        #[arg(long)]
        model: PathBuf,
        /// Prompt tokens processed in one pass (llama-bench -p).
        #[arg(long, default_value_t = 16)]
        pp: usize,
        /// Tokens generated one at a time (llama-bench -n).
        #[arg(long, default_value_t = 128)]
        tg: usize,
        /// Runs of each; the median is reported (llama-bench -r).
        #[arg(long, default_value_t = 5)]
        reps: usize,
    },
}

fn main() -> Result<()> {
    common::init();
    match Args::parse().command {
        Command::Export {
            ckpt,
            random_124m: _,
            seed,
            gpt2_files,
            out,
            dtype,
        } => {
            let (model, tokenizer) = match ckpt {
                Some(dir) => checkpoint::load_model(&dir, &Device::Cpu)
                    .with_context(|| format!("loading {}", dir.display()))?,
                None => {
                    let (vocab, merges) = common::data::gpt2_files(&gpt2_files)?;
                    let tokenizer = Tokenizer::from_gpt2_files(vocab, merges)
                        .context("--random-124m needs OpenAI's tokenizer files (--gpt2-files)")?;
                    let cfg = GptConfig::gpt2();
                    let init = Gpt::init(&cfg, seed, &Device::Cpu)?;
                    (Gpt::from_tensors(&cfg, init.tensors(), false)?, tokenizer)
                }
            };
            let t0 = Instant::now();
            tinygpt::save_gguf(&model, &tokenizer, &out, dtype)?;
            let bytes = std::fs::metadata(&out)?.len();
            let rows = model.config().vocab_size;
            let n = tokenizer.vocab_size();
            println!(
                "gguf: wrote {} ({dtype}, {:.1} MB, {:.1}M parameters, {n} tokens{}) in {:.2} s",
                out.display(),
                bytes as f64 / 1e6,
                model.config().num_parameters() as f64 / 1e6,
                if rows > n {
                    format!(" and {} unused rows", rows - n)
                } else {
                    String::new()
                },
                t0.elapsed().as_secs_f64()
            );
        }
        Command::Greedy {
            model,
            prompt_ids,
            n,
            ban_ids,
        } => {
            let gpt = Gpt::from_gguf(&model, &Device::Cpu)?;
            let (block, v) = (gpt.config().block_size, gpt.config().vocab_size);
            if prompt_ids.len() + n > block {
                bail!(
                    "{} prompt ids and {n} new tokens do not fit the model's context of {block} \
                     positions",
                    prompt_ids.len()
                );
            }
            if let Some(bad) = prompt_ids
                .iter()
                .chain(&ban_ids)
                .find(|&&id| id as usize >= v)
            {
                bail!("token id {bad} is outside the model's {v} rows");
            }
            let ids = if ban_ids.is_empty() {
                let params = SamplingParams::greedy().with_max_new_tokens(n);
                TokenGenerator::new(&gpt, &prompt_ids, &params)?
                    .collect::<tinygpt::Result<Vec<u32>>>()?
            } else {
                // The same greedy steps by hand, the banned ids' logits at -inf.
                let mut cache = KvCache::new(gpt.config().n_layer);
                let mut input =
                    Tensor::from_slice(&prompt_ids, (1, prompt_ids.len()), &Device::Cpu)?;
                let mut ids = Vec::new();
                while ids.len() < n {
                    let logits = gpt.forward_with_cache(&input, &mut cache)?; // (1, V)
                    let mut row = logits.flatten_all()?.to_vec1::<f32>()?;
                    for &b in &ban_ids {
                        if let Some(x) = row.get_mut(b as usize) {
                            *x = f32::NEG_INFINITY;
                        }
                    }
                    let id = argmax(&row);
                    ids.push(id);
                    input = Tensor::from_slice(&[id], (1, 1), &Device::Cpu)?;
                }
                ids
            };
            println!("{}", serde_json::json!({ "ids": ids }));
        }
        Command::Logits { model, out, text } => {
            let gpt = Gpt::from_gguf(&model, &Device::Cpu)?;
            let tokenizer = tinygpt::load_gguf_tokenizer(&model)?;
            let ids = tokenizer.encode(&text)?;
            if ids.is_empty() {
                bail!("--text is empty");
            }
            if tokenizer.decode(&ids)? != text {
                bail!(
                    "--text does not survive the GGUF's tokenizer (it decodes to {:?}): it has \
                     characters the vocabulary lacks",
                    tokenizer.decode(&ids)?
                );
            }
            if ids.len() > gpt.config().block_size {
                bail!(
                    "--text is {} tokens, more than the model's context of {}",
                    ids.len(),
                    gpt.config().block_size
                );
            }
            let reversed: Vec<u32> = ids.iter().rev().copied().collect();
            let t = ids.len();
            let batch: Vec<u32> = ids.iter().chain(&reversed).copied().collect();
            let input = Tensor::from_vec(batch, (2, t), &Device::Cpu)?;
            let logits = gpt.forward(&input)?; // (2, T, V)
            let tensors = std::collections::HashMap::from([
                (
                    "input_ids".to_string(),
                    input.to_dtype(tinygpt::candle::DType::I64)?,
                ),
                ("logits".to_string(), logits),
            ]);
            checkpoint::save_safetensors(&tensors, &out)?;
            std::fs::write(
                out.with_extension("json"),
                serde_json::json!({ "text": text, "ids": ids }).to_string(),
            )?;
            println!(
                "gguf: logits of {t} tokens (batch of 2) from {} in {}",
                model.display(),
                out.display()
            );
        }
        Command::Bench {
            model,
            pp,
            tg,
            reps,
        } => {
            if pp == 0 || tg == 0 || reps == 0 {
                bail!("--pp, --tg and --reps must be at least 1");
            }
            let gpt = Gpt::from_gguf(&model, &Device::Cpu)?;
            let cfg = gpt.config().clone();
            if pp > cfg.block_size || tg > cfg.block_size {
                bail!("--pp and --tg must fit the context of {}", cfg.block_size);
            }
            let v = cfg.vocab_size as u32;
            // Token ids as llama-bench draws them: arbitrary, the same for every run.
            let prompt: Vec<u32> = (0..pp as u32).map(|i| (i * 7919 + 13) % v).collect();
            let median = |mut xs: Vec<f64>| {
                xs.sort_by(f64::total_cmp);
                xs[xs.len() / 2]
            };
            let mut pp_s = Vec::new();
            let mut tg_s = Vec::new();
            for rep in 0..=reps {
                // pp: the whole prompt in one forward pass from an empty cache.
                let mut cache = KvCache::new(cfg.n_layer);
                let input = Tensor::from_slice(&prompt, (1, pp), &Device::Cpu)?;
                let t0 = Instant::now();
                let logits = gpt.forward_with_cache(&input, &mut cache)?;
                logits.flatten_all()?.to_vec1::<f32>()?;
                let pp_time = t0.elapsed().as_secs_f64();
                // tg: one token at a time from an empty cache.
                let mut cache = KvCache::new(cfg.n_layer);
                let mut id = prompt[0];
                let t0 = Instant::now();
                for _ in 0..tg {
                    let input = Tensor::from_slice(&[id], (1, 1), &Device::Cpu)?;
                    let logits = gpt.forward_with_cache(&input, &mut cache)?;
                    let row = logits.flatten_all()?.to_vec1::<f32>()?;
                    id = argmax(&row);
                }
                let tg_time = t0.elapsed().as_secs_f64();
                if rep > 0 {
                    // the first run warms caches and threads up, as llama-bench's warm-up run
                    pp_s.push(pp as f64 / pp_time);
                    tg_s.push(tg as f64 / tg_time);
                }
            }
            let name = model.display();
            let threads = tinygpt::threads::Threads::current().num_threads;
            println!(
                "{}",
                serde_json::json!({
                    "model": name.to_string(), "threads": threads,
                    "pp": pp, "pp_tokens_per_s": median(pp_s),
                    "tg": tg, "tg_tokens_per_s": median(tg_s),
                })
            );
        }
    }
    Ok(())
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}
