//! Analytics over the read models: totals with the previous window's, series in a time zone,
//! breakdowns, the top requests, errors, alerts and recent activity — for one tenant, or for all
//! of them (the operator).
//!
//! Counts, sums and percentiles come from the rollups the projector keeps per UTC hour and day
//! (of all requests, and per value of each dimension) when a question involves at most one
//! dimension besides the tenant; the partial hours at a window's edges, and every other question,
//! from the `traces` table (one row per request; the upstream attempts and tool calls joined
//! where asked). Either way every filter works and counts and sums are exact. Latency and TTFT
//! percentiles come from histograms with log-spaced buckets ([`Histogram`]): an estimate is within
//! one bucket of the exact value, that is within 9.1 % of it (or 0.1 ms below 0.1 ms). A request
//! counts once it completed (`request.completed`); its time is when it arrived.

use std::collections::BTreeMap;

use chrono_tz::Tz;
use loom_projector::rollups::{TOTALS_COLUMNS, Totals};
use loom_projector::{Lookup, StoreError, StoreLocation};
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};
use utoipa::ToSchema;

use crate::archive::Scope;
use rollups::Piece;

mod alerts;
mod histogram;
mod rollups;
mod time;

pub use alerts::{Alert, thresholds};
pub use histogram::{Histogram, percentile_error_bound_us};
use histogram::{LATENCY_BUCKET, TTFT_BUCKET};
pub(crate) use time::parse_rfc3339;
use time::slot_us;
pub use time::{MAX_BUCKETS, Unit, Window, bucket_starts, rfc3339, rfc3339_in};

#[derive(Debug, thiserror::Error)]
pub enum AnalyticsError {
    /// A parameter the caller got wrong; the message says which and what is allowed.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("read-model database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the archive: {0}")]
    Archive(String),
    /// Nothing the caller may see goes by that name.
    #[error("{0}")]
    NotFound(String),
    /// This server does not serve what was asked for.
    #[error("{0}")]
    Unavailable(&'static str),
}

impl AnalyticsError {
    fn invalid(message: impl Into<String>) -> AnalyticsError {
        AnalyticsError::Invalid(message.into())
    }
}

// ---- what a question is about ----------------------------------------------------------------

/// Narrows a question to some requests; each filter set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filters {
    pub project: Option<String>,
    pub user: Option<String>,
    pub key: Option<String>,
    /// The model served, or the one asked for when none was served.
    pub model: Option<String>,
    pub provider: Option<String>,
    pub deployment: Option<String>,
    /// `ok`, `error`, `denied`, `client_cancelled`, or `failed` for any but `ok`.
    pub status: Option<String>,
    /// For the operator: one tenant's requests.
    pub tenant: Option<String>,
}

const STATUSES: [&str; 5] = ["ok", "error", "denied", "client_cancelled", "failed"];

impl Filters {
    pub fn validate(&self) -> Result<(), AnalyticsError> {
        if let Some(status) = &self.status
            && !STATUSES.contains(&status.as_str())
        {
            return Err(AnalyticsError::invalid(format!(
                "`status` must be one of {}; got {status:?}",
                STATUSES.join(", ")
            )));
        }
        Ok(())
    }
}

/// Whose requests, when, which ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    pub scope: Scope,
    pub window: Window,
    pub filters: Filters,
}

/// A column of `traces` to break requests down by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Model,
    Provider,
    Deployment,
    Project,
    User,
    Key,
    ErrorClass,
    Status,
    Tenant,
    /// The tier (L0–L3) of the alias a request was routed to.
    Tier,
}

impl Dimension {
    pub const NAMES: [&str; 10] = [
        "model",
        "provider",
        "deployment",
        "project",
        "user",
        "key",
        "error_class",
        "status",
        "tenant",
        "tier",
    ];

    pub fn parse(name: &str) -> Option<Dimension> {
        Some(match name {
            "model" => Dimension::Model,
            "provider" => Dimension::Provider,
            "deployment" => Dimension::Deployment,
            "project" => Dimension::Project,
            "user" => Dimension::User,
            "key" => Dimension::Key,
            "error_class" => Dimension::ErrorClass,
            "status" => Dimension::Status,
            "tenant" => Dimension::Tenant,
            "tier" => Dimension::Tier,
            _ => return None,
        })
    }

    fn column(self) -> &'static str {
        match self {
            Dimension::Model => "COALESCE(t.model_served, t.model_requested)",
            Dimension::Provider => "t.provider",
            Dimension::Deployment => "t.deployment",
            Dimension::Project => "t.project_id",
            Dimension::User => "t.user_id",
            Dimension::Key => "t.api_key_id",
            Dimension::ErrorClass => "t.error_class",
            Dimension::Status => "t.status",
            Dimension::Tenant => "t.tenant_id",
            Dimension::Tier => "t.tier",
        }
    }
}

// ---- what is computed ------------------------------------------------------------------------

/// What is asked of a pass over the traces, beyond counts and sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Needs {
    latency: bool,
    ttft: bool,
    cache: bool,
    tools: bool,
}

impl Needs {
    const ALL: Needs = Needs {
        latency: true,
        ttft: true,
        cache: true,
        tools: true,
    };

