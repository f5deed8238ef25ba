//! `loom bench`: figures for Loom's building blocks, each next to a baseline measured in the same
//! run on the same machine, so that the ratio means something on a noisy, shared host.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use clap::{Args, Subcommand};
use loom_schemas::codec::Registry;
use loom_schemas::crypto::{self, DataKey, FieldContext, KeyBytes};
use loom_schemas::event::{Payload, Sealed};
use loom_schemas::log::{EmbeddedLog, EmbeddedLogConfig, FsyncPolicy, Log, Record, Topic};
use loom_schemas::samples;
use uuid::Uuid;

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchKind,
}

#[derive(Subcommand)]
enum BenchKind {
    /// Event encode/decode and field sealing, against JSON of the same payload (bodies in base64).
    Codec {
        /// Size of the sealed request and response bodies.
        #[arg(long, default_value_t = 2048)]
        body_bytes: usize,
        /// Measurement rounds (each encodes and decodes --batch events).
        #[arg(long, default_value_t = 200)]
        rounds: usize,
        #[arg(long, default_value_t = 100)]
        batch: usize,
    },
    /// Gateway latency, throughput, CPU and memory under load (oha), against the mock upstream
    /// called directly and through nginx `proxy_pass`.
    Gateway(crate::bench_gateway::GatewayBenchArgs),
    /// Quota admission: reserving and settling a request in its four scopes, per request and
    /// under contention.
    Quota(crate::bench_quota::QuotaBenchArgs),
    /// The prompt security policy: scan and screening MB/s on 1 KB, 16 KB and 256 KB prompts,
    /// clean and with findings, against every rule's regex and one RegexSet of them all.
    Policy(crate::bench_policy::PolicyBenchArgs),
    /// The log on a Kafka-protocol broker: producer throughput and append-to-read latency.
    Kafka(crate::bench_kafka::KafkaBenchArgs),
    /// Folding the log into the read models (SQLite, Postgres) and replaying it, against reading
    /// and folding with no store.
    Projector(crate::bench_projector::ProjectorBenchArgs),
    /// The archive projector: events/s, CPU, bytes and compression against plaintext Parquet of
    /// the same events; reading back and replaying from the archive against the log.
    Archive(crate::bench_archive::ArchiveBenchArgs),
    /// Analytics over the archive: Loom's SQL service on encrypted Parquet against DuckDB (and
    /// DataFusion) on plaintext Parquet of the same events, cold and hot.
    Query(crate::bench_query::QueryBenchArgs),
    /// The dashboard over a million traces: each page and widget as a signed-in browser asks
    /// for it, against the JSON API answering the same; page weight.
    Ui(crate::bench_ui::UiBenchArgs),
    /// Embedded log append and read throughput, against plain file writes and reads.
    Log {
        /// Where to write (a temporary directory inside it is removed afterwards).
        #[arg(long, default_value_os_t = std::env::temp_dir())]
        dir: PathBuf,
        /// Size of the sealed bodies of the `llm_call.completed` events appended.
        #[arg(long, default_value_t = 2048)]
        body_bytes: usize,
        /// Seconds spent on each append case.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
}

pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.what {
        BenchKind::Codec {
            body_bytes,
            rounds,
            batch,
        } => {
            tokio::task::spawn_blocking(move || codec(body_bytes, rounds.max(1), batch.max(1)))
                .await?
        }
        BenchKind::Log {
            dir,
            body_bytes,
            seconds,
        } => log(&dir, body_bytes, Duration::from_secs_f64(seconds)).await,
        BenchKind::Gateway(args) => crate::bench_gateway::run(args).await,
        BenchKind::Kafka(args) => crate::bench_kafka::run(args).await,
        BenchKind::Quota(args) => crate::bench_quota::run(args).await,
        BenchKind::Policy(args) => crate::bench_policy::run(args).await,
        BenchKind::Projector(args) => crate::bench_projector::run(args).await,
        BenchKind::Archive(args) => crate::bench_archive::run(args).await,
        BenchKind::Query(args) => crate::bench_query::run(args).await,
        BenchKind::Ui(args) => crate::bench_ui::run(args).await,
    }
}

