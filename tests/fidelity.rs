//! API fidelity: what an upstream receives through Loom is what a direct client would have sent
//! it (modulo the model and the credentials), and what comes back is what the upstream answered —
//! for Anthropic clients on Anthropic, OpenAI chat and Responses clients on OpenAI. Across APIs,
//! the fields a translation cannot carry are recorded, or refused when configured so. Cache
//! usage is priced, and stored responses are reached only by the tenant that made them.
//!
//! The mock upstream records every request it gets (raw body and headers): each request of a
//! corpus is sent once through Loom and once straight to the mock, and the two recordings are
//! compared.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use loom_mock::MockConfig;
use loom_schemas::event::{CallStatus, Payload};
use serde_json::{Value, json};

use common::gateway::{Harness, start, trace_of};

/// Models besides the harness' own: a chat-only OpenAI-compatible server.
const EXTRA: &str = r#"
[models.local]
deployments = [{ upstream = "local", model = "llama-3.1-8b" }]
"#;

/// The upstream key the harness gives every upstream.
const UPSTREAM_KEY: &str = "mock-key";

/// One request of a corpus: its body with `{MODEL}` where the model goes, and extra headers.
struct Case {
    name: &'static str,
    body: &'static str,
    headers: &'static [(&'static str, &'static str)],
}

/// What the mock recorded of the last request it got.
async fn last_upstream_request(harness: &Harness) -> Value {
    let requests = harness.upstream_requests().await;
    requests.last().cloned().unwrap()
}

