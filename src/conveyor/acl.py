"""Least-privilege ACL users for conveyor's roles: one ``ACL SETUSER`` line per role.

Each role gets the commands its code sends, by name (never a category: ``+@stream`` would let a
"read-only" user run XREADGROUP, which writes, PITFALLS 16), and the commands its Lua scripts
run, because a script runs each command as the user who called EVAL. Keys are granted by
pattern: the streams given and the keys conveyor derives from them for that role (``_keys``),
nothing wider. The command sets were found by running each role under such a user on Valkey
and on Redis 7.0 (``tests/test_acl.py`` does so, and fails when one command is missing).

Left out on purpose: ``CLIENT SETINFO`` (redis-py sends it on connect and ignores a refusal;
on Redis 7.0, which has no such sub-command, ``+client|setinfo`` makes the whole ACL SETUSER
fail) and ``INFO`` (``connect()`` asks ``INFO cluster`` and takes a refusal for a plain
server), except with ``cluster=True``.
"""

from __future__ import annotations

from collections.abc import Iterable

from conveyor._keys import dead_letter_key, heartbeat_key, idempotency_key, reader_key
from conveyor.errors import ConfigError

__all__ = ["ROLES", "acl_args", "acl_rules"]

#: what the CLI's commands that ask the server anything send first, and what redis-py's health
#: check of an idle pooled connection sends
_CONNECT = ("ping",)

#: the commands a role sends, its scripts' included
_COMMANDS: dict[str, tuple[str, ...]] = {
    # Producer.send / send_many, conveyor produce; with idempotency keys, a script that reads
    # and sets them (GET, SET) beside the XADD
    "producer": ("xadd", "eval", "get", "set"),
    # Consumer and AsyncConsumer (run, get_batch, acks, dead letters, forwards, heartbeats,
    # reclaim, re-reading their own pending entries), conveyor run and conveyor consume (--peek
    # reads with XREAD; without --create it checks that the stream EXISTS). A forward's target
    # streams are given as streams too; its script asks their TYPE first.
    "consumer": (
        "client|setname",
        "eval",
        "time",
        "exists",
        "type",
        "xreadgroup",
        "xread",
        "xack",
        "xclaim",
        "xautoclaim",
        "xpending",
        "xrange",
        "xadd",
        "xgroup|create",
        "xgroup|delconsumer",
        "xinfo|groups",
        "hset",
        "hdel",
        "hgetall",
        "pexpire",
    ),
    # Monitor, the exporter, Scaler (MULTI/EXEC around its sample), conveyor monitor, scale,
    # pending, groups ls and dlq ls; EVAL and XRANGE count a group's lag where the server
    # cannot tell. Nothing that writes.
    "monitor": (
        "time",
        "multi",
        "exec",
        "eval",
        "xinfo|stream",
        "xinfo|groups",
        "xinfo|consumers",
        "xpending",
        "xrange",
        "xlen",
        "hgetall",
    ),
    # everything monitor does, and conveyor trim (--safe and --maxlen), dlq replay and purge,
    # monitor --cleanup (dead consumers' entries moved to live ones, idle consumers removed),
    # groups create, setid and destroy (which deletes the group's heartbeats too), claim
    "admin": (
        "time",
        "multi",
        "exec",
        "eval",
        "exists",
        "xinfo|stream",
        "xinfo|groups",
        "xinfo|consumers",
        "xpending",
        "xrange",
        "xrevrange",
        "xlen",
        "xadd",
        "xdel",
        "xtrim",
        "xclaim",
        "xgroup|create",
        "xgroup|destroy",
        "xgroup|setid",
        "xgroup|delconsumer",
        "hget",
        "hgetall",
        "hdel",
        "del",
    ),
    # StreamReader and AsyncStreamReader: XREAD, their checkpoints (GET, SET NX, SET), the
    # last id of a stream for start="$"
    "reader": (
        "client|setname",
        "xread",
        "xrevrange",
        "get",
        "set",
    ),
}

#: what redis-py's cluster clients and conveyor's cluster paths need besides: the slot map,
#: the command table (key positions), ASKING after an ASK redirect, and INFO for connect()
#: to tell a cluster node from a plain server
_CLUSTER = ("info", "cluster|slots", "command", "asking")

ROLES = tuple(_COMMANDS)

_GLOB = frozenset("*?[]\\")


def _literal(key: str) -> str:
    """``key`` as an ACL key pattern that matches only itself: glob characters escaped. A
    pattern cannot hold whitespace (the server refuses it): a space, tab ... becomes ``?``,
    which matches any one character there."""
    return "".join("\\" + ch if ch in _GLOB else "?" if ch.isspace() else ch for ch in key)


def _streams(streams: str | Iterable[str]) -> list[str]:
    if isinstance(streams, str):
        streams = [streams]
    try:
        found = list(streams)
    except TypeError:
        raise ConfigError(
            f"streams must be a stream name or a list of them, got {streams!r}"
        ) from None
    if not found:
        raise ConfigError("acl_rules needs at least one stream")
    for stream in found:
        if not isinstance(stream, str) or not stream:
            raise ConfigError(f"a stream must be a non-empty str, got {stream!r}")
    return list(dict.fromkeys(found))


