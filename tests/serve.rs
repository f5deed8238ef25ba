//! End-to-end tests of the real `loom` binary.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::{Command, Output};

use loom_schemas::crypto::sealed_key_ref;
use loom_schemas::event::Payload;
use loom_schemas::keystore::MasterKey;
use loom_schemas::log::{Log, Record, Topic};
use loom_schemas::testing::TestDatabase;

use common::{Server, loom, text};

#[tokio::test]
async fn serve_answers_health_and_metrics_and_stops_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[], &[]).unwrap();
    let client = reqwest::Client::new();

    let health = client.get(server.url("/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let body: serde_json::Value = health.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    assert_eq!(body["log"]["data"]["end_offset"], 0);
    assert_eq!(body["log"]["control"]["end_offset"], 0);

    let metrics = client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(metrics.status(), 200);
    let metrics = metrics.text().await.unwrap();
    assert!(metrics.contains("loom_build_info{version=\""), "{metrics}");
    assert!(
        metrics.contains("loom_log_end_offset{topic=\"data\"} 0"),
        "{metrics}"
    );

    let missing = client
        .get(server.url("/v1/nothing-here"))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let error: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["type"], "invalid_request_error");
    assert_eq!(error["error"]["code"], "not_found");
    let wrong_method = client.post(server.url("/health")).send().await.unwrap();
    assert_eq!(wrong_method.status(), 405);

    // The data directory holds the log, the wrapped key store and the generated master key.
    for file in [
        "log/data/0/00000000000000000000.seg",
        "log/control/0/00000000000000000000.seg",
        "keys.json",
        "master.key",
    ] {
        assert!(dir.path().join(file).exists(), "{file} missing");
    }
    assert!(server.stop().success());
}

#[tokio::test]
async fn the_quiet_log_still_says_where_the_server_listens() {
    // `loom bench gateway` starts its servers with this filter and waits for that line.
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &["--log", loom::serve::QUIET_LOG], &[]).unwrap();
    let health = reqwest::get(server.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(server.stop().success());
}

#[tokio::test]
async fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = Server::start(dir.path(), &[], &[]).unwrap();
    let error = Server::start(dir.path(), &[], &[]).err().unwrap();
    assert!(error.contains("locked by another process"), "{error}");
}

#[tokio::test]
async fn a_wrong_master_key_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let key_a = "11".repeat(32);
    let key_b = "22".repeat(32);
    Server::start(dir.path(), &[], &[("LOOM_MASTER_KEY", &key_a)])
        .unwrap()
        .stop();
    let error = Server::start(dir.path(), &[], &[("LOOM_MASTER_KEY", &key_b)])
        .err()
        .unwrap();
    assert!(error.contains("master key does not match"), "{error}");
    let error = Server::start(dir.path(), &[], &[("LOOM_MASTER_KEY", "short")])
        .err()
        .unwrap();
    assert!(error.contains("invalid master key"), "{error}");
    Server::start(dir.path(), &[], &[("LOOM_MASTER_KEY", &key_a)])
        .unwrap()
        .stop();
}

#[tokio::test]
async fn serve_keeps_keys_in_postgres_when_asked() {
    let db = TestDatabase::create().await;
    let dir = tempfile::tempdir().unwrap();
    let key = "33".repeat(32);
    let server = Server::start(
        dir.path(),
        &["--key-store-url", &db.url],
        &[("LOOM_MASTER_KEY", &key)],
    )
    .unwrap();
    let health = reqwest::get(server.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    assert!(server.stop().success());
    assert!(!dir.path().join("keys.json").exists());
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let checks: i64 = sqlx::query_scalar("SELECT count(*) FROM loom_key_store_meta")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(checks, 1);
    pool.close().await;

    let other = "44".repeat(32);
    let error = Server::start(
        dir.path(),
        &["--key-store-url", &db.url],
        &[("LOOM_MASTER_KEY", &other)],
    )
    .err()
    .unwrap();
    assert!(error.contains("master key does not match"), "{error}");
    db.drop().await;
}

#[tokio::test]
async fn migrate_applies_the_postgres_migrations() {
    let db = TestDatabase::create().await;
    for _ in 0..2 {
        let output = loom(&["migrate", "--database-url", &db.url]);
        assert!(output.status.success(), "{}", text(&output.stderr));
    }
    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('loom_tenant_keys', 'loom_erased_tenants', 'loom_key_store_meta')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 3);
    // The read models, version 1, and the views readers use.
    let read_models: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'loom_read_v1' AND table_name IN ('traces', 'usage_hourly', 'positions')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(read_models, 3);
    let views: i64 = sqlx::query_scalar("SELECT count(*) FROM loom_read.traces")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(views, 0);
    pool.close().await;
    db.drop().await;
    let output = loom(&[
        "migrate",
        "--database-url",
        "postgres://nobody@127.0.0.1:1/none",
    ]);
    assert!(!output.status.success());
    assert!(text(&output.stderr).contains("connecting to Postgres"));
    let nothing = loom(&["migrate"]);
    assert_eq!(nothing.status.code(), Some(1));
    assert!(text(&nothing.stderr).contains("nothing to migrate"));
}

