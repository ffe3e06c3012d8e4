"""Bounded fuzzing of what conveyor reads from outside: server replies, heartbeat values other
clients may write, stream ids users type, and Redis URLs (no server, nothing dialled).

Each property runs a few hundred examples (the whole file takes seconds), so it runs in CI with
the rest. Whatever a server, a broken proxy or another client sends, a parser returns
well-formed values or raises a ConveyorError; never an IndexError, TypeError or
UnicodeDecodeError from deep inside.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote, unquote_plus

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

import conveyor
from conveyor._core import commands as cmd
from conveyor._core import status
from conveyor._core.reader import parse_stream_id
from conveyor.config import ConsumerConfig, check_encoding, is_stream_id
from conveyor.connection import redact_url
from conveyor.errors import ConfigError, ConveyorError, ServerError
from conveyor.models import PROVENANCE_FIELDS, ConsumerInfo, Message, Thresholds

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: for properties over whole replies, whose examples take longest to build
FUZZ_REPLIES = settings(FUZZ, max_examples=120)

#: the largest number a stream id part can hold (Redis parses them as unsigned 64-bit)
MAX_ID_PART = 2**64 - 1

#: the encodings a consumer may be given, and None (bytes)
ENCODINGS = ["utf-8", "latin-1", "ascii", None]


def _text(raw: bytes, encoding: str | None) -> str:
    """``raw`` as a connection decodes it (undecodable bytes as surrogate escapes)."""
    return raw.decode(encoding or "utf-8", "surrogateescape")


def _raw(value: Any, encoding: str | None) -> bytes:
    """The bytes a parsed value came from: the surrogate escapes undone."""
    if isinstance(value, bytes):
        return value
    return str(value).encode(encoding or "utf-8", "surrogateescape")


def assert_well_formed(msg: Any, encoding: str | None) -> None:
    """A Message as a user gets it: text stream and id, fields all str or all bytes."""
    assert isinstance(msg, Message)
    assert type(msg.stream) is str and type(msg.id) is str, msg
    assert type(msg.deliveries) is int and msg.deliveries >= 0, msg
    assert isinstance(msg.fields, dict) and msg.fields, msg
    kind = bytes if encoding is None else str
    assert all(type(k) is kind and type(v) is kind for k, v in msg.fields.items()), msg


# -- XREADGROUP, XAUTOCLAIM and XPENDING replies -----------------------------------------------

#: stream ids: what a server makes, explicit ones, and the largest there are
IDS = st.one_of(
    st.builds(lambda ms, seq: f"{ms}-{seq}", st.integers(0, 2**48), st.integers(0, 50)),
    st.builds(
        lambda ms, seq: f"{ms}-{seq}",
        st.integers(0, MAX_ID_PART),
        st.integers(0, MAX_ID_PART),
    ),
    st.sampled_from(["0-0", "0-1", f"{MAX_ID_PART}-{MAX_ID_PART}"]),
)
#: field names and values: text, empty, and bytes no encoding can decode
RAW = st.one_of(
    st.binary(max_size=12),
    st.text(max_size=8).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"\xff\xfe", b"\xed\xa0\x80", b"\x80", b"\x00", "Zoë".encode()]),
)
STREAM_NAMES = st.text(
    st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=8
) | st.sampled_from(["orders", "{orders}:dead", "Zoë"])


@dataclass
class Entry:
    id: str
    #: (name, value) pairs as stored; None: deleted while pending (the server sends nil)
    pairs: list[tuple[bytes, bytes]] | None
    #: the server sends an empty field list for it instead of nil
    empty: bool = False
    #: the last value is missing (a broken proxy, never a server)
    odd: bool = False


@dataclass
class ReadReply:
    """An XREADGROUP reply and what it holds."""

    reply: Any
    encoding: str | None
    streams: list[tuple[str, list[Entry] | None]]
    names: dict[Any, str] = field(default_factory=dict)

    @property
    def odd(self) -> bool:
        return any(e.odd and e.pairs for _, entries in self.streams for e in entries or ())


@st.composite
def entries(draw: st.DrawFn, *, odd: bool) -> list[Entry]:
    out = []
    for msg_id in draw(st.lists(IDS, max_size=6)):
        if draw(st.integers(0, 5)) == 0:
            out.append(Entry(msg_id, None, empty=draw(st.booleans())))
            continue
        pairs = draw(st.lists(st.tuples(RAW, RAW), min_size=1, max_size=4))
        out.append(Entry(msg_id, pairs, odd=odd and draw(st.integers(0, 3)) == 0))
    return out


def _flat(e: Entry, field_kind: str, encoding: str | None, as_map: bool) -> Any:
    """An entry's field list as a connection hands it over."""
    if e.pairs is None:
        return ({} if as_map else []) if e.empty else None
    items: list[Any] = [x for pair in e.pairs for x in pair]
    if e.odd:
        items.pop()
    if field_kind == "str":
        items = [_text(x, encoding) for x in items]
    if as_map:
        it = iter(items)
        return dict(zip(it, it, strict=True))
    return items


