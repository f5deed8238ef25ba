//! `loom bench kafka`: the log on a Kafka-protocol broker — producer throughput at the gateway's
//! batch sizes, against the embedded log in the same run; the spool's write and drain rates; and
//! the latency from an append to the record being readable by a tailing reader.

use crate::bench::{percentile, say};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use loom_schemas::codec::Registry;
use loom_schemas::crypto::{DataKey, KeyBytes};
use loom_schemas::log::{
    EmbeddedLog, EmbeddedLogConfig, KafkaLog, KafkaLogConfig, Log, Record, SpoolConfig, SpooledLog,
    Topic,
};
use loom_schemas::samples;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(clap::Args)]
pub struct KafkaBenchArgs {
    /// The broker(s) to measure against.
    #[arg(long, env = "LOOM_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    brokers: String,
    /// Seconds per throughput case.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Appends measured for the end-to-end latency.
    #[arg(long, default_value_t = 500)]
    samples: usize,
    /// Records written to the spool and then drained to the broker.
    #[arg(long, default_value_t = 50_000)]
    spool_records: usize,
}

/// Appends batches of `batch` records for `seconds`; events/s, MB/s and per-batch latencies.
async fn throughput(
    log: &dyn Log,
    record: &Record,
    batch: usize,
    seconds: f64,
) -> anyhow::Result<(f64, f64, Vec<f64>)> {
    let started = Instant::now();
    let mut events = 0usize;
    let mut latencies = Vec::new();
    while started.elapsed().as_secs_f64() < seconds {
        let records = vec![record.clone(); batch];
        let t = Instant::now();
        log.append(Topic::Data, records).await?;
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        events += batch;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    Ok((
        events as f64 / elapsed,
        (events * record.value.len()) as f64 / 1e6 / elapsed,
        latencies,
    ))
}

pub async fn run(args: KafkaBenchArgs) -> anyhow::Result<()> {
    let mut config = KafkaLogConfig::new(&args.brokers);
    config.topic_prefix = format!("loom-bench-{}.", Uuid::now_v7().simple());
    config.data_partitions = 6;
    let kafka = Arc::new(
        KafkaLog::connect(config)
            .await
            .context("connecting to the broker")?,
    );
    let work = tempfile::Builder::new()
        .prefix("loom-bench-kafka")
        .tempdir()?;
    let embedded = EmbeddedLog::open(EmbeddedLogConfig::new(
        work.path(),
        crate::bench::chain_key(),
    ))
    .await?;
    let key = DataKey {
        tenant_id: Uuid::now_v7(),
        key_id: Uuid::now_v7(),
        version: 1,
        key: KeyBytes::generate()?,
    };
    let record = Registry::builtin()?.encode_record(&samples::llm_call_completed(
        &key,
        "trace-bench",
        2048,
    )?)?;

    say!(
        "loom bench kafka: llm_call.completed records of {} bytes to {} (idempotent, acks=all, lz4, linger 5 ms, 6 partitions); \
         baseline: the embedded log (fsync every 200 ms) in the same run",
        record.value.len(),
        args.brokers
    );
    say!(
        "{:<28} {:>12} {:>9} {:>14} {:>14}",
        "case",
        "events/s",
        "MB/s",
        "p50 ms/batch",
        "p99 ms/batch"
    );
    for batch in [1usize, 64, 512] {
        let (kafka_rate, kafka_mb, kafka_lat) =
            throughput(&*kafka, &record, batch, args.seconds).await?;
        let (local_rate, local_mb, local_lat) =
            throughput(&embedded, &record, batch, args.seconds).await?;
        say!(
            "{:<28} {kafka_rate:>12.0} {kafka_mb:>9.1} {:>14.3} {:>14.3}",
            format!("kafka batch={batch}"),
            percentile(&kafka_lat, 0.5),
            percentile(&kafka_lat, 0.99)
        );
        say!(
            "{:<28} {local_rate:>12.0} {local_mb:>9.1} {:>14.3} {:>14.3}",
            format!("embedded batch={batch}"),
            percentile(&local_lat, 0.5),
            percentile(&local_lat, 0.99)
        );
        say!(
            "{:<28} {:>11.2}x",
            "  kafka/embedded",
            kafka_rate / local_rate.max(1e-9)
        );
    }

    spool(&kafka, &record, args.spool_records).await?;

    // End to end: from the start of an append to the record arriving at a tailing reader.
    let end = kafka.end_offset(Topic::Control, 0).await?;
    let mut reader = kafka.read_from(Topic::Control, 0, end).await?;
    let mut latencies = Vec::with_capacity(args.samples);
    for _ in 0..args.samples {
        let started = Instant::now();
        kafka.append(Topic::Control, vec![record.clone()]).await?;
        let arrived = tokio::time::timeout(Duration::from_secs(30), reader.next(1))
            .await
            .context("the record never arrived")??;
        anyhow::ensure!(arrived.len() == 1, "expected one record");
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    say!(
        "append to readable by a tailing reader ({} samples, one at a time): p50 {:.3} ms, p99 {:.3} ms",
        latencies.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99)
    );
    Ok(())
}

/// The spool as an outage fills it (fsync per batch of 64, as the gateway's writer appends) and as
/// it drains to the broker afterwards.
async fn spool(kafka: &Arc<KafkaLog>, record: &Record, records: usize) -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("loom-bench-spool")
        .tempdir()?;
    let filled = {
        let spool = EmbeddedLog::open(EmbeddedLogConfig {
            fsync: loom_schemas::log::FsyncPolicy::Always,
            ..EmbeddedLogConfig::new(dir.path(), crate::bench::chain_key())
        })
        .await?;
        let started = Instant::now();
        let mut written = 0;
        while written < records {
            let batch = 64.min(records - written);
            spool
                .append(Topic::Data, vec![record.clone(); batch])
                .await?;
            written += batch;
        }
        started.elapsed().as_secs_f64()
    };
    // Reopened with nothing forwarded yet, as after a restart: the drain task forwards it all.
    let spooled = Arc::new(
        SpooledLog::open(
            Arc::clone(kafka),
            SpoolConfig::new(dir.path(), crate::bench::chain_key()),
        )
        .await?,
    );
    let shutdown = CancellationToken::new();
    let draining = {
        let spooled = Arc::clone(&spooled);
        let shutdown = shutdown.clone();
        tokio::spawn(async move { spooled.drain(shutdown).await })
    };
    let started = Instant::now();
    while spooled.spooled().await? > 0 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(600),
            "the spool did not drain"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = started.elapsed().as_secs_f64();
    shutdown.cancel();
    draining.await?;
    let mb = (records * record.value.len()) as f64 / 1e6;
    say!(
        "spool: {records} records written at {:.0} events/s ({:.1} MB/s, fsync per batch of 64), drained to the broker at {:.0} events/s ({:.1} MB/s)",
        records as f64 / filled,
        mb / filled,
        records as f64 / drained,
        mb / drained
    );
    Ok(())
}
