"""Govern LangChain chat and LLM models with a callback handler.

``AexCallbackHandler(kernel, token)`` admits every model call in ``on_chat_model_start`` /
``on_llm_start`` — from the model name and the invocation params (``max_tokens``, ``tools``,
``stream``, image parts) — and a denial raises there, before the provider is contacted
(``raise_error = True``; the sync handler runs inline). LangChain's ``run_id`` is the execution
id, so the same run can never be charged twice.

How a run settles is not decided here: each run holds the kernel's call object
(``aex._aex.Call``), and the handler only tells it what LangChain reports — the output streamed
(``on_llm_new_token``: text, and tool-call arguments), the provider's usage (``on_llm_end``:
``message.usage_metadata``, else ``llm_output["token_usage"]``), how the run ended. The call object
then applies the money rules: a call that may have reached the provider ends charged — at the
reported usage; without one, at the admitted input plus the output counted (text and tool-call
arguments), marked estimated; with nothing to count, at the full reservation, marked estimated.
It returns the reservation only when nothing was sent or the provider refused before doing work.

When is a run sent? The handler cannot see the wire, so **a run is treated as sent from its
start** (the model is called right after ``on_*_start``); the execution is marked dispatched then,
so even a crash mid-call ends charged (the reservation's TTL rule). Only these prove otherwise, and
return the reservation:

- **a refusal in the same batch**: ``generate([p1, p2, p3])`` admits every prompt before calling the
  model; when ``p3`` is denied (or its admission fails) the batch is aborted, so ``p1`` and ``p2``
  are released and the denial raised — with the async handler too, whose starts run concurrently
  (prompts after the denied one are refused as well);
- **a cache hit**: LangChain answers from its LLM cache (``set_llm_cache``) after the start and
  marks the cached message's ``usage_metadata`` with ``total_cost: 0``; such a run is released
  (for plain LLMs a cache hit never starts a run at all);
- **a provider status error before any output** (the error, or one it was raised from, has a
  ``status_code`` — or a ``response.status_code`` — from 300 to 599: 429, 5xx, 4xx): refused, the
  reservation returns and the failure is recorded;
- **a connection that was never made** (``httpx`` / ``httpcore`` ``ConnectError`` or
  ``ConnectTimeout``, ``urllib3``'s ``NewConnectionError``, ``ConnectionRefusedError``, in the
  error's ``__cause__`` chain, before any output): released.

Every other ending is charged: ``on_llm_end`` at the usage (or counted); ``on_llm_error`` with any
other error — a timeout, a ``GeneratorExit`` from leaving ``llm.stream()`` early, a
``CancelledError``, ``KeyboardInterrupt``, an error raised while reading the answer — as
interrupted (counted output, or the full reservation).

Every run settles exactly once, even when LangChain never reports its end: a cancelled
``ainvoke`` (``task.cancel()``, ``asyncio.wait_for``) sends no ``on_llm_error``. Two things end
such a run, as interrupted (charged: the output seen, or the full reservation):

- the calling chain's ``on_chain_error`` with a ``CancelledError`` (or another ``BaseException``
  that is not an ``Exception``: ``KeyboardInterrupt``, ``GeneratorExit``) ends the model runs it
  called that are still open — a LangGraph node, a ``RunnableSequence``; an ordinary exception
  does not, since a sibling branch may still be answering;
- a finalizer on the run id object: the handler keeps no reference to it, so when LangChain lets
  go of the run (at once when a cancelled task unwinds, else at the next garbage collection), a run
  still open ends. A model awaited directly (``llm.ainvoke`` with no chain around it) relies on
  this alone: if the application keeps the run id object alive (it passed
  ``config={"run_id": ...}`` and holds it, or a tracer keeps the unfinished run), the run settles
  when that reference goes, or at the latest when its reservation expires (charged in full, as it
  was dispatched).

In a sync ``generate`` over several prompts where one model call raises, LangChain reports the
error for that prompt only; the others end when collected, charged in full (in doubt), even those
the model was never called for.

Install with ``pip install aex[langchain]``.
"""

from __future__ import annotations

import copy
import json
import logging
import socket
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any, Optional
from uuid import UUID

try:
    from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
    from langchain_core.outputs import LLMResult
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("aex.integrations.langchain needs langchain-core: pip install 'aex[langchain]'") from e

