//! The gateway driven by the official Python SDKs (from PyPI, installed by `./infra/test.sh`),
//! against the real `loom` binary and the mock upstream; then the events each call produced.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;

use loom_mock::{MockConfig, MockServer};
use loom_schemas::codec::Registry;
use loom_schemas::event::{
    CallStatus, Event, LlmCallCompleted, Payload, RequestCompleted, RequestStatus,
    ToolCallDirection,
};
use loom_schemas::log::{Log, Topic};

use common::{Server, loom, text};

const ADMIN: &str = "sdk-admin";

fn python() -> String {
    std::env::var("LOOM_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

fn write_config(dir: &Path, mock: &MockServer) -> std::path::PathBuf {
    let path = dir.join("loom.toml");
    let config = format!(
        r#"
[upstreams.mock]
provider = "openai"
base_url = "{url}/v1"
api_key_env = "MOCK_UPSTREAM_KEY"

[models.fast]
deployments = [{{ upstream = "mock", model = "gpt-4o-mini" }}]

[models.embed]
deployments = [{{ upstream = "mock", model = "text-embedding-3-small" }}]

[upstreams.claude]
provider = "anthropic"
base_url = "{url}/v1"
api_key_env = "MOCK_UPSTREAM_KEY"

[models.claude]
deployments = [{{ upstream = "claude", model = "claude-sonnet-4-5" }}]
"#,
        url = mock.url()
    );
    std::fs::write(&path, config).unwrap();
    path
}

async fn events(data_dir: &Path) -> Vec<Event> {
    let log = common::open_data_dir_log(data_dir).await;
    let mut reader = log.read_from(Topic::Data, 0, 0).await.unwrap();
    let registry = Registry::builtin().unwrap();
    let mut events = Vec::new();
    loop {
        let batch = reader.poll(1000).await.unwrap();
        if batch.is_empty() {
            return events;
        }
        events.extend(
            batch
                .iter()
                .map(|e| registry.decode(&e.record.value).unwrap()),
        );
    }
}

/// Runs one SDK script against a fresh gateway and returns every data-plane event it produced.
async fn run_script(script: &str) -> Vec<Event> {
    run_script_with(script, &[]).await
}

/// As [`run_script`], after `loom admin` runs each of `setup` (with `{tenant}` in its arguments
/// replaced by the tenant's id).
async fn run_script_with(script: &str, setup: &[&[&str]]) -> Vec<Event> {
    let mock = MockServer::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &mock);
    let data_dir = dir.path().join("data");
    let server = Server::start(
        &data_dir,
        &["--config", config.to_str().unwrap()],
        &[
            ("LOOM_ADMIN_TOKEN", ADMIN),
            ("MOCK_UPSTREAM_KEY", "upstream-secret"),
        ],
    )
    .unwrap();
    let admin = |args: &[&str]| {
        let mut all = vec!["admin", "--url", &server.base, "--admin-token", ADMIN];
        all.extend_from_slice(args);
        let output = loom(&all);
        assert!(output.status.success(), "{}", text(&output.stderr));
        text(&output.stdout).trim().to_owned()
    };
    let tenant = admin(&["tenant", "create", "sdk-tenant"]);
    let key = admin(&["key", "create", "--tenant", &tenant]);
    for args in setup {
        let args: Vec<&str> = args
            .iter()
            .map(|a| if *a == "{tenant}" { tenant.as_str() } else { a })
            .collect();
        admin(&args);
    }

    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/sdk")
        .join(script);
    let output = Command::new(python())
        .arg(&script)
        .env("LOOM_URL", &server.base)
        .env("LOOM_KEY", &key)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {} (./infra/test.sh installs the SDKs): {e}",
                python()
            )
        });
    assert!(
        output.status.success(),
        "{} failed:\n{}\n{}",
        script.display(),
        text(&output.stdout),
        text(&output.stderr)
    );
    assert!(server.stop().success());
    events(&data_dir).await
}

/// The events the SDK calls produced, by trace id (each call sets its own `x-request-id`).
struct Trail(Vec<Event>);

impl Trail {
    fn of(&self, trace: &str) -> Vec<&Event> {
        self.0
            .iter()
            .filter(|e| e.envelope.trace_id.as_deref() == Some(trace))
            .collect()
    }

