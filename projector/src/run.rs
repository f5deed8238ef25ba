//! Running the read-model projection: one consumer-group member per topic, each folding batches
//! into the store, positions committed with the rows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use loom_schemas::codec::Registry;
use loom_schemas::log::{Entry, GroupEvent, GroupReader, Log, LogError, Position, Topic};
use sqlx::{Acquire, Row};
use tokio_util::sync::CancellationToken;

use crate::PROJECTED;
use crate::catalog::Catalog;
use crate::fold::{Changes, ControlState};
use crate::partitions;
use crate::store::{ReadStore, StoreError, StoreLocation};
use crate::write;

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("log: {0}")]
    Log(#[from] LogError),
    #[error("codec: {0}")]
    Codec(#[from] loom_schemas::codec::CodecError),
    #[error("read-model database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the projector stopped before the replay was done")]
    Stopped,
    #[error("storing a batch: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("archive: {0}")]
    Archive(#[from] crate::archive::read::ReadError),
    #[error(
        "the log no longer holds offsets {from}..{to} of {partition}, and the archive had not \
         written all of their events out yet: they are in neither"
    )]
    ArchiveGap {
        partition: String,
        from: u64,
        to: u64,
    },
}

impl ProjectorError {
    /// A database that failed (went away, restarted): worth starting the projector again,
    /// unlike a missing migration or topic, which needs the operator.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ProjectorError::Database(_)
                | ProjectorError::Store(StoreError::Database(_) | StoreError::Behind { .. })
                | ProjectorError::Task(_)
        )
    }
}

#[derive(Debug, Clone)]
pub struct ProjectorConfig {
    /// The consumer groups of the projector's members: this, `-data` or `-control` added.
    pub group: String,
    /// Records folded per transaction at most.
    pub batch: usize,
    /// Sealed bodies older than this are removed from `trace_bodies`.
    pub body_retention: Duration,
    /// Traces and their calls older than this are removed (kept for ever if unset).
    pub trace_retention: Option<Duration>,
    /// Create and migrate the read models on start; otherwise `loom migrate` must have.
    pub migrate: bool,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        ProjectorConfig {
            group: "loom-read-models".into(),
            batch: 1000,
            body_retention: Duration::from_secs(30 * 24 * 3600),
            trace_retention: None,
            migrate: true,
        }
    }
}

/// Folds the log into one version of the read models until shut down.
pub struct Projector {
    log: Arc<dyn Log>,
    store: ReadStore,
    config: ProjectorConfig,
}

impl Projector {
    pub fn new(log: Arc<dyn Log>, store: ReadStore, config: ProjectorConfig) -> Projector {
        Projector { log, store, config }
    }

    /// Runs until `shutdown`, or until a member fails for good (the log is gone); then the
    /// others stop too.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ProjectorError> {
        let registry = Registry::builtin()?;
        let stop = shutdown.child_token();
        let member = |topic| {
            let stop = stop.clone();
            let (log, store, config) = (
                Arc::clone(&self.log),
                self.store.clone(),
                self.config.clone(),
            );
            async move {
                let result = follow(log, store, registry, config, topic, stop.clone()).await;
                stop.cancel();
                result
            }
        };
        let retention = expire(self.store.clone(), self.config.clone(), stop.clone());
        let lag = report_lag(Arc::clone(&self.log), self.store.clone(), stop.clone());
        let (data, control, (), ()) =
            tokio::join!(member(PROJECTED[0]), member(PROJECTED[1]), retention, lag);
        data.and(control)
    }
}

