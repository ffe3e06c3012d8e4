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
from conveyor.errors import FieldTypeError, ServerError
from conveyor.models import PROVENANCE_FIELDS, DeadLetter, Fields, Message

__all__ = [
    "MAX_INLINE_FIELDS",
    "PACKED_FIELDS",
    "AutoclaimResult",
    "Command",
    "ConsumerReply",
    "GroupReply",
    "ReadResult",
    "as_map",
    "as_text",
    "command_key",
    "convert_fields",
    "count_entries",
    "error_code",
    "error_text",
    "id_order",
    "id_time_ms",
    "pack_fields",
    "parse_dead_letter",
    "parse_dead_letters",
    "parse_id",
    "parse_pending_counts",
    "parse_read",
    "parse_text_hash",
    "parse_time_ms",
    "parse_xautoclaim",
    "parse_xinfo_consumers",
    "parse_xinfo_groups",
    "parse_xinfo_stream",
    "parse_xpending_oldest",
    "unpack_fields",
    "validate_fields",
    "xack",
    "xadd",
    "xautoclaim",
    "xgroup_create",
    "xinfo_consumers",
    "xinfo_groups",
    "xinfo_stream",
    "xpending_oldest",
    "xpending_range",
    "xreadgroup",
]

Command = tuple[Any, ...]

_FIELD_TYPES = (str, bytes, int, float)
_NAME_TYPES, _VALUE_TYPES = frozenset((str, bytes)), frozenset(_FIELD_TYPES)

#: commands whose first key follows a subcommand
_SUBCOMMAND_KEYED = frozenset({"XINFO", "XGROUP", "OBJECT", "MEMORY"})
#: commands without keys: on a cluster they go to the node of the pipeline's keyed commands
_KEYLESS = frozenset(
    {"TIME", "PING", "INFO", "MULTI", "EXEC", "DISCARD", "ASKING", "SCAN", "COMMAND", "CLIENT",
     "CONFIG", "ACL", "DBSIZE", "ECHO", "HELLO", "SCRIPT", "FUNCTION", "CLUSTER", "READONLY",
     "READWRITE", "WAIT", "ROLE", "LASTSAVE", "SLOWLOG", "LATENCY", "FLUSHALL", "FLUSHDB"}
)  # fmt: skip


def command_key(command: Command) -> Any:
    """The key that decides where ``command`` runs on a cluster (its first key), or None.

    >>> command_key(("EVAL", "return 1", 2, "s", "h")), command_key(("XINFO", "GROUPS", "s"))
    ('s', 's')
    >>> command_key(("XREADGROUP", "GROUP", "g", "c", "STREAMS", "a", "b", ">", ">"))
    'a'
    >>> command_key(("TIME",)) is None, command_key(("EVAL", "return 1", 0)) is None
    (True, True)
    """
    name = as_text(command[0]).upper()
    if name in _KEYLESS or len(command) < 2:
        return None
    if name in ("EVAL", "EVALSHA", "EVAL_RO", "EVALSHA_RO", "FCALL", "FCALL_RO"):
        return command[3] if int(command[2]) > 0 else None
    if name in ("XREADGROUP", "XREAD"):
        for i, word in enumerate(command):
            if isinstance(word, str | bytes) and as_text(word).upper() == "STREAMS":
                return command[i + 1]
        return None
    if name in _SUBCOMMAND_KEYED:
        return command[2] if len(command) > 2 else None
    return command[1]


def as_text(value: Any) -> str:
    """A reply atom (bytes or str or int) as text."""
    if type(value) is str:
        return value
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


parse_id = as_text


#: redis-py strips the code word from an error reply and keeps it in the exception's class
#: (PITFALLS 20); by class name, so this module needs no redis import.
_CODE_OF_CLASS = {
    "ReadOnlyError": "READONLY",
    "MasterDownError": "MASTERDOWN",
    "BusyLoadingError": "LOADING",
    "TryAgainError": "TRYAGAIN",
    "ClusterDownError": "CLUSTERDOWN",
    "MovedError": "MOVED",
    "AskError": "ASK",
    "OutOfMemoryError": "OOM",
    "NoPermissionError": "NOPERM",
    "NoScriptError": "NOSCRIPT",
    "ExecAbortError": "EXECABORT",
    "ClusterCrossSlotError": "CROSSSLOT",
}


