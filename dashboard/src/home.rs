//! Home: KPI cards with their change against the period before, alerts, and recent activity, for
//! a time range. Each widget is its own request (`/ui/home/*`), so a slow one does not hold the
//! others back; the page refreshes them while it is visible.

use std::collections::BTreeMap;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono_tz::Tz;
use loom_query::analytics::{
    Analytics, AnalyticsError, Compared, Filters, Metrics, Question, RequestRow, Window, compare,
    rfc3339_in,
};
use loom_schemas::event::now_micros;
use maud::{Markup, html};
use serde::Deserialize;

use crate::Ui;
use crate::layout::{self, Nav};
use crate::session::Viewer;

/// The ranges offered as one click.
const RANGES: [(&str, &str); 4] = [
    ("1h", "1 hour"),
    ("24h", "24 hours"),
    ("7d", "7 days"),
    ("30d", "30 days"),
];

/// A time range, as the URL carries it (so a link reproduces the view).
#[derive(Debug, Default, Clone, Deserialize)]
pub(crate) struct Range {
    window: Option<String>,
    from: Option<String>,
    to: Option<String>,
    tz: Option<String>,
}

impl Range {
    pub(crate) fn tz(&self) -> Result<Tz, AnalyticsError> {
        match self.tz.as_deref().filter(|t| !t.is_empty()) {
            None => Ok(Tz::UTC),
            Some(name) => name
                .parse()
                .map_err(|_| AnalyticsError::Invalid(format!("unknown time zone {name:?}"))),
        }
    }

    pub(crate) fn window(&self) -> Result<Window, AnalyticsError> {
        let text = |v: &Option<String>| v.as_deref().filter(|t| !t.is_empty()).map(str::to_owned);
        let (from, to) = (text(&self.from), text(&self.to));
        // A custom range names its ends; the preset is ignored then.
        let window = match from {
            Some(_) => None,
            None => text(&self.window).or_else(|| Some("24h".into())),
        };
        Window::parse(
            from.as_deref(),
            to.as_deref(),
            window.as_deref(),
            now_micros(),
            self.tz()?,
        )
    }

    /// The range as a query string.
    pub(crate) fn query(&self) -> String {
        [
            ("window", &self.window),
            ("from", &self.from),
            ("to", &self.to),
            ("tz", &self.tz),
        ]
        .iter()
        .filter_map(|(name, value)| {
            let value = value.as_deref().filter(|v| !v.is_empty())?;
            Some(format!("{name}={}", layout::encode(value)))
        })
        .collect::<Vec<_>>()
        .join("&")
    }

    /// The range, in the viewer's time zone when the URL names none: the one their browser
    /// said (the `loom_tz` cookie the script sets).
    pub(crate) fn with_zone_of(mut self, headers: &HeaderMap) -> Range {
        if self.tz_name().is_none() {
            let jar = axum_extra::extract::cookie::CookieJar::from_headers(headers);
            self.tz = jar
                .get(ZONE_COOKIE)
                .map(|c| c.value().to_owned())
                .filter(|zone| zone.parse::<Tz>().is_ok());
        }
        self
    }

    /// The default range in time zone `tz` (if a valid one).
    pub(crate) fn in_zone(tz: Option<String>) -> Range {
        Range {
            tz,
            ..Range::default()
        }
    }

    /// The range's parameters but its time zone.
    pub(crate) fn pairs_without_tz(&self) -> Vec<(&'static str, String)> {
        [
            ("window", &self.window),
            ("from", &self.from),
            ("to", &self.to),
        ]
        .into_iter()
        .filter_map(|(name, value)| {
            let value = value.as_deref().filter(|v| !v.is_empty())?;
            Some((name, value.to_owned()))
        })
        .collect()
    }

    /// The time zone the URL names, if any.
    pub(crate) fn tz_name(&self) -> Option<&str> {
        self.tz.as_deref().filter(|t| !t.is_empty())
    }

