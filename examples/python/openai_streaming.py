"""A streaming OpenAI call, governed by aex.

Starts a tiny OpenAI-compatible streaming server on 127.0.0.1 (standing in for the provider),
wraps a real ``openai.OpenAI`` client with ``aex.integrations.openai.guard``, and streams a reply:
aex admits before the request, injects ``stream_options.include_usage``, and settles from the
usage chunk when the stream ends.

Run (after ``pip install '.[openai]'``):  python examples/python/openai_streaming.py
"""

import json
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai

import aex
from aex.integrations.openai import guard


class Streamer(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        base = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
        for word in "Budgets are enforced before the request leaves the process.".split(" "):
            chunk = dict(base, choices=[{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}])
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 25, "completion_tokens": 11, "total_tokens": 36}
            self.wfile.write(f"data: {json.dumps(dict(base, choices=[], usage=usage))}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Streamer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    db = Path(tempfile.mkdtemp(prefix="aex-openai-")) / "aex.db"
    kernel = aex.Kernel(str(db), config_yaml="models:\n  gpt-4o-mini: {input_price: 0.15, output_price: 0.60}\n")
    token = kernel.create_agent("writer", "0.10")

    client = guard(openai.OpenAI(base_url=f"http://127.0.0.1:{server.server_address[1]}/v1", api_key="local"), kernel, token)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "Why govern agents?"}], max_tokens=100, stream=True
    )
    for chunk in stream:
        if chunk.choices:
            print(chunk.choices[0].delta.content or "", end="", flush=True)
    print()
    agent = kernel.agent("writer")
    print(f"charged ${aex.format_usd(agent['spent_micro'])}; reserved now ${aex.format_usd(agent['reserved_micro'])}")
    server.shutdown()


if __name__ == "__main__":
    main()
