//! Pre-train a GPT on raw text: nanoGPT's `shakespeare_char` CPU recipe by default.
//!
//! ```text
//! cargo run --release --example pretrain                          # downloads Tiny Shakespeare
//! cargo run --release --example pretrain -- --data data/tinyshakespeare.txt
//! cargo run --release --example pretrain -- --tokenizer bpe --vocab-size 2048
//! cargo run --release --example pretrain -- --resume out/pretrain  # continue a run
//! ```
//!
//! Ctrl-C (or SIGTERM) stops after the step in progress and saves the state in
//! `OUT/checkpoint-STEP`; `--resume OUT` continues from it.

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use tinygpt::{
    checkpoint, data, sampler, Gpt, GptConfig, Objective, Pretraining, SamplingParams,
    TokenDataset, Tokenizer, TrainConfig, Trainer,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TokenizerChoice {
    /// One token per character (nanoGPT's shakespeare_char).
    Char,
    /// Byte-level BPE trained on the corpus (GPT-2 style).
    Bpe,
}

/// Pre-train a GPT on a text file: nanoGPT's CPU recipe for shakespeare_char by default.
///
/// Model flags (--tokenizer … --bias) describe a new model; with --resume the saved model is
/// continued and they must not be given. Training flags given with --resume override the saved
/// ones (each change is printed). Ctrl-C or SIGTERM stops after the current step, saves the
/// state (OUT/checkpoint-STEP) and prints the command that continues.
#[derive(Debug, Parser)]
#[command(version, args_override_self = true)]
struct Args {
    /// UTF-8 text to train on [default: Tiny Shakespeare, downloaded into data/].
    #[arg(long)]
    data: Option<PathBuf>,
    /// Checkpoint directory, holding the best-validation-loss checkpoint and the latest states
    /// (OUT/checkpoint-STEP) [default: out/pretrain, or the --resume directory].
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run saved in this directory (an earlier --out), from its newest state: the
    /// best checkpoint or a later OUT/checkpoint-STEP (an interrupt, the end of the run); or
    /// from the OUT/checkpoint-STEP named.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Tokenizer to train on the corpus [default: char].
    #[arg(long, value_enum)]
    tokenizer: Option<TokenizerChoice>,
    /// Vocabulary size of the BPE tokenizer, <|endoftext|> included [default: 2048].
    #[arg(long)]
    vocab_size: Option<usize>,
    /// The architecture: gpt2 (learned positions, LayerNorm, GELU) or llama (RoPE, RMSNorm,
    /// SwiGLU, grouped-query attention; defaults GptConfig::llama_tiny: 4 query and 2
    /// key/value heads, SwiGLU 384, the same parameters as gpt2's but its position table).
    #[arg(long, value_enum, default_value = "gpt2")]
    arch: ArchChoice,
    /// Transformer blocks [default: 4].
    #[arg(long)]
    n_layer: Option<usize>,
    /// Key/value heads for grouped-query attention (llama); must divide --n-head [default: 2
    /// for llama].
    #[arg(long)]
    n_kv_head: Option<usize>,
    /// Width of the SwiGLU hidden layer (llama) [default: 384 at --n-embd 128, else 8C/3].
    #[arg(long)]
    intermediate_size: Option<usize>,
    /// RoPE base (llama) [default: 10000].
    #[arg(long)]
    rope_theta: Option<f64>,
    /// Attention heads per block; must divide --n-embd [default: 4].
    #[arg(long)]
    n_head: Option<usize>,
    /// Width of the residual stream [default: 128].
    #[arg(long)]
    n_embd: Option<usize>,
    /// Context length in tokens [default: 64].
    #[arg(long)]
    block_size: Option<usize>,
    /// Dropout probability in training [default: 0].
    #[arg(long, allow_negative_numbers = true)]
    dropout: Option<f32>,
    /// Biases in projections and LayerNorms [default: false, as nanoGPT; GPT-2 has them].
    #[arg(long)]
    bias: Option<bool>,
    #[command(flatten)]
    train: common::TrainArgs,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Characters of sample text printed at the end (0 = none); the report card shows it too.
    #[arg(long, default_value_t = 500)]
    sample_chars: usize,
    #[command(flatten)]
    report: common::report::ReportArgs,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum ArchChoice {
    Gpt2,
    Llama,
}

impl TokenizerChoice {
    fn name(self) -> &'static str {
        match self {
            TokenizerChoice::Char => "char",
            TokenizerChoice::Bpe => "byte-level BPE",
        }
    }
}

fn tokenizer_kind_name(t: &Tokenizer) -> &'static str {
    match t.kind() {
        tinygpt::tokenizer::TokenizerKind::Char => "char",
        tinygpt::tokenizer::TokenizerKind::ByteLevelBpe => "bpe",
        _ => "other",
    }
}

