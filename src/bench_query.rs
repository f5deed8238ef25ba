//! `loom bench query`: analytics over the archive. A generator writes `llm_call.completed` events
//! (Zipf-distributed tenants, 50 models over 5 providers, a month of traffic) into an embedded
//! log, the archiver archives them as Loom's encrypted Parquet, and the same rows are written as
//! plaintext Parquet. Then the analytics queries run through Loom's SQL service (every tenant,
//! encrypted files), through DataFusion on the plaintext files (the cost of encryption), and
//! through DuckDB (PyPI `duckdb`) on the plaintext files: the best plain alternative.
//!
//! Cold is a query's first run in a fresh service (DuckDB: a fresh connection), with the files
//! in the OS page cache as the archiver left them; hot is the median of `--runs` runs after it.
//! A server's first run is the first run in a fresh service that has read the manifests and
//! footers ahead, as `loom serve` and `loom query` do as they start.
//!
//! Then small queries through the SQL service (queries/s), trace lookups from the archive, the
//! export, and the read models at the same scale (as many requests written into SQLite): the
//! analytics' latency and trace lookups from them. These run in process, without HTTP.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{
    ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl,
};
use datafusion::prelude::SessionContext;
use loom_projector::archive::keys::ArchiveKeys;
use loom_projector::archive::manifest::tenant_dir;
use loom_projector::archive::{Archive, ArchiveConfig, ArchiveLocation, Archiver, file};
use loom_projector::{ReadStore, StoreLocation};
use loom_query::analytics::{Analytics, Dimension, Filters, Question, Unit, Window};
use loom_query::archive::{Access, Scope};
use loom_query::export::{Bodies, Exporter, Request, Target};
use loom_query::sql::{SqlLimits, SqlService};
use loom_query::traces::Traces;
use loom_schemas::codec::Registry;
use loom_schemas::event::{CallStatus, Envelope, Event, LlmCallCompleted};
use loom_schemas::keystore::KeyStore;
use loom_schemas::log::{Log, Topic};
use object_store::ObjectStoreExt as _;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bench::say;

#[derive(clap::Args)]
pub struct QueryBenchArgs {
    /// `llm_call.completed` events generated and archived.
    #[arg(long, default_value_t = 10_000_000)]
    events: usize,
    /// Tenants (Zipf-distributed: the first has the most traffic).
    #[arg(long, default_value_t = 20)]
    tenants: usize,
    /// Hot runs of each query (the median counts).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// A Python with the `duckdb` package (`./infra/bench.sh query` makes one).
    #[arg(long, env = "LOOM_BENCH_PYTHON", default_value = "python3")]
    python: String,
    /// Where the log, the archive and the plaintext files go (a temporary directory inside it
    /// is removed).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: std::path::PathBuf,
}

/// The days of traffic generated.
const DAYS: i64 = 30;

/// The analytics queries: a name, Loom's (DataFusion's) SQL, and DuckDB's where it differs.
fn queries(end_us: i64) -> Vec<(&'static str, String, String)> {
    let week = 7 * 86_400_000_000_i64;
    let (split, from) = (end_us - week, end_us - 2 * week);
    let same = |sql: &str| (sql.to_owned(), sql.to_owned());
    let calls = "FROM events WHERE event_type = 'llm_call.completed'";
    let list = [
        (
            "count by model",
            same(&format!(
                "SELECT model, count(*) AS calls {calls} GROUP BY model ORDER BY calls DESC, model"
            )),
        ),
        (
            "cost by day",
            same(&format!(
                "SELECT date_trunc('day', occurred_at) AS day, sum(cost_micro_usd) AS cost \
                 {calls} GROUP BY 1 ORDER BY 1"
            )),
        ),
        (
            "p95 latency by model",
            (
                format!(
                    "SELECT model, approx_percentile_cont(latency_us, 0.95) AS p95 {calls} \
                     GROUP BY model ORDER BY model"
                ),
                format!(
                    "SELECT model, approx_quantile(latency_us, 0.95) AS p95 {calls} \
                     GROUP BY model ORDER BY model"
                ),
            ),
        ),
        (
            "top 10 by cost",
            same(&format!(
                "SELECT trace_id, model, cost_micro_usd {calls} \
                 ORDER BY cost_micro_usd DESC, trace_id LIMIT 10"
            )),
        ),
        (
            "error rate by model and provider",
            same(&format!(
                "SELECT model, provider, count(*) AS calls, \
                 avg(CASE WHEN status = 'ok' THEN 0.0 ELSE 1.0 END) AS error_rate \
                 {calls} GROUP BY model, provider ORDER BY error_rate DESC, model"
            )),
        ),
        (
            "% change vs previous week",
            (
                format!(
                    "SELECT model, sum(CASE WHEN CAST(occurred_at AS BIGINT) >= {split} \
                     THEN cost_micro_usd ELSE 0 END) AS this_week, \
                     sum(CASE WHEN CAST(occurred_at AS BIGINT) < {split} \
                     THEN cost_micro_usd ELSE 0 END) AS last_week {calls} \
                     AND CAST(occurred_at AS BIGINT) >= {from} GROUP BY model ORDER BY model"
                ),
                format!(
                    "SELECT model, sum(CASE WHEN epoch_us(occurred_at) >= {split} \
                     THEN cost_micro_usd ELSE 0 END) AS this_week, \
                     sum(CASE WHEN epoch_us(occurred_at) < {split} \
                     THEN cost_micro_usd ELSE 0 END) AS last_week {calls} \
                     AND epoch_us(occurred_at) >= {from} GROUP BY model ORDER BY model"
                ),
            ),
        ),
    ];
    list.into_iter()
        .map(|(name, (loom, duck))| (name, loom, duck))
        .collect()
}

