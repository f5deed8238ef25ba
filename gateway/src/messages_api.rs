//! Anthropic's Messages API for clients (`/v1/messages`): their requests become OpenAI chat for the
//! gateway's pipeline, and its answers, stream chunks and errors go back in Anthropic's shape.

use serde_json::{Value, json};

use crate::providers::anthropic::{int, tool_use_block};

/// Text of Anthropic content: a string, or its text blocks joined.
fn anthropic_text(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// An Anthropic Messages request as an OpenAI chat request.
pub fn messages_to_chat(request: &Value) -> Value {
    let mut messages = Vec::new();
    if let Some(system) = request.get("system") {
        messages.push(json!({"role": "system", "content": anthropic_text(system)}));
    }
    for message in request
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("user");
        let content = message.get("content").cloned().unwrap_or_default();
        let blocks = match content {
            Value::String(text) => vec![json!({"type": "text", "text": text})],
            Value::Array(blocks) => blocks,
            _ => Vec::new(),
        };
        let mut parts = Vec::new();
        let mut tool_calls = Vec::new();
        for block in &blocks {
            match block.get("type").and_then(Value::as_str) {
                Some("text") => parts.push(json!({"type": "text", "text": block.get("text")})),
                Some("image") => {
                    let source = block.get("source").cloned().unwrap_or_default();
                    let url = match source.get("type").and_then(Value::as_str) {
                        Some("base64") => format!(
                            "data:{};base64,{}",
                            source.get("media_type").and_then(Value::as_str).unwrap_or("image/png"),
                            source.get("data").and_then(Value::as_str).unwrap_or_default()
                        ),
                        _ => source.get("url").and_then(Value::as_str).unwrap_or_default().to_owned(),
                    };
                    parts.push(json!({"type": "image_url", "image_url": {"url": url}}));
                }
                Some("tool_use") => tool_calls.push(json!({
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": block.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into())},
                })),
                Some("tool_result") => messages.push(json!({
                    "role": "tool",
                    "tool_call_id": block.get("tool_use_id"),
                    "content": anthropic_text(block.get("content").unwrap_or(&Value::Null)),
                })),
                _ => {}
            }
        }
        if parts.is_empty() && tool_calls.is_empty() {
            continue;
        }
        let only_text = parts
            .iter()
            .all(|p| p.get("type").and_then(Value::as_str) == Some("text"));
        let content = if parts.is_empty() {
            Value::Null
        } else if only_text {
            json!(
                parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        } else {
            Value::Array(parts)
        };
        let mut converted = json!({"role": role, "content": content});
        if !tool_calls.is_empty() {
            converted["tool_calls"] = Value::Array(tool_calls);
        }
        messages.push(converted);
    }
    let mut chat = json!({"model": request.get("model"), "messages": messages});
    for (from, to) in [
        ("max_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("stream", "stream"),
        ("stop_sequences", "stop"),
    ] {
        if let Some(value) = request.get(from) {
            chat[to] = value.clone();
        }
    }
    if let Some(user) = request.pointer("/metadata/user_id") {
        chat["user"] = user.clone();
    }
    let tools: Vec<Value> = request
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|tool| {
            json!({"type": "function", "function": {
                "name": tool.get("name"),
                "description": tool.get("description"),
                "parameters": tool.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"})),
            }})
        })
        .collect();
    if !tools.is_empty() {
        chat["tools"] = Value::Array(tools);
    }
    match request.pointer("/tool_choice/type").and_then(Value::as_str) {
        Some("any") => chat["tool_choice"] = json!("required"),
        Some("none") => chat["tool_choice"] = json!("none"),
        Some("tool") => {
            chat["tool_choice"] = json!({"type": "function", "function": {"name": request.pointer("/tool_choice/name")}})
        }
        _ => {}
    }
    chat
}

fn stop_reason(finish_reason: Option<&str>) -> Value {
    match finish_reason {
        Some("stop") => json!("end_turn"),
        Some("length") => json!("max_tokens"),
        Some("tool_calls" | "function_call") => json!("tool_use"),
        Some(other) => json!(other),
        None => Value::Null,
    }
}

/// OpenAI usage in Anthropic's shape: input tokens exclude cache reads and writes.
fn anthropic_usage(usage: &Value) -> Value {
    let cached = int(usage, "/prompt_tokens_details/cached_tokens");
    let creation = int(usage, "/prompt_tokens_details/cache_creation_tokens");
    json!({
        "input_tokens": (int(usage, "/prompt_tokens") - cached - creation).max(0),
        "output_tokens": int(usage, "/completion_tokens"),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": creation,
    })
}

/// An OpenAI chat completion as an Anthropic message.
pub fn chat_to_message(chat: &Value) -> Value {
    let message = chat
        .pointer("/choices/0/message")
        .cloned()
        .unwrap_or_default();
    let mut content = Vec::new();
    if let Some(text) = message
        .get("content")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        content.push(json!({"type": "text", "text": text}));
    }
    for call in message
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        content.push(tool_use_block(call));
    }
    json!({
        "id": chat.get("id"),
        "type": "message",
        "role": "assistant",
        "model": chat.get("model"),
        "content": content,
        "stop_reason": stop_reason(chat.pointer("/choices/0/finish_reason").and_then(Value::as_str)),
        "stop_sequence": null,
        "usage": anthropic_usage(chat.get("usage").unwrap_or(&Value::Null)),
    })
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
            frames.extend(self.finish(Some(usage)));
        }
        frames
    }

    /// The closing frames (once): the stop reason with usage, then `message_stop`.
    pub fn finish(&mut self, usage: Option<&Value>) -> Vec<String> {
        if self.finished {
            return Vec::new();
        }
        self.finished = true;
        let mut frames = Vec::new();
        self.close_block(&mut frames);
        let usage = usage
            .map(anthropic_usage)
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

/// An error as Anthropic clients expect it.
pub fn error_body(kind: &str, message: &str) -> Value {
    json!({"type": "error", "error": {"type": kind, "message": message}})
}

/// Anthropic's error type for an HTTP status.
pub fn error_type(status: u16) -> &'static str {
    match status {
        400 | 413 | 422 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        503 | 529 => "overloaded_error",
        _ => "api_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_requests_become_chat_requests_and_answers_go_back() {
        let request = json!({
            "model": "claude", "max_tokens": 50, "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
            ],
            "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "any"},
            "stop_sequences": ["END"],
        });
        let chat = messages_to_chat(&request);
        assert_eq!(
            chat["messages"][0],
            json!({"role": "system", "content": "Be brief."})
        );
        assert_eq!(
            chat["messages"][1],
            json!({"role": "user", "content": "weather?"})
        );
        assert_eq!(
            chat["messages"][2]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(
            chat["messages"][3],
            json!({"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"})
        );
        assert_eq!(
            (chat["max_tokens"].clone(), chat["stop"].clone()),
            (json!(50), json!(["END"]))
        );
        assert_eq!(chat["tools"][0]["function"]["name"], "get_weather");
        assert_eq!(chat["tool_choice"], "required");

        let answer = json!({"id": "c1", "model": "gpt", "choices": [{"message": {"role": "assistant", "content": "Hi",
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]}, "finish_reason": "tool_calls"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}}});
        let message = chat_to_message(&answer);
        assert_eq!(message["content"][0], json!({"type": "text", "text": "Hi"}));
        assert_eq!(message["content"][1]["input"], json!({"a": 1}));
        assert_eq!(message["stop_reason"], "tool_use");
        assert_eq!(message["usage"]["input_tokens"], 10);
        assert_eq!(message["usage"]["cache_read_input_tokens"], 2);
    }

    #[test]
    fn chunks_become_anthropic_stream_events() {
        let mut encoder = MessagesEncoder::default();
        let chunks = [
            json!({"id": "c1", "model": "gpt", "choices": [{"delta": {"role": "assistant", "content": ""}}]}),
            json!({"id": "c1", "choices": [{"delta": {"content": "Hi"}}]}),
            json!({"id": "c1", "choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}]}}]}),
            json!({"id": "c1", "choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]}),
            json!({"id": "c1", "choices": [{"delta": {}, "finish_reason": "tool_calls"}]}),
            json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}),
        ];
        let frames: Vec<String> = chunks.iter().flat_map(|c| encoder.encode(c)).collect();
        let events: Vec<&str> = frames
            .iter()
            .map(|f| f.lines().next().unwrap().trim_start_matches("event: "))
            .collect();
        assert_eq!(
            events,
            [
                "message_start",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "content_block_start",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        assert!(
            frames[7].contains("\"stop_reason\":\"tool_use\"")
                && frames[7].contains("\"output_tokens\":2")
        );
        assert!(encoder.finish(None).is_empty());
    }
}
