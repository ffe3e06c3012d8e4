"""Least-privilege ACL users (``conveyor.acl_rules``, ``conveyor acl``) on real servers: each
role's user, made from the printed line, does its work and is refused everything else.

The session server keeps ACL users: each test makes its own (unique names) and deletes them.
"""

from __future__ import annotations

import doctest
import json
import logging
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import NoPermissionError, ResponseError

import conveyor
from conveyor import (
    ConfigError,
    Consumer,
    EmbeddedServer,
    Monitor,
    Producer,
    ServerError,
    StreamReader,
)
from conveyor.acl import ROLES, acl_args, acl_rules
from tests.faultproxy import FaultProxy
from tests.test_cli import TIMEOUT_S, _env, assert_clean_error
from tests.workers import Worker, fill, wait_for

PASSWORD = "acl-test-pw"

MakeUser = Callable[..., str]


def split_line(line: str) -> list[str]:
    """``line`` split into arguments as redis-cli splits what it reads (sdssplitargs): bare
    words as they are, double-quoted parts with backslash escapes (``\\xHH``, ``\\"``)."""
    args: list[str] = []
    i, n = 0, len(line)
    while True:
        while i < n and line[i].isspace():
            i += 1
        if i == n:
            return args
        word = bytearray()
        quoted = False
        while i < n:
            ch = line[i]
            if quoted:
                if ch == "\\" and line[i + 1 : i + 2] == "x":
                    word.append(int(line[i + 2 : i + 4], 16))
                    i += 4
                    continue
                if ch == "\\":
                    word.extend(line[i + 1].encode())
                    i += 2
                    continue
                if ch == '"':
                    quoted = False
                    i += 1
                    assert i == n or line[i].isspace(), "a closing quote must end the word"
                    break
                word.extend(ch.encode())
            elif ch.isspace():
                break
            elif ch == '"':
                quoted = True
            else:
                assert ch != "'", "redis-cli would start a quoted part here"
                word.extend(ch.encode())
            i += 1
        args.append(word.decode("utf-8", "surrogateescape"))


def setuser_args(line: str) -> list[str]:
    """The arguments after ``ACL SETUSER`` in a printed line."""
    parts = split_line(line)
    assert parts[:2] == ["ACL", "SETUSER"], line
    return parts[2:]


def user_url(redis_url: str, user: str) -> str:
    return redis_url.replace("redis://", f"redis://{user}:{PASSWORD}@", 1)


