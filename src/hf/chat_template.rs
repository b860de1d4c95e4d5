//! A Hugging Face model's own chat template: the Jinja `chat_template` of its
//! `tokenizer_config.json` (or `chat_template.jinja`), rendered with `minijinja` as
//! transformers' `tokenizer.apply_chat_template` renders it with Jinja2.
//!
//! transformers compiles the template in a sandboxed Jinja2 environment with `trim_blocks` and
//! `lstrip_blocks`, adds the function `raise_exception(msg)` and `strftime_now(fmt)`, a
//! `tojson` filter that is Python's `json.dumps` (`", "` and `": "`, non-ASCII kept, keys in
//! their order), and renders with `messages`, `tools`, `add_generation_prompt` and the special
//! tokens (`bos_token`, `eos_token`, …). The ids are then the rendered text tokenized with its
//! special tokens recognised and no bos/eos added. [`HfChatTemplate`] does each of these;
//! Python's string methods (`strip`, `startswith`, `split`, …) come from minijinja-contrib's
//! `pycompat`. `tests/hf_tokenizers.rs` checks text and ids against transformers' for a
//! TinyLlama-style, a Llama-2-style and a Qwen2.5 template (tools and tool calls included).
//!
//! For training, [`HfChatTemplate::render_for_training`] marks the assistant's tokens by
//! rendering prefixes of the conversation, so the template needs no `{% generation %}` markers
//! (which transformers' `return_assistant_tokens_mask` and TRL's `assistant_only_loss` need):
//! a template whose prefixes are not prefixes of the whole is refused.

use std::collections::BTreeMap;
use std::path::Path;

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::Deserialize;

use crate::chat::{Message, Rendered, Role};
use crate::tokenizer::Tokenizer;
use crate::{Error, Result};

/// The template's name inside its environment.
const NAME: &str = "chat_template";
/// The most work one rendering may do (minijinja's fuel: about one unit per instruction), so
/// a hostile template's endless loop ends in an error. Real templates use a few thousand.
const FUEL: u64 = 50_000_000;
/// How deep macros and includes may nest.
const RECURSION_LIMIT: usize = 64;
/// The most tokens one tag (`{{ … }}`, `{% … %}`) may hold. minijinja parses a chain such as
/// `1 + 1 + …` or `x.a.a…` into a tree as deep as the chain is long and then walks it
/// recursively, so a long enough chain overflows the stack (an abort, not an error) before any
/// of its own limits applies. The longest tag of a real template we know has 84 (Qwen2.5's
/// tool-calling template); a tree 1024 deep is far from a thread's stack.
const MAX_TAG_TOKENS: usize = 1024;

/// What tinygpt reads from a Hugging Face `tokenizer_config.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenizerConfig {
    /// The Jinja chat template (the one named `default` when the file has several), or the
    /// contents of `chat_template.jinja` beside it, which transformers 5 prefers.
    pub chat_template: Option<String>,
    /// The beginning-of-sequence token's spelling (`<s>`), if any.
    pub bos_token: Option<String>,
    /// The end-of-sequence token's spelling (`</s>`, `<|im_end|>`), if any.
    pub eos_token: Option<String>,
    /// The unknown token's spelling, if any.
    pub unk_token: Option<String>,
    /// The padding token's spelling, if any.
    pub pad_token: Option<String>,
    /// The transformers tokenizer class (`LlamaTokenizerFast`, `Qwen2Tokenizer`), if given.
    pub tokenizer_class: Option<String>,
    /// `legacy` (Llama tokenizers: whether every piece after a special token gets a `▁`).
    pub legacy: Option<bool>,
    /// `add_prefix_space` (Llama tokenizers: whether the first piece gets a `▁`).
    pub add_prefix_space: Option<bool>,
    /// Where the template came from, for errors: the file, and the template's name.
    pub source: String,
}

/// A special token in `tokenizer_config.json`: a string, or an `AddedToken` object.
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenField {
    Text(String),
    Added { content: String },
}

/// `chat_template`: one template, or a list of named ones.
#[derive(Deserialize)]
#[serde(untagged)]
enum TemplateField {
    One(String),
    Named(Vec<NamedTemplate>),
}

