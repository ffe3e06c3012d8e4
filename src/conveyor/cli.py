"""The ``conveyor`` command line: click commands that parse options and call the library.

Commands that talk to Redis share their connection options through ``redis_options``. Every
failure a user can cause ends as one ``error: ...`` line on stderr and exit code 1, never a
traceback (``-vv`` logs it). Logging is configured here, and only here: the library never does.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import IO, Any, TextIO, TypeVar
from urllib.parse import urlsplit

import click
import redis
from redis.exceptions import RedisError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

import conveyor
from conveyor._keys import dead_letter_key
from conveyor.connection import DEFAULT_URL, redact_url
from conveyor.errors import ConveyorError

__all__ = ["CliError", "main", "open_client", "redis_options"]

log = logging.getLogger("conveyor.cli")

F = TypeVar("F", bound=Callable[..., Any])

#: ctx.meta key: passwords seen in --url, scrubbed from any error message shown
_SECRETS = "conveyor.secrets"
#: exit code of a run stopped by Ctrl-C or SIGTERM (128 + SIGINT), as shells report it
EXIT_INTERRUPTED = 130


class CliError(click.ClickException):
    """A failure the user can fix: shown as one ``error: ...`` line on stderr, exit code 1."""

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file, err=file is None)


def _one_line(exc: BaseException, secrets: set[str]) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


class _Group(click.Group):
    """A click group that turns conveyor, Redis and OS errors into one ``error:`` line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (ConveyorError, RedisError, OSError) as exc:
            log.debug("command failed", exc_info=True)
            raise CliError(_one_line(exc, ctx.meta.get(_SECRETS, set()))) from None


class _StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to ``sys.stderr`` as it is at each record, so log lines print above a live
    progress display (which swaps ``sys.stderr`` for a proxy while it runs)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _configure_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logger = logging.getLogger("conveyor")
    for old in [h for h in logger.handlers if isinstance(h, _StderrHandler)]:
        logger.removeHandler(old)
    handler = _StderrHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)


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
    help="Log more on stderr: -v for INFO, -vv for DEBUG (default: warnings and errors).",
)
def main(verbose: int) -> None:
    """Reliable batch processing on Redis Streams consumer groups.

    Commands that talk to Redis take --url; without it they use the REDIS_URL environment
    variable. Errors print one line on stderr and exit with code 1.

    \b
    Example:
      conveyor demo --messages 10000 --consumers 4
    """
    _configure_logging(verbose)


# -- shared options ----------------------------------------------------------------------------


def _remember_secret(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        with suppress(ValueError):
            password = urlsplit(value).password
            if password:
                ctx.meta.setdefault(_SECRETS, set()).add(password)
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
                f"unix:///path. Default: the REDIS_URL environment variable, else {fallback}."
            ),
        ),
    ]

    def decorate(func: F) -> F:
        for option in reversed(options):
            func = option(func)
        return func

    return decorate


def open_client(url: str | None) -> redis.Redis:
    """A client for ``url`` (see ``conveyor.connect``) that has answered PING.

    A server that cannot be reached raises CliError naming the URL, without its password.

    >>> client = open_client("redis://localhost:6379/0")   # doctest: +SKIP
    """
    client = conveyor.connect(url)
    try:
        client.ping()
    except RedisError as exc:
        client.close()
        shown = redact_url(url or DEFAULT_URL)
        raise CliError(f"cannot connect to {shown}: {_one_line(exc, set())}") from None
    return client


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM stops the command like Ctrl-C does, so it cleans up too."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(_signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _start_embedded_server() -> conveyor.EmbeddedServer:
    """Start the embedded server with SIGINT blocked while it forks; the child keeps the block.

    A Ctrl-C at the terminal signals the whole process group: the server must outlive it until
    the consumers have left, and is then stopped by its pid.
    """
    server = conveyor.EmbeddedServer()
    blocked = hasattr(signal, "pthread_sigmask")
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if blocked else None
    try:
        server.start()
    except BaseException:
        server.close()
        raise
    finally:
        if previous is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    log.info("started %s, pid %s, at %s", server.binary.name, server.pid, server.url)
    return server


# -- demo --------------------------------------------------------------------------------------

