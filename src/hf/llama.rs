//! Hugging Face Llama, Qwen2 and Qwen3 directories in and out.
//!
//! `LlamaForCausalLM` (Llama 2/3, TinyLlama, SmolLM2, minimind), `Qwen2ForCausalLM` (Qwen2,
//! Qwen2.5) and `Qwen3ForCausalLM` (Qwen3) save the same layout: `config.json`,
//! `model.safetensors` (or `model.safetensors.index.json` + shards), `generation_config.json`,
//! the tokenizer files. tinygpt's [`Arch::Llama`] model computes `modeling_llama.py`,
//! `modeling_qwen2.py` and `modeling_qwen3.py` under their own tensor names and `nn.Linear`
//! layout, so the weights load as they are; the config is a table:
//!
//! | Hugging Face | tinygpt |
//! |---|---|
//! | `hidden_size`, `num_hidden_layers`, `num_attention_heads` | `n_embd`, `n_layer`, `n_head` |
//! | `num_key_value_heads`, `head_dim`, `intermediate_size` | the same names (`n_kv_head`) |
//! | `max_position_embeddings` | `block_size` |
//! | `rope_theta` (transformers 4) or `rope_parameters.rope_theta` (5) | `rope_theta` |
//! | `rms_norm_eps`, `tie_word_embeddings` | `norm_eps`, `tie_word_embeddings` |
//! | Llama `attention_bias` + `mlp_bias`; Qwen2 (always); Qwen3 `attention_bias` | `bias`; `qkv_bias`; `bias` |
//! | `model_type` `qwen3` | `qk_norm` |
//!
//! What tinygpt does not compute is refused by name rather than computed differently: RoPE
//! scaling (`rope_type` other than `default`: `linear`, `dynamic`, `yarn`, `llama3`, …),
//! sliding-window attention, mixtures of experts, an activation other than SiLU,
//! `pretraining_tp` above 1, and other model types.
//!
//! References: `transformers/models/{llama,qwen2,qwen3}/configuration_*.py` and `modeling_*.py`
//! (transformers 5.24). `scripts/reference.py llama-fixtures` builds the test fixtures.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Tensor};
use serde_json::{json, Map, Value};

use crate::model::{check_tensors, Arch, Gpt, GptConfig};
use crate::{Error, Result};

/// The Hugging Face families of [`Arch::Llama`], by `model_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlamaFamily {
    /// `llama`: `LlamaForCausalLM`.
    Llama,
    /// `qwen2`: `Qwen2ForCausalLM` (biases on q, k and v).
    Qwen2,
    /// `qwen3`: `Qwen3ForCausalLM` (RMSNorm on each query and key head, a set head size).
    Qwen3,
}

impl LlamaFamily {
    /// The family a `model_type` names, if tinygpt reads it.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(Self::Llama),
            "qwen2" => Some(Self::Qwen2),
            "qwen3" => Some(Self::Qwen3),
            _ => None,
        }
    }

    /// `config.json`'s `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Self::Llama => "llama",
            Self::Qwen2 => "qwen2",
            Self::Qwen3 => "qwen3",
        }
    }

    /// The transformers class, for `architectures`.
    pub fn architecture(self) -> &'static str {
        match self {
            Self::Llama => "LlamaForCausalLM",
            Self::Qwen2 => "Qwen2ForCausalLM",
            Self::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The family a tinygpt Llama config is saved as: Qwen3 for q/k norms, Qwen2 for q/k/v
    /// biases alone, Llama otherwise.
    pub fn of(cfg: &GptConfig) -> Self {
        if cfg.qk_norm {
            Self::Qwen3
        } else if cfg.qkv_bias && !cfg.bias {
            Self::Qwen2
        } else {
            Self::Llama
        }
    }
}

/// Whether a parsed `config.json` is one of the Llama families (by `model_type`, or by
/// `architectures` when it has none).
pub(crate) fn is_llama_config(config: &Map<String, Value>) -> bool {
    if let Some(t) = config.get("model_type").and_then(Value::as_str) {
        return LlamaFamily::from_model_type(t).is_some();
    }
    config
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| {
            a.iter()
                .filter_map(Value::as_str)
                .any(|s| ["LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"].contains(&s))
        })
}

