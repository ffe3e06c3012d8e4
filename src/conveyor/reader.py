"""StreamReader and AsyncStreamReader: read streams without a consumer group, the position
checkpointed in Redis under a name.

The logic (where reading starts, what to read, what a commit writes) is in
``conveyor._core.reader``; this module only carries its rounds, sync and asyncio, and runs the
handler loop. Blocking XREADs go out on the reader's own connections (``reader_connection``,
whose socket timeout is longer than ``max_wait_ms``), checkpoints through the client's pool.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from conveyor import _cluster, _io
from conveyor._consumer_base import Outage
from conveyor._core import policy
from conveyor._core.reader import Plan, ReaderConfig, ReaderMachine, Round
from conveyor._shutdown import StopNow, graceful, install_async_signals
from conveyor.connection import READ_MARGIN_S, reader_connection
from conveyor.errors import ConfigError
from conveyor.models import Message, describe_error

__all__ = ["AsyncStreamReader", "StreamReader"]

log = logging.getLogger("conveyor.reader")

ReaderHandler = Callable[[list[Message]], Any]


class _ReaderBase:
    """What StreamReader and AsyncStreamReader share: everything but the I/O."""

    _asyncio = False
    _twin = ""

    def __init__(
        self,
        client: Any,
        stream: str | Sequence[str],
        name: str | None,
        *,
        start: str = "$",
        batch_size: int = 100,
        max_wait_ms: int = 1000,
        encoding: str | None = "utf-8",
    ) -> None:
        _io.check_client(client, asyncio=self._asyncio, owner=type(self).__name__, twin=self._twin)
        if isinstance(stream, str | bytes):
            streams: tuple[Any, ...] = (stream,)
        elif isinstance(stream, Sequence):
            streams = tuple(stream)
        else:
            raise ConfigError(
                f"stream must be a str or a sequence of str, got {type(stream).__name__}"
            )
        self.config = ReaderConfig(
            streams=streams,
            name=name,
            start=start,
            batch_size=batch_size,
            max_wait_ms=max_wait_ms,
            encoding=encoding,
        )
        self.client = client
        self._cluster = _cluster.is_cluster(client)
        self._machine = ReaderMachine(self.config, cluster=self._cluster)
        # The reader's own connections for XREAD, by node name ("" on a plain server).
        self._connections: dict[str, Any] = {}
        self._stopping = False
        self._closed = False
        self._read_count = 0

    @property
    def name(self) -> str | None:
        """The checkpoint's name (None: positions kept in memory only)."""
        return self.config.name

    @property
    def streams(self) -> tuple[str, ...]:
        return self.config.streams

    @property
    def position(self) -> dict[str, str]:
        """Per stream: the id of the last entry ``get_batch`` returned (reading continues
        after it); empty until the first ``get_batch`` loaded the checkpoints."""
        return dict(self._machine.position)

    @property
    def committed(self) -> dict[str, str]:
        """Per stream: the checkpoint as last loaded or saved."""
        return dict(self._machine.committed)

    def stop(self) -> None:
        """Ask ``run()`` to end after the batch in hand. Safe from any thread or a signal
        handler; a read in progress ends when it has entries or ``max_wait_ms`` is over."""
        self._stopping = True

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.name!r} streams={list(self.streams)!r} "
            f"read={self._read_count} position={self._machine.position!r}>"
        )

    # -- shared helpers ------------------------------------------------------------------------

    @property
    def _label(self) -> str:
        return self._machine.label

    def _connection(self, node: Any = None) -> Any:
        """The reader's own connection (to ``node`` on a cluster), made on first use."""
        key = _cluster.node_name(node) if node is not None else ""
        conn = self._connections.get(key)
        if conn is None:
            conn = self._connections[key] = reader_connection(
                self.client,
                encoding=self.config.encoding,
                read_timeout_s=self.config.max_wait_ms / 1000 + READ_MARGIN_S,
                name=f"reader:{self.name}" if self.name is not None else "reader",
                node=node,
            )
        return conn

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self._label} is closed")

    def _checked(self, rnd: Round, replies: list[Any]) -> list[Any]:
        """The replies of ``rnd``; an error reply is raised as conveyor's exception (an outage
        such as READONLY or LOADING as ConnectionLost), naming what it answered."""
        for reply, what in zip(replies, rnd.whats, strict=True):
            if isinstance(reply, Exception):
                raise _io.server_error(reply, what, self.client)
        return replies

    def _handed(self, messages: list[Message]) -> list[Message]:
        fresh, self._machine.fresh = self._machine.fresh, {}
        for s, entry_id in fresh.items():
            log.info(
                "%s: no checkpoint on %r: reading after %s (start=%r)",
                self._label,
                s,
                entry_id,
                self.config.start,
            )
        self._read_count += len(messages)
        return messages

    def _handler_failed(self, batch: list[Message], exc: BaseException, attempt: int) -> float:
        """Log a handler's failure, go back to the checkpoint; returns the backoff in seconds
        before the same entries are read and handled again."""
        delay_s = policy.reconnect_delay_ms(attempt) / 1000
        first, last = batch[0], batch[-1]
        log.error(
            "%s: handler failed on %d messages (%s %s .. %s %s): %s; not committed, "
            "retrying in %.1f s",
            self._label,
            len(batch),
            first.stream,
            first.id,
            last.stream,
            last.id,
            describe_error(exc),
            delay_s,
            exc_info=exc if attempt == 1 else None,
        )
        self._machine.rewind()
        return delay_s


