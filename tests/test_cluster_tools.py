"""Monitor, Scaler, dead letters, safe trim, the exporter and the command line on a three-node
Redis Cluster, each from the URL of a node that does not own the streams it looks at.

The streams are arranged with plain redis-py (a RedisCluster client: XADD, XREADGROUP, the
dead-letter script a consumer runs), so these tests depend on nothing but the tools under test.
Names are picked for the node their slot lands on (``on_node``); a slot another test moved is
asked for, never assumed.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest
from redis.cluster import RedisCluster

import conveyor
from conveyor import (
    AsyncDeadLetters,
    AsyncMonitor,
    AsyncScaler,
    ConfigError,
    DeadLetters,
    Monitor,
    Scaler,
)
from conveyor._core import status
from conveyor._core.scripts import DEAD_LETTER
from conveyor._keys import dead_letter_key, heartbeat_key, key_slot
from conveyor.cli._wait import as_cluster_client
from conveyor.metrics import StreamMetrics
from conveyor.retention import async_safe_trim, safe_trim
from tests.cluster import Cluster
from tests.test_cli import TIMEOUT_S, _env, assert_clean_error
from tests.test_cli_commands import free_port, sample, scrape, start, stop

#: entries per stream, and how many of them consumer "w1" of group "billing" holds
ENTRIES, HELD = 10, 4
GROUP = "billing"


# -- arranging ---------------------------------------------------------------------------------


def on_node(cluster: Any, node: int, prefix: str) -> str:
    """A fresh key name whose slot node ``node`` owns now."""
    while True:
        candidate = f"{prefix}-{uuid.uuid4().hex[:10]}"
        if cluster.node_for_key(candidate) == node:
            return candidate


def elsewhere(cluster: Any, key: str) -> str:
    """The URL of a node that does not own ``key``."""
    return str(cluster.urls[(cluster.node_for_key(key) + 1) % len(cluster.urls)])


@pytest.fixture
def rc(cluster_url: str) -> Iterator[RedisCluster]:
    """A plain redis-py cluster client with decoded replies, to arrange and check."""
    client = RedisCluster.from_url(cluster_url, decode_responses=True)
    yield client
    client.close()


def busy_stream(rc: RedisCluster, stream: str) -> list[str]:
    """``ENTRIES`` entries; group "billing" with consumer "w1" holding the first ``HELD``."""
    ids = [rc.xadd(stream, {"n": str(i)}) for i in range(ENTRIES)]
    rc.xgroup_create(stream, GROUP, "0")
    rc.xreadgroup(GROUP, "w1", {stream: ">"}, count=HELD)
    return ids


@pytest.fixture
def spread(cluster: Any, rc: RedisCluster) -> list[str]:
    """Three busy streams, one on each node."""
    streams = [on_node(cluster, i, "spread") for i in range(len(cluster.urls))]
    for stream in streams:
        busy_stream(rc, stream)
    return streams


def dead_letter(rc: RedisCluster, stream: str, rows: Sequence[dict[str, str]]) -> list[str]:
    """Do what a consumer that gives up does: read ``rows`` as consumer "c" of "billing" and
    move each to ``{stream}:dead`` with the consumer's script. Returns their ids on ``stream``."""
    ids = [rc.xadd(stream, dict(row)) for row in rows]
    try:
        rc.xgroup_create(stream, GROUP, "0")
    except redis.ResponseError as exc:
        assert "BUSYGROUP" in str(exc)
    rc.xreadgroup(GROUP, "c", {stream: ">"})
    for entry_id, row in zip(ids, rows, strict=True):
        flat = [x for kv in row.items() for x in kv]
        args = (GROUP, "c", entry_id, 3, "boom", *flat)
        assert rc.eval(DEAD_LETTER, 2, stream, dead_letter_key(stream), *args) == 1
    return ids


def letter_from(origin: str, origin_id: str, fields: dict[str, str]) -> dict[str, str]:
    """A dead letter's fields as a consumer writes them: its own, then the provenance."""
    return {
        **fields,
        "conveyor.origin_stream": origin,
        "conveyor.origin_id": origin_id,
        "conveyor.group": GROUP,
        "conveyor.consumer": "c",
        "conveyor.deliveries": "3",
        "conveyor.error": "boom",
        "conveyor.time": "1700000000000",
    }


