//! Streams: Anthropic stream events → OpenAI chat chunks (from Anthropic upstreams), and OpenAI
//! chat chunks → Anthropic stream events (for Anthropic clients).

use serde_json::{Value, json};

use super::int;
use super::response::{anthropic_usage, finish_reason, stop_reason, usage_of};
use crate::translate::chat_chunk;

/// Turns Anthropic stream events into OpenAI chat chunks (the last one being `[DONE]`).
#[derive(Default)]
pub struct StreamTranslator {
    id: String,
    model: String,
    input_tokens: i64,
    output_tokens: i64,
    cache_read: i64,
    cache_creation: i64,
    /// For each Anthropic content block index, its tool-call index, if it is a tool call.
    tool_index: Vec<Option<usize>>,
    tools: usize,
}

impl StreamTranslator {
    fn chunk(&self, delta: Value, finish: Value) -> String {
        chat_chunk(&self.id, &self.model, delta, finish)
    }

    /// The chunk data strings one Anthropic event becomes (often none).
    pub fn translate(&mut self, event_type: &str, data: &str) -> Vec<String> {
        let Ok(event) = serde_json::from_str::<Value>(data) else {
            return Vec::new();
        };
        let event_type = event
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or(event_type);
        match event_type {
            "message_start" => {
                let message = event.get("message").cloned().unwrap_or_default();
                self.id = message
                    .get("id")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                self.model = message
                    .get("model")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                self.input_tokens = int(&message, "/usage/input_tokens");
                self.cache_read = int(&message, "/usage/cache_read_input_tokens");
                self.cache_creation = int(&message, "/usage/cache_creation_input_tokens");
                vec![self.chunk(json!({"role": "assistant", "content": ""}), Value::Null)]
            }
            "content_block_start" => {
                let index = event.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                let block = event.get("content_block").cloned().unwrap_or_default();
                if index < 1024 {
                    self.tool_index
                        .resize(self.tool_index.len().max(index + 1), None);
                }
                if block.get("type").and_then(Value::as_str) != Some("tool_use") || index >= 1024 {
                    return Vec::new();
                }
                let tool = self.tools;
                self.tools += 1;
                self.tool_index[index] = Some(tool);
                vec![self.chunk(
                    json!({"tool_calls": [{"index": tool, "id": block.get("id"), "type": "function",
                                           "function": {"name": block.get("name"), "arguments": ""}}]}),
                    Value::Null,
                )]
            }
            "content_block_delta" => {
                let index = event.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                let delta = event.get("delta").cloned().unwrap_or_default();
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => vec![self.chunk(json!({"content": delta.get("text")}), Value::Null)],
                    Some("thinking_delta") => vec![self.chunk(json!({"reasoning_content": delta.get("thinking")}), Value::Null)],
                    Some("input_json_delta") => match self.tool_index.get(index).copied().flatten() {
                        Some(tool) => vec![self.chunk(
                            json!({"tool_calls": [{"index": tool, "function": {"arguments": delta.get("partial_json")}}]}),
                            Value::Null,
                        )],
                        None => Vec::new(),
                    },
                    _ => Vec::new(),
                }
            }
            "message_delta" => {
                // Counts here are cumulative; newer API versions repeat the input side too.
                self.output_tokens = int(&event, "/usage/output_tokens").max(self.output_tokens);
                self.input_tokens = int(&event, "/usage/input_tokens").max(self.input_tokens);
                self.cache_read =
                    int(&event, "/usage/cache_read_input_tokens").max(self.cache_read);
                self.cache_creation =
                    int(&event, "/usage/cache_creation_input_tokens").max(self.cache_creation);
                let reason = event.pointer("/delta/stop_reason").and_then(Value::as_str);
                vec![self.chunk(json!({}), finish_reason(reason))]
            }
            "message_stop" => {
                let usage = json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": loom_schemas::event::now_micros() / 1_000_000,
                    "model": self.model, "choices": [],
                    "usage": usage_of(self.input_tokens, self.output_tokens, self.cache_read, self.cache_creation),
                });
                vec![usage.to_string(), "[DONE]".to_owned()]
            }
            "error" => vec![
                json!({"error": {
                    "message": event.pointer("/error/message").cloned().unwrap_or_default(),
                    "type": event.pointer("/error/type").cloned().unwrap_or_default(),
                }})
                .to_string(),
            ],
            _ => Vec::new(),
        }
    }
}