use crate::bench_archive::cpu_seconds;

/// Seconds of a query's cold run, its hot runs' median, and the CPU seconds of a hot run.
#[derive(Debug, Clone, Copy, Default)]
struct Timing {
    cold: f64,
    hot: f64,
    cpu: f64,
    rows: usize,
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

pub async fn run(args: QueryBenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(&args.dir)?;
    let (keys, data_keys, log) = crate::bench_archive::scratch(dir.path(), args.tenants).await?;
    let tenants: Vec<Uuid> = data_keys.iter().map(|k| k.tenant_id).collect();
    let end_us = loom_schemas::event::now_micros();
    let started = Instant::now();
    let sample = generate(log.as_ref(), args.events, &tenants, end_us).await?;
    say!(
        "history: {} llm_call.completed events of {} tenants over {DAYS} days, written in {:.1}s",
        args.events,
        tenants.len(),
        started.elapsed().as_secs_f64()
    );

    let archive = Archive::open(&ArchiveLocation::Directory(dir.path().join("archive")))?;
    let archiver = Arc::new(Archiver::new(
        archive.clone(),
        Arc::clone(&log),
        Arc::clone(&keys),
        ArchiveConfig {
            compaction: None,
            ..ArchiveConfig::default()
        },
    ));
    let started = Instant::now();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let (archiver, shutdown) = (Arc::clone(&archiver), shutdown.clone());
        async move { archiver.run(shutdown).await }
    });
    while archiver.records_read() < args.events as u64 && !running.is_finished() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.cancel();
    running.await??;
    drop(log);
    let plain = dir.path().join("plain");
    let (files, bytes, plain_bytes) = plaintext_copy(&archive, &keys, &plain).await?;
    say!(
        "archive: {files} encrypted files, {:.0} MB ({:.1}s); plaintext copy {:.0} MB",
        bytes as f64 / 1e6,
        started.elapsed().as_secs_f64(),
        plain_bytes as f64 / 1e6
    );

    let queries = queries(end_us);
    let limits = SqlLimits {
        timeout: Duration::from_secs(600),
        memory_bytes: 2 << 30,
        ..SqlLimits::default()
    };
    // Loom: the SQL service over the encrypted archive, as the operator.
    let (mut loom, mut first, mut warm_up) = (Vec::new(), Vec::new(), Vec::new());
    for (_, sql, _) in &queries {
        let service = SqlService::new(archive.clone(), Arc::clone(&keys), limits.clone())?;
        let run = async || -> anyhow::Result<(f64, usize)> {
            let started = Instant::now();
            let answer = service.query(Scope::AllTenants, Access::Full, sql).await?;
            Ok((started.elapsed().as_secs_f64(), answer.rows))
        };
        let (cold, rows) = run().await?;
        let (mut hot, cpu) = (Vec::new(), cpu_seconds());
        for _ in 0..args.runs.max(1) {
            hot.push(run().await?.0);
        }
        loom.push(Timing {
            cold,
            hot: median(hot),
            cpu: (cpu_seconds() - cpu) / args.runs.max(1) as f64,
            rows,
        });
        // A server's first run of it: the service read manifests and footers as it started.
        let service = SqlService::new(archive.clone(), Arc::clone(&keys), limits.clone())?;
        let started = Instant::now();
        service.warm().await?;
        warm_up.push(started.elapsed().as_secs_f64());
        let started = Instant::now();
        service.query(Scope::AllTenants, Access::Full, sql).await?;
        first.push(started.elapsed().as_secs_f64());
    }
    // DataFusion on the plaintext files: what the encryption costs.
    let mut plain_df = Vec::new();
    for (_, sql, _) in &queries {
        let ctx = plaintext_session(&plain).await?;
        let run = async || -> anyhow::Result<(f64, usize)> {
            let started = Instant::now();
            let batches = ctx.sql(sql).await?.collect().await?;
            Ok((
                started.elapsed().as_secs_f64(),
                batches.iter().map(|b| b.num_rows()).sum(),
            ))
        };
        let (cold, rows) = run().await?;
        let (mut hot, cpu) = (Vec::new(), cpu_seconds());
        for _ in 0..args.runs.max(1) {
            hot.push(run().await?.0);
        }
        plain_df.push(Timing {
            cold,
            hot: median(hot),
            cpu: (cpu_seconds() - cpu) / args.runs.max(1) as f64,
            rows,
        });
    }
    let duck = duckdb(&args.python, &plain, &queries, args.runs.max(1))
        .await
        .context("running DuckDB (./infra/bench.sh query installs it; or --python)")?;

    say!(
        "\n{:<34} {:>9} {:>9} {:>9} {:>10} {:>9} {:>9} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "query (seconds)",
        "loom cold",
        "loom 1st",
        "loom hot",
        "plain hot",
        "duck cold",
        "duck hot",
        "hot ×",
        "cold ×",
        "1st ×",
        "loom CPU",
        "duck CPU"
    );
    let (mut hot_ratios, mut cold_ratios, mut plain_ratios) = (Vec::new(), Vec::new(), Vec::new());
    let mut first_ratios = Vec::new();
    for ((((name, _, _), l), (p, d)), first) in queries
        .iter()
        .zip(&loom)
        .zip(plain_df.iter().zip(&duck))
        .zip(&first)
    {
        let (hot, cold, first_ratio) = (l.hot / d.hot, l.cold / d.cold, first / d.cold);
        hot_ratios.push(hot);
        cold_ratios.push(cold);
        first_ratios.push(first_ratio);
        plain_ratios.push(l.hot / p.hot);
        let rows = if l.rows == d.rows && l.rows == p.rows {
            String::new()
        } else {
            format!(
                "  rows differ: loom {}, plain {}, duckdb {}",
                l.rows, p.rows, d.rows
            )
        };
        say!(
            "{name:<34} {:>9.3} {:>9.3} {:>9.3} {:>10.3} {:>9.3} {:>9.3} {:>7.2}x {:>7.2}x {:>7.2}x {:>9.3} {:>9.3}{rows}",
            l.cold,
            first,
            l.hot,
            p.hot,
            d.cold,
            d.hot,
            hot,
            cold,
            first_ratio,
            l.cpu,
            d.cpu
        );
    }
    let geomean = |ratios: &[f64]| {
        (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len().max(1) as f64).exp()
    };
    say!(
        "\ngeomean, Loom ÷ DuckDB: hot {:.2}x, cold {:.2}x, a server's 1st run {:.2}x (target: ≤ 1.5x); \
         encrypted ÷ plaintext (both DataFusion, hot): {:.2}x",
        geomean(&hot_ratios),
        geomean(&cold_ratios),
        geomean(&first_ratios),
        geomean(&plain_ratios)
    );
    say!(
        "(a server's 1st run: the first run in a fresh service after its start-up read of the \
         manifests and footers, which took {:.2}s; DuckDB's cold run is its ratio's base)",
        median(warm_up)
    );
    say!(
        "(CPU: seconds of CPU per hot run, all threads; the machine has {} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    // A server's SQL service: it reads the manifests and footers as it starts.
    let sql = Arc::new(SqlService::new(archive.clone(), Arc::clone(&keys), limits)?);
    let started = Instant::now();
    let warmed = sql.warm().await?;
    say!(
        "\nSQL service start: {} tenants' manifests and {} files' footers read in {:.2}s",
        warmed.tenants,
        warmed.footers,
        started.elapsed().as_secs_f64()
    );
    sql_rate(&sql, tenants[0]).await?;
    archived_lookups(dir.path(), &keys, &sql, &sample).await?;
    export(
        &args.python,
        dir.path(),
        &plain,
        Arc::clone(&sql),
        Arc::clone(&keys),
    )
    .await?;
    read_models(&args, dir.path(), &tenants, end_us, &keys, &sql).await
}

