//! Loom observed from outside: `/metrics` names every step and moves under traffic, logs never
//! hold a key, a prompt or a completion, spans reach an OTLP collector in the client's trace,
//! and SIGTERM drains (readiness first, then in-flight requests and streams, then the events).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use loom_dashboard::DashboardConfig;
use loom_mock::{MockConfig, MockServer};
use loom_schemas::log::{Log, Topic};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::{Span, status::StatusCode};
use prost::Message;
use reqwest::Method;
use serde_json::{Value, json};

use common::gateway::{ADMIN, read_sse, start_full, trace_of};
use common::{Server, tenant_and_key};

/// The sum of every sample of `name` whose labels include all of `labels` (0 if none); `None`
/// if `name` has no sample at all.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
        if metric != name {
            continue;
        }
        let total = found.get_or_insert(0.0);
        if labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            *total += value.parse::<f64>().unwrap();
        }
    }
    found
}

fn moved(before: &str, after: &str, name: &str, labels: &[(&str, &str)]) -> bool {
    let then = sample(before, name, labels).unwrap_or(0.0);
    let now = sample(after, name, labels).unwrap_or(0.0);
    now > then
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_name_every_step_and_move_under_traffic() {
    let harness = start_full(
        MockConfig::default(),
        "",
        true,
        DashboardConfig::default(),
        true,
    )
    .await;
    let scrape = async || {
        let response = harness
            .client
            .get(format!("{}/metrics", harness.base))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.text().await.unwrap()
    };
    let before = scrape().await;

    // Answered, streamed, embedded; a 429 retried; an email flagged by the default policy; a
    // user over their quota.
    let chat = |content: &str| json!({"model": "fast", "messages": [{"role": "user", "content": content}]});
    assert_eq!(
        harness.chat(chat("hello")).send().await.unwrap().status(),
        200
    );
    let mut streamed = chat("stream me");
    streamed["stream"] = json!(true);
    let frames = read_sse(harness.chat(streamed).send().await.unwrap()).await;
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
    let embedded = harness
        .call(
            Method::POST,
            "/v1/embeddings",
            &harness.key,
            Some(json!({"model": "embed", "input": "a line"})),
        )
        .await;
    assert_eq!(embedded.0, 200, "{embedded:?}");
    harness
        .faults(json!([{"kind": "status", "status": 429, "retry_after": 0}]))
        .await;
    assert_eq!(
        harness.chat(chat("again")).send().await.unwrap().status(),
        200
    );
    let flagged = harness
        .chat(chat("write to bob@example.com"))
        .send()
        .await
        .unwrap();
    assert_eq!(flagged.status(), 200);
    let limit = json!({"tenant_id": harness.tenant, "scope": "user", "id": "burst",
        "limits": {"requests_per_minute": 1}});
    assert_eq!(
        harness
            .call(Method::POST, "/admin/quotas", ADMIN, Some(limit))
            .await
            .0,
        200
    );
    let statuses = {
        let mut statuses = Vec::new();
        for _ in 0..2 {
            let response = harness
                .chat(chat("burst"))
                .header("x-loom-user", "burst")
                .send()
                .await
                .unwrap();
            statuses.push(response.status().as_u16());
        }
        statuses
    };
    assert_eq!(statuses, [200, 429]);
    let query = json!({"query": "SELECT count(*) AS n FROM requests"});
    let (status, _) = harness
        .call(Method::POST, "/v1/sql", &harness.key, Some(query))
        .await;
    assert_eq!(status, 200);

    // The archive writes its first file within a couple of seconds (files roll every second
    // in the harness); the lags are measured at start and every 10 s.
    let started = Instant::now();
    let after = loop {
        let after = scrape().await;
        if sample(&after, "loom_archive_files_total", &[]).unwrap_or(0.0) > 0.0
            && sample(&after, "loom_projector_records_total", &[]).unwrap_or(0.0) > 0.0
        {
            break after;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no archive file or projection:\n{after}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    let chat_route = [("route", "/v1/chat/completions"), ("method", "POST")];
    let served = [
        ("model", "gpt-4o-mini"),
        ("provider", "openai"),
        ("deployment", "primary/gpt-4o-mini"),
    ];
    let ok = [served.as_slice(), &[("status", "ok")]].concat();
    for (name, labels) in [
        (
            "loom_http_requests_total",
            [chat_route.as_slice(), &[("status", "200")]].concat(),
        ),
        (
            "loom_http_requests_total",
            [chat_route.as_slice(), &[("status", "429")]].concat(),
        ),
        (
            "loom_http_request_duration_seconds_count",
            chat_route.to_vec(),
        ),
        ("loom_requests_total", ok),
        (
            "loom_requests_total",
            vec![("provider", "none"), ("status", "denied")],
        ),
        (
            "loom_requests_total",
            vec![("model", "text-embedding-3-small"), ("status", "ok")],
        ),
        ("loom_request_duration_seconds_count", served.to_vec()),
        ("loom_request_duration_seconds_bucket", served.to_vec()),
        ("loom_request_overhead_seconds_count", served.to_vec()),
        ("loom_request_ttft_seconds_count", served.to_vec()),
        ("loom_tokens_total", vec![("direction", "out")]),
        (
            "loom_upstream_attempts_total",
            vec![("deployment", "primary/gpt-4o-mini"), ("outcome", "ok")],
        ),
        (
            "loom_upstream_errors_total",
            vec![("provider", "openai"), ("class", "rate_limited")],
        ),
        ("loom_upstream_duration_seconds_count", vec![]),
        (
            "loom_quota_denials_total",
            vec![("scope", "user"), ("metric", "requests")],
        ),
        (
            "loom_policy_actions_total",
            vec![("action", "flag"), ("direction", "prompt")],
        ),
        ("loom_events_written_total", vec![]),
        ("loom_events_ack_wait_seconds_count", vec![]),
        ("loom_log_appended_records_total", vec![("topic", "data")]),
        ("loom_log_fsync_seconds_count", vec![]),
        ("loom_projector_records_total", vec![("topic", "data")]),
        ("loom_projector_batch_seconds_count", vec![]),
        ("loom_archive_events_total", vec![]),
        ("loom_archive_files_total", vec![]),
        ("loom_archive_bytes_total", vec![]),
        ("loom_archive_flush_seconds_count", vec![]),
        ("loom_sql_query_seconds_count", vec![]),
    ] {
        assert!(
            moved(&before, &after, name, &labels),
            "{name} {labels:?} did not move:\n{after}"
        );
    }
    // Gauges and counters that are there, moving or not under this traffic.
    for name in [
        "loom_build_info",
        "loom_events_queued",
        "loom_log_end_offset",
        "loom_projector_position",
        "loom_projector_lag_records",
        "loom_archive_lag_records",
    ] {
        assert!(sample(&after, name, &[]).is_some(), "no {name}:\n{after}");
    }
    // Every histogram has buckets, not quantiles.
    assert!(!after.contains("quantile="), "{after}");
    // No label carries what a client sent.
    for sent in ["hello", "burst\"", "bob@example.com", &harness.key] {
        assert!(!after.contains(sent), "{sent} in the metrics");
    }

    let ready = harness
        .client
        .get(format!("{}/ready", harness.base))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert_eq!(ready.json::<Value>().await.unwrap()["status"], "ready");
}

/// A `loom serve` config with one alias, `fast`, on `mock`.
fn config_file(dir: &std::path::Path, mock: &MockServer) -> std::path::PathBuf {
    let path = dir.join("loom.toml");
    let text = format!(
        "[upstreams.mock]\nprovider = \"openai_compatible\"\nbase_url = \"{}/v1\"\n\
         [models.fast]\ndeployments = [{{ upstream = \"mock\", model = \"m\" }}]\n",
        mock.url()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `loom serve` on a data dir in `dir`, with `config`, the admin token, a master key and `flags`.
fn serve_on(dir: &Path, config: &Path, admin: &str, master: &str, flags: &[&str]) -> Server {
    let mut args = vec!["--config", config.to_str().unwrap(), "--admin-token", admin];
    args.extend_from_slice(flags);
    Server::start(&dir.join("data"), &args, &[("LOOM_MASTER_KEY", master)]).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_hold_no_key_prompt_or_completion_even_at_debug() {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &mock);
    let admin = "admin-token-d41d8cd98f00";
    let master = "6b".repeat(32);
    let flags = ["--log-format", "json", "--log", "debug"];
    let server = serve_on(dir.path(), &config, admin, &master, &flags);
    let (_, key) = tenant_and_key(&server, admin, "acme").await;
    let client = reqwest::Client::new();
    let prompt = "zebra quartz nimbus 4111111111111111 sk-proj-Zq8hT3vX9mW2pL5nR7kJ4cB6";
    for stream in [false, true] {
        let response = client
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "fast", "stream": stream,
                "messages": [{"role": "user", "content": prompt}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let answer = response.text().await.unwrap();
        assert!(answer.contains("zebra"), "{answer}");
    }
    let wrong = client
        .post(server.url("/v1/chat/completions"))
        .bearer_auth("lm_not-a-real-key-5f3c")
        .json(&json!({"model": "fast", "messages": [{"role": "user", "content": prompt}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);

    let (status, log) = server.stop_with_log();
    assert!(status.success());
    assert!(log.len() > 10, "{log:?}");
    for line in &log {
        let parsed: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(parsed["level"].is_string(), "{line}");
        // The prompt's words (the mock's completion repeats them), its card number and key, the
        // tenant's key, a key that was refused, the admin token and the master key.
        for secret in [
            "zebra",
            "quartz",
            "4111111111111111",
            "sk-proj-Zq8hT3vX9mW2pL5nR7kJ4cB6",
            &key,
            &key[key.len() - 12..],
            "lm_not-a-real-key-5f3c",
            admin,
            &master,
        ] {
            assert!(!line.contains(secret), "{secret} logged: {line}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_turns_readiness_off_then_finishes_streams_and_records_them() {
    // A stream of ~13 frames, a quarter second apart: it outlives the shutdown delay.
    let mock = MockServer::start(MockConfig {
        chunk_delay: Duration::from_millis(250),
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = config_file(dir.path(), &mock);
    let admin = "admin-token";
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--admin-token",
        admin,
        "--shutdown-delay",
        "1s",
        "--shutdown-timeout",
        "20s",
    ];
    let mut server = Server::start(&data, &args, &[]).unwrap();
    let (_, key) = tenant_and_key(&server, admin, "acme").await;
    let client = reqwest::Client::new();
    let ready = client.get(server.url("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 200);

    let response = client
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(&key)
        .json(&json!({"model": "fast", "stream": true,
            "messages": [{"role": "user", "content": "one two three four five six seven eight"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let trace = trace_of(&response);
    let stream = tokio::spawn(read_sse(response));
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.terminate();

    // Readiness goes false at once; the server still answers during the delay.
    let started = Instant::now();
    loop {
        let ready = client.get(server.url("/ready")).send().await.unwrap();
        if ready.status() == 503 {
            assert_eq!(ready.json::<Value>().await.unwrap()["status"], "draining");
            break;
        }
        assert!(started.elapsed() < Duration::from_millis(900));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // After the delay no new connection is taken, while the stream goes on.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        client.get(server.url("/ready")).send().await.is_err(),
        "still accepting after the delay"
    );
    assert!(
        !stream.is_finished(),
        "the stream ended before the test saw the drain"
    );
    let frames = stream.await.unwrap();
    assert_eq!(
        frames.last().map(String::as_str),
        Some("[DONE]"),
        "{frames:?}"
    );
    assert!(frames.len() > 10, "{frames:?}");
    let started = Instant::now();
    while !server.exited() {
        assert!(started.elapsed() < Duration::from_secs(20), "did not exit");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, log) = server.stop_with_log();
    assert!(status.success(), "{log:?}");

    // The stream's trace is whole in the log: request.completed was recorded before it ended.
    let log = common::open_data_dir_log(&data).await;
    let registry = loom_schemas::codec::Registry::builtin().unwrap();
    let mut reader = log.read_from(Topic::Data, 0, 0).await.unwrap();
    let mut entries = Vec::new();
    loop {
        let batch = reader.poll(5000).await.unwrap();
        if batch.is_empty() {
            break;
        }
        entries.extend(batch);
    }
    let types: Vec<&str> = entries
        .iter()
        .map(|entry| registry.decode(&entry.record.value).unwrap())
        .filter(|event| event.envelope.trace_id.as_deref() == Some(trace.as_str()))
        .map(|event| event.payload.event_type())
        .collect();
    assert!(types.contains(&"llm_call.completed"), "{types:?}");
    assert_eq!(types.last(), Some(&"request.completed"), "{types:?}");
}

/// An OTLP/HTTP collector on loopback: every span of every `POST /v1/traces` it receives,
/// decoded from protobuf, with its resource's `service.name`.
struct Collector {
    url: String,
    spans: Arc<Mutex<Vec<(String, Span)>>>,
}

impl Collector {
    async fn start() -> Collector {
        let spans: Arc<Mutex<Vec<(String, Span)>>> = Arc::default();
        let received = Arc::clone(&spans);
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| async move {
                let request = ExportTraceServiceRequest::decode(body).unwrap();
                let mut spans = received.lock().unwrap();
                for resource in request.resource_spans {
                    let attributes = resource.resource.map(|r| r.attributes).unwrap_or_default();
                    let service = attribute(&attributes, "service.name").unwrap_or_default();
                    for scope in resource.scope_spans {
                        spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
                    }
                }
                axum::http::StatusCode::OK
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Collector { url, spans }
    }

    fn spans(&self) -> Vec<(String, Span)> {
        self.spans.lock().unwrap().clone()
    }
}

/// An attribute's value as text (strings as they are, numbers and booleans printed).
fn attribute(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    Some(match value.value.as_ref()? {
        any_value::Value::StringValue(text) => text.clone(),
        any_value::Value::IntValue(int) => int.to_string(),
        any_value::Value::BoolValue(flag) => flag.to_string(),
        other => format!("{other:?}"),
    })
}

fn attr(span: &Span, key: &str) -> Option<String> {
    attribute(&span.attributes, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_with_genai_attributes_and_the_clients_trace() {
    let collector = Collector::start().await;
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &mock);
    let admin = "admin-token-0c4e2b1a";
    let flags = ["--otlp-endpoint", &collector.url];
    let server = serve_on(dir.path(), &config, admin, &"5e".repeat(32), &flags);
    let (tenant, key) = tenant_and_key(&server, admin, "acme").await;
    let client = reqwest::Client::new();
    let prompt = "walrus tangerine";

    // The first attempt fails (500) and is retried: two attempts in the client's trace.
    let faults = json!({"faults": [{"kind": "status", "status": 500}]});
    let queued = client
        .post(format!("{}/mock/faults", mock.url()))
        .json(&faults);
    assert!(queued.send().await.unwrap().status().is_success());
    let (trace, parent) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let chat = |stream: bool| {
        client
            .post(server.url("/v1/chat/completions"))
            .bearer_auth(&key)
            .json(&json!({"model": "fast", "stream": stream,
                "messages": [{"role": "user", "content": prompt}]}))
    };
    let answered = chat(false)
        .header("traceparent", format!("00-{trace}-{parent}-01"))
        .header("tracestate", "vendor=blue")
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    let request_id = answered.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    answered.text().await.unwrap();
    // A stream without a traceparent: a trace of its own.
    let streamed = chat(true).send().await.unwrap();
    assert_eq!(streamed.status(), 200);
    streamed.text().await.unwrap();
    // A client's trace that is not sampled: no spans.
    let unsampled = "0af7651916cd43dd8448eb211c80319c";
    let skipped = chat(false)
        .header("traceparent", format!("00-{unsampled}-b7ad6b7169203331-00"))
        .send()
        .await
        .unwrap();
    assert_eq!(skipped.status(), 200);
    let upstream: Vec<Value> = (client.get(format!("{}/mock/requests", mock.url())).send())
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    // Stopping exports what is queued.
    assert!(server.stop().success());
    let spans = collector.spans();
    assert!(
        spans.iter().all(|(service, _)| service == "loom"),
        "{spans:?}"
    );
    let spans: Vec<Span> = spans.into_iter().map(|(_, span)| span).collect();
    let in_trace = |id: &str| -> Vec<&Span> {
        let id = hex::decode(id).unwrap();
        spans.iter().filter(|s| s.trace_id == id).collect()
    };
    assert!(in_trace(unsampled).is_empty());

    // The client's trace: the request's SERVER span under the client's span, two CLIENT spans
    // under it, the first failed.
    let ours = in_trace(trace);
    assert_eq!(ours.len(), 3, "{ours:#?}");
    let request = ours
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    assert_eq!(request.name, "POST /v1/chat/completions");
    assert_eq!(hex::encode(&request.parent_span_id), parent);
    assert_eq!(request.trace_state, "vendor=blue");
    for (key, value) in [
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.request.model", "fast"),
        ("gen_ai.response.model", "m"),
        ("gen_ai.system", "openai"),
        ("http.response.status_code", "200"),
        ("loom.attempts", "2"),
        ("loom.deployment", "mock/m"),
        ("loom.status", "ok"),
    ] {
        assert_eq!(
            attr(request, key).as_deref(),
            Some(value),
            "{key}: {request:#?}"
        );
    }
    assert_eq!(attr(request, "loom.trace_id"), Some(request_id));
    assert_eq!(attr(request, "loom.tenant_id"), Some(tenant));
    assert!(attr(request, "gen_ai.usage.input_tokens").is_some());
    assert!(attr(request, "gen_ai.usage.output_tokens").is_some());
    let mut attempts: Vec<&Span> = (ours.iter().copied())
        .filter(|s| s.kind == SpanKind::Client as i32)
        .collect();
    attempts.sort_by_key(|s| attr(s, "loom.attempt"));
    assert_eq!(attempts.len(), 2);
    for attempt in &attempts {
        assert_eq!(attempt.parent_span_id, request.span_id);
        assert_eq!(attempt.name, "chat m");
        assert_eq!(attr(attempt, "gen_ai.request.model").as_deref(), Some("m"));
        assert_eq!(
            attr(attempt, "gen_ai.provider.name").as_deref(),
            Some("openai")
        );
        assert_eq!(
            attr(attempt, "server.address").as_deref(),
            Some("127.0.0.1")
        );
        assert!(attempt.start_time_unix_nano >= request.start_time_unix_nano);
        assert!(attempt.end_time_unix_nano <= request.end_time_unix_nano);
    }
    let (failed, answered) = (attempts[0], attempts[1]);
    assert_eq!(
        attr(failed, "http.response.status_code").as_deref(),
        Some("500")
    );
    assert_eq!(attr(failed, "error.type").as_deref(), Some("server_error"));
    assert_eq!(
        failed.status.as_ref().unwrap().code,
        StatusCode::Error as i32
    );
    assert_eq!(attr(answered, "error.type"), None);
    assert!(attr(answered, "gen_ai.usage.output_tokens").is_some());
    assert!(attr(answered, "gen_ai.response.id").is_some());

    // The upstream got each attempt's `traceparent`: the client's trace, the attempt's span.
    let sent: Vec<&str> = (upstream.iter())
        .filter(|r| r["path"] == "/v1/chat/completions")
        .filter_map(|r| r["headers"]["traceparent"].as_str())
        .collect();
    for attempt in &attempts {
        let expected = format!("00-{trace}-{}-01", hex::encode(&attempt.span_id));
        assert!(
            sent.contains(&expected.as_str()),
            "{expected} not in {sent:?}"
        );
    }
    assert!(!sent.iter().any(|t| t.contains(unsampled)), "{sent:?}");

    // The stream: a new trace with its request and its one attempt, tokens counted.
    let stream = spans
        .iter()
        .find(|s| {
            s.kind == SpanKind::Client as i32 && attr(s, "loom.stream").as_deref() == Some("true")
        })
        .unwrap();
    let its_trace = in_trace(&hex::encode(&stream.trace_id));
    assert_eq!(its_trace.len(), 2, "{its_trace:#?}");
    let root = its_trace
        .iter()
        .find(|s| s.kind == SpanKind::Server as i32)
        .unwrap();
    assert!(root.parent_span_id.is_empty());
    assert!(attr(stream, "gen_ai.usage.output_tokens").is_some());

    // Nothing of the prompt, the answer or the key.
    let text = format!("{spans:?}");
    for secret in ["walrus", "tangerine", &key] {
        assert!(!text.contains(secret), "{secret} in the spans");
    }
}
