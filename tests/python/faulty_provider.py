"""The loopback provider of ``provider.py``, plus the ways a real provider misbehaves, chosen by
the model name (every other model behaves as in ``provider.py``):

- ``cut-N``: answers 200 announcing a long body, sends N stream chunks (or, not streaming, half
  a JSON body) and closes the connection;
- ``stall-N``: streams N chunks, then waits (until ``unstall()``, at most 10 s) before the rest;
  ``stall-head`` waits before answering at all;
- ``tools``: answers with a tool call whose arguments are 1,013 characters, streamed in pieces
  when asked, and never reports usage; ``nousage``: plain text, never reports usage;
- ``usage-neg``, ``usage-huge``, ``usage-giant``: report ``prompt_tokens`` of -1, 10**12, 10**30;
- ``html``: a 200 whose body is an HTML page;
- ``redirect``: a 307 to ``/v1/elsewhere`` (a request there is recorded like any other);
- ``fail-NNN``: that status (as in ``provider.py``);
- ``words-N``: a reply of N words (streamed with usage when asked).

The Responses API streams (``stream: true`` on ``/responses``) as its SSE events, ending with
``response.completed`` carrying the usage.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from provider import Provider, _Handler

TOOL_ARGS = json.dumps({"query": "x" * 988, "limit": 5})  # 1,013 characters
assert len(TOOL_ARGS) == 1013


class _FaultyHandler(_Handler):
    server: "FaultyProvider"

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers["Content-Length"])
        raw = self.rfile.read(length)
        body = json.loads(raw)
        model = str(body.get("model", ""))
        handled = self.path.endswith("/elsewhere") or model.split("-")[0] in ("cut", "stall", "tools", "nousage", "usage", "html", "redirect", "words")
        handled = handled or (self.path.endswith("/responses") and bool(body.get("stream")))
        if not handled:
            # provider.py's behaviour: hand it the body it would have read.
            self.rfile = _Replay(raw, self.rfile)
            return super().do_POST()
        self.server.requests.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
        self.server.arrived.set()
        try:
            self._faulty(body, model)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away: that is what some tests do

    def _faulty(self, body: dict[str, Any], model: str) -> None:
        if self.path.endswith("/elsewhere"):
            return self._json(200, {"error": "a redirect was followed"})
        if model == "redirect":
            self.send_response(307)
            self.send_header("Location", self.path.rsplit("/", 2)[0] + "/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        if model == "html":
            data = b"<html><body>502 Bad Gateway (but answered 200)</body></html>"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return None
        if self.path.endswith("/responses"):
            return self._responses_stream(body)
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        kind, _, arg = model.partition("-")
        words = ["Hello", " from", " the", " test", " provider", "."]
        if kind == "words":
            words = [f" w{i}" for i in range(int(arg))]
        usage: Any = {"prompt_tokens": 100, "completion_tokens": len(words), "total_tokens": 100 + len(words)}
        if kind == "usage":
            usage["prompt_tokens"] = {"neg": -1, "huge": 10**12, "giant": 10**30}[arg]
        if kind in ("tools", "nousage"):
            usage = None
        base = {"id": "chatcmpl-1", "created": 0, "model": body["model"]}
        if kind == "stall" and arg == "head":
            self.server.unstalled.wait(10)
        if not stream:
            if kind == "tools":
                message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "search", "arguments": TOOL_ARGS}}]}
            else:
                message = {"role": "assistant", "content": "".join(words)}
            reply = dict(base, object="chat.completion", choices=[{"index": 0, "finish_reason": "stop", "message": message}])
            if usage is not None:
                reply["usage"] = usage
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            if kind == "cut":
                self.send_header("Content-Length", str(len(data) * 4))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                self._hang_up()
                return None
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return None
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        if kind == "cut":
            self.send_header("Content-Length", "1000000")
        self.end_headers()

        def send(obj: dict[str, Any]) -> None:
            self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
            self.wfile.flush()

        def chunk(delta: dict[str, Any], finish: Any = None) -> None:
            send(dict(base, object="chat.completion.chunk", choices=[{"index": 0, "delta": delta, "finish_reason": finish}]))

        if kind == "tools":
            pieces = [TOOL_ARGS[i : i + 100] for i in range(0, len(TOOL_ARGS), 100)]
            chunk({"role": "assistant", "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "search", "arguments": ""}}]})
            for p in pieces:
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]})
            chunk({}, "tool_calls")
        else:
            for i, w in enumerate(words):
                if kind == "cut" and i == int(arg):
                    self._hang_up()
                    return None
                if kind == "stall" and i == int(arg):
                    self.server.unstalled.wait(10)
                chunk({"content": w})
            chunk({}, "stop")
        if include_usage and usage is not None:
            send(dict(base, object="chat.completion.chunk", choices=[], usage=usage))
        self.wfile.write(b"data: [DONE]\n\n")
        return None

    def _responses_stream(self, body: dict[str, Any]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        model = body["model"]
        response: dict[str, Any] = {
            "id": "resp_1", "object": "response", "created_at": 0, "model": model, "status": "in_progress",
            "output": [], "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
        }
        n = 0

        def event(kind: str, **data: Any) -> None:
            nonlocal n
            self.wfile.write(f"event: {kind}\ndata: {json.dumps(dict(data, type=kind, sequence_number=n))}\n\n".encode())
            self.wfile.flush()
            n += 1

        event("response.created", response=response)
        event("response.output_item.added", output_index=0,
              item={"type": "message", "id": "msg_1", "role": "assistant", "status": "in_progress", "content": []})
        event("response.content_part.added", item_id="msg_1", output_index=0, content_index=0,
              part={"type": "output_text", "text": "", "annotations": []})
        for w in ["hel", "lo"]:
            event("response.output_text.delta", item_id="msg_1", output_index=0, content_index=0, delta=w, logprobs=[])
        done = dict(response, status="completed", output=[
            {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
             "content": [{"type": "output_text", "text": "hello", "annotations": []}]}],
            usage={"input_tokens": 50, "output_tokens": 20, "total_tokens": 70,
                   "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}})
        event("response.completed", response=done)

    def _hang_up(self) -> None:
        """Closes the connection without finishing the body."""
        self.close_connection = True
        self.wfile.flush()
        self.connection.shutdown(2)  # socket.SHUT_RDWR


class _Replay:
    """A request body already read, handed back to ``provider.py``'s handler."""

    def __init__(self, data: bytes, rest: Any) -> None:
        self._data = data
        self._rest = rest

    def read(self, n: int = -1) -> bytes:
        data, self._data = (self._data, b"") if n < 0 or n >= len(self._data) else (self._data[:n], self._data[n:])
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rest, name)


class FaultyProvider(Provider):
    """:class:`provider.Provider` with the misbehaviours above."""

    def __init__(self) -> None:
        self.unstalled = threading.Event()
        self.arrived = threading.Event()  # set when a request for a misbehaving model has arrived
        super().__init__()
        self.RequestHandlerClass = _FaultyHandler

    def unstall(self) -> None:
        """Lets every stalled answer go on."""
        self.unstalled.set()

    def stop(self) -> None:
        self.unstall()
        super().stop()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hangs up mid-answer is part of the tests
