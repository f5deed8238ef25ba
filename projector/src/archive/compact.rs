//! Compaction: a date partition's small files merged into one large file (rows sorted by time,
//! an event the log held twice kept once), swapped in by one manifest entry that adds the new
//! file and removes the merged ones — readers see the old files or the new one, never both or
//! neither. The merged files are deleted after a grace period (readers that listed them before
//! the swap may still be reading them).
//!
//! Compaction and the archiver write the same manifest; entries are created only-if-absent, so
//! whoever comes second re-reads the chain and tries again — compaction only if every file it
//! merged is still there.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, BooleanArray, RecordBatch, StringArray};
use arrow::compute::{
    SortColumn, concat_batches, filter_record_batch, lexsort_to_indices, take_record_batch,
};
use loom_schemas::keystore::KeyStore;
use object_store::ObjectStoreExt;
use object_store::path::Path;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::Archive;
use super::archiver::ArchiveError;
use super::columns::SCHEMA;
use super::file;
use super::keys::ArchiveKeys;
use super::manifest::{Action, Draft, FileRef, ManifestError, sha256_hex};
use super::read::{ReadError, read_file};

#[derive(Debug, Clone)]
pub struct CompactConfig {
    /// How often the archive is looked over.
    pub every: Duration,
    /// Files smaller than this are candidates.
    pub small_bytes: u64,
    /// A date partition is compacted once it has this many small files.
    pub min_files: usize,
    /// Files merged into one at most, in bytes of the files merged (memory: several times this).
    pub target_bytes: u64,
    /// How long merged files stay after the swap.
    pub grace: Duration,
}

