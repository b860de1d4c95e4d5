//! Checkpoint directories: what a training run leaves behind, and how it is read back.
//!
//! ```text
//! DIR/config.json            GptConfig
//! DIR/model.safetensors      weights, Hugging Face GPT-2 names and layout
//! DIR/tokenizer.json         Hugging Face tokenizer
//! DIR/optimizer.safetensors  AdamW moments, `{param}.exp_avg` / `{param}.exp_avg_sq`
//! DIR/trainer_state.json     step, best val loss, RNG state, stage, training config
//! DIR/metrics.jsonl          one JSON object per evaluation
//! ```
//!
//! A checkpoint is written into a temporary sibling directory and swapped into place only
//! when complete, so at every moment the disk holds one complete checkpoint: stopping a run
//! (or a crash) mid-write never loses what was already saved.

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
}

/// Loads the model and tokenizer of a checkpoint directory for inference (constant weights,
/// no autograd graph).
///
/// # Errors
/// [`Error::Checkpoint`] if `dir` or one of its files is missing or the tokenizer does not fit
/// the model; [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming the tensor; file
/// errors naming the file (a truncated safetensors file is an error, not a panic).
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
    require_files(dir, &[files::CONFIG, files::MODEL, files::TOKENIZER])?;
    let cfg = GptConfig::load(dir.join(files::CONFIG))?;
    let tokenizer = Tokenizer::from_file(dir.join(files::TOKENIZER))?;
    if tokenizer.vocab_size() > cfg.vocab_size {
        return Err(Error::checkpoint(
            dir,
            format!(
                "the tokenizer has {} tokens but the model's vocab_size is {}",
                tokenizer.vocab_size(),
                cfg.vocab_size
            ),
        ));
    }
    let model_path = dir.join(files::MODEL);
    let tensors = load_safetensors(&model_path, device)?;
    check_tensors(&cfg, &tensors, Some(&model_path))?;
    let model = Gpt::from_tensors(&cfg, tensors, trainable)?;
    Ok((model, tokenizer))
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

/// Reads every tensor of a safetensors file onto `device`.
///
/// # Errors
/// [`Error::Io`] if the file cannot be read; [`Error::BadFile`] if it is truncated or corrupt.
pub fn load_safetensors(
    path: impl AsRef<Path>,
    device: &Device,
) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| Error::bad_file(path, None, format!("not a valid safetensors file ({e})")))
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
#[derive(Debug)]
pub struct CheckpointWriter {
    target: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

impl CheckpointWriter {
    /// Starts a checkpoint for `target`.
    ///
    /// # Errors
    /// [`Error::Io`] if the temporary directory cannot be created.
    pub fn begin(target: impl AsRef<Path>) -> Result<Self> {
        let target = target.as_ref().to_path_buf();
        let name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "checkpoint".into());
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(Self {
            target,
            tmp,
            committed: false,
        })
    }

    /// The directory to write the files into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Flushes the files to disk and swaps the directory into place.
    ///
    /// # Errors
    /// [`Error::Io`] naming the path that failed; the previous checkpoint is then still intact
    /// (at `target`, or at the `.old` sibling if the failure came between the two renames).
    pub fn commit(mut self) -> Result<()> {
        for entry in std::fs::read_dir(&self.tmp).map_err(|e| Error::io(&self.tmp, e))? {
            let path = entry.map_err(|e| Error::io(&self.tmp, e))?.path();
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            file.sync_all().map_err(|e| Error::io(&path, e))?;
        }
        let old = self.tmp.with_file_name(format!(
            ".{}.old-{}",
            self.target
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            std::process::id()
        ));
        let had_old = self.target.exists();
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

    #[test]
    fn writer_swaps_atomically_and_cleans_up() {
        let root = tmpdir("swap");
        let target = root.join("ckpt");
        let w = CheckpointWriter::begin(&target).unwrap();
        std::fs::write(w.path().join("a.txt"), "1").unwrap();
        w.commit().unwrap();
        assert_eq!(std::fs::read_to_string(target.join("a.txt")).unwrap(), "1");
        // An abandoned write leaves the old checkpoint as it was.
        let w = CheckpointWriter::begin(&target).unwrap();
        std::fs::write(w.path().join("a.txt"), "2").unwrap();
        drop(w);
        assert_eq!(std::fs::read_to_string(target.join("a.txt")).unwrap(), "1");
        let w = CheckpointWriter::begin(&target).unwrap();
        std::fs::write(w.path().join("a.txt"), "3").unwrap();
        w.commit().unwrap();
        assert_eq!(std::fs::read_to_string(target.join("a.txt")).unwrap(), "3");
        let names: Vec<_> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec!["ckpt".to_string()]);
        std::fs::remove_dir_all(&root).unwrap();
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
        std::fs::write(root.join(files::CONFIG), "{}").unwrap();
        let e = load_model(&root, &Device::Cpu).unwrap_err().to_string();
        assert!(e.contains("missing model.safetensors"), "{e}");
        let e = load_model(root.join("nope"), &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not exist"), "{e}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
