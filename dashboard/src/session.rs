//! Who is looking at a page: the session cookie, checked against the sessions every node folds
//! from the log; the form tokens that keep other sites from posting forms for them (CSRF); the
//! theme they chose; and the limit on failed sign-ins.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use loom_gateway::SessionSecret;
use loom_query::archive::{Access, Scope};
use loom_query::http::Principal;
use loom_schemas::control::SignedIn;
use maud::html;

use crate::Ui;
use crate::layout;

pub(crate) const SESSION_COOKIE: &str = "loom_session";
/// The form token of a browser that has not signed in yet (sign-in and registration forms).
pub(crate) const FORM_COOKIE: &str = "loom_form";
pub(crate) const THEME_COOKIE: &str = "loom_theme";

/// The theme a browser asked for; `System` follows the operating system's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Theme {
    System,
    Light,
    Dark,
}

impl Theme {
    pub(crate) fn of(headers: &HeaderMap) -> Theme {
        match CookieJar::from_headers(headers)
            .get(THEME_COOKIE)
            .map(Cookie::value)
        {
            Some("light") => Theme::Light,
            Some("dark") => Theme::Dark,
            _ => Theme::System,
        }
    }

    /// The `data-theme` attribute of the page, rendered by the server so nothing flashes.
    pub(crate) fn attribute(self) -> Option<&'static str> {
        match self {
            Theme::System => None,
            Theme::Light => Some("light"),
            Theme::Dark => Some("dark"),
        }
    }
}

/// A signed-in browser.
pub(crate) struct Viewer {
    pub signed_in: SignedIn,
    secret: SessionSecret,
    pub theme: Theme,
}

impl Viewer {
    /// The viewer as the query services know them: their tenant; bodies only for the roles
    /// that may read them.
    pub(crate) fn principal(&self) -> Principal {
        Principal {
            scope: Scope::Tenant(self.signed_in.tenant_id),
            access: Access::for_role(self.signed_in.role),
            project: self.signed_in.project_id,
        }
    }

    /// The viewer as the admin services know them.
    pub(crate) fn actor(&self) -> loom_gateway::Actor {
        loom_gateway::Actor::User(self.signed_in.clone())
    }

    pub(crate) fn form_token(&self) -> String {
        self.secret.form_token()
    }

    pub(crate) fn secret(&self) -> &SessionSecret {
        &self.secret
    }

    /// Checks a posted form's token: the refusal page if it is not this session's.
    pub(crate) fn check_form(&self, presented: &str) -> Option<Response> {
        check_token(&self.form_token(), presented)
    }
}

impl FromRequestParts<Ui> for Viewer {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, ui: &Ui) -> Result<Viewer, Response> {
        let jar = CookieJar::from_headers(&parts.headers);
        let secret = jar
            .get(SESSION_COOKIE)
            .map(|cookie| SessionSecret::from_cookie(cookie.value()));
        let signed_in = secret
            .as_ref()
            .and_then(|secret| ui.services.session(secret));
        match (secret, signed_in) {
            (Some(secret), Some(signed_in)) => Ok(Viewer {
                signed_in,
                secret,
                theme: Theme::of(&parts.headers),
            }),
            (presented, _) => Err(signed_out(parts, presented.is_some())),
        }
    }
}

/// A page asked for without a valid session: to the sign-in page, back here after it (saying the
/// session ended, when the browser had one). A widget (`/ui/…`) says so in its place instead.
fn signed_out(parts: &Parts, ended: bool) -> Response {
    let path = parts.uri.path();
    if path.starts_with("/ui/") {
        let body = html! {
            p.problem { "Your session has ended. " a href="/signin" { "Sign in again" } "." }
        };
        return (StatusCode::UNAUTHORIZED, body).into_response();
    }
    let here = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let mut to = match here.as_str() {
        // Back to a page after signing in, not to a form's action.
        _ if parts.method != axum::http::Method::GET => "/signin".to_owned(),
        "/" => "/signin".to_owned(),
        _ => format!("/signin?next={}", layout::encode(&here)),
    };
    if ended {
        to.push_str(if to.contains('?') {
            "&ended=1"
        } else {
            "?ended=1"
        });
    }
    Redirect::to(&to).into_response()
}

/// Compares a form's token with the expected one (as digests, so the comparison's time says
/// nothing of either): the refusal page if they differ.
pub(crate) fn check_token(expected: &str, presented: &str) -> Option<Response> {
    use sha2::Digest;
    let digest = |text: &str| sha2::Sha256::digest(text.as_bytes());
    if !expected.is_empty() && digest(expected) == digest(presented) {
        return None;
    }
    let body = layout::bare(
        "Form refused",
        Theme::System,
        html! {
            h1 { "This form was refused" }
            p { "It did not carry this browser's form token: it expired, or it was not sent from a Loom page. "
                a href="/" { "Reload Loom" } " and try again." }
        },
    );
    Some((StatusCode::FORBIDDEN, body).into_response())
}

/// Whether cookies must be `Secure`: when a TLS-terminating proxy says the browser used HTTPS.
pub(crate) fn over_tls(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|proto| proto.eq_ignore_ascii_case("https"))
}

