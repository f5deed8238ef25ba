//! The `/v1/*` handlers: decode the request, run it through auth, routing and the upstream
//! attempts, record it, and encode the answer in the client's dialect.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use loom_schemas::event::{CallStatus, RequestReceived};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::anthropic;
use crate::auth::Caller;
use crate::error::GatewayError;
use crate::flow::{Dialect, Flow, set_headers};
use crate::http::AppState;
use crate::providers::{Operation, adapter};
use crate::record::{CallRecord, Outcome, Usage, call_event};
use crate::routing::route;
use crate::stream::ChatStream;
use crate::tokens;
use crate::upstream::{Answer, AttemptError, call_upstream};

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match begin(
        &state,
        caller,
        &headers,
        body,
        "/v1/chat/completions",
        Dialect::OpenAi,
    )
    .await
    {
        Ok((flow, request)) => run_chat(flow, request).await,
        Err(response) => response,
    }
}

/// `POST /v1/messages` (Anthropic's Messages API), served by translating to and from chat.
pub async fn messages(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (flow, request) = match begin(
        &state,
        caller,
        &headers,
        body,
        "/v1/messages",
        Dialect::Anthropic,
    )
    .await
    {
        Ok(started) => started,
        Err(response) => return response,
    };
    if request.get("max_tokens").and_then(Value::as_u64).is_none() {
        return flow
            .fail(GatewayError::InvalidRequest(
                "max_tokens: Field required".into(),
            ))
            .await;
    }
    run_chat(flow, anthropic::request::messages_to_chat(&request)).await
}

/// `POST /v1/embeddings`
pub async fn embeddings(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (mut flow, request) = match begin(
        &state,
        caller,
        &headers,
        body,
        "/v1/embeddings",
        Dialect::OpenAi,
    )
    .await
    {
        Ok(started) => started,
        Err(response) => return response,
    };
    let order = match admit_to_route(&flow, &request, "input").await {
        Ok(order) => order,
        Err(response) => return response,
    };
    match call_upstream(&mut flow, &order, Operation::Embeddings, &request, false).await {
        Ok(answer) => finish_json(flow, answer, Operation::Embeddings, &request).await,
        Err((error, _)) => flow.fail(error.to_client()).await,
    }
}

/// `GET /v1/models`: the aliases this gateway serves (to any valid key).
pub async fn models(State(state): State<AppState>, caller: Caller) -> Response {
    let started = Instant::now();
    let mut response = match caller.key {
        None => GatewayError::InvalidApiKey.into_response(),
        Some(_) => {
            let data: Vec<Value> = state
                .gateway
                .config
                .models
                .keys()
                .map(|alias| json!({"id": alias, "object": "model", "created": 0, "owned_by": "loom"}))
                .collect();
            Json(json!({"object": "list", "data": data})).into_response()
        }
    };
    // A listing is not a traced request (no events), but it carries the same headers.
    set_headers(&mut response, &caller.trace_id, started.elapsed());
    response
}

/// Starts a request: reads and parses the body and queues `request.received`. `Err` is the
/// response to send (its events already recorded).
async fn begin(
    state: &AppState,
    caller: Caller,
    headers: &HeaderMap,
    body: Body,
    endpoint: &'static str,
    dialect: Dialect,
) -> Result<(Flow, Value), Response> {
    let gateway = Arc::clone(&state.gateway);
    let flow = Flow {
        dialect,
        gateway: Arc::clone(&gateway),
        producer: Arc::clone(&state.services.producer),
        keys: Arc::clone(&state.services.keys),
        trace_id: caller.trace_id,
        tenant_id: caller.key.as_ref().map_or(Uuid::nil(), |k| k.tenant_id),
        key: caller.key,
        started: Instant::now(),
        outside: Duration::ZERO,
        attempts: 0,
    };
    let limit = gateway.config.limits.max_body_bytes;
    let read = axum::body::to_bytes(body, limit).await;
    let bytes = read.as_ref().ok().cloned().unwrap_or_default();
    let parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
    let field = |name: &str| parsed.as_ref().and_then(|v| v.get(name));
    let received = flow.received(
        RequestReceived {
            endpoint: endpoint.to_owned(),
            project_id: flow.key.as_ref().and_then(|k| k.project_id),
            api_key_id: flow.key.as_ref().map(|k| k.key_id),
            user: field("user").and_then(Value::as_str).map(str::to_owned),
            model: field("model")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            stream: field("stream").and_then(Value::as_bool).unwrap_or(false),
            user_agent: headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            body_bytes: i64::try_from(bytes.len()).unwrap_or(i64::MAX),
            body_digest: Vec::new(),
            body: None,
        },
        &bytes,
    );
    if gateway.emitter.admit(received).await.is_err() {
        return Err(flow.error_response(&GatewayError::EventQueueFull));
    }
    if flow.key.is_none() {
        return Err(flow.fail(GatewayError::InvalidApiKey).await);
    }
    if read.is_err() {
        return Err(flow.fail(GatewayError::BodyTooLarge { limit }).await);
    }
    let Some(parsed) = parsed.filter(Value::is_object) else {
        let error = GatewayError::InvalidRequest("the request body is not a JSON object".into());
        return Err(flow.fail(error).await);
    };
    for event in flow.tool_results(&parsed) {
        flow.gateway.emitter.emit(event).await;
    }
    Ok((flow, parsed))
}

