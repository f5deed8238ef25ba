//! `GET /v1/traces` (a page of the caller's traces) and `GET /v1/traces/{id}` (one as a
//! timeline).

use axum::extract::{Path, State};
use axum::http::{HeaderMap, Uri};
use axum::response::Response;
use utoipa::IntoParams;

use super::QueryState;
use super::analytics::{Filter, Params, Range, answer, documented, now_us};
use crate::analytics::{AnalyticsError, Window};
use crate::traces::{MAX_PAGE, Page, Timeline, TraceFilters};

#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // Describes the query string, which `Params` reads.
pub(super) struct ListParams {
    /// Only requests that cost at least this much (USD).
    min_cost: Option<String>,
    /// Only requests that took at least this long (ms).
    min_latency_ms: Option<String>,
    /// Only failed requests whose error class contains this text.
    error: Option<String>,
    /// The `next_cursor` of the previous page.
    cursor: Option<String>,
    /// Traces per page (default 50, at most 200).
    limit: Option<String>,
}

fn number(params: &Params, name: &str) -> Result<Option<f64>, AnalyticsError> {
    params
        .get(name)
        .map(|text| {
            text.parse::<f64>()
                .ok()
                .filter(|n| n.is_finite() && *n >= 0.0)
                .ok_or_else(|| {
                    AnalyticsError::Invalid(format!(
                        "`{name}` must be a number of 0 or more; got {text:?}"
                    ))
                })
        })
        .transpose()
}

/// The caller's traces, newest first, a page at a time. Without `from`, `to` or `window`, of
/// all time.
#[utoipa::path(
    get,
    path = "/v1/traces",
    params(Range, Filter, ListParams),
    responses(
        (status = 200, body = Page),
        (status = 400, description = "A bad parameter, or a cursor this list did not give", body = super::ErrorBody),
        (status = 401, body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn list(
    State(state): State<QueryState>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    let params = vec![
        documented::<Range>(),
        documented::<Filter>(),
        documented::<ListParams>(),
    ];
    answer(
        state,
        headers,
        uri,
        params,
        |state, principal, params| async move {
            let traces = state.traces()?;
            let (mut question, _) = params.question(principal.scope)?;
            if ["from", "to", "window"]
                .iter()
                .all(|p| params.get(p).is_none())
            {
                question.window = Window {
                    from_us: 0,
                    to_us: now_us() + 86_400_000_000,
                };
            }
            let filters = TraceFilters {
                common: question.filters,
                min_cost_micro_usd: number(&params, "min_cost")?
                    .map(|usd| (usd * 1e6).ceil() as i64),
                min_latency_us: number(&params, "min_latency_ms")?
                    .map(|ms| (ms * 1e3).ceil() as i64),
                error: params.get("error").map(str::to_owned),
            };
            let limit = params.limit(50, MAX_PAGE)?;
            traces
                .list(
                    principal.scope,
                    question.window,
                    &filters,
                    params.get("cursor"),
                    limit,
                )
                .await
        },
    )
    .await
}

/// One trace as a timeline: request, policy, routing, every attempt, tool calls and their
/// results, completion; bodies only for roles that may read them.
#[utoipa::path(
    get,
    path = "/v1/traces/{id}",
    params(("id" = String, Path, description = "The trace id (`x-request-id` of the response)")),
    responses(
        (status = 200, body = Timeline),
        (status = 401, body = super::ErrorBody),
        (status = 404, description = "No trace of the caller's by that id", body = super::ErrorBody),
    ),
    security(("bearer" = [])),
)]
pub(super) async fn timeline(
    State(state): State<QueryState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    uri: Uri,
) -> Response {
    answer(
        state,
        headers,
        uri,
        Vec::new(),
        |state, principal, _| async move {
            let traces = state.traces()?;
            let project = principal.project.map(|p| p.to_string());
            traces
                .timeline(principal.scope, principal.access, &id)
                .await?
                .filter(|t| project.is_none() || t.request.project_id == project)
                .ok_or_else(|| AnalyticsError::NotFound(format!("no trace {id:?}")))
        },
    )
    .await
}
