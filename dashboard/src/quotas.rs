//! Quotas: what each scope of the viewer's organization (the organization itself, its projects,
//! users and keys) has used today against its limits, with where the day is heading at its
//! pace so far. The same view as `GET /admin/quotas`, as the viewer.

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use loom_gateway::{AdminError, LimitsPatch, QuotaQuery, QuotaRequest, QuotaView};
use loom_schemas::event::now_micros;
use loom_schemas::roles::Permission;
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use crate::Ui;
use crate::home::{count, dollars};
use crate::layout::{self, Nav};
use crate::session::Viewer;

const SCOPES: [(&str, &str); 4] = [
    ("tenant", "Organization"),
    ("project", "Projects"),
    ("user", "Users"),
    ("key", "API keys"),
];

const DAY_US: i64 = 86_400_000_000;

/// How far into the UTC day (when budgets reset) it is, 0 to 1.
fn day_elapsed(now_us: i64) -> f64 {
    (now_us.rem_euclid(DAY_US)) as f64 / DAY_US as f64
}

/// Today's usage at its pace so far, by the end of the day; `None` early in the day, when a
/// few minutes say little.
fn projection(used: i64, elapsed: f64) -> Option<i64> {
    (elapsed >= 1.0 / 96.0).then(|| (used as f64 / elapsed).round() as i64)
}

pub(crate) async fn page(State(ui): State<Ui>, viewer: Viewer) -> Response {
    render(&ui, &viewer, None, StatusCode::OK)
}

fn render(ui: &Ui, viewer: &Viewer, problem: Option<String>, status: StatusCode) -> Response {
    let actor = viewer.actor();
    let elapsed = day_elapsed(now_micros());
    let sections: Vec<(&str, Result<Vec<QuotaView>, AdminError>)> = SCOPES
        .iter()
        .map(|(scope, title)| {
            let query = QuotaQuery {
                tenant_id: None,
                scope: (*scope).to_owned(),
                id: None,
            };
            (*title, ui.usage.show_quotas(&ui.services, &actor, &query))
        })
        .collect();
    let name = |scope: &str, id: &str| -> String {
        let Ok(uuid) = id.parse::<Uuid>() else {
            return id.to_owned();
        };
        ui.services
            .control
            .read(|s| match scope {
                "project" => s.project(uuid).map(|p| p.name.clone()),
                "key" => s
                    .key(uuid)
                    .map(|k| k.name.clone().unwrap_or_else(|| k.prefix.clone())),
                "tenant" => s.tenant(uuid).map(|t| t.name.clone()),
                _ => None,
            })
            .unwrap_or_else(|| id.to_owned())
    };
    let manages = viewer.signed_in.role.allows(Permission::ManageTenant);
    let main = html! {
        h1 { "Quotas" }
        @if let Some(problem) = &problem { p.problem role="alert" { (problem) } }
        p.empty { "Today's usage (UTC day, as this gateway counts it) against each limit; "
            "“on pace for” is where the day ends at today's pace so far." }
        @for (title, views) in &sections {
            section.widget {
                h2 { (title) }
                @match views {
                    Err(error) => p.problem role="alert" { (error.to_string()) },
                    Ok(views) if views.is_empty() => p.empty { "No limits set and nothing counted today." },
                    Ok(views) => (table(views, elapsed, &name)),
                }
            }
        }
        @if manages { (limit_form(&viewer.form_token())) }
    };
    (status, layout::page("Quotas", viewer, Nav::Quotas, main)).into_response()
}

