"""The fleet store from Python: ``aex.Kernel("postgresql://…")`` against a real PostgreSQL server
(a throwaway one on loopback, started by ``scripts/postgres``), worker processes racing one
budget each through a connection of its own."""

import multiprocessing
import os
import subprocess
import uuid
from pathlib import Path

import pytest

import aex

from conftest import MODELS, new_postgres_database

PER_CALL = 450  # micro-USD: 1,000 input and 500 output tokens of "mini"


def race(url: str, token: str) -> int:
    """One worker process: admits and commits until the budget says no."""
    k = aex.Kernel(url, config_yaml=MODELS)
    admitted = 0
    while True:
        try:
            a = k.admit(token, "mini", input_tokens=1000, max_output_tokens=500)
        except aex.InsufficientBudget:
            return admitted
        admitted += 1
        k.commit(a.execution_id, input_tokens=1000, output_tokens=500)


def test_worker_processes_share_one_budget_exactly_through_postgresql(postgres_server):
    url = new_postgres_database(postgres_server)
    k = aex.Kernel(url, config_yaml=MODELS)
    calls = 60
    token = k.create_agent("atlas", f"{calls * PER_CALL / 1_000_000:.6f}")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        admitted = sum(pool.starmap(race, [(url, token)] * 4))
    assert admitted == calls
    atlas = k.agent("atlas")
    assert (atlas["spent_micro"], atlas["reserved_micro"]) == (calls * PER_CALL, 0)
    assert k.audit()["clean"]


def test_a_bad_url_names_the_problem_and_never_the_password():
    with pytest.raises(aex.InvalidRequest, match="PostgreSQL URL"):
        aex.Kernel("postgresql://aex:hunter2-secret@127.0.0.1:notaport/db")
    with pytest.raises(aex.Unavailable) as e:
        aex.Kernel("postgresql://aex:hunter2-secret@127.0.0.1:1/db?connect_timeout=2")
    assert "127.0.0.1:1/db" in str(e.value) and "hunter2-secret" not in str(e.value) + repr(e.value)


def test_the_cli_and_kernel_open_take_a_url_from_db_or_aex_db_and_never_print_its_password(postgres_server, tmp_path):
    from conftest import run_cli

    import json
    import sys

    # The test server trusts loopback, so any password is accepted: one to look for in output.
    url = new_postgres_database(postgres_server).replace("aex@", "aex:hunter2-secret@", 1)
    config = tmp_path / "models.yaml"
    config.write_text(MODELS)
    created = json.loads(run_cli("--json", "--config", str(config), "agent", "create", "atlas", "2.00", "60", db=url).stdout)
    assert created["agent"]["budget_micro"] == 2_000_000
    status = run_cli("--json", "status", db=url)
    assert json.loads(status.stdout)["agents"] == 1
    assert "hunter2-secret" not in status.stdout + status.stderr and "aex:***@" in status.stdout
    doctor = run_cli("--json", "doctor", db=url, check=False)
    assert "hunter2-secret" not in doctor.stdout + doctor.stderr
    checks = {c["check"]: c for c in json.loads(doctor.stdout)["checks"]}
    assert checks["database"]["status"] == "ok" and checks["audit"]["status"] == "ok", checks

    # $AEX_DB selects the same database for the CLI and for Kernel.open(), with nothing on disk.
    env = dict(os.environ, AEX_DB=url, AEX_HOME=str(tmp_path / "home"))
    listed = subprocess.run([sys.executable, "-m", "aex", "--json", "agent", "list"], env=env, capture_output=True, text=True, check=True)
    assert [a["name"] for a in json.loads(listed.stdout)] == ["atlas"]
    opened = subprocess.run(
        [sys.executable, "-c", "import aex; print(aex.Kernel.open().agent('atlas')['budget_micro'])"],
        env=env, capture_output=True, text=True, check=True,
    )
    assert opened.stdout.strip() == "2000000"
    assert not (tmp_path / "home").exists(), "a URL creates no aex directory"


def test_the_password_comes_from_pgpassword_or_the_password_file_as_libpq_reads_them(postgres_server, tmp_path):
    import sys

    # A role that signs in with a password (the test server asks every role but its own for one).
    url = new_postgres_database(postgres_server)
    role = f"r{uuid.uuid4().hex}"
    psql = next(Path("/usr/lib/postgresql").glob("*/bin/psql"))
    db = url.rsplit("/", 1)[1]
    subprocess.run([psql, postgres_server, "-qc", f"CREATE ROLE {role} LOGIN PASSWORD 'right-pw'; ALTER DATABASE {db} OWNER TO {role}"], check=True)
    role_url = url.replace("aex@", f"{role}@", 1)
    opened = "import aex, sys; k = aex.Kernel(sys.argv[1]); print(len(k.list_agents()))"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PG")}

    def open_with(**env):
        return subprocess.run([sys.executable, "-c", opened, role_url], env=dict(base, **env), capture_output=True, text=True)

    assert open_with(PGPASSWORD="right-pw").stdout.strip() == "0"
    wrong = open_with(PGPASSWORD="wrong-pw")
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stderr
    assert "wrong-pw" not in wrong.stderr + wrong.stdout

    # The password file: used when nothing else gives a password, and only if private.
    host, port = url.split("@", 1)[1].split("/", 1)[0].split(":")
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"# the test server\n{host}:{port}:{db}:{role}:right-pw\n")
    passfile.chmod(0o644)
    assert open_with(PGPASSFILE=str(passfile)).returncode != 0, "a file others can read is ignored"
    passfile.chmod(0o600)
    assert open_with(PGPASSFILE=str(passfile)).stdout.strip() == "0"
    home = tmp_path / "home"
    home.mkdir()
    (home / ".pgpass").write_text(passfile.read_text())
    (home / ".pgpass").chmod(0o600)
    assert open_with(HOME=str(home)).stdout.strip() == "0"
