//! The roles of the read side: `loom projector`, `loom replay` and `loom migrate`.

use std::net::SocketAddr;
use std::sync::Arc;

use loom_gateway::{Control, Readiness};
use loom_projector::archive::{Archive, ArchiveConfig, ArchiveLocation, Archiver};
use loom_projector::{
    FromArchive, ProjectorConfig, ProjectorError, ReplayReport, StoreLocation, project_active,
};
use loom_query::analytics::Analytics;
use loom_query::export::{Exporter, Jobs};
use loom_query::http::QueryServices;
use loom_query::sql::{SqlLimits, SqlService};
use loom_query::traces::Traces;
use loom_schemas::SecretString;
use loom_schemas::keystore::KeyStore;
use loom_schemas::log::{KafkaLog, Log, Topic};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::DataDir;
use crate::node::{
    Access, KeyStoreLocation, LogLocation, NodeError, load_master_key, open_key_store, open_log,
};
use crate::shutdown::{Drain, serve_http};

#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    #[error(
        "`loom projector` reads a log shared with other processes: set --kafka-brokers \
         (`loom serve` runs the projector in-process on the embedded log)"
    )]
    ProjectorNeedsKafka,
    #[error(
        "`loom archiver` reads a log shared with other processes: set --kafka-brokers \
         (`loom serve` archives the embedded log in-process)"
    )]
    ArchiverNeedsKafka,
    #[error(
        "`loom query` reads a log shared with other processes: set --kafka-brokers \
         (`loom serve` answers /v1/sql in-process on the embedded log; `loom sql` queries a data dir)"
    )]
    QueryNeedsKafka,
    #[error(
        "no master key: neither LOOM_MASTER_KEY nor {} is there, and the archive's keys are \
         wrapped with it", .0.display()
    )]
    NoMasterKey(std::path::PathBuf),
    #[error("nothing to migrate: give --database-url, --kafka-brokers or both")]
    NothingToMigrate,
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Sql(#[from] loom_query::sql::SqlError),
    #[error(transparent)]
    Projector(#[from] ProjectorError),
    #[error("key store: {0}")]
    KeyStore(#[from] loom_schemas::keystore::KeyStoreError),
    #[error("log: {0}")]
    Log(#[from] loom_schemas::log::LogError),
    #[error("connecting to Postgres: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("Postgres: {0}")]
    Database(#[from] sqlx::Error),
    #[error("applying the key store's migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("read models: {0}")]
    Store(#[from] loom_projector::StoreError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// `loom projector`: folds a shared (Kafka) log into `read_models` until `shutdown`, serving
/// `/health` and `/metrics` on `listen` if given.
pub async fn projector(
    log: &LogLocation,
    read_models: &StoreLocation,
    config: ProjectorConfig,
    listen: Option<SocketAddr>,
    shutdown: CancellationToken,
) -> Result<(), RoleError> {
    if !matches!(log, LogLocation::Kafka { .. }) {
        return Err(RoleError::ProjectorNeedsKafka);
    }
    // Reading Kafka touches no data directory.
    let opened = open_log(log, &DataDir::default(), None, Access::Read).await?;
    let tasks = TaskTracker::new();
    let done = serve_metrics(listen, &tasks, &shutdown).await?;
    // The log keeps every event: a projector whose database failed starts again from its
    // stored positions (as `loom serve`'s does).
    let projected = loop {
        let log = Arc::clone(&opened.log);
        match project_active(log, read_models, config.clone(), shutdown.clone()).await {
            Err(error) if error.is_transient() && !shutdown.is_cancelled() => {
                tracing::error!(%error, "the read-model projector stopped; restarting it in 5 s");
                tokio::select! {
                    () = shutdown.cancelled() => break Ok(()),
                    () = tokio::time::sleep(std::time::Duration::from_secs(5)) => {}
                }
            }
            done => break done,
        }
    };
    // However the projector ended (a failure too), the metrics server stops with it.
    shutdown.cancel();
    done.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(projected?)
}

/// Serves `/health`, `/ready` and `/metrics` on `listen` (if given), in `tasks`: not ready from
/// `shutdown` on, answering until the returned token is cancelled (when the role is done, so
/// that its last metrics can still be read).
async fn serve_metrics(
    listen: Option<SocketAddr>,
    tasks: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<CancellationToken, RoleError> {
    let done = CancellationToken::new();
    let Some(addr) = listen else {
        return Ok(done);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| RoleError::Io {
            context: format!("binding {addr}"),
            source,
        })?;
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("metrics on http://{addr}/metrics");
    }
    let readiness = Readiness::default();
    let (draining, shutdown, finished) = (readiness.clone(), shutdown.clone(), done.clone());
    tasks.spawn(async move {
        tokio::select! {
            () = shutdown.cancelled() => draining.draining(),
            () = finished.cancelled() => {}
        }
    });
    let app = loom_gateway::metrics_router(&readiness);
    let (stop, drain) = (done.clone(), Drain::default());
    tasks.spawn(async move {
        if let Err(error) = serve_http(listener, app, &readiness, drain, &stop).await {
            tracing::error!(%error, "serving metrics failed");
        }
    });
    Ok(done)
}

/// `loom archiver`: archives a shared (Kafka) log at `location` until `shutdown`, with the keys
/// of the key store at `key_store`, serving `/health` and `/metrics` on `listen` if given. One
/// archiver per archive.
#[allow(clippy::too_many_arguments)]
pub async fn archiver(
    log: &LogLocation,
    data_dir: &DataDir,
    master_key: Option<&SecretString>,
    key_store: &KeyStoreLocation,
    location: &ArchiveLocation,
    config: ArchiveConfig,
    listen: Option<SocketAddr>,
    shutdown: CancellationToken,
) -> Result<(), RoleError> {
    if !matches!(log, LogLocation::Kafka { .. }) {
        return Err(RoleError::ArchiverNeedsKafka);
    }
    let keys = open_keys(data_dir, master_key, key_store).await?;
    let opened = open_log(log, data_dir, None, Access::Read).await?;
    let archive = Archive::open(location).map_err(NodeError::from)?;
    tracing::info!(%location, "archiving the log");
    let tasks = TaskTracker::new();
    let done = serve_metrics(listen, &tasks, &shutdown).await?;
    Archiver::new(archive, opened.log, keys, config)
        .run_restarting(shutdown.clone())
        .await;
    shutdown.cancel();
    done.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// The key store at `location`, with the master key (which only the gateway generates).
async fn open_keys(
    data_dir: &DataDir,
    master_key: Option<&SecretString>,
    location: &KeyStoreLocation,
) -> Result<Arc<KeyStore>, RoleError> {
    let Some(master) = load_master_key(data_dir, master_key)? else {
        return Err(RoleError::NoMasterKey(data_dir.master_key_file()));
    };
    Ok(Arc::new(open_key_store(location, data_dir, master).await?))
}

/// `loom query`: the query service alone, on `listener` until `shutdown`: `/v1/sql` over the
/// archive at `location`, the analytics over `read_models` (if given), callers authenticated
/// against the control topic of the log (followed live) and the admin token; `/health`,
/// `/metrics`.
#[allow(clippy::too_many_arguments)]
pub async fn query(
    log: &LogLocation,
    data_dir: &DataDir,
    master_key: Option<&SecretString>,
    key_store: &KeyStoreLocation,
    location: &ArchiveLocation,
    read_models: Option<StoreLocation>,
    exports: Option<ArchiveLocation>,
    admin_token: Option<&SecretString>,
    listener: tokio::net::TcpListener,
    drain: Drain,
    shutdown: CancellationToken,
) -> Result<(), RoleError> {
    // On the embedded log it could only read what the log held when it started: keys issued
    // later would never be known.
    if !matches!(log, LogLocation::Kafka { .. }) {
        return Err(RoleError::QueryNeedsKafka);
    }
    // The control topic is followed while requests drain; then it stops.
    let (signal, shutdown) = (shutdown, CancellationToken::new());
    let keys = open_keys(data_dir, master_key, key_store).await?;
    let opened = open_log(log, data_dir, None, Access::Read).await?;
    let control = Control::load(&*opened.log).await?;
    let archive = Archive::open(location).map_err(NodeError::from)?;
    let sql = SqlService::new(archive, Arc::clone(&keys), SqlLimits::default())?;
    let tasks = TaskTracker::new();
    tasks.spawn(control.clone().follow(
        Arc::clone(&opened.log),
        Arc::clone(&keys),
        shutdown.clone(),
    ));
    let callers = Arc::new(crate::serve::Callers::new(control, admin_token));
    let sql = Arc::new(sql);
    tasks.spawn(warm(Arc::clone(&sql)));
    let query = QueryServices {
        exports: exports.map(|root| {
            Arc::new(Jobs::new(
                Arc::new(Exporter::new(Arc::clone(&sql), Arc::clone(&keys))),
                root,
            ))
        }),
        analytics: read_models
            .clone()
            .map(|location| Arc::new(Analytics::new(location))),
        traces: read_models.map(|location| {
            Arc::new(Traces::new(
                location,
                Arc::clone(&keys),
                Some(Arc::clone(&sql)),
            ))
        }),
        sql: Some(sql),
    };
    let readiness = Readiness::default();
    let app = loom_query::http::routes(query, callers)
        .merge(loom_gateway::metrics_router(&readiness))
        .layer(axum::middleware::from_fn(loom_gateway::track_requests));
    tracing::info!(%location, "querying the archive");
    if let Ok(addr) = listener.local_addr() {
        tracing::info!("listening on {addr}");
    }
    let served = serve_http(listener, app, &readiness, drain, &signal)
        .await
        .map_err(|source| RoleError::Io {
            context: "serving HTTP".into(),
            source,
        });
    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    tracing::info!("stopped");
    served
}

/// The SQL service over the archive at `archive` (`loom sql` on a data directory).
pub async fn sql_service(
    data_dir: &DataDir,
    master_key: Option<&SecretString>,
    key_store: &KeyStoreLocation,
    archive: &ArchiveLocation,
    limits: SqlLimits,
) -> Result<SqlService, RoleError> {
    let keys = open_keys(data_dir, master_key, key_store).await?;
    let archive = Archive::open(archive).map_err(NodeError::from)?;
    Ok(SqlService::new(archive, keys, limits)?)
}

/// Reads the archive's manifests and footers ahead of the first query, logging how it went.
pub(crate) async fn warm(sql: Arc<SqlService>) {
    let started = std::time::Instant::now();
    match sql.warm().await {
        Ok(warmed) => tracing::info!(
            tenants = warmed.tenants,
            footers = warmed.footers,
            seconds = started.elapsed().as_secs_f64(),
            "read the archive's manifests and footers"
        ),
        Err(error) => tracing::warn!(%error, "could not read the archive's manifests ahead"),
    }
}

/// The exporter over the archive at `archive` (`loom export` on a data directory), its SQL
/// service within `limits`.
pub async fn exporter(
    data_dir: &DataDir,
    master_key: Option<&SecretString>,
    key_store: &KeyStoreLocation,
    archive: &ArchiveLocation,
    limits: SqlLimits,
) -> Result<Exporter, RoleError> {
    let keys = open_keys(data_dir, master_key, key_store).await?;
    let archive = Archive::open(archive).map_err(NodeError::from)?;
    let sql = SqlService::new(archive, Arc::clone(&keys), limits)?;
    Ok(Exporter::new(Arc::new(sql), keys))
}

/// `loom replay`: rebuilds the read models from the log (after the archive, if given) into a new
/// version and switches readers to it. On the embedded log it runs beside a server that holds it.
pub async fn replay(
    log: &LogLocation,
    data_dir: &DataDir,
    master_key: Option<&SecretString>,
    read_models: &StoreLocation,
    from_archive: Option<(&ArchiveLocation, &KeyStoreLocation)>,
    config: ProjectorConfig,
    progress: bool,
) -> Result<ReplayReport, RoleError> {
    let chain_key = load_master_key(data_dir, master_key)?.map(|key| key.chain_key());
    let opened = open_log(log, data_dir, chain_key.as_ref(), Access::Read).await?;
    let from_archive = match from_archive {
        Some((location, key_store)) => Some(FromArchive {
            archive: Archive::open(location).map_err(NodeError::from)?,
            keys: open_keys(data_dir, master_key, key_store).await?,
        }),
        None => None,
    };
    Ok(loom_projector::replay(opened.log, from_archive, read_models, config, progress).await?)
}

/// `loom migrate`: creates the Kafka topics (with `log` on Kafka) and applies the Postgres
/// migrations of the key store and the active read models (with `database_url`).
pub async fn migrate(log: &LogLocation, database_url: Option<&str>) -> Result<(), RoleError> {
    let kafka = match log {
        LogLocation::Kafka { kafka, .. } => Some(kafka),
        LogLocation::Embedded { .. } => None,
    };
    if kafka.is_none() && database_url.is_none() {
        return Err(RoleError::NothingToMigrate);
    }
    if let Some(kafka) = kafka {
        let mut kafka = kafka.clone();
        kafka.create_topics = true;
        let log = KafkaLog::connect(kafka).await?;
        tracing::info!(
            data_partitions = log.partitions(Topic::Data),
            "Kafka topics are ready"
        );
    }
    if let Some(url) = database_url {
        migrate_postgres(url).await?;
    }
    Ok(())
}

async fn migrate_postgres(url: &str) -> Result<(), RoleError> {
    use sqlx::Connection;
    let mut connection = sqlx::PgConnection::connect(url)
        .await
        .map_err(RoleError::Connect)?;
    loom_schemas::keystore::POSTGRES_MIGRATOR
        .run(&mut connection)
        .await?;
    // The read models readers use (opening a version migrates it).
    let location = StoreLocation::Postgres(url.into());
    let catalog = loom_projector::Catalog::open(&location).await?;
    let version = catalog.active().await?;
    loom_projector::ReadStore::open(&location, version)
        .await?
        .close()
        .await;
    catalog.publish(version).await?;
    tracing::info!(read_models_version = version, "database is up to date");
    Ok(())
}
