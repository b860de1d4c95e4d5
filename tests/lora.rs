//! LoRA adapters (`tinygpt::lora`): PEFT's fixture adapter over the Llama fixture gives
//! transformers + peft's logits; training moves the adapter only; adapters round-trip through
//! PEFT's files; bad adapter files are refused by name.
//!
//! The fixture `tests/fixtures/hf_llama/lora/` comes from `scripts/reference.py lora-fixture`
//! (peft 0.21): r 4, alpha 8, every projection of `tests/fixtures/hf_llama/llama/`, `lora_B`
//! nonzero; `expected.safetensors` holds the adapter's, the merged model's and the base
//! model's logits. `TINYGPT_LORA_EXPORT=DIR cargo test --test lora export` writes an adapter
//! trained by tinygpt over that base, and its logits, for `scripts/reference.py check-lora`.

mod common;
use common::max_abs_diff;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tinygpt::candle::{DType, Device, Tensor, Var};
use tinygpt::checkpoint::{load_safetensors, save_safetensors};
use tinygpt::lora::{ADAPTER_CONFIG, ADAPTER_MODEL};
use tinygpt::model::cross_entropy;
use tinygpt::{Error, Gpt, GptConfig, LoraConfig, Objective, TrainConfig, Trainer};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf_llama"
    ))
    .join(name)
}

fn gpt2() -> GptConfig {
    GptConfig {
        vocab_size: 29,
        block_size: 8,
        n_layer: 2,
        n_head: 2,
        n_embd: 16,
        dropout: 0.0,
        bias: true,
        ..Default::default()
    }
}

fn llama() -> GptConfig {
    GptConfig {
        n_kv_head: Some(1),
        intermediate_size: Some(24),
        tie_word_embeddings: false,
        ..GptConfig::llama(29, 8, 2, 2, 16)
    }
}

fn vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Random token ids (B, T) below `vocab`.
fn random_ids(b: usize, t: usize, vocab: usize, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let v: Vec<u32> = (0..b * t)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    Tensor::from_vec(v, (b, t), &Device::Cpu).unwrap()
}

/// A tiny task: memorise next tokens of fixed random sequences.
struct Memorise {
    model: Gpt,
    x: Tensor,
    y: Tensor,
}

impl Memorise {
    fn new(model: Gpt, seed: u64) -> Self {
        let (v, t) = (model.config().vocab_size, model.config().block_size);
        let seq = random_ids(4, t + 1, v, seed);
        Self {
            x: seq.narrow(1, 0, t).unwrap().contiguous().unwrap(),
            y: seq.narrow(1, 1, t).unwrap().contiguous().unwrap(),
            model,
        }
    }
}

