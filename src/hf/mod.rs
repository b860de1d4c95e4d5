//! Hugging Face format in and out: GPT-2 here, Llama, Qwen2 and Qwen3 in [`llama`].
//!
//! [`load_config`], [`Gpt::from_hf_dir`] and [`Gpt::save_hf_dir`] serve every family: the
//! `model_type` of `config.json` (or its `architectures`) chooses the conversion, and a
//! model's [`crate::Arch`] chooses what is written.
//!
//! People arrive with GPT-2 weights in Hugging Face's layout (OpenAI's `gpt2` … `gpt2-xl`,
//! or anything `transformers.GPT2LMHeadModel.save_pretrained` wrote) and leave wanting their
//! tinygpt models usable by other tools. A Hugging Face GPT-2 directory holds:
//!
//! ```text
//! DIR/config.json        GPT2Config: vocab_size, n_positions, n_embd, n_layer, n_head, …
//! DIR/model.safetensors  weights (or model.safetensors.index.json + shards)
//! DIR/tokenizer.json     the tokenizer, or the older pair vocab.json + merges.txt
//! ```
//!
//! tinygpt's [`Gpt`] already computes GPT-2 (`modeling_gpt2.py`) under HF's names and in HF's
//! `Conv1D` layout (a projection's weight is `(in, out)`, applied as `x @ W + b`), so the
//! conversion is a table, not a puzzle:
//!
//! * **config**: [`Gpt2Config`] is HF's `config.json`; it converts into our [`GptConfig`]
//!   with [`TryFrom`], refusing by name every setting tinygpt does not compute (another
//!   LayerNorm epsilon or activation, `scale_attn_by_inverse_layer_idx`, cross-attention,
//!   an untied head, …) rather than computing something else silently.
//! * **weights**: keys may or may not carry the `transformer.` prefix (`GPT2LMHeadModel`
//!   writes it, `GPT2Model` does not); the `h.{i}.attn.bias` / `h.{i}.attn.masked_bias`
//!   buffers of old exports are ignored; `lm_head.weight` is usually absent (tied to
//!   `wte`), and is accepted only if it equals `wte`; a file holding the tied matrix only as
//!   `lm_head.weight` (no `wte`, as safetensors' de-duplication can write it) loads it as
//!   `wte`, as transformers does. f16/bf16 files load as f32 unless asked
//!   otherwise ([`Gpt::from_hf_dir_with_dtype`]).
//! * **saving** ([`Gpt::save_hf_dir`]) writes the same layout back, with zero biases for
//!   models trained without biases (GPT-2 always has them; zeros compute the same), so
//!   `transformers.GPT2LMHeadModel.from_pretrained(dir)` loads it and computes our logits;
//!   with a tokenizer ([`Gpt::save_hf_dir_with_tokenizer`]) a chat model's export carries its
//!   chat template and special tokens, so transformers' `apply_chat_template` gives tinygpt's
//!   prompt ids and `generate` stops at `<|end|>`.
//! * **as a checkpoint**: [`crate::checkpoint::load_model`] and `load_trainable` read such a
//!   directory ([`is_hf_dir`]), so it serves wherever a tinygpt checkpoint does.
//!
//! ```
//! use tinygpt::candle::Device;
//! use tinygpt::{Gpt, GptConfig};
//!
//! let cfg = GptConfig { vocab_size: 50, block_size: 16, n_layer: 1, n_head: 2, n_embd: 8,
//!                       dropout: 0.0, bias: false, ..Default::default() };
//! let model = Gpt::init(&cfg, 0, &Device::Cpu)?;
//! let dir = std::env::temp_dir().join(format!("tinygpt-hf-doctest-{}", std::process::id()));
//! model.save_hf_dir(&dir)?; // config.json + model.safetensors, as transformers writes them
//! let loaded = Gpt::from_hf_dir(&dir, &Device::Cpu)?;
//! assert!(loaded.config().bias); // GPT-2 always has biases: ours were written as zeros
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), tinygpt::Error>(())
//! ```
//!
//! Reference: `transformers/models/gpt2/configuration_gpt2.py` and `modeling_gpt2.py`;
//! `scripts/reference.py` in this repository builds the fixtures the tests compare against.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

pub mod chat_template;
pub mod llama;

use crate::checkpoint::load_safetensors;
use crate::model::{check_tensors, Arch, Gpt, GptConfig, LAYER_NORM_EPS};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// File names inside a Hugging Face model directory.
pub mod files {
    /// `GPT2Config` as JSON.
    pub const CONFIG: &str = "config.json";
    /// The weights, one file.
    pub const MODEL: &str = "model.safetensors";
    /// The weights, sharded: `{"weight_map": {tensor name: shard file}}`.
    pub const MODEL_INDEX: &str = "model.safetensors.index.json";
    /// The tokenizer, `tokenizers`' JSON format.
    pub const TOKENIZER: &str = "tokenizer.json";
    /// Settings `transformers.AutoTokenizer` reads beside `tokenizer.json`.
    pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
    /// GPT-2's BPE vocabulary (OpenAI's `encoder.json`).
    pub const VOCAB: &str = "vocab.json";
    /// GPT-2's BPE merges (OpenAI's `vocab.bpe`).
    pub const MERGES: &str = "merges.txt";
    /// PyTorch pickle weights, which tinygpt does not read (only named in errors).
    pub const PYTORCH_BIN: &str = "pytorch_model.bin";
    /// Settings `transformers`' `generate` reads (`eos_token_id`, …).
    pub const GENERATION_CONFIG: &str = "generation_config.json";
}

