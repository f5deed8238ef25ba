//! Loom's gateway: the HTTP data plane (`/v1/*`) and admin API of a node, and the in-memory
//! control state they run on. The node that hosts them — data directory, log, key store — and
//! `loom serve` are the `loom` package's; this crate gets what it needs as [`Services`].

mod admin;
mod anthropic;
mod auth;
mod body;
mod cache;
pub mod config;
mod content;
mod control;
mod credentials;
mod error;
mod events;
mod flow;
mod gateway;
mod guard;
mod http;
mod meter;
pub mod policy;
pub mod pricing;
mod providers;
pub mod quota;
mod record;
mod responses;
mod routing;
mod services;
mod stored;
mod stream;
mod telemetry;
mod tokens;
mod translate;
mod upstream;

pub use admin::{
    Actor, AdminError, Amounts, CreatedKey, CreatedTenant, CredentialRequest, CredentialView,
    GrantRequest, KeyRequest, KeyView, LimitsPatch, MemberView, NewSession, ProjectPatch,
    ProjectRequest, ProjectView, QuotaQuery, QuotaRequest, QuotaView, Registration, Remaining,
    RotatedKey, SessionSecret, SignInError, TenantView,
};
pub use auth::presented_key;
pub use control::{ApiKeyInfo, Control, ControlState, TenantInfo};
pub use error::GatewayError;
pub use flow::Dialect;
pub use http::{AppState, Readiness, install_metrics, metrics_router, router, track_requests};
pub use services::Services;
pub use stored::ResponseIndex;
pub use telemetry::Spans;

use std::sync::Arc;

use config::GatewayConfig;
use events::Emitter;
use gateway::Gateway;
use loom_schemas::codec::CodecError;
use loom_schemas::{ExposeSecret, SecretString};
use tokio_util::task::TaskTracker;

/// Why the gateway could not be put together.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("loading the event schemas: {0}")]
    Schemas(#[from] CodecError),
    #[error("building the upstream HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("compiling the security policy's rules: {0}")]
    Policy(#[from] policy::RuleError),
    #[error("setting up the OTLP exporter: {0}")]
    Otlp(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The HTTP app of a node: the data plane, the admin API (for holders of `admin_token`), health
/// and metrics; call it inside a tokio runtime. Its event writer and the background work of requests run on `tasks`; the writer
/// ends once the app is dropped and every queued event is written.
/// What the dashboard reads of a running gateway: each scope's quota usage today, as its ledger
/// counts it.
#[derive(Clone)]
pub struct Usage(Arc<Gateway>);

impl Usage {
    /// As `GET /admin/quotas` answers `actor`.
    pub fn show_quotas(
        &self,
        services: &Services,
        actor: &Actor,
        query: &QuotaQuery,
    ) -> Result<Vec<QuotaView>, AdminError> {
        services.show_quotas(actor, query, Some(&self.0.quotas), &self.0.config.quotas)
    }

    /// As `POST /admin/quotas` does for `actor`.
    pub async fn set_quota(
        &self,
        services: &Services,
        actor: &Actor,
        request: &QuotaRequest,
    ) -> Result<QuotaView, AdminError> {
        let (ledger, defaults) = (Some(&self.0.quotas), &self.0.config.quotas);
        services.set_quota(actor, request, ledger, defaults).await
    }
}

/// The gateway's routes, and its [`Usage`] for the dashboard.
pub fn app(
    config: GatewayConfig,
    services: Services,
    admin_token: Option<&SecretString>,
    tasks: &TaskTracker,
) -> Result<(axum::Router, Usage), StartError> {
    let mut config = config;
    // Budgets are shared with every gateway on the same log; the embedded log has one.
    config.quotas.shared_log = services.embedded.is_none();
    let (emitter, writer) = Emitter::new(
        &config.limits,
        Arc::clone(&services.log),
        services.embedded.clone(),
    )?;
    writer.spawn(tasks);
    // The tokenizer for usage estimates takes a moment to build: build it now, off the request path.
    tasks.spawn_blocking(tokens::warm_up);
    let gateway = Arc::new(Gateway::new(
        config,
        emitter,
        tasks.clone(),
        services.response_index.clone(),
        services.spans.clone(),
    )?);
    // The quota ledger: today's counts from the quota topic, then every gateway's as they come.
    // Not tracked: it only reads, and ends once the gateway is gone.
    tokio::spawn(quota::follow(
        Arc::downgrade(&gateway),
        Arc::downgrade(&services.log),
        services.producer.to_string(),
    ));
    let usage = Usage(Arc::clone(&gateway));
    let router = router(AppState::new(
        services,
        gateway,
        admin_token.map(|token| token.expose_secret()),
    ));
    Ok((router, usage))
}