/// Replaces the numbers the mock puts in ids (`msg_mock_12`), which differ between two calls.
fn without_ids(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = ["_mock_", "_mock", "-mock-", "signature-"]
        .iter()
        .filter_map(|marker| rest.find(marker).map(|i| (i, marker.len())))
        .min_by_key(|&(i, len)| (i, std::cmp::Reverse(len)))
    {
        let (i, len) = at;
        out.push_str(&rest[..i + len]);
        rest = rest[i + len..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push('#');
    }
    out.push_str(rest);
    out
}

/// Sends `case` through Loom (to `alias` at `path`) and straight to the mock (with `model`, the
/// deployment's), and checks the mock got the same bytes and forwarded headers both times and
/// both answers are the same. Returns the trace id of the call through Loom.
async fn same_through_loom(
    harness: &Harness,
    path: &str,
    case: &Case,
    alias: &str,
    model: &str,
    auth: (&str, &str),
) -> String {
    let through = case.body.replace("{MODEL}", alias);
    let direct = case.body.replace("{MODEL}", model);
    let mut request = harness
        .client
        .post(format!("{}{path}", harness.base))
        .header(auth.0, auth.1.replace("KEY", &harness.key))
        .header("content-type", "application/json")
        .body(through);
    for (name, value) in case.headers {
        request = request.header(*name, *value);
    }
    let via_loom = request.send().await.unwrap();
    assert_eq!(via_loom.status(), 200, "{}", case.name);
    let trace = trace_of(&via_loom);
    let loom_answer = via_loom.text().await.unwrap();
    let forwarded = last_upstream_request(harness).await;

    // The direct call finds the prompt cache as the call through Loom did.
    let cleared = harness
        .client
        .delete(format!("{}/mock/cache", harness.mock.url()))
        .send();
    assert!(cleared.await.unwrap().status().is_success());
    let mut request = harness
        .client
        .post(format!("{}{path}", harness.mock.url()))
        .header(auth.0, auth.1.replace("KEY", UPSTREAM_KEY))
        .header("content-type", "application/json")
        .body(direct);
    for (name, value) in case.headers {
        request = request.header(*name, *value);
    }
    let direct_answer = request.send().await.unwrap().text().await.unwrap();
    let sent = last_upstream_request(harness).await;

    assert_eq!(forwarded["path"], sent["path"], "{}", case.name);
    assert_eq!(
        forwarded["raw_body"], sent["raw_body"],
        "{}: the upstream got other bytes through Loom",
        case.name
    );
    for (name, _) in case.headers {
        assert_eq!(
            forwarded["headers"][name], sent["headers"][name],
            "{}: header {name}",
            case.name
        );
    }
    assert_eq!(
        without_ids(&loom_answer),
        without_ids(&direct_answer),
        "{}: the client got another answer through Loom",
        case.name
    );
    trace
}

#[tokio::test]
async fn anthropic_clients_reach_anthropic_as_they_sent_and_get_its_answer_unchanged() {
    let harness = start(MockConfig::default(), EXTRA).await;
    let betas = &[
        ("anthropic-version", "2023-06-01"),
        (
            "anthropic-beta",
            "prompt-caching-2024-07-31,pdfs-2024-09-25",
        ),
    ];
    let cases = [
        Case {
            name: "caching",
            body: r#"{"model": "{MODEL}", "max_tokens": 1024,
                "system": [{"type": "text", "text": "You are a careful assistant.\nLong system prompt\u2026", "cache_control": {"type": "ephemeral"}}],
                "tools": [{"name": "get_weather", "description": "Weather", "input_schema": {"type": "object", "properties": {"z": {"type": "string"}, "a": {"type": "string"}}}, "cache_control": {"type": "ephemeral", "ttl": "1h"}}],
                "messages": [{"role": "user", "content": [{"type": "text", "text": "A long document", "cache_control": {"type": "ephemeral"}}, {"type": "text", "text": "question?"}]}]}"#,
            headers: betas,
        },
        Case {
            name: "thinking",
            body: r#"{"model":"{MODEL}","max_tokens":16000,"thinking":{"type":"enabled","budget_tokens":10000},"top_k":40,"messages":[{"role":"user","content":"Think first."}]}"#,
            headers: betas,
        },
        Case {
            name: "thinking, streamed",
            body: r#"{"stream": true, "model": "{MODEL}", "max_tokens": 16000, "thinking": {"type": "enabled", "budget_tokens": 10000},
                "messages": [{"role": "user", "content": "Think, then stream."}]}"#,
            headers: betas,
        },
        Case {
            name: "images and documents",
            body: r#"{"model": "{MODEL}", "max_tokens": 300, "messages": [{"role": "user", "content": [
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"}, "title": "Report", "context": "Q3", "citations": {"enabled": true}},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "Plain text."}},
                {"type": "text", "text": "Describe them."}]}]}"#,
            headers: &[],
        },
        Case {
            name: "tool choice",
            body: r#"{"model": "{MODEL}", "max_tokens": 200,
                "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}, {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}],
                "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": true},
                "messages": [{"role": "user", "content": "weather in Paris?"}]}"#,
            headers: &[],
        },
        Case {
            name: "stop sequences, metadata, sampling",
            body: r#"{"model": "{MODEL}", "max_tokens": 50, "stop_sequences": ["\n\nHuman:", "END"], "temperature": 0.7, "top_p": 0.9,
                "metadata": {"user_id": "user-42"}, "service_tier": "standard_only",
                "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "more"}]}"#,
            headers: &[],
        },
        Case {
            name: "tools, streamed",
            body: r#"{"model": "{MODEL}", "max_tokens": 200, "stream": true,
                "tools": [{"name": "get_weather", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}}],
                "messages": [{"role": "user", "content": "weather?"}]}"#,
            headers: betas,
        },
    ];
    let mut traces = Vec::new();
    for case in &cases {
        let auth = ("x-api-key", "KEY");
        let trace = same_through_loom(
            &harness,
            "/v1/messages",
            case,
            "claude",
            "claude-sonnet-4-5",
            auth,
        )
        .await;
        traces.push((case.name, trace));
    }

    let recorded = harness.stop().await;
    for (name, trace) in &traces {
        let call = recorded.calls(trace)[0];
        assert_eq!(call.provider, "anthropic", "{name}");
        assert!(
            call.dropped_fields.is_empty(),
            "{name}: {:?}",
            call.dropped_fields
        );
        assert!(call.tokens_in.is_some() && !call.usage_estimated, "{name}");
        assert!(
            call.response_id
                .as_deref()
                .unwrap()
                .starts_with("msg_mock_"),
            "{name}"
        );
    }
}

