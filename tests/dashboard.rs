//! The dashboard over HTTP, as a browser without a script sees it: registration (the first user
//! owns a new organization), sign-in with a password or an API key, sessions every node learns
//! from the log, form tokens, the limit on failed sign-ins, sign-out and expiry, and the home
//! page's numbers for the viewer's own tenant only. (Real-browser tests: tests/browser.)

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::gateway::{ADMIN, Harness, start_full};
use loom_dashboard::{DashboardConfig, RegistrationMode};
use loom_mock::MockConfig;
use loom_schemas::event::Payload;
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

const PASSWORD: &str = "correct horse battery staple";

/// A browser: its cookies, and no automatic redirects (the tests look at them).
struct Browser {
    base: String,
    client: reqwest::Client,
    cookies: HashMap<String, String>,
}

struct Page {
    status: StatusCode,
    location: Option<String>,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Browser {
    fn new(harness: &Harness) -> Browser {
        Browser {
            base: harness.base.clone(),
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap(),
            cookies: HashMap::new(),
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(name, value)| format!("{name}={value}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    async fn take(&mut self, response: reqwest::Response) -> Page {
        for set in response.headers().get_all(SET_COOKIE) {
            let set = set.to_str().unwrap();
            let attributes = set.to_ascii_lowercase();
            assert!(attributes.contains("httponly"), "{set}");
            assert!(attributes.contains("samesite=strict"), "{set}");
            let (pair, _) = set.split_once(';').unwrap_or((set, ""));
            let (name, value) = pair.split_once('=').unwrap();
            // A removal sets an empty value (and an expiry in the past).
            if value.is_empty() {
                self.cookies.remove(name);
            } else {
                self.cookies.insert(name.to_owned(), value.to_owned());
            }
        }
        Page {
            status: response.status(),
            location: response
                .headers()
                .get(LOCATION)
                .map(|v| v.to_str().unwrap().to_owned()),
            headers: response.headers().clone(),
            body: response.text().await.unwrap(),
        }
    }

    async fn get(&mut self, path: &str) -> Page {
        let response = self
            .client
            .get(format!("{}{path}", self.base))
            .header(COOKIE, self.cookie_header())
            .send()
            .await
            .unwrap();
        self.take(response).await
    }

    async fn post(&mut self, path: &str, form: &[(&str, &str)]) -> Page {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .header(COOKIE, self.cookie_header())
            .form(form)
            .send()
            .await
            .unwrap();
        self.take(response).await
    }

    /// Posts the registration form.
    async fn register(
        &mut self,
        token: &str,
        organization: &str,
        email: &str,
        password: &str,
    ) -> Page {
        let form = [
            ("token", token),
            ("organization", organization),
            ("email", email),
            ("password", password),
        ];
        self.post("/register", &form).await
    }

    /// The form token a page carries (`name="token" value="…"`).
    fn token(page: &Page) -> String {
        let at = page
            .body
            .find(r#"name="token" value=""#)
            .expect("a form token");
        let rest = &page.body[at + r#"name="token" value=""#.len()..];
        rest[..rest.find('"').unwrap()].to_owned()
    }

    /// Signs in with a password: the sign-in page, then its form.
    async fn sign_in(&mut self, email: &str, password: &str) -> Page {
        let form = self.get("/signin").await;
        let token = Browser::token(&form);
        self.post(
            "/signin",
            &[("token", &token), ("email", email), ("password", password)],
        )
        .await
    }
}

async fn dashboard(registration: RegistrationMode, ttl: Duration) -> Harness {
    let config = DashboardConfig {
        registration,
        session_ttl: ttl,
    };
    start_full(MockConfig::default(), "", true, config, true).await
}

/// Waits until the home page's KPI widget counts `requests` requests.
async fn wait_for_requests(browser: &mut Browser, requests: &str) -> String {
    let started = Instant::now();
    loop {
        let kpis = browser.get("/ui/home/kpis?window=1h").await;
        assert_eq!(kpis.status, 200, "{}", kpis.body);
        let card = kpis
            .body
            .split(r#"data-metric="requests""#)
            .nth(1)
            .unwrap_or_default();
        if card.contains(&format!(r#"<span class="value">{requests}</span>"#)) {
            return kpis.body;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{}", kpis.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_user_registers_signs_in_and_out_and_sees_their_tenants_numbers() {
    let harness = dashboard(RegistrationMode::First, Duration::from_secs(3600)).await;
    let mut browser = Browser::new(&harness);

    // Signed out, pages send you to sign in (and back after); widgets say so in place.
    let home = browser.get("/").await;
    assert_eq!(home.status, StatusCode::SEE_OTHER);
    assert_eq!(home.location.as_deref(), Some("/signin"));
    let deep = browser.get("/?window=7d").await;
    assert_eq!(
        deep.location.as_deref(),
        Some("/signin?next=%2F%3Fwindow%3D7d")
    );
    let widget = browser.get("/ui/home/kpis").await;
    assert_eq!(widget.status, StatusCode::UNAUTHORIZED);
    assert!(widget.body.contains("Sign in again"), "{}", widget.body);

    // Nobody has registered: the sign-in page offers it.
    let signin = browser.get("/signin").await;
    assert_eq!(signin.status, 200);
    assert!(signin.body.contains(r#"href="/register""#));
    let token = Browser::token(&signin);

    // A form without this browser's token is refused; so is a weak password, plainly.
    let forged = browser
        .register("forged", "Initech", "ada@initech.test", PASSWORD)
        .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert!(forged.body.contains("form was refused"), "{}", forged.body);
    let weak = browser
        .register(&token, "Initech", "ada@initech.test", "short")
        .await;
    assert_eq!(weak.status, StatusCode::BAD_REQUEST);
    assert!(
        weak.body.contains("password: 8 to 1024 bytes"),
        "{}",
        weak.body
    );
    let bad_email = browser.register(&token, "Initech", "ada", PASSWORD).await;
    assert_eq!(bad_email.status, StatusCode::BAD_REQUEST);
    assert!(bad_email.body.contains("is not an email address"));

    let registered = browser
        .register(&token, "Initech", "Ada@Initech.test ", PASSWORD)
        .await;
    assert_eq!(
        registered.status,
        StatusCode::SEE_OTHER,
        "{}",
        registered.body
    );
    assert_eq!(registered.location.as_deref(), Some("/"));
    assert!(browser.cookies.contains_key("loom_session"));
    let home = browser.get("/").await;
    assert_eq!(home.status, 200);
    assert!(
        home.body.contains("ada@initech.test · owner"),
        "{}",
        home.body
    );
    assert!(home.body.contains(r#"data-src="/ui/home/kpis?"#));

    // Only the first registers: now the page is closed, to anyone.
    let mut stranger = Browser::new(&harness);
    assert!(!stranger.get("/signin").await.body.contains("/register"));
    assert_eq!(
        stranger.get("/register").await.status,
        StatusCode::FORBIDDEN
    );

    // Their organization's traffic shows on their home page; the harness tenant's does not.
    let initech = tenant_named(&harness, "Initech").await;
    let mut keys = Vec::new();
    for role in ["developer", "viewer"] {
        let created = harness
            .admin("/admin/keys", json!({"tenant_id": initech, "role": role}))
            .await;
        keys.push(created["key"].as_str().unwrap().to_owned());
    }
    let (key, viewer_key) = (keys[0].clone(), keys[1].clone());
    for (key, count) in [(&key, 3), (&harness.key, 2)] {
        for _ in 0..count {
            let response = harness
                .client
                .post(format!("{}/v1/chat/completions", harness.base))
                .bearer_auth(key)
                .json(&json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
        }
    }
    let kpis = wait_for_requests(&mut browser, "3").await;
    assert!(kpis.contains("Error rate"), "{kpis}");
    let activity = browser.get("/ui/home/activity?window=1h").await;
    assert_eq!(activity.status, 200);
    assert_eq!(
        activity.body.matches("<tr>").count(),
        1 + 3,
        "{}",
        activity.body
    );
    let alerts = browser.get("/ui/home/alerts").await;
    assert_eq!(alerts.status, 200, "{}", alerts.body);
    let bad_range = browser.get("/ui/home/kpis?tz=Mars%2FOlympus").await;
    assert_eq!(bad_range.status, StatusCode::BAD_REQUEST);
    assert!(bad_range.body.contains("unknown time zone"));

    // Signing out needs the session's form token; after it, the session opens nothing.
    let session = browser.cookies["loom_session"].clone();
    let refused = browser.post("/signout", &[("token", &token)]).await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let token = Browser::token(&browser.get("/").await);
    let out = browser.post("/signout", &[("token", &token)]).await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert_eq!(out.location.as_deref(), Some("/signin"));
    assert!(!browser.cookies.contains_key("loom_session"));
    browser
        .cookies
        .insert("loom_session".into(), session.clone());
    assert_eq!(browser.get("/").await.status, StatusCode::SEE_OTHER);
    browser.cookies.remove("loom_session");

    // A wrong password and an unknown email get the same answer.
    let wrong = browser
        .sign_in("ada@initech.test", "not the password")
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    assert!(wrong.body.contains("Wrong email or password"));
    let nobody = browser.sign_in("nobody@initech.test", PASSWORD).await;
    assert_eq!(nobody.status, StatusCode::UNAUTHORIZED);
    assert!(nobody.body.contains("Wrong email or password"));
    let back = browser.sign_in("ADA@initech.test", PASSWORD).await;
    assert_eq!(back.status, StatusCode::SEE_OTHER, "{}", back.body);
    assert_eq!(browser.get("/").await.status, 200);

    // An API key signs in with its own role: this one is a viewer's.
    let mut viewer = Browser::new(&harness);
    let form = viewer.get("/signin?next=/%3Fwindow%3D7d").await;
    let token = Browser::token(&form);
    let bad_key = viewer
        .post(
            "/signin",
            &[("token", &token), ("api_key", "loom-not-a-key")],
        )
        .await;
    assert_eq!(bad_key.status, StatusCode::UNAUTHORIZED);
    assert!(bad_key.body.contains("That API key is not valid"));
    let signed = viewer
        .post(
            "/signin",
            &[
                ("token", &token),
                ("api_key", &viewer_key),
                ("next", "/?window=7d"),
            ],
        )
        .await;
    assert_eq!(signed.status, StatusCode::SEE_OTHER);
    assert_eq!(signed.location.as_deref(), Some("/?window=7d"));
    assert!(viewer.get("/").await.body.contains("· viewer"));
    // Somewhere else than this site is never where a sign-in leads.
    let elsewhere = viewer
        .post(
            "/signin",
            &[
                ("token", &token),
                ("api_key", &viewer_key),
                ("next", "//evil.test/"),
            ],
        )
        .await;
    assert_eq!(elsewhere.location.as_deref(), Some("/"));

    // Five wrong passwords lock the account for a while, the right one included.
    for _ in 0..5 {
        let wrong = browser.sign_in("ada@initech.test", "guess").await;
        assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    }
    let locked = browser.sign_in("ada@initech.test", PASSWORD).await;
    assert_eq!(locked.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(locked.body.contains("Too many failed sign-ins"));
    let wait: u64 = locked.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait > 800 && wait <= 900, "{wait}");

    // The log has the user, the sessions and their end, and neither the password nor any
    // session's secret.
    let recorded = harness.stop().await;
    let types: Vec<&str> = recorded
        .control
        .iter()
        .map(|e| e.payload.event_type())
        .collect();
    assert_eq!(types.iter().filter(|t| **t == "user.registered").count(), 1);
    assert!(types.iter().filter(|t| **t == "session.started").count() >= 4);
    assert_eq!(types.iter().filter(|t| **t == "session.ended").count(), 1);
    for event in &recorded.control {
        if let Payload::UserRegistered(user) = &event.payload {
            assert_eq!(user.email, "ada@initech.test");
            let tenant = event.envelope.tenant_id;
            let ctx = loom_schemas::crypto::FieldContext {
                tenant_id: tenant,
                event_id: event.envelope.event_id,
                field: "password",
            };
            let hash =
                String::from_utf8(recorded.keys.open(&ctx, &user.password).unwrap()).unwrap();
            assert!(hash.starts_with("$argon2id$"), "{hash}");
        }
    }
    let mut log = Vec::new();
    for entry in walk(&recorded._dir.path().join("log")) {
        log.extend(std::fs::read(entry).unwrap());
    }
    for secret in [PASSWORD.as_bytes(), session.as_bytes()] {
        assert!(
            !log.windows(secret.len()).any(|w| w == secret),
            "a secret is in the log"
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_expire_and_a_revoked_key_or_role_ends_them() {
    let harness = dashboard(RegistrationMode::Open, Duration::from_secs(2)).await;
    let mut ada = Browser::new(&harness);
    let token = Browser::token(&ada.get("/register").await);
    let registered = ada
        .register(&token, "Hooli", "ada@hooli.test", PASSWORD)
        .await;
    assert_eq!(
        registered.status,
        StatusCode::SEE_OTHER,
        "{}",
        registered.body
    );
    assert_eq!(ada.get("/").await.status, 200);
    // Open registration: another organization may register, but not with a taken email.
    let mut bob = Browser::new(&harness);
    let token = Browser::token(&bob.get("/register").await);
    let taken = bob
        .register(&token, "Other", "ADA@hooli.test", PASSWORD)
        .await;
    assert_eq!(taken.status, StatusCode::CONFLICT);
    assert!(taken.body.contains("already registered"));

    // A session lasts its time to live.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let expired = ada.get("/").await;
    assert_eq!(expired.status, StatusCode::SEE_OTHER);
    assert_eq!(expired.location.as_deref(), Some("/signin?ended=1"));

    // A session ends with its key, and with its user's last role.
    let hooli = tenant_named(&harness, "Hooli").await;
    let created = harness
        .admin("/admin/keys", json!({"tenant_id": hooli}))
        .await;
    let mut keyed = Browser::new(&harness);
    let token = Browser::token(&keyed.get("/signin").await);
    let key = created["key"].as_str().unwrap();
    keyed
        .post("/signin", &[("token", &token), ("api_key", key)])
        .await;
    assert_eq!(keyed.get("/").await.status, 200);
    let key_id = created["key_id"].as_str().unwrap();
    let path = format!("/admin/keys/{key_id}/revoke");
    let revoked = harness
        .call(Method::POST, &path, ADMIN, Some(json!({})))
        .await;
    assert_eq!(revoked.0, 204, "{revoked:?}");
    assert_eq!(keyed.get("/").await.status, StatusCode::SEE_OTHER);

    assert_eq!(
        ada.sign_in("ada@hooli.test", PASSWORD).await.status,
        StatusCode::SEE_OTHER
    );
    assert_eq!(ada.get("/").await.status, 200);
    let revoke = json!({"tenant_id": hooli, "user": "ada@hooli.test", "role": "owner"});
    let revoked = (harness.call(Method::POST, "/admin/roles/revoke", ADMIN, Some(revoke))).await;
    assert_eq!(revoked.0, 204, "{revoked:?}");
    assert_eq!(ada.get("/").await.status, StatusCode::SEE_OTHER);
    let no_role = ada.sign_in("ada@hooli.test", PASSWORD).await;
    assert_eq!(no_role.status, StatusCode::UNAUTHORIZED);
    assert!(no_role.body.contains("holds no role"));
    harness.stop().await;
}

/// The id of the organization (tenant) called `name`, as the admin API lists it.
async fn tenant_named(harness: &Harness, name: &str) -> Value {
    let tenants = harness
        .call(Method::GET, "/admin/tenants", ADMIN, None)
        .await
        .1;
    let tenant = tenants
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == name);
    tenant.unwrap()["tenant_id"].clone()
}

/// Registers `organization` with `email` in a fresh browser, and issues a key of `role` in it.
async fn organization(
    harness: &Harness,
    organization: &str,
    email: &str,
    role: &str,
) -> (Browser, String) {
    let mut browser = Browser::new(harness);
    let token = Browser::token(&browser.get("/register").await);
    let registered = browser
        .register(&token, organization, email, PASSWORD)
        .await;
    assert_eq!(
        registered.status,
        StatusCode::SEE_OTHER,
        "{}",
        registered.body
    );
    let tenant = tenant_named(harness, organization).await;
    let created = harness
        .admin("/admin/keys", json!({"tenant_id": tenant, "role": role}))
        .await;
    (browser, created["key"].as_str().unwrap().to_owned())
}

async fn chat(harness: &Harness, key: &str, model: &str) -> String {
    let response = harness
        .client
        .post(format!("{}/v1/chat/completions", harness.base))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "the secret word is heron"}]}))
        .send()
        .await
        .unwrap();
    let trace = common::gateway::trace_of(&response);
    response.bytes().await.unwrap();
    trace
}

fn rows_of(body: &str) -> usize {
    body.matches("data-trace=").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_page_filter_open_a_timeline_export_csv_and_stay_in_their_organization() {
    let harness = dashboard(RegistrationMode::Open, Duration::from_secs(3600)).await;
    let (mut ada, key) = organization(&harness, "Acme Two", "ada@acme2.test", "developer").await;
    let (mut bob, bob_key) = organization(&harness, "Bobco", "bob@bobco.test", "developer").await;
    let mut traces = Vec::new();
    for _ in 0..51 {
        traces.push(chat(&harness, &key, "fast").await);
    }
    let failed = chat(&harness, &key, "nobody-serves-this").await;
    let bobs = chat(&harness, &bob_key, "fast").await;

    let page = ada.get("/traces?window=1h&model=gpt").await;
    assert_eq!(page.status, 200);
    assert!(
        page.body
            .contains(r#"data-src="/ui/traces/rows?window=1h&amp;model=gpt""#),
        "{}",
        page.body
    );
    assert!(
        page.body
            .contains(r#"href="/traces.csv?window=1h&amp;model=gpt""#)
    );

    // The first page is 50 rows and a row that loads the next; the read models catch up first.
    let started = Instant::now();
    let first = loop {
        let first = ada.get("/ui/traces/rows?window=1h").await;
        assert_eq!(first.status, 200, "{}", first.body);
        // The newest (the failed one, sent last) in: every one of them is folded.
        if first.body.contains("data-next=") && first.body.contains(&failed) {
            break first;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            first.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(rows_of(&first.body), 50);
    let at = first.body.find(r#"data-next=""#).unwrap() + r#"data-next=""#.len();
    let next = first.body[at..]
        .split('"')
        .next()
        .unwrap()
        .replace("&amp;", "&");
    let mut second = ada.get(&next).await;
    let started = Instant::now();
    while rows_of(&second.body) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            second.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        second = ada.get(&next).await;
    }
    assert_eq!(rows_of(&second.body), 2, "{}", second.body);
    assert!(!second.body.contains("data-next="));
    assert!(!first.body.contains(&bobs) && !second.body.contains(&bobs));

    // Filters: the failed one; a model; a bad amount is said plainly.
    let failed_rows = ada.get("/ui/traces/rows?window=1h&status=failed").await;
    assert_eq!(rows_of(&failed_rows.body), 1, "{}", failed_rows.body);
    assert!(failed_rows.body.contains(&failed));
    let none = ada
        .get("/ui/traces/rows?window=1h&model=no-such-model")
        .await;
    assert_eq!(rows_of(&none.body), 0);
    assert!(none.body.contains("No traces match"));
    let bad = ada.get("/ui/traces/rows?min_cost=lots").await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body.contains("is not an amount in USD"), "{}", bad.body);

    // A trace's timeline: its steps on a time axis, and (for an owner) its bodies.
    let panel = ada.get(&format!("/ui/traces/{}", traces[0])).await;
    assert_eq!(panel.status, 200, "{}", panel.body);
    for kind in ["request", "routing", "attempt", "completed"] {
        assert!(
            panel.body.contains(&format!(r#"data-kind="{kind}""#)),
            "{kind}: {}",
            panel.body
        );
    }
    assert!(panel.body.contains("heron"), "{}", panel.body);
    let own_page = ada.get(&format!("/traces/{}", traces[0])).await;
    assert_eq!(own_page.status, 200);

    // A viewer sees the timeline without bodies.
    let viewer_key = {
        let tenant = tenant_named(&harness, "Acme Two").await;
        harness
            .admin(
                "/admin/keys",
                json!({"tenant_id": tenant, "role": "viewer"}),
            )
            .await["key"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let mut viewer = Browser::new(&harness);
    let token = Browser::token(&viewer.get("/signin").await);
    viewer
        .post("/signin", &[("token", &token), ("api_key", &viewer_key)])
        .await;
    let seen = viewer.get(&format!("/ui/traces/{}", traces[0])).await;
    assert_eq!(seen.status, 200);
    assert!(seen.body.contains("Bodies are not shown"));
    assert!(!seen.body.contains("heron"));

    // Another organization's trace is not found, by URL or in the panel.
    for path in [
        format!("/traces/{}", traces[0]),
        format!("/ui/traces/{}", traces[0]),
    ] {
        let other = bob.get(&path).await;
        assert_eq!(other.status, StatusCode::NOT_FOUND, "{path}");
        assert!(!other.body.contains("heron"));
    }
    assert_eq!(bob.get(&format!("/ui/traces/{bobs}")).await.status, 200);

    // The filtered list as CSV: a header and every row.
    let csv = ada.get("/traces.csv?window=1h").await;
    assert_eq!(csv.status, 200);
    assert!(
        csv.headers["content-disposition"]
            .to_str()
            .unwrap()
            .contains("loom-traces.csv")
    );
    let lines: Vec<&str> = csv.body.lines().collect();
    assert!(
        lines[0].starts_with("trace_id,tenant_id,started_at"),
        "{}",
        lines[0]
    );
    assert_eq!(lines.len(), 1 + 52);
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_console_queries_the_organizations_archive() {
    let harness = dashboard(RegistrationMode::Open, Duration::from_secs(3600)).await;
    let (mut ada, key) = organization(&harness, "Archivists", "ada@arch.test", "developer").await;
    let (mut bob, bob_key) = organization(&harness, "Others", "bob@others.test", "developer").await;
    for _ in 0..3 {
        chat(&harness, &key, "fast").await;
    }
    chat(&harness, &bob_key, "fast").await;

    let console = ada.get("/sql").await;
    assert_eq!(console.status, 200);
    assert!(
        console.body.contains("At most 10000 rows"),
        "{}",
        console.body
    );
    assert!(console.body.contains("FROM events"));
    let token = Browser::token(&console);
    let query = "SELECT count(*) AS n FROM events WHERE event_type = 'request.completed'";
    assert_eq!(
        ada.post("/sql", &[("token", "forged"), ("query", query)])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    // The archive rolls its files every second here: the count shows once they are written.
    let started = Instant::now();
    loop {
        let answer = ada
            .post("/sql", &[("token", &token), ("query", query)])
            .await;
        assert_eq!(answer.status, 200, "{}", answer.body);
        if answer.body.contains("<td>3</td>") {
            assert!(answer.body.contains("1 row(s)"));
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Bob's organization sees its own one request.
    let bob_token = Browser::token(&bob.get("/sql").await);
    let started = Instant::now();
    loop {
        let answer = bob
            .post("/sql", &[("token", &bob_token), ("query", query)])
            .await;
        if answer.body.contains("<td>1</td>") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let csv = ada
        .post("/sql.csv", &[("token", &token), ("query", query)])
        .await;
    assert_eq!(csv.status, 200);
    assert_eq!(csv.body, "n\n3\n");
    assert!(
        csv.headers["content-disposition"]
            .to_str()
            .unwrap()
            .contains("loom-query.csv")
    );

    // Errors are said plainly, in the page.
    let bad = ada
        .post(
            "/sql",
            &[("token", &token), ("query", "SELECT nope FROM events")],
        )
        .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body.contains("nope"), "{}", bad.body);
    assert!(
        bad.body.contains("SELECT nope FROM events"),
        "the query stays in the form"
    );
    let drop = ada
        .post("/sql", &[("token", &token), ("query", "DROP TABLE events")])
        .await;
    assert_eq!(drop.status, StatusCode::BAD_REQUEST);
    let empty = ada
        .post("/sql", &[("token", &token), ("query", "  ")])
        .await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);
    assert!(empty.body.contains("Write a query first"));
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quotas_page_shows_todays_usage_against_the_limits() {
    let harness = dashboard(RegistrationMode::Open, Duration::from_secs(3600)).await;
    let (mut ada, key) = organization(&harness, "Metered", "ada@metered.test", "developer").await;
    let tenant = tenant_named(&harness, "Metered").await;
    let limits = json!({"tenant_id": tenant, "scope": "tenant",
        "limits": {"tokens_per_day": 50_000, "requests_per_minute": 600}});
    let set = harness
        .call(Method::POST, "/admin/quotas", ADMIN, Some(limits))
        .await;
    assert_eq!(set.0, 200, "{set:?}");
    for _ in 0..2 {
        chat(&harness, &key, "fast").await;
    }
    let page = ada.get("/quotas").await;
    assert_eq!(page.status, 200, "{}", page.body);
    let organization = page
        .body
        .split(r#"data-scope="tenant""#)
        .nth(1)
        .expect("the organization's row");
    assert!(organization.contains("Metered"), "{organization}");
    assert!(organization.contains(" / 50.0k"), "{organization}");
    assert!(organization.contains("600"), "{organization}");
    // Two answered requests are counted (their tokens, not zero).
    let used: i64 = organization
        .split("<td class=\"num\">")
        .nth(1)
        .and_then(|cell| cell.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("tokens used");
    assert!(used > 0, "{organization}");
    assert!(page.body.contains("API keys"));

    // An owner sets limits from the page: blank stays, numbers are checked.
    let token = Browser::token(&page);
    let form = |tokens: &'static str| {
        [
            ("scope", "tenant"),
            ("id", ""),
            ("tokens_per_day", tokens),
            ("cost_usd_per_day", ""),
            ("requests_per_minute", ""),
            ("tokens_per_minute", ""),
        ]
    };
    let mut bad = form("lots").to_vec();
    bad.push(("token", &token));
    let refused = ada.post("/quotas", &bad).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(
        refused
            .body
            .contains("tokens per day: &quot;lots&quot; is not a number"),
        "{}",
        refused.body
    );
    let mut good = form("20000").to_vec();
    good.push(("token", &token));
    assert_eq!(
        ada.post("/quotas", &good).await.status,
        StatusCode::SEE_OTHER
    );
    let page = ada.get("/quotas").await;
    let organization = page.body.split(r#"data-scope="tenant""#).nth(1).unwrap();
    assert!(organization.contains(" / 20.0k"), "{organization}");
    assert!(
        organization.contains("600"),
        "the rate limit stayed: {organization}"
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_policy_page_counts_findings_by_rule_and_action_without_the_secrets() {
    let harness = dashboard(RegistrationMode::Open, Duration::from_secs(3600)).await;
    let (mut ada, key) = organization(&harness, "Careful", "ada@careful.test", "developer").await;
    let secret = "sk-proj-Zr8Tq2Wm5Xc9Vb3Nk7Lp4Hd6Jf1Gs0Ae2Ui8Oy5Rt3Ew";
    for content in [
        format!("my key is {secret}"),
        "mail grace.hopper@example.org and alan.turing@example.org".to_owned(),
    ] {
        let response = harness
            .client
            .post(format!("{}/v1/chat/completions", harness.base))
            .bearer_auth(&key)
            .json(&json!({"model": "fast", "messages": [{"role": "user", "content": content}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let page = ada.get("/policy").await;
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains(r#"data-src="/ui/policy/findings?""#),
        "{}",
        page.body
    );
    let started = Instant::now();
    let findings = loop {
        let findings = ada.get("/ui/policy/findings?window=1h").await;
        assert_eq!(findings.status, 200, "{}", findings.body);
        if findings.body.contains("openai_api_key") && findings.body.contains("email") {
            break findings.body;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{findings:?}",
            findings = findings.body
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Two emails in one request: two findings, one request; flagged (the default policy).
    let email = findings.split("<code>email</code>").nth(1).unwrap();
    let cells: Vec<&str> = email.split("<td class=\"num\">").skip(1).take(2).collect();
    assert!(
        cells[0].starts_with("2<") && cells[1].starts_with("1<"),
        "{email}"
    );
    assert!(findings.contains(r#"data-action="flag""#));
    assert!(!findings.contains(secret) && !findings.contains("grace.hopper"));

    // An owner edits a project's policy on the page: checked as the API checks it.
    let token = Browser::token(&page);
    let made = ada
        .post("/manage/projects", &[("token", &token), ("name", "Bot")])
        .await;
    assert_eq!(made.status, StatusCode::SEE_OTHER);
    let page = ada.get("/policy").await;
    assert!(page.body.contains("Bot — version 1"), "{}", page.body);
    let project = page
        .body
        .split(r#"action="/policy/"#)
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_owned();
    let path = format!("/policy/{project}");
    let save = |policy: &'static str, version: &'static str| {
        [
            ("token", token.clone()),
            ("policy", policy.to_owned()),
            ("expected_version", version.to_owned()),
        ]
    };
    let not_json = ada.post(&path, &borrowed(&save("{rules", "1"))).await;
    assert_eq!(not_json.status, StatusCode::BAD_REQUEST);
    assert!(not_json.body.contains("The policy is not valid"));
    let shred = ada
        .post(
            &path,
            &borrowed(&save(r#"{"rules":{"email":"shred"}}"#, "1")),
        )
        .await;
    assert_eq!(shred.status, StatusCode::BAD_REQUEST);
    assert!(shred.body.contains("shred"), "{}", shred.body);
    let saved = ada
        .post(
            &path,
            &borrowed(&save(r#"{"rules":{"email":"block"}}"#, "1")),
        )
        .await;
    assert_eq!(saved.status, StatusCode::SEE_OTHER, "{}", saved.body);
    let stale = ada
        .post(
            &path,
            &borrowed(&save(r#"{"rules":{"email":"flag"}}"#, "1")),
        )
        .await;
    assert_eq!(stale.status, StatusCode::CONFLICT, "{}", stale.body);
    let created = ada
        .post(
            "/manage/keys",
            &[
                ("token", &token),
                ("name", "bot"),
                ("role", "developer"),
                ("project_id", &project),
            ],
        )
        .await;
    let bot_key = created
        .body
        .split("data-new-key>")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_owned();
    let blocked = harness
        .client
        .post(format!("{}/v1/chat/completions", harness.base))
        .bearer_auth(&bot_key)
        .json(&json!({"model": "fast", "messages": [{"role": "user", "content": "write to ada@example.org"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(blocked.status(), 400);
    harness.stop().await;
}

/// A form of owned values as the `post` helper takes it.
fn borrowed<'a>(form: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    form.iter()
        .map(|(name, value)| (*name, value.as_str()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_manages_projects_keys_and_members_with_the_apis_checks() {
    let harness = dashboard(RegistrationMode::Open, Duration::from_secs(3600)).await;
    let (mut ada, viewer_key) =
        organization(&harness, "Managed", "ada@managed.test", "viewer").await;
    let page = ada.get("/manage").await;
    assert_eq!(page.status, 200, "{}", page.body);
    assert!(
        page.body.contains(r#"href="/manage""#),
        "the owner's nav shows Admin"
    );
    let token = Browser::token(&page);
    assert_eq!(
        ada.post("/manage/projects", &[("token", "forged"), ("name", "x")])
            .await
            .status,
        StatusCode::FORBIDDEN
    );
    let empty = ada
        .post("/manage/projects", &[("token", &token), ("name", " ")])
        .await;
    assert_eq!(empty.status, StatusCode::BAD_REQUEST);
    assert!(empty.body.contains("name: 1 to"), "{}", empty.body);
    let created = ada
        .post(
            "/manage/projects",
            &[("token", &token), ("name", "Support bot")],
        )
        .await;
    assert_eq!(created.status, StatusCode::SEE_OTHER);
    assert!(ada.get("/manage").await.body.contains("Support bot"));

    // A new key's secret is shown once, and works; the page never shows it again.
    let bad_role = ada
        .post(
            "/manage/keys",
            &[
                ("token", &token),
                ("name", "ci"),
                ("role", "superuser"),
                ("project_id", ""),
            ],
        )
        .await;
    assert_eq!(bad_role.status, StatusCode::BAD_REQUEST);
    assert!(bad_role.body.contains("is not a role"), "{}", bad_role.body);
    let made = ada
        .post(
            "/manage/keys",
            &[
                ("token", &token),
                ("name", "ci"),
                ("role", "developer"),
                ("project_id", ""),
            ],
        )
        .await;
    assert_eq!(made.status, StatusCode::CREATED, "{}", made.body);
    let secret = made
        .body
        .split("data-new-key>")
        .nth(1)
        .unwrap()
        .split('<')
        .next()
        .unwrap()
        .to_owned();
    assert!(secret.starts_with("loom-"), "{secret}");
    let trace = chat(&harness, &secret, "fast").await;
    assert!(!trace.is_empty());
    let listed = ada.get("/manage").await;
    assert!(!listed.body.contains(&secret));
    let row = listed
        .body
        .split("<tr data-key=\"")
        .find(|row| row.contains("<td>ci</td>"))
        .unwrap();
    let key_id = row.split('"').next().unwrap().to_owned();
    let revoked = ada
        .post(
            &format!("/manage/keys/{key_id}/revoke"),
            &[("token", &token)],
        )
        .await;
    assert_eq!(revoked.status, StatusCode::SEE_OTHER);
    let refused = harness
        .client
        .post(format!("{}/v1/chat/completions", harness.base))
        .bearer_auth(&secret)
        .json(&json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);

    // Members: granted, listed, revoked.
    let granted = ada
        .post(
            "/manage/members",
            &[
                ("token", &token),
                ("user", "bob@managed.test"),
                ("role", "viewer"),
            ],
        )
        .await;
    assert_eq!(granted.status, StatusCode::SEE_OTHER, "{}", granted.body);
    assert!(ada.get("/manage").await.body.contains("bob@managed.test"));
    let gone = ada
        .post(
            "/manage/members/revoke",
            &[
                ("token", &token),
                ("user", "bob@managed.test"),
                ("role", "viewer"),
            ],
        )
        .await;
    assert_eq!(gone.status, StatusCode::SEE_OTHER);
    assert!(!ada.get("/manage").await.body.contains("bob@managed.test"));

    // A user added with an initial password signs in, and changes it on their account page.
    let add = |email: &'static str| {
        [
            ("token", token.clone()),
            ("email", email.to_owned()),
            ("role", "developer".to_owned()),
            ("password", "initial password 1".to_owned()),
        ]
    };
    let added = ada
        .post("/manage/users", &borrowed(&add("Carol@managed.test")))
        .await;
    assert_eq!(added.status, StatusCode::SEE_OTHER, "{}", added.body);
    let again = ada
        .post("/manage/users", &borrowed(&add("carol@managed.test")))
        .await;
    assert_eq!(again.status, StatusCode::CONFLICT);
    let mut carol = Browser::new(&harness);
    let signed = carol
        .sign_in("carol@managed.test", "initial password 1")
        .await;
    assert_eq!(signed.status, StatusCode::SEE_OTHER, "{}", signed.body);
    let account = carol.get("/account").await;
    assert!(account.body.contains("carol@managed.test") && account.body.contains("Managed"));
    let carol_token = Browser::token(&account);
    let change = |current: &'static str| {
        [
            ("token", carol_token.clone()),
            ("current", current.to_owned()),
            ("new", "carol's own passphrase".to_owned()),
        ]
    };
    let wrong = carol
        .post("/account/password", &borrowed(&change("guess")))
        .await;
    assert_eq!(wrong.status, StatusCode::UNAUTHORIZED);
    let changed = carol
        .post(
            "/account/password",
            &borrowed(&change("initial password 1")),
        )
        .await;
    assert_eq!(changed.status, 200, "{}", changed.body);
    assert!(changed.body.contains("Your password is changed."));
    let mut later = Browser::new(&harness);
    let old = later
        .sign_in("carol@managed.test", "initial password 1")
        .await;
    assert_eq!(old.status, StatusCode::UNAUTHORIZED);
    let new = later
        .sign_in("carol@managed.test", "carol's own passphrase")
        .await;
    assert_eq!(new.status, StatusCode::SEE_OTHER);
    assert!(
        later
            .get("/")
            .await
            .body
            .contains("carol@managed.test · developer")
    );

    // A viewer sees no Admin and may not use it.
    let mut viewer = Browser::new(&harness);
    let token = Browser::token(&viewer.get("/signin").await);
    viewer
        .post("/signin", &[("token", &token), ("api_key", &viewer_key)])
        .await;
    let home = viewer.get("/").await;
    assert!(!home.body.contains(r#"href="/manage""#));
    let page = viewer.get("/manage").await;
    assert_eq!(page.status, StatusCode::FORBIDDEN);
    let token = Browser::token(&home);
    let denied = viewer
        .post("/manage/projects", &[("token", &token), ("name", "sneaky")])
        .await;
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    let form = [
        ("token", token.as_str()),
        ("email", "eve@managed.test"),
        ("role", "owner"),
        ("password", "initial password 1"),
    ];
    let no_users = viewer.post("/manage/users", &form).await;
    assert_eq!(no_users.status, StatusCode::FORBIDDEN);
    harness.stop().await;
}
