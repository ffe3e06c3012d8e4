"""The plain reader's decisions, driven with scripted replies: where reading starts, what a
batch holds, what a commit writes."""

from __future__ import annotations

import doctest
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor._core import reader as core
from conveyor._core.reader import TURN_BLOCK_MS, Plan, ReaderConfig, ReaderMachine, Round
from conveyor._keys import key_slot
from conveyor.errors import ConfigError, ServerError


def machine(streams: Sequence[str] = ("s",), name: str | None = "n", **kw: Any) -> ReaderMachine:
    cluster = kw.pop("cluster", False)
    return ReaderMachine(ReaderConfig(streams=tuple(streams), name=name, **kw), cluster=cluster)


def drive(plan: Plan[Any], *answers: list[Any]) -> tuple[list[Round], Any]:
    """Run ``plan`` with ``answers`` as the replies of its rounds, in order; every round must
    be answered. Returns the rounds and the plan's result."""
    rounds: list[Round] = []
    try:
        rnd = next(plan)
        for replies in answers:
            rounds.append(rnd)
            rnd = plan.send(replies)
    except StopIteration as done:
        assert len(rounds) == len(answers), "the plan ended before every answer was used"
        return rounds, done.value
    raise AssertionError(f"the plan asked for more: {rnd}")


def xread_reply(stream: str, ids: Sequence[str]) -> list[Any]:
    return [[stream, [[i, ["k", i]] for i in ids]]]


def test_doctests() -> None:
    assert doctest.testmod(core).failed == 0


def test_a_checkpoint_is_where_reading_starts() -> None:
    m = machine(start="0")
    rounds, _ = drive(m.load(), [b"5-1"])
    assert rounds[0].commands == (("GET", "{s}:reader:n"),)
    assert m.position == m.committed == {"s": "5-1"}
    assert m.fresh == {}


def test_dollar_without_a_checkpoint_is_the_last_entry_saved_with_set_nx() -> None:
    m = machine()
    rounds, _ = drive(m.load(), [None], [[["7-3", ["k", "v"]]]], [True, "7-3"])
    assert rounds[1].commands == (("XREVRANGE", "s", "+", "-", "COUNT", 1),)
    assert rounds[2].commands == (("SET", "{s}:reader:n", "7-3", "NX"), ("GET", "{s}:reader:n"))
    assert m.position == m.committed == m.fresh == {"s": "7-3"}


def test_dollar_on_an_empty_or_missing_stream_is_the_beginning() -> None:
    m = machine()
    drive(m.load(), [None], [[]], [True, "0-0"])
    assert m.position == {"s": "0-0"}


def test_a_reader_that_lost_the_set_nx_race_takes_the_stored_value() -> None:
    m = machine(start="0")
    rounds, _ = drive(m.load(), [None], [None, "9-0"])
    assert rounds[1].commands[0] == ("SET", "{s}:reader:n", "0-0", "NX")
    assert m.position == {"s": "9-0"}


def test_an_explicit_start_needs_no_lookup_and_without_a_name_nothing_is_written() -> None:
    m = machine(("a", "b"), name=None, start="1700000000000")
    rounds, _ = drive(m.load())
    assert rounds == []
    assert m.position == m.committed == {"a": "1700000000000-0", "b": "1700000000000-0"}
    assert drive(m.commit({"a": "1700000000001-0"}))[0] == []
    assert m.committed["a"] == "1700000000001-0"


@pytest.mark.parametrize("garbage", [b"hello", "12-x", "-1", "", "99999999999999999999999-0"])
def test_a_checkpoint_that_is_not_an_id_is_an_error_naming_the_key(garbage: Any) -> None:
    m = machine()
    with pytest.raises(ServerError, match=r"checkpoint key '\{s\}:reader:n' holds"):
        drive(m.load(), [garbage])
    assert not m.loaded


def test_a_batch_reads_after_the_position_and_moves_it() -> None:
    m = machine(start="0", batch_size=3, max_wait_ms=250)
    rounds, got = drive(m.batch(), ["2-0"], [xread_reply("s", ["3-0", "4-0"])])
    assert rounds[1].reads
    assert rounds[1].commands == (("XREAD", "COUNT", 3, "BLOCK", 250, "STREAMS", "s", "2-0"),)
    assert [msg.id for msg in got] == ["3-0", "4-0"]
    assert got[0].deliveries == 1 and got[0].fields == {"k": "3-0"}
    assert m.position == {"s": "4-0"} and m.committed == {"s": "2-0"}
    rounds, got = drive(m.batch(), [None])  # nothing came in max_wait_ms
    assert got == [] and rounds[0].commands[0][-1] == "4-0"


def test_a_read_that_fails_moves_nothing() -> None:
    m = machine(start="0")
    drive(m.load(), ["2-0"])
    plan = m.batch()
    next(plan)
    with pytest.raises(ConnectionError):
        plan.throw(ConnectionError("lost"))
    assert m.position == {"s": "2-0"}


def test_several_streams_are_cut_at_batch_size_oldest_first_and_not_moved_past_the_cut() -> None:
    m = machine(("a", "b"), start="0", batch_size=3)
    drive(m.load(), ["0-0", "0-0"])
    reply = xread_reply("a", ["1-0", "4-0", "5-0"]) + xread_reply("b", ["2-0", "3-0", "6-0"])
    rounds, got = drive(m.batch(), [reply])
    assert len(rounds[0].commands) == 1  # one XREAD for both
    assert [(msg.stream, msg.id) for msg in got] == [("a", "1-0"), ("b", "2-0"), ("b", "3-0")]
    assert m.position == {"a": "1-0", "b": "3-0"}


