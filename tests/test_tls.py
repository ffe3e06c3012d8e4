"""TLS end to end against a real Redis that speaks only TLS and wants client certificates.

The library: connect()'s tls_* keywords (and redis-py's ssl_* names) carry messages both ways;
a wrong CA, a host the certificate does not name, a missing or expired client certificate
each fail with one line naming the problem; turning verification off works and says so each
time. The command line: every command takes --tls-ca/--tls-cert/--tls-key/--tls-insecure, the
same failures are one ``error:`` line, and ``run`` passes the options on to its workers.

The server is Debian's redis-server (tests/tls.py installs it if missing); nothing here skips.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import redis
from click.testing import CliRunner

import conveyor
from conveyor import AsyncConsumer, AsyncProducer, Consumer, Producer
from conveyor.cli import main
from conveyor.connection import TlsFailure
from conveyor.errors import ConnectionLost
from tests.test_cli import TIMEOUT_S, _env, assert_clean_error
from tests.test_cli import conveyor as conveyor_cli
from tests.tls import UNNAMED_HOST, TlsFiles, TlsServer, make_certificates

Name = Callable[[str], str]


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    try:
        return make_certificates(tmp_path_factory.mktemp("tls"))
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)


@pytest.fixture(scope="session")
def tls_server(tls_files: TlsFiles) -> Iterator[TlsServer]:
    try:
        server = TlsServer(tls_files).start()
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.close()


def good_keywords(files: TlsFiles) -> dict[str, Any]:
    return {"tls_ca": files.ca, "tls_cert": files.client_cert, "tls_key": files.client_key}


@pytest.fixture
def tls_client(tls_server: TlsServer, tls_files: TlsFiles) -> Iterator[redis.Redis]:
    client = conveyor.connect(tls_server.url, **good_keywords(tls_files))
    yield client
    client.close()


def round_trip(client: Any, stream: str) -> None:
    """Send three messages, get them as one batch, ack them: nothing left pending."""
    Producer(client, stream).send_many([{"n": str(i)} for i in range(3)])
    consumer = Consumer(client, stream, "g", max_wait_ms=100)
    try:
        batch = consumer.get_batch()
        assert [m.fields["n"] for m in batch] == ["0", "1", "2"]
        consumer.ack_many(batch)
        assert client.xpending(stream, "g")["pending"] == 0
    finally:
        consumer.close()


# -- the library -------------------------------------------------------------------------------


def test_tls_keywords_send_consume_and_ack(
    tls_server: TlsServer, tls_files: TlsFiles, name: Name
) -> None:
    client = conveyor.connect(tls_server.url, **good_keywords(tls_files))
    try:
        round_trip(client, name("orders"))
        assert isinstance(client.connection_pool.get_connection(), redis.SSLConnection)
    finally:
        client.close()


def test_redis_py_ssl_names_work_too(
    tls_server: TlsServer, tls_files: TlsFiles, name: Name
) -> None:
    client = conveyor.connect(
        tls_server.url,
        ssl_ca_certs=str(tls_files.ca),
        ssl_certfile=str(tls_files.client_cert),
        ssl_keyfile=str(tls_files.client_key),
    )
    try:
        round_trip(client, name("orders"))
    finally:
        client.close()


def test_a_host_name_the_certificate_names_works(
    tls_server: TlsServer, tls_files: TlsFiles
) -> None:
    client = conveyor.connect(tls_server.url_for("localhost"), **good_keywords(tls_files))
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_asyncio_tls_send_consume_and_ack(
    tls_server: TlsServer, tls_files: TlsFiles, name: Name
) -> None:
    stream = name("orders")

    async def scenario() -> list[str]:
        client = conveyor.connect(tls_server.url, asyncio=True, **good_keywords(tls_files))
        consumer = AsyncConsumer(client, stream, "g", max_wait_ms=100)
        try:
            await AsyncProducer(client, stream).send({"n": "1"})
            batch = await consumer.get_batch()
            await consumer.ack_many(batch)
            return [m.fields["n"] for m in batch]
        finally:
            await consumer.close()
            await client.aclose()

    assert asyncio.run(scenario()) == ["1"]


def failure_of(url: str, *, is_async: bool = False, **keywords: Any) -> BaseException:
    """The exception the first command of a client made with ``keywords`` raises."""
    if is_async:

        async def ping() -> None:
            client = conveyor.connect(url, asyncio=True, **keywords)
            try:
                await client.ping()
            finally:
                await client.aclose()

        with pytest.raises(redis.ConnectionError) as caught:
            asyncio.run(ping())
        return caught.value
    client = conveyor.connect(url, **keywords)
    try:
        with pytest.raises(redis.ConnectionError) as caught:
            client.ping()
    finally:
        client.close()
    return caught.value


def assert_one_line(exc: BaseException, *parts: str) -> str:
    text = str(exc)
    assert isinstance(exc, TlsFailure), repr(exc)
    assert "\n" not in text
    for part in parts:
        assert part in text, text
    return text


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_wrong_ca_fails_naming_the_verification(
    tls_server: TlsServer, tls_files: TlsFiles, is_async: bool
) -> None:
    keywords = {**good_keywords(tls_files), "tls_ca": tls_files.other_ca}

    exc = failure_of(tls_server.url, is_async=is_async, **keywords)

    text = assert_one_line(exc, "certificate verify failed", "(check tls_ca)")
    assert text.startswith(f"TLS to 127.0.0.1:{tls_server.port} failed: ")


def test_a_wrong_ca_reaches_producers_and_consumers_with_its_reason(
    tls_server: TlsServer, tls_files: TlsFiles, name: Name
) -> None:
    client = conveyor.connect(
        tls_server.url, **{**good_keywords(tls_files), "tls_ca": tls_files.other_ca}
    )
    try:
        with pytest.raises((ConnectionLost, redis.ConnectionError)) as sent:
            Producer(client, name("orders")).send({"n": "1"})
        with pytest.raises((ConnectionLost, redis.ConnectionError)) as read:
            Consumer(client, name("orders"), "g", max_wait_ms=100).get_batch()
    finally:
        client.close()
    for exc in (sent.value, read.value):
        assert "certificate verify failed" in str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_missing_client_certificate_is_named(
    tls_server: TlsServer, tls_files: TlsFiles, is_async: bool
) -> None:
    # The server refuses it after the handshake; a writer may meet a closed socket before the
    # alert: every attempt must say what it was.
    for _ in range(5):
        exc = failure_of(tls_server.url, is_async=is_async, tls_ca=tls_files.ca)
        assert_one_line(
            exc, "the server requires a client certificate", "certificate required", "tls_cert"
        )


def test_an_expired_client_certificate_is_named(tls_server: TlsServer, tls_files: TlsFiles) -> None:
    exc = failure_of(
        tls_server.url,
        tls_ca=tls_files.ca,
        tls_cert=tls_files.expired_cert,
        tls_key=tls_files.expired_key,
    )

    assert_one_line(exc, "refused the client certificate", "certificate expired", "tls_cert")


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_host_the_certificate_does_not_name_fails(
    tls_server: TlsServer, tls_files: TlsFiles, is_async: bool
) -> None:
    url = tls_server.url_for(UNNAMED_HOST)

    exc = failure_of(url, is_async=is_async, **good_keywords(tls_files))

    assert_one_line(exc, "certificate verify failed", "mismatch", UNNAMED_HOST)


@pytest.mark.parametrize(
    ("how", "url_tail", "keywords"),
    [
        ("tls_insecure", "", {"tls_insecure": True}),
        ("ssl_cert_reqs=none", "", {"ssl_cert_reqs": "none"}),
        ("ssl_cert_reqs=none", "?ssl_cert_reqs=none", {}),
    ],
)
def test_insecure_tls_works_and_warns_each_time(
    tls_server: TlsServer,
    tls_files: TlsFiles,
    caplog: pytest.LogCaptureFixture,
    how: str,
    url_tail: str,
    keywords: dict[str, Any],
) -> None:
    # The CA that signed the server's certificate is not given: only an unverified link works.
    client_cert = {"tls_cert": tls_files.client_cert, "tls_key": tls_files.client_key}
    with caplog.at_level(logging.WARNING, logger="conveyor"):
        for _ in range(2):
            client = conveyor.connect(tls_server.url + url_tail, **client_cert, **keywords)
            try:
                assert client.ping() is True
            finally:
                client.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings
    assert all("verification is OFF" in w and how in w for w in warnings), warnings


def test_without_the_insecure_switch_the_same_client_fails(
    tls_server: TlsServer, tls_files: TlsFiles
) -> None:
    # The counterpart of the test above: the system's CAs do not know the test CA.
    exc = failure_of(tls_server.url, tls_cert=tls_files.client_cert, tls_key=tls_files.client_key)

    assert_one_line(exc, "certificate verify failed")


# -- the command line --------------------------------------------------------------------------


cli = conveyor_cli  # the command as a subprocess, as tests/test_cli.py runs it


def tls_flags(files: TlsFiles, *, ca: Path | None = None) -> list[str]:
    return [
        "--tls-ca",
        str(ca or files.ca),
        "--tls-cert",
        str(files.client_cert),
        "--tls-key",
        str(files.client_key),
    ]


def test_cli_commands_work_over_tls(
    tls_server: TlsServer, tls_files: TlsFiles, tls_client: redis.Redis, name: Name
) -> None:
    stream, url = name("orders"), ["--url", tls_server.url]
    flags = tls_flags(tls_files)

    produced = cli("produce", *url, *flags, "-s", stream, "n=1")
    consumed = cli("consume", *url, *flags, "-s", stream, "-g", "g", "--count", "1", "--json")
    monitored = cli("monitor", *url, *flags, "-s", stream, "-g", "g")
    groups = cli("groups", "ls", *url, *flags, "-s", stream, "--json")
    pending = cli("pending", *url, *flags, "-s", stream, "-g", "g")
    trimmed = cli("trim", *url, *flags, "-s", stream, "--safe")

    for result in (produced, consumed, monitored, groups, pending, trimmed):
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
    entry_id = produced.stdout.strip()
    assert entry_id and f'"id": "{entry_id}"' in consumed.stdout
    assert "health: OK" in monitored.stderr
    assert '"g"' in groups.stdout
    assert tls_client.xpending(stream, "g")["pending"] == 0


def test_cli_tls_files_from_the_environment(
    tls_server: TlsServer, tls_files: TlsFiles, tls_client: redis.Redis, name: Name
) -> None:
    stream = name("orders")
    env = _env(
        REDIS_URL=tls_server.url,
        CONVEYOR_TLS_CA=str(tls_files.ca),
        CONVEYOR_TLS_CERT=str(tls_files.client_cert),
        CONVEYOR_TLS_KEY=str(tls_files.client_key),
    )

    result = cli("produce", "-s", stream, "n=1", env=env)

    assert result.returncode == 0, result.stderr
    assert tls_client.xlen(stream) == 1


@pytest.mark.parametrize(
    ("command", "exit_code"),
    [
        (["produce", "-s", "x", "n=1"], 1),
        (["consume", "-s", "x", "-g", "g", "--count", "1"], 1),
        (["monitor", "-s", "x"], 3),  # UNKNOWN, as for any server it cannot reach
        (["groups", "ls", "-s", "x"], 1),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else str(v),
)
def test_cli_a_wrong_ca_is_one_error_line(
    tls_server: TlsServer, tls_files: TlsFiles, command: list[str], exit_code: int
) -> None:
    flags = tls_flags(tls_files, ca=tls_files.other_ca)

    result = cli(*command, "--url", tls_server.url, *flags)

    assert_clean_error(result)
    assert result.returncode == exit_code
    line = result.stderr.strip()
    assert line.startswith(f"error: TLS to {tls_server.url} failed: certificate verify failed")
    assert line.endswith("(check --tls-ca)"), line


def test_cli_a_missing_client_certificate_is_one_error_line(
    tls_server: TlsServer, tls_files: TlsFiles
) -> None:
    flags = ["--tls-ca", str(tls_files.ca)]

    result = cli("produce", "--url", tls_server.url, *flags, "-s", "x", "n=1")

    assert_clean_error(result)
    assert "the server requires a client certificate" in result.stderr
    assert "--tls-cert" in result.stderr


def test_cli_a_wrong_host_and_a_password_are_one_line_without_the_password(
    tls_server: TlsServer, tls_files: TlsFiles
) -> None:
    url = f"rediss://user:sekret@{UNNAMED_HOST}:{tls_server.port}/0"

    result = cli("produce", "--url", url, *tls_flags(tls_files), "-s", "x", "n=1")

    assert_clean_error(result)
    assert "certificate verify failed" in result.stderr and "mismatch" in result.stderr
    assert "rediss://user:***@" in result.stderr and "sekret" not in result.stderr


def test_cli_tls_insecure_warns_on_every_run(
    tls_server: TlsServer, tls_files: TlsFiles, tls_client: redis.Redis, name: Name
) -> None:
    stream = name("orders")
    flags = ["--tls-insecure", "--tls-cert", str(tls_files.client_cert)]
    flags += ["--tls-key", str(tls_files.client_key)]

    runs = [cli("produce", "--url", tls_server.url, *flags, "-s", stream, "n=1") for _ in "ab"]

    for result in runs:
        assert result.returncode == 0, result.stderr
        warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
        assert len(warnings) == 1 and "verification is OFF" in warnings[0], result.stderr
    assert tls_client.xlen(stream) == 2


@pytest.mark.parametrize("flag", ["--tls-ca", "--tls-insecure"])
def test_cli_tls_options_with_a_plain_url_are_one_error_line(
    tls_files: TlsFiles, flag: str
) -> None:
    value = [str(tls_files.ca)] if flag == "--tls-ca" else []

    result = cli("produce", "--url", "redis://127.0.0.1:1/0", flag, *value, "-s", "x", "n=1")

    assert_clean_error(result)
    assert flag in result.stderr and "rediss://" in result.stderr


def test_cli_a_missing_tls_file_is_one_error_line(tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"

    result = cli("monitor", "--url", "rediss://127.0.0.1:1", "--tls-ca", str(missing), "-s", "x")

    assert_clean_error(result)
    assert result.stderr.strip().endswith(f"--tls-ca file {missing} does not exist")


def _leaf_commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for command_name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _leaf_commands(command, (*path, command_name))
        else:
            yield (*path, command_name)


REDIS_COMMANDS = [
    "produce",
    "consume",
    "run",
    "monitor",
    "scale",
    "pending",
    "claim",
    "groups ls",
    "groups create",
    "groups destroy",
    "groups setid",
    "dlq ls",
    "dlq replay",
    "dlq purge",
    "trim",
    "exporter",
    "demo",
]


@pytest.mark.parametrize("command", REDIS_COMMANDS)
def test_every_command_shows_the_tls_options_in_its_help(command: str) -> None:
    result = CliRunner().invoke(main, [*command.split(), "--help"])

    assert result.exit_code == 0, result.output
    for flag in ("--tls-ca FILE", "--tls-cert FILE", "--tls-key FILE", "--tls-insecure"):
        assert flag in result.output, (command, result.output)


def test_every_command_with_a_url_takes_the_tls_options() -> None:
    for path in _leaf_commands(main):
        command: Any = main
        for part in path:
            command = command.commands[part]
        options = {opt for param in command.params for opt in param.opts}
        if "--url" in options:
            assert {"--tls-ca", "--tls-cert", "--tls-key", "--tls-insecure"} <= options, path


# -- run: worker processes over TLS ------------------------------------------------------------

HANDLER = """
import os

