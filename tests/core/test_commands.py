"""Reply parsing for every shape the servers and client settings produce (no server needed)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conveyor._core import commands as cmd
from conveyor.errors import FieldTypeError
from conveyor.models import Message

NAMES = {"s": "s", b"s": "s", "t": "t", b"t": "t"}


def b(x: Any) -> Any:
    """The same reply with every str as bytes (decode_responses=False)."""
    if isinstance(x, str):
        return x.encode()
    if isinstance(x, list):
        return [b(i) for i in x]
    if isinstance(x, dict):
        return {b(k): b(v) for k, v in x.items()}
    return x


RESP2 = [["s", [["1-0", ["a", "1", "b", "2"]], ["2-0", ["a", "3"]]]]]
RESP3 = {"s": [["1-0", ["a", "1", "b", "2"]], ["2-0", ["a", "3"]]]}
EXPECTED = [Message("s", "1-0", {"a": "1", "b": "2"}, 1), Message("s", "2-0", {"a": "3"}, 1)]


@pytest.mark.parametrize("reply", [RESP2, RESP3, b(RESP2), b(RESP3)], ids=["2s", "3s", "2b", "3b"])
def test_read_reply_shapes_give_the_same_messages(reply: Any) -> None:
    assert cmd.parse_read(reply, NAMES, "utf-8").messages == EXPECTED


@pytest.mark.parametrize("reply", [RESP2, RESP3, b(RESP2), b(RESP3)], ids=["2s", "3s", "2b", "3b"])
def test_read_reply_without_encoding_keeps_bytes(reply: Any) -> None:
    messages = cmd.parse_read(reply, NAMES, None).messages
    assert messages[0].fields == {b"a": b"1", b"b": b"2"}
    assert messages[0].id == "1-0"  # ids are always str


def test_nil_reply_is_empty() -> None:
    result = cmd.parse_read(None, NAMES, "utf-8")
    assert result.messages == [] and result.deleted == []


@pytest.mark.parametrize("empty", [None, [], {}])
def test_deleted_entries_are_reported_never_returned(empty: Any) -> None:
    reply = [["s", [["1-0", empty], ["2-0", ["a", "1"]], ["3-0", empty]]]]
    result = cmd.parse_read(reply, NAMES, "utf-8")
    assert [m.id for m in result.messages] == ["2-0"]
    assert result.deleted == [("s", "1-0"), ("s", "3-0")]
    assert result.last_ids == {"s": "3-0"} and result.counts == {"s": 3}


def test_pending_deliveries_by_id() -> None:
    reply = [["s", [["1-0", ["a", "1"]], ["2-0", ["a", "2"]]]]]
    result = cmd.parse_read(reply, NAMES, "utf-8", {"1-0": 3, "2-0": 2})
    assert [m.deliveries for m in result.messages] == [3, 2]


def test_several_streams_and_an_empty_one() -> None:
    reply = [["s", [["1-0", ["a", "1"]]]], ["t", []]]
    result = cmd.parse_read(reply, NAMES, "utf-8")
    assert result.counts == {"s": 1, "t": 0}


def test_undecodable_bytes_survive_conversion() -> None:
    fields = cmd.convert_fields([b"k", b"\xff\xfe"], "utf-8")
    assert fields["k"].encode("utf-8", "surrogateescape") == b"\xff\xfe"


@pytest.mark.parametrize("decode", [lambda x: x, b], ids=["str", "bytes"])
def test_pending_counts(decode: Any) -> None:
    reply = decode([["1-0", "c", 10, 4], ["2-0", "c", 5, 1]])
    assert cmd.parse_pending_counts(reply) == {"1-0": 4, "2-0": 1}
    assert cmd.parse_pending_counts([]) == {}


def test_xautoclaim_redis_7_three_elements() -> None:
    reply = ["5-0", [["1-0", ["a", "1"]]], ["2-0"]]
    for shape in (reply, b(reply)):
        res = cmd.parse_xautoclaim(shape, "s", "utf-8")
        assert res.cursor == "5-0" and not res.done
        assert [m.fields for m in res.messages] == [{"a": "1"}]
        assert res.deleted == ["2-0"]


def test_xautoclaim_redis_62_two_elements_with_nil_entries() -> None:
    reply = [b"0-0", [[b"1-0", [b"a", b"1"]], [b"2-0", None]]]
    res = cmd.parse_xautoclaim(reply, "s", "utf-8")
    assert res.done and [m.id for m in res.messages] == ["1-0"] and res.deleted == ["2-0"]


def test_xreadgroup_never_blocks_forever() -> None:
    read = cmd.xreadgroup("g", "c", ["s"], [">"], 10, 0)
    assert read[read.index("BLOCK") + 1] == 1  # BLOCK 0 would mean forever
    assert "BLOCK" not in cmd.xreadgroup("g", "c", ["s"], ["0"], 10, None)


def test_xpending_range_is_exclusive_after_a_cursor() -> None:
    assert cmd.xpending_range("s", "g", "0", 5, "c")[3] == "-"
    assert cmd.xpending_range("s", "g", "7-1", 5, "c")[3] == "(7-1"


def test_xadd_retention() -> None:
    assert cmd.xadd("s", {"a": 1}, maxlen=10) == ("XADD", "s", "MAXLEN", "~", 10, "*", "a", 1)
    assert cmd.xadd("s", {"a": 1}, minid="5-0", approximate=False)[2:5] == ("MINID", "=", "5-0")


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"a": None}, "'a'"),
        ({"a": True}, "bool"),
        ({"a": [1]}, "list"),
        ({1: "x"}, "1"),
        ({}, "empty"),
    ],
)
def test_bad_fields_name_the_field(fields: Any, needle: str) -> None:
    with pytest.raises(FieldTypeError, match=needle):
        cmd.validate_fields(fields)


def test_error_code() -> None:
    assert cmd.error_code(Exception("NOGROUP No such key 's'")) == "NOGROUP"
    assert cmd.error_code(Exception("-UNBLOCKED the stream key no longer exists")) == "UNBLOCKED"


@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**40), st.dictionaries(st.text(min_size=1), st.text(), min_size=1)
        ),
        max_size=20,
    ),
    st.booleans(),
    st.booleans(),
)
def test_any_entries_parse_the_same_in_every_shape(entries: Any, resp3: bool, raw: bool) -> None:
    flat = [[f"{ms}-0", [x for kv in f.items() for x in kv]] for ms, f in entries]
    reply: Any = {"s": flat} if resp3 else [["s", flat]]
    if raw:  # names and ids as bytes; the connection decoded the fields
        raw_flat = [[i.encode(), f] for i, f in flat]
        reply = {b"s": raw_flat} if resp3 else [[b"s", raw_flat]]
    messages = cmd.parse_read(reply, NAMES, "utf-8").messages
    assert [(m.id, m.fields) for m in messages] == [(f"{ms}-0", f) for ms, f in entries]


class ReadOnlyError(Exception):
    """Named like redis-py's: the code word is in the class, not in the text."""


