//! DataFusion reads the archive the archiver wrote: SQL over a tenant's encrypted files, keys
//! resolved from the files' key metadata through the key store; the metadata key alone answers
//! aggregates but not the events; after erasure nothing is read.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use datafusion::arrow::array::{Array, Int64Array};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;
use loom_projector::archive::{Archive, ArchiveConfig, ArchiveLocation, Archiver};
use loom_query::archive::{Access, register_tenant_table};
use loom_schemas::codec::Registry;
use loom_schemas::keystore::{KeyStore, MasterKey};
use loom_schemas::log::{EmbeddedLog, EmbeddedLogConfig, Log, Topic};
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
    let log: Arc<dyn Log> = Arc::new(
        EmbeddedLog::open(EmbeddedLogConfig::new(
            dir.path().join("log"),
            loom_schemas::testing::chain_key(),
        ))
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
        log.append(topic, records).await.unwrap();
    }
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

async fn query(ctx: &SessionContext, sql: &str) -> datafusion::error::Result<Vec<RecordBatch>> {
    ctx.sql(sql).await?.collect().await
}

fn single_i64(batches: &[RecordBatch]) -> i64 {
    let column = batches[0]
        .column(0)
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    assert!(!column.is_null(0));
    column.value(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn datafusion_reads_a_tenants_archive_through_the_key_store() {
    let (_dir, archive, keys, tenants) = archived().await;
    let tenant = tenants[0];
    let manifest = archive.manifest(tenant).await.unwrap();
    let rows: u64 = manifest.files.values().map(|f| f.rows).sum();
    assert!(manifest.files.len() > 1 && rows > 0, "{manifest:?}");

    // Every column: the events, whole.
    let ctx = SessionContext::new();
    register_tenant_table(
        &ctx,
        &archive,
        &manifest,
        Arc::clone(&keys),
        Access::Full,
        "events",
    )
    .unwrap();
    let counted = query(&ctx, "SELECT count(DISTINCT event_id) FROM events")
        .await
        .unwrap();
    assert_eq!(single_i64(&counted) as u64, rows);
    let records = query(
        &ctx,
        &format!(
            "SELECT count(*) FROM events \
             WHERE record IS NOT NULL AND envelope_tenant_id = '{tenant}'"
        ),
    )
    .await
    .unwrap();
    assert_eq!(single_i64(&records) as u64, rows);
    let tokens = query(
        &ctx,
        "SELECT sum(tokens_in) FROM events WHERE event_type = 'request.completed'",
    )
    .await
    .unwrap();
    assert!(single_i64(&tokens) > 0);

    // The metadata key alone: aggregates, but not the events.
    let ctx = SessionContext::new();
    register_tenant_table(
        &ctx,
        &archive,
        &manifest,
        Arc::clone(&keys),
        Access::Metadata,
        "events",
    )
    .unwrap();
    let counted = query(
        &ctx,
        "SELECT count(*) FROM events WHERE cost_micro_usd >= 0",
    )
    .await
    .unwrap();
    assert!(single_i64(&counted) > 0);
    let refused = query(&ctx, "SELECT record FROM events").await;
    let error = refused
        .expect_err("the records key was not granted")
        .to_string();
    assert!(error.contains("records"), "{error}");

    // Erased: the tenant's files say nothing to anyone.
    keys.erase(tenant).await.unwrap();
    let ctx = SessionContext::new();
    register_tenant_table(
        &ctx,
        &archive,
        &manifest,
        Arc::clone(&keys),
        Access::Metadata,
        "events",
    )
    .unwrap();
    assert!(query(&ctx, "SELECT count(*) FROM events").await.is_err());
}
