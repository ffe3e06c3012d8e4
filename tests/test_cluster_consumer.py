"""The consumer behaviour, recovery and crash suites again, on a three-node Redis Cluster.

Every test of tests/test_consumer.py, tests/test_recovery.py and tests/test_crash.py runs here
with ``redis_url`` naming a cluster node: ``conveyor.connect`` gives a cluster client, the
test's streams land on whichever nodes their names hash to, and a consumer over several
streams reads from several nodes at once.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.test_consumer import *  # noqa: F403
from tests.test_crash import *  # noqa: F403
from tests.test_recovery import *  # noqa: F403


@pytest.fixture
def redis_url(cluster: Any) -> str:
    cluster.wait_ok()
    return str(cluster.urls[1])
