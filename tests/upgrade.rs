//! Upgrades: a data directory written by an earlier build of Loom (each fixture in
//! `tests/fixtures/upgrade/`, made by `infra/upgrade-fixture.sh`: its embedded log, SQLite read
//! models, archive and master key, with a tenant, a key and requests of every kind) opens with
//! this build: the log and archive verify, the read models migrate on start, the old key still
//! authenticates, old traces read with their sealed bodies, new requests join them, a replay
//! rebuilds the read models from the upgraded log, and SQL over the archive reads old and new
//! files together. The same for the earlier build's read models on Postgres (dumped with the
//! fixture), and for its records on Kafka topics.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use loom_mock::{MockConfig, MockServer};
use loom_projector::{ReadStore, StoreLocation};
use loom_schemas::log::{KafkaLog, KafkaLogConfig, Log, Topic};
use loom_schemas::testing::TestDatabase;
use serde_json::{Value, json};

use common::{Server, loom, text};

const ADMIN: &str = "upgrade-admin";

/// Per fixture, the read-model tables this build folds differently from the build that wrote
/// it: after the upgrade they hold the earlier build's rows until a replay.
const CHANGED_SINCE: &[(&str, &[&str])] = &[(
    "2026-12-04",
    // Rollups came later: requests folded before the upgrade count in them after a replay.
    // Routing decisions' details carry fields added later (tier, escalation).
    &["rollups", "rollups_since", "trace_decisions"],
)];

/// The fixture's `fixture.json`.
struct Fixture {
    tenant_id: String,
    key: String,
    traces: Vec<String>,
    prompt: String,
}

fn unpack(archive: &Path, into: &Path) -> Fixture {
    let unpacked = Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .output()
        .unwrap();
    assert!(unpacked.status.success(), "{}", text(&unpacked.stderr));
    let said: Value =
        serde_json::from_slice(&std::fs::read(into.join("data/fixture.json")).unwrap()).unwrap();
    let strings = |v: &Value| v.as_str().unwrap().to_owned();
    Fixture {
        tenant_id: strings(&said["tenant_id"]),
        key: strings(&said["key"]),
        traces: said["traces"]
            .as_array()
            .unwrap()
            .iter()
            .map(strings)
            .collect(),
        prompt: strings(&said["prompt"]),
    }
}

