"""The fleet store from Python: ``aex.Kernel("postgresql://…")`` against a real PostgreSQL server
(a throwaway one on loopback, started by ``scripts/postgres``), worker processes racing one
budget each through a connection of its own."""

import multiprocessing
import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest

import aex

from conftest import MODELS

ROOT = Path(__file__).resolve().parents[2]
PER_CALL = 450  # micro-USD: 1,000 input and 500 output tokens of "mini"


def _postgres_installed() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))


@pytest.fixture(scope="module")
def server():
    if not _postgres_installed():
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    base = tempfile.mkdtemp()
    os.chmod(base, 0o711)
    url = subprocess.run([ROOT / "scripts/postgres", "start", f"{base}/pg"], check=True, capture_output=True, text=True).stdout.strip()
    yield url
    subprocess.run([ROOT / "scripts/postgres", "stop", f"{base}/pg"], check=False)
    shutil.rmtree(base, ignore_errors=True)


def new_database(admin: str) -> str:
    name = f"aex_py_{uuid.uuid4().hex}"
    # The kernel creates aex's schema in an existing database; make one with the server's tools.
    psql = next(Path("/usr/lib/postgresql").glob("*/bin/psql"))
    subprocess.run([psql, admin, "-qc", f"CREATE DATABASE {name}"], check=True)
    return admin.rsplit("/", 1)[0] + "/" + name


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


def test_worker_processes_share_one_budget_exactly_through_postgresql(server):
    url = new_database(server)
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
