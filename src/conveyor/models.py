"""Value classes that cross the public API: Message and Batch.

Message is built once per entry on the hot path, so it is a plain ``__slots__`` class with a
positional ``__init__`` (a frozen dataclass costs twice as much to create).
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypedDict, overload

from conveyor.errors import PayloadError

__all__ = [
    "ACK",
    "CRITICAL",
    "DEAD",
    "FAIL",
    "FORWARD",
    "HEALTHY",
    "PAYLOAD_FIELD",
    "PROVENANCE_FIELDS",
    "SNAPSHOT_VERSION",
    "UNKNOWN",
    "WARNING",
    "Batch",
    "CleanupReport",
    "ConsumerDict",
    "ConsumerInfo",
    "Fields",
    "GroupDict",
    "GroupInfo",
    "Health",
    "HealthDict",
    "Message",
    "MovedEntries",
    "SnapshotDict",
    "StreamDict",
    "StreamInfo",
    "Thresholds",
    "ThresholdsDict",
    "describe_error",
    "dump_payload",
    "non_finite",
]

#: The field that holds a codec-encoded payload (``Producer(codec="json")``).
PAYLOAD_FIELD = "payload"


def dump_payload(value: Any) -> str:
    """``value`` as the JSON of a payload field (``codec="json"``), compact. NaN and the
    infinities are refused: JSON has no such numbers, and strict parsers (other languages',
    ``jq``) reject the text Python would write for them. The ValueError names where it is.

    >>> dump_payload({"order_id": 42, "tags": ["a"]})
    '{"order_id":42,"tags":["a"]}'
    >>> dump_payload({"price": float("nan")})
    Traceback (most recent call last):
    ...
    ValueError: payload['price'] is nan: JSON has no NaN or Infinity
    """
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False)
    except ValueError:
        found = non_finite(value)
        if found is None:
            raise
        where, number = found
        raise ValueError(
            f"{PAYLOAD_FIELD}{where} is {number}: JSON has no NaN or Infinity"
        ) from None


def non_finite(value: Any, where: str = "") -> tuple[str, float] | None:
    """Where the first NaN or infinity in a JSON-like value is (``['items'][2]``), and it.

    >>> non_finite({"a": [1, float("inf")]}), non_finite({"a": 1.5})
    (("['a'][1]", inf), None)
    """
    if isinstance(value, float):
        return None if math.isfinite(value) else (where, value)
    items: Any = ()
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    for key, item in items:
        found = non_finite(item, f"{where}[{key!r}]")
        if found is not None:
            return found
    return None


#: The fields a dead-letter entry adds to the message's own, in the order they are written.
ORIGIN_STREAM = "conveyor.origin_stream"
ORIGIN_ID = "conveyor.origin_id"
GROUP = "conveyor.group"
CONSUMER = "conveyor.consumer"
DELIVERIES = "conveyor.deliveries"
ERROR = "conveyor.error"
TIME = "conveyor.time"
PROVENANCE_FIELDS = (ORIGIN_STREAM, ORIGIN_ID, GROUP, CONSUMER, DELIVERIES, ERROR, TIME)

Fields = dict[Any, Any]


class Message:
    """One stream entry as delivered to a consumer.

    ``fields`` maps field names to values: ``str`` by default, ``bytes`` with ``encoding=None``.
    ``deliveries`` is how many times the group has delivered this entry (1 on first delivery).

    >>> msg = Message("orders", "1-0", {"order_id": "42"}, 1)
    >>> msg.stream, msg.id, msg.fields["order_id"]
    ('orders', '1-0', '42')
    """

    __slots__ = ("_outcome", "deliveries", "fields", "id", "stream")

    def __init__(self, stream: str, id: str, fields: Fields, deliveries: int) -> None:
        self.stream = stream
        self.id = id
        self.fields = fields
        self.deliveries = deliveries
        # What a handler in ``run()`` decided for this delivery (``Batch.outcome``): kept on
        # the message itself, so settling a batch costs no lookup per message.
        self._outcome: tuple[str, str | None] | None = None

    def __repr__(self) -> str:
        return (
            f"Message(stream={self.stream!r}, id={self.id!r}, fields={self.fields!r}, "
            f"deliveries={self.deliveries})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (self.stream, self.id, self.fields, self.deliveries) == (
            other.stream,
            other.id,
            other.fields,
            other.deliveries,
        )

    __hash__ = None  # type: ignore[assignment]  # fields are a mutable dict

    def as_tuple(self) -> tuple[str, str, Fields]:
        """``(stream, id, fields)``: the shape streaming pipelines (streamz) pass around."""
        return (self.stream, self.id, self.fields)

    @property
    def payload(self) -> Any:
        """The JSON payload written by ``Producer(codec="json")``, decoded.

        Raises PayloadError (naming the stream and id) when the field is missing or not JSON.
        """
        raw = self.fields.get(PAYLOAD_FIELD)
        if raw is None:
            raw = self.fields.get(PAYLOAD_FIELD.encode())
        if raw is None:
            raise PayloadError(
                f"message {self.id} of stream {self.stream!r} has no {PAYLOAD_FIELD!r} field"
            )
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise PayloadError(
                f"message {self.id} of stream {self.stream!r}: {PAYLOAD_FIELD!r} is not JSON "
                f"({exc})"
            ) from None


#: How a handler settled a message of a Batch in ``run()`` mode.
ACK, FAIL, DEAD, FORWARD = "ack", "fail", "dead", "forward"
_ACKED: tuple[str, str | None] = (ACK, None)
_FORWARDED: tuple[str, str | None] = (FORWARD, None)
_OUTCOME = operator.attrgetter("_outcome")


def _outcomes(messages: list[Message]) -> list[tuple[str, str | None] | None]:
    """The outcome of every message, in one pass in C."""
    return list(map(_OUTCOME, messages))


class Batch(Sequence[Message]):
    """The messages one ``get_batch()`` returned, in delivery order.

    A Batch is a sequence (``len``, index, iterate) that remembers the consumer that read it, so
    a handler can settle each message where only the batch is at hand:

    - ``batch.ack(msg)``: done with it;
    - ``batch.fail(msg, error)``: it comes back after a backoff (or goes to the dead-letter
      stream once it has been delivered ``max_deliveries`` times);
    - ``batch.dead_letter(msg, reason)``: give up on it now;
    - ``batch.forward(msg, stream, fields)``: done with it, and ``fields`` go to ``stream``:
      the ack and the XADD happen in one script, once, whoever finishes the message.

    Inside ``Consumer.run(handler)`` these only record the outcome; the consumer sends all acks
    of the batch in one round trip after the handler returns, and fails every message the
    handler did not settle. With ``get_batch()`` they act at once, through the consumer.
    """

    __slots__ = ("_acker", "_deferred", "_forwards", "_ids", "_messages")

    def __init__(
        self,
        messages: list[Message],
        acker: Any = None,
        *,
        deferred: bool = False,
        ids: list[str] | None = None,
    ):
        self._messages = messages
        self._acker = acker
        self._ids = ids  # the messages' ids when they all come from one stream
        self._deferred = deferred
        # run() mode: the outputs forwarded per message, by (stream, id)
        self._forwards: dict[tuple[str, str], list[tuple[str, list[Any]]]] | None = None

    @overload
    def __getitem__(self, index: int) -> Message: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Message]: ...
    def __getitem__(self, index: int | slice) -> Message | Sequence[Message]:
        return self._messages[index]

    def __len__(self) -> int:
        return len(self._messages)

    def __iter__(self) -> Iterator[Message]:
        return iter(self._messages)

    def __repr__(self) -> str:
        return f"<Batch messages={len(self._messages)}>"

    @property
    def ids(self) -> list[str]:
        """The ids of the batch's messages."""
        return list(self._ids) if self._ids is not None else [m.id for m in self._messages]

    def ack(self, msg: Message) -> Any:
        """Acknowledge one message."""
        if self._deferred:
            if self._forwards is None or not _forwarded(msg):  # a forward acks it already
                msg._outcome = _ACKED
            return None
        return self._consumer().ack(msg)

    def ack_all(self) -> Any:
        """Acknowledge every message of the batch (one round trip per stream)."""
        if self._deferred:
            for msg in self._messages:
                if self._forwards is None or not _forwarded(msg):
                    msg._outcome = _ACKED
            return None
        return self._consumer().ack_many(self._messages)

    def forward(self, msg: Message, stream: Any, fields: Mapping[Any, Any] | None = None) -> Any:
        """Acknowledge ``msg`` and add ``fields`` to ``stream``, atomically, in one script that
        adds only if its ack removed the entry: a message another consumer took over (after a
        crash) is forwarded once, whoever finishes it.

        Fan-out: call it again for the same message (inside ``run()``), or pass a list of
        ``(stream, fields)`` pairs as ``stream``. On a cluster the target must share the
        message's hash slot (``{orders}:in`` -> ``{orders}:out``). A later ``fail`` or
        ``dead_letter`` of the message drops what was forwarded; ``ack`` keeps it.
        """
        if not self._deferred:
            return self._consumer().forward(msg, stream, fields)
        outputs = self._consumer()._outputs(msg, stream, fields)
        if self._forwards is None:
            self._forwards = {}
        if msg._outcome is _FORWARDED:
            self._forwards[(msg.stream, msg.id)].extend(outputs)
        else:
            self._forwards[(msg.stream, msg.id)] = outputs
            msg._outcome = _FORWARDED
        return None

    def forwards(self, msg: Message) -> list[tuple[str, list[Any]]]:
        """What ``run()``'s handler forwarded for ``msg``: ``(stream, field/value list)``."""
        if self._forwards is None or not _forwarded(msg):
            return []
        return self._forwards.get((msg.stream, msg.id), [])

    def fail(self, msg: Message, error: BaseException | str | None = None) -> Any:
        """Processing failed: retry after a backoff, or dead-letter at ``max_deliveries``."""
        if self._deferred:
            msg._outcome = (FAIL, describe_error(error))
            return None
        return self._consumer().fail(msg, error)

    def dead_letter(self, msg: Message, reason: BaseException | str | None = None) -> Any:
        """Give up on a message: move it to the dead-letter stream now."""
        if self._deferred:
            msg._outcome = (DEAD, describe_error(reason))
            return None
        return self._consumer().dead_letter(msg, reason)

    def outcome(self, msg: Message) -> tuple[str, str | None] | None:
        """``(ack|fail|dead|forward, reason)`` recorded for ``msg`` in ``run()`` mode, or None
        (for a forward, the reason names the target streams)."""
        if not self._deferred:
            return None
        if msg._outcome is _FORWARDED:
            return (FORWARD, ", ".join(dict.fromkeys(t for t, _ in self.forwards(msg))))
        return msg._outcome

    def all_acked(self) -> bool:
        """True when the handler in ``run()`` acked every message of the batch."""
        return self._deferred and _outcomes(self._messages).count(_ACKED) == len(self._messages)

    def _consumer(self) -> Any:
        if self._acker is None:
            raise RuntimeError("this Batch was not read by a consumer; ack through the consumer")
        return self._acker


