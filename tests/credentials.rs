//! Tenants' and projects' own upstream credentials: a request uses its project's key for an
//! upstream, else its tenant's, else the upstream's configured one — in each provider's header;
//! rotating or removing one takes effect on the next request, without a restart; other tenants
//! never use it; the log and the data dir never hold it in clear; bad input is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::gateway::{ADMIN, Harness, start};
use loom_mock::MockConfig;
use loom_schemas::event::Payload;
use reqwest::Method;
use serde_json::{Value, json};

const TENANT_KEY: &str = "tenant-upstream-key-0001-aaaa";
const ROTATED_KEY: &str = "tenant-upstream-key-0002-bbbb";
const PROJECT_KEY: &str = "project-upstream-key-0003-cccc";
const CLAUDE_KEY: &str = "tenant-anthropic-key-0004-dddd";

/// What the upstream got as its key on the last request: `Authorization: Bearer`, or the
/// Anthropic and Azure headers.
async fn last_key(harness: &Harness) -> String {
    let requests = harness.upstream_requests().await;
    let last = requests.last().unwrap();
    let header = ["authorization", "x_api_key", "api_key"]
        .iter()
        .find_map(|field| last[field].as_str())
        .unwrap();
    header.trim_start_matches("Bearer ").to_owned()
}

