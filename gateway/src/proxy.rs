//! The data plane: `/v1/chat/completions`, `/v1/embeddings` and `/v1/models`, with routing,
//! retries, fallbacks, streaming and the event trail of every request.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use loom_schemas::crypto::FieldContext;
use loom_schemas::event::{
    CallStatus, Envelope, Event, LlmCallCompleted, Payload, RequestCompleted, RequestReceived,
    RequestStatus, RouteCandidate, RoutingDecided, Sealed, ToolCallDirection, ToolCallObserved,
    now_micros,
};
use serde_json::{Value, json};
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::config::{GatewayConfig, Strategy};
use crate::control::ApiKeyInfo;
use crate::events::Emitter;
use crate::http::{ApiError, AppState};
use crate::messages_api;
use crate::providers::{Operation, adapter};
use crate::stream::ChatStream;
use crate::tokens;

/// The data plane's shared state.
pub struct Gateway {
    pub config: Arc<GatewayConfig>,
    pub http: reqwest::Client,
    pub emitter: Emitter,
    /// Background work of requests (events of a stream whose client went away), drained on
    /// shutdown.
    pub tasks: TaskTracker,
    /// Per deployment: skipped until this time (µs since the epoch).
    cooldown_until: Vec<AtomicI64>,
}

impl Gateway {
    pub fn new(
        config: GatewayConfig,
        emitter: Emitter,
        tasks: TaskTracker,
    ) -> Result<Gateway, reqwest::Error> {
        let http = reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(10))
            .build()?;
        let cooldown_until = config
            .deployments
            .iter()
            .map(|_| AtomicI64::new(0))
            .collect();
        Ok(Gateway {
            config: Arc::new(config),
            http,
            emitter,
            tasks,
            cooldown_until,
        })
    }

    fn cooling_down(&self, deployment: usize, now: i64) -> bool {
        self.cooldown_until
            .get(deployment)
            .is_some_and(|until| until.load(Ordering::Relaxed) > now)
    }

    fn cool_down(&self, deployment: usize) {
        if let Some(until) = self.cooldown_until.get(deployment) {
            let cooldown =
                i64::try_from(self.config.routing.cooldown.as_micros()).unwrap_or(i64::MAX);
            until.store(now_micros().saturating_add(cooldown), Ordering::Relaxed);
        }
    }
}

/// The header carrying the trace id, honoured when a client sends one.
pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Time spent in Loom itself, excluding upstream calls and retry waits, in microseconds.
pub const OVERHEAD: HeaderName = HeaderName::from_static("x-loom-overhead-us");

/// The API a client speaks: how its requests, answers and errors are shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    OpenAi,
    /// Anthropic's Messages API (`/v1/messages`), translated to and from OpenAI chat.
    Anthropic,
}

/// One request on its way through the gateway: who, what, and the time spent upstream.
pub(crate) struct Flow {
    pub dialect: Dialect,
    pub gateway: Arc<Gateway>,
    pub producer: Arc<str>,
    pub keys: Arc<loom_schemas::keystore::KeyStore>,
    pub trace_id: String,
    pub tenant_id: Uuid,
    pub key: Option<ApiKeyInfo>,
    pub started: Instant,
    /// Time spent waiting on upstreams and between retries.
    pub outside: Duration,
    pub attempts: i32,
}

impl Flow {
    pub fn event(&self, payload: impl Into<Payload>) -> Event {
        Event {
            envelope: Envelope::new(self.tenant_id, Some(self.trace_id.clone()), &*self.producer),
            payload: payload.into(),
        }
    }

    /// Seals `plaintext` as `field` of `event_id`; `None` if the tenant has no key (never for an
    /// authenticated request).
    pub fn seal(&self, event_id: Uuid, field: &str, plaintext: &[u8]) -> Option<Sealed> {
        let ctx = FieldContext {
            tenant_id: self.tenant_id,
            event_id,
            field,
        };
        match self.keys.seal(&ctx, plaintext) {
            Ok(sealed) => Some(sealed),
            Err(error) => {
                tracing::error!(%error, tenant = %self.tenant_id, "could not seal a body");
                None
            }
        }
    }

    /// The cost of `usage` on a deployment, if its price is known.
    pub fn cost(
        &self,
        deployment: usize,
        served_model: Option<&str>,
        usage: &Usage,
    ) -> Option<i64> {
        let config = &self.gateway.config;
        let deployment = config.deployments.get(deployment)?;
        let provider = config.upstreams.get(deployment.upstream)?.kind;
        config
            .prices
            .cost_of(provider, &deployment.model, served_model, usage)
    }

