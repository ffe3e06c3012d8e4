"""Bad data, a full server and stuck handlers never end ``run()`` and never rob a live consumer.

- entries that are not UTF-8, or that have thousands of fields, are dead-lettered byte for byte;
- 10,000 entries in flight are renewed (Lua's ``unpack()`` limit, PITFALLS 21);
- out of memory (``maxmemory``, ``noeviction``, PITFALLS 22): a consumer starts when its group
  exists, refused dead-letter moves are retried, refused heartbeats rob nobody;
- garbage written by other clients into the heartbeats hash, or a key of the wrong type;
- ``handler_timeout_ms``: a stuck handler gives its batch up to the others.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import conveyor
from conveyor import Consumer, DeadLetters, EmbeddedServer
from conveyor._keys import heartbeat_key
from conveyor.errors import ServerError
from conveyor.models import Batch
from tests.workers import Worker, fill, wait_for


def raw(r: redis.Redis) -> redis.Redis:
    return redis.Redis(connection_pool=r.connection_pool)  # bytes, as the server has them


def dead_key(stream: str) -> str:
    return f"{{{stream}}}:dead"


def always_fail(w: Worker, batch: Batch) -> None:
    raise ValueError("cannot handle this")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_non_utf8_entries_are_dead_lettered_byte_for_byte(
    kind: str, redis_url: str, r: redis.Redis, name: Callable[[str], str]
) -> None:
    s = name("s")
    poison = {b"\xff\xfekey": b"\x80\x81 not utf-8 \xc3", b"ok": "é".encode()}
    r.xadd(s, poison)
    fill(r, s, 5)
    w = Worker(
        kind,
        redis_url,
        s,
        "g",
        handler=always_fail,
        max_deliveries=2,
        retry_backoff_ms=0,
        max_wait_ms=50,
    ).start()
    wait_for(lambda: r.xlen(dead_key(s)) == 6, what="every message dead-lettered")
    assert w.alive
    w.stop()
    entries = raw(r).xrange(dead_key(s))
    first = entries[0][1]
    assert {k: v for k, v in first.items() if not k.startswith(b"conveyor.")} == poison
    assert r.xpending(s, "g")["pending"] == 0
    # replay puts the same bytes back
    DeadLetters(r, s, encoding=None).replay()
    assert any(fields == poison for _, fields in raw(r).xrange(s))


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_entry_with_thousands_of_fields_is_dead_lettered_whole(
    kind: str, redis_url: str, r: redis.Redis, name: Callable[[str], str]
) -> None:
    s = name("s")
    wide = {f"f{i}": f"v{i}" for i in range(5_000)}
    wide["\udcff"] = "x"  # and one field name that is not UTF-8 once encoded
    r.xadd(s, {k.encode("utf-8", "surrogateescape"): v for k, v in wide.items()})
    w = Worker(
        kind, redis_url, s, "g", handler=always_fail, max_deliveries=1, max_wait_ms=50
    ).start()
    wait_for(lambda: r.xlen(dead_key(s)) == 1, what="the wide entry dead-lettered")
    w.stop()
    (letter,) = DeadLetters(r, s).list()
    assert letter.fields == wide
    assert letter.origin_id and letter.deliveries == 1
    DeadLetters(r, s).replay()
    (_, back), *_ = [e for e in raw(r).xrange(s) if e[0].decode() != letter.origin_id]
    assert {k.decode("utf-8", "surrogateescape"): v.decode() for k, v in back.items()} == wide


def test_ten_thousand_in_flight_are_renewed_and_not_stolen(
    redis_url: str, r: redis.Redis, name: Callable[[str], str]
) -> None:
    s = name("s")
    fill(r, s, 10_000)
    holder = Consumer(
        conveyor.connect(redis_url),
        s,
        "g",
        consumer="holder",
        batch_size=10_000,
        claim_idle_ms=1500,  # renewals of 10,000 entries keep up even on a busy machine
        heartbeat_ms=100,
    )
    batch = holder.get_batch()
    assert len(batch) == 10_000
    thief = Consumer(
        conveyor.connect(redis_url),
        s,
        "g",
        consumer="thief",
        claim_idle_ms=1500,
        heartbeat_ms=100,
        max_wait_ms=100,
    )
    started = time.monotonic()
    taken = 0
    while time.monotonic() - started < 3.5:  # over twice claim_idle_ms
        taken += len(thief.get_batch())
    assert taken == 0 and holder.lost_count == 0
    assert holder.ack_many(batch) == 10_000
    thief.close()
    holder.close()


@pytest.fixture
def full_server() -> Iterator[tuple[EmbeddedServer, redis.Redis]]:
    """A server of this test's own that can be made to run out of memory."""
    with EmbeddedServer(os.environ.get("CONVEYOR_TEST_SERVER") or None) as srv:
        admin = conveyor.connect(srv.url)
        admin.config_set("maxmemory-policy", "noeviction")
        yield srv, admin
        admin.config_set("maxmemory", "0")
        admin.close()


