"""StreamReader and AsyncStreamReader: reading without a consumer group, the position
checkpointed under a name. Real servers only; a crash test kills a real process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import conveyor
from conveyor import AsyncStreamReader, ConfigError, Message, ServerError, StreamReader
from conveyor._keys import key_slot, reader_key
from tests.conftest import Drivers, SyncFacade
from tests.workers import fill, wait_for

ROOT = Path(__file__).resolve().parent.parent

Names = Callable[[str], str]


@pytest.fixture
def make_reader(drivers: Drivers) -> Iterator[Callable[..., Any]]:
    """Readers of the drivers' kind (an AsyncStreamReader behind a SyncFacade), closed after."""
    made: list[Any] = []

    def make(stream: Any, name: str | None, client: Any = None, **kw: Any) -> Any:
        client = client if client is not None else drivers.client()
        if drivers.kind == "sync":
            reader: Any = StreamReader(client, stream, name, **kw)
        else:
            assert drivers._loop is not None
            reader = SyncFacade(AsyncStreamReader(client, stream, name, **kw), drivers._loop)
        made.append(reader)
        return reader

    yield make
    for reader in made:
        with contextlib.suppress(Exception):
            reader.close()


def ids_of(batch: list[Message]) -> list[str]:
    return [m.id for m in batch]


def read_all(reader: Any, until: int) -> list[Message]:
    """Batches until ``until`` messages came (or a batch comes back empty)."""
    got: list[Message] = []
    while len(got) < until:
        batch = reader.get_batch()
        if not batch:
            break
        got += batch
    return got


def text(value: Any) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


# -- where reading starts ---------------------------------------------------------------------


def test_start_dollar_reads_only_what_is_added_after_the_first_start(
    make_reader: Callable[..., Any], r: redis.Redis, name: Names
) -> None:
    s = name("s")
    old = fill(r, s, 3)
    reader = make_reader(s, "audit", max_wait_ms=20)
    assert reader.get_batch() == []
    assert reader.position == reader.committed == {s: old[-1]}
    assert text(r.get(reader_key(s, "audit"))) == old[-1]  # saved at the start
    new = fill(r, s, 2)
    assert ids_of(reader.get_batch()) == new


def test_start_dollar_on_a_missing_stream_reads_from_its_first_entry(
    make_reader: Callable[..., Any], r: redis.Redis, name: Names
) -> None:
    s = name("s")
    reader = make_reader(s, "audit", max_wait_ms=20)
    assert reader.get_batch() == []
    assert reader.position == {s: "0-0"}
    ids = fill(r, s, 3)
    assert ids_of(reader.get_batch()) == ids


def test_a_restart_before_any_commit_skips_nothing_added_meanwhile(
    make_reader: Callable[..., Any], r: redis.Redis, name: Names
) -> None:
    s = name("s")
    fill(r, s, 3)
    first = make_reader(s, "audit", max_wait_ms=20)
    assert first.get_batch() == []
    first.close()
    meanwhile = fill(r, s, 4)
    again = make_reader(s, "audit", max_wait_ms=20)  # start="$" again: the saved start wins
    assert ids_of(again.get_batch()) == meanwhile


def test_start_zero_and_an_explicit_id(
    make_reader: Callable[..., Any], r: redis.Redis, name: Names
) -> None:
    s = name("s")
    ids = fill(r, s, 5)
    assert ids_of(make_reader(s, "from-zero", start="0").get_batch()) == ids
    after = make_reader(s, "from-id", start=ids[1])
    assert after.committed == {}  # nothing loaded before the first read
    assert ids_of(after.get_batch()) == ids[2:]
    assert after.committed == {s: ids[1]}


def test_start_is_used_only_when_there_is_no_checkpoint(
    make_reader: Callable[..., Any], r: redis.Redis, name: Names
) -> None:
    s = name("s")
    ids = fill(r, s, 5)
    reader = make_reader(s, "audit", start="0", batch_size=2)
    assert ids_of(reader.get_batch()) == ids[:2]
    reader.commit()
    reader.close()
    for start in ("0", "$", ids[3]):
        resumed = make_reader(s, "audit", start=start, batch_size=10)
        assert ids_of(resumed.get_batch()) == ids[2:], start
        assert resumed.committed == {s: ids[1]}


