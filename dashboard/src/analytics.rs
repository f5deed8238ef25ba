//! Analytics: requests, latency percentiles, time to first token, tokens and cost over time
//! (SVG drawn here, a `<title>` tooltip on every point); breakdowns by model, provider, project,
//! user or key; the most expensive requests; the error rate by model — in the viewer's time zone
//! (the browser's, or the one picked), each widget its own request.

use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use chrono_tz::Tz;
use loom_query::analytics::{
    AnalyticsError, Dimension, METRICS, Metrics, RequestRow, Stats, TopBy, Unit, rfc3339_in,
};
use maud::{Markup, PreEscaped, html};
use serde::Deserialize;

use crate::Ui;
use crate::home::{
    Range, analytics, count, dollars, local_time, millis, percent, problem, question,
};
use crate::layout::{self, Nav};
use crate::session::Viewer;

/// The time zones offered besides the viewer's own and UTC.
const ZONES: [&str; 10] = [
    "UTC",
    "Europe/London",
    "Europe/Berlin",
    "America/New_York",
    "America/Chicago",
    "America/Los_Angeles",
    "America/Sao_Paulo",
    "Asia/Kolkata",
    "Asia/Tokyo",
    "Australia/Sydney",
];

/// The breakdowns offered.
const BREAKDOWNS: [(&str, &str); 5] = [
    ("model", "Model"),
    ("provider", "Provider"),
    ("project", "Project"),
    ("user", "User"),
    ("key", "Key"),
];

/// The charts: name, title, the metrics drawn, and how values read.
const CHARTS: [(&str, &str, &[&str], Format); 5] = [
    (
        "requests",
        "Requests",
        &["requests", "errors"],
        Format::Count,
    ),
    (
        "latency",
        "Latency",
        &["latency_p50_ms", "latency_p95_ms", "latency_p99_ms"],
        Format::Millis,
    ),
    (
        "ttft",
        "Time to first token",
        &["ttft_p50_ms", "ttft_p95_ms"],
        Format::Millis,
    ),
    (
        "tokens",
        "Tokens",
        &["tokens_in", "tokens_out"],
        Format::Count,
    ),
    ("cost", "Cost", &["cost_usd"], Format::Dollars),
];

#[derive(Debug, Clone, Copy)]
enum Format {
    Count,
    Millis,
    Dollars,
}

impl Format {
    fn show(self, value: f64) -> String {
        match self {
            Format::Count => count(value.round() as i64),
            Format::Millis => millis(Some(value)),
            Format::Dollars => dollars(value),
        }
    }
}

#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct Params {
    #[serde(flatten)]
    range: Range,
    chart: Option<String>,
    by: Option<String>,
}

pub(crate) async fn page(
    viewer: Viewer,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    let range = params.range.with_zone_of(&headers);
    let query = range.query();
    let tz = range.tz_name().unwrap_or("UTC").to_owned();
    let by = params.by.as_deref().unwrap_or("model");
    let here = |extra: &str| format!("/analytics?{query}{extra}");
    let main = html! {
        div.bar {
            h1 { "Analytics" }
            (crate::home::ranges("/analytics", &range))
            form.zone method="get" action="/analytics" {
                @for (name, value) in range.pairs_without_tz() { input type="hidden" name=(name) value=(value); }
                label { "Time zone "
                    select name="tz" data-submit {
                        @if !ZONES.contains(&tz.as_str()) { option value=(tz) selected { (tz) } }
                        @for zone in ZONES { option value=(zone) selected[zone == tz] { (zone) } }
                    }
                }
                noscript { button type="submit" { "Apply" } }
            }
        }
        div.charts {
            @for (name, title, _, _) in CHARTS {
                section.widget data-src=(format!("/ui/analytics/chart?{query}&chart={name}")) data-refresh="60" {
                    h2 { (title) }
                    p.loading { "Loading…" }
                }
            }
        }
        section.widget {
            div.bar {
                h2 { "Breakdown" }
                nav.ranges aria-label="Break down by" {
                    @for (name, label) in BREAKDOWNS {
                        a href=(here(&format!("&by={name}"))) aria-current=[(by == name).then_some("true")] { (label) }
                    }
                }
            }
            div data-src=(format!("/ui/analytics/breakdown?{query}&by={}", layout::encode(by))) data-refresh="60" {
                p.loading { "Loading…" }
            }
        }
        div.columns {
            section.widget data-src=(format!("/ui/analytics/expensive?{query}")) data-refresh="60" {
                h2 { "Most expensive requests" }
                p.loading { "Loading…" }
            }
            section.widget data-src=(format!("/ui/analytics/errors?{query}")) data-refresh="60" {
                h2 { "Error rate by model" }
                p.loading { "Loading…" }
            }
        }
    };
    layout::page("Analytics", &viewer, Nav::Analytics, main).into_response()
}

