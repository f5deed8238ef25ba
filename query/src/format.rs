//! A query's rows as the client asked for them: JSON (an array of objects), CSV with a header,
//! Arrow IPC (a stream), or a table for a terminal.

use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::csv;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::ipc::writer::StreamWriter;
use datafusion::arrow::json::ArrayWriter;
use datafusion::arrow::util::pretty::pretty_format_batches_with_schema;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Csv,
    Arrow,
    Table,
}

impl Format {
    /// The format named by a `format=` parameter or `--format` flag.
    pub fn parse(name: &str) -> Option<Format> {
        match name.to_ascii_lowercase().as_str() {
            "json" => Some(Format::Json),
            "csv" => Some(Format::Csv),
            "arrow" | "ipc" | "arrow-ipc" => Some(Format::Arrow),
            "table" => Some(Format::Table),
            _ => None,
        }
    }

    /// The format an `Accept` header asks for, if it names one.
    pub fn from_accept(accept: &str) -> Option<Format> {
        accept.split(',').find_map(
            |part| match part.split(';').next().unwrap_or_default().trim() {
                "application/json" => Some(Format::Json),
                "text/csv" => Some(Format::Csv),
                "application/vnd.apache.arrow.stream" => Some(Format::Arrow),
                "text/plain" => Some(Format::Table),
                _ => None,
            },
        )
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Csv => "text/csv; charset=utf-8",
            Format::Arrow => "application/vnd.apache.arrow.stream",
            Format::Table => "text/plain; charset=utf-8",
        }
    }
}

/// `batches` (of `schema`) written in `format`.
pub fn write(
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<Vec<u8>, ArrowError> {
    let mut out = Vec::new();
    match format {
        Format::Json => {
            let mut writer = ArrayWriter::new(&mut out);
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            // The writer writes nothing at all for no rows.
            if out.is_empty() {
                out.extend_from_slice(b"[]");
            }
        }
        Format::Csv => {
            if batches.is_empty() {
                // The header alone (the writer writes it with the first batch).
                let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
                out.extend_from_slice(names.join(",").as_bytes());
                out.push(b'\n');
            } else {
                let mut writer = csv::WriterBuilder::new().with_header(true).build(&mut out);
                for batch in batches {
                    writer.write(batch)?;
                }
            }
        }
        Format::Arrow => {
            let mut writer = StreamWriter::try_new(&mut out, schema)?;
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
        Format::Table => {
            out = pretty_format_batches_with_schema(schema.clone(), batches)?
                .to_string()
                .into_bytes();
            out.push(b'\n');
        }
    }
    Ok(out)
}
