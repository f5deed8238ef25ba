//! Anthropic's Messages API, both ways, in one place: OpenAI chat requests become Messages
//! requests for Anthropic upstreams and Messages requests from Anthropic clients become chat
//! (`request`); answers go back the other way (`response`), and so do stream events (`stream`).

pub mod request;
pub mod response;
pub mod stream;

use serde_json::{Value, json};

/// Anthropic requires `max_tokens`; this is used when the client set none.
pub const DEFAULT_MAX_TOKENS: u64 = 4096;
pub const API_VERSION: &str = "2023-06-01";

/// OpenAI content (a string or parts) as Anthropic content blocks; parts without an equivalent
/// are left out (`block_of`).
fn blocks_of(content: &Value) -> Vec<Value> {
    match content {
        Value::String(text) if text.is_empty() => Vec::new(),
        Value::String(text) => vec![json!({"type": "text", "text": text})],
        Value::Array(parts) => parts.iter().filter_map(block_of).collect(),
        _ => Vec::new(),
    }
}

/// One OpenAI content part as an Anthropic block: text, an image (data or URL), a PDF file
/// given as data.
fn block_of(part: &Value) -> Option<Value> {
    match part.get("type").and_then(Value::as_str)? {
        "text" => {
            Some(json!({"type": "text", "text": part.get("text").cloned().unwrap_or_default()}))
        }
        "image_url" => {
            let url = part.pointer("/image_url/url").and_then(Value::as_str)?;
            let source = match data_url(url) {
                Some((media_type, data)) => {
                    json!({"type": "base64", "media_type": media_type, "data": data})
                }
                None => json!({"type": "url", "url": url}),
            };
            Some(json!({"type": "image", "source": source}))
        }
        "file" => {
            let data = part.pointer("/file/file_data").and_then(Value::as_str)?;
            let (media_type, data) = data_url(data)?;
            Some(
                json!({"type": "document", "source": {"type": "base64", "media_type": media_type, "data": data}}),
            )
        }
        _ => None,
    }
}

/// The media type and base64 data of a `data:…;base64,…` URL.
fn data_url(url: &str) -> Option<(&str, &str)> {
    url.strip_prefix("data:")?.split_once(";base64,")
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

pub(crate) fn int(value: &Value, pointer: &str) -> i64 {
    value.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

#[cfg(test)]
mod tests;
