"""Dead letters: list, replay and purge the entries consumers gave up on.

A consumer moves a message it gives up on to a dead-letter stream (``{orders}:dead`` for
``orders`` unless it was given ``dead_letter=``), with the message's own fields followed by its
provenance in ``conveyor.*`` fields: origin stream and id, group, consumer, deliveries, last
error and server time. ``DeadLetters`` reads them back, puts them back on their origin streams
(``replay``) or deletes them (``purge``); ``AsyncDeadLetters`` does the same on asyncio.

Each method's work is a *plan*: a generator that yields the commands of one round trip and is
sent their raw replies. The plans hold every decision; the sync and asyncio twins only carry
commands to the server and back, so they cannot drift.

Replay adds an entry to its origin stream *before* it deletes it from the dead-letter stream:
a crash in between leaves it in both (a duplicate, never a loss). Replay and purge stop at the
last entry that existed when they started, so entries dead-lettered meanwhile (perhaps a
replayed message that failed again) wait for the next run instead of looping.

On a Redis Cluster the same holds for any slots: replay is never one transaction (the XADD to
the origin stream and the XDEL here are separate commands, each sent to the node that owns its
key), so a dead-letter stream whose letters name origin streams in other slots, or on other
nodes, is replayed with the same guarantee (a duplicate, never a loss).
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from redis.exceptions import ResponseError

from conveyor import _io
from conveyor._core import commands as cmd
from conveyor._io import Plan, server_error
from conveyor._keys import dead_letter_key
from conveyor.config import check_encoding, check_int, check_name, is_stream_id
from conveyor.errors import ConfigError, ConnectionLost
from conveyor.models import DeadLetter, ReplayResult

__all__ = [
    "PAGE_SIZE",
    "AsyncDeadLetters",
    "DeadLetter",
    "DeadLetters",
    "OnProgress",
    "ReplayResult",
    "Where",
    "matching",
]

log = logging.getLogger("conveyor.deadletter")

#: entries read per XRANGE round trip while replaying or purging
PAGE_SIZE = 500
#: the most entries one ``list()`` call returns
MAX_LIST_COUNT = 100_000

_T = TypeVar("_T")
#: yields the commands of one round trip, is sent their replies, returns the method's result
Where = Callable[["DeadLetter"], bool]
OnProgress = Callable[[int, int], None]


def matching(
    *,
    error_contains: str | None = None,
    group: str | None = None,
    origin_ids: Iterable[str] | None = None,
    before_ms: int | None = None,
) -> Where | None:
    """A filter for ``replay(where=...)`` and ``purge(where=...)`` that accepts the entries
    meeting every criterion given; None when none is given (everything matches).

    ``error_contains``: text in the last error; ``group``: the group that gave up;
    ``origin_ids``: the message ids on the origin stream; ``before_ms``: dead-lettered before
    this time (ms since the epoch).

    >>> keep = matching(error_contains="timeout", group="billing")
    >>> keep(DeadLetter("9-0", {"a": "1"}, "orders", "1-0", "billing", "w1", 3, "read timeout"))
    True
    """
    if error_contains is not None and not isinstance(error_contains, str):
        raise ConfigError(f"error_contains must be a str, got {error_contains!r}")
    if group is not None:
        check_name("group", group)
    ids: frozenset[str] | None = None
    if origin_ids is not None:
        if isinstance(origin_ids, str | bytes):
            raise ConfigError(f"origin_ids must be a list of ids, not one {origin_ids!r}")
        ids = frozenset(origin_ids)
        for one in ids:
            if not (isinstance(one, str) and is_stream_id(one)):
                raise ConfigError(f"origin_ids must hold stream ids like '1-0', got {one!r}")
    if before_ms is not None:
        check_int("before_ms", before_ms, 0)
    if error_contains is None and group is None and ids is None and before_ms is None:
        return None

    def where(letter: DeadLetter) -> bool:
        if error_contains is not None and error_contains not in (letter.error or ""):
            return False
        if group is not None and letter.group != group:
            return False
        if ids is not None and letter.origin_id not in ids:
            return False
        return before_ms is None or 0 < letter.time_ms < before_ms

    return where


def _after_id(stream_id: str) -> str:
    """The smallest id greater than ``stream_id``."""
    ms, _, seq = stream_id.partition("-")
    return f"{ms}-{int(seq or 0) + 1}"


def _xrange(key: str, after: str | None, end: str, count: int) -> cmd.Command:
    return ("XRANGE", key, "-" if after is None else "(" + after, end, "COUNT", count)


class _Tally:
    """Counters of a replay or purge in progress (also reported when the connection is lost)."""

    __slots__ = ("done", "failed", "matched", "new_ids", "scanned", "skipped")

    def __init__(self) -> None:
        self.scanned = 0
        self.matched = 0
        self.done = 0
        self.skipped = 0
        self.failed = 0
        self.new_ids: list[str] = []


# ---------------------------------------------------------------------------------------------
# The plans, shared by both twins


class _DeadLettersBase:
    _asyncio = False

    def __init__(
        self,
        client: Any,
        stream: str,
        *,
        dead_letter: str | None = None,
        encoding: str | None = "utf-8",
    ) -> None:
        check_name("stream", stream)
        if dead_letter is not None:
            check_name("dead_letter", dead_letter)
        if encoding is not None:
            check_encoding(encoding)
        twin = "DeadLetters" if self._asyncio else "AsyncDeadLetters"
        _io.check_client(client, asyncio=self._asyncio, owner=type(self).__name__, twin=twin)
        self.client = client
        self.stream = stream
        #: the dead-letter stream this object reads
        self.dead_letter = dead_letter if dead_letter is not None else dead_letter_key(stream)
        self.encoding = encoding

    def __repr__(self) -> str:
        return f"<{type(self).__name__} stream={self.stream!r} dead_letter={self.dead_letter!r}>"

    def _checked(self, reply: Any, command: str) -> Any:
        if isinstance(reply, ResponseError):
            raise server_error(reply, f"{command} on dead-letter stream {self.dead_letter!r}")
        return reply

    def _count_plan(self) -> Plan[int]:
        replies = yield [("XLEN", self.dead_letter)]
        return int(self._checked(replies[0], "XLEN"))

    def _list_plan(self, count: int, after: str | None) -> Plan[builtins.list[DeadLetter]]:
        check_int("count", count, 1, MAX_LIST_COUNT)
        if after is not None and not (isinstance(after, str) and is_stream_id(after)):
            raise ConfigError(f"after must be a stream id like '1700000000000-0', got {after!r}")
        replies = yield [_xrange(self.dead_letter, after, "+", count)]
        entries = cmd.parse_dead_letters(self._checked(replies[0], "XRANGE"), self.encoding)
        return [letter for letter, _ in entries]

    def _snapshot(self) -> Plan[tuple[int, str | None]]:
        """How many entries the dead-letter stream holds now, and the id of the last one."""
        replies = yield [
            ("XLEN", self.dead_letter),
            ("XREVRANGE", self.dead_letter, "+", "-", "COUNT", 1),
        ]
        total = int(self._checked(replies[0], "XLEN"))
        last = self._checked(replies[1], "XREVRANGE")
        return total, (cmd.as_text(last[0][0]) if last else None)

    def _scan(
        self,
        tally: _Tally,
        on_progress: OnProgress | None,
        handle: Callable[[builtins.list[tuple[DeadLetter, builtins.list[Any]]]], Plan[bool]],
    ) -> Plan[None]:
        """Hand the entries up to the snapshot's last one to ``handle``, a page at a time, oldest
        first, until it returns False."""
        total, end = yield from self._snapshot()
        after: str | None = None
        while end is not None:
            replies = yield [_xrange(self.dead_letter, after, end, PAGE_SIZE)]
            page = cmd.parse_dead_letters(self._checked(replies[0], "XRANGE"), self.encoding)
            if not page:
                break
            after = page[-1][0].id
            more = yield from handle(page)
            if on_progress is not None:
                on_progress(min(tally.scanned, total), total)
            if not more or len(page) < PAGE_SIZE:
                break

    def _replay_plan(
        self,
        where: Where | None,
        dry_run: bool,
        limit: int | None,
        on_progress: OnProgress | None,
    ) -> Plan[ReplayResult]:
        _check_options(where, dry_run, on_progress)
        if limit is not None:
            check_int("limit", limit, 1)
        tally = _Tally()

        def replay_page(page: builtins.list[tuple[DeadLetter, builtins.list[Any]]]) -> Plan[bool]:
            todo: builtins.list[tuple[DeadLetter, builtins.list[Any]]] = []
            more = True
            for letter, own in page:
                if limit is not None and tally.done + tally.failed + len(todo) >= limit:
                    more = False
                    break
                tally.scanned += 1
                if where is not None and not where(letter):
                    continue
                tally.matched += 1
                if not letter.replayable:
                    tally.skipped += 1
                    log.debug("skipped dead letter %s: no origin stream or no fields", letter.id)
                    continue
                todo.append((letter, own))
            if dry_run or not todo:
                tally.done += len(todo)
                return more
            # First add every message back, then delete only those whose XADD succeeded: an
            # XDEL in the same pipeline would also run after a failed XADD, and lose the entry.
            replies = yield [("XADD", letter.origin_stream, "*", *own) for letter, own in todo]
            replayed: builtins.list[str] = []
            for (letter, _), reply in zip(todo, replies, strict=True):
                if isinstance(reply, ResponseError):
                    tally.failed += 1
                    log.warning(
                        "dead letter %s not replayed: XADD to %r failed: %s",
                        letter.id,
                        letter.origin_stream,
                        reply,
                    )
                    continue
                tally.new_ids.append(cmd.parse_id(reply))
                replayed.append(letter.id)
            if replayed:
                replies = yield [("XDEL", self.dead_letter, *replayed)]
                self._checked(replies[0], "XDEL")
                tally.done += len(replayed)
            return more

        try:
            yield from self._scan(tally, on_progress, replay_page)
        except ConnectionLost as exc:
            raise ConnectionLost(
                f"{exc}; replay stopped after {tally.done} entries were replayed (a page in "
                "flight may be on its origin stream and still in the dead-letter stream: "
                "replaying again adds it twice)"
            ) from exc
        result = ReplayResult(
            scanned=tally.scanned,
            matched=tally.matched,
            replayed=tally.done,
            skipped=tally.skipped,
            failed=tally.failed,
            new_ids=tuple(tally.new_ids),
            dry_run=dry_run,
        )
        log.info(
            "%s %s: %d of %d matching (scanned %d, skipped %d, failed %d)",
            "dry run of replay from" if dry_run else "replayed from",
            self.dead_letter,
            result.replayed,
            result.matched,
            result.scanned,
            result.skipped,
            result.failed,
        )
        return result

    def _purge_plan(
        self, where: Where | None, dry_run: bool, on_progress: OnProgress | None
    ) -> Plan[int]:
        _check_options(where, dry_run, on_progress)
        tally = _Tally()
        if where is None:
            # Everything up to the snapshot in one XTRIM: the key, any group reading it, and
            # entries that arrive meanwhile all stay.
            total, end = yield from self._snapshot()
            if end is None or dry_run:
                purged = total if end is not None else 0
            else:
                replies = yield [("XTRIM", self.dead_letter, "MINID", "=", _after_id(end))]
                purged = int(self._checked(replies[0], "XTRIM"))
            if on_progress is not None:
                on_progress(purged, purged)
            return purged

        def purge_page(page: builtins.list[tuple[DeadLetter, builtins.list[Any]]]) -> Plan[bool]:
            ids = []
            for letter, _ in page:
                tally.scanned += 1
                if where(letter):
                    ids.append(letter.id)
            tally.matched += len(ids)
            if dry_run or not ids:
                tally.done += len(ids)
                return True
            replies = yield [("XDEL", self.dead_letter, *ids)]
            tally.done += int(self._checked(replies[0], "XDEL"))
            return True

        try:
            yield from self._scan(tally, on_progress, purge_page)
        except ConnectionLost as exc:
            raise ConnectionLost(
                f"{exc}; purge stopped after {tally.done} entries were deleted"
            ) from exc
        return tally.done


def _check_options(where: Any, dry_run: Any, on_progress: Any) -> None:
    if where is not None and not callable(where):
        raise ConfigError(f"where must be a function of a DeadLetter or None, got {where!r}")
    if not isinstance(dry_run, bool):
        raise ConfigError(f"dry_run must be True or False, got {dry_run!r}")
    if on_progress is not None and not callable(on_progress):
        raise ConfigError(
            f"on_progress must be a function (done, total) or None, got {on_progress!r}"
        )


# ---------------------------------------------------------------------------------------------
# The twins: the same plans, carried over a sync or an asyncio client


class DeadLetters(_DeadLettersBase):
    """The dead letters of ``stream``: in ``dead_letter``, else its default dead-letter stream.

    Fields are ``str`` by default, ``bytes`` with ``encoding=None``, whatever the client's
    ``decode_responses``; replay puts back exactly the bytes that were dead-lettered.

    >>> dead = DeadLetters(r, "orders")                                  # doctest: +SKIP
    >>> dead.count(), dead.list(count=10)                                # doctest: +SKIP
    (1, [DeadLetter(id='1700000000001-0', fields={'order_id': '42'}, ...)])
    >>> dead.replay(where=lambda d: d.group == "billing").replayed       # doctest: +SKIP
    1
    """

    def count(self) -> int:
        """How many entries the dead-letter stream holds (XLEN)."""
        return self._run(self._count_plan())

    def list(self, count: int = 100, after: str | None = None) -> builtins.list[DeadLetter]:
        """Up to ``count`` entries, oldest first, after the entry id ``after`` (exclusive)."""
        return self._run(self._list_plan(count, after))

    def replay(
        self,
        *,
        where: Where | None = None,
        dry_run: bool = False,
        limit: int | None = None,
        on_progress: OnProgress | None = None,
    ) -> ReplayResult:
        """Put the matching entries back on their origin streams (own fields only, as new
        entries) and delete them from the dead-letter stream, oldest first, at most ``limit``.

        ``where``: a function of a DeadLetter (see ``matching``); ``dry_run``: count, change
        nothing; ``on_progress(done, total)``: called after each page of entries scanned.
        """
        return self._run(self._replay_plan(where, dry_run, limit, on_progress))

    def purge(
        self,
        *,
        where: Where | None = None,
        dry_run: bool = False,
        on_progress: OnProgress | None = None,
    ) -> int:
        """Delete the matching entries (all of them without ``where``); returns how many were
        deleted, or with ``dry_run`` how many would be."""
        return self._run(self._purge_plan(where, dry_run, on_progress))

    def _run(self, plan: Plan[_T]) -> _T:
        return _io.run_plan(self.client, plan)


class AsyncDeadLetters(_DeadLettersBase):
    """DeadLetters for ``redis.asyncio`` clients: the same parameters, methods as coroutines.

    >>> await AsyncDeadLetters(ar, "orders").replay(dry_run=True)        # doctest: +SKIP
    ReplayResult(scanned=1, matched=1, replayed=1, ...)
    """

    _asyncio = True

    async def count(self) -> int:
        """See ``DeadLetters.count``."""
        return await self._run(self._count_plan())

    async def list(self, count: int = 100, after: str | None = None) -> builtins.list[DeadLetter]:
        """See ``DeadLetters.list``."""
        return await self._run(self._list_plan(count, after))

    async def replay(
        self,
        *,
        where: Where | None = None,
        dry_run: bool = False,
        limit: int | None = None,
        on_progress: OnProgress | None = None,
    ) -> ReplayResult:
        """See ``DeadLetters.replay``."""
        return await self._run(self._replay_plan(where, dry_run, limit, on_progress))

    async def purge(
        self,
        *,
        where: Where | None = None,
        dry_run: bool = False,
        on_progress: OnProgress | None = None,
    ) -> int:
        """See ``DeadLetters.purge``."""
        return await self._run(self._purge_plan(where, dry_run, on_progress))

    async def _run(self, plan: Plan[_T]) -> _T:
        return await _io.arun_plan(self.client, plan)
