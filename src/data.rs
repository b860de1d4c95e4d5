//! Pre-training data: a corpus tokenised once, split 90/10, served as random windows.
//!
//! As nanoGPT's `get_batch`: a batch is `B` windows of `block_size` tokens starting at
//! uniformly random offsets, and the targets are the same windows shifted one token right,
//! so every position is a next-token prediction.

use std::path::Path;

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
    /// UTF-8, tokenizer errors (e.g. a character the char tokenizer does not know).
    pub fn from_file(
        path: impl AsRef<Path>,
        tokenizer: &Tokenizer,
        val_fraction: f64,
    ) -> Result<Self> {
        let path = path.as_ref();
        let text = read_text(path)?;
        Self::from_tokens(tokenizer.encode(&text)?, val_fraction)
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
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if bytes.is_empty() {
        return Err(Error::bad_file(path, None, "the file is empty"));
    }
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        Error::bad_file(path, None, format!("not valid UTF-8 (at byte {at})"))
    })
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
}
