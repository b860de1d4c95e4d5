//! LoRA: low-rank adapters on every linear layer (Hu et al. 2021, "LoRA: Low-Rank Adaptation of
//! Large Language Models"), in the layout of Hugging Face PEFT.
//!
//! # The math
//!
//! A projection `y = x W + b` (`x` (B, T, in), `y` (B, T, out)) keeps its weight frozen and
//! learns a low-rank change of it, `ΔW = scale · B A` with `A` (r, in), `B` (out, r) and
//! `r ≪ min(in, out)`:
//!
//! ```text
//! y = x W (+ b) + scale · (dropout(x) Aᵀ) Bᵀ          scale = alpha / r
//! ```
//!
//! `A` starts as PEFT's `kaiming_uniform_(a = sqrt(5))`, i.e. uniform on
//! `[−1/sqrt(in), 1/sqrt(in)]` (drawn from ChaCha8 seeded by the caller), and `B` as zeros, so a
//! fresh adapter changes nothing: the adapted model starts as the base model, exactly. Dropout
//! (probability [`LoraConfig::dropout`]) applies to the adapter's input only, in training only.
//! Only `A` and `B` are trained: [`Gpt::vars`] of an adapted model returns them alone, so
//! [`crate::Trainer`] and [`crate::AdamW`] compute gradients and keep moments for `2 · r ·
//! (in + out)` numbers per projection instead of `in · out`. The base weights are constants:
//! no gradient, no optimiser state.
//!
//! [`Gpt::merge_lora`] folds the adapter into the weights, `W' = W + scale · B A` (for GPT-2's
//! `Conv1D` weights, stored `(in, out)`, the transpose `scale · (B A)ᵀ`), giving a plain model
//! that runs at the base model's speed and saves as an ordinary Hugging Face model.
//!
//! Llama's q/k/v (and gate/up) projections are computed as one product of their stacked
//! weights; each keeps its own adapter, whose delta is added to its slice of the product.
//!
//! # Targets
//!
//! [`LoraConfig::target_modules`] names modules by the last component of their path, as PEFT
//! matches them: Llama (and Qwen2/Qwen3) `q_proj k_proj v_proj o_proj gate_proj up_proj
//! down_proj`; GPT-2 `c_attn c_proj c_fc` (`c_proj` is both the attention's output projection
//! and the MLP's second layer, as in PEFT). `all-linear` (PEFT's spelling, the default) means
//! every one of them; the embeddings and the head are never adapted. Any other name is an
//! error naming it.
//!
//! # Files (PEFT's layout)
//!
//! [`Gpt::save_lora_adapter`] writes a directory that `peft.PeftModel.from_pretrained(base,
//! dir)` loads over the same base model, and [`Gpt::load_lora_adapter`] reads one PEFT wrote:
//!
//! - `adapter_model.safetensors` (metadata `{"format": "pt"}`): for each adapted module
//!   `base_model.model.<module>.lora_A.weight` (r, in) and `….lora_B.weight` (out, r), e.g.
//!   `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` or
//!   `base_model.model.transformer.h.0.attn.c_attn.lora_B.weight`;
//! - `adapter_config.json`: `peft_type` `"LORA"`, `task_type` `"CAUSAL_LM"`, `r`,
//!   `lora_alpha`, `lora_dropout`, `target_modules`, `fan_in_fan_out` (true for GPT-2's
//!   `Conv1D`, false for Llama's `nn.Linear`; `A` and `B` have the shapes above either way),
//!   `bias` `"none"`, and PEFT's other keys at their defaults.
//!
//! Refused by name when reading a config (they change the forward pass in ways tinygpt does
//! not implement): a `peft_type` other than `LORA`, a `task_type` other than `CAUSAL_LM`,
//! `use_rslora` (rsLoRA's `alpha / sqrt(r)`), `use_dora`, non-empty `rank_pattern` /
//! `alpha_pattern`, `modules_to_save`, `layers_to_transform`, `layer_replication`,
//! `exclude_modules`, `trainable_token_indices`, `target_parameters`, `lora_bias` or a `bias`
//! other than `"none"`, `use_qalora`, `use_bdlora`, `alora_invocation_tokens`,
//! `megatron_config`, a regular expression as `target_modules`, and `fan_in_fan_out: true`
//! for Llama. A tensor file whose names or shapes disagree with the config and the base
//! model is refused naming the tensor and the file.
//!
//! ```
//! use tinygpt::candle::Device;
//! use tinygpt::{Gpt, GptConfig, LoraConfig};
//!
//! let base = Gpt::init(&GptConfig { n_layer: 2, ..GptConfig::llama_tiny(66) }, 1, &Device::Cpu)?;
//! let lora = base.with_lora(&LoraConfig { r: 4, ..Default::default() }, 7)?;
//! // 2 layers × 7 projections × (A, B).
//! assert_eq!(lora.vars()?.len(), 28);
//! let merged = lora.merge_lora()?; // a plain model again
//! assert!(merged.lora_config().is_none());
//! # Ok::<(), tinygpt::Error>(())
//! ```
//!
//! An adapted model's [`Gpt::tensors`] and [`Gpt::named_parameters`] are the base weights;
//! [`Gpt::lora_tensors`] are the adapter's. [`Gpt::to_dtype`] and [`Gpt::resize_vocab`]
//! refuse an adapted model (merge it first).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::model::{Arch, Gpt};
use crate::{Error, Result};

