import os
import sys

import pytest

import aex

T0 = 1767225600000  # 2026-01-01T00:00:00Z
MODELS = """
models:
  mini: {input_price: 0.15, output_price: 0.60, max_output_tokens: 1000, vision: true}
  text-only: {input_price: 1, output_price: 2, tools: false, streaming: false}
  gpt-4o-mini: {input_price: 0.15, output_price: 0.60}
"""


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