/// The form that sets a scope's limits (admins and owners).
fn limit_form(token: &str) -> Markup {
    html! {
        section.widget {
            h2 { "Set limits" }
            p.empty { "A limit left blank stays as it is; 0 is unlimited. The id is a project or key id, or a user's id (blank for the organization)." }
            form.inline method="post" action="/quotas" {
                input type="hidden" name="token" value=(token);
                label { "Scope" select name="scope" { @for (scope, title) in SCOPES { option value=(scope) { (title) } } } }
                label { "Id" input type="text" name="id"; }
                label { "Tokens / day" input type="text" name="tokens_per_day" inputmode="numeric"; }
                label { "Cost / day (USD)" input type="text" name="cost_usd_per_day" inputmode="decimal"; }
                label { "Requests / min" input type="text" name="requests_per_minute" inputmode="numeric"; }
                label { "Tokens / min" input type="text" name="tokens_per_minute" inputmode="numeric"; }
                button type="submit" { "Set" }
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct LimitForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    id: String,
    #[serde(default)]
    tokens_per_day: String,
    #[serde(default)]
    cost_usd_per_day: String,
    #[serde(default)]
    requests_per_minute: String,
    #[serde(default)]
    tokens_per_minute: String,
}

/// A limit as typed: blank is unchanged, else a whole number of at least 0 (`scale` turns USD
/// into micro-USD).
fn limit(field: &str, text: &str, scale: f64) -> Result<Option<Option<i64>>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    match text.trim_start_matches('$').parse::<f64>() {
        Ok(value) if value.is_finite() && value >= 0.0 => {
            Ok(Some(Some((value * scale).round() as i64)))
        }
        _ => Err(format!("{field}: {text:?} is not a number of 0 or more")),
    }
}

pub(crate) async fn set(
    State(ui): State<Ui>,
    viewer: Viewer,
    Form(form): Form<LimitForm>,
) -> Response {
    if let Some(refused) = viewer.check_form(&form.token) {
        return refused;
    }
    let limits = (|| {
        Ok::<_, String>(LimitsPatch {
            tokens_per_day: limit("tokens per day", &form.tokens_per_day, 1.0)?,
            cost_micro_usd_per_day: limit("cost per day", &form.cost_usd_per_day, 1e6)?,
            requests_per_minute: limit("requests per minute", &form.requests_per_minute, 1.0)?,
            tokens_per_minute: limit("tokens per minute", &form.tokens_per_minute, 1.0)?,
        })
    })();
    let limits = match limits {
        Ok(limits) => limits,
        Err(problem) => return render(&ui, &viewer, Some(problem), StatusCode::BAD_REQUEST),
    };
    let request = QuotaRequest {
        tenant_id: None,
        scope: form.scope.clone(),
        id: Some(form.id.trim().to_owned()).filter(|id| !id.is_empty()),
        limits,
    };
    match ui
        .usage
        .set_quota(&ui.services, &viewer.actor(), &request)
        .await
    {
        Ok(_) => Redirect::to("/quotas").into_response(),
        Err(error) => {
            let status = match &error {
                AdminError::PermissionDenied(_) | AdminError::Forbidden(_) => StatusCode::FORBIDDEN,
                AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
                AdminError::UnknownKey(_) | AdminError::UnknownProject(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            render(&ui, &viewer, Some(error.to_string()), status)
        }
    }
}

fn table(views: &[QuotaView], elapsed: f64, name: &dyn Fn(&str, &str) -> String) -> Markup {
    html! {
        table.rows {
            thead { tr {
                th { "Name" } th.num { "Tokens today" } th { "" } th.num { "Cost today" } th { "" }
                th.num { "Requests / min" } th.num { "Tokens / min" }
            } }
            tbody {
                @for view in views {
                    @let used = view.used.unwrap_or_default();
                    tr data-scope=(view.scope) {
                        td { (name(&view.scope, &view.id)) }
                        td.num { (count(used.tokens)) " / " (view.limits.tokens_per_day.map_or("∞".to_owned(), count)) }
                        td { (meter(used.tokens, view.limits.tokens_per_day, elapsed, count)) }
                        td.num { (dollars(used.cost_micro_usd as f64 / 1e6)) " / " (view.limits.cost_micro_usd_per_day.map_or("∞".to_owned(), |l| dollars(l as f64 / 1e6))) }
                        td { (meter(used.cost_micro_usd, view.limits.cost_micro_usd_per_day, elapsed, |m| dollars(m as f64 / 1e6))) }
                        td.num { (view.limits.requests_per_minute.map_or("∞".to_owned(), count)) }
                        td.num { (view.limits.tokens_per_minute.map_or("∞".to_owned(), count)) }
                    }
                }
            }
        }
    }
}

/// A bar of `used` against `limit`, and the day's projection (marked when it passes the limit).
fn meter(used: i64, limit: Option<i64>, elapsed: f64, show: impl Fn(i64) -> String) -> Markup {
    let projected = projection(used, elapsed);
    let Some(limit) = limit.filter(|l| *l > 0) else {
        return html! { @if let Some(p) = projected { span.pace { "on pace for " (show(p)) } } };
    };
    let share = (used as f64 / limit as f64).clamp(0.0, 1.0);
    let over = projected.is_some_and(|p| p > limit);
    html! {
        span class=(if share >= 0.8 { "meter usage high" } else { "meter usage" }) title=(format!("{:.0} % of the limit", share * 100.0)) {
            span style=(format!("width:{:.1}%", share * 100.0)) {}
        }
        @if let Some(p) = projected {
            " " span class=(if over { "pace over" } else { "pace" }) { "on pace for " (show(p)) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_day_is_projected_at_its_pace_so_far() {
        assert_eq!(day_elapsed(DAY_US * 3 + DAY_US / 4), 0.25);
        assert_eq!(projection(1_000, 0.25), Some(4_000));
        assert_eq!(projection(1_000, 0.001), None);
    }
}