class StreamReader(_ReaderBase):
    """Reads one or more streams without a consumer group; the position is checkpointed in
    Redis under ``name``, one key per stream (``{orders}:reader:audit``, the stream's slot).

    Example (``r`` is a client from ``conveyor.connect()``)::

        rd = StreamReader(r, "orders", "audit", start="0")
        batch = rd.get_batch()          # up to batch_size entries after the position
        write_somewhere(batch)
        rd.commit()                     # a restart with this name resumes after them

    Or let it drive: ``rd.run(handler)`` calls ``handler(batch)`` for every batch and commits
    after each, until SIGTERM/SIGINT or ``stop()``. A reader killed before it commits reads
    that batch again: at least once, at most one batch twice.

    ``start`` ("$": after the stream's last entry at the first start; "0": from the beginning;
    or an id: after it) is used only for a stream without a checkpoint; it is resolved to an
    id and saved at once, so a reader restarted before its first commit skips nothing. With
    ``name=None`` nothing is saved: positions live in memory only. Entries trimmed away while
    a reader was stopped are skipped: reading continues at the next entry that exists.

    Several streams: on one server one XREAD reads them all (a batch holds up to
    ``batch_size`` entries in all, oldest first, each stream in order). On a Redis Cluster the
    streams of one hash slot are read together; with several slots each is read without
    blocking, and if none had anything they are waited on in turn, up to 100 ms each, until
    ``max_wait_ms`` is over (an entry may wait that long while another slot is waited on).
    Drive one reader from one thread (``stop()`` works from any).
    """

    _asyncio = False
    _twin = "AsyncStreamReader"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._wake = threading.Event()

    def get_batch(self) -> list[Message]:
        """Up to ``batch_size`` entries after the position, as ``Message(stream, id, fields,
        1)``; waits up to ``max_wait_ms`` on the server when there is none (then ``[]``).

        The first call loads the checkpoints; a checkpoint key holding something other than
        a stream id raises ServerError naming the key.
        """
        self._check_open()
        return self._handed(self._run_plan(self._machine.batch()))

    def commit(self, position: Mapping[str, str] | None = None) -> None:
        """Save ``position`` (default: ``self.position``, everything returned so far) as the
        checkpoint: one SET per stream whose checkpoint changes. Without a name, only
        ``committed`` changes (in memory)."""
        self._run_plan(self._machine.commit(position))

    def run(self, handler: ReaderHandler, *, grace_period_ms: int = 30_000) -> None:
        """Call ``handler(batch)`` for every non-empty batch and commit after it returns,
        until SIGTERM/SIGINT or ``stop()``.

        A handler that raises is logged (the batch's first and last ids), nothing is
        committed, and after a growing backoff the same entries are read and handled again.
        Lost connections and server errors are retried with backoff, logged once; they never
        end the loop. The first signal lets the batch in hand finish within
        ``grace_period_ms`` and commits it; a second stops at once (that batch comes again).
        """
        outage = Outage(self.name or "(unnamed)", "reader")
        failures = 0
        try:
            with graceful(self._label, self.stop, grace_period_ms):
                while not self._stopping:
                    try:
                        if self._machine.position != self._machine.committed:
                            self.commit()  # a commit that failed before
                        batch = self.get_batch()
                        outage.over()
                    except Exception as exc:  # an outage or bad data: never the end of run()
                        self._wake.wait(outage.failed(exc))
                        continue
                    if not batch:
                        continue
                    try:
                        handler(batch)
                    except Exception as exc:
                        failures += 1
                        self._wake.wait(self._handler_failed(batch, exc, failures))
                        continue
                    failures = 0
                    try:
                        self.commit()
                    except Exception as exc:  # committed at the top of the loop
                        self._wake.wait(outage.failed(exc))
        except (StopNow, KeyboardInterrupt):
            log.warning("%s stopped at once; the batch in hand is not committed", self._label)
        finally:
            self.close()

    def stop(self) -> None:
        super().stop()
        self._wake.set()

    def close(self) -> None:
        """Close the reader's connections (nothing is committed here)."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        self._wake.set()
        for conn in self._connections.values():
            conn.disconnect()
        self._connections = {}

    def __enter__(self) -> StreamReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- I/O -----------------------------------------------------------------------------------

    def _run_plan(self, plan: Plan[Any]) -> Any:
        try:
            rnd = next(plan)
            while True:
                rnd = plan.send(self._roundtrip(rnd))
        except StopIteration as done:
            return done.value

    def _roundtrip(self, rnd: Round) -> list[Any]:
        if not rnd.reads:
            replies = _io.pool_roundtrip(self.client, rnd.commands)
        elif self._cluster:
            replies = _io.cluster_roundtrip(self.client, rnd.commands, self._connection)
        else:
            replies = _io.roundtrip(self._connection(), rnd.commands)
        return self._checked(rnd, replies)


class AsyncStreamReader(_ReaderBase):
    """StreamReader's asyncio twin, with the same parameters and semantics.

    Example (``ar`` is ``conveyor.connect(asyncio=True)``)::

        async with AsyncStreamReader(ar, "orders", "audit") as rd:
            batch = await rd.get_batch()
            await rd.commit()
    """

    _asyncio = True
    _twin = "StreamReader"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._current: asyncio.Future[Any] | None = None
        self._stop_now = False

    async def get_batch(self) -> list[Message]:
        """See ``StreamReader.get_batch``. Cancelling it loses nothing: the position moves
        only once a reply is in."""
        self._check_open()
        return self._handed(await self._run_plan(self._machine.batch()))

    async def commit(self, position: Mapping[str, str] | None = None) -> None:
        """See ``StreamReader.commit``."""
        await self._run_plan(self._machine.commit(position))

    async def run(
        self,
        handler: Callable[[list[Message]], Awaitable[Any] | Any],
        *,
        grace_period_ms: int = 30_000,
    ) -> None:
        """See ``StreamReader.run``; ``handler`` may be a coroutine function or a plain one.

        SIGTERM/SIGINT are handled through the running loop (main thread, Unix); the end of
        the grace period or a second signal cancels the handler (its batch is not committed).
        """
        outage = Outage(self.name or "(unnamed)", "reader")
        failures = 0
        loop = asyncio.get_running_loop()
        signals = self._install_signals(loop, grace_period_ms)
        try:
            while not self._stopping:
                try:
                    if self._machine.position != self._machine.committed:
                        await self._step(self.commit())
                    batch = await self._step(self.get_batch())
                    outage.over()
                except Exception as exc:
                    await self._sleep(outage.failed(exc))
                    continue
                if not batch:
                    continue
                try:
                    result = handler(batch)
                    if inspect.isawaitable(result):
                        await self._step(result)
                except Exception as exc:
                    failures += 1
                    await self._sleep(self._handler_failed(batch, exc, failures))
                    continue
                failures = 0
                try:
                    await self._step(self.commit())
                except Exception as exc:
                    await self._sleep(outage.failed(exc))
        except asyncio.CancelledError:
            if not self._stop_now:
                raise
            log.warning("%s stopped at once; the batch in hand is not committed", self._label)
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)
            await self.close()

    async def close(self) -> None:
        """See ``StreamReader.close``."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        connections, self._connections = self._connections, {}
        for conn in connections.values():
            await conn.disconnect()

    async def __aenter__(self) -> AsyncStreamReader:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- I/O -----------------------------------------------------------------------------------

    async def _run_plan(self, plan: Plan[Any]) -> Any:
        try:
            rnd = next(plan)
            while True:
                rnd = plan.send(await self._roundtrip(rnd))
        except StopIteration as done:
            return done.value

    async def _roundtrip(self, rnd: Round) -> list[Any]:
        if not rnd.reads:
            replies = await _io.apool_roundtrip(self.client, rnd.commands)
        elif self._cluster:
            replies = await _io.acluster_roundtrip(self.client, rnd.commands, self._connection)
        else:
            replies = await _io.aroundtrip(self._connection(), rnd.commands)
        return self._checked(rnd, replies)

    async def _step(self, awaitable: Awaitable[Any]) -> Any:
        """Await ``awaitable`` as a step of ``run()`` that a cold stop cancels."""
        self._current = asyncio.ensure_future(awaitable)
        try:
            return await self._current
        finally:
            self._current = None

    async def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def _install_signals(self, loop: asyncio.AbstractEventLoop, grace_period_ms: int) -> list[int]:
        return install_async_signals(
            loop, self._label, self.stop, self._cancel_now, grace_period_ms
        )

    def _cancel_now(self) -> None:
        self._stop_now = True
        if self._current is not None and not self._current.done():
            self._current.cancel()
            # See AsyncConsumer._cancel_now: a cancellation can be swallowed by a write that
            # finishes at that moment; insist until the step is done.
            asyncio.get_running_loop().call_later(0.05, self._cancel_now)
