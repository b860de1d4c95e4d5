//! Direct Preference Optimization (Rafailov et al. 2023): the policy learns from preference
//! pairs directly, with no reward model and no sampling.
//!
//! DPO observes that the KL-regularised RLHF objective has a closed-form optimum, in which the
//! reward is `β log(π(y|x) / π_ref(y|x))` up to a function of the prompt. Substituting this
//! *implicit reward* into the Bradley–Terry loss gives a loss on the policy alone:
//!
//! ```text
//! L = −log σ(β [(log π(y_c|x) − log π_ref(y_c|x)) − (log π(y_r|x) − log π_ref(y_r|x))])
//! ```
//!
//! where `log π(y|x)` is summed over the reply's tokens (its content and `<|end|>`) only —
//! never the prompt or padding ([`crate::rlhf::sequence_logprobs`]). `π_ref` is the SFT model,
//! frozen: loaded with constant weights and run without building a graph, so it never changes.
//! Both are run with dropout off, in training too (TRL's `DPOConfig.disable_dropout`, on by
//! default): dropout in the policy's pass alone would make `log π − log π_ref` noise that
//! neither model has. So at the start `π = π_ref`, both implicit rewards are 0 and the loss is
//! exactly `ln 2`, whatever the model's `dropout`.
//!
//! Logged (as TRL's `DPOTrainer` does): the loss, the implicit rewards of both sides
//! (`reward_chosen`, `reward_rejected`), their mean difference (`reward_margin`) and the
//! fraction of pairs whose chosen reply has the larger one (`reward_accuracy`).

use std::path::Path;

use candle_core::{Tensor, Var};
use rand_chacha::ChaCha8Rng;

use crate::checkpoint::save_model;
use crate::model::Gpt;
use crate::rlhf::data::PreferenceDataset;
use crate::rlhf::logprobs::{log_sigmoid, sequence_logprobs};
use crate::rlhf::reward::{PairAccumulator, PairMetrics};
use crate::tokenizer::Tokenizer;
use crate::train::Objective;
use crate::{Error, Result};

/// The DPO loss and implicit rewards from summed log-probabilities `(N,)` of the policy and
/// the reference on the chosen and rejected replies: `(mean loss, β(π_c − ref_c),
/// β(π_r − ref_r))`. The reference's terms are detached.
///
/// # Errors
/// [`Error::InvalidArgument`] if the shapes differ.
pub fn dpo_loss(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    beta: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let shape = policy_chosen.dims();
    for t in [policy_rejected, ref_chosen, ref_rejected] {
        if t.dims() != shape {
            return Err(Error::InvalidArgument(format!(
                "DPO log-probabilities differ in shape: {shape:?} and {:?}",
                t.dims()
            )));
        }
    }
    let chosen = ((policy_chosen - ref_chosen.detach())? * beta)?; // (N,)
    let rejected = ((policy_rejected - ref_rejected.detach())? * beta)?; // (N,)
    let loss = log_sigmoid(&(&chosen - &rejected)?)?.mean_all()?.neg()?;
    Ok((loss, chosen.detach(), rejected.detach()))
}

/// The DPO [`Objective`]: a trainable policy, its frozen reference and preference pairs.
#[derive(Debug)]
pub struct Dpo {
    policy: Gpt,
    reference: Gpt,
    tokenizer: Tokenizer,
    train: PreferenceDataset,
    val: PreferenceDataset,
    batch_size: usize,
    beta: f64,
}

impl Dpo {
    /// The stage's name, [`Objective::stage`]: what `trainer_state.json` records, and the
    /// name of the example that runs it.
    pub const STAGE: &'static str = "dpo";

