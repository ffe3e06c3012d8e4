"""bench/latency.py at a tiny size: it runs, reports every case, and checks exactly-once.

No assertion on speed: only that the benchmark works end to end (the producer thread, the four
consumer loops, the idle children, the JSON report and its verification).
"""

from __future__ import annotations

import os

from tests.benchrun import run_bench

LATENCY_CASES = {"raw", "conveyor", "conveyor_no_linger", "async"}
IDLE_CASES = {"raw", "conveyor"}


def test_bench_latency_tiny_run() -> None:
    args = ("--seconds", "1", "--rate", "200", "--idle-seconds", "1")
    report = run_bench("bench.latency", *args, timeout=120)

    assert report["rate"] == 200
    assert report["seconds"] == 1
    assert report["cpu_count"] == os.cpu_count()
    assert set(report["latency"]) == LATENCY_CASES
    for case in report["latency"].values():
        for key in ("p50_ms", "p90_ms", "p99_ms", "max_ms"):
            assert isinstance(case[key], float | int) and case[key] >= 0
        assert case["p50_ms"] <= case["p99_ms"] <= case["max_ms"]
        assert case["messages"] == 200
        v = case["verification"]
        assert v["exactly_once"] is True
        assert v["received"] == v["acked"] == v["produced"] == 400  # warm-up included
        assert v["missing"] == v["duplicated"] == v["pending"] == 0

    assert report["idle_seconds"] == 1
    assert set(report["idle"]) == IDLE_CASES
    for case in report["idle"].values():
        assert case["wall_s"] >= 1
        assert case["cpu_s"] >= 0 and case["cpu_pct"] >= 0
        assert case["xreadgroup_calls"] >= 0
        assert case["loop_reads"] >= 1
