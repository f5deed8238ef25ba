//! DataFusion reads the archive the archiver wrote: SQL over a tenant's encrypted files, keys
//! resolved from the files' key metadata through the key store; the metadata key alone answers
//! aggregates but not the events; after erasure nothing is read. The SQL service on top fails
//! closed: no statement, path, function or trick reaches another tenant's rows, and every limit
//! holds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use std::time::Duration;

use datafusion::arrow::array::{Array, Int64Array, StringArray};
use loom_projector::archive::{Archive, ArchiveConfig, ArchiveLocation, Archiver};
use loom_projector::{ProjectorConfig, ReadStore, StoreLocation, replay};
use loom_query::analytics::{AnalyticsError, Window};
use loom_query::archive::{Access, Scope};
use loom_query::format::{self, Format};
use loom_query::sql::Answer;
use loom_query::sql::{SqlError, SqlLimits, SqlService};
use loom_query::traces::{Timeline, TraceFilters, Traces};
use loom_schemas::keystore::{KeyStore, MasterKey};
use loom_schemas::log::{EmbeddedLog, EmbeddedLogConfig, Log};
use loom_schemas::samples;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Two tenants' generated history, archived whole into a local directory.
async fn archived() -> (tempfile::TempDir, Archive, Arc<KeyStore>, Vec<Uuid>) {
    let dir = tempfile::tempdir().unwrap();
    let keys = Arc::new(
        KeyStore::open_file(dir.path().join("keys.json"), MasterKey::generate().unwrap())
            .await
            .unwrap(),
    );
    let mut data_keys = Vec::new();
    for _ in 0..2 {
        let tenant = Uuid::now_v7();
        keys.create_tenant_keys(tenant).await.unwrap();
        data_keys.push(keys.current_key(tenant).unwrap());
    }
    let now = loom_schemas::event::now_micros();
    let events = samples::history(&data_keys, 300, now - 3_600_000_000, 3).unwrap();
    let log = common::log_of(&dir.path().join("log"), &events).await;
    let archive = Archive::open(&ArchiveLocation::Directory(dir.path().join("archive"))).unwrap();
    let archiver = Archiver::new(
        archive.clone(),
        Arc::clone(&log),
        Arc::clone(&keys),
        ArchiveConfig {
            roll_bytes: 64 << 10,
            compaction: None,
            ..ArchiveConfig::default()
        },
    );
    // A stopped archiver has archived the log up to where it ended.
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    archiver.run(shutdown).await.unwrap();
    let tenants = data_keys.iter().map(|k| k.tenant_id).collect();
    (dir, archive, keys, tenants)
}

/// `answer` written in `format`.
fn written(format: Format, answer: &Answer) -> Vec<u8> {
    format::write(format, &answer.schema, &answer.batches).unwrap()
}

/// `answer` written in a text `format`.
fn written_text(format: Format, answer: &Answer) -> String {
    String::from_utf8(written(format, answer)).unwrap()
}

fn service(archive: &Archive, keys: &Arc<KeyStore>, limits: SqlLimits) -> SqlService {
    SqlService::new(archive.clone(), Arc::clone(keys), limits).unwrap()
}

fn single_i64(answer: &Answer) -> i64 {
    let column = answer.batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert!(!column.is_null(0));
    column.value(0)
}

