//! `loom replay`: rebuild the read models from the start of the log into a new version while the
//! active one keeps serving, then switch readers to it in one step (blue/green).
//!
//! The new version folds with its own positions, so an interrupted replay resumes where it
//! stopped (the catalog remembers which version was being built). It folds up to the end the log
//! had when the replay started; live projectors take the new version from there once it is
//! switched to.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use loom_schemas::codec::Registry;
use loom_schemas::control::ControlState;
use loom_schemas::keystore::KeyStore;
use loom_schemas::log::{Entry, Log, Topic};
use tokio_util::sync::CancellationToken;

use crate::PROJECTED;
use crate::archive::Archive;
use crate::archive::archiver::{read_checkpoint, tenant_of};
use crate::archive::manifest::position_key;
use crate::archive::read::{self, ReadError};
use crate::catalog::Catalog;
use crate::fold::Changes;
use crate::run::{Projector, ProjectorConfig, ProjectorError, store_batch, stored_positions};
use crate::store::{ReadStore, StoreLocation};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// The version built and switched to.
    pub version: u32,
    /// The version readers used before.
    pub previous: u32,
    /// Records folded by this run (less than the log when it resumed an earlier one).
    pub records: u64,
    pub elapsed: Duration,
}

/// Where a replay reads the history before the live log: the archive, with the key store that
/// opens its files.
pub struct FromArchive {
    pub archive: Archive,
    pub keys: Arc<KeyStore>,
}

