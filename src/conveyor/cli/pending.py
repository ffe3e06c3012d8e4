"""``conveyor pending`` and ``conveyor claim``: a group's pending entries, and moving them
from one consumer to another."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import click
from rich.table import Table

from conveyor._core.commands import as_text
from conveyor.cli import main, redis_options
from conveyor.cli._common import (
    Client,
    client_for,
    echo_json,
    entries,
    group_info,
    group_option,
    idle_text,
    json_option,
    print_table,
    quiet_broken_pipe,
    stream_option,
)

#: entries read per XPENDING round trip while looking for entries to claim
_PAGE = 500


@dataclass(frozen=True, slots=True)
class Pending:
    """One entry of a group's pending list (a row of extended XPENDING)."""

    id: str
    consumer: str
    idle_ms: int
    deliveries: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "consumer": self.consumer,
            "idle_ms": self.idle_ms,
            "deliveries": self.deliveries,
        }


def read_pending(
    client: Client,
    stream: str,
    group: str,
    *,
    count: int,
    consumer: str | None = None,
    min_idle_ms: int = 0,
    after: str | None = None,
) -> list[Pending]:
    """Up to ``count`` pending entries, oldest first, with ids greater than ``after``."""
    rows: Any = client.xpending_range(
        stream,
        group,
        min="-" if after is None else "(" + after,
        max="+",
        count=count,
        consumername=consumer,
        idle=min_idle_ms or None,
    )
    return [
        Pending(
            as_text(row["message_id"]),
            as_text(row["consumer"]),
            int(row["time_since_delivered"]),
            int(row["times_delivered"]),
        )
        for row in rows
    ]


def _table(rows: list[Pending]) -> Table:
    table = Table()
    table.add_column("id", no_wrap=True)
    table.add_column("consumer", no_wrap=True)
    table.add_column("idle", justify="right")
    table.add_column("deliveries", justify="right")
    for row in rows:
        table.add_row(row.id, row.consumer, idle_text(row.idle_ms), str(row.deliveries))
    return table


@main.command()
@stream_option
@group_option
@click.option("-c", "--consumer", metavar="NAME", help="Only the entries of this consumer.")
@click.option(
    "-n",
    "--count",
    metavar="N",
    type=click.IntRange(1, 100_000),
    default=100,
    show_default=True,
    help="Show at most N entries, oldest first.",
)
@click.option(
    "--min-idle-ms",
    metavar="MS",
    type=click.IntRange(min=0),
    default=0,
    help="Only entries idle at least this long (not delivered or claimed for MS).",
)
@json_option
@redis_options()
def pending(
    stream: str,
    group: str,
    consumer: str | None,
    count: int,
    min_idle_ms: int,
    as_json: bool,
    url: str | None,
) -> None:
    """List a group's pending entries: read by a consumer and not acknowledged yet.

    For each entry: its id, the consumer that holds it, how long it has been idle (since it
    was delivered or claimed) and how many times it was delivered. A heading gives the total
    and the count per consumer; --json prints only the entries, as JSON lines with idle_ms.

    \b
    Examples:
      conveyor pending --stream orders --group billing
      conveyor pending -s orders -g billing --consumer worker-1 --min-idle-ms 60000 --json
    """
    with client_for(url) as client:
        group_info(client, stream, group)
        summary: Any = client.xpending(stream, group)
        rows = read_pending(
            client, stream, group, count=count, consumer=consumer, min_idle_ms=min_idle_ms
        )
    with quiet_broken_pipe():
        if as_json:
            for row in rows:
                echo_json(row.to_dict())
            return
        holders = ", ".join(
            f"{as_text(c['name'])} {c['pending']}" for c in summary.get("consumers") or ()
        )
        heading = f"{stream} group {group}: {summary['pending']} pending"
        if holders:
            heading += f" ({holders})"
        if len(rows) < int(summary["pending"]):
            heading += f"; showing {len(rows)}"
            if consumer or min_idle_ms:
                heading += " that match"
        click.echo(heading)
        if rows:
            print_table(_table(rows))