/// The archive exported to a Delta table (bodies omitted) by Loom, then again with nothing new;
/// and DuckDB's `COPY … PARTITION_BY (tenant_id, date)` of the plaintext files to Parquet, the
/// plain alternative.
async fn export(
    python: &str,
    dir: &Path,
    plain: &Path,
    sql: Arc<SqlService>,
    keys: Arc<KeyStore>,
) -> anyhow::Result<()> {
    let lake = dir.join("lake");
    let target = Target::parse(&lake.display().to_string(), Default::default())?;
    let exporter = Arc::new(Exporter::new(sql, keys));
    let request = Request {
        scope: Scope::AllTenants,
        bodies: Bodies::Omit,
        target,
    };
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let report = exporter.run(request.clone(), Arc::default()).await?;
    let (took, cpu) = (started.elapsed().as_secs_f64(), cpu_seconds() - cpu);
    let again = Instant::now();
    let second = exporter.run(request, Arc::default()).await?;
    let again = again.elapsed().as_secs_f64();
    say!(
        "\nexport to Delta Lake (bodies omitted), {} rows:\n  loom export   {:>6.1}s  {:>9.0} rows/s  \
         {:>5.2} µs CPU/row  {:>5.0} MB  {} commits; again with nothing new: {:.2}s ({} rows)",
        report.rows,
        took,
        report.rows as f64 / took,
        cpu / report.rows.max(1) as f64 * 1e6,
        dir_bytes(&lake) as f64 / 1e6,
        report.commits.len(),
        again,
        second.rows
    );
    const SCRIPT: &str = r#"
import duckdb, json, sys, time
spec = json.loads(sys.stdin.read())
con = duckdb.connect(); con.execute('SET enable_progress_bar = false')
t, cpu = time.perf_counter(), time.process_time()
con.execute(f"""COPY (SELECT * EXCLUDE (record, trace_digest), strftime(occurred_at, '%Y-%m-%d') AS date
    FROM read_parquet('{spec['plain']}/**/*.parquet', hive_partitioning = true))
    TO '{spec['out']}' (FORMAT parquet, PARTITION_BY (tenant_id, date), COMPRESSION zstd)""")
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": time.process_time() - cpu}))
"#;
    let out = dir.join("duck-lake");
    let spec = json!({"plain": plain.display().to_string(), "out": out.display().to_string()});
    let duck = run_python(python, SCRIPT, &spec)
        .await
        .context("DuckDB's COPY")?;
    let seconds = duck["seconds"].as_f64().unwrap_or(f64::NAN);
    say!(
        "  duckdb COPY   {:>6.1}s  {:>9.0} rows/s  {:>5.2} µs CPU/row  {:>5.0} MB  (plaintext in, \
         no transaction log, not incremental)",
        seconds,
        report.rows as f64 / seconds,
        duck["cpu"].as_f64().unwrap_or(f64::NAN) / report.rows.max(1) as f64 * 1e6,
        dir_bytes(&out) as f64 / 1e6,
    );
    Ok(())
}

