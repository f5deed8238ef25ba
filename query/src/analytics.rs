//! Analytics over the read models: totals with the previous window's, series in a time zone,
//! breakdowns, the top requests, errors, alerts and recent activity — for one tenant, or for all
//! of them (the operator).
//!
//! Everything is computed from the `traces` table (one row per request; the upstream attempts
//! and tool calls joined where asked), so every filter works and counts and sums are exact.
//! Latency and TTFT percentiles come from a histogram the database fills in the same pass, with
//! log-spaced buckets ([`Histogram`]): an estimate is within one bucket of the exact value, that
//! is within 9.1 % of it (or 0.1 ms below 0.1 ms). A request counts once it completed
//! (`request.completed`); its time is when it arrived.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::LazyLock;

use chrono::{DateTime, Datelike, Duration, NaiveDate, NaiveDateTime, TimeZone, Timelike, Utc};
use chrono_tz::Tz;
use loom_projector::{Lookup, StoreError, StoreLocation};
use serde::Serialize;
use serde_json::{Map, Value};
use sqlx::any::AnyRow;
use sqlx::{AssertSqlSafe, Row};
use utoipa::ToSchema;

use crate::archive::Scope;

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

// ---- histograms ------------------------------------------------------------------------------

/// Buckets per doubling of the value: each bucket's upper bound is 2^(1/8) ≈ 1.0905 times its
/// lower one.
const PER_DOUBLING: f64 = 8.0;
/// The upper bound of the first bucket, in µs (it holds everything from 0).
const FIRST_BOUND_US: f64 = 100.0;
/// How many bounds: the last is 100 µs · 2^25 ≈ 56 minutes; above it is one overflow bucket.
const BOUNDS: usize = 201;

/// The buckets' upper bounds (inclusive), in µs.
static BOUND_US: LazyLock<Vec<i64>> = LazyLock::new(|| {
    (0..BOUNDS)
        .map(|i| (FIRST_BOUND_US * 2f64.powf(i as f64 / PER_DOUBLING)).round() as i64)
        .collect()
});

/// The bucket of `column` as SQL: a binary search over the bounds (8 comparisons a row), the
/// same on Postgres and SQLite (which has no logarithm); -1 when the column is NULL.
fn bucket_sql(column: &str) -> String {
    fn search(sql: &mut String, column: &str, lo: usize, hi: usize) {
        if lo == hi {
            let _ = write!(sql, "{lo}");
            return;
        }
        let mid = (lo + hi) / 2;
        let _ = write!(sql, "CASE WHEN {column} <= {} THEN ", BOUND_US[mid]);
        search(sql, column, lo, mid);
        sql.push_str(" ELSE ");
        search(sql, column, mid + 1, hi);
        sql.push_str(" END");
    }
    let mut sql = format!("CAST(CASE WHEN {column} IS NULL THEN -1 ELSE ");
    search(&mut sql, column, 0, BOUNDS);
    sql.push_str(" END AS BIGINT)");
    sql
}

static LATENCY_BUCKET: LazyLock<String> = LazyLock::new(|| bucket_sql("t.latency_us"));
static TTFT_BUCKET: LazyLock<String> = LazyLock::new(|| bucket_sql("t.ttft_us"));

/// Counts of values by bucket, with the smallest and largest value seen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Histogram {
    counts: BTreeMap<usize, u64>,
    min: Option<i64>,
    max: Option<i64>,
}

impl Histogram {
    fn add(&mut self, bucket: i64, count: i64, min: Option<i64>, max: Option<i64>) {
        let (Ok(bucket), Ok(count)) = (usize::try_from(bucket), u64::try_from(count)) else {
            return;
        };
        *self.counts.entry(bucket).or_default() += count;
        self.min = min.into_iter().chain(self.min).min();
        self.max = max.into_iter().chain(self.max).max();
    }

    fn merge(&mut self, other: &Histogram) {
        for (&bucket, &count) in &other.counts {
            *self.counts.entry(bucket).or_default() += count;
        }
        self.min = other.min.into_iter().chain(self.min).min();
        self.max = other.max.into_iter().chain(self.max).max();
    }

    pub fn count(&self) -> u64 {
        self.counts.values().sum()
    }

