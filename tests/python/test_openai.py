"""The real openai client, governed, against an OpenAI-compatible server on 127.0.0.1."""

import asyncio
import gc

import pytest

import aex
from conftest import T0, assert_clean

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


def test_a_stream_closed_early_settles_from_counted_output(edge):
    # The provider sends two chunks and waits: the usage report cannot have arrived yet (one that
    # had arrived with the first chunks would be charged instead).
    kernel, _, client = edge
    stream = client.chat.completions.create(model="stall-2", messages=MSGS, stream=True, max_tokens=50)
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


# ---- the money rules on every exit path (issue 13) -----------------------------------------------
#
# A loopback provider that misbehaves (faulty_provider.py); prices $1 / $2 per million tokens and an
# output cap of 1,000, so a full reservation is the input plus 2,000 µUSD and a real call about 112.

from faulty_provider import TOOL_ARGS, FaultyProvider  # noqa: E402

EDGE = """
models:
  mini: {input_price: 0.15, output_price: 0.60, max_output_tokens: 1000}
  embed: {input_price: 0.02, output_price: 0}
""" + "".join(
    f"  {m}: {{input_price: 1, output_price: 2, max_output_tokens: 1000}}\n"
    for m in ["cut-3", "cut-0", "stall-2", "stall-head", "tools", "nousage", "usage-neg", "usage-huge", "usage-giant",
              "html", "redirect", "words-40", "fail-400", "fail-429", "fail-500", "fail-503"]
)


@pytest.fixture
def faulty():
    p = FaultyProvider()
    yield p
    p.stop()


@pytest.fixture
def edge(tmp_path, faulty):
    """(kernel, token, governed sync client) for the agent "atlas" with $1 and at most one call at a time."""
    kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=EDGE, durability="normal", manual_clock_ms=T0)
    token = kernel.create_agent("atlas", "1.00", max_concurrent=1)
    client = guard(openai.OpenAI(base_url=faulty.url, api_key="sk-test", max_retries=0), kernel, token)
    return kernel, token, client


def async_client(kernel, token, provider, **options):
    return guard(openai.AsyncOpenAI(base_url=provider.url, api_key="sk-test", max_retries=0, **options), kernel, token)


def only_execution(kernel):
    """The one execution of the test: (state, cost, reserved, ledger data of its settlement)."""
    ends = [e for e in kernel.events(1, 1000) if e["kind"] in ("execution.committed", "execution.released", "execution.failed")]
    assert len(ends) == 1, ends
    e = kernel.execution(ends[0]["execution_id"])
    return e["state"], e["cost_micro"] or 0, e["reserved_micro"], ends[0]["data"]


def assert_nothing_reserved(kernel):
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert_clean(kernel)


def counted(model, text):
    return aex._aex.count_tokens(model, text)


def test_a_stream_the_provider_cuts_is_charged_from_the_counted_output(edge):
    kernel, _, client = edge
    seen = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in client.chat.completions.create(model="cut-3", messages=MSGS, stream=True):
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["Hello", " from", " the"]
    state, cost, reserved, data = only_execution(kernel)
    assert state == "COMMITTED" and data["estimated"] is True
    assert data["output_tokens"] == counted("cut-3", "Hello from the")
    assert cost == data["input_tokens"] + 2 * data["output_tokens"] < reserved
    assert_nothing_reserved(kernel)


def test_a_2xx_whose_body_is_cut_is_charged_in_full(edge):
    kernel, _, client = edge
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="cut-0", messages=MSGS)
    state, cost, reserved, data = only_execution(kernel)
    assert (state, cost, data["estimated"]) == ("COMMITTED", reserved, True)
    assert_nothing_reserved(kernel)


def test_a_2xx_whose_body_cannot_be_read_is_charged_in_full(edge):
    kernel, _, client = edge
    client.chat.completions.create(model="html", messages=MSGS)  # the SDK hands back the text
    state, cost, reserved, data = only_execution(kernel)
    assert (state, cost, data["estimated"]) == ("COMMITTED", reserved, True)
    assert_nothing_reserved(kernel)