@st.composite
def read_replies(draw: st.DrawFn, *, odd: bool = False) -> ReadReply:
    encoding = draw(st.sampled_from(ENCODINGS))
    # One connection decodes all of a reply or none of it; names and ids may come back as bytes
    # while the fields were decoded (a client with other settings).
    kinds = st.sampled_from(["str", "bytes"])
    name_kind, id_kind, field_kind = draw(kinds), draw(kinds), draw(kinds)
    resp3 = draw(st.booleans())
    # RESP3 sends an entry's fields as an array too; a map (a proxy's translation) can hold no
    # name twice, nor a name without a value
    as_map = resp3 and not odd and draw(st.booleans())
    streams = [
        (name, draw(st.none() | entries(odd=odd)))
        for name in draw(st.lists(STREAM_NAMES, min_size=1, max_size=3, unique=True))
    ]
    names: dict[Any, str] = {}
    per_stream = []
    for name, stream_entries in streams:
        raw_name: Any = name.encode("utf-8", "surrogateescape") if name_kind == "bytes" else name
        if draw(st.booleans()):  # a stream the caller did not name: its name as text
            names[raw_name] = name
        rows = None
        if stream_entries is not None:
            rows = [
                [
                    e.id.encode() if id_kind == "bytes" else e.id,
                    _flat(e, field_kind, encoding, as_map),
                ]
                for e in stream_entries
            ]
        per_stream.append((raw_name, rows))
    if as_map:  # what a map keeps of a name given twice: its last value
        for _, stream_entries in streams:
            for e in stream_entries or ():
                if e.pairs is not None:
                    e.pairs = list(dict(e.pairs).items())
    reply: Any = dict(per_stream) if resp3 else [list(p) for p in per_stream]
    return ReadReply(reply, encoding, streams, names)


def _expected_fields(e: Entry, encoding: str | None) -> dict[Any, Any]:
    assert e.pairs is not None
    if encoding is None:
        return dict(e.pairs)
    return {_text(k, encoding): _text(v, encoding) for k, v in e.pairs}


@FUZZ_REPLIES
@given(read_replies(), st.booleans())
def test_read_replies_give_back_their_entries_in_order(case: ReadReply, by_id: bool) -> None:
    deliveries: Any = {e.id: 3 for _, es in case.streams for e in es or ()} if by_id else 1
    result = cmd.parse_read(case.reply, case.names, case.encoding, deliveries)

    expected = [
        Message(name, e.id, _expected_fields(e, case.encoding), 3 if by_id else 1)
        for name, es in case.streams
        for e in es or ()
        if e.pairs is not None
    ]
    for msg in result.messages:
        assert_well_formed(msg, case.encoding)
    assert result.messages == expected
    assert result.deleted == [
        (name, e.id) for name, es in case.streams for e in es or () if e.pairs is None
    ]
    assert result.counts == {name: len(es or ()) for name, es in case.streams}
    assert result.last_ids == {name: es[-1].id for name, es in case.streams if es}
    assert cmd.count_entries(case.reply) == len(result.messages) + len(result.deleted)
    # Undecodable bytes survive as surrogate escapes: the stored bytes come back exactly.
    stored = [e.pairs for _, es in case.streams for e in es or () if e.pairs is not None]
    for msg, pairs in zip(result.messages, stored, strict=True):
        back = {_raw(k, case.encoding): _raw(v, case.encoding) for k, v in msg.fields.items()}
        assert back == dict(pairs or ())


