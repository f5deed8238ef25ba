//! The Kafka transport against the real broker `./infra/test.sh` starts (`LOOM_TEST_KAFKA_BROKERS`).
//! Every test uses its own topic prefix.

use std::sync::Arc;
use std::time::Duration;

use super::*;

fn brokers() -> String {
    std::env::var("LOOM_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

async fn connect(partitions: i32) -> KafkaLog {
    let mut config = KafkaLogConfig::new(brokers());
    config.topic_prefix = format!("loom-test-{}.", uuid::Uuid::now_v7().simple());
    config.data_partitions = partitions;
    KafkaLog::connect(config).await.unwrap_or_else(|e| {
        panic!(
            "test broker at {} (start it with ./infra/test.sh): {e}",
            brokers()
        )
    })
}

fn record(key: &str, i: u64) -> Record {
    Record {
        key: key.as_bytes().to_vec(),
        headers: vec![
            Header::new("loom.event_type", b"test.event"),
            Header::new("n", i.to_string().as_bytes()),
        ],
        value: format!("{key}:{i}").into_bytes(),
        timestamp_us: 1_700_000_000_000_000 + i as i64 * 1000,
    }
}

async fn read_all(log: &KafkaLog, topic: Topic, partition: u32, from: u64) -> Vec<Entry> {
    let mut reader = log.read_from(topic, partition, from).await.unwrap();
    let mut entries = Vec::new();
    loop {
        let batch = reader.poll(500).await.unwrap();
        if batch.is_empty() {
            return entries;
        }
        entries.extend(batch);
    }
}

#[tokio::test]
async fn records_round_trip_with_keys_headers_and_positions() {
    let log = connect(3).await;
    assert_eq!(
        (log.partitions(Topic::Data), log.partitions(Topic::Control)),
        (3, 1)
    );
    let positions = log
        .append(
            Topic::Control,
            (0..5).map(|i| record("tenant", i)).collect(),
        )
        .await
        .unwrap();
    assert_eq!(
        positions
            .iter()
            .map(|p| (p.partition, p.offset))
            .collect::<Vec<_>>(),
        (0..5).map(|o| (0, o)).collect::<Vec<_>>()
    );
    assert_eq!(log.end_offset(Topic::Control, 0).await.unwrap(), 5);

    let entries = read_all(&log, Topic::Control, 0, 0).await;
    assert_eq!(entries.len(), 5);
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(entry.record, record("tenant", i as u64));
        assert_eq!(entry.position.offset, i as u64);
    }
    let tail = read_all(&log, Topic::Control, 0, 3).await;
    assert_eq!(
        tail.iter().map(|e| e.position.offset).collect::<Vec<_>>(),
        [3, 4]
    );
    assert!(matches!(
        log.read_from(Topic::Control, 1, 0).await.err(),
        Some(LogError::UnknownPartition { .. })
    ));
}

#[tokio::test]
async fn records_with_one_key_stay_in_one_partition_in_order() {
    let log = connect(3).await;
    let mut records = Vec::new();
    for i in 0..30 {
        for key in ["trace-a", "trace-b", "trace-c", "trace-d"] {
            records.push(record(key, i));
        }
    }
    let positions = log.append(Topic::Data, records.clone()).await.unwrap();
    let mut partition_of = std::collections::HashMap::new();
    for (record, position) in records.iter().zip(&positions) {
        let first = *partition_of
            .entry(record.key.clone())
            .or_insert(position.partition);
        assert_eq!(first, position.partition, "one key, one partition");
    }
    let mut seen = 0;
    for partition in 0..3 {
        let entries = read_all(&log, Topic::Data, partition, 0).await;
        seen += entries.len();
        for key in ["trace-a", "trace-b", "trace-c", "trace-d"] {
            let numbers: Vec<u64> = entries
                .iter()
                .filter(|e| e.record.key == key.as_bytes())
                .map(|e| {
                    String::from_utf8_lossy(e.record.header("n").unwrap())
                        .parse()
                        .unwrap()
                })
                .collect();
            assert!(
                numbers.windows(2).all(|w| w[0] < w[1]),
                "{key} out of order: {numbers:?}"
            );
        }
    }
    assert_eq!(seen, 120);
}

#[tokio::test]
async fn a_tailing_reader_gets_records_appended_later() {
    let log = Arc::new(connect(1).await);
    let mut reader = log.read_from(Topic::Control, 0, 0).await.unwrap();
    let waiting = tokio::spawn(async move { reader.next(10).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    log.append(Topic::Control, vec![record("k", 1)])
        .await
        .unwrap();
    let entries = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(entries[0].record, record("k", 1));
    log.sync().await.unwrap();
}