@given(
    st.lists(st.integers(1, 50), min_size=0, max_size=12, unique=True),
    st.lists(st.integers(1, 50), min_size=0, max_size=12, unique=True),
    st.integers(1, 8),
)
def test_every_entry_of_several_streams_comes_once_in_order(
    a_ms: list[int], b_ms: list[int], batch_size: int
) -> None:
    stored = {"a": [f"{t}-0" for t in sorted(a_ms)], "b": [f"{t}-1" for t in sorted(b_ms)]}
    m = machine(("a", "b"), name=None, start="0", batch_size=batch_size)
    drive(m.load())

    def after(s: str) -> list[str]:
        pos = core.cmd.id_order(m.position[s])
        rest = [i for i in stored[s] if core.cmd.id_order(i) > pos]
        return rest[:batch_size]  # XREAD's COUNT is per stream

    got: list[tuple[str, str]] = []
    for _ in range(30):
        reply = [[s, [[i, ["k", "v"]] for i in after(s)]] for s in ("a", "b") if after(s)]
        _, batch = drive(m.batch(), [reply or None])
        assert len(batch) <= batch_size
        if not batch:
            break
        got += [(msg.stream, msg.id) for msg in batch]
    for s in ("a", "b"):
        assert [i for stream, i in got if stream == s] == stored[s]


def cluster_streams() -> tuple[str, str]:
    a = "orders"
    b = next(f"s{i}" for i in range(100) if key_slot(f"s{i}") != key_slot(a))
    return a, b


def test_on_a_cluster_each_slot_is_read_without_blocking_then_waited_on_in_turn() -> None:
    a, b = cluster_streams()
    m = machine((a, b, "{orders}x"), name=None, start="0", max_wait_ms=250, cluster=True)
    assert m.groups == [(a, "{orders}x"), (b,)]
    drive(m.load())
    rounds, got = drive(m.batch(), [None, None], [None], [None], [None])
    assert got == []
    assert rounds[0].commands == (
        ("XREAD", "COUNT", 100, "STREAMS", a, "{orders}x", "0-0", "0-0"),
        ("XREAD", "COUNT", 100, "STREAMS", b, "0-0"),
    )
    waits = [(rnd.commands[0][4], rnd.commands[0][6]) for rnd in rounds[1:]]
    assert waits == [(TURN_BLOCK_MS, a), (TURN_BLOCK_MS, b), (50, a)]  # 250 ms in all


def test_on_a_cluster_a_wait_ends_when_a_slot_delivers() -> None:
    a, b = cluster_streams()
    m = machine((a, b), name=None, start="0", cluster=True)
    drive(m.load())
    rounds, got = drive(m.batch(), [None, None], [None], [xread_reply(b, ["8-0"])])
    assert [msg.id for msg in got] == ["8-0"] and len(rounds) == 3
    assert m.position == {a: "0-0", b: "8-0"}


def test_commit_writes_only_what_changed_and_rewind_goes_back_to_it() -> None:
    m = machine(("a", "b"), start="0")
    drive(m.load(), ["1-0", "1-0"])
    drive(m.batch(), [xread_reply("a", ["2-0", "3-0"])])
    rounds, _ = drive(m.commit(), ["OK"])
    assert rounds[0].commands == (("SET", "{a}:reader:n", "3-0"),)
    assert m.committed == {"a": "3-0", "b": "1-0"}
    assert drive(m.commit())[0] == []  # nothing changed: nothing written
    drive(m.batch(), [xread_reply("a", ["4-0"]) + xread_reply("b", ["5-0"])])
    m.rewind()
    assert m.position == {"a": "3-0", "b": "1-0"}


def test_a_commit_that_fails_changes_nothing() -> None:
    m = machine(start="0")
    drive(m.load(), ["1-0"])
    drive(m.batch(), [xread_reply("s", ["2-0"])])
    plan = m.commit()
    next(plan)
    with pytest.raises(ConnectionError):
        plan.throw(ConnectionError("lost"))
    assert m.committed == {"s": "1-0"}


@pytest.mark.parametrize(
    ("position", "needle"),
    [
        ({"t": "1-0"}, "does not read"),
        ({"s": "x"}, "position of 's' must be a stream id"),
        ({"s": 5}, "position of 's' must be a stream id"),
        (["s"], "position must map"),
    ],
)
def test_a_bad_commit_position_is_a_config_error(position: Any, needle: str) -> None:
    m = machine()
    with pytest.raises(ConfigError, match=needle):
        drive(m.commit(position))


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"streams": ()}, "at least one stream"),
        ({"streams": ("",)}, "stream must be a non-empty str"),
        ({"streams": (b"s",)}, "not bytes"),
        ({"streams": ("s", "s")}, "twice"),
        ({"name": ""}, "name must be a non-empty str"),
        ({"start": "now"}, "start must be"),
        ({"start": 0}, "start must be"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"max_wait_ms": 0}, "use a larger value"),
        ({"max_wait_ms": True}, "max_wait_ms must be an int"),
        ({"encoding": "klingon"}, "encoding"),
    ],
)
def test_config_errors_name_the_argument(kw: dict[str, Any], needle: str) -> None:
    args: dict[str, Any] = {"streams": ("s",), "name": "n", **kw}
    with pytest.raises(ConfigError, match=needle):
        ReaderConfig(**args)
