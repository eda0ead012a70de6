"""Govern an ``openai.OpenAI`` or ``openai.AsyncOpenAI`` client.

``guard(client, kernel, token)`` returns a copy of the client (an instance of a subclass of the
client's class: every method, option and ``isinstance`` check intact) on which every request that
runs a model — ``chat.completions`` (``create``, ``parse``, the ``stream()`` helper), legacy
``completions``, ``responses`` (``create``, ``parse``, ``stream``) and ``embeddings``, through
``with_raw_response`` and ``with_streaming_response`` too, ``beta`` included — is admitted before
it is sent (a denial raises and nothing is sent) and settled exactly once. Clients derived from it
(``with_options(...)``, ``copy(...)``) are governed the same way. Install with
``pip install aex[openai]``.

What is sent never asks for more than was reserved
   The output cap (``max_tokens`` / ``max_completion_tokens`` / ``max_output_tokens``) is always
   sent, and is the reservation's, whatever the caller asked (more, ``None``, nothing), in the
   arguments or in ``extra_body``. ``n`` or ``best_of`` above 1 and ``background=True`` (a
   Responses call answered later, after aex could settle it) are refused with
   :class:`aex.InvalidRequest`. Redirects are not followed (a 3xx is an error status, below).
   A request aex cannot bound — any other call that may spend (images, audio, batches,
   fine-tuning, ...) and the SDK's WebSocket connections (Realtime, Responses over WebSocket) — is
   refused with :class:`aex.PolicyDenied` (``endpoint_not_governed``) before anything is sent;
   reads and deletes pass, and so do files, uploads, vector stores, conversations, moderations,
   ``responses.input_tokens``, ``responses.cancel`` and stored chat completions' updates. Use an
   ungoverned client for what aex does not govern.

What may have reached the provider ends charged
   How a call settles is decided by the kernel's call object (``aex._aex.Call``); this module
   only tells it what happened, reading the provider's answer as the SDK reads it (whatever the
   SDK hands back: a parsed object, a raw or streaming response, a stream):

   - the provider reported usage: that usage is charged (a streamed call gets
     ``stream_options.include_usage``). Usage the kernel cannot trust (a count missing, negative
     or out of range) is charged at the full reservation; the answer is still handed back;
   - no usage: the input plus every output token aex saw — text, refusals, and tool-call and
     function-call arguments — counted with the model's tokenizer, marked estimated. A stream
     read to its end, closed, cut by the provider, abandoned (``break``), cancelled or stopped by
     ``asyncio.wait_for`` settles this way at that moment;
   - in doubt — a timeout or a connection lost after the request may have been written, a
     cancellation while the request was on its way or awaited, a 2xx whose body cannot be read
     (not JSON, or cut), a stream cut before any output, a streaming response closed unread: the
     full reservation, marked estimated;
   - released only when aex knows nothing reached the provider: it was never sent (a denial, an
     error before sending, a connection that could not be opened — ``ConnectError``,
     ``ConnectTimeout``, ``PoolTimeout``), or the provider refused it before doing any work: an
     error status (4xx, 429, 5xx, 3xx) raised as ``openai.APIStatusError``, recorded as
     ``execution.failed`` with the status.

   The execution is marked dispatched before the first attempt leaves, so a process that dies
   mid-call leaves it to the TTL rule, which charges it in full.

Retries
   The SDK's own retries (``max_retries``) are kept for the failures that cost nothing: a
   connection that could not be opened and the error statuses the SDK retries (408, 409, 429,
   5xx); all its attempts are one call under one reservation, settled once. A request that may
   have been processed (a timeout or a lost connection after sending) is not sent again: the SDK
   raises ``openai.APITimeoutError`` / ``openai.APIConnectionError`` at once, and the call is
   charged in full. (With an SDK that does not send each attempt through ``_send_request``,
   older releases, aex cannot tell the attempts apart, and sends governed requests with
   ``max_retries=0``.)

Exactly once, on every exit path
   A stream settles when it is read to its end, when it is closed (``close()``, ``with``), when the
   provider cuts it, when reading it raises (``asyncio`` cancellation and ``wait_for`` included),
   and when it is garbage-collected unclosed. ``with`` or ``close()`` is the deterministic way:
   a stream left after ``break`` settles when the last reference to it goes (at once for the loop's
   own temporary, ``for chunk in client.chat.completions.create(..., stream=True): break``; when
   the variable goes out of scope if it was assigned; a stream from ``.parse()`` of a raw response
   when the cyclic garbage collector runs). Until then its reservation is held — with
   ``max_concurrent`` it holds the agent's slot. Settling never waits on the provider.
"""

