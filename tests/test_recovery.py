"""Recovery against a real server, once per driver: retries with backoff, dead-lettering,
reclaim from dead or stuck consumers, lease renewal, and run()."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from conveyor import Batch, Consumer
from conveyor._keys import dead_letter_key, heartbeat_key
from tests.conftest import Drivers, command_calls

Name = Callable[[str], str]
FAST = {"heartbeat_ms": 50, "retry_backoff_ms": 20, "retry_backoff_max_ms": 80}


def fill(r: redis.Redis, stream: str, n: int) -> list[str]:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(stream, {"n": str(i)})
    return [x.decode() for x in pipe.execute()]


def dead_letters(r: redis.Redis, stream: str) -> list[dict[str, str]]:
    return [
        {k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(dead_letter_key(stream))
    ]


def pending(r: redis.Redis, stream: str, group: str = "g") -> int:
    return int(r.xpending(stream, group)["pending"])


def consumers(r: redis.Redis, stream: str, group: str = "g") -> set[str]:
    return {c["name"].decode() for c in r.xinfo_consumers(stream, group)}


def until(condition: Callable[[], Any], timeout_s: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def play_dead(c: Any) -> None:
    """Stop a consumer's heartbeats without leaving the group: as if its process died."""
    target = getattr(c, "_target", c)
    if isinstance(target, Consumer):
        target._wake.set()
        assert target._heartbeat_thread is not None
        target._heartbeat_thread.join(5)
    else:
        task = target._heartbeat_task
        assert task is not None
        # One cancel() may be swallowed on Python 3.11 (asyncio.wait_for inside redis-py):
        # cancel until the task is really over.
        loop = task.get_loop()
        while not task.done():
            task.cancel()
            loop.run_until_complete(asyncio.sleep(0.01))


def test_a_failing_message_is_retried_with_backoff_then_dead_lettered(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 5)
    poison = r.xadd(s, {"n": "poison"}).decode()
    c = drivers.consumer(s, "g", max_deliveries=3, max_wait_ms=30, **FAST)
    seen: list[int] = []
    ok = 0

    def handler(batch: Batch) -> None:
        nonlocal ok
        for msg in batch:
            if msg.fields["n"] == "poison":
                seen.append(msg.deliveries)
                batch.fail(msg, ValueError("cannot parse"))
                if len(seen) == 3:
                    c.stop()
            else:
                ok += 1
                batch.ack(msg)

    c.run(handler)
    assert seen == [1, 2, 3] and ok == 5
    (dead,) = dead_letters(r, s)
    assert dead["n"] == "poison"
    assert dead["conveyor.origin_stream"] == s and dead["conveyor.origin_id"] == poison
    assert dead["conveyor.group"] == "g" and dead["conveyor.consumer"] == c.name
    assert dead["conveyor.deliveries"] == "3"
    assert dead["conveyor.error"] == "ValueError: cannot parse"
    assert abs(int(dead["conveyor.time"]) - time.time() * 1000) < 60_000
    assert pending(r, s) == 0
    assert c.dead_lettered_count == 1 and c.failed_count == 3 and c.retried_count == 2


def test_an_exception_fails_only_what_the_handler_did_not_settle(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 3)
    c = drivers.consumer(s, "g", max_wait_ms=30, **FAST)
    deliveries: dict[str, list[int]] = {}

    def handler(batch: Batch) -> None:
        for msg in batch:
            deliveries.setdefault(msg.fields["n"], []).append(msg.deliveries)
        if len(deliveries["1"]) == 1:
            batch.ack(batch[0])
            raise RuntimeError("database down")
        batch.ack_all()
        c.stop()

    c.run(handler)
    assert deliveries == {"0": [1], "1": [1, 2], "2": [1, 2]}
    assert pending(r, s) == 0


def test_run_sends_the_acks_of_a_batch_in_one_xack(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 100)
    c = drivers.consumer(s, "g", batch_size=50, max_wait_ms=30)
    batches = 0

    def calls() -> int:
        return command_calls(r, "xack", s)

    before = calls()

    def handler(batch: Batch) -> None:
        nonlocal batches
        for msg in batch:
            batch.ack(msg)
        batches += 1
        if batches == 2:
            c.stop()

    c.run(handler)
    assert calls() - before == 2
    assert pending(r, s) == 0


