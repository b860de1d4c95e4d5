//! The reward model: how much people would like a reply, as one number.
//!
//! InstructGPT (Ouyang et al. 2022, §3.5) starts from the SFT model, removes the unembedding
//! and puts a scalar projection on the final hidden state: `r(x, y) = w · h_last + b`, with
//! `h_last` the transformer's output (after `ln_f`) at the last token of `prompt + reply`.
//! Trained on pairs with the Bradley–Terry model, `P(y_c ≻ y_r | x) = σ(r(x, y_c) −
//! r(x, y_r))`, its loss is `−log σ(r_c − r_r)` averaged over pairs ([`bradley_terry_loss`]).
//! Only differences of rewards are learned, so their offset is arbitrary.
//!
//! The head is a [`ScalarHead`]: a `(C,)` weight and a `(1,)` bias, both starting at zero, so
//! every reward is 0 and the loss is exactly `ln 2` before training. A reward-model checkpoint
//! is the backbone's ordinary model directory plus the head in
//! [`RewardModel::HEAD_FILE`] (`reward_head.safetensors`, tensors `score.weight` `(C,)` and
//! `score.bias` `(1,)`).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{
    load_model, load_safetensors, load_trainable, save_model, save_safetensors,
};
use crate::model::Gpt;
use crate::rlhf::data::{PreferenceDataset, SequenceBatch};
use crate::rlhf::logprobs::log_sigmoid;
use crate::tokenizer::Tokenizer;
use crate::train::Objective;
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------------
// The scalar head
// ---------------------------------------------------------------------------------------------

/// A linear map from the hidden state to one number per position: `y = h · w + b`, with `w`
/// `(C,)` and `b` `(1,)`. It is the reward model's `score` head and PPO's value head
/// (`v_head`); its tensors are saved as `{name}.weight` and `{name}.bias`.
#[derive(Debug, Clone)]
pub struct ScalarHead {
    name: String,
    weight: Tensor, // (C,)
    bias: Tensor,   // (1,)
}

impl ScalarHead {
    /// A head of width `c` with weight and bias zero (trainable `Var`s if `trainable`).
    ///
    /// # Errors
    /// candle errors on device allocation.
    pub fn zeros(name: &str, c: usize, device: &Device, trainable: bool) -> Result<Self> {
        let weight = Tensor::zeros(c, DType::F32, device)?;
        let bias = Tensor::zeros(1, DType::F32, device)?;
        Self::from_tensors(name, weight, bias, trainable)
    }

    /// A head from a weight `(C,)` and a bias `(1,)` (copied into fresh `Var`s if
    /// `trainable`, used as constants otherwise).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if the weight is not a vector or the bias not `(1,)`.
    pub fn from_tensors(name: &str, weight: Tensor, bias: Tensor, trainable: bool) -> Result<Self> {
        for (suffix, t, ok) in [
            ("weight", &weight, weight.rank() == 1),
            ("bias", &bias, bias.dims() == [1]),
        ] {
            if !ok {
                return Err(Error::ShapeMismatch {
                    name: format!("{name}.{suffix}"),
                    expected: if suffix == "bias" {
                        vec![1]
                    } else {
                        vec![weight.elem_count()]
                    },
                    got: t.dims().to_vec(),
                    path: None,
                });
            }
        }
        let make = |t: Tensor| -> Result<Tensor> {
            Ok(if trainable {
                Var::from_tensor(&t.detach())?.into_inner()
            } else {
                t.detach()
            })
        };
        Ok(Self {
            name: name.to_string(),
            weight: make(weight)?,
            bias: make(bias)?,
        })
    }