from __future__ import annotations

import contextvars
import copy
import json
import re
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, Optional, TypeVar, cast
from urllib.parse import urlsplit

try:
    import openai
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("aex.integrations.openai needs the openai package: pip install 'aex[openai]'") from e

from .. import _aex
from .._kernel import Kernel
from ..errors import InvalidRequest, PolicyDenied

__all__ = ["guard"]

C = TypeVar("C", openai.OpenAI, openai.AsyncOpenAI)

# The governed request in progress in this thread or task (set by ``request()``, read by the
# per-attempt hooks the SDK calls inside it), and whether a ``request()`` is in progress at all.
_FLIGHT: contextvars.ContextVar[Optional["_Flight"]] = contextvars.ContextVar("aex_openai_flight", default=None)
_IN_REQUEST: contextvars.ContextVar[bool] = contextvars.ContextVar("aex_openai_in_request", default=False)

# ---- which requests run a model ---------------------------------------------------------------

_GOVERNED = (("chat/completions", "chat"), ("completions", "completions"), ("responses", "responses"), ("embeddings", "embeddings"))
_READS = {"get", "head", "options", "delete"}
# Requests that run no model: stored objects, and the free endpoints.
_FREE = re.compile(
    r"(^|/)(files|uploads|vector_stores|conversations|moderations)(/|$)"
    r"|(^|/)responses/input_tokens$|(^|/)responses/[^/]+/cancel$|(^|/)chat/completions/[^/]+$"
)


def _path(options: Any) -> str:
    return urlsplit(str(options.url)).path.strip("/")


def _kind_of(options: Any) -> Optional[str]:
    """The kind of model call a request is, or None for one that runs no model; refuses one that
    may spend but that aex cannot govern."""
    method = str(options.method).lower()
    path = _path(options)
    if method in _READS:
        return None
    if method == "post":
        for suffix, kind in _GOVERNED:
            if path == suffix or path.endswith("/" + suffix):
                return kind
    if _FREE.search(path):
        return None
    raise _not_governed(f"{method.upper()} /{path}")


def _not_governed(what: str) -> PolicyDenied:
    return PolicyDenied(
        f"{what}: aex cannot bound what this request spends, so a governed client does not send it "
        "(use an ungoverned client for it)",
        reason="endpoint_not_governed",
    )


# ---- admission: what is sent never asks for more than was reserved -----------------------------


def _omitted(value: Any) -> bool:
    """The OpenAI SDK's markers for an argument not given (``NOT_GIVEN``, ``omit``)."""
    return type(value).__name__ in ("NotGiven", "Omit")


def _invalid(field: str, rule: str) -> InvalidRequest:
    return InvalidRequest(f"{field}: {rule}", reason="invalid_request", field=field)


def _body_of(options: Any) -> dict[str, Any]:
    """The JSON body the SDK would send: the arguments with ``extra_body`` merged over them."""
    body: Any = options.json_data
    content = getattr(options, "content", None)
    if body is None and content is not None:
        if not isinstance(content, (bytes, bytearray, str)):
            raise _invalid("body", "a governed request must carry its body as JSON, not as a stream")
        body = content
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except ValueError:
            raise _invalid("body", "a governed request's body must be a JSON object") from None
    if not isinstance(body, Mapping):
        raise _invalid("body", "a governed request's body must be a JSON object")
    merged = dict(body)
    extra = getattr(options, "extra_json", None)
    if extra:
        merged.update(extra)
    return {k: v for k, v in merged.items() if not _omitted(v)}