    /// What the metrics named need.
    fn of(metrics: &[&str]) -> Needs {
        let any = |prefixes: &[&str]| {
            metrics
                .iter()
                .any(|m| prefixes.iter().any(|p| m.starts_with(p)))
        };
        Needs {
            latency: any(&["latency_p"]),
            ttft: any(&["ttft_"]),
            cache: any(&["cache_savings"]),
            tools: any(&["tool_calls"]),
        }
    }
}

/// Counts, sums and histograms of a group of requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub requests: i64,
    pub errors: i64,
    pub tokens_in: i64,
    pub tokens_out: i64,
    pub tokens_cached: i64,
    pub cost_micro_usd: i64,
    pub latency_sum_us: i64,
    pub latency: Histogram,
    pub ttft: Histogram,
    pub cache_saved_micro_usd: i64,
    pub tool_calls: i64,
}

impl Stats {
    fn merge(&mut self, other: &Stats) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.tokens_in += other.tokens_in;
        self.tokens_out += other.tokens_out;
        self.tokens_cached += other.tokens_cached;
        self.cost_micro_usd += other.cost_micro_usd;
        self.latency_sum_us += other.latency_sum_us;
        self.latency.merge(&other.latency);
        self.ttft.merge(&other.ttft);
        self.cache_saved_micro_usd += other.cache_saved_micro_usd;
        self.tool_calls += other.tool_calls;
    }

    /// Adds what a rollup row counts.
    fn add_rollup(&mut self, totals: &Totals) {
        self.requests += totals.requests;
        self.errors += totals.errors;
        self.tokens_in += totals.tokens_in;
        self.tokens_out += totals.tokens_out;
        self.tokens_cached += totals.tokens_cached;
        self.cost_micro_usd += totals.cost_micro_usd;
        self.latency_sum_us += totals.latency_sum_us;
        self.cache_saved_micro_usd += totals.cache_saved_micro_usd;
        self.tool_calls += totals.tool_calls;
        for (bucket, count) in &totals.latency {
            self.latency.add(*bucket, *count, None, None);
        }
        self.latency
            .bound(totals.latency_min_us, totals.latency_max_us);
        for (bucket, count) in &totals.ttft {
            self.ttft.add(*bucket, *count, None, None);
        }
        self.ttft.bound(totals.ttft_min_us, totals.ttft_max_us);
    }

    pub fn metrics(&self) -> Metrics {
        let ms = |us: Option<i64>| us.map(|us| us as f64 / 1e3);
        Metrics {
            requests: self.requests,
            errors: self.errors,
            error_rate: rate(self.errors, self.requests),
            tokens_in: self.tokens_in,
            tokens_out: self.tokens_out,
            tokens_cached: self.tokens_cached,
            tokens_total: self.tokens_in + self.tokens_out,
            cost_usd: usd(self.cost_micro_usd),
            cost_micro_usd: self.cost_micro_usd,
            cache_savings_usd: usd(self.cache_saved_micro_usd),
            cache_savings_micro_usd: self.cache_saved_micro_usd,
            latency_avg_ms: (self.requests > 0)
                .then(|| self.latency_sum_us as f64 / self.requests as f64 / 1e3),
            latency_p50_ms: ms(self.latency.quantile(0.50)),
            latency_p95_ms: ms(self.latency.quantile(0.95)),
            latency_p99_ms: ms(self.latency.quantile(0.99)),
            ttft_p50_ms: ms(self.ttft.quantile(0.50)),
            ttft_p95_ms: ms(self.ttft.quantile(0.95)),
            tool_calls: self.tool_calls,
        }
    }
}

fn rate(part: i64, whole: i64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

fn usd(micro: i64) -> f64 {
    micro as f64 / 1e6
}

/// The metrics of a group of requests. Money is given in USD and, exactly, in micro-USD.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Metrics {
    /// Completed requests.
    pub requests: i64,
    /// Requests that did not end `ok` (errors, quota denials, cancellations).
    pub errors: i64,
    /// `errors / requests` (0 when there were none).
    pub error_rate: f64,
    pub tokens_in: i64,
    pub tokens_out: i64,
    /// Prompt tokens read from the provider's cache.
    pub tokens_cached: i64,
    pub tokens_total: i64,
    pub cost_usd: f64,
    pub cost_micro_usd: i64,
    /// What prompt caching saved against the uncached price.
    pub cache_savings_usd: f64,
    pub cache_savings_micro_usd: i64,
    pub latency_avg_ms: Option<f64>,
    /// Percentiles: within 9.1 % of the exact value (docs/query.md).
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    /// Time to the first token, of streamed requests.
    pub ttft_p50_ms: Option<f64>,
    pub ttft_p95_ms: Option<f64>,
    /// Tool calls the models asked for.
    pub tool_calls: i64,
}

/// The names of [`Metrics`], what `metric=` may ask for.
pub const METRICS: [&str; 18] = [
    "requests",
    "errors",
    "error_rate",
    "tokens_in",
    "tokens_out",
    "tokens_cached",
    "tokens_total",
    "cost_usd",
    "cost_micro_usd",
    "cache_savings_usd",
    "cache_savings_micro_usd",
    "latency_avg_ms",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "tool_calls",
];

