//! Streaming chat completions and messages: upstream SSE events are forwarded to the client one by
//! one as they arrive (as received when the upstream speaks the client's API, translated when
//! not), while usage, tool calls and timing are collected for the events. The last frame goes out
//! once the request is recorded. A client that goes away cancels the upstream call (its
//! connection is dropped) and is recorded as `client_cancelled`.

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use eventsource_stream::Eventsource;
use futures_util::{Stream, StreamExt};
use loom_schemas::event::{CallStatus, Event, PolicyAction, RequestStatus};
use serde_json::{Value, json};

use crate::cache::Cached;
use crate::error::{GatewayError, UpstreamFault};
use crate::flow::Flow;
use crate::policy::OutputScan;
use crate::record::{CallRecord, Outcome, Usage, call_event};
use crate::translate::{Output, ToChunks};
use crate::upstream::Answer;

/// How long the upstream body may go on after `[DONE]` before the stream is finished anyway.
const AFTER_DONE: Duration = Duration::from_secs(1);

type UpstreamEvents = Pin<Box<dyn Stream<Item = Result<eventsource_stream::Event, String>> + Send>>;

/// A streamed answer in flight.
pub(crate) struct ChatStream {
    flow: Flow,
    answer: Answer,
    /// The request, for estimating usage when the upstream reports none.
    request: Value,
    events: UpstreamEvents,
    client_wants_usage: bool,
    usage: Usage,
    ttft: Option<Duration>,
    model: Option<String>,
    /// Tool calls assembled from their deltas, by index.
    tool_calls: Vec<Value>,
    /// The answer's text so far (content and tool arguments), for estimating usage.
    answered: String,
    reported_usage: bool,
    /// The upstream stream as received, up to the body limit, for the sealed response body.
    captured: Vec<u8>,
    saw_done: bool,
    /// Set once the final events are queued; nothing more is sent after.
    finished: bool,
    /// The upstream's id for the answer (`chatcmpl-…`, `msg_…`, `resp_…`).
    response_id: Option<String>,
    /// Turns an upstream's events into chat chunks, which Loom reads, unless they are chunks.
    translator: Option<ToChunks>,
    /// Chunk data translated but not yet processed.
    pending: VecDeque<String>,
    /// What the client is sent.
    output: Output,
    /// The upstream's last event, sent to the client once the request is recorded.
    last: Option<Bytes>,
    /// The security policy's scan of `answered`.
    scan: OutputScan,
    /// Whether the security policy cut the answer.
    cut_off: bool,
    /// What the client was sent, for the project's response cache (while it has the cache on
    /// and the stream fits in `max_body_bytes`).
    kept: Vec<u8>,
    /// The stream ended well and is recorded: it may be kept.
    complete: bool,
    cost_micro_usd: Option<i64>,
}

impl ChatStream {
    /// Starts the client's SSE response.
    pub(crate) fn respond(
        flow: Flow,
        mut answer: Answer,
        request: Value,
        client_wants_usage: bool,
    ) -> Response {
        let Some(response) = answer.response.take() else {
            return GatewayError::Internal("the answer has no body").into_response();
        };
        let leg = answer.leg;
        let output = leg.output(&request);
        let events: UpstreamEvents = Box::pin(
            response
                .bytes_stream()
                .eventsource()
                .map(|event| event.map_err(|e| e.to_string())),
        );
        let mut response = Response::builder()
            .header(header::CONTENT_TYPE, "text/event-stream")
            .header(header::CACHE_CONTROL, "no-cache")
            .body(Body::empty())
            .unwrap_or_else(|_| {
                GatewayError::Internal("could not build the response").into_response()
            });
        flow.headers(&mut response);
        let stream = ChatStream {
            flow,
            answer,
            request,
            events,
            client_wants_usage,
            usage: Usage::default(),
            ttft: None,
            model: None,
            tool_calls: Vec::new(),
            answered: String::new(),
            reported_usage: false,
            captured: Vec::new(),
            saw_done: false,
            finished: false,
            response_id: None,
            translator: leg.chunks(),
            pending: VecDeque::new(),
            output,
            last: None,
            scan: OutputScan::default(),
            cut_off: false,
            kept: Vec::new(),
            complete: false,
            cost_micro_usd: None,
        };
        let body = futures_util::stream::unfold(stream, |mut stream| async move {
            let Some(frame) = stream.next_frame().await else {
                stream.keep_in_cache();
                return None;
            };
            stream.keep(&frame);
            Some((Ok::<_, std::convert::Infallible>(frame), stream))
        });
        *response.body_mut() = Body::from_stream(body);
        response
    }

