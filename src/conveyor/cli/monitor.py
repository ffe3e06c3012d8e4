"""``conveyor monitor``: a stream's groups and consumers, judged; once with the verdict as the
exit code (0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN), or live; and the cleanup after dead
consumers."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import click
from redis.exceptions import RedisClusterException, RedisError
from rich.console import Console, Group
from rich.text import Text

from conveyor._core import status
from conveyor._core.policy import reconnect_delay_ms
from conveyor.cli import (
    _SECRETS,
    CliError,
    _one_line,
    _sigterm_as_interrupt,
    cli_connect,
    main,
    redis_options,
    tls_failure_in,
)
from conveyor.cli._common import (
    Client,
    check_url,
    client_for,
    echo_json,
    group_info,
    groups_of,
    max_lag_option,
    one_group_option,
    quiet_broken_pipe,
    status_options,
    stream_option,
)
from conveyor.cli._wait import ServerWatch, as_cluster_client, is_outage
from conveyor.errors import ConveyorError
from conveyor.models import UNKNOWN, CleanupReport, Health
from conveyor.monitor import Monitor, Snapshot

_HEALTH_STYLES = {0: "green", 1: "yellow", 2: "bold red", 3: "magenta"}
#: what keeps a verdict from being reached: the command ends with UNKNOWN
_NO_VERDICT = (CliError, ConveyorError, RedisError, RedisClusterException, OSError)


class Unknown(CliError):
    """Nothing to judge (the server cannot be reached, the stream or group does not exist):
    one ``error:`` line, exit code 3, UNKNOWN as monitoring plugins have it."""

    exit_code = UNKNOWN


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


def cleanup_dict(report: CleanupReport) -> dict[str, Any]:
    """What a cleanup did, for --json."""
    return {
        "stream": report.stream,
        "moved": [
            {"group": m.group, "from": m.from_consumer, "to": m.to_consumer, "ids": list(m.ids)}
            for m in report.moved
        ],
        "removed": [{"group": g, "consumer": c} for g, c in report.removed],
        "left_for_reclaim": [
            {"group": g, "consumer": c, "pending": n} for g, c, n in report.left_for_reclaim
        ],
        "dropped": [{"group": g, "id": i} for g, i in report.dropped],
        "revived": [{"group": g, "consumer": c} for g, c in report.revived],
    }


def verdict_dict(snapshot: Snapshot | None, health: Health) -> dict[str, Any]:
    """The snapshot (see ``conveyor.models.SnapshotDict``) with its verdict under "health";
    without a snapshot (UNKNOWN) the verdict alone."""
    if snapshot is None:
        return {"health": health.to_dict()}
    return {**snapshot.to_dict(), "health": health.to_dict()}


@main.command()
@stream_option
@one_group_option
@status_options
@max_lag_option(
    "Default: no limit (a lag with no live consumer to read it is a warning whatever its size)."
)
@click.option(
    "-w",
    "--watch",
    is_flag=True,
    help="Refresh a live table until Ctrl-C or SIGTERM (then exit 0); while the server "
    "cannot be reached (not up yet, or gone) the verdict is UNKNOWN.",
)
@click.option(
    "--interval",
    metavar="S",
    type=click.FloatRange(min=0.1),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes with --watch.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help='Print the snapshot and its verdict ("health") as one JSON object; with --watch one '
    "per line; with --cleanup what was done.",
)
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
    heartbeat_ms: int,
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
    group when there are several) and, on stderr, the verdict with its reasons. The exit
    code is the verdict, as monitoring plugins (Nagios, Icinga) read it:

    \b
      0 OK        nothing to report
      1 WARNING   a consumer idle beyond --idle-threshold-ms or holding more than
                  --batch-size entries; the oldest pending entry older than the idle
                  threshold; entries waiting (lag) and no live consumer to read them
      2 CRITICAL  a DEAD consumer (its heartbeats stopped) owns pending entries;
                  undelivered entries were trimmed; a lag above --max-lag
      3 UNKNOWN   no verdict: the server cannot be reached, the stream or group is missing

    The thresholds default to the consumers' own defaults (batch size 100, heartbeats every
    5 s): give the values your consumers were given. --json prints the snapshot (stream,
    groups with lag, pending and oldest pending entry, consumers) with the verdict under
    "health"; --rich a rich table with the group figures; --watch refreshes until Ctrl-C.
    --cleanup never loses an entry: a consumer is removed only when it owns nothing.

    \b
    Examples:
      conveyor monitor --stream orders --group billing
      conveyor monitor -s orders --json | jq '.groups[].lag'
      conveyor monitor -s orders --watch --interval 1
      conveyor monitor -s orders -g billing --cleanup
    """

    def make(client: Client) -> Monitor:
        return Monitor(
            client,
            stream,
            group,
            batch_size=batch_size,
            idle_time_ms_warning_threshold=idle_threshold_ms,
            heartbeat_ms=heartbeat_ms,
            max_lag=max_lag,
        )

    if watch:
        _watch(url, make, interval, as_json=as_json, as_rich=as_rich)
        return
    if cleanup:
        with client_for(url) as client:
            _check_exists(client, stream, group)
            report = make(client).cleanup()
        if as_json:
            echo_json(cleanup_dict(report))
        else:
            for line in cleanup_lines(report):
                click.echo(line)
        return
    try:
        with client_for(url) as client:
            _check_exists(client, stream, group)
            snapshot = make(client).collect()
    except _NO_VERDICT as exc:
        reason = _reason(ctx, exc)
        if as_json:
            echo_json(verdict_dict(None, status.unknown(reason)))
        raise Unknown(reason) from None
    health = snapshot.health()
    with quiet_broken_pipe():
        if as_json:
            echo_json(verdict_dict(snapshot, health))
        elif as_rich:
            Console(highlight=False).print(snapshot.rich_table())
        else:
            click.echo(snapshot.table())
    click.echo(health_line(health), err=True)
    ctx.exit(health.code)


