//! Admin (admins and owners): the organization's projects, API keys (a new key's secret shown
//! once) and members' roles — through the same admin services as `/admin/*`, as the viewer.

use axum::extract::{Form, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use loom_gateway::{AdminError, CreatedKey, GrantRequest, KeyRequest, ProjectRequest};
use loom_schemas::roles::{Permission, Role};
use maud::{Markup, html};
use serde::Deserialize;
use uuid::Uuid;

use crate::Ui;
use crate::layout::{self, Nav};
use crate::session::Viewer;

/// What the page says above its sections after an action.
enum Notice {
    None,
    Created(CreatedKey),
    Problem(String),
}

/// The page, or the refusal of a viewer whose role may not manage the organization.
pub(crate) async fn page(State(ui): State<Ui>, viewer: Viewer) -> Response {
    render(&ui, &viewer, Notice::None, StatusCode::OK)
}

fn render(ui: &Ui, viewer: &Viewer, notice: Notice, status: StatusCode) -> Response {
    if !viewer.signed_in.role.allows(Permission::ManageTenant) {
        let main = html! {
            h1 { "Admin" }
            p.problem { "Managing the organization needs the admin role or above; you are "
                (viewer.signed_in.role.name()) "." }
        };
        let page = layout::page("Admin", viewer, Nav::Manage, main);
        return (StatusCode::FORBIDDEN, page).into_response();
    }
    let actor = viewer.actor();
    let token = viewer.form_token();
    let projects = ui.services.list_projects(&actor, None);
    let keys = ui.services.list_keys(&actor, None);
    let members = ui.services.list_members(&actor, None);
    let project_name = |id: Option<Uuid>| -> String {
        let Some(id) = id else {
            return "whole organization".into();
        };
        (projects.as_ref().ok())
            .and_then(|all| all.iter().find(|p| p.project_id == id))
            .map_or_else(|| id.to_string(), |p| p.name.clone())
    };
    let main = html! {
        h1 { "Admin" }
        @match &notice {
            Notice::None => {}
            Notice::Problem(problem) => p.problem role="alert" { (problem) },
            Notice::Created(key) => section.widget.created role="status" {
                h2 { "New API key" }
                p { "Copy it now: it is shown this once and never stored." }
                pre.secret data-new-key { (key.key) }
            },
        }
        section.widget {
            h2 { "Projects" }
            @match &projects {
                Err(error) => p.problem { (error.to_string()) },
                Ok(projects) if projects.is_empty() => p.empty { "No projects yet." },
                Ok(projects) => table.rows {
                    thead { tr { th { "Name" } th { "Id" } th.num { "Version" } } }
                    tbody { @for project in projects { tr {
                        td { (project.name) } td { code { (project.project_id) } } td.num { (project.version) }
                    } } }
                },
            }
            form.inline method="post" action="/manage/projects" {
                input type="hidden" name="token" value=(token);
                label { "New project " input type="text" name="name" required maxlength="256"; }
                button type="submit" { "Create" }
            }
        }
        section.widget {
            h2 { "API keys" }
            @match &keys {
                Err(error) => p.problem { (error.to_string()) },
                Ok(keys) if keys.is_empty() => p.empty { "No keys yet." },
                Ok(keys) => table.rows {
                    thead { tr { th { "Name" } th { "Prefix" } th { "Role" } th { "Project" } th { "State" } th {} } }
                    tbody { @for key in keys { tr data-key=(key.key_id) {
                        td { (key.name.as_deref().unwrap_or("–")) }
                        td { code { (key.prefix) "…" } }
                        td { (key.role.name()) }
                        td { (project_name(key.project_id)) }
                        td { @if key.revoked { "revoked" } @else { "active" } }
                        td { @if !key.revoked {
                            form method="post" action=(format!("/manage/keys/{}/revoke", key.key_id)) {
                                input type="hidden" name="token" value=(token);
                                button type="submit" { "Revoke" }
                            }
                        } }
                    } } }
                },
            }
            form.inline method="post" action="/manage/keys" {
                input type="hidden" name="token" value=(token);
                label { "Name " input type="text" name="name" maxlength="256"; }
                label { "Role " (role_select(viewer.signed_in.role, Role::Developer)) }
                @if let Ok(projects) = &projects {
                    label { "Project "
                        select name="project_id" {
                            option value="" { "whole organization" }
                            @for project in projects { option value=(project.project_id) { (project.name) } }
                        }
                    }
                }
                button type="submit" { "Create key" }
            }
        }
        section.widget {
            h2 { "Members" }
            @match &members {
                Err(error) => p.problem { (error.to_string()) },
                Ok(members) if members.is_empty() => p.empty { "No members." },
                Ok(members) => table.rows {
                    thead { tr { th { "User" } th { "Role" } th { "In" } th {} } }
                    tbody { @for member in members { tr {
                        td { (member.user) } td { (member.role.name()) } td { (project_name(member.project_id)) }
                        td {
                            form method="post" action="/manage/members/revoke" {
                                input type="hidden" name="token" value=(token);
                                input type="hidden" name="user" value=(member.user);
                                input type="hidden" name="role" value=(member.role.name());
                                @if let Some(project) = member.project_id { input type="hidden" name="project_id" value=(project); }
                                button type="submit" { "Revoke" }
                            }
                        }
                    } } }
                },
            }
            form.inline method="post" action="/manage/users" {
                input type="hidden" name="token" value=(token);
                label { "New user " input type="email" name="email" required placeholder="email"; }
                label { "Role " (role_select(viewer.signed_in.role, Role::Developer)) }
                label { "Initial password " input type="password" name="password" minlength="8" required autocomplete="new-password"; }
                button type="submit" { "Add user" }
            }
            p.empty { "A new user signs in with the email and initial password you give them, then changes it on their account page." }
            form.inline method="post" action="/manage/members" {
                input type="hidden" name="token" value=(token);
                label { "User " input type="text" name="user" required placeholder="email or id"; }
                label { "Role " (role_select(viewer.signed_in.role, Role::Viewer)) }
                button type="submit" { "Grant" }
            }
        }
    };
    (status, layout::page("Admin", viewer, Nav::Manage, main)).into_response()
}

/// The roles `holder` may give, `default` chosen.
fn role_select(holder: Role, default: Role) -> Markup {
    html! {
        select name="role" {
            @for role in Role::ALL.into_iter().filter(|r| holder.may_grant(*r)) {
                option value=(role.name()) selected[role == default] { (role.name()) }
            }
        }
    }
}

/// After an action: back to the page (so a reload does not post again), or the page with what
/// went wrong.
fn done(ui: &Ui, viewer: &Viewer, result: Result<(), AdminError>) -> Response {
    match result {
        Ok(()) => Redirect::to("/manage").into_response(),
        Err(error) => {
            let status = match &error {
                AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
                AdminError::PermissionDenied(_) | AdminError::Forbidden(_) => StatusCode::FORBIDDEN,
                AdminError::Conflict(_) => StatusCode::CONFLICT,
                AdminError::UnknownKey(_)
                | AdminError::UnknownProject(_)
                | AdminError::UnknownTenant(_) => StatusCode::NOT_FOUND,
                _ => {
                    tracing::error!(%error, "a dashboard admin action failed");
                    StatusCode::SERVICE_UNAVAILABLE
                }
            };
            render(ui, viewer, Notice::Problem(error.to_string()), status)
        }
    }
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct ProjectForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    name: String,
}

pub(crate) async fn create_project(
    State(ui): State<Ui>,
    viewer: Viewer,
    Form(form): Form<ProjectForm>,
) -> Response {
    if let Some(refused) = viewer.check_form(&form.token) {
        return refused;
    }
    let request = ProjectRequest {
        name: form.name,
        ..ProjectRequest::default()
    };
    let created = ui.services.create_project(&viewer.actor(), &request).await;
    done(&ui, &viewer, created.map(drop))
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct KeyForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    project_id: String,
}

pub(crate) async fn create_key(
    State(ui): State<Ui>,
    viewer: Viewer,
    Form(form): Form<KeyForm>,
) -> Response {
    if let Some(refused) = viewer.check_form(&form.token) {
        return refused;
    }
    let project_id = match form.project_id.trim() {
        "" => None,
        id => match id.parse::<Uuid>() {
            Ok(id) => Some(id),
            Err(_) => {
                return done(
                    &ui,
                    &viewer,
                    Err(AdminError::Invalid("project: not a project id".into())),
                );
            }
        },
    };
    let request = KeyRequest {
        name: Some(form.name.trim().to_owned()).filter(|n| !n.is_empty()),
        role: Some(form.role).filter(|r| !r.is_empty()),
        project_id,
        ..KeyRequest::default()
    };
    match ui.services.create_key(&viewer.actor(), &request).await {
        // The secret is shown in this answer only: never in a URL, never again.
        Ok(created) => render(&ui, &viewer, Notice::Created(created), StatusCode::CREATED),
        Err(error) => done(&ui, &viewer, Err(error)),
    }
}

pub(crate) async fn revoke_key(
    State(ui): State<Ui>,
    viewer: Viewer,
    Path(key_id): Path<Uuid>,
    Form(form): Form<TokenOnly>,
) -> Response {
    if let Some(refused) = viewer.check_form(&form.token) {
        return refused;
    }
    let reason = Some(format!(
        "revoked on the dashboard by {}",
        viewer.signed_in.principal
    ));
    let revoked = ui
        .services
        .revoke_key(&viewer.actor(), key_id, reason)
        .await;
    done(&ui, &viewer, revoked)
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct TokenOnly {
    #[serde(default)]
    token: String,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct MemberForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    project_id: Option<Uuid>,
}

impl MemberForm {
    fn request(&self) -> GrantRequest {
        GrantRequest {
            tenant_id: None,
            user: self.user.trim().to_owned(),
            role: self.role.clone(),
            project_id: self.project_id,
        }
    }
}

pub(crate) async fn grant(
    State(ui): State<Ui>,
    viewer: Viewer,
    Form(form): Form<MemberForm>,
) -> Response {
    if let Some(refused) = viewer.check_form(&form.token) {
        return refused;
    }
    let granted = ui
        .services
        .grant_role(&viewer.actor(), &form.request())
        .await;
    done(&ui, &viewer, granted)
}

pub(crate) async fn revoke(
    State(ui): State<Ui>,
    viewer: Viewer,
    Form(form): Form<MemberForm>,
) -> Response {
    if let Some(refused) = viewer.check_form(&form.token) {
        return refused;
    }
    let revoked = ui
        .services
        .revoke_role(&viewer.actor(), &form.request())
        .await;
    done(&ui, &viewer, revoked)
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct UserForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    role: String,
    #[serde(default)]
    password: String,
}

/// Adds a user with an initial password to the organization.
pub(crate) async fn add_user(
    State(ui): State<Ui>,
    viewer: Viewer,
    Form(form): Form<UserForm>,
) -> Response {
    if let Some(refused) = viewer.check_form(&form.token) {
        return refused;
    }
    let added = (ui.services)
        .add_user(&viewer.actor(), &form.email, &form.password, &form.role)
        .await;
    done(&ui, &viewer, added)
}
