"""The crash suite's SIGKILL and poison scenarios on a three-node Redis Cluster.

The same scenarios as tests/chaos/test_chaos.py (reduced size unless ``--chaos-full``), with the
stream on whichever node its slot lives on and every process given the URL of another node:
consumers SIGKILLed every second lose nothing, poison messages land in ``{chaos}:dead`` on the
stream's node.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import conveyor
from conveyor._keys import dead_letter_key, heartbeat_key, key_slot
from tests.chaos import test_chaos as base
from tests.chaos.fleet import Fleet

pytestmark = pytest.mark.chaos

STREAM, GROUP = base.STREAM, base.GROUP


def _clear(r: Any) -> None:
    for key in (STREAM, dead_letter_key(STREAM), heartbeat_key(STREAM, GROUP)):
        r.delete(key)


@contextlib.contextmanager
def cluster_scenario(
    name: str, tmp_path: Path, args: Sequence[str], *, appendonly: bool = False, cluster: Any
) -> Iterator[base.Scenario]:
    cluster.wait_ok()
    owner = cluster.node_for_key(STREAM)
    elsewhere = [u for i, u in enumerate(cluster.urls) if i != owner]
    r = conveyor.connect(elsewhere[0], decode_responses=True)
    _clear(r)
    fleet = Fleet(tmp_path / "workers", elsewhere[-1], STREAM, GROUP, args)
    try:
        yield base.Scenario(name, None, tmp_path, r, fleet)  # type: ignore[arg-type]
        _where_dead_letters[name] = [
            i for i in range(len(cluster.urls)) if _holds(cluster, i, dead_letter_key(STREAM))
        ]
    finally:
        fleet.close()
        _clear(r)
        r.close()


#: scenario -> the nodes that held the dead-letter stream at its end
_where_dead_letters: dict[str, list[int]] = {}


def _holds(cluster: Any, i: int, key: str) -> bool:
    node = cluster.client(i)
    try:
        return bool(node.execute_command("EXISTS", key))
    except Exception:  # a node that does not own the slot answers MOVED
        return False
    finally:
        node.close()


@pytest.fixture
def on_cluster(cluster: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(base, "scenario", functools.partial(cluster_scenario, cluster=cluster))
    return cluster


def test_sigkill_every_second_on_a_cluster(on_cluster: Any, full: bool, tmp_path: Path) -> None:
    base.test_sigkill_every_second("new", full, tmp_path)


def test_poison_messages_are_dead_lettered_on_the_streams_node(
    on_cluster: Any, full: bool, tmp_path: Path
) -> None:
    base.test_poison_messages_are_dead_lettered_after_three_deliveries(full, tmp_path)
    # the dead-letter stream shares the stream's slot, so it lives on the stream's node
    assert key_slot(dead_letter_key(STREAM)) == key_slot(STREAM)
    assert _where_dead_letters["poison"] == [on_cluster.node_for_key(STREAM)]
