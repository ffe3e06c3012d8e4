"""``conveyor run`` on a Redis Cluster: workers started with the URL of a node that does not own
the stream process everything once and exit 0 on SIGTERM."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

import conveyor
from conveyor import Producer
from tests.cluster import Cluster, wait_for
from tests.test_cli_commands import processes, seen_ids, start, stop, worker_env
from tests.test_cluster import spread

__all__ = ["processes", "worker_env"]  # fixtures, used by name


@pytest.fixture
def redis_url(cluster: Cluster) -> str:
    cluster.wait_ok()
    return str(cluster.urls[2])


def test_conveyor_run_on_a_cluster(
    cluster: Cluster, worker_env: dict[str, str], processes: list[subprocess.Popen[str]]
) -> None:
    stream = next(s for s in spread(cluster) if cluster.node_for_key(s) != 2)
    r: Any = conveyor.connect(cluster.urls[0])
    try:
        ids = Producer(r, stream).send_many([{"n": i} for i in range(300)])
        args = ("-s", stream, "-g", "g", "--concurrency", "2", "--batch-size", "20")
        proc = start(processes, "run", "cli_handlers:handle", *args, "--max-wait-ms", "100",
                     env=worker_env)  # fmt: skip
        wait_for(lambda: len(seen_ids(worker_env)) >= 300, "the workers handled every message")
        wait_for(lambda: r.xpending(stream, "g")["pending"] == 0, "every message acked")
        returncode, err = stop(proc)
        assert returncode == 0, err
        assert sorted(seen_ids(worker_env)) == sorted(ids)  # each exactly once
    finally:
        r.close()
