//! Anthropic upstreams: OpenAI chat requests become Messages requests; answers and stream events
//! come back as OpenAI chat, tool calls included.

use axum::body::Bytes;
use loom_schemas::ExposeSecret;
use serde_json::{Map, Value, json};

use super::{Adapter, Operation};
use crate::config::Upstream;

/// Anthropic requires `max_tokens`; this is used when the client set none.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
pub const API_VERSION: &str = "2023-06-01";

/// Text of OpenAI content: a string, or its text parts joined.
pub(crate) fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// OpenAI content parts as Anthropic content blocks.
fn blocks_of(content: &Value) -> Vec<Value> {
    match content {
        Value::String(text) if text.is_empty() => Vec::new(),
        Value::String(text) => vec![json!({"type": "text", "text": text})],
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| match part.get("type").and_then(Value::as_str) {
                Some("text") => Some(
                    json!({"type": "text", "text": part.get("text").cloned().unwrap_or_default()}),
                ),
                Some("image_url") => {
                    let url = part.pointer("/image_url/url").and_then(Value::as_str)?;
                    let source = match url
                        .strip_prefix("data:")
                        .and_then(|rest| rest.split_once(";base64,"))
                    {
                        Some((media_type, data)) => {
                            json!({"type": "base64", "media_type": media_type, "data": data})
                        }
                        None => json!({"type": "url", "url": url}),
                    };
                    Some(json!({"type": "image", "source": source}))
                }
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

/// An OpenAI tool call as an Anthropic `tool_use` block (arguments parsed to `input`).
pub(crate) fn tool_use_block(call: &Value) -> Value {
    let arguments = call
        .pointer("/function/arguments")
        .and_then(Value::as_str)
        .unwrap_or("{}");
    json!({
        "type": "tool_use",
        "id": call.get("id").cloned().unwrap_or_default(),
        "name": call.pointer("/function/name").cloned().unwrap_or_default(),
        "input": serde_json::from_str::<Value>(arguments).unwrap_or_else(|_| json!({})),
    })
}

/// An OpenAI chat request as an Anthropic Messages request for `model`.
pub fn chat_to_messages(chat: &Value, model: &str) -> Value {
    let mut system = Vec::new();
    let mut messages: Vec<(String, Vec<Value>)> = Vec::new();
    let mut push = |role: &str, blocks: Vec<Value>| {
        if blocks.is_empty() {
            return;
        }
        // Anthropic wants user and assistant turns to alternate: merge neighbours of one role.
        match messages.last_mut() {
            Some((last, content)) if last == role => content.extend(blocks),
            _ => messages.push((role.to_owned(), blocks)),
        }
    };
    for message in chat
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let content = message.get("content").unwrap_or(&Value::Null);
        match message
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("user")
        {
            "system" | "developer" => system.push(text_of(content)),
            "assistant" => {
                let mut blocks = blocks_of(content);
                for call in message
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    blocks.push(tool_use_block(call));
                }
                push("assistant", blocks);
            }
            "tool" => push(
                "user",
                vec![json!({
                    "type": "tool_result",
                    "tool_use_id": message.get("tool_call_id").cloned().unwrap_or_default(),
                    "content": text_of(content),
                })],
            ),
            _ => push("user", blocks_of(content)),
        }
    }
    let mut request = Map::new();
    request.insert("model".into(), json!(model));
    request.insert(
        "messages".into(),
        Value::Array(
            messages
                .into_iter()
                .map(|(role, content)| json!({"role": role, "content": content}))
                .collect(),
        ),
    );
    let max_tokens = chat
        .get("max_completion_tokens")
        .or_else(|| chat.get("max_tokens"))
        .and_then(Value::as_u64)
        .unwrap_or(DEFAULT_MAX_TOKENS);
    request.insert("max_tokens".into(), json!(max_tokens));
    if !system.is_empty() {
        request.insert("system".into(), json!(system.join("\n\n")));
    }
    for key in ["temperature", "top_p", "stream"] {
        if let Some(value) = chat.get(key) {
            request.insert(key.into(), value.clone());
        }
    }
    match chat.get("stop") {
        Some(Value::String(stop)) => {
            request.insert("stop_sequences".into(), json!([stop]));
        }
        Some(stops @ Value::Array(_)) => {
            request.insert("stop_sequences".into(), stops.clone());
        }
        _ => {}
    }
    if let Some(user) = chat.get("user").and_then(Value::as_str) {
        request.insert("metadata".into(), json!({"user_id": user}));
    }
    let tools: Vec<Value> = chat
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|tool| {
            let function = tool.get("function")?;
            let mut converted = json!({
                "name": function.get("name")?,
                "input_schema": function.get("parameters").cloned().unwrap_or_else(|| json!({"type": "object"})),
            });
            if let Some(description) = function.get("description") {
                converted["description"] = description.clone();
            }
            Some(converted)
        })
        .collect();
    if !tools.is_empty() {
        request.insert("tools".into(), Value::Array(tools));
        let choice = match chat.get("tool_choice") {
            Some(Value::String(choice)) if choice == "required" => Some(json!({"type": "any"})),
            Some(Value::String(choice)) if choice == "none" => Some(json!({"type": "none"})),
            Some(Value::Object(choice)) => choice
                .get("function")
                .and_then(|f| f.get("name"))
                .map(|name| json!({"type": "tool", "name": name})),
            _ => None,
        };
        if let Some(choice) = choice {
            request.insert("tool_choice".into(), choice);
        }
    }
    Value::Object(request)
}

