//! Traces: the list of a tenant's requests, newest first, with filters and a signed cursor; and
//! one trace as a timeline — request, policy verdict, routing decision, every upstream attempt,
//! tool calls with their results, completion — from the read models while they hold it, else
//! from the archive.
//!
//! Bodies (prompts, completions, tool arguments and results) are opened only with an
//! [`Opener`], which only a caller whose role may read them gets: without one, the sealed bodies
//! are not even fetched.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use datafusion::arrow::array::{
    Array, AsArray, BinaryArray, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use loom_projector::Lookup;
use loom_projector::StoreLocation;
use loom_projector::fold::{BodyRow, Changes, ControlState, DecisionRow, LlmCallRow, ToolCallRow};
use loom_schemas::codec::Registry;
use loom_schemas::crypto::{self, FieldContext};
use loom_schemas::event::Sealed;
use loom_schemas::keystore::KeyStore;
use loom_schemas::log::{Entry, Position, Record, Topic};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::Row;
use sqlx::any::AnyRow;
use utoipa::ToSchema;
use uuid::Uuid;

use crate::analytics::{
    AnalyticsError, Filters, REQUEST_COLUMNS, RequestRow, Sql, Window, request_row, rfc3339,
};
use crate::archive::{Access, Scope};
use crate::sql::SqlService;

/// Opens a tenant's sealed bodies. Made only for callers whose role may read bodies
/// ([`Access::Full`]); a timeline built without one has no bodies, whatever else goes wrong.
pub struct Opener {
    keys: Arc<KeyStore>,
    tenant: Uuid,
}

impl Opener {
    /// The body `field` of event `event_id` (as the read models name the field): JSON when it
    /// is, else text; `None` if it cannot be opened (an erased tenant, a rotated-away key).
    fn open(&self, event_id: &str, field: &str, sealed: &[u8]) -> Option<Value> {
        // The read models' names of the fields, and the names they were sealed under.
        let sealed_as = match field {
            "request" => "body",
            "llm_request" => "request_body",
            "llm_response" => "response_body",
            "tool_arguments" => "arguments",
            "tool_result" => "result",
            other => other,
        };
        let ctx = FieldContext {
            tenant_id: self.tenant,
            event_id: event_id.parse().ok()?,
            field: sealed_as,
        };
        let plain = self.keys.open(&ctx, &Sealed(sealed.to_vec())).ok()?;
        Some(
            serde_json::from_slice(&plain)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&plain).into_owned())),
        )
    }
}

/// The filters of a list of traces beyond the analytics' ones.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TraceFilters {
    pub common: Filters,
    pub min_cost_micro_usd: Option<i64>,
    pub min_latency_us: Option<i64>,
    /// Part of the error class (`upstream`, `timeout`, …).
    pub error: Option<String>,
}

/// A page of traces and the cursor of the next one.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Page {
    pub traces: Vec<RequestRow>,
    /// Pass as `cursor` for the next page; null on the last one.
    pub next_cursor: Option<String>,
}

/// Where a page ends: the last trace's start and id (the list's order).
#[derive(Serialize, Deserialize)]
struct CursorBody {
    s: i64,
    t: String,
}

/// A step of a trace's timeline.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Step {
    /// `request`, `policy`, `quota_denied`, `quota_consumed`, `routing`, `attempt`,
    /// `tool_call`, `completed`.
    pub kind: &'static str,
    /// When it happened (RFC 3339).
    pub at: String,
    /// Since the request arrived.
    pub offset_ms: f64,
    pub duration_ms: Option<f64>,
    #[schema(value_type = Object)]
    pub detail: Value,
}

/// One trace from arrival to answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Timeline {
    pub trace_id: String,
    pub tenant_id: String,
    /// `read_models` (fresh) or `archive` (past the read models' retention).
    pub source: &'static str,
    /// Whether bodies are included: the caller's role may read them.
    pub bodies: bool,
    /// The request and its totals.
    pub request: RequestRow,
    pub steps: Vec<Step>,
}

