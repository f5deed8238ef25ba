//! Anthropic upstreams over HTTP: chat requests go out as Messages requests, and answers and
//! stream events come back as OpenAI chat (the translations are in `crate::anthropic`).

use axum::body::Bytes;
use axum::http::HeaderName;
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
    fn url(&self, upstream: &Upstream, _operation: Operation, _model: &str) -> String {
        format!("{}/messages", upstream.base_url)
    }

    fn headers(&self, upstream: &Upstream) -> Vec<(HeaderName, String)> {
        let mut headers = vec![(
            HeaderName::from_static("anthropic-version"),
            API_VERSION.to_owned(),
        )];
        if let Some(key) = &upstream.api_key {
            let name = HeaderName::from_static("x-api-key");
            headers.push((name, key.expose_secret().to_owned()));
        }
        headers
    }

    fn body(
        &self,
        _operation: Operation,
        model: &str,
        body: &Value,
    ) -> serde_json::Result<Vec<u8>> {
        serde_json::to_vec(&chat_to_messages(body, model))
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
