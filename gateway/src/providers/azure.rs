//! Azure OpenAI.

use axum::http::HeaderName;
use loom_schemas::ExposeSecret;
use serde_json::Value;

use super::{Adapter, Operation, path, with_model};
use crate::config::Upstream;

/// Azure OpenAI: the deployment is in the URL, the key in `api-key`.
pub struct Azure;

impl Adapter for Azure {
    fn url(&self, upstream: &Upstream, operation: Operation, model: &str) -> String {
        let url = format!(
            "{}/openai/deployments/{model}/{}",
            upstream.base_url,
            path(operation)
        );
        let version = upstream.api_version.as_deref().unwrap_or_default();
        // An unparsable URL is reported as such when the deployment's target is built.
        reqwest::Url::parse_with_params(&url, [("api-version", version)]).map_or(url, String::from)
    }

    fn headers(&self, upstream: &Upstream) -> Vec<(HeaderName, String)> {
        let key = upstream.api_key.as_ref();
        key.map(|key| {
            (
                HeaderName::from_static("api-key"),
                key.expose_secret().to_owned(),
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