/// Writes `count` records into the embedded log of a new data directory (with a master key).
async fn write_records(data_dir: &Path, count: u64) {
    MasterKey::load_or_generate(&loom::DataDir::new(data_dir).master_key_file(), None).unwrap();
    let log = common::open_data_dir_log(data_dir).await;
    let records = (0..count)
        .map(|i| Record {
            key: b"k".to_vec(),
            value: format!("record {i}").into_bytes(),
            ..Record::default()
        })
        .collect();
    log.append(Topic::Data, records).await.unwrap();
}

#[tokio::test]
async fn verify_exits_non_zero_and_names_the_first_altered_record() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    write_records(dir.path(), 10).await;
    let clean = loom(&["verify", "--data-dir", data_dir]);
    assert!(clean.status.success(), "{}", text(&clean.stderr));
    assert!(
        text(&clean.stdout).contains("data/0: 10 records"),
        "{}",
        text(&clean.stdout)
    );

    let segment = dir.path().join("log/data/0/00000000000000000000.seg");
    let mut bytes = std::fs::read(&segment).unwrap();
    let at = bytes.windows(8).position(|w| w == b"record 6").unwrap();
    bytes[at + 7] = b'9';
    std::fs::write(&segment, bytes).unwrap();
    let tampered = loom(&["verify", "--data-dir", data_dir]);
    assert_eq!(tampered.status.code(), Some(1));
    let stderr = text(&tampered.stderr);
    assert!(
        stderr.contains("00000000000000000000.seg") && stderr.contains("record offset 6"),
        "{stderr}"
    );

    let missing = loom(&["verify", "--data-dir", "/nonexistent/loom"]);
    assert!(!missing.status.success());
    assert!(text(&missing.stderr).contains("no log at"));
}

#[tokio::test]
async fn a_damaged_log_is_refused_with_segment_and_offset_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 10).await;
    let segment = dir.path().join("log/data/0/00000000000000000000.seg");
    let mut bytes = std::fs::read(&segment).unwrap();
    // Damage the length field of the record before "record 3".
    let value_at = bytes.windows(8).position(|w| w == b"record 3").unwrap();
    let frame_at = (52..value_at).rev().find(|&p| {
        let len = u32::from_le_bytes(bytes[p..p + 4].try_into().unwrap()) as usize;
        p + 12 + len <= bytes.len() && crc32c_of(&bytes[p..p + 4]) == bytes[p + 4..p + 8]
    });
    let frame_at = frame_at.unwrap();
    bytes[frame_at] ^= 0x10;
    std::fs::write(&segment, bytes).unwrap();
    let error = Server::start(dir.path(), &[], &[]).err().unwrap();
    assert!(
        error.contains("00000000000000000000.seg") && error.contains("record offset 3"),
        "{error}"
    );
    assert!(!error.contains("panicked"), "{error}");
}

fn crc32c_of(bytes: &[u8]) -> [u8; 4] {
    crc32c::crc32c(bytes).to_le_bytes()
}

