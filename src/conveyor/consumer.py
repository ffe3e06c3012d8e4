"""Consumer: the synchronous driver of the consumer machine (threads for heartbeats).

Everything but the I/O loops lives in ``_consumer_base``; ``AsyncConsumer`` is its asyncio twin.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from conveyor import _io
from conveyor._consumer_base import (
    AHEAD,
    FAN_OUT_MARGIN_S,
    Ahead,
    Handler,
    Outage,
    _ConsumerBase,
    default_consumer_name,
    now_ms,
)
from conveyor._core import commands as cmd
from conveyor._core.machine import NEW, ReadPlan
from conveyor._shutdown import StopNow, graceful
from conveyor._startup import check_server
from conveyor.async_consumer import AsyncConsumer
from conveyor.errors import ConnectionLost
from conveyor.models import Batch, Message, describe_error

__all__ = ["AsyncConsumer", "Consumer", "default_consumer_name"]

log = logging.getLogger("conveyor.consumer")


class Consumer(_ConsumerBase):
    """Reads batches from one or more streams as one consumer of a group.

    Example (``r`` is a client from ``conveyor.connect()``)::

        c = Consumer(r, "orders", group="billing", batch_size=100, max_wait_ms=1000)
        for msg in c.get_batch():
            handle(msg.fields)
            c.ack(msg)

    Or let it drive: ``c.run(handler)`` calls ``handler(batch)`` until SIGTERM/SIGINT or
    ``c.stop()``. Drive one Consumer from one thread (``stop()`` works from any).

    ``noack=True`` reads with XREADGROUP NOACK: at-most-once. Nothing becomes pending, so
    nothing is re-read, retried, reclaimed or renewed (no heartbeats); an ack is only counted;
    a failed message goes to the dead-letter stream at once. A crash loses the batch in hand.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None
        # On a cluster: the blocking reads in flight, by (node, slot), and their threads.
        self._reads: dict[tuple[str, int], tuple[concurrent.futures.Future[Any], Any]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

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

        Returns how many were still pending and are now acknowledged (with ``noack``: how many
        were given; nothing is pending, so nothing is sent).
        """
        before = self.acked_count
        commands = self._ack_commands(messages)
        if commands:
            self._send(commands)
        return self.acked_count - before

    def fail(self, msg: Message, error: BaseException | str | None = None) -> None:
        """Processing ``msg`` failed: it comes back after a backoff, exponential in its
        deliveries; on its ``max_deliveries``-th delivery it goes to the dead-letter stream.
        With ``noack`` it cannot come back: it goes to the dead-letter stream at once."""
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

    def forward(
        self, msg: Message, stream: Any, fields: Mapping[Any, Any] | None = None
    ) -> list[str]:
        """Acknowledge ``msg`` and add ``fields`` to ``stream`` in one script, which adds only
        if its ack removed the entry from the pending list; returns the ids added (none when
        the message was no longer pending: another consumer finished it). For fan-out, pass a
        list of ``(stream, fields)`` pairs as ``stream``: one call, one script."""
        commands = self._forward_commands([(msg, self._outputs(msg, stream, fields))])
        replies = _io.pool_roundtrip(self.client, commands)
        self._count_replies(commands, replies)
        return [cmd.parse_id(i) for i in replies[0][0]]

    def run(self, handler: Handler, *, grace_period_ms: int = 30_000) -> None:
        """Call ``handler(batch)`` for every batch until SIGTERM/SIGINT or ``stop()``.

        The handler settles messages with ``batch.ack(msg)``, ``batch.fail(msg, error)`` or
        ``batch.dead_letter(msg, reason)``; an exception fails every message it did not settle.
        The acks of a batch go out in one round trip with a read of new entries, sent before
        the handler gets the next batch: the server serves it while the handler works
        (read-ahead). A lost connection is retried with backoff; the loop does not die. The
        first signal finishes the batch in hand within ``grace_period_ms``, acks, gives back
        what was read ahead, and leaves the group; a second stops at once (unacked messages
        stay pending). Returns after leaving the group.
        """
        outage = Outage(self.name)
        try:
            with graceful(self.name, self.stop, grace_period_ms):
                while not self._stopping:
                    try:
                        batch = self._read_batch(deferred=True)
                        outage.over()
                    except Exception as exc:  # an outage or bad data: never the end of run()
                        self._wake.wait(outage.failed(exc))
                        continue
                    if not batch:
                        continue
                    self._read_ahead()
                    error: BaseException | None = None
                    self._handling = (batch, now_ms())
                    try:
                        handler(batch)
                    except Exception as exc:
                        error = exc
                        self._handler_failed(batch, exc)
                    self._handled(batch, error)
        except (StopNow, KeyboardInterrupt):
            self._stop_now = True
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
        ahead, self._ahead = self._ahead, None
        try:
            if ahead is not None:
                self._close_ahead(ahead)
            if self._unsent:
                self._flush_unsent()
            self._give_back()
            if self._ready:
                _io.pool_roundtrip(self.client, self._leave_commands())
        except Exception as exc:  # leaving is best effort; nothing is lost by staying
            log.warning("consumer %r could not leave group %r: %s", self.name, self.group, exc)
        finally:
            for conn in (self._reader, *self._controls.values(), *self._retire_readers()):
                if conn is not None:
                    conn.disconnect()
            if self._pool is not None:
                self._pool.shutdown(wait=False)

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
        first, self._ahead = self._ahead, None
        m.begin_batch(self._began_ms(first))
        self._plan_units()
        split = not deferred and not self._cluster
        # reads in flight on the reader for this batch, in the order sent
        queue = [first] if first is not None else []
        try:
            while (step := self._batch_step(queue, split)) is not None:
                plan, carry, raw = step
                if plan.kind == NEW:
                    # the server works on the next read while this reply is parsed
                    if deferred and m.fills(raw[len(carry) :]):
                        self._read_ahead()
                    elif split and (rest := m.rest_ahead(plan, raw[len(carry) :])) is not None:
                        queue.append(self._send_ahead(rest))
                replies = self._carried(carry, raw)
                plan, replies = self._without_split_slots(plan, replies)
                if self._read_errors(plan, replies):
                    self._warn_recreate()
                    self._setup()
                    m.group_recreated()
                else:
                    m.feed(plan, replies, now_ms())
        except BaseException:
            # A reply lost, or an error after earlier reads of this batch delivered entries:
            # what the server delivered is only in our pending list now.
            m.reply_lost()
            self._abandon_reads()
            self._drop_ahead(queue)
            raise
        after = self._after_read_commands()
        if after:  # refused or cut off: they ride with the next read instead
            try:
                replies = _io.pool_roundtrip(self.client, after)
            except ConnectionLost:
                self._unsent.extend(after)
            else:
                self._count_replies(after, replies, keep=True)
        return self._handed_out(m.end_batch(), deferred)

    def _batch_step(
        self, queue: list[Ahead], split: bool
    ) -> tuple[ReadPlan, list[cmd.Command], list[Any]] | None:
        """The next step of a batch: the replies of a read in flight (the oldest first), or
        the machine's next round trip; None when the batch is complete."""
        if queue:
            taken = queue.pop(0)
            return taken.plan, taken.carry, self._collect(taken)
        plan = self._machine.next_read(now_ms(), split=split)
        if plan is None:
            return None
        carry, commands = self._carry(plan)
        try:
            return plan, carry, self._roundtrip(plan, carry, commands)
        except BaseException:
            self._unsent[:0] = carry  # safe to send again: acks, moves are idempotent
            raise

    def _read_ahead(self) -> None:
        """``run()``: send the next batch's first read with the acks waiting, before the
        handler gets the batch in hand; its replies are read once the handler is done."""
        plan = self._next_ahead()
        if plan is not None:
            self._ahead = self._send_ahead(plan)

    def _send_ahead(self, plan: ReadPlan) -> Ahead:
        """Send ``plan`` with the acks waiting; its replies are read later (``_collect``)."""
        carry, commands = self._carry(plan)
        ahead = Ahead(plan, carry, commands, now_ms())
        try:
            _io.send(self._reader, ahead.commands)
        except Exception as exc:  # raised where its replies are collected
            ahead.error = exc
        return ahead

    def _drop_ahead(self, queue: list[Ahead]) -> None:
        """A batch failed with reads out: their replies are dropped with the connection (what
        they delivered is re-read from the pending list); their acks go out again."""
        dropped = [*queue, *([self._ahead] if self._ahead is not None else [])]
        self._ahead = None
        if dropped:
            self._reader.disconnect()
        for ahead in reversed(dropped):
            self._unsent[:0] = ahead.carry

    def _collect(self, ahead: Ahead) -> list[Any]:
        try:
            with ahead.lock:
                ahead.collected = True
                if ahead.replies is None and ahead.error is None:
                    try:
                        ahead.replies = _io.receive(self._reader, ahead.commands)
                    except Exception as exc:
                        ahead.error = exc
        except BaseException:
            self._unsent[:0] = ahead.carry
            raise
        return self._ahead_replies(ahead)

    def _renew_ahead(self) -> None:
        """Heartbeat thread, the handler taking long: the replies of the read ahead, once they
        are in, are read here so that what it delivered is renewed with this beat; when the
        handler has run past ``handler_timeout_ms``, its entries are given back instead."""
        ahead = self._ahead
        if ahead is None or not ahead.lock.acquire(blocking=False):
            return
        try:
            if ahead.collected or ahead.given_back:
                return
            if ahead.replies is None and ahead.error is None:
                try:
                    if not self._reader.can_read(0):
                        return
                    ahead.replies = _io.receive(self._reader, ahead.commands)
                except Exception as exc:
                    ahead.error = exc
                    return
            handling = self._handling
            if handling is None or self._given_up is not handling[0]:
                self._note_delivered(AHEAD, ahead.replies or [])
                return
            messages = self._ahead_messages(ahead)
            if messages:
                _io.pool_roundtrip(self.client, self._give_back_commands(messages))
            ahead.given_back = True
            self._noted.pop(AHEAD, None)
        finally:
            ahead.lock.release()

    def _close_ahead(self, ahead: Ahead) -> None:
        """Closing with a read ahead out: its acks counted, its entries given back to the group
        at once; stopped at once, or cut off, they stay pending (for a restart or a reclaim)."""
        if ahead.replies is None and ahead.error is None:
            if self._stop_now:
                self._reader.disconnect()
                ahead.error = ConnectionLost("stopped at once")
            else:
                try:
                    ahead.replies = _io.receive(self._reader, ahead.commands)
                except Exception as exc:
                    ahead.error = exc
        give_back = self._ahead_closed(ahead)
        if give_back:
            _io.pool_roundtrip(self.client, give_back)

    def _roundtrip(
        self, plan: ReadPlan, carry: list[cmd.Command], commands: tuple[cmd.Command, ...]
    ) -> list[Any]:
        """One step of a batch: on a server, one pipeline on the reader; on a cluster, the
        settling commands and non-blocking steps pipelined per node, and new entries read by
        one blocking read per (node, slot), all in flight at once."""
        if not self._cluster:
            return _io.roundtrip(self._reader, commands)
        if plan.kind != NEW:
            return self._on_nodes(commands)
        done = self._on_nodes(carry) if carry else []
        return done + self._fan_out(plan)

    def _on_nodes(self, commands: Sequence[cmd.Command]) -> list[Any]:
        replies = _io.cluster_roundtrip(self.client, commands, self._control)
        if self._stale_map:
            self._refresh()
        return replies

    def _refresh(self) -> None:
        try:
            self.client.nodes_manager.initialize()
        except Exception as exc:  # the next step tries again
            log.debug("consumer %r: reading the slot map failed: %s", self.name, exc)
            return
        self._map_refreshed()

    def _fan_out(self, plan: ReadPlan) -> list[Any]:
        """Start a blocking read on every (node, slot) of ``plan`` that has none in flight;
        return the replies of those that finish first (the others stay in flight, for the
        next step or batch), waiting at most the plan's block time."""
        now = now_ms()
        self._start_reads(plan, now)
        wait_s = (plan.block_ms or 0) / 1000
        if not self._reads:  # every slot paused for a moment: wait, never spin
            self._wake.wait(max(min(self._pause_ms(now) / 1000, wait_s), 0.001))
            return []
        concurrent.futures.wait(
            [f for f, _ in self._reads.values()],
            timeout=wait_s + FAN_OUT_MARGIN_S,
            return_when=concurrent.futures.FIRST_COMPLETED,
        )
        try:
            return self._finished_reads(self._reads)
        finally:
            if self._stale_map:
                self._refresh()

    def _start_reads(self, plan: ReadPlan, now: int) -> None:
        for key, node, commands, _asking in self._sendable(plan, self._reads, now):
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=64, thread_name_prefix=f"conveyor-read-{self.name}"
                )
            reader = self._unit_reader(key, node)
            future = self._pool.submit(_io.roundtrip, reader, commands)
            future.add_done_callback(self._delivered)
            self._reads[key] = (future, node)

    def _abandon_reads(self) -> None:
        if self._cluster:
            self._reads = {}
            for reader in self._retire_readers():
                reader.disconnect()  # its thread ends with an error nobody reads

    def _give_back(self) -> None:
        """Closing on a cluster: what the carried entries and the reads that finished hold is
        given back to the group for the others to take at once. Reads still blocked are cut
        (they delivered nothing; one that delivers at that very moment leaves its entries in
        this consumer's pending list, for the others' reclaim once its heartbeat is stale)."""
        reads, self._reads = self._reads, {}
        messages = self._unhandled(reads)
        if messages:
            _io.pool_roundtrip(self.client, self._give_back_commands(messages))

    def _setup(self) -> None:
        check_server(self.client, self.streams[0])
        self._setup_outcome(_io.pool_roundtrip(self.client, self._setup_commands()))
        if self._noack:  # nothing of its own is ever pending: no heartbeats to send
            return
        # Alive before reading anything: nobody takes what this consumer is about to re-read.
        self._beat()
        if self._heartbeat_thread is None:
            self._heartbeat_thread = threading.Thread(
                target=self._heartbeat_loop, name=f"conveyor-heartbeat-{self.name}", daemon=True
            )
            self._heartbeat_thread.start()

    def _beat(self) -> None:
        sent = self._heartbeat_commands()
        replies = _io.pool_roundtrip(self.client, [c for _, c in sent])
        again = self._renew_only(sent, replies)
        if again:
            more = _io.pool_roundtrip(self.client, [c for _, c in again])
            for (i, command), reply in zip(again, more, strict=True):
                sent[i], replies[i] = (sent[i][0], command), reply
        self._heartbeat_outcome(sent, replies)

    def _heartbeat_loop(self) -> None:
        """Beats every heartbeat interval; also watches the handler's time limit."""
        interval_ms = self.config.heartbeat_interval_ms
        limit = self.config.handler_timeout_ms
        next_beat = now_ms() + interval_ms
        failing = False
        while True:
            wait_ms = next_beat - now_ms()
            handling = self._handling
            if limit is not None and handling is not None and self._given_up is not handling[0]:
                wait_ms = min(wait_ms, handling[1] + limit - now_ms())
            if self._wake.wait(max(wait_ms, 1) / 1000):
                return
            try:
                handling = self._handling
                if handling is not None and self._handler_overdue(now_ms()):
                    _io.pool_roundtrip(self.client, self._give_up_commands(handling[0]))
                    self._renew_ahead()
                if now_ms() < next_beat:
                    continue
                next_beat = now_ms() + interval_ms
                self._renew_ahead()
                self._beat()
                if failing:
                    log.warning("consumer %r: heartbeats resumed", self.name)
                failing = False
            except Exception as exc:
                if not failing:
                    log.warning("consumer %r: heartbeat failed: %s; retrying", self.name, exc)
                failing = True
