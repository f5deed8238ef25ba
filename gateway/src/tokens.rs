//! Token counts Loom estimates itself when an upstream reports none (a stream cut short, a
//! provider that ignores `stream_options`), with OpenAI's o200k tokenizer (tiktoken-rs).

use std::sync::LazyLock;

use serde_json::Value;

use crate::content::text_of;
use tiktoken_rs::CoreBPE;

static TOKENIZER: LazyLock<Option<CoreBPE>> = LazyLock::new(|| tiktoken_rs::o200k_base().ok());

/// Tokens in `text`; a rough bytes/4 if the tokenizer is unavailable.
pub fn count(text: &str) -> i64 {
    let tokens = match TOKENIZER.as_ref() {
        Some(bpe) => bpe.encode_ordinary(text).len(),
        None => text.len().div_ceil(4),
    };
    i64::try_from(tokens).unwrap_or(i64::MAX)
}

/// Loads the tokenizer ahead of the first request that needs it (it takes a moment).
pub fn warm_up() {
    let _ = TOKENIZER.as_ref();
}

/// Prompt tokens of an OpenAI chat request: message texts plus OpenAI's per-message overhead.
pub fn prompt_tokens(request: &Value) -> i64 {
    let messages = request.get("messages").and_then(Value::as_array);
    let mut tokens = 3;
    for message in messages.into_iter().flatten() {
        tokens += 3 + count(&text_of(message.get("content").unwrap_or(&Value::Null)));
        if let Some(calls) = message.get("tool_calls") {
            tokens += count(&calls.to_string());
        }
    }
    if let Some(input) = request.get("input") {
        tokens = count(&text_of(input));
    }
    tokens
}

/// The bytes of text a request sends a model (messages, input, system prompt, instructions,
/// tools), for a quick over-estimate of its tokens.
pub fn prompt_bytes(request: &Value) -> i64 {
    fn text_bytes(value: &Value) -> usize {
        match value {
            Value::String(text) => text.len(),
            Value::Array(items) => items.iter().map(text_bytes).sum(),
            Value::Object(fields) => fields.values().map(text_bytes).sum(),
            _ => 0,
        }
    }
    let bytes: usize = [
        "messages",
        "input",
        "system",
        "instructions",
        "tools",
        "prompt",
    ]
    .iter()
    .filter_map(|field| request.get(*field))
    .map(text_bytes)
    .sum();
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// The text of a chat answer's choices (content and tool-call arguments), whose tokens
/// are the completion's when the upstream reports no usage.
pub fn answer_text(answer: &Value) -> String {
    let mut text = String::new();
    for choice in answer
        .get("choices")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let Some(content) = choice.pointer("/message/content").and_then(Value::as_str) {
            text.push_str(content);
        }
        for call in choice
            .pointer("/message/tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            text.push_str(
                call.pointer("/function/arguments")
                    .and_then(Value::as_str)
                    .unwrap_or_default(),
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_with_the_real_tokenizer() {
        assert_eq!(count("hello world"), 2);
        assert_eq!(count(""), 0);
        let request = serde_json::json!({"messages": [{"role": "user", "content": "hello world"}]});
        assert_eq!(prompt_tokens(&request), 3 + 3 + 2);
        let parts = serde_json::json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "hello world"}]}]});
        assert_eq!(prompt_tokens(&parts), 8);
    }
}
