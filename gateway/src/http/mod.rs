//! The node's routes: `/v1/*` (in `v1`), `/admin/*` (in `admin`), health, metrics and the answers
//! to unknown routes and methods.

mod admin;
mod v1;

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use crate::error::GatewayError;
use crate::gateway::Gateway;
use crate::services::Services;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub services: Services,
    pub(crate) gateway: Arc<Gateway>,
    /// SHA-256 of the admin token; `None` disables the admin API.
    admin_token: Option<Arc<[u8; 32]>>,
}

impl AppState {
    pub(crate) fn new(
        services: Services,
        gateway: Arc<Gateway>,
        admin_token: Option<&str>,
    ) -> Self {
        AppState {
            services,
            gateway,
            admin_token: admin_token
                .filter(|t| !t.is_empty())
                .map(|t| Arc::new(loom_schemas::crypto::hash_api_key(t))),
        }
    }
}

/// The router of a node. `/health` and `/metrics` are the only routes open without credentials;
/// `/admin/*` needs the admin token.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/chat/completions", post(v1::chat_completions))
        .route("/v1/embeddings", post(v1::embeddings))
        .route("/v1/models", get(v1::models))
        .route("/v1/quota/status", get(v1::quota_status))
        .route("/v1/messages", post(v1::messages))
        .route("/v1/responses", post(v1::responses))
        .route(
            "/v1/responses/{id}",
            get(v1::stored_response).delete(v1::stored_response),
        )
        .route("/v1/responses/{id}/input_items", get(v1::stored_response))
        .nest("/admin", admin::routes(state.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Liveness: 200 while the process answers. A log it cannot reach makes it `degraded`, not
/// dead: a gateway on Kafka spools its events meanwhile, and restarting it would not help.
async fn health(State(state): State<AppState>) -> Response {
    match state.services.log_ends().await {
        Ok(ends) => {
            let log: serde_json::Map<String, serde_json::Value> = ends
                .into_iter()
                .map(|(topic, end)| (topic.name().to_owned(), json!({ "end_offset": end })))
                .collect();
            Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION"), "log": log}))
                .into_response()
        }
        Err(error) => {
            tracing::warn!(%error, "health check could not read the log");
            Json(json!({
                "status": "degraded",
                "version": env!("CARGO_PKG_VERSION"),
                "log": {"error": "the log is unreachable"},
            }))
            .into_response()
        }
    }
}

/// Whether a process should be sent traffic: `/ready` answers 200 only while it is ready, 503
/// while it starts or drains. Clones share one state.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicU8>);

const STARTING: u8 = 0;
const READY: u8 = 1;
const DRAINING: u8 = 2;

impl Readiness {
    /// Started: traffic may come.
    pub fn ready(&self) {
        let _ = self
            .0
            .compare_exchange(STARTING, READY, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Stopping: no new traffic, please (for good).
    pub fn draining(&self) {
        self.0.store(DRAINING, Ordering::Release);
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire) == READY
    }

    /// `/ready`.
    pub fn router(&self) -> Router {
        let readiness = self.clone();
        Router::new().route(
            "/ready",
            get(move || async move {
                match readiness.0.load(Ordering::Acquire) {
                    READY => (StatusCode::OK, Json(json!({"status": "ready"}))),
                    STARTING => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({"status": "starting"})),
                    ),
                    _ => (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({"status": "draining"})),
                    ),
                }
            }),
        )
    }
}

/// Bucket bounds of every `*_seconds` histogram: 0.5 ms to 2 minutes (the gateway's overhead
/// sits at the low end, upstream calls and streams at the high one).
const SECONDS_BUCKETS: [f64; 18] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
    30.0, 60.0, 120.0,
];

/// The process-wide Prometheus recorder (metrics are global by nature).
fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    let builder = || {
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &SECONDS_BUCKETS)?
            .install_recorder()
    };
    HANDLE
        .get_or_init(|| match builder() {
            Ok(handle) => {
                metrics::gauge!("loom_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
                Some(handle)
            }
            Err(error) => {
                tracing::error!(%error, "could not install the metrics recorder");
                None
            }
        })
        .as_ref()
}

/// Installs the metrics recorder; call once at start so that early metrics are not lost.
pub fn install_metrics() {
    let _ = prometheus();
}

/// `/health`, `/ready` and `/metrics` alone, for processes without the gateway (`loom
/// projector`).
pub fn metrics_router(readiness: &Readiness) -> Router {
    install_metrics();
    Router::new()
        .route(
            "/health",
            get(|| async {
                axum::Json(json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}))
            }),
        )
        .route("/metrics", get(|| async { render_metrics() }))
        .merge(readiness.router())
}

async fn metrics(State(state): State<AppState>) -> Response {
    if let Ok(ends) = state.services.log_ends().await {
        for (topic, end) in ends {
            metrics::gauge!("loom_log_end_offset", "topic" => topic.name()).set(end as f64);
        }
    }
    render_metrics()
}

/// Every metric, in Prometheus' text format.
fn render_metrics() -> Response {
    match prometheus() {
        Some(handle) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => GatewayError::Internal("metrics are unavailable").into_response(),
    }
}

/// Middleware counting every HTTP request by route (the pattern it matched, such as
/// `/v1/traces/{id}`, or `unmatched`), method and status (`loom_http_requests_total`), and the
/// time until its response head (`loom_http_request_duration_seconds`; a stream's body goes on
/// after that: `loom_request_duration_seconds` covers it).
pub async fn track_requests(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = match *request.method() {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    };
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::histogram!("loom_http_request_duration_seconds", "route" => route.clone(), "method" => method)
        .record(started.elapsed().as_secs_f64());
    metrics::counter!("loom_http_requests_total", "route" => route, "method" => method, "status" => status)
        .increment(1);
    response
}

async fn not_found() -> GatewayError {
    GatewayError::RouteNotFound
}

async fn method_not_allowed() -> GatewayError {
    GatewayError::MethodNotAllowed
}
