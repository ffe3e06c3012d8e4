"""Raw round trips for the sync and asyncio drivers: pipelines on a connection, no callbacks.

redis-py's response callbacks are bypassed on purpose: replies are parsed once, by
``conveyor._core.commands``, straight into conveyor's types. Error replies inside a pipeline are
returned in place (as ``ResponseError``) so the replies after them are still read; a broken
connection is closed and raised as ConnectionLost.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Iterator, Sequence
from typing import Any, TypeVar, cast

from redis.exceptions import BusyLoadingError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor import _cluster
from conveyor._core.commands import Command, error_code, error_text
from conveyor.connection import describe
from conveyor.errors import (
    ConfigError,
    ConnectionLost,
    ConveyorError,
    GroupMissingError,
    ServerError,
)

__all__ = [
    "LINK_ERRORS",
    "Plan",
    "acluster_roundtrip",
    "apipelined",
    "apool_roundtrip",
    "areceive",
    "aroundtrip",
    "arun_plan",
    "asend",
    "check_client",
    "cluster_roundtrip",
    "lost",
    "pipelined",
    "pool_roundtrip",
    "receive",
    "roundtrip",
    "run_plan",
    "send",
    "server_error",
]

LINK_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)


#: server errors that mean "this server cannot serve us right now": an outage, retry later
TRANSIENT_CODES = frozenset(
    {"READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "BUSY", "UNBLOCKED"}
)


def server_error(reply: BaseException, what: str, client: Any = None) -> ConveyorError:
    """A server's error reply as conveyor's exception, classified by its code (redis-py keeps
    it in the exception's class, not in the text) and quoted on one line with the code::

        READONLY, MASTERDOWN, LOADING, BUSY, TRYAGAIN, CLUSTERDOWN  ConnectionLost (an outage)
        MOVED, ASK on a cluster client (a slot still moving)      ConnectionLost
        MOVED, ASK (a plain client on a cluster node)              ConfigError
        NOGROUP                                                    GroupMissingError
        anything else (OOM, NOPERM, WRONGTYPE ...)                 ServerError

    An ACL refusal inside a script (an ERR) is quoted as NOPERM too. The server's words are
    kept: Valkey names the refused command; Redis 7.0 inside a script names neither command
    nor key, and no server names a refused key, so the line says where to look (ACL LOG).
    """
    code = error_code(reply)
    text = error_text(reply)
    at = f" at {describe(client)}" if client is not None else ""
    if code in TRANSIENT_CODES:
        return ConnectionLost(f"{what}: server{at} said: {text}")
    if code in ("MOVED", "ASK") and _cluster.is_cluster(client):
        return ConnectionLost(f"{what}: the slot is moving between nodes ({code} {text})")
    if code in ("MOVED", "ASK"):
        return ConfigError(
            f"{what}: the server{at} is a Redis Cluster node and redirected us ({text}); "
            "pass a cluster client"
        )
    if code == "NOGROUP":
        return GroupMissingError(f"{what}: {text}")
    if code == "NOPERM" or "ACL failure" in text or "executing the script can't" in text:
        said = text if code == "NOPERM" else "NOPERM " + text.removeprefix("ERR ")
        if "access" in text and "key" in text:
            said += " (a key outside the user's key patterns; the server's ACL LOG names it)"
        elif "run the " not in text:
            said += " (the server does not say which command; its ACL LOG does)"
        return ServerError(f"{what}: {said}")
    return ServerError(f"{what}: {text}")


def lost(conn_or_client: Any, exc: BaseException) -> ConnectionLost:
    if isinstance(exc, BusyLoadingError):  # a server reply that redis-py raises as a link error
        return ConnectionLost(f"server at {describe(conn_or_client)} said: {error_text(exc)}")
    return ConnectionLost(f"connection to {describe(conn_or_client)} lost: {exc}")


_hiredis_pack: Callable[[Command], bytes] | None
try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is a dependency, but stay usable without it
    _hiredis_pack = None

_UTF8 = ("utf-8", "utf8")


def _packed(conn: Any, commands: Sequence[Command]) -> Any:
    """The wire bytes of ``commands``: packed in C by hiredis where the result is identical
    (str encoded as UTF-8), else by redis-py's packer (three to ten times slower)."""
    if _hiredis_pack is not None and conn.encoder.encoding in _UTF8:
        try:
            # redis-py sends a list of chunks
            if len(commands) == 1:
                return [_hiredis_pack(commands[0])]
            return [b"".join([_hiredis_pack(c) for c in commands])]
        except TypeError:
            pass  # a value hiredis does not take (e.g. a memoryview): let redis-py pack it
    if len(commands) == 1:
        return conn.pack_command(*commands[0])
    return conn.pack_commands(commands)


def roundtrip(conn: Any, commands: Sequence[Command]) -> list[Any]:
    """Send ``commands`` as one pipeline on ``conn`` and read every reply."""
    send(conn, commands)
    return receive(conn, commands)


@contextlib.contextmanager
def _guarded(conn: Any) -> Iterator[None]:
    """A link error is closed and raised as ConnectionLost; any other failure closes the
    connection too: half written or half read, it is out of step."""
    try:
        yield
    except LINK_ERRORS as exc:
        conn.disconnect()
        raise lost(conn, exc) from exc
    except BaseException:
        conn.disconnect()
        raise


@contextlib.asynccontextmanager
async def _aguarded(conn: Any) -> AsyncIterator[None]:
    """``_guarded`` for an asyncio connection (cancelled mid-read: the reply is lost)."""
    try:
        yield
    except LINK_ERRORS as exc:
        await conn.disconnect()
        raise lost(conn, exc) from exc
    except BaseException:
        await conn.disconnect(nowait=True)
        raise


def send(conn: Any, commands: Sequence[Command]) -> None:
    """The first half of ``roundtrip``: write the pipeline; ``receive`` reads its replies."""
    with _guarded(conn):
        conn.send_packed_command(_packed(conn, commands), check_health=False)


def receive(conn: Any, commands: Sequence[Command]) -> list[Any]:
    """The second half of ``roundtrip``: read the replies of ``commands``, sent before."""
    with _guarded(conn):
        return _read(conn, commands)


def pool_roundtrip(client: Any, commands: Sequence[Command]) -> list[Any]:
    """``roundtrip`` on a connection borrowed from ``client``'s pool (on a cluster: from the
    pool of each node concerned, see ``cluster_roundtrip``)."""
    if _cluster.is_cluster(client):
        return cluster_roundtrip(client, commands)
    pool = client.connection_pool
    try:
        conn = pool.get_connection()
    except LINK_ERRORS as exc:
        raise lost(client, exc) from exc
    try:
        return roundtrip(conn, commands)
    finally:
        pool.release(conn)


async def aroundtrip(conn: Any, commands: Sequence[Command]) -> list[Any]:
    """``roundtrip`` for an asyncio connection."""
    await asend(conn, commands)
    return await areceive(conn, commands)


async def asend(conn: Any, commands: Sequence[Command]) -> None:
    """``send`` for an asyncio connection."""
    async with _aguarded(conn):
        await conn.send_packed_command(_packed(conn, commands), check_health=False)


async def areceive(conn: Any, commands: Sequence[Command]) -> list[Any]:
    """``receive`` for an asyncio connection."""
    async with _aguarded(conn):
        return await _aread(conn, commands)


async def apool_roundtrip(client: Any, commands: Sequence[Command]) -> list[Any]:
    """``aroundtrip`` on a connection borrowed from an asyncio client's pool."""
    if _cluster.is_cluster(client):
        return await acluster_roundtrip(client, commands)
    pool = client.connection_pool
    try:
        conn = await pool.get_connection()
    except LINK_ERRORS as exc:
        raise lost(client, exc) from exc
    try:
        return await aroundtrip(conn, commands)
    finally:
        await pool.release(conn)


# -- chunks back to back -----------------------------------------------------------------------


def _has_error(replies: Sequence[Any]) -> bool:
    return any(isinstance(r, ResponseError) for r in replies)


#: the steps of chunks sent back to back: ("send", chunk) -> None, ("read", chunk) -> its
#: replies, ("give", replies) -> None (the caller gets them)
Steps = Generator[tuple[str, Any], Any, None]


def _back_to_back(chunks: Iterable[Sequence[Command]]) -> Steps:
    """Each chunk is sent before the replies of the one before are read. After a chunk with an
    error reply nothing more is sent: the replies of the chunk in flight are given with it. A
    chunk that cannot be built (the iterator raises) raises once the chunk in flight is read."""
    it = iter(chunks)
    pending: Sequence[Command] | None = None
    while True:
        try:
            nxt = next(it, None)
        except BaseException:
            if pending is not None:
                replies = yield ("read", pending)
                yield ("give", replies)
            raise
        if nxt is None:
            break
        yield ("send", nxt)
        if pending is not None:
            replies = yield ("read", pending)
            if _has_error(replies):
                replies = replies + (yield ("read", nxt))
                yield ("give", replies)
                return
            yield ("give", replies)
        pending = nxt
    if pending is not None:
        replies = yield ("read", pending)
        yield ("give", replies)


def _read(conn: Any, commands: Sequence[Command]) -> list[Any]:
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(conn.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


async def _aread(conn: Any, commands: Sequence[Command]) -> list[Any]:
    replies: list[Any] = []
    for _ in commands:
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


def pipelined(client: Any, chunks: Iterable[Sequence[Command]]) -> Iterator[list[Any]]:
    """The replies of each chunk, in order, each chunk written before the replies of the one
    before it are read (``_back_to_back``): the server works on one chunk while this side
    reads and parses the other. One connection from ``client``'s pool; on a cluster, one
    round trip per chunk."""
    if _cluster.is_cluster(client):
        for each in chunks:
            yield cluster_roundtrip(client, each)
        return
    pool = client.connection_pool
    try:
        conn = pool.get_connection()
    except LINK_ERRORS as exc:
        raise lost(client, exc) from exc
    unread = 0
    try:
        steps = _back_to_back(chunks)
        step = next(steps, None)
        while step is not None:
            kind, arg = step
            if kind == "send":
                conn.send_packed_command(_packed(conn, arg), check_health=False)
                unread += 1
                step = steps.send(None)
            elif kind == "read":
                replies = _read(conn, arg)
                unread -= 1
                step = steps.send(replies)
            else:
                yield arg
                step = next(steps, None)
    except LINK_ERRORS as exc:
        conn.disconnect()
        unread = 0
        raise lost(conn, exc) from exc
    finally:
        if unread:  # the caller stopped with replies unread: the connection is out of step
            conn.disconnect()
        pool.release(conn)


async def apipelined(client: Any, chunks: Iterable[Sequence[Command]]) -> AsyncIterator[list[Any]]:
    """``pipelined`` for an asyncio client."""
    if _cluster.is_cluster(client):
        for each in chunks:
            yield await acluster_roundtrip(client, each)
        return
    pool = client.connection_pool
    try:
        conn = await pool.get_connection()
    except LINK_ERRORS as exc:
        raise lost(client, exc) from exc
    unread = 0
    try:
        steps = _back_to_back(chunks)
        step = next(steps, None)
        while step is not None:
            kind, arg = step
            if kind == "send":
                await conn.send_packed_command(_packed(conn, arg), check_health=False)
                unread += 1
                step = steps.send(None)
            elif kind == "read":
                replies = await _aread(conn, arg)
                unread -= 1
                step = steps.send(replies)
            else:
                yield arg
                step = next(steps, None)
    except LINK_ERRORS as exc:
        await conn.disconnect()
        unread = 0
        raise lost(conn, exc) from exc
    finally:
        if unread:
            await conn.disconnect(nowait=True)
        await pool.release(conn)


# -- Redis Cluster ------------------------------------------------------------------------------

#: a connection of one's own on a node (a consumer's), instead of one borrowed from the client
ConnectionFor = Callable[[Any], Any]


def _node_roundtrip(
    client: Any, node: Any, commands: Sequence[Command], connection_for: ConnectionFor | None
) -> list[Any]:
    if connection_for is not None:
        return roundtrip(connection_for(node), commands)
    redis_node = node.redis_connection or client.get_redis_connection(node)
    return pool_roundtrip(redis_node, commands)


def _refresh(client: Any) -> None:
    # every node unreachable: the next attempt reads the map again
    with contextlib.suppress(Exception):
        client.nodes_manager.initialize()


def cluster_roundtrip(
    client: Any, commands: Sequence[Command], connection_for: ConnectionFor | None = None
) -> list[Any]:
    """Send ``commands`` on a cluster: one pipeline per node that owns their slots, replies in
    the order of the commands, redirects followed (``_cluster.route``). A lost connection to a
    node refreshes the slot map (a failover moves slots) and is raised as ConnectionLost."""
    plan = _cluster.route(client, commands)
    try:
        kind, arg = next(plan)
        while True:
            if kind == "refresh":
                _refresh(client)
                kind, arg = plan.send(None)
                continue
            answered = {}
            for name, (node, node_commands) in arg.items():
                try:
                    answered[name] = _node_roundtrip(client, node, node_commands, connection_for)
                except ConnectionLost:
                    _refresh(client)
                    raise
            kind, arg = plan.send(answered)
    except StopIteration as finished:
        return cast(list[Any], finished.value)


async def _anode_roundtrip(
    node: Any, commands: Sequence[Command], connection_for: ConnectionFor | None
) -> list[Any]:
    if connection_for is not None:
        return await aroundtrip(connection_for(node), commands)
    try:
        conn = node.acquire_connection()
    except Exception as exc:
        raise ConnectionLost(f"no connection to {node.name}: {exc}") from exc
    try:
        return await aroundtrip(conn, commands)
    finally:
        node.release(conn)


async def ainitialized(client: Any) -> None:
    """An asyncio cluster client reads its slot map on first use: make sure it has."""
    if getattr(client, "_initialize", False):
        try:
            await client.initialize()
        except LINK_ERRORS as exc:
            raise lost(client, exc) from exc
        except RedisError as exc:
            raise ConnectionLost(f"cannot read the slot map of {describe(client)}: {exc}") from exc


async def _arefresh(client: Any) -> None:
    with contextlib.suppress(Exception):
        await client.nodes_manager.initialize()


async def acluster_roundtrip(
    client: Any, commands: Sequence[Command], connection_for: ConnectionFor | None = None
) -> list[Any]:
    """``cluster_roundtrip`` for an asyncio cluster client: the nodes are asked concurrently."""
    await ainitialized(client)
    plan = _cluster.route(client, commands)
    try:
        kind, arg = next(plan)
        while True:
            if kind == "refresh":
                await _arefresh(client)
                kind, arg = plan.send(None)
                continue
            names = list(arg)
            results = await asyncio.gather(
                *(_anode_roundtrip(arg[n][0], arg[n][1], connection_for) for n in names),
                return_exceptions=True,
            )
            for result in results:
                if isinstance(result, BaseException):
                    if isinstance(result, ConnectionLost):
                        await _arefresh(client)
                    raise result
            kind, arg = plan.send(dict(zip(names, results, strict=True)))
    except StopIteration as finished:
        return cast(list[Any], finished.value)


_T = TypeVar("_T")
#: A plan: a generator that yields the commands of one round trip, is sent their replies and
#: returns its result. It holds every decision, so one plan serves the sync and asyncio twins.
Plan = Generator[list[Command], list[Any], _T]


def run_plan(client: Any, plan: Plan[_T]) -> _T:
    """Carry ``plan``'s round trips on ``client``'s pool; a lost connection is thrown into the
    plan (which may report its progress) and, unless it handles it, out of here."""
    try:
        commands = next(plan)
        while True:
            try:
                replies = pool_roundtrip(client, commands)
            except ConnectionLost as exc:
                commands = plan.throw(exc)
            else:
                commands = plan.send(replies)
    except StopIteration as finished:
        return cast(_T, finished.value)


async def arun_plan(client: Any, plan: Plan[_T]) -> _T:
    """``run_plan`` for an asyncio client."""
    try:
        commands = next(plan)
        while True:
            try:
                replies = await apool_roundtrip(client, commands)
            except ConnectionLost as exc:
                commands = plan.throw(exc)
            else:
                commands = plan.send(replies)
    except StopIteration as finished:
        return cast(_T, finished.value)


def check_client(client: Any, *, asyncio: bool, owner: str, twin: str) -> None:
    """Raise ConfigError unless ``client`` is a redis.Redis or redis.cluster.RedisCluster (with
    ``asyncio``, their redis.asyncio twins): conveyor talks to their connections directly."""
    if _cluster.is_cluster(client):
        is_async = _cluster.is_async_cluster(client)
    else:
        pool = getattr(client, "connection_pool", None)
        if pool is None or not hasattr(pool, "get_connection"):
            raise ConfigError(
                f"client {type(client).__name__} is not supported here: pass a redis.Redis, "
                "redis.asyncio.Redis or a RedisCluster client of either"
            )
        is_async = inspect.iscoroutinefunction(pool.get_connection)
    if is_async is not asyncio:
        wanted = "an asyncio client" if asyncio else "a sync client"
        raise ConfigError(f"{owner} needs {wanted}; use {twin} for this client")