def _prompt(prompt: Any) -> tuple[list[tuple[str, str]], Optional[int]]:
    """Legacy completions' ``prompt`` (text, texts, token ids, lists of token ids) as messages, or
    as a number of input tokens when it is token ids."""
    if isinstance(prompt, str):
        return [("user", prompt)], None
    items = list(prompt or [])
    if all(isinstance(p, str) for p in items):
        return [("user", p) for p in items], None
    if all(isinstance(p, int) for p in items):
        return [], len(items)
    return [], sum(len(p) if isinstance(p, list) else 1 for p in items)


def _admit(kernel: Kernel, token: str, kind: str, body: dict[str, Any]) -> _aex.Admission:
    """Admits the request ``body`` and rewrites it in place to ask for no more than was reserved."""
    for multiplier in ("n", "best_of"):
        if body.get(multiplier) not in (None, 1):
            raise _invalid(multiplier, f"must be 1 (got {body[multiplier]!r}): aex reserves for one completion per call")
    model = body.get("model")
    if not isinstance(model, str):
        raise _invalid("model", "the request must name its model")
    if kind == "responses" and body.get("background"):
        raise _invalid("background", "a background response is answered after aex could settle it: send it without background")
    if kind == "completions":
        messages, input_tokens = _prompt(body.get("prompt"))
        limit_key = "max_tokens"
        admission = kernel.admit_call(
            token, model, messages=messages, input_tokens=input_tokens, max_output_tokens=body.get(limit_key), stream=bool(body.get("stream"))
        )
    else:
        # The kernel reads the body as sent and counts everything billed as input (tool
        # definitions, schemas, tool calls, input items, token arrays).
        endpoint = {"chat": "chat", "responses": "responses", "embeddings": "embeddings"}[kind]
        admission = kernel.admit_body(token, endpoint, json.dumps(body, default=str))
        if kind == "embeddings":
            return admission
        limit_key = "max_output_tokens" if kind == "responses" else ("max_completion_tokens" if "max_completion_tokens" in body else "max_tokens")
    stream = bool(body.get("stream"))
    # The cap sent is the reservation's, whatever the caller asked (more, None, or nothing).
    cap_keys: list[str] = [k for k in ("max_tokens", "max_completion_tokens") if k in body] if kind == "chat" else []
    for key in cap_keys or [limit_key]:
        body[key] = admission.max_output_tokens
    if stream and kind in ("chat", "completions"):
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
    return admission


# ---- reading the answer -------------------------------------------------------------------------