    /// DPO of `policy` (trainable) against `reference` (constant weights, e.g. the SFT
    /// checkpoint loaded with [`crate::checkpoint::load_model`]) on `train`, evaluated on
    /// `val`, with `batch_size` pairs per batch and temperature `beta` (the paper: 0.1).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `train` is empty, `batch_size` is 0, `beta` is not
    /// positive, the reference has trainable weights, or the two models differ in shape.
    pub fn new(
        policy: Gpt,
        reference: Gpt,
        tokenizer: Tokenizer,
        train: PreferenceDataset,
        val: PreferenceDataset,
        batch_size: usize,
        beta: f64,
    ) -> Result<Self> {
        if train.is_empty() || batch_size == 0 || !(beta > 0.0 && beta.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "DPO needs pairs, batch_size >= 1 and beta > 0 (got {}, {batch_size}, {beta})",
                train.len()
            )));
        }
        check_reference(&policy, &reference)?;
        Ok(Self {
            policy,
            reference,
            tokenizer,
            train,
            val,
            batch_size,
            beta,
        })
    }

    /// The policy being trained.
    pub fn policy(&self) -> &Gpt {
        &self.policy
    }

    /// The frozen reference.
    pub fn reference(&self) -> &Gpt {
        &self.reference
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The held-out pairs.
    pub fn val(&self) -> &PreferenceDataset {
        &self.val
    }

    /// Loss and implicit rewards `(N,)` for the pairs at `indices`. Both models run without
    /// dropout (see the module docs); the policy's pass builds a graph when its weights are
    /// trainable.
    fn batch(
        &self,
        data: &PreferenceDataset,
        indices: &[usize],
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let batch = data.batch(indices, self.tokenizer.eot_id(), self.policy.device())?;
        let n = indices.len();
        let (_, policy) = sequence_logprobs(&self.policy, &batch, None)?; // (2N,)
        let (_, reference) = sequence_logprobs(&self.reference, &batch, None)?; // (2N,), no graph
        let reference = reference.detach();
        dpo_loss(
            &policy.narrow(0, 0, n)?,
            &policy.narrow(0, n, n)?,
            &reference.narrow(0, 0, n)?,
            &reference.narrow(0, n, n)?,
            self.beta,
        )
    }

    /// Loss, implicit-reward accuracy and margins over the first `max_batches` batches of
    /// `data` (in order; `usize::MAX` for all). `None` for an empty set.
    ///
    /// # Errors
    /// Tensor errors.
    pub fn metrics(
        &self,
        data: &PreferenceDataset,
        max_batches: usize,
    ) -> Result<Option<PairMetrics>> {
        let mut acc = PairAccumulator::default();
        let indices: Vec<usize> = (0..data.len()).collect();
        for chunk in indices.chunks(self.batch_size).take(max_batches) {
            let (loss, c, r) = self.batch(data, chunk)?;
            acc.add(loss.to_scalar::<f32>()? as f64, &c, &r)?;
        }
        Ok(acc.finish())
    }
}

/// Checks that `reference` has constant weights and the same shape as `policy`.
pub(crate) fn check_reference(policy: &Gpt, reference: &Gpt) -> Result<()> {
    if reference
        .named_parameters()
        .iter()
        .any(|(_, t)| t.is_variable())
    {
        return Err(Error::InvalidArgument(
            "the reference model must have constant weights (load it with checkpoint::load_model)"
                .into(),
        ));
    }
    // A reference built from the policy's own tensors would move with every optimiser step
    // (AdamW updates the policy's weights in place), and its KL would stay 0.
    let storage = |t: &Tensor| {
        let (s, _) = t.storage_and_layout();
        std::ptr::from_ref(&*s).addr()
    };
    for ((name, p), (_, r)) in policy
        .named_parameters()
        .iter()
        .zip(reference.named_parameters())
    {
        if p.is_variable() && storage(p) == storage(r) {
            return Err(Error::InvalidArgument(format!(
                "the reference shares the policy's trainable weight `{name}`: training would \
                 move it too; load it separately (checkpoint::load_model) or build it from \
                 copies (Tensor::copy)"
            )));
        }
    }
    if policy.config() != reference.config() {
        return Err(Error::InvalidArgument(format!(
            "policy and reference differ: {:?} vs {:?}",
            policy.config(),
            reference.config()
        )));
    }
    Ok(())
}

