"""The Redis Cluster fixture itself: three primaries that agree on all slots, keys spread over
them, and a slot migration (IMPORTING / MIGRATING / MIGRATE / NODE) while a client writes.

Plain redis-py only (``RedisCluster`` follows MOVED and ASK; ``redis.Redis`` talks to one node).
No test depends on which node owns which slot: a migration leaves the slot on its new node,
so every test computes ownership.
"""

from __future__ import annotations

import itertools
import math
import threading
import uuid
from collections.abc import Iterator

import pytest
from redis.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import MovedError

from tests.cluster import SLOTS, Cluster, cluster_ports, migrate_slot


@pytest.fixture
def rc(cluster_url: str) -> Iterator[RedisCluster]:
    client = RedisCluster.from_url(cluster_url, decode_responses=True)
    yield client
    client.close()


def _tag(cluster: Cluster | None = None) -> str:
    """A new hash tag; with ``cluster``, one whose slot holds no key yet (other tests leave
    keys behind in this session's cluster, and a migration counts the keys it moves)."""
    while True:
        tag = f"migr-{uuid.uuid4().hex}"
        if cluster is None:
            return tag
        slot = key_slot(f"{{{tag}}}".encode())
        owner = cluster.admin(cluster.node_for_slot(slot))
        if owner.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0:
            return tag


class StreamWriter(threading.Thread):
    """XADDs to one stream through a cluster client until stopped; keeps every id it got."""

    def __init__(self, url: str, key: str) -> None:
        super().__init__(name="stream-writer", daemon=True)
        self.url = url
        self.key = key
        self.ids: list[str] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self._cond = threading.Condition()

    def run(self) -> None:
        client = RedisCluster.from_url(self.url, decode_responses=True)
        try:
            for n in itertools.count():
                if self._stop_event.is_set():
                    break
                entry_id = client.xadd(self.key, {"n": n})
                with self._cond:
                    self.ids.append(entry_id)
                    self._cond.notify_all()
        except BaseException as exc:
            self.error = exc
            with self._cond:
                self._cond.notify_all()
        finally:
            client.close()

    def wait_more(self, n: int, timeout_s: float = 30.0) -> None:
        """Wait until ``n`` more entries than now were added."""
        with self._cond:
            goal = len(self.ids) + n
            ok = self._cond.wait_for(
                lambda: len(self.ids) >= goal or self.error is not None, timeout_s
            )
        assert self.error is None, f"the writer failed: {self.error!r}"
        assert ok, f"the writer added fewer than {n} entries in {timeout_s}s"

    def finish(self) -> list[str]:
        self._stop_event.set()
        self.join(30)
        assert not self.is_alive(), "the writer did not stop"
        assert self.error is None, f"the writer failed: {self.error!r}"
        return self.ids


# -- the cluster ---------------------------------------------------------------------------------


def test_cluster_ports_have_free_bus_ports() -> None:
    ports = cluster_ports(3)
    assert len(set(ports)) == 3
    for p in ports:
        assert 0 < p <= 55535
        assert p + 10000 not in ports


def test_every_node_is_ok_and_agrees_on_all_slots(cluster: Cluster, rc: RedisCluster) -> None:
    views = set()
    for i in range(3):
        info = cluster.info(i)
        assert info["cluster_state"] == "ok"
        assert info["cluster_slots_assigned"] == str(SLOTS)
        assert info["cluster_slots_fail"] == "0"
        assert info["cluster_known_nodes"] == "3"
        assert info["cluster_size"] == "3"
        views.add(cluster.slot_view(i))
    assert len(views) == 1
    owners = cluster.slot_owners()
    assert len(owners) == SLOTS
    assert set(owners) == {0, 1, 2}
    assert sorted(n.port for n in rc.get_primaries()) == sorted(cluster.ports)
    assert cluster.urls == [f"redis://127.0.0.1:{p}" for p in cluster.ports]
    assert cluster.url == cluster.urls[0]


