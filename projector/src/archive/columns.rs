//! The archive's columns: one table of every event type, per tenant. Each row is one event: its
//! envelope and log position, the payload fields that queries filter and aggregate on (typed,
//! null where an event type has no such field), and the event whole (`record`: its Avro
//! single-object encoding as the log held it, sealed bodies still sealed) so that nothing is lost
//! and a replay is exact.
//!
//! One table rather than one per event family: a trace's events stay together in one file and
//! one sort order (by time), the schema evolves in one place, and typed views per event type are
//! a `WHERE event_type = …` away.

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, BinaryArray, BooleanArray, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use loom_schemas::event::{Event, Payload, QuotaScopeRef};
use uuid::Uuid;

use crate::fold::name_of;

/// The column holding each event whole; every other column is metadata.
pub const RECORD: &str = "record";

/// The column trace lookups filter on (a keyed digest of the trace id, with a bloom filter).
pub const TRACE_DIGEST: &str = "trace_digest";

/// The `event_type` of a record that did not decode.
pub const UNDECODABLE: &str = "undecodable";

/// Where an event sits in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogPosition {
    pub topic: &'static str,
    pub partition: u32,
    pub offset: u64,
}

/// One event, flattened.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Row {
    pub event_id: String,
    pub event_type: &'static str,
    pub schema_version: i32,
    pub occurred_at: i64,
    /// The envelope's tenant. Not `tenant_id`: that is the Hive partition column of the path
    /// (`tenant_id=…/`), which readers add themselves (and refuse a file column of the same name).
    /// It equals the partition's tenant but for control events, kept in the system tenant's
    /// partition, where it names the tenant the event is about.
    pub envelope_tenant_id: String,
    pub trace_id: Option<String>,
    /// A keyed digest (HMAC with the tenant's digest key) of the trace id: the column trace
    /// lookups filter on, with a bloom filter (which Parquet writes unencrypted).
    pub trace_digest: Option<Vec<u8>>,
    pub producer: String,
    pub log_topic: &'static str,
    pub log_partition: i32,
    pub log_offset: i64,
    /// The log record's timestamp (µs).
    pub log_timestamp: i64,
    pub project_id: Option<String>,
    pub api_key_id: Option<String>,
    pub user_id: Option<String>,
    pub endpoint: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub deployment: Option<String>,
    pub status: Option<String>,
    pub http_status: Option<i32>,
    pub error_class: Option<String>,
    pub attempt: Option<i32>,
    pub stream: Option<bool>,
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    pub tokens_cached: Option<i64>,
    pub tokens_cache_creation: Option<i64>,
    pub cost_micro_usd: Option<i64>,
    pub cache_saved_micro_usd: Option<i64>,
    pub latency_us: Option<i64>,
    pub ttft_us: Option<i64>,
    pub overhead_us: Option<i64>,
    pub response_id: Option<String>,
    pub tool_call_id: Option<String>,
    pub tool_name: Option<String>,
    pub tool_direction: Option<String>,
    pub quota_scope: Option<String>,
    pub quota_scope_id: Option<String>,
    pub quota_metric: Option<String>,
    pub quota_window: Option<String>,
    pub quota_amount: Option<i64>,
    pub quota_used: Option<i64>,
    pub quota_limit: Option<i64>,
    pub policy_action: Option<String>,
    pub policy_findings: Option<i32>,
    pub record: Vec<u8>,
}

impl Row {
    /// The memory this row holds, near enough: itself, its record, and its strings (their
    /// lengths; a few dozen bytes each).
    pub fn memory(&self) -> usize {
        let strings = [
            &self.trace_id,
            &self.project_id,
            &self.api_key_id,
            &self.user_id,
            &self.endpoint,
            &self.model,
            &self.provider,
            &self.deployment,
            &self.status,
            &self.error_class,
            &self.response_id,
            &self.tool_call_id,
            &self.tool_name,
            &self.tool_direction,
            &self.quota_scope,
            &self.quota_scope_id,
            &self.quota_metric,
            &self.quota_window,
            &self.policy_action,
        ]
        .into_iter()
        .flatten()
        .map(String::len)
        .sum::<usize>();
        std::mem::size_of::<Row>()
            + self.record.capacity()
            + self.event_id.len()
            + self.envelope_tenant_id.len()
            + self.producer.len()
            + strings
    }