/// Rebuilds the read models at `location` from `log` — first from the archive if given (events
/// past the log's retention are there), then from the log where the archive ends — showing a
/// progress bar on stderr when `progress` is set.
pub async fn replay(
    log: Arc<dyn Log>,
    from_archive: Option<FromArchive>,
    location: &StoreLocation,
    config: ProjectorConfig,
    progress: bool,
) -> Result<ReplayReport, ProjectorError> {
    let started = Instant::now();
    let catalog = Catalog::open(location).await?;
    let previous = catalog.active().await?;
    let version = match catalog.building().await? {
        Some(building) if building > previous => {
            tracing::info!(version = building, "resuming the interrupted replay");
            building
        }
        _ => {
            let version = previous + 1;
            catalog.set_building(version).await?;
            version
        }
    };
    let store = ReadStore::open(location, version).await?;
    // Tables fill faster without their secondary indexes; they are built once, at the end.
    store.defer_indexes().await?;

    // The end of every partition now: the replay is done when the new version reaches it.
    let mut targets = Vec::new();
    for topic in PROJECTED {
        for partition in 0..log.partitions(topic) {
            targets.push((topic, partition, log.end_offset(topic, partition).await?));
        }
    }
    let total: u64 = targets.iter().map(|(_, _, end)| end).sum();
    let at_start = folded(&store, &targets).await?;

    let bar = ProgressBar::with_draw_target(
        Some(total),
        if progress {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        },
    );
    bar.set_style(
        ProgressStyle::with_template(
            "replay v{msg} [{bar:40}] {human_pos}/{human_len} events, {per_sec}, ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(version.to_string());
    bar.set_position(at_start);
    bar.reset_eta();
    if let Some(from) = &from_archive {
        fold_archive(from, &*log, &store, config.batch, &bar).await?;
    }

    let shutdown = CancellationToken::new();
    // A group of its own per run: a resumed replay need not wait for the broker to notice that
    // the interrupted one's member is gone (its positions are in the store anyway).
    let replaying = ProjectorConfig {
        group: format!(
            "{}-replay-v{version}-{}",
            config.group,
            uuid::Uuid::now_v7().simple()
        ),
        ..config
    };
    let running = tokio::spawn(Projector::new(log, store.clone(), replaying).run(shutdown.clone()));
    let watched = async {
        loop {
            let done = folded(&store, &targets).await?;
            bar.set_position(done);
            if done >= total || running.is_finished() {
                return Ok::<_, sqlx::Error>(done);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    .await;
    // Whatever ended the watch, the projector stops before the replay returns.
    shutdown.cancel();
    let ran = running.await;
    let done = watched?;
    match ran {
        Ok(result) => result?,
        Err(error) => tracing::error!(%error, "the replay's projector panicked"),
    }
    if done < total {
        bar.abandon();
        return Err(ProjectorError::Stopped);
    }
    bar.set_message(format!("{version}: building indexes"));
    store.restore_indexes().await?;
    store.close().await;
    catalog.switch_to(version).await?;
    bar.finish();
    Ok(ReplayReport {
        version,
        previous,
        records: done - at_start,
        elapsed: started.elapsed(),
    })
}

/// Folds the archive into `store`, then the log's events the archive does not hold yet, and
/// stores the positions reached: the projector goes on from there.
///
/// Files are read date by date, each date's events in log order (an event's date is when it
/// happened, so an event the spool forwarded late is folded with its date, before events the log
/// holds earlier; causes still come before their effects). The archiver's checkpoint says from
/// where in the log some tenant's events may not be archived yet; from there up to the furthest
/// archived position, the log's events are folded unless their tenant's manifest says they are
/// archived. An interrupted replay folds the archive again from its start (folding is
/// idempotent), as the order it folds in is not the log's.
async fn fold_archive(
    from: &FromArchive,
    log: &dyn Log,
    store: &ReadStore,
    batch: usize,
    bar: &ProgressBar,
) -> Result<(), ProjectorError> {
    let registry = Registry::builtin()?;
    // The checkpoint first: the manifests read after it reach at least as far.
    let checkpoint = read_checkpoint(&from.archive)
        .await
        .map_err(ReadError::from)?;
    let mut manifests = BTreeMap::new();
    for tenant in from.archive.tenants().await.map_err(ReadError::from)? {
        let manifest = from
            .archive
            .manifest(tenant)
            .await
            .map_err(ReadError::from)?;
        manifests.insert(tenant, manifest);
    }
    let mut control = ControlState::default();
    // The furthest archived position of each partition.
    let mut reached: BTreeMap<(Topic, u32), u64> = BTreeMap::new();
    let skipped = read::in_log_order(
        &from.archive,
        &from.keys,
        &manifests,
        async |topic: Topic, entries: Vec<Entry>| -> Result<(), ProjectorError> {
            for entry in &entries {
                let next = reached
                    .entry((topic, entry.position.partition))
                    .or_default();
                *next = (*next).max(entry.position.offset + 1);
            }
            for chunk in entries.chunks(batch.max(1)) {
                fold_unpositioned(store, registry, topic, chunk, &mut control).await?;
                bar.inc(chunk.len() as u64);
            }
            Ok(())
        },
    )
    .await?;
    if skipped > 0 {
        tracing::info!(
            files = skipped,
            "skipped the archive files of erased tenants"
        );
    }
    // The log's part: what the archiver had not written out when the checkpoint was taken.
    for (&(topic, partition), &end) in &reached {
        let key = position_key(topic.name(), partition);
        let from_offset = checkpoint.get(&key).copied().unwrap_or(0).min(end);
        let mut reader = log.read_from(topic, partition, from_offset).await?;
        let mut at = from_offset;
        while at < end {
            let entries = reader.next(batch.max(1)).await?;
            let Some(first) = entries.first() else {
                continue;
            };
            if first.position.offset > at {
                return Err(ProjectorError::ArchiveGap {
                    partition: key,
                    from: at,
                    to: first.position.offset,
                });
            }
            at = entries.last().map_or(at, |e| e.position.offset + 1);
            let missing: Vec<Entry> = entries
                .into_iter()
                .filter(|e| e.position.offset < end)
                .filter(|e| {
                    let tenant = tenant_of(registry, topic, &e.record);
                    manifests
                        .get(&tenant)
                        .is_none_or(|m| !m.erased && e.position.offset >= m.position(&key))
                })
                .collect();
            fold_unpositioned(store, registry, topic, &missing, &mut control).await?;
        }
    }
    // The positions reached, stored alone: the projector reads on from them.
    let mut changes = Changes::default();
    for (&(topic, partition), &end) in &reached {
        changes.positions.insert((topic.name(), partition), end);
    }
    store_batch(store, &mut changes).await?;
    Ok(())
}

/// Folds `entries` and stores the result without positions.
async fn fold_unpositioned(
    store: &ReadStore,
    registry: &Registry,
    topic: Topic,
    entries: &[Entry],
    control: &mut ControlState,
) -> Result<(), ProjectorError> {
    if entries.is_empty() {
        return Ok(());
    }
    let mut after = control.clone();
    let mut changes = Changes::fold(registry, topic, entries, &mut after);
    changes.positions.clear();
    changes.starts.clear();
    store_batch(store, &mut changes).await?;
    *control = after;
    Ok(())
}

/// Records of `targets` the store has folded (up to each target's end).
async fn folded(store: &ReadStore, targets: &[(Topic, u32, u64)]) -> Result<u64, sqlx::Error> {
    let mut done = 0;
    for topic in PROJECTED {
        let stored = stored_positions(store, topic).await?;
        for (_, partition, end) in targets.iter().filter(|(t, _, _)| *t == topic) {
            let at = stored
                .iter()
                .find(|p| p.partition == *partition)
                .map_or(0, |p| p.offset);
            done += at.min(*end);
        }
    }
    Ok(done)
}