/// What a timeline is built of, from either source.
struct Parts {
    request: RequestRow,
    calls: Vec<LlmCallRow>,
    tools: Vec<ToolCallRow>,
    /// Results of this trace's tool calls, from later traces.
    results: Vec<ToolCallRow>,
    decisions: Vec<DecisionRow>,
    bodies: Vec<BodyRow>,
}

/// Answers trace lists and timelines.
pub struct Traces {
    reads: Lookup,
    keys: Arc<KeyStore>,
    /// Where traces past the read models are looked up.
    archive: Option<Arc<SqlService>>,
}

/// The longest page.
pub const MAX_PAGE: usize = 200;

impl Traces {
    pub fn new(
        location: StoreLocation,
        keys: Arc<KeyStore>,
        archive: Option<Arc<SqlService>>,
    ) -> Traces {
        Traces {
            reads: Lookup::new(location),
            keys,
            archive,
        }
    }

    /// The opener of `tenant`'s bodies, for a caller with `access`.
    pub fn opener(&self, access: Access, tenant: Uuid) -> Option<Opener> {
        (access == Access::Full).then(|| Opener {
            keys: Arc::clone(&self.keys),
            tenant,
        })
    }

    /// What a cursor of `scope` signs: the scope and the position.
    fn cursor_message(scope: Scope, body: &[u8]) -> Vec<u8> {
        let mut message = match scope {
            Scope::Tenant(tenant) => tenant.to_string().into_bytes(),
            Scope::AllTenants => b"*".to_vec(),
        };
        message.push(b'\n');
        message.extend_from_slice(body);
        message
    }

