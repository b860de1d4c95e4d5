//! GGUF out and in: the single-file format of llama.cpp and ollama.
//!
//! A GGUF file is a header of typed key–value metadata (the architecture's hyper-parameters,
//! the tokenizer's tokens, merges and chat template), a table of tensor infos (name, dims,
//! ggml type, offset) and the tensor data, each tensor aligned to 32 bytes
//! (<https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>, version 3, little endian).
//!
//! - [`save_gguf`] writes a GPT-2 ([`Arch::Gpt2`]) under llama.cpp's `gpt2` architecture and
//!   tensor names (`token_embd`, `position_embd`, `blk.N.attn_qkv`, `attn_output`, `ffn_up`,
//!   `ffn_down`, `attn_norm`, `ffn_norm`, `output_norm`), its matrices in F32, F16 or Q8_0
//!   ([`GgufType`]; vectors stay F32, as llama.cpp's converter keeps them, and in a Q8_0 file
//!   so does the position embedding, which is looked up, never multiplied). Hugging Face's
//!   `Conv1D` weights `(in, out)` are transposed to ggml's `(out, in)` rows. The tokenizer goes
//!   along in full: `tokenizer.ggml.model = "gpt2"` with GPT-2's pre-tokenizer, every token
//!   with its type (the special tokens as control tokens), the merges, the bos/eos ids, and
//!   for a chat model `tokenizer.chat_template` ([`ChatTemplate::JINJA`]), so llama-server's
//!   `/v1/chat/completions` lays turns out as tinygpt does. A char tokenizer's tokens are
//!   written byte-level, with merges that rebuild each multi-byte character, so llama.cpp's
//!   BPE splits text into the same characters.
//! - [`Gpt::from_gguf`] reads a `gpt2` GGUF (tinygpt's own, or one from llama.cpp's
//!   `convert_hf_to_gguf.py`) into a [`Gpt`], its weights in the file's type: F32 and F16
//!   as tensors, Q8_0 as 8-bit matrices that decoding multiplies directly
//!   ([`crate::kernels::q8`]). [`load_gguf_tokenizer`] rebuilds the tokenizer.
//!
//! The header is read by candle's reader (`candle_core::quantized::gguf_file`), which bounds
//! every count and length by the bytes left in the file. Before any tensor data is read, each
//! tensor's dims are checked against the config the metadata describes and its byte range
//! against the file, with checked arithmetic: a hostile file gets an [`Error::Gguf`] naming the
//! problem, never a panic or an allocation larger than the file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use crate::chat::ChatTemplate;
use crate::error::{Error, Result};
use crate::kernels::q8::Q8Matrix;
use crate::model::{Arch, Gpt, GptConfig};
use crate::tokenizer::{Tokenizer, TokenizerKind, EOT};

/// Tensor data alignment (GGUF's default, `general.alignment` absent).
const ALIGNMENT: u64 = 32;

/// GGUF's magic, "GGUF" read as a little-endian u32.
const MAGIC: u32 = 0x4655_4747;

/// ggml's type ids for the tensor types tinygpt writes (`enum ggml_type`).
const GGML_F32: u32 = 0;
const GGML_F16: u32 = 1;
const GGML_Q8_0: u32 = 8;

/// llama.cpp's token types (`enum llama_token_type`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_UNUSED: i32 = 5;

/// The type of a GGUF export's weight matrices (vectors are F32 in every file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    /// 32-bit floats: exact.
    F32,
    /// IEEE half precision: each weight rounded to 11 significant bits.
    F16,
    /// ggml's `Q8_0`: blocks of 32 weights along a row as an f16 scale `d` and 32 `i8`s,
    /// weight = `d · q`, `d = max|w| / 127` (8.5 bits a weight). Needs rows (`n_embd`, the MLP
    /// width) that are multiples of 32.
    Q8_0,
}

impl GgufType {
    /// llama.cpp's `general.file_type` (`enum llama_ftype`): all F32, mostly F16, mostly Q8_0.
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q8_0 => 7,
        }
    }

    /// The lower-case name llama.cpp uses (`f32`, `f16`, `q8_0`).
    pub fn name(self) -> &'static str {
        match self {
            GgufType::F32 => "f32",
            GgufType::F16 => "f16",
            GgufType::Q8_0 => "q8_0",
        }
    }
}

impl std::str::FromStr for GgufType {
    type Err = Error;

    /// `f32`, `f16` or `q8_0` (any case).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(GgufType::F32),
            "f16" => Ok(GgufType::F16),
            "q8_0" | "q8" => Ok(GgufType::Q8_0),
            _ => Err(Error::InvalidArgument(format!(
                "unknown GGUF type `{s}`: expected f32, f16 or q8_0"
            ))),
        }
    }
}

impl std::fmt::Display for GgufType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

// --------------------------------------------------------------------------------------------
// Names: tinygpt's (Hugging Face's) and llama.cpp's
// --------------------------------------------------------------------------------------------

/// How a tensor is laid out on each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A row-major matrix the same way round on both sides (the embeddings, `(rows, C)`).
    Rows,
    /// A `Conv1D` weight: `(in, out)` in tinygpt, `(out, in)` in GGUF.
    Conv1D,
    /// A vector (norm weight or bias): F32 in every file.
    Vector,
}

/// One tensor of a GPT-2: llama.cpp's name, tinygpt's, its layout and tinygpt's shape.
#[derive(Debug, Clone)]
struct Slot {
    gguf: String,
    hf: String,
    kind: Kind,
    /// tinygpt's shape (`(in, out)` for a `Conv1D`).
    shape: Vec<usize>,
    /// For llama.cpp's `llama`: the query or key heads whose rows are permuted from
    /// Hugging Face's rotate-half RoPE layout to ggml's interleaved one.
    heads: Option<usize>,
}

/// A Llama-style model's llama.cpp architecture: `llama` (interleaved RoPE: q/k rows
/// permuted), `qwen2` (q/k/v biases) or `qwen3` (q/k norms), the last two with Hugging Face's
/// rotate-half RoPE as it is.
fn llama_arch(cfg: &GptConfig) -> Result<&'static str> {
    match (cfg.qkv_bias, cfg.qk_norm, cfg.bias) {
        (_, _, true) => Err(Error::InvalidArgument(
            "GGUF export of a Llama-style model with biases on every projection is not \
             supported (llama.cpp's llama, qwen2 and qwen3 have none on the MLP)"
                .into(),
        )),
        (false, false, false) => Ok("llama"),
        (true, false, false) => Ok("qwen2"),
        (false, true, false) => Ok("qwen3"),
        (true, true, false) => Err(Error::InvalidArgument(
            "GGUF export of a Llama-style model with both q/k/v biases and q/k norms is not \
             supported"
                .into(),
        )),
    }
}

/// llama.cpp's name of a Llama-style model's tensor (Hugging Face's name `hf`).
fn llama_gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let name = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{name}.{suffix}"))
}

