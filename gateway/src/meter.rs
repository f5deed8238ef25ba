//! What the data plane counts for `/metrics`: requests and their latency, overhead, TTFT and
//! tokens by model, provider and deployment; upstream attempts and their errors by class; quota
//! denials and policy actions.
//!
//! Labels come from the configuration (deployments, their model and provider) or from short
//! fixed lists, never from what a client sent, so the number of series stays bounded. The
//! handles of each deployment are registered once: the request path only increments them.

use std::collections::HashMap;
use std::time::Duration;

use loom_schemas::event::{PolicyAction, QuotaMetric, QuotaScope, RequestStatus};
use metrics::{Counter, Histogram};

use crate::config::GatewayConfig;

/// The label value of requests that reached no deployment (refused, or an unknown model).
const NONE: &str = "none";

/// Every request status, in the order of [`status_index`].
const STATUSES: [RequestStatus; 4] = [
    RequestStatus::Ok,
    RequestStatus::Error,
    RequestStatus::ClientCancelled,
    RequestStatus::Denied,
];

fn status_index(status: RequestStatus) -> usize {
    match status {
        RequestStatus::Ok => 0,
        RequestStatus::Error => 1,
        RequestStatus::ClientCancelled => 2,
        RequestStatus::Denied => 3,
    }
}

pub(crate) fn status_name(status: RequestStatus) -> &'static str {
    match status {
        RequestStatus::Ok => "ok",
        RequestStatus::Error => "error",
        RequestStatus::ClientCancelled => "client_cancelled",
        RequestStatus::Denied => "denied",
    }
}

/// The handles of one deployment (or of requests served by none).
struct Served {
    requests: [Counter; 4],
    duration: Histogram,
    overhead: Histogram,
    ttft: Histogram,
    tokens_in: Counter,
    tokens_out: Counter,
    attempts_ok: Counter,
    attempt_duration: Histogram,
    labels: [(&'static str, String); 3],
}

impl Served {
    fn new(model: &str, provider: &str, deployment: &str) -> Served {
        let labels = [
            ("model", model.to_owned()),
            ("provider", provider.to_owned()),
            ("deployment", deployment.to_owned()),
        ];
        let requests = STATUSES.map(|status| {
            let mut with_status = labels.to_vec();
            with_status.push(("status", status_name(status).to_owned()));
            metrics::counter!("loom_requests_total", &with_status)
        });
        let tokens = |direction: &'static str| {
            let mut with_direction = labels.to_vec();
            with_direction.push(("direction", direction.to_owned()));
            metrics::counter!("loom_tokens_total", &with_direction)
        };
        let upstream = &labels[1..];
        let mut attempt_ok = upstream.to_vec();
        attempt_ok.push(("outcome", "ok".to_owned()));
        Served {
            requests,
            duration: metrics::histogram!("loom_request_duration_seconds", &labels),
            overhead: metrics::histogram!("loom_request_overhead_seconds", &labels),
            ttft: metrics::histogram!("loom_request_ttft_seconds", &labels),
            tokens_in: tokens("in"),
            tokens_out: tokens("out"),
            attempts_ok: metrics::counter!("loom_upstream_attempts_total", &attempt_ok),
            attempt_duration: metrics::histogram!("loom_upstream_duration_seconds", upstream),
            labels,
        }
    }
}

/// How a request ended, as the meter sees it.
pub(crate) struct Ended<'a> {
    pub deployment: Option<&'a str>,
    pub status: RequestStatus,
    pub latency: Duration,
    pub overhead: Duration,
    pub ttft: Option<Duration>,
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
}

/// The data plane's metrics, registered for the configured deployments.
pub(crate) struct Meter {
    deployments: HashMap<Box<str>, Served>,
    unserved: Served,
}

impl Meter {
    pub(crate) fn new(config: &GatewayConfig) -> Meter {
        let deployments = config
            .deployments
            .iter()
            .map(|d| {
                let provider = config.upstreams[d.upstream].kind.name();
                (
                    d.name.clone().into(),
                    Served::new(&d.model, provider, &d.name),
                )
            })
            .collect();
        Meter {
            deployments,
            unserved: Served::new(NONE, NONE, NONE),
        }
    }

    fn served(&self, deployment: Option<&str>) -> &Served {
        deployment
            .and_then(|name| self.deployments.get(name))
            .unwrap_or(&self.unserved)
    }

    /// A request ended (`request.completed`).
    pub(crate) fn request(&self, ended: &Ended<'_>) {
        let served = self.served(ended.deployment);
        served.requests[status_index(ended.status)].increment(1);
        served.duration.record(ended.latency.as_secs_f64());
        served.overhead.record(ended.overhead.as_secs_f64());
        if let Some(ttft) = ended.ttft {
            served.ttft.record(ttft.as_secs_f64());
        }
        let count = |tokens: Option<i64>| tokens.and_then(|t| u64::try_from(t).ok()).unwrap_or(0);
        served.tokens_in.increment(count(ended.tokens_in));
        served.tokens_out.increment(count(ended.tokens_out));
    }

    /// An upstream attempt ended (`llm_call.completed`).
    pub(crate) fn attempt(&self, deployment: &str, latency: Duration, attempted: Attempted<'_>) {
        let served = self.served(Some(deployment));
        served.attempt_duration.record(latency.as_secs_f64());
        let [_, provider, deployment] = &served.labels;
        // Anything but an answer is the rare case: its series are looked up when it happens.
        let outcome = match attempted {
            Attempted::Answered => return served.attempts_ok.increment(1),
            Attempted::ClientLeft => "client_cancelled",
            Attempted::Failed(class) => {
                let labels = [
                    provider.clone(),
                    deployment.clone(),
                    ("class", class.to_owned()),
                ];
                metrics::counter!("loom_upstream_errors_total", &labels).increment(1);
                class
            }
        };
        let labels = [
            provider.clone(),
            deployment.clone(),
            ("outcome", outcome.to_owned()),
        ];
        metrics::counter!("loom_upstream_attempts_total", &labels).increment(1);
    }
}

/// How an upstream attempt ended.
#[derive(Clone, Copy)]
pub(crate) enum Attempted<'a> {
    Answered,
    /// The client hung up before the upstream answered in full.
    ClientLeft,
    /// An error of this class (`rate_limited`, `timeout`, `server_error`, …).
    Failed(&'a str),
}

/// A request refused by a quota.
pub(crate) fn quota_denied(scope: QuotaScope, metric: QuotaMetric) {
    let metric = match metric {
        QuotaMetric::Requests => "requests",
        QuotaMetric::Tokens => "tokens",
        QuotaMetric::CostMicroUsd => "cost",
    };
    metrics::counter!("loom_quota_denials_total", "scope" => scope.name(), "metric" => metric)
        .increment(1);
}

/// What a policy did with a prompt (`output` false) or an answer.
pub(crate) fn policy_action(output: bool, action: PolicyAction) {
    let action = match action {
        PolicyAction::Allow => "allow",
        PolicyAction::Redact => "redact",
        PolicyAction::Block => "block",
        PolicyAction::Flag => "flag",
    };
    let direction = if output { "output" } else { "prompt" };
    metrics::counter!("loom_policy_actions_total", "action" => action, "direction" => direction)
        .increment(1);
}
