//! Answers: an Anthropic message → an OpenAI chat completion (from Anthropic upstreams), and an
//! OpenAI chat completion → an Anthropic message (for Anthropic clients).

use serde_json::{Value, json};

use super::{int, tool_use_block};

pub(crate) fn finish_reason(stop_reason: Option<&str>) -> Value {
    match stop_reason {
        Some("end_turn" | "stop_sequence") => json!("stop"),
        Some("max_tokens") => json!("length"),
        Some("tool_use") => json!("tool_calls"),
        Some(other) => json!(other),
        None => Value::Null,
    }
}

/// Anthropic usage in OpenAI's shape: prompt tokens include cache reads and writes.
pub(crate) fn usage_of(input: i64, output: i64, cache_read: i64, cache_creation: i64) -> Value {
    let prompt = input + cache_read + cache_creation;
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": cache_read, "cache_creation_tokens": cache_creation},
    })
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
    // Extended thinking, as OpenAI-compatible servers carry reasoning (`reasoning_content`).
    let thinking: String = blocks
        .iter()
        .filter(|b| b.get("type").and_then(Value::as_str) == Some("thinking"))
        .filter_map(|b| b.get("thinking").and_then(Value::as_str))
        .collect();
    if !thinking.is_empty() {
        reply["reasoning_content"] = json!(thinking);
    }
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

pub(crate) fn stop_reason(finish_reason: Option<&str>) -> Value {
    match finish_reason {
        Some("stop") => json!("end_turn"),
        Some("length") => json!("max_tokens"),
        Some("tool_calls" | "function_call") => json!("tool_use"),
        Some(other) => json!(other),
        None => Value::Null,
    }
}

/// OpenAI usage in Anthropic's shape: input tokens exclude cache reads and writes.
pub(crate) fn anthropic_usage(usage: &Value) -> Value {
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
