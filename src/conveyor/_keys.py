"""Every key name conveyor derives from a user's stream, in one place.

Derived keys share the stream's hash slot, so the Lua scripts that touch a stream and its
dead-letter stream or heartbeats together also run on a Redis Cluster. The slot follows Redis's
hash tag rule exactly: the first ``{`` and the first ``}`` after it enclose the hashed part,
unless nothing is between them (``{}orders`` has no tag: the whole name is hashed).
"""

from __future__ import annotations

import functools
from binascii import crc_hqx

__all__ = [
    "dead_letter_key",
    "hash_tag",
    "heartbeat_key",
    "idempotency_key",
    "key_slot",
    "reader_key",
]

SLOTS = 16384


def _hashed_part(key: bytes) -> bytes:
    start = key.find(b"{")
    if start != -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: str | bytes) -> int:
    """The cluster hash slot of ``key``, by Redis's rule (CRC16 of its hashed part).

    >>> key_slot("orders") == key_slot("{orders}:dead"), key_slot("{}orders") == key_slot("{}")
    (True, False)
    """
    raw = key if isinstance(key, bytes) else key.encode("utf-8", "surrogateescape")
    return crc_hqx(_hashed_part(raw), 0) % SLOTS


def _own_tag(stream: str) -> str | None:
    start = stream.find("{")
    if start != -1:
        end = stream.find("}", start + 1)
        if end > start + 1:
            return stream[start : end + 1]
    return None


@functools.lru_cache(maxsize=4096)
def _same_slot_tag(slot: int) -> str:
    """The shortest decimal number that hashes into ``slot``: the tag of derived keys for a
    stream whose whole name is hashed but cannot be wrapped in braces (it holds a ``}``)."""
    n = 0
    while crc_hqx(str(n).encode(), 0) % SLOTS != slot:
        n += 1
    return str(n)


def hash_tag(stream: str) -> str:
    """A ``{tag}`` that hashes into ``stream``'s slot.

    >>> hash_tag("orders"), hash_tag("{shop}orders"), hash_tag("{}orders")
    ('{orders}', '{shop}', '{48133}')
    """
    own = _own_tag(stream)
    if own is not None:
        return own
    if stream and "}" not in stream:
        return "{" + stream + "}"  # hashes exactly the whole name, as the stream itself
    return "{" + _same_slot_tag(key_slot(stream)) + "}"


def _derived(stream: str, suffix: str) -> str:
    if _own_tag(stream) is not None:
        return f"{stream}:{suffix}"  # a stream with a tag keeps its readable name
    tag = hash_tag(stream)
    if tag == "{" + stream + "}":
        return f"{tag}:{suffix}"
    return f"{tag}{stream}:{suffix}"  # e.g. {1234}{}orders:dead


def dead_letter_key(stream: str) -> str:
    """The default dead-letter stream of ``stream``, in the same hash slot.

    >>> dead_letter_key("orders"), dead_letter_key("{shop}orders")
    ('{orders}:dead', '{shop}orders:dead')
    """
    return _derived(stream, "dead")


def heartbeat_key(stream: str, group: str) -> str:
    """The hash of a group's heartbeats on ``stream``: consumer -> last beat (server ms).

    >>> heartbeat_key("orders", "billing")
    '{orders}:heartbeats:billing'
    """
    return _derived(stream, f"heartbeats:{group}")


def reader_key(stream: str, name: str) -> str:
    """The checkpoint of the plain reader ``name`` on ``stream``: a string holding the id of
    the last entry it committed.

    >>> reader_key("orders", "audit"), reader_key("{shop}orders", "audit")
    ('{orders}:reader:audit', '{shop}orders:reader:audit')
    """
    return _derived(stream, f"reader:{name}")


def idempotency_key(stream: str, key: str) -> str:
    """Where a producer remembers the first entry sent to ``stream`` under ``key``: a string
    holding its id, expiring after the producer's idempotency window.

    >>> idempotency_key("orders", "order-42"), idempotency_key("{shop}orders", "order-42")
    ('{orders}:idem:order-42', '{shop}orders:idem:order-42')
    """
    return _derived(stream, f"idem:{key}")