from .. import _aex
from .._kernel import Kernel
from ..errors import AexError, InvalidRequest

__all__ = ["AexCallbackHandler", "AsyncAexCallbackHandler"]

_log = logging.getLogger(__name__)

# A count the kernel would refuse as out of range; the call object then distrusts the usage report
# and charges the full reservation.
_UNTRUSTED = -1
_MAX_COUNT = 1 << 62
# Batches whose starts are still being seen, at most this many at once (oldest forgotten first).
_MAX_BATCHES = 64


def _key(run_id: Any) -> Any:
    """The key a run is kept under: the id's value, never the id object, whose collection is how
    an abandoned run is noticed."""
    return run_id.int if isinstance(run_id, UUID) else str(run_id)


# ---- what LangChain's objects carry ------------------------------------------------------------


def _count(value: Any) -> int:
    """A token count as reported; anything that is not a whole number is untrusted."""
    if isinstance(value, bool):
        return _UNTRUSTED
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        return min(value, _MAX_COUNT)
    return _UNTRUSTED


def _usage_of(response: LLMResult) -> Optional[tuple[int, int, int]]:
    """(input, output, cached input) summed over the generations, or None when the model reported
    no usage."""
    total = [0, 0, 0]
    found = False
    for batch in response.generations:
        for gen in batch:
            meta = getattr(getattr(gen, "message", None), "usage_metadata", None)
            if not isinstance(meta, Mapping) or ("input_tokens" not in meta and "output_tokens" not in meta):
                continue
            found = True
            details = meta.get("input_token_details") or {}
            cached = details.get("cache_read") if isinstance(details, Mapping) else None
            for i, n in enumerate((_count(meta.get("input_tokens")), _count(meta.get("output_tokens")), _count(cached or 0))):
                total[i] = _UNTRUSTED if _UNTRUSTED in (n, total[i]) else total[i] + n
    if found:
        return total[0], total[1], total[2]
    token_usage = (response.llm_output or {}).get("token_usage") or {}
    if isinstance(token_usage, Mapping) and ("prompt_tokens" in token_usage or "completion_tokens" in token_usage):
        details = token_usage.get("prompt_tokens_details") or {}
        cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
        return _count(token_usage.get("prompt_tokens")), _count(token_usage.get("completion_tokens", 0)), _count(cached or 0)
    return None


def _content_text(content: Any) -> str:
    """The text of a message's content: a string, or the text (and reasoning) of its blocks."""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    if isinstance(content, list):
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, Mapping):
                parts.extend(block[f] for f in ("text", "thinking", "reasoning") if isinstance(block.get(f), str))
    return "".join(parts)


def _message_output(message: Any) -> str:
    """What a message (or a streamed chunk of one) carries that is billed as output: its text and
    its tool calls' arguments, each counted once."""
    parts = [_content_text(getattr(message, "content", None))]
    chunks = getattr(message, "tool_call_chunks", None)
    if chunks:  # a stream's fragments (or a merged stream's whole arguments)
        parts.extend(c.get("args") or "" for c in chunks if isinstance(c, Mapping))
        return "".join(p for p in parts if isinstance(p, str))
    extra = getattr(message, "additional_kwargs", None) or {}
    raw: list[Any] = []  # the provider's own argument strings, where the integration keeps them
    call = extra.get("function_call")
    if isinstance(call, Mapping):
        raw.append(call.get("arguments"))
    for tc in extra.get("tool_calls") or []:
        function = tc.get("function") if isinstance(tc, Mapping) else None
        if isinstance(function, Mapping):
            raw.append(function.get("arguments"))
    raw = [r for r in raw if isinstance(r, str)]
    if raw:
        parts.extend(raw)
    else:
        for tc in getattr(message, "tool_calls", None) or []:
            parts.append(json.dumps(tc.get("args") or {}, ensure_ascii=False, default=str))
        for tc in getattr(message, "invalid_tool_calls", None) or []:
            parts.append(tc.get("args") or "")
    return "".join(p for p in parts if isinstance(p, str))


def _generation_output(gen: Any) -> str:
    message = getattr(gen, "message", None)
    if message is not None:
        return _message_output(message)
    text = getattr(gen, "text", "")
    return text if isinstance(text, str) else ""


