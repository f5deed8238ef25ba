//! `loom export TARGET`: the archived events as a Delta Lake table, as the operator, on a data
//! directory (or an archive on S3): every tenant's events, or one tenant's with `--tenant`; or
//! through a running server's `POST /v1/exports` with a key (`--url`), followed to its end.

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use loom_query::archive::Scope;
use loom_query::export::{Bodies, ProgressView, Report, Request, Target};
use loom_query::sql::SqlLimits;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{ArchiveArgs, DataDirArgs, KeyStoreArgs, master_key_from_env};

#[derive(Args)]
pub struct ExportArgs {
    /// The table: a directory or `s3://BUCKET/PREFIX` (reached with the --s3-* settings). With
    /// --url, the table's name under the server's export root (`lake/events`; default `events`).
    target: Option<String>,

    /// `omit` leaves prompts, completions and tool arguments out; `decrypt` writes them in
    /// clear (the lake then holds them unencrypted); `sealed` copies them still encrypted with
    /// Loom's keys. A table keeps the choice it was first written with.
    #[arg(long, value_enum, default_value_t = BodiesArg::Omit)]
    bodies: BodiesArg,

    /// Only this tenant's events (default: every tenant's).
    #[arg(long, value_name = "TENANT_ID", conflicts_with = "url")]
    tenant: Option<Uuid>,

    /// Export through a running server (e.g. http://127.0.0.1:8080) with --api-key: a tenant's
    /// key exports its events, the admin token every tenant's.
    #[arg(long, env = "LOOM_URL", requires = "api_key")]
    url: Option<String>,

    /// With --url: a tenant's API key or the admin token.
    #[arg(long, env = "LOOM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,

    /// Print what was exported as JSON (on stdout) instead of a summary.
    #[arg(long)]
    json: bool,

    /// No progress bar.
    #[arg(long)]
    quiet: bool,

    #[command(flatten)]
    data: DataDirArgs,

    #[command(flatten)]
    archive: ArchiveArgs,

