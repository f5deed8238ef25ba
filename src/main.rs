//! `loom`: one binary, a subcommand per role. Parsing and start-up only; the work is in the
//! library crates.

/// mimalloc: the request path allocates and frees small buffers on every request, across
/// threads; glibc's malloc spent ~13% of a profile at full load doing that.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod admin;
mod bench;
mod bench_archive;
mod bench_gateway;
mod bench_kafka;
mod bench_policy;
mod bench_projector;
mod bench_query;
mod bench_quota;
mod bench_ui;
mod export;
#[cfg(test)]
mod reference;
mod sql;
mod verify;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use loom::{Drain, KeyStoreLocation, LogLocation, NodeConfig, ServeConfig};
use loom_dashboard::{DashboardConfig, RegistrationMode};
use loom_gateway::config::{EventsAck, GatewayConfig};
use loom_projector::StoreLocation;
use loom_projector::archive::{ArchiveConfig, ArchiveLocation, S3Options};
use loom_schemas::SecretString;
use loom_schemas::log::{EmbeddedLogConfig, FsyncPolicy, KafkaLogConfig};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "loom",
    version,
    about = "Loom: an OpenAI-compatible LLM gateway that records every decision on an append-only log",
    long_about = None,
)]
struct Cli {
    /// Log output format.
    #[arg(long, global = true, env = "LOOM_LOG_FORMAT", default_value = "text")]
    log_format: LogFormat,

    /// Log filter, in tracing's EnvFilter syntax (e.g. `info`, `loom_gateway=debug`).
    #[arg(
        long = "log",
        global = true,
        env = "LOOM_LOG",
        default_value = "info,sqlx=warn,buoyant_kernel=off,deltalake_core=warn"
    )]
    log_filter: String,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run Loom in one process on the embedded defaults (log, key store and data in --data-dir).
    Serve(ServeArgs),
    /// Check every record of the embedded log: checksums, offsets, the hash chain, and that the
    /// chain leads to heads authenticated with the master key (with --archive: every manifest
    /// chain and archive file instead).
    Verify(verify::VerifyArgs),
    /// Cut the embedded log where it is damaged, keeping what is cut in log/quarantine/.
    Repair(verify::RepairArgs),
    /// Apply Loom's Postgres migrations: the key store and the active read models.
    Migrate(MigrateArgs),
    /// Measure Loom's building blocks; prints figures against a baseline measured in the same run.
    Bench(bench::BenchArgs),
    /// Run the gateway alone on a shared log (Kafka), one of many: the data plane and admin API.
    Gateway(ServeArgs),
    /// Run the read-model projector alone on a shared log (Kafka), into Postgres.
    Projector(ProjectorArgs),
    /// Run the archiver alone on a shared log (Kafka): every event into encrypted Parquet files
    /// on S3 (or a directory).
    Archiver(ArchiverArgs),
    /// Run the query service alone: `/v1/sql` over the archive (on S3 or a directory), for the
    /// keys of the log's control plane and the admin token.
    Query(QueryArgs),
    /// Rebuild the read models from the log (and the archive, with --from-archive) into a new
    /// version, then switch readers to it.
    Replay(ReplayArgs),
    /// Run SQL over the archive as the operator: every tenant's events, or one tenant's.
    Sql(sql::SqlArgs),
    /// Export the archived events to a Delta Lake table (a directory or S3), incrementally.
    Export(export::ExportArgs),
    /// Manage tenants, projects, API keys, users and roles, on a data directory or through a running server.
    Admin(admin::AdminArgs),
}

#[derive(Args)]
pub struct DataDirArgs {
    /// Data directory: the embedded log, key store and master key live here.
    #[arg(
        long,
        global = true,
        env = "LOOM_DATA_DIR",
        default_value = "./loom-data"
    )]
    pub data_dir: PathBuf,
}

impl DataDirArgs {
    pub fn dir(&self) -> loom::DataDir {
        loom::DataDir::new(&self.data_dir)
    }
}