    /// The `q`-quantile (nearest rank: the value at rank ⌈q·n⌉), estimated by interpolating
    /// within its bucket and kept within the smallest and largest value seen.
    pub fn quantile(&self, q: f64) -> Option<i64> {
        let n = self.count();
        if n == 0 {
            return None;
        }
        let rank = ((q * n as f64).ceil() as u64).clamp(1, n);
        let mut below = 0;
        for (&bucket, &count) in &self.counts {
            if below + count >= rank {
                let lo = bucket.checked_sub(1).map_or(0, |i| BOUND_US[i]);
                let hi = BOUND_US
                    .get(bucket)
                    .copied()
                    .unwrap_or(self.max.unwrap_or(lo));
                let within = (rank - below) as f64 / count as f64;
                let estimate = (lo as f64 + (hi - lo) as f64 * within).round() as i64;
                let estimate = self.min.map_or(estimate, |min| estimate.max(min));
                return Some(self.max.map_or(estimate, |max| estimate.min(max)));
            }
            below += count;
        }
        self.max
    }
}

/// How far a percentile from a [`Histogram`] may be from the exact one: one bucket.
pub fn percentile_error_bound_us(exact_us: i64) -> i64 {
    let ratio = 2f64.powf(1.0 / PER_DOUBLING) - 1.0;
    ((exact_us as f64 * ratio).ceil() as i64).max(FIRST_BOUND_US as i64) + 1
}

// ---- what a question is about ----------------------------------------------------------------

/// A time range, `[from, to)`, in µs since the epoch (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from_us: i64,
    pub to_us: i64,
}

/// The longest window a question may span.
const MAX_WINDOW_US: i64 = 400 * 86_400_000_000;

impl Window {
    /// The window `from`/`to` or `window` name (default: the last 24 hours before `now_us`).
    /// `from` and `to` are RFC 3339 times, dates (midnight in `tz`) or Unix seconds; `window` is
    /// a length such as `15m`, `1h`, `24h`, `7d`, `30d` ending at `to` (default now).
    pub fn parse(
        from: Option<&str>,
        to: Option<&str>,
        window: Option<&str>,
        now_us: i64,
        tz: Tz,
    ) -> Result<Window, AnalyticsError> {
        let to_us = match to {
            Some(to) => parse_time(to, tz, "to")?,
            None => now_us,
        };
        let from_us = match (from, window) {
            (Some(_), Some(_)) => {
                return Err(AnalyticsError::invalid(
                    "give either `from` (and `to`) or `window`, not both",
                ));
            }
            (Some(from), None) => parse_time(from, tz, "from")?,
            (None, Some(window)) => to_us - parse_length(window)?,
            (None, None) => to_us - 86_400_000_000,
        };
        if from_us >= to_us {
            return Err(AnalyticsError::invalid("`from` must be before `to`"));
        }
        if to_us - from_us > MAX_WINDOW_US {
            return Err(AnalyticsError::invalid(
                "a window spans at most 400 days; for longer, use /v1/sql over the archive",
            ));
        }
        Ok(Window { from_us, to_us })
    }

    pub fn len_us(&self) -> i64 {
        self.to_us - self.from_us
    }

    /// The window of the same length just before this one.
    pub fn previous(&self) -> Window {
        Window {
            from_us: self.from_us - self.len_us(),
            to_us: self.from_us,
        }
    }
}

fn parse_time(text: &str, tz: Tz, name: &str) -> Result<i64, AnalyticsError> {
    let text = text.trim();
    if let Ok(at) = DateTime::parse_from_rfc3339(text) {
        return Ok(at.timestamp_micros());
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return local_start(tz, date.and_time(chrono::NaiveTime::MIN))
            .ok_or_else(|| AnalyticsError::invalid(format!("`{name}`: no such day in {tz}")));
    }
    if let Ok(seconds) = text.parse::<i64>()
        && let Some(micros) = seconds.checked_mul(1_000_000)
    {
        return Ok(micros);
    }
    Err(AnalyticsError::invalid(format!(
        "`{name}` must be an RFC 3339 time (2026-12-04T09:00:00Z), a date (2026-12-04) or Unix \
         seconds; got {text:?}"
    )))
}

