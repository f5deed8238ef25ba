//! The analytics over HTTP on `loom serve` (read models folded in process) with real traffic
//! from the mock upstream: every endpoint answers the caller's tenant only, in the shapes the
//! docs give, and refuses bad parameters with OpenAI-shaped errors.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::gateway::{ADMIN, Harness, start_with};
use loom_mock::MockConfig;
use serde_json::{Value, json};

async fn get(harness: &Harness, key: &str, path: &str) -> (u16, Value) {
    let response = harness
        .client
        .get(format!("{}{path}", harness.base))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_answer_each_tenant_from_the_read_models() {
    let harness = start_with(MockConfig::default(), "", true).await;
    let key = harness.key.clone();
    // Traffic: 4 answered (2 streamed), 1 that fails for good after its retry, 1 for a model
    // nobody serves.
    for n in 0..4 {
        let response = harness
            .chat(
                json!({"model": "fast", "stream": n % 2 == 1, "user": format!("user-{}", n % 2),
                "messages": [{"role": "user", "content": "hello there"}]}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.bytes().await.unwrap();
    }
    harness
        .faults(
            json!([{"kind": "status", "status": 500}, {"kind": "status", "status": 500},
            {"kind": "status", "status": 500}, {"kind": "status", "status": 500}]),
        )
        .await;
    let failed = harness
        .chat(json!({"model": "fast", "messages": [{"role": "user", "content": "x"}]}))
        .send()
        .await
        .unwrap();
    assert!(failed.status().is_server_error(), "{}", failed.status());
    let unknown = harness
        .chat(
            json!({"model": "nobody-serves-this", "messages": [{"role": "user", "content": "x"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);

    // The projector folds them in a moment.
    let started = Instant::now();
    let summary = loop {
        let (status, body) = get(&harness, &key, "/v1/analytics/summary?window=1h").await;
        assert_eq!(status, 200, "{body}");
        if body["metrics"]["requests"]["value"] == 6 {
            break body;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let metrics = &summary["metrics"];
    assert_eq!(metrics["errors"]["value"], 2);
    assert_eq!(metrics["requests"]["previous"], 0);
    assert_eq!(metrics["requests"]["change_pct"], Value::Null);
    assert!(metrics["tokens_total"]["value"].as_i64().unwrap() > 0);
    assert!(metrics["cost_usd"]["value"].as_f64().unwrap() > 0.0);
    assert!(metrics["latency_p95_ms"]["value"].as_f64().unwrap() > 0.0);
    assert!(metrics["ttft_p50_ms"]["value"].as_f64().unwrap() > 0.0);

    // A series in a half-hour zone, of the metrics asked for only.
    let (status, series) = get(
        &harness,
        &key,
        "/v1/analytics/timeseries?window=2h&bucket=minute&tz=Asia/Kolkata&metric=requests,cost_usd",
    )
    .await;
    assert_eq!(status, 200, "{series}");
    assert_eq!(series["bucket"], "minute");
    let points = series["points"].as_array().unwrap();
    // Two hours of minutes; the first and last partial unless now is on the minute.
    assert!((120..=121).contains(&points.len()), "{}", points.len());
    let total: i64 = points.iter().map(|p| p["requests"].as_i64().unwrap()).sum();
    assert_eq!(total, 6);
    let point = points.iter().find(|p| p["requests"] != 0).unwrap();
    let mut keys: Vec<&str> = point
        .as_object()
        .unwrap()
        .keys()
        .map(|k| k.as_str())
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["cost_usd", "requests", "start"]);
    assert!(
        point["start"].as_str().unwrap().ends_with("+05:30"),
        "{point}"
    );

    // Breakdowns, with names for keys.
    let (_, by_model) = get(&harness, &key, "/v1/analytics/breakdown?by=model&window=1h").await;
    let groups = by_model["groups"].as_array().unwrap();
    let models: Vec<(&str, i64)> = groups
        .iter()
        .map(|g| (g["key"].as_str().unwrap(), g["requests"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        models,
        [("gpt-4o-mini", 4), ("fast", 1), ("nobody-serves-this", 1)]
    );
    let (_, by_user) = get(
        &harness,
        &key,
        "/v1/analytics/breakdown?by=user&metric=requests",
    )
    .await;
    let mut users: Vec<(String, i64)> = by_user["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["key"].to_string(), g["requests"].as_i64().unwrap()))
        .collect();
    users.sort();
    assert_eq!(
        users,
        [
            ("\"user-0\"".into(), 2),
            ("\"user-1\"".into(), 2),
            ("null".into(), 2)
        ]
    );
    let (_, by_key) = get(&harness, &key, "/v1/analytics/breakdown?by=key").await;
    assert!(by_key["groups"][0]["name"].is_string(), "{by_key}");
    let (_, by_day) = get(
        &harness,
        &key,
        "/v1/analytics/breakdown?by=day&window=2d&tz=America/New_York",
    )
    .await;
    let days = by_day["groups"].as_array().unwrap();
    assert!(days.len() >= 2 && days.iter().all(|d| d["key"].as_str().unwrap().len() == 10));

    // The top requests, the errors, recent activity.
    let (_, top) = get(&harness, &key, "/v1/analytics/top?by=latency&limit=2").await;
    assert_eq!(top["requests"].as_array().unwrap().len(), 2);
    let (_, expensive) = get(&harness, &key, "/v1/analytics/top-expensive").await;
    let costs: Vec<f64> = expensive["requests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["cost_usd"].as_f64())
        .collect();
    assert_eq!(costs.len(), 4);
    assert!(costs.is_sorted_by(|a, b| a >= b));
    for path in ["/v1/analytics/errors", "/v1/analytics/error-rate"] {
        let (status, errors) = get(&harness, &key, path).await;
        assert_eq!(status, 200, "{errors}");
        assert_eq!(
            (errors["requests"].clone(), errors["errors"].clone()),
            (json!(6), json!(2))
        );
        let upstream_errors: i64 = errors["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .map(|g| g["errors"].as_i64().unwrap())
            .sum();
        assert!(upstream_errors >= 2, "{errors}");
    }
    let (_, activity) = get(&harness, &key, "/v1/activity?limit=3").await;
    let recent = activity["requests"].as_array().unwrap();
    assert_eq!(recent.len(), 3);
    assert_eq!(recent[0]["model"], "nobody-serves-this");
    assert_eq!(recent[0]["status"], "error");
    let (status, alerts) = get(&harness, &key, "/v1/alerts").await;
    assert_eq!(status, 200, "{alerts}");
    assert!(alerts["alerts"].is_array());

    // Under the names earlier dashboards call, camelCased.
    let (status, legacy) = get(
        &harness,
        &key,
        "/v1/analytics?groupBy=month&startDate=2026-01-01",
    )
    .await;
    assert_eq!(status, 200, "{legacy}");
    assert_eq!(legacy["totals"]["requests"], 6);
    assert_eq!(
        legacy["totals"]["totalTokens"],
        legacy["totals"]["tokensTotal"]
    );
    assert_eq!(legacy["groupBy"], "month");
    assert!(legacy["byModel"].as_array().unwrap().len() == 3);
    let months: i64 = legacy["byPeriod"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["requests"].as_i64().unwrap())
        .sum();
    assert_eq!(months, 6);

    // Another tenant sees none of it; the operator sees it all.
    let other: Value = harness
        .admin("/admin/tenants", json!({"name": "other"}))
        .await;
    let other_key: Value = harness
        .admin("/admin/keys", json!({"tenant_id": other["tenant_id"]}))
        .await;
    let other_key = other_key["key"].as_str().unwrap();
    let (_, theirs) = get(&harness, other_key, "/v1/analytics/summary").await;
    assert_eq!(theirs["metrics"]["requests"]["value"], 0);
    let (_, theirs) = get(&harness, other_key, "/v1/activity").await;
    assert_eq!(theirs["requests"], json!([]));
    let (_, all) = get(&harness, ADMIN, "/v1/analytics/breakdown?by=tenant").await;
    assert_eq!(all["groups"][0]["name"], "acme", "{all}");

    // Bad input: clear 400s in OpenAI's shape; no key, a 401.
    for path in [
        "/v1/analytics/summary?windw=1h",
        "/v1/analytics/summary?window=1h&window=2h",
        "/v1/analytics/summary?window=1y",
        "/v1/analytics/summary?from=2026-12-02&window=1h",
        "/v1/analytics/summary?from=tomorrow",
        "/v1/analytics/summary?status=great",
        "/v1/analytics/timeseries?tz=Mars/Olympus",
        "/v1/analytics/timeseries?bucket=year",
        "/v1/analytics/timeseries?metric=happiness",
        "/v1/analytics/timeseries?bucket=minute&window=30d",
        "/v1/analytics/breakdown?by=colour",
        "/v1/analytics/top?by=size",
        "/v1/analytics/top?limit=0",
        "/v1/analytics?groupBy=year",
    ] {
        let (status, body) = get(&harness, &key, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{path}");
        assert_eq!(body["error"]["code"], "invalid_request", "{path}");
        assert!(!body["error"]["message"].as_str().unwrap().is_empty());
    }
    let (status, body) = get(&harness, "sk-wrong", "/v1/analytics/summary").await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (401, json!("invalid_api_key"))
    );
    harness.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_list_in_stable_pages_and_open_as_timelines() {
    let harness = start_with(MockConfig::default(), "", true).await;
    let key = harness.key.clone();
    // A tool call the model asks for, and its result sent back in the next request.
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let asked = harness
        .chat(json!({"model": "fast", "tools": tools,
            "messages": [{"role": "user", "content": "Weather in Paris?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(asked.status(), 200);
    let first_trace = common::gateway::trace_of(&asked);
    let asked: Value = asked.json().await.unwrap();
    let call = asked["choices"][0]["message"]["tool_calls"][0].clone();
    let answered = harness
        .chat(json!({"model": "fast", "tools": tools, "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": null, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "{\"sky\": \"sunny\"}"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), 200);
    for _ in 0..5 {
        let response = harness
            .chat(json!({"model": "fast", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let started = Instant::now();
    while get(&harness, &key, "/v1/traces?limit=200").await.1["traces"]
        .as_array()
        .unwrap()
        .len()
        < 7
    {
        assert!(started.elapsed() < Duration::from_secs(30));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Pages of 3, with new traffic between pages: each old trace once, none of the new ones
    // (they are newer than the first page).
    let (status, page) = get(&harness, &key, "/v1/traces?limit=3").await;
    assert_eq!(status, 200, "{page}");
    let mut seen: Vec<String> = Vec::new();
    let mut page = page;
    loop {
        seen.extend(
            page["traces"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["trace_id"].as_str().unwrap().to_owned()),
        );
        let response = harness
            .chat(json!({"model": "fast", "messages": [{"role": "user", "content": "more"}]}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let Some(cursor) = page["next_cursor"].as_str() else {
            break;
        };
        let (status, next) = get(
            &harness,
            &key,
            &format!("/v1/traces?limit=3&cursor={cursor}"),
        )
        .await;
        assert_eq!(status, 200, "{next}");
        page = next;
    }
    assert_eq!(seen.len(), 7, "{seen:?}");
    let mut unique = seen.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 7);
    assert_eq!(seen.last(), Some(&first_trace));

    // Filters and bad cursors.
    let (_, tooled) = get(
        &harness,
        &key,
        "/v1/traces?min_latency_ms=0&model=gpt-4o-mini&status=ok",
    )
    .await;
    assert!(tooled["traces"].as_array().unwrap().len() >= 7);
    let (_, none) = get(&harness, &key, "/v1/traces?min_cost=1000").await;
    assert_eq!(none["traces"], json!([]));
    let other: Value = harness
        .admin("/admin/tenants", json!({"name": "other"}))
        .await;
    let other_key: Value = harness
        .admin("/admin/keys", json!({"tenant_id": other["tenant_id"]}))
        .await;
    let other_key = other_key["key"].as_str().unwrap();
    let (_, page) = get(&harness, &key, "/v1/traces?limit=1").await;
    let cursor = page["next_cursor"].as_str().unwrap();
    for (caller, path) in [
        (other_key, format!("/v1/traces?cursor={cursor}")),
        (key.as_str(), format!("/v1/traces?cursor={cursor}A")),
        (key.as_str(), "/v1/traces?cursor=nonsense".to_owned()),
        (key.as_str(), "/v1/traces?min_cost=-1".to_owned()),
        (key.as_str(), "/v1/traces?limit=201".to_owned()),
    ] {
        let (status, body) = get(&harness, caller, &path).await;
        assert_eq!(
            (status, body["error"]["code"].clone()),
            (400, json!("invalid_request")),
            "{path}: {body}"
        );
    }

    // The first trace as a timeline: the tool call, answered by the next request.
    let (status, timeline) = get(&harness, &key, &format!("/v1/traces/{first_trace}")).await;
    assert_eq!(status, 200, "{timeline}");
    assert_eq!(
        (timeline["source"].clone(), timeline["bodies"].clone()),
        (json!("read_models"), json!(true))
    );
    let kinds: Vec<&str> = timeline["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    // (No policy is configured here: no policy step.)
    assert_eq!(
        kinds,
        ["request", "routing", "attempt", "tool_call", "completed"]
    );
    let steps = timeline["steps"].as_array().unwrap();
    assert_eq!(
        steps[0]["detail"]["body"]["messages"][0]["content"],
        "Weather in Paris?"
    );
    assert!(
        steps[2]["detail"]["response_body"].is_object(),
        "{}",
        steps[2]
    );
    let tool = &steps[3]["detail"];
    assert_eq!(tool["name"], "get_weather");
    assert_eq!(
        tool["answered"]["content"],
        json!({"sky": "sunny"}),
        "{tool}"
    );
    assert!(tool["answered"]["tool_latency_ms"].as_f64().unwrap() >= 0.0);
    assert!(steps[2]["duration_ms"].as_f64().is_some());
    // Another tenant's key: no such trace.
    let (status, body) = get(&harness, other_key, &format!("/v1/traces/{first_trace}")).await;
    assert_eq!(
        (status, body["error"]["code"].clone()),
        (404, json!("not_found"))
    );
    let (status, _) = get(&harness, &key, "/v1/traces/no-such-trace").await;
    assert_eq!(status, 404);
    // The operator finds it by id.
    let (status, _) = get(&harness, ADMIN, &format!("/v1/traces/{first_trace}")).await;
    assert_eq!(status, 200);
    harness.stop().await;
}