/// The prefix PEFT's `PeftModelForCausalLM` puts before a module's name in adapter files.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// The adapter's config file in an adapter directory.
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// The adapter's tensors in an adapter directory.
pub const ADAPTER_MODEL: &str = "adapter_model.safetensors";

/// PEFT's name for "every linear layer but the head", accepted in
/// [`LoraConfig::target_modules`].
pub const ALL_LINEAR: &str = "all-linear";

/// Llama's (and Qwen2/Qwen3's) projections, in the order of a layer's state dict.
pub const LLAMA_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// GPT-2's projections: `c_attn`, `c_proj` (the attention's output and the MLP's second
/// layer), `c_fc`.
pub const GPT2_MODULES: [&str; 3] = ["c_attn", "c_proj", "c_fc"];

/// The names of the projections of `arch` a LoRA adapter can target.
pub fn linear_modules(arch: Arch) -> &'static [&'static str] {
    match arch {
        Arch::Gpt2 => &GPT2_MODULES,
        Arch::Llama => &LLAMA_MODULES,
    }
}

/// A LoRA adapter's shape: rank, scale, dropout and which projections it adapts. Serialised by
/// serde under these field names; [`LoraConfig::load_peft`] / [`LoraConfig::to_peft_json`]
/// read and write PEFT's `adapter_config.json` instead.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r` of the update `B A` (PEFT's `r`). At least 1.
    pub r: usize,
    /// `alpha`: the update is scaled by `alpha / r` (PEFT's `lora_alpha`). Finite, > 0.
    pub alpha: f64,
    /// Dropout on the adapter's input in training (PEFT's `lora_dropout`), in `[0, 1)`.
    pub dropout: f32,
    /// The adapted projections, by the last component of their module path (see the module
    /// docs), or [`ALL_LINEAR`].
    pub target_modules: Vec<String>,
}

impl Default for LoraConfig {
    /// r 8, alpha 16 (scale 2), dropout 0.05, every linear layer ([`ALL_LINEAR`]).
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 16.0,
            dropout: 0.05,
            target_modules: vec![ALL_LINEAR.to_string()],
        }
    }
}

