//! A report card for checkpoints: bits per byte, GSM8K exact match, the turn-end rate,
//! reward-model pairwise accuracy and multiple choice, a column per checkpoint.
//!
//! ```text
//! cargo run --release --example eval -- --ckpt out/pretrain-bpe --ckpt out/sft \
//!     --text data/tinyshakespeare.txt --sft-data data/sft_gsm8k_test.jsonl \
//!     --choices tests/fixtures/eval_choices.jsonl -n 50 --json out/eval.json
//! cargo run --release --example eval -- --reward out/reward-hh \
//!     --pairs data/pref_hh_rlhf_harmless_test.jsonl --no-gsm8k
//! ```
//!
//! Every evaluation runs on `-n` held-out items drawn with `--seed`, so two checkpoints see
//! the same items. GSM8K and the turn-end rate need a chat model (one fine-tuned with `sft`);
//! for a pre-trained checkpoint they are skipped with a note.

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use tinygpt::chat::Message;
use tinygpt::eval::{self, ChoiceItem, EvalReport};
use tinygpt::rlhf::{load_preference_file, PreferencePair, RewardModel};
use tinygpt::sft::load_sft_file;
use tinygpt::train::TrainerState;
use tinygpt::{checkpoint, ChatTemplate, Gpt, SamplingParams, Split, TokenDataset, Tokenizer};

