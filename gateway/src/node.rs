//! A Loom node: the data directory's log and key store, opened once and shared.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use loom_schemas::keystore::{KeyStore, KeyStoreError, MasterKey, MasterKeySource};
use loom_schemas::log::{
    EmbeddedLog, EmbeddedLogConfig, FsyncPolicy, KafkaLog, KafkaLogConfig, Log, LogError,
    SpoolConfig, SpooledLog, Topic,
};
use tokio_util::sync::CancellationToken;

use crate::control::Control;

/// Where the log is.
#[derive(Debug, Clone)]
pub enum LogLocation {
    /// Segment files in `<data dir>/log` (the embedded default; one process).
    Embedded,
    /// A Kafka cluster, shared by every node; data-plane appends spool to `<data dir>/spool`
    /// while it is unreachable, up to `spool_max_records`.
    Kafka {
        kafka: KafkaLogConfig,
        spool_max_records: u64,
    },
}

/// Where tenant data keys are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyStoreLocation {
    /// `<data dir>/keys.json` (the embedded default).
    DataDir,
    /// A Postgres database, by URL.
    Postgres(String),
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub log: LogLocation,
    pub fsync: FsyncPolicy,
    pub segment_bytes: u64,
    pub key_store: KeyStoreLocation,
    /// The master key's text (`LOOM_MASTER_KEY`); `None` reads or creates `<data dir>/master.key`.
    pub master_key: Option<String>,
    /// What this process is, for the `producer` of the events it writes (`gateway`, `admin`).
    pub role: &'static str,
}

impl NodeConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            log: LogLocation::Embedded,
            fsync: FsyncPolicy::default(),
            segment_bytes: EmbeddedLogConfig::DEFAULT_SEGMENT_BYTES,
            key_store: KeyStoreLocation::DataDir,
            master_key: None,
            role: "gateway",
        }
    }

    pub fn log_dir(&self) -> PathBuf {
        self.data_dir.join("log")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("log: {0}")]
    Log(#[from] LogError),
    #[error("key store: {0}")]
    KeyStore(#[from] KeyStoreError),
    #[error("could not connect to the key store database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl NodeError {
    pub fn io(context: &str) -> impl FnOnce(std::io::Error) -> NodeError {
        let context = context.to_owned();
        move |source| NodeError::Io { context, source }
    }
}

/// What a running node shares between its tasks.
#[derive(Clone)]
pub struct Node {
    pub log: Arc<dyn Log>,
    /// The log's spool, when it is on Kafka.
    spool: Option<Arc<SpooledLog>>,
    pub keys: Arc<KeyStore>,
    pub control: Control,
    /// `role/host/pid`, the producer of the events this node writes.
    pub producer: Arc<str>,
    fsync: FsyncPolicy,
}

/// `role/host/pid`.
fn producer_id(role: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{role}/{host}/{}", std::process::id())
}

impl Node {
    /// Opens the data directory: the key store first (a wrong master key stops here, before the
    /// log is touched), then the log, recovering it from a crash if needed.
    pub async fn open(config: &NodeConfig) -> Result<Node, NodeError> {
        std::fs::create_dir_all(&config.data_dir).map_err(NodeError::io(&format!(
            "creating data directory {}",
            config.data_dir.display()
        )))?;
        let (master, source) =
            MasterKey::load_or_generate(&config.data_dir, config.master_key.as_deref())?;
        if let MasterKeySource::Generated(path) = &source {
            tracing::warn!(
                path = %path.display(),
                "generated a new master key: back it up, or set LOOM_MASTER_KEY; without it no stored body can be read"
            );
        }
        let keys = match &config.key_store {
            KeyStoreLocation::DataDir => {
                KeyStore::open_file(config.data_dir.join("keys.json"), master).await?
            }
            KeyStoreLocation::Postgres(url) => {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await?;
                KeyStore::open_postgres(pool, master).await?
            }
        };
        let mut spooled_log = None;
        let log: Arc<dyn Log> = match &config.log {
            LogLocation::Embedded => Arc::new(
                EmbeddedLog::open(EmbeddedLogConfig {
                    dir: config.log_dir(),
                    fsync: config.fsync,
                    segment_bytes: config.segment_bytes,
                })
                .await?,
            ),
            LogLocation::Kafka {
                kafka,
                spool_max_records,
            } => {
                let kafka = Arc::new(KafkaLog::connect(kafka.clone()).await?);
                let spool = SpoolConfig {
                    max_records: *spool_max_records,
                    ..SpoolConfig::new(config.data_dir.join("spool"))
                };
                let spooled = Arc::new(SpooledLog::open(kafka, spool).await?);
                spooled_log = Some(Arc::clone(&spooled));
                spooled
            }
        };
        let control = Control::load(&*log).await?;
        tracing::info!(
            data_dir = %config.data_dir.display(),
            log = match &config.log {
                LogLocation::Embedded => "embedded".to_owned(),
                LogLocation::Kafka { kafka, .. } => format!("kafka {}", kafka.brokers),
            },
            fsync = %config.fsync,
            key_store = ?config.key_store,
            tenants = control.read(|s| s.tenants().count()),
            "opened data directory"
        );
        Ok(Node {
            log,
            spool: spooled_log,
            keys: Arc::new(keys),
            control,
            producer: producer_id(config.role).into(),
            fsync: config.fsync,
        })
    }

    /// Background work until `shutdown`: follows the control topic, forwards the spool to Kafka,
    /// and forces the log to disk on the fsync interval.
    pub async fn run_background(self, shutdown: CancellationToken) {
        let drain = async {
            if let Some(spool) = &self.spool {
                spool.drain(shutdown.clone()).await;
            }
        };
        let follow = self.control.clone().follow(
            Arc::clone(&self.log),
            Arc::clone(&self.keys),
            shutdown.clone(),
        );
        tokio::join!(follow, drain, self.sync_periodically(shutdown.clone()));
    }

    async fn sync_periodically(&self, shutdown: CancellationToken) {
        let FsyncPolicy::Interval(interval) = self.fsync else {
            return;
        };
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {
                    if let Err(error) = self.log.sync().await {
                        tracing::error!(%error, "periodic log sync failed");
                    }
                }
            }
        }
    }

    /// The next offset of each topic's partition 0.
    pub async fn log_ends(&self) -> Result<Vec<(Topic, u64)>, LogError> {
        let mut ends = Vec::with_capacity(Topic::ALL.len());
        for topic in Topic::ALL {
            ends.push((topic, self.log.end_offset(topic, 0).await?));
        }
        Ok(ends)
    }

    /// Makes everything durable before the process exits.
    pub async fn close(&self) -> Result<(), NodeError> {
        Ok(self.log.sync().await?)
    }
}
