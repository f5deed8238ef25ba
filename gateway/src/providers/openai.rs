//! OpenAI, and every server that speaks its API (vLLM, Ollama, LM Studio, …).

use loom_schemas::ExposeSecret;
use serde_json::Value;

use super::{Adapter, Operation, path, with_model};
use crate::config::Upstream;

/// OpenAI, and every server that speaks its API.
pub struct OpenAi;

impl Adapter for OpenAi {
    fn request(
        &self,
        http: &reqwest::Client,
        upstream: &Upstream,
        operation: Operation,
        model: &str,
        body: &Value,
    ) -> reqwest::RequestBuilder {
        let request = http
            .post(format!("{}/{}", upstream.base_url, path(operation)))
            .json(&with_model(body, model));
        match &upstream.api_key {
            Some(key) => request.bearer_auth(key.expose_secret()),
            None => request,
        }
    }
}
