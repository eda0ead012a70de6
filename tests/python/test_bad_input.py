"""Bad input from Python: a clear InvalidRequest naming the argument, and nothing changed."""

from decimal import Decimal

import pytest

import aex
from conftest import assert_clean, snapshot


@pytest.fixture
def busy(kernel):
    token = kernel.create_agent("atlas", "1.00")
    open_call = kernel.admit(token, "mini", input_tokens=10, max_output_tokens=10)
    return kernel, token, open_call["execution_id"]


CASES = [
    ("budget_usd", lambda k, t, x: k.create_agent("b", -1)),
    ("budget_usd", lambda k, t, x: k.create_agent("b", "-0.01")),
    ("budget_usd", lambda k, t, x: k.create_agent("b", None)),
    ("budget_usd", lambda k, t, x: k.create_agent("b", True)),
    ("budget_usd", lambda k, t, x: k.create_agent("b", [1])),
    ("budget_usd", lambda k, t, x: k.create_agent("b", 0.0000001)),
    ("budget_usd", lambda k, t, x: k.create_agent("b", 1.23456789)),
    ("budget_usd", lambda k, t, x: k.create_agent("b", Decimal("0.0000001"))),
    ("budget_usd", lambda k, t, x: k.create_agent("b", 10**30)),
    ("budget_usd", lambda k, t, x: k.create_agent("b", float("nan"))),
    ("budget_usd", lambda k, t, x: k.create_agent("b", "1e9")),
    ("name", lambda k, t, x: k.create_agent("", 1)),
    ("name", lambda k, t, x: k.create_agent("no spaces", 1)),
    ("rpm", lambda k, t, x: k.create_agent("b", 1, rpm=-1)),
    ("rpm", lambda k, t, x: k.create_agent("b", 1, rpm="5")),
    ("rpm", lambda k, t, x: k.create_agent("b", 1, rpm=2**40)),
    ("tpm", lambda k, t, x: k.create_agent("b", 1, tpm=0)),
    ("ttl_ms", lambda k, t, x: k.create_agent("b", 1, ttl_ms=1.5)),
    ("scope", lambda k, t, x: k.create_agent("b", 1, scope="admin")),
    ("budget_period", lambda k, t, x: k.create_agent("b", 1, budget_period="hourly")),
    ("input_tokens", lambda k, t, x: k.admit(t, "mini", input_tokens=-5, max_output_tokens=5)),
    ("input_tokens", lambda k, t, x: k.admit(t, "mini", input_tokens=10**20, max_output_tokens=5)),
    ("max_output_tokens", lambda k, t, x: k.admit(t, "mini", input_tokens=5, max_output_tokens=0)),
    ("max_output_tokens", lambda k, t, x: k.admit(t, "mini", input_tokens=5, max_output_tokens=2.5)),
    ("execution_id", lambda k, t, x: k.admit(t, "mini", input_tokens=5, max_output_tokens=5, execution_id="a b")),
    ("usage.input_tokens", lambda k, t, x: k.commit(x, input_tokens=-1, output_tokens=0)),
    ("output_tokens", lambda k, t, x: k.commit(x, input_tokens=1, output_tokens=None)),
    ("output_tokens", lambda k, t, x: k.commit(x, input_tokens=1, output_tokens="3")),
    ("usage.output_tokens", lambda k, t, x: k.commit(x, input_tokens=1, output_tokens=-3)),
    ("budget_usd", lambda k, t, x: k.set_budget("atlas", -1)),
    ("delta_usd", lambda k, t, x: k.add_budget("atlas", "-5")),
    ("ttl_ms", lambda k, t, x: k.rotate_token("atlas", ttl_ms=-1)),
    ("anchor", lambda k, t, x: k.audit("nope")),
]


@pytest.mark.parametrize("field,call", CASES)
def test_bad_input_names_the_argument_and_changes_nothing(busy, field, call):
    kernel, token, open_id = busy
    before = snapshot(kernel)
    with pytest.raises(aex.InvalidRequest) as e:
        call(kernel, token, open_id)
    assert e.value.status == 400
    assert e.value.field == field, e.value.message
    assert field in e.value.message
    assert snapshot(kernel) == before
    assert_clean(kernel)


def test_wrong_python_types_for_strings_raise_type_errors(kernel):
    with pytest.raises(TypeError):
        kernel.create_agent(None, "1.00")
    with pytest.raises(TypeError):
        kernel.admit(None, "mini")


def test_exact_amounts_are_exact(kernel):
    kernel.create_agent("a", "0.000001")
    kernel.create_agent("b", Decimal("12.345678"))
    kernel.create_agent("c", 0.1)
    kernel.create_agent("d", 3)
    got = {a["name"]: a["budget_micro"] for a in kernel.list_agents()}
    assert got == {"a": 1, "b": 12_345_678, "c": 100_000, "d": 3_000_000}
    assert aex.usd_to_micro("0.01") == 10_000 and aex.format_usd(10_000) == "0.01"


def test_messages_must_be_a_list_of_messages(kernel):
    token = kernel.create_agent("shape", "1.00")
    for bad in ["a string" * 100, ["a string"], {"role": "user", "content": "hi"}, [b"bytes"]]:
        with pytest.raises(aex.InvalidRequest) as e:
            with kernel.guard(token, "mini", messages=bad, max_output_tokens=10):
                pass
        assert e.value.field == "messages", bad
    assert kernel.agent("shape")["reserved_micro"] == 0


def test_a_kernel_needs_a_path_and_takes_a_path_like(tmp_path):
    import pathlib

    with pytest.raises(aex.InvalidRequest) as e:
        aex.Kernel("")
    assert e.value.field == "path"
    k = aex.Kernel(pathlib.Path(tmp_path) / "aex.db")
    assert k.list_agents() == []


def test_amounts_keys_and_timeouts_in_their_usual_forms(tmp_path):
    k = aex.Kernel(":memory:", config_yaml="models: {mini: {input_price: 1, output_price: 2}}")
    k.create_agent("ten", Decimal("1E+1"))
    k.create_agent("micro", Decimal("0.0000010"))
    assert (k.agent("ten")["budget_micro"], k.agent("micro")["budget_micro"]) == (10_000_000, 1)
    with pytest.raises(aex.InvalidRequest):
        k.create_agent("too-fine", Decimal("0.0000015"))
    keyed = aex.Kernel(str(tmp_path / "keyed.db"), ledger_key="a text key")
    assert keyed.audit()["mode"] == "hmac-sha256"
    with pytest.raises(aex.InvalidRequest) as e:
        aex.Kernel(":memory:", ledger_key=42)
    assert e.value.field == "ledger_key"
    for field in ["connect_timeout_ms", "request_timeout_ms"]:
        with pytest.raises(aex.InvalidRequest) as e:
            aex.Kernel(":memory:", **{field: -1})
        assert e.value.field == field
    with pytest.raises(aex.InvalidRequest) as e:
        aex.Kernel(":memory:", max_retries=-1)
    assert e.value.field == "max_retries"
