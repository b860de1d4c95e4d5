//! Pre-training data: a corpus tokenised once, split 90/10, served as random windows.
//!
//! As nanoGPT's `get_batch`: a batch is `B` windows of `block_size` tokens starting at
//! uniformly random offsets, and the targets are the same windows shifted one token right,
//! so every position is a next-token prediction.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::Rng;

use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// Which part of a dataset to draw from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Split {
    /// The training part (the first 90% by default).
    Train,
    /// The held-out part (the last 10% by default).
    Val,
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Split::Train => "train",
            Split::Val => "val",
        })
    }
}

/// A tokenised corpus with a train/val split.
#[derive(Debug, Clone)]
pub struct TokenDataset {
    train: Vec<u32>,
    val: Vec<u32>,
}

impl TokenDataset {
    /// Reads a UTF-8 text file and tokenises it once.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read, [`Error::BadFile`] if it is empty or not
    /// UTF-8, or (naming its line and column) for a character the char tokenizer does not
    /// know; other tokenizer errors.
    pub fn from_file(
        path: impl AsRef<Path>,
        tokenizer: &Tokenizer,
        val_fraction: f64,
    ) -> Result<Self> {
        let path = path.as_ref();
        let text = read_text(path)?;
        let tokens = tokenizer.encode(&text).map_err(|e| match e {
            Error::UnknownChar {
                ch,
                position,
                line,
                column,
            } => Error::bad_file(
                path,
                Some(line),
                format!(
                    "character {ch:?} (U+{:04X}) at column {column} (character {position} of \
                     the file, from 0) is not in the tokenizer's vocabulary",
                    ch as u32
                ),
            ),
            e => e,
        })?;
        Self::from_tokens(tokens, val_fraction)
    }

    /// Splits a token stream: the first `1 - val_fraction` for training, the rest for
    /// validation (nanoGPT: `val_fraction = 0.1`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `val_fraction` is outside `[0, 1)` or `tokens` is empty.
    pub fn from_tokens(tokens: Vec<u32>, val_fraction: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&val_fraction) {
            return Err(Error::InvalidArgument(format!(
                "val_fraction must be in [0, 1), got {val_fraction}"
            )));
        }
        if tokens.is_empty() {
            return Err(Error::InvalidArgument("the corpus has no tokens".into()));
        }
        let n_train = ((tokens.len() as f64) * (1.0 - val_fraction)) as usize;
        let mut train = tokens;
        let val = train.split_off(n_train);
        Ok(Self { train, val })
    }

    /// The token ids of a split.
    pub fn tokens(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// Checks both splits hold at least one window of `block_size + 1` tokens.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the split, its length and what is needed.
    pub fn check_block_size(&self, block_size: usize) -> Result<()> {
        for split in [Split::Train, Split::Val] {
            let n = self.tokens(split).len();
            if n < block_size + 1 {
                return Err(Error::InvalidArgument(format!(
                    "the {split} split has {n} tokens, fewer than block_size + 1 = {}: \
                     use a longer corpus or a smaller block_size",
                    block_size + 1
                )));
            }
        }
        Ok(())
    }

    /// A batch of `batch_size` random windows: inputs `x` and targets `y`, both
    /// (B, block_size) u32, with `y[b, t] = x[b, t + 1]` (the token that follows).
    ///
    /// # Errors
    /// As [`TokenDataset::check_block_size`]; candle errors on device allocation.
    pub fn batch<R: Rng>(
        &self,
        split: Split,
        batch_size: usize,
        block_size: usize,
        rng: &mut R,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        self.check_block_size(block_size)?;
        let data = self.tokens(split);
        let mut x = Vec::with_capacity(batch_size * block_size);
        let mut y = Vec::with_capacity(batch_size * block_size);
        for _ in 0..batch_size {
            // as torch.randint(len(data) - block_size): starts in [0, len - block_size)
            let i = rng.random_range(0..data.len() - block_size);
            x.extend_from_slice(&data[i..i + block_size]);
            y.extend_from_slice(&data[i + 1..i + 1 + block_size]);
        }
        Ok((
            Tensor::from_vec(x, (batch_size, block_size), device)?,
            Tensor::from_vec(y, (batch_size, block_size), device)?,
        ))
    }
}

