"""DeadLetters and AsyncDeadLetters: list, replay and purge a dead-letter stream, on a real
server, with clients of every kind (bytes or str replies, RESP2 or RESP3)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis

import conveyor
from conveyor import AsyncDeadLetters, ConfigError, ConnectionLost, DeadLetter, DeadLetters
from conveyor._core.commands import parse_dead_letters
from conveyor._core.scripts import DEAD_LETTER
from conveyor._keys import dead_letter_key
from conveyor.deadletter import PAGE_SIZE, matching

Fields = dict[str, str]


def dead_letter(
    r: redis.Redis,
    stream: str,
    rows: Sequence[Fields],
    *,
    group: str = "billing",
    error: str = "boom",
    deliveries: int = 3,
    dead: str | None = None,
) -> list[str]:
    """Do what a consumer that gives up does: read ``rows`` as consumer "c" of ``group`` and
    move each to the dead-letter stream. Returns the rows' ids on ``stream``."""
    ids = [r.xadd(stream, dict(row)).decode() for row in rows]
    try:
        r.xgroup_create(stream, group, "0")
    except redis.ResponseError as exc:
        assert "BUSYGROUP" in str(exc)
    r.xreadgroup(group, "c", {stream: ">"})
    target = dead or dead_letter_key(stream)
    for entry_id, row in zip(ids, rows, strict=True):
        flat = [x for kv in row.items() for x in kv]
        moved = r.eval(
            DEAD_LETTER, 2, stream, target, group, "c", entry_id, deliveries, error, *flat
        )
        assert moved == 1
    return ids


def own_fields(r: redis.Redis, stream: str) -> list[dict[bytes, bytes]]:
    return [fields for _, fields in r.xrange(stream)]


# -- one suite, both twins, clients of every kind ---------------------------------------------

CLIENTS = {
    "bytes": {},
    "str": {"decode_responses": True},
    "resp3": {"protocol": 3},
    "resp3-str": {"protocol": 3, "decode_responses": True},
}


class Twins:
    """Builds DeadLetters (sync) or AsyncDeadLetters driven through an event loop, with the
    same method names, on a client of the kind asked for."""

    def __init__(self, kind: str, url: str, options: dict[str, Any]) -> None:
        self.kind = kind
        if kind == "sync":
            self.client: Any = conveyor.connect(url, **options)
            self.loop = None
        else:
            self.client = conveyor.connect(url, asyncio=True, **options)
            self.loop = asyncio.new_event_loop()

    def __call__(self, stream: str, **kw: Any) -> Any:
        if self.kind == "sync":
            return DeadLetters(self.client, stream, **kw)
        return _Blocking(AsyncDeadLetters(self.client, stream, **kw), self.loop)

    def close(self) -> None:
        if self.loop is None:
            self.client.close()
        else:
            self.loop.run_until_complete(self.client.aclose())
            self.loop.close()


class _Blocking:
    def __init__(self, target: AsyncDeadLetters, loop: Any) -> None:
        self.target = target
        self.loop = loop
        self.dead_letter = target.dead_letter

    def __getattr__(self, attr: str) -> Callable[..., Any]:
        method = getattr(self.target, attr)
        return lambda *args, **kw: self.loop.run_until_complete(method(*args, **kw))


@pytest.fixture(params=["sync", "async"])
def twins(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Twins]:
    t = Twins(request.param, redis_url, {})
    yield t
    t.close()


@pytest.fixture(params=[(k, c) for k in ("sync", "async") for c in CLIENTS], ids=str)
def any_client(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Twins]:
    kind, client = request.param
    t = Twins(kind, redis_url, CLIENTS[client])
    yield t
    t.close()


def test_list_parses_provenance(any_client: Twins, r: redis.Redis, name: Any) -> None:
    stream = name("orders")
    ids = dead_letter(r, stream, [{"order_id": "1", "amount": "9.5"}, {"order_id": "2"}])
    dead = any_client(stream)

    letters = dead.list()

    assert dead.count() == 2
    assert [d.origin_id for d in letters] == ids
    first = letters[0]
    assert first.fields == {"order_id": "1", "amount": "9.5"}
    assert first.origin_stream == stream
    assert (first.group, first.consumer, first.deliveries, first.error) == (
        "billing",
        "c",
        3,
        "boom",
    )
    assert first.time_ms > 1_600_000_000_000
    assert first.time is not None and first.time.tzinfo is not None
    assert first.replayable
    assert first.to_dict()["fields"] == {"order_id": "1", "amount": "9.5"}