/// Where the log is: the embedded one in the data dir, or Kafka.
#[derive(Args)]
pub struct KafkaArgs {
    /// Put the log on Kafka at these brokers (host:port,…) instead of in the data directory.
    #[arg(
        long,
        global = true,
        env = "LOOM_KAFKA_BROKERS",
        value_name = "BROKERS"
    )]
    kafka_brokers: Option<String>,
    /// Prefix of Loom's topics (`<prefix>data`, `<prefix>control`).
    #[arg(
        long,
        global = true,
        env = "LOOM_KAFKA_TOPIC_PREFIX",
        default_value = "loom."
    )]
    kafka_topic_prefix: String,
    /// Partitions of the data topic when Loom creates it.
    #[arg(
        long,
        global = true,
        env = "LOOM_KAFKA_DATA_PARTITIONS",
        default_value_t = 6
    )]
    kafka_data_partitions: i32,
    /// Replication factor of the topics Loom creates.
    #[arg(
        long,
        global = true,
        env = "LOOM_KAFKA_REPLICATION",
        default_value_t = 1
    )]
    kafka_replication: i32,
    /// Producer compression: none, gzip, snappy or lz4.
    #[arg(
        long,
        global = true,
        env = "LOOM_KAFKA_COMPRESSION",
        default_value = "lz4"
    )]
    kafka_compression: String,
    /// Data-plane records the local spool holds while Kafka is unreachable; past that, requests
    /// get 503 (nothing goes unrecorded).
    #[arg(
        long,
        global = true,
        env = "LOOM_SPOOL_MAX_RECORDS",
        default_value_t = 1_000_000
    )]
    spool_max_records: u64,
    /// How long an append waits for Kafka before its events go to the local spool instead (at
    /// once when librdkafka reports every broker down).
    #[arg(long, global = true, env = "LOOM_SPOOL_AFTER", default_value = "250ms", value_parser = humantime::parse_duration)]
    spool_after: std::time::Duration,
    /// Create Loom's topics on start when they are missing (`false`: `loom migrate` must have).
    #[arg(long, global = true, env = "LOOM_KAFKA_CREATE_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    kafka_create_topics: bool,
    /// Another librdkafka property as KEY=VALUE (repeatable; comma-separated in the env var).
    #[arg(long = "kafka-property", global = true, env = "LOOM_KAFKA_PROPERTIES", hide_env_values = true, value_delimiter = ',', value_parser = parse_property)]
    kafka_properties: Vec<(String, String)>,
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("expected KEY=VALUE, not {text:?}"))
}

impl KafkaArgs {
    /// Kafka if `--kafka-brokers` is given, else the embedded log `embedded`.
    pub fn location(&self, embedded: LogLocation) -> LogLocation {
        let Some(brokers) = &self.kafka_brokers else {
            return embedded;
        };
        let mut config = KafkaLogConfig::new(brokers);
        config.topic_prefix = self.kafka_topic_prefix.clone();
        config.data_partitions = self.kafka_data_partitions;
        config.replication = self.kafka_replication;
        config.compression = self.kafka_compression.clone();
        config.create_topics = self.kafka_create_topics;
        config.properties = self.kafka_properties.iter().cloned().collect();
        LogLocation::Kafka {
            kafka: config,
            spool_max_records: self.spool_max_records,
            spool_after: self.spool_after,
        }
    }
}

/// Where the tenants' data keys are.
#[derive(Args)]
pub struct KeyStoreArgs {
    /// Keep tenant data keys in this Postgres database instead of <data dir>/keys.json.
    #[arg(
        long,
        env = "LOOM_KEY_STORE_URL",
        hide_env_values = true,
        value_name = "POSTGRES_URL"
    )]
    key_store_url: Option<String>,
}

impl KeyStoreArgs {
    fn location(&self) -> KeyStoreLocation {
        self.key_store_url
            .clone()
            .map_or(KeyStoreLocation::DataDir, |url| {
                KeyStoreLocation::Postgres(url.into())
            })
    }
}

