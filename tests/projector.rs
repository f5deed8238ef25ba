//! The read-model projector as users run it: in-process in `loom serve` on SQLite, `loom replay`
//! switching readers to a rebuilt version, and `loom projector` on Kafka and Postgres killed with
//! SIGKILL at random points, then compared table by table with a clean replay.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loom_mock::{MockConfig, MockServer};
use loom_projector::{ReadStore, StoreLocation, stored_positions};
use loom_schemas::codec::Registry;
use loom_schemas::event::Plane;
use loom_schemas::log::{KafkaLog, KafkaLogConfig, Log, Topic};
use loom_schemas::samples;
use loom_schemas::testing::TestDatabase;
use serde_json::json;
use sqlx::Row;
use uuid::Uuid;

use common::{LOOM, Server, loom, text};

const ADMIN: &str = "projector-admin";

fn brokers() -> String {
    std::env::var("LOOM_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

async fn count(store: &ReadStore, sql: &str) -> i64 {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT CAST(({sql}) AS BIGINT)"
    )))
    .fetch_one(store.pool())
    .await
    .unwrap()
    .try_get::<i64, _>(0)
    .unwrap()
}

/// Waits until `sql` counts `expected` in the SQLite file at `path`, read (only) beside the
/// server that writes it; 0 while the server has not created the tables yet.
async fn wait_for_count(path: &std::path::Path, sql: &str, expected: i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = match sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", path.display()))
            .await
        {
            Ok(pool) => {
                let now: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
                    .fetch_one(&pool)
                    .await
                    .unwrap_or(0);
                pool.close().await;
                now
            }
            Err(_) => 0,
        };
        if now == expected {
            return;
        }
        assert!(Instant::now() < deadline, "{sql}: {now}, not {expected}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn chat(client: &reqwest::Client, server: &Server, key: &str, stream: bool) {
    let response = client
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(key)
        .json(&json!({"model": "fast", "stream": stream, "user": "ada",
                      "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_projects_its_traffic_and_replay_switches_readers_to_a_rebuilt_version() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("loom.toml");
    common::write_mock_config(&config, &mock.url());
    let data_dir = dir.path().join("data");
    let args = ["--config", config.to_str().unwrap()];
    let env = [("LOOM_ADMIN_TOKEN", ADMIN)];
    let server = Server::start(&data_dir, &args, &env).unwrap();
    let client = reqwest::Client::new();
    let admin = |path: &str| client.post(server.url(path)).bearer_auth(ADMIN);
    let tenant: serde_json::Value = admin("/admin/tenants")
        .json(&json!({"name": "acme"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key: serde_json::Value = admin("/admin/keys")
        .json(&json!({"tenant_id": tenant["tenant_id"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key = key["key"].as_str().unwrap().to_owned();
    for i in 0..5 {
        chat(&client, &server, &key, i % 2 == 0).await;
    }

    // The in-process projector fills the SQLite read models while the server runs.
    let v1_file = data_dir.join("read-models/v1.sqlite");
    for (sql, expected) in [
        ("SELECT count(*) FROM traces WHERE status = 'ok'", 5),
        ("SELECT COALESCE(SUM(requests), 0) FROM usage_daily", 5),
        ("SELECT count(*) FROM tenants", 1),
        ("SELECT count(*) FROM api_keys", 1),
        (
            "SELECT count(*) FROM traces WHERE stream = 1 AND user_id = 'ada'",
            3,
        ),
    ] {
        wait_for_count(&v1_file, sql, expected).await;
    }
    assert!(server.stop().success());
    let location = StoreLocation::Sqlite(data_dir.join("read-models"));
    let v1 = ReadStore::open(&location, 1).await.unwrap();

    // A replay (the data dir is free now) builds version 2 and points readers at it.
    let replayed = loom(&["replay", "--data-dir", data_dir.to_str().unwrap()]);
    assert!(replayed.status.success(), "{}", text(&replayed.stderr));
    assert!(
        text(&replayed.stdout).contains("readers now use version 2 (was 1)"),
        "{}",
        text(&replayed.stdout)
    );
    assert_eq!(
        std::fs::read_to_string(data_dir.join("read-models/ACTIVE")).unwrap(),
        "2"
    );
    let v2 = ReadStore::open(&location, 2).await.unwrap();
    assert_eq!(v2.digests().await.unwrap(), v1.digests().await.unwrap());
    v1.close().await;
    v2.close().await;

    // A restarted server projects into version 2.
    let server = Server::start(&data_dir, &args, &env).unwrap();
    chat(&client, &server, &key, false).await;
    wait_for_count(
        &data_dir.join("read-models/v2.sqlite"),
        "SELECT count(*) FROM traces",
        6,
    )
    .await;
    wait_for_count(&v1_file, "SELECT count(*) FROM traces", 5).await;

    // A replay beside the running server reads its log read-only; the server's projector moves
    // to version 3 by itself, and new traffic lands there.
    let replayed = loom(&["replay", "--data-dir", data_dir.to_str().unwrap()]);
    assert!(replayed.status.success(), "{}", text(&replayed.stderr));
    assert!(
        text(&replayed.stdout).contains("readers now use version 3 (was 2)"),
        "{}",
        text(&replayed.stdout)
    );
    let v3_file = data_dir.join("read-models/v3.sqlite");
    wait_for_count(&v3_file, "SELECT count(*) FROM traces", 6).await;
    chat(&client, &server, &key, false).await;
    wait_for_count(&v3_file, "SELECT count(*) FROM traces", 7).await;
    wait_for_count(
        &v3_file,
        "SELECT COALESCE(SUM(requests), 0) FROM usage_hourly",
        7,
    )
    .await;
    assert!(server.stop().success());
}

/// A start for generated histories recent enough that no retention applies.
fn two_days_ago() -> i64 {
    loom_schemas::event::now_micros() - 2 * 86_400_000_000
}

fn keys(tenants: usize) -> Vec<loom_schemas::crypto::DataKey> {
    samples::tenant_keys(tenants).unwrap()
}

/// Appends `events` to their topics, control plane first.
async fn append(log: &dyn Log, events: &[loom_schemas::event::Event]) {
    let registry = Registry::builtin().unwrap();
    for plane in [Plane::Control, Plane::Data] {
        let records: Vec<_> = events
            .iter()
            .filter(|e| e.payload.plane() == plane)
            .map(|e| registry.encode_record(e).unwrap())
            .collect();
        for chunk in records.chunks(1000) {
            log.append(Topic::for_plane(plane), chunk.to_vec())
                .await
                .unwrap();
        }
    }
}

/// `loom projector` on the test broker and Postgres.
fn start_projector(prefix: &str, read_models: &str) -> Child {
    spawn_loom(&[
        "projector",
        "--kafka-brokers",
        &brokers(),
        "--kafka-topic-prefix",
        prefix,
        "--read-models",
        read_models,
        "--batch",
        "200",
        // A killed member's partitions are handed on after this, not after 45 s.
        "--kafka-property",
        "session.timeout.ms=6000",
        "--kafka-property",
        "heartbeat.interval.ms=1000",
    ])
}

/// `loom ARGS` in the background, its output discarded.
fn spawn_loom(args: &[&str]) -> Child {
    Command::new(LOOM)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Polls the integer `sql` selects (0 while its table does not exist yet) until `done` holds,
/// while `child` keeps running.
async fn wait_for_postgres(
    pool: &sqlx::PgPool,
    sql: &str,
    child: &mut Child,
    done: impl Fn(i64) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let value: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_owned()))
            .fetch_one(pool)
            .await
            .unwrap_or(0);
        if done(value) {
            return;
        }
        assert!(child.try_wait().unwrap().is_none(), "loom stopped: {sql}");
        assert!(Instant::now() < deadline, "{sql}: still {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn folded(store: &ReadStore) -> u64 {
    let mut done = 0;
    for topic in Topic::ALL {
        done += stored_positions(store, topic)
            .await
            .unwrap()
            .iter()
            .map(|p| p.offset)
            .sum::<u64>();
    }
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_at_random_points_ends_where_a_clean_replay_does() {
    let db = TestDatabase::create().await;
    let prefix = format!("loom-golden-{}.", Uuid::now_v7().simple());
    let mut kafka = KafkaLogConfig::new(brokers());
    kafka.topic_prefix = prefix.clone();
    kafka.data_partitions = 3;
    let log = Arc::new(KafkaLog::connect(kafka).await.unwrap());

    // A history of several tenants: retries, tool calls, streaming, failures, key revocations.
    let events = samples::history(&keys(4), 2000, two_days_ago(), 42).unwrap();
    append(log.as_ref(), &events).await;
    let total = events.len() as u64;

    // The projector, killed without warning at random points, restarted each time.
    let v1 = ReadStore::open(&StoreLocation::Postgres(db.url.clone().into()), 1)
        .await
        .unwrap();
    let mut rng = fastrand::Rng::with_seed(7);
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut projector = start_projector(&prefix, &db.url);
    while folded(&v1).await < total {
        assert!(Instant::now() < deadline, "the projector did not finish");
        if kills < 4 && folded(&v1).await > (kills + 1) * total / 6 {
            tokio::time::sleep(Duration::from_millis(rng.u64(0..100))).await;
            projector.kill().unwrap(); // SIGKILL
            projector.wait().unwrap();
            kills += 1;
            projector = start_projector(&prefix, &db.url);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        kills, 4,
        "the projector finished before it was killed enough"
    );
    projector.kill().unwrap();
    projector.wait().unwrap();

    // A clean replay into version 2 — itself killed part way once, then resumed — and every
    // table is identical.
    let replay_args = [
        "replay",
        "--kafka-brokers",
        &brokers(),
        "--kafka-topic-prefix",
        &prefix,
        "--read-models",
        &db.url,
    ];
    let mut replay = spawn_loom(&replay_args);
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    // The new version's positions pass a third of the log.
    wait_for_postgres(
        &pool,
        "SELECT CAST(COALESCE(SUM(next_offset), 0) AS BIGINT) FROM loom_read_v2.positions",
        &mut replay,
        |at| at as u64 > total / 3,
    )
    .await;
    replay.kill().unwrap(); // SIGKILL
    replay.wait().unwrap();
    let replayed = loom(&replay_args);
    assert!(replayed.status.success(), "{}", text(&replayed.stderr));
    assert!(
        text(&replayed.stdout).contains("readers now use version 2 (was 1)"),
        "{}",
        text(&replayed.stdout)
    );
    let v2 = ReadStore::open(&StoreLocation::Postgres(db.url.clone().into()), 2)
        .await
        .unwrap();
    assert_eq!(v2.digests().await.unwrap(), v1.digests().await.unwrap());
    assert_eq!(count(&v2, "SELECT count(*) FROM traces").await, 2000);
    assert_eq!(count(&v2, "SELECT count(*) FROM dead_letters").await, 0);
    // Readers see version 2 through the loom_read views.
    let active: i32 = sqlx::query_scalar("SELECT active_version FROM public.loom_read_models")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(active, 2);
    let traces: i64 = sqlx::query_scalar("SELECT count(*) FROM loom_read.traces")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(traces, 2000);
    pool.close().await;
    v1.close().await;
    v2.close().await;
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_migrations_off_on_start_loom_migrate_prepares_topics_and_read_models() {
    let db = TestDatabase::create().await;
    let prefix = format!("loom-migrate-{}.", Uuid::now_v7().simple());
    let brokers = brokers();
    let kafka = [
        "--kafka-brokers",
        brokers.as_str(),
        "--kafka-topic-prefix",
        prefix.as_str(),
    ];
    let listen = format!("127.0.0.1:{}", loom_schemas::testing::free_port());
    let projector_args = [
        &["projector"][..],
        &kafka,
        &[
            "--kafka-create-topics",
            "false",
            "--migrate-read-models",
            "false",
            "--read-models",
            &db.url,
            "--listen",
            &listen,
        ],
    ]
    .concat();

    // Not migrated: the projector refuses to start, and says what to do.
    let refused = loom(&projector_args);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("loom migrate"),
        "{}",
        text(&refused.stderr)
    );

    // Topics first: then it is the read models that are missing.
    let migrated = loom(&[&["migrate"][..], &kafka].concat());
    assert!(migrated.status.success(), "{}", text(&migrated.stderr));
    let refused = loom(&projector_args);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("read models version 1 are not migrated"),
        "{}",
        text(&refused.stderr)
    );
    let migrated = loom(&["migrate", "--database-url", &db.url]);
    assert!(migrated.status.success(), "{}", text(&migrated.stderr));

    // The topics exist now (no creation allowed here), and the projector folds into the tables.
    let mut config = KafkaLogConfig::new(&brokers);
    config.topic_prefix = prefix.clone();
    config.create_topics = false;
    let log = KafkaLog::connect(config).await.unwrap();
    let events = samples::history(&keys(1), 1, two_days_ago(), 1).unwrap();
    append(&log, &events).await;
    let mut projector = spawn_loom(&projector_args);
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    wait_for_postgres(
        &pool,
        "SELECT count(*) FROM loom_read_v1.tenants",
        &mut projector,
        |tenants| tenants == 1,
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    // Its metrics show what it folded and where it stands.
    let wanted = [
        "loom_projector_records_total{topic=\"control\"}",
        "loom_projector_position{topic=\"control\",partition=\"0\"}",
    ];
    loop {
        let metrics = reqwest::get(format!("http://{listen}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if wanted.iter().all(|w| metrics.contains(w)) {
            break;
        }
        assert!(Instant::now() < deadline, "{metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    projector.kill().unwrap();
    projector.wait().unwrap();
    pool.close().await;
    db.drop().await;
}