    fn cursor(&self, scope: Scope, last: &RequestRow, started_us: i64) -> Option<String> {
        let body = serde_json::to_vec(&CursorBody {
            s: started_us,
            t: last.trace_id.clone(),
        })
        .ok()?;
        let tag = crypto::tag(&self.keys.cursor_key(), &Self::cursor_message(scope, &body)).ok()?;
        Some(format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(&body),
            URL_SAFE_NO_PAD.encode(tag)
        ))
    }

    fn parse_cursor(&self, scope: Scope, text: &str) -> Result<CursorBody, AnalyticsError> {
        let bad = || AnalyticsError::Invalid("`cursor` is not one this list gave".into());
        let (body, tag) = text.split_once('.').ok_or_else(bad)?;
        let body = URL_SAFE_NO_PAD.decode(body).map_err(|_| bad())?;
        let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| bad())?;
        if !crypto::verify_tag(
            &self.keys.cursor_key(),
            &Self::cursor_message(scope, &body),
            &tag,
        ) {
            return Err(bad());
        }
        serde_json::from_slice(&body).map_err(|_| bad())
    }

    /// A page of at most `limit` traces of `scope` in `window`, newest first, after `cursor`.
    /// Stable while traces are added: a page starts strictly after the last one's position.
    pub async fn list(
        &self,
        scope: Scope,
        window: Window,
        filters: &TraceFilters,
        cursor: Option<&str>,
        limit: usize,
    ) -> Result<Page, AnalyticsError> {
        filters.common.validate()?;
        let after = cursor.map(|c| self.parse_cursor(scope, c)).transpose()?;
        let store = self.reads.store().await?;
        let mut sql = Sql::new();
        let mut filter = sql.filter(scope, window, &filters.common);
        if let Some(min) = filters.min_cost_micro_usd {
            filter.push_str(&format!(" AND t.cost_micro_usd >= {min}"));
        }
        if let Some(min) = filters.min_latency_us {
            filter.push_str(&format!(" AND t.latency_us >= {min}"));
        }
        if let Some(error) = &filters.error {
            let pattern = format!(
                "%{}%",
                error
                    .replace('\\', "\\\\")
                    .replace('%', "\\%")
                    .replace('_', "\\_")
            );
            let pattern = sql.bind(&pattern.to_lowercase());
            filter.push_str(&format!(
                " AND LOWER(t.error_class) LIKE {pattern} ESCAPE '\\'"
            ));
        }
        if let Some(after) = &after {
            let id = sql.bind(&after.t);
            filter.push_str(&format!(
                " AND (t.started_at < {s} OR (t.started_at = {s} AND t.trace_id < {id}))",
                s = after.s
            ));
        }
        // One more than asked: whether there is a next page.
        sql.text = format!(
            "SELECT {REQUEST_COLUMNS}, t.started_at FROM traces t WHERE {filter} \
             ORDER BY t.started_at DESC, t.trace_id DESC LIMIT {}",
            limit + 1
        );
        let rows = sql.fetch(&store).await?;
        let mut traces = Vec::with_capacity(limit);
        let mut last_start = 0;
        for row in rows.iter().take(limit) {
            traces.push(request_row(row)?);
            last_start = row.try_get::<i64, _>(24)?;
        }
        let next_cursor = match (rows.len() > limit, traces.last()) {
            (true, Some(last)) => self.cursor(scope, last, last_start),
            _ => None,
        };
        Ok(Page {
            traces,
            next_cursor,
        })
    }

    /// The timeline of trace `trace_id` of `scope` (for the operator: of whichever tenant has
    /// it), with bodies opened by `opener(tenant)` if the caller gets one; `None` if neither the
    /// read models nor the archive know it.
    pub async fn timeline(
        &self,
        scope: Scope,
        access: Access,
        trace_id: &str,
    ) -> Result<Option<Timeline>, AnalyticsError> {
        let (parts, source) = match self.fresh_parts(scope, access, trace_id).await? {
            Some(parts) => (parts, "read_models"),
            None => match self.archived_parts(scope, access, trace_id).await? {
                Some(parts) => (parts, "archive"),
                None => return Ok(None),
            },
        };
        let tenant: Uuid = parts
            .request
            .tenant_id
            .parse()
            .map_err(|_| AnalyticsError::Invalid("a trace of no tenant".into()))?;
        let opener = self.opener(access, tenant);
        Ok(Some(build(parts, source, opener.as_ref())))
    }

    async fn fresh_parts(
        &self,
        scope: Scope,
        access: Access,
        trace_id: &str,
    ) -> Result<Option<Parts>, AnalyticsError> {
        let store = self.reads.store().await?;
        let mut sql = Sql::new();
        let id = sql.bind(trace_id);
        let tenant = match scope {
            Scope::Tenant(tenant) => {
                format!(" AND t.tenant_id = {}", sql.bind(&tenant.to_string()))
            }
            Scope::AllTenants => String::new(),
        };
        sql.text = format!(
            "SELECT {REQUEST_COLUMNS} FROM traces t WHERE t.trace_id = {id}{tenant} \
             ORDER BY t.started_at DESC LIMIT 1"
        );
        let Some(row) = sql
            .fetch(&store)
            .await?
            .first()
            .map(request_row)
            .transpose()?
        else {
            return Ok(None);
        };
        let rows = |table: &str, columns: &str, order: &str| {
            let mut sql = Sql::new();
            let tenant = sql.bind(&row.tenant_id);
            let trace = sql.bind(&row.trace_id);
            sql.text = format!(
                "SELECT {columns} FROM {table} WHERE tenant_id = {tenant} AND trace_id = {trace} \
                 ORDER BY {order}"
            );
            sql
        };
        let calls = rows("llm_calls", LLM_CALL_COLUMNS, "started_at, attempt")
            .fetch(&store)
            .await?
            .iter()
            .map(llm_call)
            .collect::<Result<Vec<_>, _>>()?;
        let tools = rows("tool_calls", TOOL_CALL_COLUMNS, "occurred_at, event_id")
            .fetch(&store)
            .await?
            .iter()
            .map(tool_call)
            .collect::<Result<Vec<_>, _>>()?;
        let decisions = rows(
            "trace_decisions",
            "event_id, tenant_id, trace_id, kind, occurred_at, detail",
            "occurred_at, event_id",
        )
        .fetch(&store)
        .await?
        .iter()
        .map(decision)
        .collect::<Result<Vec<_>, _>>()?;
        // The results of this trace's tool calls come with later requests.
        let asked: Vec<&str> = tools
            .iter()
            .filter(|t| t.direction == "requested")
            .map(|t| t.tool_call_id.as_str())
            .collect();
        let mut results = Vec::new();
        if !asked.is_empty() {
            let mut sql = Sql::new();
            let tenant = sql.bind(&row.tenant_id);
            let ids: Vec<String> = asked.iter().map(|id| sql.bind(id)).collect();
            sql.text = format!(
                "SELECT {TOOL_CALL_COLUMNS} FROM tool_calls WHERE tenant_id = {tenant} \
                 AND direction = 'result' AND tool_call_id IN ({}) ORDER BY occurred_at",
                ids.join(", ")
            );
            results = sql
                .fetch(&store)
                .await?
                .iter()
                .map(tool_call)
                .collect::<Result<Vec<_>, _>>()?;
        }
        // Sealed bodies are read only for a caller who may open them.
        let mut bodies = Vec::new();
        if access == Access::Full {
            bodies = rows(
                "trace_bodies",
                "event_id, field, tenant_id, trace_id, occurred_at, sealed",
                "occurred_at",
            )
            .fetch(&store)
            .await?
            .iter()
            .map(body)
            .collect::<Result<Vec<_>, _>>()?;
            if !results.is_empty() {
                let mut sql = Sql::new();
                let tenant = sql.bind(&row.tenant_id);
                let ids: Vec<String> = results.iter().map(|r| sql.bind(&r.event_id)).collect();
                sql.text = format!(
                    "SELECT event_id, field, tenant_id, trace_id, occurred_at, sealed \
                     FROM trace_bodies WHERE tenant_id = {tenant} AND event_id IN ({})",
                    ids.join(", ")
                );
                for row in sql.fetch(&store).await? {
                    bodies.push(body(&row)?);
                }
            }
        }
        Ok(Some(Parts {
            request: row,
            calls,
            tools,
            results,
            decisions,
            bodies,
        }))
    }

    /// The trace's events from the archive: by its keyed digest, in the files of the day its
    /// id names (a UUIDv7, the gateway's own) or of every day (an id the client chose).
    async fn archived_parts(
        &self,
        scope: Scope,
        access: Access,
        trace_id: &str,
    ) -> Result<Option<Parts>, AnalyticsError> {
        let (Some(archive), Scope::Tenant(tenant)) = (&self.archive, scope) else {
            // The operator's lookups by id across tenants are served by the read models.
            return Ok(None);
        };
        let batches = archive
            .trace_events(tenant, access, trace_id, days_of(trace_id))
            .await
            .map_err(|e| AnalyticsError::Archive(e.to_string()))?;
        if batches.iter().all(|b| b.num_rows() == 0) {
            return Ok(None);
        }
        let changes = match access {
            Access::Full => fold_records(&batches)?,
            Access::Metadata => changes_from_columns(&batches)?,
        };
        let Some(patch) = changes.traces.first() else {
            return Ok(None);
        };
        let request = RequestRow::from_patch(patch);
        let (tools, results): (Vec<ToolCallRow>, Vec<ToolCallRow>) = changes
            .tool_calls
            .into_iter()
            .partition(|t| t.trace_id == trace_id);
        Ok(Some(Parts {
            request,
            calls: changes.llm_calls,
            tools,
            results,
            decisions: changes.decisions,
            bodies: changes.bodies,
        }))
    }
}

