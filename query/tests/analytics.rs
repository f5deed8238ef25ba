//! The analytics against a brute-force count over the same generated history, on SQLite and on
//! the Postgres `./infra/test.sh` starts: counts and sums exact, percentiles within one histogram
//! bucket, buckets in time zones across a daylight-saving change, filters, breakdowns, the top
//! requests, errors, recent activity and alerts.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, TimeZone, Timelike};
use chrono_tz::Tz;
use loom_projector::{ProjectorConfig, StoreLocation, replay};
use loom_query::analytics::{
    Analytics, Dimension, Filters, METRICS, Metrics, Question, Stats, TopBy, Unit, Window,
    percentile_error_bound_us, rfc3339_in,
};
use loom_query::archive::Scope;
use loom_schemas::event::{
    Envelope, Event, Payload, PolicyAction, PolicyEvaluated, QuotaLimitSet, QuotaMetric,
    QuotaScope, QuotaWindow, RequestCompleted, RequestReceived, RequestStatus, ToolCallDirection,
    now_micros,
};
use loom_schemas::samples;
use loom_schemas::testing::TestDatabase;
use uuid::Uuid;

fn at(text: &str) -> i64 {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .timestamp_micros()
}

/// A request as the events tell it, for the brute-force side.
#[derive(Debug, Clone, Default)]
struct Request {
    tenant: Uuid,
    trace: String,
    started: i64,
    project: Option<String>,
    user: Option<String>,
    /// Served, else asked for.
    model: Option<String>,
    provider: Option<String>,
    status: Option<String>,
    error_class: Option<String>,
    latency: i64,
    ttft: Option<i64>,
    tokens_in: i64,
    tokens_out: i64,
    tokens_cached: i64,
    cost: Option<i64>,
    cache_saved: i64,
    tool_calls: i64,
    /// Upstream attempts: (model, provider, deployment, failed class or None, start).
    calls: Vec<(String, String, String, Option<String>, i64)>,
}

fn name_of<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .unwrap()
        .as_str()
        .unwrap()
        .to_owned()
}

fn requests(events: &[Event]) -> Vec<Request> {
    let mut by_trace: BTreeMap<(Uuid, String), Request> = BTreeMap::new();
    for event in events {
        let Some(trace) = event.envelope.trace_id.clone() else {
            continue;
        };
        let tenant = event.envelope.tenant_id;
        let r = by_trace
            .entry((tenant, trace.clone()))
            .or_insert_with(|| Request {
                tenant,
                trace,
                ..Request::default()
            });
        match &event.payload {
            Payload::RequestReceived(p) => {
                r.started = event.envelope.occurred_at;
                r.project = p.project_id.map(|p| p.to_string());
                r.user = p.user.clone();
                r.model.get_or_insert(p.model.clone());
            }
            Payload::RequestCompleted(p) => {
                if let Some(model) = &p.model {
                    r.model = Some(model.clone());
                }
                r.provider = p.provider.clone();
                r.status = Some(name_of(&p.status));
                r.error_class = p.error_class.clone();
                r.latency = p.latency_us;
                r.ttft = p.ttft_us;
                r.tokens_in = p.tokens_in.unwrap_or(0);
                r.tokens_out = p.tokens_out.unwrap_or(0);
                r.tokens_cached = p.tokens_cached_read.unwrap_or(0);
                r.cost = p.cost_micro_usd;
            }
            Payload::LlmCallCompleted(p) => {
                r.cache_saved += p.cache_saved_micro_usd.unwrap_or(0);
                let status = name_of(&p.status);
                let failed = (status != "ok").then(|| p.error_class.clone().unwrap_or(status));
                r.calls.push((
                    p.model.clone(),
                    p.provider.clone(),
                    p.deployment.clone(),
                    failed,
                    p.started_at,
                ));
            }
            Payload::ToolCallObserved(p) if p.direction == ToolCallDirection::Requested => {
                r.tool_calls += 1;
            }
            _ => {}
        }
    }
    by_trace.into_values().collect()
}

