"""What the benchmarks share: the error they raise (bench._runs's), the server options, and
``main()``'s tail.

``run_main`` runs a benchmark body, turns an expected failure into one "benchmark failed: ..."
line on stderr and exit code 1, closes whatever the body opened, and with ``--json`` writes the
report to stdout (the readable report then went to stderr).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable
from typing import Any, TextIO

import redis

import conveyor
from bench._runs import BenchError
from conveyor import EmbeddedServer
from conveyor.connection import redact_url

#: the failures a benchmark reports as "benchmark failed: ..." (exit 1) rather than a traceback
FAILURES: tuple[type[BaseException], ...] = (
    BenchError,
    conveyor.ConveyorError,
    redis.RedisError,
    OSError,
)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_server_options(p: argparse.ArgumentParser) -> None:
    """``--url`` or ``--server-binary`` (at most one); neither starts embedded valkey."""
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="use this running server instead of starting one")
    where.add_argument(
        "--server-binary",
        metavar="PATH",
        help="start this server binary (e.g. /usr/bin/redis-server) instead of embedded valkey",
    )


def start_server(args: argparse.Namespace, stack: contextlib.ExitStack) -> tuple[str, str]:
    """The URL to benchmark and how the report names the server.

    With ``--url`` that server (its URL redacted in the report); otherwise an EmbeddedServer
    (``--server-binary`` or embedded valkey), closed when ``stack`` closes.
    """
    if args.url:
        return args.url, redact_url(args.url)
    server = EmbeddedServer(args.server_binary).start()
    stack.callback(server.close)
    return server.url, f"started {server.binary}"


def run_main(
    bench: Callable[[TextIO, contextlib.ExitStack], dict[str, Any]],
    *,
    json_out: bool,
    failures: tuple[type[BaseException], ...] = FAILURES,
) -> int:
    """Run ``bench(out, stack)`` and return main()'s exit code.

    ``out`` is where the readable report goes (stderr with ``--json``, else stdout); what the
    body registers on ``stack`` is closed after it returns or fails.
    """
    out = sys.stderr if json_out else sys.stdout
    stack = contextlib.ExitStack()
    try:
        report = bench(out, stack)
    except failures as exc:
        print(f"benchmark failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.close()
    if json_out:
        json.dump(report, sys.stdout, indent=2)
        print()
    return 0
