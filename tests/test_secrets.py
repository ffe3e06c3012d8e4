"""Secrets never printed (DESIGN promise 7), whatever shape the URL has.

Passwords with unencoded reserved characters (``/ # ? @ :``), percent-encoded ones, passwords in
``?password=`` and ``?sentinel_password=``, Sentinel URLs, bad ports and bad options: neither
``redact_url``, nor any error of ``connect()`` or of a connection attempt, nor the CLI shows them,
as written or percent-decoded. Every error is a one-line ConveyorError, never a traceback.
Every endpoint here is unreachable on purpose (port 1, a missing socket), so nothing needs a
server.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import pytest
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import conveyor
from conveyor.cli import main
from conveyor.connection import redact_url
from conveyor.errors import ConfigError, ConveyorError

# Every password holds a "Q", which nothing else in a URL or a message does: a password found
# in a message is the password, never an accident.
_CHARS = "abcxyzQ0123456789/#?@:%&=+!$*,;~-._[] é"
PASSWORDS = st.tuples(
    st.text(st.sampled_from(_CHARS), min_size=3, max_size=10),
    st.text(st.sampled_from(_CHARS), max_size=10),
).map(lambda t: f"{t[0]}Q{t[1]}")

SCHEMES = ["redis", "rediss", "valkey", "unix", "redis+sentinel", "rediss+sentinel"]
BAD_PORTS = ["99999", "abc", "0", "-1", "65536", "1x"]
#: no port, or an empty one: the default port, where a real server may listen (not for sentinels)
DEFAULT_PORTS = ["", None]
PATHS = {"plain": ["", "/", "/0", "/3"], "sentinel": ["/mymaster", "/mymaster/1", "/mymaster/"]}
BAD_PATHS = ["", "/", "/mymaster/x", "/a/b/c"]  # for Sentinel URLs
OPTIONS = ["db=1", "client_name=w", "socket_timeout=2"]
BAD_OPTIONS = ["socket_timeout=abc", "fooo=1", "ssl_cert_reqs=none"]
#: what a URL gets wrong, if anything
FAULTS = [None, None, None, "scheme", "port", "path", "option"]


@dataclass(frozen=True)
class SecretUrl:
    url: str
    secrets: frozenset[str]  # every text that must never show
    dialable: bool  # nothing can answer there: a connection attempt is safe

    def leaks_in(self, text: str) -> list[str]:
        """The secrets in ``text``, and any piece of one: only a password has a "Q"."""
        return [s for s in self.secrets if s in text] + (["a Q"] if "Q" in text else [])

    def full_leaks_in(self, text: str) -> list[str]:
        """The secrets in ``text`` (for debug output, whose source lines may hold a "Q")."""
        return [s for s in self.secrets if s in text]


def _forms(password: str) -> set[str]:
    """The password as written, percent-encoded and percent-decoded: those at least 4 long."""
    return {f for f in (password, quote(password, safe=""), unquote(password)) if len(f) >= 4}


@st.composite
def secret_urls(draw: st.DrawFn, *, dialable: bool = False) -> SecretUrl:
    """URLs of every shape with passwords in them, right or wrong in one way; ``dialable``: only
    ones whose endpoints cannot answer (no default Redis port)."""
    secrets: set[str] = set()

    def secret(in_query: bool = False) -> str:
        password = draw(PASSWORDS)
        encode = draw(st.booleans())
        if in_query and not encode:
            # An unencoded "&" ends a query value: what follows is another option, not a secret.
            password = password.replace("&", "")
        secrets.update(_forms(password))
        return quote(password, safe="") if encode else password

    fault = draw(st.sampled_from(FAULTS))
    scheme = "http" if fault == "scheme" else draw(st.sampled_from(SCHEMES))
    sentinel = "sentinel" in scheme
    userinfo = f"{draw(st.sampled_from(['', 'app']))}:{secret()}@" if draw(st.booleans()) else ""
    safe = sentinel or scheme == "unix"
    hosts = []
    for _ in range(draw(st.integers(1, 3) if sentinel else st.just(1))):
        host = draw(st.sampled_from(["127.0.0.1", "localhost", ""]))
        ports = ["1"] if dialable and not safe else ["1", *DEFAULT_PORTS]
        port = draw(st.sampled_from(BAD_PORTS if fault == "port" else ports))
        hosts.append(host if port is None else f"{host}:{port}")
        safe = safe or port not in DEFAULT_PORTS
    if fault == "path" and sentinel:
        path = draw(st.sampled_from(BAD_PATHS))
    else:
        path = draw(st.sampled_from(PATHS["sentinel" if sentinel else "plain"]))
    query = draw(st.lists(st.sampled_from(OPTIONS), max_size=2))
    if fault == "option":
        query.append(draw(st.sampled_from(BAD_OPTIONS)))
    names = ["password", "sentinel_password"] if sentinel or fault else ["password"]
    for name in draw(st.lists(st.sampled_from(names), max_size=2)):
        query.append(f"{name}={secret(in_query=True)}")
    query = draw(st.permutations(query))
    url = f"{scheme}://{userinfo}{','.join(hosts)}{path}" + ("?" + "&".join(query) if query else "")
    return SecretUrl(url, frozenset(secrets), safe)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(logging.Formatter().format(record))


@contextmanager
def conveyor_logs() -> Iterator[_Records]:
    """Every log line of ``conveyor.*`` (with tracebacks) while the block runs."""
    logger = logging.getLogger("conveyor")
    records = _Records()
    level = logger.level
    logger.addHandler(records)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(records)
        logger.setLevel(level)


@contextmanager
def cli_logging_restored() -> Iterator[None]:
    """The CLI configures the ``conveyor`` logger; put it back as it was."""
    logger = logging.getLogger("conveyor")
    handlers, level = list(logger.handlers), logger.level
    try:
        yield
    finally:
        logger.handlers[:] = handlers
        logger.setLevel(level)


def assert_one_line_without(case: SecretUrl, exc: BaseException) -> None:
    message = str(exc)
    assert isinstance(exc, ConveyorError | redis.RedisError), repr(exc)
    assert "\n" not in message, message
    assert not case.leaks_in(message), (case.url, message)


def _use(case: SecretUrl, client: Any, *, is_async: bool) -> None:
    """A connection attempt to the (unreachable) endpoint: its error hides the password too."""
    assert not case.leaks_in(repr(client))
    if not case.dialable:
        if is_async:
            asyncio.run(client.aclose())
        else:
            client.close()
        return

    async def ping_async() -> None:
        try:
            await client.ping()
        finally:
            await client.aclose()

    try:
        if is_async:
            asyncio.run(ping_async())
        else:
            try:
                client.ping()
            finally:
                client.close()
    except (redis.RedisError, ConveyorError) as exc:
        assert not case.leaks_in(str(exc)), (case.url, str(exc))
    else:
        pytest.fail(f"{case.url} reached a server")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=secret_urls(), is_async=st.booleans())
def test_no_url_shape_shows_its_password(case: SecretUrl, is_async: bool) -> None:
    shown = redact_url(case.url)
    assert not case.leaks_in(shown), (case.url, shown)
    with conveyor_logs() as logs:
        try:
            client: Any = conveyor.connect(case.url, asyncio=is_async)
        except ConveyorError as exc:
            event("refused by connect()")
            assert isinstance(exc, ConfigError)
            assert_one_line_without(case, exc)
        else:
            event("a client" + (", dialled" if case.dialable else ""))
            _use(case, client, is_async=is_async)
    assert not case.leaks_in("\n".join(logs.lines))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=secret_urls(dialable=True), verbose=st.sampled_from([[], ["-vv"]]))
def test_no_url_shape_shows_its_password_in_the_cli(case: SecretUrl, verbose: list[str]) -> None:
    with cli_logging_restored():
        result = CliRunner().invoke(main, [*verbose, "monitor", "-s", "x", "--url", case.url])
    assert result.exit_code in (1, 3), (case.url, result.output)  # monitor: 3 is "unknown"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert not case.leaks_in(errors[0]), (case.url, errors[0])
    assert not case.full_leaks_in(result.stdout + result.stderr), (case.url, result.output)
    if not verbose:  # the error, and at most warnings (e.g. TLS verification off)
        others = [line for line in result.stderr.splitlines() if line not in errors]
        assert all("WARNING" in line for line in others), result.stderr


# -- the shapes by name ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://u:secret@h:6379/0", "redis://u:***@h:6379/0"),
        ("redis://u:se/cret@h:6379/0", "redis://u:***@h:6379/0"),
        ("redis://u:se#cret@h:6379/0", "redis://u:***@h:6379/0"),
        ("redis://u:se?cret@h:6379/0", "redis://u:***@h:6379/0"),
        ("redis://u:se@cr:et@h:6379/0", "redis://u:***@h:6379/0"),
        ("redis://:se%2Fcret@h/0", "redis://:***@h/0"),
        ("redis://h/0?password=secret&db=1", "redis://h/0?password=***&db=1"),
        ("redis://h/0?db=1&password=se&cr#et", "redis://h/0?db=1&password=***"),
        (
            "redis+sentinel://u:secret@s1:26379,s2:26379/mymaster/0?sentinel_password=xy",
            "redis+sentinel://u:***@s1:26379,s2:26379/mymaster/0?sentinel_password=***",
        ),
        # An '@' in an option's value could also end a user-info whose password holds
        # "?sentinel_password=": both readings are hidden.
        (
            "redis+sentinel://u:secret@s1:26379,s2:26379/mymaster/0?sentinel_password=x@y",
            "redis+sentinel://u:***",
        ),
        ("redis://h/0?password=a@b", "redis://***"),
        ("unix://u:secret@/run/redis.sock?db=0", "unix://u:***@/run/redis.sock?db=0"),
        ("redis://user@h/0", "redis://user@h/0"),
        ("redis://h:6379/0", "redis://h:6379/0"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", ["redis://u:sekret@host:99999/0", "redis://u:sekret@host:abc/0"])
def test_a_bad_port_is_a_one_line_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="bad port") as info:
        conveyor.connect(url)
    assert "sekret" not in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis://u:sekret@host:99999/0",
        "redis://u:sekret@host:abc/0",
        "redis://u:sek/ret@127.0.0.1:1/0",
        "redis://u:sek/ret@127.0.0.1:1",
        "redis://u:sek#ret@127.0.0.1:1/0",
        "redis://u:sek?ret@127.0.0.1:1/0",
        "redis+sentinel://u:sekret@127.0.0.1:1/",
        "redis://127.0.0.1:1/0?password=sekret",
    ],
)
def test_the_cli_says_what_is_wrong_in_one_line(url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "conveyor", "monitor", "-s", "x", "--url", url],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode in (1, 3)  # monitor: 3 is "unknown"
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    # Not the password, nor a piece of it (an unencoded "/" puts its tail in the path).
    assert "sek" not in result.stdout + result.stderr
    assert "ret@" not in result.stderr