def test_fail_and_dead_letter_outside_run(drivers: Drivers, r: redis.Redis, name: Name) -> None:
    s = name("s")
    fill(r, s, 2)
    c = drivers.consumer(s, "g", batch_size=2, max_wait_ms=30, **FAST)
    first, second = c.get_batch()
    c.fail(first, "try later")
    assert c.dead_letter(second, "unusable") is True
    assert c.dead_letter(second, "again") is False  # no longer ours
    again = until(c.get_batch, what="the failed message's retry")
    assert [(m.id, m.deliveries) for m in again] == [(first.id, 2)]
    c.ack(again[0])
    assert [d["conveyor.error"] for d in dead_letters(r, s)] == ["unusable"]
    assert pending(r, s) == 0


def test_a_dead_consumers_entries_are_reclaimed_and_it_is_removed(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 5)
    victim = drivers.consumer(s, "g", consumer="victim", batch_size=5, max_wait_ms=30, **FAST)
    assert len(victim.get_batch()) == 5
    play_dead(victim)
    heir = drivers.consumer(s, "g", consumer="heir", max_wait_ms=30, **FAST)
    batch = until(heir.get_batch, what="reclaimed entries")
    assert [(m.id, m.deliveries) for m in batch] == [(i, 2) for i in ids]
    assert heir.reclaimed_count == 5
    heir.ack_many(batch)

    def victim_removed() -> bool:
        heir.get_batch()  # reclaim rounds run between batches
        return "victim" not in consumers(r, s)

    until(victim_removed, what="the dead consumer's removal")
    assert consumers(r, s) == {"heir"}
    assert r.hget(heartbeat_key(s, "g"), "victim") is None


def test_a_live_consumer_with_a_long_handler_is_not_robbed(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 5)
    # renewed every 50 ms, taken once idle for 1.5 s: only a renewal held up that long (a
    # machine that busy) would let the other take them
    slow = drivers.consumer(s, "g", batch_size=5, max_wait_ms=30, claim_idle_ms=1500, **FAST)
    held = slow.get_batch()
    other = drivers.consumer(s, "g", max_wait_ms=30, claim_idle_ms=1500, **FAST)
    deadline = time.monotonic() + 3.0  # twice claim_idle_ms
    while time.monotonic() < deadline:
        assert len(other.get_batch()) == 0
    assert slow.ack_many(held) == 5


def test_entries_of_consumers_without_heartbeats_are_judged_by_idle_time(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 3)
    r.xgroup_create(s, "g", "0")
    r.xreadgroup("g", "java-worker", {s: ">"}, count=3)
    c = drivers.consumer(s, "g", max_wait_ms=30, claim_idle_ms=400, heartbeat_ms=50)
    t0 = time.monotonic()
    batch = until(c.get_batch, what="entries idle for claim_idle_ms")
    assert time.monotonic() - t0 >= 0.3  # fresh entries were left alone
    assert [m.id for m in batch] == ids


def test_reclaim_follows_its_cursor_past_busy_entries(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 1000)
    busy = drivers.consumer(s, "g", consumer="busy", batch_size=1000, max_wait_ms=30, **FAST)
    held: list[str] = []

    def all_held() -> bool:  # under load a cluster's read can come back empty once
        held.extend(m.id for m in busy.get_batch())
        return len(held) >= 1000

    until(all_held, what="the busy consumer's 1,000 entries")
    assert len(held) == 1000
    behind = fill(r, s, 5)
    r.xreadgroup("g", "stuck", {s: ">"}, count=5)
    # The busy consumer renews its entries every 50 ms; entries idle for 2 s are taken from
    # anyone: only a renewal held up for 2 s (a machine that busy) would let c take them.
    c = drivers.consumer(
        s, "g", consumer="c", batch_size=10, max_wait_ms=30, claim_idle_ms=2000, heartbeat_ms=50
    )
    got: list[str] = []
    deadline = time.monotonic() + 15
    while len(got) < 5 and time.monotonic() < deadline:
        got += [m.id for m in c.get_batch()]
    assert got == behind  # found behind 1,000 busy entries, none of which was taken


