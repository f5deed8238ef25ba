//! `loom bench projector`: folding the log into the read models. A realistic history goes into an
//! embedded log; then, against a baseline of reading and folding it with no store at all (the
//! ceiling), it is folded into SQLite and into Postgres batch by batch (events/s, per-batch
//! latency, rows/s per table), and finally replayed from scratch with `loom replay`'s code path.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use loom_projector::fold::{Changes, ControlState};
use loom_projector::{ProjectorConfig, ReadStore, StoreLocation, fold_batch};
use loom_schemas::codec::Registry;
use loom_schemas::crypto::DataKey;
use loom_schemas::event::Plane;
use loom_schemas::log::{EmbeddedLog, EmbeddedLogConfig, Entry, FsyncPolicy, Log, Topic};
use loom_schemas::samples;
use loom_schemas::scratch::ScratchDatabase;
use sqlx::Row;
use uuid::Uuid;

use crate::bench::{percentile, say};

#[derive(clap::Args)]
pub struct ProjectorBenchArgs {
    /// Events in the history folded (about 5.5 per request).
    #[arg(long, default_value_t = 1_000_000)]
    events: usize,
    /// Records per transaction.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// A Postgres the bench may create (and drop) a database in.
    #[arg(
        long,
        env = "LOOM_BENCH_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// The read-model stores to fold into (SQLite first when both).
    #[arg(long, value_delimiter = ',', default_value = "sqlite,postgres")]
    stores: Vec<StoreKind>,
    /// Where the log and the SQLite files go (a temporary directory inside it is removed).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: std::path::PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum StoreKind {
    Sqlite,
    Postgres,
}

impl StoreKind {
    fn name(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Postgres => "postgres",
        }
    }
}

/// Tables reported, in the order shown.
const TABLES: [&str; 8] = [
    "traces",
    "llm_calls",
    "tool_calls",
    "trace_bodies",
    "usage_hourly",
    "usage_daily",
    "rollups",
    "api_keys",
];

pub async fn run(args: ProjectorBenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(&args.dir)?;
    let log: Arc<dyn Log> = Arc::new(
        EmbeddedLog::open(EmbeddedLogConfig {
            fsync: FsyncPolicy::Never,
            ..EmbeddedLogConfig::new(dir.path().join("log"), crate::bench::chain_key())
        })
        .await?,
    );
    let started = Instant::now();
    let events = write_history(log.as_ref(), args.events, &samples::tenant_keys(8)?).await?;
    say!(
        "history: {events} events ({} requests, 8 tenants) written in {:.1}s",
        args.events * 2 / 11,
        started.elapsed().as_secs_f64()
    );

    // The ceiling: reading, decoding and folding with no store.
    let registry = Registry::builtin()?;
    let ceiling = time_batches(
        log.as_ref(),
        args.batch,
        |topic, batch, mut control| async move {
            std::hint::black_box(Changes::fold(registry, topic, &batch, &mut control));
            Ok(control)
        },
    )
    .await?;
    say!(
        "\nbaseline  read + decode + fold, no store ({} events)  {:>9.0} events/s  batch p50 {:>7.2} ms  p99 {:>7.2} ms",
        ceiling.events,
        ceiling.rate,
        ceiling.p50,
        ceiling.p99
    );

    let database = ScratchDatabase::create(&args.database_url, "loom_bench")
        .await
        .with_context(|| format!("creating a database through {}", args.database_url))?;
    let backends = [
        (
            "sqlite",
            StoreLocation::Sqlite(dir.path().join("read-models")),
        ),
        (
            "postgres",
            StoreLocation::Postgres(database.url.clone().into()),
        ),
    ];
    for (name, location) in backends
        .iter()
        .filter(|(name, _)| args.stores.iter().any(|s| s.name() == *name))
    {
        let store = ReadStore::open(location, 1).await?;
        let folded = time_batches(log.as_ref(), args.batch, |topic, batch, mut control| {
            let store = store.clone();
            async move {
                fold_batch(&store, registry, topic, &batch, &mut control).await?;
                Ok(control)
            }
        })
        .await?;
        say!(
            "{name:<9} fold, {} per transaction  {:>9.0} events/s  batch p50 {:>7.2} ms  p99 {:>7.2} ms  ({:.2}x of the baseline)",
            args.batch,
            folded.rate,
            folded.p50,
            folded.p99,
            folded.rate / ceiling.rate
        );
        let mut rows = BTreeMap::new();
        for table in TABLES {
            let count: i64 = sqlx::query(sqlx::AssertSqlSafe(format!(
                "SELECT CAST(count(*) AS BIGINT) FROM {table}"
            )))
            .fetch_one(store.pool())
            .await?
            .try_get(0)?;
            rows.insert(table, count);
        }
        let per_table: Vec<String> = TABLES
            .iter()
            .map(|t| format!("{t} {:.0}", rows[t] as f64 / folded.seconds))
            .collect();
        say!("          rows/s per table: {}", per_table.join(", "));
        store.close().await;

        // A replay from scratch: a new version, the projector's own loop, then the switch.
        let report = loom_projector::replay(
            Arc::clone(&log),
            None,
            location,
            bench_config(args.batch),
            false,
        )
        .await?;
        let rate = report.records as f64 / report.elapsed.as_secs_f64().max(1e-9);
        say!(
            "{name:<9} replay of {} events into version {}: {:.1}s ({rate:.0} events/s, {:.2}x of the baseline; the next batch is read and folded while one is stored)",
            report.records,
            report.version,
            report.elapsed.as_secs_f64(),
            rate / ceiling.rate
        );
    }
    database.drop().await?;
    Ok(())
}

