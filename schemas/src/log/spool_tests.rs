//! The spool against a broker of its own (nisshi with Postgres storage, so it keeps its data
//! across the restart), stopped and started by the test.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::*;
use crate::testing::{TestBroker as Broker, TestDatabase, free_port};

fn record(i: usize) -> Record {
    Record {
        key: format!("trace-{}", i % 3).into_bytes(),
        value: format!("event-{i}").into_bytes(),
        ..Record::default()
    }
}

async fn open(port: u16, prefix: &str, spool_dir: &std::path::Path) -> SpooledLog {
    let mut config = KafkaLogConfig::new(format!("127.0.0.1:{port}"));
    config.topic_prefix = prefix.to_owned();
    config.data_partitions = 1;
    config.timeout = Duration::from_secs(3);
    let kafka = Arc::new(KafkaLog::connect(config).await.unwrap());
    let spool = SpoolConfig {
        dir: spool_dir.to_owned(),
        max_records: 40,
        kafka_timeout: Duration::from_secs(2),
        forward_timeout: Duration::from_secs(5),
        chain_key: crate::testing::chain_key(),
    };
    SpooledLog::open(kafka, spool).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_spools_and_a_restart_drains_every_event() {
    let db = TestDatabase::create().await;
    let storage = db.broker_storage();
    let port = free_port();
    let prefix = format!("loom-spool-{}.", uuid::Uuid::now_v7().simple());
    let spool_dir = tempfile::tempdir().unwrap();

    let broker = Broker::start(port, &storage);
    let log = open(port, &prefix, spool_dir.path()).await;
    for batch in 0..4 {
        log.append(
            Topic::Data,
            (batch * 5..batch * 5 + 5).map(record).collect(),
        )
        .await
        .unwrap();
    }
    assert_eq!(log.spooled().await.unwrap(), 0);

    // The broker goes away: appends land in the spool, in order, up to its bound.
    broker.kill();
    for batch in 4..10 {
        log.append(
            Topic::Data,
            (batch * 5..batch * 5 + 5).map(record).collect(),
        )
        .await
        .unwrap();
    }
    assert_eq!(log.spooled().await.unwrap(), 30);
    let refused = log
        .append(Topic::Data, (50..65).map(record).collect())
        .await;
    assert!(
        matches!(refused, Err(LogError::SpoolFull { records: 30 })),
        "{refused:?}"
    );

    // The process dies with a full spool (nothing drained); the broker and the process come back.
    drop(log);
    let _broker = Broker::start(port, &storage);
    let log = Arc::new(open(port, &prefix, spool_dir.path()).await);
    assert_eq!(log.spooled().await.unwrap(), 30);
    let shutdown = CancellationToken::new();
    let draining = {
        let log = Arc::clone(&log);
        let shutdown = shutdown.clone();
        tokio::spawn(async move { log.drain(shutdown).await })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while log.spooled().await.unwrap() > 0 {
        assert!(Instant::now() < deadline, "the spool did not drain");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Drained: appends go to Kafka directly again.
    log.append(Topic::Data, (65..70).map(record).collect())
        .await
        .unwrap();
    assert_eq!(log.spooled().await.unwrap(), 0);
    shutdown.cancel();
    draining.await.unwrap();

    // Downstream sees every event (at least once; consumers dedupe by id), in order per key.
    let mut reader = log.read_from(Topic::Data, 0, 0).await.unwrap();
    let mut values = Vec::new();
    loop {
        let batch = reader.poll(1000).await.unwrap();
        if batch.is_empty() {
            break;
        }
        values.extend(
            batch
                .into_iter()
                .map(|e| String::from_utf8(e.record.value).unwrap()),
        );
    }
    let distinct: BTreeSet<&str> = values.iter().map(String::as_str).collect();
    let expected: BTreeSet<String> = (0..50)
        .chain(65..70)
        .map(|i| format!("event-{i}"))
        .collect();
    assert_eq!(distinct, expected.iter().map(String::as_str).collect());
    // Keeping each event's first copy, every key's events are in the order they were appended.
    let mut seen = BTreeSet::new();
    let mut last_of_key = [None::<usize>; 3];
    for value in &values {
        if !seen.insert(value.as_str()) {
            continue;
        }
        let i: usize = value.trim_start_matches("event-").parse().unwrap();
        let last = &mut last_of_key[i % 3];
        assert!(
            last.is_none_or(|l| l < i),
            "event-{i} after event-{last:?} of the same key"
        );
        *last = Some(i);
    }
    db.drop().await;
}
