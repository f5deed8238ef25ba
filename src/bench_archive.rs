//! `loom bench archive`: the archive projector. A realistic history goes into an embedded log;
//! the same events, decoded once, are written as plaintext Parquet (the baseline: what a plain
//! Parquet sink costs) and as Loom's encrypted files (the cost of encryption and digests); then
//! the archiver itself archives the log into a local directory (events/s, CPU per event, bytes
//! per event, compression); finally the history is read back and replayed into SQLite from the
//! archive and from the log.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use loom_projector::archive::columns::{LogPosition, Row, batch};
use loom_projector::archive::file::{self, ROW_GROUP_ROWS};
use loom_projector::archive::{
    Archive, ArchiveConfig, ArchiveLocation, Archiver, SYSTEM_TENANT, read,
};
use loom_projector::{FromArchive, ProjectorConfig, StoreLocation};
use loom_schemas::codec::Registry;
use loom_schemas::crypto::DataKey;
use loom_schemas::keystore::{KeyStore, MasterKey};
use loom_schemas::log::{EmbeddedLog, EmbeddedLogConfig, FsyncPolicy, Log, Topic};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::bench::say;

#[derive(clap::Args)]
pub struct ArchiveBenchArgs {
    /// Events in the history archived (about 5.5 per request).
    #[arg(long, default_value_t = 500_000)]
    events: usize,
    /// Tenants the history is spread over.
    #[arg(long, default_value_t = 8)]
    tenants: usize,
    /// Also replay the history into SQLite from the archive and from the log.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    replay: bool,
    /// Where the log, the archive and the SQLite files go (a temporary directory inside it is
    /// removed).
    #[arg(long, default_value_os_t = std::env::temp_dir())]
    dir: std::path::PathBuf,
}

/// utime + stime of this process so far, in seconds.
pub(crate) fn cpu_seconds() -> f64 {
    crate::bench_gateway::cpu_seconds(std::process::id()).unwrap_or(f64::NAN)
}

/// Wall and CPU time of one measured step.
struct Measured {
    seconds: f64,
    cpu: f64,
}

async fn measure<T>(
    step: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Measured)> {
    let (started, cpu) = (Instant::now(), cpu_seconds());
    let value = step.await?;
    Ok((
        value,
        Measured {
            seconds: started.elapsed().as_secs_f64(),
            cpu: cpu_seconds() - cpu,
        },
    ))
}

fn line(name: &str, events: usize, bytes: u64, measured: &Measured, note: &str) {
    let rate = events as f64 / measured.seconds.max(1e-9);
    say!(
        "{name:<44} {rate:>10.0} {:>9.2} {:>9.1} {:>9} {note}",
        measured.cpu * 1e6 / events.max(1) as f64,
        bytes as f64 / events.max(1) as f64,
        format!("{:.1}s", measured.seconds),
    );
}

/// A scratch key store with the system tenant's keys (which the archiver would create on
/// start) and `tenants` new tenants' keys, and an embedded log without fsync, under `dir`.
pub(crate) async fn scratch(
    dir: &std::path::Path,
    tenants: usize,
) -> anyhow::Result<(Arc<KeyStore>, Vec<DataKey>, Arc<dyn Log>)> {
    let keys = Arc::new(KeyStore::open_file(dir.join("keys.json"), MasterKey::generate()?).await?);
    keys.create_tenant_keys(SYSTEM_TENANT).await?;
    let mut data_keys = Vec::new();
    for _ in 0..tenants.max(1) {
        let tenant = Uuid::now_v7();
        keys.create_tenant_keys(tenant).await?;
        data_keys.push(keys.current_key(tenant)?);
    }
    let log: Arc<dyn Log> = Arc::new(
        EmbeddedLog::open(EmbeddedLogConfig {
            fsync: FsyncPolicy::Never,
            ..EmbeddedLogConfig::new(dir.join("log"), crate::bench::chain_key())
        })
        .await?,
    );
    Ok((keys, data_keys, log))
}

