//! A mock LLM upstream speaking the OpenAI (chat, embeddings, Responses), Azure OpenAI and
//! Anthropic APIs, for Loom's tests and benchmarks: JSON and SSE streaming, tool calls, prompt
//! caching (Anthropic's `cache_control`, OpenAI's automatic prefix cache), extended thinking,
//! stored responses, configurable latency, and faults injected on demand (error statuses, hangs,
//! truncated streams).
//!
//! Control endpoints:
//! - `POST /mock/faults` with `{"faults": [Fault, …]}` queues faults; each LLM request takes the
//!   next one. `DELETE /mock/faults` clears them.
//! - `GET /mock/requests` lists the last requests received (method, path, headers, the body as
//!   sent and parsed); `DELETE /mock/requests` clears them.
//! - `DELETE /mock/cache` empties the prompt cache (the next request writes it again).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// How the mock behaves when no fault is queued.
#[derive(Debug, Clone, Default)]
pub struct MockConfig {
    /// Wait before answering (before the first byte of a stream).
    pub latency: Duration,
    /// Wait between streamed chunks.
    pub chunk_delay: Duration,
    /// When set, requests must carry this key (`Authorization: Bearer`, `api-key` or `x-api-key`).
    pub api_key: Option<String>,
}

/// A fault the next LLM request suffers.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// Answer with this HTTP status and an error body (`retry_after` seconds for 429s).
    Status {
        status: u16,
        #[serde(default)]
        retry_after: Option<u64>,
    },
    /// Never answer: the client's timeout has to fire.
    Hang,
    /// Stream this many chunks, then end the stream without its terminator.
    Truncate { after_chunks: usize },
    /// Answer normally after this extra delay.
    Delay { ms: u64 },
}

/// A request as the mock received it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub authorization: Option<String>,
    pub api_key: Option<String>,
    pub x_api_key: Option<String>,
    /// Every header, names in lower case (repeated ones joined with `, `).
    pub headers: BTreeMap<String, String>,
    /// The body as received.
    pub raw_body: String,
    /// The body parsed (null if it is not JSON).
    pub body: Value,
}

/// How many requests (and stored responses, and cached prompt prefixes) the mock remembers (it
/// forgets the oldest first).
const RECORDED_REQUESTS: usize = 1000;

#[derive(Clone)]
struct Mock {
    config: Arc<MockConfig>,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    requests: Arc<Mutex<VecDeque<RecordedRequest>>>,
    counter: Arc<AtomicU64>,
    /// Prompt prefixes seen, for the prompt cache.
    cached: Arc<Mutex<Bounded<String, ()>>>,
    /// Stored Responses API responses, with their input items.
    stored: Arc<Mutex<Bounded<String, (Value, Value)>>>,
}

