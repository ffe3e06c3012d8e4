"""``conveyor monitor``: a stream's groups and consumers, judged; live, or once with a verdict
as the exit code; and the cleanup after dead consumers."""

from __future__ import annotations

import time
from datetime import datetime

import click
from rich.console import Console, Group
from rich.text import Text

from conveyor.cli import _sigterm_as_interrupt, main, redis_options
from conveyor.cli._common import (
    client_for,
    group_info,
    groups_of,
    quiet_broken_pipe,
    status_options,
    stream_option,
)
from conveyor.models import CleanupReport, Health
from conveyor.monitor import Monitor, Snapshot

_HEALTH_STYLES = {0: "green", 1: "yellow", 2: "bold red"}


def health_line(health: Health) -> str:
    """``health: OK``, or the status and its reasons.

    >>> health_line(Health(1, "WARNING", ("consumer 'w1' is idle",)))
    "health: WARNING: consumer 'w1' is idle"
    """
    if not health.reasons:
        return f"health: {health.status}"
    return f"health: {health.status}: " + "; ".join(health.reasons)


def cleanup_lines(report: CleanupReport) -> list[str]:
    """What a cleanup did, one line per action; one line saying so when it did nothing."""
    lines = [
        f"moved {len(m.ids)} pending entries of dead consumer {m.from_consumer!r} to "
        f"{m.to_consumer!r} (group {m.group!r})"
        for m in report.moved
    ]
    lines += [f"removed consumer {name!r} of group {group!r}" for group, name in report.removed]
    lines += [
        f"left {pending} pending entries with dead consumer {name!r} of group {group!r}: no "
        "live consumer to take them (consumers reclaim them)"
        for group, name, pending in report.left_for_reclaim
    ]
    if report.dropped:
        lines.append(
            f"dropped {len(report.dropped)} pending entries that were deleted from the stream"
        )
    lines += [
        f"consumer {name!r} of group {group!r} came back to life: left alone"
        for group, name in report.revived
    ]
    return lines or [f"{report.stream}: nothing to clean up"]


@main.command()
@stream_option
@click.option("-g", "--group", metavar="GROUP", help="Only this group. Default: every group.")
@status_options
@click.option(
    "--max-lag", metavar="N", type=click.IntRange(min=0), help="A lag above N is critical."
)
@click.option(
    "-w", "--watch", is_flag=True, help="Refresh a live table until Ctrl-C (then exit 0)."
)
@click.option(
    "--interval",
    metavar="S",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the snapshot as JSON.")
@click.option("--rich", "as_rich", is_flag=True, help="Print a rich table with group figures.")
@click.option(
    "--cleanup",
    is_flag=True,
    help="Move dead consumers' pending entries to live ones and remove consumers that own "
    "nothing and are dead (or idle without heartbeats); print what was done.",
)
@redis_options()
@click.pass_context
def monitor(
    ctx: click.Context,
    stream: str,
    group: str | None,
    batch_size: int,
    idle_threshold_ms: int,
    heartbeat_ms: int | None,
    max_lag: int | None,
    watch: bool,
    interval: float,
    as_json: bool,
    as_rich: bool,
    cleanup: bool,
    url: str | None,
) -> None:
    """Show the consumers of a stream's groups and judge them.

    By default prints the grid "Consumer id | Idle time | Pending items | Status" (one per
    group when there are several) and, on stderr, the verdict with its reasons; the exit
    code is the verdict: 0 healthy, 1 warning, 2 critical. A consumer is DEAD when its
    heartbeats stopped, WARNING when idle beyond --idle-threshold-ms or holding more than
    --batch-size entries. --json prints the snapshot (stream, groups with lag, pending and
    oldest pending entry, consumers); --rich a rich table with the group figures; --watch
    refreshes until Ctrl-C. --cleanup never loses an entry: a consumer is removed only when
    it owns nothing.

    \b
    Examples:
      conveyor monitor --stream orders --group billing
      conveyor monitor -s orders --json | jq '.groups[].lag'
      conveyor monitor -s orders --watch --interval 1
      conveyor monitor -s orders -g billing --cleanup
    """
    with client_for(url) as client:
        if group is None:
            groups_of(client, stream)  # a missing stream is an error that says so
        else:
            group_info(client, stream, group)
        watcher = Monitor(
            client,
            stream,
            group,
            batch_size=batch_size,
            idle_time_ms_warning_threshold=idle_threshold_ms,
            heartbeat_ms=heartbeat_ms,
            max_lag=max_lag,
        )
        if cleanup:
            for line in cleanup_lines(watcher.cleanup()):
                click.echo(line)
            return
        if watch:
            _watch(watcher, interval, as_json=as_json, as_rich=as_rich)
            return
        snapshot = watcher.collect()
    health = snapshot.health()
    if as_json:
        click.echo(snapshot.to_json(indent=2))
    elif as_rich:
        Console(highlight=False).print(snapshot.rich_table())
    else:
        click.echo(snapshot.table())
    click.echo(health_line(health), err=True)
    ctx.exit(health.code)


def _view(snapshot: Snapshot, *, as_rich: bool) -> Group:
    health = snapshot.health()
    stamp = datetime.now().strftime("%H:%M:%S")
    body = snapshot.rich_table() if as_rich else Text(snapshot.table())
    style = _HEALTH_STYLES.get(health.code, "yellow")
    return Group(body, Text(f"{stamp} {health_line(health)}", style=style))


def _watch(watcher: Monitor, interval_s: float, *, as_json: bool, as_rich: bool) -> None:
    """Refresh until Ctrl-C or SIGTERM. On a terminal, a live display; in a pipe, one
    snapshot after the other (JSON lines with --json)."""
    from rich.live import Live

    console = Console(highlight=False)
    try:
        with _sigterm_as_interrupt(), quiet_broken_pipe():
            if as_json or not console.is_terminal:
                while True:
                    _print_once(watcher.collect(), as_json=as_json, as_rich=as_rich)
                    time.sleep(interval_s)
            with Live(
                _view(watcher.collect(), as_rich=as_rich), console=console, auto_refresh=False
            ) as live:
                while True:
                    time.sleep(interval_s)
                    live.update(_view(watcher.collect(), as_rich=as_rich), refresh=True)
    except KeyboardInterrupt:
        pass


def _print_once(snapshot: Snapshot, *, as_json: bool, as_rich: bool) -> None:
    if as_json:
        click.echo(snapshot.to_json())
        return
    stamp = datetime.now().strftime("%H:%M:%S")
    click.echo(f"-- {stamp} {health_line(snapshot.health())}")
    if as_rich:
        Console(highlight=False).print(snapshot.rich_table())
    else:
        click.echo(snapshot.table())
    click.echo()