impl Objective for Memorise {
    fn stage(&self) -> &str {
        "lora-test"
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

/// `steps` AdamW steps (no weight decay) of the adapter of `model` on [`Memorise`]; the
/// losses, first to last.
fn train(model: &Gpt, steps: usize, lr: f64) -> Vec<f64> {
    let mut task = Memorise::new(model.clone(), 5);
    let cfg = TrainConfig {
        lr,
        warmup_iters: 0,
        decay_lr: false,
        weight_decay: 0.0,
        seed: 3,
        ..Default::default()
    };
    let mut trainer = Trainer::new(cfg, task.parameters().unwrap()).unwrap();
    (0..steps)
        .map(|it| trainer.optimizer_step(&mut task, it, lr).unwrap().loss)
        .collect()
}

#[test]
fn peft_fixture_adapter_gives_transformers_peft_logits() {
    let base = Gpt::from_hf_dir(fixture("llama"), &Device::Cpu).unwrap();
    let want =
        load_safetensors(fixture("lora").join("expected.safetensors"), &Device::Cpu).unwrap();
    let input = want["input_ids"].to_dtype(DType::U32).unwrap();
    let before = base.forward(&input).unwrap();
    let lora = base.load_lora_adapter(fixture("lora")).unwrap();
    let cfg = lora.lora_config().unwrap();
    assert_eq!(
        (cfg.r, cfg.alpha, cfg.scale(), cfg.target_modules.len()),
        (4, 8.0, 2.0, 7)
    );
    assert_eq!(lora.vars().unwrap().len(), 28);
    let adapted = max_abs_diff(&lora.forward(&input).unwrap(), &want["logits"]);
    let merged = max_abs_diff(
        &lora.merge_lora().unwrap().forward(&input).unwrap(),
        &want["logits_merged"],
    );
    let after = base.forward(&input).unwrap();
    let base_diff = max_abs_diff(&after, &want["logits_base"]);
    eprintln!("max |tinygpt - peft| logits: adapter {adapted:.3e}, merged {merged:.3e}, base {base_diff:.3e}");
    assert!(adapted <= 1e-4 && merged <= 1e-4 && base_diff <= 1e-4);
    assert_eq!(
        vec(&before),
        vec(&after),
        "loading an adapter changed the base model"
    );
    // The adapter moves the logits by far more than the tolerance.
    assert!(max_abs_diff(&want["logits"], &want["logits_base"]) > 0.1);
}

#[test]
fn training_moves_only_the_adapter_and_every_adapter_param_gets_a_gradient() {
    for cfg in [gpt2(), llama()] {
        let base = Gpt::init(&cfg, 1, &Device::Cpu).unwrap();
        let lcfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.1,
            ..Default::default()
        };
        let lora = base.with_lora(&lcfg, 2).unwrap();
        let x = random_ids(2, 8, cfg.vocab_size, 9);
        let frozen = Gpt::from_tensors(&cfg, base.tensors(), false).unwrap();
        assert_eq!(
            vec(&lora.forward(&x).unwrap()),
            vec(&frozen.forward(&x).unwrap()),
            "fresh adapter"
        );
        let base_before: HashMap<String, Vec<f32>> = lora
            .tensors()
            .iter()
            .map(|(n, t)| (n.clone(), vec(t)))
            .collect();
        let adapter_before: HashMap<String, Vec<f32>> = lora
            .lora_tensors()
            .iter()
            .map(|(n, t)| (n.clone(), vec(t)))
            .collect();
        let losses = train(&lora, 12, 1e-2);
        eprintln!("{}: losses {losses:.3?}", cfg.arch);
        assert!(losses[11] < losses[0] - 0.1, "{}: {losses:?}", cfg.arch);
        for (name, t) in lora.tensors() {
            assert_eq!(
                vec(&t),
                base_before[&name],
                "{}: base tensor {name} changed",
                cfg.arch
            );
            assert!(!t.is_variable(), "{name}");
        }
        for (name, t) in lora.lora_tensors() {
            assert_ne!(
                vec(&t),
                adapter_before[&name],
                "{}: {name} did not move",
                cfg.arch
            );
        }
        // After training B ≠ 0: both A and B get nonzero gradients.
        let mut task = Memorise::new(lora.clone(), 5);
        let (loss, _) = task.train_loss(&mut ChaCha8Rng::seed_from_u64(1)).unwrap();
        let grads = loss.backward().unwrap();
        for (name, var) in lora.vars().unwrap() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            assert!(
                vec(g).iter().any(|v| *v != 0.0),
                "{}: zero gradient for {name}",
                cfg.arch
            );
        }
        // No gradient is computed for a frozen matrix (the norms' (C,) weights may get one).
        for (name, t) in lora
            .named_parameters()
            .iter()
            .filter(|(_, t)| t.rank() == 2)
        {
            assert!(
                grads.get(t).is_none(),
                "{}: a gradient for the frozen {name}",
                cfg.arch
            );
        }
        // The trained adapter changes the logits; merging it keeps them.
        let (y, merged) = (
            lora.forward(&x).unwrap(),
            lora.merge_lora().unwrap().forward(&x).unwrap(),
        );
        assert!(max_abs_diff(&y, &frozen.forward(&x).unwrap()) > 1e-3);
        assert!(max_abs_diff(&y, &merged) < 1e-5, "{}", cfg.arch);
    }
}

