"""Redis Cluster: connect() from any node, one consumer over streams on every node, reads per
(node, slot) in flight at once, derived keys in the stream's slot, a stale slot map."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster

import conveyor
from conveyor import ConfigError, Producer
from conveyor._keys import dead_letter_key, key_slot
from tests.cluster import Cluster, migrate_slot, wait_for
from tests.conftest import Drivers, command_calls


@pytest.fixture
def cl(cluster: Cluster) -> Cluster:
    cluster.wait_ok()
    return cluster


@pytest.fixture(params=["sync", "async"])
def cdrivers(request: pytest.FixtureRequest, cl: Cluster) -> Iterator[Drivers]:
    d = Drivers(request.param, cl.urls[1])
    yield d
    d.close()


def spread(cl: Cluster, per_node: int = 1, prefix: str = "") -> list[str]:
    """Stream names, ``per_node`` on each node of the cluster, each in a slot of its own."""
    tag = prefix or uuid.uuid4().hex[:6]
    out: dict[int, list[str]] = {0: [], 1: [], 2: []}
    i = 0
    while any(len(v) < per_node for v in out.values()):
        name = f"cl:{tag}:{i}"
        i += 1
        node = cl.node_for_key(name)
        if len(out[node]) < per_node:
            out[node].append(name)
    return [s for names in out.values() for s in names]


def blocked(cl: Cluster, i: int, consumer: str) -> bool:
    """True while node ``i`` holds a blocked read of ``consumer``'s (CLIENT LIST)."""
    node = cl.client(i)
    try:
        return any(
            row.get("name") == f"conveyor:{consumer}" and "b" in row.get("flags", "")
            for row in node.client_list()
        )
    finally:
        node.close()


def test_connect_gives_a_cluster_client_from_any_node(cl: Cluster) -> None:
    for url in cl.urls:
        r = conveyor.connect(url)
        try:
            assert isinstance(r, redis.cluster.RedisCluster)
            assert {n.name for n in r.get_primaries()} == {f"127.0.0.1:{p}" for p in cl.ports}
        finally:
            r.close()
    ar = conveyor.connect(cl.urls[2], asyncio=True)
    assert isinstance(ar, redis.asyncio.cluster.RedisCluster)
    plain = conveyor.connect(cl.urls[0], cluster=False)
    try:
        assert type(plain) is redis.Redis
    finally:
        plain.close()


def test_cluster_true_on_a_plain_server_is_one_clear_line(redis_url: str) -> None:
    with pytest.raises(ConfigError) as err:
        conveyor.connect(redis_url, cluster=True)
    assert "\n" not in str(err.value) and "Cluster" in str(err.value)


def test_a_plain_client_on_a_cluster_node_says_to_pass_a_cluster_client(cl: Cluster) -> None:
    plain = conveyor.connect(cl.urls[0], cluster=False)
    stream = next(s for s in spread(cl) if cl.node_for_key(s) != 0)
    try:
        with pytest.raises(ConfigError, match=r"Redis Cluster node.*pass a cluster client"):
            Producer(plain, stream).send({"a": "1"})
    finally:
        plain.close()


def test_one_consumer_reads_streams_on_every_node(cdrivers: Drivers, cl: Cluster) -> None:
    streams = spread(cl, per_node=2)
    r = conveyor.connect(cl.urls[0], decode_responses=True)
    try:
        ids = set()
        for s in streams:
            p = cdrivers.producer(s)
            ids |= {(s, i) for i in p.send_many([{"n": str(k)} for k in range(60)])}
        c = cdrivers.consumer(streams, "g", batch_size=25, max_wait_ms=200)
        seen: list[tuple[str, str]] = []
        while len(seen) < len(ids):
            batch = c.get_batch()
            assert len(batch) <= 25
            seen += [(m.stream, m.id) for m in batch]
            c.ack_many(batch)
        assert len(seen) == len(set(seen)) and set(seen) == ids
        assert sum(int(r.xpending(s, "g")["pending"]) for s in streams) == 0
        assert c.acked_count == len(ids)
    finally:
        r.close()