@pytest.fixture
def acl_user(r: redis.Redis, redis_url: str) -> Iterator[MakeUser]:
    """``acl_user(role, streams, group=None, drop=(), via=None, **kw)``: a user made from the
    line ``acl_rules`` prints (less the rules in ``drop``), with a password and on; returns a
    URL (of the server, or ``via``) that logs in as it. Deleted after the test."""
    made: list[str] = []

    def make(
        role: str,
        streams: Any,
        group: str | None = None,
        drop: tuple[str, ...] = (),
        via: str | None = None,
        **kw: Any,
    ) -> str:
        user = f"t-acl-{role}-{uuid.uuid4().hex[:8]}"
        args = setuser_args(acl_rules(role, streams, group, user=user, **kw))
        for rule in drop:
            args.remove(rule)
        made.append(user)
        r.execute_command("ACL", "SETUSER", *args, f">{PASSWORD}", "on")
        return user_url(via or redis_url, user)

    yield make
    for user in made:
        r.execute_command("ACL", "DELUSER", user)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``conveyor ARGS`` without REDIS_URL (each test passes --url)."""
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=TIMEOUT_S,
        check=False,
    )


def refused(client: Any, *command: Any) -> None:
    with pytest.raises(NoPermissionError):
        client.execute_command(*command)


def no_refusals(caplog: pytest.LogCaptureFixture) -> None:
    """run() retries what the server refuses and logs it: a missing command shows here."""
    lines = [rec.getMessage() for rec in caplog.records if rec.name.startswith("conveyor")]
    assert not [line for line in lines if "NOPERM" in line or "refused" in line], lines


# -- the line ----------------------------------------------------------------------------------


def test_the_doctests_hold() -> None:
    assert doctest.testmod(conveyor.acl).failed == 0


@pytest.mark.parametrize("role", ROLES)
def test_the_line_grants_commands_one_by_one_and_no_password(role: str) -> None:
    line = acl_rules(role, ["orders", "payments"], "billing")
    assert "\n" not in line
    args = setuser_args(line)
    assert args[:4] == [f"conveyor-{role}", "reset", "resetchannels", "-@all"]
    rules = args[4:]
    assert not [a for a in rules if "@" in a]  # no category
    assert not [a for a in rules if a[0] in ">#<!" or a in ("on", "off", "nopass", "allkeys")]
    commands = [a for a in rules if a.startswith("+")]
    assert commands and commands == [c.lower() for c in commands]
    assert "+ping" in commands and "+client|setinfo" not in commands
    assert all(a.startswith("~") for a in rules if not a.startswith("+"))
    assert acl_rules(role, "orders", user="ops").split()[2] == "ops"


def test_the_keys_are_the_streams_and_the_role_s_own_derived_keys() -> None:
    def keys(*args: Any, **kw: Any) -> list[str]:
        return [a for a in acl_args(*args, **kw) if a.startswith("~")]

    assert keys("producer", "orders", "billing") == ["~orders", "~{orders}:idem:*"]
    assert keys("consumer", "orders", "billing") == [
        "~orders",
        "~{orders}:heartbeats:billing",
        "~{orders}:dead",
    ]
    assert keys("monitor", "orders") == ["~orders", "~{orders}:heartbeats:*", "~{orders}:dead"]
    assert keys("admin", ["{shop}a", "{shop}b"], "g") == [
        "~{shop}a",
        "~{shop}a:heartbeats:g",
        "~{shop}a:dead",
        "~{shop}b",
        "~{shop}b:heartbeats:g",
        "~{shop}b:dead",
    ]
    assert keys("reader", "orders", reader="audit") == ["~orders", "~{orders}:reader:audit"]
    assert keys("reader", "orders") == ["~orders", "~{orders}:reader:*"]
    # glob characters of a name match only themselves
    assert keys("producer", "a*b?[c]\\d") == [
        "~a\\*b\\?\\[c\\]\\\\d",
        "~{a\\*b\\?\\[c\\]\\\\d}:idem:*",
    ]
    assert keys("consumer", "o*", "g?") == ["~o\\*", "~{o\\*}:heartbeats:g\\?", "~{o\\*}:dead"]
    assert keys("consumer", "o*") == ["~o\\*", "~{o\\*}:heartbeats:*", "~{o\\*}:dead"]


def test_cluster_adds_what_a_cluster_client_needs() -> None:
    plain = acl_args("producer", "orders")
    extra = [a for a in acl_args("producer", "orders", cluster=True) if a not in plain]
    assert extra == ["+info", "+cluster|slots", "+command", "+asking"]


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: acl_rules("superuser", "orders"), "unknown role 'superuser'"),
        (lambda: acl_rules("producer", []), "at least one stream"),
        (lambda: acl_rules("producer", [""]), "non-empty"),
        (lambda: acl_rules("producer", 42), "streams must be"),
        (lambda: acl_rules("consumer", "orders", ""), "group"),
        (lambda: acl_rules("reader", "orders", reader=""), "reader"),
        (lambda: acl_rules("producer", "orders", user="a b"), "user"),
    ],
)
def test_bad_input_is_a_one_line_config_error(call: Callable[[], str], needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        call()
    assert needle in str(caught.value) and "\n" not in str(caught.value)


def test_the_command_prints_the_line_and_asks_no_server() -> None:
    unreachable = "redis://127.0.0.1:1/0"  # nothing listens there: it must not matter
    result = cli("acl", "consumer", "-s", "orders", "-s", "payments", "-g", "billing")
    assert result.returncode == 0, result.stderr
    assert result.stdout == acl_rules("consumer", ["orders", "payments"], "billing") + "\n"
    assert ">PASSWORD on" in result.stderr and "ACL SAVE" in result.stderr
    result = cli("acl", "reader", "-s", "o", "--reader", "x", "--user", "u", "--url", unreachable)
    assert result.returncode != 0  # acl takes no --url: it never connects
    result = cli("acl", "reader", "-s", "o", "--reader", "x", "--user", "u", "--cluster")
    assert result.stdout == acl_rules("reader", "o", user="u", reader="x", cluster=True) + "\n"


@pytest.mark.parametrize(
    ("args", "needle"),
    [(("acl", "root", "-s", "orders"), "unknown role 'root'"), (("acl", "producer"), "stream")],
)
def test_the_command_s_bad_input_is_one_error_line(args: tuple[str, ...], needle: str) -> None:
    result = cli(*args)
    assert_clean_error(result)
    assert needle in result.stderr


def test_odd_stream_names_survive_the_line(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser, redis_url: str
) -> None:
    s = name('my "orders" *[1]\\') + "\té"
    url = acl_user("producer", s)
    with conveyor.connect(url) as client:
        Producer(client, s).send({"a": "1"})
        refused(client, "XADD", name('my "orders" X[1]\\') + "\té", "*", "a", "1")
    assert r.xlen(s) == 1


def test_redis_cli_takes_the_printed_line(
    r: redis.Redis, redis_url: str, name: Callable[[str], str]
) -> None:
    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        pytest.skip("no redis-cli on this machine")
    s = name("orders with space")
    user = f"t-acl-cli-{uuid.uuid4().hex[:8]}"
    line = acl_rules("producer", s, user=user) + f" >{PASSWORD} on\n"
    port = redis_url.rsplit(":", 1)[1].split("/", maxsplit=1)[0]
    try:
        done = subprocess.run(
            [redis_cli, "-p", port],
            check=False,
            input=line,
            capture_output=True,
            text=True,
            timeout=10,
        )
        assert done.stdout.strip() == "OK", done.stdout + done.stderr
        with conveyor.connect(user_url(redis_url, user)) as client:
            Producer(client, s).send({"a": "1"})
    finally:
        r.execute_command("ACL", "DELUSER", user)


# -- producer ----------------------------------------------------------------------------------


def test_producer_sends_and_is_refused_the_rest(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser
) -> None:
    s, other = name("s"), name("other")
    url = acl_user("producer", s)
    with conveyor.connect(url) as client:
        p = Producer(client, s, maxlen=1000)
        p.send({"n": "0"})
        p.send_many([{"n": str(i)} for i in range(1, 100)], chunk=30)
        first = p.send({"n": "keyed"}, idempotency_key="k")
        assert p.send_many([{"n": "keyed"}], idempotency_keys=["k"]) == [first]
        refused(client, "XREADGROUP", "GROUP", "g", "c", "STREAMS", s, ">")
        refused(client, "XDEL", s, "0-1")
        refused(client, "XRANGE", s, "-", "+")
        refused(client, "FLUSHALL")
        refused(client, "XADD", other, "*", "a", "1")
        with pytest.raises(
            ResponseError, match=r"(?i)permission|can't run this command"
        ):  # inside a script
            client.execute_command("EVAL", "return redis.call('XDEL', KEYS[1], '0-1')", 1, s)
        refused(client, "EVAL", "return redis.call('XADD', KEYS[1], '*', 'a', '1')", 1, other)
        refused(client, "GET", other)
    result = cli("produce", "--url", url, "-s", s, "n=100")
    assert result.returncode == 0, result.stderr
    assert r.xlen(s) == 102 and not r.exists(other)


# -- consumer ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_consumer_run_acks_retries_and_dead_letters(
    kind: str,
    r: redis.Redis,
    name: Callable[[str], str],
    acl_user: MakeUser,
    caplog: pytest.LogCaptureFixture,
) -> None:
    s = name("s")
    url = acl_user("consumer", s, "g")
    ids = fill(r, s, 20)
    poison = r.xadd(s, {"n": "poison"}).decode()

    def handler(w: Worker, batch: conveyor.Batch) -> None:
        for msg in batch:
            if msg.fields["n"] == "poison":
                batch.fail(msg, "cannot handle it")
            else:
                batch.ack(msg)
                with w.lock:
                    w.processed.add(msg.id)

    caplog.set_level(logging.WARNING, logger="conveyor")
    w = Worker(kind, url, s, "g", handler=handler, max_deliveries=2, retry_backoff_ms=0)
    w.start()
    wait_for(lambda: r.xlen(f"{{{s}}}:dead") == 1, timeout_s=15, what="the dead letter")
    assert r.pttl(f"{{{s}}}:heartbeats:g") > 0  # the beats expire (PEXPIRE, its refusal silent)
    w.finish(set(ids))
    letter = r.xrange(f"{{{s}}}:dead")[0][1]
    assert letter[b"conveyor.origin_id"].decode() == poison
    assert letter[b"conveyor.error"] == b"cannot handle it"
    assert [d for i, d in w.seen if i == poison] == [1, 2]
    assert r.xpending(s, "g")["pending"] == 0
    no_refusals(caplog)


def test_consumer_restart_rereads_and_takes_a_dead_one_s_entries(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser, caplog: pytest.LogCaptureFixture
) -> None:
    s = name("s")
    url = acl_user("consumer", s)  # any group's heartbeats
    ids = fill(r, s, 6)
    caplog.set_level(logging.WARNING, logger="conveyor")
    with conveyor.connect(url) as client:
        first = Consumer(client, s, "g", consumer="w1", batch_size=3, max_wait_ms=50)
        assert [m.id for m in first.get_batch()] == ids[:3]  # then it "crashes": no ack
        again = Consumer(client, s, "g", consumer="w1", batch_size=3, max_wait_ms=50)
        batch = again.get_batch()
        assert [m.id for m in batch] == ids[:3]
        # w2 read the rest and died: its last heartbeat is long past its timeout
        r.xreadgroup("g", "w2", {s: ">"})
        now_ms = int(r.time()[0]) * 1000
        r.hset(f"{{{s}}}:heartbeats:g", "w2", f"{now_ms - 600_000}:1000")
        again.ack_many(batch)
        live = Consumer(
            client, s, "g", consumer="w3", heartbeat_ms=10, claim_idle_ms=40, max_wait_ms=50
        )
        taken: list[str] = []

        def take() -> bool:
            got = live.get_batch()
            taken.extend(m.id for m in got)
            live.ack_many(got)
            # once it owns nothing, the dead one is removed (XGROUP DELCONSUMER, HDEL)
            return len(taken) >= 3 and not r.hexists(f"{{{s}}}:heartbeats:g", "w2")

        wait_for(take, timeout_s=10, what="the dead consumer's entries reclaimed, it removed")
        assert sorted(taken) == sorted(ids[3:])
        for consumer in (live, again, first):
            consumer.close()
    assert r.xpending(s, "g")["pending"] == 0
    assert "w2" not in {c["name"].decode() for c in r.xinfo_consumers(s, "g")}
    no_refusals(caplog)


def test_consumer_cli_consumes_and_peeks(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser
) -> None:
    s = name("s")
    url = acl_user("consumer", s, "g")
    ids = fill(r, s, 4)
    read = cli("consume", "--url", url, "-s", s, "-g", "g", "-n", "2")
    assert read.returncode == 0, read.stderr
    assert [json.loads(line)["id"] for line in read.stdout.splitlines()] == ids[:2]
    peek = cli("consume", "--url", url, "-s", s, "-g", "g", "--peek", "-n", "2")
    assert peek.returncode == 0, peek.stderr
    assert [json.loads(line)["id"] for line in peek.stdout.splitlines()] == ids[2:]
    assert r.xpending(s, "g")["pending"] == 0


def test_consumer_cli_run_works_and_stops_cleanly(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser, tmp_path: Path
) -> None:
    s = name("s")
    url = acl_user("consumer", s, "g")
    (tmp_path / "acl_handlers.py").write_text("def handle(batch):\n    batch.ack_all()\n")
    fill(r, s, 5)
    args = ["run", "acl_handlers:handle", "--url", url, "-s", s, "-g", "g", "--max-wait-ms", "50"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**_env(), "PYTHONPATH": str(tmp_path)},
    )
    try:

        def done() -> bool:
            groups = r.xinfo_groups(s)
            return bool(groups) and groups[0]["entries-read"] == 5 and groups[0]["pending"] == 0

        wait_for(done, timeout_s=15, what="every message acked")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    assert proc.returncode == 0, err
    assert "NOPERM" not in err and "acked 5" in err


def test_consumer_is_refused_trimming_deleting_and_other_streams(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser
) -> None:
    s, other = name("s"), name("other")
    url = acl_user("consumer", s, "g")
    fill(r, s, 2)
    fill(r, other, 2)
    with conveyor.connect(url) as client:
        refused(client, "XTRIM", s, "MAXLEN", "0")
        refused(client, "XDEL", s, "0-1")
        refused(client, "DEL", s)
        refused(client, "XGROUP", "DESTROY", s, "g")
        refused(client, "HSET", f"{{{s}}}:heartbeats:other-group", "w", "1")
        with pytest.raises(ServerError, match="NOPERM"):
            Consumer(client, other, "g").get_batch()
        c = Consumer(client, s, "g", max_wait_ms=30)
        batch = c.get_batch()
        with pytest.raises(ServerError, match="NOPERM"):
            c.forward(batch[0], "{" + other + "}:out", {"a": "1"})  # not one of its streams
    assert r.xlen(s) == 2 and not r.exists(f"{{{other}}}:heartbeats:g")
    assert r.xpending(s, "g")["pending"] == 2  # the refused forward acked nothing


def test_consumer_forwards_to_a_stream_given_as_one_of_its_own(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser
) -> None:
    s = name("s")
    out = "{" + s + "}:out"
    url = acl_user("consumer", [s, out], "g")
    fill(r, s, 3)
    with conveyor.connect(url) as client:
        c = Consumer(client, s, "g", max_wait_ms=30)

        def handler(batch: conveyor.Batch) -> None:
            for msg in batch:
                batch.forward(msg, out, {"src": msg.id})
            c.stop()

        c.run(handler)
    assert r.xlen(out) == 3 and r.xpending(s, "g")["pending"] == 0


# -- monitor -----------------------------------------------------------------------------------


def test_monitor_cli_shows_the_table_and_writes_nothing(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser
) -> None:
    s = name("s")
    url = acl_user("monitor", s)
    fill(r, s, 3)
    worker = Consumer(r, s, "g", consumer="w1", max_wait_ms=50)
    worker.ack_many(worker.get_batch())
    try:
        shown = cli("monitor", "--url", url, "-s", s, "-g", "g")
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert "Consumer id" in shown.stdout and "w1" in shown.stdout
        for command in (
            ["scale", "-g", "g"],
            ["pending", "-g", "g"],
            ["groups", "ls"],
            ["dlq", "ls"],
        ):
            done = cli(*command, "--url", url, "-s", s)
            assert done.returncode == 0, (command, done.stderr)
        with conveyor.connect(url) as client:
            refused(client, "XADD", s, "*", "a", "1")
            refused(client, "XACK", s, "g", "0-1")
            refused(client, "XGROUP", "DESTROY", s, "g")
            refused(client, "XGROUP", "DELCONSUMER", s, "g", "w1")
            refused(client, "HSET", f"{{{s}}}:heartbeats:g", "w1", "1")
            refused(client, "XTRIM", s, "MAXLEN", "0")
            with pytest.raises(ResponseError, match=r"xadd|XADD|can't run"):
                client.execute_command(
                    "EVAL", "return redis.call('XADD', KEYS[1], '*', 'a', 1)", 1, s
                )
    finally:
        worker.close()
    assert r.xlen(s) == 3


def test_monitor_counts_a_lag_the_server_cannot_tell(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser
) -> None:
    s = name("s")
    ids = fill(r, s, 5)
    r.xgroup_create(s, "g", "0")
    r.xdel(s, ids[1])  # the server's lag is unknown now: counted with a script
    url = acl_user("monitor", s, "g")
    with conveyor.connect(url) as client:
        (group,) = Monitor(client, s, group="g").collect().groups
    assert group.lag == 4


@pytest.fixture
def proxy(server: EmbeddedServer) -> Iterator[FaultProxy]:
    with FaultProxy(server.port) as p:
        yield p


def test_consumer_rereads_what_a_lost_reply_delivered(
    r: redis.Redis,
    name: Callable[[str], str],
    acl_user: MakeUser,
    proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Lost read replies: the consumer reads its own pending entries again (a script with
    XRANGE) without counting a delivery."""
    s = name("s")
    url = acl_user("consumer", s, "g", via=proxy.url)
    ids = set(fill(r, s, 10))
    proxy.lose_reply(lambda args: args[0].upper() == b"XREADGROUP", times=2)
    caplog.set_level(logging.WARNING, logger="conveyor")
    w = Worker("sync", url, s, "g", batch_size=10, max_wait_ms=50)
    w.start()
    w.finish(ids)
    assert proxy.lost == 2
    assert sorted(d for _, d in w.seen) == [1] * 10
    no_refusals(caplog)


