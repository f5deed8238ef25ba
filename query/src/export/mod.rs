//! Export to a data lake: the archived events, as a Delta Lake table (delta-rs) on a local path
//! or S3, partitioned by tenant and date, with the bodies omitted (the default), decrypted or
//! still sealed.
//!
//! Incremental and idempotent: each tenant's rows are committed in one Delta version together
//! with application transactions (`loom-export/<tenant>/<topic>/<partition>`, version = the log
//! offset the rows reach), which are the watermark: a later export adds the rows past it only,
//! and an export that dies before its commit leaves files no reader sees (they are not in the
//! table's log) and no watermark, so that running it again adds each row once. The archive's
//! manifest says how far each tenant's events are archived; the rows between the watermark and
//! there are read in date order, one date partition open at a time (bounded memory), and
//! committed when the tenant is done.

mod jobs;
pub mod rows;
mod table;

use std::collections::{BTreeMap, HashMap};
use std::path::Component;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use datafusion::common::ScalarValue;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::prelude::{Expr, col, lit};
use deltalake_core::kernel::Transaction;
use deltalake_core::writer::{DeltaWriter, RecordBatchWriter};
use futures_util::StreamExt;
use loom_projector::archive::columns::RECORD;
use loom_projector::archive::location::LocationError;
use loom_projector::archive::{ArchiveLocation, Manifest, S3Options};
use loom_schemas::codec::Registry;
use loom_schemas::keystore::KeyStore;
use object_store::ObjectStore;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use url::Url;
use uuid::Uuid;

use crate::archive::{Access, Scope};
use crate::sql::{AbortOnDrop, SqlError, SqlService};

pub use jobs::{Job, JobState, JobView, Jobs, JobsError};
pub use rows::BODY_COLUMNS;

/// What an export does with the bodies (prompts, completions, tool arguments and results).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Bodies {
    /// Leaves them out: the table holds metadata only.
    #[default]
    Omit,
    /// Decrypts them into text columns: the lake then holds them in clear.
    Decrypt,
    /// Copies them sealed (AES-256-GCM, the key store's keys): binary columns only Loom's keys
    /// open.
    Sealed,
}

impl Bodies {
    pub fn parse(name: &str) -> Option<Bodies> {
        match name {
            "omit" => Some(Bodies::Omit),
            "decrypt" => Some(Bodies::Decrypt),
            "sealed" => Some(Bodies::Sealed),
            _ => None,
        }
    }

    /// What the archive must be read with: the events whole for bodies, the metadata for none.
    pub fn access(self) -> Access {
        match self {
            Bodies::Omit => Access::Metadata,
            Bodies::Decrypt | Bodies::Sealed => Access::Full,
        }
    }
}

/// Where an export writes its table.
#[derive(Clone)]
pub struct Target {
    /// `file:///…` or `s3://bucket/prefix`.
    url: Url,
    /// The bucket's store, for S3 (the archive's client and settings); delta-rs's own for files.
    store: Option<Arc<dyn ObjectStore>>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Target").field(&self.url.as_str()).finish()
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.local_path() {
            Some(path) => write!(f, "{}", path.display()),
            None => write!(f, "{}", self.url),
        }
    }
}

impl Target {
    /// A table the operator names: a directory or `s3://BUCKET/PREFIX` (reached with `s3`).
    pub fn parse(text: &str, s3: S3Options) -> Result<Target, ExportError> {
        if text.contains("://") && !text.starts_with("s3://") {
            return Err(ExportError::Invalid(format!(
                "{text:?}: a table goes to a directory or to s3://BUCKET/PREFIX"
            )));
        }
        let location = ArchiveLocation::parse(text, s3).map_err(location_error)?;
        if let ArchiveLocation::S3 { prefix, .. } = &location
            && prefix.is_empty()
        {
            return Err(ExportError::Invalid(format!(
                "{text:?}: name a prefix for the table (s3://BUCKET/PREFIX), not a whole bucket"
            )));
        }
        Target::at(&location, &[])
    }

    /// The table `name` of `scope` under the export root `root`: `<root>/tenant_id=<T>/<name>`
    /// for a tenant, `<root>/<name>` for the operator. `name` is one or more `/`-separated
    /// segments of letters, digits, `_`, `-` and `.` (not `.` or `..` alone): what callers of
    /// the HTTP API may name, so that no name reaches outside its scope's directory.
    pub fn under(root: &ArchiveLocation, scope: Scope, name: &str) -> Result<Target, ExportError> {
        let segments = check_name(name)?;
        let mut path: Vec<String> = Vec::with_capacity(segments.len() + 1);
        if let Scope::Tenant(tenant) = scope {
            path.push(format!("tenant_id={tenant}"));
        }
        path.extend(segments.into_iter().map(String::from));
        Target::at(root, &path)
    }

