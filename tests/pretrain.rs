//! Pre-training end to end on small generated data: overfitting, resuming, the KV cache, and
//! bad input. Each test asserts a value we know is right.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tinygpt::candle::{DType, Device, Tensor, Var};
use tinygpt::sampler::TokenGenerator;
use tinygpt::{
    checkpoint, model::cross_entropy, Gpt, GptConfig, LogitsProcessor, Objective, Pretraining,
    SamplingParams, TokenDataset, Tokenizer, TrainConfig, TrainEvent, Trainer,
};

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("tinygpt-it-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn small(vocab_size: usize) -> GptConfig {
    GptConfig {
        vocab_size,
        block_size: 16,
        n_layer: 2,
        n_head: 2,
        n_embd: 32,
        dropout: 0.0,
        bias: true,
        ..Default::default()
    }
}

/// A text of seeded random "words" over a small alphabet, so it has structure to learn.
fn corpus(chars: usize, seed: u64) -> String {
    let words = [
        "the ", "cat ", "sat ", "on ", "a ", "mat.\n", "dog ", "ran ",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut s = String::new();
    while s.len() < chars {
        s.push_str(words[rng.random_range(0..words.len())]);
    }
    s
}

/// One fixed batch, returned every step.
struct FixedBatch {
    model: Gpt,
    x: Tensor,
    y: Tensor,
}

impl Objective for FixedBatch {
    fn stage(&self) -> &str {
        "overfit"
    }
    fn parameters(&self) -> tinygpt::Result<Vec<(String, Var)>> {
        self.model.vars()
    }
    fn train_loss(&mut self, rng: &mut ChaCha8Rng) -> tinygpt::Result<(Tensor, usize)> {
        let logits = self.model.forward_train(&self.x, rng)?;
        let (b, t, v) = logits.dims3()?;
        let loss = cross_entropy(&logits.reshape((b * t, v))?, &self.y.flatten_all()?, None)?;
        Ok((loss, b * t))
    }
    fn evaluate(&mut self, _: usize, _: &mut ChaCha8Rng) -> tinygpt::Result<Vec<(String, f64)>> {
        Ok(vec![])
    }
    fn save(&self, _: &Path) -> tinygpt::Result<()> {
        Ok(())
    }
}

#[test]
fn overfits_one_batch_below_0_1() {
    let cfg = small(32);
    let model = Gpt::init(&cfg, 0, &Device::Cpu).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x: Vec<u32> = (0..4 * 16).map(|_| rng.random_range(0..32)).collect();
    let y: Vec<u32> = (0..4 * 16).map(|_| rng.random_range(0..32)).collect();
    let mut obj = FixedBatch {
        model,
        x: Tensor::from_vec(x, (4, 16), &Device::Cpu).unwrap(),
        y: Tensor::from_vec(y, (4, 16), &Device::Cpu).unwrap(),
    };
    let cfg = TrainConfig {
        max_iters: 300,
        eval_interval: 1000,
        log_interval: 1,
        lr: 1e-2,
        min_lr: 1e-2,
        warmup_iters: 10,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut trainer = Trainer::new(cfg, obj.parameters().unwrap()).unwrap();
    let mut losses = vec![];
    trainer
        .fit(&mut obj, |e| {
            if let TrainEvent::Step { loss, .. } = e {
                losses.push(*loss)
            }
        })
        .unwrap();
    // Random targets over 32 ids: the loss starts near ln 32 = 3.47.
    assert!(
        (losses[0] - 32f64.ln()).abs() < 0.1,
        "first loss {}",
        losses[0]
    );
    let last = *losses.last().unwrap();
    assert!(last < 0.1, "final loss {last}");
}

fn resume_cfg() -> TrainConfig {
    TrainConfig {
        max_iters: 40,
        eval_interval: 10,
        eval_iters: 2,
        log_interval: 1,
        batch_size: 4,
        warmup_iters: 5,
        lr_decay_iters: 40,
        always_save_checkpoint: true,
        ..Default::default()
    }
}

/// Runs pre-training from `start` (a fresh model, or a checkpoint to resume) and returns
/// (step, lr, loss) of every step.
fn run(out: &Path, text: &str, resume: bool, fail_after: Option<usize>) -> Vec<(usize, f64, f64)> {
    let (model, tokenizer) = if resume {
        checkpoint::load_trainable(out, &Device::Cpu).unwrap()
    } else {
        let tok = Tokenizer::train_char(text).unwrap();
        (
            Gpt::init(&small(tok.vocab_size()), 7, &Device::Cpu).unwrap(),
            tok,
        )
    };
    let data = TokenDataset::from_tokens(tokenizer.encode(text).unwrap(), 0.1).unwrap();
    let mut obj = Pretraining::new(model, tokenizer, data, 4).unwrap();
    let mut trainer = Trainer::new(resume_cfg(), obj.parameters().unwrap())
        .unwrap()
        .with_out_dir(out);
    if resume {
        trainer = trainer.resume_from(out).unwrap();
    }
    let mut steps = vec![];
    let result = trainer.fit(&mut obj, |e| {
        if let TrainEvent::Step { step, lr, loss, .. } = e {
            steps.push((*step, *lr, *loss));
            if Some(*step) == fail_after {
                // Simulate the process being killed: unwind out of `fit`.
                std::panic::panic_any("stopped");
            }
        }
    });
    if fail_after.is_none() {
        result.unwrap();
    }
    steps
}

#[test]
fn resuming_a_checkpoint_of_another_stage_is_refused() {
    let text = corpus(3000, 5);
    let dir = tmp("stage");
    run(&dir, &text, false, None);
    let state_path = dir.join(checkpoint::files::TRAINER_STATE);
    let state = std::fs::read_to_string(&state_path).unwrap();
    assert!(state.contains("\"stage\": \"pretrain\""), "{state}");
    std::fs::write(
        &state_path,
        state.replace("\"stage\": \"pretrain\"", "\"stage\": \"sft\""),
    )
    .unwrap();
    // The manifest would name the edited file (see `checkpoint::verify`); without one, as
    // in checkpoints older than manifests, the stage itself is what is checked.
    let e = tinygpt::checkpoint::verify(&dir).unwrap_err().to_string();
    assert!(
        e.contains("trainer_state.json is") && e.contains("its manifest says"),
        "{e}"
    );
    std::fs::remove_file(dir.join(checkpoint::files::MANIFEST)).unwrap();
    let e = tinygpt::train::TrainerState::load_for_stage(&dir, Pretraining::STAGE)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("written by the `sft` stage, not `pretrain`; continue it with `sft --resume"),
        "{e}"
    );
    // The trainer refuses too, before any step, whoever calls it.
    let (model, tokenizer) = checkpoint::load_trainable(&dir, &Device::Cpu).unwrap();
    let data = TokenDataset::from_tokens(tokenizer.encode(&text).unwrap(), 0.1).unwrap();
    let mut obj = Pretraining::new(model, tokenizer, data, 4).unwrap();
    let mut trainer = Trainer::new(resume_cfg(), obj.parameters().unwrap())
        .unwrap()
        .with_out_dir(&dir)
        .resume_from(&dir)
        .unwrap();
    let mut events = 0;
    let e = trainer
        .fit(&mut obj, |_| events += 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("written by the `sft` stage, not `pretrain`"),
        "{e}"
    );
    assert_eq!(events, 0);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn resume_continues_the_schedule_and_the_run() {
    let text = corpus(6000, 3);
    let a_dir = tmp("resume-a");
    let full = run(&a_dir, &text, false, None);
    assert_eq!(full.len(), 40);

    let b_dir = tmp("resume-b");
    // Stop after step 25: the last checkpoint holds step 20.
    let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        run(&b_dir, &text, false, Some(25))
    }));
    assert!(stopped.is_err());
    let state = tinygpt::train::TrainerState::load(&b_dir).unwrap();
    assert_eq!(state.step, 20);

    let resumed = run(&b_dir, &text, true, None);
    assert_eq!(resumed.first().map(|s| s.0), Some(21));
    for (r, f) in resumed.iter().zip(&full[20..]) {
        assert_eq!(r.0, f.0);
        assert_eq!(r.1, f.1, "lr at step {}", r.0); // the schedule is exactly where it was
        assert!(
            (r.2 - f.2).abs() < 1e-5,
            "loss at step {}: {} vs {}",
            r.0,
            r.2,
            f.2
        );
    }
    // metrics.jsonl: one "eval" row per evaluation, machine-readable, and a "train" row every
    // log_interval (1) steps.
    let metrics = std::fs::read_to_string(a_dir.join("metrics.jsonl")).unwrap();
    let all: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (lines, train): (Vec<_>, Vec<_>) = all.into_iter().partition(|r| r["kind"] == "eval");
    assert_eq!(lines.len(), 5); // steps 0, 10, 20, 30, 40
    assert_eq!(train.len(), 40);
    assert!(train
        .iter()
        .all(|r| r["kind"] == "train" && r["loss"].is_f64()));
    for key in [
        "step",
        "train_loss",
        "val_loss",
        "lr",
        "tokens_per_sec",
        "elapsed_s",
    ] {
        assert!(
            lines[4].get(key).is_some(),
            "metrics line lacks {key}: {}",
            lines[4]
        );
    }
    assert_eq!(lines[4]["step"], 40);
    // The stopped-and-resumed run logged the same rows, once each: the rows its first process
    // wrote after its last checkpoint (steps 21 to 25) were dropped on resume.
    let kinds_and_steps = |dir: &Path| -> Vec<(String, u64)> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|r| {
                (
                    r["kind"].as_str().unwrap().to_string(),
                    r["step"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(kinds_and_steps(&b_dir), kinds_and_steps(&a_dir));
    std::fs::remove_dir_all(&a_dir).unwrap();
    std::fs::remove_dir_all(&b_dir).unwrap();
}

/// A fresh pre-training run into `out` with `cfg`: the number of steps it took, and its result.
fn fresh_run(
    out: &Path,
    cfg: TrainConfig,
) -> (usize, tinygpt::Result<tinygpt::train::TrainSummary>) {
    let text = corpus(3000, 5);
    let tok = Tokenizer::train_char(&text).unwrap();
    let model = Gpt::init(&small(tok.vocab_size()), 7, &Device::Cpu).unwrap();
    let data = TokenDataset::from_tokens(tok.encode(&text).unwrap(), 0.1).unwrap();
    let mut obj = Pretraining::new(model, tok, data, 4).unwrap();
    let mut trainer = Trainer::new(cfg, obj.parameters().unwrap())
        .unwrap()
        .with_out_dir(out);
    let mut steps = 0;
    let result = trainer.fit(&mut obj, |e| {
        if let TrainEvent::Step { .. } = e {
            steps += 1;
        }
    });
    (steps, result)
}

#[test]
fn fit_refuses_an_out_dir_it_would_destroy_before_training() {
    let root = tmp("refuse");
    // A directory of someone's files.
    let thesis = root.join("thesis");
    std::fs::create_dir_all(thesis.join("sub")).unwrap();
    std::fs::write(thesis.join("thesis.tex"), "chapter 1").unwrap();
    std::fs::write(thesis.join("sub/x"), "x").unwrap();
    let (steps, result) = fresh_run(&thesis, resume_cfg());
    let e = result.unwrap_err().to_string();
    assert_eq!(steps, 0, "trained before refusing");
    assert!(
        e.contains(&*thesis.to_string_lossy()) && e.contains("not a checkpoint directory"),
        "{e}"
    );
    assert_eq!(
        std::fs::read_to_string(thesis.join("thesis.tex")).unwrap(),
        "chapter 1"
    );
    assert_eq!(std::fs::read_to_string(thesis.join("sub/x")).unwrap(), "x");
    // A file.
    let notes = root.join("notes.txt");
    std::fs::write(&notes, "my notes").unwrap();
    let (steps, result) = fresh_run(&notes, resume_cfg());
    let e = result.unwrap_err().to_string();
    assert_eq!(steps, 0, "trained before refusing");
    assert!(
        e.contains(&*notes.to_string_lossy()) && e.contains("not a directory"),
        "{e}"
    );
    assert_eq!(std::fs::read_to_string(&notes).unwrap(), "my notes");
    let mut names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["notes.txt", "thesis"]);
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_fresh_run_replaces_a_checkpoint_but_never_edits_it() {
    let root = tmp("replace");
    let out = root.join("ckpt");
    let short = TrainConfig {
        max_iters: 10,
        ..resume_cfg()
    };
    fresh_run(&out, short.clone()).1.unwrap();
    assert!(checkpoint::is_checkpoint_dir(&out));
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    // Evaluating only at step 0 saves nothing; the old checkpoint's metrics stay its own.
    let none = TrainConfig {
        max_iters: 0,
        ..resume_cfg()
    };
    fresh_run(&out, none).1.unwrap();
    assert_eq!(
        std::fs::read_to_string(out.join("metrics.jsonl")).unwrap(),
        metrics
    );
    // A run that saves replaces it whole.
    let (steps, result) = fresh_run(&out, TrainConfig { seed: 9, ..short });
    result.unwrap();
    assert_eq!(steps, 10);
    let replaced = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_ne!(replaced, metrics);
    let evals = replaced.lines().filter(|l| l.contains(r#""kind":"eval""#));
    assert_eq!(evals.count(), 2); // steps 0 and 10 of the new run
    let names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["ckpt"]);
    std::fs::remove_dir_all(&root).unwrap();
}

/// nanoGPT's `generate` without a cache: recompute the cropped window every step.
fn naive_generate(model: &Gpt, prompt: &[u32], params: &SamplingParams) -> Vec<u32> {
    let mut proc = LogitsProcessor::new(params).unwrap();
    let bs = model.config().block_size;
    let mut tokens = prompt.to_vec();
    for _ in 0..params.max_new_tokens {
        let window = &tokens[tokens.len().saturating_sub(bs)..];
        let x = Tensor::from_slice(window, (1, window.len()), &Device::Cpu).unwrap();
        let logits = model.forward(&x).unwrap(); // (1, T, V)
        let last = logits.get(0).unwrap().get(window.len() - 1).unwrap();
        let id = proc
            .sample(&last.to_vec1::<f32>().unwrap(), &tokens)
            .unwrap();
        tokens.push(id);
    }
    tokens[prompt.len()..].to_vec()
}

#[test]
fn kv_cache_generation_equals_recomputation_past_block_size() {
    let cfg = GptConfig {
        block_size: 8,
        ..small(40)
    };
    let model = Gpt::init(&cfg, 11, &Device::Cpu).unwrap();
    let prompt = [3u32, 14, 15];
    for params in [
        SamplingParams::greedy().with_max_new_tokens(30),
        SamplingParams::default()
            .with_max_new_tokens(30)
            .with_seed(5),
    ] {
        let cached: Vec<u32> = TokenGenerator::new(&model, &prompt, &params)
            .unwrap()
            .collect::<tinygpt::Result<_>>()
            .unwrap();
        assert_eq!(cached.len(), 30); // 33 tokens: well past block_size 8
        assert_eq!(cached, naive_generate(&model, &prompt, &params));
    }
    // A prompt longer than block_size is cropped to its last block_size tokens.
    let long: Vec<u32> = (0..20).collect();
    let params = SamplingParams::greedy().with_max_new_tokens(5);
    let a: Vec<u32> = TokenGenerator::new(&model, &long, &params)
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let b: Vec<u32> = TokenGenerator::new(&model, &long[12..], &params)
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(a, b);
}

#[test]
fn stop_tokens_end_generation() {
    let model = Gpt::init(&small(10), 2, &Device::Cpu).unwrap();
    let params = SamplingParams::greedy().with_max_new_tokens(50);
    let all: Vec<u32> = TokenGenerator::new(&model, &[1], &params)
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    let stop = all[3];
    let first = all.iter().position(|&t| t == stop).unwrap();
    let params = params.with_stop_tokens(vec![stop]);
    let mut gen = TokenGenerator::new(&model, &[1], &params).unwrap();
    let cut: Vec<u32> = gen.by_ref().map(|r| r.unwrap()).collect();
    assert_eq!(cut, all[..first].to_vec());
    assert_eq!(
        gen.finish_reason(),
        Some(tinygpt::sampler::FinishReason::Stop)
    );
}

#[test]
fn bad_input_gives_errors_that_name_the_problem() {
    let dir = tmp("bad");
    let tok = Tokenizer::train_char("abcdef").unwrap();
    // Missing and empty data files.
    let e = TokenDataset::from_file(dir.join("nope.txt"), &tok, 0.1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("nope.txt"), "{e}");
    std::fs::write(dir.join("empty.txt"), "").unwrap();
    let e = TokenDataset::from_file(dir.join("empty.txt"), &tok, 0.1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty.txt: the file is empty"), "{e}");
    // A corpus shorter than block_size + 1.
    std::fs::write(dir.join("short.txt"), "abcabcabc").unwrap();
    let data = TokenDataset::from_file(dir.join("short.txt"), &tok, 0.1).unwrap();
    let model = Gpt::init(&small(tok.vocab_size()), 0, &Device::Cpu).unwrap();
    let e = Pretraining::new(model.clone(), tok.clone(), data, 2)
        .unwrap_err()
        .to_string();
    assert!(e.contains("fewer than block_size + 1 = 17"), "{e}");
    // n_embd not divisible by n_head.
    let e = Gpt::init(
        &GptConfig {
            n_head: 5,
            ..small(7)
        },
        0,
        &Device::Cpu,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("n_embd (32) must be divisible by n_head (5)"),
        "{e}"
    );
    // A character the char tokenizer never saw.
    let e = tok.encode("abz").unwrap_err().to_string();
    assert!(e.contains("'z'") && e.contains("position 2"), "{e}");

    // A checkpoint missing a file, or holding a tensor of the wrong shape.
    let ckpt = dir.join("ckpt");
    std::fs::create_dir_all(&ckpt).unwrap();
    checkpoint::save_model(&ckpt, &model, &tok).unwrap();
    assert!(checkpoint::load_model(&ckpt, &Device::Cpu).is_ok());
    let mut tensors: HashMap<String, Tensor> = model.tensors();
    tensors.insert(
        "transformer.h.1.mlp.c_fc.weight".into(),
        Tensor::zeros((32, 100), DType::F32, &Device::Cpu).unwrap(),
    );
    checkpoint::save_safetensors(&tensors, ckpt.join("model.safetensors")).unwrap();
    let e = checkpoint::load_model(&ckpt, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`transformer.h.1.mlp.c_fc.weight` has shape [32, 100], expected [32, 128]")
            && e.contains("model.safetensors"),
        "{e}"
    );
    // A config with fewer layers than the weights: refused, not silently truncated.
    checkpoint::save_model(&ckpt, &model, &tok).unwrap();
    let mut fewer = model.config().clone();
    fewer.n_layer = 1;
    fewer.save(ckpt.join("config.json")).unwrap();
    let e = checkpoint::load_model(&ckpt, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("unexpected tensor `transformer.h.1."), "{e}");
    std::fs::remove_file(ckpt.join("tokenizer.json")).unwrap();
    let e = checkpoint::load_model(&ckpt, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing tokenizer.json"), "{e}");
    // A resume directory without optimizer state.
    let e = Trainer::new(TrainConfig::default(), model.vars().unwrap())
        .unwrap()
        .resume_from(&ckpt)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing optimizer.safetensors"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn rows_without_a_token_are_never_sampled() {
    // A model with rows reserved beyond its tokenizer (as `pretrain` reserves the chat rows):
    // text generation must never pick them, whatever their logits.
    let tok = Tokenizer::train_char("abc").unwrap(); // 3 chars + <|endoftext|>
    let model = Gpt::init(&small(tok.vocab_size() + 6), 4, &Device::Cpu).unwrap();
    let params = SamplingParams::default()
        .with_temperature(50.0)
        .with_max_new_tokens(300);
    let text = tinygpt::generate(&model, &tok, "ab", &params)
        .unwrap()
        .text()
        .unwrap();
    assert!(text.chars().count() >= 300, "{text:?}");
    let ids: Vec<u32> = TokenGenerator::new(&model, &[0], &params)
        .unwrap()
        .with_vocab_limit(tok.vocab_size())
        .map(|r| r.unwrap())
        .collect();
    assert!(
        ids.iter().all(|&id| (id as usize) < tok.vocab_size()),
        "{ids:?}"
    );
}

/// Trains `steps` steps of `cfg` (a fresh model, seed 7) with the hand-written step or with
/// autograd, and returns every step's loss, the final weights and whether the step was used.
fn train_steps(
    model_cfg: GptConfig,
    autograd: bool,
    accum: usize,
) -> (Vec<f64>, HashMap<String, Vec<f32>>, bool) {
    let text = corpus(4000, 3);
    let tok = Tokenizer::train_char(&text).unwrap();
    let cfg = GptConfig {
        vocab_size: tok.vocab_size(),
        ..model_cfg
    };
    let model = Gpt::init(&cfg, 7, &Device::Cpu).unwrap();
    let data = TokenDataset::from_tokens(tok.encode(&text).unwrap(), 0.1).unwrap();
    let mut obj = Pretraining::new(model, tok, data, 3).unwrap();
    let owned = obj.has_owned_step();
    let train_cfg = TrainConfig {
        max_iters: 8,
        eval_interval: 8,
        eval_iters: 1,
        log_interval: 1,
        batch_size: 3,
        gradient_accumulation_steps: accum,
        warmup_iters: 2,
        lr_decay_iters: 8,
        autograd,
        ..Default::default()
    };
    let mut trainer = Trainer::new(train_cfg, obj.parameters().unwrap()).unwrap();
    let mut losses = vec![];
    trainer
        .fit(&mut obj, |e| {
            if let TrainEvent::Step { loss, .. } = e {
                losses.push(*loss);
            }
        })
        .unwrap();
    let weights = obj
        .model()
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    (losses, weights, owned)
}

#[test]
fn the_hand_written_step_trains_as_autograd_does() {
    let gpt2 = |bias| GptConfig { bias, ..small(0) };
    for (cfg, accum) in [(gpt2(true), 1), (gpt2(false), 2)] {
        let (want_losses, want, by_hand) = train_steps(cfg.clone(), true, accum);
        assert!(by_hand, "a GPT-2 without dropout has the hand-written step");
        let (losses, got, _) = train_steps(cfg, false, accum);
        assert_eq!(losses.len(), 8);
        for (a, b) in losses.iter().zip(&want_losses) {
            assert!(
                (a - b).abs() <= 1e-4 * b.abs(),
                "losses {losses:?} vs {want_losses:?}"
            );
        }
        for (name, w) in &want {
            let g = &got[name];
            let diff = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 1e-4, "`{name}` after 8 steps differs by {diff}");
        }
    }
    // What the step does not cover trains through autograd.
    let dropout = GptConfig {
        dropout: 0.1,
        ..small(0)
    };
    let llama = GptConfig::llama(0, 16, 2, 2, 32);
    for cfg in [dropout, llama] {
        let (losses, _, by_hand) = train_steps(cfg, false, 1);
        assert!(!by_hand);
        assert!(losses.iter().all(|l| l.is_finite()));
    }
}
