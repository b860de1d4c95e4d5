//! Memory bounds: whether a model fits in memory, decided before its weights are allocated.
//!
//! A GPT's memory is a function of its config, so a model that cannot fit is refused up front
//! with the figures, instead of a process that grows until the kernel kills it (or that spins
//! in swap). [`MemoryEstimate`] is the arithmetic, in checked 64-bit integers so that an absurd
//! config (`n_embd: 1000000000000`) is an error rather than a size that wrapped around to a
//! small number:
//!
//! * **weights**: [`GptConfig::num_parameters`] × the bytes of the dtype;
//! * **training** adds the gradients (one per weight, in its dtype), AdamW's two moments (f32,
//!   see [`crate::optim::AdamW`]) and a rough count of the activations the backward pass keeps
//!   for a batch of `batch_size × block_size` tokens (about 20·C floats per token and layer,
//!   the attention weights too with dropout, and the logits);
//! * **inference** adds a KV cache of `batch_size` sequences of `block_size` positions and the
//!   activations of one whole-sequence forward pass.
//!
//! [`MemoryBudget::detect`] says what there is: `TINYGPT_MEMORY_LIMIT` if set (bytes, or a
//! number with a `K`, `M`, `G` or `T` suffix, binary: `8G` is 8 GiB; `off` disables the check),
//! otherwise for the CPU Linux's `MemAvailable` (with `MemTotal` named in messages) from
//! `/proc/meminfo`. Where neither says (another OS, a GPU's memory), nothing is checked.
//!
//! [`Gpt::init`](crate::Gpt::init), [`Gpt::new`](crate::Gpt::new), trainable
//! [`Gpt::from_tensors`](crate::Gpt::from_tensors), [`GptConfig::load`] and the Hugging Face
//! loaders ([`crate::hf`]) check before they allocate; callers that know their batch size can
//! check it too with [`GptConfig::check_fits`].

use candle_core::{DType, Device};

use crate::model::GptConfig;
use crate::{Error, Result};

/// The environment variable that replaces the detected memory (see the module docs).
pub const MEMORY_LIMIT_ENV: &str = "TINYGPT_MEMORY_LIMIT";

const GIB: f64 = (1u64 << 30) as f64;

/// What a model of some config needs, in bytes, by part (see the module docs for what each
/// counts). Make one with [`GptConfig::memory_estimate`] or [`MemoryEstimate::new`].
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryEstimate {
    /// The config estimated.
    pub config: GptConfig,
    /// Whether the estimate is for training (else inference).
    pub training: bool,
    /// Sequences of `block_size` tokens per batch.
    pub batch_size: usize,
    /// Bytes per weight (4 for f32).
    pub dtype_bytes: u64,
    /// Number of parameters.
    pub parameters: u64,
    /// The weights.
    pub params_bytes: u64,
    /// Gradients of the weights (training; 0 otherwise).
    pub grad_bytes: u64,
    /// AdamW's first and second moments, f32 (training; 0 otherwise).
    pub optimizer_bytes: u64,
    /// Activations: kept for the backward pass in training, one forward pass in inference.
    pub activation_bytes: u64,
    /// Keys and values of every layer for `batch_size` full contexts (inference; 0 otherwise).
    pub kv_cache_bytes: u64,
    /// The sum of the parts.
    pub total: u64,
}

/// How much memory there is to spend, and where the figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    /// Bytes that may be allocated.
    pub available: u64,
    /// The machine's total, when known (`MemTotal`).
    pub total: Option<u64>,
    /// Where `available` came from.
    pub source: BudgetSource,
}

/// Where a [`MemoryBudget`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BudgetSource {
    /// The `TINYGPT_MEMORY_LIMIT` environment variable.
    EnvLimit,
    /// `MemAvailable` in Linux's `/proc/meminfo`.
    MemInfo,
}

/// `a · b` in u64, `None` on overflow.
fn mul(a: u64, b: u64) -> Option<u64> {
    a.checked_mul(b)
}

/// `a + b` in u64, `None` on overflow.
fn add(a: u64, b: u64) -> Option<u64> {
    a.checked_add(b)
}

