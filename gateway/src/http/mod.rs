//! The node's routes: `/v1/*` (in `v1`), `/admin/*` (in `admin`), health, metrics and the answers
//! to unknown routes and methods.

mod admin;
mod v1;

use std::sync::{Arc, OnceLock};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
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

async fn health(State(state): State<AppState>) -> Result<Response, GatewayError> {
    let ends = state.services.log_ends().await.map_err(|error| {
        tracing::error!(%error, "health check could not read the log");
        GatewayError::Internal("the log is unavailable")
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
        .route("/metrics", get(|| async { render_metrics() }))
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

async fn not_found() -> GatewayError {
    GatewayError::RouteNotFound
}

async fn method_not_allowed() -> GatewayError {
    GatewayError::MethodNotAllowed
}
