//! The security policy on the request path: a project's policy set through the admin API (bad
//! ones refused, naming the field, nothing applied); prompts blocked, redacted or flagged rule by
//! rule in every client API; answers scanned (streams included) and cut only where the project
//! chose to; `policy.evaluated` with each finding's keyed digest. And the promise that matters:
//! with block or redact, a secret reaches neither the upstream, nor any event, nor any file in the
//! data dir (log, read models), nor any log line.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::gateway::{ADMIN, read_sse, start_with, trace_of};
use loom_mock::MockConfig;
use loom_schemas::event::{Event, Payload, PolicyAction, PolicyEvaluated};
use serde_json::{Value, json};

/// Made up for this test: a key of nobody's.
const OPENAI_KEY: &str = "sk-proj-Zr8Tq2Wm5Xc9Vb3Nk7Lp4Hd6Jf1Gs0Ae2Ui8Oy5Rt3Ew";
const AWS_KEY: &str = "AKIAZ7RX4KD2LM5NQ3EG";
const CARD: &str = "4111 1111 1111 1111";

/// Every log line of this test binary, as written.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn policy_events(events: &[Event]) -> Vec<(&str, &PolicyEvaluated)> {
    events
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::PolicyEvaluated(p) => Some((e.envelope.trace_id.as_deref().unwrap_or(""), p)),
            _ => None,
        })
        .collect()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Every file under `dir`, with its bytes.
