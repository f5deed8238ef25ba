//! A Loom node: the data directory's key store and the log, opened once and shared; and
//! [`open_log`], the one way every role opens the log.

use std::sync::Arc;
use std::time::Duration;

use loom_gateway::{Control, Services, StartError};
use loom_schemas::codec::Registry;
use loom_schemas::keystore::{KeyStore, KeyStoreError, MasterKey, MasterKeySource};
use loom_schemas::log::checkpoint::anchor_event;
use loom_schemas::log::{
    ChainKey, EmbeddedLog, EmbeddedLogConfig, FsyncPolicy, KafkaLog, KafkaLogConfig, Log, LogError,
    SpoolConfig, SpooledLog, Topic,
};
use loom_schemas::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use crate::DataDir;

/// Where the log is.
#[derive(Debug, Clone)]
pub enum LogLocation {
    /// Segment files in `<data dir>/log` (the embedded default; one writing process).
    Embedded {
        fsync: FsyncPolicy,
        segment_bytes: u64,
    },
    /// A Kafka cluster, shared by every node; data-plane appends spool to `<data dir>/spool`
    /// while it is unreachable, up to `spool_max_records`.
    Kafka {
        kafka: KafkaLogConfig,
        spool_max_records: u64,
        /// How long an append waits for Kafka before it spools instead.
        spool_after: Duration,
    },
}

impl Default for LogLocation {
    fn default() -> LogLocation {
        LogLocation::Embedded {
            fsync: FsyncPolicy::default(),
            segment_bytes: EmbeddedLogConfig::DEFAULT_SEGMENT_BYTES,
        }
    }
}

/// Where tenant data keys are kept.
#[derive(Debug, Clone, Default)]
pub enum KeyStoreLocation {
    /// `<data dir>/keys.json` (the embedded default).
    #[default]
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
    pub data_dir: DataDir,
    pub log: LogLocation,
    pub key_store: KeyStoreLocation,
    /// The master key's text (`LOOM_MASTER_KEY`); `None` reads or creates `<data dir>/master.key`.
    pub master_key: Option<SecretString>,
    /// What this process is, for the `producer` of the events it writes (`gateway`, `admin`).
    pub role: &'static str,
}