def test_breaking_out_of_a_stream_settles_it_when_the_stream_is_dropped(edge):
    kernel, _, client = edge
    for chunk in client.chat.completions.create(model="stall-2", messages=MSGS, stream=True):
        break  # no close(): the stream is dropped here
    # Settled already (max_concurrent=1 would refuse the next call otherwise), from the counted
    # output (the provider sent two chunks, then waited), not the full reservation.
    state, cost, reserved, data = only_execution(kernel)
    assert state == "COMMITTED" and data["estimated"] is True
    assert counted("stall-2", "Hello") <= data["output_tokens"] <= counted("stall-2", "Hello from")
    assert cost < reserved // 4
    client.chat.completions.create(model="words-40", messages=MSGS)  # the agent's one slot is free
    assert_nothing_reserved(kernel)


def test_a_stream_kept_but_abandoned_is_settled_when_collected(edge):
    kernel, _, client = edge

    def consume_one():
        stream = client.chat.completions.create(model="stall-2", messages=MSGS, stream=True)
        next(iter(stream))
        return None  # the stream goes out of scope unclosed

    consume_one()
    state, _, _, data = only_execution(kernel)
    assert state == "COMMITTED" and data["estimated"] is True
    assert_nothing_reserved(kernel)


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_arguments_without_usage_are_counted_as_output(edge, stream):
    kernel, _, client = edge
    reply = client.chat.completions.create(model="tools", messages=MSGS, stream=stream)
    if stream:
        args = "".join(c.choices[0].delta.tool_calls[0].function.arguments or "" for c in reply if c.choices and c.choices[0].delta.tool_calls)
    else:
        args = reply.choices[0].message.tool_calls[0].function.arguments
    assert args == TOOL_ARGS
    state, cost, _, data = only_execution(kernel)
    assert state == "COMMITTED" and data["estimated"] is True
    assert data["output_tokens"] == counted("tools", TOOL_ARGS) > 100
    assert cost == data["input_tokens"] + 2 * data["output_tokens"]
    assert_nothing_reserved(kernel)


def test_text_without_usage_is_charged_from_the_counted_output(edge):
    kernel, _, client = edge
    client.chat.completions.create(model="nousage", messages=MSGS)
    state, _, _, data = only_execution(kernel)
    assert state == "COMMITTED" and data["estimated"] is True
    assert data["output_tokens"] == counted("nousage", "Hello from the test provider.")
    assert_nothing_reserved(kernel)


@pytest.mark.parametrize("model", ["usage-neg", "usage-huge", "usage-giant"])
@pytest.mark.parametrize("stream", [False, True])
def test_usage_out_of_range_is_charged_at_the_full_reservation_and_the_answer_kept(edge, model, stream):
    kernel, _, client = edge
    reply = client.chat.completions.create(model=model, messages=MSGS, stream=stream)
    text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream else reply.choices[0].message.content
    assert text == "Hello from the test provider."
    state, cost, reserved, data = only_execution(kernel)
    assert (state, cost, data["estimated"]) == ("COMMITTED", reserved, True)
    assert_nothing_reserved(kernel)


@pytest.mark.parametrize("status", [400, 429, 500, 503])
def test_an_error_status_is_a_refusal_and_returns_the_reservation(edge, faulty, status):
    kernel, _, client = edge
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=f"fail-{status}", messages=MSGS)
    assert e.value.status_code == status
    state, cost, _, data = only_execution(kernel)
    assert (state, cost) == ("FAILED", 0)
    assert str(status) in data["error"]
    assert_nothing_reserved(kernel)


def test_retries_after_error_statuses_cost_nothing_and_settle_once(tmp_path, faulty):
    kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=EDGE, durability="normal", manual_clock_ms=T0)
    token = kernel.create_agent("atlas", "1.00")
    client = guard(openai.OpenAI(base_url=faulty.url, api_key="sk-test", max_retries=1), kernel, token)
    with pytest.raises(openai.InternalServerError):
        client.with_options(timeout=5).chat.completions.create(model="fail-503", messages=MSGS)
    assert len(faulty.requests) == 2, "the SDK retried a 503: that costs nothing"
    assert only_execution(kernel)[:2] == ("FAILED", 0)
    assert_nothing_reserved(kernel)