fn files(dir: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            found.extend(files(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            found.push((path, bytes));
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_block_or_redact_no_secret_reaches_the_upstream_an_event_a_file_or_a_log_line() {
    let lines = Lines::default();
    let writer = lines.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug,hyper=info,h2=info,reqwest=info,sqlx=info")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let harness = start_with(MockConfig::default(), "", true).await;
    let tenant = harness.tenant;

    // A project whose policy blocks OpenAI keys and redacts AWS keys and cards; emails are
    // flagged (the default), and "project bluebird" is a blocked keyword.
    let project = harness
        .admin(
            "/admin/projects",
            json!({"tenant_id": tenant, "name": "guarded", "security_policy": {
                "rules": {"openai_api_key": "block", "aws_access_key_id": "redact",
                          "payment_card": "redact"},
                "blocked_keywords": ["project bluebird"]}}),
        )
        .await;
    let project_id = project["project_id"].as_str().unwrap().to_owned();
    assert_eq!(
        project["security_policy"]["rules"]["openai_api_key"],
        "block"
    );
    let key = harness
        .admin(
            "/admin/keys",
            json!({"tenant_id": tenant, "project_id": project_id}),
        )
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let chat = |body: Value| {
        harness
            .client
            .post(format!("{}/v1/chat/completions", harness.base))
            .bearer_auth(&key)
            .json(&body)
    };

    // Redacted: the key in a message and in a tool call's arguments, the card in a part.
    let response = chat(json!({"model": "fast", "messages": [
        {"role": "user", "content": format!("my aws key is {AWS_KEY}, mail ada@example.com")},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "store", "arguments": format!("{{\"key\":\"{AWS_KEY}\"}}")}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": format!("stored {AWS_KEY}")},
        {"role": "user", "content": [{"type": "text", "text": format!("card {CARD} ok")}]}
    ]}))
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let redacted = trace_of(&response);
    let answer: Value = response.json().await.unwrap();
    assert!(answer["choices"][0]["message"]["content"].is_string());

    // Redacted in a stream, whose answer echoes what the mock got (the redacted text).
    let response = chat(json!({"model": "fast", "stream": true, "messages": [
        {"role": "user", "content": format!("{AWS_KEY} is the key")}]}))
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 200);
    let streamed = trace_of(&response);
    let frames = read_sse(response).await;
    assert_eq!(frames.last().unwrap(), "[DONE]");

    // Blocked: 400 naming the rule, never the key; nothing goes upstream.
    let before = harness.upstream_requests().await.len();
    let response = chat(json!({"model": "fast", "messages": [
        {"role": "user", "content": format!("use {OPENAI_KEY} and {AWS_KEY}")}]}))
    .send()
    .await
    .unwrap();
    assert_eq!(response.status(), 400);
    let blocked = trace_of(&response);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "prompt_blocked_by_policy");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.contains("openai_api_key"), "{message}");
    assert!(!message.contains(OPENAI_KEY) && !message.contains("aws_access_key_id"));

    // In Anthropic's API (a system prompt) and the Responses API (`input`), alike.
    let response = harness
        .client
        .post(format!("{}/v1/messages", harness.base))
        .bearer_auth(&key)
        .json(
            &json!({"model": "claude", "max_tokens": 50, "system": format!("the key: {OPENAI_KEY}"),
                      "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["error"]["type"], "invalid_request_error");
    let response = harness
        .client
        .post(format!("{}/v1/responses", harness.base))
        .bearer_auth(&key)
        .json(&json!({"model": "fast", "input": format!("About Project Bluebird and {AWS_KEY}")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error: Value = response.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("blocked_keyword")
    );
    let response = harness
        .client
        .post(format!("{}/v1/responses", harness.base))
        .bearer_auth(&key)
        .json(&json!({"model": "fast", "input": format!("keep {AWS_KEY} safe")}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.bytes().await.unwrap();

    // The upstream got the redacted texts, and no blocked request.
    let upstream = harness.upstream_requests().await;
    assert_eq!(upstream.len(), before + 1);
    for request in &upstream {
        let raw = request["raw_body"].as_str().unwrap();
        for secret in [OPENAI_KEY, AWS_KEY, CARD] {
            assert!(!raw.contains(secret), "the upstream got {secret}: {raw}");
        }
    }
    let first = upstream
        .iter()
        .find(|r| r["raw_body"].as_str().unwrap().contains("my aws key"))
        .unwrap();
    let messages = &first["body"]["messages"];
    assert_eq!(
        messages[0]["content"],
        "my aws key is AKIA****Q3EG, mail ada@example.com"
    );
    assert_eq!(
        messages[1]["tool_calls"][0]["function"]["arguments"],
        "{\"key\":\"AKIA****Q3EG\"}"
    );
    assert_eq!(messages[3]["content"][0]["text"], "card ****1111 ok");
    // What Loom did not change is sent as the client wrote it.
    assert_eq!(first["body"]["model"], "gpt-4o-mini");

    // The read models fold every request before the node stops.
    let started = Instant::now();
    loop {
        let (status, body) = harness
            .call(
                reqwest::Method::GET,
                "/v1/analytics/summary?window=1h",
                &key,
                None,
            )
            .await;
        assert_eq!(status, 200, "{body}");
        if body["metrics"]["requests"]["value"] == 6 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let dir = harness.dir.path().to_owned();
    let recorded = harness.stop().await;

    // policy.evaluated: rules, actions, places, offsets and digests — the same secret has the
    // same digest wherever it is found.
    let evaluated = policy_events(&recorded.events);
    let of = |trace: &str| {
        evaluated
            .iter()
            .filter(|(t, _)| *t == trace)
            .map(|(_, p)| *p)
            .collect::<Vec<_>>()
    };
    let prompt = of(&redacted)
        .into_iter()
        .find(|p| p.direction == "prompt")
        .unwrap();
    assert_eq!(prompt.action, PolicyAction::Redact);
    let found: Vec<(&str, &str, &str)> = prompt
        .findings
        .iter()
        .map(|f| (f.rule.as_str(), f.action.as_str(), f.location.as_str()))
        .collect();
    assert_eq!(
        found,
        [
            ("aws_access_key_id", "redact", "messages[0].content"),
            ("email", "flag", "messages[0].content"),
            (
                "aws_access_key_id",
                "redact",
                "messages[1].tool_calls[0].function.arguments"
            ),
            ("aws_access_key_id", "redact", "messages[2].content"),
            ("payment_card", "redact", "messages[3].content[0].text"),
        ]
    );
    let aws = &prompt.findings[0];
    assert_eq!((aws.start, aws.end), (14, 14 + AWS_KEY.len() as i64));
    assert_eq!(aws.severity, "high");
    assert_eq!(aws.digest.len(), 16);
    assert_eq!(aws.digest, prompt.findings[2].digest);
    let blocked_prompt = of(&blocked)[0];
    assert_eq!(blocked_prompt.action, PolicyAction::Block);
    assert_eq!(blocked_prompt.findings[1].digest, aws.digest);
    assert_eq!(
        recorded.completed(&blocked).error_class.as_deref(),
        Some("prompt_blocked_by_policy")
    );
    assert!(recorded.calls(&blocked).is_empty());
    // The stream's answer echoed the redacted text: nothing to flag in it.
    assert!(of(&streamed).iter().all(|p| p.direction == "prompt"));

    // No event holds a secret: not in its fields, not in its sealed bodies.
    for event in &recorded.events {
        let mut texts = vec![format!("{event:?}")];
        let sealed = match &event.payload {
            Payload::RequestReceived(r) => vec![("body", r.body.as_ref())],
            Payload::LlmCallCompleted(c) => vec![
                ("request_body", c.request_body.as_ref()),
                ("response_body", c.response_body.as_ref()),
            ],
            Payload::ToolCallObserved(t) => vec![
                ("arguments", t.arguments.as_ref()),
                ("result", t.result.as_ref()),
            ],
            _ => Vec::new(),
        };
        for (field, sealed) in sealed {
            if let Some(sealed) = sealed {
                texts.push(String::from_utf8_lossy(&recorded.open(event, field, sealed)).into());
            }
        }
        for text in texts {
            for secret in [OPENAI_KEY, AWS_KEY, CARD] {
                assert!(
                    !text.contains(secret),
                    "{} holds {secret}",
                    event.payload.event_type()
                );
            }
        }
    }
    // No file of the data dir (the log, the read models, the keys) and no log line.
    for (path, bytes) in files(&dir) {
        for secret in [OPENAI_KEY, AWS_KEY, CARD] {
            assert!(
                !contains(&bytes, secret),
                "{} holds {secret}",
                path.display()
            );
        }
    }
    let logged = lines.0.lock().unwrap().clone();
    assert!(!logged.is_empty());
    for secret in [OPENAI_KEY, AWS_KEY, CARD] {
        assert!(!contains(&logged, secret), "a log line holds {secret}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_flagged_and_cut_only_where_the_project_chose_to() {
    let harness = start_with(
        MockConfig {
            chunk_delay: Duration::from_millis(2),
            ..MockConfig::default()
        },
        "",
        false,
    )
    .await;
    // The mock answers "Mock reply to: <the start of the last message>". A rule matching that
    // answer (and not the prompt) stands for a model saying what it must not.
    let rule = json!({"id": "launch_code", "pattern": "reply to: launch", "keywords": ["launch"]});
    let mut keys = Vec::new();
    for outputs in ["flag", "cut"] {
        let (_, key) = harness
            .project_with_key(json!({"name": outputs, "security_policy": {
                "custom_rules": [rule], "outputs": outputs}}))
            .await;
        keys.push(key);
    }
    let ask = |key: &str, stream: bool| {
        harness
            .client
            .post(format!("{}/v1/chat/completions", harness.base))
            .bearer_auth(key)
            .json(&json!({"model": "fast", "stream": stream,
                          "messages": [{"role": "user", "content": "launch the rocket please"}]}))
            .send()
    };

    // Flagged: the answer goes out whole, JSON or streamed.
    let response = ask(&keys[0], false).await.unwrap();
    assert_eq!(response.status(), 200);
    let flagged_json = trace_of(&response);
    let answer: Value = response.json().await.unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"],
        "Mock reply to: launch the rocket please"
    );
    let response = ask(&keys[0], true).await.unwrap();
    let flagged_stream = trace_of(&response);
    let frames = read_sse(response).await;
    assert_eq!(frames.last().unwrap(), "[DONE]");
    let text = common::gateway::deltas(&frames, "/choices/0/delta/content");
    assert_eq!(text, "Mock reply to: launch the rocket please");

    // Cut: a JSON answer becomes an error; a stream ends with one, before the match goes out.
    let response = ask(&keys[1], false).await.unwrap();
    assert_eq!(response.status(), 400);
    let cut_json = trace_of(&response);
    let error: Value = response.json().await.unwrap();
    assert_eq!(error["error"]["code"], "output_blocked_by_policy");
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("launch_code")
    );
    let response = ask(&keys[1], true).await.unwrap();
    assert_eq!(response.status(), 200);
    let cut_stream = trace_of(&response);
    let frames = read_sse(response).await;
    let text = common::gateway::deltas(&frames, "/choices/0/delta/content");
    assert!(!text.contains("reply to: launch"), "{text}");
    let last: Value = serde_json::from_str(frames.last().unwrap()).unwrap();
    assert_eq!(last["error"]["code"], "output_blocked_by_policy");

    let recorded = harness.stop().await;
    let evaluated = policy_events(&recorded.events);
    for (trace, action) in [
        (&flagged_json, PolicyAction::Flag),
        (&flagged_stream, PolicyAction::Flag),
        (&cut_json, PolicyAction::Block),
        (&cut_stream, PolicyAction::Block),
    ] {
        let outputs: Vec<&PolicyEvaluated> = evaluated
            .iter()
            .filter(|(t, p)| t == trace && p.direction == "output")
            .map(|(_, p)| *p)
            .collect();
        assert_eq!(outputs.len(), 1, "{trace}");
        assert_eq!(outputs[0].action, action, "{trace}");
        let finding = &outputs[0].findings[0];
        assert_eq!(
            (finding.rule.as_str(), finding.location.as_str()),
            ("launch_code", "output")
        );
        assert_eq!(finding.start, 5);
        // The upstream answered: its call is recorded and paid for, whatever the policy did.
        let calls = recorded.calls(trace);
        assert_eq!(calls.len(), 1, "{trace}");
        assert!(calls[0].cost_micro_usd.is_some_and(|c| c > 0), "{trace}");
    }
    for trace in [&cut_json, &cut_stream] {
        let completed = recorded.completed(trace);
        assert_eq!(
            completed.error_class.as_deref(),
            Some("output_blocked_by_policy")
        );
    }
    assert!(recorded.completed(&flagged_stream).error_class.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_policy_is_refused_naming_its_field_and_nothing_is_applied() {
    let harness = start_with(MockConfig::default(), "", false).await;
    let project = harness
        .admin(
            "/admin/projects",
            json!({"tenant_id": harness.tenant, "name": "p"}),
        )
        .await;
    let id = project["project_id"].as_str().unwrap().to_owned();
    // No policy of its own: the default one is in force.
    assert_eq!(project["security_policy"]["default_action"], "flag");
    assert_eq!(project["security_policy"]["outputs"], "flag");
    let path = format!("/admin/projects/{id}");
    let long = "k".repeat(300);
    for (policy, field) in [
        (
            json!({"rules": {"no_such_rule": "block"}}),
            "security_policy.rules.no_such_rule",
        ),
        (json!({"rules": {"email": "shred"}}), "security_policy"),
        (json!({"default_action": "maybe"}), "security_policy"),
        (json!({"outputs": "sometimes"}), "security_policy"),
        (
            json!({"custom_rules": [{"id": "x", "pattern": "(unclosed"}]}),
            "security_policy.custom_rules[0].pattern",
        ),
        (
            json!({"custom_rules": [{"id": "big", "pattern": "\\w{1000}{1000}"}]}),
            "security_policy.custom_rules[0].pattern",
        ),
        (
            json!({"custom_rules": [{"id": "empty", "pattern": "a*"}]}),
            "security_policy.custom_rules[0].pattern",
        ),
        (
            json!({"custom_rules": [{"id": "Bad Id", "pattern": "x"}]}),
            "security_policy.custom_rules[0].id",
        ),
        (
            json!({"custom_rules": [{"id": "email", "pattern": "x"}]}),
            "security_policy.custom_rules[0].id",
        ),
        (
            json!({"custom_rules": [{"id": "a", "pattern": "x"}, {"id": "a", "pattern": "y"}]}),
            "security_policy.custom_rules[1].id",
        ),
        (
            json!({"custom_rules": [{"id": "s", "pattern": "x", "severity": "dire"}]}),
            "security_policy.custom_rules[0].severity",
        ),
        (
            json!({"custom_rules": (0..65).map(|i| json!({"id": format!("r{i}"), "pattern": "x"})).collect::<Vec<_>>()}),
            "security_policy.custom_rules",
        ),
        (
            json!({"blocked_keywords": [" "]}),
            "security_policy.blocked_keywords[0]",
        ),
        (
            json!({"blocked_keywords": [long]}),
            "security_policy.blocked_keywords[0]",
        ),
        (json!({"scan": true}), "security_policy"),
    ] {
        let (status, body) = harness
            .call(
                reqwest::Method::PATCH,
                &path,
                ADMIN,
                Some(json!({"security_policy": policy})),
            )
            .await;
        assert_eq!(status, 400, "{policy}: {body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{policy}: {message}");
    }
    // Nothing was applied: the project is where it was.
    let (status, now) = harness.call(reqwest::Method::GET, &path, ADMIN, None).await;
    assert_eq!(status, 200);
    assert_eq!(now["version"], project["version"]);
    assert_eq!(now["security_policy"], project["security_policy"]);

    // A good one applies, and a project's own rules are in force on its next request.
    let (status, now) = harness.call(
        reqwest::Method::PATCH,
        &path,
        ADMIN,
        Some(json!({"security_policy": {"default_action": "off",
            "custom_rules": [{"id": "ticket", "pattern": "\\bSEC-\\d{4,}\\b", "action": "block"}]}})),
    )
    .await;
    assert_eq!(status, 200, "{now}");
    assert_eq!(
        now["security_policy"]["custom_rules"][0]["severity"],
        "high"
    );
    let key = harness
        .admin(
            "/admin/keys",
            json!({"tenant_id": harness.tenant, "project_id": id}),
        )
        .await["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let (status, body) = harness.call(
        reqwest::Method::POST,
        "/v1/chat/completions",
        &key,
        Some(json!({"model": "fast", "messages": [{"role": "user", "content": "see SEC-20931"}]})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ticket")
    );
    harness.stop().await;
}

#[test]
fn the_cli_sets_and_shows_a_policy_on_a_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let admin = |args: &[&str]| {
        let mut all = vec!["admin", "--data-dir", data.to_str().unwrap()];
        all.extend_from_slice(args);
        let output = common::loom(&all);
        (
            output.status.success(),
            common::text(&output.stdout),
            common::text(&output.stderr),
        )
    };
    let (ok, tenant, error) = admin(&["tenant", "create", "acme"]);
    assert!(ok, "{error}");
    let (ok, project, error) = admin(&[
        "project",
        "create",
        "--tenant",
        tenant.trim(),
        "--name",
        "p",
    ]);
    assert!(ok, "{error}");
    let project: Value = serde_json::from_str(&project).unwrap();
    let id = project["project_id"].as_str().unwrap();
    let (ok, shown, _) = admin(&["policy", "show", id]);
    assert!(ok);
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["default_action"], "flag");

    let file = dir.path().join("policy.json");
    std::fs::write(
        &file,
        r#"{"rules": {"openai_api_key": "block"}, "blocked_keywords": ["bluebird"], "outputs": "cut"}"#,
    )
    .unwrap();
    let (ok, set, error) = admin(&["policy", "set", id, "--file", file.to_str().unwrap()]);
    assert!(ok, "{error}");
    let set: Value = serde_json::from_str(&set).unwrap();
    assert_eq!(set["outputs"], "cut");
    let (ok, _, error) = admin(&[
        "policy",
        "set",
        id,
        "--json",
        r#"{"custom_rules": [{"id": "x", "pattern": "("}]}"#,
    ]);
    assert!(!ok);
    assert!(
        error.contains("security_policy.custom_rules[0].pattern"),
        "{error}"
    );
    let (ok, _, error) = admin(&["policy", "set", id]);
    assert!(!ok && error.contains("--json"), "{error}");
    let (_, shown, _) = admin(&["policy", "show", id]);
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown, set);
}