    #[command(flatten)]
    key_store: KeyStoreArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum BodiesArg {
    Omit,
    Decrypt,
    Sealed,
}

impl From<BodiesArg> for Bodies {
    fn from(bodies: BodiesArg) -> Bodies {
        match bodies {
            BodiesArg::Omit => Bodies::Omit,
            BodiesArg::Decrypt => Bodies::Decrypt,
            BodiesArg::Sealed => Bodies::Sealed,
        }
    }
}

pub async fn run(args: ExportArgs) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let bar = progress_bar(args.quiet);
    let report = match (&args.url, &args.api_key) {
        (Some(url), Some(key)) => remote(url, key, &args, &bar).await?,
        _ => local(&args, &bar).await?,
    };
    bar.finish_and_clear();
    if args.json {
        writeln!(
            std::io::stdout(),
            "{}",
            serde_json::to_string_pretty(&report)?
        )?;
    } else {
        summarize(&mut std::io::stderr().lock(), &report, started.elapsed())?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn local(args: &ExportArgs, bar: &ProgressBar) -> anyhow::Result<Report> {
    let Some(target) = &args.target else {
        anyhow::bail!("name the table: `loom export DIR` or `loom export s3://BUCKET/PREFIX`");
    };
    let Some(location) = args.archive.location(&args.data)? else {
        anyhow::bail!("--archive off: there is no archive to export");
    };
    if let loom_projector::archive::ArchiveLocation::Directory(dir) = &location
        && !dir.exists()
    {
        anyhow::bail!(
            "no archive at {}: is --data-dir right (or give --archive)?",
            dir.display()
        );
    }
    let target = Target::parse(target, args.archive.s3_options())?;
    let exporter = loom::roles::exporter(
        &args.data.dir(),
        master_key_from_env().as_ref(),
        &args.key_store.location(),
        &location,
        SqlLimits::default(),
    )
    .await?;
    let request = Request {
        scope: args.tenant.map_or(Scope::AllTenants, Scope::Tenant),
        bodies: args.bodies.into(),
        target,
    };
    let progress = Arc::new(loom_query::export::Progress::default());
    let exporter = Arc::new(exporter);
    let exporting = exporter.run(request, Arc::clone(&progress));
    tokio::pin!(exporting);
    loop {
        tokio::select! {
            report = &mut exporting => return Ok(report?),
            () = tokio::time::sleep(Duration::from_millis(200)) => show(bar, progress.snapshot()),
        }
    }
}

/// The export through a server: started, then polled until it ends.
async fn remote(
    url: &str,
    key: &str,
    args: &ExportArgs,
    bar: &ProgressBar,
) -> anyhow::Result<Report> {
    let base = url.trim_end_matches('/');
    let client = reqwest::Client::new();
    let mut body = json!({"bodies": bodies_name(args.bodies)});
    if let Some(target) = &args.target {
        body["target"] = Value::from(target.as_str());
    }
    let started = client
        .post(format!("{base}/v1/exports"))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .with_context(|| format!("calling {base}/v1/exports"))?;
    let status = started.status();
    let bytes = started.bytes().await?;
    if !status.is_success() {
        anyhow::bail!("{status}: {}", crate::admin::error_message(&bytes));
    }
    let job: Value = serde_json::from_slice(&bytes)?;
    let id = job["id"].as_str().unwrap_or_default().to_owned();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let response = client
            .get(format!("{base}/v1/exports/{id}"))
            .bearer_auth(key)
            .send()
            .await
            .with_context(|| format!("calling {base}/v1/exports/{id}"))?;
        let status = response.status();
        let bytes = response.bytes().await?;
        if !status.is_success() {
            anyhow::bail!("{status}: {}", crate::admin::error_message(&bytes));
        }
        let job: Value = serde_json::from_slice(&bytes)?;
        if let Ok(progress) = serde_json::from_value::<Counts>(job["progress"].clone()) {
            show(bar, progress.into());
        }
        match job["status"].as_str() {
            Some("succeeded") => return Ok(serde_json::from_value(job["result"].clone())?),
            Some("failed") => anyhow::bail!(
                "the export failed: {}",
                job["error"].as_str().unwrap_or("(no reason given)")
            ),
            _ => {}
        }
    }
}

/// A job's progress as the API shows it.
#[derive(serde::Deserialize)]
struct Counts {
    rows_total: u64,
    rows_written: u64,
    tenants_total: u64,
    tenants_done: u64,
}

impl From<Counts> for ProgressView {
    fn from(c: Counts) -> ProgressView {
        ProgressView {
            rows_total: c.rows_total,
            rows_written: c.rows_written,
            tenants_total: c.tenants_total,
            tenants_done: c.tenants_done,
        }
    }
}

fn bodies_name(bodies: BodiesArg) -> &'static str {
    match bodies {
        BodiesArg::Omit => "omit",
        BodiesArg::Decrypt => "decrypt",
        BodiesArg::Sealed => "sealed",
    }
}

fn progress_bar(quiet: bool) -> ProgressBar {
    let target = match quiet {
        true => ProgressDrawTarget::hidden(),
        false => ProgressDrawTarget::stderr(),
    };
    let bar = ProgressBar::with_draw_target(None, target);
    bar.set_style(
        ProgressStyle::with_template(
            "export [{bar:40}] {human_pos}/{human_len} rows ({msg}), {per_sec}, ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}

fn show(bar: &ProgressBar, progress: ProgressView) {
    bar.set_length(progress.rows_total);
    bar.set_position(progress.rows_written);
    bar.set_message(format!(
        "tenant {}/{}",
        (progress.tenants_done + 1).min(progress.tenants_total),
        progress.tenants_total
    ));
}

fn summarize(out: &mut impl Write, report: &Report, took: Duration) -> std::io::Result<()> {
    let version = report
        .table_version
        .map_or_else(|| "none yet".to_owned(), |v| v.to_string());
    if report.commits.is_empty() {
        return writeln!(
            out,
            "nothing new to export to {} (table version {version})",
            report.target
        );
    }
    for commit in &report.commits {
        writeln!(
            out,
            "  tenant {}: {} rows in {} files (version {})",
            commit.tenant_id, commit.rows, commit.files, commit.version
        )?;
    }
    writeln!(
        out,
        "exported {} rows of {} tenants to {} in {:.1}s (table version {version})",
        report.rows,
        report.commits.len(),
        report.target,
        took.as_secs_f64()
    )?;
    if report.bodies_unopened > 0 {
        writeln!(
            out,
            "note: {} bodies could not be opened (a key rotated away or a record that does not \
             decode): they are null",
            report.bodies_unopened
        )?;
    }
    Ok(())
}
