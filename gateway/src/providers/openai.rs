//! OpenAI, and every server that speaks its API (vLLM, Ollama, LM Studio, …).

use axum::http::{HeaderName, header};
use loom_schemas::ExposeSecret;
use serde_json::Value;

use super::{Adapter, Operation, path, with_model};
use crate::config::Upstream;

/// OpenAI, and every server that speaks its API.
pub struct OpenAi;

impl Adapter for OpenAi {
    fn url(&self, upstream: &Upstream, operation: Operation, _model: &str) -> String {
        format!("{}/{}", upstream.base_url, path(operation))
    }

    fn headers(&self, upstream: &Upstream) -> Vec<(HeaderName, String)> {
        let key = upstream.api_key.as_ref();
        key.map(|key| {
            (
                header::AUTHORIZATION,
                format!("Bearer {}", key.expose_secret()),
            )
        })
        .into_iter()
        .collect()
    }

    fn body(
        &self,
        _operation: Operation,
        model: &str,
        body: &Value,
    ) -> serde_json::Result<Vec<u8>> {
        with_model(body, model)
    }
}
