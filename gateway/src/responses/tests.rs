//! The translations both ways, on the shapes the official SDKs send and expect.

use serde_json::{Value, json};

use super::request::*;
use super::response::*;
use super::stream::*;
use crate::translate::Dropped;

#[test]
fn responses_requests_become_chat_requests() {
    let request = json!({
        "model": "fast", "instructions": "Be brief.", "max_output_tokens": 200, "temperature": 0.2,
        "user": "u1", "store": true, "include": ["reasoning.encrypted_content"],
        "reasoning": {"effort": "low", "summary": "auto"},
        "text": {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": true}},
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "weather?"}, {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}]},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"role": "assistant", "content": [{"type": "output_text", "text": "It is sunny."}]},
            {"role": "user", "content": "thanks"},
        ],
        "tools": [{"type": "function", "name": "get_weather", "description": "Weather", "parameters": {"type": "object"}, "strict": false}],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "stream": true,
    });
    let mut dropped = Dropped::default();
    let chat = responses_to_chat(&request, &mut dropped).unwrap();
    assert_eq!(
        chat["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "weather?"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}}]},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            {"role": "assistant", "content": "It is sunny."},
            {"role": "user", "content": "thanks"},
        ])
    );
    assert_eq!(chat["max_tokens"], 200);
    assert_eq!(chat["reasoning_effort"], "low");
    assert_eq!(
        chat["response_format"],
        json!({"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": true}})
    );
    assert_eq!(
        chat["tools"][0],
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": {"type": "object"}, "strict": false}})
    );
    assert_eq!(
        chat["tool_choice"],
        json!({"type": "function", "function": {"name": "get_weather"}})
    );
    assert_eq!(chat["stream_options"], json!({"include_usage": true}));
    assert_eq!(
        dropped.into_paths(),
        [
            "include",
            "store",
            "input[3] (reasoning)",
            "reasoning.summary"
        ]
    );
}

#[test]
fn what_needs_openai_state_or_tools_cannot_be_served() {
    for (request, field) in [
        (
            json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}),
            "previous_response_id",
        ),
        (
            json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
            "tools[0] (web_search)",
        ),
        (
            json!({"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}),
            "input[0]",
        ),
        (
            json!({"model": "m", "input": "x", "tool_choice": {"type": "file_search"}}),
            "tool_choice (file_search)",
        ),
    ] {
        let refused = responses_to_chat(&request, &mut Dropped::default()).unwrap_err();
        assert_eq!(refused.field, field);
    }
    let plain =
        json!({"model": "m", "input": "hello", "store": false, "previous_response_id": null});
    let mut dropped = Dropped::default();
    let chat = responses_to_chat(&plain, &mut dropped).unwrap();
    assert_eq!(
        chat["messages"],
        json!([{"role": "user", "content": "hello"}])
    );
    assert!(dropped.into_paths().is_empty());
}

