//! From an OpenAI request body to an engine [`Job`]: checks every field, renders the prompt,
//! fits it to the context, and picks the stop tokens.

use serde_json::Value;

use super::api::{read, ChatFields, CommonFields, CompletionFields, RawMessage};
use super::engine::Job;
use super::error::ApiError;
use super::http::AppState;
use crate::chat::{Message, Role};
use crate::sampler::SamplingParams;

/// At most this many stop strings, as OpenAI allows.
const MAX_STOP: usize = 4;

/// A checked request, ready for the engine.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub job: Job,
    pub stream: bool,
    pub include_usage: bool,
}

/// The settings of [`CommonFields`] that do not depend on the prompt.
struct Settings {
    params: SamplingParams,
    max_tokens: Option<u64>,
    stop: Vec<String>,
    ignore_eos: bool,
    stream: bool,
    include_usage: bool,
}

fn object(body: &Value) -> Result<(), ApiError> {
    if body.is_object() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "the request body must be a JSON object",
            None,
        ))
    }
}

/// A `/v1/chat/completions` body.
pub(crate) fn chat(state: &AppState, body: &Value) -> Result<Prepared, ApiError> {
    object(body)?;
    let common: CommonFields = read(body)?;
    let settings = settings(state, &common, true)?;
    let template = state.template.as_ref().map_err(|_| {
        ApiError::invalid(
            format!(
                "`{}` is a plain-text model (its tokenizer has no chat tokens), so it cannot \
                 chat: use /v1/completions with a `prompt` instead",
                state.config.model_name
            ),
            None,
        )
    })?;
    let fields: ChatFields = read(body)?;
    let raw = fields.messages.ok_or_else(|| {
        ApiError::invalid(
            "you must provide a `messages` parameter",
            Some("messages".into()),
        )
    })?;
    let messages = messages(state, &raw)?;
    let tokenizer = state.engine.tokenizer();
    let prompt = template
        .render_prompt(tokenizer, &messages)
        .map_err(|e| locate_encoding_error(state, &raw, e))?;
    let mut stop_tokens = Vec::new();
    if !settings.ignore_eos {
        stop_tokens = vec![
            template.end_id(),
            tokenizer.eot_id(),
            template.role_id(Role::System),
            template.role_id(Role::User),
            template.role_id(Role::Assistant),
        ];
        stop_tokens.dedup();
    }
    finish(state, settings, prompt, stop_tokens, "messages")
}

/// A `/v1/completions` body.
pub(crate) fn completion(state: &AppState, body: &Value) -> Result<Prepared, ApiError> {
    object(body)?;
    let common: CommonFields = read(body)?;
    let settings = settings(state, &common, false)?;
    let fields: CompletionFields = read(body)?;
    let tokenizer = state.engine.tokenizer();
    let stop_tokens = if settings.ignore_eos {
        Vec::new()
    } else {
        vec![tokenizer.eot_id()]
    };
    let prompt_param = || Some("prompt".to_string());
    let text = match fields.prompt {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                "you must provide a `prompt` parameter",
                prompt_param(),
            ))
        }
        Some(Value::String(s)) => Some(s),
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => Some(s.clone()),
            [] => Some(String::new()),
            [Value::String(_), ..] => {
                return Err(ApiError::unsupported(
                    "prompt",
                    "a list of several prompts is not supported: send one prompt per request",
                ))
            }
            ids => {
                let ids = ids
                    .iter()
                    .map(|v| v.as_u64().and_then(|id| u32::try_from(id).ok()))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "`prompt` must be a string, a list of one string, or a list of \
                             token ids",
                            prompt_param(),
                        )
                    })?;
                let vocab = state.engine.tokenizer().vocab_size();
                if let Some(&id) = ids.iter().find(|&&id| id as usize >= vocab) {
                    return Err(ApiError::invalid(
                        format!("prompt token id {id} is outside the vocabulary of {vocab} tokens"),
                        prompt_param(),
                    ));
                }
                return finish(state, settings, ids, stop_tokens, "prompt");
            }
        },
        Some(_) => {
            return Err(ApiError::invalid(
                "`prompt` must be a string, a list of one string, or a list of token ids",
                prompt_param(),
            ))
        }
    };
    let text = text.unwrap_or_default();
    if text.len() > state.config.max_message_bytes {
        return Err(ApiError::invalid(
            format!(
                "`prompt` is {} bytes long; this server accepts at most {}",
                text.len(),
                state.config.max_message_bytes
            ),
            prompt_param(),
        ));
    }
    let prompt = if text.is_empty() {
        vec![tokenizer.eot_id()]
    } else {
        tokenizer
            .encode(&text)
            .map_err(|e| ApiError::invalid(e.to_string(), prompt_param()))?
    };
    finish(state, settings, prompt, stop_tokens, "prompt")
}