/// `x` as u64 (`None` only where usize is wider than 64 bits and `x` does not fit).
fn u(x: usize) -> Option<u64> {
    u64::try_from(x).ok()
}

/// The parameter count of `cfg` (the tied head once), `None` if it overflows 64 bits.
pub(crate) fn parameter_count(cfg: &GptConfig) -> Option<u64> {
    if cfg.arch == crate::model::Arch::Llama {
        return llama_parameter_count(cfg);
    }
    let (v, t, l, c) = (
        u(cfg.vocab_size)?,
        u(cfg.block_size)?,
        u(cfg.n_layer)?,
        u(cfg.n_embd)?,
    );
    let bias = u64::from(cfg.bias);
    // Per block: c_attn c·3c, attn.c_proj c·c, c_fc c·4c, mlp.c_proj 4c·c = 12c²; their
    // biases 3c + c + 4c + c = 9c; ln_1 and ln_2 c each, and as much again for their biases.
    let per_layer = add(
        add(mul(12, mul(c, c)?)?, mul(9 * bias, c)?)?,
        mul(2 + 2 * bias, c)?,
    )?;
    let embeddings = add(mul(v, c)?, mul(t, c)?)?; // wte (also the head) and wpe
    let ln_f = mul(1 + bias, c)?;
    add(add(embeddings, mul(l, per_layer)?)?, ln_f)
}

/// [`parameter_count`] of a Llama: per block q, k, v, o, gate, up, down, two RMSNorms, and
/// the optional biases and q/k norms; the embedding, the final norm and an untied head.
fn llama_parameter_count(cfg: &GptConfig) -> Option<u64> {
    let (v, l, c) = (u(cfg.vocab_size)?, u(cfg.n_layer)?, u(cfg.n_embd)?);
    let (hs, i) = (u(cfg.head_size())?, u(cfg.mlp_hidden())?);
    let q = mul(u(cfg.n_head)?, hs)?;
    let kv = mul(u(cfg.n_kv_heads())?, hs)?;
    let attn = add(mul(2, mul(c, q)?)?, mul(2, mul(c, kv)?)?)?; // q, o; k, v
    let mlp = mul(3, mul(c, i)?)?;
    let mut per_layer = add(add(attn, mlp)?, mul(2, c)?)?;
    if cfg.bias || cfg.qkv_bias {
        per_layer = add(per_layer, add(q, mul(2, kv)?)?)?;
    }
    if cfg.bias {
        per_layer = add(per_layer, add(mul(2, c)?, mul(2, i)?)?)?; // o, down; gate, up
    }
    if cfg.qk_norm {
        per_layer = add(per_layer, mul(2, hs)?)?;
    }
    let head = if cfg.tie_word_embeddings {
        0
    } else {
        mul(v, c)?
    };
    add(add(add(mul(v, c)?, head)?, mul(l, per_layer)?)?, c)
}

/// A parameter count for a message: `0.8M`, `1.6B`, `4.8e17`.
fn format_count(n: u64) -> String {
    let x = n as f64;
    if x < 1e9 {
        format!("{:.1}M", x / 1e6)
    } else if x < 1e12 {
        format!("{:.1}B", x / 1e9)
    } else {
        format!("{x:.1e}")
    }
}

/// `bytes` for a message: GiB from 1 GiB up, MiB below.
pub fn format_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= GIB {
        format!("{:.1} GiB", b / GIB)
    } else {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    }
}

impl MemoryEstimate {
    /// The estimate for `cfg` with weights in `dtype`, for training or inference of batches
    /// of `batch_size` sequences (taken as at least 1).
    ///
    /// # Errors
    /// [`Error::Config`] naming the config's sizes if a count overflows 64 bits (no machine
    /// could hold such a model).
    pub fn new(cfg: &GptConfig, training: bool, batch_size: usize, dtype: DType) -> Result<Self> {
        let dtype_bytes = dtype.size_in_bytes() as u64;
        Self::compute(cfg, training, batch_size.max(1), dtype_bytes).ok_or_else(|| {
            Error::Config(format!(
                "{} is too large to count: its size in bytes overflows 64 bits, far more memory \
                 than any machine has",
                describe(cfg)
            ))
        })
    }

