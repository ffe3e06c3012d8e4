"""Clients and connections with settings that are safe for streams, and URLs without secrets.

redis-py's defaults are wrong for stream consumers (PITFALLS 2): a ``socket_timeout`` shorter than
a blocking read, and automatic retries that append an XADD twice or strand the entries of a lost
XREADGROUP reply. ``connect()`` builds a client without them, for a server, a Sentinel-managed
primary or a unix socket; consumers open their own reader connection, sized to their longest
blocking read, so acks never wait behind it.

A Sentinel-managed pool is not a host:port pool (PITFALLS 23): its connections find the primary
by asking the sentinels, so reader connections are built to do the same on every (re)connect.

Passwords never leave this module in a message: ``redact_url`` hides the user-info password (even
one with unencoded ``/ ? # @``) and ``password=`` options, and every error about a URL names the
redacted URL only.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal, overload
from urllib.parse import SplitResult, parse_qs, unquote, unquote_plus, urlsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import NoBackoff
from redis.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.retry import Retry

from conveyor.errors import ConfigError

__all__ = [
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
DEFAULT_SENTINEL_PORT = 26379
#: seconds a reply may take beyond the longest server-side block before the link counts as dead
READ_MARGIN_S = 10.0

#: a ``...password=value`` query option; the value runs to the next ``&name=`` (so an unencoded
#: ``&``, ``#`` or ``@`` inside it stays hidden) or to the end
_QUERY_SECRET = re.compile(r"(?i)((?:^|[?&;])[\w.-]*password=)(.*?)(?=&[\w.-]+=|$)", re.DOTALL)


# -- secrets -----------------------------------------------------------------------------------


def _userinfo(url: str) -> tuple[int, int, bool] | None:
    """Where the user-info of ``url`` starts and ends (the ``@``), and whether a plain URL parser
    would have found it there: ``None`` when there is none.

    The user-info ends at the last ``@`` outside the secret query options: a password may hold
    unencoded ``/ ? # @``, which end the host part for ``urlsplit`` (it then finds no password
    at all, and the password shows up as path, query or fragment).
    """
    start = url.find("://")
    start = 0 if start < 0 else start + 3
    masked = _QUERY_SECRET.sub(lambda m: m.group(1) + "*" * len(m.group(2)), url)
    at = masked.rfind("@")
    if at < start:
        return None
    host_end = next((i for i in range(start, len(masked)) if masked[i] in "/?#"), len(masked))
    return start, at, at < host_end


def redact_url(url: str) -> str:
    """``url`` with its password and ``password=`` options replaced by ``***``, fit for logs and
    error messages, whatever the URL holds.

    >>> redact_url("redis://user:secret@host:6379/0")
    'redis://user:***@host:6379/0'
    >>> redact_url("redis+sentinel://:p/w#d@s1:26379,s2:26379/mymaster?sentinel_password=x")
    'redis+sentinel://:***@s1:26379,s2:26379/mymaster?sentinel_password=***'
    """
    span = _userinfo(url)
    if span is None:
        return _QUERY_SECRET.sub(r"\1***", url)
    start, at, plain = span
    user, colon, _password = url[start:at].partition(":")
    # Without a colon it is a user name, unless the URL is so broken that it may be anything.
    shown = f"{user}:***" if colon else (user if plain else "***")
    return url[:start] + shown + _QUERY_SECRET.sub(r"\1***", url[at:])


def secrets_in_url(url: str) -> set[str]:
    """Every secret text in ``url``, as written and percent-decoded: the password and the values
    of ``password=`` options. For scrubbing messages that may quote them.

    >>> sorted(secrets_in_url("redis://u:p%40ss@h/0"))
    ['p%40ss', 'p@ss']
    """
    found: list[str] = []
    span = _userinfo(url)
    rest = url
    if span is not None:
        start, at, plain = span
        _user, colon, password = url[start:at].partition(":")
        if colon:
            found.append(password)
        elif not plain:
            found.append(url[start:at])
        rest = url[at:]
    found += [m.group(2) for m in _QUERY_SECRET.finditer(rest)]
    decoded = [f(s) for s in found for f in (unquote, unquote_plus)]
    return {s for s in (*found, *decoded) if s}


def _error_text(exc: BaseException, secrets: Iterable[str]) -> str:
    """``exc``'s message without the secrets it may quote (the exception's name if a secret
    too short to replace safely shows up in it)."""
    text = str(exc)
    for secret in sorted(secrets, key=len, reverse=True):
        if secret in text:
            if len(secret) < 4:
                return type(exc).__name__
            text = text.replace(secret, "***")
    return text


def _config_error(message: str) -> ConfigError:
    """A ConfigError whose message is one line."""
    return ConfigError(" ".join(message.split()))


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
    cls: Any = redis.asyncio.Redis if asyncio else redis.Redis
    target = url
    if scheme in _REDIS_PY_SCHEME:
        target = _REDIS_PY_SCHEME[scheme] + url[url.index(":") :]
    try:
        client = cls.from_url(
            target, **_safe_options(options, asyncio=asyncio, unix=scheme == "unix")
        )
    except (ValueError, TypeError) as exc:
        raise _config_error(
            f"bad Redis URL or option for {shown}: {_error_text(exc, secrets)}"
        ) from None
    return client  # type: ignore[no-any-return]


def _named(names: Iterable[str], shown: str, always: Iterable[str] = ()) -> str:
    """`` a, b``: the option names that the redacted URL ``shown`` shows (a name that it does
    not show came out of a secret value with an unencoded ``&`` in it), and those in
    ``always`` (keyword arguments)."""
    keywords = set(always)
    visible = sorted(
        {
            n
            for n in names
            if n in keywords or re.search(rf"(?:^|[?&;]){re.escape(n)}(?:[=&;#]|$)", shown)
        }
    )
    return " " + ", ".join(visible) if visible else ""


def _address(text: str, default_port: int) -> tuple[str, int]:
    """``(host, port)`` of ``host[:port]`` or ``[ipv6][:port]``. The ValueError says what is
    wrong without quoting the text (a mistyped URL may hold a password there)."""
    if text.startswith("["):
        host, bracket, tail = text[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError("a bad IPv6 address: write [address]:port")
        port_text = tail[1:] if tail else None
    else:
        host, colon, after = text.partition(":")
        port_text = after if colon else None
    if port_text is None:
        return host, default_port
    if not re.fullmatch(r"[0-9]{1,5}", port_text) or not 0 < int(port_text) <= 65535:
        raise ValueError("a bad port: use a number from 1 to 65535")
    return host, int(port_text)


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


def _parse_sentinel_url(
    parts: SplitResult, bad: Callable[[str], ConfigError]
) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """The sentinels' addresses, the service and the connection settings of a Sentinel URL."""
    hosts = parts.netloc.rpartition("@")[2]
    if not hosts:
        raise bad("names no sentinel")
    sentinels: list[tuple[str, int]] = []
    for item in hosts.split(","):
        try:
            host, port = _address(item, DEFAULT_SENTINEL_PORT)
        except ValueError as exc:
            raise bad(f"has {exc}") from None
        if not host:
            raise bad("has an empty sentinel address")
        sentinels.append((unquote(host), port))
    path = [unquote(p) for p in parts.path.split("/")[1:]]
    if len(path) > 1 and path[-1] == "":
        path.pop()  # a trailing slash
    if not path or not path[0]:
        raise bad("names no service")
    if len(path) > 2:
        raise bad("has more than a service and a db in its path")

    settings: dict[str, Any] = {}
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        parser: Any = URL_QUERY_ARGUMENT_PARSERS.get(name)
        if parser is not None:
            try:
                settings[name] = parser(values[-1])
            except (TypeError, ValueError):
                raise bad(f"has a bad value for option {name!r}") from None
        else:  # connect() refused unknown options already
            settings[name] = values[-1]
    if len(path) == 2:
        if not re.fullmatch(r"[0-9]+", path[1]):
            raise bad("has a bad db: use a number")
        settings["db"] = int(path[1])
    if parts.username:
        settings["username"] = unquote(parts.username)
    if parts.password:
        settings["password"] = unquote(parts.password)
    return sentinels, path[0], settings


