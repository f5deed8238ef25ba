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
use parquet::file::properties::WriterProperties;
use uuid::Uuid;

use super::columns::{RECORD, Row, SCHEMA, batch, metadata_columns};
use super::keys::{ArchiveKeys, KeyError, encryption_properties};

/// Rows per row group at most: row groups are the unit a reader skips by their statistics.
pub const ROW_GROUP_ROWS: usize = 64 * 1024;

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
pub fn write(keys: &KeyStore, tenant: Uuid, mut rows: Vec<Row>) -> Result<Bytes, FileError> {
    rows.sort_by_key(|row| {
        (
            row.occurred_at,
            row.log_topic,
            row.log_partition,
            row.log_offset,
        )
    });
    let encryption = encryption_properties(keys, tenant, &metadata_columns(), RECORD)?;
    let properties = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(3)?))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .with_file_encryption_properties(encryption)
        .build();
    let mut writer = ArrowWriter::try_new(Vec::new(), Arc::clone(&SCHEMA), Some(properties))?;
    for chunk in rows.chunks(ROW_GROUP_ROWS) {
        writer.write(&batch(chunk)?)?;
    }
    Ok(Bytes::from(writer.into_inner()?))
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
