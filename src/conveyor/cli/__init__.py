"""The ``conveyor`` command line: click commands that parse options and call the library.

Commands that talk to Redis share their connection options through ``redis_options``. Every
failure a user can cause ends as one ``error: ...`` line on stderr and exit code 1, never a
traceback (``-vv`` logs it). Logging is configured here (see ``_logging``), and only here: the
library never does.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

import click
from redis.exceptions import RedisClusterException, RedisError

import conveyor
from conveyor.cli import _logging
from conveyor.connection import DEFAULT_URL, TlsFailure, redact_url, secrets_in_url
from conveyor.errors import ConfigError, ConveyorError

__all__ = [
    "CliError",
    "cli_connect",
    "connect_error",
    "main",
    "open_client",
    "redis_options",
    "tls_failure_in",
    "tls_options",
]

log = logging.getLogger("conveyor.cli")

F = TypeVar("F", bound=Callable[..., Any])

#: ctx.meta key: passwords seen in --url, scrubbed from any error message shown
_SECRETS = "conveyor.secrets"
#: ctx.meta key: the --tls-* options given, as connect()'s keywords
_TLS = "conveyor.tls"
#: exit code of a run stopped by Ctrl-C or SIGTERM (128 + SIGINT), as shells report it
EXIT_INTERRUPTED = 130


class CliError(click.ClickException):
    """A failure the user can fix: shown as one ``error: ...`` line on stderr (a JSON object
    with --log-format json), exit code 1 (a subclass may set another ``exit_code``)."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(_logging.error_line(self.format_message()), file=file, err=file is None)


def _one_line(exc: BaseException, secrets: set[str]) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class _Group(click.Group):
    """A click group that turns conveyor, Redis and OS errors into one ``error:`` line."""

    def invoke(self, ctx: click.Context) -> Any:
        # RedisClusterException: the cluster client's own errors (a slot no node serves, no
        # node reachable), which are not RedisErrors
        try:
            return super().invoke(ctx)
        except (ConveyorError, RedisError, RedisClusterException, OSError) as exc:
            log.debug("command failed", exc_info=True)
            raise CliError(_one_line(exc, ctx.meta.get(_SECRETS, set()))) from None


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(
    conveyor.__version__, "-V", "--version", prog_name="conveyor", message="%(prog)s %(version)s"
)
@click.option(
    "-v",
    "--verbose",
    count=True,
    help="Log more on stderr: -v for INFO, -vv for DEBUG (default: warnings, errors and the "
    "command's own notices).",
)
@click.option(
    "--log-format",
    type=click.Choice(_logging.FORMATS),
    default="text",
    show_default=True,
    envvar="CONVEYOR_LOG_FORMAT",
    help="Log lines as text (time, level, logger: message) or as JSON objects, one per line "
    "(time, level, logger, message, exception). Default: $CONVEYOR_LOG_FORMAT, else text.",
)
def main(verbose: int, log_format: str) -> None:
    """Reliable batch processing on Redis Streams consumer groups.

    Commands that talk to Redis take --url; without it they use the REDIS_URL environment
    variable. Errors print one line on stderr and exit with code 1. Log lines carry a UTC
    timestamp with milliseconds; --log-format json makes each one a JSON object.

    \b
    Example:
      conveyor demo --messages 10000 --consumers 4
    """
    _logging.configure(verbose, log_format)


# -- shared options ----------------------------------------------------------------------------