/// The UTC days a trace whose id is a UUIDv7 happened on (its day, and the next in case it ran
/// past midnight); `None` for other ids.
fn days_of(trace_id: &str) -> Option<Vec<String>> {
    let id: Uuid = trace_id.parse().ok()?;
    if id.get_version_num() != 7 {
        return None;
    }
    let (seconds, _) = id.get_timestamp()?.to_unix();
    let day = chrono::DateTime::from_timestamp(i64::try_from(seconds).ok()?, 0)?.date_naive();
    Some(
        [Some(day), day.succ_opt()]
            .into_iter()
            .flatten()
            .map(|d| d.format("%Y-%m-%d").to_string())
            .collect(),
    )
}

/// Folds archived records (the `record` column) as the projector does.
fn fold_records(batches: &[RecordBatch]) -> Result<Changes, AnalyticsError> {
    let registry = Registry::builtin().map_err(|e| AnalyticsError::Archive(e.to_string()))?;
    let mut entries = Vec::new();
    for batch in batches {
        let records = batch
            .column_by_name("record")
            .and_then(|c| c.as_any().downcast_ref::<BinaryArray>())
            .ok_or_else(|| AnalyticsError::Archive("no record column".into()))?;
        for i in 0..records.len() {
            entries.push(Entry {
                position: Position {
                    partition: 0,
                    offset: entries.len() as u64,
                },
                record: Record {
                    key: Vec::new(),
                    headers: Vec::new(),
                    value: records.value(i).to_vec(),
                    timestamp_us: 0,
                },
            });
        }
    }
    Ok(Changes::fold(
        registry,
        Topic::Data,
        &entries,
        &mut ControlState::default(),
    ))
}

