"""Server faults are outages, never the end of ``run()`` (DESIGN promise 4).

Error replies are injected by a fault proxy between the consumer and a real server, so every
code redis-py turns into its own exception class (PITFALLS 20) is met by both drivers. A primary
demoted to a replica of a dead address, then promoted back, is the real thing.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

import conveyor
from conveyor import ConfigError, ConnectionLost, Consumer, EmbeddedServer, ServerError
from conveyor.server import free_port
from tests.faultproxy import FaultProxy
from tests.workers import Worker, fill, wait_for

#: error replies as servers send them, and the word each must be logged with
FAULTS = {
    "READONLY": b"-READONLY You can't write against a read only replica.",
    "MASTERDOWN": b"-MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set "
    b"to 'no'.",
    "LOADING": b"-LOADING Redis is loading the dataset in memory",
    "BUSY": b"-BUSY Redis is busy running a script. You can only call SCRIPT KILL or "
    b"SHUTDOWN NOSAVE.",
    "TRYAGAIN": b"-TRYAGAIN Multiple keys request during rehashing of slot",
    "CLUSTERDOWN": b"-CLUSTERDOWN The cluster is down",
    "OOM": b"-OOM command not allowed when used memory > 'maxmemory'.",
    "NOPERM": b"-NOPERM User worker has no permissions to run the 'xreadgroup' command",
    "MOVED": b"-MOVED 11361 127.0.0.1:7712",
}


@pytest.fixture
def proxy(server: EmbeddedServer) -> Iterator[FaultProxy]:
    with FaultProxy(server.port) as p:
        yield p


def is_new_read(args: list[bytes]) -> bool:
    return args[0].upper() == b"XREADGROUP" and args[-1] == b">"


@pytest.mark.parametrize("kind", ["sync", "async"])
@pytest.mark.parametrize("code", list(FAULTS))
def test_every_error_code_is_an_outage_that_run_survives(
    kind: str,
    code: str,
    proxy: FaultProxy,
    r: redis.Redis,
    name: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = name("s")
    produced = set(fill(r, s, 30))
    proxy.inject(is_new_read, FAULTS[code], times=3)
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        w = Worker(kind, proxy.url, s, "g", batch_size=10, max_wait_ms=100).start()
        w.finish(produced, f"every message processed past {code}")
    assert proxy.injected == 3
    assert r.xpending(s, "g")["pending"] == 0
    failures = [rec.getMessage() for rec in caplog.records if "backoff" in rec.getMessage()]
    assert len(failures) == 1, failures  # logged once per outage, not once per attempt
    assert code in failures[0]
    if code == "MOVED":
        assert "MOVED 11361 127.0.0.1:7712" in failures[0] and "cluster client" in failures[0]
    back = next(rec.getMessage() for rec in caplog.records if "working again" in rec.getMessage())
    print(
        f"\n{code} ({kind}): processed {len(w.processed)}/{len(produced)}, duplicates "
        f"{len(w.seen) - len(w.processed)}, outage: {back.split('working again ')[1]}"
    )


@pytest.mark.parametrize(
    ("code", "error"),
    [("READONLY", ConnectionLost), ("MOVED", ConfigError), ("NOPERM", ServerError)],
)
def test_get_batch_names_the_code_the_server_sent(
    code: str, error: type[Exception], proxy: FaultProxy, name: Callable[[str], str]
) -> None:
    client = conveyor.connect(proxy.url)
    c = Consumer(client, name("s"), "g", max_wait_ms=50)
    proxy.inject(is_new_read, FAULTS[code])
    with pytest.raises(error) as caught:
        c.get_batch()
    text = str(caught.value)
    assert text.rsplit(": ", maxsplit=1)[-1].startswith(code) or code in text
    assert "\n" not in text
    c.close()
    client.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_refusal_inside_a_script_names_the_command(
    kind: str, server: EmbeddedServer, r: redis.Redis, name: Callable[[str], str]
) -> None:
    """An ACL user that may run the scripts but not XADD: its dead-letter move is refused,
    the error names XADD, and run() goes on (the move is retried)."""
    s = name("s")
    user = f"u{os.getpid()}{time.monotonic_ns() % 100000}"
    allowed = [
        "+xreadgroup",
        "+xack",
        "+xclaim",
        "+xautoclaim",
        "+xpending",
        "+eval",
        "+time",
        "+hset",
        "+hdel",
        "+hgetall",
        "+pexpire",
        "+xgroup|create",
        "+xgroup|delconsumer",
        "+client|setname",
        "+xinfo|groups",
        "+xrange",
        "+ping",
    ]
    r.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], commands=allowed)
    fill(r, s, 3)
    url = server.url.replace("redis://", f"redis://{user}:pw@")
    errors: list[str] = []

    def poison(w: Worker, batch: conveyor.Batch) -> None:
        for msg in batch:
            batch.dead_letter(msg, "bad")

    handler_logs = logging.getLogger("conveyor.consumer")

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            errors.append(record.getMessage())

    catch = Catch(logging.WARNING)
    handler_logs.addHandler(catch)
    try:
        w = Worker(kind, url, s, "g", handler=poison, max_wait_ms=50).start()
        wait_for(lambda: any("XADD" in e for e in errors), what="a log line naming XADD")
        assert w.alive
        w.stop()
    finally:
        handler_logs.removeHandler(catch)
        r.acl_deluser(user)
    line = next(e for e in errors if "XADD" in e)
    assert "NOPERM" in line and "dead-letter move" in line
    assert r.xpending(s, "g")["pending"] == 3  # nothing lost: the moves wait for the right
    assert r.xlen(f"{{{s}}}:dead") == 0


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_lost_replies_never_count_as_deliveries(
    kind: str, proxy: FaultProxy, r: redis.Redis, name: Callable[[str], str]
) -> None:
    """Five lost read replies in a row: no handler saw those deliveries, so nothing is
    dead-lettered and the handler sees every message with deliveries=1."""
    s = name("s")
    produced = set(fill(r, s, 40))

    def a_read(args: list[bytes]) -> bool:
        head = args[0].upper()
        return head == b"XREADGROUP" or (head == b"EVAL" and b"XRANGE" in args[1])

    proxy.lose_reply(a_read, times=5)
    w = Worker(kind, proxy.url, s, "g", batch_size=40, max_wait_ms=100, max_deliveries=2)
    w.start()
    wait_for(lambda: w.processed >= produced, what="every message processed")
    w.stop()
    assert proxy.lost == 5
    assert r.xlen(f"{{{s}}}:dead") == 0
    assert sorted(d for _, d in w.seen) == [1] * 40
    assert r.xpending(s, "g")["pending"] == 0


@pytest.fixture
def own_server() -> Iterator[EmbeddedServer]:
    """A server of this test's own, for faults that would disturb the shared one."""
    with EmbeddedServer(os.environ.get("CONVEYOR_TEST_SERVER") or None) as srv:
        yield srv


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_demoted_primary_is_an_outage(
    kind: str, own_server: EmbeddedServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The primary becomes a replica of a dead address for 3 s, then a primary again: the
    workers stay alive and every produced id is processed, 0 pending."""
    r = conveyor.connect(own_server.url)
    s = "orders"
    produced: list[str] = []
    stop_producing = threading.Event()

    def produce() -> None:
        i = 0
        while not stop_producing.is_set() and i < 1500:
            try:
                produced.append(r.xadd(s, {"n": str(i)}).decode())
                i += 1
            except redis.RedisError:
                time.sleep(0.05)  # READONLY while demoted: try again
            if i % 50 == 0:
                time.sleep(0.01)

    fill(r, s, 1)  # the stream exists before the workers start
    produced.append(r.xrange(s)[0][0].decode())
    workers = [
        Worker(kind, own_server.url, s, "g", batch_size=20, max_wait_ms=100).start()
        for _ in range(2)
    ]
    producer = threading.Thread(target=produce)
    producer.start()

    def processed() -> set[str]:
        return set().union(*(w.processed for w in workers))

    wait_for(lambda: len(processed()) >= 300, what="300 messages processed before the fault")
    dead_port = free_port()
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        r.execute_command("REPLICAOF", "127.0.0.1", dead_port)
        started = time.monotonic()
        time.sleep(3)  # the fault's length: the outage under test lasts 3 s
        r.execute_command("REPLICAOF", "NO", "ONE")
        outage_s = time.monotonic() - started
        producer.join(60)
        wait_for(lambda: processed() >= set(produced), 60, "every produced id processed")
        caught_up_s = time.monotonic() - started - outage_s
    assert all(w.alive for w in workers)
    # Nothing was stranded for claim_idle_ms and then reclaimed: all came back at once.
    assert sum(w.consumer.reclaimed_count for w in workers) == 0
    for w in workers:
        w.stop()
    assert r.xpending(s, "g")["pending"] == 0
    assert len(produced) == 1501
    messages = " ".join(rec.getMessage() for rec in caplog.records)
    assert "READONLY" in messages or "state changed" in messages
    print(
        f"demoted primary ({kind}): {len(produced)} produced, {len(processed())} processed, "
        f"duplicates {sum(len(w.seen) for w in workers) - len(processed())}, "
        f"outage {outage_s:.1f} s, all processed {caught_up_s:.1f} s after it"
    )
    r.close()


COMPONENT_CASES = [
    ("READONLY", ConnectionLost),
    ("MASTERDOWN", ConnectionLost),
    ("TRYAGAIN", ConnectionLost),
    ("MOVED", ConfigError),
    ("NOPERM", ServerError),
    ("OOM", ServerError),
]


@pytest.mark.parametrize(("code", "error"), COMPONENT_CASES)
def test_every_component_classifies_by_code(
    code: str,
    error: type[Exception],
    proxy: FaultProxy,
    r: redis.Redis,
    name: Callable[[str], str],
) -> None:
    """Producer, DeadLetters, safe_trim, Scaler and Monitor raise the same classes for the
    same codes, each message one line with the code word and the stream."""
    s = name("s")
    fill(r, s, 3)
    r.xgroup_create(s, "g", "0")
    client = conveyor.connect(proxy.url)
    calls: list[tuple[str, Callable[[], object]]] = [
        ("XADD", lambda: conveyor.Producer(client, s).send({"a": "b"})),
        ("XRANGE", lambda: conveyor.DeadLetters(client, s).list()),
        ("EVAL", lambda: conveyor.safe_trim(client, s)),
        ("MULTI", lambda: conveyor.Scaler(client, s, group="g").sample()),
        ("XINFO", lambda: conveyor.Monitor(client, s).collect()),
    ]
    for command, call in calls:
        proxy.inject(command, FAULTS[code])
        with pytest.raises(error) as caught:
            call()
        text = str(caught.value)
        assert code in text and "\n" not in text, (command, text)
    client.close()


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_an_error_after_a_partial_batch_strands_nothing(
    kind: str, proxy: FaultProxy, r: redis.Redis, name: Callable[[str], str]
) -> None:
    """The first read of a batch delivers 3 entries, the next read of the same batch fails:
    the 3 come back from the consumer's own pending list at once, not after claim_idle_ms."""
    s = name("s")
    produced = set(fill(r, s, 3))
    reads = 0

    def second_new_read(args: list[bytes]) -> bool:
        nonlocal reads
        if is_new_read(args):
            reads += 1
            return reads == 2
        return False

    proxy.inject(second_new_read, FAULTS["READONLY"])
    w = Worker(kind, proxy.url, s, "g", batch_size=10, max_wait_ms=300, claim_idle_ms=60_000)
    w.start()
    wait_for(lambda: w.processed >= produced, 15, "the partial batch re-read at once")
    w.stop()
    assert proxy.injected == 1
    assert sorted(d for _, d in w.seen) == [1, 1, 1]  # no delivery counted for the re-read
    assert r.xpending(s, "g")["pending"] == 0


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_lost_reply_during_a_retry_backoff_counts_nothing_twice(
    kind: str, proxy: FaultProxy, r: redis.Redis, name: Callable[[str], str]
) -> None:
    """A failing message waits for its retry while a read reply is lost: the re-read of the
    own pending list passes it by, so the handler sees it exactly max_deliveries times."""
    s = name("s")
    (poison,) = fill(r, s, 1)

    failed = threading.Event()

    def always_fail(w: Worker, batch: conveyor.Batch) -> None:
        failed.set()
        raise ValueError("no")

    def a_read_in_the_backoff(args: list[bytes]) -> bool:
        return failed.is_set() and is_new_read(args)

    proxy.lose_reply(a_read_in_the_backoff)
    w = Worker(
        kind,
        proxy.url,
        s,
        "g",
        handler=always_fail,
        max_deliveries=3,
        retry_backoff_ms=300,
        max_wait_ms=50,
    )
    w.start()
    wait_for(lambda: r.xlen(f"{{{s}}}:dead") == 1, what="the message dead-lettered")
    w.stop()
    assert proxy.lost == 1
    assert [d for i, d in w.seen if i == poison] == [1, 2, 3]
    assert r.xpending(s, "g")["pending"] == 0
