//! The report card every training example ends with ([`tinygpt::report`]): the run's plots
//! beside its `metrics.jsonl` ([`super::plot`]) and its section appended to `OUT/report.md`.
//!
//! A stage example (a new one too, e.g. `grpo` or `eval`), after `common::train`:
//!
//! ```ignore
//! let first_step = trainer.step(); // before common::train
//! // ... train ...
//! let mut card = common::report::card("GRPO", &out, model.config(), &cfg, &summary, first_step, started);
//! card.facts.push(("pass@1".into(), "42%".into()));            // the stage's own results
//! card.samples = common::report::chat_samples(&model, &tokenizer, &prompts, &params, args.report.report_samples);
//! common::report::write_stage(&args.report, &out, &trainer, "grpo", card);
//! ```
//!
//! with `#[command(flatten)] report: common::report::ReportArgs` among the example's flags.
//! `write_stage` draws `loss.png` (and `reward.png`, `kl.png`, `accuracy.png` when the
//! evaluation rows have `reward_mean`, `kl`, `accuracy`), fills the card's evaluations from the
//! run's newest `metrics.jsonl`, and appends the section; a failure there is a warning, never
//! the run's failure (its checkpoints are written by then).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use tinygpt::chat::{reply_text, Message, Rendered, Role};
use tinygpt::checkpoint::files;
use tinygpt::report::{self, RunCard};
use tinygpt::sft::ReplyStats;
use tinygpt::train::TrainSummary;
use tinygpt::{ChatTemplate, Gpt, GptConfig, SamplingParams, Tokenizer, TrainConfig, Trainer};

/// The report flags of a training example.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ReportArgs {
    /// Samples of the trained model to put in OUT/report.md (0 = none).
    #[arg(long, default_value_t = 2)]
    pub report_samples: usize,
    /// Write no OUT/report.md and no plots.
    #[arg(long)]
    pub no_report: bool,
}

/// A card for the run that trained into `out`: the settings in force, the summary, where it
/// started (a resumed run's first step), and the wall time since `started`.
pub fn card(
    title: &str,
    out: &Path,
    model: &GptConfig,
    cfg: &TrainConfig,
    summary: &TrainSummary,
    first_step: usize,
    started: Instant,
) -> RunCard {
    let mut card = RunCard::new(title, model, cfg, summary);
    card.dir = Some(out.to_path_buf());
    card.first_step = first_step;
    card.wall_s = Some(started.elapsed().as_secs_f64());
    card
}

/// The run's newest `metrics.jsonl`: that of its newest state on disk (it holds every row up
/// to the end of the run), else `out`'s.
pub fn metrics_path(out: &Path, trainer: &Trainer) -> PathBuf {
    trainer
        .last_saved()
        .map(|(_, dir)| dir.join(files::METRICS))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| out.join(files::METRICS))
}

/// Draws the run's plots into `out`, fills `card`'s evaluations and images from the newest
/// metrics, and appends its section to `out/report.md`; says where in one line. Returns the
/// finished card (for a whole-story report), or `None` when there is no report (`--no-report`,
/// no `out` directory, or an error, printed as a warning).
pub fn write_stage(
    args: &ReportArgs,
    out: &Path,
    trainer: &Trainer,
    stage: &str,
    card: RunCard,
) -> Option<RunCard> {
    if args.no_report {
        return None;
    }
    match try_write_stage(out, &metrics_path(out, trainer), stage, card) {
        Ok(card) => Some(card),
        Err(e) => {
            eprintln!("warning: no report written: {e:#}");
            None
        }
    }
}

/// [`write_stage`] with the metrics file named, its errors returned.
pub fn try_write_stage(
    out: &Path,
    metrics: &Path,
    stage: &str,
    mut card: RunCard,
) -> Result<RunCard> {
    if !out.is_dir() {
        anyhow::bail!(
            "{} is not a directory (no checkpoint was written)",
            out.display()
        );
    }
    if metrics.is_file() {
        card.evals = report::read_metrics(metrics)?;
        card.images = super::plot::write_run_plots(metrics, out, stage)?;
    }
    let path = out.join(report::REPORT_FILE);
    card.section()?.append_to(&path)?;
    let plots: Vec<&str> = card.images.iter().map(|(_, f)| f.as_str()).collect();
    println!(
        "report: {}{}",
        path.display(),
        if plots.is_empty() {
            String::new()
        } else {
            format!(" (plots: {})", plots.join(", "))
        }
    );
    Ok(card)
}

/// `card` with its images' paths under `prefix` (a stage's card in a report one directory up).
pub fn with_image_prefix(card: &RunCard, prefix: &str) -> RunCard {
    let mut card = card.clone();
    for (_, path) in &mut card.images {
        *path = format!("{prefix}{path}");
    }
    card
}

