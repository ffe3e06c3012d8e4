"""The consumer's life, as decisions without I/O: every state transition lives here.

A driver (sync or asyncio) runs the same loop::

    machine.begin_batch(now_ms)
    while (plan := machine.next_read(now_ms)) is not None:
        replies = execute(plan.commands)        # one pipeline, one round trip
        machine.feed(plan, replies, now_ms)
    messages = machine.end_batch()

States per stream: *pending* (re-reading this consumer's own pending entries from id ``0``,
as after a restart or a lost reply) and then *new* (``>``). A lost connection puts every
stream back into *pending*, because entries the server delivered but we never saw are only
found again there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from conveyor._core import commands as cmd
from conveyor.config import ConsumerConfig
from conveyor.models import Message

__all__ = ["ConsumerMachine", "ReadPlan"]


@dataclass(frozen=True, slots=True)
class ReadPlan:
    """One round trip: the commands to pipeline and how long the read may block."""

    commands: tuple[cmd.Command, ...]
    streams: tuple[str, ...]
    pending: bool
    block_ms: int | None

    @property
    def timeout_ms(self) -> int:
        """How long to wait for the replies before the connection counts as dead."""
        return (self.block_ms or 0) + 10_000


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
        self._pending_after: dict[str, str] = dict.fromkeys(config.streams, "0")
        self._buffer: list[Message] = []
        self._deadline_ms = 0
        self._reads = 0
        self._rotation = 0
        self._drops: list[tuple[str, str]] = []
        #: entries found deleted or trimmed while pending, dropped from the pending list
        self.deleted_count = 0
        #: messages handed to the user
        self.delivered_count = 0

    # -- batches -------------------------------------------------------------------------------

    def begin_batch(self, now_ms: int) -> None:
        self._buffer = []
        self._reads = 0
        self._deadline_ms = now_ms + self.config.max_wait_ms

    def next_read(self, now_ms: int) -> ReadPlan | None:
        """The next round trip of this batch, or None when the batch is complete."""
        remaining = self.config.batch_size - len(self._buffer)
        if remaining <= 0:
            return None
        if self._pending_after:
            return self._pending_plan(remaining)
        wait_ms = self._deadline_ms - now_ms
        if wait_ms <= 0 and self._reads > 0:
            return None
        streams, count = self._share(tuple(self.config.streams), remaining)
        block = wait_ms if wait_ms > 0 else None
        read = cmd.xreadgroup(
            self.config.group, self.config.consumer, streams, (">",) * len(streams), count, block
        )
        return ReadPlan((read,), streams, False, block)

    def feed(self, plan: ReadPlan, replies: Sequence[Any], now_ms: int) -> None:
        """Absorb the replies of ``plan`` (errors must have been handled by the driver)."""
        self._reads += 1
        if plan.pending:
            self._feed_pending(plan, replies)
            return
        result = cmd.parse_read(replies[0], self._names, self.config.encoding, 1)
        self._absorb(result)

    def end_batch(self) -> list[Message]:
        batch, self._buffer = self._buffer, []
        self.delivered_count += len(batch)
        return batch

    def take_drops(self) -> list[tuple[str, str]]:
        """``(stream, id)`` of deleted entries to remove from the pending list (XACK them)."""
        drops, self._drops = self._drops, []
        return drops

    # -- faults --------------------------------------------------------------------------------

    def reply_lost(self) -> None:
        """A reply may have been lost: what the server delivered is only in our pending list."""
        self._buffer = []
        self._pending_after = dict.fromkeys(self.config.streams, "0")

    def group_recreated(self) -> None:
        """The group was created again after NOGROUP; its pending list starts empty."""
        self._pending_after = {}

    def setup_commands(self) -> list[cmd.Command]:
        """Create the group on every stream (``BUSYGROUP`` in reply means it exists: fine)."""
        return [
            cmd.xgroup_create(s, self.config.group, self.config.start) for s in self.config.streams
        ]

    # -- internals -----------------------------------------------------------------------------

    def _share(self, streams: tuple[str, ...], remaining: int) -> tuple[tuple[str, ...], int]:
        """Which streams to read and the COUNT for each, so a batch never exceeds its size.

        COUNT applies per stream; with several streams the remaining room is shared, and when
        there is less room than streams, a rotating subset is read.
        """
        n = len(streams)
        if n == 1:
            return streams, remaining
        self._rotation = (self._rotation + 1) % n
        rotated = streams[self._rotation :] + streams[: self._rotation]
        if remaining >= n:
            return rotated, remaining // n
        return rotated[:remaining], 1

    def _pending_plan(self, remaining: int) -> ReadPlan:
        streams, count = self._share(tuple(self._pending_after), remaining)
        ids = tuple(self._pending_after[s] for s in streams)
        c = self.config
        commands: list[cmd.Command] = [
            cmd.xreadgroup(c.group, c.consumer, streams, ids, count, None)
        ]
        # XREADGROUP by id adds one delivery; the XPENDING after it reads the new counts.
        commands.extend(
            cmd.xpending_range(s, c.group, after, count, c.consumer)
            for s, after in zip(streams, ids, strict=True)
        )
        return ReadPlan(tuple(commands), streams, True, None)

    def _feed_pending(self, plan: ReadPlan, replies: Sequence[Any]) -> None:
        counts: dict[str, int] = {}
        for reply in replies[1:]:
            counts.update(cmd.parse_pending_counts(reply))
        result = cmd.parse_read(replies[0], self._names, self.config.encoding, counts)
        self._absorb(result)
        count = int(plan.commands[0][5])
        for stream in plan.streams:
            returned = result.counts.get(stream, 0)
            if returned < count:
                del self._pending_after[stream]  # own pending list read to its end
            else:
                self._pending_after[stream] = result.last_ids[stream]

    def _absorb(self, result: cmd.ReadResult) -> None:
        if result.messages:
            self._buffer.extend(result.messages)
        if result.deleted:
            self.deleted_count += len(result.deleted)
            self._drops.extend(result.deleted)