/// Turns OpenAI chat chunks into Anthropic stream events (`event:` and `data:` frames).
#[derive(Default)]
pub struct MessagesEncoder {
    started: bool,
    /// The open content block: its index and whether it is text.
    open: Option<(usize, bool)>,
    blocks: usize,
    /// OpenAI tool-call index → Anthropic block index.
    tool_blocks: Vec<(u64, usize)>,
    stop_reason: Value,
    /// The usage chunk's, for the closing `message_delta`.
    usage: Option<Value>,
    finished: bool,
}

fn frame(event: &str, data: &Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

impl MessagesEncoder {
    fn close_block(&mut self, frames: &mut Vec<String>) {
        if let Some((index, _)) = self.open.take() {
            frames.push(frame(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": index}),
            ));
        }
    }

    /// The frames one OpenAI chunk becomes.
    pub fn encode(&mut self, chunk: &Value) -> Vec<String> {
        let mut frames = Vec::new();
        if !self.started {
            self.started = true;
            frames.push(frame("message_start", &json!({"type": "message_start", "message": {
                "id": chunk.get("id"), "type": "message", "role": "assistant", "model": chunk.get("model"),
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }})));
        }
        let delta = chunk
            .pointer("/choices/0/delta")
            .cloned()
            .unwrap_or_default();
        if let Some(text) = delta
            .get("content")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
        {
            if !matches!(self.open, Some((_, true))) {
                self.close_block(&mut frames);
                let index = self.blocks;
                self.blocks += 1;
                self.open = Some((index, true));
                frames.push(frame("content_block_start", &json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}})));
            }
            let index = self.open.map_or(0, |(i, _)| i);
            frames.push(frame("content_block_delta", &json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": text}})));
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let tool = call.get("index").and_then(Value::as_u64).unwrap_or(0);
            let block = match self.tool_blocks.iter().find(|(t, _)| *t == tool) {
                Some((_, block)) => *block,
                None => {
                    self.close_block(&mut frames);
                    let index = self.blocks;
                    self.blocks += 1;
                    self.tool_blocks.push((tool, index));
                    self.open = Some((index, false));
                    frames.push(frame("content_block_start", &json!({"type": "content_block_start", "index": index,
                        "content_block": {"type": "tool_use", "id": call.get("id"), "name": call.pointer("/function/name"), "input": {}}})));
                    index
                }
            };
            if let Some(arguments) = call
                .pointer("/function/arguments")
                .and_then(Value::as_str)
                .filter(|a| !a.is_empty())
            {
                frames.push(frame(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": block,
                    "delta": {"type": "input_json_delta", "partial_json": arguments}}),
                ));
            }
        }
        if let Some(reason) = chunk
            .pointer("/choices/0/finish_reason")
            .and_then(Value::as_str)
        {
            self.close_block(&mut frames);
            self.stop_reason = stop_reason(Some(reason));
        }
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(anthropic_usage(usage));
        }
        frames
    }

    /// The closing frames (once): the stop reason with usage, then `message_stop`.
    pub fn finish(&mut self) -> Vec<String> {
        if self.finished {
            return Vec::new();
        }
        self.finished = true;
        let mut frames = Vec::new();
        self.close_block(&mut frames);
        let usage = self
            .usage
            .take()
            .unwrap_or_else(|| json!({"output_tokens": 0}));
        frames.push(frame(
            "message_delta",
            &json!({"type": "message_delta",
            "delta": {"stop_reason": self.stop_reason, "stop_sequence": null}, "usage": usage}),
        ));
        frames.push(frame("message_stop", &json!({"type": "message_stop"})));
        frames
    }
}