    fn at(location: &ArchiveLocation, below: &[String]) -> Result<Target, ExportError> {
        match location {
            ArchiveLocation::Directory(dir) => {
                if dir.components().any(|c| c == Component::ParentDir) {
                    return Err(ExportError::Invalid(format!(
                        "{}: write the directory without `..`",
                        dir.display()
                    )));
                }
                let mut dir = std::path::absolute(dir).map_err(|e| {
                    ExportError::Invalid(format!("{}: not a usable path ({e})", dir.display()))
                })?;
                dir.extend(below);
                std::fs::create_dir_all(&dir).map_err(|e| ExportError::Table {
                    target: dir.display().to_string(),
                    message: format!("creating the directory: {e}"),
                })?;
                let url = Url::from_directory_path(&dir).map_err(|()| {
                    ExportError::Invalid(format!("{}: not a usable path", dir.display()))
                })?;
                Ok(Target { url, store: None })
            }
            ArchiveLocation::S3 { bucket, prefix, .. } => {
                let (store, _) = location.open().map_err(location_error)?;
                let mut path: Vec<&str> = prefix.split('/').filter(|s| !s.is_empty()).collect();
                path.extend(below.iter().map(String::as_str));
                let url = Url::parse(&format!("s3://{bucket}/{}", path.join("/")))
                    .map_err(|e| ExportError::Invalid(format!("s3://{bucket}/…: {e}")))?;
                Ok(Target {
                    url,
                    store: Some(store),
                })
            }
        }
    }

    /// The local directory of the table, if it is on a local path.
    pub fn local_path(&self) -> Option<std::path::PathBuf> {
        let path = (self.url.scheme() == "file")
            .then(|| self.url.to_file_path().ok())
            .flatten()?;
        // Without the trailing `/` of the directory URL.
        Some(path.components().collect())
    }
}

/// The segments of a table name an API caller gave, or why it is refused.
fn check_name(name: &str) -> Result<Vec<&str>, ExportError> {
    let refuse = |why: &str| {
        Err(ExportError::Invalid(format!(
            "target {name:?}: {why}; name the table with segments of letters, digits, `_`, `-` \
             and `.`, separated by `/` (e.g. `lake/events`): it is written under your \
             directory of the server's export root"
        )))
    };
    if name.is_empty() || name.len() > 200 {
        return refuse("the name is empty or longer than 200 bytes");
    }
    let segments: Vec<&str> = name.split('/').collect();
    if segments.len() > 8 {
        return refuse("more than 8 segments");
    }
    for segment in &segments {
        if segment.is_empty() || *segment == "." || *segment == ".." {
            return refuse("an empty, `.` or `..` segment");
        }
        if !segment
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        {
            return refuse("a character other than letters, digits, `_`, `-`, `.` and `/`");
        }
    }
    Ok(segments)
}

fn location_error(error: LocationError) -> ExportError {
    ExportError::Invalid(error.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A target, option or table the export cannot use.
    #[error("{0}")]
    Invalid(String),
    /// The caller's role may not read the bodies it asked for.
    #[error("bodies `{0}` need a role that may read bodies; export with bodies `omit`")]
    Forbidden(&'static str),
    #[error("the archive: {0}")]
    Archive(#[from] SqlError),
    #[error("the table at {target}: {message}")]
    Table { target: String, message: String },
    #[error("tenant {0} was erased during the export; its rows are not committed")]
    Erased(Uuid),
}

/// How far an export has come; read while it runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Rows to export, once counted (0 before).
    pub rows_total: AtomicU64,
    pub rows_written: AtomicU64,
    pub tenants_total: AtomicU64,
    pub tenants_done: AtomicU64,
}

impl Progress {
    pub fn snapshot(&self) -> ProgressView {
        ProgressView {
            rows_total: self.rows_total.load(Ordering::Relaxed),
            rows_written: self.rows_written.load(Ordering::Relaxed),
            tenants_total: self.tenants_total.load(Ordering::Relaxed),
            tenants_done: self.tenants_done.load(Ordering::Relaxed),
        }
    }
}

/// [`Progress`] at one moment.
#[derive(Debug, Clone, Copy, Serialize, utoipa::ToSchema)]
pub struct ProgressView {
    pub rows_total: u64,
    pub rows_written: u64,
    pub tenants_total: u64,
    pub tenants_done: u64,
}

/// One Delta version an export committed: one tenant's new rows.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Commit {
    #[schema(value_type = String)]
    pub tenant_id: Uuid,
    pub version: u64,
    pub rows: u64,
    pub files: usize,
}

/// What an export did.
#[derive(Debug, Clone, Default, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Report {
    /// The table, as a path or `s3://` URL.
    pub target: String,
    /// The table's version after the export (`None`: there is no table: nothing was ever
    /// exported to it).
    pub table_version: Option<u64>,
    pub commits: Vec<Commit>,
    pub rows: u64,
    /// Bodies that could not be opened (a key rotated away, a record that does not decode):
    /// null in the table.
    pub bodies_unopened: u64,
}