/// Whether `dir` looks like a Hugging Face GPT-2 directory rather than a tinygpt checkpoint:
/// its `config.json` is a `GPT2Config` (`n_positions`, `model_type`, `n_ctx` or
/// `architectures`, and no tinygpt `block_size`), or, for a config with none of these keys,
/// the directory has HF's files and not a checkpoint's (`vocab.json` + `merges.txt` without
/// `tokenizer.json`, or sharded weights). A directory without a readable `config.json` is
/// not one (the checkpoint loader then says what is missing or malformed).
///
/// [`crate::checkpoint::load_model`] uses it to read either layout.
pub fn is_hf_dir(dir: impl AsRef<Path>) -> bool {
    let dir = dir.as_ref();
    let Ok(text) = std::fs::read_to_string(dir.join(files::CONFIG)) else {
        return false;
    };
    let Ok(serde_json::Value::Object(config)) = serde_json::from_str::<serde_json::Value>(&text)
    else {
        return false;
    };
    if config.contains_key("block_size") {
        return false;
    }
    if ["n_positions", "model_type", "n_ctx", "architectures"]
        .iter()
        .any(|k| config.contains_key(*k))
    {
        return true;
    }
    let gpt2_files = dir.join(files::VOCAB).is_file() && dir.join(files::MERGES).is_file();
    (gpt2_files && !dir.join(files::TOKENIZER).is_file())
        || (dir.join(files::MODEL_INDEX).is_file() && !dir.join(files::MODEL).is_file())
}

// ---------------------------------------------------------------------------------------------
// config.json
// ---------------------------------------------------------------------------------------------

/// Hugging Face's `GPT2Config` (`config.json`), with its names and defaults
/// (`configuration_gpt2.py`): a key missing from the file takes HF's default, and keys
/// tinygpt has no use for (`summary_*`, `task_specific_params`, …) are ignored on reading.
///
/// Convert it into a [`GptConfig`] with `GptConfig::try_from(&hf)`, which refuses what tinygpt
/// does not compute; [`Gpt2Config::from`] a [`GptConfig`] gives the config to save.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Gpt2Config {
    /// `"gpt2"` (anything else is refused).
    pub model_type: Option<String>,
    /// The model classes the checkpoint was saved from, e.g. `["GPT2LMHeadModel"]`.
    pub architectures: Option<Vec<String>>,
    /// Number of token ids (our `vocab_size`). Default 50257.
    pub vocab_size: usize,
    /// Context length (our `block_size`). Default 1024.
    pub n_positions: usize,
    /// Old name of the context length; written equal to `n_positions`, ignored on reading.
    pub n_ctx: Option<usize>,
    /// Width of the residual stream. Default 768.
    pub n_embd: usize,
    /// Number of blocks. Default 12.
    pub n_layer: usize,
    /// Number of attention heads. Default 12.
    pub n_head: usize,
    /// Width of the MLP; `None` means `4 · n_embd`, the only width tinygpt builds.
    pub n_inner: Option<usize>,
    /// The MLP's activation: `gelu_new` (default) or `gelu_pytorch_tanh`, the same tanh GELU.
    pub activation_function: String,
    /// Dropout on residual branches; becomes our single `dropout`. Default 0.1.
    pub resid_pdrop: f32,
    /// Dropout on the embeddings (tinygpt uses `resid_pdrop` everywhere). Default 0.1.
    pub embd_pdrop: f32,
    /// Dropout on attention weights (tinygpt uses `resid_pdrop` everywhere). Default 0.1.
    pub attn_pdrop: f32,
    /// LayerNorm epsilon; only GPT-2's `1e-5` is supported.
    pub layer_norm_epsilon: f64,
    /// Std of HF's weight initialisation (informational). Default 0.02.
    pub initializer_range: f64,
    /// Whether attention scores are divided by `sqrt(head_size)`; must be `true` (default).
    pub scale_attn_weights: bool,
    /// Mistral-style extra scaling by `1 / (layer + 1)`; must be `false` (default).
    pub scale_attn_by_inverse_layer_idx: bool,
    /// Upcast-and-reorder attention of Mistral's GPT-2s; must be `false` (default).
    pub reorder_and_upcast_attn: bool,
    /// Cross-attention layers (encoder–decoder use); must be `false` (default).
    pub add_cross_attention: bool,
    /// Whether `lm_head` shares `wte`'s weights; must be `true` (default).
    pub tie_word_embeddings: bool,
    /// Whether HF's `generate` keeps a KV cache (informational). Default `true`.
    pub use_cache: bool,
    /// Beginning-of-sequence id; GPT-2 uses `<|endoftext|>` = 50256.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id (or ids); GPT-2 uses `<|endoftext|>` = 50256.
    pub eos_token_id: Option<TokenIds>,
    /// Padding id; GPT-2 has none.
    pub pad_token_id: Option<u32>,
    /// dtype of the saved weights, e.g. `"float32"`, as transformers 4 names it
    /// (informational; tinygpt writes it, which transformers 4 and 5 both read).
    pub torch_dtype: Option<String>,
    /// dtype of the saved weights, as transformers 5 names it (informational; read only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
}

/// A token id or a list of them, as `config.json`'s `eos_token_id` may hold either.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// One id.
    One(u32),
    /// Several ids, any of which ends generation.
    Many(Vec<u32>),
}

