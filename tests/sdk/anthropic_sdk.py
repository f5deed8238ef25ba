"""Drives a running Loom gateway's `/v1/messages` with the official `anthropic` Python SDK, against
an OpenAI-shaped upstream (alias `fast`) and an Anthropic one (alias `claude`).

Environment: LOOM_URL, LOOM_KEY. Each call sets its own x-request-id. Exits non-zero on a mismatch.
"""

import os

import anthropic

client = anthropic.Anthropic(base_url=os.environ["LOOM_URL"], api_key=os.environ["LOOM_KEY"], max_retries=0)
TOOLS = [{"name": "get_weather", "description": "Weather in a city", "input_schema": {"type": "object", "properties": {"location": {"type": "string"}}}}]


def trace(name):
    return {"x-request-id": name}


for alias in ["fast", "claude"]:
    message = client.messages.create(
        model=alias, max_tokens=100, system="Be brief.",
        messages=[{"role": "user", "content": "hello anthropic sdk"}],
        extra_headers=trace(f"anthropic-{alias}"),
    )
    assert message.type == "message" and message.role == "assistant", message
    assert message.content[0].text == "Mock reply to: hello anthropic sdk", message
    assert message.stop_reason == "end_turn", message
    assert message.usage.output_tokens > 0, message

    with client.messages.stream(
        model=alias, max_tokens=100, messages=[{"role": "user", "content": "stream it"}],
        extra_headers=trace(f"anthropic-{alias}-stream"),
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "Mock reply to: stream it", text
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0, final

    asked = client.messages.create(
        model=alias, max_tokens=100, tools=TOOLS,
        messages=[{"role": "user", "content": "weather in Paris?"}],
        extra_headers=trace(f"anthropic-{alias}-tools"),
    )
    tool_use = next(block for block in asked.content if block.type == "tool_use")
    assert tool_use.name == "get_weather" and tool_use.input == {"location": "Paris"}, asked
    assert asked.stop_reason == "tool_use", asked
    answered = client.messages.create(
        model=alias, max_tokens=100, tools=TOOLS,
        messages=[
            {"role": "user", "content": "weather in Paris?"},
            {"role": "assistant", "content": [block.model_dump() for block in asked.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use.id, "content": "sunny"}]},
        ],
        extra_headers=trace(f"anthropic-{alias}-tool-result"),
    )
    assert answered.content[0].text == "The tool says it is sunny in Paris.", answered

    with client.messages.stream(
        model=alias, max_tokens=100, tools=TOOLS, messages=[{"role": "user", "content": "weather?"}],
        extra_headers=trace(f"anthropic-{alias}-stream-tools"),
    ) as stream:
        final = stream.get_final_message()
    streamed_tool = next(block for block in final.content if block.type == "tool_use")
    assert streamed_tool.input == {"location": "Paris"}, final

# Prompt caching and extended thinking reach Anthropic as sent, and come back.
SYSTEM = [{"type": "text", "text": "A long, stable system prompt. " * 40, "cache_control": {"type": "ephemeral"}}]
for attempt in ["write", "read"]:
    cached = client.messages.create(
        model="claude", max_tokens=2048, system=SYSTEM, messages=[{"role": "user", "content": "cached?"}],
        extra_headers={**trace(f"anthropic-cache-{attempt}"), "anthropic-beta": "prompt-caching-2024-07-31"},
    )
    if attempt == "write":
        assert cached.usage.cache_creation_input_tokens > 0, cached.usage
    else:
        assert cached.usage.cache_read_input_tokens > 0, cached.usage

thought = client.messages.create(
    model="claude", max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 2048},
    messages=[{"role": "user", "content": "think about it"}], extra_headers=trace("anthropic-thinking"),
)
assert thought.content[0].type == "thinking" and thought.content[0].signature, thought
assert thought.content[1].text == "Mock reply to: think about it", thought

with client.messages.stream(
    model="claude", max_tokens=4096, thinking={"type": "enabled", "budget_tokens": 2048}, system=SYSTEM,
    messages=[{"role": "user", "content": "think while streaming"}], extra_headers=trace("anthropic-thinking-stream"),
) as stream:
    kinds = [event.type for event in stream]
    final = stream.get_final_message()
assert "thinking" in kinds and "signature" in kinds, kinds
assert final.content[0].type == "thinking" and final.content[0].thinking and final.content[0].signature, final
assert final.content[1].text == "Mock reply to: think while streaming", final
assert final.usage.cache_read_input_tokens > 0, final.usage

try:
    client.messages.create(model="no-such-model", max_tokens=10, messages=[{"role": "user", "content": "x"}],
                           extra_headers=trace("anthropic-404"))
    raise AssertionError("expected a 404")
except anthropic.NotFoundError as error:
    assert error.body["type"] == "error" and error.body["error"]["type"] == "not_found_error", error.body

try:
    anthropic.Anthropic(base_url=os.environ["LOOM_URL"], api_key="loom-wrong", max_retries=0).messages.create(
        model="fast", max_tokens=10, messages=[{"role": "user", "content": "x"}], extra_headers=trace("anthropic-401"))
    raise AssertionError("expected a 401")
except anthropic.AuthenticationError:
    pass

print("anthropic sdk: ok")
