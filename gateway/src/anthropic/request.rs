//! Requests: OpenAI chat → Anthropic Messages (OpenAI clients on Anthropic upstreams), and
//! Anthropic Messages → OpenAI chat (Anthropic clients on OpenAI-API upstreams). Every field is
//! carried where the other API has an equivalent; the rest is noted in [`Dropped`] by its path
//! (docs/api.md has the table).

use serde_json::{Map, Value, json};

use super::{DEFAULT_MAX_TOKENS, block_of, blocks_of, tool_use_block};
use crate::content::text_of;
use crate::translate::Dropped;

/// The top-level chat fields [`chat_to_messages`] carries (`stream_options` is Loom's own).
const CHAT_CARRIED: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stream",
    "stream_options",
    "stop",
    "user",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "reasoning_effort",
];

/// The top-level Messages fields [`messages_to_chat`] carries.
const MESSAGES_CARRIED: &[&str] = &[
    "model",
    "messages",
    "system",
    "max_tokens",
    "temperature",
    "top_p",
    "stream",
    "stop_sequences",
    "metadata",
    "tools",
    "tool_choice",
    "thinking",
];

/// Anthropic's smallest thinking budget.
const MIN_THINKING_BUDGET: u64 = 1024;

/// An OpenAI chat request as an Anthropic Messages request.
pub fn chat_to_messages(chat: &Value, dropped: &mut Dropped) -> Value {
    dropped.keys_besides(chat, "", CHAT_CARRIED);
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
    for (i, message) in chat
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let content = message.get("content").unwrap_or(&Value::Null);
        for (j, part) in content.as_array().into_iter().flatten().enumerate() {
            if block_of(part).is_none() {
                let kind = part.get("type").and_then(Value::as_str).unwrap_or("?");
                dropped.note(|| format!("messages[{i}].content[{j}] ({kind})"));
            }
        }
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
    request.insert(
        "model".into(),
        chat.get("model").cloned().unwrap_or_default(),
    );
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
    // OpenAI's effort as a thinking budget, which must stay under `max_tokens` (that counts
    // thinking too, as OpenAI's limit counts reasoning).
    if let Some(effort) = chat.get("reasoning_effort").and_then(Value::as_str) {
        let budget = match effort {
            "low" => Some(MIN_THINKING_BUDGET),
            "medium" => Some(4 * MIN_THINKING_BUDGET),
            "high" | "xhigh" => Some(16 * MIN_THINKING_BUDGET),
            _ => None,
        }
        .map(|budget| budget.min(max_tokens.saturating_sub(1)));
        match budget {
            Some(budget) if budget >= MIN_THINKING_BUDGET => {
                request.insert(
                    "thinking".into(),
                    json!({"type": "enabled", "budget_tokens": budget}),
                );
            }
            Some(_) => dropped.note(|| "reasoning_effort".to_owned()),
            None => {}
        }
    }
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
        let serial = chat.get("parallel_tool_calls") == Some(&Value::Bool(false));
        match (choice, serial) {
            (Some(mut choice), true) => {
                choice["disable_parallel_tool_use"] = json!(true);
                request.insert("tool_choice".into(), choice);
            }
            (Some(choice), false) => {
                request.insert("tool_choice".into(), choice);
            }
            (None, true) => {
                let choice = json!({"type": "auto", "disable_parallel_tool_use": true});
                request.insert("tool_choice".into(), choice);
            }
            (None, false) => {}
        }
    }
    Value::Object(request)
}

