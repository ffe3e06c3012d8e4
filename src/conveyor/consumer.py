"""Consumer and AsyncConsumer: thin drivers that execute what the sans-IO machine decides.

Both share ``_ConsumerBase`` (configuration, the machine, building and reading every command,
settling, heartbeats' content, counters, repr); each adds only its own I/O loops, so the two
cannot drift. A consumer owns one reader connection for its blocking reads; acks, heartbeats and
group management go through the client's pool, so they never wait behind a blocked read.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

from redis.exceptions import ResponseError

from conveyor import _io
from conveyor._core import commands as cmd
from conveyor._core import policy, scripts
from conveyor._core.machine import ConsumerMachine, ReadPlan
from conveyor._keys import heartbeat_key
from conveyor._shutdown import StopNow, graceful
from conveyor.config import ConsumerConfig
from conveyor.connection import READ_MARGIN_S, describe, reader_connection
from conveyor.errors import ConfigError, ConnectionLost, ServerError
from conveyor.models import ACK, DEAD, Batch, Message, describe_error

__all__ = ["AsyncConsumer", "Consumer", "default_consumer_name"]

log = logging.getLogger("conveyor.consumer")

#: server errors that mean "this server cannot serve us right now": reconnect and retry
_TRANSIENT = {"READONLY", "LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "BUSY"}
#: heartbeats hash lifetime: far beyond any timeout, so an abandoned group leaves no key behind
_HEARTBEATS_TTL_MS = 24 * 3600 * 1000

Handler = Callable[[Batch], Any]


def default_consumer_name() -> str:
    """A consumer name unique to this call: ``host-pid-random``.

    Computed per consumer instance, never at import time, so threads and forked workers never
    share a name (two processes with one name share one pending list).
    """
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def _now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class _Outage:
    """One log line when the connection is lost, one when it is back; backoff in between."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.attempts = 0
        self.since = 0.0

    def failed(self, exc: BaseException) -> float:
        """Note a failed attempt; returns how long to wait before the next, in seconds."""
        if self.attempts == 0:
            self.since = time.monotonic()
            log.warning("consumer %r: %s; reconnecting with backoff", self.name, exc)
        else:
            log.debug("consumer %r: still failing: %s", self.name, exc)
        self.attempts += 1
        return policy.reconnect_delay_ms(self.attempts) / 1000

    def over(self) -> None:
        if self.attempts:
            log.warning(
                "consumer %r: connection back after %.1f s (%d attempts)",
                self.name,
                time.monotonic() - self.since,
                self.attempts,
            )
            self.attempts = 0


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
        heartbeat_ms: int | None = None,
        retry_backoff_ms: int = 1_000,
        retry_backoff_max_ms: int = 60_000,
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
            heartbeat_ms=heartbeat_ms,
            retry_backoff_ms=retry_backoff_ms,
            retry_backoff_max_ms=retry_backoff_max_ms,
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
        # Entries handed out and not settled yet, per stream: their leases are renewed.
        self._inflight: dict[str, set[str]] = {s: set() for s in self.config.streams}
        self._inflight_lock = threading.Lock()
        # Settling commands (acks, dead letters) not confirmed by the server yet.
        self._unsent: list[cmd.Command] = []
        #: messages acknowledged by this consumer (XACK replies that removed an entry)
        self.acked_count = 0
        #: acks the server answered with 0: the entry was no longer pending for the group
        self.stale_ack_count = 0
        #: messages moved to the dead-letter stream by this consumer
        self.dead_lettered_count = 0
        #: messages failed by the handler (each retried later or dead-lettered)
        self.failed_count = 0
        #: in-flight entries another consumer took over (this one looked dead or too slow)
        self.lost_count = 0

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

    @property
    def reclaimed_count(self) -> int:
        """Entries taken over from dead or stuck consumers."""
        return self._machine.reclaimed_count

    @property
    def retried_count(self) -> int:
        """Failed messages delivered again after their backoff."""
        return self._machine.retried_count

    def stop(self) -> None:
        """Ask ``run()`` and iteration to end after the current batch.

        Safe to call from any thread or a signal handler. A read in progress ends when it has
        a batch or its ``max_wait_ms`` is over.
        """
        self._stopping = True

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} group={self.group!r} "
            f"streams={list(self.streams)!r} delivered={self.delivered_count} "
            f"acked={self.acked_count} failed={self.failed_count} "
            f"dead_lettered={self.dead_lettered_count} reclaimed={self.reclaimed_count} "
            f"deleted={self.deleted_count}>"
        )

    # -- shared helpers ------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"consumer {self.name!r} is closed")

    def _handed_out(self, messages: list[Message]) -> None:
        if messages:
            with self._inflight_lock:
                if len(self.streams) == 1:
                    self._inflight[self.streams[0]].update(m.id for m in messages)
                else:
                    for m in messages:
                        self._inflight[m.stream].add(m.id)

    def _forget(self, stream: str, ids: Iterable[str]) -> None:
        with self._inflight_lock:
            self._inflight[stream].difference_update(ids)
        if self._machine.retries_waiting:
            for msg_id in ids:
                self._machine.settled(stream, msg_id)

    def _check_message(self, msg: Any) -> Message:
        if not isinstance(msg, Message):
            raise TypeError(f"expected a Message, got {type(msg).__name__}")
        if msg.stream not in self._inflight:
            raise ConfigError(
                f"message {msg.id} is from stream {msg.stream!r}, which consumer "
                f"{self.name!r} does not read"
            )
        return msg

    def _ack_commands(self, messages: Iterable[Message]) -> list[cmd.Command]:
        if type(messages) is Batch and messages._acker is self and len(self.streams) == 1:
            # A batch this consumer read from its one stream: checked when it was made.
            batch_ids = [m.id for m in messages]
            self._forget(self.streams[0], batch_ids)
            return [cmd.xack(self.streams[0], self.group, batch_ids)] if batch_ids else []
        by_stream: dict[str, list[str]] = {}
        for msg in messages:
            self._check_message(msg)
            by_stream.setdefault(msg.stream, []).append(msg.id)
        for stream, ids in by_stream.items():
            self._forget(stream, ids)
        return [cmd.xack(s, self.group, ids) for s, ids in by_stream.items()]

    def _dead_letter_command(self, msg: Message, reason: str) -> cmd.Command:
        flat: list[Any] = []
        for key, value in msg.fields.items():
            flat.append(key)
            flat.append(value)
        return (
            "EVAL",
            scripts.DEAD_LETTER,
            2,
            msg.stream,
            self.config.dead_letter_for(msg.stream),
            self.group,
            self.name,
            msg.id,
            msg.deliveries,
            reason,
            *flat,
        )

    def _fail_commands(self, msg: Message, error: BaseException | str | None) -> list[cmd.Command]:
        """Fail one message: dead-letter it at max_deliveries, else schedule its retry."""
        self._check_message(msg)
        self.failed_count += 1
        reason = describe_error(error) or "failed"
        if policy.should_dead_letter(msg.deliveries, self.config.max_deliveries):
            self._forget(msg.stream, (msg.id,))
            return [self._dead_letter_command(msg, reason)]
        with self._inflight_lock:
            self._inflight[msg.stream].discard(msg.id)  # its idle time grows: the backoff
        delay = self._machine.retry_later(msg, _now_ms())
        log.debug("message %s of %r failed (%s); retry in %d ms", msg.id, msg.stream, reason, delay)
        return []

    def _settle_commands(self, batch: Batch, error: BaseException | None) -> list[cmd.Command]:
        """What to send once ``run()``'s handler is done with ``batch``: one XACK per stream for
        the acked, a dead-letter move for each given up on; failures are scheduled for retry.
        Messages the handler did not settle count as failed (with its exception, if it raised).
        """
        acked: dict[str, list[str]] = {}
        commands: list[cmd.Command] = []
        unsettled = describe_error(error) if error is not None else "not settled by the handler"
        for msg in batch:
            outcome = batch.outcome(msg)
            kind, reason = outcome if outcome is not None else ("fail", unsettled)
            if kind == ACK:
                acked.setdefault(msg.stream, []).append(msg.id)
            elif kind == DEAD:
                self._forget(msg.stream, (msg.id,))
                commands.append(self._dead_letter_command(msg, reason or "dead-lettered"))
            else:
                commands.extend(self._fail_commands(msg, reason))
        for stream, ids in acked.items():
            self._forget(stream, ids)
        return [cmd.xack(s, self.group, ids) for s, ids in acked.items()] + commands

    def _overdue_commands(self) -> list[cmd.Command]:
        commands = []
        for msg in self._machine.take_overdue():
            reason = (
                f"delivered {msg.deliveries} times, more than max_deliveries="
                f"{self.config.max_deliveries}, without being settled (its consumers stopped "
                "while handling it)"
            )
            log.warning("message %s of %r: %s; dead-lettering it", msg.id, msg.stream, reason)
            commands.append(self._dead_letter_command(msg, reason))
        return commands

    def _count_replies(self, commands: Sequence[cmd.Command], replies: Sequence[Any]) -> int:
        """Account for the replies of acks and dead-letter moves; returns entries acked."""
        done = 0
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, ResponseError):
                raise self._reply_error(reply, f"{command[0]} on stream {command[1]!r}")
            if command[0] == "XACK":
                done += int(reply)
                self.stale_ack_count += len(command) - 3 - int(reply)
            else:  # EVAL DEAD_LETTER: 1 moved, 0 no longer ours
                self.dead_lettered_count += int(reply)
        self.acked_count += done
        return done

    def _reply_error(self, reply: ResponseError, what: str) -> Exception:
        code = cmd.error_code(reply)
        if code in _TRANSIENT:
            return ConnectionLost(f"{what}: server at {describe(self.client)} said: {reply}")
        if code in ("MOVED", "ASK"):
            return ConfigError(
                f"{what}: the server is part of a Redis Cluster ({reply}); pass a cluster client"
            )
        return ServerError(f"{what} for group {self.group!r} failed: {reply}")

    def _setup_outcome(self, replies: Sequence[Any]) -> None:
        for stream, reply in zip(self.streams, replies, strict=True):
            if isinstance(reply, ResponseError) and cmd.error_code(reply) != "BUSYGROUP":
                raise self._reply_error(reply, f"creating group {self.group!r} on {stream!r}")
        self._ready = True

    def _read_errors(self, plan: ReadPlan, replies: Sequence[Any]) -> bool:
        """Handle error replies of a read. True: the group is gone and must be recreated."""
        for reply in replies:
            if isinstance(reply, ResponseError):
                code = cmd.error_code(reply)
                if code in ("NOGROUP", "UNBLOCKED"):  # deleted (or moved) while we read
                    return True
                raise self._reply_error(reply, f"reading {list(plan.streams)} ({plan.kind})")
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

    def _after_read_commands(self) -> list[cmd.Command]:
        return self._drop_commands() + self._overdue_commands()

    def _heartbeat_commands(self) -> list[cmd.Command]:
        with self._inflight_lock:
            inflight = {s: list(ids) for s, ids in self._inflight.items()}
        return [
            (
                "EVAL",
                scripts.HEARTBEAT,
                2,
                s,
                heartbeat_key(s, self.group),
                self.group,
                self.name,
                _HEARTBEATS_TTL_MS,
                *inflight[s],
            )
            for s in self.streams
        ]

    def _heartbeat_outcome(self, replies: Sequence[Any]) -> None:
        for stream, reply in zip(self.streams, replies, strict=True):
            if isinstance(reply, ResponseError):
                raise self._reply_error(reply, f"heartbeat on {stream!r}")
            lost = [cmd.as_text(x) for x in reply or ()]
            if lost:
                with self._inflight_lock:
                    self._inflight[stream].difference_update(lost)
                self.lost_count += len(lost)
                log.warning(
                    "consumer %r: %d in-flight entries of %r were taken over by another "
                    "consumer (this one was presumed dead); their acks will count as stale",
                    self.name,
                    len(lost),
                    stream,
                )

    def _setup_commands(self) -> list[cmd.Command]:
        return self._machine.setup_commands()

    def _leave_commands(self) -> list[cmd.Command]:
        return [
            (
                "EVAL",
                scripts.REMOVE_IF_IDLE,
                2,
                s,
                heartbeat_key(s, self.group),
                self.group,
                self.name,
            )
            for s in self.streams
        ]