    fn completed(&self, trace: &str) -> RequestCompleted {
        self.of(trace)
            .into_iter()
            .find_map(|e| match &e.payload {
                Payload::RequestCompleted(c) => Some(c.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{trace}: no request.completed"))
    }

    /// The first upstream attempt.
    fn call(&self, trace: &str) -> LlmCallCompleted {
        self.of(trace)
            .into_iter()
            .find_map(|e| match &e.payload {
                Payload::LlmCallCompleted(c) => Some(c.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{trace}: no llm_call.completed"))
    }

    fn tool(&self, trace: &str, direction: ToolCallDirection) -> bool {
        self.of(trace)
            .into_iter()
            .any(|e| matches!(&e.payload, Payload::ToolCallObserved(t) if t.direction == direction))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_works_through_loom_and_every_call_is_recorded() {
    let trail = Trail(run_script("openai_sdk.py").await);
    for trace in [
        "sdk-chat",
        "sdk-raw",
        "sdk-stream",
        "sdk-stream-usage",
        "sdk-tools",
        "sdk-tool-result",
        "sdk-stream-tools",
        "sdk-embed",
        "sdk-responses-fast",
        "sdk-responses-fast-stream",
        "sdk-responses-fast-tools",
        "sdk-responses-fast-stream-tools",
        "sdk-responses-claude",
        "sdk-responses-claude-stream",
        "sdk-responses-claude-tools",
        "sdk-responses-claude-stream-tools",
    ] {
        let types: Vec<_> = trail
            .of(trace)
            .iter()
            .map(|e| e.payload.event_type())
            .collect();
        assert_eq!(
            types.first(),
            Some(&"request.received"),
            "{trace}: {types:?}"
        );
        let done = trail.completed(trace);
        assert_eq!(
            (done.status, done.http_status),
            (RequestStatus::Ok, 200),
            "{trace}"
        );
        assert!(
            done.tokens_in.is_some() && done.tokens_out.is_some(),
            "{trace}"
        );
        assert!(!done.usage_estimated, "{trace}: the mock reports usage");
    }
    for (trace, status) in [("sdk-404", 404), ("sdk-401", 401)] {
        assert_eq!(trail.completed(trace).http_status, status);
    }
    let stream_call = trail.call("sdk-stream");
    assert!(
        stream_call.stream && stream_call.ttft_us.is_some() && stream_call.status == CallStatus::Ok
    );
    assert!(
        stream_call.cost_micro_usd.is_some(),
        "gpt-4o-mini has a price"
    );
    use ToolCallDirection::{Requested, Result};
    assert!(trail.tool("sdk-tools", Requested));
    assert!(trail.tool("sdk-stream-tools", Requested));
    assert!(trail.tool("sdk-tool-result", Result));
    for (alias, provider) in [("fast", "openai"), ("claude", "anthropic")] {
        let trace = |suffix: &str| format!("sdk-responses-{alias}{suffix}");
        assert!(trail.tool(&trace("-tools"), Requested));
        assert!(trail.tool(&trace("-tool-result"), Result));
        assert!(trail.tool(&trace("-stream-tools"), Requested));
        let call = trail.call(&trace(""));
        assert_eq!(call.provider, provider);
        assert!(call.cost_micro_usd.is_some(), "{alias}: priced");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_anthropic_sdk_works_through_loom_against_both_kinds_of_upstream() {
    let trail = Trail(run_script("anthropic_sdk.py").await);
    for (alias, provider) in [("fast", "openai"), ("claude", "anthropic")] {
        for suffix in ["", "-stream", "-tools", "-tool-result", "-stream-tools"] {
            let trace = format!("anthropic-{alias}{suffix}");
            let events = trail.of(&trace);
            let Some(Payload::RequestReceived(received)) = events.first().map(|e| &e.payload)
            else {
                panic!("{trace}: no request.received");
            };
            assert_eq!(received.endpoint, "/v1/messages", "{trace}");
            let done = trail.completed(&trace);
            assert_eq!(
                (done.status, done.http_status),
                (RequestStatus::Ok, 200),
                "{trace}"
            );
            assert!(
                done.tokens_out.is_some() && !done.usage_estimated,
                "{trace}"
            );
            assert_eq!(done.provider.as_deref(), Some(provider), "{trace}");
        }
        let trace = |suffix: &str| format!("anthropic-{alias}{suffix}");
        assert!(trail.tool(&trace("-tools"), ToolCallDirection::Requested));
        assert!(trail.tool(&trace("-stream-tools"), ToolCallDirection::Requested));
        assert!(trail.tool(&trace("-tool-result"), ToolCallDirection::Result));
    }
    let read = trail.call("anthropic-cache-read");
    assert!(read.tokens_cached_read.unwrap() > 0 && read.cache_saved_micro_usd.unwrap() > 0);
    assert!(
        trail
            .call("anthropic-cache-write")
            .tokens_cache_creation
            .unwrap()
            > 0
    );
    let streamed = trail.call("anthropic-thinking-stream");
    assert!(streamed.stream && streamed.tokens_cached_read.unwrap() > 0);
    assert!(trail.call("anthropic-thinking").dropped_fields.is_empty());
    assert_eq!(trail.completed("anthropic-404").http_status, 404);
    assert_eq!(trail.completed("anthropic-401").http_status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_does_not_retry_a_spent_budget_and_retries_a_rate_limit() {
    let user = |id: &'static str, limit: &'static str, value: &'static str| {
        [
            "quota", "set", "--tenant", "{tenant}", "--scope", "user", "--id", id, limit, value,
        ]
    };
    let budget = user("sdk-budget", "--tokens-per-day", "150");
    let rate = user("sdk-rate", "--requests-per-minute", "20");
    let trail = Trail(run_script_with("openai_quota.py", &[&budget[..], &rate[..]]).await);
    // Each attempt's HTTP status, by the call's trace id (a retry sends the same one).
    let attempts = |trace: &str| -> Vec<i32> {
        trail
            .of(trace)
            .into_iter()
            .filter_map(|e| match &e.payload {
                Payload::RequestCompleted(done) => Some(done.http_status),
                _ => None,
            })
            .collect()
    };
    let budget: Vec<Vec<i32>> = (0..30)
        .map(|i| attempts(&format!("sdk-budget-{i}")))
        .take_while(|a| !a.is_empty())
        .collect();
    // Admitted while the budget lasted; the spent budget was asked once, not retried.
    assert!(budget.len() >= 2, "{budget:?}");
    let (refused, admitted) = budget.split_last().unwrap();
    assert_eq!(refused, &[429], "{budget:?}");
    assert!(admitted.iter().all(|a| a == &[200]), "{budget:?}");
    // The rate limit was retried after its retry-after, and the retry got through.
    assert_eq!(attempts("sdk-rate-retried"), [429, 200]);
    let denied = trail
        .0
        .iter()
        .filter(|e| matches!(&e.payload, Payload::QuotaDenied(_)))
        .count();
    assert_eq!(denied, 2);
}