/// Every tensor of a Llama-style model, in tinygpt's order, with llama.cpp's names.
fn llama_slots(cfg: &GptConfig, arch: &str) -> Vec<Slot> {
    cfg.parameter_shapes()
        .into_iter()
        .filter_map(|(hf, shape)| {
            let gguf = llama_gguf_name(&hf)?;
            let heads = if arch != "llama" {
                None
            } else if hf.contains("self_attn.q_proj") {
                Some(cfg.n_head)
            } else if hf.contains("self_attn.k_proj") {
                Some(cfg.n_kv_heads())
            } else {
                None
            };
            let kind = if shape.len() == 2 {
                Kind::Rows
            } else {
                Kind::Vector
            };
            Some(Slot {
                gguf,
                hf,
                kind,
                shape,
                heads,
            })
        })
        .collect()
}

/// Permutes the rows of `v` (`rows` of `cols`) within each of `heads` heads between Hugging
/// Face's rotate-half RoPE layout (a head's first half pairs with its second) and ggml's
/// interleaved one (row pairs `2j, 2j + 1`), as llama.cpp's converter does (`permute` in
/// `convert_hf_to_gguf.py`); `inverse` undoes it.
fn permute_heads(v: &[f32], rows: usize, cols: usize, heads: usize, inverse: bool) -> Vec<f32> {
    let hs = rows / heads.max(1);
    let half = hs / 2;
    let mut out = vec![0f32; v.len()];
    for h in 0..heads {
        for j in 0..half {
            for k in 0..2 {
                let ggml = h * hs + 2 * j + k;
                let hf = h * hs + k * half + j;
                let (to, from) = if inverse { (hf, ggml) } else { (ggml, hf) };
                out[to * cols..(to + 1) * cols].copy_from_slice(&v[from * cols..(from + 1) * cols]);
            }
        }
    }
    out
}

/// Every tensor of a GPT-2 with biases, in file order (llama.cpp's converter's order).
fn gpt2_slots(cfg: &GptConfig) -> Vec<Slot> {
    let (c, v, f) = (cfg.n_embd, cfg.vocab_size, cfg.mlp_hidden());
    let slot = |gguf: String, hf: String, kind: Kind, shape: Vec<usize>| Slot {
        gguf,
        hf,
        kind,
        shape,
        heads: None,
    };
    let mut out = vec![
        slot(
            "token_embd.weight".into(),
            "transformer.wte.weight".into(),
            Kind::Rows,
            vec![v, c],
        ),
        slot(
            "position_embd.weight".into(),
            "transformer.wpe.weight".into(),
            Kind::Rows,
            vec![cfg.block_size, c],
        ),
    ];
    /// (llama.cpp's name, HF's, `(in, out)` of a projection or `None` for a norm).
    type GgufPart = (&'static str, &'static str, Option<(usize, usize)>);
    for i in 0..cfg.n_layer {
        let (b, h) = (format!("blk.{i}"), format!("transformer.h.{i}"));
        // Each entry is a weight and its bias, in the converter's order.
        let parts: [GgufPart; 6] = [
            ("attn_norm", "ln_1", None),
            ("attn_qkv", "attn.c_attn", Some((c, 3 * c))),
            ("attn_output", "attn.c_proj", Some((c, c))),
            ("ffn_norm", "ln_2", None),
            ("ffn_up", "mlp.c_fc", Some((c, f))),
            ("ffn_down", "mlp.c_proj", Some((f, c))),
        ];
        for (g, n, dims) in parts {
            let (kind, shape, len) = match dims {
                Some((d_in, d_out)) => (Kind::Conv1D, vec![d_in, d_out], d_out),
                None => (Kind::Vector, vec![c], c),
            };
            out.push(slot(
                format!("{b}.{g}.weight"),
                format!("{h}.{n}.weight"),
                kind,
                shape,
            ));
            out.push(slot(
                format!("{b}.{g}.bias"),
                format!("{h}.{n}.bias"),
                Kind::Vector,
                vec![len],
            ));
        }
    }
    out.push(slot(
        "output_norm.weight".into(),
        "transformer.ln_f.weight".into(),
        Kind::Vector,
        vec![c],
    ));
    out.push(slot(
        "output_norm.bias".into(),
        "transformer.ln_f.bias".into(),
        Kind::Vector,
        vec![c],
    ));
    out
}

/// The shape a slot has in GGUF, row-major (`(out, in)` for a `Conv1D`).
fn gguf_shape(s: &Slot) -> Vec<usize> {
    match s.kind {
        Kind::Conv1D => s.shape.iter().rev().copied().collect(),
        _ => s.shape.clone(),
    }
}

// --------------------------------------------------------------------------------------------
// Writing
// --------------------------------------------------------------------------------------------

/// A metadata value as tinygpt writes it.
#[derive(Debug, Clone)]
enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    /// An array of strings (typed even when empty, as llama.cpp checks).
    Strs(Vec<String>),
    I32s(Vec<i32>),
}

