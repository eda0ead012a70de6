"""aex making the provider call itself: kernel.chat / chat_stream / responses / embeddings."""

import asyncio
import threading

import pytest

import aex
from conftest import assert_clean
from provider import Provider

MSGS = [{"role": "user", "content": "hello"}]


@pytest.fixture
def providers():
    a, b = Provider(), Provider()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def kernel(tmp_path, providers, monkeypatch):
    a, b = providers
    monkeypatch.setenv("AEX_TEST_HOST_KEY", "sk-host-secret")
    yaml = f"""
providers:
  primary: {{base_url: "{a.url}", api_key_env: AEX_TEST_HOST_KEY}}
  secondary: {{base_url: "{b.url}"}}
models:
  mini: {{provider: primary, input_price: 0.15, output_price: 0.60, max_output_tokens: 1000}}
  fail-500: {{provider: primary, input_price: 1, output_price: 1, fallbacks: [rescue]}}
  rescue: {{provider: secondary, input_price: 1, output_price: 1}}
  fail-429: {{provider: primary, input_price: 1, output_price: 1}}
  embed: {{provider: secondary, input_price: 0.02, output_price: 0}}
"""
    return aex.Kernel(str(tmp_path / "aex.db"), config_yaml=yaml, durability="normal", connect_timeout_ms=2000, request_timeout_ms=10_000)


def test_chat_with_the_host_key_and_with_a_passthrough_key(kernel, providers):
    a, _ = providers
    token = kernel.create_agent("atlas", "1.00", allow_passthrough=True)
    reply = kernel.chat(token, model="mini", messages=MSGS)
    assert reply["choices"][0]["message"]["content"] == "Hello from the test provider."
    assert a.requests[-1]["auth"] == "Bearer sk-host-secret"
    assert a.requests[-1]["body"]["max_tokens"] == 1000
    kernel.chat(token, model="mini", messages=MSGS, passthrough_key="sk-agent-own")
    assert a.requests[-1]["auth"] == "Bearer sk-agent-own"
    assert kernel.agent("atlas")["spent_micro"] == 2 * 19
    ledger = str(kernel.events(1, 100))
    assert "sk-host-secret" not in ledger and "sk-agent-own" not in ledger
    plain = kernel.create_agent("plain", "1.00")
    with pytest.raises(aex.PolicyDenied) as e:
        kernel.chat(plain, model="mini", messages=MSGS, passthrough_key="sk-agent-own")
    assert e.value.reason == "passthrough_not_allowed" and "sk-agent-own" not in e.value.message
    assert_clean(kernel)


def test_streaming_yields_chunks_and_settles(kernel, providers):
    a, _ = providers
    token = kernel.create_agent("atlas", "1.00")
    chunks = list(kernel.chat_stream(token, model="mini", messages=MSGS, max_tokens=50))
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
    assert text == "Hello from the test provider." and chunks[-1]["usage"]["completion_tokens"] == 6
    assert a.requests[-1]["body"]["stream_options"] == {"include_usage": True}
    assert kernel.agent("atlas")["spent_micro"] == 19

    stream = kernel.chat_stream(token, model="mini", messages=MSGS, max_tokens=50)
    next(stream)
    stream.close()  # stops the stream at the next chunk; settled either way (the Rust and C tests
    # stop at the first chunk deterministically and check the estimate)
    a_ = kernel.agent("atlas")
    assert a_["reserved_micro"] == 0 and a_["spent_micro"] > 19
    assert_clean(kernel)


def test_provider_errors_fallbacks_responses_and_embeddings(kernel, providers):
    _, b = providers
    token = kernel.create_agent("atlas", "1.00")
    with pytest.raises(aex.RateLimited) as e:
        kernel.chat(token, model="fail-429", messages=MSGS, max_tokens=10)
    assert e.value.reason == "provider_rate_limit"
    reply = kernel.chat(token, model="fail-500", messages=MSGS, max_tokens=10)
    assert reply["model"] == "rescue" and b.requests[-1]["body"]["model"] == "rescue"
    failed = [e for e in kernel.events(1, 200) if e["kind"] == "execution.failed"]
    assert len(failed) == 1 + 3, "the 429, then the 500 and its two retries"
    r = kernel.responses(token, model="mini", input="hello", max_output_tokens=40)
    assert r["usage"]["output_tokens"] == 20
    kernel.embeddings(token, model="embed", input=["a", "b"])
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert_clean(kernel)


def test_async_twins(kernel):
    token = kernel.create_agent("atlas", "1.00")

    async def main():
        reply = await kernel.achat(token, model="mini", messages=MSGS, max_tokens=20)
        chunks = [c async for c in kernel.achat_stream(token, model="mini", messages=MSGS, max_tokens=20)]
        return reply, chunks

    reply, chunks = asyncio.run(main())
    assert reply["usage"]["prompt_tokens"] == 100 and len(chunks) == 7
    assert kernel.agent("atlas")["spent_micro"] == 2 * 19
    assert_clean(kernel)


def test_concurrent_streams_race_one_budget(kernel):
    token = kernel.create_agent("atlas", "0.0003")  # each call reserves 63 micro-USD, is charged 19
    done = []
    lock = threading.Lock()

    def worker():
        while True:
            try:
                list(kernel.chat_stream(token, model="mini", messages=MSGS, max_tokens=100))
            except aex.InsufficientBudget:
                return
            with lock:
                done.append(1)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    a = kernel.agent("atlas")
    assert a["reserved_micro"] == 0 and a["spent_micro"] == 19 * len(done) <= a["budget_micro"]
    assert_clean(kernel)


def test_timeouts_are_validated(tmp_path):
    with pytest.raises(aex.InvalidRequest):
        aex.Kernel(":memory:", request_timeout_ms=0)
    with pytest.raises(aex.InvalidRequest):
        aex.Kernel(":memory:", max_retries=11)


def test_a_plain_chat_asking_to_stream_is_refused_before_anything_is_reserved(kernel, providers):
    token = kernel.create_agent("atlas", "1.00")
    with pytest.raises(aex.errors.InvalidRequest) as caught:
        kernel.chat(token, model="mini", messages=MSGS, stream=True)
    assert caught.value.field == "stream"
    assert not providers[0].requests and kernel.agent("atlas")["reserved_micro"] == 0
    assert not [e for e in kernel.events(1, 100) if e.get("execution_id")]