pub async fn run(args: ArchiveBenchArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir_in(&args.dir)?;
    let (keys, data_keys, log) = scratch(dir.path(), args.tenants).await?;
    let started = Instant::now();
    let events =
        crate::bench_projector::write_history(log.as_ref(), args.events, &data_keys).await?;
    say!(
        "history: {events} events of {} tenants written in {:.1}s",
        data_keys.len(),
        started.elapsed().as_secs_f64()
    );

    // The events as the archiver turns them into rows, once, per tenant.
    let registry = Registry::builtin()?;
    let (rows, record_bytes) = rows_of(log.as_ref(), registry).await?;
    say!(
        "          {:.1} MB of Avro records ({:.0} bytes per event)\n",
        record_bytes as f64 / 1e6,
        record_bytes as f64 / events.max(1) as f64
    );
    say!(
        "{:<44} {:>10} {:>9} {:>9} {:>9}",
        "",
        "events/s",
        "CPU µs/ev",
        "bytes/ev",
        "time"
    );

    // Baseline: the same rows as plaintext Parquet (zstd, same row groups), no keys, no digests.
    let plain_rows = rows.clone();
    let (plain_bytes, plain) = measure(async move {
        tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let mut bytes = 0;
            for mut rows in plain_rows.into_values() {
                rows.sort_by_key(|r| (r.occurred_at, r.log_partition, r.log_offset));
                let batches = rows
                    .chunks(ROW_GROUP_ROWS)
                    .map(batch)
                    .collect::<Result<Vec<_>, _>>()?;
                bytes += file::write_plaintext(&batches)?.len() as u64;
            }
            Ok(bytes)
        })
        .await?
    })
    .await?;
    line(
        "baseline  plaintext Parquet, same batches",
        events,
        plain_bytes,
        &plain,
        "",
    );

    // Loom's files: digests, fresh wrapped keys, every column encrypted.
    let keys_for_files = Arc::clone(&keys);
    let (sealed_bytes, sealed) = measure(async move {
        tokio::task::spawn_blocking(move || -> anyhow::Result<u64> {
            let mut bytes = 0;
            for (tenant, mut rows) in rows {
                bytes += file::write(&keys_for_files, tenant, &mut rows)?.len() as u64;
            }
            Ok(bytes)
        })
        .await?
    })
    .await?;
    line(
        "encrypted Parquet (Loom's files), same rows",
        events,
        sealed_bytes,
        &sealed,
        &format!(
            "encryption + digests: {:+.0}% time, {:+.2}% bytes",
            (sealed.seconds / plain.seconds.max(1e-9) - 1.0) * 100.0,
            (sealed_bytes as f64 / plain_bytes.max(1) as f64 - 1.0) * 100.0
        ),
    );

    // The archiver: reading the log, deduplicating, buffering per tenant, writing the files and
    // the manifests, into a local directory.
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
    let ((), archived) = measure(async {
        let shutdown = CancellationToken::new();
        let running = tokio::spawn({
            let (archiver, shutdown) = (Arc::clone(&archiver), shutdown.clone());
            async move { archiver.run(shutdown).await }
        });
        // Until every record is read; then stopping writes out what is buffered.
        while archiver.records_read() < events as u64 && !running.is_finished() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        running.await??;
        Ok(())
    })
    .await?;
    let report = loom_projector::archive::verify::verify(&archive).await?;
    anyhow::ensure!(
        report.rows == events as u64,
        "the archive holds {} of {events} events",
        report.rows
    );
    line(
        "archiver  log → encrypted files + manifests",
        events,
        report.bytes,
        &archived,
        &format!(
            "{} files, compression {:.2}x of the Avro records",
            report.files,
            record_bytes as f64 / report.bytes.max(1) as f64
        ),
    );
    say!(
        "          {:.2}x of the plaintext baseline's events/s (target: 100,000 events/s)",
        plain.seconds / archived.seconds.max(1e-9)
    );

    // Reading the history back in log order: the archive against the log.
    let (from_log, log_read) = measure(read_log(log.as_ref(), registry)).await?;
    line("read back  the log, decoded", from_log, 0, &log_read, "");
    let (from_archive, archive_read) = measure(async {
        let mut manifests = BTreeMap::new();
        for tenant in archive.tenants().await? {
            manifests.insert(tenant, archive.manifest(tenant).await?);
        }
        let mut read = 0;
        read::in_log_order(&archive, &keys, &manifests, async |_, entries| {
            for entry in &entries {
                std::hint::black_box(registry.decode(&entry.record.value)?);
            }
            read += entries.len();
            Ok::<_, anyhow::Error>(())
        })
        .await?;
        Ok(read)
    })
    .await?;
    line(
        "read back  the archive in log order, decoded",
        from_archive,
        0,
        &archive_read,
        "",
    );

    if args.replay {
        say!("");
        for (name, from) in [
            ("replay   from the log into SQLite", None),
            (
                "replay   from the archive into SQLite",
                Some(FromArchive {
                    archive: archive.clone(),
                    keys: Arc::clone(&keys),
                }),
            ),
        ] {
            let location = StoreLocation::Sqlite(dir.path().join(format!("rm-{}", from.is_some())));
            let config = ProjectorConfig {
                group: format!("loom-bench-{}", Uuid::now_v7().simple()),
                ..ProjectorConfig::default()
            };
            let (report, replayed) = measure(async {
                Ok(
                    loom_projector::replay(Arc::clone(&log), from, &location, config, false)
                        .await?,
                )
            })
            .await?;
            line(name, report.records as usize, 0, &replayed, "");
        }
    }
    Ok(())
}