/// Replies of `model` to the first `n` of `conversations` (each up to its last assistant
/// message, or whole if it has none: a prompt), sampled with `params` and stopped at
/// `<|end|>`, as `role: text` lines. A failure becomes the sample's text.
pub fn chat_samples(
    model: &Gpt,
    tokenizer: &Tokenizer,
    conversations: &[Vec<Message>],
    params: &SamplingParams,
    n: usize,
) -> Vec<String> {
    conversations
        .iter()
        .take(n)
        .map(|conv| match chat_sample(model, tokenizer, conv, params) {
            Ok(s) => s,
            Err(e) => format!("(no sample: {e:#})"),
        })
        .collect()
}

fn chat_sample(
    model: &Gpt,
    tokenizer: &Tokenizer,
    conv: &[Message],
    params: &SamplingParams,
) -> Result<String> {
    let template = ChatTemplate::new(tokenizer)?;
    let prompt = match conv.iter().rposition(|m| m.role == Role::Assistant) {
        Some(last) => &conv[..last],
        None => conv,
    };
    let ids = template.render_prompt(tokenizer, prompt)?;
    let reply = reply_to(model, tokenizer, &ids, params)?;
    let mut lines: Vec<String> = prompt
        .iter()
        .map(|m| format!("{}: {}", role_name(m.role), m.content.trim()))
        .collect();
    lines.push(format!("assistant: {}", reply.trim()));
    Ok(lines.join("\n"))
}

/// Replies of `model` to the first `n` of `prompts` (rendered chat prompts ending in an open
/// `<|assistant|>`, e.g. a preference pair's), shown as the prompt's text (control tokens
/// included) and the reply.
pub fn prompt_samples(
    model: &Gpt,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
    n: usize,
) -> Vec<String> {
    prompts
        .iter()
        .take(n)
        .map(|ids| {
            let sample = || -> Result<String> {
                let reply = reply_to(model, tokenizer, ids, params)?;
                // A prompt cut from the left to fit can start inside a character.
                let prompt = tokenizer.decode(ids)?;
                let cut = prompt.trim_start_matches('\u{fffd}');
                let mark = if cut.len() < prompt.len() { "…" } else { "" };
                Ok(format!(
                    "prompt: {mark}{}\nreply: {}",
                    cut.trim(),
                    reply.trim()
                ))
            };
            sample().unwrap_or_else(|e| format!("(no sample: {e:#})"))
        })
        .collect()
}

/// The prompt of the last assistant turn of each rendered conversation (its tokens up to
/// the `<|assistant|>` that opens that turn): the held-out prompts of an SFT dataset.
pub fn last_turn_prompts(examples: &[Rendered]) -> Vec<Vec<u32>> {
    examples
        .iter()
        .filter_map(|ex| {
            // The start of the last run of 1s in the mask.
            let last = ex.mask.iter().rposition(|&m| m == 1)?;
            let start = ex.mask[..=last].iter().rposition(|&m| m == 0)? + 1;
            Some(ex.ids[..start].to_vec())
        })
        .collect()
}

/// How `model`'s replies to `prompts` (rendered, as [`last_turn_prompts`]) end:
/// [`tinygpt::sft::reply_stats`] on token ids.
pub fn prompt_reply_stats(
    model: &Gpt,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    params: &SamplingParams,
) -> Result<ReplyStats> {
    let template = ChatTemplate::new(tokenizer)?;
    let params = params.clone().with_stop_tokens(vec![template.end_id()]);
    let mut stats = ReplyStats::default();
    let mut tokens = 0;
    for ids in prompts {
        let mut generator = tinygpt::sampler::TokenGenerator::new(model, ids, &params)?
            .with_vocab_limit(tokenizer.vocab_size());
        for id in generator.by_ref() {
            id?;
        }
        stats.prompts += 1;
        tokens += generator.generated().len();
        if generator.finish_reason() == Some(tinygpt::sampler::FinishReason::Stop) {
            stats.ended += 1;
        }
    }
    stats.mean_tokens = tokens as f64 / stats.prompts.max(1) as f64;
    Ok(stats)
}

/// The reply `model` samples after the prompt `ids` with `params`, stopped at `<|end|>`, as
/// text without control tokens.
fn reply_to(
    model: &Gpt,
    tokenizer: &Tokenizer,
    ids: &[u32],
    params: &SamplingParams,
) -> Result<String> {
    let template = ChatTemplate::new(tokenizer)?;
    let params = params.clone().with_stop_tokens(vec![template.end_id()]);
    let mut generator = tinygpt::sampler::TokenGenerator::new(model, ids, &params)?
        .with_vocab_limit(tokenizer.vocab_size());
    for id in generator.by_ref() {
        id?;
    }
    Ok(reply_text(tokenizer, generator.generated())?)
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

/// The sampling settings of the report's samples where an example has no sampling flags:
/// temperature 0.8, top-k 50, `max_new_tokens`, `seed`.
pub fn sample_params(max_new_tokens: usize, seed: u64) -> SamplingParams {
    SamplingParams::default()
        .with_temperature(0.8)
        .with_top_k(Some(50))
        .with_max_new_tokens(max_new_tokens)
        .with_seed(seed)
}
