"""Behind Sentinel (DESIGN promises 4-6): ``redis+sentinel://`` URLs, clients users build with
``Sentinel(...).master_for(...)``, and workers that follow a failover under load.

Every test runs a real primary, replica and sentinel (tests/sentinel.py) on free loopback ports.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

import conveyor
from conveyor import AsyncConsumer, ConfigError, ConnectionLost, Consumer, Producer
from conveyor.connection import describe
from conveyor.models import Batch
from conveyor.server import free_port
from tests.sentinel import SentinelSetup, sentinel_deployment, wait_for
from tests.workers import Worker


@pytest.fixture
def sentinel_setup() -> Iterator[SentinelSetup]:
    """A fresh primary, replica and sentinel for one test (a failover changes them for good)."""
    with sentinel_deployment() as setup:
        yield setup


def client_names(setup: SentinelSetup, port: int) -> set[str]:
    with setup.server_client(port) as r:
        return {c["name"] for c in r.client_list()}


# -- redis+sentinel:// URLs --------------------------------------------------------------------


def test_a_sentinel_url_gives_a_client_of_the_primary(
    sentinel_setup: SentinelSetup, name: Callable[[str], str]
) -> None:
    setup = sentinel_setup
    client = conveyor.connect(setup.url)
    in_db_3 = conveyor.connect(setup.url + "/3")
    try:
        client.set(name("k"), "v")
        in_db_3.set(name("k3"), "v3")
        assert describe(client) == f"127.0.0.1:{setup.primary_port} (sentinel service mymaster)"
        # The same safe options as any connect(): no automatic retry, keepalive.
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["retry"].get_retries() == 0 and kwargs["socket_keepalive"] is True
    finally:
        client.close()
        in_db_3.close()
    with setup.server_client(setup.primary_port) as primary:
        assert primary.get(name("k")) == "v"
        primary.select(3)  # type: ignore[no-untyped-call]
        assert primary.get(name("k3")) == "v3"


async def test_an_asyncio_sentinel_url_gives_a_client_of_the_primary(
    sentinel_setup: SentinelSetup, name: Callable[[str], str]
) -> None:
    setup = sentinel_setup
    client = conveyor.connect(setup.url, asyncio=True)
    assert isinstance(client, redis.asyncio.Redis)
    try:
        await client.set(name("k"), "v")
        assert describe(client) == f"127.0.0.1:{setup.primary_port} (sentinel service mymaster)"
    finally:
        await client.aclose()
    with setup.server_client(setup.primary_port) as primary:
        assert primary.get(name("k")) == "v"


@pytest.mark.parametrize("use_asyncio", [False, True])
@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis+sentinel://u:sekret@127.0.0.1:26379", "no service"),
        ("redis+sentinel://u:sekret@127.0.0.1:26379/", "no service"),
        ("redis+sentinel://u:sekret@/mymaster", "no sentinel"),
        ("redis+sentinel://u:sekret@h1:26379,,h2:26379/mymaster", "empty sentinel address"),
        ("redis+sentinel://u:sekret@h1:99999/mymaster", "bad port"),
        ("redis+sentinel://u:sekret@h1:abc/mymaster", "bad port"),
        ("redis+sentinel://u:sekret@h1:26379,h2:0/mymaster", "bad port"),
        ("redis+sentinel://u:sekret@h1:26379/mymaster/x", "bad db"),
        ("redis+sentinel://u:sekret@h1:26379/mymaster/1/2", "more than a service"),
        ("redis+sentinel://h1/mymaster?sentinel_password=sekret&fooo=1", "unknown option"),
        ("redis+sentinel://h1/mymaster?password=sekret&socket_timeout=x", "bad value"),
        ("redis+sentinel://u:sekret@h1/mymaster?ssl_ca_certs=/ca.pem", "need a rediss://"),
        ("redis+sentinel://u:sek/ret@h1/mymaster", "after its host"),
    ],
)
def test_a_bad_sentinel_url_is_one_line_without_the_password(
    url: str, problem: str, use_asyncio: bool
) -> None:
    with pytest.raises(ConfigError) as info:
        conveyor.connect(url, asyncio=use_asyncio)
    message = str(info.value)
    assert problem in message
    assert "sekret" not in message and "sek/ret" not in message
    assert "\n" not in message


def test_a_sentinel_that_cannot_be_reached_is_a_lost_connection() -> None:
    url = f"redis+sentinel://u:sekret@127.0.0.1:{free_port()}/mymaster"
    client = conveyor.connect(url)
    consumer = Consumer(client, "s", "g", max_wait_ms=10)
    with pytest.raises(ConnectionLost) as info:
        consumer.get_batch()
    assert "sentinel service mymaster" in str(info.value)
    assert "sekret" not in str(info.value)
    consumer.close()
    client.close()


def test_servers_and_sentinel_with_passwords(name: Callable[[str], str]) -> None:
    """The URL's password is the servers'; ``?sentinel_password=`` the sentinel's. A wrong
    one is an error that never shows it, in the library and in the CLI."""
    with sentinel_deployment(password="pw:S3cret/x", sentinel_password="sent#S3cret") as setup:
        client = conveyor.connect(setup.url)
        client.set(name("k"), "v")
        client.close()
        with setup.server_client(setup.primary_port) as primary:
            assert primary.get(name("k")) == "v"

        wrong = setup.url.replace("sent%23S3cret", "wrong%23S3cret")
        client = conveyor.connect(wrong)
        with pytest.raises(redis.ConnectionError) as info:
            client.ping()
        assert "S3cret" not in str(info.value)
        client.close()

        result = subprocess.run(
            [sys.executable, "-m", "conveyor", "monitor", "-s", "x", "--url", wrong],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode in (1, 3), result.stderr  # monitor: 3 is "unknown"
        assert "S3cret" not in result.stdout + result.stderr
        assert result.stderr.startswith("error: cannot connect to redis+sentinel://:***@")
        assert "Traceback" not in result.stderr


# -- clients users build with Sentinel(...).master_for(...) -------------------------------------


def test_a_consumer_on_a_user_built_sentinel_client(
    sentinel_setup: SentinelSetup, name: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    setup = sentinel_setup
    stream = name("orders")
    sentinel = redis.sentinel.Sentinel([setup.sentinel_address], socket_timeout=5)
    client = sentinel.master_for(setup.service, socket_timeout=5)
    ids = Producer(client, stream).send_many({"n": str(i)} for i in range(50))
    consumer = Consumer(client, stream, "billing", max_wait_ms=100)
    got: list[str] = []
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        deadline = time.monotonic() + 30
        while len(got) < len(ids) and time.monotonic() < deadline:
            batch = consumer.get_batch()
            consumer.ack_many(batch)
            got += [m.id for m in batch]
    try:
        assert got == ids
        assert client.xpending(stream, "billing")["pending"] == 0
        # The reader connection is on the primary, named after the consumer.
        assert f"conveyor:{consumer.name}" in client_names(setup, setup.primary_port)
        assert "NOGROUP" not in caplog.text
    finally:
        consumer.close()
        client.close()
        sentinel.close()


async def test_an_async_consumer_on_a_user_built_sentinel_client(
    sentinel_setup: SentinelSetup, name: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    setup = sentinel_setup
    stream = name("orders")
    sentinel = redis.asyncio.sentinel.Sentinel([setup.sentinel_address], socket_timeout=5)
    client = sentinel.master_for(setup.service, socket_timeout=5)
    ids = await conveyor.AsyncProducer(client, stream).send_many({"n": str(i)} for i in range(50))
    consumer = AsyncConsumer(client, stream, "billing", max_wait_ms=100)
    got: list[str] = []
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        deadline = time.monotonic() + 30
        while len(got) < len(ids) and time.monotonic() < deadline:
            # Bounded: a reader on the wrong server would recreate the group forever.
            batch = await asyncio.wait_for(consumer.get_batch(), timeout=20)
            await consumer.ack_many(batch)
            got += [m.id for m in batch]
    try:
        assert got == ids
        assert (await client.xpending(stream, "billing"))["pending"] == 0
        assert f"conveyor:{consumer.name}" in client_names(setup, setup.primary_port)
        assert "NOGROUP" not in caplog.text
    finally:
        await consumer.close()
        await client.aclose()
        await sentinel.aclose()


# -- failover under load ----------------------------------------------------------------------


#: the time a handler takes per message
WORK_S = 0.001


class Recorder:
    """What the workers' handlers processed, and when."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[float, list[str]]] = []

    def handler(self, worker: Worker, batch: Batch) -> None:
        time.sleep(WORK_S * len(batch))  # some work, so the kill finds batches in flight
        batch.ack_all()
        ids = [m.id for m in batch]
        with worker.lock:
            worker.processed.update(ids)
        with self.lock:
            self.calls.append((time.monotonic(), ids))

    def processed(self) -> list[str]:
        with self.lock:
            return [i for _t, ids in self.calls for i in ids]


