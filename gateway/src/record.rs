//! The event trail of a request: `request.received` (sealed body, keyed digest), tool results it
//! carries, one `llm_call.completed` per attempt, the tool calls a model asks for, and
//! `request.completed` with usage and cost — the last one recorded before the answer goes out.

use std::time::Duration;

use axum::response::Response;
use loom_schemas::crypto::FieldContext;
use loom_schemas::event::{
    CallStatus, Event, LlmCallCompleted, Payload, RequestCompleted, RequestReceived, RequestStatus,
    Sealed, ToolCallDirection, ToolCallObserved,
};
use serde_json::Value;
use uuid::Uuid;

use crate::error::{GatewayError, UpstreamFault};
use crate::flow::{Flow, micros};
use crate::meter::{Attempted, Ended};
use crate::pricing::{Price, PriceTable};
use crate::telemetry::{AttemptEnded, RequestEnded};
use crate::tokens;
use crate::upstream::{Answer, AttemptError};

impl Flow {
    pub fn event(&self, payload: impl Into<Payload>) -> Event {
        self.sealed_event(|_| payload)
    }

    /// An event whose payload seals some of its fields: `build` gets `seal(field, plaintext)`,
    /// which seals under this event's id.
    pub fn sealed_event<P: Into<Payload>>(
        &self,
        build: impl FnOnce(&dyn Fn(&str, &[u8]) -> Option<Sealed>) -> P,
    ) -> Event {
        let envelope = loom_schemas::event::Envelope::new(
            self.tenant_id,
            Some(self.trace_id.clone()),
            &*self.producer,
        );
        let event_id = envelope.event_id;
        let payload = build(&|field, plaintext| self.seal(event_id, field, plaintext));
        Event {
            envelope,
            payload: payload.into(),
        }
    }

    /// Seals `plaintext` as `field` of `event_id`; `None` if the tenant has no key (never for an
    /// authenticated request).
    pub fn seal(&self, event_id: Uuid, field: &str, plaintext: &[u8]) -> Option<Sealed> {
        let ctx = FieldContext {
            tenant_id: self.tenant_id,
            event_id,
            field,
        };
        match self.keys.seal(&ctx, plaintext) {
            Ok(sealed) => Some(sealed),
            Err(error) => {
                tracing::error!(%error, tenant = %self.tenant_id, "could not seal a body");
                None
            }
        }
    }

    /// The most a request may cost before it is sent, in micro-USD: its prompt tokens plus the
    /// output it may ask for (`max_tokens`, `max_completion_tokens` or `max_output_tokens`, else
    /// `[limits] default_max_output_tokens`; none for embeddings), capped by the model's maximum
    /// output, at the highest price among the deployments it may be sent to. `None` when no
    /// deployment's price is known.
    pub fn estimate_cost(&self, request: &Value, embeddings: bool, order: &[usize]) -> Option<i64> {
        let prompt = tokens::prompt_tokens(request);
        self.estimates(request, embeddings, order, prompt)
            .filter_map(|(_, cost)| cost)
            .max()
    }

    /// What a request of `prompt` tokens may use at most, as [`Flow::estimate_cost`] reckons:
    /// tokens and micro-USD (0 when no price is known), each the most over `order`.
    pub fn estimate(
        &self,
        request: &Value,
        embeddings: bool,
        order: &[usize],
        prompt: i64,
    ) -> (i64, i64) {
        self.estimates(request, embeddings, order, prompt)
            .fold((prompt, 0), |(tokens, cost), (t, c)| {
                (tokens.max(t), cost.max(c.unwrap_or(0)))
            })
    }

    /// Per deployment of `order`: the tokens a request may use there, and their cost.
    fn estimates(
        &self,
        request: &Value,
        embeddings: bool,
        order: &[usize],
        prompt: i64,
    ) -> impl Iterator<Item = (i64, Option<i64>)> {
        let asked = ["max_tokens", "max_completion_tokens", "max_output_tokens"]
            .iter()
            .find_map(|field| request.get(*field).and_then(Value::as_u64));
        let default = u64::from(self.gateway.config.limits.default_max_output_tokens);
        order.iter().map(move |d| {
            let price = self.price(*d, None);
            let most = price.and_then(|p| p.max_output_tokens).unwrap_or(u64::MAX);
            let output = if embeddings {
                0
            } else {
                asked.unwrap_or(default).min(most)
            };
            let usage = Usage {
                tokens_in: Some(prompt),
                tokens_out: Some(i64::try_from(output).unwrap_or(i64::MAX)),
                ..Usage::default()
            };
            let tokens = prompt.saturating_add(usage.tokens_out.unwrap_or(0));
            (tokens, price.and_then(|p| PriceTable::cost(p, &usage)))
        })
    }

