//! The analytics routes: `/v1/analytics/*`, `/v1/alerts` and `/v1/activity`, answered from the
//! read models for the caller's tenant (every tenant's for the operator).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use chrono_tz::Tz;
use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::{IntoParams, ToSchema};

use super::{Principal, QueryState, error};
use crate::analytics::{
    Alert, Analytics, AnalyticsError, Compared, Dimension, ErrorReport, Filters, Question,
    RequestRow, Stats, TopBy, Unit, Window, compare, parse_metrics, rfc3339, rfc3339_in, select,
};
use crate::archive::Scope;

/// The time range of a question.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Describes the query string, which `Params` reads.
pub(super) struct Range {
    /// Start (inclusive): RFC 3339, a date (midnight in `tz`) or Unix seconds.
    from: Option<String>,
    /// End (exclusive), as `from`; default now.
    to: Option<String>,
    /// A length ending at `to` instead of `from`: `15m`, `1h`, `24h` (the default), `7d`, `30d`.
    window: Option<String>,
    /// IANA time zone (`Europe/Berlin`) for dates and buckets; default UTC.
    tz: Option<String>,
}

/// Which requests a question is about; every filter given must match.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct Filter {
    /// Project id.
    project: Option<String>,
    /// The end user (OpenAI's `user` field, or `x-loom-user`).
    user: Option<String>,
    /// API key id.
    key: Option<String>,
    /// The model served (or asked for, when none was).
    model: Option<String>,
    provider: Option<String>,
    deployment: Option<String>,
    /// `ok`, `error`, `denied`, `client_cancelled`, or `failed` (anything but `ok`).
    status: Option<String>,
    /// One tenant's requests (the operator).
    tenant: Option<String>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct SeriesParams {
    /// Comma-separated metric names (default: all); see the `Metrics` schema.
    metric: Option<String>,
    /// `auto` (the default), `minute`, `hour`, `day`, `week` or `month`, in `tz`.
    bucket: Option<String>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct BreakdownParams {
    /// `model`, `provider`, `deployment`, `project`, `user`, `key`, `error_class`, `status`,
    /// `tier`, `tenant`, or `day` (days in `tz`).
    by: Option<String>,
    /// Comma-separated metric names (default: all).
    metric: Option<String>,
    /// Most groups to return (default 50, at most 1000), the most requested first.
    limit: Option<String>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct TopParams {
    /// `cost` (the default), `latency` or `tokens`.
    by: Option<String>,
    /// How many requests (default 10, at most 100).
    limit: Option<String>,
}

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub(super) struct LimitParam {
    /// How many requests (default 20, at most 100).
    limit: Option<String>,
}

/// The parameters of `GET /v1/analytics`, as earlier dashboards send them.
#[derive(IntoParams)]
#[into_params(parameter_in = Query, rename_all = "camelCase")]
#[allow(dead_code)]
pub(super) struct LegacyParams {
    /// `day` (the default), `week` or `month`.
    group_by: Option<String>,
    project_id: Option<String>,
    user_id: Option<String>,
    /// A date or RFC 3339 time; default 30 days before `endDate`.
    start_date: Option<String>,
    /// A date (the whole day counts) or RFC 3339 time; default now.
    end_date: Option<String>,
    /// IANA time zone; default UTC.
    tz: Option<String>,
}

/// The query string, checked against the parameters an endpoint documents.
pub(super) struct Params(BTreeMap<String, String>);

impl Params {
    /// Refuses names the endpoint does not take (a typo must not widen the question) and
    /// repeated ones.
    fn parse(
        uri: &Uri,
        documented: &[Vec<utoipa::openapi::path::Parameter>],
    ) -> Result<Params, AnalyticsError> {
        let pairs: Vec<(String, String)> = match axum::extract::Query::try_from_uri(uri) {
            Ok(axum::extract::Query(pairs)) => pairs,
            Err(e) => {
                return Err(AnalyticsError::Invalid(format!(
                    "the query string: {}",
                    e.body_text()
                )));
            }
        };
        let known: Vec<&str> = documented
            .iter()
            .flatten()
            .map(|p| p.name.as_str())
            .collect();
        let mut params = BTreeMap::new();
        for (name, value) in pairs {
            if !known.contains(&name.as_str()) {
                return Err(AnalyticsError::Invalid(format!(
                    "unknown parameter {name:?}; this endpoint takes {}",
                    known.join(", ")
                )));
            }
            if params.insert(name.clone(), value).is_some() {
                return Err(AnalyticsError::Invalid(format!(
                    "parameter {name:?} is given twice"
                )));
            }
        }
        Ok(Params(params))
    }

    /// Narrows every question to `project` (a key bound to it), whatever the caller asked.
    fn pin_project(&mut self, project: uuid::Uuid) {
        for name in ["project", "projectId"] {
            self.0.insert(name.to_owned(), project.to_string());
        }
    }

    pub(super) fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }

    pub(super) fn tz(&self) -> Result<Tz, AnalyticsError> {
        match self.get("tz") {
            None => Ok(Tz::UTC),
            Some(name) => name.parse().map_err(|_| {
                AnalyticsError::Invalid(format!(
                    "unknown time zone {name:?}: use an IANA name such as Europe/Berlin or UTC"
                ))
            }),
        }
    }

    pub(super) fn limit(&self, default: usize, max: usize) -> Result<usize, AnalyticsError> {
        match self.get("limit") {
            None => Ok(default),
            Some(text) => match text.parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ => Err(AnalyticsError::Invalid(format!(
                    "`limit` must be a number from 1 to {max}; got {text:?}"
                ))),
            },
        }
    }

    /// The question these parameters ask, for `scope`.
    pub(super) fn question(&self, scope: Scope) -> Result<(Question, Tz), AnalyticsError> {
        let tz = self.tz()?;
        let window = Window::parse(
            self.get("from"),
            self.get("to"),
            self.get("window"),
            now_us(),
            tz,
        )?;
        let filters = Filters {
            project: self.get("project").map(str::to_owned),
            user: self.get("user").map(str::to_owned),
            key: self.get("key").map(str::to_owned),
            model: self.get("model").map(str::to_owned),
            provider: self.get("provider").map(str::to_owned),
            deployment: self.get("deployment").map(str::to_owned),
            status: self.get("status").map(str::to_owned),
            tenant: self.get("tenant").map(str::to_owned),
        };
        filters.validate()?;
        Ok((
            Question {
                scope,
                window,
                filters,
            },
            tz,
        ))
    }
}

