"""Health you can alert on: ``conveyor monitor``'s exit code and the exporter's
``conveyor_health`` say the same thing, from the same thresholds, whose defaults are the
consumers' own.

    0 OK · 1 WARNING · 2 CRITICAL · 3 UNKNOWN (server unreachable, stream missing)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from conveyor import Consumer
from conveyor.metrics import StreamMetrics
from conveyor.server import free_port
from tests.test_cli import assert_clean_error
from tests.test_cli_commands import cli

Name = Callable[[str], str]


def exporter_health(client: redis.Redis, stream: str, **options: int) -> float:
    """``conveyor_health`` of ``stream`` as a scrape would read it."""
    metrics = StreamMetrics(client, [stream], **options)
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "conveyor_health" and s.labels.get("stream") == stream:
                return float(s.value)
    raise AssertionError(f"no conveyor_health for {stream} in:\n{text}")


@pytest.fixture
def busy_worker(r: redis.Redis, name: Name) -> Iterator[str]:
    """A live conveyor worker (defaults: batch size 100) holding a full batch, with 50 more
    entries waiting: a healthy worker at work."""
    stream = name("orders")
    pipe = r.pipeline(transaction=False)
    for i in range(150):
        pipe.xadd(stream, {"n": i})
    pipe.execute()
    worker = Consumer(r, stream, "g", consumer="busy")
    assert len(worker.get_batch()) == 100
    yield stream
    worker.close()


def test_a_healthy_worker_holding_a_full_batch_is_ok_by_default(
    redis_url: str, r: redis.Redis, busy_worker: str
) -> None:
    stream = busy_worker

    default = cli("monitor", "-s", stream, url=redis_url)
    legacy = cli("monitor", "-s", stream, "--batch-size", "2", url=redis_url)

    assert default.returncode == 0, default.stdout + default.stderr
    assert "health: OK" in default.stderr
    assert exporter_health(r, stream) == 0
    assert legacy.returncode == 1  # the redis-streams default, only when asked for
    assert "'busy': WARNING - too many pending items" in legacy.stderr
    assert exporter_health(r, stream, batch_size=2) == 1


def test_a_backlog_without_a_live_consumer_is_a_warning_then_critical_past_max_lag(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    stream = name("orders")
    for i in range(5):
        r.xadd(stream, {"n": i})
    r.xgroup_create(stream, "g", "0")

    warning = cli("monitor", "-s", stream, url=redis_url)
    critical = cli("monitor", "-s", stream, "--max-lag", "4", url=redis_url)
    as_json = cli("monitor", "-s", stream, "--max-lag", "4", "--json", url=redis_url)

    assert warning.returncode == 1, warning.stderr
    assert "group 'g': 5 entries wait (lag) and no live consumer reads them" in warning.stderr
    assert exporter_health(r, stream) == 1
    assert critical.returncode == 2, critical.stderr
    assert "lag 5 is above max_lag 4" in critical.stderr
    assert exporter_health(r, stream, max_lag=4) == 2
    verdict = json.loads(as_json.stdout)["health"]
    assert (verdict["code"], verdict["status"]) == (2, "CRITICAL")


def test_a_missing_stream_is_unknown(redis_url: str, r: redis.Redis, name: Name) -> None:
    stream = name("missing")

    result = cli("monitor", "-s", stream, url=redis_url)
    as_json = cli("monitor", "-s", stream, "--json", url=redis_url)

    assert_clean_error(result)
    assert result.returncode == 3
    assert f"stream {stream!r} does not exist" in result.stderr
    assert json.loads(as_json.stdout)["health"]["status"] == "UNKNOWN"
    assert as_json.returncode == 3
    assert exporter_health(r, stream) == 3


def test_an_unreachable_server_is_unknown() -> None:
    url = f"redis://user:sekret@127.0.0.1:{free_port()}/0"

    result = cli("monitor", "-s", "orders", "--url", url)
    as_json = cli("monitor", "-s", "orders", "--json", "--url", url)

    assert_clean_error(result)
    assert result.returncode == 3
    assert "cannot connect to redis://user:***@127.0.0.1" in result.stderr
    assert "sekret" not in result.stderr + as_json.stdout + as_json.stderr
    assert json.loads(as_json.stdout)["health"]["code"] == 3


def test_the_exit_codes_are_in_the_help() -> None:
    monitor_help = cli("monitor", "--help").stdout
    exporter_help = cli("exporter", "--help").stdout

    for line in ("0 OK", "1 WARNING", "2 CRITICAL", "3 UNKNOWN"):
        assert line in monitor_help
        assert line in exporter_help
