"""Clients and connections with settings that are safe for streams, and URLs without secrets.

redis-py's defaults are wrong for stream consumers (PITFALLS 2): a ``socket_timeout`` shorter than
a blocking read, and automatic retries that append an XADD twice or strand the entries of a lost
XREADGROUP reply. ``connect()`` builds a client without them, for a server, a Sentinel-managed
primary or a unix socket; consumers open their own reader connection, sized to their longest
blocking read, so acks never wait behind it.

A Sentinel-managed pool is not a host:port pool (PITFALLS 23): its connections find the primary
by asking the sentinels, so reader connections are built to do the same on every (re)connect.

URLs and their secrets are ``_urls``'s: every error about a URL names the redacted URL only.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from typing import Any, Literal, overload
from urllib.parse import SplitResult, parse_qs, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.backoff import NoBackoff
from redis.retry import Retry

from conveyor._urls import (
    DEFAULT_SENTINEL_PORT,
    _address,
    _config_error,
    _error_text,
    _known_option,
    _named,
    _parse_sentinel_url,
    _userinfo,
    redact_url,
    secrets_in_url,
)
from conveyor.errors import ConfigError

__all__ = [
    "DEFAULT_SENTINEL_PORT",
    "DEFAULT_URL",
    "connect",
    "describe",
    "reader_connection",
    "redact_url",
    "secrets_in_url",
]

log = logging.getLogger("conveyor.connection")

DEFAULT_URL = "redis://localhost:6379/0"
_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")
_SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel", "valkey+sentinel", "valkeys+sentinel")
_TLS_SCHEMES = ("rediss", "valkeys", "rediss+sentinel", "valkeys+sentinel")
#: redis-py's URL parser knows only its own scheme names
_REDIS_PY_SCHEME = {"valkey": "redis", "valkeys": "rediss"}
#: seconds a reply may take beyond the longest server-side block before the link counts as dead
READ_MARGIN_S = 10.0


# -- clients -----------------------------------------------------------------------------------


def _no_retry(*, asyncio: bool = False) -> Any:
    if asyncio:
        return redis.asyncio.retry.Retry(NoBackoff(), 0)
    return Retry(NoBackoff(), 0)


def _safe_options(
    overrides: dict[str, Any], *, asyncio: bool = False, unix: bool = False
) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": 10.0,
        "socket_connect_timeout": 5.0,
        "health_check_interval": 30,
        "retry": _no_retry(asyncio=asyncio),
        "retry_on_error": [],
    }
    if not unix:  # unix socket connections take no keepalive option (and need none)
        options["socket_keepalive"] = True
    options.update(overrides)
    return options


@overload
def connect(
    url: str | None = None,
    *,
    asyncio: Literal[False] = False,
    cluster: bool | None = None,
    **options: Any,
) -> Any: ...
@overload
def connect(
    url: str | None = None, *, asyncio: Literal[True], cluster: bool | None = None, **options: Any
) -> Any: ...
def connect(
    url: str | None = None, *, asyncio: bool = False, cluster: bool | None = None, **options: Any
) -> Any:
    """A client for ``url`` (else ``$REDIS_URL``, else ``redis://localhost:6379/0``).

    A redis.Redis (``asyncio=True``: redis.asyncio.Redis); when the server at the URL runs in
    cluster mode, a ``redis.cluster.RedisCluster`` (``redis.asyncio.cluster.RedisCluster``)
    that finds every node from that one. ``cluster=True`` or ``False`` skips the question to
    the server (which connect() otherwise asks once, with ``INFO cluster``).

    Safe for streams: no automatic retry (a retried XADD can append twice), TCP keepalive on,
    bounded connect and command timeouts. ``rediss://`` enables TLS; pass ``ssl_ca_certs``,
    ``ssl_certfile`` and ``ssl_keyfile`` for a private CA and client certificates. Any other
    keyword goes to ``redis.Redis`` as it is.

    ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]`` gives a client
    for the primary of ``service`` that asks the sentinels where it is on every reconnect, so
    it follows a failover (``rediss+sentinel://``: TLS to the sentinels and the servers). The
    password is the servers'; a sentinel that wants one of its own gets
    ``?sentinel_password=...`` (and ``sentinel_username``). ``valkey://`` and ``valkeys://``
    work as well. A URL that cannot work raises ConfigError, whose message never holds a
    password.

    >>> r = connect("redis://localhost:6379/0")   # doctest: +SKIP
    >>> ar = connect(asyncio=True)                 # doctest: +SKIP
    >>> r = connect("redis+sentinel://s1:26379,s2:26379/mymaster")   # doctest: +SKIP
    """
    url = (url or os.environ.get("REDIS_URL") or DEFAULT_URL).strip()
    shown = redact_url(url)
    secrets = secrets_in_url(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        # urllib's message quotes the host part, where a mistyped password may sit.
        raise _config_error(
            f"cannot parse Redis URL {shown}: percent-encode reserved characters such as "
            "[ ] / ? # @ in the user name and password"
        ) from None
    scheme = parts.scheme
    if scheme not in _SCHEMES + _SENTINEL_SCHEMES:
        raise _config_error(
            f"Redis URL {shown} has scheme {scheme!r}; use one of "
            + ", ".join(f"{s}://" for s in (*_SCHEMES, *_SENTINEL_SCHEMES[:2]))
        )
    span = _userinfo(url)
    if span is not None and not span[2]:
        raise _config_error(
            f"Redis URL {shown} has an '@' after its host part: percent-encode / ? # @ "
            "in the user name, password and options (%2F %3F %23 %40)"
        )
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = [k for k in query if not _known_option(k, sentinel=scheme in _SENTINEL_SCHEMES)]
    if unknown:
        raise _config_error(
            f"Redis URL {shown} has unknown option(s){_named(unknown, shown)} "
            "(percent-encode & = # in option values)"
        )
    tls_options = [k for k in (*query, *options) if k.startswith("ssl")]
    if tls_options and scheme not in _TLS_SCHEMES:
        named = _named(tls_options, shown, always=options)
        raise _config_error(f"TLS option(s){named} need a rediss:// URL, got {shown}")
    if any(v.lower() == "none" for v in query.get("ssl_cert_reqs", [])):
        log.warning("TLS certificate verification is OFF for %s (ssl_cert_reqs=none)", shown)
    if scheme in _SENTINEL_SCHEMES:
        return _sentinel_client(parts, shown, asyncio=asyncio, options=options)
    if scheme != "unix":
        try:
            _address(parts.netloc.rpartition("@")[2], 6379)
        except ValueError as exc:
            raise _config_error(f"Redis URL {shown} has {exc}") from None
        # redis-py quietly uses db 0 for a path it cannot read; the path is not quoted (the
        # tail of a password with an unencoded '/' can land there)
        db = parts.path.strip("/")
        if db and not re.fullmatch(r"[0-9]{1,9}", db):
            raise _config_error(f"Redis URL {shown} has a bad db: write /<number>, e.g. /0")
    target = url
    if scheme in _REDIS_PY_SCHEME:
        target = _REDIS_PY_SCHEME[scheme] + url[url.index(":") :]
    return _client(target, parts, shown, secrets, asyncio=asyncio, cluster=cluster, options=options)


def _client(
    target: str,
    parts: SplitResult,
    shown: str,
    secrets: set[str],
    *,
    asyncio: bool,
    cluster: bool | None,
    options: dict[str, Any],
) -> Any:
    """The client for a checked server URL: a cluster client when the server says it runs in
    cluster mode (or ``cluster`` says so), else a plain one."""
    scheme = parts.scheme
    safe = _safe_options(options, asyncio=asyncio, unix=scheme == "unix")
    if cluster is None:
        cluster = scheme != "unix" and _runs_in_cluster_mode(target, options)
    if cluster:
        if scheme == "unix":
            raise _config_error(f"a Redis Cluster is reached over TCP, not a unix socket: {shown}")
        if parts.path.strip("/") not in ("", "0"):
            raise _config_error(f"Redis URL {shown} names a db; a Redis Cluster has only db 0")
        cls: Any = redis.asyncio.cluster.RedisCluster if asyncio else redis.cluster.RedisCluster
        safe.pop("retry_on_error", None)
    else:
        cls = redis.asyncio.Redis if asyncio else redis.Redis
    try:
        client = cls.from_url(target, **safe)
    except (ValueError, TypeError) as exc:
        raise _config_error(
            f"bad Redis URL or option for {shown}: {_error_text(exc, secrets)}"
        ) from None
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException) as exc:
        # a cluster client reads the slot map at once
        raise _config_error(
            f"cannot reach the Redis Cluster at {shown}: {_error_text(exc, secrets)}"
        ) from None
    return client


#: how long connect() waits for a server to say whether it runs in cluster mode
_PROBE_TIMEOUT_S = 2.0


def _runs_in_cluster_mode(target: str, options: dict[str, Any]) -> bool:
    """Ask the server at ``target`` (``INFO cluster``). A server that cannot be reached or
    refuses the question is taken for a plain server: the client then says so on first use."""
    probe_options = _safe_options(options)
    probe_options["socket_connect_timeout"] = min(
        float(probe_options.get("socket_connect_timeout") or _PROBE_TIMEOUT_S), _PROBE_TIMEOUT_S
    )
    probe_options["socket_timeout"] = _PROBE_TIMEOUT_S
    probe_options.pop("decode_responses", None)
    try:
        probe = redis.Redis.from_url(target, **probe_options)
    except (ValueError, TypeError):
        return False  # the real client's creation reports the bad option
    try:
        reply: Any = probe.execute_command("INFO", "cluster")  # type: ignore[no-untyped-call]
        return str(reply.get("cluster_enabled", 0)) == "1"
    except (redis.exceptions.RedisError, OSError) as exc:
        log.debug("could not ask %s whether it runs in cluster mode: %s", redact_url(target), exc)
        return False
    finally:
        probe.close()


def _sentinel_client(
    parts: SplitResult, shown: str, *, asyncio: bool, options: dict[str, Any]
) -> redis.Redis | redis.asyncio.Redis:
    """The client for ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``:
    a Sentinel-managed pool for the service's primary, with connect()'s safe options."""

    def bad(problem: str) -> ConfigError:
        form = "host:port[,host:port...]/service[/db]"
        return _config_error(f"Sentinel URL {shown} {problem}; write {parts.scheme}://{form}")

    sentinels, service, settings = _parse_sentinel_url(parts, bad)
    sentinel_auth = {
        key: settings.pop(f"sentinel_{key}")
        for key in ("username", "password")
        if f"sentinel_{key}" in settings
    }
    node = _safe_options({**options, **settings}, asyncio=asyncio)
    # The sentinels get the same bounded timeouts and no retry (another sentinel is asked).
    sentinel_kwargs: dict[str, Any] = {
        key: node[key] for key in ("socket_timeout", "socket_connect_timeout", "socket_keepalive")
    }
    sentinel_kwargs["retry"] = _no_retry(asyncio=asyncio)
    sentinel_kwargs.update(sentinel_auth)
    tls = parts.scheme in _TLS_SCHEMES
    if tls:
        sentinel_kwargs.update({k: v for k, v in node.items() if k.startswith("ssl_")}, ssl=True)
    sentinel_kwargs.update(node.pop("sentinel_kwargs", None) or {})
    manager_class: Any = _AsyncSentinel if asyncio else _Sentinel
    manager = manager_class(sentinels, sentinel_kwargs=sentinel_kwargs)
    return manager.master_for(  # type: ignore[no-any-return]
        service,
        redis_class=redis.asyncio.Redis if asyncio else redis.Redis,
        connection_pool_class=_AsyncSentinelPool if asyncio else _SentinelPool,
        ssl=tls,
        **node,
    )


def _no_primary(manager: Any, service: str) -> str:
    addresses = ", ".join(
        "{host}:{port}".format_map(s.connection_pool.connection_kwargs) for s in manager.sentinels
    )
    return f"no sentinel of {addresses} names a primary for service {service!r}"


class _Sentinel(redis.sentinel.Sentinel):
    """redis-py's Sentinel, whose "no master found" says which sentinels were asked in a few
    words instead of the full repr of every sentinel client."""

    def discover_master(self, service_name: str) -> Any:
        try:
            return super().discover_master(service_name)  # type: ignore[no-untyped-call]
        except redis.sentinel.MasterNotFoundError as exc:
            raise redis.sentinel.MasterNotFoundError(_no_primary(self, service_name)) from exc


class _AsyncSentinel(redis.asyncio.sentinel.Sentinel):
    """The asyncio twin of ``_Sentinel``."""

    async def discover_master(self, service_name: str) -> Any:
        try:
            return await super().discover_master(service_name)
        except redis.asyncio.sentinel.MasterNotFoundError as exc:
            raise redis.asyncio.sentinel.MasterNotFoundError(
                _no_primary(self, service_name)
            ) from exc


class _SentinelPool(redis.sentinel.SentinelConnectionPool):
    """The pool of a ``redis+sentinel://`` client: closing the client also closes the
    connections to the sentinels, which connect() opened and nobody else can reach."""

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.sentinel_manager.close()


class _AsyncSentinelPool(redis.asyncio.sentinel.SentinelConnectionPool):
    """The asyncio twin of ``_SentinelPool``."""

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self.sentinel_manager.aclose()


# -- reader connections ------------------------------------------------------------------------


def _connection_settings(client: Any, node: Any) -> tuple[type[Any], dict[str, Any], bool]:
    """The connection class and keyword arguments of ``client``'s connections (on a cluster:
    of its connections to ``node``), and whether they are asyncio connections."""
    pool: Any
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        node = node or client.get_default_node()
        return node.connection_class, dict(node.connection_kwargs), True
    if isinstance(client, redis.cluster.RedisCluster):
        node = node or client.get_default_node()  # type: ignore[no-untyped-call]
        pool = client.get_redis_connection(node).connection_pool
    else:
        pool = getattr(client, "connection_pool", None)
    if pool is None or not hasattr(pool, "connection_kwargs"):
        raise ConfigError(
            f"client {type(client).__name__} is not supported here: pass a redis.Redis, "
            "redis.asyncio.Redis or a RedisCluster client of either"
        )
    is_async = isinstance(pool, redis.asyncio.ConnectionPool)
    return pool.connection_class, dict(pool.connection_kwargs), is_async


def reader_connection(
    client: Any,
    *,
    encoding: str | None,
    read_timeout_s: float,
    name: str | None = None,
    node: Any = None,
) -> Any:
    """A new connection, configured like ``client``'s pool, for one consumer's blocking reads.

    It decodes replies itself (hiredis, in C) as the consumer asked, whatever the client's
    ``decode_responses``; undecodable bytes survive as surrogate escapes instead of breaking the
    read (an error there would strand the entries it delivered). ``name`` becomes the
    connection's CLIENT SETNAME (``conveyor:<name>``), so ``CLIENT LIST`` shows which consumer a
    connection serves. Works for sync and asyncio clients alike: the pool says which connection
    class to use. Behind Sentinel, the connection asks the sentinels for the primary each time
    it connects, as the pool's own connections do. On a cluster, a connection to ``node``.
    """
    connection_class: Any
    connection_class, kwargs, is_async = _connection_settings(client, node)
    kwargs.update(
        decode_responses=encoding is not None,
        encoding=encoding or "utf-8",
        encoding_errors="surrogateescape",
        socket_timeout=read_timeout_s,
        retry=_no_retry(asyncio=is_async),
        health_check_interval=0,
    )
    if not issubclass(connection_class, _UNIX_CONNECTIONS):
        kwargs["socket_keepalive"] = True
    if name is not None:
        safe = "".join(ch if ch.isprintable() and ch != " " else "_" for ch in name)
        kwargs["client_name"] = "conveyor:" + safe
    if issubclass(connection_class, redis.sentinel.SentinelManagedConnection):
        connection_class = _sentinel_reader_class(connection_class)
    elif issubclass(connection_class, redis.asyncio.sentinel.SentinelManagedConnection):
        connection_class = _async_sentinel_reader_class(connection_class)
    return connection_class(**kwargs)


_UNIX_CONNECTIONS = (redis.UnixDomainSocketConnection, redis.asyncio.UnixDomainSocketConnection)

# A Sentinel-managed connection finds the primary in connect(), but redis-py's
# send_packed_command() connects through connect_check_health(), which goes straight to the
# host and port in the pool's kwargs (localhost:6379): a reader sending its first command
# would read from whatever listens there. Readers route every connect through the lookup.


@functools.cache
def _sentinel_reader_class(base: type[Any]) -> type[Any]:
    def connect_check_health(
        self: Any, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self._sock is not None or self.__dict__.get("_looking_up"):
            base.connect_check_health(self, check_health, retry_socket_connect)
            return
        self._looking_up = True
        try:
            self.connect()  # asks the sentinels, then connect_to(primary) comes back here
        finally:
            self._looking_up = False

    return type(f"Reader{base.__name__}", (base,), {"connect_check_health": connect_check_health})


@functools.cache
def _async_sentinel_reader_class(base: type[Any]) -> type[Any]:
    async def connect_check_health(
        self: Any, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self.is_connected or self.__dict__.get("_looking_up"):
            await base.connect_check_health(self, check_health, retry_socket_connect)
            return
        self._looking_up = True
        try:
            await self.connect()
        finally:
            self._looking_up = False

    return type(f"Reader{base.__name__}", (base,), {"connect_check_health": connect_check_health})


def describe(client_or_conn: Any) -> str:
    """``host:port`` (or socket path) of a client or connection, never with credentials.

    Behind Sentinel: the primary's address when it is known, and the service, e.g.
    ``10.0.0.5:6379 (sentinel service mymaster)``.
    """
    if isinstance(client_or_conn, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster):
        nodes = sorted(n.name for n in client_or_conn.get_primaries())
        shown = ", ".join(nodes[:3]) + (", ..." if len(nodes) > 3 else "")
        return f"Redis Cluster ({shown})"
    pool = getattr(client_or_conn, "connection_pool", None)
    try:
        service = getattr(pool, "service_name", None)
        primary = getattr(pool, "master_address", None)
    except ReferenceError:  # the weak proxy of a closed asyncio Sentinel pool
        service = primary = None
    if service is not None:
        where = f"sentinel service {service}"
        if primary:
            return f"{primary[0]}:{primary[1]} ({where})"
        return where
    kwargs = getattr(pool, "connection_kwargs", None)
    if kwargs is not None:  # a client: what its pool connects to
        path, host, port = kwargs.get("path"), kwargs.get("host"), kwargs.get("port")
    else:  # a connection
        path = getattr(client_or_conn, "path", None)
        host = getattr(client_or_conn, "host", None)
        port = getattr(client_or_conn, "port", None)
    if path:
        return str(path)
    return f"{host or '?'}:{port or '?'}"