/// Folds the log into the active version of the read models at `location` until `shutdown`,
/// moving to a new version as soon as a replay switches readers to it. Each version's members
/// form their own consumer group (`<group>-v<N>`).
pub async fn project_active(
    log: Arc<dyn Log>,
    location: &StoreLocation,
    config: ProjectorConfig,
    shutdown: CancellationToken,
) -> Result<(), ProjectorError> {
    let catalog = Arc::new(Catalog::open(location).await?);
    loop {
        let version = catalog.active().await?;
        let store = if config.migrate {
            ReadStore::open(location, version).await?
        } else {
            ReadStore::open_migrated(location, version).await?
        };
        if let Err(error) = catalog.publish(version).await {
            tracing::warn!(%error, version, "could not publish the loom_read views");
        }
        tracing::info!(version, "projecting into the read models");
        let switched = shutdown.child_token();
        let watcher = tokio::spawn(watch_for_switch(
            Arc::clone(&catalog),
            version,
            switched.clone(),
        ));
        let versioned = ProjectorConfig {
            group: format!("{}-v{version}", config.group),
            ..config.clone()
        };
        let result = Projector::new(Arc::clone(&log), store.clone(), versioned)
            .run(switched.clone())
            .await;
        switched.cancel();
        let _ = watcher.await;
        store.close().await;
        result?;
        if shutdown.is_cancelled() {
            return Ok(());
        }
    }
}

/// Cancels `switched` once the active version is no longer `version`.
async fn watch_for_switch(catalog: Arc<Catalog>, version: u32, switched: CancellationToken) {
    loop {
        tokio::select! {
            () = switched.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        match catalog.active().await {
            Ok(active) if active != version => {
                tracing::info!(from = version, to = active, "the read models were switched");
                switched.cancel();
                return;
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "reading the active read-model version"),
        }
    }
}

/// Where the projection stands in each partition of `topic`, as stored with its rows.
pub async fn stored_positions(
    store: &ReadStore,
    topic: Topic,
) -> Result<Vec<Position>, sqlx::Error> {
    let rows = sqlx::query("SELECT partition, next_offset FROM positions WHERE topic = $1")
        .bind(topic.name())
        .fetch_all(store.pool())
        .await?;
    rows.iter()
        .map(|row| {
            Ok(Position {
                partition: u32::try_from(row.try_get::<i64, _>(0)?).unwrap_or(0),
                offset: u64::try_from(row.try_get::<i64, _>(1)?).unwrap_or(0),
            })
        })
        .collect()
}

/// How long the projector waits after folding a batch smaller than its limit.
const TRICKLE_WAIT: Duration = Duration::from_millis(20);

async fn follow(
    log: Arc<dyn Log>,
    store: ReadStore,
    registry: &Registry,
    config: ProjectorConfig,
    topic: Topic,
    shutdown: CancellationToken,
) -> Result<(), ProjectorError> {
    // A group per topic, so that members joining for one topic do not stop the other's.
    let group = format!("{}-{}", config.group, topic.name());
    let mut reader = log.join_group(&group, topic).await?;
    // The control topic's state where the folding stands: control events are judged against
    // it (see `loom_schemas::control`). Data batches do not touch it.
    let mut control = ControlState::default();
    // The batch being stored while the next one is read and folded.
    let mut storing = InFlight::default();
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => break,
            event = reader.next(config.batch) => event?,
        };
        match event {
            GroupEvent::Assigned { partitions, start } => {
                // Nothing is in flight: the partitions were revoked (and drained) first.
                let stored = stored_positions(&store, topic).await?;
                tracing::info!(topic = topic.name(), ?partitions, ?stored, "projecting");
                if topic == Topic::Control {
                    let until = stored
                        .iter()
                        .find(|p| p.partition == 0)
                        .map_or(0, |p| p.offset);
                    control = control_state(log.as_ref(), registry, until).await?;
                }
                // A dropped answer means the member is stopping anyway.
                let _ = start.send(stored);
            }
            GroupEvent::Entries(entries) => {
                // Folded once: a batch whose storing fails is stored again as it was folded,
                // never skipped, so `control` may run ahead of the store.
                let changes = Changes::fold(registry, topic, &entries, &mut control);
                let records = entries.len();
                drop(entries);
                let work =
                    store_until_stored(store.clone(), changes, topic, records, shutdown.clone());
                if !commit(&mut reader, storing.replace(work).await?).await? {
                    break;
                }
                // A small batch: the log is quiet or trickling (a gateway appends per answered
                // request). Nothing to fold meanwhile: see this one stored, then let the next
                // batch grow a little: one transaction per append would cost the read models
                // far more than these milliseconds of freshness.
                if records < config.batch {
                    if !commit(&mut reader, storing.finish().await?).await? {
                        break;
                    }
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(TRICKLE_WAIT) => {}
                    }
                }
            }
            GroupEvent::Revoked { done, .. } => {
                // What was read from the partitions is stored before they go.
                if !commit(&mut reader, storing.finish().await?).await? {
                    break;
                }
                let _ = done.send(());
            }
        }
    }
    // Stopping: the batch in flight finishes its transaction (or gives up retrying).
    storing.finish().await?;
    Ok(())
}

