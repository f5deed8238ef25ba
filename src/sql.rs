//! `loom sql "SELECT …"`: SQL over the archive, as the operator, on a data directory (or an
//! archive on S3): every tenant's events, or one tenant's with `--tenant`; or through a running
//! server's `/v1/sql` with a key (`--url`).

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use arrow::ipc::reader::StreamReader;
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

    /// Query a running server's /v1/sql instead (e.g. http://127.0.0.1:8080), with --api-key.
    #[arg(long, env = "LOOM_URL", requires = "api_key")]
    url: Option<String>,

    /// With --url: a tenant's API key (reads its events) or the admin token (every tenant's).
    #[arg(long, env = "LOOM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// Only this tenant's events (default: every tenant's; `control_events` then too).
    #[arg(long, value_name = "TENANT_ID", conflicts_with = "url")]
    tenant: Option<Uuid>,

    /// How to print the rows.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    format: OutputFormat,

    /// Read the metadata columns only (no `record` column: no events whole, no bodies).
    #[arg(long, conflicts_with = "url")]
    metadata_only: bool,

    /// Rows printed at most (the rest are cut, with a note on stderr). With --url the server's
    /// limits apply instead, as do its timeout and memory.
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
    if let (Some(url), Some(key)) = (&args.url, &args.api_key) {
        return remote(url, key, &args).await;
    }
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
    let bytes = format::write(args.format.into(), &answer.schema, &answer.batches)?;
    print(&bytes, args.format, answer.rows, answer.truncated)?;
    if matches!(args.format, OutputFormat::Table) {
        writeln!(
            std::io::stderr(),
            "{} rows in {:.3}s",
            answer.rows,
            answer.elapsed.as_secs_f64()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

impl From<OutputFormat> for Format {
    fn from(format: OutputFormat) -> Format {
        match format {
            OutputFormat::Table => Format::Table,
            OutputFormat::Csv => Format::Csv,
            OutputFormat::Json => Format::Json,
            OutputFormat::Arrow => Format::Arrow,
        }
    }
}

/// Writes a result to stdout, and a note on stderr if rows were cut.
fn print(bytes: &[u8], format: OutputFormat, rows: usize, truncated: bool) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes)?;
    if matches!(format, OutputFormat::Json) {
        stdout.write_all(b"\n")?;
    }
    stdout.flush()?;
    if truncated {
        writeln!(
            std::io::stderr(),
            "note: only the first {rows} rows are shown (the row limit)"
        )?;
    }
    Ok(())
}

/// The query through a running server's `/v1/sql`: its limits and the key's scope apply.
async fn remote(url: &str, key: &str, args: &SqlArgs) -> anyhow::Result<ExitCode> {
    // A table is printed here from the Arrow answer; JSON is the server's rows as they come.
    let asked = match args.format {
        OutputFormat::Table | OutputFormat::Arrow => "arrow",
        OutputFormat::Csv => "csv",
        OutputFormat::Json => "json",
    };
    let url = format!("{}/v1/sql", url.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .post(&url)
        .bearer_auth(key)
        .json(&serde_json::json!({"query": args.query, "format": asked}))
        .send()
        .await
        .with_context(|| format!("calling {url}"))?;
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let rows: usize = header("x-loom-rows")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let truncated = header("x-loom-truncated").as_deref() == Some("true");
    let body = response.bytes().await?;
    if !status.is_success() {
        anyhow::bail!("{status}: {}", crate::admin::error_message(&body));
    }
    let bytes = match args.format {
        OutputFormat::Table => {
            let reader = StreamReader::try_new(std::io::Cursor::new(body), None)?;
            let schema = reader.schema();
            let batches = reader.collect::<Result<Vec<_>, _>>()?;
            format::write(Format::Table, &schema, &batches)?
        }
        OutputFormat::Json => {
            let answer: serde_json::Value = serde_json::from_slice(&body)?;
            serde_json::to_vec(&answer["rows"])?
        }
        OutputFormat::Csv | OutputFormat::Arrow => body.to_vec(),
    };
    print(&bytes, args.format, rows, truncated)?;
    Ok(ExitCode::SUCCESS)
}