def test_replay_puts_the_fields_back_and_removes_the_entry(
    any_client: Twins, r: redis.Redis, name: Any
) -> None:
    stream = name("orders")
    rows = [{"order_id": "1", "amount": "9.5"}, {"order_id": "2"}]
    dead_letter(r, stream, rows)
    before = own_fields(r, stream)
    dead = any_client(stream)

    result = dead.replay()

    assert (result.scanned, result.matched, result.replayed) == (2, 2, 2)
    assert (result.skipped, result.failed, result.dry_run) == (0, 0, False)
    after = r.xrange(stream)
    assert [fields for _, fields in after] == before + before  # originals, then the replayed
    assert [i.decode() for i, _ in after[2:]] == list(result.new_ids)
    assert dead.count() == 0


def test_list_pages_with_after(twins: Twins, r: redis.Redis, name: Any) -> None:
    stream = name("orders")
    dead_letter(r, stream, [{"n": str(i)} for i in range(5)])
    dead = twins(stream)

    first = dead.list(count=2)
    rest = dead.list(count=10, after=first[-1].id)

    assert [d.fields["n"] for d in first + rest] == ["0", "1", "2", "3", "4"]


def test_bytes_fields_with_encoding_none(twins: Twins, r: redis.Redis, name: Any) -> None:
    stream = name("orders")
    dead_letter(r, stream, [{"order_id": "1"}])
    r.xadd(dead_letter_key(stream), {b"raw": b"\xff\xfe"})

    letters = twins(stream, encoding=None).list()

    assert letters[0].fields == {b"order_id": b"1"}
    assert letters[1].fields == {b"raw": b"\xff\xfe"}
    assert letters[1].to_dict()["fields"] == {"raw": "\udcff\udcfe"}


def test_undecodable_bytes_are_replayed_byte_for_byte(
    twins: Twins, r: redis.Redis, name: Any
) -> None:
    stream = name("orders")
    dead_letter(r, stream, [{"order_id": "1"}])
    fields = r.xrange(dead_letter_key(stream))[0][1]
    provenance = {k: v for k, v in fields.items() if k.startswith(b"conveyor.")}
    r.xadd(dead_letter_key(stream), {b"raw": b"\xff\xfe", **provenance})

    result = twins(stream).replay()

    assert result.replayed == 2
    assert own_fields(r, stream)[-1] == {b"raw": b"\xff\xfe"}


def test_filters_choose_what_is_replayed(twins: Twins, r: redis.Redis, name: Any) -> None:
    stream = name("orders")
    dead_letter(r, stream, [{"n": "1"}], error="read timeout", group="billing")
    ids = dead_letter(r, stream, [{"n": "2"}, {"n": "3"}], error="bad amount", group="audit")
    dead = twins(stream)

    by_error = dead.replay(where=matching(error_contains="timeout"), dry_run=True)
    by_group = dead.replay(where=matching(group="audit"), dry_run=True)
    by_id = dead.replay(where=lambda d: d.origin_id == ids[1])

    assert (by_error.matched, by_error.replayed, by_error.dry_run) == (1, 1, True)
    assert (by_group.matched, by_group.scanned) == (2, 3)
    assert (by_id.matched, by_id.replayed) == (1, 1)
    assert own_fields(r, stream)[-1] == {b"n": b"3"}
    assert [d.fields["n"] for d in dead.list()] == ["1", "2"]