/// Where the archive is.
#[derive(Args)]
pub struct ArchiveArgs {
    /// The archive: a directory, `s3://BUCKET[/PREFIX]`, or `off` (`loom serve` only: do not
    /// archive) [default: <data dir>/archive].
    #[arg(long, env = "LOOM_ARCHIVE", value_name = "DIR_OR_S3_URL")]
    archive: Option<String>,

    #[command(flatten)]
    s3: S3Args,
}

impl ArchiveArgs {
    /// The archive named, `<data dir>/archive` if none was; `None` for `off`.
    fn location(&self, data: &DataDirArgs) -> anyhow::Result<Option<ArchiveLocation>> {
        location_or(self.archive.as_deref(), data.dir().archive(), &self.s3)
    }

    /// The S3 settings given (for the archive, and for other S3 locations alike).
    fn s3_options(&self) -> S3Options {
        self.s3.options()
    }
}

/// A directory or S3 location `named` on the command line: `default` if none was, `None` for
/// `off`.
fn location_or(
    named: Option<&str>,
    default: PathBuf,
    s3: &S3Args,
) -> anyhow::Result<Option<ArchiveLocation>> {
    Ok(match named {
        Some("off") => None,
        None | Some("") => Some(ArchiveLocation::Directory(default)),
        Some(named) => Some(ArchiveLocation::parse(named, s3.options())?),
    })
}

/// Where `POST /v1/exports` writes tables: `named`, `<data dir>/exports` if none was; `None` for
/// `off`.
fn exports_location(
    named: Option<&str>,
    data: &DataDirArgs,
    s3: &S3Args,
) -> anyhow::Result<Option<ArchiveLocation>> {
    location_or(named, data.dir().exports(), s3)
}

/// How to reach S3 (credentials also from the usual AWS_* variables).
#[derive(Args)]
pub struct S3Args {
    /// URL of an S3-compatible server (e.g. http://127.0.0.1:9000) [default: AWS].
    #[arg(long, env = "LOOM_S3_ENDPOINT", value_name = "URL")]
    s3_endpoint: Option<String>,
    /// The bucket's region [default: AWS_REGION, or us-east-1].
    #[arg(long, env = "LOOM_S3_REGION")]
    s3_region: Option<String>,
    /// Access key id [default: AWS_ACCESS_KEY_ID, or the instance's credentials].
    #[arg(long, env = "LOOM_S3_ACCESS_KEY_ID", value_name = "ID")]
    s3_access_key_id: Option<String>,
    /// Secret access key [default: AWS_SECRET_ACCESS_KEY].
    #[arg(
        long,
        env = "LOOM_S3_SECRET_ACCESS_KEY",
        hide_env_values = true,
        value_name = "SECRET"
    )]
    s3_secret_access_key: Option<String>,
    /// Path-style requests (`endpoint/bucket/key`), which most S3-compatible servers need
    /// [default: true with --s3-endpoint, false on AWS].
    #[arg(long, env = "LOOM_S3_PATH_STYLE", value_name = "BOOL", action = clap::ArgAction::Set)]
    s3_path_style: Option<bool>,
}

impl S3Args {
    fn options(&self) -> S3Options {
        S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            access_key_id: self.s3_access_key_id.clone(),
            secret_access_key: self.s3_secret_access_key.clone().map(SecretString::from),
            path_style: self.s3_path_style.unwrap_or(self.s3_endpoint.is_some()),
        }
    }
}

/// How the archiver writes.
#[derive(Args)]
pub struct ArchivingArgs {
    /// A tenant's events are written out as a file once they reach this many MiB (larger files
    /// make faster queries; compaction merges small ones) [default: 128 for `loom archiver`, 16
    /// for `loom serve`, whose buffers share the gateway's memory].
    #[arg(long, env = "LOOM_ARCHIVE_ROLL_MIB", value_name = "MIB")]
    archive_roll_mib: Option<usize>,
    /// … or once the oldest of them has waited this long.
    #[arg(long, env = "LOOM_ARCHIVE_ROLL_AFTER", default_value = "10m", value_parser = humantime::parse_duration)]
    archive_roll_after: std::time::Duration,
}

