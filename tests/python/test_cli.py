"""The aex command end to end, in a subprocess."""

import json

import pytest

from conftest import run_cli


@pytest.fixture
def home(tmp_path):
    db = str(tmp_path / "aex.db")
    run_cli("init", db=db)
    return db


def test_init_writes_a_default_config_that_checks(home, tmp_path):
    assert (tmp_path / "models.yaml").exists()
    out = run_cli("--json", "models", "check", db=home).stdout
    models = json.loads(out)["models"]
    for name in ["gpt-4o-mini", "claude-sonnet-4-5", "llama-3.3-70b-versatile", "llama3.2"]:
        assert name in models
    assert models["gpt-4o-mini"]["input_micro_per_mtok"] == 150_000
    assert models["llama3.2"]["input_micro_per_mtok"] is None


def test_agent_lifecycle_with_the_daemon_argument_order(home):
    out = run_cli("--json", "agent", "create", "atlas", "5.00", "30", "--tpm", "10000", "--allowed-models", "gpt-4o-mini,gpt-4o", "--no-vision", "--strict", "--ttl", "24", db=home).stdout
    created = json.loads(out)
    token = created["token"]
    assert token.startswith("aex_") and created["agent"]["rpm"] == 30
    assert created["agent"]["allowed_models"] == ["gpt-4o-mini", "gpt-4o"]
    assert created["agent"]["vision"] is False and created["agent"]["strict"] is True

    listing = run_cli("agent", "list", db=home).stdout
    assert "atlas" in listing and "$5.00" in listing and token not in listing
    inspect = json.loads(run_cli("--json", "agent", "inspect", "atlas", db=home).stdout)
    assert inspect["budget_micro"] == 5_000_000 and "token" not in inspect

    rotated = json.loads(run_cli("--json", "agent", "rotate-token", "atlas", "--ttl", "1", db=home).stdout)["token"]
    assert rotated != token
    assert json.loads(run_cli("--json", "agent", "set-budget", "atlas", "7.5", db=home).stdout)["budget_micro"] == 7_500_000

    run_cli("team", "create", "org", "100", db=home)
    run_cli("agent", "create", "member", "1", "10", "--parent", "org", db=home)
    assert "org" in run_cli("team", "list", db=home).stdout

    audit = run_cli("audit", db=home).stdout
    assert audit.startswith("audit: clean")
    head = json.loads(run_cli("--json", "status", db=home).stdout)["head"]
    assert json.loads(run_cli("--json", "audit", "--anchor", head, db=home).stdout)["clean"] is True
    metrics = json.loads(run_cli("--json", "metrics", db=home).stdout)
    assert {m["agent"] for m in metrics} == {"atlas", "member"}

    tail = json.loads(run_cli("--json", "ledger", "tail", "-n", "3", db=home).stdout)
    assert len(tail) == 3 and tail[-1]["seq"] == int(head.split(":")[0])
    export = run_cli("ledger", "export", db=home).stdout.strip().splitlines()
    assert json.loads(export[0])["seq"] == 1 and len(export) == tail[-1]["seq"]
    assert token not in "".join(export) and rotated not in "".join(export)

    run_cli("agent", "delete", "atlas", db=home)
    assert "atlas" not in run_cli("agent", "list", db=home).stdout
    assert run_cli("version").stdout.startswith("aex ")


@pytest.mark.parametrize(
    "args,needle",
    [
        (["agent", "create", "atlas", "-5", "30"], "budget_usd"),
        (["agent", "create", "bad name", "5", "30"], "name"),
        (["agent", "create", "atlas", "5", "30", "--parent", "ghost"], "team_not_found"),
        (["agent", "inspect", "ghost"], "agent_not_found"),
        (["agent", "delete", "ghost"], "agent_not_found"),
        (["agent", "set-budget", "ghost", "1"], "agent_not_found"),
        (["agent", "rotate-token", "ghost"], "agent_not_found"),
        (["audit", "--anchor", "garbage"], "anchor"),
        (["models", "check", "/nonexistent/models.yaml"], "cannot read"),
    ],
)
def test_errors_are_one_line_with_a_nonzero_exit(home, args, needle):
    proc = run_cli(*args, db=home, check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aex: error:") and needle in lines[0], proc.stderr


def test_bad_arguments_are_usage_errors(home):
    proc = run_cli("agent", "create", "atlas", "5", "many", db=home, check=False)
    assert proc.returncode == 2 and "rpm" in proc.stderr
    proc = run_cli("agent", "create", "atlas", "5", "3", "--ttl", "-1", db=home, check=False)
    assert proc.returncode == 2 and "--ttl" in proc.stderr


def test_models_reload_records_the_config_and_refuses_a_bad_one(home, tmp_path):
    good = tmp_path / "models.yaml"
    out = run_cli("models", "reload", str(good), db=home).stdout
    assert "recorded in the ledger" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  m: {input_price: 1, output_prise: 2}\n")
    proc = run_cli("models", "check", str(bad), db=home, check=False)
    assert proc.returncode == 1 and "line 2" in proc.stderr
    kinds = [json.loads(line)["kind"] for line in run_cli("ledger", "export", db=home).stdout.splitlines()]
    assert "config.loaded" in kinds


def test_a_tampered_ledger_fails_the_audit(home, tmp_path):
    import sqlite3

    run_cli("agent", "create", "atlas", "5", "30", db=home)
    with sqlite3.connect(home) as c:
        c.execute("UPDATE agents SET spent_micro = 1")
    proc = run_cli("audit", db=home, check=False)
    assert proc.returncode == 1 and "FAILED" in proc.stdout and "atlas" in proc.stdout


def test_bad_numbers_are_usage_errors_not_tracebacks(db):
    run_cli("agent", "create", "a", "1", "10", db=db)
    for args, field in [
        (["ledger", "tail", "-n", "-5"], "-n"),
        (["ledger", "tail", "-n", "0"], "-n"),
        (["ledger", "tail", "-n", "99999999999999999999"], "-n"),
        (["ledger", "export", "--from", "-1"], "--from"),
        (["agent", "create", "y", "5", "3", "--ttl", "inf"], "--ttl"),
        (["agent", "create", "x", "5", "0"], "rpm"),
    ]:
        proc = run_cli(*args, db=db, check=False)
        assert proc.returncode == 2, (args, proc.stderr)
        assert f"argument {field}:" in proc.stderr and "Traceback" not in proc.stderr, (args, proc.stderr)
    proc = run_cli("ledger", "tail", "-n", "1", db=db)
    assert "empty ledger" not in proc.stdout and "agent.created" in proc.stdout


def test_json_errors_are_json(db):
    proc = run_cli("--json", "agent", "inspect", "nobody", db=db, check=False)
    assert proc.returncode == 1
    error = json.loads(proc.stdout)["error"]
    assert (error["status"], error["reason"]) == (404, "agent_not_found")
