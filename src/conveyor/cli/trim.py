"""``conveyor trim``: retention, safely (what every group is done with) or to a length."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import click
from redis.exceptions import ResponseError

from conveyor._core.commands import as_text
from conveyor.cli import CliError, main, redis_options
from conveyor.cli._common import (
    Client,
    client_for,
    confirm,
    echo_json,
    entries,
    groups_of,
    json_option,
    stream_option,
)
from conveyor.retention import safe_trim

#: entries read per round trip while finding where a length trim cuts
_PAGE = 1_000
#: an id above every other: with --maxlen 0 everything is cut
_MAX_ID = "18446744073709551615-18446744073709551615"
#: undelivered entries counted at most, where the server does not report a group's lag
_COUNT_LIMIT = 100_000


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class GroupLoss:
    """What a length trim would take from one group: entries it was never delivered, and
    entries it holds pending (delivered, not acked)."""

    group: str
    undelivered: int
    pending: int
    at_least: bool = False

    def __str__(self) -> str:
        more = "at least " if self.at_least else ""
        return (
            f"group {self.group!r}: {more}{self.undelivered} undelivered and {self.pending} pending"
        )


@dataclass(frozen=True, slots=True)
class LengthTrim:
    """What ``XTRIM MAXLEN ~ maxlen`` would do: ``cut`` oldest entries at most (approximate
    trimming removes whole nodes only, so perhaps fewer), ``losses`` per group that loses any
    entry it has not processed."""

    stream: str
    length: int
    maxlen: int
    cut: int
    groups: int
    losses: tuple[GroupLoss, ...]

    def to_dict(self) -> dict[str, Any]:
        """What --json prints for a length trim that was only planned."""
        return {
            "stream": self.stream,
            "length": self.length,
            "maxlen": self.maxlen,
            "cut": self.cut,
            "groups": self.groups,
            "losses": [
                {
                    "group": loss.group,
                    "undelivered": loss.undelivered,
                    "pending": loss.pending,
                    "at_least": loss.at_least,
                }
                for loss in self.losses
            ],
        }

    def describe(self) -> str:
        if self.cut == 0:
            return f"{self.stream} has {self.length} entries: nothing to trim to {self.maxlen}"
        text = (
            f"up to {entries(self.cut)} of {self.length}, the oldest, would be deleted from "
            f"{self.stream}"
        )
        if self.groups == 0:
            return text + " (it has no consumer groups)"
        if not self.losses:
            return text + "; every group has processed them"
        lost = "; ".join(str(loss) for loss in self.losses)
        return f"{text}, never to be processed: {lost}"


def _boundary(client: Client, stream: str, keep: int, low: tuple[int, int]) -> str | None:
    """The id of the oldest entry ``XTRIM MAXLEN keep`` keeps, walking back from the newest;
    None once the walk passes ``low`` (no entry of interest is cut) or the stream's start."""
    seen, start = 0, "+"
    while True:
        want = min(_PAGE, keep - seen)
        page: Any = client.xrevrange(stream, start, "-", count=want)
        if not page:
            return None
        seen += len(page)
        oldest = as_text(page[-1][0])
        if seen >= keep:
            return oldest
        if _id_key(oldest) < low or len(page) < want:
            return None
        start = "(" + oldest


def _count_between(client: Client, stream: str, after: str, before: str) -> tuple[int, bool]:
    """Entries with ``after < id < before``, counted up to ``_COUNT_LIMIT``."""
    counted, start = 0, "(" + after
    while counted < _COUNT_LIMIT:
        page: Any = client.xrange(stream, start, "(" + before, count=_PAGE)
        counted += len(page)
        if len(page) < _PAGE:
            return counted, False
        start = "(" + as_text(page[-1][0])
    return counted, True


def _pending_before(client: Client, stream: str, group: str, first: str, before: str) -> int:
    """Pending entries with ``first <= id < before``: entries below the stream's first one
    are gone already (trimmed or deleted while pending), a trim cannot take them."""
    counted, start = 0, first
    while True:
        rows: Any = client.xpending_range(stream, group, start, "(" + before, _PAGE)
        counted += len(rows)
        if len(rows) < _PAGE:
            return counted
        start = "(" + as_text(rows[-1]["message_id"])


