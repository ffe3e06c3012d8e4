"""Forwarding stages against a real server, once per driver: ``batch.forward`` and
``Consumer.forward`` ack a message and add its output to the next stream in one script, once,
whoever finishes the message. tests/test_cluster_consumer.py runs them again on a cluster (the
output streams share their input's slot: ``{<input>}:out``)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis

from conveyor import Batch
from conveyor.errors import ConfigError, FieldTypeError, ServerError
from tests.conftest import Drivers
from tests.test_recovery import FAST, fill, pending, play_dead, until

Name = Callable[[str], str]


def out(stream: str, suffix: str = "out") -> str:
    """An output stream in ``stream``'s hash slot."""
    return "{" + stream + "}:" + suffix


def outputs(r: Any, stream: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(stream)]


def run_until_settled(c: Any, r: Any, s: str, handler: Callable[[Batch], None]) -> None:
    """run() the handler until nothing of ``s`` is pending or new for the group."""

    def wrapped(batch: Batch) -> None:
        handler(batch)
        if batch and batch[-1].id == last:
            c.stop()

    last = r.xrevrange(s, count=1)[0][0].decode()
    c.run(wrapped)


def test_run_forwards_each_message_once_with_the_next_read(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 60)
    c = drivers.consumer(s, "g", batch_size=20, max_wait_ms=30)
    handed = 0
    seen_before: list[int] = []

    def handler(batch: Batch) -> None:
        nonlocal handed
        # the forwards of the batch before went out with the read of this one, sent before
        # this handler was called: the server may or may not have served it yet; those of
        # the batches before that have landed (their replies were read)
        seen_before.append(r.xlen(out(s)) if r.exists(out(s)) else 0)
        for msg in batch:
            batch.forward(msg, out(s), {"src": msg.id, "n": int(msg.fields["n"]) * 2})
        handed += len(batch)

    run_until_settled(c, r, s, handler)
    assert seen_before[0] == 0
    assert all(20 * (k - 1) <= seen <= 20 * k for k, seen in enumerate(seen_before) if k)
    assert [o["src"] for o in outputs(r, out(s))] == ids
    assert [o["n"] for o in outputs(r, out(s))] == [str(2 * i) for i in range(60)]
    assert pending(r, s) == 0
    assert c.forwarded_count == 60 and c.acked_count == 60


def test_fan_out_and_mixed_outcomes_in_one_batch(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 4)
    c = drivers.consumer(s, "g", batch_size=4, max_wait_ms=30, **FAST)

    def handler(batch: Batch) -> None:
        first, second, third, fourth = batch
        batch.forward(first, out(s), {"to": "out"})
        batch.forward(first, out(s, "audit"), {"to": "audit"})  # fan-out: both outputs
        batch.ack(first)  # an ack after a forward keeps the forward
        batch.forward(second, [(out(s), {"to": "out"}), (out(s, "audit"), {"to": "audit"})])
        batch.forward(third, out(s), {"to": "dropped"})
        batch.dead_letter(third, "changed its mind")  # drops the forward
        batch.ack(fourth)
        assert batch.outcome(first) == ("forward", f"{out(s)}, {out(s, 'audit')}")
        c.stop()

    c.run(handler)
    assert [o["to"] for o in outputs(r, out(s))] == ["out", "out"]
    assert [o["to"] for o in outputs(r, out(s, "audit"))] == ["audit", "audit"]
    assert pending(r, s) == 0
    assert c.forwarded_count == 2 and c.acked_count == 3 and c.dead_lettered_count == 1
    assert ids[2] in {e["conveyor.origin_id"] for e in outputs(r, "{" + s + "}:dead")}


def test_forward_outside_run_returns_the_ids_and_adds_once(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 2)
    c = drivers.consumer(s, "g", batch_size=2, max_wait_ms=30)
    first, second = c.get_batch()
    added = c.forward(first, out(s), {"v": "1"})
    assert [i.encode() for i in added] == [e[0] for e in r.xrange(out(s))]
    assert c.forward(first, out(s), {"v": "again"}) == []  # acked already: nothing added
    assert len(c.forward(second, [(out(s), {"v": "2"}), (out(s, "b"), {"v": "2"})])) == 2
    assert [o["v"] for o in outputs(r, out(s))] == ["1", "2"]
    assert pending(r, s) == 0 and c.stale_ack_count == 1