impl LoraConfig {
    /// The update's scale, `alpha / r`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.r as f64
    }

    /// Checks the values are in range and every target is a known projection name (of either
    /// architecture; [`LoraConfig::resolve`] checks them against one).
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad field, or the unknown targets.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Config("LoRA r must be at least 1".into()));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(Error::Config(format!(
                "LoRA alpha must be finite and > 0, got {}",
                self.alpha
            )));
        }
        if !(self.dropout >= 0.0 && self.dropout < 1.0) {
            return Err(Error::Config(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.target_modules.is_empty() {
            return Err(Error::Config(format!(
                "LoRA target_modules is empty: name the projections to adapt, or `{ALL_LINEAR}`"
            )));
        }
        let known =
            |m: &str| m == ALL_LINEAR || LLAMA_MODULES.contains(&m) || GPT2_MODULES.contains(&m);
        let unknown: Vec<&str> = self
            .target_modules
            .iter()
            .map(String::as_str)
            .filter(|m| !known(m))
            .collect();
        if !unknown.is_empty() {
            return Err(Error::Config(format!(
                "unknown LoRA target_modules {}: tinygpt adapts {ALL_LINEAR}, Llama's {} or \
                 GPT-2's {} (the last component of the module path)",
                quoted(&unknown),
                LLAMA_MODULES.join(" "),
                GPT2_MODULES.join(" ")
            )));
        }
        Ok(())
    }

    /// The config for a model of `arch`: validated, [`ALL_LINEAR`] expanded to that
    /// architecture's projections, targets deduplicated in state-dict order.
    ///
    /// # Errors
    /// As [`LoraConfig::validate`]; [`Error::Config`] naming targets that are not projections of
    /// `arch` (e.g. `q_proj` for GPT-2).
    pub fn resolve(&self, arch: Arch) -> Result<LoraConfig> {
        self.validate()?;
        let modules = linear_modules(arch);
        let foreign: Vec<&str> = self
            .target_modules
            .iter()
            .map(String::as_str)
            .filter(|m| *m != ALL_LINEAR && !modules.contains(m))
            .collect();
        if !foreign.is_empty() {
            return Err(Error::Config(format!(
                "LoRA target_modules {} are not projections of a {arch} model, whose are {}",
                quoted(&foreign),
                modules.join(" ")
            )));
        }
        let all = self.target_modules.iter().any(|m| m == ALL_LINEAR);
        Ok(LoraConfig {
            target_modules: modules
                .iter()
                .filter(|m| all || self.target_modules.iter().any(|t| t == *m))
                .map(|m| m.to_string())
                .collect(),
            ..self.clone()
        })
    }

    /// Whether the module at `path` (e.g. `model.layers.0.self_attn.q_proj`) is adapted: its
    /// last component is a target, or the targets include [`ALL_LINEAR`].
    pub fn targets(&self, path: &str) -> bool {
        let last = path.rsplit('.').next().unwrap_or(path);
        self.target_modules
            .iter()
            .any(|t| t == ALL_LINEAR || t == last)
    }

    /// PEFT's `adapter_config.json` for an adapter of a model of `arch` (targets sorted, as
    /// PEFT writes them).
    pub fn to_peft_json(&self, arch: Arch) -> Value {
        let mut targets = self.target_modules.clone();
        targets.sort();
        // f32 → the shortest decimal that reads back as it (0.05, not 0.0500000007).
        let dropout: f64 = self
            .dropout
            .to_string()
            .parse()
            .unwrap_or(self.dropout as f64);
        let alpha = if self.alpha.fract() == 0.0 && self.alpha.abs() < 1e15 {
            json!(self.alpha as i64)
        } else {
            json!(self.alpha)
        };
        json!({
            "alpha_pattern": {},
            "base_model_name_or_path": null,
            "bias": "none",
            "fan_in_fan_out": arch == Arch::Gpt2,
            "inference_mode": true,
            "init_lora_weights": true,
            "lora_alpha": alpha,
            "lora_bias": false,
            "lora_dropout": dropout,
            "modules_to_save": null,
            "peft_type": "LORA",
            "r": self.r,
            "rank_pattern": {},
            "target_modules": targets,
            "task_type": "CAUSAL_LM",
            "use_dora": false,
            "use_rslora": false,
        })
    }

    /// Reads PEFT's `adapter_config.json`, refusing the settings tinygpt does not implement
    /// (see the module docs).
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read; [`Error::BadFile`] naming the file and the
    /// key for malformed JSON, a refused setting or an invalid value.
    pub fn load_peft(path: impl AsRef<Path>) -> Result<Self> {
        Ok(read_peft(path.as_ref())?.0)
    }
}

/// `a`, `b` as "`a`, `b`".
fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// PEFT keys whose non-default values change the forward pass in ways tinygpt does not
/// implement, and what each is.
const REFUSED: [(&str, &str); 15] = [
    ("use_rslora", "rsLoRA (scale alpha / sqrt(r))"),
    ("use_dora", "DoRA (weight-decomposed LoRA)"),
    ("rank_pattern", "per-module ranks"),
    ("alpha_pattern", "per-module alphas"),
    ("modules_to_save", "fully trained extra modules"),
    ("layers_to_transform", "adapting only some layers"),
    ("layer_replication", "replicated layers"),
    ("exclude_modules", "excluded modules"),
    ("trainable_token_indices", "trainable token embeddings"),
    ("target_parameters", "adapted parameters (not modules)"),
    ("lora_bias", "a trained bias on lora_B"),
    ("use_qalora", "QA-LoRA"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("alora_invocation_tokens", "activated LoRA"),
    ("megatron_config", "Megatron parallel layers"),
];

/// Whether a JSON value is set: not null, false, 0, "", [] or {}.
fn is_set(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64() != Some(0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// A PEFT `adapter_config.json`: the config (not yet resolved against an architecture) and
/// its `fan_in_fan_out`.
fn read_peft(path: &Path) -> Result<(LoraConfig, bool)> {
    let text = crate::data::read_utf8(path)?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::json(path, None, &e))?;
    let bad = |msg: String| Error::bad_file(path, None, msg);
    let obj = v
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    match obj.get("peft_type") {
        Some(Value::String(t)) if t == "LORA" => {}
        Some(t) => {
            return Err(bad(format!(
                "peft_type is {t}, tinygpt reads \"LORA\" adapters only"
            )))
        }
        None => return Err(bad("no peft_type: not a PEFT adapter config".into())),
    }
    match obj.get("task_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(t)) if t == "CAUSAL_LM" => {}
        Some(t) => {
            return Err(bad(format!(
                "task_type is {t}, tinygpt reads \"CAUSAL_LM\" adapters only"
            )))
        }
    }
    for (key, what) in REFUSED {
        if let Some(value) = obj.get(key).filter(|v| is_set(v)) {
            return Err(bad(format!("{key} is {value}: {what} is not supported")));
        }
    }
    match obj.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(b)) if b == "none" => {}
        Some(b) => {
            return Err(bad(format!(
                "bias is {b}: trained biases are not supported, only \"none\""
            )))
        }
    }
    let number = |key: &str, default: f64| -> Result<f64> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad(format!("{key} is {v}, expected a number"))),
        }
    };
    // PEFT's defaults for absent keys: r 8, lora_alpha 8, lora_dropout 0.
    let r = match obj.get("r") {
        None => 8,
        Some(v) => v
            .as_u64()
            .and_then(|r| usize::try_from(r).ok())
            .ok_or_else(|| bad(format!("r is {v}, expected a positive integer")))?,
    };
    let alpha = number("lora_alpha", 8.0)?;
    let dropout = number("lora_dropout", 0.0)? as f32;
    let target_modules = match obj.get("target_modules") {
        Some(Value::String(s)) if s == ALL_LINEAR => vec![ALL_LINEAR.to_string()],
        Some(Value::String(s)) => {
            return Err(bad(format!(
                "target_modules is the regular expression {s:?}: list the module names instead"
            )))
        }
        Some(Value::Array(a)) => a
            .iter()
            .map(|m| {
                m.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("target_modules holds {m}, expected module names")))
            })
            .collect::<Result<_>>()?,
        None | Some(Value::Null) => {
            return Err(bad("no target_modules: name the adapted modules".into()))
        }
        Some(v) => {
            return Err(bad(format!(
                "target_modules is {v}, expected a list of names"
            )))
        }
    };
    let fan_in_fan_out = obj.get("fan_in_fan_out").is_some_and(is_set);
    let cfg = LoraConfig {
        r,
        alpha,
        dropout,
        target_modules,
    };
    cfg.validate().map_err(|e| match e {
        Error::Config(msg) => bad(msg),
        e => e,
    })?;
    Ok((cfg, fan_in_fan_out))
}