async fn chat(harness: &Harness, key: &str) {
    let (status, body) = harness
        .call(
            Method::POST,
            "/v1/chat/completions",
            key,
            Some(json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

async fn set(harness: &Harness, token: &str, body: Value) -> (u16, Value) {
    harness
        .call(Method::POST, "/admin/credentials", token, Some(body))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scope_uses_its_own_upstream_key_rotated_without_a_restart() {
    let harness = start(MockConfig::default(), "").await;
    let tenant = harness.tenant;
    let (project, project_key) = harness.project_with_key(json!({"name": "p"})).await;
    let other = harness
        .admin("/admin/tenants", json!({"name": "globex"}))
        .await["tenant_id"]
        .clone();
    let other_key = harness
        .admin("/admin/keys", json!({"tenant_id": other}))
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();

    // Nobody has a key of their own: the upstream's configured one.
    chat(&harness, &harness.key).await;
    assert_eq!(last_key(&harness).await, "mock-key");

    // The tenant's key, for the whole tenant; another tenant goes on with the configured one.
    let (status, shown) = set(
        &harness,
        ADMIN,
        json!({"tenant_id": tenant, "upstream": "primary", "api_key": TENANT_KEY}),
    )
    .await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["fingerprint"], "aaaa");
    assert!(!shown.to_string().contains(TENANT_KEY));
    chat(&harness, &harness.key).await;
    assert_eq!(last_key(&harness).await, TENANT_KEY);
    chat(&harness, &project_key).await;
    assert_eq!(last_key(&harness).await, TENANT_KEY);
    chat(&harness, &other_key).await;
    assert_eq!(last_key(&harness).await, "mock-key");

    // A project's own key comes first for its requests; the tenant admin sets it with its key.
    let owner_key = harness
        .admin("/admin/keys", json!({"tenant_id": tenant, "role": "owner"}))
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, shown) = set(
        &harness,
        &owner_key,
        json!({"project_id": project, "upstream": "primary", "api_key": PROJECT_KEY}),
    )
    .await;
    assert_eq!(status, 200, "{shown}");
    chat(&harness, &project_key).await;
    assert_eq!(last_key(&harness).await, PROJECT_KEY);
    chat(&harness, &harness.key).await;
    assert_eq!(last_key(&harness).await, TENANT_KEY);

    // Rotated: the next request uses the new key (no restart); removed: the configured one.
    set(
        &harness,
        ADMIN,
        json!({"tenant_id": tenant, "upstream": "primary", "api_key": ROTATED_KEY}),
    )
    .await;
    chat(&harness, &harness.key).await;
    assert_eq!(last_key(&harness).await, ROTATED_KEY);
    let (status, removed) = set(
        &harness,
        ADMIN,
        json!({"tenant_id": tenant, "upstream": "primary"}),
    )
    .await;
    assert_eq!((status, removed), (200, Value::Null));
    chat(&harness, &harness.key).await;
    assert_eq!(last_key(&harness).await, "mock-key");

    // Each provider's header: Anthropic's `x-api-key`.
    set(
        &harness,
        ADMIN,
        json!({"tenant_id": tenant, "upstream": "claude", "api_key": CLAUDE_KEY}),
    )
    .await;
    let (status, body) = harness
        .call(
            Method::POST,
            "/v1/messages",
            &harness.key,
            Some(json!({"model": "claude", "max_tokens": 20,
                        "messages": [{"role": "user", "content": "hi"}]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(last_key(&harness).await, CLAUDE_KEY);

    // Listed without keys; a project key sees its project's only.
    let (status, listed) = harness
        .call(
            Method::GET,
            &format!("/admin/credentials?tenant_id={tenant}"),
            ADMIN,
            None,
        )
        .await;
    assert_eq!(status, 200);
    let upstreams: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["upstream"].as_str().unwrap())
        .collect();
    assert_eq!(upstreams, ["claude", "primary"], "{listed}");
    for key in [TENANT_KEY, ROTATED_KEY, PROJECT_KEY, CLAUDE_KEY] {
        assert!(!listed.to_string().contains(key));
    }

    // Bad input: clear 400s (or 403s) naming the field, nothing set.
    for (token, body, status, names) in [
        (
            ADMIN,
            json!({"tenant_id": tenant, "upstream": "nope", "api_key": TENANT_KEY}),
            400,
            "upstream",
        ),
        (
            ADMIN,
            json!({"tenant_id": tenant, "upstream": "primary", "api_key": "has spaces in it"}),
            400,
            "api_key",
        ),
        (
            ADMIN,
            json!({"tenant_id": tenant, "upstream": "primary", "api_key": TENANT_KEY,
                   "base_url": "ftp://x"}),
            400,
            "base_url",
        ),
        (
            owner_key.as_str(),
            json!({"upstream": "primary", "api_key": TENANT_KEY,
                   "base_url": "http://127.0.0.1:9/v1"}),
            403,
            "base_url",
        ),
        (
            project_key.as_str(),
            json!({"upstream": "primary", "api_key": TENANT_KEY}),
            403,
            "",
        ),
        (
            ADMIN,
            json!({"tenant_id": tenant, "upstream": "primary", "key": TENANT_KEY}),
            400,
            "key",
        ),
    ] {
        let (code, answer) = set(&harness, token, body.clone()).await;
        assert_eq!(code, status, "{body}: {answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{body}: {message}");
        assert!(!message.contains(TENANT_KEY));
    }
    chat(&harness, &harness.key).await;
    assert_eq!(last_key(&harness).await, "mock-key");

    // The log holds the keys sealed with the tenant's data key: no file holds one in clear.
    let dir = harness.dir.path().to_owned();
    let recorded = harness.stop().await;
    let mut sealed = 0;
    for event in &recorded.control {
        if let Payload::UpstreamCredentialSet(set) = &event.payload
            && let Some(api_key) = &set.api_key
        {
            let opened = recorded.open(event, "api_key", api_key);
            assert!(
                [TENANT_KEY, ROTATED_KEY, PROJECT_KEY, CLAUDE_KEY]
                    .contains(&String::from_utf8(opened).unwrap().as_str())
            );
            sealed += 1;
        }
    }
    assert_eq!(sealed, 4);
    let mut stack = vec![dir];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        for key in [TENANT_KEY, ROTATED_KEY, PROJECT_KEY, CLAUDE_KEY] {
            assert!(
                !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
                "{} holds {key}",
                path.display()
            );
        }
    }
}