def error_code(exc: BaseException) -> str:
    """The code word of a server error reply: ``NOGROUP``, ``READONLY``, ``MOVED`` ...

    From redis-py's ``status_code`` where it keeps one, else from the exception's class (redis-py
    strips the code from the text: ``ReadOnlyError("You can't write...")``), else the first word
    of the text.

    >>> error_code(Exception("NOGROUP No such key"))
    'NOGROUP'
    >>> class MovedError(Exception): pass
    >>> error_code(MovedError("3999 127.0.0.1:7001"))
    'MOVED'
    """
    code = getattr(exc, "status_code", None)
    if isinstance(code, str) and code:
        return code.upper()
    for klass in type(exc).__mro__:
        found = _CODE_OF_CLASS.get(klass.__name__)
        if found is not None:
            return found
    text = str(exc).lstrip("-")
    return text.split(" ", 1)[0].upper() if text else ""


def error_text(exc: BaseException) -> str:
    """A server error reply as the server sent it, code word first, on one line.

    >>> class ReadOnlyError(Exception): pass
    >>> error_text(ReadOnlyError("You can't write against a read only replica."))
    "READONLY You can't write against a read only replica."
    """
    text = " ".join(str(exc).split())
    code = error_code(exc)
    if code and not text.upper().startswith(code):
        return f"{code} {text}" if text else code
    return text


#: Fields of an entry too large for one Lua call (``unpack()`` has a stack limit, PITFALLS 21)
#: travel to the dead-letter stream packed into one field, byte for byte.
PACKED_FIELDS = "conveyor.packed_fields"
#: entries with more fields than this are packed when dead-lettered
MAX_INLINE_FIELDS = 1_000


def pack_fields(flat: Sequence[bytes]) -> bytes:
    """Field names and values (bytes) as one value: RESP bulk strings, byte for byte.

    >>> unpack_fields(pack_fields([b"a", b"\xff"]))
    [b'a', b'\xff']
    """
    parts = [b"*%d\r\n" % len(flat)]
    for item in flat:
        parts.append(b"$%d\r\n" % len(item))
        parts.append(item)
        parts.append(b"\r\n")
    return b"".join(parts)


def unpack_fields(blob: bytes) -> list[bytes]:
    """The inverse of ``pack_fields``; raises ValueError on anything else."""
    head, sep, rest = blob.partition(b"\r\n")
    if not sep or not head.startswith(b"*"):
        raise ValueError("not a packed field list")
    out: list[bytes] = []
    pos = 0
    for _ in range(int(head[1:])):
        end = rest.index(b"\r\n", pos)
        if rest[pos : pos + 1] != b"$":
            raise ValueError("not a packed field list")
        size = int(rest[pos + 1 : end])
        out.append(rest[end + 2 : end + 2 + size])
        pos = end + 4 + size
    return out


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
    noack: bool = False,
) -> Command:
    """``XREADGROUP``; ``block_ms=None`` reads without blocking (never ``BLOCK 0``: forever).
    ``noack``: the entries delivered are not added to the pending list (at-most-once)."""
    if block_ms is None:
        head: Command = ("XREADGROUP", "GROUP", group, consumer, "COUNT", count)
    else:
        head = ("XREADGROUP", "GROUP", group, consumer, "COUNT", count, "BLOCK", max(1, block_ms))
    if noack:
        head = (*head, "NOACK")
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


def plain_fields(fields: Mapping[Any, Any]) -> bool:
    """True when every name is str or bytes and every value a plain str, bytes, int or float
    (checked in C: the hot path); False means ``validate_fields`` must look closer."""
    return bool(fields) and (
        _NAME_TYPES.issuperset(map(type, fields))
        and _VALUE_TYPES.issuperset(map(type, fields.values()))
    )


def validate_fields(fields: Any, where: str = "") -> None:
    """Raise FieldTypeError naming the field whose value Redis cannot store as it is."""
    if type(fields) is not dict and not isinstance(fields, Mapping):
        raise FieldTypeError(f"fields{where} must be a mapping, got {type(fields).__name__}")
    if not fields:
        raise FieldTypeError(f"fields{where} must not be empty: a stream entry needs a field")
    if plain_fields(fields):
        return  # the common case
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


def fields_bytes(fields: Mapping[Any, Any], encoding: str | None = "utf-8") -> int:
    """The size of an entry's field names and values as stored, in bytes (str values as
    ``encoding``, surrogate escapes back to the bytes they came from; numbers as their text).

    >>> fields_bytes({"id": "42", "name": "Zoë", b"raw": b"\\x00\\x01", "n": 7})
    19
    """
    enc = encoding or "utf-8"
    size = 0
    for key, value in fields.items():
        for part in (key, value):
            if isinstance(part, bytes):
                size += len(part)
            elif isinstance(part, str):
                size += len(part) if part.isascii() else len(part.encode(enc, "surrogateescape"))
            else:
                size += len(str(part))
    return size


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
    if len(flat) % 2:
        raise _unpaired(len(flat))
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


