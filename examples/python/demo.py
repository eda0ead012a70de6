"""aex governing an agent loop, end to end.

Starts a small OpenAI-compatible server on 127.0.0.1 (a stand-in for a provider), gives an
agent $0.01, and runs a tool-using loop whose prompt grows every turn. Every model call goes
through ``kernel.guard(...)``: admitted (token, policy, rate, budget), sent with the reserved
``max_tokens``, and settled from the server's reported usage. When the next call no longer fits,
aex refuses it with 402 before any request is sent. Then ``aex metrics`` and ``aex audit``.

Run:  scripts/demo     (or, with aex installed:  python examples/python/demo.py)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aex

MODELS = """
providers:
  local: {base_url: "http://127.0.0.1/v1"}
models:
  gpt-4o-mini: {provider: local, input_price: 0.15, output_price: 0.60, max_output_tokens: 16384}
"""


class Provider(BaseHTTPRequestHandler):
    """Answers /v1/chat/completions like OpenAI does, with a usage block."""

    calls = 0

    def do_POST(self) -> None:  # noqa: N802 (the stdlib's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Provider.calls += 1
        prompt = sum(len(m["content"]) for m in body["messages"]) // 5 + 3 * len(body["messages"])
        completion = min(body["max_tokens"], 150 + (Provider.calls * 7919) % 250)
        reply = {
            "id": f"chatcmpl-{Provider.calls}",
            "object": "chat.completion",
            "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": "Next I will call the search tool. " * (completion // 8)}}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
        }
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def chat(url: str, model: str, messages: list[dict[str, str]], max_tokens: int) -> dict:
    req = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def main() -> int:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Provider)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"

    home = Path(tempfile.mkdtemp(prefix="aex-demo-"))
    (home / "models.yaml").write_text(MODELS)
    db = str(home / "aex.db")
    kernel = aex.Kernel(db, config=str(home / "models.yaml"))
    token = kernel.create_agent("atlas", "0.01", rpm=600, allowed_models=["gpt-4o-mini"], strict=True)
    print(f"aex {aex.__version__}: database {db}")
    print(f"agent atlas: budget $0.01, token {token[:10]}… (stored only as a SHA-256 hash)")
    print(f"provider: OpenAI-compatible server on {url}\n")

    history = [
        {"role": "system", "content": "You are a research agent. Use tools until the task is done."},
        {"role": "user", "content": "Survey every paper on budget-governed agents and summarise them."},
    ]
    turn = 0
    while True:
        turn += 1
        try:
            with kernel.guard(token, "gpt-4o-mini", messages=history, max_output_tokens=512) as call:
                call.dispatched()
                response = chat(url, "gpt-4o-mini", history, call.max_output_tokens)
                settled = call.commit(response["usage"])
        except aex.InsufficientBudget as denied:
            print(f"\nturn {turn:>2}: DENIED {denied.status} {denied.reason}: needed ${denied.needed_usd}, remaining ${denied.remaining_usd}")
            print(f"         no request was sent: the provider saw {Provider.calls} calls, all paid for.")
            break
        a = call.admission
        agent = kernel.agent("atlas")
        print(
            f"turn {turn:>2}: reserved ${aex.format_usd(a.reserved_micro):<9} for {a.input_tokens:>5}+{a.max_output_tokens} tokens, "
            f"charged ${aex.format_usd(settled.cost_micro):<9} spent ${aex.format_usd(agent['spent_micro'])}"
        )
        history.append(response["choices"][0]["message"])
        history.append({"role": "user", "content": "Tool result: " + "found a relevant paper; " * 60})

    server.shutdown()
    for command in (["metrics"], ["audit"]):
        print(f"\n$ aex {' '.join(command)}")
        proc = subprocess.run([sys.executable, "-m", "aex", "--db", db, *command], capture_output=True, text=True)
        print(proc.stdout.rstrip() or proc.stderr.rstrip())
        if proc.returncode != 0:
            return proc.returncode
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
