"""Builds the commands conveyor sends and parses every reply shape they can come back in.

Replies arrive raw (redis-py's response callbacks are bypassed), so each parser accepts:
bytes or str (``decode_responses``), RESP2 arrays or RESP3 maps, and the reply variants of
Redis 6.2 / 7.x and Valkey 8 / 9 (two- or three-element XAUTOCLAIM, ``[id, nil]`` for entries
deleted while pending).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from conveyor import models
from conveyor.errors import FieldTypeError
from conveyor.models import PROVENANCE_FIELDS, DeadLetter, Fields, Message

__all__ = [
    "AutoclaimResult",
    "Command",
    "ReadResult",
    "as_text",
    "convert_fields",
    "error_code",
    "parse_dead_letter",
    "parse_dead_letters",
    "parse_id",
    "parse_pending_counts",
    "parse_read",
    "parse_xautoclaim",
    "validate_fields",
    "xack",
    "xadd",
    "xautoclaim",
    "xgroup_create",
    "xpending_range",
    "xreadgroup",
]

Command = tuple[Any, ...]

_FIELD_TYPES = (str, bytes, int, float)


def as_text(value: Any) -> str:
    """A reply atom (bytes or str or int) as text."""
    if type(value) is str:
        return value
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


parse_id = as_text


def error_code(exc: BaseException) -> str:
    """The first word of a server error reply: ``NOGROUP``, ``BUSYGROUP``, ``MOVED`` ..."""
    text = str(exc).lstrip("-")
    return text.split(" ", 1)[0].upper() if text else ""


# ---------------------------------------------------------------------------------------------
# Builders


def xgroup_create(stream: str, group: str, start: str) -> Command:
    return ("XGROUP", "CREATE", stream, group, start, "MKSTREAM")


def xreadgroup(
    group: str,
    consumer: str,
    streams: Sequence[str],
    ids: Sequence[str],
    count: int,
    block_ms: int | None,
) -> Command:
    """``XREADGROUP``; ``block_ms=None`` reads without blocking (never ``BLOCK 0``: forever)."""
    if block_ms is None:
        head: Command = ("XREADGROUP", "GROUP", group, consumer, "COUNT", count)
    else:
        head = ("XREADGROUP", "GROUP", group, consumer, "COUNT", count, "BLOCK", max(1, block_ms))
    return (*head, "STREAMS", *streams, *ids)


def xpending_range(stream: str, group: str, after: str, count: int, consumer: str) -> Command:
    """Extended ``XPENDING`` of one consumer's entries with ids greater than ``after``."""
    start = "-" if after in ("0", "0-0") else "(" + after
    return ("XPENDING", stream, group, start, "+", count, consumer)


def xack(stream: str, group: str, ids: Iterable[str]) -> Command:
    return ("XACK", stream, group, *ids)


def xautoclaim(
    stream: str, group: str, consumer: str, min_idle_ms: int, cursor: str, count: int
) -> Command:
    return ("XAUTOCLAIM", stream, group, consumer, min_idle_ms, cursor, "COUNT", count)


def validate_fields(fields: Any, where: str = "") -> None:
    """Raise FieldTypeError naming the field whose value Redis cannot store as it is."""
    if not isinstance(fields, Mapping):
        raise FieldTypeError(f"fields{where} must be a mapping, got {type(fields).__name__}")
    if not fields:
        raise FieldTypeError(f"fields{where} must not be empty: a stream entry needs a field")
    for key, value in fields.items():
        if not isinstance(key, str | bytes):
            raise FieldTypeError(
                f"field name {key!r}{where} must be str or bytes, got {type(key).__name__}"
            )
        if type(value) not in _FIELD_TYPES and (
            isinstance(value, bool) or not isinstance(value, _FIELD_TYPES)
        ):
            raise FieldTypeError(
                f"field {key!r}{where} has a {type(value).__name__} value; "
                "use str, bytes, int or float (or codec='json' for structured data)"
            )