    pub fn overhead(&self) -> Duration {
        self.started.elapsed().saturating_sub(self.outside)
    }

    /// Headers every response carries.
    pub fn headers(&self, response: &mut Response) {
        let headers = response.headers_mut();
        if let Ok(value) = HeaderValue::from_str(&self.trace_id) {
            headers.insert(REQUEST_ID, value);
        }
        if let Ok(value) = HeaderValue::from_str(&self.overhead().as_micros().to_string()) {
            headers.insert(OVERHEAD, value);
        }
    }

    /// The `request.completed` event for an outcome.
    pub fn completed(&self, outcome: &Outcome) -> Event {
        self.event(RequestCompleted {
            status: outcome.status,
            http_status: i32::from(outcome.http_status),
            error_class: outcome.error_class.clone(),
            model: outcome.model.clone(),
            provider: outcome.provider.clone(),
            deployment: outcome.deployment.clone(),
            attempts: self.attempts,
            tokens_in: outcome.usage.tokens_in,
            tokens_out: outcome.usage.tokens_out,
            tokens_cached_read: outcome.usage.tokens_cached_read,
            tokens_cache_creation: outcome.usage.tokens_cache_creation,
            usage_estimated: outcome.usage.estimated,
            cost_micro_usd: outcome.cost_micro_usd,
            latency_us: micros(self.started.elapsed()),
            ttft_us: outcome.ttft.map(micros),
            overhead_us: micros(self.overhead()),
        })
    }

    /// Ends a request with an error: `request.completed`, then the OpenAI-style error response.
    pub async fn fail(
        &self,
        error: ApiError,
        status: RequestStatus,
        error_class: &str,
    ) -> Response {
        let outcome = Outcome {
            status,
            http_status: error.status.as_u16(),
            error_class: Some(error_class.to_owned()),
            ..Outcome::default()
        };
        self.fail_with(&outcome, error).await
    }

    /// Ends a request with an error whose outcome says more (deployment, provider).
    pub async fn fail_with(&self, outcome: &Outcome, error: ApiError) -> Response {
        match self.complete(outcome).await {
            Ok(()) => self.error_response(error),
            Err(unrecorded) => self.error_response(unrecorded),
        }
    }

    /// Records `request.completed` for `outcome`, waiting as `--events-ack` says. The answer
    /// goes out only after `Ok`; `Err` is the answer instead (503: the events were not recorded).
    pub async fn complete(&self, outcome: &Outcome) -> Result<(), ApiError> {
        self.gateway
            .emitter
            .record(self.completed(outcome))
            .await
            .map_err(|_| ApiError::events_unavailable())
    }

    /// An error in the client's dialect, with the usual headers.
    pub fn error_response(&self, error: ApiError) -> Response {
        let mut response = match self.dialect {
            Dialect::OpenAi => error.into_response(),
            Dialect::Anthropic => {
                let kind = messages_api::error_type(error.status.as_u16());
                (
                    error.status,
                    Json(messages_api::error_body(kind, &error.message)),
                )
                    .into_response()
            }
        };
        self.headers(&mut response);
        response
    }
}

pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros()).unwrap_or(i64::MAX)
}

/// Token counts of a call: as the upstream reported them, or estimated by Loom.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    pub tokens_cached_read: Option<i64>,
    pub tokens_cache_creation: Option<i64>,
    /// Counted by Loom because the upstream reported nothing.
    pub estimated: bool,
}

impl Usage {
    /// Reads OpenAI's `usage` object.
    pub fn from_openai(usage: &Value) -> Usage {
        let int = |pointer: &str| usage.pointer(pointer).and_then(Value::as_i64);
        let tokens_in = int("/prompt_tokens");
        // Embeddings report only prompt and total tokens: what is left over is the output (0).
        let tokens_out = int("/completion_tokens")
            .or_else(|| Some(int("/total_tokens")? - tokens_in?).filter(|out| *out >= 0));
        Usage {
            tokens_in,
            tokens_out,
            tokens_cached_read: int("/prompt_tokens_details/cached_tokens"),
            tokens_cache_creation: int("/prompt_tokens_details/cache_creation_tokens"),
            estimated: false,
        }
    }

    /// Counts the tokens of a request and of the text answered, for upstreams that report none.
    pub fn estimate(request: &Value, answered: &str) -> Usage {
        Usage {
            tokens_in: Some(tokens::prompt_tokens(request)),
            tokens_out: Some(tokens::count(answered)),
            estimated: true,
            ..Usage::default()
        }
    }
}

