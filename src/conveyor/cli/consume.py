"""``conveyor consume``: read a group's messages as JSON lines, and acknowledge them; with
``--no-ack`` read them with XREADGROUP NOACK (at-most-once, nothing pending); with ``--peek``
look at what the group has not been delivered yet without changing anything."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

import click

from conveyor import Consumer, Message
from conveyor._core.commands import as_text
from conveyor.cli import EXIT_INTERRUPTED, CliError, main, redis_options
from conveyor.cli._common import (
    Client,
    client_for,
    group_info,
    group_option,
    json_option,
    quiet_broken_pipe,
    stream_option,
)
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
    smaller size.
    """

    def __init__(self, client: Client, stream: str, group: str, **options: Any) -> None:
        self._args = (client, stream, group)
        self._options = options
        self.consumer = Consumer(*self._args, **options)

    def read(self, want: int | None) -> list[Message]:
        if want is not None and want < self.consumer.config.batch_size:
            self.consumer.close()
            self._options["batch_size"] = want
            self.consumer = Consumer(*self._args, **self._options)
        return list(self.consumer.get_batch())

    def ack_many(self, batch: list[Message]) -> int:
        return self.consumer.ack_many(batch)

    def close(self) -> None:
        self.consumer.close()


#: longest a single blocking XREAD of --peek waits, under the client's socket timeout
_PEEK_BLOCK_MS = 5_000


class _Peek:
    """What a group has not been delivered yet, read with XREAD after its last delivered id:
    no consumer is made, no entry becomes pending, no delivery is counted, the group does not
    move. Each message comes with ``deliveries`` 0."""

    def __init__(self, client: Client, stream: str, group: str, max_wait_ms: int) -> None:
        self.client, self.stream = client, stream
        self.after = str(group_info(client, stream, group)["last-delivered-id"])
        self.max_wait_ms = max_wait_ms

    def read(self, want: int, stop: threading.Event) -> list[Message]:
        deadline = time.monotonic() + self.max_wait_ms / 1000
        while not stop.is_set():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return []
            reply: Any = self.client.xread(
                {self.stream: self.after}, count=want, block=min(left_ms, _PEEK_BLOCK_MS)
            )
            rows = [
                Message(self.stream, as_text(entry_id), _text_fields(fields), 0)
                for _, entries in reply or ()
                for entry_id, fields in entries
            ]
            if rows:
                self.after = rows[-1].id
                return rows
        return []


def _text_fields(fields: Any) -> dict[str, str]:
    return {as_text(key): as_text(value) for key, value in fields.items()}


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
    help="Read with XREADGROUP NOACK: at-most-once. The group moves on, nothing becomes "
    "pending, nothing is acked; what is printed is gone from the group.",
)
@click.option(
    "--peek",
    is_flag=True,
    help="Only look: print what the group has not been delivered yet (after its last "
    "delivered id) without joining it; nothing becomes pending, no delivery is counted.",
)
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Keep reading when the stream is drained, until Ctrl-C or SIGTERM (then exit 0).",
)
@click.option(
    "--create",
    is_flag=True,
    help="Create the stream if it does not exist (without it, a missing stream is an error).",
)
@json_option
@redis_options()
def consume(
    stream: str,
    group: str,
    consumer: str | None,
    count: int | None,
    batch_size: int,
    max_wait_ms: int,
    no_ack: bool,
    peek: bool,
    follow: bool,
    create: bool,
    as_json: bool,
    url: str | None,
) -> None:
    """Read messages as a consumer of a group and print each as a JSON line.

    Each line has stream, id, deliveries and fields (--json changes nothing: the output is
    always JSON lines). A message is acknowledged after it is printed; when done, the
    consumer leaves the group if it holds nothing. The group is created (at the start of the
    stream) if missing; the stream only with --create. Stops after --count messages, or when
    a read comes back empty, or with --follow only on Ctrl-C/SIGTERM: the read in hand is
    printed and acknowledged first; a second signal stops at once. A summary goes to stderr.

    --no-ack reads with XREADGROUP NOACK (at-most-once): the group moves past what is
    printed, nothing becomes pending and nothing is acknowledged; a crash loses what was read
    and not printed.

    --peek only looks: it prints the entries the group has not been delivered yet, with
    deliveries 0, and changes nothing in Redis (no consumer that would linger and later look
    DEAD, no pending entry, no delivery counted towards the dead-letter limit).

    \b
    Examples:
      conveyor consume --stream orders --group billing --count 10
      conveyor consume -s orders -g audit --peek --count 5 | jq .fields
      conveyor consume -s metrics -g sampler --no-ack --follow
      conveyor consume -s orders -g billing --follow --max-wait-ms 5000
    """
    if peek and consumer:
        raise CliError(
            "--peek reads without joining the group, so --consumer does not go with it "
            "(`conveyor pending --consumer NAME` lists what a consumer holds)"
        )
    if peek and no_ack:
        raise CliError(
            "--peek and --no-ack do not go together: --peek only looks, --no-ack consumes "
            "without acknowledging"
        )
    stop = threading.Event()
    with client_for(url) as client:
        if not create and not client.exists(stream):
            raise CliError(f"stream {stream!r} does not exist (--create creates it)")
        if peek:
            peeker = _Peek(client, stream, group, max_wait_ms)
            printed, _ = _drain(
                lambda want: peeker.read(min(batch_size, want or batch_size), stop),
                stop,
                count=count,
                follow=follow,
            )
            click.echo(
                f"{printed} messages of {stream} not yet delivered to group {group!r} "
                "(only looked: nothing changed)",
                err=True,
            )
            return
        name = consumer or default_consumer_name()
        reader = _Reader(
            client,
            stream,
            group,
            consumer=name,
            batch_size=min(batch_size, count or batch_size),
            max_wait_ms=max_wait_ms,
            noack=no_ack,
        )
        try:
            printed, acked = _drain(
                reader.read,
                stop,
                count=count,
                follow=follow,
                settle=None if no_ack else reader.ack_many,
            )
        finally:
            reader.close()
    if no_ack:
        click.echo(
            f"{printed} messages from {stream} as consumer {name!r} of group {group!r}, read "
            "with NOACK (nothing pending, nothing to ack)",
            err=True,
        )
        return
    click.echo(
        f"{printed} messages from {stream} as consumer {name!r} of group {group!r}, {acked} acked",
        err=True,
    )


def _drain(
    read: Callable[[int | None], list[Message]],
    stop: threading.Event,
    *,
    count: int | None,
    follow: bool,
    settle: Callable[[list[Message]], int] | None = None,
) -> tuple[int, int]:
    """Print what ``read(want)`` returns until --count, an empty read (unless --follow) or a
    signal; ``settle`` acknowledges each batch once printed. Returns (printed, acked)."""
    printed = acked = 0
    try:
        with _stop_on_signal(stop), quiet_broken_pipe():
            while not stop.is_set() and (count is None or printed < count):
                batch = read(None if count is None else count - printed)
                if not batch:
                    if follow:
                        continue
                    break
                click.echo("\n".join(message_line(msg) for msg in batch))
                sys.stdout.flush()
                printed += len(batch)
                if settle is not None:
                    acked += settle(batch)
    except KeyboardInterrupt:
        how = f", {acked} acked" if settle is not None else " (only looked)"
        click.echo(f"interrupted: {printed} messages printed{how}", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    return printed, acked
