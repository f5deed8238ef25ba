//! Policy: what the security policy found in the range — by project, rule, the action taken and
//! whether in prompts or answers — never the secret itself (the events carry only the rule, its
//! place and a keyed digest).

use std::collections::BTreeMap;

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use loom_gateway::{AdminError, ProjectPatch};
use loom_query::analytics::{FindingCount, MAX_EVALUATIONS};
use loom_schemas::project::SecurityPolicy;
use loom_schemas::roles::Permission;
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use crate::Ui;
use crate::home::{Range, analytics, count, problem, question, ranges};
use crate::layout::{self, Nav};
use crate::session::Viewer;

pub(crate) async fn page(
    State(ui): State<Ui>,
    viewer: Viewer,
    Query(range): Query<Range>,
) -> Response {
    render(&ui, &viewer, &range, None, StatusCode::OK)
}

fn render(
    ui: &Ui,
    viewer: &Viewer,
    range: &Range,
    problem: Option<String>,
    status: StatusCode,
) -> Response {
    let query = range.query();
    let main = html! {
        div.bar {
            h1 { "Policy" }
            (ranges("/policy", range))
        }
        @if let Some(problem) = &problem { p.problem role="alert" { (problem) } }
        p.empty { "What the security policy found in prompts and answers: the rule, and what was done. "
            "Never the secret itself — Loom records only where it was and a keyed digest (docs/policy.md)." }
        section.widget data-src=(format!("/ui/policy/findings?{query}")) data-refresh="60" {
            p.loading { "Loading findings…" }
        }
        @if viewer.signed_in.role.allows(Permission::ManageTenant) { (editors(ui, viewer)) }
    };
    (status, layout::page("Policy", viewer, Nav::Policy, main)).into_response()
}

/// Each project's security policy as JSON, to edit (admins and owners; docs/policy.md).
fn editors(ui: &Ui, viewer: &Viewer) -> Markup {
    let projects = ui.services.list_projects(&viewer.actor(), None);
    html! {
        section.widget {
            h2 { "Security policy per project" }
            @match &projects {
                Err(error) => p.problem { (error.to_string()) },
                Ok(projects) if projects.is_empty() => p.empty { "No projects: requests outside a project use the default policy." },
                Ok(projects) => @for project in projects {
                    details.policy {
                        summary { (project.name) " — version " (project.version) }
                        form.stack method="post" action=(format!("/policy/{}", project.project_id)) {
                            input type="hidden" name="token" value=(viewer.form_token());
                            input type="hidden" name="expected_version" value=(project.version);
                            label { "Policy (JSON)"
                                textarea name="policy" rows="12" spellcheck="false" {
                                    (serde_json::to_string_pretty(&project.security_policy).unwrap_or_default())
                                }
                            }
                            div.buttons { button.primary type="submit" { "Save" } }
                        }
                    }
                },
            }
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct PolicyForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    policy: String,
    #[serde(default)]
    expected_version: Option<i64>,
}

/// Saves a project's policy: checked as the API checks it, refused if the project moved on.
pub(crate) async fn save(
    State(ui): State<Ui>,
    viewer: Viewer,
    Path(project_id): Path<Uuid>,
    Form(form): Form<PolicyForm>,
) -> Response {
    if let Some(refused) = viewer.check_form(&form.token) {
        return refused;
    }
    let range = Range::default();
    let policy: SecurityPolicy = match serde_json::from_str(&form.policy) {
        Ok(policy) => policy,
        Err(error) => {
            let problem = format!("The policy is not valid: {error}");
            return render(&ui, &viewer, &range, Some(problem), StatusCode::BAD_REQUEST);
        }
    };
    let patch = ProjectPatch {
        security_policy: Some(policy),
        expected_version: form.expected_version,
        ..ProjectPatch::default()
    };
    match ui
        .services
        .update_project(&viewer.actor(), project_id, &patch)
        .await
    {
        Ok(_) => Redirect::to("/policy").into_response(),
        Err(error) => {
            let status = match &error {
                AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
                AdminError::PermissionDenied(_) | AdminError::Forbidden(_) => StatusCode::FORBIDDEN,
                AdminError::Conflict(_) => StatusCode::CONFLICT,
                AdminError::UnknownProject(_) => StatusCode::NOT_FOUND,
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            render(&ui, &viewer, &range, Some(error.to_string()), status)
        }
    }
}

pub(crate) async fn findings(
    State(ui): State<Ui>,
    viewer: Viewer,
    headers: HeaderMap,
    Query(range): Query<Range>,
) -> Response {
    let range = range.with_zone_of(&headers);
    let answer = async {
        let question = question(&viewer, &range)?;
        analytics(&ui)?.policy_findings(&question).await
    };
    match answer.await {
        Ok((found, cut)) => {
            let names = project_names(&ui, &found);
            view(&found, cut, &names).into_response()
        }
        Err(error) => problem(None, &error),
    }
}

fn project_names(ui: &Ui, found: &[FindingCount]) -> BTreeMap<String, String> {
    ui.services.control.read(|state| {
        found
            .iter()
            .filter_map(|f| f.project_id.as_deref())
            .filter_map(|id| {
                let project = state.project(id.parse::<Uuid>().ok()?)?;
                Some((id.to_owned(), project.name.clone()))
            })
            .collect()
    })
}

fn view(found: &[FindingCount], cut: bool, names: &BTreeMap<String, String>) -> Markup {
    let mut by_action: BTreeMap<&str, i64> = BTreeMap::new();
    for finding in found {
        *by_action.entry(finding.action.as_str()).or_default() += finding.findings;
    }
    html! {
        @if found.is_empty() {
            p.empty { "No findings in this range." }
        } @else {
            div.cards {
                @for (action, n) in &by_action {
                    div.card data-action=(action) { span.label { (action) } span.value { (count(*n)) } }
                }
            }
            @if cut {
                p.problem { "Only the first " (MAX_EVALUATIONS) " evaluations are counted: narrow the range." }
            }
            table.rows.findings {
                thead { tr {
                    th { "Project" } th { "Rule" } th { "Action" } th { "In" }
                    th.num { "Findings" } th.num { "Requests" }
                } }
                tbody {
                    @for finding in found {
                        @let project = finding.project_id.as_deref();
                        tr {
                            td { (project.map(|p| names.get(p).map_or(p, String::as_str)).unwrap_or("(no project)")) }
                            td { code { (finding.rule) } }
                            td { span class=(format!("action {}", finding.action)) { (finding.action) } }
                            td { @if finding.direction == "output" { "answers" } @else { "prompts" } }
                            td.num { (count(finding.findings)) }
                            td.num { (count(finding.requests)) }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn findings_are_totalled_by_action_and_named_by_project() {
        let finding = |rule: &str, action: &str, n| FindingCount {
            project_id: Some("p1".into()),
            rule: rule.into(),
            action: action.into(),
            direction: "prompt".into(),
            findings: n,
            requests: n,
        };
        let found = [
            finding("openai_api_key", "block", 2),
            finding("email", "flag", 3),
        ];
        let names = BTreeMap::from([("p1".to_owned(), "Support bot".to_owned())]);
        let html = view(&found, false, &names).into_string();
        assert!(html.contains("Support bot"));
        assert!(html.contains(r#"data-action="block""#));
        assert!(html.contains("openai_api_key"));
        assert!(
            view(&[], false, &names)
                .into_string()
                .contains("No findings")
        );
    }
}
