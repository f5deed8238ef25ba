//! Anthropic upstreams over HTTP: chat requests go out as Messages requests, and answers and
//! stream events come back as OpenAI chat (the translations are in `crate::anthropic`).

use axum::body::Bytes;
use loom_schemas::ExposeSecret;
use serde_json::Value;

use super::{Adapter, Operation};
use crate::anthropic::API_VERSION;
use crate::anthropic::request::chat_to_messages;
use crate::anthropic::response::message_to_chat;
use crate::anthropic::stream::StreamTranslator;
use crate::config::Upstream;

/// Anthropic's Messages API, translated to and from OpenAI chat.
pub struct Anthropic;

impl Adapter for Anthropic {
    fn request(
        &self,
        http: &reqwest::Client,
        upstream: &Upstream,
        _operation: Operation,
        model: &str,
        body: &Value,
    ) -> reqwest::RequestBuilder {
        let mut request = http
            .post(format!("{}/messages", upstream.base_url))
            .header("anthropic-version", API_VERSION)
            .json(&chat_to_messages(body, model));
        if let Some(key) = &upstream.api_key {
            request = request.header("x-api-key", key.expose_secret());
        }
        request
    }

    fn supports(&self, operation: Operation) -> bool {
        operation == Operation::Chat
    }

    fn answer(&self, body: Bytes) -> Bytes {
        match serde_json::from_slice::<Value>(&body) {
            Ok(message) => Bytes::from(message_to_chat(&message).to_string()),
            Err(_) => body,
        }
    }

    fn stream_translator(&self) -> Option<StreamTranslator> {
        Some(StreamTranslator::default())
    }
}