/// What an export is asked to do.
#[derive(Debug, Clone)]
pub struct Request {
    pub scope: Scope,
    pub bodies: Bodies,
    pub target: Target,
}

/// Files a writer rolls at this size (Parquet, compressed): large enough for lake readers.
const TARGET_FILE_BYTES: u64 = 128 << 20;

/// Rows a written row group holds at most: each open file buffers one before it is written.
const ROW_GROUP_ROWS: usize = 128 * 1024;

/// The application id of the watermark of `tenant` on the log's `position` (`topic/partition`).
fn app_id(tenant: Uuid, position: &str) -> String {
    format!("loom-export/{tenant}/{position}")
}

/// The rows of one tenant still to export: per log partition, the offsets `[from, to)`.
struct Pending {
    tenant: Uuid,
    days: Vec<String>,
    ranges: BTreeMap<String, (u64, u64)>,
    rows: u64,
}

impl Pending {
    /// The filter on the archive's rows that selects them.
    fn filter(&self) -> Option<Expr> {
        self.ranges
            .iter()
            .filter_map(|(position, &(from, to))| {
                let (topic, partition) = position.rsplit_once('/')?;
                let partition: i32 = partition.parse().ok()?;
                Some(
                    col("log_topic")
                        .eq(lit(topic))
                        .and(col("log_partition").eq(lit(partition)))
                        .and(col("log_offset").gt_eq(lit(i64::try_from(from).ok()?)))
                        .and(col("log_offset").lt(lit(i64::try_from(to).ok()?))),
                )
            })
            .reduce(Expr::or)
    }
}

/// Runs exports over the archive `sql` reads.
pub struct Exporter {
    sql: Arc<SqlService>,
    keys: Arc<KeyStore>,
}

impl Exporter {
    pub fn new(sql: Arc<SqlService>, keys: Arc<KeyStore>) -> Exporter {
        Exporter { sql, keys }
    }

    /// Runs `request` on the query runtime (apart from the gateway's), reporting to `progress`.
    /// Dropping the future stops the export where it is: what it wrote since its last commit is
    /// in no version of the table (as after a crash), and the next export writes it again.
    pub async fn run(
        self: &Arc<Self>,
        request: Request,
        progress: Arc<Progress>,
    ) -> Result<Report, ExportError> {
        let this = Arc::clone(self);
        let task = self
            .sql
            .spawn(async move { this.export(&request, &progress).await });
        let _abort = AbortOnDrop(task.abort_handle());
        task.await.map_err(|e| ExportError::Table {
            target: String::new(),
            message: format!("the export task failed: {e}"),
        })?
    }

    async fn export(&self, request: &Request, progress: &Progress) -> Result<Report, ExportError> {
        let target = &request.target;
        let schema = rows::schema(request.bodies);
        let mut table = table::open(target).await?;
        if let Some(table) = &table {
            table::check_columns(target, table, &schema)?;
        }
        let manifests = self.sql.current_manifests(request.scope).await?;
        let mut pending = Vec::new();
        for manifest in &manifests {
            let mut ranges = BTreeMap::new();
            for (position, &to) in &manifest.positions {
                let from = match &table {
                    Some(table) => {
                        table::watermark(target, table, &app_id(manifest.tenant, position))
                            .await?
                            .and_then(|v| u64::try_from(v).ok())
                            .unwrap_or(0)
                    }
                    None => 0,
                };
                if from < to {
                    ranges.insert(position.clone(), (from, to));
                }
            }
            let mut days: Vec<String> = manifest
                .files
                .values()
                .map(|file| file.date().to_owned())
                .collect();
            days.dedup();
            let mut tenant = Pending {
                tenant: manifest.tenant,
                days,
                ranges,
                rows: 0,
            };
            tenant.rows = self.count(manifest, &tenant).await?;
            if tenant.rows > 0 {
                progress
                    .rows_total
                    .fetch_add(tenant.rows, Ordering::Relaxed);
                pending.push(tenant);
            }
        }
        progress
            .tenants_total
            .store(pending.len() as u64, Ordering::Relaxed);

        let mut report = Report {
            target: target.to_string(),
            ..Report::default()
        };
        let registry = Registry::builtin().map_err(|e| ExportError::Table {
            target: target.to_string(),
            message: format!("the event schemas: {e}"),
        })?;
        for tenant in &pending {
            let table = match &mut table {
                Some(table) => table,
                None => table.insert(table::create(target, &schema).await?),
            };
            let shape = rows::Shape {
                bodies: request.bodies,
                schema: Arc::clone(&schema),
                keys: &self.keys,
                registry,
            };
            let commit = self
                .export_tenant(target, table, tenant, &shape, progress, &mut report)
                .await?;
            report.rows += commit.rows;
            report.commits.push(commit);
            progress.tenants_done.fetch_add(1, Ordering::Relaxed);
        }
        report.table_version = table.as_ref().and_then(|table| table.version());
        Ok(report)
    }