/// The rows a timeline needs from the archive's plain columns, for a caller without the key of
/// the `record` column: no bodies, no routing candidates, the number of policy findings only.
fn changes_from_columns(batches: &[RecordBatch]) -> Result<Changes, AnalyticsError> {
    let mut changes = Changes::default();
    let mut patch = loom_projector::fold::TracePatch::default();
    for batch in batches {
        let columns = Columns(batch);
        for i in 0..batch.num_rows() {
            let event_id = columns.text("event_id", i).unwrap_or_default();
            let tenant_id = columns.text("envelope_tenant_id", i).unwrap_or_default();
            let trace_id = columns.text("trace_id", i).unwrap_or_default();
            let at = columns.time("occurred_at", i).unwrap_or_default();
            patch.tenant_id.clone_from(&tenant_id);
            patch.trace_id.clone_from(&trace_id);
            match columns.text("event_type", i).as_deref() {
                Some("request.received") => {
                    patch.first_at = at;
                    patch.started_at = Some(at);
                    patch.endpoint = columns.text("endpoint", i);
                    patch.model_requested = columns.text("model", i);
                    patch.project_id = columns.text("project_id", i);
                    patch.user_id = columns.text("user_id", i);
                    patch.api_key_id = columns.text("api_key_id", i);
                    patch.stream = columns.flag("stream", i);
                }
                Some("policy.evaluated") => {
                    let action = columns.text("policy_action", i);
                    let findings = columns.int("policy_findings", i);
                    patch.policy_action.clone_from(&action);
                    patch.policy_findings = findings;
                    changes.decisions.push(DecisionRow {
                        event_id,
                        tenant_id,
                        trace_id,
                        kind: "policy",
                        occurred_at: at,
                        detail: json!({"action": action, "findings": findings}).to_string(),
                    });
                }
                Some("routing.decided") => changes.decisions.push(DecisionRow {
                    event_id,
                    tenant_id,
                    trace_id,
                    kind: "routing",
                    occurred_at: at,
                    detail: json!({"model": columns.text("model", i),
                                   "chosen": columns.text("deployment", i)})
                    .to_string(),
                }),
                Some("llm_call.completed") => {
                    let latency = columns.int("latency_us", i).unwrap_or_default();
                    changes.llm_calls.push(LlmCallRow {
                        event_id,
                        tenant_id,
                        trace_id,
                        attempt: columns.int("attempt", i).unwrap_or_default(),
                        deployment: columns.text("deployment", i).unwrap_or_default(),
                        provider: columns.text("provider", i).unwrap_or_default(),
                        model: columns.text("model", i).unwrap_or_default(),
                        status: columns.text("status", i).unwrap_or_default(),
                        http_status: columns.int("http_status", i),
                        error_class: columns.text("error_class", i),
                        stream: columns.flag("stream", i).unwrap_or_default(),
                        started_at: at - latency,
                        latency_us: latency,
                        ttft_us: columns.int("ttft_us", i),
                        tokens_in: columns.int("tokens_in", i),
                        tokens_out: columns.int("tokens_out", i),
                        tokens_cached: columns.int("tokens_cached", i),
                        cost_micro_usd: columns.int("cost_micro_usd", i),
                        usage_estimated: false,
                        response_id: columns.text("response_id", i),
                        tokens_cache_creation: columns.int("tokens_cache_creation", i),
                        cache_saved_micro_usd: columns.int("cache_saved_micro_usd", i),
                        dropped_fields: None,
                    });
                }
                Some("tool_call.observed") => changes.tool_calls.push(ToolCallRow {
                    event_id,
                    tenant_id,
                    trace_id,
                    direction: columns.text("tool_direction", i).unwrap_or_default(),
                    tool_call_id: columns.text("tool_call_id", i).unwrap_or_default(),
                    name: columns.text("tool_name", i),
                    occurred_at: at,
                }),
                Some("request.completed") => {
                    patch.status = columns.text("status", i);
                    patch.http_status = columns.int("http_status", i);
                    patch.error_class = columns.text("error_class", i);
                    patch.model_served = columns.text("model", i);
                    patch.provider = columns.text("provider", i);
                    patch.deployment = columns.text("deployment", i);
                    patch.tokens_in = columns.int("tokens_in", i);
                    patch.tokens_out = columns.int("tokens_out", i);
                    patch.tokens_cached = columns.int("tokens_cached", i);
                    patch.cost_micro_usd = columns.int("cost_micro_usd", i);
                    patch.latency_us = columns.int("latency_us", i);
                    patch.ttft_us = columns.int("ttft_us", i);
                    patch.overhead_us = columns.int("overhead_us", i);
                    patch.completed_at = Some(at);
                }
                _ => {}
            }
        }
    }
    if !patch.trace_id.is_empty() {
        changes.traces.push(patch);
    }
    Ok(changes)
}