/// `loom archiver`'s files: large, for fast queries.
const ARCHIVER_ROLL_MIB: usize = 128;
/// `loom serve`'s: a gateway's in-process archiver holds its buffers in the gateway's memory
/// (measured at 2,000 req/s: RSS peaks of 0.4 GB instead of 1.2 GB, the same CPU per request).
const SERVE_ROLL_MIB: usize = 16;

impl ArchivingArgs {
    /// How to archive, files rolled at `roll_mib` unless `--archive-roll-mib` says otherwise.
    fn config(&self, roll_mib: usize) -> ArchiveConfig {
        ArchiveConfig {
            roll_bytes: self.archive_roll_mib.unwrap_or(roll_mib).max(1) << 20,
            roll_after: self.archive_roll_after,
            ..ArchiveConfig::default()
        }
    }
}

/// How a server stops on SIGTERM or Ctrl-C.
#[derive(Args)]
struct ShutdownArgs {
    /// On SIGTERM, /ready turns 503 at once; the server keeps answering this long before it
    /// stops accepting connections (give load balancers time to notice, e.g. `5s` behind a
    /// Kubernetes Service).
    #[arg(long, env = "LOOM_SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    shutdown_delay: std::time::Duration,
    /// How long requests and streams in flight (a projector's or archiver's batch) may take to
    /// finish once stopping; past it they are cut. Events are flushed after it either way.
    #[arg(long, env = "LOOM_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    shutdown_timeout: std::time::Duration,
}

impl ShutdownArgs {
    fn drain(&self) -> Drain {
        Drain {
            delay: self.shutdown_delay,
            timeout: self.shutdown_timeout,
        }
    }
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    data: DataDirArgs,

    #[command(flatten)]
    kafka: KafkaArgs,

    /// Address to listen on; port 0 picks a free port (logged as `listening on ADDR`).
    #[arg(long, env = "LOOM_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,

    /// When log writes are forced to disk: `always` (every batch), an interval such as `200ms`,
    /// or `never` (left to the OS).
    #[arg(long, env = "LOOM_FSYNC", default_value = "200ms")]
    fsync: FsyncPolicy,

    /// When a request's answer may go out: `recorded` (once its events are in the log: the
    /// embedded log's files, or Kafka / the local spool), `fsynced` (once they are on disk:
    /// survives power loss) or `none` (at once; a crash can lose the last milliseconds of events)
    /// [default: `[limits] events_ack` of --config, else recorded].
    #[arg(long, env = "LOOM_EVENTS_ACK")]
    events_ack: Option<EventsAck>,

    /// Size at which a log segment is closed and a new one started.
    #[arg(long, env = "LOOM_SEGMENT_BYTES", default_value_t = EmbeddedLogConfig::DEFAULT_SEGMENT_BYTES)]
    segment_bytes: u64,

    #[command(flatten)]
    key_store: KeyStoreArgs,

    /// Upstreams, model aliases and routing, as TOML (see docs/configuration.md).
    #[arg(long, env = "LOOM_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,

    /// Enables the admin API (/admin/*) for requests bearing this token.
    #[arg(long, env = "LOOM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,

