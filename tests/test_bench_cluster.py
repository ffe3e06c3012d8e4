"""bench/cluster.py at a tiny size: it runs, reports both sides, and checks exactly-once.

No assertion on speed: only that the benchmark works end to end (worker processes, a plain
server and a three-node cluster, the JSON report and its verification).
"""

from __future__ import annotations

import os

from tests.benchrun import run_bench


def test_bench_cluster_tiny_run() -> None:
    report = run_bench("bench.cluster", "--messages", "600", "--repeat", "1", timeout=110)

    assert report["messages"] == 600
    assert report["workers"] == 3
    assert report["streams"] == 6
    assert report["cpu_count"] == os.cpu_count()
    server, cluster = report["results"]["server"], report["results"]["cluster"]
    assert server["nodes"] == 1 and len(server["versions"]) == 1
    assert cluster["nodes"] == 3 and len(cluster["versions"]) == 3
    for side in (server, cluster):
        assert len(side["msgs_per_s"]) == 1
        assert side["median"] > 0
    assert report["ratio"] > 0

    verification = report["verification"]
    assert verification["exactly_once"] is True
    assert verification["acked"] == verification["produced"]
    assert verification["pending"] == 0
    # a warm-up and one round on each side, every one checked on its own
    assert len(report["runs"]) == 4
    for run in report["runs"]:
        v = run["verification"]
        assert v["exactly_once"] is True
        assert v["acked"] == v["produced"] == run["produced"] >= run["messages"] >= 600
        assert v["missing"] == v["duplicated"] == v["pending"] == 0
        assert sum(run["acked_per_worker"]) == run["produced"]
        if run["side"] == "cluster":
            assert run["streams_per_node"] == [2, 2, 2]