/// `15m`, `1h`, `24h`, `7d`, `2w` in µs.
fn parse_length(text: &str) -> Result<i64, AnalyticsError> {
    let bad = || {
        AnalyticsError::invalid(format!(
            "`window` must be a number and a unit, such as 15m, 1h, 24h, 7d or 30d; got {text:?}"
        ))
    };
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
    let (number, unit) = text.split_at(split);
    let number: i64 = number.parse().map_err(|_| bad())?;
    let unit_us: i64 = match unit {
        "m" => 60_000_000,
        "h" => 3_600_000_000,
        "d" => 86_400_000_000,
        "w" => 7 * 86_400_000_000,
        _ => return Err(bad()),
    };
    match number.checked_mul(unit_us) {
        Some(length) if length > 0 => Ok(length),
        _ => Err(bad()),
    }
}

/// The instant a local time in `tz` names (its first, if the clock went back; the first after
/// the gap, if the clock jumped over it).
fn local_start(tz: Tz, local: NaiveDateTime) -> Option<i64> {
    (0..4)
        .find_map(|hours| {
            tz.from_local_datetime(&(local + Duration::minutes(30 * hours)))
                .earliest()
        })
        .map(|at| at.timestamp_micros())
}

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
}

impl Dimension {
    pub const NAMES: [&str; 9] = [
        "model",
        "provider",
        "deployment",
        "project",
        "user",
        "key",
        "error_class",
        "status",
        "tenant",
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
        }
    }
}

/// Calendar units a series is bucketed by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Minute,
    Hour,
    Day,
    Week,
    Month,
}

/// The most buckets a series may have.
pub const MAX_BUCKETS: usize = 2_000;

impl Unit {
    /// `minute`, `hour`, `day`, `week`, `month`, or `auto` (by the window's length: minutes up
    /// to 3 hours, hours up to 3 days, days beyond).
    pub fn parse(name: &str, window: Window) -> Option<Unit> {
        Some(match name {
            "auto" => match window.len_us() {
                len if len <= 3 * 3_600_000_000 => Unit::Minute,
                len if len <= 3 * 86_400_000_000 => Unit::Hour,
                _ => Unit::Day,
            },
            "minute" => Unit::Minute,
            "hour" => Unit::Hour,
            "day" => Unit::Day,
            "week" => Unit::Week,
            "month" => Unit::Month,
            _ => return None,
        })
    }

    /// The start of the bucket holding `local`, in local time.
    fn truncate(self, local: NaiveDateTime) -> NaiveDateTime {
        let date = local.date();
        let day = date.and_time(chrono::NaiveTime::MIN);
        match self {
            Unit::Minute => day + Duration::minutes(i64::from(local.hour() * 60 + local.minute())),
            Unit::Hour => day + Duration::hours(i64::from(local.hour())),
            Unit::Day => day,
            Unit::Week => day - Duration::days(i64::from(date.weekday().num_days_from_monday())),
            Unit::Month => date
                .with_day(1)
                .unwrap_or(date)
                .and_time(chrono::NaiveTime::MIN),
        }
    }

    /// The start of the next bucket after the one starting at `local`.
    fn next(self, local: NaiveDateTime) -> NaiveDateTime {
        match self {
            Unit::Minute => local + Duration::minutes(1),
            Unit::Hour => local + Duration::hours(1),
            Unit::Day => local + Duration::days(1),
            Unit::Week => local + Duration::days(7),
            Unit::Month => local
                .checked_add_months(chrono::Months::new(1))
                .unwrap_or(local + Duration::days(31)),
        }
    }
}