#[tokio::test]
async fn openai_chat_and_responses_clients_reach_openai_as_they_sent() {
    let harness = start(MockConfig::default(), EXTRA).await;
    let chat = [
        Case {
            name: "every parameter",
            body: r#"{"model": "{MODEL}", "messages": [{"role": "developer", "content": "Answer in JSON."}, {"role": "user", "content": "caf\u00e9?"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "strict": true, "schema": {"type": "object", "properties": {"zeta": {"type": "string"}, "alpha": {"type": "number"}}, "required": ["zeta", "alpha"], "additionalProperties": false}}},
                "seed": 18446744073709551615, "logprobs": true, "top_logprobs": 3, "parallel_tool_calls": false,
                "reasoning_effort": "low", "user": "u-1", "metadata": {"team": "search"}, "service_tier": "flex",
                "max_completion_tokens": 1000, "n": 1, "stop": ["END"], "frequency_penalty": 0.5, "temperature": 1.0e0}"#,
            headers: &[],
        },
        Case {
            name: "a stream that asks for usage itself",
            body: r#"{"model":"{MODEL}","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"stream"}]}"#,
            headers: &[],
        },
    ];
    for case in &chat {
        let auth = ("authorization", "Bearer KEY");
        same_through_loom(
            &harness,
            "/v1/chat/completions",
            case,
            "fast",
            "gpt-4o-mini",
            auth,
        )
        .await;
    }

    // A stream that did not ask for usage: Loom asks for it (to price the call) and nothing else
    // changes; the client does not see the usage chunk.
    let response = harness
        .client
        .post(format!("{}/v1/chat/completions", harness.base))
        .bearer_auth(&harness.key)
        .header("content-type", "application/json")
        .body(r#"{"model": "fast", "stream": true, "stream_options": {"include_obfuscation": false}, "messages": [{"role": "user", "content": "x"}]}"#)
        .send()
        .await
        .unwrap();
    assert!(!response.text().await.unwrap().contains("\"usage\""));
    let forwarded = last_upstream_request(&harness).await;
    assert_eq!(
        forwarded["raw_body"],
        r#"{"model": "gpt-4o-mini", "stream": true, "stream_options": {"include_obfuscation":false,"include_usage":true}, "messages": [{"role": "user", "content": "x"}]}"#
    );

    let responses = [
        Case {
            name: "responses: input items, tools, settings",
            body: r#"{"model": "{MODEL}", "instructions": "Be brief.", "store": true, "include": ["reasoning.encrypted_content"],
                "reasoning": {"effort": "low"}, "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "weather?"}, {"type": "input_image", "image_url": "https://example.com/sky.png"}]}],
                "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}, {"type": "web_search"}],
                "tool_choice": "auto", "max_output_tokens": 500, "truncation": "auto", "metadata": {"k": "v"}}"#,
            headers: &[],
        },
        Case {
            name: "responses: streamed",
            body: r#"{"model": "{MODEL}", "input": "stream a poem", "stream": true}"#,
            headers: &[("openai-beta", "responses=v1")],
        },
        Case {
            name: "responses: function call output",
            body: r#"{"model": "{MODEL}", "input": [{"role": "user", "content": "weather?"},
                {"type": "function_call", "call_id": "call_9", "name": "get_weather", "arguments": "{\"location\":\"Paris\"}"},
                {"type": "function_call_output", "call_id": "call_9", "output": "sunny"}],
                "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}"#,
            headers: &[],
        },
    ];
    let mut traces = Vec::new();
    for case in &responses {
        let auth = ("authorization", "Bearer KEY");
        let trace =
            same_through_loom(&harness, "/v1/responses", case, "fast", "gpt-4o-mini", auth).await;
        traces.push(trace);
    }

    let recorded = harness.stop().await;
    for trace in &traces {
        let call = recorded.calls(trace)[0];
        assert_eq!(call.provider, "openai");
        assert!(call.dropped_fields.is_empty());
        assert!(call.tokens_in.is_some() && call.cost_micro_usd.is_some() && !call.usage_estimated);
        assert!(
            call.response_id
                .as_deref()
                .unwrap()
                .starts_with("resp_mock")
        );
    }
}

