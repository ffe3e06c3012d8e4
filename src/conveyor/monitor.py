"""Monitor and AsyncMonitor: what a stream's groups and consumers are doing, a verdict on it,
and a cleanup after dead consumers that never loses an entry.

``collect()`` takes one round trip for a named group (the server's time, the stream, the group,
its consumers, its oldest pending entry and its heartbeats, pipelined), one more to list the
groups when none is named, and one more when the server cannot tell a group's lag. The judging
is done by ``conveyor._core.status``; the two monitors share every step but the I/O.

Every command of a collection or a cleanup touches the stream's own slot (its heartbeats share
it), so on a Redis Cluster the round trip goes to the node that owns the stream, whichever
node the client was made from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from redis.exceptions import ResponseError

from conveyor import _io
from conveyor._core import commands as cmd
from conveyor._core import status
from conveyor._core.monitor_scripts import COUNT_AFTER, MOVE_DEAD_ENTRIES
from conveyor._core.scripts import REMOVE_IF_IDLE
from conveyor._io import Plan as Step
from conveyor._io import server_error
from conveyor._keys import heartbeat_key
from conveyor.config import ConsumerConfig, check_name
from conveyor.errors import ConfigError, GroupMissingError
from conveyor.models import (
    SNAPSHOT_VERSION,
    CleanupReport,
    ConsumerInfo,
    GroupInfo,
    Health,
    MovedEntries,
    SnapshotDict,
    StreamInfo,
    Thresholds,
)

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "DEFAULT_HEARTBEAT_MS",
    "DEFAULT_IDLE_THRESHOLD_MS",
    "AsyncMonitor",
    "Monitor",
    "Snapshot",
]

log = logging.getLogger("conveyor.monitor")


def _consumer_default(name: str) -> int:
    (default,) = (f.default for f in dataclasses.fields(ConsumerConfig) if f.name == name)
    assert isinstance(default, int)
    return default


#: a consumer's batch size when none is given: the consumers' default, so a healthy worker
#: holding one full batch is OK (redis-streams used 2; pass batch_size=2 for its verdicts)
DEFAULT_BATCH_SIZE = _consumer_default("batch_size")
#: a consumer's heartbeat interval when none is given: the consumers' default
DEFAULT_HEARTBEAT_MS = 5_000
#: a consumer idle longer than this gets a warning
DEFAULT_IDLE_THRESHOLD_MS = 30_000
#: most entries counted when the server cannot tell a group's lag
LAG_COUNT_LIMIT = 10_000
#: entries moved from a dead consumer per script call
MOVE_CHUNK = 100

T = TypeVar("T")
#: a step of work: yields the commands of one round trip, receives their replies


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a monitor saw at one moment (``time_ms``, the server's clock): the stream, its
    groups (each with its own consumers: groups are never mixed) and the thresholds the
    statuses were judged by.

    >>> snap = Monitor(r, "orders", group="billing").collect()     # doctest: +SKIP
    >>> print(snap.table())                                        # doctest: +SKIP
    """

    time_ms: int
    stream: StreamInfo
    groups: tuple[GroupInfo, ...]
    thresholds: Thresholds

    def group(self, name: str | None = None) -> GroupInfo:
        """The group called ``name``; without a name, the only group (ValueError if several)."""
        if name is None:
            if len(self.groups) != 1:
                raise ValueError(
                    f"the snapshot has {len(self.groups)} groups; name one of "
                    f"{[g.name for g in self.groups]}"
                )
            return self.groups[0]
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"stream {self.stream.name!r} has no group {name!r} in this snapshot")

    @property
    def consumers(self) -> tuple[ConsumerInfo, ...]:
        """Every consumer of every group (each knows its ``group``)."""
        return tuple(c for g in self.groups for c in g.consumers)

    def health(self) -> Health:
        """The verdict: code 0 healthy, 1 warning, 2 critical, with the reasons (3, unknown,
        is for a stream that could not be read: see ``conveyor._core.status.unknown``)."""
        return status.health(self.stream, self.groups, self.thresholds)

    def table(self, group: str | None = None, *, names_as_bytes: bool = False) -> str:
        """The grid table of the redis-streams Monitor: ``Consumer id | Idle time | Pending
        items | Status``.

        With several groups and none named, one grid per group, each under its name.
        ``names_as_bytes=True`` prints names as ``b'...'``, as redis-streams did with a client
        that did not decode replies.
        """
        if group is not None or len(self.groups) == 1:
            chosen = self.group(group).consumers
            return status.consumer_table(chosen, names_as_bytes=names_as_bytes)
        if not self.groups:
            return status.consumer_table((), names_as_bytes=names_as_bytes)
        return "\n\n".join(
            f"group {g.name}:\n" + status.consumer_table(g.consumers, names_as_bytes=names_as_bytes)
            for g in self.groups
        )

    def rich_table(self, group: str | None = None) -> Table:
        """A ``rich`` table of the consumers, with the stream's figures in the title and each
        group's (lag, pending, oldest pending entry) in the caption."""
        from rich.table import Table
        from rich.text import Text

        groups = self.groups if group is None else (self.group(group),)
        s = self.stream
        title = Text(f"stream {s.name} · length {s.length} · last id {s.last_generated_id}")
        table = Table(title=title, caption=Text("\n".join(status.group_figures(g) for g in groups)))
        several = len(groups) > 1
        if several:
            table.add_column("Group")
        table.add_column("Consumer id")
        table.add_column("Idle time", justify="right")
        table.add_column("Pending items", justify="right")
        table.add_column("Heartbeat age", justify="right")
        table.add_column("Status")
        for g in groups:
            for c in g.consumers:
                beat = "-" if c.heartbeat_age_ms is None else str(c.heartbeat_age_ms)
                cells: list[Text | str] = [Text(g.name)] if several else []
                cells += [Text(c.name), str(c.idle_ms), str(c.pending), beat]
                cells.append(Text(c.status, style=_STYLES.get(c.status, "yellow")))
                table.add_row(*cells)
        return table

    def to_dict(self) -> SnapshotDict:
        """The documented JSON shape (see ``conveyor.models.SnapshotDict``), version 1."""
        return {
            "version": SNAPSHOT_VERSION,
            "time_ms": self.time_ms,
            "stream": self.stream.to_dict(),
            "groups": [g.to_dict() for g in self.groups],
            "thresholds": self.thresholds.to_dict(),
        }

    def to_json(self, *, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: SnapshotDict) -> Snapshot:
        return cls(
            time_ms=data["time_ms"],
            stream=StreamInfo.from_dict(data["stream"]),
            groups=tuple(GroupInfo.from_dict(g) for g in data["groups"]),
            thresholds=Thresholds.from_dict(data["thresholds"]),
        )

    @classmethod
    def from_json(cls, text: str) -> Snapshot:
        return cls.from_dict(json.loads(text))


