"""Layered shutdown for ``run()``: the first SIGTERM/SIGINT is a warm stop, the second (or the
end of the grace period) a cold one.

Warm: stop reading, finish the batch in hand, settle it, leave the group. Cold: stop at once;
what is unacked stays pending (nothing is lost) and comes back after a restart or a reclaim.
Signal handlers are installed only for the duration of ``run()``, and only in the main thread.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

__all__ = ["SIGNALS", "StopNow", "graceful", "install_async_signals"]

log = logging.getLogger("conveyor.shutdown")

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopNow(BaseException):
    """Raised in the main thread by a second signal or the end of the grace period."""


@contextmanager
def graceful(name: str, stop: Callable[[], None], grace_period_ms: int) -> Iterator[None]:
    """Handle SIGTERM/SIGINT while the block runs (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signals_seen = 0
    timer: threading.Timer | None = None

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        nonlocal signals_seen, timer
        signals_seen += 1
        if signals_seen == 1:
            log.warning(
                "%s: %s received: finishing the batch in hand (grace period %d ms); "
                "signal again to stop at once",
                name,
                signal.Signals(signum).name,
                grace_period_ms,
            )
            stop()
            # A real signal to the main thread: it interrupts a handler blocked in a system
            # call, which _thread.interrupt_main() would only flag for later.
            main_id = threading.main_thread().ident
            assert main_id is not None
            timer = threading.Timer(
                grace_period_ms / 1000, signal.pthread_kill, (main_id, signal.SIGINT)
            )
            timer.daemon = True
            timer.start()
            return
        log.warning("%s: stopping at once; unacked messages stay pending", name)
        raise StopNow()

    previous: dict[int, Any] = {sig: signal.signal(sig, on_signal) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if timer is not None:
            timer.cancel()


def install_async_signals(
    loop: Any,
    name: str,
    stop: Callable[[], None],
    cancel_now: Callable[[], None],
    grace_period_ms: int,
) -> list[int]:
    """``graceful`` for an asyncio ``run()``: the first SIGTERM/SIGINT calls ``stop`` and, after
    the grace period, ``cancel_now``; a second calls ``cancel_now`` at once. Main thread only;
    returns the signals installed (remove them with ``loop.remove_signal_handler``)."""
    if threading.current_thread() is not threading.main_thread():
        return []
    seen = 0

    def on_signal() -> None:
        nonlocal seen
        seen += 1
        if seen == 1:
            log.warning(
                "%s: signal received: finishing the batch in hand (grace period %d ms); "
                "signal again to stop at once",
                name,
                grace_period_ms,
            )
            stop()
            loop.call_later(grace_period_ms / 1000, cancel_now)
        else:
            cancel_now()

    installed: list[int] = []
    for sig in SIGNALS:
        try:
            loop.add_signal_handler(sig, on_signal)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # not supported on this platform/loop
            pass
    return installed