/// A cookie only this site's own requests carry, never readable by scripts.
pub(crate) fn private_cookie(name: &'static str, value: String, secure: bool) -> Cookie<'static> {
    Cookie::build((name, value))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .secure(secure)
        .build()
}

/// The form token of a signed-out browser: its `loom_form` cookie, made when missing.
pub(crate) fn form_cookie(jar: CookieJar, headers: &HeaderMap) -> (CookieJar, String) {
    if let Some(token) = jar.get(FORM_COOKIE).map(|c| c.value().to_owned())
        && !token.is_empty()
    {
        return (jar, token);
    }
    let token = SessionSecret::generate()
        .map(|s| s.as_str().to_owned())
        .unwrap_or_default();
    let cookie = private_cookie(FORM_COOKIE, token.clone(), over_tls(headers));
    (jar.add(cookie), token)
}

/// The client's address, when the server knows it (for the sign-in limit).
pub(crate) fn client_address(parts: &axum::http::Extensions) -> Option<String> {
    parts
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0.ip().to_string())
}

/// Failed sign-ins counted per account and per client address over a sliding window; past the
/// limit, sign-ins for it are refused (even with the right password) until the oldest failure
/// leaves the window.
pub(crate) struct SignInLimiter {
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl Default for SignInLimiter {
    fn default() -> Self {
        SignInLimiter {
            failures: Mutex::new(HashMap::new()),
        }
    }
}

/// The window failures are counted over.
pub(crate) const LIMIT_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Failures allowed per account, and per client address, in the window.
const PER_ACCOUNT: usize = 5;
const PER_ADDRESS: usize = 20;
/// Accounts and addresses tracked at most; past it, new ones share one count (a flood of names
/// cannot push out the counts that matter, nor grow memory without bound).
const MAX_TRACKED: usize = 50_000;
const OVERFLOW: &str = "overflow";

/// What a sign-in attempt is counted under.
pub(crate) struct Attempt {
    /// The email signed in with (none for an API key).
    account: Option<String>,
    address: Option<String>,
}

impl Attempt {
    pub(crate) fn new(account: Option<&str>, address: Option<String>) -> Attempt {
        Attempt {
            account: account
                .map(|a| format!("account:{}", loom_schemas::control::normalize_email(a))),
            address: address.map(|a| format!("address:{a}")),
        }
    }

    fn keys(&self) -> impl Iterator<Item = (&str, usize)> {
        (self
            .account
            .as_deref()
            .map(|a| (a, PER_ACCOUNT))
            .into_iter())
        .chain(self.address.as_deref().map(|a| (a, PER_ADDRESS)))
    }
}

impl SignInLimiter {
    /// How long until `attempt` may be tried again, if it is over a limit now.
    pub(crate) fn retry_after(&self, attempt: &Attempt) -> Option<Duration> {
        let now = Instant::now();
        let Ok(mut failures) = self.failures.lock() else {
            return None;
        };
        attempt
            .keys()
            .filter_map(|(key, limit)| {
                let tracked = failures.contains_key(key) || failures.len() < MAX_TRACKED;
                let key = if tracked { key } else { OVERFLOW };
                let times = failures.get_mut(key)?;
                while times.front().is_some_and(|t| now - *t >= LIMIT_WINDOW) {
                    times.pop_front();
                }
                let limit = if key == OVERFLOW { PER_ADDRESS } else { limit };
                (times.len() >= limit)
                    .then(|| times.front().map(|t| LIMIT_WINDOW - (now - *t)))
                    .flatten()
            })
            .max()
    }

    pub(crate) fn failed(&self, attempt: &Attempt) {
        let now = Instant::now();
        let Ok(mut failures) = self.failures.lock() else {
            return;
        };
        if failures.len() >= MAX_TRACKED {
            failures.retain(|_, times| times.back().is_some_and(|t| now - *t < LIMIT_WINDOW));
        }
        for (key, limit) in attempt.keys() {
            let key = match failures.len() < MAX_TRACKED || failures.contains_key(key) {
                true => key,
                false => OVERFLOW,
            };
            let times = failures.entry(key.to_owned()).or_default();
            times.push_back(now);
            while times.len() > limit.max(PER_ADDRESS) {
                times.pop_front();
            }
        }
    }

    /// A sign-in that worked clears its account's failures.
    pub(crate) fn succeeded(&self, attempt: &Attempt) {
        if let (Ok(mut failures), Some(account)) = (self.failures.lock(), &attempt.account) {
            failures.remove(account);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_account_is_refused_after_five_failures_and_others_are_not() {
        let limiter = SignInLimiter::default();
        let ada = Attempt::new(Some("Ada@Example.com"), Some("10.0.0.1".into()));
        for _ in 0..PER_ACCOUNT {
            assert_eq!(limiter.retry_after(&ada), None);
            limiter.failed(&ada);
        }
        let wait = limiter.retry_after(&ada).unwrap();
        assert!(wait > Duration::from_secs(14 * 60) && wait <= LIMIT_WINDOW);
        // The same account from elsewhere too; another account from the same address is not.
        assert!(
            limiter
                .retry_after(&Attempt::new(Some("ada@example.com"), None))
                .is_some()
        );
        let bob = Attempt::new(Some("bob@example.com"), Some("10.0.0.1".into()));
        assert_eq!(limiter.retry_after(&bob), None);
        limiter.succeeded(&ada);
        assert_eq!(limiter.retry_after(&ada), None);
    }

    #[test]
    fn an_address_is_refused_after_twenty_failures_across_accounts() {
        let limiter = SignInLimiter::default();
        for n in 0..PER_ADDRESS {
            let user = format!("u{n}@x.test");
            limiter.failed(&Attempt::new(Some(&user), Some("10.0.0.9".into())));
        }
        let next = Attempt::new(Some("new@x.test"), Some("10.0.0.9".into()));
        assert!(limiter.retry_after(&next).is_some());
        assert_eq!(
            limiter.retry_after(&Attempt::new(Some("new@x.test"), None)),
            None
        );
    }
}
