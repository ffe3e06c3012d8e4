"""Value classes that cross the public API: Message and Batch.

Message is built once per entry on the hot path, so it is a plain ``__slots__`` class with a
positional ``__init__`` (a frozen dataclass costs twice as much to create).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, overload

from conveyor.errors import PayloadError

__all__ = [
    "ACK",
    "DEAD",
    "FAIL",
    "PAYLOAD_FIELD",
    "PROVENANCE_FIELDS",
    "Batch",
    "Fields",
    "Message",
    "describe_error",
]

#: The field that holds a codec-encoded payload (``Producer(codec="json")``).
PAYLOAD_FIELD = "payload"

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

    __slots__ = ("deliveries", "fields", "id", "stream")

    def __init__(self, stream: str, id: str, fields: Fields, deliveries: int) -> None:
        self.stream = stream
        self.id = id
        self.fields = fields
        self.deliveries = deliveries

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
ACK, FAIL, DEAD = "ack", "fail", "dead"


class Batch(Sequence[Message]):
    """The messages one ``get_batch()`` returned, in delivery order.

    A Batch is a sequence (``len``, index, iterate) that remembers the consumer that read it, so
    a handler can settle each message where only the batch is at hand:

    - ``batch.ack(msg)``: done with it;
    - ``batch.fail(msg, error)``: it comes back after a backoff (or goes to the dead-letter
      stream once it has been delivered ``max_deliveries`` times);
    - ``batch.dead_letter(msg, reason)``: give up on it now.

    Inside ``Consumer.run(handler)`` these only record the outcome; the consumer sends all acks
    of the batch in one round trip after the handler returns, and fails every message the
    handler did not settle. With ``get_batch()`` they act at once, through the consumer.
    """

    __slots__ = ("_acker", "_messages", "_outcomes")

    def __init__(self, messages: list[Message], acker: Any = None, *, deferred: bool = False):
        self._messages = messages
        self._acker = acker
        self._outcomes: dict[tuple[str, str], tuple[str, str | None]] | None = (
            {} if deferred else None
        )

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
        return [m.id for m in self._messages]

    def ack(self, msg: Message) -> Any:
        """Acknowledge one message."""
        if self._outcomes is not None:
            self._outcomes[(msg.stream, msg.id)] = (ACK, None)
            return None
        return self._consumer().ack(msg)

    def ack_all(self) -> Any:
        """Acknowledge every message of the batch (one round trip per stream)."""
        if self._outcomes is not None:
            for msg in self._messages:
                self._outcomes[(msg.stream, msg.id)] = (ACK, None)
            return None
        return self._consumer().ack_many(self._messages)

    def fail(self, msg: Message, error: BaseException | str | None = None) -> Any:
        """Processing failed: retry after a backoff, or dead-letter at ``max_deliveries``."""
        if self._outcomes is not None:
            self._outcomes[(msg.stream, msg.id)] = (FAIL, describe_error(error))
            return None
        return self._consumer().fail(msg, error)

    def dead_letter(self, msg: Message, reason: BaseException | str | None = None) -> Any:
        """Give up on a message: move it to the dead-letter stream now."""
        if self._outcomes is not None:
            self._outcomes[(msg.stream, msg.id)] = (DEAD, describe_error(reason))
            return None
        return self._consumer().dead_letter(msg, reason)

    def outcome(self, msg: Message) -> tuple[str, str | None] | None:
        """``(ack|fail|dead, reason)`` recorded for ``msg`` in ``run()`` mode, or None."""
        return None if self._outcomes is None else self._outcomes.get((msg.stream, msg.id))

    def _consumer(self) -> Any:
        if self._acker is None:
            raise RuntimeError("this Batch was not read by a consumer; ack through the consumer")
        return self._acker


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
