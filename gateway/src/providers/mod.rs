//! Provider adapters: how an OpenAI-shaped request becomes an upstream HTTP request, and how the
//! upstream's answer becomes OpenAI-shaped again. One file per upstream API; adding a provider is
//! a file with an [`Adapter`] and a line in [`adapter`].

pub mod anthropic;
mod azure;
mod openai;

use axum::body::Bytes;
use serde_json::Value;

use crate::config::{ProviderKind, Upstream};

/// What kind of call is being made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Chat,
    Embeddings,
}

/// Speaks one upstream API.
pub trait Adapter: Send + Sync {
    /// The upstream request for an OpenAI-shaped `body`, sent to `model` at `upstream`.
    fn request(
        &self,
        http: &reqwest::Client,
        upstream: &Upstream,
        operation: Operation,
        model: &str,
        body: &Value,
    ) -> reqwest::RequestBuilder;

    fn supports(&self, _operation: Operation) -> bool {
        true
    }

    /// The upstream's JSON answer in OpenAI's shape.
    fn answer(&self, body: Bytes) -> Bytes {
        body
    }

    /// What turns the upstream's stream events into OpenAI chunks, when they are not already.
    fn stream_translator(&self) -> Option<crate::anthropic::stream::StreamTranslator> {
        None
    }
}

/// The adapter for a provider kind.
pub fn adapter(kind: ProviderKind) -> &'static dyn Adapter {
    match kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => &openai::OpenAi,
        ProviderKind::Azure => &azure::Azure,
        ProviderKind::Anthropic => &anthropic::Anthropic,
    }
}

pub(crate) fn with_model(body: &Value, model: &str) -> Value {
    let mut body = body.clone();
    if let Some(object) = body.as_object_mut() {
        object.insert("model".into(), Value::String(model.to_owned()));
    }
    body
}

pub(crate) fn path(operation: Operation) -> &'static str {
    match operation {
        Operation::Chat => "chat/completions",
        Operation::Embeddings => "embeddings",
    }
}
