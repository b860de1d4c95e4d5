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
//! ```
//!
//! A checkpoint is written into a temporary sibling directory and swapped into place only
//! when complete, so at every moment the disk holds one complete checkpoint: stopping a run
//! (or a crash) mid-write never loses what was already saved.
//!
//! Wherever a model is read ([`load_model`], [`load_trainable`], and so every `--ckpt`,
//! `--base` and `--sft` of the examples), a Hugging Face GPT-2 directory serves as well
//! ([`crate::hf::is_hf_dir`]: `config.json` a `GPT2Config`, `model.safetensors`, and
//! `tokenizer.json` or `vocab.json` + `merges.txt`), e.g. OpenAI's `gpt2` to fine-tune, or a
//! model tinygpt exported.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

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
    /// The files every checkpoint the [`crate::Trainer`] writes holds, whatever the stage: the
    /// model files of [`crate::Objective::save`] and the trainer's own. A directory holding all
    /// of them is a checkpoint directory ([`super::is_checkpoint_dir`]), which a new checkpoint
    /// may replace; any other existing path is refused.
    pub const REQUIRED: [&str; 5] = [CONFIG, MODEL, TOKENIZER, OPTIMIZER, TRAINER_STATE];
    /// Every file a checkpoint of any stage may hold: [`REQUIRED`], the metrics, and what the
    /// RLHF stages add (the reward and value heads, PPO's state). A checkpoint directory holding anything else is refused as a
    /// target before training (see [`super::CheckpointWriter::preflight`]): replacing the
    /// directory would lose it.
    pub const KNOWN: [&str; 9] = [
        CONFIG,
        MODEL,
        TOKENIZER,
        OPTIMIZER,
        TRAINER_STATE,
        METRICS,
        crate::rlhf::RewardModel::HEAD_FILE,
        crate::rlhf::Ppo::VALUE_HEAD_FILE,
        crate::rlhf::Ppo::STATE_FILE,
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
    let mut entries = std::fs::read_dir(target).map_err(|e| Error::io(target, e))?;
    if entries.next().is_none() {
        Ok(Target::Empty)
    } else if is_checkpoint_dir(target) {
        for entry in std::fs::read_dir(target).map_err(|e| Error::io(target, e))? {
            let name = entry.map_err(|e| Error::io(target, e))?.file_name();
            if !files::KNOWN.iter().any(|k| name == *k) {
                return Err(Error::checkpoint(
                    target,
                    format!(
                        "holds {}, which is not a checkpoint file: a new checkpoint replaces \
                         the directory whole, so move it elsewhere first",
                        name.to_string_lossy()
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
/// which replaces the target on [`CheckpointWriter::commit`]. Dropped uncommitted, it removes
/// the temporary directory and leaves the old checkpoint untouched.
///
/// Only a checkpoint directory ([`is_checkpoint_dir`]) or an empty one is ever replaced: a
/// target that is a file or a directory holding anything else is refused, and so is a
/// checkpoint directory holding a file the new checkpoint does not (nothing but older versions
/// of the checkpoint's own files is lost). A symbolic link is followed: the directory it points
/// to is replaced and the link kept.
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
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
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

    /// Flushes the files to disk and swaps the directory into place.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if the target is no longer an empty or checkpoint directory, or
    /// holds a file the new checkpoint lacks; [`Error::Io`] naming the path that failed; the
    /// previous checkpoint is then still intact (at `target`, or at the `.old` sibling if the
    /// failure came between the two renames).
    pub fn commit(mut self) -> Result<()> {
        let mut written = Vec::new();
        for entry in std::fs::read_dir(&self.tmp).map_err(|e| Error::io(&self.tmp, e))? {
            let entry = entry.map_err(|e| Error::io(&self.tmp, e))?;
            let path = entry.path();
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
            written.push(entry.file_name());
        }
        let had_old = match inspect_target(&self.target)? {
            Target::Absent => false,
            Target::Empty => true,
            Target::Checkpoint => {
                let dir = &self.target;
                for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
                    let name = entry.map_err(|e| Error::io(dir, e))?.file_name();
                    if !written.contains(&name) {
                        return Err(Error::checkpoint(
                            dir,
                            format!(
                                "holds {}, which the new checkpoint does not: the directory is \
                                 replaced whole, so move it elsewhere first",
                                name.to_string_lossy()
                            ),
                        ));
                    }
                }
                true
            }
        };
        let old = self.tmp.with_file_name(format!(
            ".{}.old-{}",
            self.target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        if had_old {
            std::fs::rename(&self.target, &old).map_err(|e| Error::io(&self.target, e))?;
        }
        std::fs::rename(&self.tmp, &self.target).map_err(|e| Error::io(&self.target, e))?;
        self.committed = true;
        if had_old {
            std::fs::remove_dir_all(&old).map_err(|e| Error::io(&old, e))?;
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
        std::fs::write(target.join(files::KNOWN[6]), "head").unwrap();
        let w = CheckpointWriter::begin(&target).unwrap();
        write_checkpoint_files(w.path(), "2");
        let e = w.commit().unwrap_err().to_string();
        assert!(e.contains(&format!("holds {}", files::KNOWN[6])), "{e}");
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
}