def _from_cache(response: LLMResult) -> bool:
    """Whether every generation came from LangChain's LLM cache, which zeroes the cost of what it
    replays (``usage_metadata["total_cost"] = 0``; a provider's usage never has that field)."""
    gens = [g for batch in response.generations for g in batch]

    def cached(gen: Any) -> bool:
        meta = getattr(getattr(gen, "message", None), "usage_metadata", None)
        return isinstance(meta, Mapping) and "total_cost" in meta and meta["total_cost"] == 0

    return bool(gens) and all(cached(g) for g in gens)


def _causes(error: BaseException) -> Iterator[BaseException]:
    """The error and those it was raised from (``raise ... from``), nearest first."""
    seen: set[int] = set()
    e: Optional[BaseException] = error
    while e is not None and id(e) not in seen and len(seen) < 16:
        seen.add(id(e))
        yield e
        e = e.__cause__


def _provider_status(error: BaseException) -> Optional[int]:
    """The HTTP status a provider answered with, as the SDKs' errors carry it."""
    for e in _causes(error):
        for holder in (e, getattr(e, "response", None)):
            status = getattr(holder, "status_code", None)
            if isinstance(status, int) and not isinstance(status, bool):
                return status
    return None


# Errors that mean the connection was never made, so no request was written: (package, class).
_NEVER_CONNECTED = {
    ("httpx", "ConnectError"),
    ("httpx", "ConnectTimeout"),
    ("httpcore", "ConnectError"),
    ("httpcore", "ConnectTimeout"),
    ("urllib3", "NewConnectionError"),
    ("aiohttp", "ClientConnectorError"),
}


def _never_connected(error: BaseException) -> bool:
    for e in _causes(error):
        if isinstance(e, (ConnectionRefusedError, socket.gaierror)):
            return True
        for cls in type(e).__mro__:
            # The package name without a version suffix (some SDKs vendor ``httpx2``).
            if (cls.__module__.partition(".")[0].rstrip("0123456789"), cls.__name__) in _NEVER_CONNECTED:
                return True
    return False


# ---- the runs ----------------------------------------------------------------------------------


class _Run:
    """One admitted model run: the kernel's call object and what the handler knows of it."""

    __slots__ = ("call", "execution_id", "parent", "streamed", "finalizer")

    def __init__(self, call: _aex.Call, execution_id: str, parent: Any) -> None:
        self.call = call
        self.execution_id = execution_id
        self.parent = parent  # the key of the chain run that called the model, if any
        self.streamed = False  # output arrived through on_llm_new_token
        self.finalizer: Optional[weakref.finalize[..., Any]] = None


class _Batch:
    """The runs LangChain starts together for one ``generate`` over several prompts: it admits every
    prompt, then calls the model. Known by the invocation-params dict all its starts share."""

    __slots__ = ("params", "size", "seen", "keys", "error")

    def __init__(self, params: dict[str, Any], size: int) -> None:
        self.params = params  # held, so its id cannot be reused while the batch is remembered
        self.size = size
        self.seen = 0
        self.keys: list[Any] = []
        self.error: Optional[BaseException] = None


