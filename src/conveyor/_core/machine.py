"""The consumer's life, as decisions without I/O: every state transition lives here.

A driver (sync or asyncio) runs the same loop::

    machine.begin_batch(now_ms)
    while (plan := machine.next_read(now_ms)) is not None:
        replies = execute(plan.commands)        # one pipeline, one round trip
        machine.feed(plan, replies, now_ms)
    messages = machine.end_batch()

A batch is filled, in this order, from:

1. *pending*: this consumer's own pending entries, re-read from id ``0`` after a start or a
   lost reply (entries the server delivered but we never saw are only found there). After a
   start XREADGROUP adds a delivery (a process that crashed on a message counts it); after a
   lost reply the ``REREAD`` script reads them without one, because no handler saw them;
2. *take back*: its own failed entries whose retry backoff is over;
3. *reclaim*: every ``heartbeat_ms``, entries of consumers whose heartbeat stopped, then
   entries idle for ``claim_idle_ms`` (XAUTOCLAIM, its cursor kept across rounds);
4. *new*: ``>``, blocking on the server for what is left of ``max_wait_ms``.

With ``noack`` only the last: entries are read with NOACK, so nothing is ever pending (no own
list to re-read, nothing to retry or reclaim) and nothing is read ahead (a read ahead that no
handler got would be lost on a stop).

Messages delivered more than ``max_deliveries`` times without being settled (their consumers
died on them) are set aside for the dead-letter stream instead of being handed out again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from conveyor._core import commands as cmd
from conveyor._core import policy, scripts
from conveyor._keys import heartbeat_key
from conveyor.config import ConsumerConfig
from conveyor.models import Message

__all__ = ["NEW", "PENDING", "RECLAIM", "REREAD", "TAKE_BACK", "ConsumerMachine", "ReadPlan"]

PENDING, REREAD, TAKE_BACK, RECLAIM, NEW = "pending", "reread", "take_back", "reclaim", "new"

#: most entries one claim asks for (Lua unpacks them onto a bounded stack)
MAX_CLAIM = 1_000
#: a read of new entries for at least twice this many is split in two (``next_read(split=)``)
SPLIT_MIN = 50
#: a time no clock reaches (ms)
_NEVER = 2**62


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """One round trip: the commands to pipeline, what they are for, how long they may block."""

    commands: tuple[cmd.Command, ...]
    streams: tuple[str, ...]
    kind: str
    block_ms: int | None

    @property
    def pending(self) -> bool:
        return self.kind in (PENDING, REREAD)


class ConsumerMachine:
    """Decides what a consumer reads next and absorbs the replies.

    >>> from conveyor.config import ConsumerConfig
    >>> m = ConsumerMachine(ConsumerConfig(streams=("s",), group="g", consumer="c"))
    >>> m.begin_batch(now_ms=0)
    >>> m.next_read(now_ms=0).commands[0][:6]
    ('XREADGROUP', 'GROUP', 'g', 'c', 'COUNT', 100)
    """

    def __init__(self, config: ConsumerConfig) -> None:
        self.config = config
        self._names: dict[Any, str] = {}
        for s in config.streams:
            self._names[s] = s
            self._names[s.encode("utf-8", "surrogateescape")] = s
        # Cursor into our own pending list per stream still in the *pending* state.
        self._pending_after: dict[str, str] = (
            {} if config.noack else dict.fromkeys(config.streams, "0")
        )
        # After a lost reply the own pending list is read again without adding deliveries.
        self._quiet_reread = False
        self._claim_cursor: dict[str, str] = dict.fromkeys(config.streams, "0-0")
        # Never with noack: nobody's entries are pending.
        self._next_reclaim_ms = _NEVER if config.noack else 0
        self._retry_due: dict[tuple[str, str], int] = {}
        self._buffer: list[Message] = []
        # New entries delivered beyond the batch size (reads on several nodes in flight at
        # once): the next batch starts with them.
        self._carry: list[Message] = []
        # Streams read by one XREADGROUP: all on a plain server; on a cluster, those that
        # share a hash slot (the driver says which).
        self._units: tuple[tuple[str, ...], ...] = (tuple(config.streams),)
        self._overdue: list[Message] = []
        # Entries over max_message_bytes, with their size: dead-lettered, never handed out.
        self._oversized: list[tuple[Message, int]] = []
        self._deadline_ms = 0
        self._first_ms: int | None = None
        self._new_reads = 0
        self._rotation = 0
        self._drops: list[tuple[str, str]] = []
        self._heartbeat_timeout_ms = policy.heartbeat_timeout_ms(config.heartbeat_interval_ms)
        #: entries found deleted or trimmed while pending, dropped from the pending list
        self.deleted_count = 0
        #: messages handed to the user
        self.delivered_count = 0
        #: entries taken over from other consumers (dead, or idle too long)
        self.reclaimed_count = 0
        #: failed messages delivered again after their backoff
        self.retried_count = 0
        #: dead consumers removed from the group by this consumer's reclaim rounds
        self.removed_consumers: list[str] = []

    # -- batches -------------------------------------------------------------------------------

    def set_units(self, units: Sequence[Sequence[str]]) -> None:
        """Which streams one XREADGROUP may read together (on a cluster: one hash slot)."""
        self._units = tuple(tuple(u) for u in units)

    @property
    def carried(self) -> list[Message]:
        """New entries delivered beyond the last batch's size, handed out with the next."""
        return self._carry

    def begin_batch(self, now_ms: int) -> None:
        self._buffer, self._carry = self._carry, []
        self._new_reads = 0
        self._deadline_ms = now_ms + self.config.max_wait_ms
        # With linger_ms, the batch stops waiting that long after its first message came.
        self._first_ms = now_ms if self._buffer else None
        self._phase_done: set[str] = set()

    def next_read(self, now_ms: int, *, split: bool = False) -> ReadPlan | None:
        """The next round trip of this batch, or None when the batch is complete.

        With ``split``, a read of new entries from one stream asks for half of the room left:
        if it gets all it asked for, the driver sends the rest (``rest_ahead``) before it
        parses the first half, so the server builds the second half's reply meanwhile.
        """
        remaining = self.config.batch_size - len(self._buffer)
        if remaining <= 0:
            return None
        if self._pending_after:
            return self._pending_plan(remaining)
        if TAKE_BACK not in self._phase_done:
            self._phase_done.add(TAKE_BACK)
            plan = self._take_back_plan(remaining, now_ms)
            if plan is not None:
                return plan
        if RECLAIM not in self._phase_done and now_ms >= self._next_reclaim_ms:
            self._phase_done.add(RECLAIM)
            return self._reclaim_plan(remaining)
        wait_ms = self._deadline_ms - now_ms
        if self._buffer:
            # Entries in hand are not renewed until the batch is handed out: it waits at most
            # a heartbeat period more for the rest (linger_ms: less), or a long max_wait_ms
            # would let them look idle to the others' reclaim.
            if self._first_ms is None:
                self._first_ms = now_ms
            linger = self.config.linger_ms
            hold = self.config.heartbeat_interval_ms
            if linger is not None:
                hold = min(hold, linger)
            wait_ms = min(wait_ms, self._first_ms + hold - now_ms)
        if wait_ms <= 0 and self._new_reads > 0:  # new entries are read at least once
            return None
        if split and len(self.config.streams) == 1 and remaining >= 2 * SPLIT_MIN:
            remaining //= 2
        return self._new_plan(remaining, wait_ms if wait_ms > 0 else None)

    def rest_ahead(self, plan: ReadPlan, replies: Sequence[Any]) -> ReadPlan | None:
        """A read of new entries from one stream got all it asked for without filling the
        batch: more are likely waiting. The rest of the batch, as a read that does not block,
        to send before ``replies`` are parsed (then fed, then this plan's replies)."""
        if plan.kind != NEW or len(self.config.streams) != 1 or len(replies) != 1:
            return None
        got = cmd.count_entries(replies[0])
        room = self.config.batch_size - len(self._buffer) - got
        if got < int(plan.commands[0][5]) or room <= 0:
            return None
        return self._new_plan(room, None)

    def read_ahead(self, now_ms: int) -> ReadPlan | None:
        """The next batch's first read, a read of new entries that does not block, to send
        now, when that is how the next batch would begin anyway: nothing of its own to re-read,
        no retry due, no reclaim round due. ``run()`` sends it before its handler gets the batch
        in hand (as soon as the last reply of the batch is in), so the server serves it
        meanwhile. The driver begins the next batch with ``begin_batch(sent_ms)``, feeds this
        plan's replies and goes on with ``next_read`` as usual. None: the next batch begins as
        usual.
        """
        if self.config.noack or self._pending_after or self._carry:
            return None
        if now_ms >= self._next_reclaim_ms:
            return None
        if self._retry_due and min(self._retry_due.values()) <= now_ms:
            return None
        return self._new_plan(self.config.batch_size, None)

    def fills(self, replies: Sequence[Any]) -> bool:
        """True when the replies of a read of new entries complete this batch (counted, not
        parsed yet)."""
        room = self.config.batch_size - len(self._buffer)
        return sum(cmd.count_entries(reply) for reply in replies) >= room

    def _new_plan(self, remaining: int, block: int | None) -> ReadPlan:
        streams, count = self._share(self.config.streams, remaining)
        c = self.config
        if len(self._units) == 1:
            new = (">",) * len(streams)
            read = cmd.xreadgroup(c.group, c.consumer, streams, new, count, block, c.noack)
            return ReadPlan((read,), streams, NEW, block)
        reads = tuple(
            cmd.xreadgroup(c.group, c.consumer, unit, (">",) * len(unit), count, block, c.noack)
            for unit in self._split(streams)
        )
        return ReadPlan(reads, streams, NEW, block)

    def feed(self, plan: ReadPlan, replies: Sequence[Any], now_ms: int) -> None:
        """Absorb the replies of ``plan`` (errors must have been handled by the driver)."""
        if plan.kind == NEW:  # first deliveries: nothing can be overdue, nothing deleted
            # One reply per XREADGROUP the driver got back (on a cluster: from any node).
            self._new_reads += 1
            for reply in replies:
                result = cmd.parse_read(reply, self._names, self.config.encoding, 1)
                if self.config.max_message_bytes is None:
                    self._buffer.extend(result.messages)
                else:
                    self._buffer.extend(self._within_size(result.messages))
        elif plan.kind == PENDING:
            self._feed_pending(plan, replies)
        elif plan.kind == REREAD:
            self._feed_reread(plan, replies)
        elif plan.kind == RECLAIM:
            self._feed_reclaim(plan, replies, now_ms)
        else:
            self._feed_take_back(plan, replies)

    def stream_of(self, raw_name: Any) -> str:
        """The user's name of a stream as a reply names it (bytes or str)."""
        return self._names.get(raw_name) or cmd.as_text(raw_name)

    def new_messages(self, reply: Any) -> list[Message]:
        """The messages of one ``>`` XREADGROUP reply (a read that finished after the end)."""
        return cmd.parse_read(reply, self._names, self.config.encoding, 1).messages

    def end_batch(self) -> list[Message]:
        batch, self._buffer = self._buffer, []
        size = self.config.batch_size
        if len(batch) > size:
            batch, self._carry = batch[:size], batch[size:]
        self.delivered_count += len(batch)
        return batch

    def take_drops(self) -> list[tuple[str, str]]:
        """``(stream, id)`` of deleted entries to remove from the pending list (XACK them)."""
        drops, self._drops = self._drops, []
        return drops

    def take_oversized(self) -> list[tuple[Message, int]]:
        """Messages over ``max_message_bytes``, with their size: dead-letter them."""
        oversized, self._oversized = self._oversized, []
        return oversized

    def _within_size(self, messages: list[Message]) -> list[Message]:
        """``messages`` without those over ``max_message_bytes`` (set aside)."""
        limit = self.config.max_message_bytes
        assert limit is not None
        kept = []
        for msg in messages:
            size = cmd.fields_bytes(msg.fields, self.config.encoding)
            if size > limit:
                self._oversized.append((msg, size))
            else:
                kept.append(msg)
        return kept

    def take_overdue(self) -> list[Message]:
        """Messages delivered more than ``max_deliveries`` times: dead-letter them."""
        overdue, self._overdue = self._overdue, []
        return overdue

    # -- settling ------------------------------------------------------------------------------

    def retry_later(self, msg: Message, now_ms: int) -> int:
        """A failed message stays pending and is taken back after its backoff; returns the
        delay in ms."""
        c = self.config
        delay = policy.retry_delay_ms(msg.deliveries, c.retry_backoff_ms, c.retry_backoff_max_ms)
        self._retry_due[(msg.stream, msg.id)] = now_ms + delay
        return delay

    def settled(self, stream: str, msg_id: str) -> None:
        """Forget a scheduled retry of a message that has been acked or dead-lettered."""
        self._retry_due.pop((stream, msg_id), None)

    @property
    def retries_waiting(self) -> int:
        return len(self._retry_due)

    # -- faults --------------------------------------------------------------------------------

    def reply_lost(self) -> None:
        """A reply may have been lost: what the server delivered is only in our pending list."""
        self._buffer = []
        self._carry = []
        if self.config.noack:
            return  # what it delivered is nowhere now: at most once
        self._pending_after = dict.fromkeys(self.config.streams, "0")
        self._quiet_reread = True
        # Failed entries waiting for their retry stay scheduled: the re-read passes them by,
        # and their retry (which counts a delivery) comes after the backoff as planned.

    def group_recreated(self) -> None:
        """The group was created again after NOGROUP; its pending list starts empty."""
        self._pending_after = {}
        self._retry_due.clear()
        self._claim_cursor = dict.fromkeys(self.config.streams, "0-0")

    def postpone_reclaim(self, until_ms: int) -> None:
        """No reclaim round before ``until_ms`` (entries this consumer gave up are left to the
        others meanwhile)."""
        self._next_reclaim_ms = max(self._next_reclaim_ms, until_ms)

    def setup_commands(self) -> list[cmd.Command]:
        """Create the group on every stream; one that exists already is fine, also when the
        server refuses the creation (out of memory, ACL)."""
        c = self.config
        return [("EVAL", scripts.CREATE_GROUP, 1, s, c.group, c.start) for s in c.streams]

    # -- internals -----------------------------------------------------------------------------

    def _share(self, streams: Sequence[str], remaining: int) -> tuple[tuple[str, ...], int]:
        """Which streams to read and the COUNT for each, so a batch never exceeds its size.

        COUNT applies per stream; with several streams the remaining room is shared, and when
        there is less room than streams, a rotating subset is read.
        """
        streams = tuple(streams)
        n = len(streams)
        if n == 1:
            return streams, remaining
        self._rotation = (self._rotation + 1) % n
        rotated = streams[self._rotation :] + streams[: self._rotation]
        if remaining >= n:
            return rotated, remaining // n
        return rotated[:remaining], 1

    def _split(self, streams: Sequence[str]) -> list[tuple[str, ...]]:
        """``streams`` grouped by unit, in their order."""
        chosen = set(streams)
        out = [tuple(s for s in unit if s in chosen) for unit in self._units]
        return [u for u in out if u]

    def _pending_plan(self, remaining: int) -> ReadPlan:
        pending: tuple[str, ...] = tuple(self._pending_after)
        if len(self._units) > 1:  # one XREADGROUP reads one unit's own pending entries
            pending = self._split(pending)[0] if self._split(pending) else pending
        streams, count = self._share(pending, remaining)
        ids = tuple(self._pending_after[s] for s in streams)
        c = self.config
        if self._quiet_reread:
            count = min(count, MAX_CLAIM)
            return ReadPlan(
                tuple(
                    (
                        "EVAL",
                        scripts.REREAD,
                        1,
                        s,
                        c.group,
                        c.consumer,
                        "-" if after in ("0", "0-0") else "(" + after,
                        count,
                    )
                    for s, after in zip(streams, ids, strict=True)
                ),
                streams,
                REREAD,
                None,
            )
        commands: list[cmd.Command] = [
            cmd.xreadgroup(c.group, c.consumer, streams, ids, count, None)
        ]
        # XREADGROUP by id adds one delivery; the XPENDING after it reads the new counts.
        commands.extend(
            cmd.xpending_range(s, c.group, after, count, c.consumer)
            for s, after in zip(streams, ids, strict=True)
        )
        return ReadPlan(tuple(commands), streams, PENDING, None)

    def _feed_pending(self, plan: ReadPlan, replies: Sequence[Any]) -> None:
        counts: dict[str, int] = {}
        for reply in replies[1:]:
            counts.update(cmd.parse_pending_counts(reply))
        result = cmd.parse_read(replies[0], self._names, self.config.encoding, counts)
        self._absorb(result)
        count = int(plan.commands[0][5])
        for stream in plan.streams:
            if result.counts.get(stream, 0) < count:
                del self._pending_after[stream]  # own pending list read to its end
            else:
                self._pending_after[stream] = result.last_ids[stream]

    def _feed_reread(self, plan: ReadPlan, replies: Sequence[Any]) -> None:
        for command, stream, reply in zip(plan.commands, plan.streams, replies, strict=True):
            entries, flat_counts, rows = reply[0], reply[1], int(reply[2])
            result = self._parse_claimed(stream, entries, flat_counts)
            if self._retry_due:
                due = self._retry_due
                result.messages[:] = [m for m in result.messages if (m.stream, m.id) not in due]
            self._absorb(result)
            if rows < int(command[-1]) or stream not in result.last_ids:
                del self._pending_after[stream]  # own pending list read to its end
            else:
                self._pending_after[stream] = result.last_ids[stream]

    def _take_back_plan(self, remaining: int, now_ms: int) -> ReadPlan | None:
        if not self._retry_due:
            return None
        due: dict[str, list[str]] = {}
        room = min(remaining, MAX_CLAIM)
        ordered = sorted(self._retry_due.items(), key=lambda kv: kv[1])
        for (stream, msg_id), at in ordered[:room]:
            if at > now_ms:
                break
            due.setdefault(stream, []).append(msg_id)
        if not due:
            return None
        c = self.config
        commands = []
        for stream, ids in due.items():
            for msg_id in ids:
                del self._retry_due[(stream, msg_id)]
            commands.append(("EVAL", scripts.TAKE_BACK, 1, stream, c.group, c.consumer, *ids))
        return ReadPlan(tuple(commands), tuple(due), TAKE_BACK, None)

    def _feed_take_back(self, plan: ReadPlan, replies: Sequence[Any]) -> None:
        for stream, reply in zip(plan.streams, replies, strict=True):
            entries, flat_counts = reply[0], reply[1]
            result = self._parse_claimed(stream, entries, flat_counts)
            self.retried_count += len(result.messages)
            self._absorb(result)

    def _reclaim_plan(self, remaining: int) -> ReadPlan:
        c = self.config
        streams, count = self._share(c.streams, remaining)
        count = min(count, MAX_CLAIM)
        commands = tuple(
            (
                "EVAL",
                scripts.RECLAIM,
                2,
                s,
                heartbeat_key(s, c.group),
                c.group,
                c.consumer,
                self._heartbeat_timeout_ms,
                c.claim_idle_ms,
                self._claim_cursor[s],
                count,
            )
            for s in streams
        )
        return ReadPlan(commands, streams, RECLAIM, None)

    def _feed_reclaim(self, plan: ReadPlan, replies: Sequence[Any], now_ms: int) -> None:
        claimed_any = False
        for stream, reply in zip(plan.streams, replies, strict=True):
            cursor, entries, deleted, flat_counts, removed = reply[:5]
            self._claim_cursor[stream] = cmd.as_text(cursor)
            result = self._parse_claimed(stream, entries, flat_counts)
            if deleted:  # already dropped by the server; some we may have counted already
                known = set(self._drops)
                self.deleted_count += sum((stream, cmd.as_text(d)) not in known for d in deleted)
            self.reclaimed_count += len(result.messages)
            claimed_any = claimed_any or bool(result.messages)
            self.removed_consumers.extend(cmd.as_text(x) for x in removed or ())
            self._absorb(result)
        # Keep going while there is more to take; otherwise look again after a heartbeat
        # period, continuing from the cursor so entries behind busy ones are found too.
        if not claimed_any:
            self._next_reclaim_ms = now_ms + self.config.heartbeat_interval_ms

    def _parse_claimed(self, stream: str, entries: Any, flat_counts: Any) -> cmd.ReadResult:
        counts: dict[str, int] = {}
        if flat_counts:
            it = iter(flat_counts)
            counts = {cmd.as_text(i): int(n) for i, n in zip(it, it, strict=False)}
        return cmd.parse_read([[stream, entries or []]], self._names, self.config.encoding, counts)

    def _absorb(self, result: cmd.ReadResult) -> None:
        if result.messages:
            limit = self.config.max_deliveries
            messages = result.messages
            if self.config.max_message_bytes is not None:
                messages = self._within_size(messages)
            for msg in messages:
                if policy.is_overdue(msg.deliveries, limit):
                    self._overdue.append(msg)
                else:
                    self._buffer.append(msg)
        if result.deleted:
            self.deleted_count += len(result.deleted)
            self._drops.extend(result.deleted)
