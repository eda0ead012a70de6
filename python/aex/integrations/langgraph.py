"""Govern every model call of a LangGraph graph, subgraphs included.

``govern(graph, kernel, token)`` returns the compiled graph bound to a config whose callbacks
include an :class:`~aex.integrations.langchain.AexCallbackHandler`; callbacks in a run's config
reach every nested run, so each node's model calls are admitted and settled. The sync handler
runs inline and serves ``invoke`` and ``ainvoke`` alike; ``agovern`` attaches the async twin
instead, for graphs whose nodes call their models with ``ainvoke`` (LangChain swallows an async
handler's errors when it is driven from a sync call, so a denial would not stop a sync node).

How each model call settles is the handler's (see :mod:`aex.integrations.langchain`): a graph run
that is cancelled or times out (``task.cancel()``, ``asyncio.wait_for``) while a node awaits its
model ends that call charged — the node's ``on_chain_error(CancelledError)`` reaches the handler
at once — and a node whose stream is left early is charged for the output it saw.
"""

from __future__ import annotations

from typing import Any, Optional

from .._kernel import Kernel
from .langchain import AexCallbackHandler, AsyncAexCallbackHandler

__all__ = ["govern", "agovern"]


def _bind(graph: Any, handler: Any) -> Any:
    return graph.with_config(callbacks=[handler])


def govern(graph: Any, kernel: Kernel, token: str, *, model: Optional[str] = None, max_output_tokens: Optional[int] = None) -> Any:
    """The graph with aex governing its model calls (sync runs)."""
    return _bind(graph, AexCallbackHandler(kernel, token, model=model, max_output_tokens=max_output_tokens))


def agovern(graph: Any, kernel: Kernel, token: str, *, model: Optional[str] = None, max_output_tokens: Optional[int] = None) -> Any:
    """The graph with aex governing its model calls (async runs)."""
    return _bind(graph, AsyncAexCallbackHandler(kernel, token, model=model, max_output_tokens=max_output_tokens))
