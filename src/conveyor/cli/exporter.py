"""``conveyor exporter``: Prometheus metrics of streams, groups and consumers over HTTP."""

from __future__ import annotations

import time

import click

from conveyor.cli import CliError, _sigterm_as_interrupt, main, open_client, redis_options
from conveyor.cli._common import status_options


@main.command()
@click.option(
    "-p",
    "--port",
    metavar="P",
    type=click.IntRange(1, 65535),
    required=True,
    help="Serve the metrics at http://ADDR:P/metrics.",
)
@click.option(
    "--addr",
    metavar="ADDR",
    default="0.0.0.0",
    show_default=True,
    help="Address to listen on.",
)
@click.option(
    "-s",
    "--stream",
    "streams",
    metavar="STREAM",
    multiple=True,
    required=True,
    help="A stream to watch (repeatable).",
)
@click.option("-g", "--group", metavar="GROUP", help="Only this group. Default: every group.")
@click.option(
    "--interval",
    metavar="S",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="Collect every S seconds and serve the latest; 0: collect at each scrape.",
)
@status_options
@redis_options()
def exporter(
    port: int,
    addr: str,
    streams: tuple[str, ...],
    group: str | None,
    interval: float,
    batch_size: int,
    idle_threshold_ms: int,
    heartbeat_ms: int | None,
    url: str | None,
) -> None:
    """Serve Prometheus metrics of streams, their groups and consumers, until SIGTERM/Ctrl-C.

    \b
    Per stream:   conveyor_up, conveyor_stream_length, conveyor_dead_letter_length,
                  conveyor_health (0 healthy, 1 warning, 2 critical),
                  conveyor_collect_duration_seconds
    Per group:    conveyor_group_lag, conveyor_group_pending, conveyor_group_consumers,
                  conveyor_group_oldest_pending_age_seconds,
                  conveyor_group_oldest_pending_idle_seconds
    Per consumer: conveyor_consumer_idle_seconds, conveyor_consumer_pending,
                  conveyor_consumer_heartbeat_age_seconds, conveyor_consumer_status

    A stream that cannot be read (missing, server down) has conveyor_up 0 and no other
    series; the exporter keeps serving. Needs: pip install 'conveyor[metrics]'.

    \b
    Examples:
      conveyor exporter --port 9121 --stream orders --stream payments
      conveyor exporter -p 9121 -s orders --group billing --interval 15
    """
    from conveyor.metrics import StreamMetrics, require_prometheus, serve

    try:
        require_prometheus()
    except ImportError as exc:
        raise CliError(str(exc)) from None
    client = open_client(url)
    metrics = StreamMetrics(
        client,
        streams,
        group,
        interval_s=interval or None,
        batch_size=batch_size,
        idle_time_ms_warning_threshold=idle_threshold_ms,
        heartbeat_ms=heartbeat_ms,
    )
    try:
        metrics.start()
        try:
            server = serve(metrics.registry, port, addr)
        except OSError as exc:
            raise CliError(f"cannot serve on {addr}:{port}: {exc.strerror or exc}") from None
        click.echo(
            f"serving metrics of {', '.join(streams)} at http://{addr}:{port}/metrics", err=True
        )
        try:
            with _sigterm_as_interrupt():
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            click.echo("stopped", err=True)
        finally:
            server.shutdown()
    finally:
        metrics.stop()
        client.close()