/// The bytes of the files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => dir_bytes(&entry.path()),
            _ => entry.metadata().map_or(0, |m| m.len()),
        })
        .sum()
}

/// Latency percentiles of `values` (seconds), as `p50 / p99` in ms.
fn percentiles(mut values: Vec<f64>) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        crate::bench::percentile(&values, 0.5) * 1e3,
        crate::bench::percentile(&values, 0.9) * 1e3,
        crate::bench::percentile(&values, 0.99) * 1e3,
        values.last().copied().unwrap_or(f64::NAN) * 1e3
    )
}

/// Small queries through the SQL service, two at a time (the per-tenant limit), for 10 s.
async fn sql_rate(sql: &Arc<SqlService>, tenant: Uuid) -> anyhow::Result<()> {
    say!("");
    for (name, query) in [
        ("SELECT 1", "SELECT 1 AS one"),
        (
            "one model's calls in the last hour",
            "SELECT count(*) AS n FROM llm_calls WHERE model = 'model-07' \
             AND occurred_at >= now() - INTERVAL '1 hour'",
        ),
    ] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let cpu = cpu_seconds();
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let sql = Arc::clone(sql);
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    while Instant::now() < deadline {
                        let started = Instant::now();
                        sql.query(Scope::Tenant(tenant), Access::Full, query)
                            .await?;
                        latencies.push(started.elapsed().as_secs_f64());
                    }
                    anyhow::Ok(latencies)
                })
            })
            .collect();
        let mut latencies = Vec::new();
        for worker in workers {
            latencies.extend(worker.await??);
        }
        let queries = latencies.len();
        say!(
            "/v1/sql ({name}), 2 at a time: {:.1} queries/s, {}, {:.1} ms CPU per query",
            queries as f64 / 10.0,
            percentiles(latencies),
            (cpu_seconds() - cpu) * 1e3 / queries.max(1) as f64
        );
    }
    Ok(())
}

