//! Streams: Responses events → OpenAI chat chunks (what Loom reads from an upstream serving the
//! Responses API), and chat chunks → Responses events (for Responses clients on chat
//! deployments).

use serde_json::{Map, Value, json};

use crate::translate::chat_chunk;

use super::response::{
    function_call_item, message_item, new_id, response_object, status_of, usage_from_chat,
    usage_to_chat,
};

/// Turns Responses stream events into chat chunks; `[DONE]` after the response ends.
#[derive(Default)]
pub struct EventsToChunks {
    id: String,
    model: String,
    /// Output index → tool-call index, for function calls.
    calls: Vec<(u64, usize)>,
}

impl EventsToChunks {
    fn chunk(&self, delta: Value, finish: Value) -> String {
        chat_chunk(&self.id, &self.model, delta, finish)
    }

    /// The chunk data one event becomes (often none).
    pub fn translate(&mut self, event_type: &str, data: &str) -> Vec<String> {
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            return Vec::new();
        };
        let event_type = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(event_type);
        let output_index = event.get("output_index").and_then(Value::as_u64);
        match event_type {
            "response.created" => {
                let field = |name: &str| {
                    event
                        .pointer(&format!("/response/{name}"))
                        .and_then(Value::as_str)
                        .unwrap_or_default()
                        .to_owned()
                };
                self.id = field("id");
                self.model = field("model");
                vec![self.chunk(json!({"role": "assistant", "content": ""}), Value::Null)]
            }
            "response.output_text.delta" => {
                vec![self.chunk(json!({"content": event.get("delta")}), Value::Null)]
            }
            "response.output_item.added"
                if event.pointer("/item/type").and_then(Value::as_str) == Some("function_call") =>
            {
                let index = self.calls.len();
                self.calls.push((output_index.unwrap_or(0), index));
                let item = event.get("item").unwrap_or(&Value::Null);
                vec![self.chunk(
                    json!({"tool_calls": [{"index": index, "id": item.get("call_id"), "type": "function",
                                           "function": {"name": item.get("name"), "arguments": ""}}]}),
                    Value::Null,
                )]
            }
            "response.function_call_arguments.delta" => {
                let call = self
                    .calls
                    .iter()
                    .find(|(output, _)| Some(*output) == output_index);
                match call {
                    Some(&(_, index)) => vec![self.chunk(
                        json!({"tool_calls": [{"index": index, "function": {"arguments": event.get("delta")}}]}),
                        Value::Null,
                    )],
                    None => Vec::new(),
                }
            }
            // A failed response ends the stream without its end: the call is recorded as failed.
            "response.failed" => {
                let error = event
                    .pointer("/response/error")
                    .cloned()
                    .unwrap_or_default();
                vec![json!({"error": error}).to_string()]
            }
            "response.completed" | "response.incomplete" => {
                let response = event.get("response").unwrap_or(&Value::Null);
                let finish = match (event_type, self.calls.is_empty()) {
                    ("response.incomplete", _) => "length",
                    (_, false) => "tool_calls",
                    _ => "stop",
                };
                let mut usage = json!({
                    "id": self.id, "object": "chat.completion.chunk", "model": self.model, "choices": [],
                });
                if let Some(reported) = response.get("usage").filter(|u| u.is_object()) {
                    usage["usage"] = usage_to_chat(reported);
                }
                vec![
                    self.chunk(json!({}), json!(finish)),
                    usage.to_string(),
                    "[DONE]".to_owned(),
                ]
            }
            "error" => vec![
                json!({"error": {"message": event.get("message"), "code": event.get("code")}})
                    .to_string(),
            ],
            _ => Vec::new(),
        }
    }
}

/// An output item of a response being streamed.
enum Item {
    Message {
        id: String,
        text: String,
    },
    Call {
        id: String,
        call_id: Value,
        name: Value,
        arguments: String,
        tool: u64,
    },
}

