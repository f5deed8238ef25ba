//! Two `loom serve` processes sharing one log on the Kafka-protocol broker `./infra/test.sh`
//! starts, and one key store in Postgres: control changes made on one are obeyed by the other.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use loom_mock::{MockConfig, MockServer};
use loom_schemas::codec::Registry;
use loom_schemas::crypto::FieldContext;
use loom_schemas::event::{Payload, Sealed};
use loom_schemas::keystore::{KeyStore, MasterKey};
use loom_schemas::log::{KafkaLog, KafkaLogConfig, Log, Topic, segment};
use loom_schemas::testing::{TestBroker, TestDatabase, free_port};
use serde_json::{Value, json};
use uuid::Uuid;

use common::{Server, tenant_and_key};

const ADMIN: &str = "kafka-admin";
const MASTER: &str = "7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e7e";

fn brokers() -> String {
    std::env::var("LOOM_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:19092".into())
}

async fn post(client: &reqwest::Client, url: String, body: Value) -> Value {
    let response = client
        .post(url)
        .bearer_auth(ADMIN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());
    response.json().await.unwrap_or(Value::Null)
}

/// Sends a chat request until `accepted(status)` holds; returns how long that took. Each
/// request's trace id and status are added to `sent`.
async fn until(
    client: &reqwest::Client,
    server: &Server,
    key: &str,
    accepted: impl Fn(u16) -> bool,
    sent: &mut Vec<(String, u16)>,
) -> Duration {
    let started = Instant::now();
    loop {
        let trace = uuid::Uuid::now_v7().to_string();
        let status = client
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(key)
            .header("x-request-id", &trace)
            .json(&json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        sent.push((trace, status));
        if accepted(status) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "gave up waiting (last status {status})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A config with one alias, `fast`, served by the mock.
fn write_config(dir: &std::path::Path, mock: &MockServer) -> std::path::PathBuf {
    let path = dir.join("loom.toml");
    let text = format!(
        "[upstreams.mock]\nprovider = \"openai_compatible\"\nbase_url = \"{}/v1\"\n[models.fast]\ndeployments = [{{ upstream = \"mock\", model = \"m\" }}]\n",
        mock.url()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_share_the_log_and_obey_each_others_control_changes() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock);
    let prefix = format!("loom-e2e-{}.", uuid::Uuid::now_v7().simple());
    let brokers = brokers();
    let start = |role: &str, name: &str| {
        let args = [
            "--config",
            config.to_str().unwrap(),
            "--kafka-brokers",
            &brokers,
            "--kafka-topic-prefix",
            &prefix,
            "--kafka-data-partitions",
            "2",
            "--key-store-url",
            &db.url,
        ];
        Server::start_as(
            role,
            &dir.path().join(name),
            &args,
            &[("LOOM_MASTER_KEY", MASTER), ("LOOM_ADMIN_TOKEN", ADMIN)],
        )
        .unwrap()
    };
    // An all-in-one node and a `loom gateway`: the same data plane, sharing one log.
    let a = start("serve", "a");
    let b = start("gateway", "b");
    let client = reqwest::Client::new();

    let tenant = post(&client, a.url("/admin/tenants"), json!({"name": "shared"})).await;
    let key = post(
        &client,
        a.url("/admin/keys"),
        json!({"tenant_id": tenant["tenant_id"]}),
    )
    .await;
    let key_id = key["key_id"].as_str().unwrap().to_owned();
    let key = key["key"].as_str().unwrap().to_owned();

    // A key issued through one gateway is honoured by the other, with its bodies sealed.
    let (mut sent_a, mut sent_b) = (Vec::new(), Vec::new());
    let issued = until(&client, &b, &key, |s| s == 200, &mut sent_b).await;
    until(&client, &a, &key, |s| s == 200, &mut sent_a).await;
    post(
        &client,
        a.url(&format!("/admin/keys/{key_id}/revoke")),
        json!({}),
    )
    .await;
    let revoked = until(&client, &b, &key, |s| s == 401, &mut sent_b).await;
    eprintln!(
        "the other gateway accepted the new key after {issued:?} and refused it {revoked:?} after revocation"
    );

    // Quotas are shared: what a user uses through one gateway counts on the other.
    let key = post(
        &client,
        a.url("/admin/keys"),
        json!({"tenant_id": tenant["tenant_id"]}),
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    until(&client, &b, &key, |s| s == 200, &mut sent_b).await;
    let answered = client
        .post(a.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("x-loom-user", "shared-user")
        .json(&json!({"model": "fast", "max_tokens": 50,
                      "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    let (used, reserved) = user_tokens(&client, &a, &key, "shared-user").await;
    assert!(used > 0 && reserved == 0, "{used} {reserved}");
    let started = std::time::Instant::now();
    while user_tokens(&client, &b, &key, "shared-user").await != (used, 0) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the other gateway never counted the user's {used} tokens"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "the other gateway counted the user's usage after {:?}",
        started.elapsed()
    );

    assert!(a.stop().success());
    // A restarted gateway rebuilds the day's counts from the quota topic.
    assert!(b.stop().success());
    let b = start("gateway", "b");
    let started = std::time::Instant::now();
    loop {
        let counted = client
            .get(b.url("/v1/quota/status"))
            .bearer_auth(&key)
            .header("x-loom-user", "shared-user")
            .send()
            .await;
        if let Ok(response) = counted
            && response.status() == 200
        {
            let status: Value = response.json().await.unwrap();
            let user = &status["scopes"][1];
            if user["used"]["tokens"] == used {
                break;
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the restarted gateway lost the day's counts"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(b.stop().success());

    // Every request of both gateways is on the shared data topic.
    let mut kafka = KafkaLogConfig::new(&brokers);
    kafka.topic_prefix = prefix;
    kafka.create_topics = false;
    let log = KafkaLog::connect(kafka).await.unwrap();
    let registry = Registry::builtin().unwrap();
    // trace → (producer, HTTP status of request.completed, the sealed body of request.received)
    let mut seen: HashMap<String, (String, Option<i32>, Option<Sealed>, Uuid)> = HashMap::new();
    for partition in 0..log.partitions(Topic::Data) {
        let mut reader = log.read_from(Topic::Data, partition, 0).await.unwrap();
        loop {
            let batch = reader.poll(1000).await.unwrap();
            if batch.is_empty() {
                break;
            }
            for entry in batch {
                let event = registry.decode(&entry.record.value).unwrap();
                let trace = event.envelope.trace_id.clone().unwrap_or_default();
                let slot = seen
                    .entry(trace)
                    .or_insert_with(|| (event.envelope.producer.clone(), None, None, Uuid::nil()));
                match event.payload {
                    Payload::RequestCompleted(done) => slot.1 = Some(done.http_status),
                    Payload::RequestReceived(received) => {
                        slot.2 = received.body;
                        slot.3 = event.envelope.event_id;
                    }
                    _ => {}
                }
            }
        }
    }
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let keys = KeyStore::open_postgres(pool, MasterKey::parse(MASTER).unwrap())
        .await
        .unwrap();
    let tenant_id = Uuid::parse_str(tenant["tenant_id"].as_str().unwrap()).unwrap();
    let mut producers = BTreeSet::new();
    for (trace, status) in sent_a.iter().chain(&sent_b) {
        let (producer, completed, body, received_id) = seen
            .get(trace)
            .unwrap_or_else(|| panic!("request {trace} is not on the data topic"));
        assert_eq!(*completed, Some(i32::from(*status)), "{trace}");
        producers.insert(producer.clone());
        if *status == 200 {
            let ctx = FieldContext {
                tenant_id,
                event_id: *received_id,
                field: "body",
            };
            let body = keys
                .open(&ctx, body.as_ref().expect("a sealed body"))
                .unwrap();
            assert!(
                String::from_utf8(body).unwrap().contains("\"hi\""),
                "{trace}"
            );
        }
    }
    // Both gateways' requests are there, from their own producers.
    assert!(sent_a.iter().any(|(_, s)| *s == 200) && sent_b.iter().any(|(_, s)| *s == 401));
    assert_eq!(producers.len(), 2, "{producers:?}");
    db.drop().await;
}

/// A user's token usage as `gateway` counts it: (used, reserved).
async fn user_tokens(
    client: &reqwest::Client,
    gateway: &Server,
    key: &str,
    user: &str,
) -> (i64, i64) {
    let status: Value = client
        .get(gateway.url("/v1/quota/status"))
        .bearer_auth(key)
        .header("x-loom-user", user)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let scope = status["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scope"] == "user")
        .cloned()
        .unwrap();
    (
        scope["used"]["tokens"].as_i64().unwrap(),
        scope["reserved"]["tokens"].as_i64().unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_through_two_gateways_near_a_shared_budget_is_admitted_in_log_order() {
    let mock = MockServer::start(MockConfig {
        latency: Duration::from_millis(20),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock);
    // The verdicts are what is tested, not how fast they come: on a CI machine running every
    // test at once, the broker's round trip has taken more than the default 5 s (503s).
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str("[quotas]\narbitration_timeout = \"60s\"\n");
    std::fs::write(&config, text).unwrap();
    let prefix = format!("loom-burst-{}.", uuid::Uuid::now_v7().simple());
    let brokers = brokers();
    let start = |name: &str| {
        let args = [
            "--config",
            config.to_str().unwrap(),
            "--kafka-brokers",
            &brokers,
            "--kafka-topic-prefix",
            &prefix,
            "--key-store-url",
            &db.url,
        ];
        Server::start_as(
            "gateway",
            &dir.path().join(name),
            &args,
            &[("LOOM_MASTER_KEY", MASTER), ("LOOM_ADMIN_TOKEN", ADMIN)],
        )
        .unwrap()
    };
    let gateways = [start("a"), start("b")];
    let client = reqwest::Client::new();
    let tenant = post(
        &client,
        gateways[0].url("/admin/tenants"),
        json!({"name": "burst"}),
    )
    .await;
    let key = post(
        &client,
        gateways[0].url("/admin/keys"),
        json!({"tenant_id": tenant["tenant_id"]}),
    )
    .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    const LIMIT: i64 = 3_000;
    post(
        &client,
        gateways[0].url("/admin/quotas"),
        json!({"tenant_id": tenant["tenant_id"], "scope": "user", "id": "burst",
               "limits": {"tokens_per_day": LIMIT}}),
    )
    .await;
    // Both gateways know the key and the limit.
    for gateway in &gateways {
        let started = Instant::now();
        loop {
            let status = client
                .get(gateway.url("/v1/quota/status"))
                .bearer_auth(&key)
                .header("x-loom-user", "burst")
                .send()
                .await
                .unwrap();
            if status.status() == 200 {
                let status: Value = status.json().await.unwrap();
                if status["scopes"]
                    .to_string()
                    .contains(&format!("\"tokens_per_day\":{LIMIT}"))
                {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "the limit never arrived"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // 80 requests at once, half through each gateway, each estimated at about 60 tokens: about
    // 50 fit.
    let mut burst = tokio::task::JoinSet::new();
    for i in 0..80 {
        let request = client
            .post(gateways[i % 2].url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("x-loom-user", "burst")
            .json(&json!({"model": "fast", "max_tokens": 50,
                          "messages": [{"role": "user", "content": "hi"}]}));
        burst.spawn(async move { request.send().await.unwrap().status().as_u16() });
    }
    let statuses = burst.join_all().await;
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    let denied = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(admitted + denied, statuses.len(), "{statuses:?}");
    assert!(admitted > 0 && denied > 0, "{statuses:?}");

    // Both gateways end with the same count, within the limit plus a margin per gateway.
    let started = Instant::now();
    let used = loop {
        let used = user_tokens(&client, &gateways[0], &key, "burst").await;
        let other = user_tokens(&client, &gateways[1], &key, "burst").await;
        if used == other && used.1 == 0 {
            break used;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the gateways disagree: {used:?} {other:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // Each gateway's reservations the other had not read yet: at most a margin each.
    let margin = 2 * LIMIT / 10;
    assert!(used.0 <= LIMIT + margin, "{used:?}");

    // In log order, what was admitted stays within the same bound, and near the limit the
    // reservations were arbitrated.
    for gateway in gateways {
        assert!(gateway.stop().success());
    }
    let mut kafka = KafkaLogConfig::new(&brokers);
    kafka.topic_prefix = prefix;
    kafka.create_topics = false;
    let log = KafkaLog::connect(kafka).await.unwrap();
    let registry = Registry::builtin().unwrap();
    let mut arbiter = loom_gateway::quota::Arbiter::new(chrono_tz::Tz::UTC);
    let (mut arbitrated, mut refused) = (0, 0);
    // In log order: what admitted reservations hold until they settle, plus what settled ones
    // used. A request that settles frees what it reserved beyond its use: later ones may take it.
    let (mut held, mut settled, mut most) = (HashMap::new(), 0, 0);
    let mut reader = log.read_from(Topic::Quota, 0, 0).await.unwrap();
    loop {
        let batch = reader.poll(1000).await.unwrap();
        if batch.is_empty() {
            break;
        }
        for entry in batch {
            let event = registry.decode(&entry.record.value).unwrap();
            let verdict = arbiter.fold(&event);
            match &event.payload {
                Payload::QuotaReserved(r) => {
                    arbitrated += usize::from(verdict.is_some());
                    match verdict {
                        Some(Err(_)) => refused += 1,
                        _ => {
                            held.insert(r.reservation_id, r.tokens);
                        }
                    }
                }
                Payload::QuotaConsumed(c) => {
                    if let Some(id) = c.reservation_id {
                        held.remove(&id);
                    }
                    settled += c.tokens;
                }
                Payload::QuotaReleased(r) => {
                    held.remove(&r.reservation_id);
                }
                _ => {}
            }
            most = most.max(settled + held.values().sum::<i64>());
        }
    }
    eprintln!(
        "burst: {admitted} admitted, {denied} denied; {arbitrated} arbitrated ({refused} refused in log order); \
         at most {most} tokens held or used at once, {} used of {LIMIT}",
        used.0
    );
    assert!(arbitrated > 0);
    assert!(most <= LIMIT + margin, "{most}");
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loom_query_answers_sql_for_keys_issued_on_the_shared_log() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock);
    let prefix = format!("loom-e2e-{}.", uuid::Uuid::now_v7().simple());
    let brokers = brokers();
    let archive = dir.path().join("archive").display().to_string();
    let shared = [
        "--kafka-brokers",
        &brokers,
        "--kafka-topic-prefix",
        &prefix,
        "--key-store-url",
        &db.url,
        "--archive",
        &archive,
    ];
    let env = [("LOOM_MASTER_KEY", MASTER), ("LOOM_ADMIN_TOKEN", ADMIN)];
    let mut serve_args = vec![
        "--config",
        config.to_str().unwrap(),
        "--archive-roll-after",
        "1s",
    ];
    serve_args.extend(shared);
    // The node folds the read models into Postgres; the query service reads them.
    serve_args.extend(["--read-models", &db.url]);
    let node = Server::start_as("serve", &dir.path().join("node"), &serve_args, &env).unwrap();
    let mut query_args = shared.to_vec();
    query_args.extend(["--read-models", &db.url]);
    let query = Server::start_as("query", &dir.path().join("query"), &query_args, &env).unwrap();

    // A key issued after the query service started: known to it through the control topic.
    let client = reqwest::Client::new();
    let (_, key) = tenant_and_key(&node, ADMIN, "late").await;
    let mut sent = Vec::new();
    until(&client, &node, &key, |s| s == 200, &mut sent).await;
    // (A key the node itself issued works at once: every request sent is a 200 of the tenant.)
    let answered = sent.iter().filter(|(_, status)| *status == 200).count();
    let started = Instant::now();
    loop {
        let response = client
            .post(query.url("/v1/sql"))
            .bearer_auth(&key)
            .json(&json!({"query": "SELECT count(*) AS n FROM requests"}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        if status == 200 && body["rows"] == json!([{"n": answered}]) {
            break;
        }
        assert!(status == 200 || status == 401, "{status}: {body}");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{status}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The analytics and traces, from the read models.
    let started = Instant::now();
    loop {
        let response = client
            .get(query.url("/v1/analytics/summary?window=1h"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        if body["metrics"]["requests"]["value"] == json!(sent.len()) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let traces: Value = client
        .get(query.url("/v1/traces?limit=200"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(traces["traces"].as_array().unwrap().len(), sent.len());
    let health = reqwest::get(query.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(query.stop().success());
    assert!(node.stop().success());
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_during_a_broker_outage_drains_its_spool_after_restart() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let db = TestDatabase::create().await;
    let port = free_port();
    let broker_url = format!("127.0.0.1:{port}");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock);
    let data_dir = dir.path().join("gateway");
    let start = || {
        let args = [
            "--config",
            config.to_str().unwrap(),
            "--kafka-brokers",
            &broker_url,
            "--kafka-data-partitions",
            "1",
        ];
        Server::start(
            &data_dir,
            &args,
            &[("LOOM_MASTER_KEY", MASTER), ("LOOM_ADMIN_TOKEN", ADMIN)],
        )
        .unwrap()
    };
    let broker = TestBroker::start(port, &db.broker_storage());
    let gateway = start();
    let client = reqwest::Client::new();
    let (_, key) = tenant_and_key(&gateway, ADMIN, "outage").await;

    // The broker goes away; requests are still served, their events spooled on disk.
    broker.kill();
    let mut traces = Vec::new();
    for i in 0..5 {
        let trace = format!("outage-{i}");
        let response = client
            .post(gateway.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .header("x-request-id", &trace)
            .json(&json!({"model": "fast", "messages": [{"role": "user", "content": "during the outage"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        traces.push(trace);
    }
    // Let the writer give up on Kafka (5 s) and spool every request's events, then kill the
    // gateway without warning.
    let spool_dir = data_dir.join("spool");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spooled = spooled_traces(&spool_dir);
        if traces.iter().all(|t| spooled.contains(t)) {
            break;
        }
        assert!(Instant::now() < deadline, "only {spooled:?} were spooled");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(gateway); // SIGKILL

    let _broker = TestBroker::start(port, &db.broker_storage());
    let gateway = start();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut kafka = KafkaLogConfig::new(&broker_url);
    kafka.create_topics = false;
    let log = KafkaLog::connect(kafka).await.unwrap();
    let registry = Registry::builtin().unwrap();
    loop {
        let mut reader = log.read_from(Topic::Data, 0, 0).await.unwrap();
        let mut completed = std::collections::BTreeSet::new();
        loop {
            let batch = reader.poll(1000).await.unwrap();
            if batch.is_empty() {
                break;
            }
            for entry in batch {
                let event = registry.decode(&entry.record.value).unwrap();
                if matches!(event.payload, Payload::RequestCompleted(_)) {
                    completed.insert(event.envelope.trace_id.unwrap_or_default());
                }
            }
        }
        if traces.iter().all(|t| completed.contains(t)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the restart only {completed:?} arrived"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(gateway.stop().success());
    db.drop().await;
}

/// The traces whose `request.completed` is in the gateway's spool, read from its segments as they
/// are (the running gateway holds the spool: a segment being written may end in a torn write, and
/// one removed meanwhile was forwarded already).
fn spooled_traces(spool: &std::path::Path) -> std::collections::BTreeSet<String> {
    let registry = Registry::builtin().unwrap();
    let mut traces = std::collections::BTreeSet::new();
    let Ok(segments) = segment::list_segments(&spool.join("data/0")) else {
        return traces;
    };
    for (base, path) in segments {
        let _ = segment::scan_segment(&path, base, |step| {
            if let segment::Step::Record { record, .. } = step {
                let event = registry.decode(&record.value).unwrap();
                if matches!(event.payload, Payload::RequestCompleted(_)) {
                    traces.insert(event.envelope.trace_id.unwrap_or_default());
                }
            }
        });
    }
    traces
}

#[test]
fn tls_settings_reach_librdkafka_and_a_broken_one_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let brokers = brokers();
    let output = common::loom(&[
        "admin",
        "--data-dir",
        data_dir,
        "--kafka-brokers",
        &brokers,
        "--kafka-property",
        "security.protocol=SSL",
        "--kafka-property",
        "ssl.ca.location=/nonexistent/kafka-ca.pem",
        "tenant",
        "list",
    ]);
    assert!(!output.status.success());
    let stderr = common::text(&output.stderr);
    // librdkafka was built with TLS: it got as far as loading the CA file.
    assert_eq!(stderr.matches("ssl.ca.location").count(), 1, "{stderr}");
    assert!(!stderr.contains("OpenSSL not available"), "{stderr}");
}
