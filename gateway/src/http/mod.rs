//! HTTP routes and the one mapping from errors to OpenAI-style error responses.

mod admin;

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use crate::proxy::{self, Gateway};
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
        .route("/v1/chat/completions", post(proxy::chat_completions))
        .route("/v1/embeddings", post(proxy::embeddings))
        .route("/v1/models", get(proxy::models))
        .route("/v1/messages", post(proxy::messages))
        .nest("/admin", admin::routes(state.clone()))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// An error as clients see it: `{"error": {"message", "type", "code"}}`, as OpenAI sends them.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: &'static str,
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({
            "error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}
        });
        (self.status, Json(body)).into_response()
    }
}

impl ApiError {
    pub fn new(
        status: StatusCode,
        kind: &'static str,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        ApiError {
            status,
            kind,
            code,
            message: message.into(),
        }
    }

    pub fn internal(message: &str) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal_error",
            message,
        )
    }

    /// The request's events could not be recorded: it must not be answered as if they were.
    pub fn events_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "events_unavailable",
            "Loom could not record this request; retry shortly",
        )
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message,
        )
    }
}

async fn health(State(state): State<AppState>) -> Result<Response, ApiError> {
    let ends = state.services.log_ends().await.map_err(|error| {
        tracing::error!(%error, "health check could not read the log");
        ApiError::internal("the log is unavailable")
    })?;
    let log: serde_json::Map<String, serde_json::Value> = ends
        .into_iter()
        .map(|(topic, end)| (topic.name().to_owned(), json!({ "end_offset": end })))
        .collect();
    Ok(Json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "log": log,
    }))
    .into_response())
}

/// The process-wide Prometheus recorder (metrics are global by nature).
fn prometheus() -> Option<&'static PrometheusHandle> {
    static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
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

/// `/health` and `/metrics` alone, for processes without the gateway (`loom projector`).
pub fn metrics_router() -> Router {
    install_metrics();
    Router::new()
        .route(
            "/health",
            get(|| async { axum::Json(json!({"status": "ok"})) }),
        )
        .route(
            "/metrics",
            get(|| async {
                match prometheus() {
                    Some(handle) => (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        handle.render(),
                    )
                        .into_response(),
                    None => ApiError::internal("metrics are unavailable").into_response(),
                }
            }),
        )
}

async fn metrics(State(state): State<AppState>) -> Result<Response, ApiError> {
    let handle = prometheus().ok_or_else(|| ApiError::internal("metrics are unavailable"))?;
    if let Ok(ends) = state.services.log_ends().await {
        for (topic, end) in ends {
            metrics::gauge!("loom_log_end_offset", "topic" => topic.name()).set(end as f64);
        }
    }
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        "no such route",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        "method not allowed on this route",
    )
}
