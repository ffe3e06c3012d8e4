"""The RSS section of ``python -m bench``: a Consumer's memory over a long backlog.

The stream is filled once (``fill``, with ``Producer.send_many``), then a child process
(``multiprocessing``, spawn: a fresh interpreter, nothing of the parent's heap) consumes it with
``Consumer.run``; its handler acks every message and samples the child's own resident set size
(``/proc/self/statm``, else psutil) every tenth of the backlog. What bench/suite.py's docstring
says of the section holds here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import redis

import conveyor
from bench._runs import CHILD_START_TIMEOUT_S, PRODUCE_CHUNK, BenchError, answer, receive, spawned
from bench.suite_consume import AckAll, progress, rows
from conveyor import Consumer, Producer

#: rows a ``send_many`` call of a fill (one progress line each on a long fill)
FILL_STEP = 100_000
MB = 1024 * 1024


def fill(client: redis.Redis, stream: str, count: int) -> float:
    """Add ``count`` entries (``rows``) to ``stream``; the seconds it took."""
    producer = Producer(client, stream)
    started = time.perf_counter()
    done = 0
    while done < count:
        step = min(FILL_STEP, count - done)
        done += len(producer.send_many(rows(done, step), chunk=PRODUCE_CHUNK))
        if count > FILL_STEP:
            progress(f"filling a stream: {done:,} of {count:,} entries")
    length = client.xlen(stream)
    if length != count:
        raise BenchError(f"filling {stream!r} left {length} entries, not {count}")
    return time.perf_counter() - started


def rss_bytes() -> int:
    """This process's resident set size now."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        pass
    try:
        import psutil
    except ImportError:
        raise BenchError("no /proc/self/statm and psutil is not installed") from None
    return int(psutil.Process().memory_info().rss)


@dataclass(frozen=True)
class RssJob:
    url: str
    stream: str
    group: str
    count: int
    batch: int
    max_wait_ms: int


class SampledAckAll(AckAll):
    """AckAll that also samples the process's RSS every tenth of ``count`` messages."""

    def __init__(self, consumer: Consumer, count: int) -> None:
        super().__init__(consumer, count)
        self.every = max(1, count // 10)
        self.samples: list[tuple[int, int]] = [(0, rss_bytes())]

    def __call__(self, batch: Any) -> None:
        super().__call__(batch)
        if self.seen >= len(self.samples) * self.every or self.seen >= self.count:
            rss = rss_bytes()
            self.samples.append((self.seen, rss))
            progress(f"rss: {self.seen:,} of {self.count:,} consumed, RSS {rss / MB:.1f} MB")


def _child(job: RssJob, conn: Connection) -> None:
    """Entry point of the child: consume the backlog, send back what it measured."""
    with conn:
        answer(conn, lambda: _consume(job))


def _consume(job: RssJob) -> dict[str, Any]:
    client = conveyor.connect(job.url)
    c = Consumer(client, job.stream, job.group, batch_size=job.batch, max_wait_ms=job.max_wait_ms)
    handler = SampledAckAll(c, job.count)
    started = time.perf_counter()
    c.run(handler)
    wall = time.perf_counter() - started
    client.close()
    result = {"read": handler.seen, "acked": c.acked_count, "wall_s": wall}
    return {**result, "samples": handler.samples}


def measure_rss(job: RssJob, admin: redis.Redis) -> dict[str, Any]:
    """Consume ``job.stream`` (already filled, group at id 0) in a spawned child."""
    with spawned(_child, (job,), "bench-rss") as conn:
        result = receive(conn, CHILD_START_TIMEOUT_S + job.count / 1_000, "rss child")
    pending = admin.xpending(job.stream, job.group)["pending"]
    if result["read"] != job.count or result["acked"] != job.count or pending:
        raise BenchError(
            f"rss: expected {job.count} messages read and acked, got {result['read']} read, "
            f"{result['acked']} acked, {pending} still pending"
        )
    samples = result["samples"]
    (first_at, first), (end_at, end) = samples[1], samples[-1]
    return {
        "messages": job.count,
        "batch": job.batch,
        "baseline_mb": round(samples[0][1] / MB, 2),
        "first_sample_at": first_at,
        "rss_first_mb": round(first / MB, 2),
        "end_sample_at": end_at,
        "rss_end_mb": round(end / MB, 2),
        "growth_mb": round((end - first) / MB, 2),
        "samples_mb": [[at, round(rss / MB, 2)] for at, rss in samples],
        "consume_wall_s": round(result["wall_s"], 2),
        "consume_msgs_per_s": round(job.count / result["wall_s"], 1),
    }
