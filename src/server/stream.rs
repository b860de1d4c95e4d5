//! A streamed reply as server-sent events, in the order OpenAI sends them.
//!
//! Chat: a first chunk with `delta: {"role": "assistant", "content": ""}`, one chunk per text
//! delta, a chunk with an empty delta and the `finish_reason`, then (with
//! `stream_options.include_usage`) a chunk with `choices: []` and the `usage`, then
//! `data: [DONE]`. Completions: the same without the role chunk, with `text` in place of
//! `delta`. If generation fails part-way, an `error` event carries `{"error": {...}}` and the
//! stream ends there, without `[DONE]`.
//!
//! The stream owns the request's events receiver: when the client goes away, hyper drops the
//! response body, the receiver with it, and the engine frees the request's slot within a step.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::response::sse;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio_stream::Stream;

use super::api::{ChatChunk, ChunkChoice, Delta, TextChoice, TextCompletion, Usage};
use super::engine::Event;
use super::error::ApiError;
use crate::sampler::FinishReason;

/// Which API's chunks to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `chat.completion.chunk`.
    Chat,
    /// `text_completion`.
    Completion,
}

/// What every chunk of one reply repeats.
#[derive(Debug, Clone)]
pub(crate) struct Meta {
    pub kind: Kind,
    pub id: String,
    pub created: u64,
    pub model: String,
    pub include_usage: bool,
}

/// OpenAI's name of a finish reason.
pub(crate) fn reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// The SSE events of one reply.
#[derive(Debug)]
pub(crate) struct EventStream {
    rx: UnboundedReceiver<Event>,
    meta: Meta,
    pending: VecDeque<sse::Event>,
    done: bool,
}

impl EventStream {
    pub fn new(rx: UnboundedReceiver<Event>, meta: Meta) -> Self {
        let mut s = Self {
            rx,
            meta,
            pending: VecDeque::new(),
            done: false,
        };
        if s.meta.kind == Kind::Chat {
            let role = Delta {
                role: Some("assistant"),
                content: Some(String::new()),
            };
            let first = s.chunk(role, None);
            s.pending.push_back(first);
        }
        s
    }

    /// `null` on every chunk but the usage one when usage was asked for; absent otherwise.
    fn usage_field(&self) -> Option<Option<Usage>> {
        self.meta.include_usage.then_some(None)
    }

    fn chunk(&self, delta: Delta, finish: Option<&'static str>) -> sse::Event {
        self.frame(Some((delta, finish)), self.usage_field())
    }

    fn usage_chunk(&self, usage: Usage) -> sse::Event {
        self.frame(None, Some(Some(usage)))
    }

