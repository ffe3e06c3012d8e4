"""Long-running commands (``run``, ``exporter``, ``monitor --watch``) outlast server outages:
started before their server is up, they wait for it, with a capped backoff, saying so once
when the wait starts and once when the server answers. A signal stops the wait.

Errors that waiting cannot fix (a URL that cannot be parsed, a wrong password, a database the
server does not have) end the command at once, as one line.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    ClusterError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
)
from redis.exceptions import (
    TimeoutError as RedisTimeoutError,
)

import conveyor
from conveyor._cluster import is_cluster
from conveyor._core.policy import reconnect_delay_ms
from conveyor.cli import (
    CliError,
    _one_line,
    cli_connect,
    connect_error,
    tls_failure_in,
    tls_options,
)
from conveyor.cli._common import check_url
from conveyor.connection import DEFAULT_URL, redact_url, secrets_in_url
from conveyor.errors import ConnectionLost, ConveyorError

__all__ = ["ServerWatch", "as_cluster_client", "is_outage", "shown_url", "wait_for_server"]

log = logging.getLogger("conveyor.cli")


def _effective(url: str | None) -> str:
    return url or os.environ.get("REDIS_URL") or DEFAULT_URL


def shown_url(url: str | None) -> str:
    """The URL a command uses, fit for a log line (no password)."""
    return redact_url(_effective(url))


def is_outage(exc: BaseException) -> bool:
    """The server cannot be reached now but may be later: refused, reset, timed out, still
    loading its data; on a cluster also CLUSTERDOWN, TRYAGAIN, redirects that did not settle
    and the cluster client's own errors (a slot no node serves, no node reachable). A refused
    password or database is not an outage, nor a failed TLS handshake (a certificate problem).

    >>> is_outage(RedisConnectionError("Error 111 connecting")), is_outage(AuthenticationError())
    (True, False)
    """
    if isinstance(exc, AuthenticationError | AuthorizationError) or tls_failure_in(exc):
        return False
    if isinstance(exc, RedisConnectionError) and "Invalid Database" in str(exc):
        return False
    return isinstance(
        exc,
        RedisConnectionError
        | RedisTimeoutError
        | ConnectionLost
        | OSError
        | ClusterError  # ClusterDownError, and redirects beyond the client's limit
        | TryAgainError
        | RedisClusterException,  # not a RedisError
    )


class ServerWatch:
    """Says once that a server cannot be reached, and once that it answers again: one line per
    outage, however many attempts it takes."""

    def __init__(self, url: str | None) -> None:
        self.where = shown_url(url)
        self.secrets = secrets_in_url(_effective(url))
        self.down = False

    def text(self, exc: BaseException) -> str:
        """``exc`` as one line, without any secret of the URL."""
        return _one_line(exc, self.secrets)

    def failed(self, exc: BaseException) -> CliError:
        """The one line that ends a command this server refused (see ``connect_error``)."""
        return connect_error(exc, self.where, self.secrets)

    def lost(self, exc: BaseException, doing: str = "waiting for it") -> None:
        if not self.down:
            self.down = True
            log.warning("cannot reach the server at %s (%s): %s", self.where, self.text(exc), doing)

    def back(self) -> None:
        if self.down:
            self.down = False
            log.info("connected to the server at %s", self.where)


def wait_for_server(url: str | None, *, stopping: threading.Event | None = None) -> Any:
    """A client for ``url`` that has answered PING, once the server answers (a cluster client
    when it runs in cluster mode); None when ``stopping`` was set first. Between attempts it
    waits 0.1 s, doubling to 5 s.

    >>> client = wait_for_server("redis://localhost:6379/0")   # doctest: +SKIP
    """
    check_url(url)
    client = cli_connect(url)
    watch = ServerWatch(url)
    sleep: Callable[[float], object] = (stopping or threading.Event()).wait
    attempt = 0
    while stopping is None or not stopping.is_set():
        try:
            client.ping()
        except (RedisError, RedisClusterException) as exc:
            if not is_outage(exc):
                client.close()
                raise watch.failed(exc) from None
            log.debug("PING failed", exc_info=True)
            watch.lost(exc)
            attempt += 1
            sleep(reconnect_delay_ms(attempt) / 1000)
            continue
        chosen = as_cluster_client(client, url)
        if chosen is None:  # in cluster mode, and its slot map cannot be read yet
            attempt += 1
            sleep(reconnect_delay_ms(attempt) / 1000)
            continue
        watch.back()
        if chosen is not client:
            client.close()
        return chosen
    client.close()
    return None


def as_cluster_client(client: Any, url: str | None) -> Any | None:
    """The client to use for ``url`` now that its server answers: ``client``, or a new cluster
    client when ``client`` is a plain client of a server in cluster mode (the caller closes
    the one it no longer uses); None when that cannot be told yet (the server went away
    again, or the cluster has not formed): ask again later.

    ``connect()`` asks the server which client to make; one that could not be reached then (a
    long-running command started before its cluster was up) got a plain client, which would
    be redirected for every key of another node.

    >>> client = as_cluster_client(client, url) or client   # doctest: +SKIP
    """
    if is_cluster(client):
        return client
    try:
        info: Any = client.info("cluster")
    except ResponseError:
        return client  # no INFO for us (an ACL): keep what connect() made
    except RedisError:
        return None
    if str(info.get("cluster_enabled", 0)) != "1":
        return client
    if urlsplit(_effective(url)).scheme == "unix":
        return client  # a cluster is reached over TCP: stay on the one node
    try:
        cluster = conveyor.connect(url, cluster=True, **tls_options())
    except (ConveyorError, RedisError, RedisClusterException) as exc:
        log.debug("no cluster client yet: %s", _one_line(exc, secrets_in_url(_effective(url))))
        return None  # its slot map cannot be read yet
    log.info("the server at %s runs in cluster mode: using a cluster client", shown_url(url))
    return cluster