# -- checkpoints ------------------------------------------------------------------------------


def test_commit_then_a_new_reader_resumes_after_it_and_another_name_starts_on_its_own(
    make_reader: Callable[..., Any], r: redis.Redis, name: Names
) -> None:
    s = name("s")
    ids = fill(r, s, 10)
    reader = make_reader(s, "audit", start="0", batch_size=4)
    assert ids_of(reader.get_batch()) == ids[:4]
    reader.commit()
    assert reader.committed == {s: ids[3]}
    assert ids_of(reader.get_batch()) == ids[4:8]  # read, not committed
    assert reader.position == {s: ids[7]}
    assert reader.committed == {s: ids[3]}
    reader.close()
    assert text(r.get(reader_key(s, "audit"))) == ids[3]

    resumed = make_reader(s, "audit", start="0", batch_size=100)
    assert ids_of(resumed.get_batch()) == ids[4:]  # the uncommitted batch comes again
    other = make_reader(s, "billing", start="0", batch_size=100)
    assert ids_of(other.get_batch()) == ids
    assert r.exists(reader_key(s, "billing")) == 1


def test_commit_of_an_explicit_position(
    make_reader: Callable[..., Any], r: redis.Redis, name: Names
) -> None:
    s = name("s")
    ids = fill(r, s, 5)
    reader = make_reader(s, "audit", start="0")
    assert len(reader.get_batch()) == 5
    reader.commit({s: ids[1]})
    assert reader.committed == {s: ids[1]}
    assert reader.position == {s: ids[4]}  # reading goes on where it was
    assert text(r.get(reader_key(s, "audit"))) == ids[1]
    with pytest.raises(ConfigError, match="does not read"):
        reader.commit({"elsewhere": ids[1]})
    with pytest.raises(ConfigError, match="position of"):
        reader.commit({s: "yesterday"})


def test_without_a_name_nothing_is_saved(
    make_reader: Callable[..., Any], r: redis.Redis, name: Names
) -> None:
    s = name("s")
    ids = fill(r, s, 3)
    reader = make_reader(s, None, start="0")
    assert reader.name is None
    assert ids_of(reader.get_batch()) == ids
    reader.commit()
    assert reader.committed == {s: ids[-1]}  # in memory only
    assert [k for k in r.scan_iter(match="*:reader:*") if s.encode() in k] == []


def test_encoding_none_gives_bytes(
    make_reader: Callable[..., Any], r: redis.Redis, name: Names
) -> None:
    s = name("s")
    r.xadd(s, {"k": b"\xff\x00v"})
    (msg,) = make_reader(s, "audit", start="0", encoding=None).get_batch()
    assert msg.fields == {b"k": b"\xff\x00v"}
    assert isinstance(msg.id, str) and msg.stream == s and msg.deliveries == 1