/// How a request ended, for `request.completed`.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: RequestStatus,
    pub http_status: u16,
    pub error_class: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub deployment: Option<String>,
    pub usage: Usage,
    pub cost_micro_usd: Option<i64>,
    pub ttft: Option<Duration>,
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            status: RequestStatus::Ok,
            http_status: 200,
            error_class: None,
            model: None,
            provider: None,
            deployment: None,
            usage: Usage::default(),
            cost_micro_usd: None,
            ttft: None,
        }
    }
}

/// The API key a client presented: `Authorization: Bearer`, `api-key` (Azure clients) or
/// `x-api-key` (Anthropic clients).
fn presented_key(headers: &HeaderMap) -> Option<&str> {
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

/// The client's `x-request-id` if it is a sane one, else a new UUIDv7.
fn trace_id(headers: &HeaderMap) -> String {
    headers
        .get(&REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map_or_else(|| Uuid::now_v7().to_string(), str::to_owned)
}

/// Starts a request: identifies the caller, reads and parses the body, and queues
/// `request.received`. `Err` is the response to send (its events already queued).
pub(crate) async fn begin(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    endpoint: &'static str,
    dialect: Dialect,
) -> Result<(Flow, Value, Bytes), Response> {
    let gateway = Arc::clone(&state.gateway);
    let key = presented_key(headers).and_then(|secret| state.services.control.authenticate(secret));
    let flow = Flow {
        dialect,
        gateway: Arc::clone(&gateway),
        producer: Arc::clone(&state.services.producer),
        keys: Arc::clone(&state.services.keys),
        trace_id: trace_id(headers),
        tenant_id: key.as_ref().map_or(Uuid::nil(), |k| k.tenant_id),
        key,
        started: Instant::now(),
        outside: Duration::ZERO,
        attempts: 0,
    };
    let limit = gateway.config.limits.max_body_bytes;
    let read = axum::body::to_bytes(body, limit).await;
    let bytes = read.as_ref().ok().cloned().unwrap_or_default();
    let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
    let field = |name: &str| parsed.as_ref().and_then(|v| v.get(name));
    let received = flow.event(RequestReceived {
        endpoint: endpoint.to_owned(),
        project_id: flow.key.as_ref().and_then(|k| k.project_id),
        api_key_id: flow.key.as_ref().map(|k| k.key_id),
        user: field("user").and_then(Value::as_str).map(str::to_owned),
        model: field("model")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        stream: field("stream").and_then(Value::as_bool).unwrap_or(false),
        user_agent: headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body_bytes: i64::try_from(bytes.len()).unwrap_or(i64::MAX),
        body_digest: Vec::new(),
        body: None,
    });
    let received = if flow.key.is_some() {
        seal_received(&flow, received, &bytes)
    } else {
        received
    };
    if gateway.emitter.admit(received).await.is_err() {
        return Err(flow.error_response(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "event_queue_full",
            "Loom cannot record more requests right now; retry shortly",
        )));
    }
    if flow.key.is_none() {
        let error = ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing or invalid API key",
        );
        return Err(flow
            .fail(error, RequestStatus::Denied, "invalid_api_key")
            .await);
    }
    if read.is_err() {
        let error = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than {limit} bytes"),
        );
        return Err(flow
            .fail(error, RequestStatus::Error, "request_too_large")
            .await);
    }
    let Some(parsed) = parsed.filter(Value::is_object) else {
        let error = ApiError::invalid_request("the request body is not a JSON object");
        return Err(flow
            .fail(error, RequestStatus::Error, "invalid_request")
            .await);
    };
    // The tool results a client sends back close the loop on earlier tool calls.
    if let Some(messages) = parsed.get("messages").and_then(Value::as_array) {
        for message in messages
            .iter()
            .filter(|m| m.get("role").and_then(Value::as_str) == Some("tool"))
        {
            let Some(id) = message.get("tool_call_id").and_then(Value::as_str) else {
                continue;
            };
            let mut event = flow.event(ToolCallObserved {
                direction: ToolCallDirection::Result,
                tool_call_id: id.to_owned(),
                name: message
                    .get("name")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                arguments: None,
                result: None,
            });
            // A text result as is; structured content (parts) as its JSON.
            let content = match message.get("content") {
                Some(Value::String(text)) => text.clone(),
                Some(other) => other.to_string(),
                None => String::new(),
            };
            if let Payload::ToolCallObserved(observed) = &mut event.payload {
                observed.result = flow.seal(event.envelope.event_id, "result", content.as_bytes());
            }
            flow.gateway.emitter.emit(event).await;
        }
    }
    Ok((flow, parsed, bytes))
}

