//! Checkpoint directories: what a training run leaves behind, and how it is read back.
//!
//! ```text
//! DIR/config.json            GptConfig
//! DIR/model.safetensors      weights, Hugging Face GPT-2 names and layout
//! DIR/tokenizer.json         Hugging Face tokenizer
//! DIR/optimizer.safetensors  AdamW moments, `{param}.exp_avg` / `{param}.exp_avg_sq`
//! DIR/trainer_state.json     step, best val loss, RNG state, stage, training config
//! DIR/metrics.jsonl          one JSON object per evaluation (`"kind": "eval"`) and per
//!                            `log_interval` steps (`"kind": "train"`)
//! DIR/manifest.json          size and CRC-32 of every file above but the metrics
//! DIR/checkpoint-STEP/       the latest states (same files): end of run, interrupt, every
//!                            `save_interval` steps; the newest `keep_last` are kept
//! DIR/report.md, DIR/*.png   the run's report card and its plots ([`crate::report`]),
//!                            written after training; each new checkpoint carries them over
//! ```
//!
//! `DIR` itself is the best checkpoint (lowest validation loss), the one to sample from or
//! fine-tune; a run continues from the newest state, `DIR` or one of its `checkpoint-STEP`
//! ([`latest_state`]).
//!
//! # Crash safety
//! A checkpoint is written into a temporary sibling directory, its files and the directory
//! fsynced, and then swapped with the old one in one atomic step (Linux `renameat2`
//! `RENAME_EXCHANGE`; elsewhere two renames, which the next run repairs if a crash falls
//! between them), so whatever instant the process dies the path holds the old complete
//! checkpoint or the new complete one. The manifest lets every load check that: a file whose
//! size or checksum differs is named ([`verify`]). Only one process writes a directory at a
//! time (a lock file beside it, [`crate::Trainer::fit`] takes it), and the run that owns it
//! removes what a killed run left behind ([`clean_stale`]). `metrics.jsonl` is a log that
//! grows after its checkpoint is written, so the manifest leaves it out.
//!
//! Wherever a model is read ([`load_model`], [`load_trainable`], and so every `--ckpt`,
//! `--base` and `--sft` of the examples), a Hugging Face GPT-2 directory serves as well
//! ([`crate::hf::is_hf_dir`]: `config.json` a `GPT2Config`, `model.safetensors`, and
//! `tokenizer.json` or `vocab.json` + `merges.txt`), e.g. OpenAI's `gpt2` to fine-tune, or a
//! model tinygpt exported.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::durable::{self, parent_of};
use crate::model::{check_tensors, Gpt, GptConfig};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// File names inside a checkpoint directory.
pub mod files {
    /// The model's [`crate::GptConfig`].
    pub const CONFIG: &str = "config.json";
    /// The weights.
    pub const MODEL: &str = "model.safetensors";
    /// The tokenizer.
    pub const TOKENIZER: &str = "tokenizer.json";
    /// The optimiser's moments.
    pub const OPTIMIZER: &str = "optimizer.safetensors";
    /// The trainer's state.
    pub const TRAINER_STATE: &str = "trainer_state.json";
    /// Evaluation metrics, one JSON object per line.
    pub const METRICS: &str = "metrics.jsonl";
    /// Sizes and checksums of the other files ([`super::Manifest`]).
    pub const MANIFEST: &str = "manifest.json";
    /// Prefix of the latest-state subdirectories, `checkpoint-STEP`.
    pub const STATE_PREFIX: &str = "checkpoint-";
    /// The run's report card ([`crate::report`]).
    pub const REPORT: &str = "report.md";

    /// Whether `name` is one of the report's files: [`REPORT`] and its images (`*.png`). They
    /// are not checkpoint files (the manifest leaves them out: the report grows after its
    /// checkpoint, as the metrics do), but a checkpoint directory may hold them, and a new
    /// checkpoint carries them over, as it does the latest states.
    pub fn is_report_file(name: &str) -> bool {
        name == REPORT || (name.ends_with(".png") && !name.starts_with('.'))
    }
    /// The files every checkpoint the [`crate::Trainer`] writes holds, whatever the stage: the
    /// model files of [`crate::Objective::save`] and the trainer's own. A directory holding all
    /// of them is a checkpoint directory ([`super::is_checkpoint_dir`]), which a new checkpoint
    /// may replace; any other existing path is refused.
    pub const REQUIRED: [&str; 5] = [CONFIG, MODEL, TOKENIZER, OPTIMIZER, TRAINER_STATE];
    /// Every file a checkpoint of any stage may hold: [`REQUIRED`], the metrics, and what the
    /// RLHF stages add (the reward and value heads, PPO's and GRPO's states). A checkpoint
    /// directory holding anything else is refused as a target before training (see [`super::CheckpointWriter::preflight`]): replacing the
    /// directory would lose it.
    pub const KNOWN: [&str; 11] = [
        CONFIG,
        MODEL,
        TOKENIZER,
        OPTIMIZER,
        TRAINER_STATE,
        METRICS,
        MANIFEST,
        crate::rlhf::RewardModel::HEAD_FILE,
        crate::rlhf::Ppo::VALUE_HEAD_FILE,
        crate::rlhf::Ppo::STATE_FILE,
        crate::rlhf::Grpo::STATE_FILE,
    ];
}

/// Whether `dir` is a checkpoint directory: a directory holding every file of
/// [`files::REQUIRED`].
pub fn is_checkpoint_dir(dir: impl AsRef<Path>) -> bool {
    let dir = dir.as_ref();
    dir.is_dir() && files::REQUIRED.iter().all(|f| dir.join(f).is_file())
}

/// What a checkpoint path holds before checkpoints are written to it (see
/// [`CheckpointWriter::preflight`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// Nothing: the first checkpoint creates it.
    Absent,
    /// An empty directory.
    Empty,
    /// A checkpoint directory ([`is_checkpoint_dir`]), which the first new checkpoint replaces.
    Checkpoint,
}

/// What is at `target` now, or why a checkpoint must not replace it: a file (or anything but
/// a directory), a non-empty directory that is not a checkpoint, or a path below a file.
fn inspect_target(target: &Path) -> Result<Target> {
    if let Some(file) = target.ancestors().skip(1).find(|a| a.is_file()) {
        return Err(Error::checkpoint(
            target,
            format!("{} is a file, not a directory", file.display()),
        ));
    }
    let meta = match std::fs::symlink_metadata(target) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Target::Absent),
        Err(e) => return Err(Error::io(target, e)),
    };
    if !meta.is_dir() {
        return Err(Error::checkpoint(
            target,
            "exists and is not a directory; a checkpoint would replace it, so it is left \
             alone: choose another path",
        ));
    }
    let mut names = Vec::new();
    for entry in std::fs::read_dir(target).map_err(|e| Error::io(target, e))? {
        let entry = entry.map_err(|e| Error::io(target, e))?;
        names.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
        ));
    }
    if names.is_empty() {
        return Ok(Target::Empty);
    }
    let has_states = names
        .iter()
        .any(|(n, p)| state_step(n).is_some() && p.is_dir());
    if is_checkpoint_dir(target) || has_states {
        for (name, path) in &names {
            let known = files::KNOWN.contains(&name.as_str())
                || (state_step(name).is_some() && path.is_dir())
                || (files::is_report_file(name) && path.is_file())
                || is_leftover(name);
            if !known {
                return Err(Error::checkpoint(
                    target,
                    format!(
                        "holds {name}, which is not a checkpoint file: a new checkpoint \
                         replaces the directory whole, so move it elsewhere first"
                    ),
                ));
            }
        }
        Ok(Target::Checkpoint)
    } else {
        Err(Error::checkpoint(
            target,
            format!(
                "exists, is not empty and is not a checkpoint directory (which holds {}); a \
                 checkpoint would replace it whole, so it is left alone: choose a new or empty \
                 directory",
                files::REQUIRED.join(", ")
            ),
        ))
    }
}