    /// The next bytes for the client; `None` when the stream is over.
    async fn next_frame(&mut self) -> Option<Bytes> {
        if self.finished {
            return None;
        }
        let timeout = self.flow.gateway.config.routing.attempt_timeout;
        loop {
            if !self.scan.cut.is_empty() {
                let rules = std::mem::take(&mut self.scan.cut);
                return self.cut(rules).await;
            }
            // After `[DONE]` only the end of the upstream body is expected; do not wait long.
            let timeout = if self.saw_done {
                timeout.min(AFTER_DONE)
            } else {
                timeout
            };
            if let Some(data) = self.pending.pop_front() {
                match self.process(data) {
                    Some(frame) => return Some(frame),
                    None => continue,
                }
            }
            let waited = Instant::now();
            let next = tokio::time::timeout(timeout, self.events.next()).await;
            self.flow.outside += waited.elapsed();
            let event = match next {
                Ok(None) | Err(_) if self.saw_done => return self.done().await,
                Err(_) => {
                    return self
                        .fail(
                            CallStatus::Timeout,
                            GatewayError::StreamBroken(UpstreamFault::StreamStalled),
                        )
                        .await;
                }
                Ok(Some(Err(error))) => {
                    tracing::warn!(%error, trace_id = %self.flow.trace_id, "upstream stream failed");
                    return self
                        .fail(
                            CallStatus::Error,
                            GatewayError::StreamBroken(UpstreamFault::StreamFailed),
                        )
                        .await;
                }
                Ok(None) => {
                    return self
                        .fail(
                            CallStatus::Error,
                            GatewayError::StreamBroken(UpstreamFault::StreamTruncated),
                        )
                        .await;
                }
                Ok(Some(Ok(event))) => event,
            };
            if self.ttft.is_none() {
                self.ttft = Some(self.answer.sent_at.elapsed());
            }
            self.capture(&event.data);
            let as_received =
                matches!(self.output, Output::AsReceived).then(|| as_received(&event));
            match &mut self.translator {
                Some(translator) => self
                    .pending
                    .extend(translator.translate(&event.event, &event.data)),
                None => self.pending.push_back(event.data),
            }
            let Some(frame) = as_received else {
                continue;
            };
            // Read what the event says before the client gets it as it came.
            while let Some(data) = self.pending.pop_front() {
                self.process(data);
            }
            if !self.scan.cut.is_empty() {
                continue;
            }
            if self.saw_done {
                self.last = Some(frame);
                return self.done().await;
            }
            return Some(frame);
        }
    }

    /// The frame for one chunk of OpenAI data, if the client is to see it.
    fn process(&mut self, data: String) -> Option<Bytes> {
        // Nothing after `[DONE]` reaches the client.
        if self.saw_done {
            return None;
        }
        if data.trim() == "[DONE]" {
            // The client's last frames go out once the request is recorded: see `done`.
            self.saw_done = true;
            return None;
        }
        let Ok(mut chunk) = serde_json::from_str::<Value>(&data) else {
            return Some(Bytes::from(format!("data: {data}\n\n")));
        };
        self.observe(&chunk);
        self.flow.scan_output(&mut self.scan, &self.answered, false);
        if !self.scan.cut.is_empty() {
            return None;
        }
        if let Some(frames) = self.output.encode(&chunk) {
            return joined(frames);
        }
        if self.client_wants_usage {
            return Some(Bytes::from(format!("data: {data}\n\n")));
        }
        // The client did not ask for usage: drop the usage chunk and the `usage: null` fields.
        let usage_only = chunk
            .get("choices")
            .and_then(Value::as_array)
            .is_some_and(Vec::is_empty)
            && chunk.get("usage").is_some_and(|u| !u.is_null());
        if usage_only {
            return None;
        }
        if let Some(object) = chunk.as_object_mut() {
            object.remove("usage");
        }
        Some(Bytes::from(format!("data: {chunk}\n\n")))
    }

