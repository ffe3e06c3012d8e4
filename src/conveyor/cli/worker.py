"""``conveyor run MODULE:FUNC``: a worker that hands every batch of a group to a handler, in
one process or as a supervised fleet of processes, with optional Prometheus metrics.

With ``--concurrency N`` the command becomes a supervisor: it starts N worker processes (each
``conveyor run`` with one worker, in a process group of its own so a Ctrl-C at the terminal
reaches only the supervisor), forwards SIGTERM/SIGINT to them, and stops the others when one
fails. A worker whose supervisor vanished (SIGKILL) stops by itself, warmly.

A server that is not up yet is waited for (see ``_wait``), before any worker starts; a signal
meanwhile stops the command cleanly.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import click
import redis

from conveyor import AsyncConsumer, Consumer
from conveyor.cli import CliError, cli_connect, main, redis_options, tls_options
from conveyor.cli._common import group_option, stream_option
from conveyor.cli._wait import wait_for_server

log = logging.getLogger("conveyor.cli")

#: how often a worker checks that its supervisor is still there, in seconds
_ORPHAN_CHECK_S = 0.5
#: how often the supervisor looks at its workers, in seconds
_SUPERVISE_POLL_S = 0.1


def load_handler(target: str, app_dir: str = ".") -> Callable[..., Any]:
    """The callable named by ``MODULE:FUNC`` (FUNC may be dotted: ``tasks:Handler.run``).

    ``app_dir`` goes first on ``sys.path``, so modules next to the user are found. Every
    failure is a CliError that says which part is wrong.
    """
    module_name, sep, attribute = target.partition(":")
    if not sep or not module_name or not attribute:
        raise CliError(f"{target!r} is not MODULE:FUNC (for example myapp.tasks:handle)")
    where = str(Path(app_dir).resolve())
    if where not in sys.path:
        sys.path.insert(0, where)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise CliError(
                f"cannot import module {module_name!r}: not found in {where} or on sys.path "
                "(--app-dir, PYTHONPATH)"
            ) from None
        raise CliError(f"importing module {module_name!r} failed: {exc}") from None
    except Exception as exc:
        log.debug("importing %s failed", module_name, exc_info=True)
        raise CliError(
            f"importing module {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from None
    handler: Any = module
    for part in attribute.split("."):
        if not hasattr(handler, part):
            raise CliError(f"module {module_name!r} has no attribute {attribute!r}")
        handler = getattr(handler, part)
    if not callable(handler):
        raise CliError(f"{target} is not callable: it is of type {type(handler).__name__}")
    return handler  # type: ignore[no-any-return]


def _metrics_ready() -> None:
    from conveyor.metrics import require_prometheus

    try:
        require_prometheus()
    except ImportError as exc:
        raise CliError(str(exc)) from None


def _serve_metrics(consumer: Consumer | AsyncConsumer, handler: Any, port: int, addr: str) -> Any:
    """Start the metrics server of one worker; returns (wrapped handler, server)."""
    from conveyor.metrics import WorkerMetrics, serve

    metrics = WorkerMetrics(consumer)
    try:
        server = serve(metrics.registry, port, addr)
    except OSError as exc:
        raise CliError(f"cannot serve metrics on {addr}:{port}: {exc.strerror or exc}") from None
    return metrics.wrap(handler), server


def _stop_when_orphaned(supervisor_pid: int) -> None:
    """A warm stop (SIGTERM to ourselves) once the supervisor is gone."""

    def watch() -> None:
        while os.getppid() == supervisor_pid:
            time.sleep(_ORPHAN_CHECK_S)
        log.warning("the supervisor (pid %d) is gone; stopping", supervisor_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="conveyor-orphan-check", daemon=True).start()


@main.command("run")
@click.argument("target", metavar="MODULE:FUNC")
@stream_option
@group_option
@click.option(
    "-c",
    "--consumer",
    metavar="NAME",
    help="The consumer's name; a restart under the same name gets back what it had not acked. "
    "With --concurrency N: NAME-1 ... NAME-N. Default: a new unique name per worker.",
)
@click.option(
    "--concurrency",
    metavar="N",
    type=click.IntRange(1, 256),
    default=1,
    show_default=True,
    help="Worker processes, each one consumer of the group.",
)
@click.option(
    "--batch-size",
    metavar="N",
    type=click.IntRange(1, 100_000),
    default=100,
    show_default=True,
    help="Most messages per batch.",
)
@click.option(
    "--max-wait-ms",
    metavar="MS",
    type=click.IntRange(1, 3_600_000),
    default=1000,
    show_default=True,
    help="Longest wait for a batch to fill (an idle worker blocks on the server this long).",
)
@click.option(
    "--linger-ms",
    metavar="MS",
    type=click.IntRange(0, 3_600_000),
    default=None,
    help="Once a batch has messages, how much longer it waits to fill; 0: hand it over at "
    "once (low latency). Default: until --max-wait-ms.",
)
@click.option(
    "--max-deliveries",
    metavar="N",
    type=click.IntRange(1, 1_000_000),
    default=5,
    show_default=True,
    help="Deliveries of a failing message before it is dead-lettered.",
)
@click.option(
    "--claim-idle-ms",
    metavar="MS",
    type=click.IntRange(min=1),
    default=60_000,
    show_default=True,
    help="Take over entries idle this long in other consumers.",
)
@click.option(
    "--handler-timeout-ms",
    metavar="MS",
    type=click.IntRange(min=1),
    default=None,
    help="A handler still running after this long gives its batch up: its unsettled messages "
    "go to the other consumers at once (an async handler is cancelled). Default: no limit.",
)
@click.option(
    "--no-ack",
    "no_ack",
    is_flag=True,
    help="Read with XREADGROUP NOACK: at-most-once, nothing pending, no heartbeats or reclaim; "
    "a failed message goes to the dead-letter stream at once (it cannot come back).",
)
@click.option(
    "--dead-letter",
    metavar="NAME",
    help="The dead-letter stream. Default: the stream's own, e.g. {orders}:dead for orders.",
)
@click.option(
    "--grace-period-ms",
    metavar="MS",
    type=click.IntRange(min=0),
    default=30_000,
    show_default=True,
    help="On SIGTERM/SIGINT, how long the batch in hand may take to finish.",
)
@click.option(
    "--metrics-port",
    metavar="P",
    type=click.IntRange(1, 65535),
    help="Serve the worker's Prometheus metrics at :P/metrics; with --concurrency N, worker i "
    "on port P+i-1 (P ... P+N-1). Needs: pip install 'conveyor[metrics]'.",
)
@click.option(
    "--metrics-addr",
    metavar="ADDR",
    default="0.0.0.0",
    show_default=True,
    help="Address the metrics server listens on.",
)
@click.option(
    "--app-dir",
    metavar="DIR",
    default=".",
    show_default=True,
    help="Directory put first on the module search path, to import MODULE from.",
)
@click.option("--worker-of", type=int, hidden=True)
@redis_options()
@click.pass_context
def run(ctx: click.Context, /, target: str, **options: Any) -> None:
    """Run a worker: call FUNC(batch) for every batch the group delivers, until SIGTERM/SIGINT.

    FUNC gets a conveyor Batch and settles each message with batch.ack(msg),
    batch.fail(msg, error) or batch.dead_letter(msg, reason); if it raises, the messages it did
    not settle count as failed and come back later (dead-lettered after --max-deliveries). A
    coroutine function runs on asyncio (AsyncConsumer). The group is created if missing.

    The first SIGTERM/SIGINT finishes the batch in hand (within --grace-period-ms), acks it
    and leaves; a second stops at once (unacked messages stay pending). Exit code 0 after a
    clean stop. With --concurrency N the command supervises N worker processes: signals are
    forwarded to them, and if one fails the others are stopped and the exit code is 1.

    A server that is not up yet is waited for, retrying with a backoff up to 5 s: one line
    says the wait started, one that the server answered; SIGTERM/SIGINT meanwhile exits 0.

    \b
    Metrics (--metrics-port; one port per worker process), labelled stream, group, consumer:
      conveyor_worker_messages_{processed,acked,failed,retried,reclaimed,dead_lettered}_total
      conveyor_worker_batch_duration_seconds (a histogram)

    \b
    Examples:
      conveyor run myapp.tasks:handle --stream orders --group billing
      conveyor run tasks:handle -s orders -g billing --concurrency 4 --metrics-port 9100
      conveyor run tasks:sample -s metrics -g sampler --no-ack
    """
    concurrency: int = options["concurrency"]
    _early_stop.install()
    handler = load_handler(target, options["app_dir"])
    port: int | None = options["metrics_port"]
    if port is not None:
        _metrics_ready()
        if port + concurrency - 1 > 65535:
            raise CliError(f"--metrics-port {port} leaves no room for {concurrency} workers")
    client = wait_for_server(options["url"], stopping=_early_stop.event)
    if client is None:
        log.info("stopped before the server answered")
        return
    if concurrency > 1:
        client.close()
        root = ctx.find_root().params
        ctx.exit(_supervise(target, options, root.get("verbose", 0), root.get("log_format")))
    if options["worker_of"] is not None:
        _stop_when_orphaned(options["worker_of"])
    if inspect.iscoroutinefunction(handler):
        client.close()
        asyncio.run(_run_async(target, handler, options))
    else:
        _run_sync(client, target, handler, options)


class _EarlyStop:
    """SIGTERM/SIGINT before ``run()`` has installed its own handlers (while the process is
    still importing and connecting): remembered and passed on as ``consumer.stop()``, so an
    early signal is a clean stop (exit 0), not death by the signal's default action."""

    def __init__(self) -> None:
        self.requested = False
        #: set by the signal: ends a wait for the server
        self.event = threading.Event()
        self.consumer: Consumer | AsyncConsumer | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self)

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        self.requested = True
        self.event.set()
        if self.consumer is not None:
            self.consumer.stop()

    def attach(self, consumer: Consumer | AsyncConsumer) -> None:
        self.consumer = consumer
        if self.requested:
            consumer.stop()


