//! Azure OpenAI.

use loom_schemas::ExposeSecret;
use serde_json::Value;

use super::{Adapter, Operation, path, with_model};
use crate::config::Upstream;

/// Azure OpenAI: the deployment is in the URL, the key in `api-key`.
pub struct Azure;

impl Adapter for Azure {
    fn request(
        &self,
        http: &reqwest::Client,
        upstream: &Upstream,
        operation: Operation,
        model: &str,
        body: &Value,
    ) -> reqwest::RequestBuilder {
        let mut request = http
            .post(format!(
                "{}/openai/deployments/{model}/{}",
                upstream.base_url,
                path(operation)
            ))
            .query(&[(
                "api-version",
                upstream.api_version.as_deref().unwrap_or_default(),
            )])
            .json(&with_model(body, model));
        if let Some(key) = &upstream.api_key {
            request = request.header("api-key", key.expose_secret());
        }
        request
    }
}