/// The report's files in `dir` ([`files::is_report_file`]); none if `dir` is not a directory.
fn report_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v = Vec::new();
    if !dir.is_dir() {
        return Ok(v);
    }
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        if files::is_report_file(&entry.file_name().to_string_lossy()) && path.is_file() {
            v.push(path);
        }
    }
    v.sort();
    Ok(v)
}

/// The step of a latest-state directory name, `checkpoint-STEP`.
fn state_step(name: &str) -> Option<usize> {
    let digits = name.strip_prefix(files::STATE_PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether `name` is what an interrupted write leaves inside a checkpoint directory: a
/// temporary or old latest state (`.checkpoint-STEP.tmp-PID`, `.checkpoint-STEP.old-PID`) or
/// a half-written file (`.NAME.tmp-PID`).
fn is_leftover(name: &str) -> bool {
    name.starts_with('.') && (name.contains(".tmp-") || name.contains(".old-"))
}

/// A checkpoint manifest (`manifest.json`): the size and CRC-32 of every file of the
/// checkpoint but `metrics.jsonl`, written last, before the directory is swapped into place.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Format version, 1.
    pub format: u32,
    /// File name → what it held when written.
    pub files: BTreeMap<String, ManifestEntry>,
}

/// One file of a [`Manifest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    /// Size in bytes.
    pub bytes: u64,
    /// CRC-32 (IEEE, as zlib and gzip compute it) of the contents, 8 hex digits.
    pub crc32: String,
}

/// Largest manifest read (a manifest of ten files is under 1 kB).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// Size and CRC-32 of a file, read in 1 MiB pieces.
fn file_entry(path: &Path) -> Result<ManifestEntry> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        bytes += n as u64;
        hasher.update(buf.get(..n).unwrap_or_default());
    }
    Ok(ManifestEntry {
        bytes,
        crc32: format!("{:08x}", hasher.finalize()),
    })
}

/// Writes `DIR/manifest.json` over the regular files in `dir` (not `metrics.jsonl`, not
/// hidden files, not subdirectories).
fn write_manifest(dir: &Path) -> Result<()> {
    let mut manifest = Manifest {
        format: 1,
        files: BTreeMap::new(),
    };
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name == files::METRICS
            || name == files::MANIFEST
            || files::is_report_file(&name)
            || name.starts_with('.')
        {
            continue;
        }
        if path.is_file() {
            manifest.files.insert(name, file_entry(&path)?);
        }
    }
    let path = dir.join(files::MANIFEST);
    let json = serde_json::to_string_pretty(&manifest)
        .map_err(|e| Error::bad_file(&path, None, e.to_string()))?;
    std::fs::write(&path, json + "\n").map_err(|e| Error::io(&path, e))
}

/// Checks a checkpoint directory against its manifest: every file it lists is there with the
/// size and checksum it had when the checkpoint was written. `Ok(false)` for a directory
/// without a manifest (checkpoints of tinygpt before 0.12, Hugging Face directories): nothing
/// to check.
///
/// # Errors
/// [`Error::Checkpoint`] naming the file that is missing or differs, with both sizes or
/// checksums; [`Error::BadFile`] for a malformed manifest.
pub fn verify(dir: impl AsRef<Path>) -> Result<bool> {
    verify_only(dir.as_ref(), None)
}

/// [`verify`], for the files in `only` (all the manifest lists when `None`): a load that
/// reads some of a checkpoint's files checks those.
pub(crate) fn verify_only(dir: &Path, only: Option<&[&str]>) -> Result<bool> {
    let path = dir.join(files::MANIFEST);
    if !path.is_file() {
        return Ok(false);
    }
    let size = std::fs::metadata(&path)
        .map_err(|e| Error::io(&path, e))?
        .len();
    if size > MAX_MANIFEST_BYTES {
        return Err(Error::bad_file(
            &path,
            None,
            format!("{size} bytes, more than a manifest holds ({MAX_MANIFEST_BYTES})"),
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| Error::json(&path, None, &e))?;
    if manifest.format != 1 {
        return Err(Error::bad_file(
            &path,
            None,
            format!("format {} (this tinygpt reads format 1)", manifest.format),
        ));
    }
    for (name, want) in &manifest.files {
        if only.is_some_and(|o| !o.contains(&name.as_str())) {
            continue;
        }
        if name.contains('/') || name.contains('\\') || name.starts_with('.') {
            return Err(Error::bad_file(
                &path,
                None,
                format!("lists {name:?}, which is not a file name in the directory"),
            ));
        }
        let file = dir.join(name);
        if !file.is_file() {
            return Err(Error::checkpoint(
                dir,
                format!("missing {name}, which its manifest lists"),
            ));
        }
        let got = file_entry(&file)?;
        if got.bytes != want.bytes {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "{name} is {} bytes, its manifest says {}: the file was changed or damaged \
                     after the checkpoint was written",
                    got.bytes, want.bytes
                ),
            ));
        }
        if got.crc32 != want.crc32 {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "{name} has CRC-32 {}, its manifest says {}: the file was changed or \
                     damaged after the checkpoint was written",
                    got.crc32, want.crc32
                ),
            ));
        }
    }
    Ok(true)
}

/// The latest states under `dir` (its `checkpoint-STEP` subdirectories), oldest first.
///
/// # Errors
/// [`Error::Io`] if `dir` cannot be listed.
pub fn state_dirs(dir: impl AsRef<Path>) -> Result<Vec<(usize, PathBuf)>> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut states = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        if let Some(step) = state_step(&entry.file_name().to_string_lossy()) {
            if entry.path().is_dir() {
                states.push((step, entry.path()));
            }
        }
    }
    states.sort();
    Ok(states)
}