pub(crate) async fn chart(
    State(ui): State<Ui>,
    viewer: Viewer,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    let range = params.range.with_zone_of(&headers);
    let name = params.chart.as_deref().unwrap_or("requests");
    let Some(&(_, title, metrics, format)) = CHARTS.iter().find(|(n, ..)| *n == name) else {
        let error = AnalyticsError::Invalid(format!("no chart {name:?}"));
        return problem(None, &error);
    };
    let answer = async {
        let question = question(&viewer, &range)?;
        let tz = range.tz()?;
        let unit = Unit::parse("auto", question.window)
            .ok_or_else(|| AnalyticsError::Invalid("no bucket for this range".into()))?;
        let series = analytics(&ui)?.series(&question, unit, tz, metrics).await?;
        Ok::<_, AnalyticsError>((series, tz))
    };
    match answer.await {
        Ok((series, tz)) => html! {
            h2 { (title) }
            (draw(&series, metrics, format, tz))
        }
        .into_response(),
        Err(error) => problem(Some(title), &error),
    }
}

/// The value of a metric, by name, as a number (`None`: not measured in this bucket).
fn value(metrics: &Metrics, name: &str) -> Option<f64> {
    let json = serde_json::to_value(metrics).ok()?;
    json.get(name)?.as_f64()
}

const WIDTH: f64 = 560.0;
const HEIGHT: f64 = 180.0;
const LEFT: f64 = 56.0;
const BOTTOM: f64 = 22.0;

/// A line chart of `names` over the buckets, an axis with the highest value and the range's
/// ends, a tooltip on every point.
fn draw(series: &[(i64, Stats)], names: &[&str], format: Format, tz: Tz) -> Markup {
    let points: Vec<(i64, Vec<Option<f64>>)> = series
        .iter()
        .map(|(at, stats)| {
            let metrics = stats.metrics();
            (*at, names.iter().map(|n| value(&metrics, n)).collect())
        })
        .collect();
    let top = points
        .iter()
        .flat_map(|(_, values)| values.iter().flatten())
        .fold(0.0_f64, |a, b| a.max(*b));
    if points.is_empty() || top <= 0.0 {
        return html! { p.empty { "Nothing in this range." } };
    }
    let plot_w = WIDTH - LEFT - 8.0;
    let plot_h = HEIGHT - BOTTOM - 8.0;
    let step = plot_w / (points.len().max(2) - 1) as f64;
    let x = |i: usize| LEFT + step * i as f64;
    let y = |v: f64| 8.0 + plot_h * (1.0 - v / top);
    let when = |at: i64| {
        rfc3339_in(at, tz)
            .replace('T', " ")
            .chars()
            .take(16)
            .collect::<String>()
    };
    let legend = names.join(", ").replace("_ms", "").replace('_', " ");
    html! {
        svg.chart viewBox=(format!("0 0 {WIDTH} {HEIGHT}")) role="img" aria-label=(legend) {
            line.axis x1=(LEFT) y1=(HEIGHT - BOTTOM) x2=(WIDTH - 8.0) y2=(HEIGHT - BOTTOM) {}
            line.grid x1=(LEFT) y1="8" x2=(WIDTH - 8.0) y2="8" {}
            text.tick x=(LEFT - 6.0) y="12" text-anchor="end" { (format.show(top)) }
            text.tick x=(LEFT - 6.0) y=(HEIGHT - BOTTOM) text-anchor="end" { "0" }
            text.tick x=(LEFT) y=(HEIGHT - 6.0) { (when(points[0].0)) }
            text.tick x=(WIDTH - 8.0) y=(HEIGHT - 6.0) text-anchor="end" { (when(points[points.len() - 1].0)) }
            @for (n, name) in names.iter().enumerate() {
                @let line: Vec<String> = points.iter().enumerate()
                    .filter_map(|(i, (_, v))| v[n].map(|v| format!("{:.1},{:.1}", x(i), y(v))))
                    .collect();
                polyline class=(format!("series s{n}")) points=(line.join(" ")) {}
                @for (i, (at, values)) in points.iter().enumerate() {
                    @if let Some(v) = values[n] {
                        circle class=(format!("point s{n}")) cx=(format!("{:.1}", x(i))) cy=(format!("{:.1}", y(v))) r="2.5" {
                            title { (when(*at)) " · " (name.replace("_ms", "").replace('_', " ")) ": " (format.show(v)) }
                        }
                    }
                }
            }
        }
        p.legend {
            @for (n, name) in names.iter().enumerate() {
                span class=(format!("key s{n}")) { (PreEscaped("&#9632;")) " " (name.replace("_ms", "").replace('_', " ")) }
            }
        }
    }
}

