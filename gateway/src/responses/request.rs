//! Requests: OpenAI Responses → OpenAI chat, for deployments that do not serve the Responses API
//! (OpenAI-compatible servers, and Anthropic through chat). The stateless subset is carried —
//! input items, instructions, function tools, text and JSON output, sampling and reasoning
//! settings. What needs state or tools only OpenAI runs cannot be served ([`Unservable`]); other
//! fields without an equivalent are noted in [`Dropped`].

use serde_json::{Map, Value, json};

use crate::content::text_of;
use crate::translate::{Dropped, Unservable};

/// The top-level Responses fields [`responses_to_chat`] carries or refuses itself.
const CARRIED: &[&str] = &[
    "model",
    "input",
    "instructions",
    "max_output_tokens",
    "metadata",
    "parallel_tool_calls",
    "temperature",
    "top_p",
    "top_logprobs",
    "tools",
    "tool_choice",
    "stream",
    "stream_options",
    "user",
    "safety_identifier",
    "service_tier",
    "prompt_cache_key",
    "reasoning",
    "text",
    "store",
    "background",
    "previous_response_id",
    "conversation",
    "prompt",
];

/// Fields that need the upstream's stored state or its own tools: a chat upstream cannot serve
/// a request that sets them.
const STATEFUL: &[&str] = &["previous_response_id", "conversation", "prompt"];

/// A Responses request as an OpenAI chat request.
pub fn responses_to_chat(request: &Value, dropped: &mut Dropped) -> Result<Value, Unservable> {
    for field in STATEFUL {
        if request.get(*field).is_some_and(|v| !v.is_null()) {
            return Err(Unservable::field(field, "needs state stored at OpenAI"));
        }
    }
    dropped.keys_besides(request, "", CARRIED);
    if request.get("store") == Some(&Value::Bool(true)) {
        dropped.note(|| "store".to_owned());
    }
    let mut messages = Vec::new();
    if let Some(instructions) = request.get("instructions").and_then(Value::as_str) {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    match request.get("input") {
        Some(Value::String(text)) => messages.push(json!({"role": "user", "content": text})),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                input_item(item, i, &mut messages, dropped)?;
            }
        }
        _ => {}
    }
    let mut chat = Map::new();
    chat.insert(
        "model".into(),
        request.get("model").cloned().unwrap_or_default(),
    );
    chat.insert("messages".into(), Value::Array(messages));
    for (from, to) in [
        ("max_output_tokens", "max_tokens"),
        ("metadata", "metadata"),
        ("parallel_tool_calls", "parallel_tool_calls"),
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("user", "user"),
        ("safety_identifier", "safety_identifier"),
        ("service_tier", "service_tier"),
        ("prompt_cache_key", "prompt_cache_key"),
    ] {
        if let Some(value) = request.get(from).filter(|v| !v.is_null()) {
            chat.insert(to.into(), value.clone());
        }
    }
    if let Some(top) = request.get("top_logprobs").filter(|v| !v.is_null()) {
        chat.insert("logprobs".into(), json!(true));
        chat.insert("top_logprobs".into(), top.clone());
    }
    if request.get("stream") == Some(&Value::Bool(true)) {
        chat.insert("stream".into(), json!(true));
        chat.insert("stream_options".into(), json!({"include_usage": true}));
    }
    if let Some(reasoning) = request.get("reasoning").filter(|v| v.is_object()) {
        dropped.keys_besides(reasoning, "reasoning", &["effort"]);
        if let Some(effort) = reasoning.get("effort").filter(|v| !v.is_null()) {
            chat.insert("reasoning_effort".into(), effort.clone());
        }
    }
    if let Some(text) = request.get("text").filter(|v| v.is_object()) {
        dropped.keys_besides(text, "text", &["format", "verbosity"]);
        if let Some(verbosity) = text.get("verbosity").filter(|v| !v.is_null()) {
            chat.insert("verbosity".into(), verbosity.clone());
        }
        if let Some(format) = text.get("format").and_then(response_format) {
            chat.insert("response_format".into(), format);
        }
    }
    let mut tools = Vec::new();
    for (i, tool) in request
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let kind = tool.get("type").and_then(Value::as_str).unwrap_or("?");
        if kind != "function" {
            return Err(Unservable::field(
                &format!("tools[{i}] ({kind})"),
                "is a tool only OpenAI runs",
            ));
        }
        let at = format!("tools[{i}]");
        dropped.keys_besides(
            tool,
            &at,
            &["type", "name", "description", "parameters", "strict"],
        );
        let mut function = Map::new();
        for field in ["name", "description", "parameters", "strict"] {
            if let Some(value) = tool.get(field).filter(|v| !v.is_null()) {
                function.insert(field.into(), value.clone());
            }
        }
        tools.push(json!({"type": "function", "function": function}));
    }
    if !tools.is_empty() {
        chat.insert("tools".into(), Value::Array(tools));
    }
    match request.get("tool_choice") {
        None | Some(Value::Null) => {}
        Some(Value::String(mode)) => {
            chat.insert("tool_choice".into(), json!(mode));
        }
        Some(choice) => match choice.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = choice.get("name").cloned().unwrap_or_default();
                chat.insert(
                    "tool_choice".into(),
                    json!({"type": "function", "function": {"name": name}}),
                );
            }
            Some("allowed_tools") => dropped.note(|| "tool_choice (allowed_tools)".to_owned()),
            kind => {
                let kind = kind.unwrap_or("?");
                return Err(Unservable::field(
                    &format!("tool_choice ({kind})"),
                    "names a tool only OpenAI runs",
                ));
            }
        },
    }
    Ok(Value::Object(chat))
}