    /// Read models: `loom serve` folds the log into them in process (a Postgres URL, a directory
    /// for SQLite files, or `off`) [default: <data dir>/read-models]; `loom gateway` only looks up
    /// there which deployment made a stored response (`GET /v1/responses/{id}`) when it did not
    /// make it itself.
    #[arg(
        long,
        env = "LOOM_READ_MODELS",
        hide_env_values = true,
        value_name = "URL_OR_DIR"
    )]
    read_models: Option<String>,

    #[command(flatten)]
    projection: ProjectionArgs,

    /// `loom serve` archives every event there (`loom gateway` never does: run `loom archiver`).
    #[command(flatten)]
    archive: ArchiveArgs,

    #[command(flatten)]
    archiving: ArchivingArgs,

    /// Where `POST /v1/exports` writes Delta tables (each tenant's under `tenant_id=<T>/`): a
    /// directory, `s3://BUCKET[/PREFIX]` (reached with the --s3-* settings) or `off`
    /// [default: <data dir>/exports].
    #[arg(long, env = "LOOM_EXPORTS", value_name = "DIR_OR_S3_URL")]
    exports: Option<String>,

    /// Who may register a new organization on the dashboard's sign-in page: `first` (only the
    /// first user, while nobody has registered), `open` (anybody) or `closed`.
    #[arg(long, env = "LOOM_REGISTRATION", default_value = "first")]
    registration: RegistrationMode,

    /// How long a dashboard sign-in lasts, e.g. `12h`.
    #[arg(long, env = "LOOM_SESSION_TTL", default_value = "12h", value_parser = humantime::parse_duration)]
    session_ttl: std::time::Duration,

    /// Exports a span per request and per upstream attempt (OpenTelemetry's GenAI semantic
    /// conventions; the client's `traceparent` continued, and sent on upstream) to this
    /// collector over OTLP/HTTP (protobuf), e.g. `http://127.0.0.1:4318`; off when unset. The
    /// standard OTEL_EXPORTER_OTLP_HEADERS and OTEL_SERVICE_NAME apply.
    #[arg(long, env = "LOOM_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,

    #[command(flatten)]
    shutdown: ShutdownArgs,
}

#[derive(Args)]
struct ProjectorArgs {
    #[command(flatten)]
    kafka: KafkaArgs,

    /// The read models: a Postgres URL (or a directory for SQLite files).
    #[arg(
        long,
        env = "LOOM_READ_MODELS",
        hide_env_values = true,
        value_name = "URL_OR_DIR"
    )]
    read_models: String,

    /// Serve /health, /ready and /metrics on this address (e.g. 127.0.0.1:9091).
    #[arg(long, env = "LOOM_LISTEN")]
    listen: Option<SocketAddr>,

    #[command(flatten)]
    projection: ProjectionArgs,

    #[command(flatten)]
    shutdown: ShutdownArgs,
}

#[derive(Args)]
struct ArchiverArgs {
    #[command(flatten)]
    data: DataDirArgs,

    #[command(flatten)]
    kafka: KafkaArgs,

    #[command(flatten)]
    key_store: KeyStoreArgs,

    #[command(flatten)]
    archive: ArchiveArgs,

    #[command(flatten)]
    archiving: ArchivingArgs,

    /// Serve /health, /ready and /metrics on this address (e.g. 127.0.0.1:9092).
    #[arg(long, env = "LOOM_LISTEN")]
    listen: Option<SocketAddr>,

    #[command(flatten)]
    shutdown: ShutdownArgs,
}

#[derive(Args)]
struct QueryArgs {
    #[command(flatten)]
    data: DataDirArgs,

    #[command(flatten)]
    kafka: KafkaArgs,

    #[command(flatten)]
    key_store: KeyStoreArgs,

    #[command(flatten)]
    archive: ArchiveArgs,

    /// Address to listen on; port 0 picks a free port (logged as `listening on ADDR`).
    #[arg(long, env = "LOOM_LISTEN", default_value = "127.0.0.1:8081")]
    listen: SocketAddr,

    /// The read models `loom projector` folds (a Postgres URL), which the analytics and traces
    /// (`/v1/analytics/*`, `/v1/alerts`, `/v1/activity`, `/v1/traces`) answer from; without it,
    /// only SQL over the archive is served.
    #[arg(
        long,
        env = "LOOM_READ_MODELS",
        hide_env_values = true,
        value_name = "URL_OR_DIR"
    )]
    read_models: Option<String>,

    /// Lets holders of this token query every tenant's data.
    #[arg(long, env = "LOOM_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,

    /// Where `POST /v1/exports` writes Delta tables (each tenant's under `tenant_id=<T>/`): a
    /// directory, `s3://BUCKET[/PREFIX]` (reached with the --s3-* settings) or `off`
    /// [default: <data dir>/exports].
    #[arg(long, env = "LOOM_EXPORTS", value_name = "DIR_OR_S3_URL")]
    exports: Option<String>,

    #[command(flatten)]
    shutdown: ShutdownArgs,
}