#[test]
fn bad_command_lines_get_usage_errors_and_unbuilt_roles_say_so() {
    let unknown = loom(&["serve", "--no-such-flag"]);
    assert_eq!(unknown.status.code(), Some(2));
    assert!(text(&unknown.stderr).contains("Usage: loom serve"));
    let bad_fsync = loom(&["serve", "--fsync", "sometimes"]);
    assert_eq!(bad_fsync.status.code(), Some(2));
    assert!(text(&bad_fsync.stderr).contains("fsync policy"));
    let export = loom(&["export", "--bodies", "all"]);
    assert_eq!(export.status.code(), Some(2));
    assert!(text(&export.stderr).contains("possible values: omit, decrypt, sealed"));
    let no_target = loom(&["export"]);
    assert_eq!(no_target.status.code(), Some(1));
    assert!(text(&no_target.stderr).contains("name the table"));
    let no_query = loom(&["sql"]);
    assert_eq!(no_query.status.code(), Some(2));
    assert!(text(&no_query.stderr).contains("Usage: loom sql"));
    for alone in [
        loom(&["gateway"]),
        loom(&["projector", "--read-models", "postgres://nowhere/none"]),
        loom(&["query"]),
    ] {
        assert_eq!(alone.status.code(), Some(1));
        assert!(
            text(&alone.stderr).contains("--kafka-brokers"),
            "{}",
            text(&alone.stderr)
        );
    }
    let help = loom(&["--help"]);
    for command in [
        "serve",
        "verify",
        "migrate",
        "bench",
        "gateway",
        "projector",
        "replay",
        "query",
        "sql",
        "admin",
    ] {
        assert!(
            text(&help.stdout).contains(command),
            "--help lacks {command}"
        );
    }
}

fn admin(data_dir: &Path, args: &[&str]) -> Output {
    let mut all = vec!["admin", "--data-dir", data_dir.to_str().unwrap()];
    all.extend_from_slice(args);
    loom(&all)
}

fn stdout_line(output: &Output) -> String {
    assert!(output.status.success(), "{}", text(&output.stderr));
    text(&output.stdout).trim().to_owned()
}