/// The directory a run saved in `dir` continues from: the newest of `dir` itself (the best
/// checkpoint) and its latest states `dir/checkpoint-STEP`, by the step in their
/// `trainer_state.json`. A state newer than the best one is what was trained after it (an
/// interrupt, the end of a run whose last evaluation did not improve), so resuming from it
/// loses none of those steps. Each candidate is checked against its manifest.
///
/// # Errors
/// [`Error::Checkpoint`] if `dir` holds no checkpoint, or if the newest state does not match
/// its manifest (naming the file; remove that state to continue from the one before).
pub fn latest_state(dir: impl AsRef<Path>) -> Result<PathBuf> {
    let dir = dir.as_ref();
    let mut best: Option<(usize, PathBuf)> = None;
    if is_checkpoint_dir(dir) {
        let step = crate::train::TrainerState::load(dir)?.step;
        best = Some((step, dir.to_path_buf()));
    }
    for (step, path) in state_dirs(dir)? {
        if !is_checkpoint_dir(&path) {
            continue;
        }
        let step = crate::train::TrainerState::load(&path)
            .map(|s| s.step)
            .unwrap_or(step);
        if best.as_ref().is_none_or(|(s, _)| step > *s) {
            best = Some((step, path));
        }
    }
    match best {
        Some((_, path)) => {
            verify(&path).map_err(|e| match e {
                Error::Checkpoint { path: p, msg } => Error::Checkpoint {
                    path: p.clone(),
                    msg: format!(
                        "{msg}; it is the newest state of {}: remove {} to continue from the \
                         state before it",
                        dir.display(),
                        p.display()
                    ),
                },
                e => e,
            })?;
            Ok(path)
        }
        None => Err(Error::checkpoint(
            dir,
            format!(
                "holds no checkpoint to continue (neither the files {} nor a {}STEP \
                 subdirectory holding them)",
                files::REQUIRED.join(", "),
                files::STATE_PREFIX
            ),
        )),
    }
}

/// Removes what a killed run left beside and inside the checkpoint directory `target`
/// (temporary `.NAME.tmp-PID` and old `.NAME.old-PID` directories, and the same for its
/// latest states), after putting back what belongs in it: an old checkpoint whose
/// replacement never arrived (a crash between the two renames where the system cannot swap
/// directories), or latest states a crash left in a temporary directory. Call it only while
/// holding the directory's lock ([`crate::Trainer::fit`] does): then nothing else is writing
/// there. Returns the paths removed.
///
/// # Errors
/// [`Error::Io`] naming a path that could not be moved or removed.
pub fn clean_stale(target: impl AsRef<Path>) -> Result<Vec<PathBuf>> {
    let target = resolve_link(target.as_ref())?;
    let name = match target.file_name() {
        Some(n) => n.to_string_lossy().into_owned(),
        None => return Ok(Vec::new()),
    };
    let parent = parent_of(&target);
    let mut removed = Vec::new();
    let leftovers = |dir: &Path, prefix: &str| -> Result<Vec<PathBuf>> {
        let mut v = Vec::new();
        if !dir.is_dir() {
            return Ok(v);
        }
        for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
            let entry = entry.map_err(|e| Error::io(dir, e))?;
            let n = entry.file_name().to_string_lossy().into_owned();
            if let Some(rest) = n.strip_prefix(prefix) {
                if rest.starts_with(".tmp-") || rest.starts_with(".old-") {
                    v.push(entry.path());
                }
            }
        }
        v.sort();
        Ok(v)
    };
    let mine = leftovers(&parent, &format!(".{name}"))?;
    // 1. A checkpoint moved aside whose replacement never arrived: put it back.
    if !target.exists() {
        if let Some(old) = mine.iter().find(|p| {
            p.to_string_lossy().contains(".old-") && is_checkpoint_dir(p) && verify(p).is_ok()
        }) {
            std::fs::rename(old, &target).map_err(|e| Error::io(old, e))?;
            durable::sync_dir(&parent)?;
        }
    }
    for left in mine {
        if !left.exists() {
            continue;
        }
        // 2. Latest states a crash left in the temporary directory (they are moved into the
        // new checkpoint just before the swap): back into the checkpoint.
        if target.is_dir() {
            for (step, state) in state_dirs(&left)? {
                let home = target.join(format!("{}{step}", files::STATE_PREFIX));
                if !home.exists() {
                    std::fs::rename(&state, &home).map_err(|e| Error::io(&state, e))?;
                }
            }
            // The report's files, likewise.
            for report in report_files(&left)? {
                if let Some(name) = report.file_name() {
                    let home = target.join(name);
                    if !home.exists() {
                        std::fs::rename(&report, &home).map_err(|e| Error::io(&report, e))?;
                    }
                }
            }
            durable::sync_dir(&target)?;
        }
        remove_path(&left)?;
        removed.push(left);
    }
    if target.is_dir() {
        for entry in std::fs::read_dir(&target).map_err(|e| Error::io(&target, e))? {
            let entry = entry.map_err(|e| Error::io(&target, e))?;
            if is_leftover(&entry.file_name().to_string_lossy()) {
                remove_path(&entry.path())?;
                removed.push(entry.path());
            }
        }
    }
    Ok(removed)
}

/// Removes a file or a directory tree.
fn remove_path(path: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        std::fs::remove_dir_all(path).map_err(|e| Error::io(path, e))
    } else {
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))
    }
}

/// Keeps the newest `keep_last` latest states of `dir` (and none newer than `newest`, which
/// belong to a run this one replaced); each removed state is first renamed to a hidden name,
/// so a crash while deleting never leaves a partial state under a state's name.
///
/// # Errors
/// [`Error::Io`] naming the state that could not be removed.
pub(crate) fn prune_states(dir: &Path, keep_last: usize, newest: usize) -> Result<()> {
    let states = state_dirs(dir)?;
    let (valid, future): (Vec<_>, Vec<_>) = states.into_iter().partition(|(s, _)| *s <= newest);
    let drop_n = valid.len().saturating_sub(keep_last);
    for (step, path) in future.iter().chain(valid.iter().take(drop_n)) {
        let hidden = dir.join(format!(
            ".{}{step}.old-{}",
            files::STATE_PREFIX,
            std::process::id()
        ));
        std::fs::rename(path, &hidden).map_err(|e| Error::io(path, e))?;
        durable::sync_dir(dir)?;
        remove_path(&hidden)?;
    }
    Ok(())
}

/// Refuses to start a checkpoint of `needed` bytes at `target` when the file system has less
/// free space (with a margin of 1%), naming both.
///
/// # Errors
/// [`Error::Checkpoint`] naming `target`, the bytes needed and the bytes free.
pub(crate) fn check_space(target: &Path, needed: u64) -> Result<()> {
    let Some(free) = durable::free_bytes(&parent_of(target)) else {
        return Ok(());
    };
    let needed = needed + needed / 100;
    if free < needed {
        return Err(Error::checkpoint(
            target,
            format!(
                "a checkpoint needs {} ({needed} bytes) and the file system holding it has {} \
                 free: free some space or choose another output directory (the previous \
                 checkpoint is untouched)",
                durable::human_bytes(needed),
                durable::human_bytes(free)
            ),
        ));
    }
    Ok(())
}

