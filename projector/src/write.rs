//! Applying a batch's [`Changes`] in one transaction, positions included: after a crash the
//! store holds either all of a batch or none of it. Each table's rows go in as one statement
//! whose one parameter is the rows as a JSON array, which the database unpacks itself
//! (Postgres `json_to_recordset`, SQLite `json_each`): the statement's text is the same for
//! every batch (prepared once per connection), and nothing is bound value by value. Every
//! statement is idempotent (keyed inserts, merges, once-only rollup increments), so a record the
//! log delivers twice changes nothing the second time.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt::Write as _;

use serde::ser::{SerializeMap, SerializeSeq, Serializer};
use sqlx::{AnyConnection, AssertSqlSafe, Row};

use crate::fold::{Changes, ControlChange, name_of};
use crate::store::StoreError;

/// A value of a row, borrowed from the changes where it can be.
pub(crate) enum Value<'a> {
    Text(Option<Cow<'a, str>>),
    Int(Option<i64>),
    Bool(Option<bool>),
    Blob(Option<&'a [u8]>),
}

impl<'a> From<&'a String> for Value<'a> {
    fn from(v: &'a String) -> Self {
        Value::Text(Some(Cow::Borrowed(v)))
    }
}
impl<'a> From<&'a Option<String>> for Value<'a> {
    fn from(v: &'a Option<String>) -> Self {
        Value::Text(v.as_deref().map(Cow::Borrowed))
    }
}
impl<'a> From<&'a str> for Value<'a> {
    fn from(v: &'a str) -> Self {
        Value::Text(Some(Cow::Borrowed(v)))
    }
}
impl<'a> From<&&'a str> for Value<'a> {
    fn from(v: &&'a str) -> Self {
        Value::Text(Some(Cow::Borrowed(*v)))
    }
}
impl From<String> for Value<'_> {
    fn from(v: String) -> Self {
        Value::Text(Some(Cow::Owned(v)))
    }
}
impl From<Option<String>> for Value<'_> {
    fn from(v: Option<String>) -> Self {
        Value::Text(v.map(Cow::Owned))
    }
}
impl From<i64> for Value<'_> {
    fn from(v: i64) -> Self {
        Value::Int(Some(v))
    }
}
impl From<&i64> for Value<'_> {
    fn from(v: &i64) -> Self {
        Value::Int(Some(*v))
    }
}
impl From<Option<i64>> for Value<'_> {
    fn from(v: Option<i64>) -> Self {
        Value::Int(v)
    }
}
impl From<&Option<i64>> for Value<'_> {
    fn from(v: &Option<i64>) -> Self {
        Value::Int(*v)
    }
}
impl From<&bool> for Value<'_> {
    fn from(v: &bool) -> Self {
        Value::Bool(Some(*v))
    }
}
impl From<&Option<bool>> for Value<'_> {
    fn from(v: &Option<bool>) -> Self {
        Value::Bool(*v)
    }
}
impl<'a> From<&'a Vec<u8>> for Value<'a> {
    fn from(v: &'a Vec<u8>) -> Self {
        Value::Blob(Some(v))
    }
}
impl<'a> From<&'a [u8]> for Value<'a> {
    fn from(v: &'a [u8]) -> Self {
        Value::Blob(Some(v))
    }
}

/// Rows for one table: its columns and, row by row, the values written to them.
pub(crate) struct Rows<'a> {
    pub(crate) columns: &'static [&'static str],
    pub(crate) values: Vec<Vec<Value<'a>>>,
}

