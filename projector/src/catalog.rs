//! Which version of the read models readers use (the active one) and which one a replay is
//! building. On Postgres: the table `public.loom_read_models`, plus a schema `loom_read` of views
//! onto the active version, so that SQL users need not know the version. On SQLite: the files
//! `ACTIVE` and `BUILDING` in the read-models directory. A switch is atomic either way (one
//! transaction; a file rename).

use loom_schemas::ExposeSecret;
use std::path::{Path, PathBuf};

use sqlx::any::AnyPoolOptions;
use sqlx::{Acquire, AnyPool, AssertSqlSafe, Executor, Row};

use crate::store::{StoreError, StoreLocation, postgres_schema};

/// The tables a version holds; `loom_read.<table>` views show the active version's.
pub const TABLES: [&str; 17] = [
    "positions",
    "dead_letters",
    "tenants",
    "projects",
    "api_keys",
    "role_bindings",
    "quota_limits",
    "traces",
    "llm_calls",
    "tool_calls",
    "trace_decisions",
    "trace_bodies",
    "rollup_applied",
    "usage_hourly",
    "usage_daily",
    "rollups",
    "rollups_since",
];

pub enum Catalog {
    Postgres(AnyPool),
    Sqlite(PathBuf),
}

impl Catalog {
    pub async fn open(location: &StoreLocation) -> Result<Catalog, StoreError> {
        sqlx::any::install_default_drivers();
        match location {
            StoreLocation::Postgres(url) => {
                let pool = AnyPoolOptions::new()
                    .max_connections(2)
                    .connect(url.expose_secret())
                    .await?;
                let create = "CREATE TABLE IF NOT EXISTS public.loom_read_models (
                                  id               SMALLINT PRIMARY KEY CHECK (id = 1),
                                  active_version   INTEGER NOT NULL,
                                  building_version INTEGER
                              )";
                if pool.execute(create).await.is_err() {
                    // Another process created it at the same moment; it exists now.
                    pool.execute(create).await?;
                }
                Ok(Catalog::Postgres(pool))
            }
            StoreLocation::Sqlite(dir) => {
                std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
                    context: format!("creating {}", dir.display()),
                    source,
                })?;
                Ok(Catalog::Sqlite(dir.clone()))
            }
        }
    }

    /// The version readers use (1 before any replay).
    pub async fn active(&self) -> Result<u32, StoreError> {
        Ok(self.read("active_version", "ACTIVE").await?.unwrap_or(1))
    }

    /// The version a replay is building, if one is under way (or was interrupted).
    pub async fn building(&self) -> Result<Option<u32>, StoreError> {
        self.read("building_version", "BUILDING").await
    }

    async fn read(&self, column: &str, file: &str) -> Result<Option<u32>, StoreError> {
        match self {
            Catalog::Postgres(pool) => {
                let row = sqlx::query(AssertSqlSafe(format!(
                    "SELECT CAST({column} AS BIGINT) FROM public.loom_read_models WHERE id = 1"
                )))
                .fetch_optional(pool)
                .await?;
                Ok(match row {
                    Some(row) => row
                        .try_get::<Option<i64>, _>(0)?
                        .and_then(|v| u32::try_from(v).ok()),
                    None => None,
                })
            }
            Catalog::Sqlite(dir) => match std::fs::read_to_string(dir.join(file)) {
                Ok(text) => Ok(text.trim().parse().ok()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(source) => Err(StoreError::Io {
                    context: format!("reading {}", dir.join(file).display()),
                    source,
                }),
            },
        }
    }

    /// Records that a replay builds `version` (so that an interrupted one resumes it).
    pub async fn set_building(&self, version: u32) -> Result<(), StoreError> {
        match self {
            Catalog::Postgres(pool) => {
                let active = self.active().await?;
                sqlx::query(
                    "INSERT INTO public.loom_read_models (id, active_version, building_version)
                     VALUES (1, $1, $2)
                     ON CONFLICT (id) DO UPDATE SET building_version = excluded.building_version",
                )
                .bind(i64::from(active))
                .bind(i64::from(version))
                .execute(pool)
                .await?;
                Ok(())
            }
            Catalog::Sqlite(dir) => write_atomically(&dir.join("BUILDING"), &version.to_string()),
        }
    }

    /// Makes `version` the one readers use, and ends the build.
    pub async fn switch_to(&self, version: u32) -> Result<(), StoreError> {
        match self {
            Catalog::Postgres(pool) => {
                let mut conn = pool.acquire().await?;
                let mut tx = conn.begin().await?;
                sqlx::query(
                    "INSERT INTO public.loom_read_models (id, active_version, building_version)
                     VALUES (1, $1, NULL)
                     ON CONFLICT (id) DO UPDATE
                     SET active_version = excluded.active_version, building_version = NULL",
                )
                .bind(i64::from(version))
                .execute(&mut *tx)
                .await?;
                create_views(&mut tx, version).await?;
                tx.commit().await?;
                Ok(())
            }
            Catalog::Sqlite(dir) => {
                write_atomically(&dir.join("ACTIVE"), &version.to_string())?;
                match std::fs::remove_file(dir.join("BUILDING")) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(StoreError::Io {
                        context: "removing BUILDING".into(),
                        source: e,
                    }),
                    _ => Ok(()),
                }
            }
        }
    }

    /// (Re)creates the `loom_read` views onto `version` (Postgres; nothing to do on SQLite).
    pub async fn publish(&self, version: u32) -> Result<(), StoreError> {
        if let Catalog::Postgres(pool) = self {
            let mut conn = pool.acquire().await?;
            let mut tx = conn.begin().await?;
            create_views(&mut tx, version).await?;
            tx.commit().await?;
        }
        Ok(())
    }
}

async fn create_views(conn: &mut sqlx::AnyConnection, version: u32) -> Result<(), sqlx::Error> {
    conn.execute("CREATE SCHEMA IF NOT EXISTS loom_read")
        .await?;
    let schema = postgres_schema(version);
    for table in TABLES {
        conn.execute(AssertSqlSafe(format!(
            "DROP VIEW IF EXISTS loom_read.{table};
             CREATE VIEW loom_read.{table} AS SELECT * FROM {schema}.{table}"
        )))
        .await?;
    }
    Ok(())
}

fn write_atomically(path: &Path, text: &str) -> Result<(), StoreError> {
    let io = |source| StoreError::Io {
        context: format!("writing {}", path.display()),
        source,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