/// Nearest-rank percentile of sorted values.
fn exact(sorted: &[i64], q: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// Checks `metrics` against a brute-force count of `requests` (completed ones).
fn check(metrics: &Metrics, requests: &[&Request], context: &str) {
    let done: Vec<&&Request> = requests.iter().filter(|r| r.status.is_some()).collect();
    let sum = |f: fn(&Request) -> i64| done.iter().map(|r| f(r)).sum::<i64>();
    assert_eq!(metrics.requests, done.len() as i64, "{context}: requests");
    let errors = done
        .iter()
        .filter(|r| r.status.as_deref() != Some("ok"))
        .count() as i64;
    assert_eq!(metrics.errors, errors, "{context}: errors");
    assert_eq!(metrics.tokens_in, sum(|r| r.tokens_in), "{context}");
    assert_eq!(metrics.tokens_out, sum(|r| r.tokens_out), "{context}");
    assert_eq!(metrics.tokens_cached, sum(|r| r.tokens_cached), "{context}");
    assert_eq!(
        metrics.cost_micro_usd,
        sum(|r| r.cost.unwrap_or(0)),
        "{context}"
    );
    assert_eq!(
        metrics.cache_savings_micro_usd,
        sum(|r| r.cache_saved),
        "{context}"
    );
    assert_eq!(metrics.tool_calls, sum(|r| r.tool_calls), "{context}");
    let mut latencies: Vec<i64> = done.iter().map(|r| r.latency).collect();
    latencies.sort_unstable();
    let mut ttfts: Vec<i64> = done.iter().filter_map(|r| r.ttft).collect();
    ttfts.sort_unstable();
    if !latencies.is_empty() {
        let avg = latencies.iter().sum::<i64>() as f64 / latencies.len() as f64 / 1e3;
        let got = metrics.latency_avg_ms.unwrap();
        assert!((got - avg).abs() < 1e-6, "{context}: avg {got} vs {avg}");
    }
    let percentiles = [
        (metrics.latency_p50_ms, &latencies, 0.5),
        (metrics.latency_p95_ms, &latencies, 0.95),
        (metrics.latency_p99_ms, &latencies, 0.99),
        (metrics.ttft_p50_ms, &ttfts, 0.5),
        (metrics.ttft_p95_ms, &ttfts, 0.95),
    ];
    for (got, values, q) in percentiles {
        match (got, exact(values, q)) {
            (None, None) => {}
            (Some(got), Some(exact)) => {
                let got_us = (got * 1e3).round() as i64;
                assert!(
                    (got_us - exact).abs() <= percentile_error_bound_us(exact),
                    "{context}: q{q} {got_us} µs vs exact {exact} µs"
                );
            }
            other => panic!("{context}: q{q}: {other:?}"),
        }
    }
}

/// The read models of a history, folded by a replay, on SQLite or Postgres.
struct Folded {
    analytics: Analytics,
    location: StoreLocation,
    database: Option<TestDatabase>,
    _dir: tempfile::TempDir,
}

async fn fold(events: &[Event], postgres: bool) -> Folded {
    let dir = tempfile::tempdir().unwrap();
    let log = common::log_of(&dir.path().join("log"), events).await;
    let (location, database) = if postgres {
        let database = TestDatabase::create().await;
        (
            StoreLocation::Postgres(database.url.clone().into()),
            Some(database),
        )
    } else {
        (StoreLocation::Sqlite(dir.path().join("read-models")), None)
    };
    replay(log, None, &location, ProjectorConfig::default(), false)
        .await
        .unwrap();
    Folded {
        analytics: Analytics::new(location.clone()),
        location,
        database,
        _dir: dir,
    }
}

/// Three stretches of traffic of three tenants around New York's fall-back night
/// (2026-11-01 06:00 UTC).
fn history() -> (Vec<Uuid>, Vec<Event>) {
    let keys = samples::tenant_keys(3).unwrap();
    let mut events = Vec::new();
    for (seed, start) in [
        (1, "2026-10-31T22:00:00Z"),
        (2, "2026-11-01T04:30:00Z"),
        (3, "2026-11-02T03:00:00Z"),
    ] {
        events.extend(samples::history(&keys, 600, at(start), seed).unwrap());
    }
    (keys.iter().map(|k| k.tenant_id).collect(), events)
}

fn question(scope: Scope, from: &str, to: &str, filters: Filters) -> Question {
    Question {
        scope,
        window: Window {
            from_us: at(from),
            to_us: at(to),
        },
        filters,
    }
}

/// A request's value of a dimension, as a breakdown groups it.
fn value_of(r: &Request, by: Dimension) -> Option<String> {
    match by {
        Dimension::Model => r.model.clone(),
        Dimension::Provider => r.provider.clone(),
        Dimension::Project => r.project.clone(),
        Dimension::User => r.user.clone(),
        Dimension::Status => r.status.clone(),
        Dimension::ErrorClass => r.error_class.clone(),
        Dimension::Tenant => Some(r.tenant.to_string()),
        other => panic!("no brute-force value of {other:?}"),
    }
}

/// Checks a breakdown against a brute-force count of each of its groups.
fn check_breakdown(
    groups: &[(Option<String>, Stats)],
    requests: &[&Request],
    by: Dimension,
    context: &str,
) {
    let done = requests.iter().filter(|r| r.status.is_some()).count() as i64;
    assert_eq!(
        groups.iter().map(|(_, s)| s.requests).sum::<i64>(),
        done,
        "{context}: every request in a group"
    );
    for (value, stats) in groups {
        let members: Vec<&Request> = requests
            .iter()
            .copied()
            .filter(|r| &value_of(r, by) == value)
            .collect();
        check(
            &stats.metrics(),
            &members,
            &format!("{context} {by:?}={value:?}"),
        );
    }
}

fn within<'a>(requests: &'a [Request], q: &Question) -> Vec<&'a Request> {
    requests
        .iter()
        .filter(|r| r.started >= q.window.from_us && r.started < q.window.to_us)
        .filter(|r| match q.scope {
            Scope::Tenant(t) => r.tenant == t,
            Scope::AllTenants => true,
        })
        .filter(|r| {
            let f = &q.filters;
            f.project
                .as_ref()
                .is_none_or(|p| r.project.as_ref() == Some(p))
                && f.user.as_ref().is_none_or(|u| r.user.as_ref() == Some(u))
                && f.model.as_ref().is_none_or(|m| r.model.as_ref() == Some(m))
                && f.provider
                    .as_ref()
                    .is_none_or(|p| r.provider.as_ref() == Some(p))
                && match f.status.as_deref() {
                    None => true,
                    Some("failed") => r.status.as_deref().is_some_and(|s| s != "ok"),
                    Some(s) => r.status.as_deref() == Some(s),
                }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analytics_equal_a_brute_force_count_over_the_same_history() {
    let (tenants, events) = history();
    let all = requests(&events);
    for postgres in [false, true] {
        let folded = fold(&events, postgres).await;
        let analytics = &folded.analytics;
        let backend = if postgres { "postgres" } else { "sqlite" };

        // Totals, now and in the window before, for everyone and for one tenant with filters.
        let everyone = question(
            Scope::AllTenants,
            "2026-11-01T12:00:00Z",
            "2026-11-02T12:00:00Z",
            Filters::default(),
        );
        let (now, before) = analytics.summary(&everyone).await.unwrap();
        check(&now.metrics(), &within(&all, &everyone), backend);
        let previous = Question {
            window: everyone.window.previous(),
            ..everyone.clone()
        };
        check(&before.metrics(), &within(&all, &previous), backend);
        assert!(now.metrics().requests > 0 && before.metrics().requests > 0);

        let tenant = tenants[1];
        let project = all
            .iter()
            .find(|r| r.tenant == tenant)
            .unwrap()
            .project
            .clone();
        for filters in [
            Filters {
                project: project.clone(),
                ..Filters::default()
            },
            Filters {
                model: Some("claude-sonnet-4".into()),
                user: Some("user-3".into()),
                ..Filters::default()
            },
            Filters {
                status: Some("failed".into()),
                ..Filters::default()
            },
            Filters {
                status: Some("denied".into()),
                ..Filters::default()
            },
            Filters {
                provider: Some("openai".into()),
                ..Filters::default()
            },
        ] {
            let q = question(
                Scope::Tenant(tenant),
                "2026-10-31T00:00:00Z",
                "2026-11-03T00:00:00Z",
                filters.clone(),
            );
            let (got, _) = analytics.summary(&q).await.unwrap();
            check(
                &got.metrics(),
                &within(&all, &q),
                &format!("{backend} {filters:?}"),
            );
        }
        // Another tenant's filter value finds nothing of this one.
        let stranger = question(
            Scope::Tenant(tenants[0]),
            "2026-10-31T00:00:00Z",
            "2026-11-03T00:00:00Z",
            Filters {
                project,
                ..Filters::default()
            },
        );
        assert_eq!(analytics.summary(&stranger).await.unwrap().0.requests, 0);

        // Hours in New York through the hour the clocks repeat: UTC hours, labelled locally.
        let new_york: Tz = "America/New_York".parse().unwrap();
        let q = question(
            Scope::AllTenants,
            "2026-11-01T04:00:00Z",
            "2026-11-01T09:00:00Z",
            Filters::default(),
        );
        let series = analytics
            .series(&q, Unit::Hour, new_york, &METRICS)
            .await
            .unwrap();
        let labels: Vec<String> = series
            .iter()
            .map(|(s, _)| rfc3339_in(*s, new_york))
            .collect();
        assert_eq!(
            labels,
            [
                "2026-11-01T00:00:00-04:00",
                "2026-11-01T01:00:00-04:00",
                "2026-11-01T01:00:00-05:00",
                "2026-11-01T02:00:00-05:00",
                "2026-11-01T03:00:00-05:00"
            ]
        );
        for (start, stats) in &series {
            let hour: Vec<&Request> = within(&all, &q)
                .into_iter()
                .filter(|r| r.started - r.started.rem_euclid(3_600_000_000) == *start)
                .collect();
            check(&stats.metrics(), &hour, &format!("{backend} hour {start}"));
        }

        // Days in Kolkata (+05:30) and in New York (a 25-hour day), every request in one.
        for zone in ["Asia/Kolkata", "America/New_York"] {
            let tz: Tz = zone.parse().unwrap();
            let q = question(
                Scope::Tenant(tenant),
                "2026-10-31T00:00:00Z",
                "2026-11-03T00:00:00Z",
                Filters::default(),
            );
            let days = analytics.series(&q, Unit::Day, tz, &METRICS).await.unwrap();
            let mut expected: BTreeMap<String, Vec<&Request>> = BTreeMap::new();
            for r in within(&all, &q) {
                let local = tz.timestamp_micros(r.started).unwrap();
                expected
                    .entry(local.date_naive().to_string())
                    .or_default()
                    .push(r);
            }
            for (start, stats) in &days {
                let local = tz.timestamp_micros(*start).unwrap();
                assert_eq!((local.hour(), local.minute()), (0, 0), "{zone}");
                let day = local.date_naive().to_string();
                let requests = expected.remove(&day).unwrap_or_default();
                check(
                    &stats.metrics(),
                    &requests,
                    &format!("{backend} {zone} {day}"),
                );
            }
            assert!(expected.is_empty(), "{zone}: days left out: {expected:?}");
        }

        // Breakdowns: by user for everyone, by model for one tenant.
        let q = question(
            Scope::AllTenants,
            "2026-10-31T00:00:00Z",
            "2026-11-03T00:00:00Z",
            Filters::default(),
        );
        let groups = analytics
            .breakdown(&q, Dimension::User, &METRICS, 100)
            .await
            .unwrap();
        assert_eq!(groups.len(), 5);
        for (user, stats) in &groups {
            let requests: Vec<&Request> = within(&all, &q)
                .into_iter()
                .filter(|r| &r.user == user)
                .collect();
            check(
                &stats.metrics(),
                &requests,
                &format!("{backend} user {user:?}"),
            );
        }
        let requests: Vec<i64> = groups.iter().map(|(_, s)| s.requests).collect();
        assert!(requests.is_sorted_by(|a, b| a >= b), "most requested first");
        let by_model = analytics
            .breakdown(
                &Question {
                    scope: Scope::Tenant(tenant),
                    ..q.clone()
                },
                Dimension::Model,
                &["requests"],
                1,
            )
            .await
            .unwrap();
        assert_eq!(by_model.len(), 1, "limit");

        // Windows whose edges fall inside hours: whole days and hours from the rollups, the
        // rest from the traces.
        let odd = question(
            Scope::Tenant(tenant),
            "2026-10-31T22:17:05Z",
            "2026-11-02T04:41:00Z",
            Filters::default(),
        );
        let (now, before) = analytics.summary(&odd).await.unwrap();
        check(
            &now.metrics(),
            &within(&all, &odd),
            &format!("{backend} odd"),
        );
        let previous = Question {
            window: odd.window.previous(),
            ..odd.clone()
        };
        check(
            &before.metrics(),
            &within(&all, &previous),
            &format!("{backend} odd before"),
        );
        for by in [
            Dimension::Model,
            Dimension::Provider,
            Dimension::Status,
            Dimension::ErrorClass,
            Dimension::User,
        ] {
            let groups = analytics.breakdown(&odd, by, &METRICS, 100).await.unwrap();
            check_breakdown(&groups, &within(&all, &odd), by, &format!("{backend} odd"));
        }
        let everyone_odd = Question {
            scope: Scope::AllTenants,
            ..odd.clone()
        };
        let groups = analytics
            .breakdown(&everyone_odd, Dimension::Tenant, &METRICS, 100)
            .await
            .unwrap();
        assert_eq!(groups.len(), 3);
        check_breakdown(
            &groups,
            &within(&all, &everyone_odd),
            Dimension::Tenant,
            backend,
        );
        let failed = Question {
            filters: Filters {
                status: Some("failed".into()),
                ..Filters::default()
            },
            ..odd.clone()
        };
        let groups = analytics
            .breakdown(&failed, Dimension::Status, &METRICS, 100)
            .await
            .unwrap();
        check_breakdown(&groups, &within(&all, &failed), Dimension::Status, backend);

        // The most expensive requests, and the latest.
        let top = analytics.top(&q, TopBy::Cost, 5).await.unwrap();
        let mut costs: Vec<i64> = within(&all, &q).iter().filter_map(|r| r.cost).collect();
        costs.sort_unstable_by(|a, b| b.cmp(a));
        let got: Vec<i64> = top.iter().map(|r| r.cost_micro_usd.unwrap()).collect();
        assert_eq!(got, costs[..5]);
        let recent = analytics.recent(&q, 3).await.unwrap();
        let mut latest = within(&all, &q);
        latest.sort_by_key(|r| std::cmp::Reverse((r.started, r.trace.clone())));
        let expected: Vec<&str> = latest[..3].iter().map(|r| r.trace.as_str()).collect();
        let got: Vec<&str> = recent.iter().map(|r| r.trace_id.as_str()).collect();
        assert_eq!(got, expected);

        // Errors: of requests by model, and of upstream attempts by deployment.
        let report = analytics.errors(&q).await.unwrap();
        let requests = within(&all, &q);
        let failed: Vec<&&Request> = requests
            .iter()
            .filter(|r| r.status.as_deref().is_some_and(|s| s != "ok"))
            .collect();
        assert_eq!(report.errors, failed.len() as i64);
        assert_eq!(report.requests, requests.len() as i64);
        let mut classes: HashMap<String, i64> = HashMap::new();
        for r in &failed {
            let class = r.error_class.clone().or(r.status.clone()).unwrap();
            *classes.entry(class).or_default() += 1;
        }
        let mut got: HashMap<String, i64> = HashMap::new();
        for group in &report.by_model {
            for (class, n) in &group.classes {
                *got.entry(class.clone()).or_default() += n;
            }
        }
        assert_eq!(got, classes);
        let calls: Vec<_> = requests.iter().flat_map(|r| r.calls.iter()).collect();
        let upstream_total: i64 = report.upstreams.iter().map(|g| g.total).sum();
        let upstream_errors: i64 = report.upstreams.iter().map(|g| g.errors).sum();
        assert_eq!(upstream_total, calls.len() as i64);
        assert_eq!(
            upstream_errors,
            calls.iter().filter(|c| c.3.is_some()).count() as i64
        );
        assert!(report.upstreams.iter().all(|g| g.deployment.is_some()));

        // The rollups answer by themselves: with the traces gone, whole hours still add up.
        // And a database whose rollups began later (folded before they existed) counts the
        // earlier requests from the traces.
        let pool = loom_projector::Lookup::new(folded.location.clone())
            .store()
            .await
            .unwrap();
        let aligned = question(
            Scope::AllTenants,
            "2026-10-31T00:00:00Z",
            "2026-11-03T00:00:00Z",
            Filters::default(),
        );
        let since = at("2026-11-01T05:00:00.000001Z");
        sqlx::query("UPDATE rollups_since SET since_us = $1")
            .bind(since)
            .execute(pool.pool())
            .await
            .unwrap();
        sqlx::query("DELETE FROM rollups WHERE bucket_start < $1")
            .bind(since)
            .execute(pool.pool())
            .await
            .unwrap();
        let groups = analytics
            .breakdown(&aligned, Dimension::Model, &METRICS, 100)
            .await
            .unwrap();
        check_breakdown(
            &groups,
            &within(&all, &aligned),
            Dimension::Model,
            &format!("{backend} since"),
        );
        sqlx::query("UPDATE rollups_since SET since_us = 0")
            .execute(pool.pool())
            .await
            .unwrap();
        sqlx::query("DELETE FROM traces")
            .execute(pool.pool())
            .await
            .unwrap();
        let later = question(
            Scope::AllTenants,
            "2026-11-01T06:00:00Z",
            "2026-11-03T00:00:00Z",
            Filters::default(),
        );
        let (now, _) = analytics.summary(&later).await.unwrap();
        check(
            &now.metrics(),
            &within(&all, &later),
            &format!("{backend} without traces"),
        );
        assert!(now.requests > 0);

        if let Some(database) = folded.database {
            database.drop().await;
        }
    }
}

fn event(tenant: Uuid, trace: Option<&str>, at: i64, payload: Payload) -> Event {
    let mut envelope = Envelope::new(tenant, trace.map(str::to_owned), "test/alerts/1");
    envelope.occurred_at = at;
    Event { envelope, payload }
}

/// A request that ended in `class` without reaching an upstream, the policy having said `action`.
fn failed_request(
    tenant: Uuid,
    trace: &str,
    at: i64,
    action: PolicyAction,
    class: &str,
) -> Vec<Event> {
    let trace = Some(trace);
    vec![
        event(
            tenant,
            trace,
            at,
            RequestReceived {
                endpoint: "/v1/chat/completions".into(),
                project_id: None,
                api_key_id: None,
                user: None,
                model: "fast".into(),
                stream: false,
                user_agent: None,
                body_bytes: 10,
                body_digest: Vec::new(),
                body: None,
            }
            .into(),
        ),
        event(
            tenant,
            trace,
            at + 50,
            PolicyEvaluated {
                project_id: None,
                action,
                findings: Vec::new(),
                latency_us: 30,
                direction: "prompt".into(),
            }
            .into(),
        ),
        event(
            tenant,
            trace,
            at + 1_000,
            RequestCompleted {
                status: if action == PolicyAction::Block {
                    RequestStatus::Denied
                } else {
                    RequestStatus::Error
                },
                http_status: if action == PolicyAction::Block {
                    400
                } else {
                    502
                },
                error_class: Some(class.into()),
                model: None,
                provider: None,
                deployment: None,
                attempts: 0,
                tokens_in: None,
                tokens_out: None,
                tokens_cached_read: None,
                tokens_cache_creation: None,
                usage_estimated: false,
                cost_micro_usd: None,
                latency_us: 1_000,
                ttft_us: None,
                overhead_us: 1_000,
            }
            .into(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_report_spikes_failing_upstreams_quotas_and_policy_blocks() {
    // The last half hour: a tenant's traffic (its usual retries and failures), two requests
    // the policy blocked, and a quota it has used up.
    let keys = samples::tenant_keys(1).unwrap();
    let tenant = keys[0].tenant_id;
    let now = now_micros();
    let mut events = samples::history(&keys, 240, now - 30 * 60_000_000, 9).unwrap();
    // Two requests the policy blocked, then, in the last two minutes, 30 that failed: a spike.
    for n in 0..2 {
        events.extend(failed_request(
            tenant,
            &format!("blocked-{n}"),
            now - 60_000_000,
            PolicyAction::Block,
            "policy_blocked",
        ));
    }
    for n in 0..30 {
        events.extend(failed_request(
            tenant,
            &format!("failed-{n}"),
            now - 120_000_000 + n,
            PolicyAction::Allow,
            "upstream_error",
        ));
    }
    // A daily request quota the tenant has used up (the blocked requests count: there is one
    // today unless the test runs in the first minute of a UTC day).
    let today = now - now.rem_euclid(86_400_000_000);
    let used_today = requests(&events)
        .iter()
        .filter(|r| r.status.is_some() && r.started >= today)
        .count() as i64;
    events.push(event(
        tenant,
        None,
        now - 1_000,
        QuotaLimitSet {
            scope: QuotaScope::Tenant,
            scope_id: tenant.to_string(),
            metric: QuotaMetric::Requests,
            window: QuotaWindow::Day,
            limit: Some(used_today),
        }
        .into(),
    ));
    let all = requests(&events);
    let folded = fold(&events, false).await;
    let alerts = folded
        .analytics
        .alerts(Scope::Tenant(tenant), &Default::default(), now)
        .await
        .unwrap();

    // A spike: 5 % or more of 20 or more requests of the last 15 minutes failed, at least twice
    // the rate of the day before.
    let rate_between = |from: i64, to: i64| {
        let done: Vec<&Request> = all
            .iter()
            .filter(|r| r.status.is_some() && r.started >= from && r.started < to)
            .collect();
        let failed = done
            .iter()
            .filter(|r| r.status.as_deref() != Some("ok"))
            .count();
        (done.len(), failed as f64 / done.len().max(1) as f64)
    };
    let recent_from = now - 15 * 60_000_000;
    let (n, rate) = rate_between(recent_from, now);
    let (_, baseline) = rate_between(recent_from - 86_400_000_000, recent_from);
    assert!(n >= 20 && rate >= 0.05 && rate >= 2.0 * baseline);
    let spike = alerts
        .iter()
        .find(|a| a.kind == "error_rate_spike")
        .unwrap_or_else(|| panic!("no spike: {alerts:?}"));
    assert!((spike.value - rate).abs() < 1e-9);
    assert_eq!(
        spike.severity,
        if rate >= 0.25 { "critical" } else { "warning" }
    );

    let quota = alerts
        .iter()
        .find(|a| a.kind == "quota_near_limit")
        .unwrap_or_else(|| panic!("no quota alert: {alerts:?}"));
    assert_eq!(quota.value, 1.0);
    assert_eq!(quota.severity, "critical");
    assert_eq!(quota.subject, format!("tenant:{tenant}"));

    let blocks = alerts.iter().find(|a| a.kind == "policy_blocks").unwrap();
    assert_eq!(blocks.value, 2.0);

    // Upstreams: the deployments at least 20 % of whose 5 or more attempts of the last 15
    // minutes failed.
    let mut by_deployment: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for call in all.iter().flat_map(|r| r.calls.iter()) {
        if call.4 >= now - 15 * 60_000_000 && call.4 < now {
            let entry = by_deployment.entry(call.2.clone()).or_default();
            entry.0 += 1;
            entry.1 += usize::from(call.3.is_some());
        }
    }
    let expected: Vec<String> = by_deployment
        .iter()
        .filter(|(_, (n, failed))| *n >= 5 && *failed as f64 / *n as f64 >= 0.2)
        .map(|(deployment, _)| deployment.clone())
        .collect();
    let mut failing: Vec<String> = alerts
        .iter()
        .filter(|a| a.kind == "upstream_failing")
        .map(|a| a.subject.clone())
        .collect();
    failing.sort();
    assert_eq!(failing, expected, "{by_deployment:?}");
    assert!(alerts.windows(2).all(|w| {
        let rank = |a: &loom_query::analytics::Alert| a.severity != "critical";
        rank(&w[0]) <= rank(&w[1])
    }));
}