def server_ms(cluster: Any, key: str) -> int:
    """The clock of the node that owns ``key``."""
    node = cluster.client(cluster.node_for_key(key))
    try:
        seconds, micros = node.time()
    finally:
        node.close()
    return int(seconds) * 1000 + int(micros) // 1000


# -- the sync and asyncio twins ----------------------------------------------------------------


class Twins:
    """The sync tools on a cluster client made from ``url``, or their asyncio twins driven
    through an event loop of their own, with the same (blocking) methods."""

    def __init__(self, kind: str, url: str, **options: Any) -> None:
        self.kind = kind
        self.loop = asyncio.new_event_loop() if kind == "async" else None
        self.client: Any = conveyor.connect(url, asyncio=kind == "async", **options)

    def _wrap(self, target: Any) -> Any:
        return target if self.loop is None else _Blocking(target, self.loop)

    def monitor(self, stream: str, group: str | None = None, **kw: Any) -> Any:
        cls = Monitor if self.loop is None else AsyncMonitor
        return self._wrap(cls(self.client, stream, group, **kw))

    def scaler(self, stream: str, group: str, **kw: Any) -> Any:
        cls = Scaler if self.loop is None else AsyncScaler
        return self._wrap(cls(self.client, stream, group, **kw))

    def dead_letters(self, stream: str, **kw: Any) -> Any:
        cls = DeadLetters if self.loop is None else AsyncDeadLetters
        return self._wrap(cls(self.client, stream, **kw))

    def safe_trim(self, stream: str, **kw: Any) -> Any:
        if self.loop is None:
            return safe_trim(self.client, stream, **kw)
        return self.loop.run_until_complete(async_safe_trim(self.client, stream, **kw))

    def close(self) -> None:
        if self.loop is None:
            self.client.close()
        else:
            self.loop.run_until_complete(self.client.aclose())
            self.loop.close()


class _Blocking:
    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.target, self.loop = target, loop

    def __getattr__(self, attr: str) -> Any:
        found = getattr(self.target, attr)
        if not callable(found):
            return found
        return lambda *args, **kw: self.loop.run_until_complete(found(*args, **kw))


@pytest.fixture(params=["sync", "async"])
def twins(request: pytest.FixtureRequest, cluster: Any) -> Iterator[Callable[..., Twins]]:
    """``twins(url, **options)``: Twins of the test's kind on a cluster client from ``url``."""
    made: list[Twins] = []

    def make(url: str, **options: Any) -> Twins:
        made.append(Twins(request.param, url, **options))
        return made[-1]

    yield make
    for t in made:
        t.close()


# -- Monitor -----------------------------------------------------------------------------------


def test_the_client_is_a_cluster_client_from_any_node(cluster_url: str, cluster: Any) -> None:
    for url in cluster.urls:
        client = conveyor.connect(url)
        try:
            assert isinstance(client, RedisCluster)
        finally:
            client.close()


def test_monitor_judges_streams_on_every_node_from_a_node_that_does_not_own_them(
    twins: Callable[..., Twins], cluster: Any, spread: list[str]
) -> None:
    assert sorted(cluster.node_for_key(s) for s in spread) == [0, 1, 2]
    for stream in spread:
        snapshot = twins(elsewhere(cluster, stream)).monitor(stream).collect()

        assert snapshot.stream.name == stream and snapshot.stream.length == ENTRIES
        group = snapshot.group(GROUP)
        assert (group.lag, group.pending, group.consumers_count) == (ENTRIES - HELD, HELD, 1)
        assert [(c.name, c.pending, c.status) for c in group.consumers] == [("w1", HELD, status.OK)]
        assert snapshot.health().code == 0, snapshot.health()


