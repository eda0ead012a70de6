"""The Python face of the kernel: :class:`Kernel` and its guarded-call context manager."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Optional, Union, cast

from . import _aex
from ._inputs import openai_messages, usage_tokens
from .errors import InvalidRequest

__all__ = ["Kernel", "Guard", "default_home", "make_private_dir"]


def _json_default(value: Any) -> Any:
    """JSON for what message objects carry besides plain data (pydantic models, ...)."""
    for method in ("model_dump", "dict", "to_dict"):
        if callable(getattr(value, method, None)):
            return getattr(value, method)()
    return str(value)


def default_home() -> Path:
    """Where ``Kernel.open()`` and the ``aex`` command keep their files: ``$AEX_HOME`` or
    ``~/.aex``."""
    return Path(os.environ.get("AEX_HOME") or Path.home() / ".aex")


def is_database_url(db: str) -> bool:
    """Whether ``db`` names a PostgreSQL database (``postgresql://…`` or ``postgres://…``) rather
    than a SQLite file."""
    return db.startswith(("postgresql://", "postgres://"))


def shown(db: str) -> str:
    """``db`` as it may be printed: a URL's password replaced by ``***``."""
    if not is_database_url(db):
        return db
    scheme, rest = db.split("://", 1)
    auth, at, place = rest.rpartition("@")
    if at and ":" in auth:
        auth = auth.split(":", 1)[0] + ":***"
    return f"{scheme}://{auth}{at}{place}"


def make_private_dir(path: Path) -> None:
    """Creates ``path`` (and its parents) if missing; ``path`` itself as 0700, whatever the umask."""
    if not path.is_dir():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)


