//! Throw-away Postgres databases, for tests and benchmarks: created with a fresh name on a server
//! the caller may create databases on, and dropped when done.

use sqlx::PgPool;
use uuid::Uuid;

pub struct ScratchDatabase {
    admin: PgPool,
    /// `<prefix>_<uuid>`.
    pub name: String,
    /// The new database's URL.
    pub url: String,
}

impl ScratchDatabase {
    /// Creates a database named `<prefix>_<uuid>` through `admin_url`.
    pub async fn create(admin_url: &str, prefix: &str) -> Result<ScratchDatabase, sqlx::Error> {
        let admin = PgPool::connect(admin_url).await?;
        let name = format!("{prefix}_{}", Uuid::now_v7().simple());
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&admin)
            .await?;
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url, |(base, _)| base);
        Ok(ScratchDatabase {
            url: format!("{base}/{name}"),
            admin,
            name,
        })
    }

    /// Drops the database, closing whatever is still connected to it.
    pub async fn drop(self) -> Result<(), sqlx::Error> {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&self.admin)
            .await?;
        Ok(())
    }
}