    pub(crate) fn preset(&self) -> &str {
        match (&self.from, &self.window) {
            (Some(from), _) if !from.is_empty() => "custom",
            (_, Some(window)) if !window.is_empty() => window,
            _ => "24h",
        }
    }
}

/// The time zone the browser reports (set by the script), used when a URL names none.
pub(crate) const ZONE_COOKIE: &str = "loom_tz";

/// The range picker of a page at `path`: the presets, and a custom range.
pub(crate) fn ranges(path: &str, range: &Range) -> Markup {
    let preset = range.preset();
    html! {
        nav.ranges aria-label="Time range" {
            @for (window, label) in RANGES {
                a href=(format!("{path}?window={window}{}", tz_param(range)))
                    aria-current=[(preset == window).then_some("true")] { (label) }
            }
            details.custom open[preset == "custom"] {
                summary { "Custom" }
                form method="get" action=(path) {
                    label { "From" input type="text" name="from" value=[range.from.as_deref()] placeholder="2026-12-01 or RFC 3339" required; }
                    label { "To" input type="text" name="to" value=[range.to.as_deref()] placeholder="now"; }
                    @if let Some(tz) = range.tz_name() { input type="hidden" name="tz" value=(tz); }
                    button type="submit" { "Apply" }
                }
            }
        }
    }
}

pub(crate) async fn page(viewer: Viewer, Query(range): Query<Range>) -> Response {
    let query = range.query();
    let widget = |name: &str| format!("/ui/home/{name}?{query}");
    let main = html! {
        div.bar {
            h1 { "Home" }
            (ranges("/", &range))
        }
        section.widget.kpis data-src=(widget("kpis")) data-refresh="30" aria-live="polite" {
            p.loading { "Loading the numbers…" }
        }
        div.columns {
            section.widget data-src=(widget("alerts")) data-refresh="30" {
                h2 { "Alerts" }
                p.loading { "Loading alerts…" }
            }
            section.widget data-src=(widget("activity")) data-refresh="30" {
                h2 { "Recent activity" }
                p.loading { "Loading activity…" }
            }
        }
    };
    layout::page("Home", &viewer, Nav::Home, main).into_response()
}

fn tz_param(range: &Range) -> String {
    match range.tz.as_deref().filter(|t| !t.is_empty()) {
        Some(tz) => format!("&tz={}", layout::encode(tz)),
        None => String::new(),
    }
}

/// A widget that could not be drawn: what went wrong, in its place.
pub(crate) fn problem(title: Option<&str>, error: &AnalyticsError) -> Response {
    let (status, text) = match error {
        AnalyticsError::Invalid(message) => (StatusCode::BAD_REQUEST, message.clone()),
        AnalyticsError::Unavailable(message) => {
            (StatusCode::SERVICE_UNAVAILABLE, (*message).to_owned())
        }
        AnalyticsError::NotFound(message) => (StatusCode::NOT_FOUND, message.clone()),
        other => {
            tracing::error!(error = %other, "a dashboard widget failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "The numbers could not be read; see the server log.".to_owned(),
            )
        }
    };
    let body = html! {
        @if let Some(title) = title { h2 { (title) } }
        p.problem role="alert" { (text) }
    };
    (status, body).into_response()
}

pub(crate) fn analytics(ui: &Ui) -> Result<&Analytics, AnalyticsError> {
    ui.query
        .analytics
        .as_deref()
        .ok_or(AnalyticsError::Unavailable(
            "Analytics need read models: start `loom serve` without `--read-models off`.",
        ))
}

/// The viewer's question: their tenant (their project, if bound to one), in the range.
pub(crate) fn question(viewer: &Viewer, range: &Range) -> Result<Question, AnalyticsError> {
    let principal = viewer.principal();
    Ok(Question {
        scope: principal.scope,
        window: range.window()?,
        filters: Filters {
            project: principal.project.map(|p| p.to_string()),
            ..Filters::default()
        },
    })
}