fn seal_received(flow: &Flow, mut event: Event, body: &[u8]) -> Event {
    let event_id = event.envelope.event_id;
    if let Payload::RequestReceived(received) = &mut event.payload {
        received.body = flow.seal(event_id, "body", body);
        received.body_digest = flow
            .keys
            .body_digest(flow.tenant_id, body)
            .unwrap_or_default();
    }
    event
}

/// An upstream attempt's failure, classified.
#[derive(Debug)]
pub(crate) struct AttemptError {
    pub class: &'static str,
    pub http_status: Option<u16>,
    pub retryable: bool,
    /// The upstream's own error body, passed to the client for non-retryable errors.
    pub body: Option<Bytes>,
    pub retry_after: Option<Duration>,
}

impl AttemptError {
    fn from_status(status: StatusCode, headers: &HeaderMap, body: Bytes) -> AttemptError {
        let (class, retryable) = match status.as_u16() {
            429 => ("rate_limited", true),
            408 => ("timeout", true),
            401 | 403 => ("upstream_auth", false),
            400..=499 => ("upstream_invalid_request", false),
            _ => ("server_error", true),
        };
        let retry_after = headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        AttemptError {
            class,
            http_status: Some(status.as_u16()),
            retryable,
            body: Some(body),
            retry_after,
        }
    }

    fn from_transport(error: &reqwest::Error) -> AttemptError {
        let class = if error.is_timeout() {
            "timeout"
        } else if error.is_connect() {
            "connect_error"
        } else {
            "transport_error"
        };
        AttemptError {
            class,
            http_status: None,
            retryable: true,
            body: None,
            retry_after: None,
        }
    }

    fn unsupported() -> AttemptError {
        AttemptError {
            class: "unsupported_operation",
            http_status: Some(400),
            retryable: false,
            body: None,
            retry_after: None,
        }
    }

    fn timeout() -> AttemptError {
        AttemptError {
            class: "timeout",
            http_status: None,
            retryable: true,
            body: None,
            retry_after: None,
        }
    }
}

/// A successful upstream answer, not yet read.
pub(crate) struct Answer {
    /// Taken by whoever reads the body.
    pub response: Option<reqwest::Response>,
    pub status: StatusCode,
    pub deployment: usize,
    pub attempt: i32,
    pub sent_at: Instant,
    pub started_at: i64,
    pub request_body: Bytes,
}

/// The deployments to try for `alias`, in order, and the `routing.decided` event.
fn route(flow: &Flow, alias: &str) -> Option<(Vec<usize>, Event)> {
    let gateway = &flow.gateway;
    let model = gateway.config.models.get(alias)?;
    let now = now_micros();
    let mut order: Vec<usize> = model.deployments.clone();
    if model.strategy == Strategy::Weighted {
        // Draw the first by weight; the others follow in the listed order as fallbacks.
        let eligible: Vec<usize> = order
            .iter()
            .copied()
            .filter(|d| !gateway.cooling_down(*d, now))
            .collect();
        let total: u64 = eligible
            .iter()
            .map(|d| u64::from(gateway.config.deployments[*d].weight))
            .sum();
        if total > 0 {
            let mut pick = fastrand::u64(0..total);
            if let Some(first) = eligible.iter().copied().find(|d| {
                let weight = u64::from(gateway.config.deployments[*d].weight);
                if pick < weight {
                    return true;
                }
                pick -= weight;
                false
            }) {
                order.retain(|d| *d != first);
                order.insert(0, first);
            }
        }
    }
    let candidates = order
        .iter()
        .map(|d| {
            let deployment = &gateway.config.deployments[*d];
            let upstream = &gateway.config.upstreams[deployment.upstream];
            RouteCandidate {
                deployment: deployment.name.clone(),
                provider: upstream.kind.name().to_owned(),
                model: deployment.model.clone(),
                weight: i32::try_from(deployment.weight).unwrap_or(i32::MAX),
                skipped: gateway
                    .cooling_down(*d, now)
                    .then(|| "cooling_down".to_owned()),
            }
        })
        .collect::<Vec<_>>();
    let eligible: Vec<usize> = order
        .iter()
        .copied()
        .filter(|d| !gateway.cooling_down(*d, now))
        .collect();
    // When every deployment is cooling down, try them all anyway rather than fail outright.
    let (order, reason) = match (eligible.is_empty(), model.strategy) {
        (true, _) => (order, "all_cooling_down"),
        (false, Strategy::Weighted) => (eligible, "weighted"),
        (false, Strategy::Ordered) => (eligible, "ordered"),
    };
    let chosen = order
        .first()
        .map(|d| gateway.config.deployments[*d].name.clone());
    let event = flow.event(RoutingDecided {
        model: alias.to_owned(),
        candidates,
        chosen,
        reason: reason.to_owned(),
    });
    Some((order, event))
}