/// Checks the model and every sampling field; refuses what tinygpt cannot do.
fn settings(state: &AppState, c: &CommonFields, chat: bool) -> Result<Settings, ApiError> {
    if let Some(model) = &c.model {
        if model != &state.config.model_name {
            return Err(ApiError::model_not_found(model, &state.config.model_name));
        }
    }
    refuse_unsupported(c, chat)?;

    let mut params = SamplingParams::default();
    if let Some(t) = c.temperature {
        if !(t.is_finite() && (0.0..=2.0).contains(&t)) {
            return Err(range(
                "temperature",
                t,
                "must be between 0 and 2 (0 = greedy)",
            ));
        }
        params.temperature = t as f32;
    }
    if let Some(p) = c.top_p {
        if !(p.is_finite() && p > 0.0 && p <= 1.0) {
            return Err(range("top_p", p, "must be in (0, 1]"));
        }
        params.top_p = (p < 1.0).then_some(positive_f32(p));
    }
    if let Some(k) = c.top_k {
        // 0 (llama.cpp) and -1 (vLLM) mean off.
        if k < -1 {
            return Err(ApiError::invalid(
                format!("top_k = {k} must be a positive number of tokens, or 0 or -1 for off"),
                Some("top_k".into()),
            ));
        }
        params.top_k = usize::try_from(k).ok().filter(|&k| k > 0);
    }
    if let Some(m) = c.min_p {
        if !(m.is_finite() && (0.0..=1.0).contains(&m)) {
            return Err(range("min_p", m, "must be in [0, 1] (0 = off)"));
        }
        params.min_p = (m > 0.0).then_some(positive_f32(m));
    }
    if let Some(r) = c.repetition_penalty {
        if !(r > 0.0 && (r as f32).is_finite()) {
            return Err(range(
                "repetition_penalty",
                r,
                "must be a finite number > 0 (1 = off)",
            ));
        }
        params.repetition_penalty = positive_f32(r);
    }
    params.seed = match &c.seed {
        None => rand::random(),
        Some(n) => match (n.as_u64(), n.as_i64()) {
            (Some(u), _) => u,
            // A negative seed keeps its bits: -1 and u64::MAX draw the same tokens.
            (None, Some(i)) => i as u64,
            _ => {
                return Err(ApiError::invalid(
                    format!(
                        "seed = {n} must be an integer from -2^63 to 2^64 - 1 (a negative seed \
                         is taken as its two's-complement bits)"
                    ),
                    Some("seed".into()),
                ))
            }
        },
    };
    // A backstop: the checks above are meant to leave nothing for it to find.
    params.validate().map_err(|e| {
        let msg = match e {
            crate::Error::InvalidArgument(m) => m,
            e => e.to_string(),
        };
        let field = msg.split_once(" = ").map(|(f, _)| f.to_string());
        ApiError::invalid(msg, field.filter(|f| !f.contains(' ')))
    })?;

    let (max_tokens, max_param) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(m), _) => (Some(m), "max_completion_tokens"),
        (None, m) => (m, "max_tokens"),
    };
    if max_tokens == Some(0) {
        return Err(ApiError::invalid(
            format!("{max_param} = 0: at least 1 token must be generated"),
            Some(max_param.into()),
        ));
    }
    let stream = c.stream == Some(true);
    if c.stream_options.is_some() && !stream {
        // As OpenAI: the options only mean something for a stream.
        return Err(ApiError::invalid(
            "`stream_options` is only allowed when `stream` is true",
            Some("stream_options".into()),
        ));
    }
    let include_usage =
        stream && c.stream_options.as_ref().and_then(|o| o.include_usage) == Some(true);
    Ok(Settings {
        params,
        max_tokens,
        stop: stop_strings(c.stop.as_ref())?,
        ignore_eos: c.ignore_eos == Some(true),
        stream,
        include_usage,
    })
}

/// `x > 0` as an f32 that stays `> 0` (a value below f32's range becomes its smallest
/// positive normal number, which means the same here: "as small as can be").
fn positive_f32(x: f64) -> f32 {
    let y = x as f32;
    if y > 0.0 {
        y
    } else {
        f32::MIN_POSITIVE
    }
}

