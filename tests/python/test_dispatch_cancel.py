"""Leaving a governed call early — ``close()``, ``break``, cancelling the task, Ctrl-C — stops it
at once, not at a stalled provider's pace, tells the provider (the connection closes), and
settles it by the money rules; a failed call says what it cost."""

import asyncio
import json
import os
import signal
import socket
import threading
import time

import pytest

import aex
from conftest import assert_clean

MSGS = [{"role": "user", "content": "hello"}]


class Stalling:
    """An OpenAI-compatible server on 127.0.0.1 that answers every chat request with ``chunks``
    stream deltas (or, with none, nothing at all) and then stalls; ``closed`` is set when the
    client drops the connection."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.closed = threading.Event()
        self.requests = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            while len(body) < length:
                body += conn.recv(65536)
            self.requests += 1
            if self.chunks:
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                for i in range(self.chunks):
                    event = f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': f'word{i} '}}]})}\n\n".encode()
                    conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
            conn.settimeout(30)
            try:
                if conn.recv(1) == b"":
                    self.closed.set()  # the client hung up
            except OSError:
                self.closed.set()

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def stalling():
    servers: list[Stalling] = []

    def make(chunks: int) -> Stalling:
        servers.append(Stalling(chunks))
        return servers[-1]

    yield make
    for s in servers:
        s.stop()


def kernel_for(tmp_path, server: Stalling) -> aex.Kernel:
    yaml = f"""
providers:
  slow: {{base_url: "{server.url}"}}
models:
  mini: {{provider: slow, input_price: 1, output_price: 2, max_output_tokens: 1000}}