    /// Reads `{name}.weight` `(c,)` and `{name}.bias` `(1,)` from a safetensors file.
    ///
    /// # Errors
    /// [`Error::Io`] / [`Error::BadFile`] for an unreadable file; [`Error::MissingTensor`] or
    /// [`Error::ShapeMismatch`] naming the tensor and the file.
    pub fn load(
        path: impl AsRef<Path>,
        name: &str,
        c: usize,
        device: &Device,
        trainable: bool,
    ) -> Result<Self> {
        let path = path.as_ref();
        let mut tensors = load_safetensors(path, device)?;
        let mut take = |suffix: &str, shape: &[usize]| -> Result<Tensor> {
            let key = format!("{name}.{suffix}");
            let t = tensors.remove(&key).ok_or_else(|| Error::MissingTensor {
                name: key.clone(),
                path: Some(path.to_path_buf()),
            })?;
            if t.dims() != shape {
                return Err(Error::ShapeMismatch {
                    name: key,
                    expected: shape.to_vec(),
                    got: t.dims().to_vec(),
                    path: Some(path.to_path_buf()),
                });
            }
            Ok(t.to_dtype(DType::F32)?)
        };
        let weight = take("weight", &[c])?;
        let bias = take("bias", &[1])?;
        Self::from_tensors(name, weight, bias, trainable)
    }

    /// Writes the head to a safetensors file.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        save_safetensors(&self.tensors(), path)
    }

    /// The tensors by name (`{name}.weight`, `{name}.bias`).
    pub fn tensors(&self) -> HashMap<String, Tensor> {
        HashMap::from([
            (format!("{}.weight", self.name), self.weight.clone()),
            (format!("{}.bias", self.name), self.bias.clone()),
        ])
    }

    /// The trainable parameters, named as in [`ScalarHead::tensors`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the head was built with constant weights.
    pub fn vars(&self) -> Result<Vec<(String, Var)>> {
        [("weight", &self.weight), ("bias", &self.bias)]
            .into_iter()
            .map(|(suffix, t)| {
                if t.is_variable() {
                    Ok((format!("{}.{suffix}", self.name), Var::from_tensor(t)?))
                } else {
                    Err(Error::InvalidArgument(format!(
                        "head `{}` has constant weights: load it as trainable to train it",
                        self.name
                    )))
                }
            })
            .collect()
    }

    /// The width `C` the head reads.
    pub fn width(&self) -> usize {
        self.weight.dims().first().copied().unwrap_or(0)
    }

    /// One number per position: hidden `(B, T, C)` → `(B, T)` f32.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the hidden width is not the head's.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        let (b, t, c) = hidden.dims3()?;
        if c != self.weight.dim(0)? {
            return Err(Error::InvalidArgument(format!(
                "head `{}` has width {}, hidden states have {c}",
                self.name,
                self.weight.dim(0)?
            )));
        }
        let h = hidden.to_dtype(DType::F32)?.reshape((b * t, c))?; // (B*T, C)
        let y = h.matmul(&self.weight.reshape((c, 1))?)?; // (B*T, 1)
        Ok(y.broadcast_add(&self.bias)?.reshape((b, t))?) // (B, T)
    }
}

// ---------------------------------------------------------------------------------------------
// The reward model
// ---------------------------------------------------------------------------------------------

/// The SFT model's transformer with a [`ScalarHead`] in place of its language-model head.
#[derive(Debug, Clone)]
pub struct RewardModel {
    backbone: Gpt,
    head: ScalarHead,
}

impl RewardModel {
    /// The head's file in a reward-model checkpoint.
    pub const HEAD_FILE: &'static str = "reward_head.safetensors";
    /// The head's tensor prefix (`score.weight`, `score.bias`), as Hugging Face's
    /// `GPT2ForSequenceClassification` names it.
    pub const HEAD_NAME: &'static str = "score";

    /// A reward model on `backbone` with a zero head, trainable when the backbone is.
    ///
    /// # Errors
    /// candle errors on device allocation.
    pub fn new(backbone: Gpt) -> Result<Self> {
        let trainable = backbone
            .named_parameters()
            .first()
            .is_some_and(|(_, t)| t.is_variable());
        let head = ScalarHead::zeros(
            Self::HEAD_NAME,
            backbone.config().n_embd,
            backbone.device(),
            trainable,
        )?;
        Ok(Self { backbone, head })
    }