fn bench_config(batch: usize) -> ProjectorConfig {
    ProjectorConfig {
        group: format!("loom-bench-{}", Uuid::now_v7().simple()),
        batch,
        ..ProjectorConfig::default()
    }
}

/// Writes a history of about `events` events; returns how many.
/// Appends a generated history of about `events` events of the tenants of `keys`; how many.
pub(crate) async fn write_history(
    log: &dyn Log,
    events: usize,
    keys: &[DataKey],
) -> anyhow::Result<usize> {
    let registry = Registry::builtin()?;
    // About 5.5 events per request.
    let requests = (events * 2 / 11).max(1);
    let start = loom_schemas::event::now_micros() - requests as i64 * 7_200_000;
    let mut written = 0;
    // In slices, so that the history never sits in memory whole.
    const SLICE: usize = 20_000;
    for (i, first) in (0..requests).step_by(SLICE).enumerate() {
        let count = SLICE.min(requests - first);
        let history = samples::history(keys, count, start + first as i64 * 7_200_000, i as u64)?;
        for plane in [Plane::Control, Plane::Data] {
            // Every slice starts with the tenants' set-up: keep the first one's only.
            if plane == Plane::Control && i > 0 {
                continue;
            }
            let records = history
                .iter()
                .filter(|e| e.payload.plane() == plane)
                .map(|e| registry.encode_record(e))
                .collect::<Result<Vec<_>, _>>()?;
            written += records.len();
            for chunk in records.chunks(1000) {
                log.append(Topic::for_plane(plane), chunk.to_vec()).await?;
            }
        }
    }
    Ok(written)
}

struct Timed {
    events: usize,
    rate: f64,
    seconds: f64,
    p50: f64,
    p99: f64,
}

/// Reads the whole log in batches (never mixing topics) and runs `step` on each: events/s and
/// per-batch latencies, reading included.
async fn time_batches<F, Fut>(log: &dyn Log, batch: usize, mut step: F) -> anyhow::Result<Timed>
where
    F: FnMut(Topic, Vec<Entry>, ControlState) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<ControlState>>,
{
    let mut latencies = Vec::new();
    let mut events = 0;
    let started = Instant::now();
    for topic in [Topic::Control, Topic::Data] {
        // The control topic's state, as the projector carries it from batch to batch.
        let mut control = ControlState::default();
        let mut reader = log.read_from(topic, 0, 0).await?;
        loop {
            let t = Instant::now();
            let entries = reader.poll(batch.max(1)).await?;
            if entries.is_empty() {
                break;
            }
            events += entries.len();
            control = step(topic, entries, control)
                .await
                .context("folding a batch")?;
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let seconds = started.elapsed().as_secs_f64().max(1e-9);
    latencies.sort_by(f64::total_cmp);
    Ok(Timed {
        events,
        rate: events as f64 / seconds,
        seconds,
        p50: percentile(&latencies, 0.5),
        p99: percentile(&latencies, 0.99),
    })
}