_early_stop = _EarlyStop()


def _consumer_options(options: dict[str, Any]) -> dict[str, Any]:
    return {
        "consumer": options["consumer"],
        "batch_size": options["batch_size"],
        "max_wait_ms": options["max_wait_ms"],
        "linger_ms": options["linger_ms"],
        "max_deliveries": options["max_deliveries"],
        "claim_idle_ms": options["claim_idle_ms"],
        "dead_letter": options["dead_letter"],
        "handler_timeout_ms": options["handler_timeout_ms"],
        "noack": options["no_ack"],
    }


def _started(consumer: Consumer | AsyncConsumer, target: str, options: dict[str, Any]) -> None:
    where = ""
    if options["metrics_port"] is not None:
        where = f", metrics at http://{options['metrics_addr']}:{options['metrics_port']}/metrics"
    log.info(
        "worker %r: group %r on %s, handler %s%s",
        consumer.name,
        consumer.group,
        options["stream"],
        target,
        where,
    )


def _stopped(consumer: Consumer | AsyncConsumer) -> None:
    log.info(
        "worker %r stopped: delivered %d, acked %d, failed %d, dead-lettered %d",
        consumer.name,
        consumer.delivered_count,
        consumer.acked_count,
        consumer.failed_count,
        consumer.dead_lettered_count,
    )


