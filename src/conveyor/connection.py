"""Clients and connections with settings that are safe for streams, and URLs without secrets.

redis-py's defaults are wrong for stream consumers (PITFALLS 2): a ``socket_timeout`` shorter than
a blocking read, and automatic retries that append an XADD twice or strand the entries of a lost
XREADGROUP reply. ``connect()`` builds a client without them, for a server, a Sentinel-managed
primary or a unix socket; consumers open their own reader connection, sized to their longest
blocking read, so acks never wait behind it.

A Sentinel-managed pool is not a host:port pool (PITFALLS 23): its connections find the primary
by asking the sentinels, so reader connections are built to do the same on every (re)connect.

URLs and their secrets are ``_urls``'s: every error about a URL names the redacted URL only.

TLS stays verified unless the caller turns it off, and then every client made says so (PITFALLS
17). Certificate files are checked when the client is made, so a wrong path is a ConfigError
naming the option, not a failure at the first command. A handshake that fails, or a server that
hangs up right after it (its verdict on our client certificate comes after the handshake in TLS
1.3, as an alert that redis-py's first write can miss), raises ``TlsFailure``: which certificate
problem it was and which option to check, in one line.
"""

from __future__ import annotations

import asyncio as _asyncio
import contextlib
import functools
import logging
import os
import re
import socket
import ssl
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
    "TlsFailure",
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


#: a path of a TLS file: str or os.PathLike
TlsPath = str | os.PathLike[str]