def test_a_message_taken_over_is_forwarded_once_whoever_finishes_it(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    """The slow consumer's forward comes after another consumer reclaimed the message and
    forwarded it: the second adds nothing, in either order."""
    s = name("s")
    fill(r, s, 2)
    slow = drivers.consumer(s, "g", consumer="slow", batch_size=2, max_wait_ms=30, **FAST,
                            claim_idle_ms=200)  # fmt: skip
    held = slow.get_batch()
    play_dead(slow)
    heir = drivers.consumer(s, "g", consumer="heir", batch_size=2, max_wait_ms=30, **FAST,
                            claim_idle_ms=200)  # fmt: skip
    taken = until(heir.get_batch, what="the heir's reclaim")
    assert [m.id for m in taken] == [m.id for m in held]
    assert len(heir.forward(taken[0], out(s), {"by": "heir"})) == 1
    assert slow.forward(held[0], out(s), {"by": "slow"}) == []
    assert len(slow.forward(held[1], out(s), {"by": "slow"})) == 1  # the slow one was first
    assert heir.forward(taken[1], out(s), {"by": "heir"}) == []
    assert [o["by"] for o in outputs(r, out(s))] == ["heir", "slow"]
    assert pending(r, s) == 0


def test_a_target_that_is_not_a_stream_refuses_the_whole_forward(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 1)
    r.set(out(s, "str"), "x")
    c = drivers.consumer(s, "g", max_wait_ms=30)
    (msg,) = c.get_batch()
    with pytest.raises(ServerError, match=r"WRONGTYPE.*not a stream"):
        c.forward(msg, [(out(s), {"a": "1"}), (out(s, "str"), {"a": "1"})])
    assert r.xlen(out(s)) == 0 and pending(r, s) == 1  # nothing added, nothing acked
    assert len(c.forward(msg, out(s), {"a": "1"})) == 1


def test_run_keeps_a_refused_forward_and_sends_it_again(
    drivers: Drivers, r: redis.Redis, name: Name, caplog: pytest.LogCaptureFixture
) -> None:
    s = name("s")
    fill(r, s, 1)
    r.set(out(s), "not a stream yet")
    c = drivers.consumer(s, "g", max_wait_ms=30)

    def handler(batch: Batch) -> None:
        for msg in batch:
            batch.forward(msg, out(s), {"src": msg.id})

    def watch() -> bool:
        if r.type(out(s)) == b"string" and "forward on stream" in caplog.text:
            r.delete(out(s))  # the target is fixed: the kept forward goes through next time
        if r.type(out(s)) == b"stream":
            c.stop()
            return True
        return False

    watcher = threading.Thread(target=until, args=(watch, 30, "the kept forward"), daemon=True)
    watcher.start()
    c.run(handler)
    watcher.join(30)
    assert "WRONGTYPE" in caplog.text and "retried with the next reads" in caplog.text
    assert r.xlen(out(s)) == 1 and pending(r, s) == 0


def test_bad_forwards_are_refused_before_anything_is_sent(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 2)
    c = drivers.consumer(s, "g", max_wait_ms=30, batch_size=1)
    (msg,) = c.get_batch()
    with pytest.raises(ConfigError, match="needs fields"):
        c.forward(msg, out(s))
    for target in (out(s), out(s)):  # a new target, then one forwarded to before
        with pytest.raises(FieldTypeError, match=r"field 'a' forwarded to .* has a list value"):
            c.forward(msg, target, {"a": [1]})
        with pytest.raises(FieldTypeError, match=r"field name 3 forwarded to .* must be str or"):
            c.forward(msg, target, {3: "x"})
        with pytest.raises(FieldTypeError, match="must not be empty"):
            c.forward(msg, target, {})
        if not r.exists(target):
            (other,) = c.get_batch()
            c.forward(other, target, {"a": "1"})
    with pytest.raises(ConfigError, match="not a \\(stream, fields\\) pair"):
        c.forward(msg, ["oops"])
    with pytest.raises(ConfigError, match="list of \\(stream, fields\\) is empty"):
        c.forward(msg, [])
    assert pending(r, s) == 1 and r.xlen(out(s)) == 1


def test_a_noack_consumer_cannot_forward(drivers: Drivers, r: redis.Redis, name: Name) -> None:
    s = name("s")
    fill(r, s, 1)
    c = drivers.consumer(s, "g", max_wait_ms=30, noack=True)
    (msg,) = c.get_batch()
    with pytest.raises(ConfigError, match="noack"):
        c.forward(msg, out(s), {"a": "1"})
