"""Turning what callers have — OpenAI / LangChain messages and usage objects — into what the
kernel takes. No rules live here: only the shapes of other libraries' objects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _invalid(rule: str) -> Exception:
    from .errors import InvalidRequest

    return InvalidRequest(f"messages: {rule}", reason="invalid_request", field="messages")


_ROLES = {"human": "user", "ai": "assistant", "system": "system", "tool": "tool", "function": "function"}


def openai_messages(messages: Any) -> list[dict[str, Any]]:
    """OpenAI-style message dicts from OpenAI dicts, LangChain message objects or (role, text)
    pairs — everything each carries that a provider bills as input (content and its parts, tool
    calls, names, tool call ids). The kernel counts them (and refuses malformed content, naming
    the field)."""
    if messages is None:
        return []
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, (list, tuple)):
        raise _invalid(f"must be a list of messages, got {type(messages).__name__}")
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if isinstance(m, (tuple, list)) and len(m) == 2 and isinstance(m[0], str):
            out.append({"role": m[0], "content": m[1]})
        elif isinstance(m, Mapping):
            out.append(dict(m))
        elif isinstance(m, (str, bytes)) or not hasattr(m, "content"):
            raise _invalid(f"item {i} must be a message (a dict, a (role, text) pair or a message object), got {type(m).__name__}")
        else:  # a LangChain message
            kind = _get(m, "type")
            role = _get(m, "role") if kind == "chat" else _ROLES.get(str(kind), str(kind or "user"))
            message: dict[str, Any] = {"role": role, "content": _get(m, "content")}
            for key in ("tool_calls", "tool_call_id", "name"):
                value = _get(m, key)
                if value:
                    message[key] = value
            function_call = (_get(m, "additional_kwargs") or {}).get("function_call")
            if function_call:
                message["function_call"] = function_call
            out.append(message)
    return out


def usage_tokens(usage: Any) -> tuple[Any, Any, Any]:
    """(input, output, cached input) tokens from an OpenAI ``CompletionUsage`` or Responses
    ``ResponseUsage``, a LangChain ``usage_metadata`` dict, or a plain dict."""
    if usage is None:
        raise TypeError("usage is None")
    inp = _get(usage, "input_tokens")
    out = _get(usage, "output_tokens")
    cached: Optional[Any] = None
    if inp is None and out is None:  # Chat Completions
        inp = _get(usage, "prompt_tokens")
        out = _get(usage, "completion_tokens")
        details = _get(usage, "prompt_tokens_details")
        cached = _get(details, "cached_tokens") if details is not None else None
    else:  # Responses API or LangChain
        details = _get(usage, "input_tokens_details")
        if details is not None:
            cached = _get(details, "cached_tokens")
        lc = _get(usage, "input_token_details")
        if lc is not None:
            cached = _get(lc, "cache_read")
    return inp, out, cached or 0
