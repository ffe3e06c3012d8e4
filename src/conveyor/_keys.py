"""Every key name conveyor derives from a user's stream, in one place.

Derived keys share the stream's hash slot (a hash tag), so the Lua scripts that touch a stream
and its dead-letter stream together also run on a Redis Cluster.
"""

from __future__ import annotations

__all__ = ["dead_letter_key", "hash_tag", "heartbeat_key"]


def hash_tag(stream: str) -> str:
    """The part of ``stream`` that decides its cluster slot, as a ``{tag}`` prefix.

    >>> hash_tag("orders"), hash_tag("{shop}orders")
    ('{orders}', '{shop}')
    """
    start = stream.find("{")
    if start != -1:
        end = stream.find("}", start + 1)
        if end > start + 1:
            return stream[start : end + 1]
    return "{" + stream + "}"


def _derived(stream: str, suffix: str) -> str:
    tag = hash_tag(stream)
    # A stream that already carries a tag keeps its readable name; others gain one.
    base = stream if tag != "{" + stream + "}" else tag
    return f"{base}:{suffix}"


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
