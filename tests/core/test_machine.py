"""The consumer's decisions, driven with an injected clock and scripted replies."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor._core import scripts
from conveyor._core.machine import ConsumerMachine
from conveyor.config import ConsumerConfig
from conveyor.errors import ConfigError
from conveyor.models import Message


def machine(**kw: Any) -> ConsumerMachine:
    kw.setdefault("streams", ("s",))
    return ConsumerMachine(ConsumerConfig(group="g", consumer="c", **kw))


EMPTY_RECLAIM = ["0-0", [], [], [], []]


def skip_reclaim(m: ConsumerMachine, now_ms: int) -> None:
    """Answer the reclaim round that opens a consumer's first batch: nothing to take."""
    plan = m.next_read(now_ms)
    assert plan is not None and plan.kind == "reclaim"
    m.feed(plan, [EMPTY_RECLAIM] * len(plan.commands), now_ms)


def entries(stream: str, first: int, n: int) -> list[Any]:
    return [[stream, [[f"{i}-0", ["n", str(i)]] for i in range(first, first + n)]]]


def test_own_pending_entries_come_first_with_their_delivery_counts() -> None:
    m = machine(batch_size=10)
    m.begin_batch(now_ms=0)
    plan = m.next_read(now_ms=0)
    assert plan is not None and plan.pending and plan.block_ms is None
    read, pending = plan.commands
    assert read[-1] == "0" and pending[0] == "XPENDING"
    m.feed(
        plan, [entries("s", 1, 3), [["1-0", "c", 9, 2], ["2-0", "c", 9, 2], ["3-0", "c", 9, 5]]], 1
    )
    # fewer than asked: the own pending list is exhausted; a reclaim round, then new entries
    skip_reclaim(m, now_ms=1)
    plan = m.next_read(now_ms=1)
    assert plan is not None and not plan.pending
    assert plan.commands[0][-1] == ">" and plan.block_ms == 999
    m.feed(plan, [None], 1000)
    assert m.next_read(now_ms=1000) is None
    assert [(x.id, x.deliveries) for x in m.end_batch()] == [("1-0", 2), ("2-0", 2), ("3-0", 5)]


def test_a_full_pending_page_continues_after_its_last_id() -> None:
    m = machine(batch_size=2)
    m.begin_batch(0)
    plan = m.next_read(0)
    assert plan is not None
    m.feed(plan, [entries("s", 1, 2), []], 0)
    assert m.next_read(0) is None  # batch full
    assert len(m.end_batch()) == 2
    m.begin_batch(0)
    plan = m.next_read(0)
    assert plan is not None and plan.pending and plan.commands[0][-1] == "2-0"
    assert plan.commands[1][3] == "(2-0"


def test_batch_returns_when_full_without_waiting() -> None:
    m = machine(batch_size=3)
    m.begin_batch(0)
    plan = m.next_read(0)
    assert plan is not None
    m.feed(plan, [None, []], 0)
    skip_reclaim(m, 0)
    plan = m.next_read(0)
    assert plan is not None
    m.feed(plan, [entries("s", 1, 3)], 5)
    assert m.next_read(5) is None and len(m.end_batch()) == 3


def test_partial_batch_keeps_blocking_for_the_rest_of_the_wait() -> None:
    m = machine(batch_size=10, max_wait_ms=500)
    m.begin_batch(0)
    plan = m.next_read(0)
    assert plan is not None
    m.feed(plan, [None, []], 0)
    skip_reclaim(m, 0)
    plan = m.next_read(0)
    assert plan is not None
    m.feed(plan, [entries("s", 1, 4)], 200)
    plan = m.next_read(200)
    assert plan is not None and plan.block_ms == 300 and plan.commands[0][5] == 6  # COUNT left
    m.feed(plan, [None], 500)
    assert m.next_read(500) is None and len(m.end_batch()) == 4


def test_zero_wait_is_refused_it_would_spin() -> None:
    with pytest.raises(ConfigError, match=r"max_wait_ms must be at least 1.*linger_ms=0"):
        machine(max_wait_ms=0)


def new_reply(stream: str, *ids: str) -> list[Any]:
    return [[stream, [[i, ["k", "v"]] for i in ids]]]