/// Tries the deployments in order, with retries and backoff, recording every attempt.
pub(crate) async fn call_upstream(
    flow: &mut Flow,
    order: &[usize],
    operation: Operation,
    body: &Value,
    stream: bool,
) -> Result<Answer, (AttemptError, Option<usize>)> {
    let gateway = Arc::clone(&flow.gateway);
    let routing = &gateway.config.routing;
    let deadline = flow.started + routing.total_timeout;
    let mut last: Option<(AttemptError, usize)> = None;
    for &deployment_index in order {
        let deployment = &gateway.config.deployments[deployment_index];
        let upstream = &gateway.config.upstreams[deployment.upstream];
        let adapter = adapter(upstream.kind);
        if !adapter.supports(operation) {
            last = Some((AttemptError::unsupported(), deployment_index));
            continue;
        }
        let mut backoff = routing.backoff;
        for retry in 0..=routing.retries {
            if retry > 0 {
                let wait = last
                    .as_ref()
                    .and_then(|(e, _)| e.retry_after)
                    .map_or(backoff, |after| after.min(Duration::from_secs(10)));
                if Instant::now() + wait >= deadline {
                    break;
                }
                tokio::time::sleep(wait).await;
                flow.outside += wait;
                backoff *= 2;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(last.map_or((AttemptError::timeout(), None), |(e, d)| (e, Some(d))));
            }
            flow.attempts += 1;
            let attempt = flow.attempts;
            let request =
                adapter.request(&gateway.http, upstream, operation, &deployment.model, body);
            let request_body = request
                .try_clone()
                .and_then(|r| r.build().ok())
                .and_then(|r| {
                    r.body()
                        .and_then(|b| b.as_bytes())
                        .map(Bytes::copy_from_slice)
                })
                .unwrap_or_default();
            let started_at = now_micros();
            let sent_at = Instant::now();
            let timeout = routing.attempt_timeout.min(remaining);
            let result = tokio::time::timeout(timeout, request.send()).await;
            let outcome = match result {
                Err(_) => Err(AttemptError::timeout()),
                Ok(Err(error)) => Err(AttemptError::from_transport(&error)),
                Ok(Ok(response)) if response.status().is_success() => Ok(response),
                Ok(Ok(response)) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    let body = tokio::time::timeout(timeout, response.bytes())
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_default();
                    Err(AttemptError::from_status(status, &headers, body))
                }
            };
            match outcome {
                Ok(response) => {
                    return Ok(Answer {
                        status: StatusCode::from_u16(response.status().as_u16())
                            .unwrap_or(StatusCode::OK),
                        response: Some(response),
                        deployment: deployment_index,
                        attempt,
                        sent_at,
                        started_at,
                        request_body,
                    });
                }
                Err(error) => {
                    let latency = sent_at.elapsed();
                    flow.outside += latency;
                    let call = CallRecord::failed(
                        deployment_index,
                        attempt,
                        started_at,
                        latency,
                        &error,
                        stream,
                        &request_body,
                    );
                    gateway.emitter.emit(call_event(flow, call)).await;
                    let retryable = error.retryable;
                    last = Some((error, deployment_index));
                    if !retryable {
                        return Err(
                            last.map_or((AttemptError::timeout(), None), |(e, d)| (e, Some(d)))
                        );
                    }
                }
            }
        }
        gateway.cool_down(deployment_index);
    }
    Err(last.map_or((AttemptError::timeout(), None), |(e, d)| (e, Some(d))))
}

/// One upstream attempt, as `llm_call.completed` records it.
pub(crate) struct CallRecord<'a> {
    pub deployment: usize,
    pub attempt: i32,
    pub started_at: i64,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    pub status: CallStatus,
    pub http_status: Option<u16>,
    pub error_class: Option<&'a str>,
    pub usage: Usage,
    /// The model id the upstream says served the call, when more specific than the deployment's.
    pub served_model: Option<&'a str>,
    pub stream: bool,
    pub request_body: &'a [u8],
    pub response_body: Option<&'a [u8]>,
}

