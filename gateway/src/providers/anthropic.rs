//! Anthropic's Messages API. OpenAI chat calls reach it translated (`crate::translate`).

use axum::http::HeaderName;
use loom_schemas::ExposeSecret;

use super::{Adapter, Operation};
use crate::anthropic::API_VERSION;
use crate::config::Upstream;

/// Anthropic's Messages API.
pub struct Anthropic;

impl Adapter for Anthropic {
    fn url(&self, upstream: &Upstream, _operation: Operation, _model: &str) -> String {
        format!("{}/messages", upstream.base_url)
    }

    /// The key and the API version (a client's own `anthropic-version` replaces it).
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

    fn supports(&self, operation: Operation) -> bool {
        operation == Operation::Messages
    }
}