class _Flight:
    """One governed request, from admission to settlement: it feeds the kernel's call object
    (``aex._aex.Call``), which alone decides how the call settles. Thread-safe."""

    def __init__(self, kernel: Kernel, kind: str, call: _aex.Call, per_attempt: bool) -> None:
        self.kernel = kernel
        self.kind = kind
        self.call = call
        self.execution_id = call.execution_id
        self.per_attempt = per_attempt  # the SDK tells aex about each attempt (see _send_request)
        self.dispatched = False
        self.reached = False
        self.attached = False
        self.complete = False
        self.sse = False
        self.buffer = bytearray()
        self.data: list[bytes] = []
        self.lock = threading.RLock()

    # -- what happened on the way --

    def before_send(self) -> None:
        """An attempt is about to be sent: from now on an expired reservation is charged in full."""
        if not self.dispatched:
            self.kernel.mark_dispatched(self.execution_id)
            self.dispatched = True

    def reached_provider(self) -> None:
        """The request may have reached the provider: from now on the call ends charged, unless
        the provider refused it before doing work."""
        with self.lock:
            if not self.reached and not self.call.ended:
                self.before_send()
                self.call.sent()
                self.reached = True

    # -- the answer --

    def attach(self, response: Any, tap: Any) -> None:
        """The provider answered 2xx: read its body as the SDK reads it."""
        self.attached = True
        self.reached_provider()
        ctype = str(response.headers.get("content-type", ""))
        self.sse = "event-stream" in ctype
        try:
            body = response.content  # read already (not a stream)
        except Exception:
            tapped = tap(response.stream, self)
            if tapped is None:
                self.end("interrupted", "aex cannot read this answer as it arrives")
            else:
                response.stream = tapped
            return
        self.feed(body)
        self.finished()

    def feed(self, chunk: bytes) -> None:
        """Bytes of the answer as they arrive."""
        with self.lock:
            if self.call.ended:
                return
            if not self.sse:
                self.buffer += chunk
                return
            self.buffer += chunk
            start = 0
            while (end := self.buffer.find(b"\n", start)) >= 0:
                self._line(bytes(self.buffer[start:end]).rstrip(b"\r"))
                start = end + 1
            del self.buffer[:start]

    def _line(self, line: bytes) -> None:
        if not line:
            self._event()
        elif line.startswith(b"data:"):
            data = line[5:]
            self.data.append(data[1:] if data.startswith(b" ") else data)

    def _event(self) -> None:
        data, self.data = b"\n".join(self.data), []
        if not data:
            return
        if data.startswith(b"[DONE]"):
            self.complete = True
            return
        self._observe(data)

    def _observe(self, data: bytes) -> None:
        """One body or event: the kernel reads its output and usage (an untrusted usage makes
        the call settle at its full reservation) and says whether it completes the answer."""
        whole = self.call.observe(data.decode("utf-8", "replace"), self.kind == "embeddings")
        self.complete = self.complete or whole

    # -- how it ended (each settles once; the first one wins) --

    def finished(self) -> None:
        """The body was read to its end."""
        with self.lock:
            if self.call.ended:
                return
            if self.sse:
                if self.buffer:
                    self._line(bytes(self.buffer).rstrip(b"\r"))
                    self.buffer.clear()
                self._event()
            elif self.buffer:
                body = bytes(self.buffer)
                self.buffer.clear()
                try:
                    value = json.loads(body)
                except ValueError:
                    value = None
                if isinstance(value, Mapping):
                    self._observe(body)
                    # A whole answer: its choices, output items or embeddings (an error object
                    # sent with a 2xx is not one).
                    self.complete = self.complete or any(isinstance(value.get(k), list) for k in ("choices", "output", "data"))
            if self.complete:
                self.end("completed")
            else:
                self.end("interrupted", "the answer ended before the provider said it was complete, or could not be read")

    def broken(self, error: BaseException) -> None:
        """Reading the body raised (the provider cut it, a timeout, a cancellation, ``break``)."""
        self.end("completed" if self.complete else "interrupted", f"reading the answer: {_describe(error)}")

    def closed(self, why: str = "closed before its end") -> None:
        self.end("completed" if self.complete else "interrupted", why)

    def raised(self, error: BaseException) -> None:
        """The SDK's ``request()`` raised."""
        if isinstance(error, openai.APIStatusError):
            # The provider answered with an error status: it refused before doing any work.
            self.reached_provider()
            self.end("failed", f"provider answered {error.status_code}: {_describe(error)}")
            return
        if not self.per_attempt and not _nothing_sent(error):
            self.reached_provider()
        self.end("interrupted", _describe(error))

    def returned(self, result: Any) -> Any:
        """The SDK's ``request()`` returned ``result``: hand it back, settled or settling."""
        if not self.attached:
            self.reached_provider()
            self.end("interrupted", "aex saw no answer to read")
        if isinstance(result, openai.Stream):
            return _GovernedStream(result, self)
        if isinstance(result, openai.AsyncStream):
            return _AsyncGovernedStream(result, self)
        return result

    def abandoned(self) -> None:
        """Collected unended (never raises: it runs from ``__del__``)."""
        try:
            self.closed("abandoned: collected before its end")
        except Exception:  # pragma: no cover - a store error: the TTL rule charges it in full
            pass

    def end(self, how: str, detail: str = "") -> None:
        with self.lock:
            if not self.call.ended:
                self.call.end(how, detail.encode()[:1000].decode(errors="ignore"))


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _names(error: BaseException) -> set[str]:
    return {c.__name__ for c in type(error).__mro__}


def _nothing_sent(error: BaseException) -> bool:
    """Whether an error proves the request was not sent: the connection could not be opened (the
    transport's own error, or the SDK's wrapping of it)."""
    while error is not None:
        if _names(error) & {"ConnectError", "ConnectTimeout", "PoolTimeout", "UnsupportedProtocol"}:
            return True
        if not isinstance(error, (openai.APIConnectionError,)):
            return False
        error = error.__cause__  # type: ignore[assignment]
    return False


