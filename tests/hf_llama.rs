//! Hugging Face Llama, Qwen2 and Qwen3 in and out, checked against transformers.
//!
//! The fixtures in `tests/fixtures/hf_llama/` come from `scripts/reference.py llama-fixtures`
//! (PyTorch 2.15, transformers 5.24, CPU, f32, eager attention): random, odd-sized models of
//! each family, saved by `save_pretrained`:
//!
//! - `llama/`: `LlamaForCausalLM`, vocabulary 97, 48 wide, 4 query and 2 key/value heads,
//!   SwiGLU 88, `rope_theta` 5000, an untied head;
//! - `qwen2/`: `Qwen2ForCausalLM`, vocabulary 101, 32 wide, 4/2 heads, q/k/v biases,
//!   `rope_theta` 1e6, a tied head, saved in three shards;
//! - `qwen3/`: `Qwen3ForCausalLM`, vocabulary 83, 48 wide, 4/2 heads of 16 (64 ≠ 48), q/k
//!   RMSNorm, `rope_theta` 20000, a tied head.
//!
//! Each has transformers' logits for 2 × 11 tokens and for a whole 64-token context, and a
//! 20-token greedy continuation.

mod common;
use common::{ids, json, max_abs_diff};
use std::path::PathBuf;

use tinygpt::candle::{DType, Device, Tensor};
use tinygpt::checkpoint::load_safetensors;
use tinygpt::sampler::TokenGenerator;
use tinygpt::{Arch, Error, Gpt, GptConfig, SamplingParams};

const FAMILIES: [&str; 3] = ["llama", "qwen2", "qwen3"];

fn fixture(family: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hf_llama"
    ))
    .join(family)
}

/// max |tinygpt − transformers| logits of `model` over the fixture's two inputs.
fn diff_to_reference(model: &Gpt, family: &str) -> f32 {
    let t = load_safetensors(fixture(family).join("expected.safetensors"), &Device::Cpu).unwrap();
    [("input_ids", "logits"), ("input_long", "logits_long")]
        .iter()
        .map(|(input, logits)| {
            let input = t[*input].to_dtype(DType::U32).unwrap();
            max_abs_diff(&model.forward(&input).unwrap(), &t[*logits])
        })
        .fold(0.0, f32::max)
}

#[test]
fn configs_read_as_their_families() {
    let llama = tinygpt::hf::load_config(fixture("llama")).unwrap();
    assert_eq!(
        llama,
        GptConfig {
            n_kv_head: Some(2),
            intermediate_size: Some(88),
            rope_theta: 5000.0,
            norm_eps: 1e-6,
            tie_word_embeddings: false,
            ..GptConfig::llama(97, 64, 2, 4, 48)
        }
    );
    let qwen2 = tinygpt::hf::load_config(fixture("qwen2")).unwrap();
    assert!(qwen2.qkv_bias && !qwen2.bias && qwen2.tie_word_embeddings);
    assert_eq!((qwen2.n_kv_heads(), qwen2.rope_theta), (2, 1e6));
    let qwen3 = tinygpt::hf::load_config(fixture("qwen3")).unwrap();
    assert!(qwen3.qk_norm && !qwen3.qkv_bias);
    assert_eq!(
        (qwen3.head_size(), qwen3.head_dim, qwen3.arch),
        (16, Some(16), Arch::Llama)
    );
}