    /// The price of a call to a deployment (or the more specific model the upstream said
    /// served it), if the table has one.
    fn price(&self, deployment: usize, served_model: Option<&str>) -> Option<&Price> {
        let config = &self.gateway.config;
        let deployment = config.deployments.get(deployment)?;
        let provider = config.upstreams.get(deployment.upstream)?.kind;
        config
            .prices
            .price_of(provider, &deployment.model, served_model)
    }

    /// The cost of `usage` on a deployment, if its price is known.
    pub fn cost(
        &self,
        deployment: usize,
        served_model: Option<&str>,
        usage: &Usage,
    ) -> Option<i64> {
        PriceTable::cost(self.price(deployment, served_model)?, usage)
    }

    /// What the provider's prompt cache saved on a call (see [`PriceTable::cache_saving`]).
    pub fn cache_saving(
        &self,
        deployment: usize,
        served_model: Option<&str>,
        usage: &Usage,
    ) -> Option<i64> {
        PriceTable::cache_saving(self.price(deployment, served_model)?, usage)
    }

    /// `request.received` for a body: sealed and digested when the caller is authenticated.
    pub fn received(&self, mut received: RequestReceived, body: &[u8]) -> Event {
        let authenticated = self.key.is_some();
        if authenticated {
            received.body_digest = self
                .keys
                .body_digest(self.tenant_id, body)
                .unwrap_or_default();
        }
        self.sealed_event(|seal| {
            if authenticated {
                received.body = seal("body", body);
            }
            received
        })
    }

    /// `tool_call.observed` for each tool result a request carries back, in any client API:
    /// chat's `tool` messages, Anthropic's `tool_result` blocks, the Responses API's
    /// `function_call_output` items. They close the loop on earlier tool calls.
    pub fn tool_results(&self, request: &Value) -> Vec<Event> {
        // A text result as is; structured content (parts) as its JSON.
        let text = |content: Option<&Value>| match content {
            Some(Value::String(text)) => text.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        };
        fn str_of<'a>(value: &'a Value, key: &str) -> Option<&'a str> {
            value.get(key).and_then(Value::as_str)
        }
        let mut results = Vec::new();
        for message in request
            .get("messages")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if str_of(message, "role") == Some("tool") {
                if let Some(id) = str_of(message, "tool_call_id") {
                    results.push((id, str_of(message, "name"), text(message.get("content"))));
                }
                continue;
            }
            for block in message
                .get("content")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter(|b| str_of(b, "type") == Some("tool_result"))
            {
                if let Some(id) = str_of(block, "tool_use_id") {
                    results.push((id, None, text(block.get("content"))));
                }
            }
        }
        for item in request
            .get("input")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter(|i| str_of(i, "type") == Some("function_call_output"))
        {
            if let Some(id) = str_of(item, "call_id") {
                results.push((id, None, text(item.get("output"))));
            }
        }
        results
            .into_iter()
            .map(|(id, name, content)| {
                self.tool_call(ToolCallDirection::Result, id, name, &content)
            })
            .collect()
    }

    /// `tool_call.observed` for each tool call in an OpenAI `message` (or accumulated deltas).
    pub fn tool_calls(&self, tool_calls: &[Value]) -> Vec<Event> {
        tool_calls
            .iter()
            .filter_map(|call| {
                let id = call.get("id").and_then(Value::as_str)?;
                let name = call.pointer("/function/name").and_then(Value::as_str);
                let arguments = call
                    .pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                Some(self.tool_call(ToolCallDirection::Requested, id, name, arguments))
            })
            .collect()
    }

    /// `tool_call.observed`: a call the model asked for (its arguments sealed), or a result the
    /// client sent back (sealed).
    fn tool_call(
        &self,
        direction: ToolCallDirection,
        id: &str,
        name: Option<&str>,
        content: &str,
    ) -> Event {
        self.sealed_event(|seal| {
            let (arguments, result) = match direction {
                ToolCallDirection::Requested => (seal("arguments", content.as_bytes()), None),
                ToolCallDirection::Result => (None, seal("result", content.as_bytes())),
            };
            ToolCallObserved {
                direction,
                tool_call_id: id.to_owned(),
                name: name.map(str::to_owned),
                arguments,
                result,
            }
        })
    }

    /// The `request.completed` event for an outcome.
    pub fn completed(&self, outcome: &Outcome) -> Event {
        let (latency, overhead) = (self.started.elapsed(), self.overhead());
        self.gateway.meter.request(&Ended {
            deployment: outcome.deployment.as_deref(),
            status: outcome.status,
            latency,
            overhead,
            ttft: outcome.ttft,
            tokens_in: outcome.usage.tokens_in,
            tokens_out: outcome.usage.tokens_out,
        });
        if let (Some(spans), Some(span)) = (&self.gateway.spans, &self.span) {
            let ended = RequestEnded {
                outcome,
                trace_id: &self.trace_id,
                tenant_id: self.tenant_id,
                attempts: self.attempts,
                overhead_us: micros(overhead),
            };
            spans.request(span, &ended);
        }
        self.event(RequestCompleted {
            status: outcome.status,
            http_status: i32::from(outcome.http_status),
            error_class: outcome.error_class.clone(),
            model: outcome.model.clone(),
            provider: outcome.provider.clone(),
            deployment: outcome.deployment.clone(),
            attempts: self.attempts,
            tokens_in: outcome.usage.tokens_in,
            tokens_out: outcome.usage.tokens_out,
            tokens_cached_read: outcome.usage.tokens_cached_read,
            tokens_cache_creation: outcome.usage.tokens_cache_creation,
            usage_estimated: outcome.usage.estimated,
            cost_micro_usd: outcome.cost_micro_usd,
            latency_us: micros(latency),
            ttft_us: outcome.ttft.map(micros),
            overhead_us: micros(overhead),
        })
    }

    /// Records `request.completed` for `outcome`, waiting as `--events-ack` says. The answer
    /// goes out only after `Ok`; `Err` is the answer instead (503: the events were not recorded).
    pub async fn complete(&self, outcome: &Outcome) -> Result<(), GatewayError> {
        if let Some(settled) = self.settlement(outcome) {
            self.gateway.emitter.emit(settled).await;
        }
        self.gateway
            .emitter
            .record(self.completed(outcome))
            .await
            .map_err(|_| GatewayError::EventsUnavailable)
    }

    /// Ends a request with `error`: `request.completed`, then the error in the client's dialect.
    pub async fn fail(&self, error: GatewayError) -> Response {
        self.fail_with(Outcome::default(), error).await
    }

    /// Ends a request with `error`, its outcome saying more (deployment, provider).
    pub async fn fail_with(&self, outcome: Outcome, error: GatewayError) -> Response {
        let outcome = Outcome {
            status: error.request_status(),
            http_status: error.status().as_u16(),
            error_class: Some(error.error_class().to_owned()),
            ..outcome
        };
        match self.complete(&outcome).await {
            Ok(()) => self.error_response(&error),
            Err(unrecorded) => self.error_response(&unrecorded),
        }
    }
}