/// GGUF's value type ids (`enum gguf_type`).
fn meta_type(m: &Meta) -> u32 {
    match m {
        Meta::U32(_) => 4,
        Meta::F32(_) => 6,
        Meta::Bool(_) => 7,
        Meta::Str(_) => 8,
        Meta::Strs(_) | Meta::I32s(_) => 9,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_meta(out: &mut Vec<u8>, m: &Meta) {
    match m {
        Meta::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Meta::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Meta::Bool(v) => out.push(u8::from(*v)),
        Meta::Str(s) => put_str(out, s),
        Meta::Strs(v) => {
            out.extend_from_slice(&8u32.to_le_bytes());
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for s in v {
                put_str(out, s);
            }
        }
        Meta::I32s(v) => {
            out.extend_from_slice(&5u32.to_le_bytes());
            out.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for x in v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// One tensor to write: GGUF name, row-major dims, ggml type, data bytes.
struct OutTensor {
    name: String,
    dims: Vec<usize>,
    ggml_type: u32,
    data: Vec<u8>,
}

/// Writes a GGUF v3 file: header, metadata, tensor infos, padding, data (each tensor padded
/// to [`ALIGNMENT`]), through a temporary sibling renamed into place once synced, so a crash
/// or an error leaves any earlier file at `path` as it was.
fn write_file(path: &Path, meta: &[(String, Meta)], tensors: &[OutTensor]) -> Result<()> {
    let dir = crate::durable::parent_of(path);
    if !dir.is_dir() {
        return Err(Error::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("its directory {} does not exist", dir.display()),
            ),
        ));
    }
    let mut head = Vec::new();
    head.extend_from_slice(&MAGIC.to_le_bytes());
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    head.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (key, value) in meta {
        put_str(&mut head, key);
        head.extend_from_slice(&meta_type(value).to_le_bytes());
        put_meta(&mut head, value);
    }
    let pad = |n: u64| n.div_ceil(ALIGNMENT) * ALIGNMENT;
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut head, &t.name);
        head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for &d in t.dims.iter().rev() {
            head.extend_from_slice(&(d as u64).to_le_bytes()); // ne[0] is the fastest dim
        }
        head.extend_from_slice(&t.ggml_type.to_le_bytes());
        head.extend_from_slice(&offset.to_le_bytes());
        offset = pad(offset + t.data.len() as u64);
    }
    head.resize(pad(head.len() as u64) as usize, 0);

    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = crate::durable::parent_of(path).join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let io = |e| Error::io(&tmp, e);
        let mut w = BufWriter::new(File::create(&tmp).map_err(io)?);
        w.write_all(&head).map_err(io)?;
        for t in tensors {
            w.write_all(&t.data).map_err(io)?;
            let end = w.stream_position().map_err(io)?;
            w.write_all(&vec![0u8; (pad(end) - end) as usize])
                .map_err(io)?;
        }
        let f = w.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        crate::durable::sync_dir(&crate::durable::parent_of(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// GPT-2's byte-to-unicode table (`bytes_to_unicode` in OpenAI's encoder.py): the printable
/// bytes map to themselves, the others to code points from 256 up, in byte order.
fn byte_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in table.iter_mut().enumerate() {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || b >= 174;
        let code = if printable {
            b as u32
        } else {
            next += 1;
            next - 1
        };
        *slot = char::from_u32(code).unwrap_or('\u{FFFD}');
    }
    table
}

/// A string's UTF-8 bytes in GPT-2's byte-level alphabet.
fn byte_level(s: &str, table: &[char; 256]) -> String {
    s.bytes().map(|b| table[b as usize]).collect()
}

/// What a GGUF carries of a tokenizer: tokens by id, their types, merges.
struct Vocab {
    tokens: Vec<String>,
    types: Vec<i32>,
    merges: Vec<String>,
}

/// The tokenizer's vocabulary in llama.cpp's `gpt2` form, padded to `vocab_size` rows with
/// unused `[PAD{id}]` tokens (a model with rows reserved for tokens to come).
fn gguf_vocab(tokenizer: &Tokenizer, vocab_size: usize) -> Result<Vocab> {
    let json: serde_json::Value = serde_json::from_str(&tokenizer.to_json(false)?)
        .map_err(|e| Error::Tokenizer(format!("tokenizer JSON: {e}")))?;
    let n = tokenizer.vocab_size();
    if n > vocab_size {
        return Err(Error::InvalidArgument(format!(
            "the tokenizer has {n} tokens but the model only {vocab_size} rows"
        )));
    }
    let table = byte_to_unicode();
    let mut tokens = vec![String::new(); vocab_size];
    let mut types = vec![TOKEN_UNUSED; vocab_size];
    let mut merges = Vec::new();
    let char_level = tokenizer.kind() == TokenizerKind::Char;
    for id in 0..n as u32 {
        let token = tokenizer
            .id_to_token(id)
            .ok_or_else(|| Error::Tokenizer(format!("token id {id} of {n} has no token string")))?;
        let special = tokenizer.is_special(id);
        tokens[id as usize] = if char_level && !special {
            let bytes = byte_level(&token, &table);
            // Merges that rebuild this character from its bytes, left to right (llama.cpp
            // looks pairs up by rank; the partial strings need not be tokens).
            let chars: Vec<char> = bytes.chars().collect();
            for k in 1..chars.len() {
                let left: String = chars[..k].iter().collect();
                merges.push(format!("{left} {}", chars[k]));
            }
            bytes
        } else {
            token
        };
        types[id as usize] = if special { TOKEN_CONTROL } else { TOKEN_NORMAL };
    }
    for (id, t) in tokens.iter_mut().enumerate().skip(n) {
        *t = format!("[PAD{id}]");
    }
    if !char_level {
        match json.pointer("/model/merges").and_then(|m| m.as_array()) {
            Some(list) => {
                for m in list {
                    match m {
                        serde_json::Value::String(s) => merges.push(s.clone()),
                        serde_json::Value::Array(pair) if pair.len() == 2 => {
                            let part = |i: usize| pair[i].as_str().unwrap_or_default();
                            merges.push(format!("{} {}", part(0), part(1)));
                        }
                        _ => {
                            return Err(Error::Tokenizer(format!(
                                "tokenizer merge {m} is neither \"a b\" nor [\"a\", \"b\"]"
                            )))
                        }
                    }
                }
            }
            None => {
                return Err(Error::InvalidArgument(
                    "GGUF export takes a char or byte-level BPE tokenizer; this one has no \
                     BPE merges"
                        .into(),
                ))
            }
        }
    }
    Ok(Vocab {
        tokens,
        types,
        merges,
    })
}

/// Writes `model` with `tokenizer` to `path` as a GGUF v3 file that llama.cpp loads
/// (`llama-cli -m`, `llama-server -m`, `llama-bench -m`), its weight matrices in `dtype`.
/// See the module docs for the layout. The file is written whole to a temporary sibling and
/// renamed into place.
///
/// # Errors
/// [`Error::InvalidArgument`] for a model that is not a GPT-2 ([`Arch::Gpt2`]), carries a LoRA
/// adapter, or is quantized already; for Q8_0, rows that are not multiples of 32; for a
/// tokenizer with more tokens than the model has rows, or neither char nor BPE.
/// [`Error::Io`] naming the file.
pub fn save_gguf(
    model: &Gpt,
    tokenizer: &Tokenizer,
    path: impl AsRef<Path>,
    dtype: GgufType,
) -> Result<()> {
    let path = path.as_ref();
    let cfg = model.config();
    let arch = match cfg.arch {
        Arch::Gpt2 => "gpt2",
        Arch::Llama => llama_arch(cfg)?,
    };
    if cfg.arch == Arch::Gpt2 && !cfg.tie_word_embeddings {
        return Err(Error::InvalidArgument(
            "GGUF export of a GPT-2 with an untied head is not supported".into(),
        ));
    }
    if dtype == GgufType::Q8_0
        && (!cfg.n_embd.is_multiple_of(32) || !cfg.mlp_hidden().is_multiple_of(32))
    {
        return Err(Error::InvalidArgument(format!(
            "Q8_0 quantizes rows in blocks of 32: n_embd {} (and the MLP width {}) must be \
             multiples of 32; export f16 or f32 instead",
            cfg.n_embd,
            cfg.mlp_hidden()
        )));
    }
    let weights = model.tensors_f32()?;
    let vocab = gguf_vocab(tokenizer, cfg.vocab_size)?;
    let chat = ChatTemplate::new(tokenizer).ok();
    let eot = tokenizer.eot_id();
    let eos = chat.map(|c| c.end_id()).unwrap_or(eot);

    let key = |k: &str| format!("{arch}.{k}");
    let mut meta: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Meta::Str(arch.into())),
        ("general.name".into(), Meta::Str(model_name(path))),
        ("general.file_type".into(), Meta::U32(dtype.file_type())),
        (key("context_length"), Meta::U32(u32_of(cfg.block_size)?)),
        (key("embedding_length"), Meta::U32(u32_of(cfg.n_embd)?)),
        (
            key("feed_forward_length"),
            Meta::U32(u32_of(cfg.mlp_hidden())?),
        ),
        (key("block_count"), Meta::U32(u32_of(cfg.n_layer)?)),
        (key("attention.head_count"), Meta::U32(u32_of(cfg.n_head)?)),
    ];
    if cfg.arch == Arch::Gpt2 {
        meta.push((
            key("attention.layer_norm_epsilon"),
            Meta::F32(cfg.norm_eps as f32),
        ));
    } else {
        let hs = u32_of(cfg.head_size())?;
        meta.extend([
            (
                key("attention.head_count_kv"),
                Meta::U32(u32_of(cfg.n_kv_heads())?),
            ),
            (
                key("attention.layer_norm_rms_epsilon"),
                Meta::F32(cfg.norm_eps as f32),
            ),
            (key("attention.key_length"), Meta::U32(hs)),
            (key("attention.value_length"), Meta::U32(hs)),
            (key("rope.freq_base"), Meta::F32(cfg.rope_theta as f32)),
            (key("rope.dimension_count"), Meta::U32(hs)),
        ]);
    }
    if dtype == GgufType::Q8_0 {
        meta.push(("general.quantization_version".into(), Meta::U32(2)));
    }
    let tokenizer_meta = [
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str("gpt-2".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(vocab.tokens)),
        ("tokenizer.ggml.token_type", Meta::I32s(vocab.types)),
        ("tokenizer.ggml.merges", Meta::Strs(vocab.merges)),
        ("tokenizer.ggml.bos_token_id", Meta::U32(eot)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(eos)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(false)),
        ("tokenizer.ggml.add_eos_token", Meta::Bool(false)),
    ];
    meta.extend(tokenizer_meta.into_iter().map(|(k, v)| (k.to_string(), v)));
    if chat.is_some() {
        meta.push(("tokenizer.ggml.eot_token_id".into(), Meta::U32(eos)));
        meta.push((
            "tokenizer.chat_template".into(),
            Meta::Str(ChatTemplate::JINJA.into()),
        ));
    }

    let slots = match cfg.arch {
        Arch::Gpt2 => gpt2_slots(cfg),
        Arch::Llama => llama_slots(cfg, arch),
    };
    let mut tensors = Vec::new();
    for s in slots {
        let t = match weights.get(&s.hf) {
            Some(t) => t.clone(),
            // A GPT-2 without biases: llama.cpp's gpt2 wants them, zero.
            None if s.kind == Kind::Vector && s.hf.ends_with(".bias") => {
                Tensor::zeros(s.shape.as_slice(), DType::F32, &Device::Cpu)?
            }
            None => {
                return Err(Error::MissingTensor {
                    name: s.hf.clone(),
                    path: None,
                })
            }
        };
        let t = match s.kind {
            Kind::Conv1D => t.t()?.contiguous()?, // (in, out) → (out, in)
            _ => t,
        };
        let dims = t.dims().to_vec();
        let mut values = t.flatten_all()?.to_vec1::<f32>()?;
        if let Some(heads) = s.heads {
            let cols = dims.get(1).copied().unwrap_or(1);
            values = permute_heads(&values, dims[0], cols, heads, false);
        }
        // The position embedding is looked up, never multiplied: F32 in a Q8_0 file, as in
        // [`Gpt::quantize`], so the file decodes as the quantized model does.
        let position = s.gguf == "position_embd.weight";
        let (ggml_type, data) = match (s.kind, dtype) {
            (Kind::Vector, _) | (_, GgufType::F32) => (GGML_F32, f32_bytes(&values)),
            (_, GgufType::Q8_0) if position => (GGML_F32, f32_bytes(&values)),
            (_, GgufType::F16) => (GGML_F16, f16_bytes(&values)),
            (_, GgufType::Q8_0) => {
                let (rows, cols) = (dims[0], dims[1]);
                if !cols.is_multiple_of(32) {
                    return Err(Error::InvalidArgument(format!(
                        "Q8_0 quantizes rows in blocks of 32: `{}` has rows of {cols}; export \
                         f16 or f32 instead",
                        s.hf
                    )));
                }
                let q = Q8Matrix::quantize(&values, rows, cols)?;
                (GGML_Q8_0, q.to_blocks())
            }
        };
        tensors.push(OutTensor {
            name: s.gguf,
            dims,
            ggml_type,
            data,
        });
    }
    write_file(path, &meta, &tensors)
}

/// The file's stem, as `general.name`.
fn model_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "tinygpt".into())
}

