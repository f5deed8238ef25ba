//! OpenTelemetry traces of the data plane, exported over OTLP/HTTP (protobuf) when
//! `--otlp-endpoint` is set: a SERVER span per request and a CLIENT span per upstream attempt,
//! with the GenAI semantic conventions (`gen_ai.operation.name`, `gen_ai.system`,
//! `gen_ai.request.model`, `gen_ai.usage.input_tokens`, …) and Loom's own `loom.*` attributes.
//! No span carries a key, a prompt or an answer.
//!
//! A span is built from the facts its event records (`request.completed`, `llm_call.completed`),
//! when the event is made: nothing is held open on the way, and the spans agree with the log.
//! The ids are chosen up front. A request's span id is drawn when it arrives, in the trace of the
//! client's `traceparent` if it sent one (else a new trace); attempt `n`'s span id is the
//! request's plus `n`, so the `traceparent` sent upstream names the attempt's span before it
//! ends. A client's `traceparent` that is not sampled leaves its request without spans.

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use axum::http::{HeaderMap, Request, Response, Uri};
use bytes::Bytes;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue, Value};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanLinks,
    SpanProcessor,
};
use tokio::runtime::Handle;

use crate::StartError;
use crate::config::{Deployment, ProviderKind, Upstream};
use crate::meter::status_name;
use crate::record::{CallRecord, Outcome};

/// Where the data plane's spans go: a batching exporter to an OTLP/HTTP collector.
pub struct Spans {
    processor: BatchSpanProcessor,
    scope: InstrumentationScope,
    ids: RandomIdGenerator,
    propagator: TraceContextPropagator,
}

impl Spans {
    /// Exports to the collector at `endpoint`: its base URL (`http://collector:4318`, to which
    /// `/v1/traces` is added) or the traces URL itself. `instance` names this process
    /// (`service.instance.id`); the service is `loom` unless `OTEL_SERVICE_NAME` says otherwise,
    /// and the exporter also reads `OTEL_EXPORTER_OTLP_HEADERS` (e.g. a collector's token).
    /// Call it inside a tokio runtime: the exports are sent on it.
    pub fn start(endpoint: &str, instance: &str) -> Result<Spans, StartError> {
        let endpoint = endpoint.trim_end_matches('/');
        let url = match endpoint.ends_with("/v1/traces") {
            true => endpoint.to_owned(),
            false => format!("{endpoint}/v1/traces"),
        };
        let client = Client {
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()?,
            runtime: Handle::current(),
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_http_client(client)
            .build()?;
        let mut resource = Resource::builder().with_attributes([
            KeyValue::new("service.instance.id", instance.to_owned()),
            KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        ]);
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name("loom");
        }
        // A bounded queue (2,048 spans) on a thread of its own; spans past it are dropped.
        let mut processor = BatchSpanProcessor::builder(exporter).build();
        processor.set_resource(&resource.build());
        Ok(Spans {
            processor,
            scope: InstrumentationScope::builder("loom")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            ids: RandomIdGenerator::default(),
            propagator: TraceContextPropagator::new(),
        })
    }

    /// Exports what is queued and stops; blocks until then (call it off the async workers).
    pub fn shutdown(&self) {
        if let Err(error) = self.processor.shutdown() {
            tracing::warn!(%error, "could not export the last spans");
        }
    }

    /// The spans of a request to `endpoint` that arrives now with `headers`; `None` if its
    /// client's trace is not sampled.
    pub(crate) fn begin(&self, headers: &HeaderMap, endpoint: &'static str) -> Option<RequestSpan> {
        let client = self.propagator.extract(&HeaderExtractor(headers));
        let client = client.span().span_context().clone();
        if client.is_valid() && !client.is_sampled() {
            return None;
        }
        let (trace_id, parent) = match client.is_valid() {
            true => (client.trace_id(), Some(client.span_id())),
            false => (self.ids.new_trace_id(), None),
        };
        Some(RequestSpan {
            trace_id,
            span_id: self.ids.new_span_id(),
            parent,
            state: client.trace_state().clone(),
            started: SystemTime::now(),
            endpoint,
            model: None,
        })
    }

