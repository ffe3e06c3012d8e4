"""``conveyor exporter``: Prometheus metrics of streams, groups and consumers over HTTP.

It serves from the start, whether the server is up or not: while the server cannot be reached
every stream has ``conveyor_up 0`` and ``conveyor_health 3``. The main thread checks the server
(PING) with a capped backoff while it is down and every few seconds while it is up, and says
once when it goes away and once when it is back.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import click
from redis.exceptions import RedisClusterException, RedisError

from conveyor._cluster import is_cluster
from conveyor._core.policy import reconnect_delay_ms
from conveyor.cli import CliError, _sigterm_as_interrupt, cli_connect, main, redis_options
from conveyor.cli._common import (
    check_url,
    dead_letter_option,
    max_lag_option,
    one_group_option,
    status_options,
    streams_option,
)
from conveyor.cli._wait import ServerWatch, as_cluster_client, is_outage

if TYPE_CHECKING:
    from conveyor.metrics import StreamMetrics

log = logging.getLogger("conveyor.cli")

#: seconds between checks of a server that answers
_CHECK_EVERY_S = 5.0


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
@streams_option("A stream to watch (repeatable).")
@one_group_option
@click.option(
    "--interval",
    metavar="S",
    type=click.FloatRange(min=0),
    default=0,
    show_default=True,
    help="Collect every S seconds and serve the latest; 0: collect at each scrape.",
)
@status_options
@max_lag_option()
@dead_letter_option
@redis_options()
def exporter(
    port: int,
    addr: str,
    streams: tuple[str, ...],
    group: str | None,
    interval: float,
    batch_size: int,
    idle_threshold_ms: int,
    heartbeat_ms: int,
    max_lag: int | None,
    dead_letter: str | None,
    url: str | None,
) -> None:
    """Serve Prometheus metrics of streams, their groups and consumers, until SIGTERM/Ctrl-C.

    \b
    Per stream:   conveyor_up (1 read, 0 not), conveyor_stream_length,
                  conveyor_dead_letter_length, conveyor_collect_duration_seconds,
                  conveyor_health: the verdict of `conveyor monitor`, its exit code:
                    0 OK, 1 WARNING, 2 CRITICAL,
                    3 UNKNOWN (server unreachable, stream missing)
    Per group:    conveyor_group_lag, conveyor_group_pending, conveyor_group_consumers,
                  conveyor_group_oldest_pending_age_seconds,
                  conveyor_group_oldest_pending_idle_seconds
    Per consumer: conveyor_consumer_idle_seconds, conveyor_consumer_pending,
                  conveyor_consumer_heartbeat_age_seconds, conveyor_consumer_status

    A stream that cannot be read (missing, server down) has conveyor_up 0, conveyor_health 3
    and no other series; the exporter keeps serving, and waits for a server that is not up
    yet. The thresholds are those of `conveyor monitor`. Needs: pip install
    'conveyor[metrics]'.

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
    check_url(url)
    client = cli_connect(url)
    metrics = StreamMetrics(
        client,
        streams,
        group,
        interval_s=interval or None,
        log_outages=False,  # the main thread says it, once per outage
        dead_letter=dead_letter,
        batch_size=batch_size,
        idle_time_ms_warning_threshold=idle_threshold_ms,
        heartbeat_ms=heartbeat_ms,
        max_lag=max_lag,
    )
    try:
        try:
            server = serve(metrics.registry, port, addr)
        except OSError as exc:
            raise CliError(f"cannot serve on {addr}:{port}: {exc.strerror or exc}") from None
        log.info("serving metrics of %s at http://%s:%d/metrics", ", ".join(streams), addr, port)
        try:
            with _sigterm_as_interrupt():
                metrics.start()
                _check_server(metrics, url, ServerWatch(url))
        except KeyboardInterrupt:
            log.info("stopped")
        finally:
            server.shutdown()
    finally:
        metrics.stop()
        metrics.client.close()
        if metrics.client is not client:
            client.close()


def _ping(client: Any) -> None:
    """PING the server; on a cluster every primary (a cluster client's PING asks one node),
    so a node that went away is said once, not only seen as its streams' conveyor_up 0."""
    if is_cluster(client):
        client.ping(target_nodes=client.PRIMARIES)
    else:
        client.ping()


def _check_server(metrics: StreamMetrics, url: str | None, watch: ServerWatch) -> None:
    """PING the server for ever: with a capped backoff while it cannot be reached, every few
    seconds while it answers. A refusal that waiting cannot fix (a wrong password) ends the
    exporter. Once it first answers, a server in cluster mode gets a cluster client, if
    connect() could not tell before."""
    attempt = 0
    asked = False
    while True:
        client = metrics.client
        try:
            _ping(client)
            if not asked:
                chosen = as_cluster_client(client, url)
                if chosen is not None:
                    asked = True
                    metrics.use_client(chosen)
        except (RedisError, RedisClusterException) as exc:
            if not is_outage(exc):
                raise watch.failed(exc) from None
            watch.lost(exc, "serving conveyor_up 0 until it answers")
            attempt += 1
            time.sleep(reconnect_delay_ms(attempt) / 1000)
            continue
        watch.back()
        attempt = 0
        time.sleep(_CHECK_EVERY_S)