def test_before_ms_and_origin_ids(twins: Twins, r: redis.Redis, name: Any) -> None:
    stream = name("orders")
    ids = dead_letter(r, stream, [{"n": "1"}, {"n": "2"}])
    dead = twins(stream)
    letters = dead.list()
    newest = max(d.time_ms for d in letters)

    assert dead.replay(where=matching(before_ms=newest + 1), dry_run=True).matched == 2
    assert dead.replay(where=matching(before_ms=1), dry_run=True).matched == 0
    only = matching(origin_ids=[ids[0]], before_ms=newest + 1)
    assert dead.purge(where=only) == 1
    assert [d.origin_id for d in dead.list()] == [ids[1]]


def test_dry_run_changes_nothing(twins: Twins, r: redis.Redis, name: Any) -> None:
    stream = name("orders")
    dead_letter(r, stream, [{"n": "1"}, {"n": "2"}])
    before = (r.xrange(stream), r.xrange(dead_letter_key(stream)))
    dead = twins(stream)

    replay = dead.replay(dry_run=True)
    purged = dead.purge(dry_run=True)
    some = dead.purge(where=matching(group="billing"), dry_run=True)

    assert (replay.replayed, replay.new_ids, purged, some) == (2, (), 2, 2)
    assert (r.xrange(stream), r.xrange(dead_letter_key(stream))) == before


def test_limit_replays_the_oldest(twins: Twins, r: redis.Redis, name: Any) -> None:
    stream = name("orders")
    dead_letter(r, stream, [{"n": str(i)} for i in range(4)])
    dead = twins(stream)

    result = dead.replay(limit=3)

    assert (result.scanned, result.replayed) == (3, 3)
    assert [d.fields["n"] for d in dead.list()] == ["3"]


def test_purge_with_and_without_a_filter(twins: Twins, r: redis.Redis, name: Any) -> None:
    stream = name("orders")
    dead_letter(r, stream, [{"n": "1"}], group="billing")
    dead_letter(r, stream, [{"n": "2"}, {"n": "3"}], group="audit")
    dead = twins(stream)

    assert dead.purge(where=matching(group="audit")) == 2
    assert [d.group for d in dead.list()] == ["billing"]
    assert dead.purge() == 1
    assert dead.count() == 0
    assert dead.purge() == 0
    assert r.exists(stream) == 1  # the origin stream is never touched


def test_an_entry_without_provenance_is_listed_and_skipped(
    twins: Twins, r: redis.Redis, name: Any
) -> None:
    stream = name("orders")
    dead_letter(r, stream, [{"n": "1"}])
    foreign_id = r.xadd(dead_letter_key(stream), {"written": "by hand"}).decode()
    dead = twins(stream)

    letters = dead.list()
    result = dead.replay()

    foreign = letters[1]
    assert foreign == DeadLetter(foreign_id, {"written": "by hand"})
    assert (foreign.origin_stream, foreign.deliveries, foreign.time_ms, foreign.time) == (
        None,
        0,
        0,
        None,
    )
    assert not foreign.replayable
    assert (result.scanned, result.matched, result.replayed, result.skipped) == (2, 2, 1, 1)
    assert [d.id for d in dead.list()] == [foreign_id]


def test_a_refused_xadd_keeps_the_entry(twins: Twins, r: redis.Redis, name: Any) -> None:
    stream = name("orders")
    dead_letter(r, stream, [{"n": "1"}])
    r.delete(stream)
    r.set(stream, "not a stream")

    result = twins(stream).replay()

    assert (result.matched, result.replayed, result.failed) == (1, 0, 1)
    assert r.xlen(dead_letter_key(stream)) == 1


def test_a_named_dead_letter_stream(twins: Twins, r: redis.Redis, name: Any) -> None:
    stream, dead_name = name("orders"), name("graveyard")
    dead_letter(r, stream, [{"n": "1"}], dead=dead_name)

    dead = twins(stream, dead_letter=dead_name)

    assert dead.dead_letter == dead_name
    assert dead.replay().replayed == 1
    assert r.xlen(stream) == 2 and r.xlen(dead_name) == 0