    /// The request's span, ending now.
    pub(crate) fn request(&self, span: &RequestSpan, ended: &RequestEnded<'_>) {
        let outcome = ended.outcome;
        let (method, route) = span.method_and_route();
        let mut attributes = vec![
            KeyValue::new("http.request.method", method),
            KeyValue::new("http.route", route),
            KeyValue::new("http.response.status_code", i64::from(outcome.http_status)),
            KeyValue::new("loom.trace_id", ended.trace_id.to_owned()),
            KeyValue::new("loom.tenant_id", ended.tenant_id.to_string()),
            KeyValue::new("loom.status", status_name(outcome.status)),
            KeyValue::new("loom.attempts", i64::from(ended.attempts)),
            KeyValue::new("loom.overhead_us", ended.overhead_us),
        ];
        if let Some(operation) = span.operation() {
            attributes.push(KeyValue::new("gen_ai.operation.name", operation));
        }
        push(&mut attributes, "gen_ai.request.model", span.model.clone());
        push(
            &mut attributes,
            "gen_ai.response.model",
            outcome.model.clone(),
        );
        if let Some(provider) = outcome.provider.as_deref() {
            let system = KINDS
                .into_iter()
                .find(|kind| kind.name() == provider)
                .map_or_else(|| provider.to_owned(), |kind| system(kind).to_owned());
            attributes.push(KeyValue::new("gen_ai.system", system.clone()));
            attributes.push(KeyValue::new("gen_ai.provider.name", system));
        }
        push(
            &mut attributes,
            "loom.deployment",
            outcome.deployment.clone(),
        );
        push_usage(
            &mut attributes,
            outcome.usage.tokens_in,
            outcome.usage.tokens_out,
        );
        push(
            &mut attributes,
            "loom.cost_micro_usd",
            outcome.cost_micro_usd,
        );
        push(&mut attributes, "error.type", outcome.error_class.clone());
        let context = span.context(span.span_id);
        self.end(SpanData {
            parent_span_id: span.parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: span.parent.is_some(),
            span_kind: SpanKind::Server,
            name: span.name(),
            start_time: span.started,
            end_time: SystemTime::now(),
            attributes,
            status: status(outcome.error_class.as_deref()),
            ..self.data(context)
        });
    }

    /// An upstream attempt's span, as its `llm_call.completed` records it.
    pub(crate) fn attempt(&self, span: &RequestSpan, attempt: &AttemptEnded<'_>) {
        let call = attempt.call;
        let deployment = attempt.deployment;
        let system = system(attempt.upstream.kind);
        let operation = span.operation().unwrap_or("chat");
        let mut attributes = vec![
            KeyValue::new("gen_ai.operation.name", operation),
            KeyValue::new("gen_ai.system", system),
            KeyValue::new("gen_ai.provider.name", system),
            KeyValue::new("gen_ai.request.model", deployment.model.clone()),
            KeyValue::new(
                "gen_ai.response.model",
                call.served_model.unwrap_or(&deployment.model).to_owned(),
            ),
            KeyValue::new("loom.deployment", deployment.name.clone()),
            KeyValue::new("loom.provider", attempt.upstream.kind.name()),
            KeyValue::new("loom.attempt", i64::from(call.attempt)),
            KeyValue::new("loom.stream", call.stream),
        ];
        if let Ok(uri) = attempt.upstream.base_url.parse::<Uri>() {
            push(
                &mut attributes,
                "server.address",
                uri.host().map(str::to_owned),
            );
            push(
                &mut attributes,
                "server.port",
                uri.port_u16().map(i64::from),
            );
        }
        push(
            &mut attributes,
            "http.response.status_code",
            call.http_status.map(i64::from),
        );
        push(
            &mut attributes,
            "gen_ai.response.id",
            call.response_id.map(str::to_owned),
        );
        push_usage(&mut attributes, call.usage.tokens_in, call.usage.tokens_out);
        push(
            &mut attributes,
            "error.type",
            call.error_class.map(str::to_owned),
        );
        let started =
            UNIX_EPOCH + Duration::from_micros(u64::try_from(call.started_at).unwrap_or(0));
        let context = span.context(span.attempt_id(call.attempt));
        self.end(SpanData {
            parent_span_id: span.span_id,
            span_kind: SpanKind::Client,
            name: Cow::Owned(format!("{operation} {}", deployment.model)),
            start_time: started,
            end_time: started + call.latency,
            attributes,
            status: status(call.error_class),
            ..self.data(context)
        });
    }

    /// A span's data with its context and nothing else.
    fn data(&self, context: SpanContext) -> SpanData {
        SpanData {
            span_context: context,
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Borrowed(""),
            start_time: UNIX_EPOCH,
            end_time: UNIX_EPOCH,
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: Status::Unset,
            instrumentation_scope: self.scope.clone(),
        }
    }

    fn end(&self, span: SpanData) {
        self.processor.on_end(span);
    }
}