@FUZZ_REPLIES
@given(read_replies(odd=True), st.booleans())
def test_a_malformed_read_reply_is_a_conveyor_error(case: ReadReply, by_id: bool) -> None:
    deliveries: Any = {} if by_id else 1
    try:
        result = cmd.parse_read(case.reply, case.names, case.encoding, deliveries)
    except ConveyorError as exc:
        assert case.odd, exc
        assert isinstance(exc, ServerError) and "\n" not in str(exc)
        return
    assert not case.odd, "an entry with a field name and no value parsed without complaint"
    for msg in result.messages:
        assert_well_formed(msg, case.encoding)


@pytest.mark.parametrize("encoding", ["utf-8", None])
@pytest.mark.parametrize(
    "flat",
    [["a"], ["a", "1", "b"], [b"a"], [b"a", b"1", b"b"]],
    ids=["one-str", "three-str", "one-bytes", "three-bytes"],
)
def test_an_entry_with_an_odd_field_list_is_refused_in_every_shape(
    flat: list[Any], encoding: str | None
) -> None:
    # Found by the fuzzing above: the fast path dropped the lone name, the converting one
    # raised a bare ValueError from zip(strict=True).
    for reply in ([["s", [["1-0", flat]]]], {"s": [["1-0", flat]]}):
        with pytest.raises(ServerError, match="odd number"):
            cmd.parse_read(reply, {"s": "s"}, encoding)
        with pytest.raises(ServerError, match="odd number"):
            cmd.parse_read(reply, {"s": "s"}, encoding, {"1-0": 2})
    with pytest.raises(ServerError, match="odd number"):
        cmd.convert_fields(flat, encoding)
    with pytest.raises(ServerError, match="odd number"):
        cmd.parse_xautoclaim(["0-0", [["1-0", flat]], []], "s", encoding)


@FUZZ_REPLIES
@given(
    st.sampled_from(ENCODINGS),
    st.sampled_from(["str", "bytes"]),
    st.lists(st.tuples(IDS, st.lists(st.tuples(RAW, RAW), max_size=3)), max_size=6),
    st.lists(IDS, max_size=3),
    st.booleans(),
    IDS,
)
def test_autoclaim_replies_of_every_server(
    encoding: str | None,
    kind: str,
    claimed: list[tuple[str, list[tuple[bytes, bytes]]]],
    deleted: list[str],
    redis_62: bool,
    cursor: str,
) -> None:
    def atom(x: bytes) -> Any:
        return x if kind == "bytes" else _text(x, encoding)

    rows = [
        [atom(i.encode()), [atom(x) for pair in pairs for x in pair] or None]
        for i, pairs in claimed
    ]
    reply: list[Any] = [atom(cursor.encode()), rows]
    if not redis_62:
        reply.append([atom(i.encode()) for i in deleted])
    result = cmd.parse_xautoclaim(reply, "s", encoding)

    assert result.cursor == cursor
    for msg in result.messages:
        assert_well_formed(msg, encoding)
    live = [(i, pairs) for i, pairs in claimed if pairs]
    assert [m.id for m in result.messages] == [i for i, _ in live]
    for msg, (_, pairs) in zip(result.messages, live, strict=True):
        assert {_raw(k, encoding): _raw(v, encoding) for k, v in msg.fields.items()} == dict(pairs)
    gone = [i for i, pairs in claimed if not pairs]
    assert sorted(result.deleted) == sorted(gone + ([] if redis_62 else deleted))