/// A map that forgets its oldest entries past [`RECORDED_REQUESTS`].
struct Bounded<K, V> {
    map: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<K, V> Default for Bounded<K, V> {
    fn default() -> Self {
        Bounded {
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone, V> Bounded<K, V> {
    fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > RECORDED_REQUESTS {
            if let Some(oldest) = self.order.pop_front() {
                self.map.remove(&oldest);
            }
        }
    }
}

impl Mock {
    fn next_fault(&self) -> Option<Fault> {
        self.faults.lock().ok()?.pop_front()
    }

    fn record(&self, method: &Method, uri: &Uri, headers: &HeaderMap, raw: &[u8], body: &Value) {
        let header = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        if let Ok(mut requests) = self.requests.lock() {
            if requests.len() == RECORDED_REQUESTS {
                requests.pop_front();
            }
            requests.push_back(RecordedRequest {
                method: method.to_string(),
                path: uri.path().to_owned(),
                query: uri.query().map(str::to_owned),
                authorization: header("authorization"),
                api_key: header("api-key"),
                x_api_key: header("x-api-key"),
                headers: headers.keys().fold(BTreeMap::new(), |mut all, name| {
                    let values: Vec<&str> = headers
                        .get_all(name)
                        .iter()
                        .filter_map(|v| v.to_str().ok())
                        .collect();
                    all.insert(name.as_str().to_owned(), values.join(", "));
                    all
                }),
                raw_body: String::from_utf8_lossy(raw).into_owned(),
                body: body.clone(),
            });
        }
    }

    fn next_id(&self) -> u64 {
        self.counter.fetch_add(1, Ordering::Relaxed)
    }

    /// The prompt tokens OpenAI's own prompt cache serves: a conversation's earlier turns, when
    /// seen before (at most the whole prompt's `prompt_tokens`).
    fn openai_cached(&self, messages: &[Value], prompt_tokens: u64) -> u64 {
        match messages.split_last() {
            Some((_, earlier)) if !earlier.is_empty() => {
                let prefix = Value::Array(earlier.to_vec()).to_string();
                if self.cache_hit(&prefix) {
                    rough_tokens(&prefix).min(prompt_tokens)
                } else {
                    0
                }
            }
            _ => 0,
        }
    }

    /// Whether `prefix` was seen before (it is remembered now).
    fn cache_hit(&self, prefix: &str) -> bool {
        let Ok(mut cached) = self.cached.lock() else {
            return false;
        };
        let hit = cached.map.contains_key(prefix);
        cached.insert(prefix.to_owned(), ());
        hit
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let Some(expected) = &self.config.api_key else {
            return true;
        };
        let value = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        value("authorization").and_then(|v| v.strip_prefix("Bearer ")) == Some(expected)
            || value("api-key") == Some(expected)
            || value("x-api-key") == Some(expected)
    }
}

/// The mock's routes.
pub fn router(config: MockConfig) -> Router {
    let mock = Mock {
        config: Arc::new(config),
        faults: Arc::default(),
        requests: Arc::default(),
        counter: Arc::new(AtomicU64::new(1)),
        cached: Arc::default(),
        stored: Arc::default(),
    };
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route(
            "/openai/deployments/{deployment}/chat/completions",
            post(chat),
        )
        .route("/v1/embeddings", post(embeddings))
        .route(
            "/openai/deployments/{deployment}/embeddings",
            post(embeddings),
        )
        .route("/v1/models", get(models))
        .route("/v1/messages", post(anthropic_messages))
        .route("/v1/responses", post(responses))
        .route("/openai/v1/responses", post(responses))
        .route(
            "/v1/responses/{id}",
            get(stored_response).delete(stored_response),
        )
        .route(
            "/openai/v1/responses/{id}",
            get(stored_response).delete(stored_response),
        )
        .route("/v1/responses/{id}/input_items", get(stored_response))
        .route(
            "/openai/v1/responses/{id}/input_items",
            get(stored_response),
        )
        .route("/mock/faults", post(push_faults).delete(clear_faults))
        .route("/mock/requests", get(list_requests).delete(clear_requests))
        .route("/mock/cache", axum::routing::delete(clear_cache))
        .with_state(mock)
}

/// A mock running in this process on a free port; stopped when dropped.
pub struct MockServer {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// Sets TCP_NODELAY on every accepted connection, as real servers (and nginx) do: frames go
/// out as they are written.
pub fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt;
    listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    })
}

impl MockServer {
    /// Starts a mock on 127.0.0.1 with a free port.
    pub async fn start(config: MockConfig) -> std::io::Result<MockServer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = router(config);
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(nodelay(listener), app).await {
                tracing::error!(%error, "mock server failed");
            }
        });
        Ok(MockServer { addr, task })
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for MockServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[derive(Deserialize)]
struct FaultList {
    faults: Vec<Fault>,
}

async fn push_faults(State(mock): State<Mock>, Json(list): Json<FaultList>) -> StatusCode {
    if let Ok(mut faults) = mock.faults.lock() {
        faults.extend(list.faults);
    }
    StatusCode::NO_CONTENT
}

async fn clear_faults(State(mock): State<Mock>) -> StatusCode {
    if let Ok(mut faults) = mock.faults.lock() {
        faults.clear();
    }
    StatusCode::NO_CONTENT
}

async fn list_requests(State(mock): State<Mock>) -> Json<Vec<RecordedRequest>> {
    Json(
        mock.requests
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default(),
    )
}

async fn clear_cache(State(mock): State<Mock>) -> StatusCode {
    if let Ok(mut cached) = mock.cached.lock() {
        *cached = Bounded::default();
    }
    StatusCode::NO_CONTENT
}

async fn clear_requests(State(mock): State<Mock>) -> StatusCode {
    if let Ok(mut requests) = mock.requests.lock() {
        requests.clear();
    }
    StatusCode::NO_CONTENT
}