/// `metric=a,b` checked against [`METRICS`]; all of them when `None`.
pub fn parse_metrics(text: Option<&str>) -> Result<Vec<&'static str>, AnalyticsError> {
    let Some(text) = text else {
        return Ok(METRICS.to_vec());
    };
    text.split(',')
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(|m| {
            METRICS
                .iter()
                .copied()
                .find(|known| *known == m)
                .ok_or_else(|| {
                    AnalyticsError::invalid(format!(
                        "unknown metric {m:?}; metrics are {}",
                        METRICS.join(", ")
                    ))
                })
        })
        .collect()
}

/// The metrics named, as a JSON object.
pub fn select(metrics: &Metrics, names: &[&str]) -> Map<String, Value> {
    let Ok(Value::Object(mut all)) = serde_json::to_value(metrics) else {
        return Map::new();
    };
    all.retain(|name, _| names.contains(&name.as_str()));
    all
}

/// One metric now, in the previous window, and the change in %.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Compared {
    #[schema(value_type = Option<f64>)]
    pub value: Value,
    #[schema(value_type = Option<f64>)]
    pub previous: Value,
    /// `(value - previous) / previous · 100`; null when the previous value is 0 or missing.
    pub change_pct: Option<f64>,
}

/// Every metric next to the previous window's.
pub fn compare(current: &Metrics, previous: &Metrics) -> BTreeMap<String, Compared> {
    let now = select(current, &METRICS);
    let before = select(previous, &METRICS);
    now.into_iter()
        .map(|(name, value)| {
            let previous = before.get(&name).cloned().unwrap_or(Value::Null);
            let change_pct = match (value.as_f64(), previous.as_f64()) {
                (Some(v), Some(p)) if p != 0.0 => Some((v - p) / p * 100.0),
                _ => None,
            };
            (
                name,
                Compared {
                    value,
                    previous,
                    change_pct,
                },
            )
        })
        .collect()
}

/// One request, as lists show it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RequestRow {
    pub trace_id: String,
    pub tenant_id: String,
    /// When it arrived (RFC 3339, UTC).
    pub started_at: String,
    pub endpoint: Option<String>,
    /// The model served, or the one asked for when none was.
    pub model: Option<String>,
    pub model_requested: Option<String>,
    pub provider: Option<String>,
    pub deployment: Option<String>,
    pub project_id: Option<String>,
    pub user: Option<String>,
    pub api_key_id: Option<String>,
    /// `ok`, `error`, `denied`, `client_cancelled`; null while in flight.
    pub status: Option<String>,
    pub http_status: Option<i64>,
    pub error_class: Option<String>,
    pub stream: Option<bool>,
    pub attempts: Option<i64>,
    pub latency_ms: Option<f64>,
    pub ttft_ms: Option<f64>,
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    pub tokens_cached: Option<i64>,
    pub cost_usd: Option<f64>,
    pub cost_micro_usd: Option<i64>,
    pub policy_action: Option<String>,
    /// When it completed (RFC 3339); null while in flight.
    pub completed_at: Option<String>,
}

pub(crate) const REQUEST_COLUMNS: &str = "t.trace_id, t.tenant_id, t.started_at, t.endpoint, \
     COALESCE(t.model_served, t.model_requested), t.model_requested, t.provider, t.deployment, \
     t.project_id, t.user_id, t.api_key_id, t.status, t.http_status, t.error_class, \
     CAST(CASE WHEN t.stream THEN 1 WHEN NOT t.stream THEN 0 END AS BIGINT), t.attempts, t.latency_us, t.ttft_us, t.tokens_in, t.tokens_out, \
     t.tokens_cached, t.cost_micro_usd, t.policy_action, t.completed_at";

pub(crate) fn request_row(row: &AnyRow) -> Result<RequestRow, sqlx::Error> {
    let cost: Option<i64> = row.try_get(21)?;
    Ok(RequestRow {
        trace_id: row.try_get(0)?,
        tenant_id: row.try_get(1)?,
        started_at: rfc3339(row.try_get(2)?),
        endpoint: row.try_get(3)?,
        model: row.try_get(4)?,
        model_requested: row.try_get(5)?,
        provider: row.try_get(6)?,
        deployment: row.try_get(7)?,
        project_id: row.try_get(8)?,
        user: row.try_get(9)?,
        api_key_id: row.try_get(10)?,
        status: row.try_get(11)?,
        http_status: row.try_get(12)?,
        error_class: row.try_get(13)?,
        stream: row.try_get::<Option<i64>, _>(14)?.map(|s| s != 0),
        attempts: row.try_get(15)?,
        latency_ms: row.try_get::<Option<i64>, _>(16)?.map(|us| us as f64 / 1e3),
        ttft_ms: row.try_get::<Option<i64>, _>(17)?.map(|us| us as f64 / 1e3),
        tokens_in: row.try_get(18)?,
        tokens_out: row.try_get(19)?,
        tokens_cached: row.try_get(20)?,
        cost_usd: cost.map(usd),
        cost_micro_usd: cost,
        policy_action: row.try_get(22)?,
        completed_at: row.try_get::<Option<i64>, _>(23)?.map(rfc3339),
    })
}