def _forwarded(msg: Message) -> bool:
    return msg._outcome is _FORWARDED


def describe_error(error: BaseException | str | None) -> str:
    """The text a dead-letter entry keeps of an error: ``Type: message``, at most 2,000 chars."""
    if error is None:
        return ""
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return text[:2000]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One entry of a dead-letter stream: the message's own fields and where it came from.

    ``id`` is the dead-letter entry's id, ``origin_id`` the message's id on ``origin_stream``.
    An entry written by something other than a conveyor consumer has no provenance: its text
    attributes are None and ``deliveries`` and ``time_ms`` are 0; replay skips it.

    >>> d = DeadLetter("9-0", {"order_id": "42"}, "orders", "1-0", "billing", "w1", 3, "boom")
    >>> d.origin_id, d.deliveries, d.replayable
    ('1-0', 3, True)
    """

    id: str
    #: the message's own fields, provenance removed: str by default, bytes with encoding=None
    fields: Fields = field(hash=False)
    origin_stream: str | None = None
    origin_id: str | None = None
    group: str | None = None
    consumer: str | None = None
    deliveries: int = 0
    error: str | None = None
    #: when it was dead-lettered: server time, ms since the epoch (0: unknown)
    time_ms: int = 0

    @property
    def replayable(self) -> bool:
        """True when the entry says where it came from and has fields to put back there."""
        return bool(self.origin_stream) and bool(self.fields)

    @property
    def time(self) -> datetime | None:
        """``time_ms`` as an aware UTC datetime, None when unknown."""
        if self.time_ms <= 0:
            return None
        seconds, ms = divmod(self.time_ms, 1000)
        try:
            return datetime.fromtimestamp(seconds, UTC).replace(microsecond=ms * 1000)
        except (OverflowError, OSError, ValueError):  # a foreign entry's nonsense
            return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; bytes fields become text (undecodable bytes as surrogate escapes,
        which ``json.dumps`` writes as ``\\udcXX``)."""
        return {
            "id": self.id,
            "origin_stream": self.origin_stream,
            "origin_id": self.origin_id,
            "group": self.group,
            "consumer": self.consumer,
            "deliveries": self.deliveries,
            "error": self.error,
            "time_ms": self.time_ms,
            "fields": {_text(k): _text(v) for k, v in self.fields.items()},
        }