pub(crate) async fn breakdown(
    State(ui): State<Ui>,
    viewer: Viewer,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    let range = params.range.with_zone_of(&headers);
    let by_name = params.by.as_deref().unwrap_or("model");
    let answer = async {
        let by = BREAKDOWNS
            .iter()
            .find(|(n, _)| *n == by_name)
            .and_then(|(n, _)| Dimension::parse(n))
            .ok_or_else(|| AnalyticsError::Invalid(format!("cannot break down by {by_name:?}")))?;
        let question = question(&viewer, &range)?;
        let analytics = analytics(&ui)?;
        let groups = analytics.breakdown(&question, by, &METRICS, 50).await?;
        let ids: Vec<&str> = groups.iter().filter_map(|(g, _)| g.as_deref()).collect();
        let names = analytics.names(question.scope, by, &ids).await?;
        Ok::<_, AnalyticsError>((groups, names))
    };
    match answer.await {
        Ok((groups, names)) if groups.is_empty() => {
            let _ = names;
            html! { p.empty { "Nothing in this range." } }.into_response()
        }
        Ok((groups, names)) => html! {
            table.rows {
                thead { tr {
                    th { "Name" } th.num { "Requests" } th.num { "Error rate" } th.num { "p95 latency" }
                    th.num { "Tokens" } th.num { "Cost" }
                } }
                tbody {
                    @for (group, stats) in &groups {
                        @let m = stats.metrics();
                        @let label = group.as_deref().map(|g| names.get(g).cloned().unwrap_or_else(|| g.to_owned()));
                        tr {
                            td { (label.unwrap_or_else(|| "(none)".into())) }
                            td.num { (count(m.requests)) }
                            td.num { (percent(m.error_rate)) }
                            td.num { (millis(m.latency_p95_ms)) }
                            td.num { (count(m.tokens_total)) }
                            td.num { (dollars(m.cost_usd)) }
                        }
                    }
                }
            }
        }
        .into_response(),
        Err(error) => problem(None, &error),
    }
}

pub(crate) async fn expensive(
    State(ui): State<Ui>,
    viewer: Viewer,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    let range = params.range.with_zone_of(&headers);
    let answer = async {
        let question = question(&viewer, &range)?;
        let rows = analytics(&ui)?.top(&question, TopBy::Cost, 10).await?;
        Ok::<_, AnalyticsError>((rows, range.tz()?))
    };
    match answer.await {
        Ok((rows, tz)) => expensive_rows(&rows, tz).into_response(),
        Err(error) => problem(Some("Most expensive requests"), &error),
    }
}

fn expensive_rows(rows: &[RequestRow], tz: Tz) -> Markup {
    html! {
        h2 { "Most expensive requests" }
        @if rows.is_empty() {
            p.empty { "Nothing in this range." }
        } @else {
            table.rows {
                thead { tr { th { "When" } th { "Model" } th.num { "Tokens" } th.num { "Cost" } } }
                tbody {
                    @for row in rows {
                        tr {
                            td { a href=(format!("/traces/{}", row.trace_id)) { (local_time(&row.started_at, tz)) } }
                            td { (row.model.as_deref().unwrap_or("–")) }
                            td.num { (count(row.tokens_in.unwrap_or(0) + row.tokens_out.unwrap_or(0))) }
                            td.num { (row.cost_usd.map_or("–".to_owned(), dollars)) }
                        }
                    }
                }
            }
        }
    }
}

pub(crate) async fn errors(
    State(ui): State<Ui>,
    viewer: Viewer,
    headers: HeaderMap,
    Query(params): Query<Params>,
) -> Response {
    let range = params.range.with_zone_of(&headers);
    let answer = async {
        let question = question(&viewer, &range)?;
        let mut groups = (analytics(&ui)?)
            .breakdown(&question, Dimension::Model, &["requests", "errors"], 50)
            .await?;
        groups.sort_by(|a, b| {
            let rate = |s: &Stats| s.metrics().error_rate;
            rate(&b.1).total_cmp(&rate(&a.1))
        });
        Ok::<_, AnalyticsError>(groups)
    };
    match answer.await {
        Ok(groups) => html! {
            h2 { "Error rate by model" }
            @if groups.is_empty() {
                p.empty { "Nothing in this range." }
            } @else {
                table.rows {
                    thead { tr { th { "Model" } th.num { "Errors" } th.num { "Requests" } th { "Rate" } } }
                    tbody {
                        @for (model, stats) in &groups {
                            @let m = stats.metrics();
                            tr {
                                td { (model.as_deref().unwrap_or("(none)")) }
                                td.num { (count(m.errors)) }
                                td.num { (count(m.requests)) }
                                td {
                                    span.meter { span style=(format!("width:{:.1}%", m.error_rate * 100.0)) {} }
                                    " " (percent(m.error_rate))
                                }
                            }
                        }
                    }
                }
            }
        }
        .into_response(),
        Err(error) => problem(Some("Error rate by model"), &error),
    }
}