/// A request's trace context: its span's ids, chosen when it arrived.
#[derive(Clone, Debug)]
pub(crate) struct RequestSpan {
    trace_id: TraceId,
    span_id: SpanId,
    /// The client's span, if it sent a `traceparent`.
    parent: Option<SpanId>,
    state: opentelemetry::trace::TraceState,
    started: SystemTime,
    /// As `request.received` names it: a path posted to, or `METHOD path`.
    endpoint: &'static str,
    /// The model the client asked for.
    pub model: Option<String>,
}

impl RequestSpan {
    /// Attempt `n`'s span id: the request's plus `n`.
    fn attempt_id(&self, attempt: i32) -> SpanId {
        let id = u64::from_be_bytes(self.span_id.to_bytes());
        let id = id.wrapping_add(u64::try_from(attempt).unwrap_or(0));
        SpanId::from_bytes(id.to_be_bytes())
    }

    fn context(&self, span_id: SpanId) -> SpanContext {
        SpanContext::new(
            self.trace_id,
            span_id,
            TraceFlags::SAMPLED,
            false,
            self.state.clone(),
        )
    }

    /// `traceparent` (and the client's `tracestate`) for attempt `n`'s request upstream.
    pub(crate) fn upstream_headers(&self, spans: &Spans, attempt: i32) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let context =
            Context::new().with_remote_span_context(self.context(self.attempt_id(attempt)));
        spans
            .propagator
            .inject_context(&context, &mut HeaderInjector(&mut headers));
        headers
    }

    fn method_and_route(&self) -> (&'static str, &'static str) {
        self.endpoint
            .split_once(' ')
            .unwrap_or(("POST", self.endpoint))
    }

    /// `POST /v1/chat/completions`, `GET /v1/responses/{id}`, …
    fn name(&self) -> Cow<'static, str> {
        match self.endpoint.starts_with('/') {
            true => Cow::Owned(format!("POST {}", self.endpoint)),
            false => Cow::Borrowed(self.endpoint),
        }
    }

    /// The GenAI operation of a model call; none for the stored-response routes.
    fn operation(&self) -> Option<&'static str> {
        match self.endpoint {
            "/v1/embeddings" => Some("embeddings"),
            "/v1/chat/completions" | "/v1/messages" | "/v1/responses" => Some("chat"),
            _ => None,
        }
    }
}

/// What the request's span says of how it ended.
pub(crate) struct RequestEnded<'a> {
    pub outcome: &'a Outcome,
    pub trace_id: &'a str,
    pub tenant_id: uuid::Uuid,
    pub attempts: i32,
    pub overhead_us: i64,
}

/// What an attempt's span says.
pub(crate) struct AttemptEnded<'a> {
    pub call: &'a CallRecord<'a>,
    pub deployment: &'a Deployment,
    pub upstream: &'a Upstream,
}

const KINDS: [ProviderKind; 4] = [
    ProviderKind::Openai,
    ProviderKind::Azure,
    ProviderKind::Anthropic,
    ProviderKind::OpenaiCompatible,
];

/// `gen_ai.system` / `gen_ai.provider.name` of a provider kind.
fn system(kind: ProviderKind) -> &'static str {
    match kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => "openai",
        ProviderKind::Azure => "azure.ai.openai",
        ProviderKind::Anthropic => "anthropic",
    }
}

fn status(error_class: Option<&str>) -> Status {
    match error_class {
        Some(class) => Status::error(class.to_owned()),
        None => Status::Unset,
    }
}

fn push(attributes: &mut Vec<KeyValue>, key: &'static str, value: Option<impl Into<Value>>) {
    if let Some(value) = value {
        attributes.push(KeyValue::new(key, value));
    }
}

fn push_usage(attributes: &mut Vec<KeyValue>, tokens_in: Option<i64>, tokens_out: Option<i64>) {
    push(attributes, "gen_ai.usage.input_tokens", tokens_in);
    push(attributes, "gen_ai.usage.output_tokens", tokens_out);
}

/// Sends the exporter's requests with reqwest on the gateway's runtime (the exporter runs on a
/// thread of its own, outside any runtime).
#[derive(Debug)]
struct Client {
    http: reqwest::Client,
    runtime: Handle,
}

#[async_trait]
impl HttpClient for Client {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let request = reqwest::Request::try_from(request)?;
        let http = self.http.clone();
        let sent = self.runtime.spawn(async move {
            let response = http.execute(request).await?;
            let status = response.status();
            Ok::<_, reqwest::Error>((status, response.bytes().await?))
        });
        let (status, body) = sent.await??;
        Ok(Response::builder().status(status).body(body)?)
    }
}