def _run_sync(
    client: redis.Redis, target: str, handler: Callable[..., Any], options: dict[str, Any]
) -> None:
    server = None
    try:
        consumer = Consumer(
            client, options["stream"], options["group"], **_consumer_options(options)
        )
        _early_stop.attach(consumer)
        if options["metrics_port"] is not None:
            handler, server = _serve_metrics(
                consumer, handler, options["metrics_port"], options["metrics_addr"]
            )
        _started(consumer, target, options)
        consumer.run(handler, grace_period_ms=options["grace_period_ms"])
        _stopped(consumer)
    finally:
        if server is not None:
            server.shutdown()
        client.close()


async def _run_async(target: str, handler: Callable[..., Any], options: dict[str, Any]) -> None:
    client = cli_connect(options["url"], asyncio=True)
    server = None
    try:
        consumer = AsyncConsumer(
            client, options["stream"], options["group"], **_consumer_options(options)
        )
        _early_stop.attach(consumer)
        if options["metrics_port"] is not None:
            handler, server = _serve_metrics(
                consumer, handler, options["metrics_port"], options["metrics_addr"]
            )
        _started(consumer, target, options)
        await consumer.run(handler, grace_period_ms=options["grace_period_ms"])
        _stopped(consumer)
    finally:
        if server is not None:
            server.shutdown()
        await client.aclose()


