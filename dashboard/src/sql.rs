//! The SQL console: a query over the viewer's archive (the same service as `POST /v1/sql`, as
//! them), its rows as a table, as CSV, errors said plainly, the limits in sight.

use axum::extract::{Form, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use loom_query::format::{self, Format};
use loom_query::sql::{Answer, SqlError};
use maud::{Markup, html};
use serde::Deserialize;

use crate::Ui;
use crate::layout::{self, Nav};
use crate::session::Viewer;

/// Rows shown on the page at most (the CSV has every row the query returned).
const SHOWN: usize = 500;

const EXAMPLE: &str =
    "SELECT event_type, count(*) AS events\nFROM events\nGROUP BY event_type\nORDER BY events DESC";

#[derive(Debug, Default, Deserialize)]
pub(crate) struct SqlForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    query: String,
}

/// What running a query gave.
enum Outcome {
    Rows(Answer),
    Refused(StatusCode, String),
}

async fn run(ui: &Ui, viewer: &Viewer, query: &str) -> Outcome {
    let principal = viewer.principal();
    if principal.project.is_some() {
        return Outcome::Refused(
            StatusCode::FORBIDDEN,
            "SQL reads the whole organization's archive: sign in with an account or key of the \
             whole organization, or use Traces and Analytics for your project."
                .into(),
        );
    }
    let Some(sql) = &ui.query.sql else {
        return Outcome::Refused(
            StatusCode::SERVICE_UNAVAILABLE,
            "This server keeps no archive (it was started with --archive off).".into(),
        );
    };
    if query.trim().is_empty() {
        return Outcome::Refused(StatusCode::BAD_REQUEST, "Write a query first.".into());
    }
    match sql.query(principal.scope, principal.access, query).await {
        Ok(answer) => Outcome::Rows(answer),
        Err(error) => {
            let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::BAD_REQUEST);
            let message = match &error {
                _ if status.is_server_error() => {
                    tracing::error!(%error, "a dashboard SQL query failed");
                    "The archive could not be read; the server's log has the details.".to_owned()
                }
                SqlError::Busy(_) => format!("{error} Try again in a moment."),
                _ => error.to_string(),
            };
            Outcome::Refused(status, message)
        }
    }
}

pub(crate) async fn page(State(ui): State<Ui>, viewer: Viewer) -> Response {
    console(&ui, &viewer, EXAMPLE, None).into_response()
}

pub(crate) async fn submit(
    State(ui): State<Ui>,
    viewer: Viewer,
    Form(form): Form<SqlForm>,
) -> Response {
    if let Some(refused) = viewer.check_form(&form.token) {
        return refused;
    }
    let outcome = run(&ui, &viewer, &form.query).await;
    let status = match &outcome {
        Outcome::Rows(_) => StatusCode::OK,
        Outcome::Refused(status, _) => *status,
    };
    (status, console(&ui, &viewer, &form.query, Some(&outcome))).into_response()
}

pub(crate) async fn csv(
    State(ui): State<Ui>,
    viewer: Viewer,
    Form(form): Form<SqlForm>,
) -> Response {
    if let Some(refused) = viewer.check_form(&form.token) {
        return refused;
    }
    match run(&ui, &viewer, &form.query).await {
        Outcome::Rows(answer) => {
            match format::write(Format::Csv, &answer.schema, &answer.batches) {
                Ok(bytes) => (
                    [
                        (
                            header::CONTENT_TYPE,
                            HeaderValue::from_static("text/csv; charset=utf-8"),
                        ),
                        (
                            header::CONTENT_DISPOSITION,
                            HeaderValue::from_static("attachment; filename=\"loom-query.csv\""),
                        ),
                    ],
                    bytes,
                )
                    .into_response(),
                Err(error) => (
                    StatusCode::BAD_REQUEST,
                    format!("The result cannot be written as CSV: {error}"),
                )
                    .into_response(),
            }
        }
        Outcome::Refused(status, message) => (status, message).into_response(),
    }
}

fn console(ui: &Ui, viewer: &Viewer, query: &str, outcome: Option<&Outcome>) -> Markup {
    let limits = ui.query.sql.as_ref().map(|sql| sql.limits().clone());
    let main = html! {
        h1 { "SQL" }
        p.empty {
            "Your organization's archive: every event as table " code { "events" } " (docs/query.md)."
            @if let Some(limits) = &limits {
                " At most " (limits.max_rows) " rows and " (limits.max_bytes >> 20) " MiB per answer, "
                (limits.timeout.as_secs()) " s and " (limits.memory_bytes >> 20) " MiB of memory per query."
            }
            @if !viewer.principal().access.eq(&loom_query::archive::Access::Full) {
                " Your role reads metadata: the " code { "record" } " column (whole events) is not yours to select."
            }
        }
        form.stack.sql method="post" action="/sql" {
            input type="hidden" name="token" value=(viewer.form_token());
            label { "Query" textarea name="query" rows="8" spellcheck="false" data-search { (query) } }
            div.buttons {
                button.primary type="submit" { "Run" }
                button type="submit" formaction="/sql.csv" { "Download CSV" }
                span.empty { "Ctrl+Enter runs" }
            }
        }
        @match outcome {
            None => {}
            Some(Outcome::Refused(_, message)) => section.widget { p.problem role="alert" { (message) } },
            Some(Outcome::Rows(answer)) => section.widget { (rows(answer)) },
        }
    };
    layout::page("SQL", viewer, Nav::Sql, main)
}

fn rows(answer: &Answer) -> Markup {
    let options = FormatOptions::default().with_null("NULL");
    let names: Vec<&str> = answer
        .schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect();
    // The first SHOWN rows, batch by batch.
    let mut left = SHOWN;
    let parts: Vec<(&RecordBatch, usize)> = (answer.batches.iter())
        .map(|batch| {
            let rows = batch.num_rows().min(left);
            left -= rows;
            (batch, rows)
        })
        .collect();
    html! {
        p.empty {
            (answer.rows) " row(s) in " (format!("{:.0}", answer.elapsed.as_secs_f64() * 1000.0)) " ms"
            @if answer.truncated { " — cut at the limit" }
            @if answer.rows > SHOWN { "; the first " (SHOWN) " shown, the CSV has them all" }
            "."
        }
        div.scroll {
            table.rows.result {
                thead { tr { @for name in &names { th { (name) } } } }
                tbody {
                    @for (batch, rows) in &parts {
                        @let formatters: Vec<_> = batch.columns().iter()
                            .filter_map(|c| ArrayFormatter::try_new(c.as_ref(), &options).ok()).collect();
                        @for row in 0..*rows {
                            tr { @for cell in &formatters { td { (cell.value(row).to_string()) } } }
                        }
                    }
                }
            }
        }
    }
}