#[test]
fn logits_match_transformers() {
    for family in FAMILIES {
        let model = Gpt::from_hf_dir(fixture(family), &Device::Cpu).unwrap();
        let diff = diff_to_reference(&model, family);
        eprintln!("{family}: max |tinygpt - transformers| logits = {diff:.3e}");
        assert!(diff <= 1e-4, "{family}: {diff}");
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    for family in FAMILIES {
        let greedy = json(&fixture(family).join("greedy.json"));
        let model = Gpt::from_hf_dir(fixture(family), &Device::Cpu).unwrap();
        let prompt = ids(&greedy["prompt_ids"]);
        // Through the KV cache, one token at a time.
        let params = SamplingParams::greedy().with_max_new_tokens(20);
        let continuation = TokenGenerator::new(&model, &prompt, &params)
            .unwrap()
            .collect::<tinygpt::Result<Vec<u32>>>()
            .unwrap();
        assert_eq!(continuation, ids(&greedy["continuation_ids"]), "{family}");
        // And through the batched decoder's row-by-row path, in f16 as well as f32.
        for dtype in [DType::F32, DType::F16] {
            let m = model.to_dtype(dtype).unwrap();
            let mut slots = tinygpt::decode::DecodeSlots::new(&m, 1).unwrap();
            let mut logits = m.prefill_slot(&mut slots, 0, &prompt).unwrap();
            let mut got = Vec::new();
            for _ in 0..20 {
                let next = argmax(&logits);
                got.push(next);
                logits = m.decode_step(&mut slots, &[(0, next)]).unwrap().remove(0);
            }
            if dtype == DType::F32 {
                assert_eq!(
                    got,
                    ids(&greedy["continuation_ids"]),
                    "{family} batched decoder"
                );
            } else {
                // f16 weights round the logits: the first tokens (largest gaps) still agree.
                assert_eq!(
                    got[..3],
                    ids(&greedy["continuation_ids"])[..3],
                    "{family} f16"
                );
            }
        }
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn save_hf_dir_writes_what_transformers_saved() {
    for family in FAMILIES {
        let model = Gpt::from_hf_dir(fixture(family), &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        model.save_hf_dir(dir.path()).unwrap();
        // The same tensors, bit for bit, under the same names (transformers' own shards hold
        // them in several files; ours in one).
        let ours = load_safetensors(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
        let reloaded = Gpt::from_hf_dir(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(reloaded.config(), model.config(), "{family}");
        for (name, t) in model.named_parameters() {
            assert_eq!(max_abs_diff(&ours[name], t), 0.0, "{family} {name}");
        }
        assert_eq!(ours.len(), model.named_parameters().len(), "{family}");
        // The config keys transformers reads mean the same as the fixture's.
        let (a, b) = (
            json(&dir.path().join("config.json")),
            json(&fixture(family).join("config.json")),
        );
        for key in [
            "architectures",
            "model_type",
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "rms_norm_eps",
            "tie_word_embeddings",
            "rope_parameters",
            "hidden_act",
        ] {
            assert_eq!(a[key], b[key], "{family} config.json `{key}`");
        }
        if family == "qwen3" {
            assert_eq!(a["head_dim"], b["head_dim"]);
        }
        assert!(diff_to_reference(&reloaded, family) <= 1e-4);
        // `TINYGPT_HF_EXPORT=DIR` keeps the exports with tinygpt's logits, for
        // `scripts/reference.py check-llama DIR/FAMILY --expected DIR/FAMILY/tinygpt_logits.safetensors`.
        if let Some(keep) = std::env::var_os("TINYGPT_HF_EXPORT") {
            let out = PathBuf::from(keep).join(family);
            std::fs::create_dir_all(&out).unwrap();
            model.save_hf_dir(&out).unwrap();
            let t = load_safetensors(fixture(family).join("expected.safetensors"), &Device::Cpu)
                .unwrap();
            let mut mine = std::collections::HashMap::new();
            for (input, logits) in [("input_ids", "logits"), ("input_long", "logits_long")] {
                let ids = t[input].to_dtype(DType::U32).unwrap();
                mine.insert(input.to_string(), t[input].clone());
                mine.insert(logits.to_string(), reloaded.forward(&ids).unwrap());
            }
            tinygpt::checkpoint::save_safetensors(&mine, out.join("tinygpt_logits.safetensors"))
                .unwrap();
        }
    }
}

/// tinygpt's own Llamas (initialised here, not read from transformers) save as their families:
/// all biases (Llama `attention_bias` + `mlp_bias`), q/k norms (Qwen3), q/k/v
/// biases only (Qwen2). With `TINYGPT_HF_EXPORT=DIR` the exports and tinygpt's logits are kept
/// for `scripts/reference.py check-llama`.
#[test]
fn tinygpt_llamas_save_as_their_families() {
    let base = GptConfig {
        n_kv_head: Some(1),
        intermediate_size: Some(20),
        rope_theta: 300.0,
        ..GptConfig::llama(37, 16, 2, 2, 12)
    };
    let cases = [
        (
            "own_llama",
            GptConfig {
                bias: true,
                tie_word_embeddings: false,
                ..base.clone()
            },
            "LlamaForCausalLM",
        ),
        (
            "own_qwen3",
            GptConfig {
                qk_norm: true,
                head_dim: Some(8),
                ..base.clone()
            },
            "Qwen3ForCausalLM",
        ),
        (
            "own_qwen2",
            GptConfig {
                qkv_bias: true,
                ..base
            },
            "Qwen2ForCausalLM",
        ),
    ];
    for (name, cfg, class) in cases {
        let model = Gpt::init(&cfg, 5, &Device::Cpu).unwrap();
        // Non-zero biases and norms, so that every tensor shows in the logits.
        let tensors = model
            .tensors()
            .into_iter()
            .map(|(n, t)| {
                let t = if t.rank() == 1 {
                    (t + 0.3).unwrap()
                } else {
                    (t * 5.0).unwrap()
                };
                (n, t)
            })
            .collect();
        let model = Gpt::from_tensors(&cfg, tensors, false).unwrap();
        let dir = tempfile::tempdir().unwrap();
        model.save_hf_dir(dir.path()).unwrap();
        assert_eq!(
            json(&dir.path().join("config.json"))["architectures"][0],
            class
        );
        let reloaded = Gpt::from_hf_dir(dir.path(), &Device::Cpu).unwrap();
        assert_eq!(reloaded.config(), model.config(), "{name}");
        let ids = Tensor::new(
            &[[1u32, 5, 9, 2, 36, 0, 7, 7, 3, 11, 20, 30, 4, 1, 2, 3]],
            &Device::Cpu,
        )
        .unwrap();
        let logits = model.forward(&ids).unwrap();
        assert_eq!(
            max_abs_diff(&reloaded.forward(&ids).unwrap(), &logits),
            0.0,
            "{name}"
        );
        if let Some(keep) = std::env::var_os("TINYGPT_HF_EXPORT") {
            let out = PathBuf::from(keep).join(name);
            std::fs::create_dir_all(&out).unwrap();
            model.save_hf_dir(&out).unwrap();
            let mine = std::collections::HashMap::from([
                ("input_ids".to_string(), ids.to_dtype(DType::I64).unwrap()),
                ("logits".to_string(), logits),
            ]);
            tinygpt::checkpoint::save_safetensors(&mine, out.join("tinygpt_logits.safetensors"))
                .unwrap();
        }
    }
}

#[test]
fn unsupported_settings_are_refused_by_name() {
    let cases = [
        (
            "rope_parameters",
            serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}),
            "yarn",
        ),
        (
            "rope_scaling",
            serde_json::json!({"type": "linear", "factor": 2.0}),
            "linear",
        ),
        (
            "use_sliding_window",
            serde_json::json!(true),
            "sliding-window",
        ),
        ("hidden_act", serde_json::json!("gelu"), "SiLU"),
        ("num_local_experts", serde_json::json!(8), "experts"),
        (
            "num_key_value_heads",
            serde_json::json!(3),
            "multiple of n_kv_head",
        ),
        ("attention_bias", serde_json::json!(true), "mlp_bias"),
        (
            "hidden_size",
            serde_json::json!("wide"),
            "non-negative integer",
        ),
    ];
    for (key, value, needle) in cases {
        let dir = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(fixture("llama")).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
        let path = dir.path().join("config.json");
        let mut cfg = json(&path);
        cfg[key] = value;
        std::fs::write(&path, cfg.to_string()).unwrap();
        let err = Gpt::from_hf_dir(dir.path(), &Device::Cpu).unwrap_err();
        assert!(matches!(err, Error::Config(_)), "{key}: {err}");
        let msg = err.to_string();
        assert!(
            msg.contains(needle) && msg.contains("config.json"),
            "{key}: {msg}"
        );
    }
}

#[test]
fn a_tied_head_that_differs_from_the_embedding_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture("qwen3")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let path = dir.path().join("model.safetensors");
    let mut t = load_safetensors(&path, &Device::Cpu).unwrap();
    let head = (t["model.embed_tokens.weight"].clone() + 1.0).unwrap();
    t.insert("lm_head.weight".into(), head);
    tinygpt::checkpoint::save_safetensors(&t, &path).unwrap();
    let err = Gpt::from_hf_dir(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lm_head.weight") && err.contains("tie_word_embeddings"),
        "{err}"
    );
    let _ = Tensor::zeros(1, DType::F32, &Device::Cpu);
}