impl Default for CompactConfig {
    fn default() -> Self {
        CompactConfig {
            every: Duration::from_secs(600),
            small_bytes: 16 << 20,
            min_files: 4,
            target_bytes: 128 << 20,
            grace: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error("{0}")]
    Read(#[from] ReadError),
    #[error("{0}")]
    Archive(#[from] ArchiveError),
    #[error("{0}")]
    Manifest(#[from] ManifestError),
}

/// What one compaction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compacted {
    pub merged: Vec<String>,
    pub into: Option<String>,
    pub rows: u64,
    pub duplicates: u64,
}

/// Compacts every tenant's small files every `config.every` until `stop`; merged files are
/// deleted once their grace period is over.
pub async fn run(
    archive: Archive,
    keys: Arc<KeyStore>,
    config: CompactConfig,
    stop: CancellationToken,
) {
    let mut doomed: Vec<(Instant, Path)> = Vec::new();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(config.every) => {}
        }
        let tenants = match archive.tenants().await {
            Ok(tenants) => tenants,
            Err(error) => {
                tracing::warn!(%error, "compaction: listing tenants");
                continue;
            }
        };
        for tenant in tenants {
            loop {
                if stop.is_cancelled() {
                    return;
                }
                match compact_tenant(&archive, &keys, tenant, &config).await {
                    Ok(Some(done)) => {
                        tracing::info!(%tenant, merged = done.merged.len(), rows = done.rows, "compacted");
                        doomed.extend(
                            done.merged
                                .iter()
                                .map(|p| (Instant::now(), archive.file_path(tenant, p))),
                        );
                    }
                    Ok(None) => break,
                    Err(error) => {
                        tracing::warn!(%error, %tenant, "compaction failed; trying again later");
                        break;
                    }
                }
            }
        }
        let mut kept = Vec::with_capacity(doomed.len());
        for (since, path) in doomed.drain(..) {
            if since.elapsed() < config.grace {
                kept.push((since, path));
            } else if let Err(error) = archive.store.delete(&path).await {
                tracing::warn!(%error, %path, "deleting a merged file; the next start removes it");
            }
        }
        doomed = kept;
    }
}

/// Merges one date partition's small files of `tenant`, if one has enough; `None` if none has.
/// The merged files stay in storage (the caller deletes them after a grace period).
pub async fn compact_tenant(
    archive: &Archive,
    keys: &Arc<KeyStore>,
    tenant: Uuid,
    config: &CompactConfig,
) -> Result<Option<Compacted>, CompactError> {
    let mut manifest = archive.manifest(tenant).await?;
    if manifest.erased || keys.is_erased(tenant) {
        return Ok(None);
    }
    let mut small: BTreeMap<&str, Vec<&FileRef>> = BTreeMap::new();
    for file in manifest.files.values() {
        if file.bytes < config.small_bytes {
            small.entry(file.date()).or_default().push(file);
        }
    }
    let Some(mut files) = small
        .into_values()
        .find(|files| files.len() >= config.min_files.max(2))
    else {
        return Ok(None);
    };
    files.sort_by_key(|f| f.first_at);
    let mut total = 0;
    files.retain(|f| {
        total += f.bytes;
        total <= config.target_bytes || total == f.bytes
    });
    if files.len() < 2 {
        return Ok(None);
    }
    let files: Vec<FileRef> = files.into_iter().cloned().collect();
    let mut batches = Vec::new();
    for file in &files {
        let reader = ArchiveKeys::full(Arc::clone(keys), tenant);
        batches.extend(read_file(archive, tenant, file, reader, None).await?);
    }
    let date = files[0].date().to_owned();
    let keys_for_write = Arc::clone(keys);
    let merged = tokio::task::spawn_blocking(move || -> Result<_, ArchiveError> {
        let (batch, duplicates) = merge(&batches).map_err(file::FileError::from)?;
        let bytes = file::write_batches(&keys_for_write, tenant, std::slice::from_ref(&batch))?;
        Ok((batch, duplicates, bytes))
    })
    .await
    .map_err(ArchiveError::from)??;
    let (batch, duplicates, bytes) = merged;
    let column = |name| {
        batch
            .column_by_name(name)
            .and_then(|c| {
                c.as_any()
                    .downcast_ref::<arrow::array::TimestampMicrosecondArray>()
            })
            .map(|times| (arrow::compute::min(times), arrow::compute::max(times)))
    };
    let (first_at, last_at) = column("occurred_at").unwrap_or_default();
    let new = FileRef {
        path: format!("date={date}/{}.parquet", Uuid::now_v7()),
        sha256: sha256_hex(&bytes),
        bytes: bytes.len() as u64,
        rows: batch.num_rows() as u64,
        first_at: first_at.unwrap_or(0),
        last_at: last_at.unwrap_or(0),
    };
    let path = archive.file_path(tenant, &new.path);
    archive
        .put(&path, bytes)
        .await
        .map_err(ArchiveError::from)?;
    let draft = Draft {
        action: Action::Compact,
        add: vec![new.clone()],
        remove: files.iter().map(|f| f.path.clone()).collect(),
        covers: BTreeMap::new(),
        positions: BTreeMap::new(),
    };
    loop {
        if !files.iter().all(|f| manifest.files.contains_key(&f.path)) {
            // Someone else changed these files meanwhile: this merge is void.
            archive
                .store
                .delete(&path)
                .await
                .map_err(ArchiveError::from)?;
            return Ok(None);
        }
        match manifest
            .append(
                archive.store.as_ref(),
                &archive.root,
                &draft,
                loom_schemas::event::now_micros(),
            )
            .await
        {
            Ok(_) => break,
            Err(ManifestError::Conflict { .. }) => continue,
            Err(error) => return Err(error.into()),
        }
    }
    metrics::counter!("loom_archive_compactions_total").increment(1);
    Ok(Some(Compacted {
        merged: draft.remove,
        into: Some(new.path),
        rows: new.rows,
        duplicates,
    }))
}

/// The batches as one, sorted by time then log position, each event id once; and how many
/// copies were dropped.
fn merge(batches: &[RecordBatch]) -> Result<(RecordBatch, u64), arrow::error::ArrowError> {
    let all = concat_batches(&SCHEMA, batches)?;
    let column = |name: &str| {
        all.column_by_name(name).cloned().ok_or_else(|| {
            arrow::error::ArrowError::SchemaError(format!("no column {name} in an archive file"))
        })
    };
    let sort = |name| -> Result<SortColumn, arrow::error::ArrowError> {
        Ok(SortColumn {
            values: column(name)?,
            options: None,
        })
    };
    let order = lexsort_to_indices(
        &[
            sort("occurred_at")?,
            sort("log_topic")?,
            sort("log_partition")?,
            sort("log_offset")?,
        ],
        None,
    )?;
    let sorted = take_record_batch(&all, &order)?;
    let ids = sorted
        .column_by_name("event_id")
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| arrow::error::ArrowError::SchemaError("event_id is not text".into()))?;
    let mut seen = HashSet::with_capacity(ids.len());
    let keep: BooleanArray = (0..ids.len())
        .map(|i| Some(ids.is_null(i) || seen.insert(ids.value(i))))
        .collect();
    let duplicates = keep.false_count() as u64;
    Ok((filter_record_batch(&sorted, &keep)?, duplicates))
}
