"""The monitor's judgements as pure functions of what it saw: a consumer's status, a group's
figures, a snapshot's health, what a cleanup may touch, and the grid table users of the
redis-streams Monitor know. No I/O and no clock: callers pass ``now_ms``.

A consumer's status, the first rule that applies winning:

1. ``DEAD``: it records heartbeats and its last one is older than the heartbeat timeout
   (consumers without heartbeats, from other libraries, are never DEAD: only idle);
2. ``WARNING - idle for long time``: idle longer than ``idle_time_ms_warning_threshold``;
3. ``WARNING - too many pending items``: more pending entries than ``batch_size``;
4. ``OK``.

A dead consumer is usually idle and often holds entries, so DEAD comes first: it is the finding
that calls for action. Idle comes before pending because a consumer that holds entries and has
stopped reading is stuck, which matters more than one that is merely busy.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from conveyor._core.commands import ConsumerReply, GroupReply, id_order, id_time_ms
from conveyor._core.policy import heartbeat_timeout_ms
from conveyor.config import check_int
from conveyor.models import (
    CRITICAL,
    HEALTHY,
    UNKNOWN,
    WARNING,
    ConsumerInfo,
    GroupInfo,
    Health,
    StreamInfo,
    Thresholds,
)

__all__ = [
    "DEAD",
    "IDLE",
    "OK",
    "STATUSES",
    "TABLE_HEADERS",
    "TOO_MANY_PENDING",
    "build_consumer",
    "build_group",
    "caught_up",
    "consumer_status",
    "consumer_table",
    "grid",
    "group_figures",
    "health",
    "is_live",
    "is_serving",
    "least_loaded",
    "looks_numeric",
    "make_thresholds",
    "needs_count",
    "pending_age_ms",
    "removable",
    "unknown",
]

OK = "OK"
IDLE = "WARNING - idle for long time"
TOO_MANY_PENDING = "WARNING - too many pending items"
DEAD = "DEAD"
STATUSES = (OK, IDLE, TOO_MANY_PENDING, DEAD)

TABLE_HEADERS = ("Consumer id", "Idle time", "Pending items", "Status")

#: Ids whose time part is older than this (2001-09-09) were not made from a clock (explicit
#: ids like ``1-1``): their age means nothing.
_EARLIEST_ID_TIME_MS = 1_000_000_000_000


def make_thresholds(
    *,
    batch_size: int,
    idle_time_ms_warning_threshold: int,
    heartbeat_ms: int,
    max_lag: int | None,
    pending_age_ms_warning_threshold: int | None,
) -> Thresholds:
    """A monitor's thresholds, validated; the pending age threshold defaults to the idle one."""
    check_int("batch_size", batch_size, 1)
    check_int("idle_time_ms_warning_threshold", idle_time_ms_warning_threshold, 0)
    check_int("heartbeat_ms", heartbeat_ms, 10)
    if max_lag is not None:
        check_int("max_lag", max_lag, 0)
    if pending_age_ms_warning_threshold is None:
        pending_age_ms_warning_threshold = idle_time_ms_warning_threshold
    check_int("pending_age_ms_warning_threshold", pending_age_ms_warning_threshold, 0)
    return Thresholds(
        batch_size=batch_size,
        idle_time_ms_warning_threshold=idle_time_ms_warning_threshold,
        heartbeat_timeout_ms=heartbeat_timeout_ms(heartbeat_ms),
        pending_age_ms_warning_threshold=pending_age_ms_warning_threshold,
        max_lag=max_lag,
    )


def consumer_status(
    idle_ms: int,
    pending: int,
    heartbeat_age_ms: int | None,
    thresholds: Thresholds,
    heartbeat_timeout_ms: int | None = None,
) -> str:
    """The status of one consumer; see the module docstring for the rules and their order.

    >>> t = Thresholds(batch_size=10, idle_time_ms_warning_threshold=30_000)
    >>> consumer_status(923, 7, None, t), consumer_status(8658, 11, None, t)
    ('OK', 'WARNING - too many pending items')
    >>> consumer_status(294_191, 11, None, t), consumer_status(10, 0, 60_000, t)
    ('WARNING - idle for long time', 'DEAD')
    """
    timeout = heartbeat_timeout_ms or thresholds.heartbeat_timeout_ms
    if heartbeat_age_ms is not None and heartbeat_age_ms > timeout:
        return DEAD
    if idle_ms > thresholds.idle_time_ms_warning_threshold:
        return IDLE
    if pending > thresholds.batch_size:
        return TOO_MANY_PENDING
    return OK