/// An Anthropic Messages request as an OpenAI chat request. A streamed one asks for usage, so
/// that the call is priced.
pub fn messages_to_chat(request: &Value, dropped: &mut Dropped) -> Value {
    dropped.keys_besides(request, "", MESSAGES_CARRIED);
    let mut messages = Vec::new();
    if let Some(system) = request.get("system") {
        for (i, block) in system.as_array().into_iter().flatten().enumerate() {
            dropped.keys_besides(block, &format!("system[{i}]"), &["type", "text"]);
        }
        messages.push(json!({"role": "system", "content": text_of(system)}));
    }
    for (i, message) in request
        .get("messages")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
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
        for (j, block) in blocks.iter().enumerate() {
            let at = || format!("messages[{i}].content[{j}]");
            let kind = block.get("type").and_then(Value::as_str).unwrap_or("?");
            let carried: &[&str] = match kind {
                "text" => &["type", "text"],
                "image" | "document" => &["type", "source"],
                "tool_use" => &["type", "id", "name", "input"],
                "tool_result" => &["type", "tool_use_id", "content"],
                _ => &[],
            };
            if carried.is_empty() {
                dropped.note(|| format!("{} ({kind})", at()));
                continue;
            }
            dropped.keys_besides(block, &at(), carried);
            match kind {
                "text" => parts.push(json!({"type": "text", "text": block.get("text")})),
                "image" => match image_url(block.get("source").unwrap_or(&Value::Null)) {
                    Some(url) => parts.push(json!({"type": "image_url", "image_url": {"url": url}})),
                    None => dropped.note(|| format!("{}.source", at())),
                },
                "document" => match document_part(block.get("source").unwrap_or(&Value::Null)) {
                    Some(part) => parts.push(part),
                    None => dropped.note(|| format!("{}.source", at())),
                },
                "tool_use" => tool_calls.push(json!({
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": block.get("input").map(Value::to_string).unwrap_or_else(|| "{}".into())},
                })),
                _ => {
                    let result = block.get("content").unwrap_or(&Value::Null);
                    for (k, part) in result.as_array().into_iter().flatten().enumerate() {
                        if part.get("type").and_then(Value::as_str) != Some("text") {
                            dropped.note(|| format!("{}.content[{k}]", at()));
                        }
                    }
                    messages.push(json!({
                        "role": "tool",
                        "tool_call_id": block.get("tool_use_id"),
                        "content": text_of(result),
                    }));
                }
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
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        chat["stream_options"] = json!({"include_usage": true});
    }
    if let Some(thinking) = request.get("thinking") {
        dropped.keys_besides(thinking, "thinking", &["type", "budget_tokens"]);
        if thinking.get("type").and_then(Value::as_str) == Some("enabled") {
            let budget = thinking
                .get("budget_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0);
            chat["reasoning_effort"] = json!(match budget {
                0..=2048 => "low",
                2049..=8192 => "medium",
                _ => "high",
            });
        }
    }
    if let Some(metadata) = request.get("metadata") {
        dropped.keys_besides(metadata, "metadata", &["user_id"]);
        if let Some(user) = metadata.get("user_id") {
            chat["user"] = user.clone();
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
        // Anthropic's server tools (web search, code execution, …) have a `type` of their own.
        if tool.get("type").is_some_and(|t| t != "custom") {
            let kind = tool.get("type").and_then(Value::as_str).unwrap_or("?");
            dropped.note(|| format!("tools[{i}] ({kind})"));
            continue;
        }
        let carried = ["type", "name", "description", "input_schema"];
        dropped.keys_besides(tool, &format!("tools[{i}]"), &carried);
        tools.push(json!({"type": "function", "function": {
            "name": tool.get("name"),
            "description": tool.get("description"),
            "parameters": tool.get("input_schema").cloned().unwrap_or_else(|| json!({"type": "object"})),
        }}));
    }
    if !tools.is_empty() {
        chat["tools"] = Value::Array(tools);
    }
    if let Some(choice) = request.get("tool_choice") {
        let carried = ["type", "name", "disable_parallel_tool_use"];
        dropped.keys_besides(choice, "tool_choice", &carried);
        match choice.get("type").and_then(Value::as_str) {
            Some("any") => chat["tool_choice"] = json!("required"),
            Some("none") => chat["tool_choice"] = json!("none"),
            Some("tool") => {
                chat["tool_choice"] =
                    json!({"type": "function", "function": {"name": choice.get("name")}})
            }
            _ => {}
        }
        if choice.get("disable_parallel_tool_use") == Some(&Value::Bool(true)) {
            chat["parallel_tool_calls"] = json!(false);
        }
    }
    chat
}

/// An image block's source as an OpenAI image URL (a data URL for base64 data).
fn image_url(source: &Value) -> Option<String> {
    let field = |name: &str| source.get(name).and_then(Value::as_str);
    match field("type")? {
        "base64" => Some(format!(
            "data:{};base64,{}",
            field("media_type").unwrap_or("image/png"),
            field("data")?
        )),
        "url" => field("url").map(str::to_owned),
        _ => None,
    }
}

/// A document block's source as an OpenAI content part: a PDF as a `file` part, plain text as
/// text. Documents by URL or file id have no equivalent.
fn document_part(source: &Value) -> Option<Value> {
    let field = |name: &str| source.get(name).and_then(Value::as_str);
    match field("type")? {
        "base64" => {
            let media_type = field("media_type").unwrap_or("application/pdf");
            let data = format!("data:{media_type};base64,{}", field("data")?);
            Some(json!({"type": "file", "file": {"filename": "document.pdf", "file_data": data}}))
        }
        "text" => Some(json!({"type": "text", "text": field("data")?})),
        _ => None,
    }
}
