"""The exceptions aex raises: one per status of the error table, rooted at :class:`AexError`.

Every exception carries ``status`` (the same number as the C ABI's status), a stable
``reason`` code, and the denial's data where it has any. They pickle, so they cross
``multiprocessing`` boundaries intact.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any, Optional

__all__ = [
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

_MICRO = Decimal(1_000_000)


class AexError(Exception):
    """Base of every aex error.

    Attributes: ``status`` (int), ``reason`` (str), ``message`` (str), and, where they apply,
    ``field``, ``needed_micro``, ``remaining_micro``, ``team``, ``retry_after_ms``, ``limit``.
    """

    status: int = 500

    def __init__(
        self,
        message: str = "",
        *,
        status: Optional[int] = None,
        reason: str = "",
        field: Optional[str] = None,
        needed_micro: Optional[int] = None,
        remaining_micro: Optional[int] = None,
        team: Optional[str] = None,
        retry_after_ms: Optional[int] = None,
        limit: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.reason = reason
        self.field = field
        self.needed_micro = needed_micro
        self.remaining_micro = remaining_micro
        self.team = team
        self.retry_after_ms = retry_after_ms
        self.limit = limit
        # Set by governed calls (``kernel.chat`` and friends) that failed after an attempt was
        # admitted: that attempt's execution id and its settlement (what the failure cost).
        self.execution_id: Optional[str] = None
        self.settlement: Optional[Any] = None

    @property
    def needed_usd(self) -> Optional[Decimal]:
        """For a 402, the reservation asked for, in USD (exact)."""
        return None if self.needed_micro is None else Decimal(self.needed_micro) / _MICRO

    @property
    def remaining_usd(self) -> Optional[Decimal]:
        """For a 402, what remained of the budget, in USD (exact; negative after an overrun)."""
        return None if self.remaining_micro is None else Decimal(self.remaining_micro) / _MICRO

    @property
    def retry_after(self) -> Optional[float]:
        """For a 429, seconds until the window has room."""
        return None if self.retry_after_ms is None else self.retry_after_ms / 1000.0

    def _data(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "field": self.field,
            "needed_micro": self.needed_micro,
            "remaining_micro": self.remaining_micro,
            "team": self.team,
            "retry_after_ms": self.retry_after_ms,
            "limit": self.limit,
        }

    def __reduce__(self) -> Any:
        return (_rebuild, (type(self), self.message, self._data()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.status}, reason={self.reason!r})"


def _rebuild(cls: type[AexError], message: str, data: dict[str, Any]) -> AexError:
    return cls(message, **data)


class InvalidRequest(AexError, ValueError):
    """400: malformed input; ``field`` names the argument and the message the rule."""

    status = 400


class Unauthenticated(AexError):
    """401: unknown, expired, revoked or disabled token."""

    status = 401


class InsufficientBudget(AexError):
    """402: the reservation does not fit; see ``needed_usd`` and ``remaining_usd`` (and ``team``)."""

    status = 402


class PolicyDenied(AexError):
    """403: a policy rule denied the request; ``reason`` names it."""

    status = 403


class NotFound(AexError, LookupError):
    """404: no such agent, team or execution."""

    status = 404


class Conflict(AexError):
    """409: idempotency conflict, invalid state transition, or name taken."""

    status = 409


class RateLimited(AexError):
    """429: a rate window is full; see ``retry_after`` (seconds) and ``limit``."""

    status = 429


class Internal(AexError):
    """500: a bug in aex."""

    status = 500


class Unavailable(AexError):
    """503: the store is busy beyond its timeout or an I/O operation failed; or, with ``reason``
    ``"tampered"``, the database was changed behind aex's back in a way that grants power, and
    ``field`` names the column or setting."""

    status = 503
