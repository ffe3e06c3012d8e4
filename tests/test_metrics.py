"""conveyor.metrics in process: a worker's counters, the streams exporter, serving over HTTP,
and the install hint when prometheus_client is missing."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import sys
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import conveyor
from conveyor import Batch, Consumer, Message
from conveyor._keys import dead_letter_key
from conveyor.metrics import INSTALL_HINT, StreamMetrics, WorkerMetrics, require_prometheus, serve
from conveyor.server import free_port

Name = Callable[[str], str]


def value(registry: CollectorRegistry, sample_name: str, **labels: str) -> float:
    """One sample's value, parsed back from the text exposition as a scraper would."""
    text = generate_latest(registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no {sample_name}{labels} in:\n{text}")


def has_series(registry: CollectorRegistry, sample_name: str, **labels: str) -> bool:
    try:
        value(registry, sample_name, **labels)
    except AssertionError:
        return False
    return True


@pytest.fixture
def consumer(r: redis.Redis, name: Name) -> Iterator[Consumer]:
    c = Consumer(r, name("orders"), "billing", consumer="w1", max_wait_ms=50, max_deliveries=1)
    yield c
    c.close()


def test_worker_metrics_count_what_the_consumer_did(r: redis.Redis, consumer: Consumer) -> None:
    stream = consumer.streams[0]
    for i in range(10):
        r.xadd(stream, {"n": i})
    r.xadd(stream, {"n": "boom"})
    metrics = WorkerMetrics(consumer)

    def handle(batch: Batch) -> None:
        for msg in batch:
            if msg.fields["n"] == "boom":
                batch.fail(msg, "boom")  # max_deliveries=1: dead-lettered at once
            else:
                batch.ack(msg)
        consumer.stop()

    consumer.run(metrics.wrap(handle))

    labels = {"stream": stream, "group": "billing", "consumer": "w1"}
    reg = metrics.registry
    assert value(reg, "conveyor_worker_messages_processed_total", **labels) == 11
    assert value(reg, "conveyor_worker_messages_acked_total", **labels) == 10
    assert value(reg, "conveyor_worker_messages_failed_total", **labels) == 1
    assert value(reg, "conveyor_worker_messages_dead_lettered_total", **labels) == 1
    assert value(reg, "conveyor_worker_messages_retried_total", **labels) == 0
    assert value(reg, "conveyor_worker_messages_reclaimed_total", **labels) == 0
    assert value(reg, "conveyor_worker_batch_duration_seconds_count", **labels) == 1
    assert r.xlen(dead_letter_key(stream)) == 1
    assert "processed=11" in repr(metrics)


def test_a_failing_handler_is_still_timed_and_its_error_passes(consumer: Consumer) -> None:
    metrics = WorkerMetrics(consumer)

    def handle(batch: Batch) -> None:
        raise ValueError("boom")

    wrapped = metrics.wrap(handle)
    with pytest.raises(ValueError, match="boom"):
        wrapped(Batch([Message(consumer.streams[0], "1-0", {"a": "1"}, 1)]))

    assert value(metrics.registry, "conveyor_worker_batch_duration_seconds_count") == 1
    assert metrics.processed_count == 1


def test_a_coroutine_handler_stays_one(consumer: Consumer) -> None:
    metrics = WorkerMetrics(consumer)
    seen: list[int] = []

    async def handle(batch: Batch) -> None:
        seen.append(len(batch))

    wrapped = metrics.wrap(handle)
    assert inspect.iscoroutinefunction(wrapped)
    asyncio.run(wrapped(Batch([])))

    assert seen == [0]
    assert value(metrics.registry, "conveyor_worker_batch_duration_seconds_count") == 1


@pytest.fixture
def seeded(r: redis.Redis, name: Name) -> str:
    """94 entries; group g: consumers a (42) and b (41) hold 83 pending, 11 undelivered."""
    stream = name("orders")
    for i in range(94):
        r.xadd(stream, {"n": i})
    r.xgroup_create(stream, "g", "0")
    r.xreadgroup("g", "a", {stream: ">"}, count=42)
    r.xreadgroup("g", "b", {stream: ">"}, count=41)
    r.xadd(dead_letter_key(stream), {"n": "dead"})
    return stream


def test_stream_metrics_report_groups_and_consumers(
    r: redis.Redis, seeded: str, name: Name
) -> None:
    missing = name("missing")
    metrics = StreamMetrics(r, [seeded, missing], batch_size=50)
    reg = metrics.registry

    assert value(reg, "conveyor_up", stream=seeded) == 1
    assert value(reg, "conveyor_up", stream=missing) == 0
    assert value(reg, "conveyor_health", stream=missing) == 3  # unknown
    assert not has_series(reg, "conveyor_stream_length", stream=missing)
    assert value(reg, "conveyor_stream_length", stream=seeded) == 94
    assert value(reg, "conveyor_dead_letter_length", stream=seeded) == 1
    assert value(reg, "conveyor_group_lag", stream=seeded, group="g") == 11
    assert value(reg, "conveyor_group_pending", stream=seeded, group="g") == 83
    assert value(reg, "conveyor_group_consumers", stream=seeded, group="g") == 2
    assert value(reg, "conveyor_group_oldest_pending_age_seconds", stream=seeded) >= 0
    assert value(reg, "conveyor_consumer_pending", stream=seeded, consumer="a") == 42
    assert value(reg, "conveyor_consumer_pending", stream=seeded, consumer="b") == 41
    assert value(reg, "conveyor_consumer_idle_seconds", stream=seeded, consumer="a") >= 0
    assert value(reg, "conveyor_consumer_status", consumer="a", status="OK") == 1
    assert value(reg, "conveyor_health", stream=seeded) in (0, 1, 2)


def test_stream_metrics_on_scrape_see_changes_at_once(r: redis.Redis, seeded: str) -> None:
    metrics = StreamMetrics(r, [seeded], group="g")
    assert value(metrics.registry, "conveyor_group_lag", group="g") == 11

    r.xreadgroup("g", "a", {seeded: ">"}, count=5)

    assert value(metrics.registry, "conveyor_group_lag", group="g") == 6
    assert value(metrics.registry, "conveyor_group_pending", group="g") == 88


def test_stream_metrics_with_an_interval_serve_the_latest(r: redis.Redis, seeded: str) -> None:
    metrics = StreamMetrics(r, [seeded], group="g", interval_s=3600)
    metrics.start()
    try:
        r.xreadgroup("g", "a", {seeded: ">"}, count=5)
        assert value(metrics.registry, "conveyor_group_lag", group="g") == 11  # not refreshed

        metrics.refresh()

        assert value(metrics.registry, "conveyor_group_lag", group="g") == 6
    finally:
        metrics.stop()


def test_serve_answers_scrapes(r: redis.Redis, seeded: str) -> None:
    metrics = StreamMetrics(r, [seeded], group="g")
    server = serve(metrics.registry, 0, "127.0.0.1")
    try:
        url = f"http://127.0.0.1:{server.server_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    finally:
        server.shutdown()
        server.server_close()

    assert f'conveyor_group_pending{{group="g",stream="{seeded}"}} 83.0' in text


def test_without_prometheus_client_the_error_gives_the_install_hint(
    monkeypatch: pytest.MonkeyPatch, consumer: Consumer
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)

    with pytest.raises(ImportError, match=r"pip install 'conveyor\[metrics\]'"):
        require_prometheus()
    with pytest.raises(ImportError, match="prometheus_client"):
        WorkerMetrics(consumer)
    assert INSTALL_HINT == "pip install 'conveyor[metrics]'"


def test_a_dead_letter_stream_of_the_consumers_own_choosing(
    r: redis.Redis, seeded: str, name: Name
) -> None:
    other, dead = name("other"), name("dead")  # consumers given dead_letter=dead
    r.xadd(other, {"n": "1"})
    r.xadd(dead, {"n": "1"})
    r.xadd(dead, {"n": "2"})
    metrics = StreamMetrics(r, [seeded, other], dead_letter=dead)
    assert value(metrics.registry, "conveyor_dead_letter_length", stream=seeded) == 2
    assert value(metrics.registry, "conveyor_dead_letter_length", stream=other) == 2
    with pytest.raises(conveyor.ConfigError, match="dead_letter"):
        StreamMetrics(r, [seeded], dead_letter="")


def test_a_dead_letter_key_of_the_wrong_type_leaves_the_stream_readable(
    r: redis.Redis, seeded: str, caplog: pytest.LogCaptureFixture
) -> None:
    r.delete(dead_letter_key(seeded))
    r.set(dead_letter_key(seeded), "not a stream")
    metrics = StreamMetrics(r, [seeded])

    with caplog.at_level(logging.WARNING, logger="conveyor.metrics"):
        assert value(metrics.registry, "conveyor_up", stream=seeded) == 1
        assert value(metrics.registry, "conveyor_stream_length", stream=seeded) == 94

    assert not has_series(metrics.registry, "conveyor_dead_letter_length", stream=seeded)
    assert len([rec for rec in caplog.records if "is not a stream" in rec.getMessage()]) == 1


def test_an_unreachable_server_is_logged_once_per_outage(
    name: Name, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    client = conveyor.connect(f"redis://127.0.0.1:{port}/0")
    streams = [name("a"), name("b")]
    metrics = StreamMetrics(client, streams)
    server = None
    try:
        with caplog.at_level(logging.WARNING, logger="conveyor.metrics"):
            for _ in range(3):
                assert value(metrics.registry, "conveyor_up", stream=streams[0]) == 0
                assert value(metrics.registry, "conveyor_health", stream=streams[1]) == 3
            server = conveyor.EmbeddedServer(
                os.environ.get("CONVEYOR_TEST_SERVER") or None, port=port
            ).start()
            for s in streams:
                client.xgroup_create(s, "g", "0", mkstream=True)
            assert value(metrics.registry, "conveyor_up", stream=streams[0]) == 1
            assert value(metrics.registry, "conveyor_health", stream=streams[1]) == 0
    finally:
        client.close()
        if server is not None:
            server.close()

    messages = [rec.getMessage() for rec in caplog.records]
    assert len([m for m in messages if "cannot reach the server at" in m]) == 1
    assert len([m for m in messages if "answers again" in m]) == 1
    assert not [m for m in messages if "cannot collect" in m]  # not one line per stream
