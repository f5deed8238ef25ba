//! Export to Delta Lake: the table delta-rs's Python package reads (through DuckDB) holds the
//! archive's rows, partitioned by tenant and date; a second export adds only what is new, one
//! cut short adds each row once when run again; bodies are omitted, decrypted or sealed as asked
//! and only for roles that may read them; a target cannot reach outside its directory; S3 works
//! as a local path does.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use loom_projector::archive::{Archive, ArchiveConfig, ArchiveLocation, Archiver, S3Options};
use loom_query::archive::{Access, Scope};
use loom_query::export::{
    Bodies, ExportError, Exporter, Jobs, JobsError, Progress, Report, Request, Target,
};
use loom_query::format::{self, Format};
use loom_query::sql::{SqlLimits, SqlService};
use loom_schemas::crypto::{DataKey, FieldContext};
use loom_schemas::event::Sealed;
use loom_schemas::keystore::{KeyStore, MasterKey};
use loom_schemas::log::Log;
use loom_schemas::samples;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One hour and a half, from half an hour before a midnight: the history spans two dates.
const HOUR_US: i64 = 3_600_000_000;

struct Setup {
    dir: tempfile::TempDir,
    archive: Archive,
    keys: Arc<KeyStore>,
    data_keys: Vec<DataKey>,
    log: Arc<dyn Log>,
    exporter: Arc<Exporter>,
    sql: Arc<SqlService>,
}

impl Setup {
    /// `tenants` tenants with `requests` generated requests, archived.
    async fn new(tenants: usize, requests: usize) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let keys = Arc::new(
            KeyStore::open_file(dir.path().join("keys.json"), MasterKey::generate().unwrap())
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
        let midnight = now - now.rem_euclid(24 * HOUR_US);
        let events = samples::history(&data_keys, requests, midnight - HOUR_US / 2, 1).unwrap();
        let log = common::log_of(&dir.path().join("log"), &events).await;
        let archive =
            Archive::open(&ArchiveLocation::Directory(dir.path().join("archive"))).unwrap();
        let sql = Arc::new(
            SqlService::new(
                archive.clone(),
                Arc::clone(&keys),
                SqlLimits {
                    max_rows: 1_000_000,
                    max_bytes: usize::MAX,
                    ..SqlLimits::default()
                },
            )
            .unwrap(),
        );
        let setup = Setup {
            exporter: Arc::new(Exporter::new(Arc::clone(&sql), Arc::clone(&keys))),
            sql,
            dir,
            archive,
            keys,
            data_keys,
            log,
        };
        setup.archive_the_log().await;
        setup
    }

    /// Archives what the log holds (a stopped archiver archives up to the log's end).
    async fn archive_the_log(&self) {
        let archiver = Archiver::new(
            self.archive.clone(),
            Arc::clone(&self.log),
            Arc::clone(&self.keys),
            ArchiveConfig {
                roll_bytes: 32 << 10,
                compaction: None,
                ..ArchiveConfig::default()
            },
        );
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        archiver.run(shutdown).await.unwrap();
    }

    /// More requests, appended to the log and archived.
    async fn more(&self, requests: usize, seed: u64) {
        let now = loom_schemas::event::now_micros();
        let events = samples::history(&self.data_keys, requests, now, seed).unwrap();
        common::append(self.log.as_ref(), &events).await;
        self.archive_the_log().await;
    }

    fn target(&self, name: &str) -> Target {
        Target::parse(
            &self.dir.path().join(name).display().to_string(),
            S3Options::default(),
        )
        .unwrap()
    }

    async fn export(&self, scope: Scope, bodies: Bodies, target: &Target) -> Report {
        self.try_export(scope, bodies, target).await.unwrap()
    }

    async fn try_export(
        &self,
        scope: Scope,
        bodies: Bodies,
        target: &Target,
    ) -> Result<Report, ExportError> {
        let request = Request {
            scope,
            bodies,
            target: target.clone(),
        };
        self.exporter.run(request, Arc::default()).await
    }

    /// The archive's rows in `scope`: `columns` of `events`, by event id.
    async fn archived(&self, scope: Scope, columns: &str) -> Vec<Value> {
        let answer = self
            .sql
            .query(
                scope,
                Access::Metadata,
                &format!("SELECT {columns} FROM events ORDER BY event_id"),
            )
            .await
            .unwrap();
        let json = format::write(Format::Json, &answer.schema, &answer.batches).unwrap();
        serde_json::from_slice(&json).unwrap()
    }
}

