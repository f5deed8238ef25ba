//! The read models' database: Postgres in production, SQLite in the embedded default. One set of
//! queries serves both (through sqlx's `Any` driver; `$n` placeholders work on both), over tables
//! the two migration sets define alike.
//!
//! Each version of the read models is separate, so that `loom replay` can build a new one while
//! the old one serves: a Postgres schema `loom_read_v<N>` (chosen through `search_path`), or a
//! SQLite file `v<N>.sqlite` in the read-models directory.

use loom_schemas::{ExposeSecret, SecretString};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions, AnyRow};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, AssertSqlSafe, Column, ConnectOptions, Executor, Row};

static POSTGRES_MIGRATOR: Migrator = sqlx::migrate!("../migrations/read_models_postgres");
static SQLITE_MIGRATOR: Migrator = sqlx::migrate!("../migrations/read_models_sqlite");

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("read-model database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrating the read models: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error(
        "read models version {version} are not migrated (and this process may not migrate \
         them): run `loom migrate`"
    )]
    NotMigrated { version: u32 },
    #[error(
        "the read models stand at offset {stored} of {topic}/{partition}, short of the batch to \
         store, which starts at {start}: the records between were never stored (lost in a crash \
         of the database, which the restart folds again; or gone from the log by its retention: \
         then rebuild with `loom replay --from-archive`)"
    )]
    Behind {
        topic: &'static str,
        partition: u32,
        stored: u64,
        start: u64,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Where the read models live: a Postgres URL (a secret: it may carry a password), or a
/// directory of SQLite files.
#[derive(Debug, Clone)]
pub enum StoreLocation {
    Postgres(SecretString),
    Sqlite(PathBuf),
}

impl StoreLocation {
    /// `postgres://…` (or `postgresql://…`) is Postgres; anything else is a directory for SQLite.
    pub fn parse(text: &str) -> StoreLocation {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            StoreLocation::Postgres(text.into())
        } else {
            StoreLocation::Sqlite(PathBuf::from(text))
        }
    }
}

/// One version of the read models, migrated and ready.
#[derive(Clone)]
pub struct ReadStore {
    pool: AnyPool,
    backend: Backend,
    version: u32,
    /// Partitions known to exist (Postgres), so that each is created once per process.
    partitions: Arc<Mutex<HashSet<String>>>,
    /// Trace rows this process wrote per partition, now and when it last analyzed it.
    growth: Arc<Mutex<HashMap<String, (u64, u64)>>>,
}

/// The secondary indexes folding reads by, kept through a replay: the rollups look up each
/// completed request's upstream calls and tool calls.
pub const FOLD_READS: [&str; 2] = ["llm_calls_trace", "tool_calls_trace"];

impl ReadStore {
    /// Opens version `version` of the read models, creating and migrating it when needed.
    pub async fn open(location: &StoreLocation, version: u32) -> Result<ReadStore, StoreError> {
        Self::connect(location, version, true, 1).await
    }

    /// Opens version `version` of the read models, which `loom migrate` must have migrated.
    pub async fn open_migrated(
        location: &StoreLocation,
        version: u32,
    ) -> Result<ReadStore, StoreError> {
        Self::connect(location, version, false, 1).await
    }

    /// Opens version `version` of the read models, already migrated, to read from: on SQLite
    /// with two connections, so that one slow query does not hold up every other.
    pub async fn open_reader(
        location: &StoreLocation,
        version: u32,
    ) -> Result<ReadStore, StoreError> {
        Self::connect(location, version, false, 2).await
    }

    async fn connect(
        location: &StoreLocation,
        version: u32,
        migrate: bool,
        sqlite_connections: u32,
    ) -> Result<ReadStore, StoreError> {
        sqlx::any::install_default_drivers();
        let (pool, backend) = match location {
            StoreLocation::Postgres(url) => (
                connect_postgres(url.expose_secret(), version).await?,
                Backend::Postgres,
            ),
            StoreLocation::Sqlite(dir) => (
                connect_sqlite(dir, version, sqlite_connections).await?,
                Backend::Sqlite,
            ),
        };
        let migrator = match backend {
            Backend::Postgres => &POSTGRES_MIGRATOR,
            Backend::Sqlite => &SQLITE_MIGRATOR,
        };
        if migrate {
            migrator.run(&pool).await?;
        } else {
            let applied: Vec<i64> =
                sqlx::query("SELECT version FROM _sqlx_migrations WHERE success")
                    .fetch_all(&pool)
                    .await
                    .map_err(|_| StoreError::NotMigrated { version })?
                    .iter()
                    .map(|row| row.try_get::<i64, _>(0))
                    .collect::<Result<_, _>>()?;
            if migrator.iter().any(|m| !applied.contains(&m.version)) {
                return Err(StoreError::NotMigrated { version });
            }
        }
        Ok(ReadStore {
            pool,
            backend,
            version,
            partitions: Arc::default(),
            growth: Arc::default(),
        })
    }

