//! The read-model projection, on SQLite and on the Postgres `./infra/test.sh` starts: a realistic
//! history folds into every table; folding again changes nothing; bad records are dead-lettered
//! and passed; a projection stopped part way resumes to the state a clean run reaches.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use loom_projector::partitions::{self, Month};
use loom_projector::{
    Projector, ProjectorConfig, ReadStore, StoreError, StoreLocation, fold_batch, stored_positions,
};
use loom_schemas::codec::Registry;
use loom_schemas::control::ControlState;
use loom_schemas::event::{Envelope, Event, Plane, RequestCompleted, RequestStatus, now_micros};
use loom_schemas::log::{EmbeddedLog, EmbeddedLogConfig, Log, Record, Topic};
use loom_schemas::samples;
use loom_schemas::testing::TestDatabase;
use sqlx::Row;
use tokio_util::sync::CancellationToken;

/// Two days ago: recent enough that no retention applies, whenever the tests run.
fn start_us() -> i64 {
    now_micros() - 2 * 86_400_000_000
}

/// A read-model store on one backend, removed on `cleanup`.
struct Backend {
    location: StoreLocation,
    _dir: tempfile::TempDir,
    database: Option<TestDatabase>,
}

impl Backend {
    async fn sqlite() -> Backend {
        let dir = tempfile::tempdir().unwrap();
        Backend {
            location: StoreLocation::Sqlite(dir.path().join("read-models")),
            _dir: dir,
            database: None,
        }
    }

    async fn postgres() -> Backend {
        let database = TestDatabase::create().await;
        Backend {
            location: StoreLocation::Postgres(database.url.clone().into()),
            _dir: tempfile::tempdir().unwrap(),
            database: Some(database),
        }
    }

    async fn all() -> Vec<Backend> {
        vec![Backend::sqlite().await, Backend::postgres().await]
    }

    async fn open(&self, version: u32) -> ReadStore {
        ReadStore::open(&self.location, version).await.unwrap()
    }

    async fn cleanup(self) {
        if let Some(database) = self.database {
            database.drop().await;
        }
    }
}

async fn append(log: &dyn Log, events: &[Event]) {
    let registry = Registry::builtin().unwrap();
    for plane in [Plane::Control, Plane::Data] {
        let records: Vec<Record> = events
            .iter()
            .filter(|e| e.payload.plane() == plane)
            .map(|e| registry.encode_record(e).unwrap())
            .collect();
        for chunk in records.chunks(500) {
            log.append(Topic::for_plane(plane), chunk.to_vec())
                .await
                .unwrap();
        }
    }
}

/// An embedded log holding a generated history of `requests` requests of `tenants` tenants.
struct History {
    events: Vec<Event>,
    log: Arc<dyn Log>,
    _dir: tempfile::TempDir,
}

impl History {
    async fn new(tenants: usize, requests: usize, start_us: i64, seed: u64) -> History {
        let keys = samples::tenant_keys(tenants).unwrap();
        let events = samples::history(&keys, requests, start_us, seed).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let log = embedded_log(dir.path()).await;
        append(log.as_ref(), &events).await;
        History {
            events,
            log,
            _dir: dir,
        }
    }
}

async fn embedded_log(dir: &std::path::Path) -> Arc<dyn Log> {
    Arc::new(
        EmbeddedLog::open(EmbeddedLogConfig::new(
            dir,
            loom_schemas::testing::chain_key(),
        ))
        .await
        .unwrap(),
    )
}

/// Whether the store's positions have reached the end of every partition of the log.
async fn caught_up(log: &dyn Log, store: &ReadStore) -> bool {
    for topic in Topic::ALL {
        let stored = stored_positions(store, topic).await.unwrap();
        for partition in 0..log.partitions(topic) {
            let end = log.end_offset(topic, partition).await.unwrap();
            let at = stored
                .iter()
                .find(|p| p.partition == partition)
                .map_or(0, |p| p.offset);
            if at < end {
                return false;
            }
        }
    }
    true
}

