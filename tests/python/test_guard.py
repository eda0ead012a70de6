"""The guard context manager and the plain calls through Python."""

import asyncio
from types import SimpleNamespace

import pytest

import aex
from conftest import assert_clean

REQ = {"input_tokens": 1000, "max_output_tokens": 500}  # reserves 450 micro-USD on "mini"


def test_commit_on_success(kernel):
    token = kernel.create_agent("atlas", "1.00")
    with kernel.guard(token, "mini", **REQ) as call:
        assert call.admission["reserved_micro"] == 450
        assert kernel.agent("atlas")["reserved_micro"] == 450
        call.dispatched()
        settled = call.commit(input_tokens=1000, output_tokens=200)
    assert settled["cost_micro"] == 270 and settled["released_micro"] == 180
    a = kernel.agent("atlas")
    assert (a["spent_micro"], a["reserved_micro"]) == (270, 0)
    assert_clean(kernel)


def test_release_on_exception_and_the_exception_propagates(kernel):
    token = kernel.create_agent("atlas", "1.00")
    with pytest.raises(RuntimeError, match="provider down"):
        with kernel.guard(token, "mini", **REQ) as call:
            raise RuntimeError("provider down")
    assert call.settlement["state"] == "RELEASED"
    assert kernel.execution(call.execution_id)["reason"] == "exception: RuntimeError"
    a = kernel.agent("atlas")
    assert (a["spent_micro"], a["reserved_micro"]) == (0, 0)
    assert_clean(kernel)


def test_denial_raises_before_the_body_runs(kernel):
    token = kernel.create_agent("atlas", "0.0004")
    ran = []
    with pytest.raises(aex.InsufficientBudget) as denied:
        with kernel.guard(token, "mini", **REQ):
            ran.append(True)
    assert ran == []
    e = denied.value
    assert (e.status, e.reason, e.needed_micro, e.remaining_micro) == (402, "budget_exceeded", 450, 400)
    assert str(e.needed_usd) == "0.00045" and str(e.remaining_usd) == "0.0004"
    assert kernel.agent("atlas")["reserved_micro"] == 0


def test_clean_exit_without_commit_charges_the_reservation(kernel):
    token = kernel.create_agent("atlas", "1.00")
    with kernel.guard(token, "mini", **REQ) as call:
        pass
    assert call.settlement["cost_micro"] == 450
    assert kernel.agent("atlas")["spent_micro"] == 450


def test_idempotent_replay_with_the_same_execution_id(kernel):
    token = kernel.create_agent("atlas", "1.00")
    first = kernel.admit(token, "mini", execution_id="job-1", **REQ)
    again = kernel.admit(token, "mini", execution_id="job-1", **REQ)
    assert (first["replayed"], again["replayed"]) == (False, True)
    assert kernel.agent("atlas")["reserved_micro"] == 450
    with pytest.raises(aex.Conflict) as c:
        kernel.admit(token, "mini", execution_id="job-1", input_tokens=1000, max_output_tokens=501)
    assert c.value.reason == "idempotency_conflict"
    kernel.commit("job-1", input_tokens=10, output_tokens=10)
    assert kernel.commit("job-1", input_tokens=10, output_tokens=10)["replayed"] is True
    assert_clean(kernel)


def test_usage_objects_from_openai_and_langchain_are_accepted(kernel):
    token = kernel.create_agent("atlas", "1.00")
    chat_usage = SimpleNamespace(prompt_tokens=1000, completion_tokens=100, prompt_tokens_details=SimpleNamespace(cached_tokens=0))
    responses_usage = SimpleNamespace(input_tokens=1000, output_tokens=100, input_tokens_details=SimpleNamespace(cached_tokens=0))
    langchain_usage = {"input_tokens": 1000, "output_tokens": 100, "total_tokens": 1100, "input_token_details": {"cache_read": 0}}
    for usage in (chat_usage, responses_usage, langchain_usage, {"prompt_tokens": 1000, "completion_tokens": 100}):
        with kernel.guard(token, "mini", **REQ) as call:
            assert call.commit(usage)["cost_micro"] == 150 + 60
    openai = pytest.importorskip("openai", reason="the openai package is an optional extra")
    real = openai.types.CompletionUsage(prompt_tokens=1000, completion_tokens=100, total_tokens=1100)
    with kernel.guard(token, "mini", **REQ) as call:
        assert call.commit(real)["cost_micro"] == 210


