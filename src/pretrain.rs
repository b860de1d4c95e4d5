//! Stage one, pre-training: next-token prediction on raw text.
//!
//! The objective is the mean cross-entropy of the model's prediction at every position of a
//! random window against the token that actually follows (nanoGPT's `train.py`).

use std::path::Path;

use candle_core::{DType, Tensor, Var};
use rand_chacha::ChaCha8Rng;

use crate::checkpoint::save_model;
use crate::data::{Split, TokenDataset};
use crate::kernels::train_step::{Gpt2Step, ShardedStep};
use crate::model::{cross_entropy, Gpt};
use crate::tokenizer::Tokenizer;
use crate::train::Objective;
use crate::Result;

/// The hand-written training step and the parameters it reads.
type OwnedStep = (ShardedStep, Vec<(String, Var)>);

/// The pre-training [`Objective`]: a model, its tokenizer and a tokenised corpus.
#[derive(Debug)]
pub struct Pretraining {
    model: Gpt,
    tokenizer: Tokenizer,
    data: TokenDataset,
    batch_size: usize,
    /// The hand-written training step and the parameters it reads, built at the first step;
    /// `Some(None)`: the model trains through autograd ([`Gpt2Step::supports`]).
    owned: Option<Option<OwnedStep>>,
    /// Whether a training step has run through `owned` (the evaluations then do too).
    owned_trained: bool,
}

impl Pretraining {
    /// The stage's name, [`Objective::stage`]: what `trainer_state.json` records, and the
    /// name of the example that runs it.
    pub const STAGE: &'static str = "pretrain";

    /// Pre-training of `model` on `data` in batches of `batch_size` windows of the model's
    /// `block_size` tokens.
    ///
    /// # Errors
    /// [`crate::Error::InvalidArgument`] if a split is shorter than `block_size + 1` tokens.
    pub fn new(
        model: Gpt,
        tokenizer: Tokenizer,
        data: TokenDataset,
        batch_size: usize,
    ) -> Result<Self> {
        data.check_block_size(model.config().block_size)?;
        Ok(Self {
            model,
            tokenizer,
            data,
            batch_size,
            owned: None,
            owned_trained: false,
        })
    }

    /// Whether training steps run the hand-written forward and backward pass
    /// (`src/kernels/train_step.rs`) rather than autograd (unless
    /// [`crate::TrainConfig::autograd`] asks for it): a GPT-2 of f32 weights on the CPU with a
    /// tied head and no dropout or LoRA adapter.
    pub fn has_owned_step(&mut self) -> bool {
        self.owned_step().is_some()
    }

    fn owned_step(&mut self) -> Option<&mut OwnedStep> {
        if self.owned.is_none() {
            let m = &self.model;
            let cfg = m.config();
            let fits = m.lora_state().is_none()
                && !m.is_quantized()
                && m.device().is_cpu()
                && m.dtype() == DType::F32
                && Gpt2Step::supports(cfg, true);
            let b = self.batch_size;
            let built = fits.then(|| m.vars().ok()).flatten().and_then(|p| {
                let n_params = p.iter().map(|(_, v)| v.elem_count()).sum();
                let shards = ShardedStep::shards_for(n_params, b, rayon::current_num_threads());
                Some((
                    ShardedStep::new(cfg, &p, b, cfg.block_size, shards).ok()?,
                    p,
                ))
            });
            self.owned = Some(built);
        }
        self.owned.as_mut()?.as_mut()
    }

    /// The model being trained.
    pub fn model(&self) -> &Gpt {
        &self.model
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Mean next-token loss of `model` on one batch; (B, T) inputs and targets.
    fn batch_loss(&self, x: &Tensor, y: &Tensor, rng: Option<&mut ChaCha8Rng>) -> Result<Tensor> {
        let logits = match rng {
            Some(rng) => self.model.forward_train(x, rng)?,
            None => self.model.forward(x)?,
        }; // (B, T, V)
        let (b, t, v) = logits.dims3()?;
        cross_entropy(&logits.reshape((b * t, v))?, &y.flatten_all()?, None)
    }
}

impl Objective for Pretraining {
    fn stage(&self) -> &str {
        Self::STAGE
    }

    fn parameters(&self) -> Result<Vec<(String, Var)>> {
        self.model.vars()
    }

    fn train_step_owned(
        &mut self,
        rng: &mut ChaCha8Rng,
        loss_scale: f32,
        zero: bool,
    ) -> Option<Result<(f64, usize)>> {
        self.owned_step()?;
        let block = self.model.config().block_size;
        let batch = self.data.batch(
            Split::Train,
            self.batch_size,
            block,
            rng,
            self.model.device(),
        );
        self.owned_trained = true;
        let (b, owned) = (self.batch_size, self.owned_step()?);
        let run = || -> Result<(f64, usize)> {
            let (x, y) = batch?;
            let ids = x.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
            let targets = y.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
            if zero {
                owned.0.zero_grads();
            }
            let loss = owned
                .0
                .forward_backward(&owned.1, &ids, &targets, loss_scale)?;
            Ok((loss as f64, b * block))
        };
        Some(run())
    }

    fn flops_per_token(&self) -> Option<f64> {
        Some(self.model.config().train_flops_per_token())
    }

    fn owned_grads(&self) -> Option<&[Vec<f32>]> {
        Some(self.owned.as_ref()?.as_ref()?.0.grads())
    }

    fn train_loss(&mut self, rng: &mut ChaCha8Rng) -> Result<(Tensor, usize)> {
        let block = self.model.config().block_size;
        let (x, y) = self.data.batch(
            Split::Train,
            self.batch_size,
            block,
            rng,
            self.model.device(),
        )?;
        let loss = self.batch_loss(&x, &y, Some(rng))?;
        Ok((loss, self.batch_size * block))
    }

    /// Mean loss over `eval_iters` random batches of each split, as nanoGPT's
    /// `estimate_loss()`: metrics `train_loss` and `val_loss`.
    fn evaluate(&mut self, eval_iters: usize, rng: &mut ChaCha8Rng) -> Result<Vec<(String, f64)>> {
        let block = self.model.config().block_size;
        let mut out = Vec::new();
        for split in [Split::Train, Split::Val] {
            let mut sum = 0f64;
            for _ in 0..eval_iters {
                let (x, y) =
                    self.data
                        .batch(split, self.batch_size, block, rng, self.model.device())?;
                // After a hand-written training step, its forward on its own buffers; else
                // (autograd, or no step built yet) candle's.
                let loss = match &mut self.owned {
                    Some(Some((step, params))) if self.owned_trained => {
                        let ids = x.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
                        let targets = y.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
                        step.loss(params, &ids, &targets)?
                    }
                    _ => self.batch_loss(&x.detach(), &y, None)?.to_scalar::<f32>()?,
                };
                sum += loss as f64;
            }
            out.push((format!("{split}_loss"), sum / eval_iters as f64));
        }
        Ok(out)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        save_model(dir, &self.model, &self.tokenizer)
    }
}
