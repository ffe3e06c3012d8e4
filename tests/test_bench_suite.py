"""``python -m bench`` (bench/suite.py) at its --quick sizes: every section and row is reported.

No assertion on speed: only that the whole benchmark runs end to end, reports every row (walrus
and faststream as figures or as not installed), its targets, and refuses bad arguments cleanly.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis
from bench._runs import BenchError, Measured, Run, measure_in_child
from bench.suite_consume import NOT_INSTALLED, Row, format_row, library_installed

from tests.benchrun import ROOT, run_bench

CONSUME_ROWS = {
    "redis_py": "sync",
    "conveyor_run": "sync",
    "conveyor_get_batch": "sync",
    "walrus": "sync",
    "redis_py_async": "asyncio",
    "conveyor_async_run": "asyncio",
    "faststream": "asyncio",
    "stage_ack": "stage",
    "stage_send": "stage",
    "stage_forward": "stage",
}
OPTIONAL_ROWS = {"walrus", "faststream"}
PRODUCE_ROWS = {"redis_py", "conveyor"}
TARGETS = {
    "consumer_run",
    "consumer_get_batch",
    "async_consumer_run",
    "producer",
    "latency_p99",
    "idle_cpu",
    "rss_growth",
}


def _check_rows(section: dict, names: set[str], repeat: int) -> None:
    assert set(section["rows"]) == names
    for key, row in section["rows"].items():
        if not row["installed"]:
            assert key in OPTIONAL_ROWS, key
            assert "pip install" in row["note"]
            continue
        assert len(row["msgs_per_s"]) == len(row["ratios"]) == repeat
        assert all(x > 0 for x in row["msgs_per_s"])
        assert row["ratio_min"] <= row["ratio"] <= row["ratio_max"]
        if row["reference"]:
            assert row["ratios"] == [1.0] * repeat


def test_bench_suite_quick_run() -> None:
    report = run_bench("bench", "--quick", timeout=300)

    settings = report["settings"]
    assert settings["messages"] == 5_000 and settings["repeat"] == 1
    assert settings["rss_messages"] == 20_000 and settings["batch"] == 500

    consume = report["consume"]
    _check_rows(consume, set(CONSUME_ROWS), repeat=1)
    for key, family in CONSUME_ROWS.items():
        assert consume["rows"][key]["family"] == family
    references = [k for k, row in consume["rows"].items() if row["reference"]]
    assert references == ["redis_py", "redis_py_async", "stage_ack"]
    _check_rows(report["produce"], PRODUCE_ROWS, repeat=1)

    assert set(report["latency"]) == {"raw", "conveyor"}
    for case in report["latency"].values():
        assert case["p50_ms"] <= case["p99_ms"]
        assert case["verification"]["exactly_once"] is True
    assert set(report["idle"]) == {"raw", "conveyor"}
    assert report["idle"]["conveyor"]["cpu_pct"] >= 0

    rss = report["rss"]
    assert rss["messages"] == 20_000
    assert rss["first_sample_at"] == 2_000 and rss["end_sample_at"] == 20_000
    assert abs(rss["growth_mb"] - (rss["rss_end_mb"] - rss["rss_first_mb"])) < 0.02

    targets = report["targets"]
    assert {t["key"] for t in targets} == TARGETS
    assert all(t["status"] in ("met", "NOT met") for t in targets)
    assert all(isinstance(t["figure"], float | int) for t in targets)


def test_bench_suite_bad_batch() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--batch", "0"],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "--batch" in lines[0] and "Traceback" not in proc.stderr


def test_missing_optional_libraries_are_rows_that_say_so(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("walrus", "faststream"):
        monkeypatch.setitem(sys.modules, name, None)  # import raises ImportError
    assert library_installed("walrus") is False
    assert library_installed("faststream") is False

    row = Row("walrus", "walrus ConsumerGroup.read() + ack(*ids)", "sync", None)
    assert row.as_dict() == {
        "label": row.label,
        "family": "sync",
        "reference": False,
        "installed": False,
        "note": NOT_INSTALLED,
    }
    assert format_row(row).rstrip().endswith(NOT_INSTALLED)


def _imported_by(module: str) -> set[str]:
    """The optional libraries (and conveyor) that importing ``module`` imports."""
    code = (
        f"import sys, {module}; "
        "print(*sorted({m.partition('.')[0] for m in sys.modules} "
        "& {'conveyor', 'walrus', 'faststream', 'pydantic'}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return set(proc.stdout.split())


def test_the_rows_imports_stay_apart() -> None:
    # a timed child imports bench.suite_consume and then its own row's library only
    assert _imported_by("bench.suite_consume") == set()
    # the main process knows walrus and faststream are installed without importing them
    assert _imported_by("bench.suite") == {"conveyor"}


def _fails(url: str, admin: redis.Redis, run: Run) -> Measured:
    raise BenchError(f"{run.count} read, 0 acked")


def test_a_failure_in_a_child_is_a_bench_error_naming_the_row() -> None:
    run = Run("stream", "group", 10, 10, 50)
    with pytest.raises(BenchError, match=r"^consume: the row: BenchError: 10 read, 0 acked$"):
        measure_in_child(_fails, "redis://localhost:1/0", run, "consume: the row")
