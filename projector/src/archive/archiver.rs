//! The archive projector: reads every partition of the log, buffers each tenant's events, and
//! rolls them into files (by size or age), one per date partition, named in the tenant's manifest
//! with the log positions they reach.
//!
//! Exactly once: an event is archived when its file is named by a manifest entry; the entry
//! carries the positions up to which the tenant's events are archived. On start the archiver reads
//! the manifests and skips, per tenant, every event below its positions; a file written without
//! its entry (a crash in between) is an orphan that readers never see and the start sweeps away.
//! An event the log holds twice (the spool forwards at least once, so a copy follows the original
//! closely in its partition) is archived once: the last `dedupe_window` event ids are remembered,
//! and the window is refilled on start by reading that far back.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::TryStreamExt;
use loom_schemas::codec::{HEADER_SCHEMA_VERSION, HEADER_TENANT_ID, Registry};
use loom_schemas::event::{Event, Payload};
use loom_schemas::keystore::{KeyStore, KeyStoreError};
use loom_schemas::log::{Entry, Log, LogError, Record, Topic};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::columns::{LogPosition, Row};
use super::file::{self, FileError};
use super::keys::KeyError;
use super::manifest::{
    Action, Draft, FileRef, Manifest, ManifestError, position_key, sha256_hex, tenant_dir,
};
use super::{Archive, SYSTEM_TENANT, compact};

