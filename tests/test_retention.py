"""safe_trim and async_safe_trim against a real server: only entries every group delivered
and acked go; pending and undelivered entries always stay."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis

import conveyor
from conveyor import ConfigError, Consumer, TrimReport, async_safe_trim, safe_trim
from conveyor import retention as retention_module

Name = Callable[[str], str]


@pytest.fixture(params=["sync", "async"])
def trim(request: pytest.FixtureRequest, redis_url: str) -> Any:
    """safe_trim, or async_safe_trim run on its own loop, with the same signature."""
    if request.param == "sync":
        client = conveyor.connect(redis_url)
        yield lambda stream, **kw: safe_trim(client, stream, **kw)
        client.close()
        return
    loop = asyncio.new_event_loop()
    aclient = conveyor.connect(redis_url, asyncio=True)
    yield lambda stream, **kw: loop.run_until_complete(async_safe_trim(aclient, stream, **kw))
    loop.run_until_complete(aclient.aclose())
    loop.close()


def ids_of(r: redis.Redis, stream: str) -> list[str]:
    return [e[0].decode() for e in r.xrange(stream)]


def read(r: redis.Redis, stream: str, group: str, count: int, consumer: str = "c") -> list[str]:
    got = r.xreadgroup(group, consumer, {stream: ">"}, count=count)
    return [e[0].decode() for e in got[0][1]] if got else []


def fill(r: redis.Redis, stream: str, n: int) -> list[str]:
    return [r.xadd(stream, {"i": i}).decode() for i in range(n)]


def test_acked_entries_go_pending_and_undelivered_stay(
    trim: Any, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 10)
    r.xgroup_create(s, "g", "0")
    delivered = read(r, s, "g", 6)
    r.xack(s, "g", *delivered[:3], delivered[4])  # 3 pending, with a hole acked past it
    report = trim(s)
    assert isinstance(report, TrimReport)
    assert ids_of(r, s) == ids[3:]  # the oldest pending entry and everything after it stay
    assert (report.trimmed, report.minid, report.held_by) == (3, ids[3], "g")
    assert (report.length_before, report.length_after, report.groups) == (10, 7, 1)
    assert "oldest pending entry of group 'g'" in report.reason and not report.dry_run
    assert r.xpending(s, "g")["pending"] == 2  # the group's own state is untouched


def test_without_pending_the_cut_follows_the_last_delivered(
    trim: Any, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 8)
    r.xgroup_create(s, "g", "0")
    r.xack(s, "g", *read(r, s, "g", 5))
    report = trim(s)
    assert ids_of(r, s) == ids[5:]  # the undelivered stay
    assert report.trimmed == 5 and "after the last entry delivered to group 'g'" in report.reason
    assert read(r, s, "g", 10) == ids[5:]  # and are still delivered


def test_the_slowest_of_several_groups_holds_the_cut(trim: Any, r: redis.Redis, name: Name) -> None:
    s = name("s")
    ids = fill(r, s, 20)
    for group, (delivered, acked) in {"fast": (20, 20), "slow": (12, 12), "busy": (15, 6)}.items():
        r.xgroup_create(s, group, "0")
        got = read(r, s, group, delivered)
        if acked:
            r.xack(s, group, *got[:acked])
    report = trim(s)
    assert (report.held_by, report.minid, report.trimmed, report.groups) == ("busy", ids[6], 6, 3)
    assert ids_of(r, s) == ids[6:]
    r.xack(s, "busy", *ids[6:15])
    report = trim(s)
    assert (report.held_by, report.trimmed) == ("slow", 6)
    assert ids_of(r, s) == ids[12:]


def test_a_group_that_read_nothing_keeps_everything(trim: Any, r: redis.Redis, name: Name) -> None:
    s = name("s")
    ids = fill(r, s, 5)
    r.xgroup_create(s, "done", "0")
    r.xack(s, "done", *read(r, s, "done", 5))
    r.xgroup_create(s, "new", "0")
    report = trim(s)
    assert report.trimmed == 0 and report.held_by == "new" and ids_of(r, s) == ids


def test_a_group_created_at_the_end_holds_nothing_back(
    trim: Any, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 5)
    r.xgroup_create(s, "late", "$")  # it will never read what came before it
    assert trim(s).trimmed == 5 and r.xlen(s) == 0


def test_dry_run_counts_and_changes_nothing(trim: Any, r: redis.Redis, name: Name) -> None:
    s = name("s")
    ids = fill(r, s, 30)
    r.xgroup_create(s, "g", "0")
    got = read(r, s, "g", 25)
    r.xack(s, "g", *got[:17])
    dry = trim(s, dry_run=True)
    assert (dry.trimmed, dry.minid, dry.dry_run, dry.at_least) == (17, ids[17], True, False)
    assert dry.length_after == 13 and str(dry).startswith(f"{s}: would trim 17 of 30")
    assert ids_of(r, s) == ids and r.xpending(s, "g")["pending"] == 8
    real = trim(s)
    assert (real.trimmed, real.minid) == (dry.trimmed, dry.minid)


def test_dry_run_counts_every_position_of_the_cut(
    trim: Any, r: redis.Redis, name: Name, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(retention_module, "PAGE_SIZE", 4)  # several pages
    s = name("s")
    fill(r, s, 11)
    r.xgroup_create(s, "g", "0")
    assert trim(s, dry_run=True).trimmed == 0  # the cut below the first entry
    r.xack(s, "g", *read(r, s, "g", 9))
    assert trim(s, dry_run=True).trimmed == 9  # counted in pages
    r.xack(s, "g", *read(r, s, "g", 2))
    assert trim(s, dry_run=True).trimmed == 11  # the cut after the last entry
    monkeypatch.setattr(retention_module, "DRY_RUN_COUNT_LIMIT", 6)
    r.xadd(s, {"i": "new"})
    r.xack(s, "g", *read(r, s, "g", 1))
    bounded = trim(s, dry_run=True)
    assert (bounded.trimmed, bounded.at_least) == (12, False)  # all of it: no count needed
    r.xadd(s, {"i": "last"})
    bounded = trim(s, dry_run=True)
    assert (bounded.trimmed, bounded.at_least) == (6, True)  # 12 really, counted up to 6
    assert "at least 6" in str(bounded)


def test_empty_and_missing_streams(trim: Any, r: redis.Redis, name: Name) -> None:
    s = name("s")
    missing = trim(s)
    assert (missing.trimmed, missing.minid, missing.reason) == (0, None, "no such stream")
    r.xgroup_create(s, "g", "0", mkstream=True)
    for dry_run in (True, False):
        empty = trim(s, dry_run=dry_run)
        assert (empty.trimmed, empty.length_before, empty.groups) == (0, 0, 1)
    assert r.exists(s) == 1


def test_a_stream_without_groups_is_not_trimmed(trim: Any, r: redis.Redis, name: Name) -> None:
    s = name("s")
    fill(r, s, 4)
    report = trim(s)
    assert (report.trimmed, report.minid, report.groups, report.length_after) == (0, None, 0, 4)
    assert "no consumer groups: not trimmed" in report.reason
    assert r.xlen(s) == 4


def test_ids_compare_as_numbers(trim: Any, r: redis.Redis, name: Name) -> None:
    s = name("s")
    ids = [r.xadd(s, {"i": i}, id=f"5-{i}").decode() for i in range(1, 13)]
    r.xgroup_create(s, "g", "0")
    r.xack(s, "g", *read(r, s, "g", 9))  # up to 5-9: the cut is 5-10, not "5-9" + 1 as text
    assert trim(s).minid == "5-10" and ids_of(r, s) == ids[9:]
    r.xack(s, "g", *read(r, s, "g", 3))  # up to 5-12
    r.xadd(s, {"i": "max"}, id="5-18446744073709551615")
    r.xadd(s, {"i": "next"}, id="6-0")
    r.xack(s, "g", *read(r, s, "g", 1))  # up to 5-<max seq>: the next id is 6-0
    report = trim(s)
    assert report.minid == "6-0" and ids_of(r, s) == ["6-0"]


def test_arguments_and_clients_are_checked(redis_url: str, r: redis.Redis) -> None:
    with pytest.raises(ConfigError, match="stream"):
        safe_trim(r, "")
    with pytest.raises(ConfigError, match="dry_run"):
        safe_trim(r, "s", dry_run="yes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="async_safe_trim"):
        safe_trim(conveyor.connect(redis_url, asyncio=True), "s")

    async def wrong() -> None:
        await async_safe_trim(r, "s")

    with pytest.raises(ConfigError, match="use safe_trim"):
        asyncio.run(wrong())


def test_trimming_under_load_loses_nothing(redis_url: str, r: redis.Redis, name: Name) -> None:
    """Two groups consume while a producer adds and safe_trim runs in a loop: every entry
    reaches both groups."""
    s = name("s")
    total = 3000
    r.xgroup_create(s, "a", "0", mkstream=True)
    r.xgroup_create(s, "b", "0")
    produced: list[str] = []
    seen: dict[str, set[str]] = {"a": set(), "b": set()}
    done = threading.Event()

    def produce() -> None:
        client = conveyor.connect(redis_url)
        for i in range(total):
            produced.append(client.xadd(s, {"i": i}).decode())
        client.close()

    def consume(group: str, batch_size: int) -> None:
        client = conveyor.connect(redis_url)
        with Consumer(client, s, group, batch_size=batch_size, max_wait_ms=20) as c:
            while len(seen[group]) < total and not done.is_set():
                batch = c.get_batch()
                seen[group].update(m.id for m in batch)
                c.ack_many(batch)
        client.close()

    threads = [
        threading.Thread(target=produce),
        threading.Thread(target=consume, args=("a", 50)),
        threading.Thread(target=consume, args=("b", 7)),
    ]
    for t in threads:
        t.start()
    trimmed = 0
    try:
        while any(t.is_alive() for t in threads[1:]):
            trimmed += safe_trim(r, s).trimmed
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
    trimmed += safe_trim(r, s).trimmed
    assert seen["a"] == seen["b"] == set(produced)
    assert trimmed == total and r.xlen(s) == 0