/// Turns chat chunks into Responses stream events (`event:` and `data:` frames).
pub struct ResponsesEncoder {
    /// The request's settings, echoed in the `response` objects.
    request: Value,
    id: String,
    created_at: i64,
    model: Value,
    sequence: u64,
    started: bool,
    items: Vec<Item>,
    finish_reason: Option<String>,
    usage: Option<Value>,
    finished: bool,
}

impl ResponsesEncoder {
    pub fn new(request: &Value) -> ResponsesEncoder {
        // The settings a `response` echoes; not the input, which can be large.
        let request = match request.as_object() {
            Some(object) => Value::Object(
                object
                    .iter()
                    .filter(|(key, _)| *key != "input")
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect(),
            ),
            None => Value::Null,
        };
        ResponsesEncoder {
            request,
            id: new_id("resp"),
            created_at: loom_schemas::event::now_micros() / 1_000_000,
            model: Value::Null,
            sequence: 0,
            started: false,
            items: Vec::new(),
            finish_reason: None,
            usage: None,
            finished: false,
        }
    }

    /// One event, numbered: its type and number first, as OpenAI sends them.
    fn event(&mut self, kind: &str, fields: Map<String, Value>) -> String {
        let mut data = Map::with_capacity(fields.len() + 2);
        data.insert("type".into(), json!(kind));
        data.insert("sequence_number".into(), json!(self.sequence));
        data.extend(fields);
        self.sequence += 1;
        format!("event: {kind}\ndata: {}\n\n", Value::Object(data))
    }

    fn response(&self, status: &str, output: Vec<Value>) -> Value {
        Value::Object(response_object(
            &self.id,
            self.created_at,
            &self.model,
            &self.request,
            status,
            output,
        ))
    }

    fn fields(pairs: &[(&str, Value)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(key, value)| ((*key).to_owned(), value.clone()))
            .collect()
    }

