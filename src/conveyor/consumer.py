"""Consumer and AsyncConsumer: thin drivers that execute what the sans-IO machine decides.

Both share ``_ConsumerBase`` (configuration, the machine, building acks, counters, repr); each adds
only its own I/O loop, so the two cannot drift. A consumer owns one reader connection for its
blocking reads; acks and group management go through the client's pool, so an ack never waits
behind a blocked read.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

from redis.exceptions import ResponseError

from conveyor import _io
from conveyor._core import commands as cmd
from conveyor._core.machine import ConsumerMachine, ReadPlan
from conveyor._core.scripts import REMOVE_IF_IDLE
from conveyor.config import ConsumerConfig
from conveyor.connection import READ_MARGIN_S, reader_connection
from conveyor.errors import ConfigError, ServerError
from conveyor.models import Batch, Message

__all__ = ["AsyncConsumer", "Consumer", "default_consumer_name"]

log = logging.getLogger("conveyor.consumer")


def default_consumer_name() -> str:
    """A consumer name unique to this call: ``host-pid-random``.

    Computed per consumer instance, never at import time, so threads and forked workers never
    share a name (two processes with one name share one pending list).
    """
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class _ConsumerBase:
    """What Consumer and AsyncConsumer share: everything but the I/O."""

    def __init__(
        self,
        client: Any,
        stream: str | Sequence[str],
        group: str,
        *,
        consumer: str | None = None,
        batch_size: int = 100,
        max_wait_ms: int = 1000,
        start: str = "0",
        encoding: str | None = "utf-8",
        claim_idle_ms: int = 60_000,
        max_deliveries: int = 5,
        dead_letter: str | None = None,
    ) -> None:
        streams = (stream,) if isinstance(stream, str | bytes) else tuple(stream)
        if any(isinstance(s, bytes) for s in streams):
            raise ConfigError("stream names must be str, not bytes")
        self.config = ConsumerConfig(
            streams=streams,
            group=group,
            consumer=consumer if consumer is not None else default_consumer_name(),
            batch_size=batch_size,
            max_wait_ms=max_wait_ms,
            start=start,
            encoding=encoding,
            claim_idle_ms=claim_idle_ms,
            max_deliveries=max_deliveries,
            dead_letter=dead_letter,
        )
        self.client = client
        self._machine = ConsumerMachine(self.config)
        self._reader = reader_connection(
            client,
            encoding=encoding,
            read_timeout_s=max_wait_ms / 1000 + READ_MARGIN_S,
            name=self.config.consumer,
        )
        self._ready = False
        self._closed = False
        self._stopping = False
        #: messages acknowledged by this consumer (XACK replies that removed an entry)
        self.acked_count = 0
        #: acks the server answered with 0: the entry was no longer pending for the group
        self.stale_ack_count = 0

    # -- public, I/O-free ----------------------------------------------------------------------

    @property
    def name(self) -> str:
        """This consumer's name in the group."""
        return self.config.consumer

    @property
    def streams(self) -> tuple[str, ...]:
        return self.config.streams

    @property
    def group(self) -> str:
        return self.config.group

    @property
    def delivered_count(self) -> int:
        """Messages handed out by ``get_batch`` so far."""
        return self._machine.delivered_count

    @property
    def deleted_count(self) -> int:
        """Pending entries found deleted or trimmed, dropped from the pending list."""
        return self._machine.deleted_count

    def stop(self) -> None:
        """Ask iteration (``batches()``, ``for msg in c``) to end after the current batch.

        Safe to call from any thread or a signal handler.
        """
        self._stopping = True

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} group={self.group!r} "
            f"streams={list(self.streams)!r} delivered={self.delivered_count} "
            f"acked={self.acked_count} deleted={self.deleted_count}>"
        )

    # -- shared helpers ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"consumer {self.name!r} is closed")

    def _ack_commands(self, messages: Iterable[Message]) -> list[cmd.Command]:
        if type(messages) is Batch and messages._acker is self and len(self.streams) == 1:
            # A batch this consumer read from its one stream: checked when it was made.
            batch_ids = [m.id for m in messages]
            return [cmd.xack(self.streams[0], self.group, batch_ids)] if batch_ids else []
        by_stream: dict[str, list[str]] = {}
        for msg in messages:
            if not isinstance(msg, Message):
                raise TypeError(f"ack takes Message objects, got {type(msg).__name__}")
            ids = by_stream.get(msg.stream)
            if ids is None:
                if msg.stream not in self.config.streams:
                    raise ConfigError(
                        f"message {msg.id} is from stream {msg.stream!r}, which consumer "
                        f"{self.name!r} does not read"
                    )
                by_stream[msg.stream] = ids = []
            ids.append(msg.id)
        return [cmd.xack(s, self.group, ids) for s, ids in by_stream.items()]

    def _count_acks(self, commands: Sequence[cmd.Command], replies: Sequence[Any]) -> int:
        done = 0
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, ResponseError):
                raise ServerError(f"XACK on stream {command[1]!r} group {self.group!r}: {reply}")
            done += int(reply)
            self.stale_ack_count += len(command) - 3 - int(reply)
        self.acked_count += done
        return done

    def _setup_outcome(self, replies: Sequence[Any]) -> None:
        for stream, reply in zip(self.streams, replies, strict=True):
            if isinstance(reply, ResponseError) and cmd.error_code(reply) != "BUSYGROUP":
                raise ServerError(
                    f"cannot create group {self.group!r} on stream {stream!r}: {reply}"
                )
        self._ready = True

    def _read_errors(self, plan: ReadPlan, replies: Sequence[Any]) -> bool:
        """Handle error replies of a read. True: the group is gone and must be recreated."""
        for reply in replies:
            if isinstance(reply, ResponseError):
                code = cmd.error_code(reply)
                if code == "NOGROUP":
                    return True
                if code == "UNBLOCKED":  # the key was deleted or moved while we blocked
                    return True
                raise ServerError(
                    f"XREADGROUP on {list(plan.streams)} group {self.group!r} failed: {reply}"
                )
        return False

    def _warn_recreate(self) -> None:
        log.warning(
            "group %r or a stream of %s vanished (NOGROUP); recreating it at %r. Entries "
            "written before may have been lost (eviction or a restart without persistence)",
            self.group,
            list(self.streams),
            self.config.start,
        )

    def _drop_commands(self) -> list[cmd.Command]:
        drops = self._machine.take_drops()
        if not drops:
            return []
        log.warning("%d pending entries were deleted or trimmed before processing", len(drops))
        by_stream: dict[str, list[str]] = {}
        for stream, msg_id in drops:
            by_stream.setdefault(stream, []).append(msg_id)
        return [cmd.xack(s, self.group, ids) for s, ids in by_stream.items()]

    def _remove_command(self, stream: str) -> cmd.Command:
        return ("EVAL", REMOVE_IF_IDLE, 1, stream, self.group, self.name)


