"""Every shared scenario vector, through the Python API, on SQLite and on PostgreSQL; Rust and C
run the same files."""

import json
from pathlib import Path

import pytest

import aex

from conftest import new_postgres_database

VECTORS = sorted((Path(__file__).parent.parent / "vectors").glob("*.json"))


def _ok(value):
    if hasattr(value, "to_dict"):  # Admission, Settlement
        value = value.to_dict()
    return dict(value, status=0)


def _err(e):
    out = {"status": e.status, "reason": e.reason, "message": e.message}
    for key in ("field", "needed_micro", "remaining_micro", "team", "retry_after_ms", "limit"):
        if getattr(e, key) is not None or (key == "team" and e.status == 402):
            out[key] = getattr(e, key)
    return out


def _step(k, step, names):
    op = step["op"]
    name = lambda key: names.get(step[key], step[key])  # noqa: E731
    if op == "create_agent":
        spec = dict(step["spec"])
        agent_name = spec.pop("name")
        budget = spec.pop("budget_usd", None)
        if budget is None:
            budget = aex.format_usd(spec.pop("budget_micro"))
        token = k.create_agent(agent_name, budget, **spec)
        if "as" in step:
            names[step["as"]] = token
        return _ok(k.agent(agent_name))
    if op == "create_team":
        return _ok(k.create_team(step["name"], aex.format_usd(step["budget_micro"]), parent=step.get("parent")))
    if op == "admit":
        req = dict(step["request"])
        model = req.pop("model")
        if "messages" in req:
            req["messages"] = [(m["role"], m["content"]) for m in req["messages"]]
        a = k.admit(name("token"), model, **req)
        if "as" in step:
            names[step["as"]] = a["execution_id"]
        return _ok(a)
    if op == "dispatch":
        k.mark_dispatched(name("execution"))
        return {"status": 0, "state": "DISPATCHED"}
    if op == "commit":
        return _ok(k.commit(name("execution"), step["usage"]))
    if op == "release":
        return _ok(k.release(name("execution"), step["reason"]))
    if op == "fail":
        return _ok(k.fail(name("execution"), step["error"]))
    if op == "set_budget":
        return _ok(k.set_budget(step["agent"], aex.format_usd(step["budget_micro"])))
    if op in ("disable", "enable"):
        getattr(k, op)(step["agent"])
        return _ok(k.agent(step["agent"]))
    if op == "delete_agent":
        k.delete_agent(step["agent"])
        return {"status": 0}
    if op == "rotate_token":
        token = k.rotate_token(step["agent"], ttl_ms=step.get("ttl_ms"))
        if "as" in step:
            names[step["as"]] = token
        return {"status": 0}
    if op == "inspect":
        return _ok(k.agent(step["agent"]))
    if op == "inspect_team":
        return _ok(k.team(step["team"]))
    if op == "advance":
        k.advance_clock(step["ms"])
        return {"status": 0}
    if op == "audit":
        return _ok(k.audit())
    raise AssertionError(f"unknown op {op}")


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_vector(path, store, request):
    """Each vector on each store: SQLite in memory, and a new database on a PostgreSQL server."""
    v = json.loads(path.read_text())
    options = {"config_yaml": v["models_yaml"], "manual_clock_ms": v["start_ms"]}
    if "reservation_ttl_ms" in v:
        options["reservation_ttl_ms"] = v["reservation_ttl_ms"]
    where = ":memory:" if store == "sqlite" else new_postgres_database(request.getfixturevalue("postgres_server"))
    k = aex.Kernel(where, **options)
    names = {}
    for i, step in enumerate(v["steps"]):
        try:
            result = _step(k, step, names)
        except aex.AexError as e:
            result = _err(e)
        expect = dict(step.get("expect", {}))
        expect.setdefault("status", 0)
        for key, want in expect.items():
            assert result.get(key) == want, f"{path.name} step {i} ({step['op']}): {key!r} differs; result {result}"


def test_all_vectors_are_found():
    assert len(VECTORS) >= 5