pub(crate) async fn kpis(
    State(ui): State<Ui>,
    viewer: Viewer,
    headers: HeaderMap,
    Query(range): Query<Range>,
) -> Response {
    let range = range.with_zone_of(&headers);
    let answer = async {
        let question = question(&viewer, &range)?;
        let (current, previous) = analytics(&ui)?.summary(&question).await?;
        Ok::<_, AnalyticsError>((current.metrics(), previous.metrics()))
    };
    match answer.await {
        Ok((current, previous)) => {
            kpi_cards(&current, &compare(&current, &previous)).into_response()
        }
        Err(error) => problem(None, &error),
    }
}

/// Whether a rise is good news (requests, tokens) or bad (latency, errors, cost), for colour.
#[derive(Clone, Copy)]
enum Better {
    Up,
    Down,
    Neither,
}

fn kpi_cards(current: &Metrics, changes: &BTreeMap<String, Compared>) -> Markup {
    let cards: [(&str, &str, String, Better); 6] = [
        (
            "requests",
            "Requests",
            count(current.requests),
            Better::Neither,
        ),
        (
            "latency_avg_ms",
            "Avg latency",
            millis(current.latency_avg_ms),
            Better::Down,
        ),
        (
            "latency_p95_ms",
            "p95 latency",
            millis(current.latency_p95_ms),
            Better::Down,
        ),
        (
            "error_rate",
            "Error rate",
            percent(current.error_rate),
            Better::Down,
        ),
        (
            "cost_usd",
            "Cost",
            dollars(current.cost_usd),
            Better::Neither,
        ),
        (
            "tokens_total",
            "Tokens",
            count(current.tokens_total),
            Better::Up,
        ),
    ];
    html! {
        @if current.requests == 0 {
            p.empty { "No requests in this range yet. Send one through " code { "/v1/chat/completions" } " and it shows here." }
        }
        div.cards {
            @for (metric, label, value, better) in cards {
                div.card data-metric=(metric) {
                    span.label { (label) }
                    span.value { (value) }
                    (change(changes.get(metric), better))
                }
            }
        }
    }
}

fn change(compared: Option<&Compared>, better: Better) -> Markup {
    let Some(pct) = compared.and_then(|c| c.change_pct) else {
        return html! { span.change title="Nothing to compare with in the period before" { "–" } };
    };
    let tone = match (better, pct > 0.0) {
        _ if pct.abs() < 0.5 => "flat",
        (Better::Neither, _) => "flat",
        (Better::Up, true) | (Better::Down, false) => "good",
        (Better::Up, false) | (Better::Down, true) => "bad",
    };
    let arrow = if pct > 0.0 {
        "▲"
    } else if pct < 0.0 {
        "▼"
    } else {
        ""
    };
    html! {
        span class=(format!("change {tone}")) title="Change against the period before, of the same length" {
            (arrow) " " (format!("{:.1} %", pct.abs()))
        }
    }
}

pub(crate) async fn alerts(State(ui): State<Ui>, viewer: Viewer) -> Response {
    let principal = viewer.principal();
    let filters = Filters {
        project: principal.project.map(|p| p.to_string()),
        ..Filters::default()
    };
    let answer = async {
        let analytics = analytics(&ui)?;
        analytics
            .alerts(principal.scope, &filters, now_micros())
            .await
    };
    match answer.await {
        Ok(alerts) => html! {
            h2 { "Alerts" }
            @if alerts.is_empty() {
                p.empty { "All quiet: no error spikes, failing upstreams, quotas near their limit or policy blocks." }
            } @else {
                ul.alerts {
                    @for alert in &alerts {
                        li class=(alert.severity) {
                            strong { (alert.title) }
                            " " span.subject { (alert.subject) }
                        }
                    }
                }
            }
        }
        .into_response(),
        Err(error) => problem(Some("Alerts"), &error),
    }
}