/// Token counts of a call: as the upstream reported them, or estimated by Loom.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub tokens_in: Option<i64>,
    pub tokens_out: Option<i64>,
    pub tokens_cached_read: Option<i64>,
    pub tokens_cache_creation: Option<i64>,
    /// Counted by Loom because the upstream reported nothing.
    pub estimated: bool,
}

impl Usage {
    /// Reads OpenAI's `usage` object.
    pub fn from_openai(usage: &Value) -> Usage {
        let int = |pointer: &str| usage.pointer(pointer).and_then(Value::as_i64);
        let tokens_in = int("/prompt_tokens");
        // Embeddings report only prompt and total tokens: what is left over is the output (0).
        let tokens_out = int("/completion_tokens")
            .or_else(|| Some(int("/total_tokens")? - tokens_in?).filter(|out| *out >= 0));
        Usage {
            tokens_in,
            tokens_out,
            tokens_cached_read: int("/prompt_tokens_details/cached_tokens"),
            tokens_cache_creation: int("/prompt_tokens_details/cache_creation_tokens"),
            estimated: false,
        }
    }

    /// Counts the tokens of a request and of the text answered, for upstreams that report none.
    pub fn estimate(request: &Value, answered: &str) -> Usage {
        Usage {
            tokens_in: Some(tokens::prompt_tokens(request)),
            tokens_out: Some(tokens::count(answered)),
            estimated: true,
            ..Usage::default()
        }
    }
}

/// How a request ended, for `request.completed`.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub status: RequestStatus,
    pub http_status: u16,
    pub error_class: Option<String>,
    pub model: Option<String>,
    pub provider: Option<String>,
    pub deployment: Option<String>,
    pub usage: Usage,
    pub cost_micro_usd: Option<i64>,
    pub ttft: Option<Duration>,
}

impl Outcome {
    /// An outcome served (or failed) by deployment `index`: its name and provider filled in.
    pub fn at(flow: &Flow, index: usize) -> Outcome {
        let config = &flow.gateway.config;
        let deployment = &config.deployments[index];
        Outcome {
            provider: Some(config.upstreams[deployment.upstream].kind.name().to_owned()),
            deployment: Some(deployment.name.clone()),
            ..Outcome::default()
        }
    }
}

impl Default for Outcome {
    fn default() -> Self {
        Outcome {
            status: RequestStatus::Ok,
            http_status: 200,
            error_class: None,
            model: None,
            provider: None,
            deployment: None,
            usage: Usage::default(),
            cost_micro_usd: None,
            ttft: None,
        }
    }
}

