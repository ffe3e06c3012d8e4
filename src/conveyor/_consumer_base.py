"""What Consumer and AsyncConsumer share: everything but the I/O.

Configuration, the sans-IO machine, building every command and reading every reply, settling
(acks, retries, dead letters), the content of heartbeats, counters and repr. The drivers in
``consumer.py`` and ``async_consumer.py`` add only their loops, so the two cannot drift.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from redis.exceptions import ResponseError

from conveyor._core import commands as cmd
from conveyor._core import policy, scripts
from conveyor._core.machine import ConsumerMachine, ReadPlan
from conveyor._keys import heartbeat_key
from conveyor.config import ConsumerConfig
from conveyor.connection import READ_MARGIN_S, describe, reader_connection
from conveyor.errors import ConfigError, ConnectionLost, ServerError
from conveyor.models import ACK, DEAD, Batch, Message, describe_error

__all__ = ["Handler", "Outage", "_ConsumerBase", "default_consumer_name", "now_ms"]

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


def now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class Outage:
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

    def _handed_out(self, messages: list[Message], deferred: bool) -> Batch:
        """The Batch for ``messages``, now in flight (their leases are renewed)."""
        ids = None
        if messages:
            with self._inflight_lock:
                if len(self.streams) == 1:
                    ids = [m.id for m in messages]
                    self._inflight[self.streams[0]].update(ids)
                else:
                    for m in messages:
                        self._inflight[m.stream].add(m.id)
        return Batch(messages, self, deferred=deferred, ids=ids)

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
            batch_ids = messages._ids or []
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
        delay = self._machine.retry_later(msg, now_ms())
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

    def _carry(self, plan: ReadPlan) -> tuple[list[cmd.Command], tuple[cmd.Command, ...]]:
        """Settling commands waiting to be sent ride at the head of the next read's pipeline:
        one round trip per batch in ``run()``. Returns them and the commands to send."""
        carry, self._unsent = self._unsent, []
        return carry, (*carry, *plan.commands) if carry else plan.commands

    def _carried(self, carry: list[cmd.Command], replies: list[Any]) -> list[Any]:
        """Account for the carried commands' replies; returns the read's own replies."""
        if not carry:
            return replies
        try:
            self._count_replies(carry, replies[: len(carry)])
        except BaseException:
            self._machine.reply_lost()  # the read's entries are re-read from our pending list
            raise
        return replies[len(carry) :]

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
                policy.heartbeat_timeout_ms(self.config.heartbeat_interval_ms),
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