# -- admin -------------------------------------------------------------------------------------


def test_admin_trims_replays_purges_and_manages_groups(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser
) -> None:
    s = name("s")
    dead = f"{{{s}}}:dead"
    url = acl_user("admin", s)
    ids = fill(r, s, 10)
    worker = Consumer(r, s, "g", consumer="w1", batch_size=6, max_wait_ms=50)
    batch = worker.get_batch()
    worker.ack_many(batch[:4])
    for msg in batch[4:]:
        worker.dead_letter(msg, "bad")
    worker.close()

    def run(*args: str) -> str:
        done = (
            cli(*args[:2], "--url", url, *args[2:])
            if args[0] in ("dlq", "groups")
            else cli(args[0], "--url", url, *args[1:])
        )
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    run("trim", "-s", s, "--safe", "--dry-run")
    run("trim", "-s", s, "--safe")
    assert [e[0].decode() for e in r.xrange(s)] == ids[6:]
    run("dlq", "ls", "-s", s)
    run("dlq", "replay", "-s", s, "--yes")
    assert r.xlen(dead) == 0 and r.xlen(s) == 6
    r.xadd(dead, {"conveyor.origin_stream": s, "conveyor.origin_id": "1-1"})
    run("dlq", "purge", "-s", s, "--yes")
    assert r.xlen(dead) == 0
    run("trim", "-s", s, "--maxlen", "0", "--dry-run")
    run("trim", "-s", s, "--maxlen", "100", "--yes")
    run("groups", "create", "-s", s, "-g", "g2", "--id", "$")
    run("groups", "setid", "-s", s, "-g", "g2", "--id", "0")
    run("pending", "-s", s, "-g", "g")
    r.xreadgroup("g2", "w9", {s: ">"}, count=2)
    run("claim", "-s", s, "-g", "g2", "--to", "w8", "--min-idle-ms", "0")
    assert {row["consumer"] for row in r.xpending_range(s, "g2", "-", "+", 10)} == {b"w8"}
    r.hset(f"{{{s}}}:heartbeats:g2", "w8", "1")
    run("groups", "destroy", "-s", s, "-g", "g2", "--yes")
    assert [g["name"] for g in r.xinfo_groups(s)] == [b"g"]
    assert not r.exists(f"{{{s}}}:heartbeats:g2")
    with conveyor.connect(url) as client:
        refused(client, "FLUSHALL")
        refused(client, "XADD", name("other"), "*", "a", "1")
        refused(client, "CONFIG", "GET", "*")
        refused(client, "ACL", "LIST")