def test_monitor_cleanup_moves_a_dead_consumers_entries_on_its_node(
    twins: Callable[..., Twins], cluster: Any, rc: RedisCluster
) -> None:
    stream = on_node(cluster, 2, "cleanup")
    busy_stream(rc, stream)  # w1 holds HELD entries
    held = [row["message_id"] for row in rc.xpending_range(stream, GROUP, "-", "+", 100)]
    rc.xreadgroup(GROUP, "heir", {stream: ">"}, count=1)
    now_ms = server_ms(cluster, stream)
    # w1's heartbeat stopped long ago; the heir's is fresh (the heartbeats share the slot)
    rc.hset(heartbeat_key(stream, GROUP), mapping={"w1": now_ms - 10**7, "heir": now_ms})
    monitor = twins(elsewhere(cluster, stream)).monitor(stream, GROUP, heartbeat_ms=60_000)
    assert monitor.collect().group().consumer("w1").status == status.DEAD

    report = monitor.cleanup()

    assert [(m.from_consumer, m.to_consumer, list(m.ids)) for m in report.moved] == [
        ("w1", "heir", held)
    ]
    assert report.removed == ((GROUP, "w1"),)
    rows = rc.xpending_range(stream, GROUP, "-", "+", 100)
    assert len(rows) == HELD + 1 and {row["consumer"] for row in rows} == {"heir"}


def test_a_plain_client_of_another_node_is_told_to_use_a_cluster_client(
    cluster: Any, rc: RedisCluster
) -> None:
    stream = on_node(cluster, 1, "plain")
    busy_stream(rc, stream)
    plain = conveyor.connect(cluster.urls[0], cluster=False)
    try:
        with pytest.raises(ConfigError) as caught:
            Monitor(plain, stream, GROUP).collect()
    finally:
        plain.close()
    text = str(caught.value)
    assert "Redis Cluster node" in text and "pass a cluster client" in text
    assert "\n" not in text


def test_a_cluster_client_of_the_wrong_kind_names_the_twin(cluster_url: str) -> None:
    client = conveyor.connect(cluster_url)
    try:
        with pytest.raises(ConfigError, match="AsyncMonitor"):
            AsyncMonitor(client, "orders")
        with pytest.raises(ConfigError, match="AsyncDeadLetters"):
            AsyncDeadLetters(client, "orders")
        with pytest.raises(ConfigError, match="AsyncScaler"):
            AsyncScaler(client, "orders", GROUP)
    finally:
        client.close()


CLIENTS = {
    "bytes": {},
    "str": {"decode_responses": True},
    "resp3": {"protocol": 3},
    "resp3-str": {"protocol": 3, "decode_responses": True},
}


@pytest.mark.parametrize("options", CLIENTS.values(), ids=list(CLIENTS))
def test_every_kind_of_cluster_client(
    twins: Callable[..., Twins], cluster: Any, rc: RedisCluster, options: dict[str, Any]
) -> None:
    stream = on_node(cluster, 1, "kinds")
    busy_stream(rc, stream)
    rc.xadd(dead_letter_key(stream), letter_from(stream, "1-0", {"order_id": "42"}))
    tools = twins(elsewhere(cluster, stream), **options)

    group = tools.monitor(stream).collect().group()
    decision = tools.scaler(stream, GROUP).decide()
    (letter,) = tools.dead_letters(stream).list()
    planned = tools.safe_trim(stream, dry_run=True)

    assert (group.lag, group.pending, group.consumer("w1").pending) == (ENTRIES - HELD, HELD, HELD)
    assert (decision.sample.lag, decision.sample.pending) == (ENTRIES - HELD, HELD)
    assert (letter.origin_stream, letter.fields) == (stream, {"order_id": "42"})
    assert planned.trimmed == 0 and planned.held_by == GROUP


# -- Scaler ------------------------------------------------------------------------------------


def test_scaler_decides_from_a_node_that_does_not_own_the_stream(
    twins: Callable[..., Twins], cluster: Any, rc: RedisCluster
) -> None:
    stream = on_node(cluster, 2, "scale")
    busy_stream(rc, stream)

    decision = twins(elsewhere(cluster, stream)).scaler(stream, GROUP).decide()

    sample = decision.sample
    assert (sample.length, sample.lag, sample.pending, sample.consumers) == (
        ENTRIES,
        ENTRIES - HELD,
        HELD,
        1,
    )
    assert sample.lag_exact
    # the seed's figures: lag per pending entry, clamped to 100 %, is OUT
    assert decision.rate == 100.0 and decision.suggestion == "OUT"


# -- dead letters ------------------------------------------------------------------------------


