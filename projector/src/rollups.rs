//! The analytics rollups: what analytics need of completed requests, per UTC hour and day, of all
//! of a tenant's requests and per value of each dimension analytics filter and break down by.
//!
//! A batch's completions are added up here (a few hundred rows however many requests), then
//! merged with the rows already stored and written back: read, add, write, in the batch's
//! transaction. On Postgres the tenants' rows are locked for it first, so that two projectors
//! (during a rebalance) never add to the same row at once.

use std::collections::{BTreeMap, BTreeSet};

use sqlx::{AnyConnection, AssertSqlSafe, Row};

use crate::buckets::BOUND_US;
use crate::write::{Kind, Rows, Value, from_json, insert, is_sqlite, to_json};

/// The dimensions rollups are kept by, with their value in a trace row `t` ('' when unset);
/// the dimension '' holds all of a tenant's requests.
pub const DIMENSIONS: [(&str, &str); 10] = [
    ("", "''"),
    ("project", "COALESCE(t.project_id, '')"),
    ("user", "COALESCE(t.user_id, '')"),
    ("key", "COALESCE(t.api_key_id, '')"),
    ("model", "COALESCE(t.model_served, t.model_requested, '')"),
    ("provider", "COALESCE(t.provider, '')"),
    ("deployment", "COALESCE(t.deployment, '')"),
    ("status", "COALESCE(t.status, '')"),
    ("error_class", "COALESCE(t.error_class, '')"),
    ("tier", "COALESCE(t.tier, '')"),
];

/// How long the rollups' buckets are: an hour and a day (µs).
pub const SPANS_US: [i64; 2] = [3_600_000_000, 86_400_000_000];

/// A rollup row's key: tenant, dimension, span, bucket start, value.
type Key = (String, &'static str, i64, i64, String);

/// Counts per latency bucket ([`crate::buckets`]), as stored: a JSON array of `[bucket, count]`.
pub type Histogram = BTreeMap<i64, i64>;

/// The bucket of a latency in µs.
pub fn bucket_of(us: i64) -> i64 {
    BOUND_US.partition_point(|bound| *bound < us) as i64
}

/// Reads a stored histogram; an unreadable one counts as empty.
pub fn parse_histogram(text: &str) -> Histogram {
    serde_json::from_str::<Vec<(i64, i64)>>(text)
        .map(|pairs| pairs.into_iter().collect())
        .unwrap_or_default()
}

fn histogram_text(histogram: &Histogram) -> String {
    let pairs: Vec<(i64, i64)> = histogram.iter().map(|(b, c)| (*b, *c)).collect();
    serde_json::to_string(&pairs).unwrap_or_else(|_| "[]".into())
}

/// The sums of a rollup row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub requests: i64,
    pub errors: i64,
    pub tokens_in: i64,
    pub tokens_out: i64,
    pub tokens_cached: i64,
    pub cost_micro_usd: i64,
    pub latency_sum_us: i64,
    pub cache_saved_micro_usd: i64,
    pub tool_calls: i64,
    pub latency_min_us: Option<i64>,
    pub latency_max_us: Option<i64>,
    pub ttft_min_us: Option<i64>,
    pub ttft_max_us: Option<i64>,
    pub latency: Histogram,
    pub ttft: Histogram,
}

impl Totals {
    pub fn merge(&mut self, other: &Totals) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.tokens_in += other.tokens_in;
        self.tokens_out += other.tokens_out;
        self.tokens_cached += other.tokens_cached;
        self.cost_micro_usd += other.cost_micro_usd;
        self.latency_sum_us += other.latency_sum_us;
        self.cache_saved_micro_usd += other.cache_saved_micro_usd;
        self.tool_calls += other.tool_calls;
        let min = |a: Option<i64>, b: Option<i64>| a.into_iter().chain(b).min();
        let max = |a: Option<i64>, b: Option<i64>| a.into_iter().chain(b).max();
        self.latency_min_us = min(self.latency_min_us, other.latency_min_us);
        self.latency_max_us = max(self.latency_max_us, other.latency_max_us);
        self.ttft_min_us = min(self.ttft_min_us, other.ttft_min_us);
        self.ttft_max_us = max(self.ttft_max_us, other.ttft_max_us);
        for (bucket, count) in &other.latency {
            *self.latency.entry(*bucket).or_default() += count;
        }
        for (bucket, count) in &other.ttft {
            *self.ttft.entry(*bucket).or_default() += count;
        }
    }

    /// Reads the columns [`TOTALS_COLUMNS`] names, from `first` on.
    pub fn from_row(row: &sqlx::any::AnyRow, first: usize) -> Result<Totals, sqlx::Error> {
        let int = |i: usize| row.try_get::<i64, _>(first + i);
        let maybe = |i: usize| row.try_get::<Option<i64>, _>(first + i);
        let text = |i: usize| row.try_get::<String, _>(first + i);
        Ok(Totals {
            requests: int(0)?,
            errors: int(1)?,
            tokens_in: int(2)?,
            tokens_out: int(3)?,
            tokens_cached: int(4)?,
            cost_micro_usd: int(5)?,
            latency_sum_us: int(6)?,
            cache_saved_micro_usd: int(7)?,
            tool_calls: int(8)?,
            latency_min_us: maybe(9)?,
            latency_max_us: maybe(10)?,
            ttft_min_us: maybe(11)?,
            ttft_max_us: maybe(12)?,
            latency: parse_histogram(&text(13)?),
            ttft: parse_histogram(&text(14)?),
        })
    }
}