    /// A reward model from a backbone and a head of its width.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the head's width is not the backbone's `n_embd`.
    pub fn from_parts(backbone: Gpt, head: ScalarHead) -> Result<Self> {
        let c = backbone.config().n_embd;
        if head.weight.dims() != [c] {
            return Err(Error::InvalidArgument(format!(
                "the head has width {:?}, the backbone {c}",
                head.weight.dims()
            )));
        }
        Ok(Self { backbone, head })
    }

    /// A trainable reward model initialised from an SFT checkpoint directory (zero head).
    ///
    /// # Errors
    /// As [`crate::checkpoint::load_trainable`].
    pub fn from_sft(dir: impl AsRef<Path>, device: &Device) -> Result<(Self, Tokenizer)> {
        let (backbone, tokenizer) = load_trainable(dir, device)?;
        Ok((Self::new(backbone)?, tokenizer))
    }

    /// Loads a reward-model checkpoint with constant weights, for scoring.
    ///
    /// # Errors
    /// As [`crate::checkpoint::load_model`]; [`Error::Checkpoint`] if the head file is
    /// missing; [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming a bad head tensor.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<(Self, Tokenizer)> {
        let dir = dir.as_ref();
        let (backbone, tokenizer) = load_model(dir, device)?;
        Ok((Self::with_head_from(backbone, dir, false)?, tokenizer))
    }

    /// As [`RewardModel::load`], with trainable weights (to continue training).
    ///
    /// # Errors
    /// As [`RewardModel::load`].
    pub fn load_trainable(dir: impl AsRef<Path>, device: &Device) -> Result<(Self, Tokenizer)> {
        let dir = dir.as_ref();
        let (backbone, tokenizer) = load_trainable(dir, device)?;
        Ok((Self::with_head_from(backbone, dir, true)?, tokenizer))
    }

    fn with_head_from(backbone: Gpt, dir: &Path, trainable: bool) -> Result<Self> {
        let path = dir.join(Self::HEAD_FILE);
        if !path.is_file() {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "missing {} (not a reward-model checkpoint)",
                    Self::HEAD_FILE
                ),
            ));
        }
        let head = ScalarHead::load(
            &path,
            Self::HEAD_NAME,
            backbone.config().n_embd,
            backbone.device(),
            trainable,
        )?;
        Ok(Self { backbone, head })
    }

    /// Writes the checkpoint's model files: the backbone's `config.json`,
    /// `model.safetensors`, `tokenizer.json`, and the head's [`RewardModel::HEAD_FILE`].
    ///
    /// # Errors
    /// [`Error::Io`] naming the file.
    pub fn save(&self, dir: impl AsRef<Path>, tokenizer: &Tokenizer) -> Result<()> {
        let dir = dir.as_ref();
        save_model(dir, &self.backbone, tokenizer)?;
        self.head.save(dir.join(Self::HEAD_FILE))
    }

    /// The transformer.
    pub fn backbone(&self) -> &Gpt {
        &self.backbone
    }

    /// The scalar head.
    pub fn head(&self) -> &ScalarHead {
        &self.head
    }

    /// Backbone and head parameters, for the optimiser.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the model was loaded with constant weights.
    pub fn vars(&self) -> Result<Vec<(String, Var)>> {
        let mut v = self.backbone.vars()?;
        v.extend(self.head.vars()?);
        Ok(v)
    }

    /// The reward of every sequence of the batch, read at its last real token: `(B,)` f32.
    /// With `rng`, in training mode (dropout from the backbone's config).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the batch is longer than the context.
    pub fn score(&self, batch: &SequenceBatch, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let p = self.backbone.config().dropout;
        let hidden = self
            .backbone
            .hidden_states(&batch.ids, None, rng.map(|r| (r, p)))?; // (B, T, C)
        let all = self.head.forward(&hidden)?; // (B, T)
        Ok(all.gather(&batch.last.unsqueeze(1)?, 1)?.squeeze(1)?) // (B,)
    }

    /// The Bradley–Terry loss and the rewards `(N,)` of both sides for the pairs of `data` at
    /// `indices`, padded with `pad_id`. With `rng`, in training mode.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an index out of range; tensor errors.
    pub fn pair_loss(
        &self,
        data: &PreferenceDataset,
        indices: &[usize],
        pad_id: u32,
        rng: Option<&mut ChaCha8Rng>,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let batch = data.batch(indices, pad_id, self.backbone.device())?;
        let rewards = self.score(&batch, rng)?; // (2N,)
        let n = indices.len();
        let (chosen, rejected) = (rewards.narrow(0, 0, n)?, rewards.narrow(0, n, n)?);
        let loss = bradley_terry_loss(&chosen, &rejected)?;
        Ok((loss, chosen, rejected))
    }

    /// Loss, pairwise accuracy and margin over the first `max_batches` batches of
    /// `batch_size` pairs of `data`, in order (`usize::MAX` for all of it). `None` for an
    /// empty set.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn pair_metrics(
        &self,
        data: &PreferenceDataset,
        pad_id: u32,
        batch_size: usize,
        max_batches: usize,
    ) -> Result<Option<PairMetrics>> {
        let mut acc = PairAccumulator::default();
        let indices: Vec<usize> = (0..data.len()).collect();
        for chunk in indices.chunks(batch_size.max(1)).take(max_batches) {
            let (loss, c, r) = self.pair_loss(data, chunk, pad_id, None)?;
            acc.add(loss.to_scalar::<f32>()? as f64, &c, &r)?;
        }
        Ok(acc.finish())
    }
}

