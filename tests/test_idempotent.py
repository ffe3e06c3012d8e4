"""Idempotent producers against a real server, once per driver: a send under an idempotency key
already seen within the window adds nothing and answers the first id, atomically, even when the
replies are lost and the sends repeated. tests/test_cluster.py runs them again on a cluster."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

import conveyor
from conveyor._keys import idempotency_key, key_slot
from conveyor.errors import ConfigError, ConnectionLost, FieldTypeError, ServerError
from tests.conftest import Drivers
from tests.faultproxy import FaultProxy
from tests.test_recovery import until

Name = Callable[[str], str]


def entries(r: Any, stream: str) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()} for _, f in r.xrange(stream)]


def test_a_repeated_key_adds_nothing_and_answers_the_first_id(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    p = drivers.producer(s)
    first = p.send({"order": "42"}, idempotency_key="order-42")
    assert p.send({"order": "42", "again": "1"}, idempotency_key="order-42") == first
    other = p.send({"order": "43"}, idempotency_key="order-43")
    assert other != first
    assert p.send({"order": "44"}) not in (first, other)  # no key: a plain XADD
    assert entries(r, s) == [{"order": "42"}, {"order": "43"}, {"order": "44"}]
    assert p.sent_count == 3 and p.repeated_count == 1
    key = idempotency_key(s, "order-42")
    assert key_slot(key) == key_slot(s)
    assert r.get(key) == first.encode()
    assert 0 < r.pttl(key) <= 86_400_000  # it expires with the window (24 h by default)


def test_send_many_adds_each_new_key_once_across_and_within_chunks(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    p = drivers.producer(s, maxlen=1000)
    before = p.send_many([{"n": "0"}, {"n": "1"}], idempotency_keys=["k0", "k1"])
    rows = [{"n": str(i)} for i in range(7)]
    keys = ["k0", "k2", "k3", "k2", "k1", "k4", "k4"]
    ids = p.send_many(rows, chunk=3, idempotency_keys=keys)
    assert ids[0] == before[0] and ids[4] == before[1]  # sent by the first call
    assert ids[3] == ids[1] and ids[6] == ids[5]  # repeated within the call, across a chunk
    assert [e["n"] for e in entries(r, s)] == ["0", "1", "1", "2", "5"]
    assert p.sent_count == 5 and p.repeated_count == 4


def server_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_a_key_is_forgotten_after_the_window(drivers: Drivers, r: redis.Redis, name: Name) -> None:
    s = name("s")
    p = drivers.producer(s, idempotency_window_ms=1500)
    before = server_ms(r)
    first = p.send({"v": "1"}, idempotency_key="k")
    after = server_ms(r)
    # the key expires a window after the send (server clock; a busy machine may be slow to ask)
    assert before + 1500 <= r.pexpiretime(idempotency_key(s, "k")) <= after + 1500
    again = until(lambda: p.send({"v": "2"}, idempotency_key="k") != first, 10, "the window")
    assert again and [e["v"] for e in entries(r, s)] == ["1", "2"]


def test_replies_lost_and_sends_repeated_add_each_key_once(
    drivers: Drivers, r: redis.Redis, name: Name, server: Any
) -> None:
    """The fault proxy lets every script reach the server and cuts the connection before its
    reply, again and again; the producer is called again until it answers. Each key is in the
    stream once, and the ids it answered in the end are those of the first adds."""
    s = name("s")
    with FaultProxy(server.port) as proxy:
        client = conveyor.connect(proxy.url, asyncio=drivers.kind == "async")
        p = drivers.producer(s, client=client)
        proxy.lose_reply("EVAL", times=4)
        lost = 0
        got: list[str] = []
        while True:
            try:
                got.append(p.send({"n": "0"}, idempotency_key="k0"))
                break
            except ConnectionLost:
                lost += 1
        proxy.lose_reply("EVAL", times=3)
        rows = [{"n": str(i)} for i in range(1, 50)]
        keys = [f"k{i}" for i in range(1, 50)]
        while True:
            try:
                got += p.send_many(rows, chunk=10, idempotency_keys=keys)
                break
            except ConnectionLost as exc:
                assert "adds none of them twice" in str(exc)
                lost += 1
        assert proxy.pending_faults() == 0
        if drivers.kind == "async":
            drivers.run(client.aclose())
        else:
            client.close()
    assert lost >= 5  # four single sends, and at least one call of send_many (two chunks fly)
    assert [e["n"] for e in entries(r, s)] == [str(i) for i in range(50)]  # each once, in order
    assert got == [i.decode() for i, _ in r.xrange(s)]


def test_bad_keys_are_refused_before_anything_is_sent(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    p = drivers.producer(s)
    with pytest.raises(ConfigError, match="idempotency key must be a non-empty str, got ''"):
        p.send({"a": "1"}, idempotency_key="")
    with pytest.raises(ConfigError, match="idempotency key of row 1 must be a non-empty str"):
        p.send_many([{"a": "1"}, {"a": "2"}], idempotency_keys=["k", 7])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="has 1 keys for 2 rows"):
        p.send_many([{"a": "1"}, {"a": "2"}], idempotency_keys=["k"])
    with pytest.raises(ConfigError, match="sequence of str, one per row, got str"):
        p.send_many([{"a": "1"}], idempotency_keys="k")
    with pytest.raises(FieldTypeError, match="field 'a' of row 0"):
        p.send_many([{"a": [1]}], idempotency_keys=["k"])
    with pytest.raises(ConfigError, match="idempotency_window_ms must be >= 1"):
        drivers.producer(s, idempotency_window_ms=0)
    assert not r.exists(s)


def test_a_key_of_another_type_refuses_the_whole_chunk(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    r.hset(idempotency_key(s, "bad"), "x", "y")
    p = drivers.producer(s)
    with pytest.raises(ServerError, match="WRONGTYPE"):
        p.send_many([{"a": "1"}, {"a": "2"}], idempotency_keys=["good", "bad"])
    assert not r.exists(s) and not r.exists(idempotency_key(s, "good"))