def out_of_memory(admin: redis.Redis, on: bool) -> None:
    admin.config_set("maxmemory", "1" if on else "0")


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_out_of_memory_starts_retries_moves_and_robs_nobody(
    kind: str,
    full_server: tuple[EmbeddedServer, redis.Redis],
    caplog: pytest.LogCaptureFixture,
) -> None:
    srv, admin = full_server
    s = "orders"
    admin.xgroup_create(s, "g", "0", mkstream=True)
    ids = fill(admin, s, 20)
    release = threading.Event()

    def finish(w: Worker, batch: Batch) -> None:
        for msg in batch:
            batch.dead_letter(msg, "refused while full") if msg.id == ids[0] else batch.ack(msg)
        with w.lock:
            w.processed.update(m.id for m in batch)

    async def finish_later(w: Worker, batch: Batch) -> None:
        while not release.is_set():  # never block the event loop: heartbeats run on it
            await asyncio.sleep(0.01)
        finish(w, batch)

    def slow_then_dead_letter(w: Worker, batch: Batch) -> Any:
        if kind == "async":
            return finish_later(w, batch)
        release.wait(30)
        finish(w, batch)
        return None

    out_of_memory(admin, True)
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        # XGROUP CREATE is refused (OOM) but the group exists: the consumer starts.
        holder = Worker(
            kind,
            srv.url,
            s,
            "g",
            handler=slow_then_dead_letter,
            batch_size=20,
            claim_idle_ms=1500,  # renewals held up this long on a busy machine would be robbed
            heartbeat_ms=100,
            max_wait_ms=50,
        ).start()
        wait_for(lambda: len(holder.seen) == 20, what="the holder's batch")
        # Its heartbeats are refused; another consumer looks for dead ones for a while.
        thief = Consumer(
            conveyor.connect(srv.url),
            s,
            "g",
            consumer="thief",
            claim_idle_ms=1500,
            heartbeat_ms=100,
            max_wait_ms=100,
        )
        started = time.monotonic()
        taken = 0
        while time.monotonic() - started < 3.0:  # twice claim_idle_ms
            taken += len(thief.get_batch())
        assert taken == 0
        release.set()
        # The dead-letter move is refused (XADD under OOM) and kept; run() goes on.
        wait_for(lambda: admin.xpending(s, "g")["pending"] == 1, what="19 acks despite OOM")
        assert holder.alive and admin.xlen("{orders}:dead") == 0
        full_s = time.monotonic() - started
        out_of_memory(admin, False)
        wait_for(lambda: admin.xlen("{orders}:dead") == 1, what="the move retried")
        print(
            f"\nOOM ({kind}): {len(holder.processed)}/20 handled, 19 acked and 1 move kept "
            f"while full ({full_s:.1f} s), taken from the holder {taken}, duplicates "
            f"{len(holder.seen) - len(holder.processed)}"
        )
        holder.stop()
        thief.close()
    assert admin.xpending(s, "g")["pending"] == 0
    assert holder.consumer.lost_count == 0
    text = " ".join(rec.getMessage() for rec in caplog.records)
    assert "refused to create group" in text and "OOM" in text
    assert "refused its heartbeat" in text


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("garbage", ["²", "abc", "", "12:x", "9" * 40, "-5:10"])
def test_garbage_heartbeats_are_judged_by_idle_time(
    kind: str, garbage: str, redis_url: str, r: redis.Redis, name: Callable[[str], str]
) -> None:
    s = name("s")
    produced = set(fill(r, s, 10))
    r.xgroup_create(s, "g", "0")
    r.xreadgroup("g", "ghost", {s: ">"}, count=3)  # a consumer of another client holds 3
    r.hset(heartbeat_key(s, "g"), mapping={"ghost": garbage, "other": "²"})
    w = Worker(kind, redis_url, s, "g", claim_idle_ms=200, heartbeat_ms=50, max_wait_ms=50).start()
    w.finish(produced, "the ghost's entries taken by idle time")
    assert r.xpending(s, "g")["pending"] == 0


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_heartbeats_key_of_the_wrong_type_is_logged_and_consumption_goes_on(
    kind: str,
    redis_url: str,
    r: redis.Redis,
    name: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = name("s")
    produced = set(fill(r, s, 30))
    r.set(heartbeat_key(s, "g"), "not a hash")
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        w = Worker(
            kind,
            redis_url,
            s,
            "g",
            batch_size=10,
            claim_idle_ms=200,
            heartbeat_ms=50,
            max_wait_ms=50,
        ).start()
        w.finish(produced, "every message processed")
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert errors and "WRONGTYPE" in errors[0].getMessage()
    assert heartbeat_key(s, "g") in errors[0].getMessage()
    assert r.xpending(s, "g")["pending"] == 0


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_stuck_handler_gives_its_batch_up(
    kind: str,
    redis_url: str,
    r: redis.Redis,
    name: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past handler_timeout_ms the stuck batch goes to another consumer at once (long before
    claim_idle_ms); the stuck handler's late acks count as stale."""
    s = name("s")
    produced = set(fill(r, s, 10))
    release = threading.Event()
    options: dict[str, Any] = {
        "batch_size": 10,
        "claim_idle_ms": 60_000,
        "heartbeat_ms": 50,
        "max_wait_ms": 50,
    }

    def stuck(w: Worker, batch: Batch) -> Any:
        if kind == "async":
            return asyncio.sleep(3600)  # cancelled at the time limit
        release.wait(60)
        batch.ack_all()
        return None

    with caplog.at_level(logging.ERROR, logger="conveyor"):
        a = Worker(
            kind, redis_url, s, "g", handler=stuck, handler_timeout_ms=300, **options
        ).start()
        wait_for(lambda: len(a.seen) == 10, what="the stuck batch")
        b = Worker(kind, redis_url, s, "g", **options).start()
        wait_for(lambda: b.processed >= produced, what="the other consumer takes it over")
        release.set()
        if kind == "sync":
            wait_for(lambda: a.consumer.stale_ack_count == 10, what="the late acks, stale")
        a.stop()
        b.stop()
    assert a.consumer.timed_out_count == 1
    assert a.consumer.acked_count == 0
    assert r.xpending(s, "g")["pending"] == 0
    line = next(
        rec.getMessage() for rec in caplog.records if "handler_timeout_ms" in rec.getMessage()
    )
    assert a.consumer.name in line and "batch of 10" in line


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_overdue_message_refused_by_a_full_server_strands_nothing(
    kind: str, full_server: tuple[EmbeddedServer, redis.Redis]
) -> None:
    """A message whose consumers kept crashing is due for the dead-letter stream while the
    server is out of memory: the move waits, the rest of the batch is handled at once."""
    srv, admin = full_server
    s = "orders"
    admin.xgroup_create(s, "g", "0", mkstream=True)
    ids = fill(admin, s, 5)
    admin.xreadgroup("g", "crashed", {s: ">"}, count=5)
    for _ in range(3):  # three more crashed deliveries of the first
        admin.xclaim(s, "g", "crashed", 0, [ids[0]])
    admin.hset(heartbeat_key(s, "g"), "crashed", "1:100")  # long dead: all five are taken
    out_of_memory(admin, True)
    w = Worker(kind, srv.url, s, "g", max_deliveries=2, heartbeat_ms=50, max_wait_ms=50).start()
    wait_for(lambda: w.processed >= set(ids[1:]), what="the other four handled")
    assert admin.xlen("{orders}:dead") == 0 and w.alive
    out_of_memory(admin, False)
    wait_for(lambda: admin.xlen("{orders}:dead") == 1, what="the overdue one moved")
    w.stop()
    assert ids[0] not in {i for i, _ in w.seen}  # never handed out again
    assert admin.xpending(s, "g")["pending"] == 0


def test_out_of_memory_never_half_does_a_forward_or_an_idempotent_send(
    full_server: tuple[EmbeddedServer, redis.Redis],
) -> None:
    """While the server is out of memory a forward is done whole or not at all (the XACK is
    not refused, and once it has written the XADD is not either), and an idempotent send is
    refused whole: no entry, no key. Once memory is back each happens exactly once."""
    srv, admin = full_server
    s, out = "orders", "{orders}:out"
    fill(admin, s, 2)
    client = conveyor.connect(srv.url)
    c = Consumer(client, s, "g", max_wait_ms=30, batch_size=2)
    first, second = c.get_batch()
    p = conveyor.Producer(client, s)
    out_of_memory(admin, True)
    try:
        done = c.forward(first, out, {"src": first.id})
    except ServerError as exc:
        assert "OOM" in str(exc)
        done = []
    forwarded = bool(done)
    assert admin.xlen(out) == int(forwarded)
    assert admin.xpending(s, "g")["pending"] == 2 - int(forwarded)  # the ack went with it
    with pytest.raises(ServerError, match="OOM"):
        p.send_many([{"n": "a"}, {"n": "b"}], idempotency_keys=["ka", "kb"])
    assert admin.xlen(s) == 2 and not admin.keys("{orders}:idem:*")
    out_of_memory(admin, False)
    if not forwarded:
        assert len(c.forward(first, out, {"src": first.id})) == 1
    assert c.forward(first, out, {"src": first.id}) == []  # done once, whatever came first
    assert len(c.forward(second, out, {"src": second.id})) == 1
    ids = p.send_many([{"n": "a"}, {"n": "b"}], idempotency_keys=["ka", "kb"])
    assert p.send_many([{"n": "a"}, {"n": "b"}], idempotency_keys=["ka", "kb"]) == ids
    assert [f[b"src"].decode() for _, f in admin.xrange(out)] == [first.id, second.id]
    assert admin.xlen(s) == 4 and admin.xpending(s, "g")["pending"] == 0
    c.close()
    client.close()
