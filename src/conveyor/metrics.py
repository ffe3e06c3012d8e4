"""Prometheus metrics: a worker's counters, and an exporter of streams, groups and consumers.

Needs prometheus_client, the ``metrics`` extra (``pip install 'conveyor[metrics]'``). It is
imported only when a metrics object is made, so the rest of conveyor works without it; when it
is missing, that raises ImportError with the install hint.

- ``WorkerMetrics(consumer)``: what one consumer has done (processed, acked, failed, retried,
  reclaimed, dead-lettered), read from the consumer's own counters at each scrape, and a
  histogram of batch durations from ``wrap(handler)``.
- ``StreamMetrics(client, streams)``: lag, pending, oldest pending age, dead-letter depth,
  consumers and their idle time, from ``Monitor`` snapshots taken at each scrape (or every
  ``interval_s`` by a background thread).

Both are prometheus_client collectors in a registry of their own; ``serve(registry, port)``
exposes a registry over HTTP at ``/metrics``.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor._core.commands import error_code
from conveyor._keys import dead_letter_key
from conveyor.config import check_name
from conveyor.connection import describe
from conveyor.consumer import AsyncConsumer, Consumer
from conveyor.errors import ConnectionLost
from conveyor.models import UNKNOWN, Batch
from conveyor.monitor import Monitor, Snapshot

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

__all__ = [
    "BATCH_BUCKETS_S",
    "INSTALL_HINT",
    "StreamMetrics",
    "WorkerMetrics",
    "require_prometheus",
    "serve",
]

log = logging.getLogger("conveyor.metrics")

INSTALL_HINT = "pip install 'conveyor[metrics]'"

#: batch duration buckets, in seconds: from a fast in-memory batch to a slow external call
BATCH_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

#: (metric name without _total, consumer attribute or None for the wrapper's own count, help)
_WORKER_COUNTERS = (
    ("conveyor_worker_messages_processed", None, "Messages handed to the handler."),
    ("conveyor_worker_messages_acked", "acked_count", "Messages acknowledged."),
    ("conveyor_worker_messages_failed", "failed_count", "Messages whose handling failed."),
    ("conveyor_worker_messages_retried", "retried_count", "Failed messages delivered again."),
    (
        "conveyor_worker_messages_reclaimed",
        "reclaimed_count",
        "Messages taken over from dead or stuck consumers.",
    ),
    (
        "conveyor_worker_messages_dead_lettered",
        "dead_lettered_count",
        "Messages moved to the dead-letter stream.",
    ),
)


def require_prometheus() -> None:
    """Raise ImportError with the install hint when prometheus_client is not installed.

    >>> require_prometheus()   # doctest: +SKIP
    """
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ImportError(
            f"Prometheus metrics need prometheus_client, which is not installed: {INSTALL_HINT}"
        ) from None


class WorkerMetrics:
    """One consumer's counters and batch durations as Prometheus metrics.

    The counters are the consumer's own (``acked_count``, ``failed_count`` ...), read at each
    scrape, so they are exact and cost nothing between scrapes; ``processed`` and the
    ``conveyor_worker_batch_duration_seconds`` histogram come from the wrapped handler. Every
    series is labelled with stream, group and consumer.

    Example (``c`` is a Consumer)::

        metrics = WorkerMetrics(c)
        serve(metrics.registry, 9100)
        c.run(metrics.wrap(handler))
    """

    def __init__(
        self,
        consumer: Consumer | AsyncConsumer,
        registry: CollectorRegistry | None = None,
        *,
        buckets_s: Sequence[float] = BATCH_BUCKETS_S,
    ) -> None:
        require_prometheus()
        from prometheus_client import CollectorRegistry, Histogram

        self.consumer = consumer
        #: messages handed to the wrapped handler
        self.processed_count = 0
        self.registry = registry if registry is not None else CollectorRegistry()
        self._labels = {
            "stream": ",".join(consumer.streams),
            "group": consumer.group,
            "consumer": consumer.name,
        }
        self._durations = Histogram(
            "conveyor_worker_batch_duration_seconds",
            "Time the handler took per batch.",
            labelnames=list(self._labels),
            buckets=buckets_s,
            registry=self.registry,
        ).labels(**self._labels)
        self.registry.register(self)

    def wrap(self, handler: Callable[[Batch], Any]) -> Callable[[Batch], Any]:
        """``handler`` timed and counted; exceptions pass through (the consumer fails the
        batch's unsettled messages as usual). A coroutine function stays one, for
        ``AsyncConsumer.run``."""
        if inspect.iscoroutinefunction(handler):

            async def measured_async(batch: Batch) -> Any:
                started = time.perf_counter()
                try:
                    return await handler(batch)
                finally:
                    self._observe(len(batch), time.perf_counter() - started)

            return measured_async

        def measured(batch: Batch) -> Any:
            started = time.perf_counter()
            try:
                return handler(batch)
            finally:
                self._observe(len(batch), time.perf_counter() - started)

        return measured

    def _observe(self, size: int, seconds: float) -> None:
        self._durations.observe(seconds)
        self.processed_count += size

    def collect(self) -> Iterator[Metric]:
        """The counters as they are now (prometheus_client calls this at each scrape)."""
        from prometheus_client.core import CounterMetricFamily

        names = list(self._labels)
        values = list(self._labels.values())
        for name, attribute, help_text in _WORKER_COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=names)
            count = self.processed_count if attribute is None else getattr(self.consumer, attribute)
            family.add_metric(values, count)
            yield family

    def __repr__(self) -> str:
        return f"<WorkerMetrics consumer={self.consumer.name!r} processed={self.processed_count}>"


@dataclass(frozen=True, slots=True)
class _Reading:
    """One stream as the exporter last saw it: a snapshot, or the error that prevented one."""

    stream: str
    snapshot: Snapshot | None
    dead_letters: int | None
    seconds: float
    error: str | None = None


class StreamMetrics:
    """Streams, their groups and consumers as Prometheus gauges, from ``Monitor`` snapshots.

    Per stream: length, dead-letter depth, health (0 ok, 1 warning, 2 critical, 3 unknown:
    the stream could not be read) and whether it could be read (``conveyor_up``); per group:
    lag, pending, oldest pending age and idle time, consumers; per consumer: idle time,
    pending, heartbeat age, status. ``group`` limits the groups to one; ``dead_letter`` names
    the dead-letter stream when the consumers were given ``dead_letter=NAME`` (its length is
    every stream's; default: each stream's own); ``monitor_options`` go to each Monitor
    (``batch_size``, ``idle_time_ms_warning_threshold`` ...).

    Snapshots are taken at each scrape; with ``interval_s``, by ``start()``'s thread every
    ``interval_s`` instead, and scrapes get the latest (cheap under many scrapers). A server
    that cannot be reached is logged once per outage (``log_outages=False``: not at all, for a
    caller that says so itself), a stream that cannot be read once until it can.

    >>> metrics = StreamMetrics(r, ["orders", "payments"], group="billing")  # doctest: +SKIP
    >>> server = serve(metrics.registry, 9121)                               # doctest: +SKIP
    """

    def __init__(
        self,
        client: Any,
        streams: Sequence[str],
        group: str | None = None,
        *,
        registry: CollectorRegistry | None = None,
        interval_s: float | None = None,
        log_outages: bool = True,
        dead_letter: str | None = None,
        **monitor_options: Any,
    ) -> None:
        require_prometheus()
        if dead_letter is not None:
            check_name("dead_letter", dead_letter)
        from prometheus_client import CollectorRegistry

        self.client = client
        self.monitors = [Monitor(client, s, group, **monitor_options) for s in streams]
        self.interval_s = interval_s
        self.registry = registry if registry is not None else CollectorRegistry()
        self._lock = threading.Lock()
        self._latest: list[_Reading] = []
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing: set[str] = set()
        self._log_outages = log_outages
        self._unreachable = False
        #: streams whose dead-letter key is not a stream (another client's)
        self._odd_dead_letters: set[str] = set()
        self.dead_letter = dead_letter
        self.registry.register(self)

    def use_client(self, client: Any) -> None:
        """Collect with ``client`` from now on (the caller closes the previous one).

        >>> metrics.use_client(conveyor.connect(url, cluster=True))   # doctest: +SKIP
        """
        self.client = client
        for monitor in self.monitors:
            monitor.client = client

    def refresh(self) -> list[_Reading]:
        """Take a snapshot of every stream now; keep and return them."""
        readings = [self._read(m) for m in self.monitors]
        with self._lock:
            self._latest = readings
        return readings

    def _read(self, monitor: Monitor) -> _Reading:
        started = time.perf_counter()
        try:
            snapshot = monitor.collect()
            dead = self._dead_letters(monitor.stream)
        except Exception as exc:  # server down, stream gone ...: a scrape must still answer
            return self._failed(monitor.stream, exc, started)
        self._reached()
        if monitor.stream in self._failing:
            self._failing.discard(monitor.stream)
            log.warning("stream %r: read again", monitor.stream)
        return _Reading(monitor.stream, snapshot, dead, time.perf_counter() - started)

    def _dead_letters(self, stream: str) -> int | None:
        """The dead-letter stream's length; None when its key holds something else."""
        key = self.dead_letter or dead_letter_key(stream)
        try:
            return int(self.client.xlen(key))
        except ResponseError as exc:
            if error_code(exc) != "WRONGTYPE":
                raise
        if stream not in self._odd_dead_letters:
            self._odd_dead_letters.add(stream)
            log.warning("%s is not a stream (another client wrote it): no dead-letter length", key)
        return None

    def _failed(self, stream: str, exc: BaseException, started: float) -> _Reading:
        if isinstance(exc, ConnectionLost | RedisConnectionError | RedisTimeoutError | OSError):
            if not self._unreachable:  # one line per outage, not one per stream and scrape
                self._unreachable = True
                if self._log_outages:
                    log.warning("cannot reach the server at %s: %s", describe(self.client), exc)
        elif stream not in self._failing:  # one line per failure, not one per scrape
            self._failing.add(stream)
            log.warning("stream %r: cannot collect: %s", stream, exc)
        return _Reading(stream, None, None, time.perf_counter() - started, str(exc))

    def _reached(self) -> None:
        if self._unreachable:
            self._unreachable = False
            if self._log_outages:
                log.warning("the server at %s answers again", describe(self.client))

    def start(self) -> None:
        """With ``interval_s``: refresh now, then every ``interval_s`` from a daemon thread."""
        if self.interval_s is None or self._thread is not None:
            return
        self.refresh()
        interval_s = self.interval_s

        def loop() -> None:
            while not self._stopping.wait(interval_s):
                self.refresh()

        self._thread = threading.Thread(target=loop, name="conveyor-exporter", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)

    def collect(self) -> Iterator[Metric]:
        """The gauges (prometheus_client calls this at each scrape)."""
        if self.interval_s is None:
            readings = self.refresh()
        else:
            with self._lock:
                readings = list(self._latest)
        yield from _families(readings)

    def __repr__(self) -> str:
        streams = [m.stream for m in self.monitors]
        return f"<StreamMetrics streams={streams!r} interval_s={self.interval_s}>"


def _families(readings: Sequence[_Reading]) -> Iterator[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    def gauge(name: str, help_text: str, *labels: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, help_text, labels=list(labels))

    up = gauge("conveyor_up", "1 when the stream could be read at the last collection.", "stream")
    took = gauge("conveyor_collect_duration_seconds", "Time the last collection took.", "stream")
    length = gauge("conveyor_stream_length", "Entries in the stream (XLEN).", "stream")
    dead = gauge(
        "conveyor_dead_letter_length", "Entries in the stream's dead-letter stream.", "stream"
    )
    health = gauge(
        "conveyor_health",
        "Verdict: 0 healthy, 1 warning, 2 critical, 3 unknown (the stream could not be read).",
        "stream",
    )
    per_group = ("stream", "group")
    lag = gauge("conveyor_group_lag", "Entries not yet delivered to the group.", *per_group)
    pending = gauge("conveyor_group_pending", "Entries delivered, not yet acked.", *per_group)
    oldest_age = gauge(
        "conveyor_group_oldest_pending_age_seconds",
        "Age of the oldest pending entry, from its id (0: nothing pending).",
        *per_group,
    )
    oldest_idle = gauge(
        "conveyor_group_oldest_pending_idle_seconds",
        "Since the oldest pending entry was last delivered (0: nothing pending).",
        *per_group,
    )
    consumers = gauge("conveyor_group_consumers", "Consumers in the group.", *per_group)
    per_consumer = ("stream", "group", "consumer")
    idle = gauge("conveyor_consumer_idle_seconds", "Since the consumer last read.", *per_consumer)
    held = gauge("conveyor_consumer_pending", "Entries the consumer holds.", *per_consumer)
    beat = gauge(
        "conveyor_consumer_heartbeat_age_seconds",
        "Since the consumer's last heartbeat (conveyor consumers only).",
        *per_consumer,
    )
    status = gauge(
        "conveyor_consumer_status",
        "1 for the consumer's status as the monitor judges it.",
        *per_consumer,
        "status",
    )
    for r in readings:
        up.add_metric([r.stream], 0 if r.snapshot is None else 1)
        took.add_metric([r.stream], r.seconds)
        if r.snapshot is None:
            health.add_metric([r.stream], UNKNOWN)
            continue
        snap = r.snapshot
        length.add_metric([r.stream], snap.stream.length)
        if r.dead_letters is not None:
            dead.add_metric([r.stream], r.dead_letters)
        health.add_metric([r.stream], snap.health().code)
        for g in snap.groups:
            labels = [r.stream, g.name]
            if g.lag is not None:
                lag.add_metric(labels, g.lag)
            pending.add_metric(labels, g.pending)
            oldest_age.add_metric(labels, (g.oldest_pending_age_ms or 0) / 1000)
            oldest_idle.add_metric(labels, (g.oldest_pending_idle_ms or 0) / 1000)
            consumers.add_metric(labels, g.consumers_count)
            for c in g.consumers:
                named = [*labels, c.name]
                idle.add_metric(named, c.idle_ms / 1000)
                held.add_metric(named, c.pending)
                if c.heartbeat_age_ms is not None:
                    beat.add_metric(named, c.heartbeat_age_ms / 1000)
                status.add_metric([*named, c.status], 1)
    yield from (up, took, length, dead, health, lag, pending, oldest_age, oldest_idle)
    yield from (consumers, idle, held, beat, status)


def serve(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> WSGIServer:
    """Serve ``registry`` at ``http://addr:port/metrics`` from a daemon thread; returns the
    server (``shutdown()`` stops it). Port 0 picks a free port (``server.server_port``).

    >>> server = serve(WorkerMetrics(consumer).registry, 9100)   # doctest: +SKIP
    """
    require_prometheus()
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=addr, registry=registry)
    return server