fn python() -> String {
    std::env::var("LOOM_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// The table at `uri` as delta-rs's Python package reads it and DuckDB queries it
/// (tests/interop/read_delta.py).
fn delta(uri: &str, query: &str, options: Option<&Value>) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/interop/read_delta.py");
    let mut command = Command::new(python());
    command.arg(script).arg(uri).arg(query);
    if let Some(options) = options {
        command.arg(options.to_string());
    }
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("running {} (run ./infra/test.sh): {e}", python()));
    assert!(
        output.status.success(),
        "read_delta.py (run ./infra/test.sh, which installs deltalake and duckdb):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn local(target: &Target) -> String {
    target.local_path().unwrap().display().to_string()
}

fn count(table: &Value) -> u64 {
    table["rows"][0]["n"].as_u64().unwrap()
}

const COMPARED: &str = "event_id, event_type, envelope_tenant_id, trace_id, log_topic, \
                        log_partition, log_offset, model, status, tokens_in, cost_micro_usd";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_table_holds_the_archive_and_a_second_export_adds_only_what_is_new() {
    let setup = Setup::new(2, 400).await;
    let target = setup.target("lake");

    let first = setup.export(Scope::AllTenants, Bodies::Omit, &target).await;
    let archived = setup.archived(Scope::AllTenants, COMPARED).await;
    assert_eq!(first.rows, archived.len() as u64);
    // The system tenant's control events and each tenant's: one commit each.
    assert_eq!(first.commits.len(), 3, "{first:?}");
    assert_eq!(
        first.table_version,
        Some(3),
        "created, then one version per tenant"
    );
    assert_eq!(first.bodies_unopened, 0);

    let table = delta(
        &local(&target),
        &format!("SELECT {COMPARED}, tenant_id, date, occurred_at FROM events ORDER BY event_id"),
        None,
    );
    assert_eq!(table["partition_columns"], json!(["tenant_id", "date"]));
    assert!(
        !table["columns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "record" || c == "trace_digest" || c == "request_body"),
        "{}",
        table["columns"]
    );
    let rows = table["rows"].as_array().unwrap();
    assert_eq!(rows.len(), archived.len());
    let mut dates = BTreeSet::new();
    for (row, archived) in rows.iter().zip(&archived) {
        for column in COMPARED.split(", ") {
            assert_eq!(row[column], archived[column], "{column} of {row}");
        }
        // Each tenant's events under its own partition; control events under the system's.
        let tenant = row["tenant_id"].as_str().unwrap();
        assert!(
            tenant == row["envelope_tenant_id"] || tenant == Uuid::nil().to_string(),
            "{row}"
        );
        // The date partition is the UTC date of the event.
        let occurred = row["occurred_at"].as_str().unwrap();
        assert_eq!(row["date"].as_str().unwrap(), &occurred[..10], "{row}");
        dates.insert(row["date"].as_str().unwrap().to_owned());
    }
    assert!(dates.len() >= 2, "the history spans midnight: {dates:?}");

    // Nothing new: nothing written, the table as it was.
    let again = setup.export(Scope::AllTenants, Bodies::Omit, &target).await;
    assert!(again.commits.is_empty(), "{again:?}");
    assert_eq!(again.rows, 0);
    assert_eq!(again.table_version, first.table_version);

    // New events: only they are added.
    setup.more(60, 2).await;
    let archived = setup.archived(Scope::AllTenants, "event_id").await;
    let third = setup.export(Scope::AllTenants, Bodies::Omit, &target).await;
    assert_eq!(first.rows + third.rows, archived.len() as u64, "{third:?}");
    assert!(third.rows > 0 && third.commits.len() >= 2, "{third:?}");
    let table = delta(
        &local(&target),
        "SELECT count(*) AS n, count(DISTINCT event_id) AS distinct_ids FROM events",
        None,
    );
    assert_eq!(count(&table), archived.len() as u64);
    assert_eq!(table["rows"][0]["distinct_ids"], table["rows"][0]["n"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_cut_short_adds_each_row_once_when_run_again() {
    let setup = Setup::new(4, 600).await;
    let target = setup.target("lake");
    let total = setup.archived(Scope::AllTenants, "event_id").await.len() as u64;

    // Stopped as soon as it has written rows: what it wrote since its last commit is in no
    // version of the table, as after a crash.
    let progress = Arc::new(Progress::default());
    let request = Request {
        scope: Scope::AllTenants,
        bodies: Bodies::Omit,
        target: target.clone(),
    };
    let mut exporting = Box::pin(setup.exporter.run(request, Arc::clone(&progress)));
    loop {
        tokio::select! {
            report = &mut exporting => panic!("the export finished before it was cut: {report:?}"),
            () = tokio::time::sleep(Duration::from_micros(200)) => {}
        }
        if progress.snapshot().rows_written > 0 {
            break;
        }
    }
    drop(exporting);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let committed = match target.local_path().unwrap().join("_delta_log").exists() {
        true => count(&delta(
            &local(&target),
            "SELECT count(*) AS n FROM events",
            None,
        )),
        false => 0,
    };
    assert!(committed < total, "{committed} of {total} rows committed");

    let rest = setup.export(Scope::AllTenants, Bodies::Omit, &target).await;
    assert_eq!(committed + rest.rows, total, "{rest:?}");
    let table = delta(
        &local(&target),
        "SELECT count(*) AS n, count(DISTINCT event_id) AS distinct_ids FROM events",
        None,
    );
    assert_eq!(count(&table), total);
    assert_eq!(table["rows"][0]["distinct_ids"], table["rows"][0]["n"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_omitted_decrypted_or_sealed_and_only_for_roles_that_read_them() {
    let setup = Setup::new(1, 40).await;
    let tenant = setup.data_keys[0].tenant_id;
    let scope = Scope::Tenant(tenant);

    let decrypted = setup.target("decrypted");
    let report = setup.export(scope, Bodies::Decrypt, &decrypted).await;
    assert_eq!(report.bodies_unopened, 0);
    let table = delta(
        &local(&decrypted),
        "SELECT event_id, event_type, request_body, response_body FROM events \
         WHERE request_body IS NOT NULL OR response_body IS NOT NULL ORDER BY event_id",
        None,
    );
    let rows = table["rows"].as_array().unwrap();
    let requests: Vec<&Value> = rows
        .iter()
        .filter(|r| r["event_type"] == "request.received")
        .collect();
    assert_eq!(requests.len(), 40);
    for row in &requests {
        let body: Value = serde_json::from_str(row["request_body"].as_str().unwrap()).unwrap();
        assert!(body["messages"].is_array(), "{row}");
    }

    let sealed = setup.target("sealed");
    setup.export(scope, Bodies::Sealed, &sealed).await;
    let table = delta(
        &local(&sealed),
        "SELECT event_id, request_body FROM events WHERE event_type = 'request.received' \
         ORDER BY event_id",
        None,
    );
    let sealed_rows = table["rows"].as_array().unwrap();
    assert_eq!(sealed_rows.len(), 40);
    for (sealed, clear) in sealed_rows.iter().zip(&requests) {
        let bytes = hex::decode(sealed["request_body"].as_str().unwrap()).unwrap();
        let ctx = FieldContext {
            tenant_id: tenant,
            event_id: sealed["event_id"].as_str().unwrap().parse().unwrap(),
            field: "body",
        };
        let opened = setup.keys.open(&ctx, &Sealed(bytes)).unwrap();
        assert_eq!(
            String::from_utf8(opened).unwrap(),
            clear["request_body"].as_str().unwrap()
        );
    }

    // A table keeps the bodies it was written with.
    let error = setup
        .try_export(scope, Bodies::Omit, &sealed)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, ExportError::Invalid(m) if m.contains("other columns")),
        "{error}"
    );

    // A role that may not read bodies cannot export them, whichever way.
    let jobs = Jobs::new(
        Arc::clone(&setup.exporter),
        ArchiveLocation::Directory(setup.dir.path().join("exports")),
    );
    for bodies in [Bodies::Decrypt, Bodies::Sealed] {
        let refused = jobs
            .start(scope, Access::Metadata, "events", bodies)
            .unwrap_err();
        assert!(
            matches!(refused, JobsError::Export(ExportError::Forbidden(_))),
            "{refused}"
        );
    }
}

#[test]
fn targets_that_reach_outside_their_directory_are_refused() {
    let root_dir = tempfile::tempdir().unwrap();
    let root = ArchiveLocation::Directory(root_dir.path().to_path_buf());
    let tenant = Uuid::now_v7();
    let scope = Scope::Tenant(tenant);
    let other = Uuid::now_v7();
    for name in [
        "",
        "..",
        "../events",
        "lake/../../events",
        "./events",
        "/etc",
        "file:///etc",
        "s3://other-bucket/events",
        &format!("tenant_id={other}/events"),
        &format!("../tenant_id={other}/events"),
        "lake//events",
        "lake\\..\\events",
        "événements",
        "a/b/c/d/e/f/g/h/i",
    ] {
        let refused = Target::under(&root, scope, name).unwrap_err();
        assert!(matches!(refused, ExportError::Invalid(_)), "{name:?}");
    }
    let target = Target::under(&root, scope, "lake/events-2026.v1").unwrap();
    assert_eq!(
        target.local_path().unwrap(),
        std::path::absolute(root_dir.path())
            .unwrap()
            .join(format!("tenant_id={tenant}"))
            .join("lake")
            .join("events-2026.v1")
    );
    // The operator's command line names any directory or S3 prefix, but not other URLs.
    for text in [
        "file:///etc",
        "http://127.0.0.1/lake",
        "s3://bucket-only",
        "lake/../../etc",
    ] {
        let refused = Target::parse(text, S3Options::default()).unwrap_err();
        assert!(matches!(refused, ExportError::Invalid(_)), "{text:?}");
    }
}

/// The S3-compatible server `./infra/test.sh` starts.
fn s3() -> Option<(String, S3Options, Value)> {
    let endpoint = std::env::var("LOOM_TEST_S3_ENDPOINT").ok()?;
    let var = |name: &str| std::env::var(name).unwrap();
    let options = S3Options {
        endpoint: Some(endpoint.clone()),
        region: Some(var("LOOM_TEST_S3_REGION")),
        access_key_id: Some(var("LOOM_TEST_S3_ACCESS_KEY_ID")),
        secret_access_key: Some(var("LOOM_TEST_S3_SECRET_ACCESS_KEY").into()),
        path_style: true,
    };
    let python = json!({
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_REGION": var("LOOM_TEST_S3_REGION"),
        "AWS_ACCESS_KEY_ID": var("LOOM_TEST_S3_ACCESS_KEY_ID"),
        "AWS_SECRET_ACCESS_KEY": var("LOOM_TEST_S3_SECRET_ACCESS_KEY"),
        "AWS_ALLOW_HTTP": "true",
        "AWS_S3_ALLOW_UNSAFE_RENAME": "true",
    });
    Some((var("LOOM_TEST_S3_BUCKET"), options, python))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_to_s3_as_to_a_directory() {
    let Some((bucket, options, python)) = s3() else {
        panic!("LOOM_TEST_S3_ENDPOINT is not set: run the tests with ./infra/test.sh");
    };
    let setup = Setup::new(2, 100).await;
    // Short: s3s-fs names a file after the base64 of each object's whole key, and Linux allows
    // 255 bytes in a file name (S3 itself allows 1024-byte keys).
    let url = format!(
        "s3://{bucket}/x-{}/t",
        &Uuid::now_v7().simple().to_string()[24..]
    );
    let target = Target::parse(&url, options).unwrap();
    let first = setup.export(Scope::AllTenants, Bodies::Omit, &target).await;
    let total = setup.archived(Scope::AllTenants, "event_id").await.len() as u64;
    assert_eq!(first.rows, total);
    setup.more(20, 3).await;
    let second = setup.export(Scope::AllTenants, Bodies::Omit, &target).await;
    let total = setup.archived(Scope::AllTenants, "event_id").await.len() as u64;
    assert_eq!(first.rows + second.rows, total);
    let table = delta(
        &url,
        "SELECT count(*) AS n, count(DISTINCT event_id) AS distinct_ids FROM events",
        Some(&python),
    );
    assert_eq!(count(&table), total);
    assert_eq!(table["rows"][0]["distinct_ids"], table["rows"][0]["n"]);
}
