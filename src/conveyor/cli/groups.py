"""``conveyor groups ls | create | destroy | setid``: a stream's consumer groups."""

from __future__ import annotations

from typing import Any

import click
from redis.exceptions import ResponseError
from rich.table import Table

from conveyor._core.commands import error_code
from conveyor._keys import heartbeat_key
from conveyor.cli import CliError, main, redis_options
from conveyor.cli._common import (
    client_for,
    confirm,
    echo_json,
    group_info,
    group_option,
    groups_of,
    json_option,
    print_table,
    quiet_broken_pipe,
    stream_option,
)
from conveyor.config import is_stream_id

_ID_HELP = "0: the start of the stream (every entry is delivered), $: its end (new entries only), "


def _check_id(value: str) -> str:
    if value not in ("0", "$") and not is_stream_id(value):
        raise CliError(f"--id {value!r} is not a stream id: use 0, $ or an id like 1700000000000-0")
    return value


@main.group()
def groups() -> None:
    """A stream's consumer groups: list, create, destroy, and move where they read from.

    \b
    Examples:
      conveyor groups ls --stream orders
      conveyor groups create --stream orders --group billing --id '$' --mkstream
      conveyor groups setid --stream orders --group billing --id 0
      conveyor groups destroy --stream orders --group billing --yes
    """


def group_dict(stream: str, row: dict[str, Any]) -> dict[str, Any]:
    """A group as --json prints it (lag null when the server cannot tell)."""
    return {
        "stream": stream,
        "group": row["name"],
        "consumers": int(row["consumers"]),
        "pending": int(row["pending"]),
        "last_delivered_id": row["last-delivered-id"],
        "lag": row.get("lag"),
    }


@groups.command("ls")
@stream_option
@json_option
@redis_options()
def ls(stream: str, as_json: bool, url: str | None) -> None:
    """List the groups of a stream: consumers, pending, last delivered id, lag.

    Lag is how many entries the group has not been delivered yet (Redis 7+; "?" when the
    server cannot tell, e.g. after deletions). --json: one object per group and line.

    \b
    Example:
      conveyor groups ls --stream orders
    """
    with client_for(url) as client:
        rows = groups_of(client, stream)
    if as_json:
        with quiet_broken_pipe():
            for row in rows:
                echo_json(group_dict(stream, row))
        return
    if not rows:
        click.echo(f"{stream}: no groups")
        return
    table = Table()
    for header in ("group", "consumers", "pending", "last delivered id", "lag"):
        numeric = header in ("consumers", "pending", "lag")
        table.add_column(header, no_wrap=True, justify="right" if numeric else "left")
    for row in rows:
        lag = row.get("lag")
        table.add_row(
            row["name"],
            str(row["consumers"]),
            str(row["pending"]),
            row["last-delivered-id"],
            "?" if lag is None else str(lag),
        )
    print_table(table)


@groups.command()
@stream_option
@group_option
@click.option(
    "--id",
    "start",
    metavar="ID",
    default="0",
    show_default=True,
    help=_ID_HELP + "or an entry id (delivery starts after it).",
)
@click.option("--mkstream", is_flag=True, help="Create the stream if it does not exist.")
@json_option
@redis_options()
def create(
    stream: str, group: str, start: str, mkstream: bool, as_json: bool, url: str | None
) -> None:
    """Create a consumer group (consumers also create theirs, at 0, when it is missing).

    A group that exists already is left as it is (exit code 0, saying so): running the
    command twice, as deployment scripts do, is safe. --json: {"stream", "group", "created",
    "last_delivered_id"}.

    \b
    Examples:
      conveyor groups create --stream orders --group billing
      conveyor groups create --stream orders --group audit --id '$' --mkstream
    """
    _check_id(start)
    created = True
    with client_for(url) as client:
        try:
            client.xgroup_create(stream, group, start, mkstream=mkstream)
        except ResponseError as exc:
            if error_code(exc) != "BUSYGROUP":
                if "MKSTREAM" in str(exc):
                    raise CliError(
                        f"stream {stream!r} does not exist; pass --mkstream to create it"
                    ) from None
                raise
            created = False
        last = group_info(client, stream, group)["last-delivered-id"]
    if as_json:
        echo_json({"stream": stream, "group": group, "created": created, "last_delivered_id": last})
    elif created:
        click.echo(f"created group {group!r} on {stream} at {start}")
    else:
        click.echo(
            f"group {group!r} already exists on {stream} (it reads after {last}); left as it is"
        )


