"""Startup checks: once per process and server, the first consumer to start reads the server's
INFO and logs a WARNING for each setting or version under which streams lose or break things
(``_core.server_checks``). A server that refuses INFO (an ACL, a managed service) is not
checked; nothing fails because of a check.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from conveyor import _cluster, _io
from conveyor._core import commands as cmd
from conveyor._core.server_checks import parse_info, startup_warnings
from conveyor.connection import describe

__all__ = ["acheck_server", "check_server", "skip"]

log = logging.getLogger("conveyor.server")

_INFO: list[cmd.Command] = [("INFO",)]
_checked: set[str] = set()
_lock = threading.Lock()


def skip(where: str) -> None:
    """No startup checks for the server at ``where`` (``host:port``): an embedded server
    started without persistence on purpose (the demo, tests)."""
    with _lock:
        _checked.add(where)


def _first_time(client: Any) -> str | None:
    """The server's description the first time it is seen in this process, else None."""
    where = describe(client)
    with _lock:
        if where in _checked:
            return None
        _checked.add(where)
    return where


def _report(where: str, replies: list[Any]) -> None:
    reply = replies[0]
    if isinstance(reply, Exception):
        log.debug("no startup checks on %s: INFO refused: %s", where, reply)
        return
    for line in startup_warnings(parse_info(cmd.as_text(reply))):
        log.warning("%s: %s", where, line)


def check_server(client: Any, stream: str) -> None:
    """Log the startup warnings of the server behind ``client`` (on a cluster: the node that
    owns ``stream``), once per process."""
    where = _first_time(client)
    if where is None:
        return
    try:
        if _cluster.is_cluster(client):
            node = _cluster.node_for_key(client, stream)
            replies = _io.pool_roundtrip(
                node.redis_connection or client.get_redis_connection(node), _INFO
            )
        else:
            replies = _io.pool_roundtrip(client, _INFO)
    except Exception as exc:  # the consumer's own first step reports a real outage
        log.debug("no startup checks on %s: %s", where, exc)
        return
    _report(where, replies)


async def acheck_server(client: Any, stream: str) -> None:
    """``check_server`` for an asyncio client."""
    where = _first_time(client)
    if where is None:
        return
    try:
        if _cluster.is_cluster(client):
            await _io.ainitialized(client)
            node = _cluster.node_for_key(client, stream)
            replies = await _io._anode_roundtrip(node, _INFO, None)
        else:
            replies = await _io.apool_roundtrip(client, _INFO)
    except Exception as exc:
        log.debug("no startup checks on %s: %s", where, exc)
        return
    _report(where, replies)
