//! The gateway's one error type. What went wrong alone decides the HTTP status, OpenAI's `type`
//! and `code`, the `error_class` recorded in `request.completed`, and the body in the client's
//! dialect; no handler builds an error body or spells a code itself. Internals are logged where
//! they happen, never sent.

use axum::Json;
use axum::body::Bytes;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use loom_schemas::event::RequestStatus;
use loom_schemas::event::{QuotaMetric, QuotaScope};
use loom_schemas::quota::LimitKind;
use serde_json::{Value, json};

use crate::flow::Dialect;
use crate::quota::{Denial, reset_format};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GatewayError {
    /// The request is malformed or incomplete.
    InvalidRequest(String),
    /// No API key, or not a valid one.
    InvalidApiKey,
    /// The body is over `[limits] max_body_bytes`.
    BodyTooLarge {
        limit: usize,
    },
    /// No model alias by this name.
    ModelNotFound(String),
    /// The alias exists, but the routing policy of the key's project does not allow it.
    ModelNotAllowed(String),
    /// The project's security policy refuses the prompt: the rules that matched (ids only).
    PromptBlocked(Vec<String>),
    /// The project's security policy cut the answer (it chose `outputs: cut`): the rules.
    OutputBlocked(Vec<String>),
    /// The request may cost more than its project allows one request to (micro-USD).
    CostLimitExceeded {
        estimate: i64,
        limit: i64,
    },
    /// An upstream refused the request for reasons a retry will not change (its 4xx), passed on
    /// with its own message.
    UpstreamRefused {
        status: u16,
        fault: UpstreamFault,
        message: String,
    },
    /// Every upstream attempt failed; `fault` is the last one's.
    UpstreamFailed {
        fault: UpstreamFault,
    },
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// A stream broke off after it began (its status is sent already).
    StreamBroken(UpstreamFault),
    /// The client left before its answer was complete: recorded, never sent.
    ClientCancelled,
    /// The event queue is full: the request is refused before anything is sent upstream.
    EventQueueFull,
    /// The request's events were not recorded in time: it must not be answered as if they were.
    EventsUnavailable,
    RouteNotFound,
    MethodNotAllowed,
    /// The admin API is off (no admin token configured).
    AdminDisabled,
    InvalidAdminToken,
    /// The caller's role does not allow this (docs/roles.md); the message says what is needed.
    PermissionDenied(String),
    /// A budget or rate limit of one of the request's scopes has no room for it (429).
    Quota(Denial),
    /// The request is near a limit several gateways share, and the log did not say in time
    /// whether it fits.
    QuotaUnavailable,
    /// An admin API change made against a version that has moved on.
    Conflict(String),
    /// An admin API object that does not exist.
    NotFound(String),
    /// An admin API change for a tenant that is erased.
    TenantErased(String),
    /// Something broke inside Loom; the details are in the server's log.
    Internal(&'static str),
}

/// How an upstream attempt failed: the `error_class` its `llm_call.completed` records (and the
/// request's, when it was the last attempt), and whether another attempt may do better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFault {
    /// 429.
    RateLimited,
    /// No answer in time (or 408).
    Timeout,
    /// 401 or 403: the upstream's credentials are wrong.
    Auth,
    /// Any other 4xx.
    InvalidRequest,
    /// 5xx.
    ServerError,
    /// The connection could not be made.
    Connect,
    /// The connection broke.
    Transport,
    /// This upstream kind does not offer the operation (e.g. embeddings on Anthropic).
    Unsupported,
    /// A stream under way stopped sending.
    StreamStalled,
    /// A stream under way failed.
    StreamFailed,
    /// A stream ended before its end.
    StreamTruncated,
}

impl UpstreamFault {
    pub fn for_status(status: u16) -> UpstreamFault {
        match status {
            429 => UpstreamFault::RateLimited,
            408 => UpstreamFault::Timeout,
            401 | 403 => UpstreamFault::Auth,
            400..=499 => UpstreamFault::InvalidRequest,
            _ => UpstreamFault::ServerError,
        }
    }

