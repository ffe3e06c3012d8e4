"""The command line's stream commands end to end: real processes, no TTY unless one is made.

produce, consume, run, pending, claim, groups, monitor, scale, trim and exporter, each on its
happy path and with one bad input; ``run`` and ``exporter`` are scraped over HTTP.
"""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

import conveyor
from conveyor._keys import dead_letter_key, heartbeat_key
from tests.test_cli import TIMEOUT_S, Running, _env, assert_clean_error

Name = Callable[[str], str]


def cli(
    *args: str, url: str | None = None, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``conveyor ARGS`` with ``--url`` given through REDIS_URL, stdin from ``stdin``."""
    environment = env or _env()
    if url is not None:
        environment = {**environment, "REDIS_URL": url}
    return subprocess.run(
        [sys.executable, "-m", "conveyor", *args],
        input=stdin,
        stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True,
        text=True,
        env=environment,
        timeout=TIMEOUT_S,
        check=False,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> str:
    """GET /metrics, retried until the server answers."""
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
                return str(reply.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def sample(text: str, metric: str, **labels: str) -> float:
    """The value of one series in a Prometheus text exposition."""
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name != metric:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {metric}{labels} in:\n{text}")


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


def group_row(r: redis.Redis, stream: str, group: str) -> dict[str, Any]:
    """The XINFO GROUPS row of ``group``; empty until the stream and the group exist."""
    rows: Any = r.xinfo_groups(stream) if r.exists(stream) else []
    return next((row for row in rows if row["name"].decode() == group), {})


@pytest.fixture
def seeded(r: redis.Redis, name: Name) -> tuple[str, str]:
    """The seed's figures: 94 entries, group g with consumers a (42) and b (41) holding 83
    pending, 11 undelivered."""
    stream = name("orders")
    for i in range(94):
        r.xadd(stream, {"n": i})
    r.xgroup_create(stream, "g", "0")
    r.xreadgroup("g", "a", {stream: ">"}, count=42)
    r.xreadgroup("g", "b", {stream: ">"}, count=41)
    return stream, "g"


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    """Long-running commands started by a test; killed if the test left them running."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def start(
    started: list[subprocess.Popen[str]], *args: str, env: dict[str, str]
) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    started.append(proc)
    return proc


def stop(proc: subprocess.Popen[str]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=TIMEOUT_S)
    return proc.returncode, err


# -- produce -------------------------------------------------------------------------------------


def test_produce_fields_from_arguments(redis_url: str, r: redis.Redis, name: Name) -> None:
    stream = name("orders")

    result = cli("produce", "--stream", stream, "order_id=42", "note=a=b", url=redis_url)

    assert result.returncode == 0, result.stderr
    [(entry_id, fields)] = r.xrange(stream)
    assert result.stdout.strip() == entry_id.decode()
    assert fields == {b"order_id": b"42", b"note": b"a=b"}