async fn get(server: &Server, key: &str, path: &str) -> (u16, Value) {
    let response = reqwest::Client::new()
        .get(server.url(path))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The trace ids `/v1/traces` lists, once it lists `expected` of them (30 s at most).
async fn listed(server: &Server, key: &str, expected: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, page) = get(server, key, "/v1/traces?limit=100").await;
        assert_eq!(status, 200, "{page}");
        let ids: Vec<String> = page["traces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["trace_id"].as_str().unwrap().to_owned())
            .collect();
        if ids.len() >= expected || Instant::now() > deadline {
            return ids;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A chat request with the key issued before the upgrade, traced as `after-upgrade`: answered.
async fn chat_after_upgrade(server: &Server, key: &str) {
    let answer = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(key)
        .header("x-request-id", "after-upgrade")
        .json(&json!({"model": "fast", "messages": [{"role": "user", "content": "hello again"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());
}

fn verify(data_dir: &str) {
    let verified = loom(&["verify", "--data-dir", data_dir, "--archive"]);
    assert!(
        verified.status.success(),
        "{}{}",
        text(&verified.stdout),
        text(&verified.stderr)
    );
}

async fn upgrade(archive: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let fixture = unpack(archive, dir.path());
    let data_dir = dir.path().join("data");
    let data = data_dir.to_str().unwrap();

    // The earlier build's log and archive, as it left them.
    verify(data);

    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let config = dir.path().join("loom.toml");
    common::write_mock_config(&config, &mock.url());
    let args = ["--config", config.to_str().unwrap()];
    let env = [("LOOM_ADMIN_TOKEN", ADMIN)];
    let server = Server::start(&data_dir, &args, &env).unwrap();

    // The key issued before the upgrade still authenticates.
    chat_after_upgrade(&server, &fixture.key).await;

    // Old traces and the new one, side by side; an old one with its sealed request body.
    let ids = listed(&server, &fixture.key, fixture.traces.len() + 1).await;
    for trace in fixture.traces.iter().chain([&"after-upgrade".to_owned()]) {
        assert!(ids.contains(trace), "{trace} not in {ids:?}");
    }
    let (status, timeline) = get(
        &server,
        &fixture.key,
        &format!("/v1/traces/{}", fixture.traces[0]),
    )
    .await;
    assert_eq!(status, 200, "{timeline}");
    assert_eq!(
        timeline["steps"][0]["detail"]["body"]["messages"][0]["content"],
        json!(fixture.prompt),
        "{timeline}"
    );
    assert!(server.stop().success());

    // A replay of the upgraded log builds the read models anew; they hold what the upgraded
    // ones do, but for the tables folded differently since the fixture's build.
    let name = archive.file_name().unwrap().to_string_lossy().into_owned();
    replay_equals(&name, &data_dir, None).await;

    // SQL over the archive reads the earlier build's files with this one's.
    let counted = loom(&[
        "sql",
        "--data-dir",
        data,
        "--tenant",
        &fixture.tenant_id,
        "--format",
        "json",
        "SELECT count(DISTINCT trace_id) AS n FROM events WHERE trace_id IS NOT NULL",
    ]);
    assert!(counted.status.success(), "{}", text(&counted.stderr));
    assert_eq!(
        text(&counted.stdout).trim(),
        format!(r#"[{{"n":{}}}]"#, fixture.traces.len() + 1)
    );
    verify(data);

    // The same log folded into Postgres by the earlier build (its `loom replay`, dumped): the
    // projector of `loom serve` migrates that version and folds on from its positions.
    let database = TestDatabase::create().await;
    let restored = Command::new(psql())
        .args(["-q", "-v", "ON_ERROR_STOP=1", &database.url, "-f"])
        .arg(data_dir.join("read-models-postgres.sql"))
        .output()
        .unwrap();
    assert!(restored.status.success(), "{}", text(&restored.stderr));
    let on_postgres = [&args[..], &["--read-models", &database.url]].concat();
    let server = Server::start(&data_dir, &on_postgres, &env).unwrap();
    let ids = listed(&server, &fixture.key, fixture.traces.len() + 1).await;
    assert_eq!(ids.len(), fixture.traces.len() + 1, "{ids:?}");
    assert!(server.stop().success());
    replay_equals(&name, &data_dir, Some(&database.url)).await;
    database.drop().await;
}

/// The fixture's records on Kafka topics, as the earlier build's gateways would have put them
/// there (the same key, headers and value: its producer wrote what its embedded log stores), read
/// by this build: a `loom gateway` on them knows the tenant and its key from the control topic
/// and answers; `loom replay` folds the old records and the new into Postgres read models.
async fn upgrade_on_kafka(archive: &Path) {
    let dir = tempfile::tempdir().unwrap();
    let fixture = unpack(archive, dir.path());
    let data_dir = dir.path().join("data");
    let brokers =
        std::env::var("LOOM_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into());
    let prefix = format!("upgrade-{}.", uuid::Uuid::now_v7().simple());
    let mut kafka = KafkaLogConfig::new(&brokers);
    kafka.topic_prefix = prefix.clone();
    kafka.data_partitions = 2;
    let kafka = KafkaLog::connect(kafka).await.unwrap();
    let old = common::open_data_dir_log(&data_dir).await;
    for topic in [Topic::Control, Topic::Data] {
        for partition in 0..old.partitions(topic) {
            let entries = common::load::read_partition(&old, topic, partition, 0).await;
            let records = entries.into_iter().map(|e| e.record).collect();
            kafka.append(topic, records).await.unwrap();
        }
    }
    drop(old);

    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let config = dir.path().join("loom.toml");
    common::write_mock_config(&config, &mock.url());
    let on_kafka = [
        "--kafka-brokers",
        &brokers,
        "--kafka-topic-prefix",
        &prefix,
        "--kafka-data-partitions",
        "2",
    ];
    let args = [&["--config", config.to_str().unwrap()][..], &on_kafka].concat();
    let gateway = Server::start_as("gateway", &data_dir, &args, &[]).unwrap();
    chat_after_upgrade(&gateway, &fixture.key).await;
    assert!(gateway.stop().success());

    let database = TestDatabase::create().await;
    let replay_dir = dir.path().join("replay");
    let replay = [
        &["replay", "--read-models", &database.url, "--data-dir"][..],
        &[replay_dir.to_str().unwrap()],
        &on_kafka,
    ]
    .concat();
    let replayed = loom(&replay);
    assert!(replayed.status.success(), "{}", text(&replayed.stderr));
    let (version, _) = common::replayed_versions(&text(&replayed.stdout));
    let store = ReadStore::open(&StoreLocation::parse(&database.url), version)
        .await
        .unwrap();
    let mut traces: Vec<String> = sqlx::query_scalar("SELECT trace_id FROM traces")
        .fetch_all(store.pool())
        .await
        .unwrap();
    store.close().await;
    traces.sort();
    let mut expected = fixture.traces.clone();
    expected.push("after-upgrade".into());
    expected.sort();
    assert_eq!(traces, expected);
    database.drop().await;
}

/// `loom replay` into a new version of the read models (in the data dir, or on `postgres`): it equals the active one
/// but for the tables the fixture `name` says this build folds differently.
async fn replay_equals(name: &str, data_dir: &Path, postgres: Option<&str>) {
    let data = data_dir.to_str().unwrap();
    let mut replay = vec!["replay", "--data-dir", data];
    let location = match postgres {
        Some(url) => {
            replay.extend(["--read-models", url]);
            StoreLocation::parse(url)
        }
        None => StoreLocation::Sqlite(data_dir.join("read-models")),
    };
    let replayed = loom(&replay);
    assert!(replayed.status.success(), "{}", text(&replayed.stderr));
    let said = text(&replayed.stdout);
    let (new, old) = common::replayed_versions(&said);
    let (upgraded, replayed) = (
        ReadStore::open(&location, old).await.unwrap(),
        ReadStore::open(&location, new).await.unwrap(),
    );
    let (before, after) = (
        upgraded.digests().await.unwrap(),
        replayed.digests().await.unwrap(),
    );
    upgraded.close().await;
    replayed.close().await;
    let differ: Vec<&str> = before
        .keys()
        .filter(|table| before.get(*table) != after.get(*table))
        .copied()
        .collect();
    let changed = CHANGED_SINCE
        .iter()
        .find(|(fixture, _)| name.starts_with(fixture))
        .map_or(&[][..], |(_, tables)| tables);
    assert_eq!(
        differ, changed,
        "tables that differ after a replay ({said})"
    );
}

/// The `psql` on the PATH, or the newest in Debian's Postgres directories.
fn psql() -> std::path::PathBuf {
    if Command::new("psql").arg("--version").output().is_ok() {
        return "psql".into();
    }
    let mut found: Vec<_> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("psql on the PATH or in /usr/lib/postgresql")
        .map(|entry| entry.unwrap().path().join("bin/psql"))
        .collect();
    found.sort();
    found.pop().expect("psql")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_an_earlier_build_upgrades_in_place() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/upgrade");
    let mut archives: Vec<_> = std::fs::read_dir(&fixtures)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.to_string_lossy().ends_with(".tar.gz"))
        .collect();
    archives.sort();
    assert!(!archives.is_empty(), "no fixture in {}", fixtures.display());
    for archive in archives {
        eprintln!("upgrading {}", archive.display());
        upgrade(&archive).await;
        upgrade_on_kafka(&archive).await;
    }
}