def test_two_reclaimers_never_take_the_same_entry(
    r: redis.Redis, name: Name, redis_url: str
) -> None:
    import conveyor

    s = name("s")
    N = 1500  # enough rounds of 7 that every heir races, even on a busy machine
    ids = fill(r, s, N)
    client = conveyor.connect(redis_url)
    victim = Consumer(client, s, "g", consumer="victim", batch_size=N, max_wait_ms=30, **FAST)
    assert len(victim.get_batch()) == N
    play_dead(victim)
    heirs = [
        Consumer(client, s, "g", consumer=f"heir{i}", batch_size=7, max_wait_ms=30, **FAST)
        for i in range(3)
    ]
    taken: list[list[str]] = [[] for _ in heirs]
    # The victim's entries are claimable once its beat is stale and they are idle that long
    # too (three beats); the heirs start racing then, each with a reclaim round.
    timeout_ms = 3 * FAST["heartbeat_ms"]
    deadline = time.monotonic() + 15
    while len(r.xpending_range(s, "g", "-", "+", N, idle=timeout_ms)) < N:
        assert time.monotonic() < deadline, "the victim's entries never became claimable"
        time.sleep(0.01)
    start = threading.Barrier(len(heirs))

    def work(i: int) -> None:
        start.wait(10)
        deadline = time.monotonic() + 15
        while sum(map(len, taken)) < N and time.monotonic() < deadline:
            batch = heirs[i].get_batch()
            taken[i] += [m.id for m in batch]
            heirs[i].ack_many(batch)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = [i for part in taken for i in part]
    assert sorted(everything) == sorted(ids)  # each entry exactly once
    assert all(taken)  # they really raced
    for h in heirs:
        h.close()


def test_a_message_its_consumers_keep_dying_on_is_dead_lettered_not_delivered(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    (msg_id,) = fill(r, s, 1)
    r.xgroup_create(s, "g", "0")
    r.xreadgroup("g", "crashy", {s: ">"}, count=1)
    r.xclaim(s, "g", "crashy", 0, [msg_id], retrycount=5)  # it was delivered 5 times
    c = drivers.consumer(s, "g", consumer="crashy", max_deliveries=5, max_wait_ms=30, **FAST)
    assert len(c.get_batch()) == 0  # the 6th delivery is not handed out
    (dead,) = dead_letters(r, s)
    assert dead["conveyor.deliveries"] == "6" and "max_deliveries=5" in dead["conveyor.error"]
    assert pending(r, s) == 0


def test_run_keeps_going_when_its_connection_is_killed(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 50)
    c = drivers.consumer(s, "g", consumer="resilient", batch_size=10, max_wait_ms=30, **FAST)
    done: list[str] = []
    killed = False

    def handler(batch: Batch) -> None:
        nonlocal killed
        if not killed:  # cut the consumer's reader connection under it
            killed = True
            for client in r.client_list():
                if client["name"] == "conveyor:resilient":
                    r.client_kill_filter(_id=client["id"])
        done.extend(m.id for m in batch)
        batch.ack_all()
        if len(set(done)) >= 50:
            c.stop()

    c.run(handler)
    assert len(set(done)) == 50
    assert pending(r, s) == 0


def test_heartbeats_are_recorded_with_the_server_clock(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    c = drivers.consumer(s, "g", consumer="beating", max_wait_ms=10, **FAST)
    c.get_batch()
    value = (r.hget(heartbeat_key(s, "g"), "beating") or b"0:0").decode()
    first, timeout = map(int, value.split(":"))
    assert timeout == 150  # three beats of 50 ms: the consumer says how long it may be silent
    server_ms = int(r.time()[0]) * 1000
    assert abs(first - server_ms) < 5_000

    def beat_again() -> bool:
        c.get_batch()  # lets the asyncio driver's event loop (and its heartbeat task) run
        beat = (r.hget(heartbeat_key(s, "g"), "beating") or b"0:0").split(b":")[0]
        return int(beat) > first

    until(beat_again, what="a new beat")
    c.close()
    assert r.hget(heartbeat_key(s, "g"), "beating") is None  # left cleanly


def test_a_slower_heartbeat_is_judged_by_its_own_timeout(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 5)
    slow = drivers.consumer(s, "g", batch_size=5, max_wait_ms=30, heartbeat_ms=400)
    held = slow.get_batch()
    fast = drivers.consumer(s, "g", max_wait_ms=30, heartbeat_ms=50)  # its own timeout: 150 ms
    deadline = time.monotonic() + 1.0  # the slow one is silent for 400 ms between beats
    while time.monotonic() < deadline:
        assert len(fast.get_batch()) == 0
    assert slow.ack_many(held) == 5
