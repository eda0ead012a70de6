"""``aex serve`` with real clients: the official ``openai`` SDK (sync, async, streaming), LangChain's
``ChatOpenAI`` with ``base_url``, and ``curl`` — against the gateway in front of a loopback
provider; an in-process agent and HTTP agents spending one team budget at once without overshoot;
SIGTERM stopping it cleanly."""

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import openai
import pytest

import aex
from conftest import assert_clean

MSGS = [{"role": "user", "content": "hello"}]


@pytest.fixture
def home(tmp_path, provider):
    config = tmp_path / "models.yaml"
    config.write_text(f"""
providers:
  local: {{base_url: "{provider.url}"}}
models:
  mini: {{provider: local, input_price: 1, output_price: 2, max_output_tokens: 1000}}
  fail-429: {{provider: local, input_price: 1, output_price: 2}}
""")
    return tmp_path


class Server:
    def __init__(self, home, *extra: str) -> None:
        self.db = str(home / "aex.db")
        self.config = str(home / "models.yaml")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aex", "--db", self.db, "--config", str(home / "models.yaml"), "serve", "--port", "0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        line = self.proc.stdout.readline()
        assert "listening on" in line, line + self.proc.stderr.read()
        self.url = line.split("listening on ")[1].split()[0]

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=60)
        return out


@pytest.fixture
def server(home):
    s = Server(home)
    yield s
    s.stop()