def length_trim_plan(client: Client, stream: str, maxlen: int) -> LengthTrim:
    """What trimming ``stream`` to ``maxlen`` entries would cut, per group."""
    length = int(client.xlen(stream))
    groups = groups_of(client, stream)
    cut = max(0, length - maxlen)
    if cut == 0 or not groups:
        return LengthTrim(stream, length, maxlen, cut, len(groups), ())
    oldest_pending: dict[str, str | None] = {}
    for g in groups:
        summary: Any = client.xpending(stream, g["name"])
        oldest_pending[g["name"]] = as_text(summary["min"]) if summary["pending"] else None
    # Nothing older than every group's oldest pending and last delivered entry matters.
    low = min(
        _id_key(x)
        for g in groups
        for x in (g["last-delivered-id"], oldest_pending[g["name"]])
        if x is not None
    )
    boundary = _MAX_ID if maxlen == 0 else _boundary(client, stream, maxlen, low)
    head: Any = client.xrange(stream, "-", "+", count=1)
    if boundary is None or not head:
        return LengthTrim(stream, length, maxlen, cut, len(groups), ())
    first = as_text(head[0][0])
    losses = []
    for g in groups:
        name, last, lag = g["name"], g["last-delivered-id"], g.get("lag")
        undelivered, at_least = 0, False
        if _id_key(last) < _id_key(boundary):
            if lag is not None and lag <= length:
                # Every entry kept is after the last delivered one: undelivered too.
                undelivered = max(0, int(lag) - maxlen)
            else:
                undelivered, at_least = _count_between(client, stream, last, boundary)
        held = oldest_pending[name]
        pending = 0
        if held is not None and _id_key(held) < _id_key(boundary):
            pending = _pending_before(client, stream, name, first, boundary)
        if undelivered or pending:
            losses.append(GroupLoss(name, undelivered, pending, at_least))
    return LengthTrim(stream, length, maxlen, cut, len(groups), tuple(losses))


@main.command()
@stream_option
@click.option(
    "--safe",
    is_flag=True,
    help="Delete only the entries every consumer group has delivered and acknowledged.",
)
@click.option(
    "--maxlen",
    metavar="N",
    type=click.IntRange(min=0),
    help="Keep about the N newest entries (XTRIM MAXLEN ~ N), whoever has processed them.",
)
@click.option("--dry-run", is_flag=True, help="Say what would be deleted, delete nothing.")
@click.option("-y", "--yes", is_flag=True, help="With --maxlen: do not ask for confirmation.")
@json_option
@redis_options()
def trim(
    stream: str,
    safe: bool,
    maxlen: int | None,
    dry_run: bool,
    yes: bool,
    as_json: bool,
    url: str | None,
) -> None:
    """Delete old entries of a stream: --safe, or down to a length with --maxlen.

    --safe removes only entries that every group was delivered and acknowledged (XTRIM
    MINID at the least advanced group), never a pending or undelivered one; a stream without
    groups is left alone. It says where it cut and which group held it back.

    --maxlen N keeps about the N newest entries, whether processed or not: it first says how
    many entries it would delete and, per group, how many of them that group was never
    delivered or still holds pending, and asks (without a terminal to ask on it refuses,
    unless --yes). Approximate trimming deletes whole nodes only, so perhaps fewer.

    --json prints one object: for --safe the report (stream, trimmed, minid, length_before,
    length_after, groups, held_by, reason, dry_run, at_least); for --maxlen the plan (cut
    and, per group, losses), with "dry_run", and after a trim "trimmed" and "length_after".

    \b
    Examples:
      conveyor trim --stream orders --safe --dry-run
      conveyor trim --stream orders --safe
      conveyor trim --stream orders --maxlen 1000000 --yes
    """
    if safe == (maxlen is not None):
        raise CliError("pass either --safe or --maxlen N")
    with client_for(url) as client:
        if not client.exists(stream):
            raise CliError(f"stream {stream!r} does not exist")
        if safe:
            report = safe_trim(client, stream, dry_run=dry_run)
            if as_json:
                echo_json(dataclasses.asdict(report))
            else:
                click.echo(str(report))
            return
        assert maxlen is not None
        plan = length_trim_plan(client, stream, maxlen)
        if plan.cut == 0 or dry_run:
            if as_json:
                echo_json({**plan.to_dict(), "dry_run": dry_run, "trimmed": 0})
            else:
                click.echo(("dry run: " if dry_run and plan.cut else "") + plan.describe())
            return
        what = plan.describe()
        confirm(
            f"Trim {stream} to about {maxlen} entries? {what[0].upper()}{what[1:]}.",
            yes=yes,
            action="trim",
        )
        try:
            removed = int(client.xtrim(stream, maxlen=maxlen, approximate=True))
        except ResponseError as exc:
            raise CliError(f"XTRIM on {stream!r} failed: {exc}") from None
        left = int(client.xlen(stream))
    if as_json:
        echo_json({**plan.to_dict(), "dry_run": False, "trimmed": removed, "length_after": left})
    else:
        click.echo(f"trimmed {entries(removed)} from {stream} ({left} left)")