/// What storing a batch came to.
enum Stored {
    /// Stored: the next offset of each partition the batch touched.
    Reached(Vec<Position>),
    /// Shut down before the store took it.
    Stopped,
    /// Refused: the stored positions are short of the batch's start.
    Behind(StoreError),
}

/// At most one batch being stored, on a task of its own: the member reads and folds the next
/// batch meanwhile (the database works on one core, the fold on the other). Batches are stored
/// in log order.
#[derive(Default)]
struct InFlight(Option<tokio::task::JoinHandle<Stored>>);

impl InFlight {
    /// Waits for the batch in flight, then starts storing `work`; what the earlier one came to.
    async fn replace(
        &mut self,
        work: impl Future<Output = Stored> + Send + 'static,
    ) -> Result<Option<Stored>, ProjectorError> {
        let previous = self.finish().await?;
        if !matches!(previous, Some(Stored::Stopped | Stored::Behind(_))) {
            self.0 = Some(tokio::spawn(work));
        }
        Ok(previous)
    }

    /// Waits for the batch in flight, if any.
    async fn finish(&mut self) -> Result<Option<Stored>, ProjectorError> {
        match self.0.take() {
            Some(task) => Ok(Some(task.await?)),
            None => Ok(None),
        }
    }
}

/// Tells the group how far a stored batch reached (advisory: the store holds the positions
/// that count); false if the store was shut down instead. A batch refused because the stored
/// positions fell behind it is an error: the member starts again from them.
async fn commit(
    reader: &mut Box<dyn GroupReader>,
    stored: Option<Stored>,
) -> Result<bool, ProjectorError> {
    match stored {
        Some(Stored::Reached(reached)) => {
            if let Err(error) = reader.commit(&reached).await {
                tracing::debug!(%error, "recording the group's advisory offsets failed");
            }
            Ok(true)
        }
        Some(Stored::Stopped) => Ok(false),
        Some(Stored::Behind(error)) => Err(error.into()),
        None => Ok(true),
    }
}

/// Stores a folded batch, retrying (the same batch, never skipping it) while the database
/// fails, until shut down.
async fn store_until_stored(
    store: ReadStore,
    mut changes: Changes,
    topic: Topic,
    records: usize,
    shutdown: CancellationToken,
) -> Stored {
    let mut backoff = Duration::from_millis(100);
    loop {
        let started = Instant::now();
        match store_batch(&store, &mut changes).await {
            Ok(reached) => {
                metrics::counter!("loom_projector_records_total", "topic" => topic.name())
                    .increment(records as u64);
                metrics::histogram!("loom_projector_batch_seconds", "topic" => topic.name())
                    .record(started.elapsed().as_secs_f64());
                for position in &reached {
                    metrics::gauge!(
                        "loom_projector_position",
                        "topic" => topic.name(),
                        "partition" => position.partition.to_string()
                    )
                    .set(position.offset as f64);
                }
                return Stored::Reached(reached);
            }
            Err(error @ StoreError::Behind { .. }) => {
                metrics::counter!("loom_projector_failures_total", "topic" => topic.name())
                    .increment(1);
                return Stored::Behind(error);
            }
            Err(error) => {
                metrics::counter!("loom_projector_failures_total", "topic" => topic.name())
                    .increment(1);
                tracing::error!(%error, topic = topic.name(), records, "storing a batch failed; retrying");
            }
        }
        tokio::select! {
            () = shutdown.cancelled() => return Stored::Stopped,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(10));
    }
}