/// Reads a whole UTF-8 text file, refusing an empty one.
///
/// # Errors
/// [`Error::Io`] naming the path, or [`Error::BadFile`] if the file is empty or not UTF-8.
pub fn read_text(path: impl AsRef<Path>) -> Result<String> {
    let path = path.as_ref();
    let text = read_utf8(path)?;
    if text.is_empty() {
        return Err(Error::bad_file(path, None, "the file is empty"));
    }
    Ok(text)
}

/// Reads a whole UTF-8 file (JSON, text); bytes that are not UTF-8 are an error naming the
/// line and byte, where `std::fs::read_to_string` says only "stream did not contain valid
/// UTF-8".
///
/// # Errors
/// [`Error::Io`] naming the path, or [`Error::BadFile`] if the file is not UTF-8.
pub(crate) fn read_utf8(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let bytes = e.as_bytes();
        let line = 1 + bytes[..at].iter().filter(|&&b| b == b'\n').count();
        let line_start = bytes[..at]
            .iter()
            .rposition(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        Error::bad_file(
            path,
            Some(line),
            format!(
                "not valid UTF-8 (byte {} of the line, byte {} of the file)",
                at - line_start + 1,
                at + 1
            ),
        )
    })
}

/// Where a run's held-out set comes from: a file of its own, or a seeded fraction of the
/// training data. The training examples record it in `trainer_state.json` (`extra.val_data`,
/// `extra.val_fraction`, see [`HeldOut::to_extra`]) so that a resumed run evaluates on the same
/// set its best loss was measured on.
#[derive(Debug, Clone, PartialEq)]
pub enum HeldOut {
    /// A file of held-out records.
    File(PathBuf),
    /// This fraction of the training records, in `[0, 1)` (0: no held-out set).
    Fraction(f64),
}

impl std::fmt::Display for HeldOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeldOut::File(p) => write!(f, "the file {}", p.display()),
            HeldOut::Fraction(x) => write!(f, "a fraction {x} of the training data"),
        }
    }
}

impl HeldOut {
    /// A held-out fraction of the training data.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] unless `fraction` is in `[0, 1)` (some data must be left to
    /// train on).
    pub fn fraction(fraction: f64) -> Result<Self> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(Error::InvalidArgument(format!(
                "val_fraction must be in [0, 1) (the share of the training data held out; \
                 0 = none), got {fraction}"
            )));
        }
        Ok(HeldOut::Fraction(fraction))
    }

    /// The file, when the held-out set is one.
    pub fn file(&self) -> Option<&Path> {
        match self {
            HeldOut::File(p) => Some(p),
            HeldOut::Fraction(_) => None,
        }
    }

    /// The fraction of the training data held out (0 when the held-out set is a file).
    pub fn val_fraction(&self) -> f64 {
        match self {
            HeldOut::File(_) => 0.0,
            HeldOut::Fraction(f) => *f,
        }
    }

    /// `(val_data, val_fraction)` as a run records them (the one not used is `null`).
    pub fn to_extra(&self) -> (serde_json::Value, serde_json::Value) {
        match self {
            HeldOut::File(p) => (p.display().to_string().into(), serde_json::Value::Null),
            HeldOut::Fraction(f) => (serde_json::Value::Null, (*f).into()),
        }
    }

    /// What a run recorded with [`HeldOut::to_extra`] in `extra` (`None` for a run that
    /// recorded neither field).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a recorded fraction outside `[0, 1)`.
    pub fn from_extra(extra: &serde_json::Value) -> Result<Option<Self>> {
        match (
            extra.get("val_data").and_then(|v| v.as_str()),
            extra.get("val_fraction").and_then(|v| v.as_f64()),
        ) {
            (Some(p), _) => Ok(Some(HeldOut::File(PathBuf::from(p)))),
            (None, Some(f)) => Self::fraction(f).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// The held-out set of a run: `given` (from the user) if any, else what the resumed run
    /// recorded in `resumed_extra` (its `trainer_state.json` `extra`), else `default`. The
    /// note, when there is one, says what a resumed run changed or could not recover, for the
    /// user to read.
    ///
    /// # Errors
    /// As [`HeldOut::from_extra`].
    pub fn resolve(
        given: Option<HeldOut>,
        resumed_extra: Option<&serde_json::Value>,
        default: HeldOut,
    ) -> Result<(HeldOut, Option<String>)> {
        let Some(extra) = resumed_extra else {
            return Ok((given.unwrap_or(default), None));
        };
        Ok(match (given, Self::from_extra(extra)?) {
            (Some(g), Some(s)) if g != s => {
                let note = format!(
                    "the held-out set changes from the run's, {s}, to {g}: the best held-out \
                     loss so far was measured on the old set"
                );
                (g, Some(note))
            }
            (Some(g), _) => (g, None),
            (None, Some(s)) => {
                let note = format!("held-out set: {s}, as the run recorded");
                (s, Some(note))
            }
            (None, None) => {
                let note = format!(
                    "the run records no held-out set; using {default} (name the run's if it \
                     used another)"
                );
                (default, Some(note))
            }
        })
    }
}

/// The UTF-8 byte-order mark some editors (Notepad, Excel) write at the start of a file.
const UTF8_BOM: &[u8] = b"\xEF\xBB\xBF";

/// One line of a file read with [`read_lines`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// 1-based line number in the file.
    pub number: usize,
    /// The line without its `\n` (or `\r\n`), or why it could not be decoded (not UTF-8),
    /// saying where in the line.
    pub text: std::result::Result<String, String>,
}