#[derive(Args)]
struct ProjectionArgs {
    /// Consumer group prefix of the projector's members (`-v<N>-data`, `-v<N>-control` added)
    /// [default: <topic prefix>read-models, so deployments sharing a cluster stay apart].
    #[arg(long, env = "LOOM_PROJECTOR_GROUP")]
    group: Option<String>,

    /// Records folded per transaction at most.
    #[arg(long, env = "LOOM_PROJECTOR_BATCH", default_value_t = 1000)]
    batch: usize,

    /// How long sealed request/response bodies are kept in trace_bodies.
    #[arg(long, env = "LOOM_BODY_RETENTION", default_value = "30d", value_parser = humantime::parse_duration)]
    body_retention: std::time::Duration,

    /// How long traces and their upstream calls are kept (Postgres drops whole months past it)
    /// [default: for ever].
    #[arg(long, env = "LOOM_TRACE_RETENTION", value_parser = humantime::parse_duration)]
    trace_retention: Option<std::time::Duration>,

    /// Create and migrate the read models on start (`false`: `loom migrate` must have done it).
    #[arg(long, env = "LOOM_MIGRATE_READ_MODELS", default_value_t = true, action = clap::ArgAction::Set)]
    migrate_read_models: bool,
}

impl ProjectionArgs {
    fn config(&self, kafka: &KafkaArgs) -> loom_projector::ProjectorConfig {
        loom_projector::ProjectorConfig {
            group: self
                .group
                .clone()
                .unwrap_or_else(|| format!("{}read-models", kafka.kafka_topic_prefix)),
            batch: self.batch.max(1),
            body_retention: self.body_retention,
            trace_retention: self.trace_retention,
            migrate: self.migrate_read_models,
        }
    }
}

#[derive(Args)]
struct ReplayArgs {
    #[command(flatten)]
    data: DataDirArgs,

    #[command(flatten)]
    kafka: KafkaArgs,

    /// The read models: a Postgres URL, or a directory for SQLite files
    /// [default: <data dir>/read-models].
    #[arg(
        long,
        env = "LOOM_READ_MODELS",
        hide_env_values = true,
        value_name = "URL_OR_DIR"
    )]
    read_models: Option<String>,

    /// The projection to rebuild.
    #[arg(long, default_value = "read_models", value_parser = ["read_models"])]
    projection: String,

    /// Fold the archive's events first, then the log from where the archive ends: rebuilds
    /// history the log no longer holds (Kafka's retention).
    #[arg(long)]
    from_archive: bool,

    #[command(flatten)]
    archive: ArchiveArgs,

    #[command(flatten)]
    key_store: KeyStoreArgs,

    #[command(flatten)]
    projection_args: ProjectionArgs,
}

#[derive(Args)]
struct MigrateArgs {
    /// Postgres to migrate: the key store's tables and the active read models.
    #[arg(
        long,
        env = "LOOM_DATABASE_URL",
        hide_env_values = true,
        value_name = "POSTGRES_URL"
    )]
    database_url: Option<String>,

    /// With --kafka-brokers: create Loom's topics.
    #[command(flatten)]
    kafka: KafkaArgs,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format, &cli.log_filter);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            return fail(&anyhow::Error::new(error).context("starting the async runtime"));
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(code) => code,
        Err(error) => fail(&error),
    }
}

fn fail(error: &anyhow::Error) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "error: {}", describe(error));
    ExitCode::FAILURE
}