/// Folds `entries` and stores the result with the positions, in one transaction; returns the
/// positions reached (the next offset of each partition the batch touched). `control` is the
/// control topic's state before the batch; it moves on only once the batch is stored.
pub async fn fold_batch(
    store: &ReadStore,
    registry: &Registry,
    topic: Topic,
    entries: &[Entry],
    control: &mut ControlState,
) -> Result<Vec<Position>, StoreError> {
    let mut after = control.clone();
    let mut changes = Changes::fold(registry, topic, entries, &mut after);
    let reached = store_batch(store, &mut changes).await?;
    *control = after;
    Ok(reached)
}

/// Stores a folded batch with its positions in one transaction; the positions reached. The
/// changes stay as they were (but for the traces' starts, resolved once): a failed attempt can
/// be retried with them.
pub async fn store_batch(
    store: &ReadStore,
    changes: &mut Changes,
) -> Result<Vec<Position>, StoreError> {
    let mut conn = store.pool().acquire().await?;
    write::resolve_starts(&mut conn, changes).await?;
    partitions::ensure(store, changes).await?;
    let mut tx = conn.begin().await?;
    write::check_start(&mut tx, changes).await?;
    write::apply(&mut tx, changes).await?;
    tx.commit().await?;
    partitions::analyze_growing(store, changes).await?;
    Ok(changes
        .positions
        .iter()
        .map(|(&(_, partition), &offset)| Position { partition, offset })
        .collect())
}

/// The control topic's state after its first `until` records, folded by the shared rules.
pub async fn control_state(
    log: &dyn Log,
    registry: &Registry,
    until: u64,
) -> Result<ControlState, LogError> {
    let mut state = ControlState::default();
    let mut reader = log.read_from(Topic::Control, 0, 0).await?;
    let mut at = 0;
    while at < until {
        let entries = reader.poll(1024).await?;
        if entries.is_empty() {
            break;
        }
        for entry in entries.iter().take_while(|e| e.position.offset < until) {
            if let Ok(event) = registry.decode(&entry.record.value) {
                let _ = state.apply(&event);
            }
        }
        at = reader.position().offset;
    }
    Ok(state)
}

/// Removes what is past retention, hourly.
/// How often the projector's lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(10);

/// Sets `loom_projector_lag_records{topic, partition}` every [`LAG_EVERY`]: records in the log
/// past the positions stored with the read models.
async fn report_lag(log: Arc<dyn Log>, store: ReadStore, shutdown: CancellationToken) {
    let measure = async || {
        for topic in PROJECTED {
            let stored = match stored_positions(&store, topic).await {
                Ok(stored) => stored,
                Err(error) => {
                    tracing::debug!(%error, "reading the projector's positions for its lag");
                    continue;
                }
            };
            for partition in 0..log.partitions(topic) {
                let Ok(end) = log.end_offset(topic, partition).await else {
                    continue;
                };
                let at = stored
                    .iter()
                    .find(|p| p.partition == partition)
                    .map_or(0, |p| p.offset);
                metrics::gauge!(
                    "loom_projector_lag_records",
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
            () = shutdown.cancelled() => return,
            () = measure() => {}
        }
    }
}

async fn expire(store: ReadStore, config: ProjectorConfig, shutdown: CancellationToken) {
    loop {
        match partitions::expire(&store, config.body_retention, config.trace_retention).await {
            Ok(0) => {}
            Ok(removed) => tracing::info!(removed, "removed read-model data past retention"),
            Err(error) => tracing::warn!(%error, "applying retention failed"),
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}
