//! The upstream attempt loop: each deployment in the routed order gets `1 + retries` attempts
//! (429, 5xx, timeouts, connection errors), with backoff that `retry-after` overrides, under a
//! per-attempt and a total timeout. Every failed attempt is recorded as it happens.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use loom_schemas::event::now_micros;
use serde_json::Value;

use crate::error::{GatewayError, UpstreamFault};
use crate::flow::Flow;
use crate::providers::{Operation, adapter};
use crate::record::{CallRecord, call_event};

/// An upstream attempt's failure, classified.
#[derive(Debug)]
pub(crate) struct AttemptError {
    pub fault: UpstreamFault,
    pub http_status: Option<u16>,
    /// The upstream's own error body, passed to the client for non-retryable errors.
    pub body: Option<Bytes>,
    pub retry_after: Option<Duration>,
}

impl AttemptError {
    fn new(fault: UpstreamFault) -> AttemptError {
        AttemptError {
            fault,
            http_status: None,
            body: None,
            retry_after: None,
        }
    }

    fn from_status(status: StatusCode, headers: &HeaderMap, body: Bytes) -> AttemptError {
        let retry_after = headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        AttemptError {
            fault: UpstreamFault::for_status(status.as_u16()),
            http_status: Some(status.as_u16()),
            body: Some(body),
            retry_after,
        }
    }

    pub(crate) fn from_transport(error: &reqwest::Error) -> AttemptError {
        AttemptError::new(if error.is_timeout() {
            UpstreamFault::Timeout
        } else if error.is_connect() {
            UpstreamFault::Connect
        } else {
            UpstreamFault::Transport
        })
    }

    fn unsupported() -> AttemptError {
        AttemptError {
            http_status: Some(400),
            ..AttemptError::new(UpstreamFault::Unsupported)
        }
    }

    pub(crate) fn timeout() -> AttemptError {
        AttemptError::new(UpstreamFault::Timeout)
    }
}

/// A successful upstream answer, not yet read.
pub(crate) struct Answer {
    /// Taken by whoever reads the body.
    pub response: Option<reqwest::Response>,
    pub status: StatusCode,
    pub deployment: usize,
    pub attempt: i32,
    pub sent_at: Instant,
    pub started_at: i64,
    pub request_body: Bytes,
}

/// Tries the deployments in order, with retries and backoff, recording every attempt.
pub(crate) async fn call_upstream(
    flow: &mut Flow,
    order: &[usize],
    operation: Operation,
    body: &Value,
    stream: bool,
) -> Result<Answer, (AttemptError, Option<usize>)> {
    let gateway = Arc::clone(&flow.gateway);
    let routing = &gateway.config.routing;
    let deadline = flow.started + routing.total_timeout;
    let mut last: Option<(AttemptError, usize)> = None;
    for &deployment_index in order {
        let deployment = &gateway.config.deployments[deployment_index];
        let upstream = &gateway.config.upstreams[deployment.upstream];
        let target = &deployment.target;
        // The body is the same for every attempt on a deployment (a JSON value always
        // serializes).
        let request_body = target.url(operation).and_then(|url| {
            let body = adapter(upstream.kind).body(operation, &deployment.model, body);
            Some((url, body.ok()?))
        });
        let Some((url, request_body)) = request_body else {
            last = Some((AttemptError::unsupported(), deployment_index));
            continue;
        };
        let request_body = Bytes::from(request_body);
        let mut backoff = routing.backoff;
        for retry in 0..=routing.retries {
            if retry > 0 {
                let wait = last
                    .as_ref()
                    .and_then(|(e, _)| e.retry_after)
                    .map_or(backoff, |after| after.min(Duration::from_secs(10)));
                if Instant::now() + wait >= deadline {
                    break;
                }
                tokio::time::sleep(wait).await;
                flow.outside += wait;
                backoff *= 2;
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err(last.map_or((AttemptError::timeout(), None), |(e, d)| (e, Some(d))));
            }
            flow.attempts += 1;
            let attempt = flow.attempts;
            let request = gateway
                .http
                .post(url.clone())
                .headers(target.headers.clone())
                .header(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                )
                .body(request_body.clone());
            let started_at = now_micros();
            let sent_at = Instant::now();
            let timeout = routing.attempt_timeout.min(remaining);
            let result = tokio::time::timeout(timeout, request.send()).await;
            let outcome = match result {
                Err(_) => Err(AttemptError::timeout()),
                Ok(Err(error)) => Err(AttemptError::from_transport(&error)),
                Ok(Ok(response)) if response.status().is_success() => Ok(response),
                Ok(Ok(response)) => {
                    let status = response.status();
                    let headers = response.headers().clone();
                    let body = tokio::time::timeout(timeout, response.bytes())
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_default();
                    Err(AttemptError::from_status(status, &headers, body))
                }
            };
            match outcome {
                Ok(response) => {
                    return Ok(Answer {
                        status: StatusCode::from_u16(response.status().as_u16())
                            .unwrap_or(StatusCode::OK),
                        response: Some(response),
                        deployment: deployment_index,
                        attempt,
                        sent_at,
                        started_at,
                        request_body: request_body.clone(),
                    });
                }
                Err(error) => {
                    let latency = sent_at.elapsed();
                    flow.outside += latency;
                    let call = CallRecord::failed(
                        deployment_index,
                        attempt,
                        started_at,
                        latency,
                        &error,
                        stream,
                        &request_body,
                    );
                    gateway.emitter.emit(call_event(flow, call)).await;
                    let retryable = error.fault.retryable();
                    last = Some((error, deployment_index));
                    if !retryable {
                        return Err(
                            last.map_or((AttemptError::timeout(), None), |(e, d)| (e, Some(d)))
                        );
                    }
                }
            }
        }
        gateway.cool_down(deployment_index);
    }
    Err(last.map_or((AttemptError::timeout(), None), |(e, d)| (e, Some(d))))
}

impl AttemptError {
    /// What the client is told when this was the last attempt.
    pub fn to_client(&self) -> GatewayError {
        match (self.fault, self.http_status) {
            (UpstreamFault::Timeout, _) => GatewayError::UpstreamTimeout,
            (fault, Some(status)) if !fault.retryable() => {
                let message = self
                    .body
                    .as_ref()
                    .and_then(|b| serde_json::from_slice::<Value>(b).ok())
                    .and_then(|v| {
                        v.pointer("/error/message")
                            .and_then(Value::as_str)
                            .map(str::to_owned)
                    })
                    .unwrap_or_else(|| {
                        format!("the upstream refused the request ({})", fault.name())
                    });
                GatewayError::UpstreamRefused {
                    status,
                    fault,
                    message,
                }
            }
            (fault, _) => GatewayError::UpstreamFailed { fault },
        }
    }
}