fn u32_of(n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::InvalidArgument(format!("{n} does not fit GGUF's u32")))
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter()
        .flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes())
        .collect()
}

// --------------------------------------------------------------------------------------------
// Reading
// --------------------------------------------------------------------------------------------

/// A GGUF file's header, read and checked: where it is, its metadata and tensor table.
struct Header {
    path: PathBuf,
    file_size: u64,
    content: Content,
}

impl Header {
    fn read(path: &Path) -> Result<(Self, File)> {
        let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
        let meta = file.metadata().map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            return Err(gguf_err(path, "is a directory, not a GGUF file".into()));
        }
        let file_size = meta.len();
        if file_size < 24 {
            return Err(gguf_err(
                path,
                format!("{file_size} bytes: too short for a GGUF header (24 bytes: magic, version, counts)"),
            ));
        }
        let content = Content::read(&mut file).map_err(|e| {
            let msg = e.to_string();
            let msg = if msg.contains("failed to fill whole buffer") {
                "the header ends early (truncated file)".to_string()
            } else {
                msg
            };
            gguf_err(path, msg)
        })?;
        Ok((
            Self {
                path: path.to_path_buf(),
                file_size,
                content,
            },
            file,
        ))
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        gguf_err(&self.path, msg.into())
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| self.err(format!("metadata key `{key}` is missing")))
    }

    fn string(&self, key: &str) -> Result<String> {
        match self.get(key)? {
            Value::String(s) => Ok(s.clone()),
            v => Err(self.err(format!(
                "metadata `{key}` is {:?}, expected a string",
                v.value_type()
            ))),
        }
    }

    /// An unsigned count; any integer type is accepted, as llama.cpp's converter writes u32.
    fn count(&self, key: &str) -> Result<usize> {
        let v = self.get(key)?;
        let n = match v {
            Value::U8(x) => Some(*x as u64),
            Value::U16(x) => Some(*x as u64),
            Value::U32(x) => Some(*x as u64),
            Value::U64(x) => Some(*x),
            Value::I8(x) => u64::try_from(*x).ok(),
            Value::I16(x) => u64::try_from(*x).ok(),
            Value::I32(x) => u64::try_from(*x).ok(),
            Value::I64(x) => u64::try_from(*x).ok(),
            _ => None,
        };
        n.and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| self.err(format!("metadata `{key}` is {v:?}, expected a count")))
    }

    fn float(&self, key: &str) -> Result<f64> {
        match self.get(key)? {
            // The f64 of the shortest decimal that reads back as this f32 (1e-5, not
            // 9.99999974e-6): what was written as an f64 and rounded comes back the same.
            Value::F32(x) => Ok(x.to_string().parse::<f64>().unwrap_or(*x as f64)),
            Value::F64(x) => Ok(*x),
            v => Err(self.err(format!("metadata `{key}` is {v:?}, expected a float"))),
        }
    }

    fn strings(&self, key: &str) -> Result<Vec<String>> {
        match self.get(key)? {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(self.err(format!(
                        "metadata `{key}`[{i}] is {:?}, expected a string",
                        v.value_type()
                    ))),
                })
                .collect(),
            v => Err(self.err(format!(
                "metadata `{key}` is {:?}, expected an array",
                v.value_type()
            ))),
        }
    }

    /// Tensor `name`'s raw bytes, after checking its dims against `shape` (row-major), its
    /// type against the ones tinygpt reads, and its byte range against the file.
    fn tensor_bytes(
        &self,
        file: &mut File,
        name: &str,
        shape: &[usize],
    ) -> Result<(GgmlDType, Vec<u8>)> {
        let info = self
            .content
            .tensor_infos
            .get(name)
            .ok_or_else(|| Error::MissingTensor {
                name: name.to_string(),
                path: Some(self.path.clone()),
            })?;
        if info.shape.dims() != shape {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: info.shape.dims().to_vec(),
                path: Some(self.path.clone()),
            });
        }
        let dtype = info.ggml_dtype;
        let elems = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let bytes = match (dtype, elems) {
            (GgmlDType::F32, Some(n)) => n.checked_mul(4),
            (GgmlDType::F16, Some(n)) => n.checked_mul(2),
            (GgmlDType::Q8_0, Some(n)) if n % 32 == 0 => (n / 32).checked_mul(34),
            (GgmlDType::Q8_0, Some(_)) => {
                return Err(self.err(format!(
                    "tensor `{name}` is Q8_0 but its rows of {} are not whole blocks of 32",
                    shape.last().copied().unwrap_or(0)
                )))
            }
            (other, _) => {
                return Err(self.err(format!(
                    "tensor `{name}` is {other:?}: tinygpt reads F32, F16 and Q8_0 tensors"
                )))
            }
        }
        .ok_or_else(|| self.err(format!("tensor `{name}`: {shape:?} overflows")))?;
        let start = self.content.tensor_data_offset.checked_add(info.offset);
        let end = start.and_then(|s| s.checked_add(bytes as u64));
        match end {
            Some(end) if end <= self.file_size => {}
            _ => {
                return Err(self.err(format!(
                    "tensor `{name}` ({bytes} bytes at offset {}) runs past the end of the \
                     {}-byte file (truncated?)",
                    info.offset, self.file_size
                )))
            }
        }
        let q = info
            .read(file, self.content.tensor_data_offset, &Device::Cpu)
            .map_err(|e| self.err(format!("tensor `{name}`: {e}")))?;
        let data = q
            .data()
            .map_err(|e| self.err(format!("tensor `{name}`: {e}")))?
            .into_owned();
        Ok((dtype, data))
    }
}