def test_an_empty_wait_blocks_on_every_node_at_once(cl: Cluster) -> None:
    """A batch over streams on three nodes keeps one blocking read on each node in flight at
    the same time (so it waits max_wait_ms once, never three times), and never spins."""
    streams = spread(cl)
    name = "blocked-" + uuid.uuid4().hex[:6]
    r = conveyor.connect(cl.urls[0])
    c = conveyor.Consumer(r, streams, "g", consumer=name, max_wait_ms=3_000)
    c.get_batch()  # setup and own pending list
    reads_before = [command_calls(r, "xreadgroup", s) for s in streams]
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(c.get_batch()), daemon=True)
    thread.start()

    wait_for(lambda: all(blocked(cl, i, name) for i in range(3)), "a blocked reader on each node")
    thread.join(60)
    assert got == [[]] or [list(b) for b in got] == [[]]
    pairs = zip(streams, reads_before, strict=True)
    reads = [command_calls(r, "xreadgroup", s) - n for s, n in pairs]
    assert all(n <= 2 for n in reads), reads  # one blocking read per node, no busy loop
    c.close()
    r.close()


def test_batches_never_exceed_their_size_and_nothing_is_handed_out_twice(
    cdrivers: Drivers, cl: Cluster
) -> None:
    streams = spread(cl, per_node=1)
    ids = set()
    for s in streams:
        ids |= {(s, i) for i in cdrivers.producer(s).send_many([{"n": "x"}] * 40)}
    c = cdrivers.consumer(streams, "g", batch_size=7, max_wait_ms=100)
    seen: list[tuple[str, str]] = []
    while len(seen) < len(ids):
        batch = c.get_batch()
        assert len(batch) <= 7
        seen += [(m.stream, m.id) for m in batch]
        c.ack_many(batch)
    assert sorted(seen) == sorted(ids)


def test_a_dead_letter_stream_in_another_slot_is_a_config_error(cl: Cluster) -> None:
    r = conveyor.connect(cl.urls[0])
    try:
        with pytest.raises(ConfigError, match=r"'dlq' is in hash slot .* and stream 'orders'"):
            conveyor.Consumer(r, "orders", "g", dead_letter="dlq")
        conveyor.Consumer(r, "orders", "g", dead_letter="{orders}:dlq").close()
    finally:
        r.close()


@pytest.mark.parametrize("stream", ["{}orders", "a}b", "{shop}orders"])
def test_poison_is_dead_lettered_in_the_streams_slot(
    cdrivers: Drivers, cl: Cluster, stream: str
) -> None:
    stream = stream + ":" + uuid.uuid4().hex[:6]
    dead = dead_letter_key(stream)
    assert key_slot(dead) == key_slot(stream)
    cdrivers.producer(stream).send({"bad": "1"})
    c = cdrivers.consumer(stream, "g", max_wait_ms=100)
    (msg,) = c.get_batch()
    assert c.dead_letter(msg, "poison")
    node = cl.client(cl.node_for_key(stream))
    try:
        (entry,) = node.xrange(dead)
        assert entry[1]["bad"] == "1" and entry[1]["conveyor.origin_id"] == msg.id
    finally:
        node.close()


def test_a_stale_slot_map_is_refreshed_and_nothing_is_lost(cl: Cluster) -> None:
    stream = spread(cl)[0]
    r = conveyor.connect(cl.urls[0])  # its slot map is read now and goes stale below
    c = conveyor.Consumer(r, stream, "g", max_wait_ms=100)
    p = Producer(r, stream)
    first = p.send({"n": "1"})
    assert [m.id for m in c.get_batch()] == [first]
    slot = key_slot(stream)
    migrate_slot(cl, slot, (cl.node_for_slot(slot) + 1) % 3)
    second = p.send({"n": "2"})  # MOVED: map read again, sent to the new owner
    got: list[Any] = []
    wait_for(lambda: got.extend(c.get_batch()) or got, "the entry after the move")
    assert [m.id for m in got] == [second]
    c.ack_many(got)
    c.close()
    r.close()


def test_a_user_without_info_gets_a_plain_client_unless_cluster_is_given(cl: Cluster) -> None:
    user = "noinfo-" + uuid.uuid4().hex[:6]
    for i in range(3):  # ACL users are per node
        cl.admin(i).execute_command("ACL", "SETUSER", user, "on", ">pw", "~*", "+@all", "-info")
    url = cl.urls[0].replace("redis://", f"redis://{user}:pw@")
    try:
        guessed = conveyor.connect(url)
        assert type(guessed) is redis.Redis  # could not ask: taken for a plain server
        guessed.close()
        forced = conveyor.connect(url, cluster=True)
        try:
            assert isinstance(forced, redis.cluster.RedisCluster)
            stream = spread(cl)[2]
            msg_id = Producer(forced, stream).send({"a": "1"})
            assert forced.xrange(stream)[0][0].decode() == msg_id
        finally:
            forced.close()
    finally:
        for i in range(3):
            cl.admin(i).execute_command("ACL", "DELUSER", user)