/// Which attempt at which deployment, and what it sent.
#[derive(Clone, Copy)]
pub(crate) struct Attempt<'a> {
    pub deployment: usize,
    /// 1 for the request's first attempt, counting retries and fallbacks.
    pub number: i32,
    pub started_at: i64,
    pub request_body: &'a [u8],
    /// What the request's translation to this upstream's API could not carry.
    pub dropped: &'a [String],
}

/// One upstream attempt, as `llm_call.completed` records it.
pub(crate) struct CallRecord<'a> {
    pub deployment: usize,
    pub attempt: i32,
    pub started_at: i64,
    pub latency: Duration,
    pub ttft: Option<Duration>,
    pub status: CallStatus,
    pub http_status: Option<u16>,
    pub error_class: Option<&'a str>,
    pub usage: Usage,
    /// The model id the upstream says served the call, when more specific than the deployment's.
    pub served_model: Option<&'a str>,
    pub stream: bool,
    pub request_body: &'a [u8],
    pub response_body: Option<&'a [u8]>,
    /// What the request's translation to this upstream's API could not carry.
    pub dropped: &'a [String],
    /// The upstream's id of its answer.
    pub response_id: Option<&'a str>,
}

impl<'a> CallRecord<'a> {
    /// A failed attempt.
    pub(crate) fn failed(
        attempt: Attempt<'a>,
        latency: Duration,
        error: &'a AttemptError,
        stream: bool,
    ) -> Self {
        CallRecord {
            deployment: attempt.deployment,
            attempt: attempt.number,
            started_at: attempt.started_at,
            latency,
            ttft: None,
            status: if error.fault == UpstreamFault::Timeout {
                CallStatus::Timeout
            } else {
                CallStatus::Error
            },
            http_status: error.http_status,
            error_class: Some(error.fault.name()),
            usage: Usage::default(),
            served_model: None,
            stream,
            request_body: attempt.request_body,
            response_body: error.body.as_deref(),
            dropped: attempt.dropped,
            response_id: None,
        }
    }

    /// The attempt that answered, finished with `status`.
    pub fn answered(
        answer: &'a Answer,
        latency: Duration,
        status: CallStatus,
        error_class: Option<&'a str>,
        response_body: &'a [u8],
        stream: bool,
    ) -> Self {
        CallRecord {
            deployment: answer.deployment,
            attempt: answer.attempt,
            started_at: answer.started_at,
            latency,
            ttft: None,
            status,
            http_status: Some(answer.status.as_u16()),
            error_class,
            usage: Usage::default(),
            served_model: None,
            stream,
            request_body: &answer.request_body,
            response_body: Some(response_body),
            dropped: &answer.dropped,
            response_id: None,
        }
    }
}

/// The `llm_call.completed` event of an attempt, bodies sealed.
pub(crate) fn call_event(flow: &Flow, call: CallRecord<'_>) -> Event {
    let gateway = &flow.gateway;
    let deployment = &gateway.config.deployments[call.deployment];
    let upstream = &gateway.config.upstreams[deployment.upstream];
    let outcome = match call.status {
        CallStatus::Ok => Attempted::Answered,
        CallStatus::ClientCancelled => Attempted::ClientLeft,
        CallStatus::Timeout => Attempted::Failed(call.error_class.unwrap_or("timeout")),
        CallStatus::Error => Attempted::Failed(call.error_class.unwrap_or("error")),
    };
    gateway
        .meter
        .attempt(&deployment.name, call.latency, outcome);
    if let (Some(spans), Some(span)) = (&gateway.spans, &flow.span) {
        let ended = AttemptEnded {
            call: &call,
            deployment,
            upstream,
        };
        spans.attempt(span, &ended);
    }
    flow.sealed_event(|seal| LlmCallCompleted {
        attempt: call.attempt,
        deployment: deployment.name.clone(),
        provider: upstream.kind.name().to_owned(),
        model: deployment.model.clone(),
        status: call.status,
        http_status: call.http_status.map(i32::from),
        error_class: call.error_class.map(str::to_owned),
        stream: call.stream,
        started_at: call.started_at,
        latency_us: micros(call.latency),
        ttft_us: call.ttft.map(micros),
        tokens_in: call.usage.tokens_in,
        tokens_out: call.usage.tokens_out,
        tokens_cached_read: call.usage.tokens_cached_read,
        tokens_cache_creation: call.usage.tokens_cache_creation,
        usage_estimated: call.usage.estimated,
        cost_micro_usd: flow.cost(call.deployment, call.served_model, &call.usage),
        cache_saved_micro_usd: flow.cache_saving(call.deployment, call.served_model, &call.usage),
        response_id: call.response_id.map(str::to_owned),
        dropped_fields: call.dropped.to_vec(),
        request_body: seal("request_body", call.request_body),
        response_body: call.response_body.and_then(|b| seal("response_body", b)),
    })
}