/// The columns of a rollup row past its key, in the order [`Totals::from_row`] reads them.
pub const TOTALS_COLUMNS: &str = "requests, errors, tokens_in, tokens_out, tokens_cached, \
     cost_micro_usd, latency_sum_us, cache_saved_micro_usd, tool_calls, latency_min_us, \
     latency_max_us, ttft_min_us, ttft_max_us, latency_histogram, ttft_histogram";

/// Adds the completed traces whose keys `keys_sql` selects (with `$1` bound to `bound` if given)
/// to the rollups.
pub(crate) async fn add(
    conn: &mut AnyConnection,
    keys_sql: &str,
    bound: Option<&str>,
) -> Result<(), sqlx::Error> {
    let values: Vec<&str> = DIMENSIONS.iter().map(|(_, value)| *value).collect();
    let sql = format!(
        "WITH k AS ({keys_sql}) \
         SELECT t.tenant_id, t.started_at, {values}, t.status, t.tokens_in, t.tokens_out, \
                t.tokens_cached, t.cost_micro_usd, t.latency_us, t.ttft_us, \
                (SELECT CAST(SUM(c.cache_saved_micro_usd) AS BIGINT) FROM llm_calls c \
                 WHERE c.tenant_id = t.tenant_id AND c.trace_id = t.trace_id), \
                (SELECT COUNT(*) FROM tool_calls c \
                 WHERE c.tenant_id = t.tenant_id AND c.trace_id = t.trace_id \
                 AND c.direction = 'requested') \
         FROM k JOIN traces t ON t.tenant_id = k.tenant_id AND t.trace_id = k.trace_id \
         WHERE t.status IS NOT NULL",
        values = values.join(", ")
    );
    let mut query = sqlx::query(AssertSqlSafe(sql));
    if let Some(bound) = bound {
        query = query.bind(bound);
    }
    let rows = query.fetch_all(&mut *conn).await?;
    let mut added: BTreeMap<Key, Totals> = BTreeMap::new();
    for row in &rows {
        let tenant: String = row.try_get(0)?;
        let started: i64 = row.try_get(1)?;
        let n = DIMENSIONS.len() + 2;
        let status: Option<String> = row.try_get(n)?;
        let int = |i: usize| row.try_get::<Option<i64>, _>(n + i);
        let latency = int(5)?;
        let ttft = int(6)?;
        let mut one = Totals {
            requests: 1,
            errors: i64::from(status.as_deref() != Some("ok")),
            tokens_in: int(1)?.unwrap_or(0),
            tokens_out: int(2)?.unwrap_or(0),
            tokens_cached: int(3)?.unwrap_or(0),
            cost_micro_usd: int(4)?.unwrap_or(0),
            latency_sum_us: latency.unwrap_or(0),
            cache_saved_micro_usd: int(7)?.unwrap_or(0),
            tool_calls: int(8)?.unwrap_or(0),
            latency_min_us: latency,
            latency_max_us: latency,
            ttft_min_us: ttft,
            ttft_max_us: ttft,
            ..Totals::default()
        };
        if let Some(us) = latency {
            one.latency.insert(bucket_of(us), 1);
        }
        if let Some(us) = ttft {
            one.ttft.insert(bucket_of(us), 1);
        }
        let hour = started - started.rem_euclid(SPANS_US[0]);
        for (i, (dimension, _)) in DIMENSIONS.iter().enumerate() {
            let value: String = row.try_get(2 + i)?;
            added
                .entry((tenant.clone(), dimension, SPANS_US[0], hour, value))
                .or_default()
                .merge(&one);
        }
    }
    if added.is_empty() {
        return Ok(());
    }
    // The days, from the hours.
    let mut days: BTreeMap<Key, Totals> = BTreeMap::new();
    for ((tenant, dimension, _, hour, value), totals) in &added {
        let day = hour - hour.rem_euclid(SPANS_US[1]);
        days.entry((tenant.clone(), dimension, SPANS_US[1], day, value.clone()))
            .or_default()
            .merge(totals);
    }
    added.extend(days);
    let sqlite = is_sqlite(conn);
    if !sqlite {
        let tenants: BTreeSet<&str> = added.keys().map(|k| k.0.as_str()).collect();
        for tenant in tenants {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('loom rollups ' || $1, 0))")
                .bind(tenant)
                .execute(&mut *conn)
                .await?;
        }
    }

    // What is stored already, added to.
    let keys = Rows {
        columns: &["tenant_id", "dimension", "span_us", "bucket_start", "value"],
        values: added
            .keys()
            .map(|(tenant, dimension, span, start, value)| {
                vec![
                    Value::from(tenant.as_str()),
                    Value::from(*dimension),
                    Value::from(*span),
                    Value::from(*start),
                    Value::from(value.as_str()),
                ]
            })
            .collect(),
    };
    let columns = [
        ("tenant_id", Kind::Text),
        ("dimension", Kind::Text),
        ("span_us", Kind::Int),
        ("bucket_start", Kind::Int),
        ("value", Kind::Text),
    ];
    let sql = format!(
        "WITH k AS ({}) SELECT r.tenant_id, r.dimension, r.span_us, r.bucket_start, r.value, \
         {TOTALS_COLUMNS} FROM k JOIN rollups r ON r.tenant_id = k.tenant_id \
         AND r.dimension = k.dimension AND r.span_us = k.span_us \
         AND r.bucket_start = k.bucket_start AND r.value = k.value",
        from_json(sqlite, &columns)
    );
    let stored = sqlx::query(AssertSqlSafe(sql))
        .bind(to_json(sqlite, &keys)?)
        .fetch_all(&mut *conn)
        .await?;
    for row in &stored {
        let dimension: String = row.try_get(1)?;
        let Some((dimension, _)) = DIMENSIONS.iter().find(|(d, _)| *d == dimension) else {
            continue;
        };
        let key: Key = (
            row.try_get(0)?,
            dimension,
            row.try_get(2)?,
            row.try_get(3)?,
            row.try_get(4)?,
        );
        if let Some(totals) = added.get_mut(&key) {
            totals.merge(&Totals::from_row(row, 5)?);
        }
    }

    let texts: Vec<(String, String)> = added
        .values()
        .map(|t| (histogram_text(&t.latency), histogram_text(&t.ttft)))
        .collect();
    let rows = Rows {
        columns: &[
            "tenant_id",
            "dimension",
            "span_us",
            "bucket_start",
            "value",
            "requests",
            "errors",
            "tokens_in",
            "tokens_out",
            "tokens_cached",
            "cost_micro_usd",
            "latency_sum_us",
            "cache_saved_micro_usd",
            "tool_calls",
            "latency_min_us",
            "latency_max_us",
            "ttft_min_us",
            "ttft_max_us",
            "latency_histogram",
            "ttft_histogram",
        ],
        values: added
            .iter()
            .zip(&texts)
            .map(|((key, t), (latency, ttft))| {
                vec![
                    Value::from(key.0.as_str()),
                    Value::from(key.1),
                    Value::from(key.2),
                    Value::from(key.3),
                    Value::from(key.4.as_str()),
                    Value::from(t.requests),
                    Value::from(t.errors),
                    Value::from(t.tokens_in),
                    Value::from(t.tokens_out),
                    Value::from(t.tokens_cached),
                    Value::from(t.cost_micro_usd),
                    Value::from(t.latency_sum_us),
                    Value::from(t.cache_saved_micro_usd),
                    Value::from(t.tool_calls),
                    Value::from(t.latency_min_us),
                    Value::from(t.latency_max_us),
                    Value::from(t.ttft_min_us),
                    Value::from(t.ttft_max_us),
                    Value::from(latency.as_str()),
                    Value::from(ttft.as_str()),
                ]
            })
            .collect(),
    };
    let updates: Vec<String> = rows.columns[5..]
        .iter()
        .map(|c| format!("{c} = excluded.{c}"))
        .collect();
    let tail = format!(
        "ON CONFLICT (tenant_id, dimension, span_us, bucket_start, value) DO UPDATE SET {}",
        updates.join(", ")
    );
    insert(conn, "rollups", rows, &tail).await
}

/// Adds the completed requests of `tenant` that arrived in `[from_us, to_us)` to the rollups,
/// from their trace rows: for read models written other than by a fold (the query benchmark's),
/// or traces folded before the rollups existed (then move `rollups_since` back). Counts requests
/// the rollups already hold again.
pub async fn roll_up_traces(
    conn: &mut AnyConnection,
    tenant: &str,
    from_us: i64,
    to_us: i64,
) -> Result<(), sqlx::Error> {
    let keys_sql = format!(
        "SELECT tenant_id, trace_id FROM traces \
         WHERE tenant_id = $1 AND started_at >= {from_us} AND started_at < {to_us}"
    );
    add(conn, &keys_sql, Some(tenant)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histograms_are_stored_as_pairs_and_read_back() {
        let mut histogram = Histogram::new();
        histogram.insert(bucket_of(0), 2);
        histogram.insert(bucket_of(1_000_000), 5);
        let text = histogram_text(&histogram);
        assert_eq!(text, "[[0,2],[107,5]]");
        assert_eq!(parse_histogram(&text), histogram);
        assert!(parse_histogram("not json").is_empty());
        assert_eq!(bucket_of(100), 0);
        assert_eq!(bucket_of(101), 1);
    }
}