#[test]
fn save_and_load_round_trip_gives_identical_logits() {
    for cfg in [gpt2(), llama()] {
        let base = Gpt::init(&cfg, 4, &Device::Cpu).unwrap();
        let lcfg = LoraConfig {
            r: 3,
            alpha: 5.0,
            dropout: 0.0,
            ..Default::default()
        };
        let lora = base.with_lora(&lcfg, 6).unwrap();
        train(&lora, 2, 1e-2);
        let dir = tempfile::tempdir().unwrap();
        lora.save_lora_adapter(dir.path()).unwrap();
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG)).unwrap(),
        )
        .unwrap();
        assert_eq!(config["peft_type"], "LORA");
        assert_eq!(config["fan_in_fan_out"], cfg.arch == tinygpt::Arch::Gpt2);
        let back = base.load_lora_adapter(dir.path()).unwrap();
        assert_eq!(back.lora_config(), lora.lora_config());
        let x = random_ids(2, 8, cfg.vocab_size, 1);
        assert_eq!(
            vec(&back.forward(&x).unwrap()),
            vec(&lora.forward(&x).unwrap()),
            "{}",
            cfg.arch
        );
        let names = |m: &Gpt| {
            let mut n: Vec<String> = m.lora_tensors().into_keys().collect();
            n.sort();
            n
        };
        assert_eq!(names(&back), names(&lora));
        assert_eq!(back.vars().unwrap().len(), lora.vars().unwrap().len());
    }
}

/// A copy of the adapter directory `src` in a fresh temporary directory, its config edited
/// by `edit_config` and its tensors by `edit_tensors`.
fn edited(
    src: &Path,
    edit_config: impl FnOnce(&mut serde_json::Value),
    edit_tensors: impl FnOnce(&mut HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(dir.path().join(ADAPTER_CONFIG), config.to_string()).unwrap();
    let mut tensors = load_safetensors(src.join(ADAPTER_MODEL), &Device::Cpu).unwrap();
    edit_tensors(&mut tensors);
    save_safetensors(&tensors, dir.path().join(ADAPTER_MODEL)).unwrap();
    dir
}

#[test]
fn bad_adapter_files_are_refused_by_name() {
    let base = Gpt::from_hf_dir(fixture("llama"), &Device::Cpu).unwrap();
    let src = fixture("lora");
    let q_a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
    let none = |_: &mut HashMap<String, Tensor>| {};
    let keep = |_: &mut serde_json::Value| {};
    let cases: Vec<(&str, tempfile::TempDir, Vec<&str>)> = vec![
        (
            "missing tensor",
            edited(&src, keep, |t| {
                t.remove(q_a);
            }),
            vec![q_a, "missing", ADAPTER_MODEL],
        ),
        (
            "wrong r",
            edited(&src, |c| c["r"] = 3.into(), none),
            vec!["lora_A.weight", "[3, ", ADAPTER_MODEL],
        ),
        (
            "wrong shape",
            edited(&src, keep, |t| {
                t.insert(
                    q_a.into(),
                    Tensor::zeros((4, 47), DType::F32, &Device::Cpu).unwrap(),
                );
            }),
            vec![q_a, "[4, 47]", "[4, 48]", ADAPTER_MODEL],
        ),
        (
            "unexpected tensor",
            edited(
                &src,
                |c| c["target_modules"] = serde_json::json!(["q_proj", "v_proj"]),
                none,
            ),
            vec!["unexpected tensor", "down_proj", ADAPTER_MODEL],
        ),
        (
            "unknown target",
            edited(
                &src,
                |c| c["target_modules"] = serde_json::json!(["q_proj", "lm_head"]),
                none,
            ),
            vec!["`lm_head`", ADAPTER_CONFIG],
        ),
        (
            "GPT-2 target",
            edited(
                &src,
                |c| c["target_modules"] = serde_json::json!(["c_attn"]),
                none,
            ),
            vec!["`c_attn`", "llama", ADAPTER_CONFIG],
        ),
        (
            "not LoRA",
            edited(&src, |c| c["peft_type"] = "IA3".into(), none),
            vec!["peft_type", "IA3", ADAPTER_CONFIG],
        ),
        (
            "rslora",
            edited(&src, |c| c["use_rslora"] = true.into(), none),
            vec!["use_rslora", "rsLoRA", ADAPTER_CONFIG],
        ),
        (
            "dora",
            edited(&src, |c| c["use_dora"] = true.into(), none),
            vec!["use_dora", ADAPTER_CONFIG],
        ),
        (
            "fan_in_fan_out",
            edited(&src, |c| c["fan_in_fan_out"] = true.into(), none),
            vec!["fan_in_fan_out", ADAPTER_CONFIG],
        ),
        (
            "integer tensor",
            edited(&src, keep, |t| {
                t.insert(
                    q_a.into(),
                    Tensor::zeros((4, 48), DType::U32, &Device::Cpu).unwrap(),
                );
            }),
            vec![q_a, "floats", ADAPTER_MODEL],
        ),
    ];
    for (what, dir, needles) in cases {
        let e = base.load_lora_adapter(dir.path()).map(|_| ()).unwrap_err();
        let msg = e.to_string();
        eprintln!("{what}: {msg}");
        for n in needles {
            assert!(msg.contains(n), "{what}: `{n}` not in: {msg}");
        }
        assert!(
            msg.contains(&dir.path().display().to_string()),
            "{what}: no path in {msg}"
        );
    }
    // No directory at all: an I/O error naming the file.
    let e = base
        .load_lora_adapter("/nonexistent/adapter")
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(e, Error::Io { .. }) && e.to_string().contains(ADAPTER_CONFIG),
        "{e}"
    );
    // A GPT-2 model refuses the Llama adapter's targets.
    let gpt2 = Gpt::init(&gpt2(), 1, &Device::Cpu).unwrap();
    let e = gpt2
        .load_lora_adapter(&src)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("q_proj") && e.contains("gpt2"), "{e}");
    // A plain model has no adapter to save.
    assert!(base
        .save_lora_adapter(tempfile::tempdir().unwrap().path())
        .is_err());
}