fn finish_reason(stop_reason: Option<&str>) -> Value {
    match stop_reason {
        Some("end_turn" | "stop_sequence") => json!("stop"),
        Some("max_tokens") => json!("length"),
        Some("tool_use") => json!("tool_calls"),
        Some(other) => json!(other),
        None => Value::Null,
    }
}

/// Anthropic usage in OpenAI's shape: prompt tokens include cache reads and writes.
fn usage_of(input: i64, output: i64, cache_read: i64, cache_creation: i64) -> Value {
    let prompt = input + cache_read + cache_creation;
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": cache_read, "cache_creation_tokens": cache_creation},
    })
}

pub(crate) fn int(value: &Value, pointer: &str) -> i64 {
    value.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

/// An Anthropic message as an OpenAI chat completion.
pub fn message_to_chat(message: &Value) -> Value {
    let blocks = message
        .get("content")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let text: String = blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
        .filter_map(|b| b.get("text").and_then(Value::as_str))
        .collect();
    let tool_calls: Vec<Value> = blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
        .map(|b| {
            json!({
                "id": b.get("id").cloned().unwrap_or_default(),
                "type": "function",
                "function": {
                    "name": b.get("name").cloned().unwrap_or_default(),
                    "arguments": b.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into()),
                },
            })
        })
        .collect();
    let mut reply = json!({"role": "assistant", "content": if text.is_empty() && !tool_calls.is_empty() { Value::Null } else { json!(text) }});
    if !tool_calls.is_empty() {
        reply["tool_calls"] = Value::Array(tool_calls);
    }
    let usage = message.get("usage").cloned().unwrap_or_default();
    json!({
        "id": message.get("id").cloned().unwrap_or_default(),
        "object": "chat.completion",
        "created": loom_schemas::event::now_micros() / 1_000_000,
        "model": message.get("model").cloned().unwrap_or_default(),
        "choices": [{
            "index": 0,
            "message": reply,
            "finish_reason": finish_reason(message.get("stop_reason").and_then(Value::as_str)),
            "logprobs": null,
        }],
        "usage": usage_of(
            int(&usage, "/input_tokens"),
            int(&usage, "/output_tokens"),
            int(&usage, "/cache_read_input_tokens"),
            int(&usage, "/cache_creation_input_tokens"),
        ),
    })
}

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
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": loom_schemas::event::now_micros() / 1_000_000,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        })
        .to_string()
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
                self.output_tokens = int(&event, "/usage/output_tokens").max(self.output_tokens);
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

/// Anthropic's Messages API, translated to and from OpenAI chat.
pub struct Anthropic;

impl Adapter for Anthropic {
    fn request(
        &self,
        http: &reqwest::Client,
        upstream: &Upstream,
        _operation: Operation,
        model: &str,
        body: &Value,
    ) -> reqwest::RequestBuilder {
        let mut request = http
            .post(format!("{}/messages", upstream.base_url))
            .header("anthropic-version", API_VERSION)
            .json(&chat_to_messages(body, model));
        if let Some(key) = &upstream.api_key {
            request = request.header("x-api-key", key.expose_secret());
        }
        request
    }