/// `text.format` as chat's `response_format` (`None` for plain text).
fn response_format(format: &Value) -> Option<Value> {
    match format.get("type").and_then(Value::as_str)? {
        "json_object" => Some(json!({"type": "json_object"})),
        "json_schema" => {
            let mut schema = Map::new();
            for field in ["name", "description", "schema", "strict"] {
                if let Some(value) = format.get(field).filter(|v| !v.is_null()) {
                    schema.insert(field.into(), value.clone());
                }
            }
            Some(json!({"type": "json_schema", "json_schema": schema}))
        }
        _ => None,
    }
}

/// One input item as chat messages (a function call joins the assistant message before it).
fn input_item(
    item: &Value,
    i: usize,
    messages: &mut Vec<Value>,
    dropped: &mut Dropped,
) -> Result<(), Unservable> {
    let at = || format!("input[{i}]");
    let kind = item
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message");
    match kind {
        "message" => {
            let role = match item.get("role").and_then(Value::as_str) {
                Some("developer") | Some("system") => "system",
                Some("assistant") => "assistant",
                _ => "user",
            };
            dropped.keys_besides(item, &at(), &["type", "role", "content", "id", "status"]);
            let content = item.get("content").unwrap_or(&Value::Null);
            let content = match (content, role) {
                (Value::Array(_), "assistant" | "system") => json!(text_of_parts(content)),
                (Value::Array(parts), _) => {
                    let mut converted = Vec::new();
                    for (j, part) in parts.iter().enumerate() {
                        match content_part(part) {
                            Some(part) => converted.push(part),
                            None => {
                                let kind = part.get("type").and_then(Value::as_str).unwrap_or("?");
                                dropped.note(|| format!("{}.content[{j}] ({kind})", at()));
                            }
                        }
                    }
                    Value::Array(converted)
                }
                (other, _) => other.clone(),
            };
            messages.push(json!({"role": role, "content": content}));
        }
        "function_call" => {
            dropped.keys_besides(
                item,
                &at(),
                &["type", "id", "call_id", "name", "arguments", "status"],
            );
            let call = json!({
                "id": item.get("call_id").cloned().unwrap_or_default(),
                "type": "function",
                "function": {
                    "name": item.get("name").cloned().unwrap_or_default(),
                    "arguments": item.get("arguments").cloned().unwrap_or_else(|| json!("{}")),
                },
            });
            let joins = messages
                .last()
                .is_some_and(|m| m.get("role").and_then(Value::as_str) == Some("assistant"));
            match messages.last_mut().filter(|_| joins) {
                Some(last) => match last.get_mut("tool_calls").and_then(Value::as_array_mut) {
                    Some(calls) => calls.push(call),
                    None => last["tool_calls"] = json!([call]),
                },
                None => messages
                    .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
            }
        }
        "function_call_output" => {
            dropped.keys_besides(item, &at(), &["type", "id", "call_id", "output", "status"]);
            let output = match item.get("output") {
                Some(Value::String(text)) => text.clone(),
                Some(parts @ Value::Array(_)) => text_of_parts(parts),
                _ => String::new(),
            };
            messages.push(json!({
                "role": "tool",
                "tool_call_id": item.get("call_id").cloned().unwrap_or_default(),
                "content": output,
            }));
        }
        "item_reference" => {
            return Err(Unservable::field(
                &at(),
                "refers to an item stored at OpenAI",
            ));
        }
        other => dropped.note(|| format!("{} ({other})", at())),
    }
    Ok(())
}

/// The text of Responses content parts (`input_text`, `output_text`, `refusal`).
fn text_of_parts(parts: &Value) -> String {
    let texts: Vec<&str> = parts
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|part| {
            part.get("text")
                .or_else(|| part.get("refusal"))
                .and_then(Value::as_str)
        })
        .collect();
    match texts.as_slice() {
        [] => text_of(parts),
        _ => texts.join("\n"),
    }
}

/// A Responses input content part as a chat content part, if chat has one.
fn content_part(part: &Value) -> Option<Value> {
    let field = |name: &str| part.get(name).filter(|v| !v.is_null());
    match part.get("type").and_then(Value::as_str)? {
        "input_text" | "output_text" => Some(json!({"type": "text", "text": field("text")?})),
        "input_image" => {
            let mut image = Map::new();
            image.insert("url".into(), field("image_url")?.clone());
            if let Some(detail) = field("detail") {
                image.insert("detail".into(), detail.clone());
            }
            Some(json!({"type": "image_url", "image_url": image}))
        }
        "input_file" => {
            let mut file = Map::new();
            for name in ["file_data", "file_id", "filename"] {
                if let Some(value) = field(name) {
                    file.insert(name.into(), value.clone());
                }
            }
            (file.contains_key("file_data") || file.contains_key("file_id"))
                .then(|| json!({"type": "file", "file": file}))
        }
        "input_audio" => Some(json!({"type": "input_audio", "input_audio": field("input_audio")?})),
        _ => None,
    }
}