    /// `event` (decoded from `record`, written with `schema_version`) at `position`.
    pub fn new(
        event: &Event,
        schema_version: i32,
        position: LogPosition,
        log_timestamp: i64,
        record: Vec<u8>,
    ) -> Row {
        let envelope = &event.envelope;
        let mut row = Row {
            event_id: envelope.event_id.to_string(),
            event_type: event.payload.event_type(),
            schema_version,
            occurred_at: envelope.occurred_at,
            envelope_tenant_id: envelope.tenant_id.to_string(),
            trace_id: envelope.trace_id.clone(),
            producer: envelope.producer.clone(),
            log_topic: position.topic,
            log_partition: i32::try_from(position.partition).unwrap_or(i32::MAX),
            log_offset: i64::try_from(position.offset).unwrap_or(i64::MAX),
            log_timestamp,
            record,
            ..Row::default()
        };
        row.fill(&event.payload);
        row
    }

    /// A record that does not decode (kept whole all the same), placed by its log headers.
    pub fn undecodable(
        tenant: Uuid,
        position: LogPosition,
        log_timestamp: i64,
        record: Vec<u8>,
    ) -> Row {
        Row {
            event_id: format!(
                "undecodable:{}/{}/{}",
                position.topic, position.partition, position.offset
            ),
            event_type: UNDECODABLE,
            occurred_at: log_timestamp,
            envelope_tenant_id: tenant.to_string(),
            producer: String::new(),
            log_topic: position.topic,
            log_partition: i32::try_from(position.partition).unwrap_or(i32::MAX),
            log_offset: i64::try_from(position.offset).unwrap_or(i64::MAX),
            log_timestamp,
            record,
            ..Row::default()
        }
    }