    fn compute(
        cfg: &GptConfig,
        training: bool,
        batch_size: usize,
        dtype_bytes: u64,
    ) -> Option<Self> {
        let parameters = parameter_count(cfg)?;
        let params_bytes = mul(parameters, dtype_bytes)?;
        let (c, v, t, l) = (
            u(cfg.n_embd)?,
            u(cfg.vocab_size)?,
            u(cfg.block_size)?,
            u(cfg.n_layer)?,
        );
        let tokens = mul(u(batch_size)?, t)?;
        let f32_bytes = 4;
        let (grad_bytes, optimizer_bytes, activation_bytes, kv_cache_bytes) = if training {
            // Kept for the backward pass, per token: about 20·C per layer (LayerNorm inputs and
            // outputs, qkv, the attention output, the projections, the MLP's 4C pre- and
            // post-GELU, the residual sums); with dropout its masks and the attention
            // weights (nh·T, with their mask and the dropped copy); the embeddings; ln_f; the
            // logits and their softmax, f32.
            let mut per_layer = mul(20, c)?;
            if cfg.dropout > 0.0 {
                let attn = mul(3, mul(u(cfg.n_head)?, t)?)?;
                per_layer = add(add(per_layer, mul(4, c)?)?, attn)?;
            }
            let per_token = add(add(mul(l, per_layer)?, mul(3, c)?)?, mul(2, v)?)?;
            (
                params_bytes,
                mul(parameters, 2 * f32_bytes)?,
                mul(mul(tokens, per_token)?, f32_bytes)?,
                0,
            )
        } else {
            // One whole-sequence forward pass (a layer's activations at a time, and the
            // logits) and the KV cache: k and v of every layer, f32 on the CPU.
            let per_token = add(mul(10, c)?, v)?;
            let kv_width = mul(u(cfg.n_kv_heads())?, u(cfg.head_size())?)?;
            let kv = mul(mul(mul(2, l)?, mul(tokens, kv_width)?)?, f32_bytes)?;
            (0, 0, mul(mul(tokens, per_token)?, f32_bytes)?, kv)
        };
        let total = add(
            add(add(params_bytes, grad_bytes)?, optimizer_bytes)?,
            add(activation_bytes, kv_cache_bytes)?,
        )?;
        Some(Self {
            config: cfg.clone(),
            training,
            batch_size,
            dtype_bytes,
            parameters,
            params_bytes,
            grad_bytes,
            optimizer_bytes,
            activation_bytes,
            kv_cache_bytes,
            total,
        })
    }

    /// Checks the estimate against `budget`.
    ///
    /// # Errors
    /// [`Error::Config`] if `total` exceeds `budget.available`, giving both in GiB, the parts
    /// of the estimate, the config's sizes and where the budget came from.
    pub fn check_against(&self, budget: &MemoryBudget) -> Result<()> {
        if self.total <= budget.available {
            return Ok(());
        }
        let parts = if self.training {
            format!(
                "weights {}, gradients {}, AdamW moments {}, activations {}",
                format_bytes(self.params_bytes),
                format_bytes(self.grad_bytes),
                format_bytes(self.optimizer_bytes),
                format_bytes(self.activation_bytes),
            )
        } else {
            format!(
                "weights {}, KV cache {}, activations {}",
                format_bytes(self.params_bytes),
                format_bytes(self.kv_cache_bytes),
                format_bytes(self.activation_bytes),
            )
        };
        let found = match budget.source {
            BudgetSource::EnvLimit => format!(
                "the {} {MEMORY_LIMIT_ENV} allows",
                format_bytes(budget.available)
            ),
            BudgetSource::MemInfo => format!(
                "the {} this machine has available (MemAvailable in /proc/meminfo{})",
                format_bytes(budget.available),
                budget
                    .total
                    .map(|t| format!("; MemTotal {}", format_bytes(t)))
                    .unwrap_or_default()
            ),
        };
        Err(Error::Config(format!(
            "{} ({} parameters) needs about {} to {} ({parts}, for batches of {} × {} \
             tokens), more than {found}: make the model smaller, or set {MEMORY_LIMIT_ENV} \
             (e.g. 64G) to override the check",
            describe(&self.config),
            format_count(self.parameters),
            format_bytes(self.total),
            if self.training { "train" } else { "run" },
            self.batch_size,
            self.config.block_size,
        )))
    }
}

