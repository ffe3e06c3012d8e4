"""Redis Cluster routing for the raw round trips: each command goes to the node that owns its
key's slot, pipelined per node, and redirects are followed.

The routing is one generator (``route``) shared by the sync and asyncio round trips: it splits
a pipeline by node, is sent each node's replies, and follows what the cluster answers while
slots move (DESIGN §3, PITFALLS 15):

- ``MOVED``: the slot map is stale; it is refreshed and the command sent to the new owner;
- ``ASK``: the slot is migrating and the key is already on the target; the command is sent
  there once, after ``ASKING``;
- ``TRYAGAIN``, ``CLUSTERDOWN``: left in place; callers treat them as an outage and retry.

A command redirected more than ``MAX_REDIRECTS`` times keeps its last redirect as its reply,
which ``_io.server_error`` classifies as an outage on a cluster client. The replies come back in
the order of the commands. A command runs at most once on the node that executes it: a
redirect means the node did not run it.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from typing import Any

import redis.asyncio.cluster
import redis.cluster
from redis.exceptions import AskError, MovedError, SlotNotCoveredError

from conveyor._core.commands import Command, command_key
from conveyor._keys import key_slot
from conveyor.errors import ConnectionLost

__all__ = [
    "MAX_REDIRECTS",
    "Route",
    "is_async_cluster",
    "is_cluster",
    "node_for_key",
    "node_name",
    "primaries",
    "route",
]

MAX_REDIRECTS = 5

_CLUSTER_CLIENTS = (redis.cluster.RedisCluster, redis.asyncio.cluster.RedisCluster)

#: what ``route`` yields: ``("send", {node name: (node, commands)})``, answered with
#: ``{node name: replies}``; or ``("refresh", None)``, answered with None once the slot map is
#: read again.
Route = Generator[tuple[str, Any], Any, list[Any]]


def is_cluster(client: Any) -> bool:
    """True for ``redis.cluster.RedisCluster`` and ``redis.asyncio.cluster.RedisCluster``."""
    return isinstance(client, _CLUSTER_CLIENTS)


def is_async_cluster(client: Any) -> bool:
    return isinstance(client, redis.asyncio.cluster.RedisCluster)


def node_name(node: Any) -> str:
    return str(node.name)


def node_for_key(client: Any, key: Any) -> Any:
    """The primary that owns ``key``'s slot in ``client``'s slot map; ConnectionLost (an
    outage) while no node serves the slot."""
    slot = key_slot(_encoded(key))
    nodes = client.nodes_manager.slots_cache.get(slot)
    if nodes:  # the map's entry, without get_node_from_slot's per-call argument checks
        return nodes[0]
    try:
        return client.nodes_manager.get_node_from_slot(slot)
    except SlotNotCoveredError as exc:
        raise ConnectionLost(f"no node of the cluster serves slot {slot} now: {exc}") from exc


def primaries(client: Any) -> list[Any]:
    """Every primary of the cluster, in a stable order (by name)."""
    return sorted(client.get_primaries(), key=node_name)


def _encoded(key: Any) -> bytes:
    if isinstance(key, bytes):
        return key
    return str(key).encode("utf-8", "surrogateescape")


def _targets(client: Any, commands: Sequence[Command]) -> list[Any]:
    """The node of each command. A command without a key runs where the keyed command after it
    runs (else the one before, else the default node): ``TIME, XINFO STREAM s`` reads the clock
    of ``s``'s node, ``MULTI ... EXEC`` stays with its commands."""
    nodes: list[Any] = [None] * len(commands)
    for i, command in enumerate(commands):
        key = command_key(command)
        if key is not None:
            nodes[i] = node_for_key(client, key)
    following = None
    for i in range(len(nodes) - 1, -1, -1):
        if nodes[i] is None:
            nodes[i] = following
        else:
            following = nodes[i]
    preceding = None
    for i, node in enumerate(nodes):
        if node is None:
            nodes[i] = preceding
        else:
            preceding = node
    if nodes and nodes[0] is None:
        default = client.get_default_node()
        nodes = [default] * len(nodes)
    return nodes


def route(client: Any, commands: Sequence[Command]) -> Route:
    """Plan the round trips of ``commands`` on a cluster (see the module's docstring)."""
    replies: list[Any] = [None] * len(commands)
    targets = _targets(client, commands)
    todo = list(range(len(commands)))
    asking: dict[int, Any] = {}
    for attempt in range(MAX_REDIRECTS + 1):
        batches: dict[str, tuple[Any, list[Command]]] = {}
        order: dict[str, list[int]] = {}
        for i in todo:
            node = asking.get(i) or targets[i]
            name = node_name(node)
            if name not in batches:
                batches[name] = (node, [])
                order[name] = []
            if i in asking:
                batches[name][1].append(("ASKING",))
            batches[name][1].append(commands[i])
            order[name].append(i)
        answered: dict[str, list[Any]] = yield ("send", batches)
        redirected: list[int] = []
        moved = False
        asking = {}
        for name, indexes in order.items():
            node_replies = answered[name]
            if any(c[0] == "ASKING" for c in batches[name][1]):
                node_replies = [r for c, r in zip(batches[name][1], node_replies, strict=True)
                                if c[0] != "ASKING"]  # fmt: skip
            for i, reply in zip(indexes, node_replies, strict=True):
                replies[i] = reply
                if attempt == MAX_REDIRECTS:
                    continue
                if isinstance(reply, MovedError):
                    moved = True
                    redirected.append(i)
                elif isinstance(reply, AskError):
                    target = client.nodes_manager.get_node(reply.host, reply.port)
                    if target is None:
                        moved = True  # a node we do not know yet: read the map again
                    else:
                        asking[i] = target
                    redirected.append(i)
        if not redirected:
            break
        if moved:
            yield ("refresh", None)
            targets = _targets(client, commands)
        todo = sorted(redirected)
    return replies