impl Default for Gpt2Config {
    /// `GPT2Config()`: GPT-2 small (124M) with HF's defaults.
    fn default() -> Self {
        Self {
            model_type: Some("gpt2".into()),
            architectures: None,
            vocab_size: 50257,
            n_positions: 1024,
            n_ctx: None,
            n_embd: 768,
            n_layer: 12,
            n_head: 12,
            n_inner: None,
            activation_function: "gelu_new".into(),
            resid_pdrop: 0.1,
            embd_pdrop: 0.1,
            attn_pdrop: 0.1,
            layer_norm_epsilon: 1e-5,
            initializer_range: 0.02,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            add_cross_attention: false,
            tie_word_embeddings: true,
            use_cache: true,
            bos_token_id: Some(50256),
            eos_token_id: Some(TokenIds::One(50256)),
            pad_token_id: None,
            torch_dtype: None,
            dtype: None,
        }
    }
}

/// The activation names whose function is the tanh-approximated GELU tinygpt computes.
const TANH_GELU: [&str; 2] = ["gelu_new", "gelu_pytorch_tanh"];

impl Gpt2Config {
    /// Reads a `config.json`.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read; [`Error::BadFile`] (with the line) if it is
    /// not a JSON object of `GPT2Config` keys with the right types, or if it is a tinygpt
    /// checkpoint's [`GptConfig`] (it has `block_size`, which HF spells `n_positions`).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::json(path, None, &e))?;
        if value.get("block_size").is_some() && value.get("n_positions").is_none() {
            return Err(Error::bad_file(
                path,
                None,
                "this is a tinygpt checkpoint's config (it has `block_size`), not a Hugging Face \
                 GPT2Config: load the directory with tinygpt::checkpoint::load_model",
            ));
        }
        serde_json::from_value(value).map_err(|e| Error::bad_file(path, None, e.to_string()))
    }

    /// Writes the config as pretty JSON (keys sorted, as `save_pretrained` does).
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be written.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        // Through a Value, whose maps are sorted, so the file is stable and diffable.
        let json = serde_json::to_value(self)
            .and_then(|v| serde_json::to_string_pretty(&v))
            .map_err(|e| Error::bad_file(path, None, e.to_string()))?;
        std::fs::write(path, json + "\n").map_err(|e| Error::io(path, e))
    }
}

impl TryFrom<&Gpt2Config> for GptConfig {
    type Error = Error;

