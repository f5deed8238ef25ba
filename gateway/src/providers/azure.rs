//! Azure OpenAI.

use axum::http::HeaderName;
use loom_schemas::ExposeSecret;

use super::{Adapter, Operation, path};
use crate::config::Upstream;

/// Azure OpenAI: the deployment is in the URL (in the body for the Responses API, served on
/// Azure's v1 API), the key in `api-key`.
pub struct Azure;

impl Adapter for Azure {
    fn url(&self, upstream: &Upstream, operation: Operation, model: &str) -> String {
        if operation == Operation::Responses {
            return format!("{}/openai/v1/responses", upstream.base_url);
        }
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

    fn supports(&self, operation: Operation) -> bool {
        operation != Operation::Messages
    }
}