/// One projection's adapter as its [`crate::model`] `Linear` holds it.
#[derive(Debug, Clone)]
pub(crate) struct LoraAdapter {
    /// (r, in), a `Var`.
    pub(crate) a: Tensor,
    /// (out, r), a `Var`.
    pub(crate) b: Tensor,
    /// `alpha / r`.
    pub(crate) scale: f64,
    /// Dropout on the adapter's input in training.
    pub(crate) dropout: f32,
}

/// One adapted module: its HF module name and its `A`, `B` (the `Var`s its layer holds).
#[derive(Debug, Clone)]
pub(crate) struct LoraModule {
    pub(crate) name: String,
    pub(crate) a: Tensor,
    pub(crate) b: Tensor,
}

/// A LoRA model's adapter: the resolved config and every adapted module, in state-dict order.
#[derive(Debug, Clone)]
pub(crate) struct LoraState {
    pub(crate) cfg: LoraConfig,
    pub(crate) modules: Vec<LoraModule>,
}

impl LoraState {
    /// Every `A` and `B` under PEFT's names, in state-dict order.
    pub(crate) fn named(&self) -> Vec<(String, Tensor)> {
        self.modules
            .iter()
            .flat_map(|m| {
                [
                    (lora_name(&m.name, "A"), m.a.clone()),
                    (lora_name(&m.name, "B"), m.b.clone()),
                ]
            })
            .collect()
    }

    /// [`LoraState::named`] as `Var`s sharing storage with the layers.
    pub(crate) fn vars(&self) -> Result<Vec<(String, Var)>> {
        self.named()
            .into_iter()
            .map(|(n, t)| Ok((n, Var::from_tensor(&t)?)))
            .collect()
    }
}

/// PEFT's name of `module`'s `lora_A` / `lora_B` weight.
fn lora_name(module: &str, which: &str) -> String {
    format!("{PEFT_PREFIX}{module}.lora_{which}.weight")
}

/// The modules `cfg` adapts in `model`, with their `A` and `B` shapes, in state-dict order.
fn targeted(model: &mut Gpt, cfg: &LoraConfig) -> Vec<(String, [usize; 2], [usize; 2])> {
    model
        .linear_slots()
        .into_iter()
        .filter(|s| cfg.targets(&s.name))
        .map(|s| (s.name, [cfg.r, s.d_in], [s.d_out, cfg.r]))
        .collect()
}

