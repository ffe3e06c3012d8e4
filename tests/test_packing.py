"""Commands packed by hiredis are byte for byte what redis-py's own packer sends."""

from __future__ import annotations

from typing import Any

import pytest
import redis
import redis.asyncio

from conveyor import _io
from conveyor._core import commands as cmd

COMMANDS: list[Any] = [
    cmd.xadd("s", {"a": "é", "b": b"\x00\xff", "n": 7, "f": 0.1, "big": 2**70}, maxlen=10),
    cmd.xreadgroup("g", "c", ["s", "t"], [">", ">"], 100, 50),
    cmd.xack("s", "g", [f"{i}-0" for i in range(100)]),
]


@pytest.mark.parametrize("conn_class", [redis.Connection, redis.asyncio.Connection])
def test_packing_matches_redis_py(conn_class: Any) -> None:
    conn = conn_class()
    ours = b"".join(_io._packed(conn, COMMANDS))
    theirs = b"".join(conn.pack_commands(COMMANDS))
    assert ours == theirs
    assert b"".join(_io._packed(conn, COMMANDS[:1])) == b"".join(conn.pack_command(*COMMANDS[0]))


@pytest.mark.parametrize("conn_class", [redis.Connection, redis.asyncio.Connection])
def test_other_client_encodings_pack_as_redis_py_does(conn_class: Any) -> None:
    conn = conn_class(encoding="latin-1")
    command = ("SET", "k", "é")
    assert b"".join(_io._packed(conn, [command])) == b"".join(conn.pack_command(*command))