/// The read models at the bench's scale: `--events` requests written straight into SQLite's
/// `traces` and `llm_calls` (what a fold of as many requests writes, without folding them),
/// then the analytics and trace lookups over them, and trace lookups in the archive.
async fn read_models(
    args: &QueryBenchArgs,
    dir: &Path,
    tenants: &[Uuid],
    end_us: i64,
    keys: &Arc<KeyStore>,
    sql: &Arc<SqlService>,
) -> anyhow::Result<()> {
    let location = StoreLocation::Sqlite(dir.join("read-models"));
    let store = ReadStore::open(&location, 1).await?;
    let started = Instant::now();
    fill_read_models(&store, args.events, tenants, end_us).await?;
    say!(
        "\nread models: {} requests written into SQLite in {:.1}s",
        args.events,
        started.elapsed().as_secs_f64()
    );
    store.close().await;
    let analytics = Analytics::new(location.clone());
    let biggest = Scope::Tenant(tenants[0]);
    let window = |days: i64| Window {
        from_us: end_us - days * 86_400_000_000,
        to_us: end_us,
    };
    let question = |days| Question {
        scope: biggest,
        window: window(days),
        filters: Filters::default(),
    };
    let all_metrics: Vec<&str> = loom_query::analytics::METRICS.to_vec();
    for (name, days) in [("24h", 1), ("7d", 7), ("30d", 30)] {
        let q = question(days);
        let mut times = Vec::new();
        let mut requests = 0;
        for _ in 0..args.runs.max(1) {
            let started = Instant::now();
            let (now, _) = analytics.summary(&q).await?;
            times.push(started.elapsed().as_secs_f64());
            requests = now.requests;
        }
        say!(
            "summary, biggest tenant, {name} ({requests} requests + the window before): {}",
            percentiles(times)
        );
    }
    let mut times = Vec::new();
    for _ in 0..args.runs.max(1) {
        let started = Instant::now();
        analytics
            .series(&question(7), Unit::Hour, chrono_tz::Tz::UTC, &all_metrics)
            .await?;
        times.push(started.elapsed().as_secs_f64());
    }
    say!(
        "timeseries, biggest tenant, 7d by hour: {}",
        percentiles(times)
    );
    let mut times = Vec::new();
    for _ in 0..args.runs.max(1) {
        let started = Instant::now();
        analytics
            .breakdown(&question(30), Dimension::Model, &all_metrics, 50)
            .await?;
        times.push(started.elapsed().as_secs_f64());
    }
    say!(
        "breakdown by model, biggest tenant, 30d: {}",
        percentiles(times)
    );

    // Trace lookups, fresh from the read models.
    let traces = Traces::new(location, Arc::clone(keys), Some(Arc::clone(sql)));
    let mut rng = fastrand::Rng::with_seed(5);
    let mut times = Vec::new();
    for _ in 0..500 {
        let i = rng.usize(..args.events.max(1));
        let tenant = tenants[tenant_of(i, tenants.len())];
        let started = Instant::now();
        let found = traces
            .timeline(Scope::Tenant(tenant), Access::Full, &format!("t{i:010}"))
            .await?;
        times.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(found.is_some(), "trace t{i:010} not found");
    }
    say!(
        "trace lookup, read models (500 random traces): {} (target: p99 < 5 ms)",
        percentiles(times)
    );
    Ok(())
}

/// How many archived traces are looked up.
const LOOKUPS: usize = 200;

/// Trace lookups from the archive alone (read models that hold none), by a server's SQL service.
async fn archived_lookups(
    dir: &Path,
    keys: &Arc<KeyStore>,
    sql: &Arc<SqlService>,
    sample: &[(Uuid, String)],
) -> anyhow::Result<()> {
    let empty = StoreLocation::Sqlite(dir.join("no-read-models"));
    ReadStore::open(&empty, 1).await?.close().await;
    let archived = Traces::new(empty, Arc::clone(keys), Some(Arc::clone(sql)));
    let mut times = Vec::new();
    for (tenant, trace) in sample.iter().step_by((sample.len() / LOOKUPS).max(1)) {
        let started = Instant::now();
        let found = archived
            .timeline(Scope::Tenant(*tenant), Access::Full, trace)
            .await?;
        times.push(started.elapsed().as_secs_f64());
        anyhow::ensure!(
            found.is_some_and(|t| t.source == "archive"),
            "trace {trace} not found in the archive"
        );
    }
    say!(
        "trace lookup, archive ({} traces, by keyed digest in the day's files): {} (target: p99 < 50 ms)",
        times.len(),
        percentiles(times)
    );
    Ok(())
}