    pub(crate) fn knows_partition(&self, name: &str) -> bool {
        self.partitions
            .lock()
            .is_ok_and(|known| known.contains(name))
    }

    pub(crate) fn remember_partition(&self, name: String) {
        if let Ok(mut known) = self.partitions.lock() {
            known.insert(name);
        }
    }

    pub(crate) fn forget_partition(&self, name: &str) {
        if let Ok(mut known) = self.partitions.lock() {
            known.remove(name);
        }
    }

    /// Counts `rows` written to `partition`; true when they have doubled since it was last
    /// analyzed here (from 1,000), which counts as analyzing it now.
    pub(crate) fn grew(&self, partition: &str, rows: u64) -> bool {
        let Ok(mut growth) = self.growth.lock() else {
            return false;
        };
        let (written, analyzed) = growth.entry(partition.to_owned()).or_default();
        *written += rows;
        if *written >= (2 * *analyzed).max(1000) {
            *analyzed = *written;
            return true;
        }
        false
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    pub fn version(&self) -> u32 {
        self.version
    }

    /// A SHA-256 of every table's rows (as text, sorted; wall-clock columns left out): equal
    /// digests mean equal tables. For comparing a projection with a replay of it.
    pub async fn digests(&self) -> Result<BTreeMap<&'static str, String>, sqlx::Error> {
        let mut digests = BTreeMap::new();
        for table in crate::catalog::TABLES {
            let rows = sqlx::query(AssertSqlSafe(format!("SELECT * FROM {table}")))
                .fetch_all(&self.pool)
                .await?;
            let mut texts = rows.iter().map(row_text).collect::<Result<Vec<_>, _>>()?;
            texts.sort();
            let mut hash = Sha256::new();
            for text in texts {
                hash.update(text.as_bytes());
                hash.update(b"\n");
            }
            digests.insert(table, hex::encode(hash.finalize()));
        }
        Ok(digests)
    }

    /// Drops the secondary indexes (not those that keys and upserts rely on, nor those the fold
    /// reads by: [`FOLD_READS`]), remembering how to create them in `deferred_indexes`: a
    /// replay fills tables faster without them. Does nothing where they are already deferred.
    pub async fn defer_indexes(&self) -> Result<(), sqlx::Error> {
        let kept: Vec<String> = FOLD_READS.iter().map(|name| format!("'{name}'")).collect();
        let kept = kept.join(", ");
        let listed = match self.backend {
            // The partitioned tables' own indexes (their partitions' go with them).
            Backend::Postgres => {
                "SELECT CAST(i.relname AS TEXT), pg_get_indexdef(i.oid) FROM pg_index x \
                 JOIN pg_class i ON i.oid = x.indexrelid \
                 JOIN pg_class t ON t.oid = x.indrelid \
                 JOIN pg_namespace n ON n.oid = t.relnamespace \
                 WHERE n.nspname = current_schema() AND NOT x.indisunique \
                 AND NOT EXISTS (SELECT 1 FROM pg_inherits h WHERE h.inhrelid = i.oid) \
                 AND CAST(i.relname AS TEXT) NOT IN ({kept})"
            }
            Backend::Sqlite => {
                "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL \
                 AND upper(sql) NOT LIKE 'CREATE UNIQUE%' AND name NOT IN ({kept})"
            }
        };
        let listed = listed.replace("{kept}", &kept);
        let mut tx = self.pool.begin().await?;
        let indexes = sqlx::query(AssertSqlSafe(listed))
            .fetch_all(&mut *tx)
            .await?;
        for index in &indexes {
            let (name, definition): (String, String) = (index.try_get(0)?, index.try_get(1)?);
            // Postgres spells a partitioned table's index `ON ONLY` (the parent alone); built
            // again, it is to cover the partitions too.
            let definition = definition.replacen(" ON ONLY ", " ON ", 1);
            sqlx::query("INSERT INTO deferred_indexes (name, definition) VALUES ($1, $2)")
                .bind(&name)
                .bind(definition)
                .execute(&mut *tx)
                .await?;
            tx.execute(AssertSqlSafe(format!("DROP INDEX {name}")))
                .await?;
        }
        tx.commit().await?;
        if !indexes.is_empty() {
            tracing::info!(
                indexes = indexes.len(),
                version = self.version,
                "secondary indexes deferred"
            );
        }
        Ok(())
    }