def _in_doubt(error: BaseException, request: Any) -> BaseException:
    """What to raise for an attempt that may have reached the provider: an SDK error, which the
    SDK raises at once instead of sending the request again."""
    if not isinstance(error, Exception) or isinstance(error, openai.OpenAIError):
        return error
    if "TimeoutException" in _names(error) or isinstance(error, TimeoutError):
        wrapped: Exception = openai.APITimeoutError(request=request)
    else:
        wrapped = openai.APIConnectionError(request=request)
    return wrapped


# ---- the answer's bytes, read through aex -------------------------------------------------------

_TAPS: dict[type, type] = {}


def _base_named(stream: Any, name: str) -> Optional[type]:
    return next((c for c in type(stream).__mro__ if c.__name__ == name), None)


def _sync_tap(stream: Any, flight: _Flight) -> Any:
    """``stream`` (the HTTP response's byte stream) wrapped so that aex reads every byte the SDK
    reads, and learns when the body ends, breaks or is closed."""
    base = _base_named(stream, "SyncByteStream")
    if base is None:
        return None
    cls = _TAPS.get(base)
    if cls is None:

        def __init__(self: Any, inner: Any, flight: _Flight) -> None:
            self._inner = inner
            self._flight = flight

        def __iter__(self: Any) -> Iterator[bytes]:
            flight = self._flight
            try:
                for chunk in self._inner:
                    flight.feed(chunk)
                    yield chunk
            except BaseException as e:  # the provider cut it, a timeout, the consumer left
                flight.broken(e)
                raise
            flight.finished()

        def close(self: Any) -> None:
            try:
                self._inner.close()
            finally:
                self._flight.closed()

        def __del__(self: Any) -> None:
            flight = self.__dict__.get("_flight")
            if flight is not None:
                flight.abandoned()

        cls = type("AexTappedStream", (base,), {"__init__": __init__, "__iter__": __iter__, "close": close, "__del__": __del__})
        _TAPS[base] = cls
    return cls(stream, flight)


def _async_tap(stream: Any, flight: _Flight) -> Any:
    """The async twin of :func:`_sync_tap`."""
    base = _base_named(stream, "AsyncByteStream")
    if base is None:
        return None
    cls = _TAPS.get(base)
    if cls is None:

        def __init__(self: Any, inner: Any, flight: _Flight) -> None:
            self._inner = inner
            self._flight = flight

        async def __aiter__(self: Any) -> AsyncIterator[bytes]:
            flight = self._flight
            try:
                async for chunk in self._inner:
                    flight.feed(chunk)
                    yield chunk
            except BaseException as e:  # cut, timeout, cancellation, the consumer left
                flight.broken(e)
                raise
            flight.finished()

        async def aclose(self: Any) -> None:
            try:
                await self._inner.aclose()
            finally:
                self._flight.closed()

        def __del__(self: Any) -> None:
            flight = self.__dict__.get("_flight")
            if flight is not None:
                flight.abandoned()

        cls = type("AexTappedAsyncStream", (base,), {"__init__": __init__, "__aiter__": __aiter__, "aclose": aclose, "__del__": __del__})
        _TAPS[base] = cls
    return cls(stream, flight)


class _GovernedStream(openai.Stream):  # type: ignore[type-arg]
    """The SDK's stream, handed back in a wrapper that only the caller holds.

    The SDK's own stream refers to itself through its iterator, so it is freed only by the cyclic
    garbage collector; this wrapper is freed as soon as the caller drops it (``break`` out of the
    loop over it), and then closes the stream, which settles the call from what was read."""

    def __init__(self, inner: "openai.Stream[Any]", flight: _Flight) -> None:  # noqa: D107
        # No super().__init__(): the inner stream does the work.
        self._aex_inner = inner
        self._aex_flight = flight
        self.response = inner.response

    def __next__(self) -> Any:
        return self._aex_inner.__next__()

    def __iter__(self) -> Iterator[Any]:
        return self

    def close(self) -> None:
        try:
            self._aex_inner.close()
        finally:
            self._aex_flight.closed()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_aex_"):
            raise AttributeError(name)
        return getattr(self._aex_inner, name)

    def __del__(self) -> None:
        flight = self.__dict__.get("_aex_flight")
        if flight is None:
            return
        try:
            self._aex_inner.close()
        except Exception:  # pragma: no cover - closing a socket at collection
            pass
        flight.abandoned()


