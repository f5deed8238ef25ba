//! Provider adapters: where a request in an API the upstream speaks natively goes, and with which
//! headers. One file per upstream API; adding a provider is a file with an [`Adapter`] and a line
//! in [`adapter`]. Calls in an API the upstream does not speak are translated first (`translate`).

pub mod anthropic;
mod azure;
mod openai;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use serde::ser::{Serialize, SerializeMap, Serializer};
use serde_json::{Map, Value};

use crate::config::{ConfigError, ProviderKind, Upstream};

/// What kind of call is being made, in which API: OpenAI's chat completions, embeddings and
/// Responses, or Anthropic's Messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Chat,
    Embeddings,
    Messages,
    Responses,
}

impl Operation {
    pub const ALL: [Operation; 4] = [
        Operation::Chat,
        Operation::Embeddings,
        Operation::Messages,
        Operation::Responses,
    ];

    /// The operation's path under an API's base URL (`chat/completions`, …).
    pub fn name(self) -> &'static str {
        path(self)
    }
}

/// Speaks one upstream API.
pub trait Adapter: Send + Sync {
    /// Where `operation` on `model` is sent.
    fn url(&self, upstream: &Upstream, operation: Operation, model: &str) -> String;

    /// The headers every request to `upstream` carries (its key).
    fn headers(&self, upstream: &Upstream) -> Vec<(HeaderName, String)>;

    /// Whether the upstream speaks `operation`'s API natively.
    fn supports(&self, operation: Operation) -> bool;
}

/// The adapter for a provider kind.
pub fn adapter(kind: ProviderKind) -> &'static dyn Adapter {
    match kind {
        ProviderKind::Openai => &openai::OpenAi { responses: true },
        ProviderKind::OpenaiCompatible => &openai::OpenAi { responses: false },
        ProviderKind::Azure => &azure::Azure,
        ProviderKind::Anthropic => &anthropic::Anthropic,
    }
}

/// Where a deployment's requests go, parsed once at start-up rather than per request.
#[derive(Debug, Clone)]
pub struct Target {
    /// Per [`Operation`] (in [`Operation::ALL`]'s order): its URL, if the upstream supports it.
    urls: [Option<reqwest::Url>; 4],
    /// The upstream's key and fixed headers, marked sensitive.
    pub headers: HeaderMap,
}

impl Target {
    pub fn new(upstream: &Upstream, model: &str) -> Result<Target, ConfigError> {
        let adapter = adapter(upstream.kind);
        let invalid =
            |what: String| ConfigError::Invalid(format!("upstream {}: {what}", upstream.name));
        let mut urls = [None, None, None, None];
        for operation in Operation::ALL
            .into_iter()
            .filter(|&op| adapter.supports(op))
        {
            let url = adapter.url(upstream, operation, model);
            let parsed = reqwest::Url::parse(&url).map_err(|e| invalid(format!("{url}: {e}")))?;
            urls[operation as usize] = Some(parsed);
        }
        let mut headers = HeaderMap::new();
        for (name, value) in adapter.headers(upstream) {
            let mut value = HeaderValue::from_str(&value)
                .map_err(|_| invalid(format!("the value of header {name} is not valid")))?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        Ok(Target { urls, headers })
    }

    pub fn url(&self, operation: Operation) -> Option<&reqwest::Url> {
        self.urls[operation as usize].as_ref()
    }
}

/// `body` with its `model` set to `model`, serialized without copying the rest.
pub(crate) fn with_model(body: &Value, model: &str) -> serde_json::Result<Vec<u8>> {
    match body.as_object() {
        Some(object) => serde_json::to_vec(&WithModel { object, model }),
        None => serde_json::to_vec(body),
    }
}

struct WithModel<'a> {
    object: &'a Map<String, Value>,
    model: &'a str,
}

impl Serialize for WithModel<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let has_model = self.object.contains_key("model");
        let mut map =
            serializer.serialize_map(Some(self.object.len() + usize::from(!has_model)))?;
        if !has_model {
            map.serialize_entry("model", self.model)?;
        }
        for (key, value) in self.object {
            if key == "model" {
                map.serialize_entry(key, self.model)?;
            } else {
                map.serialize_entry(key, value)?;
            }
        }
        map.end()
    }
}

/// The path of an operation under an API's base URL (Messages is Anthropic's `messages`).
pub(crate) fn path(operation: Operation) -> &'static str {
    match operation {
        Operation::Chat => "chat/completions",
        Operation::Embeddings => "embeddings",
        Operation::Messages => "messages",
        Operation::Responses => "responses",
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn with_model_replaces_or_adds_the_model_and_keeps_everything_else() {
        let body =
            json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}], "seed": 7});
        let sent: Value = serde_json::from_slice(&with_model(&body, "gpt-4o").unwrap()).unwrap();
        assert_eq!(
            sent,
            json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "seed": 7})
        );
        let sent: Value =
            serde_json::from_slice(&with_model(&json!({"input": "x"}), "e5").unwrap()).unwrap();
        assert_eq!(sent, json!({"model": "e5", "input": "x"}));
    }
}
