"""max_message_bytes: a producer refuses a larger message unsent; a consumer dead-letters larger
entries written by others without handing them to its handler. Both drivers, real servers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from conveyor import Batch, ConfigError, PayloadError
from conveyor._keys import dead_letter_key
from tests.conftest import Drivers
from tests.workers import wait_for

Name = Callable[[str], str]


def test_a_producer_refuses_a_larger_message_before_sending_anything_of_it(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    p = drivers.producer(s, max_message_bytes=100)
    p.send({"id": "1", "body": "x" * 93})  # 2 + 1 + 4 + 93 = 100 bytes: just fits
    with pytest.raises(PayloadError) as caught:
        p.send({"id": "2", "body": "é" * 60})  # 120 bytes as UTF-8, 60 characters
    assert str(caught.value) == (
        f"message for stream {s!r} is 127 bytes of fields, over max_message_bytes=100; "
        "nothing of it was sent"
    )
    assert r.xlen(s) == 1

    rows = [{"n": str(i)} for i in range(7)] + [{"n": "big", "body": b"\x00" * 200}]
    with pytest.raises(PayloadError, match=r"of row 7 .* \(5 entries before it were added\)"):
        p.send_many(rows, chunk=5)
    assert r.xlen(s) == 1 + 5  # the first chunk went out; the one holding the big row did not
    assert p.sent_count == 6


def test_a_consumer_dead_letters_larger_entries_unseen(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    small = [r.xadd(s, {"n": str(i)}).decode() for i in range(3)]
    big = r.xadd(s, {"n": "3", "blob": b"\xff" * 5000}).decode()
    small.append(r.xadd(s, {"n": "4"}).decode())
    c = drivers.consumer(s, "g", batch_size=10, max_wait_ms=100, max_message_bytes=1000)
    seen: list[str] = []

    def handler(batch: Batch) -> None:
        seen.extend(m.id for m in batch)
        batch.ack_all()
        if len(seen) >= 4:
            c.stop()

    c.run(handler)

    assert seen == small  # the large one never reached the handler
    ((_, dead),) = r.xrange(dead_letter_key(s))
    assert dead[b"conveyor.origin_id"].decode() == big
    assert dead[b"blob"] == b"\xff" * 5000  # byte for byte
    assert dead[b"conveyor.error"].decode() == (
        "5006 bytes of fields, over max_message_bytes=1000: dead-lettered without being "
        "handed to the handler"
    )
    assert int(r.xpending(s, "g")["pending"]) == 0


def test_a_larger_entry_left_pending_by_a_crash_is_dead_lettered_on_restart(
    drivers: Drivers, r: redis.Redis, name: Name
) -> None:
    s = name("s")
    r.xgroup_create(s, "g", "0", mkstream=True)
    big = r.xadd(s, {"blob": "y" * 3000}).decode()
    r.xreadgroup("g", "w1", {s: ">"})  # an older version of the worker took it, then died
    c = drivers.consumer(s, "g", consumer="w1", max_wait_ms=50, max_message_bytes=1000)

    assert len(c.get_batch()) == 0
    wait_for(lambda: r.xlen(dead_letter_key(s)) == 1, what="the dead-letter move")
    assert r.xrange(dead_letter_key(s))[0][1][b"conveyor.origin_id"].decode() == big
    assert int(r.xpending(s, "g")["pending"]) == 0


@pytest.mark.parametrize("value", [0, -1, 1.5, "10"])
def test_a_bad_limit_is_one_line(drivers: Drivers, name: Name, value: object) -> None:
    with pytest.raises(ConfigError, match=r"^max_message_bytes must be") as by_producer:
        drivers.producer(name("s"), max_message_bytes=value)
    with pytest.raises(ConfigError, match=r"^max_message_bytes must be") as by_consumer:
        drivers.consumer(name("s"), "g", max_message_bytes=value)
    assert "\n" not in str(by_producer.value) + str(by_consumer.value)
