//! The dashboard: HTML pages served by the node at `/`, rendered on the server (`maud`), with a
//! small script of our own for what a page does after it loads (widgets fetched one by one,
//! auto-refresh, keyboard). Pages call the same services as the API, as the signed-in user
//! ([`Actor::User`](loom_gateway::admin::Actor), a query [`Principal`](loom_query::http::Principal)):
//! what a role may not do through the API it may not do here either. docs/dashboard.md.

mod account;
mod analytics;
mod auth;
mod home;
mod layout;
mod manage;
mod policy;
mod quotas;
mod session;
mod sql;
mod traces;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use loom_gateway::{Services, Usage};
use loom_query::http::QueryServices;

use session::SignInLimiter;

/// Who may register a new organization from the sign-in page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum RegistrationMode {
    /// Anybody.
    Open,
    /// Only the first user, while nobody has registered (they own the first organization).
    #[default]
    First,
    /// Nobody: users are added by an admin.
    Closed,
}

/// How the dashboard runs.
#[derive(Debug, Clone)]
pub struct DashboardConfig {
    pub registration: RegistrationMode,
    /// How long a sign-in lasts.
    pub session_ttl: Duration,
}

impl Default for DashboardConfig {
    fn default() -> Self {
        DashboardConfig {
            registration: RegistrationMode::default(),
            session_ttl: Duration::from_secs(12 * 3600),
        }
    }
}

/// What every page can reach.
#[derive(Clone)]
pub(crate) struct Ui {
    pub services: Services,
    pub usage: Usage,
    pub query: QueryServices,
    pub config: Arc<DashboardConfig>,
    pub limiter: Arc<SignInLimiter>,
}

/// The dashboard's routes, to merge into the node's router.
pub fn routes(
    services: Services,
    query: QueryServices,
    usage: Usage,
    config: DashboardConfig,
) -> Router {
    let ui = Ui {
        services,
        usage,
        query,
        config: Arc::new(config),
        limiter: Arc::new(SignInLimiter::default()),
    };
    Router::new()
        .route("/", get(home::page))
        .route("/ui/home/kpis", get(home::kpis))
        .route("/ui/home/alerts", get(home::alerts))
        .route("/ui/home/activity", get(home::activity))
        .route("/analytics", get(analytics::page))
        .route("/ui/analytics/chart", get(analytics::chart))
        .route("/ui/analytics/breakdown", get(analytics::breakdown))
        .route("/ui/analytics/expensive", get(analytics::expensive))
        .route("/ui/analytics/errors", get(analytics::errors))
        .route("/account", get(account::page))
        .route("/account/password", post(account::change_password))
        .route("/manage", get(manage::page))
        .route("/manage/users", post(manage::add_user))
        .route("/manage/projects", post(manage::create_project))
        .route("/manage/keys", post(manage::create_key))
        .route("/manage/keys/{key_id}/revoke", post(manage::revoke_key))
        .route("/manage/members", post(manage::grant))
        .route("/manage/members/revoke", post(manage::revoke))
        .route("/quotas", get(quotas::page).post(quotas::set))
        .route("/policy", get(policy::page))
        .route("/policy/{project_id}", post(policy::save))
        .route("/ui/policy/findings", get(policy::findings))
        .route("/sql", get(sql::page).post(sql::submit))
        .route("/sql.csv", post(sql::csv))
        .route("/traces", get(traces::page))
        .route("/traces.csv", get(traces::csv))
        .route("/traces/{id}", get(traces::trace_page))
        .route("/ui/traces/rows", get(traces::rows))
        .route("/ui/traces/{id}", get(traces::panel))
        .route("/signin", get(auth::sign_in_page).post(auth::sign_in))
        .route("/register", get(auth::register_page).post(auth::register))
        .route("/signout", post(auth::sign_out))
        .route("/assets/loom.css", get(stylesheet))
        .route("/assets/loom.js", get(script))
        .with_state(ui)
}

const CSS: &str = include_str!("../assets/loom.css");
const JS: &str = include_str!("../assets/loom.js");

/// Assets change with the binary: cached for an hour, revalidated after.
const ASSET_CACHE: HeaderValue = HeaderValue::from_static("public, max-age=3600");

async fn stylesheet() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("text/css")),
            (header::CACHE_CONTROL, ASSET_CACHE),
        ],
        CSS,
    )
}

async fn script() -> impl IntoResponse {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/javascript"),
            ),
            (header::CACHE_CONTROL, ASSET_CACHE),
        ],
        JS,
    )
}

/// The page weight a browser loads for a page: its HTML plus the stylesheet and the script.
pub fn asset_bytes() -> usize {
    CSS.len() + JS.len()
}
