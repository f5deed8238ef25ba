"""The `openai` Python SDK against Loom's quota refusals, with its default retries on.

A spent budget (429 `insufficient_quota`, `x-should-retry: false`) must not be retried; a rate
limit (429 `rate_limit_exceeded`, `retry-after`) must be, and then succeed. Each call sets its own
x-request-id (a retry sends it again): the Rust side counts the attempts on the log.

Environment: LOOM_URL, LOOM_KEY. The user `sdk-budget` has a daily budget of 150 tokens, the user
`sdk-rate` 20 requests a minute.
"""

import os
import time

import openai

client = openai.OpenAI(
    base_url=os.environ["LOOM_URL"] + "/v1", api_key=os.environ["LOOM_KEY"], max_retries=2
)


def chat(user, trace, max_tokens=100):
    return client.chat.completions.create(
        model="fast",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=max_tokens,
        user=user,
        extra_headers={"x-request-id": trace},
    )


# The budget: admitted while it lasts, then refused, without a retry.
for i in range(30):
    try:
        chat("sdk-budget", f"sdk-budget-{i}")
    except openai.RateLimitError as error:
        assert error.code == "user_budget_exceeded", error.body
        assert error.body["type"] == "insufficient_quota", error.body
        assert error.response.headers["x-should-retry"] == "false"
        break
else:
    raise AssertionError("the budget never ran out")

# The rate: 20 requests at once, then the SDK waits as told and its retry gets through.
for i in range(20):
    chat("sdk-rate", f"sdk-rate-{i}", max_tokens=5)
started = time.monotonic()
answer = chat("sdk-rate", "sdk-rate-retried", max_tokens=5)
assert answer.choices[0].message.content, answer
assert time.monotonic() - started >= 1.0, "the SDK did not wait for retry-after"
print("ok")