#[derive(Deserialize)]
struct NamedTemplate {
    name: String,
    template: String,
}

#[derive(Deserialize)]
struct RawConfig {
    #[serde(default)]
    chat_template: Option<TemplateField>,
    #[serde(default)]
    bos_token: Option<TokenField>,
    #[serde(default)]
    eos_token: Option<TokenField>,
    #[serde(default)]
    unk_token: Option<TokenField>,
    #[serde(default)]
    pad_token: Option<TokenField>,
    #[serde(default)]
    tokenizer_class: Option<String>,
    #[serde(default)]
    legacy: Option<bool>,
    #[serde(default)]
    add_prefix_space: Option<bool>,
}

impl TokenField {
    fn into_string(self) -> String {
        match self {
            TokenField::Text(s) | TokenField::Added { content: s } => s,
        }
    }
}

impl TokenizerConfig {
    /// Reads `dir/tokenizer_config.json` and `dir/chat_template.jinja`; a missing file leaves
    /// its fields `None` (a directory without either gives the default).
    ///
    /// # Errors
    /// [`Error::Io`] naming the file if one exists but cannot be read; [`Error::BadFile`]
    /// naming the file (and the line) if `tokenizer_config.json` is not JSON or a field has
    /// the wrong type.
    pub fn load(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join(super::files::TOKENIZER_CONFIG);
        let mut out = TokenizerConfig {
            source: path.display().to_string(),
            ..Default::default()
        };
        if path.is_file() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let raw: RawConfig =
                serde_json::from_str(&text).map_err(|e| Error::json(&path, None, &e))?;
            out.bos_token = raw.bos_token.map(TokenField::into_string);
            out.eos_token = raw.eos_token.map(TokenField::into_string);
            out.unk_token = raw.unk_token.map(TokenField::into_string);
            out.pad_token = raw.pad_token.map(TokenField::into_string);
            out.tokenizer_class = raw.tokenizer_class;
            out.legacy = raw.legacy;
            out.add_prefix_space = raw.add_prefix_space;
            out.chat_template = match raw.chat_template {
                None => None,
                Some(TemplateField::One(t)) => Some(t),
                Some(TemplateField::Named(list)) => {
                    let names: Vec<String> = list.iter().map(|t| t.name.clone()).collect();
                    let Some(t) = list.into_iter().find(|t| t.name == "default") else {
                        return Err(Error::bad_file(
                            &path,
                            None,
                            format!(
                                "chat_template lists templates {names:?} but none named \
                                 \"default\", the one a chat uses"
                            ),
                        ));
                    };
                    out.source = format!("{} (template \"default\")", path.display());
                    Some(t.template)
                }
            };
        }
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let text = std::fs::read_to_string(&jinja).map_err(|e| Error::io(&jinja, e))?;
            out.chat_template = Some(text);
            out.source = jinja.display().to_string();
        }
        Ok(out)
    }
}

/// A Jinja chat template, compiled, with the special tokens it is rendered with.
#[derive(Debug, Clone)]
pub struct HfChatTemplate {
    env: Environment<'static>,
    source: String,
    tokens: Vec<(&'static str, String)>,
}

impl HfChatTemplate {
    /// The chat template of a Hugging Face directory (see [`TokenizerConfig::load`]), or
    /// `None` if it has none.
    ///
    /// # Errors
    /// As [`TokenizerConfig::load`]; [`Error::ChatTemplate`] if the template does not compile.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let config = TokenizerConfig::load(dir)?;
        match &config.chat_template {
            Some(t) => Ok(Some(Self::new(t, &config)?)),
            None => Ok(None),
        }
    }