def test_dead_letters_list_replay_and_purge_on_the_streams_own_dead_letter_stream(
    twins: Callable[..., Twins], cluster: Any, rc: RedisCluster
) -> None:
    stream = on_node(cluster, 1, "dlq")
    assert key_slot(dead_letter_key(stream)) == key_slot(stream)
    ids = dead_letter(rc, stream, [{"order_id": str(i)} for i in range(3)])
    dead = twins(elsewhere(cluster, stream)).dead_letters(stream)

    letters = dead.list()
    assert [(d.origin_stream, d.origin_id, d.group, d.fields) for d in letters] == [
        (stream, i, GROUP, {"order_id": str(n)}) for n, i in enumerate(ids)
    ]
    assert dead.count() == 3

    result = dead.replay(limit=2)
    assert (result.replayed, result.failed) == (2, 0)
    back = rc.xrange(stream, f"({ids[-1]}", "+")
    assert [fields for _, fields in back] == [{"order_id": "0"}, {"order_id": "1"}]
    assert [entry_id for entry_id, _ in back] == list(result.new_ids)
    assert [d.origin_id for d in dead.list()] == [ids[2]]

    assert dead.purge() == 1
    assert dead.count() == 0 and rc.exists(dead_letter_key(stream)) == 1


def test_letters_naming_an_origin_in_another_slot_are_replayed_there(
    twins: Callable[..., Twins], cluster: Any, rc: RedisCluster
) -> None:
    """Replay is an XADD to the origin, then an XDEL here (never one transaction), so origins
    in other slots, on other nodes, keep the same guarantee: a duplicate, never a loss."""
    stream = on_node(cluster, 0, "mixed")
    others = [on_node(cluster, 1, "origin"), on_node(cluster, 2, "origin")]
    dead_letter(rc, stream, [{"order_id": "own"}])
    for n, origin in enumerate(others):
        rc.xadd(dead_letter_key(stream), letter_from(origin, f"{n + 1}-0", {"order_id": origin}))
    assert len({cluster.node_for_key(k) for k in (dead_letter_key(stream), *others)}) == 3
    dead = twins(elsewhere(cluster, stream)).dead_letters(stream)

    result = dead.replay()

    assert (result.replayed, result.failed, result.skipped) == (3, 0, 0)
    for origin in others:
        assert [fields for _, fields in rc.xrange(origin)] == [{"order_id": origin}]
    assert dead.count() == 0


def test_a_named_dead_letter_stream_on_another_node(
    twins: Callable[..., Twins], cluster: Any, rc: RedisCluster
) -> None:
    stream = on_node(cluster, 0, "named")
    named = on_node(cluster, 2, "named-dead")
    rc.xadd(named, letter_from(stream, "7-0", {"order_id": "42"}))
    dead = twins(elsewhere(cluster, named)).dead_letters(stream, dead_letter=named)

    assert [d.origin_id for d in dead.list()] == ["7-0"]
    assert dead.replay().replayed == 1
    assert [fields for _, fields in rc.xrange(stream)] == [{"order_id": "42"}]
    assert dead.count() == 0


# -- retention ---------------------------------------------------------------------------------


def test_safe_trim_removes_what_every_group_is_done_with(
    twins: Callable[..., Twins], cluster: Any, rc: RedisCluster
) -> None:
    stream = on_node(cluster, 2, "trim")
    ids = busy_stream(rc, stream)
    rc.xack(stream, GROUP, *ids[:HELD])
    tools = twins(elsewhere(cluster, stream))

    planned = tools.safe_trim(stream, dry_run=True)
    done = tools.safe_trim(stream)

    assert (planned.trimmed, planned.dry_run) == (HELD, True)
    assert (done.trimmed, done.length_after, done.held_by) == (HELD, ENTRIES - HELD, GROUP)
    assert [entry_id for entry_id, _ in rc.xrange(stream)] == ids[HELD:]


# -- the exporter ------------------------------------------------------------------------------


