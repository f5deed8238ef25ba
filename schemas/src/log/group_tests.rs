//! Consumer groups, with a small projection that keeps its positions in Postgres in the same
//! transaction as its rows: a member resumes from the stored positions (not from Kafka's group
//! offsets), and a rebalance hands partitions over so that no record is handled twice or skipped.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;

use super::*;
use crate::testing::TestDatabase;

fn brokers() -> String {
    std::env::var("LOOM_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

async fn kafka(partitions: i32) -> KafkaLog {
    let mut config = KafkaLogConfig::new(brokers());
    config.topic_prefix = format!("loom-group-{}.", uuid::Uuid::now_v7().simple());
    config.data_partitions = partitions;
    KafkaLog::connect(config).await.unwrap()
}

fn record(i: usize) -> Record {
    Record {
        key: format!("trace-{}", i % 17).into_bytes(),
        value: format!("event-{i}").into_bytes(),
        ..Record::default()
    }
}

/// A projection: one row per record, and its positions, written in one transaction per batch.
#[derive(Clone)]
struct Projection {
    pool: PgPool,
}

impl Projection {
    async fn create(url: &str) -> Projection {
        let pool = PgPool::connect(url).await.unwrap();
        sqlx::raw_sql(
            "CREATE TABLE seen (value TEXT PRIMARY KEY, handled INT NOT NULL DEFAULT 1);
             CREATE TABLE positions (partition INT PRIMARY KEY, next_offset BIGINT NOT NULL);",
        )
        .execute(&pool)
        .await
        .unwrap();
        Projection { pool }
    }

    async fn stored(&self, partitions: &[u32]) -> Vec<Position> {
        let rows: Vec<(i32, i64)> = sqlx::query_as("SELECT partition, next_offset FROM positions")
            .fetch_all(&self.pool)
            .await
            .unwrap();
        rows.into_iter()
            .map(|(partition, offset)| Position {
                partition: partition as u32,
                offset: offset as u64,
            })
            .filter(|p| partitions.contains(&p.partition))
            .collect()
    }

    async fn fold(&self, entries: &[Entry]) {
        let mut tx = self.pool.begin().await.unwrap();
        for entry in entries {
            sqlx::query(
                "INSERT INTO seen (value) VALUES ($1)
                 ON CONFLICT (value) DO UPDATE SET handled = seen.handled + 1",
            )
            .bind(String::from_utf8(entry.record.value.clone()).unwrap())
            .execute(&mut *tx)
            .await
            .unwrap();
            sqlx::query(
                "INSERT INTO positions VALUES ($1, $2)
                 ON CONFLICT (partition) DO UPDATE SET next_offset = EXCLUDED.next_offset",
            )
            .bind(entry.position.partition as i32)
            .bind(entry.position.offset as i64 + 1)
            .execute(&mut *tx)
            .await
            .unwrap();
        }
        tx.commit().await.unwrap();
    }

    /// (distinct records, records handled more than once)
    async fn counts(&self) -> (i64, i64) {
        sqlx::query_as("SELECT count(*), count(*) FILTER (WHERE handled > 1) FROM seen")
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }
}

/// What one member did.
#[derive(Default)]
struct Member {
    handled: AtomicUsize,
    revocations: AtomicUsize,
    /// The first offset read from each partition after each assignment, and the stored position
    /// it was assigned at.
    starts: std::sync::Mutex<Vec<(Position, u64)>>,
}

/// Runs a member until `stop` says so (checked after each event). It sleeps `pace` after each
/// batch until its partitions are first revoked, and records Kafka's advisory group offsets when
/// `commit` is set.
async fn run_member(
    mut reader: Box<dyn GroupReader>,
    projection: Projection,
    member: Arc<Member>,
    (pace, commit): (Duration, bool),
    mut stop: impl FnMut(&Member) -> bool,
) {
    let mut assigned_at: Vec<Position> = Vec::new();
    while !stop(&member) {
        let event = tokio::time::timeout(Duration::from_millis(500), reader.next(50)).await;
        let Ok(event) = event else { continue };
        match event.unwrap() {
            GroupEvent::Assigned { partitions, start } => {
                assigned_at = projection.stored(&partitions).await;
                for partition in partitions {
                    if !assigned_at.iter().any(|p| p.partition == partition) {
                        assigned_at.push(Position {
                            partition,
                            offset: 0,
                        });
                    }
                }
                start.send(assigned_at.clone()).unwrap();
            }
            GroupEvent::Entries(entries) => {
                for entry in &entries {
                    if let Some(i) = assigned_at
                        .iter()
                        .position(|p| p.partition == entry.position.partition)
                    {
                        let at = assigned_at.remove(i);
                        member
                            .starts
                            .lock()
                            .unwrap()
                            .push((entry.position, at.offset));
                    }
                }
                projection.fold(&entries).await;
                member.handled.fetch_add(entries.len(), Ordering::SeqCst);
                if commit {
                    let next: Vec<Position> = entries
                        .iter()
                        .map(|e| Position {
                            offset: e.position.offset + 1,
                            ..e.position
                        })
                        .collect();
                    reader.commit(&next).await.unwrap();
                }
                // Slow only until the first rebalance, so that work is left to hand over however
                // long the group takes to rebalance.
                if member.revocations.load(Ordering::SeqCst) == 0 {
                    tokio::time::sleep(pace).await;
                }
            }
            GroupEvent::Revoked { done, .. } => {
                member.revocations.fetch_add(1, Ordering::SeqCst);
                done.send(()).unwrap();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_resumes_from_the_positions_its_projection_stored() {
    let db = TestDatabase::create().await;
    let projection = Projection::create(&db.url).await;
    let log = kafka(3).await;
    log.append(Topic::Data, (0..300).map(record).collect())
        .await
        .unwrap();
    let group = format!("resume-{}", uuid::Uuid::now_v7().simple());

    // The first member stops part way, as a crashed projector would (it never commits group
    // offsets here, so only the stored positions can say where it got to).
    let first = Arc::new(Member::default());
    let reader = log.join_group(&group, Topic::Data).await.unwrap();
    run_member(
        reader,
        projection.clone(),
        Arc::clone(&first),
        (Duration::ZERO, false),
        |m| m.handled.load(Ordering::SeqCst) >= 100,
    )
    .await;
    let handled_first = first.handled.load(Ordering::SeqCst);
    assert!((100..300).contains(&handled_first), "{handled_first}");

    let second = Arc::new(Member::default());
    let reader = log.join_group(&group, Topic::Data).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    run_member(
        reader,
        projection.clone(),
        Arc::clone(&second),
        (Duration::ZERO, true),
        |m| m.handled.load(Ordering::SeqCst) + handled_first >= 300 || Instant::now() > deadline,
    )
    .await;
    assert_eq!(projection.counts().await, (300, 0));
    assert_eq!(second.handled.load(Ordering::SeqCst), 300 - handled_first);
    for (first_read, stored) in second.starts.lock().unwrap().iter() {
        assert_eq!(first_read.offset, *stored, "{first_read:?} did not resume");
    }
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebalance_hands_partitions_over_without_loss_or_repeats() {
    let db = TestDatabase::create().await;
    let projection = Projection::create(&db.url).await;
    let log = kafka(4).await;
    const RECORDS: usize = 12_000;
    log.append(Topic::Data, (0..RECORDS).map(record).collect())
        .await
        .unwrap();
    let group = format!("rebalance-{}", uuid::Uuid::now_v7().simple());
    let total = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + Duration::from_secs(240);

    let spawn_member = |pace| {
        let member = Arc::new(Member::default());
        let (projection, total, log_member) =
            (projection.clone(), Arc::clone(&total), Arc::clone(&member));
        let reader = log.join_group(&group, Topic::Data);
        async move {
            let reader = reader.await.unwrap();
            let task = tokio::spawn(async move {
                let mut last = 0;
                run_member(reader, projection, log_member, (pace, true), move |m| {
                    let now = m.handled.load(Ordering::SeqCst);
                    total.fetch_add(now - last, Ordering::SeqCst);
                    last = now;
                    total.load(Ordering::SeqCst) >= RECORDS || Instant::now() > deadline
                })
                .await;
            });
            (member, task)
        }
    };
    // A slow first member, so that plenty is left when the second one joins.
    let (first, first_task) = spawn_member(Duration::from_millis(100)).await;
    while first.handled.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline, "the first member read nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (second, second_task) = spawn_member(Duration::ZERO).await;
    first_task.await.unwrap();
    second_task.await.unwrap();

    assert_eq!(projection.counts().await, (RECORDS as i64, 0));
    assert!(first.revocations.load(Ordering::SeqCst) >= 1);
    assert!(second.handled.load(Ordering::SeqCst) > 0);
    assert_eq!(
        first.handled.load(Ordering::SeqCst) + second.handled.load(Ordering::SeqCst),
        RECORDS
    );
    for (first_read, stored) in second.starts.lock().unwrap().iter() {
        assert_eq!(first_read.offset, *stored, "{first_read:?}");
    }
    db.drop().await;
}

#[tokio::test]
async fn the_embedded_log_has_one_member_that_starts_where_it_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let log = EmbeddedLog::open(EmbeddedLogConfig::new(
        dir.path(),
        crate::testing::chain_key(),
    ))
    .await
    .unwrap();
    log.append(Topic::Data, (0..10).map(record).collect())
        .await
        .unwrap();
    let mut reader = log.join_group("projector", Topic::Data).await.unwrap();
    let GroupEvent::Assigned { partitions, start } = reader.next(100).await.unwrap() else {
        panic!("expected an assignment first");
    };
    assert_eq!(partitions, [0]);
    start
        .send(vec![Position {
            partition: 0,
            offset: 7,
        }])
        .unwrap();
    let GroupEvent::Entries(entries) = reader.next(100).await.unwrap() else {
        panic!("expected entries");
    };
    let offsets: Vec<u64> = entries.iter().map(|e| e.position.offset).collect();
    assert_eq!(offsets, [7, 8, 9]);
    reader.commit(&[entries[2].position]).await.unwrap();
}
