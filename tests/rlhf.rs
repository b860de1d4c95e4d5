//! The preference stages end to end on small generated data: a reward model learning a rule,
//! the frozen reference staying frozen, and stopping and resuming each of the three runs.

mod common;

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tinygpt::candle::{Device, Tensor};
use tinygpt::chat::Message;
use tinygpt::rlhf::{
    Dpo, Ppo, PpoConfig, PreferenceDataset, PreferencePair, RewardModel, RewardTraining, ScalarHead,
};
use tinygpt::{
    checkpoint, Arch, ChatTemplate, Gpt, GptConfig, Objective, Tokenizer, TrainConfig, TrainEvent,
    Trainer,
};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tinygpt-rlhf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn chat_tokenizer() -> (Tokenizer, ChatTemplate) {
    let mut tok = Tokenizer::train_char("abcdefghx ").unwrap();
    let t = ChatTemplate::add_tokens(&mut tok).unwrap();
    (tok, t)
}

/// The tiny model of `arch`, 16 wide. The Llama one has grouped-query attention (4 query
/// heads sharing 2 key/value heads of 4) and RMSNorm on queries and keys (Qwen3's q/k norms).
fn tiny_arch(arch: Arch, vocab_size: usize) -> GptConfig {
    match arch {
        Arch::Gpt2 => GptConfig {
            vocab_size,
            block_size: 24,
            n_layer: 1,
            n_head: 2,
            n_embd: 16,
            dropout: 0.0,
            bias: true,
            ..Default::default()
        },
        Arch::Llama => GptConfig {
            n_kv_head: Some(2),
            intermediate_size: Some(32),
            qk_norm: true,
            ..GptConfig::llama(vocab_size, 24, 1, 4, 16)
        },
    }
}

fn letters(rng: &mut ChaCha8Rng, n: usize) -> String {
    (0..n)
        .map(|_| (b'a' + rng.random_range(0..8u8)) as char)
        .collect()
}

/// Pairs decided by a rule: the chosen reply contains an `x`, the rejected one does not.
fn rule_pairs(n: usize, seed: u64) -> Vec<PreferencePair> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(3..6);
            let mut chosen: Vec<char> = letters(&mut rng, len).chars().collect();
            let at = rng.random_range(0..len);
            chosen[at] = 'x';
            PreferencePair {
                prompt: letters(&mut rng, 3),
                history: vec![],
                chosen: chosen.into_iter().collect(),
                rejected: letters(&mut rng, len),
            }
        })
        .collect()
}

fn datasets(tok: &Tokenizer, t: &ChatTemplate) -> (PreferenceDataset, PreferenceDataset) {
    let (train, _) = PreferenceDataset::new(&rule_pairs(200, 1), tok, t, 24, 8).unwrap();
    let (val, _) = PreferenceDataset::new(&rule_pairs(40, 2), tok, t, 24, 8).unwrap();
    (train, val)
}

/// An "SFT" checkpoint (a seeded tiny model with the chat tokens) and a reward model with a
/// seeded head, saved as checkpoint directories.
fn checkpoints(root: &Path) -> (PathBuf, PathBuf) {
    checkpoints_arch(root, Arch::Gpt2)
}

fn checkpoints_arch(root: &Path, arch: Arch) -> (PathBuf, PathBuf) {
    let (tok, _) = chat_tokenizer();
    let cfg = tiny_arch(arch, tok.vocab_size());
    let sft = root.join("sft");
    std::fs::create_dir_all(&sft).unwrap();
    checkpoint::save_model(&sft, &Gpt::init(&cfg, 21, &Device::Cpu).unwrap(), &tok).unwrap();
    let rm = root.join("rm");
    std::fs::create_dir_all(&rm).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    let w: Vec<f32> = (0..16).map(|_| rng.random_range(-1.0..1.0)).collect();
    let head = ScalarHead::from_tensors(
        "score",
        Tensor::new(w, &Device::Cpu).unwrap(),
        Tensor::new(&[0f32], &Device::Cpu).unwrap(),
        false,
    )
    .unwrap();
    let backbone = Gpt::init(&cfg, 23, &Device::Cpu).unwrap();
    RewardModel::from_parts(backbone, head)
        .unwrap()
        .save(&rm, &tok)
        .unwrap();
    (sft, rm)
}