#[derive(Clone, Copy, PartialEq)]
enum Dialect {
    OpenAi,
    Anthropic,
}

fn error_response(
    dialect: Dialect,
    status: StatusCode,
    message: &str,
    retry_after: Option<u64>,
) -> Response {
    let (kind, code) = match status.as_u16() {
        401 => ("authentication_error", "invalid_api_key"),
        429 => ("rate_limit_error", "rate_limit_exceeded"),
        400 => ("invalid_request_error", "invalid_request"),
        s if s >= 500 => ("api_error", "server_error"),
        _ => ("invalid_request_error", "error"),
    };
    let body = match dialect {
        Dialect::OpenAi => {
            json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        }
        Dialect::Anthropic => json!({"type": "error", "error": {"type": kind, "message": message}}),
    };
    let mut response = (status, Json(body)).into_response();
    if let Some(value) = retry_after.and_then(|seconds| seconds.to_string().parse().ok()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}

/// Applies auth, recording, latency and the next fault; `Err` is the response to send instead.
async fn prelude(
    mock: &Mock,
    dialect: Dialect,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(Value, Option<Fault>), Response> {
    let parsed: Value = match serde_json::from_slice(body) {
        Ok(value) => value,
        Err(error) => {
            mock.record(method, uri, headers, body, &Value::Null);
            return Err(error_response(
                dialect,
                StatusCode::BAD_REQUEST,
                &format!("invalid JSON: {error}"),
                None,
            ));
        }
    };
    mock.record(method, uri, headers, body, &parsed);
    if !mock.authorized(headers) {
        return Err(error_response(
            dialect,
            StatusCode::UNAUTHORIZED,
            "invalid api key",
            None,
        ));
    }
    let fault = mock.next_fault();
    let mut delay = mock.config.latency;
    match &fault {
        Some(Fault::Status {
            status,
            retry_after,
        }) => {
            pause(delay).await;
            let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return Err(error_response(
                dialect,
                status,
                "injected fault",
                *retry_after,
            ));
        }
        Some(Fault::Hang) => {
            futures_util::future::pending::<()>().await;
        }
        Some(Fault::Delay { ms }) => delay += Duration::from_millis(*ms),
        _ => {}
    }
    pause(delay).await;
    Ok((parsed, fault))
}

/// Waits `delay`; not at all for zero (tokio's timer would round it up to a millisecond).
async fn pause(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

fn truncate_after(fault: &Option<Fault>) -> Option<usize> {
    match fault {
        Some(Fault::Truncate { after_chunks }) => Some(*after_chunks),
        _ => None,
    }
}

/// A rough token count: one token per four bytes of text, at least one.
fn rough_tokens(text: &str) -> u64 {
    (text.len() as u64 / 4).max(1)
}

/// Text of a message's content: a string, or the text blocks of an array.
fn content_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter_map(|b| {
                b.get("text")
                    .and_then(Value::as_str)
                    .or_else(|| b.get("content").and_then(Value::as_str))
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => String::new(),
    }
}

/// What the mock answers: text, or a call of the first tool offered.
struct Reply {
    text: String,
    tool: Option<(String, String)>,
    prompt_tokens: u64,
}

impl Reply {
    fn completion_tokens(&self) -> u64 {
        match &self.tool {
            Some((_, arguments)) => rough_tokens(arguments),
            None => self.text.split_whitespace().count().max(1) as u64,
        }
    }

    /// The reply in streaming pieces: one word at a time.
    fn text_pieces(&self) -> Vec<String> {
        let words: Vec<&str> = self.text.split(' ').collect();
        words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                if i == 0 {
                    (*w).to_owned()
                } else {
                    format!(" {w}")
                }
            })
            .collect()
    }
}

/// Decides the reply to a conversation: a tool call when tools are offered and the last message
/// is the user's; otherwise text echoing the start of the last message.
fn reply_to(
    messages: &[Value],
    system: Option<&Value>,
    tools: Option<&Vec<Value>>,
    tool_name: impl Fn(&Value) -> Option<String>,
) -> Reply {
    let mut prompt = system.map(content_text).unwrap_or_default();
    for message in messages {
        prompt.push_str(&content_text(
            message.get("content").unwrap_or(&Value::Null),
        ));
    }
    let last = messages.last();
    let last_role = last
        .and_then(|m| m.get("role"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let last_content = last
        .map(|m| m.get("content").unwrap_or(&Value::Null))
        .unwrap_or(&Value::Null);
    let carries_tool_result = last_role == "tool"
        || last_content.as_array().is_some_and(|blocks| {
            blocks
                .iter()
                .any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
        });
    let tool = tools
        .and_then(|t| t.first())
        .filter(|_| last_role == "user" && !carries_tool_result)
        .and_then(tool_name)
        .map(|name| (name, r#"{"location":"Paris"}"#.to_owned()));
    let last_text = content_text(last_content);
    let echo: Vec<&str> = last_text.split_whitespace().take(8).collect();
    let text = if carries_tool_result {
        "The tool says it is sunny in Paris.".to_owned()
    } else {
        format!("Mock reply to: {}", echo.join(" "))
    };
    Reply {
        text,
        tool,
        prompt_tokens: rough_tokens(&prompt),
    }
}

// ---- OpenAI ------------------------------------------------------------------------------------

/// Chat, on OpenAI's path or Azure's (whose deployment names the model).
async fn chat(
    State(mock): State<Mock>,
    deployment: Option<Path<String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request, fault) =
        match prelude(&mock, Dialect::OpenAi, &method, &uri, &headers, &body).await {
            Ok(ok) => ok,
            Err(response) => return response,
        };
    let model = deployment
        .map(|Path(d)| d)
        .or_else(|| {
            request
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "mock-model".into());
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let tools = request.get("tools").and_then(Value::as_array);
    let reply = reply_to(&messages, None, tools, |tool| {
        tool.pointer("/function/name")
            .and_then(Value::as_str)
            .map(str::to_owned)
    });
    let id = format!("chatcmpl-mock-{}", mock.next_id());
    let cached = mock.openai_cached(&messages, reply.prompt_tokens);
    let usage = json!({
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens(),
        "total_tokens": reply.prompt_tokens + reply.completion_tokens(),
        "prompt_tokens_details": {"cached_tokens": cached},
    });
    let tool_call_id = format!("call_mock_{}", mock.next_id());
    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        let message = match &reply.tool {
            Some((name, arguments)) => json!({
                "role": "assistant", "content": null,
                "tool_calls": [{"id": tool_call_id, "type": "function", "function": {"name": name, "arguments": arguments}}],
            }),
            None => json!({"role": "assistant", "content": reply.text}),
        };
        let finish = if reply.tool.is_some() {
            "tool_calls"
        } else {
            "stop"
        };
        return Json(json!({
            "id": id, "object": "chat.completion", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish, "logprobs": null}],
            "usage": usage,
        }))
        .into_response();
    }

    let include_usage = request
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        == Some(true);
    let chunk = |delta: Value, finish: Value| {
        let mut chunk = json!({
            "id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        });
        if include_usage {
            chunk["usage"] = Value::Null;
        }
        chunk
    };
    let mut events = vec![chunk(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    match &reply.tool {
        Some((name, arguments)) => {
            events.push(chunk(
                json!({"tool_calls": [{"index": 0, "id": tool_call_id, "type": "function", "function": {"name": name, "arguments": ""}}]}),
                Value::Null,
            ));
            let (first, second) = arguments.split_at(arguments.len() / 2);
            for piece in [first, second] {
                events.push(chunk(
                    json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
                    Value::Null,
                ));
            }
            events.push(chunk(json!({}), json!("tool_calls")));
        }
        None => {
            for piece in reply.text_pieces() {
                events.push(chunk(json!({"content": piece}), Value::Null));
            }
            events.push(chunk(json!({}), json!("stop")));
        }
    }
    if include_usage {
        events.push(json!({
            "id": id, "object": "chat.completion.chunk", "created": 1_700_000_000, "model": model,
            "choices": [], "usage": usage,
        }));
    }
    let mut frames: Vec<String> = events.iter().map(|e| format!("data: {e}\n\n")).collect();
    frames.push("data: [DONE]\n\n".into());
    sse(frames, truncate_after(&fault), mock.config.chunk_delay)
}

/// An SSE response sending `frames` with `delay` between them; with `truncate`, only that many
/// frames are sent and the stream ends without its terminator.
fn sse(mut frames: Vec<String>, truncate: Option<usize>, delay: Duration) -> Response {
    if let Some(keep) = truncate {
        frames.truncate(keep);
    }
    let body = stream::iter(frames.into_iter().enumerate()).then(move |(i, frame)| async move {
        if i > 0 && !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        Ok::<_, Infallible>(Bytes::from(frame))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

/// Embeddings, on OpenAI's path or Azure's.
async fn embeddings(
    State(mock): State<Mock>,
    deployment: Option<Path<String>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request, _) = match prelude(&mock, Dialect::OpenAi, &method, &uri, &headers, &body).await {
        Ok(ok) => ok,
        Err(response) => return response,
    };
    let inputs: Vec<String> = match request.get("input") {
        Some(Value::String(text)) => vec![text.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect(),
        _ => {
            return error_response(
                Dialect::OpenAi,
                StatusCode::BAD_REQUEST,
                "input is required",
                None,
            );
        }
    };
    let tokens: u64 = inputs.iter().map(|i| rough_tokens(i)).sum();
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(index, text)| {
            // Deterministic per input: eight values from the bytes of the text.
            let vector: Vec<f64> = (0..8)
                .map(|d| text.bytes().skip(d).step_by(8).map(f64::from).sum::<f64>() / 1000.0)
                .collect();
            json!({"object": "embedding", "index": index, "embedding": vector})
        })
        .collect();
    let model = deployment
        .map(|Path(d)| d)
        .or_else(|| {
            request
                .get("model")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "mock-embedding".into());
    Json(json!({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response()
}

async fn models() -> Json<Value> {
    Json(json!({"object": "list", "data": [
        {"id": "mock-model", "object": "model", "created": 1_700_000_000, "owned_by": "loom-mock"},
    ]}))
}

// ---- Anthropic ---------------------------------------------------------------------------------

async fn anthropic_messages(
    State(mock): State<Mock>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request, fault) =
        match prelude(&mock, Dialect::Anthropic, &method, &uri, &headers, &body).await {
            Ok(ok) => ok,
            Err(response) => return response,
        };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-claude")
        .to_owned();
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let tools = request.get("tools").and_then(Value::as_array);
    let reply = reply_to(&messages, request.get("system"), tools, |tool| {
        tool.get("name").and_then(Value::as_str).map(str::to_owned)
    });
    let id = format!("msg_mock_{}", mock.next_id());
    let tool_use_id = format!("toolu_mock_{}", mock.next_id());
    let thinking = request.pointer("/thinking/type").and_then(Value::as_str) == Some("enabled");
    let thought = "Let me think about that.";
    let signature = format!("mock-signature-{}", mock.next_id());
    let (stop_reason, mut content) = match &reply.tool {
        Some((name, arguments)) => {
            let input: Value = serde_json::from_str(arguments).unwrap_or(Value::Null);
            (
                "tool_use",
                vec![json!({"type": "tool_use", "id": tool_use_id, "name": name, "input": input})],
            )
        }
        None => (
            "end_turn",
            vec![json!({"type": "text", "text": reply.text})],
        ),
    };
    if thinking {
        content.insert(
            0,
            json!({"type": "thinking", "thinking": thought, "signature": signature}),
        );
    }
    // The prompt up to its last `cache_control` breakpoint is written to the cache the first
    // time and read from it after.
    let (cache_read, cache_creation) = match cached_prefix(&request) {
        Some(prefix) => {
            let tokens = rough_tokens(&prefix);
            if mock.cache_hit(&prefix) {
                (tokens, 0)
            } else {
                (0, tokens)
            }
        }
        None => (0, 0),
    };
    let thinking_tokens = if thinking { rough_tokens(thought) } else { 0 };
    let output_tokens = reply.completion_tokens() + thinking_tokens;
    let usage = json!({
        "input_tokens": reply.prompt_tokens, "output_tokens": output_tokens,
        "cache_read_input_tokens": cache_read, "cache_creation_input_tokens": cache_creation,
    });
    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        return Json(json!({
            "id": id, "type": "message", "role": "assistant", "model": model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": null, "usage": usage,
        }))
        .into_response();
    }

    let event = |name: &str, data: Value| format!("event: {name}\ndata: {data}\n\n");
    let mut frames = vec![
        event(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": id, "type": "message", "role": "assistant", "model": model, "content": [],
                "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": 1,
                          "cache_read_input_tokens": cache_read, "cache_creation_input_tokens": cache_creation},
            }}),
        ),
        event("ping", json!({"type": "ping"})),
    ];
    let mut index = 0;
    if thinking {
        frames.push(event(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        ));
        frames.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": thought}}),
        ));
        frames.push(event(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": signature}}),
        ));
        frames.push(event(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
        index = 1;
    }
    match &reply.tool {
        Some((name, arguments)) => {
            frames.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": index,
                       "content_block": {"type": "tool_use", "id": tool_use_id, "name": name, "input": {}}}),
            ));
            let (first, second) = arguments.split_at(arguments.len() / 2);
            for piece in [first, second] {
                frames.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index,
                           "delta": {"type": "input_json_delta", "partial_json": piece}}),
                ));
            }
        }
        None => {
            frames.push(event(
                "content_block_start",
                json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
            ));
            for piece in reply.text_pieces() {
                frames.push(event(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": piece}}),
                ));
            }
        }
    }
    frames.push(event(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": index}),
    ));
    frames.push(event(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
               "usage": {"output_tokens": output_tokens}}),
    ));
    frames.push(event("message_stop", json!({"type": "message_stop"})));
    sse(frames, truncate_after(&fault), mock.config.chunk_delay)
}