/// The Bradley–Terry loss `mean(−log σ(r_c − r_r))` of rewards `(N,)` of preferred and other
/// replies. Equal rewards give exactly `ln 2`.
///
/// # Errors
/// [`Error::InvalidArgument`] if the shapes differ.
pub fn bradley_terry_loss(chosen: &Tensor, rejected: &Tensor) -> Result<Tensor> {
    if chosen.dims() != rejected.dims() {
        return Err(Error::InvalidArgument(format!(
            "chosen rewards {:?} and rejected rewards {:?} differ in shape",
            chosen.dims(),
            rejected.dims()
        )));
    }
    Ok(log_sigmoid(&(chosen - rejected)?)?.mean_all()?.neg()?)
}

/// How a reward model (or DPO's implicit reward) ranks a set of pairs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PairMetrics {
    /// Pairs evaluated.
    pub pairs: usize,
    /// Mean loss over the pairs.
    pub loss: f64,
    /// Fraction of pairs with `r_c > r_r` (ties count one half).
    pub accuracy: f64,
    /// Mean of `r_c − r_r`.
    pub margin: f64,
    /// Mean `r_c`.
    pub chosen: f64,
    /// Mean `r_r`.
    pub rejected: f64,
}

/// Accumulates [`PairMetrics`] batch by batch.
#[derive(Debug, Default)]
pub(crate) struct PairAccumulator {
    pairs: usize,
    loss: f64,
    correct: f64,
    margin: f64,
    chosen: f64,
    rejected: f64,
}

impl PairAccumulator {
    /// Adds a batch: its mean loss and the rewards `(N,)` of both sides.
    pub(crate) fn add(&mut self, loss: f64, chosen: &Tensor, rejected: &Tensor) -> Result<()> {
        let c = chosen.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let r = rejected.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        self.loss += loss * c.len() as f64;
        for (&c, &r) in c.iter().zip(&r) {
            self.correct += match c.partial_cmp(&r) {
                Some(std::cmp::Ordering::Greater) => 1.0,
                Some(std::cmp::Ordering::Equal) => 0.5,
                _ => 0.0,
            };
            self.margin += (c - r) as f64;
            self.chosen += c as f64;
            self.rejected += r as f64;
        }
        self.pairs += c.len();
        Ok(())
    }

