//! Nothing answered goes unrecorded: `loom serve` and `loom gateway` (on Kafka) are SIGKILLed
//! under a mixed load at random moments, and a broker is killed under a gateway; afterwards every
//! request that got a 2xx has its `request.completed` and every attempt in the log, and once in
//! the read models.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stderr
)]

mod common;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use loom_mock::{MockConfig, MockServer};
use loom_schemas::log::{Log, Topic};
use loom_schemas::testing::{TestBroker, TestDatabase, free_port};

use common::load::{Load, assert_in_kafka, assert_in_read_models, assert_recorded, trails};
use common::{LOOM, Server, open_data_dir_log, tenant_and_key};

const ADMIN: &str = "durability-admin";
const MASTER: &str = "4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d4d";

fn brokers() -> String {
    std::env::var("LOOM_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

async fn mock() -> MockServer {
    MockServer::start(MockConfig {
        latency: Duration::from_millis(2),
        chunk_delay: Duration::from_millis(1),
        ..MockConfig::default()
    })
    .await
    .unwrap()
}

/// One alias, `fast`, on the mock; quick retries.
fn write_config(dir: &std::path::Path, mock: &MockServer) -> std::path::PathBuf {
    let path = dir.join("loom.toml");
    let text = format!(
        "[routing]\nbackoff = \"5ms\"\n[upstreams.mock]\nprovider = \"openai_compatible\"\n\
         base_url = \"{}/v1\"\n[models.fast]\ndeployments = [{{ upstream = \"mock\", model = \"m\" }}]\n",
        mock.url()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs the load against `server` and SIGKILLs it after a random 0.5–3 s; returns what was
/// answered.
async fn load_then_kill(server: Server, key: &str, mock: &MockServer, tag: String) -> Vec<String> {
    let load = Load {
        base: server.base.clone(),
        key: key.to_owned(),
        mock: mock.url(),
        clients: 8,
        tag,
    };
    let running =
        tokio::spawn(async move { load.run(Arc::new(AtomicBool::new(false)), true).await });
    tokio::time::sleep(Duration::from_millis(fastrand::u64(500..3000))).await;
    drop(server); // SIGKILL
    let tally = tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .unwrap()
        .unwrap();
    assert!(
        !tally.answered.is_empty(),
        "the load did nothing: {tally:?}"
    );
    tally.answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_of_a_sigkilled_serve_is_in_the_log_and_the_read_models() {
    let mock = mock().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock);
    let data_dir = dir.path().join("data");
    let args = ["--config", config.to_str().unwrap()];
    let env = [("LOOM_ADMIN_TOKEN", ADMIN)];
    let start = || Server::start(&data_dir, &args, &env).unwrap();
    let server = start();
    let (_, key) = tenant_and_key(&server, ADMIN, "durable").await;
    let mut answered = load_then_kill(server, &key, &mock, "serve-r0".into()).await;
    for round in 1..4 {
        answered.extend(load_then_kill(start(), &key, &mock, format!("serve-r{round}")).await);
    }

    // After a restart (recovery) the in-process projector catches up with everything.
    let server = start();
    let sqlite = format!(
        "sqlite://{}?mode=ro",
        data_dir.join("read-models/v1.sqlite").display()
    );
    assert_in_read_models(&sqlite, "", &answered).await;
    assert!(server.stop().success());

    let log = open_data_dir_log(&data_dir).await;
    let mut entries = Vec::new();
    let mut reader = log.read_from(Topic::Data, 0, 0).await.unwrap();
    loop {
        let batch = reader.poll(5000).await.unwrap();
        if batch.is_empty() {
            break;
        }
        entries.extend(batch);
    }
    assert_recorded(&answered, &trails(&entries));
}

fn gateway_args<'a>(config: &'a str, brokers: &'a str, prefix: &'a str) -> Vec<&'a str> {
    vec![
        "--config",
        config,
        "--kafka-brokers",
        brokers,
        "--kafka-topic-prefix",
        prefix,
        "--kafka-data-partitions",
        "2",
    ]
}

/// `loom projector` on `brokers`, topics `prefix`, into `read_models`.
fn start_projector(brokers: &str, prefix: &str, read_models: &str) -> Child {
    Command::new(LOOM)
        .args([
            "projector",
            "--kafka-brokers",
            brokers,
            "--kafka-topic-prefix",
            prefix,
        ])
        .args(["--read-models", read_models])
        .env("LOOM_MASTER_KEY", MASTER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_of_a_sigkilled_kafka_gateway_is_in_kafka_and_the_read_models() {
    let mock = mock().await;
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock);
    let config = config.to_str().unwrap();
    let brokers = brokers();
    let prefix = format!("durable{}.", fastrand::u32(..));
    let data_dir = dir.path().join("gateway");
    let args = gateway_args(config, &brokers, &prefix);
    let env = [("LOOM_ADMIN_TOKEN", ADMIN), ("LOOM_MASTER_KEY", MASTER)];
    let start = || Server::start_as("gateway", &data_dir, &args, &env).unwrap();
    let server = start();
    let (_, key) = tenant_and_key(&server, ADMIN, "durable").await;
    let mut answered = Vec::new();
    let mut server = Some(server);
    for round in 0..3 {
        let gateway = server.take().unwrap_or_else(start);
        answered.extend(load_then_kill(gateway, &key, &mock, format!("kafka-r{round}")).await);
    }
    // A restart forwards whatever the killed gateways left in their spool.
    let gateway = start();

    assert_in_kafka(&brokers, &prefix, &answered).await;

    let mut projector = start_projector(&brokers, &prefix, &db.url);
    assert_in_read_models(&db.url, "loom_read.", &answered).await;
    let _ = projector.kill();
    let _ = projector.wait();
    assert!(gateway.stop().success());
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_killed_under_load_costs_no_answers_and_loses_no_events() {
    let mock = mock().await;
    let db = TestDatabase::create().await;
    let broker_db = TestDatabase::create().await;
    let port = free_port();
    let brokers = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock);
    let config = config.to_str().unwrap();
    let prefix = "outage.";
    let data_dir = dir.path().join("gateway");
    let args = gateway_args(config, &brokers, prefix);
    let env = [("LOOM_ADMIN_TOKEN", ADMIN), ("LOOM_MASTER_KEY", MASTER)];
    let broker = TestBroker::start(port, &broker_db.broker_storage());
    let gateway = Server::start_as("gateway", &data_dir, &args, &env).unwrap();
    let (_, key) = tenant_and_key(&gateway, ADMIN, "outage").await;

    let load = Load {
        base: gateway.base.clone(),
        key,
        mock: mock.url(),
        clients: 6,
        tag: "outage".into(),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let running = {
        let stop = Arc::clone(&stop);
        tokio::spawn(async move { load.run(stop, false).await })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let killed = Instant::now();
    broker.kill();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let _broker = TestBroker::start(port, &broker_db.broker_storage());
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let tally = running.await.unwrap();

    assert!(tally.answered.len() > 100, "{tally:?}");
    eprintln!(
        "broker outage: {} answered, statuses {:?}, slowest answer {:?}",
        tally.answered.len(),
        tally.statuses,
        tally.slowest
    );
    assert_eq!(tally.transport_errors, 0, "{tally:?}");
    // The switch to the spool is the only window in which a request may be refused.
    let late: Vec<_> = tally
        .unavailable_at
        .iter()
        .filter(|at| at.duration_since(killed) > Duration::from_secs(1))
        .collect();
    assert!(late.is_empty(), "503s outside the switch window: {tally:?}");
    // 502: a request whose attempts both drew an injected upstream fault.
    let other: u64 = tally
        .statuses
        .iter()
        .filter(|(status, _)| !(200..300).contains(*status) && ![502, 503].contains(*status))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(other, 0, "{:?}", tally.statuses);

    // Every answered request reaches Kafka once the spool drains.
    assert_in_kafka(&brokers, prefix, &tally.answered).await;
    // Forwarding is at least once: the read models hold each request once all the same.
    let mut projector = start_projector(&brokers, prefix, &db.url);
    assert_in_read_models(&db.url, "loom_read.", &tally.answered).await;
    let _ = projector.kill();
    let _ = projector.wait();
    assert!(gateway.stop().success());
    db.drop().await;
    broker_db.drop().await;
}