    /// Compiles `template` with the special tokens of `config` (its `chat_template` is not
    /// read; `config.source` names the template in errors).
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] naming the source and the line, for a syntax error.
    pub fn new(template: &str, config: &TokenizerConfig) -> Result<Self> {
        let source = if config.source.is_empty() {
            "(inline)".to_string()
        } else {
            config.source.clone()
        };
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| template_error(&source, &e))?;
        env.set_syntax(syntax);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(RECURSION_LIMIT);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        check_tag_lengths(template).map_err(|msg| Error::ChatTemplate {
            name: source.clone(),
            msg,
        })?;
        env.add_template_owned(NAME, template.to_string())
            .map_err(|e| template_error(&source, &e))?;
        let mut tokens = Vec::new();
        for (name, value) in [
            ("bos_token", &config.bos_token),
            ("eos_token", &config.eos_token),
            ("unk_token", &config.unk_token),
            ("pad_token", &config.pad_token),
        ] {
            if let Some(v) = value {
                tokens.push((name, v.clone()));
            }
        }
        Ok(Self {
            env,
            source,
            tokens,
        })
    }

    /// Where the template came from (a file), as errors name it.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Renders `messages` (a JSON array of OpenAI-style messages: `role`, `content`, and
    /// whatever else the template reads, such as `tool_calls`) with `tools` (a JSON array of
    /// tool definitions, or `None`) as transformers'
    /// `apply_chat_template(messages, tools=tools, add_generation_prompt=…, tokenize=False)`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `messages` or `tools` is not JSON; [`Error::ChatTemplate`]
    /// if rendering fails or the template raises an exception (its message, the template line).
    pub fn render_json(
        &self,
        messages: &str,
        tools: Option<&str>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let parse = |what: &str, text: &str| -> Result<Value> {
            serde_json::from_str::<Value>(text)
                .map_err(|e| Error::InvalidArgument(format!("chat {what}: not JSON: {e}")))
        };
        let messages = parse("messages", messages)?;
        let tools = tools.map(|t| parse("tools", t)).transpose()?;
        self.render_value(messages, tools, add_generation_prompt)
    }

    /// Renders a conversation (see [`HfChatTemplate::render_json`]), without tools.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] as [`HfChatTemplate::render_json`].
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        self.render_value(
            Value::from(minijinja::value::Serde(messages)),
            None,
            add_generation_prompt,
        )
    }

    /// The token ids of [`HfChatTemplate::render`]: the text tokenized with its special tokens
    /// recognised (the template writes them) and nothing added, as transformers' `tokenize=True`.
    ///
    /// Unlike tinygpt's own [`crate::ChatTemplate`], a message that spells a special token
    /// gets that token here, as in transformers: the template renders one string.
    ///
    /// # Errors
    /// As [`HfChatTemplate::render`]; tokenizer errors.
    pub fn render_ids(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<Vec<u32>> {
        tokenizer.encode(&self.render(messages, add_generation_prompt)?)
    }

    /// Renders a conversation for training: its ids and a mask that is 1 on each assistant
    /// turn's tokens (what the template writes from the end of the generation prompt before it
    /// to the end of the turn, its end-of-turn tokens included) and 0 elsewhere.
    ///
    /// Each assistant turn's span comes from two prefixes: the messages before it rendered
    /// with `add_generation_prompt`, and the messages up to it rendered without.
    ///
    /// # Errors
    /// [`Error::ChatTemplate`] if a prefix's ids are not a prefix of the whole conversation's
    /// (a template that rewrites earlier turns, e.g. one dropping the reasoning of past
    /// replies), naming the message; as [`HfChatTemplate::render_ids`].
    pub fn render_for_training(
        &self,
        tokenizer: &Tokenizer,
        messages: &[Message],
    ) -> Result<Rendered> {
        let ids = self.render_ids(tokenizer, messages, false)?;
        let mut mask = vec![0u8; ids.len()];
        for (i, m) in messages.iter().enumerate() {
            if m.role != Role::Assistant {
                continue;
            }
            let start = self.render_ids(tokenizer, &messages[..i], true)?;
            let end = self.render_ids(tokenizer, &messages[..=i], false)?;
            if !end.starts_with(&start) || !ids.starts_with(&end) {
                return Err(Error::ChatTemplate {
                    name: self.source.clone(),
                    msg: format!(
                        "the conversation rendered up to message {i} (an assistant turn) is \
                         not a prefix of the whole conversation rendered, so its tokens cannot \
                         be marked for training (the template rewrites earlier turns)"
                    ),
                });
            }
            mask[start.len()..end.len()].fill(1);
        }
        Ok(Rendered { ids, mask })
    }

    /// Renders `messages` and `tools` given as minijinja values (e.g. deserialized from JSON
    /// into [`minijinja::Value`], which keeps the keys in their order), as
    /// [`HfChatTemplate::render_json`].
    ///
    /// # Errors
    /// As [`HfChatTemplate::render_json`].
    pub fn render_value(
        &self,
        messages: Value,
        tools: Option<Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let err = |e: minijinja::Error| template_error(&self.source, &e);
        let template = self.env.get_template(NAME).map_err(err)?;
        let mut ctx: BTreeMap<&str, Value> = BTreeMap::from([
            ("messages", messages),
            ("tools", tools.unwrap_or(Value::from(()))),
            ("add_generation_prompt", Value::from(add_generation_prompt)),
        ]);
        for (name, value) in &self.tokens {
            ctx.insert(name, Value::from(value.as_str()));
        }
        template.render(Value::from(ctx)).map_err(err)
    }
}

