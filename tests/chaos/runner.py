"""A consumer process for the crash suite: ``Consumer.run(handler)`` until SIGTERM or SIGKILL.

    python -m tests.chaos.runner --url URL --stream S --group G --name NAME --log PATH [...]

Every message the handler sees becomes one line of the log, written and flushed when its
processing is over and before the batch is acked (so a line without an ack is a message that
will come again)::

    KIND ID DELIVERIES RECEIVED_MS DONE_MS

KIND is ``P`` (processed, acked), ``F`` (failed on purpose: the poison rule), ``E`` (a message
without fields was handed out: a violation, acked so that it does not loop). RECEIVED_MS is when
the handler got the batch, DONE_MS when it was done with it: wall clock in milliseconds,
comparable between processes of one machine.

Rules: ``--poison-mod M`` fails every message whose field ``n`` is a multiple of M; ``--slow-n N
--slow-ms T`` makes the handler spend T ms on the message whose ``n`` is N; ``--delay-ms D`` is
the time every batch takes. ``--forward STREAM`` forwards each processed message to STREAM
(``batch.forward``, fields ``src`` = its id and ``n``) instead of acking it. ``--stats PATH``
receives the consumer's counters as JSON, rewritten when they change and on exit. The process
prints ``ready NAME PID`` once the consumer exists.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import conveyor
from conveyor import Batch, Consumer, Message


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.runner")
    p.add_argument("--url", required=True)
    p.add_argument("--stream", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--log", required=True, type=Path)
    p.add_argument("--stats", type=Path, default=None)
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--max-wait-ms", type=int, default=200)
    p.add_argument("--claim-idle-ms", type=int, default=2000)
    p.add_argument("--heartbeat-ms", type=int, default=100)
    p.add_argument("--max-deliveries", type=int, default=1000)
    p.add_argument("--retry-backoff-ms", type=int, default=50)
    p.add_argument("--retry-backoff-max-ms", type=int, default=200)
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--poison-mod", type=int, default=0)
    p.add_argument("--slow-n", type=int, default=None)
    p.add_argument("--slow-ms", type=float, default=0.0)
    p.add_argument("--forward", default=None)
    return p.parse_args(argv)


def now_ms() -> int:
    return time.time_ns() // 1_000_000


class Stats:
    """The consumer's counters in a JSON file, replaced atomically when they change."""

    FIELDS = (
        "delivered_count",
        "acked_count",
        "stale_ack_count",
        "failed_count",
        "dead_lettered_count",
        "lost_count",
        "reclaimed_count",
        "retried_count",
        "deleted_count",
        "forwarded_count",
    )

    def __init__(self, path: Path | None, consumer: Consumer) -> None:
        self.path = path
        self.consumer = consumer
        self.last: tuple[Any, ...] = ()

    def snapshot(self) -> dict[str, Any]:
        data: dict[str, Any] = {f: getattr(self.consumer, f, None) for f in self.FIELDS}
        data["name"] = self.consumer.name
        data["pid"] = os.getpid()
        data["removed_consumers"] = list(self.consumer._machine.removed_consumers)
        return data

    def write(self, *, force: bool = False, **extra: Any) -> None:
        if self.path is None:
            return
        data = self.snapshot()
        key = (*(data[f] for f in self.FIELDS), len(data["removed_consumers"]))
        if key == self.last and not force:
            return
        self.last = key
        data.update(extra)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)


def make_handler(args: argparse.Namespace, log: TextIO, stats: Stats) -> Any:
    delay_s = args.delay_ms / 1000
    slow_s = args.slow_ms / 1000

    def handler(batch: Batch) -> None:
        received = now_ms()
        slow = False
        outcomes: list[tuple[Message, str, str | None]] = []
        for msg in batch:
            fields = msg.fields
            n = fields.get("n") if fields else None
            if not fields or any(v in (None, "") for v in fields.values()) or not n:
                outcomes.append((msg, "E", None))  # a violation: recorded, acked, not retried
            elif args.poison_mod and int(n) % args.poison_mod == 0:
                outcomes.append((msg, "F", f"poison n={n}"))
            else:
                slow = slow or (args.slow_n is not None and int(n) == args.slow_n)
                outcomes.append((msg, "P", None))
        if slow:
            time.sleep(slow_s)
        if delay_s:
            time.sleep(delay_s)
        done = now_ms()
        log.write("".join(f"{k} {m.id} {m.deliveries} {received} {done}\n" for m, k, _ in outcomes))
        log.flush()
        for msg, _, error in outcomes:
            if error is None and args.forward:
                batch.forward(msg, args.forward, {"src": msg.id, "n": msg.fields.get("n", "")})
            elif error is None:
                batch.ack(msg)
            else:
                batch.fail(msg, error)
        stats.write()

    return handler


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stderr,
        format=f"%(asctime)s {args.name} pid={os.getpid()} %(name)s %(levelname)s %(message)s",
    )
    client = conveyor.connect(args.url)
    consumer = Consumer(
        client,
        args.stream,
        args.group,
        consumer=args.name,
        batch_size=args.batch_size,
        max_wait_ms=args.max_wait_ms,
        claim_idle_ms=args.claim_idle_ms,
        max_deliveries=args.max_deliveries,
        heartbeat_ms=args.heartbeat_ms,
        retry_backoff_ms=args.retry_backoff_ms,
        retry_backoff_max_ms=args.retry_backoff_max_ms,
    )
    stats = Stats(args.stats, consumer)
    with args.log.open("a", encoding="utf-8") as log:
        print(f"ready {args.name} {os.getpid()}", flush=True)
        try:
            consumer.run(make_handler(args, log, stats))
        finally:
            stats.write(force=True, exited=True)
    client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
