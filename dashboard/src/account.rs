//! The viewer's own account: who they are signed in as, and changing their password.

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use loom_gateway::SignInError;
use maud::html;
use serde::Deserialize;

use crate::Ui;
use crate::layout::{self, Nav};
use crate::session::Viewer;

pub(crate) async fn page(State(ui): State<Ui>, viewer: Viewer) -> Response {
    render(&ui, &viewer, None, StatusCode::OK)
}

/// `said`: what the last change did (or why not).
fn render(
    ui: &Ui,
    viewer: &Viewer,
    said: Option<Result<&str, String>>,
    status: StatusCode,
) -> Response {
    let signed_in = &viewer.signed_in;
    let organization = (ui.services.control)
        .read(|s| s.tenant(signed_in.tenant_id).map(|t| t.name.clone()))
        .unwrap_or_default();
    let has_password = signed_in.api_key_id.is_none();
    let main = html! {
        h1 { "Account" }
        dl.facts {
            dt { "Signed in as" } dd { (signed_in.principal) }
            dt { "Organization" } dd { (organization) }
            dt { "Role" } dd { (signed_in.role.name()) }
        }
        @match &said {
            Some(Ok(done)) => p role="status" { (done) },
            Some(Err(problem)) => p.problem role="alert" { (problem) },
            None => {}
        }
        @if has_password {
            section.widget {
                h2 { "Change password" }
                form.stack method="post" action="/account/password" {
                    input type="hidden" name="token" value=(viewer.form_token());
                    label { "Current password" input type="password" name="current" autocomplete="current-password" required; }
                    label { "New password (8 characters or more)" input type="password" name="new" autocomplete="new-password" minlength="8" required; }
                    button.primary type="submit" { "Change password" }
                }
            }
        } @else {
            p.empty { "You signed in with an API key: there is no password to change." }
        }
    };
    (status, layout::page("Account", viewer, Nav::Account, main)).into_response()
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct PasswordForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    current: String,
    #[serde(default)]
    new: String,
}

pub(crate) async fn change_password(
    State(ui): State<Ui>,
    viewer: Viewer,
    Form(form): Form<PasswordForm>,
) -> Response {
    if let Some(refused) = viewer.check_form(&form.token) {
        return refused;
    }
    let changed = (ui.services)
        .change_password(&viewer.signed_in, &form.current, &form.new)
        .await;
    match changed {
        Ok(()) => render(
            &ui,
            &viewer,
            Some(Ok("Your password is changed.")),
            StatusCode::OK,
        ),
        Err(SignInError::WrongPassword) => render(
            &ui,
            &viewer,
            Some(Err("The current password is wrong.".into())),
            StatusCode::UNAUTHORIZED,
        ),
        Err(error) => render(
            &ui,
            &viewer,
            Some(Err(error.to_string())),
            StatusCode::BAD_REQUEST,
        ),
    }
}
