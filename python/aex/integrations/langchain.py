"""Govern LangChain chat and LLM models with a callback handler.

``AexCallbackHandler(kernel, token)`` admits every model call in ``on_chat_model_start`` /
``on_llm_start`` — from the model name and the invocation params (``max_tokens``, ``tools``,
``stream``, image parts) — and a denial raises there, before the provider is contacted
(``raise_error = True``; the sync handler runs inline). It settles in ``on_llm_end`` from
``message.usage_metadata`` (falling back to ``llm_output["token_usage"]``); when the model
reports no usage (a stream without usage), it settles from the counted output and marks the
settlement estimated in the ledger, never below the admitted input. ``on_llm_error`` releases.
LangChain's ``run_id`` is the execution id, so the same run can never be charged twice.

Install with ``pip install aex[langchain]``.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Optional
from uuid import UUID

try:
    from langchain_core.callbacks import AsyncCallbackHandler, BaseCallbackHandler
    from langchain_core.outputs import LLMResult
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("aex.integrations.langchain needs langchain-core: pip install 'aex[langchain]'") from e

from .. import _aex
from .._kernel import Kernel

__all__ = ["AexCallbackHandler", "AsyncAexCallbackHandler"]


def _usage_of(response: LLMResult) -> Optional[dict[str, int]]:
    """Summed usage over the generations, or None when the model reported none."""
    total: dict[str, int] = {"input_tokens": 0, "output_tokens": 0, "cached_input_tokens": 0}
    found = False
    for batch in response.generations:
        for gen in batch:
            meta = getattr(getattr(gen, "message", None), "usage_metadata", None)
            if meta:
                found = True
                total["input_tokens"] += int(meta.get("input_tokens", 0))
                total["output_tokens"] += int(meta.get("output_tokens", 0))
                total["cached_input_tokens"] += int((meta.get("input_token_details") or {}).get("cache_read", 0) or 0)
    if found:
        return total
    token_usage = (response.llm_output or {}).get("token_usage") or {}
    if "prompt_tokens" in token_usage or "completion_tokens" in token_usage:
        details = token_usage.get("prompt_tokens_details") or {}
        return {
            "input_tokens": int(token_usage.get("prompt_tokens", 0)),
            "output_tokens": int(token_usage.get("completion_tokens", 0)),
            "cached_input_tokens": int(details.get("cached_tokens", 0) or 0),
        }
    return None


def _text_of(response: LLMResult) -> str:
    return "".join(getattr(g, "text", "") or "" for batch in response.generations for g in batch)


class _Governor:
    """The logic both handlers share; the kernel calls are microseconds, so they run inline."""

    def __init__(self, kernel: Kernel, token: str, *, model: Optional[str] = None, max_output_tokens: Optional[int] = None) -> None:
        self.kernel = kernel
        self._token = token
        self._model = model
        self._max_output_tokens = max_output_tokens
        self._runs: dict[UUID, tuple[_aex.Admission, str]] = {}
        self._lock = threading.Lock()
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

    def start(self, serialized: Optional[dict[str, Any]], messages: Any, run_id: UUID, metadata: Optional[dict[str, Any]], kwargs: dict[str, Any]) -> None:
        params = kwargs.get("invocation_params") or {}
        model = self._model_name(params, metadata)
        max_tokens = params.get("max_tokens") or params.get("max_completion_tokens") or (metadata or {}).get("ls_max_tokens")
        stream = bool(params.get("stream") or params.get("streaming"))
        self._maybe_warn(serialized, params, stream)
        admission = self.kernel.admit_call(
            self._token,
            model,
            messages=messages,
            max_output_tokens=max_tokens or self._max_output_tokens,
            tools=params.get("tools") or params.get("functions"),
            stream=stream,
            execution_id=str(run_id),
        )
        with self._lock:
            self._runs[run_id] = (admission, model)

    def end(self, response: LLMResult, run_id: UUID) -> None:
        with self._lock:
            run = self._runs.pop(run_id, None)
        if run is None:
            return
        admission, model = run
        usage = _usage_of(response)
        if usage is not None:
            self.kernel.commit(admission.execution_id, usage)
        else:
            counted = _aex.count_tokens(model, _text_of(response))
            self.kernel.commit_estimated(admission.execution_id, admission.input_tokens, counted)

    def error(self, error: BaseException, run_id: UUID) -> None:
        with self._lock:
            run = self._runs.pop(run_id, None)
        if run is not None:
            self.kernel.release(run[0].execution_id, f"error: {type(error).__name__}")


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
        self.governor.start(serialized, [m for batch in messages for m in batch], run_id, metadata, kwargs)

    def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                     parent_run_id: Optional[UUID] = None, tags: Optional[list[str]] = None,
                     metadata: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self.governor.start(serialized, [("user", p) for p in prompts], run_id, metadata, kwargs)

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, parent_run_id: Optional[UUID] = None, **kwargs: Any) -> None:
        self.governor.end(response, run_id)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, parent_run_id: Optional[UUID] = None, **kwargs: Any) -> None:
        self.governor.error(error, run_id)


class AsyncAexCallbackHandler(AsyncCallbackHandler):
    """The async twin of :class:`AexCallbackHandler`, for ``ainvoke`` / ``astream``."""

    raise_error = True

    def __init__(self, kernel: Kernel, token: str, *, model: Optional[str] = None, max_output_tokens: Optional[int] = None) -> None:
        super().__init__()
        self.governor = _Governor(kernel, token, model=model, max_output_tokens=max_output_tokens)

    async def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]], *, run_id: UUID,
                                  parent_run_id: Optional[UUID] = None, tags: Optional[list[str]] = None,
                                  metadata: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self.governor.start(serialized, [m for batch in messages for m in batch], run_id, metadata, kwargs)

    async def on_llm_start(self, serialized: dict[str, Any], prompts: list[str], *, run_id: UUID,
                           parent_run_id: Optional[UUID] = None, tags: Optional[list[str]] = None,
                           metadata: Optional[dict[str, Any]] = None, **kwargs: Any) -> None:
        self.governor.start(serialized, [("user", p) for p in prompts], run_id, metadata, kwargs)

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, parent_run_id: Optional[UUID] = None, **kwargs: Any) -> None:
        self.governor.end(response, run_id)

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, parent_run_id: Optional[UUID] = None, **kwargs: Any) -> None:
        self.governor.error(error, run_id)
