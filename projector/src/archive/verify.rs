//! `loom verify --archive`: walks every tenant's manifest chain and every file's SHA-256, and
//! names what was altered, removed or added. Needs no keys: an erased tenant's files still verify
//! (erasure destroys keys, not files), and verifying reveals nothing.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use object_store::path::Path;
use uuid::Uuid;

use super::Archive;
use super::manifest::{Action, FileRef, ManifestError, sha256_hex, tenant_dir, walk};

/// A file no entry names, younger than this, may be one an archiver is writing (the entry follows
/// it within seconds, unless the object store is failing).
const PENDING_MINUTES: i64 = 15;

#[derive(Debug, Default)]
pub struct ArchiveReport {
    pub tenants: u64,
    pub entries: u64,
    pub files: u64,
    pub bytes: u64,
    pub rows: u64,
    /// Tenants whose manifest records their erasure.
    pub erased: Vec<Uuid>,
    /// What is wrong, one line each, naming the entry or file.
    pub problems: Vec<String>,
    /// What is worth knowing but not wrong: files a running archiver is writing.
    pub notes: Vec<String>,
}

impl ArchiveReport {
    pub fn is_intact(&self) -> bool {
        self.problems.is_empty()
    }
}

pub async fn verify(archive: &Archive) -> Result<ArchiveReport, ManifestError> {
    let mut report = ArchiveReport::default();
    for tenant in archive.tenants().await? {
        report.tenants += 1;
        let (entries, problems) = walk(archive.store.as_ref(), &archive.root, tenant).await?;
        report.entries += entries.len() as u64;
        report.problems.extend(problems);
        let mut live: BTreeMap<String, FileRef> = BTreeMap::new();
        let mut removed: BTreeSet<String> = BTreeSet::new();
        for (entry, _) in &entries {
            for path in &entry.remove {
                live.remove(path);
                removed.insert(path.clone());
            }
            for file in &entry.add {
                live.insert(file.path.clone(), file.clone());
            }
            if entry.action == Action::Erase {
                report.erased.push(tenant);
            }
        }
        let dir = tenant_dir(&archive.root, tenant);
        let stored: BTreeMap<String, DateTime<Utc>> = archive
            .store
            .list(Some(&dir))
            .map_ok(|meta| (meta.location, meta.last_modified))
            .try_collect::<Vec<(Path, DateTime<Utc>)>>()
            .await?
            .into_iter()
            .filter_map(|(path, modified)| {
                let parts: Vec<String> = path
                    .prefix_match(&dir)?
                    .map(|p| p.as_ref().to_owned())
                    .collect();
                (parts.first().map(String::as_str) != Some("_manifest"))
                    .then(|| (parts.join("/"), modified))
            })
            .collect();
        for (path, file) in &live {
            let full = archive.file_path(tenant, path);
            if !stored.contains_key(path) {
                report.problems.push(format!(
                    "{full}: removed (the manifest names it; it is gone)"
                ));
                continue;
            }
            let bytes = archive.get(&full).await?;
            let found = sha256_hex(&bytes);
            if found != file.sha256 || bytes.len() as u64 != file.bytes {
                report.problems.push(format!(
                    "{full}: altered (SHA-256 {found}, {} bytes; its manifest entry says {}, {} bytes)",
                    bytes.len(),
                    file.sha256,
                    file.bytes
                ));
                continue;
            }
            report.files += 1;
            report.bytes += file.bytes;
            report.rows += file.rows;
        }
        let recent = Utc::now() - chrono::Duration::minutes(PENDING_MINUTES);
        for (path, &modified) in &stored {
            if live.contains_key(path) || removed.contains(path) {
                continue;
            }
            if modified > recent {
                report.notes.push(format!(
                    "{}: not named by a manifest entry yet (written {modified}: an archiver \
                     may be writing it; the next start of the archiver sweeps it away if not)",
                    archive.file_path(tenant, path)
                ));
            } else {
                report.problems.push(format!(
                    "{}: added (no manifest entry names it; readers ignore it — left by an \
                     interrupted write, or put there by someone else)",
                    archive.file_path(tenant, path)
                ));
            }
        }
    }
    Ok(report)
}