"""
    # A long request timeout: only the caller's leaving can end these calls quickly.
    return aex.Kernel(str(tmp_path / "aex.db"), config_yaml=yaml, durability="normal", request_timeout_ms=60_000, max_retries=0)


def only_execution(kernel: aex.Kernel) -> dict:
    ids = {e["execution_id"] for e in kernel.events(1, 1000) if e.get("execution_id")}
    assert len(ids) == 1, ids
    return kernel.execution(ids.pop())


def counted(words: int) -> int:
    return aex._aex.count_tokens("mini", "".join(f"word{i} " for i in range(words)))


def assert_charged_for_counted_output(kernel: aex.Kernel, words: int) -> None:
    e = only_execution(kernel)
    assert e["state"] == "COMMITTED", e
    assert e["cost_micro"] == e["input_tokens"] + 2 * counted(words), e
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert_clean(kernel)


def test_closing_a_stream_does_not_wait_for_a_stalled_provider(tmp_path, stalling):
    server = stalling(3)
    kernel = kernel_for(tmp_path, server)
    token = kernel.create_agent("atlas", "1.00")
    stream = kernel.chat_stream(token, model="mini", messages=MSGS)
    got = [next(stream) for _ in range(3)]
    assert len(got) == 3
    started = time.monotonic()
    stream.close()
    assert time.monotonic() - started < 10, "close() returned at once, not at the provider's next chunk"
    assert server.closed.wait(10), "the provider saw the connection close"
    assert_charged_for_counted_output(kernel, 3)


def test_break_out_of_a_stream_stops_it(tmp_path, stalling):
    server = stalling(3)
    kernel = kernel_for(tmp_path, server)
    token = kernel.create_agent("atlas", "1.00")
    seen = 0
    for _ in kernel.chat_stream(token, model="mini", messages=MSGS):
        seen += 1
        if seen == 2:
            break  # the generator is closed as it is dropped
    assert server.closed.wait(10)
    # The third chunk may have been counted before the break took effect.
    e = only_execution(kernel)
    assert e["state"] == "COMMITTED" and e["cost_micro"] in {e["input_tokens"] + 2 * counted(n) for n in (2, 3)}, e
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert_clean(kernel)


def test_async_stream_left_by_break_and_aclose_or_cancelled_stops(tmp_path, stalling):
    server = stalling(3)
    kernel = kernel_for(tmp_path, server)
    token = kernel.create_agent("atlas", "1.00")

    async def leave_by_aclose():
        stream = kernel.achat_stream(token, model="mini", messages=MSGS)
        async for _ in stream:
            break
        await stream.aclose()

    async def leave_by_cancel():
        async def consume():
            async for _ in kernel.achat_stream(token, model="mini", messages=MSGS):
                pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    for leave in (leave_by_aclose, leave_by_cancel):
        server.closed.clear()
        started = time.monotonic()
        asyncio.run(asyncio.wait_for(leave(), 20))
        assert time.monotonic() - started < 20
        assert server.closed.wait(10), leave.__name__
    agent = kernel.agent("atlas")
    assert agent["reserved_micro"] == 0 and agent["spent_micro"] > 0
    assert_clean(kernel)


def test_cancelling_achat_settles_the_call_before_the_cancellation_propagates(tmp_path, stalling):
    server = stalling(0)
    kernel = kernel_for(tmp_path, server)
    token = kernel.create_agent("atlas", "1.00")

    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(kernel.achat(token, model="mini", messages=MSGS), 0.5)

    asyncio.run(main())
    e = only_execution(kernel)
    # Sent, nothing seen: the full reservation, never less.
    assert (e["state"], e["cost_micro"]) == ("COMMITTED", e["reserved_micro"]), e
    assert kernel.agent("atlas")["reserved_micro"] == 0
    assert server.closed.wait(10)
    assert_clean(kernel)


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals reach the main thread only")
def test_ctrl_c_during_chat_interrupts_it_and_the_call_is_settled(tmp_path, stalling):
    server = stalling(0)
    kernel = kernel_for(tmp_path, server)
    token = kernel.create_agent("atlas", "1.00")
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        kernel.chat(token, model="mini", messages=MSGS)
    assert time.monotonic() - started < 20, "Ctrl-C took effect before the provider answered"
    e = only_execution(kernel)
    assert (e["state"], e["cost_micro"]) == ("COMMITTED", e["reserved_micro"]), e
    assert server.closed.wait(10)
    assert_clean(kernel)


def test_a_failed_call_says_what_it_cost(tmp_path, stalling):
    server = stalling(3)  # a stream cut short: the server hangs up after the third chunk
    kernel = kernel_for(tmp_path, server)
    token = kernel.create_agent("atlas", "1.00")
    # The non-streamed call reads a stream-shaped body that never ends: cut by a short timeout.
    short = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=f"""
providers:
  slow: {{base_url: "{server.url}"}}
models:
  mini: {{provider: slow, input_price: 1, output_price: 2, max_output_tokens: 1000}}
""", durability="normal", request_timeout_ms=500, max_retries=0)
    with pytest.raises(aex.errors.Unavailable) as caught:
        short.chat(token, model="mini", messages=MSGS)
    e = only_execution(kernel)
    assert caught.value.execution_id == e["execution_id"]
    assert caught.value.settlement is not None and caught.value.settlement.cost_micro == e["cost_micro"] == e["reserved_micro"]
    assert_clean(kernel)


def test_a_forked_child_can_drop_a_kernel_that_dispatched(tmp_path):
    from provider import Provider

    provider = Provider()
    try:
        kernel = aex.Kernel(str(tmp_path / "aex.db"), config_yaml=f"""
providers:
  local: {{base_url: "{provider.url}"}}
models:
  mini: {{provider: local, input_price: 1, output_price: 2, max_output_tokens: 1000}}
""", durability="normal")
        token = kernel.create_agent("atlas", "1.00")
        kernel.chat(token, model="mini", messages=MSGS)  # the dispatch runtime's threads now run
        pid = os.fork()
        if pid == 0:  # the child: dropping the kernel must not wait for threads it does not have
            signal.alarm(20)
            del kernel
            import gc

            gc.collect()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
        assert kernel.agent("atlas")["spent_micro"] == 112
        assert_clean(kernel)
    finally:
        provider.stop()
