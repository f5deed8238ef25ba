//! The archive end to end, through the real `loom` binary: `loom serve` archives into the data
//! directory by default; pyarrow reads a file through the key service and fails without it;
//! `loom verify --archive` passes before and after an erasure; a SIGKILLed server leaves no
//! duplicate and loses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{Array, StringArray};
use loom_projector::archive::keys::ArchiveKeys;
use loom_projector::archive::read::read_file;
use loom_projector::archive::{Archive, ArchiveLocation};
use loom_schemas::codec::Registry;
use loom_schemas::keystore::{KeyStore, MasterKey};
use loom_schemas::log::{Log, Topic};
use serde_json::{Value, json};

use common::{Server, loom, text};

const TOKEN: &str = "archive-admin";

fn python() -> String {
    std::env::var("LOOM_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// Erases `tenant` through `server`'s admin API.
async fn erase(server: &Server, tenant: &str) {
    let erased = reqwest::Client::new()
        .post(server.url(&format!("/admin/tenants/{tenant}/erase")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(erased.status(), 204);
}

/// The first archive file of `tenant` under `data_dir`, once there is one.
async fn first_file(data_dir: &Path, tenant: &str) -> PathBuf {
    let dir = data_dir.join("archive").join(format!("tenant_id={tenant}"));
    let started = Instant::now();
    loop {
        let found = walk(&dir)
            .into_iter()
            .find(|p| p.extension().is_some_and(|e| e == "parquet"));
        if let Some(file) = found {
            return file;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no archive file under {}",
            dir.display()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// pyarrow's reading of `file` in `mode` (tests/interop/read_archive.py).
fn pyarrow(mode: &str, file: &Path, server: &Server) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/read_archive.py");
    let output = Command::new(python())
        .arg(script)
        .args([mode, &file.display().to_string(), &server.url(""), TOKEN])
        .output()
        .unwrap_or_else(|e| panic!("running {} (run ./infra/test.sh): {e}", python()));
    assert!(
        output.status.success(),
        "pyarrow (run ./infra/test.sh, which installs it):\n{}",
        text(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pyarrow_reads_the_archive_through_the_key_service_until_the_tenant_is_erased() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--archive-roll-after", "1s"],
        &[("LOOM_ADMIN_TOKEN", TOKEN)],
    )
    .unwrap();
    let (tenant, key) = common::tenant_and_key(&server, TOKEN, "acme").await;
    common::refused_requests(&server, &key, 5).await;
    let file = first_file(dir.path(), &tenant).await;

    let full = pyarrow("full", &file, &server);
    assert!(full["rows"].as_u64().unwrap() >= 5, "{full}");
    assert_eq!(full["tenants"], json!([tenant]));
    assert_eq!(full["records"], full["rows"], "{full}");
    assert!(
        full["event_types"]
            .as_array()
            .unwrap()
            .contains(&json!("request.received")),
        "{full}"
    );
    // The metadata key alone: every column but the events whole.
    let metadata = pyarrow("metadata", &file, &server);
    assert_eq!(metadata["rows"], full["rows"], "{metadata}");
    assert!(
        !metadata["columns"]
            .as_array()
            .unwrap()
            .contains(&json!("record"))
    );
    // No key service: nothing.
    let none = pyarrow("none", &file, &server);
    assert!(none["error"].is_string(), "{none}");

    let data_dir = dir.path().display().to_string();
    let verified = loom(&["verify", "--data-dir", &data_dir, "--archive"]);
    assert!(verified.status.success(), "{}", text(&verified.stderr));
    assert!(
        text(&verified.stdout).contains("ok: "),
        "{}",
        text(&verified.stdout)
    );

    // Erased: the key service refuses the tenant's keys, the gateway its API keys, and the
    // archive still verifies (erasure is not tampering).
    erase(&server, &tenant).await;
    let after = pyarrow("full", &file, &server);
    assert!(after["error"].is_string(), "{after}");
    let refused = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "any", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    // The archiver records the erasure in the tenant's manifest.
    let started = Instant::now();
    loop {
        let verified = loom(&["verify", "--data-dir", &data_dir, "--archive"]);
        assert!(verified.status.success(), "{}", text(&verified.stdout));
        if text(&verified.stdout).contains(&format!("tenant {tenant}: erased")) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{}",
            text(&verified.stdout)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(server.stop().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_server_archives_every_event_once_after_its_restart() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--archive-roll-after", "1s", "--archive-roll-mib", "1"];
    let env = [("LOOM_ADMIN_TOKEN", TOKEN)];
    let server = Server::start(dir.path(), &args, &env).unwrap();
    let (tenant, key) = common::tenant_and_key(&server, TOKEN, "acme").await;
    common::refused_requests(&server, &key, 40).await;
    // Killed while it archives: some files written, some named, some events only buffered.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    common::refused_requests(&server, &key, 20).await;
    drop(server); // SIGKILL
    let server = Server::start(dir.path(), &args, &env).unwrap();
    common::refused_requests(&server, &key, 10).await;
    assert!(server.stop().success());

    // Every event on the log is in the archive once.
    let log = common::open_data_dir_log(dir.path()).await;
    let registry = Registry::builtin().unwrap();
    let mut logged = BTreeSet::new();
    for topic in Topic::ALL {
        let mut reader = log.read_from(topic, 0, 0).await.unwrap();
        loop {
            let entries = reader.poll(1000).await.unwrap();
            if entries.is_empty() {
                break;
            }
            for entry in entries {
                logged.insert(
                    registry
                        .decode(&entry.record.value)
                        .unwrap()
                        .envelope
                        .event_id
                        .to_string(),
                );
            }
        }
    }
    let data_dir = loom::DataDir::new(dir.path());
    let master = MasterKey::load(&data_dir.master_key_file(), None)
        .unwrap()
        .unwrap();
    let keys = Arc::new(
        KeyStore::open_file(data_dir.keys_file(), master)
            .await
            .unwrap(),
    );
    let archive = Archive::open(&ArchiveLocation::Directory(data_dir.archive())).unwrap();
    let mut archived = Vec::new();
    for owner in archive.tenants().await.unwrap() {
        let manifest = archive.manifest(owner).await.unwrap();
        for file in manifest.files.values() {
            let reader = ArchiveKeys::full(Arc::clone(&keys), owner);
            for batch in read_file(&archive, owner, file, reader, None)
                .await
                .unwrap()
            {
                let ids = batch
                    .column_by_name("event_id")
                    .unwrap()
                    .as_any()
                    .downcast_ref::<StringArray>()
                    .unwrap();
                archived.extend((0..ids.len()).map(|i| ids.value(i).to_owned()));
            }
        }
    }
    let unique: BTreeSet<String> = archived.iter().cloned().collect();
    assert_eq!(unique.len(), archived.len(), "an event is archived twice");
    assert_eq!(unique, logged, "the archive is not the log");
    assert!(
        archive
            .tenants()
            .await
            .unwrap()
            .iter()
            .any(|t| t.to_string() == tenant)
    );
    let verified = loom(&[
        "verify",
        "--data-dir",
        &dir.path().display().to_string(),
        "--archive",
    ]);
    assert!(verified.status.success(), "{}", text(&verified.stdout));
}

/// `POST /v1/sql` with `credential`; the status and the body (JSON, or the text as a string).
async fn sql(server: &Server, credential: &str, path: &str, body: Value) -> (u16, String, Value) {
    let response = reqwest::Client::new()
        .post(server.url(path))
        .bearer_auth(credential)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let bytes = response.bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, content_type, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_over_http_and_the_cli_reads_each_tenant_only_its_own_archive() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--archive-roll-after", "1s"],
        &[("LOOM_ADMIN_TOKEN", TOKEN)],
    )
    .unwrap();
    let (a, key_a) = common::tenant_and_key(&server, TOKEN, "a").await;
    let (b, key_b) = common::tenant_and_key(&server, TOKEN, "b").await;
    common::refused_requests(&server, &key_a, 5).await;
    common::refused_requests(&server, &key_b, 3).await;
    // The operator sees every tenant, once the archiver has written their files.
    let started = Instant::now();
    let received = json!({"query": "SELECT envelope_tenant_id AS tenant, count(*) AS n FROM events \
        WHERE event_type = 'request.received' GROUP BY 1 ORDER BY n DESC"});
    loop {
        let (status, _, body) = sql(&server, TOKEN, "/v1/sql", received.clone()).await;
        assert_eq!(status, 200, "{body}");
        if body["rows"] == json!([{"tenant": a, "n": 5}, {"tenant": b, "n": 3}]) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A tenant's key: its own rows only, whatever the query says.
    let (status, content_type, body) = sql(
        &server,
        &key_a,
        "/v1/sql",
        json!({"query": "SELECT DISTINCT tenant_id AS t FROM requests UNION SELECT envelope_tenant_id FROM datafusion.public.events"}),
    )
    .await;
    assert_eq!(
        (status, content_type.as_str()),
        (200, "application/json"),
        "{body}"
    );
    assert_eq!(body["rows"], json!([{"t": a}]));
    assert_eq!(body["columns"], json!([{"name": "t", "type": "Utf8"}]));
    assert_eq!(
        (body["row_count"].clone(), body["truncated"].clone()),
        (json!(1), json!(false))
    );
    let (status, content_type, body) = sql(
        &server,
        &key_a,
        "/v1/sql?format=csv",
        json!({"query": "SELECT count(*) AS n FROM requests"}),
    )
    .await;
    assert_eq!(
        (status, content_type.as_str()),
        (200, "text/csv; charset=utf-8")
    );
    assert_eq!(body, json!("n\n5\n"));
    let arrow = reqwest::Client::new()
        .post(server.url("/v1/sql"))
        .bearer_auth(&key_a)
        .header("accept", "application/vnd.apache.arrow.stream")
        .json(&json!({"query": "SELECT event_id FROM events"}))
        .send()
        .await
        .unwrap();
    assert_eq!(arrow.status(), 200);
    let rows: usize = arrow::ipc::reader::StreamReader::try_new(
        std::io::Cursor::new(arrow.bytes().await.unwrap()),
        None,
    )
    .unwrap()
    .map(|batch| batch.unwrap().num_rows())
    .sum();
    assert!(rows >= 5);

    // The API is described at /openapi.json (no key needed), a valid OpenAPI document.
    let document = reqwest::get(server.url("/openapi.json")).await.unwrap();
    assert_eq!(document.status(), 200);
    let document: Value = document.json().await.unwrap();
    let operation = &document["paths"]["/v1/sql"]["post"];
    assert_eq!(operation["parameters"][0]["in"], "query", "{document}");
    assert_eq!(operation["parameters"][0]["required"], false, "{document}");
    let path = dir.path().join("openapi.json");
    std::fs::write(&path, document.to_string()).unwrap();
    let validated = Command::new(python())
        .args(["-m", "openapi_spec_validator"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        validated.status.success(),
        "{}{}",
        text(&validated.stdout),
        text(&validated.stderr)
    );

    // Refusals, each a clear OpenAI-shaped error.
    for (credential, body, status, code) in [
        (
            "wrong",
            json!({"query": "SELECT 1"}),
            401,
            "invalid_api_key",
        ),
        (
            key_a.as_str(),
            json!({"query": "DROP TABLE events"}),
            400,
            "statement_not_allowed",
        ),
        (
            key_a.as_str(),
            json!({"query": "SELECT * FROM control_events"}),
            400,
            "invalid_sql",
        ),
        (
            key_a.as_str(),
            json!({"sql": "SELECT 1"}),
            400,
            "invalid_request",
        ),
        (
            key_a.as_str(),
            json!({"query": "SELECT 1", "format": "xml"}),
            400,
            "invalid_format",
        ),
    ] {
        let (got, _, answer) = sql(&server, credential, "/v1/sql", body.clone()).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert_eq!(answer["error"]["code"], code, "{body}: {answer}");
    }

    let (status, _, answer) = sql(
        &server,
        &key_a,
        "/v1/sql?format=csv&format=json",
        json!({"query": "SELECT 1"}),
    )
    .await;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (400, &json!("invalid_request")),
        "{answer}"
    );

    // The CLI, as the operator on the data directory.
    let data_dir = dir.path().display().to_string();
    let counted = loom(&[
        "sql",
        "--data-dir",
        &data_dir,
        "--tenant",
        &a,
        "--format",
        "json",
        "SELECT count(*) AS n FROM requests",
    ]);
    assert!(counted.status.success(), "{}", text(&counted.stderr));
    assert_eq!(text(&counted.stdout).trim(), r#"[{"n":5}]"#);
    // The CLI through the server, with a tenant's key.
    let remote = loom(&[
        "sql",
        "--url",
        &server.base,
        "--api-key",
        &key_a,
        "--format",
        "json",
        "SELECT count(*) AS n FROM requests",
    ]);
    assert!(remote.status.success(), "{}", text(&remote.stderr));
    assert_eq!(text(&remote.stdout).trim(), r#"[{"n":5}]"#);
    let table = loom(&[
        "sql",
        "--url",
        &server.base,
        "--api-key",
        &key_a,
        "SELECT DISTINCT tenant_id FROM requests",
    ]);
    assert!(table.status.success(), "{}", text(&table.stderr));
    assert!(text(&table.stdout).contains(&a) && !text(&table.stdout).contains(&b));
    let unauthorized = loom(&[
        "sql",
        "--url",
        &server.base,
        "--api-key",
        "nope",
        "SELECT 1",
    ]);
    assert!(!unauthorized.status.success());
    assert!(
        text(&unauthorized.stderr).contains("401"),
        "{}",
        text(&unauthorized.stderr)
    );
    let refused = loom(&[
        "sql",
        "--data-dir",
        &data_dir,
        "COPY (SELECT 1) TO '/tmp/loom-sql-cli.csv'",
    ]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("only queries"),
        "{}",
        text(&refused.stderr)
    );

    // Erased: B's rows are gone for the operator too; its key reads nothing.
    erase(&server, &b).await;
    let (_, _, body) = sql(&server, TOKEN, "/v1/sql", received).await;
    assert_eq!(body["rows"], json!([{"tenant": a, "n": 5}]));
    let (status, _, _) = sql(&server, &key_b, "/v1/sql", json!({"query": "SELECT 1"})).await;
    assert_eq!(status, 401);
    assert!(server.stop().success());
}

#[test]
fn loom_query_needs_a_shared_log() {
    let dir = tempfile::tempdir().unwrap();
    let refused = loom(&["query", "--data-dir", &dir.path().display().to_string()]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("--kafka-brokers"),
        "{}",
        text(&refused.stderr)
    );
}
