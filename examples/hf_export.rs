//! Export a model to Hugging Face GPT-2 format, for transformers and other tools.
//!
//! ```text
//! cargo run --release --example hf_export -- --ckpt out/pretrain --out out/pretrain-hf
//! # then, in Python: transformers.GPT2LMHeadModel.from_pretrained("out/pretrain-hf")
//! ```
//!
//! With `--logits FILE` it also writes tinygpt's logits for a fixed text (`input_ids` (2, T)
//! and `logits` (2, T, V) in FILE, the text and its ids in FILE with a `.json` extension), which
//! `python scripts/reference.py check OUT --logits FILE` compares against transformers.

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;
use tinygpt::candle::{DType, Device, Tensor};
use tinygpt::{checkpoint, Gpt};

/// Write a tinygpt checkpoint (or a Hugging Face directory, re-saved) in Hugging Face GPT-2
/// layout.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// A tinygpt checkpoint directory (config.json, model.safetensors, tokenizer.json).
    #[arg(long, required_unless_present = "hf", conflicts_with = "hf")]
    ckpt: Option<PathBuf>,
    /// Or a Hugging Face GPT-2 directory, loaded by tinygpt and saved again.
    #[arg(long)]
    hf: Option<PathBuf>,
    /// Output directory (config.json, model.safetensors, tokenizer.json, tokenizer_config.json);
    /// must be new or empty.
    #[arg(long)]
    out: PathBuf,
    /// Write into --out even if it is not empty (its files of the same names are replaced).
    #[arg(long)]
    overwrite: bool,
    /// Also write tinygpt's logits for --text here (safetensors), for scripts/reference.py check.
    #[arg(long)]
    logits: Option<PathBuf>,
    /// The text whose logits --logits writes (a batch of two: its ids, and them reversed).
    #[arg(
        long,
        default_value = "First Citizen:\nBefore we proceed any further, hear me speak."
    )]
    text: String,
}

fn main() -> Result<()> {
    common::init();
    let args = Args::parse();
    let device = Device::Cpu;
    let non_empty = std::fs::read_dir(&args.out).is_ok_and(|mut d| d.next().is_some());
    if non_empty && !args.overwrite {
        bail!(
            "{} is not empty (a checkpoint there would lose its config.json to the Hugging Face \
             one): choose a new --out, or pass --overwrite",
            args.out.display()
        );
    }
    let (model, tokenizer) = match (&args.ckpt, &args.hf) {
        (Some(ckpt), _) => checkpoint::load_model(ckpt, &device)?,
        (None, Some(hf)) => Gpt::from_hf_dir_with_tokenizer(hf, &device)?,
        (None, None) => bail!("give --ckpt or --hf"),
    };
    model.save_hf_dir_with_tokenizer(&args.out, &tokenizer)?;

    if let Some(path) = &args.logits {
        let mut ids = tokenizer.encode(&args.text)?;
        ids.truncate(model.config().block_size);
        if ids.is_empty() {
            bail!("--text encodes to no tokens");
        }
        let reversed: Vec<u32> = ids.iter().rev().copied().collect();
        let t = ids.len();
        let input = Tensor::from_vec([ids.clone(), reversed].concat(), (2, t), &device)?;
        let logits = model.forward(&input)?; // (2, T, V)
        let tensors = HashMap::from([
            ("input_ids".to_string(), input.to_dtype(DType::I64)?),
            ("logits".to_string(), logits.to_dtype(DType::F32)?),
        ]);
        checkpoint::save_safetensors(&tensors, path)?;
        let meta = serde_json::json!({ "text": args.text, "ids": ids });
        std::fs::write(path.with_extension("json"), meta.to_string())?;
    }
    let cfg = model.config();
    println!(
        "hf_export: {} ({:.2}M parameters, vocab {}, bias {}) -> {} in Hugging Face GPT-2 layout{}",
        args.ckpt
            .as_ref()
            .or(args.hf.as_ref())
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        cfg.num_parameters() as f64 / 1e6,
        cfg.vocab_size,
        cfg.bias,
        args.out.display(),
        args.logits
            .as_ref()
            .map(|p| format!(", logits in {}", p.display()))
            .unwrap_or_default()
    );
    Ok(())
}