    /// The recorded `error_class`.
    pub fn name(self) -> &'static str {
        match self {
            UpstreamFault::RateLimited => "rate_limited",
            UpstreamFault::Timeout => "timeout",
            UpstreamFault::Auth => "upstream_auth",
            UpstreamFault::InvalidRequest => "upstream_invalid_request",
            UpstreamFault::ServerError => "server_error",
            UpstreamFault::Connect => "connect_error",
            UpstreamFault::Transport => "transport_error",
            UpstreamFault::Unsupported => "unsupported_operation",
            UpstreamFault::StreamStalled => "upstream_timeout",
            UpstreamFault::StreamFailed => "upstream_stream_error",
            UpstreamFault::StreamTruncated => "upstream_truncated",
        }
    }

    /// Whether another attempt (or deployment) may succeed where this one failed.
    pub fn retryable(self) -> bool {
        !matches!(
            self,
            UpstreamFault::Auth | UpstreamFault::InvalidRequest | UpstreamFault::Unsupported
        )
    }
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::InvalidRequest(_)
            | GatewayError::CostLimitExceeded { .. }
            | GatewayError::PromptBlocked(_)
            | GatewayError::OutputBlocked(_) => StatusCode::BAD_REQUEST,
            GatewayError::InvalidApiKey | GatewayError::InvalidAdminToken => {
                StatusCode::UNAUTHORIZED
            }
            GatewayError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::ModelNotFound(_)
            | GatewayError::RouteNotFound
            | GatewayError::NotFound(_) => StatusCode::NOT_FOUND,
            GatewayError::UpstreamRefused { status, .. } => {
                StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            GatewayError::UpstreamFailed { .. } => StatusCode::BAD_GATEWAY,
            GatewayError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            // Sent in a stream whose status went out as 200.
            GatewayError::StreamBroken(_) => StatusCode::OK,
            // nginx's "client closed request"; no one is there to read it.
            GatewayError::ClientCancelled => {
                StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST)
            }
            GatewayError::EventQueueFull
            | GatewayError::EventsUnavailable
            | GatewayError::QuotaUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::AdminDisabled
            | GatewayError::PermissionDenied(_)
            | GatewayError::ModelNotAllowed(_) => StatusCode::FORBIDDEN,
            GatewayError::Conflict(_) => StatusCode::CONFLICT,
            GatewayError::TenantErased(_) => StatusCode::CONFLICT,
            GatewayError::Quota(_) => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's error `type`.
    pub fn kind(&self) -> &'static str {
        match self {
            GatewayError::InvalidRequest(_)
            | GatewayError::CostLimitExceeded { .. }
            | GatewayError::PromptBlocked(_)
            | GatewayError::OutputBlocked(_)
            | GatewayError::BodyTooLarge { .. }
            | GatewayError::ModelNotFound(_)
            | GatewayError::UpstreamRefused { .. }
            | GatewayError::RouteNotFound
            | GatewayError::MethodNotAllowed
            | GatewayError::NotFound(_)
            | GatewayError::TenantErased(_)
            | GatewayError::Conflict(_)
            | GatewayError::ClientCancelled
            | GatewayError::InvalidApiKey => "invalid_request_error",
            GatewayError::InvalidAdminToken => "authentication_error",
            // OpenAI's: SDKs do not retry `insufficient_quota`; a rate limit names what ran out.
            GatewayError::Quota(denial) if denial.is_budget() => "insufficient_quota",
            GatewayError::Quota(denial) => match denial.kind.metric() {
                QuotaMetric::Requests => "requests",
                _ => "tokens",
            },
            GatewayError::AdminDisabled
            | GatewayError::PermissionDenied(_)
            | GatewayError::ModelNotAllowed(_) => "permission_error",
            GatewayError::UpstreamFailed { .. }
            | GatewayError::UpstreamTimeout
            | GatewayError::StreamBroken(_)
            | GatewayError::EventQueueFull
            | GatewayError::EventsUnavailable
            | GatewayError::QuotaUnavailable
            | GatewayError::Internal(_) => "server_error",
        }
    }

    /// OpenAI's error `code`.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::InvalidRequest(_) => "invalid_request",
            GatewayError::InvalidApiKey => "invalid_api_key",
            GatewayError::BodyTooLarge { .. } => "request_too_large",
            GatewayError::ModelNotFound(_) => "model_not_found",
            GatewayError::ModelNotAllowed(_) => "model_not_allowed",
            GatewayError::CostLimitExceeded { .. } => "request_cost_limit_exceeded",
            GatewayError::PromptBlocked(_) => "prompt_blocked_by_policy",
            GatewayError::OutputBlocked(_) => "output_blocked_by_policy",
            // A deployment that cannot take the request: Loom's refusal, not the upstream's.
            GatewayError::UpstreamRefused {
                fault: UpstreamFault::Unsupported,
                ..
            } => UpstreamFault::Unsupported.name(),
            GatewayError::UpstreamRefused { .. } | GatewayError::UpstreamFailed { .. } => {
                "upstream_error"
            }
            GatewayError::UpstreamTimeout => "upstream_timeout",
            GatewayError::StreamBroken(fault) => fault.name(),
            GatewayError::ClientCancelled => "client_cancelled",
            GatewayError::EventQueueFull => "event_queue_full",
            GatewayError::EventsUnavailable => "events_unavailable",
            GatewayError::QuotaUnavailable => "quota_unavailable",
            GatewayError::RouteNotFound | GatewayError::NotFound(_) => "not_found",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::AdminDisabled => "admin_api_disabled",
            GatewayError::PermissionDenied(_) => "permission_denied",
            GatewayError::Quota(denial) if denial.is_budget() => match denial.scope {
                QuotaScope::Tenant => "tenant_budget_exceeded",
                QuotaScope::Project => "project_budget_exceeded",
                QuotaScope::User => "user_budget_exceeded",
                QuotaScope::ApiKey => "key_budget_exceeded",
            },
            GatewayError::Quota(_) => "rate_limit_exceeded",
            GatewayError::Conflict(_) => "conflict",
            GatewayError::InvalidAdminToken => "invalid_admin_token",
            GatewayError::TenantErased(_) => "tenant_erased",
            GatewayError::Internal(_) => "internal_error",
        }
    }

    /// What `request.completed` records as the request's `error_class`.
    pub fn error_class(&self) -> &'static str {
        match self {
            GatewayError::UpstreamRefused { fault, .. }
            | GatewayError::UpstreamFailed { fault }
            | GatewayError::StreamBroken(fault) => fault.name(),
            GatewayError::UpstreamTimeout => "timeout",
            other => other.code(),
        }
    }

    /// What `request.completed` records as the request's status.
    pub fn request_status(&self) -> RequestStatus {
        match self {
            GatewayError::InvalidApiKey
            | GatewayError::PermissionDenied(_)
            | GatewayError::ModelNotAllowed(_)
            | GatewayError::CostLimitExceeded { .. }
            | GatewayError::PromptBlocked(_)
            | GatewayError::OutputBlocked(_)
            | GatewayError::Quota(_) => RequestStatus::Denied,
            _ => RequestStatus::Error,
        }
    }

    /// The message for the client.
    pub fn message(&self) -> String {
        match self {
            GatewayError::InvalidRequest(message)
            | GatewayError::NotFound(message)
            | GatewayError::PermissionDenied(message)
            | GatewayError::ModelNotAllowed(message)
            | GatewayError::Conflict(message)
            | GatewayError::UpstreamRefused { message, .. }
            | GatewayError::TenantErased(message) => message.clone(),
            GatewayError::InvalidApiKey => "missing or invalid API key".into(),
            GatewayError::PromptBlocked(rules) => format!(
                "the prompt was refused by your project's security policy (rules: {})",
                rules.join(", ")
            ),
            GatewayError::OutputBlocked(rules) => format!(
                "the answer was cut by your project's security policy (rules: {})",
                rules.join(", ")
            ),
            GatewayError::Quota(denial) => quota_message(denial),
            GatewayError::CostLimitExceeded { estimate, limit } => format!(
                "this request may cost up to ${:.6} (its prompt and the output it may ask for), \
                 above your project's limit of ${:.6} per request: lower `max_tokens`",
                *estimate as f64 / 1e6,
                *limit as f64 / 1e6
            ),
            GatewayError::BodyTooLarge { limit } => {
                format!("the request body is larger than {limit} bytes")
            }
            GatewayError::ModelNotFound(alias) => {
                format!("The model `{alias}` does not exist or you do not have access to it.")
            }
            GatewayError::UpstreamFailed { fault } => {
                format!(
                    "every upstream attempt failed; last error: {}",
                    fault.name()
                )
            }
            GatewayError::UpstreamTimeout => "the upstream did not answer in time".into(),
            GatewayError::StreamBroken(fault) => match fault {
                UpstreamFault::StreamStalled => "the upstream stopped sending",
                UpstreamFault::StreamTruncated => "the upstream stream ended early",
                _ => "the upstream stream failed",
            }
            .into(),
            GatewayError::Internal(message) => (*message).into(),
            GatewayError::ClientCancelled => "the client closed the connection".into(),
            GatewayError::EventQueueFull => {
                "Loom cannot record more requests right now; retry shortly".into()
            }
            GatewayError::EventsUnavailable => {
                "Loom could not record this request; retry shortly".into()
            }
            GatewayError::QuotaUnavailable => {
                "this request is near a budget several gateways share, and whether it fits could \
                 not be settled in time; retry shortly"
                    .into()
            }
            GatewayError::RouteNotFound => "no such route".into(),
            GatewayError::MethodNotAllowed => "method not allowed on this route".into(),
            GatewayError::AdminDisabled => {
                "the operator's admin API is disabled: start Loom with LOOM_ADMIN_TOKEN set \
                 (a tenant's API key with a role that allows it manages its own tenant)"
                    .into()
            }
            GatewayError::InvalidAdminToken => "missing or wrong admin token or API key".into(),
        }
    }

    /// The error body in `dialect`.
    pub fn body(&self, dialect: Dialect) -> Value {
        match dialect {
            Dialect::OpenAi => json!({"error": {
                "message": self.message(),
                "type": self.kind(),
                "param": null,
                "code": self.code(),
            }}),
            Dialect::Anthropic => json!({"type": "error", "error": {
                "type": self.anthropic_kind(),
                "message": self.message(),
            }}),
        }
    }

    /// Anthropic's error type for this error.
    fn anthropic_kind(&self) -> &'static str {
        if matches!(self, GatewayError::StreamBroken(_)) {
            return "api_error";
        }
        match self.status().as_u16() {
            400 | 413 | 422 => "invalid_request_error",
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        }
    }

    /// The error as a response in `dialect`: a 429 says when to retry (`retry-after`, in
    /// seconds), and a spent budget that retrying sooner will not help (`x-should-retry`, which
    /// OpenAI's SDKs obey).
    pub fn response(&self, dialect: Dialect) -> Response {
        let mut response = (self.status(), Json(self.body(dialect))).into_response();
        if let GatewayError::Quota(denial) = self {
            let seconds =
                denial.retry_after.as_secs() + u64::from(denial.retry_after.subsec_nanos() > 0);
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            if denial.is_budget() {
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
        }
        if let GatewayError::QuotaUnavailable = self {
            let headers = response.headers_mut();
            headers.insert(header::RETRY_AFTER, HeaderValue::from(1));
        }
        response
    }

    /// The error as a server-sent event in `dialect`, for a stream already under way.
    pub fn sse_frame(&self, dialect: Dialect) -> Bytes {
        let body = self.body(dialect);
        Bytes::from(match dialect {
            Dialect::OpenAi => format!("data: {body}\n\n"),
            Dialect::Anthropic => format!("event: error\ndata: {body}\n\n"),
        })
    }
}

