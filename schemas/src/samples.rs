//! Realistic sample events, one of every type, for tests and benchmarks.

use uuid::Uuid;

use crate::crypto::{self, CryptoError, DataKey, FieldContext, KeyBytes};
use crate::event::*;

/// A chat request body of about `len` bytes, shaped like what SDKs send.
pub fn chat_body(len: usize) -> Vec<u8> {
    let mut content = String::with_capacity(len);
    let words = [
        "the", "gateway", "records", "every", "request", "as", "an", "event", "on", "log",
    ];
    let mut i = 0;
    while content.len() + 120 < len {
        content.push_str(words[i % words.len()]);
        content.push(' ');
        i += 1;
    }
    format!(
        r#"{{"model":"gpt-4o-mini","messages":[{{"role":"system","content":"You are helpful."}},{{"role":"user","content":"{content}"}}],"stream":false}}"#
    )
    .into_bytes()
}

fn sealed(key: &DataKey, event_id: Uuid, field: &str, body: &[u8]) -> Result<Sealed, CryptoError> {
    let ctx = FieldContext {
        tenant_id: key.tenant_id,
        event_id,
        field,
    };
    crypto::seal(key, &ctx, body)
}

/// An `llm_call.completed` with request and response bodies of `body_len` bytes each, sealed.
pub fn llm_call_completed(
    key: &DataKey,
    trace_id: &str,
    body_len: usize,
) -> Result<Event, CryptoError> {
    let envelope = Envelope::new(key.tenant_id, Some(trace_id.to_owned()), "gateway/bench/1");
    let body = chat_body(body_len);
    let payload = LlmCallCompleted {
        attempt: 1,
        deployment: "openai-primary".into(),
        provider: "openai".into(),
        model: "gpt-4o-mini-2024-07-18".into(),
        status: CallStatus::Ok,
        http_status: Some(200),
        error_class: None,
        stream: true,
        started_at: envelope.occurred_at - 850_000,
        latency_us: 850_000,
        ttft_us: Some(210_000),
        tokens_in: Some(412),
        tokens_out: Some(187),
        tokens_cached_read: Some(128),
        tokens_cache_creation: None,
        usage_estimated: false,
        cost_micro_usd: Some(174),
        request_body: Some(sealed(key, envelope.event_id, "request_body", &body)?),
        response_body: Some(sealed(key, envelope.event_id, "response_body", &body)?),
    };
    Ok(Event {
        envelope,
        payload: payload.into(),
    })
}

