//! Answers: an OpenAI chat completion → a Responses `response` object (for Responses clients on
//! chat deployments), and a `response` object → a chat completion (what Loom reads usage, the
//! served model and function calls from when the upstream serves the Responses API).

use serde_json::{Map, Value, json};

use crate::anthropic::int;

/// A new id with the Responses API's prefix for its kind (`resp`, `msg`, `fc`).
pub(crate) fn new_id(prefix: &str) -> String {
    format!("{prefix}_{}", uuid::Uuid::now_v7().simple())
}

/// Responses usage from chat usage.
pub(crate) fn usage_from_chat(usage: &Value) -> Value {
    let input = int(usage, "/prompt_tokens");
    let output = int(usage, "/completion_tokens");
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": int(usage, "/prompt_tokens_details/cached_tokens")},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": int(usage, "/completion_tokens_details/reasoning_tokens")},
        "total_tokens": input + output,
    })
}

/// Chat usage from Responses usage (`cache_creation_tokens` kept for Anthropic-backed servers).
pub(crate) fn usage_to_chat(usage: &Value) -> Value {
    let input = int(usage, "/input_tokens");
    let output = int(usage, "/output_tokens");
    json!({
        "prompt_tokens": input,
        "completion_tokens": output,
        "total_tokens": input + output,
        "prompt_tokens_details": {"cached_tokens": int(usage, "/input_tokens_details/cached_tokens")},
        "completion_tokens_details": {"reasoning_tokens": int(usage, "/output_tokens_details/reasoning_tokens")},
    })
}

/// The status of a response that ended with chat's `finish_reason`, and why it is incomplete.
pub(crate) fn status_of(finish_reason: Option<&str>) -> (&'static str, Value) {
    match finish_reason {
        Some("length") => ("incomplete", json!({"reason": "max_output_tokens"})),
        Some("content_filter") => ("incomplete", json!({"reason": "content_filter"})),
        _ => ("completed", Value::Null),
    }
}

/// A `response` object, with the settings of `request` echoed as OpenAI does, in `status`, with
/// `output` items (and `usage` when known).
pub(crate) fn response_object(
    id: &str,
    created_at: i64,
    model: &Value,
    request: &Value,
    status: &str,
    output: Vec<Value>,
) -> Map<String, Value> {
    let setting = |name: &str, default: Value| {
        request
            .get(name)
            .filter(|v| !v.is_null())
            .cloned()
            .unwrap_or(default)
    };
    let mut response = Map::new();
    for (key, value) in [
        ("id", json!(id)),
        ("object", json!("response")),
        ("created_at", json!(created_at)),
        ("status", json!(status)),
        ("background", json!(false)),
        ("error", Value::Null),
        ("incomplete_details", Value::Null),
        ("instructions", setting("instructions", Value::Null)),
        (
            "max_output_tokens",
            setting("max_output_tokens", Value::Null),
        ),
        ("metadata", setting("metadata", json!({}))),
        ("model", model.clone()),
        ("output", Value::Array(output)),
        (
            "parallel_tool_calls",
            setting("parallel_tool_calls", json!(true)),
        ),
        ("previous_response_id", Value::Null),
        (
            "reasoning",
            json!({"effort": request.pointer("/reasoning/effort").cloned().unwrap_or_default(), "summary": null}),
        ),
        ("store", json!(false)),
        ("temperature", setting("temperature", json!(1.0))),
        ("text", setting("text", json!({"format": {"type": "text"}}))),
        ("tool_choice", setting("tool_choice", json!("auto"))),
        ("tools", setting("tools", json!([]))),
        ("top_p", setting("top_p", json!(1.0))),
        ("truncation", json!("disabled")),
        ("usage", Value::Null),
        ("user", setting("user", Value::Null)),
    ] {
        response.insert(key.into(), value);
    }
    response
}

/// An assistant message output item with `text`.
pub(crate) fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({
        "id": id, "type": "message", "status": status, "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    })
}

/// A function call output item.
pub(crate) fn function_call_item(
    id: &str,
    call_id: &Value,
    name: &Value,
    arguments: &str,
    status: &str,
) -> Value {
    json!({
        "id": id, "type": "function_call", "status": status,
        "call_id": call_id, "name": name, "arguments": arguments,
    })
}

/// A chat completion as a `response` object answering `request`.
pub fn chat_to_response(chat: &Value, request: &Value) -> Value {
    let message = chat.pointer("/choices/0/message").unwrap_or(&Value::Null);
    let mut output = Vec::new();
    if let Some(text) = message
        .get("content")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
    {
        output.push(message_item(&new_id("msg"), text, "completed"));
    }
    if let Some(refusal) = message.get("refusal").and_then(Value::as_str) {
        output.push(json!({
            "id": new_id("msg"), "type": "message", "status": "completed", "role": "assistant",
            "content": [{"type": "refusal", "refusal": refusal}],
        }));
    }
    for call in message
        .get("tool_calls")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        output.push(function_call_item(
            &new_id("fc"),
            call.get("id").unwrap_or(&Value::Null),
            call.pointer("/function/name").unwrap_or(&Value::Null),
            call.pointer("/function/arguments")
                .and_then(Value::as_str)
                .unwrap_or("{}"),
            "completed",
        ));
    }
    let (status, incomplete) = status_of(
        chat.pointer("/choices/0/finish_reason")
            .and_then(Value::as_str),
    );
    let created = chat
        .get("created")
        .and_then(Value::as_i64)
        .unwrap_or_else(|| loom_schemas::event::now_micros() / 1_000_000);
    let model = chat.get("model").unwrap_or(&Value::Null);
    let mut response = response_object(&new_id("resp"), created, model, request, status, output);
    response.insert("incomplete_details".into(), incomplete);
    if let Some(usage) = chat.get("usage").filter(|u| u.is_object()) {
        response.insert("usage".into(), usage_from_chat(usage));
    }
    Value::Object(response)
}

/// A `response` object as a chat completion: its text, function calls and usage.
pub fn response_to_chat(response: &Value) -> Value {
    let mut text = String::new();
    let mut tool_calls = Vec::new();
    for item in response
        .get("output")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match item.get("type").and_then(Value::as_str) {
            Some("message") => {
                for part in item
                    .get("content")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if let Some(piece) = part.get("text").and_then(Value::as_str) {
                        text.push_str(piece);
                    }
                }
            }
            Some("function_call") => tool_calls.push(json!({
                "id": item.get("call_id").cloned().unwrap_or_default(),
                "type": "function",
                "function": {
                    "name": item.get("name").cloned().unwrap_or_default(),
                    "arguments": item.get("arguments").cloned().unwrap_or_else(|| json!("")),
                },
            })),
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": text});
    let finish = if tool_calls.is_empty() {
        match response.get("status").and_then(Value::as_str) {
            Some("incomplete") => "length",
            _ => "stop",
        }
    } else {
        message["tool_calls"] = Value::Array(tool_calls);
        "tool_calls"
    };
    let mut chat = json!({
        "id": response.get("id").cloned().unwrap_or_default(),
        "object": "chat.completion",
        "model": response.get("model").cloned().unwrap_or_default(),
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
    });
    if let Some(usage) = response.get("usage").filter(|u| u.is_object()) {
        chat["usage"] = usage_to_chat(usage);
    }
    chat
}
