"""The streamz nodes: Stream.from_redis_consumer_group, Stream.from_redis_streams and
stream.sink_to_redis_stream, found through their entry points, against a real server."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import streamz
from streamz import Stream

import conveyor
from conveyor import ConfigError, Consumer, FieldTypeError
from conveyor._keys import dead_letter_key
from tests.conftest import command_calls
from tests.faultproxy import FaultProxy
from tests.workers import fill, wait_for

Name = Callable[[str], str]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def sources() -> Iterator[list[Any]]:
    """Sources a test made; each is stopped after the test, whatever happened."""
    made: list[Any] = []
    yield made
    for source in made:
        source.stop()


def pending(r: redis.Redis, stream: str, group: str = "g") -> int:
    return int(r.xpending(stream, group)["pending"])


def pending_ids(r: redis.Redis, stream: str, group: str = "g") -> list[str]:
    rows = r.xpending_range(stream, group, "-", "+", 1000)
    return [row["message_id"].decode() for row in rows]


def as_int(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq)


# -- from_redis_consumer_group -----------------------------------------------------------------


def test_the_entry_points_give_conveyors_nodes(redis_url: str) -> None:
    from conveyor.contrib import streamz as contrib

    source = Stream.from_redis_consumer_group("s", "g", "c", url=redis_url)
    assert type(source) is contrib.from_redis_consumer_group
    assert isinstance(source, streamz.Source)
    assert type(Stream.from_redis_streams("s", url=redis_url)) is contrib.from_redis_streams
    sink = Stream().sink_to_redis_stream("out", url=redis_url)
    assert type(sink) is contrib.sink_to_redis_stream


def test_messages_arrive_in_order_as_triples_and_are_acked(
    redis_url: str, r: redis.Redis, name: Name, sources: list[Any]
) -> None:
    s = name("s")
    ids = fill(r, s, 200)
    results: list[Any] = []
    source = Stream.from_redis_consumer_group(s, "g", "c1", url=redis_url)
    sources.append(source)
    source.sink(results.append)
    source.start()
    wait_for(lambda: len(results) >= 200, what="200 messages")
    assert [m[1] for m in results] == ids
    assert [as_int(i) for i in ids] == sorted(as_int(i) for i in ids)
    assert results[0] == (s, ids[0], {"n": "0"})
    assert [m[2] for m in results] == [{"n": str(i)} for i in range(200)]
    assert {m[0] for m in results} == {s}
    wait_for(lambda: pending(r, s) == 0, what="nothing pending")
    source.stop()
    assert source.closed
    assert r.xinfo_consumers(s, "g") == []  # it owned nothing: it left the group
    assert len(results) == 200


def test_a_buffering_node_gets_its_messages_acked_only_once_its_batch_has_left(
    redis_url: str, r: redis.Redis, name: Name, sources: list[Any]
) -> None:
    s = name("s")
    ids = fill(r, s, 25)
    batches: list[tuple[Any, ...]] = []
    source = Stream.from_redis_consumer_group(s, "g", "c1", url=redis_url, timeout=0.1)
    sources.append(source)
    source.partition(10).sink(batches.append)
    source.start()
    wait_for(lambda: len(batches) == 2, what="two batches of 10")
    wait_for(lambda: source.consumer.acked_count == 20, what="the two batches acked")
    # the five in partition's buffer have not left: still pending, and renewed meanwhile
    assert pending_ids(r, s) == ids[20:]
    reads = command_calls(r, "xreadgroup", s)
    wait_for(lambda: command_calls(r, "xreadgroup", s) >= reads + 3, what="three more reads")
    assert pending_ids(r, s) == ids[20:]
    ids += fill(r, s, 5, kind="more")
    wait_for(lambda: len(batches) == 3, what="the third batch")
    assert [m[1] for m in batches[2]] == ids[20:30]
    wait_for(lambda: pending(r, s) == 0, what="the third batch acked")


def test_what_is_still_in_the_pipeline_on_stop_stays_pending_for_a_restart(
    redis_url: str, r: redis.Redis, name: Name, sources: list[Any]
) -> None:
    s = name("s")
    ids = fill(r, s, 15)
    batches: list[tuple[Any, ...]] = []
    source = Stream.from_redis_consumer_group(s, "g", "c1", url=redis_url, timeout=0.1)
    sources.append(source)
    source.partition(10).sink(batches.append)
    source.start()
    wait_for(lambda: source.consumer.acked_count == 10, what="the first batch acked")
    source.stop()
    assert pending_ids(r, s) == ids[10:]
    assert [c["name"] for c in r.xinfo_consumers(s, "g")] == [b"c1"]

    again: list[Any] = []
    restarted = Stream.from_redis_consumer_group(s, "g", "c1", url=redis_url, timeout=0.1)
    sources.append(restarted)
    restarted.sink(again.append)
    restarted.start()
    wait_for(lambda: len(again) == 5, what="the five held on stop")
    assert [m[1] for m in again] == ids[10:]
    wait_for(lambda: pending(r, s) == 0, what="all acked")


def test_a_node_that_raises_fails_its_message_and_the_rest_are_acked(
    redis_url: str, r: redis.Redis, name: Name, sources: list[Any]
) -> None:
    s = name("s")
    ids = fill(r, s, 10)
    attempts: dict[str, int] = {}
    handled: list[str] = []

    def handle(message: tuple[str, str, dict[str, str]]) -> None:
        n = message[2]["n"]
        attempts[n] = attempts.get(n, 0) + 1
        if n == "3" or (n == "5" and attempts[n] == 1):
            raise ValueError(f"bad {n}")
        handled.append(message[1])

    source = Stream.from_redis_consumer_group(
        s, "g", "c1", url=redis_url, timeout=0.1, max_deliveries=3, retry_backoff_ms=50
    )
    sources.append(source)
    source.sink(handle)
    source.start()
    wait_for(lambda: r.xlen(dead_letter_key(s)) == 1, what="message 3 dead-lettered")
    wait_for(lambda: pending(r, s) == 0, what="nothing pending")
    assert sorted(handled, key=as_int) == [i for i in ids if i != ids[3]]
    assert attempts["3"] == 3  # failed on each of its max_deliveries deliveries
    assert attempts["5"] == 2  # failed once, came back, went through
    dead = r.xrange(dead_letter_key(s))
    assert dead[0][1][b"n"] == b"3"
    assert source.consumer.failed_count == 4


def test_a_crashed_pipeline_gets_its_unfinished_messages_on_restart(
    redis_url: str, r: redis.Redis, name: Name, tmp_path: Path
) -> None:
    s = name("s")
    ids = fill(r, s, 300)
    out = tmp_path / "handled.txt"
    out.touch()

    def handled() -> list[str]:
        return out.read_text().split()

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.streamz_worker",
                redis_url,
                s,
                "fixed",
                str(out),
                "0.005",
            ],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "started"
        return proc

    first = start()
    try:
        # past 130, and off a read's boundary (10 a read): some are handled, some not yet
        wait_for(lambda: len(handled()) >= 135, what="135 messages handled")
        first.kill()
        first.wait(10)
    finally:
        first.kill()
    at_kill = handled()
    assert 135 <= len(at_kill) < 300
    assert pending(r, s) > 0  # what the dead pipeline held

    second = start()
    try:
        wait_for(lambda: set(handled()) >= set(ids), what="all 300 handled")
        wait_for(lambda: pending(r, s) == 0, what="nothing pending")
        second.send_signal(signal.SIGTERM)
        assert second.wait(15) == 0
    finally:
        second.kill()
    assert second.stdout is not None and "stopped" in second.stdout.read()
    lines = handled()
    assert set(lines) == set(ids)
    # only what the killed process held unacked came twice: at most one read of 10
    assert len(lines) - len(ids) <= 10
    assert pending(r, s) == 0


def test_a_busy_event_loop_does_not_let_other_consumers_take_the_messages(
    redis_url: str, r: redis.Redis, name: Name, sources: list[Any]
) -> None:
    s = name("s")
    ids = fill(r, s, 20)
    handled: list[str] = []
    busy = threading.Event()

    def handle(message: tuple[str, str, dict[str, str]]) -> None:
        if not handled:
            busy.set()
            end = time.monotonic() + 2.5  # pure Python on the event loop, 2 claim timeouts
            while time.monotonic() < end:
                pass
        handled.append(message[1])

    source = Stream.from_redis_consumer_group(
        s, "g", "c1", url=redis_url, claim_timeout=1.2, heartbeat_interval=0.1
    )
    sources.append(source)
    source.sink(handle)
    source.start()
    wait_for(busy.is_set, what="the pipeline busy")
    assert pending(r, s) == 20
    taken: list[str] = []
    with Consumer(
        conveyor.connect(redis_url), s, "g", consumer="rival", claim_idle_ms=1200, max_wait_ms=50
    ) as rival:
        while len(handled) < 20:
            batch = rival.get_batch()
            taken += [m.id for m in batch]
            rival.ack_many(batch)
    assert taken == []
    assert handled == ids
    wait_for(lambda: pending(r, s) == 0, what="all acked")


def test_convert_false_gives_bytes(
    redis_url: str, r: redis.Redis, name: Name, sources: list[Any]
) -> None:
    s = name("s")
    r.xadd(s, {"k": b"\xff\x00v"})
    results: list[Any] = []
    source = Stream.from_redis_consumer_group(s, "g", url=redis_url, convert=False)
    sources.append(source)
    source.sink(results.append)
    source.start()
    wait_for(lambda: len(results) == 1, what="one message")
    stream, entry_id, data = results[0]
    assert (stream, type(entry_id)) == (s, str)
    assert data == {b"k": b"\xff\x00v"}


def test_options_map_onto_the_consumer(redis_url: str) -> None:
    source = Stream.from_redis_consumer_group(
        ["a", "b"],
        "g",
        url=redis_url,
        count=7,
        timeout=2.5,
        claim_timeout=3,
        heartbeat_interval=0.5,
        start_from_backlog=False,
        max_deliveries=9,
        stream_name="orders in",
    )
    c = source.consumer.config
    assert c.streams == ("a", "b")
    assert (c.batch_size, c.max_wait_ms, c.claim_idle_ms, c.heartbeat_ms) == (7, 2500, 3000, 500)
    assert (c.start, c.max_deliveries, c.encoding, c.linger_ms) == ("$", 9, "utf-8", 0)
    assert source.name == "orders in"
    other = Stream.from_redis_consumer_group("a", "g", url=redis_url)
    assert source.consumer.name != other.consumer.name
    for forever in (0, None, 0.0004):  # streamz_redis's "block forever": one-second rounds
        source = Stream.from_redis_consumer_group({"a": ">"}, "g", url=redis_url, timeout=forever)
        assert source.consumer.config.max_wait_ms == 1000
        assert source.consumer.config.start == "0"
    derived = Stream.from_redis_consumer_group(
        "a", "g", url=redis_url, claim_timeout=0.3, linger_ms=50
    )
    assert (derived.consumer.config.heartbeat_ms, derived.consumer.config.linger_ms) == (100, 50)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"count": 0}, "count must be >= 1"),
        ({"count": None}, "count must be an int"),
        ({"timeout": -1}, "timeout must be >= 0"),
        ({"timeout": "1s"}, "timeout must be a number of seconds"),
        ({"claim_timeout": 0.001}, "claim_timeout must be >= 0.02 seconds"),
        ({"heartbeat_interval": 0}, "heartbeat_interval must be >= 0.01 seconds"),
        ({"heartbeat_interval": 40}, "heartbeat_interval (40 s) must be at most half of claim"),
        ({"heartbeat_interval": 1, "claim_timeout": 1.5}, "half of claim_timeout (1.5 s)"),
        ({"batch_size": 10}, "pass count, not batch_size"),
        ({"max_wait_ms": 10}, "pass timeout, not max_wait_ms"),
        ({"claim_idle_ms": 10}, "pass claim_timeout, not claim_idle_ms"),
        ({"bogus": 1}, "has no option 'bogus'"),
        ({"streams": []}, "streams must name at least one stream"),
        ({"streams": 5}, "streams must be a stream name"),
        ({"max_deliveries": 0}, "max_deliveries must be >= 1"),
        ({"encoding": "nope"}, "encoding 'nope' is not a known text encoding"),
        ({"start": "$"}, "start must be True or False"),
        ({"start_from_backlog": "0"}, "start_from_backlog must be True or False"),
        ({"client": "x"}, "give url or client, not both"),
    ],
)
def test_bad_options_are_one_line_config_errors_naming_the_argument(
    options: dict[str, Any], message: str, redis_url: str
) -> None:
    args = {"streams": "s", "group": "g", "url": redis_url, **options}
    with pytest.raises(ConfigError) as error:
        Stream.from_redis_consumer_group(**args)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_an_asyncio_client_is_refused_with_a_hint(redis_url: str) -> None:
    client = conveyor.connect(redis_url, asyncio=True)
    for make in (
        lambda: Stream.from_redis_consumer_group("s", "g", client=client),
        lambda: Stream.from_redis_streams("s", client=client),
        lambda: Stream().sink_to_redis_stream("s", client=client),
    ):
        with pytest.raises(ConfigError, match=r"pass a sync client .* or url=") as error:
            make()
        assert "\n" not in str(error.value)


def test_a_server_fault_is_retried_and_the_source_keeps_going(
    server: Any, r: redis.Redis, name: Name, sources: list[Any]
) -> None:
    s = name("s")
    ids = fill(r, s, 30)
    results: list[Any] = []
    with FaultProxy(server.port) as proxy:
        proxy.inject(
            "XREADGROUP", b"-READONLY You can't write against a read only replica.", times=3
        )
        source = Stream.from_redis_consumer_group(
            s, "g", "c1", url=proxy.url, count=10, timeout=0.1
        )
        sources.append(source)
        source.sink(results.append)
        source.start()
        wait_for(lambda: len(results) >= 10, what="the first messages")
        proxy.cut()
        ids += fill(r, s, 10, kind="after the cut")
        wait_for(lambda: {m[1] for m in results} >= set(ids), what="every message")
        wait_for(lambda: pending(r, s) == 0, what="all acked")
        source.stop()
    assert source.closed


async def test_a_pipeline_on_a_running_asyncio_loop(
    r: redis.Redis, redis_url: str, name: Name
) -> None:
    s = name("s")
    fill(r, s, 50)
    results: list[Any] = []
    source = Stream.from_redis_consumer_group(
        s, "g", "c1", url=redis_url, timeout=0.1, asynchronous=True
    )
    assert source.loop.asyncio_loop is asyncio.get_running_loop()
    source.sink(results.append)
    source.start()
    await until(lambda: len(results) == 50 and pending(r, s) == 0)
    source.stop()  # on the loop: returns at once, the source closes after its read
    await until(lambda: source.closed)
    assert [m[2]["n"] for m in results] == [str(i) for i in range(50)]


async def until(condition: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


# -- sink_to_redis_stream ------------------------------------------------------------------------


def test_the_sink_writes_mappings_and_the_data_of_triples(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    out = name("out")
    source = Stream()
    source.sink_to_redis_stream(out, url=redis_url)
    source.emit({"a": "1"})
    source.emit(("elsewhere", "1-0", {"b": "2"}))
    source.emit({b"c": b"\xff"})
    assert [fields for _, fields in r.xrange(out)] == [{b"a": b"1"}, {b"b": b"2"}, {b"c": b"\xff"}]


def test_the_sink_trims_to_maxlen(redis_url: str, r: redis.Redis, name: Name) -> None:
    out = name("out")
    source = Stream()
    sink = source.sink_to_redis_stream(out, client=r, maxlen=10)
    for i in range(1000):
        source.emit({"n": str(i)})
    assert sink.producer.config.maxlen == 10
    assert r.xlen(out) < 1000  # trimmed as it grew (approximately: whole nodes at a time)
    assert r.xrevrange(out, count=1)[0][1] == {b"n": b"999"}


@pytest.mark.parametrize("element", [42, "text", ("s", "1-0"), ("s", "1-0", "data")])
def test_the_sink_refuses_anything_else_in_one_line(
    element: Any, redis_url: str, r: redis.Redis, name: Name
) -> None:
    out = name("out")
    source = Stream()
    source.sink_to_redis_stream(out, url=redis_url)
    with pytest.raises(FieldTypeError) as error:
        source.emit(element)
    text = str(error.value)
    assert f"got {type(element).__name__}" in text
    assert "mapping of fields or a (stream, id, data) triple" in text
    assert "\n" not in text
    assert r.exists(out) == 0


def test_a_message_forwarded_by_the_sink_is_acked_only_once_written(
    redis_url: str, r: redis.Redis, name: Name, sources: list[Any]
) -> None:
    s, out = name("s"), name("out")
    ids = fill(r, s, 5)
    r.set(out, "not a stream")  # every XADD fails (WRONGTYPE) until it is gone
    source = Stream.from_redis_consumer_group(
        s, "g", "c1", url=redis_url, timeout=0.1, retry_backoff_ms=20, max_deliveries=1000
    )
    sources.append(source)
    source.sink_to_redis_stream(out, url=redis_url)
    source.start()
    wait_for(lambda: source.consumer.failed_count >= 10, what="failed writes")
    assert pending(r, s) == 5
    r.delete(out)
    wait_for(lambda: r.xlen(out) == 5 and pending(r, s) == 0, what="forwarded and acked")
    assert [f[b"n"] for _, f in r.xrange(out)] == [str(i).encode() for i in range(5)]
    assert len(ids) == 5


# -- from_redis_streams ----------------------------------------------------------------------


def test_from_redis_streams_emits_new_entries_in_memory(
    redis_url: str, r: redis.Redis, name: Name, sources: list[Any]
) -> None:
    s1, s2 = name("a"), name("b")
    fill(r, s1, 3)  # before the start: "$" skips them
    results: list[Any] = []
    source = Stream.from_redis_streams([s1, s2], url=redis_url, timeout=0.1)
    sources.append(source)
    source.sink(results.append)
    source.start()
    wait_for(lambda: source.reader.position != {}, what="the reader started")
    new1 = fill(r, s1, 5, kind="new")
    new2 = fill(r, s2, 4)
    wait_for(lambda: len(results) == 9, what="the new entries")
    assert [m[1] for m in results if m[0] == s1] == new1
    assert [m[1] for m in results if m[0] == s2] == new2
    assert results[0] == (s1, new1[0], {"n": "0", "kind": "new"})


def test_from_redis_streams_resumes_after_what_left_the_pipeline(
    redis_url: str, r: redis.Redis, name: Name, sources: list[Any]
) -> None:
    s = name("s")
    ids = fill(r, s, 25)
    batches: list[tuple[Any, ...]] = []
    source = Stream.from_redis_streams(s, url=redis_url, start="0", reader="x", timeout=0.1)
    sources.append(source)
    source.partition(10).sink(batches.append)
    source.start()
    wait_for(lambda: len(batches) == 2, what="two batches")
    wait_for(lambda: source.reader.committed.get(s) == ids[19], what="the checkpoint")
    source.stop()
    assert source.reader.committed[s] == ids[19]  # the five in the buffer had not left

    again: list[Any] = []
    restarted = Stream.from_redis_streams(s, url=redis_url, start="0", reader="x", timeout=0.1)
    sources.append(restarted)
    restarted.sink(again.append)
    restarted.start()
    wait_for(lambda: len(again) == 5, what="the five that had not left")
    assert [m[1] for m in again] == ids[20:]
    wait_for(lambda: restarted.reader.committed.get(s) == ids[24], what="the new checkpoint")


def test_from_redis_streams_takes_redis_pys_dict_and_a_bool_start(
    redis_url: str, r: redis.Redis, name: Name, sources: list[Any]
) -> None:
    s = name("s")
    ids = fill(r, s, 3)
    results: list[Any] = []
    source = Stream.from_redis_streams({s: "0"}, url=redis_url, start=True, convert=False)
    sources.append(source)
    source.sink(results.append)
    wait_for(lambda: len(results) == 3, what="the entries from 0")
    assert [m[1] for m in results] == ids
    assert results[0][2] == {b"n": b"0"}
    with pytest.raises(ConfigError, match="one start id for every stream"):
        Stream.from_redis_streams({"a": "0", "b": "$"}, url=redis_url)
    with pytest.raises(ConfigError, match="has no option 'group'"):
        Stream.from_redis_streams("a", url=redis_url, group="g")
    with pytest.raises(ConfigError, match="timeout must be >= 0"):
        Stream.from_redis_streams("a", url=redis_url, timeout=-2)


def test_from_redis_streams_checkpoint_passes_an_entry_whose_pipeline_raised(
    redis_url: str, r: redis.Redis, name: Name, sources: list[Any]
) -> None:
    s = name("s")
    ids = fill(r, s, 5)
    seen: list[str] = []

    def handle(message: tuple[str, str, dict[str, str]]) -> None:
        seen.append(message[1])
        if message[2]["n"] == "2":
            raise ValueError("bad entry")

    source = Stream.from_redis_streams(s, url=redis_url, start="0", reader="x", timeout=0.1)
    sources.append(source)
    source.sink(handle)
    source.start()
    wait_for(lambda: source.reader.committed.get(s) == ids[4], what="the checkpoint at the end")
    assert seen == ids


def test_stop_acks_what_left_while_a_read_was_waiting_then_closes(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    fill(r, s, 3)
    batches: list[tuple[Any, ...]] = []
    source = Stream.from_redis_consumer_group(s, "g", "c1", url=redis_url, timeout=2)
    source.partition(5, timeout=0.2).sink(batches.append)
    source.start()
    # the partial batch leaves after 0.2 s, while the source waits in its next read
    wait_for(lambda: len(batches) == 1, what="the partial batch")
    stopper = threading.Thread(target=source.stop)  # any thread but the loop's
    stopper.start()
    stopper.join(30)
    assert not stopper.is_alive() and source.closed
    assert pending(r, s) == 0  # acked on the way out
    assert r.xinfo_consumers(s, "g") == []