/// Refuses a tag of more than [`MAX_TAG_TOKENS`] tokens (counted roughly: a run of word
/// characters, a string literal or any other character is one), naming its line.
fn check_tag_lengths(template: &str) -> std::result::Result<(), String> {
    let bytes = template.as_bytes();
    let mut i = 0;
    let mut line = 1;
    while i + 1 < bytes.len() {
        let opens = bytes[i] == b'{' && matches!(bytes[i + 1], b'{' | b'%');
        if !opens {
            line += usize::from(bytes[i] == b'\n');
            i += 1;
            continue;
        }
        let close = if bytes[i + 1] == b'{' { b'}' } else { b'%' };
        let start_line = line;
        let mut tokens = 0usize;
        i += 2;
        while i < bytes.len() {
            let c = bytes[i];
            if c == close && bytes.get(i + 1) == Some(&b'}') {
                i += 2;
                break;
            }
            if c == b'\'' || c == b'"' {
                // A string literal is one token, whatever it holds.
                i += 1;
                while i < bytes.len() && bytes[i] != c {
                    line += usize::from(bytes[i] == b'\n');
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                tokens += 1;
            } else if c.is_ascii_alphanumeric() || c == b'_' || c >= 0x80 {
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] >= 0x80)
                {
                    i += 1;
                }
                tokens += 1;
            } else {
                line += usize::from(c == b'\n');
                tokens += usize::from(!c.is_ascii_whitespace());
                i += 1;
            }
            if tokens > MAX_TAG_TOKENS {
                return Err(format!(
                    "the tag starting on template line {start_line} holds more than \
                     {MAX_TAG_TOKENS} tokens; no real chat template has such a tag"
                ));
            }
        }
    }
    Ok(())
}

/// A minijinja error as ours: what went wrong, the template line, and the cause's chain.
fn template_error(source: &str, e: &minijinja::Error) -> Error {
    let mut msg = match e.kind() {
        ErrorKind::InvalidOperation if e.detail().is_some_and(|d| d.starts_with(RAISED)) => {
            let detail = e.detail().unwrap_or_default();
            format!(
                "the template raised an exception: {}",
                detail.trim_start_matches(RAISED)
            )
        }
        _ => e.to_string(),
    };
    if let Some(line) = e.line() {
        if !msg.contains("line") {
            msg.push_str(&format!(" (template line {line})"));
        }
    }
    Error::ChatTemplate {
        name: source.to_string(),
        msg,
    }
}

/// Marks an error raised by the template itself.
const RAISED: &str = "raise_exception: ";

/// `raise_exception(message)`: the template refuses its input (an unknown role, a system
/// message in the wrong place).
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(
        ErrorKind::InvalidOperation,
        format!("{RAISED}{message}"),
    ))
}

/// `strftime_now(format)`: the current UTC date and time, with the `strftime` codes real
/// templates use (`%Y %m %d %B %b %H %M %S %%`; others are kept as written). Llama 3's
/// templates put today's date in the system prompt with it.
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    format_utc(secs, &format)
}