class _AsyncGovernedStream(openai.AsyncStream):  # type: ignore[type-arg]
    """The async twin of :class:`_GovernedStream` (collected unclosed, it settles the call; the
    connection is left to the HTTP client, as nothing can be awaited at collection)."""

    def __init__(self, inner: "openai.AsyncStream[Any]", flight: _Flight) -> None:  # noqa: D107
        self._aex_inner = inner
        self._aex_flight = flight
        self.response = inner.response

    async def __anext__(self) -> Any:
        return await self._aex_inner.__anext__()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def close(self) -> None:
        try:
            await self._aex_inner.close()
        finally:
            self._aex_flight.closed()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_aex_"):
            raise AttributeError(name)
        return getattr(self._aex_inner, name)

    def __del__(self) -> None:
        flight = self.__dict__.get("_aex_flight")
        if flight is not None:
            flight.abandoned()


# ---- the governed clients -----------------------------------------------------------------------


class _Governance:
    """Who a governed client calls for."""

    def __init__(self, kernel: Kernel, token: str) -> None:
        self.kernel = kernel
        self.token = token

    def admit(self, kind: str, options: Any, per_attempt: bool) -> tuple[_Flight, Any]:
        body = _body_of(options)
        admission = _admit(self.kernel, self.token, kind, body)
        try:
            call = self.kernel.call(admission.execution_id)
        except BaseException:
            self.kernel.release(admission.execution_id, "aex could not start the call")
            raise
        flight = _Flight(self.kernel, kind, call, per_attempt)
        options = copy.copy(options)
        options.json_data = body
        options.extra_json = None
        if getattr(options, "content", None) is not None:
            options.content = None
        if hasattr(options, "follow_redirects"):
            options.follow_redirects = False
        if not per_attempt:
            options.max_retries = 0  # without a per-attempt hook aex cannot tell a free retry from a costly one
        return flight, options


def _governance(client: Any) -> _Governance:
    governance = getattr(client, "_aex_governance", None)
    if not isinstance(governance, _Governance):
        raise RuntimeError("this client was not made by aex.integrations.openai.guard(): it sends nothing")
    return governance