class _Governor:
    """The logic both handlers share; the kernel calls are microseconds, so they run inline.

    Runs live in a dict keyed by the run id's value; taking one out (``dict.pop``, atomic under the
    GIL) is what entitles a path to end it, so the callbacks, another thread and a finalizer never
    end a run twice, and the finalizer takes no lock.
    """

    def __init__(self, kernel: Kernel, token: str, *, model: Optional[str] = None, max_output_tokens: Optional[int] = None) -> None:
        self.kernel = kernel
        self._token = token
        self._model = model
        self._max_output_tokens = max_output_tokens
        self._runs: dict[Any, _Run] = {}
        self._batches: OrderedDict[int, _Batch] = OrderedDict()
        self._lock = threading.Lock()  # guards _batches
        self._warned = False

    def _model_name(self, params: dict[str, Any], metadata: Optional[dict[str, Any]]) -> str:
        name = self._model or params.get("model") or params.get("model_name") or (metadata or {}).get("ls_model_name")
        if not name:
            raise ValueError("aex: cannot tell which model is called; pass model= to the handler")
        return str(name)

    def _maybe_warn(self, serialized: Optional[dict[str, Any]], params: dict[str, Any], stream: bool) -> None:
        if self._warned or not stream or not serialized:
            return
        kwargs = serialized.get("kwargs") or {}
        custom_base = kwargs.get("openai_api_base") or kwargs.get("base_url") or params.get("openai_api_base")
        is_openai = "ChatOpenAI" in str(serialized.get("id") or serialized.get("name") or "")
        if is_openai and custom_base and not (kwargs.get("stream_usage") or params.get("stream_usage")):
            self._warned = True
            warnings.warn(
                "aex: a ChatOpenAI with a custom base URL does not report usage when streaming unless "
                "stream_usage=True; aex will settle such calls from counted output, marked estimated.",
                RuntimeWarning,
                stacklevel=3,
            )

    # -- start ------------------------------------------------------------------------------------

    def start(self, serialized: Optional[dict[str, Any]], messages: Any, run_id: UUID, parent_run_id: Optional[UUID],
              metadata: Optional[dict[str, Any]], kwargs: dict[str, Any]) -> None:
        params = kwargs.get("invocation_params") or {}
        batch = self._join_batch(params, kwargs.get("batch_size"))
        if batch is not None and batch.error is not None:
            raise _again(batch.error)  # a prompt before this one was refused: the batch is off
        key = _key(run_id)
        try:
            model = self._model_name(params, metadata)
            max_tokens = params.get("max_tokens") or params.get("max_completion_tokens") or (metadata or {}).get("ls_max_tokens")
            stream = bool(params.get("stream") or params.get("streaming"))
            self._maybe_warn(serialized, params, stream)
            for multiplier in ("n", "best_of"):
                if params.get(multiplier) not in (None, 1):
                    raise InvalidRequest(
                        f"{multiplier}: must be 1 (got {params[multiplier]!r}): aex reserves for one completion per call",
                        reason="invalid_request", field=multiplier,
                    )
            admission = self.kernel.admit_call(
                self._token,
                model,
                messages=messages,
                max_output_tokens=max_tokens or self._max_output_tokens,
                tools=params.get("tools") or params.get("functions"),
                response_format=params.get("response_format"),
                stream=stream,
                execution_id=str(run_id),
            )
            if isinstance(max_tokens, int) and max_tokens > admission.max_output_tokens and not admission.replayed:
                # The handler cannot change what the model sends: asking for more output than
                # was reserved is refused, never sent.
                _quietly(self.kernel.release, admission.execution_id, "not sent: max_tokens above the reservation")
                raise InvalidRequest(
                    f"max_tokens: {max_tokens} is above the {admission.max_output_tokens} output tokens aex reserves for "
                    f"'{model}' (its max_output_tokens): lower it", reason="invalid_request", field="max_tokens",
                )
        except BaseException as e:
            if batch is not None:
                self._abort(batch, e)
            raise
        if admission.replayed and key in self._runs:
            return  # the same start again: that run is already held
        try:
            parent = None if parent_run_id is None else _key(parent_run_id)
            run = _Run(self.kernel.call(admission.execution_id), admission.execution_id, parent)
        except BaseException as e:
            if not admission.replayed:  # never sent: give the reservation back
                _quietly(self.kernel.release, admission.execution_id, f"not sent: {type(e).__name__}")
            if batch is not None:
                self._abort(batch, e)
            raise
        try:
            run.finalizer = weakref.finalize(run_id, self._abandoned, key)
        except TypeError:  # not weak-referenceable: such a run settles at its callbacks, or its TTL
            pass
        self._runs[key] = run
        if batch is None:
            self._dispatch([run])
        else:
            self._admitted(batch, key)

    def _join_batch(self, params: Any, size: Any) -> Optional[_Batch]:
        """The batch this start belongs to (counting it), or None for a single run."""
        if not isinstance(params, dict) or not isinstance(size, int) or size < 2:
            return None
        with self._lock:
            batch = self._batches.get(id(params))
            if batch is None or batch.params is not params:
                batch = self._batches[id(params)] = _Batch(params, size)
                while len(self._batches) > _MAX_BATCHES:
                    self._batches.popitem(last=False)
            batch.seen += 1
            if batch.seen >= batch.size:
                self._batches.pop(id(params), None)  # every start seen: nothing more will join
            return batch

    def _admitted(self, batch: _Batch, key: Any) -> None:
        with self._lock:
            refused = batch.error
            if refused is None:
                batch.keys.append(key)
            keys = list(batch.keys) if refused is None and batch.seen >= batch.size else []
        if refused is not None:  # another prompt was refused meanwhile, on another thread
            run = self._runs.pop(key, None)
            if run is not None:
                self._end(run, "interrupted", "not sent: another prompt of the batch was refused", sent=False, quiet=True)
            raise _again(refused)
        if not keys:
            return
        # Every prompt is admitted: the model is called next.
        self._dispatch([run for run in (self._runs.get(k) for k in keys) if run is not None])

    def _abort(self, batch: _Batch, error: BaseException) -> None:
        """A start of the batch failed, so LangChain calls the model for none of its prompts: the
        runs admitted so far were never sent."""
        with self._lock:
            if batch.error is None:
                batch.error = _again(error)  # kept without its traceback, to refuse later prompts
            keys, batch.keys = batch.keys, []
        for k in keys:
            run = self._runs.pop(k, None)
            if run is not None:
                self._end(run, "interrupted", f"not sent: another prompt of the batch was refused ({type(error).__name__})", sent=False, quiet=True)

    def _dispatch(self, runs: list[_Run]) -> None:
        """Records in the store that the runs leave for the provider, so a crash or a lost
        settlement ends them charged in full at the TTL."""
        for run in runs:
            try:
                self.kernel.mark_dispatched(run.execution_id)
            except AexError as e:  # settled meanwhile, or the store is busy: the call object decides
                _log.debug("aex: could not mark %s dispatched: %s", run.execution_id, e)

    # -- what the run reports ---------------------------------------------------------------------

    def token(self, token: Any, chunk: Any, run_id: UUID) -> None:
        run = self._runs.get(_key(run_id))
        if run is None:
            return
        message = getattr(chunk, "message", None)
        if message is not None:
            text = _message_output(message)
        elif chunk is not None:
            text = getattr(chunk, "text", "") or ""
        else:
            text = _content_text(token)
        run.streamed = True
        try:
            run.call.sent()
            if text:
                run.call.output(text)
        except AexError:  # ended meanwhile by another path
            pass

    def end(self, response: LLMResult, run_id: UUID) -> None:
        run = self._runs.pop(_key(run_id), None)
        if run is None:
            return
        try:
            cached = not run.streamed and _from_cache(response)
            usage = None if cached else _usage_of(response)
            if usage is not None:
                run.call.reported(*usage)
            elif not run.streamed and not cached:
                run.call.output("".join(_generation_output(g) for batch in response.generations for g in batch))
        except BaseException as e:  # a response aex cannot read: the answer came, so it is charged
            self._end(run, "interrupted", f"unreadable response ({type(e).__name__})", quiet=True)
            raise
        if cached:
            self._end(run, "interrupted", "not sent: answered from the LLM cache", sent=False)
        else:
            self._end(run, "completed")

    def error(self, error: BaseException, run_id: UUID) -> None:
        run = self._runs.pop(_key(run_id), None)
        if run is None:
            return
        if isinstance(error, Exception) and not run.streamed:
            status = _provider_status(error)
            if status is not None and 300 <= status < 600:
                self._end(run, "refused", status=status, quiet=True)
                return
            if _never_connected(error):
                self._end(run, "failed", f"not sent: the connection failed ({type(error).__name__})", sent=False, quiet=True)
                return
        self._end(run, "interrupted", f"{type(error).__name__} before the answer ended", quiet=True)

    def chain_error(self, error: BaseException, run_id: UUID) -> None:
        """A chain (a graph node, a sequence) was cancelled or interrupted: the model runs it was
        awaiting will report nothing more (LangChain sends no ``on_llm_error`` to a cancelled
        ``ainvoke``). Other errors leave its runs alone: a sibling may still be answering."""
        if isinstance(error, Exception):
            return
        parent = _key(run_id)
        for key, run in list(self._runs.items()):
            if run.parent == parent and self._runs.pop(key, None) is run:
                self._end(run, "interrupted", f"{type(error).__name__} in the calling chain", quiet=True)

    def _abandoned(self, key: Any) -> None:
        """The run id was collected with the run still open: LangChain will report nothing more
        (a cancelled task, an abandoned run). Runs inside garbage collection: never raises."""
        run = self._runs.pop(key, None)
        if run is not None:
            self._end(run, "interrupted", "abandoned: the run ended without a callback (cancelled or collected)", quiet=True)

    def _end(self, run: _Run, how: str, detail: str = "", status: int = 0, *, sent: bool = True, quiet: bool = False) -> None:
        """Ends the call: ``sent`` unless this ending proves the request never left. ``quiet`` logs
        a settlement error instead of raising it (on an error path, or in a finalizer, where
        raising would hide the original error or go nowhere); the TTL rule then charges it."""
        if run.finalizer is not None:
            run.finalizer.detach()
        try:
            if sent:
                run.call.sent()
            run.call.end(how, detail, status)
        except Exception as e:
            if not quiet:
                raise
            _log.warning("aex: could not settle execution %s (%s); it settles when its reservation expires", run.execution_id, e)