impl Gpt {
    /// A copy of the model carrying a fresh LoRA adapter ([`crate::lora`]) on the projections
    /// `cfg` targets: base weights frozen (constants, copied if they were `Var`s), each
    /// adapter's `A` (r, in) uniform on `[−1/sqrt(in), 1/sqrt(in)]` (PEFT's Kaiming-uniform
    /// with `a = sqrt(5)`) from ChaCha8 seeded with `seed`, and `B` (out, r) zeros, both
    /// `Var`s in the model's dtype. Its logits equal the base model's until `B` is trained;
    /// [`Gpt::vars`] returns the adapter's `Var`s only.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid config or targets the architecture lacks;
    /// [`Error::InvalidArgument`] if the model already carries an adapter.
    pub fn with_lora(&self, cfg: &LoraConfig, seed: u64) -> Result<Gpt> {
        let cfg = cfg.resolve(self.config().arch)?;
        let mut base = self.frozen_base()?;
        let (device, dtype) = (base.device().clone(), base.dtype());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, a_shape, b_shape) in targeted(&mut base, &cfg) {
            let bound = 1.0 / (a_shape[1] as f32).sqrt();
            let a: Vec<f32> = (0..a_shape[0] * a_shape[1])
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            let a = Tensor::from_vec(a, a_shape.to_vec(), &device)?.to_dtype(dtype)?;
            let b = Tensor::zeros(b_shape.to_vec(), dtype, &device)?;
            tensors.insert(lora_name(&name, "A"), a);
            tensors.insert(lora_name(&name, "B"), b);
        }
        attach(base, cfg, &tensors)
    }

    /// The adapter's config (resolved: explicit targets), if the model carries one.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.lora_state().map(|s| &s.cfg)
    }

    /// The adapter's tensors under PEFT's names (`base_model.model.<module>.lora_A.weight`
    /// (r, in), `….lora_B.weight` (out, r)); empty for a plain model.
    pub fn lora_tensors(&self) -> HashMap<String, Tensor> {
        self.lora_state()
            .map(|s| s.named().into_iter().collect())
            .unwrap_or_default()
    }

    /// Writes the adapter as PEFT does: `dir/adapter_model.safetensors` (metadata
    /// `{"format": "pt"}`) and `dir/adapter_config.json`, each atomically; `dir` is created if
    /// it does not exist. `peft.PeftModel.from_pretrained(base, dir)` loads it over the base
    /// model.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if the model carries no adapter; [`Error::Io`] naming the
    /// file that could not be written.
    pub fn save_lora_adapter(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let state = self.lora_state().ok_or_else(|| {
            Error::InvalidArgument(
                "this model carries no LoRA adapter to save (see Gpt::with_lora)".into(),
            )
        })?;
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let model_path = dir.join(ADAPTER_MODEL);
        let tensors = state
            .named()
            .into_iter()
            .map(|(n, t)| Ok((n, t.detach().contiguous()?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(tensors, Some(metadata))
            .map_err(|e| Error::io(&model_path, std::io::Error::other(e.to_string())))?;
        crate::durable::write_atomic(&model_path, &bytes)?;
        let config_path = dir.join(ADAPTER_CONFIG);
        let json = serde_json::to_string_pretty(&state.cfg.to_peft_json(self.config().arch))
            .map_err(|e| Error::bad_file(&config_path, None, e.to_string()))?;
        crate::durable::write_atomic(&config_path, (json + "\n").as_bytes())
    }

    /// A copy of the model (base weights frozen, as [`Gpt::with_lora`]) carrying the adapter in
    /// `dir` (`adapter_config.json` and `adapter_model.safetensors`, as PEFT or
    /// [`Gpt::save_lora_adapter`] write them). The adapter's tensors become trainable `Var`s
    /// in the model's dtype.
    ///
    /// # Errors
    /// [`Error::Io`] for an unreadable file; [`Error::BadFile`] naming the file for a refused or
    /// invalid config (see the module docs), targets the architecture lacks, a tensor the
    /// config does not account for or a non-float one; [`Error::MissingTensor`] /
    /// [`Error::ShapeMismatch`] naming the tensor and the file (a rank other than the config's
    /// `r` is a shape mismatch); [`Error::InvalidArgument`] if the model already carries an
    /// adapter.
    pub fn load_lora_adapter(&self, dir: impl AsRef<Path>) -> Result<Gpt> {
        let dir = dir.as_ref();
        let arch = self.config().arch;
        let config_path = dir.join(ADAPTER_CONFIG);
        let (cfg, fan_in_fan_out) = read_peft(&config_path)?;
        let in_file = |e: Error| match e {
            Error::Config(msg) => Error::bad_file(&config_path, None, msg),
            e => e,
        };
        let cfg = cfg.resolve(arch).map_err(in_file)?;
        if fan_in_fan_out && arch == Arch::Llama {
            return Err(Error::bad_file(
                &config_path,
                None,
                "fan_in_fan_out is true, but a Llama's projections are nn.Linear (out, in) \
                 weights: the adapter was made for another model",
            ));
        }
        let model_path = dir.join(ADAPTER_MODEL);
        let mut base = self.frozen_base()?;
        let tensors = crate::checkpoint::load_safetensors(&model_path, base.device())?;
        let expected: Vec<(String, Vec<usize>)> = targeted(&mut base, &cfg)
            .into_iter()
            .flat_map(|(name, a, b)| {
                [
                    (lora_name(&name, "A"), a.to_vec()),
                    (lora_name(&name, "B"), b.to_vec()),
                ]
            })
            .collect();
        let mut unexpected: Vec<&String> = tensors
            .keys()
            .filter(|k| !expected.iter().any(|(n, _)| n == *k))
            .collect();
        unexpected.sort();
        if let Some(first) = unexpected.first() {
            return Err(Error::bad_file(
                &model_path,
                None,
                format!(
                    "unexpected tensor `{first}`{}: not a lora_A/lora_B of the target_modules \
                     {} of a {arch} model with {} layers (adapter_config.json)",
                    if unexpected.len() > 1 {
                        format!(" (and {} more)", unexpected.len() - 1)
                    } else {
                        String::new()
                    },
                    cfg.target_modules.join(" "),
                    self.config().n_layer
                ),
            ));
        }
        let dtype = base.dtype();
        let mut adapter = HashMap::new();
        for (name, shape) in expected {
            let t = tensors.get(&name).ok_or_else(|| Error::MissingTensor {
                name: name.clone(),
                path: Some(model_path.clone()),
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::ShapeMismatch {
                    name,
                    expected: shape,
                    got: t.dims().to_vec(),
                    path: Some(model_path.clone()),
                });
            }
            if !t.dtype().is_float() {
                return Err(Error::bad_file(
                    &model_path,
                    None,
                    format!(
                        "tensor `{name}` holds {:?} values; adapter weights must be floats",
                        t.dtype()
                    ),
                ));
            }
            adapter.insert(name, t.to_dtype(dtype)?);
        }
        attach(base, cfg, &adapter)
    }

    /// The plain model the adapter amounts to: every adapted weight replaced by
    /// `W + scale · B A` (for GPT-2's `Conv1D` `(in, out)` weights, `W + scale · (B A)ᵀ`),
    /// computed in f32 and stored in the weight's dtype, with constant weights under ordinary
    /// Hugging Face names (so [`Gpt::save_hf_dir`] of it writes a normal HF model). A plain
    /// model merges to a copy of itself.
    ///
    /// # Errors
    /// candle errors.
    pub fn merge_lora(&self) -> Result<Gpt> {
        let Some(state) = self.lora_state() else {
            return Ok(self.clone());
        };
        let scale = state.cfg.scale();
        let conv1d = self.config().arch == Arch::Gpt2;
        let mut tensors = self.tensors();
        for m in &state.modules {
            let key = format!("{}.weight", m.name);
            let w = tensors.get(&key).ok_or_else(|| Error::MissingTensor {
                name: key.clone(),
                path: None,
            })?;
            let (a, b) = (
                m.a.detach().to_dtype(DType::F32)?,
                m.b.detach().to_dtype(DType::F32)?,
            );
            let delta = b.matmul(&a)?.affine(scale, 0.0)?; // (out, in)
            let delta = if conv1d { delta.t()? } else { delta };
            let merged = (w.detach().to_dtype(DType::F32)? + delta)?.to_dtype(w.dtype())?;
            tensors.insert(key, merged);
        }
        Gpt::from_tensors(self.config(), tensors, false)
    }

    /// Refuses an operation that would silently drop the adapter of a LoRA model.
    pub(crate) fn refuse_lora(&self, what: &str) -> Result<()> {
        if self.lora_state().is_some() {
            return Err(Error::InvalidArgument(format!(
                "{what} of a model carrying a LoRA adapter would drop the adapter: merge_lora() it first"
            )));
        }
        Ok(())
    }

    /// A constant copy of the base weights, refusing a model that already carries an adapter.
    fn frozen_base(&self) -> Result<Gpt> {
        if self.lora_state().is_some() {
            return Err(Error::InvalidArgument(
                "this model already carries a LoRA adapter: merge_lora() it first, or adapt its \
                 base model"
                    .into(),
            ));
        }
        let tensors = self
            .tensors()
            .into_iter()
            .map(|(n, t)| {
                // A `Var`'s storage is updated in place by training: copy it.
                let t = if t.is_variable() {
                    t.detach().copy()?
                } else {
                    t.detach()
                };
                Ok((n, t))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        Gpt::from_tensors(self.config(), tensors, false)
    }
}

/// `base` with the adapter `tensors` (PEFT names, checked shapes, the model's dtype) as `Var`s
/// on the projections `cfg` (resolved) targets.
fn attach(mut base: Gpt, cfg: LoraConfig, tensors: &HashMap<String, Tensor>) -> Result<Gpt> {
    let scale = cfg.scale();
    let mut modules = Vec::new();
    for slot in base.linear_slots() {
        if !cfg.targets(&slot.name) {
            continue;
        }
        let get = |which: &str| -> Result<Tensor> {
            let name = lora_name(&slot.name, which);
            let t = tensors
                .get(&name)
                .ok_or_else(|| Error::MissingTensor { name, path: None })?;
            Ok(Var::from_tensor(t)?.into_inner()) // a copy, trainable
        };
        let (a, b) = (get("A")?, get("B")?);
        *slot.lora = Some(LoraAdapter {
            a: a.clone(),
            b: b.clone(),
            scale,
            dropout: cfg.dropout,
        });
        modules.push(LoraModule {
            name: slot.name,
            a,
            b,
        });
    }
    base.set_lora_state(Some(LoraState { cfg, modules }));
    Ok(base)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    use crate::GptConfig;

    fn gpt2() -> GptConfig {
        GptConfig {
            vocab_size: 23,
            block_size: 8,
            n_layer: 2,
            n_head: 2,
            n_embd: 8,
            dropout: 0.0,
            bias: true,
            ..Default::default()
        }
    }

    fn llama() -> GptConfig {
        GptConfig {
            n_kv_head: Some(1),
            intermediate_size: Some(12),
            tie_word_embeddings: false,
            qkv_bias: true,
            ..GptConfig::llama(23, 8, 2, 2, 8)
        }
    }

    fn ids() -> Tensor {
        Tensor::new(&[[1u32, 5, 7, 2, 9, 3], [4, 4, 0, 22, 8, 6]], &Device::Cpu).unwrap()
    }

    fn vec(t: &Tensor) -> Vec<f32> {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Sets every `B` of `model` to small seeded values (a trained-looking adapter).
    fn randomise_b(model: &Gpt, seed: u64) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for (name, var) in model.vars().unwrap() {
            if name.ends_with("lora_B.weight") {
                let n = var.elem_count();
                let data: Vec<f32> = (0..n).map(|_| rng.random_range(-0.3f32..0.3)).collect();
                var.set(&Tensor::from_vec(data, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
    }

    #[test]
    fn config_defaults_validate_and_resolve_per_arch() {
        let d = LoraConfig::default();
        assert_eq!((d.r, d.alpha, d.dropout, d.scale()), (8, 16.0, 0.05, 2.0));
        assert_eq!(
            d.resolve(Arch::Llama).unwrap().target_modules,
            LLAMA_MODULES
        );
        assert_eq!(d.resolve(Arch::Gpt2).unwrap().target_modules, GPT2_MODULES);
        let some = LoraConfig {
            target_modules: vec!["v_proj".into(), "q_proj".into(), "q_proj".into()],
            ..d.clone()
        };
        assert_eq!(
            some.resolve(Arch::Llama).unwrap().target_modules,
            ["q_proj", "v_proj"]
        );
        let e = some.resolve(Arch::Gpt2).unwrap_err().to_string();
        assert!(
            e.contains("`v_proj`, `q_proj`") && e.contains("gpt2"),
            "{e}"
        );
        let e = LoraConfig {
            target_modules: vec!["q_proj".into(), "lm_head".into(), "wte".into()],
            ..d.clone()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("`lm_head`, `wte`") && !e.contains("`q_proj`"),
            "{e}"
        );
        for bad in [
            LoraConfig { r: 0, ..d.clone() },
            LoraConfig {
                alpha: f64::NAN,
                ..d.clone()
            },
            LoraConfig {
                dropout: 1.0,
                ..d.clone()
            },
            LoraConfig {
                target_modules: vec![],
                ..d.clone()
            },
        ] {
            assert!(matches!(bad.validate(), Err(Error::Config(_))), "{bad:?}");
        }
        assert!(d
            .resolve(Arch::Llama)
            .unwrap()
            .targets("model.layers.3.mlp.up_proj"));
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(serde_json::from_str::<LoraConfig>(&json).unwrap(), d);
    }

    #[test]
    fn peft_config_round_trip_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ADAPTER_CONFIG);
        let cfg = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.05,
            ..Default::default()
        }
        .resolve(Arch::Gpt2)
        .unwrap();
        let v = cfg.to_peft_json(Arch::Gpt2);
        assert_eq!(v["fan_in_fan_out"], true);
        assert_eq!(v["lora_alpha"], 8);
        assert_eq!(v["lora_dropout"], 0.05);
        assert_eq!(v["target_modules"], json!(["c_attn", "c_fc", "c_proj"]));
        std::fs::write(&path, v.to_string()).unwrap();
        let back = LoraConfig::load_peft(&path).unwrap();
        assert_eq!(back.resolve(Arch::Gpt2).unwrap(), cfg);
        let refused = [
            ("peft_type", json!("IA3"), "peft_type"),
            ("task_type", json!("SEQ_CLS"), "task_type"),
            ("use_rslora", json!(true), "use_rslora"),
            ("use_dora", json!(true), "use_dora"),
            ("rank_pattern", json!({"q_proj": 2}), "rank_pattern"),
            ("alpha_pattern", json!({"q_proj": 2}), "alpha_pattern"),
            ("modules_to_save", json!(["lm_head"]), "modules_to_save"),
            ("bias", json!("all"), "bias"),
            ("target_modules", json!(".*proj"), "regular expression"),
            ("target_modules", json!(["c_attn", "score"]), "`score`"),
            ("r", json!(2.5), "r is 2.5"),
        ];
        for (key, value, needle) in refused {
            let mut v = v.clone();
            v[key] = value;
            std::fs::write(&path, v.to_string()).unwrap();
            let e = LoraConfig::load_peft(&path).unwrap_err().to_string();
            assert!(
                e.contains(needle) && e.contains(ADAPTER_CONFIG),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn fresh_adapter_is_kaiming_uniform_seeded_and_gives_exactly_the_base_logits() {
        for cfg in [gpt2(), llama()] {
            let base = Gpt::init(&cfg, 3, &Device::Cpu).unwrap();
            let lcfg = LoraConfig {
                r: 3,
                ..Default::default()
            };
            let lora = base.with_lora(&lcfg, 11).unwrap();
            assert!(lora
                .named_parameters()
                .iter()
                .all(|(_, t)| !t.is_variable()));
            let n_mod = cfg.n_layer * linear_modules(cfg.arch).len()
                + if cfg.arch == Arch::Gpt2 {
                    cfg.n_layer
                } else {
                    0
                };
            let vars = lora.vars().unwrap();
            assert_eq!(vars.len(), 2 * n_mod, "{}", cfg.arch);
            for (name, var) in &vars {
                assert!(name.starts_with(PEFT_PREFIX), "{name}");
                let v = vec(var.as_tensor());
                if name.ends_with("lora_B.weight") {
                    assert!(v.iter().all(|x| *x == 0.0), "{name}");
                } else {
                    let bound = 1.0 / (var.dims()[1] as f32).sqrt();
                    assert!(v.iter().all(|x| x.abs() <= bound), "{name}");
                    assert!(v.iter().any(|x| x.abs() > bound / 2.0), "{name}");
                }
            }
            let again = base.with_lora(&lcfg, 11).unwrap();
            for ((_, a), (_, b)) in vars.iter().zip(again.vars().unwrap()) {
                assert_eq!(vec(a.as_tensor()), vec(b.as_tensor()));
            }
            let frozen = Gpt::from_tensors(&cfg, base.tensors(), false).unwrap();
            assert_eq!(
                vec(&lora.forward(&ids()).unwrap()),
                vec(&frozen.forward(&ids()).unwrap())
            );
            assert!(lora.with_lora(&lcfg, 1).is_err());
            assert!(lora.to_dtype(DType::F16).is_err());
        }
    }

    /// Many rows take the one-product path (stacked weights, stacked `A`s, block-diagonal
    /// `B`s, some parts without an adapter); a few rows one product per part. Both give the
    /// merged model's logits, and the same adapter gradients.
    #[test]
    fn stacked_and_per_part_adapters_agree_in_values_and_gradients() {
        let cfg = llama();
        let base = Gpt::init(&cfg, 5, &Device::Cpu).unwrap();
        let lcfg = LoraConfig {
            r: 2,
            alpha: 3.0,
            dropout: 0.0,
            target_modules: vec!["q_proj".into(), "v_proj".into(), "up_proj".into()],
        };
        let lora = base.with_lora(&lcfg, 9).unwrap();
        randomise_b(&lora, 4);
        let merged = lora.merge_lora().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let flat: Vec<u32> = (0..80).map(|_| rng.random_range(0..23u32)).collect();
        let many = Tensor::from_vec(flat, (10, 8), &Device::Cpu).unwrap(); // 80 rows
        let logits = lora.forward(&many).unwrap();
        let diff = (&logits - merged.forward(&many).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-4, "{diff}");
        let grads = |x: &Tensor| {
            let g = lora
                .forward(x)
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            lora.vars()
                .unwrap()
                .into_iter()
                .map(|(n, v)| (n, g.get(v.as_tensor()).unwrap().clone()))
                .collect::<Vec<_>>()
        };
        let whole = grads(&many);
        let halves: Vec<_> = [many.narrow(0, 0, 5).unwrap(), many.narrow(0, 5, 5).unwrap()]
            .iter()
            .map(|h| grads(h)) // 40 rows each: one product per part
            .collect();
        for (i, (name, g)) in whole.iter().enumerate() {
            let sum = (&halves[0][i].1 + &halves[1][i].1).unwrap();
            let d = (g - sum)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(d < 1e-3, "{name}: {d}");
        }
    }

    #[test]
    fn merged_weights_are_base_plus_scaled_b_a_by_hand() {
        for cfg in [gpt2(), llama()] {
            let base = Gpt::init(&cfg, 5, &Device::Cpu).unwrap();
            let targets = match cfg.arch {
                Arch::Gpt2 => vec!["c_attn".to_string(), "c_proj".to_string()],
                Arch::Llama => vec![
                    "q_proj".into(),
                    "v_proj".into(),
                    "up_proj".into(),
                    "down_proj".into(),
                ],
            };
            let lcfg = LoraConfig {
                r: 2,
                alpha: 3.0,
                dropout: 0.0,
                target_modules: targets,
            };
            let lora = base.with_lora(&lcfg, 9).unwrap();
            randomise_b(&lora, 4);
            let merged = lora.merge_lora().unwrap();
            assert!(merged.lora_config().is_none() && merged.vars().is_err());
            let scale = 1.5f32;
            let adapter = lora.lora_tensors();
            let (base_t, merged_t) = (base.tensors(), merged.tensors());
            assert_eq!(merged_t.len(), base_t.len());
            let mut n_merged = 0;
            for (name, w) in &base_t {
                let module = name.strip_suffix(".weight").unwrap_or(name);
                let got = vec(&merged_t[name]);
                let Some(a) = adapter.get(&lora_name(module, "A")) else {
                    assert_eq!(got, vec(w), "{name} is not targeted");
                    continue;
                };
                n_merged += 1;
                let b = &adapter[&lora_name(module, "B")];
                let (r, d_in, d_out) = (a.dims()[0], a.dims()[1], b.dims()[0]);
                let (av, bv, wv) = (vec(a), vec(b), vec(w));
                for o in 0..d_out {
                    for i in 0..d_in {
                        let delta: f32 = (0..r)
                            .map(|k| bv[o * r + k] * av[k * d_in + i])
                            .sum::<f32>()
                            * scale;
                        // Conv1D (in, out), nn.Linear (out, in).
                        let at = if cfg.arch == Arch::Gpt2 {
                            i * d_out + o
                        } else {
                            o * d_in + i
                        };
                        assert!(
                            (got[at] - (wv[at] + delta)).abs() <= 1e-6,
                            "{name} [{o}, {i}]"
                        );
                    }
                }
            }
            // GPT-2: c_attn, attn.c_proj, mlp.c_proj per layer; Llama: 4 per layer.
            let per_layer = if cfg.arch == Arch::Gpt2 { 3 } else { 4 };
            assert_eq!(n_merged, per_layer * cfg.n_layer);
            let (x, y) = (
                lora.forward(&ids()).unwrap(),
                merged.forward(&ids()).unwrap(),
            );
            let diff = vec(&x)
                .iter()
                .zip(vec(&y))
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "{}: {diff}", cfg.arch);
        }
    }
}