/// The starts of the buckets of `unit` in `tz` that cover `window` (the first at or before its
/// start), in µs. Minutes and hours follow the clock in UTC steps, so the hour a clock repeats
/// is two buckets; days, weeks and months follow the calendar, so a day may last 23 or 25 hours.
pub fn bucket_starts(window: Window, unit: Unit, tz: Tz) -> Result<Vec<i64>, AnalyticsError> {
    let too_many = || {
        AnalyticsError::invalid(format!(
            "more than {MAX_BUCKETS} buckets: choose a coarser `bucket` or a shorter window"
        ))
    };
    let first_utc = DateTime::from_timestamp_micros(window.from_us)
        .ok_or_else(|| AnalyticsError::invalid("`from` is out of range"))?;
    let first_local = unit.truncate(first_utc.with_timezone(&tz).naive_local());
    let mut starts = Vec::new();
    match unit {
        Unit::Minute | Unit::Hour => {
            let step = if unit == Unit::Minute {
                60_000_000
            } else {
                3_600_000_000
            };
            let mut at = local_start(tz, first_local).unwrap_or(window.from_us);
            at = at.min(window.from_us);
            while at < window.to_us {
                if starts.len() == MAX_BUCKETS {
                    return Err(too_many());
                }
                starts.push(at);
                at += step;
            }
        }
        Unit::Day | Unit::Week | Unit::Month => {
            let mut local = first_local;
            loop {
                let Some(at) = local_start(tz, local) else {
                    local = unit.next(local);
                    continue;
                };
                if at >= window.to_us {
                    break;
                }
                if starts.len() == MAX_BUCKETS {
                    return Err(too_many());
                }
                starts.push(at);
                local = unit.next(local);
            }
        }
    }
    Ok(starts)
}

/// The widest time slot (in µs) every start in `starts` falls on, so that no slot straddles two
/// buckets: the database sums requests by slot, and slots fold into buckets.
fn slot_us(starts: &[i64]) -> i64 {
    [
        86_400_000_000,
        3_600_000_000,
        900_000_000,
        60_000_000,
        1_000_000,
    ]
    .into_iter()
    .find(|slot| starts.iter().all(|s| s.rem_euclid(*slot) == 0))
    .unwrap_or(1)
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

/// An RFC 3339 time in µs.
pub(crate) fn parse_rfc3339(text: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.timestamp_micros())
}