def _quietly(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as e:
        _log.warning("aex: %s", e)


def _again(error: BaseException) -> BaseException:
    """The batch's refusal, raised again for a later prompt of the batch (a copy, so the original's
    traceback stays its own)."""
    try:
        return copy.copy(error)
    except Exception:
        return error


class AexCallbackHandler(BaseCallbackHandler):
    """Governs every LangChain model call it sees. Pass it in ``callbacks=[...]`` of a model, a
    chain or a graph's config. ``model=`` overrides the model name (for models that do not
    report one); ``max_output_tokens=`` is used when a call sets no ``max_tokens``."""

    raise_error = True
    run_inline = True

    def __init__(self, kernel: Kernel, token: str, *, model: Optional[str] = None, max_output_tokens: Optional[int] = None) -> None:
        super().__init__()
        self.governor = _Governor(kernel, token, model=model, max_output_tokens=max_output_tokens)

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]], *, run_id: UUID,
                            parent_run_id: Optional[UUID] = None, tags: Optional[list[str]] = None,
                            metadata: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self.governor.start(serialized, [m for batch in messages for m in batch], run_id, parent_run_id, metadata, kwargs)

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                     parent_run_id: Optional[UUID] = None, tags: Optional[list[str]] = None,
                     metadata: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self.governor.start(serialized, [("user", p) for p in prompts], run_id, parent_run_id, metadata, kwargs)

    def on_llm_new_token(self, token: Any, *, chunk: Any = None, run_id: UUID, parent_run_id: Optional[UUID] = None,
                         tags: Optional[list[str]] = None, **kwargs: Any) -> None:
        self.governor.token(token, chunk, run_id)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, parent_run_id: Optional[UUID] = None, **kwargs: Any) -> None:
        self.governor.end(response, run_id)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, parent_run_id: Optional[UUID] = None, **kwargs: Any) -> None:
        self.governor.error(error, run_id)

    def on_chain_error(self, error: BaseException, *, run_id: UUID, parent_run_id: Optional[UUID] = None, **kwargs: Any) -> None:
        self.governor.chain_error(error, run_id)