def test_admin_cleanup_moves_a_dead_consumer_s_entries(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser
) -> None:
    s = name("s")
    beats = f"{{{s}}}:heartbeats:g"
    url = acl_user("admin", s, "g")
    ids = fill(r, s, 3)
    r.xgroup_create(s, "g", "0")
    r.xreadgroup("g", "dead", {s: ">"})
    r.xgroup_createconsumer(s, "g", "live")
    now_ms = int(r.time()[0]) * 1000
    r.hset(beats, mapping={"dead": f"{now_ms - 600_000}:1000", "live": f"{now_ms}:600000"})
    done = cli("monitor", "--url", url, "-s", s, "-g", "g", "--cleanup")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "moved 3 pending entries of dead consumer 'dead' to 'live'" in done.stdout
    assert {row["consumer"] for row in r.xpending_range(s, "g", "-", "+", 10)} == {b"live"}
    assert [row["message_id"].decode() for row in r.xpending_range(s, "g", "-", "+", 10)] == ids
    assert [c["name"] for c in r.xinfo_consumers(s, "g")] == [b"live"]
    assert not r.hexists(beats, "dead")


# -- reader ------------------------------------------------------------------------------------


def test_reader_reads_and_keeps_its_checkpoint(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser
) -> None:
    s = name("s")
    url = acl_user("reader", s, reader="audit")
    with conveyor.connect(url) as client:
        tail = StreamReader(client, s, name="audit", start="$")
        assert list(tail.get_batch()) == []
        ids = fill(r, s, 4)
        assert [m.id for m in tail.get_batch()] == ids
        tail.commit()
        tail.close()
        more = fill(r, s, 2)
        again = StreamReader(client, s, name="audit", start="$")
        assert [m.id for m in again.get_batch()] == more
        again.close()
        with pytest.raises(ServerError, match="NOPERM"):
            StreamReader(client, s, name="other", start="0").get_batch()
        refused(client, "XADD", s, "*", "a", "1")
        refused(client, "SET", name("x"), "1")


