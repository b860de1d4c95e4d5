//! Fetches the public data files into `data/` (or `--dir`) up front, each checked against its
//! pinned sha256; the examples fetch the ones they need on first use anyway. It tries every
//! requested file, lists all that failed at the end, and then exits non-zero.
//!
//! ```sh
//! cargo run --release --example fetch_data                      # every file
//! cargo run --release --example fetch_data -- sft_identity.jsonl --list
//! ```

mod common;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Parser;

use common::data;

/// Fetch the public data files (Tiny Shakespeare, GSM8K, Alpaca demos, HH-RLHF, GPT-2's
/// tokenizer, …) from their pinned upstream commits, converted and checked.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Files to fetch [default: all].
    names: Vec<String>,
    /// Where to put them.
    #[arg(long, default_value = "data")]
    dir: PathBuf,
    /// List the files, their sources and sha256, and fetch nothing.
    #[arg(long)]
    list: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    // Try every file, then report all that failed (one failure does not stop the rest).
    let mut failed: Vec<(&str, anyhow::Error)> = Vec::new();
    let chosen: Vec<&data::Dataset> = if args.names.is_empty() {
        data::DATASETS.iter().collect()
    } else {
        let mut chosen = Vec::new();
        for name in &args.names {
            match data::known(name) {
                Some(d) => chosen.push(d),
                None => {
                    let e = anyhow::anyhow!(
                        "not a known data file (known: {})",
                        data::DATASETS
                            .iter()
                            .map(|d| d.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    eprintln!("{name}: FAILED: {e:#}");
                    failed.push((name.as_str(), e));
                }
            }
        }
        chosen
    };
    for d in chosen {
        if args.list {
            println!(
                "{}\n  {}\n  {}\n  sha256 {}",
                d.name, d.about, d.url, d.sha256
            );
            continue;
        }
        match data::resolve("fetch_data", &args.dir.join(d.name)) {
            Ok(path) => println!("{}: {}", d.name, path.display()),
            Err(e) => {
                eprintln!("{}: FAILED: {e:#}", d.name);
                failed.push((d.name, e));
            }
        }
    }
    if !failed.is_empty() {
        eprintln!("\n{} file(s) failed:", failed.len());
        for (name, e) in &failed {
            eprintln!("  {name}: {e:#}");
        }
        bail!(
            "{} requested file(s) could not be fetched (listed above)",
            failed.len()
        );
    }
    Ok(())
}