class Consumer(_ConsumerBase):
    """Reads batches from one or more streams as one consumer of a group.

    Example (``r`` is a client from ``conveyor.connect()``)::

        c = Consumer(r, "orders", group="billing", batch_size=100, max_wait_ms=1000)
        for msg in c.get_batch():
            handle(msg.fields)
            c.ack(msg)

    Or let it drive: ``c.run(handler)`` calls ``handler(batch)`` until SIGTERM/SIGINT or
    ``c.stop()``. Drive one Consumer from one thread (``stop()`` works from any).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None

    def get_batch(self) -> Batch:
        """Up to ``batch_size`` messages: this consumer's own pending entries first, then
        failed ones whose retry is due, entries reclaimed from dead consumers, and new ones.

        Returns as soon as the batch is full, or when ``max_wait_ms`` has passed (possibly
        empty). The wait blocks on the server; it never spins.
        """
        return self._read_batch(deferred=False)

    def ack(self, msg: Message) -> int:
        """Acknowledge one message; returns 1, or 0 if it was no longer pending."""
        return self.ack_many((msg,))

    def ack_many(self, messages: Iterable[Message]) -> int:
        """Acknowledge many messages in one round trip (one XACK per stream, pipelined).

        Returns how many were still pending and are now acknowledged.
        """
        commands = self._ack_commands(messages)
        return self._send(commands) if commands else 0

    def fail(self, msg: Message, error: BaseException | str | None = None) -> None:
        """Processing ``msg`` failed: it comes back after a backoff, exponential in its
        deliveries; on its ``max_deliveries``-th delivery it goes to the dead-letter stream."""
        commands = self._fail_commands(msg, error)
        if commands:
            self._send(commands)

    def dead_letter(self, msg: Message, reason: BaseException | str | None = None) -> bool:
        """Move ``msg`` to the dead-letter stream now (atomically with its ack). Returns False
        if it was no longer this consumer's (acked, or taken over)."""
        self._forget(self._check_message(msg).stream, (msg.id,))
        before = self.dead_lettered_count
        self._send([self._dead_letter_command(msg, describe_error(reason) or "dead-lettered")])
        return self.dead_lettered_count > before

    def run(self, handler: Handler, *, grace_period_ms: int = 30_000) -> None:
        """Call ``handler(batch)`` for every batch until SIGTERM/SIGINT or ``stop()``.

        The handler settles messages with ``batch.ack(msg)``, ``batch.fail(msg, error)`` or
        ``batch.dead_letter(msg, reason)``; an exception fails every message it did not settle.
        The acks of a batch go out in one round trip. A lost connection is retried with
        backoff; the loop does not die. The first signal finishes the batch in hand within
        ``grace_period_ms``, acks, and leaves the group; a second stops at once (unacked
        messages stay pending). Returns after leaving the group.
        """
        outage = _Outage(self.name)
        try:
            with graceful(self.name, self.stop, grace_period_ms):
                while not self._stopping:
                    try:
                        self._flush_unsent()
                        batch = self._read_batch(deferred=True)
                        outage.over()
                    except ConnectionLost as exc:
                        self._wake.wait(outage.failed(exc))
                        continue
                    if not batch:
                        continue
                    error: BaseException | None = None
                    try:
                        handler(batch)
                    except Exception as exc:
                        error = exc
                        log.warning("handler failed on a batch of %d: %r", len(batch), exc)
                    self._unsent.extend(self._settle_commands(batch, error))
                    try:
                        self._flush_unsent()
                    except ConnectionLost as exc:
                        self._wake.wait(outage.failed(exc))
        except (StopNow, KeyboardInterrupt):
            log.warning("consumer %r stopped at once; unacked messages stay pending", self.name)
        finally:
            self.close()

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

    def stop(self) -> None:
        super().stop()
        self._wake.set()

    def close(self) -> None:
        """Stop heartbeats and leave the group: the consumer is removed if it owns no pending
        entries. Entries it still holds stay pending for a restart under the same name or for
        reclaim by the others once its heartbeat is stale."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join(5)
        try:
            if self._unsent:
                self._flush_unsent()
            if self._ready:
                _io.pool_roundtrip(self.client, self._leave_commands())
        except Exception as exc:  # leaving is best effort; nothing is lost by staying
            log.warning("consumer %r could not leave group %r: %s", self.name, self.group, exc)
        finally:
            self._reader.disconnect()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- I/O -----------------------------------------------------------------------------------

    def _send(self, commands: list[cmd.Command]) -> int:
        return self._count_replies(commands, _io.pool_roundtrip(self.client, commands))

    def _flush_unsent(self) -> None:
        if self._unsent:
            commands = self._unsent
            self._count_replies(commands, _io.pool_roundtrip(self.client, commands))
            self._unsent = []

    def _read_batch(self, *, deferred: bool) -> Batch:
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
        after = self._after_read_commands()
        if after:
            self._send(after)
        messages = m.end_batch()
        self._handed_out(messages)
        return Batch(messages, self, deferred=deferred)

    def _setup(self) -> None:
        self._setup_outcome(_io.pool_roundtrip(self.client, self._setup_commands()))
        # Alive before reading anything: nobody takes what this consumer is about to re-read.
        self._heartbeat_outcome(_io.pool_roundtrip(self.client, self._heartbeat_commands()))
        if self._heartbeat_thread is None:
            self._heartbeat_thread = threading.Thread(
                target=self._heartbeat_loop, name=f"conveyor-heartbeat-{self.name}", daemon=True
            )
            self._heartbeat_thread.start()

    def _heartbeat_loop(self) -> None:
        interval_s = self.config.heartbeat_interval_ms / 1000
        failing = False
        while not self._wake.wait(interval_s):
            try:
                commands = self._heartbeat_commands()
                self._heartbeat_outcome(_io.pool_roundtrip(self.client, commands))
                if failing:
                    log.warning("consumer %r: heartbeats resumed", self.name)
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("consumer %r: heartbeat failed: %s; retrying", self.name, exc)
                failing = True


class AsyncConsumer(_ConsumerBase):
    """Consumer's asyncio twin, with the same parameters and semantics.

    Example (``ar`` is ``conveyor.connect(asyncio=True)``)::

        async with AsyncConsumer(ar, "orders", group="billing") as c:
            async for msg in c:
                await c.ack(msg)

    Heartbeats run as a task: a handler that blocks the event loop for longer than three
    heartbeats makes the consumer look dead (run CPU-bound work in an executor).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._current: asyncio.Future[Any] | None = None

    async def get_batch(self) -> Batch:
        """See ``Consumer.get_batch``. Cancelling it loses nothing: entries the server delivered
        meanwhile are read again from this consumer's pending list."""
        return await self._read_batch(deferred=False)

    async def ack(self, msg: Message) -> int:
        """Acknowledge one message; returns 1, or 0 if it was no longer pending."""
        return await self.ack_many((msg,))

    async def ack_many(self, messages: Iterable[Message]) -> int:
        """Acknowledge many messages in one round trip (one XACK per stream, pipelined)."""
        commands = self._ack_commands(messages)
        return await self._send(commands) if commands else 0

    async def fail(self, msg: Message, error: BaseException | str | None = None) -> None:
        """See ``Consumer.fail``."""
        commands = self._fail_commands(msg, error)
        if commands:
            await self._send(commands)

    async def dead_letter(self, msg: Message, reason: BaseException | str | None = None) -> bool:
        """See ``Consumer.dead_letter``."""
        self._forget(self._check_message(msg).stream, (msg.id,))
        before = self.dead_lettered_count
        await self._send(
            [self._dead_letter_command(msg, describe_error(reason) or "dead-lettered")]
        )
        return self.dead_lettered_count > before

    async def run(
        self, handler: Callable[[Batch], Awaitable[Any] | Any], *, grace_period_ms: int = 30_000
    ) -> None:
        """See ``Consumer.run``; ``handler`` may be a coroutine function or a plain one.

        SIGTERM/SIGINT are handled through the running loop (main thread, Unix); the grace
        period cancels a handler that is still running, which fails its unsettled messages.
        """
        outage = _Outage(self.name)
        loop = asyncio.get_running_loop()
        signals = self._install_signals(loop, grace_period_ms)
        try:
            while not self._stopping:
                try:
                    await self._flush_unsent()
                    batch = await self._step(self._read_batch(deferred=True))
                    outage.over()
                except ConnectionLost as exc:
                    await self._sleep(outage.failed(exc))
                    continue
                if not batch:
                    continue
                error: BaseException | None = None
                try:
                    result = handler(batch)
                    if inspect.isawaitable(result):
                        await self._step(result)
                except StopNow:
                    raise
                except (Exception, asyncio.CancelledError) as exc:
                    if isinstance(exc, asyncio.CancelledError) and self._stop_now:
                        raise StopNow() from None
                    error = exc
                    log.warning("handler failed on a batch of %d: %r", len(batch), exc)
                self._unsent.extend(self._settle_commands(batch, error))
                try:
                    await self._flush_unsent()
                except ConnectionLost as exc:
                    await self._sleep(outage.failed(exc))
        except (StopNow, asyncio.CancelledError):
            if not self._stop_now:
                raise
            log.warning("consumer %r stopped at once; unacked messages stay pending", self.name)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            await self.close()

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
        self._stopping = True
        if self._heartbeat_task is not None:
            self._heartbeat_task.cancel()
            await asyncio.gather(self._heartbeat_task, return_exceptions=True)
        try:
            if self._unsent:
                await self._flush_unsent()
            if self._ready:
                await _io.apool_roundtrip(self.client, self._leave_commands())
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

    # -- I/O -----------------------------------------------------------------------------------

    _stop_now = False

    def _install_signals(self, loop: asyncio.AbstractEventLoop, grace_period_ms: int) -> list[int]:
        if threading.current_thread() is not threading.main_thread():
            return []
        import signal

        seen = 0

        def on_signal() -> None:
            nonlocal seen
            seen += 1
            if seen == 1:
                log.warning(
                    "%s: signal received: finishing the batch in hand (grace period %d ms); "
                    "signal again to stop at once",
                    self.name,
                    grace_period_ms,
                )
                self.stop()
                loop.call_later(grace_period_ms / 1000, self._cancel_now)
            else:
                self._cancel_now()

        installed: list[int] = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                loop.add_signal_handler(sig, on_signal)
                installed.append(sig)
            except (NotImplementedError, RuntimeError):  # not supported on this platform/loop
                pass
        return installed

    def _cancel_now(self) -> None:
        self._stop_now = True
        if self._current is not None and not self._current.done():
            self._current.cancel()

    async def _step(self, awaitable: Awaitable[Any]) -> Any:
        """Await ``awaitable`` as a cancellable step of ``run()`` (a cold stop cancels it)."""
        self._current = asyncio.ensure_future(awaitable)
        try:
            return await self._current
        finally:
            self._current = None

    async def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    async def _send(self, commands: list[cmd.Command]) -> int:
        return self._count_replies(commands, await _io.apool_roundtrip(self.client, commands))

    async def _flush_unsent(self) -> None:
        if self._unsent:
            commands = self._unsent
            self._count_replies(commands, await _io.apool_roundtrip(self.client, commands))
            self._unsent = []

    async def _read_batch(self, *, deferred: bool) -> Batch:
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
        after = self._after_read_commands()
        if after:
            await self._send(after)
        messages = m.end_batch()
        self._handed_out(messages)
        return Batch(messages, self, deferred=deferred)

    async def _setup(self) -> None:
        self._setup_outcome(await _io.apool_roundtrip(self.client, self._setup_commands()))
        self._heartbeat_outcome(await _io.apool_roundtrip(self.client, self._heartbeat_commands()))
        if self._heartbeat_task is None:
            self._heartbeat_task = asyncio.ensure_future(self._heartbeat_loop())

    async def _heartbeat_loop(self) -> None:
        interval_s = self.config.heartbeat_interval_ms / 1000
        failing = False
        while not self._closed:
            await asyncio.sleep(interval_s)
            try:
                commands = self._heartbeat_commands()
                self._heartbeat_outcome(await _io.apool_roundtrip(self.client, commands))
                if failing:
                    log.warning("consumer %r: heartbeats resumed", self.name)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("consumer %r: heartbeat failed: %s; retrying", self.name, exc)
                failing = True
