"""The crash suite's SIGKILL and poison scenarios on a three-node Redis Cluster.

The same scenarios as tests/chaos/test_chaos.py (reduced size unless ``--chaos-full``), with the
stream on whichever node its slot lives on and every process given the URL of another node:
consumers SIGKILLed every second lose nothing, poison messages land in ``{chaos}:dead`` on the
stream's node.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

import conveyor
from conveyor._keys import dead_letter_key, heartbeat_key, key_slot
from tests.chaos import test_chaos as base
from tests.chaos.fleet import Fleet
from tests.cluster import migrate_slot

pytestmark = pytest.mark.chaos

STREAM, GROUP = base.STREAM, base.GROUP


def _clear(r: Any) -> None:
    for key in (STREAM, dead_letter_key(STREAM), heartbeat_key(STREAM, GROUP), base.FORWARDED):
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


def test_forwarding_stage_is_exactly_once_on_a_cluster(
    on_cluster: Any, full: bool, tmp_path: Path
) -> None:
    base.test_forwarding_stage_is_exactly_once_through_sigkills(full, tmp_path)


class SteadyProducer(threading.Thread):
    """Appends ``per_tick`` entries every ``tick_s`` with conveyor's Producer on a cluster
    client (redirects followed) until halted; every id it got back is in ``ids``."""

    def __init__(self, url: str, per_tick: int, tick_s: float) -> None:
        super().__init__(daemon=True)
        self.r = conveyor.connect(url, decode_responses=True)
        self.producer = conveyor.Producer(self.r, STREAM)
        self.per_tick, self.tick_s = per_tick, tick_s
        self.ids: list[str] = []
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.halt.wait(self.tick_s):
                rows = [{"n": str(len(self.ids) + i)} for i in range(self.per_tick)]
                self.ids += self.producer.send_many(rows)
        except BaseException as exc:
            self.error = exc
        finally:
            self.r.close()


def test_a_slot_migrated_under_load_loses_nothing(
    on_cluster: Any, full: bool, tmp_path: Path
) -> None:
    """The stream's slot moves to another node key by key (SETSLOT IMPORTING/MIGRATING,
    MIGRATE, SETSLOT NODE) while a producer writes and four workers consume; between the keys
    the slot stays split until the workers have processed more. Every id is accounted for and
    the workers end with exit code 0 on SIGTERM."""
    cluster = on_cluster
    keys_split_for = 3000 if full else 600  # messages read while the slot is split
    with base.scenario("reshard", tmp_path, base.worker_args(delay_ms=2)) as sc:
        producer = SteadyProducer(cluster.urls[0], 10, 0.01)
        sc.start_workers(4)
        producer.start()
        settled = lambda n: base.delivered_fraction(sc.r, producer.ids[:n]) >= 1.0  # noqa: E731

        def between_keys() -> None:
            # the slot is split now: let producer and workers go on until more is processed
            goal = len(producer.ids) + keys_split_for
            base.wait_until(
                lambda: sc.fleet.check_alive() or producer.error or len(producer.ids) >= goal,
                60,
                "the producer to go on while the slot is split",
            )
            base.wait_until(
                lambda: sc.fleet.check_alive() or settled(goal), 60, "workers to keep up"
            )

        slot = key_slot(STREAM)
        source = cluster.node_for_slot(slot)
        migration = migrate_slot(
            cluster, slot, (source + 1) % 3, between_keys=between_keys, batch=1
        )
        after = len(producer.ids) + keys_split_for
        base.wait_until(lambda: len(producer.ids) >= after, 60, "the producer after the move")
        producer.halt.set()
        producer.join(30)
        assert producer.error is None, producer.error
        produced = producer.ids
        base.wait_until(
            lambda: sc.fleet.check_alive() or base.all_settled(sc.r, produced[-1]),
            120,
            "every message settled after the move",
        )
        report, _records = sc.finish(
            produced,
            keys_moved=migration.keys_moved,
            split_s=round(migration.split_s, 2),
            source=source,
            target=cluster.node_for_slot(slot),
        )
    assert cluster.node_for_slot(slot) == (source + 1) % 3
    assert migration.keys_moved >= 2  # the stream and its heartbeats moved while in use
    assert report.unknown_ids == [] and report.empty_messages == []
    assert report.missing == [], f"{len(report.missing)} missing, first {report.missing[:10]}"
    assert report.pending == [] and report.dead_lettered == []
    assert report.processed == len(produced)