@dataclass(frozen=True, slots=True)
class ReplayResult:
    """What a ``replay()`` did, or with ``dry_run`` would do.

    ``scanned``: entries looked at; ``matched``: those the filter accepted; ``replayed``: those
    put back on their origin stream and deleted from the dead-letter stream (with ``dry_run``:
    those that would be); ``skipped``: matching entries without provenance, left in place;
    ``failed``: matching entries the origin stream refused (the server's reply is logged),
    left in place; ``new_ids``: the ids the replayed messages got on their origin streams.
    """

    scanned: int
    matched: int
    replayed: int
    skipped: int = 0
    failed: int = 0
    new_ids: tuple[str, ...] = ()
    dry_run: bool = False


def _text(value: Any) -> str:
    return value.decode("utf-8", "surrogateescape") if isinstance(value, bytes) else str(value)


# ---------------------------------------------------------------------------------------------
# Monitoring: what a Monitor saw (plain values; statuses and health rules live in _core.status)
#
# The JSON shape of a snapshot (``Snapshot.to_dict()``), version 1::
#
#     {"version": 1, "time_ms": <server time>, "stream": StreamDict,
#      "groups": [GroupDict, ...], "thresholds": ThresholdsDict}
#
# GroupDict holds its consumers (``"consumers": [ConsumerDict, ...]``). Fields are only ever
# added; a reader ignores fields it does not know.