@FUZZ
@given(
    st.lists(
        st.tuples(IDS, st.text(max_size=5), st.integers(0, 2**40), st.integers(0, 2**31)),
        max_size=8,
        unique_by=lambda row: row[0],
    ),
    st.booleans(),
)
def test_pending_counts_by_id(rows: list[tuple[str, str, int, int]], raw: bool) -> None:
    reply = [
        [i.encode() if raw else i, c.encode() if raw else c, idle, n] for i, c, idle, n in rows
    ]
    counts = cmd.parse_pending_counts(reply or None)
    assert counts == {i: n for i, _, _, n in rows}
    assert all(type(k) is str for k in counts)


@FUZZ
@given(st.one_of(st.binary(max_size=30), st.text(max_size=30), st.integers(), IDS))
def test_parse_id_is_always_text_that_gives_back_the_bytes(atom: Any) -> None:
    text = cmd.parse_id(atom)
    assert type(text) is str
    if isinstance(atom, bytes):
        assert text.encode("utf-8", "surrogateescape") == atom


# -- dead-letter entries, which any client may have written --------------------------------

PROVENANCE_NAMES = st.sampled_from([*PROVENANCE_FIELDS, cmd.PACKED_FIELDS])
GARBAGE = st.one_of(
    RAW,
    st.sampled_from([b"-1", b"1e3", b"\xc2\xb2", b"99999999999999999999999", b"*3\r\n$1\r\na"]),
    st.lists(RAW, max_size=5).map(cmd.pack_fields),
)


@FUZZ_REPLIES
@given(
    st.lists(
        st.tuples(IDS, st.lists(st.tuples(PROVENANCE_NAMES | RAW, GARBAGE), max_size=6)),
        max_size=5,
    ),
    st.sampled_from(ENCODINGS),
    st.booleans(),
)
def test_dead_letters_written_by_anyone_parse(
    rows: list[tuple[str, list[tuple[Any, bytes]]]], encoding: str | None, text: bool
) -> None:
    def atom(x: Any) -> Any:
        raw = x.encode() if isinstance(x, str) else x
        return _text(raw, encoding) if text else raw

    reply = [[atom(i), [atom(x) for pair in pairs for x in pair]] for i, pairs in rows]
    try:
        letters = cmd.parse_dead_letters(reply, encoding)
    except ConveyorError:
        return
    assert [letter.id for letter, _ in letters] == [i for i, _ in rows]
    kind = bytes if encoding is None else str
    for letter, own in letters:
        assert all(type(k) is kind and type(v) is kind for k, v in letter.fields.items())
        assert len(own) % 2 == 0
        assert letter.deliveries >= 0 and letter.time_ms >= 0


# -- heartbeat values and consumer status ----------------------------------------------------

BEATS = st.one_of(
    st.text(max_size=40),
    st.text("0123456789:-.e+ ", max_size=40),
    st.builds(
        lambda a, b: f"{a}:{b}",
        st.integers(-(2**70), 2**70) | st.floats(allow_nan=True),
        st.integers(-(2**70), 2**70) | st.floats() | st.just(""),
    ),
    st.sampled_from(
        ["", ":", "::", "1:2:3", "\u0661\u0662\u0663", "²", "1700000000000:", ":15000", "0:0"]
    ),
)


@FUZZ
@given(BEATS | st.none())
def test_a_heartbeat_value_is_read_or_ignored_never_raises(value: str | None) -> None:
    beat = status.parse_beat(value)
    if beat is None:
        return
    beat_ms, timeout_ms = beat
    assert type(beat_ms) is int and 0 <= beat_ms < 10**18
    assert timeout_ms is None or (type(timeout_ms) is int and 0 < timeout_ms < 10**18)
    assert value is not None and re.fullmatch(r"[0-9]+(:[0-9]+)?", value)