def test_a_timeout_after_sending_is_charged_in_full_and_not_retried(tmp_path, faulty):
    kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=EDGE, durability="normal", manual_clock_ms=T0)
    token = kernel.create_agent("atlas", "1.00")
    client = guard(openai.OpenAI(base_url=faulty.url, api_key="sk-test", max_retries=2, timeout=0.5), kernel, token)
    with pytest.raises(openai.APITimeoutError):
        client.chat.completions.create(model="stall-head", messages=MSGS)
    assert faulty.arrived.wait(10)
    assert len(faulty.requests) == 1, "a request that may have been processed is not sent again"
    state, cost, reserved, data = only_execution(kernel)
    assert (state, cost, data["estimated"]) == ("COMMITTED", reserved, True)
    assert_nothing_reserved(kernel)


def test_a_connection_refused_is_released(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=EDGE, durability="normal", manual_clock_ms=T0)
    token = kernel.create_agent("atlas", "1.00")
    client = guard(openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=1), kernel, token)
    with pytest.raises(openai.APIConnectionError):
        client.chat.completions.create(model="mini", messages=MSGS)
    state, cost, _, _ = only_execution(kernel)
    assert (state, cost) == ("RELEASED", 0)
    assert_nothing_reserved(kernel)


def test_redirects_are_not_followed(edge, faulty):
    kernel, _, client = edge
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="redirect", messages=MSGS)
    assert e.value.status_code == 307
    assert [r["path"] for r in faulty.requests] == ["/v1/chat/completions"], "the prompt went to one place only"
    assert only_execution(kernel)[:2] == ("FAILED", 0)
    assert_nothing_reserved(kernel)


def test_async_stream_cancelled_is_charged_from_the_counted_output(tmp_path, faulty):
    kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=EDGE, durability="normal", manual_clock_ms=T0)
    token = kernel.create_agent("atlas", "1.00")
    client = async_client(kernel, token, faulty)

    async def main():
        two = asyncio.Event()
        seen = []

        async def consume():
            stream = await client.chat.completions.create(model="stall-2", messages=MSGS, stream=True)
            async for chunk in stream:
                seen.append(chunk.choices[0].delta.content)
                if len(seen) == 2:
                    two.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(two.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    assert asyncio.run(main()) == ["Hello", " from"]
    state, cost, reserved, data = only_execution(kernel)
    assert state == "COMMITTED" and data["estimated"] is True
    assert data["output_tokens"] == counted("stall-2", "Hello from")
    assert 0 < cost < reserved
    assert_nothing_reserved(kernel)


def test_async_stream_stopped_by_wait_for_is_charged_from_the_counted_output(tmp_path, faulty):
    kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=EDGE, durability="normal", manual_clock_ms=T0)
    token = kernel.create_agent("atlas", "1.00")
    client = async_client(kernel, token, faulty)

    async def main():
        seen = []

        async def consume():
            async for chunk in await client.chat.completions.create(model="stall-2", messages=MSGS, stream=True):
                seen.append(chunk.choices[0].delta.content)

        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(consume(), 3.0)  # the provider stalls for 10 s after two chunks
        return seen

    assert asyncio.run(main()) == ["Hello", " from"]
    state, cost, reserved, data = only_execution(kernel)
    assert state == "COMMITTED" and data["estimated"] is True
    assert data["output_tokens"] == counted("stall-2", "Hello from")
    assert_nothing_reserved(kernel)


def test_async_call_cancelled_before_the_answer_is_charged_in_full(tmp_path, faulty):
    kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=EDGE, durability="normal", manual_clock_ms=T0)
    token = kernel.create_agent("atlas", "1.00")
    client = async_client(kernel, token, faulty)

    async def main():
        task = asyncio.create_task(client.chat.completions.create(model="stall-head", messages=MSGS))
        assert await asyncio.to_thread(faulty.arrived.wait, 10), "the request reached the provider"
        task.cancel()  # while waiting for the answer
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert len(faulty.requests) == 1
    state, cost, reserved, data = only_execution(kernel)
    assert (state, cost, data["estimated"]) == ("COMMITTED", reserved, True)
    assert_nothing_reserved(kernel)


