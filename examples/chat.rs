//! Talk to a chat checkpoint: an interactive REPL, or one answer with `--prompt`.
//!
//! ```text
//! cargo run --release --example chat -- --ckpt out/sft
//! cargo run --release --example chat -- --ckpt out/sft --prompt "What is 2 + 3?"
//! printf 'hi\nhow are you?\nbye\n' | cargo run --release --example chat -- --ckpt out/sft
//! ```
//! In the REPL: `/reset` forgets the conversation, `/system TEXT` sets the system message,
//! `/quit` (or end of input) leaves. Piped input gets one reply per line, each followed by a
//! line `<|end|>` (see `--help`).

#[path = "common/mod.rs"]
mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use tinygpt::{checkpoint, ChatSession};

/// Chat with a fine-tuned model.
///
/// On a terminal: a REPL (`/reset` forgets the conversation, `/system TEXT` sets the system
/// message, `/quit` or end of input leaves), with each reply's tokens/s on stderr.
///
/// Piped input (stdin not a terminal): one reply per line that is not empty and not a command.
/// On stdout each reply is followed by a line holding only `<|end|>` (a reply never contains
/// that text: replies end at any chat token, spelled or not), so a script splits the output on
/// "\n<|end|>\n"; command acknowledgements go to stderr. A line that is not valid UTF-8 is an
/// error naming its line number (on a terminal, a warning, and the line is skipped).
///
/// Replies leave out control characters other than newline and tab, and never show U+FFFD:
/// bytes that do not form valid UTF-8 are dropped. Totals (replies, tokens, tokens/s) go to
/// stderr at the end.
#[derive(Debug, Parser)]
#[command(version, args_override_self = true)]
struct Args {
    /// Checkpoint directory of a chat model (its tokenizer has the chat tokens).
    #[arg(long)]
    ckpt: PathBuf,
    /// Answer this one message and exit.
    #[arg(long)]
    prompt: Option<String>,
    /// System message.
    #[arg(long)]
    system: Option<String>,
    #[command(flatten)]
    sampling: common::SamplingArgs,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 1337)]
    seed: u64,
    /// cpu or cuda.
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() -> Result<()> {
    common::quiet_on_closed_pipe(run())
}

fn run() -> Result<()> {
    common::init();
    let args = Args::parse();
    let device = common::device(&args.device)?;
    let (model, tokenizer) = checkpoint::load_model(&args.ckpt, &device)?;
    if tinygpt::ChatTemplate::new(&tokenizer).is_err() {
        anyhow::bail!(
            "{} is not a chat model (its tokenizer has no chat tokens): fine-tune it for chat \
             with the sft example first, or sample from it with the generate example",
            args.ckpt.display()
        );
    }
    let mut session = ChatSession::new(&model, &tokenizer, args.sampling.params(args.seed))?;
    session.set_system(args.system.clone());
    let interactive = args.prompt.is_none() && std::io::stdin().is_terminal();
    let mut stats = Stats::default();
    if let Some(prompt) = &args.prompt {
        reply(&mut session, prompt, &mut stats, false)?;
        eprintln!("chat: {}", stats.summary());
        return Ok(());
    }
    let mut stdout = std::io::stdout();
    // Acknowledgements of commands: on stdout in the REPL, on stderr for piped input, whose
    // stdout holds replies only.
    let say = |text: &str| -> Result<()> {
        if interactive {
            writeln!(std::io::stdout(), "{text}")?;
        } else {
            eprintln!("{text}");
        }
        Ok(())
    };
    if interactive {
        writeln!(
            stdout,
            "chatting with {} (/reset, /system TEXT, /quit)",
            args.ckpt.display()
        )?;
    }
    let mut stdin = std::io::stdin().lock();
    let mut bytes = Vec::new();
    let mut number = 0usize;
    loop {
        if interactive {
            write!(stdout, "> ")?;
            stdout.flush()?;
        }
        bytes.clear();
        if stdin.read_until(b'\n', &mut bytes)? == 0 {
            break;
        }
        number += 1;
        let line = match std::str::from_utf8(&bytes) {
            Ok(line) => line,
            Err(e) => {
                let why = format!(
                    "stdin line {number} is not valid UTF-8 (byte {} of the line)",
                    e.valid_up_to() + 1
                );
                if interactive {
                    eprintln!("warning: {why}; skipped");
                    continue;
                }
                anyhow::bail!("{why}; pipe UTF-8 text, one message a line");
            }
        };
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                session.reset();
                say("(conversation cleared)")?;
            }
            _ if line == "/system" || line.starts_with("/system ") => {
                let text = line["/system".len()..].trim();
                session.set_system((!text.is_empty()).then(|| text.to_string()));
                say(&format!(
                    "(system message {})",
                    if text.is_empty() { "cleared" } else { "set" }
                ))?;
            }
            _ if line.starts_with('/') => {
                say(&format!(
                    "(commands: /reset, /system TEXT, /quit; {line} is not one)"
                ))?;
            }
            _ => reply(&mut session, line, &mut stats, !interactive)?,
        }
    }
    eprintln!("chat: {}", stats.summary());
    Ok(())
}

/// What the replies of a run took.
#[derive(Debug, Default)]
struct Stats {
    replies: usize,
    tokens: usize,
    seconds: f64,
}

impl Stats {
    /// "2 replies, 40 tokens in 1.2 s (33.3 tokens/s)".
    fn summary(&self) -> String {
        format!(
            "{} repl{}, {}",
            self.replies,
            if self.replies == 1 { "y" } else { "ies" },
            rate(self.tokens, self.seconds)
        )
    }
}

/// "40 tokens in 1.2 s (33.3 tokens/s)".
fn rate(tokens: usize, seconds: f64) -> String {
    format!(
        "{tokens} token{} in {seconds:.1} s ({:.1} tokens/s)",
        if tokens == 1 { "" } else { "s" },
        tokens as f64 / seconds.max(1e-9)
    )
}

/// Streams the reply to `text` to stdout, then a newline and, for piped input (`delimit`), the
/// line `<|end|>`; on a terminal its tokens/s follow on stderr.
///
/// Written with `write!`, not `print!`, so a closed pipe (`chat … | head`) ends the program
/// with an error (which `quiet_on_closed_pipe` turns into a quiet exit) instead of a panic.
fn reply(session: &mut ChatSession, text: &str, stats: &mut Stats, delimit: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut failed = None;
    let t0 = std::time::Instant::now();
    session.send(text, |piece| {
        if failed.is_none() {
            failed = write!(out, "{piece}").and_then(|_| out.flush()).err();
        }
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    if let Some(e) = failed {
        return Err(e.into());
    }
    writeln!(out)?;
    if delimit {
        writeln!(out, "{}", tinygpt::chat::END)?;
    }
    out.flush()?;
    let tokens = session.last_reply().map_or(0, |r| r.generated_tokens);
    stats.replies += 1;
    stats.tokens += tokens;
    stats.seconds += seconds;
    if std::io::stderr().is_terminal() && std::io::stdin().is_terminal() {
        let per_s = tokens as f64 / seconds.max(1e-9);
        eprintln!(
            "({tokens} token{}, {per_s:.1} tokens/s)",
            if tokens == 1 { "" } else { "s" }
        );
    }
    Ok(())
}
