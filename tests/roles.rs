//! The permission matrix (docs/roles.md) over HTTP on the real `loom serve`: every endpoint
//! (inference, admin API, analytics, traces, SQL, export) × every role × the caller's own tenant
//! and another's. A role that may not do something gets 403 `permission_denied`; another tenant's
//! objects are 404, the same answer as objects that do not exist.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::{Server, loom, text};
use reqwest::Method;
use serde_json::{Value, json};

const TOKEN: &str = "roles-admin";
const ROLES: [&str; 4] = ["viewer", "developer", "admin", "owner"];

struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    async fn call(
        &self,
        key: &str,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// As the operator; must succeed.
    async fn operator(&self, method: Method, path: &str, body: Value) -> Value {
        let (status, answer) = self.call(TOKEN, method, path, Some(body)).await;
        assert!((200..300).contains(&status), "{path}: {status} {answer}");
        answer
    }

    async fn key(&self, tenant: &str, role: &str) -> (String, String) {
        let key = self
            .operator(
                Method::POST,
                "/admin/keys",
                json!({"tenant_id": tenant, "role": role, "name": role}),
            )
            .await;
        (
            key["key"].as_str().unwrap().to_owned(),
            key["key_id"].as_str().unwrap().to_owned(),
        )
    }
}

fn chat() -> Value {
    json!({"model": "fast", "messages": [{"role": "user", "content": "hello"}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_endpoint_refuses_what_the_role_may_not_do_and_hides_other_tenants() {
    let mock = loom_mock::MockServer::start(loom_mock::MockConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("loom.toml");
    std::fs::write(
        &config,
        format!(
            "[upstreams.mock]\nprovider = \"openai_compatible\"\nbase_url = \"{}/v1\"\n\
             [models.fast]\ndeployments = [{{ upstream = \"mock\", model = \"gpt-4o-mini\" }}]\n",
            mock.url()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let server = Server::start(
        &data,
        &["--config", config.to_str().unwrap()],
        &[("LOOM_ADMIN_TOKEN", TOKEN)],
    )
    .unwrap();
    let client = Client {
        http: reqwest::Client::new(),
        base: server.base.clone(),
    };

    // Tenant A with a project and a key per role; tenant B with objects of its own.
    let a = client
        .operator(Method::POST, "/admin/tenants", json!({"name": "a"}))
        .await;
    let a = a["tenant_id"].as_str().unwrap().to_owned();
    let b = client
        .operator(Method::POST, "/admin/tenants", json!({"name": "b"}))
        .await;
    let b = b["tenant_id"].as_str().unwrap().to_owned();
    let project = client
        .operator(
            Method::POST,
            "/admin/projects",
            json!({"tenant_id": a, "name": "support", "routing_policy": {"max_tier": "L2"}}),
        )
        .await;
    let project = project["project_id"].as_str().unwrap().to_owned();
    let b_project = client
        .operator(
            Method::POST,
            "/admin/projects",
            json!({"tenant_id": b, "name": "theirs"}),
        )
        .await;
    let b_project = b_project["project_id"].as_str().unwrap().to_owned();
    let (b_key, b_key_id) = client.key(&b, "developer").await;
    let mut keys = Vec::new();
    for role in ROLES {
        keys.push((role, client.key(&a, role).await));
    }

    // A trace in each tenant, made by a developer.
    let trace_of = |key: String| {
        let client = &client;
        async move {
            let response = client
                .http
                .post(format!("{}/v1/chat/completions", client.base))
                .bearer_auth(key)
                .json(&chat())
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            response.headers()["x-request-id"]
                .to_str()
                .unwrap()
                .to_owned()
        }
    };
    let a_trace = trace_of(keys[1].1.0.clone()).await;
    let b_trace = trace_of(b_key.clone()).await;
    let started = Instant::now();
    while client
        .call(
            &keys[0].1.0,
            Method::GET,
            &format!("/v1/traces/{a_trace}"),
            None,
        )
        .await
        .0
        != 200
    {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the trace was not projected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    for (rank, (role, (key, key_id))) in keys.iter().enumerate() {
        // viewer 0, developer 1, admin 2, owner 3: what each may do.
        let (developer, admin, owner) = (rank >= 1, rank >= 2, rank >= 3);
        let allowed = |yes: bool, ok: u16| if yes { ok } else { 403 };
        // A key of someone else's in A, for revocations.
        let (_, victim) = client.key(&a, "viewer").await;
        let cases: Vec<(Method, String, Option<Value>, u16)> = vec![
            // Inference.
            (
                Method::POST,
                "/v1/chat/completions".into(),
                Some(chat()),
                allowed(developer, 200),
            ),
            (
                Method::POST,
                "/v1/embeddings".into(),
                Some(json!({"model": "fast", "input": "x"})),
                allowed(developer, 200),
            ),
            // Reading: every role.
            (
                Method::GET,
                "/v1/analytics/summary?window=1h".into(),
                None,
                200,
            ),
            (
                Method::GET,
                "/v1/analytics/breakdown?by=model".into(),
                None,
                200,
            ),
            (Method::GET, "/v1/activity".into(), None, 200),
            (Method::GET, "/v1/alerts".into(), None, 200),
            (Method::GET, "/v1/traces".into(), None, 200),
            (Method::GET, format!("/v1/traces/{a_trace}"), None, 200),
            (
                Method::POST,
                "/v1/sql".into(),
                Some(json!({"query": "SELECT count(*) AS n FROM requests"})),
                200,
            ),
            (Method::GET, "/v1/exports".into(), None, 200),
            (Method::GET, "/v1/quota/status".into(), None, 200),
            (
                Method::GET,
                format!("/admin/quotas?scope=project&id={project}"),
                None,
                200,
            ),
            // Setting quotas: admin and up.
            (
                Method::POST,
                "/admin/quotas".into(),
                Some(json!({"scope": "project", "id": project,
                            "limits": {"requests_per_minute": 10_000}})),
                allowed(admin, 200),
            ),
            // Bodies: developer and up.
            (
                Method::POST,
                "/v1/exports".into(),
                Some(json!({"bodies": "decrypt", "target": format!("t-{role}")})),
                allowed(developer, 202),
            ),
            // The admin API in the caller's tenant.
            (Method::GET, "/admin/tenants".into(), None, 200),
            (
                Method::POST,
                "/admin/tenants".into(),
                Some(json!({"name": "mine"})),
                403,
            ),
            (Method::GET, "/admin/projects".into(), None, 200),
            (Method::GET, format!("/admin/projects/{project}"), None, 200),
            (
                Method::POST,
                "/admin/projects".into(),
                Some(json!({"name": format!("p-{role}")})),
                allowed(admin, 201),
            ),
            (
                Method::PATCH,
                format!("/admin/projects/{project}"),
                Some(json!({"feature_flags": {"cache": {}}})),
                allowed(admin, 200),
            ),
            (
                Method::GET,
                "/admin/keys".into(),
                None,
                allowed(developer, 200),
            ),
            (
                Method::POST,
                "/admin/keys".into(),
                Some(json!({"role": "viewer"})),
                allowed(developer, 201),
            ),
            (
                Method::POST,
                "/admin/keys".into(),
                Some(json!({"role": "admin"})),
                allowed(admin, 201),
            ),
            (
                Method::POST,
                "/admin/keys".into(),
                Some(json!({"role": "owner"})),
                allowed(owner, 201),
            ),
            (
                Method::POST,
                "/admin/keys".into(),
                Some(json!({"role": "viewer", "owner": "someone@a"})),
                allowed(admin, 201),
            ),
            (
                Method::POST,
                format!("/admin/keys/{victim}/revoke"),
                None,
                allowed(admin, 204),
            ),
            (
                Method::GET,
                "/admin/members".into(),
                None,
                allowed(admin, 200),
            ),
            (
                Method::POST,
                "/admin/roles/grant".into(),
                Some(json!({"user": "ada@a", "role": "developer"})),
                allowed(admin, 204),
            ),
            (
                Method::POST,
                "/admin/roles/grant".into(),
                Some(json!({"user": "ada@a", "role": "owner"})),
                allowed(owner, 204),
            ),
            (
                Method::POST,
                "/admin/roles/revoke".into(),
                Some(json!({"user": "ada@a", "role": "owner"})),
                allowed(owner, 204),
            ),
            // Upstream credentials: admins and owners (removing one, so that the calls of the
            // roles after stay on the configured key).
            (
                Method::GET,
                "/admin/credentials".into(),
                None,
                allowed(admin, 200),
            ),
            (
                Method::POST,
                "/admin/credentials".into(),
                Some(json!({"upstream": "mock"})),
                allowed(admin, 200),
            ),
            (
                Method::POST,
                "/admin/kms/unwrap".into(),
                Some(json!({"master_key_id": "x", "wrapped_key": "y"})),
                403,
            ),
            (
                Method::POST,
                format!("/admin/tenants/{a}/erase"),
                Some(json!({})),
                if owner { 999 } else { 403 },
            ),
            // Another tenant's objects: not found, whatever the role.
            (Method::GET, format!("/v1/traces/{b_trace}"), None, 404),
            (
                Method::GET,
                format!("/admin/quotas?scope=project&id={b_project}"),
                None,
                404,
            ),
            (
                Method::POST,
                "/admin/quotas".into(),
                Some(json!({"scope": "project", "id": b_project,
                            "limits": {"requests_per_minute": 1}})),
                404,
            ),
            (
                Method::GET,
                format!("/admin/projects/{b_project}"),
                None,
                404,
            ),
            (
                Method::PATCH,
                format!("/admin/projects/{b_project}"),
                Some(json!({"name": "x"})),
                404,
            ),
            (
                Method::POST,
                format!("/admin/keys/{b_key_id}/revoke"),
                None,
                404,
            ),
            (
                Method::POST,
                "/admin/keys".into(),
                Some(json!({"tenant_id": b})),
                404,
            ),
            (
                Method::GET,
                format!("/admin/projects?tenant_id={b}"),
                None,
                404,
            ),
            (Method::GET, format!("/admin/keys?tenant_id={b}"), None, 404),
            (
                Method::GET,
                format!("/admin/members?tenant_id={b}"),
                None,
                404,
            ),
            (
                Method::POST,
                "/admin/roles/grant".into(),
                Some(json!({"tenant_id": b, "user": "x", "role": "viewer"})),
                404,
            ),
            (
                Method::POST,
                "/admin/roles/grant".into(),
                Some(json!({"user": "x", "role": "viewer", "project_id": b_project})),
                404,
            ),
            (
                Method::POST,
                format!("/admin/tenants/{b}/erase"),
                Some(json!({})),
                404,
            ),
            (
                Method::GET,
                format!("/admin/credentials?tenant_id={b}"),
                None,
                404,
            ),
            (
                Method::POST,
                "/admin/credentials".into(),
                Some(
                    json!({"project_id": b_project, "upstream": "mock", "api_key": "k-0123456789abcdef"}),
                ),
                404,
            ),
        ];
        for (method, path, body, expected) in cases {
            if expected == 999 {
                continue; // The owner erases A last.
            }
            let (status, answer) = client.call(key, method.clone(), &path, body).await;
            assert_eq!(status, expected, "{role} {method} {path}: {answer}");
            if status == 403 {
                assert_eq!(
                    answer["error"]["code"], "permission_denied",
                    "{role} {path}: {answer}"
                );
            }
        }
        // A viewer reads traces without bodies; the others with them.
        let (_, timeline) = client
            .call(key, Method::GET, &format!("/v1/traces/{a_trace}"), None)
            .await;
        assert_eq!(timeline["bodies"], developer, "{role}: {timeline}");
        // Listings show the caller's tenant only; a developer sees only its own keys.
        let (_, tenants) = client.call(key, Method::GET, "/admin/tenants", None).await;
        assert_eq!(tenants.as_array().unwrap().len(), 1, "{tenants}");
        if developer {
            let (_, listed) = client.call(key, Method::GET, "/admin/keys", None).await;
            let listed = listed.as_array().unwrap();
            assert!(listed.iter().any(|k| k["key_id"] == key_id.as_str()));
            assert!(listed.iter().all(|k| k["tenant_id"] == a.as_str()));
            if !admin {
                assert!(!listed.iter().any(|k| k["key_id"] == victim.as_str()));
            }
        }
    }

    // A key that acts for a user has at most the user's role, and stops when the user has none.
    client
        .operator(
            Method::POST,
            "/admin/roles/grant",
            json!({"tenant_id": a, "user": "grace@a", "role": "developer"}),
        )
        .await;
    let capped = client
        .operator(
            Method::POST,
            "/admin/keys",
            json!({"tenant_id": a, "role": "admin", "owner": "grace@a"}),
        )
        .await;
    let capped = capped["key"].as_str().unwrap();
    let (status, _) = client
        .call(
            capped,
            Method::POST,
            "/admin/projects",
            Some(json!({"name": "no"})),
        )
        .await;
    assert_eq!(status, 403);
    let (status, _) = client
        .call(capped, Method::POST, "/v1/chat/completions", Some(chat()))
        .await;
    assert_eq!(status, 200);
    client
        .operator(
            Method::POST,
            "/admin/roles/revoke",
            json!({"tenant_id": a, "user": "grace@a", "role": "developer"}),
        )
        .await;
    let (status, _) = client
        .call(capped, Method::POST, "/v1/chat/completions", Some(chat()))
        .await;
    assert_eq!(status, 401);

    // A key bound to a project reads that project only: the tenant's trace (made outside the
    // project) is not found, its analytics count none of the tenant's requests, and SQL and
    // exports, which read the whole tenant's archive, are refused.
    let bound = client
        .operator(
            Method::POST,
            "/admin/keys",
            json!({"tenant_id": a, "project_id": project, "role": "developer"}),
        )
        .await;
    let bound = bound["key"].as_str().unwrap();
    let (status, _) = client
        .call(bound, Method::GET, &format!("/v1/traces/{a_trace}"), None)
        .await;
    assert_eq!(status, 404);
    let (_, summary) = client
        .call(bound, Method::GET, "/v1/analytics/summary?window=1h", None)
        .await;
    assert_eq!(summary["metrics"]["requests"]["value"], 0, "{summary}");
    let (_, listed) = client.call(bound, Method::GET, "/v1/traces", None).await;
    assert_eq!(
        listed["traces"].as_array().map(Vec::len),
        Some(0),
        "{listed}"
    );
    for (method, path, body) in [
        (Method::POST, "/v1/sql", json!({"query": "SELECT 1"})),
        (Method::POST, "/v1/exports", json!({})),
    ] {
        let (status, answer) = client.call(bound, method, path, Some(body)).await;
        assert_eq!(status, 403, "{path}: {answer}");
        assert_eq!(answer["error"]["code"], "permission_denied");
    }
    let (status, answer) = client
        .call(
            bound,
            Method::POST,
            "/admin/keys",
            Some(json!({"project_id": b_project})),
        )
        .await;
    assert_eq!(status, 404, "{answer}");

    // A project's versions: an update against a version gone by is a 409.
    let (status, now) = client
        .call(
            TOKEN,
            Method::GET,
            &format!("/admin/projects/{project}"),
            None,
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(now["version"], 3, "two admins updated it: {now}");
    let (status, answer) = client
        .call(
            TOKEN,
            Method::PATCH,
            &format!("/admin/projects/{project}"),
            Some(json!({"name": "x", "expected_version": 2})),
        )
        .await;
    assert_eq!(
        (status, answer["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{answer}"
    );

    // Bad input: clear 400s naming the field, nothing applied.
    let owner_key = &keys[3].1.0;
    for (path, body, names) in [
        (
            "/admin/roles/grant",
            json!({"user": "x", "role": "root"}),
            "role",
        ),
        (
            "/admin/roles/grant",
            json!({"user": "u".repeat(257), "role": "viewer"}),
            "user",
        ),
        ("/admin/keys", json!({"role": "superuser"}), "role"),
        ("/admin/keys", json!({"expires_in": "soon"}), "expires_in"),
        (
            "/admin/keys",
            json!({"daily_budget_micro_usd": -5}),
            "daily_budget_micro_usd",
        ),
        (
            "/admin/projects",
            json!({"name": "p", "routing_policy": {"max_tier": "L9"}}),
            "routing_policy.max_tier",
        ),
        (
            "/admin/projects",
            json!({"name": "p", "routing_policy": {"default_tier": "L3", "max_tier": "L1"}}),
            "routing_policy.default_tier",
        ),
        (
            "/admin/projects",
            json!({"name": "p", "feature_flags": {"cache": {"ttl_seconds": 0}}}),
            "feature_flags.cache.ttl_seconds",
        ),
        ("/admin/projects", json!({"name": ""}), "name"),
    ] {
        let (status, answer) = client.call(owner_key, Method::POST, path, Some(body)).await;
        assert_eq!(status, 400, "{path}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{path}: {message}");
    }
    let (_, members) = client
        .call(owner_key, Method::GET, "/admin/members", None)
        .await;
    assert!(!members.to_string().contains("root"), "{members}");

    // The CLI, through the server with a tenant's key: the same operations, the same refusals.
    let cli = |key: &str, args: &[&str]| {
        let mut all = vec!["admin", "--url", &server.base, "--api-key", key];
        all.extend_from_slice(args);
        loom(&all)
    };
    let created = cli(
        owner_key,
        &[
            "project",
            "create",
            "--name",
            "from-cli",
            "--routing",
            r#"{"max_tier":"L1"}"#,
        ],
    );
    assert!(created.status.success(), "{}", text(&created.stderr));
    let shown: Value = serde_json::from_slice(&created.stdout).unwrap();
    assert_eq!(shown["routing_policy"]["max_tier"], "L1");
    // Its security policy: set, shown; a bad one refused naming the field, nothing applied.
    let project = shown["project_id"].as_str().unwrap().to_owned();
    let set = cli(
        owner_key,
        &[
            "policy",
            "set",
            &project,
            "--json",
            r#"{"rules":{"email":"redact"},"outputs":"off"}"#,
        ],
    );
    assert!(set.status.success(), "{}", text(&set.stderr));
    let policy: Value = serde_json::from_slice(&set.stdout).unwrap();
    assert_eq!(policy["rules"]["email"], "redact");
    let bad = cli(
        owner_key,
        &[
            "policy",
            "set",
            &project,
            "--json",
            r#"{"rules":{"mail":"redact"}}"#,
        ],
    );
    assert!(!bad.status.success());
    assert!(
        text(&bad.stderr).contains("security_policy.rules.mail"),
        "{}",
        text(&bad.stderr)
    );
    let shown = cli(owner_key, &["policy", "show", &project]);
    let policy: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(
        (
            policy["rules"]["email"].as_str(),
            policy["outputs"].as_str()
        ),
        (Some("redact"), Some("off"))
    );
    let granted = cli(
        owner_key,
        &["role", "grant", "--user", "lin@a", "--role", "admin"],
    );
    assert!(granted.status.success(), "{}", text(&granted.stderr));
    let users: Value = serde_json::from_slice(&cli(owner_key, &["user", "list"]).stdout).unwrap();
    assert!(
        users
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["user"] == "lin@a" && u["role"] == "admin"),
        "{users}"
    );
    let refused = cli(&keys[0].1.0, &["project", "create", "--name", "no"]);
    assert!(!refused.status.success());
    assert!(
        text(&refused.stderr).contains("403"),
        "{}",
        text(&refused.stderr)
    );

    // The owner may erase its own tenant; its keys stop working.
    let (status, answer) = client
        .call(
            owner_key,
            Method::POST,
            &format!("/admin/tenants/{a}/erase"),
            Some(json!({})),
        )
        .await;
    assert_eq!(status, 204, "{answer}");
    let (status, _) = client
        .call(
            &keys[1].1.0,
            Method::POST,
            "/v1/chat/completions",
            Some(chat()),
        )
        .await;
    assert_eq!(status, 401);
    assert!(server.stop().success());

    // Everything was on the log: the data dir shows the same projects and members.
    let local = |args: &[&str]| {
        let mut all = vec!["admin", "--data-dir", data.to_str().unwrap()];
        all.extend_from_slice(args);
        loom(&all)
    };
    let projects: Value =
        serde_json::from_slice(&local(&["project", "list", "--tenant", &b]).stdout).unwrap();
    assert_eq!(projects[0]["name"], "theirs", "{projects}");
}