# -- refusals name what was refused ------------------------------------------------------------


def test_a_refused_command_inside_a_script_is_named(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser
) -> None:
    s = name("s")
    fill(r, s, 2)
    url = acl_user("consumer", s, "g", drop=("+xadd",))
    with conveyor.connect(url) as client:
        c = Consumer(client, s, "g", max_wait_ms=50)
        msg = c.get_batch()[0]
        with pytest.raises(ServerError) as caught:
            c.dead_letter(msg, "bad")
        c.close()
    text = str(caught.value)
    assert "NOPERM" in text and "XADD" in text and "dead-letter move" in text and s in text
    assert "\n" not in text
    assert r.xlen(f"{{{s}}}:dead") == 0


def test_a_refused_key_says_so(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser
) -> None:
    s = name("s")
    fill(r, s, 2)
    url = acl_user("consumer", s, "g", drop=(f"~{{{s}}}:dead",))
    with conveyor.connect(url) as client:
        c = Consumer(client, s, "g", max_wait_ms=50)
        msg = c.get_batch()[0]
        with pytest.raises(ServerError) as caught:
            c.dead_letter(msg, "bad")
        c.close()
    text = str(caught.value)
    assert "NOPERM" in text and "key patterns" in text and s in text


def test_a_refusal_inside_the_trim_script_is_one_line_naming_the_step(
    r: redis.Redis, name: Callable[[str], str], acl_user: MakeUser
) -> None:
    s = name("s")
    fill(r, s, 2)
    r.xgroup_create(s, "g", "$")
    url = acl_user("admin", s, drop=("+xtrim",))
    done = cli("trim", "--url", url, "-s", s, "--safe")
    assert_clean_error(done)
    line = done.stderr
    assert "NOPERM" in line and "safe trim" in line and s in line
    # Valkey names the command; Redis 7.0 does not say which, and the line says where to look
    assert "'xtrim'" in line or "ACL LOG" in line
    assert r.xlen(s) == 2


