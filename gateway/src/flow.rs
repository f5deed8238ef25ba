//! One request on its way through the gateway: who sent it, in which dialect, and the time spent
//! in Loom and outside it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use axum::response::Response;
use loom_schemas::keystore::KeyStore;
use loom_schemas::project::{CacheFlag, RoutingPolicy};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::control::{ApiKeyInfo, Control};
use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::policy::Policy;
use crate::quota::Reservation;
use crate::telemetry::RequestSpan;

/// The header carrying the trace id, honoured when a client sends one.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Time spent in Loom itself, excluding upstream calls and retry waits, in microseconds.
pub const OVERHEAD: HeaderName = HeaderName::from_static("x-loom-overhead-us");

/// The API a client speaks: how its requests, answers and errors are shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    OpenAi,
    /// Anthropic's Messages API (`/v1/messages`).
    Anthropic,
}

pub(crate) struct Flow {
    pub dialect: Dialect,
    pub gateway: Arc<Gateway>,
    pub producer: Arc<str>,
    pub keys: Arc<KeyStore>,
    pub trace_id: String,
    pub tenant_id: Uuid,
    pub key: Option<ApiKeyInfo>,
    /// The end user the request is for (`x-loom-user`, or the body's `user`), if named.
    pub user: Option<Box<str>>,
    pub control: Control,
    /// What the request reserved of its quotas, until it is settled.
    pub quota: Option<Reservation>,
    /// The routing policy of the key's project, if it is bound to one.
    pub policy: Option<Arc<RoutingPolicy>>,
    /// The security policy of the key's project (the default one outside a project); none
    /// without a key.
    pub security: Option<Arc<Policy>>,
    /// Where the answer is kept when the key's project has the response cache on: the project,
    /// its flag and the request's key.
    pub cache: Option<(Uuid, CacheFlag, Vec<u8>)>,
    /// The client's headers that upstreams speaking its API get too (`anthropic-beta`, …).
    pub forwarded: HeaderMap,
    pub started: Instant,
    /// Time spent waiting on upstreams and between retries.
    pub outside: Duration,
    pub attempts: i32,
    /// Cancelled when the client hangs up before its answer: the request runs on to record
    /// what the upstream answered (see `http::v1::to_completion`).
    pub client_left: CancellationToken,
    /// Its trace context, when spans are exported and its trace is sampled.
    pub span: Option<RequestSpan>,
}

impl Flow {
    pub fn overhead(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.outside)
    }

    /// Headers every response carries.
    pub fn headers(&self, response: &mut Response) {
        set_headers(response, &self.trace_id, self.overhead());
        self.rate_headers(response.headers_mut());
    }

    /// An error in the client's dialect, with the usual headers.
    pub fn error_response(&self, error: &GatewayError) -> Response {
        let mut response = error.response(self.dialect);
        self.headers(&mut response);
        response
    }
}

/// `x-request-id` and `x-loom-overhead-us` on `response`.
pub(crate) fn set_headers(response: &mut Response, trace_id: &str, overhead: Duration) {
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(trace_id) {
        headers.insert(REQUEST_ID, value);
    }
    if let Ok(value) = HeaderValue::from_str(&overhead.as_micros().to_string()) {
        headers.insert(OVERHEAD, value);
    }
}

pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}