def _remember_secret(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        ctx.meta.setdefault(_SECRETS, set()).update(secrets_in_url(value))
    return value


def _remember_tls(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value and param.name:
        ctx.meta.setdefault(_TLS, {})[param.name] = value
    return value


def redis_options(*, fallback: str = DEFAULT_URL) -> Callable[[F], F]:
    """Add the options shared by every command that talks to Redis: ``--url`` and the TLS
    options ``--tls-ca``, ``--tls-cert``, ``--tls-key``, ``--tls-insecure``.

    The TLS options reach no command function: they are kept in the click context, where
    ``open_client`` and ``cli_connect`` (every client a command makes) find them.
    ``fallback`` is what the help names as used when neither --url nor REDIS_URL is set.

    >>> @main.command()          # doctest: +SKIP
    ... @redis_options()
    ... def ping(url: str | None) -> None: ...
    """
    tls = "Needs a TLS URL (rediss://, rediss+sentinel://)."
    options = [
        click.option(
            "-u",
            "--url",
            metavar="URL",
            envvar="REDIS_URL",
            callback=_remember_secret,
            help=(
                "Redis server URL: redis://[user:password@]host:port/db, rediss:// for TLS, "
                "unix:///path, or redis+sentinel://[user:password@]host:port[,host:port...]"
                "/service[/db] for the primary a Sentinel names (rediss+sentinel:// for TLS). "
                f"Default: the REDIS_URL environment variable, else {fallback}."
            ),
        ),
        click.option(
            "--tls-ca",
            metavar="FILE",
            envvar="CONVEYOR_TLS_CA",
            expose_value=False,
            callback=_remember_tls,
            help="CA certificate(s), PEM, to verify the server's certificate with, instead of "
            f"the system's. {tls} Default: $CONVEYOR_TLS_CA.",
        ),
        click.option(
            "--tls-cert",
            metavar="FILE",
            envvar="CONVEYOR_TLS_CERT",
            expose_value=False,
            callback=_remember_tls,
            help="Client certificate, PEM, for a server that asks for one (tls-auth-clients). "
            "Default: $CONVEYOR_TLS_CERT.",
        ),
        click.option(
            "--tls-key",
            metavar="FILE",
            envvar="CONVEYOR_TLS_KEY",
            expose_value=False,
            callback=_remember_tls,
            help="The private key of --tls-cert, PEM (unless that file holds it). "
            "Default: $CONVEYOR_TLS_KEY.",
        ),
        click.option(
            "--tls-insecure",
            is_flag=True,
            expose_value=False,
            callback=_remember_tls,
            help="Do not verify the server's certificate and host name (a warning says so at "
            "each start): anyone on the way can read and change the traffic. For tests only.",
        ),
    ]

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def tls_options() -> dict[str, Any]:
    """connect()'s TLS keywords from the running command's --tls-* options (none outside a
    command).

    >>> conveyor.connect(url, **tls_options())   # doctest: +SKIP
    """
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get(_TLS, {})) if ctx is not None else {}


def _flag_names(text: str) -> str:
    """connect()'s keyword names in a message as the command line's options."""
    return re.sub(r"\btls_(ca|cert|key|insecure)\b", lambda m: "--tls-" + m.group(1), text)


def cli_connect(url: str | None, **options: Any) -> Any:
    """``conveyor.connect(url, **options)`` with the command's --tls-* options; what is wrong
    with them (a missing file, a redis:// URL) is a CliError naming the options.

    >>> client = cli_connect("rediss://redis.example:6380/0")   # doctest: +SKIP
    """
    ctx = click.get_current_context(silent=True)
    secrets: set[str] = ctx.meta.get(_SECRETS, set()) if ctx is not None else set()
    try:
        return conveyor.connect(url, **tls_options(), **options)
    except ConfigError as exc:
        raise CliError(_flag_names(_one_line(exc, secrets))) from None


def tls_failure_in(exc: BaseException) -> TlsFailure | None:
    """The TlsFailure that caused ``exc`` (conveyor wraps lost connections), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, TlsFailure):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def connect_error(exc: BaseException, shown: str, secrets: set[str]) -> CliError:
    """The one line for a server at the redacted URL ``shown`` that could not be reached:
    ``TLS to URL failed: PROBLEM (check --tls-ca)`` for a TLS failure, else ``cannot connect
    to URL: ERROR``; ``secrets`` never show."""
    tls = tls_failure_in(exc)
    if tls is not None:
        hint = f" ({_flag_names(tls.hint)})" if tls.hint else ""
        problem = " ".join(tls.problem.split())
        return CliError(f"TLS to {shown} failed: {problem}{hint}")
    return CliError(f"cannot connect to {shown}: {_one_line(exc, secrets)}")


def open_client(url: str | None) -> Any:
    """A client for ``url`` (see ``conveyor.connect``: a cluster client for a cluster node's
    URL) that has answered PING (on a cluster, one node has: each command then reaches its own),
    made with the command's --tls-* options.

    A server that cannot be reached raises CliError naming the URL, without its password, and
    for a TLS failure the certificate problem.

    >>> client = open_client("redis://localhost:6379/0")   # doctest: +SKIP
    """
    client = cli_connect(url)
    try:
        client.ping()
    except (RedisError, RedisClusterException) as exc:
        log.debug("PING failed", exc_info=True)
        client.close()
        shown = redact_url(url or DEFAULT_URL)
        raise connect_error(exc, shown, secrets_in_url(url or DEFAULT_URL)) from None
    return client


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM stops the command like Ctrl-C does, so it cleans up too.

    Ctrl-C (SIGINT) is handled here as well: Python keeps an ignored SIGINT ignored when the
    parent started it so (a background job of a shell script), and the command would then
    run on through every Ctrl-C.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _start_embedded_server() -> conveyor.EmbeddedServer:
    """Start the embedded server; it runs in a session of its own, so a Ctrl-C at the terminal
    leaves it running until the consumers have left, and it is then stopped by its pid."""
    server = conveyor.EmbeddedServer()
    server.start()
    logging.getLogger("conveyor.cli.demo").info(
        "started %s, pid %s, at %s", server.binary.name, server.pid, server.url
    )
    return server


# Each command module registers itself on ``main`` when imported.
from conveyor.cli import acl as _acl  # noqa: E402, F401
from conveyor.cli import consume as _consume  # noqa: E402, F401
from conveyor.cli import dashboard as _dashboard  # noqa: E402, F401
from conveyor.cli import demo as _demo  # noqa: E402, F401
from conveyor.cli import dlq as _dlq  # noqa: E402, F401
from conveyor.cli import exporter as _exporter  # noqa: E402, F401
from conveyor.cli import groups as _groups  # noqa: E402, F401
from conveyor.cli import monitor as _monitor  # noqa: E402, F401
from conveyor.cli import pending as _pending  # noqa: E402, F401
from conveyor.cli import produce as _produce  # noqa: E402, F401
from conveyor.cli import scale as _scale  # noqa: E402, F401
from conveyor.cli import trim as _trim  # noqa: E402, F401
from conveyor.cli import worker as _worker  # noqa: E402, F401
