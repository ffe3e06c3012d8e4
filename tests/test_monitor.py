"""The monitor against a real server, with real consumers, once per driver: every status,
groups kept apart, lag when the server cannot tell it, health, and a cleanup that loses
nothing."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
from rich.console import Console

import conveyor
from conveyor import AsyncMonitor, GroupMissingError, Monitor, Snapshot
from conveyor._core import status
from conveyor._core.monitor_scripts import MOVE_DEAD_ENTRIES
from conveyor._keys import heartbeat_key
from tests.conftest import Drivers
from tests.test_recovery import fill
from tests.test_recovery import play_dead as stop_heartbeats

Name = Callable[[str], str]
#: consumers beat every 50 ms; monitors call them dead after 3 x 100 ms, leaving room for a
#: busy test machine
FAST = {"heartbeat_ms": 50, "max_wait_ms": 20}
MONITOR_HEARTBEAT_MS = 100
#: consumers that must stay alive through a test: an asyncio consumer beats only while the
#: test runs its event loop, so a heir with FAST beats could look dead on a busy machine
STEADY = {"heartbeat_ms": 1000, "max_wait_ms": 20}


class Watch:
    """A Monitor or an AsyncMonitor (driven through the drivers' event loop), matching the
    kind of the consumers under test."""

    def __init__(self, drivers: Drivers, stream: str, group: str | None = "g", **kw: Any):
        self.drivers = drivers
        kw.setdefault("heartbeat_ms", MONITOR_HEARTBEAT_MS)
        client = drivers.client()
        if drivers.kind == "sync":
            self.monitor: Any = Monitor(client, stream, group, **kw)
        else:
            self.monitor = AsyncMonitor(client, stream, group, **kw)

    def _do(self, result: Any) -> Any:
        return self.drivers.run(result) if self.drivers.kind == "async" else result

    def collect(self) -> Snapshot:
        snapshot: Snapshot = self._do(self.monitor.collect())
        return snapshot

    def cleanup(self, snapshot: Snapshot | None = None) -> conveyor.CleanupReport:
        report: conveyor.CleanupReport = self._do(self.monitor.cleanup(snapshot))
        return report


def pause(drivers: Drivers, seconds: float) -> None:
    """Let time pass; for asyncio consumers, with their event loop (and heartbeats) running."""
    if drivers.kind == "async":
        drivers.run(asyncio.sleep(seconds))
    else:
        time.sleep(seconds)


def until(drivers: Drivers, condition: Callable[[], Any], what: str, timeout_s: float = 10) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        pause(drivers, 0.02)
    raise AssertionError(f"timed out waiting for {what}")


def play_dead(drivers: Drivers, c: Any) -> None:
    """Stop a consumer's heartbeats as if its process died, and wait until they have stopped.

    An asyncio consumer's heartbeat task may outlive one ``cancel()``: on Python 3.11,
    ``asyncio.wait_for`` (which redis-py wraps around every write) swallows a cancellation that
    arrives after the write finished but before the task resumed, and the task beats on. So
    cancel again until the task is done."""
    stop_heartbeats(c)
    task = getattr(getattr(c, "_target", None), "_heartbeat_task", None)
    if task is not None:

        def stopped() -> bool:
            task.cancel()
            return bool(task.done())

        until(drivers, stopped, "the heartbeat task to end")


def status_of(watch: Watch, consumer: str, group: str = "g") -> str:
    return watch.collect().group(group).consumer(consumer).status


def pending_ids(r: redis.Redis, stream: str, consumer: str | None = None) -> list[str]:
    rows = r.xpending_range(stream, "g", "-", "+", 10_000, consumername=consumer)
    return [row["message_id"].decode() for row in rows]


# ---------------------------------------------------------------------------------------------
# Statuses, with real consumers


def test_a_consumer_that_reads_and_acks_is_ok(drivers: Drivers, r: redis.Redis, name: Name) -> None:
    s = name("s")
    fill(r, s, 2)
    c = drivers.consumer(s, "g", consumer="worker", batch_size=2, **FAST)
    c.ack_many(c.get_batch())
    snap = Watch(drivers, s, batch_size=2).collect()
    (info,) = snap.group("g").consumers
    assert (info.name, info.group, info.pending, info.status) == ("worker", "g", 0, status.OK)
    assert info.heartbeat_age_ms is not None and info.heartbeat_age_ms < 3 * MONITOR_HEARTBEAT_MS
    assert snap.health().code == 0
    assert abs(snap.time_ms - time.time() * 1000) < 60_000  # the server's clock


def test_a_consumer_that_stopped_reading_is_idle_for_long_time(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 1)
    c = drivers.consumer(s, "g", consumer="sleepy", **FAST)
    c.ack_many(c.get_batch())
    watch = Watch(drivers, s, idle_time_ms_warning_threshold=200)
    until(drivers, lambda: status_of(watch, "sleepy") == status.IDLE, "the idle warning")
    snap = watch.collect()
    assert snap.group().consumer("sleepy").heartbeat_age_ms is not None  # alive, not dead
    health = snap.health()
    assert health.code == 1 and "'sleepy': WARNING - idle for long time" in health.reasons[0]


def test_a_consumer_holding_more_than_a_batch_has_too_many_pending_items(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 5)
    c = drivers.consumer(s, "g", consumer="greedy", batch_size=5, **FAST)
    assert len(c.get_batch()) == 5
    snap = Watch(drivers, s, batch_size=2).collect()
    info = snap.group().consumer("greedy")
    assert (info.pending, info.status) == (5, status.TOO_MANY_PENDING)
    assert snap.group().pending == 5 and snap.health().code == 1


def test_a_consumer_whose_heartbeat_stopped_is_dead(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 3)
    c = drivers.consumer(s, "g", consumer="victim", batch_size=3, **FAST)
    assert len(c.get_batch()) == 3
    watch = Watch(drivers, s, batch_size=2)
    assert status_of(watch, "victim") == status.TOO_MANY_PENDING
    play_dead(drivers, c)
    until(drivers, lambda: status_of(watch, "victim") == status.DEAD, "DEAD")  # over pending
    snap = watch.collect()
    group = snap.group()
    assert group.oldest_pending_id == ids[0] and group.oldest_pending_age_ms is not None
    health = snap.health()
    assert health.code == 2 and "'victim' is DEAD" in health.reasons[0]


def test_consumers_without_heartbeats_are_never_dead(r: redis.Redis, name: Name) -> None:
    s = name("s")
    fill(r, s, 1)
    r.xgroup_create(s, "g", "0")
    r.xreadgroup("g", "java-worker", {s: ">"})
    time.sleep(0.05)
    snap = Monitor(r, s, "g", idle_time_ms_warning_threshold=10, heartbeat_ms=10).collect()
    info = snap.group().consumer("java-worker")
    assert info.heartbeat_age_ms is None and info.status == status.IDLE


# ---------------------------------------------------------------------------------------------
# Groups, lag, trimming, outputs


def test_two_groups_on_one_stream_are_never_mixed(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 6)
    a = drivers.consumer(s, "billing", consumer="same-name", batch_size=4, **FAST)
    b = drivers.consumer(s, "audit", consumer="same-name", batch_size=1, **FAST)
    other = drivers.consumer(s, "audit", consumer="auditor", batch_size=2, **FAST)
    assert (len(a.get_batch()), len(b.get_batch()), len(other.get_batch())) == (4, 1, 2)
    snap = Watch(drivers, s, group=None, batch_size=2).collect()
    assert sorted(g.name for g in snap.groups) == ["audit", "billing"]
    billing, audit = snap.group("billing"), snap.group("audit")
    assert [(c.name, c.group, c.pending) for c in billing.consumers] == [
        ("same-name", "billing", 4)
    ]
    assert sorted((c.name, c.group, c.pending) for c in audit.consumers) == [
        ("auditor", "audit", 2),
        ("same-name", "audit", 1),
    ]
    assert (billing.lag, audit.lag, billing.pending, audit.pending) == (2, 3, 4, 3)
    assert billing.consumer("same-name").status == status.TOO_MANY_PENDING
    assert audit.consumer("same-name").status == status.OK
    one = Watch(drivers, s, group="audit").collect()
    assert [g.name for g in one.groups] == ["audit"]
    assert "group audit:" in snap.table() and "group billing:" in snap.table()


def test_lag_is_counted_when_the_server_cannot_tell_it(r: redis.Redis, name: Name) -> None:
    s = name("s")
    ids = fill(r, s, 10)
    r.xgroup_create(s, "middle", ids[3])  # created at an arbitrary id: the server's lag is nil
    r.xgroup_create(s, "start", "0")
    raw = {g["name"].decode(): g["lag"] for g in r.xinfo_groups(s)}
    assert raw == {"middle": None, "start": 10}
    snap = Monitor(r, s).collect()
    middle, start = snap.group("middle"), snap.group("start")
    assert (middle.lag, middle.lag_estimated, middle.trimmed_undelivered) == (6, True, False)
    assert (start.lag, start.lag_estimated) == (10, False)
    r.xdel(s, ids[9])  # a deletion beyond what the group read: the server's lag is nil again
    again = Monitor(r, s, "start").collect().group()
    assert (again.lag, again.lag_estimated) == (9, True)


def test_trimmed_undelivered_entries_are_flagged_and_critical(r: redis.Redis, name: Name) -> None:
    s = name("s")
    fill(r, s, 10)
    r.xgroup_create(s, "g", "0")
    r.xreadgroup("g", "reader", {s: ">"}, count=2)
    r.xtrim(s, maxlen=3, approximate=False)
    assert r.xinfo_groups(s)[0]["lag"] == 8  # more than the 3 entries left
    snap = Monitor(r, s, "g").collect()
    group = snap.group()
    assert (snap.stream.length, group.trimmed_undelivered) == (3, True)
    assert (group.lag, group.lag_estimated) == (3, True)  # what is really waiting
    health = snap.health()
    assert health.code == 2 and any("trimmed" in reason for reason in health.reasons)
    r.xreadgroup("g", "reader", {s: ">"}, count=10)
    caught_up = Monitor(r, s, "g").collect().group()  # Redis 7.0 still says lag 5 here
    assert (caught_up.lag, caught_up.lag_estimated, caught_up.trimmed_undelivered) == (
        0,
        False,
        False,
    )


def test_a_lag_above_max_lag_is_critical(r: redis.Redis, name: Name) -> None:
    s = name("s")
    fill(r, s, 5)
    r.xgroup_create(s, "g", "0")
    r.xreadgroup("g", "reader", {s: ">"}, count=1)  # a reader; 4 entries wait
    assert Monitor(r, s, "g", max_lag=4).collect().health().code == 0
    health = Monitor(r, s, "g", max_lag=3).collect().health()
    assert health.code == 2 and health.reasons == ("group 'g': lag 4 is above max_lag 3",)


def test_a_backlog_without_a_live_consumer_is_a_warning(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 5)
    r.xgroup_create(s, "g", "0")
    health = Watch(drivers, s, max_lag=10).collect().health()
    assert health.code == 1
    assert health.reasons == ("group 'g': 5 entries wait (lag) and no live consumer reads them",)
    assert Watch(drivers, s, max_lag=4).collect().health().code == 2
    c = drivers.consumer(s, "g", consumer="worker", batch_size=2, **STEADY)
    c.ack_many(c.get_batch())  # a live consumer: the backlog is being worked off
    assert Watch(drivers, s, max_lag=10).collect().health().code == 0


def test_the_stream_figures(r: redis.Redis, name: Name) -> None:
    s = name("s")
    ids = fill(r, s, 4)
    r.xdel(s, ids[3])
    r.xgroup_create(s, "g", "0")
    stream = Monitor(r, s, "g").collect().stream
    assert (stream.name, stream.length, stream.first_id, stream.last_id) == (s, 3, ids[0], ids[2])
    assert stream.last_generated_id == ids[3] and stream.entries_added == 4
    assert stream.max_deleted_id == ids[3]


def test_snapshot_to_json_and_back(drivers: Drivers, r: redis.Redis, name: Name) -> None:
    s = name("s")
    fill(r, s, 3)
    c = drivers.consumer(s, "g", consumer="w1", batch_size=3, **FAST)
    c.get_batch()
    snap = Watch(drivers, s).collect()
    text = snap.to_json()
    assert Snapshot.from_json(text) == snap
    data = json.loads(text)
    assert data["stream"]["name"] == s and data["groups"][0]["consumers"][0]["name"] == "w1"
    assert data["thresholds"]["heartbeat_timeout_ms"] == 3 * MONITOR_HEARTBEAT_MS


def test_rich_table_shows_the_consumers_and_the_figures(r: redis.Redis, name: Name) -> None:
    s = name("s")
    ids = fill(r, s, 3)
    r.xgroup_create(s, "g", ids[0])
    r.xreadgroup("g", "[bold]w1", {s: ">"}, count=1)
    console = Console(width=200, record=True)
    console.print(Monitor(r, s, "g").collect().rich_table())
    text = " ".join(console.export_text().split())  # the title and caption wrap
    assert "[bold]w1" in text  # names are never read as markup
    assert f"stream {s} · length 3" in text and "lag ~1" in text and "pending 1" in text


@pytest.mark.parametrize(
    "options",
    [{}, {"decode_responses": True}, {"protocol": 3}, {"protocol": 3, "decode_responses": True}],
    ids=["resp2-bytes", "resp2-str", "resp3-bytes", "resp3-str"],
)
def test_every_client_setting_gives_the_same_snapshot(
    redis_url: str, r: redis.Redis, name: Name, options: dict[str, Any]
) -> None:
    s = name("s")
    fill(r, s, 3)
    r.xgroup_create(s, "g", "0")
    r.xreadgroup("g", "w1", {s: ">"}, count=3)
    r.hset(heartbeat_key(s, "g"), "w1", "1")  # a heartbeat long gone
    client = conveyor.connect(redis_url, **options)
    try:
        snap = Monitor(client, s, batch_size=10).collect()
    finally:
        client.close()
    info = snap.group("g").consumer("w1")
    assert (info.name, info.pending, info.status) == ("w1", 3, status.DEAD)
    assert snap.group().lag == 0 and snap.stream.length == 3
    assert "| w1 " in snap.table() and "| b'w1' " in snap.table(names_as_bytes=True)


def test_a_missing_stream_or_group_is_reported(r: redis.Redis, name: Name) -> None:
    s = name("s")
    with pytest.raises(GroupMissingError):
        Monitor(r, s).collect()
    r.xgroup_create(s, "g", "0", mkstream=True)
    with pytest.raises(GroupMissingError, match="other"):
        Monitor(r, s, "other").collect()
    assert Monitor(r, s).collect().group().consumers == ()


def test_collect_pipelines_its_commands(
    r: redis.Redis, name: Name, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = name("s")
    ids = fill(r, s, 2)
    r.xgroup_create(s, "g", "0")
    r.xgroup_create(s, "h", "0")
    sizes: list[int] = []
    real = conveyor._io.pool_roundtrip
    here = threading.get_ident()

    def counting(client: Any, commands: Any) -> list[Any]:
        if threading.get_ident() == here:  # not a thread another test left behind
            sizes.append(len(commands))
        return real(client, commands)

    monkeypatch.setattr(conveyor._io, "pool_roundtrip", counting)
    Monitor(r, s, "g").collect()
    assert sizes == [6]  # time, stream, groups; consumers, oldest pending, heartbeats
    sizes.clear()
    Monitor(r, s).collect()
    assert sizes == [1, 9]  # the groups first, then one round trip for both
    sizes.clear()
    r.xdel(s, ids[1])  # the server cannot tell the lag any more
    Monitor(r, s).collect()
    assert sizes == [1, 9, 2]  # both lags counted in one more round trip


# ---------------------------------------------------------------------------------------------
# Cleanup


def test_cleanup_moves_a_dead_consumers_entries_and_loses_nothing(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 10)
    idle = drivers.consumer(s, "g", consumer="idle", batch_size=2, **STEADY)
    acked = idle.get_batch()
    idle.ack_many(acked)
    busy = drivers.consumer(s, "g", consumer="busy", batch_size=4, **STEADY)
    victim = drivers.consumer(s, "g", consumer="victim", batch_size=4, **FAST)
    held = [m.id for m in busy.get_batch()]
    lost = [m.id for m in victim.get_batch()]
    play_dead(drivers, victim)
    watch = Watch(drivers, s, batch_size=100)
    until(drivers, lambda: status_of(watch, "victim") == status.DEAD, "DEAD")

    report = watch.cleanup()

    # the dead one's entries went to the least-loaded live consumer, as they were
    assert [(m.group, m.from_consumer, m.to_consumer, list(m.ids)) for m in report.moved] == [
        ("g", "victim", "idle", lost)
    ]
    assert report.moved_count == 4 and report.removed == (("g", "victim"),)
    assert report.left_for_reclaim == report.dropped == report.revived == ()
    assert pending_ids(r, s, "busy") == held  # the busy consumer is untouched
    assert pending_ids(r, s, "idle") == lost
    # nothing lost: every id is acked or still pending, none both
    everything = pending_ids(r, s) + [m.id for m in acked]
    assert sorted(everything) == sorted(ids) and len(set(everything)) == 10
    rows = r.xpending_range(s, "g", "-", "+", 10, consumername="idle")
    assert {row["times_delivered"] for row in rows} == {1}  # a move is not a delivery
    snap = watch.collect()
    assert sorted(c.name for c in snap.group().consumers) == ["busy", "idle"]
    assert r.hget(heartbeat_key(s, "g"), "victim") is None


def test_without_a_live_consumer_a_dead_ones_entries_stay_for_reclaim(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 3)
    victim = drivers.consumer(s, "g", consumer="victim", batch_size=3, **FAST)
    held = [m.id for m in victim.get_batch()]
    play_dead(drivers, victim)
    watch = Watch(drivers, s)
    until(drivers, lambda: status_of(watch, "victim") == status.DEAD, "DEAD")
    report = watch.cleanup()
    assert report.moved == () and report.removed == ()
    assert report.left_for_reclaim == (("g", "victim", 3),)
    assert pending_ids(r, s, "victim") == held


def test_cleanup_removes_idle_consumers_only_when_they_own_nothing(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 2)
    live = drivers.consumer(s, "g", consumer="live", batch_size=1, **FAST)
    assert len(live.get_batch()) == 1  # live and busy
    r.xreadgroup("g", "java-holder", {s: ">"}, count=1)  # no heartbeats, owns an entry
    r.xgroup_createconsumer(s, "g", "java-idle")  # no heartbeats, owns nothing
    watch = Watch(drivers, s, idle_time_ms_warning_threshold=50)
    pause(drivers, 0.2)
    statuses = {c.name: c.status for c in watch.collect().group().consumers}
    assert statuses["java-holder"] == statuses["java-idle"] == status.IDLE
    report = watch.cleanup()
    assert report.removed == (("g", "java-idle"),) and report.moved == ()
    left = {c.name: c.pending for c in watch.collect().group().consumers}
    assert left == {"live": 1, "java-holder": 1}


def test_cleanup_handles_names_that_are_not_utf8(r: redis.Redis, name: Name) -> None:
    s = name("s")
    r.xgroup_create(s, "g", "$", mkstream=True)
    r.xgroup_createconsumer(s, "g", b"\xff-worker")
    time.sleep(0.05)
    watch = Monitor(r, s, "g", idle_time_ms_warning_threshold=10)
    (info,) = watch.collect().group().consumers
    assert info.name == b"\xff-worker".decode("utf-8", "surrogateescape")
    assert "b'\\xff-worker'" in watch.collect().table(names_as_bytes=True)
    assert watch.cleanup().removed == (("g", info.name),)
    assert r.xinfo_consumers(s, "g") == []


def server_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def run_move(r: redis.Redis, s: str, group: str, dead: str, live: str) -> list[Any]:
    reply = r.eval(MOVE_DEAD_ENTRIES, 2, s, heartbeat_key(s, "g"), group, dead, live, 300, 100)
    return list(reply)


def test_the_move_rechecks_both_heartbeats_and_the_group_on_the_server(
    r: redis.Redis, name: Name
) -> None:
    s = name("s")
    (entry,) = fill(r, s, 1)
    r.xgroup_create(s, "g", "0")
    r.xreadgroup("g", "dead", {s: ">"})
    now_ms = server_ms(r)
    beats = heartbeat_key(s, "g")
    r.hset(beats, mapping={"dead": now_ms, "live": now_ms})
    assert run_move(r, s, "g", "dead", "live")[0] == 0  # it beat again: not dead
    r.hset(beats, mapping={"dead": now_ms - 10_000, "live": now_ms - 10_000})
    assert run_move(r, s, "g", "dead", "live")[0] == -1  # the heir is not alive
    assert run_move(r, s, "nogroup", "dead", "nobody")[0] == -1
    r.hset(beats, "live", server_ms(r))
    assert run_move(r, s, "nogroup", "dead", "live")[0] == -2
    assert pending_ids(r, s, "dead") == [entry]  # nothing moved so far
    code, moved, dropped = run_move(r, s, "g", "dead", "live")
    assert (code, moved, dropped) == (1, [entry.encode()], [])
    assert pending_ids(r, s, "live") == [entry]


def test_entries_deleted_while_pending_are_reported_as_dropped(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 3)
    victim = drivers.consumer(s, "g", consumer="victim", batch_size=3, **FAST)
    assert len(victim.get_batch()) == 3
    heir = drivers.consumer(s, "g", consumer="heir", **STEADY)
    assert len(heir.get_batch()) == 0  # joins the group
    play_dead(drivers, victim)
    r.xdel(s, ids[1])
    watch = Watch(drivers, s, batch_size=100)
    until(drivers, lambda: status_of(watch, "victim") == status.DEAD, "DEAD")
    report = watch.cleanup()
    assert [list(m.ids) for m in report.moved] == [[ids[0], ids[2]]]
    assert report.dropped == (("g", ids[1]),) and report.removed == (("g", "victim"),)
    assert pending_ids(r, s) == [ids[0], ids[2]]


# ---------------------------------------------------------------------------------------------
# Garbage from other clients in the heartbeats key


@pytest.mark.parametrize(
    "garbage",
    ["²", "abc", "", "12:x", "1:", ":5", "-5", "9" * 40, "1:" + "9" * 40, "99999999999999999"],
)
def test_a_garbage_heartbeat_is_ignored_and_the_consumer_judged_by_idle_time(
    drivers: Drivers, r: redis.Redis, name: Name, garbage: str
) -> None:
    s = name("s")
    fill(r, s, 2)
    live = drivers.consumer(s, "g", consumer="live", batch_size=1, **STEADY)
    assert len(live.get_batch()) == 1
    r.xreadgroup("g", "scribbled", {s: ">"}, count=1)
    r.hset(heartbeat_key(s, "g"), "scribbled", garbage)
    watch = Watch(drivers, s, idle_time_ms_warning_threshold=60_000)

    snap = watch.collect()

    scribbled = snap.group().consumer("scribbled")
    assert (scribbled.heartbeat_age_ms, scribbled.status) == (None, status.OK)
    assert snap.group().consumer("live").heartbeat_age_ms is not None  # its beat still counts
    assert snap.health().code == 0
    pause(drivers, 0.05)
    idle = Watch(drivers, s, idle_time_ms_warning_threshold=10).collect()
    assert idle.group().consumer("scribbled").status == status.IDLE  # by idle time, never DEAD
    assert watch.cleanup().removed == ()  # it owns an entry: kept


@pytest.mark.parametrize("kind", ["string", "list"])
def test_a_heartbeats_key_of_the_wrong_type_is_logged_once_and_judged_by_idle_time(
    drivers: Drivers,
    r: redis.Redis,
    name: Name,
    kind: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = name("s")
    fill(r, s, 1)
    r.xgroup_create(s, "g", "0")
    r.xreadgroup("g", "holder", {s: ">"}, count=1)
    r.xgroup_createconsumer(s, "g", "empty")
    key = heartbeat_key(s, "g")
    if kind == "string":
        r.set(key, "garbage")
    else:
        r.rpush(key, "a", "b")
    watch = Watch(drivers, s, idle_time_ms_warning_threshold=10)
    pause(drivers, 0.05)

    with caplog.at_level(logging.WARNING, logger="conveyor.monitor"):
        snap = watch.collect()
        watch.collect()
        report = watch.cleanup()

    assert {c.name: (c.heartbeat_age_ms, c.status) for c in snap.group().consumers} == {
        "holder": (None, status.IDLE),
        "empty": (None, status.IDLE),
    }
    warnings = [rec.getMessage() for rec in caplog.records if key in rec.getMessage()]
    assert len(warnings) == 1 and "not a hash" in warnings[0]
    assert report.removed == (("g", "empty"),)  # owns nothing, idle: removed, and reported
    assert [c["name"] for c in r.xinfo_consumers(s, "g")] == [b"holder"]
    assert r.type(key) == kind.encode()  # not ours to repair
