//! Which API a call speaks on each side of Loom. A client's call goes to an upstream that speaks
//! its API as sent (only the model is rewritten: `body`), and only otherwise is it translated:
//! the request on the way out, the answer and stream events on the way back. OpenAI chat is the
//! pivot: Anthropic Messages and OpenAI Responses calls become chat for chat upstreams, chat
//! becomes Messages for Anthropic upstreams, and Loom reads every answer as chat.
//!
//! What a translation cannot carry is noted in [`Dropped`]; per
//! `translation.unsupported_fields` it is recorded on the call or refused with a 400. What a
//! deployment cannot serve at all ([`Unservable`]: `previous_response_id` on a chat upstream) is
//! always refused there.

use axum::body::Bytes;
use serde_json::Value;

use crate::anthropic;
use crate::anthropic::stream::{MessagesEncoder, StreamTranslator};
use crate::providers::{Adapter, Operation};
use crate::responses;
use crate::responses::stream::{EventsToChunks, ResponsesEncoder};

/// The operation a client called and the one its upstream is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Leg {
    pub client: Operation,
    pub upstream: Operation,
}

impl Leg {
    /// How a `client` call reaches an upstream: natively if it speaks the API, else translated
    /// through chat; `None` if it can be neither.
    pub fn to(adapter: &dyn Adapter, client: Operation) -> Option<Leg> {
        let chat_like = matches!(
            client,
            Operation::Chat | Operation::Messages | Operation::Responses
        );
        let upstream = if adapter.supports(client) {
            client
        } else if chat_like && adapter.supports(Operation::Chat) {
            Operation::Chat
        } else if chat_like && adapter.supports(Operation::Messages) {
            Operation::Messages
        } else {
            return None;
        };
        Some(Leg { client, upstream })
    }

    pub fn native(self) -> bool {
        self.client == self.upstream
    }

    /// The request in the upstream's API, if it needs translating (a native request is sent as
    /// the client wrote it), and the fields the translation could not carry.
    pub fn request(self, body: &Value) -> Result<Option<(Value, Dropped)>, Unservable> {
        if self.native() {
            return Ok(None);
        }
        let mut dropped = Dropped::default();
        let translated_chat;
        let chat = match self.client {
            Operation::Chat => body,
            Operation::Messages => {
                translated_chat = anthropic::request::messages_to_chat(body, &mut dropped);
                &translated_chat
            }
            Operation::Responses => {
                translated_chat = responses::request::responses_to_chat(body, &mut dropped)?;
                &translated_chat
            }
            Operation::Embeddings => return Ok(None),
        };
        let translated = match self.upstream {
            Operation::Messages => anthropic::request::chat_to_messages(chat, &mut dropped),
            _ => chat.clone(),
        };
        Ok(Some((translated, dropped)))
    }

    /// The upstream's JSON answer as a chat completion (or embeddings answer): what Loom reads
    /// usage, the served model and tool calls from.
    pub fn observed(self, answer: Value) -> Value {
        match self.upstream {
            Operation::Messages => anthropic::response::message_to_chat(&answer),
            Operation::Responses => responses::response::response_to_chat(&answer),
            Operation::Chat | Operation::Embeddings => answer,
        }
    }

    /// What the client is sent: the upstream's bytes as they came when native, else `observed`
    /// in the client's API (`request` is the client's, for what a `response` echoes).
    pub fn answer(self, received: Bytes, observed: &Value, request: &Value) -> Bytes {
        if self.native() {
            return received;
        }
        Bytes::from(
            match self.client {
                Operation::Messages => anthropic::response::chat_to_message(observed),
                Operation::Responses => responses::response::chat_to_response(observed, request),
                Operation::Chat | Operation::Embeddings => {
                    return Bytes::from(observed.to_string());
                }
            }
            .to_string(),
        )
    }

    /// What turns the upstream's stream events into chat chunks, unless they are chunks already.
    pub fn chunks(self) -> Option<ToChunks> {
        match self.upstream {
            Operation::Messages => Some(ToChunks::Messages(StreamTranslator::default())),
            Operation::Responses => Some(ToChunks::Responses(EventsToChunks::default())),
            Operation::Chat | Operation::Embeddings => None,
        }
    }

