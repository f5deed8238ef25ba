//! Traces: the viewer's requests, newest first, filtered by what the URL says (so a link
//! reproduces the view), a page at a time (the next one loads as the table's end scrolls into
//! view); one trace's timeline in a side panel (or a page of its own), with bodies for the roles
//! that may read them; the filtered list as CSV.

use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono_tz::Tz;
use loom_query::analytics::{AnalyticsError, Filters, RequestRow};
use loom_query::traces::{MAX_PAGE, Step, Timeline, TraceFilters, Traces};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;

use crate::Ui;
use crate::home::{Range, dollars, local_time, millis, problem};
use crate::layout::{self, Nav};
use crate::session::Viewer;

/// Rows per page of the table.
const PAGE: usize = 50;
/// The most rows a CSV export holds.
pub(crate) const CSV_ROWS: usize = 10_000;

/// The list's filters, as the URL carries them.
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct ListQuery {
    #[serde(flatten)]
    range: Range,
    model: Option<String>,
    status: Option<String>,
    user: Option<String>,
    project: Option<String>,
    key: Option<String>,
    /// At least this much, in USD.
    min_cost: Option<String>,
    cursor: Option<String>,
}

fn given(value: &Option<String>) -> Option<&str> {
    value.as_deref().map(str::trim).filter(|v| !v.is_empty())
}

impl ListQuery {
    fn filters(&self, viewer: &Viewer) -> Result<TraceFilters, AnalyticsError> {
        let min_cost = match given(&self.min_cost) {
            None => None,
            Some(text) => match text.trim_start_matches('$').parse::<f64>() {
                Ok(usd) if usd.is_finite() && usd >= 0.0 => Some((usd * 1e6).round() as i64),
                _ => {
                    return Err(AnalyticsError::Invalid(format!(
                        "min cost: {text:?} is not an amount in USD, such as 0.01"
                    )));
                }
            },
        };
        // A viewer bound to a project sees that project's only, whatever the URL says.
        let project = match viewer.signed_in.project_id {
            Some(project) => Some(project.to_string()),
            None => given(&self.project).map(str::to_owned),
        };
        let common = Filters {
            project,
            user: given(&self.user).map(str::to_owned),
            key: given(&self.key).map(str::to_owned),
            model: given(&self.model).map(str::to_owned),
            status: given(&self.status).map(str::to_owned),
            ..Filters::default()
        };
        common.validate()?;
        Ok(TraceFilters {
            common,
            min_cost_micro_usd: min_cost,
            ..TraceFilters::default()
        })
    }

    /// The filters as a query string, without the cursor.
    fn query(&self) -> String {
        let mut parts = vec![self.range.query()];
        for (name, value) in [
            ("model", &self.model),
            ("status", &self.status),
            ("user", &self.user),
            ("project", &self.project),
            ("key", &self.key),
            ("min_cost", &self.min_cost),
        ] {
            if let Some(value) = given(value) {
                parts.push(format!("{name}={}", layout::encode(value)));
            }
        }
        parts.retain(|p| !p.is_empty());
        parts.join("&")
    }
}

fn traces(ui: &Ui) -> Result<&Traces, AnalyticsError> {
    ui.query
        .traces
        .as_deref()
        .ok_or(AnalyticsError::Unavailable(
            "Traces need read models: start `loom serve` without `--read-models off`.",
        ))
}