class OwedProducer:
    """Writes chunks of entries through a Sentinel client and keeps which ones are owed.

    Replication is asynchronous (PITFALLS 14): a write the dead primary acknowledged may never
    have reached the replica. So a chunk is owed only if WAIT saw it on the replica, or if it
    was written after the kill (only the promoted replica can have taken it then).
    """

    def __init__(self, client: redis.Redis, stream: str, chunk: int) -> None:
        self.client = client
        self.stream = stream
        self.chunk = chunk
        self.sent = 0
        self.killed = False
        self.acknowledged: set[str] = set()
        self.owed: set[str] = set()
        self.after_kill: set[str] = set()

    def write_chunk(self) -> bool:
        """One chunk; False if it failed (not acknowledged, so not owed)."""
        pipe = self.client.pipeline(transaction=False)
        for i in range(self.chunk):
            pipe.xadd(self.stream, {"n": str(self.sent + i)})
        if not self.killed:
            pipe.execute_command("WAIT", 1, 5_000)
        try:
            replies = pipe.execute()
        except redis.RedisError:
            return False
        self.sent += self.chunk
        ids = set(replies[: self.chunk])
        self.acknowledged |= ids
        if self.killed:
            self.owed |= ids
            self.after_kill |= ids
        elif replies[self.chunk] >= 1:
            self.owed |= ids
        return True