def _optional_name(what: str, value: str | None) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ConfigError(f"{what} must be a non-empty str or None, got {value!r}")


def _patterns(role: str, streams: list[str], group: str | None, reader: str | None) -> list[str]:
    patterns: list[str] = []
    for stream in streams:
        patterns.append(_literal(stream))
        if role == "producer":
            patterns.append(_literal(idempotency_key(stream, "")) + "*")
        if role in ("consumer", "monitor", "admin"):
            if group is None:  # any group's heartbeats: the prefix, then anything
                patterns.append(_literal(heartbeat_key(stream, "")) + "*")
            else:
                patterns.append(_literal(heartbeat_key(stream, group)))
            patterns.append(_literal(dead_letter_key(stream)))
        elif role == "reader":
            if reader is None:
                patterns.append(_literal(reader_key(stream, "")) + "*")
            else:
                patterns.append(_literal(reader_key(stream, reader)))
    return ["~" + p for p in dict.fromkeys(patterns)]


def acl_args(
    role: str,
    streams: str | Iterable[str],
    group: str | None = None,
    *,
    user: str | None = None,
    reader: str | None = None,
    cluster: bool = False,
) -> list[str]:
    """The arguments of ``acl_rules``'s line after ``ACL SETUSER``, one string each (for
    ``client.execute_command("ACL", "SETUSER", *acl_args(...), ">secret", "on")``).

    >>> acl_args("producer", "orders")[:4]
    ['conveyor-producer', 'reset', 'resetchannels', '-@all']
    >>> acl_args("producer", "orders")[4:]
    ['+ping', '+xadd', '+eval', '+get', '+set', '~orders', '~{orders}:idem:*']
    """
    if role not in _COMMANDS:
        raise ConfigError(f"unknown role {role!r}: use one of {', '.join(ROLES)}")
    found = _streams(streams)
    _optional_name("group", group)
    _optional_name("reader", reader)
    _optional_name("user", user)
    name = user if user is not None else f"conveyor-{role}"
    if any(ch.isspace() for ch in name) or not name.isprintable():
        raise ConfigError(f"user must have no spaces or control characters, got {name!r}")
    if not isinstance(cluster, bool):
        raise ConfigError(f"cluster must be True or False, got {cluster!r}")
    commands = _CONNECT + _COMMANDS[role] + (_CLUSTER if cluster else ())
    rules = [name, "reset", "resetchannels", "-@all"]
    rules += ["+" + c for c in dict.fromkeys(commands)]
    return rules + _patterns(role, found, group, reader)


def _quoted(arg: str) -> str:
    """``arg`` as redis-cli reads it: as it is when it can be, else in double quotes with
    backslash escapes (a quote character anywhere would start a quoted part)."""
    if arg and all(ch.isprintable() and not ch.isspace() and ch not in "\"'" for ch in arg):
        return arg
    out = []
    for ch in arg:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch.isprintable() and (ch == " " or not ch.isspace()):
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode("utf-8", "surrogateescape"))
    return '"' + "".join(out) + '"'


def acl_rules(
    role: str,
    streams: str | Iterable[str],
    group: str | None = None,
    *,
    user: str | None = None,
    reader: str | None = None,
    cluster: bool = False,
) -> str:
    """One ``ACL SETUSER`` line for a user that can do ``role``'s work on ``streams``, and
    nothing else.

    Roles: ``producer`` (Producer, ``conveyor produce``), ``consumer`` (Consumer,
    AsyncConsumer, ``conveyor run``, ``conveyor consume``), ``monitor`` (Monitor, Scaler, the
    exporter; ``conveyor monitor``, ``scale``, ``pending``, ``groups ls``, ``dlq ls``: reads
    only), ``admin`` (monitor's reads, and ``conveyor trim``, ``dlq replay`` and ``purge``,
    ``monitor --cleanup``, ``groups create``, ``setid`` and ``destroy``, ``claim``) and
    ``reader`` (StreamReader, its checkpoint keys).

    Keys: the streams, and for consumer, monitor and admin their default dead-letter streams
    and the heartbeats of ``group`` (None: of any group); for reader the checkpoints of the
    reader named ``reader`` (None: of any reader). Glob characters in names are escaped; a
    pattern cannot hold whitespace, so a space in a name matches any one character there. A
    consumer given ``dead_letter=`` needs that stream granted too: name it among ``streams``.
    ``cluster=True`` adds what a cluster client needs (CLUSTER SLOTS, COMMAND, ASKING, INFO);
    ACL users are per node: create the user on every node of the cluster.

    The line sets no password and leaves the user off: append ``>password on`` (or
    ``#<sha256> on``) before running it, then ``ACL SAVE`` (with an ACL file) or
    ``CONFIG REWRITE`` so that it survives a restart. User name: ``user``, else
    ``conveyor-<role>``.

    >>> print(acl_rules("producer", "orders", user="p"))
    ACL SETUSER p reset resetchannels -@all +ping +xadd +eval +get +set ~orders ~{orders}:idem:*
    """
    args = acl_args(role, streams, group, user=user, reader=reader, cluster=cluster)
    return " ".join(["ACL", "SETUSER", *map(_quoted, args)])
