//! The rows of an export: the archive's columns but its keyed trace digest and the events whole,
//! the bodies as the export asks for them, and the partition columns `tenant_id` and `date`.

use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{
    Array, ArrayRef, BinaryArray, BinaryBuilder, RecordBatch, StringArray, StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::arrow::error::ArrowError;
use loom_projector::archive::columns::{RECORD, SCHEMA, TRACE_DIGEST};
use loom_schemas::codec::Registry;
use loom_schemas::crypto::FieldContext;
use loom_schemas::event::{Event, Payload, Sealed};
use loom_schemas::keystore::KeyStore;

use super::Bodies;

/// The partition columns, in the order of the table's directories.
pub const PARTITIONS: [&str; 2] = ["tenant_id", "date"];

/// The body columns, and where each comes from: `request_body` is the client's request
/// (`request.received`) or the request sent upstream (`llm_call.completed`), `response_body`
/// the upstream's answer, `tool_arguments` and `tool_result` a tool call's (`tool_call.observed`).
pub const BODY_COLUMNS: [&str; 4] = [
    "request_body",
    "response_body",
    "tool_arguments",
    "tool_result",
];

/// The archive's columns an export copies, in the archive's order.
pub static COPIED: LazyLock<Vec<String>> = LazyLock::new(|| {
    SCHEMA
        .fields()
        .iter()
        .map(|field| field.name().clone())
        .filter(|name| name != TRACE_DIGEST && name != RECORD)
        .collect()
});

/// The exported table's columns for `bodies`.
pub fn schema(bodies: Bodies) -> SchemaRef {
    let mut fields: Vec<Field> = SCHEMA
        .fields()
        .iter()
        .filter(|field| COPIED.contains(field.name()))
        .map(|field| field.as_ref().clone())
        .collect();
    let body_type = match bodies {
        Bodies::Omit => None,
        Bodies::Decrypt => Some(DataType::Utf8),
        Bodies::Sealed => Some(DataType::Binary),
    };
    if let Some(body_type) = body_type {
        fields.extend(
            BODY_COLUMNS
                .iter()
                .map(|name| Field::new(*name, body_type.clone(), true)),
        );
    }
    fields.extend(
        PARTITIONS
            .iter()
            .map(|name| Field::new(*name, DataType::Utf8, false)),
    );
    Arc::new(Schema::new(fields))
}

/// Bodies that could not be opened (a key rotated away, a record that does not decode): null in
/// the table, counted in the report.
#[derive(Debug, Default, Clone, Copy)]
pub struct Unopened(pub u64);

/// Turns archive batches (the [`COPIED`] columns, then `record` unless bodies are omitted) into
/// the exported table's.
pub struct Shape<'a> {
    pub bodies: Bodies,
    pub schema: SchemaRef,
    pub keys: &'a KeyStore,
    pub registry: &'a Registry,
}

impl Shape<'_> {
    pub fn convert(
        &self,
        batch: &RecordBatch,
        tenant: &str,
        day: &str,
        unopened: &mut Unopened,
    ) -> Result<RecordBatch, ArrowError> {
        let rows = batch.num_rows();
        let mut columns: Vec<ArrayRef> = batch.columns()[..COPIED.len()].to_vec();
        if self.bodies != Bodies::Omit {
            let records = batch
                .column_by_name(RECORD)
                .and_then(|column| column.as_any().downcast_ref::<BinaryArray>())
                .ok_or_else(|| ArrowError::SchemaError("the scan has no record column".into()))?;
            columns.extend(self.body_columns(records, unopened));
        }
        columns.push(Arc::new(StringArray::from(vec![tenant; rows])));
        columns.push(Arc::new(StringArray::from(vec![day; rows])));
        RecordBatch::try_new(Arc::clone(&self.schema), columns)
    }

    fn body_columns(&self, records: &BinaryArray, unopened: &mut Unopened) -> Vec<ArrayRef> {
        let mut text: [StringBuilder; 4] = Default::default();
        let mut sealed: [BinaryBuilder; 4] = Default::default();
        for row in 0..records.len() {
            let event = match records.is_valid(row) {
                true => self.registry.decode(records.value(row)).ok(),
                false => None,
            };
            let found = event.as_ref().map(sealed_bodies).unwrap_or_default();
            if event.is_none() {
                unopened.0 += 1;
            }
            for (column, body) in found.iter().enumerate() {
                match (self.bodies, body, &event) {
                    (Bodies::Decrypt, Some((field, body)), Some(event)) => {
                        let ctx = FieldContext {
                            tenant_id: event.envelope.tenant_id,
                            event_id: event.envelope.event_id,
                            field,
                        };
                        match self.keys.open(&ctx, body) {
                            Ok(plain) => text[column].append_value(String::from_utf8_lossy(&plain)),
                            Err(_) => {
                                unopened.0 += 1;
                                text[column].append_null();
                            }
                        }
                    }
                    (Bodies::Sealed, Some((_, body)), _) => sealed[column].append_value(&body.0),
                    (Bodies::Decrypt, ..) => text[column].append_null(),
                    _ => sealed[column].append_null(),
                }
            }
        }
        match self.bodies {
            Bodies::Decrypt => text
                .iter_mut()
                .map(|builder| Arc::new(builder.finish()) as ArrayRef)
                .collect(),
            _ => sealed
                .iter_mut()
                .map(|builder| Arc::new(builder.finish()) as ArrayRef)
                .collect(),
        }
    }
}

/// The sealed bodies of `event`, in [`BODY_COLUMNS`] order, each with the field name it was
/// sealed under.
fn sealed_bodies(event: &Event) -> [Option<(&'static str, &Sealed)>; 4] {
    match &event.payload {
        Payload::RequestReceived(p) => [p.body.as_ref().map(|b| ("body", b)), None, None, None],
        Payload::LlmCallCompleted(p) => [
            p.request_body.as_ref().map(|b| ("request_body", b)),
            p.response_body.as_ref().map(|b| ("response_body", b)),
            None,
            None,
        ],
        Payload::ToolCallObserved(p) => [
            None,
            None,
            p.arguments.as_ref().map(|b| ("arguments", b)),
            p.result.as_ref().map(|b| ("result", b)),
        ],
        _ => [None; 4],
    }
}