def test_messages_are_counted_and_images_imply_vision(kernel):
    token = kernel.create_agent("atlas", "1.00", vision=False)
    msgs = [{"role": "user", "content": "hello world"}]
    a = kernel.admit_call(token, "gpt-4o-mini", messages=msgs, max_output_tokens=10)
    assert a["input_tokens"] == 1 + 2 + 3 + 3  # o200k_base: "user" 1, "hello world" 2, framing
    image = [{"role": "user", "content": [{"type": "text", "text": "what is this"}, {"type": "image_url", "image_url": {"url": "data:"}}]}]
    with pytest.raises(aex.PolicyDenied) as denied:
        kernel.admit_call(token, "mini", messages=image, max_output_tokens=10)
    assert denied.value.reason == "vision_not_allowed"
    with pytest.raises(aex.PolicyDenied) as denied:
        kernel.admit_call(token, "text-only", tools=[{"type": "function"}], max_output_tokens=10)
    assert denied.value.reason == "model_lacks_tools"


def test_async_guard(kernel):
    token = kernel.create_agent("atlas", "1.00")

    async def main():
        async with kernel.guard(token, "mini", **REQ) as call:
            await asyncio.sleep(0)
            call.commit(input_tokens=1000, output_tokens=100)
        with pytest.raises(ValueError):
            async with kernel.guard(token, "mini", **REQ):
                raise ValueError("boom")

    asyncio.run(main())
    a = kernel.agent("atlas")
    assert (a["spent_micro"], a["reserved_micro"]) == (210, 0)
    assert_clean(kernel)


def test_exceptions_are_a_hierarchy_with_statuses_and_pickle():
    import pickle

    assert issubclass(aex.InvalidRequest, ValueError) and issubclass(aex.NotFound, LookupError)
    for cls, status in [(aex.InvalidRequest, 400), (aex.Unauthenticated, 401), (aex.InsufficientBudget, 402),
                        (aex.PolicyDenied, 403), (aex.NotFound, 404), (aex.Conflict, 409), (aex.RateLimited, 429),
                        (aex.Internal, 500), (aex.Unavailable, 503)]:
        assert issubclass(cls, aex.AexError) and cls.status == status
    e = aex.RateLimited("full", reason="agent_rpm", retry_after_ms=1500, limit=3)
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is aex.RateLimited and back.retry_after == 1.5 and back.limit == 3 and str(back) == "full"


def test_rate_limits_and_teams_surface_as_exceptions(kernel):
    token = kernel.create_agent("atlas", "1.00", rpm=1)
    kernel.admit(token, "mini", **REQ)
    with pytest.raises(aex.RateLimited) as r:
        kernel.admit(token, "mini", **REQ)
    assert (r.value.reason, r.value.limit, r.value.retry_after_ms) == ("agent_rpm", 1, 61_000)
    kernel.create_team("org", "0.0005")
    member = kernel.create_agent("member", "1.00", team="org")
    kernel.admit(member, "mini", **REQ)
    with pytest.raises(aex.InsufficientBudget) as t:
        kernel.admit(member, "mini", **REQ)
    assert (t.value.reason, t.value.team, t.value.remaining_micro) == ("team_budget_exceeded", "org", 50)


def test_open_uses_the_home_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("AEX_HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "models.yaml").write_text("models:\n  m: {input_price: 1, output_price: 1}\n")
    k = aex.Kernel.open()
    assert list(k.models()["models"]) == ["m"]
    assert (tmp_path / "home" / "aex.db").exists()