    /// The typed payload fields of `payload`.
    fn fill(&mut self, payload: &Payload) {
        let row = self;
        match payload {
            Payload::RequestReceived(p) => {
                row.project_id = p.project_id.map(|id| id.to_string());
                row.api_key_id = p.api_key_id.map(|id| id.to_string());
                row.user_id = p.user.clone();
                row.endpoint = Some(p.endpoint.clone());
                row.model = Some(p.model.clone());
                row.stream = Some(p.stream);
            }
            Payload::PolicyEvaluated(p) => {
                row.project_id = p.project_id.map(|id| id.to_string());
                row.policy_action = Some(name_of(&p.action));
                row.policy_findings = Some(i32::try_from(p.findings.len()).unwrap_or(i32::MAX));
                row.latency_us = Some(p.latency_us);
            }
            Payload::RoutingDecided(p) => {
                row.model = Some(p.model.clone());
                row.deployment = p.chosen.clone();
                row.status = Some(p.reason.clone());
            }
            Payload::LlmCallCompleted(p) => {
                row.attempt = Some(p.attempt);
                row.deployment = Some(p.deployment.clone());
                row.provider = Some(p.provider.clone());
                row.model = Some(p.model.clone());
                row.status = Some(name_of(&p.status));
                row.http_status = p.http_status;
                row.error_class = p.error_class.clone();
                row.stream = Some(p.stream);
                row.latency_us = Some(p.latency_us);
                row.ttft_us = p.ttft_us;
                row.tokens_in = p.tokens_in;
                row.tokens_out = p.tokens_out;
                row.tokens_cached = p.tokens_cached_read;
                row.tokens_cache_creation = p.tokens_cache_creation;
                row.cost_micro_usd = p.cost_micro_usd;
                row.cache_saved_micro_usd = p.cache_saved_micro_usd;
                row.response_id = p.response_id.clone();
            }
            Payload::CacheHit(p) => {
                row.project_id = p.project_id.map(|id| id.to_string());
                row.model = Some(p.model.clone());
                row.stream = Some(p.stream);
                row.tokens_in = p.tokens_in;
                row.tokens_out = p.tokens_out;
                row.cache_saved_micro_usd = p.cost_saved_micro_usd;
            }
            Payload::ToolCallObserved(p) => {
                row.tool_call_id = Some(p.tool_call_id.clone());
                row.tool_name = p.name.clone();
                row.tool_direction = Some(name_of(&p.direction));
            }
            // The ledger: tokens in `quota_amount`, micro-USD in `cost_micro_usd`, the scopes
            // charged named in `quota_scope` (e.g. `tenant,project,user,api_key`).
            Payload::QuotaReserved(p) => {
                row.quota_scope = Some(scope_names(&p.scopes));
                row.quota_window = Some("day".into());
                row.quota_amount = Some(p.tokens);
                row.cost_micro_usd = Some(p.cost_micro_usd);
            }
            Payload::QuotaConsumed(p) => {
                row.quota_scope = Some(scope_names(&p.scopes));
                row.quota_window = Some("day".into());
                row.quota_amount = Some(p.tokens);
                row.cost_micro_usd = Some(p.cost_micro_usd);
            }
            Payload::QuotaReleased(p) => {
                row.quota_scope = Some(scope_names(&p.scopes));
                row.quota_window = Some("day".into());
                row.quota_amount = Some(p.tokens);
                row.cost_micro_usd = Some(p.cost_micro_usd);
                row.error_class = Some(p.reason.clone());
            }
            Payload::QuotaDenied(p) => {
                row.quota_scope = Some(name_of(&p.scope));
                row.quota_scope_id = Some(p.scope_id.clone());
                row.quota_metric = Some(name_of(&p.metric));
                row.quota_window = Some(name_of(&p.window));
                row.quota_used = Some(p.used);
                row.quota_limit = Some(p.limit);
            }
            Payload::RequestCompleted(p) => {
                row.status = Some(name_of(&p.status));
                row.http_status = Some(p.http_status);
                row.error_class = p.error_class.clone();
                row.model = p.model.clone();
                row.provider = p.provider.clone();
                row.deployment = p.deployment.clone();
                row.attempt = Some(p.attempts);
                row.tokens_in = p.tokens_in;
                row.tokens_out = p.tokens_out;
                row.tokens_cached = p.tokens_cached_read;
                row.tokens_cache_creation = p.tokens_cache_creation;
                row.cost_micro_usd = p.cost_micro_usd;
                row.latency_us = Some(p.latency_us);
                row.ttft_us = p.ttft_us;
                row.overhead_us = Some(p.overhead_us);
            }
            Payload::ProjectCreated(p) => row.project_id = Some(p.project_id.to_string()),
            Payload::ProjectUpdated(p) => row.project_id = Some(p.project_id.to_string()),
            Payload::ApiKeyIssued(p) => {
                row.api_key_id = Some(p.key_id.to_string());
                row.project_id = p.project_id.map(|id| id.to_string());
            }
            Payload::ApiKeyRevoked(p) => row.api_key_id = Some(p.key_id.to_string()),
            Payload::QuotaLimitSet(p) => {
                row.quota_scope = Some(name_of(&p.scope));
                row.quota_scope_id = Some(p.scope_id.clone());
                row.quota_metric = Some(name_of(&p.metric));
                row.quota_window = Some(name_of(&p.window));
                row.quota_limit = p.limit;
            }
            Payload::RoleGranted(p) => {
                row.project_id = p.project_id.map(|id| id.to_string());
                row.user_id = Some(p.principal.clone());
            }
            Payload::RoleRevoked(p) => {
                row.project_id = p.project_id.map(|id| id.to_string());
                row.user_id = Some(p.principal.clone());
            }
            Payload::UpstreamCredentialSet(p) => {
                row.project_id = p.project_id.map(|id| id.to_string());
                row.provider = Some(p.upstream.clone());
            }
            Payload::UserRegistered(p) => row.user_id = Some(p.email.clone()),
            Payload::UserPasswordSet(p) => row.user_id = Some(p.email.clone()),
            Payload::SessionStarted(p) => {
                row.user_id = Some(p.principal.clone());
                row.api_key_id = p.api_key_id.map(|id| id.to_string());
            }
            Payload::TenantCreated(_)
            | Payload::TenantErased(_)
            | Payload::SessionEnded(_)
            | Payload::TenantKeyRotated(_)
            | Payload::LogAnchored(_) => {}
        }
    }
}

