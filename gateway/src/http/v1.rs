//! The `/v1/*` handlers: decode the request, run it through auth, routing and the upstream
//! attempts, record it, and encode the answer in the client's dialect.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, Method, Uri, header};
use axum::response::{IntoResponse, Response};
use loom_schemas::event::{CacheHit, CallStatus, QuotaScope, RequestReceived, RequestStatus};
use loom_schemas::project::{MAX_NAME_BYTES, RoutingPolicy};
use loom_schemas::roles::Permission;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::Caller;
use crate::body::ClientBody;
use crate::cache::Cached;
use crate::control::ApiKeyInfo;
use crate::error::GatewayError;
use crate::flow::{Dialect, Flow, set_headers};
use crate::gateway::Gateway;
use crate::guard;
use crate::http::AppState;
use crate::policy::OutputScan;
use crate::providers::Operation;
use crate::quota::Scope;
use crate::record::{CallRecord, Outcome, Usage, call_event};
use crate::routing::{allows, plan, route};
use crate::stream::ChatStream;
use crate::tokens;
use crate::upstream::{Answer, AttemptError, Outgoing, call_upstream};

/// `POST /v1/chat/completions`
pub async fn chat_completions(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    chat_like(&state, caller, &headers, body, Operation::Chat).await
}

/// `POST /v1/messages` (Anthropic's Messages API): as sent to Anthropic deployments, translated to
/// and from chat for the others.
pub async fn messages(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    chat_like(&state, caller, &headers, body, Operation::Messages).await
}

/// `POST /v1/responses` (OpenAI's Responses API): as sent to OpenAI and Azure deployments,
/// translated to and from chat for the others.
pub async fn responses(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    chat_like(&state, caller, &headers, body, Operation::Responses).await
}

/// Starts, checks and answers a chat-like request in `operation`'s API.
async fn chat_like(
    state: &AppState,
    caller: Caller,
    headers: &HeaderMap,
    body: Body,
    operation: Operation,
) -> Response {
    let (endpoint, dialect) = match operation {
        Operation::Messages => ("/v1/messages", Dialect::Anthropic),
        Operation::Responses => ("/v1/responses", Dialect::OpenAi),
        Operation::Chat | Operation::Embeddings => ("/v1/chat/completions", Dialect::OpenAi),
    };
    let (flow, body) = match begin(state, caller, headers, Some(body), endpoint, dialect).await {
        Ok(started) => started,
        Err(response) => return response,
    };
    if let Some(problem) = malformed(operation, &body.json) {
        return flow
            .fail(GatewayError::InvalidRequest(problem.into()))
            .await;
    }
    let (gateway, left) = (Arc::clone(&flow.gateway), flow.client_left.clone());
    to_completion(&gateway, left, run_chat(flow, operation, body)).await
}

/// Runs the rest of a request (its `request.received` recorded) as a task of its own, so that a
/// client hanging up does not stop it half-way: the upstream's answer, paid for either way, is
/// still recorded and settled, the request marked `client_cancelled` (`left` tells it). A stream
/// the client never reads is dropped, and recorded as such, when its response is.
async fn to_completion(
    gateway: &Gateway,
    left: CancellationToken,
    rest: impl Future<Output = Response> + Send + 'static,
) -> Response {
    let leaving = left.drop_guard();
    let answer = gateway.tasks.spawn(rest).await;
    leaving.disarm();
    answer.unwrap_or_else(|_| GatewayError::Internal("the request failed").into_response())
}

/// What a request lacks or has that its API refuses (and Loom cannot serve), if anything.
fn malformed(operation: Operation, request: &Value) -> Option<&'static str> {
    match operation {
        Operation::Messages if request.get("max_tokens").and_then(Value::as_u64).is_none() => {
            Some("max_tokens: Field required")
        }
        Operation::Responses => {
            let input = request.get("input");
            if input.is_some_and(|i| !(i.is_string() || i.is_array() || i.is_null())) {
                return Some("`input` must be a string or an array of input items");
            }
            (request.get("background") == Some(&Value::Bool(true))).then_some(
                "`background` is not supported: Loom answers and records each response while \
                 it is made; send the request without it (or stream it)",
            )
        }
        _ => None,
    }
}