/// Prints a line of figures on stdout (the benches' output).
pub(crate) fn out(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

macro_rules! say {
    ($($arg:tt)*) => { $crate::bench::out(format_args!($($arg)*)) };
}
pub(crate) use say;

/// The `p` quantile (0–1) of sorted values; NaN for none.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Per-event times of many rounds, and the totals.
struct Timing {
    per_event_ns: Vec<f64>,
    events: usize,
    bytes: usize,
    elapsed: Duration,
}

impl Timing {
    fn new() -> Self {
        Timing {
            per_event_ns: Vec::new(),
            events: 0,
            bytes: 0,
            elapsed: Duration::ZERO,
        }
    }

    fn add(&mut self, events: usize, bytes: usize, elapsed: Duration) {
        self.events += events;
        self.bytes += bytes;
        self.elapsed += elapsed;
        self.per_event_ns
            .push(elapsed.as_nanos() as f64 / events.max(1) as f64);
    }

    fn per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn mb_per_second(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn percentile(&self, p: f64) -> f64 {
        let mut sorted = self.per_event_ns.clone();
        sorted.sort_by(f64::total_cmp);
        if sorted.is_empty() {
            return 0.0;
        }
        let index = ((sorted.len() - 1) as f64 * p).round() as usize;
        sorted[index]
    }

    fn row(&self, name: &str) {
        say!(
            "{name:<34} {:>12.0} {:>9.1} {:>10.2} {:>10.2}",
            self.per_second(),
            self.mb_per_second(),
            self.percentile(0.5) / 1000.0,
            self.percentile(0.99) / 1000.0,
        );
    }
}

fn header(unit: &str) {
    say!(
        "{:<34} {:>12} {:>9} {:>10} {:>10}",
        "",
        "events/s",
        "MB/s",
        format!("p50 {unit}"),
        format!("p99 {unit}")
    );
}

fn ratio(name: &str, ours: &Timing, baseline: &Timing) {
    say!(
        "{name:<34} {:>11.2}x",
        ours.per_second() / baseline.per_second().max(1e-9)
    );
}

fn bench_key() -> anyhow::Result<(DataKey, KeyBytes)> {
    let key = DataKey {
        tenant_id: Uuid::now_v7(),
        key_id: Uuid::now_v7(),
        version: 1,
        key: KeyBytes::generate()?,
    };
    Ok((key, KeyBytes::generate()?))
}

fn codec(body_bytes: usize, rounds: usize, batch: usize) -> anyhow::Result<()> {
    let registry = Registry::builtin()?;
    let (key, _) = bench_key()?;
    let event = samples::llm_call_completed(&key, "trace-bench", body_bytes)?;
    let Payload::LlmCallCompleted(payload) = &event.payload else {
        anyhow::bail!("sample is not an llm_call.completed");
    };
    let encoded = registry.encode(&event)?;
    // The baseline: the same payload as JSON, with the sealed bodies as base64 strings, as a JSON
    // event format would carry them.
    let mut json_payload = serde_json::to_value(payload)?;
    for field in ["request_body", "response_body"] {
        let sealed: Option<Sealed> = serde_json::from_value(json_payload[field].take())?;
        json_payload[field] =
            sealed.map_or(serde_json::Value::Null, |s| STANDARD.encode(s.0).into());
    }
    let json = serde_json::to_vec(&json_payload)?;
    let body = samples::chat_body(body_bytes);
    say!(
        "loom bench codec: llm_call.completed with {body_bytes}-byte sealed request and response bodies; \
         {} bytes as Avro, {} bytes as JSON; {rounds} rounds of {batch} events",
        encoded.len(),
        json.len()
    );

    let (mut encode, mut decode, mut json_encode, mut json_decode, mut seal, mut open) = (
        Timing::new(),
        Timing::new(),
        Timing::new(),
        Timing::new(),
        Timing::new(),
        Timing::new(),
    );
    let mut buf = Vec::with_capacity(encoded.len() * 2);
    let ctx = FieldContext {
        tenant_id: key.tenant_id,
        event_id: event.envelope.event_id,
        field: "request_body",
    };
    let sealed = crypto::seal(&key, &ctx, &body)?;
    for _ in 0..rounds {
        let started = Instant::now();
        for _ in 0..batch {
            buf.clear();
            registry.encode_into(&event, &mut buf)?;
        }
        encode.add(batch, batch * encoded.len(), started.elapsed());

        let started = Instant::now();
        for _ in 0..batch {
            std::hint::black_box(registry.decode(&encoded)?);
        }
        decode.add(batch, batch * encoded.len(), started.elapsed());

        let started = Instant::now();
        for _ in 0..batch {
            buf.clear();
            serde_json::to_writer(&mut buf, &json_payload)?;
        }
        json_encode.add(batch, batch * json.len(), started.elapsed());

        let started = Instant::now();
        for _ in 0..batch {
            std::hint::black_box(serde_json::from_slice::<serde_json::Value>(&json)?);
        }
        json_decode.add(batch, batch * json.len(), started.elapsed());

        let started = Instant::now();
        for _ in 0..batch {
            std::hint::black_box(crypto::seal(&key, &ctx, &body)?);
        }
        seal.add(batch, batch * body.len(), started.elapsed());

        let started = Instant::now();
        for _ in 0..batch {
            std::hint::black_box(crypto::open(&key, &ctx, &sealed)?);
        }
        open.add(batch, batch * body.len(), started.elapsed());
    }
    header("µs");
    encode.row("avro encode");
    json_encode.row("json encode (baseline)");
    decode.row("avro decode");
    json_decode.row("json decode (baseline)");
    seal.row(&format!("seal {body_bytes} B (AES-256-GCM)"));
    open.row(&format!("open {body_bytes} B"));
    ratio("avro/json encode", &encode, &json_encode);
    ratio("avro/json decode", &decode, &json_decode);
    Ok(())
}

async fn log(dir: &Path, body_bytes: usize, per_case: Duration) -> anyhow::Result<()> {
    let work = tempfile::Builder::new()
        .prefix("loom-bench-log")
        .tempdir_in(dir)
        .context("creating the bench directory")?;
    let registry = Registry::builtin()?;
    let (key, _) = bench_key()?;
    let record = registry.encode_record(&samples::llm_call_completed(
        &key,
        "trace-bench",
        body_bytes,
    )?)?;
    say!(
        "loom bench log: appending llm_call.completed records of {} bytes in {}; {:.1}s per case",
        record.value.len(),
        work.path().display(),
        per_case.as_secs_f64()
    );
    say!(
        "baseline: the same bytes written to a plain file with the same batch size and fsync cadence"
    );
    header("µs/batch");
    let cases = [
        (FsyncPolicy::Always, 1),
        (FsyncPolicy::Always, 64),
        (FsyncPolicy::Interval(Duration::from_millis(200)), 64),
        (FsyncPolicy::Never, 64),
    ];
    let mut biggest = None;
    for (index, (fsync, batch)) in cases.into_iter().enumerate() {
        let log_dir = work.path().join(format!("log-{index}"));
        let raw_path = work.path().join(format!("raw-{index}"));
        let ours = append_case(&log_dir, fsync, batch, &record, per_case).await?;
        let raw = tokio::task::spawn_blocking({
            let raw_path = raw_path.clone();
            let value_len = record.value.len();
            move || raw_append_case(&raw_path, fsync, batch, value_len, per_case)
        })
        .await??;
        ours.row(&format!("log append fsync={fsync} batch={batch}"));
        raw.row(&format!("file write fsync={fsync} batch={batch}"));
        ratio("  log/file", &ours, &raw);
        if fsync == FsyncPolicy::Never {
            biggest = Some((log_dir, raw_path, ours.events));
        }
    }
    if let Some((log_dir, raw_path, events)) = biggest {
        let ours = read_case(&log_dir, events).await?;
        let value_len = record.value.len();
        let raw =
            tokio::task::spawn_blocking(move || raw_read_case(&raw_path, value_len)).await??;
        say!("read back {events} records (page cache warm):");
        ours.row("log read (poll 1000)");
        raw.row("file read (1 MiB chunks, baseline)");
        ratio("  log/file", &ours, &raw);
    }
    Ok(())
}

async fn append_case(
    dir: &Path,
    fsync: FsyncPolicy,
    batch: usize,
    record: &Record,
    per_case: Duration,
) -> anyhow::Result<Timing> {
    let log = EmbeddedLog::open(EmbeddedLogConfig {
        fsync,
        ..EmbeddedLogConfig::new(dir, crate::bench::chain_key())
    })
    .await?;
    let mut timing = Timing::new();
    let started = Instant::now();
    while started.elapsed() < per_case {
        let records = vec![record.clone(); batch];
        let t = Instant::now();
        log.append(Topic::Data, records).await?;
        timing.add(batch, batch * record.value.len(), t.elapsed());
    }
    log.sync().await?;
    // Per-batch latency rather than per-event: report µs per batch.
    timing
        .per_event_ns
        .iter_mut()
        .for_each(|ns| *ns *= batch as f64);
    Ok(timing)
}

fn raw_append_case(
    path: &Path,
    fsync: FsyncPolicy,
    batch: usize,
    value_len: usize,
    per_case: Duration,
) -> anyhow::Result<Timing> {
    let mut file = std::fs::File::create(path)?;
    let chunk = vec![7u8; value_len * batch];
    let mut timing = Timing::new();
    let mut last_sync = Instant::now();
    let started = Instant::now();
    while started.elapsed() < per_case {
        let t = Instant::now();
        file.write_all(&chunk)?;
        match fsync {
            FsyncPolicy::Always => file.sync_data()?,
            FsyncPolicy::Interval(interval) if last_sync.elapsed() >= interval => {
                file.sync_data()?;
                last_sync = Instant::now();
            }
            _ => {}
        }
        timing.add(batch, chunk.len(), t.elapsed());
    }
    timing
        .per_event_ns
        .iter_mut()
        .for_each(|ns| *ns *= batch as f64);
    Ok(timing)
}

/// The chain key of the benchmarks' throw-away logs (the same for every open of one).
pub fn chain_key() -> loom_schemas::log::ChainKey {
    loom_schemas::log::ChainKey::new([0x5a; 32])
}

async fn read_case(dir: &Path, events: usize) -> anyhow::Result<Timing> {
    let log = EmbeddedLog::open(EmbeddedLogConfig::new(dir, crate::bench::chain_key())).await?;
    let mut reader = log.read_from(Topic::Data, 0, 0).await?;
    let mut timing = Timing::new();
    let mut read = 0;
    while read < events {
        let t = Instant::now();
        let entries = reader.poll(1000).await?;
        if entries.is_empty() {
            break;
        }
        let bytes = entries.iter().map(|e| e.record.value.len()).sum();
        read += entries.len();
        timing.add(entries.len(), bytes, t.elapsed());
    }
    Ok(timing)
}

fn raw_read_case(path: &Path, value_len: usize) -> anyhow::Result<Timing> {
    let mut file = std::fs::File::open(path)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut timing = Timing::new();
    loop {
        let t = Instant::now();
        let n = file.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        // Events of the same size as the log's, so that events/s compare.
        timing.add(n / value_len.max(1), n, t.elapsed());
    }
    Ok(timing)
}
