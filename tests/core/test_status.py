"""The monitor's rules without a server: statuses, health, cleanup choices, the grid table of
the redis-streams README character for character, the JSON shape, and the replies the monitor
reads."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conveyor import Snapshot
from conveyor._core import commands as cmd
from conveyor._core import status
from conveyor.errors import ConfigError
from conveyor.models import ConsumerInfo, GroupInfo, StreamInfo, Thresholds

README_THRESHOLDS = Thresholds(batch_size=10, idle_time_ms_warning_threshold=30_000)

#: The redis-streams README's consumers: (id, idle ms, pending, status as printed there).
README_ROWS = [
    ("29102140026848155456", 923, 7, "OK"),
    ("29104139791624517440", 294191, 5, "WARNING - idle for long time"),
    ("29144140168467982144", 361502, 8, "WARNING - idle for long time"),
    ("29304140033034540864", 8658, 11, "WARNING - too many pending items"),
    ("29312139940580673344", 11734, 58, "WARNING - too many pending items"),
    ("29314139867734665024", 14216, 1, "OK"),
]

README_TABLE = """\
+-------------------------+-------------+-----------------+----------------------------------+
|             Consumer id |   Idle time |   Pending items | Status                           |
+=========================+=============+=================+==================================+
| b'29102140026848155456' |         923 |               7 | OK                               |
+-------------------------+-------------+-----------------+----------------------------------+
| b'29104139791624517440' |      294191 |               5 | WARNING - idle for long time     |
+-------------------------+-------------+-----------------+----------------------------------+
| b'29144140168467982144' |      361502 |               8 | WARNING - idle for long time     |
+-------------------------+-------------+-----------------+----------------------------------+
| b'29304140033034540864' |        8658 |              11 | WARNING - too many pending items |
+-------------------------+-------------+-----------------+----------------------------------+
| b'29312139940580673344' |       11734 |              58 | WARNING - too many pending items |
+-------------------------+-------------+-----------------+----------------------------------+
| b'29314139867734665024' |       14216 |               1 | OK                               |
+-------------------------+-------------+-----------------+----------------------------------+"""

CLEAN_TABLE = """\
+----------------------+-------------+-----------------+----------------------------------+
|          Consumer id |   Idle time |   Pending items | Status                           |
+======================+=============+=================+==================================+
| 29102140026848155456 |         923 |               7 | OK                               |
+----------------------+-------------+-----------------+----------------------------------+
| 29104139791624517440 |      294191 |               5 | WARNING - idle for long time     |
+----------------------+-------------+-----------------+----------------------------------+
| 29144140168467982144 |      361502 |               8 | WARNING - idle for long time     |
+----------------------+-------------+-----------------+----------------------------------+
| 29304140033034540864 |        8658 |              11 | WARNING - too many pending items |
+----------------------+-------------+-----------------+----------------------------------+
| 29312139940580673344 |       11734 |              58 | WARNING - too many pending items |
+----------------------+-------------+-----------------+----------------------------------+
| 29314139867734665024 |       14216 |               1 | OK                               |
+----------------------+-------------+-----------------+----------------------------------+"""


def readme_snapshot() -> Snapshot:
    consumers = tuple(
        status.build_consumer(
            cmd.ConsumerReply(name, pending, idle, None),
            "g",
            {},
            1_700_000_000_000,
            README_THRESHOLDS,
        )
        for name, idle, pending, _ in README_ROWS
    )
    group = GroupInfo("g", pending=90, last_delivered_id="0-0", consumers_count=6)
    group = GroupInfo(**{**group_fields(group), "consumers": consumers})
    return Snapshot(1_700_000_000_000, StreamInfo("s", 100), (group,), README_THRESHOLDS)


def group_fields(g: GroupInfo) -> dict[str, Any]:
    return {f: getattr(g, f) for f in GroupInfo.__slots__}


def test_the_rules_give_the_readme_statuses() -> None:
    snap = readme_snapshot()
    assert [c.status for c in snap.consumers] == [row[3] for row in README_ROWS]


def test_the_readme_table_character_for_character() -> None:
    assert readme_snapshot().table(names_as_bytes=True) == README_TABLE


def test_the_clean_table_shows_names_as_text_with_the_same_grid() -> None:
    assert readme_snapshot().table() == CLEAN_TABLE


def test_names_that_are_not_numbers_are_left_aligned() -> None:
    consumers = [
        ConsumerInfo("worker-1", "g", idle_ms=5, pending=0, status="OK"),
        ConsumerInfo("w2", "g", idle_ms=12345, pending=3, status=status.DEAD),
    ]
    assert status.consumer_table(consumers) == (
        "+---------------+-------------+-----------------+----------+\n"
        "| Consumer id   |   Idle time |   Pending items | Status   |\n"
        "+===============+=============+=================+==========+\n"
        "| worker-1      |           5 |               0 | OK       |\n"
        "+---------------+-------------+-----------------+----------+\n"
        "| w2            |       12345 |               3 | DEAD     |\n"
        "+---------------+-------------+-----------------+----------+"
    )


def test_an_empty_table_keeps_the_grid() -> None:
    assert status.consumer_table([]) == (
        "+---------------+-------------+-----------------+----------+\n"
        "| Consumer id   | Idle time   | Pending items   | Status   |\n"
        "+===============+=============+=================+==========+\n"
        "+---------------+-------------+-----------------+----------+"
    )


def test_names_with_control_characters_cannot_break_the_grid() -> None:
    text = status.consumer_table([ConsumerInfo("a\nb", "g", idle_ms=1, pending=0, status="OK")])
    assert "| a\\nb " in text
    assert len({len(line) for line in text.splitlines()}) == 1


def test_names_as_bytes_shows_undecodable_bytes_as_the_server_has_them() -> None:
    name = b"\xff-w".decode("utf-8", "surrogateescape")
    text = status.consumer_table(
        [ConsumerInfo(name, "g", idle_ms=1, pending=0, status="OK")], names_as_bytes=True
    )
    assert "| b'\\xff-w' " in text


@pytest.mark.parametrize(
    ("idle", "pending", "beat_age", "expected"),
    [
        (0, 0, None, status.OK),
        (30_000, 10, None, status.OK),  # thresholds are exclusive, as in redis-streams
        (30_001, 0, None, status.IDLE),
        (0, 11, None, status.TOO_MANY_PENDING),
        (30_001, 11, None, status.IDLE),  # idle wins over pending
        (0, 11, 15_001, status.DEAD),  # dead wins over everything
        (30_001, 0, 15_001, status.DEAD),
        (0, 0, 15_000, status.OK),
        (10**9, 0, None, status.IDLE),  # no heartbeat: never DEAD, only idle
    ],
)
def test_status_rules_and_their_precedence(
    idle: int, pending: int, beat_age: int | None, expected: str
) -> None:
    assert status.consumer_status(idle, pending, beat_age, README_THRESHOLDS) == expected


def test_heartbeat_age_comes_from_the_hash_and_server_time() -> None:
    reply = cmd.ConsumerReply("w1", 0, 5, 7)
    beats = {"w1": "1000", "other": "1"}
    c = status.build_consumer(reply, "g", beats, 20_000, README_THRESHOLDS)
    assert c.heartbeat_age_ms == 19_000 and c.status == status.DEAD and c.inactive_ms == 7
    assert (
        status.build_consumer(
            reply, "g", {"w1": "junk"}, 20_000, README_THRESHOLDS
        ).heartbeat_age_ms
        is None
    )


@pytest.mark.parametrize(
    "garbage", ["\u00b2", "\u0661\u0662", "abc", "", "12:x", "1:", ":5", "-5", " 5", "9" * 40]
)
def test_a_heartbeat_other_clients_garbled_is_ignored(garbage: str) -> None:
    reply = cmd.ConsumerReply("w1", 3, 50_000, None)
    c = status.build_consumer(reply, "g", {"w1": garbage}, 20_000, README_THRESHOLDS)
    assert (c.heartbeat_age_ms, c.status) == (None, status.IDLE)  # by idle time, never DEAD


def test_a_heartbeat_from_the_far_future_is_ignored() -> None:
    reply = cmd.ConsumerReply("w1", 0, 5, None)
    now_ms = 1_700_000_000_000
    soon = status.build_consumer(
        reply, "g", {"w1": f"{now_ms + 5_000}:900"}, now_ms, README_THRESHOLDS
    )
    assert soon.heartbeat_age_ms == 0  # a clock a little ahead, after a failover
    later = status.build_consumer(
        reply, "g", {"w1": "99999999999999999"}, now_ms, README_THRESHOLDS
    )
    assert later.heartbeat_age_ms is None and later.status == status.OK


def test_pending_age_comes_from_the_id_time_part() -> None:
    assert status.pending_age_ms("1700000000000-5", 1_700_000_001_500) == 1500
    assert status.pending_age_ms("1700000009999-0", 1_700_000_000_000) == 0  # clock skew
    assert status.pending_age_ms("42-0", 1_700_000_000_000) is None
    assert status.pending_age_ms(None, 1) is None


def group_reply(lag: int | None, pending: int = 0) -> cmd.GroupReply:
    return cmd.GroupReply("g", 1, pending, "5-0", None if lag is None else 3, lag)


def test_lag_falls_back_to_the_count_and_says_so() -> None:
    stream = StreamInfo("s", 10)
    exact = status.build_group(group_reply(4), stream, (), None, 0, counted_lag=99)
    assert (exact.lag, exact.lag_estimated) == (4, False)
    counted = status.build_group(group_reply(None), stream, (), None, 0, counted_lag=6)
    assert (counted.lag, counted.lag_estimated, counted.trimmed_undelivered) == (6, True, False)
    unknown = status.build_group(group_reply(None), stream, (), None, 0)
    assert unknown.lag is None and not unknown.lag_estimated


def test_a_lag_above_the_length_means_trimmed_undelivered_entries() -> None:
    short = StreamInfo("s", 3, last_generated_id="9-0")
    assert status.needs_count(group_reply(8), short)
    g = status.build_group(group_reply(8), short, (), None, 0, counted_lag=3)
    assert (g.trimmed_undelivered, g.lag, g.lag_estimated) == (True, 3, True)
    assert not status.needs_count(group_reply(3), short)
    full = status.build_group(group_reply(3), short, (), None, 0)
    assert (full.trimmed_undelivered, full.lag) == (False, 3)


def test_a_group_that_was_handed_the_last_entry_has_no_lag() -> None:
    # Redis 7.0 keeps reporting a lag after undelivered entries were trimmed
    stream = StreamInfo("s", 3, last_generated_id="5-0")
    assert status.caught_up(group_reply(5), stream)
    assert not status.needs_count(group_reply(None), stream)
    g = status.build_group(group_reply(5), stream, (), None, 0)
    assert (g.lag, g.lag_estimated, g.trimmed_undelivered) == (0, False, False)
    later = StreamInfo("s", 3, last_generated_id="5-10")
    assert not status.caught_up(cmd.GroupReply("g", 0, 0, "5-9", None, 1), later)


def test_oldest_pending_entry_figures() -> None:
    oldest = ("1700000000000-0", "w1", 2500, 3)
    g = status.build_group(group_reply(0, 1), StreamInfo("s", 3), (), oldest, 1_700_000_004_000)
    assert (g.oldest_pending_id, g.oldest_pending_age_ms, g.oldest_pending_idle_ms) == (
        "1700000000000-0",
        4000,
        2500,
    )


def consumer(name: str, state: str, pending: int = 0, beat: int | None = 10) -> ConsumerInfo:
    return ConsumerInfo(name, "g", idle_ms=0, pending=pending, status=state, heartbeat_age_ms=beat)


def group_of(*consumers: ConsumerInfo, **kw: Any) -> GroupInfo:
    fields: dict[str, Any] = {"pending": 0, "last_delivered_id": "0-0", "consumers_count": 0}
    fields.update(kw)
    return GroupInfo("g", consumers=consumers, **fields)


def verdict(*groups: GroupInfo, length: int = 100, **thresholds: Any) -> tuple[int, str]:
    h = status.health(StreamInfo("s", length), groups, Thresholds(**thresholds))
    return h.code, " / ".join(h.reasons)


def test_health_codes() -> None:
    assert verdict(group_of(consumer("a", status.OK))) == (0, "")
    code, why = verdict(group_of(consumer("a", status.IDLE)))
    assert code == 1 and "'a': WARNING - idle for long time" in why
    code, why = verdict(group_of(consumer("a", status.DEAD, pending=3, beat=99_000)))
    assert code == 2 and "'a' is DEAD" in why and "owns 3 pending" in why
    assert verdict(group_of(consumer("a", status.DEAD, pending=0)))[0] == 0
    code, why = verdict(group_of(lag=8, trimmed_undelivered=True), length=3)
    assert code == 2 and "trimmed" in why
    live = consumer("a", status.OK)
    code, why = verdict(group_of(live, lag=1001), max_lag=1000)
    assert code == 2 and "above max_lag 1000" in why
    assert verdict(group_of(live, lag=1000), max_lag=1000)[0] == 0


def test_a_backlog_without_a_live_consumer_is_a_warning_and_critical_past_max_lag() -> None:
    code, why = verdict(group_of(lag=5))
    assert code == 1 and why == "group 'g': 5 entries wait (lag) and no live consumer reads them"
    dead = consumer("a", status.DEAD, beat=99_000)
    assert verdict(group_of(dead, lag=5))[0] == 1  # a dead consumer reads nothing
    assert verdict(group_of(dead, lag=5), max_lag=4)[0] == 2
    code, why = verdict(group_of(lag=3, lag_estimated=True))
    assert code == 1 and "about 3 entries wait" in why
    # a consumer of another library (no heartbeats) serves while it keeps reading
    reading = ConsumerInfo("java", "g", idle_ms=10, pending=0, status=status.OK)
    assert verdict(group_of(reading, lag=5))[0] == 0
    gone = ConsumerInfo("java", "g", idle_ms=60_000, pending=0, status=status.IDLE)
    assert "no live consumer" in verdict(group_of(gone, lag=5))[1]
    # nothing waits, or nobody can tell: no finding
    assert verdict(group_of(lag=0))[0] == 0
    assert verdict(group_of(lag=None))[0] == 0


def test_the_default_batch_size_is_the_consumers() -> None:
    from conveyor.config import ConsumerConfig
    from conveyor.monitor import DEFAULT_BATCH_SIZE

    default = ConsumerConfig(streams=("s",), group="g", consumer="c").batch_size
    assert Thresholds().batch_size == DEFAULT_BATCH_SIZE == default == 100
    assert status.unknown("stream 's' does not exist").code == 3


def test_old_pending_entries_are_a_warning() -> None:
    old = group_of(oldest_pending_id="1-0", oldest_pending_age_ms=40_000)
    code, why = verdict(old, pending_age_ms_warning_threshold=30_000)
    assert code == 1 and "1-0 is 40000 ms old" in why
    by_idle = group_of(oldest_pending_id="1-1", oldest_pending_idle_ms=40_000)
    assert verdict(by_idle, pending_age_ms_warning_threshold=30_000)[0] == 1
    assert verdict(old, pending_age_ms_warning_threshold=60_000)[0] == 0


def test_critical_reasons_come_before_warnings() -> None:
    g = group_of(consumer("a", status.IDLE), consumer("b", status.DEAD, pending=1))
    h = status.health(StreamInfo("s", 9), [g], Thresholds())
    assert h.status == "CRITICAL" and "DEAD" in h.reasons[0] and "idle" in h.reasons[1]


def test_cleanup_touches_only_the_dead_and_the_idle_without_heartbeats() -> None:
    t = Thresholds(idle_time_ms_warning_threshold=1000)
    g = group_of(
        consumer("live", status.IDLE),  # live heartbeat: never removed, even idle
        consumer("dead", status.DEAD, pending=2, beat=99_000),
        ConsumerInfo("java-idle", "g", idle_ms=5000, pending=0, status=status.IDLE),
        ConsumerInfo("java-busy", "g", idle_ms=10, pending=0, status=status.OK),
    )
    assert status.removable(g, t) == ["dead", "java-idle"]
    assert [c.name for c in g.consumers if status.is_live(c)] == ["live"]
    assert status.least_loaded({"b": 2, "a": 2, "c": 0}) == "c"


def test_thresholds_are_validated() -> None:
    with pytest.raises(ConfigError, match="batch_size must be >= 1"):
        status.make_thresholds(
            batch_size=0,
            idle_time_ms_warning_threshold=1,
            heartbeat_ms=50,
            max_lag=None,
            pending_age_ms_warning_threshold=None,
        )
    t = status.make_thresholds(
        batch_size=3,
        idle_time_ms_warning_threshold=700,
        heartbeat_ms=50,
        max_lag=None,
        pending_age_ms_warning_threshold=None,
    )
    assert (t.heartbeat_timeout_ms, t.pending_age_ms_warning_threshold) == (150, 700)


def test_snapshot_json_round_trip_and_shape() -> None:
    snap = readme_snapshot()
    text = snap.to_json()
    assert Snapshot.from_json(text) == snap
    data = json.loads(text)
    assert data["version"] == 1 and set(data) == {
        "version",
        "time_ms",
        "stream",
        "groups",
        "thresholds",
    }
    (group,) = data["groups"]
    assert group["consumers"][0] == {
        "name": "29102140026848155456",
        "group": "g",
        "idle_ms": 923,
        "inactive_ms": None,
        "pending": 7,
        "heartbeat_age_ms": None,
        "status": "OK",
    }


def test_a_snapshot_with_several_groups_names_each() -> None:
    a = group_of(consumer("x", status.OK))
    b = GroupInfo("h", 0, "0-0", 1, consumers=(ConsumerInfo("y", "h", 1, 0, status.OK),))
    snap = Snapshot(0, StreamInfo("s", 0), (a, b), Thresholds())
    text = snap.table()
    assert text.startswith("group g:\n+") and "\n\ngroup h:\n+" in text
    assert "| y " in snap.table("h") and "| x " not in snap.table("h")
    with pytest.raises(ValueError, match="2 groups"):
        snap.group()


# ---------------------------------------------------------------------------------------------
# Replies the monitor reads: bytes or str, RESP2 lists or RESP3 maps, Redis 6.2 / 7.0 / 7.2+


def b(x: Any) -> Any:
    if isinstance(x, str):
        return x.encode()
    if isinstance(x, list):
        return [b(i) for i in x]
    if isinstance(x, dict):
        return {b(k): b(v) for k, v in x.items()}
    return x


def resp3(flat: list[Any]) -> dict[Any, Any]:
    it = iter(flat)
    return dict(zip(it, it, strict=True))


STREAM_70 = [
    "length", 4, "radix-tree-keys", 1, "radix-tree-nodes", 2,
    "last-generated-id", "9-4", "max-deleted-entry-id", "9-4", "entries-added", 5,
    "recorded-first-entry-id", "9-0", "groups", 2,
    "first-entry", ["9-0", ["n", "0"]], "last-entry", ["9-3", ["n", "3"]],
]  # fmt: skip
STREAM_62 = [
    "length", 0, "radix-tree-keys", 0, "radix-tree-nodes", 1, "last-generated-id", "0-0",
    "groups", 0, "first-entry", None, "last-entry", None,
]  # fmt: skip


@pytest.mark.parametrize("shape", [lambda x: x, b, resp3, lambda x: b(resp3(x))])
def test_xinfo_stream_in_every_shape(shape: Any) -> None:
    assert cmd.parse_xinfo_stream(shape(STREAM_70), "s") == StreamInfo(
        "s", 4, "9-0", "9-3", "9-4", 5, "9-4"
    )
    assert cmd.parse_xinfo_stream(shape(STREAM_62), "s") == StreamInfo("s", 0, None, None, "0-0")


GROUPS = [
    ["name", "g", "consumers", 1, "pending", 2, "last-delivered-id", "9-1", "entries-read", 2,
     "lag", None],
    ["name", "h", "consumers", 0, "pending", 0, "last-delivered-id", "9-2", "entries-read", 3,
     "lag", 1],
    ["name", "old", "consumers", 0, "pending", 0, "last-delivered-id", "0-0"],  # Redis 6.2
]  # fmt: skip


@pytest.mark.parametrize("shape", [lambda x: x, b, resp3, lambda x: b(resp3(x))])
def test_xinfo_groups_in_every_shape(shape: Any) -> None:
    groups = cmd.parse_xinfo_groups([shape(g) for g in GROUPS])
    assert [(g.name, g.consumers, g.pending, g.last_delivered_id) for g in groups] == [
        ("g", 1, 2, "9-1"),
        ("h", 0, 0, "9-2"),
        ("old", 0, 0, "0-0"),
    ]
    assert [(g.entries_read, g.lag) for g in groups] == [(2, None), (3, 1), (None, None)]


@pytest.mark.parametrize("shape", [lambda x: x, b, resp3, lambda x: b(resp3(x))])
def test_xinfo_consumers_with_and_without_inactive(shape: Any) -> None:
    rows = [
        ["name", "c1", "pending", 2, "idle", 15, "inactive", 9],
        ["name", "c2", "pending", 0, "idle", 7],
        ["name", "c3", "pending", 0, "idle", 3, "inactive", -1],
    ]
    parsed = cmd.parse_xinfo_consumers([shape(r) for r in rows])
    assert [(c.name, c.pending, c.idle_ms, c.inactive_ms) for c in parsed] == [
        ("c1", 2, 15, 9),
        ("c2", 0, 7, None),
        ("c3", 0, 3, -1),
    ]


def test_small_replies() -> None:
    assert cmd.parse_time_ms([b"1700000000", b"123456"]) == 1_700_000_000_123
    assert cmd.parse_xpending_oldest([[b"5-0", b"w1", 12, 3]]) == ("5-0", "w1", 12, 3)
    assert cmd.parse_xpending_oldest([]) is None
    assert cmd.parse_text_hash([b"w1", b"100"]) == {"w1": "100"}
    assert cmd.parse_text_hash({"w1": "100"}) == {"w1": "100"}
    assert cmd.id_time_ms("1700000000000-3") == 1_700_000_000_000
