"""AsyncConsumer: the asyncio driver of the consumer machine (a task for heartbeats).

Everything but the I/O loops lives in ``_consumer_base``; ``Consumer`` is its sync twin.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from conveyor import _io
from conveyor._consumer_base import (
    AHEAD,
    FAN_OUT_MARGIN_S,
    Ahead,
    Outage,
    _ConsumerBase,
    now_ms,
)
from conveyor._core import commands as cmd
from conveyor._core.machine import NEW, ReadPlan
from conveyor._shutdown import StopNow, install_async_signals
from conveyor._startup import acheck_server
from conveyor.errors import ConnectionLost, HandlerTimeout
from conveyor.models import Batch, Message, describe_error

__all__ = ["AsyncConsumer"]

log = logging.getLogger("conveyor.consumer")


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
        # On a cluster: the blocking reads in flight, by (node, slot).
        self._reads: dict[tuple[str, int], tuple[asyncio.Task[Any], Any]] = {}

    async def get_batch(self) -> Batch:
        """See ``Consumer.get_batch``. Cancelling it loses nothing: entries the server delivered
        meanwhile are read again from this consumer's pending list."""
        return await self._read_batch(deferred=False)

    async def ack(self, msg: Message) -> int:
        """Acknowledge one message; returns 1, or 0 if it was no longer pending."""
        return await self.ack_many((msg,))

    async def ack_many(self, messages: Iterable[Message]) -> int:
        """Acknowledge many messages in one round trip (one XACK per stream, pipelined)."""
        before = self.acked_count
        commands = self._ack_commands(messages)
        if commands:
            await self._send(commands)
        return self.acked_count - before

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

    async def forward(
        self, msg: Message, stream: Any, fields: Mapping[Any, Any] | None = None
    ) -> list[str]:
        """See ``Consumer.forward``."""
        commands = self._forward_commands([(msg, self._outputs(msg, stream, fields))])
        replies = await _io.apool_roundtrip(self.client, commands)
        self._count_replies(commands, replies)
        return [cmd.parse_id(i) for i in replies[0][0]]

    async def run(
        self, handler: Callable[[Batch], Awaitable[Any] | Any], *, grace_period_ms: int = 30_000
    ) -> None:
        """See ``Consumer.run``; ``handler`` may be a coroutine function or a plain one.

        SIGTERM/SIGINT are handled through the running loop (main thread, Unix); the grace
        period cancels a handler that is still running, which fails its unsettled messages.
        """
        outage = Outage(self.name)
        loop = asyncio.get_running_loop()
        signals = self._install_signals(loop, grace_period_ms)
        try:
            while not self._stopping:
                try:
                    batch = await self._step(self._read_batch(deferred=True))
                    outage.over()
                except StopNow:
                    raise
                except Exception as exc:  # an outage or bad data: never the end of run()
                    await self._sleep(outage.failed(exc))
                    continue
                if not batch:
                    continue
                await self._read_ahead()
                error: BaseException | None = None
                self._handling = (batch, now_ms())
                try:
                    await self._handle(handler, batch)
                except StopNow:
                    raise
                except (Exception, asyncio.CancelledError) as exc:
                    if isinstance(exc, asyncio.CancelledError) and self._stop_now:
                        raise StopNow() from None
                    error = exc
                    if isinstance(exc, HandlerTimeout):
                        await self._give_up(batch)
                    else:
                        self._handler_failed(batch, exc)
                self._handled(batch, error)
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
        ahead, self._ahead = self._ahead, None
        try:
            if ahead is not None:
                await self._close_ahead(ahead)
            if self._unsent:
                await self._flush_unsent()
            await self._give_back()
            if self._ready:
                await _io.apool_roundtrip(self.client, self._leave_commands())
        except Exception as exc:
            log.warning("consumer %r could not leave group %r: %s", self.name, self.group, exc)
        finally:
            self._abandon_reads()
            for conn in (self._reader, *self._controls.values(), *self._retire_readers()):
                if conn is not None:
                    await conn.disconnect()

    async def __aenter__(self) -> AsyncConsumer:
        if not self._ready:
            await self._setup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- I/O -----------------------------------------------------------------------------------

    def _install_signals(self, loop: asyncio.AbstractEventLoop, grace_period_ms: int) -> list[int]:
        return install_async_signals(loop, self.name, self.stop, self._cancel_now, grace_period_ms)

    def _cancel_now(self) -> None:
        self._stop_now = True
        if self._current is not None and not self._current.done():
            self._current.cancel()
            # Python 3.11's asyncio.wait_for (redis-py wraps every write in it) can swallow a
            # cancellation that lands just as the write finishes: insist until it is done.
            asyncio.get_running_loop().call_later(0.05, self._cancel_now)

    async def _step(self, awaitable: Awaitable[Any]) -> Any:
        """Await ``awaitable`` as a cancellable step of ``run()`` (a cold stop cancels it)."""
        self._current = asyncio.ensure_future(awaitable)
        try:
            return await self._current
        finally:
            self._current = None

    async def _handle(self, handler: Callable[[Batch], Awaitable[Any] | Any], batch: Batch) -> None:
        """Call the handler; a coroutine past ``handler_timeout_ms`` is cancelled."""
        result = handler(batch)
        if not inspect.isawaitable(result):
            return
        limit = self.config.handler_timeout_ms
        if limit is None:
            await self._step(result)
            return
        try:
            await self._step(asyncio.wait_for(result, limit / 1000))
        except TimeoutError:
            if self._stop_now:
                raise
            raise HandlerTimeout(
                f"handler cancelled after handler_timeout_ms={limit} on a batch of {len(batch)}"
            ) from None

    async def _give_up(self, batch: Batch) -> None:
        try:
            await _io.apool_roundtrip(self.client, self._give_up_commands(batch))
        except Exception as exc:  # not renewed any more: taken after claim_idle_ms instead
            log.warning("consumer %r: could not give up the batch at once: %s", self.name, exc)

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
        first, self._ahead = self._ahead, None
        m.begin_batch(self._began_ms(first))
        self._plan_units()
        split = not deferred and not self._cluster
        queue = [first] if first is not None else []  # see Consumer._read_batch
        try:
            while (step := await self._batch_step(queue, split)) is not None:
                plan, carry, raw = step
                if plan.kind == NEW:
                    # the server works on the next read while this reply is parsed
                    if deferred and m.fills(raw[len(carry) :]):
                        await self._read_ahead()
                    elif split and (rest := m.rest_ahead(plan, raw[len(carry) :])) is not None:
                        queue.append(await self._send_ahead(rest))
                replies = self._carried(carry, raw)
                plan, replies = self._without_split_slots(plan, replies)
                if self._read_errors(plan, replies):
                    self._warn_recreate()
                    await self._setup()
                    m.group_recreated()
                else:
                    m.feed(plan, replies, now_ms())
        except BaseException:
            # A reply lost, or an error after earlier reads of this batch delivered entries:
            # what the server delivered is only in our pending list now.
            m.reply_lost()
            self._abandon_reads()
            await self._drop_ahead(queue)
            raise
        after = self._after_read_commands()
        if after:  # refused or cut off: they ride with the next read instead
            try:
                replies = await _io.apool_roundtrip(self.client, after)
            except ConnectionLost:
                self._unsent.extend(after)
            else:
                self._count_replies(after, replies, keep=True)
        return self._handed_out(m.end_batch(), deferred)

    async def _batch_step(
        self, queue: list[Ahead], split: bool
    ) -> tuple[ReadPlan, list[cmd.Command], list[Any]] | None:
        """See ``Consumer._batch_step``."""
        if queue:
            taken = queue.pop(0)
            return taken.plan, taken.carry, await self._collect(taken)
        plan = self._machine.next_read(now_ms(), split=split)
        if plan is None:
            return None
        carry, commands = self._carry(plan)
        try:
            return plan, carry, await self._roundtrip(plan, carry, commands)
        except BaseException:
            self._unsent[:0] = carry  # safe to send again: acks, moves are idempotent
            raise

    async def _read_ahead(self) -> None:
        """See ``Consumer._read_ahead``: a task reads its replies (and notes what it delivered,
        so it is renewed while the handler works)."""
        plan = self._next_ahead()
        if plan is not None:
            self._ahead = await self._send_ahead(plan)

    async def _send_ahead(self, plan: ReadPlan) -> Ahead:
        """See ``Consumer._send_ahead``: a task reads the replies."""
        carry, commands = self._carry(plan)
        ahead = Ahead(plan, carry, commands, now_ms())
        try:
            await _io.asend(self._reader, ahead.commands)
        except Exception as exc:  # raised where its replies are collected
            ahead.error = exc
        else:
            ahead.task = asyncio.ensure_future(_io.areceive(self._reader, ahead.commands))
            ahead.task.add_done_callback(lambda task: self._ahead_done(ahead, task))
        return ahead

    def _ahead_done(self, ahead: Ahead, task: asyncio.Task[Any]) -> None:
        if not ahead.collected and not task.cancelled() and task.exception() is None:
            self._note_delivered(AHEAD, task.result())

    async def _drop_ahead(self, queue: list[Ahead]) -> None:
        """See ``Consumer._drop_ahead``."""
        dropped = [*queue, *([self._ahead] if self._ahead is not None else [])]
        self._ahead = None
        for ahead in dropped:
            if ahead.task is not None:
                ahead.task.cancel()
        if dropped:
            await self._reader.disconnect(nowait=True)
        for ahead in reversed(dropped):
            self._unsent[:0] = ahead.carry

    async def _collect(self, ahead: Ahead) -> list[Any]:
        ahead.collected = True
        if ahead.replies is None and ahead.error is None:
            try:
                ahead.replies = await ahead.task
            except Exception as exc:
                ahead.error = exc
            except BaseException:
                self._unsent[:0] = ahead.carry
                raise
        return self._ahead_replies(ahead)

    async def _close_ahead(self, ahead: Ahead) -> None:
        """See ``Consumer._close_ahead``."""
        if ahead.replies is None and ahead.error is None:
            if self._stop_now:
                ahead.task.cancel()
                await self._reader.disconnect(nowait=True)
                ahead.error = ConnectionLost("stopped at once")
            else:
                try:
                    ahead.replies = await ahead.task
                except Exception as exc:
                    ahead.error = exc
        give_back = self._ahead_closed(ahead)
        if give_back:
            await _io.apool_roundtrip(self.client, give_back)

    async def _roundtrip(
        self, plan: ReadPlan, carry: list[cmd.Command], commands: tuple[cmd.Command, ...]
    ) -> list[Any]:
        """See ``Consumer._roundtrip``."""
        if not self._cluster:
            return await _io.aroundtrip(self._reader, commands)
        if plan.kind != NEW:
            return await self._on_nodes(commands)
        done = await self._on_nodes(carry) if carry else []
        return done + await self._fan_out(plan)

    async def _on_nodes(self, commands: Sequence[cmd.Command]) -> list[Any]:
        replies = await _io.acluster_roundtrip(self.client, commands, self._control)
        if self._stale_map:
            await self._refresh()
        return replies

    async def _refresh(self) -> None:
        try:
            await self.client.nodes_manager.initialize()
        except Exception as exc:
            log.debug("consumer %r: reading the slot map failed: %s", self.name, exc)
            return
        self._map_refreshed()

    async def _fan_out(self, plan: ReadPlan) -> list[Any]:
        """See ``Consumer._fan_out``: one task per blocking read."""
        now = now_ms()
        self._start_reads(plan, now)
        wait_s = (plan.block_ms or 0) / 1000
        if not self._reads:  # every slot paused for a moment: wait, never spin
            await asyncio.sleep(max(min(self._pause_ms(now) / 1000, wait_s), 0.001))
            return []
        await asyncio.wait(
            [t for t, _ in self._reads.values()],
            timeout=wait_s + FAN_OUT_MARGIN_S,
            return_when=asyncio.FIRST_COMPLETED,
        )
        try:
            return self._finished_reads(self._reads)
        finally:
            if self._stale_map:
                await self._refresh()

    def _start_reads(self, plan: ReadPlan, now: int) -> None:
        for key, node, commands, _asking in self._sendable(plan, self._reads, now):
            reader = self._unit_reader(key, node)
            task = asyncio.ensure_future(_io.aroundtrip(reader, commands))
            task.add_done_callback(self._delivered)
            self._reads[key] = (task, node)

    def _abandon_reads(self) -> None:
        if self._cluster:
            reads, self._reads = self._reads, {}
            for task, _node in reads.values():
                task.cancel()  # a cancelled read disconnects its connection
            self._readers = {}

    async def _give_back(self) -> None:
        """See ``Consumer._give_back``."""
        reads, self._reads = self._reads, {}
        messages = self._unhandled(reads)
        if messages:
            await _io.apool_roundtrip(self.client, self._give_back_commands(messages))

    async def _setup(self) -> None:
        await acheck_server(self.client, self.streams[0])
        self._setup_outcome(await _io.apool_roundtrip(self.client, self._setup_commands()))
        if self._noack:  # nothing of its own is ever pending: no heartbeats to send
            return
        await self._beat()
        if self._heartbeat_task is None:
            self._heartbeat_task = asyncio.ensure_future(self._heartbeat_loop())

    async def _beat(self) -> None:
        sent = self._heartbeat_commands()
        replies = await _io.apool_roundtrip(self.client, [c for _, c in sent])
        again = self._renew_only(sent, replies)
        if again:
            more = await _io.apool_roundtrip(self.client, [c for _, c in again])
            for (i, command), reply in zip(again, more, strict=True):
                sent[i], replies[i] = (sent[i][0], command), reply
        self._heartbeat_outcome(sent, replies)

    async def _heartbeat_loop(self) -> None:
        interval_s = self.config.heartbeat_interval_ms / 1000
        failing = False
        while not self._closed:
            await asyncio.sleep(interval_s)
            try:
                await self._beat()
                if failing:
                    log.warning("consumer %r: heartbeats resumed", self.name)
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning("consumer %r: heartbeat failed: %s; retrying", self.name, exc)
                failing = True