class Kernel(_aex.Kernel):
    """A governance kernel over one SQLite database file.

    ``Kernel(path, config="models.yaml")`` opens (creating if needed) the database. Safe to share
    between threads; store work runs with the GIL released. After ``os.fork()`` open a new
    kernel in the child (a SQLite connection must not cross a fork); with ``multiprocessing``,
    open one in each worker.
    """

    def __new__(cls, path: Union[str, "os.PathLike[str]"], **kwargs: Any) -> "Kernel":
        # A path-like is accepted wherever a path is (``pathlib.Path`` included).
        return cast("Kernel", super().__new__(cls, os.fspath(path), **kwargs))

    @classmethod
    def open(cls, home: Union[str, os.PathLike[str], None] = None, **kwargs: Any) -> "Kernel":
        """Opens ``~/.aex/aex.db`` (or ``home``/aex.db), with ``models.yaml`` beside it if present.
        Without ``home``, ``$AEX_DB`` names the database when set: a file, or a
        ``postgresql://`` URL for a fleet (the config is then ``~/.aex/models.yaml``, if present).
        A directory it creates is private (0700); an existing one is left as it is (see
        ``warnings()``)."""
        base = Path(home) if home is not None else default_home()
        db = os.environ.get("AEX_DB") if home is None else None
        if db and not is_database_url(db):
            base = Path(db).parent
        if not (db and is_database_url(db)):
            make_private_dir(base)
        config = base / "models.yaml"
        if "config" not in kwargs and "config_yaml" not in kwargs and config.exists():
            kwargs["config"] = str(config)
        return cls(db or str(base / "aex.db"), **kwargs)

    def admit_call(
        self,
        token: str,
        model: str,
        *,
        messages: Any = None,
        input_tokens: Optional[int] = None,
        max_output_tokens: Optional[int] = None,
        tools: Any = None,
        response_format: Any = None,
        stream: bool = False,
        vision: Optional[bool] = None,
        execution_id: Optional[str] = None,
    ) -> _aex.Admission:
        """Admits a call described the way OpenAI / LangChain callers have it: ``messages`` as
        dicts, message objects or (role, text) pairs; ``tools`` as the list of tool definitions
        sent (``True`` when only their presence is known); ``response_format`` as sent. The
        kernel counts everything the provider bills as input — message content and parts, tool
        calls in the history, tool definitions, the schema — and notes images (``vision``
        overrides that)."""
        body: dict[str, Any] = {"model": model, "messages": openai_messages(messages), "stream": bool(stream)}
        if max_output_tokens is not None:
            body["max_tokens"] = max_output_tokens
        if isinstance(tools, (list, tuple)):
            if tools:
                body["tools"] = list(tools)
        elif tools:
            body["tools"] = [{"type": "function"}]  # tools are used; their definitions unknown here
        if response_format is not None:
            body["response_format"] = response_format
        try:
            text = json.dumps(body, default=_json_default)
        except ValueError as e:
            raise InvalidRequest(f"messages: cannot be read as JSON ({e})", reason="invalid_request", field="messages") from None
        return self.admit_body(token, "chat", text, execution_id=execution_id, input_tokens=input_tokens, vision=vision)

    def commit(
        self,
        execution_id: str,
        usage: Any = None,
        *,
        input_tokens: Optional[int] = None,
        output_tokens: Optional[int] = None,
        cached_input_tokens: Optional[int] = None,
    ) -> _aex.Settlement:
        """Settles at the real usage: an OpenAI usage object, a LangChain ``usage_metadata``
        dict, or the token counts as keywords."""
        if usage is not None:
            input_tokens, output_tokens, cached_input_tokens = usage_tokens(usage)
        # A missing count reaches the kernel as None and is refused there with InvalidRequest.
        return self.commit_tokens(execution_id, cast(int, input_tokens), cast(int, output_tokens), cached_input_tokens)

    # ---- governed provider calls (aex sends the request) ------------------------------------

    def chat(self, token: str, *, passthrough_key: Optional[str] = None, execution_id: Optional[str] = None, **body: Any) -> dict[str, Any]:
        """One governed chat completion: ``body`` is the OpenAI request (``model``, ``messages``,
        ``max_tokens``, ...). aex admits it, sends it to the model's provider (with the reserved
        ``max_tokens`` when none is given), settles from the usage, and returns the provider's
        response as a dict. ``passthrough_key`` is the agent's own provider key (never recorded)."""
        return self._call("chat", token, body, passthrough_key, execution_id)

    def responses(self, token: str, *, passthrough_key: Optional[str] = None, execution_id: Optional[str] = None, **body: Any) -> dict[str, Any]:
        """As :meth:`chat`, for the Responses API."""
        return self._call("responses", token, body, passthrough_key, execution_id)

    def embeddings(self, token: str, *, passthrough_key: Optional[str] = None, execution_id: Optional[str] = None, **body: Any) -> dict[str, Any]:
        """As :meth:`chat`, for embeddings."""
        return self._call("embeddings", token, body, passthrough_key, execution_id)

    def _call(
        self,
        endpoint: str,
        token: str,
        body: dict[str, Any],
        key: Optional[str],
        execution_id: Optional[str],
        cancel: Optional[_aex.Cancel] = None,
    ) -> dict[str, Any]:
        raw = self.call_provider(token, endpoint, json.dumps(body), passthrough_key=key, execution_id=execution_id, cancel=cancel)
        result: dict[str, Any] = json.loads(raw)
        return result

    def chat_stream(self, token: str, *, passthrough_key: Optional[str] = None, execution_id: Optional[str] = None, **body: Any) -> Iterator[dict[str, Any]]:
        """A governed streaming chat completion: yields the provider's chunks as dicts as they
        arrive. Closing the iterator early (``close()``, ``break``, an exception, Ctrl-C) stops
        the stream at once, without waiting for the provider's next chunk; the call is settled
        either way (from the usage chunk, or from the counted output, marked estimated)."""
        body["stream"] = True
        items: "queue.Queue[Any]" = queue.Queue()
        pump = _Pump(self, token, "chat", body, passthrough_key, execution_id, items.put)
        try:
            while (item := items.get()) is not _END:
                yield json.loads(item)
            pump.raise_error()
        finally:
            pump.stop()

    async def achat(self, token: str, *, passthrough_key: Optional[str] = None, execution_id: Optional[str] = None, **body: Any) -> dict[str, Any]:
        """The async twin of :meth:`chat` (the blocking call runs in a worker thread). Cancelling
        the task cancels the call at once; it is settled by the money rules before the
        cancellation propagates."""
        cancel = _aex.Cancel()
        task = asyncio.ensure_future(asyncio.to_thread(self._call, "chat", token, body, passthrough_key, execution_id, cancel))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            cancel.cancel()
            with contextlib.suppress(BaseException):
                await task  # returns at once now, with the call settled
            raise

    async def achat_stream(self, token: str, *, passthrough_key: Optional[str] = None, execution_id: Optional[str] = None, **body: Any) -> AsyncIterator[dict[str, Any]]:
        """The async twin of :meth:`chat_stream`: leaving it early (``break`` then ``aclose()``,
        cancelling the task, a timeout) stops the stream at once."""
        loop = asyncio.get_running_loop()
        items: "asyncio.Queue[Any]" = asyncio.Queue()

        def put(item: Any) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody is reading
                loop.call_soon_threadsafe(items.put_nowait, item)

        body["stream"] = True
        pump = _Pump(self, token, "chat", body, passthrough_key, execution_id, put)
        try:
            while (item := await items.get()) is not _END:
                yield json.loads(item)
            pump.raise_error()
        finally:
            pump.stop()

    def guard(self, token: str, model: str, **request: Any) -> "Guard":
        """A context manager around one call: admits on enter (a denial raises before the body
        runs), settles on a clean exit, releases on an exception (which propagates)."""
        return Guard(self, token, model, request)