def xadd(
    stream: str,
    fields: Mapping[Any, Any],
    maxlen: int | None = None,
    minid: str | None = None,
    approximate: bool = True,
) -> Command:
    head: tuple[Any, ...] = ("XADD", stream)
    if maxlen is not None:
        head = (*head, "MAXLEN", "~" if approximate else "=", maxlen)
    elif minid is not None:
        head = (*head, "MINID", "~" if approximate else "=", minid)
    flat: list[Any] = []
    for key, value in fields.items():
        flat.append(key)
        flat.append(value)
    return (*head, "*", *flat)


# ---------------------------------------------------------------------------------------------
# Parsers


def convert_fields(flat: Any, encoding: str | None) -> Fields:
    """A flat ``[f1, v1, f2, v2]`` (or a RESP3 map) as a dict in the wanted representation.

    The connection normally decodes already; this converts only when the reply's kind (bytes or
    str) differs from what the consumer was asked for, e.g. a client with other settings.
    """
    if isinstance(flat, dict):
        flat = [x for kv in flat.items() for x in kv]
    if not flat:
        return {}
    first = flat[0]
    it = iter(flat)
    if encoding is None:
        if type(first) is str:
            return {
                k.encode("utf-8", "surrogateescape"): v.encode("utf-8", "surrogateescape")
                for k, v in zip(it, it, strict=True)
            }
    elif type(first) is not str:
        return {
            k.decode(encoding, "surrogateescape"): v.decode(encoding, "surrogateescape")
            for k, v in zip(it, it, strict=True)
        }
    return dict(zip(it, it, strict=True))


class ReadResult:
    """What one XREADGROUP reply held, per stream.

    ``messages``: the live entries, in order. ``deleted``: ``(stream, id)`` of entries that were
    deleted or trimmed while pending (the server returns them with no fields). ``last_ids``: the
    last id seen per stream, ``counts``: how many entries each stream returned.
    """

    __slots__ = ("counts", "deleted", "last_ids", "messages")

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.deleted: list[tuple[str, str]] = []
        self.last_ids: dict[str, str] = {}
        self.counts: dict[str, int] = {}


def parse_read(
    reply: Any,
    names: Mapping[Any, str],
    encoding: str | None,
    deliveries: int | Mapping[str, int] = 1,
) -> ReadResult:
    """Parse an XREADGROUP reply straight into Messages.

    ``names`` maps the stream name as the server returns it (bytes or str) to the user's name.
    ``deliveries`` is one number for new entries, or a map id -> count for own pending entries.
    """
    result = ReadResult()
    if reply is None:
        return result
    per_stream = reply.items() if isinstance(reply, dict) else reply
    out = result.messages
    fixed = deliveries if isinstance(deliveries, int) else 0
    counts_by_id = deliveries if not isinstance(deliveries, int) else None
    for item in per_stream:
        raw_name, entries = item[0], item[1]
        stream = names.get(raw_name)
        if stream is None:
            stream = as_text(raw_name)
        if not entries:
            result.counts[stream] = 0
            continue
        result.counts[stream] = len(entries)
        if counts_by_id is None and _plain(entries, encoding):
            # The hot path: new entries, already decoded as asked, none deleted.
            for msg_id, flat in entries:
                it = iter(flat)
                out.append(Message(stream, msg_id, dict(zip(it, it, strict=False)), fixed))
            result.last_ids[stream] = entries[-1][0]
            continue
        last = ""
        for entry in entries:
            raw_id, flat = entry[0], entry[1]
            msg_id = raw_id if type(raw_id) is str else as_text(raw_id)
            last = msg_id
            if not flat:
                # Deleted or trimmed while pending: never hand an empty message to a user.
                result.deleted.append((stream, msg_id))
                continue
            if type(flat) is list and (encoding is None) is (type(flat[0]) is bytes):
                it = iter(flat)
                fields = dict(zip(it, it, strict=False))
            else:
                fields = convert_fields(flat, encoding)
            count = counts_by_id.get(msg_id, 1) if counts_by_id is not None else fixed
            out.append(Message(stream, msg_id, fields, count))
        result.last_ids[stream] = last
    return result