/// `GET /v1/responses/{id}`, `GET /v1/responses/{id}/input_items` and `DELETE
/// /v1/responses/{id}`: passed to the upstream that made the response, for the tenant that made
/// it (anyone else gets 404).
pub async fn stored_response(
    State(state): State<AppState>,
    caller: Caller,
    method: Method,
    uri: Uri,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let items = uri.path().ends_with("/input_items");
    let endpoint = match (&method, items) {
        (&Method::DELETE, _) => "DELETE /v1/responses/{id}",
        (_, true) => "GET /v1/responses/{id}/input_items",
        _ => "GET /v1/responses/{id}",
    };
    let (mut flow, _) = match begin(&state, caller, &headers, None, endpoint, Dialect::OpenAi).await
    {
        Ok(started) => started,
        Err(response) => return response,
    };
    let Some(deployment) = flow.owner_of_response(&id).await else {
        let error = GatewayError::NotFound(format!(
            "No response with id '{id}' is stored for your tenant."
        ));
        return flow.fail(error).await;
    };
    let segments: &[&str] = if items { &[&id, "input_items"] } else { &[&id] };
    let outgoing = Outgoing::Stored {
        method: &method,
        segments,
        query: uri.query(),
    };
    match call_upstream(&mut flow, &[deployment], outgoing, false).await {
        Ok(answer) => {
            if method == Method::DELETE {
                flow.gateway.stored.forget(&id);
            }
            finish_json(flow, answer, None).await
        }
        Err((error, deployment)) => {
            let outcome = deployment.map_or_else(Outcome::default, |d| Outcome::at(&flow, d));
            flow.fail_with(outcome, error.to_client()).await
        }
    }
}

/// `POST /v1/embeddings`
pub async fn embeddings(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let endpoint = "/v1/embeddings";
    let (mut flow, body) = match begin(
        &state,
        caller,
        &headers,
        Some(body),
        endpoint,
        Dialect::OpenAi,
    )
    .await
    {
        Ok(started) => started,
        Err(response) => return response,
    };
    let operation = Operation::Embeddings;
    let order = match admit_to_route(&mut flow, &body.json, operation, None).await {
        Ok(order) => order,
        Err(response) => return response,
    };
    let (gateway, left) = (Arc::clone(&flow.gateway), flow.client_left.clone());
    let rest = async move {
        let outgoing = Outgoing::Request {
            operation,
            body: &body,
        };
        match call_upstream(&mut flow, &order, outgoing, false).await {
            Ok(answer) => finish_json(flow, answer, Some(&body.json)).await,
            Err((error, _)) => flow.fail(error.to_client()).await,
        }
    };
    to_completion(&gateway, left, rest).await
}

/// `GET /v1/models`: the aliases this gateway serves that the key's project may call (to any
/// valid key).
pub async fn models(State(state): State<AppState>, caller: Caller) -> Response {
    let started = Instant::now();
    let mut response = match caller.key {
        None => GatewayError::InvalidApiKey.into_response(),
        Some(key) => {
            let policy = routing_policy(&state, &key);
            let data: Vec<Value> = state
                .gateway
                .config
                .models
                .values()
                .filter(|model| allows(policy.as_deref(), model))
                .map(|model| json!({"id": model.alias, "object": "model", "created": 0, "owned_by": "loom"}))
                .collect();
            Json(json!({"object": "list", "data": data})).into_response()
        }
    };
    // A listing is not a traced request (no events), but it carries the same headers.
    set_headers(&mut response, &caller.trace_id, started.elapsed());
    response
}

/// `GET /v1/quota/status`: the caller's scopes — its tenant, project, key, and the user named by
/// `x-loom-user` or `?user=` — with their limits, today's usage and what is left (any role).
pub async fn quota_status(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let started = Instant::now();
    let mut response = match quota_views(&state, caller.key.as_ref(), &headers, &query) {
        Ok(scopes) => Json(json!({"object": "quota.status", "scopes": scopes})).into_response(),
        Err(error) => error.into_response(),
    };
    set_headers(&mut response, &caller.trace_id, started.elapsed());
    response
}

