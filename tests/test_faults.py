"""A lost XREADGROUP reply strands nothing (PITFALLS 1): the entries the server delivered come
back from the consumer's own pending list on the next batch."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable

import pytest
import redis

import conveyor
from conveyor import AsyncConsumer, ConnectionLost, Consumer


def fill(r: redis.Redis, stream: str, n: int) -> set[str]:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(stream, {"n": str(i)})
    return {x.decode() for x in pipe.execute()}


def test_a_killed_reader_connection_loses_nothing(
    redis_url: str, r: redis.Redis, name: Callable[[str], str]
) -> None:
    s = name("s")
    c = Consumer(
        conveyor.connect(redis_url), s, "g", consumer="victim", batch_size=20, max_wait_ms=5000
    )

    def kill_reader_when_blocked() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            for client in r.client_list():
                mine = client["name"] == "conveyor:victim" and client["cmd"] == "xreadgroup"
                if mine and "b" in client["flags"]:  # blocked on the server: kill it now
                    r.client_kill_filter(_id=client["id"])
                    return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_reader_when_blocked)
    killer.start()
    with pytest.raises(ConnectionLost):
        c.get_batch()
    killer.join()
    produced = fill(r, s, 20)
    got: set[str] = set()
    while batch := c.get_batch() if len(got) < 20 else None:
        got |= {m.id for m in batch}
        c.ack_many(batch)
    assert got == produced
    assert r.xpending(s, "g")["pending"] == 0


async def test_cancelled_reads_strand_nothing(redis_url: str, name: Callable[[str], str]) -> None:
    s = name("s")
    client = conveyor.connect(redis_url, asyncio=True)
    sync = conveyor.connect(redis_url)
    c = AsyncConsumer(client, s, "g", consumer="c", batch_size=7, max_wait_ms=200)
    rng = random.Random(7)
    produced: set[str] = set()
    for _ in range(15):
        produced |= fill(sync, s, 5)
        task = asyncio.ensure_future(c.get_batch())
        for _ in range(rng.randrange(0, 6)):  # cancel at a random point of the round trip
            await asyncio.sleep(0)
        task.cancel()
        try:
            batch = await task
        except asyncio.CancelledError:
            continue
        await c.ack_many(batch)
        produced -= {m.id for m in batch}
    while produced:
        batch = await c.get_batch()
        assert batch, f"{len(produced)} messages never came back"
        assert {m.id for m in batch} <= produced
        produced -= {m.id for m in batch}
        await c.ack_many(batch)
    assert sync.xpending(s, "g")["pending"] == 0
    await c.close()
    await client.aclose()