/// What ran out, how much was used, and when there is room again.
fn quota_message(denial: &Denial) -> String {
    let whose = match denial.scope {
        QuotaScope::Tenant => "your organization's".to_owned(),
        QuotaScope::Project => format!("project {}'s", denial.scope_id),
        QuotaScope::User => format!("user {:?}'s", denial.scope_id),
        QuotaScope::ApiKey => format!("API key {}'s", denial.scope_id),
    };
    let wait = reset_format(denial.retry_after);
    let (limit, used) = (denial.limit, denial.used);
    match denial.kind {
        LimitKind::TokensPerDay => format!(
            "You exceeded {whose} daily token budget: {used} of {limit} tokens used or reserved \
             today, and this request may use more than is left. It resets in {wait}; ask an \
             admin to raise it, or lower `max_tokens`."
        ),
        LimitKind::CostPerDay => format!(
            "You exceeded {whose} daily budget: ${:.6} of ${:.6} used or reserved today, and \
             this request may cost more than is left. It resets in {wait}; ask an admin to \
             raise it, or lower `max_tokens`.",
            used as f64 / 1e6,
            limit as f64 / 1e6
        ),
        LimitKind::RequestsPerMinute => format!(
            "Rate limit reached for {whose} requests per min (RPM): Limit {limit}, Used {used}, \
             Requested 1. Please try again in {wait}."
        ),
        LimitKind::TokensPerMinute => format!(
            "Rate limit reached for {whose} tokens per min (TPM): Limit {limit}, Used {used}. \
             Please try again in {wait}; a request that may use more than {limit} tokens never \
             fits: lower `max_tokens`."
        ),
    }
}

/// Outside the data plane (admin API, routes) errors are OpenAI-shaped.
impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        self.response(Dialect::OpenAi)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_error_one_status_one_code_in_both_dialects() {
        let error = GatewayError::ModelNotFound("gpt-5".into());
        assert_eq!(error.status(), StatusCode::NOT_FOUND);
        assert_eq!(
            error.body(Dialect::OpenAi)["error"]["code"],
            "model_not_found"
        );
        assert_eq!(
            error.body(Dialect::Anthropic)["error"]["type"],
            "not_found_error"
        );
        assert_eq!(error.error_class(), "model_not_found");
        let timeout = GatewayError::UpstreamTimeout;
        assert_eq!(
            (
                timeout.status().as_u16(),
                timeout.code(),
                timeout.error_class()
            ),
            (504, "upstream_timeout", "timeout")
        );
        assert_eq!(
            GatewayError::InvalidApiKey.request_status(),
            RequestStatus::Denied
        );
        let broken = GatewayError::StreamBroken(UpstreamFault::StreamTruncated);
        assert_eq!(broken.error_class(), "upstream_truncated");
        assert!(
            String::from_utf8_lossy(&broken.sse_frame(Dialect::Anthropic))
                .starts_with("event: error\ndata: ")
        );
    }
}
