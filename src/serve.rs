//! `loom serve` and `loom gateway`: a node with its HTTP app, and (all in one) the read-model
//! projector in the same process.

use std::net::SocketAddr;
use std::sync::Arc;

use loom_gateway::config::GatewayConfig;
use loom_gateway::{Control, ResponseIndex, Spans};
use loom_gateway::{Readiness, install_metrics, track_requests};
use loom_projector::archive::{Archive, ArchiveConfig, ArchiveLocation, Archiver};
use loom_projector::{Lookup, ProjectorConfig, StoreLocation, project_active};
use loom_query::analytics::Analytics;
use loom_query::archive::{Access, Scope};
use loom_query::export::{Exporter, Jobs};
use loom_query::http::{Authenticate, Principal, QueryServices};
use loom_query::sql::{SqlLimits, SqlService};
use loom_query::traces::Traces;
use loom_schemas::crypto::hash_api_key;
use loom_schemas::{ExposeSecret, SecretString};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use loom_dashboard::DashboardConfig;

use crate::node::{Node, NodeConfig, NodeError};
use crate::shutdown::{Drain, serve_http};

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
    /// Read models another process folds (`loom gateway --read-models`), where stored responses
    /// this gateway did not make are looked up. With `read_models`, those are used.
    pub lookup_read_models: Option<StoreLocation>,
    /// How the in-process projector runs.
    pub projector: ProjectorConfig,
    /// Archive the log in this process, there (`loom serve`'s default: `<data dir>/archive`).
    pub archive: Option<(ArchiveLocation, ArchiveConfig)>,
    /// Where `POST /v1/exports` writes tables (`None`: exports are off); needs the archive.
    pub exports: Option<ArchiveLocation>,
    /// The dashboard at `/`.
    pub dashboard: DashboardConfig,
    /// How it stops.
    pub drain: Drain,
    /// Where the requests' spans are exported over OTLP/HTTP (`--otlp-endpoint`), if anywhere.
    pub otlp_endpoint: Option<String>,
}

/// A log filter that leaves out all but warnings and the line saying where the server listens
/// (`listening on ADDR`, what benchmarks and scripts wait for).
pub const QUIET_LOG: &str = "warn,loom::serve=info";

/// The name of the thread `loom serve` folds the read models on.
pub const FOLD_THREAD: &str = "loom-fold";

/// The name of the thread `loom serve` archives on.
pub const ARCHIVE_THREAD: &str = "loom-archive";