def _candidates(
    client: Client,
    stream: str,
    group: str,
    *,
    to: str,
    source: str | None,
    min_idle_ms: int,
    count: int,
) -> list[Pending]:
    """Pending entries idle for ``min_idle_ms``, held by ``source`` (or anyone but ``to``)."""
    found: list[Pending] = []
    after: str | None = None
    while len(found) < count:
        page = read_pending(
            client,
            stream,
            group,
            count=_PAGE,
            consumer=source,
            min_idle_ms=min_idle_ms,
            after=after,
        )
        found.extend(row for row in page if row.consumer != to)
        if len(page) < _PAGE:
            break
        after = page[-1].id
    return found[:count]


@main.command()
@stream_option
@group_option
@click.option("--to", "to", metavar="CONSUMER", required=True, help="The consumer to move to.")
@click.option(
    "--from",
    "source",
    metavar="CONSUMER",
    help="Only entries of this consumer. Default: of every consumer but --to.",
)
@click.option(
    "--min-idle-ms",
    metavar="MS",
    type=click.IntRange(min=0),
    default=60_000,
    show_default=True,
    help="Only entries idle at least this long: busy consumers keep what they work on.",
)
@click.option(
    "-n",
    "--count",
    metavar="N",
    type=click.IntRange(1, 100_000),
    default=100,
    show_default=True,
    help="Move at most N entries, oldest first.",
)
@click.option("--dry-run", is_flag=True, help="Show what would be moved, move nothing.")
@json_option
@redis_options()
def claim(
    stream: str,
    group: str,
    to: str,
    source: str | None,
    min_idle_ms: int,
    count: int,
    dry_run: bool,
    as_json: bool,
    url: str | None,
) -> None:
    """Move pending entries to another consumer (XCLAIM); nothing is ever deleted.

    Takes the oldest entries idle for --min-idle-ms, of --from or of every other consumer,
    and gives them to --to (created in the group if new), which gets them when it next reads
    its own pending entries. Their delivery counts stay as they are. The idle time is checked
    again as each entry is moved, so one that was just delivered or claimed is left alone.

    \b
    Examples:
      conveyor claim --stream orders --group billing --to worker-2 --from worker-1 --dry-run
      conveyor claim -s orders -g billing --to worker-2 --min-idle-ms 300000 --count 1000
    """
    with client_for(url) as client:
        group_info(client, stream, group)
        rows = _candidates(
            client,
            stream,
            group,
            to=to,
            source=source,
            min_idle_ms=min_idle_ms,
            count=count,
        )
        moved: set[str] = set()
        for first in range(0, 0 if dry_run else len(rows), _PAGE):
            ids: list[Any] = [row.id for row in rows[first : first + _PAGE]]
            reply: Any = client.xclaim(stream, group, to, min_idle_ms, ids, justid=True)
            moved.update(as_text(x) for x in reply)
    taken = rows if dry_run else [row for row in rows if row.id in moved]
    if as_json:
        echo_json(
            {
                "stream": stream,
                "group": group,
                "to": to,
                "dry_run": dry_run,
                "entries": [row.to_dict() for row in taken],
                "left_alone": len(rows) - len(taken),
            }
        )
        return
    if dry_run:
        click.echo(f"dry run: would move {entries(len(rows))} to {to!r}{_sources(rows)}")
        if rows:
            print_table(_table(rows))
        return
    note = (
        f"; {len(rows) - len(taken)} left alone (no longer idle)" if len(taken) < len(rows) else ""
    )
    click.echo(f"moved {entries(len(taken))} to {to!r}{_sources(taken)}{note}")


def _sources(rows: list[Pending]) -> str:
    if not rows:
        return ""
    by_consumer = Counter(row.consumer for row in rows)
    return " (from " + ", ".join(f"{name}: {n}" for name, n in sorted(by_consumer.items())) + ")"