pub(super) fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

fn invalid(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request", message)
}

pub(super) fn failed(e: AnalyticsError) -> Response {
    match e {
        AnalyticsError::Invalid(message) => invalid(&message),
        AnalyticsError::NotFound(message) => error(StatusCode::NOT_FOUND, "not_found", &message),
        AnalyticsError::Unavailable(message) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "read_models_unavailable",
            message,
        ),
        e => {
            // What failed inside is for the operator's log.
            tracing::error!(error = %e, "an analytics query failed");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "read_models_unavailable",
                "the read models could not be read; the server's log has the details",
            )
        }
    }
}

/// Runs `answer` for an authenticated caller with the parameters `documented` allows.
pub(super) async fn answer<F, Fut, T>(
    state: QueryState,
    headers: HeaderMap,
    uri: Uri,
    documented: Vec<Vec<utoipa::openapi::path::Parameter>>,
    answer: F,
) -> Response
where
    F: FnOnce(QueryState, Principal, Params) -> Fut,
    Fut: Future<Output = Result<T, AnalyticsError>>,
    T: Serialize,
{
    let Some(principal) = state.auth.authenticate(&headers) else {
        return error(
            StatusCode::UNAUTHORIZED,
            "invalid_api_key",
            "missing or invalid API key",
        );
    };
    let mut params = match Params::parse(&uri, &documented) {
        Ok(params) => params,
        Err(e) => return failed(e),
    };
    if let Some(project) = principal.project {
        params.pin_project(project);
    }
    match answer(state, principal, params).await {
        Ok(body) => Json(body).into_response(),
        Err(e) => failed(e),
    }
}

