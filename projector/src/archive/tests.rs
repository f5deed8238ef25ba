//! Archive files: what goes in comes out, only with the tenant's keys, and nothing is readable
//! without them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;

use arrow::array::{Array, BinaryArray, Int64Array, StringArray};
use loom_schemas::codec::Registry;
use loom_schemas::keystore::{KeyStore, MasterKey};
use loom_schemas::samples;
use uuid::Uuid;

use super::columns::{LogPosition, RECORD, Row};
use super::file::{read, write};
use super::keys::ArchiveKeys;

struct Fixture {
    _dir: tempfile::TempDir,
    keys: Arc<KeyStore>,
    tenant: Uuid,
    rows: Vec<Row>,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let keys = KeyStore::open_file(dir.path().join("keys.json"), MasterKey::generate().unwrap())
        .await
        .unwrap();
    let tenant = Uuid::now_v7();
    keys.create_tenant_keys(tenant).await.unwrap();
    let events = samples::one_of_each(
        &keys.current_key(tenant).unwrap(),
        &keys.digest_key(tenant).unwrap(),
    )
    .unwrap();
    let registry = Registry::builtin().unwrap();
    let rows = events
        .iter()
        .enumerate()
        .map(|(offset, event)| {
            let record = registry.encode(event).unwrap();
            let version = registry
                .current_version(event.payload.event_type())
                .unwrap();
            let position = LogPosition {
                topic: "data",
                partition: 0,
                offset: offset as u64,
            };
            Row::new(
                event,
                version as i32,
                position,
                event.envelope.occurred_at,
                record,
            )
        })
        .collect();
    Fixture {
        _dir: dir,
        keys: Arc::new(keys),
        tenant,
        rows,
    }
}

#[tokio::test]
async fn every_event_comes_back_whole_and_in_time_order() {
    let fixture = fixture().await;
    let file = write(&fixture.keys, fixture.tenant, &mut fixture.rows.clone()).unwrap();
    let reader = ArchiveKeys::full(Arc::clone(&fixture.keys), fixture.tenant);
    let batches = read(file, reader, None).unwrap();
    let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
    assert_eq!(rows, fixture.rows.len());
    let batch = &batches[0];
    let records = batch
        .column_by_name(RECORD)
        .unwrap()
        .as_any()
        .downcast_ref::<BinaryArray>()
        .unwrap();
    let registry = Registry::builtin().unwrap();
    let mut sorted = fixture.rows.clone();
    sorted.sort_by_key(|r| (r.occurred_at, r.log_offset));
    for (i, row) in sorted.iter().enumerate() {
        assert_eq!(records.value(i), &row.record[..]);
        let event = registry.decode(records.value(i)).unwrap();
        assert_eq!(event.envelope.event_id.to_string(), row.event_id);
    }
    let types = batch
        .column_by_name("event_type")
        .unwrap()
        .as_any()
        .downcast_ref::<StringArray>()
        .unwrap();
    let tokens = batch
        .column_by_name("tokens_in")
        .unwrap()
        .as_any()
        .downcast_ref::<Int64Array>()
        .unwrap();
    let call = (0..batch.num_rows())
        .find(|&i| types.value(i) == "llm_call.completed")
        .unwrap();
    assert!(!tokens.is_null(call));
    let created = (0..batch.num_rows())
        .find(|&i| types.value(i) == "tenant.created")
        .unwrap();
    assert!(tokens.is_null(created));
}

#[tokio::test]
async fn the_metadata_key_alone_reads_metadata_but_not_records() {
    let fixture = fixture().await;
    let file = write(&fixture.keys, fixture.tenant, &mut fixture.rows.clone()).unwrap();
    let metadata = || ArchiveKeys::metadata_only(Arc::clone(&fixture.keys), fixture.tenant);
    let batches = read(
        file.clone(),
        metadata(),
        Some(&["event_type", "cost_micro_usd"]),
    )
    .unwrap();
    assert_eq!(batches[0].num_rows(), fixture.rows.len());
    let refused = read(file, metadata(), Some(&["event_type", RECORD])).unwrap_err();
    assert!(refused.to_string().contains("records"), "{refused}");
}

#[tokio::test]
async fn without_the_tenants_keys_a_file_reveals_nothing() {
    let fixture = fixture().await;
    let file = write(&fixture.keys, fixture.tenant, &mut fixture.rows.clone()).unwrap();
    // No plaintext: not the trace id, the producer, a model name or an endpoint.
    for secret in [
        "trace-0001",
        "gateway/test/1",
        "gpt-4o",
        "/v1/chat/completions",
    ] {
        assert!(
            !file.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} is in the file"
        );
    }
    // Without decryption properties, or with another tenant's keys, nothing is read.
    let plain =
        parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file.clone());
    assert!(plain.is_err());
    let other = Uuid::now_v7();
    fixture.keys.create_tenant_keys(other).await.unwrap();
    let refused = read(
        file.clone(),
        ArchiveKeys::full(Arc::clone(&fixture.keys), other),
        None,
    )
    .unwrap_err();
    assert!(refused.to_string().contains("tenant"), "{refused}");
    // Once the tenant is erased, its own keys are gone too.
    fixture.keys.erase(fixture.tenant).await.unwrap();
    let erased = read(
        file,
        ArchiveKeys::full(Arc::clone(&fixture.keys), fixture.tenant),
        None,
    )
    .unwrap_err();
    assert!(erased.to_string().contains("erased"), "{erased}");
}
