"""Clients and connections with settings that are safe for streams.

redis-py's defaults are wrong for stream consumers (PITFALLS 2): a ``socket_timeout`` shorter than
a blocking read, and automatic retries that append an XADD twice or strand the entries of a lost
XREADGROUP reply. ``connect()`` builds a client without them; consumers open their own reader
connection, sized to their longest blocking read, so acks never wait behind it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Literal, overload
from urllib.parse import parse_qs, urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.backoff import NoBackoff
from redis.retry import Retry

from conveyor.errors import ConfigError

__all__ = ["DEFAULT_URL", "connect", "reader_connection", "redact_url"]

log = logging.getLogger("conveyor.connection")

DEFAULT_URL = "redis://localhost:6379/0"
_SCHEMES = ("redis", "rediss", "unix", "valkey", "valkeys")
#: seconds a reply may take beyond the longest server-side block before the link counts as dead
READ_MARGIN_S = 10.0


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, fit for logs and error messages.

    >>> redact_url("redis://user:secret@host:6379/0")
    'redis://user:***@host:6379/0'
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def _no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


def _safe_options(overrides: dict[str, Any]) -> dict[str, Any]:
    options: dict[str, Any] = {
        "socket_timeout": 10.0,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "retry": _no_retry(),
        "retry_on_error": [],
    }
    options.update(overrides)
    return options


@overload
def connect(
    url: str | None = None, *, asyncio: Literal[False] = False, **options: Any
) -> redis.Redis: ...
@overload
def connect(
    url: str | None = None, *, asyncio: Literal[True], **options: Any
) -> redis.asyncio.Redis: ...
def connect(
    url: str | None = None, *, asyncio: bool = False, **options: Any
) -> redis.Redis | redis.asyncio.Redis:
    """A client for ``url`` (else ``$REDIS_URL``, else ``redis://localhost:6379/0``).

    Safe for streams: no automatic retry (a retried XADD can append twice), TCP keepalive on,
    bounded connect and command timeouts. ``rediss://`` enables TLS; pass ``ssl_ca_certs``,
    ``ssl_certfile`` and ``ssl_keyfile`` for a private CA and client certificates. Any other
    keyword goes to ``redis.Redis`` as it is.

    >>> r = connect("redis://localhost:6379/0")   # doctest: +SKIP
    >>> ar = connect(asyncio=True)                 # doctest: +SKIP
    """
    url = url or os.environ.get("REDIS_URL") or DEFAULT_URL
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise ConfigError(f"cannot parse Redis URL {shown}: {exc}") from None
    if parts.scheme not in _SCHEMES:
        raise ConfigError(
            f"Redis URL {shown} has scheme {parts.scheme!r}; use one of "
            + ", ".join(f"{s}://" for s in _SCHEMES)
        )
    query = parse_qs(parts.query)
    tls_options = sorted(k for k in (*query, *options) if k.startswith("ssl"))
    if tls_options and parts.scheme not in ("rediss", "valkeys"):
        raise ConfigError(
            f"TLS option(s) {', '.join(tls_options)} need a rediss:// URL, got {shown}"
        )
    if any(v.lower() == "none" for v in query.get("ssl_cert_reqs", [])):
        log.warning("TLS certificate verification is OFF for %s (ssl_cert_reqs=none)", shown)
    cls: Any = redis.asyncio.Redis if asyncio else redis.Redis
    try:
        client = cls.from_url(url, **_safe_options(options))
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"bad Redis URL or option for {shown}: {_scrub(str(exc), parts)}"
        ) from None
    return client  # type: ignore[no-any-return]


def _scrub(text: str, parts: Any) -> str:
    password = parts.password
    return text.replace(password, "***") if password else text


def reader_connection(
    client: Any, *, encoding: str | None, read_timeout_s: float, name: str | None = None
) -> Any:
    """A new connection, configured like ``client``'s pool, for one consumer's blocking reads.

    It decodes replies itself (hiredis, in C) as the consumer asked, whatever the client's
    ``decode_responses``; undecodable bytes survive as surrogate escapes instead of breaking the
    read (an error there would strand the entries it delivered). ``name`` becomes the
    connection's CLIENT SETNAME (``conveyor:<name>``), so ``CLIENT LIST`` shows which consumer a
    connection serves. Works for sync and asyncio
    clients alike: the pool says which connection class to use.
    """
    pool = getattr(client, "connection_pool", None)
    if pool is None or not hasattr(pool, "connection_kwargs"):
        raise ConfigError(
            f"client {type(client).__name__} is not supported here: pass a redis.Redis or "
            "redis.asyncio.Redis (Redis Cluster clients are not supported yet)"
        )
    kwargs = dict(pool.connection_kwargs)
    kwargs.update(
        decode_responses=encoding is not None,
        encoding=encoding or "utf-8",
        encoding_errors="surrogateescape",
        socket_timeout=read_timeout_s,
        socket_keepalive=True,
        retry=_no_retry(),
        health_check_interval=0,
    )
    if name is not None:
        safe = "".join(ch if ch.isprintable() and ch != " " else "_" for ch in name)
        kwargs["client_name"] = "conveyor:" + safe
    return pool.connection_class(**kwargs)


def describe(client_or_conn: Any) -> str:
    """``host:port`` (or socket path) of a client or connection, never with credentials."""
    pool = getattr(client_or_conn, "connection_pool", None)
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