def test_replay_and_purge_go_page_by_page(twins: Twins, r: redis.Redis, name: Any) -> None:
    stream = name("orders")
    dead_letter(r, stream, [{"n": "first"}])
    template = r.xrange(dead_letter_key(stream))[0][1]
    with r.pipeline(transaction=False) as pipe:
        for i in range(PAGE_SIZE * 2):
            pipe.xadd(dead_letter_key(stream), {**template, b"n": str(i).encode()})
        pipe.execute()
    total = PAGE_SIZE * 2 + 1
    seen: list[tuple[int, int]] = []
    dead = twins(stream)

    result = dead.replay(
        where=lambda d: d.fields["n"] != "7", on_progress=lambda *a: seen.append(a)
    )

    assert (result.scanned, result.matched, result.replayed) == (total, total - 1, total - 1)
    assert seen == [(PAGE_SIZE, total), (PAGE_SIZE * 2, total), (total, total)]
    assert r.xlen(stream) == 1 + total - 1
    assert [d.fields["n"] for d in dead.list()] == ["7"]


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_lost_connection_says_how_far_a_replay_got(kind: str, name: Any) -> None:
    twins = Twins(kind, "redis://127.0.0.1:1/0", {})
    dead = twins(name("orders"))
    try:
        with pytest.raises(ConnectionLost, match="replay stopped after 0 entries were replayed"):
            dead.replay()
        with pytest.raises(ConnectionLost, match=r"127\.0\.0\.1:1"):
            dead.count()
    finally:
        twins.close()


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda d: d.list(count=0), "count"),
        (lambda d: d.list(after="latest"), "after"),
        (lambda d: d.replay(limit=0), "limit"),
        (lambda d: d.replay(where="timeout"), "where"),
        (lambda d: d.replay(dry_run="yes"), "dry_run"),
        (lambda d: d.purge(on_progress=5), "on_progress"),
    ],
)
def test_bad_arguments_name_the_argument(
    twins: Twins, name: Any, call: Callable[[Any], Any], argument: str
) -> None:
    with pytest.raises(ConfigError, match=argument):
        call(twins(name("orders")))


def test_bad_constructor_arguments(r: redis.Redis, redis_url: str) -> None:
    with pytest.raises(ConfigError, match="stream"):
        DeadLetters(r, "")
    with pytest.raises(ConfigError, match="dead_letter"):
        DeadLetters(r, "orders", dead_letter="")
    with pytest.raises(ConfigError, match="encoding"):
        DeadLetters(r, "orders", encoding="no-such-codec")
    with pytest.raises(ConfigError, match="AsyncDeadLetters"):
        DeadLetters(conveyor.connect(redis_url, asyncio=True), "orders")
    with pytest.raises(ConfigError, match="DeadLetters"):
        AsyncDeadLetters(r, "orders")
    with pytest.raises(ConfigError, match="not supported"):
        DeadLetters(object(), "orders")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"before_ms": -1}, "before_ms"),
        ({"group": ""}, "group"),
        ({"origin_ids": "1-0"}, "origin_ids"),
        ({"origin_ids": ["x"]}, "origin_ids"),
        ({"error_contains": 5}, "error_contains"),
    ],
)
def test_bad_filters_name_the_argument(kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ConfigError, match=argument):
        matching(**kwargs)


def test_no_criterion_matches_everything() -> None:
    assert matching() is None


# -- parsing, without a server ----------------------------------------------------------------


@pytest.mark.parametrize("as_bytes", [False, True])
@pytest.mark.parametrize("resp3_map", [False, True])
def test_parse_entries_in_every_shape(as_bytes: bool, resp3_map: bool) -> None:
    flat: list[Any] = ["order_id", "42", "conveyor.origin_stream", "orders"]
    flat += ["conveyor.origin_id", "1-0", "conveyor.deliveries", "x", "conveyor.time", "5"]
    if as_bytes:
        flat = [x.encode() for x in flat]
    fields: Any = dict(zip(flat[::2], flat[1::2], strict=True)) if resp3_map else flat
    entry_id: Any = b"9-0" if as_bytes else "9-0"

    [(letter, own)] = parse_dead_letters([[entry_id, fields]], "utf-8")

    assert letter == DeadLetter("9-0", {"order_id": "42"}, "orders", "1-0", time_ms=5)
    assert letter.deliveries == 0  # not a number: unknown
    assert own == flat[:2]
    assert parse_dead_letters(None, "utf-8") == []
