//! Loom's gateway: the HTTP data plane and admin API, and the node that hosts it.
//!
//! For now a node opens its data directory — the embedded log and the key store — and answers
//! `/health` and `/metrics`; the OpenAI-compatible endpoints arrive with the gateway capability.

mod admin;
pub mod config;
mod control;
mod events;
mod http;
mod messages_api;
mod node;
pub mod pricing;
mod providers;
mod proxy;
mod stream;
mod tokens;

pub use admin::{AdminError, CreatedKey, CreatedTenant, KeyRequest, KeyView, TenantView};
pub use control::{ApiKeyInfo, Control, ControlState, TenantInfo};
pub use http::{ApiError, AppState, install_metrics, metrics_router, router};
pub use node::{KeyStoreLocation, LogLocation, Node, NodeConfig, NodeError};

use std::net::SocketAddr;
use std::sync::Arc;

use config::GatewayConfig;
use events::Emitter;
use loom_projector::{ProjectorConfig, StoreLocation, project_active};
use loom_schemas::{ExposeSecret, SecretString};
use proxy::Gateway;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What `loom serve` runs.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub node: NodeConfig,
    /// Upstreams, models and routing (`--config`); empty serves no models.
    pub gateway: GatewayConfig,
    /// Enables the admin API for holders of this token.
    pub admin_token: Option<SecretString>,
    /// Run the read-model projector in this process, into these read models.
    pub read_models: Option<StoreLocation>,
    /// How the in-process projector runs.
    pub projector: ProjectorConfig,
}

/// Opens the node described by `config` and serves HTTP on `listener` until `shutdown` is
/// cancelled; then drains in-flight requests and makes the log durable.
pub async fn serve(
    config: ServeConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    install_metrics();
    let node = Node::open(&config.node).await?;
    let addr: SocketAddr = listener
        .local_addr()
        .map_err(NodeError::io("reading the listen address"))?;
    tracing::info!("listening on {addr}");

    let tasks = TaskTracker::new();
    tasks.spawn(node.clone().run_background(shutdown.clone()));
    if let Some(location) = config.read_models.clone() {
        let (log, shutdown) = (Arc::clone(&node.log), shutdown.clone());
        let projector = config.projector.clone();
        tasks.spawn(async move {
            // The log keeps every event: a projector that fails starts again from its positions.
            while let Err(error) = project_active(
                Arc::clone(&log),
                &location,
                projector.clone(),
                shutdown.clone(),
            )
            .await
            {
                tracing::error!(%error, "the read-model projector stopped; restarting it in 5 s");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
            }
        });
    }
    let (emitter, writer) = Emitter::new(
        &config.gateway.limits,
        Arc::clone(&node.log),
        node.embedded_log(),
    )
    .map_err(|e| NodeError::Io {
        context: "loading the event schemas".into(),
        source: std::io::Error::other(e),
    })?;
    // The writer ends once every request holding an emitter is done and the queue is drained.
    writer.spawn(&tasks);
    // The tokenizer for usage estimates takes a moment to build: build it now, off the request path.
    tasks.spawn_blocking(tokens::warm_up);
    let gateway =
        Gateway::new(config.gateway, emitter, tasks.clone()).map_err(|e| NodeError::Io {
            context: "building the upstream HTTP client".into(),
            source: std::io::Error::other(e),
        })?;
    let app = router(AppState::new(
        node.clone(),
        Arc::new(gateway),
        config
            .admin_token
            .as_ref()
            .map(|token| token.expose_secret()),
    ));
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.clone().cancelled_owned())
        .await
        .map_err(NodeError::io("serving HTTP"));
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    node.close().await?;
    tracing::info!("stopped");
    served
}
