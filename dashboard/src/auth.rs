//! Signing in (email and password, or an API key), registering a new organization, signing out.

use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::CookieJar;
use loom_gateway::{AdminError, NewSession, Registration, SignInError};
use maud::{Markup, html};
use serde::Deserialize;

use crate::layout;
use crate::session::{
    Attempt, FORM_COOKIE, SESSION_COOKIE, Theme, Viewer, check_token, client_address, form_cookie,
    over_tls, private_cookie,
};
use crate::{RegistrationMode, Ui};

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Next {
    next: Option<String>,
    /// Set when the browser's session had ended.
    ended: Option<String>,
}

/// Where to go after signing in: a path of this site only (never another site's URL).
fn local(next: Option<&str>) -> &str {
    match next {
        Some(path) if path.starts_with('/') && !path.starts_with("//") && !path.contains('\\') => {
            path
        }
        _ => "/",
    }
}

fn registration_open(ui: &Ui) -> bool {
    match ui.config.registration {
        RegistrationMode::Open => true,
        RegistrationMode::First => !ui.services.control.read(|s| s.has_users()),
        RegistrationMode::Closed => false,
    }
}

/// What the sign-in page shows around its forms.
#[derive(Default)]
struct SignInView<'a> {
    email: &'a str,
    problem: Option<String>,
}

fn sign_in_form(ui: &Ui, theme: Theme, token: &str, next: &str, view: SignInView) -> Markup {
    layout::bare(
        "Sign in",
        theme,
        html! {
            h1 { "Sign in" }
            @if let Some(problem) = &view.problem {
                p.problem role="alert" { (problem) }
            }
            form.stack method="post" action="/signin" {
                input type="hidden" name="token" value=(token);
                input type="hidden" name="next" value=(next);
                label { "Email" input type="email" name="email" value=(view.email) autocomplete="username" required autofocus; }
                label { "Password" input type="password" name="password" autocomplete="current-password" required; }
                button.primary type="submit" { "Sign in" }
            }
            details {
                summary { "Sign in with an API key" }
                form.stack method="post" action="/signin" {
                    input type="hidden" name="token" value=(token);
                    input type="hidden" name="next" value=(next);
                    label { "API key" input type="password" name="api_key" autocomplete="off" required; }
                    button type="submit" { "Sign in with the key" }
                }
            }
            @if registration_open(ui) {
                p { "New here? " a href="/register" { "Register an organization" } "." }
            }
        },
    )
}

pub(crate) async fn sign_in_page(
    State(ui): State<Ui>,
    headers: HeaderMap,
    jar: CookieJar,
    Query(next): Query<Next>,
) -> Response {
    let (jar, token) = form_cookie(jar, &headers);
    let view = SignInView {
        problem: (next.ended.is_some())
            .then(|| "Your session has ended: sign in again.".to_owned()),
        ..SignInView::default()
    };
    let next = local(next.next.as_deref());
    let page = sign_in_form(&ui, Theme::of(&headers), &token, next, view);
    (jar, page).into_response()
}

#[derive(Debug, Deserialize)]
pub(crate) struct SignInForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    api_key: Option<String>,
}

pub(crate) async fn sign_in(
    State(ui): State<Ui>,
    headers: HeaderMap,
    jar: CookieJar,
    request: axum::http::Extensions,
    Form(form): Form<SignInForm>,
) -> Response {
    let expected = match signed_out_token(&jar, &form.token) {
        Ok(expected) => expected,
        Err(refused) => return refused,
    };
    let theme = Theme::of(&headers);
    let next = local(form.next.as_deref()).to_owned();
    let email = form.email.as_deref().unwrap_or_default();
    let attempt = Attempt::new(
        form.api_key.is_none().then_some(email),
        client_address(&request),
    );
    let refuse = |status: StatusCode, problem: String| {
        let view = SignInView {
            email,
            problem: Some(problem),
        };
        (status, sign_in_form(&ui, theme, &expected, &next, view)).into_response()
    };
    if let Some(wait) = ui.limiter.retry_after(&attempt) {
        metrics::counter!("loom_dashboard_sign_ins_total", "outcome" => "limited").increment(1);
        let minutes = wait.as_secs().div_ceil(60);
        let mut response = refuse(
            StatusCode::TOO_MANY_REQUESTS,
            format!("Too many failed sign-ins. Try again in {minutes} minute(s)."),
        );
        if let Ok(value) = HeaderValue::from_str(&wait.as_secs().max(1).to_string()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        return response;
    }
    let ttl = ui.config.session_ttl;
    let signed_in = match (&form.api_key, form.password.as_deref()) {
        (Some(key), _) => ui.services.sign_in_with_key(key, ttl).await,
        (None, Some(password)) => ui.services.sign_in(email, password, ttl).await,
        (None, None) => Err(SignInError::WrongPassword),
    };
    match signed_in {
        Ok(session) => {
            ui.limiter.succeeded(&attempt);
            metrics::counter!("loom_dashboard_sign_ins_total", "outcome" => "ok").increment(1);
            started(jar, &headers, &session, &next)
        }
        Err(SignInError::Admin(error)) => {
            tracing::error!(%error, "a sign-in failed");
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "Signing in failed on the server; try again shortly.".into(),
            )
        }
        Err(refused) => {
            ui.limiter.failed(&attempt);
            metrics::counter!("loom_dashboard_sign_ins_total", "outcome" => "refused").increment(1);
            let problem = match refused {
                SignInError::InvalidKey => "That API key is not valid.".to_owned(),
                SignInError::NoRole => {
                    "Your account holds no role in its organization any more.".to_owned()
                }
                _ => "Wrong email or password.".to_owned(),
            };
            refuse(StatusCode::UNAUTHORIZED, problem)
        }
    }
}