@FUZZ
@given(
    BEATS,
    st.text(min_size=1, max_size=8),
    st.integers(0, 2**62),
    st.integers(0, 2**31),
    st.integers(0, 2**62),
    st.one_of(st.none(), IDS, st.text(max_size=20)),
)
def test_consumer_status_from_garbage_beats(
    beat: str, name: str, idle_ms: int, pending: int, now_ms: int, oldest: str | None
) -> None:
    thresholds = Thresholds()
    reply = cmd.ConsumerReply(name, pending, idle_ms, None)
    info = status.build_consumer(reply, "g", {name: beat}, now_ms, thresholds)
    assert isinstance(info, ConsumerInfo) and info.status in status.STATUSES
    assert info.heartbeat_age_ms is None or info.heartbeat_age_ms >= 0
    age = status.pending_age_ms(oldest, now_ms)
    assert age is None or age >= 0


def test_an_id_of_unusual_digits_has_no_age() -> None:
    # Found by the fuzzing above: "²".isdigit() is True but int("²") raises.
    assert cmd.id_time_ms("²-0") == 0
    assert status.pending_age_ms("\u0661\u0667" + "\u0660" * 11 + "-0", 1_700_000_000_000) is None


# -- stream ids ------------------------------------------------------------------------------

ID_TEXT = st.one_of(
    st.text(max_size=25),
    st.text("0123456789-", max_size=25),
    IDS,
    st.builds(str, st.integers(0, 2**70)),
    st.sampled_from(["5-", "-5", "5--1", "²", "\u0663-1", "1 ", " 1", "1\n", "+1", "0x1", "1-2-3"]),
)
#: what Redis takes as a stream id (XADD, XGROUP CREATE ...): digits, parts of 64 bits
REDIS_ID = re.compile(r"([0-9]+)(?:-([0-9]+))?")


def _redis_accepts(text: str) -> bool:
    match = REDIS_ID.fullmatch(text)
    return match is not None and all(int(p) <= MAX_ID_PART for p in match.groups("0"))


@FUZZ
@given(ID_TEXT)
@example("5-")
@example("²")
@example(f"{2**64}-0")
def test_config_takes_exactly_the_ids_redis_takes(text: str) -> None:
    assert is_stream_id(text) is _redis_accepts(text)
    assert (parse_stream_id(text) is not None) is _redis_accepts(text)
    if _redis_accepts(text):
        ConsumerConfig(streams=("s",), group="g", consumer="c", start=text)
    else:
        with pytest.raises(ConfigError, match="start"):
            ConsumerConfig(streams=("s",), group="g", consumer="c", start=text)


@FUZZ
@given(IDS, IDS)
def test_ids_sort_as_numbers_not_as_text(a: str, b: str) -> None:
    def numbers(x: str) -> tuple[int, int]:
        ms, _, seq = x.partition("-")
        return int(ms), int(seq)

    assert (cmd.id_order(a) < cmd.id_order(b)) is (numbers(a) < numbers(b))
    assert cmd.id_order(a) == numbers(a)
    normal = parse_stream_id(a)
    assert normal is not None and cmd.id_order(normal) == numbers(a)
    assert cmd.id_time_ms(a) == numbers(a)[0]


@FUZZ
@given(ID_TEXT)
def test_id_time_never_raises(text: str) -> None:
    ms = cmd.id_time_ms(text)
    assert type(ms) is int and ms >= 0


# -- encodings --------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["rot13", "base64", "hex", "zlib", "utf-16", "utf-8-sig"])
def test_an_encoding_that_cannot_carry_any_bytes_is_refused(encoding: str) -> None:
    # Found by the fuzzing above: these passed check_encoding, then every read failed
    # (LookupError: not a text encoding; UnicodeDecodeError on an odd number of bytes) or
    # changed the values (a BOM dropped).
    with pytest.raises(ConfigError, match="encoding"):
        check_encoding(encoding)