/// The `llm_call.completed` events of a trace.
fn dropped_of(recorded: &common::gateway::Recorded, trace: &str) -> Vec<String> {
    recorded.calls(trace)[0].dropped_fields.clone()
}

#[tokio::test]
async fn across_apis_what_cannot_be_carried_is_recorded_and_what_cannot_be_served_refused() {
    let harness = start(MockConfig::default(), EXTRA).await;
    let post = |path: &str, body: Value| {
        harness
            .client
            .post(format!("{}{path}", harness.base))
            .bearer_auth(&harness.key)
            .header("anthropic-beta", "prompt-caching-2024-07-31")
            .json(&body)
    };

    // An Anthropic client on an OpenAI deployment: thinking becomes reasoning effort; caching,
    // top_k and the beta header have no equivalent and are recorded as dropped.
    let response = post(
        "/v1/messages",
        json!({"model": "fast", "max_tokens": 100, "top_k": 5,
            "thinking": {"type": "enabled", "budget_tokens": 4000},
            "system": [{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "hello"}]}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let anthropic_trace = trace_of(&response);
    let message: Value = response.json().await.unwrap();
    assert_eq!(message["type"], "message");
    let forwarded = last_upstream_request(&harness).await;
    assert_eq!(forwarded["path"], "/v1/chat/completions");
    assert_eq!(forwarded["body"]["reasoning_effort"], "medium");
    assert!(forwarded["headers"].get("anthropic-beta").is_none());

    // An OpenAI chat client on Anthropic: effort becomes a thinking budget; `n` is dropped.
    let response = post(
        "/v1/chat/completions",
        json!({"model": "claude", "n": 1, "reasoning_effort": "low", "max_completion_tokens": 3000,
            "messages": [{"role": "user", "content": "hi"}]}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let chat_trace = trace_of(&response);
    let forwarded = last_upstream_request(&harness).await;
    assert_eq!(forwarded["path"], "/v1/messages");
    assert_eq!(
        forwarded["body"]["thinking"],
        json!({"type": "enabled", "budget_tokens": 1024})
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["object"], "chat.completion");
    let message = &body["choices"][0]["message"];
    assert_eq!(message["reasoning_content"], "Let me think about that.");
    assert_eq!(message["content"], "Mock reply to: hi");

    // A Responses client on a chat-only server: the stateless subset is served, as a response.
    let response = post(
        "/v1/responses",
        json!({"model": "local", "instructions": "Be brief.", "input": "hello responses", "store": true}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let responses_trace = trace_of(&response);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["object"], "response");
    assert_eq!(
        answer["output"][0]["content"][0]["text"],
        "Mock reply to: hello responses"
    );
    assert_eq!(
        answer["usage"]["input_tokens"],
        answer["usage"]["total_tokens"].as_i64().unwrap()
            - answer["usage"]["output_tokens"].as_i64().unwrap()
    );
    let forwarded = last_upstream_request(&harness).await;
    assert_eq!(forwarded["path"], "/v1/chat/completions");
    assert_eq!(
        forwarded["body"]["messages"],
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello responses"}])
    );
    // ...the same through Anthropic, streamed, with a function call: Responses events.
    let response = post(
        "/v1/responses",
        json!({"model": "claude", "input": "weather?", "stream": true,
            "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]}),
    )
    .send()
    .await
    .unwrap();
    let events = response.text().await.unwrap();
    assert!(events.starts_with("event: response.created\n"), "{events}");
    assert!(events.contains("event: response.function_call_arguments.delta"));
    assert!(
        events
            .trim_end()
            .lines()
            .rev()
            .nth(1)
            .unwrap()
            .contains("response.completed")
    );
    assert_eq!(
        last_upstream_request(&harness).await["path"],
        "/v1/messages"
    );

    // What needs OpenAI's stored state or its tools cannot be served there.
    for (body, field) in [
        (
            json!({"model": "local", "input": "x", "previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (
            json!({"model": "local", "input": "x", "tools": [{"type": "web_search"}]}),
            "tools[0] (web_search)",
        ),
    ] {
        let response = post("/v1/responses", body).send().await.unwrap();
        assert_eq!(response.status(), 400);
        let error: Value = response.json().await.unwrap();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(field) && message.contains("local/llama-3.1-8b"),
            "{message}"
        );
    }
    let background = post(
        "/v1/responses",
        json!({"model": "fast", "input": "x", "background": true}),
    );
    assert_eq!(background.send().await.unwrap().status(), 400);

    let recorded = harness.stop().await;
    assert_eq!(
        dropped_of(&recorded, &anthropic_trace),
        ["top_k", "system[0].cache_control", "header anthropic-beta"]
    );
    assert_eq!(
        dropped_of(&recorded, &chat_trace),
        ["n", "header anthropic-beta"]
    );
    assert_eq!(
        dropped_of(&recorded, &responses_trace),
        ["store", "header anthropic-beta"]
    );
    assert!(recorded.calls(&responses_trace)[0].cost_micro_usd.is_none());
}

#[tokio::test]
async fn with_reject_a_field_that_cannot_be_carried_is_a_400_naming_it() {
    let harness = start(
        MockConfig::default(),
        &format!("{EXTRA}\n[translation]\nunsupported_fields = \"reject\"\n"),
    )
    .await;
    let messages = |model: &str| {
        harness
            .client
            .post(format!("{}/v1/messages", harness.base))
            .header("x-api-key", &harness.key)
            .json(&json!({"model": model, "max_tokens": 100, "top_k": 5,
                "messages": [{"role": "user", "content": "hello"}]}))
    };
    let refused = messages("fast").send().await.unwrap();
    assert_eq!(refused.status(), 400);
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["type"], "error");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("`top_k`") && message.contains("reject"),
        "{message}"
    );
    assert_eq!(harness.upstream_requests().await.len(), 0);
    // Natively the same request goes through as sent.
    assert_eq!(messages("claude").send().await.unwrap().status(), 200);
    let recorded = harness.stop().await;
    let refusals = recorded
        .events
        .iter()
        .filter(|e| matches!(&e.payload, Payload::LlmCallCompleted(_)))
        .count();
    assert_eq!(refusals, 1, "a refused deployment is not an upstream call");
}

#[tokio::test]
async fn cache_reads_and_writes_are_priced_and_their_saving_recorded() {
    let harness = start(MockConfig::default(), EXTRA).await;
    let cached = json!({"model": "claude", "max_tokens": 100,
        "system": [{"type": "text", "text": "A long, stable system prompt. ".repeat(40), "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": "first question"}]});
    let mut traces = Vec::new();
    for stream in [false, false, true] {
        let mut body = cached.clone();
        body["stream"] = json!(stream);
        let response = harness
            .client
            .post(format!("{}/v1/messages", harness.base))
            .header("x-api-key", &harness.key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        traces.push(trace_of(&response));
        response.text().await.unwrap();
    }
    // OpenAI caches a conversation's earlier turns by itself.
    let conversation = json!({"model": "fast", "messages": [
        {"role": "system", "content": "A long, stable system prompt. ".repeat(40)},
        {"role": "user", "content": "next question"}]});
    for _ in 0..2 {
        let response = harness.chat(conversation.clone()).send().await.unwrap();
        traces.push(trace_of(&response));
    }

    let recorded = harness.stop().await;
    let calls: Vec<_> = traces
        .iter()
        .map(|t| recorded.calls(t)[0].clone())
        .collect();
    let (write, read, streamed) = (&calls[0], &calls[1], &calls[2]);
    assert!(write.tokens_cache_creation.unwrap() > 0);
    assert!(
        write.cache_saved_micro_usd.unwrap() < 0,
        "writing costs more than plain input"
    );
    for call in [read, streamed] {
        assert!(call.tokens_cached_read.unwrap() > 0, "{call:?}");
        assert!(call.cache_saved_micro_usd.unwrap() > 0, "{call:?}");
        assert!(call.cost_micro_usd.unwrap() < write.cost_micro_usd.unwrap());
        assert_eq!(call.status, CallStatus::Ok);
    }
    assert_eq!(read.tokens_cached_read, streamed.tokens_cached_read);
    let (miss, hit) = (&calls[3], &calls[4]);
    assert_eq!(miss.tokens_cached_read, Some(0));
    assert_eq!(miss.cache_saved_micro_usd, None);
    assert!(hit.tokens_cached_read.unwrap() > 0);
    assert!(hit.cache_saved_micro_usd.unwrap() > 0);
    assert!(hit.cost_micro_usd.unwrap() < miss.cost_micro_usd.unwrap());
    // The request's own totals carry the cache tokens too.
    let completed = recorded.completed(&traces[1]);
    assert_eq!(completed.tokens_cached_read, read.tokens_cached_read);
}

#[tokio::test]
async fn stored_responses_are_reached_only_by_the_tenant_that_made_them() {
    let harness = start(MockConfig::default(), EXTRA).await;
    let tenant: Value = harness
        .admin("/admin/tenants", json!({"name": "other"}))
        .await;
    let other: Value = harness
        .admin("/admin/keys", json!({"tenant_id": tenant["tenant_id"]}))
        .await;
    let other_key = other["key"].as_str().unwrap().to_owned();
    let call = |method: reqwest::Method, path: &str, key: &str| {
        harness
            .client
            .request(method, format!("{}{path}", harness.base))
            .bearer_auth(key)
    };

    let created: Value = call(reqwest::Method::POST, "/v1/responses", &harness.key)
        .json(&json!({"model": "fast", "input": "remember this"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/responses/{id}");

    let fetched = call(reqwest::Method::GET, &path, &harness.key)
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), 200);
    let get_trace = trace_of(&fetched);
    assert_eq!(fetched.json::<Value>().await.unwrap(), created);
    let items = call(
        reqwest::Method::GET,
        &format!("{path}/input_items"),
        &harness.key,
    )
    .send()
    .await
    .unwrap();
    assert_eq!(items.status(), 200);
    assert_eq!(items.json::<Value>().await.unwrap()["object"], "list");
    for method in [reqwest::Method::GET, reqwest::Method::DELETE] {
        let theirs = call(method, &path, &other_key).send().await.unwrap();
        assert_eq!(
            theirs.status(),
            404,
            "another tenant's response is not found"
        );
    }
    let unknown = call(
        reqwest::Method::GET,
        "/v1/responses/resp_nope",
        &harness.key,
    );
    assert_eq!(unknown.send().await.unwrap().status(), 404);

    // A follow-up goes to the upstream that holds the conversation.
    let follow_up = call(reqwest::Method::POST, "/v1/responses", &harness.key)
        .json(&json!({"model": "fast", "input": "and then?", "previous_response_id": id}))
        .send()
        .await
        .unwrap();
    assert_eq!(follow_up.status(), 200);
    let follow_trace = trace_of(&follow_up);

    let deleted = call(reqwest::Method::DELETE, &path, &harness.key)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 200);
    assert_eq!(deleted.json::<Value>().await.unwrap()["deleted"], true);
    let gone = call(reqwest::Method::GET, &path, &harness.key)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), 404);

    // A response made by a chat-only server is stored nowhere.
    let translated: Value = call(reqwest::Method::POST, "/v1/responses", &harness.key)
        .json(&json!({"model": "local", "input": "x"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let path = format!("/v1/responses/{}", translated["id"].as_str().unwrap());
    let missing = call(reqwest::Method::GET, &path, &harness.key)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    let recorded = harness.stop().await;
    let fetch = recorded.calls(&get_trace)[0];
    assert_eq!(
        (fetch.status, fetch.tokens_in, fetch.cost_micro_usd),
        (CallStatus::Ok, None, None)
    );
    assert_eq!(
        recorded.types(&get_trace).first(),
        Some(&"request.received")
    );
    let routed = recorded
        .of_trace(&follow_trace)
        .into_iter()
        .find_map(|e| match &e.payload {
            Payload::RoutingDecided(r) => Some(r.reason.clone()),
            _ => None,
        });
    assert_eq!(routed.as_deref(), Some("previous_response"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_response_is_found_after_a_restart_in_the_read_models() {
    let mock = loom_mock::MockServer::start(MockConfig::default())
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("loom.toml");
    std::fs::write(
        &config,
        format!(
            "[upstreams.openai]\nprovider = \"openai\"\nbase_url = \"{}/v1\"\napi_key_env = \"MOCK_KEY\"\n\n\
             [models.fast]\ndeployments = [{{ upstream = \"openai\", model = \"gpt-4o-mini\" }}]\n",
            mock.url()
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let args = ["--config", config.to_str().unwrap()];
    let env = [("LOOM_ADMIN_TOKEN", "admin"), ("MOCK_KEY", "k")];
    let server = common::Server::start(&data, &args, &env).unwrap();
    let (_, key) = common::tenant_and_key(&server, "admin", "acme").await;
    let (_, other) = common::tenant_and_key(&server, "admin", "other").await;
    let client = reqwest::Client::new();
    let created: Value = client
        .post(server.url("/v1/responses"))
        .bearer_auth(&key)
        .json(&json!({"model": "fast", "input": "remember me"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let path = format!("/v1/responses/{}", created["id"].as_str().unwrap());
    assert!(server.stop().success());

    // A new process remembers nothing: the read models know who made it, and where.
    let server = common::Server::start(&data, &args, &env).unwrap();
    let get = |key: &str| client.get(server.url(&path)).bearer_auth(key).send();
    let mut status = 0;
    for _ in 0..100 {
        status = get(&key).await.unwrap().status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200);
    assert_eq!(
        get(&key).await.unwrap().json::<Value>().await.unwrap(),
        created
    );
    assert_eq!(get(&other).await.unwrap().status(), 404);
    assert!(server.stop().success());
}

#[tokio::test]
async fn azure_serves_the_responses_api_on_its_v1_path() {
    let extra =
        "[models.eu]\ndeployments = [{ upstream = \"azure\", model = \"eu-deployment\" }]\n";
    let harness = start(MockConfig::default(), extra).await;
    let created = harness
        .client
        .post(format!("{}/v1/responses", harness.base))
        .bearer_auth(&harness.key)
        .header("content-type", "application/json")
        .body(r#"{"model": "eu", "input": "hello azure"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 200);
    let created: Value = created.json().await.unwrap();
    let forwarded = last_upstream_request(&harness).await;
    assert_eq!(forwarded["path"], "/openai/v1/responses");
    assert_eq!(forwarded["api_key"], UPSTREAM_KEY);
    assert_eq!(
        forwarded["raw_body"],
        r#"{"model": "eu-deployment", "input": "hello azure"}"#
    );
    let id = created["id"].as_str().unwrap();
    let fetched = harness
        .client
        .get(format!("{}/v1/responses/{id}", harness.base))
        .bearer_auth(&harness.key)
        .send()
        .await
        .unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(
        last_upstream_request(&harness).await["path"],
        format!("/openai/v1/responses/{id}")
    );
    harness.stop().await;
}

#[tokio::test]
async fn a_deployment_passed_over_does_not_hide_why_the_others_failed() {
    let extra = "[models.mixed]\ndeployments = [{ upstream = \"primary\", model = \"gpt-4o-mini\" }, { upstream = \"local\", model = \"llama\" }]\n";
    let harness = start(MockConfig::default(), extra).await;
    harness
        .faults(json!([{"kind": "status", "status": 429}, {"kind": "status", "status": 429}]))
        .await;
    let response = harness
        .client
        .post(format!("{}/v1/responses", harness.base))
        .bearer_auth(&harness.key)
        .json(&json!({"model": "mixed", "input": "x", "previous_response_id": "resp_1"}))
        .send()
        .await
        .unwrap();
    // OpenAI was rate limited twice; the chat-only server could not take the follow-up.
    assert_eq!(response.status(), 502);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("rate_limited"),
        "{error}"
    );
    assert_eq!(harness.upstream_requests().await.len(), 2);
    harness.stop().await;
}