/// `secs` since the Unix epoch, formatted as [`strftime_now`] says.
fn format_utc(secs: u64, format: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    // Howard Hinnant's civil_from_days.
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let name = MONTHS
        .get((month - 1) as usize)
        .copied()
        .unwrap_or("January");
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('B') => out.push_str(name),
            Some('b') => out.push_str(&name[..3]),
            Some('H') => out.push_str(&format!("{:02}", rem / 3600)),
            Some('M') => out.push_str(&format!("{:02}", rem % 3600 / 60)),
            Some('S') => out.push_str(&format!("{:02}", rem % 60)),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// `tojson`: Python's `json.dumps(value, ensure_ascii=False)` as transformers' filter calls
/// it, with its `indent`, `ensure_ascii` and `sort_keys` arguments.
fn tojson(value: &Value, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let style = JsonStyle {
        indent,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
    };
    let mut out = String::new();
    write_json(value, &style, 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

/// How [`tojson`] writes.
struct JsonStyle {
    indent: Option<usize>,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// Nesting deeper than this is refused (a value built by a hostile template).
const JSON_MAX_DEPTH: usize = 128;

fn write_json(
    v: &Value,
    style: &JsonStyle,
    depth: usize,
    out: &mut String,
) -> std::result::Result<(), minijinja::Error> {
    if depth > JSON_MAX_DEPTH {
        return Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: a value nested deeper than {JSON_MAX_DEPTH} levels"),
        ));
    }
    // Python's separators: (", ", ": ") without an indent, ("," + newline, ": ") with one.
    let newline = |out: &mut String, level: usize| {
        if let Some(n) = style.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    };
    let item_sep = if style.indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number if v.is_integer() => out.push_str(&v.to_string()),
        ValueKind::Number => {
            let f = f64::try_from(v.clone()).unwrap_or(f64::NAN);
            out.push_str(&python_float(f));
        }
        ValueKind::String | ValueKind::Bytes | ValueKind::Invalid | ValueKind::Plain => {
            write_json_string(&v.to_string(), style.ensure_ascii, out)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(item, style, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if style.sort_keys {
                keys.sort_by_key(|k| k.to_string());
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json_string(&key.to_string(), style.ensure_ascii, out);
                out.push_str(": ");
                write_json(&v.get_item(key)?, style, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => write_json_string(&v.to_string(), style.ensure_ascii, out),
    }
    Ok(())
}

/// A float as Python's `repr` writes it in JSON: `1.0`, `0.1`, `1e+20`, `NaN`, `Infinity`.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Python switches to exponent notation here: 1e+16, 1e-05.
        let s = format!("{f:e}"); // "1e16", "1.5e-5"
        let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        return format!("{mant}e{}{:02}", if exp < 0 { '-' } else { '+' }, exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

/// A JSON string as Python writes it: `"` `\` and control characters escaped (`\n`, `\u001b`),
/// everything else as it is, or as `\uXXXX` (surrogate pairs) with `ensure_ascii`.
fn write_json_string(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && !c.is_ascii() => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(source: &str) -> HfChatTemplate {
        HfChatTemplate::new(source, &TokenizerConfig::default()).unwrap()
    }

    #[test]
    fn tojson_writes_what_pythons_json_dumps_writes() {
        let t = template("{{ messages | tojson }}|{{ messages | tojson(indent=2) }}");
        let x = r#"{"b": [1, 2.5, 1.0, true, null, "é\n\"<"], "a": {}, "c": []}"#;
        let out = t.render_json(x, None, false).unwrap();
        // python3 -c 'import json; print(json.dumps(x, ensure_ascii=False))' (and indent=2)
        let compact = r#"{"b": [1, 2.5, 1.0, true, null, "é\n\"<"], "a": {}, "c": []}"#;
        let indented = "{\n  \"b\": [\n    1,\n    2.5,\n    1.0,\n    true,\n    null,\n    \"é\\n\\\"<\"\n  ],\n  \"a\": {},\n  \"c\": []\n}";
        assert_eq!(out, format!("{compact}|{indented}"));
    }

    #[test]
    fn python_floats_and_dates() {
        assert_eq!(python_float(1.0), "1.0");
        assert_eq!(python_float(0.1), "0.1");
        assert_eq!(python_float(1e16), "1e+16");
        assert_eq!(python_float(1.5e-5), "1.5e-05");
        assert_eq!(python_float(-2.0), "-2.0");
        // 2026-12-01 21:10:56 UTC, and the leap day of 2024.
        assert_eq!(
            format_utc(1_796_159_456, "%d %b %Y %H:%M:%S %B %%"),
            "01 Dec 2026 21:10:56 December %"
        );
        assert_eq!(format_utc(1_709_164_800, "%Y-%m-%d"), "2024-02-29");
    }

    #[test]
    fn hostile_templates_are_typed_errors() {
        let cfg = TokenizerConfig {
            source: "t.json".into(),
            ..Default::default()
        };
        match HfChatTemplate::new("{% for m in messages %}", &cfg) {
            Err(Error::ChatTemplate { name, msg }) => {
                assert_eq!(name, "t.json");
                assert!(msg.contains("line 1"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        let raising = HfChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'user' %}{{ raise_exception('no users here') }}{% endif %}{% endfor %}",
            &cfg,
        )
        .unwrap();
        match raising.render(&[Message::user("hi")], false) {
            Err(Error::ChatTemplate { msg, .. }) => {
                assert!(msg.contains("raised an exception: no users here"), "{msg}")
            }
            other => panic!("{other:?}"),
        }
        // An endless loop runs out of fuel; a huge range is refused.
        let endless = HfChatTemplate::new(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            &cfg,
        )
        .unwrap();
        assert!(matches!(
            endless.render(&[], false),
            Err(Error::ChatTemplate { .. })
        ));
        let recursive = HfChatTemplate::new(
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            &cfg,
        )
        .unwrap();
        assert!(matches!(
            recursive.render(&[], false),
            Err(Error::ChatTemplate { .. })
        ));
        // Broken tags and sources nested far deeper than any template: errors, no panic and
        // no stack overflow in the parser.
        for source in [
            "{%}".to_string(),
            "{%-}".to_string(),
            "{% %}".to_string(),
            "{{".to_string(),
            "{#".to_string(),
            "{% if %}{% endif %}".to_string(),
            format!(
                "{}x{}",
                "{% if true %}".repeat(5000),
                "{% endif %}".repeat(5000)
            ),
            format!("{{{{ {}1{} }}}}", "(".repeat(100_000), ")".repeat(100_000)),
            format!("{{{{ {}1{} }}}}", "[".repeat(100_000), "]".repeat(100_000)),
            format!("{{{{ 1{} }}}}", " + 1".repeat(100_000)),
            format!("{{{{ x{} }}}}", ".a".repeat(100_000)),
        ] {
            let t = HfChatTemplate::new(&source, &cfg)
                .and_then(|t| t.render(&[Message::user("hi")], true));
            if let Err(e) = &t {
                assert!(matches!(e, Error::ChatTemplate { .. }), "{e:?}");
            }
        }
        // The longest tag allowed still renders on a test thread's stack.
        let longest = format!("{{{{ 1{} }}}}", " + 1".repeat(MAX_TAG_TOKENS / 2 - 1));
        let t = HfChatTemplate::new(&longest, &cfg).unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            (MAX_TAG_TOKENS / 2).to_string()
        );
        let longer = format!("\n\n{{{{ 1{} }}}}", " + 1".repeat(MAX_TAG_TOKENS / 2));
        match HfChatTemplate::new(&longer, &cfg) {
            Err(Error::ChatTemplate { msg, .. }) => assert!(msg.contains("line 3"), "{msg}"),
            other => panic!("{other:?}"),
        }
        let deep = HfChatTemplate::new("{{ messages | tojson }}", &cfg).unwrap();
        let nested = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        assert!(matches!(
            deep.render_json(&nested, None, false),
            Err(Error::ChatTemplate { .. }) | Err(Error::InvalidArgument(_))
        ));
    }
}