/// Checks a config read from metadata against what the file can hold, before anything is
/// sized by it: `n_layer` blocks need more tensors than that, `n_embd` must be the token
/// embedding's width, and a context beyond 2^24 positions is refused (a RoPE table or a KV
/// cache sized by a hostile count would be allocated before any tensor disagreed).
fn check_sizes(
    h: &Header,
    n_layer: usize,
    n_embd: usize,
    embd_width: usize,
    block_size: usize,
) -> Result<()> {
    let tensors = h.content.tensor_infos.len();
    if n_layer == 0 || n_layer > tensors {
        return Err(h.err(format!(
            "block_count {n_layer} does not fit a file of {tensors} tensors"
        )));
    }
    if n_embd != embd_width {
        return Err(h.err(format!(
            "embedding_length {n_embd} but token_embd.weight is {embd_width} wide"
        )));
    }
    if block_size == 0 || block_size > 1 << 24 {
        return Err(h.err(format!(
            "context_length {block_size}: tinygpt reads contexts of 1 to 2^24 positions"
        )));
    }
    Ok(())
}

fn gguf_err(path: &Path, msg: String) -> Error {
    Error::Gguf {
        path: path.to_path_buf(),
        msg,
    }
}

/// The config a `gpt2` GGUF's metadata describes, checked ([`GptConfig::validate`]).
fn gpt2_config(h: &Header) -> Result<GptConfig> {
    let arch = h.string("general.architecture")?;
    if arch != "gpt2" {
        return Err(h.err(format!(
            "architecture `{arch}`: tinygpt reads llama.cpp's gpt2 architecture"
        )));
    }
    let (vocab_size, width) = match h.content.tensor_infos.get("token_embd.weight") {
        Some(info) => match info.shape.dims() {
            [v, c] => (*v, *c),
            d => return Err(h.err(format!("token_embd.weight has dims {d:?}, expected 2"))),
        },
        None => {
            return Err(Error::MissingTensor {
                name: "token_embd.weight".into(),
                path: Some(h.path.clone()),
            })
        }
    };
    let n_embd = h.count("gpt2.embedding_length")?;
    check_sizes(
        h,
        h.count("gpt2.block_count")?,
        n_embd,
        width,
        h.count("gpt2.context_length")?,
    )?;
    let cfg = GptConfig {
        vocab_size,
        block_size: h.count("gpt2.context_length")?,
        n_layer: h.count("gpt2.block_count")?,
        n_head: h.count("gpt2.attention.head_count")?,
        n_embd,
        dropout: 0.0,
        bias: true,
        norm_eps: h.float("gpt2.attention.layer_norm_epsilon")?,
        intermediate_size: match h.count("gpt2.feed_forward_length")? {
            f if f == 4 * n_embd => None,
            f => Some(f),
        },
        ..GptConfig::gpt2_124m()
    };
    cfg.validate()
        .map_err(|e| h.err(format!("metadata: {e}")))?;
    Ok(cfg)
}