def test_several_streams_keep_batch_size_and_each_streams_order(
    make_reader: Callable[..., Any], r: redis.Redis, name: Names
) -> None:
    streams = [name("a"), name("b"), name("c")]
    added: dict[str, list[str]] = {s: [] for s in streams}
    for i in range(30):  # interleaved, so every XREAD has something on each stream
        s = streams[i % 3]
        added[s].append(text(r.xadd(s, {"n": str(i)})) or "")
    reader = make_reader(streams, "audit", start="0", batch_size=7)
    got: list[Message] = []
    while batch := reader.get_batch():
        assert len(batch) <= 7
        got += batch
    assert sorted(m.id for m in got) == sorted(i for ids in added.values() for i in ids)
    for s in streams:
        assert [m.id for m in got if m.stream == s] == added[s]
    reader.commit()
    assert reader.committed == {s: added[s][-1] for s in streams}


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "kw", "needle"),
    [
        ("", {}, "stream must be a non-empty str"),
        ([], {}, "at least one stream"),
        (b"orders", {}, "must be str, not bytes"),
        (["a", b"b"], {}, "must be str, not bytes"),
        (["a", "a"], {}, "stream lists a stream twice"),
        (42, {}, "stream must be a str or a sequence of str"),
        ("s", {"start": "yesterday"}, "start must be"),
        ("s", {"start": "$$"}, "start must be"),
        ("s", {"batch_size": 0}, "batch_size must be >= 1"),
        ("s", {"max_wait_ms": 0}, "max_wait_ms must be >= 1, got 0.*use a larger value"),
        ("s", {"max_wait_ms": -5}, "would spin"),
        ("s", {"encoding": "klingon"}, "encoding 'klingon'"),
        ("s", {"name": ""}, "name must be a non-empty str"),
    ],
)
def test_bad_arguments_are_one_line_config_errors(
    r: redis.Redis, stream: Any, kw: dict[str, Any], needle: str
) -> None:
    args = {"name": "audit", **kw}
    name = args.pop("name")
    with pytest.raises(ConfigError, match=needle) as info:
        StreamReader(r, stream, name, **args)
    assert "\n" not in str(info.value)


def test_the_wrong_kind_of_client_is_refused(r: redis.Redis, redis_url: str) -> None:
    with pytest.raises(ConfigError, match="use AsyncStreamReader"):
        StreamReader(conveyor.connect(redis_url, asyncio=True), "s", "audit")
    with pytest.raises(ConfigError, match="use StreamReader"):
        AsyncStreamReader(r, "s", "audit")


def test_a_checkpoint_holding_garbage_is_a_one_line_error_naming_the_key(
    make_reader: Callable[..., Any], r: redis.Redis, name: Names
) -> None:
    s = name("s")
    fill(r, s, 2)
    r.set(reader_key(s, "audit"), "not an id\nat all")
    with pytest.raises(ServerError) as info:
        make_reader(s, "audit").get_batch()
    message = str(info.value)
    assert "\n" not in message
    assert repr(reader_key(s, "audit")) in message and "not an id" in message

    r.hset(reader_key(s, "other"), "k", "v")
    with pytest.raises(ServerError, match="WRONGTYPE") as info:
        make_reader(s, "other").get_batch()
    assert repr(reader_key(s, "other")) in str(info.value)
    assert "\n" not in str(info.value)


def test_the_reader_key_is_in_the_streams_slot() -> None:
    assert reader_key("orders", "audit") == "{orders}:reader:audit"
    assert key_slot(reader_key("{shop}orders", "a")) == key_slot("{shop}orders")
    assert key_slot(reader_key("{}orders", "a")) == key_slot("{}orders")


# -- run() ------------------------------------------------------------------------------------


class Recorder:
    """A handler that records every batch it saw and raises on the calls listed in
    ``fail_on`` (1 = the first call)."""

    def __init__(self, fail_on: tuple[int, ...] = ()) -> None:
        self.batches: list[list[str]] = []
        self.fail_on = fail_on
        self.lock = threading.Lock()

    def __call__(self, batch: list[Message]) -> None:
        with self.lock:
            self.batches.append(ids_of(batch))
            if len(self.batches) in self.fail_on:
                raise RuntimeError("handler broke")

    def seen(self) -> list[str]:
        with self.lock:
            return [i for b in self.batches for i in b]


def run_in_thread(reader: StreamReader, handler: Any) -> threading.Thread:
    thread = threading.Thread(target=reader.run, args=(handler,), daemon=True)
    thread.start()
    return thread


