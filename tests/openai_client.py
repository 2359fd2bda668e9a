"""The official `openai` Python client against a running `rwkv serve` (run by tests/server.rs).

Usage: python3 tests/openai_client.py PORT

Covers chat and completions, streaming and not, usage, stop strings, several choices,
log-probabilities, tool calling (whole and streamed) and the error mapping.
Exits non-zero (with a traceback) on any mismatch.
"""

import json
import sys

import openai

port = int(sys.argv[1])
client = openai.OpenAI(
    base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=30
)

models = client.models.list()
model = models.data[0].id
assert model == "model", models

# Chat, whole and streamed, greedy: the same text.
messages = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something."},
]
chat = client.chat.completions.create(
    model=model, messages=messages, max_tokens=16, temperature=0
)
choice = chat.choices[0]
assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-"), chat
assert choice.message.role == "assistant", chat
assert choice.finish_reason in ("stop", "length"), chat
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
assert 1 <= chat.usage.completion_tokens <= 16, chat.usage

stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=16,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
parts, finish, usage, roles = [], None, None, []
for chunk in stream:
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.role:
            roles.append(c.delta.role)
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert roles == ["assistant"], roles
assert "".join(parts) == choice.message.content, (parts, choice.message.content)
assert finish == choice.finish_reason, finish
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

# Completions, whole and streamed, seeded sampling: the same text.
kw = dict(model=model, prompt="Once upon a time", max_tokens=20, temperature=0.8, seed=3)
comp = client.completions.create(**kw)
assert comp.object == "text_completion" and comp.id.startswith("cmpl-"), comp
assert comp.choices[0].finish_reason in ("stop", "length"), comp
text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
assert text == comp.choices[0].text, (text, comp.choices[0].text)

# A stop string is honoured (never in the output).
stop = comp.choices[0].text[3:5] if len(comp.choices[0].text) >= 5 else None
if stop:
    cut = client.completions.create(stop=[stop], **kw)
    assert stop not in cut.choices[0].text and cut.choices[0].finish_reason == "stop", cut

# Several choices, and log-probabilities in the client's types.
two = client.completions.create(model=model, prompt="x", max_tokens=4, n=2, seed=1)
assert [c.index for c in two.choices] == [0, 1], two
ev = client.completions.create(model=model, prompt="To be", max_tokens=1, echo=True,
                               logprobs=2, temperature=0)
lp = ev.choices[0].logprobs
assert ev.choices[0].text.startswith("To be"), ev
assert lp.token_logprobs[0] is None and len(lp.tokens) == len("To be") + 1, lp
assert all(len(t) <= 2 for t in lp.top_logprobs[1:]), lp
ch = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                    max_tokens=3, logprobs=True, top_logprobs=2, temperature=0)
content = ch.choices[0].logprobs.content
assert len(content) == ch.usage.completion_tokens, ch
assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content), content

# Tool calling as OpenAI's guide does it: the call, its result sent back, the reply.
tools = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}]
messages = [{"role": "user", "content": "What is the weather in Paris?"}]
r = client.chat.completions.create(model=model, messages=messages, tools=tools,
                                   tool_choice="required", parallel_tool_calls=False,
                                   max_tokens=100, seed=2)
assert r.choices[0].finish_reason == "tool_calls", r
call = r.choices[0].message.tool_calls[0]
assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments), call
messages.append(r.choices[0].message)
messages.append({"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 C"})
r2 = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="none",
                                    max_tokens=10)
assert r2.choices[0].message.content is not None, r2
# Streamed, the client's accumulation of tool-call deltas gives the same call.
args, name = "", None
for chunk in client.chat.completions.create(model=model, messages=messages[:1], tools=tools,
                                            tool_choice="required", parallel_tool_calls=False,
                                            max_tokens=100, seed=2, stream=True):
    for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        name = tc.function.name or name
        args += tc.function.arguments or ""
assert name == "get_weather" and args == call.function.arguments, (name, args)

# Errors surface as the client's typed exceptions.
try:
    client.completions.create(model=model, prompt="x", n=17)
    raise AssertionError("n=17 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and "n" in str(e), e

print("openai client: all checks passed")
