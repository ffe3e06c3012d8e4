"""Consumer behaviour against a real server, run once per driver (Consumer, AsyncConsumer)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import pytest
import redis

from conveyor import ConfigError, Message
from tests.conftest import Drivers, command_calls

Name = Callable[[str], str]


def fill(r: redis.Redis, stream: str, n: int, start: int = 0) -> list[str]:
    pipe = r.pipeline(transaction=False)
    for i in range(start, start + n):
        pipe.xadd(stream, {"n": str(i)})
    return [x.decode() for x in pipe.execute()]


def pending_total(r: redis.Redis, stream: str, group: str) -> int:
    return int(r.xpending(stream, group)["pending"])


def xreadgroup_calls(r: redis.Redis, stream: str) -> int:
    return command_calls(r, "xreadgroup", stream)


def test_batches_fill_up_and_every_message_is_acked(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 250)
    c = drivers.consumer(s, "g", batch_size=100, max_wait_ms=200)
    sizes, seen = [], []
    for _ in range(3):
        batch = c.get_batch()
        sizes.append(len(batch))
        seen += [m.id for m in batch]
        assert c.ack_many(batch) == len(batch)
    assert sizes == [100, 100, 50]
    assert seen == ids
    assert pending_total(r, s, "g") == 0
    assert c.acked_count == 250 and c.delivered_count == 250


def test_group_is_created_at_0_so_earlier_entries_are_seen(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 5)
    assert len(drivers.consumer(s, "g", max_wait_ms=50).get_batch()) == 5
    # a second consumer in the same group: creating the group again is fine (BUSYGROUP)
    assert len(drivers.consumer(s, "g", max_wait_ms=50).get_batch()) == 0


def test_start_dollar_sees_only_new_entries(drivers: Drivers, r: redis.Redis, name: Name) -> None:
    s = name("s")
    fill(r, s, 5)
    c = drivers.consumer(s, "g", start="$", max_wait_ms=50)
    assert len(c.get_batch()) == 0
    fill(r, s, 2)
    assert [m.fields["n"] for m in c.get_batch()] == ["0", "1"]


def test_missing_stream_is_created(drivers: Drivers, r: redis.Redis, name: Name) -> None:
    s = name("s")
    assert len(drivers.consumer(s, "g", max_wait_ms=20).get_batch()) == 0
    assert r.exists(s) == 1


def test_an_empty_wait_blocks_on_the_server_and_never_spins(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    c = drivers.consumer(s, "g", max_wait_ms=300)
    c.get_batch()  # setup and own pending list
    before = xreadgroup_calls(r, s)
    assert len(c.get_batch()) == 0
    assert xreadgroup_calls(r, s) - before <= 2


def test_a_partial_batch_waits_for_more_then_returns_full(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    c = drivers.consumer(s, "g", batch_size=10, max_wait_ms=10_000)
    fill(r, s, 4)

    def later() -> None:
        time.sleep(0.3)
        fill(r, s, 6, start=4)

    t = threading.Thread(target=later)
    t.start()
    batch = c.get_batch()
    t.join()
    assert [m.fields["n"] for m in batch] == [str(i) for i in range(10)]


def test_own_pending_entries_come_first_after_a_restart(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 10)
    first = drivers.consumer(s, "g", consumer="worker-1", batch_size=6, max_wait_ms=50)
    taken = first.get_batch()
    first.ack(taken[0])
    first.close()  # owns 5 unacked entries: stays in the group
    fill(r, s, 3, start=10)
    again = drivers.consumer(s, "g", consumer="worker-1", batch_size=100, max_wait_ms=50)
    batch = again.get_batch()
    assert [m.id for m in batch[:5]] == [m.id for m in taken[1:]]
    assert [m.deliveries for m in batch[:5]] == [2] * 5
    assert [m.fields["n"] for m in batch[5:]] == [str(i) for i in range(6, 13)]
    assert [m.deliveries for m in batch[5:]] == [1] * 7


def test_ack_is_counted_once_and_a_stale_ack_returns_0(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 2)
    c = drivers.consumer(s, "g", max_wait_ms=50)
    batch = c.get_batch()
    assert c.ack(batch[0]) == 1
    assert c.ack(batch[0]) == 0
    assert c.ack_many([]) == 0
    result = batch.ack(batch[1])
    assert (drivers.run(result) if drivers.kind == "async" else result) == 1
    assert c.acked_count == 2 and c.stale_ack_count == 1


def test_ack_of_a_message_from_another_stream_is_refused(drivers: Drivers, name: Name) -> None:
    c = drivers.consumer(name("s"), "g")
    with pytest.raises(ConfigError, match="does not read"):
        c.ack(Message("elsewhere", "1-0", {}, 1))
    with pytest.raises(TypeError, match="Message"):
        c.ack_many(["1-0"])


def test_several_streams_in_one_consumer(drivers: Drivers, r: redis.Redis, name: Name) -> None:
    a, b_ = name("a"), name("b")
    fill(r, a, 30)
    fill(r, b_, 30)
    c = drivers.consumer([a, b_], "g", batch_size=7, max_wait_ms=50)
    got: list[Message] = []
    deadline = time.monotonic() + 30
    # An empty batch says only that 50 ms passed: on a busy machine that can come early.
    while len(got) < 60 and time.monotonic() < deadline:
        batch = c.get_batch()
        assert len(batch) <= 7
        got += batch
        c.ack_many(batch)
    assert len(c.get_batch()) == 0
    assert sorted((m.stream, m.fields["n"]) for m in got) == sorted(
        [(a, str(i)) for i in range(30)] + [(b_, str(i)) for i in range(30)]
    )
    assert pending_total(r, a, "g") == pending_total(r, b_, "g") == 0


def test_deleted_pending_entries_are_never_handed_out(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    ids = fill(r, s, 5)
    first = drivers.consumer(s, "g", consumer="w", max_wait_ms=50)
    assert len(first.get_batch()) == 5
    first.close()
    r.xdel(s, ids[1], ids[3])
    again = drivers.consumer(s, "g", consumer="w", max_wait_ms=50)
    batch = again.get_batch()
    assert [m.id for m in batch] == [ids[0], ids[2], ids[4]]
    assert all(m.fields for m in batch)
    assert again.deleted_count == 2
    again.ack_many(batch)
    assert pending_total(r, s, "g") == 0


def test_encoding_none_keeps_bytes(drivers: Drivers, r: redis.Redis, name: Name) -> None:
    s = name("s")
    r.xadd(s, {"k": b"\xff\x00binary"})
    (msg,) = drivers.consumer(s, "g", encoding=None, max_wait_ms=50).get_batch()
    assert msg.fields == {b"k": b"\xff\x00binary"}
    assert isinstance(msg.id, str)


def test_undecodable_bytes_do_not_break_the_read(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    r.xadd(s, {"k": b"\xff"})
    r.xadd(s, {"k": "fine"})
    batch = drivers.consumer(s, "g", max_wait_ms=50).get_batch()
    assert [m.fields["k"].encode("utf-8", "surrogateescape") for m in batch] == [b"\xff", b"fine"]


@pytest.mark.parametrize("decode", [False, True])
@pytest.mark.parametrize("protocol", [2, 3])
def test_same_messages_whatever_the_client_settings(
    drivers: Drivers, r: redis.Redis, name: Name, decode: bool, protocol: int
) -> None:
    s = name("s")
    r.xadd(s, {"a": "1", "b": "é"}, id="1-1")
    r.xadd(s, {"a": "2"}, id="2-1")
    client = drivers.client(decode_responses=decode, protocol=protocol)
    first = drivers.consumer(s, "g", client=client, consumer="c", max_wait_ms=50)
    got = [(m.stream, m.id, m.fields, m.deliveries) for m in first.get_batch()]
    assert got == [(s, "1-1", {"a": "1", "b": "é"}, 1), (s, "2-1", {"a": "2"}, 1)]
    first.close()
    again = drivers.consumer(s, "g", client=client, consumer="c", max_wait_ms=50)
    batch = again.get_batch()
    assert [(m.id, m.fields, m.deliveries) for m in batch] == [
        ("1-1", {"a": "1", "b": "é"}, 2),
        ("2-1", {"a": "2"}, 2),
    ]
    assert again.ack_many(batch) == 2


def test_default_names_are_unique_per_instance(drivers: Drivers, name: Name) -> None:
    s = name("s")
    assert drivers.consumer(s, "g").name != drivers.consumer(s, "g").name


def test_close_leaves_the_group_only_when_it_owns_nothing(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 2)
    busy = drivers.consumer(s, "g", consumer="busy", batch_size=1, max_wait_ms=50)
    idle = drivers.consumer(s, "g", consumer="idle", batch_size=1, max_wait_ms=50)
    busy.get_batch()
    idle.ack_many(idle.get_batch())
    busy.close()
    idle.close()
    names = {c["name"].decode() for c in r.xinfo_consumers(s, "g")}
    assert names == {"busy"}
    with pytest.raises(RuntimeError, match="closed"):
        idle.get_batch()


def test_a_vanished_stream_is_recreated_with_a_warning(
    drivers: Drivers, r: redis.Redis, name: Name, caplog: pytest.LogCaptureFixture
) -> None:
    s = name("s")
    fill(r, s, 1)
    c = drivers.consumer(s, "g", max_wait_ms=50)
    c.ack_many(c.get_batch())
    r.delete(s)
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        assert len(c.get_batch()) == 0
    assert "NOGROUP" in caplog.text and "lost" in caplog.text
    fill(r, s, 2)
    assert len(c.get_batch()) == 2


def test_batches_iteration_ends_on_stop(drivers: Drivers, r: redis.Redis, name: Name) -> None:
    s = name("s")
    fill(r, s, 25)
    c = drivers.consumer(s, "g", batch_size=10, max_wait_ms=50)
    seen = 0
    if drivers.kind == "sync":
        for batch in c.batches():
            seen += len(batch)
            c.ack_many(batch)
            if seen >= 25:
                c.stop()
    else:

        async def consume() -> int:
            n = 0
            async for msg in c._target:
                n += 1
                await c._target.ack(msg)
                if n == 25:
                    c.stop()
            return n

        seen = drivers.run(consume())
    assert seen == 25
    assert pending_total(r, s, "g") == 0


def test_repr_shows_live_counters(drivers: Drivers, r: redis.Redis, name: Name) -> None:
    s = name("s")
    fill(r, s, 3)
    c = drivers.consumer(s, "g", consumer="w", max_wait_ms=50)
    c.ack_many(c.get_batch())
    assert "'w'" in repr(c) and "delivered=3" in repr(c) and "acked=3" in repr(c)


def test_blocking_reads_outlast_a_short_socket_timeout(drivers: Drivers, name: Name) -> None:
    client = drivers.client(socket_timeout=0.3)
    c = drivers.consumer(name("s"), "g", client=client, max_wait_ms=900)
    assert len(c.get_batch()) == 0  # no TimeoutError: the reader sizes its own timeout


def test_linger_zero_returns_as_soon_as_anything_arrives(drivers: Drivers, name: Name) -> None:
    s = name("s")
    c = drivers.consumer(s, "g", batch_size=100, max_wait_ms=600_000, linger_ms=0)
    drivers.producer(s).send({"n": "1"})
    (msg,) = c.get_batch()  # without linger_ms it would wait for 99 more, ten minutes long
    assert msg.fields == {"n": "1"}


def test_an_idle_consumer_with_linger_zero_blocks_and_never_spins(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    c = drivers.consumer(s, "g", max_wait_ms=300, linger_ms=0)
    c.get_batch()  # setup and own pending list
    before = xreadgroup_calls(r, s)
    assert len(c.get_batch()) == 0
    assert xreadgroup_calls(r, s) - before <= 2


def test_max_wait_ms_zero_is_refused_with_the_way_to_low_latency(
    drivers: Drivers, name: Name
) -> None:
    with pytest.raises(ConfigError, match=r"busy loop.*linger_ms=0"):
        drivers.consumer(name("s"), "g", max_wait_ms=0)