def test_run_retries_a_batch_whose_handler_raised_and_commits_after_success(
    r: redis.Redis, name: Names, caplog: pytest.LogCaptureFixture
) -> None:
    s = name("s")
    ids = fill(r, s, 10)
    reader = StreamReader(r, s, "audit", start="0", batch_size=4, max_wait_ms=50)
    handler = Recorder(fail_on=(1,))
    thread = run_in_thread(reader, handler)
    wait_for(lambda: ids[-1] in handler.seen(), what="every entry handled")
    wait_for(lambda: text(r.get(reader_key(s, "audit"))) == ids[-1], what="the last commit")
    reader.stop()  # from another thread
    thread.join(10)
    assert not thread.is_alive()
    assert handler.batches[0] == handler.batches[1] == ids[:4]  # the same batch again
    assert handler.seen()[4:] == ids  # then everything once, in order
    assert reader.committed == {s: ids[-1]}
    failed = [rec for rec in caplog.records if "handler failed" in rec.getMessage()]
    assert len(failed) == 1
    line = failed[0].getMessage()
    assert "'audit'" in line and ids[0] in line and ids[3] in line and "handler broke" in line


def test_async_run_retries_a_batch_whose_handler_raised(redis_url: str, name: Names) -> None:
    s = name("s")
    r = conveyor.connect(redis_url)
    ids = fill(r, s, 10)
    handler = Recorder(fail_on=(2,))

    async def main() -> dict[str, str]:
        ar = conveyor.connect(redis_url, asyncio=True)
        reader = AsyncStreamReader(ar, s, "audit", start="0", batch_size=3, max_wait_ms=50)

        async def handle(batch: list[Message]) -> None:
            await asyncio.sleep(0)
            handler(batch)
            if ids[-1] in handler.seen():
                reader.stop()

        await reader.run(handle)
        await ar.aclose()
        return reader.committed

    committed = asyncio.run(main())
    assert handler.batches[1] == handler.batches[2] == ids[3:6]
    assert handler.seen() == ids[:6] + ids[3:]
    assert committed == {s: ids[-1]}
    assert text(r.get(reader_key(s, "audit"))) == ids[-1]
    r.close()


def test_stop_from_another_thread_ends_an_idle_run(r: redis.Redis, name: Names) -> None:
    reader = StreamReader(r, name("s"), "audit", max_wait_ms=100)
    thread = run_in_thread(reader, Recorder())
    wait_for(lambda: reader.committed != {}, what="the reader loaded its start")
    reader.stop()
    thread.join(10)
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        reader.get_batch()


def test_a_server_error_does_not_end_run(
    r: redis.Redis, name: Names, caplog: pytest.LogCaptureFixture
) -> None:
    s = name("s")
    r.set(s, "not a stream")
    reader = StreamReader(r, s, "audit", start="0", max_wait_ms=50)
    handler = Recorder()
    thread = run_in_thread(reader, handler)
    wait_for(lambda: "WRONGTYPE" in caplog.text, what="the error logged")
    r.delete(s)
    ids = fill(r, s, 3)
    wait_for(lambda: handler.seen() == ids, what="entries handled once the key is a stream")
    reader.stop()
    thread.join(10)
    assert not thread.is_alive()


# -- a crash: a real process killed mid-batch --------------------------------------------------


