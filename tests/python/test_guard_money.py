"""The guard settles by the money rules on every exit path: what may have reached the provider
ends charged, what never left is released, and each call settles exactly once."""

import gc

import pytest

import aex
from conftest import assert_clean

RESERVED = 1000 * 150 // 1000 + 500 * 600 // 1000  # 1,000 input and 500 output tokens of "mini": 450


def _guard(kernel, token):
    return kernel.guard(token, "mini", input_tokens=1000, max_output_tokens=500)


def _state(kernel, g):
    e = kernel.execution(g.execution_id)
    return e["state"], e["cost_micro"] or 0


@pytest.fixture
def token(kernel):
    return kernel.create_agent("atlas", "1.00")


def test_commit_without_usage_charges_the_reservation_estimated(kernel, token):
    with _guard(kernel, token) as g:
        s = g.commit(None)
    assert (s.state, s.cost_micro) == ("COMMITTED", 450)
    assert any(e["kind"] == "execution.committed" and e["data"]["estimated"] for e in kernel.events(1, 100))
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert_clean(kernel)


def test_commit_without_usage_counts_the_output_it_was_given(kernel, token):
    with _guard(kernel, token) as g:
        g.dispatched()
        g.output("x" * 40)  # "mini" has no tokenizer: one token per byte at most
        s = g.commit(None)
    assert s.cost_micro == 150 + 40 * 600 // 1000
    assert_clean(kernel)


def test_an_exception_after_dispatch_is_charged_and_before_it_released(kernel, token):
    with pytest.raises(TimeoutError):
        with _guard(kernel, token) as sent:
            sent.dispatched()
            raise TimeoutError("the provider did not answer")
    assert _state(kernel, sent) == ("COMMITTED", RESERVED)
    with pytest.raises(KeyError):
        with _guard(kernel, token) as unsent:
            raise KeyError("before any request")
    assert _state(kernel, unsent) == ("RELEASED", 0)
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert_clean(kernel)


def test_a_guard_admits_one_call(kernel, token):
    g = _guard(kernel, token)
    with g:
        pass
    with pytest.raises(RuntimeError, match="one call"):
        with g:
            pass
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert sum(e["kind"] == "execution.reserved" for e in kernel.events(1, 100)) == 1


def test_settling_through_the_kernel_inside_the_block_stands(kernel, token):
    with _guard(kernel, token) as failed:
        kernel.fail(failed.execution_id, "provider 500")
    assert _state(kernel, failed) == ("FAILED", 0)
    with _guard(kernel, token) as committed:
        kernel.commit(committed.execution_id, input_tokens=100, output_tokens=10)
    assert _state(kernel, committed) == ("COMMITTED", 15 + 6)
    assert_clean(kernel)


def test_the_guard_can_fail_a_call(kernel, token):
    with _guard(kernel, token) as g:
        g.dispatched()
        s = g.fail("provider answered 503")
    assert (s.state, s.cost_micro) == ("FAILED", 0)
    assert kernel.agent("atlas")["spent_micro"] == 0
    assert_clean(kernel)


def test_a_guard_collected_without_exiting_still_settles(kernel, token):
    sent = _guard(kernel, token)
    sent.__enter__()
    sent.dispatched()
    sent_id = sent.execution_id
    unsent = _guard(kernel, token)
    unsent.__enter__()
    unsent_id = unsent.execution_id
    del sent, unsent
    gc.collect()
    assert kernel.execution(sent_id)["state"] == "COMMITTED"
    assert kernel.execution(unsent_id)["state"] == "RELEASED"
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert_clean(kernel)