@pytest.mark.timeout(300)
def test_workers_follow_a_failover(
    sentinel_setup: SentinelSetup, name: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    """2,000 messages, two workers (one sync, one asyncio) reading through redis+sentinel://;
    the primary is SIGKILLed mid-run. The sentinel promotes the replica, the workers ride the
    outage out and every owed message (see OwedProducer) is processed; nothing stays pending.
    """
    setup = sentinel_setup
    stream, group = name("orders"), "billing"
    recorder = Recorder()
    client = conveyor.connect(setup.url, decode_responses=True)
    client.xgroup_create(stream, group, id="0", mkstream=True)
    producer = OwedProducer(client, stream, chunk=100)
    workers = [
        Worker(kind, setup.url, stream, group, handler=recorder.handler, max_wait_ms=200)
        for kind in ("sync", "async")
    ]
    for w in workers:
        w.start()

    with caplog.at_level(logging.WARNING, logger="conveyor"):
        while len(producer.acknowledged) < 2_000:
            if not producer.killed and len(producer.acknowledged) >= 1_000:
                wait_for(lambda: len(recorder.processed()) >= 300, "the workers to start")
                old_port = setup.kill_primary()
                killed_at = time.monotonic()
                backlog = len(producer.acknowledged) - len(recorder.processed())
                producer.killed = True
                setup.wait_for_failover(old_port)
                failover_s = time.monotonic() - killed_at
            if not producer.write_chunk():
                time.sleep(0.05)  # this client does not see the new primary yet: no hot loop
            assert all(w.alive for w in workers), [w.error for w in workers]

        def settled() -> bool:
            if not producer.owed <= set(recorder.processed()):
                return False
            pending = client.xpending(stream, group)["pending"]
            lag = next(g["lag"] for g in client.xinfo_groups(stream) if g["name"] == group)
            return pending == 0 and lag == 0

        wait_for(settled, "every owed message processed and nothing pending", timeout_s=120)

    assert all(w.alive for w in workers), [w.error for w in workers]
    # Both workers read from the promoted replica now.
    names = client_names(setup, setup.replica_port)
    assert {f"conveyor:{w.consumer.name}" for w in workers} <= names
    for w in workers:
        w.stop()
    client.close()

    processed = recorder.processed()
    resumed = min(t for t, ids in recorder.calls if producer.after_kill.intersection(ids))
    print(
        f"produced {len(producer.acknowledged)} acknowledged ({len(producer.owed)} owed), "
        f"processed {len(set(processed))} distinct, "
        f"{len(processed) - len(set(processed))} duplicates, "
        f"{len(producer.acknowledged - set(processed))} acknowledged but lost with the primary; "
        f"{backlog} not processed yet at the kill; failover {failover_s:.1f} s, processing "
        f"resumed {resumed - killed_at:.1f} s after the kill"
    )
    assert producer.owed <= set(processed)
    assert "Traceback" not in caplog.text