def pending_age_ms(entry_id: str | None, now_ms: int) -> int | None:
    """How long ago the entry ``entry_id`` was added, from the time part of its id; None for
    no entry or an id that was not made from a clock.

    >>> pending_age_ms("1700000000000-0", 1700000005000), pending_age_ms("1-1", 1700000005000)
    (5000, None)
    """
    if entry_id is None:
        return None
    added_ms = id_time_ms(entry_id)
    if added_ms < _EARLIEST_ID_TIME_MS:
        return None
    return max(0, now_ms - added_ms)


#: most digits a heartbeat's numbers may have: beyond, the value is not one a consumer wrote
_BEAT_DIGITS = 18
#: a beat dated this far after the server's clock is garbage (a failover to a server whose
#: clock is a little behind is not)
_BEAT_FUTURE_MS = 60_000


def parse_beat(value: str | None) -> tuple[int, int | None] | None:
    """A heartbeat value, ``<server ms>:<timeout ms>`` (or a plain ``<server ms>``), as
    ``(beat_ms, timeout_ms or None)``; None when absent or unreadable. Other clients may write
    anything into the hash: only plain ASCII digits of a sane length are read.

    >>> parse_beat("1700000000000:15000"), parse_beat("1700000000000"), parse_beat("x")
    ((1700000000000, 15000), (1700000000000, None), None)
    >>> parse_beat("\u00b2"), parse_beat(""), parse_beat("12:x"), parse_beat("9" * 40)
    (None, None, None, None)
    """
    if value is None:
        return None
    beat, sep, timeout = value.partition(":")
    if not _is_count(beat) or (sep and not _is_count(timeout)):
        return None
    return int(beat), (int(timeout) or None) if sep else None


def _is_count(text: str) -> bool:
    # str.isdigit() accepts "²" and other digits int() refuses
    return 0 < len(text) <= _BEAT_DIGITS and text.isascii() and text.isdigit()


def build_consumer(
    reply: ConsumerReply,
    group: str,
    beats: Mapping[str, str],
    now_ms: int,
    thresholds: Thresholds,
) -> ConsumerInfo:
    """A ConsumerInfo from its XINFO CONSUMERS row and the group's heartbeats hash.

    A heartbeat that cannot be read, or that is dated well after ``now_ms``, is ignored: the
    consumer is then judged by its idle time, which the server keeps.
    """
    beat = parse_beat(beats.get(reply.name))
    if beat is not None and beat[0] > now_ms + _BEAT_FUTURE_MS:
        beat = None
    age = None if beat is None else max(0, now_ms - beat[0])
    timeout = None if beat is None else beat[1]
    return ConsumerInfo(
        name=reply.name,
        group=group,
        idle_ms=reply.idle_ms,
        pending=reply.pending,
        status=consumer_status(reply.idle_ms, reply.pending, age, thresholds, timeout),
        inactive_ms=reply.inactive_ms,
        heartbeat_age_ms=age,
    )


def caught_up(reply: GroupReply, stream: StreamInfo) -> bool:
    """The group was handed the stream's last entry: nothing is waiting, whatever the server's
    lag says (Redis 7.0 keeps a lag above zero for good once undelivered entries were trimmed).
    """
    last = stream.last_generated_id
    return last is not None and id_order(reply.last_delivered_id) >= id_order(last)


def needs_count(reply: GroupReply, stream: StreamInfo) -> bool:
    """The group's lag must be counted: the server has none, or one that counts trimmed
    entries (above the stream's length)."""
    if caught_up(reply, stream):
        return False
    return reply.lag is None or reply.lag > stream.length


def build_group(
    reply: GroupReply,
    stream: StreamInfo,
    consumers: Iterable[ConsumerInfo],
    oldest: tuple[str, str, int, int] | None,
    now_ms: int,
    counted_lag: int | None = None,
) -> GroupInfo:
    """A GroupInfo from its XINFO GROUPS row, its consumers and its oldest pending entry.

    ``counted_lag``: the entries after the group's last delivered id, counted where
    ``needs_count``; the lag is then an estimate.
    """
    lag, estimated, trimmed = reply.lag, False, False
    if caught_up(reply, stream):
        lag = 0
    else:
        if lag is not None and lag > stream.length:
            trimmed, lag = True, None  # it counts entries that are gone
        if lag is None and counted_lag is not None:
            lag, estimated = counted_lag, True
    oldest_id = oldest[0] if oldest is not None else None
    return GroupInfo(
        name=reply.name,
        pending=reply.pending,
        last_delivered_id=reply.last_delivered_id,
        consumers_count=reply.consumers,
        lag=lag,
        lag_estimated=estimated,
        trimmed_undelivered=trimmed,
        entries_read=reply.entries_read,
        oldest_pending_id=oldest_id,
        oldest_pending_age_ms=pending_age_ms(oldest_id, now_ms),
        oldest_pending_idle_ms=oldest[2] if oldest is not None else None,
        consumers=tuple(consumers),
    )