def handle(batch):
    with open(os.environ["SEEN_FILE"], "a") as seen:
        for msg in batch:
            seen.write(f"{msg.id}\\n")
            batch.ack(msg)
"""


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


def test_run_workers_connect_with_tls(
    tls_server: TlsServer,
    tls_files: TlsFiles,
    tls_client: redis.Redis,
    name: Name,
    tmp_path: Path,
) -> None:
    stream = name("orders")
    ids = [tls_client.xadd(stream, {"n": i}).decode() for i in range(20)]
    (tmp_path / "tls_handlers.py").write_text(HANDLER)
    seen = tmp_path / "seen.txt"
    env = _env(PYTHONPATH=str(tmp_path), SEEN_FILE=str(seen))
    args = ["-s", stream, "-g", "g", "--concurrency", "2", "--batch-size", "5"]
    more = ["--max-wait-ms", "100", "--url", tls_server.url, *tls_flags(tls_files)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "run", "tls_handlers:handle", *args, *more],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:

        def consumers() -> int:
            rows: Any = tls_client.xinfo_groups(stream)
            return int(rows[0]["consumers"]) if rows else 0

        # Each worker process joins the group with its first read: both got through TLS.
        wait_for(lambda: consumers() == 2 or proc.poll() is not None, "both workers read")
        assert proc.poll() is None, proc.communicate(timeout=TIMEOUT_S)[1]
        wait_for(
            lambda: seen.exists() and len(seen.read_text().split()) >= 20,
            "the workers handled every message",
        )
        wait_for(lambda: tls_client.xpending(stream, "g")["pending"] == 0, "all acked")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    assert proc.returncode == 0, err
    assert "all 2 workers stopped cleanly" in err
    assert sorted(seen.read_text().split()) == sorted(ids)
    assert "Traceback" not in err


def test_run_with_a_wrong_ca_is_one_error_line_not_a_wait(
    tls_server: TlsServer, tls_files: TlsFiles, tmp_path: Path
) -> None:
    (tmp_path / "tls_handlers.py").write_text(HANDLER)
    env = _env(PYTHONPATH=str(tmp_path), SEEN_FILE=str(tmp_path / "seen.txt"))
    flags = tls_flags(tls_files, ca=tls_files.other_ca)

    result = cli(
        "run", "tls_handlers:handle", "-s", "x", "-g", "g", "--url", tls_server.url, *flags,
        env=env,
    )  # fmt: skip

    assert_clean_error(result)
    assert "certificate verify failed" in result.stderr and "--tls-ca" in result.stderr
