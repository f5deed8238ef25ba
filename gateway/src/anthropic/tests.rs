//! The translations both ways, on the shapes the official SDKs send and expect.

use serde_json::{Value, json};

use super::request::*;
use super::response::*;
use super::stream::*;
use crate::translate::Dropped;

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
    let mut dropped = Dropped::default();
    let request = chat_to_messages(&chat, &mut dropped);
    assert!(dropped.into_paths().is_empty());
    assert_eq!(request["model"], "claude");
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
    let mut dropped = Dropped::default();
    let chat = messages_to_chat(&request, &mut dropped);
    assert!(dropped.into_paths().is_empty());
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
    let mut frames: Vec<String> = chunks.iter().flat_map(|c| encoder.encode(c)).collect();
    // The stop reason and usage go out at the end, once the request is recorded.
    frames.extend(encoder.finish());
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
    assert!(encoder.finish().is_empty());
}

#[test]
fn what_chat_has_no_place_for_is_named_and_thinking_maps_to_effort() {
    let request = json!({
        "model": "claude", "max_tokens": 4096, "top_k": 5,
        "thinking": {"type": "enabled", "budget_tokens": 2000},
        "system": [{"type": "text", "text": "long system", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "summarize", "cache_control": {"type": "ephemeral"}},
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
            {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}},
        ]}],
        "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        "metadata": {"user_id": "u1"},
    });
    let mut dropped = Dropped::default();
    let chat = messages_to_chat(&request, &mut dropped);
    assert_eq!(chat["reasoning_effort"], "low");
    assert_eq!(chat["user"], "u1");
    assert_eq!(
        chat["messages"][1]["content"][1],
        json!({"type": "file", "file": {"filename": "document.pdf", "file_data": "data:application/pdf;base64,JVBE"}})
    );
    assert_eq!(
        dropped.into_paths(),
        [
            "top_k",
            "system[0].cache_control",
            "messages[0].content[0].cache_control",
            "messages[0].content[2].source",
            "tools[0] (web_search_20250305)",
        ]
    );

    // Back the other way: effort becomes a thinking budget under max_tokens, a PDF a document.
    let chat = json!({"model": "gpt", "max_completion_tokens": 3000, "reasoning_effort": "high", "seed": 1,
        "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}}, {"type": "input_audio", "input_audio": {}}]}]});
    let mut dropped = Dropped::default();
    let messages = chat_to_messages(&chat, &mut dropped);
    assert_eq!(
        messages["thinking"],
        json!({"type": "enabled", "budget_tokens": 2999})
    );
    assert_eq!(messages["messages"][0]["content"][0]["type"], "document");
    assert_eq!(
        dropped.into_paths(),
        ["seed", "messages[0].content[1] (input_audio)"]
    );
}

#[test]
fn thinking_reaches_chat_clients_as_reasoning_content() {
    let mut translator = StreamTranslator::default();
    let chunks = translator.translate(
        "content_block_delta",
        r#"{"type": "content_block_delta", "index": 0, "delta": {"type": "thinking_delta", "thinking": "Hmm."}}"#,
    );
    let chunk: serde_json::Value = serde_json::from_str(&chunks[0]).unwrap();
    assert_eq!(chunk["choices"][0]["delta"]["reasoning_content"], "Hmm.");
    let signature = translator.translate(
        "content_block_delta",
        r#"{"type": "content_block_delta", "index": 0, "delta": {"type": "signature_delta", "signature": "s"}}"#,
    );
    assert!(signature.is_empty());
}
