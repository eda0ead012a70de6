"""The examples run as documented."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "python"


def run(name):
    return subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=300, check=True).stdout


def test_the_demo_cuts_the_agent_off_and_audits_clean():
    out = run("demo.py")
    assert "DENIED 402 budget_exceeded" in out and "audit: clean" in out and "BURN (1h)" in out


def test_the_langgraph_example_stops_at_the_budget():
    pytest.importorskip("langgraph", reason="langgraph is installed with the test dependencies")
    out = run("langgraph_agent.py")
    assert "stopped: budget_exceeded" in out and "audit: clean" in out


def test_the_openai_streaming_example_settles():
    pytest.importorskip("openai", reason="the openai package is the [openai] extra")
    out = run("openai_streaming.py")
    assert "charged $0.000011" in out and "reserved now $0.00" in out