#[test]
fn chat_answers_become_responses_and_back() {
    let chat = json!({"id": "chatcmpl-1", "created": 1700000000, "model": "gpt-x", "choices": [{"message": {
        "role": "assistant", "content": "Let me check.",
        "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
        "finish_reason": "tool_calls"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 2}}});
    let request = json!({"model": "fast", "instructions": "Be brief.", "input": "weather?"});
    let response = chat_to_response(&chat, &request);
    assert!(response["id"].as_str().unwrap().starts_with("resp_"));
    assert_eq!(
        (&response["object"], &response["status"], &response["model"]),
        (&json!("response"), &json!("completed"), &json!("gpt-x"))
    );
    assert_eq!(response["instructions"], "Be brief.");
    assert_eq!(response["output"][0]["content"][0]["text"], "Let me check.");
    assert_eq!(response["output"][1]["type"], "function_call");
    assert_eq!(response["output"][1]["call_id"], "call_1");
    assert_eq!(
        response["usage"],
        json!({"input_tokens": 12, "input_tokens_details": {"cached_tokens": 2}, "output_tokens": 3,
               "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 15})
    );
    // Read back as chat: what Loom records of a native Responses answer.
    let back = response_to_chat(&response);
    assert_eq!(back["choices"][0]["message"]["content"], "Let me check.");
    assert_eq!(
        back["choices"][0]["message"]["tool_calls"][0]["id"],
        "call_1"
    );
    assert_eq!(back["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(back["usage"]["prompt_tokens"], 12);
    assert_eq!(back["usage"]["prompt_tokens_details"]["cached_tokens"], 2);

    let cut = json!({"choices": [{"message": {"role": "assistant", "content": "partial"}, "finish_reason": "length"}]});
    let response = chat_to_response(&cut, &Value::Null);
    assert_eq!(response["status"], "incomplete");
    assert_eq!(
        response["incomplete_details"]["reason"],
        "max_output_tokens"
    );
}

/// The event types of SSE frames.
fn types(frames: &[String]) -> Vec<&str> {
    frames
        .iter()
        .map(|f| f.lines().next().unwrap().trim_start_matches("event: "))
        .collect()
}

#[test]
fn chunks_become_responses_events_numbered_in_order() {
    let mut encoder = ResponsesEncoder::new(&json!({"model": "fast", "input": "weather?"}));
    let chunks = [
        json!({"id": "c1", "model": "gpt-x", "choices": [{"delta": {"role": "assistant", "content": ""}}]}),
        json!({"id": "c1", "choices": [{"delta": {"content": "Hi"}}]}),
        json!({"id": "c1", "choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_1", "function": {"name": "f", "arguments": ""}}]}}]}),
        json!({"id": "c1", "choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}}]}),
        json!({"id": "c1", "choices": [{"delta": {}, "finish_reason": "tool_calls"}]}),
        json!({"id": "c1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}),
    ];
    let mut frames: Vec<String> = chunks.iter().flat_map(|c| encoder.encode(c)).collect();
    frames.extend(encoder.finish());
    assert_eq!(
        types(&frames),
        [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
            "response.output_text.delta",
            "response.output_item.added",
            "response.function_call_arguments.delta",
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.function_call_arguments.done",
            "response.output_item.done",
            "response.completed",
        ]
    );
    let data: Vec<Value> = frames
        .iter()
        .map(|f| {
            serde_json::from_str(f.lines().nth(1).unwrap().trim_start_matches("data: ")).unwrap()
        })
        .collect();
    for (i, event) in data.iter().enumerate() {
        assert_eq!(event["sequence_number"], i, "{event}");
    }
    let completed = &data[12]["response"];
    assert_eq!(completed["id"], data[0]["response"]["id"]);
    assert_eq!(completed["output"][0]["content"][0]["text"], "Hi");
    assert_eq!(completed["output"][1]["arguments"], "{}");
    assert_eq!(completed["usage"]["output_tokens"], 2);
    assert!(encoder.finish().is_empty());
}

#[test]
fn responses_events_become_chunks() {
    let mut translator = EventsToChunks::default();
    let events = [
        json!({"type": "response.created", "response": {"id": "resp_1", "model": "gpt-x", "output": []}}),
        json!({"type": "response.output_item.added", "output_index": 0, "item": {"type": "message", "id": "msg_1"}}),
        json!({"type": "response.output_text.delta", "output_index": 0, "delta": "Hi"}),
        json!({"type": "response.output_item.added", "output_index": 1, "item": {"type": "function_call", "call_id": "call_1", "name": "f"}}),
        json!({"type": "response.function_call_arguments.delta", "output_index": 1, "delta": "{}"}),
        json!({"type": "response.completed", "response": {"id": "resp_1", "usage": {"input_tokens": 5, "output_tokens": 2, "input_tokens_details": {"cached_tokens": 1}}}}),
    ];
    let chunks: Vec<String> = events
        .iter()
        .flat_map(|e| translator.translate("", &e.to_string()))
        .collect();
    assert_eq!(chunks.last().unwrap(), "[DONE]");
    let parsed: Vec<Value> = chunks[..chunks.len() - 1]
        .iter()
        .map(|c| serde_json::from_str(c).unwrap())
        .collect();
    assert_eq!(parsed[1]["choices"][0]["delta"]["content"], "Hi");
    assert_eq!(
        parsed[2]["choices"][0]["delta"]["tool_calls"][0]["id"],
        "call_1"
    );
    assert_eq!(
        parsed[3]["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"],
        "{}"
    );
    assert_eq!(parsed[4]["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(
        parsed[5]["usage"]["prompt_tokens_details"]["cached_tokens"],
        1
    );
    assert_eq!(parsed[5]["id"], "resp_1");
}