/// Evaluate checkpoints on held-out data and print a table: a row per metric, a column per
/// checkpoint.
#[derive(Debug, Parser)]
#[command(version, args_override_self = true)]
struct Args {
    /// Checkpoint directories to evaluate (repeatable, or several after one flag), or Hugging
    /// Face GPT-2 directories.
    #[arg(long, num_args = 1.., required_unless_present = "reward")]
    ckpt: Vec<PathBuf>,
    /// Text for bits per byte: evaluated on its last 10%, the held-out split pre-training
    /// keeps (for a checkpoint pre-trained on this file, the very split it held out).
    #[arg(long)]
    text: Option<PathBuf>,
    /// GSM8K questions (SFT JSONL: a user question, then the reference solution ending in
    /// `#### ANSWER`).
    #[arg(long, default_value = "data/sft_gsm8k_test.jsonl")]
    gsm8k: PathBuf,
    /// Skip GSM8K.
    #[arg(long)]
    no_gsm8k: bool,
    /// Held-out conversations (SFT JSONL) for the turn-end rate: how many replies end with
    /// <|end|> within --max-new-tokens.
    #[arg(long)]
    sft_data: Option<PathBuf>,
    /// Held-out preference pairs (JSONL) for the pairwise accuracy of each --reward model.
    #[arg(long, requires = "reward")]
    pairs: Option<PathBuf>,
    /// Reward-model checkpoints to score --pairs with (repeatable; a column each).
    #[arg(long, num_args = 1.., requires = "pairs")]
    reward: Vec<PathBuf>,
    /// Multiple-choice items (JSONL `{"question", "choices", "answer"}`, answer a 0-based index
    /// or the text of a choice).
    #[arg(long)]
    choices: Option<PathBuf>,
    /// Held-out items per evaluation (windows of text, questions, conversations, pairs).
    #[arg(short = 'n', long = "n", default_value_t = 100)]
    n: usize,
    /// Seed of the items drawn (and of sampled replies).
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// Tokens per reply at most (GSM8K and the turn-end rate).
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// Softmax temperature of replies; 0 = greedy, as nanochat evaluates.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Keep only the k most likely tokens when sampling (0 = off).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Where the reports go, as JSON.
    #[arg(long, default_value = "out/eval.json")]
    json: PathBuf,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// The share of the text the held-out split is (pre-training's, `TokenDataset` at 0.1).
const VAL_FRACTION: f64 = 0.1;

/// Everything read before any model is loaded, so a bad file stops the run at once.
struct Inputs {
    text: Option<PathBuf>,
    gsm8k: Option<(PathBuf, Vec<Vec<Message>>)>,
    sft: Option<(PathBuf, Vec<Vec<Message>>)>,
    pairs: Option<(PathBuf, Vec<PreferencePair>)>,
    choices: Option<(PathBuf, Vec<ChoiceItem>)>,
}

fn read_inputs(args: &Args) -> Result<Inputs> {
    let resolve = common::data::resolve_opt;
    let text = resolve("--text", args.text.as_deref())?;
    if let Some(p) = &text {
        tinygpt::data::read_text(p)?;
    }
    let gsm8k = if args.no_gsm8k || args.ckpt.is_empty() {
        None
    } else {
        let p = common::data::resolve("--gsm8k", &args.gsm8k)?;
        let convs = load_sft_file(&p, false)?.conversations;
        Some((p, convs))
    };
    let sft = resolve("--sft-data", args.sft_data.as_deref())?
        .map(|p| load_sft_file(&p, false).map(|d| (p, d.conversations)))
        .transpose()?;
    let pairs = resolve("--pairs", args.pairs.as_deref())?
        .map(|p| load_preference_file(&p, false).map(|d| (p, d.pairs)))
        .transpose()?;
    let choices = resolve("--choices", args.choices.as_deref())?
        .map(|p| eval::load_choice_file(&p).map(|items| (p, items)))
        .transpose()?;
    Ok(Inputs {
        text,
        gsm8k,
        sft,
        pairs,
        choices,
    })
}

/// Which held-out split of `text` a checkpoint's bits per byte is measured on, for the note.
fn split_note(ckpt: &Path, text: &Path) -> String {
    let recorded = TrainerState::load(ckpt).ok().and_then(|s| {
        let data = s.extra.get("data")?.as_str()?.to_string();
        (s.stage == tinygpt::Pretraining::STAGE).then_some(data)
    });
    match recorded {
        Some(data) if common::same_path(Path::new(&data), text) => format!(
            "bits per byte on the last 10% of {}, the split its pre-training held out",
            text.display()
        ),
        _ => format!(
            "bits per byte on the last 10% of {} (the checkpoint records no pre-training on it)",
            text.display()
        ),
    }
}

/// Runs `f`, saying on stderr what it does and how long it took.
fn timed<T>(what: String, f: impl FnOnce() -> tinygpt::Result<T>) -> Result<T> {
    eprint!("{what} … ");
    let t0 = Instant::now();
    let out = f();
    eprintln!("{:.1} s", t0.elapsed().as_secs_f64());
    out.with_context(|| what)
}

fn evaluate(
    args: &Args,
    inputs: &Inputs,
    params: &SamplingParams,
    ckpt: &Path,
    model: &Gpt,
    tokenizer: &Tokenizer,
) -> Result<EvalReport> {
    let name = ckpt.display().to_string();
    let (n, seed) = (args.n, args.seed);
    let mut report = EvalReport::new(&name, n, seed);
    let chat = ChatTemplate::new(tokenizer).is_ok();
    if let Some(text) = &inputs.text {
        let data = TokenDataset::from_file(text, tokenizer, VAL_FRACTION)
            .with_context(|| format!("{name}: tokenizing --text {}", text.display()))?;
        report.notes.push(split_note(ckpt, text));
        report.bpb = Some(timed(
            format!(
                "{name}: bits per byte on the last 10% of {}",
                text.display()
            ),
            || eval::bits_per_byte(model, tokenizer, data.tokens(Split::Val), n, seed),
        )?);
    }
    let not_chat = |what: &str| {
        format!("{what} skipped: not a chat model (no chat tokens; fine-tune it with sft)")
    };
    if let Some((file, convs)) = &inputs.gsm8k {
        if chat {
            report.gsm8k = Some(timed(
                format!("{name}: GSM8K on {}", file.display()),
                || eval::gsm8k_exact_match(model, tokenizer, convs, n, params, seed),
            )?);
        } else {
            report.notes.push(not_chat("GSM8K"));
        }
    }
    if let Some((file, convs)) = &inputs.sft {
        if chat {
            report.turn_end = Some(timed(
                format!("{name}: turn-end rate on {}", file.display()),
                || eval::turn_end_rate(model, tokenizer, convs, n, params, seed),
            )?);
        } else {
            report.notes.push(not_chat("turn-end rate"));
        }
    }
    if let Some((file, items)) = &inputs.choices {
        report.choices = Some(timed(
            format!("{name}: multiple choice on {}", file.display()),
            || eval::multiple_choice(model, tokenizer, items, n, seed),
        )?);
    }
    Ok(report)
}

fn main() -> Result<()> {
    common::init();
    let args = Args::parse();
    if args.n == 0 {
        bail!("-n 0: evaluate at least one held-out item per evaluation");
    }
    let params = SamplingParams::default()
        .with_max_new_tokens(args.max_new_tokens)
        .with_temperature(args.temperature)
        .with_top_k((args.top_k > 0).then_some(args.top_k))
        .with_seed(args.seed);
    if let Err(e) = params.validate() {
        bail!("sampling flags: {e}");
    }
    let device = common::device(&args.device)?;
    let started = Instant::now();
    let inputs = read_inputs(&args)?;
    if inputs.text.is_none()
        && inputs.gsm8k.is_none()
        && inputs.sft.is_none()
        && inputs.choices.is_none()
        && inputs.pairs.is_none()
    {
        bail!("nothing to evaluate: give --text, --sft-data, --choices or --pairs (or drop --no-gsm8k)");
    }

    let mut reports = Vec::new();
    for ckpt in &args.ckpt {
        let (model, tokenizer) = checkpoint::load_model(ckpt, &device)
            .with_context(|| format!("--ckpt {}", ckpt.display()))?;
        reports.push(evaluate(&args, &inputs, &params, ckpt, &model, &tokenizer)?);
    }
    if let Some((file, pairs)) = &inputs.pairs {
        for dir in &args.reward {
            let (model, tokenizer) = RewardModel::load(dir, &device)
                .with_context(|| format!("--reward {}", dir.display()))?;
            let name = dir.display().to_string();
            let mut report = EvalReport::new(&name, args.n, args.seed);
            report.reward = Some(timed(
                format!("{name}: reward pairs of {}", file.display()),
                || eval::reward_accuracy(&model, &tokenizer, pairs, args.n, args.seed),
            )?);
            reports.push(report);
        }
    }

    println!();
    print!("{}", eval::format_table(&reports));
    for r in &reports {
        for note in &r.notes {
            println!("note: {}: {note}", r.checkpoint);
        }
        if let Some(g) = &r.gsm8k {
            for ex in g.examples.iter().take(2) {
                println!(
                    "{}: GSM8K example: expected {}, got {} from {:?}",
                    r.checkpoint,
                    ex.expected,
                    ex.got.as_deref().unwrap_or("no number"),
                    ex.reply.chars().take(120).collect::<String>()
                );
            }
        }
    }
    if let Some(dir) = args.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--json: creating {}", dir.display()))?;
    }
    eval::write_json(&args.json, &reports)?;
    println!(
        "eval: {} in {:.1} s | n = {}, seed {} | JSON in {}",
        common::plural(reports.len(), "column"),
        started.elapsed().as_secs_f64(),
        args.n,
        args.seed,
        args.json.display()
    );
    Ok(())
}