class MasterDownError(Exception):
    pass


class BusyLoadingError(Exception):
    pass


def test_error_codes_come_from_the_class_where_redis_py_hid_them() -> None:
    assert cmd.error_code(ReadOnlyError("You can't write against a read only replica.")) == (
        "READONLY"
    )
    assert cmd.error_code(MasterDownError("Link with MASTER is down")) == "MASTERDOWN"
    assert cmd.error_code(BusyLoadingError("Redis is loading")) == "LOADING"
    assert cmd.error_code(Exception("NOGROUP No such key")) == "NOGROUP"
    coded = Exception("whatever")
    coded.status_code = "tryagain"  # type: ignore[attr-defined]
    assert cmd.error_code(coded) == "TRYAGAIN"
    assert cmd.error_text(ReadOnlyError("You can't\nwrite.")) == "READONLY You can't write."
    assert cmd.error_text(Exception("NOGROUP No such key")) == "NOGROUP No such key"


@given(st.lists(st.binary(max_size=40), max_size=30))
def test_packed_fields_come_back_byte_for_byte(flat: list[bytes]) -> None:
    assert cmd.unpack_fields(cmd.pack_fields(flat)) == flat


def test_a_packed_dead_letter_is_parsed_into_its_own_fields() -> None:
    own = [b"\xff", b"\x00\r\n", b"k", b"v"]
    flat = [b"conveyor.origin_id", b"1-0", cmd.PACKED_FIELDS.encode(), cmd.pack_fields(own)]
    letter, fields = cmd.parse_dead_letter(b"2-0", flat, None)
    assert fields == own and letter.fields == {b"\xff": b"\x00\r\n", b"k": b"v"}
    letter, fields = cmd.parse_dead_letter(
        "2-0", [x.decode("utf-8", "surrogateescape") for x in flat], "utf-8"
    )
    assert letter.fields["k"] == "v" and letter.origin_id == "1-0"


def test_fields_bytes_counts_names_and_values_as_stored() -> None:
    from conveyor._core.commands import fields_bytes

    assert fields_bytes({"id": "42", "name": "Zoë", b"raw": b"\x00\x01", "n": 7}) == 19
    assert fields_bytes({"k": "\udcff"}, "utf-8") == 2  # a surrogate escape is its one byte
    assert fields_bytes({"k": "é"}, "latin-1") == 2