/// The archive's columns of one batch, by name.
struct Columns<'a>(&'a RecordBatch);

impl Columns<'_> {
    fn column(&self, name: &str) -> Option<&dyn Array> {
        self.0.column_by_name(name).map(|c| c.as_ref())
    }

    fn text(&self, name: &str, i: usize) -> Option<String> {
        let column = self.column(name)?.as_any().downcast_ref::<StringArray>()?;
        (!column.is_null(i)).then(|| column.value(i).to_owned())
    }

    fn int(&self, name: &str, i: usize) -> Option<i64> {
        let column = self.column(name)?;
        if column.is_null(i) {
            return None;
        }
        if let Some(ints) = column.as_any().downcast_ref::<Int64Array>() {
            return Some(ints.value(i));
        }
        column
            .as_any()
            .downcast_ref::<Int32Array>()
            .map(|ints| i64::from(ints.value(i)))
    }

    fn time(&self, name: &str, i: usize) -> Option<i64> {
        let column = self
            .column(name)?
            .as_any()
            .downcast_ref::<TimestampMicrosecondArray>()?;
        (!column.is_null(i)).then(|| column.value(i))
    }

    fn flag(&self, name: &str, i: usize) -> Option<bool> {
        let column = self.column(name)?.as_boolean_opt()?;
        (!column.is_null(i)).then(|| column.value(i))
    }
}

const LLM_CALL_COLUMNS: &str = "event_id, tenant_id, trace_id, attempt, deployment, provider, \
     model, status, http_status, error_class, CAST(CASE WHEN stream THEN 1 ELSE 0 END AS BIGINT), \
     started_at, latency_us, ttft_us, tokens_in, tokens_out, tokens_cached, cost_micro_usd, \
     CAST(CASE WHEN usage_estimated THEN 1 ELSE 0 END AS BIGINT), response_id, \
     tokens_cache_creation, cache_saved_micro_usd, dropped_fields";

fn llm_call(row: &AnyRow) -> Result<LlmCallRow, sqlx::Error> {
    Ok(LlmCallRow {
        event_id: row.try_get(0)?,
        tenant_id: row.try_get(1)?,
        trace_id: row.try_get(2)?,
        attempt: row.try_get(3)?,
        deployment: row.try_get(4)?,
        provider: row.try_get(5)?,
        model: row.try_get(6)?,
        status: row.try_get(7)?,
        http_status: row.try_get(8)?,
        error_class: row.try_get(9)?,
        stream: row.try_get::<i64, _>(10)? != 0,
        started_at: row.try_get(11)?,
        latency_us: row.try_get(12)?,
        ttft_us: row.try_get(13)?,
        tokens_in: row.try_get(14)?,
        tokens_out: row.try_get(15)?,
        tokens_cached: row.try_get(16)?,
        cost_micro_usd: row.try_get(17)?,
        usage_estimated: row.try_get::<i64, _>(18)? != 0,
        response_id: row.try_get(19)?,
        tokens_cache_creation: row.try_get(20)?,
        cache_saved_micro_usd: row.try_get(21)?,
        dropped_fields: row.try_get(22)?,
    })
}