/// Checks that a request names a model and carries `field` (`messages` must be an array), and
/// routes it: the deployments to try, with `routing.decided` recorded. `Err` is the response.
async fn admit_to_route(flow: &Flow, request: &Value, field: &str) -> Result<Vec<usize>, Response> {
    let Some(alias) = request.get("model").and_then(Value::as_str) else {
        let error = GatewayError::InvalidRequest("`model` is required".into());
        return Err(flow.fail(error).await);
    };
    let present = match field {
        "messages" => request.get(field).is_some_and(Value::is_array),
        _ => request.get(field).is_some(),
    };
    if !present {
        let error = GatewayError::InvalidRequest(format!("`{field}` is required"));
        return Err(flow.fail(error).await);
    }
    let Some((order, decided)) = route(flow, alias) else {
        return Err(flow
            .fail(GatewayError::ModelNotFound(alias.to_owned()))
            .await);
    };
    flow.gateway.emitter.emit(decided).await;
    Ok(order)
}

/// Routes and answers an OpenAI-shaped chat request.
async fn run_chat(mut flow: Flow, mut request: Value) -> Response {
    let order = match admit_to_route(&flow, &request, "messages").await {
        Ok(order) => order,
        Err(response) => return response,
    };

    let stream = request.get("stream").and_then(Value::as_bool) == Some(true);
    let asked_for_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    if stream && !asked_for_usage {
        // Ask for usage so the call is priced; the extra chunk is stripped before the client.
        request["stream_options"] = json!({"include_usage": true});
    }
    // Anthropic clients always get usage (in `message_delta`).
    let client_wants_usage = asked_for_usage || flow.dialect == Dialect::Anthropic;
    let answer = match call_upstream(&mut flow, &order, Operation::Chat, &request, stream).await {
        Ok(answer) => answer,
        Err((error, deployment)) => {
            let outcome = deployment.map_or_else(Outcome::default, |d| Outcome::at(&flow, d));
            return flow.fail_with(outcome, error.to_client()).await;
        }
    };
    if stream {
        return ChatStream::respond(flow, answer, request, client_wants_usage);
    }
    finish_json(flow, answer, Operation::Chat, &request).await
}

/// Reads a JSON answer, records it, and sends it to the client.
async fn finish_json(
    mut flow: Flow,
    mut answer: Answer,
    operation: Operation,
    request: &Value,
) -> Response {
    let status = answer.status;
    let remaining = flow.gateway.config.routing.attempt_timeout;
    let body = match answer.response.take() {
        None => Err(AttemptError::timeout()),
        Some(response) => match tokio::time::timeout(remaining, response.bytes()).await {
            Ok(Ok(body)) => Ok(body),
            Ok(Err(error)) => Err(AttemptError::from_transport(&error)),
            Err(_) => Err(AttemptError::timeout()),
        },
    };
    let latency = answer.sent_at.elapsed();
    flow.outside += latency;
    let gateway = Arc::clone(&flow.gateway);
    let deployment = &gateway.config.deployments[answer.deployment];
    let body = match body {
        Ok(body) => body,
        Err(error) => {
            let call = CallRecord::failed(
                answer.deployment,
                answer.attempt,
                answer.started_at,
                latency,
                &error,
                false,
                &answer.request_body,
            );
            gateway.emitter.emit(call_event(&flow, call)).await;
            let outcome = Outcome::at(&flow, answer.deployment);
            return flow.fail_with(outcome, error.to_client()).await;
        }
    };
    // What the upstream sent is recorded; the client gets it in OpenAI's shape.
    let received = body;
    let body = adapter(gateway.config.upstreams[deployment.upstream].kind).answer(received.clone());
    let parsed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let usage = match parsed.get("usage").filter(|u| u.is_object()) {
        Some(usage) => Usage::from_openai(usage),
        None => Usage::estimate(request, &tokens::answer_text(&parsed)),
    };
    let served_model = parsed.get("model").and_then(Value::as_str);
    let cost_micro_usd = flow.cost(answer.deployment, served_model, &usage);
    gateway
        .emitter
        .emit(call_event(
            &flow,
            CallRecord {
                usage,
                served_model,
                ..CallRecord::answered(&answer, latency, CallStatus::Ok, None, &received, false)
            },
        ))
        .await;
    if operation == Operation::Chat {
        let tool_calls = parsed
            .pointer("/choices/0/message/tool_calls")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for event in flow.tool_calls(&tool_calls) {
            gateway.emitter.emit(event).await;
        }
    }
    let outcome = Outcome {
        model: Some(served_model.unwrap_or(&deployment.model).to_owned()),
        usage,
        cost_micro_usd,
        ..Outcome::at(&flow, answer.deployment)
    };
    if let Err(unrecorded) = flow.complete(&outcome).await {
        return flow.error_response(&unrecorded);
    }
    let body = match (flow.dialect, operation) {
        (Dialect::Anthropic, Operation::Chat) => {
            Bytes::from(anthropic::response::chat_to_message(&parsed).to_string())
        }
        _ => body,
    };
    let mut response = Response::builder()
        .status(status.as_u16())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| GatewayError::Internal("could not build the response").into_response());
    flow.headers(&mut response);
    response
}
