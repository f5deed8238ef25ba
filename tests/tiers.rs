//! A project's routing policy on the request path: allowed models, the highest tier, `auto` for
//! the default tier, escalation to the next tier when every deployment of the alias fails — and
//! the tier recorded in `routing.decided`, the read models and the analytics' breakdown by tier.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::gateway::{ADMIN, Harness, start_with, trace_of};
use loom_mock::MockConfig;
use loom_schemas::event::Payload;
use serde_json::{Value, json};

const TIERS: &str = r#"
[models.cheap]
tier = "L1"
deployments = [{ upstream = "primary", model = "gpt-4o-mini" }]

[models.smart]
tier = "L2"
deployments = [{ upstream = "local", model = "gpt-4o" }]

[models.frontier]
tier = "L3"
deployments = [{ upstream = "local", model = "o3" }]
"#;

async fn key_for(harness: &Harness, routing_policy: Value) -> String {
    let project = harness
        .admin(
            "/admin/projects",
            json!({"tenant_id": harness.tenant, "name": "p", "routing_policy": routing_policy}),
        )
        .await;
    let key = harness
        .admin(
            "/admin/keys",
            json!({"tenant_id": harness.tenant, "project_id": project["project_id"]}),
        )
        .await;
    key["key"].as_str().unwrap().to_owned()
}

async fn get(harness: &Harness, key: &str, path: &str) -> Value {
    let response = harness
        .client
        .get(format!("{}{path}", harness.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    response.json().await.unwrap()
}

async fn chat(harness: &Harness, key: &str, model: &str) -> (u16, Value, String) {
    let response = harness
        .client
        .post(format!("{}/v1/chat/completions", harness.base))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let trace = trace_of(&response);
    let status = response.status().as_u16();
    (status, response.json().await.unwrap(), trace)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projects_routing_policy_limits_resolves_and_escalates_by_tier() {
    let harness = start_with(MockConfig::default(), TIERS, true).await;
    let key = key_for(
        &harness,
        json!({"allowed_models": ["cheap", "smart", "frontier"], "default_tier": "L1",
               "max_tier": "L2", "escalate_on_failure": true}),
    )
    .await;
    let narrow = key_for(&harness, json!({"allowed_models": ["smart"]})).await;

    // Not allowed: above the highest tier, or not in the list. 403 `model_not_allowed`.
    for (key, model, says) in [
        (&key, "frontier", "highest tier"),
        (&key, "fast", "allowed models"),
        (&narrow, "cheap", "allowed models"),
    ] {
        let (status, body, _) = chat(&harness, key, model).await;
        assert_eq!(status, 403, "{model}: {body}");
        assert_eq!(body["error"]["code"], "model_not_allowed");
        assert!(
            body["error"]["message"].as_str().unwrap().contains(says),
            "{body}"
        );
    }
    // `/v1/models` lists what the project may call.
    let models = get(&harness, &narrow, "/v1/models").await;
    assert_eq!(
        models["data"],
        json!([{"id": "smart", "object": "model", "created": 0, "owned_by": "loom"}])
    );
    // `auto` is the default tier's alias; a project with no default tier has no `auto`.
    let (status, body, auto) = chat(&harness, &key, "auto").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "gpt-4o-mini");
    let (status, _, _) = chat(&harness, &narrow, "auto").await;
    assert_eq!(status, 404);
    // Every attempt at `cheap` fails (the attempt and its retry): `smart`, one tier up, answers.
    harness
        .faults(json!([{"kind": "status", "status": 500}, {"kind": "status", "status": 500}]))
        .await;
    let (status, body, escalated) = chat(&harness, &key, "cheap").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "gpt-4o");
    // The narrow project's `smart` does not escalate.
    harness
        .faults(json!([{"kind": "status", "status": 500}, {"kind": "status", "status": 500}]))
        .await;
    let (status, _, _) = chat(&harness, &narrow, "smart").await;
    assert_eq!(status, 502);

    // The analytics break down by tier (the escalated request counts in its alias's tier).
    let started = Instant::now();
    let tiers = loop {
        let response = get(&harness, ADMIN, "/v1/analytics/breakdown?by=tier&window=1h").await;
        let requests: i64 = response["groups"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["requests"].as_i64().unwrap_or(0))
            .sum();
        if requests == 7 {
            break response;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{response}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let count = |tier: Value| {
        tiers["groups"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["key"] == tier)
            .map_or(0, |g| g["requests"].as_i64().unwrap())
    };
    assert_eq!(count(json!("L1")), 2, "{tiers}");
    assert_eq!(count(json!("L2")), 1, "{tiers}");
    let legacy = get(&harness, &harness.key, "/v1/analytics?groupBy=day").await;
    assert!(
        legacy["byTier"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["key"] == "L1"),
        "{legacy}"
    );

    // A cost cap per request: the prompt plus the output a request may ask for (its
    // `max_tokens`, else 4096; at most the model's 16,384), at gpt-4o-mini's $0.60 per 1M out.
    let capped = key_for(&harness, json!({"max_cost_per_request_micro_usd": 5000})).await;
    for (max_tokens, expected) in [
        (json!(100), 200),
        (Value::Null, 200),
        (json!(10_000), 400),
        (json!(1_000_000), 400),
    ] {
        let response = harness
            .client
            .post(format!("{}/v1/chat/completions", harness.base))
            .bearer_auth(&capped)
            .json(&json!({"model": "cheap", "max_tokens": max_tokens,
                          "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, expected, "max_tokens {max_tokens}: {body}");
        if status == 400 {
            assert_eq!(body["error"]["code"], "request_cost_limit_exceeded");
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("$0.005000 per request"), "{message}");
        }
    }

    let recorded = harness.stop().await;
    let routing = |trace: &str| {
        recorded
            .of_trace(trace)
            .into_iter()
            .find_map(|e| match &e.payload {
                Payload::RoutingDecided(r) => Some(r.clone()),
                _ => None,
            })
            .unwrap()
    };
    let auto = routing(&auto);
    assert_eq!(
        (auto.model.as_str(), auto.tier.as_deref()),
        ("cheap", Some("L1"))
    );
    assert_eq!(
        auto.escalation,
        ["smart"],
        "L3 is above the project's highest tier"
    );
    assert_eq!(
        recorded.calls(&escalated).len(),
        3,
        "two attempts at cheap, one at smart"
    );
}