/// Declares [`Rows`] with each column named next to the value written to it, so that the two
/// cannot drift apart. `rows!(items, |item| { column: value, other, … })` makes a row per item
/// (`other` alone stands for `&item.other`); `rows!({ column: value, … })` a single row.
macro_rules! rows {
    (@value $field:expr) => { &$field };
    (@value $field:expr, $value:expr) => { $value };
    ({ $($column:ident: $value:expr),* $(,)? }) => {
        Rows {
            columns: &[$(stringify!($column)),*],
            values: vec![vec![$(Value::from($value)),*]],
        }
    };
    ($items:expr, |$item:ident| { $($column:ident $(: $value:expr)?),* $(,)? }) => {
        Rows {
            columns: &[$(stringify!($column)),*],
            values: $items
                .iter()
                .map(|$item| vec![$(Value::from(rows!(@value $item.$column $(, $value)?))),*])
                .collect(),
        }
    };
}

/// Whether the connection is SQLite's (else Postgres).
pub(crate) fn is_sqlite(conn: &AnyConnection) -> bool {
    conn.backend_name() == "SQLite"
}

/// The SQL type a column's values have.
#[derive(Clone, Copy)]
pub(crate) enum Kind {
    Text,
    Int,
    Bool,
    Blob,
}

impl Value<'_> {
    fn kind(&self) -> Kind {
        match self {
            Value::Text(_) => Kind::Text,
            Value::Int(_) => Kind::Int,
            Value::Bool(_) => Kind::Bool,
            Value::Blob(_) => Kind::Blob,
        }
    }
}

/// `SELECT column, … FROM <the rows in $1>`: a query of the JSON array of objects bound as `$1`,
/// one typed column per key.
pub(crate) fn from_json(sqlite: bool, columns: &[(&str, Kind)]) -> String {
    let mut sql = String::from("SELECT ");
    if sqlite {
        for (i, (column, kind)) in columns.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = match kind {
                Kind::Blob => write!(sql, "{sep}unhex(value ->> '$.{column}') AS {column}"),
                _ => write!(sql, "{sep}value ->> '$.{column}' AS {column}"),
            };
        }
        // `jsonb_each`: each row is handed to `->>` as JSONB, not re-parsed from text per column.
        sql.push_str(" FROM jsonb_each($1)");
    } else {
        let names: Vec<&str> = columns.iter().map(|(column, _)| *column).collect();
        let _ = write!(
            sql,
            "{} FROM json_to_recordset(CAST($1 AS json)) AS r(",
            names.join(", ")
        );
        for (i, (column, kind)) in columns.iter().enumerate() {
            let sql_type = match kind {
                Kind::Text => "text",
                Kind::Int => "bigint",
                Kind::Bool => "boolean",
                Kind::Blob => "bytea",
            };
            let _ = write!(sql, "{}{column} {sql_type}", if i == 0 { "" } else { ", " });
        }
        sql.push(')');
    }
    sql
}

/// The rows as a JSON array of objects. Blobs are hex (prefixed `\x` for Postgres' bytea input).
pub(crate) fn to_json(sqlite: bool, rows: &Rows<'_>) -> Result<String, sqlx::Error> {
    serde_json::to_string(&JsonRows { sqlite, rows })
        .map_err(|error| sqlx::Error::Encode(Box::new(error)))
}

struct JsonRows<'r, 'a> {
    sqlite: bool,
    rows: &'r Rows<'a>,
}

impl serde::Serialize for JsonRows<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut array = serializer.serialize_seq(Some(self.rows.values.len()))?;
        for row in &self.rows.values {
            array.serialize_element(&JsonRow {
                sqlite: self.sqlite,
                columns: self.rows.columns,
                row,
            })?;
        }
        array.end()
    }
}

struct JsonRow<'r, 'a> {
    sqlite: bool,
    columns: &'static [&'static str],
    row: &'r [Value<'a>],
}

impl serde::Serialize for JsonRow<'_, '_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.columns.len()))?;
        for (column, value) in self.columns.iter().zip(self.row) {
            match value {
                Value::Text(v) => map.serialize_entry(column, v)?,
                Value::Int(v) => map.serialize_entry(column, v)?,
                Value::Bool(v) => map.serialize_entry(column, v)?,
                Value::Blob(None) => map.serialize_entry(column, &None::<&str>)?,
                Value::Blob(Some(bytes)) => {
                    let hex = hex::encode(bytes);
                    if self.sqlite {
                        map.serialize_entry(column, &hex)?;
                    } else {
                        map.serialize_entry(column, &format!("\\x{hex}"))?;
                    }
                }
            }
        }
        map.end()
    }
}