def test_linger_zero_returns_as_soon_as_anything_arrived() -> None:
    m = machine(max_wait_ms=5_000, linger_ms=0, start="$")
    m.group_recreated()
    m.begin_batch(0)
    skip_reclaim(m, 0)
    plan = m.next_read(0)
    assert plan is not None and plan.block_ms == 5_000  # idle: blocks on the server
    m.feed(plan, [new_reply("s", "1-0")], 40)
    assert m.next_read(40) is None  # no wait to fill the batch
    assert [msg.id for msg in m.end_batch()] == ["1-0"]


def test_linger_waits_that_long_after_the_first_message_to_fill() -> None:
    m = machine(max_wait_ms=5_000, linger_ms=20, start="$")
    m.group_recreated()
    m.begin_batch(0)
    skip_reclaim(m, 0)
    plan = m.next_read(0)
    assert plan is not None
    m.feed(plan, [new_reply("s", "1-0")], 100)
    plan = m.next_read(100)
    assert plan is not None and plan.block_ms == 20
    m.feed(plan, [new_reply("s", "2-0")], 110)
    plan = m.next_read(110)
    assert plan is not None and plan.block_ms == 10
    m.feed(plan, [None], 120)
    assert m.next_read(120) is None
    assert len(m.end_batch()) == 2


def test_without_linger_a_batch_waits_to_fill_until_max_wait() -> None:
    m = machine(max_wait_ms=5_000, start="$")
    m.group_recreated()
    m.begin_batch(0)
    skip_reclaim(m, 0)
    plan = m.next_read(0)
    assert plan is not None
    m.feed(plan, [new_reply("s", "1-0")], 100)
    plan = m.next_read(100)
    assert plan is not None and plan.block_ms == 4_900


def test_lost_reply_goes_back_to_the_own_pending_list() -> None:
    m = machine()
    m.group_recreated()
    m.begin_batch(0)
    skip_reclaim(m, 0)
    plan = m.next_read(0)
    assert plan is not None and not plan.pending
    m.reply_lost()
    m.begin_batch(0)
    plan = m.next_read(0)
    # Read again without adding a delivery: no handler saw what the lost reply carried.
    assert plan is not None and plan.pending and plan.kind == "reread"
    assert plan.commands[0][1] == scripts.REREAD and plan.commands[0][-2:] == ("-", 100)


def test_a_start_reads_the_own_pending_list_counting_a_delivery() -> None:
    m = machine()
    m.begin_batch(0)
    plan = m.next_read(0)
    assert plan is not None and plan.kind == "pending" and plan.commands[0][0] == "XREADGROUP"


def test_deleted_pending_entries_are_dropped_and_counted() -> None:
    m = machine()
    m.begin_batch(0)
    plan = m.next_read(0)
    assert plan is not None
    m.feed(plan, [[["s", [["1-0", None], ["2-0", ["a", "b"]]]]], []], 0)
    assert m.take_drops() == [("s", "1-0")] and m.take_drops() == []
    assert m.deleted_count == 1


@given(
    n_streams=st.integers(1, 5),
    batch_size=st.integers(1, 50),
    available=st.lists(st.integers(0, 60), min_size=5, max_size=5),
)
def test_several_streams_never_overfill_a_batch(
    n_streams: int, batch_size: int, available: list[int]
) -> None:
    streams = tuple(f"s{i}" for i in range(n_streams))
    m = machine(streams=streams, batch_size=batch_size, max_wait_ms=100)
    m.group_recreated()
    left = dict(zip(streams, available, strict=False))
    next_id = 0
    m.begin_batch(0)
    now = 0
    skip_reclaim(m, now)
    while (plan := m.next_read(now)) is not None:
        read = plan.commands[0]
        count = read[5]
        names = list(plan.streams)
        reply = []
        for s in names:
            k = min(count, left[s])
            left[s] -= k
            reply.append([s, [[f"{next_id + i}-0", ["a", "b"]] for i in range(k)]])
            next_id += k
        now += 10
        m.feed(plan, [reply or None], now)
    assert len(m.end_batch()) <= batch_size


# -- read-ahead ----------------------------------------------------------------------------------


def started(batch_size: int = 3, **kw: Any) -> ConsumerMachine:
    """A machine past its first batch's own pending read and reclaim round."""
    m = machine(batch_size=batch_size, **kw)
    m.begin_batch(0)
    plan = m.next_read(0)
    assert plan is not None
    m.feed(plan, [None, []], 0)
    skip_reclaim(m, 0)
    return m