def test_stream_metrics_of_streams_on_every_node(
    cluster: Any, rc: RedisCluster, spread: list[str]
) -> None:
    rc.xadd(dead_letter_key(spread[1]), letter_from(spread[1], "1-0", {"order_id": "x"}))
    client = conveyor.connect(cluster.urls[0])
    try:
        metrics = StreamMetrics(client, spread, GROUP)
        text = generate_latest(metrics.registry).decode()
    finally:
        client.close()

    for stream in spread:
        assert sample(text, "conveyor_up", stream=stream) == 1
        assert sample(text, "conveyor_group_pending", stream=stream, group=GROUP) == HELD
        assert sample(text, "conveyor_consumer_pending", stream=stream, consumer="w1") == HELD
    assert sample(text, "conveyor_group_lag", stream=spread[0], group=GROUP) == ENTRIES - HELD
    assert sample(text, "conveyor_dead_letter_length", stream=spread[1]) == 1
    assert sample(text, "conveyor_dead_letter_length", stream=spread[2]) == 0


def test_a_plain_client_of_a_cluster_node_is_swapped_for_a_cluster_client(
    cluster: Any, rc: RedisCluster, redis_url: str
) -> None:
    """What the exporter and ``monitor --watch`` do once a server that could not be asked at
    their start answers: a plain client of a cluster node becomes a cluster client."""
    stream = on_node(cluster, 2, "swap")
    busy_stream(rc, stream)
    plain = conveyor.connect(cluster.urls[0], cluster=False)
    metrics = StreamMetrics(plain, [stream], GROUP)
    assert sample(generate_latest(metrics.registry).decode(), "conveyor_up", stream=stream) == 0

    chosen = as_cluster_client(plain, cluster.urls[0])
    metrics.use_client(chosen)
    text = generate_latest(metrics.registry).decode()
    plain.close()
    chosen.close()

    assert isinstance(chosen, RedisCluster)
    assert sample(text, "conveyor_up", stream=stream) == 1
    assert sample(text, "conveyor_group_lag", stream=stream, group=GROUP) == ENTRIES - HELD
    single = conveyor.connect(redis_url)  # a server not in cluster mode keeps its client
    try:
        assert as_cluster_client(single, redis_url) is single
    finally:
        single.close()