pub(crate) async fn page(viewer: Viewer, Query(list): Query<ListQuery>) -> Response {
    let query = list.query();
    let text = |value: &Option<String>| value.clone().unwrap_or_default();
    let main = html! {
        div.bar {
            h1 { "Traces" }
            a.button href=(format!("/traces.csv?{query}")) download { "Download CSV" }
        }
        form.filters method="get" action="/traces" role="search" {
            label { "Model" input type="search" name="model" value=(text(&list.model)) data-search; }
            label { "Status"
                select name="status" {
                    @for (value, label) in [("", "any"), ("ok", "ok"), ("failed", "failed (any but ok)"), ("error", "error"), ("denied", "denied"), ("client_cancelled", "cancelled")] {
                        option value=(value) selected[list.status.as_deref().unwrap_or("") == value] { (label) }
                    }
                }
            }
            label { "User" input type="text" name="user" value=(text(&list.user)); }
            @if viewer.signed_in.project_id.is_none() {
                label { "Project" input type="text" name="project" value=(text(&list.project)) placeholder="project id"; }
            }
            label { "Key" input type="text" name="key" value=(text(&list.key)) placeholder="key id"; }
            label { "Min cost (USD)" input type="text" name="min_cost" value=(text(&list.min_cost)) inputmode="decimal"; }
            label { "Range"
                select name="window" {
                    @for (value, label) in [("1h", "1 hour"), ("24h", "24 hours"), ("7d", "7 days"), ("30d", "30 days")] {
                        option value=(value) selected[list.range.preset() == value] { (label) }
                    }
                }
            }
            @if let Some(tz) = list.range.tz_name() { input type="hidden" name="tz" value=(tz); }
            button type="submit" { "Filter" }
            a href="/traces" { "Clear" }
        }
        div.split {
            table.rows.traces data-rows {
                thead { tr {
                    th { "When" } th { "Model" } th { "Status" } th { "User" }
                    th.num { "Latency" } th.num { "Tokens" } th.num { "Cost" }
                } }
                tbody data-src=(format!("/ui/traces/rows?{query}")) {
                    tr { td.loading colspan="7" { "Loading traces…" } }
                }
            }
            aside.panel id="panel" hidden aria-label="Trace" {}
        }
        noscript { p { "Without JavaScript, open " a href=(format!("/ui/traces/rows?{query}")) { "the list" } "." } }
    };
    layout::page("Traces", &viewer, Nav::Traces, main).into_response()
}

/// A page of rows, and a last row that loads the next page (or says there is none).
pub(crate) async fn rows(
    State(ui): State<Ui>,
    viewer: Viewer,
    headers: axum::http::HeaderMap,
    Query(mut list): Query<ListQuery>,
) -> Response {
    list.range = list.range.with_zone_of(&headers);
    let answer = async {
        let filters = list.filters(&viewer)?;
        let window = list.range.window()?;
        let tz = list.range.tz()?;
        let page = traces(&ui)?
            .list(
                viewer.principal().scope,
                window,
                &filters,
                given(&list.cursor),
                PAGE,
            )
            .await?;
        Ok::<_, AnalyticsError>((page, tz))
    };
    let (page, tz) = match answer.await {
        Ok(answer) => answer,
        Err(error) => {
            let (status, message) = problem_text(&error);
            let body = html! { tr { td.problem colspan="7" role="alert" { (message) } } };
            return (status, body).into_response();
        }
    };
    let query = list.query();
    html! {
        @if page.traces.is_empty() && list.cursor.is_none() {
            tr { td.empty colspan="7" { "No traces match: widen the range or clear the filters." } }
        }
        @for row in &page.traces { (trace_row(row, tz)) }
        @if let Some(cursor) = &page.next_cursor {
            tr.more data-next=(format!("/ui/traces/rows?{query}&cursor={}", layout::encode(cursor))) {
                td colspan="7" {
                    a href=(format!("/ui/traces/rows?{query}&cursor={}", layout::encode(cursor))) { "More" }
                }
            }
        }
    }
    .into_response()
}

fn trace_row(row: &RequestRow, tz: Tz) -> Markup {
    let tokens = match (row.tokens_in, row.tokens_out) {
        (None, None) => "–".to_owned(),
        (tokens_in, tokens_out) => {
            format!("{} / {}", tokens_in.unwrap_or(0), tokens_out.unwrap_or(0))
        }
    };
    let status = row.status.as_deref().unwrap_or("in flight");
    html! {
        tr data-trace=(row.trace_id) tabindex="-1" {
            td { a href=(format!("/traces/{}", row.trace_id)) data-open { time datetime=(row.started_at) { (local_time(&row.started_at, tz)) } } }
            td { (row.model.as_deref().unwrap_or("–")) }
            td { span class=(format!("status {}", row.status.as_deref().unwrap_or("pending"))) { (status) } }
            td { (row.user.as_deref().unwrap_or("–")) }
            td.num { (millis(row.latency_ms)) }
            td.num { (tokens) }
            td.num { (row.cost_usd.map_or("–".to_owned(), dollars)) }
        }
    }
}