fn family_of(config: &Map<String, Value>) -> Option<LlamaFamily> {
    if let Some(t) = config.get("model_type").and_then(Value::as_str) {
        return LlamaFamily::from_model_type(t);
    }
    let arch = config.get("architectures")?.as_array()?;
    arch.iter().filter_map(Value::as_str).find_map(|s| match s {
        "LlamaForCausalLM" => Some(LlamaFamily::Llama),
        "Qwen2ForCausalLM" => Some(LlamaFamily::Qwen2),
        "Qwen3ForCausalLM" => Some(LlamaFamily::Qwen3),
        _ => None,
    })
}

/// Converts a Llama/Qwen2/Qwen3 `config.json` (parsed) into a [`GptConfig`]; `path` names
/// the file in errors. A key missing from the file takes transformers' default for its
/// family.
///
/// # Errors
/// [`Error::Config`] naming the key for a setting tinygpt does not compute (see the module
/// docs) or a value of the wrong type; [`Error::BadFile`] if the family is unknown.
pub(crate) fn config_from_hf(config: &Map<String, Value>, path: &Path) -> Result<GptConfig> {
    let family = family_of(config).ok_or_else(|| {
        Error::bad_file(
            path,
            None,
            "not a Llama, Qwen2 or Qwen3 config (model_type)",
        )
    })?;
    let bad = |key: &str, what: &str| Error::Config(format!("{}: `{key}` {what}", path.display()));
    let uint = |key: &str| -> Result<Option<usize>> {
        match config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| bad(key, &format!("must be a non-negative integer, got {v}"))),
        }
    };
    let float = |key: &str, v: Option<&Value>| -> Result<Option<f64>> {
        match v {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| bad(key, &format!("must be a number, got {v}"))),
        }
    };
    let boolean = |key: &str| -> Result<Option<bool>> {
        match config.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(bad(key, &format!("must be true or false, got {v}"))),
        }
    };
    let required =
        |key: &str, default: usize| -> Result<usize> { Ok(uint(key)?.unwrap_or(default)) };

    // What tinygpt does not compute, by name.
    if let Some(act) = config.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            return Err(bad(
                "hidden_act",
                &format!("is \"{act}\": tinygpt's SwiGLU uses SiLU only"),
            ));
        }
    }
    if uint("pretraining_tp")?.is_some_and(|tp| tp > 1) {
        return Err(bad(
            "pretraining_tp",
            "above 1 (sliced projections) is not supported",
        ));
    }
    if boolean("use_sliding_window")? == Some(true) {
        return Err(bad(
            "use_sliding_window",
            "is true: sliding-window attention is not supported",
        ));
    }
    if let Some(Value::Array(types)) = config.get("layer_types") {
        if let Some(t) = types.iter().find(|t| t.as_str() != Some("full_attention")) {
            return Err(bad(
                "layer_types",
                &format!("holds {t}: only full attention is supported"),
            ));
        }
    }
    for moe in ["num_experts", "num_local_experts", "n_routed_experts"] {
        if uint(moe)?.is_some_and(|n| n > 0) {
            return Err(bad(moe, "is set: mixtures of experts are not supported"));
        }
    }
    // RoPE: transformers 5 writes `rope_parameters`, transformers 4 `rope_theta` and
    // `rope_scaling`.
    let rope_parameters = config.get("rope_parameters").and_then(Value::as_object);
    for (key, scaling) in [
        ("rope_scaling", config.get("rope_scaling")),
        ("rope_parameters", config.get("rope_parameters")),
    ] {
        let Some(Value::Object(s)) = scaling else {
            continue;
        };
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str);
        if let Some(kind) = kind.filter(|k| *k != "default") {
            return Err(bad(
                key,
                &format!("asks for \"{kind}\" RoPE scaling: only the default rotary embedding is supported"),
            ));
        }
    }
    let rope_theta = match float("rope_theta", config.get("rope_theta"))? {
        Some(t) => Some(t),
        None => float(
            "rope_parameters.rope_theta",
            rope_parameters.and_then(|p| p.get("rope_theta")),
        )?,
    };

    let n_embd = required("hidden_size", 4096)?;
    let n_head = required("num_attention_heads", 32)?;
    let n_kv_head = uint("num_key_value_heads")?;
    let head_dim = match (uint("head_dim")?, family) {
        (Some(d), _) => Some(d),
        (None, LlamaFamily::Qwen3) => Some(128), // Qwen3Config's default
        (None, _) => None,
    };
    let attention_bias = boolean("attention_bias")?.unwrap_or(false);
    let mlp_bias = boolean("mlp_bias")?.unwrap_or(false);
    let (bias, qkv_bias, qk_norm) = match family {
        LlamaFamily::Llama => {
            if attention_bias != mlp_bias {
                return Err(bad(
                    "attention_bias",
                    &format!(
                        "is {attention_bias} but `mlp_bias` is {mlp_bias}: tinygpt's `bias` puts \
                         biases on every projection or none"
                    ),
                ));
            }
            (attention_bias, false, false)
        }
        LlamaFamily::Qwen2 => (false, true, false),
        LlamaFamily::Qwen3 => {
            if attention_bias {
                // q, k, v and o biases without MLP biases: not one of tinygpt's bias settings
                // (`bias` covers every projection, `qkv_bias` q/k/v only).
                return Err(bad(
                    "attention_bias",
                    "is true: a Qwen3 with biases on q, k, v and o but none in its MLP is not supported",
                ));
            }
            (false, false, true)
        }
    };
    let cfg = GptConfig {
        vocab_size: required("vocab_size", 32_000)?,
        block_size: required("max_position_embeddings", 2048)?,
        n_layer: required("num_hidden_layers", 32)?,
        n_head,
        n_embd,
        dropout: float("attention_dropout", config.get("attention_dropout"))?.unwrap_or(0.0) as f32,
        bias,
        arch: Arch::Llama,
        n_kv_head: n_kv_head.filter(|&k| k != n_head),
        head_dim: head_dim.filter(|&d| d.checked_mul(n_head) != Some(n_embd)),
        intermediate_size: Some(required("intermediate_size", 11_008)?),
        rope_theta: rope_theta.unwrap_or(10_000.0),
        norm_eps: float("rms_norm_eps", config.get("rms_norm_eps"))?.unwrap_or(1e-6),
        tie_word_embeddings: boolean("tie_word_embeddings")?.unwrap_or(false),
        qkv_bias,
        qk_norm,
    };
    cfg.validate().map_err(|e| match e {
        Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
        e => e,
    })?;
    Ok(cfg)
}