    pub(crate) fn finish(&self) -> Option<PairMetrics> {
        let n = self.pairs as f64;
        (self.pairs > 0).then(|| PairMetrics {
            pairs: self.pairs,
            loss: self.loss / n,
            accuracy: self.correct / n,
            margin: self.margin / n,
            chosen: self.chosen / n,
            rejected: self.rejected / n,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The objective
// ---------------------------------------------------------------------------------------------

/// The reward-model [`Objective`]: Bradley–Terry loss on preference pairs.
#[derive(Debug)]
pub struct RewardTraining {
    model: RewardModel,
    tokenizer: Tokenizer,
    train: PreferenceDataset,
    val: PreferenceDataset,
    batch_size: usize,
}

impl RewardTraining {
    /// The stage's name, [`Objective::stage`]: what `trainer_state.json` records, and the
    /// name of the example that runs it.
    pub const STAGE: &'static str = "reward";

    /// Training of `model` on `train`, evaluated on `val`, `batch_size` pairs per batch.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `train` is empty or `batch_size` is 0.
    pub fn new(
        model: RewardModel,
        tokenizer: Tokenizer,
        train: PreferenceDataset,
        val: PreferenceDataset,
        batch_size: usize,
    ) -> Result<Self> {
        if train.is_empty() || batch_size == 0 {
            return Err(Error::InvalidArgument(format!(
                "reward training needs pairs and batch_size >= 1 (got {} and {batch_size})",
                train.len()
            )));
        }
        Ok(Self {
            model,
            tokenizer,
            train,
            val,
            batch_size,
        })
    }

    /// The model being trained.
    pub fn model(&self) -> &RewardModel {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Loss, accuracy and margin over the first `max_batches` batches of `data` (in order;
    /// `usize::MAX` for all of it). `None` for an empty set.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn metrics(
        &self,
        data: &PreferenceDataset,
        max_batches: usize,
    ) -> Result<Option<PairMetrics>> {
        self.model
            .pair_metrics(data, self.tokenizer.eot_id(), self.batch_size, max_batches)
    }

    /// The held-out set.
    pub fn val(&self) -> &PreferenceDataset {
        &self.val
    }
}

impl Objective for RewardTraining {
    fn stage(&self) -> &str {
        Self::STAGE
    }

    fn parameters(&self) -> Result<Vec<(String, Var)>> {
        self.model.vars()
    }

    /// `batch_size` pairs drawn at random (with replacement); the tokens are those of both
    /// sequences of every pair.
    fn train_loss(&mut self, rng: &mut ChaCha8Rng) -> Result<(Tensor, usize)> {
        let (indices, tokens) = self.train.sample(self.batch_size, rng);
        let (loss, _, _) =
            self.model
                .pair_loss(&self.train, &indices, self.tokenizer.eot_id(), Some(rng))?;
        Ok((loss, tokens))
    }

    /// Over the first `eval_iters` batches of each set (the same pairs every time):
    /// `train_loss`, `train_accuracy`, and on the held-out set `val_loss`, `accuracy`
    /// (pairwise: `r_c > r_r`) and `margin` (mean `r_c − r_r`).
    fn evaluate(&mut self, eval_iters: usize, _rng: &mut ChaCha8Rng) -> Result<Vec<(String, f64)>> {
        let mut out = Vec::new();
        if let Some(m) = self.metrics(&self.train, eval_iters)? {
            out.push(("train_loss".to_string(), m.loss));
            out.push(("train_accuracy".to_string(), m.accuracy));
        }
        if let Some(m) = self.metrics(&self.val, eval_iters)? {
            out.push(("val_loss".to_string(), m.loss));
            out.push(("accuracy".to_string(), m.accuracy));
            out.push(("margin".to_string(), m.margin));
        }
        Ok(out)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        self.model.save(dir, &self.tokenizer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ChatTemplate;
    use crate::rlhf::data::PreferencePair;
    use crate::GptConfig;

    #[test]
    fn bradley_terry_loss_of_equal_rewards_is_ln_2() {
        let r = Tensor::new(&[0.3f32, -1.5, 2.0], &Device::Cpu).unwrap();
        let l = bradley_terry_loss(&r, &r)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l as f64 - std::f64::consts::LN_2).abs() < 1e-6, "{l}");
        // Hand computation: margins 1 and -1: (log(1 + e^-1) + log(1 + e)) / 2.
        let c = Tensor::new(&[1f32, 0.0], &Device::Cpu).unwrap();
        let r = Tensor::new(&[0f32, 1.0], &Device::Cpu).unwrap();
        let l = bradley_terry_loss(&c, &r)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = ((1.0 + (-1f64).exp()).ln() + (1.0 + 1f64.exp()).ln()) / 2.0;
        assert!((l as f64 - want).abs() < 1e-6, "{l} vs {want}");
    }

    fn tiny() -> (RewardModel, Tokenizer, PreferenceDataset) {
        let mut tok = Tokenizer::train_char("abcdefgh").unwrap();
        let template = ChatTemplate::add_tokens(&mut tok).unwrap();
        let cfg = GptConfig {
            vocab_size: tok.vocab_size(),
            block_size: 16,
            n_layer: 1,
            n_head: 2,
            n_embd: 8,
            dropout: 0.0,
            bias: true,
            ..Default::default()
        };
        let model = RewardModel::new(Gpt::init(&cfg, 0, &Device::Cpu).unwrap()).unwrap();
        let pairs = vec![
            PreferencePair {
                prompt: "abc".into(),
                history: vec![],
                chosen: "a".into(),
                rejected: "bcd".into(),
            };
            3
        ];
        let (ds, _) = PreferenceDataset::new(&pairs, &tok, &template, 16, 8).unwrap();
        (model, tok, ds)
    }

    #[test]
    fn zero_head_gives_ln_2_and_the_score_is_read_at_the_last_token() {
        let (model, tok, ds) = tiny();
        let obj = RewardTraining::new(model, tok.clone(), ds.clone(), ds.clone(), 2).unwrap();
        let m = obj.metrics(&ds, usize::MAX).unwrap().unwrap();
        assert!((m.loss - std::f64::consts::LN_2).abs() < 1e-6, "{m:?}");
        assert_eq!((m.pairs, m.accuracy, m.margin), (3, 0.5, 0.0));
        // With a non-zero head, the score of a padded row equals that of the row alone.
        let mut model = obj.model().clone();
        model.head = ScalarHead::from_tensors(
            "score",
            Tensor::new(
                &[0.5f32, -1.0, 0.25, 2.0, 0.0, 1.0, -0.5, 0.1],
                &Device::Cpu,
            )
            .unwrap(),
            Tensor::new(&[0.3f32], &Device::Cpu).unwrap(),
            false,
        )
        .unwrap();
        let both = ds.batch(&[0], tok.eot_id(), &Device::Cpu).unwrap();
        let s = model.score(&both, None).unwrap().to_vec1::<f32>().unwrap();
        let ex = &ds.examples()[0];
        let alone = SequenceBatch::new(&[(&ex.prompt, &ex.chosen)], 0, &Device::Cpu).unwrap();
        let s1 = model.score(&alone, None).unwrap().to_vec1::<f32>().unwrap();
        assert!((s[0] - s1[0]).abs() < 1e-6, "{s:?} vs {s1:?}");
        assert_ne!(s[0], s[1]);
    }

    #[test]
    fn head_round_trips_and_bad_shapes_are_named() {
        let dir = std::env::temp_dir().join(format!("tinygpt-head-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("h.safetensors");
        let head = ScalarHead::from_tensors(
            "v_head",
            Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap(),
            Tensor::new(&[4f32], &Device::Cpu).unwrap(),
            true,
        )
        .unwrap();
        head.save(&path).unwrap();
        let back = ScalarHead::load(&path, "v_head", 3, &Device::Cpu, false).unwrap();
        assert_eq!(back.weight.to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
        assert!(back.vars().is_err());
        assert_eq!(head.vars().unwrap().len(), 2);
        let e = ScalarHead::load(&path, "v_head", 4, &Device::Cpu, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor `v_head.weight` has shape [3], expected [4] in"),
            "{e}"
        );
        let e = ScalarHead::load(&path, "score", 3, &Device::Cpu, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("tensor `score.weight` is missing in"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
