//! The data plane end to end, in process: a real gateway node on a temporary data dir, the mock
//! upstream on loopback, requests over HTTP, and the events read back from the log.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use loom_mock::MockConfig;
use loom_schemas::event::{CallStatus, Payload, RequestStatus, ToolCallDirection};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use uuid::Uuid;

use common::gateway::{ADMIN, deltas, read_sse, start, trace_of};

#[tokio::test]
async fn a_chat_completion_is_proxied_and_recorded_end_to_end() {
    let harness = start(MockConfig::default(), "").await;
    let request = json!({"model": "fast", "messages": [{"role": "user", "content": "hello gateway"}], "temperature": 0.2});
    let response = harness
        .chat(request.clone())
        .header("x-request-id", "client-trace-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(trace_of(&response), "client-trace-1");
    let overhead: u64 = response.headers()["x-loom-overhead-us"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(overhead > 0);
    let body: Value = response.json().await.unwrap();
    let unpriced = harness
        .chat(json!({"model": "unpriced", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let unpriced_trace = trace_of(&unpriced);
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Mock reply to: hello gateway"
    );

    // Upstream saw the deployment's model, the standard params, and its own key, not the client's.
    let upstream = harness.upstream_requests().await;
    assert_eq!(upstream[0]["body"]["model"], "gpt-4o-mini");
    assert_eq!(upstream[0]["body"]["temperature"], 0.2);
    assert_eq!(upstream[0]["authorization"], "Bearer mock-key");

    let recorded = harness.stop().await;
    let trace = "client-trace-1";
    assert_eq!(
        recorded.types(trace),
        [
            "request.received",
            "routing.decided",
            "llm_call.completed",
            "request.completed"
        ]
    );
    let events = recorded.of_trace(trace);
    assert!(
        events
            .iter()
            .all(|e| e.envelope.tenant_id == recorded.tenant)
    );
    let Payload::RequestReceived(received) = &events[0].payload else {
        panic!()
    };
    assert_eq!((received.model.as_str(), received.stream), ("fast", false));
    let sent: Value =
        serde_json::from_slice(&recorded.open(events[0], "body", received.body.as_ref().unwrap()))
            .unwrap();
    assert_eq!(sent, request);
    assert_eq!(received.body_digest.len(), 32);
    let Payload::RoutingDecided(routing) = &events[1].payload else {
        panic!()
    };
    assert_eq!(routing.chosen.as_deref(), Some("primary/gpt-4o-mini"));
    let call = recorded.calls(trace)[0];
    assert_eq!(
        (call.status, call.http_status, call.attempt),
        (CallStatus::Ok, Some(200), 1)
    );
    assert_eq!((call.tokens_in, call.tokens_out), (Some(3), Some(5)));
    // gpt-4o-mini: 3 tokens in at $0.15/M and 5 out at $0.60/M: 3.45 micro-USD.
    assert_eq!(call.cost_micro_usd, Some(3));
    assert!(!call.usage_estimated);
    let answer: Value = serde_json::from_slice(&recorded.open(
        events[2],
        "response_body",
        call.response_body.as_ref().unwrap(),
    ))
    .unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Mock reply to: hello gateway"
    );
    let completed = recorded.completed(trace);
    assert_eq!(
        (completed.status, completed.http_status, completed.attempts),
        (RequestStatus::Ok, 200, 1)
    );
    assert_eq!(completed.deployment.as_deref(), Some("primary/gpt-4o-mini"));
    assert!(completed.overhead_us <= completed.latency_us);
    assert_eq!(completed.cost_micro_usd, Some(3));
    let unpriced = recorded.calls(&unpriced_trace)[0];
    assert_eq!(
        unpriced.cost_micro_usd, None,
        "an unknown price is unknown, not 0"
    );
    assert_eq!(recorded.completed(&unpriced_trace).cost_micro_usd, None);
}

#[tokio::test]
async fn failures_are_retried_then_fall_back_and_the_failed_deployment_cools_down() {
    let harness = start(MockConfig::default(), "").await;
    harness.faults(json!([{"kind": "status", "status": 500}, {"kind": "status", "status": 429, "retry_after": 0}])).await;
    let response = harness
        .chat(json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let first = trace_of(&response);
    // The primary is cooling down now: the next request goes straight to the fallback.
    let response = harness
        .chat(json!({"model": "fast", "messages": [{"role": "user", "content": "again"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let second = trace_of(&response);
    let upstream = harness.upstream_requests().await;
    let paths: Vec<&str> = upstream
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/v1/chat/completions",
            "/v1/chat/completions",
            "/openai/deployments/eu-deployment/chat/completions",
            "/openai/deployments/eu-deployment/chat/completions"
        ]
    );
    assert_eq!(upstream[2]["api_key"], "mock-key");
    assert_eq!(upstream[2]["query"], "api-version=2024-10-21");

    let recorded = harness.stop().await;
    let calls = recorded.calls(&first);
    let summary: Vec<_> = calls
        .iter()
        .map(|c| {
            (
                c.attempt,
                c.deployment.as_str(),
                c.http_status,
                c.error_class.as_deref(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, "primary/gpt-4o-mini", Some(500), Some("server_error")),
            (2, "primary/gpt-4o-mini", Some(429), Some("rate_limited")),
            (3, "azure/eu-deployment", Some(200), None),
        ]
    );
    assert_eq!(recorded.completed(&first).attempts, 3);
    let routing = recorded
        .of_trace(&second)
        .into_iter()
        .find_map(|e| match &e.payload {
            Payload::RoutingDecided(r) => Some(r),
            _ => None,
        })
        .unwrap();
    assert_eq!(
        routing.candidates[0].skipped.as_deref(),
        Some("cooling_down")
    );
    assert_eq!(routing.chosen.as_deref(), Some("azure/eu-deployment"));
}

#[tokio::test]
async fn bad_requests_and_upstream_failures_get_openai_errors_and_their_events() {
    let harness = start(MockConfig::default(), "[limits]\nmax_body_bytes = 2048\n[models.flaky]\ndeployments = [{ upstream = \"primary\", model = \"m\" }]").await;
    let url = format!("{}/v1/chat/completions", harness.base);
    let mut traces = Vec::new();
    let mut expect = |response: reqwest::Response, status: u16, code: &str| {
        assert_eq!(response.status(), status, "{code}");
        traces.push((trace_of(&response), code.to_owned()));
        response
    };
    let no_key = harness
        .client
        .post(&url)
        .json(&json!({"model": "fast", "messages": []}))
        .send()
        .await
        .unwrap();
    let body: Value = expect(no_key, 401, "invalid_api_key").json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let bad_json = harness
        .client
        .post(&url)
        .bearer_auth(&harness.key)
        .body("{not json")
        .send()
        .await
        .unwrap();
    expect(bad_json, 400, "invalid_request");
    let no_messages = harness.chat(json!({"model": "fast"})).send().await.unwrap();
    expect(no_messages, 400, "invalid_request");
    let huge = harness
        .chat(json!({"model": "fast", "messages": [{"role": "user", "content": "x".repeat(4096)}]}))
        .send()
        .await
        .unwrap();
    expect(huge, 413, "request_too_large");
    let unknown = harness
        .chat(json!({"model": "gpt-9", "messages": []}))
        .send()
        .await
        .unwrap();
    let body: Value = expect(unknown, 404, "model_not_found")
        .json()
        .await
        .unwrap();
    assert_eq!(body["error"]["code"], "model_not_found");

    harness
        .faults(json!([{"kind": "status", "status": 503}, {"kind": "status", "status": 503}]))
        .await;
    let exhausted = harness
        .chat(json!({"model": "flaky", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    expect(exhausted, 502, "server_error");
    harness
        .faults(json!([{"kind": "status", "status": 400}]))
        .await;
    let refused = harness
        .chat(json!({"model": "fast", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    expect(refused, 400, "upstream_invalid_request");

    let recorded = harness.stop().await;
    for (trace, code) in &traces {
        let types = recorded.types(trace);
        assert_eq!(
            types.first(),
            Some(&"request.received"),
            "{code}: {types:?}"
        );
        assert_eq!(
            types.last(),
            Some(&"request.completed"),
            "{code}: {types:?}"
        );
        let completed = recorded.completed(trace);
        assert_ne!(completed.status, RequestStatus::Ok, "{code}");
        assert_eq!(
            completed.error_class.as_deref(),
            Some(code.as_str()),
            "{code}"
        );
    }
    let unauthenticated = recorded.of_trace(&traces[0].0);
    assert!(
        unauthenticated
            .iter()
            .all(|e| e.envelope.tenant_id == Uuid::nil())
    );
    assert_eq!(
        recorded.calls(&traces[5].0).len(),
        2,
        "the 503 was retried once"
    );
    assert_eq!(
        recorded.calls(&traces[6].0).len(),
        1,
        "a 400 is not retried"
    );
}

#[tokio::test]
async fn an_upstream_that_hangs_times_out_with_504() {
    let harness = start(
        MockConfig::default(),
        "[models.slow]\ndeployments = [{ upstream = \"primary\", model = \"m\" }]",
    )
    .await;
    harness
        .faults(json!([{"kind": "hang"}, {"kind": "hang"}]))
        .await;
    let response = harness
        .chat(json!({"model": "slow", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let trace = trace_of(&response);
    let recorded = harness.stop().await;
    let calls = recorded.calls(&trace);
    assert_eq!(calls.len(), 2);
    assert!(calls.iter().all(|c| c.status == CallStatus::Timeout));
    assert_eq!(recorded.completed(&trace).http_status, 504);
}

#[tokio::test]
async fn streams_are_forwarded_with_usage_only_when_asked_and_recorded() {
    let harness = start(MockConfig::default(), "").await;
    let plain = harness
        .chat(json!({"model": "fast", "stream": true, "messages": [{"role": "user", "content": "one two three"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(plain.headers()["content-type"], "text/event-stream");
    let plain_trace = trace_of(&plain);
    let frames = read_sse(plain).await;
    assert_eq!(frames.last().unwrap(), "[DONE]");
    assert!(frames.iter().all(|f| !f.contains("usage")), "{frames:?}");
    let text: String = deltas(&frames, "/choices/0/delta/content");
    assert_eq!(text, "Mock reply to: one two three");

    let asked = harness
        .chat(json!({"model": "fast", "stream": true, "stream_options": {"include_usage": true}, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let frames = read_sse(asked).await;
    let usage: Value = serde_json::from_str(&frames[frames.len() - 2]).unwrap();
    assert!(usage["usage"]["completion_tokens"].as_i64().unwrap() > 0);

    let upstream = harness.upstream_requests().await;
    assert_eq!(upstream[0]["body"]["stream_options"]["include_usage"], true);

    let recorded = harness.stop().await;
    let call = recorded.calls(&plain_trace)[0];
    assert!(call.stream && call.status == CallStatus::Ok);
    assert!(call.ttft_us.is_some() && call.tokens_out.is_some());
    let completed = recorded.completed(&plain_trace);
    assert_eq!(completed.tokens_out, call.tokens_out);
    assert!(completed.ttft_us.is_some());
}

#[tokio::test]
async fn tool_calls_and_tool_results_are_observed() {
    let harness = start(MockConfig::default(), "").await;
    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let streamed = harness
        .chat(json!({"model": "fast", "stream": true, "tools": tools, "messages": [{"role": "user", "content": "weather?"}]}))
        .send()
        .await
        .unwrap();
    let streamed_trace = trace_of(&streamed);
    let frames = read_sse(streamed).await;
    assert!(frames.iter().any(|f| f.contains("get_weather")));
    let answered = harness
        .chat(json!({"model": "fast", "tools": tools, "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]}))
        .send()
        .await
        .unwrap();
    let answered_trace = trace_of(&answered);
    let body: Value = answered.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "The tool says it is sunny in Paris."
    );

    let recorded = harness.stop().await;
    let requested = recorded
        .of_trace(&streamed_trace)
        .into_iter()
        .find(|e| matches!(&e.payload, Payload::ToolCallObserved(t) if t.direction == ToolCallDirection::Requested))
        .unwrap();
    let Payload::ToolCallObserved(call) = &requested.payload else {
        panic!()
    };
    assert_eq!(call.name.as_deref(), Some("get_weather"));
    assert!(call.tool_call_id.starts_with("call_mock_"));
    let arguments = recorded.open(requested, "arguments", call.arguments.as_ref().unwrap());
    assert_eq!(arguments, br#"{"location":"Paris"}"#);
    let result = recorded
        .of_trace(&answered_trace)
        .into_iter()
        .find(|e| matches!(&e.payload, Payload::ToolCallObserved(t) if t.direction == ToolCallDirection::Result))
        .unwrap();
    let Payload::ToolCallObserved(observed) = &result.payload else {
        panic!()
    };
    assert_eq!(observed.tool_call_id, "call_1");
    assert_eq!(
        recorded.open(result, "result", observed.result.as_ref().unwrap()),
        b"sunny"
    );
}

#[tokio::test]
async fn a_truncated_stream_ends_with_an_error_and_a_client_that_leaves_cancels() {
    let harness = start(
        MockConfig {
            chunk_delay: Duration::from_millis(200),
            ..MockConfig::default()
        },
        "",
    )
    .await;
    harness
        .faults(json!([{"kind": "truncate", "after_chunks": 2}]))
        .await;
    let truncated = harness
        .chat(json!({"model": "fast", "stream": true, "messages": [{"role": "user", "content": "a b c"}]}))
        .send()
        .await
        .unwrap();
    let truncated_trace = trace_of(&truncated);
    let frames = read_sse(truncated).await;
    assert!(
        frames.last().unwrap().contains("upstream_truncated"),
        "{frames:?}"
    );

    let mut leaving = harness
        .chat(json!({"model": "fast", "stream": true, "messages": [{"role": "user", "content": "a long answer please"}]}))
        .send()
        .await
        .unwrap();
    let leaving_trace = trace_of(&leaving);
    leaving.chunk().await.unwrap();
    drop(leaving);
    tokio::time::sleep(Duration::from_millis(500)).await;

    let recorded = harness.stop().await;
    let completed = recorded.completed(&truncated_trace);
    assert_eq!(
        (completed.status, completed.error_class.as_deref()),
        (RequestStatus::Error, Some("upstream_truncated"))
    );
    let cancelled = recorded.completed(&leaving_trace);
    assert_eq!(cancelled.status, RequestStatus::ClientCancelled);
    assert_eq!(
        recorded.calls(&leaving_trace)[0].status,
        CallStatus::ClientCancelled
    );
}

#[tokio::test]
async fn a_client_that_leaves_before_its_json_answer_still_gets_the_call_recorded() {
    let harness = start(
        MockConfig {
            latency: Duration::from_millis(600),
            ..MockConfig::default()
        },
        "",
    )
    .await;
    let trace = "a-client-that-leaves";
    // A client that sends its request and hangs up while the upstream is still thinking.
    let body = json!({"model": "fast", "messages": [{"role": "user", "content": "hello there"}]})
        .to_string();
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: loom\r\nauthorization: Bearer {}\r\n\
         x-request-id: {trace}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        harness.key,
        body.len()
    );
    let mut client = tokio::net::TcpStream::connect(harness.base.trim_start_matches("http://"))
        .await
        .unwrap();
    client.write_all(request.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(client);
    // The upstream answers after its latency; the gateway records the call it paid for.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let recorded = harness.stop().await;
    let completed = recorded.completed(trace);
    assert_eq!(
        (completed.status, completed.error_class.as_deref()),
        (RequestStatus::ClientCancelled, Some("client_cancelled"))
    );
    assert!(completed.tokens_out.is_some_and(|t| t > 0), "{completed:?}");
    let calls = recorded.calls(trace);
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].status, CallStatus::Ok);
}

#[tokio::test]
async fn embeddings_and_models_are_served() {
    let harness = start(MockConfig::default(), "").await;
    let response = harness
        .client
        .post(format!("{}/v1/embeddings", harness.base))
        .bearer_auth(&harness.key)
        .json(&json!({"model": "embed", "input": ["a", "b"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let trace = trace_of(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["data"].as_array().unwrap().len(), 2);
    let upstream = harness.upstream_requests().await;
    assert_eq!(
        upstream[0]["authorization"],
        Value::Null,
        "an openai_compatible upstream without key gets none"
    );
    let listing = harness
        .client
        .get(format!("{}/v1/models", harness.base))
        .bearer_auth(&harness.key)
        .header("x-request-id", "list-1")
        .send()
        .await
        .unwrap();
    assert_eq!(trace_of(&listing), "list-1");
    assert!(listing.headers().contains_key("x-loom-overhead-us"));
    let models: Value = listing.json().await.unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["claude", "embed", "fast", "unpriced"]);
    let recorded = harness.stop().await;
    assert_eq!(recorded.completed(&trace).status, RequestStatus::Ok);
    assert_eq!(recorded.calls(&trace)[0].tokens_in, Some(2));
}

#[tokio::test]
async fn a_revoked_key_is_refused_without_a_restart() {
    let harness = start(MockConfig::default(), "").await;
    let request = json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(
        harness.chat(request.clone()).send().await.unwrap().status(),
        200
    );
    let keys: Value = harness
        .client
        .get(format!("{}/admin/keys", harness.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let key_id = keys[0]["key_id"].as_str().unwrap();
    let revoked = harness
        .client
        .post(format!("{}/admin/keys/{key_id}/revoke", harness.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    assert_eq!(harness.chat(request).send().await.unwrap().status(), 401);
    harness.stop().await;
}

#[tokio::test]
async fn the_admin_api_answers_bad_input_in_openai_shape() {
    let harness = start(MockConfig::default(), "").await;
    let send = |method: reqwest::Method, path: &str, body: &'static str, content_type: &str| {
        harness
            .client
            .request(method, format!("{}{path}", harness.base))
            .bearer_auth(ADMIN)
            .header("content-type", content_type.to_owned())
            .body(body)
            .send()
    };
    let post = reqwest::Method::POST;
    for (path, body, names) in [
        ("/admin/tenants", "not json", "expected"),
        ("/admin/tenants", "", "empty"),
        (
            "/admin/tenants",
            r#"{"name": "a", "color": "red"}"#,
            "color",
        ),
        ("/admin/keys", r#"{"tenant_id": ""}"#, "tenant_id"),
        ("/admin/keys/not-a-uuid/revoke", "", "UUID"),
    ] {
        let response = send(post.clone(), path, body, "application/json")
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{path} {body}");
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["type"], "invalid_request_error", "{error}");
        assert_eq!(error["error"]["code"], "invalid_request", "{error}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(names), "{path} {body}: {message}");
    }
    let response = harness
        .client
        .get(format!("{}/admin/keys?tenant_id=nope", harness.base))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_request");
    // What `curl -d` sends (a form content type) is read as the JSON it is.
    let form = "application/x-www-form-urlencoded";
    let created = send(post, "/admin/tenants", r#"{"name": "curl"}"#, form);
    assert_eq!(created.await.unwrap().status(), 201);
    harness.stop().await;
}

#[tokio::test]
async fn anthropic_upstreams_are_spoken_to_in_their_own_api() {
    let harness = start(MockConfig::default(), "").await;
    let response = harness
        .chat(json!({"model": "claude", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hello claude"},
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let json_trace = trace_of(&response);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "Mock reply to: hello claude"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert!(body["usage"]["completion_tokens"].as_i64().unwrap() > 0);

    let streamed = harness
        .chat(json!({"model": "claude", "stream": true, "messages": [{"role": "user", "content": "stream please"}]}))
        .send()
        .await
        .unwrap();
    let stream_trace = trace_of(&streamed);
    let frames = read_sse(streamed).await;
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let text: String = deltas(&frames, "/choices/0/delta/content");
    assert_eq!(text, "Mock reply to: stream please");
    assert!(frames.iter().all(|f| !f.contains("usage")));

    let tools = json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]);
    let asked = harness
        .chat(json!({"model": "claude", "stream": true, "tools": tools, "messages": [{"role": "user", "content": "weather?"}]}))
        .send()
        .await
        .unwrap();
    let tool_trace = trace_of(&asked);
    let frames = read_sse(asked).await;
    let arguments: String = deltas(&frames, "/choices/0/delta/tool_calls/0/function/arguments");
    assert_eq!(arguments, r#"{"location":"Paris"}"#);
    let answered = harness
        .chat(json!({"model": "claude", "tools": tools, "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [{"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
        ]}))
        .send()
        .await
        .unwrap();
    let body: Value = answered.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "The tool says it is sunny in Paris."
    );

    let embeddings = harness
        .client
        .post(format!("{}/v1/embeddings", harness.base))
        .bearer_auth(&harness.key)
        .json(&json!({"model": "claude", "input": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(embeddings.status(), 400);

    let upstream = harness.upstream_requests().await;
    assert_eq!(upstream[0]["path"], "/v1/messages");
    assert_eq!(upstream[0]["x_api_key"], "mock-key");
    assert_eq!(upstream[0]["body"]["system"], "Be brief.");
    assert_eq!(upstream[0]["body"]["max_tokens"], 4096);
    assert_eq!(
        upstream[0]["body"]["messages"],
        json!([{"role": "user", "content": [{"type": "text", "text": "hello claude"}]}])
    );
    assert_eq!(
        upstream[3]["body"]["messages"][2]["content"][0]["type"],
        "tool_result"
    );

    let recorded = harness.stop().await;
    for trace in [&json_trace, &stream_trace, &tool_trace] {
        let call = recorded.calls(trace)[0];
        assert_eq!(
            (call.provider.as_str(), call.status),
            ("anthropic", CallStatus::Ok),
            "{trace}"
        );
        assert!(call.tokens_in.is_some() && !call.usage_estimated, "{trace}");
        assert!(
            call.cost_micro_usd.is_some(),
            "{trace}: claude-sonnet-4-5 has a price"
        );
    }
    let requested = recorded
        .of_trace(&tool_trace)
        .into_iter()
        .find(|e| matches!(&e.payload, Payload::ToolCallObserved(t) if t.direction == ToolCallDirection::Requested))
        .unwrap();
    let Payload::ToolCallObserved(call) = &requested.payload else {
        panic!()
    };
    assert_eq!(
        recorded.open(requested, "arguments", call.arguments.as_ref().unwrap()),
        br#"{"location":"Paris"}"#
    );
}