/// The error and its causes, `: `-separated; a cause already spelled out in the message before
/// it (errors that print their source themselves) is not repeated.
fn describe(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.ends_with(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve(args, true).await.map(|()| ExitCode::SUCCESS),
        Command::Verify(args) => verify::run(args).await,
        Command::Repair(args) => verify::repair(args).await,
        Command::Migrate(args) => migrate(args).await.map(|()| ExitCode::SUCCESS),
        Command::Bench(args) => bench::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Gateway(args) => {
            if args.kafka.kafka_brokers.is_none() {
                anyhow::bail!(
                    "`loom gateway` runs on a log shared with other processes: set --kafka-brokers \
                     (for everything in one process on the embedded log, use `loom serve`)"
                );
            }
            serve(args, false).await.map(|()| ExitCode::SUCCESS)
        }
        Command::Projector(args) => projector(args).await.map(|()| ExitCode::SUCCESS),
        Command::Archiver(args) => archiver(args).await.map(|()| ExitCode::SUCCESS),
        Command::Query(args) => query(args).await.map(|()| ExitCode::SUCCESS),
        Command::Replay(args) => replay(args).await.map(|()| ExitCode::SUCCESS),
        Command::Sql(args) => sql::run(args).await,
        Command::Export(args) => export::run(args).await,
        Command::Admin(args) => admin::run(args).await.map(|()| ExitCode::SUCCESS),
    }
}

