//! Export to Delta Lake through the real `loom` binary: `POST /v1/exports` runs a job that
//! `GET /v1/exports/{id}` follows, into the caller's directory only; `loom export --url` does the
//! same from the command line; a `loom export` SIGKILLed mid-way adds no duplicate when run
//! again. The tables are read by delta-rs's Python package through DuckDB.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use loom_projector::archive::{Archive, ArchiveConfig, ArchiveLocation, Archiver};
use loom_schemas::codec::Registry;
use loom_schemas::keystore::{KeyStore, MasterKey};
use loom_schemas::log::{EmbeddedLog, EmbeddedLogConfig, Log, Topic};
use loom_schemas::samples;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use common::{LOOM, Server, loom, text};

const TOKEN: &str = "export-admin";

fn python() -> String {
    std::env::var("LOOM_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// `SELECT count(*), count(DISTINCT event_id)` over the Delta table at `path`, as delta-rs's
/// Python package and DuckDB read it (tests/interop/read_delta.py).
fn delta_counts(path: &Path) -> (u64, u64) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/read_delta.py");
    let output = Command::new(python())
        .arg(script)
        .arg(path)
        .arg("SELECT count(*) AS n, count(DISTINCT event_id) AS ids FROM events")
        .output()
        .unwrap_or_else(|e| panic!("running {} (run ./infra/test.sh): {e}", python()));
    assert!(
        output.status.success(),
        "read_delta.py (run ./infra/test.sh, which installs deltalake and duckdb):\n{}",
        text(&output.stderr)
    );
    let table: Value = serde_json::from_slice(&output.stdout).unwrap();
    let row = &table["rows"][0];
    (row["n"].as_u64().unwrap(), row["ids"].as_u64().unwrap())
}

/// The number of the tenant's archived events, once it has stopped growing and reached `least`.
async fn archived_events(server: &Server, key: &str, least: u64) -> u64 {
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut last = None;
    loop {
        let answer: Value = client
            .post(server.url("/v1/sql"))
            .bearer_auth(key)
            .json(&json!({"query": "SELECT count(*) AS n FROM events"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let n = answer["rows"][0]["n"].as_u64().unwrap_or(0);
        if n >= least && last == Some(n) {
            return n;
        }
        last = Some(n);
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "{n} events archived, waiting for {least}"
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
}

async fn call(
    method: reqwest::Method,
    url: String,
    key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut request = reqwest::Client::new().request(method, url).bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Follows job `id` until it ends.
async fn finished(server: &Server, key: &str, id: &str) -> Value {
    let started = Instant::now();
    loop {
        let (status, job) = call(
            reqwest::Method::GET,
            server.url(&format!("/v1/exports/{id}")),
            key,
            None,
        )
        .await;
        assert_eq!(status, 200, "{job}");
        if job["status"] == "succeeded" || job["status"] == "failed" {
            return job;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_run_as_jobs_into_the_callers_directory_and_add_each_event_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--archive-roll-after", "1s"],
        &[("LOOM_ADMIN_TOKEN", TOKEN)],
    )
    .unwrap();
    let (tenant, key) = common::tenant_and_key(&server, TOKEN, "acme").await;
    let (_, other_key) = common::tenant_and_key(&server, TOKEN, "globex").await;
    common::refused_requests(&server, &key, 20).await;
    let events = archived_events(&server, &key, 40).await;

    let (status, job) = call(
        reqwest::Method::POST,
        server.url("/v1/exports"),
        &key,
        Some(json!({"target": "lake/events"})),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    assert!(
        ["queued", "running"].contains(&job["status"].as_str().unwrap()),
        "{job}"
    );
    let id = job["id"].as_str().unwrap().to_owned();
    let done = finished(&server, &key, &id).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["result"]["rows"], events, "{done}");
    assert_eq!(done["progress"]["rows_written"], events, "{done}");
    let table = dir
        .path()
        .join("exports")
        .join(format!("tenant_id={tenant}"))
        .join("lake/events");
    assert_eq!(done["result"]["target"], table.display().to_string());
    assert_eq!(delta_counts(&table), (events, events));

    // Another tenant sees neither the job nor a hint of it.
    let (status, _) = call(
        reqwest::Method::GET,
        server.url(&format!("/v1/exports/{id}")),
        &other_key,
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (_, theirs) = call(
        reqwest::Method::GET,
        server.url("/v1/exports"),
        &other_key,
        None,
    )
    .await;
    assert_eq!(theirs["data"], json!([]));
    let (_, mine) = call(reqwest::Method::GET, server.url("/v1/exports"), &key, None).await;
    assert_eq!(mine["data"][0]["id"], id.as_str());

    // Bad requests are refused before anything starts.
    for (body, code) in [
        (json!({"target": "../other"}), "invalid_target"),
        (
            json!({"target": format!("tenant_id={}/x", Uuid::now_v7())}),
            "invalid_target",
        ),
        (json!({"target": "file:///etc"}), "invalid_target"),
        (json!({"bodies": "everything"}), "invalid_request"),
        (json!({"format": "iceberg"}), "invalid_format"),
        (json!({"path": "/tmp"}), "invalid_request"),
    ] {
        let (status, error) = call(
            reqwest::Method::POST,
            server.url("/v1/exports"),
            &key,
            Some(body.clone()),
        )
        .await;
        assert_eq!(status, 400, "{body}: {error}");
        assert_eq!(error["error"]["code"], code, "{body}: {error}");
    }
    let (status, _) = call(
        reqwest::Method::POST,
        server.url("/v1/exports"),
        "sk-wrong",
        None,
    )
    .await;
    assert_eq!(status, 401);

    // Nothing new: nothing added. Then new events, exported from the command line.
    let (_, job) = call(
        reqwest::Method::POST,
        server.url("/v1/exports"),
        &key,
        Some(json!({"target": "lake/events"})),
    )
    .await;
    let again = finished(&server, &key, job["id"].as_str().unwrap()).await;
    assert_eq!(again["result"]["rows"], 0, "{again}");
    assert_eq!(again["result"]["commits"], json!([]), "{again}");

    common::refused_requests(&server, &key, 10).await;
    let more = archived_events(&server, &key, events + 20).await;
    let exported = loom(&[
        "export",
        "lake/events",
        "--url",
        &server.url(""),
        "--api-key",
        &key,
        "--json",
        "--quiet",
    ]);
    assert!(exported.status.success(), "{}", text(&exported.stderr));
    let report: Value = serde_json::from_slice(&exported.stdout).unwrap();
    assert_eq!(report["rows"], more - events, "{report}");
    assert_eq!(delta_counts(&table), (more, more));

    let openapi: Value = reqwest::get(server.url("/openapi.json"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(openapi["paths"]["/v1/exports"]["post"].is_object());
    assert!(openapi["paths"]["/v1/exports/{id}"]["get"].is_object());
    assert!(server.stop().success());
}

/// A data directory with an archive of `tenants` tenants' generated history of `requests`
/// requests, as `loom serve` would leave it.
async fn archived_data_dir(dir: &Path, tenants: usize, requests: usize) -> usize {
    let data_dir = loom::DataDir::new(dir);
    let (master, _) = MasterKey::load_or_generate(&data_dir.master_key_file(), None).unwrap();
    let keys = Arc::new(
        KeyStore::open_file(data_dir.keys_file(), master.clone())
            .await
            .unwrap(),
    );
    let mut data_keys = Vec::new();
    for _ in 0..tenants {
        let tenant = Uuid::now_v7();
        keys.create_tenant_keys(tenant).await.unwrap();
        data_keys.push(keys.current_key(tenant).unwrap());
    }
    let now = loom_schemas::event::now_micros();
    let events = samples::history(&data_keys, requests, now - 3_600_000_000, 7).unwrap();
    let log: Arc<dyn Log> = Arc::new(
        EmbeddedLog::open(EmbeddedLogConfig::new(data_dir.log(), master.chain_key()))
            .await
            .unwrap(),
    );
    let registry = Registry::builtin().unwrap();
    for topic in Topic::ALL {
        let records: Vec<_> = events
            .iter()
            .filter(|e| Topic::for_plane(e.payload.plane()) == topic)
            .map(|e| registry.encode_record(e).unwrap())
            .collect();
        for chunk in records.chunks(500) {
            log.append(topic, chunk.to_vec()).await.unwrap();
        }
    }
    let archive = Archive::open(&ArchiveLocation::Directory(data_dir.archive())).unwrap();
    let archiver = Archiver::new(
        archive,
        Arc::clone(&log),
        keys,
        ArchiveConfig {
            roll_bytes: 256 << 10,
            compaction: None,
            ..ArchiveConfig::default()
        },
    );
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    archiver.run(shutdown).await.unwrap();
    events.len()
}

/// Whether a tenant partition of the table at `table` holds a file (finished or being written).
fn writes_data(table: &Path) -> bool {
    fn files(dir: &Path) -> Vec<PathBuf> {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .flat_map(|entry| match entry.path().is_dir() {
                true => files(&entry.path()),
                false => vec![entry.path()],
            })
            .collect()
    }
    files(table)
        .iter()
        .any(|path| path.display().to_string().contains("tenant_id="))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_export_adds_no_duplicate_when_run_again() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let events = archived_data_dir(&data, 3, 1500).await as u64;
    let table = dir.path().join("lake");
    let data_arg = data.display().to_string();
    let table_arg = table.display().to_string();
    let args = ["export", &table_arg, "--data-dir", &data_arg, "--quiet"];

    let mut export = Command::new(LOOM)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !writes_data(&table) {
        if let Some(status) = export.try_wait().unwrap() {
            panic!("the export ended ({status}) before it wrote a file");
        }
        assert!(started.elapsed() < Duration::from_secs(120));
        std::thread::sleep(Duration::from_millis(2));
    }
    export.kill().unwrap(); // SIGKILL
    export.wait().unwrap();
    let committed = match table.join("_delta_log").exists() {
        true => delta_counts(&table).0,
        false => 0,
    };
    assert!(
        committed < events,
        "all {events} were committed before the kill"
    );

    let rerun = loom(&[args.as_slice(), &["--json"]].concat());
    assert!(rerun.status.success(), "{}", text(&rerun.stderr));
    let report: Value = serde_json::from_slice(&rerun.stdout).unwrap();
    assert_eq!(
        report["rows"].as_u64().unwrap() + committed,
        events,
        "{report}"
    );
    assert_eq!(delta_counts(&table), (events, events));
    // Run once more: nothing new.
    let again = loom(&[args.as_slice(), &["--json"]].concat());
    let report: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(report["rows"], 0, "{report}");
}
