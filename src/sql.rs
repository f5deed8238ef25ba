//! `loom sql "SELECT …"`: SQL over the archive, as the operator, on a data directory (or an
//! archive on S3): every tenant's events, or one tenant's with `--tenant`.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, ValueEnum};
use loom_query::archive::{Access, Scope};
use loom_query::format::{self, Format};
use loom_query::sql::SqlLimits;
use uuid::Uuid;

use crate::{ArchiveArgs, DataDirArgs, KeyStoreArgs, master_key_from_env};

#[derive(Args)]
pub struct SqlArgs {
    /// The query: SELECT …, WITH …, VALUES … or EXPLAIN … over the tables `events`,
    /// `requests`, `llm_calls`, `tool_calls`, `quota_events`, `policy_findings` and
    /// `control_events` (see docs/query.md for their columns).
    query: String,

    /// Only this tenant's events (default: every tenant's; `control_events` then too).
    #[arg(long, value_name = "TENANT_ID")]
    tenant: Option<Uuid>,

    /// How to print the rows.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    format: OutputFormat,

    /// Read the metadata columns only (no `record` column: no events whole, no bodies).
    #[arg(long)]
    metadata_only: bool,

    /// Rows printed at most (the rest are cut, with a note on stderr).
    #[arg(long, default_value_t = 10_000)]
    max_rows: usize,

    /// Cancel the query after this long.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    timeout: Duration,

    /// Memory the query may hold before it spills to disk (MiB).
    #[arg(long, default_value_t = 1024)]
    memory_mib: usize,

    #[command(flatten)]
    data: DataDirArgs,

    #[command(flatten)]
    archive: ArchiveArgs,

    #[command(flatten)]
    key_store: KeyStoreArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum OutputFormat {
    Table,
    Csv,
    Json,
    /// Arrow IPC stream (binary).
    Arrow,
}

pub async fn run(args: SqlArgs) -> anyhow::Result<ExitCode> {
    let Some(location) = args.archive.location(&args.data)? else {
        anyhow::bail!("--archive off: there is no archive to query");
    };
    if let loom_projector::archive::ArchiveLocation::Directory(dir) = &location
        && !dir.exists()
    {
        anyhow::bail!(
            "no archive at {}: is --data-dir right (or give --archive)?",
            dir.display()
        );
    }
    let limits = SqlLimits {
        memory_bytes: args.memory_mib.max(1) << 20,
        timeout: args.timeout,
        max_rows: args.max_rows,
        max_bytes: usize::MAX,
        ..SqlLimits::default()
    };
    let service = loom::roles::sql_service(
        &args.data.dir(),
        master_key_from_env().as_ref(),
        &args.key_store.location(),
        &location,
        limits,
    )
    .await?;
    let scope = args.tenant.map_or(Scope::AllTenants, Scope::Tenant);
    let access = match args.metadata_only {
        true => Access::Metadata,
        false => Access::Full,
    };
    let answer = service.query(scope, access, &args.query).await?;
    let format = match args.format {
        OutputFormat::Table => Format::Table,
        OutputFormat::Csv => Format::Csv,
        OutputFormat::Json => Format::Json,
        OutputFormat::Arrow => Format::Arrow,
    };
    let bytes = format::write(format, &answer.schema, &answer.batches)?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&bytes)?;
    if format == Format::Json {
        stdout.write_all(b"\n")?;
    }
    stdout.flush()?;
    let mut stderr = std::io::stderr().lock();
    if answer.truncated {
        writeln!(
            stderr,
            "note: only the first {} rows are shown (--max-rows)",
            answer.rows
        )?;
    }
    if matches!(args.format, OutputFormat::Table) {
        writeln!(
            stderr,
            "{} rows in {:.3}s",
            answer.rows,
            answer.elapsed.as_secs_f64()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}