@FUZZ
@given(
    st.sampled_from(["utf-8", "latin-1", "ascii", "cp1252", "iso8859-15", "UTF8"]),
    st.lists(st.tuples(RAW, RAW), min_size=1, max_size=4),
)
def test_an_accepted_encoding_gives_back_any_bytes(
    encoding: str, pairs: list[tuple[bytes, bytes]]
) -> None:
    check_encoding(encoding)
    flat = [x for pair in pairs for x in pair]
    fields = cmd.convert_fields(flat, encoding)
    assert {_raw(k, encoding): _raw(v, encoding) for k, v in fields.items()} == dict(pairs)


# -- URLs ---------------------------------------------------------------------------------------

#: the marker of a password: nothing else in a generated URL holds one
MARK = "Q"
#: text of the other parts: no marker, and no "%" (whose decoding could make one)
_WIDE = st.characters(blacklist_categories=["Cs"], blacklist_characters=MARK + "%")
HOSTS = st.one_of(
    st.sampled_from(
        ["127.0.0.1", "localhost", "", "[::1]", "[fe80::1%25eth0]", "[::1", "::1", "bücher.example",
         "xn--bcher-kva.example", "h_st", "a,b", "[]", "[::ffff:127.0.0.1]", "255.255.255.256"]
    ),
    st.text(_WIDE, max_size=10),
)  # fmt: skip
PORTS = st.sampled_from(["", ":", ":1", ":6379", ":0", ":65536", ":-1", ":abc", ":1:2", ": 1"])
SCHEMES = st.sampled_from(
    ["redis", "rediss", "valkey", "valkeys", "unix", "redis+sentinel", "http", "", "REDIS"]
)
PATHS = st.sampled_from(["", "/", "/0", "/15", "/x", "/0/1", "/mymaster", "/mymaster/0", "//"])
#: password pieces: reserved characters, percent signs, what a URL parser looks for
_PIECES = st.sampled_from(["@", ":", "/", "?", "#", "%", "%40", "%2", "&", "=", "[", "]", ";",
                           "password=", "&password=", "?password=", "@h:1", " ", "é", "\u200b",
                           "𝄞", "+"])  # fmt: skip
PASSWORD_TEXT = st.lists(st.text(_WIDE, min_size=1, max_size=3) | _PIECES, max_size=4).map("".join)
#: names of an option that redis-py takes as the password: spelled plainly, or percent-encoded
#: (parse_qs decodes names too); other spellings are unknown options, refused by connect()
PASSWORD_OPTIONS = ["password", "sentinel_password", "PASSWORD", "pass%77ord", "%70assword"]

#: a user-info password holding an option after an '@' (pinned below: it once leaked)
_OPTION_AFTER_AN_AT = re.compile(r"(?i)@.*[?&;][\w.~+%-]*password=", re.DOTALL)


@dataclass(frozen=True)
class Url:
    url: str
    passwords: tuple[str, ...]

    def forms(self) -> set[str]:
        """Every password as written and percent-decoded (``+`` as a space too)."""
        return {f(p) for p in self.passwords for f in (str, unquote, unquote_plus)} - {""}

    def leaks_in(self, text: str) -> list[str]:
        found = [f for f in self.forms() if f in text]
        return found + ([MARK] if MARK in text else [])


@st.composite
def urls(draw: st.DrawFn) -> Url:
    passwords = []

    def password(in_query: bool) -> str:
        text = draw(PASSWORD_TEXT) + MARK + draw(PASSWORD_TEXT)
        if draw(st.booleans()):
            text = quote(text, safe="")
        elif in_query:
            # an unencoded "&" ends an option's value: what follows is another option
            text = text.replace("&", "")
        passwords.append(text)
        return text

    scheme = draw(SCHEMES)
    user = draw(st.sampled_from(["", "app", "default", "u@x", "a:b"]) | st.text(_WIDE, max_size=5))
    how = draw(st.sampled_from(["none", "user", "password", "password", "@@"]))
    userinfo = {"none": "", "user": f"{user}@", "@@": "@@"}.get(how)
    if userinfo is None:
        userinfo = f"{user}:{password(False)}@"
    hosts = ",".join(
        draw(HOSTS) + draw(PORTS)
        for _ in range(draw(st.integers(1, 3 if "sentinel" in scheme else 1)))
    )
    query = [draw(st.sampled_from(["db=1", "socket_timeout=2", "x=1", "", "=", "&"]))]
    for name in draw(st.lists(st.sampled_from(PASSWORD_OPTIONS), max_size=2)):
        query.append(f"{name}={password(True)}")
    query = draw(st.permutations(query))
    url = f"{scheme}://{userinfo}{hosts}{draw(PATHS)}"
    if any(query):
        url += "?" + "&".join(query)
    return Url(url, tuple(passwords))