fn problem_text(error: &AnalyticsError) -> (StatusCode, String) {
    match error {
        AnalyticsError::Invalid(message) => (StatusCode::BAD_REQUEST, message.clone()),
        AnalyticsError::Unavailable(message) => {
            (StatusCode::SERVICE_UNAVAILABLE, (*message).to_owned())
        }
        AnalyticsError::NotFound(message) => (StatusCode::NOT_FOUND, message.clone()),
        other => {
            tracing::error!(error = %other, "a traces query failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "The traces could not be read; see the server log.".to_owned(),
            )
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct TzQuery {
    tz: Option<String>,
}

/// The zone a trace is shown in: the URL's, else the browser's (`loom_tz`), else UTC.
fn zone(query: TzQuery, headers: &axum::http::HeaderMap) -> Tz {
    (Range::in_zone(query.tz).with_zone_of(headers).tz()).unwrap_or(Tz::UTC)
}

/// One trace's timeline; `None`: nothing the viewer may see goes by that id.
async fn timeline(ui: &Ui, viewer: &Viewer, id: &str) -> Result<Option<Timeline>, AnalyticsError> {
    let principal = viewer.principal();
    let found = traces(ui)?
        .timeline(principal.scope, principal.access, id)
        .await?;
    // A viewer bound to a project sees its project's traces only.
    Ok(found.filter(|t| {
        principal
            .project
            .is_none_or(|p| t.request.project_id.as_deref() == Some(&p.to_string()))
    }))
}

/// The panel's content (`/ui/traces/{id}`).
pub(crate) async fn panel(
    State(ui): State<Ui>,
    viewer: Viewer,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
    Query(tz): Query<TzQuery>,
) -> Response {
    let tz = zone(tz, &headers);
    match timeline(&ui, &viewer, &id).await {
        Ok(Some(timeline)) => timeline_view(&timeline, tz).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, not_found(&id)).into_response(),
        Err(error) => problem(Some("Trace"), &error),
    }
}

/// A trace on a page of its own (`/traces/{id}`): what a link to a trace opens.
pub(crate) async fn trace_page(
    State(ui): State<Ui>,
    viewer: Viewer,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
    Query(tz): Query<TzQuery>,
) -> Response {
    let tz = zone(tz, &headers);
    let (status, content) = match timeline(&ui, &viewer, &id).await {
        Ok(Some(timeline)) => (StatusCode::OK, timeline_view(&timeline, tz)),
        Ok(None) => (StatusCode::NOT_FOUND, not_found(&id)),
        Err(error) => {
            let (status, message) = problem_text(&error);
            (status, html! { p.problem role="alert" { (message) } })
        }
    };
    let main = html! {
        p { a href="/traces" { "← Traces" } }
        section.widget { (content) }
    };
    (status, layout::page("Trace", &viewer, Nav::Traces, main)).into_response()
}

fn not_found(id: &str) -> Markup {
    html! {
        h2 { "No such trace" }
        p.problem { "No trace " code { (id) } " is yours to see: it may belong to another organization, or be older than the archive keeps." }
    }
}

/// Fields of a step shown as text blocks (bodies, arguments), not as values.
const BODY_FIELDS: [&str; 5] = [
    "body",
    "request_body",
    "response_body",
    "arguments",
    "result",
];

fn timeline_view(timeline: &Timeline, tz: Tz) -> Markup {
    let request = &timeline.request;
    let total_ms = timeline
        .steps
        .iter()
        .map(|s| s.offset_ms + s.duration_ms.unwrap_or(0.0))
        .fold(request.latency_ms.unwrap_or(0.0), f64::max)
        .max(0.001);
    html! {
        div.panel-head {
            h2 { "Trace " code { (timeline.trace_id) } }
            button type="button" data-close aria-label="Close the panel (Esc)" { "×" }
        }
        dl.facts {
            dt { "Started" } dd { (local_time(&request.started_at, tz)) }
            dt { "Model" } dd { (request.model.as_deref().unwrap_or("–")) }
            dt { "Status" } dd { (request.status.as_deref().unwrap_or("in flight")) @if let Some(class) = &request.error_class { " (" (class) ")" } }
            dt { "Latency" } dd { (millis(request.latency_ms)) }
            dt { "Tokens" } dd { (request.tokens_in.unwrap_or(0)) " in / " (request.tokens_out.unwrap_or(0)) " out" }
            dt { "Cost" } dd { (request.cost_usd.map_or("–".to_owned(), dollars)) }
            dt { "Source" } dd { (timeline.source.replace('_', " ")) }
        }
        @if !timeline.bodies {
            p.empty { "Bodies are not shown: your role reads metadata only." }
        }
        ol.timeline {
            @for step in &timeline.steps {
                (step_view(step, total_ms))
            }
        }
    }
}

fn step_view(step: &Step, total_ms: f64) -> Markup {
    let left = (step.offset_ms / total_ms * 100.0).clamp(0.0, 100.0);
    let width = (step.duration_ms.unwrap_or(0.0) / total_ms * 100.0).clamp(0.4, 100.0 - left);
    let fields: Vec<(&String, &Value)> = step
        .detail
        .as_object()
        .map(|o| o.iter().filter(|(_, v)| !v.is_null()).collect())
        .unwrap_or_default();
    html! {
        li.step data-kind=(step.kind) {
            div.step-head {
                span.kind { (step.kind.replace('_', " ")) }
                span.when { "+" (format!("{:.1}", step.offset_ms)) " ms" @if let Some(d) = step.duration_ms { " · " (format!("{d:.1}")) " ms" } }
            }
            div.track title=(format!("{} at +{:.1} ms", step.kind, step.offset_ms)) {
                span.span style=(format!("left:{left:.2}%;width:{width:.2}%")) {}
            }
            @if !fields.is_empty() {
                details {
                    summary { "Details" }
                    dl.detail {
                        @for (name, value) in &fields {
                            dt { (name) }
                            dd {
                                @if BODY_FIELDS.contains(&name.as_str()) {
                                    pre { (pretty(value)) }
                                } @else {
                                    (scalar(value))
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn pretty(value: &Value) -> String {
    match value {
        Value::String(text) => match serde_json::from_str::<Value>(text) {
            Ok(json) => serde_json::to_string_pretty(&json).unwrap_or_else(|_| text.clone()),
            Err(_) => text.clone(),
        },
        other => serde_json::to_string_pretty(other).unwrap_or_default(),
    }
}

/// The filtered list as CSV, up to [`CSV_ROWS`] rows, newest first.
pub(crate) async fn csv(
    State(ui): State<Ui>,
    viewer: Viewer,
    Query(list): Query<ListQuery>,
) -> Response {
    let answer = async {
        let filters = list.filters(&viewer)?;
        let window = list.range.window()?;
        let traces = traces(&ui)?;
        let scope = viewer.principal().scope;
        let mut writer = csv::Writer::from_writer(Vec::new());
        let (mut cursor, mut written) = (None::<String>, 0);
        loop {
            let limit = MAX_PAGE.min(CSV_ROWS - written);
            let page = traces
                .list(scope, window, &filters, cursor.as_deref(), limit)
                .await?;
            for row in &page.traces {
                writer
                    .serialize(row)
                    .map_err(|e| AnalyticsError::Archive(format!("writing CSV: {e}")))?;
            }
            written += page.traces.len();
            match page.next_cursor {
                Some(next) if written < CSV_ROWS => cursor = Some(next),
                _ => break,
            }
        }
        writer
            .into_inner()
            .map_err(|e| AnalyticsError::Archive(format!("writing CSV: {e}")))
    };
    match answer.await {
        Ok(bytes) => (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/csv; charset=utf-8"),
                ),
                (
                    header::CONTENT_DISPOSITION,
                    HeaderValue::from_static("attachment; filename=\"loom-traces.csv\""),
                ),
            ],
            bytes,
        )
            .into_response(),
        Err(error) => {
            let (status, message) = problem_text(&error);
            (status, message).into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_keeps_its_filters_in_the_url() {
        let list = ListQuery {
            model: Some("gpt-4o".into()),
            status: Some("".into()),
            min_cost: Some("0.01".into()),
            ..ListQuery::default()
        };
        assert_eq!(list.query(), "model=gpt-4o&min_cost=0.01");
    }
}