class Consumer(_ConsumerBase):
    """Reads batches from one or more streams as one consumer of a group.

    Example (``r`` is a client from ``conveyor.connect()``)::

        c = Consumer(r, "orders", group="billing", batch_size=100, max_wait_ms=1000)
        for msg in c.get_batch():
            handle(msg.fields)
            c.ack(msg)

    Not thread-safe: drive one Consumer from one thread (``stop()`` is the exception).
    """

    def get_batch(self) -> Batch:
        """Up to ``batch_size`` messages: this consumer's own pending entries first, then new ones.

        Returns as soon as the batch is full, or when ``max_wait_ms`` has passed (possibly
        empty). The wait blocks on the server; it never spins.
        """
        self._check_open()
        if not self._ready:
            self._setup()
        m = self._machine
        m.begin_batch(_now_ms())
        while (plan := m.next_read(_now_ms())) is not None:
            try:
                replies = _io.roundtrip(self._reader, plan.commands)
            except BaseException:
                m.reply_lost()
                raise
            if self._read_errors(plan, replies):
                self._warn_recreate()
                self._setup()
                m.group_recreated()
                continue
            m.feed(plan, replies, _now_ms())
        drops = self._drop_commands()
        if drops:
            _io.pool_roundtrip(self.client, drops)
        return Batch(m.end_batch(), self)

    def ack(self, msg: Message) -> int:
        """Acknowledge one message; returns 1, or 0 if it was no longer pending."""
        return self.ack_many((msg,))

    def ack_many(self, messages: Iterable[Message]) -> int:
        """Acknowledge many messages in one round trip (one XACK per stream, pipelined).

        Returns how many were still pending and are now acknowledged.
        """
        commands = self._ack_commands(messages)
        if not commands:
            return 0
        return self._count_acks(commands, _io.pool_roundtrip(self.client, commands))

    def batches(self) -> Iterator[Batch]:
        """Batches until ``stop()`` is called; empty ones are skipped."""
        while not self._stopping:
            batch = self.get_batch()
            if batch:
                yield batch

    def __iter__(self) -> Iterator[Message]:
        """Messages one by one until ``stop()``; acknowledging them is up to the caller."""
        for batch in self.batches():
            yield from batch

    def close(self) -> None:
        """Leave the group: the consumer is removed if it owns no pending entries.

        Entries it still holds stay pending for a restart under the same name or for reclaim.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._ready:
                _io.pool_roundtrip(self.client, [self._remove_command(s) for s in self.streams])
        except Exception as exc:  # leaving is best effort; nothing is lost by staying
            log.warning("consumer %r could not leave group %r: %s", self.name, self.group, exc)
        finally:
            self._reader.disconnect()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _setup(self) -> None:
        self._setup_outcome(_io.pool_roundtrip(self.client, self._machine.setup_commands()))


class AsyncConsumer(_ConsumerBase):
    """Consumer's asyncio twin, with the same parameters and semantics.

    >>> async with AsyncConsumer(ar, "orders", group="billing") as c:  # doctest: +SKIP
    ...     async for msg in c:
    ...         await c.ack(msg)
    """

    async def get_batch(self) -> Batch:
        """See ``Consumer.get_batch``. Cancelling it loses nothing: entries the server delivered
        meanwhile are read again from this consumer's pending list."""
        self._check_open()
        if not self._ready:
            await self._setup()
        m = self._machine
        m.begin_batch(_now_ms())
        while (plan := m.next_read(_now_ms())) is not None:
            try:
                replies = await _io.aroundtrip(self._reader, plan.commands)
            except BaseException:
                m.reply_lost()
                raise
            if self._read_errors(plan, replies):
                self._warn_recreate()
                await self._setup()
                m.group_recreated()
                continue
            m.feed(plan, replies, _now_ms())
        drops = self._drop_commands()
        if drops:
            await _io.apool_roundtrip(self.client, drops)
        return Batch(m.end_batch(), self)

    async def ack(self, msg: Message) -> int:
        """Acknowledge one message; returns 1, or 0 if it was no longer pending."""
        return await self.ack_many((msg,))

    async def ack_many(self, messages: Iterable[Message]) -> int:
        """Acknowledge many messages in one round trip (one XACK per stream, pipelined)."""
        commands = self._ack_commands(messages)
        if not commands:
            return 0
        return self._count_acks(commands, await _io.apool_roundtrip(self.client, commands))

    async def batches(self) -> AsyncIterator[Batch]:
        """Batches until ``stop()`` is called; empty ones are skipped."""
        while not self._stopping:
            batch = await self.get_batch()
            if batch:
                yield batch

    async def __aiter__(self) -> AsyncIterator[Message]:
        """Messages one by one until ``stop()``; acknowledging them is up to the caller."""
        async for batch in self.batches():
            for msg in batch:
                yield msg

    async def close(self) -> None:
        """See ``Consumer.close``."""
        if self._closed:
            return
        self._closed = True
        try:
            if self._ready:
                await _io.apool_roundtrip(
                    self.client, [self._remove_command(s) for s in self.streams]
                )
        except Exception as exc:
            log.warning("consumer %r could not leave group %r: %s", self.name, self.group, exc)
        finally:
            await self._reader.disconnect()

    async def __aenter__(self) -> AsyncConsumer:
        if not self._ready:
            await self._setup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _setup(self) -> None:
        self._setup_outcome(await _io.apool_roundtrip(self.client, self._machine.setup_commands()))
