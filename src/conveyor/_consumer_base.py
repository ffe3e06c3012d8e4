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
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain
from typing import Any

from conveyor import _cluster, _io
from conveyor._core import commands as cmd
from conveyor._core import policy, scripts
from conveyor._core.machine import RECLAIM, ConsumerMachine, ReadPlan
from conveyor._keys import heartbeat_key, key_slot
from conveyor._leases import Leases
from conveyor.config import ConsumerConfig, check_name
from conveyor.connection import READ_MARGIN_S, describe, reader_connection
from conveyor.errors import ConfigError, ConnectionLost, ConveyorError, PayloadError
from conveyor.models import ACK, DEAD, FORWARD, Batch, Message, describe_error

__all__ = [
    "AHEAD",
    "Ahead",
    "Handler",
    "Outage",
    "_ConsumerBase",
    "default_consumer_name",
    "now_ms",
]

log = logging.getLogger("conveyor.consumer")

#: in-flight ids renewed by one heartbeat script (its ARGV; Lua claims them in chunks)
_RENEW_CHUNK = 2_000
#: a refusal that repeats is logged again at most this often
_REPEAT_LOG_S = 60.0
#: heartbeats hash lifetime: far beyond any timeout, so an abandoned group leaves no key behind
_HEARTBEATS_TTL_MS = 24 * 3600 * 1000
#: how long past a read's block time its reply may take before the step ends without it
FAN_OUT_MARGIN_S = 0.25
#: a slot that answered TRYAGAIN or moved is left alone this long (no busy loop meanwhile)
_SLOT_PAUSE_MS = 50

Handler = Callable[[Batch], Any]

#: the keys of ``_ConsumerBase._noted`` for entries carried to the next batch, and for what
#: a read ahead delivered
_CARRIED, AHEAD = "carried", "ahead"


class Ahead:
    """``run()``'s read ahead: the next batch's first read (new entries, not blocking), sent
    with the acks waiting before the handler gets the batch in hand. Its replies are read by
    whoever comes first: the driver once the handler is done, or the heartbeat (which then
    renews what it delivered) when the handler takes long."""

    __slots__ = (
        "carry",
        "collected",
        "commands",
        "error",
        "given_back",
        "lock",
        "plan",
        "replies",
        "sent_ms",
        "task",
    )

    def __init__(
        self,
        plan: ReadPlan,
        carry: list[cmd.Command],
        commands: Sequence[Any],
        sent_ms: int,
    ) -> None:
        self.plan = plan
        self.sent_ms = sent_ms
        self.carry = carry
        self.commands = commands
        self.replies: list[Any] | None = None
        self.error: BaseException | None = None
        #: its entries were given back to the group (the handler ran past its time limit)
        self.given_back = False
        #: the driver has taken it (the heartbeat leaves it alone from then on)
        self.collected = False
        self.lock = threading.Lock()
        self.task: Any = None  # asyncio: the task reading the replies