    /// How many rows of `manifest`'s tenant `pending` selects.
    async fn count(&self, manifest: &Manifest, pending: &Pending) -> Result<u64, ExportError> {
        let Some(filter) = pending.filter() else {
            return Ok(0);
        };
        let mut total = 0;
        for day in &pending.days {
            let filter = filter.clone();
            let mut stream = self
                .sql
                .scan_day(manifest, Access::Metadata, day, |frame| {
                    frame.filter(filter)?.aggregate(vec![], vec![count(lit(1))])
                })
                .await?;
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(|e| SqlError::Archive(e.to_string()))?;
                if batch.num_rows() > 0
                    && let Ok(ScalarValue::Int64(Some(rows))) =
                        ScalarValue::try_from_array(batch.column(0), 0)
                {
                    total += u64::try_from(rows).unwrap_or(0);
                }
            }
        }
        Ok(total)
    }

    /// Writes the rows `pending` selects and commits them with their watermarks.
    async fn export_tenant(
        &self,
        target: &Target,
        table: &mut deltalake_core::DeltaTable,
        pending: &Pending,
        shape: &rows::Shape<'_>,
        progress: &Progress,
        report: &mut Report,
    ) -> Result<Commit, ExportError> {
        let table_error = |e: deltalake_core::DeltaTableError| ExportError::Table {
            target: target.to_string(),
            message: e.to_string(),
        };
        let mut writer = RecordBatchWriter::for_table(table)
            .map_err(table_error)?
            .with_target_file_size(TARGET_FILE_BYTES)
            .with_writer_properties(
                WriterProperties::builder()
                    .set_compression(Compression::ZSTD(ZstdLevel::default()))
                    .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
                    .set_created_by(format!("loom export {}", env!("CARGO_PKG_VERSION")))
                    .build(),
            );
        let Some(filter) = pending.filter() else {
            return Err(ExportError::Invalid("nothing to export".into()));
        };
        let tenant = pending.tenant.to_string();
        let mut columns: Vec<Expr> = rows::COPIED.iter().map(col).collect();
        if shape.bodies != Bodies::Omit {
            columns.push(col(RECORD));
        }
        let (mut adds, mut rows, mut unopened) = (Vec::new(), 0u64, rows::Unopened::default());
        for day in &pending.days {
            // Compaction may have replaced the files of the day since: read the ones the
            // manifest names now (the rows below the watermark's end are the same).
            let manifest = self
                .sql
                .current_manifests(Scope::Tenant(pending.tenant))
                .await?
                .pop()
                .ok_or(ExportError::Erased(pending.tenant))?;
            let (filter, columns) = (filter.clone(), columns.clone());
            let mut stream = self
                .sql
                .scan_day(&manifest, shape.bodies.access(), day, |frame| {
                    frame.filter(filter)?.select(columns)
                })
                .await?;
            while let Some(batch) = stream.next().await {
                let batch = batch.map_err(|e| SqlError::Archive(e.to_string()))?;
                if batch.num_rows() == 0 {
                    continue;
                }
                let batch = shape
                    .convert(&batch, &tenant, day, &mut unopened)
                    .map_err(|e| SqlError::Archive(e.to_string()))?;
                let written = batch.num_rows() as u64;
                writer.write(batch).await.map_err(table_error)?;
                rows += written;
                progress.rows_written.fetch_add(written, Ordering::Relaxed);
            }
            // One date partition open at a time: its files are finished before the next.
            adds.extend(writer.flush().await.map_err(table_error)?);
        }
        let files = adds.len();
        let watermarks = pending
            .ranges
            .iter()
            .filter_map(|(position, &(_, to))| {
                Some(Transaction::new(
                    app_id(pending.tenant, position),
                    i64::try_from(to).ok()?,
                ))
            })
            .collect();
        let metadata = HashMap::from([
            ("loom.tenant_id".to_owned(), Value::from(tenant.clone())),
            ("loom.rows".to_owned(), json!(rows)),
            ("loom.bodies".to_owned(), json!(shape.bodies)),
        ]);
        let version = table::commit(target, table, adds, watermarks, metadata).await?;
        report.bodies_unopened += unopened.0;
        Ok(Commit {
            tenant_id: pending.tenant,
            version,
            rows,
            files,
        })
    }
}