/// Which tenant request `i` of the synthetic read models is of: Zipf-like, from a table of
/// 1000 slots (the first tenant the most).
fn tenant_of(i: usize, tenants: usize) -> usize {
    slots(tenants)[(i * 7) % 1000]
}

fn slots(tenants: usize) -> Vec<usize> {
    let weights: Vec<f64> = (0..tenants)
        .map(|k| 1.0 / ((k + 1) as f64).powf(1.1))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut slots = Vec::with_capacity(1000);
    let mut sum = 0.0;
    for (k, w) in weights.iter().enumerate() {
        sum += w / total;
        while slots.len() < 1000 && (slots.len() as f64) < sum * 1000.0 {
            slots.push(k);
        }
    }
    slots.resize(1000, tenants.saturating_sub(1));
    slots
}

/// Writes `n` requests (a trace and an upstream call each) over the last 30 days into the
/// read models, in SQL, the way a fold would leave them.
pub(crate) async fn fill_read_models(
    store: &ReadStore,
    n: usize,
    tenants: &[Uuid],
    end_us: i64,
) -> anyhow::Result<()> {
    use sqlx::Executor;
    let pool = store.pool();
    pool.execute("CREATE TABLE bench_slots (slot INTEGER PRIMARY KEY, tenant TEXT NOT NULL)")
        .await?;
    for (slot, k) in slots(tenants.len()).iter().enumerate() {
        sqlx::query("INSERT INTO bench_slots (slot, tenant) VALUES ($1, $2)")
            .bind(slot as i64)
            .bind(tenants[*k].to_string())
            .execute(pool)
            .await?;
    }
    let span = DAYS * 86_400_000_000;
    let start = end_us - span;
    let step = span / n.max(1) as i64;
    let providers = "CASE (i % 50) % 5 WHEN 0 THEN 'openai' WHEN 1 THEN 'anthropic' \
                     WHEN 2 THEN 'azure' WHEN 3 THEN 'bedrock' ELSE 'vllm' END";
    let fill = format!(
        "WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < {last}), \
         r AS (SELECT i, abs(random()) AS x, abs(random()) AS y FROM n) \
         INSERT INTO traces (tenant_id, trace_id, project_id, user_id, api_key_id, endpoint, \
             stream, model_requested, model_served, provider, deployment, status, http_status, \
             error_class, latency_us, ttft_us, overhead_us, tokens_in, tokens_out, tokens_cached, \
             cost_micro_usd, policy_action, policy_findings, attempts, started_at, completed_at) \
         SELECT s.tenant, printf('t%010d', i), 'project-' || (i % 3), 'user-' || (i % 40), \
             'key-' || (i % 5), '/v1/chat/completions', i % 2, 'alias-' || (i % 10), \
             printf('model-%02d', i % 50), {providers}, {providers} || '-' || (i % 3), \
             CASE WHEN x % 100 < 4 THEN 'error' ELSE 'ok' END, \
             CASE WHEN x % 100 < 4 THEN 502 ELSE 200 END, \
             CASE WHEN x % 100 < 4 THEN 'upstream_error' END, \
             50000 + y % 3000000, CASE WHEN i % 2 = 1 THEN 20000 + y % 500000 END, 300 + x % 700, \
             50 + x % 2000, 10 + y % 800, (x % 3) * 64, (50 + x % 2000) * 2 + (10 + y % 800) * 8, \
             'allow', 0, 1, {start} + i * {step}, {start} + i * {step} + 50000 + y % 3000000 \
         FROM r JOIN bench_slots s ON s.slot = (i * 7) % 1000",
        last = n.saturating_sub(1)
    );
    pool.execute(sqlx::AssertSqlSafe(fill)).await?;
    pool.execute(
        "INSERT INTO llm_calls (event_id, tenant_id, trace_id, attempt, deployment, provider, \
             model, status, http_status, error_class, stream, started_at, latency_us, ttft_us, \
             tokens_in, tokens_out, tokens_cached, cost_micro_usd, usage_estimated) \
         SELECT 'e' || trace_id, tenant_id, trace_id, 1, deployment, provider, model_served, \
             status, http_status, error_class, stream, started_at, latency_us, ttft_us, tokens_in, \
             tokens_out, tokens_cached, cost_micro_usd, 0 FROM traces",
    )
    .await?;
    pool.execute("DROP TABLE bench_slots").await?;
    // The analytics rollups a fold keeps as requests complete, a tenant's day at a time.
    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    for tenant in tenants {
        for day in 0..DAYS {
            let from = start + day * 86_400_000_000;
            let to = from + 86_400_000_000;
            let tenant = tenant.to_string();
            loom_projector::rollups::roll_up_traces(&mut conn, &tenant, from, to).await?;
        }
    }
    drop(conn);
    say!(
        "rollups of {n} requests written in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    pool.execute("ANALYZE").await?;
    Ok(())
}

/// Writes `n` `llm_call.completed` events ending at `end_us` into the log; returns the tenant
/// and trace id of every 1000th.
async fn generate(
    log: &dyn Log,
    n: usize,
    tenants: &[Uuid],
    end_us: i64,
) -> anyhow::Result<Vec<(Uuid, String)>> {
    const PROVIDERS: [&str; 5] = ["openai", "anthropic", "azure", "bedrock", "vllm"];
    let registry = Registry::builtin()?;
    let mut rng = fastrand::Rng::with_seed(13);
    // Zipf (s = 1.1) over the tenants.
    let weights: Vec<f64> = (0..tenants.len())
        .map(|k| 1.0 / ((k + 1) as f64).powf(1.1))
        .collect();
    let total: f64 = weights.iter().sum();
    let cumulative: Vec<f64> = weights
        .iter()
        .scan(0.0, |sum, w| {
            *sum += w / total;
            Some(*sum)
        })
        .collect();
    let span = DAYS * 86_400_000_000;
    let mut batch = Vec::with_capacity(5_000);
    let mut sample = Vec::new();
    for i in 0..n {
        let at = end_us - span + (span as f64 * i as f64 / n as f64) as i64;
        let tenant = tenants[cumulative
            .partition_point(|c| *c < rng.f64())
            .min(tenants.len() - 1)];
        let model = rng.usize(..50);
        let provider = PROVIDERS[model % PROVIDERS.len()];
        // Log-normal latency around 800 ms; models fail at 1–10 %.
        let normal = (-2.0 * rng.f64().max(1e-12).ln()).sqrt()
            * (2.0 * std::f64::consts::PI * rng.f64()).cos();
        let latency_us = (800_000.0 * (0.6 * normal).exp()) as i64;
        let ok = rng.f64() >= 0.01 + 0.09 * (model % 10) as f64 / 9.0;
        let (tokens_in, tokens_out) = (rng.i64(50..2_000), rng.i64(10..800));
        let price = 1 + (model % 7) as i64;
        let seconds = u64::try_from(at / 1_000_000).unwrap_or(0);
        let trace = Uuid::new_v7(uuid::Timestamp::from_unix(uuid::NoContext, seconds, 0));
        if i % 1000 == 0 {
            sample.push((tenant, trace.to_string()));
        }
        let mut envelope = Envelope::new(tenant, Some(trace.to_string()), "bench/query/1");
        envelope.occurred_at = at;
        let event = Event {
            envelope,
            payload: LlmCallCompleted {
                attempt: 1,
                deployment: format!("{provider}-{}", model % 3),
                provider: provider.into(),
                model: format!("model-{model:02}"),
                status: if ok {
                    CallStatus::Ok
                } else {
                    CallStatus::Error
                },
                http_status: Some(if ok { 200 } else { 500 }),
                error_class: (!ok).then(|| "upstream_error".to_owned()),
                stream: rng.bool(),
                started_at: at - latency_us,
                latency_us,
                ttft_us: Some(latency_us / 4),
                tokens_in: ok.then_some(tokens_in),
                tokens_out: ok.then_some(tokens_out),
                tokens_cached_read: ok.then_some(0),
                tokens_cache_creation: None,
                usage_estimated: false,
                cost_micro_usd: ok.then_some(price * (tokens_in + 4 * tokens_out) / 10),
                cache_saved_micro_usd: None,
                response_id: None,
                request_body: None,
                response_body: None,
                dropped_fields: Vec::new(),
            }
            .into(),
        };
        batch.push(registry.encode_record(&event)?);
        if batch.len() == batch.capacity() {
            log.append(Topic::Data, std::mem::take(&mut batch)).await?;
            batch.reserve(5_000);
        }
    }
    if !batch.is_empty() {
        log.append(Topic::Data, batch).await?;
    }
    Ok(sample)
}

/// The archive's files decrypted and written again as plaintext Parquet under `to` (same
/// layout, same row groups): files, encrypted bytes, plaintext bytes.
async fn plaintext_copy(
    archive: &Archive,
    keys: &Arc<KeyStore>,
    to: &Path,
) -> anyhow::Result<(usize, u64, u64)> {
    let (mut files, mut bytes, mut plain_bytes) = (0, 0, 0);
    for tenant in archive.tenants().await? {
        let manifest = archive.manifest(tenant).await?;
        for path in manifest.files.keys() {
            let location = object_store::path::Path::from(format!(
                "{}/{path}",
                tenant_dir(&archive.root, tenant)
            ));
            let data = archive.store.get(&location).await?.bytes().await?;
            bytes += data.len() as u64;
            let reader = ArchiveKeys::full(Arc::clone(keys), tenant);
            let batches =
                tokio::task::spawn_blocking(move || file::read(data, reader, None)).await??;
            let written = file::write_plaintext(&batches)?;
            plain_bytes += written.len() as u64;
            let target = to.join(format!("tenant_id={tenant}")).join(path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            std::fs::write(&target, written)?;
            files += 1;
        }
    }
    Ok((files, bytes, plain_bytes))
}

/// A DataFusion session with the plaintext files under `dir` as table `events`.
async fn plaintext_session(dir: &Path) -> anyhow::Result<SessionContext> {
    let ctx = SessionContext::new();
    let url = ListingTableUrl::parse(format!("{}/", dir.display()))?;
    let options =
        ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let schema = options.infer_schema(&ctx.state(), &url).await?;
    let config = ListingTableConfig::new(url)
        .with_listing_options(options)
        .with_schema(schema);
    ctx.register_table("events", Arc::new(ListingTable::try_new(config)?))?;
    Ok(ctx)
}

/// DuckDB's timings of `queries` on the plaintext files under `dir`, in a Python of its own.
async fn duckdb(
    python: &str,
    dir: &Path,
    queries: &[(&'static str, String, String)],
    runs: usize,
) -> anyhow::Result<Vec<Timing>> {
    const SCRIPT: &str = r#"
import duckdb, json, sys, time
spec = json.loads(sys.stdin.read())
source = f"read_parquet('{spec['dir']}/**/*.parquet', hive_partitioning = false)"
out = []
for sql in spec["queries"]:
    sql = sql.replace("FROM events", f"FROM {source}")
    con = duckdb.connect(); con.execute('SET enable_progress_bar = false')
    t = time.perf_counter(); rows = len(con.execute(sql).fetchall()); cold = time.perf_counter() - t
    hot, cpu = [], time.process_time()
    for _ in range(spec["runs"]):
        t = time.perf_counter(); con.execute(sql).fetchall(); hot.append(time.perf_counter() - t)
    cpu = (time.process_time() - cpu) / spec["runs"]
    hot.sort()
    out.append({"cold": cold, "hot": hot[len(hot) // 2], "cpu": cpu, "rows": rows})
    con.close()
print(json.dumps(out))
"#;
    let spec = json!({
        "dir": dir.display().to_string(),
        "runs": runs,
        "queries": queries.iter().map(|(_, _, duck)| duck).collect::<Vec<_>>(),
    });
    let timings = run_python(python, SCRIPT, &spec).await?;
    Ok(timings
        .as_array()
        .map_or(&[][..], Vec::as_slice)
        .iter()
        .map(|t| Timing {
            cold: t["cold"].as_f64().unwrap_or(f64::NAN),
            hot: t["hot"].as_f64().unwrap_or(f64::NAN),
            cpu: t["cpu"].as_f64().unwrap_or(f64::NAN),
            rows: t["rows"].as_u64().unwrap_or(0) as usize,
        })
        .collect())
}

/// Runs `script` in `python` with `spec` on its stdin; its stdout, as JSON.
async fn run_python(python: &str, script: &str, spec: &Value) -> anyhow::Result<Value> {
    let mut child = tokio::process::Command::new(python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {python}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        use tokio::io::AsyncWriteExt;
        stdin.write_all(spec.to_string().as_bytes()).await?;
    }
    let output = child.wait_with_output().await?;
    anyhow::ensure!(output.status.success(), "the Python script failed");
    Ok(serde_json::from_slice(&output.stdout)?)
}