    /// What a stream's client is sent.
    pub fn output(self, request: &Value) -> Output {
        match (self.native(), self.client) {
            (true, Operation::Chat) => Output::Chunks,
            (true, _) => Output::AsReceived,
            (false, Operation::Messages) => Output::Messages(Box::default()),
            (false, Operation::Responses) => {
                Output::Responses(Box::new(ResponsesEncoder::new(request)))
            }
            (false, _) => Output::Chunks,
        }
    }
}

/// The data of one chat completion chunk, as the translators make them from other APIs' events.
pub(crate) fn chat_chunk(id: &str, model: &str, delta: Value, finish: Value) -> String {
    serde_json::json!({
        "id": id, "object": "chat.completion.chunk",
        "created": loom_schemas::event::now_micros() / 1_000_000, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
    })
    .to_string()
}

/// Turns an upstream's stream events into chat chunks.
pub(crate) enum ToChunks {
    Messages(StreamTranslator),
    Responses(EventsToChunks),
}

impl ToChunks {
    /// The chunk data strings of one event (often none); `[DONE]` once the answer is over.
    pub fn translate(&mut self, event_type: &str, data: &str) -> Vec<String> {
        match self {
            ToChunks::Messages(translator) => translator.translate(event_type, data),
            ToChunks::Responses(translator) => translator.translate(event_type, data),
        }
    }
}

/// What a stream's client is sent.
pub(crate) enum Output {
    /// Chat chunks (the upstream's, or translated from its events).
    Chunks,
    /// Anthropic events made from chat chunks.
    Messages(Box<MessagesEncoder>),
    /// Responses events made from chat chunks.
    Responses(Box<ResponsesEncoder>),
    /// The upstream's events as received: it speaks the client's API.
    AsReceived,
}

impl Output {
    /// The frames a chat chunk becomes, for the encoders; `None` when chunks go out as they are.
    pub fn encode(&mut self, chunk: &Value) -> Option<Vec<String>> {
        match self {
            Output::Messages(encoder) => Some(encoder.encode(chunk)),
            Output::Responses(encoder) => Some(encoder.encode(chunk)),
            Output::AsReceived => Some(Vec::new()),
            Output::Chunks => None,
        }
    }

    /// An encoder's closing frames.
    pub fn finish(&mut self) -> Vec<String> {
        match self {
            Output::Messages(encoder) => encoder.finish(),
            Output::Responses(encoder) => encoder.finish(),
            Output::AsReceived | Output::Chunks => Vec::new(),
        }
    }
}

/// A request field a deployment cannot serve at all, whatever `unsupported_fields` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unservable {
    pub field: String,
    pub reason: &'static str,
}

impl Unservable {
    pub fn field(field: &str, reason: &'static str) -> Unservable {
        Unservable {
            field: field.to_owned(),
            reason,
        }
    }
}

/// At most this many dropped fields are named; the rest are counted.
const NAMED: usize = 32;

/// The fields of a request that a translation could not carry, by path
/// (`thinking`, `messages[0].content[1].cache_control`, `tools[2] (web_search_20250305)`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Dropped {
    named: Vec<String>,
    more: usize,
}

impl Dropped {
    /// Notes one dropped field (its path made only if it is named).
    pub fn note(&mut self, path: impl FnOnce() -> String) {
        if self.named.len() < NAMED {
            self.named.push(path());
        } else {
            self.more += 1;
        }
    }

    /// Notes every key of `object` (at `at`) that is not in `carried`.
    pub fn keys_besides(&mut self, object: &Value, at: &str, carried: &[&str]) {
        for key in object.as_object().into_iter().flat_map(|o| o.keys()) {
            if !carried.contains(&key.as_str()) {
                self.note(|| match at {
                    "" => key.clone(),
                    _ => format!("{at}.{key}"),
                });
            }
        }
    }

    /// The first dropped field, for a refusal that names it.
    pub fn first(&self) -> Option<&str> {
        self.named.first().map(String::as_str)
    }

    /// The paths, with `… and N more` when there were more than could be named.
    pub fn into_paths(self) -> Vec<String> {
        let mut paths = self.named;
        if self.more > 0 {
            paths.push(format!("… and {} more", self.more));
        }
        paths
    }
}