def test_keys_land_on_all_three_nodes(cluster: Cluster, rc: RedisCluster) -> None:
    base = _tag()
    by_node: dict[int, str] = {}
    for n in itertools.count():
        key = f"{base}:{n}"
        by_node.setdefault(cluster.node_for_key(key), key)
        if len(by_node) == 3:
            break
    for i, key in by_node.items():
        assert rc.set(key, f"on-{i}")
        assert rc.get_node_from_key(key).port == cluster.ports[i]
    for i, key in by_node.items():
        with cluster.client(i) as node:
            assert node.get(key) == f"on-{i}"  # served by this node: no MOVED
        other = cluster.client((i + 1) % 3)
        with other, pytest.raises(MovedError) as moved:
            other.get(key)
        assert moved.value.node_addr == ("127.0.0.1", cluster.ports[i])


# -- migrating a slot ----------------------------------------------------------------------------


def test_migrate_slot_with_a_stream_while_a_client_writes(
    cluster: Cluster, rc: RedisCluster
) -> None:
    tag = _tag(cluster)
    stream = f"{{{tag}}}s"
    slot = key_slot(stream.encode())
    source = cluster.node_for_slot(slot)
    target = (source + 1) % 3
    before = [rc.xadd(stream, {"n": f"pre-{n}"}) for n in range(100)]
    others = [f"{{{tag}}}k{n}" for n in range(12)]
    for key in others:
        rc.set(key, key)
    keys = [stream, *others]
    assert {key_slot(k.encode()) for k in keys} == {slot}

    src = cluster.admin(source)
    #: entries added while every key was on the target but the slot not yet reassigned: the
    #: source answered ASK, and the cluster client followed it
    asked: list[int] = []

    def between_keys() -> None:
        left = src.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot)
        count = len(writer.ids)
        writer.wait_more(3)
        if left == 0:
            asked.append(len(writer.ids) - count)

    writer = StreamWriter(cluster.url, stream)
    writer.start()
    try:
        writer.wait_more(5)
        result = migrate_slot(cluster, slot, target, batch=3, between_keys=between_keys)
        writer.wait_more(5)  # and on after the migration, at the slot's new owner
    finally:
        added = writer.finish()

    assert (result.slot, result.source, result.target) == (slot, source, target)
    assert result.keys_moved == len(keys)
    assert result.migrate_calls == math.ceil(len(keys) / 3)
    assert result.split_s >= 0
    assert cluster.node_for_slot(slot) == target
    assert cluster.owner_agreed(slot) == target
    with cluster.client(target) as node:
        assert node.xlen(stream) == len(before) + len(added)
        assert [e[0] for e in node.xrange(stream)] == before + added
        assert all(node.get(k) == k for k in others)
    assert asked, "between_keys was not called after the last MIGRATE"
    assert asked[-1] >= 3
    assert src.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    assert src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100) == []
    with cluster.client(source) as node, pytest.raises(MovedError) as moved:
        node.xlen(stream)
    assert moved.value.node_addr == ("127.0.0.1", cluster.ports[target])
    cluster.wait_ok()  # usable by the tests after this one


def test_migrate_slot_there_and_back_and_an_empty_slot(cluster: Cluster, rc: RedisCluster) -> None:
    key = f"{{{_tag(cluster)}}}v"
    slot = key_slot(key.encode())
    home = cluster.node_for_slot(slot)
    rc.set(key, "value")
    # Round the nodes twice in quick succession: each new owner must take the slot with a
    # config epoch above the last one's, or the old owner's gossip takes it back.
    for target in [(home + 1) % 3, (home + 2) % 3, home] * 2:
        result = migrate_slot(cluster, slot, target)
        assert (result.keys_moved, result.migrate_calls) == (1, 1)
        assert cluster.owner_agreed(slot) == target
        assert rc.get(key) == "value"
        with cluster.client(target) as node:
            assert node.get(key) == "value"

    empty = f"{{{_tag(cluster)}}}nothing"
    slot = key_slot(empty.encode())
    owner = cluster.node_for_slot(slot)
    assert cluster.admin(owner).execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    result = migrate_slot(cluster, slot, (owner + 2) % 3)
    assert (result.keys_moved, result.migrate_calls) == (0, 0)
    assert rc.set(empty, "new")  # the cluster client follows the MOVED
    with cluster.client((owner + 2) % 3) as node:
        assert node.get(empty) == "new"
    assert migrate_slot(cluster, slot, (owner + 2) % 3).migrate_calls == 0  # already there
    cluster.wait_ok()