    /// Our config for an HF GPT-2 config: `n_positions` → `block_size`, `resid_pdrop` →
    /// `dropout`, biases always on.
    ///
    /// # Errors
    /// [`Error::Config`] naming the key and its value for everything tinygpt does not compute:
    /// `model_type` other than `gpt2`, `layer_norm_epsilon` other than 1e-5,
    /// `activation_function` other than `gelu_new`/`gelu_pytorch_tanh`, `n_inner` other than
    /// null or `4 · n_embd`, `scale_attn_by_inverse_layer_idx: true`,
    /// `reorder_and_upcast_attn: true`, `scale_attn_weights: false`,
    /// `add_cross_attention: true`, `tie_word_embeddings: false`; and whatever fails
    /// [`GptConfig::validate`].
    fn try_from(hf: &Gpt2Config) -> Result<Self> {
        let refuse =
            |what: String, why: &str| Err(Error::Config(format!("{what} is not supported: {why}")));
        if let Some(t) = hf.model_type.as_deref() {
            if t != "gpt2" {
                return refuse(
                    format!("`model_type: {t:?}`"),
                    "tinygpt loads GPT-2 (\"gpt2\") only",
                );
            }
        }
        if (hf.layer_norm_epsilon - LAYER_NORM_EPS).abs() > 1e-12 {
            return refuse(
                format!("`layer_norm_epsilon: {:e}`", hf.layer_norm_epsilon),
                "tinygpt's LayerNorm uses GPT-2's 1e-5",
            );
        }
        if !TANH_GELU.contains(&hf.activation_function.as_str()) {
            return refuse(
                format!("`activation_function: {:?}`", hf.activation_function),
                "tinygpt's MLP uses the tanh GELU (\"gelu_new\" or \"gelu_pytorch_tanh\")",
            );
        }
        if let Some(n_inner) = hf.n_inner {
            let width = hf.n_embd.checked_mul(4);
            if Some(n_inner) != width {
                let width = width.map(|w| format!(" = {w}")).unwrap_or_default();
                return refuse(
                    format!("`n_inner: {n_inner}`"),
                    &format!("tinygpt's MLP is 4 · n_embd{width} wide (use null)"),
                );
            }
        }
        for (key, value, supported) in [
            (
                "scale_attn_by_inverse_layer_idx",
                hf.scale_attn_by_inverse_layer_idx,
                false,
            ),
            ("reorder_and_upcast_attn", hf.reorder_and_upcast_attn, false),
            ("scale_attn_weights", hf.scale_attn_weights, true),
            ("add_cross_attention", hf.add_cross_attention, false),
            ("tie_word_embeddings", hf.tie_word_embeddings, true),
        ] {
            if value != supported {
                return refuse(
                    format!("`{key}: {value}`"),
                    &format!("tinygpt computes GPT-2 with `{key}: {supported}`"),
                );
            }
        }
        let cfg = GptConfig {
            vocab_size: hf.vocab_size,
            block_size: hf.n_positions,
            n_layer: hf.n_layer,
            n_head: hf.n_head,
            n_embd: hf.n_embd,
            dropout: hf.resid_pdrop,
            bias: true,
            ..Default::default()
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl TryFrom<Gpt2Config> for GptConfig {
    type Error = Error;

    /// As `GptConfig::try_from(&hf)`.
    ///
    /// # Errors
    /// As for `&Gpt2Config`.
    fn try_from(hf: Gpt2Config) -> Result<Self> {
        GptConfig::try_from(&hf)
    }
}

impl From<&GptConfig> for Gpt2Config {
    /// The HF config of a tinygpt model, as `GPT2LMHeadModel.save_pretrained` would write it
    /// (f32 weights, `<|endoftext|>` ids left unset: [`Gpt::save_hf_dir_with_tokenizer`] sets
    /// them from the tokenizer).
    fn from(cfg: &GptConfig) -> Self {
        Self {
            model_type: Some("gpt2".into()),
            architectures: Some(vec!["GPT2LMHeadModel".into()]),
            vocab_size: cfg.vocab_size,
            n_positions: cfg.block_size,
            n_ctx: Some(cfg.block_size),
            n_embd: cfg.n_embd,
            n_layer: cfg.n_layer,
            n_head: cfg.n_head,
            n_inner: None,
            activation_function: "gelu_new".into(),
            resid_pdrop: cfg.dropout,
            embd_pdrop: cfg.dropout,
            attn_pdrop: cfg.dropout,
            layer_norm_epsilon: LAYER_NORM_EPS,
            initializer_range: 0.02,
            scale_attn_weights: true,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            add_cross_attention: false,
            tie_word_embeddings: true,
            use_cache: true,
            bos_token_id: None,
            eos_token_id: None,
            pad_token_id: None,
            torch_dtype: Some("float32".into()),
            dtype: None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

impl Gpt {
    /// Loads a Hugging Face GPT-2 directory (`config.json` + `model.safetensors`, or a
    /// sharded `model.safetensors.index.json`) for inference, weights as f32 constants on
    /// `device`. See the [module docs](crate::hf) for what is accepted.
    ///
    /// To fine-tune the loaded weights, rebuild them as trainable:
    /// `Gpt::from_tensors(model.config(), model.tensors(), true)`.
    ///
    /// # Errors
    /// [`Error::Checkpoint`] if `dir` or its weights file is missing (naming the file), or a
    /// tensor is unexpected (named); [`Error::Config`] naming the `config.json` key tinygpt
    /// does not support (see [`GptConfig::try_from`]), or for a model larger than the memory
    /// there is (checked before the weights are read: [`crate::memory`]);
    /// [`Error::MissingTensor`] /
    /// [`Error::ShapeMismatch`] naming the tensor, the file and both shapes; [`Error::BadFile`]
    /// for a malformed `config.json` or a truncated/corrupt safetensors file.
    pub fn from_hf_dir(dir: impl AsRef<Path>, device: &Device) -> Result<Gpt> {
        Self::from_hf_dir_with_dtype(dir, device, DType::F32)
    }

    /// As [`Gpt::from_hf_dir`], with the weights converted to `dtype` (e.g. `DType::F16` for
    /// half-precision inference on CUDA; LayerNorm statistics stay in f32). On CPU keep f32:
    /// candle has no fast CPU matmul for f16/bf16.
    ///
    /// # Errors
    /// As [`Gpt::from_hf_dir`]; [`Error::InvalidArgument`] for a non-float `dtype`.
    pub fn from_hf_dir_with_dtype(
        dir: impl AsRef<Path>,
        device: &Device,
        dtype: DType,
    ) -> Result<Gpt> {
        if !dtype.is_float() {
            return Err(Error::InvalidArgument(format!(
                "weights must be loaded as a float dtype, got {dtype:?}"
            )));
        }
        let dir = dir.as_ref();
        let cfg = load_config(dir)?;
        // Before the weights are read: the file is read whole into memory.
        let config = dir.join(files::CONFIG);
        crate::memory::check_fits_from(&cfg, false, 1, dtype, device, Some(&config))?;
        let (tensors, path) = load_weights(dir, device)?;
        let tensors = match cfg.arch {
            Arch::Gpt2 => hf_tensors_to_tinygpt(&cfg, tensors, &path)?,
            Arch::Llama => llama::hf_tensors(&cfg, tensors, &path)?,
        };
        let tensors = tensors
            .into_iter()
            .map(|(name, t)| Ok((name, t.to_dtype(dtype)?)))
            .collect::<Result<HashMap<_, _>>>()?;
        Gpt::from_tensors(&cfg, tensors, false)
    }

    /// As [`Gpt::from_hf_dir`], with the directory's tokenizer (see [`load_tokenizer`]). A
    /// directory tinygpt exported from a chat model (its tokenizer has the chat tokens) loads
    /// as a chat model: [`crate::ChatTemplate::new`] accepts its tokenizer.
    ///
    /// # Errors
    /// As [`Gpt::from_hf_dir`] and [`load_tokenizer`] (the tokenizer is read first, so a
    /// directory without one fails before its weights are read); [`Error::Checkpoint`] if the
    /// tokenizer has more tokens than the model's `vocab_size`.
    pub fn from_hf_dir_with_tokenizer(
        dir: impl AsRef<Path>,
        device: &Device,
    ) -> Result<(Gpt, Tokenizer)> {
        let dir = dir.as_ref();
        if !dir.is_dir() {
            return Err(Error::checkpoint(
                dir,
                "not a directory (or does not exist)",
            ));
        }
        let tokenizer = load_tokenizer(dir)?;
        let model = Self::from_hf_dir(dir, device)?;
        if tokenizer.vocab_size() > model.config().vocab_size {
            return Err(Error::checkpoint(
                dir,
                format!(
                    "the tokenizer has {} tokens but the model's vocab_size is {}",
                    tokenizer.vocab_size(),
                    model.config().vocab_size
                ),
            ));
        }
        Ok((model, tokenizer))
    }
}

/// Reads and converts `DIR/config.json`.
///
/// # Errors
/// As [`Gpt2Config::load`]; [`Error::Config`] (prefixed with the file) as
/// [`GptConfig::try_from`]; [`Error::Checkpoint`] if `dir` is not a directory or lacks the
/// file.
pub fn load_config(dir: impl AsRef<Path>) -> Result<GptConfig> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(Error::checkpoint(
            dir,
            "not a directory (or does not exist)",
        ));
    }
    let path = dir.join(files::CONFIG);
    if !path.is_file() {
        return Err(Error::checkpoint(
            dir,
            format!("missing {} (a Hugging Face model directory holds config.json and model.safetensors)", files::CONFIG),
        ));
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    if let Ok(serde_json::Value::Object(config)) = serde_json::from_str(&text) {
        if llama::is_llama_config(&config) {
            return llama::config_from_hf(&config, &path);
        }
    }
    let hf = Gpt2Config::load(&path)?;
    GptConfig::try_from(&hf).map_err(|e| match e {
        Error::Config(msg) => Error::Config(format!("{}: {msg}", path.display())),
        e => e,
    })
}

/// Loads the tokenizer of a Hugging Face directory: `tokenizer.json` if present, otherwise
/// GPT-2's `vocab.json` + `merges.txt` (see [`Tokenizer::from_gpt2_files`]). The end-of-text
/// token is `<|endoftext|>` when the vocabulary has it, else the `eos_token` of
/// `tokenizer_config.json` (Llama 2's `</s>`: see [`Tokenizer::from_inner_with_eos`]), so the
/// vocabulary keeps the model's size.
///
/// # Errors
/// [`Error::Checkpoint`] if the directory has neither; the tokenizer's own errors (naming
/// the file) if one is malformed; [`Error::BadFile`] for a malformed `tokenizer_config.json`.
pub fn load_tokenizer(dir: impl AsRef<Path>) -> Result<Tokenizer> {
    let dir = dir.as_ref();
    let json = dir.join(files::TOKENIZER);
    if json.is_file() {
        let config = chat_template::TokenizerConfig::load(dir)?;
        return Tokenizer::from_file_adjusted(&json, config.eos_token.as_deref(), |inner| {
            as_transformers_llama(inner, &config)
        });
    }
    let (vocab, merges) = (dir.join(files::VOCAB), dir.join(files::MERGES));
    if vocab.is_file() && merges.is_file() {
        return Tokenizer::from_gpt2_files(vocab, merges);
    }
    Err(Error::checkpoint(
        dir,
        format!(
            "no tokenizer: expected {} or {} + {}",
            files::TOKENIZER,
            files::VOCAB,
            files::MERGES
        ),
    ))
}

/// transformers 5's `LlamaTokenizer` (`tokenizer_class` `LlamaTokenizer` or
/// `LlamaTokenizerFast`) does not run a SentencePiece-style BPE's `tokenizer.json` normalizer
/// (`Prepend("▁")` + `Replace(" ", "▁")`): it uses a `Metaspace` pre-tokenizer instead, which
/// puts `▁` before the first piece only (`legacy: false`, its default; every piece with
/// `legacy: true`; none with `add_prefix_space: false`). So `"</s>\n"` in a chat template is
/// `[</s>, \n]` there, where the file's normalizer gives `[</s>, ▁, \n]`. tinygpt follows
/// transformers, whose ids the models' chat templates were checked with.
fn as_transformers_llama(
    inner: &mut tokenizers::Tokenizer,
    config: &chat_template::TokenizerConfig,
) {
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    let llama = matches!(
        config.tokenizer_class.as_deref(),
        Some("LlamaTokenizer" | "LlamaTokenizerFast")
    );
    let byte_fallback_bpe =
        matches!(inner.get_model(), tokenizers::ModelWrapper::BPE(m) if m.byte_fallback);
    if !llama || !byte_fallback_bpe || inner.get_pre_tokenizer().is_some() {
        return;
    }
    let scheme = match (
        config.add_prefix_space.unwrap_or(true),
        config.legacy.unwrap_or(false),
    ) {
        (false, _) => PrependScheme::Never,
        (true, false) => PrependScheme::First,
        (true, true) => PrependScheme::Always,
    };
    let _ = inner.with_normalizer(None::<tokenizers::NormalizerWrapper>);
    inner.with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)));
}

/// Reads every tensor of `DIR/model.safetensors`, or of the shards listed by
/// `DIR/model.safetensors.index.json`. Returns them with the path to name in errors.
fn load_weights(dir: &Path, device: &Device) -> Result<(HashMap<String, Tensor>, PathBuf)> {
    let single = dir.join(files::MODEL);
    if single.is_file() {
        return Ok((load_safetensors(&single, device)?, single));
    }
    let index = dir.join(files::MODEL_INDEX);
    if index.is_file() {
        #[derive(Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let parsed: Index =
            serde_json::from_str(&text).map_err(|e| Error::json(&index, None, &e))?;
        let shards: BTreeSet<&String> = parsed.weight_map.values().collect();
        let mut tensors = HashMap::new();
        for shard in shards {
            let path = dir.join(shard);
            tensors.extend(load_safetensors(&path, device)?);
        }
        return Ok((tensors, index));
    }
    let hint = if dir.join(files::PYTORCH_BIN).is_file() {
        format!(
            "; it has {} only, which tinygpt does not read (re-save it with \
             `save_pretrained(dir, safe_serialization=True)`)",
            files::PYTORCH_BIN
        )
    } else {
        String::new()
    };
    Err(Error::checkpoint(
        dir,
        format!("missing {} (or {}){hint}", files::MODEL, files::MODEL_INDEX),
    ))
}

/// Whether `name` (without the `transformer.` prefix) is one of the attention-mask buffers old
/// exports carry: `h.{i}.attn.bias` (the causal mask) or `h.{i}.attn.masked_bias`.
fn is_attention_buffer(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    matches!(
        parts.as_slice(),
        ["h", i, "attn", "bias" | "masked_bias"] if i.parse::<usize>().is_ok()
    )
}

/// Renames the tensors of an HF GPT-2 safetensors file to tinygpt's names and checks them
/// against `cfg`: the `transformer.` prefix is added where missing, attention buffers are
/// dropped, and `lm_head.weight` (if any) must equal `wte` — or, in a file that stores the
/// tied matrix only under that name, is `wte`.
///
/// `cfg` must have `bias: true` (HF GPT-2 always has biases). `path` names the file in
/// errors.
///
/// # Errors
/// [`Error::MissingTensor`] / [`Error::ShapeMismatch`] naming the tensor, `path` and both
/// shapes; [`Error::Checkpoint`] for a config whose `n_layer` or `n_embd` exceeds what the
/// tensors hold, a tensor stored both with and without the prefix, an
/// unexpected tensor, or an `lm_head.weight` that differs from `wte` (an untied head).
pub fn hf_tensors_to_tinygpt(
    cfg: &GptConfig,
    tensors: HashMap<String, Tensor>,
    path: &Path,
) -> Result<HashMap<String, Tensor>> {
    crate::checkpoint::check_model_size(cfg, &tensors, path)?;
    let mut out = HashMap::with_capacity(tensors.len());
    let mut lm_head = None;
    // Sorted, so the first problem reported does not depend on hash order.
    for (name, t) in tensors.into_iter().collect::<BTreeMap<_, _>>() {
        if name == "lm_head.weight" {
            lm_head = Some(t);
            continue;
        }
        let short = name.strip_prefix("transformer.").unwrap_or(&name);
        if is_attention_buffer(short) {
            continue;
        }
        let full = format!("transformer.{short}");
        if out.insert(full.clone(), t).is_some() {
            return Err(Error::checkpoint(
                path,
                format!(
                    "tensor `{full}` is stored twice, with and without the `transformer.` prefix"
                ),
            ));
        }
    }
    // The tied matrix stored once, as `lm_head.weight` only (safetensors' de-duplication of
    // shared tensors can keep that name): it is the token embedding, as transformers ties it.
    if !out.contains_key("transformer.wte.weight") {
        if let Some(head) = lm_head.take() {
            out.insert("transformer.wte.weight".to_string(), head);
        }
    }
    check_tensors(cfg, &out, Some(path))?;
    let expected: BTreeSet<String> = cfg.parameter_shapes().into_iter().map(|(n, _)| n).collect();
    let mut unexpected: Vec<&String> = out.keys().filter(|n| !expected.contains(*n)).collect();
    unexpected.sort();
    if let Some(name) = unexpected.first() {
        return Err(Error::checkpoint(
            path,
            format!(
                "unexpected tensor `{name}` ({} in all): not part of a GPT-2 language model \
                 tinygpt can build",
                unexpected.len()
            ),
        ));
    }
    if let Some(head) = lm_head {
        let wte = out
            .get("transformer.wte.weight")
            .ok_or_else(|| Error::MissingTensor {
                name: "transformer.wte.weight".into(),
                path: Some(path.to_path_buf()),
            })?;
        if head.dims() != wte.dims() {
            return Err(Error::ShapeMismatch {
                name: "lm_head.weight".into(),
                expected: wte.dims().to_vec(),
                got: head.dims().to_vec(),
                path: Some(path.to_path_buf()),
            });
        }
        let same = head
            .to_dtype(DType::F32)?
            .eq(&wte.to_dtype(DType::F32)?)?
            .to_dtype(DType::F32)?
            .min_all()?
            .to_scalar::<f32>()?;
        if same != 1.0 {
            return Err(Error::checkpoint(
                path,
                "`lm_head.weight` differs from `transformer.wte.weight`: tinygpt's head is tied \
                 to the token embedding and cannot hold a separate one",
            ));
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Saving
// ---------------------------------------------------------------------------------------------

impl Gpt {
    /// Writes the model in Hugging Face GPT-2 layout into `dir` (created if missing; these
    /// files are overwritten, others left alone): `config.json` ([`Gpt2Config`]) and
    /// `model.safetensors` (`transformer.*` names, `Conv1D` layout, the model's dtype, no
    /// `lm_head.weight` since it is tied; zero biases if the model has none), so
    /// `transformers.GPT2LMHeadModel.from_pretrained(dir)` loads it.
    ///
    /// # Errors
    /// [`Error::Io`] naming the file that could not be written.
    pub fn save_hf_dir(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_hf(dir.as_ref(), None)
    }

    /// As [`Gpt::save_hf_dir`], plus `tokenizer.json`, `tokenizer_config.json` and
    /// `generation_config.json`, so that `transformers.AutoTokenizer.from_pretrained(dir)` loads
    /// the tokenizer and `generate` stops where tinygpt does. `<|endoftext|>` (and the chat
    /// tokens, if any) are special tokens in both tokenizer files (`added_tokens` with
    /// `"special": true`, `added_tokens_decoder`); `bos_token_id` and `eos_token_id` are
    /// `<|endoftext|>`.
    ///
    /// For a chat tokenizer (one holding `<|system|>`, `<|user|>`, `<|assistant|>`, `<|end|>`),
    /// `tokenizer_config.json` also carries `chat_template` ([`crate::ChatTemplate::JINJA`]),
    /// so `apply_chat_template(messages, add_generation_prompt=True)` gives the ids of
    /// [`crate::ChatTemplate::render_prompt`]; the chat tokens are its
    /// `additional_special_tokens` and `<|end|>` its `eos_token`, and `eos_token_id` (in
    /// `config.json` and `generation_config.json`) is `[<|end|>, <|endoftext|>]`, so a reply
    /// ends at `<|end|>` as in [`crate::ChatSession`].
    ///
    /// # Errors
    /// As [`Gpt::save_hf_dir`]; [`Error::InvalidArgument`] if the tokenizer has more tokens
    /// than the model's `vocab_size`.
    pub fn save_hf_dir_with_tokenizer(
        &self,
        dir: impl AsRef<Path>,
        tokenizer: &Tokenizer,
    ) -> Result<()> {
        if tokenizer.vocab_size() > self.config().vocab_size {
            return Err(Error::InvalidArgument(format!(
                "the tokenizer has {} tokens but the model's vocab_size is {}",
                tokenizer.vocab_size(),
                self.config().vocab_size
            )));
        }
        self.save_hf(dir.as_ref(), Some(tokenizer))
    }

    fn save_hf(&self, dir: &Path, tokenizer: Option<&Tokenizer>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let cfg = self.config();
        let chat = tokenizer.and_then(|tok| crate::ChatTemplate::new(tok).ok());
        let eos = tokenizer.map(|tok| match chat {
            Some(t) => TokenIds::Many(vec![t.end_id(), tok.eot_id()]),
            None => TokenIds::One(tok.eot_id()),
        });
        if cfg.arch == Arch::Llama {
            let ids = eos.as_ref().map(|e| match e {
                TokenIds::One(id) => vec![*id],
                TokenIds::Many(ids) => ids.clone(),
            });
            let bos = tokenizer.map(|t| t.eot_id());
            self.save_llama_hf(dir, bos, ids.as_deref())?;
        } else {
            let mut hf = Gpt2Config::from(cfg);
            hf.torch_dtype = Some(torch_dtype_name(self.dtype()).into());
            self.save_gpt2_weights(dir, hf, tokenizer, eos.clone())?;
        }
        if let (Some(tok), Some(eos)) = (tokenizer, eos) {
            let path = dir.join(files::TOKENIZER);
            write_json(&path, &tokenizer_json(tok, &path)?)?;
            write_json(
                &dir.join(files::TOKENIZER_CONFIG),
                &tokenizer_config_json(tok, chat.is_some(), cfg.block_size),
            )?;
            let generation_config = serde_json::json!({
                "bos_token_id": tok.eot_id(),
                "eos_token_id": eos,
                "pad_token_id": tok.eot_id(),
            });
            write_json(&dir.join(files::GENERATION_CONFIG), &generation_config)?;
        }
        Ok(())
    }

    /// GPT-2's `config.json` and `model.safetensors` (zero biases for a model without).
    fn save_gpt2_weights(
        &self,
        dir: &Path,
        mut hf: Gpt2Config,
        tokenizer: Option<&Tokenizer>,
        eos: Option<TokenIds>,
    ) -> Result<()> {
        let cfg = self.config();
        if let Some(tok) = tokenizer {
            hf.bos_token_id = Some(tok.eot_id());
            hf.eos_token_id = eos;
        }
        hf.save(dir.join(files::CONFIG))?;

        let mut tensors: HashMap<String, Tensor> = self.tensors();
        if !cfg.bias {
            let with_bias = GptConfig {
                bias: true,
                ..cfg.clone()
            };
            for (name, shape) in with_bias.parameter_shapes() {
                if let std::collections::hash_map::Entry::Vacant(slot) = tensors.entry(name) {
                    slot.insert(Tensor::zeros(shape, self.dtype(), self.device())?);
                }
            }
        }
        let path = dir.join(files::MODEL);
        let tensors = tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.contiguous()?)))
            .collect::<Result<HashMap<_, _>>>()?;
        // transformers checks the "format" metadata before loading.
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(tensors, Some(metadata))
            .map_err(|e| Error::io(&path, std::io::Error::other(e.to_string())))?;
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;

        Ok(())
    }
}

/// The tokens transformers must treat as special: `<|endoftext|>` and the chat tokens.
fn hf_special_tokens() -> impl Iterator<Item = &'static str> {
    std::iter::once(crate::tokenizer::EOT).chain(crate::ChatTemplate::SPECIAL_TOKENS)
}

/// `tokenizer.json` of `tok` as transformers should read it: the tokenizer's own JSON with
/// `<|endoftext|>` and the chat tokens marked `"special": true` in `added_tokens` (tinygpt
/// adds them so; a tokenizer loaded from elsewhere may not have). `path` names the file in
/// errors.
fn tokenizer_json(tok: &Tokenizer, path: &Path) -> Result<serde_json::Value> {
    let mut json: serde_json::Value = serde_json::from_str(&tok.to_json(false)?)
        .map_err(|e| Error::bad_file(path, None, e.to_string()))?;
    if let Some(added) = json
        .get_mut("added_tokens")
        .and_then(serde_json::Value::as_array_mut)
    {
        for token in added {
            let special = token
                .get("content")
                .and_then(serde_json::Value::as_str)
                .is_some_and(|c| hf_special_tokens().any(|s| s == c));
            if special {
                token["special"] = true.into();
            }
        }
    }
    Ok(json)
}

/// `tokenizer_config.json` for `tok`: the fast tokenizer class, `<|endoftext|>` as bos/unk
/// (and eos, or `<|end|>` for a `chat` tokenizer, with the chat tokens as
/// `additional_special_tokens` and [`crate::ChatTemplate::JINJA`] as `chat_template`), and
/// every added token in `added_tokens_decoder`.
fn tokenizer_config_json(tok: &Tokenizer, chat: bool, max_length: usize) -> serde_json::Value {
    let eot = crate::tokenizer::EOT;
    let decoder = tok
        .inner()
        .get_added_vocabulary()
        .get_added_tokens_decoder();
    let added: BTreeMap<u32, serde_json::Value> = decoder
        .iter()
        .map(|(id, t)| {
            let special = t.special || hf_special_tokens().any(|s| s == t.content);
            let entry = serde_json::json!({
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": special,
            });
            (*id, entry)
        })
        .collect();
    let added: serde_json::Map<String, serde_json::Value> = added
        .into_iter()
        .map(|(id, entry)| (id.to_string(), entry))
        .collect();
    let mut config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eot,
        "eos_token": eot,
        "unk_token": eot,
        "model_max_length": max_length,
        "add_prefix_space": false,
        "clean_up_tokenization_spaces": false,
        "added_tokens_decoder": added,
    });
    if chat {
        config["eos_token"] = crate::chat::END.into();
        config["additional_special_tokens"] = crate::ChatTemplate::SPECIAL_TOKENS.into();
        config["chat_template"] = crate::ChatTemplate::JINJA.into();
    }
    config
}

