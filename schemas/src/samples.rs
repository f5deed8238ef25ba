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

const RESERVATION: Uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);

fn quota_scopes(tenant: Uuid) -> Vec<QuotaScopeRef> {
    vec![
        QuotaScopeRef {
            scope: QuotaScope::Tenant,
            scope_id: tenant.to_string(),
        },
        QuotaScopeRef {
            scope: QuotaScope::User,
            scope_id: "user-42".into(),
        },
    ]
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
        cache_saved_micro_usd: Some(10),
        response_id: Some("chatcmpl-sample".into()),
        request_body: Some(sealed(key, envelope.event_id, "request_body", &body)?),
        response_body: Some(sealed(key, envelope.event_id, "response_body", &body)?),
        dropped_fields: Vec::new(),
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
                    rule: "aws_access_key_id".into(),
                    kind: "secret".into(),
                    location: "messages[1].content".into(),
                    severity: "critical".into(),
                    action: "redact".into(),
                    start: 19,
                    end: 39,
                    digest: vec![7; 16],
                }],
                latency_us: 41,
                direction: "prompt".into(),
            }
            .into(),
        ),
        data(
            CacheHit {
                project_id: project,
                model: "fast".into(),
                key_digest: vec![3; 16],
                source_trace_id: "req_0001".into(),
                stream: false,
                tokens_in: Some(12),
                tokens_out: Some(30),
                cost_saved_micro_usd: Some(27),
                age_ms: 41_000,
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
                tier: Some("L1".into()),
                escalation: vec!["smart".into()],
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
            QuotaReserved {
                reservation_id: RESERVATION,
                scopes: quota_scopes(tenant),
                day: 20_000,
                tokens: 4_220,
                cost_micro_usd: 2_600,
                expires_at: 1_700_000_900_000_000,
                arbitrated: Some(vec![
                    DailyLimits {
                        tokens_per_day: 1_000_000,
                        cost_micro_usd_per_day: 10_000_000,
                    };
                    2
                ]),
            }
            .into(),
        ),
        data(
            QuotaConsumed {
                reservation_id: Some(RESERVATION),
                scopes: quota_scopes(tenant),
                day: 20_000,
                tokens: 599,
                cost_micro_usd: 310,
                reserved_tokens: 4_220,
                reserved_cost_micro_usd: 2_600,
            }
            .into(),
        ),
        data(
            QuotaReleased {
                reservation_id: RESERVATION,
                scopes: quota_scopes(tenant),
                day: 20_000,
                tokens: 4_220,
                cost_micro_usd: 2_600,
                reason: "failed".into(),
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
                routing_policy: Some(r#"{"default_tier":"L1","max_tier":"L2"}"#.into()),
                security_policy: None,
                feature_flags: Some(r#"{"cache":{"ttl_seconds":600}}"#.into()),
            }
            .into(),
        ),
        control(
            ProjectUpdated {
                project_id: Uuid::now_v7(),
                name: None,
                routing_policy: None,
                security_policy: Some(r#"{"rules":{"aws_access_key_id":"block"}}"#.into()),
                feature_flags: None,
                version: Some(2),
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
                roles: vec!["developer".into()],
                expires_at: Some(now_micros() + 86_400_000_000),
                owner: Some("ada@example.com".into()),
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
            UpstreamCredentialSet {
                project_id: project,
                upstream: "azure".into(),
                base_url: Some("https://acme.openai.azure.com".into()),
                api_key: Some(Sealed(vec![1; 60])),
                fingerprint: Some("x9Qa".into()),
            }
            .into(),
        ),
        control(
            UserRegistered {
                email: "alice@acme.test".into(),
                password: Sealed(vec![2; 140]),
            }
            .into(),
        ),
        control(
            UserPasswordSet {
                email: "alice@acme.test".into(),
                password: Sealed(vec![4; 140]),
            }
            .into(),
        ),
        control(
            SessionStarted {
                session: vec![3; 32],
                principal: "alice@acme.test".into(),
                api_key_id: None,
                expires_at: 1_760_000_000_000_000,
            }
            .into(),
        ),
        control(
            SessionEnded {
                session: vec![3; 32],
                reason: "signed_out".into(),
            }
            .into(),
        ),
        control(
            TenantErased {
                reason: Some("customer request".into()),
            }
            .into(),
        ),
        control(TenantKeyRotated { version: 2 }.into()),
        Event {
            envelope: Envelope::new(Uuid::nil(), None, "gateway/test/1"),
            payload: LogAnchored {
                topic: "data".into(),
                partition: 0,
                offset: 1234,
                head: vec![0xAB; 32],
                mac: vec![0xCD; 32],
            }
            .into(),
        },
    ])
}

/// Fresh data keys (version 1) for `tenants` new tenants, for [`history`].
pub fn tenant_keys(tenants: usize) -> Result<Vec<DataKey>, CryptoError> {
    (0..tenants)
        .map(|_| {
            Ok(DataKey {
                tenant_id: Uuid::now_v7(),
                key_id: Uuid::now_v7(),
                version: 1,
                key: KeyBytes::generate()?,
            })
        })
        .collect()
}

/// A realistic history: `tenants` tenants (each with a project and two keys, one of them revoked
/// half-way) and `requests` requests among them, with policy findings, retries after upstream
/// errors, tool calls, streaming, quota denials and failures. Events come in log order, one hour
/// of traffic per 500 requests, starting at `start_us`; the same `seed` gives the same mix.
/// Bodies are sealed with the tenant's key in `keys` (one per tenant, its `tenant_id` used).
pub fn history(
    keys: &[DataKey],
    requests: usize,
    start_us: i64,
    seed: u64,
) -> Result<Vec<Event>, CryptoError> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut events = Vec::with_capacity(requests * 7 + keys.len() * 5);
    let mut clock = start_us;
    let mut at = |step: i64| {
        clock += step;
        clock
    };
    let envelope = |tenant: Uuid, trace: Option<&str>, at: i64| {
        let mut envelope = Envelope::new(tenant, trace.map(str::to_owned), "gateway/history/1");
        envelope.occurred_at = at;
        envelope
    };
    let event = |tenant: Uuid, trace: Option<&str>, at: i64, payload: Payload| Event {
        envelope: envelope(tenant, trace, at),
        payload,
    };
    let mut revocable = Vec::new();
    let mut projects = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let tenant = key.tenant_id;
        let project = Uuid::now_v7();
        projects.push(project);
        events.push(event(
            tenant,
            None,
            at(1),
            TenantCreated {
                name: format!("tenant-{i}"),
            }
            .into(),
        ));
        events.push(event(
            tenant,
            None,
            at(1),
            ProjectCreated {
                project_id: project,
                name: "assistant".into(),
                routing_policy: None,
                security_policy: None,
                feature_flags: None,
            }
            .into(),
        ));
        for name in ["production", "ci"] {
            let key_id = Uuid::now_v7();
            let secret = format!("loom-history-{key_id}");
            events.push(event(
                tenant,
                None,
                at(1),
                ApiKeyIssued {
                    key_id,
                    project_id: Some(project),
                    name: Some(name.into()),
                    key_hash: crypto::hash_api_key(&secret).to_vec(),
                    prefix: crypto::display_prefix(&secret),
                    roles: vec!["inference".into()],
                    expires_at: None,
                    owner: None,
                }
                .into(),
            ));
            if name == "ci" {
                revocable.push((tenant, key_id));
            }
        }
    }
    let models = [
        ("fast", "gpt-4o-mini", "openai"),
        ("smart", "claude-sonnet-4", "anthropic"),
    ];
    for n in 0..requests {
        if n == requests / 2 {
            for (tenant, key_id) in revocable.drain(..) {
                events.push(event(
                    tenant,
                    None,
                    at(1),
                    ApiKeyRevoked {
                        key_id,
                        reason: Some("rotated".into()),
                    }
                    .into(),
                ));
            }
        }
        let t = n % keys.len();
        let key = &keys[t];
        let tenant = key.tenant_id;
        let trace = format!("trace-{seed}-{n:08}");
        let trace = Some(trace.as_str());
        let (alias, model, provider) = models[rng.usize(..models.len())];
        let stream = rng.bool();
        let started = at(7_200_000_000 / 1000);
        let received = envelope(tenant, trace, started);
        let body = chat_body(200 + rng.usize(..400));
        let request = RequestReceived {
            endpoint: "/v1/chat/completions".into(),
            project_id: Some(projects[t]),
            api_key_id: None,
            user: Some(format!("user-{}", rng.usize(..5))),
            model: alias.into(),
            stream,
            user_agent: Some("OpenAI/Python 1.54.0".into()),
            body_bytes: body.len() as i64,
            body_digest: Vec::new(),
            body: Some(sealed(key, received.event_id, "body", &body)?),
        };
        events.push(Event {
            envelope: received,
            payload: request.into(),
        });
        let findings = if rng.u8(..10) == 0 {
            vec![PolicyFinding {
                rule: "aws_access_key_id".into(),
                kind: "secret".into(),
                location: "messages[0].content".into(),
                severity: "critical".into(),
                action: "redact".into(),
                start: 12,
                end: 32,
                digest: vec![9; 16],
            }]
        } else {
            Vec::new()
        };
        let action = if findings.is_empty() {
            PolicyAction::Allow
        } else {
            PolicyAction::Redact
        };
        events.push(event(
            tenant,
            trace,
            started + 50,
            PolicyEvaluated {
                project_id: Some(projects[t]),
                action,
                findings,
                latency_us: 40,
                direction: "prompt".into(),
            }
            .into(),
        ));
        // One in twenty is denied by a quota and never reaches an upstream.
        if rng.u8(..20) == 0 {
            events.push(event(
                tenant,
                trace,
                started + 80,
                QuotaDenied {
                    scope: QuotaScope::Tenant,
                    scope_id: tenant.to_string(),
                    metric: QuotaMetric::Requests,
                    window: QuotaWindow::Minute,
                    limit: 60,
                    used: 60,
                    retry_after_ms: Some(1_000),
                }
                .into(),
            ));
            events.push(event(
                tenant,
                trace,
                started + 100,
                completed(
                    RequestStatus::Denied,
                    429,
                    Some("quota_exceeded"),
                    None,
                    1,
                    100,
                    None,
                ),
            ));
            continue;
        }
        events.push(event(
            tenant,
            trace,
            started + 90,
            RoutingDecided {
                model: alias.into(),
                candidates: Vec::new(),
                chosen: Some(format!("{provider}-primary")),
                reason: "weighted".into(),
                tier: Some(["L1", "L2", "L3"][alias.len() % 3].into()),
                escalation: Vec::new(),
            }
            .into(),
        ));
        // Upstream attempts: sometimes a 429 or 500 first; one in thirty fails for good.
        let failures = match rng.u8(..10) {
            0 => 1,
            1 => 2,
            _ => 0,
        };
        let gives_up = rng.u8(..30) == 0;
        let attempts = if gives_up { 3 } else { failures + 1 };
        let mut offset = 100;
        let mut usage = None;
        let mut first_token = None;
        for attempt in 1..=attempts {
            let ok = !gives_up && attempt == attempts;
            let latency = if ok {
                50_000 + rng.i64(0..3_000_000)
            } else {
                5_000 + rng.i64(0..50_000)
            };
            let mut call = LlmCallCompleted {
                attempt: attempt as i32,
                deployment: format!("{provider}-primary"),
                provider: provider.into(),
                model: model.into(),
                status: if ok {
                    CallStatus::Ok
                } else {
                    CallStatus::Error
                },
                http_status: Some(if ok {
                    200
                } else if attempt % 2 == 0 {
                    500
                } else {
                    429
                }),
                error_class: (!ok).then(|| "upstream_error".to_owned()),
                stream,
                started_at: started + offset,
                latency_us: latency,
                ttft_us: (ok && stream).then_some(latency / 4),
                tokens_in: ok.then_some(body.len() as i64 / 4),
                tokens_out: ok.then(|| rng.i64(10..800)),
                tokens_cached_read: ok.then(|| rng.i64(0..2) * 64),
                tokens_cache_creation: None,
                usage_estimated: false,
                cost_micro_usd: None,
                cache_saved_micro_usd: None,
                response_id: None,
                request_body: None,
                response_body: None,
                dropped_fields: Vec::new(),
            };
            call.cost_micro_usd = call.tokens_out.map(|out| out * 3 + body.len() as i64 / 8);
            call.cache_saved_micro_usd = call.tokens_cached_read.filter(|&c| c > 0).map(|c| c / 2);
            if ok && stream {
                first_token = Some(offset + latency / 4);
            }
            let call_envelope = envelope(tenant, trace, started + offset + latency);
            if ok {
                let response = br#"{"choices":[]}"#;
                call.response_body = Some(sealed(
                    key,
                    call_envelope.event_id,
                    "response_body",
                    response,
                )?);
                usage = Some((
                    call.tokens_in,
                    call.tokens_out,
                    call.tokens_cached_read,
                    call.cost_micro_usd,
                ));
            }
            events.push(Event {
                envelope: call_envelope,
                payload: call.into(),
            });
            offset += latency + 1_000;
        }
        if usage.is_some() && rng.u8(..4) == 0 {
            let tool = envelope(tenant, trace, started + offset);
            let arguments = sealed(key, tool.event_id, "arguments", br#"{"city":"Paris"}"#)?;
            events.push(Event {
                envelope: tool,
                payload: ToolCallObserved {
                    direction: ToolCallDirection::Requested,
                    tool_call_id: format!("call_{n}"),
                    name: Some("get_weather".into()),
                    arguments: Some(arguments),
                    result: None,
                }
                .into(),
            });
        }
        let done = match usage {
            Some(usage) => completed(
                RequestStatus::Ok,
                200,
                None,
                Some((model, provider, usage)),
                attempts,
                offset,
                first_token,
            ),
            None => completed(
                RequestStatus::Error,
                502,
                Some("upstream_error"),
                None,
                attempts,
                offset,
                None,
            ),
        };
        events.push(event(tenant, trace, started + offset + 300, done));
    }
    Ok(events)
}

/// Tokens in, out and cached, and cost.
type Usage = (Option<i64>, Option<i64>, Option<i64>, Option<i64>);

/// A `request.completed`; `served` is the model, provider and usage of a successful request.
fn completed(
    status: RequestStatus,
    http_status: i32,
    error_class: Option<&str>,
    served: Option<(&str, &str, Usage)>,
    attempts: u32,
    latency_us: i64,
    ttft_us: Option<i64>,
) -> Payload {
    let (tokens_in, tokens_out, tokens_cached_read, cost_micro_usd) =
        served.map_or((None, None, None, None), |(_, _, usage)| usage);
    RequestCompleted {
        status,
        http_status,
        error_class: error_class.map(str::to_owned),
        model: served.map(|(model, _, _)| model.to_owned()),
        provider: served.map(|(_, provider, _)| provider.to_owned()),
        deployment: None,
        attempts: attempts as i32,
        tokens_in,
        tokens_out,
        tokens_cached_read,
        tokens_cache_creation: None,
        usage_estimated: false,
        cost_micro_usd,
        latency_us,
        ttft_us,
        overhead_us: 300,
    }
    .into()
}

/// A control-plane history meant to probe the rules: `tenants` tenants and `steps` events of
/// every kind, among them what no one may do — revocations under another tenant's id, events for
/// unknown keys, tenants and projects, keys in another tenant's project, duplicate tenants, keys
/// and revocations, and anything after a tenant's erasure. Events come in log order; the same
/// `seed` gives the same history.
pub fn control_history(tenants: usize, steps: usize, seed: u64) -> Vec<Event> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let tenant_ids: Vec<Uuid> = (0..tenants.max(1)).map(|_| Uuid::now_v7()).collect();
    let mut projects: Vec<(Uuid, Uuid)> = Vec::new();
    let mut keys: Vec<(Uuid, Uuid, ApiKeyIssued)> = Vec::new();
    let mut events = Vec::with_capacity(steps + tenant_ids.len());
    let event = |tenant: Uuid, payload: Payload| Event {
        envelope: Envelope::new(tenant, None, "admin/rules/1"),
        payload,
    };
    // Most tenants exist from the start; one is only ever named, never created.
    for tenant in &tenant_ids[..tenant_ids.len().saturating_sub(1).max(1)] {
        events.push(event(*tenant, TenantCreated { name: "t".into() }.into()));
    }
    for step in 0..steps {
        let tenant = tenant_ids[rng.usize(..tenant_ids.len())];
        let other = tenant_ids[rng.usize(..tenant_ids.len())];
        let payload: Payload = match rng.u8(..12) {
            0 => TenantCreated {
                name: format!("again {step}"),
            }
            .into(),
            1 if rng.u8(..4) == 0 => TenantErased { reason: None }.into(),
            1 | 2 => {
                let project_id = Uuid::now_v7();
                projects.push((project_id, tenant));
                ProjectCreated {
                    project_id,
                    name: format!("p{step}"),
                    routing_policy: None,
                    security_policy: None,
                    feature_flags: None,
                }
                .into()
            }
            3..=5 => {
                // In the tenant's project, another tenant's, one that does not exist, or none.
                let project_id = match rng.u8(..4) {
                    0 => projects.iter().find(|(_, t)| *t == tenant).map(|(p, _)| *p),
                    1 => projects.iter().find(|(_, t)| *t != tenant).map(|(p, _)| *p),
                    2 => Some(Uuid::now_v7()),
                    _ => None,
                };
                let secret = format!("loom-rules-{seed}-{step}");
                let issued = ApiKeyIssued {
                    key_id: Uuid::now_v7(),
                    project_id,
                    name: Some(format!("k{step}")),
                    key_hash: crypto::hash_api_key(&secret).to_vec(),
                    prefix: crypto::display_prefix(&secret),
                    roles: vec!["inference".into()],
                    expires_at: None,
                    owner: None,
                };
                keys.push((issued.key_id, tenant, issued.clone()));
                issued.into()
            }
            // The same key issued again.
            6 if !keys.is_empty() => keys[rng.usize(..keys.len())].2.clone().into(),
            // Revoked by its tenant, by another (under `other`'s id), again, or an unknown key.
            6..=8 => {
                let key_id = if keys.is_empty() || rng.u8(..5) == 0 {
                    Uuid::now_v7()
                } else {
                    let (key_id, owner, _) = &keys[rng.usize(..keys.len())];
                    let revoker = if rng.bool() { *owner } else { other };
                    events.push(event(
                        revoker,
                        ApiKeyRevoked {
                            key_id: *key_id,
                            reason: Some(format!("r{step}")),
                        }
                        .into(),
                    ));
                    continue;
                };
                ApiKeyRevoked {
                    key_id,
                    reason: None,
                }
                .into()
            }
            9 => QuotaLimitSet {
                scope: QuotaScope::Tenant,
                scope_id: tenant.to_string(),
                metric: QuotaMetric::Requests,
                window: QuotaWindow::Minute,
                limit: Some(i64::from(rng.u16(..))),
            }
            .into(),
            10 => RoleGranted {
                principal: format!("u{}@rules.test", rng.u8(..4)),
                role: "viewer".into(),
                project_id: projects.last().map(|(p, _)| *p),
            }
            .into(),
            _ => RoleRevoked {
                principal: format!("u{}@rules.test", rng.u8(..4)),
                role: "viewer".into(),
                project_id: None,
            }
            .into(),
        };
        events.push(event(tenant, payload));
    }
    events
}
