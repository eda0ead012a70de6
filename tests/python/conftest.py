import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

import aex

T0 = 1767225600000  # 2026-01-01T00:00:00Z
MODELS = """
models:
  mini: {input_price: 0.15, output_price: 0.60, max_output_tokens: 1000, vision: true}
  text-only: {input_price: 1, output_price: 2, tools: false, streaming: false}
  gpt-4o-mini: {input_price: 0.15, output_price: 0.60}
"""


ROOT = Path(__file__).resolve().parents[2]


def _postgres_installed() -> bool:
    return any(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server on loopback (``scripts/postgres``) for the whole run: its
    admin URL. Started only by the tests that ask for it."""
    if not _postgres_installed():
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    base = tempfile.mkdtemp()
    os.chmod(base, 0o711)
    url = subprocess.run([ROOT / "scripts/postgres", "start", f"{base}/pg"], check=True, capture_output=True, text=True).stdout.strip()
    yield url
    subprocess.run([ROOT / "scripts/postgres", "stop", f"{base}/pg"], check=False)
    shutil.rmtree(base, ignore_errors=True)


def new_postgres_database(admin: str) -> str:
    """A new, empty database on the server ``admin`` names: its URL."""
    name = f"aex_py_{uuid.uuid4().hex}"
    # The kernel creates aex's schema in an existing database; make one with the server's tools.
    psql = next(Path("/usr/lib/postgresql").glob("*/bin/psql"))
    subprocess.run([psql, admin, "-qc", f"CREATE DATABASE {name}"], check=True)
    return admin.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "aex.db")


@pytest.fixture
def provider():
    """A loopback OpenAI-compatible provider (tests/python/provider.py), stopped after the test."""
    from provider import Provider

    p = Provider()
    yield p
    p.stop()


@pytest.fixture
def kernel(db):
    return aex.Kernel(db, config_yaml=MODELS, durability="normal", manual_clock_ms=T0)


def snapshot(k):
    """Everything observable about the state, to prove an operation changed nothing."""
    return (k.list_agents(), k.list_teams(), k.head())


def assert_clean(k):
    report = k.audit()
    assert report["clean"], report["failure"]


def run_cli(*args, db=None, check=True):
    import subprocess

    cmd = [sys.executable, "-m", "aex"] + (["--db", db] if db else []) + list(args)
    env = dict(os.environ, PYTHONWARNINGS="error")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}): {proc.stderr}")
    return proc