fn init_tracing(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Runs a node; `all_in_one` adds the read-model projector (`loom serve`, not `loom gateway`).
async fn serve(args: ServeArgs, all_in_one: bool) -> anyhow::Result<()> {
    let mut gateway = match &args.config {
        Some(path) => GatewayConfig::load(path, |name| std::env::var(name).ok())?,
        None => GatewayConfig::default(),
    };
    if let Some(ack) = args.events_ack {
        gateway.limits.events_ack = ack;
    }
    // `--read-models off`: the gateway and its log alone.
    let read_models = match args.read_models.as_deref() {
        Some("off") => None,
        named => all_in_one.then(|| read_models(named, &args.data)),
    };
    let lookup_read_models = match args.read_models.as_deref() {
        Some("off") | None => None,
        Some(named) => (!all_in_one).then(|| StoreLocation::parse(named)),
    };
    let archive = match all_in_one {
        true => args
            .archive
            .location(&args.data)?
            .map(|location| (location, args.archiving.config(SERVE_ROLL_MIB))),
        false if args.archive.archive.is_some() => anyhow::bail!(
            "`loom gateway` does not archive: run `loom archiver` beside it (`loom serve` does both)"
        ),
        false => None,
    };
    let exports = match all_in_one && archive.is_some() {
        true => exports_location(args.exports.as_deref(), &args.data, &args.archive.s3)?,
        false => None,
    };
    let config = ServeConfig {
        gateway,
        archive,
        exports,
        read_models,
        lookup_read_models,
        projector: args.projection.config(&args.kafka),
        node: NodeConfig {
            data_dir: args.data.dir(),
            log: args.kafka.location(LogLocation::Embedded {
                fsync: args.fsync,
                segment_bytes: args.segment_bytes,
            }),
            key_store: args.key_store.location(),
            master_key: master_key_from_env(),
            role: "gateway",
        },
        admin_token: args.admin_token.map(SecretString::from),
        dashboard: DashboardConfig {
            registration: args.registration,
            session_ttl: args.session_ttl,
        },
        drain: args.shutdown.drain(),
        otlp_endpoint: args.otlp_endpoint,
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let (shutdown, signals) = cancel_on_signal();
    let served = loom::serve(config, listener, shutdown).await;
    signals.abort();
    Ok(served?)
}

/// The read models named on the command line, or SQLite files in the data directory.
fn read_models(named: Option<&str>, data: &DataDirArgs) -> StoreLocation {
    named.map_or_else(
        || StoreLocation::Sqlite(data.dir().read_models()),
        StoreLocation::parse,
    )
}

async fn projector(args: ProjectorArgs) -> anyhow::Result<()> {
    let (shutdown, signals) = cancel_on_signal();
    let projected = within_deadline(
        loom::roles::projector(
            &args.kafka.location(LogLocation::default()),
            &StoreLocation::parse(&args.read_models),
            args.projection.config(&args.kafka),
            args.listen,
            shutdown.clone(),
        ),
        &shutdown,
        args.shutdown.drain(),
    )
    .await;
    signals.abort();
    projected
}

async fn archiver(args: ArchiverArgs) -> anyhow::Result<()> {
    let Some(location) = args.archive.location(&args.data)? else {
        anyhow::bail!("`loom archiver --archive off` would archive nothing");
    };
    let (shutdown, signals) = cancel_on_signal();
    let archived = within_deadline(
        loom::roles::archiver(
            &args.kafka.location(LogLocation::default()),
            &args.data.dir(),
            master_key_from_env().as_ref(),
            &args.key_store.location(),
            &location,
            args.archiving.config(ARCHIVER_ROLL_MIB),
            args.listen,
            shutdown.clone(),
        ),
        &shutdown,
        args.shutdown.drain(),
    )
    .await;
    signals.abort();
    archived
}

async fn query(args: QueryArgs) -> anyhow::Result<()> {
    if args.kafka.kafka_brokers.is_none() {
        return Err(loom::roles::RoleError::QueryNeedsKafka.into());
    }
    let Some(location) = args.archive.location(&args.data)? else {
        anyhow::bail!("`loom query --archive off` would have nothing to query");
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let (shutdown, signals) = cancel_on_signal();
    let served = loom::roles::query(
        &args.kafka.location(LogLocation::default()),
        &args.data.dir(),
        master_key_from_env().as_ref(),
        &args.key_store.location(),
        &location,
        args.read_models.as_deref().map(StoreLocation::parse),
        exports_location(args.exports.as_deref(), &args.data, &args.archive.s3)?,
        args.admin_token.map(SecretString::from).as_ref(),
        listener,
        args.shutdown.drain(),
        shutdown,
    )
    .await;
    signals.abort();
    Ok(served?)
}

async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let from_archive = match args.from_archive {
        true => match args.archive.location(&args.data)? {
            Some(location) => Some((location, args.key_store.location())),
            None => anyhow::bail!("--from-archive needs an archive, not `--archive off`"),
        },
        false => None,
    };
    let report = loom::roles::replay(
        &args.kafka.location(LogLocation::default()),
        &args.data.dir(),
        master_key_from_env().as_ref(),
        &read_models(args.read_models.as_deref(), &args.data),
        from_archive.as_ref().map(|(archive, keys)| (archive, keys)),
        args.projection_args.config(&args.kafka),
        std::io::IsTerminal::is_terminal(&std::io::stderr()),
    )
    .await?;
    let seconds = report.elapsed.as_secs_f64().max(1e-9);
    let _ = writeln!(
        std::io::stdout(),
        "replayed {} records into version {} in {:.1}s ({:.0} records/s); readers now use \
         version {} (was {})",
        report.records,
        report.version,
        seconds,
        report.records as f64 / seconds,
        report.version,
        report.previous
    );
    Ok(())
}

/// `LOOM_MASTER_KEY`, if set and not empty.
pub fn master_key_from_env() -> Option<SecretString> {
    std::env::var("LOOM_MASTER_KEY")
        .ok()
        .filter(|k| !k.is_empty())
        .map(SecretString::from)
}

/// A token cancelled on SIGINT or SIGTERM, and the task that waits for them (abort it when done).
fn cancel_on_signal() -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    let signals = tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        on_signal.cancel();
    });
    (shutdown, signals)
}

/// Runs a role that stops on `shutdown`; once shutting down, gives it `drain`'s delay and
/// timeout at most.
async fn within_deadline<T, E>(
    role: impl Future<Output = Result<T, E>>,
    shutdown: &CancellationToken,
    drain: Drain,
) -> Result<T, anyhow::Error>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(drain.delay + drain.timeout).await;
    };
    tokio::select! {
        done = role => Ok(done?),
        () = deadline => anyhow::bail!(
            "still stopping after --shutdown-timeout ({}): exiting without waiting further",
            humantime::format_duration(drain.timeout)
        ),
    }
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut terminate) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = terminate.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    Ok(loom::roles::migrate(
        &args.kafka.location(LogLocation::default()),
        args.database_url.as_deref(),
    )
    .await?)
}