/// The `config.json` transformers reads for `cfg` (an [`Arch::Llama`] config), of the family
/// [`LlamaFamily::of`] gives, with transformers 5's `rope_parameters` and transformers 4's
/// `rope_theta` both written (each version reads its own). `eos_token_id` / `bos_token_id`
/// are written when given.
///
/// # Errors
/// [`Error::Config`] if the config cannot be written as its family (Qwen2 with an explicit
/// head size, Qwen3 with biases, a GPT-2 config).
pub fn config_to_hf(
    cfg: &GptConfig,
    bos: Option<u32>,
    eos: Option<&[u32]>,
    dtype: DType,
) -> Result<Value> {
    if cfg.arch != Arch::Llama {
        return Err(Error::Config(
            "a GPT-2 config is saved as GPT2Config, not as a Llama".into(),
        ));
    }
    let family = LlamaFamily::of(cfg);
    let mut c = json!({
        "architectures": [family.architecture()],
        "model_type": family.model_type(),
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "intermediate_size": cfg.mlp_hidden(),
        "num_hidden_layers": cfg.n_layer,
        "num_attention_heads": cfg.n_head,
        "num_key_value_heads": cfg.n_kv_heads(),
        "head_dim": cfg.head_size(),
        "hidden_act": "silu",
        "max_position_embeddings": cfg.block_size,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
        "torch_dtype": super::torch_dtype_name(dtype),
        "dtype": super::torch_dtype_name(dtype),
    });
    let Some(obj) = c.as_object_mut() else {
        return Err(Error::Config("config is not an object".into()));
    };
    match family {
        LlamaFamily::Llama => {
            obj.insert("attention_bias".into(), json!(cfg.bias));
            obj.insert("mlp_bias".into(), json!(cfg.bias));
            obj.insert("pretraining_tp".into(), json!(1));
        }
        LlamaFamily::Qwen2 => {
            if cfg.head_dim.is_some_and(|d| d * cfg.n_head != cfg.n_embd) {
                return Err(Error::Config(
                    "a Qwen2 (q/k/v biases) has head size n_embd / n_head; this config sets head_dim".into(),
                ));
            }
            obj.remove("head_dim");
            obj.insert("use_sliding_window".into(), json!(false));
            obj.insert("sliding_window".into(), Value::Null);
            obj.insert("max_window_layers".into(), json!(cfg.n_layer));
        }
        LlamaFamily::Qwen3 => {
            if cfg.qkv_bias || cfg.bias {
                return Err(Error::Config(
                    "a model with q/k norms saves as a Qwen3, which tinygpt writes without biases; \
                     this config has bias or qkv_bias set"
                        .into(),
                ));
            }
            obj.insert("attention_bias".into(), json!(false));
            obj.insert("use_sliding_window".into(), json!(false));
            obj.insert("sliding_window".into(), Value::Null);
            obj.insert("max_window_layers".into(), json!(cfg.n_layer));
        }
    }
    if let Some(b) = bos {
        obj.insert("bos_token_id".into(), json!(b));
    }
    if let Some(e) = eos {
        obj.insert(
            "eos_token_id".into(),
            if e.len() == 1 { json!(e[0]) } else { json!(e) },
        );
    }
    Ok(c)
}

