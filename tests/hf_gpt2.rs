//! Hugging Face GPT-2 in and out, checked against transformers.
//!
//! The fixtures in `tests/fixtures/hf_gpt2/` come from `scripts/reference.py fixtures`
//! (PyTorch 2.15, transformers 5.24, CPU, f32): a random GPT-2 with 2 layers, n_embd 64,
//! 4 heads, vocabulary 1000 and context 128, non-zero biases and LayerNorm parameters, saved
//! by `save_pretrained`; its logits for a batch of 2 × 16 tokens and for 1 × 128 tokens; its
//! 20-token greedy continuation of a prompt; and the GPT-2 tokenizer's ids (transformers and
//! OpenAI's `encoder.py` agreeing) for a mixed text and the start of Tiny Shakespeare.

mod common;
use common::{fixtures, ids, json, max_abs_diff, model_dir};
use std::collections::HashMap;
use std::path::Path;

use tinygpt::candle::{DType, Device, Tensor};
use tinygpt::checkpoint::{load_safetensors, save_safetensors};
use tinygpt::sampler::TokenGenerator;
use tinygpt::{Error, Gpt, GptConfig, SamplingParams, Tokenizer};

/// `(input ids (B, T) u32, transformers' logits (B, T, V) f32)` for `a` (2 × 16) and `b`
/// (1 × 128).
fn reference(which: &str) -> (Tensor, Tensor) {
    let t = load_safetensors(fixtures().join("logits.safetensors"), &Device::Cpu).unwrap();
    let input = t[&format!("input_{which}")].to_dtype(DType::U32).unwrap();
    (input, t[&format!("logits_{which}")].clone())
}

/// Max abs difference of `model`'s logits to transformers' over both fixture inputs.
fn diff_to_reference(model: &Gpt) -> f32 {
    ["a", "b"]
        .iter()
        .map(|w| {
            let (input, want) = reference(w);
            max_abs_diff(&model.forward(&input).unwrap(), &want)
        })
        .fold(0.0, f32::max)
}