impl Gpt {
    /// Reads a GPT-2 from a GGUF file (llama.cpp's `gpt2` architecture: one tinygpt wrote with
    /// [`save_gguf`], or llama.cpp's `convert_hf_to_gguf.py` made from a Hugging Face GPT-2)
    /// onto `device`, its weights in the file's type: F32 and F16 matrices as tensors of
    /// that dtype, Q8_0 ones as 8-bit matrices that decoding multiplies without widening
    /// them first (Q8_0 token-embedding rows are widened as they are looked up). F32 and F16
    /// matrices keep ggml's `(out, in)` rows, seen as Hugging Face's `(in, out)` through a
    /// transposed view: decoding then dots each output's weights, contiguous, with the
    /// activations, as llama.cpp does (GPT-2 124M in F16 on 2 cores: 151 tokens/s for 140
    /// with the matrices copied to `(in, out)`; BENCHMARKS.md).
    ///
    /// # Errors
    /// [`Error::Gguf`] naming the file and the problem: not GGUF (magic), an unknown version,
    /// a truncated file, counts or lengths larger than the file, an architecture other than
    /// gpt2, missing or ill-typed metadata, a tensor type tinygpt does not read, tensor data
    /// past the end; [`Error::ShapeMismatch`] / [`Error::MissingTensor`] for tensors that do
    /// not match the metadata's config; [`Error::Io`] naming the file.
    pub fn from_gguf(path: impl AsRef<Path>, device: &Device) -> Result<Gpt> {
        let path = path.as_ref();
        let (h, mut file) = Header::read(path)?;
        let arch = h.string("general.architecture")?;
        if matches!(arch.as_str(), "llama" | "qwen2" | "qwen3") {
            return llama_from_gguf(&h, &mut file, &arch, device);
        }
        let cfg = gpt2_config(&h)?;
        let slots = gpt2_slots(&cfg);
        let expected: std::collections::HashSet<&str> =
            slots.iter().map(|s| s.gguf.as_str()).collect();
        if let Some(extra) = h
            .content
            .tensor_infos
            .keys()
            .filter(|k| !expected.contains(k.as_str()) && k.as_str() != "output.weight")
            .min()
        {
            return Err(h.err(format!(
                "unexpected tensor `{extra}`: not part of the gpt2 model its metadata describes \
                 ({} layers)",
                cfg.n_layer
            )));
        }
        crate::memory::check_fits(&cfg, false, 1, DType::F16, device)?;
        let mut dense: HashMap<String, Tensor> = HashMap::new();
        let mut quantized: HashMap<String, Q8Matrix> = HashMap::new();
        let mut dtypes = Vec::new();
        for s in &slots {
            let shape = gguf_shape(s);
            let (dtype, data) = h.tensor_bytes(&mut file, &s.gguf, &shape)?;
            if s.kind != Kind::Vector {
                dtypes.push(dtype);
            }
            match dtype {
                GgmlDType::Q8_0 => {
                    let m = Q8Matrix::from_blocks(&data, shape[0], shape[1])
                        .map_err(|e| h.err(format!("tensor `{}`: {e}", s.gguf)))?;
                    if s.gguf == "position_embd.weight" {
                        // Looked up, never multiplied: widened once.
                        let t =
                            Tensor::from_vec(m.dequantize(), (shape[0], shape[1]), &Device::Cpu)?;
                        dense.insert(s.hf.clone(), t);
                    } else {
                        quantized.insert(s.hf.clone(), m);
                    }
                }
                _ => {
                    let dt = if dtype == GgmlDType::F16 {
                        DType::F16
                    } else {
                        DType::F32
                    };
                    let t = Tensor::from_raw_buffer(&data, dt, &shape, &Device::Cpu)?;
                    let t = match s.kind {
                        Kind::Conv1D => t.t()?, // (out, in) viewed as (in, out)
                        _ => t,
                    };
                    dense.insert(s.hf.clone(), t);
                }
            }
        }
        if h.content.tensor_infos.contains_key("output.weight") {
            // An untied head: only when it equals the embedding can tinygpt's tied GPT-2 take it.
            let shape = [cfg.vocab_size, cfg.n_embd];
            let (_, head) = h.tensor_bytes(&mut file, "output.weight", &shape)?;
            let (_, embd) = h.tensor_bytes(&mut file, "token_embd.weight", &shape)?;
            if head != embd {
                return Err(h.err(
                    "output.weight differs from token_embd.weight: tinygpt's GPT-2 ties its head \
                     to the token embedding",
                ));
            }
        }
        // One dtype for the dense matrices: the file's (F16 when any is F16).
        let dense_dtype = if dtypes.contains(&GgmlDType::F16) {
            DType::F16
        } else {
            DType::F32
        };
        let dense = dense
            .into_iter()
            .map(|(n, t)| {
                let t = if t.rank() == 2 {
                    t.to_dtype(dense_dtype)?
                } else {
                    t
                };
                Ok((n, t.to_device(device)?))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        if quantized.is_empty() {
            return Gpt::from_tensors(&cfg, dense, false);
        }
        Gpt::from_q8_parts(&cfg, dense, quantized, device)
    }
}

/// The config a `llama`, `qwen2` or `qwen3` GGUF's metadata describes, checked.
fn llama_config(h: &Header, arch: &str) -> Result<GptConfig> {
    let key = |k: &str| format!("{arch}.{k}");
    let (vocab_size, n_embd) = match h.content.tensor_infos.get("token_embd.weight") {
        Some(info) => match info.shape.dims() {
            [v, c] => (*v, *c),
            d => return Err(h.err(format!("token_embd.weight has dims {d:?}, expected 2"))),
        },
        None => {
            return Err(Error::MissingTensor {
                name: "token_embd.weight".into(),
                path: Some(h.path.clone()),
            })
        }
    };
    check_sizes(
        h,
        h.count(&key("block_count"))?,
        n_embd,
        n_embd,
        h.count(&key("context_length"))?,
    )?;
    let n_head = h.count(&key("attention.head_count"))?;
    let n_kv = match h.get(&key("attention.head_count_kv")) {
        Ok(_) => h.count(&key("attention.head_count_kv"))?,
        Err(_) => n_head,
    };
    let hs = match h.get(&key("attention.key_length")) {
        Ok(_) => h.count(&key("attention.key_length"))?,
        Err(_) => n_embd / n_head.max(1),
    };
    let rope_theta = match h.get(&key("rope.freq_base")) {
        Ok(_) => h.float(&key("rope.freq_base"))?,
        Err(_) => 10_000.0,
    };
    let cfg = GptConfig {
        vocab_size,
        block_size: h.count(&key("context_length"))?,
        n_layer: h.count(&key("block_count"))?,
        n_head,
        n_embd,
        dropout: 0.0,
        bias: false,
        arch: Arch::Llama,
        n_kv_head: Some(n_kv),
        head_dim: (hs * n_head != n_embd).then_some(hs),
        intermediate_size: Some(h.count(&key("feed_forward_length"))?),
        rope_theta,
        norm_eps: h.float(&key("attention.layer_norm_rms_epsilon"))?,
        tie_word_embeddings: !h.content.tensor_infos.contains_key("output.weight"),
        qkv_bias: arch == "qwen2",
        qk_norm: arch == "qwen3",
    };
    cfg.validate()
        .map_err(|e| h.err(format!("metadata: {e}")))?;
    Ok(cfg)
}

/// [`Gpt::from_gguf`] for llama.cpp's `llama`, `qwen2` and `qwen3`: dense tensors (a Q8_0
/// matrix is widened to f32: tinygpt decodes 8-bit weights for GPT-2s only), q/k rows of a
/// `llama` permuted back to Hugging Face's rotate-half layout.
fn llama_from_gguf(h: &Header, file: &mut File, arch: &str, device: &Device) -> Result<Gpt> {
    let cfg = llama_config(h, arch)?;
    let slots = llama_slots(&cfg, arch);
    if let Some(extra) = h
        .content
        .tensor_infos
        .keys()
        .filter(|k| !slots.iter().any(|s| &s.gguf == *k) && !k.starts_with("rope_"))
        .min()
    {
        return Err(h.err(format!(
            "unexpected tensor `{extra}`: not part of the {arch} model its metadata describes"
        )));
    }
    crate::memory::check_fits(&cfg, false, 1, DType::F16, device)?;
    let mut tensors = HashMap::new();
    let mut any_f16 = false;
    for s in &slots {
        let (dtype, data) = h.tensor_bytes(file, &s.gguf, &s.shape)?;
        let mut t = match dtype {
            GgmlDType::Q8_0 => {
                let m = Q8Matrix::from_blocks(&data, s.shape[0], s.shape[1])
                    .map_err(|e| h.err(format!("tensor `{}`: {e}", s.gguf)))?;
                Tensor::from_vec(m.dequantize(), s.shape.as_slice(), &Device::Cpu)?
            }
            GgmlDType::F16 => {
                any_f16 |= s.kind != Kind::Vector;
                Tensor::from_raw_buffer(&data, DType::F16, &s.shape, &Device::Cpu)?
            }
            _ => Tensor::from_raw_buffer(&data, DType::F32, &s.shape, &Device::Cpu)?,
        };
        if let Some(heads) = s.heads {
            let dt = t.dtype();
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            let cols = s.shape.get(1).copied().unwrap_or(1);
            let v = permute_heads(&v, s.shape[0], cols, heads, true);
            t = Tensor::from_vec(v, s.shape.as_slice(), &Device::Cpu)?.to_dtype(dt)?;
        }
        tensors.insert(s.hf.clone(), t);
    }
    let dtype = if any_f16 { DType::F16 } else { DType::F32 };
    let tensors = tensors
        .into_iter()
        .map(|(n, t)| {
            let t = if t.rank() == 2 { t.to_dtype(dtype)? } else { t };
            Ok((n, t.to_device(device)?))
        })
        .collect::<Result<HashMap<_, _>>>()?;
    Gpt::from_tensors(&cfg, tensors, false)
}

/// The tokenizer of a GGUF file with llama.cpp's `gpt2` tokenizer model: a byte-level BPE
/// with the file's tokens, merges and control tokens (a tinygpt char model's export comes
/// back as a BPE that splits text into the same characters).
///
/// # Errors
/// [`Error::Gguf`] for another tokenizer model or ill-typed metadata; [`Error::Tokenizer`] if
/// the tokens and merges do not make a tokenizer.
pub fn load_gguf_tokenizer(path: impl AsRef<Path>) -> Result<Tokenizer> {
    let path = path.as_ref();
    let (h, _) = Header::read(path)?;
    let model = h.string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(h.err(format!(
            "tokenizer model `{model}`: tinygpt reads llama.cpp's gpt2 (byte-level BPE)"
        )));
    }
    let tokens = h.strings("tokenizer.ggml.tokens")?;
    let merges = h.strings("tokenizer.ggml.merges")?;
    let types: Vec<i64> = match h.get("tokenizer.ggml.token_type") {
        Ok(Value::Array(v)) => v
            .iter()
            .map(|x| match x {
                Value::I32(t) => *t as i64,
                Value::U32(t) => *t as i64,
                _ => TOKEN_NORMAL as i64,
            })
            .collect(),
        _ => vec![TOKEN_NORMAL as i64; tokens.len()],
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (id, t) in tokens.iter().enumerate() {
        let ty = types.get(id).copied().unwrap_or(TOKEN_NORMAL as i64);
        if ty == TOKEN_UNUSED as i64 {
            continue; // padding rows
        }
        vocab.insert(t.clone(), serde_json::json!(id));
        if ty == TOKEN_CONTROL as i64 {
            added.push(serde_json::json!({
                "id": id, "content": t, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true,
            }));
        }
    }
    if !vocab.contains_key(EOT) {
        return Err(h.err(format!("the tokenizer has no {EOT} token")));
    }
    let json = serde_json::json!({
        "version": "1.0",
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    Tokenizer::from_bytes(json.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A tiny GPT-2 (rows of 32, so Q8_0 applies) with a char tokenizer.
    fn tiny() -> (Gpt, Tokenizer) {
        let tokenizer = Tokenizer::train_char("to be or not to be, that is the question").unwrap();
        let cfg = GptConfig {
            vocab_size: tokenizer.vocab_size(),
            block_size: 16,
            n_layer: 2,
            n_head: 2,
            n_embd: 32,
            dropout: 0.0,
            bias: true,
            ..Default::default()
        };
        (Gpt::init(&cfg, 7, &Device::Cpu).unwrap(), tokenizer)
    }

    fn logits(m: &Gpt) -> Vec<f32> {
        let ids = Tensor::new(&[[1u32, 5, 3, 0, 7, 2]], &Device::Cpu).unwrap();
        m.forward(&ids)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    fn written(dtype: GgufType) -> (tempfile::TempDir, PathBuf, Gpt, Tokenizer) {
        let (m, tok) = tiny();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(format!("tiny-{dtype}.gguf"));
        save_gguf(&m, &tok, &path, dtype).unwrap();
        (dir, path, m, tok)
    }

    #[test]
    fn round_trips_in_every_type() {
        for dtype in [GgufType::F32, GgufType::F16, GgufType::Q8_0] {
            let (dir, path, m, tok) = written(dtype);
            let back = Gpt::from_gguf(&path, &Device::Cpu).unwrap();
            assert_eq!(back.config().n_embd, 32);
            assert_eq!(back.config().vocab_size, m.config().vocab_size);
            // The same weights as tinygpt's own conversion to that type: the same logits.
            let expected = match dtype {
                GgufType::F32 => m.clone(),
                GgufType::F16 => m.to_dtype(DType::F16).unwrap(),
                GgufType::Q8_0 => m.quantize().unwrap(),
            };
            assert_eq!(back.is_quantized(), dtype == GgufType::Q8_0);
            let (a, b) = (logits(&back), logits(&expected));
            let diff = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(diff <= 1e-5, "{dtype}: max |diff| {diff}");
            if dtype != GgufType::Q8_0 {
                // The matrices are transposed views of the file's rows: written out again
                // (GGUF, and as tensors for safetensors) they hold the same numbers.
                let again = dir.path().join("again.gguf");
                save_gguf(&back, &tok, &again, dtype).unwrap();
                let twice = Gpt::from_gguf(&again, &Device::Cpu).unwrap();
                assert_eq!(logits(&twice), a, "{dtype}: written again");
                let name = "transformer.h.0.mlp.c_fc.weight";
                let (t, e) = (&back.tensors()[name], &expected.tensors()[name]);
                assert_eq!(t.dims(), e.dims());
                let flat = |t: &Tensor| {
                    let t = t.to_dtype(DType::F32).unwrap();
                    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                };
                assert_eq!(flat(t), flat(e), "{dtype}: {name}");
            }
        }
    }

    #[test]
    fn q8_0_weights_are_ggml_blocks_of_the_model() {
        let (m, _) = tiny();
        let q = m.quantize().unwrap();
        // Widened back, every weight is within half a quantization step of the original.
        let (orig, back) = (m.tensors_f32().unwrap(), q.tensors_f32().unwrap());
        let w = &orig["transformer.h.0.mlp.c_fc.weight"]; // (in 32, out 128)
        let wq = &back["transformer.h.0.mlp.c_fc.weight"];
        let (w, wq) = (
            w.t().unwrap().contiguous().unwrap(),
            wq.t().unwrap().contiguous().unwrap(),
        );
        let (w, wq): (Vec<f32>, Vec<f32>) = (
            w.flatten_all().unwrap().to_vec1().unwrap(),
            wq.flatten_all().unwrap().to_vec1().unwrap(),
        );
        for (row, rowq) in w.chunks(32).zip(wq.chunks(32)) {
            let d = row.iter().fold(0f32, |a, x| a.max(x.abs())) / 127.0;
            for (x, y) in row.iter().zip(rowq) {
                // Half a step, plus the f16 rounding of the scale times |q| <= 127.
                let bound = 0.5 * d + 127.0 * d / 2048.0 + 1e-7;
                assert!((x - y).abs() <= bound, "{x} vs {y}, d {d}");
            }
        }
    }

    #[test]
    fn llama_style_models_round_trip_with_permuted_heads() {
        let tokenizer = Tokenizer::train_char("to be or not to be, that is the question").unwrap();
        for (qkv_bias, qk_norm, arch) in [
            (false, false, "llama"),
            (true, false, "qwen2"),
            (false, true, "qwen3"),
        ] {
            let cfg = GptConfig {
                n_layer: 2,
                block_size: 16,
                qkv_bias,
                qk_norm,
                ..GptConfig::llama_tiny(tokenizer.vocab_size())
            };
            let m = Gpt::init(&cfg, 3, &Device::Cpu).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("llama.gguf");
            save_gguf(&m, &tokenizer, &path, GgufType::F32).unwrap();
            let (h, _) = Header::read(&path).unwrap();
            assert_eq!(h.string("general.architecture").unwrap(), arch);
            let back = Gpt::from_gguf(&path, &Device::Cpu).unwrap();
            assert_eq!(back.config(), m.config(), "{arch}");
            assert_eq!(logits(&back), logits(&m), "{arch}");
        }
    }

    #[test]
    fn permuting_heads_interleaves_the_halves() {
        // One head of 4 rows (1 column): HF [a0 a1 | b0 b1] → ggml [a0 b0 a1 b1].
        let v = [0.0, 1.0, 2.0, 3.0];
        let p = permute_heads(&v, 4, 1, 1, false);
        assert_eq!(p, vec![0.0, 2.0, 1.0, 3.0]);
        assert_eq!(permute_heads(&p, 4, 1, 1, true), v.to_vec());
        let v: Vec<f32> = (0..24).map(|x| x as f32).collect(); // 2 heads × 6 rows × 2 cols
        let p = permute_heads(&v, 12, 2, 2, false);
        assert_eq!(permute_heads(&p, 12, 2, 2, true), v);
    }

    #[test]
    fn the_tokenizer_comes_back() {
        let (_dir, path, _, tok) = written(GgufType::F32);
        let back = load_gguf_tokenizer(&path).unwrap();
        let text = "to be, or not";
        assert_eq!(back.encode(text).unwrap(), tok.encode(text).unwrap());
        assert_eq!(back.eot_id(), tok.eot_id());
    }

    #[test]
    fn refuses_q8_0_rows_that_are_not_whole_blocks() {
        let tokenizer = Tokenizer::train_char("abc").unwrap();
        let cfg = GptConfig {
            vocab_size: tokenizer.vocab_size(),
            block_size: 8,
            n_layer: 1,
            n_head: 2,
            n_embd: 16,
            ..Default::default()
        };
        let m = Gpt::init(&cfg, 1, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let err = save_gguf(&m, &tokenizer, dir.path().join("x.gguf"), GgufType::Q8_0).unwrap_err();
        assert!(err.to_string().contains("multiples of 32"), "{err}");
        assert!(m.quantize().is_err());
    }

    /// Writes `bytes` and reads them as a model; `Err` is the point.
    fn read(bytes: &[u8]) -> Result<Gpt> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hostile.gguf");
        std::fs::write(&path, bytes).unwrap();
        Gpt::from_gguf(&path, &Device::Cpu)
    }

    fn find(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).position(|w| w == needle).unwrap()
    }

    fn expect_err(bytes: &[u8], what: &str) {
        match read(bytes) {
            Ok(_) => panic!("{what}: read as a model"),
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("hostile.gguf"),
                    "{what}: the error names no file: {msg}"
                );
            }
        }
    }

    #[test]
    fn hostile_headers_get_typed_errors() {
        let (_dir, path, _, _) = written(GgufType::F32);
        let good = std::fs::read(&path).unwrap();
        assert!(read(&good).is_ok());

        let mut b = good.clone();
        b[0] = b'X';
        let e = read(&b).unwrap_err();
        assert!(
            matches!(e, Error::Gguf { .. }) && e.to_string().contains("magic"),
            "{e}"
        );

        let mut b = good.clone();
        b[4..8].copy_from_slice(&4u32.to_le_bytes());
        let e = read(&b).unwrap_err();
        assert!(
            e.to_string().contains("version") || e.to_string().contains("4"),
            "{e}"
        );

        let mut b = good.clone();
        b[8..16].copy_from_slice(&(1u64 << 60).to_le_bytes()); // tensor count
        let e = read(&b).unwrap_err();
        assert!(matches!(e, Error::Gguf { .. }), "{e}");

        let mut b = good.clone();
        b[24..32].copy_from_slice(&(1u64 << 60).to_le_bytes()); // the first key's length
        let e = read(&b).unwrap_err();
        assert!(matches!(e, Error::Gguf { .. }), "{e}");

        // An unknown tensor type: the u32 after token_embd.weight's name and its two dims.
        let mut b = good.clone();
        let at = find(&b, b"token_embd.weight") + "token_embd.weight".len() + 4 + 16;
        b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
        let e = read(&b).unwrap_err();
        assert!(matches!(e, Error::Gguf { .. }), "{e}");

        // A known type tinygpt does not read (Q4_0 = 2).
        let mut b = good.clone();
        b[at..at + 4].copy_from_slice(&2u32.to_le_bytes());
        let e = read(&b).unwrap_err();
        assert!(e.to_string().contains("token_embd.weight"), "{e}");

        // Dims that do not match the config: token_embd's width.
        let mut b = good.clone();
        let dims = find(&b, b"token_embd.weight") + "token_embd.weight".len() + 4;
        b[dims..dims + 8].copy_from_slice(&64u64.to_le_bytes());
        let e = read(&b).unwrap_err();
        assert!(e.to_string().contains("token_embd.weight"), "{e}");

        // A dim of 2^60 (the element count overflows): an error, no allocation.
        let mut b = good.clone();
        b[dims..dims + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
        expect_err(&b, "a 2^60 dim");

        // Tensor data past the end.
        let e = read(&good[..good.len() - 100]).unwrap_err();
        assert!(
            e.to_string().contains("past the end") || e.to_string().contains("remaining"),
            "{e}"
        );

        // Another architecture.
        let mut b = good.clone();
        let at = find(&b, b"gpt2");
        b[at..at + 4].copy_from_slice(b"gptX");
        let e = read(&b).unwrap_err();
        assert!(e.to_string().contains("architecture"), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// A count, length or dim anywhere in the header (any 8-byte word) made huge or
        /// arbitrary: an error or a model, never a panic or an allocation to match.
        #[test]
        fn never_panics_on_huge_counts(word in 0usize..512, value in prop_oneof![
            Just(u64::MAX), Just(1u64 << 60), Just(1u64 << 32), any::<u64>()
        ]) {
            let (_dir, path, _, _) = written(GgufType::F16);
            let mut b = std::fs::read(&path).unwrap();
            let at = (8 + 8 * word).min(b.len() - 8);
            b[at..at + 8].copy_from_slice(&value.to_le_bytes());
            let _ = read(&b);
        }

        /// Any truncation, and any byte overwritten anywhere: an error or a model, never a
        /// panic.
        #[test]
        fn never_panics_on_damaged_files(cut in 0usize..4096, at in 0usize..4096, byte: u8) {
            let (_dir, path, _, _) = written(GgufType::Q8_0);
            let good = std::fs::read(&path).unwrap();
            let cut = cut.min(good.len());
            let _ = read(&good[..cut]);
            let mut b = good.clone();
            let at = at % b.len();
            b[at] = byte;
            let _ = read(&b);
        }
    }
}