def _ids_by_stream(messages: Iterable[Message]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for msg in messages:
        out.setdefault(msg.stream, []).append(msg.id)
    return out


def _slot_moving(reply: Any) -> bool:
    """A cluster's answer that the command did not run because its slot is moving."""
    return isinstance(reply, Exception) and cmd.error_code(reply) in _SLOT_MOVING


_SLOT_MOVING = frozenset({"TRYAGAIN", "CLUSTERDOWN", "MOVED", "ASK"})


def default_consumer_name() -> str:
    """A consumer name unique to this call: ``host-pid-random``.

    Computed per consumer instance, never at import time, so threads and forked workers never
    share a name (two processes with one name share one pending list).
    """
    host = socket.gethostname().split(".")[0] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def _raw(value: Any, encoding: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode(encoding, "surrogateescape")
    return str(value).encode()


def now_ms() -> int:
    return time.monotonic_ns() // 1_000_000


class Outage:
    """One log line when reading fails, one when it works again; backoff in between.

    A lost connection or a server that cannot serve right now (READONLY, LOADING, ...) is a
    WARNING; any other failure an ERROR (with its traceback when it is not a ConveyorError).
    A failure that lasts is logged again once a minute.
    """

    def __init__(self, name: str, kind: str = "consumer") -> None:
        self.name = name
        self.kind = kind
        self.attempts = 0
        self.since = 0.0
        self._logged = 0.0

    def failed(self, exc: BaseException) -> float:
        """Note a failed attempt; returns how long to wait before the next, in seconds."""
        now = time.monotonic()
        if self.attempts == 0:
            self.since = self._logged = now
            if isinstance(exc, ConnectionLost):
                log.warning("%s %r: %s; reconnecting with backoff", self.kind, self.name, exc)
            else:
                log.error(
                    "%s %r: %s; retrying with backoff",
                    self.kind,
                    self.name,
                    exc,
                    exc_info=None if isinstance(exc, ConveyorError) else exc,
                )
        elif now - self._logged >= _REPEAT_LOG_S:
            self._logged = now
            log.warning(
                "%s %r: still failing after %.0f s (%d attempts): %s",
                self.kind,
                self.name,
                now - self.since,
                self.attempts,
                exc,
            )
        else:
            log.debug("%s %r: still failing: %s", self.kind, self.name, exc)
        self.attempts += 1
        return policy.reconnect_delay_ms(self.attempts) / 1000

    def over(self) -> None:
        if self.attempts:
            log.warning(
                "%s %r: working again after %.1f s (%d attempts)",
                self.kind,
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
        linger_ms: int | None = None,
        start: str = "0",
        encoding: str | None = "utf-8",
        claim_idle_ms: int = 60_000,
        max_deliveries: int = 5,
        dead_letter: str | None = None,
        heartbeat_ms: int | None = None,
        retry_backoff_ms: int = 1_000,
        retry_backoff_max_ms: int = 60_000,
        handler_timeout_ms: int | None = None,
        max_message_bytes: int | None = None,
        noack: bool = False,
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
            linger_ms=linger_ms,
            start=start,
            encoding=encoding,
            claim_idle_ms=claim_idle_ms,
            max_deliveries=max_deliveries,
            dead_letter=dead_letter,
            heartbeat_ms=heartbeat_ms,
            retry_backoff_ms=retry_backoff_ms,
            retry_backoff_max_ms=retry_backoff_max_ms,
            handler_timeout_ms=handler_timeout_ms,
            noack=noack,
            max_message_bytes=max_message_bytes,
        )
        self._noack = noack
        self.client = client
        self._machine = ConsumerMachine(self.config)
        self._cluster = _cluster.is_cluster(client)
        if self._cluster:
            self._check_slots()
            self._reader: Any = None
        else:
            self._reader = self._new_reader()
        # On a cluster: the connections of this consumer per node (non-blocking steps) and
        # per (node, slot) (blocking reads), the reads in flight, slots being migrated (ASK:
        # read from the target after ASKING) and slots to leave alone for a moment.
        self._controls: dict[str, Any] = {}
        self._readers: dict[tuple[str, int], Any] = {}
        self._asking: dict[int, Any] = {}
        self._paused: dict[int, int] = {}
        self._retired: list[Any] = []
        self._ready = False
        self._closed = False
        self._stopping = False
        # Entries handed out and not settled yet: their leases are renewed.
        self._leases = Leases(self.config.streams)
        # Entries delivered but not handed out yet, renewed too: what a read that finished
        # in its thread or task delivered (by unit), and what waits for the next batch.
        self._noted: dict[Any, list[tuple[str, list[str]]]] = {}
        # Settling commands (acks, dead letters) not confirmed by the server yet.
        self._unsent: list[cmd.Command] = []
        # When each kind of refusal that is retried was last logged (time.monotonic()).
        self._refusals: dict[str, float] = {}
        #: messages acknowledged by this consumer (XACK replies that removed an entry)
        self.acked_count = 0
        #: acks the server answered with 0: the entry was no longer pending for the group
        self.stale_ack_count = 0
        #: messages moved to the dead-letter stream by this consumer
        self.dead_lettered_count = 0
        #: messages forwarded (acked, their outputs added) by this consumer; also in acked_count
        self.forwarded_count = 0
        # (target, stream) pairs of forwards checked already (name, and slot on a cluster)
        self._targets: set[tuple[str, str]] = set()
        #: messages failed by the handler (each retried later or dead-lettered)
        self.failed_count = 0
        #: in-flight entries another consumer took over (this one looked dead or too slow)
        self.lost_count = 0
        #: batches whose handler ran past handler_timeout_ms
        self.timed_out_count = 0
        # The batch run() is handling and when it was handed over (now_ms()); the batch
        # given up because its handler ran past handler_timeout_ms.
        self._handling: tuple[Batch, int] | None = None
        self._given_up: Batch | None = None

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

    def _new_reader(self, node: Any = None) -> Any:
        return reader_connection(
            self.client,
            encoding=self.config.encoding,
            read_timeout_s=self.config.max_wait_ms / 1000 + READ_MARGIN_S,
            name=self.config.consumer,
            node=node,
        )

    # -- Redis Cluster -------------------------------------------------------------------------

    def _check_slots(self) -> None:
        """On a cluster a dead-letter move is atomic only inside one hash slot."""
        for s in self.streams:
            dead = self.config.dead_letter_for(s)
            if key_slot(dead) != key_slot(s):
                raise ConfigError(
                    f"dead-letter stream {dead!r} is in hash slot {key_slot(dead)} and stream "
                    f"{s!r} in slot {key_slot(s)}: on a Redis Cluster the move must be atomic, "
                    "so both need one slot; give the dead-letter stream the stream's hash tag, "
                    f"e.g. {'{' + s + '}'}:dead, or leave dead_letter unset"
                )

    def _control(self, node: Any) -> Any:
        """This consumer's connection to ``node`` for non-blocking steps (decoding as asked)."""
        name = _cluster.node_name(node)
        conn = self._controls.get(name)
        if conn is None:
            conn = self._controls[name] = self._new_reader(node)
        return conn

    def _units(self) -> dict[tuple[str, int], tuple[Any, tuple[str, ...]]]:
        """The streams by (node, slot): what one blocking XREADGROUP can read together. A
        slot being migrated is read on its target (after ASKING) once it sent us there."""
        units: dict[tuple[str, int], tuple[Any, tuple[str, ...]]] = {}
        for s in self.streams:
            slot = key_slot(s)
            node = self._asking.get(slot) or _cluster.node_for_key(self.client, s)
            key = (_cluster.node_name(node), slot)
            units[key] = (node, (*units[key][1], s) if key in units else (s,))
        return units

    def _plan_units(self) -> None:
        if self._cluster:
            units = self._units()
            self._machine.set_units([streams for _, streams in units.values()])
            self._unit_by_stream = {
                s: (key, node, key[1] in self._asking)
                for key, (node, streams) in units.items()
                for s in streams
            }

    _unit_by_stream: dict[str, tuple[tuple[str, int], Any, bool]] = {}  # noqa: RUF012
    #: on a cluster, the blocking reads in flight by (node, slot): (future or task, node)
    _reads: dict[tuple[str, int], tuple[Any, Any]]

    def _unit_of(self, command: cmd.Command) -> tuple[tuple[str, int], Any, bool]:
        """The unit key, node and whether ASKING goes first, for one XREADGROUP."""
        stream = command[command.index("STREAMS") + 1]
        known = self._unit_by_stream.get(stream)
        if known is not None:
            return known
        slot = key_slot(stream)
        asking = self._asking.get(slot)
        node = asking or _cluster.node_for_key(self.client, stream)
        return (_cluster.node_name(node), slot), node, asking is not None

    def _unit_reader(self, key: tuple[str, int], node: Any) -> Any:
        conn = self._readers.get(key)
        if conn is None:
            conn = self._readers[key] = self._new_reader(node)
        return conn

    def _read_reply(self, key: tuple[str, int], node: Any, reply: Any, now: int) -> Any:
        """A cluster read's reply, or None when the slot moved (the read delivered nothing):
        MOVED and UNBLOCKED re-read the slot map (the caller does), ASK reads from the target
        next, TRYAGAIN and CLUSTERDOWN leave the slot alone for a moment. Other errors stay."""
        if not isinstance(reply, Exception):
            return reply
        slot = key[1]
        code = cmd.error_code(reply)
        if code == "ASK":
            target = self.client.nodes_manager.get_node(reply.host, reply.port)  # type: ignore[attr-defined]
            if target is not None:
                self._asking[slot] = target
                return None
            code = "MOVED"
        if code in ("MOVED", "UNBLOCKED"):
            self._asking.pop(slot, None)
            self._stale_map = True
            self._paused[slot] = now + _SLOT_PAUSE_MS
            return None
        if code in ("TRYAGAIN", "CLUSTERDOWN"):
            self._paused[slot] = now + _SLOT_PAUSE_MS
            return None
        return reply

    _stale_map = False

    def _map_refreshed(self) -> None:
        """The slot map was read again: forget redirects the map now agrees with."""
        self._stale_map = False
        for slot, target in list(self._asking.items()):
            owner = self.client.nodes_manager.get_node_from_slot(slot)
            if _cluster.node_name(owner) == _cluster.node_name(target):
                del self._asking[slot]
        self._plan_units()

    def _sendable(self, plan: ReadPlan, inflight: Any, now: int) -> list[tuple[Any, ...]]:
        """The reads of a cluster plan to start now: ``(key, node, commands, asking)`` for each
        unit with no read in flight and not paused."""
        out = []
        for command in plan.commands:
            key, node, asking = self._unit_of(command)
            if key in inflight or self._paused.get(key[1], 0) > now:
                continue
            self._paused.pop(key[1], None)
            commands = (("ASKING",), command) if asking else (command,)
            out.append((key, node, commands, asking))
        return out

    def _pause_ms(self, now: int) -> int:
        """How long until a paused slot may be read again (0: none is paused)."""
        return max((at - now for at in self._paused.values()), default=0)

    def _collected(self, finished: Sequence[tuple[Any, Any, Any]]) -> list[Any]:
        """The replies of cluster reads that finished: ``(key, node, outcome)`` with the
        round trip's replies or its exception. A lost connection retires that reader and is
        raised once the others are counted (the caller then re-reads its own pending list)."""
        replies: list[Any] = []
        error: BaseException | None = None
        for key, node, outcome in finished:
            if isinstance(outcome, BaseException):
                reader = self._readers.pop(key, None)
                if reader is not None:
                    self._retired.append(reader)
                error = error or outcome
                continue
            reply = self._read_reply(key, node, outcome[-1], now_ms())
            if reply is not None:
                replies.append(reply)
        if error is not None:
            raise error
        return replies

    def _note_delivered(self, key: Any, replies: Sequence[Any]) -> None:
        """A read in flight finished (in its thread or task, or read by the heartbeat): the
        entries it delivered are renewed from now on, also while they wait for the next batch
        behind a slow handler, until the driver collects the read."""
        reply = replies[-1] if replies else None
        if reply is None or isinstance(reply, Exception):
            return
        m = self._machine
        noted = []
        for item in reply.items() if isinstance(reply, dict) else reply:
            if item[1]:
                ids = [cmd.as_text(entry[0]) for entry in item[1] if entry[1]]
                noted.append((m.stream_of(item[0]), ids))
        self._noted[key] = noted

    def _finished_reads(self, reads: dict[tuple[str, int], tuple[Any, Any]]) -> list[Any]:
        """Take the reads of ``reads`` that are done (thread futures or asyncio tasks, which
        answer the same questions) and return their replies (``_collected``)."""
        finished = []
        for key, (future, node) in list(reads.items()):
            if future.done():
                del reads[key]
                self._noted.pop(key, None)  # handed out or carried next: held from there
                exc = future.exception()
                finished.append((key, node, exc if exc is not None else future.result()))
        return self._collected(finished)

    def _delivered(self, future: Any) -> None:
        """Done-callback of a read in flight (thread future or asyncio task)."""
        if future.cancelled() or future.exception() is not None:
            return
        for key, (current, _node) in list(self._reads.items()):
            if current is future:  # not collected yet (once collected, the batch holds it)
                self._note_delivered(key, future.result())

    def _unhandled(self, reads: dict[tuple[str, int], tuple[Any, Any]]) -> list[Message]:
        """Closing: the carried entries and what the reads that finished delivered; the reads
        still blocked are cancelled where that is possible (tasks)."""
        messages = list(self._machine.carried)
        for future, _node in reads.values():
            if future.done() and not future.cancelled() and future.exception() is None:
                reply = future.result()[-1]
                if not isinstance(reply, Exception):
                    messages.extend(self._machine.new_messages(reply))
            else:
                future.cancel()
        return messages

    def _retire_readers(self) -> list[Any]:
        """Readers whose reads are abandoned (a reply was lost elsewhere: the own pending
        list is read again, so what they still deliver must not be handed out twice)."""
        retired = list(self._readers.values()) + self._retired
        self._readers = {}
        self._retired = []
        return retired

    def _give_back_commands(self, messages: Sequence[Message]) -> list[cmd.Command]:
        """Entries delivered to this consumer that no handler will see (it is closing): made
        idle at once, so the other consumers' reclaim takes them now, with the delivery no
        handler saw taken back from their count."""
        by_stream: dict[str, list[str | int]] = {}
        for msg in messages:
            by_stream.setdefault(msg.stream, []).extend((msg.id, max(msg.deliveries - 1, 0)))
        idle = self.config.claim_idle_ms
        return [
            ("EVAL", scripts.GIVE_BACK, 1, s, self.group, self.name, idle, *pairs)
            for s, pairs in by_stream.items()
        ]

    _ahead: Ahead | None = None
    #: on a cluster: when the next batch began, its reads of new entries started ahead
    _ahead_ms: int | None = None
    #: run() was stopped at once (second signal): what is unacked stays pending as it is
    _stop_now = False

    def _began_ms(self, ahead: Ahead | None) -> int:
        """When the batch ``_read_batch`` is about to fill began: when its read ahead went
        out, or now."""
        began, self._ahead_ms = self._ahead_ms, None
        if ahead is not None:
            return ahead.sent_ms
        return began if began is not None else now_ms()

    def _next_ahead(self) -> ReadPlan | None:
        """``run()``: the next batch's first read, to send now, when it can go (see
        ``ConsumerMachine.read_ahead``) and none is out yet. On a cluster its reads (one per
        (node, slot), in threads or tasks) are started here and None returned: the batch's
        first step collects them, and the acks go out with that step."""
        if self._stopping or not self._ready:
            return None
        if not self._cluster:
            return None if self._ahead is not None else self._machine.read_ahead(now_ms())
        if self._ahead_ms is None:
            now = now_ms()
            plan = self._machine.read_ahead(now)
            if plan is not None:
                self._ahead_ms = now
                self._start_reads(plan, now)
        return None

    def _start_reads(self, plan: ReadPlan, now: int) -> None:
        raise NotImplementedError  # the drivers' own: threads or tasks

    def _ahead_replies(self, ahead: Ahead) -> list[Any]:
        """The replies of a read ahead, collected: raised if it failed (its settling commands
        go out again with the next read); its read delivered nothing if its entries were given
        back meanwhile."""
        self._noted.pop(AHEAD, None)  # handed out from here on (held by the batch)
        if ahead.error is not None:
            self._unsent[:0] = ahead.carry
            raise ahead.error
        assert ahead.replies is not None
        if ahead.given_back:
            return [*ahead.replies[:-1], None]
        return ahead.replies

    def _ahead_closed(self, ahead: Ahead) -> list[cmd.Command]:
        """Closing with a read ahead whose replies are in (or that failed): its acks counted
        (or sent again with what is left to send); the commands that give back what it
        delivered."""
        if ahead.error is not None:
            self._unsent[:0] = ahead.carry
            return []
        assert ahead.replies is not None
        self._carried(ahead.carry, ahead.replies)
        messages = self._ahead_messages(ahead)
        return self._give_back_commands(messages) if messages else []

    def _ahead_messages(self, ahead: Ahead) -> list[Message]:
        """What a read ahead delivered (its replies are in)."""
        assert ahead.replies is not None
        reply = ahead.replies[-1]
        if ahead.given_back or isinstance(reply, Exception):
            return []
        return self._machine.new_messages(reply)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"consumer {self.name!r} is closed")

    def _handed_out(self, messages: list[Message], deferred: bool) -> Batch:
        """The Batch for ``messages``, now in flight (their leases are renewed, as are those of
        entries carried to the next batch)."""
        ids = None
        carried = self._machine.carried
        if carried:
            self._noted[_CARRIED] = list(_ids_by_stream(carried).items())
        elif self._noted:
            self._noted.pop(_CARRIED, None)
        if messages:
            if len(self.streams) == 1:
                ids = [m.id for m in messages]
                if not self._noack:  # read with NOACK: nothing pending, nothing to renew
                    self._leases.hold(self.streams[0], ids)
            elif not self._noack:
                for stream, stream_ids in _ids_by_stream(messages).items():
                    self._leases.hold(stream, stream_ids)
        return Batch(messages, self, deferred=deferred, ids=ids)

    def _forget(self, stream: str, ids: Iterable[str]) -> None:
        """Stop renewing ``ids`` (settled, or no longer ours); with the list a batch was held
        by (``Batch._ids``), in one step."""
        if type(ids) is list:
            self._leases.release(stream, ids)
        else:
            ids = tuple(ids)
            self._leases.forget(stream, ids)
        if self._machine.retries_waiting:
            for msg_id in ids:
                self._machine.settled(stream, msg_id)

    def _check_message(self, msg: Any) -> Message:
        if not isinstance(msg, Message):
            raise TypeError(f"expected a Message, got {type(msg).__name__}")
        if msg.stream not in self._leases:
            raise ConfigError(
                f"message {msg.id} is from stream {msg.stream!r}, which consumer "
                f"{self.name!r} does not read"
            )
        return msg

    def _ack_commands(self, messages: Iterable[Message]) -> list[cmd.Command]:
        if self._noack:  # nothing is pending: the ack is only counted
            for msg in messages:
                self._check_message(msg)
                self.acked_count += 1
            return []
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
        """The atomic move of ``msg`` to its dead-letter stream, byte for byte: values the
        reader decoded with ``surrogateescape`` go back as the bytes they came from; an entry
        with more fields than one Lua call takes travels packed into one field."""
        encoding = self.config.encoding or "utf-8"
        flat: list[bytes] = []
        for key, value in msg.fields.items():
            flat.append(_raw(key, encoding))
            flat.append(_raw(value, encoding))
        if len(flat) > 2 * cmd.MAX_INLINE_FIELDS:
            flat = [cmd.PACKED_FIELDS.encode(), cmd.pack_fields(flat)]
        return (
            "EVAL",
            scripts.DEAD_LETTER_UNHELD if self._noack else scripts.DEAD_LETTER,
            2,
            msg.stream,
            self.config.dead_letter_for(msg.stream),
            self.group,
            self.name,
            msg.id,
            msg.deliveries,
            reason.encode("utf-8", "backslashreplace"),
            *flat,
        )

    def _outputs(
        self, msg: Message, stream: Any, fields: Mapping[Any, Any] | None
    ) -> list[tuple[str, list[Any]]]:
        """A forward's outputs, checked: ``(target stream, field/value list)`` pairs."""
        if (
            type(stream) is str  # the hot path: plain fields to a target seen before, from a
            and type(msg) is Message  # stream checked then (a noack consumer has no targets)
            and type(fields) is dict
            and (stream, msg.stream) in self._targets
            and len(fields) <= cmd.MAX_INLINE_FIELDS
            and cmd.plain_fields(fields)
        ):
            return [(stream, list(chain.from_iterable(fields.items())))]
        self._check_message(msg)
        if self._noack:
            raise ConfigError(
                f"consumer {self.name!r} reads with noack: nothing is pending, so forward has "
                "nothing to acknowledge; send to the next stream with a Producer"
            )
        if isinstance(stream, str):
            if fields is None:
                raise ConfigError(f"forward of {msg.id} to {stream!r} needs fields")
            pairs: list[Any] = [(stream, fields)]
        else:
            if fields is not None or not isinstance(stream, Sequence | Iterable):
                raise ConfigError(
                    "forward takes a stream and its fields, or a list of (stream, fields) pairs"
                )
            pairs = list(stream)
            if not pairs:
                raise ConfigError(f"forward of {msg.id}: the list of (stream, fields) is empty")
        outputs: list[tuple[str, list[Any]]] = []
        for pair in pairs:
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise ConfigError(f"forward of {msg.id}: {pair!r} is not a (stream, fields) pair")
            target, values = pair
            check_name("forward's stream", target)
            where = f" forwarded to {target!r}"
            cmd.validate_fields(values, where)
            if len(values) > cmd.MAX_INLINE_FIELDS:
                raise PayloadError(
                    f"message{where} has {len(values)} fields; a forward takes at most "
                    f"{cmd.MAX_INLINE_FIELDS:,}"
                )
            if self._cluster and key_slot(target) != key_slot(msg.stream):
                raise ConfigError(
                    f"cannot forward from stream {msg.stream!r} (slot {key_slot(msg.stream)}) "
                    f"to {target!r} (slot {key_slot(target)}): on a cluster the ack and the add "
                    "run in one script, so both streams must share a hash slot; give them one "
                    "hash tag, e.g. '{orders}:in' -> '{orders}:out'"
                )
            self._targets.add((target, msg.stream))
            outputs.append((target, list(chain.from_iterable(values.items()))))
        return outputs

    def _forward_commands(
        self, forwards: Iterable[tuple[Message, list[tuple[str, list[Any]]]]]
    ) -> list[cmd.Command]:
        """One FORWARD script per stream for ``(message, its outputs)`` pairs."""
        by_stream: dict[str, tuple[list[str], list[Any], list[str]]] = {}
        for msg, outputs in forwards:
            targets, args, ids = by_stream.setdefault(msg.stream, ([], [], []))
            ids.append(msg.id)
            args += (msg.id, len(outputs))
            for target, flat in outputs:
                if target not in targets:
                    targets.append(target)
                args += (targets.index(target) + 2, len(flat))  # its index in KEYS, width
                args += flat
        for s, (_, _, ids) in by_stream.items():
            self._forget(s, ids)
        return [
            ("EVAL", scripts.FORWARD, 1 + len(targets), s, *targets, self.group, *args)
            for s, (targets, args, _) in by_stream.items()
        ]

    def _fail_commands(self, msg: Message, error: BaseException | str | None) -> list[cmd.Command]:
        """Fail one message: dead-letter it at max_deliveries, else schedule its retry."""
        self._check_message(msg)
        self.failed_count += 1
        reason = describe_error(error) or "failed"
        if self._noack:  # read with NOACK: it cannot come back, so it is kept as a dead letter
            return [self._dead_letter_command(msg, f"{reason} (read with noack: no retry)")]
        if policy.should_dead_letter(msg.deliveries, self.config.max_deliveries):
            self._forget(msg.stream, (msg.id,))
            return [self._dead_letter_command(msg, reason)]
        self._leases.forget(msg.stream, (msg.id,))  # its idle time grows: the backoff
        delay = self._machine.retry_later(msg, now_ms())
        log.debug("message %s of %r failed (%s); retry in %d ms", msg.id, msg.stream, reason, delay)
        return []

    def _settle_commands(self, batch: Batch, error: BaseException | None) -> list[cmd.Command]:
        """What to send once ``run()``'s handler is done with ``batch``: one XACK per stream for
        the acked, a dead-letter move for each given up on; failures are scheduled for retry.
        Messages the handler did not settle count as failed (with its exception, if it raised).
        """
        if self._noack:
            return self._noack_settle_commands(batch, error)
        if batch._ids is not None and batch.all_acked():  # the hot path: one XACK, no loop
            self._forget(self.streams[0], batch._ids)
            return [cmd.xack(self.streams[0], self.group, batch._ids)]
        acked: dict[str, list[str]] = {}
        forwarded: list[Message] = []
        commands: list[cmd.Command] = []
        unsettled = describe_error(error) if error is not None else "not settled by the handler"
        for msg in batch:
            outcome = msg._outcome  # run() mode: what the handler recorded
            kind, reason = outcome if outcome is not None else ("fail", unsettled)
            if kind == ACK:
                acked.setdefault(msg.stream, []).append(msg.id)
            elif kind == FORWARD:
                forwarded.append(msg)
            elif kind == DEAD:
                self._forget(msg.stream, (msg.id,))
                commands.append(self._dead_letter_command(msg, reason or "dead-lettered"))
            else:
                commands.extend(self._fail_commands(msg, reason))
        for stream, ids in acked.items():
            self._forget(stream, ids)
        if forwarded:
            commands[:0] = self._forward_commands((m, batch.forwards(m)) for m in forwarded)
        return [cmd.xack(s, self.group, ids) for s, ids in acked.items()] + commands

    def _noack_settle_commands(
        self, batch: Batch, error: BaseException | None
    ) -> list[cmd.Command]:
        """``_settle_commands`` for entries read with NOACK: acks are counted, the rest (failed,
        dead-lettered or left unsettled) go to the dead-letter stream: they cannot come back."""
        unsettled = describe_error(error) if error is not None else "not settled by the handler"
        commands: list[cmd.Command] = []
        for msg in batch:
            outcome = batch.outcome(msg)
            kind, reason = outcome if outcome is not None else ("fail", unsettled)
            if kind == ACK:
                self.acked_count += 1
            elif kind == DEAD:
                commands.append(self._dead_letter_command(msg, reason or "dead-lettered"))
            else:
                commands.extend(self._fail_commands(msg, reason))
        return commands

    def _handler_failed(self, batch: Batch, exc: BaseException) -> None:
        log.error(
            "consumer %r: handler failed on a batch of %d (%s..%s): %r",
            self.name,
            len(batch),
            batch[0].id,
            batch[-1].id,
            exc,
            exc_info=exc,
        )

    def _handler_overdue(self, now: int) -> bool:
        """True when the batch in hand has been with its handler past handler_timeout_ms."""
        limit = self.config.handler_timeout_ms
        handling = self._handling
        return (
            limit is not None
            and handling is not None
            and self._given_up is not handling[0]
            and now - handling[1] >= limit
        )

    def _give_up_commands(self, batch: Batch) -> list[cmd.Command]:
        """The handler ran past ``handler_timeout_ms``: its unsettled messages stop being
        renewed and are made idle at once, so the other consumers' reclaim takes them now."""
        self._given_up = batch
        self.timed_out_count += 1
        by_stream: dict[str, list[str]] = {}
        for msg in batch:
            if batch.outcome(msg) is None:
                by_stream.setdefault(msg.stream, []).append(msg.id)
        for stream, ids in by_stream.items():
            self._leases.forget(stream, ids)
        log.error(
            "consumer %r: handler still running after handler_timeout_ms=%d on a batch of %d "
            "(%s..%s); its %d unsettled messages are given up to the other consumers, and its "
            "late acks will count as stale",
            self.name,
            self.config.handler_timeout_ms,
            len(batch),
            batch[0].id,
            batch[-1].id,
            sum(len(ids) for ids in by_stream.values()),
        )
        idle = self.config.claim_idle_ms
        # Its own reclaim would take them straight back: leave them to the others for a while.
        self._machine.postpone_reclaim(now_ms() + idle)
        return [
            ("EVAL", scripts.GIVE_UP, 1, s, self.group, self.name, idle, *ids)
            for s, ids in by_stream.items()
        ]

    def _late_settle_commands(self, batch: Batch) -> list[cmd.Command]:
        """Settle a batch given up on: acks only where this consumer still owns the entry
        (the rest count as stale), dead-letter moves (they check ownership); failures and
        unsettled messages are left to whoever holds them now."""
        acked: dict[str, list[str]] = {}
        forwarded: list[Message] = []
        commands: list[cmd.Command] = []
        for msg in batch:
            outcome = msg._outcome
            if outcome is not None and outcome[0] == ACK:
                acked.setdefault(msg.stream, []).append(msg.id)
            elif outcome is not None and outcome[0] == FORWARD:
                forwarded.append(msg)  # the script forwards only what is still pending
            elif outcome is not None and outcome[0] == DEAD:
                commands.append(self._dead_letter_command(msg, outcome[1] or "dead-lettered"))
            self._forget(msg.stream, (msg.id,))
        if forwarded:
            commands[:0] = self._forward_commands((m, batch.forwards(m)) for m in forwarded)
        return [
            ("EVAL", scripts.ACK_IF_MINE, 1, s, self.group, self.name, *ids)
            for s, ids in acked.items()
        ] + commands

    def _handled(self, batch: Batch, error: BaseException | None) -> None:
        """``run()``'s handler is done with ``batch``: what settles it goes with the next
        read (one round trip), or out with close() when stopping."""
        self._handling = None
        if self._given_up is batch:
            self._given_up = None
            self._unsent.extend(self._late_settle_commands(batch))
        else:
            self._unsent.extend(self._settle_commands(batch, error))

    def _overdue_commands(self) -> list[cmd.Command]:
        commands = []
        for msg in self._machine.take_overdue():
            reason = (
                f"delivered {msg.deliveries} times (max_deliveries="
                f"{self.config.max_deliveries}) and never settled: each consumer it was "
                "handed to crashed, was killed or gave it up before acknowledging or failing it"
            )
            log.warning("message %s of %r: %s; dead-lettering it", msg.id, msg.stream, reason)
            commands.append(self._dead_letter_command(msg, reason))
        return commands

    def _count_replies(
        self, commands: Sequence[cmd.Command], replies: Sequence[Any], *, keep: bool = False
    ) -> int:
        """Account for the replies of acks and dead-letter moves; returns entries acked.

        A refused command raises (the first error, once every reply is counted); with ``keep``
        (``run()``'s settling) it is kept and sent again with the next read instead: acks are
        idempotent and moves re-check ownership, so a move refused for lack of memory is simply
        retried later.
        """
        done = 0
        refused: list[tuple[cmd.Command, Any]] = []
        for command, reply in zip(commands, replies, strict=True):
            if isinstance(reply, Exception):
                refused.append((command, reply))
            elif command[0] == "XACK":
                done += int(reply)
                self.stale_ack_count += len(command) - 3 - int(reply)
            elif command[1] == scripts.ACK_IF_MINE:
                done += int(reply)
                self.stale_ack_count += len(command) - 6 - int(reply)
            elif command[1] == scripts.FORWARD:
                forwarded = sum(1 for added in reply if added)
                done += forwarded
                self.forwarded_count += forwarded
                self.stale_ack_count += len(reply) - forwarded
            else:  # EVAL DEAD_LETTER: 1 moved, 0 no longer ours
                self.dead_lettered_count += int(reply)
        self.acked_count += done
        if refused:
            errors = [self._reply_error(r, self._what(c)) for c, r in refused]
            if not keep:
                raise errors[0]
            self._unsent.extend(c for c, _ in refused)
            self._log_refusal(f"settling {len(refused)} command(s) refused", errors[0])
        elif keep and self._refusals:
            self._refusals.pop("settling", None)
        return done

    @staticmethod
    def _what(command: cmd.Command) -> str:
        if command[0] == "EVAL":
            moves = (scripts.DEAD_LETTER, scripts.DEAD_LETTER_UNHELD)
            step = (
                "dead-letter move"
                if command[1] in moves
                else "forward"
                if command[1] == scripts.FORWARD
                else "settling step"
            )
            return f"{step} on stream {command[3]!r}"
        return f"{command[0]} on stream {command[1]!r}"

    def _log_refusal(self, kind: str, error: Exception) -> None:
        """Log a refusal that is retried: at once the first time, then at most once a minute."""
        now = time.monotonic()
        key = kind.split(" ", 1)[0]
        last = self._refusals.get(key)
        if last is None or now - last >= _REPEAT_LOG_S:
            self._refusals[key] = now
            log.warning("consumer %r: %s: %s; retried with the next reads", self.name, kind, error)

    def _reply_error(self, reply: BaseException, what: str) -> Exception:
        """A server error reply as conveyor's exception, classified by its code (from the
        exception class: redis-py strips the code from the text) and on one line."""
        return _io.server_error(reply, f"{what} for group {self.group!r}", self.client)

    def _setup_outcome(self, replies: Sequence[Any]) -> None:
        for stream, reply in zip(self.streams, replies, strict=True):
            if isinstance(reply, Exception):
                raise self._reply_error(reply, f"creating group {self.group!r} on {stream!r}")
            outcome = cmd.as_text(reply)
            if outcome.startswith("refused"):
                log.warning(
                    "consumer %r: the server refused to create group %r on %r (%s), but the "
                    "group exists: starting",
                    self.name,
                    self.group,
                    stream,
                    outcome.partition(": ")[2],
                )
        self._ready = True

    def _without_split_slots(
        self, plan: ReadPlan, replies: list[Any]
    ) -> tuple[ReadPlan, list[Any]]:
        """On a cluster, a reclaim script over a slot split by a migration (its stream on one
        node, its heartbeats on the other: TRYAGAIN) is skipped until the next round; the
        plan and replies of the streams where it ran are kept (what they claimed is ours)."""
        if not self._cluster or plan.kind != RECLAIM:
            return plan, replies
        keep = [i for i, r in enumerate(replies) if not _slot_moving(r)]
        if len(keep) == len(replies):
            return plan, replies
        log.debug("consumer %r: reclaim skipped on a slot being migrated", self.name)
        commands = tuple(plan.commands[i] for i in keep)
        streams = tuple(plan.streams[i] for i in keep)
        return ReadPlan(commands, streams, RECLAIM, None), [replies[i] for i in keep]

    def _renew_only(
        self, sent: Sequence[tuple[str, cmd.Command]], replies: list[Any]
    ) -> list[tuple[int, cmd.Command]]:
        """Heartbeat scripts refused because the slot is split by a migration: the same
        renewal of in-flight entries with the stream as its only key and no beat, so nobody
        takes them while the heartbeats key is on the other node. ``(index, command)`` pairs."""
        if not self._cluster:
            return []
        out = []
        for i, ((stream, command), reply) in enumerate(zip(sent, replies, strict=True)):
            if _slot_moving(reply):
                out.append((i, (*command[:4], stream, *command[5:9], 0, *command[10:])))
        return out

    def _read_errors(self, plan: ReadPlan, replies: Sequence[Any]) -> bool:
        """Handle error replies of a read. True: the group is gone and must be recreated."""
        for reply in replies:
            if isinstance(reply, Exception):
                code = cmd.error_code(reply)
                if code in ("UNBLOCKED", "MOVED", "ASK") and self._cluster:
                    # a slot that moved while we read: an outage until the map is read again
                    self._stale_map = True
                    raise _io.server_error(reply, f"reading {list(plan.streams)}", self.client)
                if code == "UNBLOCKED" and "state changed" in str(reply):
                    # a primary turned replica unblocks its readers: an outage, not a loss
                    raise ConnectionLost(
                        f"reading {list(plan.streams)}: server at {describe(self.client)} "
                        f"said: {cmd.error_text(reply)}"
                    )
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
        self._count_replies(carry, replies[: len(carry)], keep=True)
        return replies[len(carry) :]

    def _after_read_commands(self) -> list[cmd.Command]:
        return self._drop_commands() + self._overdue_commands() + self._oversized_commands()

    def _oversized_commands(self) -> list[cmd.Command]:
        commands = []
        limit = self.config.max_message_bytes
        for msg, size in self._machine.take_oversized():
            reason = (
                f"{size} bytes of fields, over max_message_bytes={limit}: dead-lettered "
                "without being handed to the handler"
            )
            log.warning("message %s of %r: %s", msg.id, msg.stream, reason)
            commands.append(self._dead_letter_command(msg, reason))
        return commands

    def _heartbeat_commands(self) -> list[tuple[str, cmd.Command]]:
        """``(stream, command)`` pairs: per stream, the beat and the renewal of its in-flight
        entries, in chunks of ``_RENEW_CHUNK`` ids (any batch size fits)."""
        inflight = self._leases.renewable()
        for noted in list(self._noted.values()):
            for stream, ids in noted:
                inflight[stream].extend(ids)
        timeout_ms = policy.heartbeat_timeout_ms(self.config.heartbeat_interval_ms)
        out: list[tuple[str, cmd.Command]] = []
        for s in self.streams:
            ids = inflight[s]
            key = heartbeat_key(s, self.group)
            for at in range(0, max(len(ids), 1), _RENEW_CHUNK):
                head = ("EVAL", scripts.HEARTBEAT, 2, s, key, self.group, self.name)
                beat = 1 if at == 0 else 0
                chunk = ids[at : at + _RENEW_CHUNK]
                out.append((s, (*head, _HEARTBEATS_TTL_MS, timeout_ms, beat, *chunk)))
        return out

    def _heartbeat_outcome(
        self, sent: Sequence[tuple[str, cmd.Command]], replies: Sequence[Any]
    ) -> None:
        for (stream, command), reply in zip(sent, replies, strict=True):
            if isinstance(reply, Exception):
                raise self._reply_error(reply, f"heartbeat on {stream!r}")
            lost = [cmd.as_text(x) for x in reply[0] or ()]
            refused = cmd.as_text(reply[1]) if len(reply) > 1 and reply[1] else ""
            if command[9] == 0 and command[4] == stream:
                refused = "TRYAGAIN the slot is being migrated (heartbeats key on another node)"
            if refused:
                self._beat_refused(stream, refused)
            if lost:
                self._leases.forget(stream, lost)
                self.lost_count += len(lost)
                log.warning(
                    "consumer %r: %d in-flight entries of %r were taken over by another "
                    "consumer (this one was presumed dead); their acks will count as stale",
                    self.name,
                    len(lost),
                    stream,
                )

    def _beat_refused(self, stream: str, error: str) -> None:
        now = time.monotonic()
        last = self._refusals.get("heartbeat")
        if last is not None and now - last < _REPEAT_LOG_S:
            return
        self._refusals["heartbeat"] = now
        key = heartbeat_key(stream, self.group)
        if error.startswith("WRONGTYPE"):
            log.error(
                "consumer %r: the heartbeats key %r is not a hash (another client wrote it): "
                "%s. Consumption goes on; consumers are judged by idle time alone until the "
                "key is deleted",
                self.name,
                key,
                error,
            )
        else:
            log.warning(
                "consumer %r: the server refused its heartbeat in %r (%s); its in-flight "
                "entries are still renewed, so nobody takes them",
                self.name,
                key,
                error,
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