/// `a model of n_layer 4, n_head 4, n_embd 128, vocab_size 66, block_size 64`.
fn describe(cfg: &GptConfig) -> String {
    format!(
        "a model of n_layer {}, n_head {}, n_embd {}, vocab_size {}, block_size {}",
        cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.vocab_size, cfg.block_size
    )
}

/// Parses a memory size: bytes (`1073741824`), or a number with a binary suffix `K`, `M`, `G`
/// or `T` (optionally followed by `B` or `iB`, any case): `8G`, `512MiB`, `1.5g`. `None` if
/// it is not one or does not fit in 64 bits.
pub fn parse_size(text: &str) -> Option<u64> {
    let s = text.trim();
    let split = s
        .find(|ch: char| !(ch.is_ascii_digit() || ch == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    let shift = match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return None,
    };
    if number.is_empty() {
        return None;
    }
    if number.contains('.') {
        let x: f64 = number.parse().ok()?;
        let bytes = x * (1u64 << shift) as f64;
        // 2^64 is the first f64 past u64's range.
        (bytes.is_finite() && bytes < 18_446_744_073_709_551_616.0).then_some(bytes as u64)
    } else {
        number.parse::<u64>().ok()?.checked_mul(1u64 << shift)
    }
}

/// `(MemAvailable, MemTotal)` in bytes from the text of `/proc/meminfo`, each `None` if absent.
pub fn parse_meminfo(text: &str) -> (Option<u64>, Option<u64>) {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let mut words = rest.split_whitespace();
            let n: u64 = words.next()?.parse().ok()?;
            match words.next() {
                Some("kB") => n.checked_mul(1024),
                None => Some(n),
                Some(_) => None,
            }
        })
    };
    (field("MemAvailable"), field("MemTotal"))
}

impl MemoryBudget {
    /// The memory there is for tensors on `device`: `TINYGPT_MEMORY_LIMIT` if set (for any
    /// device), otherwise on the CPU `MemAvailable` from `/proc/meminfo`; `None` where that is
    /// unknown (another OS, a GPU) or the variable is `off`, and nothing is checked.
    ///
    /// # Errors
    /// [`Error::Config`] if `TINYGPT_MEMORY_LIMIT` is set to something that is not a size.
    pub fn detect(device: &Device) -> Result<Option<Self>> {
        if let Some(value) = std::env::var_os(MEMORY_LIMIT_ENV) {
            let value = value.to_string_lossy();
            let trimmed = value.trim();
            if !trimmed.is_empty() {
                if ["off", "none", "unlimited"].contains(&trimmed.to_ascii_lowercase().as_str()) {
                    return Ok(None);
                }
                let available = parse_size(trimmed).ok_or_else(|| {
                    Error::Config(format!(
                        "{MEMORY_LIMIT_ENV}={value:?} is not a memory size: give bytes, or a \
                         number with K, M, G or T (binary: 8G is 8 GiB), or `off`"
                    ))
                })?;
                return Ok(Some(Self {
                    available,
                    total: None,
                    source: BudgetSource::EnvLimit,
                }));
            }
        }
        if !device.is_cpu() {
            return Ok(None);
        }
        let Ok(text) = std::fs::read_to_string("/proc/meminfo") else {
            return Ok(None);
        };
        Ok(match parse_meminfo(&text) {
            (Some(available), total) => Some(Self {
                available,
                total,
                source: BudgetSource::MemInfo,
            }),
            (None, _) => None,
        })
    }
}

/// Checks that a model of `cfg` with weights in `dtype` fits on `device` for training or
/// inference in batches of `batch_size` (see the module docs); nothing is checked where the
/// memory is unknown.
///
/// # Errors
/// [`Error::Config`] if it does not fit or its size overflows, with the figures; or if
/// `TINYGPT_MEMORY_LIMIT` is malformed.
pub fn check_fits(
    cfg: &GptConfig,
    training: bool,
    batch_size: usize,
    dtype: DType,
    device: &Device,
) -> Result<()> {
    check_fits_from(cfg, training, batch_size, dtype, device, None)
}

