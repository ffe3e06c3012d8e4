"""Read-ahead in ``run()``: the next batch's read is in flight while the handler works, and it
changes no outcome. What it delivered is in the consumer's pending list: renewed while a slow
handler works, given back at once on a warm stop or when the handler runs past its time limit,
found again after a crash or a lost reply, with exact delivery counts (real servers)."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import conveyor
from conveyor import Consumer, EmbeddedServer
from conveyor.models import Batch
from tests.conftest import Drivers, command_calls
from tests.faultproxy import FaultProxy
from tests.test_shutdown import exit_code, start
from tests.test_shutdown import wait_for as wait_for_line
from tests.workers import Worker, fill, wait_for

Name = Callable[[str], str]
KINDS = ["sync", "async"]


def pending(r: redis.Redis, stream: str, group: str = "g") -> int:
    return int(r.xpending(stream, group)["pending"])


def pending_rows(r: redis.Redis, stream: str, group: str = "g") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = r.xpending_range(stream, group, "-", "+", 1000)
    return rows


@pytest.fixture
def proxy(server: EmbeddedServer) -> Iterator[FaultProxy]:
    with FaultProxy(server.port) as p:
        yield p


@pytest.mark.parametrize("kind", KINDS)
def test_the_next_batch_is_read_while_the_handler_works(
    kind: str, redis_url: str, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    produced = set(fill(r, s, 30))
    during: list[int] = []

    def handler(w: Worker, batch: Batch) -> None:
        if not during:  # the server delivers the next batch while this one is in hand
            wait_for(lambda: pending(r, s) >= 20, what="the next batch read during the handler")
            during.append(pending(r, s))
        w._default(batch)

    w = Worker(kind, redis_url, s, "g", handler, batch_size=10, max_wait_ms=100).start()
    w.finish(produced)
    assert during == [20]
    assert sorted(i for i, _ in w.seen) == sorted(produced)  # each handed out once
    assert {d for _, d in w.seen} == {1}
    assert pending(r, s) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_on_a_cluster_too_the_next_batch_is_read_while_the_handler_works(
    kind: str, cluster_url: str, name: Name
) -> None:
    rc = conveyor.connect(cluster_url)
    s = name("s")
    produced = set(fill(rc, s, 30))
    during: list[int] = []

    def handler(w: Worker, batch: Batch) -> None:
        if not during:
            wait_for(lambda: pending(rc, s) >= 20, what="the next batch read during the handler")
            during.append(pending(rc, s))
        w._default(batch)

    w = Worker(kind, cluster_url, s, "g", handler, batch_size=10, max_wait_ms=100).start()
    try:
        w.finish(produced)
    finally:
        rc.close()
    assert during == [20]
    assert sorted(i for i, _ in w.seen) == sorted(produced)
    assert {d for _, d in w.seen} == {1}


@pytest.mark.parametrize("kind", KINDS)
def test_what_was_read_ahead_is_renewed_while_a_slow_handler_works(
    kind: str, redis_url: str, r: redis.Redis, name: Name
) -> None:
    """Two claim_idle_ms into the first batch's handler, the entries read ahead are not
    idle: another consumer's reclaim takes nothing. Renewed every 100 ms, taken once idle for
    1.5 s: only a renewal held up that long (a machine that busy) would let the thief in."""
    s = name("s")
    produced = set(fill(r, s, 20))
    claim_idle_ms = 1500
    thief = Consumer(
        conveyor.connect(redis_url),
        s,
        "g",
        batch_size=20,
        max_wait_ms=50,
        claim_idle_ms=claim_idle_ms,
    )
    stolen: list[Any] = []
    idle_seen: list[int] = []

    def check() -> None:
        rows = pending_rows(r, s)
        idle_seen.extend(int(row["time_since_delivered"]) for row in rows)
        stolen.extend(thief.get_batch())

    def handler(w: Worker, batch: Batch) -> Any:
        if idle_seen:
            return w._default(batch)
        deadline = time.monotonic() + 2 * claim_idle_ms / 1000
        if kind == "sync":
            wait_for(lambda: pending(r, s) == 20, what="the read ahead delivered")
            wait_for(lambda: time.monotonic() > deadline, what="two claim_idle_ms")
            check()
            return w._default(batch)

        async def slow() -> None:  # awaits, so the event loop renews meanwhile
            while pending(r, s) < 20 or time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            check()
            w._default(batch)

        return slow()

    w = Worker(
        kind,
        redis_url,
        s,
        "g",
        handler,
        batch_size=10,
        max_wait_ms=100,
        claim_idle_ms=claim_idle_ms,
        heartbeat_ms=100,
    ).start()
    try:
        w.finish(produced)
    finally:
        thief.close()
    assert stolen == []
    assert len(idle_seen) == 20 and max(idle_seen) < claim_idle_ms
    assert sorted(i for i, _ in w.seen) == sorted(produced)
    assert {d for _, d in w.seen} == {1}


@pytest.mark.parametrize("kind", KINDS)
def test_a_warm_stop_gives_back_what_was_read_ahead_with_exact_counts(
    kind: str, redis_url: str, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    produced = fill(r, s, 30)

    def handler(w: Worker, batch: Batch) -> None:
        wait_for(lambda: pending(r, s) == 20, what="the read ahead delivered")
        w._default(batch)
        w.consumer.stop()

    w = Worker(kind, redis_url, s, "g", handler, batch_size=10, max_wait_ms=100).start()
    wait_for(lambda: not w.alive, what="run() to return after stop()")
    w.stop()
    rows = pending_rows(r, s)
    assert [row["message_id"].decode() for row in rows] == produced[10:20]
    assert {row["times_delivered"] for row in rows} == {0}  # no handler saw them
    assert min(int(row["time_since_delivered"]) for row in rows) >= 60_000  # claimable now

    other = Consumer(conveyor.connect(redis_url), s, "g", batch_size=30, max_wait_ms=100)
    try:
        batch = other.get_batch()
        other.ack_many(batch)
    finally:
        other.close()
    assert sorted(m.id for m in batch) == sorted(produced[10:])
    assert {m.deliveries for m in batch} == {1}
    assert pending(r, s) == 0


def test_a_handler_past_its_time_limit_gives_back_the_read_ahead_too(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    produced = fill(r, s, 20)
    other = Consumer(
        conveyor.connect(redis_url), s, "g", batch_size=20, max_wait_ms=50, heartbeat_ms=100
    )
    taken: list[Any] = []

    def took_both() -> bool:
        taken.extend(other.get_batch())
        return len(taken) >= 20

    def handler(w: Worker, batch: Batch) -> None:
        if not taken:
            # stuck past handler_timeout_ms: the batch in hand and the read ahead are taken
            wait_for(took_both, what="the other consumer to take both batches")
        w._default(batch)  # late: these acks count as stale

    w = Worker(
        "sync",
        redis_url,
        s,
        "g",
        handler,
        batch_size=10,
        max_wait_ms=100,
        handler_timeout_ms=300,
        heartbeat_ms=50,
    ).start()
    try:
        wait_for(lambda: len(taken) >= 20, what="the other consumer to take both batches")
        assert w.consumer.timed_out_count == 1
        other.ack_many(taken)
        wait_for(lambda: pending(r, s) == 0, what="everything acked")
        w.stop()
    finally:
        other.close()
    assert sorted(m.id for m in taken) == sorted(produced)
    deliveries = {m.id: m.deliveries for m in taken}
    assert {deliveries[i] for i in produced[:10]} == {2}  # its handler saw them: counted
    assert {deliveries[i] for i in produced[10:]} == {1}  # read ahead, never handled: not


@pytest.mark.parametrize("kind", KINDS)
def test_a_reply_lost_while_reading_ahead_loses_nothing_and_adds_no_delivery(
    kind: str, proxy: FaultProxy, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    produced = set(fill(r, s, 30))
    reads = itertools.count()
    # the second read of new entries is the first read ahead
    proxy.lose_reply(
        lambda args: args[0].upper() == b"XREADGROUP" and args[-1] == b">" and next(reads) == 1
    )
    w = Worker(kind, proxy.url, s, "g", batch_size=10, max_wait_ms=100).start()
    w.finish(produced)
    assert proxy.lost == 1
    assert sorted(i for i, _ in w.seen) == sorted(produced)  # no duplicate, nothing missing
    assert {d for _, d in w.seen} == {1}
    assert pending(r, s) == 0


@pytest.mark.parametrize("driver", KINDS)
def test_killed_with_a_read_ahead_out_loses_nothing(
    driver: str, redis_url: str, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 30)
    doomed = start(redis_url, s, "worker-ra", driver, 600)
    try:
        assert wait_for_line(doomed, "handling") == "handling 10"
        wait_for(lambda: pending(r, s) == 20, what="the read ahead delivered")
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
    finally:
        doomed.kill()
    assert pending(r, s) == 20  # nothing acked, nothing lost

    again = start(redis_url, s, "worker-ra", driver, 0)
    try:
        for _ in range(3):
            assert wait_for_line(again, "acked") == "acked 10"
        wait_for(lambda: pending(r, s) == 0, what="everything acked after the restart")
        again.send_signal(signal.SIGTERM)
        assert exit_code(again, 15) == 0
    finally:
        again.kill()
    group = r.xinfo_groups(s)[0]
    assert group["pending"] == 0 and group["lag"] == 0


# -- get_batch(): a large read of new entries in two halves ---------------------------------------


def test_get_batch_reads_a_backlog_in_two_halves_with_the_same_outcome(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    """The second half goes out when the first is in, before it is parsed: two reads, one
    batch, in order, nothing more delivered than the batch holds."""
    s = name("s")
    ids = fill(r, s, 500)
    c = drivers.consumer(s, "g", batch_size=200, max_wait_ms=100)
    c.get_batch()  # joins: own pending list, reclaim round, a first batch
    before = command_calls(r, "xreadgroup", s)
    batch = c.get_batch()
    assert [m.id for m in batch] == ids[200:400]
    assert {m.deliveries for m in batch} == {1}
    assert command_calls(r, "xreadgroup", s) - before == 2
    assert pending(r, s) == 400  # the two batches handed out, nothing read beyond them
    c.ack_many(batch)


def test_get_batch_on_a_short_backlog_waits_for_the_rest_as_before(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 150)
    c = drivers.consumer(s, "g", batch_size=200, max_wait_ms=100, linger_ms=0)
    batch = c.get_batch()
    assert [m.id for m in batch] == ids  # the first half full, the rest of what there is
    assert pending(r, s) == 150


@pytest.mark.parametrize("kind", KINDS)
def test_a_reply_lost_on_the_second_half_loses_nothing(
    kind: str, proxy: FaultProxy, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 400)
    client = conveyor.connect(proxy.url) if kind == "sync" else None
    d = Drivers(kind, proxy.url)
    try:
        c = d.consumer(s, "g", client=client, batch_size=200, max_wait_ms=100)
        first = c.get_batch()
        c.ack_many(first)
        proxy.lose_reply(
            lambda args: (
                args[0].upper() == b"XREADGROUP"
                and args[-3:-1] == [b"STREAMS", s.encode()]
                and b"BLOCK" not in args
            )
        )
        with pytest.raises(conveyor.ConnectionLost):
            c.get_batch()
        assert proxy.lost == 1
        again = c.get_batch()  # the own pending list first, read again without a delivery
        seen = [m.id for m in first] + [m.id for m in again]
        while len(seen) < 400:
            more = c.get_batch()
            c.ack_many(more)
            seen += [m.id for m in more]
        c.ack_many(again)
    finally:
        d.close()
        if client is not None:
            client.close()
    assert sorted(seen) == sorted(ids) and len(seen) == 400
    assert {m.deliveries for m in again} == {1}
    assert pending(r, s) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_short_read_ahead_is_topped_up_and_a_warm_stop_gives_back_the_rest(
    kind: str, redis_url: str, r: redis.Redis, name: Name
) -> None:
    """A batch whose read ahead came short reads on for the rest (what came meanwhile); each
    entry is handed out once, and what was read ahead when the consumer stops is given back
    with its delivery count as it was."""
    s = name("s")
    produced = fill(r, s, 25)
    batches: list[int] = []

    def handler(w: Worker, batch: Batch) -> None:
        batches.append(len(batch))
        if len(batches) == 2:
            # served already: the read ahead for batch 3 got 21..25; it reads on for these
            last = produced[-1].encode()
            wait_for(
                lambda: r.xinfo_groups(s)[0]["last-delivered-id"] == last,
                what="the third batch's read served",
            )
            produced.extend(fill(r, s, 10))
        w._default(batch)
        if len(batches) == 3:
            w.consumer.stop()

    w = Worker(kind, redis_url, s, "g", handler, batch_size=10, max_wait_ms=200).start()
    wait_for(lambda: not w.alive, what="run() to return after stop()")
    w.stop()
    assert batches == [10, 10, 10]
    seen = [i for i, _ in w.seen]
    other = Consumer(conveyor.connect(redis_url), s, "g", batch_size=35, max_wait_ms=100)
    try:
        rest = other.get_batch()
        other.ack_many(rest)
    finally:
        other.close()
    assert sorted(seen + [m.id for m in rest]) == sorted(produced)  # each once, none lost
    assert {d for _, d in w.seen} == {1} and {m.deliveries for m in rest} == {1}
    assert pending(r, s) == 0