/// Checks the tensors of a Llama-family file against `cfg` and drops what transformers
/// saves beside the weights: `model.layers.{i}.self_attn.rotary_emb.inv_freq` /
/// `model.rotary_emb.inv_freq` buffers, and a tied model's `lm_head.weight`, which must then
/// equal the embedding (safetensors may also keep the shared matrix under `lm_head.weight`
/// alone: it is then the embedding, as transformers ties it).
///
/// # Errors
/// [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming the tensor and `path`;
/// [`Error::Checkpoint`] for a tied head that differs from the embedding, or a tensor the
/// config does not account for.
pub(crate) fn hf_tensors(
    cfg: &GptConfig,
    mut tensors: HashMap<String, Tensor>,
    path: &Path,
) -> Result<HashMap<String, Tensor>> {
    crate::checkpoint::check_model_size(cfg, &tensors, path)?;
    tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
    if cfg.tie_word_embeddings {
        if let Some(head) = tensors.remove("lm_head.weight") {
            match tensors.get("model.embed_tokens.weight") {
                None => {
                    tensors.insert("model.embed_tokens.weight".into(), head);
                }
                Some(embed) => {
                    let same = head.dims() == embed.dims()
                        && head
                            .to_dtype(DType::F32)?
                            .eq(&embed.to_dtype(DType::F32)?)?
                            .to_dtype(DType::F32)?
                            .min_all()?
                            .to_scalar::<f32>()?
                            == 1.0;
                    if !same {
                        return Err(Error::checkpoint(
                            path,
                            "`lm_head.weight` differs from `model.embed_tokens.weight` although \
                             `tie_word_embeddings` is true",
                        ));
                    }
                }
            }
        }
    }
    check_tensors(cfg, &tensors, Some(path))?;
    Ok(tensors)
}

impl Gpt {
    /// Writes an [`Arch::Llama`] model as its Hugging Face family (`config.json` of
    /// [`config_to_hf`], `model.safetensors` under the model's own names), with
    /// `generation_config.json` when `eos` ids are given.
    pub(crate) fn save_llama_hf(
        &self,
        dir: &Path,
        bos: Option<u32>,
        eos: Option<&[u32]>,
    ) -> Result<()> {
        let cfg = self.config();
        let config = config_to_hf(cfg, bos, eos, self.dtype())?;
        super::write_json(&dir.join(super::files::CONFIG), &config)?;
        let path = dir.join(super::files::MODEL);
        let tensors = self
            .tensors()
            .into_iter()
            .map(|(k, t)| Ok((k, t.contiguous()?)))
            .collect::<Result<HashMap<_, _>>>()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(tensors, Some(metadata))
            .map_err(|e| Error::io(&path, std::io::Error::other(e.to_string())))?;
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
        if let Some(eos) = eos {
            let mut generation =
                json!({ "eos_token_id": if eos.len() == 1 { json!(eos[0]) } else { json!(eos) } });
            if let (Some(b), Some(obj)) = (bos, generation.as_object_mut()) {
                obj.insert("bos_token_id".into(), json!(b));
            }
            super::write_json(&dir.join(super::files::GENERATION_CONFIG), &generation)?;
        }
        Ok(())
    }
}
