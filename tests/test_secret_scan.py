"""A password never shows in what conveyor prints or logs, whichever command runs and however
it ends (DESIGN promise 7), on a real server whose default user has a password.

Every command of the CLI runs with the URL in each shape (``redis://:PW@host:port``,
``redis://default:PW@host:port/0``, ``redis://host:port?password=PW``, ``$REDIS_URL``, and an
ACL user's ``redis://scanner:PW@host:port/0``), at
``-v``, ``-vv`` and with ``--log-format json``; then against an unreachable port with the same
password, with a wrong password (WRONGPASS) and with none (NOAUTH), where each must fail in one
``error:`` line and no traceback. Short commands run through the CLI's entry point in this
process (a process each would take a second to start); long-running ones (``run``, also with
``--concurrency``, ``exporter``, ``monitor --watch``, ``consume --follow``) run as processes,
started together and stopped with SIGTERM once they work. Last, the library's own log records
through handler failures, retries and a server restart.

The password needs percent-encoding (``/ @ # :``) and holds a "Q", as does the wrong one:
neither, nor any 4-character piece of them that holds the "Q", may show, as written,
percent-encoded or percent-decoded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, quote_plus, unquote

import click
import pytest
import redis
from click.testing import CliRunner

import conveyor
from conveyor import Consumer, EmbeddedServer, Producer
from conveyor.cli import main
from conveyor.server import free_port

PASSWORD = "ps/3cQr@t#:x"
WRONG_PASSWORD = "ps/3cQr@t#:y"
MARK = "Q"
ENCODED = quote(PASSWORD, safe="")
WRONG_ENCODED = quote(WRONG_PASSWORD, safe="")

DEADLINE_S = 30


def _telltales(*passwords: str) -> frozenset[str]:
    """What would give a password away: its forms (as written, percent-encoded, decoded) and
    every 4-character piece of them that holds the marker."""
    found: set[str] = set()
    for password in passwords:
        for form in (password, quote(password, safe=""), quote(password), quote_plus(password)):
            for text in (form, unquote(form)):
                found.add(text)
                found.update(
                    text[i : i + 4] for i in range(len(text) - 3) if MARK in text[i : i + 4]
                )
    return frozenset(found)


TELLTALES = _telltales(PASSWORD, WRONG_PASSWORD)


def leaks(text: str) -> list[str]:
    return sorted(t for t in TELLTALES if t in text)


def test_the_scan_finds_a_password_and_pieces_of_it() -> None:
    for shown in (PASSWORD, ENCODED, WRONG_ENCODED, ENCODED[3:9], "3cQr", "cQr%4", "cQr@"):
        assert leaks(f"error: cannot connect to {shown}: refused"), shown
    assert not leaks("error: cannot connect to redis://:***@127.0.0.1:1/0: Queue full (Q)")


def wait_until(condition: Callable[[], object], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class PasswordServer(EmbeddedServer):
    """A server whose default user has a password (EmbeddedServer logs in to see it start),
    and a user of its own, ``scanner``, with the same password; on a fixed port across
    restarts."""

    def __init__(self, binary: str | None) -> None:
        super().__init__(binary, extra_args=("--requirepass", PASSWORD))

    def start(self) -> PasswordServer:
        super().start()
        with redis.Redis(port=self.port, password=PASSWORD, socket_timeout=1) as client:
            client.execute_command("ACL", "SETUSER", "scanner", "on", ">" + PASSWORD, "~*", "+@all")
        return self

    def client(self) -> Any:
        return conveyor.connect(f"redis://:{ENCODED}@127.0.0.1:{self.port}/0", cluster=False)


@pytest.fixture(scope="module")
def secured() -> Iterator[PasswordServer]:
    server = PasswordServer(os.environ.get("CONVEYOR_TEST_SERVER") or None).start()
    try:
        yield server
    finally:
        server.close()


@dataclass(frozen=True)
class Target:
    """How a command is told where the server is: --url, or $REDIS_URL."""

    url: str
    env: bool = False
    #: global options: how verbose, which log format
    logging: tuple[str, ...] = ("-v",)

    def argv(self, command: tuple[str, ...]) -> list[str]:
        return [*self.logging, *command] + ([] if self.env else ["--url", self.url])

    def environ(self) -> dict[str, str | None]:
        return {"REDIS_URL": self.url if self.env else None, "CONVEYOR_LOG_FORMAT": None}


def good_targets(port: int) -> dict[str, Target]:
    return {
        "userinfo": Target(f"redis://:{ENCODED}@127.0.0.1:{port}"),
        "default-user-db": Target(
            f"redis://default:{ENCODED}@127.0.0.1:{port}/0", logging=("-vv",)
        ),
        "query": Target(
            f"redis://127.0.0.1:{port}?password={ENCODED}", logging=("-v", "--log-format", "json")
        ),
        "env": Target(f"redis://:{ENCODED}@127.0.0.1:{port}/0", env=True),
        "acl-user": Target(f"redis://scanner:{ENCODED}@127.0.0.1:{port}/0"),
    }


def bad_targets(port: int) -> dict[str, Target]:
    return {
        "unreachable": Target(f"redis://:{ENCODED}@127.0.0.1:1/0"),
        "wrong-password": Target(f"redis://default:{WRONG_ENCODED}@127.0.0.1:{port}/0"),
        "no-password": Target(f"redis://127.0.0.1:{port}/0"),
        "unreachable-env": Target(f"redis://127.0.0.1:1/0?password={ENCODED}", env=True),
    }


GOOD_SHAPES = list(good_targets(0))
BAD_SHAPES = list(bad_targets(0))


# -- commands run in this process ------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    argv: tuple[str, ...]
    stdin: str | None = None
    #: exit codes of a run that worked (monitor: its verdict)
    ok: tuple[int, ...] = (0,)
    #: exit code when the server cannot be used (monitor: 3, UNKNOWN)
    refused: int = 1
    #: talks to Redis (scale --keda does not)
    redis: bool = True


VERDICTS = (0, 1, 2)


def scenario(stream: str, setup: Setup) -> list[Command | Callable[[], None]]:
    """Every command, in an order where each finds what it works on; callables prepare the
    next commands with a client of their own."""
    s, g = ("-s", stream), ("-s", stream, "-g", "billing")
    keda = ("scale", *g, "--keda", "--name", "billing", "--deployment", "worker")
    lines = '{"order": 2}\n{"order": 3, "amount": 9.5}\n{"order": 4}\n{"order": 5}\n'
    return [
        Command(("produce", *s, "order=1", "note=Zoë")),
        Command(("produce", *s, "--json"), stdin=lines),
        Command(("produce", *s, "--json-payload", "--quiet"), stdin='{"nested": {"a": [1]}}\n'),
        Command(("groups", "create", *g)),
        Command(("groups", "create", *s, "-g", "audit", "--id", "$", "--json")),
        Command(("groups", "ls", *s)),
        Command(("groups", "ls", *s, "--json")),
        lambda: setup.hold(stream, "billing", "holder", 3),
        Command(("pending", *g)),
        Command(("pending", *g, "--json", "--min-idle-ms", "0")),
        Command(("claim", *g, "--to", "w2", "--min-idle-ms", "0", "--dry-run")),
        Command(("claim", *g, "--to", "w2", "--min-idle-ms", "0", "--json")),
        Command(("consume", *g, "-c", "w2", "--count", "2", "--max-wait-ms", "50")),
        Command(("consume", *s, "-g", "audit", "--peek", "--count", "2", "--max-wait-ms", "50")),
        Command(("consume", *s, "-g", "sampler", "--no-ack", "-n", "1", "--max-wait-ms", "50")),
        Command(("monitor", *s), ok=VERDICTS, refused=3),
        Command(("monitor", *g, "--json"), ok=VERDICTS, refused=3),
        Command(("monitor", *s, "--rich"), ok=VERDICTS, refused=3),
        Command(("monitor", *g, "--cleanup", "--json"), ok=VERDICTS),  # an action: 1
        Command(("scale", *g)),
        Command(("scale", *g, "--json")),
        Command((*keda, "--password-env", "REDIS_PASSWORD"), redis=False),
        lambda: setup.dead_letter(stream, 2),
        Command(("dlq", "ls", *s)),
        Command(("dlq", "ls", *s, "--json")),
        Command(("dlq", "replay", *s, "--dry-run")),
        Command(("dlq", "replay", *s, "--yes", "--limit", "1")),
        Command(("dlq", "purge", *s, "--yes", "--json")),
        Command(("trim", *s, "--safe", "--dry-run")),
        Command(("trim", *s, "--safe", "--json")),
        Command(("trim", *s, "--maxlen", "2", "--yes")),
        Command(("groups", "setid", *g, "--id", "0", "--yes")),
        Command(("groups", "destroy", *g, "--yes")),
        Command(("demo", "--messages", "20", "--consumers", "1", "--batch-size", "10")),
    ]


class Setup:
    """What the scenario needs done beside the commands, with a client of its own."""

    def __init__(self, server: PasswordServer) -> None:
        self.server = server

    def hold(self, stream: str, group: str, consumer: str, count: int) -> None:
        """Entries read and not acknowledged: pending, for pending and claim to show."""
        client = self.server.client()
        try:
            client.xreadgroup(group, consumer, {stream: ">"}, count=count)
        finally:
            client.close()

    def dead_letter(self, stream: str, count: int) -> None:
        client = self.server.client()
        consumer = Consumer(client, stream, "dead", batch_size=count, max_wait_ms=50)
        try:
            for msg in consumer.get_batch():
                consumer.dead_letter(msg, RuntimeError("gave up on it"))
        finally:
            consumer.close()
            client.close()


@dataclass
class Run:
    label: str
    code: int | None
    stdout: str
    stderr: str


@contextlib.contextmanager
def logging_restored() -> Iterator[None]:
    """The CLI configures logging (the root logger and conveyor's) for the process; put it
    back as it was after each command run in this one."""
    names = ["", "conveyor", "conveyor.cli", "conveyor.cli.demo", "py.warnings"]
    saved = {n: (logging.getLogger(n).level, list(logging.getLogger(n).handlers)) for n in names}
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for n, (level, handlers) in saved.items():
            logger = logging.getLogger(n)
            logger.setLevel(level)
            logger.handlers[:] = handlers


def invoke(target: Target, command: Command) -> Run:
    """``command`` through the CLI's entry point, in this process."""
    argv = target.argv(command.argv)
    with logging_restored():
        result = CliRunner().invoke(main, argv, input=command.stdin, env=target.environ())
    label = " ".join(argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{label}: raised {result.exception!r}") from result.exception
    return Run(label, result.exit_code, result.stdout, result.stderr)


def problems_of(run: Run, *, failed: bool) -> list[str]:
    """What is wrong with what a run printed: a password, or (for a run that failed) anything
    but one ``error:`` line at the end, after log lines."""
    found = []
    text = run.stdout + run.stderr
    if leaks(text):
        found.append(f"{run.label}: shows {leaks(text)}:\n{text}")
    if failed:
        lines = run.stderr.strip().splitlines()
        errors = [
            line for line in lines if line.startswith("error: ") or '"level": "ERROR"' in line
        ]
        if "Traceback" in text or len(errors) != 1 or lines[-1] != errors[0]:
            found.append(f"{run.label}: not one error line:\n{run.stderr}")
    return found


#: run as processes (below), not by the scenario
LONG_RUNNING = {"run", "exporter", "dashboard"}


def test_the_scan_runs_every_command_that_takes_a_url() -> None:
    def name(argv: tuple[str, ...]) -> str:
        return " ".join(argv[:2]) if isinstance(main.commands[argv[0]], click.Group) else argv[0]

    takes_url = set()
    for group_name, command in main.commands.items():
        subcommands = command.commands if isinstance(command, click.Group) else {"": command}
        for sub_name, sub in subcommands.items():
            if any(param.name == "url" for param in sub.params):
                takes_url.add(f"{group_name} {sub_name}".strip())
    steps = scenario("s", cast(Setup, None))  # its setup steps are not run here
    scanned = {name(step.argv) for step in steps if isinstance(step, Command)} | LONG_RUNNING
    assert takes_url <= scanned, f"not scanned: {sorted(takes_url - scanned)}"
    assert len(takes_url) >= 15


@pytest.mark.parametrize("shape", GOOD_SHAPES)
def test_every_command_hides_the_password(secured: PasswordServer, shape: str) -> None:
    target = good_targets(secured.port)[shape]
    problems: list[str] = []
    ran = 0
    for step in scenario(f"scan:{shape}:orders", Setup(secured)):
        if not isinstance(step, Command):
            step()
            continue
        run = invoke(target, step)
        ran += 1
        if run.code not in step.ok:
            problems.append(f"{run.label}: exit code {run.code}:\n{run.stdout}{run.stderr}")
        problems += problems_of(run, failed=False)
    assert not problems, "\n\n".join(problems)
    assert ran >= 30


@pytest.mark.parametrize("shape", BAD_SHAPES)
def test_every_command_that_cannot_use_the_server_says_so_in_one_line(
    secured: PasswordServer, shape: str
) -> None:
    target = bad_targets(secured.port)[shape]
    debug = Target(target.url, target.env, logging=("-vv", "--log-format", "json"))
    problems: list[str] = []
    for step in scenario(f"scan:{shape}:orders", Setup(secured)):
        if not isinstance(step, Command) or not step.redis:
            continue
        run = invoke(target, step)
        if run.code != step.refused:
            problems.append(f"{run.label}: exit code {run.code}:\n{run.stdout}{run.stderr}")
        problems += problems_of(run, failed=True)
        # -vv logs the failure with its traceback, on purpose: no password in it either.
        problems += problems_of(invoke(debug, step), failed=False)
    assert not problems, "\n\n".join(problems)


# -- long-running commands, as processes ----------------------------------------------------

HANDLER = """
import os


def handle(batch):
    with open(os.environ["SCAN_MARKER"], "a") as marker:
        for msg in batch:
            if msg.fields.get("fail") == "1" and msg.deliveries == 1:
                raise RuntimeError("failing once on purpose")
            batch.ack(msg)
            marker.write(msg.id + "\\n")
"""


@dataclass
class Process:
    label: str
    popen: subprocess.Popen[bytes]
    out: Path
    err: Path
    #: what shows it is working: then it is stopped with SIGTERM; None: it ends by itself
    ready: Callable[[Process], bool] | None
    #: it may end by itself, in one error line (the server refused it)
    may_fail: bool
    #: what it served (the exporter's pages), scanned too
    pages: list[str]

    def output(self) -> str:
        return self.out.read_text(errors="replace") + self.err.read_text(errors="replace")


class Fleet:
    """Processes started together (their start-up is most of their cost), checked one by one."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.processes: list[Process] = []

    def start(
        self,
        target: Target,
        command: tuple[str, ...],
        ready: Callable[[Process], bool] | None,
        *,
        may_fail: bool = False,
        **env: str,
    ) -> Process:
        n = len(self.processes)
        out, err = self.tmp_path / f"{n}.out", self.tmp_path / f"{n}.err"
        environ = {
            k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "CONVEYOR_LOG_FORMAT")
        }
        environ.update({k: v for k, v in target.environ().items() if v is not None}, **env)
        environ.update(PYTHONUNBUFFERED="1", CI="true", TERM="dumb")
        argv = [sys.executable, "-m", "conveyor", *target.argv(command)]
        with out.open("wb") as stdout, err.open("wb") as stderr:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr, env=environ
            )
        process = Process(" ".join(argv[3:]), popen, out, err, ready, may_fail, [])
        self.processes.append(process)
        return process

    def stop(self, process: Process) -> None:
        """Wait until ``process`` works, then SIGTERM it (unless it ended by itself)."""
        popen, ready = process.popen, process.ready
        if ready is not None:
            wait_until(lambda: ready(process) or popen.poll() is not None, process.label)
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)

    def finish(self, process: Process) -> list[str]:
        """Wait until ``process`` has ended; what is wrong with what it printed."""
        popen = process.popen
        try:
            code = popen.wait(DEADLINE_S)
        except subprocess.TimeoutExpired:
            popen.kill()
            code = popen.wait()
        stdout = process.out.read_text() + "".join(process.pages)
        run = Run(process.label, code, stdout, process.err.read_text())
        if code == 0:  # stopped by SIGTERM once it worked (or waited for the server)
            return problems_of(run, failed=False)
        if process.may_fail:
            return problems_of(run, failed=True)
        return [f"{run.label}: exit code {code}:\n{run.stdout}{run.stderr}"]

    def stop_all(self) -> None:
        for process in self.processes:
            if process.popen.poll() is None:
                process.popen.kill()
                process.popen.wait()


def _metrics(port: int) -> Callable[[Process], bool]:
    """Ready once /metrics answers; the page is kept for the scan."""

    def ready(process: Process) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1) as page:
                body = page.read().decode()
        except OSError:
            return False
        process.pages.append(body)
        return "conveyor_up" in body

    return ready


def _dashboard(port: int) -> Callable[[Process], bool]:
    """Ready once the dashboard's JSON shows the stream; its page and JSON are kept for the
    scan."""

    def ready(process: Process) -> bool:
        pages = []
        try:
            for path in ("/", "/api/snapshot"):
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=1) as page:
                    pages.append(page.read().decode())
        except OSError:
            return False
        process.pages.extend(pages)
        return '"reachable": true' in pages[-1]

    return ready


def _shows(text: str) -> Callable[[Process], bool]:
    return lambda process: text in process.output()


def _lines_in(path: Path, count: int) -> Callable[[Process], bool]:
    return lambda _process: path.exists() and len(path.read_text().splitlines()) >= count


def test_long_running_commands_hide_the_password(secured: PasswordServer, tmp_path: Path) -> None:
    (tmp_path / "scan_handler.py").write_text(HANDLER)
    client = secured.client()
    fleet = Fleet(tmp_path)
    good, bad = good_targets(secured.port), bad_targets(secured.port)
    run = ("run", "scan_handler:handle", "-g", "workers", "--app-dir", str(tmp_path))
    try:
        for shape in ("userinfo", "default-user-db", "query", "env"):
            target, stream = good[shape], f"scan:long:{shape}"
            for i in range(3):
                client.xadd(stream, {"n": str(i), "fail": "1" if i == 2 else "0"})
            marker = tmp_path / f"{shape}.acked"
            worker: tuple[str, ...] = (*run, "-s", stream, "--max-wait-ms", "100")
            if shape == "query":  # a supervisor passes the URL on to its workers
                worker = (*worker, "--concurrency", "2")
            fleet.start(target, worker, _lines_in(marker, 2), SCAN_MARKER=str(marker))
            port = free_port()
            exporter = ("exporter", "-p", str(port), "--addr", "127.0.0.1", "-s", stream)
            fleet.start(target, exporter, _metrics(port))
            watch = ("monitor", "-s", stream, "--watch", "--interval", "0.2")
            fleet.start(target, watch, _shows("health"))
            follow = ("consume", "-s", stream, "-g", "tail", "--follow", "--max-wait-ms", "100")
            fleet.start(target, follow, _shows('"id"'))
            port = free_port()
            dashboard = ("dashboard", "-p", str(port), "-s", stream, "--allow-actions")
            fleet.start(target, dashboard, _dashboard(port))
        for shape, target in bad.items():
            # An unreachable server is waited for (until SIGTERM); a refused password ends the
            # command in one line. monitor --watch takes a refused password for an outage too
            # and keeps showing UNKNOWN: stopped like the others, its lines scanned the same.
            waits = shape.startswith("unreachable")
            worker = (*run, "-s", "scan:long:bad")
            fleet.start(target, worker, _shows("cannot reach") if waits else None, may_fail=True)
            port = free_port()
            exporter = ("exporter", "-p", str(port), "--addr", "127.0.0.1", "-s", "scan:long:bad")
            fleet.start(target, exporter, _metrics(port) if waits else None, may_fail=True)
            watch = ("monitor", "-s", "scan:long:bad", "--watch", "--interval", "0.2")
            fleet.start(target, watch, _shows("health"), may_fail=True)
            # the dashboard needs the server at its start: one error line, and it ends
            dashboard = ("dashboard", "-p", str(free_port()), "-s", "scan:long:bad")
            fleet.start(target, dashboard, None, may_fail=True)
        for process in fleet.processes:
            fleet.stop(process)
        problems = [p for process in fleet.processes for p in fleet.finish(process)]
    finally:
        fleet.stop_all()
        client.close()
    assert not problems, "\n\n".join(problems)


# -- the library's own log records ------------------------------------------------------------


def test_library_logs_hide_the_password_through_failures_and_an_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = PasswordServer(os.environ.get("CONVEYOR_TEST_SERVER") or None).start()
    handled: list[str] = []

    def handler(batch: Any) -> None:
        handled.extend(msg.id for msg in batch)
        raise RuntimeError("handler failed on purpose")

    def said(text: str) -> Callable[[], bool]:
        return lambda: any(text in record.getMessage() for record in caplog.records)

    try:
        client = server.client()
        producer = Producer(client, "orders")
        for i in range(3):
            producer.send({"n": str(i)})
        consumer = Consumer(
            client,
            "orders",
            "billing",
            max_wait_ms=50,
            max_deliveries=2,
            retry_backoff_ms=0,
            claim_idle_ms=1_000,
        )
        thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
        thread.start()
        wait_until(lambda: consumer.dead_lettered_count >= 3, "3 dead letters")
        server.stop()
        wait_until(said("reconnecting"), "the consumer to log the outage")
        server.start()
        other = server.client()
        Producer(other, "orders").send({"n": "after the restart"})
        other.close()
        wait_until(said("working again"), "the consumer to log the end of the outage")
        wait_until(lambda: len(handled) >= 7, "the entry added after the restart")
        consumer.stop()
        thread.join(DEADLINE_S)
        assert not thread.is_alive()
        client.close()
    finally:
        server.close()

    formatter = logging.Formatter()
    problems = []
    for record in caplog.records:
        exc_text = record.exc_text or (
            formatter.formatException(record.exc_info) if record.exc_info else ""
        )
        text = " ".join([record.getMessage(), repr(record.args), str(record.msg), exc_text])
        if leaks(text):
            problems.append(f"{record.name} {record.levelname}: {leaks(text)} in {text}")
    assert not problems, "\n".join(problems)
    # What was scanned: handler failures with their tracebacks, the outage and its end.
    assert any(record.exc_info for record in caplog.records if "handler failed" in record.msg)
    assert said("vanished")(), "the group lost in the restart was not reported"