/// Loads the model and tokenizer of a checkpoint directory for inference (constant weights,
/// no autograd graph).
///
/// A Hugging Face GPT-2 directory ([`crate::hf::is_hf_dir`]) loads through
/// [`Gpt::from_hf_dir_with_tokenizer`] (f32 weights); one tinygpt exported from a chat model
/// keeps its chat tokens, so it loads as a chat model.
///
/// # Errors
/// [`Error::Checkpoint`] if `dir` or one of its files is missing (naming the file, and what
/// either layout holds when `config.json` is) or the tokenizer does not fit the model;
/// [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming the tensor; file errors naming
/// the file (a truncated safetensors file is an error, not a panic); for a Hugging Face
/// directory, the errors of [`Gpt::from_hf_dir_with_tokenizer`].
pub fn load_model(dir: impl AsRef<Path>, device: &Device) -> Result<(Gpt, Tokenizer)> {
    load(dir.as_ref(), device, false)
}

/// As [`load_model`], with every weight a trainable candle `Var` (for fine-tuning or resuming).
///
/// # Errors
/// As [`load_model`].
pub fn load_trainable(dir: impl AsRef<Path>, device: &Device) -> Result<(Gpt, Tokenizer)> {
    load(dir.as_ref(), device, true)
}

fn load(dir: &Path, device: &Device, trainable: bool) -> Result<(Gpt, Tokenizer)> {
    if !dir.is_dir() {
        return Err(Error::checkpoint(
            dir,
            "not a directory (or does not exist)",
        ));
    }
    if !dir.join(files::CONFIG).is_file() {
        if let Some((step, state)) = state_dirs(dir)?.pop() {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "holds no best checkpoint yet, only the latest state of step {step} in {} \
                     (the run stopped before an evaluation improved): load that directory, \
                     or continue the run",
                    state.display()
                ),
            ));
        }
        return Err(Error::checkpoint(
            dir,
            format!(
                "missing {} (a tinygpt checkpoint holds {}, {}, {}; a Hugging Face GPT-2 \
                 directory {}, {} and {} or {} + {})",
                files::CONFIG,
                files::CONFIG,
                files::MODEL,
                files::TOKENIZER,
                crate::hf::files::CONFIG,
                crate::hf::files::MODEL,
                crate::hf::files::TOKENIZER,
                crate::hf::files::VOCAB,
                crate::hf::files::MERGES,
            ),
        ));
    }
    if crate::hf::is_hf_dir(dir) {
        let (model, tokenizer) = Gpt::from_hf_dir_with_tokenizer(dir, device)?;
        let model = if trainable {
            Gpt::from_tensors(model.config(), model.tensors(), true)?
        } else {
            model
        };
        return Ok((model, tokenizer));
    }
    require_files(dir, &[files::CONFIG, files::MODEL, files::TOKENIZER])?;
    verify_only(dir, Some(&[files::CONFIG, files::MODEL, files::TOKENIZER]))?;
    let cfg = GptConfig::load(dir.join(files::CONFIG))?;
    let tokenizer = Tokenizer::from_file(dir.join(files::TOKENIZER))?;
    if tokenizer.vocab_size() > cfg.vocab_size {
        return Err(Error::checkpoint(
            dir,
            format!(
                "{} has {} tokens but the model's vocab_size in {} is {}",
                files::TOKENIZER,
                tokenizer.vocab_size(),
                files::CONFIG,
                cfg.vocab_size
            ),
        ));
    }
    let model_path = dir.join(files::MODEL);
    let tensors = load_safetensors(&model_path, device)?;
    check_model_size(&cfg, &tensors, &model_path)?;
    check_tensors(&cfg, &tensors, Some(&model_path))?;
    check_dtypes(&tensors, &model_path)?;
    let model = Gpt::from_tensors(&cfg, tensors, trainable)?;
    Ok((model, tokenizer))
}

