//! The text of a content value, in either API's shape: a string; or the text of an array's
//! strings and text parts (OpenAI `{"type": "text", "text"}`, Anthropic text blocks), joined by
//! newlines. Images, tool calls and other parts have none.

use serde_json::Value;

pub(crate) fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|part| match part {
                Value::String(text) => Some(text.as_str()),
                Value::Object(_) => match part.get("type").and_then(Value::as_str) {
                    None | Some("text") => part.get("text").and_then(Value::as_str),
                    Some(_) => None,
                },
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn strings_and_text_parts_have_text_other_parts_none() {
        assert_eq!(text_of(&json!("hi")), "hi");
        assert_eq!(
            text_of(
                &json!([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}, "b", {"type": "tool_use", "text": "no"}])
            ),
            "a\nb"
        );
        assert_eq!(text_of(&json!(null)), "");
    }
}