def test_async_cut_stream_and_error_statuses(tmp_path, faulty):
    kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=EDGE, durability="normal", manual_clock_ms=T0)
    token = kernel.create_agent("atlas", "1.00")
    client = async_client(kernel, token, faulty)

    async def main():
        with pytest.raises(openai.APIConnectionError):
            async for _ in await client.chat.completions.create(model="cut-3", messages=MSGS, stream=True):
                pass
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="fail-429", messages=MSGS)
        stream = await client.chat.completions.create(model="tools", messages=MSGS, stream=True)
        async for _ in stream:
            pass

    asyncio.run(main())
    by_model = {}
    for e in kernel.events(1, 1000):
        if e["kind"] in ("execution.committed", "execution.failed"):
            by_model[kernel.execution(e["execution_id"])["model"]] = (e["kind"], e["data"])
    assert by_model["cut-3"][0] == "execution.committed" and by_model["cut-3"][1]["output_tokens"] == counted("cut-3", "Hello from the")
    assert by_model["fail-429"][0] == "execution.failed"
    assert by_model["tools"][1]["output_tokens"] == counted("tools", TOOL_ARGS)
    assert_nothing_reserved(kernel)


def test_derived_clients_stay_governed(edge, faulty):
    kernel, _, client = edge
    kernel.set_budget("atlas", "0.000001")
    for derived in (client.with_options(timeout=5), client.copy(), client.with_options(max_retries=3).copy(timeout=9)):
        assert isinstance(derived, openai.OpenAI)
        with pytest.raises(aex.InsufficientBudget):
            derived.chat.completions.create(model="mini", messages=MSGS)
    assert faulty.requests == []


def test_async_derived_clients_stay_governed(tmp_path, faulty):
    kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=EDGE, durability="normal", manual_clock_ms=T0)
    token = kernel.create_agent("atlas", "0.000001")
    client = async_client(kernel, token, faulty)

    async def main():
        for derived in (client.with_options(timeout=5), client.copy()):
            assert isinstance(derived, openai.AsyncOpenAI)
            with pytest.raises(aex.InsufficientBudget):
                await derived.chat.completions.create(model="mini", messages=MSGS)
            with pytest.raises(aex.InsufficientBudget):
                await derived.with_raw_response.chat.completions.create(model="mini", messages=MSGS)

    asyncio.run(main())
    assert faulty.requests == []


def test_parse_and_the_stream_helper_are_governed(edge, faulty):
    kernel, _, client = edge
    from pydantic import BaseModel

    class Greeting(BaseModel):
        text: str

    # The provider answers plain text, so parse() is called without a response_format here; with
    # one, the denial below shows it is admitted all the same.
    client.chat.completions.parse(model="mini", messages=MSGS)
    if hasattr(client.beta, "chat"):
        client.beta.chat.completions.parse(model="mini", messages=MSGS)
    with client.chat.completions.stream(model="mini", messages=MSGS) as stream:
        for _ in stream:
            pass
    assert [r["body"]["max_tokens"] for r in faulty.requests] == [1000] * len(faulty.requests)
    ends = [e for e in kernel.events(1, 1000) if e["kind"] == "execution.committed"]
    assert len(ends) == len(faulty.requests) >= 2
    assert all(e["amount_micro"] == 19 and e["data"]["estimated"] is False for e in ends)
    assert_nothing_reserved(kernel)
    kernel.set_budget("atlas", "0.000001")
    with pytest.raises(aex.InsufficientBudget):
        client.chat.completions.parse(model="mini", messages=MSGS, response_format=Greeting)


def test_raw_and_streaming_responses_settle_from_the_real_usage(edge, faulty):
    kernel, _, client = edge
    raw = client.chat.completions.with_raw_response.create(model="mini", messages=MSGS)
    assert raw.parse().usage.prompt_tokens == 100
    with client.chat.completions.with_streaming_response.create(model="mini", messages=MSGS) as response:
        assert response.parse().usage.completion_tokens == 6
    with client.with_streaming_response.chat.completions.create(model="mini", messages=MSGS, stream=True) as response:
        for _ in response.iter_lines():
            pass
    ends = [e for e in kernel.events(1, 1000) if e["kind"] == "execution.committed"]
    assert [(e["amount_micro"], e["data"]["estimated"]) for e in ends] == [(19, False)] * 3
    assert all(r["body"]["max_tokens"] == 1000 for r in faulty.requests)
    assert_nothing_reserved(kernel)


def test_a_streaming_response_left_unread_is_charged_in_full(edge):
    kernel, _, client = edge
    with client.chat.completions.with_streaming_response.create(model="nousage", messages=MSGS):
        pass  # never read: the provider did the work, aex saw none of it
    state, cost, reserved, data = only_execution(kernel)
    assert (state, cost, data["estimated"]) == ("COMMITTED", reserved, True)
    assert_nothing_reserved(kernel)


