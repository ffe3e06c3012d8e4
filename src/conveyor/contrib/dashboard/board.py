"""Board: what the dashboard shows and does, with no HTTP in it.

A view (``BoardDict``) holds, per stream, its ``Monitor`` snapshot in the documented shape
(``SnapshotDict``: the stream, its groups, their consumers), the verdict on the whole stream
and on each group, and its dead letters (``DeadLetters.count()`` and the newest few). Views
are shared: however many pages poll, the server is asked at most once per ``max_age_s``.

The actions are the library's own: ``DeadLetters.replay()`` and ``DeadLetters.purge()`` on
every entry of a stream's dead-letter stream, ``Monitor.cleanup()`` on its groups.

A server that cannot be reached gives a view with ``reachable`` False and the error, not an
exception: the page shows it, and a later view finds the server back. No error text holds a
password of the URL (``secrets`` are scrubbed from it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Sequence
from typing import Any, TypedDict

from redis.exceptions import (
    ClusterError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor import _io
from conveyor._core import commands as cmd
from conveyor._core import status
from conveyor.config import check_int
from conveyor.deadletter import DeadLetters
from conveyor.errors import ConfigError, ConnectionLost, ConveyorError
from conveyor.models import DeadLetter, HealthDict, SnapshotDict
from conveyor.monitor import Monitor

__all__ = [
    "VIEW_VERSION",
    "Board",
    "BoardDict",
    "DeadLettersDict",
    "StreamViewDict",
]

log = logging.getLogger("conveyor.dashboard")

#: the version of the view's shape (``BoardDict``)
VIEW_VERSION = 1
#: the newest dead letters shown per stream
NEWEST_DEAD_LETTERS = 10
#: a field value or error longer than this is cut in a view (the page is not a data browser)
SHOWN_CHARS = 200
#: fields shown per dead letter
SHOWN_FIELDS = 20
#: what a server that cannot be reached now raises (as ``conveyor.cli._wait.is_outage`` reads
#: it): the whole view says so instead of one error per stream
_OUTAGES = (
    ConnectionLost,
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,
    TryAgainError,
    RedisClusterException,
    OSError,
)
#: what makes one stream unreadable (gone, a key of another type, refused by an ACL)
_FAILURES = (ConveyorError, RedisError)


class DeadLettersDict(TypedDict):
    """A stream's dead letters: the dead-letter stream's key, how many entries it holds and
    the newest ones (newest first, long values cut); ``error`` when it could not be read."""

    stream: str
    count: int | None
    newest: list[dict[str, Any]]
    error: str | None


class StreamViewDict(TypedDict):
    """One stream: its snapshot (None when it could not be read, with ``error`` saying why),
    the verdict on it and on each of its groups, its dead letters."""

    name: str
    error: str | None
    health: HealthDict
    group_health: dict[str, HealthDict]
    snapshot: SnapshotDict | None
    dead_letters: DeadLettersDict | None


class BoardDict(TypedDict):
    """Every stream of the board at one moment; ``reachable`` False (with ``error``) when the
    server could not be reached, and then no streams. ``taken_ms``: when the view was made,
    by this machine's clock (rates use each snapshot's ``time_ms``, the server's)."""

    version: int
    server: str
    reachable: bool
    error: str | None
    taken_ms: int
    streams: list[StreamViewDict]