/// Refuses a config that describes a model far larger than its weights file holds, before
/// anything is built from it: listing the tensors of `n_layer: 1000000000` would take
/// hundreds of gigabytes, and `3 * n_embd` of a huge `n_embd` overflows. Every layer has at
/// least one tensor, and every layer norm `n_embd` numbers, so a config whose `n_layer`
/// exceeds the file's tensors, or whose `n_embd` its numbers, cannot match it. `weights` is
/// the file (or shard index) the tensors came from; the error names its directory.
pub(crate) fn check_model_size(
    cfg: &GptConfig,
    tensors: &HashMap<String, Tensor>,
    weights: &Path,
) -> Result<()> {
    let numbers: usize = tensors.values().map(Tensor::elem_count).sum();
    for (field, value, limit, what) in [
        ("n_layer", cfg.n_layer, tensors.len(), "tensors"),
        ("n_embd", cfg.n_embd, numbers, "numbers"),
    ] {
        if value > limit {
            return Err(Error::checkpoint(
                weights.parent().unwrap_or(weights),
                format!(
                    "{} says {field} {value}, but {} holds only {limit} {what}: the config and \
                     the weights do not belong together",
                    files::CONFIG,
                    weights.file_name().map_or_else(
                        || weights.display().to_string(),
                        |n| n.to_string_lossy().into_owned()
                    )
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses weights in a dtype the model cannot run in: candle reads `F8_E4M3` tensors, but
/// its matrix products, and so tinygpt's layers, take F32, F64, F16 or BF16.
fn check_dtypes(tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
    use candle_core::DType;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    for name in names {
        let dtype = tensors.get(name).map(Tensor::dtype);
        let runs = |d: &DType| matches!(d, DType::F32 | DType::F64 | DType::F16 | DType::BF16);
        if let Some(dtype) = dtype.filter(|d| !runs(d)) {
            return Err(Error::bad_file(
                path,
                None,
                format!(
                    "tensor `{name}` holds {dtype:?} values; tinygpt runs models in F32, F64, \
                     F16 or BF16"
                ),
            ));
        }
    }
    Ok(())
}

/// Writes `config.json`, `model.safetensors` and `tokenizer.json` of a model into `dir`
/// (which must exist). Used inside a [`CheckpointWriter`] for atomicity.
///
/// # Errors
/// [`Error::Io`] naming the file that could not be written.
pub fn save_model(dir: impl AsRef<Path>, model: &Gpt, tokenizer: &Tokenizer) -> Result<()> {
    let dir = dir.as_ref();
    model.config().save(dir.join(files::CONFIG))?;
    save_safetensors(&model.tensors(), dir.join(files::MODEL))?;
    tokenizer.save(dir.join(files::TOKENIZER))
}

/// Errors with the missing file's name if `dir` lacks any of `names`.
pub(crate) fn require_files(dir: &Path, names: &[&str]) -> Result<()> {
    if !dir.is_dir() {
        return Err(Error::checkpoint(
            dir,
            "not a directory (or does not exist)",
        ));
    }
    for name in names {
        if !dir.join(name).is_file() {
            return Err(Error::checkpoint(
                dir,
                format!("missing {name} (a checkpoint holds {})", names.join(", ")),
            ));
        }
    }
    Ok(())
}

/// The longest safetensors header read (the `safetensors` crate's own limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The dtypes [`load_safetensors`] reads: those candle computes with. (candle also stores
/// `F4`, `F6_E2M3`, `F6_E3M2` and `F8_E8M0` tensors, as raw bytes that no operation can use.)
const READABLE_DTYPES: [(&str, u64); 11] = [
    ("F32", 32),
    ("F16", 16),
    ("BF16", 16),
    ("F64", 64),
    ("F8_E4M3", 8),
    ("U8", 8),
    ("U16", 16),
    ("U32", 32),
    ("I16", 16),
    ("I32", 32),
    ("I64", 64),
];

/// Reads every tensor of a safetensors file onto `device`.
///
/// The header is checked before anything is allocated for what it declares: its length
/// against the file's, then every tensor's dtype, shape and byte range (its shape times its
/// dtype's size, in checked arithmetic, must be exactly the bytes its `data_offsets` span,
/// and those must lie inside the file, one tensor after another). So a hostile file (one
/// claiming a 10^12-byte tensor, say) is refused with a message, never attempted.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read; [`Error::BadFile`] if it is truncated or
/// corrupt, naming the tensor and the figures that disagree.
pub fn load_safetensors(
    path: impl AsRef<Path>,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    let bytes = read_safetensors(path)?;
    candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| Error::bad_file(path, None, format!("not a valid safetensors file ({e})")))
}

/// The bytes of a safetensors file whose header [`check_safetensors_header`] accepts.
fn read_safetensors(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let bad =
        |msg: String| Error::bad_file(path, None, format!("not a valid safetensors file: {msg}"));
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
    let mut prefix = [0u8; 8];
    if file_len < 8 {
        return Err(bad(format!(
            "{file_len} bytes, fewer than the 8 of the header length"
        )));
    }
    file.read_exact(&mut prefix)
        .map_err(|e| Error::io(path, e))?;
    let header_len = u64::from_le_bytes(prefix);
    if header_len > file_len - 8 {
        return Err(bad(format!(
            "the header length field says {header_len} bytes, but only {} bytes follow it \
             (the file has {file_len})",
            file_len - 8
        )));
    }
    if header_len > MAX_HEADER_BYTES {
        return Err(bad(format!(
            "the header length field says {header_len} bytes, more than the \
             {MAX_HEADER_BYTES} a safetensors header may hold"
        )));
    }
    let data_len = file_len - 8 - header_len;
    let mut bytes = Vec::new();
    bytes
        .try_reserve_exact(usize::try_from(file_len).unwrap_or(usize::MAX))
        .map_err(|_| bad(format!("{file_len} bytes do not fit in memory")))?;
    bytes.extend_from_slice(&prefix);
    (&mut file)
        .take(header_len)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    let header = bytes.get(8..).unwrap_or_default();
    check_safetensors_header(header, data_len).map_err(bad)?;
    file.take(data_len)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    if bytes.len() as u64 != file_len {
        return Err(bad(format!(
            "{} bytes could be read of the {file_len} the file had",
            bytes.len()
        )));
    }
    Ok(bytes)
}

/// Checks a safetensors header (the JSON after the length field) against the `data_len`
/// bytes that follow it; the error says what is wrong, naming the tensor.
fn check_safetensors_header(header: &[u8], data_len: u64) -> std::result::Result<(), String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        dtype: String,
        shape: Vec<u64>,
        data_offsets: (u64, u64),
    }
    let entries: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header)
        .map_err(|e| {
            format!(
                "the header is not a JSON object ({})",
                crate::error::json_message(&e)
            )
        })?;
    let mut ranges = Vec::with_capacity(entries.len());
    for (name, value) in entries {
        if name == "__metadata__" {
            continue;
        }
        let entry: Entry = serde_json::from_value(value).map_err(|e| {
            format!("tensor `{name}`: {e} (expected dtype, shape and data_offsets)")
        })?;
        let Some(&(_, bits)) = READABLE_DTYPES.iter().find(|(d, _)| *d == entry.dtype) else {
            return Err(format!(
                "tensor `{name}` has dtype {}, which tinygpt does not read (it reads {})",
                entry.dtype,
                READABLE_DTYPES.map(|(d, _)| d).join(", ")
            ));
        };
        let (start, end) = entry.data_offsets;
        let bytes = entry
            .shape
            .iter()
            .try_fold(bits, |n, &d| n.checked_mul(d))
            .map(|b| b / 8)
            .filter(|&b| b <= data_len);
        let Some(bytes) = bytes else {
            return Err(format!(
                "tensor `{name}` of shape {:?} and dtype {} would take more than the {data_len} \
                 bytes of data in the file",
                entry.shape, entry.dtype
            ));
        };
        if end < start || end - start != bytes {
            return Err(format!(
                "tensor `{name}` of shape {:?} and dtype {} takes {bytes} bytes, but its \
                 data_offsets [{start}, {end}] span {}",
                entry.shape,
                entry.dtype,
                if end < start {
                    "a negative length".to_string()
                } else {
                    format!("{}", end - start)
                }
            ));
        }
        if end > data_len {
            return Err(format!(
                "tensor `{name}`: data_offsets [{start}, {end}] end past the {data_len} bytes of \
                 data in the file"
            ));
        }
        ranges.push((start, end, name));
    }
    ranges.sort();
    let mut at = 0;
    for (start, end, name) in &ranges {
        if *start != at {
            return Err(format!(
                "tensor `{name}` starts at byte {start} of the data, but the tensor before it \
                 ends at byte {at} (tensors follow one another without gaps or overlaps)"
            ));
        }
        at = *end;
    }
    if at != data_len {
        return Err(format!(
            "the tensors take {at} bytes, but {data_len} bytes of data follow the header"
        ));
    }
    Ok(())
}

/// Writes tensors to a safetensors file.
///
/// # Errors
/// [`Error::Io`] naming the file.
pub fn save_safetensors(tensors: &HashMap<String, Tensor>, path: impl AsRef<Path>) -> Result<()> {
    let path = path.as_ref();
    let contiguous = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
        .collect::<Result<HashMap<_, _>>>()?;
    // Serialised in memory and written with std (the same permissions as every other file;
    // safetensors' own writer creates files readable by their owner only).
    let bytes = safetensors::serialize(contiguous, None)
        .map_err(|e| Error::io(path, std::io::Error::other(e.to_string())))?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Writes a checkpoint directory atomically: files go into a temporary sibling directory,
/// which replaces the target on [`CheckpointWriter::commit`] (see the module docs: manifest,
/// fsync, one atomic swap). Dropped uncommitted, it removes the temporary directory and leaves
/// the old checkpoint untouched.
///
/// Only a checkpoint directory ([`is_checkpoint_dir`], or one holding only latest states) or
/// an empty one is ever replaced: a target that is a file or a directory holding anything else
/// is refused, and so is a checkpoint directory holding a file the new checkpoint does not
/// (nothing but older versions of the checkpoint's own files is lost). The latest states
/// (`checkpoint-STEP` subdirectories) move into the new checkpoint. A symbolic link is
/// followed: the directory it points to is replaced and the link kept.
#[derive(Debug)]
pub struct CheckpointWriter {
    target: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

impl CheckpointWriter {
    /// Starts a checkpoint for `target`, creating its parent directories.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] naming `target` if it exists and is not an empty or checkpoint
    /// directory, or if the temporary directory cannot be created beside it.
    pub fn begin(target: impl AsRef<Path>) -> Result<Self> {
        let target = resolve_link(target.as_ref())?;
        inspect_target(&target)?;
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "checkpoint".into());
        let parent = parent_of(&target);
        std::fs::create_dir_all(&parent).map_err(|e| {
            Error::checkpoint(
                &target,
                format!(
                    "cannot create its parent directory {}: {e}",
                    parent.display()
                ),
            )
        })?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        let cannot = |e: std::io::Error| {
            Error::checkpoint(
                &target,
                format!(
                    "cannot write the temporary directory {} beside it: {e}",
                    tmp.display()
                ),
            )
        };
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(cannot)?;
        }
        std::fs::create_dir_all(&tmp).map_err(cannot)?;
        Ok(Self {
            target,
            tmp,
            committed: false,
        })
    }

    /// Checks, before any training, that checkpoints can be written to `target`, as
    /// [`CheckpointWriter::begin`] would: it creates `target`'s parent directories and a
    /// temporary directory beside it, which it removes again. Returns what is there now.
    ///
    /// # Errors
    /// As [`CheckpointWriter::begin`].
    pub fn preflight(target: impl AsRef<Path>) -> Result<Target> {
        let target = resolve_link(target.as_ref())?;
        let found = inspect_target(&target)?;
        drop(Self::begin(&target)?);
        Ok(found)
    }

    /// The directory to write the files into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The checkpoint directory this writer replaces.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Writes the manifest, flushes every file and the directory to disk, and swaps the
    /// directory into place.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if the target is no longer an empty or checkpoint directory, or
    /// holds a file the new checkpoint lacks; [`Error::Io`] naming the path that failed (a
    /// full disk is `No space left on device` naming the file); the previous checkpoint is
    /// then still intact (at `target`, or, only where directories cannot be swapped
    /// atomically and the failure came between the two renames, at the `.old` sibling, which
    /// the next run puts back).
    pub fn commit(mut self) -> Result<()> {
        write_manifest(&self.tmp)?;
        let mut written = Vec::new();
        for entry in std::fs::read_dir(&self.tmp).map_err(|e| Error::io(&self.tmp, e))? {
            let entry = entry.map_err(|e| Error::io(&self.tmp, e))?;
            let path = entry.path();
            if path.is_file() {
                durable::sync_file(&path)?;
            }
            written.push(entry.file_name());
        }
        durable::sync_dir(&self.tmp)?;
        let parent = parent_of(&self.target);
        let had_old = match inspect_target(&self.target)? {
            Target::Absent => false,
            Target::Empty => true,
            Target::Checkpoint => {
                let dir = &self.target;
                for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
                    let entry = entry.map_err(|e| Error::io(dir, e))?;
                    let name = entry.file_name();
                    let n = name.to_string_lossy();
                    let carried = (state_step(&n).is_some() && entry.path().is_dir())
                        || (files::is_report_file(&n) && entry.path().is_file());
                    if !carried && !is_leftover(&n) && !written.contains(&name) {
                        return Err(Error::checkpoint(
                            dir,
                            format!(
                                "holds {n}, which the new checkpoint does not: the directory \
                                 is replaced whole, so move it elsewhere first"
                            ),
                        ));
                    }
                }
                // The latest states stay with the run: into the new checkpoint before the swap
                // (a crash in between leaves them in the temporary directory, from where
                // `clean_stale` puts them back).
                for (_, state) in state_dirs(dir)? {
                    if let Some(name) = state.file_name() {
                        let to = self.tmp.join(name);
                        std::fs::rename(&state, &to).map_err(|e| Error::io(&state, e))?;
                    }
                }
                // So do the report and its plots (after the manifest: they are not in it).
                for report in report_files(dir)? {
                    if let Some(name) = report.file_name() {
                        let to = self.tmp.join(name);
                        if !to.exists() {
                            std::fs::rename(&report, &to).map_err(|e| Error::io(&report, e))?;
                        }
                    }
                }
                durable::sync_dir(&self.tmp)?;
                true
            }
        };
        if had_old {
            if durable::exchange(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))? {
                durable::sync_dir(&parent)?;
                self.committed = true;
                // `tmp` now holds the old checkpoint. The new one is in place whatever happens
                // here: what cannot be removed now, the next run removes (`clean_stale`).
                let _ = std::fs::remove_dir_all(&self.tmp);
                return Ok(());
            }
            let old = parent.join(format!(
                ".{}.old-{}",
                self.target
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                std::process::id()
            ));
            std::fs::rename(&self.target, &old).map_err(|e| Error::io(&self.target, e))?;
            std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
            durable::sync_dir(&parent)?;
            self.committed = true;
            let _ = std::fs::remove_dir_all(&old); // as above
        } else {
            std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
            durable::sync_dir(&parent)?;
            self.committed = true;
        }
        Ok(())
    }
}