impl Line {
    /// Whether the line holds only whitespace (a line that is not UTF-8 is not blank).
    pub fn is_blank(&self) -> bool {
        self.text.as_ref().is_ok_and(|t| t.trim().is_empty())
    }
}

/// Reads a line-oriented text file (JSONL data, prompts) as bytes and decodes each line on its
/// own, so a line that is not UTF-8 is reported at its line (and, where a reader skips bad
/// records, skipped alone). A leading UTF-8 byte-order mark is skipped, as most JSON tools do,
/// and a `\r` before each `\n` is dropped. Every line is returned, blank ones included, so
/// that joining the texts with `\n` keeps the file's line numbers.
///
/// # Errors
/// [`Error::Io`] naming the path if the file cannot be read.
pub fn read_lines(path: impl AsRef<Path>) -> Result<Vec<Line>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = bytes.strip_prefix(UTF8_BOM).unwrap_or(&bytes);
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    Ok(body
        .split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, raw)| {
            let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
            let text = std::str::from_utf8(raw)
                .map(str::to_owned)
                .map_err(|e| format!("not valid UTF-8 (byte {} of the line)", e.valid_up_to() + 1));
            Line {
                number: i + 1,
                text,
            }
        })
        .collect())
}

/// Shuffles `items` with a seeded RNG and splits off the last `fraction` of them as a
/// held-out set, which it returns (`items` keeps the rest). The SFT and preference datasets
/// split this way.
pub(crate) fn split_off_shuffled<T>(items: &mut Vec<T>, fraction: f64, seed: u64) -> Vec<T> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    items.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let n_val = ((items.len() as f64) * fraction).round() as usize;
    items.split_off(items.len() - n_val.min(items.len()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn split_is_90_10_and_targets_shift_by_one() {
        let ds = TokenDataset::from_tokens((0..100).collect(), 0.1).unwrap();
        assert_eq!(
            ds.tokens(Split::Train),
            (0..90).collect::<Vec<u32>>().as_slice()
        );
        assert_eq!(
            ds.tokens(Split::Val),
            (90..100).collect::<Vec<u32>>().as_slice()
        );
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (x, y) = ds
            .batch(Split::Train, 4, 8, &mut rng, &Device::Cpu)
            .unwrap();
        assert_eq!(x.dims(), &[4, 8]);
        for (xr, yr) in x
            .to_vec2::<u32>()
            .unwrap()
            .iter()
            .zip(y.to_vec2::<u32>().unwrap())
        {
            for t in 0..8 {
                assert_eq!(yr[t], xr[t] + 1); // the corpus is 0, 1, 2, …
            }
            assert!(yr[7] < 90, "window leaves the train split");
        }
    }

    #[test]
    fn same_seed_same_batches() {
        let ds = TokenDataset::from_tokens((0..1000).collect(), 0.1).unwrap();
        let draw = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            ds.batch(Split::Val, 3, 5, &mut rng, &Device::Cpu)
                .unwrap()
                .0
                .to_vec2::<u32>()
                .unwrap()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn too_short_corpus_is_an_error() {
        let ds = TokenDataset::from_tokens((0..50).collect(), 0.1).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let e = ds
            .batch(Split::Train, 1, 64, &mut rng, &Device::Cpu)
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("train split has 45 tokens, fewer than block_size + 1 = 65"),
            "{e}"
        );
        let e = ds.check_block_size(5).unwrap_err();
        assert!(e.to_string().contains("val split has 5 tokens"), "{e}");
    }

    #[test]
    fn empty_and_missing_files_are_errors() {
        let dir = std::env::temp_dir().join(format!("tinygpt-data-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let empty = dir.join("empty.txt");
        std::fs::write(&empty, "").unwrap();
        assert!(read_text(&empty)
            .unwrap_err()
            .to_string()
            .contains("empty.txt: the file is empty"));
        let missing = dir.join("missing.txt");
        assert!(read_text(&missing)
            .unwrap_err()
            .to_string()
            .contains("missing.txt"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_resumed_run_keeps_its_held_out_set_unless_told_otherwise() {
        let file = HeldOut::File("test.jsonl".into());
        let (val_data, val_fraction) = file.to_extra();
        let extra = serde_json::json!({"data": ["train.jsonl"], "val_data": val_data, "val_fraction": val_fraction});
        assert_eq!(HeldOut::from_extra(&extra).unwrap(), Some(file.clone()));
        let default = HeldOut::fraction(0.05).unwrap();
        // Resumed without flags: the recorded file, not the default fraction.
        let (h, note) = HeldOut::resolve(None, Some(&extra), default.clone()).unwrap();
        assert_eq!(h, file);
        assert_eq!(
            note.as_deref(),
            Some("held-out set: the file test.jsonl, as the run recorded")
        );
        // Told otherwise: the flag wins, and the note says the best loss was on the old set.
        let tenth = HeldOut::fraction(0.1).unwrap();
        let (h, note) =
            HeldOut::resolve(Some(tenth.clone()), Some(&extra), default.clone()).unwrap();
        assert_eq!(h, tenth);
        assert!(note
            .unwrap()
            .contains("from the run's, the file test.jsonl, to a fraction 0.1"));
        // The same as recorded: nothing to say.
        let (_, note) =
            HeldOut::resolve(Some(file.clone()), Some(&extra), default.clone()).unwrap();
        assert_eq!(note, None);
        // A recorded fraction, 0 included, comes back as it was.
        let (d, f) = HeldOut::fraction(0.0).unwrap().to_extra();
        let extra0 = serde_json::json!({"val_data": d, "val_fraction": f});
        let (h, _) = HeldOut::resolve(None, Some(&extra0), default.clone()).unwrap();
        assert_eq!(h, HeldOut::Fraction(0.0));
        // An older run without the fields: the default, with a note.
        let (h, note) = HeldOut::resolve(
            None,
            Some(&serde_json::json!({"data": []})),
            default.clone(),
        )
        .unwrap();
        assert_eq!(h, default);
        assert!(note.unwrap().starts_with("the run records no held-out set"));
        // A new run: what was given, else the default, silently.
        assert_eq!(
            HeldOut::resolve(None, None, default.clone()).unwrap(),
            (default, None)
        );
        for bad in [1.0, 1.5, -0.5, f64::NAN] {
            let e = HeldOut::fraction(bad).unwrap_err().to_string();
            assert!(e.contains("val_fraction must be in [0, 1)"), "{e}");
        }
        let bad = serde_json::json!({"val_fraction": 3.0});
        assert!(HeldOut::from_extra(&bad).is_err());
    }

    #[test]
    fn lines_skip_a_bom_and_name_the_line_that_is_not_utf8() {
        let dir = std::env::temp_dir().join(format!("tinygpt-lines-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.jsonl");
        std::fs::write(&p, b"\xEF\xBB\xBF{\"a\":1}\r\n\n{\"b\":\xFF}\nlast").unwrap();
        let lines = read_lines(&p).unwrap();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[0].text.as_deref(), Ok("{\"a\":1}"));
        assert!(lines[1].is_blank());
        assert_eq!(lines[2].number, 3);
        assert_eq!(
            lines[2].text,
            Err("not valid UTF-8 (byte 6 of the line)".to_string())
        );
        assert!(!lines[2].is_blank());
        assert_eq!(lines[3].text.as_deref(), Ok("last"));
        std::fs::write(&p, b"\xEF\xBB\xBF").unwrap();
        assert!(read_lines(&p).unwrap().is_empty());
        std::fs::write(&p, b"one\ntwo \xC3\n").unwrap();
        let e = read_text(&p).unwrap_err().to_string();
        assert!(
            e.ends_with("x.jsonl:2: not valid UTF-8 (byte 5 of the line, byte 9 of the file)"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
