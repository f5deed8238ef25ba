//! Requests: OpenAI chat → Anthropic Messages (for Anthropic upstreams), and Anthropic Messages
//! → OpenAI chat (for Anthropic clients).

use serde_json::{Map, Value, json};

use super::{DEFAULT_MAX_TOKENS, blocks_of, tool_use_block};
use crate::content::text_of;

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

/// An Anthropic Messages request as an OpenAI chat request.
pub fn messages_to_chat(request: &Value) -> Value {
    let mut messages = Vec::new();
    if let Some(system) = request.get("system") {
        messages.push(json!({"role": "system", "content": text_of(system)}));
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
                    "content": text_of(block.get("content").unwrap_or(&Value::Null)),
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
