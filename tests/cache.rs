//! The exact-match response cache of a project with the `cache` flag: the same request (in any
//! key order, from any user) is answered again without an upstream call — JSON or stream, as the
//! first client got it — and each hit is recorded with what it saved; other requests, other
//! projects and keys outside a project are not; turning the flag off stops it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::gateway::{Harness, read_sse, start, trace_of};
use loom_mock::MockConfig;
use loom_schemas::event::Payload;
use reqwest::Method;
use serde_json::{Value, json};

async fn ask(harness: &Harness, key: &str, body: &Value) -> (String, Option<String>, String) {
    let response = harness
        .client
        .post(format!("{}/v1/chat/completions", harness.base))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let trace = trace_of(&response);
    let cache = response
        .headers()
        .get("x-loom-cache")
        .map(|v| v.to_str().unwrap().to_owned());
    (trace, cache, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_with_the_cache_answers_the_same_request_again_without_the_upstream() {
    let harness = start(MockConfig::default(), "").await;
    let (project, key) = harness
        .project_with_key(json!({"name": "cached",
            "feature_flags": {"cache": {"ttl_seconds": 600, "max_entries": 100}}}))
        .await;
    let upstream_calls = || async { harness.upstream_requests().await.len() };

    let first = json!({"model": "fast", "user": "ada",
                       "messages": [{"role": "user", "content": "What is 2+2?"}]});
    let (first_trace, cache, first_body) = ask(&harness, &key, &first).await;
    assert_eq!(cache, None);
    let calls = upstream_calls().await;
    // The same request in another key order, from another user: the same answer, no call.
    let again = json!({"messages": [{"content": "What is 2+2?", "role": "user"}],
                       "model": "fast", "user": "grace"});
    let (hit_trace, cache, body) = ask(&harness, &key, &again).await;
    assert_eq!(cache.as_deref(), Some("hit"));
    assert_eq!(body, first_body);
    assert_eq!(upstream_calls().await, calls);
    // Another prompt is another request.
    let other = json!({"model": "fast", "messages": [{"role": "user", "content": "What is 3+3?"}]});
    let (_, cache, _) = ask(&harness, &key, &other).await;
    assert_eq!(cache, None);
    assert_eq!(upstream_calls().await, calls + 1);

    // A stream is replayed as it was first sent.
    let stream = json!({"model": "fast", "stream": true,
                        "messages": [{"role": "user", "content": "Count to three"}]});
    let send_stream = || {
        harness
            .client
            .post(format!("{}/v1/chat/completions", harness.base))
            .bearer_auth(&key)
            .json(&stream)
            .send()
    };
    let first_frames = read_sse(send_stream().await.unwrap()).await;
    assert_eq!(first_frames.last().unwrap(), "[DONE]");
    let response = send_stream().await.unwrap();
    assert_eq!(response.headers()["x-loom-cache"], "hit");
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(read_sse(response).await, first_frames);
    assert_eq!(upstream_calls().await, calls + 2);

    // A key outside the project: no cache.
    let (_, cache, _) = ask(&harness, &harness.key, &first).await;
    assert_eq!(cache, None);
    assert_eq!(upstream_calls().await, calls + 3);

    // The flag off: asked again upstream.
    let (status, _) = harness
        .call(
            Method::PATCH,
            &format!("/admin/projects/{}", project.as_str().unwrap()),
            common::gateway::ADMIN,
            Some(json!({"feature_flags": {}})),
        )
        .await;
    assert_eq!(status, 200);
    let (_, cache, _) = ask(&harness, &key, &first).await;
    assert_eq!(cache, None);
    assert_eq!(upstream_calls().await, calls + 4);

    // Recorded: the hit with what it saved, and a request that spent nothing.
    let recorded = harness.stop().await;
    let hits: Vec<_> = recorded
        .of_trace(&hit_trace)
        .into_iter()
        .filter_map(|e| match &e.payload {
            Payload::CacheHit(hit) => Some(hit.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(hits.len(), 1);
    let first_cost = recorded.completed(&first_trace).cost_micro_usd;
    assert!(first_cost.is_some_and(|c| c > 0));
    assert_eq!(hits[0].source_trace_id, first_trace);
    assert_eq!(hits[0].cost_saved_micro_usd, first_cost);
    assert_eq!(hits[0].model, "fast");
    assert_eq!(hits[0].key_digest.len(), 16);
    assert!(!hits[0].stream);
    let completed = recorded.completed(&hit_trace);
    assert_eq!(completed.provider.as_deref(), Some("loom-cache"));
    assert_eq!(completed.cost_micro_usd, Some(0));
    assert!(recorded.calls(&hit_trace).is_empty());
    assert_eq!(
        recorded.types(&hit_trace),
        ["request.received", "cache.hit", "request.completed"]
    );
}