fn range(field: &str, value: f64, rule: &str) -> ApiError {
    ApiError::invalid(format!("{field} = {value} {rule}"), Some(field.into()))
}

/// `stop`: a string or a list of up to four strings.
fn stop_strings(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let bad = || {
        ApiError::invalid(
            format!("`stop` must be a string or a list of at most {MAX_STOP} strings"),
            Some("stop".into()),
        )
    };
    match stop {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if items.len() <= MAX_STOP => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// OpenAI fields tinygpt knows but cannot honour: accepted only at the value that asks for
/// nothing (`n: 1`, `logprobs: false`, `tools: []`, ...).
fn refuse_unsupported(c: &CommonFields, chat: bool) -> Result<(), ApiError> {
    let set = |v: &Option<Value>| match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(Value::Number(n)) => n.as_f64() != Some(0.0),
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Bool(true)) => true,
    };
    if c.n.is_some_and(|n| n != 1) {
        return Err(ApiError::unsupported(
            "n",
            "n > 1 is not supported: this server generates one choice per request (send \
             several requests, with different seeds, for more)",
        ));
    }
    if c.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::unsupported(
            "best_of",
            "best_of > 1 is not supported",
        ));
    }
    for (field, value) in [("logprobs", &c.logprobs), ("top_logprobs", &c.top_logprobs)] {
        if set(value) {
            return Err(ApiError::unsupported(
                field,
                format!("`{field}` is not supported: this server returns no log probabilities"),
            ));
        }
    }
    for (field, value) in [
        ("tools", &c.tools),
        ("functions", &c.functions),
        ("function_call", &c.function_call),
    ] {
        if set(value) && !matches!(value, Some(Value::String(s)) if s == "none") {
            return Err(ApiError::unsupported(
                field,
                format!("`{field}` is not supported: tinygpt models cannot call tools"),
            ));
        }
    }
    if set(&c.tool_choice)
        && !matches!(&c.tool_choice, Some(Value::String(s)) if s == "none" || s == "auto")
    {
        return Err(ApiError::unsupported(
            "tool_choice",
            "`tool_choice` is not supported: tinygpt models cannot call tools",
        ));
    }
    match &c.response_format {
        None | Some(Value::Null) => {}
        Some(v) if v.get("type").and_then(Value::as_str) == Some("text") => {}
        Some(_) => {
            return Err(ApiError::unsupported(
                "response_format",
                "only `response_format: {\"type\": \"text\"}` is supported (no JSON mode or \
                 schemas)",
            ))
        }
    }
    for (field, value) in [
        ("frequency_penalty", c.frequency_penalty),
        ("presence_penalty", c.presence_penalty),
    ] {
        if value.is_some_and(|v| v != 0.0) {
            return Err(ApiError::unsupported(
                field,
                format!("`{field}` is not supported: use `repetition_penalty` (> 1 discourages repeats)"),
            ));
        }
    }
    if set(&c.logit_bias) {
        return Err(ApiError::unsupported(
            "logit_bias",
            "`logit_bias` is not supported",
        ));
    }
    if !chat {
        if c.echo == Some(true) {
            return Err(ApiError::unsupported("echo", "`echo` is not supported"));
        }
        if set(&c.suffix) {
            return Err(ApiError::unsupported("suffix", "`suffix` is not supported"));
        }
    }
    Ok(())
}

/// The conversation: roles and contents checked, system (and developer) messages folded into
/// one system message at the start, in their order, joined by blank lines.
fn messages(state: &AppState, raw: &[RawMessage]) -> Result<Vec<Message>, ApiError> {
    let limits = &state.config;
    if raw.is_empty() {
        return Err(ApiError::invalid(
            "`messages` must hold at least one message",
            Some("messages".into()),
        ));
    }
    if raw.len() > limits.max_messages {
        return Err(ApiError::invalid(
            format!(
                "`messages` holds {} messages; this server accepts at most {}",
                raw.len(),
                limits.max_messages
            ),
            Some("messages".into()),
        ));
    }
    let mut system: Vec<String> = Vec::new();
    let mut turns = Vec::with_capacity(raw.len());
    for (i, m) in raw.iter().enumerate() {
        let role = match m.role.as_deref() {
            Some("system" | "developer") => Role::System,
            Some("user") => Role::User,
            Some("assistant") => Role::Assistant,
            Some(other) => {
                return Err(ApiError::invalid(
                    format!(
                        "messages[{i}].role = {other:?} is not supported: use system, \
                         developer, user or assistant"
                    ),
                    Some(format!("messages[{i}].role")),
                ))
            }
            None => {
                return Err(ApiError::invalid(
                    format!("messages[{i}] has no `role`"),
                    Some(format!("messages[{i}].role")),
                ))
            }
        };
        let content = content(i, m.content.as_ref())?;
        if content.len() > limits.max_message_bytes {
            return Err(ApiError::invalid(
                format!(
                    "messages[{i}].content is {} bytes long; this server accepts at most {} \
                     per message",
                    content.len(),
                    limits.max_message_bytes
                ),
                Some(format!("messages[{i}].content")),
            ));
        }
        match role {
            Role::System => system.push(content),
            _ => turns.push(Message { role, content }),
        }
    }
    let mut out = Vec::with_capacity(turns.len() + 1);
    if !system.is_empty() {
        out.push(Message::system(system.join("\n\n")));
    }
    out.extend(turns);
    Ok(out)
}

