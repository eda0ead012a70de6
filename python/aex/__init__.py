"""aex: an embeddable governance kernel for AI agents.

Before an LLM call leaves the process, aex authenticates the agent's token, checks policy and
rate windows, and reserves budget; after the call it settles the real cost exactly once, and it
records every decision in a hash-chained ledger that :meth:`Kernel.audit` verifies.

>>> import aex
>>> kernel = aex.Kernel("agents.db", config="models.yaml")          # doctest: +SKIP
>>> token = kernel.create_agent("atlas", budget_usd="5.00", rpm=30)   # doctest: +SKIP
>>> with kernel.guard(token, "gpt-4o-mini", messages=msgs, max_output_tokens=256) as call:  # doctest: +SKIP
...     reply = my_llm(msgs)
...     call.commit(reply.usage)
"""

from ._aex import Admission, Settlement, __version__, check_config, format_usd, usd_to_micro
from ._kernel import Guard, Kernel, default_home
from .errors import (
    AexError,
    Conflict,
    InsufficientBudget,
    Internal,
    InvalidRequest,
    NotFound,
    PolicyDenied,
    RateLimited,
    Unauthenticated,
    Unavailable,
)

__all__ = [
    "__version__",
    "Kernel",
    "Guard",
    "Admission",
    "Settlement",
    "default_home",
    "check_config",
    "format_usd",
    "usd_to_micro",
    "AexError",
    "InvalidRequest",
    "Unauthenticated",
    "InsufficientBudget",
    "PolicyDenied",
    "NotFound",
    "Conflict",
    "RateLimited",
    "Internal",
    "Unavailable",
]