pub(crate) async fn activity(
    State(ui): State<Ui>,
    viewer: Viewer,
    headers: HeaderMap,
    Query(range): Query<Range>,
) -> Response {
    let range = range.with_zone_of(&headers);
    let answer = async {
        let question = question(&viewer, &range)?;
        let rows = analytics(&ui)?.recent(&question, 10).await?;
        Ok::<_, AnalyticsError>((rows, range.tz()?))
    };
    match answer.await {
        Ok((rows, tz)) => recent(&rows, tz).into_response(),
        Err(error) => problem(Some("Recent activity"), &error),
    }
}

fn recent(rows: &[RequestRow], tz: Tz) -> Markup {
    html! {
        h2 { "Recent activity" }
        @if rows.is_empty() {
            p.empty { "No requests in this range." }
        } @else {
            table.rows {
                thead { tr { th { "When" } th { "Model" } th { "Status" } th.num { "Latency" } th.num { "Cost" } } }
                tbody {
                    @for row in rows {
                        tr {
                            td { time datetime=(row.started_at) { (local_time(&row.started_at, tz)) } }
                            td { (row.model.as_deref().unwrap_or("–")) }
                            td { span class=(format!("status {}", row.status.as_deref().unwrap_or("pending"))) { (row.status.as_deref().unwrap_or("in flight")) } }
                            td.num { (millis(row.latency_ms)) }
                            td.num { (row.cost_usd.map_or("–".to_owned(), dollars)) }
                        }
                    }
                }
            }
        }
    }
}

/// An RFC 3339 time in `tz`, to the second.
pub(crate) fn local_time(rfc3339: &str, tz: Tz) -> String {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .map(|at| rfc3339_in(at.timestamp_micros(), tz))
        .map(|text| text.replace('T', " ").chars().take(19).collect())
        .unwrap_or_else(|_| rfc3339.to_owned())
}

pub(crate) fn count(n: i64) -> String {
    let n = n as f64;
    match n.abs() {
        x if x >= 1e9 => format!("{:.1}B", n / 1e9),
        x if x >= 1e6 => format!("{:.1}M", n / 1e6),
        x if x >= 1e4 => format!("{:.1}k", n / 1e3),
        _ => format!("{n}"),
    }
}

pub(crate) fn millis(ms: Option<f64>) -> String {
    match ms {
        None => "–".into(),
        Some(ms) if ms >= 1000.0 => format!("{:.2} s", ms / 1000.0),
        Some(ms) => format!("{ms:.1} ms"),
    }
}

pub(crate) fn percent(rate: f64) -> String {
    format!("{:.2} %", rate * 100.0)
}

pub(crate) fn dollars(usd: f64) -> String {
    match usd {
        0.0 => "$0".into(),
        x if x.abs() < 0.0001 => "<$0.0001".into(),
        x if x.abs() < 0.01 => format!("${x:.4}"),
        x => format!("${x:.2}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_read_as_people_write_them() {
        assert_eq!(count(950), "950");
        assert_eq!(count(12_345), "12.3k");
        assert_eq!(count(2_500_000), "2.5M");
        assert_eq!(millis(Some(12.34)), "12.3 ms");
        assert_eq!(millis(Some(1500.0)), "1.50 s");
        assert_eq!(millis(None), "–");
        assert_eq!(percent(0.0125), "1.25 %");
        assert_eq!(dollars(0.0), "$0");
        assert_eq!(dollars(0.00042), "$0.0004");
        assert_eq!(dollars(0.0000057), "<$0.0001");
        assert_eq!(dollars(12.5), "$12.50");
    }

    #[test]
    fn a_range_keeps_what_the_url_said() {
        let range = Range {
            window: Some("7d".into()),
            tz: Some("Europe/Berlin".into()),
            ..Range::default()
        };
        assert_eq!(range.query(), "window=7d&tz=Europe%2FBerlin");
        assert_eq!(range.preset(), "7d");
        assert!(range.window().is_ok());
        let bad = Range {
            tz: Some("Mars/Olympus".into()),
            ..Range::default()
        };
        assert!(bad.window().is_err());
    }
}
