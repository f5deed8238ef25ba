//! Who is calling: the API key a client presents and the trace id of its request, checked
//! against the in-memory control state (no I/O) as an axum extractor.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;
use uuid::Uuid;

use crate::control::ApiKeyInfo;
use crate::flow::REQUEST_ID;
use crate::http::AppState;

/// The caller of a `/v1/*` request.
pub(crate) struct Caller {
    /// The client's `x-request-id` if it is a sane one, else a new UUIDv7.
    pub trace_id: String,
    /// The key presented, if it is valid now.
    pub key: Option<ApiKeyInfo>,
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, Infallible> {
        Ok(Caller {
            trace_id: trace_id(&parts.headers),
            key: presented_key(&parts.headers)
                .and_then(|secret| state.services.control.authenticate(secret)),
        })
    }
}

/// The API key a client presented: `Authorization: Bearer`, `api-key` (Azure clients) or
/// `x-api-key` (Anthropic clients).
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    value("authorization")
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .or_else(|| value("api-key"))
        .or_else(|| value("x-api-key"))
        .map(str::trim)
}

fn trace_id(headers: &HeaderMap) -> String {
    headers
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| Uuid::now_v7().to_string(), str::to_owned)
}