def test_produce_json_lines_from_stdin(redis_url: str, r: redis.Redis, name: Name) -> None:
    stream = name("orders")
    lines = "".join(json.dumps({"n": i, "price": 9.5, "who": "x"}) + "\n" for i in range(1200))

    result = cli(
        "produce", "-s", stream, "--quiet", "--maxlen", "5000", stdin=lines + "\n", url=redis_url
    )
    payload = cli(
        "produce", "-s", stream, "--json-payload", stdin='{"a": [1, {"b": 2}]}\n', url=redis_url
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1200"
    assert payload.returncode == 0, payload.stderr
    entries = r.xrange(stream)
    assert len(entries) == 1201
    assert entries[7][1] == {b"n": b"7", b"price": b"9.5", b"who": b"x"}
    assert json.loads(entries[-1][1][b"payload"]) == {"a": [1, {"b": 2}]}


def test_produce_a_nested_value_is_an_error_naming_the_line(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    stream = name("orders")

    result = cli(
        "produce", "-s", stream, stdin='{"n": 1}\n{"n": 2}\n{"n": {"x": 1}}\n', url=redis_url
    )

    assert_clean_error(result)
    assert "line 3" in result.stderr and "'n'" in result.stderr
    assert "--json-payload" in result.stderr
    assert "entries added before it: 2" in result.stderr
    assert r.xlen(stream) == 2


def test_produce_an_argument_without_equals_is_an_error(redis_url: str, name: Name) -> None:
    result = cli("produce", "-s", name("orders"), "order_id", url=redis_url)

    assert_clean_error(result)
    assert "'order_id' is not FIELD=VALUE" in result.stderr


# -- consume -------------------------------------------------------------------------------------


def test_consume_prints_json_lines_and_acks(redis_url: str, r: redis.Redis, name: Name) -> None:
    stream = name("orders")
    ids = [r.xadd(stream, {"n": i}).decode() for i in range(25)]

    first = cli(
        "consume", "-s", stream, "-g", "g", "--count", "10", "--batch-size", "4", url=redis_url
    )
    rest = cli("consume", "-s", stream, "-g", "g", "--max-wait-ms", "100", url=redis_url)

    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    assert [row["id"] for row in rows] == ids[:10]
    assert rows[0] == {"stream": stream, "id": ids[0], "deliveries": 1, "fields": {"n": "0"}}
    assert rest.returncode == 0, rest.stderr
    assert [json.loads(line)["id"] for line in rest.stdout.splitlines()] == ids[10:]
    assert "15 acked" in rest.stderr
    assert group_row(r, stream, "g")["pending"] == 0


def test_consume_peek_only_looks_and_leaves_no_consumer(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    stream = name("orders")
    ids = [r.xadd(stream, {"n": i}).decode() for i in range(5)]
    r.xgroup_create(stream, "g", "0")
    r.xreadgroup("g", "worker", {stream: ">"}, count=2)  # delivered: not shown

    first = cli("consume", "-s", stream, "-g", "g", "--peek", "--count", "2", url=redis_url)
    again = cli("consume", "-s", stream, "-g", "g", "--peek", "--max-wait-ms", "50", url=redis_url)

    assert first.returncode == 0, first.stderr
    rows = [json.loads(line) for line in first.stdout.splitlines()]
    assert [(row["id"], row["deliveries"]) for row in rows] == [(ids[2], 0), (ids[3], 0)]
    assert "only looked: nothing changed" in first.stderr
    assert [json.loads(line)["id"] for line in again.stdout.splitlines()] == ids[2:]
    # nothing changed: no new consumer (none to turn DEAD later), nothing pending, no move
    assert [c["name"] for c in r.xinfo_consumers(stream, "g")] == [b"worker"]
    assert group_row(r, stream, "g")["pending"] == 2
    assert group_row(r, stream, "g")["last-delivered-id"].decode() == ids[1]
    health = cli("monitor", "-s", stream, "-g", "g", url=redis_url)
    assert "DEAD" not in health.stdout + health.stderr


def test_consume_peek_with_a_consumer_is_one_error_line(redis_url: str, name: Name) -> None:
    result = cli("consume", "-s", name("orders"), "-g", "g", "--peek", "-c", "x", url=redis_url)
    both = cli("consume", "-s", name("orders"), "-g", "g", "--peek", "--no-ack", url=redis_url)

    assert_clean_error(result)
    assert "--peek" in result.stderr and "--consumer" in result.stderr
    assert_clean_error(both)
    assert "--peek and --no-ack" in both.stderr


def test_consume_no_ack_reads_with_noack_and_leaves_nothing_pending(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    stream = name("metrics")
    ids = [r.xadd(stream, {"n": i}).decode() for i in range(7)]
    r.xgroup_create(stream, "g", "0")

    first = cli(
        "consume", "-s", stream, "-g", "g", "--no-ack", "--count", "3", "-c", "s1", url=redis_url
    )
    rest = cli("consume", "-s", stream, "-g", "g", "--no-ack", "--max-wait-ms", "50", url=redis_url)

    assert first.returncode == 0, first.stderr
    assert [json.loads(line)["id"] for line in first.stdout.splitlines()] == ids[:3]
    assert "read with NOACK (nothing pending, nothing to ack)" in first.stderr
    assert rest.returncode == 0, rest.stderr
    assert [json.loads(line)["id"] for line in rest.stdout.splitlines()] == ids[3:]
    # the group moved past everything, nothing is pending, nothing was acked
    row = group_row(r, stream, "g")
    assert row["pending"] == 0
    assert row["last-delivered-id"].decode() == ids[-1]
    assert r.xpending(stream, "g")["pending"] == 0
    assert [c["name"] for c in r.xinfo_consumers(stream, "g")] == []  # both left the group


def test_consume_a_missing_stream_is_refused_unless_create(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    stream = name("typo")

    refused = cli("consume", "-s", stream, "-g", "g", url=redis_url)
    peek = cli("consume", "-s", stream, "-g", "g", "--peek", url=redis_url)
    created = cli(
        "consume", "-s", stream, "-g", "g", "--create", "--max-wait-ms", "10", url=redis_url
    )

    assert_clean_error(refused)
    assert f"stream {stream!r} does not exist (--create creates it)" in refused.stderr
    assert_clean_error(peek)
    assert created.returncode == 0, created.stderr
    assert group_row(r, stream, "g")["consumers"] == 0  # it left: it held nothing


def test_consume_follow_stops_cleanly_on_sigterm(
    redis_url: str, r: redis.Redis, name: Name, processes: list[subprocess.Popen[str]]
) -> None:
    stream = name("orders")
    r.xadd(stream, {"n": 1})
    env = {**_env(), "REDIS_URL": redis_url}
    proc = start(
        processes, "consume", "-s", stream, "-g", "g", "--follow", "--max-wait-ms", "100", env=env
    )
    wait_for(lambda: group_row(r, stream, "g").get("entries-read") == 1, "read")
    time.sleep(0.3)  # a few empty reads go by: --follow keeps going

    returncode, err = stop(proc)

    assert returncode == 0, err
    assert "Traceback" not in err
    assert group_row(r, stream, "g")["pending"] == 0


def test_consume_a_key_that_is_not_a_stream_is_one_error_line(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    key = name("string")
    r.set(key, "x")

    result = cli("consume", "-s", key, "-g", "g", url=redis_url)

    assert_clean_error(result)
    assert "WRONGTYPE" in result.stderr


# -- run -----------------------------------------------------------------------------------------

HANDLERS = """
import os

SEEN = os.environ["SEEN_FILE"]

def handle(batch):
    with open(SEEN, "a") as seen:
        for msg in batch:
            if msg.fields.get("bad"):
                batch.dead_letter(msg, "bad input")
                continue
            seen.write(f"{os.getpid()} {msg.id}\\n")
            batch.ack(msg)

not_callable = 42

def hang_once(batch):
    # The first process to get a batch hangs on it for good; the others ack.
    try:
        open(SEEN + ".hung", "x").close()
    except FileExistsError:
        return handle(batch)
    import time
    time.sleep(3600)
"""


@pytest.fixture
def worker_env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    (tmp_path / "cli_handlers.py").write_text(HANDLERS)
    return {
        **_env(),
        "REDIS_URL": redis_url,
        "PYTHONPATH": str(tmp_path),
        "SEEN_FILE": str(tmp_path / "seen.txt"),
    }


def seen_ids(env: dict[str, str]) -> list[str]:
    path = Path(env["SEEN_FILE"])
    return [line.split()[1] for line in path.read_text().splitlines()] if path.exists() else []


def test_run_processes_messages_and_serves_metrics(
    r: redis.Redis, name: Name, worker_env: dict[str, str], processes: list[subprocess.Popen[str]]
) -> None:
    stream = name("orders")
    ids = [r.xadd(stream, {"n": i}).decode() for i in range(30)]
    r.xadd(stream, {"bad": "1"})
    port = free_port()

    args = ("-s", stream, "-g", "g", "--max-wait-ms", "100", "--metrics-port", str(port))
    proc = start(
        processes,
        "run",
        "cli_handlers:handle",
        *args,
        "--metrics-addr",
        "127.0.0.1",
        env=worker_env,
    )
    wait_for(lambda: len(seen_ids(worker_env)) == 30, "the worker handled every message")
    labels = {"stream": stream, "group": "g"}
    # Acks ride with the next read: the counters catch up within --max-wait-ms.
    wait_for(
        lambda: sample(scrape(port), "conveyor_worker_messages_acked_total", **labels) == 30,
        "the metrics count every ack",
    )
    metrics = scrape(port)
    returncode, err = stop(proc)

    assert returncode == 0, err
    assert sorted(seen_ids(worker_env)) == sorted(ids)
    assert group_row(r, stream, "g")["pending"] == 0
    assert sample(metrics, "conveyor_worker_messages_processed_total", **labels) == 31
    assert sample(metrics, "conveyor_worker_messages_dead_lettered_total", **labels) == 1
    assert sample(metrics, "conveyor_worker_messages_failed_total", **labels) == 0
    assert sample(metrics, "conveyor_worker_batch_duration_seconds_count", **labels) >= 1
    assert "stopped: delivered 31, acked 30" in err


def test_run_with_concurrency_processes_everything_once(
    r: redis.Redis, name: Name, worker_env: dict[str, str], processes: list[subprocess.Popen[str]]
) -> None:
    stream = name("orders")
    ids = [r.xadd(stream, {"n": i}).decode() for i in range(400)]

    args = (
        "-s",
        stream,
        "-g",
        "g",
        "--concurrency",
        "2",
        "--batch-size",
        "10",
        "--max-wait-ms",
        "100",
    )
    proc = start(processes, "run", "cli_handlers:handle", *args, env=worker_env)
    wait_for(lambda: len(seen_ids(worker_env)) >= 400, "the workers handled every message")
    wait_for(lambda: group_row(r, stream, "g").get("pending") == 0, "every message was acked")
    returncode, err = stop(proc)

    assert returncode == 0, err
    assert sorted(seen_ids(worker_env)) == sorted(ids)  # each exactly once
    assert "all 2 workers stopped cleanly" in err
    pids = {line.split()[0] for line in Path(worker_env["SEEN_FILE"]).read_text().splitlines()}
    assert len(pids) <= 2 and str(proc.pid) not in pids


def test_run_handler_timeout_gives_a_stuck_batch_to_another_worker(
    r: redis.Redis, name: Name, worker_env: dict[str, str], processes: list[subprocess.Popen[str]]
) -> None:
    stream = name("orders")
    ids = [r.xadd(stream, {"n": i}).decode() for i in range(20)]
    args = ("-s", stream, "-g", "g", "--concurrency", "2", "--batch-size", "10")
    timing = ("--max-wait-ms", "100", "--claim-idle-ms", "600", "--grace-period-ms", "100")
    proc = start(
        processes,
        "run",
        "cli_handlers:hang_once",
        *args,
        *timing,
        "--handler-timeout-ms",
        "300",
        env=worker_env,
    )
    wait_for(lambda: len(seen_ids(worker_env)) >= 20, "the stuck batch was handled elsewhere")
    wait_for(lambda: group_row(r, stream, "g").get("pending") == 0, "every message was acked")
    _, err = stop(proc)

    assert sorted(seen_ids(worker_env)) == sorted(ids)
    assert "handler still running after handler_timeout_ms=300 on a batch of 10" in err


def test_run_linger_zero_hands_a_lone_message_over_at_once(
    r: redis.Redis, name: Name, worker_env: dict[str, str], processes: list[subprocess.Popen[str]]
) -> None:
    stream = name("orders")
    args = ("-s", stream, "-g", "g", "--batch-size", "100", "--max-wait-ms", "600000")
    proc = start(processes, "run", "cli_handlers:handle", *args, "--linger-ms", "0", env=worker_env)
    wait_for(lambda: group_row(r, stream, "g").get("consumers") == 1, "the worker joined")
    msg_id = r.xadd(stream, {"n": 1}).decode()
    # a batch of 100 with ten minutes to fill: only linger_ms=0 hands this one over now
    wait_for(lambda: seen_ids(worker_env) == [msg_id], "the message handled")
    wait_for(lambda: group_row(r, stream, "g").get("pending") == 0, "the message acked")
    proc.kill()  # a warm stop would wait for the idle read in flight: ten minutes here
    proc.wait(10)


@pytest.mark.parametrize("concurrency", ["1", "2"])
def test_run_no_ack_reads_at_most_once_and_keeps_failures_as_dead_letters(
    r: redis.Redis,
    name: Name,
    worker_env: dict[str, str],
    processes: list[subprocess.Popen[str]],
    concurrency: str,
) -> None:
    stream = name("metrics")
    ids = [r.xadd(stream, {"n": i}).decode() for i in range(50)]
    bad = r.xadd(stream, {"bad": "1"}).decode()
    args = ("-s", stream, "-g", "g", "--max-wait-ms", "100", "--concurrency", concurrency)
    proc = start(processes, "run", "cli_handlers:handle", *args, "--no-ack", env=worker_env)
    wait_for(lambda: len(seen_ids(worker_env)) == 50, "the worker handled every message")
    dead = dead_letter_key(stream)
    wait_for(lambda: r.exists(dead) and r.xlen(dead) == 1, "the bad one dead-lettered")
    assert not r.exists(heartbeat_key(stream, "g"))  # nothing to renew: no heartbeats
    returncode, err = stop(proc)

    assert returncode == 0, err
    assert sorted(seen_ids(worker_env)) == sorted(ids)
    row = group_row(r, stream, "g")
    assert row["pending"] == 0 and row["last-delivered-id"].decode() == bad  # never pending
    ((_, letter),) = r.xrange(dead)
    assert letter[b"conveyor.origin_id"].decode() == bad


def test_run_no_ack_with_a_handler_timeout_is_one_error_line(worker_env: dict[str, str]) -> None:
    args = ("-s", "s", "-g", "g", "--no-ack", "--handler-timeout-ms", "100")
    result = cli("run", "cli_handlers:handle", *args, env=worker_env)

    assert_clean_error(result)
    assert "handler_timeout_ms does not go with noack=True" in result.stderr


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("no_such_module:handle", "cannot import module 'no_such_module'"),
        ("cli_handlers:missing", "module 'cli_handlers' has no attribute 'missing'"),
        ("cli_handlers:not_callable", "is not callable"),
        ("cli_handlers", "is not MODULE:FUNC"),
    ],
)
def test_run_a_bad_handler_is_one_error_line(
    worker_env: dict[str, str], target: str, says: str
) -> None:
    result = cli("run", target, "-s", "s", "-g", "g", env=worker_env)

    assert_clean_error(result)
    assert says in result.stderr


# -- pending and claim ---------------------------------------------------------------------------


def test_pending_table_and_json(redis_url: str, seeded: tuple[str, str]) -> None:
    stream, group = seeded

    table = cli("pending", "-s", stream, "-g", group, "--count", "5", url=redis_url)
    lines = cli("pending", "-s", stream, "-g", group, "--consumer", "b", "--json", url=redis_url)

    assert table.returncode == 0, table.stderr
    assert f"{stream} group g: 83 pending (a 42, b 41); showing 5" in table.stdout
    for header in ("id", "consumer", "idle", "deliveries"):
        assert header in table.stdout
    assert lines.returncode == 0, lines.stderr
    rows = [json.loads(line) for line in lines.stdout.splitlines()]
    assert len(rows) == 41
    assert {row["consumer"] for row in rows} == {"b"}
    assert rows[0].keys() == {"id", "consumer", "idle_ms", "deliveries"}


def test_pending_of_a_missing_group_names_the_groups(
    redis_url: str, seeded: tuple[str, str]
) -> None:
    stream, _ = seeded

    result = cli("pending", "-s", stream, "-g", "nope", url=redis_url)

    assert_clean_error(result)
    assert f"stream {stream!r} has no group 'nope' (groups: 'g')" in result.stderr


def test_claim_dry_run_then_move(redis_url: str, r: redis.Redis, seeded: tuple[str, str]) -> None:
    stream, group = seeded
    base = ("claim", "-s", stream, "-g", group, "--to", "c", "--from", "a", "--min-idle-ms", "0")

    dry = cli(*base, "--count", "10", "--dry-run", url=redis_url)
    moved = cli(*base, "--count", "10", url=redis_url)

    assert dry.returncode == 0, dry.stderr
    assert "dry run: would move 10 entries to 'c' (from a: 10)" in dry.stdout
    assert moved.returncode == 0, moved.stderr
    assert "moved 10 entries to 'c' (from a: 10)" in moved.stdout
    summary: Any = r.xpending(stream, group)
    held = {c["name"].decode(): c["pending"] for c in summary["consumers"]}
    assert held == {"a": 32, "b": 41, "c": 10}
    assert summary["pending"] == 83  # nothing deleted


def test_claim_on_a_missing_stream_is_one_error_line(redis_url: str, name: Name) -> None:
    result = cli("claim", "-s", name("none"), "-g", "g", "--to", "c", url=redis_url)

    assert_clean_error(result)
    assert "does not exist" in result.stderr


# -- groups --------------------------------------------------------------------------------------


def test_groups_create_setid_ls_destroy(redis_url: str, r: redis.Redis, name: Name) -> None:
    stream = name("orders")
    g = ("-s", stream, "-g", "billing")

    created = cli("groups", "create", *g, "--mkstream", "--id", "$", url=redis_url)
    r.xadd(stream, {"n": 1})
    moved = cli("groups", "setid", *g, "--id", "0", url=redis_url)
    listed = cli("groups", "ls", "-s", stream, url=redis_url)
    r.xreadgroup("billing", "w", {stream: ">"})
    refused = cli("groups", "destroy", *g, url=redis_url)
    destroyed = cli("groups", "destroy", *g, "--yes", url=redis_url)

    assert created.returncode == 0, created.stderr
    assert moved.returncode == 0, moved.stderr
    assert "(undelivered now: 1)" in moved.stdout
    assert "billing" in listed.stdout and "lag" in listed.stdout
    assert_clean_error(refused)
    assert "--yes" in refused.stderr and "1 pending entry" in refused.stderr
    assert destroyed.returncode == 0, destroyed.stderr
    assert "dropped its 1 consumers and 1 pending entry" in destroyed.stdout
    assert r.xinfo_groups(stream) == []


def test_groups_create_twice_says_it_exists_and_exits_0(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    stream = name("orders")
    first = cli("groups", "create", "-s", stream, "-g", "g", "--mkstream", url=redis_url)
    r.xadd(stream, {"n": 1})
    r.xreadgroup("g", "w", {stream: ">"})

    again = cli("groups", "create", "-s", stream, "-g", "g", "--id", "$", url=redis_url)
    as_json = cli("groups", "create", "-s", stream, "-g", "g", "--json", url=redis_url)

    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    assert "already exists" in again.stdout and "left as it is" in again.stdout
    assert json.loads(as_json.stdout)["created"] is False
    assert group_row(r, stream, "g")["pending"] == 1  # untouched


# -- monitor -------------------------------------------------------------------------------------


def test_monitor_prints_the_grid_and_exits_with_the_verdict(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    stream = name("orders")
    r.xadd(stream, {"n": 1})
    r.xgroup_create(stream, "g", "0")
    r.xreadgroup("g", "worker-1", {stream: ">"})
    r.xack(stream, "g", *(entry_id for entry_id, _ in r.xrange(stream)))

    healthy = cli("monitor", "--stream", stream, "--group", "g", url=redis_url)
    as_json = cli("monitor", "-s", stream, "-g", "g", "--json", url=redis_url)
    time.sleep(0.05)
    idle = cli("monitor", "-s", stream, "-g", "g", "--idle-threshold-ms", "1", url=redis_url)

    assert healthy.returncode == 0, healthy.stderr
    assert "| Consumer id   |" in healthy.stdout
    assert "Idle time" in healthy.stdout and "Pending items" in healthy.stdout
    assert re.search(r"\| worker-1 +\| +\d+ \| +0 \| OK +\|", healthy.stdout), healthy.stdout
    assert "health: OK" in healthy.stderr
    snapshot = json.loads(as_json.stdout)
    assert snapshot["groups"][0]["name"] == "g" and snapshot["groups"][0]["lag"] == 0
    assert idle.returncode == 1, idle.stderr
    assert "WARNING - idle for long time" in idle.stdout


def test_monitor_a_missing_stream_is_one_error_line(redis_url: str, name: Name) -> None:
    result = cli("monitor", "-s", name("none"), url=redis_url)

    assert_clean_error(result)
    assert result.returncode == 3  # UNKNOWN
    assert "does not exist" in result.stderr


@pytest.mark.parametrize("garbage", ["²", "abc", "", "12:x", "9" * 5000])
def test_monitor_judges_a_consumer_with_a_garbage_heartbeat_by_idle_time(
    redis_url: str, r: redis.Redis, name: Name, garbage: str
) -> None:
    stream = name("orders")
    r.xadd(stream, {"n": 1})
    r.xgroup_create(stream, "g", "0")
    r.xreadgroup("g", "w1", {stream: ">"})
    r.hset(heartbeat_key(stream, "g"), "w1", garbage)

    result = cli("monitor", "-s", stream, "-g", "g", url=redis_url)

    assert result.returncode == 0, result.stderr
    assert re.search(r"\| w1 +\| +\d+ \| +1 \| OK +\|", result.stdout), result.stdout
    assert "Traceback" not in result.stderr


def test_monitor_with_a_heartbeats_key_of_the_wrong_type_warns_once(
    redis_url: str, r: redis.Redis, name: Name
) -> None:
    stream = name("orders")
    r.xadd(stream, {"n": 1})
    r.xgroup_create(stream, "g", "0")
    r.xreadgroup("g", "w1", {stream: ">"})
    r.set(heartbeat_key(stream, "g"), "not a hash")

    result = cli("monitor", "-s", stream, "-g", "g", url=redis_url)

    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "is not a hash" in warnings[0]
    assert "health: OK" in result.stderr


# -- scale ---------------------------------------------------------------------------------------


def test_scale_prints_the_seed_line_and_ours(redis_url: str, seeded: tuple[str, str]) -> None:
    stream, group = seeded

    args = ("scale", "-s", stream, "-g", group, "--scale-out-rate", "60", "--scale-in-rate", "20")
    result = cli(*args, url=redis_url)
    as_json = cli(*args, "--json", url=redis_url)

    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first == "Consumers should be IN as stream length (11) / pending (83) rate is 13.253%"
    assert second.startswith("Recommended consumers: ")
    decision = json.loads(as_json.stdout)
    assert (decision["suggestion"], decision["lag"], decision["pending"]) == ("IN", 11, 83)


def test_scale_keda_prints_a_scaled_object() -> None:
    result = cli(
        "scale",
        "-s",
        "orders",
        "-g",
        "billing",
        "--keda",
        "--name",
        "billing",
        "--deployment",
        "worker",
        "--max-consumers",
        "8",
    )

    assert result.returncode == 0, result.stderr
    assert "kind: ScaledObject" in result.stdout
    assert 'consumerGroup: "billing"' in result.stdout and "maxReplicaCount: 8" in result.stdout


def test_scale_rates_in_the_wrong_order_are_one_error_line(
    redis_url: str, seeded: tuple[str, str]
) -> None:
    stream, group = seeded

    args = ("-s", stream, "-g", group, "--scale-out-rate", "20", "--scale-in-rate", "60")
    result = cli("scale", *args, url=redis_url)

    assert_clean_error(result)
    assert "scale_in_rate" in result.stderr


# -- trim ----------------------------------------------------------------------------------------


def test_trim_safe_keeps_what_any_group_still_needs(
    redis_url: str, r: redis.Redis, seeded: tuple[str, str]
) -> None:
    stream, group = seeded
    acked = [entry_id for entry_id, _ in r.xrange(stream, count=20)]
    r.xack(stream, group, *acked)

    dry = cli("trim", "-s", stream, "--safe", "--dry-run", url=redis_url)
    done = cli("trim", "-s", stream, "--safe", url=redis_url)

    assert dry.returncode == 0, dry.stderr
    assert "would trim 20 of 94" in dry.stdout
    assert done.returncode == 0, done.stderr
    assert "trimmed 20 of 94" in done.stdout
    assert r.xlen(stream) == 74


def test_trim_maxlen_says_what_it_would_cut_and_asks(
    redis_url: str, r: redis.Redis, seeded: tuple[str, str]
) -> None:
    stream, _ = seeded

    refused = cli("trim", "-s", stream, "--maxlen", "5", url=redis_url)
    done = cli("trim", "-s", stream, "--maxlen", "0", "--yes", url=redis_url)

    assert_clean_error(refused)
    assert "--yes" in refused.stderr
    assert "group 'g': 6 undelivered and 83 pending" in refused.stderr
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("trimmed ")


def test_trim_maxlen_on_a_terminal_asks_and_no_keeps_everything(
    redis_url: str, r: redis.Redis, seeded: tuple[str, str]
) -> None:
    stream, _ = seeded
    controller, terminal = pty.openpty()
    try:
        os.write(controller, b"n\n")
        result = subprocess.run(
            [sys.executable, "-m", "conveyor", "trim", "-s", stream, "--maxlen", "10"],
            stdin=terminal,
            capture_output=True,
            text=True,
            env={**_env(), "REDIS_URL": redis_url},
            timeout=TIMEOUT_S,
            check=False,
        )
    finally:
        os.close(controller)
        os.close(terminal)

    assert "Trim" in result.stderr and "1 undelivered and 83 pending" in result.stderr
    assert result.returncode == 1
    assert r.xlen(stream) == 94


def test_trim_needs_safe_or_maxlen(redis_url: str, seeded: tuple[str, str]) -> None:
    result = cli("trim", "-s", seeded[0], url=redis_url)

    assert_clean_error(result)
    assert "--safe or --maxlen" in result.stderr


# -- exporter ------------------------------------------------------------------------------------


def test_exporter_serves_lag_and_pending_until_sigterm(
    redis_url: str, seeded: tuple[str, str], name: Name, processes: list[subprocess.Popen[str]]
) -> None:
    stream, group = seeded
    missing, dead = name("missing"), name("dead")  # consumers given dead_letter=dead
    redis.Redis.from_url(redis_url).xadd(dead, {"n": "1"})
    port = free_port()
    env = {**_env(), "REDIS_URL": redis_url}

    args = ("--port", str(port), "--addr", "127.0.0.1", "-s", stream, "-s", missing)
    proc = start(processes, "exporter", *args, "--dead-letter", dead, env=env)
    metrics = scrape(port)
    returncode, err = stop(proc)

    assert returncode == 0, err
    assert sample(metrics, "conveyor_up", stream=stream) == 1
    assert sample(metrics, "conveyor_up", stream=missing) == 0
    assert sample(metrics, "conveyor_stream_length", stream=stream) == 94
    assert sample(metrics, "conveyor_group_lag", stream=stream, group=group) == 11
    assert sample(metrics, "conveyor_group_pending", stream=stream, group=group) == 83
    assert sample(metrics, "conveyor_group_consumers", stream=stream, group=group) == 2
    assert sample(metrics, "conveyor_consumer_pending", stream=stream, consumer="a") == 42
    assert sample(metrics, "conveyor_dead_letter_length", stream=stream) == 1
    assert "Traceback" not in err


def test_exporter_on_a_port_in_use_is_one_error_line(redis_url: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = cli("exporter", "-p", str(port), "--addr", "127.0.0.1", "-s", "x", url=redis_url)

    assert_clean_error(result)
    assert f"cannot serve on 127.0.0.1:{port}" in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("exporter", "--port", "1", "-s", "orders"),
        ("run", "cli_handlers:handle", "-s", "s", "-g", "g", "--metrics-port", "1"),
    ],
)
def test_metrics_without_prometheus_client_give_the_install_hint(
    worker_env: dict[str, str], args: tuple[str, ...]
) -> None:
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from conveyor.cli import main\n"
        f"main({list(args)!r}, prog_name='conveyor')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=worker_env,
        timeout=TIMEOUT_S,
        check=False,
    )

    assert_clean_error(result)
    assert "pip install 'conveyor[metrics]'" in result.stderr


# -- help ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "words"),
    [
        (("produce",), ("--stream", "--maxlen", "--json-payload", "--quiet", "FIELD=VALUE")),
        (("consume",), ("--group", "--consumer", "--count", "--no-ack", "--peek", "--follow")),
        (("run",), ("MODULE:FUNC", "--concurrency", "--metrics-port", "--claim-idle-ms")),
        (("pending",), ("--consumer", "--count", "--json", "--min-idle-ms")),
        (("claim",), ("--to", "--from", "--min-idle-ms", "--dry-run")),
        (("groups",), ("create", "destroy", "setid", "ls")),
        (("groups", "ls"), ("--stream", "lag")),
        (("groups", "create"), ("--id", "--mkstream")),
        (("groups", "destroy"), ("--yes", "pending")),
        (("groups", "setid"), ("--id", "--yes")),
        (("monitor",), ("--watch", "--interval", "--json", "--rich", "--cleanup")),
        (("scale",), ("--scale-out-rate", "--scale-in-rate", "--keda", "--deployment")),
        (("trim",), ("--safe", "--maxlen", "--dry-run", "--yes")),
        (("exporter",), ("--port", "--stream", "--interval", "conveyor_group_lag")),
    ],
)
def test_help_is_complete_with_examples(command: tuple[str, ...], words: tuple[str, ...]) -> None:
    result = cli(*command, "--help")

    assert result.returncode == 0, result.stderr
    for word in (*words, "Example"):
        assert word in result.stdout, f"{word!r} not in the help of {command}"
    if command != ("groups",):
        assert "--url" in result.stdout


# -- a server that is not up yet -----------------------------------------------------------------


@pytest.fixture
def late_server() -> Iterator[tuple[str, Callable[[], conveyor.EmbeddedServer]]]:
    """The URL of a free port where nothing listens yet, and how to start a server there."""
    port = free_port()
    started: list[conveyor.EmbeddedServer] = []

    def start_server() -> conveyor.EmbeddedServer:
        binary = os.environ.get("CONVEYOR_TEST_SERVER") or None
        server = conveyor.EmbeddedServer(binary, port=port).start()
        started.append(server)
        return server

    yield f"redis://127.0.0.1:{port}/0", start_server
    for server in started:
        server.close()


def lines_with(output: str, text: str) -> list[str]:
    return [line for line in output.splitlines() if text in line]


def test_run_waits_for_a_server_that_is_not_up_yet(
    name: Name,
    worker_env: dict[str, str],
    late_server: tuple[str, Callable[[], conveyor.EmbeddedServer]],
) -> None:
    url, start_server = late_server
    stream = name("orders")
    run = Running(
        "run", "cli_handlers:handle", "-s", stream, "-g", "g", "--max-wait-ms", "100",
        "--url", url, env=worker_env,
    )  # fmt: skip
    try:
        run.wait_for(r"WARNING conveyor\.cli: cannot reach the server at .*: waiting for it")
        assert run.proc.poll() is None  # waiting, not gone

        start_server()
        client = conveyor.connect(url)
        ids = [client.xadd(stream, {"n": i}).decode() for i in range(5)]
        client.close()
        run.saw(r"INFO conveyor\.cli: connected to the server at ")
        wait_for(lambda: len(seen_ids(worker_env)) == 5, "the worker handled every message")
        run.proc.send_signal(signal.SIGTERM)
        returncode, output = run.finish()
    finally:
        run.kill()

    assert returncode == 0, output
    assert sorted(seen_ids(worker_env)) == sorted(ids)
    assert len(lines_with(output, "cannot reach the server")) == 1
    assert len(lines_with(output, "connected to the server")) == 1
    assert "Traceback" not in output


def test_run_stops_cleanly_while_waiting_for_the_server(
    worker_env: dict[str, str], late_server: tuple[str, Callable[[], conveyor.EmbeddedServer]]
) -> None:
    url, _ = late_server
    run = Running("run", "cli_handlers:handle", "-s", "s", "-g", "g", "--url", url, env=worker_env)
    try:
        run.wait_for("cannot reach the server")
        run.proc.send_signal(signal.SIGTERM)
        returncode, output = run.finish()
    finally:
        run.kill()

    assert returncode == 0, output
    assert "stopped before the server answered" in output


def test_exporter_serves_up_0_until_the_server_is_up(
    name: Name, late_server: tuple[str, Callable[[], conveyor.EmbeddedServer]]
) -> None:
    url, start_server = late_server
    stream = name("orders")
    port = free_port()
    run = Running("exporter", "-p", str(port), "--addr", "127.0.0.1", "-s", stream, "--url", url)
    try:
        down = scrape(port)
        run.saw(r"WARNING conveyor\.cli: cannot reach the server at .*conveyor_up 0")
        assert run.proc.poll() is None

        start_server()
        client = conveyor.connect(url)
        client.xadd(stream, {"n": 1})
        client.xgroup_create(stream, "g", "0")
        client.close()
        wait_for(lambda: sample(scrape(port), "conveyor_up", stream=stream) == 1, "up")
        run.saw(r"INFO conveyor\.cli: connected to the server at ")
        up = scrape(port)
        run.proc.send_signal(signal.SIGTERM)
        returncode, output = run.finish()
    finally:
        run.kill()

    assert sample(down, "conveyor_up", stream=stream) == 0
    assert sample(down, "conveyor_health", stream=stream) == 3  # unknown
    assert sample(up, "conveyor_health", stream=stream) == 1  # a backlog, nobody to read it
    assert sample(up, "conveyor_group_lag", stream=stream, group="g") == 1
    assert returncode == 0, output
    assert len(lines_with(output, "cannot reach the server")) == 1
    assert len(lines_with(output, "connected to the server")) == 1


def test_monitor_watch_shows_unknown_until_the_server_is_up(
    name: Name, late_server: tuple[str, Callable[[], conveyor.EmbeddedServer]]
) -> None:
    url, start_server = late_server
    stream = name("orders")
    args = ("monitor", "-s", stream, "--watch", "--json", "--interval", "0.1", "--url", url)
    run = Running(*args)
    try:
        run.saw(r'"code": 3, "status": "UNKNOWN"')
        run.saw(r"WARNING conveyor\.cli: cannot reach the server at .*showing UNKNOWN")
        assert run.proc.poll() is None

        start_server()
        client = conveyor.connect(url)
        client.xadd(stream, {"n": 1})
        client.xgroup_create(stream, "g", "0")
        client.close()
        verdict = json.loads(run.wait_for(r'^\{"version".*"code": 1').string)
        run.saw(r"INFO conveyor\.cli: connected to the server at ")
        run.proc.send_signal(signal.SIGTERM)
        returncode, output = run.finish()
    finally:
        run.kill()

    assert verdict["groups"][0]["lag"] == 1 and verdict["health"]["status"] == "WARNING"
    assert returncode == 0, output
    assert len(lines_with(output, "cannot reach the server")) == 1
    assert len(lines_with(output, "connected to the server")) == 1


# -- papercuts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("db", ["abc", "1.5", "99999"])
@pytest.mark.parametrize("command", [("groups", "ls", "-s", "x"), ("monitor", "-s", "x")])
def test_a_bad_database_in_the_url_is_one_error_line(
    redis_url: str, db: str, command: tuple[str, ...]
) -> None:
    url = redis_url.rsplit("/", 1)[0] + "/" + db

    result = cli(*command, "--url", url)

    assert_clean_error(result)
    assert result.returncode in (1, 3)  # 3: monitor's UNKNOWN
    says = "DB index is out of range" if db.isdigit() else "is not a number"
    assert says in result.stderr


@pytest.mark.parametrize(
    ("line", "whole", "says"),
    [
        ('{"price": NaN}', False, "field 'price' is nan"),
        ('{"price": Infinity}', False, "field 'price' is inf"),
        ('{"price": 1e999}', False, "field 'price' is inf"),
        ('{"items": [1, {"x": -Infinity}]}', True, "payload['items'][1]['x'] is -inf"),
        ("NaN", True, "payload is nan"),
    ],
)
def test_produce_refuses_nan_and_infinity(
    redis_url: str, r: redis.Redis, name: Name, line: str, whole: bool, says: str
) -> None:
    stream = name("orders")
    args = ("produce", "-s", stream, *(["--json-payload"] if whole else []))

    result = cli(*args, stdin='{"ok": 1}\n' + line + "\n", url=redis_url)

    assert_clean_error(result)
    assert f"line 2: {says}" in result.stderr and "not a JSON number" in result.stderr
    assert r.xlen(stream) == 1  # the line before it was added


def _json_cases() -> list[tuple[str, tuple[str, ...], set[str], tuple[int, ...]]]:
    pending_row = {"id", "consumer", "idle_ms", "deliveries"}
    group_row_keys = {"stream", "group", "consumers", "pending", "last_delivered_id", "lag"}
    return [
        ("produce", ("produce", "-s", "{s}", "a=1"), {"stream", "id"}, (0,)),
        ("consume", ("consume", "-s", "{s}", "-g", "j", "--count", "2"), {"stream", "id"}, (0,)),
        ("pending", ("pending", "-s", "{s}", "-g", "g", "--count", "3"), pending_row, (0,)),
        (
            "claim",
            ("claim", "-s", "{s}", "-g", "g", "--to", "c", "--min-idle-ms", "0", "--dry-run"),
            {"stream", "group", "to", "dry_run", "entries", "left_alone"},
            (0,),
        ),
        ("groups ls", ("groups", "ls", "-s", "{s}"), group_row_keys, (0,)),
        (
            "groups create",
            ("groups", "create", "-s", "{s}", "-g", "new"),
            {"stream", "group", "created", "last_delivered_id"},
            (0,),
        ),
        (
            "groups setid",
            ("groups", "setid", "-s", "{s}", "-g", "g", "--id", "0"),
            group_row_keys,
            (0,),
        ),
        (
            "groups destroy",
            ("groups", "destroy", "-s", "{s}", "-g", "g", "--yes"),
            {"stream", "group", "destroyed", "consumers", "pending"},
            (0,),
        ),
        ("dlq ls", ("dlq", "ls", "-s", "{s}"), {"id", "origin_stream", "error", "fields"}, (0,)),
        (
            "dlq replay",
            ("dlq", "replay", "-s", "{s}", "--dry-run"),
            {"dead_letter", "dry_run", "matched", "replayed"},
            (0,),
        ),
        ("dlq purge", ("dlq", "purge", "-s", "{s}", "--dry-run"), {"dead_letter", "purged"}, (0,)),
        (
            "scale",
            ("scale", "-s", "{s}", "-g", "g"),
            {"stream", "group", "suggestion", "lag"},
            (0,),
        ),
        (
            "trim --safe",
            ("trim", "-s", "{s}", "--safe", "--dry-run"),
            {"stream", "trimmed", "minid", "dry_run"},
            (0,),
        ),
        (
            "trim --maxlen",
            ("trim", "-s", "{s}", "--maxlen", "10", "--dry-run"),
            {"stream", "cut", "losses", "dry_run"},
            (0,),
        ),
        (
            "monitor",
            ("monitor", "-s", "{s}"),
            {"version", "stream", "groups", "thresholds", "health"},
            (0, 1, 2),
        ),
        (
            "monitor --cleanup",
            ("monitor", "-s", "{s}", "--cleanup"),
            {"stream", "moved", "removed", "left_for_reclaim", "dropped", "revived"},
            (0,),
        ),
    ]


@pytest.mark.parametrize(
    ("args", "keys", "codes"), [c[1:] for c in _json_cases()], ids=[c[0] for c in _json_cases()]
)
def test_json_on_every_command_that_prints_data(
    redis_url: str,
    r: redis.Redis,
    seeded: tuple[str, str],
    args: tuple[str, ...],
    keys: set[str],
    codes: tuple[int, ...],
) -> None:
    stream, _ = seeded
    r.xadd(dead_letter_key(stream), {"n": "dead"})

    result = cli(*(a.replace("{s}", stream) for a in args), "--json", url=redis_url)

    assert result.returncode in codes, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows, f"{args} printed nothing"
    for row in rows:
        assert isinstance(row, dict) and keys <= row.keys(), row


def all_commands() -> list[tuple[str, ...]]:
    from conveyor.cli import main

    found: list[tuple[str, ...]] = [()]

    def walk(group: Any, path: tuple[str, ...]) -> None:
        for command_name, command in group.commands.items():
            found.append((*path, command_name))
            if hasattr(command, "commands"):
                walk(command, (*path, command_name))

    walk(main, ())
    return found


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: " ".join(c) or "conveyor")
def test_no_help_text_talks_of_a_seed(command: tuple[str, ...]) -> None:
    result = cli(*command, "--help")

    assert result.returncode == 0, result.stderr
    assert "seed" not in result.stdout.lower()
