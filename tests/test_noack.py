"""``noack=True``: XREADGROUP NOACK, at-most-once. Nothing becomes pending, on both drivers."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import redis

import conveyor
from conveyor import Batch, ConfigError
from conveyor._keys import dead_letter_key, heartbeat_key
from tests.conftest import Drivers
from tests.workers import fill

Name = Callable[[str], str]


def pending(r: Any, stream: str, group: str = "g") -> int:
    return int(r.xpending(stream, group)["pending"])


def last_delivered(r: Any, stream: str, group: str = "g") -> str:
    (row,) = [g for g in r.xinfo_groups(stream) if g["name"] in (group, group.encode())]
    value = row["last-delivered-id"]
    return value.decode() if isinstance(value, bytes) else str(value)


def test_get_batch_leaves_the_pending_list_empty_and_sends_no_heartbeat(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 25)
    c = drivers.consumer(s, "g", consumer="na", batch_size=10, max_wait_ms=50, noack=True)

    first = c.get_batch()
    assert [m.id for m in first] == ids[:10]
    assert [m.deliveries for m in first] == [1] * 10
    assert pending(r, s) == 0  # delivered, yet nobody's pending entry
    assert last_delivered(r, s) == ids[9]  # the group moved on
    assert c.ack_many(first) == 10 and c.acked_count == 10  # counted, nothing to send
    rest = [m.id for m in c.get_batch()] + [m.id for m in c.get_batch()]
    assert rest == ids[10:]
    assert len(c.get_batch()) == 0
    assert pending(r, s) == 0
    assert not r.exists(heartbeat_key(s, "g"))  # no heartbeats: nothing to renew
    c.close()
    assert r.xinfo_consumers(s, "g") == []  # it owned nothing, so it left


def test_run_counts_acks_and_dead_letters_what_failed(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 30)
    c = drivers.consumer(s, "g", batch_size=10, max_wait_ms=50, noack=True)
    seen: list[str] = []

    def handler(batch: Batch) -> None:
        seen.extend(m.id for m in batch)
        if batch[0].id == ids[10]:
            raise RuntimeError("the whole second batch fails")
        for msg in batch:
            if msg.id == ids[3]:
                batch.fail(msg, "bad row")
            elif msg.id != ids[4]:  # ids[4]: left unsettled
                batch.ack(msg)
        if len(seen) >= 30:
            c.stop()

    c.run(handler)

    assert seen == ids  # each delivered once: no retry, nothing re-read
    assert pending(r, s) == 0
    assert c.acked_count == 18
    dead = r.xrange(dead_letter_key(s))
    origin = {f[b"conveyor.origin_id"].decode(): f[b"conveyor.error"].decode() for _, f in dead}
    assert sorted(origin) == sorted([ids[3], ids[4], *ids[10:20]])
    assert origin[ids[3]] == "bad row (read with noack: no retry)"
    assert "not settled by the handler" in origin[ids[4]]
    assert "RuntimeError: the whole second batch fails" in origin[ids[10]]
    assert c.dead_lettered_count == 12


def test_a_killed_noack_worker_leaves_nothing_pending_and_its_batch_is_gone(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 30)

    def start() -> subprocess.Popen[str]:
        args = [redis_url, s, "w1", "sync", "30", "noack"]
        return subprocess.Popen(
            [sys.executable, "-m", "tests.shutdown_worker", *args],
            stdout=subprocess.PIPE,
            text=True,
        )

    def handling(proc: subprocess.Popen[str]) -> str:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("handling"), line
        return line

    proc = start()
    try:
        assert handling(proc) == "handling 10\n"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert pending(r, s) == 0  # at-most-once: the batch in hand is gone, not pending
    assert last_delivered(r, s) == ids[9]

    again = start()
    try:
        assert handling(again) == "handling 10\n"
        assert last_delivered(r, s) == ids[19]  # it went on with the next ten
        assert pending(r, s) == 0
    finally:
        again.kill()
        again.wait(30)


def test_noack_on_a_cluster_reads_every_slot_and_leaves_nothing_pending(
    cluster_url: str, name: Name
) -> None:
    rc = conveyor.connect(cluster_url)
    streams = [name("a"), name("b"), name("c")]
    assert len({rc.keyslot(s) for s in streams}) == 3
    ids = {s: fill(rc, s, 15) for s in streams}
    c = conveyor.Consumer(rc, streams, "g", batch_size=20, max_wait_ms=100, noack=True)
    got: dict[str, list[str]] = {s: [] for s in streams}
    try:
        while sum(map(len, got.values())) < 45:
            for msg in c.get_batch():
                got[msg.stream].append(msg.id)
    finally:
        c.close()
        assert all(pending(rc, s) == 0 for s in streams)
        rc.close()
    assert got == ids


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"handler_timeout_ms": 100}, "handler_timeout_ms does not go with noack=True"),
        ({"noack": 1}, "noack must be True or False, got 1"),
    ],
)
def test_bad_noack_options_are_one_line(
    drivers: Drivers, name: Name, options: dict[str, Any], message: str
) -> None:
    options = {"noack": True, **options}
    with pytest.raises(ConfigError, match=message) as caught:
        drivers.consumer(name("s"), "g", **options)
    assert "\n" not in str(caught.value)