/// Every distinct value of the first (string) column.
fn strings(answer: &Answer) -> Vec<String> {
    let mut values: Vec<String> = answer
        .batches
        .iter()
        .flat_map(|batch| {
            let column = batch
                .column(0)
                .as_any()
                .downcast_ref::<StringArray>()
                .unwrap();
            (0..column.len())
                .map(|i| column.value(i).to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    values.sort();
    values.dedup();
    values
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warmed_service_holds_every_footer_and_answers_the_same() {
    let (_dir, archive, keys, tenants) = archived().await;
    // The tenants' directories and the control events' own.
    let archived = archive.tenants().await.unwrap();
    assert!(archived.len() > tenants.len(), "{archived:?}");
    let mut files = 0;
    for tenant in &archived {
        files += archive.manifest(*tenant).await.unwrap().files.len();
    }
    let sql = service(&archive, &keys, SqlLimits::default());
    let warmed = sql.warm().await.unwrap();
    assert_eq!(warmed.tenants, archived.len());
    assert_eq!(warmed.footers, files);
    assert_eq!(sql.footers_kept(Access::Full), files);
    // Footers for metadata readers are read as they come: a full reader's are never theirs.
    assert_eq!(sql.footers_kept(Access::Metadata), 0);
    let count = "SELECT count(DISTINCT event_id) FROM events";
    let cold = service(&archive, &keys, SqlLimits::default());
    for scope in [Scope::Tenant(tenants[0]), Scope::AllTenants] {
        let warm = sql.query(scope, Access::Full, count).await.unwrap();
        let fresh = cold.query(scope, Access::Full, count).await.unwrap();
        assert_eq!(single_i64(&warm), single_i64(&fresh));
    }
    assert_eq!(sql.footers_kept(Access::Full), files);

    // A cache with no room for footers: the manifests are still read, the footers not.
    let small = service(
        &archive,
        &keys,
        SqlLimits {
            footer_cache_bytes: 0,
            ..SqlLimits::default()
        },
    );
    let warmed = small.warm().await.unwrap();
    assert_eq!((warmed.tenants, warmed.footers), (archived.len(), 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_reads_a_tenants_archive_through_the_key_store() {
    let (_dir, archive, keys, tenants) = archived().await;
    let (a, b) = (tenants[0], tenants[1]);
    let manifest = archive.manifest(a).await.unwrap();
    let rows: u64 = manifest.files.values().map(|f| f.rows).sum();
    assert!(manifest.files.len() > 1 && rows > 0, "{manifest:?}");
    let sql = service(&archive, &keys, SqlLimits::default());
    let full = |q: &'static str| sql.query(Scope::Tenant(a), Access::Full, q);

    // Every column: the events, whole, each once, all of tenant A.
    assert_eq!(sql.footers_kept(Access::Full), 0);
    let counted = full("SELECT count(DISTINCT event_id) FROM events")
        .await
        .unwrap();
    assert_eq!(single_i64(&counted) as u64, rows);
    // The files' footers are kept, for full readers only, and answer the same again.
    assert_eq!(sql.footers_kept(Access::Full), manifest.files.len());
    assert_eq!(sql.footers_kept(Access::Metadata), 0);
    let again = full("SELECT count(DISTINCT event_id) FROM events")
        .await
        .unwrap();
    assert_eq!(single_i64(&again) as u64, rows);
    let records = full("SELECT count(*) FROM events WHERE record IS NOT NULL")
        .await
        .unwrap();
    assert_eq!(single_i64(&records) as u64, rows);
    let owners = full("SELECT envelope_tenant_id FROM events").await.unwrap();
    assert_eq!(strings(&owners), vec![a.to_string()]);

    // The typed views.
    let calls = full("SELECT count(*) FROM llm_calls WHERE cost_micro_usd >= 0")
        .await
        .unwrap();
    assert!(single_i64(&calls) > 0);
    let requests = full(
        "SELECT count(*) FROM requests WHERE started_at <= completed_at AND endpoint IS NOT NULL",
    )
    .await
    .unwrap();
    let completed = full("SELECT count(*) FROM events WHERE event_type = 'request.completed'")
        .await
        .unwrap();
    assert_eq!(single_i64(&requests), single_i64(&completed));
    for view in ["tool_calls", "quota_events", "policy_findings"] {
        let owners = sql
            .query(
                Scope::Tenant(a),
                Access::Full,
                &format!("SELECT DISTINCT tenant_id FROM {view}"),
            )
            .await
            .unwrap();
        assert!(
            strings(&owners).iter().all(|t| *t == a.to_string()),
            "{view}"
        );
    }
    // Control events are the operator's.
    assert!(matches!(
        full("SELECT * FROM control_events").await,
        Err(SqlError::Invalid(_))
    ));

    // A trace is found by the keyed digest of its id, and the bloom filters (readable in the
    // encrypted files) skip the row groups that do not hold it.
    let trace = full("SELECT trace_id FROM events WHERE trace_id IS NOT NULL LIMIT 1")
        .await
        .unwrap();
    let trace = strings(&trace).remove(0);
    let digest = loom_projector::archive::file::trace_digest(&keys, a, &trace).unwrap();
    let found = sql
        .query(
            Scope::Tenant(a),
            Access::Full,
            &format!(
                "SELECT DISTINCT trace_id FROM events WHERE trace_digest = X'{}'",
                hex::encode(&digest)
            ),
        )
        .await
        .unwrap();
    assert_eq!(strings(&found), vec![trace]);
    // Digests no trace has (a bloom filter answers "maybe" now and then: several of them).
    let mut skipped = 0;
    for flip in 0..8u8 {
        let mut absent = digest.clone();
        absent[15] ^= 1 << flip;
        let explained = sql
            .query(
                Scope::Tenant(a),
                Access::Full,
                &format!(
                    "EXPLAIN ANALYZE SELECT count(*) FROM events WHERE trace_digest = X'{}'",
                    hex::encode(&absent)
                ),
            )
            .await
            .unwrap();
        let plan = written_text(Format::Csv, &explained);
        // `row_groups_pruned_bloom_filter=N total → M matched`: N - M row groups skipped.
        let counts: Vec<u64> = plan
            .split("row_groups_pruned_bloom_filter=")
            .nth(1)
            .and_then(|rest| rest.split(" matched").next())
            .map(|text| {
                text.split(|c: char| !c.is_ascii_digit())
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        assert_eq!(counts.len(), 2, "{plan}");
        skipped += counts[0] - counts[1];
    }
    assert!(skipped > 0, "no row group was skipped by its bloom filter");

    // Each format writes the rows.
    let answer =
        full("SELECT event_type, count(*) AS n FROM events GROUP BY event_type ORDER BY 1")
            .await
            .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&written(Format::Json, &answer)).unwrap();
    assert_eq!(json.as_array().unwrap().len(), answer.rows);
    let csv = written_text(Format::Csv, &answer);
    assert!(csv.starts_with("event_type,n\n") && csv.lines().count() == answer.rows + 1);
    let table = written_text(Format::Table, &answer);
    assert!(table.contains("llm_call.completed"), "{table}");
    let ipc = written(Format::Arrow, &answer);
    let read: usize = datafusion::arrow::ipc::reader::StreamReader::try_new(&ipc[..], None)
        .unwrap()
        .map(|batch| batch.unwrap().num_rows())
        .sum();
    assert_eq!(read, answer.rows);
    let empty = full("SELECT event_id FROM events WHERE false")
        .await
        .unwrap();
    let csv = written(Format::Csv, &empty);
    assert_eq!(csv, b"event_id\n");
    let json = written(Format::Json, &empty);
    assert_eq!(json, b"[]");

    // The metadata key alone: aggregates, but not the events (no record column at all).
    let metadata = |q: &'static str| sql.query(Scope::Tenant(a), Access::Metadata, q);
    let counted = metadata("SELECT count(*) FROM events WHERE cost_micro_usd >= 0")
        .await
        .unwrap();
    assert!(single_i64(&counted) > 0);
    // Its footers are its own, decrypted with its keys: never a full reader's.
    assert_eq!(sql.footers_kept(Access::Metadata), manifest.files.len());
    let recounted = metadata("SELECT count(*) FROM events WHERE cost_micro_usd >= 0")
        .await
        .unwrap();
    assert_eq!(single_i64(&recounted), single_i64(&counted));
    let everything = metadata("SELECT * FROM events LIMIT 5").await.unwrap();
    assert!(everything.schema.field_with_name("record").is_err());
    assert!(matches!(
        metadata("SELECT record FROM events").await,
        Err(SqlError::Invalid(_))
    ));

    // The operator reads every tenant.
    let owners = sql
        .query(
            Scope::AllTenants,
            Access::Full,
            "SELECT DISTINCT envelope_tenant_id FROM llm_calls JOIN events USING (event_id)",
        )
        .await
        .unwrap();
    let mut both = vec![a.to_string(), b.to_string()];
    both.sort();
    assert_eq!(strings(&owners), both);
    sql.query(
        Scope::AllTenants,
        Access::Full,
        "SELECT count(*) FROM control_events",
    )
    .await
    .unwrap();

    // Erased: the tenant's rows are gone for everyone, and the rest still answers. The footers
    // kept, which hold keys, are dropped.
    keys.erase(b).await.unwrap();
    let gone = sql
        .query(
            Scope::Tenant(b),
            Access::Full,
            "SELECT count(*) FROM events",
        )
        .await
        .unwrap();
    assert_eq!(single_i64(&gone), 0);
    assert_eq!(sql.footers_kept(Access::Full), 0);
    assert_eq!(sql.footers_kept(Access::Metadata), 0);
    let owners = sql
        .query(
            Scope::AllTenants,
            Access::Full,
            "SELECT DISTINCT tenant_id FROM llm_calls",
        )
        .await
        .unwrap();
    assert_eq!(strings(&owners), vec![a.to_string()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_fails_closed_on_every_trick() {
    let (dir, archive, keys, tenants) = archived().await;
    let (a, b) = (tenants[0], tenants[1]);
    let manifest_b = archive.manifest(b).await.unwrap();
    let file_b = archive.file_path(b, manifest_b.files.keys().next().unwrap());
    let file_b_on_disk = dir.path().join("archive").join(file_b.to_string());
    assert!(file_b_on_disk.exists(), "{}", file_b_on_disk.display());
    let dir_b = file_b_on_disk.parent().unwrap().parent().unwrap();
    let sql = service(&archive, &keys, SqlLimits::default());

    let not_allowed = [
        "CREATE TABLE x AS SELECT 1".to_owned(),
        "CREATE VIEW v AS SELECT * FROM events".to_owned(),
        format!(
            "CREATE EXTERNAL TABLE theirs STORED AS PARQUET LOCATION '{}'",
            dir_b.display()
        ),
        "DROP TABLE events".to_owned(),
        "INSERT INTO events SELECT * FROM events".to_owned(),
        "DELETE FROM events".to_owned(),
        "COPY (SELECT * FROM events) TO '/tmp/loom-sql-copy.csv'".to_owned(),
        "SET datafusion.execution.batch_size = 1".to_owned(),
    ];
    for statement in &not_allowed {
        match sql.query(Scope::Tenant(a), Access::Full, statement).await {
            Err(SqlError::NotAllowed(_) | SqlError::Invalid(_)) => {}
            other => panic!("{statement}: {other:?}"),
        }
    }
    assert!(!std::path::Path::new("/tmp/loom-sql-copy.csv").exists());

    let invalid = [
        format!("SELECT * FROM '{}'", file_b_on_disk.display()),
        format!("SELECT * FROM 'file://{}'", file_b_on_disk.display()),
        "SELECT * FROM 'file:///etc/passwd'".to_owned(),
        "SELECT * FROM information_schema.tables".to_owned(),
        "SELECT * FROM information_schema.df_settings".to_owned(),
        "SHOW TABLES".to_owned(),
        "SELECT * FROM generate_series(1, 1000000000000)".to_owned(),
        "SELECT * FROM range(1000000000000)".to_owned(),
        format!("SELECT * FROM \"{b}\".events"),
        "SELECT * FROM datafusion.other.events".to_owned(),
        "SELECT * FROM other_catalog.public.events".to_owned(),
        "SELEC 1".to_owned(),
        "SELECT * FROM events; SELECT 1".to_owned(),
        format!("SELECT {}1{}", "(".repeat(500), ")".repeat(500)),
        "SELECT nothing FROM events".to_owned(),
        "".to_owned(),
    ];
    for statement in &invalid {
        match sql.query(Scope::Tenant(a), Access::Full, statement).await {
            Err(SqlError::Invalid(_) | SqlError::NotAllowed(_)) => {}
            other => panic!("{statement}: {other:?}"),
        }
    }

    // Subqueries, CTEs, UNION, self-joins and qualified names see tenant A's rows only.
    for statement in [
        "SELECT envelope_tenant_id FROM events UNION SELECT tenant_id FROM requests",
        "WITH e AS (SELECT * FROM datafusion.public.events) SELECT envelope_tenant_id FROM e",
        "SELECT x.envelope_tenant_id FROM events x JOIN public.events y ON x.trace_id = y.trace_id",
        "SELECT envelope_tenant_id FROM events WHERE event_id IN (SELECT event_id FROM events)",
        "SELECT tenant_id FROM llm_calls UNION ALL SELECT tenant_id FROM tool_calls",
    ] {
        let answer = sql
            .query(Scope::Tenant(a), Access::Full, statement)
            .await
            .unwrap();
        assert_eq!(strings(&answer), vec![a.to_string()], "{statement}");
    }
    // EXPLAIN plans; it reads nothing of B either.
    let explained = sql
        .query(
            Scope::Tenant(a),
            Access::Full,
            "EXPLAIN SELECT count(*) FROM events",
        )
        .await
        .unwrap();
    let text = written_text(Format::Table, &explained);
    assert!(!text.contains(&b.to_string()), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sql_limit_holds() {
    let (_dir, archive, keys, tenants) = archived().await;
    let a = tenants[0];

    // Rows beyond the cap are cut, and the answer says so.
    let capped = service(
        &archive,
        &keys,
        SqlLimits {
            max_rows: 7,
            ..SqlLimits::default()
        },
    );
    let answer = capped
        .query(
            Scope::Tenant(a),
            Access::Full,
            "SELECT event_id FROM events",
        )
        .await
        .unwrap();
    assert_eq!((answer.rows, answer.truncated), (7, true));
    let answer = capped
        .query(Scope::Tenant(a), Access::Full, "SELECT 1")
        .await
        .unwrap();
    assert_eq!((answer.rows, answer.truncated), (1, false));

    // A cartesian join runs until the timeout cancels it; the scope's other query is refused
    // meanwhile.
    let slow = Arc::new(service(
        &archive,
        &keys,
        SqlLimits {
            timeout: Duration::from_secs(3),
            per_scope: 1,
            ..SqlLimits::default()
        },
    ));
    let cartesian = "SELECT count(*) FROM events a, events b, events c, events d \
                     WHERE a.log_offset + b.log_offset + c.log_offset + d.log_offset < 0";
    let running = tokio::spawn({
        let slow = Arc::clone(&slow);
        async move { slow.query(Scope::Tenant(a), Access::Full, cartesian).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        slow.query(Scope::Tenant(a), Access::Full, "SELECT 1").await,
        Err(SqlError::Busy(1))
    ));
    assert!(matches!(running.await.unwrap(), Err(SqlError::Timeout(_))));
    // The permit comes back once the cancelled plan has stopped (at its next yield point).
    let after_cancel = || async {
        for _ in 0..200 {
            match slow.query(Scope::Tenant(a), Access::Full, "SELECT 1").await {
                Err(SqlError::Busy(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
                other => return other,
            }
        }
        panic!("the cancelled query never stopped");
    };
    after_cancel().await.unwrap();
    // Endless recursion is cancelled the same way.
    let endless = slow
        .query(
            Scope::Tenant(a),
            Access::Full,
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r) SELECT count(*) FROM r",
        )
        .await;
    assert!(matches!(endless, Err(SqlError::Timeout(_))), "{endless:?}");
    after_cancel().await.unwrap();

    // A caller that goes away (a client that disconnects) cancels its query too.
    let patient = Arc::new(service(
        &archive,
        &keys,
        SqlLimits {
            timeout: Duration::from_secs(600),
            per_scope: 1,
            ..SqlLimits::default()
        },
    ));
    let caller = tokio::spawn({
        let patient = Arc::clone(&patient);
        async move {
            patient
                .query(Scope::Tenant(a), Access::Full, cartesian)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(matches!(
        patient
            .query(Scope::Tenant(a), Access::Full, "SELECT 1")
            .await,
        Err(SqlError::Busy(1))
    ));
    caller.abort();
    let mut stopped = false;
    for _ in 0..200 {
        match patient
            .query(Scope::Tenant(a), Access::Full, "SELECT 1")
            .await
        {
            Err(SqlError::Busy(_)) => tokio::time::sleep(Duration::from_millis(50)).await,
            other => {
                other.unwrap();
                stopped = true;
                break;
            }
        }
    }
    assert!(stopped, "the abandoned query never stopped");

    // A query that needs more memory than its pool, with no disk to spill to.
    let small = service(
        &archive,
        &keys,
        SqlLimits {
            memory_bytes: 64 << 10,
            spill_bytes: 0,
            ..SqlLimits::default()
        },
    );
    let refused = small
        .query(
            Scope::Tenant(a),
            Access::Full,
            "SELECT event_id, record FROM events ORDER BY record DESC",
        )
        .await;
    assert!(matches!(refused, Err(SqlError::TooLarge(_))), "{refused:?}");
}

/// Traces of the read models a replay of `dir`'s log folds (or of none, when `empty`), with
/// the archive behind them.
async fn traces_over(
    dir: &std::path::Path,
    archive: &Archive,
    keys: &Arc<KeyStore>,
    empty: bool,
) -> Traces {
    let location = StoreLocation::Sqlite(dir.join(if empty { "none" } else { "read-models" }));
    if empty {
        ReadStore::open(&location, 1).await.unwrap();
    } else {
        let log: Arc<dyn Log> = Arc::new(
            EmbeddedLog::open(EmbeddedLogConfig::new(
                dir.join("log"),
                loom_schemas::testing::chain_key(),
            ))
            .await
            .unwrap(),
        );
        replay(log, None, &location, ProjectorConfig::default(), false)
            .await
            .unwrap();
    }
    let sql = Arc::new(service(archive, keys, SqlLimits::default()));
    Traces::new(location, Arc::clone(keys), Some(sql))
}

/// Every body a timeline carries, wherever in it.
fn bodies_in(timeline: &Timeline) -> Vec<String> {
    let mut found = Vec::new();
    for step in &timeline.steps {
        for key in [
            "body",
            "request_body",
            "response_body",
            "arguments",
            "content",
        ] {
            if let Some(value) = step.detail.get(key).or_else(|| {
                step.detail
                    .get("answered")
                    .and_then(|answered| answered.get(key))
            }) {
                found.push(format!("{} {key}: {value}", step.kind));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_reads_the_same_from_the_read_models_and_from_the_archive() {
    let (dir, archive, keys, tenants) = archived().await;
    let fresh = traces_over(dir.path(), &archive, &keys, false).await;
    let archived = traces_over(dir.path(), &archive, &keys, true).await;
    let tenant = tenants[0];
    let scope = Scope::Tenant(tenant);

    // A page at a time, newest first: every trace of the tenant once, none of the other's.
    let everything = Window {
        from_us: 0,
        to_us: i64::MAX / 2,
    };
    let (mut seen, mut cursor) = (Vec::new(), None::<String>);
    loop {
        let page = fresh
            .list(
                scope,
                everything,
                &TraceFilters::default(),
                cursor.as_deref(),
                7,
            )
            .await
            .unwrap();
        assert!(page.traces.len() <= 7);
        seen.extend(
            page.traces
                .iter()
                .map(|t| (t.started_at.clone(), t.trace_id.clone())),
        );
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let mut sorted = seen.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, sorted, "newest first");
    sorted.dedup();
    assert_eq!(seen.len(), sorted.len(), "no trace twice");
    assert_eq!(seen.len(), 150, "half of the 300 requests are the tenant's");
    // A cursor is the tenant's own and unforgeable.
    let first = fresh
        .list(scope, everything, &TraceFilters::default(), None, 7)
        .await
        .unwrap();
    let cursor = first.next_cursor.unwrap();
    let other = Scope::Tenant(tenants[1]);
    let forged = format!("{}x", cursor);
    for (scope, cursor) in [
        (other, cursor.as_str()),
        (scope, forged.as_str()),
        (scope, "e30.AAAA"),
    ] {
        assert!(matches!(
            fresh
                .list(scope, everything, &TraceFilters::default(), Some(cursor), 7)
                .await,
            Err(AnalyticsError::Invalid(_))
        ));
    }
    // Filters: slow and failed ones.
    let slow = TraceFilters {
        min_latency_us: Some(2_000_000),
        ..TraceFilters::default()
    };
    let page = fresh
        .list(scope, everything, &slow, None, 200)
        .await
        .unwrap();
    assert!(!page.traces.is_empty());
    assert!(page.traces.iter().all(|t| t.latency_ms.unwrap() >= 2_000.0));
    let upstream = TraceFilters {
        error: Some("UPSTREAM".into()),
        ..TraceFilters::default()
    };
    let page = fresh
        .list(scope, everything, &upstream, None, 200)
        .await
        .unwrap();
    assert!(!page.traces.is_empty());
    assert!(
        page.traces
            .iter()
            .all(|t| t.error_class.as_deref() == Some("upstream_error"))
    );

    // One with a retry and a tool call, from both sources, whole and without bodies.
    let all = fresh
        .list(scope, everything, &TraceFilters::default(), None, 200)
        .await
        .unwrap();
    let mut checked = 0;
    for row in all
        .traces
        .iter()
        .filter(|t| t.attempts.unwrap_or(0) > 1)
        .take(5)
    {
        let id = &row.trace_id;
        let full = fresh
            .timeline(scope, Access::Full, id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((full.source, full.bodies), ("read_models", true));
        let kinds: Vec<&str> = full.steps.iter().map(|s| s.kind).collect();
        assert_eq!(kinds[..3], ["request", "policy", "routing"], "{kinds:?}");
        assert_eq!(kinds.last(), Some(&"completed"));
        let attempts = kinds.iter().filter(|k| **k == "attempt").count();
        assert_eq!(attempts as i64, row.attempts.unwrap());
        let request = &full.steps[0].detail["body"];
        assert_eq!(request["messages"][1]["role"], "user", "{request}");
        assert!(full.steps[2].detail["candidates"].is_array());

        let from_archive = archived
            .timeline(scope, Access::Full, id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (from_archive.source, from_archive.bodies),
            ("archive", true)
        );
        assert_eq!(
            serde_json::to_value(&from_archive.steps).unwrap(),
            serde_json::to_value(&full.steps).unwrap()
        );
        assert_eq!(
            serde_json::to_value(&from_archive.request).unwrap(),
            serde_json::to_value(&full.request).unwrap()
        );

        for traces in [&fresh, &archived] {
            let bare = traces
                .timeline(scope, Access::Metadata, id)
                .await
                .unwrap()
                .unwrap();
            assert!(!bare.bodies);
            assert_eq!(bodies_in(&bare), Vec::<String>::new());
            let kinds: Vec<&str> = bare.steps.iter().map(|s| s.kind).collect();
            assert_eq!(kinds.iter().filter(|k| **k == "attempt").count(), attempts);
        }
        // Another tenant finds nothing by that id, in either.
        for traces in [&fresh, &archived] {
            assert!(
                traces
                    .timeline(other, Access::Full, id)
                    .await
                    .unwrap()
                    .is_none()
            );
        }
        checked += 1;
    }
    assert!(checked > 0);
}
