//! The manifest: per tenant, an append-only, hash-chained list of entries that say which files
//! the archive holds. Readers see only files a manifest names.
//!
//! Entry `N` is the object `tenant_id=<T>/_manifest/<N, 12 digits>.json`, written create-only:
//! two writers (the archiver and compaction) cannot both write entry `N`; the loser reads what
//! won and tries again as `N+1`. Each entry holds the SHA-256 of the previous entry's bytes, the
//! files it adds (with their SHA-256, size and row count) and removes, the log positions its files
//! cover, and how far the tenant's events are archived after it — the archiver's positions live
//! here, with the files, so that a file written without its entry (a crash in between) is an
//! orphan no reader sees, and the events in it are archived again.

use std::collections::BTreeMap;

use bytes::Bytes;
use futures_util::TryStreamExt;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

/// One archive file, as its manifest entry names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// Under the tenant's directory: `date=YYYY-MM-DD/<id>.parquet`.
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
    pub rows: u64,
    /// The first and last `occurred_at` in the file (µs since the epoch).
    pub first_at: i64,
    pub last_at: i64,
}

impl FileRef {
    /// The `YYYY-MM-DD` of the file's date partition.
    pub fn date(&self) -> &str {
        self.path
            .strip_prefix("date=")
            .and_then(|rest| rest.split('/').next())
            .unwrap_or("")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// New events archived.
    Append,
    /// Small files of a date merged into one: the removed files' rows, exactly, are in the added.
    Compact,
    /// The tenant was erased: its keys are destroyed, its files unreadable (crypto-shredding);
    /// its later events are not archived.
    Erase,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub sequence: u64,
    /// Hex SHA-256 of the previous entry's bytes (`None` for entry 0).
    pub previous: Option<String>,
    /// When it was written (µs since the epoch).
    pub written_at: i64,
    pub action: Action,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<FileRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
    /// The log span this entry's events came from: `topic/partition` → `[from, to)` offsets.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub covers: BTreeMap<String, [u64; 2]>,
    /// After this entry, every event of the tenant below these offsets (`topic/partition` →
    /// offset) is archived.
    pub positions: BTreeMap<String, u64>,
}

/// What an entry is to change, before it has a place in the chain.
#[derive(Debug, Clone)]
pub struct Draft {
    pub action: Action,
    pub add: Vec<FileRef>,
    pub remove: Vec<String>,
    pub covers: BTreeMap<String, [u64; 2]>,
    /// Positions reached; merged with the manifest's (they never go back).
    pub positions: BTreeMap<String, u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("manifest of tenant {tenant}: {problem}")]
    Broken { tenant: Uuid, problem: String },
    #[error("manifest of tenant {tenant}: entry {sequence} was written by another writer first")]
    Conflict { tenant: Uuid, sequence: u64 },
}

/// The key of `topic`'s `partition` in positions and covers.
pub fn position_key(topic: &str, partition: u32) -> String {
    format!("{topic}/{partition}")
}

/// `tenant_id=<T>` under `root`.
pub fn tenant_dir(root: &Path, tenant: Uuid) -> Path {
    root.clone().join(format!("tenant_id={tenant}"))
}

fn entry_path(root: &Path, tenant: Uuid, sequence: u64) -> Path {
    tenant_dir(root, tenant)
        .join("_manifest")
        .join(format!("{sequence:012}.json"))
}

/// Hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The tenants with a directory under `root`.
pub async fn tenants(store: &dyn ObjectStore, root: &Path) -> Result<Vec<Uuid>, ManifestError> {
    let listed = store.list_with_delimiter(Some(root)).await?;
    let mut tenants: Vec<Uuid> = listed
        .common_prefixes
        .iter()
        .filter_map(|p| p.filename()?.strip_prefix("tenant_id=")?.parse().ok())
        .collect();
    tenants.sort();
    Ok(tenants)
}

/// Every entry of a tenant's chain as stored, in order, with each entry's bytes; and what is
/// wrong with the chain (a missing, unreadable or unlinked entry), if anything.
pub async fn walk(
    store: &dyn ObjectStore,
    root: &Path,
    tenant: Uuid,
) -> Result<(Vec<(Entry, Bytes)>, Vec<String>), ManifestError> {
    let prefix = tenant_dir(root, tenant).join("_manifest");
    let mut names: Vec<Path> = store
        .list(Some(&prefix))
        .map_ok(|meta| meta.location)
        .try_collect()
        .await?;
    names.sort();
    let mut entries: Vec<(Entry, Bytes)> = Vec::with_capacity(names.len());
    let mut problems = Vec::new();
    let mut previous: Option<String> = None;
    for name in names {
        let expected = entries.len() as u64;
        let bytes = store.get(&name).await?.bytes().await?;
        let entry: Entry = match serde_json::from_slice(&bytes) {
            Ok(entry) => entry,
            Err(error) => {
                problems.push(format!("{name}: not a manifest entry ({error})"));
                break;
            }
        };
        if entry_path(root, tenant, entry.sequence) != name {
            problems.push(format!(
                "{name}: holds entry {} (entry {expected} expected here)",
                entry.sequence
            ));
            break;
        }
        if entry.sequence != expected {
            problems.push(format!(
                "{}: entry {expected} is missing (the chain goes from {} to {})",
                entry_path(root, tenant, expected),
                expected.saturating_sub(1),
                entry.sequence
            ));
            break;
        }
        if entry.previous != previous {
            problems.push(format!(
                "{name}: its previous-entry hash does not match entry {} (altered or replaced)",
                expected.saturating_sub(1)
            ));
            break;
        }
        previous = Some(sha256_hex(&bytes));
        entries.push((entry, bytes));
    }
    Ok((entries, problems))
}