_DEMO_GROUP = "demo"
_DEMO_PAYLOAD = "x" * 64
_DEMO_SEND_BLOCK = 2_000  # rows per send_many call: the progress bar moves between calls
_DEMO_MAX_WAIT_MS = 200
_DEMO_JOIN_S = _DEMO_MAX_WAIT_MS / 1000 + 15.0


class _RateColumn(ProgressColumn):
    """Average messages per second since the task started."""

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        if not elapsed:
            return Text("", style="progress.data.speed")
        return Text(f"{task.completed / elapsed:,.0f} msgs/s", style="progress.data.speed")


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description:<9}"),
        BarColumn(),
        MofNCompleteColumn(),
        _RateColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


class _Tally:
    """What the consumer threads have done, under one lock; ``done`` is set at the target."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.processed = 0
        self.acked = 0
        self.finished_at: float | None = None
        self.errors: list[BaseException] = []
        self.done = threading.Event()
        self._lock = threading.Lock()

    def add(self, processed: int, acked: int) -> None:
        with self._lock:
            self.processed += processed
            self.acked += acked
            if self.processed >= self.target and self.finished_at is None:
                self.finished_at = time.perf_counter()
                self.done.set()

    def fail(self, exc: BaseException) -> None:
        with self._lock:
            self.errors.append(exc)
        self.done.set()


def _consume(consumer: conveyor.Consumer, tally: _Tally) -> None:
    """One consumer thread: read a batch, process it, ack it, until the tally is done."""
    try:
        checksum = 0
        while not tally.done.is_set():
            batch = consumer.get_batch()
            if not batch:
                continue
            checksum += sum(int(msg.fields["n"]) for msg in batch)  # the "processing"
            tally.add(len(batch), consumer.ack_many(batch))
        log.debug("consumer %s done, checksum %d", consumer.name, checksum)
    except Exception as exc:
        tally.fail(exc)
    finally:
        consumer.close()


@dataclass(frozen=True)
class _DemoResult:
    produced: int
    produce_s: float
    processed: int
    acked: int
    consume_s: float
    pending: int
    consumers: int
    batch_size: int

    @property
    def ok(self) -> bool:
        return self.pending == 0 and self.processed == self.produced


def _produce(client: redis.Redis, stream: str, messages: int, progress: Progress) -> float:
    producer = conveyor.Producer(client, stream)
    task = progress.add_task("produce", total=messages)
    started = time.perf_counter()
    for first in range(0, messages, _DEMO_SEND_BLOCK):
        last = min(messages, first + _DEMO_SEND_BLOCK)
        producer.send_many({"n": i, "payload": _DEMO_PAYLOAD} for i in range(first, last))
        progress.update(task, completed=last)
    return time.perf_counter() - started


def _consume_all(
    client: redis.Redis,
    stream: str,
    tally: _Tally,
    *,
    consumers: int,
    batch_size: int,
    progress: Progress,
) -> float:
    group = [
        conveyor.Consumer(
            client, stream, _DEMO_GROUP, batch_size=batch_size, max_wait_ms=_DEMO_MAX_WAIT_MS
        )
        for _ in range(consumers)
    ]
    threads = [
        threading.Thread(target=_consume, args=(c, tally), name=f"demo-{c.name}", daemon=True)
        for c in group
    ]
    task = progress.add_task("consume", total=tally.target)
    started = time.perf_counter()
    try:
        for thread in threads:
            thread.start()
        while not tally.done.wait(0.1):
            progress.update(task, completed=tally.processed)
            if not any(t.is_alive() for t in threads):
                break
        progress.update(task, completed=tally.processed)
    finally:
        # Also on Ctrl-C: each consumer finishes and acks the batch in hand, then leaves.
        tally.done.set()
        deadline = time.monotonic() + _DEMO_JOIN_S
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
    if tally.errors:
        raise tally.errors[0]
    return (tally.finished_at or time.perf_counter()) - started


def _pending(client: redis.Redis, stream: str) -> int:
    summary: Any = client.xpending(stream, _DEMO_GROUP)
    return int(summary["pending"])


def _print_summary(console: Console, result: _DemoResult) -> None:
    def rate(count: int, seconds: float) -> str:
        return f"{count / seconds:.0f} msgs/s" if seconds > 0 else ""

    grid = Table.grid(padding=(0, 2))
    grid.add_column()
    grid.add_column(justify="right")
    grid.add_column(justify="right")
    grid.add_column(justify="right")
    r = result
    grid.add_row("produced", str(r.produced), f"{r.produce_s:.2f} s", rate(r.produced, r.produce_s))
    grid.add_row(
        "processed", str(r.processed), f"{r.consume_s:.2f} s", rate(r.processed, r.consume_s)
    )
    grid.add_row("acked", str(r.acked))
    grid.add_row("pending", str(r.pending))
    grid.add_row("consumers", str(r.consumers), f"batch size {r.batch_size}")
    console.print(grid)
    if r.ok:
        console.print("result     OK: every message was processed and acknowledged")
    else:
        console.print(
            f"result     FAILED: {r.produced - r.processed} messages not processed, "
            f"{r.pending} still pending"
        )


@main.command()
@click.option(
    "--messages",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="How many messages to produce, then consume.",
)
@click.option(
    "--consumers",
    type=click.IntRange(1, 256),
    default=4,
    show_default=True,
    help="Consumers in the group, each in its own thread.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 1_000_000),
    default=100,
    show_default=True,
    help="Most messages one get_batch() returns.",
)
@redis_options(fallback="an embedded Valkey server, started for the demo and stopped after it")
@click.pass_context
def demo(
    ctx: click.Context, messages: int, consumers: int, batch_size: int, url: str | None
) -> None:
    """Produce messages, consume them with a consumer group, and check that none is left.

    The messages go to a new stream with a unique name (demo:<random>), consumed by a group
    named "demo". On a server of yours (--url or REDIS_URL) the stream is deleted at the end;
    without one, an embedded Valkey server runs the demo: no Redis installation needed.

    Exit code 0 when every message was processed and nothing is left pending, 1 otherwise,
    130 when interrupted (Ctrl-C or SIGTERM: the consumers finish their batch and leave).

    \b
    Example:
      conveyor demo --messages 10000 --consumers 8 --batch-size 200
    """
    out = Console(highlight=False)
    tally = _Tally(messages)
    try:
        with _sigterm_as_interrupt():
            result = _run_demo(out, url, tally, consumers, batch_size)
    except KeyboardInterrupt:
        click.echo(
            f"interrupted: {tally.processed} of {messages} messages processed; "
            "consumers stopped and left the group",
            err=True,
        )
        ctx.exit(EXIT_INTERRUPTED)
    _print_summary(out, result)
    ctx.exit(0 if result.ok else 1)


def _run_demo(
    out: Console, url: str | None, tally: _Tally, consumers: int, batch_size: int
) -> _DemoResult:
    stream = f"demo:{uuid.uuid4().hex[:12]}"
    server = _start_embedded_server() if url is None else None
    client: redis.Redis | None = None
    try:
        where = (
            f"an embedded {server.binary.name} at {server.url}" if server else redact_url(url or "")
        )
        client = open_client(server.url if server else url)
        out.print(
            f"conveyor demo: {tally.target} messages to stream {stream} on {where}, "
            f"{consumers} consumers in group {_DEMO_GROUP!r}"
        )
        with _progress(Console(stderr=True, highlight=False)) as progress:
            produce_s = _produce(client, stream, tally.target, progress)
            consume_s = _consume_all(
                client, stream, tally, consumers=consumers, batch_size=batch_size, progress=progress
            )
        return _DemoResult(
            produced=tally.target,
            produce_s=produce_s,
            processed=tally.processed,
            acked=tally.acked,
            consume_s=consume_s,
            pending=_pending(client, stream),
            consumers=consumers,
            batch_size=batch_size,
        )
    finally:
        try:
            if client is not None:
                _close_client(client, stream, delete_stream=server is None)
        finally:
            if server is not None:
                server.close()


def _close_client(client: redis.Redis, stream: str, *, delete_stream: bool) -> None:
    try:
        if delete_stream:  # a server of the user's: leave nothing behind
            client.delete(stream, dead_letter_key(stream))
    except RedisError as exc:
        log.warning("could not delete demo stream %s: %s", stream, exc)
    finally:
        client.close()