    /// Creates the indexes [`ReadStore::defer_indexes`] dropped, one at a time.
    pub async fn restore_indexes(&self) -> Result<(), sqlx::Error> {
        let deferred = sqlx::query("SELECT name, definition FROM deferred_indexes ORDER BY name")
            .fetch_all(&self.pool)
            .await?;
        for index in deferred {
            let (name, definition): (String, String) = (index.try_get(0)?, index.try_get(1)?);
            let started = std::time::Instant::now();
            let mut tx = self.pool.begin().await?;
            tx.execute(AssertSqlSafe(definition)).await?;
            sqlx::query("DELETE FROM deferred_indexes WHERE name = $1")
                .bind(&name)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(index = %name, seconds = started.elapsed().as_secs_f64(), "index built");
        }
        Ok(())
    }

    /// The name of the deployment whose answer was response `response_id` of `tenant`.
    pub async fn response_deployment(
        &self,
        tenant: uuid::Uuid,
        response_id: &str,
    ) -> Result<Option<String>, sqlx::Error> {
        let row = sqlx::query(
            "SELECT deployment FROM llm_calls WHERE tenant_id = $1 AND response_id = $2 \
             AND status = 'ok' ORDER BY started_at DESC LIMIT 1",
        )
        .bind(tenant.to_string())
        .bind(response_id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| row.try_get::<String, _>(0)).transpose()
    }

    /// Closes the connections (SQLite checkpoints its write-ahead log).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// A row as `column=value` pairs, whatever the columns' types.
fn row_text(row: &AnyRow) -> Result<String, sqlx::Error> {
    let mut text = String::new();
    for (i, column) in row.columns().iter().enumerate() {
        let value = match row.try_get::<Option<i64>, _>(i) {
            Ok(v) => format!("{v:?}"),
            Err(_) => match row.try_get::<Option<String>, _>(i) {
                Ok(v) => format!("{v:?}"),
                Err(_) => match row.try_get::<Option<bool>, _>(i) {
                    Ok(v) => format!("{v:?}"),
                    Err(_) => format!("{:?}", row.try_get::<Option<Vec<u8>>, _>(i)?),
                },
            },
        };
        text.push_str(&format!("{}={value} ", column.name()));
    }
    Ok(text)
}

/// The Postgres schema of a version of the read models.
pub fn postgres_schema(version: u32) -> String {
    format!("loom_read_v{version}")
}

/// The SQLite file of a version of the read models.
pub fn sqlite_file(dir: &Path, version: u32) -> PathBuf {
    dir.join(format!("v{version}.sqlite"))
}

async fn connect_postgres(url: &str, version: u32) -> Result<AnyPool, StoreError> {
    let schema = postgres_schema(version);
    let set_path = format!("SET search_path TO {schema}; SET synchronous_commit = off");
    let pool = AnyPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(move |conn, _| {
            let set_path = set_path.clone();
            Box::pin(async move {
                conn.execute(AssertSqlSafe(set_path)).await?;
                Ok(())
            })
        })
        .connect(url)
        .await?;
    let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
    if pool.execute(AssertSqlSafe(create.clone())).await.is_err() {
        // Two processes creating it at once: one of them loses the race; it exists now.
        pool.execute(AssertSqlSafe(create)).await?;
    }
    Ok(pool)
}

async fn connect_sqlite(dir: &Path, version: u32, connections: u32) -> Result<AnyPool, StoreError> {
    std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
        context: format!("creating {}", dir.display()),
        source,
    })?;
    let url = format!("sqlite://{}?mode=rwc", sqlite_file(dir, version).display());
    let options = AnyConnectOptions::from_str(&url)?.disable_statement_logging();
    let pool = AnyPoolOptions::new()
        // One writer at a time is all SQLite has: a writer keeps to one connection.
        .max_connections(connections)
        .after_connect(|conn, _| {
            Box::pin(async move {
                // WAL: readers beside the writer. A 64 MiB page cache keeps the indexes of big
                // tables in memory (the default 2 MiB makes every batch read them from disk).
                conn.execute(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                     PRAGMA busy_timeout = 5000; PRAGMA cache_size = -65536;",
                )
                .await?;
                Ok(())
            })
        })
        .connect_with(options)
        .await?;
    Ok(pool)
}