# -- supervisor --------------------------------------------------------------------------------


def _worker_argv(
    target: str, options: dict[str, Any], index: int, verbose: int, log_format: str | None
) -> list[str]:
    argv = [sys.executable, "-m", "conveyor", *(["-v"] * verbose)]
    if log_format:
        argv += ["--log-format", log_format]
    argv += ["run", target]
    argv += ["--stream", options["stream"], "--group", options["group"]]
    for name in ("batch_size", "max_wait_ms", "max_deliveries", "claim_idle_ms"):
        argv += [f"--{name.replace('_', '-')}", str(options[name])]
    argv += ["--grace-period-ms", str(options["grace_period_ms"])]
    argv += ["--app-dir", str(Path(options["app_dir"]).resolve())]
    if options["dead_letter"]:
        argv += ["--dead-letter", options["dead_letter"]]
    if options["handler_timeout_ms"] is not None:
        argv += ["--handler-timeout-ms", str(options["handler_timeout_ms"])]
    if options["linger_ms"] is not None:
        argv += ["--linger-ms", str(options["linger_ms"])]
    if options["no_ack"]:
        argv += ["--no-ack"]
    if options["consumer"]:
        argv += ["--consumer", f"{options['consumer']}-{index}"]
    if options["metrics_port"] is not None:
        argv += ["--metrics-port", str(options["metrics_port"] + index - 1)]
        argv += ["--metrics-addr", options["metrics_addr"]]
    return [*argv, *_tls_argv(), "--worker-of", str(os.getpid())]


def _tls_argv() -> list[str]:
    """The supervisor's --tls-* options, for its workers (files by absolute path)."""
    argv: list[str] = []
    for keyword, value in tls_options().items():
        flag = "--" + keyword.replace("_", "-")
        argv += [flag] if keyword == "tls_insecure" else [flag, os.path.abspath(value)]
    return argv


def _supervise(
    target: str, options: dict[str, Any], verbose: int, log_format: str | None = None
) -> int:
    """Start the workers, forward signals to them, wait for all; returns the exit code."""
    env = dict(os.environ)
    if options["url"]:
        env["REDIS_URL"] = options["url"]  # not in argv, where ps would show a password
    workers: list[subprocess.Popen[bytes]] = []
    signals_seen = 0
    forwarded: set[int] = set()

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal signals_seen
        signals_seen += 1
        forwarded.add(signum)
        name = signal.Signals(signum).name
        log.warning("%s received: passing it on to the workers (%s)", name, _pids(workers))
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for index in range(1, options["concurrency"] + 1):
            argv = _worker_argv(target, options, index, verbose, log_format)
            workers.append(subprocess.Popen(argv, env=env, process_group=0))
        log.info("supervising %d workers, pids %s", len(workers), _pids(workers))
        failed_first: subprocess.Popen[bytes] | None = None
        while any(worker.poll() is None for worker in workers):
            failed = [w for w in workers if w.returncode not in (None, 0)]
            if failed and failed_first is None and signals_seen == 0:
                failed_first = failed[0]
                log.warning(
                    "worker pid %d exited with code %d; stopping the others",
                    failed_first.pid,
                    failed_first.returncode,
                )
                for worker in workers:
                    if worker.poll() is None:
                        worker.send_signal(signal.SIGTERM)
            time.sleep(_SUPERVISE_POLL_S)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # A worker killed by a signal we passed on had not installed its handlers yet (it was still
    # starting: they go in before it reads anything), so it consumed nothing: a clean stop.
    bad = [w for w in workers if w.returncode != 0 and -w.returncode not in forwarded]
    if bad:
        codes = ", ".join(f"pid {w.pid} exited with code {w.returncode}" for w in bad)
        raise CliError(f"{len(bad)} of {len(workers)} workers failed: {codes}")
    log.info("all %d workers stopped cleanly", len(workers))
    return 0


def _pids(workers: list[subprocess.Popen[bytes]]) -> str:
    return ", ".join(str(w.pid) for w in workers)