def test_responses_stream_settles_from_the_completed_event(edge):
    kernel, _, client = edge
    events = [e.type for e in client.responses.create(model="mini", input="say hello", stream=True)]
    assert events[-1] == "response.completed"
    with client.responses.stream(model="mini", input="say hello") as stream:
        assert stream.get_final_response().output_text == "hello"
    ends = [e for e in kernel.events(1, 1000) if e["kind"] == "execution.committed"]
    assert [(e["amount_micro"], e["data"]["estimated"]) for e in ends] == [(8 + 12, False)] * 2
    assert_nothing_reserved(kernel)


def test_extra_body_cannot_step_around_the_cap(edge, faulty):
    kernel, _, client = edge
    # extra_body is merged over the arguments by the SDK: what it asks is what is capped.
    client.chat.completions.create(model="mini", messages=MSGS, max_tokens=10, extra_body={"max_tokens": 100_000, "max_completion_tokens": 200_000})
    sent = faulty.requests[-1]["body"]
    assert sent["max_tokens"] == sent["max_completion_tokens"] == 1000, "the reservation's cap, not 100,000"
    with pytest.raises(aex.InvalidRequest):
        client.chat.completions.create(model="mini", messages=MSGS, extra_body={"n": 5})
    assert len(faulty.requests) == 1
    assert_nothing_reserved(kernel)


def test_calls_aex_cannot_bound_are_refused(edge, faulty):
    kernel, _, client = edge
    with pytest.raises(aex.PolicyDenied):
        client.images.generate(model="mini", prompt="a cat")
    with pytest.raises(aex.InvalidRequest):
        client.responses.create(model="mini", input="later", background=True)
    with pytest.raises(aex.PolicyDenied):  # a WebSocket session is not a request aex can settle
        with client.realtime.connect(model="mini"):
            pass
    assert faulty.requests == []
    client.models.list  # reading is not a model call  # noqa: B018
    assert_nothing_reserved(kernel)


def test_async_stream_dropped_unclosed_is_settled_at_once(tmp_path, faulty):
    kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=EDGE, durability="normal", manual_clock_ms=T0)
    token = kernel.create_agent("atlas", "1.00", max_concurrent=1)
    client = async_client(kernel, token, faulty)

    async def main():
        stream = await client.chat.completions.create(model="stall-2", messages=MSGS, stream=True)
        await stream.__anext__()
        del stream  # neither closed nor read to its end
        state, _, _, data = only_execution(kernel)
        assert state == "COMMITTED" and data["estimated"] is True
        await client.chat.completions.create(model="words-40", messages=MSGS)  # the one slot is free
        gc.collect()

    asyncio.run(main())
    assert_nothing_reserved(kernel)


def test_legacy_completions_are_governed(edge, faulty):
    kernel, _, client = edge
    with pytest.raises(aex.InvalidRequest):
        client.completions.create(model="mini", prompt="say hello", best_of=3)
    kernel.set_budget("atlas", "0.000001")
    with pytest.raises(aex.InsufficientBudget):
        client.completions.create(model="mini", prompt=["say hello"] * 3)
    assert faulty.requests == []


# ---- random exit paths ----------------------------------------------------------------------------

RANDOM_MODELS = ["mini", "cut-3", "cut-0", "stall-2", "tools", "nousage", "usage-neg", "usage-huge", "html", "fail-429", "fail-500", "redirect"]


