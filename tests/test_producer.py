"""Producer and AsyncProducer against a real server, once per driver."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

import conveyor
from conveyor import ConfigError, EmbeddedServer, FieldTypeError, PayloadError, Producer
from conveyor.errors import ServerError
from tests.conftest import Drivers
from tests.faultproxy import FaultProxy

Name = Callable[[str], str]


@pytest.mark.parametrize("decode", [False, True])
def test_send_returns_str_ids_whatever_the_client(
    drivers: Drivers, r: redis.Redis, name: Name, decode: bool
) -> None:
    s = name("s")
    p = drivers.producer(s, client=drivers.client(decode_responses=decode))
    first = p.send({"a": "1", "n": 2, "f": 1.5, "raw": b"\x00"})
    ids = p.send_many([{"i": i} for i in range(1200)], chunk=500)
    assert isinstance(first, str) and all(isinstance(i, str) for i in ids)
    assert len(ids) == 1200 and len(set(ids)) == 1200
    entries = r.xrange(s)
    assert [e[0].decode() for e in entries] == [first, *ids]
    assert entries[0][1] == {b"a": b"1", b"n": b"2", b"f": b"1.5", b"raw": b"\x00"}
    assert entries[-1][1] == {b"i": b"1199"}
    assert p.sent_count == 1201


def test_send_many_takes_any_iterable(drivers: Drivers, r: redis.Redis, name: Name) -> None:
    s = name("s")
    ids = drivers.producer(s).send_many({"i": i} for i in range(7))
    assert len(ids) == 7 and r.xlen(s) == 7
    assert drivers.producer(s).send_many([]) == []


def test_maxlen_trims_approximately_and_exactly(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    exact, approx = name("exact"), name("approx")
    drivers.producer(exact, maxlen=10, approximate=False).send_many({"i": i} for i in range(500))
    drivers.producer(approx, maxlen=10).send_many({"i": i} for i in range(500))
    assert r.xlen(exact) == 10
    assert 10 <= r.xlen(approx) < 500


def test_minid_trims_older_entries(drivers: Drivers, r: redis.Redis, name: Name) -> None:
    s = name("s")
    for i in range(1, 6):
        r.xadd(s, {"i": i}, id=f"{i}-0")
    drivers.producer(s, minid="4-0", approximate=False).send({"i": 6})
    assert [e[0] for e in r.xrange(s)][:2] == [b"4-0", b"5-0"]


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"price": None}, "'price'"),
        ({"ok": True}, "'ok' has a bool"),
        ({"tags": ["a"]}, "'tags'"),
        ({}, "empty"),
    ],
)
def test_bad_values_name_the_field_and_nothing_is_sent(
    drivers: Drivers, r: redis.Redis, name: Name, fields: dict[str, object], needle: str
) -> None:
    s = name("s")
    with pytest.raises(FieldTypeError, match=needle):
        drivers.producer(s).send(fields)
    assert r.xlen(s) == 0


def test_a_bad_row_names_its_index_and_what_was_sent(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    rows = [{"i": i} for i in range(12)] + [{"i": object()}]
    with pytest.raises(FieldTypeError, match=r"row 12.*10 entries before it were added"):
        drivers.producer(s).send_many(rows, chunk=5)
    assert r.xlen(s) == 10  # the bad row's chunk was not sent


def test_json_codec_round_trip(drivers: Drivers, name: Name) -> None:
    s = name("s")
    drivers.producer(s, codec="json").send({"order": 42, "items": ["a", "b"], "ok": True})
    (msg,) = drivers.consumer(s, "g", max_wait_ms=50).get_batch()
    assert msg.payload == {"order": 42, "items": ["a", "b"], "ok": True}
    with pytest.raises(FieldTypeError, match="JSON"):
        drivers.producer(s, codec="json").send({"x": object()})


def test_payload_errors_name_the_message(drivers: Drivers, r: redis.Redis, name: Name) -> None:
    s = name("s")
    r.xadd(s, {"payload": "{not json"})
    r.xadd(s, {"other": "1"})
    bad, missing = drivers.consumer(s, "g", max_wait_ms=50).get_batch()
    with pytest.raises(PayloadError, match="not JSON"):
        _ = bad.payload
    with pytest.raises(PayloadError, match="no 'payload' field"):
        _ = missing.payload


def test_bad_chunk_is_a_config_error(drivers: Drivers, name: Name) -> None:
    with pytest.raises(ConfigError, match="chunk"):
        drivers.producer(name("s")).send_many([{"a": 1}], chunk=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_json_codec_refuses_nan_and_infinity_naming_the_field(
    r: redis.Redis, name: Callable[[str], str], bad: float
) -> None:
    s = name("s")
    p = Producer(r, s, codec="json")
    with pytest.raises(FieldTypeError) as caught:
        p.send_many([{"ok": 1}, {"items": [{"price": bad}]}])
    text = str(caught.value)
    assert "row 1" in text or "[1]" in text or "1" in text
    assert "payload['items'][0]['price']" in text and "\n" not in text
    assert r.exists(s) == 0  # nothing of that chunk was sent


def test_a_refused_chunk_stops_the_pipeline_and_counts_what_was_added(
    drivers: Drivers, r: redis.Redis, name: Name, server: EmbeddedServer
) -> None:
    """Chunks go back to back (the next is written before the replies of the one before are
    read). The 7th XADD refused: nothing is sent after the chunk in flight, the error counts
    every entry added (that chunk's too), and the connection stays usable."""
    s = name("s")
    with FaultProxy(server.port) as proxy:
        proxy.inject(lambda args: args[0].upper() == b"XADD" and args[-1] == b"6", b"-OOM no")
        asyncio = drivers.kind == "async"
        client = conveyor.connect(proxy.url, asyncio=asyncio, cluster=False)
        try:
            p = drivers.producer(s, client=client)
            with pytest.raises(
                ServerError, match=r"failed; 14 entries of this call were added: OOM no"
            ):
                p.send_many([{"i": i} for i in range(40)], chunk=5)
            assert r.xlen(s) == 14  # chunk 1, chunk 2 but its refused XADD, chunk 3 in flight
            assert p.send_many([{"i": "again"}]) and r.xlen(s) == 15
        finally:
            drivers.run(client.aclose()) if asyncio else client.close()


def test_chunks_back_to_back_keep_every_id_in_order(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = drivers.producer(s).send_many(({"i": i} for i in range(2_345)), chunk=100)
    assert [e[0].decode() for e in r.xrange(s)] == ids
    assert [int(e[1][b"i"]) for e in r.xrange(s)] == list(range(2_345))