impl RequestRow {
    /// The row of what a fold of a trace's events says about it.
    pub fn from_patch(patch: &loom_projector::fold::TracePatch) -> RequestRow {
        let ms = |us: Option<i64>| us.map(|us| us as f64 / 1e3);
        RequestRow {
            trace_id: patch.trace_id.clone(),
            tenant_id: patch.tenant_id.clone(),
            started_at: rfc3339(patch.started_at.unwrap_or(patch.first_at)),
            endpoint: patch.endpoint.clone(),
            model: patch
                .model_served
                .clone()
                .or_else(|| patch.model_requested.clone()),
            model_requested: patch.model_requested.clone(),
            provider: patch.provider.clone(),
            deployment: patch.deployment.clone(),
            project_id: patch.project_id.clone(),
            user: patch.user_id.clone(),
            api_key_id: patch.api_key_id.clone(),
            status: patch.status.clone(),
            http_status: patch.http_status,
            error_class: patch.error_class.clone(),
            stream: patch.stream,
            attempts: patch.attempts,
            latency_ms: ms(patch.latency_us),
            ttft_ms: ms(patch.ttft_us),
            tokens_in: patch.tokens_in,
            tokens_out: patch.tokens_out,
            tokens_cached: patch.tokens_cached,
            cost_usd: patch.cost_micro_usd.map(usd),
            cost_micro_usd: patch.cost_micro_usd,
            policy_action: patch.policy_action.clone(),
            completed_at: patch.completed_at.map(rfc3339),
        }
    }
}

/// How many times a policy rule found something, as [`Analytics::policy_findings`] counts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
pub struct FindingCount {
    pub project_id: Option<String>,
    /// The rule's id (a built-in detector, a custom rule, or `blocked_keyword`).
    pub rule: String,
    /// What was done: `flag`, `redact`, `block` (or `cut` for answers).
    pub action: String,
    /// `prompt` or `output`.
    pub direction: String,
    pub findings: i64,
    /// Requests with at least one such finding.
    pub requests: i64,
}

/// The most policy evaluations [`Analytics::policy_findings`] reads for one question.
pub const MAX_EVALUATIONS: usize = 100_000;

/// What to rank requests by in [`Analytics::top`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopBy {
    Cost,
    Latency,
    Tokens,
}

impl TopBy {
    pub fn parse(name: &str) -> Option<TopBy> {
        Some(match name {
            "cost" => TopBy::Cost,
            "latency" => TopBy::Latency,
            "tokens" => TopBy::Tokens,
            _ => return None,
        })
    }

    fn order(self) -> &'static str {
        match self {
            TopBy::Cost => "t.cost_micro_usd",
            TopBy::Latency => "t.latency_us",
            TopBy::Tokens => "COALESCE(t.tokens_in, 0) + COALESCE(t.tokens_out, 0)",
        }
    }
}

/// Errors of one group: how many, of how many, and of which classes.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ErrorGroup {
    pub model: Option<String>,
    pub provider: Option<String>,
    /// For upstream attempts: the deployment called.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// Requests (or upstream attempts).
    pub total: i64,
    pub errors: i64,
    pub error_rate: f64,
    /// Errors by class (`upstream_error`, `rate_limited`, `quota_exceeded`, …; `unknown` when
    /// none was recorded).
    pub classes: BTreeMap<String, i64>,
}

/// Error rates and classes, of requests (by model) and of upstream attempts (by provider,
/// deployment and model).
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ErrorReport {
    pub requests: i64,
    pub errors: i64,
    pub error_rate: f64,
    /// Requests by the model served (or asked for), most errors first.
    pub by_model: Vec<ErrorGroup>,
    /// Upstream attempts (retries and fallbacks included), most errors first.
    pub upstreams: Vec<ErrorGroup>,
}

// ---- the queries -----------------------------------------------------------------------------

/// SQL text and its bound values (all text; numbers are written into the text).
pub(crate) struct Sql {
    pub(crate) text: String,
    binds: Vec<String>,
}

impl Sql {
    pub(crate) fn new() -> Sql {
        Sql {
            text: String::new(),
            binds: Vec::new(),
        }
    }

    pub(crate) fn bind(&mut self, value: &str) -> String {
        self.binds.push(value.to_owned());
        format!("${}", self.binds.len())
    }

    /// `t.` predicates for the scope, the window and the filters.
    pub(crate) fn filter(&mut self, scope: Scope, window: Window, filters: &Filters) -> String {
        let mut terms = vec![format!(
            "t.started_at >= {} AND t.started_at < {}",
            window.from_us, window.to_us
        )];
        if let Scope::Tenant(tenant) = scope {
            terms.push(format!("t.tenant_id = {}", self.bind(&tenant.to_string())));
        }
        let columns = [
            (&filters.tenant, "t.tenant_id"),
            (&filters.project, "t.project_id"),
            (&filters.user, "t.user_id"),
            (&filters.key, "t.api_key_id"),
            (
                &filters.model,
                "COALESCE(t.model_served, t.model_requested)",
            ),
            (&filters.provider, "t.provider"),
            (&filters.deployment, "t.deployment"),
        ];
        for (value, column) in columns {
            if let Some(value) = value {
                terms.push(format!("{column} = {}", self.bind(value)));
            }
        }
        match filters.status.as_deref() {
            None => {}
            Some("failed") => terms.push("t.status <> 'ok'".into()),
            Some(status) => terms.push(format!("t.status = {}", self.bind(status))),
        }
        terms.join(" AND ")
    }