/// `INSERT INTO table (columns) SELECT … tail`: every row in one statement.
pub(crate) async fn insert(
    conn: &mut AnyConnection,
    table: &str,
    rows: Rows<'_>,
    tail: &str,
) -> Result<(), sqlx::Error> {
    let Some(first) = rows.values.first() else {
        return Ok(());
    };
    let sqlite = is_sqlite(conn);
    let columns: Vec<(&str, Kind)> = rows
        .columns
        .iter()
        .zip(first)
        .map(|(column, value)| (*column, value.kind()))
        .collect();
    // `WHERE true` keeps SQLite from reading an upsert's ON as a join's.
    let sql = format!(
        "INSERT INTO {table} ({}) {} WHERE true {tail}",
        rows.columns.join(", "),
        from_json(sqlite, &columns)
    );
    sqlx::query(AssertSqlSafe(sql))
        .bind(to_json(sqlite, &rows)?)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Runs one statement with its `$n` parameters.
async fn execute(
    conn: &mut AnyConnection,
    sql: &'static str,
    values: Vec<Value<'_>>,
) -> Result<(), sqlx::Error> {
    let mut query = sqlx::query(sql);
    for value in values {
        query = match value {
            Value::Text(v) => query.bind(v.map(Cow::into_owned)),
            Value::Int(v) => query.bind(v),
            Value::Bool(v) => query.bind(v),
            Value::Blob(v) => query.bind(v.map(<[u8]>::to_vec)),
        };
    }
    query.execute(&mut *conn).await?;
    Ok(())
}

/// The keys of traces, as a JSON array of objects for [`from_json`].
fn trace_keys<'a>(keys: impl Iterator<Item = (&'a str, &'a str)>) -> Rows<'a> {
    Rows {
        columns: &["tenant_id", "trace_id"],
        values: keys
            .map(|(tenant, trace)| vec![Value::from(tenant), Value::from(trace)])
            .collect(),
    }
}

const TRACE_KEY_COLUMNS: [(&str, Kind); 2] = [("tenant_id", Kind::Text), ("trace_id", Kind::Text)];

/// The traces' key: a patch merges into the row of its key, column by column.
const TRACE_KEY: [&str; 3] = ["tenant_id", "trace_id", "started_at"];

/// Latency buckets of the usage rollups: column and upper bound (µs, inclusive). Counts are
/// cumulative, as in a Prometheus histogram.
pub const LATENCY_BUCKETS: [(&str, i64); 12] = [
    ("latency_le_10ms", 10_000),
    ("latency_le_25ms", 25_000),
    ("latency_le_50ms", 50_000),
    ("latency_le_100ms", 100_000),
    ("latency_le_250ms", 250_000),
    ("latency_le_500ms", 500_000),
    ("latency_le_1s", 1_000_000),
    ("latency_le_2500ms", 2_500_000),
    ("latency_le_5s", 5_000_000),
    ("latency_le_10s", 10_000_000),
    ("latency_le_30s", 30_000_000),
    ("latency_le_60s", 60_000_000),
];

/// Gives every trace patch its start (part of the trace's key, and what Postgres partitions
/// traces on): from its `request.received`, else from the row an earlier batch made, else the
/// time of the trace's first event here. Run before [`apply`].
pub async fn resolve_starts(
    conn: &mut AnyConnection,
    changes: &mut Changes,
) -> Result<(), sqlx::Error> {
    let missing: Vec<usize> = (0..changes.traces.len())
        .filter(|&i| changes.traces[i].started_at.is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let keys = trace_keys(missing.iter().map(|&i| {
        let trace = &changes.traces[i];
        (trace.tenant_id.as_str(), trace.trace_id.as_str())
    }));
    let sqlite = is_sqlite(conn);
    // A join with the keys (not a row-value IN, which SQLite answers with a full scan).
    let sql = format!(
        "WITH k AS ({}) SELECT t.tenant_id, t.trace_id, t.started_at FROM k \
         JOIN traces t ON t.tenant_id = k.tenant_id AND t.trace_id = k.trace_id",
        from_json(sqlite, &TRACE_KEY_COLUMNS)
    );
    let mut known = std::collections::HashMap::new();
    for row in sqlx::query(AssertSqlSafe(sql))
        .bind(to_json(sqlite, &keys)?)
        .fetch_all(&mut *conn)
        .await?
    {
        let key: (String, String) = (row.try_get(0)?, row.try_get(1)?);
        known.insert(key, row.try_get::<i64, _>(2)?);
    }
    drop(keys);
    for i in missing {
        let trace = &mut changes.traces[i];
        let key = (
            std::mem::take(&mut trace.tenant_id),
            std::mem::take(&mut trace.trace_id),
        );
        trace.started_at = Some(known.get(&key).copied().unwrap_or(trace.first_at));
        (trace.tenant_id, trace.trace_id) = key;
    }
    Ok(())
}

/// Refuses `changes` unless the stored positions have reached where the batch starts in each
/// partition it read. Positions are stored with the rows, so a batch whose start lies beyond
/// them would leave a hole: the batches between were lost (a database crash took commits it had
/// acknowledged: the projector's sessions commit asynchronously) or never stored. The member
/// must then read again from the stored positions. A start behind them is a batch stored
/// before (a retry whose first commit went through): its changes are idempotent. Inside the
/// caller's transaction; on Postgres the position rows stay locked until it ends.
pub async fn check_start(conn: &mut AnyConnection, changes: &Changes) -> Result<(), StoreError> {
    let lock = if is_sqlite(conn) { "" } else { " FOR UPDATE" };
    let topics: HashSet<&str> = changes.starts.keys().map(|(topic, _)| *topic).collect();
    for topic in topics {
        let sql = format!("SELECT partition, next_offset FROM positions WHERE topic = $1{lock}");
        for row in sqlx::query(AssertSqlSafe(sql))
            .bind(topic)
            .fetch_all(&mut *conn)
            .await?
        {
            let partition = u32::try_from(row.try_get::<i64, _>(0)?).unwrap_or(u32::MAX);
            let stored = u64::try_from(row.try_get::<i64, _>(1)?).unwrap_or(0);
            match changes.starts.get(&(topic, partition)) {
                Some(&start) if start > stored => {
                    return Err(StoreError::Behind {
                        topic,
                        partition,
                        stored,
                        start,
                    });
                }
                _ => {}
            }
        }
    }
    Ok(())
}

/// Applies `changes` on `conn`, inside the caller's transaction.
pub async fn apply(conn: &mut AnyConnection, changes: &Changes) -> Result<(), sqlx::Error> {
    for change in &changes.control {
        apply_control(conn, change).await?;
    }
    // An erased tenant's events still on the log (or arriving late) leave nothing behind.
    let erased = erased_tenants(conn, changes).await?;
    let kept;
    let changes = match erased.is_empty() {
        true => changes,
        false => {
            kept = changes.without_tenants(&erased);
            &kept
        }
    };

    let traces = rows!(changes.traces, |t| {
        tenant_id,
        trace_id,
        started_at: t.started_at.unwrap_or(t.first_at),
        project_id,
        user_id,
        api_key_id,
        endpoint,
        stream,
        model_requested,
        tier,
        model_served,
        provider,
        deployment,
        status,
        http_status,
        error_class,
        latency_us,
        ttft_us,
        overhead_us,
        tokens_in,
        tokens_out,
        tokens_cached,
        cost_micro_usd,
        policy_action,
        policy_findings,
        attempts,
        completed_at,
    });
    let merge: Vec<String> = traces
        .columns
        .iter()
        .filter(|c| !TRACE_KEY.contains(c))
        .map(|c| format!("{c} = COALESCE(excluded.{c}, traces.{c})"))
        .collect();
    let tail = format!(
        "ON CONFLICT ({}) DO UPDATE SET {}",
        TRACE_KEY.join(", "),
        merge.join(", ")
    );
    insert(conn, "traces", traces, &tail).await?;

    let llm_calls = rows!(changes.llm_calls, |c| {
        event_id,
        tenant_id,
        trace_id,
        attempt,
        deployment,
        provider,
        model,
        status,
        http_status,
        error_class,
        stream,
        started_at,
        latency_us,
        ttft_us,
        tokens_in,
        tokens_out,
        tokens_cached,
        cost_micro_usd,
        usage_estimated,
        response_id,
        tokens_cache_creation,
        cache_saved_micro_usd,
        dropped_fields,
    });
    insert(conn, "llm_calls", llm_calls, "ON CONFLICT DO NOTHING").await?;

    let tool_calls = rows!(changes.tool_calls, |t| {
        event_id,
        tenant_id,
        trace_id,
        direction,
        tool_call_id,
        name,
        occurred_at,
    });
    insert(conn, "tool_calls", tool_calls, "ON CONFLICT DO NOTHING").await?;

    let decisions = rows!(changes.decisions, |d| {
        event_id,
        tenant_id,
        trace_id,
        kind,
        occurred_at,
        detail,
    });
    insert(conn, "trace_decisions", decisions, "ON CONFLICT DO NOTHING").await?;

    let bodies = rows!(changes.bodies, |b| {
        event_id,
        field,
        tenant_id,
        trace_id,
        occurred_at,
        sealed,
    });
    insert(conn, "trace_bodies", bodies, "ON CONFLICT DO NOTHING").await?;

    count_completions(conn, &changes.completions).await?;

    for d in &changes.dead_letters {
        metrics::counter!("loom_projector_dead_letters_total", "topic" => d.topic).increment(1);
        tracing::warn!(
            topic = d.topic,
            partition = d.partition,
            offset = d.offset,
            reason = %d.reason,
            "a record could not be folded; it is in dead_letters"
        );
    }
    let dead_letters = rows!(changes.dead_letters, |d| {
        topic: d.topic,
        partition: i64::from(d.partition),
        log_offset: i64::try_from(d.offset).unwrap_or(i64::MAX),
        event_id,
        event_type,
        reason,
        record,
        recorded_at,
    });
    insert(conn, "dead_letters", dead_letters, "ON CONFLICT DO NOTHING").await?;

    let positions = rows!(changes.positions, |position| {
        topic: position.0.0,
        partition: i64::from(position.0.1),
        next_offset: i64::try_from(*position.1).unwrap_or(i64::MAX),
    });
    insert(
        conn,
        "positions",
        positions,
        "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
    )
    .await
}

/// Adds newly completed requests to the hourly and daily rollups, each exactly once: only the
/// completions `rollup_applied` did not know yet are counted, from their (already updated) trace
/// rows.
async fn count_completions(
    conn: &mut AnyConnection,
    completions: &[crate::fold::Completion],
) -> Result<(), sqlx::Error> {
    if completions.is_empty() {
        return Ok(());
    }
    let sqlite = is_sqlite(conn);
    let ids = rows!(completions, |c| { event_id });
    let sql = format!(
        "INSERT INTO rollup_applied (event_id) {} WHERE true ON CONFLICT DO NOTHING RETURNING event_id",
        from_json(sqlite, &[("event_id", Kind::Text)])
    );
    let applied: std::collections::HashSet<String> = sqlx::query(AssertSqlSafe(sql))
        .bind(to_json(sqlite, &ids)?)
        .fetch_all(&mut *conn)
        .await?
        .iter()
        .map(|row| row.try_get(0))
        .collect::<Result<_, _>>()?;
    // A completion delivered twice in one batch (a spooled copy and its original) is in
    // `applied` once, and counted once.
    let mut counted = std::collections::HashSet::new();
    let fresh = trace_keys(
        completions
            .iter()
            .filter(|c| applied.contains(&c.event_id) && counted.insert(c.event_id.as_str()))
            .map(|c| (c.tenant_id.as_str(), c.trace_id.as_str())),
    );
    if fresh.values.is_empty() {
        return Ok(());
    }
    let keys = to_json(sqlite, &fresh)?;
    for (table, bucket_us) in [
        ("usage_hourly", 3_600_000_000_i64),
        ("usage_daily", 86_400_000_000),
    ] {
        sqlx::query(AssertSqlSafe(rollup_sql(sqlite, table, bucket_us)))
            .bind(keys.as_str())
            .execute(&mut *conn)
            .await?;
    }
    let keys_sql = from_json(sqlite, &TRACE_KEY_COLUMNS);
    crate::rollups::add(conn, &keys_sql, Some(&keys)).await
}

fn rollup_sql(sqlite: bool, table: &str, bucket_us: i64) -> String {
    let sums = [
        ("requests", "COUNT(*)".to_owned()),
        (
            "errors",
            "SUM(CASE WHEN status = 'ok' THEN 0 ELSE 1 END)".to_owned(),
        ),
        ("tokens_in", "SUM(COALESCE(tokens_in, 0))".to_owned()),
        ("tokens_out", "SUM(COALESCE(tokens_out, 0))".to_owned()),
        (
            "tokens_cached",
            "SUM(COALESCE(tokens_cached, 0))".to_owned(),
        ),
        (
            "cost_micro_usd",
            "SUM(COALESCE(cost_micro_usd, 0))".to_owned(),
        ),
        ("latency_sum_us", "SUM(COALESCE(latency_us, 0))".to_owned()),
    ]
    .into_iter()
    .chain(LATENCY_BUCKETS.iter().map(|(column, le)| {
        (
            *column,
            format!("SUM(CASE WHEN latency_us <= {le} THEN 1 ELSE 0 END)"),
        )
    }))
    .chain([("latency_le_inf", "COUNT(*)".to_owned())]);
    let (columns, expressions): (Vec<&str>, Vec<String>) = sums.unzip();
    let increments: Vec<String> = columns
        .iter()
        .map(|c| format!("{c} = {table}.{c} + excluded.{c}"))
        .collect();
    // The keys are joined (an index lookup per trace on both databases); `WHERE true` keeps
    // SQLite from reading the upsert's ON as the join's.
    format!(
        "WITH k AS ({keys}) \
         INSERT INTO {table} (tenant_id, project_id, user_id, model, bucket_start, {columns}) \
         SELECT t.tenant_id, COALESCE(t.project_id, ''), COALESCE(t.user_id, ''), \
                COALESCE(t.model_served, t.model_requested, ''), \
                (t.started_at / {bucket_us}) * {bucket_us}, {expressions} \
         FROM k JOIN traces t ON t.tenant_id = k.tenant_id AND t.trace_id = k.trace_id \
         WHERE true \
         GROUP BY 1, 2, 3, 4, 5 \
         ON CONFLICT (tenant_id, project_id, user_id, model, bucket_start) DO UPDATE SET {increments}",
        columns = columns.join(", "),
        expressions = expressions.join(", "),
        keys = from_json(sqlite, &TRACE_KEY_COLUMNS),
        increments = increments.join(", "),
    )
}

/// What erasing a tenant deletes: every row of it but its `tenants` row.
const ERASE: [&str; 12] = [
    "DELETE FROM trace_bodies WHERE tenant_id = $1",
    "DELETE FROM tool_calls WHERE tenant_id = $1",
    "DELETE FROM trace_decisions WHERE tenant_id = $1",
    "DELETE FROM llm_calls WHERE tenant_id = $1",
    "DELETE FROM traces WHERE tenant_id = $1",
    "DELETE FROM usage_hourly WHERE tenant_id = $1",
    "DELETE FROM usage_daily WHERE tenant_id = $1",
    "DELETE FROM rollups WHERE tenant_id = $1",
    "DELETE FROM quota_limits WHERE tenant_id = $1",
    "DELETE FROM role_bindings WHERE tenant_id = $1",
    "DELETE FROM api_keys WHERE tenant_id = $1",
    "DELETE FROM projects WHERE tenant_id = $1",
];

/// The erased tenants among those `changes` write rows of. On Postgres their `tenants` rows are
/// locked until the transaction ends, so an erasure committed meanwhile (which deletes the rows
/// this transaction writes) waits for it, or is seen by it.
async fn erased_tenants(
    conn: &mut AnyConnection,
    changes: &Changes,
) -> Result<HashSet<String>, sqlx::Error> {
    let tenants = changes.data_tenants();
    if tenants.is_empty() {
        return Ok(HashSet::new());
    }
    let sql = if is_sqlite(conn) {
        "SELECT tenant_id, erased_at FROM tenants \
         WHERE tenant_id IN (SELECT value FROM json_each($1))"
    } else {
        "SELECT tenant_id, erased_at FROM tenants \
         WHERE tenant_id IN (SELECT json_array_elements_text($1::json)) FOR SHARE"
    };
    let list =
        serde_json::to_string(&tenants).map_err(|error| sqlx::Error::Encode(Box::new(error)))?;
    let rows = sqlx::query(sql).bind(list).fetch_all(&mut *conn).await?;
    let mut erased = HashSet::new();
    for row in rows {
        if row.try_get::<Option<i64>, _>(1)?.is_some() {
            erased.insert(row.try_get::<String, _>(0)?);
        }
    }
    Ok(erased)
}

async fn apply_control(
    conn: &mut AnyConnection,
    change: &ControlChange,
) -> Result<(), sqlx::Error> {
    let id = |id: &uuid::Uuid| id.to_string();
    let optional_id = |id: &Option<uuid::Uuid>| id.map(|id| id.to_string());
    // The rules (`loom_schemas::control`) already refused what may not be done: these statements
    // only write what they accepted (and are idempotent, for records the log delivers twice).
    match change {
        ControlChange::TenantCreated {
            tenant_id,
            name,
            at,
        } => {
            let row = rows!({ tenant_id: id(tenant_id), name: name, created_at: at });
            insert(conn, "tenants", row, "ON CONFLICT DO NOTHING").await
        }
        ControlChange::TenantErased { tenant_id, at } => {
            let sql =
                "UPDATE tenants SET erased_at = $2 WHERE tenant_id = $1 AND erased_at IS NULL";
            execute(conn, sql, vec![id(tenant_id).into(), at.into()]).await?;
            // The row saying the tenant existed and was erased stays; everything else goes.
            for sql in ERASE {
                execute(conn, sql, vec![id(tenant_id).into()]).await?;
            }
            Ok(())
        }
        ControlChange::ProjectCreated {
            project_id,
            tenant_id,
            name,
            routing_policy,
            security_policy,
            feature_flags,
            at,
        } => {
            let row = rows!({
                project_id: id(project_id),
                tenant_id: id(tenant_id),
                name: name,
                routing_policy: routing_policy,
                security_policy: security_policy,
                feature_flags: feature_flags,
                version: 1_i64,
                created_at: at,
                updated_at: at,
            });
            insert(conn, "projects", row, "ON CONFLICT DO NOTHING").await
        }
        ControlChange::ProjectUpdated {
            project_id,
            name,
            routing_policy,
            security_policy,
            feature_flags,
            version,
            at,
        } => {
            let sql = "UPDATE projects SET name = COALESCE($2, name), \
                       routing_policy = COALESCE($3, routing_policy), \
                       security_policy = COALESCE($4, security_policy), \
                       feature_flags = COALESCE($5, feature_flags), version = $6, updated_at = $7 \
                       WHERE project_id = $1";
            let values = vec![
                id(project_id).into(),
                name.into(),
                routing_policy.into(),
                security_policy.into(),
                feature_flags.into(),
                version.into(),
                at.into(),
            ];
            execute(conn, sql, values).await
        }
        ControlChange::KeyIssued { key, key_hash, at } => {
            let row = rows!({
                key_id: id(&key.key_id),
                tenant_id: id(&key.tenant_id),
                project_id: optional_id(&key.project_id),
                name: &key.name,
                key_hash: &key_hash[..],
                prefix: &key.prefix,
                roles: key.roles.join(","),
                owner: &key.owner,
                expires_at: key.expires_at,
                issued_at: at,
            });
            insert(conn, "api_keys", row, "ON CONFLICT DO NOTHING").await
        }
        ControlChange::KeyRevoked {
            key_id,
            tenant_id,
            reason,
            at,
        } => {
            let sql = "UPDATE api_keys SET revoked_at = $3, revoke_reason = $4 \
                       WHERE key_id = $1 AND tenant_id = $2 AND revoked_at IS NULL";
            let values = vec![
                id(key_id).into(),
                id(tenant_id).into(),
                at.into(),
                reason.into(),
            ];
            execute(conn, sql, values).await
        }
        ControlChange::QuotaLimitSet {
            tenant_id,
            scope,
            scope_id,
            metric,
            window,
            limit,
            at,
        } => {
            let row = rows!({
                tenant_id: id(tenant_id),
                scope: name_of(&scope),
                scope_id: scope_id,
                metric: name_of(&metric),
                quota_window: name_of(&window),
                limit_value: limit,
                set_at: at,
            });
            let tail = "ON CONFLICT (tenant_id, scope, scope_id, metric, quota_window) \
                        DO UPDATE SET limit_value = excluded.limit_value, set_at = excluded.set_at";
            insert(conn, "quota_limits", row, tail).await
        }
        ControlChange::RoleGranted {
            tenant_id,
            principal,
            role,
            project_id,
            at,
        } => {
            let row = rows!({
                tenant_id: id(tenant_id),
                principal: principal,
                role: role,
                project_id: optional_id(project_id).unwrap_or_default(),
                granted_at: at,
            });
            insert(conn, "role_bindings", row, "ON CONFLICT DO NOTHING").await
        }
        ControlChange::RoleRevoked {
            tenant_id,
            principal,
            role,
            project_id,
        } => {
            let sql = "DELETE FROM role_bindings WHERE tenant_id = $1 AND principal = $2 \
                       AND role = $3 AND project_id = $4";
            let values = vec![
                id(tenant_id).into(),
                principal.into(),
                role.into(),
                optional_id(project_id).unwrap_or_default().into(),
            ];
            execute(conn, sql, values).await
        }
        ControlChange::Anchored { .. }
        | ControlChange::KeyRotated { .. }
        | ControlChange::CredentialSet { .. }
        | ControlChange::UserRegistered { .. }
        | ControlChange::Session => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_go_to_the_database_as_json_with_hex_blobs() {
        let blob = vec![0xab_u8, 0x01];
        let rows = Rows {
            columns: &["name", "n", "b", "bytes"],
            values: vec![vec![
                Value::from("a\"b"),
                Value::from(None::<i64>),
                Value::from(&Some(true)),
                Value::from(&blob),
            ]],
        };
        assert_eq!(
            to_json(false, &rows).unwrap(),
            r#"[{"name":"a\"b","n":null,"b":true,"bytes":"\\xab01"}]"#
        );
        assert_eq!(
            to_json(true, &rows).unwrap(),
            r#"[{"name":"a\"b","n":null,"b":true,"bytes":"ab01"}]"#
        );
    }
}
