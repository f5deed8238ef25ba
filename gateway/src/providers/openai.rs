//! OpenAI, and every server that speaks its API (vLLM, Ollama, LM Studio, …).

use axum::http::{HeaderName, header};
use loom_schemas::ExposeSecret;

use super::{Adapter, Operation, path};
use crate::config::Upstream;

/// OpenAI, and every server that speaks its API. Only OpenAI itself is taken to serve the
/// Responses API: other servers get Responses calls translated to chat.
pub struct OpenAi {
    pub responses: bool,
}

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

    fn supports(&self, operation: Operation) -> bool {
        match operation {
            Operation::Chat | Operation::Embeddings => true,
            Operation::Responses => self.responses,
            Operation::Messages => false,
        }
    }
}
