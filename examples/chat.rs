//! Talk to a chat checkpoint: an interactive REPL, or one answer with `--prompt`.
//!
//! ```text
//! cargo run --release --example chat -- --ckpt out/sft
//! cargo run --release --example chat -- --ckpt out/sft --prompt "What is 2 + 3?"
//! printf 'hi\nhow are you?\nbye\n' | cargo run --release --example chat -- --ckpt out/sft
//! ```
//! In the REPL: `/reset` forgets the conversation, `/system TEXT` sets the system message,
//! `/quit` (or end of input) leaves.

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
#[derive(Debug, Parser)]
#[command(version)]
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
    let started = std::time::Instant::now();
    let mut turns = 0usize;
    // Written with `write!`, not `print!`, so a closed pipe (`chat … | head`) ends the
    // program with an error instead of a panic.
    let mut reply = |session: &mut ChatSession, text: &str| -> Result<()> {
        let mut out = std::io::stdout().lock();
        let mut failed = None;
        session.send(text, |piece| {
            if failed.is_none() {
                failed = write!(out, "{piece}").and_then(|_| out.flush()).err();
            }
        })?;
        if let Some(e) = failed {
            return Err(e.into());
        }
        writeln!(out)?;
        turns += 1;
        Ok(())
    };
    let mut stdout = std::io::stdout();

    if let Some(prompt) = &args.prompt {
        reply(&mut session, prompt)?;
        eprintln!("chat: 1 reply in {:.1} s", started.elapsed().as_secs_f64());
        return Ok(());
    }
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        writeln!(
            stdout,
            "chatting with {} (/reset, /system TEXT, /quit)",
            args.ckpt.display()
        )?;
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            write!(stdout, "> ")?;
            stdout.flush()?;
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim();
        match line {
            "" => continue,
            "/quit" | "/exit" => break,
            "/reset" => {
                session.reset();
                writeln!(stdout, "(conversation cleared)")?;
            }
            _ if line == "/system" || line.starts_with("/system ") => {
                let text = line["/system".len()..].trim();
                session.set_system((!text.is_empty()).then(|| text.to_string()));
                writeln!(
                    stdout,
                    "(system message {})",
                    if text.is_empty() { "cleared" } else { "set" }
                )?;
            }
            _ if line.starts_with('/') => {
                writeln!(
                    stdout,
                    "(commands: /reset, /system TEXT, /quit; {line} is not one)"
                )?;
            }
            _ => reply(&mut session, line)?,
        }
    }
    eprintln!(
        "chat: {turns} replies in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