def health(stream: StreamInfo, groups: Sequence[GroupInfo], thresholds: Thresholds) -> Health:
    """The verdict on what a monitor saw.

    Critical: a DEAD consumer owns pending entries; undelivered entries were trimmed; a lag
    above ``max_lag``. Warning: a consumer in a WARNING status; the oldest pending entry older
    than ``pending_age_ms_warning_threshold`` (by its id's time, else by its idle time);
    entries waiting (a lag) and no live consumer to read them.
    """
    critical: list[str] = []
    warning: list[str] = []
    for g in groups:
        where = f"group {g.name!r}"
        for c in g.consumers:
            if c.status == DEAD and c.pending:
                critical.append(
                    f"{where}: consumer {c.name!r} is DEAD (no heartbeat for "
                    f"{c.heartbeat_age_ms} ms) and owns {c.pending} pending entries"
                )
            elif c.status in (IDLE, TOO_MANY_PENDING):
                warning.append(
                    f"{where}: consumer {c.name!r}: {c.status} "
                    f"(idle {c.idle_ms} ms, {c.pending} pending)"
                )
        if g.trimmed_undelivered:
            critical.append(
                f"{where}: entries were trimmed before the group read them (the server's lag "
                f"exceeds the stream's length {stream.length})"
            )
        about = "about " if g.lag_estimated else ""
        if thresholds.max_lag is not None and g.lag is not None and g.lag > thresholds.max_lag:
            critical.append(f"{where}: lag {about}{g.lag} is above max_lag {thresholds.max_lag}")
        if g.lag and not any(is_serving(c, thresholds) for c in g.consumers):
            waiting = f"{g.lag} entry waits" if g.lag == 1 else f"{g.lag} entries wait"
            warning.append(f"{where}: {about}{waiting} (lag) and no live consumer reads them")
        age = g.oldest_pending_age_ms
        kind = "old"
        if age is None:
            age, kind = g.oldest_pending_idle_ms, "idle"
        if age is not None and age > thresholds.pending_age_ms_warning_threshold:
            warning.append(
                f"{where}: oldest pending entry {g.oldest_pending_id} is {age} ms {kind} "
                f"(threshold {thresholds.pending_age_ms_warning_threshold} ms)"
            )
    if critical:
        return Health(CRITICAL, "CRITICAL", tuple(critical + warning))
    if warning:
        return Health(WARNING, "WARNING", tuple(warning))
    return Health(HEALTHY, "OK", ())


def unknown(reason: str) -> Health:
    """The verdict when there was nothing to judge: the server could not be reached, the
    stream or group does not exist.

    >>> unknown("stream 'orders' does not exist")
    Health(code=3, status='UNKNOWN', reasons=("stream 'orders' does not exist",))
    """
    return Health(UNKNOWN, "UNKNOWN", (reason,))


# ---------------------------------------------------------------------------------------------
# What a cleanup may touch


def is_live(consumer: ConsumerInfo) -> bool:
    """Known to be alive: it records heartbeats and the last one is fresh. Only such consumers
    are given a dead one's entries (nothing says a consumer without heartbeats is alive)."""
    return consumer.heartbeat_age_ms is not None and consumer.status != DEAD


def is_serving(consumer: ConsumerInfo, thresholds: Thresholds) -> bool:
    """Reads the group's entries, as far as anyone can tell: live by its heartbeats, or
    without heartbeats (another library's consumer) and not idle beyond the threshold."""
    if consumer.heartbeat_age_ms is None:
        return consumer.idle_ms <= thresholds.idle_time_ms_warning_threshold
    return is_live(consumer)