    /// One chunk in the request's shape: its one choice (a delta and maybe why it ended), or
    /// no choice at all (the usage chunk), and the `usage` field.
    fn frame(
        &self,
        choice: Option<(Delta, Option<&'static str>)>,
        usage: Option<Option<Usage>>,
    ) -> sse::Event {
        let m = &self.meta;
        let json = match m.kind {
            Kind::Chat => serde_json::to_string(&ChatChunk {
                id: &m.id,
                object: "chat.completion.chunk",
                created: m.created,
                model: &m.model,
                choices: choice
                    .map(|(delta, finish)| ChunkChoice {
                        index: 0,
                        delta,
                        logprobs: None,
                        finish_reason: finish,
                    })
                    .into_iter()
                    .collect(),
                usage,
            }),
            Kind::Completion => serde_json::to_string(&TextCompletion {
                id: &m.id,
                object: "text_completion",
                created: m.created,
                model: &m.model,
                choices: choice
                    .map(|(delta, finish)| TextChoice {
                        index: 0,
                        text: delta.content.unwrap_or_default(),
                        logprobs: None,
                        finish_reason: finish,
                    })
                    .into_iter()
                    .collect(),
                usage,
            }),
        };
        data(json)
    }

    /// Turns one engine event into the SSE events it causes.
    fn on_event(&mut self, event: Option<Event>) {
        match event {
            Some(Event::Delta(text)) => {
                let delta = Delta {
                    role: None,
                    content: Some(text),
                };
                let chunk = self.chunk(delta, None);
                self.pending.push_back(chunk);
            }
            Some(Event::Finished {
                reason: r,
                prompt_tokens,
                completion_tokens,
            }) => {
                let last = self.chunk(Delta::default(), Some(reason(r)));
                self.pending.push_back(last);
                if self.meta.include_usage {
                    let usage = self.usage_chunk(Usage::new(prompt_tokens, completion_tokens));
                    self.pending.push_back(usage);
                }
                self.pending.push_back(sse::Event::default().data("[DONE]"));
                self.done = true;
            }
            Some(Event::Failed(msg)) => {
                self.pending.push_back(error_event(&ApiError::server(msg)));
                self.done = true;
            }
            None => {
                let e = ApiError::server("the engine stopped before the reply was finished");
                self.pending.push_back(error_event(&e));
                self.done = true;
            }
        }
    }
}

fn data(json: serde_json::Result<String>) -> sse::Event {
    match json {
        Ok(json) => sse::Event::default().data(json),
        Err(e) => error_event(&ApiError::server(format!(
            "could not serialise a chunk: {e}"
        ))),
    }
}

/// `event: error` with `data: {"error": {...}}`.
pub(crate) fn error_event(e: &ApiError) -> sse::Event {
    sse::Event::default().event("error").data(e.body_json())
}

impl Stream for EventStream {
    type Item = Result<sse::Event, Infallible>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.pending.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if this.done {
                return Poll::Ready(None);
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(event) => this.on_event(event),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;
    use tokio::sync::mpsc::unbounded_channel;

    /// The SSE body a list of engine events becomes.
    fn body(kind: Kind, include_usage: bool, events: Vec<Event>) -> String {
        let (tx, rx) = unbounded_channel();
        for e in events {
            tx.send(e).unwrap();
        }
        drop(tx);
        let meta = Meta {
            kind,
            id: "x-1".into(),
            created: 9,
            model: "m".into(),
            include_usage,
        };
        let response = sse::Sse::new(EventStream::new(rx, meta)).into_response();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let bytes = rt
            .block_on(axum::body::to_bytes(response.into_body(), usize::MAX))
            .unwrap();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    fn chunk(content: &str) -> String {
        format!(
            "data: {{\"id\":\"x-1\",\"object\":\"chat.completion.chunk\",\"created\":9,\
             \"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{content},\"logprobs\":null,\
             \"finish_reason\":null}}]}}\n\n"
        )
    }

    #[test]
    fn chat_events_in_openai_order() {
        let got = body(
            Kind::Chat,
            false,
            vec![
                Event::Delta("Hi".into()),
                Event::Finished {
                    reason: FinishReason::Length,
                    prompt_tokens: 3,
                    completion_tokens: 1,
                },
            ],
        );
        let want = [
            chunk(r#"{"role":"assistant","content":""}"#),
            chunk(r#"{"content":"Hi"}"#),
            "data: {\"id\":\"x-1\",\"object\":\"chat.completion.chunk\",\"created\":9,\
             \"model\":\"m\",\"choices\":[{\"index\":0,\"delta\":{},\"logprobs\":null,\
             \"finish_reason\":\"length\"}]}\n\n"
                .to_string(),
            "data: [DONE]\n\n".to_string(),
        ]
        .concat();
        assert_eq!(got, want);
    }

    #[test]
    fn usage_chunk_comes_last_before_done() {
        let got = body(
            Kind::Completion,
            true,
            vec![Event::Finished {
                reason: FinishReason::Stop,
                prompt_tokens: 3,
                completion_tokens: 0,
            }],
        );
        let want = "data: {\"id\":\"x-1\",\"object\":\"text_completion\",\"created\":9,\
                    \"model\":\"m\",\"choices\":[{\"index\":0,\"text\":\"\",\"logprobs\":null,\
                    \"finish_reason\":\"stop\"}],\"usage\":null}\n\n\
                    data: {\"id\":\"x-1\",\"object\":\"text_completion\",\"created\":9,\
                    \"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\
                    \"completion_tokens\":0,\"total_tokens\":3}}\n\n\
                    data: [DONE]\n\n";
        assert_eq!(got, want);
    }

    #[test]
    fn a_failure_is_an_error_event_and_the_end() {
        let want_error = "event: error\ndata: {\"error\":{\"message\":\"boom\",\
                          \"type\":\"server_error\",\"param\":null,\"code\":null}}\n\n";
        let got = body(
            Kind::Chat,
            false,
            vec![
                Event::Delta("a".into()),
                Event::Failed("boom".into()),
                Event::Delta("b".into()),
            ],
        );
        let want = [
            chunk(r#"{"role":"assistant","content":""}"#),
            chunk(r#"{"content":"a"}"#),
            want_error.to_string(),
        ]
        .concat();
        assert_eq!(got, want);
        // The engine going away without a finish is a failure too.
        let got = body(Kind::Completion, false, vec![]);
        assert!(
            got.starts_with("event: error\ndata: {\"error\":{\"message\":\"the engine stopped"),
            "{got}"
        );
        assert!(!got.contains("[DONE]"));
    }
}