impl NodeConfig {
    pub fn new(data_dir: DataDir) -> Self {
        Self {
            data_dir,
            log: LogLocation::default(),
            key_store: KeyStoreLocation::DataDir,
            master_key: None,
            role: "gateway",
        }
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
    #[error(transparent)]
    Gateway(#[from] StartError),
    #[error("archive: {0}")]
    Archive(#[from] loom_projector::archive::location::LocationError),
    #[error("the SQL service: {0}")]
    Sql(#[from] loom_query::sql::SqlError),
    #[error(
        "the embedded log's checkpoints are authenticated with the master key, and there is none"
    )]
    NoMasterKey,
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

/// What a role does with the log it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Appends: the embedded log held by this process alone; on Kafka, with a local spool.
    Write,
    /// Reads only: the embedded log read-only beside a server that holds it, if one does.
    Read,
}

/// A log as [`open_log`] opens it.
pub struct OpenedLog {
    pub log: Arc<dyn Log>,
    /// The same log, when it is the embedded one.
    pub embedded: Option<Arc<EmbeddedLog>>,
    /// The spool in front of Kafka, when writing to Kafka.
    pub spool: Option<Arc<SpooledLog>>,
}

/// Opens the log where `location` says, for `access` — the one way `serve`, `gateway`,
/// `projector`, `replay` and `admin` open it. `chain_key` authenticates the embedded log's (and
/// the spool's) checkpoints; reading Kafka needs none.
pub async fn open_log(
    location: &LogLocation,
    data_dir: &DataDir,
    chain_key: Option<&ChainKey>,
    access: Access,
) -> Result<OpenedLog, NodeError> {
    let needs_key = || chain_key.cloned().ok_or(NodeError::NoMasterKey);
    Ok(match (location, access) {
        (
            LogLocation::Embedded {
                fsync,
                segment_bytes,
            },
            _,
        ) => {
            let config = EmbeddedLogConfig {
                dir: data_dir.log(),
                fsync: *fsync,
                segment_bytes: *segment_bytes,
                chain_key: needs_key()?,
            };
            let log = match (EmbeddedLog::open(config.clone()).await, access) {
                (Ok(log), _) => log,
                // A running server holds it: read what it holds now, beside it.
                (Err(LogError::Locked(_)), Access::Read) => {
                    tracing::info!("a server holds the log; reading it read-only beside it");
                    EmbeddedLog::open_read_only(config.dir, config.chain_key).await?
                }
                (Err(error), _) => return Err(error.into()),
            };
            let log = Arc::new(log);
            OpenedLog {
                log: Arc::clone(&log) as Arc<dyn Log>,
                embedded: Some(log),
                spool: None,
            }
        }
        (LogLocation::Kafka { kafka, .. }, Access::Read) => OpenedLog {
            log: Arc::new(KafkaLog::connect(kafka.clone()).await?),
            embedded: None,
            spool: None,
        },
        (
            LogLocation::Kafka {
                kafka,
                spool_max_records,
                spool_after,
            },
            Access::Write,
        ) => {
            let kafka = Arc::new(KafkaLog::connect(kafka.clone()).await?);
            let spool = SpoolConfig {
                max_records: *spool_max_records,
                kafka_timeout: *spool_after,
                ..SpoolConfig::new(data_dir.spool(), needs_key()?)
            };
            let spooled = Arc::new(SpooledLog::open(kafka, spool).await?);
            OpenedLog {
                log: Arc::clone(&spooled) as Arc<dyn Log>,
                embedded: None,
                spool: Some(spooled),
            }
        }
    })
}

/// The master key named by `master_key` (`LOOM_MASTER_KEY`) or `<data dir>/master.key`, if any
/// (readers never generate one).
pub fn load_master_key(
    data_dir: &DataDir,
    master_key: Option<&SecretString>,
) -> Result<Option<MasterKey>, KeyStoreError> {
    MasterKey::load(
        &data_dir.master_key_file(),
        master_key.map(|key| key.expose_secret()),
    )
}

/// The key store at `location`, opened with `master`.
pub async fn open_key_store(
    location: &KeyStoreLocation,
    data_dir: &DataDir,
    master: MasterKey,
) -> Result<KeyStore, NodeError> {
    Ok(match location {
        KeyStoreLocation::DataDir => KeyStore::open_file(data_dir.keys_file(), master).await?,
        KeyStoreLocation::Postgres(url) => {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url.expose_secret())
                .await?;
            KeyStore::open_postgres(pool, master).await?
        }
    })
}

/// What a running node shares between its tasks.
#[derive(Clone)]
pub struct Node {
    /// What the gateway and the admin API work with.
    pub services: Services,
    /// The log's spool, when it is on Kafka.
    spool: Option<Arc<SpooledLog>>,
    /// Anchors the embedded log's data head in its control topic.
    anchors: Option<Anchors>,
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
        let data_dir = &config.data_dir;
        std::fs::create_dir_all(data_dir.path()).map_err(NodeError::io(&format!(
            "creating data directory {}",
            data_dir.path().display()
        )))?;
        let (master, source) = MasterKey::load_or_generate(
            &data_dir.master_key_file(),
            config.master_key.as_ref().map(|key| key.expose_secret()),
        )?;
        if let MasterKeySource::Generated(path) = &source {
            tracing::warn!(
                path = %path.display(),
                "generated a new master key: back it up, or set LOOM_MASTER_KEY; without it no stored body can be read"
            );
        }
        let chain_key = master.chain_key();
        let keys = open_key_store(&config.key_store, data_dir, master).await?;
        let opened = open_log(&config.log, data_dir, Some(&chain_key), Access::Write).await?;
        let control = Control::load(&*opened.log).await?;
        tracing::info!(
            data_dir = %data_dir.path().display(),
            log = match &config.log {
                LogLocation::Embedded { fsync, .. } => format!("embedded, fsync {fsync}"),
                LogLocation::Kafka { kafka, .. } => format!("kafka {}", kafka.brokers),
            },
            key_store = config.key_store.describe(),
            tenants = control.read(|s| s.tenants().count()),
            "opened data directory"
        );
        let anchors = opened.embedded.clone().map(|log| Anchors {
            log,
            key: chain_key,
            last: Arc::new(std::sync::Mutex::new(control.read(|s| s.anchored()))),
        });
        let node = Node {
            services: Services {
                log: opened.log,
                embedded: opened.embedded,
                keys: Arc::new(keys),
                control,
                producer: producer_id(config.role).into(),
                response_index: None,
                spans: None,
            },
            spool: opened.spool,
            anchors,
        };
        // What recovery left is durable now: anchor it before anything else is written.
        if let Some(anchors) = &node.anchors {
            anchors.anchor(&node.services.producer).await?;
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
        let follow = self.services.control.clone().follow(
            Arc::clone(&self.services.log),
            Arc::clone(&self.services.keys),
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
                    if let Err(error) = anchors.anchor(&self.services.producer).await {
                        tracing::error!(%error, "anchoring the log's head failed");
                    }
                }
            }
        }
    }

    /// Makes everything durable before the process exits.
    pub async fn close(&self) -> Result<(), NodeError> {
        Ok(self.services.log.sync().await?)
    }
}
