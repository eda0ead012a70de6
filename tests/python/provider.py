"""A small OpenAI-compatible server on 127.0.0.1 for the tests: chat completions (plain and SSE
streaming with a final usage chunk when asked), responses, embeddings, the model list; models named
``fail-429`` / ``fail-500`` answer with that error. Every request body is kept in ``requests``."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class _Handler(BaseHTTPRequestHandler):
    server: "Provider"

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path.endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": "mini", "object": "model", "created": 0, "owned_by": "test"}]})
        else:
            self._json(404, {"error": {"message": "no such route"}})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        model = body.get("model", "")
        if model.startswith("fail-"):
            status = int(model.split("-")[1])
            self._json(status, {"error": {"message": f"simulated {status}", "type": "server_error", "code": status}})
            return
        if self.path.endswith("/chat/completions"):
            self._chat(body)
        elif self.path.endswith("/responses"):
            self._json(200, {
                "id": "resp_1", "object": "response", "created_at": 0, "model": model, "status": "completed",
                "output": [{"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                            "content": [{"type": "output_text", "text": "hello", "annotations": []}]}],
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                "usage": {"input_tokens": 50, "output_tokens": 20, "total_tokens": 70,
                          "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}},
            })
        elif self.path.endswith("/embeddings"):
            n = len(body["input"]) if isinstance(body["input"], list) else 1
            self._json(200, {"object": "list", "model": model,
                             "data": [{"object": "embedding", "index": i, "embedding": [0.0, 1.0]} for i in range(n)],
                             "usage": {"prompt_tokens": 8 * n, "total_tokens": 8 * n}})
        else:
            self._json(404, {"error": {"message": "no such route"}})

    def _chat(self, body: dict[str, Any]) -> None:
        words = ["Hello", " from", " the", " test", " provider", "."]
        usage = {"prompt_tokens": 100, "completion_tokens": len(words), "total_tokens": 100 + len(words)}
        base = {"id": "chatcmpl-1", "created": 0, "model": body["model"]}
        if not body.get("stream"):
            self._json(200, dict(base, object="chat.completion", usage=usage, choices=[
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "".join(words)}}]))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()

        def send(obj: dict[str, Any]) -> None:
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        for w in words:
            send(dict(base, object="chat.completion.chunk", choices=[{"index": 0, "delta": {"content": w}, "finish_reason": None}]))
        if (body.get("stream_options") or {}).get("include_usage"):
            send(dict(base, object="chat.completion.chunk", choices=[], usage=usage))
        self.wfile.write(b"data: [DONE]\n\n")


class Provider(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


if __name__ == "__main__":
    # For the C tests: serve until killed, after printing the base URL on one line.
    import sys

    server = Provider()
    print(server.url, flush=True)
    try:
        server.thread.join()
    except KeyboardInterrupt:
        sys.exit(0)
