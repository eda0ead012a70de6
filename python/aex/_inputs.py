"""Turning what callers have — OpenAI / LangChain messages and usage objects — into what the
kernel takes. No rules live here: only the shapes of other libraries' objects."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

_IMAGE_PARTS = {"image_url", "input_image", "image"}


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(name)
    return getattr(obj, name, None)


def _part_text(part: Any) -> tuple[str, bool]:
    """The text of one content part, and whether it is an image."""
    if isinstance(part, str):
        return part, False
    kind = _get(part, "type")
    if kind in _IMAGE_PARTS:
        return "", True
    text = _get(part, "text")
    return (text if isinstance(text, str) else ""), False


def _invalid(rule: str) -> Exception:
    from .errors import InvalidRequest

    return InvalidRequest(f"messages: {rule}", reason="invalid_request", field="messages")


def normalize_messages(messages: Any) -> tuple[list[tuple[str, str]], bool]:
    """(role, text) pairs from OpenAI-style dicts, LangChain messages or (role, text) tuples,
    and whether any message carries an image."""
    if messages is None:
        return [], False
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, (list, tuple)):
        raise _invalid(f"must be a list of messages, got {type(messages).__name__}")
    out: list[tuple[str, str]] = []
    has_image = False
    for i, m in enumerate(messages):
        if isinstance(m, (tuple, list)) and len(m) == 2 and isinstance(m[0], str):
            role, content = m[0], m[1]
        elif isinstance(m, (str, bytes)) or not (isinstance(m, Mapping) or hasattr(m, "content")):
            raise _invalid(f"item {i} must be a message (a dict, a (role, text) pair or a message object), got {type(m).__name__}")
        else:
            role = _get(m, "role") or _get(m, "type") or "user"
            content = _get(m, "content")
        if isinstance(content, str):
            text = content
        elif content is None:
            text = ""
        else:
            texts = []
            for part in content:
                t, image = _part_text(part)
                texts.append(t)
                has_image = has_image or image
            text = "\n".join(t for t in texts if t)
        tool_calls = _get(m, "tool_calls")
        if tool_calls:
            text += str(tool_calls)
        out.append((str(role), text))
    return out, has_image


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