def test_the_openai_sdk_sync_async_and_streaming(server, home, request):
    k = aex.Kernel(server.db, config=server.config)
    token = k.create_agent("atlas", "1.00")
    client = openai.OpenAI(base_url=server.url, api_key=token, max_retries=0)
    request.addfinalizer(client.close)
    r = client.chat.completions.create(model="mini", messages=MSGS)
    assert r.choices[0].message.content == "Hello from the test provider." and r.usage.prompt_tokens == 100
    chunks = list(client.chat.completions.create(model="mini", messages=MSGS, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello from the test provider."
    assert client.embeddings.create(model="mini", input="hi").usage.prompt_tokens == 8
    assert client.responses.create(model="mini", input="hi").output_text == "hello"

    async def main():
        async with openai.AsyncOpenAI(base_url=server.url, api_key=token, max_retries=0) as ac:
            reply = await ac.chat.completions.create(model="mini", messages=MSGS)
            stream = await ac.chat.completions.create(model="mini", messages=MSGS, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return reply.usage.completion_tokens, text

    assert asyncio.run(main()) == (6, "Hello from the test provider.")
    with pytest.raises(openai.PermissionDeniedError) as caught:
        client.chat.completions.create(model="nope", messages=MSGS)
    assert caught.value.body["code"] == "model_not_configured"
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="fail-429", messages=MSGS)
    agent = k.agent("atlas")
    assert agent["reserved_micro"] == 0 and agent["spent_micro"] > 0
    assert_clean(k)


def test_langchain_chat_openai_with_base_url(server):
    langchain_openai = pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")
    k = aex.Kernel(server.db, config=server.config)
    token = k.create_agent("atlas", "1.00")
    with httpx.Client() as http:
        llm = langchain_openai.ChatOpenAI(model="mini", base_url=server.url, api_key=token, max_retries=0, http_client=http)
        assert llm.invoke("hello").content == "Hello from the test provider."
    assert k.agent("atlas")["spent_micro"] == 100 + 2 * 6
    assert_clean(k)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(server):
    k = aex.Kernel(server.db, config=server.config)
    token = k.create_agent("atlas", "1.00")
    out = subprocess.run(
        ["curl", "-s", "-D", "-", f"{server.url}/chat/completions", "-H", f"Authorization: Bearer {token}",
         "-d", json.dumps({"model": "mini", "messages": MSGS})],
        capture_output=True, check=True,
    ).stdout.decode()
    head, _, body = out.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200") and "x-aex-cost-micro: 112" in head
    assert json.loads(body)["usage"]["completion_tokens"] == 6


NODE_DIR = Path(__file__).resolve().parents[1] / "node"


@pytest.mark.skipif(shutil.which("node") is None or shutil.which("npm") is None, reason="Node.js and npm are not installed")
def test_a_node_agent_with_the_official_openai_package(server):
    # The package comes from the npm registry on first use (kept in tests/node/node_modules).
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--silent"], cwd=NODE_DIR, check=True, timeout=600)
    k = aex.Kernel(server.db, config=server.config)
    token = k.create_agent("node-agent", "1.00")
    env = dict(os.environ, OPENAI_BASE_URL=server.url, OPENAI_API_KEY=token)
    proc = subprocess.run(["node", "agent.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["text"] == seen["streamed"] == "Hello from the test provider."
    assert seen["usage"]["prompt_tokens"] == 100
    assert seen["denied"] == {"status": 403, "code": "model_not_configured"}
    agent = k.agent("node-agent")
    assert (agent["spent_micro"], agent["reserved_micro"]) == (2 * (100 + 2 * 6), 0)
    assert_clean(k)


def test_in_process_and_http_agents_share_one_team_budget_without_overshoot(server):
    k = aex.Kernel(server.db, config=server.config)
    # Each call reserves 100 input + 2 * 1000 output = 2,100 and is charged 112.
    k.create_team("fleet", "0.01")  # 10,000 micro-USD
    tokens = [k.create_agent(f"a{i}", "1.00", team="fleet") for i in range(4)]
    admitted = []
    lock = threading.Lock()

    def http_agent(token):
        with openai.OpenAI(base_url=server.url, api_key=token, max_retries=0) as client:
            for _ in range(15):
                try:
                    client.chat.completions.create(model="mini", messages=MSGS)
                    with lock:
                        admitted.append(token)
                except openai.APIStatusError as e:
                    assert e.status_code == 402 and e.body["code"] == "team_budget_exceeded", e.body

    def local_agent(token):
        for _ in range(15):
            try:
                k.chat(token, model="mini", messages=MSGS)
                with lock:
                    admitted.append(token)
            except aex.errors.InsufficientBudget as e:
                assert e.reason == "team_budget_exceeded"

    threads = [threading.Thread(target=http_agent, args=(t,)) for t in tokens[:3]] + [threading.Thread(target=local_agent, args=(tokens[3],))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    team = k.team("fleet")
    assert team["reserved_micro"] == 0
    assert team["spent_micro"] == 112 * len(admitted) <= 10_000
    assert len(admitted) >= 4  # the budget was used, not refused wholesale
    assert_clean(k)


def test_a_killed_gateway_leaves_its_dispatched_call_to_the_ttl_rule(tmp_path):
    import socket
    import time

    # A provider that takes the request and never answers.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: held.append(listener.accept()[0]), daemon=True).start()
    (tmp_path / "models.yaml").write_text(f"""
providers:
  local: {{base_url: "http://127.0.0.1:{listener.getsockname()[1]}/v1"}}
models:
  mini: {{provider: local, input_price: 1, output_price: 2, max_output_tokens: 1000}}
""")
    server = Server(tmp_path)
    try:
        k = aex.Kernel(server.db, config=server.config)
        token = k.create_agent("atlas", "1.00")
        threading.Thread(
            target=lambda: subprocess.run(["curl", "-s", "-m", "30", f"{server.url}/chat/completions", "-H", f"Authorization: Bearer {token}",
                                           "-d", json.dumps({"model": "mini", "messages": MSGS})], capture_output=True),
            daemon=True,
        ).start()
        deadline = time.monotonic() + 20
        while not any(e["kind"] == "execution.dispatched" for e in k.events(1, 100)) and time.monotonic() < deadline:
            time.sleep(0.05)
        server.proc.kill()  # SIGKILL: nothing settles the call
        server.proc.communicate(timeout=30)
        (execution_id,) = {e["execution_id"] for e in k.events(1, 100) if e["kind"] == "execution.dispatched"}
        assert k.execution(execution_id)["state"] == "DISPATCHED"
        # After the reservation's TTL, the next kernel to look charges it in full: it may have
        # reached the provider.
        later = aex.Kernel(server.db, config=server.config, manual_clock_ms=k.now_ms() + 16 * 60 * 1000)
        assert_clean(later)  # the audit sweeps expired reservations first
        e = later.execution(execution_id)
        assert (e["state"], e["cost_micro"]) == ("COMMITTED", e["reserved_micro"]), e
        assert later.agent("atlas")["reserved_micro"] == 0
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.communicate(timeout=30)
        for c in held:
            c.close()
        listener.close()


def test_sigterm_stops_the_gateway_cleanly(home):
    s = Server(home)
    out = s.stop()
    assert s.proc.returncode == 0 and "stopped" in out


def test_a_non_loopback_address_needs_an_admin_token(home):
    proc = subprocess.run(
        [sys.executable, "-m", "aex", "--db", str(home / "aex.db"), "serve", "--host", "0.0.0.0", "--port", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1 and "admin_token" in proc.stderr, proc.stderr
    env = dict(os.environ, AEX_TEST_ADMIN="s3cret")
    s = subprocess.Popen(
        [sys.executable, "-m", "aex", "--db", str(home / "aex.db"), "serve", "--host", "0.0.0.0", "--port", "0", "--admin-token-env", "AEX_TEST_ADMIN"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        assert "listening on" in s.stdout.readline()
    finally:
        s.send_signal(signal.SIGTERM)
        s.communicate(timeout=60)
