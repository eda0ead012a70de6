"""Govern an ``openai.OpenAI`` or ``openai.AsyncOpenAI`` client.

``guard(client, kernel, token)`` returns a copy of the client (the same class, every method
intact) whose ``chat.completions.create``, ``responses.create`` and ``embeddings.create`` admit
before the request is sent (a denial raises and nothing is sent), cap the output at what was
reserved when the caller set no limit, and settle from the response's ``usage``. Streaming
requests get ``stream_options.include_usage`` and settle when the stream ends or is closed early
(from the counted output, marked estimated, if the server sent no usage). A provider error
(429, 5xx, timeouts) settles the call as failed, returning its reservation, and propagates.

Install with ``pip install aex[openai]``.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from typing import Any, Callable, Optional, TypeVar

try:
    import openai
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("aex.integrations.openai needs the openai package: pip install 'aex[openai]'") from e

from .. import _aex
from .._inputs import usage_tokens
from .._kernel import Kernel

__all__ = ["guard"]

C = TypeVar("C", openai.OpenAI, openai.AsyncOpenAI)


class _Call:
    """One admitted request and how to settle it exactly once."""

    def __init__(self, kernel: Kernel, admission: _aex.Admission, model: str) -> None:
        self.kernel = kernel
        self.admission = admission
        self.model = model
        self.usage: Any = None
        self.text: list[str] = []
        self.done = False

    def settle(self, usage: Any = None) -> None:
        if self.done:
            return
        self.done = True
        usage = usage if usage is not None else self.usage
        eid = self.admission.execution_id
        if usage is not None:
            inp, out, cached = usage_tokens(usage)
            self.kernel.commit_tokens(eid, int(inp or 0), int(out or 0), int(cached or 0))
        else:
            counted = _aex.count_tokens(self.model, "".join(self.text))
            self.kernel.commit_estimated(eid, self.admission.input_tokens, counted)

    def failed(self, error: BaseException) -> None:
        if not self.done:
            self.done = True
            self.kernel.fail(self.admission.execution_id, f"{type(error).__name__}: {error}"[:1000])

    def observe(self, item: Any) -> None:
        """Picks usage and text out of a chat chunk or a Responses event."""
        usage = getattr(item, "usage", None)
        if usage is not None:
            self.usage = usage
        for choice in getattr(item, "choices", None) or []:
            delta = getattr(choice, "delta", None)
            content = getattr(delta, "content", None)
            if content:
                self.text.append(content)
        kind = getattr(item, "type", "")
        if kind == "response.output_text.delta":
            self.text.append(getattr(item, "delta", "") or "")
        elif kind == "response.completed":
            self.usage = getattr(getattr(item, "response", None), "usage", None) or self.usage


class GovernedStream:
    """A stream that settles its call when it ends or is closed; other attributes (``response``,
    ...) are the wrapped stream's."""

    def __init__(self, stream: Any, call: _Call) -> None:
        self._stream = stream
        self._call = call
        self._iter: Optional[Iterator[Any]] = None

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        if self._iter is None:
            self._iter = iter(self._stream)
        try:
            item = next(self._iter)
        except StopIteration:
            self._call.settle()
            raise
        except BaseException as e:
            self._call.failed(e)
            raise
        self._call.observe(item)
        return item

    def close(self) -> None:
        self._stream.close()
        self._call.settle()

    def __enter__(self) -> "GovernedStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class AsyncGovernedStream:
    """The async twin of :class:`GovernedStream`."""

    def __init__(self, stream: Any, call: _Call) -> None:
        self._stream = stream
        self._call = call
        self._iter: Optional[AsyncIterator[Any]] = None

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        if self._iter is None:
            self._iter = self._stream.__aiter__()
        try:
            item = await self._iter.__anext__()
        except StopAsyncIteration:
            self._call.settle()
            raise
        except BaseException as e:
            self._call.failed(e)
            raise
        self._call.observe(item)
        return item

    async def close(self) -> None:
        await self._stream.close()
        self._call.settle()

    async def __aenter__(self) -> "AsyncGovernedStream":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _omitted(value: Any) -> bool:
    """The OpenAI SDK's markers for an argument not given (``NOT_GIVEN``, ``omit``)."""
    return type(value).__name__ in ("NotGiven", "Omit")


