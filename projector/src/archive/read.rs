//! Reading the archive back: a file as its manifest names it (its SHA-256 checked), and every
//! event in log order, for a replay.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::TimestampMicrosecondArray;
use arrow::array::{Array, BinaryArray, Int32Array, Int64Array, RecordBatch, StringArray};
use loom_schemas::keystore::{KeyStore, KeyStoreError};
use loom_schemas::log::{Entry, Position, Record, Topic};
use uuid::Uuid;

use super::Archive;
use super::columns::RECORD;
use super::file::{self, FileError};
use super::keys::{ArchiveKeys, KeyError};
use super::manifest::{FileRef, Manifest, ManifestError, sha256_hex};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("{0}")]
    Manifest(#[from] ManifestError),
    #[error("reading {path}: {source}")]
    Store {
        path: String,
        #[source]
        source: object_store::Error,
    },
    #[error(
        "{path} is not the file its manifest entry names: SHA-256 {found}, expected {expected}"
    )]
    Altered {
        path: String,
        found: String,
        expected: String,
    },
    #[error("{path}: {source}")]
    File {
        path: String,
        #[source]
        source: FileError,
    },
    #[error("{path}: tenant {tenant} was erased; its keys are destroyed")]
    Erased { path: String, tenant: Uuid },
    #[error("{path}: column {column} is missing or of another type")]
    Column { path: String, column: &'static str },
    #[error("reading the archive: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl ReadError {
    /// The tenant's keys are destroyed: its files are unreadable by design.
    pub fn is_erased(&self) -> bool {
        matches!(
            self,
            ReadError::Erased { .. }
                | ReadError::File {
                    source: FileError::Keys(KeyError::KeyStore(KeyStoreError::Erased(_))),
                    ..
                }
        )
    }
}

/// A file of `tenant`, checked against its manifest entry's SHA-256 and decrypted with `reader`
/// (only `columns`, if given).
pub async fn read_file(
    archive: &Archive,
    tenant: Uuid,
    file: &FileRef,
    reader: ArchiveKeys,
    columns: Option<&'static [&'static str]>,
) -> Result<Vec<RecordBatch>, ReadError> {
    let path = archive.file_path(tenant, &file.path);
    if reader.is_erased() {
        return Err(ReadError::Erased {
            path: path.to_string(),
            tenant,
        });
    }
    let bytes = archive
        .get(&path)
        .await
        .map_err(|source| ReadError::Store {
            path: path.to_string(),
            source,
        })?;
    let found = sha256_hex(&bytes);
    if found != file.sha256 {
        return Err(ReadError::Altered {
            path: path.to_string(),
            found,
            expected: file.sha256.clone(),
        });
    }
    tokio::task::spawn_blocking(move || file::read(bytes, reader, columns))
        .await?
        .map_err(|source| ReadError::File {
            path: path.to_string(),
            source,
        })
}

/// The columns a replay reads.
const LOG_COLUMNS: &[&str] = &[
    "log_topic",
    "log_partition",
    "log_offset",
    "log_timestamp",
    RECORD,
];

/// Every event `manifests` name, in log order within each date (dates in order), for a replay:
/// `visit` gets a date's entries per topic. Erased tenants are skipped (their keys are gone);
/// how many of their files were is returned.
pub async fn in_log_order<E: From<ReadError>>(
    archive: &Archive,
    keys: &Arc<KeyStore>,
    manifests: &BTreeMap<Uuid, Manifest>,
    mut visit: impl AsyncFnMut(Topic, Vec<Entry>) -> Result<(), E>,
) -> Result<u64, E> {
    let mut by_date: BTreeMap<&str, Vec<(Uuid, &FileRef)>> = BTreeMap::new();
    let mut skipped = 0;
    for (&tenant, manifest) in manifests {
        if manifest.erased || keys.is_erased(tenant) {
            skipped += manifest.files.len() as u64;
            continue;
        }
        for file in manifest.files.values() {
            by_date.entry(file.date()).or_default().push((tenant, file));
        }
    }
    for files in by_date.into_values() {
        let mut topics: BTreeMap<&'static str, Vec<Entry>> = BTreeMap::new();
        for (tenant, file) in files {
            let reader = ArchiveKeys::full(Arc::clone(keys), tenant);
            let batches = match read_file(archive, tenant, file, reader, Some(LOG_COLUMNS)).await {
                Ok(batches) => batches,
                Err(error) if error.is_erased() => {
                    skipped += 1;
                    continue;
                }
                Err(error) => return Err(error.into()),
            };
            let path = archive.file_path(tenant, &file.path).to_string();
            for batch in &batches {
                entries_of(batch, &path, &mut topics)?;
            }
        }
        for (topic, mut entries) in topics {
            let Some(topic) = Topic::from_name(topic) else {
                continue;
            };
            entries.sort_by_key(|e| e.position);
            entries.dedup_by_key(|e| e.position);
            visit(topic, entries).await?;
        }
    }
    Ok(skipped)
}

fn entries_of(
    batch: &RecordBatch,
    path: &str,
    topics: &mut BTreeMap<&'static str, Vec<Entry>>,
) -> Result<(), ReadError> {
    fn column<'a, T: 'static>(
        batch: &'a RecordBatch,
        path: &str,
        name: &'static str,
    ) -> Result<&'a T, ReadError> {
        batch
            .column_by_name(name)
            .and_then(|c| c.as_any().downcast_ref::<T>())
            .ok_or_else(|| ReadError::Column {
                path: path.to_owned(),
                column: name,
            })
    }
    let topic = column::<StringArray>(batch, path, "log_topic")?;
    let partition = column::<Int32Array>(batch, path, "log_partition")?;
    let offset = column::<Int64Array>(batch, path, "log_offset")?;
    let timestamp = column::<TimestampMicrosecondArray>(batch, path, "log_timestamp")?;
    let record = column::<BinaryArray>(batch, path, RECORD)?;
    for i in 0..batch.num_rows() {
        let Some(name) = Topic::from_name(topic.value(i)).map(Topic::name) else {
            continue;
        };
        topics.entry(name).or_default().push(Entry {
            position: Position {
                partition: u32::try_from(partition.value(i)).unwrap_or(0),
                offset: u64::try_from(offset.value(i)).unwrap_or(0),
            },
            record: Record {
                value: record.value(i).to_vec(),
                timestamp_us: if timestamp.is_null(i) {
                    0
                } else {
                    timestamp.value(i)
                },
                ..Record::default()
            },
        });
    }
    Ok(())
}