fn main() -> Result<()> {
    common::init();
    let stop = common::Stop::install()?;
    let args = Args::parse();
    let device = common::device(&args.device)?;
    let started = Instant::now();

    // 1. Data, tokenizer and model: fresh, or from the checkpoint to resume.
    let resume = args
        .resume
        .as_deref()
        .map(|dir| common::resume(dir, Pretraining::STAGE))
        .transpose()?;
    let (model, tokenizer, train_cfg, data_path, out) = match &resume {
        Some(resume) => {
            let dir = &resume.run;
            let model_flags = [
                ("--tokenizer", args.tokenizer.is_some()),
                ("--vocab-size", args.vocab_size.is_some()),
                ("--n-layer", args.n_layer.is_some()),
                ("--n-kv-head", args.n_kv_head.is_some()),
                ("--intermediate-size", args.intermediate_size.is_some()),
                ("--rope-theta", args.rope_theta.is_some()),
                ("--n-head", args.n_head.is_some()),
                ("--n-embd", args.n_embd.is_some()),
                ("--block-size", args.block_size.is_some()),
                ("--dropout", args.dropout.is_some()),
                ("--bias", args.bias.is_some()),
            ];
            let given: Vec<&str> = model_flags.iter().filter(|f| f.1).map(|f| f.0).collect();
            if !given.is_empty() {
                bail!(
                    "{} only {} to a new model; --resume continues the model saved in {}",
                    given.join(", "),
                    if given.len() == 1 { "applies" } else { "apply" },
                    dir.display()
                );
            }
            let state = &resume.state;
            let data_path = match (&args.data, state.extra.get("data").and_then(|d| d.as_str())) {
                (Some(p), _) => common::data::resolve("--data", p)?,
                (None, Some(p)) => common::data::resolve("--data (recorded)", Path::new(p))?,
                (None, None) => bail!("{}: no data path recorded; pass --data", dir.display()),
            };
            let (model, tokenizer) = checkpoint::load_trainable(&resume.dir, &device)?;
            let cfg = args.train.apply(state.train_config.clone());
            let out = args.out.clone().unwrap_or_else(|| dir.clone());
            common::fresh_out_dir(
                &out,
                Some(Pretraining::STAGE),
                Some(dir),
                args.train.overwrite,
            )?;
            (model, tokenizer, cfg, data_path, out)
        }
        None => {
            let data_path = common::corpus(args.data.as_deref())?;
            let out = args
                .out
                .clone()
                .unwrap_or_else(|| PathBuf::from("out/pretrain"));
            common::fresh_out_dir(&out, Some(Pretraining::STAGE), None, args.train.overwrite)?;
            let text = data::read_text(&data_path)?;
            let t0 = Instant::now();
            let choice = args.tokenizer.unwrap_or(TokenizerChoice::Char);
            let tokenizer = match choice {
                TokenizerChoice::Char => Tokenizer::train_char(&text)?,
                TokenizerChoice::Bpe => {
                    Tokenizer::train_bpe(&text, args.vocab_size.unwrap_or(2048))?
                }
            };
            println!(
                "tokenizer: {}, {} tokens in the vocabulary ({:.1} s)",
                choice.name(),
                tokenizer.vocab_size(),
                t0.elapsed().as_secs_f64()
            );
            if let (TokenizerChoice::Bpe, Some(asked)) = (choice, args.vocab_size) {
                if tokenizer.vocab_size() < asked {
                    println!("(the corpus ran out of pairs to merge before {asked} tokens)");
                }
            }
            // Rows for the four chat tokens are reserved now, so that fine-tuning for chat later
            // adds them without growing the model: rows that are never a target learn to be
            // improbable, and the model's loss on plain text stays exactly what it was.
            let reserved = tinygpt::ChatTemplate::SPECIAL_TOKENS.len();
            let vocab_size = tokenizer.vocab_size() + reserved;
            let base = match args.arch {
                ArchChoice::Gpt2 => GptConfig::shakespeare_char_cpu(vocab_size),
                ArchChoice::Llama => GptConfig::llama_tiny(vocab_size),
            };
            if matches!(args.arch, ArchChoice::Gpt2) {
                for (flag, given) in [
                    ("--n-kv-head", args.n_kv_head.is_some()),
                    ("--intermediate-size", args.intermediate_size.is_some()),
                    ("--rope-theta", args.rope_theta.is_some()),
                ] {
                    if given {
                        bail!("{flag} is a Llama setting: add --arch llama");
                    }
                }
            }
            let n_embd = args.n_embd.unwrap_or(base.n_embd);
            let cfg = GptConfig {
                vocab_size,
                block_size: args.block_size.unwrap_or(base.block_size),
                n_layer: args.n_layer.unwrap_or(base.n_layer),
                n_head: args.n_head.unwrap_or(base.n_head),
                n_embd,
                dropout: args.dropout.unwrap_or(0.0),
                bias: args.bias.unwrap_or(false),
                n_kv_head: args.n_kv_head.or(base.n_kv_head),
                // The preset's SwiGLU width belongs to its width; another --n-embd gets 8C/3.
                intermediate_size: args
                    .intermediate_size
                    .or(base.intermediate_size.filter(|_| n_embd == base.n_embd)),
                rope_theta: args.rope_theta.unwrap_or(base.rope_theta),
                ..base
            };
            cfg.validate()?;
            let train_cfg = args.train.apply(TrainConfig::default());
            let model = Gpt::init(&cfg, train_cfg.seed, &device)?;
            (model, tokenizer, train_cfg, data_path, out)
        }
    };
    let cfg = model.config().clone();
    let dataset = TokenDataset::from_file(&data_path, &tokenizer, 0.1)
        .with_context(|| format!("preparing {}", data_path.display()))?;
    // Bytes of the held-out text, for the report's bits per byte.
    let val_tokens = dataset.tokens(tinygpt::Split::Val);
    let val_bytes = tokenizer.decode(val_tokens).map(|t| t.len()).unwrap_or(0);
    let val_tokens = val_tokens.len();
    println!(
        "data: {} ({} train / {} val tokens)",
        data_path.display(),
        dataset.tokens(tinygpt::Split::Train).len(),
        dataset.tokens(tinygpt::Split::Val).len()
    );
    println!(
        "model: {} {} layers, {} heads{}, {} wide, context {}, {:.2}M parameters",
        cfg.arch,
        cfg.n_layer,
        cfg.n_head,
        match cfg.n_kv_head {
            Some(k) => format!(" ({k} key/value)"),
            None => String::new(),
        },
        cfg.n_embd,
        cfg.block_size,
        cfg.num_parameters() as f64 / 1e6
    );

    // 2. Train.
    let mut objective = Pretraining::new(model, tokenizer, dataset, train_cfg.batch_size)?;
    let extra = serde_json::json!({
        "data": data_path.display().to_string(),
        "tokenizer": tokenizer_kind_name(objective.tokenizer()),
    });
    common::announce(&train_cfg)?;
    let mut trainer = Trainer::new(train_cfg.clone(), objective.parameters()?)?
        .with_out_dir(&out)
        .with_extra(extra)
        .with_stop_flag(stop.flag());
    if let Some(resume) = &resume {
        trainer = common::resume_trainer(trainer, resume, &train_cfg, "--max-iters")?;
    }
    let first_step = trainer.step();
    let progress = common::Progress::new(train_cfg.max_iters, first_step);
    let mut again = common::device_flag(&args.device);
    if args.sample_chars != 500 {
        again.extend(["--sample-chars".into(), args.sample_chars.to_string()]);
    }
    let summary = common::train(
        &mut trainer,
        &mut objective,
        &stop,
        &progress,
        |_| {},
        &common::continue_with("pretrain", &out, &again),
    )?;
    let resumed = resume.as_ref().map(|r| r.run.as_path());
    let holds = common::holds_run_checkpoint(&out, progress.saved(), resumed);

    // 3. A sample from the best checkpoint, then the report and the summary.
    let mut sample = String::new();
    if args.sample_chars > 0 && holds {
        let (model, tokenizer) = checkpoint::load_model(&out, &device)?;
        let params = SamplingParams::default()
            .with_temperature(0.8)
            .with_top_k(200)
            .with_max_new_tokens(args.sample_chars)
            .with_seed(train_cfg.seed);
        println!("--- sample ---");
        let mut chars = 0;
        let mut stdout = std::io::stdout();
        for piece in sampler::generate(&model, &tokenizer, "\n", &params)? {
            let piece = piece?;
            let room = args.sample_chars - chars;
            let piece: String = piece.chars().take(room).collect();
            chars += piece.chars().count();
            print!("{piece}");
            sample.push_str(&piece);
            stdout.flush()?;
            if chars >= args.sample_chars {
                break;
            }
        }
        println!("\n--------------");
    }

    // 4. The report card: OUT/report.md and the plots beside metrics.jsonl.
    let mut card = common::report::card(
        "Pre-training",
        &out,
        &cfg,
        &train_cfg,
        &summary,
        first_step,
        started,
    );
    card.bits_per_byte = summary
        .best_val_loss
        .and_then(|l| tinygpt::report::bpb_from_loss(l, val_tokens, val_bytes));
    card.facts.push((
        "data".into(),
        format!(
            "{} ({} tokenizer, {} tokens in the vocabulary)",
            data_path.display(),
            tokenizer_kind_name(objective.tokenizer()),
            objective.tokenizer().vocab_size()
        ),
    ));
    if !sample.is_empty() && args.report.report_samples > 0 {
        card.samples.push(sample);
    }
    common::report::write_stage(&args.report, &out, &trainer, Pretraining::STAGE, card);
    println!(
        "pretrain: best val loss {} | {} steps | {:.1} s training in all | {:.1} s wall this run | {} tokens/s | {}",
        summary.best_val_loss.map(|v| format!("{v:.4}")).unwrap_or_else(|| "n/a".into()),
        summary.steps,
        summary.elapsed_s,
        started.elapsed().as_secs_f64(),
        common::human(summary.tokens_per_sec),
        common::checkpoint_note(&out, holds, &trainer)
    );
    Ok(())
}