const TOOL_CALL_COLUMNS: &str =
    "event_id, tenant_id, trace_id, direction, tool_call_id, name, occurred_at";

fn tool_call(row: &AnyRow) -> Result<ToolCallRow, sqlx::Error> {
    Ok(ToolCallRow {
        event_id: row.try_get(0)?,
        tenant_id: row.try_get(1)?,
        trace_id: row.try_get(2)?,
        direction: row.try_get(3)?,
        tool_call_id: row.try_get(4)?,
        name: row.try_get(5)?,
        occurred_at: row.try_get(6)?,
    })
}

fn decision(row: &AnyRow) -> Result<DecisionRow, sqlx::Error> {
    let kind: String = row.try_get(3)?;
    Ok(DecisionRow {
        event_id: row.try_get(0)?,
        tenant_id: row.try_get(1)?,
        trace_id: row.try_get(2)?,
        kind: match kind.as_str() {
            "routing" => "routing",
            "policy" => "policy",
            "quota_consumed" => "quota_consumed",
            "quota_denied" => "quota_denied",
            _ => "decision",
        },
        occurred_at: row.try_get(4)?,
        detail: row.try_get(5)?,
    })
}

fn body(row: &AnyRow) -> Result<BodyRow, sqlx::Error> {
    let field: String = row.try_get(1)?;
    Ok(BodyRow {
        event_id: row.try_get(0)?,
        field: match field.as_str() {
            "request" => "request",
            "llm_request" => "llm_request",
            "llm_response" => "llm_response",
            "tool_arguments" => "tool_arguments",
            "tool_result" => "tool_result",
            _ => "other",
        },
        tenant_id: row.try_get(2)?,
        trace_id: row.try_get(3)?,
        occurred_at: row.try_get(4)?,
        sealed: row.try_get(5)?,
    })
}