/// A tenant's manifest as folded from its chain: the live files and the positions reached.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub tenant: Uuid,
    /// The sequence number the next entry gets.
    pub next: u64,
    /// Hex SHA-256 of the last entry's bytes.
    head: Option<String>,
    /// The files readers see, by path.
    pub files: BTreeMap<String, FileRef>,
    pub positions: BTreeMap<String, u64>,
    pub erased: bool,
}

impl Manifest {
    /// The manifest of a tenant with no entries yet.
    pub fn new(tenant: Uuid) -> Manifest {
        Manifest {
            tenant,
            next: 0,
            head: None,
            files: BTreeMap::new(),
            positions: BTreeMap::new(),
            erased: false,
        }
    }

    /// Reads and checks the whole chain; a broken chain is an error naming where it breaks.
    pub async fn load(
        store: &dyn ObjectStore,
        root: &Path,
        tenant: Uuid,
    ) -> Result<Manifest, ManifestError> {
        let (entries, problems) = walk(store, root, tenant).await?;
        if let Some(problem) = problems.into_iter().next() {
            return Err(ManifestError::Broken { tenant, problem });
        }
        let mut manifest = Manifest::new(tenant);
        for (entry, bytes) in &entries {
            manifest.apply(entry, bytes);
        }
        Ok(manifest)
    }

    /// Reads the entries other writers added since (a create-only get of the next ones).
    pub async fn refresh(
        &mut self,
        store: &dyn ObjectStore,
        root: &Path,
    ) -> Result<(), ManifestError> {
        loop {
            let path = entry_path(root, self.tenant, self.next);
            let bytes = match store.get(&path).await {
                Ok(got) => got.bytes().await?,
                Err(object_store::Error::NotFound { .. }) => return Ok(()),
                Err(error) => return Err(error.into()),
            };
            let entry: Entry =
                serde_json::from_slice(&bytes).map_err(|e| ManifestError::Broken {
                    tenant: self.tenant,
                    problem: format!("{path}: not a manifest entry ({e})"),
                })?;
            if entry.sequence != self.next || entry.previous != self.head {
                return Err(ManifestError::Broken {
                    tenant: self.tenant,
                    problem: format!("{path}: does not follow entry {}", self.next),
                });
            }
            self.apply(&entry, &bytes);
        }
    }

    fn apply(&mut self, entry: &Entry, bytes: &[u8]) {
        for path in &entry.remove {
            self.files.remove(path);
        }
        for file in &entry.add {
            self.files.insert(file.path.clone(), file.clone());
        }
        for (key, &offset) in &entry.positions {
            let at = self.positions.entry(key.clone()).or_insert(0);
            *at = (*at).max(offset);
        }
        if entry.action == Action::Erase {
            self.erased = true;
        }
        self.next = entry.sequence + 1;
        self.head = Some(sha256_hex(bytes));
    }

    /// How far the tenant's events of `topic/partition` are archived.
    pub fn position(&self, key: &str) -> u64 {
        self.positions.get(key).copied().unwrap_or(0)
    }

    /// Writes `draft` as the next entry. If another writer took that place first, the manifest
    /// is refreshed and [`ManifestError::Conflict`] returned: the caller decides whether the
    /// draft still holds and tries again.
    pub async fn append(
        &mut self,
        store: &dyn ObjectStore,
        root: &Path,
        draft: &Draft,
        now: i64,
    ) -> Result<Entry, ManifestError> {
        let mut positions = self.positions.clone();
        for (key, &offset) in &draft.positions {
            let at = positions.entry(key.clone()).or_insert(0);
            *at = (*at).max(offset);
        }
        let entry = Entry {
            sequence: self.next,
            previous: self.head.clone(),
            written_at: now,
            action: draft.action,
            add: draft.add.clone(),
            remove: draft.remove.clone(),
            covers: draft.covers.clone(),
            positions,
        };
        let bytes = serde_json::to_vec_pretty(&entry).map_err(|e| ManifestError::Broken {
            tenant: self.tenant,
            problem: format!("encoding entry {}: {e}", entry.sequence),
        })?;
        let path = entry_path(root, self.tenant, entry.sequence);
        let create = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match store
            .put_opts(&path, PutPayload::from(bytes.clone()), create)
            .await
        {
            Ok(_) => {
                self.apply(&entry, &bytes);
                Ok(entry)
            }
            Err(object_store::Error::AlreadyExists { .. }) => {
                self.refresh(store, root).await?;
                Err(ManifestError::Conflict {
                    tenant: self.tenant,
                    sequence: entry.sequence,
                })
            }
            Err(error) => Err(error.into()),
        }
    }
}