pub(super) fn documented<P: IntoParams>() -> Vec<utoipa::openapi::path::Parameter> {
    P::into_params(|| Some(utoipa::openapi::path::ParameterIn::Query))
}

/// Every metric of the window next to the previous window of the same length.
#[derive(Serialize, ToSchema)]
pub(super) struct Summary {
    from: String,
    to: String,
    /// The start of the previous window (it ends at `from`).
    previous_from: String,
    metrics: BTreeMap<String, Compared>,
}

#[utoipa::path(
    get,
    path = "/v1/analytics/summary",
    params(Range, Filter),
    responses(
        (status = 200, body = Summary),
        (status = 400, description = "A bad parameter", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn summary(
    State(state): State<QueryState>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let params = vec![documented::<Range>(), documented::<Filter>()];
    answer(
        state,
        headers,
        uri,
        params,
        |state, principal, params| async move {
            let (analytics, scope) = (state.analytics()?, principal.scope);
            let (question, _) = params.question(scope)?;
            let (current, previous) = analytics.summary(&question).await?;
            Ok(Summary {
                from: rfc3339(question.window.from_us),
                to: rfc3339(question.window.to_us),
                previous_from: rfc3339(question.window.previous().from_us),
                metrics: compare(&current.metrics(), &previous.metrics()),
            })
        },
    )
    .await
}

/// Metrics per time bucket, every bucket of the window.
#[derive(Serialize, ToSchema)]
pub(super) struct Series {
    from: String,
    to: String,
    bucket: Unit,
    tz: String,
    points: Vec<Point>,
}

/// A bucket: its start in the requested zone, and the metrics asked for.
#[derive(Serialize, ToSchema)]
pub(super) struct Point {
    start: String,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    values: Map<String, Value>,
}

#[utoipa::path(
    get,
    path = "/v1/analytics/timeseries",
    params(Range, Filter, SeriesParams),
    responses(
        (status = 200, body = Series),
        (status = 400, description = "A bad parameter", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn timeseries(
    State(state): State<QueryState>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let params = vec![
        documented::<Range>(),
        documented::<Filter>(),
        documented::<SeriesParams>(),
    ];
    answer(
        state,
        headers,
        uri,
        params,
        |state, principal, params| async move {
            let (analytics, scope) = (state.analytics()?, principal.scope);
            let (question, tz) = params.question(scope)?;
            let metrics = parse_metrics(params.get("metric"))?;
            let unit = unit(params.get("bucket").unwrap_or("auto"), question.window)?;
            let points = analytics.series(&question, unit, tz, &metrics).await?;
            Ok(Series {
                from: rfc3339(question.window.from_us),
                to: rfc3339(question.window.to_us),
                bucket: unit,
                tz: tz.name().to_owned(),
                points: points
                    .iter()
                    .map(|(start, stats)| Point {
                        start: rfc3339_in(*start, tz),
                        values: select(&stats.metrics(), &metrics),
                    })
                    .collect(),
            })
        },
    )
    .await
}

fn unit(name: &str, window: Window) -> Result<Unit, AnalyticsError> {
    Unit::parse(name, window).ok_or_else(|| {
        AnalyticsError::Invalid(format!(
            "`bucket` must be auto, minute, hour, day, week or month; got {name:?}"
        ))
    })
}

/// Metrics per value of a dimension.
#[derive(Serialize, ToSchema)]
pub(super) struct Breakdown {
    by: String,
    from: String,
    to: String,
    groups: Vec<Group>,
}

/// One value of the dimension (null: requests without one) and its metrics.
#[derive(Serialize, ToSchema)]
pub(super) struct Group {
    key: Option<String>,
    /// The project's, key's or tenant's name, when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    values: Map<String, Value>,
}

#[utoipa::path(
    get,
    path = "/v1/analytics/breakdown",
    params(Range, Filter, BreakdownParams),
    responses(
        (status = 200, body = Breakdown),
        (status = 400, description = "A bad parameter", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn breakdown(
    State(state): State<QueryState>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let params = vec![
        documented::<Range>(),
        documented::<Filter>(),
        documented::<BreakdownParams>(),
    ];
    answer(
        state,
        headers,
        uri,
        params,
        |state, principal, params| async move {
            let (analytics, scope) = (state.analytics()?, principal.scope);
            let (question, tz) = params.question(scope)?;
            let metrics = parse_metrics(params.get("metric"))?;
            let limit = params.limit(50, 1000)?;
            let by = params.get("by").unwrap_or("model");
            let groups = if by == "day" {
                let days = analytics.series(&question, Unit::Day, tz, &metrics).await?;
                days.iter()
                    .map(|(start, stats)| Group {
                        key: Some(rfc3339_in(*start, tz).chars().take(10).collect()),
                        name: None,
                        values: select(&stats.metrics(), &metrics),
                    })
                    .collect()
            } else {
                let dimension = Dimension::parse(by).ok_or_else(|| {
                    AnalyticsError::Invalid(format!(
                        "`by` must be one of {}, day; got {by:?}",
                        Dimension::NAMES.join(", ")
                    ))
                })?;
                let groups = analytics
                    .breakdown(&question, dimension, &metrics, limit)
                    .await?;
                let ids: Vec<&str> = groups.iter().filter_map(|(k, _)| k.as_deref()).collect();
                let names = analytics.names(scope, dimension, &ids).await?;
                groups
                    .iter()
                    .map(|(key, stats)| Group {
                        name: key.as_ref().and_then(|k| names.get(k).cloned()),
                        key: key.clone(),
                        values: select(&stats.metrics(), &metrics),
                    })
                    .collect()
            };
            Ok(Breakdown {
                by: by.to_owned(),
                from: rfc3339(question.window.from_us),
                to: rfc3339(question.window.to_us),
                groups,
            })
        },
    )
    .await
}

/// The requests ranking highest.
#[derive(Serialize, ToSchema)]
pub(super) struct Top {
    by: String,
    from: String,
    to: String,
    requests: Vec<RequestRow>,
}

#[utoipa::path(
    get,
    path = "/v1/analytics/top",
    params(Range, Filter, TopParams),
    responses(
        (status = 200, body = Top),
        (status = 400, description = "A bad parameter", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn top(State(state): State<QueryState>, headers: HeaderMap, uri: Uri) -> Response {
    let params = vec![
        documented::<Range>(),
        documented::<Filter>(),
        documented::<TopParams>(),
    ];
    answer(
        state,
        headers,
        uri,
        params,
        |state, principal, params| async move {
            let (analytics, scope) = (state.analytics()?, principal.scope);
            let by = params.get("by").unwrap_or("cost").to_owned();
            ranked(&analytics, scope, &params, &by).await
        },
    )
    .await
}

/// The most expensive requests (`/v1/analytics/top?by=cost`).
#[utoipa::path(
    get,
    path = "/v1/analytics/top-expensive",
    params(Range, Filter, LimitParam),
    responses(
        (status = 200, body = Top),
        (status = 400, description = "A bad parameter", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn top_expensive(
    State(state): State<QueryState>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let params = vec![
        documented::<Range>(),
        documented::<Filter>(),
        documented::<LimitParam>(),
    ];
    answer(
        state,
        headers,
        uri,
        params,
        |state, principal, params| async move {
            let (analytics, scope) = (state.analytics()?, principal.scope);
            ranked(&analytics, scope, &params, "cost").await
        },
    )
    .await
}

async fn ranked(
    analytics: &Analytics,
    scope: Scope,
    params: &Params,
    by: &str,
) -> Result<Top, AnalyticsError> {
    let (question, _) = params.question(scope)?;
    let limit = params.limit(10, 100)?;
    let rank = TopBy::parse(by).ok_or_else(|| {
        AnalyticsError::Invalid(format!("`by` must be cost, latency or tokens; got {by:?}"))
    })?;
    Ok(Top {
        by: by.to_owned(),
        from: rfc3339(question.window.from_us),
        to: rfc3339(question.window.to_us),
        requests: analytics.top(&question, rank, limit).await?,
    })
}

/// Error rates and classes over the window.
#[derive(Serialize, ToSchema)]
pub(super) struct Errors {
    from: String,
    to: String,
    #[serde(flatten)]
    report: ErrorReport,
}

#[utoipa::path(
    get,
    path = "/v1/analytics/errors",
    params(Range, Filter),
    responses(
        (status = 200, body = Errors),
        (status = 400, description = "A bad parameter", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn errors(
    State(state): State<QueryState>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let params = vec![documented::<Range>(), documented::<Filter>()];
    answer(
        state,
        headers,
        uri,
        params,
        |state, principal, params| async move {
            let (analytics, scope) = (state.analytics()?, principal.scope);
            let (question, _) = params.question(scope)?;
            Ok(Errors {
                from: rfc3339(question.window.from_us),
                to: rfc3339(question.window.to_us),
                report: analytics.errors(&question).await?,
            })
        },
    )
    .await
}

/// The same as `/v1/analytics/errors`, under the name earlier dashboards call.
#[utoipa::path(
    get,
    path = "/v1/analytics/error-rate",
    params(Range, Filter),
    responses(
        (status = 200, body = Errors),
        (status = 400, description = "A bad parameter", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn error_rate(state: State<QueryState>, headers: HeaderMap, uri: Uri) -> Response {
    errors(state, headers, uri).await
}

/// Totals with breakdowns by model and by period, in the shape earlier dashboards read.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub(super) struct Legacy {
    start_date: String,
    end_date: String,
    group_by: Unit,
    /// The metrics, camelCased (`totalTokens`, `costUsd`, `errorRate`, …).
    #[schema(value_type = Object)]
    totals: Map<String, Value>,
    by_model: Vec<LegacyGroup>,
    /// By the tier (L0–L3) of the alias requests were routed to; `null` for aliases without one.
    by_tier: Vec<LegacyGroup>,
    by_period: Vec<LegacyGroup>,
}

#[derive(Serialize, ToSchema)]
pub(super) struct LegacyGroup {
    /// The model, the tier, or the period's start (a date in `tz`).
    key: Option<String>,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    values: Map<String, Value>,
}

#[utoipa::path(
    get,
    path = "/v1/analytics",
    params(LegacyParams),
    responses(
        (status = 200, body = Legacy),
        (status = 400, description = "A bad parameter", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn legacy(
    State(state): State<QueryState>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let params = vec![documented::<LegacyParams>()];
    answer(
        state,
        headers,
        uri,
        params,
        |state, principal, params| async move {
            let (analytics, scope) = (state.analytics()?, principal.scope);
            let tz = params.tz()?;
            let now = now_us();
            let to = match params.get("endDate") {
                // A date names the whole day: the window ends at the next midnight.
                Some(date) if date.len() == 10 => {
                    Window::parse(Some(date), Some(&next_day(date)?), None, now, tz)?.to_us
                }
                Some(time) => Window::parse(None, Some(time), None, now, tz)?.to_us,
                None => now,
            };
            let to_text = rfc3339(to);
            let window = match params.get("startDate") {
                Some(from) => Window::parse(Some(from), Some(&to_text), None, now, tz)?,
                None => Window::parse(None, Some(&to_text), Some("30d"), now, tz)?,
            };
            let question = Question {
                scope,
                window,
                filters: Filters {
                    project: params.get("projectId").map(str::to_owned),
                    user: params.get("userId").map(str::to_owned),
                    ..Filters::default()
                },
            };
            let group_by = match params.get("groupBy").unwrap_or("day") {
                "day" => Unit::Day,
                "week" => Unit::Week,
                "month" => Unit::Month,
                other => {
                    return Err(AnalyticsError::Invalid(format!(
                        "`groupBy` must be day, week or month; got {other:?}"
                    )));
                }
            };
            let all = parse_metrics(None)?;
            let (totals, _) = analytics.summary(&question).await?;
            let models = analytics
                .breakdown(&question, Dimension::Model, &all, 1000)
                .await?;
            let tiers = analytics
                .breakdown(&question, Dimension::Tier, &all, 1000)
                .await?;
            let periods = analytics.series(&question, group_by, tz, &all).await?;
            let groups = |groups: &[(Option<String>, Stats)]| -> Vec<LegacyGroup> {
                groups
                    .iter()
                    .map(|(key, stats)| LegacyGroup {
                        key: key.clone(),
                        values: camel_case(select(&stats.metrics(), &all)),
                    })
                    .collect()
            };
            Ok(Legacy {
                start_date: rfc3339(window.from_us),
                end_date: rfc3339(window.to_us),
                group_by,
                totals: camel_case(select(&totals.metrics(), &all)),
                by_model: groups(&models),
                by_tier: groups(&tiers),
                by_period: periods
                    .iter()
                    .map(|(start, stats)| LegacyGroup {
                        key: Some(rfc3339_in(*start, tz).chars().take(10).collect()),
                        values: camel_case(select(&stats.metrics(), &all)),
                    })
                    .collect(),
            })
        },
    )
    .await
}

/// The day after the date `date` (`YYYY-MM-DD`).
fn next_day(date: &str) -> Result<String, AnalyticsError> {
    chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d")
        .ok()
        .and_then(|d| d.succ_opt())
        .map(|d| d.format("%Y-%m-%d").to_string())
        .ok_or_else(|| AnalyticsError::Invalid(format!("`endDate` is not a date: {date:?}")))
}

/// `tokens_total` → `tokensTotal`, for clients that expect camelCase; `totalTokens` too.
fn camel_case(values: Map<String, Value>) -> Map<String, Value> {
    let mut camel: Map<String, Value> = values
        .into_iter()
        .map(|(name, value)| {
            let mut out = String::with_capacity(name.len());
            let mut upper = false;
            for c in name.chars() {
                if c == '_' {
                    upper = true;
                } else if upper {
                    out.extend(c.to_uppercase());
                    upper = false;
                } else {
                    out.push(c);
                }
            }
            (out, value)
        })
        .collect();
    if let Some(total) = camel.get("tokensTotal").cloned() {
        camel.insert("totalTokens".into(), total);
    }
    camel
}

/// What needs a look now.
#[derive(Serialize, ToSchema)]
pub(super) struct Alerts {
    at: String,
    alerts: Vec<Alert>,
}

#[utoipa::path(
    get,
    path = "/v1/alerts",
    responses(
        (status = 200, body = Alerts),
        (status = 401, body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn alerts(
    State(state): State<QueryState>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    answer(
        state,
        headers,
        uri,
        Vec::new(),
        |state, principal, _| async move {
            let (analytics, scope) = (state.analytics()?, principal.scope);
            let now = now_us();
            let filters = Filters {
                project: principal.project.map(|p| p.to_string()),
                ..Filters::default()
            };
            Ok(Alerts {
                at: rfc3339(now),
                alerts: analytics.alerts(scope, &filters, now).await?,
            })
        },
    )
    .await
}

/// The most recent requests, in-flight ones included.
#[derive(Serialize, ToSchema)]
pub(super) struct Activity {
    requests: Vec<RequestRow>,
}

#[utoipa::path(
    get,
    path = "/v1/activity",
    params(Range, Filter, LimitParam),
    responses(
        (status = 200, body = Activity),
        (status = 400, description = "A bad parameter", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn activity(
    State(state): State<QueryState>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let params = vec![
        documented::<Range>(),
        documented::<Filter>(),
        documented::<LimitParam>(),
    ];
    answer(
        state,
        headers,
        uri,
        params,
        |state, principal, params| async move {
            let (analytics, scope) = (state.analytics()?, principal.scope);
            let (question, _) = params.question(scope)?;
            let limit = params.limit(20, 100)?;
            Ok(Activity {
                requests: analytics.recent(&question, limit).await?,
            })
        },
    )
    .await
}