/// Declares the columns once: their Arrow types, and how each is read off the rows.
macro_rules! columns {
    ($( $name:ident: $kind:ident $(nullable $nullable:tt)? ),* $(,)?) => {
        /// The archive's Arrow schema.
        pub static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
            Arc::new(Schema::new(vec![$(
                Field::new(stringify!($name), columns!(@type $kind), columns!(@nullable $($nullable)?)),
            )*]))
        });

        /// The rows as one record batch, in the order given.
        pub fn batch(rows: &[Row]) -> Result<RecordBatch, ArrowError> {
            let columns: Vec<ArrayRef> = vec![$(
                columns!(@array $kind, rows.iter().map(|row| columns!(@get $kind row.$name))),
            )*];
            RecordBatch::try_new(Arc::clone(&SCHEMA), columns)
        }
    };
    (@nullable) => { false };
    (@nullable $x:tt) => { true };
    (@type text) => { DataType::Utf8 };
    (@type text_opt) => { DataType::Utf8 };
    (@type int) => { DataType::Int32 };
    (@type int_opt) => { DataType::Int32 };
    (@type long) => { DataType::Int64 };
    (@type long_opt) => { DataType::Int64 };
    (@type bool_opt) => { DataType::Boolean };
    (@type time) => { DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())) };
    (@type bytes) => { DataType::Binary };
    (@type bytes_opt) => { DataType::Binary };
    (@get text $value:expr) => { Some(&*$value) };
    (@get text_opt $value:expr) => { $value.as_deref() };
    (@get int $value:expr) => { Some($value) };
    (@get int_opt $value:expr) => { $value };
    (@get long $value:expr) => { Some($value) };
    (@get long_opt $value:expr) => { $value };
    (@get bool_opt $value:expr) => { $value };
    (@get time $value:expr) => { Some($value) };
    (@get bytes $value:expr) => { Some(&$value[..]) };
    (@get bytes_opt $value:expr) => { $value.as_deref() };
    (@array text, $values:expr) => { Arc::new(StringArray::from_iter($values)) };
    (@array text_opt, $values:expr) => { Arc::new(StringArray::from_iter($values)) };
    (@array int, $values:expr) => { Arc::new(Int32Array::from_iter($values)) };
    (@array int_opt, $values:expr) => { Arc::new(Int32Array::from_iter($values)) };
    (@array long, $values:expr) => { Arc::new(Int64Array::from_iter($values)) };
    (@array long_opt, $values:expr) => { Arc::new(Int64Array::from_iter($values)) };
    (@array bool_opt, $values:expr) => { Arc::new(BooleanArray::from_iter($values)) };
    (@array time, $values:expr) => {
        Arc::new(TimestampMicrosecondArray::from_iter($values).with_timezone("UTC"))
    };
    (@array bytes, $values:expr) => { Arc::new(BinaryArray::from_iter($values)) };
    (@array bytes_opt, $values:expr) => { Arc::new(BinaryArray::from_iter($values)) };
}

columns! {
    event_id: text,
    event_type: text,
    schema_version: int,
    occurred_at: time,
    envelope_tenant_id: text,
    trace_id: text_opt nullable(),
    trace_digest: bytes_opt nullable(),
    producer: text,
    log_topic: text,
    log_partition: int,
    log_offset: long,
    log_timestamp: time,
    project_id: text_opt nullable(),
    api_key_id: text_opt nullable(),
    user_id: text_opt nullable(),
    endpoint: text_opt nullable(),
    model: text_opt nullable(),
    provider: text_opt nullable(),
    deployment: text_opt nullable(),
    status: text_opt nullable(),
    http_status: int_opt nullable(),
    error_class: text_opt nullable(),
    attempt: int_opt nullable(),
    stream: bool_opt nullable(),
    tokens_in: long_opt nullable(),
    tokens_out: long_opt nullable(),
    tokens_cached: long_opt nullable(),
    tokens_cache_creation: long_opt nullable(),
    cost_micro_usd: long_opt nullable(),
    cache_saved_micro_usd: long_opt nullable(),
    latency_us: long_opt nullable(),
    ttft_us: long_opt nullable(),
    overhead_us: long_opt nullable(),
    response_id: text_opt nullable(),
    tool_call_id: text_opt nullable(),
    tool_name: text_opt nullable(),
    tool_direction: text_opt nullable(),
    quota_scope: text_opt nullable(),
    quota_scope_id: text_opt nullable(),
    quota_metric: text_opt nullable(),
    quota_window: text_opt nullable(),
    quota_amount: long_opt nullable(),
    quota_used: long_opt nullable(),
    quota_limit: long_opt nullable(),
    policy_action: text_opt nullable(),
    policy_findings: int_opt nullable(),
    record: bytes,
}

/// The names of the metadata columns (all but [`RECORD`]).
pub fn metadata_columns() -> Vec<&'static str> {
    SCHEMA
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .filter(|name| *name != RECORD)
        .collect()
}

/// The scopes a quota event charges, by name: `tenant,project,user,api_key`.
fn scope_names(scopes: &[QuotaScopeRef]) -> String {
    let names: Vec<&str> = scopes.iter().map(|s| s.scope.name()).collect();
    names.join(",")
}