def _plain(entries: Any, encoding: str | None) -> bool:
    """True when every entry is ``[str id, non-empty flat list]`` of the wanted kind: then no
    per-entry conversion is needed. Checks the kinds once, on the first entry; a reply is
    uniform (one connection decodes all of it or none)."""
    first = entries[0]
    flat = first[1]
    if type(first[0]) is not str or type(flat) is not list or not flat:
        return False
    if (encoding is None) is not (type(flat[0]) is bytes):
        return False
    return all(e[1] for e in entries)


def parse_pending_counts(reply: Any) -> dict[str, int]:
    """Extended XPENDING (``[[id, consumer, idle_ms, deliveries], ...]``) as id -> deliveries."""
    if not reply:
        return {}
    return {as_text(row[0]): int(row[3]) for row in reply}


class AutoclaimResult:
    """An XAUTOCLAIM reply: the next cursor, the claimed entries, and the deleted ids.

    On Redis 6.2 the reply has no third element and deleted entries come back as ``[id, nil]``;
    both forms end up in ``deleted``.
    """

    __slots__ = ("cursor", "deleted", "messages")

    def __init__(self, cursor: str, messages: list[Message], deleted: list[str]) -> None:
        self.cursor = cursor
        self.messages = messages
        self.deleted = deleted

    @property
    def done(self) -> bool:
        """True when the scan wrapped around: the next round starts at the beginning again."""
        return self.cursor in ("0-0", "0")


def parse_xautoclaim(reply: Any, stream: str, encoding: str | None) -> AutoclaimResult:
    """Parse XAUTOCLAIM (2 elements on 6.2, 3 on 7.0+). Claimed entries count one delivery more
    than before; the exact count comes from XPENDING where it matters."""
    cursor = as_text(reply[0])
    deleted = [as_text(x) for x in reply[2]] if len(reply) > 2 and reply[2] else []
    messages: list[Message] = []
    for entry in reply[1] or ():
        msg_id = as_text(entry[0])
        if not entry[1]:
            deleted.append(msg_id)
            continue
        messages.append(Message(stream, msg_id, convert_fields(entry[1], encoding), 0))
    return AutoclaimResult(cursor, messages, deleted)


_PROVENANCE_SET = frozenset(PROVENANCE_FIELDS)


# ---------------------------------------------------------------------------------------------
# Dead-letter entries: raw replies (bytes or str, RESP2 or RESP3) of XRANGE on a dead-letter stream


def _number(text: str | None) -> int:
    return int(text) if text and text.isascii() and text.isdigit() else 0


def parse_dead_letter(raw_id: Any, flat: Any, encoding: str | None) -> tuple[DeadLetter, list[Any]]:
    """One dead-letter entry, and its own fields flat as the server sent them (what replay
    adds back, byte for byte)."""
    if isinstance(flat, dict):
        flat = [x for kv in flat.items() for x in kv]
    provenance: dict[str, str] = {}
    own: list[Any] = []
    it = iter(flat or ())
    for key, value in zip(it, it, strict=False):
        name = as_text(key)
        if name in _PROVENANCE_SET:
            provenance[name] = as_text(value)
        else:
            own.append(key)
            own.append(value)
    letter = DeadLetter(
        id=as_text(raw_id),
        fields=convert_fields(own, encoding),
        origin_stream=provenance.get(models.ORIGIN_STREAM) or None,
        origin_id=provenance.get(models.ORIGIN_ID) or None,
        group=provenance.get(models.GROUP) or None,
        consumer=provenance.get(models.CONSUMER) or None,
        deliveries=_number(provenance.get(models.DELIVERIES)),
        error=provenance.get(models.ERROR),
        time_ms=_number(provenance.get(models.TIME)),
    )
    return letter, own


def parse_dead_letters(reply: Any, encoding: str | None) -> list[tuple[DeadLetter, list[Any]]]:
    """An XRANGE reply as ``(DeadLetter, own fields flat)`` pairs, in the reply's order."""
    return [parse_dead_letter(entry[0], entry[1], encoding) for entry in reply or ()]