def _unpaired(count: int, stream: str | None = None, entry_id: str | None = None) -> ServerError:
    """The error for an entry whose field list holds a name without its value: no server
    sends one, so something on the way garbled the reply; guessing would hand a user a message
    that is not the one stored."""
    where = f" (entry {entry_id} of stream {stream!r})" if entry_id is not None else ""
    return ServerError(
        f"a reply holds an entry with an odd number of field names and values ({count}){where}: "
        "a name without its value; a proxy or client on the way garbled the reply"
    )


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
            # The hot path: new entries, already decoded as asked.
            append = out.append
            for msg_id, flat in entries:
                if flat:
                    if len(flat) & 1:
                        raise _unpaired(len(flat), stream, msg_id)
                    it = iter(flat)
                    append(Message(stream, msg_id, dict(zip(it, it)), fixed))  # noqa: B905
                else:
                    result.deleted.append((stream, msg_id))
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
                if len(flat) & 1:
                    raise _unpaired(len(flat), stream, msg_id)
                it = iter(flat)
                fields = dict(zip(it, it, strict=True))
            else:
                fields = convert_fields(flat, encoding)
            count = counts_by_id.get(msg_id, 1) if counts_by_id is not None else fixed
            out.append(Message(stream, msg_id, fields, count))
        result.last_ids[stream] = last
    return result


def count_entries(reply: Any) -> int:
    """How many entries an XREADGROUP reply holds, without parsing them."""
    if reply is None or isinstance(reply, Exception):
        return 0
    per_stream = reply.values() if isinstance(reply, dict) else (item[1] for item in reply)
    return sum(len(entries) for entries in per_stream if entries)


def _plain(entries: Any, encoding: str | None) -> bool:
    """True when the entries are ``[str id, flat list]`` of the wanted kind: then no per-entry
    conversion is needed. Checks the kinds once, on the first entry; a reply is uniform (one
    connection decodes all of it or none)."""
    first = entries[0]
    flat = first[1]
    if type(first[0]) is not str or type(flat) is not list or not flat:
        return False
    return (encoding is None) is (type(flat[0]) is bytes)


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
_ESC = "surrogateescape"


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
        elif name == PACKED_FIELDS:  # an entry too large for one Lua call, packed whole
            blob = value if isinstance(value, bytes) else str(value).encode("utf-8", _ESC)
            try:
                items = unpack_fields(blob)
                if len(items) % 2:
                    raise ValueError("a field name without its value")
                if type(key) is str:  # keep the reply's kind: str throughout, or bytes
                    own.extend(x.decode("utf-8", _ESC) for x in items)
                else:
                    own.extend(items)
            except ValueError:
                own.extend((key, value))  # not ours: keep it as it is
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


# ---------------------------------------------------------------------------------------------
# Monitoring: TIME, XINFO STREAM / GROUPS / CONSUMERS, the oldest pending entry, heartbeats.
# Fields a server version lacks (``lag`` and ``entries-read`` before 7.0, ``inactive`` before
# 7.2) or reports as nil come back as None.


def xinfo_stream(stream: Any) -> Command:
    return ("XINFO", "STREAM", stream)


def xinfo_groups(stream: Any) -> Command:
    return ("XINFO", "GROUPS", stream)


def xinfo_consumers(stream: Any, group: Any) -> Command:
    return ("XINFO", "CONSUMERS", stream, group)


def xpending_oldest(stream: Any, group: Any) -> Command:
    """Extended ``XPENDING`` of the group's oldest pending entry (smallest id)."""
    return ("XPENDING", stream, group, "-", "+", 1)


def as_map(reply: Any) -> dict[str, Any]:
    """A RESP2 flat ``[k1, v1, k2, v2]`` or a RESP3 map as a dict with text keys."""
    if isinstance(reply, dict):
        return {as_text(k): v for k, v in reply.items()}
    it = iter(reply or ())
    return {as_text(k): v for k, v in zip(it, it, strict=False)}


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _id_or_none(value: Any) -> str | None:
    return None if value is None else as_text(value)


def parse_time_ms(reply: Any) -> int:
    """``TIME`` (``[seconds, microseconds]``) in milliseconds since the epoch."""
    return int(reply[0]) * 1000 + int(reply[1]) // 1000


def id_time_ms(entry_id: str) -> int:
    """The time part of a stream id: ``id_time_ms("1700000000000-3") == 1700000000000``."""
    ms, _, _ = entry_id.partition("-")
    # str.isdigit() accepts "²" and other digits int() refuses
    return int(ms) if ms.isascii() and ms.isdigit() else 0