SNAPSHOT_VERSION = 1


class StreamDict(TypedDict):
    name: str
    length: int
    first_id: str | None
    last_id: str | None
    last_generated_id: str | None
    entries_added: int | None
    max_deleted_id: str | None


class ConsumerDict(TypedDict):
    name: str
    group: str
    idle_ms: int
    inactive_ms: int | None
    pending: int
    heartbeat_age_ms: int | None
    status: str


class GroupDict(TypedDict):
    name: str
    lag: int | None
    lag_estimated: bool
    trimmed_undelivered: bool
    pending: int
    oldest_pending_id: str | None
    oldest_pending_age_ms: int | None
    oldest_pending_idle_ms: int | None
    last_delivered_id: str
    entries_read: int | None
    consumers_count: int
    consumers: list[ConsumerDict]


class ThresholdsDict(TypedDict):
    batch_size: int
    idle_time_ms_warning_threshold: int
    heartbeat_timeout_ms: int
    pending_age_ms_warning_threshold: int
    max_lag: int | None


class SnapshotDict(TypedDict):
    version: int
    time_ms: int
    stream: StreamDict
    groups: list[GroupDict]
    thresholds: ThresholdsDict


class HealthDict(TypedDict):
    code: int
    status: str
    reasons: list[str]


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """A stream as XINFO STREAM describes it. Fields the server does not report (Redis 6.2
    has no ``entries_added`` nor ``max_deleted_id``) are None; ids of an empty stream too.

    >>> StreamInfo("orders", 3, "1-0", "3-0", "3-0", 3, "0-0").length
    3
    """

    name: str
    length: int
    #: ids of the first and last entries there now
    first_id: str | None = None
    last_id: str | None = None
    #: the last id ever added (the stream may have been trimmed or emptied since)
    last_generated_id: str | None = None
    entries_added: int | None = None
    max_deleted_id: str | None = None

    def to_dict(self) -> StreamDict:
        return {
            "name": self.name,
            "length": self.length,
            "first_id": self.first_id,
            "last_id": self.last_id,
            "last_generated_id": self.last_generated_id,
            "entries_added": self.entries_added,
            "max_deleted_id": self.max_deleted_id,
        }

    @classmethod
    def from_dict(cls, data: StreamDict) -> StreamInfo:
        return cls(
            data["name"],
            data["length"],
            data.get("first_id"),
            data.get("last_id"),
            data.get("last_generated_id"),
            data.get("entries_added"),
            data.get("max_deleted_id"),
        )


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    """One consumer of a group, as a monitor saw it.

    ``idle_ms``: since its last read attempt (Redis 7.2+ and Valkey) or last successful read
    (Redis 7.0 and before). ``inactive_ms``: since its last successful read, where the server
    reports it (-1: never), else None. ``heartbeat_age_ms``: since its last heartbeat, None for
    a consumer that records none (not a conveyor consumer). ``status`` is one of
    ``conveyor._core.status.STATUSES``.

    >>> ConsumerInfo("w1", "billing", idle_ms=120, pending=3, status="OK").pending
    3
    """

    name: str
    group: str
    idle_ms: int
    pending: int
    status: str
    inactive_ms: int | None = None
    heartbeat_age_ms: int | None = None

    def to_dict(self) -> ConsumerDict:
        return {
            "name": self.name,
            "group": self.group,
            "idle_ms": self.idle_ms,
            "inactive_ms": self.inactive_ms,
            "pending": self.pending,
            "heartbeat_age_ms": self.heartbeat_age_ms,
            "status": self.status,
        }

    @classmethod
    def from_dict(cls, data: ConsumerDict) -> ConsumerInfo:
        return cls(
            name=data["name"],
            group=data["group"],
            idle_ms=data["idle_ms"],
            pending=data["pending"],
            status=data["status"],
            inactive_ms=data.get("inactive_ms"),
            heartbeat_age_ms=data.get("heartbeat_age_ms"),
        )


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One consumer group of a stream, with its consumers, as a monitor saw it.

    ``lag``: entries not delivered to the group yet. When the server cannot tell (it reports
    nil after a group was created at an arbitrary id or entries were deleted, and Redis 6.2
    has no lag at all), they are counted from ``last_delivered_id``, up to a bound, and
    ``lag_estimated`` is True. ``trimmed_undelivered``: the server's lag exceeds the stream's
    length, which proves that entries were trimmed before this group read them (the lag is
    then counted too, as the server's figure includes the entries that are gone).
    ``oldest_pending_age_ms``: server time minus the time part of the oldest pending id (None
    when nothing is pending, or when ids are not times); ``oldest_pending_idle_ms``: since
    that entry was last delivered (or its lease renewed).
    """

    name: str
    pending: int
    last_delivered_id: str
    consumers_count: int
    lag: int | None = None
    lag_estimated: bool = False
    trimmed_undelivered: bool = False
    entries_read: int | None = None
    oldest_pending_id: str | None = None
    oldest_pending_age_ms: int | None = None
    oldest_pending_idle_ms: int | None = None
    consumers: tuple[ConsumerInfo, ...] = ()

    def consumer(self, name: str) -> ConsumerInfo:
        """The consumer called ``name``; KeyError if the group has none by that name."""
        for c in self.consumers:
            if c.name == name:
                return c
        raise KeyError(f"group {self.name!r} has no consumer {name!r}")

    def to_dict(self) -> GroupDict:
        return {
            "name": self.name,
            "lag": self.lag,
            "lag_estimated": self.lag_estimated,
            "trimmed_undelivered": self.trimmed_undelivered,
            "pending": self.pending,
            "oldest_pending_id": self.oldest_pending_id,
            "oldest_pending_age_ms": self.oldest_pending_age_ms,
            "oldest_pending_idle_ms": self.oldest_pending_idle_ms,
            "last_delivered_id": self.last_delivered_id,
            "entries_read": self.entries_read,
            "consumers_count": self.consumers_count,
            "consumers": [c.to_dict() for c in self.consumers],
        }

    @classmethod
    def from_dict(cls, data: GroupDict) -> GroupInfo:
        return cls(
            name=data["name"],
            pending=data["pending"],
            last_delivered_id=data["last_delivered_id"],
            consumers_count=data["consumers_count"],
            lag=data.get("lag"),
            lag_estimated=data.get("lag_estimated", False),
            trimmed_undelivered=data.get("trimmed_undelivered", False),
            entries_read=data.get("entries_read"),
            oldest_pending_id=data.get("oldest_pending_id"),
            oldest_pending_age_ms=data.get("oldest_pending_age_ms"),
            oldest_pending_idle_ms=data.get("oldest_pending_idle_ms"),
            consumers=tuple(ConsumerInfo.from_dict(c) for c in data.get("consumers", ())),
        )


@dataclass(frozen=True, slots=True)
class Thresholds:
    """What a monitor judged consumers and groups by (kept in each snapshot, so a snapshot
    read back from JSON gives the same verdicts)."""

    batch_size: int = 100
    idle_time_ms_warning_threshold: int = 30_000
    heartbeat_timeout_ms: int = 15_000
    pending_age_ms_warning_threshold: int = 30_000
    max_lag: int | None = None

    def to_dict(self) -> ThresholdsDict:
        return {
            "batch_size": self.batch_size,
            "idle_time_ms_warning_threshold": self.idle_time_ms_warning_threshold,
            "heartbeat_timeout_ms": self.heartbeat_timeout_ms,
            "pending_age_ms_warning_threshold": self.pending_age_ms_warning_threshold,
            "max_lag": self.max_lag,
        }

    @classmethod
    def from_dict(cls, data: ThresholdsDict) -> Thresholds:
        return cls(
            batch_size=data["batch_size"],
            idle_time_ms_warning_threshold=data["idle_time_ms_warning_threshold"],
            heartbeat_timeout_ms=data["heartbeat_timeout_ms"],
            pending_age_ms_warning_threshold=data["pending_age_ms_warning_threshold"],
            max_lag=data.get("max_lag"),
        )


#: Health codes, as monitoring plugins (Nagios, Icinga) use them, and ``conveyor monitor``'s
#: exit status: UNKNOWN when there was nothing to judge (server unreachable, stream missing).
HEALTHY, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Health:
    """A verdict on a snapshot: ``code`` 0 healthy, 1 warning, 2 critical, 3 unknown;
    ``status`` the word for it (``OK``, ``WARNING``, ``CRITICAL``, ``UNKNOWN``); ``reasons``
    one line per finding.

    >>> Health(1, "WARNING", ("group 'billing': consumer 'w1' is idle",)).ok
    False
    """

    code: int
    status: str
    reasons: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.code == HEALTHY

    def to_dict(self) -> HealthDict:
        return {"code": self.code, "status": self.status, "reasons": list(self.reasons)}


@dataclass(frozen=True, slots=True)
class MovedEntries:
    """Pending entries a cleanup moved from a dead consumer to a live one of the same group."""

    group: str
    from_consumer: str
    to_consumer: str
    ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class CleanupReport:
    """What ``Monitor.cleanup()`` did.

    ``moved``: entries handed from dead consumers to live ones. ``removed``: ``(group,
    consumer)`` of consumers removed (each owned nothing at that moment). ``left_for_reclaim``:
    ``(group, consumer, pending)`` of dead consumers whose entries stay where they are (no
    live consumer to take them; consumers reclaim them). ``dropped``: ``(group, id)`` of pending
    entries the server dropped while moving them, because they had been deleted or trimmed.
    ``revived``: ``(group, consumer)`` of consumers that beat again before their entries moved.
    """

    stream: str
    moved: tuple[MovedEntries, ...] = ()
    removed: tuple[tuple[str, str], ...] = ()
    left_for_reclaim: tuple[tuple[str, str, int], ...] = ()
    dropped: tuple[tuple[str, str], ...] = ()
    revived: tuple[tuple[str, str], ...] = ()

    @property
    def moved_count(self) -> int:
        return sum(len(m.ids) for m in self.moved)


# ---------------------------------------------------------------------------------------------
# Scaler: what a look at a group saw, and what the Scaler made of it

#: the Scaler's suggestions, as the seed names them
SCALE_OUT, SCALE_IN, NO_SCALE = "OUT", "IN", "NO_SCALE"


@dataclass(frozen=True, slots=True)
class ScaleSample:
    """One look at a consumer group, taken by ``Scaler.sample()`` in one round trip.

    ``time_ms``: server time. ``length``: entries in the stream (XLEN). ``entries_added``:
    entries ever added (None before Redis 7.0). ``lag``: entries not yet delivered to the group
    (``lag_exact`` is False when the server had no figure and counting stopped at its bound).
    ``pending``: delivered, not yet acked. ``stuck``: pending entries idle at least the
    Scaler's ``stuck_idle_ms``, counted up to 10,000: they need a reclaim, not more consumers.

    >>> s = ScaleSample(time_ms=0, length=94, entries_added=94, lag=11, pending=83, consumers=2)
    >>> s.processed
    0
    """

    time_ms: int
    length: int
    entries_added: int | None
    lag: int
    pending: int
    consumers: int
    stuck: int = 0
    lag_exact: bool = True
    last_delivered_id: str = "0-0"

    @property
    def processed(self) -> int | None:
        """Entries the group has settled (acked or dead-lettered) since the stream began: those
        added less those undelivered or pending. None when a figure it needs is unknown."""
        if self.entries_added is None or not self.lag_exact:
            return None
        return max(0, self.entries_added - self.lag - self.pending)


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    """What ``Scaler.decide()`` concluded, and what from.

    The seed's figures: ``rate`` (lag per pending entry in percent, clamped to 1..100; 0 when
    nothing is pending), ``suggestion`` (``OUT``, ``IN`` or ``NO_SCALE``) and ``line``, the
    seed's sentence. Ours: ``recommended_consumers``, from the arrival and processing rates
    over the sample window, the lag and the target drain time, held steady by hysteresis;
    ``target_consumers`` is what the arithmetic asked for this time, ``reason`` says why.
    ``str(decision)`` is the seed's line.

    Stuck entries (``stuck``) are pending entries nobody is working on: reclaim them
    (``claim_idle_ms``), more consumers will not help.
    """

    stream: str
    group: str
    rate: float
    suggestion: str
    line: str
    recommended_consumers: int
    target_consumers: int
    reason: str
    sample: ScaleSample
    #: entries added per second over the window (None: not known yet, or before Redis 7.0)
    arrival_rate: float | None = None
    #: entries settled per second over the window
    processing_rate: float | None = None
    #: entries per second one consumer handles, as given or learnt
    per_consumer_rate: float | None = None
    #: seconds between the oldest and the newest sample the rates come from
    window_s: float = 0.0
    scale_out_rate: float = 50
    scale_in_rate: float = 10

    def __str__(self) -> str:
        return self.line

    @property
    def lag(self) -> int:
        """Entries not yet delivered to the group (what the seed's line calls stream length)."""
        return self.sample.lag

    @property
    def pending(self) -> int:
        return self.sample.pending

    @property
    def consumers(self) -> int:
        return self.sample.consumers

    @property
    def stuck(self) -> int:
        return self.sample.stuck

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the decision and the figures it came from."""
        s = self.sample
        return {
            "stream": self.stream,
            "group": self.group,
            "rate": self.rate,
            "suggestion": self.suggestion,
            "line": self.line,
            "recommended_consumers": self.recommended_consumers,
            "target_consumers": self.target_consumers,
            "reason": self.reason,
            "lag": s.lag,
            "lag_exact": s.lag_exact,
            "pending": s.pending,
            "stuck": s.stuck,
            "consumers": s.consumers,
            "length": s.length,
            "arrival_rate": self.arrival_rate,
            "processing_rate": self.processing_rate,
            "per_consumer_rate": self.per_consumer_rate,
            "window_s": self.window_s,
            "time_ms": s.time_ms,
        }


# ---------------------------------------------------------------------------------------------
# Retention: what a safe trim did


@dataclass(frozen=True, slots=True)
class TrimReport:
    """What ``safe_trim`` did, or with ``dry_run`` would do, to one stream.

    ``minid``: the cut; entries with smaller ids went (None: nothing could be cut, see
    ``reason``). ``held_by``: the group whose progress set the cut. ``trimmed``: entries
    removed, or with ``dry_run`` that would be; ``at_least`` is True when a dry run stopped
    counting at its bound, so ``trimmed`` is a lower bound.

    >>> TrimReport("orders", 3, "5-0", 10, 7, 2, "billing", "cut at 5-0", False).trimmed
    3
    """

    stream: str
    trimmed: int
    minid: str | None
    length_before: int
    length_after: int
    groups: int
    held_by: str | None
    reason: str
    dry_run: bool = False
    at_least: bool = False

    def __str__(self) -> str:
        verb = "would trim" if self.dry_run else "trimmed"
        more = "at least " if self.at_least else ""
        return f"{self.stream}: {verb} {more}{self.trimmed} of {self.length_before}; {self.reason}"


__all__ += [
    "NO_SCALE",
    "SCALE_IN",
    "SCALE_OUT",
    "ScaleDecision",
    "ScaleSample",
    "TrimReport",
]
