"""``conveyor dlq ls | replay | purge``: the dead letters of a stream, from the command line."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click
from rich.console import Console, JustifyMethod
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from conveyor.cli import (
    EXIT_INTERRUPTED,
    CliError,
    _sigterm_as_interrupt,
    main,
    redis_options,
)
from conveyor.cli._common import client_for, confirm, dead_letter_option, echo_json, json_option
from conveyor.deadletter import DeadLetter, DeadLetters, OnProgress, Where, matching

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

#: widest an error or the fields may be in the table before they are shortened
_SHORT = 40
#: the table's width when stdout is not a terminal (a pipe, a CI log): ids must not wrap
_PIPE_WIDTH = 200


def _dead_letter_options(func: F) -> F:
    """--stream and --dead-letter, then the Redis options: what every dlq command needs."""
    func = dead_letter_option(redis_options()(func))
    return click.option(
        "-s", "--stream", metavar="STREAM", required=True, help="The stream consumers read."
    )(func)


def _change_options(func: F) -> F:
    """Which entries to change (every criterion given must hold), and whether to ask first."""
    options = [
        click.option(
            "--error-contains", metavar="TEXT", help="Only entries whose last error contains TEXT."
        ),
        click.option("--group", metavar="GROUP", help="Only entries the group GROUP gave up on."),
        click.option(
            "--origin-id",
            "origin_ids",
            metavar="ID",
            multiple=True,
            help="Only the message with this id on its origin stream (repeatable).",
        ),
        click.option(
            "--before-ms",
            metavar="MS",
            type=click.IntRange(min=0),
            help="Only entries dead-lettered before this time (ms since the epoch).",
        ),
        click.option("--dry-run", is_flag=True, help="Count what would be done, change nothing."),
        click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _where(
    error_contains: str | None,
    group: str | None,
    origin_ids: tuple[str, ...],
    before_ms: int | None,
) -> Where | None:
    return matching(
        error_contains=error_contains,
        group=group,
        origin_ids=origin_ids or None,
        before_ms=before_ms,
    )


@contextmanager
def _dead_letters(url: str | None, stream: str, dead_letter: str | None) -> Iterator[DeadLetters]:
    with client_for(url) as client:
        yield DeadLetters(client, stream, dead_letter=dead_letter)


def _with_progress(label: str, interrupted: str, work: Callable[[OnProgress], T]) -> T:
    """``work(on_progress)`` under a progress bar on stderr; Ctrl-C or SIGTERM stop it with
    the ``interrupted`` line and exit code 130."""
    console = Console(stderr=True, highlight=False)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with (
        Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar,
        _sigterm_as_interrupt(),
    ):
        task = bar.add_task(label, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        try:
            return work(advance)
        except KeyboardInterrupt:
            bar.stop()
            click.echo(f"interrupted: {interrupted}", err=True)
            raise SystemExit(EXIT_INTERRUPTED) from None


def _short(text: str, width: int = _SHORT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _entries(count: int) -> str:
    return f"{count} entry" if count == 1 else f"{count} entries"


def _iso(letter: DeadLetter) -> str:
    time = letter.time
    return "-" if time is None else time.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(letter: DeadLetter) -> str:
    return " ".join(f"{k}={v}" for k, v in letter.to_dict()["fields"].items())


@main.group()
def dlq() -> None:
    """Dead letters: the messages consumers gave up on, with where they came from.

    \b
    Examples:
      conveyor dlq ls --stream orders
      conveyor dlq replay --stream orders --error-contains timeout --dry-run
      conveyor dlq purge --stream orders --before-ms 1700000000000 --yes
    """


@dlq.command("ls")
@_dead_letter_options
@click.option(
    "-n",
    "--count",
    metavar="N",
    type=click.IntRange(1, 100_000),
    default=100,
    show_default=True,
    help="Show at most N entries, oldest first.",
)
@click.option("--after", metavar="ID", help="Start after this dead-letter entry id (paging).")
@json_option
def ls(
    stream: str,
    dead_letter: str | None,
    url: str | None,
    count: int,
    after: str | None,
    as_json: bool,
) -> None:
    """List dead letters, oldest first: id, origin, group, consumer, deliveries, error, time."""
    with _dead_letters(url, stream, dead_letter) as dead:
        letters = dead.list(count=count, after=after)
        total = dead.count()
    if as_json:
        for letter in letters:
            echo_json(letter.to_dict())
        return
    heading = f"{dead.dead_letter}: {_entries(total)}"
    if len(letters) < total:
        heading += f", showing {len(letters)}" + (f" after {after}" if after else "")
    if not letters:
        click.echo(heading)
        return
    rows = [
        (
            letter.id,
            letter.origin_id or "-",
            letter.group or "-",
            letter.consumer or "-",
            str(letter.deliveries),
            _short(letter.error or "-"),
            _iso(letter),
            _short(_fields(letter)),
        )
        for letter in letters
    ]
    click.echo(heading)
    table = Table()
    for header in ("id", "origin id", "group", "consumer", "deliveries", "error", "time", "fields"):
        # Identifiers never wrap; on a narrow screen the error and the fields give way.
        wraps = header in ("error", "fields")
        justify: JustifyMethod = "right" if header == "deliveries" else "left"
        table.add_column(header, justify=justify, no_wrap=not wraps)
    for row in rows:
        table.add_row(*row)
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, _PIPE_WIDTH)
    console.print(table)


@dlq.command()
@_dead_letter_options
@_change_options
@click.option("--limit", metavar="N", type=click.IntRange(min=1), help="Replay at most N entries.")
@json_option
def replay(
    stream: str,
    dead_letter: str | None,
    url: str | None,
    error_contains: str | None,
    group: str | None,
    origin_ids: tuple[str, ...],
    before_ms: int | None,
    dry_run: bool,
    yes: bool,
    limit: int | None,
    as_json: bool,
) -> None:
    """Put dead letters back on their origin streams, oldest first, and delete them here.

    Each message goes back with its own fields, as a new entry; it is added there before it is
    deleted here, so an interruption may duplicate an entry but never loses one. Entries
    dead-lettered while the replay runs wait for the next one.
    """
    where = _where(error_contains, group, origin_ids, before_ms)
    with _dead_letters(url, stream, dead_letter) as dead:
        if not (dry_run or yes):  # a question to ask, or to quote in the refusal
            plan = dead.replay(where=where, dry_run=True, limit=limit)
            confirm(
                f"Replay {plan.replayed} of {plan.matched} matching entries from "
                f"{dead.dead_letter} to their origin streams?",
                yes=yes,
                action="replay",
            )
        result = _with_progress(
            "replay",
            "entries replayed so far are gone from the dead-letter stream (the page in flight "
            "may also still be there); run it again to continue",
            lambda advance: dead.replay(
                where=where, dry_run=dry_run, limit=limit, on_progress=advance
            ),
        )
    if as_json:
        echo_json(
            {
                "dead_letter": dead.dead_letter,
                "dry_run": dry_run,
                "scanned": result.scanned,
                "matched": result.matched,
                "replayed": result.replayed,
                "skipped": result.skipped,
                "failed": result.failed,
                "new_ids": list(result.new_ids),
            }
        )
    verb = "dry run: would replay" if dry_run else "replayed"
    notes = ""
    if result.skipped:
        notes += f", {result.skipped} skipped without provenance"
    if result.failed:
        notes += f", {result.failed} failed"
    if not as_json:
        click.echo(
            f"{verb} {result.replayed} of {result.matched} matching (scanned {result.scanned})"
            + notes
        )
    if result.failed:
        raise CliError(
            f"{result.failed} entries could not be added to their origin stream (see the "
            f"warnings above); they are still in {dead.dead_letter}"
        )


@dlq.command()
@_dead_letter_options
@_change_options
@json_option
def purge(
    stream: str,
    dead_letter: str | None,
    url: str | None,
    error_contains: str | None,
    group: str | None,
    origin_ids: tuple[str, ...],
    before_ms: int | None,
    dry_run: bool,
    yes: bool,
    as_json: bool,
) -> None:
    """Delete dead letters for good: the matching ones, or all of them without a filter.

    Only entries that existed when the purge started are deleted.
    """
    where = _where(error_contains, group, origin_ids, before_ms)
    with _dead_letters(url, stream, dead_letter) as dead:
        if not (dry_run or yes):  # a question to ask, or to quote in the refusal
            doomed = dead.purge(where=where, dry_run=True)
            which = "that match" if where is not None else "(all of them)"
            confirm(
                f"Delete {_entries(doomed)} {which} from {dead.dead_letter}? It cannot be undone.",
                yes=yes,
                action="purge",
            )
        purged = _with_progress(
            "purge",
            "the purge stopped partway",
            lambda advance: dead.purge(where=where, dry_run=dry_run, on_progress=advance),
        )
    if as_json:
        echo_json({"dead_letter": dead.dead_letter, "dry_run": dry_run, "purged": purged})
    elif dry_run:
        click.echo(f"dry run: would purge {_entries(purged)} from {dead.dead_letter}")
    else:
        click.echo(f"purged {_entries(purged)} from {dead.dead_letter}")
