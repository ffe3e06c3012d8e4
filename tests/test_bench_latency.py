"""bench/latency.py at a tiny size: it runs, reports every case, and checks exactly-once.

No assertion on speed: only that the benchmark works end to end (the producer thread, the four
consumer loops, the idle children, the JSON report and its verification).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LATENCY_CASES = {"raw", "conveyor", "conveyor_no_linger", "async"}
IDLE_CASES = {"raw", "conveyor"}


def test_bench_latency_tiny_run() -> None:
    cmd = [sys.executable, "-m", "bench.latency", "--seconds", "1", "--rate", "200"]
    cmd += ["--idle-seconds", "1", "--json"]
    binary = os.environ.get("CONVEYOR_TEST_SERVER")
    if binary:
        cmd += ["--server-binary", binary]
    proc = subprocess.run(
        cmd,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)

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