fn weights(model: &Gpt) -> Vec<(String, Vec<f32>)> {
    let mut w: Vec<(String, Vec<f32>)> = model
        .tensors()
        .into_iter()
        .map(|(k, t)| (k, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn ppo_cfg() -> PpoConfig {
    PpoConfig {
        rollout_size: 8,
        minibatch_size: 4,
        ppo_epochs: 2,
        max_new_tokens: 6,
        kl_coef: 0.1,
        target_kl: Some(1.0),
        kl_horizon: 100.0,
        ..PpoConfig::default()
    }
}

fn prompts() -> Vec<Vec<Message>> {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    (0..20)
        .map(|_| vec![Message::user(letters(&mut rng, 4))])
        .collect()
}

#[test]
fn reward_model_learns_a_rule_to_high_held_out_accuracy() {
    reward_model_learns_a_rule(Arch::Gpt2);
}

#[test]
fn llama_reward_model_learns_a_rule_to_high_held_out_accuracy() {
    reward_model_learns_a_rule(Arch::Llama);
}

fn reward_model_learns_a_rule(arch: Arch) {
    let (tok, t) = chat_tokenizer();
    let (train, val) = datasets(&tok, &t);
    let model =
        RewardModel::new(Gpt::init(&tiny_arch(arch, tok.vocab_size()), 3, &Device::Cpu).unwrap())
            .unwrap();
    let mut obj = RewardTraining::new(model, tok, train, val.clone(), 16).unwrap();
    let before = obj.metrics(&val, usize::MAX).unwrap().unwrap();
    assert_eq!(before.accuracy, 0.5); // the zero head ties every pair
    assert!((before.loss - std::f64::consts::LN_2).abs() < 1e-6);
    let cfg = TrainConfig {
        max_iters: 150,
        eval_interval: 150,
        eval_iters: 3,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_iters: 10,
        lr_decay_iters: 150,
        weight_decay: 0.0,
        ..TrainConfig::default()
    };
    let mut trainer = Trainer::new(cfg, obj.parameters().unwrap()).unwrap();
    trainer.fit(&mut obj, |_| {}).unwrap();
    let after = obj.metrics(&val, usize::MAX).unwrap().unwrap();
    assert!(after.accuracy >= 0.9, "held-out accuracy {after:?}");
    assert!(after.margin > 0.0);
}

#[test]
fn the_reference_is_bit_identical_after_dpo_and_ppo() {
    the_reference_is_bit_identical(Arch::Gpt2);
}

#[test]
fn llama_the_reference_is_bit_identical_after_dpo_and_ppo() {
    the_reference_is_bit_identical(Arch::Llama);
}

fn the_reference_is_bit_identical(arch: Arch) {
    let root = tmp(&format!("frozen-{arch}"));
    let (sft, rm) = checkpoints_arch(&root, arch);
    let (tok, t) = chat_tokenizer();
    let (train, val) = datasets(&tok, &t);
    let cfg = TrainConfig {
        max_iters: 8,
        eval_interval: 8,
        eval_iters: 1,
        lr: 1e-2,
        warmup_iters: 0,
        ..TrainConfig::default()
    };

    let (policy, tok) = checkpoint::load_trainable(&sft, &Device::Cpu).unwrap();
    let (reference, _) = checkpoint::load_model(&sft, &Device::Cpu).unwrap();
    let before = weights(&reference);
    let mut dpo = Dpo::new(policy, reference, tok, train, val, 8, 0.1).unwrap();
    Trainer::new(cfg.clone(), dpo.parameters().unwrap())
        .unwrap()
        .fit(&mut dpo, |_| {})
        .unwrap();
    assert_eq!(
        weights(dpo.reference()),
        before,
        "DPO changed the reference"
    );
    assert_ne!(
        weights(dpo.policy()),
        before,
        "DPO did not train the policy"
    );

    let mut ppo = Ppo::load(&sft, &rm, None, &prompts(), ppo_cfg(), &Device::Cpu).unwrap();
    let rm_before = weights(ppo.reward_model().backbone());
    Trainer::new(cfg, ppo.parameters().unwrap())
        .unwrap()
        .fit(&mut ppo, |_| {})
        .unwrap();
    assert_eq!(ppo.state().iteration, 2);
    assert_eq!(
        weights(ppo.reference()),
        before,
        "PPO changed the reference"
    );
    assert_eq!(weights(ppo.reward_model().backbone()), rm_before);
    assert_ne!(
        weights(ppo.policy()),
        before,
        "PPO did not train the policy"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// DPO and PPO compare the policy with its reference in one mode, dropout off in both (as TRL
/// does): with dropout 0.5 and policy = reference, DPO's first training loss is ln 2 and PPO's
/// first ratio is 1 and its KL 0, as they are without dropout.
#[test]
fn policy_and_reference_compare_without_dropout() {
    compare_without_dropout(Arch::Gpt2);
}

#[test]
fn llama_policy_and_reference_compare_without_dropout() {
    compare_without_dropout(Arch::Llama);
}

fn compare_without_dropout(arch: Arch) {
    let (tok, t) = chat_tokenizer();
    let cfg = GptConfig {
        dropout: 0.5,
        ..tiny_arch(arch, tok.vocab_size())
    };
    let policy = Gpt::init(&cfg, 31, &Device::Cpu).unwrap();
    let reference = Gpt::from_tensors(&cfg, common::copies(&policy), false).unwrap();
    let (train, val) = datasets(&tok, &t);
    let mut dpo = Dpo::new(
        policy.clone(),
        reference.clone(),
        tok.clone(),
        train,
        val,
        8,
        0.1,
    )
    .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    for step in 0..3 {
        let (loss, tokens) = dpo.train_loss(&mut rng).unwrap();
        assert!(tokens > 0);
        let value = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (value - std::f64::consts::LN_2).abs() < 1e-6,
            "batch {step}: {value}"
        );
        // The loss still reaches the policy's weights.
        let grads = loss.backward().unwrap();
        let vars = dpo.parameters().unwrap();
        assert!(vars.iter().any(|(_, v)| grads.get(v.as_tensor()).is_some()));
    }

    let backbone = Gpt::init(&cfg, 32, &Device::Cpu).unwrap();
    let backbone = Gpt::from_tensors(&cfg, backbone.tensors(), false).unwrap();
    let w: Vec<f32> = (0..16).map(|i| ((i % 5) as f32 - 2.0) * 0.5).collect();
    let head = ScalarHead::from_tensors(
        "score",
        Tensor::new(w, &Device::Cpu).unwrap(),
        Tensor::new(&[0f32], &Device::Cpu).unwrap(),
        false,
    )
    .unwrap();
    let reward = RewardModel::from_parts(backbone, head).unwrap();
    let value_head = ScalarHead::zeros(Ppo::VALUE_HEAD_NAME, 16, &Device::Cpu, true).unwrap();
    let mut ppo = Ppo::new(
        policy,
        value_head,
        reference,
        reward,
        tok,
        &prompts(),
        ppo_cfg(),
    )
    .unwrap();
    let (loss, tokens) = ppo.train_loss(&mut rng).unwrap();
    assert!(tokens > 0 && loss.to_scalar::<f32>().unwrap().is_finite());
    let s = *ppo.last_minibatch().unwrap();
    assert_eq!((s.ratio_min, s.ratio_max), (1.0, 1.0), "{s:?}");
    assert_eq!((s.clip_fraction, s.approx_kl), (0.0, 0.0));
    let r = *ppo.current_rollout().unwrap();
    assert_eq!((r.kl, r.kl_per_token), (0.0, 0.0), "{r:?}");
}

// ---------------------------------------------------------------------------------------------
// Stopping and resuming
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    Reward,
    Dpo,
    Ppo,
}

fn stage_cfg(stage: Stage) -> TrainConfig {
    let (max_iters, eval_interval) = match stage {
        // 2 epochs × 2 minibatches = 4 steps per PPO iteration.
        Stage::Ppo => (12, 4),
        _ => (20, 5),
    };
    TrainConfig {
        max_iters,
        eval_interval,
        eval_iters: 2,
        log_interval: 1,
        batch_size: 4,
        lr: 3e-3,
        min_lr: 3e-4,
        warmup_iters: 3,
        lr_decay_iters: max_iters,
        weight_decay: 0.0,
        always_save_checkpoint: true,
        ..TrainConfig::default()
    }
}

fn objective(stage: Stage, root: &Path, out: &Path, resume: bool) -> Box<dyn Objective> {
    let (sft, rm) = (root.join("sft"), root.join("rm"));
    let (tok, t) = chat_tokenizer();
    let (train, val) = datasets(&tok, &t);
    let dev = &Device::Cpu;
    let from = if resume { out } else { sft.as_path() };
    match stage {
        Stage::Reward => {
            let (model, tok) = if resume {
                RewardModel::load_trainable(out, dev).unwrap()
            } else {
                RewardModel::from_sft(&sft, dev).unwrap()
            };
            Box::new(RewardTraining::new(model, tok, train, val, 4).unwrap())
        }
        Stage::Dpo => {
            let (policy, tok) = checkpoint::load_trainable(from, dev).unwrap();
            let (reference, _) = checkpoint::load_model(&sft, dev).unwrap();
            Box::new(Dpo::new(policy, reference, tok, train, val, 4, 0.1).unwrap())
        }
        Stage::Ppo => Box::new(
            Ppo::load(&sft, &rm, resume.then_some(out), &prompts(), ppo_cfg(), dev).unwrap(),
        ),
    }
}

/// Runs a stage into `out` (fresh or resumed) and returns (step, loss) of every step; with
/// `stop_after`, unwinds out of training after that step as if the process were killed.
fn run(
    stage: Stage,
    root: &Path,
    out: &Path,
    resume: bool,
    stop_after: Option<usize>,
) -> Vec<(usize, f64)> {
    let mut obj = objective(stage, root, out, resume);
    let mut trainer = Trainer::new(stage_cfg(stage), obj.parameters().unwrap())
        .unwrap()
        .with_out_dir(out);
    if resume {
        trainer = trainer.resume_from(out).unwrap();
    }
    let mut steps = vec![];
    let result = trainer.fit(obj.as_mut(), |e| {
        if let TrainEvent::Step { step, loss, .. } = e {
            steps.push((*step, *loss));
            if Some(*step) == stop_after {
                std::panic::panic_any("stopped");
            }
        }
    });
    if stop_after.is_none() {
        result.unwrap();
    }
    steps
}

fn stop_and_resume(stage: Stage) {
    let root = tmp(&format!("resume-{stage:?}"));
    checkpoints(&root);
    let full = run(stage, &root, &root.join("full"), false, None);
    let cfg = stage_cfg(stage);
    assert_eq!(full.len(), cfg.max_iters);

    // Stop after step 6: the last complete checkpoint holds step 5 (PPO: 4, one iteration).
    let out = root.join("stopped");
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(stage, &root, &out, false, Some(6))
    }));
    assert!(stopped.is_err());
    let state = tinygpt::train::TrainerState::load(&out).unwrap();
    assert_eq!(state.step, cfg.eval_interval);
    // The checkpoint loads: as a plain model, and as what the stage wrote.
    checkpoint::load_model(&out, &Device::Cpu).unwrap();
    match stage {
        Stage::Reward => {
            RewardModel::load(&out, &Device::Cpu).unwrap();
        }
        Stage::Ppo => {
            let s = tinygpt::rlhf::ppo::PpoState::load(&out).unwrap();
            assert_eq!(s.iteration, 1);
        }
        Stage::Dpo => {}
    }
    let names: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.iter().all(|n| !n.contains(".tmp-")),
        "a temporary directory was left behind: {names:?}"
    );

    // Resuming continues the same run: the same losses at the same steps.
    let resumed = run(stage, &root, &out, true, None);
    assert_eq!(resumed.first().map(|s| s.0), Some(cfg.eval_interval + 1));
    for (r, f) in resumed.iter().zip(&full[cfg.eval_interval..]) {
        assert_eq!(r.0, f.0);
        assert!(
            (r.1 - f.1).abs() < 1e-5,
            "{stage:?}: loss at step {}: {} vs {}",
            r.0,
            r.1,
            f.1
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn reward_run_stops_and_resumes() {
    stop_and_resume(Stage::Reward);
}

#[test]
fn dpo_run_stops_and_resumes() {
    stop_and_resume(Stage::Dpo);
}

#[test]
fn ppo_run_stops_and_resumes() {
    stop_and_resume(Stage::Ppo);
}

#[test]
fn ppo_metrics_have_one_line_per_iteration() {
    let root = tmp("ppo-metrics");
    checkpoints(&root);
    let out = root.join("ppo");
    run(Stage::Ppo, &root, &out, false, None);
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "eval") // the "train" rows are the optimiser steps'
        .collect();
    assert_eq!(lines.len(), 4); // steps 0, 4, 8, 12
    for key in [
        "reward_mean",
        "kl",
        "entropy",
        "clip_fraction",
        "value_loss",
        "response_length",
        "kl_coef",
    ] {
        assert!(lines[3].get(key).is_some(), "no {key} in {}", lines[3]);
    }
    assert_eq!(lines[1]["iteration"], 0.0);
    assert_eq!(lines[3]["iteration"], 2.0);
    // The first rollout came from the SFT model itself: zero KL.
    assert_eq!(lines[1]["kl"], 0.0);
    std::fs::remove_dir_all(&root).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Interrupting (Ctrl-C's stop flag) and resuming from the latest state, bit for bit
// ---------------------------------------------------------------------------------------------

/// Trains `stage` into `out`, from `from` (a state to resume) or fresh; raises the stop flag
/// after step `stop_after` as Ctrl-C would. Returns the error `fit` ended with, if any.
fn run_stoppable(
    stage: Stage,
    root: &Path,
    out: &Path,
    from: Option<&Path>,
    stop_after: Option<usize>,
) -> Option<tinygpt::Error> {
    let mut obj = objective(stage, root, from.unwrap_or(out), from.is_some());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut trainer = Trainer::new(stage_cfg(stage), obj.parameters().unwrap())
        .unwrap()
        .with_out_dir(out)
        .with_stop_flag(stop.clone());
    if let Some(from) = from {
        trainer = trainer.resume_from(from).unwrap();
    }
    trainer
        .fit(obj.as_mut(), |e| {
            if let TrainEvent::Step { step, .. } = e {
                if Some(*step) == stop_after {
                    stop.store(true, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
        .err()
}

/// Every file of the newest state of `out` but the logs and the manifest, by name.
fn final_state(out: &Path) -> Vec<(String, Vec<u8>)> {
    let last = checkpoint::latest_state(out).unwrap();
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(&last)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().into_string().unwrap())
        .filter(|n| {
            !matches!(
                n.as_str(),
                "metrics.jsonl" | "manifest.json" | "trainer_state.json"
            )
        })
        .map(|n| (n.clone(), std::fs::read(last.join(&n)).unwrap()))
        .collect();
    files.sort();
    files
}

fn interrupt_and_resume(stage: Stage) {
    interrupt_and_resume_arch(stage, Arch::Gpt2);
}

fn interrupt_and_resume_arch(stage: Stage, arch: Arch) {
    let root = tmp(&format!("interrupt-{stage:?}-{arch}"));
    checkpoints_arch(&root, arch);
    let full = root.join("full");
    assert!(run_stoppable(stage, &root, &full, None, None).is_none());
    let want = final_state(&full);
    assert!(want.iter().any(|(n, _)| n == "model.safetensors"));

    // The flag goes up during step 6; PPO finishes its iteration (steps 5 to 8) first.
    let out = root.join("stopped");
    let at = if stage == Stage::Ppo { 8 } else { 6 };
    match run_stoppable(stage, &root, &out, None, Some(6)) {
        Some(tinygpt::Error::Interrupted {
            step,
            saved: Some(saved),
        }) => {
            assert_eq!(step, at, "{stage:?}");
            let state = tinygpt::train::TrainerState::load(&saved).unwrap();
            assert_eq!(state.step, at);
            assert_eq!(state.kind, tinygpt::train::StateKind::Interrupted);
            assert!(checkpoint::verify(&saved).unwrap());
        }
        other => panic!("{stage:?}: {other:?}"),
    }
    let from = checkpoint::latest_state(&out).unwrap();
    assert_eq!(from, out.join(format!("checkpoint-{at}")));
    assert!(run_stoppable(stage, &root, &out, Some(&from), None).is_none());
    let got = final_state(&out);
    assert_eq!(
        got.iter().map(|f| &f.0).collect::<Vec<_>>(),
        want.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for ((name, a), (_, b)) in got.iter().zip(&want) {
        assert!(
            a == b,
            "{stage:?}: {name} differs from the uninterrupted run's"
        );
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn reward_interrupted_resumes_bit_for_bit() {
    interrupt_and_resume(Stage::Reward);
}

#[test]
fn dpo_interrupted_resumes_bit_for_bit() {
    interrupt_and_resume(Stage::Dpo);
}

#[test]
fn ppo_interrupted_resumes_bit_for_bit() {
    interrupt_and_resume(Stage::Ppo);
}

#[test]
fn llama_reward_interrupted_resumes_bit_for_bit() {
    interrupt_and_resume_arch(Stage::Reward, Arch::Llama);
}

#[test]
fn llama_dpo_interrupted_resumes_bit_for_bit() {
    interrupt_and_resume_arch(Stage::Dpo, Arch::Llama);
}

#[test]
fn llama_ppo_interrupted_resumes_bit_for_bit() {
    interrupt_and_resume_arch(Stage::Ppo, Arch::Llama);
}