/// Runs a projector until it has folded everything in the log.
async fn project(log: &Arc<dyn Log>, store: &ReadStore, batch: usize) {
    let shutdown = CancellationToken::new();
    let config = ProjectorConfig {
        batch,
        ..ProjectorConfig::default()
    };
    let projector = Projector::new(Arc::clone(log), store.clone(), config);
    let running = tokio::spawn(projector.run(shutdown.clone()));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !caught_up(log.as_ref(), store).await {
        assert!(Instant::now() < deadline, "the projector did not catch up");
        assert!(!running.is_finished(), "the projector stopped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

/// The one value `sql` selects, as an integer (Postgres sums are NUMERIC: cast back).
async fn scalar(store: &ReadStore, sql: &str) -> i64 {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT CAST(({sql}) AS BIGINT)"
    )))
    .fetch_one(store.pool())
    .await
    .unwrap_or_else(|e| panic!("{sql}: {e}"))
    .try_get::<i64, _>(0)
    .unwrap()
}

async fn digest(store: &ReadStore) -> BTreeMap<&'static str, String> {
    store.digests().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_folds_into_every_read_model() {
    let History { events, log, _dir } = History::new(3, 600, start_us(), 7).await;
    let count = |event_type: &str| {
        events
            .iter()
            .filter(|e| e.payload.event_type() == event_type)
            .count() as i64
    };

    for backend in Backend::all().await {
        let store = backend.open(1).await;
        project(&log, &store, 256).await;

        assert_eq!(scalar(&store, "SELECT count(*) FROM tenants").await, 3);
        assert_eq!(scalar(&store, "SELECT count(*) FROM projects").await, 3);
        assert_eq!(scalar(&store, "SELECT count(*) FROM api_keys").await, 6);
        assert_eq!(
            scalar(
                &store,
                "SELECT count(*) FROM api_keys WHERE revoked_at IS NOT NULL"
            )
            .await,
            3
        );
        assert_eq!(scalar(&store, "SELECT count(*) FROM traces").await, 600);
        assert_eq!(
            scalar(
                &store,
                "SELECT count(*) FROM traces WHERE completed_at IS NULL OR started_at IS NULL"
            )
            .await,
            0
        );
        assert_eq!(
            scalar(&store, "SELECT count(*) FROM llm_calls").await,
            count("llm_call.completed")
        );
        assert_eq!(
            scalar(&store, "SELECT count(*) FROM tool_calls").await,
            count("tool_call.observed")
        );
        // A request body per request, a response per successful call, arguments per tool call.
        let successes = scalar(&store, "SELECT count(*) FROM traces WHERE status = 'ok'").await;
        assert_eq!(
            scalar(&store, "SELECT count(*) FROM trace_bodies").await,
            600 + successes + count("tool_call.observed")
        );
        let denied = scalar(
            &store,
            "SELECT count(*) FROM traces WHERE status = 'denied'",
        )
        .await;
        assert_eq!(denied, count("quota.denied"));
        assert_eq!(
            scalar(
                &store,
                "SELECT count(*) FROM traces WHERE status = 'ok' AND model_served IS NULL"
            )
            .await,
            0
        );

        // The rollups add up to the traces, per hour and per day, with whole histograms.
        for table in ["usage_hourly", "usage_daily"] {
            let sum = |column: &str| format!("SELECT COALESCE(SUM({column}), 0) FROM {table}");
            assert_eq!(scalar(&store, &sum("requests")).await, 600, "{table}");
            assert_eq!(scalar(&store, &sum("latency_le_inf")).await, 600, "{table}");
            assert_eq!(
                scalar(&store, &sum("errors")).await,
                600 - successes,
                "{table}"
            );
            assert_eq!(
                scalar(&store, &sum("tokens_out")).await,
                scalar(&store, "SELECT COALESCE(SUM(tokens_out), 0) FROM traces").await
            );
            assert_eq!(
                scalar(&store, &sum("cost_micro_usd")).await,
                scalar(
                    &store,
                    "SELECT COALESCE(SUM(cost_micro_usd), 0) FROM traces"
                )
                .await
            );
            assert_eq!(
                scalar(&store, &format!("SELECT count(*) FROM {table} WHERE latency_le_10ms > latency_le_1s OR latency_le_60s > latency_le_inf")).await,
                0,
                "{table}: histogram counts are cumulative"
            );
        }
        // 600 requests at 7.2 s apart span two hours; the five users of three tenants show.
        assert!(
            scalar(
                &store,
                "SELECT count(DISTINCT bucket_start) FROM usage_hourly"
            )
            .await
                >= 2
        );
        assert_eq!(
            scalar(&store, "SELECT count(DISTINCT user_id) FROM usage_daily").await,
            5
        );
        assert_eq!(scalar(&store, "SELECT count(*) FROM dead_letters").await, 0);
        store.close().await;
        backend.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn folding_the_same_records_again_changes_nothing() {
    let History { log, _dir, .. } = History::new(2, 200, start_us(), 11).await;
    let registry = Registry::builtin().unwrap();

    for backend in Backend::all().await {
        let store = backend.open(1).await;
        project(&log, &store, 100).await;
        let before = digest(&store).await;
        // As a redelivering log would: everything again, in other batch sizes, and duplicated.
        for topic in Topic::ALL {
            let mut reader = log.read_from(topic, 0, 0).await.unwrap();
            let entries = reader.poll(100_000).await.unwrap();
            let mut control = ControlState::default();
            for chunk in entries.chunks(37) {
                let doubled: Vec<_> = chunk.iter().chain(chunk).cloned().collect();
                fold_batch(&store, registry, topic, &doubled, &mut control)
                    .await
                    .unwrap();
            }
        }
        assert_eq!(digest(&store).await, before);
        store.close().await;

        // A record delivered twice within one batch the first time it is seen (a spooled copy
        // and its original): counted once, rollups included.
        let store = backend.open(2).await;
        for topic in Topic::ALL {
            let mut reader = log.read_from(topic, 0, 0).await.unwrap();
            let entries = reader.poll(100_000).await.unwrap();
            let mut control = ControlState::default();
            for chunk in entries.chunks(37) {
                let doubled: Vec<_> = chunk.iter().chain(chunk).cloned().collect();
                fold_batch(&store, registry, topic, &doubled, &mut control)
                    .await
                    .unwrap();
            }
        }
        let mut doubled = digest(&store).await;
        let mut once = before.clone();
        // Positions are per batch boundary: the same end, stored either way.
        doubled.remove("positions");
        once.remove("positions");
        assert_eq!(doubled, once);
        store.close().await;
        backend.cleanup().await;
    }
}

/// A batch beyond the stored positions is refused, and nothing of it stored: the batches before
/// it were lost (a database crash took commits it had acknowledged: the projector commits
/// asynchronously) and must be read again. A batch behind them (a retry whose first commit went
/// through) is stored again, changing nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_past_the_stored_positions_is_refused() {
    let History { log, _dir, .. } = History::new(2, 200, start_us(), 12).await;
    let registry = Registry::builtin().unwrap();
    let mut reader = log.read_from(Topic::Data, 0, 0).await.unwrap();
    let entries = reader.poll(100_000).await.unwrap();
    assert!(entries.len() > 150, "{}", entries.len());
    let (first, lost, next) = (&entries[..50], &entries[50..100], &entries[100..]);
    for backend in Backend::all().await {
        let store = backend.open(1).await;
        let mut control = ControlState::default();
        fold_batch(&store, registry, Topic::Data, first, &mut control)
            .await
            .unwrap();
        let before = digest(&store).await;

        let refused = fold_batch(&store, registry, Topic::Data, next, &mut control).await;
        assert!(
            matches!(
                refused,
                Err(StoreError::Behind {
                    topic: "data",
                    partition: 0,
                    stored: 50,
                    start: 100
                })
            ),
            "{refused:?}"
        );
        assert_eq!(digest(&store).await, before);

        for batch in [lost, next, first] {
            fold_batch(&store, registry, Topic::Data, batch, &mut control)
                .await
                .unwrap();
        }
        let clean = backend.open(2).await;
        fold_batch(
            &clean,
            registry,
            Topic::Data,
            &entries,
            &mut ControlState::default(),
        )
        .await
        .unwrap();
        let (mut again, mut once) = (digest(&store).await, digest(&clean).await);
        // The last batch stored was `first`: positions went back to its end.
        again.remove("positions");
        once.remove("positions");
        assert_eq!(again, once);
        store.close().await;
        clean.close().await;
        backend.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_that_cannot_be_folded_are_dead_lettered_and_passed() {
    let keys = samples::tenant_keys(1).unwrap();
    let events = samples::history(&keys, 20, start_us(), 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = embedded_log(dir.path()).await;
    append(log.as_ref(), &events[..events.len() / 2]).await;
    // Garbage, and an event that breaks an invariant (a data event with no trace id).
    let garbage = Record {
        key: b"trace-x".to_vec(),
        value: b"not an event".to_vec(),
        ..Record::default()
    };
    let no_trace = Event {
        envelope: Envelope::new(keys[0].tenant_id, None, "test"),
        payload: RequestCompleted {
            status: RequestStatus::Ok,
            http_status: 200,
            error_class: None,
            model: None,
            provider: None,
            deployment: None,
            attempts: 1,
            tokens_in: None,
            tokens_out: None,
            tokens_cached_read: None,
            tokens_cache_creation: None,
            usage_estimated: false,
            cost_micro_usd: None,
            latency_us: 1,
            ttft_us: None,
            overhead_us: 1,
        }
        .into(),
    };
    let no_trace = Registry::builtin()
        .unwrap()
        .encode_record(&no_trace)
        .unwrap();
    log.append(Topic::Data, vec![garbage, no_trace])
        .await
        .unwrap();
    append(log.as_ref(), &events[events.len() / 2..]).await;

    for backend in Backend::all().await {
        let store = backend.open(1).await;
        project(&log, &store, 64).await;
        assert_eq!(scalar(&store, "SELECT count(*) FROM dead_letters").await, 2);
        assert_eq!(
            scalar(
                &store,
                "SELECT count(*) FROM dead_letters WHERE reason LIKE 'undecodable%'"
            )
            .await,
            1
        );
        assert_eq!(
            scalar(&store, "SELECT count(*) FROM dead_letters WHERE reason LIKE '%no trace id%' AND event_type = 'request.completed'").await,
            1
        );
        assert_eq!(scalar(&store, "SELECT count(*) FROM traces").await, 20);
        // A replay later, into a version of its own, rebuilds every row — dead letters too.
        tokio::time::sleep(Duration::from_millis(5)).await;
        let replayed = backend.open(2).await;
        project(&log, &replayed, 7).await;
        assert_eq!(
            replayed.digests().await.unwrap(),
            store.digests().await.unwrap()
        );
        replayed.close().await;
        store.close().await;
        backend.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projection_stopped_part_way_resumes_to_the_state_of_a_clean_run() {
    let History { log, _dir, .. } = History::new(2, 400, start_us(), 5).await;

    for backend in Backend::all().await {
        let clean = backend.open(1).await;
        project(&log, &clean, 1000).await;

        // Version 2, stopped three times part way, then run to the end.
        let resumed = backend.open(2).await;
        for stop_after in [1, 4, 9] {
            let shutdown = CancellationToken::new();
            let config = ProjectorConfig {
                batch: 20,
                ..ProjectorConfig::default()
            };
            let projector = Projector::new(Arc::clone(&log), resumed.clone(), config);
            let running = tokio::spawn(projector.run(shutdown.clone()));
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let at: u64 = stored_positions(&resumed, Topic::Data)
                    .await
                    .unwrap()
                    .iter()
                    .map(|p| p.offset)
                    .sum();
                if at >= stop_after * 20 {
                    break;
                }
                assert!(Instant::now() < deadline);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            shutdown.cancel();
            running.await.unwrap().unwrap();
        }
        project(&log, &resumed, 20).await;
        assert_eq!(digest(&resumed).await, digest(&clean).await);
        clean.close().await;
        resumed.close().await;
        backend.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_whole_months_on_postgres_and_old_rows_on_sqlite() {
    // Two hours of traffic around the start of this month.
    let this_month = Month::of(now_micros()).start_micros();
    let History { events, log, _dir } = History::new(2, 1000, this_month - 3_600_000_000, 13).await;
    let recent = |event_type: &str| {
        events
            .iter()
            .filter(|e| e.payload.event_type() == event_type)
            .filter(|e| e.envelope.occurred_at >= this_month)
            .count() as i64
    };

    for backend in Backend::all().await {
        let store = backend.open(1).await;
        project(&log, &store, 500).await;
        if store.backend() == loom_projector::Backend::Postgres {
            let partitions = scalar(
                &store,
                "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
                 WHERE p.relname IN ('traces', 'llm_calls', 'trace_bodies')",
            )
            .await;
            assert_eq!(partitions, 6, "a partition per table and month");
        }
        let total = scalar(&store, "SELECT count(*) FROM traces").await;
        assert_eq!(total, 1000);

        // Everything from before this month goes; this month's rows stay.
        let age = Duration::from_micros((now_micros() - this_month) as u64);
        let removed = partitions::expire(&store, age, Some(age)).await.unwrap();
        assert!(removed > 0);
        assert_eq!(
            scalar(&store, "SELECT count(*) FROM traces").await,
            recent("request.received")
        );
        assert_eq!(
            scalar(&store, "SELECT count(*) FROM llm_calls").await,
            recent("llm_call.completed")
        );
        assert_eq!(
            scalar(
                &store,
                &format!("SELECT count(*) FROM trace_bodies WHERE occurred_at < {this_month}")
            )
            .await,
            0
        );
        store.close().await;
        backend.cleanup().await;
    }
}

/// The secondary indexes of the read models, by name and definition.
async fn indexes(store: &ReadStore) -> Vec<(String, String)> {
    let sql = match store.backend() {
        loom_projector::Backend::Sqlite => {
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL ORDER BY name"
        }
        loom_projector::Backend::Postgres => {
            "SELECT CAST(indexname AS TEXT), indexdef FROM pg_indexes \
             WHERE schemaname = current_schema() ORDER BY indexname"
        }
    };
    let version = format!("loom_read_v{}", store.version());
    sqlx::query(sql)
        .fetch_all(store.pool())
        .await
        .unwrap()
        .iter()
        .map(|row| {
            let definition: String = row.try_get(1).unwrap();
            (row.try_get(0).unwrap(), definition.replace(&version, "v"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_builds_without_secondary_indexes_and_ends_with_all_of_them() {
    let History { log, _dir, .. } = History::new(2, 300, start_us(), 17).await;
    for backend in Backend::all().await {
        let live = backend.open(1).await;
        project(&log, &live, 100).await;
        let wanted = indexes(&live).await;
        assert!(wanted.len() >= 11, "{wanted:?}");
        live.close().await;

        let config = ProjectorConfig {
            group: "replay-indexes".into(),
            batch: 100,
            ..ProjectorConfig::default()
        };
        let report =
            loom_projector::replay(Arc::clone(&log), None, &backend.location, config, false)
                .await
                .unwrap();
        assert_eq!(report.version, 2);
        let rebuilt = backend.open(2).await;
        // Every index again (on Postgres, on every partition too), and none left deferred.
        assert_eq!(indexes(&rebuilt).await, wanted);
        let deferred: i64 = sqlx::query("SELECT CAST(count(*) AS BIGINT) FROM deferred_indexes")
            .fetch_one(rebuilt.pool())
            .await
            .unwrap()
            .try_get(0)
            .unwrap();
        assert_eq!(deferred, 0);
        assert_eq!(digest(&rebuilt).await, digest(&backend.open(1).await).await);
        rebuilt.close().await;
        backend.cleanup().await;
    }
}