class Board:
    """The streams a dashboard shows, their views and the actions on them.

    ``group``: only this group of each stream (default: every group). ``server``: how the
    server is named in views (a URL without its password); ``secrets``: text never to show
    (the URL's passwords). ``dead_letter``: the dead-letter stream, when the consumers were
    given ``dead_letter=NAME`` (shown for every stream; default: each stream's own).
    ``monitor_options`` go to each ``Monitor`` (``batch_size``,
    ``idle_time_ms_warning_threshold``, ``heartbeat_ms``, ``max_lag``).

    >>> board = Board(r, ["orders"], group="billing", server=shown_url)  # doctest: +SKIP
    >>> board.view()["streams"][0]["snapshot"]["groups"][0]["lag"]   # doctest: +SKIP
    0
    >>> board.replay("orders")["replayed"]                            # doctest: +SKIP
    3
    """

    def __init__(
        self,
        client: Any,
        streams: Sequence[str],
        group: str | None = None,
        *,
        server: str = "",
        secrets: Collection[str] = (),
        max_age_s: float = 1.0,
        dead_letters_shown: int = NEWEST_DEAD_LETTERS,
        dead_letter: str | None = None,
        **monitor_options: Any,
    ) -> None:
        if isinstance(streams, str) or not streams:
            raise ConfigError(f"streams must be a list of stream names, got {streams!r}")
        if not isinstance(max_age_s, int | float) or max_age_s < 0:
            raise ConfigError(f"max_age_s must be a number of seconds >= 0, got {max_age_s!r}")
        check_int("dead_letters_shown", dead_letters_shown, 1, 1000)
        self.client = client
        self.streams = tuple(dict.fromkeys(streams))
        self.group = group
        self.server = server
        self.secrets = tuple(s for s in secrets if s)
        self.max_age_s = float(max_age_s)
        self.dead_letters_shown = dead_letters_shown
        self._monitor_options = monitor_options
        self._monitors = {s: Monitor(client, s, group, **monitor_options) for s in self.streams}
        self._dead = {s: DeadLetters(client, s, dead_letter=dead_letter) for s in self.streams}
        #: one collection at a time; pages that poll meanwhile get its view
        self._lock = threading.Lock()
        self._latest: BoardDict | None = None
        self._taken = 0.0
        self._unreachable = False

    def __repr__(self) -> str:
        return f"<Board streams={list(self.streams)!r} group={self.group!r}>"

    # -- views ----------------------------------------------------------------------------------

    def view(self) -> BoardDict:
        """Every stream as it is now, or as it was less than ``max_age_s`` ago."""
        with self._lock:
            latest = self._latest
            if latest is None or time.monotonic() - self._taken >= self.max_age_s:
                latest = self._latest = self._collect()
                self._taken = time.monotonic()
            return latest

    def forget(self) -> None:
        """The next view is collected afresh (after an action changed what it shows)."""
        with self._lock:
            self._latest = None

    def _collect(self) -> BoardDict:
        taken_ms = int(time.time() * 1000)
        try:
            streams = [self._stream_view(s) for s in self.streams]
        except _OUTAGES as exc:
            if not self._unreachable:
                self._unreachable = True
                log.warning("cannot reach the server at %s: %s", self.server, self.error_text(exc))
            return BoardDict(
                version=VIEW_VERSION,
                server=self.server,
                reachable=False,
                error=f"cannot reach the server at {self.server}: {self.error_text(exc)}",
                taken_ms=taken_ms,
                streams=[],
            )
        if self._unreachable:
            self._unreachable = False
            log.info("the server at %s answers again", self.server)
        return BoardDict(
            version=VIEW_VERSION,
            server=self.server,
            reachable=True,
            error=None,
            taken_ms=taken_ms,
            streams=streams,
        )

    def _stream_view(self, stream: str) -> StreamViewDict:
        try:
            snapshot = self._monitors[stream].collect()
        except _OUTAGES:
            raise
        except _FAILURES as exc:
            reason = self.error_text(exc)
            return StreamViewDict(
                name=stream,
                error=reason,
                health=status.unknown(reason).to_dict(),
                group_health={},
                snapshot=None,
                dead_letters=None,
            )
        group_health = {
            g.name: status.health(snapshot.stream, (g,), snapshot.thresholds).to_dict()
            for g in snapshot.groups
        }
        return StreamViewDict(
            name=stream,
            error=None,
            health=snapshot.health().to_dict(),
            group_health=group_health,
            snapshot=snapshot.to_dict(),
            dead_letters=self._dead_letters(stream),
        )

    def _dead_letters(self, stream: str) -> DeadLettersDict:
        dead = self._dead[stream]
        try:
            count = dead.count()
            newest = self._newest(dead) if count else []
        except _OUTAGES:
            raise
        except _FAILURES as exc:
            return DeadLettersDict(
                stream=dead.dead_letter, count=None, newest=[], error=self.error_text(exc)
            )
        return DeadLettersDict(
            stream=dead.dead_letter,
            count=count,
            newest=[_shown(letter) for letter in newest],
            error=None,
        )

    def _newest(self, dead: DeadLetters) -> list[DeadLetter]:
        """The newest dead letters, newest first (``DeadLetters.list`` reads oldest first)."""

        def plan() -> _io.Plan[list[DeadLetter]]:
            command = ("XREVRANGE", dead.dead_letter, "+", "-", "COUNT", self.dead_letters_shown)
            (reply,) = yield [command]
            if isinstance(reply, ResponseError):
                raise _io.server_error(reply, f"XREVRANGE on {dead.dead_letter!r}")
            return [letter for letter, _ in cmd.parse_dead_letters(reply, dead.encoding)]

        return _io.run_plan(self.client, plan())

    # -- actions --------------------------------------------------------------------------------

    def replay(self, stream: str) -> dict[str, Any]:
        """Put every dead letter of ``stream`` back on its origin stream (``DeadLetters.replay``).

        >>> board.replay("orders")     # doctest: +SKIP
        {'action': 'replay', 'stream': 'orders', 'replayed': 3, 'matched': 3, ...}
        """
        try:
            result = self._dead_of(stream).replay()
        finally:
            self.forget()
        log.info("replayed %d dead letters of %r", result.replayed, stream)
        return {
            "action": "replay",
            "stream": stream,
            "replayed": result.replayed,
            "matched": result.matched,
            "skipped": result.skipped,
            "failed": result.failed,
        }

    def purge(self, stream: str) -> dict[str, Any]:
        """Delete every dead letter of ``stream`` (``DeadLetters.purge``).

        >>> board.purge("orders")      # doctest: +SKIP
        {'action': 'purge', 'stream': 'orders', 'purged': 3}
        """
        try:
            purged = self._dead_of(stream).purge()
        finally:
            self.forget()
        log.info("purged %d dead letters of %r", purged, stream)
        return {"action": "purge", "stream": stream, "purged": purged}

    def cleanup(self, stream: str) -> dict[str, Any]:
        """Move dead consumers' entries to live ones and remove consumers that own nothing
        (``Monitor.cleanup``: no entry is ever lost).

        >>> board.cleanup("orders")    # doctest: +SKIP
        {'action': 'cleanup', 'stream': 'orders', 'moved': 12, 'removed': [...], ...}
        """
        self._dead_of(stream)  # a stream of the board
        try:
            report = Monitor(self.client, stream, self.group, **self._monitor_options).cleanup()
        finally:
            self.forget()
        log.info(
            "cleanup of %r moved %d entries, removed %d consumers",
            stream,
            report.moved_count,
            len(report.removed),
        )
        return {
            "action": "cleanup",
            "stream": stream,
            "moved": report.moved_count,
            "removed": [{"group": g, "consumer": c} for g, c in report.removed],
            "left_for_reclaim": [
                {"group": g, "consumer": c, "pending": n} for g, c, n in report.left_for_reclaim
            ],
        }

    def _dead_of(self, stream: str) -> DeadLetters:
        dead = self._dead.get(stream) if isinstance(stream, str) else None
        if dead is None:
            raise ConfigError(f"stream {stream!r} is not on this dashboard")
        return dead

    # -- errors ---------------------------------------------------------------------------------

    def is_outage(self, exc: BaseException) -> bool:
        """True when ``exc`` says the server cannot be reached now (it may be later)."""
        return isinstance(exc, _OUTAGES)

    def error_text(self, exc: BaseException) -> str:
        """``exc`` on one line, without any secret."""
        text = " ".join(str(exc).split()) or type(exc).__name__
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def _cut(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def _shown(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter as a view shows it: its ``to_dict()``, long values and errors cut."""
    shown = letter.to_dict()
    fields = list(shown["fields"].items())
    shown["fields"] = {k: _cut(v) for k, v in fields[:SHOWN_FIELDS]}
    shown["more_fields"] = max(0, len(fields) - SHOWN_FIELDS)
    if shown["error"] is not None:
        shown["error"] = _cut(shown["error"])
    return shown