def _check_exists(client: Client, stream: str, group: str | None) -> None:
    """A missing stream or group is an error that says so (and which groups there are)."""
    if group is None:
        groups_of(client, stream)
    else:
        group_info(client, stream, group)


def _reason(ctx: click.Context, exc: BaseException) -> str:
    if isinstance(exc, click.ClickException):
        return exc.format_message()
    return _one_line(exc, ctx.meta.get(_SECRETS, set()))


def _look(watcher: Monitor, server: ServerWatch) -> tuple[Snapshot | None, Health]:
    """A snapshot and its verdict; UNKNOWN (with why) when there is nothing to judge. A
    refusal that waiting cannot fix (a wrong password or database) ends the command."""
    try:
        snapshot = watcher.collect()
    except _NO_VERDICT as exc:
        if is_outage(exc):
            server.lost(exc, "showing UNKNOWN until it answers")
        elif isinstance(exc, RedisError) or tls_failure_in(exc):
            raise server.failed(exc) from None
        return None, status.unknown(server.text(exc))
    server.back()
    return snapshot, snapshot.health()


def _view(snapshot: Snapshot | None, health: Health, *, as_rich: bool) -> Group:
    stamp = datetime.now().strftime("%H:%M:%S")
    style = _HEALTH_STYLES.get(health.code, "yellow")
    line = Text(f"{stamp} {health_line(health)}", style=style)
    if snapshot is None:
        return Group(line)
    body = snapshot.rich_table() if as_rich else Text(snapshot.table())
    return Group(body, line)


class _Pace:
    """The wait before the next refresh: the interval; while the server cannot be reached, a
    backoff that doubles from 0.1 s to 5 s when that is longer."""

    def __init__(self, interval_s: float, server: ServerWatch) -> None:
        self.interval_s, self.server, self.attempt = interval_s, server, 0

    def sleep(self) -> None:
        self.attempt = self.attempt + 1 if self.server.down else 0
        backoff_s = reconnect_delay_ms(self.attempt) / 1000 if self.attempt else 0.0
        time.sleep(max(self.interval_s, backoff_s))


def _watch(
    url: str | None,
    make: Callable[[Client], Monitor],
    interval_s: float,
    *,
    as_json: bool,
    as_rich: bool,
) -> None:
    """Refresh until Ctrl-C or SIGTERM. On a terminal, a live display; in a pipe, one
    snapshot after the other (JSON lines with --json). While the server cannot be reached
    (not up yet, or gone) the verdict is UNKNOWN, said once in the log. Once it first
    answers, a server in cluster mode gets a cluster client, if connect() could not tell."""
    from rich.live import Live

    check_url(url)
    console = Console(highlight=False)
    client = cli_connect(url)
    watcher, server = make(client), ServerWatch(url)
    pace = _Pace(interval_s, server)
    asked = False

    def look() -> tuple[Snapshot | None, Health]:
        nonlocal client, watcher, asked
        seen = _look(watcher, server)
        if asked or server.down:
            return seen
        chosen = as_cluster_client(client, url)
        if chosen is None:
            return seen  # the next look asks again
        asked = True
        if chosen is client:
            return seen
        client.close()
        client, watcher = chosen, make(chosen)
        return _look(watcher, server)

    try:
        with _sigterm_as_interrupt(), quiet_broken_pipe():
            if as_json or not console.is_terminal:
                while True:
                    _print_once(*look(), as_json=as_json, as_rich=as_rich)
                    pace.sleep()
            with Live(_view(*look(), as_rich=as_rich), console=console, auto_refresh=False) as live:
                while True:
                    pace.sleep()
                    live.update(_view(*look(), as_rich=as_rich), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        client.close()


def _print_once(snapshot: Snapshot | None, health: Health, *, as_json: bool, as_rich: bool) -> None:
    if as_json:
        echo_json(verdict_dict(snapshot, health))
        return
    stamp = datetime.now().strftime("%H:%M:%S")
    click.echo(f"-- {stamp} {health_line(health)}")
    if snapshot is None:
        click.echo()
        return
    if as_rich:
        Console(highlight=False).print(snapshot.rich_table())
    else:
        click.echo(snapshot.table())
    click.echo()