/// Opens the node described by `config` and serves HTTP on `listener` until `shutdown` is
/// cancelled; then drains as `config.drain` says (readiness false, in-flight requests and
/// streams finished), stops the background work (the projector commits what it folded), writes
/// every queued event and makes the log durable.
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
    // The background stops once HTTP has drained: the requests in flight until then still
    // need the control state followed, the spool forwarded and their events folded.
    let (signal, shutdown) = (shutdown, CancellationToken::new());
    tasks.spawn(node.clone().run_background(shutdown.clone()));
    if let Some(location) = config.read_models.clone() {
        let (log, shutdown) = (Arc::clone(&node.services.log), shutdown.clone());
        let projector = config.projector.clone();
        let projecting = async move {
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
        };
        // The fold runs on a thread (and runtime) of its own: decoding and folding a batch
        // would otherwise hold one of the request path's workers for milliseconds at a time.
        // The thread is named so that its CPU can be told apart (`loom bench gateway` does).
        spawn_on_thread(FOLD_THREAD, &tasks, projecting)?;
    }
    let mut sql = None;
    if let Some((location, config)) = config.archive.clone() {
        let archive = Archive::open(&location)?;
        tracing::info!(%location, "archiving the log");
        let service = Arc::new(SqlService::new(
            archive.clone(),
            Arc::clone(&node.services.keys),
            SqlLimits::default(),
        )?);
        tasks.spawn(crate::roles::warm(Arc::clone(&service)));
        sql = Some(service);
        let archiver = Archiver::new(
            archive,
            Arc::clone(&node.services.log),
            Arc::clone(&node.services.keys),
            config,
        );
        let shutdown = shutdown.clone();
        let archiving = async move { archiver.run_restarting(shutdown).await };
        spawn_on_thread(ARCHIVE_THREAD, &tasks, archiving)?;
    }
    // Stored responses another gateway (or this one before a restart) made are found in the
    // read models.
    let mut services = node.services.clone();
    let spans = match &config.otlp_endpoint {
        Some(endpoint) => Some(Arc::new(Spans::start(endpoint, &services.producer)?)),
        None => None,
    };
    services.spans = spans.clone();
    let reads = config.read_models.or(config.lookup_read_models);
    services.response_index = reads
        .clone()
        .map(|location| Arc::new(ReadModelIndex(Lookup::new(location))) as Arc<dyn ResponseIndex>);
    let exports = match (&sql, config.exports) {
        (Some(sql), Some(root)) => Some(Arc::new(Jobs::new(
            Arc::new(Exporter::new(
                Arc::clone(sql),
                Arc::clone(&node.services.keys),
            )),
            root,
        ))),
        _ => None,
    };
    let query = QueryServices {
        exports,
        analytics: reads
            .clone()
            .map(|location| Arc::new(Analytics::new(location))),
        traces: reads.map(|location| {
            Arc::new(Traces::new(
                location,
                Arc::clone(&node.services.keys),
                sql.clone(),
            ))
        }),
        sql,
    };
    let callers = Arc::new(Callers::new(
        services.control.clone(),
        config.admin_token.as_ref(),
    ));
    let dashboard_services = services.clone();
    let (gateway, usage) = loom_gateway::app(
        config.gateway,
        services,
        config.admin_token.as_ref(),
        &tasks,
    )?;
    let dashboard =
        loom_dashboard::routes(dashboard_services, query.clone(), usage, config.dashboard);
    let readiness = Readiness::default();
    let app = gateway
        .merge(loom_query::http::routes(query, callers))
        .merge(dashboard)
        .merge(readiness.router())
        .layer(axum::middleware::from_fn(track_requests));
    let served = serve_http(listener, app, &readiness, config.drain, &signal)
        .await
        .map_err(NodeError::io("serving HTTP"));
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    if let Some(spans) = spans {
        // Every request has ended: its spans are queued.
        let _ = tokio::task::spawn_blocking(move || spans.shutdown()).await;
    }
    node.close().await?;
    tracing::info!("stopped");
    served
}

/// Who calls the query service: a tenant's API key reads its tenant's archive (its events whole
/// only if its roles may read bodies); the admin token reads every tenant's.
pub(crate) struct Callers {
    control: Control,
    /// SHA-256 of the admin token.
    admin_token: Option<[u8; 32]>,
}

impl Callers {
    pub(crate) fn new(control: Control, admin_token: Option<&SecretString>) -> Callers {
        Callers {
            control,
            admin_token: admin_token
                .map(|token| token.expose_secret())
                .filter(|token| !token.is_empty())
                .map(hash_api_key),
        }
    }
}

impl Authenticate for Callers {
    fn authenticate(&self, headers: &axum::http::HeaderMap) -> Option<Principal> {
        let secret = loom_gateway::presented_key(headers)?;
        // Compared as hashes, so the comparison's timing says nothing about the token.
        if self.admin_token == Some(hash_api_key(secret)) {
            return Some(Principal {
                scope: Scope::AllTenants,
                access: Access::Full,
                project: None,
            });
        }
        let key = self.control.authenticate(secret)?;
        Some(Principal {
            scope: Scope::Tenant(key.tenant_id),
            access: Access::for_role(key.role),
            project: key.project_id,
        })
    }
}

/// Runs `work` on a thread of its own (with a runtime of its own), named `name`; `tasks` waits
/// for it.
fn spawn_on_thread(
    name: &str,
    tasks: &TaskTracker,
    work: impl Future<Output = ()> + Send + 'static,
) -> Result<(), NodeError> {
    let token = tasks.token();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _token = token;
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(work),
                Err(error) => tracing::error!(%error, "could not start a runtime"),
            }
        })
        .map_err(NodeError::io("starting a thread"))?;
    Ok(())
}

/// The read models, as the gateway's index of stored responses.
struct ReadModelIndex(Lookup);

#[async_trait::async_trait]
impl ResponseIndex for ReadModelIndex {
    async fn deployment_of(
        &self,
        tenant: Uuid,
        response_id: &str,
    ) -> Result<Option<String>, String> {
        self.0
            .response_deployment(tenant, response_id)
            .await
            .map_err(|e| e.to_string())
    }
}