def check_every_execution(kernel, faulty):
    """The money rules over everything that happened: nothing left reserved; every request that
    reached the provider and was answered 2xx charged, at least its input, and sent once; an
    error status charged nothing; a release only for what was never sent; nothing charged above
    its reservation unless recorded as an overrun; the audit clean."""
    events = kernel.events(1, 10_000)
    overruns = {e["execution_id"] for e in events if e["kind"] == "execution.overrun"}
    reserved = {e["execution_id"]: e for e in events if e["kind"] == "execution.reserved"}
    settled = {e["execution_id"]: e["data"] for e in events if e["kind"] == "execution.committed"}
    charged, refused, executions = [], [], []
    for eid, r in reserved.items():
        e = kernel.execution(eid)
        executions.append(e["model"])
        assert (e["cost_micro"] or 0) <= e["reserved_micro"] or eid in overruns, e
        if e["state"] == "RELEASED":
            assert not e["cost_micro"], e
        elif e["model"].startswith("fail-") or e["model"] == "redirect":
            # Refused: nothing to pay; unless a deadline cut the call while the request was on its
            # way or awaited (the provider may have been working on it): then in full, estimated.
            doubt = e["state"] == "COMMITTED" and e["cost_micro"] == e["reserved_micro"] and settled[eid]["estimated"]
            assert (e["state"], e["cost_micro"] or 0) == ("FAILED", 0) or doubt, e
            refused.append(e["model"])
        else:
            input_cost = -(-e["input_tokens"] * r["data"]["input_price"] // 1_000_000)
            assert e["state"] == "COMMITTED" and e["cost_micro"] >= input_cost, e
            charged.append(e["model"])
    sent = [r["body"]["model"] for r in faulty.requests if not r["path"].endswith("/elsewhere")]
    for model in set(sent):
        if model.startswith("fail-"):  # the SDK retried these: that cost nothing
            assert sent.count(model) <= 2 * executions.count(model), model
        elif model == "redirect":
            assert sent.count(model) <= executions.count(model), model
        else:  # each charged, and none sent twice
            assert sent.count(model) <= charged.count(model), (model, sent.count(model), charged.count(model))
    assert_nothing_reserved(kernel)


@pytest.mark.parametrize("seed", range(3))
def test_random_exit_paths_sync(tmp_path, faulty, seed):
    import random

    rng = random.Random(seed)
    kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=EDGE, durability="normal", manual_clock_ms=T0)
    token = kernel.create_agent("atlas", "10.00", max_concurrent=1)
    client = guard(openai.OpenAI(base_url=faulty.url, api_key="sk-test", max_retries=1, timeout=1.0), kernel, token)
    for _ in range(10):
        model, stream, action = rng.choice(RANDOM_MODELS), rng.random() < 0.6, rng.choice(["read", "break", "close", "with"])
        if model == "stall-2" and action == "read":
            action = "break"  # reading it all would wait for the provider's stall
        try:
            reply = client.chat.completions.create(model=model, messages=MSGS, stream=stream)
            if stream and action == "with":
                with reply as s:
                    next(iter(s), None)
            elif stream and action == "close":
                next(iter(reply), None)
                reply.close()
            elif stream and action == "break":
                for _ in reply:
                    break
            elif stream:
                for _ in reply:
                    pass
            del reply
        except (openai.APIError, aex.AexError):
            pass
        assert kernel.agent("atlas")["reserved_micro"] == 0, (model, stream, action)
    check_every_execution(kernel, faulty)


@pytest.mark.parametrize("seed", range(4))
def test_random_exit_paths_async(tmp_path, faulty, seed):
    import random

    rng = random.Random(100 + seed)
    kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=EDGE, durability="normal", manual_clock_ms=T0)
    token = kernel.create_agent("atlas", "10.00", max_concurrent=1)
    client = guard(openai.AsyncOpenAI(base_url=faulty.url, api_key="sk-test", max_retries=1, timeout=1.0), kernel, token)

    async def one(model, stream, action):
        first = asyncio.Event()

        async def run():
            reply = await client.chat.completions.create(model=model, messages=MSGS, stream=stream)
            first.set()
            if not stream:
                return
            if action == "close":
                await reply.__anext__()
                await reply.close()
                return
            async for _ in reply:
                first.set()
                if action == "break":
                    break

        try:
            if action == "wait_for":  # a deadline anywhere: before sending, while waiting, mid-stream
                await asyncio.wait_for(run(), timeout=rng.choice([0, 0.01, 0.05, 0.3]))
                return
            task = asyncio.create_task(run())
            if action == "cancel":  # once the answer has begun
                waiter = asyncio.create_task(first.wait())
                await asyncio.wait([task, waiter], timeout=2, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                task.cancel()
            await task
        except (asyncio.CancelledError, asyncio.TimeoutError, openai.APIError, aex.AexError, StopAsyncIteration):
            pass

    async def main():
        for _ in range(10):
            model, stream = rng.choice(RANDOM_MODELS), rng.random() < 0.6
            action = rng.choice(["read", "break", "close", "cancel", "wait_for"])
            if model == "stall-2" and action == "read":
                action = "wait_for"
            await one(model, stream, action)
            gc.collect()
            assert kernel.agent("atlas")["reserved_micro"] == 0, (model, stream, action)

    asyncio.run(main())
    check_every_execution(kernel, faulty)
