"""The real openai client, governed, against an OpenAI-compatible server on 127.0.0.1."""

import asyncio

import pytest

import aex
from conftest import T0, assert_clean
from provider import Provider

openai = pytest.importorskip("openai", reason="the openai package is the [openai] extra")
from aex.integrations.openai import guard  # noqa: E402

MODELS = """
models:
  mini: {input_price: 0.15, output_price: 0.60, max_output_tokens: 1000}
  fail-429: {input_price: 1, output_price: 1}
  fail-500: {input_price: 1, output_price: 1}
  embed: {input_price: 0.02, output_price: 0}
"""
MSGS = [{"role": "user", "content": "hello world"}]


@pytest.fixture
def provider():
    p = Provider()
    yield p
    p.stop()


@pytest.fixture
def setup(tmp_path, provider):
    kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=MODELS, durability="normal", manual_clock_ms=T0)
    token = kernel.create_agent("atlas", "1.00")
    raw = openai.OpenAI(base_url=provider.url, api_key="sk-test-secret", max_retries=0)
    return kernel, token, raw


def spent(kernel):
    a = kernel.agent("atlas")
    return a["spent_micro"], a["reserved_micro"]


def test_the_governed_client_is_still_an_openai_client(setup):
    kernel, token, raw = setup
    client = guard(raw, kernel, token)
    assert isinstance(client, openai.OpenAI) and client is not raw
    assert raw.chat.completions.create is not client.chat.completions.create


def test_plain_chat_completion_is_admitted_capped_and_settled(setup, provider):
    kernel, token, raw = setup
    client = guard(raw, kernel, token)
    reply = client.chat.completions.create(model="mini", messages=MSGS)
    assert reply.choices[0].message.content == "Hello from the test provider."
    assert provider.requests[-1]["body"]["max_tokens"] == 1000, "the output is capped at the reservation"
    assert spent(kernel) == (15 + 4, 0)  # 100 prompt tokens at 0.15, 6 completion at 0.60
    assert_clean(kernel)


def test_streaming_injects_include_usage_and_settles_at_the_end(setup, provider):
    kernel, token, raw = setup
    client = guard(raw, kernel, token)
    text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(model="mini", messages=MSGS, stream=True, max_tokens=50) if c.choices)
    assert text == "Hello from the test provider."
    assert provider.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    assert spent(kernel) == (19, 0)
    committed = [e for e in kernel.events(1, 100) if e["kind"] == "execution.committed"]
    assert committed[-1]["data"]["estimated"] is False


def test_a_stream_closed_early_settles_from_counted_output(setup):
    kernel, token, raw = setup
    client = guard(raw, kernel, token)
    stream = client.chat.completions.create(model="mini", messages=MSGS, stream=True, max_tokens=50)
    first = next(iter(stream))
    assert first.choices[0].delta.content == "Hello"
    stream.close()
    s, r = spent(kernel)
    assert r == 0 and s > 0
    committed = [e for e in kernel.events(1, 100) if e["kind"] == "execution.committed"]
    assert committed[-1]["data"]["estimated"] is True
    assert committed[-1]["data"]["input_tokens"] >= 8, "never below the admitted input"
    assert_clean(kernel)


@pytest.mark.parametrize("model,error", [("fail-429", "RateLimitError"), ("fail-500", "InternalServerError")])
def test_provider_errors_return_the_reservation(setup, model, error):
    kernel, token, raw = setup
    client = guard(raw, kernel, token)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=model, messages=MSGS, max_tokens=10)
    assert type(e.value).__name__ == error
    assert spent(kernel) == (0, 0)
    failed = [e for e in kernel.events(1, 100) if e["kind"] == "execution.failed"]
    assert len(failed) == 1 and error in failed[0]["data"]["error"]
    assert_clean(kernel)


def test_a_denial_sends_nothing(setup, provider):
    kernel, token, raw = setup
    kernel.set_budget("atlas", "0.000001")
    client = guard(raw, kernel, token)
    with pytest.raises(aex.InsufficientBudget):
        client.chat.completions.create(model="mini", messages=MSGS, max_tokens=10)
    assert provider.requests == []


def test_responses_and_embeddings(setup, provider):
    kernel, token, raw = setup
    client = guard(raw, kernel, token)
    r = client.responses.create(model="mini", input="say hello", max_output_tokens=40)
    assert r.output_text == "hello" and provider.requests[-1]["body"]["max_output_tokens"] == 40
    assert spent(kernel) == (8 + 12, 0)
    client.embeddings.create(model="embed", input=["a", "b"])
    assert spent(kernel) == (20 + 1, 0)  # 16 tokens at $0.02 per million, rounded up
    assert "sk-test-secret" not in str(kernel.events(1, 100))
    assert_clean(kernel)


def test_async_client(tmp_path, provider):
    kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=MODELS, durability="normal")
    token = kernel.create_agent("atlas", "1.00")
    client = guard(openai.AsyncOpenAI(base_url=provider.url, api_key="sk-test", max_retries=0), kernel, token)
    assert isinstance(client, openai.AsyncOpenAI)

    async def main():
        await client.chat.completions.create(model="mini", messages=MSGS, max_tokens=20)
        stream = await client.chat.completions.create(model="mini", messages=MSGS, max_tokens=20, stream=True)
        chunks = [c async for c in stream]
        assert chunks[-1].usage.completion_tokens == 6
        early = await client.chat.completions.create(model="mini", messages=MSGS, max_tokens=20, stream=True)
        await early.__anext__()
        await early.close()
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="fail-500", messages=MSGS, max_tokens=20)

    asyncio.run(main())
    a = kernel.agent("atlas")
    assert a["reserved_micro"] == 0 and a["spent_micro"] >= 2 * 19
    assert_clean(kernel)


@pytest.mark.parametrize("asked", [100_000, None, "not-given", 500])
def test_the_cap_sent_is_the_reservations_whatever_was_asked(setup, provider, asked):
    kernel, token, raw = setup
    client = guard(raw, kernel, token)
    extra = {} if asked == "not-given" else {"max_tokens": asked}
    if asked == "not-given":
        extra["max_tokens"] = openai.NOT_GIVEN
    client.chat.completions.create(model="mini", messages=MSGS, **extra)
    assert provider.requests[-1]["body"]["max_tokens"] == (500 if asked == 500 else 1000)
    assert_clean(kernel)


def test_output_multipliers_are_refused_before_anything_is_sent(setup, provider):
    kernel, token, raw = setup
    client = guard(raw, kernel, token)
    sent = len(provider.requests)
    with pytest.raises(aex.InvalidRequest) as e:
        client.chat.completions.create(model="mini", messages=MSGS, n=5)
    assert e.value.field == "n"
    assert len(provider.requests) == sent
    assert spent(kernel) == (0, 0)