impl<'a> CallRecord<'a> {
    /// A failed attempt.
    fn failed(
        deployment: usize,
        attempt: i32,
        started_at: i64,
        latency: Duration,
        error: &'a AttemptError,
        stream: bool,
        request_body: &'a [u8],
    ) -> Self {
        CallRecord {
            deployment,
            attempt,
            started_at,
            latency,
            ttft: None,
            status: if error.class == "timeout" {
                CallStatus::Timeout
            } else {
                CallStatus::Error
            },
            http_status: error.http_status,
            error_class: Some(error.class),
            usage: Usage::default(),
            served_model: None,
            stream,
            request_body,
            response_body: error.body.as_deref(),
        }
    }

    /// The attempt that answered, finished with `status`.
    pub fn answered(
        answer: &'a Answer,
        latency: Duration,
        status: CallStatus,
        error_class: Option<&'a str>,
        response_body: &'a [u8],
        stream: bool,
    ) -> Self {
        CallRecord {
            deployment: answer.deployment,
            attempt: answer.attempt,
            started_at: answer.started_at,
            latency,
            ttft: None,
            status,
            http_status: Some(answer.status.as_u16()),
            error_class,
            usage: Usage::default(),
            served_model: None,
            stream,
            request_body: &answer.request_body,
            response_body: Some(response_body),
        }
    }
}

/// The `llm_call.completed` event of an attempt, bodies sealed.
pub(crate) fn call_event(flow: &Flow, call: CallRecord<'_>) -> Event {
    let gateway = &flow.gateway;
    let deployment = &gateway.config.deployments[call.deployment];
    let upstream = &gateway.config.upstreams[deployment.upstream];
    let mut event = flow.event(LlmCallCompleted {
        attempt: call.attempt,
        deployment: deployment.name.clone(),
        provider: upstream.kind.name().to_owned(),
        model: deployment.model.clone(),
        status: call.status,
        http_status: call.http_status.map(i32::from),
        error_class: call.error_class.map(str::to_owned),
        stream: call.stream,
        started_at: call.started_at,
        latency_us: micros(call.latency),
        ttft_us: call.ttft.map(micros),
        tokens_in: call.usage.tokens_in,
        tokens_out: call.usage.tokens_out,
        tokens_cached_read: call.usage.tokens_cached_read,
        tokens_cache_creation: call.usage.tokens_cache_creation,
        usage_estimated: call.usage.estimated,
        cost_micro_usd: flow.cost(call.deployment, call.served_model, &call.usage),
        request_body: None,
        response_body: None,
    });
    let event_id = event.envelope.event_id;
    if let Payload::LlmCallCompleted(payload) = &mut event.payload {
        payload.request_body = flow.seal(event_id, "request_body", call.request_body);
        payload.response_body = call
            .response_body
            .and_then(|b| flow.seal(event_id, "response_body", b));
    }
    event
}

/// `tool_call.observed` for each tool call in an OpenAI `message` (or accumulated deltas).
pub(crate) fn tool_call_events(flow: &Flow, tool_calls: &[Value]) -> Vec<Event> {
    tool_calls
        .iter()
        .filter_map(|call| {
            let id = call.get("id").and_then(Value::as_str)?;
            let mut event = flow.event(ToolCallObserved {
                direction: ToolCallDirection::Requested,
                tool_call_id: id.to_owned(),
                name: call
                    .pointer("/function/name")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                arguments: None,
                result: None,
            });
            let arguments = call
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let event_id = event.envelope.event_id;
            if let Payload::ToolCallObserved(observed) = &mut event.payload {
                observed.arguments = flow.seal(event_id, "arguments", arguments.as_bytes());
            }
            Some(event)
        })
        .collect()
}

/// Maps a final upstream failure to the client's response.
fn upstream_failure(error: &AttemptError) -> ApiError {
    match (error.class, error.http_status) {
        ("timeout", _) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            "upstream_timeout",
            "the upstream did not answer in time",
        ),
        (class, Some(status)) if !error.retryable => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            let message = error
                .body
                .as_ref()
                .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                .and_then(|v| {
                    v.pointer("/error/message")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                })
                .unwrap_or_else(|| format!("the upstream refused the request ({class})"));
            ApiError::new(status, "invalid_request_error", "upstream_error", message)
        }
        (class, _) => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "server_error",
            "upstream_error",
            format!("every upstream attempt failed; last error: {class}"),
        ),
    }
}

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match begin(
        &state,
        &headers,
        body,
        "/v1/chat/completions",
        Dialect::OpenAi,
    )
    .await
    {
        Ok((flow, request, _)) => run_chat(flow, request).await,
        Err(response) => response,
    }
}

