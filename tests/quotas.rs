//! Quotas on the request path: daily budgets per tenant, project, user and key reserved before
//! the upstream call and settled after it (streams and cancelled streams included), released on
//! failure; per-minute rate limits; OpenAI's 429s and `x-ratelimit-*` headers; the quota status
//! and admin APIs with their bad input; and the ledger's events on the log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::gateway::{ADMIN, Harness, MASTER, read_sse, start_with};
use loom_mock::MockConfig;
use loom_schemas::event::{Payload, QuotaScope};
use serde_json::{Value, json};

async fn set_quota(harness: &Harness, token: &str, body: Value) -> (u16, Value) {
    let response = harness
        .client
        .post(format!("{}/admin/quotas", harness.base))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn status(harness: &Harness, user: &str) -> Value {
    harness
        .client
        .get(format!("{}/v1/quota/status", harness.base))
        .bearer_auth(&harness.key)
        .header("x-loom-user", user)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn scope<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["scopes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scope"] == name)
        .unwrap_or_else(|| panic!("no {name} in {status}"))
}

async fn chat_as(harness: &Harness, user: &str, max_tokens: u64) -> reqwest::Response {
    harness
        .chat(
            json!({"model": "fast", "max_tokens": max_tokens, "user": user,
                     "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budgets_are_reserved_settled_and_released_and_rates_limit_per_minute() {
    let harness = start_with(
        MockConfig {
            chunk_delay: Duration::from_millis(30),
            ..MockConfig::default()
        },
        "",
        false,
    )
    .await;
    let tenant = harness.tenant;

    // A user's daily token budget: admitted while the estimate (prompt + max_tokens) fits.
    let (code, view) = set_quota(
        &harness,
        ADMIN,
        json!({"tenant_id": tenant, "scope": "user", "id": "ada",
               "limits": {"tokens_per_day": 400}}),
    )
    .await;
    assert_eq!(code, 200, "{view}");
    assert_eq!(view["limits"]["tokens_per_day"], 400);
    assert_eq!(view["own"]["cost_micro_usd_per_day"], Value::Null);
    // The user's default daily dollars still apply ($10).
    assert_eq!(view["limits"]["cost_micro_usd_per_day"], 10_000_000);

    let mut admitted = 0;
    let denied = loop {
        let response = chat_as(&harness, "ada", 100).await;
        if response.status() == 429 {
            break response;
        }
        assert_eq!(response.status(), 200);
        let headers = response.headers();
        assert_eq!(headers["x-ratelimit-limit-tokens"], "400");
        assert!(headers.contains_key("x-ratelimit-remaining-tokens"));
        assert!(
            headers["x-ratelimit-reset-tokens"]
                .to_str()
                .unwrap()
                .ends_with('s')
        );
        admitted += 1;
        assert!(admitted < 100, "the budget never ran out");
    };
    assert!(admitted >= 1);
    assert!(denied.headers().contains_key("retry-after"));
    assert_eq!(denied.headers()["x-should-retry"], "false");
    let body: Value = denied.json().await.unwrap();
    assert_eq!(body["error"]["type"], "insufficient_quota", "{body}");
    assert_eq!(body["error"]["code"], "user_budget_exceeded");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("daily token budget")
    );
    // What was used is what the upstream reported, and nothing stays reserved.
    let ada = status(&harness, "ada").await;
    let user = scope(&ada, "user");
    assert_eq!(user["reserved"]["tokens"], 0, "{ada}");
    let used = user["used"]["tokens"].as_i64().unwrap();
    // Refused because the next estimate (6 bytes of prompt / 3 + 100) did not fit.
    assert!(used > 0 && used + 102 > 400, "{ada}");
    assert_eq!(
        user["remaining"]["tokens"].as_i64().unwrap(),
        400 - used,
        "{ada}"
    );
    // Another user is not held back by ada's budget (the header names the user, too).
    let response = harness
        .chat(json!({"model": "fast", "max_tokens": 100,
                     "messages": [{"role": "user", "content": "hi"}]}))
        .header("x-loom-user", "grace")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // An upstream that refuses the request releases the reservation: nothing used or held.
    let before = scope(&status(&harness, "grace").await, "user")["used"]["tokens"]
        .as_i64()
        .unwrap();
    harness
        .faults(json!([{"kind": "status", "status": 400}]))
        .await;
    let failed = chat_as(&harness, "grace", 100).await;
    assert_eq!(failed.status(), 400);
    let grace = status(&harness, "grace").await;
    assert_eq!(scope(&grace, "user")["used"]["tokens"], before, "{grace}");
    assert_eq!(scope(&grace, "user")["reserved"]["tokens"], 0, "{grace}");

    // A stream is settled with its usage; a stream the client leaves is settled from what was
    // streamed.
    let streamed = harness
        .chat(json!({"model": "fast", "stream": true, "user": "lin",
                     "messages": [{"role": "user", "content": "tell me a story"}]}))
        .send()
        .await
        .unwrap();
    let frames = read_sse(streamed).await;
    assert!(frames.iter().any(|f| f.contains("[DONE]")));
    let lin = status(&harness, "lin").await;
    assert!(scope(&lin, "user")["used"]["tokens"].as_i64().unwrap() > 0);
    let mut left = harness
        .chat(json!({"model": "fast", "stream": true, "user": "max",
                     "messages": [{"role": "user", "content": "tell me a long story"}]}))
        .send()
        .await
        .unwrap();
    left.chunk().await.unwrap();
    left.chunk().await.unwrap();
    drop(left);
    let settled = 'settled: {
        for _ in 0..100 {
            let max = status(&harness, "max").await;
            let user = scope(&max, "user");
            if user["reserved"]["tokens"] == 0 && user["used"]["tokens"].as_i64() > Some(0) {
                break 'settled true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    };
    assert!(settled, "the cancelled stream was not settled");

    // A rate limit per key: the fourth request in a minute is refused with `retry-after`.
    let (code, _) = set_quota(
        &harness,
        ADMIN,
        json!({"tenant_id": tenant, "scope": "key", "id": key_id(&harness).await,
               "limits": {"requests_per_minute": 3}}),
    )
    .await;
    assert_eq!(code, 200);
    let mut limited = None;
    for _ in 0..4 {
        let response = chat_as(&harness, "rate", 10).await;
        if response.status() == 429 {
            limited = Some(response);
            break;
        }
        assert_eq!(response.headers()["x-ratelimit-limit-requests"], "3");
    }
    let limited = limited.expect("the rate limit never applied");
    let retry: u64 = limited.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    assert!(!limited.headers().contains_key("x-should-retry"));
    let body: Value = limited.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded", "{body}");
    assert_eq!(body["error"]["type"], "requests");
    // Back to no limit: `null` is the default again (a key has none).
    let (code, view) = set_quota(
        &harness,
        ADMIN,
        json!({"tenant_id": tenant, "scope": "key", "id": key_id(&harness).await,
               "limits": {"requests_per_minute": null}}),
    )
    .await;
    assert_eq!(code, 200);
    assert_eq!(view["limits"]["requests_per_minute"], Value::Null);
    assert_eq!(view["own"]["requests_per_minute"], Value::Null);
    assert_eq!(chat_as(&harness, "rate", 10).await.status(), 200);

    // Usage per user for admins: every user with limits or usage today.
    let users: Value = harness
        .client
        .get(format!(
            "{}/admin/quotas?tenant_id={tenant}&scope=user",
            harness.base
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = users
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["id"].as_str().unwrap())
        .collect();
    for user in ["ada", "grace", "lin", "max"] {
        assert!(ids.contains(&user), "{users}");
    }

    // Bad input: 400s naming the field; nothing applied.
    for (body, says) in [
        (
            json!({"tenant_id": tenant, "scope": "user", "id": "ada",
                   "limits": {"tokens_per_day": -1}}),
            "limits.tokens_per_day",
        ),
        (
            json!({"tenant_id": tenant, "scope": "user", "id": "ada",
                   "limits": {"requests_per_minute": 1_000_000_000_000i64}}),
            "limits.requests_per_minute",
        ),
        (
            json!({"tenant_id": tenant, "scope": "galaxy", "limits": {"tokens_per_day": 1}}),
            "scope",
        ),
        (
            json!({"tenant_id": tenant, "scope": "user", "id": "u".repeat(257),
                   "limits": {"tokens_per_day": 1}}),
            "id",
        ),
        (
            json!({"tenant_id": tenant, "scope": "user", "id": "ada", "limits": {}}),
            "limits",
        ),
        (
            json!({"tenant_id": tenant, "scope": "user", "id": "ada",
                   "limits": {"tokens_per_year": 1}}),
            "tokens_per_year",
        ),
    ] {
        let (code, error) = set_quota(&harness, ADMIN, body).await;
        assert_eq!(code, 400, "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{says}: {message}");
    }
    let ada = status(&harness, "ada").await;
    assert_eq!(scope(&ada, "user")["limits"]["tokens_per_day"], 400);
    let (code, _) = set_quota(
        &harness,
        &harness.key,
        json!({"scope": "user", "id": "ada", "limits": {"tokens_per_day": 1}}),
    )
    .await;
    assert_eq!(code, 403, "a developer sets no quotas");
    let long_user = chat_as(&harness, &"u".repeat(257), 10).await;
    assert_eq!(long_user.status(), 400);
    let body: Value = long_user.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("user:")
    );

    let ada_used = scope(&status(&harness, "ada").await, "user")["used"].clone();
    // The ledger on the log: every reservation is settled or released, once; denials name the
    // scope; no event carries more than the scope ids.
    let recorded = harness.stop().await;
    let mut reserved = HashMap::new();
    let mut closed = HashMap::new();
    let mut denied_scopes = Vec::new();
    for event in &recorded.events {
        match &event.payload {
            Payload::QuotaReserved(r) => {
                reserved.insert(r.reservation_id, r.tokens);
            }
            Payload::QuotaConsumed(c) => {
                let id = c.reservation_id.unwrap();
                assert!(closed.insert(id, "consumed").is_none());
                assert!(c.tokens > 0);
            }
            Payload::QuotaReleased(r) => {
                assert!(closed.insert(r.reservation_id, "released").is_none());
                assert_eq!(r.reason, "failed");
            }
            Payload::QuotaDenied(d) => denied_scopes.push(d.scope),
            _ => {}
        }
    }
    assert!(!reserved.is_empty());
    for id in reserved.keys() {
        assert!(closed.contains_key(id), "reservation {id} never closed");
    }
    assert_eq!(closed.values().filter(|c| **c == "released").count(), 1);
    assert_eq!(denied_scopes, [QuotaScope::User, QuotaScope::ApiKey]);

    // With the gateway stopped, `loom admin` on its data directory reads the same usage from
    // the log.
    let shown = std::process::Command::new(common::LOOM)
        .args(["admin", "--data-dir"])
        .arg(recorded._dir.path())
        .args(["quota", "show", "--tenant", &tenant.to_string()])
        .args(["--scope", "user", "--id", "ada"])
        .env("LOOM_MASTER_KEY", MASTER)
        .output()
        .unwrap();
    assert!(shown.status.success(), "{}", common::text(&shown.stderr));
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert!(ada_used["tokens"].as_i64() > Some(0), "{ada_used}");
    assert_eq!(shown[0]["used"], ada_used, "{shown}");
}

/// The id of the harness's key.
async fn key_id(harness: &Harness) -> String {
    let keys: Value = harness
        .client
        .get(format!(
            "{}/admin/keys?tenant_id={}",
            harness.base, harness.tenant
        ))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    keys[0]["key_id"].as_str().unwrap().to_owned()
}
