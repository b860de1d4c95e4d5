//! The OpenAI API's request and response bodies, as serde types.
//!
//! Requests are read in two steps: the JSON body becomes a [`serde_json::Value`], then each
//! part is read from it into the typed structs here, so a wrong type is reported with the
//! field's path (`messages[0].content`) as OpenAI's `param`. Fields tinygpt does not know are
//! ignored; fields it knows but cannot honour (`n > 1`, `tools`, `logprobs`, ...) are refused
//! by [`super::http`] with a 400 naming the field.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// The fields `/v1/chat/completions` and `/v1/completions` share: the model, sampling, stop
/// conditions, streaming, and the OpenAI fields that are refused unless left at their default.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct CommonFields {
    pub model: Option<String>,
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<serde_json::Number>,
    pub stop: Option<Value>,
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    // Extras, as vLLM and llama.cpp's server name them.
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub ignore_eos: Option<bool>,
    // OpenAI fields refused unless they ask for what tinygpt does anyway.
    pub n: Option<u64>,
    pub best_of: Option<u64>,
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub functions: Option<Value>,
    pub function_call: Option<Value>,
    pub response_format: Option<Value>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub logit_bias: Option<Value>,
    pub echo: Option<bool>,
    pub suffix: Option<Value>,
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    pub include_usage: Option<bool>,
}

/// The chat-only part of a chat request.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatFields {
    pub messages: Option<Vec<RawMessage>>,
}

/// One message as sent: the content is read by hand (a string or a list of parts).
#[derive(Debug, Deserialize)]
pub(crate) struct RawMessage {
    pub role: Option<String>,
    pub content: Option<Value>,
}

/// The completions-only part of a completions request.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionFields {
    pub prompt: Option<Value>,
}

/// Reads `T` out of the request body, reporting a wrong type with the field's path.
pub(crate) fn read<T: serde::de::DeserializeOwned>(body: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." || path.is_empty() {
            ApiError::invalid(format!("invalid request body: {inner}"), None)
        } else {
            ApiError::invalid(format!("invalid value for `{path}`: {inner}"), Some(path))
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------

/// `GET /v1/models`.
#[derive(Debug, Serialize)]
pub(crate) struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

/// One model of `/v1/models`.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ModelCard {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// The context length, in tokens (vLLM's field name).
    pub max_model_len: usize,
}

/// `GET /health`.
#[derive(Debug, Serialize)]
pub(crate) struct Health<'a> {
    pub status: &'static str,
    pub model: &'a str,
    pub slots: Slots,
    pub queue: Queue,
}

/// Decode slots in use and in all.
#[derive(Debug, Serialize)]
pub(crate) struct Slots {
    pub active: usize,
    pub total: usize,
}

/// Requests waiting and the most that may wait.
#[derive(Debug, Serialize)]
pub(crate) struct Queue {
    pub waiting: usize,
    pub max: usize,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub(crate) struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

impl Usage {
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// `chat.completion`.
#[derive(Debug, Serialize)]
pub(crate) struct ChatCompletion {
    pub id: String,
    pub object: &'static str,
    pub created: u64,
    pub model: String,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// `choices[i]` of a `chat.completion`.
#[derive(Debug, Serialize)]
pub(crate) struct ChatChoice {
    pub index: usize,
    pub message: AssistantMessage,
    pub logprobs: Option<()>,
    pub finish_reason: &'static str,
}

/// The reply.
#[derive(Debug, Serialize)]
pub(crate) struct AssistantMessage {
    pub role: &'static str,
    pub content: String,
}

/// `chat.completion.chunk`, one SSE event of a streamed chat reply.
#[derive(Debug, Serialize)]
pub(crate) struct ChatChunk<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<ChunkChoice>,
    /// Absent without `stream_options.include_usage`; with it, `null` on every chunk but the
    /// last, which carries the counts (as OpenAI does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// `choices[i]` of a chunk.
#[derive(Debug, Serialize)]
pub(crate) struct ChunkChoice {
    pub index: usize,
    pub delta: Delta,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

/// What a chunk adds to the reply; `{}` in the chunk that carries the finish reason.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Delta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// `text_completion`, whole or as one SSE chunk.
#[derive(Debug, Serialize)]
pub(crate) struct TextCompletion<'a> {
    pub id: &'a str,
    pub object: &'static str,
    pub created: u64,
    pub model: &'a str,
    pub choices: Vec<TextChoice>,
    /// Always present on a whole response; on chunks as [`ChatChunk::usage`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Option<Usage>>,
}

/// `choices[i]` of a `text_completion`.
#[derive(Debug, Serialize)]
pub(crate) struct TextChoice {
    pub index: usize,
    pub text: String,
    pub logprobs: Option<()>,
    pub finish_reason: Option<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_types_name_the_field() {
        let body = serde_json::json!({"temperature": "hot"});
        let e = read::<CommonFields>(&body).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let body = serde_json::json!({"messages": [{"role": 3}]});
        let e = read::<ChatFields>(&body).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
    }

    #[test]
    fn unknown_fields_are_ignored_and_nulls_are_absent() {
        let body = serde_json::json!({"user": "x", "temperature": null, "metadata": {}});
        let c = read::<CommonFields>(&body).unwrap();
        assert!(c.temperature.is_none());
    }

    #[test]
    fn chunks_serialise_as_openai_does() {
        let chunk = ChatChunk {
            id: "chatcmpl-1",
            object: "chat.completion.chunk",
            created: 5,
            model: "m",
            choices: vec![ChunkChoice {
                index: 0,
                delta: Delta::default(),
                logprobs: None,
                finish_reason: Some("stop"),
            }],
            usage: Some(None),
        };
        let v = serde_json::to_value(&chunk).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                "created": 5, "model": "m", "usage": null,
                "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": "stop"}]})
        );
    }
}
