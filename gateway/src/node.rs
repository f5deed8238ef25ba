//! A Loom node: the data directory's log and key store, opened once and shared.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use loom_schemas::codec::Registry;
use loom_schemas::keystore::{KeyStore, KeyStoreError, MasterKey, MasterKeySource};
use loom_schemas::log::checkpoint::anchor_event;
use loom_schemas::log::{
    ChainKey, EmbeddedLog, EmbeddedLogConfig, FsyncPolicy, KafkaLog, KafkaLogConfig, Log, LogError,
    SpoolConfig, SpooledLog, Topic,
};
use loom_schemas::{ExposeSecret, SecretString};
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
        /// How long an append waits for Kafka before it spools instead.
        spool_after: Duration,
    },
}

/// Where tenant data keys are kept.
#[derive(Debug, Clone)]
pub enum KeyStoreLocation {
    /// `<data dir>/keys.json` (the embedded default).
    DataDir,
    /// A Postgres database, by URL (a secret: it may carry a password).
    Postgres(SecretString),
}

impl KeyStoreLocation {
    /// What to say about it in logs.
    fn describe(&self) -> &'static str {
        match self {
            KeyStoreLocation::DataDir => "data dir",
            KeyStoreLocation::Postgres(_) => "postgres",
        }
    }
}

#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub data_dir: PathBuf,
    pub log: LogLocation,
    pub fsync: FsyncPolicy,
    pub segment_bytes: u64,
    pub key_store: KeyStoreLocation,
    /// The master key's text (`LOOM_MASTER_KEY`); `None` reads or creates `<data dir>/master.key`.
    pub master_key: Option<SecretString>,
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
    /// Anchors the embedded log's data head in its control topic.
    anchors: Option<Anchors>,
    pub keys: Arc<KeyStore>,
    pub control: Control,
    /// `role/host/pid`, the producer of the events this node writes.
    pub producer: Arc<str>,
}

/// How often the embedded log's data head is anchored in the control topic (and at every start).
const ANCHOR_INTERVAL: Duration = Duration::from_secs(60);

/// Appends the embedded log's durable data head to its control topic (`log.anchored`), so that
/// `loom verify` can check the data chain against a head only the master key could have made.
#[derive(Clone)]
struct Anchors {
    log: Arc<EmbeddedLog>,
    key: ChainKey,
    /// The offset last anchored.
    last: Arc<std::sync::Mutex<Option<u64>>>,
}

impl Anchors {
    /// Anchors the data head if it moved since the last anchor.
    async fn anchor(&self, producer: &str) -> Result<(), LogError> {
        let Some((offset, head)) = self.log.durable_head(Topic::Data) else {
            return Ok(());
        };
        let moved = self.last.lock().map_or(true, |last| *last != Some(offset));
        if !moved || offset == 0 {
            return Ok(());
        }
        let event = anchor_event(&self.key, Topic::Data, 0, offset, &head, producer);
        let record = Registry::builtin()
            .and_then(|registry| registry.encode_record(&event))
            .map_err(|e| LogError::Task(format!("encoding an anchor: {e}")))?;
        self.log.append(Topic::Control, vec![record]).await?;
        if let Ok(mut last) = self.last.lock() {
            *last = Some(offset);
        }
        Ok(())
    }
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
        let (master, source) = MasterKey::load_or_generate(
            &config.data_dir,
            config.master_key.as_ref().map(|key| key.expose_secret()),
        )?;
        if let MasterKeySource::Generated(path) = &source {
            tracing::warn!(
                path = %path.display(),
                "generated a new master key: back it up, or set LOOM_MASTER_KEY; without it no stored body can be read"
            );
        }
        let chain_key = master.chain_key();
        let keys = match &config.key_store {
            KeyStoreLocation::DataDir => {
                KeyStore::open_file(config.data_dir.join("keys.json"), master).await?
            }
            KeyStoreLocation::Postgres(url) => {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url.expose_secret())
                    .await?;
                KeyStore::open_postgres(pool, master).await?
            }
        };
        let mut spooled_log = None;
        let mut embedded = None;
        let log: Arc<dyn Log> = match &config.log {
            LogLocation::Embedded => {
                let log = Arc::new(
                    EmbeddedLog::open(EmbeddedLogConfig {
                        dir: config.log_dir(),
                        fsync: config.fsync,
                        segment_bytes: config.segment_bytes,
                        chain_key: chain_key.clone(),
                    })
                    .await?,
                );
                embedded = Some(Arc::clone(&log));
                log
            }
            LogLocation::Kafka {
                kafka,
                spool_max_records,
                spool_after,
            } => {
                let kafka = Arc::new(KafkaLog::connect(kafka.clone()).await?);
                let spool = SpoolConfig {
                    max_records: *spool_max_records,
                    kafka_timeout: *spool_after,
                    ..SpoolConfig::new(config.data_dir.join("spool"), chain_key.clone())
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
            key_store = config.key_store.describe(),
            tenants = control.read(|s| s.tenants().count()),
            "opened data directory"
        );
        let node = Node {
            log,
            spool: spooled_log,
            anchors: embedded.map(|log| Anchors {
                log,
                key: chain_key,
                last: Arc::new(std::sync::Mutex::new(control.read(|s| s.anchored()))),
            }),
            keys: Arc::new(keys),
            control,
            producer: producer_id(config.role).into(),
        };
        // What recovery left is durable now: anchor it before anything else is written.
        if let Some(anchors) = &node.anchors {
            anchors.anchor(&node.producer).await?;
        }
        Ok(node)
    }

    /// Background work until `shutdown`: follows the control topic, forwards the spool to Kafka,
    /// and anchors the embedded log's head. (The embedded log keeps its fsync interval itself.)
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
        tokio::join!(follow, drain, self.anchor_periodically(shutdown.clone()));
    }

    async fn anchor_periodically(&self, shutdown: CancellationToken) {
        let Some(anchors) = &self.anchors else {
            return;
        };
        let mut ticker = tokio::time::interval(ANCHOR_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {
                    if let Err(error) = anchors.anchor(&self.producer).await {
                        tracing::error!(%error, "anchoring the log's head failed");
                    }
                }
            }
        }
    }

    /// The log, when it is the embedded one.
    pub fn embedded_log(&self) -> Option<Arc<EmbeddedLog>> {
        self.anchors
            .as_ref()
            .map(|anchors| Arc::clone(&anchors.log))
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
