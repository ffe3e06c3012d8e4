"""The ``conveyor`` command line: click commands that parse options and call the library.

Commands that talk to Redis share their connection options through ``redis_options``. Every
failure a user can cause ends as one ``error: ...`` line on stderr and exit code 1, never a
traceback (``-vv`` logs it). Logging is configured here (see ``_logging``), and only here: the
library never does.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any, TypeVar

import click
from redis.exceptions import RedisClusterException, RedisError

import conveyor
from conveyor.cli import _logging
from conveyor.connection import DEFAULT_URL, redact_url, secrets_in_url
from conveyor.errors import ConveyorError

__all__ = ["CliError", "main", "open_client", "redis_options"]

log = logging.getLogger("conveyor.cli")

F = TypeVar("F", bound=Callable[..., Any])

#: ctx.meta key: passwords seen in --url, scrubbed from any error message shown
_SECRETS = "conveyor.secrets"
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


def redis_options(*, fallback: str = DEFAULT_URL) -> Callable[[F], F]:
    """Add the options shared by every command that talks to Redis (``--url``).

    ``fallback`` is what the help names as used when neither --url nor REDIS_URL is set.

    >>> @main.command()          # doctest: +SKIP
    ... @redis_options()
    ... def ping(url: str | None) -> None: ...
    """
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
    ]

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def open_client(url: str | None) -> Any:
    """A client for ``url`` (see ``conveyor.connect``: a cluster client for a cluster node's
    URL) that has answered PING (on a cluster, one node has: each command then reaches its own).

    A server that cannot be reached raises CliError naming the URL, without its password.

    >>> client = open_client("redis://localhost:6379/0")   # doctest: +SKIP
    """
    client = conveyor.connect(url)
    try:
        client.ping()
    except (RedisError, RedisClusterException) as exc:
        log.debug("PING failed", exc_info=True)
        client.close()
        shown = redact_url(url or DEFAULT_URL)
        secrets = secrets_in_url(url or DEFAULT_URL)
        raise CliError(f"cannot connect to {shown}: {_one_line(exc, secrets)}") from None
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
from conveyor.cli import consume as _consume  # noqa: E402, F401
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