#: URL options that are strings (numbers and flags: those redis-py has a parser for)
_STR_OPTIONS = frozenset(
    {
        "username",
        "password",
        "client_name",
        "lib_name",
        "lib_version",
        "encoding",
        "encoding_errors",
    }
)


def _known_option(name: str, *, sentinel: bool) -> bool:
    """Whether a URL option is one the connections take: redis-py hands any other one to the
    connection class, which fails at the first command, far from the URL."""
    if name in URL_QUERY_ARGUMENT_PARSERS or name in _STR_OPTIONS or name.startswith("ssl_"):
        return True
    return sentinel and name in ("sentinel_username", "sentinel_password")


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


def reader_connection(
    client: Any, *, encoding: str | None, read_timeout_s: float, name: str | None = None
) -> Any:
    """A new connection, configured like ``client``'s pool, for one consumer's blocking reads.

    It decodes replies itself (hiredis, in C) as the consumer asked, whatever the client's
    ``decode_responses``; undecodable bytes survive as surrogate escapes instead of breaking the
    read (an error there would strand the entries it delivered). ``name`` becomes the
    connection's CLIENT SETNAME (``conveyor:<name>``), so ``CLIENT LIST`` shows which consumer a
    connection serves. Works for sync and asyncio clients alike: the pool says which connection
    class to use. Behind Sentinel, the connection asks the sentinels for the primary each time
    it connects, as the pool's own connections do.
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
        retry=_no_retry(asyncio=isinstance(pool, redis.asyncio.ConnectionPool)),
        health_check_interval=0,
    )
    connection_class = pool.connection_class
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