/// The form token of a signed-out browser (its `loom_form` cookie), if the form carried it;
/// the refusal page if not.
#[allow(clippy::result_large_err)]
fn signed_out_token(jar: &CookieJar, presented: &str) -> Result<String, Response> {
    let expected = (jar.get(FORM_COOKIE))
        .map(|c| c.value().to_owned())
        .unwrap_or_default();
    match check_token(&expected, presented) {
        Some(refused) => Err(refused),
        None => Ok(expected),
    }
}

/// A session started: its cookie, and on to `next`.
fn started(jar: CookieJar, headers: &HeaderMap, session: &NewSession, next: &str) -> Response {
    let cookie = private_cookie(
        SESSION_COOKIE,
        session.secret.as_str().to_owned(),
        over_tls(headers),
    );
    (jar.add(cookie), Redirect::to(next)).into_response()
}

fn register_form(theme: Theme, token: &str, form: &RegisterForm, problem: Option<&str>) -> Markup {
    layout::bare(
        "Register",
        theme,
        html! {
            h1 { "Register an organization" }
            p { "You will own it: invite your team and issue API keys once you are in." }
            @if let Some(problem) = problem {
                p.problem role="alert" { (problem) }
            }
            form.stack method="post" action="/register" {
                input type="hidden" name="token" value=(token);
                label { "Organization" input type="text" name="organization" value=(form.organization) required autofocus; }
                label { "Email" input type="email" name="email" value=(form.email) autocomplete="username" required; }
                label { "Password (8 characters or more)" input type="password" name="password" autocomplete="new-password" minlength="8" required; }
                button.primary type="submit" { "Register" }
            }
            p { "Registered already? " a href="/signin" { "Sign in" } "." }
        },
    )
}

fn registration_closed(theme: Theme) -> Response {
    let page = layout::bare(
        "Registration closed",
        theme,
        html! {
            h1 { "Registration is closed" }
            p { "Ask an admin of your organization to add you, then " a href="/signin" { "sign in" } "." }
        },
    );
    (StatusCode::FORBIDDEN, page).into_response()
}

pub(crate) async fn register_page(
    State(ui): State<Ui>,
    headers: HeaderMap,
    jar: CookieJar,
) -> Response {
    let theme = Theme::of(&headers);
    if !registration_open(&ui) {
        return registration_closed(theme);
    }
    let (jar, token) = form_cookie(jar, &headers);
    (
        jar,
        register_form(theme, &token, &RegisterForm::default(), None),
    )
        .into_response()
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct RegisterForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    organization: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    password: String,
}

pub(crate) async fn register(
    State(ui): State<Ui>,
    headers: HeaderMap,
    jar: CookieJar,
    Form(form): Form<RegisterForm>,
) -> Response {
    let expected = match signed_out_token(&jar, &form.token) {
        Ok(expected) => expected,
        Err(refused) => return refused,
    };
    let theme = Theme::of(&headers);
    if !registration_open(&ui) {
        return registration_closed(theme);
    }
    let registration = Registration {
        organization: form.organization.clone(),
        email: form.email.clone(),
        password: form.password.clone(),
    };
    match ui
        .services
        .register(&registration, ui.config.session_ttl)
        .await
    {
        Ok(session) => {
            metrics::counter!("loom_dashboard_registrations_total").increment(1);
            started(jar, &headers, &session, "/")
        }
        Err(error) => {
            let status = match &error {
                AdminError::Invalid(_) => StatusCode::BAD_REQUEST,
                AdminError::Conflict(_) => StatusCode::CONFLICT,
                _ => {
                    tracing::error!(%error, "a registration failed");
                    StatusCode::SERVICE_UNAVAILABLE
                }
            };
            let problem = match status {
                StatusCode::SERVICE_UNAVAILABLE => {
                    "Registering failed on the server; try again shortly.".to_owned()
                }
                _ => error.to_string(),
            };
            let page = register_form(theme, &expected, &form, Some(&problem));
            (status, page).into_response()
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct TokenForm {
    #[serde(default)]
    token: String,
}

pub(crate) async fn sign_out(
    State(ui): State<Ui>,
    viewer: Viewer,
    jar: CookieJar,
    Form(form): Form<TokenForm>,
) -> Response {
    if let Some(refused) = viewer.check_form(&form.token) {
        return refused;
    }
    if let Err(error) = ui.services.end_session(viewer.secret()).await {
        tracing::error!(%error, "a sign-out could not be recorded");
        let page = layout::bare(
            "Sign-out failed",
            viewer.theme,
            html! {
                h1 { "Signing out failed" }
                p { "The server could not record it; your session is still open. Try again shortly." }
            },
        );
        return (StatusCode::SERVICE_UNAVAILABLE, page).into_response();
    }
    let jar = jar.remove(private_cookie(SESSION_COOKIE, String::new(), false));
    (jar, Redirect::to("/signin")).into_response()
}