    fn supports(&self, operation: Operation) -> bool {
        operation == Operation::Chat
    }

    fn answer(&self, body: Bytes) -> Bytes {
        match serde_json::from_slice::<Value>(&body) {
            Ok(message) => Bytes::from(message_to_chat(&message).to_string()),
            Err(_) => body,
        }
    }

    fn stream_translator(&self) -> Option<StreamTranslator> {
        Some(StreamTranslator::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_requests_become_messages_requests() {
        let chat = json!({
            "model": "claude", "max_tokens": 100, "temperature": 0.1, "stop": "END", "user": "u1",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "weather?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "user", "content": "thanks"},
            ],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}}}],
            "tool_choice": "required",
        });
        let request = chat_to_messages(&chat, "claude-sonnet-4");
        assert_eq!(request["model"], "claude-sonnet-4");
        assert_eq!(request["system"], "Be brief.");
        assert_eq!(request["max_tokens"], 100);
        assert_eq!(request["stop_sequences"], json!(["END"]));
        assert_eq!(request["metadata"]["user_id"], "u1");
        let messages = request["messages"].as_array().unwrap();
        let roles: Vec<&str> = messages
            .iter()
            .map(|m| m["role"].as_str().unwrap())
            .collect();
        assert_eq!(roles, ["user", "assistant", "user"]);
        assert_eq!(
            messages[0]["content"][1]["source"],
            json!({"type": "base64", "media_type": "image/png", "data": "AAAA"})
        );
        assert_eq!(messages[1]["content"][0]["input"], json!({"city": "Paris"}));
        assert_eq!(
            messages[2]["content"][0],
            json!({"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"})
        );
        assert_eq!(
            messages[2]["content"][1],
            json!({"type": "text", "text": "thanks"})
        );
        assert_eq!(
            request["tools"][0]["input_schema"],
            json!({"type": "object"})
        );
        assert_eq!(request["tool_choice"], json!({"type": "any"}));
    }

    #[test]
    fn messages_become_chat_completions_with_usage_and_tool_calls() {
        let message = json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4",
            "content": [{"type": "text", "text": "Let me check."}, {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 10, "output_tokens": 5, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 20},
        });
        let chat = message_to_chat(&message);
        assert_eq!(chat["choices"][0]["message"]["content"], "Let me check.");
        assert_eq!(
            chat["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "{\"city\":\"Paris\"}"
        );
        assert_eq!(chat["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(chat["usage"]["prompt_tokens"], 130);
        assert_eq!(chat["usage"]["prompt_tokens_details"]["cached_tokens"], 100);
        assert_eq!(chat["usage"]["completion_tokens"], 5);
    }

    #[test]
    fn stream_events_become_chunks() {
        let mut translator = StreamTranslator::default();
        let mut chunks = Vec::new();
        for (event, data) in [
            (
                "message_start",
                r#"{"type":"message_start","message":{"id":"msg_1","model":"claude","usage":{"input_tokens":7,"output_tokens":1}}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}"#,
            ),
            (
                "content_block_start",
                r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_1","name":"f","input":{}}}"#,
            ),
            (
                "content_block_delta",
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"input_json_delta","partial_json":"{}"}}"#,
            ),
            (
                "message_delta",
                r#"{"type":"message_delta","delta":{"stop_reason":"tool_use"},"usage":{"output_tokens":9}}"#,
            ),
            ("message_stop", r#"{"type":"message_stop"}"#),
        ] {
            chunks.extend(translator.translate(event, data));
        }
        assert_eq!(chunks.last().unwrap(), "[DONE]");
        let parsed: Vec<Value> = chunks[..chunks.len() - 1]
            .iter()
            .map(|c| serde_json::from_str(c).unwrap())
            .collect();
        assert_eq!(parsed[1]["choices"][0]["delta"]["content"], "Hi");
        assert_eq!(
            parsed[2]["choices"][0]["delta"]["tool_calls"][0]["id"],
            "toolu_1"
        );
        assert_eq!(
            parsed[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
            "{}"
        );
        assert_eq!(parsed[4]["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(parsed[5]["usage"]["completion_tokens"], 9);
        assert_eq!(parsed[5]["usage"]["prompt_tokens"], 7);
    }
}
