//! Export a model to Hugging Face format, for transformers and other tools: GPT-2's layout
//! (`GPT2LMHeadModel`) for a GPT-2, `LlamaForCausalLM`'s for a Llama-style model.
//!
//! ```text
//! cargo run --release --example hf_export -- --ckpt out/pretrain --out out/pretrain-hf
//! # then, in Python: transformers.GPT2LMHeadModel.from_pretrained("out/pretrain-hf")
//! ```
//!
//! With `--logits FILE` it also writes tinygpt's logits for a fixed text (`input_ids` (2, T)
//! and `logits` (2, T, V) in FILE, the text and its ids in FILE with a `.json` extension), which
//! `python scripts/reference.py check OUT --logits FILE` compares against transformers.
//!
//! A chat model's export carries its chat template (`tokenizer_config.json`'s
//! `chat_template`). With `--chat-ids FILE` it also writes tinygpt's prompt ids for a few fixed
//! conversations, which `python scripts/reference.py check-chat OUT --ids FILE` compares with
//! transformers' `apply_chat_template`. `--add-chat-tokens` adds the chat tokens first (as SFT
//! does), to export a model that has none yet with the template.

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tinygpt::candle::{DType, Device, Tensor};
use tinygpt::chat::Message;
use tinygpt::{checkpoint, ChatTemplate, Gpt, Tokenizer};

/// Write a tinygpt checkpoint (or a Hugging Face directory, re-saved) in Hugging Face layout
/// (GPT-2's, or LlamaForCausalLM's for a Llama-style model).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// A tinygpt checkpoint directory (config.json, model.safetensors, tokenizer.json), or a
    /// Hugging Face GPT-2 directory.
    #[arg(long, required_unless_present = "hf", conflicts_with = "hf")]
    ckpt: Option<PathBuf>,
    /// A Hugging Face GPT-2 directory, loaded by tinygpt and saved again (as --ckpt does).
    #[arg(long)]
    hf: Option<PathBuf>,
    /// Add the chat tokens (<|system|>, <|user|>, <|assistant|>, <|end|>) before exporting, as
    /// SFT does, so the export has the chat template (its replies mean nothing before SFT).
    #[arg(long)]
    add_chat_tokens: bool,
    /// Also write tinygpt's chat-template ids for fixed conversations here (JSON), for
    /// scripts/reference.py check-chat (needs a chat model, or --add-chat-tokens).
    #[arg(long)]
    chat_ids: Option<PathBuf>,
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
    let (model, tokenizer) = if args.add_chat_tokens {
        let (model, tokenizer, _) = tinygpt::sft::prepare_for_chat(&model, tokenizer)?;
        (model, tokenizer)
    } else {
        (model, tokenizer)
    };
    // Checked before anything is written.
    let chat_ids = match &args.chat_ids {
        Some(path) => Some((path, chat_ids(&tokenizer).context("--chat-ids")?)),
        None => None,
    };
    model.save_hf_dir_with_tokenizer(&args.out, &tokenizer)?;
    if let Some((path, json)) = chat_ids {
        std::fs::write(path, serde_json::to_string_pretty(&json)? + "\n")
            .with_context(|| format!("--chat-ids {}", path.display()))?;
    }

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
    let chat = if ChatTemplate::new(&tokenizer).is_ok() {
        ", with the chat template"
    } else {
        ""
    };
    println!(
        "hf_export: {} ({:.2}M parameters, vocab {}, bias {}) -> {} in Hugging Face {} layout{chat}{}{}",
        args.ckpt
            .as_ref()
            .or(args.hf.as_ref())
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        cfg.num_parameters() as f64 / 1e6,
        cfg.vocab_size,
        cfg.bias,
        args.out.display(),
        match cfg.arch {
            tinygpt::Arch::Gpt2 => "GPT-2",
            tinygpt::Arch::Llama => "LlamaForCausalLM",
        },
        args.logits
            .as_ref()
            .map(|p| format!(", logits in {}", p.display()))
            .unwrap_or_default(),
        args.chat_ids
            .as_ref()
            .map(|p| format!(", chat ids in {}", p.display()))
            .unwrap_or_default()
    );
    Ok(())
}

/// The conversations of `--chat-ids`: a system message and three turns, the same without the
/// system message, each rendered as a prompt (an open assistant turn), and a whole
/// conversation rendered for training. Ordinary text only: transformers reads a chat token
/// spelled in a message as the token, tinygpt as text.
fn chat_conversations() -> Vec<(Vec<Message>, bool)> {
    let system = Message::system("You are tinygpt, a small and friendly assistant.");
    let turns = vec![
        Message::user("Hi! Who are you?"),
        Message::assistant("I am tinygpt, a small language model trained from scratch."),
        Message::user("What is 7 + 5? Answer in one word,\n  please."),
    ];
    let with_system: Vec<Message> = std::iter::once(system).chain(turns.clone()).collect();
    let mut whole = with_system.clone();
    whole.push(Message::assistant("Twelve."));
    vec![(with_system, true), (turns, true), (whole, false)]
}

/// `{"conversations": [{"messages", "add_generation_prompt", "ids"}]}`: tinygpt's ids of
/// [`chat_conversations`] (`render_prompt` with the generation prompt, `render` without).
fn chat_ids(tokenizer: &Tokenizer) -> Result<serde_json::Value> {
    let template = ChatTemplate::new(tokenizer)?;
    let mut conversations = Vec::new();
    for (messages, add_generation_prompt) in chat_conversations() {
        let ids = if add_generation_prompt {
            template.render_prompt(tokenizer, &messages)?
        } else {
            template.render(tokenizer, &messages)?.ids
        };
        conversations.push(serde_json::json!({
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "ids": ids,
        }));
    }
    Ok(serde_json::json!({ "conversations": conversations }))
}