/// `POST /v1/messages` (Anthropic's Messages API), served by translating to and from chat.
pub async fn messages(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let (flow, request, _) =
        match begin(&state, &headers, body, "/v1/messages", Dialect::Anthropic).await {
            Ok(started) => started,
            Err(response) => return response,
        };
    if request.get("max_tokens").and_then(Value::as_u64).is_none() {
        let error = ApiError::invalid_request("max_tokens: Field required");
        return flow
            .fail(error, RequestStatus::Error, "invalid_request")
            .await;
    }
    run_chat(flow, messages_api::messages_to_chat(&request)).await
}

/// Checks that a request names a model and carries `field` (`messages` must be an array), and
/// routes it: the deployments to try, with `routing.decided` recorded. `Err` is the response.
async fn admit_to_route(flow: &Flow, request: &Value, field: &str) -> Result<Vec<usize>, Response> {
    let invalid = |message: String| ApiError::invalid_request(message);
    let Some(alias) = request.get("model").and_then(Value::as_str) else {
        return Err(flow
            .fail(
                invalid("`model` is required".into()),
                RequestStatus::Error,
                "invalid_request",
            )
            .await);
    };
    let present = match field {
        "messages" => request.get(field).is_some_and(Value::is_array),
        _ => request.get(field).is_some(),
    };
    if !present {
        let error = invalid(format!("`{field}` is required"));
        return Err(flow
            .fail(error, RequestStatus::Error, "invalid_request")
            .await);
    }
    let Some((order, decided)) = route(flow, alias) else {
        let error = ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("The model `{alias}` does not exist or you do not have access to it."),
        );
        return Err(flow
            .fail(error, RequestStatus::Error, "model_not_found")
            .await);
    };
    flow.gateway.emitter.emit(decided).await;
    Ok(order)
}

/// Routes and answers an OpenAI-shaped chat request.
async fn run_chat(mut flow: Flow, mut request: Value) -> Response {
    let order = match admit_to_route(&flow, &request, "messages").await {
        Ok(order) => order,
        Err(response) => return response,
    };

    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    let asked_for_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    if stream && !asked_for_usage {
        // Ask for usage so the call is priced; the extra chunk is stripped before the client.
        request["stream_options"] = json!({"include_usage": true});
    }
    // Anthropic clients always get usage (in `message_delta`).
    let client_wants_usage = asked_for_usage || flow.dialect == Dialect::Anthropic;
    let answer = match call_upstream(&mut flow, &order, Operation::Chat, &request, stream).await {
        Ok(answer) => answer,
        Err((error, deployment)) => {
            let mut outcome = Outcome {
                status: RequestStatus::Error,
                error_class: Some(error.class.to_owned()),
                ..Outcome::default()
            };
            if let Some(d) = deployment {
                let deployment = &flow.gateway.config.deployments[d];
                outcome.deployment = Some(deployment.name.clone());
                outcome.provider = Some(
                    flow.gateway.config.upstreams[deployment.upstream]
                        .kind
                        .name()
                        .to_owned(),
                );
            }
            let api_error = upstream_failure(&error);
            outcome.http_status = api_error.status.as_u16();
            return flow.fail_with(&outcome, api_error).await;
        }
    };
    if stream {
        return ChatStream::respond(flow, answer, request, client_wants_usage);
    }
    finish_json(flow, answer, Operation::Chat, &request).await
}