# -- cluster -----------------------------------------------------------------------------------


@pytest.fixture
def cluster_user(cluster: Any, cluster_url: str) -> Iterator[MakeUser]:
    """``acl_user`` on a cluster: ACL users are per node, so it is made on every node."""
    made: list[str] = []

    def make(role: str, streams: Any, group: str | None = None, **kw: Any) -> str:
        user = f"t-acl-{role}-{uuid.uuid4().hex[:8]}"
        args = setuser_args(acl_rules(role, streams, group, user=user, cluster=True, **kw))
        made.append(user)
        for i in range(len(cluster.urls)):
            cluster.admin(i).execute_command("ACL", "SETUSER", *args, f">{PASSWORD}", "on")
        return user_url(cluster_url, user)

    yield make
    for user in made:
        for i in range(len(cluster.urls)):
            cluster.admin(i).execute_command("ACL", "DELUSER", user)


def test_cluster_producer_and_consumer_end_to_end(
    cluster: Any, cluster_url: str, cluster_user: MakeUser, caplog: pytest.LogCaptureFixture
) -> None:
    tag = uuid.uuid4().hex[:6]
    streams = [f"acl:{tag}:{n}" for n in range(3)]
    assert len({cluster.node_for_key(s) for s in streams}) > 1  # on several nodes
    producer_url = cluster_user("producer", streams)
    consumer_url = cluster_user("consumer", streams, "g")
    caplog.set_level(logging.WARNING, logger="conveyor")
    with conveyor.connect(producer_url) as client:
        assert isinstance(client, redis.cluster.RedisCluster)  # INFO: it could ask
        sent = {
            s: Producer(client, s).send_many([{"n": str(i)} for i in range(5)]) for s in streams
        }
        Producer(client, streams[0]).send({"n": "poison"})

    def handler(w: Worker, batch: conveyor.Batch) -> None:
        for msg in batch:
            if msg.fields["n"] == "poison":
                batch.fail(msg, "cannot handle it")
            else:
                batch.ack(msg)
                with w.lock:
                    w.processed.add(msg.id)

    w = Worker("sync", consumer_url, streams, "g", handler=handler, max_deliveries=1)
    w.start()
    w.finish({i for ids in sent.values() for i in ids})
    with conveyor.connect(cluster_url) as admin:
        wait_for(lambda: admin.xlen(f"{{{streams[0]}}}:dead") == 1, what="the dead letter")
    no_refusals(caplog)