/// The timeline of `parts`, bodies opened with `opener`.
fn build(parts: Parts, source: &'static str, opener: Option<&Opener>) -> Timeline {
    let Parts {
        request,
        calls,
        tools,
        results,
        decisions,
        bodies,
    } = parts;
    let start = crate::analytics::parse_rfc3339(&request.started_at).unwrap_or_default();
    let mut opened: BTreeMap<(&str, &str), Value> = BTreeMap::new();
    if let Some(opener) = opener {
        for b in &bodies {
            if let Some(value) = opener.open(&b.event_id, b.field, &b.sealed) {
                opened.insert((b.event_id.as_str(), b.field), value);
            }
        }
    }
    let body_of = |event: &str, field: &str| opened.get(&(event, field)).cloned();
    let step = |kind, at: i64, duration_us: Option<i64>, detail: Value| Step {
        kind,
        at: rfc3339(at),
        offset_ms: (at - start) as f64 / 1e3,
        duration_ms: duration_us.map(|us| us as f64 / 1e3),
        detail,
    };
    let mut steps = Vec::new();
    let request_event = bodies
        .iter()
        .find(|b| b.field == "request")
        .map(|b| b.event_id.as_str());
    let mut detail = json!({
        "endpoint": request.endpoint,
        "model": request.model_requested,
        "stream": request.stream,
        "user": request.user,
        "project_id": request.project_id,
        "api_key_id": request.api_key_id,
    });
    if let Some(body) = request_event.and_then(|e| body_of(e, "request")) {
        detail["body"] = body;
    }
    steps.push(step("request", start, None, detail));
    for d in &decisions {
        let detail: Value = serde_json::from_str(&d.detail).unwrap_or(Value::Null);
        let duration = detail.get("latency_us").and_then(Value::as_i64);
        steps.push(step(d.kind, d.occurred_at, duration, detail));
    }
    for c in &calls {
        let mut detail = json!({
            "attempt": c.attempt,
            "deployment": c.deployment,
            "provider": c.provider,
            "model": c.model,
            "status": c.status,
            "http_status": c.http_status,
            "error_class": c.error_class,
            "stream": c.stream,
            "latency_ms": c.latency_us as f64 / 1e3,
            "ttft_ms": c.ttft_us.map(|us| us as f64 / 1e3),
            "tokens_in": c.tokens_in,
            "tokens_out": c.tokens_out,
            "tokens_cached": c.tokens_cached,
            "cost_usd": c.cost_micro_usd.map(|m| m as f64 / 1e6),
            "cost_micro_usd": c.cost_micro_usd,
            "cache_savings_micro_usd": c.cache_saved_micro_usd,
            "usage_estimated": c.usage_estimated,
            "response_id": c.response_id,
        });
        if let Some(body) = body_of(&c.event_id, "llm_request") {
            detail["request_body"] = body;
        }
        if let Some(body) = body_of(&c.event_id, "llm_response") {
            detail["response_body"] = body;
        }
        steps.push(step("attempt", c.started_at, Some(c.latency_us), detail));
    }
    for t in &tools {
        let mut detail = json!({
            "direction": t.direction,
            "tool_call_id": t.tool_call_id,
            "name": t.name,
        });
        if let Some(arguments) = body_of(&t.event_id, "tool_arguments") {
            detail["arguments"] = arguments;
        }
        if let Some(result) = body_of(&t.event_id, "tool_result") {
            detail["result"] = result;
        }
        let answered = results
            .iter()
            .find(|r| r.tool_call_id == t.tool_call_id && t.direction == "requested");
        let mut duration = None;
        if let Some(r) = answered {
            duration = Some(r.occurred_at - t.occurred_at);
            let mut answer = json!({
                "trace_id": r.trace_id,
                "at": rfc3339(r.occurred_at),
                "tool_latency_ms": (r.occurred_at - t.occurred_at) as f64 / 1e3,
            });
            if let Some(content) = body_of(&r.event_id, "tool_result") {
                answer["content"] = content;
            }
            detail["answered"] = answer;
        }
        steps.push(step("tool_call", t.occurred_at, duration, detail));
    }
    if request.status.is_some() {
        let latency = request.latency_ms.map(|ms| (ms * 1e3).round() as i64);
        let detail = json!({
            "status": request.status,
            "http_status": request.http_status,
            "error_class": request.error_class,
            "model": request.model,
            "provider": request.provider,
            "deployment": request.deployment,
            "attempts": request.attempts,
            "tokens_in": request.tokens_in,
            "tokens_out": request.tokens_out,
            "cost_usd": request.cost_usd,
            "latency_ms": request.latency_ms,
            "ttft_ms": request.ttft_ms,
        });
        let at = request
            .completed_at
            .as_deref()
            .and_then(crate::analytics::parse_rfc3339)
            .unwrap_or(start + latency.unwrap_or_default());
        steps.push(step("completed", at, latency, detail));
    }
    steps.sort_by(|a, b| {
        a.offset_ms
            .total_cmp(&b.offset_ms)
            .then_with(|| rank(a.kind).cmp(&rank(b.kind)))
    });
    Timeline {
        trace_id: request.trace_id.clone(),
        tenant_id: request.tenant_id.clone(),
        source,
        bodies: opener.is_some(),
        request,
        steps,
    }
}

/// The order of steps at the same instant.
fn rank(kind: &str) -> u8 {
    match kind {
        "request" => 0,
        "policy" => 1,
        "quota_denied" | "quota_consumed" => 2,
        "routing" => 3,
        "attempt" => 4,
        "tool_call" => 5,
        _ => 6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uuid_v7_trace_id_names_its_day() {
        let id = Uuid::now_v7().to_string();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap();
        let today = chrono::DateTime::from_timestamp(now.as_secs() as i64, 0)
            .unwrap()
            .format("%Y-%m-%d")
            .to_string();
        assert_eq!(days_of(&id).unwrap()[0], today);
        assert_eq!(days_of("my-own-id"), None);
        assert_eq!(days_of(&Uuid::new_v4().to_string()), None);
    }
}