def test_the_read_ahead_is_the_next_batchs_read_of_new_entries_and_never_blocks() -> None:
    m = started(batch_size=3, max_wait_ms=500)
    plan = m.next_read(0)
    assert plan is not None and plan.kind == "new"
    assert m.fills([entries("s", 1, 3)]) and not m.fills([entries("s", 1, 2)])
    m.feed(plan, [entries("s", 1, 3)], 10)
    ahead = m.read_ahead(10)
    assert ahead is not None and ahead.kind == "new" and ahead.block_ms is None
    assert ahead.commands[0][:6] == ("XREADGROUP", "GROUP", "g", "c", "COUNT", 3)
    assert "BLOCK" not in ahead.commands[0]
    assert [msg.id for msg in m.end_batch()] == ["1-0", "2-0", "3-0"]
    # the next batch began when the read ahead went out: its wait counts from then
    m.begin_batch(10)
    m.feed(ahead, [entries("s", 4, 1)], 400)
    plan = m.next_read(400)
    assert plan is not None and plan.block_ms == 110 and plan.commands[0][5] == 2


def test_no_read_ahead_when_the_next_batch_begins_otherwise() -> None:
    m = machine(batch_size=3)
    assert m.read_ahead(0) is None  # own pending list to read first
    m = started(batch_size=3, heartbeat_ms=1000, claim_idle_ms=3000, retry_backoff_ms=100)
    assert m.read_ahead(999) is not None
    assert m.read_ahead(1000) is None  # a reclaim round is due
    m.retry_later(Message("s", "9-0", {"n": "9"}, 1), now_ms=0)
    assert m.read_ahead(99) is not None
    assert m.read_ahead(100) is None  # a failed message's retry is due first


def test_count_entries_counts_without_parsing() -> None:
    from conveyor._core.commands import count_entries

    assert count_entries(None) == 0
    assert count_entries(ValueError("x")) == 0
    assert count_entries(entries("s", 1, 3) + entries("t", 1, 2)) == 5
    assert count_entries({"s": [["1-0", ["a", "b"]]], "t": None}) == 1


def test_noack_reads_only_new_entries_with_noack_and_never_reads_ahead() -> None:
    m = machine(batch_size=3, max_wait_ms=500, noack=True)
    m.begin_batch(0)
    plan = m.next_read(0)  # no own pending list to re-read, no reclaim round: new entries
    assert plan is not None and plan.kind == "new"
    assert plan.commands[0][:9] == (
        "XREADGROUP",
        "GROUP",
        "g",
        "c",
        "COUNT",
        3,
        "BLOCK",
        500,
        "NOACK",
    )
    m.feed(plan, [entries("s", 1, 3)], 10)
    assert [msg.deliveries for msg in m.end_batch()] == [1, 1, 1]
    assert m.read_ahead(10) is None  # what it read would be nobody's pending entry
    m.reply_lost()  # what the lost reply delivered is gone: nothing to re-read
    m.begin_batch(20)
    plan = m.next_read(10**12)
    assert plan is not None and plan.kind == "new" and "NOACK" in plan.commands[0]


def test_noack_refuses_a_handler_time_limit_and_a_non_bool() -> None:
    with pytest.raises(ConfigError, match="handler_timeout_ms does not go with noack=True"):
        machine(noack=True, handler_timeout_ms=1000)
    with pytest.raises(ConfigError, match="noack must be True or False, got 'yes'"):
        machine(noack="yes")


def test_a_batch_in_hand_waits_at_most_a_heartbeat_period_for_the_rest() -> None:
    # Its entries are not renewed before it is handed out: with a max_wait_ms longer than
    # claim_idle_ms they would look idle to the other consumers' reclaim.
    m = started(batch_size=100, max_wait_ms=60_000, claim_idle_ms=3_000, heartbeat_ms=1_000)
    plan = m.next_read(0)
    assert plan is not None and plan.block_ms == 60_000  # nothing in hand: the whole wait
    m.feed(plan, [entries("s", 1, 1)], 200)
    plan = m.next_read(200)
    assert plan is not None and plan.block_ms == 1_000
    m.feed(plan, [entries("s", 2, 1)], 700)
    plan = m.next_read(700)
    assert plan is not None and plan.block_ms == 500  # counted from the first entry in hand
    m.feed(plan, [], 1_200)
    assert m.next_read(1_200) is None
    assert [msg.id for msg in m.end_batch()] == ["1-0", "2-0"]