/// Writes `value` as pretty JSON and a newline.
fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let json = serde_json::to_string_pretty(value)
        .map_err(|e| Error::bad_file(path, None, e.to_string()))?;
    std::fs::write(path, json + "\n").map_err(|e| Error::io(path, e))
}

/// PyTorch's name for a dtype, as `config.json`'s `torch_dtype` spells it.
fn torch_dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one_key(key: &str, value: serde_json::Value) -> serde_json::Value {
        serde_json::Value::Object([(key.to_string(), value)].into_iter().collect())
    }

    #[test]
    fn attention_buffers_are_recognised_exactly() {
        assert!(is_attention_buffer("h.0.attn.bias"));
        assert!(is_attention_buffer("h.11.attn.masked_bias"));
        assert!(!is_attention_buffer("h.0.attn.c_attn.bias"));
        assert!(!is_attention_buffer("h.0.attn.c_proj.bias"));
        assert!(!is_attention_buffer("h.x.attn.bias"));
        assert!(!is_attention_buffer("ln_f.bias"));
    }

    #[test]
    fn default_config_is_gpt2_small() {
        let cfg = GptConfig::try_from(&Gpt2Config::default()).unwrap();
        assert_eq!(
            cfg,
            GptConfig {
                dropout: 0.1,
                ..GptConfig::gpt2()
            }
        );
        // An empty config.json means every HF default.
        let hf: Gpt2Config = serde_json::from_str("{}").unwrap();
        assert_eq!(hf, Gpt2Config::default());
    }

    #[test]
    fn config_round_trips_through_hf() {
        let cfg = GptConfig {
            vocab_size: 66,
            block_size: 64,
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            dropout: 0.0,
            bias: true,
            ..Default::default()
        };
        let hf = Gpt2Config::from(&cfg);
        let json = serde_json::to_string(&hf).unwrap();
        let back: Gpt2Config = serde_json::from_str(&json).unwrap();
        assert_eq!(GptConfig::try_from(back).unwrap(), cfg);
        assert!(json.contains("\"n_inner\":null"), "{json}");
    }

    #[test]
    fn unsupported_settings_are_refused_by_name() {
        let cases: [(&str, serde_json::Value, &str); 10] = [
            ("model_type", "gpt_neo".into(), "`model_type: \"gpt_neo\"`"),
            (
                "layer_norm_epsilon",
                1e-6.into(),
                "`layer_norm_epsilon: 1e-6`",
            ),
            (
                "activation_function",
                "relu".into(),
                "`activation_function: \"relu\"`",
            ),
            ("n_inner", 1000.into(), "`n_inner: 1000`"),
            (
                "scale_attn_by_inverse_layer_idx",
                true.into(),
                "`scale_attn_by_inverse_layer_idx: true`",
            ),
            (
                "reorder_and_upcast_attn",
                true.into(),
                "`reorder_and_upcast_attn: true`",
            ),
            (
                "scale_attn_weights",
                false.into(),
                "`scale_attn_weights: false`",
            ),
            (
                "add_cross_attention",
                true.into(),
                "`add_cross_attention: true`",
            ),
            (
                "tie_word_embeddings",
                false.into(),
                "`tie_word_embeddings: false`",
            ),
            (
                "n_head",
                7.into(),
                "n_embd (768) must be divisible by n_head (7)",
            ),
        ];
        for (key, value, want) in cases {
            let hf: Gpt2Config = serde_json::from_value(one_key(key, value)).unwrap();
            let e = GptConfig::try_from(&hf).unwrap_err();
            assert!(matches!(e, Error::Config(_)), "{key}: {e:?}");
            assert!(e.to_string().contains(want), "{key}: {e}");
        }
        // What is accepted.
        for (key, value) in [
            (
                "activation_function",
                serde_json::json!("gelu_pytorch_tanh"),
            ),
            ("n_inner", serde_json::json!(3072)),
            ("n_inner", serde_json::Value::Null),
            ("layer_norm_epsilon", serde_json::json!(1e-5)),
        ] {
            let hf: Gpt2Config = serde_json::from_value(one_key(key, value)).unwrap();
            GptConfig::try_from(&hf).unwrap();
        }
    }
}