_END = object()


class _Pump:
    """One governed stream running on a worker thread, each payload handed to ``sink`` as it
    arrives and ``_END`` after the last. :meth:`stop` cancels it wherever it waits (the call
    settles by the money rules) and returns once it has settled."""

    def __init__(
        self,
        kernel: Kernel,
        token: str,
        endpoint: str,
        body: dict[str, Any],
        key: Optional[str],
        execution_id: Optional[str],
        sink: Callable[[Any], None],
    ) -> None:
        self.cancel = _aex.Cancel()
        self.error: Optional[BaseException] = None
        request = json.dumps(body)

        def on_chunk(data: str) -> bool:
            sink(data)
            return not self.cancel.cancelled

        def run() -> None:
            try:
                kernel.stream_provider(token, endpoint, request, on_chunk, passthrough_key=key, execution_id=execution_id, cancel=self.cancel)
            except BaseException as e:  # handed to the consumer
                self.error = e
            finally:
                sink(_END)

        self.thread = threading.Thread(target=run, name="aex-stream", daemon=True)
        self.thread.start()

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.cancel.cancel()
        self.thread.join()


class Guard:
    """One guarded call. Use with ``with`` or ``async with``; a guard admits one call.

    Inside the block call :meth:`dispatched` when the request leaves for the provider, and
    :meth:`commit` with the provider's usage. How the call settles is decided by the kernel's call
    object (``aex._aex.Call``) from what the guard tells it, by the money rules:

    - :meth:`commit` with usage charges that usage; with none (the provider reported nothing),
      the output counted through :meth:`output`, or else the full reservation, marked estimated;
    - :meth:`fail` returns the reservation (the provider failed before doing any work);
    - a clean exit without either charges the full reservation (never under-charged);
    - an exception releases the reservation if the call was never :meth:`dispatched`, and charges
      it (counted output, or the full reservation) if it was: it may have reached the provider;
    - a guard garbage-collected without exiting settles like an exception.

    A settlement made outside the guard (``kernel.commit`` / ``kernel.fail`` on its execution id)
    stands, and the guard's exit reports it instead of raising.
    """

    __slots__ = ("_kernel", "_token", "_model", "_request", "_call", "_fed", "admission", "settlement")

    def __init__(self, kernel: Kernel, token: str, model: str, request: dict[str, Any]) -> None:
        self._kernel = kernel
        self._token = token
        self._model = model
        self._request = request
        self._call: Optional[_aex.Call] = None
        self._fed = False
        self.admission: Optional[_aex.Admission] = None
        self.settlement: Optional[_aex.Settlement] = None

    def _admitted(self) -> _aex.Call:
        if self._call is None:
            raise RuntimeError("the guard has not been entered")
        return self._call

    @property
    def execution_id(self) -> str:
        if self.admission is None:
            raise RuntimeError("the guard has not been entered")
        return self.admission.execution_id

    @property
    def max_output_tokens(self) -> int:
        """The output cap reserved for: pass it to the provider as ``max_tokens``."""
        if self.admission is None:
            raise RuntimeError("the guard has not been entered")
        return self.admission.max_output_tokens

    def __enter__(self) -> "Guard":
        if self.admission is not None:
            raise RuntimeError("a guard admits one call: make a new guard for the next one")
        request = self._request
        if "messages" in request or "tools" in request or "vision" in request:
            self.admission = self._kernel.admit_call(self._token, self._model, **request)
        else:  # the fast path: nothing to normalize
            self.admission = self._kernel.admit(self._token, self._model, **request)
        self._call = self._kernel.call(self.admission.execution_id)
        return self

    def dispatched(self) -> None:
        """Records that the call left the process: from now on it ends charged (an expired
        reservation is charged in full, and an exception no longer releases it)."""
        call = self._admitted()
        self._kernel.mark_dispatched(self.execution_id)
        call.sent()

    def output(self, text: str) -> None:
        """Output the provider produced (text, tool-call arguments), counted if no usage comes."""
        self._admitted().output(text)
        self._fed = True

    def commit(
        self,
        usage: Any = None,
        *,
        input_tokens: Optional[int] = None,
        output_tokens: Optional[int] = None,
        cached_input_tokens: Optional[int] = None,
    ) -> _aex.Settlement:
        """Settles the call: at the provider's usage (an OpenAI usage object, a LangChain
        ``usage_metadata`` dict, or the counts as keywords); with none, estimated (see the class
        docs)."""
        call = self._admitted()
        call.sent()  # a call with an answer to settle reached the provider
        if usage is not None:
            input_tokens, output_tokens, cached_input_tokens = usage_tokens(usage)
        if input_tokens is None and output_tokens is None:
            # No usage: the counted output if there is some, else the full reservation.
            return self._end("completed" if self._fed else "interrupted", "the provider reported no usage")
        # A missing or malformed count is refused here (InvalidRequest naming it); the call stays
        # open, and the guard's exit then charges it in full.
        call.reported(cast(int, input_tokens), cast(int, output_tokens), cached_input_tokens)
        return self._end("completed")

    def fail(self, error: str = "") -> _aex.Settlement:
        """The provider failed before doing any work (an error response): the reservation returns."""
        self._admitted()
        return self._end("failed", error or "failed")

    def _end(self, how: str, detail: str = "") -> _aex.Settlement:
        call = self._admitted()
        if self.settlement is not None:
            return self.settlement
        self.settlement, _ = call.end(how, detail)
        return self.settlement

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        if self._call is None or self.settlement is not None or self._call.ended:
            return None
        if exc_type is None:
            self._call.sent()  # the block ran to its end: the call was made
            self._end("interrupted", "the block ended without a usage report")
        else:
            self._end("interrupted", f"exception: {exc_type.__name__}")
        return None

    async def __aenter__(self) -> "Guard":
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.__exit__(exc_type, exc, tb)