# -- the command line --------------------------------------------------------------------------


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``conveyor ARGS`` (each test passes --url) without REDIS_URL."""
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=TIMEOUT_S,
        check=False,
    )


def json_lines(result: subprocess.CompletedProcess[str]) -> list[Any]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_cli_monitor_json_from_a_node_that_does_not_own_the_stream(
    cluster: Any, spread: list[str]
) -> None:
    for stream in spread:
        (report,) = json_lines(
            cli("monitor", "-s", stream, "--json", "--url", elsewhere(cluster, stream))
        )

        assert report["stream"]["name"] == stream and report["stream"]["length"] == ENTRIES
        (group,) = report["groups"]
        assert (group["name"], group["lag"], group["pending"]) == (GROUP, ENTRIES - HELD, HELD)
        assert [c["name"] for c in group["consumers"]] == ["w1"]
        assert report["health"]["status"] == "OK"


def test_cli_pending_groups_and_scale(cluster: Any, rc: RedisCluster) -> None:
    stream = on_node(cluster, 1, "cli")
    ids = busy_stream(rc, stream)
    url = elsewhere(cluster, stream)

    pending = json_lines(cli("pending", "-s", stream, "-g", GROUP, "--json", "--url", url))
    groups = json_lines(cli("groups", "ls", "-s", stream, "--json", "--url", url))
    (decision,) = json_lines(cli("scale", "-s", stream, "-g", GROUP, "--json", "--url", url))

    assert [(row["id"], row["consumer"]) for row in pending] == [(i, "w1") for i in ids[:HELD]]
    assert [(g["group"], g["pending"], g["lag"]) for g in groups] == [(GROUP, HELD, ENTRIES - HELD)]
    assert (decision["lag"], decision["pending"], decision["suggestion"]) == (
        ENTRIES - HELD,
        HELD,
        "OUT",
    )


def test_cli_groups_create_and_destroy(cluster: Any, rc: RedisCluster) -> None:
    stream = on_node(cluster, 2, "cli-groups")
    url = elsewhere(cluster, stream)
    rc.hset(heartbeat_key(stream, "audit"), "w9", "1")  # destroy drops the heartbeats too

    (created,) = json_lines(
        cli("groups", "create", "-s", stream, "-g", "audit", "--mkstream", "--json", "--url", url)
    )
    (destroyed,) = json_lines(
        cli("groups", "destroy", "-s", stream, "-g", "audit", "--yes", "--json", "--url", url)
    )

    assert created["created"] is True and destroyed["destroyed"] is True
    assert rc.xinfo_groups(stream) == [] and not rc.exists(heartbeat_key(stream, "audit"))


def test_cli_dlq_ls_replay_and_purge(cluster: Any, rc: RedisCluster) -> None:
    stream = on_node(cluster, 0, "cli-dlq")
    ids = dead_letter(rc, stream, [{"order_id": str(i)} for i in range(3)])
    url = elsewhere(cluster, stream)

    listed = json_lines(cli("dlq", "ls", "-s", stream, "--json", "--url", url))
    (replayed,) = json_lines(
        cli("dlq", "replay", "-s", stream, "--limit", "1", "--yes", "--json", "--url", url)
    )
    (purged,) = json_lines(cli("dlq", "purge", "-s", stream, "--yes", "--json", "--url", url))

    assert [(d["origin_stream"], d["origin_id"]) for d in listed] == [(stream, i) for i in ids]
    assert (replayed["replayed"], replayed["failed"]) == (1, 0)
    assert purged["purged"] == 2 and rc.xlen(dead_letter_key(stream)) == 0
    assert [fields for _, fields in rc.xrange(stream, f"({ids[-1]}", "+")] == [{"order_id": "0"}]


def test_cli_trim_safe_and_by_length(cluster: Any, rc: RedisCluster) -> None:
    stream = on_node(cluster, 1, "cli-trim")
    ids = busy_stream(rc, stream)
    rc.xack(stream, GROUP, *ids[:2])
    url = elsewhere(cluster, stream)

    (safe,) = json_lines(cli("trim", "-s", stream, "--safe", "--json", "--url", url))
    (planned,) = json_lines(
        cli("trim", "-s", stream, "--maxlen", "1", "--dry-run", "--json", "--url", url)
    )

    assert (safe["trimmed"], safe["held_by"]) == (2, GROUP)  # w1 still holds two
    assert planned["cut"] == ENTRIES - 2 - 1 and planned["dry_run"] is True
    (loss,) = planned["losses"]
    assert (loss["group"], loss["pending"], loss["undelivered"]) == (GROUP, 2, ENTRIES - HELD - 1)
    assert rc.xlen(stream) == ENTRIES - 2


def test_cli_produce_and_consume(cluster: Any, rc: RedisCluster) -> None:
    stream = on_node(cluster, 2, "cli-io")
    url = elsewhere(cluster, stream)

    rows = '{"n": 1}\n{"n": 2}\n{"n": 3}\n'
    produced = cli("produce", "-s", stream, "--json", "--url", url, stdin=rows)
    rc.xgroup_create(stream, GROUP, "0")
    peeked = json_lines(cli("consume", "-s", stream, "-g", GROUP, "--peek", "--url", url))
    consumed = json_lines(cli("consume", "-s", stream, "-g", GROUP, "--count", "2", "--url", url))

    ids = [row["id"] for row in json_lines(produced)]
    assert rc.xlen(stream) == 3 and [entry_id for entry_id, _ in rc.xrange(stream)] == ids
    assert [m["fields"] for m in peeked] == [{"n": "1"}, {"n": "2"}, {"n": "3"}]
    assert [m["id"] for m in consumed] == ids[:2]
    (group,) = rc.xinfo_groups(stream)
    assert (group["pending"], group["last-delivered-id"]) == (0, ids[1])


def test_cli_errors_on_a_cluster_are_one_line(cluster: Any, rc: RedisCluster) -> None:
    stream = on_node(cluster, 1, "cli-err")
    busy_stream(rc, stream)
    url = elsewhere(cluster, stream)

    no_group = cli("pending", "-s", stream, "-g", "nope", "--url", url)
    no_stream = cli("monitor", "-s", stream + "-missing", "--url", url)

    assert_clean_error(no_group)
    assert f"has no group 'nope' (groups: '{GROUP}')" in no_group.stderr
    assert_clean_error(no_stream)
    assert no_stream.returncode == 3 and "does not exist" in no_stream.stderr


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    """Long-running commands a test started; killed if the test left them running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_exporter_serves_the_groups_of_streams_on_every_node(
    cluster: Any, spread: list[str], started: list[subprocess.Popen[str]]
) -> None:
    port = free_port()
    args = ["--port", str(port), "--addr", "127.0.0.1", "--url", cluster.urls[0]]
    for stream in spread:
        args += ["-s", stream]
    proc = start(started, "exporter", *args, env=_env())
    metrics = scrape(port)
    returncode, err = stop(proc)

    assert returncode == 0, err
    assert "Traceback" not in err
    for stream in spread:
        assert sample(metrics, "conveyor_up", stream=stream) == 1
        assert sample(metrics, "conveyor_group_lag", stream=stream, group=GROUP) == ENTRIES - HELD
        assert sample(metrics, "conveyor_group_pending", stream=stream, group=GROUP) == HELD


