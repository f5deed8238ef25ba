//! One archive file: rows sorted by time, written as Parquet with modular encryption (encrypted
//! footer, every column under a key of its tenant: see `keys`), zstd-compressed; and read back
//! with the keys a reader holds.

use std::sync::Arc;

use arrow::array::RecordBatch;
use bytes::Bytes;
use loom_schemas::keystore::KeyStore;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::{ArrowReaderOptions, ParquetRecordBatchReaderBuilder};
use parquet::basic::{Compression, ZstdLevel};
use parquet::errors::ParquetError;
use parquet::file::properties::{WriterProperties, WriterPropertiesBuilder};
use parquet::schema::types::ColumnPath;
use uuid::Uuid;

use super::columns::{RECORD, Row, SCHEMA, TRACE_DIGEST, batch, metadata_columns};
use super::keys::{ArchiveKeys, KeyError, encryption_properties};

/// Rows per row group at most: row groups are the unit a reader skips by their statistics.
pub const ROW_GROUP_ROWS: usize = 64 * 1024;

/// zstd's level: 3 (its own default) compresses the archive's text columns well for little CPU.
const ZSTD_LEVEL: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Keys(#[from] KeyError),
    #[error("parquet: {0}")]
    Parquet(#[from] ParquetError),
    #[error("arrow: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
}

/// `rows` of `tenant` as an encrypted Parquet file, sorted by time (then log position).
pub fn write(keys: &KeyStore, tenant: Uuid, rows: &mut [Row]) -> Result<Bytes, FileError> {
    rows.sort_by_key(|row| {
        (
            row.occurred_at,
            row.log_topic,
            row.log_partition,
            row.log_offset,
        )
    });
    for row in rows.iter_mut() {
        if let Some(trace_id) = &row.trace_id {
            row.trace_digest = Some(trace_digest(keys, tenant, trace_id)?);
        }
    }
    let batches = rows
        .chunks(ROW_GROUP_ROWS)
        .map(batch)
        .collect::<Result<Vec<_>, _>>()?;
    write_batches(keys, tenant, &batches)
}

/// Batches of the archive's schema, already in order, as an encrypted Parquet file of `tenant`.
pub fn write_batches(
    keys: &KeyStore,
    tenant: Uuid,
    batches: &[RecordBatch],
) -> Result<Bytes, FileError> {
    // Every column is encrypted but the trace digest: parquet cannot write a bloom filter for an
    // encrypted column, and the digest is a keyed hash that reveals nothing without the tenant's
    // key. Its pages and bloom filter are found only through the encrypted footer.
    let mut encrypted = metadata_columns();
    encrypted.retain(|column| *column != TRACE_DIGEST);
    let encryption = encryption_properties(keys, tenant, &encrypted, RECORD)?;
    let properties = properties()?
        .with_file_encryption_properties(encryption)
        .build();
    write_with(properties, batches)
}

/// The same file unencrypted: the baseline `loom bench archive` measures encryption against.
pub fn write_plaintext(batches: &[RecordBatch]) -> Result<Bytes, FileError> {
    write_with(properties()?.build(), batches)
}

/// How every archive file is written: zstd, row groups of [`ROW_GROUP_ROWS`], a bloom filter on
/// the trace digest alone.
fn properties() -> Result<WriterPropertiesBuilder, FileError> {
    Ok(WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(ZSTD_LEVEL)?))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .set_bloom_filter_enabled(false)
        .set_column_bloom_filter_enabled(ColumnPath::from(TRACE_DIGEST), true))
}

fn write_with(properties: WriterProperties, batches: &[RecordBatch]) -> Result<Bytes, FileError> {
    let mut writer = ArrowWriter::try_new(Vec::new(), Arc::clone(&SCHEMA), Some(properties))?;
    for batch in batches {
        writer.write(batch)?;
    }
    Ok(Bytes::from(writer.into_inner()?))
}

/// The keyed digest of a trace id that archive files carry in `trace_digest` (the first 16 bytes
/// of HMAC-SHA-256 under the tenant's digest key): a reader with the tenant's keys finds a trace's
/// row groups by it; the bloom filter reveals nothing about trace ids without the key.
pub fn trace_digest(keys: &KeyStore, tenant: Uuid, trace_id: &str) -> Result<Vec<u8>, KeyError> {
    let mut digest = keys.body_digest(tenant, trace_id.as_bytes())?;
    digest.truncate(16);
    Ok(digest)
}

/// Every row of an archive file, with the keys `reader` grants; a column it may not decrypt must
/// be left out of `columns` (`None`: all columns).
pub fn read(
    file: Bytes,
    reader: ArchiveKeys,
    columns: Option<&[&str]>,
) -> Result<Vec<RecordBatch>, FileError> {
    let options =
        ArrowReaderOptions::new().with_file_decryption_properties(reader.decryption_properties()?);
    let mut builder = ParquetRecordBatchReaderBuilder::try_new_with_options(file, options)?;
    if let Some(columns) = columns {
        let mask = parquet::arrow::ProjectionMask::columns(
            builder.parquet_schema(),
            columns.iter().copied(),
        );
        builder = builder.with_projection(mask);
    }
    Ok(builder.build()?.collect::<Result<Vec<_>, _>>()?)
}
