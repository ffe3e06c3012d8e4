"""Decisions as pure functions of the data: backoff, dead-lettering, liveness.

No I/O and no clock: callers pass ``now_ms``.
"""

from __future__ import annotations

__all__ = [
    "heartbeat_timeout_ms",
    "is_overdue",
    "reconnect_delay_ms",
    "retry_delay_ms",
    "should_dead_letter",
]


def retry_delay_ms(deliveries: int, base_ms: int, cap_ms: int) -> int:
    """How long a failed message waits before its next delivery: exponential in the
    deliveries so far, capped.

    >>> [retry_delay_ms(d, 1000, 30_000) for d in (1, 2, 3, 6, 9)]
    [1000, 2000, 4000, 30000, 30000]
    """
    if deliveries <= 1:
        return min(base_ms, cap_ms)
    return min(cap_ms, base_ms << min(deliveries - 1, 32))


def should_dead_letter(deliveries: int, max_deliveries: int) -> bool:
    """A message that failed on its ``max_deliveries``-th delivery is given up on.

    >>> should_dead_letter(2, 3), should_dead_letter(3, 3)
    (False, True)
    """
    return deliveries >= max_deliveries


def is_overdue(deliveries: int, max_deliveries: int) -> bool:
    """Delivered more often than allowed without being settled (its consumers crashed on it):
    dead-letter it without handing it out again, so a message that kills its consumer cannot
    loop forever.

    >>> is_overdue(3, 3), is_overdue(4, 3)
    (False, True)
    """
    return deliveries > max_deliveries


def heartbeat_timeout_ms(heartbeat_ms: int) -> int:
    """A consumer whose last heartbeat is older than this is dead: three missed beats."""
    return 3 * heartbeat_ms


def reconnect_delay_ms(attempt: int, base_ms: int = 100, cap_ms: int = 5_000) -> int:
    """Backoff between reconnection attempts (attempt 1, 2, ...).

    >>> [reconnect_delay_ms(a) for a in (1, 2, 3, 10)]
    [100, 200, 400, 5000]
    """
    return min(cap_ms, base_ms << min(max(attempt - 1, 0), 32))