/// Reads a JSON answer, records it, and sends it to the client.
pub(crate) async fn finish_json(
    mut flow: Flow,
    mut answer: Answer,
    operation: Operation,
    request: &Value,
) -> Response {
    let status = answer.status;
    let remaining = flow.gateway.config.routing.attempt_timeout;
    let body = match answer.response.take() {
        None => Err(AttemptError::timeout()),
        Some(response) => match tokio::time::timeout(remaining, response.bytes()).await {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(error)) => Err(AttemptError::from_transport(&error)),
            Err(_) => Err(AttemptError::timeout()),
        },
    };
    let latency = answer.sent_at.elapsed();
    flow.outside += latency;
    let gateway = Arc::clone(&flow.gateway);
    let deployment = &gateway.config.deployments[answer.deployment];
    let provider = gateway.config.upstreams[deployment.upstream].kind.name();
    let body = match body {
        Ok(body) => body,
        Err(error) => {
            let call = CallRecord::failed(
                answer.deployment,
                answer.attempt,
                answer.started_at,
                latency,
                &error,
                false,
                &answer.request_body,
            );
            gateway.emitter.emit(call_event(&flow, call)).await;
            let api_error = upstream_failure(&error);
            let outcome = Outcome {
                status: RequestStatus::Error,
                http_status: api_error.status.as_u16(),
                error_class: Some(error.class.to_owned()),
                provider: Some(provider.to_owned()),
                deployment: Some(deployment.name.clone()),
                ..Outcome::default()
            };
            return flow.fail_with(&outcome, api_error).await;
        }
    };
    // What the upstream sent is recorded; the client gets it in OpenAI's shape.
    let received = body;
    let body = adapter(gateway.config.upstreams[deployment.upstream].kind).answer(received.clone());
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let usage = match parsed.get("usage").filter(|u| u.is_object()) {
        Some(usage) => Usage::from_openai(usage),
        None => Usage::estimate(request, &answered_text(&parsed)),
    };
    let served_model = parsed.get("model").and_then(Value::as_str);
    let cost_micro_usd = flow.cost(answer.deployment, served_model, &usage);
    gateway
        .emitter
        .emit(call_event(
            &flow,
            CallRecord {
                usage,
                served_model,
                ..CallRecord::answered(&answer, latency, CallStatus::Ok, None, &received, false)
            },
        ))
        .await;
    if operation == Operation::Chat {
        let tool_calls = parsed
            .pointer("/choices/0/message/tool_calls")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for event in tool_call_events(&flow, &tool_calls) {
            gateway.emitter.emit(event).await;
        }
    }
    let outcome = Outcome {
        model: parsed
            .get("model")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| Some(deployment.model.clone())),
        provider: Some(provider.to_owned()),
        deployment: Some(deployment.name.clone()),
        usage,
        cost_micro_usd,
        ..Outcome::default()
    };
    if let Err(unrecorded) = flow.complete(&outcome).await {
        return flow.error_response(unrecorded);
    }
    let body = match (flow.dialect, operation) {
        (Dialect::Anthropic, Operation::Chat) => {
            Bytes::from(messages_api::chat_to_message(&parsed).to_string())
        }
        _ => body,
    };
    let mut response = Response::builder()
        .status(status.as_u16())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response());
    flow.headers(&mut response);
    response
}

/// The text of a chat answer's choices (content and tool-call arguments), for estimating usage.
fn answered_text(answer: &Value) -> String {
    let mut text = String::new();
    for choice in answer
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(content) = choice.pointer("/message/content").and_then(Value::as_str) {
            text.push_str(content);
        }
        for call in choice
            .pointer("/message/tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            text.push_str(
                call.pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
            );
        }
    }
    text
}

/// `POST /v1/embeddings`
pub async fn embeddings(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let (mut flow, request, _) =
        match begin(&state, &headers, body, "/v1/embeddings", Dialect::OpenAi).await {
            Ok(started) => started,
            Err(response) => return response,
        };
    let order = match admit_to_route(&flow, &request, "input").await {
        Ok(order) => order,
        Err(response) => return response,
    };
    match call_upstream(&mut flow, &order, Operation::Embeddings, &request, false).await {
        Ok(answer) => finish_json(flow, answer, Operation::Embeddings, &request).await,
        Err((error, _)) => {
            let api_error = upstream_failure(&error);
            flow.fail(api_error, RequestStatus::Error, error.class)
                .await
        }
    }
}

/// `GET /v1/models`: the aliases this gateway serves (to any valid key).
pub async fn models(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let started = Instant::now();
    let mut response = if presented_key(&headers)
        .and_then(|secret| state.services.control.authenticate(secret))
        .is_none()
    {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "missing or invalid API key",
        )
        .into_response()
    } else {
        let data: Vec<Value> = state
            .gateway
            .config
            .models
            .keys()
            .map(|alias| json!({"id": alias, "object": "model", "created": 0, "owned_by": "loom"}))
            .collect();
        Json(json!({"object": "list", "data": data})).into_response()
    };
    // A listing is not a traced request (no events), but it carries the same headers.
    let response_headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&trace_id(&headers)) {
        response_headers.insert(REQUEST_ID, value);
    }
    if let Ok(value) = HeaderValue::from_str(&started.elapsed().as_micros().to_string()) {
        response_headers.insert(OVERHEAD, value);
    }
    response
}