impl Objective for Dpo {
    fn stage(&self) -> &str {
        Self::STAGE
    }

    fn parameters(&self) -> Result<Vec<(String, Var)>> {
        self.policy.vars()
    }

    /// `batch_size` pairs drawn at random (with replacement), the policy without dropout
    /// like its reference.
    fn train_loss(&mut self, rng: &mut ChaCha8Rng) -> Result<(Tensor, usize)> {
        let (indices, tokens) = self.train.sample(self.batch_size, rng);
        let (loss, _, _) = self.batch(&self.train, &indices)?;
        Ok((loss, tokens))
    }

    /// Over the first `eval_iters` batches of each set (the same pairs every time):
    /// `train_loss`, and on the held-out set (or the training set when there is none)
    /// `val_loss`, `reward_accuracy`, `reward_margin`, `reward_chosen`, `reward_rejected`.
    fn evaluate(&mut self, eval_iters: usize, _rng: &mut ChaCha8Rng) -> Result<Vec<(String, f64)>> {
        let mut out = Vec::new();
        let train = self.metrics(&self.train, eval_iters)?;
        if let Some(m) = &train {
            out.push(("train_loss".to_string(), m.loss));
        }
        let held_out = self.metrics(&self.val, eval_iters)?;
        if let Some(m) = &held_out {
            out.push(("val_loss".to_string(), m.loss));
        }
        if let Some(m) = held_out.or(train) {
            out.push(("reward_accuracy".to_string(), m.accuracy));
            out.push(("reward_margin".to_string(), m.margin));
            out.push(("reward_chosen".to_string(), m.chosen));
            out.push(("reward_rejected".to_string(), m.rejected));
        }
        Ok(out)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        save_model(dir, &self.policy, &self.tokenizer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::ChatTemplate;
    use crate::rlhf::data::{PreferencePair, SequenceBatch};
    use crate::testing::copies;
    use crate::GptConfig;
    use candle_core::Device;

    fn setup() -> (Gpt, Gpt, Tokenizer, PreferenceDataset) {
        let mut tok = Tokenizer::train_char("abcdefgh").unwrap();
        let template = ChatTemplate::add_tokens(&mut tok).unwrap();
        let cfg = GptConfig {
            vocab_size: tok.vocab_size(),
            block_size: 24,
            n_layer: 1,
            n_head: 2,
            n_embd: 16,
            dropout: 0.0,
            bias: true,
            ..Default::default()
        };
        let policy = Gpt::init(&cfg, 5, &Device::Cpu).unwrap();
        let reference = Gpt::from_tensors(&cfg, copies(&policy), false).unwrap();
        let pairs: Vec<PreferencePair> = ["ab", "cde", "fgh", "a"]
            .iter()
            .map(|p| PreferencePair {
                prompt: p.to_string(),
                history: vec![],
                chosen: format!("{p}a"),
                rejected: "hhhh".into(),
            })
            .collect();
        let (ds, _) = PreferenceDataset::new(&pairs, &tok, &template, 24, 12).unwrap();
        (policy, reference, tok, ds)
    }

    #[test]
    fn loss_at_initialisation_is_ln_2() {
        let (policy, reference, tok, ds) = setup();
        let dpo = Dpo::new(policy, reference, tok, ds.clone(), ds.clone(), 4, 0.1).unwrap();
        let (loss, c, r) = dpo.batch(&ds, &[0, 1, 2, 3]).unwrap();
        let loss = loss.to_scalar::<f32>().unwrap() as f64;
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-6, "{loss}");
        assert_eq!(c.to_vec1::<f32>().unwrap(), vec![0.0; 4]);
        assert_eq!(r.to_vec1::<f32>().unwrap(), vec![0.0; 4]);
        // The reference builds no autograd graph; the policy does.
        let batch = ds
            .batch(&[0, 1], dpo.tokenizer.eot_id(), &Device::Cpu)
            .unwrap();
        let (_, ref_lp) = sequence_logprobs(&dpo.reference, &batch, None).unwrap();
        let (_, pol_lp) = sequence_logprobs(&dpo.policy, &batch, None).unwrap();
        assert!(!ref_lp.track_op());
        assert!(pol_lp.track_op());
        // Hand computation: β = 0.5, margins (1 − 0) − (0 − 1) = 2 → −log σ(1).
        let t = |v: f32| Tensor::new(&[v], &Device::Cpu).unwrap();
        let (l, c, r) = dpo_loss(&t(1.0), &t(0.0), &t(0.0), &t(1.0), 0.5).unwrap();
        let want = (1.0 + (-1f64).exp()).ln();
        assert!((l.to_scalar::<f32>().unwrap() as f64 - want).abs() < 1e-6);
        assert_eq!(c.to_vec1::<f32>().unwrap(), vec![0.5]);
        assert_eq!(r.to_vec1::<f32>().unwrap(), vec![-0.5]);
    }

    #[test]
    fn reference_must_be_constant() {
        let (policy, _, tok, ds) = setup();
        let also_trainable = policy.clone();
        let e = Dpo::new(policy, also_trainable, tok, ds.clone(), ds, 4, 0.1).unwrap_err();
        assert!(e.to_string().contains("constant weights"), "{e}");
    }

    #[test]
    fn log_probs_count_response_tokens_only() {
        // Changing the labels of prompt and padding positions changes neither the summed
        // log-probabilities nor their gradients.
        let (policy, _, tok, ds) = setup();
        let batch = ds.batch(&[0, 1], tok.eot_id(), &Device::Cpu).unwrap();
        let run = |b: &SequenceBatch| {
            let (_, s) = sequence_logprobs(&policy, b, None).unwrap();
            let g = s.sum_all().unwrap().backward().unwrap();
            let grads: Vec<Vec<f32>> = policy
                .vars()
                .unwrap()
                .iter()
                .map(|(_, v)| {
                    g.get(v.as_tensor())
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap()
                })
                .collect();
            (s.to_vec1::<f32>().unwrap(), grads)
        };
        let (s1, g1) = run(&batch);
        let mask = batch.response_mask.to_vec2::<f32>().unwrap();
        let vocab = tok.vocab_size() as u32;
        let targets: Vec<Vec<u32>> = batch
            .targets
            .to_vec2::<u32>()
            .unwrap()
            .iter()
            .zip(&mask)
            .map(|(row, m)| {
                row.iter()
                    .zip(m)
                    .map(|(&t, &k)| if k == 0.0 { (t + 5) % vocab } else { t })
                    .collect()
            })
            .collect();
        assert!(mask.iter().flatten().any(|&k| k == 0.0));
        let mut other = batch.clone();
        other.targets = Tensor::new(targets, &Device::Cpu).unwrap();
        assert_ne!(
            other.targets.to_vec2::<u32>().unwrap(),
            batch.targets.to_vec2::<u32>().unwrap()
        );
        let (s2, g2) = run(&other);
        assert_eq!(s1, s2);
        assert_eq!(g1, g2);
        // And the sum is the sum of the response tokens' log-probabilities, by hand.
        let logits = policy.forward(&batch.ids).unwrap();
        let lp = crate::rlhf::token_logprobs(
            &logits.narrow(1, 0, batch.ids.dim(1).unwrap() - 1).unwrap(),
            &batch.targets,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        for (row, (lp, m)) in lp.iter().zip(&mask).enumerate() {
            let want: f32 = lp
                .iter()
                .zip(m)
                .filter(|(_, &k)| k == 1.0)
                .map(|(l, _)| l)
                .sum();
            assert!((s1[row] - want).abs() < 1e-5, "{} vs {want}", s1[row]);
        }
    }
}