fn quota_views(
    state: &AppState,
    key: Option<&ApiKeyInfo>,
    headers: &HeaderMap,
    query: &HashMap<String, String>,
) -> Result<Vec<crate::admin::QuotaView>, GatewayError> {
    let key = key.ok_or(GatewayError::InvalidApiKey)?;
    if !key.role.allows(Permission::ReadUsage) {
        return Err(GatewayError::PermissionDenied(
            Permission::ReadUsage.describe().into(),
        ));
    }
    let named = query.get("user").map(|u| json!({ "user": u }));
    let user = end_user(headers, named.as_ref()).map_err(GatewayError::InvalidRequest)?;
    let tenant = key.tenant_id;
    let mut scopes = vec![Scope::of(tenant, QuotaScope::Tenant, tenant)];
    scopes.extend(
        key.project_id
            .map(|p| Scope::of(tenant, QuotaScope::Project, p)),
    );
    scopes.extend(user.as_deref().map(|u| Scope::user(tenant, u)));
    scopes.push(Scope::of(tenant, QuotaScope::ApiKey, key.key_id));
    let gateway = &state.gateway;
    Ok(scopes
        .iter()
        .map(|scope| {
            state
                .services
                .quota_view(scope, Some(&gateway.quotas), &gateway.config.quotas)
        })
        .collect())
}

/// The routing policy of the project a key is bound to, if it is bound to one.
fn routing_policy(state: &AppState, key: &ApiKeyInfo) -> Option<Arc<RoutingPolicy>> {
    let project = key.project_id?;
    (state.services.control).read(|s| s.project(project).map(|p| Arc::clone(&p.routing)))
}

/// Names the end user a request is for (its quotas, its traces).
const USER: HeaderName = HeaderName::from_static("x-loom-user");

