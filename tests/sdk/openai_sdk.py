"""Drives a running Loom gateway with the official `openai` Python SDK.

Environment: LOOM_URL (the gateway), LOOM_KEY (a tenant's API key). Each call sets its own
x-request-id so the Rust side can find the events it produced. Exits non-zero on any mismatch.
"""

import os

import openai

URL = os.environ["LOOM_URL"] + "/v1"
client = openai.OpenAI(base_url=URL, api_key=os.environ["LOOM_KEY"], max_retries=0)
TOOLS = [{
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
    },
}]


def trace(name):
    return {"x-request-id": name}


chat = client.chat.completions.create(
    model="fast",
    messages=[{"role": "user", "content": "hello sdk"}],
    temperature=0.3,
    extra_headers=trace("sdk-chat"),
)
assert chat.choices[0].message.content == "Mock reply to: hello sdk", chat
assert chat.usage.total_tokens > 0

raw = client.chat.completions.with_raw_response.create(
    model="fast", messages=[{"role": "user", "content": "hi"}], extra_headers=trace("sdk-raw")
)
assert raw.parse().choices[0].message.content == "Mock reply to: hi"
assert raw.headers["x-request-id"] == "sdk-raw"
assert int(raw.headers["x-loom-overhead-us"]) >= 0

stream = client.chat.completions.create(
    model="fast",
    messages=[{"role": "user", "content": "stream to the sdk"}],
    stream=True,
    extra_headers=trace("sdk-stream"),
)
text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
assert text == "Mock reply to: stream to the sdk", text

usage_stream = client.chat.completions.create(
    model="fast",
    messages=[{"role": "user", "content": "count me"}],
    stream=True,
    stream_options={"include_usage": True},
    extra_headers=trace("sdk-stream-usage"),
)
usage = [c.usage for c in usage_stream if c.usage is not None]
assert len(usage) == 1 and usage[0].completion_tokens > 0, usage

asked = client.chat.completions.create(
    model="fast",
    messages=[{"role": "user", "content": "weather in Paris?"}],
    tools=TOOLS,
    extra_headers=trace("sdk-tools"),
)
call = asked.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather" and asked.choices[0].finish_reason == "tool_calls"
answered = client.chat.completions.create(
    model="fast",
    messages=[
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
    ],
    tools=TOOLS,
    extra_headers=trace("sdk-tool-result"),
)
assert answered.choices[0].message.content == "The tool says it is sunny in Paris."

streamed_tool = client.chat.completions.create(
    model="fast",
    messages=[{"role": "user", "content": "weather?"}],
    tools=TOOLS,
    stream=True,
    extra_headers=trace("sdk-stream-tools"),
)
arguments = "".join(
    tc.function.arguments or ""
    for c in streamed_tool if c.choices and c.choices[0].delta.tool_calls
    for tc in c.choices[0].delta.tool_calls
)
assert arguments == '{"location":"Paris"}', arguments

embeddings = client.embeddings.create(model="embed", input=["a", "b"], extra_headers=trace("sdk-embed"))
assert len(embeddings.data) == 2 and len(embeddings.data[0].embedding) == 8

assert sorted(m.id for m in client.models.list()) == ["claude", "embed", "fast"]

# The Responses API: natively to OpenAI (`fast`), translated to chat for Anthropic (`claude`).
for alias in ["fast", "claude"]:
    response = client.responses.create(
        model=alias, instructions="Be brief.", input="hello responses", extra_headers=trace(f"sdk-responses-{alias}")
    )
    assert response.status == "completed" and response.output_text == "Mock reply to: hello responses", response
    assert response.usage.output_tokens > 0, response

    with client.responses.stream(
        model=alias, input="stream responses", extra_headers=trace(f"sdk-responses-{alias}-stream")
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "Mock reply to: stream responses", deltas
    assert final.output_text == "Mock reply to: stream responses" and final.usage.total_tokens > 0, final

    RESPONSE_TOOLS = [{"type": "function", "name": "get_weather", "description": "Weather in a city",
                       "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}]
    asked = client.responses.create(
        model=alias, input="weather in Paris?", tools=RESPONSE_TOOLS, extra_headers=trace(f"sdk-responses-{alias}-tools")
    )
    call = next(item for item in asked.output if item.type == "function_call")
    assert call.name == "get_weather" and call.arguments == '{"location":"Paris"}', asked
    answered = client.responses.create(
        model=alias, tools=RESPONSE_TOOLS, extra_headers=trace(f"sdk-responses-{alias}-tool-result"),
        input=[{"role": "user", "content": "weather in Paris?"}, call.model_dump(exclude_none=True),
               {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
    )
    assert answered.output_text == "The tool says it is sunny in Paris.", answered

    with client.responses.stream(
        model=alias, input="weather?", tools=RESPONSE_TOOLS, extra_headers=trace(f"sdk-responses-{alias}-stream-tools")
    ) as stream:
        final = stream.get_final_response()
    streamed_call = next(item for item in final.output if item.type == "function_call")
    assert streamed_call.arguments == '{"location":"Paris"}', final

# A stored response is there for its tenant, and goes away.
first = client.responses.create(model="fast", input="keep me", extra_headers=trace("sdk-responses-store"))
assert client.responses.retrieve(first.id).output_text == first.output_text
follow = client.responses.create(model="fast", input="and then?", previous_response_id=first.id)
assert follow.previous_response_id == first.id, follow
client.responses.delete(first.id)
try:
    client.responses.retrieve(first.id)
    raise AssertionError("expected a 404")
except openai.NotFoundError:
    pass

try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}], extra_headers=trace("sdk-404"))
    raise AssertionError("expected a 404")
except openai.NotFoundError as error:
    assert error.code == "model_not_found", error

try:
    openai.OpenAI(base_url=URL, api_key="loom-wrong", max_retries=0).chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "x"}], extra_headers=trace("sdk-401"))
    raise AssertionError("expected a 401")
except openai.AuthenticationError as error:
    assert error.code == "invalid_api_key", error

print("openai sdk: ok")