    pub(crate) async fn fetch(
        self,
        store: &loom_projector::ReadStore,
    ) -> Result<Vec<AnyRow>, sqlx::Error> {
        let mut query = sqlx::query(AssertSqlSafe(self.text));
        for value in self.binds {
            query = query.bind(value);
        }
        query.fetch_all(store.pool()).await
    }
}

/// How requests are grouped in a pass: the SQL of the group's key (text, or NULL).
#[derive(Debug, Clone, Copy)]
enum Group {
    /// `current` from this instant on, `previous` before.
    Split(i64),
    /// By time slot of this many µs (the key is the slot's number).
    Slot(i64),
    By(Dimension),
}

impl Group {
    /// The key of a trace `t`'s group.
    fn sql(self) -> String {
        match self {
            Group::Split(at) => {
                format!("CASE WHEN t.started_at >= {at} THEN 'current' ELSE 'previous' END")
            }
            Group::Slot(us) => format!("CAST(t.started_at / {us} AS TEXT)"),
            Group::By(dimension) => dimension.column().into(),
        }
    }

    /// The key of a rollup row `r`'s group (for rows no group boundary falls inside of).
    fn rollup_sql(self) -> String {
        match self {
            Group::Split(at) => {
                format!("CASE WHEN r.bucket_start >= {at} THEN 'current' ELSE 'previous' END")
            }
            Group::Slot(us) => format!("CAST(r.bucket_start / {us} AS TEXT)"),
            Group::By(Dimension::Tenant) => "r.tenant_id".into(),
            Group::By(_) => "NULLIF(r.value, '')".into(),
        }
    }
}

/// Answers analytics from the read models.
pub struct Analytics {
    reads: Lookup,
}

impl Analytics {
    pub fn new(location: StoreLocation) -> Analytics {
        Analytics {
            reads: Lookup::new(location),
        }
    }

    /// Stats per group of the requests `question` is about (completed ones): from the rollups
    /// where they answer, else from the traces.
    async fn stats(
        &self,
        question: &Question,
        window: Window,
        group: Group,
        needs: Needs,
    ) -> Result<BTreeMap<Option<String>, Stats>, AnalyticsError> {
        let store = self.reads.store().await?;
        let mut groups: BTreeMap<Option<String>, Stats> = BTreeMap::new();
        let Some((dimension, value)) = rollups::rows_for(&question.filters, group) else {
            traced_stats(&store, question, window, group, needs, &mut groups).await?;
            return Ok(groups);
        };
        let since: Option<i64> = sqlx::query_scalar("SELECT since_us FROM rollups_since")
            .fetch_optional(store.pool())
            .await?;
        for piece in rollups::plan(window, group, since.unwrap_or(i64::MAX)) {
            match piece {
                Piece::Traces(window) => {
                    traced_stats(&store, question, window, group, needs, &mut groups).await?;
                }
                Piece::Rollups(span_us, window) => {
                    let rows = RollupRows {
                        scope: question.scope,
                        tenant: question.filters.tenant.as_deref(),
                        dimension,
                        value: value.clone(),
                        span_us,
                        window,
                    };
                    rolled_up_stats(&store, &rows, group, &mut groups).await?;
                }
            }
        }
        Ok(groups)
    }

    /// The metrics of the window and of the one before it.
    pub async fn summary(&self, question: &Question) -> Result<(Stats, Stats), AnalyticsError> {
        let both = Window {
            from_us: question.window.previous().from_us,
            to_us: question.window.to_us,
        };
        let mut groups = self
            .stats(
                question,
                both,
                Group::Split(question.window.from_us),
                Needs::ALL,
            )
            .await?;
        let current = groups.remove(&Some("current".into())).unwrap_or_default();
        let previous = groups.remove(&Some("previous".into())).unwrap_or_default();
        Ok((current, previous))
    }

    /// The metrics named in `metrics` per bucket of `unit` in `tz`: the start of each bucket
    /// and its stats, every bucket of the window (empty ones too). The first and last bucket
    /// hold only what falls in the window.
    pub async fn series(
        &self,
        question: &Question,
        unit: Unit,
        tz: Tz,
        metrics: &[&str],
    ) -> Result<Vec<(i64, Stats)>, AnalyticsError> {
        let starts = bucket_starts(question.window, unit, tz)?;
        let slot = slot_us(&starts);
        let slots = self
            .stats(
                question,
                question.window,
                Group::Slot(slot),
                Needs::of(metrics),
            )
            .await?;
        let mut buckets: Vec<(i64, Stats)> =
            starts.iter().map(|&s| (s, Stats::default())).collect();
        for (key, stats) in slots {
            let Some(at) = key
                .and_then(|k| k.parse::<i64>().ok())
                .and_then(|n| n.checked_mul(slot))
            else {
                continue;
            };
            let i = starts.partition_point(|&s| s <= at);
            if let Some((_, bucket)) = i.checked_sub(1).and_then(|i| buckets.get_mut(i)) {
                bucket.merge(&stats);
            }
        }
        Ok(buckets)
    }