def _connect(url: str, is_async: bool) -> Any:
    """``conveyor.connect`` without a word to a server: a client, closed at once, or the
    ConveyorError it raised."""
    try:
        if is_async:
            client = conveyor.connect(url, cluster=False, asyncio=True)
        else:
            client = conveyor.connect(url, cluster=False)
    except ConveyorError as exc:
        return exc
    if is_async:
        asyncio.run(client.aclose())
    else:
        client.close()
    return client


@FUZZ
@given(st.text(max_size=60) | st.text("redis:/@?#&=%[]:.0123456789password", max_size=60))
def test_any_text_as_a_url(text: str) -> None:
    assume(text.strip())  # blank: $REDIS_URL or the default instead
    shown = redact_url(text)
    assert isinstance(shown, str)
    outcome = _connect(text, is_async=False)
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, ConfigError), repr(outcome)
        assert "\n" not in str(outcome), str(outcome)


def assert_hidden(case: Url, is_async: bool = False) -> None:
    shown = redact_url(case.url)
    assert not case.leaks_in(shown), (case.url, shown)
    outcome = _connect(case.url, is_async)
    if isinstance(outcome, BaseException):
        assert isinstance(outcome, ConfigError), repr(outcome)
        message = str(outcome)
        assert "\n" not in message, message
        assert not case.leaks_in(message), (case.url, message)
    else:
        assert not case.leaks_in(repr(outcome)), (case.url, repr(outcome))


@FUZZ_REPLIES
@given(urls(), st.booleans())
def test_no_url_shows_its_password(case: Url, is_async: bool) -> None:
    assert_hidden(case, is_async)


def _userinfo_password(url: str) -> str:
    """The password redis-py takes from ``url``: after the first ":" before the last "@"."""
    return url.partition("://")[2].rpartition("@")[0].partition(":")[2]


@pytest.mark.parametrize(
    "url",
    [
        "redis://:aQ&password=b@127.0.0.1:1/0",
        "redis://:aQ;password=b@127.0.0.1:1/0",
        "redis://u:Qx?password=y@127.0.0.1:1/0",  # a ConfigError (bad port) quotes the URL
    ],
)
def test_a_password_holding_an_option_is_hidden(url: str) -> None:
    assert_hidden(Url(url, (_userinfo_password(url),)))


@pytest.mark.parametrize(
    "url",
    [
        "redis://u@x:aQ&password=b@127.0.0.1:1/0",  # shown as redis://u@x:aQ&password=***
        "redis://u:a@Q&password=b@127.0.0.1:1/0",  # shown as redis://u:***@Q&password=***
        "redis://u@x:aQ?password=b@127.0.0.1:1/0",  # ConfigError "... aQ?password=*** has a bad
    ],  # port"
)
def test_a_password_holding_an_option_after_an_at_is_hidden(url: str) -> None:
    assert _OPTION_AFTER_AN_AT.search(url.partition("://")[2].rpartition("@")[0])
    assert_hidden(Url(url, (_userinfo_password(url),)))


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0?pass%77ord=Qsecret1",  # redis-py sends AUTH Qsecret1
        "redis://127.0.0.1:99999/0?%70assword=Qsecret1",  # a ConfigError (bad port) quotes it
    ],
)
def test_a_password_option_with_an_encoded_name_is_hidden(url: str) -> None:
    assert_hidden(Url(url, (url.rpartition("=")[2],)))