#[derive(Debug, Clone)]
pub struct ArchiveConfig {
    /// A tenant's buffered events are written out once their records reach this many bytes.
    pub roll_bytes: usize,
    /// … or once the oldest has waited this long.
    pub roll_after: Duration,
    /// Memory the buffers of all tenants hold at most (rows and records); past it the largest
    /// buffer is written out.
    pub max_buffered_bytes: usize,
    /// Event ids remembered to drop copies the log holds twice.
    pub dedupe_window: usize,
    /// Merging small files (`None`: never).
    pub compaction: Option<compact::CompactConfig>,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig {
            roll_bytes: 128 << 20,
            roll_after: Duration::from_secs(600),
            max_buffered_bytes: 512 << 20,
            dedupe_window: 200_000,
            compaction: Some(compact::CompactConfig::default()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("log: {0}")]
    Log(#[from] LogError),
    #[error("codec: {0}")]
    Codec(#[from] loom_schemas::codec::CodecError),
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("key store: {0}")]
    Keys(#[from] KeyStoreError),
    #[error("writing an archive file: {0}")]
    File(#[from] FileError),
    #[error("archive task: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Where reading starts again after a restart: no event below these positions waits in a buffer.
/// A hint: the manifests' positions decide what is archived, so a stale checkpoint costs only
/// re-reading.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Checkpoint {
    positions: BTreeMap<String, u64>,
}

fn checkpoint_path(archive: &Archive) -> Path {
    archive
        .root
        .clone()
        .join("_archiver")
        .join("checkpoint.json")
}

/// One tenant's events waiting for their files.
struct Buffer {
    /// The rows of each UTC day (days since the epoch): a file each.
    days: BTreeMap<i64, Vec<Row>>,
    rows: usize,
    /// Record bytes, what `roll_bytes` counts.
    bytes: usize,
    /// Memory held: rows and records.
    memory: usize,
    opened: Instant,
    /// The first buffered offset per `topic/partition`.
    first: BTreeMap<String, u64>,
}

/// The ids of the last events seen, oldest first.
struct Window {
    capacity: usize,
    order: VecDeque<Uuid>,
    ids: HashSet<Uuid>,
}

impl Window {
    fn new(capacity: usize) -> Window {
        Window {
            capacity,
            order: VecDeque::with_capacity(capacity.min(1 << 20)),
            ids: HashSet::with_capacity(capacity.min(1 << 20)),
        }
    }

    /// False if `id` was seen within the window.
    fn insert(&mut self, id: Uuid) -> bool {
        if self.capacity == 0 {
            return true;
        }
        if !self.ids.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.capacity
            && let Some(old) = self.order.pop_front()
        {
            self.ids.remove(&old);
        }
        true
    }
}

pub struct Archiver {
    archive: Archive,
    log: Arc<dyn Log>,
    keys: Arc<KeyStore>,
    config: ArchiveConfig,
    /// Records read (copies and skipped ones included), over every run.
    records_read: Arc<AtomicU64>,
}

/// A batch from one partition's reader.
struct Batch {
    topic: Topic,
    entries: Vec<Entry>,
    /// Below this offset, entries only refill the dedupe window.
    start: u64,
}

impl Archiver {
    pub fn new(
        archive: Archive,
        log: Arc<dyn Log>,
        keys: Arc<KeyStore>,
        config: ArchiveConfig,
    ) -> Archiver {
        Archiver {
            archive,
            log,
            keys,
            config,
            records_read: Arc::default(),
        }
    }

    /// Records read from the log so far (copies and already archived ones included), over every
    /// run: a run has caught up with a log of `n` records once it read `n` (less where it started).
    pub fn records_read(&self) -> u64 {
        self.records_read.load(Ordering::Relaxed)
    }

    /// Archives until `shutdown`; then writes out what is buffered.
    /// Runs until `shutdown`, starting again (from the manifests) 5 s after any error: the log
    /// keeps every event, so nothing is lost while the archiver is down.
    pub async fn run_restarting(&self, shutdown: CancellationToken) {
        while let Err(error) = self.run(shutdown.clone()).await {
            metrics::counter!("loom_archive_restarts_total").increment(1);
            tracing::error!(%error, "the archiver stopped; starting it again in 5 s");
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// Archives until `shutdown`, then reads on to where the log ended at that moment (for at
    /// most [`DRAIN`]: a stopped server leaves its whole log archived) and writes out every
    /// buffer.
    pub async fn run(&self, shutdown: CancellationToken) -> Result<(), ArchiveError> {
        let registry = Registry::builtin()?;
        ensure_keys(&self.keys, SYSTEM_TENANT).await?;
        let mut state = State {
            archive: self.archive.clone(),
            keys: Arc::clone(&self.keys),
            registry,
            config: self.config.clone(),
            manifests: HashMap::new(),
            buffers: HashMap::new(),
            buffered: 0,
            spare: Vec::new(),
            read: BTreeMap::new(),
            window: Window::new(self.config.dedupe_window),
            shutdown: shutdown.clone(),
            checkpointed: BTreeMap::new(),
            records_read: Arc::clone(&self.records_read),
        };
        state.load().await?;
        let checkpoint = state.checkpoint_read().await?;

        // The readers outlive `shutdown` by the drain.
        let stop = CancellationToken::new();
        let (sender, mut batches) = mpsc::channel::<Result<Batch, LogError>>(8);
        let mut readers = tokio::task::JoinSet::new();
        for topic in Topic::ALL {
            for partition in 0..self.log.partitions(topic) {
                let key = position_key(topic.name(), partition);
                // No position yet: a new archive starts wherever the log begins.
                let known = checkpoint.positions.get(&key).copied();
                let start = known.unwrap_or(0);
                state.read.insert(key, start);
                // Read back far enough to refill the dedupe window (data and quota topics: the
                // spool's copies).
                let back = match topic {
                    Topic::Data | Topic::Quota => {
                        start.saturating_sub(self.config.dedupe_window as u64)
                    }
                    Topic::Control => start,
                };
                readers.spawn(read_partition(
                    Arc::clone(&self.log),
                    topic,
                    partition,
                    back,
                    known,
                    sender.clone(),
                    stop.clone(),
                ));
            }
        }
        drop(sender);
        if let Some(config) = self.config.compaction.clone() {
            let (archive, keys, stop) =
                (self.archive.clone(), Arc::clone(&self.keys), stop.clone());
            readers.spawn(async move {
                compact::run(archive, keys, config, stop).await;
                Ok(())
            });
        }

        // Where the files reach, for the lag (measured aside: the log may be slow to answer).
        let archived = Arc::new(std::sync::Mutex::new(state.archived()));
        readers.spawn(report_lag(
            Arc::clone(&self.log),
            Arc::clone(&archived),
            stop.clone(),
        ));
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // Once stopping: where each partition ended, and until when to read on to it.
        let mut draining: Option<(BTreeMap<String, u64>, Instant)> = None;
        let result = loop {
            if let Some((ends, until)) = &draining
                && (state.has_read(ends) || Instant::now() >= *until)
            {
                break Ok(());
            }
            tokio::select! {
                () = shutdown.cancelled(), if draining.is_none() => {
                    match self.ends().await {
                        Ok(ends) => draining = Some((ends, Instant::now() + DRAIN)),
                        Err(error) => {
                            tracing::warn!(%error, "reading where the log ends; stopping at once");
                            break Ok(());
                        }
                    }
                }
                batch = batches.recv() => match batch {
                    Some(Ok(batch)) => {
                        if let Err(error) = state.ingest(batch).await {
                            break Err(error);
                        }
                    }
                    Some(Err(error)) => break Err(error.into()),
                    None => break Ok(()),
                },
                _ = tick.tick() => {
                    if let Err(error) = state.roll_aged().await {
                        break Err(error);
                    }
                    if let Ok(mut positions) = archived.lock() {
                        *positions = state.archived();
                    }
                }
            }
        };
        stop.cancel();
        drop(batches);
        while readers.join_next().await.is_some() {}
        // What is buffered is written out (unless the store is down: then it is read again on
        // the next start, its positions never having been recorded).
        let flushed = state.flush_all().await;
        result.and(flushed)
    }
}

/// How long a stopping archiver reads on to where the log ended.
pub const DRAIN: Duration = Duration::from_secs(10);

const DAY_MICROS: i64 = 86_400_000_000;

/// Emptied row vectors kept (their capacity is at most a buffer's, so within
/// `max_buffered_bytes` each).
const SPARE_ROW_VECS: usize = 2;

/// How often the archiver's lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(10);

/// Sets `loom_archive_lag_records{topic, partition}` every [`LAG_EVERY`] until `stop`: records
/// in the log past what the archive's files hold.
async fn report_lag(
    log: Arc<dyn Log>,
    archived: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    stop: CancellationToken,
) -> Result<(), LogError> {
    let measure = async || {
        for topic in Topic::ALL {
            for partition in 0..log.partitions(topic) {
                let Ok(end) = log.end_offset(topic, partition).await else {
                    continue;
                };
                let key = position_key(topic.name(), partition);
                let at = archived
                    .lock()
                    .map_or(0, |positions| positions.get(&key).copied().unwrap_or(0));
                metrics::gauge!(
                    "loom_archive_lag_records",
                    "topic" => topic.name(),
                    "partition" => partition.to_string()
                )
                .set(end.saturating_sub(at) as f64);
            }
        }
        tokio::time::sleep(LAG_EVERY).await;
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = measure() => {}
        }
    }
}

impl Archiver {
    /// Where each partition of the log ends now.
    async fn ends(&self) -> Result<BTreeMap<String, u64>, LogError> {
        let mut ends = BTreeMap::new();
        for topic in Topic::ALL {
            for partition in 0..self.log.partitions(topic) {
                let end = self.log.end_offset(topic, partition).await?;
                ends.insert(position_key(topic.name(), partition), end);
            }
        }
        Ok(ends)
    }
}

/// Creates keys for `tenant` if it has none (the system tenant's, on first start).
async fn ensure_keys(keys: &KeyStore, tenant: Uuid) -> Result<(), KeyStoreError> {
    match keys.current_key(tenant) {
        Ok(_) => Ok(()),
        Err(KeyStoreError::UnknownTenant(_)) => {
            keys.reload().await?;
            if keys.current_key(tenant).is_err() {
                keys.create_tenant_keys(tenant).await?;
            }
            Ok(())
        }
        Err(error) => Err(error),
    }
}

/// Reads one partition from `back` on (entries below `start` refill the dedupe window) until
/// `stop` or the receiver is gone. `start` is where archiving stopped (`None`: nowhere yet).
async fn read_partition(
    log: Arc<dyn Log>,
    topic: Topic,
    partition: u32,
    back: u64,
    start: Option<u64>,
    sender: mpsc::Sender<Result<Batch, LogError>>,
    stop: CancellationToken,
) -> Result<(), LogError> {
    let known = start.is_some();
    let start = start.unwrap_or(0);
    let reader = match log.read_from(topic, partition, back).await {
        Ok(reader) => Ok(reader),
        // The log no longer holds the window (retention): start where archiving does.
        Err(_) if back < start => log.read_from(topic, partition, start).await,
        Err(error) => Err(error),
    };
    // A log past its retention may hand out its first record still held (Kafka resets a fetch
    // out of range): events below that were never archived, and are lost unless it stops here.
    let mut first = true;
    let mut reader = match reader {
        Ok(reader) => reader,
        Err(error) => {
            let _ = sender.send(Err(error)).await;
            return Ok(());
        }
    };
    loop {
        let entries = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            entries = reader.next(4096) => entries,
        };
        let batch = entries.and_then(|entries| {
            if let Some(entry) = entries.first().filter(|_| first) {
                first = false;
                if entry.position.offset > start && !known {
                    tracing::warn!(
                        topic = topic.name(),
                        partition,
                        offset = entry.position.offset,
                        "a new archive starts where the log begins: earlier events are gone"
                    );
                } else if entry.position.offset > start {
                    return Err(LogError::Missing {
                        topic: topic.name(),
                        partition,
                        from: start,
                        to: entry.position.offset,
                    });
                }
            }
            Ok(Batch {
                topic,
                entries,
                start,
            })
        });
        let failed = batch.is_err();
        if sender.send(batch).await.is_err() || failed {
            return Ok(());
        }
    }
}

struct State {
    archive: Archive,
    keys: Arc<KeyStore>,
    registry: &'static Registry,
    config: ArchiveConfig,
    manifests: HashMap<Uuid, Manifest>,
    buffers: HashMap<Uuid, Buffer>,
    /// Memory the buffers of all tenants hold.
    buffered: usize,
    /// Emptied row vectors kept for the next buffers: a buffer's rows run to hundreds of MiB,
    /// and memory freshly mapped for each would be faulted in and zeroed all over again.
    spare: Vec<Vec<Row>>,
    /// The next offset to read per `topic/partition`.
    read: BTreeMap<String, u64>,
    window: Window,
    shutdown: CancellationToken,
    /// The positions of the last checkpoint written.
    checkpointed: BTreeMap<String, u64>,
    records_read: Arc<AtomicU64>,
}

impl State {
    /// Reads every tenant's manifest and removes the files none names (left by a write that
    /// crashed before its entry, or by compaction before it removed what it merged).
    async fn load(&mut self) -> Result<(), ArchiveError> {
        for tenant in self.archive.tenants().await? {
            let manifest = self.archive.manifest(tenant).await?;
            let dir = tenant_dir(&self.archive.root, tenant);
            let stored: Vec<Path> = self
                .archive
                .store
                .list(Some(&dir))
                .map_ok(|meta| meta.location)
                .try_collect()
                .await?;
            for path in stored {
                let Some(relative) = path
                    .prefix_match(&dir)
                    .map(|parts| parts.map(|p| p.as_ref().to_owned()).collect::<Vec<_>>())
                else {
                    continue;
                };
                if relative.first().is_some_and(|p| p == "_manifest") {
                    continue;
                }
                let relative = relative.join("/");
                if !manifest.files.contains_key(&relative) {
                    tracing::warn!(%path, "removing a file no manifest entry names");
                    self.archive.store.delete(&path).await?;
                }
            }
            self.manifests.insert(tenant, manifest);
        }
        Ok(())
    }

    async fn checkpoint_read(&self) -> Result<Checkpoint, ArchiveError> {
        Ok(Checkpoint {
            positions: read_checkpoint(&self.archive).await?,
        })
    }

    /// Whether every partition is read up to `ends`.
    fn has_read(&self, ends: &BTreeMap<String, u64>) -> bool {
        ends.iter()
            .all(|(key, end)| self.read.get(key).is_some_and(|read| read >= end))
    }

    /// Per `topic/partition`, the offset below which every event read is in a file: where
    /// reading may start again.
    fn archived(&self) -> BTreeMap<String, u64> {
        let mut positions = self.read.clone();
        for buffer in self.buffers.values() {
            for (key, &first) in &buffer.first {
                if let Some(at) = positions.get_mut(key) {
                    *at = (*at).min(first);
                }
            }
        }
        positions
    }

    /// Records where reading may start again: nothing below it is only in a buffer.
    async fn checkpoint_write(&mut self) -> Result<(), ArchiveError> {
        let positions = self.archived();
        if positions == self.checkpointed {
            return Ok(());
        }
        let bytes = serde_json::to_vec(&Checkpoint {
            positions: positions.clone(),
        })
        .map_err(|e| object_store::Error::Generic {
            store: "archive",
            source: Box::new(e),
        })?;
        self.archive
            .put(&checkpoint_path(&self.archive), Bytes::from(bytes))
            .await?;
        self.checkpointed = positions;
        Ok(())
    }

    async fn ingest(&mut self, batch: Batch) -> Result<(), ArchiveError> {
        let topic = batch.topic.name();
        // Tenants erased in this batch: nothing of theirs is archived from here on.
        let mut erased = Vec::new();
        let fresh = batch
            .entries
            .iter()
            .filter(|e| e.position.offset >= batch.start)
            .count();
        self.records_read.fetch_add(fresh as u64, Ordering::Relaxed);
        for entry in batch.entries {
            let Entry { position, record } = entry;
            let key = position_key(topic, position.partition);
            let decoded = self.registry.decode(&record.value);
            if let Ok(event) = &decoded {
                let fresh = self.window.insert(event.envelope.event_id);
                if position.offset < batch.start {
                    continue;
                }
                if !fresh {
                    metrics::counter!("loom_archive_duplicates_total").increment(1);
                    self.read.insert(key, position.offset + 1);
                    continue;
                }
            } else if position.offset < batch.start {
                continue;
            }
            self.read.insert(key.clone(), position.offset + 1);
            let tenant = tenant_of_decoded(&decoded, batch.topic, &record);
            let manifest = self.manifest(tenant).await?;
            if manifest.erased || position.offset < manifest.position(&key) {
                continue;
            }
            let at = LogPosition {
                topic,
                partition: position.partition,
                offset: position.offset,
            };
            if let Ok(event) = &decoded
                && let Payload::TenantErased(_) = event.payload
            {
                erased.push(event.envelope.tenant_id);
            }
            let row = match decoded {
                Ok(event) => {
                    let version = record
                        .header(HEADER_SCHEMA_VERSION)
                        .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
                        .or_else(|| self.registry.current_version(event.payload.event_type()))
                        .unwrap_or(0);
                    Row::new(
                        &event,
                        i32::try_from(version).unwrap_or(i32::MAX),
                        at,
                        record.timestamp_us,
                        record.value,
                    )
                }
                Err(_) => Row::undecodable(tenant, at, record.timestamp_us, record.value),
            };
            let (bytes, memory) = (row.record.len(), row.memory());
            let buffer = self.buffers.entry(tenant).or_insert_with(|| Buffer {
                days: BTreeMap::new(),
                rows: 0,
                bytes: 0,
                memory: 0,
                opened: Instant::now(),
                first: BTreeMap::new(),
            });
            buffer.first.entry(key).or_insert(position.offset);
            buffer
                .days
                .entry(row.occurred_at.div_euclid(DAY_MICROS))
                .or_insert_with(|| self.spare.pop().unwrap_or_default())
                .push(row);
            buffer.rows += 1;
            buffer.bytes += bytes;
            buffer.memory += memory;
            self.buffered += memory;
            if buffer.bytes >= self.config.roll_bytes {
                self.flush(tenant).await?;
            }
        }
        for tenant in erased {
            self.erase(tenant).await?;
        }
        while self.buffered > self.config.max_buffered_bytes {
            let Some(largest) = self
                .buffers
                .iter()
                .max_by_key(|(_, b)| b.memory)
                .map(|(tenant, _)| *tenant)
            else {
                break;
            };
            self.flush(largest).await?;
        }
        Ok(())
    }

    /// Drops what the erased `tenant` has buffered and marks its manifest erased: its keys are
    /// gone, its files unreadable, and nothing of it is archived from here on.
    async fn erase(&mut self, tenant: Uuid) -> Result<(), ArchiveError> {
        if tenant == SYSTEM_TENANT || self.manifest(tenant).await?.erased {
            return Ok(());
        }
        if let Some(buffer) = self.buffers.remove(&tenant) {
            self.buffered -= buffer.memory;
        }
        tracing::info!(%tenant, "the tenant was erased: its archive is shredded");
        let draft = Draft {
            action: Action::Erase,
            add: Vec::new(),
            remove: Vec::new(),
            covers: BTreeMap::new(),
            positions: self.read.clone(),
        };
        self.append(tenant, draft).await
    }

    /// The tenant's manifest, read on first sight.
    async fn manifest(&mut self, tenant: Uuid) -> Result<&Manifest, ArchiveError> {
        if !self.manifests.contains_key(&tenant) {
            let manifest = self.archive.manifest(tenant).await?;
            self.manifests.insert(tenant, manifest);
        }
        Ok(&self.manifests[&tenant])
    }

    async fn roll_aged(&mut self) -> Result<(), ArchiveError> {
        let aged: Vec<Uuid> = self
            .buffers
            .iter()
            .filter(|(_, b)| b.opened.elapsed() >= self.config.roll_after)
            .map(|(tenant, _)| *tenant)
            .collect();
        for tenant in aged {
            self.flush(tenant).await?;
        }
        // Nothing buffered (events of erased tenants, copies): the checkpoint moves on anyway.
        if self.buffers.is_empty()
            && let Err(error) = self.checkpoint_write().await
        {
            tracing::warn!(%error, "writing the archiver's checkpoint");
        }
        Ok(())
    }

    async fn flush_all(&mut self) -> Result<(), ArchiveError> {
        let tenants: Vec<Uuid> = self.buffers.keys().copied().collect();
        for tenant in tenants {
            self.flush(tenant).await?;
        }
        Ok(())
    }

    /// Writes out a tenant's buffer: a file per date, then the manifest entry naming them with
    /// the positions reached. Retries the object store (and a key store not yet knowing the
    /// tenant) until it answers, or until shut down (the events are then read again on start).
    async fn flush(&mut self, tenant: Uuid) -> Result<(), ArchiveError> {
        let Some(buffer) = self.buffers.remove(&tenant) else {
            return Ok(());
        };
        self.buffered -= buffer.memory;
        let positions = self.read.clone();
        let covers = buffer
            .first
            .iter()
            .map(|(key, &from)| {
                (
                    key.clone(),
                    [from, positions.get(key).copied().unwrap_or(from)],
                )
            })
            .collect();
        let (rows, mut days) = (buffer.rows, buffer.days);
        let started = Instant::now();
        let mut backoff = Duration::from_millis(200);
        let draft = loop {
            match self.write_files(tenant, &mut days).await {
                Ok(add) => {
                    break Draft {
                        action: Action::Append,
                        add,
                        remove: Vec::new(),
                        covers,
                        positions,
                    };
                }
                Err(ArchiveError::File(FileError::Keys(KeyError::KeyStore(
                    KeyStoreError::Erased(_),
                )))) => {
                    tracing::info!(%tenant, rows, "the tenant was erased: its events are not archived");
                    break Draft {
                        action: Action::Erase,
                        add: Vec::new(),
                        remove: Vec::new(),
                        covers: BTreeMap::new(),
                        positions,
                    };
                }
                Err(error) => {
                    metrics::counter!("loom_archive_failures_total").increment(1);
                    tracing::error!(%error, %tenant, rows, "writing archive files failed; retrying");
                    if let Err(error) = self.keys.reload().await {
                        tracing::warn!(%error, "reloading the key store");
                    }
                }
            }
            if !self.sleep(&mut backoff).await {
                return Ok(());
            }
        };
        let files = draft.add.len();
        for mut rows in days.into_values() {
            if self.spare.len() < SPARE_ROW_VECS {
                rows.clear();
                self.spare.push(rows);
            }
        }
        self.append(tenant, draft).await?;
        metrics::counter!("loom_archive_events_total").increment(rows as u64);
        metrics::histogram!("loom_archive_flush_seconds").record(started.elapsed().as_secs_f64());
        tracing::debug!(%tenant, rows, files, "archived");
        loop {
            match self.checkpoint_write().await {
                Ok(()) => return Ok(()),
                Err(error) => tracing::warn!(%error, "writing the archiver's checkpoint"),
            }
            if !self.sleep(&mut backoff).await {
                return Ok(());
            }
        }
    }

    /// Waits `backoff` (doubling it, up to 10 s); false if shut down meanwhile.
    async fn sleep(&self, backoff: &mut Duration) -> bool {
        let wait = *backoff;
        *backoff = (*backoff * 2).min(Duration::from_secs(10));
        tokio::select! {
            () = self.shutdown.cancelled() => false,
            () = tokio::time::sleep(wait) => true,
        }
    }

    /// The rows of each day as one file of its date partition, stored; what the manifest entry
    /// names. The rows stay (sorted), for another attempt.
    async fn write_files(
        &self,
        tenant: Uuid,
        days: &mut BTreeMap<i64, Vec<Row>>,
    ) -> Result<Vec<FileRef>, ArchiveError> {
        let mut added = Vec::with_capacity(days.len());
        for (&day, rows) in days.iter_mut() {
            let date = date_of(day * DAY_MICROS);
            let keys = Arc::clone(&self.keys);
            let (first_at, last_at) = rows.iter().fold((i64::MAX, i64::MIN), |(lo, hi), r| {
                (lo.min(r.occurred_at), hi.max(r.occurred_at))
            });
            let mut owned = std::mem::take(rows);
            let (owned, written) = tokio::task::spawn_blocking(move || {
                let written = file::write(&keys, tenant, &mut owned);
                (owned, written)
            })
            .await?;
            *rows = owned;
            let bytes = written?;
            let file = FileRef {
                path: format!("date={date}/{}.parquet", Uuid::now_v7()),
                sha256: sha256_hex(&bytes),
                bytes: bytes.len() as u64,
                rows: rows.len() as u64,
                first_at,
                last_at,
            };
            self.archive
                .put(&self.archive.file_path(tenant, &file.path), bytes)
                .await?;
            metrics::counter!("loom_archive_files_total").increment(1);
            metrics::counter!("loom_archive_bytes_total").increment(file.bytes);
            added.push(file);
        }
        Ok(added)
    }

    /// Appends `draft` to the tenant's manifest, through conflicts with compaction and store
    /// outages, until it is there (or shut down).
    async fn append(&mut self, tenant: Uuid, draft: Draft) -> Result<(), ArchiveError> {
        let mut backoff = Duration::from_millis(200);
        loop {
            let manifest = self
                .manifests
                .entry(tenant)
                .or_insert_with(|| Manifest::new(tenant));
            // An earlier attempt may have been written although its answer was lost.
            let done = match draft.action {
                Action::Erase => manifest.erased,
                _ => {
                    !draft.add.is_empty()
                        && draft
                            .add
                            .iter()
                            .all(|f| manifest.files.contains_key(&f.path))
                }
            };
            if done {
                return Ok(());
            }
            match manifest
                .append(
                    self.archive.store.as_ref(),
                    &self.archive.root,
                    &draft,
                    loom_schemas::event::now_micros(),
                )
                .await
            {
                Ok(_) => return Ok(()),
                Err(ManifestError::Conflict { .. }) => continue,
                Err(ManifestError::Store(error)) => {
                    metrics::counter!("loom_archive_failures_total").increment(1);
                    tracing::error!(%error, %tenant, "writing a manifest entry failed; retrying");
                    if let Err(error) = manifest
                        .refresh(self.archive.store.as_ref(), &self.archive.root)
                        .await
                    {
                        tracing::debug!(%error, "refreshing the manifest");
                    }
                }
                Err(error) => return Err(error.into()),
            }
            if !self.sleep(&mut backoff).await {
                return Ok(());
            }
        }
    }
}

/// Where the archiver starts reading again after a restart (`topic/partition` → offset): no
/// event below it waits in a buffer. Empty if the archiver never wrote one (or it is unreadable).
pub async fn read_checkpoint(archive: &Archive) -> Result<BTreeMap<String, u64>, ManifestError> {
    match archive.get(&checkpoint_path(archive)).await {
        Ok(bytes) => Ok(serde_json::from_slice::<Checkpoint>(&bytes)
            .map(|c| c.positions)
            .unwrap_or_else(|error| {
                tracing::warn!(%error, "the archiver's checkpoint is unreadable; reading the log from the start");
                BTreeMap::new()
            })),
        Err(object_store::Error::NotFound { .. }) => Ok(BTreeMap::new()),
        Err(error) => Err(ManifestError::Store(error)),
    }
}

/// The tenant whose archive a record of `topic` goes to.
pub fn tenant_of(registry: &Registry, topic: Topic, record: &Record) -> Uuid {
    match topic {
        Topic::Control => SYSTEM_TENANT,
        Topic::Data | Topic::Quota => {
            tenant_of_decoded(&registry.decode(&record.value), topic, record)
        }
    }
}

fn tenant_of_decoded<E>(decoded: &Result<Event, E>, topic: Topic, record: &Record) -> Uuid {
    match (decoded, topic) {
        (_, Topic::Control) => SYSTEM_TENANT,
        (Ok(event), _) => event.envelope.tenant_id,
        (Err(_), _) => record
            .header(HEADER_TENANT_ID)
            .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
            .unwrap_or(SYSTEM_TENANT),
    }
}

/// The UTC date (`YYYY-MM-DD`) of a time in µs since the epoch.
pub fn date_of(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string()
}