def _entry_id(entry: Any) -> str | None:
    return as_text(entry[0]) if entry else None


def parse_xinfo_stream(reply: Any, stream: str) -> models.StreamInfo:
    """``XINFO STREAM`` (RESP2 or RESP3, any server) as a StreamInfo."""
    info = as_map(reply)
    return models.StreamInfo(
        name=stream,
        length=int(info.get("length") or 0),
        first_id=_entry_id(info.get("first-entry")),
        last_id=_entry_id(info.get("last-entry")),
        last_generated_id=_id_or_none(info.get("last-generated-id")),
        entries_added=_int_or_none(info.get("entries-added")),
        max_deleted_id=_id_or_none(info.get("max-deleted-entry-id")),
    )


class GroupReply:
    """One group of an ``XINFO GROUPS`` reply."""

    __slots__ = ("consumers", "entries_read", "lag", "last_delivered_id", "name", "pending")

    def __init__(
        self,
        name: str,
        consumers: int,
        pending: int,
        last_delivered_id: str,
        entries_read: int | None,
        lag: int | None,
    ) -> None:
        self.name = name
        self.consumers = consumers
        self.pending = pending
        self.last_delivered_id = last_delivered_id
        self.entries_read = entries_read
        self.lag = lag


def parse_xinfo_groups(reply: Any) -> list[GroupReply]:
    """``XINFO GROUPS``, in the server's order; ``lag`` None where the server has none."""
    groups = []
    for raw in reply or ():
        info = as_map(raw)
        groups.append(
            GroupReply(
                name=as_text(info["name"]),
                consumers=int(info.get("consumers") or 0),
                pending=int(info.get("pending") or 0),
                last_delivered_id=as_text(info.get("last-delivered-id") or "0-0"),
                entries_read=_int_or_none(info.get("entries-read")),
                lag=_int_or_none(info.get("lag")),
            )
        )
    return groups


class ConsumerReply:
    """One consumer of an ``XINFO CONSUMERS`` reply (``inactive_ms`` None before 7.2)."""

    __slots__ = ("idle_ms", "inactive_ms", "name", "pending")

    def __init__(self, name: str, pending: int, idle_ms: int, inactive_ms: int | None) -> None:
        self.name = name
        self.pending = pending
        self.idle_ms = idle_ms
        self.inactive_ms = inactive_ms


def parse_xinfo_consumers(reply: Any) -> list[ConsumerReply]:
    """``XINFO CONSUMERS``, in the server's order."""
    consumers = []
    for raw in reply or ():
        info = as_map(raw)
        consumers.append(
            ConsumerReply(
                name=as_text(info["name"]),
                pending=int(info.get("pending") or 0),
                idle_ms=int(info.get("idle") or 0),
                inactive_ms=_int_or_none(info.get("inactive")),
            )
        )
    return consumers


def parse_xpending_oldest(reply: Any) -> tuple[str, str, int, int] | None:
    """Extended ``XPENDING ... - + 1`` as ``(id, consumer, idle_ms, deliveries)``, or None
    when nothing is pending."""
    if not reply:
        return None
    row = reply[0]
    return as_text(row[0]), as_text(row[1]), int(row[2]), int(row[3])


def parse_text_hash(reply: Any) -> dict[str, str]:
    """``HGETALL`` (flat list or map) as text -> text."""
    return {k: as_text(v) for k, v in as_map(reply).items()}


def id_order(entry_id: str) -> tuple[int, int]:
    """A stream id as a key that sorts like the server does (as text, "5-10" < "5-9").

    >>> id_order("5-10") > id_order("5-9"), id_order("7") == (7, 0)
    (True, True)
    """
    ms, _, seq = entry_id.partition("-")
    return int(ms or 0), int(seq or 0)


# ---------------------------------------------------------------------------------------------
# Scaler: stuck pending entries, and the lag counted where the server reports none


def scaler_stuck_pending(stream: str, group: str, min_idle_ms: int, count: int) -> Command:
    """Extended XPENDING of up to ``count`` entries idle at least ``min_idle_ms`` (6.2+)."""
    return ("XPENDING", stream, group, "IDLE", min_idle_ms, "-", "+", count)


def scaler_count_after(stream: str, after: str, count: int) -> Command:
    """XRANGE of up to ``count`` entries with ids greater than ``after``: counts the lag."""
    return ("XRANGE", stream, "(" + after, "+", "COUNT", count)


__all__ += ["scaler_count_after", "scaler_stuck_pending"]