def _sync_class(cls: type) -> type:
    """``cls`` (``openai.OpenAI`` or a subclass) with every request governed. Made by subclassing,
    so ``isinstance`` holds and the SDK's own ``copy()`` (``self.__class__(...)``) makes governed
    clients; one base only, so a client's class can be switched to it."""
    base: Any = cls
    # Whether the SDK sends each attempt through ``_send_request`` (it does since openai 2); without
    # it aex cannot tell a retry that costs nothing from one that may, so it turns retries off.
    per_attempt = callable(getattr(cls, "_send_request", None))

    class Governed(base):  # type: ignore[misc]
        _aex_governance: Optional[_Governance] = None

        def copy(self, *args: Any, **kwargs: Any) -> Any:
            copied = super().copy(*args, **kwargs)
            copied._aex_governance = self._aex_governance
            return copied

        with_options = copy

        def request(self, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
            kind = _kind_of(options)
            inside = _IN_REQUEST.set(True)
            try:
                if kind is None:
                    none = _FLIGHT.set(None)
                    try:
                        return super().request(cast_to, options, *args, **kwargs)
                    finally:
                        _FLIGHT.reset(none)
                flight, options = _governance(self).admit(kind, options, per_attempt)
                current = _FLIGHT.set(flight)
                try:
                    result = super().request(cast_to, options, *args, **kwargs)
                except BaseException as e:
                    flight.raised(e)
                    raise
                finally:
                    _FLIGHT.reset(current)
                return flight.returned(result)
            finally:
                _IN_REQUEST.reset(inside)

        def _send_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            """One attempt (the SDK's retries call it again)."""
            flight = _FLIGHT.get()
            if flight is None:
                return super()._send_request(request, *args, **kwargs)
            flight.before_send()
            try:
                response = super()._send_request(request, *args, **kwargs)
            except BaseException as e:
                if _nothing_sent(e):
                    raise  # the SDK may try again: that costs nothing
                flight.reached_provider()
                wrapped = _in_doubt(e, request)
                if wrapped is e:
                    raise
                raise wrapped from e
            if 200 <= response.status_code < 300:
                flight.reached_provider()
            return response

        def _process_response(self, **kwargs: Any) -> Any:
            flight = _FLIGHT.get()
            if flight is not None and not flight.attached and kwargs.get("response") is not None:
                flight.attach(kwargs["response"], _sync_tap)
            return super()._process_response(**kwargs)

        def _prepare_options(self, options: Any) -> Any:
            if not _IN_REQUEST.get():
                raise _not_governed(f"a WebSocket connection to /{_path(options)}")
            return super()._prepare_options(options)

    return Governed


def _async_class(cls: type) -> type:
    """The async twin of :func:`_sync_class`, for ``openai.AsyncOpenAI`` or a subclass."""
    base: Any = cls
    per_attempt = callable(getattr(cls, "_send_request", None))

    class Governed(base):  # type: ignore[misc]
        _aex_governance: Optional[_Governance] = None

        def copy(self, *args: Any, **kwargs: Any) -> Any:
            copied = super().copy(*args, **kwargs)
            copied._aex_governance = self._aex_governance
            return copied

        with_options = copy

        async def request(self, cast_to: Any, options: Any, *args: Any, **kwargs: Any) -> Any:
            kind = _kind_of(options)
            inside = _IN_REQUEST.set(True)
            try:
                if kind is None:
                    none = _FLIGHT.set(None)
                    try:
                        return await super().request(cast_to, options, *args, **kwargs)
                    finally:
                        _FLIGHT.reset(none)
                flight, options = _governance(self).admit(kind, options, per_attempt)
                current = _FLIGHT.set(flight)
                try:
                    result = await super().request(cast_to, options, *args, **kwargs)
                except BaseException as e:
                    flight.raised(e)
                    raise
                finally:
                    _FLIGHT.reset(current)
                return flight.returned(result)
            finally:
                _IN_REQUEST.reset(inside)

        async def _send_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
            flight = _FLIGHT.get()
            if flight is None:
                return await super()._send_request(request, *args, **kwargs)
            flight.before_send()
            try:
                response = await super()._send_request(request, *args, **kwargs)
            except BaseException as e:
                if _nothing_sent(e):
                    raise
                flight.reached_provider()
                wrapped = _in_doubt(e, request)
                if wrapped is e:
                    raise
                raise wrapped from e
            if 200 <= response.status_code < 300:
                flight.reached_provider()
            return response

        async def _process_response(self, **kwargs: Any) -> Any:
            flight = _FLIGHT.get()
            if flight is not None and not flight.attached and kwargs.get("response") is not None:
                flight.attach(kwargs["response"], _async_tap)
            return await super()._process_response(**kwargs)

        async def _prepare_options(self, options: Any) -> Any:
            if not _IN_REQUEST.get():
                raise _not_governed(f"a WebSocket connection to /{_path(options)}")
            return await super()._prepare_options(options)

    return Governed


_CLASSES: dict[type, type] = {}
_CLASSES_LOCK = threading.Lock()


def _governed_class(cls: type) -> type:
    if getattr(cls, "_aex_governed", False):
        return cls
    with _CLASSES_LOCK:
        governed = _CLASSES.get(cls)
        if governed is None:
            governed = _async_class(cls) if issubclass(cls, openai.AsyncOpenAI) else _sync_class(cls)
            governed.__name__ = governed.__qualname__ = cls.__name__
            governed.__module__ = __name__
            setattr(governed, "_aex_governed", True)
            _CLASSES[cls] = governed
        return governed


def guard(client: C, kernel: Kernel, token: str) -> C:
    """A copy of ``client`` whose model calls are governed by ``kernel`` for the agent ``token``
    (see the module docs). The copy shares the client's HTTP connection pool; ``client`` itself
    stays ungoverned."""
    if not isinstance(client, (openai.OpenAI, openai.AsyncOpenAI)):
        raise TypeError(f"guard() takes an openai.OpenAI or openai.AsyncOpenAI client, got {type(client).__name__}")
    governed = client.copy()
    governed.__class__ = _governed_class(type(client))
    cast(Any, governed)._aex_governance = _Governance(kernel, token)
    return governed