def test_a_read_blocked_on_a_key_that_moves_goes_on_at_the_new_owner(
    cdrivers: Drivers, cl: Cluster
) -> None:
    """A read blocked on a stream whose slot is migrated ends with -UNBLOCKED (Redis 7.0) or a
    redirect (Valkey); the consumer reads on at the new owner and nothing reaches a handler
    twice."""
    stream = spread(cl)[0]
    name = "moving-" + uuid.uuid4().hex[:6]
    first = cdrivers.producer(stream).send({"n": "0"})
    c = cdrivers.consumer(stream, "g", consumer=name, batch_size=1, max_wait_ms=30_000)
    assert [m.id for m in c.get_batch()] == [first]
    got: list[Any] = []
    thread = threading.Thread(target=lambda: got.append(c.get_batch()), daemon=True)
    thread.start()
    source = cl.node_for_key(stream)

    wait_for(lambda: blocked(cl, source, name), "the consumer's read blocked on the stream's node")
    slot = key_slot(stream)
    migrate_slot(cl, slot, (source + 1) % 3)
    r = conveyor.connect(cl.urls[source])
    try:
        second = Producer(r, stream).send({"n": "1"})
    finally:
        r.close()
    thread.join(60)
    assert [[m.id for m in b] for b in got] == [[second]]
    c.ack_many(got[0])


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_node_lost_and_back_is_an_outage_and_run_goes_on(kind: str) -> None:
    """A node SIGKILLed: the cluster answers CLUSTERDOWN, then the node comes back empty (no
    persistence) and its stream's group is recreated. run() never ends by itself, and every
    message written after the node is back is processed."""
    import os

    from tests.workers import Worker

    with Cluster(os.environ.get("CONVEYOR_TEST_SERVER") or None, node_timeout_ms=1_000) as own:
        streams = spread(own)
        r = conveyor.connect(own.urls[0])
        worker = Worker(kind, own.urls[0], streams, "g", max_wait_ms=200, heartbeat_ms=200)
        worker.start()
        before = {i for s in streams for i in Producer(r, s).send_many([{"n": "a"}] * 5)}
        wait_for(lambda: worker.processed >= before, "the first messages processed")
        own.kill(2)
        survivor = own.client(0)
        wait_for(lambda: survivor.cluster("info")["cluster_state"] == "fail", "CLUSTERDOWN")
        survivor.close()
        own.nodes[2].start()
        own.wait_ok()
        after = {i for s in streams for i in Producer(r, s).send_many([{"n": "b"}] * 5)}
        worker.finish(after, "every message written after the node came back")
        r.close()


def test_entries_a_read_in_flight_delivered_after_the_batch_are_renewed(cl: Cluster) -> None:
    """A read on another node that finishes after its batch was handed out delivered entries
    no handler has seen yet: they are renewed like the batch in hand, so a slow handler does
    not let another consumer take them (after claim_idle_ms) and process them twice."""
    busy, quiet = spread(cl)[:2]
    r = conveyor.connect(cl.urls[0])
    opts: dict[str, Any] = {"claim_idle_ms": 1_500, "heartbeat_ms": 200, "batch_size": 4}
    a = conveyor.Consumer(r, [busy, quiet], "g", consumer="a", max_wait_ms=60_000, **opts)
    b = conveyor.Consumer(r, [busy, quiet], "g", consumer="b", max_wait_ms=200, **opts)
    node = cl.client(cl.node_for_key(quiet))
    try:
        Producer(r, busy).send_many([{"n": "x"}] * 4)
        first = a.get_batch()  # full from `busy`; the blocking read on `quiet` stays in flight
        assert {m.stream for m in first} == {busy} and len(first) == 4
        Producer(r, quiet).send_many([{"n": "y"}] * 2)
        # the read in flight delivers (its COUNT of) them to `a`: `a`'s pending entries now,
        # not seen by any handler yet
        wait_for(lambda: node.xpending(quiet, "g")["pending"] > 0, "the late delivery")
        rows = node.xpending_range(quiet, "g", "-", "+", 10)
        late = {row["message_id"] for row in rows}
        assert {row["consumer"] for row in rows} == {"a"}
        t0 = float(node.time()[0])
        # `a`'s handler is slow: well past claim_idle_ms, `b`'s reclaim rounds take nothing
        while float(node.time()[0]) - t0 < 3:
            assert not {m.id for m in b.get_batch()} & late
        a.ack_many(first)
        Producer(r, busy).send_many([{"n": "z"}] * 4)  # enough to fill the next batch at once
        second = a.get_batch()
        assert late <= {m.id for m in second}
        a.ack_many(second)
        assert a.stale_ack_count == 0
    finally:
        node.close()
        a.close()
        b.close()
        r.close()