/// One event of every type, for `tenant`, sealing bodies with `key`.
pub fn one_of_each(key: &DataKey, digest_key: &KeyBytes) -> Result<Vec<Event>, CryptoError> {
    let tenant = key.tenant_id;
    let trace = "trace-0001";
    let project = Some(Uuid::now_v7());
    let data = |payload: Payload| Event {
        envelope: Envelope::new(tenant, Some(trace.into()), "gateway/test/1"),
        payload,
    };
    let control = |payload: Payload| Event {
        envelope: Envelope::new(tenant, None, "admin/test/1"),
        payload,
    };
    let body = chat_body(600);
    let received = Envelope::new(tenant, Some(trace.into()), "gateway/test/1");
    let request_received = RequestReceived {
        endpoint: "/v1/chat/completions".into(),
        project_id: project,
        api_key_id: Some(Uuid::now_v7()),
        user: Some("user-42".into()),
        model: "fast".into(),
        stream: true,
        user_agent: Some("OpenAI/Python 1.54.0".into()),
        body_bytes: body.len() as i64,
        body_digest: crypto::body_digest(digest_key, &body)?,
        body: Some(sealed(key, received.event_id, "body", &body)?),
    };
    let tool = Envelope::new(tenant, Some(trace.into()), "gateway/test/1");
    Ok(vec![
        Event {
            envelope: received,
            payload: request_received.into(),
        },
        data(
            PolicyEvaluated {
                project_id: project,
                action: PolicyAction::Redact,
                findings: vec![PolicyFinding {
                    rule: "secrets".into(),
                    kind: "aws_access_key".into(),
                    location: "messages[1].content".into(),
                }],
                latency_us: 41,
            }
            .into(),
        ),
        data(
            RoutingDecided {
                model: "fast".into(),
                candidates: vec![
                    RouteCandidate {
                        deployment: "openai-primary".into(),
                        provider: "openai".into(),
                        model: "gpt-4o-mini".into(),
                        weight: 3,
                        skipped: None,
                    },
                    RouteCandidate {
                        deployment: "azure-eu".into(),
                        provider: "azure".into(),
                        model: "gpt-4o-mini".into(),
                        weight: 1,
                        skipped: Some("cooling_down".into()),
                    },
                ],
                chosen: Some("openai-primary".into()),
                reason: "weighted".into(),
            }
            .into(),
        ),
        llm_call_completed(key, trace, 700)?,
        Event {
            payload: ToolCallObserved {
                direction: ToolCallDirection::Requested,
                tool_call_id: "call_abc123".into(),
                name: Some("get_weather".into()),
                arguments: Some(sealed(
                    key,
                    tool.event_id,
                    "arguments",
                    br#"{"city":"Paris"}"#,
                )?),
                result: None,
            }
            .into(),
            envelope: tool,
        },
        data(
            QuotaConsumed {
                scope: QuotaScope::Project,
                scope_id: "p-1".into(),
                metric: QuotaMetric::Tokens,
                window: QuotaWindow::Day,
                amount: 599,
                used: 10_599,
                limit: Some(1_000_000),
            }
            .into(),
        ),
        data(
            QuotaDenied {
                scope: QuotaScope::ApiKey,
                scope_id: "k-1".into(),
                metric: QuotaMetric::Requests,
                window: QuotaWindow::Minute,
                limit: 60,
                used: 60,
                retry_after_ms: Some(12_000),
            }
            .into(),
        ),
        data(
            RequestCompleted {
                status: RequestStatus::Ok,
                http_status: 200,
                error_class: None,
                model: Some("gpt-4o-mini-2024-07-18".into()),
                provider: Some("openai".into()),
                deployment: Some("openai-primary".into()),
                attempts: 2,
                tokens_in: Some(412),
                tokens_out: Some(187),
                tokens_cached_read: None,
                tokens_cache_creation: None,
                usage_estimated: true,
                cost_micro_usd: None,
                latency_us: 912_000,
                ttft_us: Some(230_000),
                overhead_us: 310,
            }
            .into(),
        ),
        control(
            TenantCreated {
                name: "acme".into(),
            }
            .into(),
        ),
        control(
            ProjectCreated {
                project_id: Uuid::now_v7(),
                name: "support-bot".into(),
                routing_policy: Some("[aliases]\nfast = [\"openai-primary\"]\n".into()),
                security_policy: None,
            }
            .into(),
        ),
        control(
            ProjectUpdated {
                project_id: Uuid::now_v7(),
                name: None,
                routing_policy: None,
                security_policy: Some("block_secrets = true".into()),
            }
            .into(),
        ),
        control(
            ApiKeyIssued {
                key_id: Uuid::now_v7(),
                project_id: project,
                name: Some("ci".into()),
                key_hash: crypto::hash_api_key("loom-example").to_vec(),
                prefix: crypto::display_prefix("loom-example"),
                roles: vec!["inference".into()],
                expires_at: Some(now_micros() + 86_400_000_000),
            }
            .into(),
        ),
        control(
            ApiKeyRevoked {
                key_id: Uuid::now_v7(),
                reason: Some("leaked".into()),
            }
            .into(),
        ),
        control(
            QuotaLimitSet {
                scope: QuotaScope::Tenant,
                scope_id: tenant.to_string(),
                metric: QuotaMetric::CostMicroUsd,
                window: QuotaWindow::Month,
                limit: Some(50_000_000),
            }
            .into(),
        ),
        control(
            RoleGranted {
                principal: "alice@acme.test".into(),
                role: "admin".into(),
                project_id: None,
            }
            .into(),
        ),
        control(
            RoleRevoked {
                principal: "bob@acme.test".into(),
                role: "viewer".into(),
                project_id: project,
            }
            .into(),
        ),
        control(
            TenantErased {
                reason: Some("customer request".into()),
            }
            .into(),
        ),
    ])
}
