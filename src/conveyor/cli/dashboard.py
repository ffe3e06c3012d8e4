"""``conveyor dashboard``: a web page of streams, groups, consumers and dead letters, live, and
(with --allow-actions) the buttons to replay or purge dead letters and clean up dead consumers.

The server must answer and every stream (and --group) exist at the start, so a typo is one
error line, not an empty page. Later outages show on the page as a banner until the server
answers again. Uvicorn serves the page on a socket bound here (a port in use or an address
that cannot be bound is one error line); its own logs are kept to warnings.
"""

from __future__ import annotations

import logging
import socket

import click

from conveyor.cli import CliError, _sigterm_as_interrupt, main, open_client, redis_options
from conveyor.cli._common import (
    check_url,
    dead_letter_option,
    group_info,
    groups_of,
    max_lag_option,
    one_group_option,
    status_options,
    streams_option,
)
from conveyor.cli._wait import shown_url
from conveyor.connection import DEFAULT_URL, secrets_in_url

log = logging.getLogger("conveyor.cli")

#: seconds uvicorn waits for open requests (an action in progress) after Ctrl-C or SIGTERM
_GRACE_S = 5


@main.command()
@click.option(
    "-p",
    "--port",
    metavar="P",
    type=click.IntRange(1, 65535),
    default=8000,
    show_default=True,
    help="Serve the page at http://ADDR:P/.",
)
@click.option(
    "--addr",
    metavar="ADDR",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (0.0.0.0: every interface; anyone who can reach it sees the "
    "page, and with --allow-actions can use the buttons).",
)
@streams_option("A stream to show (repeatable).")
@one_group_option
@click.option(
    "--allow-actions",
    is_flag=True,
    help="Show the buttons that replay and purge dead letters and clean up dead consumers "
    "(each asks first; requests need the page's CSRF token). Default: read-only.",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    metavar="NAME",
    multiple=True,
    help="A host name the page may be reached by, besides IP addresses, localhost and this "
    "machine's name (e.g. the name of a reverse proxy; repeatable). Other names are refused: "
    "a site whose name is made to point at this address reads nothing (DNS rebinding).",
)
@click.option(
    "--interval",
    metavar="S",
    type=click.FloatRange(min=0.25),
    default=2.0,
    show_default=True,
    help="Seconds between the page's refreshes.",
)
@status_options
@max_lag_option()
@dead_letter_option
@redis_options()
def dashboard(
    port: int,
    addr: str,
    streams: tuple[str, ...],
    group: str | None,
    allow_actions: bool,
    allowed_hosts: tuple[str, ...],
    interval: float,
    batch_size: int,
    idle_threshold_ms: int,
    heartbeat_ms: int,
    max_lag: int | None,
    dead_letter: str | None,
    url: str | None,
) -> None:
    """Serve a live web dashboard of streams, their groups, consumers and dead letters, until
    Ctrl-C or SIGTERM.

    \b
    Per stream:   length, rates in and out (sparklines), the verdict and its reasons
    Per group:    lag, pending, oldest pending entry's age, verdict, rate out
    Per consumer: status (OK, WARNING, DEAD), idle time, pending, heartbeat age
    Dead letters: how many, the newest ones with their error

    The page refreshes itself every --interval seconds; while the server cannot be reached
    it says so in a banner and picks up again when the server is back. The verdicts are
    those of `conveyor monitor`, with the same thresholds. Read-only unless
    --allow-actions: then buttons replay or purge a stream's dead letters and clean up
    after dead consumers (as `conveyor monitor --cleanup`: no entry is lost). It listens on
    127.0.0.1 unless --addr says otherwise. The page's scripts and styles come from conveyor
    itself (no CDN: it works offline). Needs: pip install 'conveyor[dashboard]'.

    \b
    Examples:
      conveyor dashboard -s orders -g billing
      conveyor dashboard -p 8080 -s orders -s payments --allow-actions
    """
    from conveyor.contrib.dashboard import require_dashboard

    try:
        require_dashboard()
    except ImportError as exc:
        raise CliError(str(exc)) from None
    import uvicorn

    from conveyor.contrib.dashboard.app import create_app
    from conveyor.contrib.dashboard.board import Board

    check_url(url)
    client = open_client(url)
    try:
        for stream in dict.fromkeys(streams):
            if group is None:
                groups_of(client, stream)  # the stream exists
            else:
                group_info(client, stream, group)
        sock = _bind(addr, port)
        board = Board(
            client,
            streams,
            group,
            server=shown_url(url),
            secrets=secrets_in_url(url or DEFAULT_URL),
            dead_letter=dead_letter,
            max_age_s=min(1.0, interval / 2),  # pages in many tabs share views
            batch_size=batch_size,
            idle_time_ms_warning_threshold=idle_threshold_ms,
            heartbeat_ms=heartbeat_ms,
            max_lag=max_lag,
        )
        app = create_app(
            board,
            allow_actions=allow_actions,
            interval_s=interval,
            allowed_hosts=["localhost", socket.gethostname(), *allowed_hosts],
        )
        config = uvicorn.Config(
            app,
            log_config=None,  # the CLI configured logging
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=_GRACE_S,
        )
        # the page's own notices (actions done, the server gone and back) are the command's
        logging.getLogger("conveyor.dashboard").setLevel(
            min(logging.getLogger("conveyor").getEffectiveLevel(), logging.INFO)
        )
        shown = f"[{addr}]" if ":" in addr else addr
        mode = "actions allowed" if allow_actions else "read-only"
        log.info(
            "serving the dashboard of %s at http://%s:%d/ (%s)",
            ", ".join(dict.fromkeys(streams)),
            shown,
            port,
            mode,
        )
        try:
            with _sigterm_as_interrupt():
                uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:
            pass
        finally:
            sock.close()
        log.info("stopped")
    finally:
        client.close()


def _bind(addr: str, port: int) -> socket.socket:
    """A listening socket on ``addr:port``; one error line when it cannot be had."""
    try:
        family, kind, proto, _, where = socket.getaddrinfo(
            addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise CliError(f"cannot serve on {addr}:{port}: no such address ({exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(where)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise CliError(f"cannot serve on {addr}:{port}: {exc.strerror or exc}") from None
    return sock