/// Starts a request: reads and parses its body (a `GET` or `DELETE` has none) and queues
/// `request.received`. `Err` is the response to send (its events already recorded).
async fn begin(
    state: &AppState,
    caller: Caller,
    headers: &HeaderMap,
    body: Option<Body>,
    endpoint: &'static str,
    dialect: Dialect,
) -> Result<(Flow, ClientBody), Response> {
    let gateway = Arc::clone(&state.gateway);
    let policy = caller
        .key
        .as_ref()
        .and_then(|key| routing_policy(state, key));
    let mut flow = Flow {
        dialect,
        gateway: Arc::clone(&gateway),
        producer: Arc::clone(&state.services.producer),
        keys: Arc::clone(&state.services.keys),
        trace_id: caller.trace_id,
        tenant_id: caller.key.as_ref().map_or(Uuid::nil(), |k| k.tenant_id),
        key: caller.key,
        user: None,
        control: state.services.control.clone(),
        quota: None,
        policy,
        security: None,
        cache: None,
        forwarded: gateway
            .config
            .forward_headers
            .iter()
            .filter_map(|name| Some((name.clone(), headers.get(name)?.clone())))
            .collect(),
        started: Instant::now(),
        outside: Duration::ZERO,
        attempts: 0,
        client_left: CancellationToken::new(),
        span: (gateway.spans.as_ref()).and_then(|spans| spans.begin(headers, endpoint)),
    };
    let limit = gateway.config.limits.max_body_bytes;
    let expects_body = body.is_some();
    let read = match body {
        Some(body) => axum::body::to_bytes(body, limit).await.map_err(|_| ()),
        None => Ok(Bytes::new()),
    };
    let mut bytes = read.as_ref().ok().cloned().unwrap_or_default();
    let mut parsed: Option<Value> = serde_json::from_slice(&bytes).ok();
    // The prompt is screened before it is recorded or sent: what the policy redacts (or blocks)
    // is in neither.
    let mut unscreened = None;
    if let Some(key) = &flow.key {
        match guard::policy_of(&gateway, &flow.control, key) {
            Ok(policy) => flow.security = Some(policy),
            Err(error) => {
                (bytes, parsed) = (Bytes::new(), None);
                unscreened = Some(error);
            }
        }
    }
    let screening = match parsed.as_mut().filter(|p| p.is_object()) {
        Some(request) => {
            let screening = flow.screen(request);
            if let Some(screening) = &screening
                && screening.changed
            {
                let fields: Vec<(&str, &str)> = (screening.redacted.iter())
                    .map(|(field, json)| (*field, json.as_str()))
                    .collect();
                // Every other byte stays as the client sent it (`patched` cannot fail on an
                // object; if it did, the parsed request, redacted, is what is recorded and sent).
                bytes = crate::body::patched(&bytes, &fields)
                    .or_else(|| Some(Bytes::from(serde_json::to_vec(parsed.as_ref()?).ok()?)))
                    .unwrap_or_default();
            }
            screening
        }
        // Not a JSON object: refused further on, but recorded first, as one text.
        None if !bytes.is_empty() => {
            let mut text = String::from_utf8_lossy(&bytes).into_owned();
            let screening = flow.screen_text(&mut text);
            if screening.as_ref().is_some_and(|s| s.changed) {
                (bytes, parsed) = (Bytes::from(text), None);
            }
            screening
        }
        None => None,
    };
    let field = |name: &str| parsed.as_ref().and_then(|v| v.get(name));
    let user = end_user(headers, parsed.as_ref());
    if let Some(span) = &mut flow.span {
        span.model = field("model").and_then(Value::as_str).map(str::to_owned);
    }
    flow.user = user.clone().ok().flatten();
    let received = flow.received(
        RequestReceived {
            endpoint: endpoint.to_owned(),
            project_id: flow.key.as_ref().and_then(|k| k.project_id),
            api_key_id: flow.key.as_ref().map(|k| k.key_id),
            user: flow.user.as_deref().map(str::to_owned),
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
    let mut blocking = Vec::new();
    if let Some(screening) = screening {
        blocking = screening.blocking;
        let evaluated = flow.policy_event(
            false,
            screening.action,
            screening.findings,
            screening.latency,
        );
        flow.gateway.emitter.emit(evaluated).await;
    }
    let Some(role) = flow.key.as_ref().map(|k| k.role) else {
        return Err(flow.fail(GatewayError::InvalidApiKey).await);
    };
    if !role.allows(Permission::Inference) {
        let error = GatewayError::PermissionDenied(Permission::Inference.describe().into());
        return Err(flow.fail(error).await);
    }
    if read.is_err() {
        return Err(flow.fail(GatewayError::BodyTooLarge { limit }).await);
    }
    if let Err(problem) = user {
        return Err(flow.fail(GatewayError::InvalidRequest(problem)).await);
    }
    if !expects_body {
        return Ok((flow, ClientBody::new(bytes, Value::Null)));
    }
    if let Some(error) = unscreened {
        return Err(flow.fail(error).await);
    }
    let Some(parsed) = parsed.filter(Value::is_object) else {
        let error = GatewayError::InvalidRequest("the request body is not a JSON object".into());
        return Err(flow.fail(error).await);
    };
    if !blocking.is_empty() {
        return Err(flow.fail(GatewayError::PromptBlocked(blocking)).await);
    }
    for event in flow.tool_results(&parsed) {
        flow.gateway.emitter.emit(event).await;
    }
    Ok((flow, ClientBody::new(bytes, parsed)))
}

/// The end user a request is for: the `x-loom-user` header, else the body's `user` (OpenAI) or
/// `metadata.user_id` (Anthropic). Empty is none; over 256 bytes is refused, naming the field.
fn end_user(headers: &HeaderMap, body: Option<&Value>) -> Result<Option<Box<str>>, String> {
    let (field, user) = match headers.get(USER) {
        Some(value) => (
            "x-loom-user",
            Some(
                value
                    .to_str()
                    .map_err(|_| "x-loom-user: not valid text".to_owned())?,
            ),
        ),
        None => {
            let user = body.and_then(|b| b.get("user")).and_then(Value::as_str);
            let metadata = || body?.pointer("/metadata/user_id")?.as_str();
            match user {
                Some(user) => ("user", Some(user)),
                None => ("metadata.user_id", metadata()),
            }
        }
    };
    match user.map(str::trim).filter(|u| !u.is_empty()) {
        Some(user) if user.len() > MAX_NAME_BYTES => Err(format!(
            "{field}: at most {MAX_NAME_BYTES} bytes (got {})",
            user.len()
        )),
        user => Ok(user.map(Box::from)),
    }
}

/// Checks that a request names a model and carries what `operation` needs (`messages` as an
/// array, `input`), and routes it: the deployments to try, with `routing.decided` recorded.
/// `pinned` is the upstream holding the request's `previous_response_id`. `Err` is the response.
async fn admit_to_route(
    flow: &mut Flow,
    request: &Value,
    operation: Operation,
    pinned: Option<usize>,
) -> Result<Vec<usize>, Response> {
    let Some(alias) = request.get("model").and_then(Value::as_str) else {
        let error = GatewayError::InvalidRequest("`model` is required".into());
        return Err(flow.fail(error).await);
    };
    let missing = match operation {
        Operation::Chat | Operation::Messages => {
            (!request.get("messages").is_some_and(Value::is_array)).then_some("messages")
        }
        Operation::Embeddings => request.get("input").is_none().then_some("input"),
        Operation::Responses => None,
    };
    if let Some(field) = missing {
        let error = GatewayError::InvalidRequest(format!("`{field}` is required"));
        return Err(flow.fail(error).await);
    }
    let plan = match plan(flow, alias) {
        Ok(plan) => plan,
        Err(error) => return Err(flow.fail(error).await),
    };
    let (order, decided) = route(flow, &plan, pinned);
    let limit = flow
        .policy
        .as_deref()
        .and_then(|p| p.max_cost_per_request_micro_usd);
    if let Some(limit) = limit {
        let embeddings = operation == Operation::Embeddings;
        if let Some(estimate) = flow.estimate_cost(request, embeddings, &order)
            && estimate > limit
        {
            flow.gateway.emitter.emit(decided).await;
            let error = GatewayError::CostLimitExceeded { estimate, limit };
            return Err(flow.fail(error).await);
        }
    }
    flow.gateway.emitter.emit(decided).await;
    let embeddings = operation == Operation::Embeddings;
    if let Err(error) = flow.reserve(request, embeddings, &order).await {
        return Err(flow.fail(error).await);
    }
    Ok(order)
}

/// Routes and answers a chat-like request (OpenAI chat, Anthropic Messages, OpenAI Responses:
/// `operation`).
async fn run_chat(mut flow: Flow, operation: Operation, mut body: ClientBody) -> Response {
    let previous = body
        .json
        .get("previous_response_id")
        .and_then(Value::as_str)
        .filter(|_| operation == Operation::Responses);
    let pinned = match previous {
        Some(id) => flow.owner_of_response(id).await,
        None => None,
    }
    .map(|deployment| flow.gateway.config.deployments[deployment].upstream);
    // The project's response cache: the same request, answered before, is answered again.
    // Not the Responses API's, whose answers the upstream keeps and chains.
    if operation != Operation::Responses
        && let Some((project, flag)) = flow.cache_flag()
        && let Some(key) = flow.cache_key(operation.name(), &body.json)
    {
        let alias = body.json.get("model").and_then(Value::as_str);
        if let Some(alias) = alias
            && plan(&flow, alias).is_ok()
            && let Some(hit) = flow.gateway.cache.get(project, flag, &key)
        {
            let alias = alias.to_owned();
            return replay(flow, &hit, &key, alias).await;
        }
        flow.cache = Some((project, flag, key));
    }
    let order = match admit_to_route(&mut flow, &body.json, operation, pinned).await {
        Ok(order) => order,
        Err(response) => return response,
    };
    let stream = body.json.get("stream").and_then(Value::as_bool) == Some(true);
    let asked_for_usage = body
        .json
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    if operation == Operation::Chat && stream && !asked_for_usage {
        // Ask for usage so the call is priced; the extra chunk is stripped before the client.
        let mut options = body
            .json
            .get("stream_options")
            .filter(|o| o.is_object())
            .cloned()
            .unwrap_or_else(|| json!({}));
        options["include_usage"] = json!(true);
        body.set("stream_options", options);
    }
    // Anthropic and Responses clients always get usage (in `message_delta`, `response.completed`).
    let client_wants_usage = asked_for_usage || operation != Operation::Chat;
    let outgoing = Outgoing::Request {
        operation,
        body: &body,
    };
    let answer = match call_upstream(&mut flow, &order, outgoing, stream).await {
        Ok(answer) => answer,
        Err((error, deployment)) => {
            let outcome = deployment.map_or_else(Outcome::default, |d| Outcome::at(&flow, d));
            return flow.fail_with(outcome, error.to_client()).await;
        }
    };
    if stream {
        return ChatStream::respond(flow, answer, body.json, client_wants_usage);
    }
    finish_json(flow, answer, Some(&body.json)).await
}

/// Answers a request from its project's cache: `cache.hit`, then `request.completed` (nothing
/// spent: no upstream was called), then the answer as the client that asked first got it.
async fn replay(flow: Flow, hit: &Cached, key: &[u8], alias: String) -> Response {
    let event = flow.event(CacheHit {
        project_id: flow.key.as_ref().and_then(|k| k.project_id),
        model: alias,
        key_digest: key.iter().take(16).copied().collect(),
        source_trace_id: hit.trace_id.clone(),
        stream: hit.stream,
        tokens_in: hit.usage.tokens_in,
        tokens_out: hit.usage.tokens_out,
        cost_saved_micro_usd: hit.cost_micro_usd,
        age_ms: i64::try_from(hit.age().as_millis()).unwrap_or(i64::MAX),
    });
    flow.gateway.emitter.emit(event).await;
    let outcome = Outcome {
        model: hit.model.clone(),
        provider: Some(CACHE_PROVIDER.to_owned()),
        cost_micro_usd: Some(0),
        ..Outcome::default()
    };
    if let Err(unrecorded) = flow.complete(&outcome).await {
        return flow.error_response(&unrecorded);
    }
    let content_type = if hit.stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(CACHE_HEADER, "hit")
        .body(Body::from(hit.body.clone()))
        .unwrap_or_else(|_| GatewayError::Internal("could not build the response").into_response());
    flow.headers(&mut response);
    response
}

/// What `request.completed` names as the provider of an answer from the cache.
const CACHE_PROVIDER: &str = "loom-cache";
/// Says an answer came from the project's response cache.
const CACHE_HEADER: HeaderName = HeaderName::from_static("x-loom-cache");

/// Reads a JSON answer to the client's `request`, records it, and sends it to the client. A
/// stored response fetched or deleted (no `request`) is recorded but not metered again.
async fn finish_json(mut flow: Flow, mut answer: Answer, request: Option<&Value>) -> Response {
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
            let call = CallRecord::failed(answer.attempt(), latency, &error, false);
            gateway.emitter.emit(call_event(&flow, call)).await;
            let outcome = Outcome::at(&flow, answer.deployment);
            return flow.fail_with(outcome, error.to_client()).await;
        }
    };
    // What the upstream sent is recorded, and read as chat; the client gets it in its API.
    let received = body;
    let parsed = answer
        .leg
        .observed(serde_json::from_slice(&received).unwrap_or(Value::Null));
    let usage = match (request, parsed.get("usage").filter(|u| u.is_object())) {
        (None, _) => Usage::default(),
        (Some(_), Some(usage)) => Usage::from_openai(usage),
        (Some(request), None) => Usage::estimate(request, &tokens::answer_text(&parsed)),
    };
    let served_model = parsed.get("model").and_then(Value::as_str);
    let response_id = parsed.get("id").and_then(Value::as_str);
    let cost_micro_usd = flow.cost(answer.deployment, served_model, &usage);
    if let Some(request) = request {
        flow.remember_response(&answer, response_id, request);
    }
    gateway
        .emitter
        .emit(call_event(
            &flow,
            CallRecord {
                usage,
                served_model,
                response_id,
                ..CallRecord::answered(&answer, latency, CallStatus::Ok, None, &received, false)
            },
        ))
        .await;
    if request.is_some() && answer.leg.client != Operation::Embeddings {
        let tool_calls = parsed
            .pointer("/choices/0/message/tool_calls")
            .and_then(Value::as_array)
            .map_or(&[][..], Vec::as_slice);
        for event in flow.tool_calls(tool_calls) {
            gateway.emitter.emit(event).await;
        }
    }
    let outcome = Outcome {
        model: Some(served_model.unwrap_or(&deployment.model).to_owned()),
        usage,
        cost_micro_usd,
        ..Outcome::at(&flow, answer.deployment)
    };
    if request.is_some() && answer.leg.client != Operation::Embeddings {
        let mut scan = OutputScan::default();
        flow.scan_output(&mut scan, &tokens::answer_text(&parsed), true);
        if let Some(action) = scan.action() {
            let findings = std::mem::take(&mut scan.findings);
            let evaluated = flow.policy_event(true, action, findings, scan.latency);
            gateway.emitter.emit(evaluated).await;
        }
        if !scan.cut.is_empty() {
            return flow
                .fail_with(outcome, GatewayError::OutputBlocked(scan.cut))
                .await;
        }
    }
    let outcome = if flow.client_left.is_cancelled() {
        Outcome {
            status: RequestStatus::ClientCancelled,
            error_class: Some(GatewayError::ClientCancelled.error_class().to_owned()),
            ..outcome
        }
    } else {
        outcome
    };
    if let Err(unrecorded) = flow.complete(&outcome).await {
        return flow.error_response(&unrecorded);
    }
    let body = answer
        .leg
        .answer(received, &parsed, request.unwrap_or(&Value::Null));
    if let Some((project, flag, key)) = flow.cache.take()
        && status.is_success()
    {
        let cached = Cached::new(
            body.clone(),
            false,
            outcome.model.clone(),
            usage,
            cost_micro_usd,
            flow.trace_id.clone(),
        );
        gateway.cache.put(project, flag, key, cached);
    }
    let mut response = Response::builder()
        .status(status.as_u16())
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .unwrap_or_else(|_| GatewayError::Internal("could not build the response").into_response());
    flow.headers(&mut response);
    response
}