/// A copy of the fixture model directory with its tensors passed through `edit`.
fn edited_copy(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["config.json", "vocab.json", "merges.txt"] {
        std::fs::copy(model_dir().join(name), dir.path().join(name)).unwrap();
    }
    let mut tensors =
        load_safetensors(model_dir().join("model.safetensors"), &Device::Cpu).unwrap();
    edit(&mut tensors);
    save_safetensors(&tensors, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn edit_config(dir: &Path, key: &str, value: serde_json::Value) {
    let path = dir.join("config.json");
    let mut cfg = json(&path);
    cfg[key] = value;
    std::fs::write(&path, cfg.to_string()).unwrap();
}

#[test]
fn fixture_logits_match_transformers() {
    let model = Gpt::from_hf_dir(model_dir(), &Device::Cpu).unwrap();
    assert_eq!(
        model.config(),
        &GptConfig {
            vocab_size: 1000,
            block_size: 128,
            n_layer: 2,
            n_head: 4,
            n_embd: 64,
            dropout: 0.1,
            bias: true,
            ..Default::default()
        }
    );
    assert_eq!(model.dtype(), DType::F32);
    // Observed: 4.8e-6 (logits up to 7.7 in magnitude; f32 rounding in another summation order).
    let diff = diff_to_reference(&model);
    eprintln!("max |tinygpt - transformers| logits = {diff:.3e}");
    assert!(diff <= 1e-4, "{diff}");
}

#[test]
fn greedy_continuation_matches_transformers() {
    let greedy = json(&fixtures().join("greedy.json"));
    let (model, tokenizer) = Gpt::from_hf_dir_with_tokenizer(model_dir(), &Device::Cpu).unwrap();
    // The fixture's tokenizer is vocab.json + merges.txt: GPT-2's first 999 tokens + EOT.
    assert_eq!(tokenizer.vocab_size(), 1000);
    assert_eq!(tokenizer.eot_id(), 999);
    let prompt_ids = tokenizer
        .encode(greedy["prompt"].as_str().unwrap())
        .unwrap();
    assert_eq!(prompt_ids, ids(&greedy["prompt_ids"]));
    // Through the KV cache, one token at a time.
    let params = SamplingParams::greedy().with_max_new_tokens(20);
    let continuation = TokenGenerator::new(&model, &prompt_ids, &params)
        .unwrap()
        .collect::<tinygpt::Result<Vec<u32>>>()
        .unwrap();
    assert_eq!(continuation, ids(&greedy["continuation_ids"]));
}

#[test]
fn save_hf_dir_round_trips_exactly() {
    let (model, tokenizer) = Gpt::from_hf_dir_with_tokenizer(model_dir(), &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("saved");
    model.save_hf_dir_with_tokenizer(&dir, &tokenizer).unwrap();
    for name in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.join(name).is_file(), "{name}");
    }
    let cfg = json(&dir.join("config.json"));
    assert_eq!(cfg["model_type"], "gpt2");
    assert_eq!(cfg["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(cfg["n_positions"], 128);
    assert_eq!(cfg["n_inner"], serde_json::Value::Null);
    assert_eq!(cfg["eos_token_id"], 999);
    // HF names and layout, no lm_head (tied), the "format" metadata transformers checks.
    let saved = load_safetensors(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        saved["transformer.h.0.attn.c_attn.weight"].dims(),
        [64, 192]
    );
    assert!(!saved.contains_key("lm_head.weight"));
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");

    let (back, tok) = Gpt::from_hf_dir_with_tokenizer(&dir, &Device::Cpu).unwrap();
    assert_eq!(back.config(), model.config());
    for w in ["a", "b"] {
        let (input, _) = reference(w);
        let (x, y) = (
            model.forward(&input).unwrap(),
            back.forward(&input).unwrap(),
        );
        assert_eq!(max_abs_diff(&x, &y), 0.0);
    }
    let text = "The meaning of life is<|endoftext|> 42";
    assert_eq!(tok.encode(text).unwrap(), tokenizer.encode(text).unwrap());
}

#[test]
fn models_without_biases_save_zero_biases() {
    let cfg = GptConfig {
        vocab_size: 50,
        block_size: 16,
        n_layer: 2,
        n_head: 2,
        n_embd: 8,
        dropout: 0.0,
        bias: false,
        ..Default::default()
    };
    let model = Gpt::init(&cfg, 3, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_hf_dir(dir.path()).unwrap();
    let saved = load_safetensors(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    let with_bias = GptConfig {
        bias: true,
        ..cfg.clone()
    };
    assert_eq!(saved.len(), with_bias.parameter_shapes().len());
    let zero = saved["transformer.h.1.mlp.c_fc.bias"]
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert_eq!(zero.to_scalar::<f32>().unwrap(), 0.0);
    let back = Gpt::from_hf_dir(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(back.config(), &with_bias);
    let input = Tensor::new(&[[1u32, 7, 3, 49, 0, 12]], &Device::Cpu).unwrap();
    let diff = max_abs_diff(
        &model.forward(&input).unwrap(),
        &back.forward(&input).unwrap(),
    );
    assert!(diff < 1e-6, "{diff}");
}

#[test]
fn unprefixed_keys_old_buffers_and_tied_head_load() {
    let wte = |t: &HashMap<String, Tensor>| t["transformer.wte.weight"].clone();
    // GPT2Model's names (no `transformer.`), plus the mask buffers of old exports and a
    // tied lm_head, as `torch.save(model.state_dict())` of a GPT2LMHeadModel would hold.
    let dir = edited_copy(|t| {
        let head = wte(t);
        *t = t
            .drain()
            .map(|(k, v)| (k.trim_start_matches("transformer.").to_string(), v))
            .collect();
        for i in 0..2 {
            let mask = Tensor::ones((1, 1, 128, 128), DType::U8, &Device::Cpu).unwrap();
            t.insert(format!("h.{i}.attn.bias"), mask);
            t.insert(
                format!("h.{i}.attn.masked_bias"),
                Tensor::new(-1e4f32, &Device::Cpu).unwrap(),
            );
        }
        t.insert("lm_head.weight".into(), head);
    });
    let model = Gpt::from_hf_dir(dir.path(), &Device::Cpu).unwrap();
    assert!(diff_to_reference(&model) <= 1e-4);
    // An lm_head that is not wte is an untied head we cannot hold.
    let dir = edited_copy(|t| {
        let head = (wte(t) * 2.0).unwrap();
        t.insert("lm_head.weight".into(), head);
    });
    let e = Gpt::from_hf_dir(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`lm_head.weight` differs"), "{e}");
}

#[test]
fn a_tied_matrix_stored_only_as_lm_head_loads_as_wte() {
    // safetensors' `save_model` keeps one name of tensors that share storage, and for a
    // GPT2LMHeadModel that can be `lm_head.weight`: transformers ties it back into wte.
    let dir = edited_copy(|t| {
        let wte = t.remove("transformer.wte.weight").unwrap();
        t.insert("lm_head.weight".into(), wte);
    });
    let saved = load_safetensors(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(saved.contains_key("lm_head.weight"));
    assert!(!saved.contains_key("transformer.wte.weight"));
    let normal = Gpt::from_hf_dir(model_dir(), &Device::Cpu).unwrap();
    let model = Gpt::from_hf_dir(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(model.config(), normal.config());
    for w in ["a", "b"] {
        let (input, _) = reference(w);
        let (x, y) = (
            normal.forward(&input).unwrap(),
            model.forward(&input).unwrap(),
        );
        assert_eq!(max_abs_diff(&x, &y), 0.0, "input {w}");
    }
    // GPT2Model's unprefixed names too, and through the checkpoint loader.
    let dir = edited_copy(|t| {
        let wte = t.remove("transformer.wte.weight").unwrap();
        *t = t
            .drain()
            .map(|(k, v)| (k.trim_start_matches("transformer.").to_string(), v))
            .collect();
        t.insert("lm_head.weight".into(), wte);
    });
    let (model, _) = tinygpt::checkpoint::load_model(dir.path(), &Device::Cpu).unwrap();
    let (input, _) = reference("a");
    assert_eq!(
        max_abs_diff(
            &normal.forward(&input).unwrap(),
            &model.forward(&input).unwrap()
        ),
        0.0
    );
    // Neither name: wte is missing, by its name.
    let dir = edited_copy(|t| {
        t.remove("transformer.wte.weight");
    });
    let e = Gpt::from_hf_dir(dir.path(), &Device::Cpu).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("tensor `transformer.wte.weight` is missing in "),
        "{e}"
    );
}

/// Set in the child processes of
/// [`a_model_over_the_memory_limit_is_refused_before_its_weights_are_read`].
const CHILD: &str = "TINYGPT_TEST_MEMORY_CHILD";

/// `TINYGPT_MEMORY_LIMIT` is read per process, so the checks run in child processes of this
/// test binary (this test again, with the variable set), where no other test sees it.
#[test]
fn a_model_over_the_memory_limit_is_refused_before_its_weights_are_read() {
    const NAME: &str = "a_model_over_the_memory_limit_is_refused_before_its_weights_are_read";
    if std::env::var_os(CHILD).is_none() {
        for limit in ["1M", "2M", "eight"] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([NAME, "--exact", "--nocapture", "--test-threads=1"])
                .env(CHILD, "1")
                .env("TINYGPT_MEMORY_LIMIT", limit)
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                out.status.success() && stdout.contains("1 passed"),
                "TINYGPT_MEMORY_LIMIT={limit}:\n{stdout}\n{stderr}"
            );
        }
        return;
    }
    // The fixture needs 1.6 MiB to run: 172,288 f32 weights (0.7 MiB), a KV cache of
    // 2 · 2 layers · 128 positions · 64 (0.1 MiB), one forward pass of 128 · (10 · 64 + 1000)
    // floats (0.8 MiB). A truncated weights file shows that the refusal comes before it is read.
    let dir = edited_copy(|_| {});
    let weights = dir.path().join("model.safetensors");
    std::fs::write(&weights, b"truncated").unwrap();
    let limit = std::env::var("TINYGPT_MEMORY_LIMIT").unwrap();
    let result = Gpt::from_hf_dir(dir.path(), &Device::Cpu);
    match limit.as_str() {
        "1M" => {
            let e = result.unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{e:?}");
            assert_eq!(
                e.to_string(),
                format!(
                    "invalid config: {}: a model of n_layer 2, n_head 4, n_embd 64, vocab_size \
                     1000, block_size 128 (0.2M parameters) needs about 1.6 MiB to run (weights \
                     0.7 MiB, KV cache 0.1 MiB, activations 0.8 MiB, for batches of 1 × 128 \
                     tokens), more than the 1.0 MiB TINYGPT_MEMORY_LIMIT allows: make the model \
                     smaller, or set TINYGPT_MEMORY_LIMIT (e.g. 64G) to override the check",
                    dir.path().join("config.json").display()
                )
            );
            // Through the checkpoint loader too, and for a model built in memory.
            let e = tinygpt::checkpoint::load_model(dir.path(), &Device::Cpu).unwrap_err();
            assert!(e.to_string().contains("needs about 1.6 MiB to run"), "{e}");
            let cfg = tinygpt::hf::load_config(model_dir()).unwrap();
            let e = Gpt::init(&cfg, 0, &Device::Cpu).unwrap_err().to_string();
            assert!(
                e.contains("to train (weights 0.7 MiB, gradients 0.7 MiB"),
                "{e}"
            );
        }
        // It fits: the weights are read, and found truncated.
        "2M" => assert!(matches!(result, Err(Error::BadFile { .. })), "{result:?}"),
        _ => assert_eq!(
            result.unwrap_err().to_string(),
            "invalid config: TINYGPT_MEMORY_LIMIT=\"eight\" is not a memory size: give bytes, \
             or a number with K, M, G or T (binary: 8G is 8 GiB), or `off`"
        ),
    }
}

#[test]
fn sharded_weights_load() {
    let dir = edited_copy(|_| {});
    let all = load_safetensors(dir.path().join("model.safetensors"), &Device::Cpu).unwrap();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let (mut one, mut two, mut map) = (HashMap::new(), HashMap::new(), serde_json::Map::new());
    for (k, v) in all {
        let shard = if k.contains(".h.1.") {
            "model-00002-of-00002.safetensors"
        } else {
            "model-00001-of-00002.safetensors"
        };
        map.insert(k.clone(), shard.into());
        if k.contains(".h.1.") {
            two.insert(k, v);
        } else {
            one.insert(k, v);
        }
    }
    save_safetensors(&one, dir.path().join("model-00001-of-00002.safetensors")).unwrap();
    save_safetensors(&two, dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let index = serde_json::json!({ "metadata": {}, "weight_map": map });
    std::fs::write(
        dir.path().join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let model = Gpt::from_hf_dir(dir.path(), &Device::Cpu).unwrap();
    assert!(diff_to_reference(&model) <= 1e-4);
}

#[test]
fn half_precision_files_load_as_f32() {
    let dir = edited_copy(|t| {
        for v in t.values_mut() {
            *v = v.to_dtype(DType::F16).unwrap();
        }
    });
    let model = Gpt::from_hf_dir(dir.path(), &Device::Cpu).unwrap();
    assert_eq!(model.dtype(), DType::F32);
    // f16 rounding of the weights (relative 2^-11) moves the logits by a little.
    let diff = diff_to_reference(&model);
    assert!(diff > 0.0 && diff < 0.05, "{diff}");
    let half = Gpt::from_hf_dir_with_dtype(dir.path(), &Device::Cpu, DType::F16).unwrap();
    assert_eq!(half.dtype(), DType::F16);
    assert!(matches!(
        Gpt::from_hf_dir_with_dtype(dir.path(), &Device::Cpu, DType::U32),
        Err(Error::InvalidArgument(_))
    ));
}

#[test]
fn wrong_shapes_name_the_tensor_and_both_shapes() {
    // The classic mistake: a projection stored as a Linear (out, in) instead of Conv1D (in, out).
    let dir = edited_copy(|t| {
        let w = t["transformer.h.1.mlp.c_fc.weight"]
            .t()
            .unwrap()
            .contiguous()
            .unwrap();
        t.insert("transformer.h.1.mlp.c_fc.weight".into(), w);
    });
    let e = Gpt::from_hf_dir(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e:?}");
    let want = format!(
        "tensor `transformer.h.1.mlp.c_fc.weight` has shape [256, 64], expected [64, 256] in {}",
        dir.path().join("model.safetensors").display()
    );
    assert_eq!(e.to_string(), want);
    // A config that does not fit the weights.
    let dir = edited_copy(|_| {});
    edit_config(dir.path(), "vocab_size", 1001.into());
    let e = Gpt::from_hf_dir(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(
            "tensor `transformer.wte.weight` has shape [1000, 64], expected [1001, 64] in "
        ),
        "{e}"
    );
}

#[test]
fn missing_and_unexpected_tensors_are_named() {
    let dir = edited_copy(|t| {
        t.remove("transformer.h.0.ln_2.bias");
    });
    let e = Gpt::from_hf_dir(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }), "{e:?}");
    assert!(
        e.to_string()
            .starts_with("tensor `transformer.h.0.ln_2.bias` is missing in "),
        "{e}"
    );

    let dir = edited_copy(|t| {
        let q = Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap();
        t.insert("transformer.h.0.attn.q_attn.weight".into(), q);
    });
    let e = Gpt::from_hf_dir(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unexpected tensor `transformer.h.0.attn.q_attn.weight`"),
        "{e}"
    );

    // No weights file at all, or no directory.
    let dir = edited_copy(|_| {});
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let e = Gpt::from_hf_dir(dir.path(), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing model.safetensors"), "{e}");
    let e = Gpt::from_hf_dir(dir.path().join("nope"), &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not exist"), "{e}");
}

#[test]
fn truncated_safetensors_is_an_error_not_a_panic() {
    let dir = edited_copy(|_| {});
    let path = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    for len in [bytes.len() - 1, bytes.len() / 2, 100, 8, 3, 0] {
        std::fs::write(&path, &bytes[..len]).unwrap();
        match Gpt::from_hf_dir(dir.path(), &Device::Cpu) {
            Err(e @ Error::BadFile { .. }) => {
                assert!(e.to_string().contains("model.safetensors"), "{e}")
            }
            other => panic!("{len} bytes: expected BadFile, got {other:?}"),
        }
    }
}

#[test]
fn unsupported_config_keys_are_refused_by_name() {
    for (key, value) in [
        ("scale_attn_by_inverse_layer_idx", serde_json::json!(true)),
        ("reorder_and_upcast_attn", serde_json::json!(true)),
        ("scale_attn_weights", serde_json::json!(false)),
        ("add_cross_attention", serde_json::json!(true)),
        ("tie_word_embeddings", serde_json::json!(false)),
        ("activation_function", serde_json::json!("relu")),
        ("layer_norm_epsilon", serde_json::json!(1e-6)),
        ("n_inner", serde_json::json!(128)),
    ] {
        let dir = edited_copy(|_| {});
        edit_config(dir.path(), key, value.clone());
        let e = Gpt::from_hf_dir(dir.path(), &Device::Cpu).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{key}: {e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("`{key}: ")) && msg.contains("is not supported"),
            "{msg}"
        );
        assert!(msg.contains("config.json"), "{msg}");
    }
    let dir = edited_copy(|_| {});
    std::fs::write(dir.path().join("config.json"), "{\"n_embd\": \"wide\"}").unwrap();
    let e = Gpt::from_hf_dir(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::BadFile { .. }), "{e:?}");
    // A tinygpt checkpoint's own config.json is pointed to the right loader.
    GptConfig::gpt2()
        .save(dir.path().join("config.json"))
        .unwrap();
    let e = Gpt::from_hf_dir(dir.path(), &Device::Cpu).unwrap_err();
    assert!(matches!(e, Error::BadFile { .. }), "{e:?}");
    assert!(e.to_string().contains("checkpoint::load_model"), "{e}");
}

#[test]
#[ignore = "needs the public data files: TINYGPT_DATA=DIR cargo test --release --features server -- --ignored"]
fn gpt2_tokenizer_matches_transformers_and_openai() {
    let want = json(&fixtures().join("gpt2_tokenizer.json"));
    let tok = Tokenizer::from_gpt2_files(
        common::data_file("gpt2_encoder.json"),
        common::data_file("gpt2_vocab.bpe"),
    )
    .unwrap();

    let mixed = want["mixed_text"].as_str().unwrap();
    let ids_mixed = tok.encode(mixed).unwrap();
    assert_eq!(ids_mixed, ids(&want["mixed_ids"]));
    assert_eq!(ids_mixed.iter().filter(|&&id| id == 50256).count(), 1);
    assert_eq!(tok.decode(&ids_mixed).unwrap(), mixed);

    let n = want["shakespeare_chars"].as_u64().unwrap() as usize;
    let text = std::fs::read_to_string(common::data_file("tinyshakespeare.txt")).unwrap();
    let head: String = text.chars().take(n).collect();
    let ids_head = tok.encode(&head).unwrap();
    assert_eq!(ids_head, ids(&want["shakespeare_ids"]));
    assert_eq!(tok.decode(&ids_head).unwrap(), head);
}