def removable(group: GroupInfo, thresholds: Thresholds) -> list[str]:
    """Consumers a cleanup removes if they still own nothing: the DEAD ones, and those without
    heartbeats idle longer than the idle threshold. A live consumer is never removed."""
    names = []
    for c in group.consumers:
        if is_live(c):
            continue
        stale = c.heartbeat_age_ms is None and c.idle_ms > thresholds.idle_time_ms_warning_threshold
        if c.status == DEAD or stale:
            names.append(c.name)
    return names


def least_loaded(loads: Mapping[str, int]) -> str | None:
    """The consumer with the fewest pending entries (ties: the first name), or None.

    >>> least_loaded({"b": 3, "a": 3, "c": 9}), least_loaded({})
    ('a', None)
    """
    if not loads:
        return None
    return min(loads.items(), key=lambda kv: (kv[1], kv[0]))[0]


# ---------------------------------------------------------------------------------------------
# The grid table (the layout of tabulate's "grid" format, which the redis-streams Monitor printed)

_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")


def looks_numeric(value: object) -> bool:
    """A cell that reads as a number is right-aligned.

    >>> looks_numeric(923), looks_numeric("29102140026848155456"), looks_numeric("w-1")
    (True, True, False)
    """
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    return bool(_NUMBER.fullmatch(str(value).strip()))


def _printable(text: str) -> str:
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def grid(
    headers: Sequence[str],
    rows: Sequence[Sequence[object]],
    align: Sequence[str] | None = None,
) -> str:
    """A grid table: a column is as wide as its widest cell, and at least its header plus two;
    one space of padding on each side; ``+===+`` under the header, ``+---+`` after every row.
    A column whose cells all read as numbers is right-aligned, header included; ``align``
    ("left" or "right" per column) overrides that.

    >>> print(grid(["Consumer id", "Idle time"], [["7", 923]]))
    +---------------+-------------+
    |   Consumer id |   Idle time |
    +===============+=============+
    |             7 |         923 |
    +---------------+-------------+
    """
    cells = [[_printable(str(v)) for v in row] for row in rows]
    if align is None:
        align = [
            "right" if rows and all(looks_numeric(row[i]) for row in rows) else "left"
            for i in range(len(headers))
        ]
    widths = [max([len(h) + 2] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def rule(char: str) -> str:
        return "+" + "+".join(char * (w + 2) for w in widths) + "+"

    def line(values: Sequence[str]) -> str:
        parts = (
            " " + (v.rjust(w) if a == "right" else v.ljust(w)) + " "
            for v, w, a in zip(values, widths, align, strict=True)
        )
        return "|" + "|".join(parts) + "|"

    out = [rule("-"), line(headers), rule("=")]
    for row in cells:
        out.append(line(row))
        out.append(rule("-"))
    if not cells:
        out.append(rule("-"))
    return "\n".join(out)


def group_figures(g: GroupInfo) -> str:
    """One line of a group's figures (``~``: an estimated lag).

    >>> group_figures(GroupInfo("g", pending=83, last_delivered_id="9-0", consumers_count=2,
    ...                         lag=11))
    'group g: lag 11 · pending 83 · oldest pending age - ms · consumers 2 · last delivered 9-0'
    """
    lag = "?" if g.lag is None else ("~" if g.lag_estimated else "") + str(g.lag)
    trimmed = " (undelivered entries TRIMMED)" if g.trimmed_undelivered else ""
    age = "-" if g.oldest_pending_age_ms is None else str(g.oldest_pending_age_ms)
    return (
        f"group {g.name}: lag {lag}{trimmed} · pending {g.pending} · oldest pending age {age} ms"
        f" · consumers {g.consumers_count} · last delivered {g.last_delivered_id}"
    )


def _display_name(name: str, as_bytes: bool) -> str:
    if as_bytes:
        return repr(name.encode("utf-8", "surrogateescape"))
    return name


def consumer_table(consumers: Sequence[ConsumerInfo], *, names_as_bytes: bool = False) -> str:
    """The redis-streams Monitor's table: ``Consumer id | Idle time | Pending items | Status``.

    Numeric-looking consumer names are right-aligned, like numbers. ``names_as_bytes`` shows
    names as redis-streams printed them with a client that did not decode replies (``b'...'``).
    """
    rows = [
        [_display_name(c.name, names_as_bytes), c.idle_ms, c.pending, c.status] for c in consumers
    ]
    numeric = "right" if consumers else "left"
    names = "right" if consumers and all(looks_numeric(c.name) for c in consumers) else "left"
    return grid(TABLE_HEADERS, rows, [names, numeric, numeric, "left"])