/// `path`, or the path a symbolic link at `path` points to (so the link is kept and the
/// directory it names is written).
fn resolve_link(path: &Path) -> Result<PathBuf> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path).map_err(|e| {
            Error::checkpoint(
                path,
                format!("is a symbolic link that cannot be followed: {e}"),
            )
        }),
        _ => Ok(path.to_path_buf()),
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tinygpt-ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// Writes every file of [`files::REQUIRED`] into `dir`, each holding `tag`.
    fn write_checkpoint_files(dir: &Path, tag: &str) {
        for f in files::REQUIRED {
            std::fs::write(dir.join(f), tag).unwrap();
        }
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writer_swaps_atomically_and_cleans_up() {
        let root = tmpdir("swap");
        let target = root.join("ckpt");
        assert_eq!(
            CheckpointWriter::preflight(&target).unwrap(),
            Target::Absent
        );
        let w = CheckpointWriter::begin(&target).unwrap();
        write_checkpoint_files(w.path(), "1");
        w.commit().unwrap();
        assert_eq!(
            std::fs::read_to_string(target.join(files::MODEL)).unwrap(),
            "1"
        );
        assert!(is_checkpoint_dir(&target));
        assert_eq!(
            CheckpointWriter::preflight(&target).unwrap(),
            Target::Checkpoint
        );
        // An abandoned write leaves the old checkpoint as it was.
        let w = CheckpointWriter::begin(&target).unwrap();
        write_checkpoint_files(w.path(), "2");
        drop(w);
        assert_eq!(
            std::fs::read_to_string(target.join(files::MODEL)).unwrap(),
            "1"
        );
        // An existing checkpoint is replaced whole.
        let w = CheckpointWriter::begin(&target).unwrap();
        write_checkpoint_files(w.path(), "3");
        std::fs::write(w.path().join(files::METRICS), "{}\n").unwrap();
        w.commit().unwrap();
        assert_eq!(
            std::fs::read_to_string(target.join(files::MODEL)).unwrap(),
            "3"
        );
        assert_eq!(names(&root), vec!["ckpt".to_string()]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn writer_fills_an_empty_directory() {
        let root = tmpdir("empty");
        let target = root.join("ckpt");
        std::fs::create_dir(&target).unwrap();
        assert_eq!(CheckpointWriter::preflight(&target).unwrap(), Target::Empty);
        let w = CheckpointWriter::begin(&target).unwrap();
        write_checkpoint_files(w.path(), "1");
        w.commit().unwrap();
        assert!(is_checkpoint_dir(&target));
        assert_eq!(names(&root), vec!["ckpt".to_string()]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn writer_refuses_a_directory_that_is_not_a_checkpoint() {
        let root = tmpdir("foreign");
        let target = root.join("thesis");
        std::fs::create_dir_all(target.join("sub")).unwrap();
        std::fs::write(target.join("thesis.tex"), "chapter 1").unwrap();
        std::fs::write(target.join("sub/x"), "x").unwrap();
        // Even one that holds some of a checkpoint's files.
        std::fs::write(target.join(files::CONFIG), "{}").unwrap();
        let e = CheckpointWriter::preflight(&target)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&*target.to_string_lossy()) && e.contains("not a checkpoint directory"),
            "{e}"
        );
        let e = CheckpointWriter::begin(&target).unwrap_err().to_string();
        assert!(e.contains("not a checkpoint directory"), "{e}");
        assert_eq!(names(&root), vec!["thesis".to_string()]);
        assert_eq!(names(&target), ["config.json", "sub", "thesis.tex"]);
        assert_eq!(
            std::fs::read_to_string(target.join("thesis.tex")).unwrap(),
            "chapter 1"
        );
        assert_eq!(std::fs::read_to_string(target.join("sub/x")).unwrap(), "x");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn writer_refuses_a_directory_that_became_foreign_before_commit() {
        let root = tmpdir("late");
        let target = root.join("out");
        std::fs::create_dir(&target).unwrap();
        let w = CheckpointWriter::begin(&target).unwrap();
        write_checkpoint_files(w.path(), "1");
        std::fs::write(target.join("notes.txt"), "mine").unwrap();
        let e = w.commit().unwrap_err().to_string();
        assert!(e.contains("not a checkpoint directory"), "{e}");
        assert_eq!(names(&target), ["notes.txt"]);
        assert_eq!(names(&root), vec!["out".to_string()]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn writer_carries_the_report_files() {
        let root = tmpdir("report");
        let target = root.join("ckpt");
        let w = CheckpointWriter::begin(&target).unwrap();
        write_checkpoint_files(w.path(), "1");
        w.commit().unwrap();
        std::fs::write(target.join(files::REPORT), "## run 1\n").unwrap();
        std::fs::write(target.join("loss.png"), "png").unwrap();
        assert_eq!(
            CheckpointWriter::preflight(&target).unwrap(),
            Target::Checkpoint
        );
        let w = CheckpointWriter::begin(&target).unwrap();
        write_checkpoint_files(w.path(), "2");
        w.commit().unwrap();
        let read = |f: &str| std::fs::read_to_string(target.join(f)).unwrap();
        assert_eq!(read(files::MODEL), "2");
        assert_eq!(read(files::REPORT), "## run 1\n");
        assert_eq!(read("loss.png"), "png");
        // Not in the manifest: the report grows after its checkpoint.
        std::fs::write(target.join(files::REPORT), "## run 1\n\n## run 2\n").unwrap();
        assert!(verify(&target).unwrap());
        // A crash after the report moved into the new checkpoint's temporary directory, before
        // the swap: the next run puts it back.
        let tmp = root.join(".ckpt.tmp-4000000000");
        std::fs::create_dir(&tmp).unwrap();
        std::fs::rename(target.join(files::REPORT), tmp.join(files::REPORT)).unwrap();
        clean_stale(&target).unwrap();
        assert_eq!(read(files::REPORT), "## run 1\n\n## run 2\n");
        assert_eq!(names(&root), vec!["ckpt".to_string()]);
        assert!(files::is_report_file("kl.png") && !files::is_report_file(".kl.png.tmp-1"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn writer_keeps_files_a_checkpoint_directory_gained() {
        let root = tmpdir("gained");
        let target = root.join("ckpt");
        let w = CheckpointWriter::begin(&target).unwrap();
        write_checkpoint_files(w.path(), "1");
        w.commit().unwrap();
        // A file no checkpoint holds: refused up front, before any training.
        std::fs::write(target.join("notes.txt"), "mine").unwrap();
        let e = CheckpointWriter::preflight(&target)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("holds notes.txt, which is not a checkpoint file"),
            "{e}"
        );
        assert!(CheckpointWriter::begin(&target).is_err());
        assert_eq!(
            std::fs::read_to_string(target.join("notes.txt")).unwrap(),
            "mine"
        );
        std::fs::remove_file(target.join("notes.txt")).unwrap();
        // A checkpoint file the new checkpoint does not write (another stage's head): refused
        // at commit, the old checkpoint kept.
        std::fs::write(target.join(files::KNOWN[7]), "head").unwrap();
        let w = CheckpointWriter::begin(&target).unwrap();
        write_checkpoint_files(w.path(), "2");
        let e = w.commit().unwrap_err().to_string();
        assert!(e.contains(&format!("holds {}", files::KNOWN[7])), "{e}");
        assert_eq!(
            std::fs::read_to_string(target.join(files::MODEL)).unwrap(),
            "1"
        );
        assert_eq!(names(&root), vec!["ckpt".to_string()]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn writer_refuses_a_file() {
        let root = tmpdir("file");
        let target = root.join("notes.txt");
        std::fs::write(&target, "my notes").unwrap();
        for e in [
            CheckpointWriter::preflight(&target).unwrap_err(),
            CheckpointWriter::begin(&target).unwrap_err(),
        ] {
            let e = e.to_string();
            assert!(
                e.contains(&*target.to_string_lossy()) && e.contains("not a directory"),
                "{e}"
            );
        }
        // A checkpoint below the file is refused too, naming both.
        let below = target.join("pretrain");
        let e = CheckpointWriter::preflight(&below).unwrap_err().to_string();
        assert!(
            e.contains(&*below.to_string_lossy()) && e.contains("is a file"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "my notes");
        assert_eq!(names(&root), vec!["notes.txt".to_string()]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn writer_follows_a_link_and_keeps_it() {
        let root = tmpdir("link");
        let real = root.join("real");
        std::fs::create_dir(&real).unwrap();
        let link = root.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        for tag in ["1", "2"] {
            let w = CheckpointWriter::begin(&link).unwrap();
            write_checkpoint_files(w.path(), tag);
            w.commit().unwrap();
        }
        assert!(std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            std::fs::read_to_string(real.join(files::MODEL)).unwrap(),
            "2"
        );
        assert_eq!(names(&root), ["link", "real"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn preflight_names_the_target_when_its_parent_cannot_be_written() {
        let target = Path::new("/proc/tinygpt-no-such-dir/ckpt");
        let e = CheckpointWriter::preflight(target).unwrap_err().to_string();
        assert!(
            e.starts_with("checkpoint /proc/tinygpt-no-such-dir/ckpt: "),
            "{e}"
        );
    }

    #[test]
    fn truncated_safetensors_is_an_error() {
        let root = tmpdir("trunc");
        let path = root.join("m.safetensors");
        let mut t = HashMap::new();
        t.insert(
            "x".to_string(),
            Tensor::ones((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
        save_safetensors(&t, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 7]).unwrap();
        let e = load_safetensors(&path, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.safetensors") && e.contains("not a valid safetensors file"),
            "{e}"
        );
        std::fs::write(&path, &bytes[..5]).unwrap();
        assert!(load_safetensors(&path, &Device::Cpu).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn missing_file_is_named() {
        let root = tmpdir("missing");
        let e = load_model(&root, &Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("missing config.json")
                && e.contains("tinygpt checkpoint holds")
                && e.contains("vocab.json + merges.txt"),
            "{e}"
        );
        std::fs::write(root.join(files::CONFIG), "{}").unwrap();
        let e = load_model(&root, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("missing model.safetensors"), "{e}");
        let e = load_model(root.join("nope"), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn hugging_face_dirs_are_told_apart_and_their_missing_files_named() {
        let root = tmpdir("hf");
        // A GPT2Config without weights or tokenizer: read as Hugging Face, tokenizer first.
        std::fs::write(root.join(files::CONFIG), r#"{"model_type": "gpt2"}"#).unwrap();
        assert!(crate::hf::is_hf_dir(&root));
        let e = load_trainable(&root, &Device::Cpu).unwrap_err().to_string();
        assert!(
            e.contains("no tokenizer: expected tokenizer.json or vocab.json + merges.txt"),
            "{e}"
        );
        std::fs::write(root.join(files::TOKENIZER), "{}").unwrap();
        let e = load_model(&root, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("tokenizer.json"), "{e}");
        // A tinygpt config is never Hugging Face, whatever else is there.
        GptConfig::shakespeare_char_cpu(10)
            .save(root.join(files::CONFIG))
            .unwrap();
        assert!(!crate::hf::is_hf_dir(&root));
        // Keys alone do not decide: GPT-2's tokenizer pair marks a Hugging Face directory.
        std::fs::write(root.join(files::CONFIG), "{}").unwrap();
        assert!(!crate::hf::is_hf_dir(&root));
        std::fs::remove_file(root.join(files::TOKENIZER)).unwrap();
        std::fs::write(root.join("vocab.json"), "{}").unwrap();
        std::fs::write(root.join("merges.txt"), "").unwrap();
        assert!(crate::hf::is_hf_dir(&root));
        std::fs::write(root.join(files::CONFIG), "not json").unwrap();
        assert!(!crate::hf::is_hf_dir(&root));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_manifest_names_a_damaged_or_missing_file() {
        let root = tmpdir("manifest");
        let target = root.join("ckpt");
        let w = CheckpointWriter::begin(&target).unwrap();
        write_checkpoint_files(w.path(), "weights");
        std::fs::write(w.path().join(files::METRICS), "{}\n").unwrap();
        w.commit().unwrap();
        assert!(verify(&target).unwrap());
        // The metrics grow after the checkpoint: not in the manifest.
        std::fs::write(target.join(files::METRICS), "{}\n{}\n").unwrap();
        assert!(verify(&target).unwrap());
        // Same size, other bytes: the checksum tells.
        std::fs::write(target.join(files::MODEL), "weightz").unwrap();
        let e = verify(&target).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors has CRC-32") && e.contains("its manifest says"),
            "{e}"
        );
        std::fs::write(target.join(files::MODEL), "weight").unwrap();
        let e = verify(&target).unwrap_err().to_string();
        assert!(
            e.contains("model.safetensors is 6 bytes, its manifest says 7"),
            "{e}"
        );
        std::fs::remove_file(target.join(files::MODEL)).unwrap();
        let e = verify(&target).unwrap_err().to_string();
        assert!(
            e.contains("missing model.safetensors, which its manifest lists"),
            "{e}"
        );
        // No manifest (older checkpoints): nothing to check.
        std::fs::remove_file(target.join(files::MANIFEST)).unwrap();
        assert!(!verify(&target).unwrap());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn latest_states_move_with_the_best_checkpoint_and_leftovers_are_cleaned() {
        let root = tmpdir("states");
        let target = root.join("ckpt");
        let w = CheckpointWriter::begin(&target).unwrap();
        write_checkpoint_files(w.path(), "best");
        w.commit().unwrap();
        let state = target.join("checkpoint-7");
        let w = CheckpointWriter::begin(&state).unwrap();
        write_checkpoint_files(w.path(), "latest");
        w.commit().unwrap();
        assert_eq!(
            CheckpointWriter::preflight(&target).unwrap(),
            Target::Checkpoint
        );
        // A new best checkpoint keeps the state.
        let w = CheckpointWriter::begin(&target).unwrap();
        write_checkpoint_files(w.path(), "best2");
        w.commit().unwrap();
        assert_eq!(
            std::fs::read_to_string(state.join(files::MODEL)).unwrap(),
            "latest"
        );
        assert_eq!(state_dirs(&target).unwrap(), vec![(7, state.clone())]);
        // What a kill leaves: a temporary directory holding the states (moved there just
        // before a swap), an old latest state being deleted, a half-written file.
        let tmp = root.join(".ckpt.tmp-999");
        std::fs::create_dir_all(&tmp).unwrap();
        std::fs::rename(&state, tmp.join("checkpoint-7")).unwrap();
        std::fs::create_dir_all(target.join(".checkpoint-3.old-999")).unwrap();
        std::fs::write(target.join(".metrics.jsonl.tmp-999"), "x").unwrap();
        assert_eq!(clean_stale(&target).unwrap().len(), 3);
        assert_eq!(
            std::fs::read_to_string(state.join(files::MODEL)).unwrap(),
            "latest"
        );
        assert_eq!(names(&root), ["ckpt"]);
        // A checkpoint moved aside whose replacement never arrived (two renames, no swap).
        std::fs::rename(&target, root.join(".ckpt.old-999")).unwrap();
        clean_stale(&target).unwrap();
        assert_eq!(
            std::fs::read_to_string(target.join(files::MODEL)).unwrap(),
            "best2"
        );
        assert_eq!(names(&root), ["ckpt"]);
        // Pruning keeps the newest and drops states newer than the run's own.
        for step in [8, 9, 30] {
            let w = CheckpointWriter::begin(target.join(format!("checkpoint-{step}"))).unwrap();
            write_checkpoint_files(w.path(), "s");
            w.commit().unwrap();
        }
        prune_states(&target, 2, 9).unwrap();
        let steps: Vec<usize> = state_dirs(&target)
            .unwrap()
            .into_iter()
            .map(|s| s.0)
            .collect();
        assert_eq!(steps, [8, 9]);
        std::fs::remove_dir_all(&root).unwrap();
    }
}