class AsyncAexCallbackHandler(AsyncCallbackHandler):
    """The async twin of :class:`AexCallbackHandler`, for ``ainvoke`` / ``astream``."""

    raise_error = True

    def __init__(self, kernel: Kernel, token: str, *, model: Optional[str] = None, max_output_tokens: Optional[int] = None) -> None:
        super().__init__()
        self.governor = _Governor(kernel, token, model=model, max_output_tokens=max_output_tokens)

    async def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]], *, run_id: UUID,
                                  parent_run_id: Optional[UUID] = None, tags: Optional[list[str]] = None,
                                  metadata: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self.governor.start(serialized, [m for batch in messages for m in batch], run_id, parent_run_id, metadata, kwargs)

    async def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                           parent_run_id: Optional[UUID] = None, tags: Optional[list[str]] = None,
                           metadata: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self.governor.start(serialized, [("user", p) for p in prompts], run_id, parent_run_id, metadata, kwargs)

    async def on_llm_new_token(self, token: Any, *, chunk: Any = None, run_id: UUID, parent_run_id: Optional[UUID] = None,
                               tags: Optional[list[str]] = None, **kwargs: Any) -> None:
        self.governor.token(token, chunk, run_id)

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, parent_run_id: Optional[UUID] = None, **kwargs: Any) -> None:
        self.governor.end(response, run_id)

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, parent_run_id: Optional[UUID] = None, **kwargs: Any) -> None:
        self.governor.error(error, run_id)

    async def on_chain_error(self, error: BaseException, *, run_id: UUID, parent_run_id: Optional[UUID] = None,
                             tags: Optional[list[str]] = None, **kwargs: Any) -> None:
        self.governor.chain_error(error, run_id)
