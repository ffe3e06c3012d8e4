"""``conveyor consume``: read a group's messages as JSON lines, and acknowledge them."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click
import redis

from conveyor import Consumer, Message
from conveyor.cli import EXIT_INTERRUPTED, main, redis_options
from conveyor.cli._common import client_for, group_option, quiet_broken_pipe, stream_option
from conveyor.consumer import default_consumer_name

log = logging.getLogger("conveyor.cli")


def message_line(msg: Message) -> str:
    """One message as a JSON object on one line.

    >>> message_line(Message("orders", "1-0", {"order_id": "42"}, 1))
    '{"stream": "orders", "id": "1-0", "deliveries": 1, "fields": {"order_id": "42"}}'
    """
    row = {"stream": msg.stream, "id": msg.id, "deliveries": msg.deliveries, "fields": msg.fields}
    return json.dumps(row)


class _Reader:
    """A Consumer whose batches never overshoot ``--count``.

    A consumer's batch size is fixed, so for a last batch smaller than it, the consumer is
    closed (after its acks it owns nothing) and opened again, under the same name, with the
    smaller size. Without acks that would re-read what was printed: then the last batch is
    cut instead, and what was cut stays pending, like everything else read with --no-ack.
    """

    def __init__(self, client: redis.Redis, stream: str, group: str, **options: Any) -> None:
        self._args = (client, stream, group)
        self._options = options
        self.consumer = Consumer(*self._args, **options)

    def read(self, want: int | None, *, acking: bool) -> list[Message]:
        size = self.consumer.config.batch_size
        if want is not None and want < size and acking:
            self.consumer.close()
            self._options["batch_size"] = want
            self.consumer = Consumer(*self._args, **self._options)
        batch = list(self.consumer.get_batch())
        if want is not None and len(batch) > want:
            log.info("%d messages beyond --count stay pending, unprinted", len(batch) - want)
            batch = batch[:want]
        return batch

    def close(self) -> None:
        self.consumer.close()


@contextmanager
def _stop_on_signal(stop: threading.Event) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the read in hand, print and ack it, stop. Second: stop at
    once (what was read and not printed stays pending)."""

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@main.command()
@stream_option
@group_option
@click.option(
    "-c",
    "--consumer",
    metavar="NAME",
    help="Read as this consumer; it first gets back what it read before and did not ack. "
    "Default: a new unique name.",
)
@click.option(
    "-n", "--count", metavar="N", type=click.IntRange(min=1), help="Stop after N messages."
)
@click.option(
    "--batch-size",
    metavar="N",
    type=click.IntRange(1, 100_000),
    default=100,
    show_default=True,
    help="Most messages one read returns.",
)
@click.option(
    "--max-wait-ms",
    metavar="MS",
    type=click.IntRange(1, 3_600_000),
    default=1000,
    show_default=True,
    help="How long one read waits for messages.",
)
@click.option(
    "--no-ack",
    is_flag=True,
    help="Do not acknowledge: the messages stay pending for this consumer (and are "
    "reclaimed by others later).",
)
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Keep reading when the stream is drained, until Ctrl-C or SIGTERM (then exit 0).",
)
@redis_options()
def consume(
    stream: str,
    group: str,
    consumer: str | None,
    count: int | None,
    batch_size: int,
    max_wait_ms: int,
    no_ack: bool,
    follow: bool,
    url: str | None,
) -> None:
    """Read messages as a consumer of a group and print each as a JSON line.

    Each line has stream, id, deliveries and fields. A message is acknowledged after it is
    printed (unless --no-ack). The group is created (at the start of the stream) if missing.
    Stops after --count messages, or when a read comes back empty, or with --follow only on
    Ctrl-C/SIGTERM: the read in hand is printed and acknowledged first; a second signal stops
    at once. A summary goes to stderr.

    \b
    Examples:
      conveyor consume --stream orders --group billing --count 10
      conveyor consume -s orders -g audit --no-ack --consumer inspector | jq .fields
      conveyor consume -s orders -g billing --follow --max-wait-ms 5000
    """
    name = consumer or default_consumer_name()
    stop = threading.Event()
    printed = acked = 0
    with client_for(url) as client:
        reader = _Reader(
            client,
            stream,
            group,
            consumer=name,
            batch_size=min(batch_size, count or batch_size),
            max_wait_ms=max_wait_ms,
        )
        try:
            with _stop_on_signal(stop), quiet_broken_pipe():
                while not stop.is_set() and (count is None or printed < count):
                    want = None if count is None else count - printed
                    batch = reader.read(want, acking=not no_ack)
                    if not batch:
                        if follow:
                            continue
                        break
                    click.echo("\n".join(message_line(msg) for msg in batch))
                    sys.stdout.flush()
                    printed += len(batch)
                    if not no_ack:
                        acked += reader.consumer.ack_many(batch)
        except KeyboardInterrupt:
            click.echo(f"interrupted: {printed} messages printed, {acked} acked", err=True)
            raise SystemExit(EXIT_INTERRUPTED) from None
        finally:
            reader.close()
    how = "left pending (--no-ack)" if no_ack else f"{acked} acked"
    click.echo(
        f"{printed} messages from {stream} as consumer {name!r} of group {group!r}, {how}",
        err=True,
    )
