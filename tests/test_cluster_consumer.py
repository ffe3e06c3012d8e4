"""The consumer behaviour, recovery and crash suites again, on a three-node Redis Cluster.

Every test of tests/test_consumer.py, tests/test_recovery.py, tests/test_crash.py and
tests/test_forward.py, and those of tests/test_idempotent.py but the fault proxy's, run here
with ``redis_url`` naming a cluster node: ``conveyor.connect`` gives a cluster client, the
test's streams land on whichever nodes their names hash to, and a consumer over several
streams reads from several nodes at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from conveyor._keys import key_slot
from conveyor.errors import ConfigError
from tests.conftest import Drivers
from tests.test_consumer import *  # noqa: F403
from tests.test_crash import *  # noqa: F403
from tests.test_forward import *  # noqa: F403
from tests.test_idempotent import (  # noqa: F401
    test_a_key_is_forgotten_after_the_window,
    test_a_key_of_another_type_refuses_the_whole_chunk,
    test_a_repeated_key_adds_nothing_and_answers_the_first_id,
    test_bad_keys_are_refused_before_anything_is_sent,
    test_send_many_adds_each_new_key_once_across_and_within_chunks,
)
from tests.test_recovery import *  # noqa: F403
from tests.test_recovery import fill, pending


@pytest.fixture
def redis_url(cluster: Any) -> str:
    cluster.wait_ok()
    return str(cluster.urls[1])


def test_a_forward_across_slots_is_refused_naming_both_streams_and_slots(
    drivers: Drivers, r: Any, name: Callable[[str], str]
) -> None:
    s, elsewhere = name("s"), name("other")
    assert key_slot(s) != key_slot(elsewhere)
    fill(r, s, 1)
    c = drivers.consumer(s, "g", max_wait_ms=30)
    (msg,) = c.get_batch()
    with pytest.raises(ConfigError) as caught:
        c.forward(msg, elsewhere, {"a": "1"})
    text = str(caught.value)
    assert f"{s!r} (slot {key_slot(s)})" in text
    assert f"{elsewhere!r} (slot {key_slot(elsewhere)})" in text
    assert "'{orders}:in' -> '{orders}:out'" in text
    assert pending(r, s) == 1  # nothing sent
    assert len(c.forward(msg, "{" + s + "}:out", {"a": "1"})) == 1