/// With `TINYGPT_LORA_EXPORT=DIR`: trains an adapter with tinygpt over the Llama fixture and
/// writes it to DIR with `DIR/expected.safetensors` (the fixture's `input_ids` and tinygpt's
/// `logits`), for `scripts/reference.py check-lora tests/fixtures/hf_llama/llama DIR
/// --expected DIR/expected.safetensors`; and the same over the GPT-2 fixture
/// (`tests/fixtures/hf_gpt2/model`, `Conv1D` weights) in `DIR/gpt2`. Without it, does nothing.
#[test]
fn export_trained_adapter_for_peft() {
    let Some(dir) = std::env::var_os("TINYGPT_LORA_EXPORT").filter(|d| !d.is_empty()) else {
        eprintln!("TINYGPT_LORA_EXPORT not set: nothing exported");
        return;
    };
    let dir = PathBuf::from(dir);
    let input = load_safetensors(fixture("llama").join("expected.safetensors"), &Device::Cpu)
        .unwrap()["input_ids"]
        .clone();
    export(&fixture("llama"), &dir, input);
    let input = random_ids(2, 11, 1000, 8).to_dtype(DType::I64).unwrap();
    export(&common::model_dir(), &dir.join("gpt2"), input);
}

/// Trains an adapter over the HF model in `base_dir` and writes it and its logits for
/// `input` (I64) to `out`.
fn export(base_dir: &Path, out: &Path, input: Tensor) {
    let base = Gpt::from_hf_dir(base_dir, &Device::Cpu).unwrap();
    let lcfg = LoraConfig {
        r: 4,
        alpha: 16.0,
        dropout: 0.05,
        ..Default::default()
    };
    let lora = base.with_lora(&lcfg, 42).unwrap();
    let losses = train(&lora, 8, 2e-2);
    eprintln!("{}: losses {losses:.3?}", base_dir.display());
    assert!(losses[7] < losses[0]);
    lora.save_lora_adapter(out).unwrap();
    let ids = input.to_dtype(DType::U32).unwrap();
    let logits = lora.forward(&ids).unwrap();
    let base_logits = base.forward(&ids).unwrap();
    eprintln!(
        "  max |adapter - base| logits {:.3}",
        max_abs_diff(&logits, &base_logits)
    );
    let file = HashMap::from([
        ("input_ids".to_string(), input),
        ("logits".to_string(), logits),
    ]);
    save_safetensors(&file, out.join("expected.safetensors")).unwrap();
}