/// The prompt of a Messages request up to and including its last block marked `cache_control`
/// (tools, then system, then messages, as Anthropic orders the cache), if any is marked.
fn cached_prefix(request: &Value) -> Option<String> {
    let mut prefix = String::new();
    let mut cut = None;
    let mut add = |block: &Value| {
        prefix.push_str(&block.to_string());
        if block.get("cache_control").is_some() {
            cut = Some(prefix.len());
        }
    };
    for tool in request
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        add(tool);
    }
    match request.get("system") {
        Some(Value::Array(blocks)) => blocks.iter().for_each(&mut add),
        Some(system) => add(system),
        None => {}
    }
    for message in request
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match message.get("content") {
            Some(Value::Array(blocks)) => blocks.iter().for_each(&mut add),
            Some(content) => add(content),
            None => {}
        }
    }
    let cut = cut?;
    prefix.truncate(cut);
    Some(prefix)
}

// ---- OpenAI Responses ----------------------------------------------------------------------------

/// The conversation of a Responses request as chat-shaped messages, for [`reply_to`].
fn responses_messages(request: &Value, stored: &Bounded<String, (Value, Value)>) -> Vec<Value> {
    let mut messages = Vec::new();
    // A follow-up starts from the stored conversation it continues.
    if let Some((_, input)) = request
        .get("previous_response_id")
        .and_then(Value::as_str)
        .and_then(|id| stored.map.get(id))
    {
        messages.extend(input.as_array().into_iter().flatten().cloned());
    }
    match request.get("input") {
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => {
            for item in items {
                match item.get("type").and_then(Value::as_str).unwrap_or("message") {
                    "function_call_output" => messages.push(
                        json!({"role": "tool", "content": item.get("output").cloned().unwrap_or_default()}),
                    ),
                    "message" => messages.push(item.clone()),
                    _ => messages.push(json!({"role": "assistant", "content": ""})),
                }
            }
        }
        _ => {}
    }
    messages
}