    /// The stats per value of `by`, the most requested first, at most `limit` groups.
    pub async fn breakdown(
        &self,
        question: &Question,
        by: Dimension,
        metrics: &[&str],
        limit: usize,
    ) -> Result<Vec<(Option<String>, Stats)>, AnalyticsError> {
        let groups = self
            .stats(question, question.window, Group::By(by), Needs::of(metrics))
            .await?;
        let mut groups: Vec<_> = groups.into_iter().collect();
        groups.sort_by(|a, b| {
            b.1.requests
                .cmp(&a.1.requests)
                .then_with(|| b.1.cost_micro_usd.cmp(&a.1.cost_micro_usd))
                .then_with(|| a.0.cmp(&b.0))
        });
        groups.truncate(limit);
        Ok(groups)
    }

    /// Names of the projects or keys `ids` are, for labels.
    pub async fn names(
        &self,
        scope: Scope,
        by: Dimension,
        ids: &[&str],
    ) -> Result<BTreeMap<String, String>, AnalyticsError> {
        let (table, id, name) = match by {
            Dimension::Project => ("projects", "project_id", "name"),
            Dimension::Key => ("api_keys", "key_id", "COALESCE(name, prefix)"),
            Dimension::Tenant => ("tenants", "tenant_id", "name"),
            _ => return Ok(BTreeMap::new()),
        };
        if ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        let store = self.reads.store().await?;
        let mut sql = Sql::new();
        let mut terms = Vec::new();
        if let Scope::Tenant(tenant) = scope {
            terms.push(format!("tenant_id = {}", sql.bind(&tenant.to_string())));
        }
        let list: Vec<String> = ids.iter().map(|i| sql.bind(i)).collect();
        terms.push(format!("{id} IN ({})", list.join(", ")));
        sql.text = format!(
            "SELECT {id}, {name} FROM {table} WHERE {}",
            terms.join(" AND ")
        );
        sql.fetch(&store)
            .await?
            .iter()
            .map(|row| Ok((row.try_get(0)?, row.try_get(1)?)))
            .collect()
    }

    /// The `limit` completed requests ranking highest by `by`.
    pub async fn top(
        &self,
        question: &Question,
        by: TopBy,
        limit: usize,
    ) -> Result<Vec<RequestRow>, AnalyticsError> {
        let store = self.reads.store().await?;
        let mut sql = Sql::new();
        let filter = sql.filter(question.scope, question.window, &question.filters);
        sql.text = format!(
            "SELECT {REQUEST_COLUMNS} FROM traces t WHERE {filter} AND t.status IS NOT NULL \
             ORDER BY {} DESC NULLS LAST, t.started_at DESC, t.trace_id LIMIT {limit}",
            by.order()
        );
        Ok(sql
            .fetch(&store)
            .await?
            .iter()
            .map(request_row)
            .collect::<Result<_, _>>()?)
    }