_STYLES = {status.OK: "green", status.DEAD: "bold red"}


def _wire(text: str) -> bytes:
    """A name as the server has it (names that were not UTF-8 come back byte for byte)."""
    return text.encode("utf-8", "surrogateescape")


class _MonitorBase:
    """What Monitor and AsyncMonitor share: settings and every step, as generators of round
    trips that the two drive with their own I/O."""

    _asyncio = False
    _twin = "AsyncMonitor"

    def __init__(
        self,
        client: Any,
        stream: str,
        group: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        idle_time_ms_warning_threshold: int = DEFAULT_IDLE_THRESHOLD_MS,
        heartbeat_ms: int | None = None,
        *,
        max_lag: int | None = None,
        pending_age_ms_warning_threshold: int | None = None,
    ) -> None:
        check_name("stream", stream)
        if group is not None:
            check_name("group", group)
        _io.check_client(client, asyncio=self._asyncio, owner=type(self).__name__, twin=self._twin)
        self.client = client
        self.stream = stream
        self.group = group
        #: groups whose heartbeats key holds something else than a hash (another client's)
        self._unreadable_beats: set[str] = set()
        self.thresholds = status.make_thresholds(
            batch_size=batch_size,
            idle_time_ms_warning_threshold=idle_time_ms_warning_threshold,
            heartbeat_ms=DEFAULT_HEARTBEAT_MS if heartbeat_ms is None else heartbeat_ms,
            max_lag=max_lag,
            pending_age_ms_warning_threshold=pending_age_ms_warning_threshold,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} stream={self.stream!r} group={self.group!r}>"

    def _checked(self, reply: Any, what: str) -> Any:
        if not isinstance(reply, ResponseError):
            return reply
        text = str(reply)
        if text.lower() in ("no such key", "err no such key"):
            raise GroupMissingError(f"stream {self.stream!r} does not exist")
        if cmd.error_code(reply) == "NOGROUP" or "no such key" in text.lower():
            raise GroupMissingError(f"{what}: {cmd.error_text(reply)}")
        raise server_error(reply, f"{what} failed")

    def _collect(self) -> Step[Snapshot]:
        s = self.stream
        if self.group is None:
            (listing,) = yield [cmd.xinfo_groups(s)]
            names = [g.name for g in cmd.parse_xinfo_groups(self._checked(listing, repr(s)))]
        else:
            names = [self.group]
        commands = [("TIME",), cmd.xinfo_stream(s), cmd.xinfo_groups(s)]
        for g in names:
            wire = _wire(g)
            commands.append(cmd.xinfo_consumers(s, wire))
            commands.append(cmd.xpending_oldest(s, wire))
            commands.append(("HGETALL", _wire(heartbeat_key(s, g))))
        replies = yield commands
        now_ms = cmd.parse_time_ms(self._checked(replies[0], "TIME"))
        stream = cmd.parse_xinfo_stream(self._checked(replies[1], f"stream {s!r}"), s)
        by_name = {g.name: g for g in cmd.parse_xinfo_groups(self._checked(replies[2], s))}
        parts = []
        for i, g in enumerate(names):
            consumers_reply, oldest_reply, beats_reply = replies[3 + 3 * i : 6 + 3 * i]
            group_reply = by_name.get(g)
            if group_reply is None or isinstance(consumers_reply, ResponseError):
                if self.group is not None:
                    self._checked(consumers_reply, f"group {g!r} of stream {s!r}")
                    raise GroupMissingError(f"stream {s!r} has no group {g!r}")
                continue  # deleted since it was listed
            beats = self._beats(g, beats_reply)
            consumers = [
                status.build_consumer(c, g, beats, now_ms, self.thresholds)
                for c in cmd.parse_xinfo_consumers(consumers_reply)
            ]
            oldest = cmd.parse_xpending_oldest(self._checked(oldest_reply, f"group {g!r}"))
            parts.append((group_reply, consumers, oldest))
        counted: dict[str, int] = {}
        unknown = [p[0] for p in parts if status.needs_count(p[0], stream)]
        if unknown:
            replies = yield [
                ("EVAL", COUNT_AFTER, 1, s, u.last_delivered_id, LAG_COUNT_LIMIT) for u in unknown
            ]
            for u, count in zip(unknown, replies, strict=True):
                if not isinstance(count, ResponseError):
                    counted[u.name] = int(count)
        groups = tuple(
            status.build_group(r, stream, consumers, oldest, now_ms, counted.get(r.name))
            for r, consumers, oldest in parts
        )
        return Snapshot(now_ms, stream, groups, self.thresholds)

    def _beats(self, group: str, reply: Any) -> dict[str, str]:
        """A group's heartbeats. A key that is not a hash (another client wrote it) is logged
        once and read as empty: every consumer is then judged by its idle time."""
        key = heartbeat_key(self.stream, group)
        if isinstance(reply, ResponseError) and cmd.error_code(reply) == "WRONGTYPE":
            if group not in self._unreadable_beats:
                self._unreadable_beats.add(group)
                log.warning(
                    "%s is not a hash (another client wrote it): group %r of stream %r is "
                    "judged by idle time alone",
                    key,
                    group,
                    self.stream,
                )
            return {}
        beats = cmd.parse_text_hash(self._checked(reply, f"heartbeats {key}"))
        if group in self._unreadable_beats:
            self._unreadable_beats.discard(group)
            log.warning("%s is a hash again: heartbeats of group %r are read", key, group)
        return beats

    def _cleanup(self, snapshot: Snapshot | None) -> Step[CleanupReport]:
        if snapshot is None:
            snapshot = yield from self._collect()
        s = self.stream
        if snapshot.stream.name != s:
            raise ConfigError(f"the snapshot is of stream {snapshot.stream.name!r}, not {s!r}")
        done = _Tally()
        removals: list[tuple[str, str]] = []
        for g in snapshot.groups:
            loads = {c.name: c.pending for c in g.consumers if status.is_live(c)}
            kept = set()  # dead consumers that still own entries
            for c in g.consumers:
                if c.status == status.DEAD and c.pending:
                    emptied = yield from self._move_out(g.name, c, loads, done)
                    if not emptied:
                        kept.add(c.name)
            for name in status.removable(g, self.thresholds):
                c = g.consumer(name)
                # a dead one was emptied unless kept; any other must own nothing already
                if name not in kept and (c.pending == 0 or c.status == status.DEAD):
                    removals.append((g.name, name))
        if removals:
            replies = yield [self._remove_command(group, name) for group, name in removals]
            for (group, name), reply in zip(removals, replies, strict=True):
                if not isinstance(reply, ResponseError) and int(reply) == 1:
                    done.removed.append((group, name))
                    log.info("removed consumer %r of group %r: it owned nothing", name, group)
        return done.report(s)

    def _remove_command(self, group: str, name: str) -> cmd.Command:
        if group in self._unreadable_beats:  # HDEL would fail after the consumer was removed
            return ("EVAL", REMOVE_IF_IDLE, 1, self.stream, _wire(group), _wire(name))
        key = _wire(heartbeat_key(self.stream, group))
        return ("EVAL", REMOVE_IF_IDLE, 2, self.stream, key, _wire(group), _wire(name))

    def _move_out(
        self, group: str, dead: ConsumerInfo, loads: dict[str, int], done: _Tally
    ) -> Step[bool]:
        """Move a dead consumer's entries, a chunk at a time, each chunk to the least-loaded
        live consumer. True when it owns nothing any more."""
        s, remaining = self.stream, dead.pending
        head = ("EVAL", MOVE_DEAD_ENTRIES, 2, s, _wire(heartbeat_key(s, group)), _wire(group))
        for _ in range(dead.pending // MOVE_CHUNK + len(loads) + 2):
            target = status.least_loaded(loads)
            if target is None:
                break
            timeout_ms = self.thresholds.heartbeat_timeout_ms
            (reply,) = yield [(*head, _wire(dead.name), _wire(target), timeout_ms, MOVE_CHUNK)]
            code, ids, gone = self._checked(reply, f"moving entries of {dead.name!r}")
            if int(code) == 0:
                done.revived.append((group, dead.name))
                return False
            if int(code) == -1:
                del loads[target]  # it died meanwhile: the next one
                continue
            if int(code) != 1:
                return False  # the group is gone
            moved = tuple(cmd.as_text(i) for i in ids)
            done.dropped.extend((group, cmd.as_text(i)) for i in gone)
            if moved:
                done.moved.append(MovedEntries(group, dead.name, target, moved))
                loads[target] += len(moved)
                log.info("moved %d entries of dead %r to %r", len(moved), dead.name, target)
            remaining = max(0, remaining - len(moved) - len(gone))
            if len(moved) + len(gone) < MOVE_CHUNK:
                return True
        done.left.append((group, dead.name, remaining))
        return False


class _Tally:
    """What a cleanup did so far."""

    def __init__(self) -> None:
        self.moved: list[MovedEntries] = []
        self.removed: list[tuple[str, str]] = []
        self.left: list[tuple[str, str, int]] = []
        self.dropped: list[tuple[str, str]] = []
        self.revived: list[tuple[str, str]] = []

    def report(self, stream: str) -> CleanupReport:
        moved, removed, left = tuple(self.moved), tuple(self.removed), tuple(self.left)
        return CleanupReport(stream, moved, removed, left, tuple(self.dropped), tuple(self.revived))


class Monitor(_MonitorBase):
    """Watches the consumers of a stream's groups, judges them, and cleans up after dead ones.

    ``group=None`` watches every group of the stream; each consumer belongs to its own group in
    a snapshot. A consumer's status (see ``conveyor._core.status``): ``DEAD`` when its heartbeat
    is older than three ``heartbeat_ms`` (give the consumers' value; the default is theirs),
    ``WARNING - idle for long time`` beyond ``idle_time_ms_warning_threshold``, ``WARNING -
    too many pending items`` beyond ``batch_size`` (default: the consumers' default, 100),
    else ``OK``. ``max_lag``: a lag above it is critical; ``pending_age_ms_warning_threshold``
    (default: the idle threshold): an older pending entry is a warning. A group with entries
    waiting (lag) and no live consumer is a warning.

    >>> snap = Monitor(r, "orders", group="billing", batch_size=10).collect()  # doctest: +SKIP
    >>> print(snap.table()); snap.health().code                               # doctest: +SKIP
    """

    def collect(self) -> Snapshot:
        """A snapshot of the stream, its groups and their consumers, timed by the server."""
        return self._run(self._collect())

    def cleanup(self, snapshot: Snapshot | None = None) -> CleanupReport:
        """Move the pending entries of DEAD consumers to the least-loaded live consumer of the
        same group, then remove consumers that own nothing and are dead, or record no heartbeat
        and are idle beyond the threshold. Without a live consumer, a dead one's entries are
        left for the consumers to reclaim. A live consumer is never removed, and a consumer is
        removed only at a moment when it owns nothing: no entry is lost.

        ``snapshot``: judge from it instead of collecting a fresh one (the server re-checks
        every heartbeat and owner anyway).
        """
        return self._run(self._cleanup(snapshot))

    def _run(self, step: Step[T]) -> T:
        return _io.run_plan(self.client, step)


class AsyncMonitor(_MonitorBase):
    """Monitor's asyncio twin: the same parameters, ``collect()`` and ``cleanup()`` as
    coroutines.

    >>> snap = await AsyncMonitor(ar, "orders", group="billing").collect()  # doctest: +SKIP
    """

    _asyncio = True
    _twin = "Monitor"

    async def collect(self) -> Snapshot:
        """See ``Monitor.collect``."""
        return await self._run(self._collect())

    async def cleanup(self, snapshot: Snapshot | None = None) -> CleanupReport:
        """See ``Monitor.cleanup``."""
        return await self._run(self._cleanup(snapshot))

    async def _run(self, step: Step[T]) -> T:
        return await _io.arun_plan(self.client, step)