/// `POST /v1/responses` (and Azure's `/openai/v1/responses`).
async fn responses(
    State(mock): State<Mock>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (request, fault) =
        match prelude(&mock, Dialect::OpenAi, &method, &uri, &headers, &body).await {
            Ok(ok) => ok,
            Err(response) => return response,
        };
    let previous = request.get("previous_response_id").and_then(Value::as_str);
    let messages = {
        let Ok(stored) = mock.stored.lock() else {
            return StatusCode::INTERNAL_SERVER_ERROR.into_response();
        };
        if let Some(previous) = previous.filter(|id| !stored.map.contains_key(*id)) {
            let body = json!({"error": {"message": format!("Previous response with id '{previous}' not found."),
                "type": "invalid_request_error", "param": "previous_response_id", "code": "previous_response_not_found"}});
            return (StatusCode::NOT_FOUND, Json(body)).into_response();
        }
        responses_messages(&request, &stored)
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-model")
        .to_owned();
    let tools = request.get("tools").and_then(Value::as_array);
    let reply = reply_to(&messages, request.get("instructions"), tools, |tool| {
        tool.get("name").and_then(Value::as_str).map(str::to_owned)
    });
    let id = format!("resp_mock{}", mock.next_id());
    let item_id = match &reply.tool {
        Some(_) => format!("fc_mock{}", mock.next_id()),
        None => format!("msg_mock{}", mock.next_id()),
    };
    let call_id = format!("call_mock_{}", mock.next_id());
    let reasoning = request.pointer("/reasoning/effort").is_some();
    let reasoning_tokens = if reasoning { 8 } else { 0 };
    let cached = mock.openai_cached(&messages, reply.prompt_tokens);
    let output_tokens = reply.completion_tokens() + reasoning_tokens;
    let usage = json!({
        "input_tokens": reply.prompt_tokens, "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
        "total_tokens": reply.prompt_tokens + output_tokens,
    });
    let item = |status: &str, text: &str, arguments: &str| match &reply.tool {
        Some((name, _)) => json!({"id": item_id, "type": "function_call", "status": status,
            "call_id": call_id, "name": name, "arguments": arguments}),
        None => {
            let content = if status == "in_progress" {
                json!([])
            } else {
                json!([{"type": "output_text", "text": text, "annotations": [], "logprobs": []}])
            };
            json!({"id": item_id, "type": "message", "status": status, "role": "assistant", "content": content})
        }
    };
    let reasoning_item =
        json!({"id": format!("rs_mock{}", mock.next_id()), "type": "reasoning", "summary": []});
    let arguments = reply.tool.as_ref().map(|(_, a)| a.as_str()).unwrap_or("");
    let mut output = Vec::new();
    if reasoning {
        output.push(reasoning_item.clone());
    }
    output.push(item("completed", &reply.text, arguments));
    let response = |status: &str, output: Vec<Value>, usage: Value| {
        json!({
            "id": id, "object": "response", "created_at": 1_700_000_000, "status": status,
            "background": false, "error": null, "incomplete_details": null,
            "instructions": request.get("instructions").cloned().unwrap_or_default(),
            "model": model, "output": output, "parallel_tool_calls": true,
            "previous_response_id": previous, "store": request.get("store") != Some(&Value::Bool(false)),
            "temperature": 1.0, "text": {"format": {"type": "text"}}, "tool_choice": "auto",
            "tools": request.get("tools").cloned().unwrap_or_else(|| json!([])), "top_p": 1.0,
            "truncation": "disabled", "usage": usage, "metadata": {},
        })
    };
    let finished = response("completed", output.clone(), usage);
    if request.get("store") != Some(&Value::Bool(false)) {
        let mut conversation = messages;
        conversation.push(json!({"role": "assistant", "content": reply.text}));
        if let Ok(mut stored) = mock.stored.lock() {
            stored.insert(id.clone(), (finished.clone(), Value::Array(conversation)));
        }
    }
    if request.get("stream").and_then(Value::as_bool) != Some(true) {
        return Json(finished).into_response();
    }

    let mut sequence = 0;
    let mut frames = Vec::new();
    let mut event = |kind: &str, mut data: Value| {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(sequence);
        sequence += 1;
        frames.push(format!("event: {kind}\ndata: {data}\n\n"));
    };
    let started = response("in_progress", Vec::new(), Value::Null);
    event("response.created", json!({"response": started}));
    event("response.in_progress", json!({"response": started}));
    let mut index = 0;
    if reasoning {
        event(
            "response.output_item.added",
            json!({"output_index": 0, "item": reasoning_item}),
        );
        event(
            "response.output_item.done",
            json!({"output_index": 0, "item": reasoning_item}),
        );
        index = 1;
    }
    event(
        "response.output_item.added",
        json!({"output_index": index, "item": item("in_progress", "", "")}),
    );
    match &reply.tool {
        Some(_) => {
            let (first, second) = arguments.split_at(arguments.len() / 2);
            for piece in [first, second] {
                event(
                    "response.function_call_arguments.delta",
                    json!({"item_id": item_id, "output_index": index, "delta": piece}),
                );
            }
            event(
                "response.function_call_arguments.done",
                json!({"item_id": item_id, "output_index": index, "arguments": arguments}),
            );
        }
        None => {
            let part = |text: &str| json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
            event(
                "response.content_part.added",
                json!({"item_id": item_id, "output_index": index, "content_index": 0, "part": part("")}),
            );
            for piece in reply.text_pieces() {
                event(
                    "response.output_text.delta",
                    json!({"item_id": item_id, "output_index": index,
                    "content_index": 0, "delta": piece, "logprobs": []}),
                );
            }
            event(
                "response.output_text.done",
                json!({"item_id": item_id, "output_index": index,
                "content_index": 0, "text": reply.text, "logprobs": []}),
            );
            event(
                "response.content_part.done",
                json!({"item_id": item_id, "output_index": index, "content_index": 0, "part": part(&reply.text)}),
            );
        }
    }
    event(
        "response.output_item.done",
        json!({"output_index": index, "item": item("completed", &reply.text, arguments)}),
    );
    event("response.completed", json!({"response": finished}));
    sse(frames, truncate_after(&fault), mock.config.chunk_delay)
}

/// `GET /v1/responses/{id}`, `GET /v1/responses/{id}/input_items`, `DELETE /v1/responses/{id}`
/// (and Azure's under `/openai`): a stored response, its input, or its deletion; 404 as OpenAI
/// answers for an id it does not have.
async fn stored_response(
    State(mock): State<Mock>,
    Path(id): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    mock.record(&method, &uri, &headers, b"", &Value::Null);
    let Some((response, input)) = mock
        .stored
        .lock()
        .ok()
        .and_then(|s| s.map.get(&id).cloned())
    else {
        let body = json!({"error": {"message": format!("Response with id '{id}' not found."),
            "type": "invalid_request_error", "param": null, "code": null}});
        return (StatusCode::NOT_FOUND, Json(body)).into_response();
    };
    if method == Method::DELETE {
        if let Ok(mut stored) = mock.stored.lock() {
            stored.map.remove(&id);
        }
        return Json(json!({"id": id, "object": "response", "deleted": true})).into_response();
    }
    if !uri.path().ends_with("/input_items") {
        return Json(response).into_response();
    }
    let data: Vec<Value> = input
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| json!({"type": "message", "role": m.get("role"), "content": m.get("content")}))
        .collect();
    Json(json!({"object": "list", "data": data, "has_more": false})).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn faults_apply_in_order_and_keys_are_checked() {
        let mock = MockServer::start(MockConfig {
            api_key: Some("k".into()),
            ..MockConfig::default()
        })
        .await
        .unwrap();
        let client = reqwest::Client::new();
        let chat = json!({"model": "m", "messages": [{"role": "user", "content": "hello"}]});
        let send = || {
            client
                .post(format!("{}/v1/chat/completions", mock.url()))
                .bearer_auth("k")
                .json(&chat)
                .send()
        };

        let unauthorized = client
            .post(format!("{}/v1/chat/completions", mock.url()))
            .json(&chat)
            .send()
            .await
            .unwrap();
        assert_eq!(unauthorized.status(), 401);
        let faults = json!({"faults": [{"kind": "status", "status": 503}, {"kind": "status", "status": 429, "retry_after": 3}]});
        client
            .post(format!("{}/mock/faults", mock.url()))
            .json(&faults)
            .send()
            .await
            .unwrap();
        assert_eq!(send().await.unwrap().status(), 503);
        let limited = send().await.unwrap();
        assert_eq!(limited.status(), 429);
        assert_eq!(limited.headers()["retry-after"], "3");
        let ok: Value = send().await.unwrap().json().await.unwrap();
        assert_eq!(
            ok["choices"][0]["message"]["content"],
            "Mock reply to: hello"
        );

        let recorded: Vec<RecordedRequest> = client
            .get(format!("{}/mock/requests", mock.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(recorded.len(), 4);
        assert_eq!(recorded[1].authorization.as_deref(), Some("Bearer k"));
    }

    #[tokio::test]
    async fn truncated_streams_end_without_their_terminator() {
        let mock = MockServer::start(MockConfig::default()).await.unwrap();
        let client = reqwest::Client::new();
        let faults = json!({"faults": [{"kind": "truncate", "after_chunks": 2}]});
        client
            .post(format!("{}/mock/faults", mock.url()))
            .json(&faults)
            .send()
            .await
            .unwrap();
        let chat = json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": "one two three"}]});
        let body = client
            .post(format!("{}/v1/chat/completions", mock.url()))
            .json(&chat)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body.matches("data: ").count(), 2);
        assert!(!body.contains("[DONE]"));
        let whole = client
            .post(format!("{}/v1/chat/completions", mock.url()))
            .json(&chat)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(whole.ends_with("data: [DONE]\n\n"));
    }
}