    /// The `limit` most recent requests, in flight ones included.
    /// The policy's findings in the requests `question` is about, counted by project, rule,
    /// the action taken and where (`prompt` or `output`): how many findings, in how many
    /// requests. Never the matched text (the events carry none). Reads at most
    /// [`MAX_EVALUATIONS`] evaluations; `true` with the counts if there were more.
    pub async fn policy_findings(
        &self,
        question: &Question,
    ) -> Result<(Vec<FindingCount>, bool), AnalyticsError> {
        let store = self.reads.store().await?;
        let mut sql = Sql::new();
        let filter = sql.filter(question.scope, question.window, &question.filters);
        sql.text = format!(
            "SELECT t.project_id, d.detail FROM trace_decisions d \
             JOIN traces t ON t.tenant_id = d.tenant_id AND t.trace_id = d.trace_id \
             WHERE {filter} AND d.kind = 'policy' LIMIT {}",
            MAX_EVALUATIONS + 1
        );
        let rows = sql.fetch(&store).await?;
        let cut = rows.len() > MAX_EVALUATIONS;
        // (project, rule, action, direction) → (findings, requests).
        type Key = (Option<String>, String, String, String);
        let mut counts: BTreeMap<Key, (i64, i64)> = BTreeMap::new();
        for row in rows.iter().take(MAX_EVALUATIONS) {
            let project: Option<String> = row.try_get(0)?;
            let detail: String = row.try_get(1)?;
            let Ok(evaluated) = serde_json::from_str::<Value>(&detail) else {
                continue;
            };
            let text = |v: &Value, key: &str| v.get(key).and_then(Value::as_str).map(str::to_owned);
            let direction = text(&evaluated, "direction").unwrap_or_else(|| "prompt".into());
            let overall = text(&evaluated, "action").unwrap_or_default();
            let mut seen = std::collections::BTreeSet::new();
            for finding in evaluated
                .get("findings")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let rule = text(finding, "rule").unwrap_or_default();
                let action = text(finding, "action")
                    .filter(|a| !a.is_empty())
                    .unwrap_or_else(|| overall.clone());
                let key = (project.clone(), rule, action, direction.clone());
                let entry = counts.entry(key.clone()).or_default();
                entry.0 += 1;
                if seen.insert(key) {
                    entry.1 += 1;
                }
            }
        }
        let mut found: Vec<FindingCount> = counts
            .into_iter()
            .map(
                |((project_id, rule, action, direction), (findings, requests))| FindingCount {
                    project_id,
                    rule,
                    action,
                    direction,
                    findings,
                    requests,
                },
            )
            .collect();
        found.sort_by(|a, b| {
            b.findings
                .cmp(&a.findings)
                .then_with(|| a.rule.cmp(&b.rule))
        });
        Ok((found, cut))
    }

    pub async fn recent(
        &self,
        question: &Question,
        limit: usize,
    ) -> Result<Vec<RequestRow>, AnalyticsError> {
        let store = self.reads.store().await?;
        let mut sql = Sql::new();
        let filter = sql.filter(question.scope, question.window, &question.filters);
        sql.text = format!(
            "SELECT {REQUEST_COLUMNS} FROM traces t WHERE {filter} \
             ORDER BY t.started_at DESC, t.trace_id DESC LIMIT {limit}"
        );
        Ok(sql
            .fetch(&store)
            .await?
            .iter()
            .map(request_row)
            .collect::<Result<_, _>>()?)
    }

    /// Error rates and classes of requests by model and of upstream attempts.
    pub async fn errors(&self, question: &Question) -> Result<ErrorReport, AnalyticsError> {
        let store = self.reads.store().await?;
        let mut sql = Sql::new();
        let filter = sql.filter(question.scope, question.window, &question.filters);
        sql.text = format!(
            "SELECT COALESCE(t.model_served, t.model_requested), NULL, NULL, \
                    CASE WHEN t.status = 'ok' THEN NULL ELSE COALESCE(t.error_class, t.status) END, \
                    COUNT(*) \
             FROM traces t WHERE {filter} AND t.status IS NOT NULL GROUP BY 1, 4"
        );
        let by_model = error_groups(&sql.fetch(&store).await?)?;

        let mut sql = Sql::new();
        let filter = sql.filter(question.scope, question.window, &question.filters);
        sql.text = format!(
            "SELECT c.model, c.provider, c.deployment, \
                    CASE WHEN c.status = 'ok' THEN NULL ELSE COALESCE(c.error_class, c.status) END, \
                    COUNT(*) \
             FROM traces t JOIN llm_calls c ON c.tenant_id = t.tenant_id AND c.trace_id = t.trace_id \
             WHERE {filter} GROUP BY 1, 2, 3, 4"
        );
        let upstreams = error_groups(&sql.fetch(&store).await?)?;

        let requests = by_model.iter().map(|g| g.total).sum();
        let errors = by_model.iter().map(|g| g.errors).sum();
        Ok(ErrorReport {
            requests,
            errors,
            error_rate: rate(errors, requests),
            by_model,
            upstreams,
        })
    }
}

/// Adds the stats per group of the completed requests of `window` that `question` is about,
/// counted from the traces: a pass for counts, sums and latencies, and one for each of TTFT,
/// cache savings and tool calls if needed.
async fn traced_stats(
    store: &loom_projector::ReadStore,
    question: &Question,
    window: Window,
    group: Group,
    needs: Needs,
    groups: &mut BTreeMap<Option<String>, Stats>,
) -> Result<(), AnalyticsError> {
    let key = group.sql();

    let mut sql = Sql::new();
    let filter = sql.filter(question.scope, window, &question.filters);
    let bucket = if needs.latency {
        LATENCY_BUCKET.as_str()
    } else {
        "-1"
    };
    sql.text = format!(
        "SELECT {key}, {bucket}, COUNT(*), \
                CAST(SUM(CASE WHEN t.status = 'ok' THEN 0 ELSE 1 END) AS BIGINT), \
                CAST(SUM(COALESCE(t.tokens_in, 0)) AS BIGINT), \
                CAST(SUM(COALESCE(t.tokens_out, 0)) AS BIGINT), \
                CAST(SUM(COALESCE(t.tokens_cached, 0)) AS BIGINT), \
                CAST(SUM(COALESCE(t.cost_micro_usd, 0)) AS BIGINT), \
                CAST(SUM(COALESCE(t.latency_us, 0)) AS BIGINT), \
                MIN(t.latency_us), MAX(t.latency_us) \
         FROM traces t WHERE {filter} AND t.status IS NOT NULL GROUP BY 1, 2"
    );
    for row in sql.fetch(store).await? {
        let stats = groups.entry(row.try_get(0)?).or_default();
        let count: i64 = row.try_get(2)?;
        stats.requests += count;
        stats.errors += row.try_get::<i64, _>(3)?;
        stats.tokens_in += row.try_get::<i64, _>(4)?;
        stats.tokens_out += row.try_get::<i64, _>(5)?;
        stats.tokens_cached += row.try_get::<i64, _>(6)?;
        stats.cost_micro_usd += row.try_get::<i64, _>(7)?;
        stats.latency_sum_us += row.try_get::<i64, _>(8)?;
        if needs.latency {
            stats
                .latency
                .add(row.try_get(1)?, count, row.try_get(9)?, row.try_get(10)?);
        }
    }

    if needs.ttft {
        let mut sql = Sql::new();
        let filter = sql.filter(question.scope, window, &question.filters);
        sql.text = format!(
            "SELECT {key}, {}, COUNT(*), MIN(t.ttft_us), MAX(t.ttft_us) \
             FROM traces t WHERE {filter} AND t.status IS NOT NULL \
             AND t.ttft_us IS NOT NULL GROUP BY 1, 2",
            TTFT_BUCKET.as_str()
        );
        for row in sql.fetch(store).await? {
            groups.entry(row.try_get(0)?).or_default().ttft.add(
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
                row.try_get(4)?,
            );
        }
    }

    let joined = [
        (
            needs.cache,
            "CAST(SUM(COALESCE(c.cache_saved_micro_usd, 0)) AS BIGINT)",
            "llm_calls",
            "",
        ),
        (
            needs.tools,
            "COUNT(*)",
            "tool_calls",
            " AND c.direction = 'requested'",
        ),
    ];
    for (needed, value, table, condition) in joined {
        if !needed {
            continue;
        }
        let mut sql = Sql::new();
        let filter = sql.filter(question.scope, window, &question.filters);
        sql.text = format!(
            "SELECT {key}, {value} FROM traces t \
             JOIN {table} c ON c.tenant_id = t.tenant_id AND c.trace_id = t.trace_id \
             WHERE {filter} AND t.status IS NOT NULL{condition} GROUP BY 1"
        );
        for row in sql.fetch(store).await? {
            let stats = groups.entry(row.try_get(0)?).or_default();
            let value: i64 = row.try_get(1)?;
            if table == "llm_calls" {
                stats.cache_saved_micro_usd += value;
            } else {
                stats.tool_calls += value;
            }
        }
    }
    Ok(())
}