    fn capture(&mut self, data: &str) {
        let limit = self.flow.gateway.config.limits.max_body_bytes;
        if self.captured.len() + data.len() + 8 <= limit {
            self.captured.extend_from_slice(b"data: ");
            self.captured.extend_from_slice(data.as_bytes());
            self.captured.extend_from_slice(b"\n\n");
        }
    }

    /// Collects usage, the served model and tool-call deltas from one chunk.
    fn observe(&mut self, chunk: &Value) {
        if self.response_id.is_none() {
            self.response_id = chunk.get("id").and_then(Value::as_str).map(str::to_owned);
        }
        if self.model.is_none() {
            self.model = chunk
                .get("model")
                .and_then(Value::as_str)
                .filter(|m| !m.is_empty())
                .map(str::to_owned);
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Usage::from_openai(usage);
            self.reported_usage = true;
        }
        if let Some(content) = chunk
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
        {
            self.note_answered(content);
        }
        let deltas = chunk
            .pointer("/choices/0/delta/tool_calls")
            .and_then(Value::as_array);
        for delta in deltas.into_iter().flatten() {
            let index = delta.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
            if index >= 128 {
                continue;
            }
            while self.tool_calls.len() <= index {
                self.tool_calls
                    .push(json!({"function": {"name": null, "arguments": ""}}));
            }
            let call = &mut self.tool_calls[index];
            if let Some(id) = delta.get("id").and_then(Value::as_str) {
                call["id"] = json!(id);
            }
            if let Some(name) = delta.pointer("/function/name").and_then(Value::as_str) {
                call["function"]["name"] = json!(name);
            }
            if let Some(piece) = delta.pointer("/function/arguments").and_then(Value::as_str) {
                let arguments = call["function"]["arguments"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
                    + piece;
                call["function"]["arguments"] = json!(arguments);
                self.note_answered(piece);
            }
        }
    }

    /// Keeps the answer's text, up to the body limit, for a usage estimate.
    fn note_answered(&mut self, text: &str) {
        if self.answered.len() + text.len() <= self.flow.gateway.config.limits.max_body_bytes {
            self.answered.push_str(text);
        }
    }

    /// Keeps a frame for the response cache, if the project has it on; a stream too long for
    /// the body limit is not kept.
    fn keep(&mut self, frame: &Bytes) {
        if self.flow.cache.is_none() {
            return;
        }
        if self.kept.len() + frame.len() > self.flow.gateway.config.limits.max_body_bytes {
            self.flow.cache = None;
            self.kept = Vec::new();
            return;
        }
        self.kept.extend_from_slice(frame);
    }

    /// The stream is over: a complete one goes into the project's response cache.
    fn keep_in_cache(&mut self) {
        let Some((project, flag, key)) = self.flow.cache.take() else {
            return;
        };
        if !self.complete {
            return;
        }
        let cached = Cached::new(
            Bytes::from(std::mem::take(&mut self.kept)),
            true,
            self.model.clone(),
            self.usage,
            self.cost_micro_usd,
            self.flow.trace_id.clone(),
        );
        self.flow.gateway.cache.put(project, flag, key, cached);
    }

    /// The upstream finished: records the request, then gives the client its last frames.
    async fn done(&mut self) -> Option<Bytes> {
        if let Err(unrecorded) = self.finish(CallStatus::Ok, None).await {
            return Some(unrecorded.sse_frame(self.flow.dialect));
        }
        self.complete = !self.cut_off;
        match &mut self.output {
            Output::AsReceived => self.last.take(),
            Output::Chunks => Some(Bytes::from_static(b"data: [DONE]\n\n")),
            encoder => joined(encoder.finish()),
        }
    }

    /// Ends the stream where the security policy cut it: the call is recorded as answered, the
    /// request as denied, and the client gets an error frame.
    async fn cut(&mut self, rules: Vec<String>) -> Option<Bytes> {
        self.cut_off = true;
        self.fail(CallStatus::Ok, GatewayError::OutputBlocked(rules))
            .await
    }

    /// Ends the stream with an error frame for the client.
    async fn fail(&mut self, status: CallStatus, error: GatewayError) -> Option<Bytes> {
        let frame = match self.finish(status, Some(error.error_class())).await {
            Ok(()) => error.sse_frame(self.flow.dialect),
            Err(unrecorded) => unrecorded.sse_frame(self.flow.dialect),
        };
        Some(frame)
    }

    /// The final events of the request.
    fn final_events(&mut self, status: CallStatus, class: Option<&str>) -> Vec<Event> {
        self.finished = true;
        let latency = self.answer.sent_at.elapsed();
        if !self.reported_usage {
            self.usage = Usage::estimate(&self.request, &self.answered);
        }
        let call = CallRecord {
            ttft: self.ttft,
            usage: self.usage,
            served_model: self.model.as_deref(),
            response_id: self.response_id.as_deref(),
            ..CallRecord::answered(&self.answer, latency, status, class, &self.captured, true)
        };
        if status == CallStatus::Ok {
            self.flow
                .remember_response(&self.answer, self.response_id.as_deref(), &self.request);
        }
        let mut events = vec![call_event(&self.flow, call)];
        events.extend(self.flow.tool_calls(&self.tool_calls));
        let cut = self.cut_off;
        if !cut {
            self.flow.scan_output(&mut self.scan, &self.answered, true);
        }
        if let Some(action) = self.scan.action() {
            let findings = std::mem::take(&mut self.scan.findings);
            let action = if cut { PolicyAction::Block } else { action };
            events.push(
                self.flow
                    .policy_event(true, action, findings, self.scan.latency),
            );
        }
        let gateway = &self.flow.gateway;
        let deployment = &gateway.config.deployments[self.answer.deployment];
        let outcome = Outcome {
            status: match status {
                CallStatus::Ok if cut => RequestStatus::Denied,
                CallStatus::Ok => RequestStatus::Ok,
                CallStatus::ClientCancelled => RequestStatus::ClientCancelled,
                CallStatus::Error | CallStatus::Timeout => RequestStatus::Error,
            },
            http_status: self.answer.status.as_u16(),
            error_class: class.map(str::to_owned),
            model: self
                .model
                .clone()
                .or_else(|| Some(deployment.model.clone())),
            usage: self.usage,
            cost_micro_usd: self.flow.cost(
                self.answer.deployment,
                self.model.as_deref(),
                &self.usage,
            ),
            ttft: self.ttft,
            ..Outcome::at(&self.flow, self.answer.deployment)
        };
        self.cost_micro_usd = outcome.cost_micro_usd;
        events.extend(self.flow.settlement(&outcome));
        events.push(self.flow.completed(&outcome));
        events
    }

    /// Queues the final events; the last, `request.completed`, is recorded before this returns.
    async fn finish(
        &mut self,
        status: CallStatus,
        class: Option<&str>,
    ) -> Result<(), GatewayError> {
        let mut events = self.final_events(status, class);
        let completed = events.pop();
        for event in events {
            self.flow.gateway.emitter.emit(event).await;
        }
        match completed {
            Some(completed) => self
                .flow
                .gateway
                .emitter
                .record(completed)
                .await
                .map_err(|_| GatewayError::EventsUnavailable),
            None => Ok(()),
        }
    }
}

/// An upstream event as the client gets it when the upstream speaks its API.
fn as_received(event: &eventsource_stream::Event) -> Bytes {
    let mut frame = String::with_capacity(event.event.len() + event.data.len() + 16);
    if !event.event.is_empty() && event.event != "message" {
        frame.push_str("event: ");
        frame.push_str(&event.event);
        frame.push('\n');
    }
    for line in event.data.split('\n') {
        frame.push_str("data: ");
        frame.push_str(line);
        frame.push('\n');
    }
    frame.push('\n');
    Bytes::from(frame)
}

/// Several frames as one write; `None` when there are none.
fn joined(frames: Vec<String>) -> Option<Bytes> {
    (!frames.is_empty()).then(|| Bytes::from(frames.concat()))
}

impl Drop for ChatStream {
    /// The client went away mid-stream: the upstream connection closes with this stream, and the
    /// request is recorded as cancelled with whatever usage had arrived.
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let emitter = self.flow.gateway.emitter.clone();
        let mut late = Vec::new();
        let class = GatewayError::ClientCancelled.error_class();
        for event in self.final_events(CallStatus::ClientCancelled, Some(class)) {
            if let Err(event) = emitter.try_emit(event) {
                late.push(*event);
            }
        }
        if !late.is_empty() {
            // The queue is full: hand the rest to a task that waits for room (tracked, so that
            // shutdown waits for it too).
            self.flow.gateway.tasks.spawn(async move {
                for event in late {
                    emitter.emit(event).await;
                }
            });
        }
    }
}