/// A time in µs as RFC 3339 (UTC).
pub fn rfc3339(us: i64) -> String {
    DateTime::from_timestamp_micros(us)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// A time in µs as RFC 3339 in `tz`.
pub fn rfc3339_in(us: i64, tz: Tz) -> String {
    DateTime::from_timestamp_micros(us)
        .unwrap_or_default()
        .with_timezone(&tz)
        .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

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

/// Something an operator should look at.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Alert {
    /// `error_rate_spike`, `upstream_failing`, `quota_near_limit` or `policy_blocks`.
    pub kind: &'static str,
    /// `warning` or `critical`.
    pub severity: &'static str,
    pub title: String,
    /// The tenant, deployment, or quota scope it is about.
    pub subject: String,
    /// The measured value (a rate, a fraction of the limit, or a count) and its threshold.
    pub value: f64,
    pub threshold: f64,
    /// The start of the time it was measured over (RFC 3339).
    pub since: String,
}

/// Thresholds of the alerts (docs/query.md).
pub mod thresholds {
    /// The recent window error spikes and failing upstreams are judged over.
    pub const RECENT_US: i64 = 15 * 60_000_000;
    /// The baseline a spike is judged against: the day before the recent window.
    pub const BASELINE_US: i64 = 86_400_000_000;
    /// Fewest requests (or upstream attempts) in the recent window for a rate to count.
    pub const MIN_REQUESTS: i64 = 20;
    pub const MIN_CALLS: i64 = 5;
    /// An error-rate spike: at least this rate, and twice the baseline's.
    pub const SPIKE_RATE: f64 = 0.05;
    pub const SPIKE_CRITICAL: f64 = 0.25;
    /// A failing upstream: this share of its attempts failed.
    pub const UPSTREAM_WARNING: f64 = 0.2;
    pub const UPSTREAM_CRITICAL: f64 = 0.5;
    /// A quota near its limit: this share of it used in the current window.
    pub const QUOTA_WARNING: f64 = 0.8;
    /// Policy blocks are reported over the last day.
    pub const POLICY_US: i64 = 86_400_000_000;
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
    fn sql(self) -> String {
        match self {
            Group::Split(at) => {
                format!("CASE WHEN t.started_at >= {at} THEN 'current' ELSE 'previous' END")
            }
            Group::Slot(us) => format!("CAST(t.started_at / {us} AS TEXT)"),
            Group::By(dimension) => dimension.column().into(),
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

    /// Stats per group of the requests `question` is about (completed ones).
    async fn stats(
        &self,
        question: &Question,
        window: Window,
        group: Group,
        needs: Needs,
    ) -> Result<BTreeMap<Option<String>, Stats>, AnalyticsError> {
        let store = self.reads.store().await?;
        let mut groups: BTreeMap<Option<String>, Stats> = BTreeMap::new();
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
        for row in sql.fetch(&store).await? {
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
            for row in sql.fetch(&store).await? {
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
            for row in sql.fetch(&store).await? {
                let stats = groups.entry(row.try_get(0)?).or_default();
                let value: i64 = row.try_get(1)?;
                if table == "llm_calls" {
                    stats.cache_saved_micro_usd += value;
                } else {
                    stats.tool_calls += value;
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

    /// What needs a look at `now_us`: error-rate spikes, failing upstreams, quotas near their
    /// limit and policy blocks (thresholds in [`thresholds`]).
    pub async fn alerts(&self, scope: Scope, now_us: i64) -> Result<Vec<Alert>, AnalyticsError> {
        use thresholds::*;
        let store = self.reads.store().await?;
        let recent = Window {
            from_us: now_us - RECENT_US,
            to_us: now_us,
        };
        let mut alerts = Vec::new();

        // Error-rate spikes, per tenant: the last 15 minutes against the day before.
        let question = Question {
            scope,
            window: Window {
                from_us: recent.from_us - BASELINE_US,
                to_us: now_us,
            },
            filters: Filters::default(),
        };
        let mut sql = Sql::new();
        let filter = sql.filter(scope, question.window, &question.filters);
        sql.text = format!(
            "SELECT t.tenant_id, CASE WHEN t.started_at >= {} THEN 1 ELSE 0 END, COUNT(*), \
                    CAST(SUM(CASE WHEN t.status = 'ok' THEN 0 ELSE 1 END) AS BIGINT) \
             FROM traces t WHERE {filter} AND t.status IS NOT NULL GROUP BY 1, 2",
            recent.from_us
        );
        let mut by_tenant: BTreeMap<String, [(i64, i64); 2]> = BTreeMap::new();
        for row in sql.fetch(&store).await? {
            let recent: i64 = row.try_get(1)?;
            let entry = by_tenant.entry(row.try_get(0)?).or_default();
            entry[usize::from(recent == 1)] = (row.try_get(2)?, row.try_get(3)?);
        }
        for (tenant, [(base_n, base_errors), (n, errors)]) in by_tenant {
            let (now, base) = (rate(errors, n), rate(base_errors, base_n));
            if n >= MIN_REQUESTS && now >= SPIKE_RATE && now >= 2.0 * base {
                alerts.push(Alert {
                    kind: "error_rate_spike",
                    severity: if now >= SPIKE_CRITICAL {
                        "critical"
                    } else {
                        "warning"
                    },
                    title: format!(
                        "{:.0}% of requests failed in the last 15 minutes (the day before: {:.1}%)",
                        now * 100.0,
                        base * 100.0
                    ),
                    subject: tenant,
                    value: now,
                    threshold: SPIKE_RATE.max(2.0 * base),
                    since: rfc3339(recent.from_us),
                });
            }
        }

        // Failing upstreams: deployments whose recent attempts mostly fail.
        let mut sql = Sql::new();
        let mut filter = format!(
            "c.started_at >= {} AND c.started_at < {}",
            recent.from_us, recent.to_us
        );
        if let Scope::Tenant(tenant) = scope {
            let _ = write!(
                filter,
                " AND c.tenant_id = {}",
                sql.bind(&tenant.to_string())
            );
        }
        sql.text = format!(
            "SELECT c.deployment, COUNT(*), \
                    CAST(SUM(CASE WHEN c.status = 'ok' THEN 0 ELSE 1 END) AS BIGINT) \
             FROM llm_calls c WHERE {filter} GROUP BY 1"
        );
        for row in sql.fetch(&store).await? {
            let (deployment, n, errors): (String, i64, i64) =
                (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
            let failing = rate(errors, n);
            if n >= MIN_CALLS && failing >= UPSTREAM_WARNING {
                alerts.push(Alert {
                    kind: "upstream_failing",
                    severity: if failing >= UPSTREAM_CRITICAL {
                        "critical"
                    } else {
                        "warning"
                    },
                    title: format!(
                        "{errors} of {n} calls to {deployment} failed in the last 15 minutes"
                    ),
                    subject: deployment,
                    value: failing,
                    threshold: UPSTREAM_WARNING,
                    since: rfc3339(recent.from_us),
                });
            }
        }

        alerts.extend(self.quota_alerts(&store, scope, now_us).await?);

        // Policy blocks over the last day.
        let day = Window {
            from_us: now_us - POLICY_US,
            to_us: now_us,
        };
        let mut sql = Sql::new();
        let filter = sql.filter(scope, day, &Filters::default());
        sql.text = format!(
            "SELECT t.tenant_id, COUNT(*) FROM traces t \
             WHERE {filter} AND t.policy_action = 'block' GROUP BY 1"
        );
        for row in sql.fetch(&store).await? {
            let (tenant, blocks): (String, i64) = (row.try_get(0)?, row.try_get(1)?);
            alerts.push(Alert {
                kind: "policy_blocks",
                severity: "warning",
                title: format!("the prompt policy blocked {blocks} requests in the last day"),
                subject: tenant,
                value: blocks as f64,
                threshold: 1.0,
                since: rfc3339(day.from_us),
            });
        }
        alerts.sort_by_key(|a| (a.severity != "critical", a.kind));
        Ok(alerts)
    }

    /// Quotas with a limit whose current window (UTC) has used 80 % of it or more.
    async fn quota_alerts(
        &self,
        store: &loom_projector::ReadStore,
        scope: Scope,
        now_us: i64,
    ) -> Result<Vec<Alert>, AnalyticsError> {
        let mut sql = Sql::new();
        sql.text = "SELECT tenant_id, scope, scope_id, metric, quota_window, limit_value \
                    FROM quota_limits WHERE limit_value IS NOT NULL AND limit_value > 0"
            .into();
        if let Scope::Tenant(tenant) = scope {
            let tenant = sql.bind(&tenant.to_string());
            let _ = write!(sql.text, " AND tenant_id = {tenant}");
        }
        let limits = sql.fetch(store).await?;
        let mut alerts = Vec::new();
        for row in limits {
            let (tenant, quota_scope, scope_id, metric, window, limit): (
                String,
                String,
                String,
                String,
                String,
                i64,
            ) = (
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
                row.try_get(4)?,
                row.try_get(5)?,
            );
            let Some(from_us) = window_start(&window, now_us) else {
                continue;
            };
            let column = match quota_scope.as_str() {
                "tenant" => "t.tenant_id",
                "project" => "t.project_id",
                "api_key" => "t.api_key_id",
                _ => continue,
            };
            let value = match metric.as_str() {
                "requests" => "COUNT(*)",
                "tokens" => "SUM(COALESCE(t.tokens_in, 0) + COALESCE(t.tokens_out, 0))",
                "cost_micro_usd" => "SUM(COALESCE(t.cost_micro_usd, 0))",
                _ => continue,
            };
            let mut sql = Sql::new();
            let tenant_bind = sql.bind(&tenant);
            let id = sql.bind(&scope_id);
            sql.text = format!(
                "SELECT CAST(COALESCE({value}, 0) AS BIGINT) FROM traces t \
                 WHERE t.tenant_id = {tenant_bind} AND {column} = {id} \
                 AND t.started_at >= {from_us} AND t.started_at < {}",
                now_us + 1
            );
            let used: i64 = match sql.fetch(store).await?.first() {
                Some(row) => row.try_get(0)?,
                None => 0,
            };
            let share = rate(used, limit);
            if share >= thresholds::QUOTA_WARNING {
                alerts.push(Alert {
                    kind: "quota_near_limit",
                    severity: if share >= 1.0 { "critical" } else { "warning" },
                    title: format!(
                        "{quota_scope} {scope_id} used {:.0}% of its {metric} per {window} \
                         ({used} of {limit})",
                        share * 100.0
                    ),
                    subject: format!("{quota_scope}:{scope_id}"),
                    value: share,
                    threshold: thresholds::QUOTA_WARNING,
                    since: rfc3339(from_us),
                });
            }
        }
        Ok(alerts)
    }
}

/// The start (UTC) of the quota window `name` holding `now_us`.
fn window_start(name: &str, now_us: i64) -> Option<i64> {
    let now = DateTime::from_timestamp_micros(now_us)?;
    let unit = match name {
        "minute" => Unit::Minute,
        "hour" => Unit::Hour,
        "day" => Unit::Day,
        "month" => Unit::Month,
        _ => return None,
    };
    Some(
        Utc.from_utc_datetime(&unit.truncate(now.naive_utc()))
            .timestamp_micros(),
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_percentile_is_within_one_bucket_of_the_exact_one() {
        let mut rng = fastrand::Rng::with_seed(7);
        let values: Vec<i64> = (0..5_000).map(|_| rng.i64(20..90_000_000)).collect();
        let mut sorted = values.clone();
        sorted.sort_unstable();
        let mut histogram = Histogram::default();
        for v in &values {
            let bucket = BOUND_US.partition_point(|b| b < v) as i64;
            histogram.add(bucket, 1, Some(*v), Some(*v));
        }
        for q in [0.01, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0] {
            let rank = ((q * sorted.len() as f64).ceil() as usize).max(1);
            let exact = sorted[rank - 1];
            let estimate = histogram.quantile(q).unwrap();
            assert!(
                (estimate - exact).abs() <= percentile_error_bound_us(exact),
                "q={q}: {estimate} vs {exact}"
            );
        }
        assert_eq!(histogram.quantile(1.0), sorted.last().copied());
    }

    #[test]
    fn buckets_follow_the_zone_and_its_daylight_saving_changes() {
        let tz: Tz = "America/New_York".parse().unwrap();
        let utc = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().timestamp_micros();
        // 2026-11-01: the clocks go back an hour at 02:00 local, so that day lasts 25 hours.
        let window = Window {
            from_us: utc("2026-10-31T12:00:00Z"),
            to_us: utc("2026-11-03T00:00:00Z"),
        };
        let starts = bucket_starts(window, Unit::Day, tz).unwrap();
        let local: Vec<String> = starts.iter().map(|&s| rfc3339_in(s, tz)).collect();
        assert_eq!(
            local,
            [
                "2026-10-31T00:00:00-04:00",
                "2026-11-01T00:00:00-04:00",
                "2026-11-02T00:00:00-05:00"
            ]
        );
        assert_eq!(starts[2] - starts[1], 25 * 3_600_000_000);
        // Hours in a half-hour zone start at half past in UTC.
        let kolkata: Tz = "Asia/Kolkata".parse().unwrap();
        let hours = bucket_starts(
            Window {
                from_us: utc("2026-12-04T10:10:00Z"),
                to_us: utc("2026-12-04T12:00:00Z"),
            },
            Unit::Hour,
            kolkata,
        )
        .unwrap();
        assert_eq!(rfc3339(hours[0]), "2026-12-04T09:30:00Z");
        assert_eq!(slot_us(&hours), 900_000_000);
        assert_eq!(slot_us(&starts), 3_600_000_000);
    }

    #[test]
    fn windows_parse_from_names_dates_and_times() {
        let now = 1_800_000_000_000_000;
        let w = Window::parse(None, None, Some("7d"), now, Tz::UTC).unwrap();
        assert_eq!(w.len_us(), 7 * 86_400_000_000);
        let tz: Tz = "Europe/Berlin".parse().unwrap();
        let w = Window::parse(Some("2026-12-01"), Some("2026-12-02"), None, now, tz);
        assert_eq!(
            w.map(|w| (rfc3339(w.from_us), rfc3339(w.to_us))).ok(),
            Some(("2026-11-30T23:00:00Z".into(), "2026-12-01T23:00:00Z".into()))
        );
        for bad in [
            (Some("yesterday"), None, None),
            (None, None, Some("7x")),
            (Some("2026-12-02"), Some("2026-12-01"), None),
            (Some("2026-12-01"), None, Some("1h")),
        ] {
            assert!(matches!(
                Window::parse(bad.0, bad.1, bad.2, now, tz),
                Err(AnalyticsError::Invalid(_))
            ));
        }
    }

    #[test]
    fn the_bucket_sql_is_a_binary_search_over_the_bounds() {
        let sql = bucket_sql("x");
        assert_eq!(sql.matches("CASE WHEN x <=").count(), BOUNDS);
        assert!(sql.starts_with("CAST(CASE WHEN x IS NULL THEN -1"));
    }
}