@groups.command()
@stream_option
@group_option
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@redis_options()
def destroy(stream: str, group: str, yes: bool, as_json: bool, url: str | None) -> None:
    """Destroy a consumer group, its consumers and its pending list (and its heartbeats).

    The entries stay in the stream; what the group had read and not acknowledged is no
    longer tracked by anyone. Asks first, saying how many pending entries would be dropped;
    without --yes and without a terminal to ask on, it refuses.

    \b
    Example:
      conveyor groups destroy --stream orders --group billing --yes
    """
    with client_for(url) as client:
        info = group_info(client, stream, group)
        confirm(
            f"Destroy group {group!r} on {stream}? Its {_pending(int(info['pending']))} (read, "
            f"not acknowledged), held by {info['consumers']} consumers, would be dropped.",
            yes=yes,
            action="destroy it",
        )
        pipe = client.pipeline(transaction=True)
        pipe.xgroup_destroy(stream, group)
        pipe.delete(heartbeat_key(stream, group))
        destroyed, _ = pipe.execute()
    if not destroyed:
        raise CliError(f"group {group!r} on {stream!r} was already gone")
    if as_json:
        consumers, held = int(info["consumers"]), int(info["pending"])
        echo_json(
            {
                "stream": stream,
                "group": group,
                "destroyed": True,
                "consumers": consumers,
                "pending": held,
            }
        )
        return
    click.echo(
        f"destroyed group {group!r} on {stream}: dropped its {info['consumers']} consumers and "
        f"{_pending(int(info['pending']))}"
    )


@groups.command()
@stream_option
@group_option
@click.option(
    "--id",
    "start",
    metavar="ID",
    required=True,
    help=_ID_HELP + "or an entry id (the next delivery is the entry after it).",
)
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@json_option
@redis_options()
def setid(stream: str, group: str, start: str, yes: bool, as_json: bool, url: str | None) -> None:
    """Move where a group reads next (XGROUP SETID); pending entries are not touched.

    Moving back delivers entries again; moving forward skips the entries in between that
    were not delivered yet: then it asks first (or refuses without --yes and a terminal).

    \b
    Examples:
      conveyor groups setid --stream orders --group billing --id 0            # all again
      conveyor groups setid --stream orders --group billing --id '$' --yes   # skip the backlog
    """
    _check_id(start)
    with client_for(url) as client:
        info = group_info(client, stream, group)
        last = info["last-delivered-id"]
        lag = info.get("lag")
        forward = start == "$" or (start != "0" and _id_key(start) > _id_key(last))
        if forward and lag != 0:
            undelivered = "some" if lag is None else str(lag)
            confirm(
                f"Move group {group!r} on {stream} from {last} to {start}? Of its {undelivered} "
                "undelivered entries, those up to the new id will never be delivered to it.",
                yes=yes,
                action="skip them",
            )
        client.xgroup_setid(stream, group, start)
        after = group_info(client, stream, group)
    lag_after = after.get("lag")
    if as_json:
        echo_json(group_dict(stream, after))
        return
    shown = "" if lag_after is None else f" (undelivered now: {lag_after})"
    click.echo(f"group {group!r} on {stream} now reads after {after['last-delivered-id']}{shown}")


def _pending(count: int) -> str:
    return f"{count} pending entry" if count == 1 else f"{count} pending entries"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