def test_cli_monitor_watch_json_follows_a_stream_on_another_node(
    cluster: Any, rc: RedisCluster, started: list[subprocess.Popen[str]]
) -> None:
    stream = on_node(cluster, 2, "cli-watch")
    busy_stream(rc, stream)
    args = ("monitor", "-s", stream, "--watch", "--json", "--interval", "0.2")
    proc = start(started, *args, "--url", elsewhere(cluster, stream), env=_env())
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    rc.xreadgroup(GROUP, "w2", {stream: ">"}, count=1)
    deadline = time.monotonic() + TIMEOUT_S
    while True:  # each line a fresh snapshot: until one shows the new consumer
        line = json.loads(proc.stdout.readline())
        if len(line["groups"][0]["consumers"]) == 2:
            break
        assert time.monotonic() < deadline, "no snapshot showed consumer w2"
    returncode, err = stop(proc)

    assert first["groups"][0]["lag"] == ENTRIES - HELD and first["health"]["code"] == 0
    assert line["groups"][0]["lag"] == ENTRIES - HELD - 1
    assert returncode == 0 and "Traceback" not in err


def read_until(proc: subprocess.Popen[str], text: str) -> str:
    """What ``proc`` wrote on stderr up to and including ``text`` (the rest is left for
    ``communicate``)."""
    assert proc.stderr is not None
    fd, seen = proc.stderr.fileno(), b""
    deadline = time.monotonic() + TIMEOUT_S
    while text.encode() not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"no {text!r} on stderr: {seen.decode()}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"stderr closed before {text!r}: {seen.decode()}"
            seen += chunk
    return seen.decode()


def test_a_node_that_went_away_is_one_line_and_the_exporter_keeps_serving(
    started: list[subprocess.Popen[str]],
) -> None:
    """A cluster of this test's own, since a node is killed: the exporter says so once and
    serves ``conveyor_up 0`` for the streams that node owned; one-shot commands print one
    line."""
    with Cluster(os.environ.get("CONVEYOR_TEST_SERVER") or None) as own:
        client = RedisCluster.from_url(own.url, decode_responses=True)
        try:
            gone, kept = on_node(own, 2, "gone"), on_node(own, 1, "kept")
            for stream in (gone, kept):
                busy_stream(client, stream)
        finally:
            client.close()
        port = free_port()
        args = ("--port", str(port), "--addr", "127.0.0.1", "-s", gone, "-s", kept)
        proc = start(started, "exporter", *args, "--url", own.urls[0], env=_env())
        assert sample(scrape(port), "conveyor_up", stream=gone) == 1

        own.kill(2)
        metrics = scrape(port)
        monitor = cli("monitor", "-s", gone, "--url", own.urls[0])
        trim = cli("trim", "-s", gone, "--safe", "--url", own.urls[1])
        said = read_until(proc, "cannot reach the server")
        returncode, rest = stop(proc)

    assert sample(metrics, "conveyor_up", stream=gone) == 0
    assert sample(metrics, "conveyor_health", stream=gone) == status.UNKNOWN
    err = said + rest
    assert returncode == 0 and "Traceback" not in err
    assert err.count("cannot reach the server") == 1, err
    assert f":{own.ports[2]}" in err
    for result in (monitor, trim):
        assert_clean_error(result)
        assert f":{own.ports[2]}" in result.stderr  # names the node that went away
    assert monitor.returncode == 3
