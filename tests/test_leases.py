"""Leases: what a consumer renews, kept per batch (pure logic, no server)."""

from __future__ import annotations

import threading

from hypothesis import given
from hypothesis import strategies as st

from conveyor._leases import Leases


def test_a_batch_in_and_the_same_batch_out_costs_nothing_per_id() -> None:
    leases = Leases(("s", "t"))
    ids = [f"{i}-0" for i in range(500)]
    leases.hold("s", ids)
    assert leases.renewable() == {"s": ids, "t": []}
    leases.release("s", ids)
    assert leases.renewable() == {"s": [], "t": []}
    assert "s" in leases and "u" not in leases


def test_ids_settled_one_by_one_are_left_out_and_compacted() -> None:
    leases = Leases(("s",))
    first, second = ["1-0", "2-0", "3-0"], ["4-0", "5-0"]
    leases.hold("s", first)
    leases.hold("s", second)
    leases.forget("s", ["2-0", "4-0", "5-0"])
    assert leases.renewable() == {"s": ["1-0", "3-0"]}
    assert leases.count() == 2
    leases.release("s", first)  # the list it was held by, though compacted since
    assert leases.renewable() == {"s": []}
    assert first == ["1-0", "2-0", "3-0"]  # the caller's list is never changed


def test_forgetting_what_is_not_held_leaves_nothing_behind() -> None:
    leases = Leases(("s",))
    leases.forget("s", ["9-0"])
    leases.hold("s", ["1-0"])
    leases.forget("s", ["8-0"])
    assert leases.renewable() == {"s": ["1-0"]}
    assert leases.renewable() == {"s": ["1-0"]}


@given(
    st.lists(
        st.tuples(st.sampled_from(["hold", "release", "forget"]), st.integers(0, 5)), max_size=40
    )
)
def test_renewable_is_exactly_what_is_held_and_not_settled(ops: list[tuple[str, int]]) -> None:
    """Against a model: a set of held ids."""
    leases = Leases(("s",))
    batches = [[f"{b}-{i}" for i in range(3)] for b in range(6)]
    model: set[str] = set()
    for op, b in ops:
        if op == "hold" and not model & set(batches[b]):
            leases.hold("s", batches[b])
            model |= set(batches[b])
        elif op == "release":
            leases.release("s", batches[b])
            model -= set(batches[b])
        elif op == "forget":
            leases.forget("s", batches[b][:1])
            model.discard(batches[b][0])
        assert set(leases.renewable()["s"]) == model


def test_heartbeats_read_while_batches_come_and_go() -> None:
    leases = Leases(("s",))
    stop = threading.Event()
    seen: list[int] = []

    def beat() -> None:
        while not stop.is_set():
            seen.append(len(leases.renewable()["s"]))

    t = threading.Thread(target=beat)
    t.start()
    try:
        for b in range(2000):
            ids = [f"{b}-{i}" for i in range(10)]
            leases.hold("s", ids)
            leases.forget("s", ids[:1])
            leases.release("s", ids)
    finally:
        stop.set()
        t.join()
    assert leases.renewable() == {"s": []}
    assert set(seen) <= {0, 9, 10}  # one batch at a time, whole or less its forgotten id