/// Every event of the log as the archiver's rows, per tenant, and the records' total size.
async fn rows_of(
    log: &dyn Log,
    registry: &Registry,
) -> anyhow::Result<(BTreeMap<Uuid, Vec<Row>>, u64)> {
    let mut rows: BTreeMap<Uuid, Vec<Row>> = BTreeMap::new();
    let mut bytes = 0;
    for topic in Topic::ALL {
        for partition in 0..log.partitions(topic) {
            let mut reader = log.read_from(topic, partition, 0).await?;
            loop {
                let entries = reader.poll(10_000).await?;
                if entries.is_empty() {
                    break;
                }
                for entry in entries {
                    let event = registry.decode(&entry.record.value)?;
                    let version = registry
                        .current_version(event.payload.event_type())
                        .context("an event type without a schema")?;
                    let tenant = loom_projector::archive::archiver::tenant_of(
                        registry,
                        topic,
                        &entry.record,
                    );
                    bytes += entry.record.value.len() as u64;
                    let position = LogPosition {
                        topic: topic.name(),
                        partition: entry.position.partition,
                        offset: entry.position.offset,
                    };
                    let row = Row::new(
                        &event,
                        i32::try_from(version)?,
                        position,
                        entry.record.timestamp_us,
                        entry.record.value,
                    );
                    rows.entry(tenant).or_default().push(row);
                }
            }
        }
    }
    Ok((rows, bytes))
}

/// Reads and decodes every record of the log; how many.
async fn read_log(log: &dyn Log, registry: &Registry) -> anyhow::Result<usize> {
    let mut read = 0;
    for topic in Topic::ALL {
        for partition in 0..log.partitions(topic) {
            let mut reader = log.read_from(topic, partition, 0).await?;
            loop {
                let entries = reader.poll(10_000).await?;
                if entries.is_empty() {
                    break;
                }
                for entry in &entries {
                    std::hint::black_box(registry.decode(&entry.record.value)?);
                }
                read += entries.len();
            }
        }
    }
    Ok(read)
}