/// As [`check_fits`] for a config read from `config`, which the message about the model
/// names first (the one about a malformed `TINYGPT_MEMORY_LIMIT` does not).
pub(crate) fn check_fits_from(
    cfg: &GptConfig,
    training: bool,
    batch_size: usize,
    dtype: DType,
    device: &Device,
    config: Option<&std::path::Path>,
) -> Result<()> {
    let named = |e: Error| match (e, config) {
        (Error::Config(msg), Some(path)) => Error::Config(format!("{}: {msg}", path.display())),
        (e, _) => e,
    };
    let estimate = MemoryEstimate::new(cfg, training, batch_size, dtype).map_err(named)?;
    match MemoryBudget::detect(device)? {
        Some(budget) => estimate.check_against(&budget).map_err(named),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(available: u64) -> MemoryBudget {
        MemoryBudget {
            available,
            total: Some(available * 2),
            source: BudgetSource::MemInfo,
        }
    }

    #[test]
    fn gpt2_small_weights_are_its_parameters_times_four() {
        let e = MemoryEstimate::new(&GptConfig::gpt2(), false, 1, DType::F32).unwrap();
        assert_eq!(e.parameters, 124_439_808);
        assert_eq!(e.params_bytes, 124_439_808 * 4);
        assert_eq!((e.grad_bytes, e.optimizer_bytes), (0, 0));
        // k and v of 12 layers, 1024 positions, 768 wide, f32.
        assert_eq!(e.kv_cache_bytes, 2 * 12 * 1024 * 768 * 4);
        assert_eq!(e.activation_bytes, 1024 * (10 * 768 + 50257) * 4);
        assert_eq!(
            e.total,
            e.params_bytes + e.kv_cache_bytes + e.activation_bytes
        );
        let half = MemoryEstimate::new(&GptConfig::gpt2(), false, 1, DType::F16).unwrap();
        assert_eq!(half.params_bytes, 124_439_808 * 2);

        // Training: gradients as large as the weights, two f32 moments, activations of
        // 20·C per layer plus 3·C and 2·V per token (no dropout).
        let t = MemoryEstimate::new(&GptConfig::gpt2(), true, 8, DType::F32).unwrap();
        assert_eq!(t.grad_bytes, 124_439_808 * 4);
        assert_eq!(t.optimizer_bytes, 124_439_808 * 8);
        let per_token: u64 = 12 * 20 * 768 + 3 * 768 + 2 * 50257;
        assert_eq!(t.activation_bytes, 8 * 1024 * per_token * 4);
        assert_eq!(t.kv_cache_bytes, 0);
        assert_eq!(
            t.total,
            124_439_808 * 16 + t.activation_bytes,
            "weights + gradients + moments + activations"
        );
    }

    #[test]
    fn the_count_agrees_with_the_parameter_shapes() {
        for bias in [false, true] {
            for cfg in [GptConfig::shakespeare_char(65), GptConfig::gpt2_medium()] {
                let cfg = GptConfig { bias, ..cfg };
                let shapes: usize = cfg
                    .parameter_shapes()
                    .iter()
                    .map(|(_, s)| s.iter().product::<usize>())
                    .sum();
                assert_eq!(parameter_count(&cfg), Some(shapes as u64), "{cfg:?}");
                assert_eq!(cfg.num_parameters(), shapes);
            }
        }
    }

    #[test]
    fn a_model_too_large_is_refused_with_the_figures() {
        let cfg = GptConfig {
            n_embd: 100_000_000,
            ..GptConfig::shakespeare_char_cpu(70)
        };
        let e = MemoryEstimate::new(&cfg, true, 1, DType::F32).unwrap();
        // 12·C² per layer dominates: 4 · 12 · 10^16 parameters.
        assert!(e.parameters > 4 * 12 * 10u64.pow(16));
        let err = e.check_against(&budget(16 << 30)).unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "invalid config: a model of n_layer 4, n_head 4, n_embd 100000000, vocab_size 70, \
                 block_size 64 ("
            ),
            "{msg}"
        );
        assert!(msg.contains("GiB to train (weights "), "{msg}");
        assert!(
            msg.contains(
                "more than the 16.0 GiB this machine has available (MemAvailable in \
                 /proc/meminfo; MemTotal 32.0 GiB)"
            ),
            "{msg}"
        );
        // The same config's own figure, to the tenth of a GiB.
        assert!(
            msg.contains(&format!("needs about {} to train", format_bytes(e.total))),
            "{msg}"
        );
        // An environment limit is named as such.
        let env = MemoryBudget {
            available: 1 << 30,
            total: None,
            source: BudgetSource::EnvLimit,
        };
        let msg = e.check_against(&env).unwrap_err().to_string();
        assert!(
            msg.contains("more than the 1.0 GiB TINYGPT_MEMORY_LIMIT allows"),
            "{msg}"
        );
        // A small model fits, exactly at the limit too.
        let small = GptConfig::shakespeare_char_cpu(70);
        let e = MemoryEstimate::new(&small, true, 12, DType::F32).unwrap();
        e.check_against(&budget(e.total)).unwrap();
        assert!(e.check_against(&budget(e.total - 1)).is_err());
    }

    #[test]
    fn sizes_that_overflow_are_an_error_not_a_small_number() {
        // n_embd 10^12: 12 · C² = 1.2 · 10^25 parameters, past 2^64 ≈ 1.8 · 10^19.
        let cfg = GptConfig {
            n_embd: 1_000_000_000_000,
            n_head: 1,
            ..GptConfig::shakespeare_char_cpu(70)
        };
        let e = MemoryEstimate::new(&cfg, false, 1, DType::F32).unwrap_err();
        assert!(matches!(e, Error::Config(_)));
        assert_eq!(
            e.to_string(),
            "invalid config: a model of n_layer 4, n_head 1, n_embd 1000000000000, vocab_size 70, \
             block_size 64 is too large to count: its size in bytes overflows 64 bits, far more \
             memory than any machine has"
        );
        assert_eq!(cfg.num_parameters(), usize::MAX);
        // Parameters that fit in 64 bits but whose bytes do not.
        let cfg = GptConfig {
            vocab_size: 1 << 40,
            n_embd: 1 << 22,
            n_head: 1,
            ..GptConfig::shakespeare_char_cpu(70)
        };
        assert!(parameter_count(&cfg).is_some());
        assert!(MemoryEstimate::new(&cfg, false, 1, DType::F32).is_err());
        // Only the training activations overflow: batch × block × per-token floats.
        let cfg = GptConfig {
            block_size: 1 << 40,
            ..GptConfig::shakespeare_char_cpu(70)
        };
        assert!(MemoryEstimate::new(&cfg, false, 1, DType::F32).is_ok());
        assert!(MemoryEstimate::new(&cfg, true, 1 << 20, DType::F32).is_err());
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("1024"), Some(1024));
        assert_eq!(parse_size("8G"), Some(8 << 30));
        assert_eq!(parse_size(" 512MiB "), Some(512 << 20));
        assert_eq!(parse_size("1.5g"), Some(3 << 29));
        assert_eq!(parse_size("2 TB"), Some(2 << 40));
        assert_eq!(parse_size("4k"), Some(4096));
        for bad in [
            "",
            "G",
            "eight",
            "8X",
            "-1",
            "1e3",
            "99999999999999999999",
            "20000000T",
        ] {
            assert_eq!(parse_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn meminfo_is_read_in_kilobytes() {
        let text = "MemTotal:       24684092 kB\nMemFree:          650728 kB\n\
                    MemAvailable:   24083472 kB\nBuffers:          1 kB\n";
        assert_eq!(
            parse_meminfo(text),
            (Some(24_083_472 * 1024), Some(24_684_092 * 1024))
        );
        assert_eq!(
            parse_meminfo("MemTotal: 1 kB\n"),
            (None, Some(1024)),
            "old kernels have no MemAvailable"
        );
    }
}
