//! The upstream attempt loop: each deployment in the routed order gets its request built once (as
//! the client sent it, or translated to its API) and `1 + retries` attempts (429, 5xx, timeouts,
//! connection errors), with backoff that `retry-after` overrides, under a per-attempt and a total
//! timeout. Every failed attempt is recorded as it happens.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use loom_schemas::event::now_micros;
use serde_json::Value;

use crate::body::ClientBody;
use crate::config::UnsupportedFields;
use crate::error::{GatewayError, UpstreamFault};
use crate::flow::Flow;
use crate::providers::{Operation, adapter, with_model};
use crate::record::{Attempt, CallRecord, call_event};
use crate::translate::{Dropped, Leg};

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

    /// A request the deployment cannot be sent, with what the client is told.
    fn refused(message: String) -> AttemptError {
        let body = serde_json::json!({"error": {"message": message}}).to_string();
        AttemptError {
            body: Some(Bytes::from(body)),
            ..AttemptError::unsupported()
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
    /// In which API the upstream answers.
    pub leg: Leg,
    /// What the request's translation could not carry.
    pub dropped: Vec<String>,
    pub attempt: i32,
    pub sent_at: Instant,
    pub started_at: i64,
    pub request_body: Bytes,
}

impl Answer {
    pub fn attempt(&self) -> Attempt<'_> {
        Attempt {
            deployment: self.deployment,
            number: self.attempt,
            started_at: self.started_at,
            request_body: &self.request_body,
            dropped: &self.dropped,
        }
    }
}

/// What is sent to each deployment tried.
#[derive(Clone, Copy)]
pub(crate) enum Outgoing<'a> {
    /// A client's `operation` request: as sent (model rewritten) to deployments that speak its
    /// API, translated to those that do not.
    Request {
        operation: Operation,
        body: &'a ClientBody,
    },
    /// A `GET` or `DELETE` of a response stored at the deployment: `segments` follow
    /// `/responses/` (the id, then `input_items`), `query` is the client's query string.
    Stored {
        method: &'a Method,
        segments: &'a [&'a str],
        query: Option<&'a str>,
    },
}

/// One deployment's request, built once for all its attempts.
struct Prepared {
    leg: Leg,
    method: Method,
    url: reqwest::Url,
    headers: HeaderMap,
    body: Bytes,
    dropped: Vec<String>,
}

/// Why a deployment is not even tried.
enum Skip {
    /// It does not offer the operation.
    Unsupported,
    /// A field of the request cannot be sent to it.
    Refused(String),
}

fn prepare(flow: &Flow, index: usize, outgoing: Outgoing<'_>) -> Result<Prepared, Skip> {
    let config = &flow.gateway.config;
    let deployment = &config.deployments[index];
    let upstream = &config.upstreams[deployment.upstream];
    // The tenant's or project's own credential, if it has one for this upstream.
    let own = flow.credential_target(index).map_err(Skip::Refused)?;
    let target = own.as_deref().unwrap_or(&deployment.target);
    let (operation, body) = match outgoing {
        Outgoing::Request { operation, body } => (operation, body),
        Outgoing::Stored {
            method,
            segments,
            query,
        } => {
            let mut url = target
                .url(Operation::Responses)
                .ok_or(Skip::Unsupported)?
                .clone();
            url.path_segments_mut()
                .map_err(|()| Skip::Unsupported)?
                .extend(segments);
            url.set_query(query);
            let leg = Leg {
                client: Operation::Responses,
                upstream: Operation::Responses,
            };
            let mut headers = target.headers.clone();
            for (name, value) in &flow.forwarded {
                headers.insert(name, value.clone());
            }
            return Ok(Prepared {
                leg,
                method: method.clone(),
                url,
                headers,
                body: Bytes::new(),
                dropped: Vec::new(),
            });
        }
    };
    let leg = Leg::to(adapter(upstream.kind), operation).ok_or(Skip::Unsupported)?;
    let url = target.url(leg.upstream).ok_or(Skip::Unsupported)?.clone();
    let mut headers = target.headers.clone();
    let translated = leg.request(&body.json).map_err(|unservable| {
        Skip::Refused(format!(
            "`{}` cannot be sent to {}: it {}",
            unservable.field, deployment.name, unservable.reason
        ))
    })?;
    let (request_body, dropped) = match translated {
        None => {
            for (name, value) in &flow.forwarded {
                headers.insert(name, value.clone());
            }
            (body.native(&deployment.model), Dropped::default())
        }
        Some((translated, mut dropped)) => {
            for name in flow.forwarded.keys() {
                if !name.as_str().ends_with("-version") {
                    dropped.note(|| format!("header {name}"));
                }
            }
            if let Some(field) = dropped
                .first()
                .filter(|_| config.unsupported_fields == UnsupportedFields::Reject)
            {
                return Err(Skip::Refused(format!(
                    "`{field}` cannot be sent to {}: its API has no equivalent \
                     (translation.unsupported_fields = \"reject\")",
                    deployment.name
                )));
            }
            let sent = with_model(&translated, &deployment.model)
                .ok()
                .map(Bytes::from);
            (sent, dropped)
        }
    };
    Ok(Prepared {
        leg,
        method: Method::POST,
        url,
        headers,
        body: request_body.ok_or(Skip::Unsupported)?,
        dropped: dropped.into_paths(),
    })
}

/// Tries the deployments in order, with retries and backoff, recording every attempt.
pub(crate) async fn call_upstream(
    flow: &mut Flow,
    order: &[usize],
    outgoing: Outgoing<'_>,
    stream: bool,
) -> Result<Answer, (AttemptError, Option<usize>)> {
    let gateway = Arc::clone(&flow.gateway);
    let routing = &gateway.config.routing;
    let deadline = flow.started + routing.total_timeout;
    let mut last: Option<(AttemptError, usize)> = None;
    for &deployment_index in order {
        let prepared = match prepare(flow, deployment_index, outgoing) {
            Ok(prepared) => prepared,
            Err(skip) => {
                // A deployment passed over says why only if no attempt failed for real.
                if last
                    .as_ref()
                    .is_none_or(|(e, _)| e.fault == UpstreamFault::Unsupported)
                {
                    let error = match skip {
                        Skip::Unsupported => AttemptError::unsupported(),
                        Skip::Refused(message) => AttemptError::refused(message),
                    };
                    last = Some((error, deployment_index));
                }
                continue;
            }
        };
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
            let mut request = gateway
                .http
                .request(prepared.method.clone(), prepared.url.clone())
                .headers(prepared.headers.clone());
            if let (Some(spans), Some(span)) = (&gateway.spans, &flow.span) {
                request = request.headers(span.upstream_headers(spans, attempt));
            }
            if prepared.method == Method::POST {
                request = request
                    .header(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )
                    .body(prepared.body.clone());
            }
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
                        leg: prepared.leg,
                        dropped: prepared.dropped,
                        attempt,
                        sent_at,
                        started_at,
                        request_body: prepared.body,
                    });
                }
                Err(error) => {
                    let latency = sent_at.elapsed();
                    flow.outside += latency;
                    let sent = Attempt {
                        deployment: deployment_index,
                        number: attempt,
                        started_at,
                        request_body: &prepared.body,
                        dropped: &prepared.dropped,
                    };
                    let call = CallRecord::failed(sent, latency, &error, stream);
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
