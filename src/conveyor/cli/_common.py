"""What several command modules share: the --stream, --group and --json options, looking a
group up with an error that says what exists instead, durations for people, and tables or JSON
on stdout."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import click
from redis.exceptions import ResponseError
from rich.console import Console
from rich.table import Table

from conveyor._core.commands import as_text
from conveyor._io import server_error
from conveyor.cli import CliError, open_client
from conveyor.connection import redact_url
from conveyor.monitor import DEFAULT_BATCH_SIZE, DEFAULT_HEARTBEAT_MS, DEFAULT_IDLE_THRESHOLD_MS

__all__ = [
    "Client",
    "check_url",
    "client_for",
    "confirm",
    "dead_letter_option",
    "echo_json",
    "entries",
    "group_info",
    "group_option",
    "idle_text",
    "json_option",
    "max_lag_option",
    "one_group_option",
    "print_table",
    "quiet_broken_pipe",
    "status_options",
    "stream_option",
    "streams_option",
]

F = TypeVar("F", bound=Callable[..., Any])

#: a redis.Redis, or a redis.cluster.RedisCluster for a cluster node's URL: the commands call
#: only the methods both have (the cluster client sends each to the node of its key)
Client = Any

#: the table's width when stdout is not a terminal (a pipe, a CI log): ids must not wrap
PIPE_WIDTH = 200


def stream_option(func: F) -> F:
    """``-s/--stream STREAM``, required."""
    return click.option(
        "-s", "--stream", metavar="STREAM", required=True, help="The stream (its key name)."
    )(func)


def group_option(func: F) -> F:
    """``-g/--group GROUP``, required."""
    return click.option(
        "-g", "--group", metavar="GROUP", required=True, help="The consumer group."
    )(func)


def streams_option(what: str, *, required: bool = True) -> Callable[[F], F]:
    """``-s/--stream STREAM``, repeatable, into ``streams``: ``what`` each one is."""
    return click.option(
        "-s", "--stream", "streams", metavar="STREAM", multiple=True, required=required, help=what
    )


def one_group_option(func: F) -> F:
    """``-g/--group GROUP``, optional: every group without it."""
    return click.option(
        "-g", "--group", metavar="GROUP", help="Only this group. Default: every group."
    )(func)


def dead_letter_option(func: F) -> F:
    """``--dead-letter NAME``: the consumers' ``dead_letter=NAME``; each stream's own without."""
    return click.option(
        "--dead-letter",
        metavar="NAME",
        help="The dead-letter stream, when the consumers were given dead_letter=NAME. "
        "Default: the stream's own, e.g. {orders}:dead for orders.",
    )(func)


def max_lag_option(more: str = "") -> Callable[[F], F]:
    """``--max-lag N``: a lag above N is critical (``more``: what the command adds)."""
    return click.option(
        "--max-lag",
        metavar="N",
        type=click.IntRange(min=0),
        help="A lag above N is critical." + (f" {more}" if more else ""),
    )


def json_option(func: F) -> F:
    """``--json``: a listing prints one JSON object per line (per entry, group, message...), a
    single result one JSON object; for scripts and jq."""
    return click.option(
        "--json",
        "as_json",
        is_flag=True,
        help="Print JSON: one object per line for a listing, one object for a result.",
    )(func)


def echo_json(value: Any) -> None:
    """``value`` as JSON on one line of stdout."""
    click.echo(json.dumps(value))


_DB_SCHEMES = ("redis", "rediss", "valkey", "valkeys", "unix")


def check_url(url: str | None) -> None:
    """Refuse a database that is not a number (``redis://host:6379/abc``): redis-py would
    quietly use database 0. One the server does not have is refused when connecting."""
    text = url or os.environ.get("REDIS_URL")
    if not text:
        return
    try:
        parts = urlsplit(text.strip())
        query = parse_qs(parts.query)
    except ValueError:
        return  # connect() says what is wrong with it
    if parts.scheme not in _DB_SCHEMES or "@" in parts.path + parts.query:
        # Sentinel URLs name a service there; an "@" there is a password's tail (an unencoded
        # "/" or "?" in it), which connect() explains without showing it
        return
    found = list(query.get("db", []))
    if parts.scheme != "unix" and unquote(parts.path).strip("/"):
        found.insert(0, unquote(parts.path).strip("/"))
    if any(not (db.isascii() and db.isdigit()) for db in found):
        # the value is not quoted: whatever the URL holds, it never shows a secret
        raise CliError(
            f"the database in {redact_url(text)} is not a number (the URL ends with /DB, a "
            "database number: 0, 1, 2 ...)"
        )


@contextmanager
def client_for(url: str | None) -> Iterator[Client]:
    """A client that answered PING (a redis.Redis, or a RedisCluster for a cluster node's URL),
    closed after the block."""
    check_url(url)
    client = open_client(url)
    try:
        yield client
    finally:
        client.close()


def groups_of(client: Client, stream: str) -> list[dict[str, Any]]:
    """XINFO GROUPS of ``stream`` with text names and ids; CliError when the stream is missing."""
    try:
        rows: Any = client.xinfo_groups(stream)
    except ResponseError as exc:
        if "no such key" in str(exc).lower():
            raise CliError(f"stream {stream!r} does not exist") from None
        # the code word (CLUSTERDOWN, WRONGTYPE ...) back in the text, the stream named
        raise server_error(exc, f"XINFO GROUPS on stream {stream!r}", client) from None
    return [
        {key: as_text(value) if isinstance(value, bytes) else value for key, value in row.items()}
        for row in rows
    ]


def group_info(client: Client, stream: str, group: str) -> dict[str, Any]:
    """The XINFO GROUPS row of ``group``; CliError naming the groups there are when it is not."""
    rows = groups_of(client, stream)
    for row in rows:
        if row["name"] == group:
            return row
    there = ", ".join(repr(row["name"]) for row in rows) or "none"
    raise CliError(f"stream {stream!r} has no group {group!r} (groups: {there})")


def confirm(question: str, *, yes: bool, action: str) -> None:
    """Ask ``question`` on the terminal unless ``yes``. Without a terminal to ask on, refuse
    at once, with the question in the error: the user sees what would have happened."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise CliError(
            f"not confirmed (stdin is not a terminal; pass --yes to {action}): {question}"
        )
    if not click.confirm(question, default=False, err=True):
        raise CliError("cancelled: nothing was changed")


def idle_text(ms: int) -> str:
    """A duration for people: ``850ms``, ``12.3s``, ``4m05s``, ``2h03m``, ``3d04h``.

    >>> idle_text(850), idle_text(12_345), idle_text(245_000), idle_text(7_380_000)
    ('850ms', '12.3s', '4m05s', '2h03m')
    """
    if ms < 1000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    minutes, seconds = divmod(ms // 1000, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def entries(count: int) -> str:
    return f"{count} entry" if count == 1 else f"{count} entries"


def print_table(table: Table) -> None:
    """``table`` on stdout; in a pipe wide enough that ids and names never wrap."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, PIPE_WIDTH)
    console.print(table)


@contextmanager
def quiet_broken_pipe() -> Iterator[None]:
    """A reader that went away (``| head``) ends the command quietly, as other tools do."""
    try:
        yield
    except BrokenPipeError:
        # Python would complain again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(1) from None


def status_options(func: F) -> F:
    """The options that decide a consumer's status, shared by ``monitor`` and ``exporter``;
    their defaults are the consumers' own."""
    func = click.option(
        "--heartbeat-ms",
        metavar="MS",
        type=click.IntRange(min=1),
        default=DEFAULT_HEARTBEAT_MS,
        show_default=True,
        help="The consumers' heartbeat interval (give theirs if they were given one); three "
        "missed beats: DEAD.",
    )(func)
    func = click.option(
        "--idle-threshold-ms",
        metavar="MS",
        type=click.IntRange(min=1),
        default=DEFAULT_IDLE_THRESHOLD_MS,
        show_default=True,
        help="A consumer idle longer than this gets a warning.",
    )(func)
    return click.option(
        "--batch-size",
        metavar="N",
        type=click.IntRange(min=1),
        default=DEFAULT_BATCH_SIZE,
        show_default=True,
        help="The consumers' batch size (give theirs if they were given one): a consumer "
        "holding more pending entries than this gets a warning.",
    )(func)