/// A message's text: a string, or a list of `{"type": "text", "text": ...}` parts joined by
/// newlines (as vLLM joins them).
fn content(i: usize, content: Option<&Value>) -> Result<String, ApiError> {
    let param = || Some(format!("messages[{i}].content"));
    match content {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            if parts.is_empty() {
                return Err(ApiError::invalid(
                    format!("messages[{i}].content is an empty list of parts"),
                    param(),
                ));
            }
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let kind = part.get("type").and_then(Value::as_str);
                let text = part.get("text").and_then(Value::as_str);
                match (kind, text) {
                    (Some("text"), Some(t)) => texts.push(t),
                    (Some("text"), None) => {
                        return Err(ApiError::invalid(
                            format!(
                                "messages[{i}].content[{j}] has type text but no `text` string"
                            ),
                            Some(format!("messages[{i}].content[{j}].text")),
                        ))
                    }
                    (Some(other), _) => {
                        return Err(ApiError::invalid(
                            format!(
                                "messages[{i}].content[{j}] is of type {other:?}: only text \
                                 parts are supported"
                            ),
                            Some(format!("messages[{i}].content[{j}].type")),
                        ))
                    }
                    (None, _) => {
                        return Err(ApiError::invalid(
                            format!(
                                "messages[{i}].content[{j}] must be an object \
                                 {{\"type\": \"text\", \"text\": ...}}"
                            ),
                            Some(format!("messages[{i}].content[{j}]")),
                        ))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        None | Some(Value::Null) => Err(ApiError::invalid(
            format!("messages[{i}] has no `content`"),
            param(),
        )),
        Some(_) => Err(ApiError::invalid(
            format!("messages[{i}].content must be a string or a list of text parts"),
            param(),
        )),
    }
}

/// A tokenizer error on a rendered conversation, pinned to the first message whose content
/// does not encode.
fn locate_encoding_error(state: &AppState, raw: &[RawMessage], e: crate::Error) -> ApiError {
    let tokenizer = state.engine.tokenizer();
    for (i, m) in raw.iter().enumerate() {
        if let Ok(text) = content(i, m.content.as_ref()) {
            if let Err(e) = tokenizer.encode(&text) {
                return ApiError::invalid(
                    format!("messages[{i}].content: {e}"),
                    Some(format!("messages[{i}].content")),
                );
            }
        }
    }
    ApiError::invalid(e.to_string(), Some("messages".into()))
}

/// Fits the reply into the context and builds the job.
fn finish(
    state: &AppState,
    s: Settings,
    prompt: Vec<u32>,
    stop_tokens: Vec<u32>,
    prompt_param: &str,
) -> Result<Prepared, ApiError> {
    let block = state.engine.model_config().block_size;
    let n = prompt.len();
    if n >= block {
        return Err(ApiError::context_length(
            format!(
                "This model's maximum context length is {block} tokens. However, your \
                 {prompt_param} resulted in {n} tokens, which leaves no room for a reply. \
                 Please shorten the {prompt_param}."
            ),
            prompt_param,
        ));
    }
    let room = block - n;
    let max_new = s
        .max_tokens
        .map_or(room, |m| usize::try_from(m).unwrap_or(usize::MAX).min(room));
    let mut params = s.params;
    params.max_new_tokens = max_new;
    params.stop_tokens = stop_tokens;
    Ok(Prepared {
        job: Job {
            prompt_ids: prompt,
            params,
            stop: s.stop,
        },
        stream: s.stream,
        include_usage: s.include_usage,
    })
}
