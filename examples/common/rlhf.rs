//! Pieces the preference examples (`reward`, `dpo`, `ppo`, `rule_task`) share.

use std::path::PathBuf;

use anyhow::{bail, Result};
use tinygpt::rlhf::{load_preference_file, PreferenceDataset, PreferencePair};
use tinygpt::{ChatTemplate, Tokenizer};

/// The data settings a preference run records in `trainer_state.json`'s `extra` (they are not
/// training settings, so not in its `train_config`): `max_response_tokens` and
/// `skip_bad_lines`, each the flag's value when given, else the resumed run's (`recorded`),
/// else the default (`block_size / 2`, off).
pub fn data_settings(
    max_response_tokens: Option<usize>,
    skip_bad_lines: bool,
    recorded: Option<&serde_json::Value>,
    block_size: usize,
) -> (usize, bool) {
    let max_response = max_response_tokens
        .or(recorded.and_then(|e| e["max_response_tokens"].as_u64().map(|n| n as usize)))
        .unwrap_or(block_size / 2);
    let recorded_skip = recorded.is_some_and(|e| e["skip_bad_lines"].as_bool() == Some(true));
    if recorded_skip && !skip_bad_lines {
        println!("skipping bad records, as the run did (--skip-bad-lines)");
    }
    (max_response, skip_bad_lines || recorded_skip)
}

/// Reads preference files, printing what was skipped.
pub fn read_pairs(paths: &[PathBuf], skip_bad: bool) -> Result<Vec<PreferencePair>> {
    let mut all = Vec::new();
    for p in paths {
        let data = load_preference_file(p, skip_bad)?;
        if let Some(first) = data.skipped.first() {
            println!(
                "{}: skipped {} malformed records, first: {first}",
                p.display(),
                data.skipped.len()
            );
        }
        all.extend(data.pairs);
    }
    Ok(all)
}

/// Training and held-out pairs, rendered and fitted to `block_size`: the held-out pairs come
/// from `held_out`'s file, or a seeded fraction of `train`.
pub fn datasets(
    train: &[PathBuf],
    held_out: &tinygpt::data::HeldOut,
    skip_bad: bool,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    block_size: usize,
    max_response_tokens: usize,
) -> Result<(PreferenceDataset, PreferenceDataset)> {
    let pairs = read_pairs(train, skip_bad)?;
    let (all, fit) =
        PreferenceDataset::new(&pairs, tokenizer, template, block_size, max_response_tokens)?;
    println!(
        "data: {} pairs fitted to {block_size} tokens (replies at most {max_response_tokens}): \
         {} whole, {} cut, {} dropped",
        pairs.len(),
        fit.kept,
        fit.truncated,
        fit.dropped
    );
    let (train, val) = match held_out.file() {
        Some(v) => {
            let pairs = read_pairs(&[v.to_path_buf()], skip_bad)?;
            let (val, fit) = PreferenceDataset::new(
                &pairs,
                tokenizer,
                template,
                block_size,
                max_response_tokens,
            )?;
            println!(
                "held-out: {} pairs: {} whole, {} cut, {} dropped",
                pairs.len(),
                fit.kept,
                fit.truncated,
                fit.dropped
            );
            (all, val)
        }
        None => all.split(held_out.val_fraction(), 1337),
    };
    if train.is_empty() {
        bail!("no training pair fits the context of {block_size} tokens");
    }
    println!(
        "split: {} train / {} held-out pairs",
        train.len(),
        val.len()
    );
    Ok((train, val))
}

/// `--data` paths recorded in a run's `trainer_state.json`, as strings.
pub fn paths_json(paths: &[PathBuf]) -> serde_json::Value {
    serde_json::Value::Array(
        paths
            .iter()
            .map(|p| serde_json::Value::String(p.display().to_string()))
            .collect(),
    )
}

/// Paths back from [`paths_json`].
pub fn paths_from_json(v: Option<&serde_json::Value>) -> Vec<PathBuf> {
    v.and_then(|v| v.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(PathBuf::from))
                .collect()
        })
        .unwrap_or_default()
}