def start_worker(
    redis_url: str, stream: str, reader_name: str, batch: int, delay_s: float = 0.2
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.reader_worker", redis_url, stream, reader_name,
         str(batch), str(delay_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip


def printed_ids(proc: subprocess.Popen[str], until: Callable[[list[str]], bool]) -> list[str]:
    """The ids the worker prints, read until ``until(ids)`` holds."""
    assert proc.stdout is not None
    ids: list[str] = []
    for line in proc.stdout:
        ids.append(line.strip())
        if until(ids):
            return ids
    raise AssertionError(f"the worker ended (exit {proc.wait(10)}) after printing {len(ids)} ids")


def test_a_reader_killed_mid_batch_resumes_after_its_last_commit(
    redis_url: str, r: redis.Redis, name: Names
) -> None:
    s = name("s")
    ids = fill(r, s, 300)
    batch = 25
    proc = start_worker(redis_url, s, "crash", batch)
    try:
        first = printed_ids(proc, lambda seen: len(seen) >= 130)
        proc.kill()  # SIGKILL during the handler's sleep: the batch in hand is not committed
        proc.wait(10)
    finally:
        proc.kill()
    committed = text(r.get(reader_key(s, "crash")))
    assert committed is not None
    done = ids.index(committed) + 1  # entries up to the checkpoint are done
    proc = start_worker(redis_url, s, "crash", batch)
    try:
        second = printed_ids(proc, lambda seen: seen[-1] == ids[-1])
        wait_for(lambda: text(r.get(reader_key(s, "crash"))) == ids[-1], what="the last commit")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.strip().endswith("stopped") and "Traceback" not in err
    assert first == ids[: len(first)]  # in order, nothing skipped
    assert second == ids[done:]  # resumed right after the checkpoint
    duplicated = first[done:]  # handled by the first worker, not committed
    assert 1 <= len(duplicated) <= batch
    assert set(first) & set(second) == set(duplicated)
    assert set(first) | set(second) == set(ids)


# -- Redis Cluster ----------------------------------------------------------------------------


def streams_on_two_nodes(cluster: Any, name: Names) -> tuple[str, str]:
    first = name("c0")
    for i in range(1, 200):
        other = name(f"c{i}")
        if cluster.node_for_key(other) != cluster.node_for_key(first):
            return first, other
    raise AssertionError("no two names on two nodes")


def blocked_reader(cluster: Any, reader_name: str) -> bool:
    """A connection of the reader is blocked in XREAD on one of the nodes."""
    for i in range(len(cluster.ports)):
        for c in cluster.admin(i).client_list():
            if text(c["name"]) == f"conveyor:reader:{reader_name}" and "b" in text(c["flags"]):
                return True
    return False


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_cluster_streams_in_two_slots_are_read_and_checkpointed(
    kind: str, cluster: Any, cluster_url: str, name: Names
) -> None:
    a, b = streams_on_two_nodes(cluster, name)
    assert key_slot(a) != key_slot(b)
    drivers = Drivers(kind, cluster_url)
    rc = conveyor.connect(cluster_url)
    try:
        make: Callable[..., Any]
        if kind == "sync":
            make = StreamReader
        else:
            assert drivers._loop is not None
            loop = drivers._loop

            def make(*args: Any, **kw: Any) -> Any:
                return SyncFacade(AsyncStreamReader(*args, **kw), loop)

        added = {a: fill(rc, a, 6), b: fill(rc, b, 6)}
        reader = make(drivers.client(), [a, b], "audit", start="0", batch_size=5)
        got = read_all(reader, 12)
        for s in (a, b):
            assert [m.id for m in got if m.stream == s] == added[s]
        reader.commit()
        assert text(rc.get(reader_key(a, "audit"))) == added[a][-1]
        assert text(rc.get(reader_key(b, "audit"))) == added[b][-1]
        reader.close()

        # resumed after the commit; nothing there yet: each slot is waited on in turn
        reader = make(drivers.client(), [a, b], "audit", max_wait_ms=30_000)
        box: list[list[Message]] = []
        thread = threading.Thread(target=lambda: box.append(reader.get_batch()), daemon=True)
        thread.start()
        wait_for(lambda: blocked_reader(cluster, "audit"), what="the reader blocked on a slot")
        more = fill(rc, b, 1)
        thread.join(30)
        assert [m.id for m in box[0]] == more
        reader.close()
    finally:
        rc.close()
        drivers.close()


def test_a_first_signal_finishes_the_batch_in_hand_and_commits_it(
    redis_url: str, r: redis.Redis, name: Names
) -> None:
    s = name("s")
    ids = fill(r, s, 60)
    proc = start_worker(redis_url, s, "warm", 25, delay_s=1.0)
    try:
        printed_ids(proc, lambda seen: len(seen) == 25)
        proc.send_signal(signal.SIGTERM)  # while the handler sleeps
        out, err = proc.communicate(timeout=15)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.split() == ["stopped"]  # no batch after the one in hand
    assert text(r.get(reader_key(s, "warm"))) == ids[24]