def _admit(kernel: Kernel, token: str, kind: str, kwargs: dict[str, Any]) -> _Call:
    for key in [k for k, v in kwargs.items() if _omitted(v)]:
        del kwargs[key]
    for multiplier in ("n", "best_of"):
        if kwargs.get(multiplier) not in (None, 1):
            from ..errors import InvalidRequest

            raise InvalidRequest(
                f"{multiplier}: must be 1 (got {kwargs[multiplier]!r}): aex reserves for one completion per call",
                reason="invalid_request",
                field=multiplier,
            )
    model = kwargs.get("model")
    if not isinstance(model, str):
        raise TypeError("aex: the request must name its model")
    if kind == "embeddings":
        inputs = kwargs.get("input")
        texts = [inputs] if isinstance(inputs, str) else [t for t in (inputs or []) if isinstance(t, str)]
        admission = kernel.admit_call(token, model, messages=[("user", t) for t in texts], max_output_tokens=1)
        return _Call(kernel, admission, model)
    if kind == "responses":
        given = kwargs.get("input")
        messages = [("user", given)] if isinstance(given, str) else given
        if kwargs.get("instructions"):
            messages = [("system", kwargs["instructions"])] + list(messages or [])
        limit_key = "max_output_tokens"
    else:
        messages = kwargs.get("messages")
        limit_key = "max_completion_tokens" if "max_completion_tokens" in kwargs else "max_tokens"
    stream = bool(kwargs.get("stream"))
    admission = kernel.admit_call(
        token,
        model,
        messages=messages,
        max_output_tokens=kwargs.get(limit_key),
        tools=kwargs.get("tools") or kwargs.get("functions"),
        stream=stream,
    )
    # What is sent never asks for more than was reserved: the cap is the reservation's, whatever
    # the caller asked (more, None, or nothing).
    cap_keys: list[str] = [k for k in ("max_tokens", "max_completion_tokens") if k in kwargs] if kind == "chat" else []
    for key in cap_keys or [limit_key]:
        kwargs[key] = admission.max_output_tokens
    if stream and kind == "chat":
        kwargs["stream_options"] = {**(kwargs.get("stream_options") or {}), "include_usage": True}
    kernel.mark_dispatched(admission.execution_id)
    return _Call(kernel, admission, model)


def _settle_response(call: _Call, kind: str, result: Any) -> None:
    usage = getattr(result, "usage", None)
    if kind == "embeddings" and usage is not None:
        call.kernel.commit_tokens(call.admission.execution_id, int(usage.prompt_tokens), 0)
        call.done = True
    else:
        call.settle(usage)


def _sync_wrapper(original: Callable[..., Any], kernel: Kernel, token: str, kind: str) -> Callable[..., Any]:
    @functools.wraps(original)
    def create(*args: Any, **kwargs: Any) -> Any:
        call = _admit(kernel, token, kind, kwargs)
        try:
            result = original(*args, **kwargs)
        except BaseException as e:
            call.failed(e)
            raise
        if kwargs.get("stream"):
            return GovernedStream(result, call)
        _settle_response(call, kind, result)
        return result

    return create


def _async_wrapper(original: Callable[..., Any], kernel: Kernel, token: str, kind: str) -> Callable[..., Any]:
    @functools.wraps(original)
    async def create(*args: Any, **kwargs: Any) -> Any:
        call = _admit(kernel, token, kind, kwargs)
        try:
            result = await original(*args, **kwargs)
        except BaseException as e:
            call.failed(e)
            raise
        if kwargs.get("stream"):
            return AsyncGovernedStream(result, call)
        _settle_response(call, kind, result)
        return result

    return create


def guard(client: C, kernel: Kernel, token: str) -> C:
    """A copy of ``client`` whose model calls are governed by ``kernel`` for the agent ``token``."""
    governed = client.with_options()
    wrap = _async_wrapper if isinstance(client, openai.AsyncOpenAI) else _sync_wrapper
    for kind, resource in (
        ("chat", governed.chat.completions),
        ("responses", governed.responses),
        ("embeddings", governed.embeddings),
    ):
        setattr(resource, "create", wrap(resource.create, kernel, token, kind))
    return governed