#[tokio::test]
async fn admin_cli_manages_tenants_and_keys_on_a_data_dir_and_through_a_server() {
    let dir = tempfile::tempdir().unwrap();
    let tenant = stdout_line(&admin(dir.path(), &["tenant", "create", "acme"]));
    uuid::Uuid::parse_str(&tenant).unwrap();
    let key = stdout_line(&admin(
        dir.path(),
        &["key", "create", "--tenant", &tenant, "--name", "ci"],
    ));
    assert!(key.starts_with("loom-"), "{key}");
    let listed: serde_json::Value =
        serde_json::from_str(&stdout_line(&admin(dir.path(), &["key", "list"]))).unwrap();
    // Shared flags work after the subcommand too.
    let after = loom(&[
        "admin",
        "key",
        "list",
        "--data-dir",
        dir.path().to_str().unwrap(),
    ]);
    assert_eq!(
        stdout_line(&after),
        stdout_line(&admin(dir.path(), &["key", "list"]))
    );
    let help = text(&loom(&["admin", "key", "create", "--help"]).stdout);
    for flag in [
        "--data-dir",
        "--key-store-url",
        "--kafka-brokers",
        "--url",
        "--log",
    ] {
        assert!(help.contains(flag), "{flag} missing from the leaf's --help");
    }
    assert_eq!(listed[0]["tenant_id"], tenant.as_str());
    assert_eq!(listed[0]["name"], "ci");
    assert!(key.starts_with(listed[0]["prefix"].as_str().unwrap()));
    assert!(
        !listed.to_string().contains(&key),
        "a listing must never show the secret"
    );
    let unknown = admin(
        dir.path(),
        &[
            "key",
            "create",
            "--tenant",
            &uuid::Uuid::now_v7().to_string(),
        ],
    );
    assert!(!unknown.status.success());
    assert!(
        text(&unknown.stderr).contains("no tenant"),
        "{}",
        text(&unknown.stderr)
    );
    let no_project = admin(
        dir.path(),
        &[
            "key",
            "create",
            "--tenant",
            &tenant,
            "--project",
            &uuid::Uuid::now_v7().to_string(),
        ],
    );
    assert!(!no_project.status.success());
    assert!(
        text(&no_project.stderr).contains("no project"),
        "{}",
        text(&no_project.stderr)
    );

    // Through a running server: the data dir is locked, the admin API takes over.
    let token = "admin-secret";
    let server = Server::start(dir.path(), &[], &[("LOOM_ADMIN_TOKEN", token)]).unwrap();
    let locked = admin(dir.path(), &["tenant", "list"]);
    assert!(
        text(&locked.stderr).contains("locked by another process"),
        "{}",
        text(&locked.stderr)
    );
    let remote = |args: &[&str]| {
        let mut all = vec!["admin", "--url", &server.base, "--admin-token", token];
        all.extend_from_slice(args);
        loom(&all)
    };
    let tenants: serde_json::Value =
        serde_json::from_str(&stdout_line(&remote(&["tenant", "list"]))).unwrap();
    assert_eq!(tenants[0]["name"], "acme");
    let second = stdout_line(&remote(&["key", "create", "--tenant", &tenant]));
    assert_ne!(second, key);
    let key_id = listed[0]["key_id"].as_str().unwrap();
    assert!(
        remote(&["key", "revoke", key_id, "--reason", "rotated"])
            .status
            .success()
    );
    let keys: serde_json::Value =
        serde_json::from_str(&stdout_line(&remote(&["key", "list", "--tenant", &tenant]))).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let revoked = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == key_id)
        .unwrap();
    assert_eq!(revoked["revoked"], true);
    let wrong = loom(&[
        "admin",
        "--url",
        &server.base,
        "--admin-token",
        "nope",
        "tenant",
        "list",
    ]);
    assert!(
        text(&wrong.stderr).contains("401"),
        "{}",
        text(&wrong.stderr)
    );
    assert!(server.stop().success());

    // Everything was on the log: the data dir shows the same after the server is gone.
    let keys: serde_json::Value =
        serde_json::from_str(&stdout_line(&admin(dir.path(), &["key", "list"]))).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn the_admin_api_needs_its_token_and_is_off_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();
    let disabled = Server::start(dir.path(), &[], &[]).unwrap();
    let response = client
        .get(disabled.url("/admin/tenants"))
        .bearer_auth("x")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    disabled.stop();

    let server = Server::start(dir.path(), &[], &[("LOOM_ADMIN_TOKEN", "t0ken")]).unwrap();
    let missing = client
        .post(server.url("/admin/tenants"))
        .json(&serde_json::json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 401);
    let error: serde_json::Value = missing.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_admin_token");
    let created = client
        .post(server.url("/admin/tenants"))
        .bearer_auth("t0ken")
        .json(&serde_json::json!({"name": "globex"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let bad = client
        .post(server.url("/admin/tenants"))
        .bearer_auth("t0ken")
        .json(&serde_json::json!({"name": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let unknown = client
        .post(server.url(&format!("/admin/keys/{}/revoke", uuid::Uuid::now_v7())))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

#[tokio::test]
async fn serve_with_read_models_off_runs_no_projector() {
    // The same traffic on two servers: the default one projects it, the one with `off` does not.
    let token = "off-admin";
    let mut seen = Vec::new();
    for read_models in [None, Some("off")] {
        let dir = tempfile::tempdir().unwrap();
        let args: Vec<&str> = read_models.map_or(vec![], |off| vec!["--read-models", off]);
        let server = Server::start(dir.path(), &args, &[("LOOM_ADMIN_TOKEN", token)]).unwrap();
        common::tenant_and_key(&server, token, "acme").await;
        let sqlite = dir.path().join("read-models/v1.sqlite");
        let started = std::time::Instant::now();
        let projected = loop {
            let tenants =
                match sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=ro", sqlite.display()))
                    .await
                {
                    Ok(pool) => sqlx::query_scalar::<_, i64>("SELECT count(*) FROM tenants")
                        .fetch_one(&pool)
                        .await
                        .unwrap_or(0),
                    Err(_) => 0,
                };
            // The default server's projection shows within a second or two; give `off` longer.
            if tenants == 1 || started.elapsed() > std::time::Duration::from_secs(5) {
                break tenants == 1;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        let metrics = reqwest::get(server.url("/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(server.stop().success());
        seen.push((
            projected,
            dir.path().join("read-models").exists(),
            metrics.contains("loom_projector_position"),
        ));
    }
    assert_eq!(seen[0], (true, true, true), "the default server projects");
    assert_eq!(
        seen[1],
        (false, false, false),
        "with --read-models off nothing is projected"
    );
}

/// (byte position, length) of every frame of a segment file.
fn frames(segment: &Path) -> Vec<(usize, usize)> {
    let bytes = std::fs::read(segment).unwrap();
    let mut pos = 52;
    let mut frames = Vec::new();
    while pos + 12 <= bytes.len() {
        let len = 12 + u32::from_le_bytes(bytes[pos..pos + 4].try_into().unwrap()) as usize;
        frames.push((pos, len));
        pos += len;
    }
    frames
}

#[tokio::test]
async fn a_damaged_last_record_is_refused_until_repair_cuts_it_into_quarantine() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    let tenant = stdout_line(&admin(dir.path(), &["tenant", "create", "acme"]));
    stdout_line(&admin(dir.path(), &["key", "create", "--tenant", &tenant]));
    let segment = dir.path().join("log/control/0/00000000000000000000.seg");
    let (pos, len) = *frames(&segment).last().unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[pos + len - 40] ^= 0x20;
    std::fs::write(&segment, &bytes).unwrap();

    // verify fails and says how to proceed; nothing that opens the log drops the record.
    let verified = loom(&["verify", "--data-dir", data_dir]);
    assert_eq!(
        verified.status.code(),
        Some(1),
        "{}",
        text(&verified.stdout)
    );
    let report = text(&verified.stdout);
    assert!(
        report.contains("DAMAGED") && report.contains("--truncate-at control/0:1"),
        "{report}"
    );
    let listed = admin(dir.path(), &["key", "list"]);
    assert_eq!(listed.status.code(), Some(1));
    let error = text(&listed.stderr);
    assert!(
        error.contains("00000000000000000000.seg") && error.contains("record offset 1"),
        "{error}"
    );
    let refused = Server::start(dir.path(), &[], &[]).err().unwrap();
    assert!(refused.contains("record offset 1"), "{refused}");
    assert!(!refused.contains("panicked"), "{refused}");
    assert_eq!(
        std::fs::read(&segment).unwrap(),
        bytes,
        "the log is untouched"
    );

    // An explicit repair cuts the damaged record off and keeps its bytes.
    let repaired = loom(&[
        "repair",
        "--data-dir",
        data_dir,
        "--truncate-at",
        "control/0:1",
    ]);
    assert!(repaired.status.success(), "{}", text(&repaired.stderr));
    let kept: Vec<_> = std::fs::read_dir(dir.path().join("log/quarantine"))
        .unwrap()
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(kept.contains(&bytes[pos..].to_vec()), "{kept:?}");
    assert!(loom(&["verify", "--data-dir", data_dir]).status.success());
    assert_eq!(stdout_line(&admin(dir.path(), &["key", "list"])), "[]");
    assert!(stdout_line(&admin(dir.path(), &["tenant", "list"])).contains("acme"));
}

#[tokio::test]
async fn verify_reports_a_torn_tail_apart_and_checks_heads_it_printed() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().to_str().unwrap();
    write_records(dir.path(), 10).await;
    let printed = loom(&["verify", "--data-dir", data_dir, "--print-head"]);
    assert!(printed.status.success(), "{}", text(&printed.stderr));
    let head = text(&printed.stdout)
        .lines()
        .find_map(|l| l.trim().strip_prefix("head: data/0:"))
        .map(|h| format!("data/0:{h}"))
        .unwrap();
    assert!(head.starts_with("data/0:10:"), "{head}");
    let expected = loom(&["verify", "--data-dir", data_dir, "--expect-head", &head]);
    assert!(expected.status.success(), "{}", text(&expected.stdout));
    let other = format!("data/0:10:{}", "ab".repeat(32));
    let wrong = loom(&["verify", "--data-dir", data_dir, "--expect-head", &other]);
    assert_eq!(wrong.status.code(), Some(1));
    assert!(
        text(&wrong.stdout).contains("rewritten"),
        "{}",
        text(&wrong.stdout)
    );
    let malformed = loom(&["verify", "--data-dir", data_dir, "--expect-head", "data:10"]);
    assert_eq!(malformed.status.code(), Some(2));

    // A crash in the middle of a write after the last checkpoint: a torn tail, not damage.
    let checkpoint = dir.path().join("log/data/0/checkpoint");
    let saved = std::fs::read(&checkpoint).unwrap();
    write_records(dir.path(), 5).await;
    std::fs::write(&checkpoint, saved).unwrap();
    let segment = dir.path().join("log/data/0/00000000000000000000.seg");
    let (pos, len) = *frames(&segment).last().unwrap();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&segment)
        .unwrap();
    file.set_len((pos + len / 2) as u64).unwrap();
    let torn = loom(&["verify", "--data-dir", data_dir]);
    assert!(torn.status.success(), "{}", text(&torn.stderr));
    assert!(
        text(&torn.stdout).contains("torn tail"),
        "{}",
        text(&torn.stdout)
    );
    let server = Server::start(dir.path(), &[], &[]).unwrap();
    assert!(server.stop().success());
    assert_eq!(
        std::fs::read_dir(dir.path().join("log/quarantine"))
            .unwrap()
            .count(),
        1
    );
    let verified = loom(&["verify", "--data-dir", data_dir]);
    assert!(
        text(&verified.stdout).contains("data/0: 14 records"),
        "{}",
        text(&verified.stdout)
    );
}

/// `url` with `password` in its user info (the test Postgres trusts local users: it is ignored).
fn with_password(url: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap();
    let (user_info, host) = rest.split_once('@').unwrap();
    let user = user_info.split(':').next().unwrap();
    format!("{scheme}://{user}:{password}@{host}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs_or_the_data_dir() {
    let provider_key = "sk-provider-secret-7d1f";
    let mock = loom_mock::MockServer::start(loom_mock::MockConfig {
        api_key: Some(provider_key.into()),
        ..loom_mock::MockConfig::default()
    })
    .await
    .unwrap();
    let (keys_db, models_db) = (TestDatabase::create().await, TestDatabase::create().await);
    let secrets = [
        (
            "master key",
            "5ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2e75ec2",
        ),
        ("admin token", "admin-token-secret-91ab"),
        ("provider key", provider_key),
        ("key store password", "keystore-pw-secret-33c0"),
        ("read models password", "readmodels-pw-secret-77e2"),
    ];
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("loom.toml");
    std::fs::write(
        &config,
        format!(
            "[upstreams.mock]\nprovider = \"openai\"\nbase_url = \"{}/v1\"\napi_key_env = \"SECRET_PROVIDER_KEY\"\n\
             [models.fast]\ndeployments = [{{ upstream = \"mock\", model = \"m\" }}]\n",
            mock.url()
        ),
    )
    .unwrap();
    let data_dir = dir.path().join("data");
    let key_store = with_password(&keys_db.url, secrets[3].1);
    let read_models = with_password(&models_db.url, secrets[4].1);
    let args = [
        "--log",
        "debug",
        "--config",
        config.to_str().unwrap(),
        "--key-store-url",
        &key_store,
        "--read-models",
        &read_models,
    ];
    let env = [
        ("LOOM_MASTER_KEY", secrets[0].1),
        ("LOOM_ADMIN_TOKEN", secrets[1].1),
        ("SECRET_PROVIDER_KEY", provider_key),
    ];
    let server = Server::start(&data_dir, &args, &env).unwrap();
    let (_, key) = common::tenant_and_key(&server, secrets[1].1, "acme").await;
    let answered = reqwest::Client::new()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(
            &serde_json::json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        answered.status(),
        200,
        "the provider key reached the upstream"
    );
    // `--help` shows the environment's values, except secret ones.
    let help = std::process::Command::new(common::LOOM)
        .args(["serve", "--help"])
        .envs(env)
        .env("LOOM_KEY_STORE_URL", &key_store)
        .env("LOOM_READ_MODELS", &read_models)
        .output()
        .unwrap();
    let (status, log) = server.stop_with_log();
    assert!(status.success());
    assert!(log.len() > 20, "debug logging is on: {log:?}");
    let log = log.join("\n");
    let mut files = String::new();
    for entry in walk(&data_dir) {
        files.push_str(&String::from_utf8_lossy(&std::fs::read(entry).unwrap()));
    }
    for (what, secret) in secrets {
        assert!(!log.contains(secret), "the {what} is in the log");
        assert!(!files.contains(secret), "the {what} is in the data dir");
        assert!(
            !text(&help.stdout).contains(secret),
            "the {what} is in --help"
        );
    }
    keys_db.drop().await;
    models_db.drop().await;
}

/// Every file under `dir`.
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().map(Result::unwrap) {
        if entry.file_type().unwrap().is_dir() {
            files.extend(walk(&entry.path()));
        } else {
            files.push(entry.path());
        }
    }
    files
}

/// Rotating a tenant's data key: bodies sealed afterwards use the new version, those sealed
/// before still open, each rotation is on the log; only the operator or an owner may; the CLI
/// rotates on a data dir too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_tenant_key_seals_new_bodies_and_the_old_ones_still_open() {
    let harness = common::gateway::start(loom_mock::MockConfig::default(), "").await;
    let ask = |word: &str| {
        harness.chat(serde_json::json!({"model": "fast",
            "messages": [{"role": "user", "content": word}]}))
    };
    let before = ask("before the rotation").send().await.unwrap();
    assert_eq!(before.status(), 200);
    let before = common::gateway::trace_of(&before);
    let rotate = format!("/admin/tenants/{}/rotate-key", harness.tenant);
    let post = reqwest::Method::POST;
    // The tenant's developer key may not; an unknown tenant is 404.
    let (status, refused) = harness
        .call(post.clone(), &rotate, &harness.key, None)
        .await;
    assert_eq!(status, 403, "{refused}");
    let unknown = format!("/admin/tenants/{}/rotate-key", uuid::Uuid::now_v7());
    let (status, _) = (harness.call(post.clone(), &unknown, common::gateway::ADMIN, None)).await;
    assert_eq!(status, 404);
    let (status, rotated) = (harness.call(post, &rotate, common::gateway::ADMIN, None)).await;
    assert_eq!(status, 200, "{rotated}");
    assert_eq!(rotated["version"], 2);
    let after = ask("after the rotation").send().await.unwrap();
    assert_eq!(after.status(), 200);
    let after = common::gateway::trace_of(&after);

    let recorded = harness.stop().await;
    for (trace, version, word) in [(&before, 1, "before"), (&after, 2, "after")] {
        let (event, sealed) = (recorded.of_trace(trace).into_iter())
            .find_map(|e| match &e.payload {
                Payload::RequestReceived(received) => Some((e, received.body.clone().unwrap())),
                _ => None,
            })
            .unwrap();
        assert_eq!(sealed_key_ref(&sealed).unwrap().1, version);
        let body = text(&recorded.open(event, "body", &sealed));
        assert!(body.contains(word), "{body}");
    }
    let rotations: Vec<(uuid::Uuid, i32)> = (recorded.control.iter())
        .filter_map(|e| match &e.payload {
            Payload::TenantKeyRotated(rotated) => Some((e.envelope.tenant_id, rotated.version)),
            _ => None,
        })
        .collect();
    assert_eq!(rotations, vec![(recorded.tenant, 2)]);

    // The CLI, on the data dir the server left.
    let rotated = Command::new(common::LOOM)
        .args([
            "admin",
            "--data-dir",
            recorded._dir.path().to_str().unwrap(),
        ])
        .args(["tenant", "rotate-key", &recorded.tenant.to_string()])
        .env("LOOM_MASTER_KEY", common::gateway::MASTER)
        .output()
        .unwrap();
    assert_eq!(stdout_line(&rotated), "3");
}