    /// The frames one chat chunk becomes.
    pub fn encode(&mut self, chunk: &Value) -> Vec<String> {
        let mut frames = Vec::new();
        if !self.started {
            self.started = true;
            self.model = chunk.get("model").cloned().unwrap_or_default();
            let response = self.response("in_progress", Vec::new());
            frames.push(self.event(
                "response.created",
                Self::fields(&[("response", response.clone())]),
            ));
            frames.push(self.event(
                "response.in_progress",
                Self::fields(&[("response", response)]),
            ));
        }
        if let Some(text) = chunk
            .pointer("/choices/0/delta/content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            let open = match self.items.last() {
                Some(Item::Message { .. }) => self.items.len() - 1,
                _ => self.add_message(&mut frames),
            };
            if let Some(Item::Message { id, text: all }) = self.items.get_mut(open) {
                all.push_str(text);
                let id = id.clone();
                frames.push(self.event(
                    "response.output_text.delta",
                    Self::fields(&[
                        ("item_id", json!(id)),
                        ("output_index", json!(open)),
                        ("content_index", json!(0)),
                        ("delta", json!(text)),
                        ("logprobs", json!([])),
                    ]),
                ));
            }
        }
        for call in chunk
            .pointer("/choices/0/delta/tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let tool = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let found = self
                .items
                .iter()
                .position(|item| matches!(item, Item::Call { tool: t, .. } if *t == tool));
            let index = match found {
                Some(index) => index,
                None => {
                    let id = new_id("fc");
                    let call_id = call.get("id").cloned().unwrap_or_default();
                    let name = call.pointer("/function/name").cloned().unwrap_or_default();
                    let item = function_call_item(&id, &call_id, &name, "", "in_progress");
                    let index = self.items.len();
                    self.items.push(Item::Call {
                        id,
                        call_id,
                        name,
                        arguments: String::new(),
                        tool,
                    });
                    frames.push(self.event(
                        "response.output_item.added",
                        Self::fields(&[("output_index", json!(index)), ("item", item)]),
                    ));
                    index
                }
            };
            let piece = call
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .filter(|a| !a.is_empty());
            if let (Some(piece), Some(Item::Call { id, arguments, .. })) =
                (piece, self.items.get_mut(index))
            {
                arguments.push_str(piece);
                let id = id.clone();
                frames.push(self.event(
                    "response.function_call_arguments.delta",
                    Self::fields(&[
                        ("item_id", json!(id)),
                        ("output_index", json!(index)),
                        ("delta", json!(piece)),
                    ]),
                ));
            }
        }
        if let Some(reason) = chunk
            .pointer("/choices/0/finish_reason")
            .and_then(Value::as_str)
        {
            self.finish_reason = Some(reason.to_owned());
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(usage_from_chat(usage));
        }
        frames
    }

    /// Opens a message item; its output index.
    fn add_message(&mut self, frames: &mut Vec<String>) -> usize {
        let id = new_id("msg");
        let index = self.items.len();
        let mut item = message_item(&id, "", "in_progress");
        item["content"] = json!([]);
        frames.push(self.event(
            "response.output_item.added",
            Self::fields(&[("output_index", json!(index)), ("item", item)]),
        ));
        frames.push(self.event(
            "response.content_part.added",
            Self::fields(&[
                ("item_id", json!(id)),
                ("output_index", json!(index)),
                ("content_index", json!(0)),
                (
                    "part",
                    json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []}),
                ),
            ]),
        ));
        self.items.push(Item::Message {
            id,
            text: String::new(),
        });
        index
    }

    /// The closing frames (once): each item done, then `response.completed` (or
    /// `response.incomplete`) with the whole output and usage.
    pub fn finish(&mut self) -> Vec<String> {
        if self.finished {
            return Vec::new();
        }
        self.finished = true;
        let mut frames = Vec::new();
        if !self.started {
            frames.extend(self.encode(&Value::Null));
        }
        let mut output = Vec::new();
        let items = std::mem::take(&mut self.items);
        for (index, item) in items.iter().enumerate() {
            match item {
                Item::Message { id, text } => {
                    let part = json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []});
                    frames.push(self.event(
                        "response.output_text.done",
                        Self::fields(&[
                            ("item_id", json!(id)),
                            ("output_index", json!(index)),
                            ("content_index", json!(0)),
                            ("text", json!(text)),
                            ("logprobs", json!([])),
                        ]),
                    ));
                    frames.push(self.event(
                        "response.content_part.done",
                        Self::fields(&[
                            ("item_id", json!(id)),
                            ("output_index", json!(index)),
                            ("content_index", json!(0)),
                            ("part", part),
                        ]),
                    ));
                    let done = message_item(id, text, "completed");
                    output.push(done.clone());
                    frames.push(self.event(
                        "response.output_item.done",
                        Self::fields(&[("output_index", json!(index)), ("item", done)]),
                    ));
                }
                Item::Call {
                    id,
                    call_id,
                    name,
                    arguments,
                    ..
                } => {
                    frames.push(self.event(
                        "response.function_call_arguments.done",
                        Self::fields(&[
                            ("item_id", json!(id)),
                            ("output_index", json!(index)),
                            ("name", name.clone()),
                            ("arguments", json!(arguments)),
                        ]),
                    ));
                    let done = function_call_item(id, call_id, name, arguments, "completed");
                    output.push(done.clone());
                    frames.push(self.event(
                        "response.output_item.done",
                        Self::fields(&[("output_index", json!(index)), ("item", done)]),
                    ));
                }
            }
        }
        let (status, incomplete) = status_of(self.finish_reason.as_deref());
        let mut response = self.response(status, output);
        response["incomplete_details"] = incomplete;
        response["usage"] = self.usage.clone().unwrap_or(Value::Null);
        let kind = if status == "completed" {
            "response.completed"
        } else {
            "response.incomplete"
        };
        frames.push(self.event(kind, Self::fields(&[("response", response)])));
        frames
    }
}