/// The rollup rows of one dimension (and value) of one span in a window.
struct RollupRows<'a> {
    scope: Scope,
    /// The operator's filter on one tenant.
    tenant: Option<&'a str>,
    dimension: &'static str,
    value: Option<rollups::Value<'a>>,
    span_us: i64,
    window: Window,
}

impl RollupRows<'_> {
    /// `r.` predicates selecting the rows.
    fn filter(&self, sql: &mut Sql) -> String {
        let mut terms = vec![format!(
            "r.dimension = '{}' AND r.span_us = {} AND r.bucket_start >= {} AND r.bucket_start < {}",
            self.dimension, self.span_us, self.window.from_us, self.window.to_us
        )];
        if let Scope::Tenant(tenant) = self.scope {
            terms.push(format!("r.tenant_id = {}", sql.bind(&tenant.to_string())));
        }
        if let Some(tenant) = self.tenant {
            terms.push(format!("r.tenant_id = {}", sql.bind(tenant)));
        }
        match &self.value {
            None => {}
            Some(rollups::Value::Is(value)) => {
                terms.push(format!("r.value = {}", sql.bind(value)));
            }
            Some(rollups::Value::Failed) => terms.push("r.value <> 'ok'".into()),
        }
        terms.join(" AND ")
    }
}

/// Adds the stats per group of the requests the rollup rows `rows` count (every metric: the
/// rows hold them all).
async fn rolled_up_stats(
    store: &loom_projector::ReadStore,
    rows: &RollupRows<'_>,
    group: Group,
    groups: &mut BTreeMap<Option<String>, Stats>,
) -> Result<(), AnalyticsError> {
    let key = group.rollup_sql();
    let mut sql = Sql::new();
    let filter = rows.filter(&mut sql);
    sql.text = format!("SELECT {key}, {TOTALS_COLUMNS} FROM rollups r WHERE {filter}");
    for row in sql.fetch(store).await? {
        let totals = Totals::from_row(&row, 1)?;
        groups
            .entry(row.try_get(0)?)
            .or_default()
            .add_rollup(&totals);
    }
    Ok(())
}

/// Folds rows of (model, provider, deployment, error class or NULL when ok, count) into groups,
/// the most errors first.
fn error_groups(rows: &[AnyRow]) -> Result<Vec<ErrorGroup>, sqlx::Error> {
    type Key = (Option<String>, Option<String>, Option<String>);
    let mut groups: BTreeMap<Key, ErrorGroup> = BTreeMap::new();
    for row in rows {
        let key: Key = (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
        let class: Option<String> = row.try_get(3)?;
        let count: i64 = row.try_get(4)?;
        let group = groups.entry(key.clone()).or_insert_with(|| ErrorGroup {
            model: key.0,
            provider: key.1,
            deployment: key.2,
            total: 0,
            errors: 0,
            error_rate: 0.0,
            classes: BTreeMap::new(),
        });
        group.total += count;
        if let Some(class) = class {
            group.errors += count;
            *group.classes.entry(class).or_default() += count;
        }
    }
    let mut groups: Vec<ErrorGroup> = groups
        .into_values()
        .map(|mut g| {
            g.error_rate = rate(g.errors, g.total);
            g
        })
        .collect();
    groups.sort_by(|a, b| b.errors.cmp(&a.errors).then(b.total.cmp(&a.total)));
    Ok(groups)
}