@overload
def connect(
    url: str | None = None,
    *,
    asyncio: Literal[False] = False,
    cluster: bool | None = None,
    tls_ca: TlsPath | None = None,
    tls_cert: TlsPath | None = None,
    tls_key: TlsPath | None = None,
    tls_insecure: bool = False,
    **options: Any,
) -> Any: ...
@overload
def connect(
    url: str | None = None,
    *,
    asyncio: Literal[True],
    cluster: bool | None = None,
    tls_ca: TlsPath | None = None,
    tls_cert: TlsPath | None = None,
    tls_key: TlsPath | None = None,
    tls_insecure: bool = False,
    **options: Any,
) -> Any: ...
def connect(
    url: str | None = None,
    *,
    asyncio: bool = False,
    cluster: bool | None = None,
    tls_ca: TlsPath | None = None,
    tls_cert: TlsPath | None = None,
    tls_key: TlsPath | None = None,
    tls_insecure: bool = False,
    **options: Any,
) -> Any:
    """A client for ``url`` (else ``$REDIS_URL``, else ``redis://localhost:6379/0``).

    A redis.Redis (``asyncio=True``: redis.asyncio.Redis); when the server at the URL runs in
    cluster mode, a ``redis.cluster.RedisCluster`` (``redis.asyncio.cluster.RedisCluster``)
    that finds every node from that one. ``cluster=True`` or ``False`` skips the question to
    the server (which connect() otherwise asks once, with ``INFO cluster``).

    Safe for streams: no automatic retry (a retried XADD can append twice), TCP keepalive on,
    bounded connect and command timeouts. Any other keyword goes to ``redis.Redis`` as it is.

    TLS: ``rediss://`` (``valkeys://``, ``rediss+sentinel://``) verifies the server's
    certificate and host name. ``tls_ca`` is the CA file to trust (else the system's),
    ``tls_cert`` and ``tls_key`` the client certificate and its key, for servers that ask for
    one (redis-py's names ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` work too; one
    spelling per setting). A file that cannot be read is a ConfigError naming the option.
    ``tls_insecure=True`` (or ``ssl_cert_reqs="none"``, as keyword or in the URL) turns the
    verification off and logs a warning each time a client is made. A handshake that fails
    raises ``TlsFailure`` (a ``redis.ConnectionError``) at the first command, naming the
    certificate problem.

    ``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]`` gives a client
    for the primary of ``service`` that asks the sentinels where it is on every reconnect, so
    it follows a failover (``rediss+sentinel://``: TLS to the sentinels and the servers). The
    password is the servers'; a sentinel that wants one of its own gets
    ``?sentinel_password=...`` (and ``sentinel_username``). ``valkey://`` and ``valkeys://``
    work as well. A URL that cannot work raises ConfigError, whose message never holds a
    password.

    >>> r = connect("redis://localhost:6379/0")   # doctest: +SKIP
    >>> ar = connect(asyncio=True)                 # doctest: +SKIP
    >>> r = connect("rediss://redis.example:6380/0", tls_ca="ca.pem")   # doctest: +SKIP
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
    keywords = {"tls_ca": tls_ca, "tls_cert": tls_cert, "tls_key": tls_key}
    options, spelled = _tls_keywords(keywords, tls_insecure, options, query)
    tls_options = [k for k in (*query, *options) if k.startswith("ssl")]
    if tls_options and scheme not in _TLS_SCHEMES:
        names = [spelled.get(k, k) for k in tls_options]
        named = _named(names, shown, always=[spelled.get(k, k) for k in options])
        raise _config_error(f"TLS option(s){named} need a rediss:// URL, got {shown}")
    if tls_options:
        _check_tls_files(options, query, spelled)
        _warn_if_unverified(options, query, spelled, shown)
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


# -- TLS settings ------------------------------------------------------------------------------

#: connect()'s TLS keywords and redis-py's names for the same settings
_TLS_KEYWORDS = {"tls_ca": "ssl_ca_certs", "tls_cert": "ssl_certfile", "tls_key": "ssl_keyfile"}
_FALSE_TEXTS = ("0", "f", "false", "n", "no", "off")


def _tls_keywords(
    keywords: dict[str, TlsPath | None],
    insecure: bool,
    options: dict[str, Any],
    query: dict[str, list[str]],
) -> tuple[dict[str, Any], dict[str, str]]:
    """``options`` with the ``tls_*`` keywords in redis-py's spelling, and which redis-py name
    the caller spelled how (``{"ssl_ca_certs": "tls_ca"}``), for messages."""
    options = dict(options)
    spelled: dict[str, str] = {}
    wanted = {k: os.fspath(v) for k, v in keywords.items() if v is not None}
    if insecure:
        wanted["tls_insecure"] = "none"
    for keyword, value in wanted.items():
        option = _TLS_KEYWORDS.get(keyword, "ssl_cert_reqs")
        if option in options or option in query:
            where = "" if option in options else " in the URL"
            raise _config_error(
                f"{keyword} and {option}{where} are the same setting: pass only one of them"
            )
        options[option] = value
        spelled[option] = keyword
    return options, spelled


def _given(option: str, options: dict[str, Any], query: dict[str, list[str]]) -> Any:
    """The value of a TLS option given as keyword or (its last value) in the URL."""
    if option in options:
        return options[option]
    values = query.get(option)
    return values[-1] if values else None


def _refuse_password_prompt() -> str:
    raise _TlsKeyEncrypted


class _TlsKeyEncrypted(Exception):
    """The key file wants a password: OpenSSL would ask for it on the terminal."""


def _check_tls_files(
    options: dict[str, Any], query: dict[str, list[str]], spelled: dict[str, str]
) -> None:
    """Refuse, naming the option and the path, TLS files that cannot be read or do not hold
    what they should: a CA certificate, a client certificate and its key."""
    paths: dict[str, str] = {}
    for option in _TLS_KEYWORDS.values():
        value = _given(option, options, query)
        if value is None or value == "":
            continue
        name, path = spelled.get(option, option), os.fspath(value)
        try:
            with open(path, "rb"):
                pass
        except FileNotFoundError:
            raise _config_error(f"{name} file {path} does not exist") from None
        except IsADirectoryError:
            raise _config_error(f"{name} {path} is a directory, not a file") from None
        except OSError as exc:
            raise _config_error(f"{name} file {path} cannot be read: {exc.strerror}") from None
        paths[option] = path
    context = ssl.create_default_context()
    if "ssl_ca_certs" in paths:
        try:
            context.load_verify_locations(cafile=paths["ssl_ca_certs"])
        except ssl.SSLError as exc:
            name = spelled.get("ssl_ca_certs", "ssl_ca_certs")
            raise _config_error(
                f"{name} file {paths['ssl_ca_certs']} holds no CA certificate in PEM form "
                f"({_ssl_text(exc)})"
            ) from None
    cert, key = paths.get("ssl_certfile"), paths.get("ssl_keyfile")
    cert_name = spelled.get("ssl_certfile", "ssl_certfile")
    key_name = spelled.get("ssl_keyfile", "ssl_keyfile")
    if key is not None and cert is None:
        cert_name = "tls_cert" if key_name == "tls_key" else cert_name
        raise _config_error(f"{key_name} needs {cert_name}: the certificate the key belongs to")
    if cert is None:
        return
    password = _given("ssl_password", options, query)
    try:
        context.load_cert_chain(cert, key, password=password or _refuse_password_prompt)
    except _TlsKeyEncrypted:
        raise _config_error(
            f"the key in {key or cert} is encrypted: pass its password as ssl_password"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        files = f"{cert_name} {cert}" + (f" and {key_name} {key}" if key else "")
        raise _config_error(
            f"{files}: not a certificate and its private key in PEM form ({_ssl_text(exc)})"
        ) from None


def _warn_if_unverified(
    options: dict[str, Any], query: dict[str, list[str]], spelled: dict[str, str], shown: str
) -> None:
    """A warning, each time a client is made, when the server's certificate or host name
    goes unchecked (PITFALLS 17: never silently)."""
    reqs = _given("ssl_cert_reqs", options, query)
    if ("ssl_cert_reqs" in options or "ssl_cert_reqs" in query) and (
        reqs is None or reqs == ssl.CERT_NONE or str(reqs).lower() == "none"
    ):
        how = spelled.get("ssl_cert_reqs")
        source = "tls_insecure" if how == "tls_insecure" else "ssl_cert_reqs=none"
        log.warning(
            "TLS certificate verification is OFF for %s (%s): the server is not authenticated, "
            "anyone on the way can read and change the traffic",
            shown,
            source,
        )
        return
    check = _given("ssl_check_hostname", options, query)
    if check is False or (isinstance(check, str) and check.lower() in _FALSE_TEXTS):
        log.warning(
            "TLS host name checking is OFF for %s (ssl_check_hostname=False): any certificate "
            "the CA signed is accepted",
            shown,
        )


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
    pool = getattr(client, "connection_pool", None)
    # redis-py's URL parser picks the connection class, over a keyword: swapped before use
    if getattr(pool, "connection_class", None) is redis.SSLConnection:
        pool.connection_class = _TlsConnection  # type: ignore[union-attr]
    elif getattr(pool, "connection_class", None) is redis.asyncio.SSLConnection:
        pool.connection_class = _AsyncTlsConnection  # type: ignore[union-attr]
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
    if tls:
        tls_class = _AsyncTlsSentinelConnection if asyncio else _TlsSentinelConnection
        node.setdefault("connection_class", tls_class)
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


# -- TLS failures ------------------------------------------------------------------------------


class TlsFailure(redis.exceptions.ConnectionError):
    """A TLS connection to ``where`` could not be made: ``problem`` says which certificate
    problem, ``hint`` what to check (in connect()'s keyword names), e.g. ``TLS to
    127.0.0.1:6380 failed: certificate verify failed: unable to get local issuer certificate
    (check tls_ca)``. A ``redis.ConnectionError``, so code that handles lost connections handles
    it; waiting does not cure it, though."""

    def __init__(self, where: str, problem: str, hint: str | None = None) -> None:
        self.where, self.problem, self.hint = where, problem, hint
        super().__init__(f"TLS to {where} failed: {problem}" + (f" ({hint})" if hint else ""))

    def __reduce__(self) -> Any:
        return type(self), (self.where, self.problem, self.hint)


#: X509 verify codes: the certificate names another host; it expired; it is not valid yet
_NAME_MISMATCH = frozenset({62, 63, 64})
_EXPIRED, _NOT_YET_VALID = 10, 9
#: alerts of a server that refused our client certificate (not "certificate required")
_CLIENT_CERT_REFUSED = (
    "ALERT_CERTIFICATE_EXPIRED",
    "ALERT_UNKNOWN_CA",
    "ALERT_BAD_CERTIFICATE",
    "ALERT_CERTIFICATE_UNKNOWN",
    "ALERT_CERTIFICATE_REVOKED",
    "ALERT_UNSUPPORTED_CERTIFICATE",
    "ALERT_DECRYPT_ERROR",
)
#: a peer that does not speak TLS, seen from a TLS client
_NOT_TLS = ("WRONG_VERSION_NUMBER", "PACKET_LENGTH_TOO_LONG", "RECORD_LAYER_FAILURE")
#: seconds a diagnosis waits for the alert of a server that hung up after the handshake
_PROBE_S = 2.0


def _ssl_text(exc: BaseException) -> str:
    """OpenSSL's words without the ``[LIB: CODE]`` prefix and the ``(_ssl.c:123)`` suffix."""
    text = exc.args[1] if len(exc.args) > 1 and isinstance(exc.args[1], str) else str(exc)
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return re.sub(r"\s*\(_ssl\.c:\d+\)$", "", text).rstrip(".").strip() or type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _explain(where: str, ssl_error: ssl.SSLError, *, has_cert: bool) -> TlsFailure:
    """What an OpenSSL error of a client's handshake means, and what to check."""
    if isinstance(ssl_error, ssl.SSLCertVerificationError):
        code, words = ssl_error.verify_code, (ssl_error.verify_message or "").rstrip(".")
        problem = f"certificate verify failed: {words or _ssl_text(ssl_error)}"
        if code in _NAME_MISMATCH:
            return TlsFailure(where, problem, "the server's certificate is for another name")
        if code == _EXPIRED:
            return TlsFailure(where, problem, "the server's certificate must be renewed")
        if code == _NOT_YET_VALID:
            return TlsFailure(where, problem, "check the clocks")
        return TlsFailure(where, problem, "check tls_ca")
    reason = ssl_error.reason or ""
    words = _ssl_text(ssl_error)
    if "CERTIFICATE_REQUIRED" in reason or (
        not has_cert and reason.endswith("ALERT_HANDSHAKE_FAILURE")
    ):
        return TlsFailure(
            where, f"the server requires a client certificate: {words}", "pass tls_cert/tls_key"
        )
    if any(reason.endswith(alert) for alert in _CLIENT_CERT_REFUSED):
        return TlsFailure(
            where, f"the server refused the client certificate: {words}", "check tls_cert"
        )
    if reason in _NOT_TLS:
        return TlsFailure(
            where, f"the server does not speak TLS there: {words}", "use redis:// or its TLS port"
        )
    return TlsFailure(where, words)


def _hung_up(exc: BaseException) -> bool:
    """``exc`` is the server closing a connection (EOF, reset, broken pipe): after a TLS
    handshake, the way a server that refused our certificate is seen by a writer."""
    if isinstance(exc, redis.exceptions.AuthenticationError | redis.exceptions.AuthorizationError):
        return False
    links = _chain(exc)
    if any(isinstance(e, ssl.SSLEOFError | ConnectionResetError | BrokenPipeError) for e in links):
        return True
    return "Connection closed by server" in str(exc)


class _TlsDiagnosis:
    """For redis-py's TLS connection classes: a failed connect raises TlsFailure naming the
    certificate problem. A server that hung up right after the handshake is asked once more,
    on a connection of its own that only reads, for the alert it sends (TLS 1.3 tells the
    client of a refused certificate after the handshake, so redis-py's first write may meet a
    closed socket instead of the alert)."""

    host: str
    port: int

    def _diagnosis(self, exc: BaseException, alert: ssl.SSLError | None) -> TlsFailure | None:
        if isinstance(exc, TlsFailure):
            return None
        where = f"{self.host}:{self.port}"
        has_cert = bool(getattr(self, "certfile", None))
        for link in _chain(exc):
            if isinstance(link, ssl.SSLError) and not isinstance(link, ssl.SSLEOFError):
                return _explain(where, link, has_cert=has_cert)
        if alert is not None:
            return _explain(where, alert, has_cert=has_cert)
        return None


def _read_alert(sock: socket.socket) -> ssl.SSLError | None:
    try:
        sock.settimeout(_PROBE_S)
        sock.recv(64)
    except ssl.SSLError as exc:
        return exc
    except OSError:
        pass
    finally:
        sock.close()
    return None


class _TlsConnection(_TlsDiagnosis, redis.SSLConnection):
    """redis-py's SSLConnection whose failures name the certificate problem."""

    def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        try:
            super().connect_check_health(check_health, retry_socket_connect)
        except redis.exceptions.ConnectionError as exc:
            alert = None
            if _hung_up(exc):
                try:
                    alert = _read_alert(redis.SSLConnection._connect(self))  # type: ignore[no-untyped-call]
                except ssl.SSLError as again:
                    alert = again
                except OSError:
                    pass
            failure = self._diagnosis(exc, alert)
            if failure is None:
                raise
            raise failure from exc


class _TlsSentinelConnection(_TlsConnection, redis.sentinel.SentinelManagedSSLConnection):
    """The same, for the primary a Sentinel names."""


async def _read_alert_async(conn: Any) -> ssl.SSLError | None:
    try:
        reader, writer = await _asyncio.wait_for(
            _asyncio.open_connection(**conn._connection_arguments()), _PROBE_S
        )
    except ssl.SSLError as exc:
        return exc
    except (OSError, TimeoutError):
        return None
    try:
        await _asyncio.wait_for(reader.read(64), _PROBE_S)
    except ssl.SSLError as exc:
        return exc
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await _asyncio.wait_for(writer.wait_closed(), _PROBE_S)
    return None


class _AsyncTlsConnection(_TlsDiagnosis, redis.asyncio.SSLConnection):
    """The asyncio twin of ``_TlsConnection``."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        try:
            await super().connect_check_health(check_health, retry_socket_connect)
        except redis.exceptions.ConnectionError as exc:
            alert = await _read_alert_async(self) if _hung_up(exc) else None
            failure = self._diagnosis(exc, alert)
            if failure is None:
                raise
            raise failure from exc


class _AsyncTlsSentinelConnection(
    _AsyncTlsConnection, redis.asyncio.sentinel.SentinelManagedSSLConnection
):
    """The asyncio twin of ``_TlsSentinelConnection``."""


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
