"""streamz sources and a sink on Redis Streams: the nodes the old ``streamz_redis`` package gave.

After ``import streamz`` (with ``pip install 'conveyor[streamz]'``), streamz finds them through
their entry points::

    source = Stream.from_redis_consumer_group("orders", "billing", "worker-1", url=url)
    source.map(handle).sink_to_redis_stream("handled", url=url)
    source.start()

Each source emits ``(stream, id, data)`` triples, one per message, in order. Reading blocks, so
it happens in a thread of the source's own, never on the event loop; what a message became is
learnt from streamz's reference counting: a message has *left the pipeline* when every node
that held it has released it (a ``partition`` holds its messages until the batch is emitted
downstream and that emission is done).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis.asyncio
import redis.asyncio.cluster

try:
    from streamz.core import RefCounter
    from streamz.sinks import Sink
    from streamz.sources import Source
    from tornado.ioloop import IOLoop
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "conveyor.contrib.streamz needs streamz: pip install 'conveyor[streamz]'"
    ) from exc

from conveyor._consumer_base import Outage, _ConsumerBase
from conveyor.config import check_int
from conveyor.connection import connect
from conveyor.consumer import Consumer, default_consumer_name
from conveyor.errors import ConfigError, FieldTypeError
from conveyor.models import Message
from conveyor.producer import Producer
from conveyor.reader import StreamReader

__all__ = ["from_redis_consumer_group", "from_redis_streams", "sink_to_redis_stream"]

log = logging.getLogger("conveyor.contrib.streamz")

_ASYNC_CLIENTS = (redis.asyncio.Redis, redis.asyncio.cluster.RedisCluster)
#: the streamz keywords a source passes on to ``Stream.__init__``
_STREAMZ_OPTIONS = frozenset({"stream_name", "loop"})
#: Consumer options that a source argument sets, by the argument's name
_SET_BY = {
    "stream": "streams",
    "batch_size": "count",
    "max_wait_ms": "timeout",
    "heartbeat_ms": "heartbeat_interval",
    "claim_idle_ms": "claim_timeout",
    "start": "start_from_backlog",
}
_CONSUMER_OPTIONS = frozenset(inspect.signature(_ConsumerBase.__init__).parameters) - {
    "self",
    "client",
    "stream",
    "group",
}
#: a read blocks at most this long when asked to wait forever (streamz_redis's timeout=0)
_FOREVER_ROUND_MS = 1_000
#: how long stop() waits, beyond one read, for the source to settle and close
_STOP_MARGIN_S = 15.0


def _resolve_client(owner: str, url: str | None, client: Any) -> tuple[Any, bool]:
    """The sync client to use, and whether this node made it (and so closes it)."""
    if url is not None and client is not None:
        raise ConfigError(f"{owner}: give url or client, not both")
    if client is None:
        return connect(url), True
    if isinstance(client, _ASYNC_CLIENTS):
        raise ConfigError(
            f"{owner} reads in a thread of its own: pass a sync client (redis.Redis or "
            f"RedisCluster) or url=..., not a redis.asyncio {type(client).__name__}"
        )
    return client, False


def _stream_names(streams: Any) -> tuple[list[str], dict[str, str]]:
    """Stream names from a name, a list of names or redis-py's ``{name: id}`` dict; and the
    dict's ids (empty for the other forms)."""
    starts: dict[str, str] = {}
    if isinstance(streams, str):
        names = [streams]
    elif isinstance(streams, Mapping):
        names = list(streams)
        starts = {n: v.decode() if isinstance(v, bytes) else str(v) for n, v in streams.items()}
    elif isinstance(streams, list | tuple):
        names = list(streams)
    else:
        raise ConfigError(
            "streams must be a stream name, a list of names or a dict of name: id, "
            f"got {type(streams).__name__}"
        )
    if not names:
        raise ConfigError("streams must name at least one stream")
    for n in names:
        if not isinstance(n, str) or not n:
            raise ConfigError(f"streams must hold non-empty str names, got {n!r}")
    return names, starts


def _seconds_ms(name: str, value: Any, low_ms: int, high_ms: int | None = None) -> int:
    """``value`` seconds in milliseconds, checked against the range (the error in seconds)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number of seconds, got {value!r}")
    ms = round(value * 1000)
    if ms < low_ms or (high_ms is not None and ms > high_ms):
        upper = f" and <= {high_ms / 1000:g}" if high_ms is not None else ""
        raise ConfigError(f"{name} must be >= {low_ms / 1000:g}{upper} seconds, got {value!r}")
    return ms


def _max_wait_ms(timeout: Any) -> int:
    """``timeout`` seconds as a read's block time; 0 or None wait forever, in rounds."""
    if timeout is None:
        return _FOREVER_ROUND_MS
    ms = _seconds_ms("timeout", timeout, 0, 86_400_000)
    return ms or _FOREVER_ROUND_MS


def _split_start(start: Any, owner: str) -> bool:
    """streamz's ``start`` (begin at once) must be a bool here."""
    if not isinstance(start, bool):
        raise ConfigError(
            f"{owner}: start must be True or False (begin reading at once), got {start!r}"
        )
    return start


class _Once:
    """A RefCounter callback that acts on its first call only."""

    __slots__ = ("arg", "fn")

    def __init__(self, fn: Callable[[Message], None], arg: Message) -> None:
        self.fn: Callable[[Message], None] | None = fn
        self.arg = arg

    def __call__(self) -> None:
        fn, self.fn = self.fn, None
        if fn is not None:
            fn(self.arg)


class _RedisSource(Source):  # type: ignore[misc]
    """What both sources share: the read thread, the loop of rounds, emitting with reference
    counts, backoff on failures, and stopping."""

    _owner = "source"

    def __init__(
        self,
        *,
        client: Any,
        owns_client: bool,
        max_wait_ms: int,
        start: bool,
        asynchronous: bool | None,
        streamz_options: dict[str, Any],
    ) -> None:
        self.client = client
        self._owns_client = owns_client
        self._max_wait_ms = max_wait_ms
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._running = False
        self._busy = False
        self._finished = threading.Event()
        self._finished.set()
        self._wakeup: asyncio.Event | None = None
        if asynchronous and streamz_options.get("loop") is None:
            # streamz would otherwise run a source without a loop on its own loop thread
            streamz_options["loop"] = IOLoop.current()
        super().__init__(start=start, asynchronous=asynchronous, **streamz_options)

    # -- what a source does (subclasses) ---------------------------------------------------------

    def _label(self) -> str:
        raise NotImplementedError

    def _outage(self) -> Outage:
        raise NotImplementedError

    def _open(self) -> None:
        """Before the first round of a run (on the loop): a fresh reader if the last closed."""

    async def _read(self) -> Sequence[Message]:
        raise NotImplementedError

    def _emitting(self, msg: Message) -> None:
        """``msg`` is about to be emitted."""

    def _left(self, msg: Message) -> None:
        """``msg`` has left the pipeline (on the loop)."""
        raise NotImplementedError

    def _raised(self, msg: Message, exc: Exception) -> None:
        """The pipeline raised ``exc`` on ``msg`` (on the loop)."""
        raise NotImplementedError

    async def _finish(self) -> None:
        """After the last round: settle what has left, close the reader."""

    def _interrupt(self) -> None:
        """stop() was called (any thread): end a blocked read early if the reader can."""

    # -- the loop --------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once a stopped source has settled what left the pipeline and closed its reader
        (or when it never started)."""
        return self._finished.is_set()

    def start(self) -> None:
        if self.stopped:
            self._running = True
            self._finished.clear()
        super().start()

    def stop(self) -> None:
        """Stop reading; settle what has left the pipeline; close the reader.

        Called from outside the event loop (the usual case with streamz's own loop thread),
        it returns once that is done; on the loop it returns at once and the source closes
        when its current read ends (``closed`` tells).
        """
        super().stop()
        self._interrupt()
        if self._wakeup is not None and self.loop is not None:
            self.loop.add_callback(self._wakeup.set)
        if self._running and not self._on_a_loop():
            self._finished.wait(self._max_wait_ms / 1000 + _STOP_MARGIN_S)

    @staticmethod
    def _on_a_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    async def run(self) -> None:
        while self._busy:  # a run that was stopped is still closing
            await asyncio.sleep(0.01)
        self._busy = True
        self._wakeup = asyncio.Event()
        outage = self._outage()
        try:
            self._open()
            while not self.stopped:
                await asyncio.sleep(0)  # the callbacks of messages that just left run first
                try:
                    messages = await self._read()
                except Exception as exc:  # an outage: never the end of the source
                    await self._pause(outage.failed(exc))
                    continue
                outage.over()
                for msg in messages:
                    if self.stopped:  # the rest stay pending, as if in the pipeline
                        break
                    await self._emit_message(msg)
        finally:
            await asyncio.sleep(0)
            try:
                await self._finish()
            except Exception as exc:
                log.warning("%s: closing failed: %s", self._label(), exc)
            finally:
                if self._executor is not None:
                    self._executor.shutdown(wait=False)
                    self._executor = None
                self._busy = self._running = False
                self._finished.set()

    async def _emit_message(self, msg: Message) -> None:
        # The count starts at one, released here once every node has taken the message in
        # (and any awaitable they returned is done): a message no node holds any longer has
        # left, and one whose pipeline raised never does.
        ref = RefCounter(initial=1, cb=_Once(self._left, msg), loop=self.loop)
        self._emitting(msg)
        try:
            futures = self._emit((msg.stream, msg.id, msg.fields), metadata=[{"ref": ref}])
            if futures:
                await asyncio.gather(*futures)
        except Exception as exc:
            self._raised(msg, exc)
        else:
            ref.release()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in the source's one read thread (the reader is driven from there)."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="conveyor-streamz-read"
            )
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    async def _pause(self, delay_s: float) -> None:
        assert self._wakeup is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), delay_s)


class from_redis_consumer_group(_RedisSource):
    """Emit ``(stream, id, data)`` for each message read as consumer ``consumer`` of
    ``group``, acknowledged once it has left the pipeline.

    ``Stream.from_redis_consumer_group(streams, group, consumer=None, *, url=None,
    client=None, count=100, timeout=1.0, convert=True, encoding="utf-8",
    heartbeat_interval=None, claim_timeout=None, start_from_backlog=True, asynchronous=None,
    start=False, **consumer_options)``

    ``streams``: a name, a list of names, or redis-py's ``{name: id}`` dict (its names). The
    client is ``client`` (a sync ``redis.Redis`` or ``RedisCluster``) or ``connect(url)``;
    neither: ``$REDIS_URL``. ``count`` messages per read, each read waiting up to ``timeout``
    seconds (0 or None: forever). ``data`` is a dict of str, of bytes with ``convert=False``.
    ``consumer=None`` takes a unique name; give a fixed one to get, after a crash, what the
    crashed process held. ``start_from_backlog``: a new group sees the stream's existing
    entries (False: only new ones). A read returns as soon as there are messages, up to
    ``count``. Other keywords go to ``conveyor.Consumer`` as they are (``max_deliveries``,
    ``dead_letter``, ``retry_backoff_ms``, ``linger_ms`` to let a read wait to fill, ...).

    Acknowledgements go out in batches, before each read and on ``stop()``. A message whose
    pipeline raised is failed: it comes back after a backoff, and goes to the dead-letter
    stream on its ``max_deliveries``-th delivery. Messages still in the pipeline when the
    source stops, or when its process dies, stay pending: a restart under the same consumer
    name gets them first, or the other consumers take them once this one's heartbeat is stale.

    Heartbeats: every ``heartbeat_interval`` seconds this consumer says it is alive and
    renews every message handed out until it is acknowledged. Other consumers of the group
    take its messages once they have gone unrenewed for ``claim_timeout`` seconds, or, when
    its heartbeats have stopped, for three heartbeat intervals if that is shorter (15 s with
    the defaults). The heartbeat runs in a thread of the Consumer, and reading in a thread of
    this source, never on the event loop: a pipeline whose functions keep the event loop busy
    (CPU-heavy work) does not stop them. streamz_redis ran its heart in a separate process;
    here it is a thread, and a thread needs the GIL. Pure-Python code releases it every few
    milliseconds, but a C call that holds the GIL for longer than that (``claim_timeout``, or
    three heartbeat intervals) lets the other consumers take the messages: they are then
    processed twice, never lost.

    >>> source = Stream.from_redis_consumer_group("orders", "billing", "w1")  # doctest: +SKIP
    >>> source.map(handle).sink(print); source.start()                        # doctest: +SKIP
    """

    _owner = "from_redis_consumer_group"

    def __init__(
        self,
        streams: Any,
        group: str,
        consumer: str | None = None,
        *,
        url: str | None = None,
        client: Any = None,
        count: int = 100,
        timeout: float | None = 1.0,
        convert: bool = True,
        encoding: str = "utf-8",
        heartbeat_interval: float | None = None,
        claim_timeout: float | None = None,
        start_from_backlog: bool = True,
        asynchronous: bool | None = None,
        **options: Any,
    ) -> None:
        names, _ = _stream_names(streams)
        start = _split_start(options.pop("start", False), self._owner)
        streamz_options = {k: options.pop(k) for k in _STREAMZ_OPTIONS & options.keys()}
        check_int("count", count, 1, 1_000_000)
        if not isinstance(start_from_backlog, bool):
            raise ConfigError(
                f"start_from_backlog must be True or False, got {start_from_backlog!r}"
            )
        for key in options:
            if key in _SET_BY:
                raise ConfigError(f"{self._owner}: pass {_SET_BY[key]}, not {key}")
            if key not in _CONSUMER_OPTIONS:
                raise ConfigError(f"{self._owner} has no option {key!r}")
        max_wait_ms = _max_wait_ms(timeout)
        claim_ms = (
            None if claim_timeout is None else _seconds_ms("claim_timeout", claim_timeout, 20)
        )
        beat_ms = None
        if heartbeat_interval is not None:
            beat_ms = _seconds_ms("heartbeat_interval", heartbeat_interval, 10)
            if beat_ms * 2 > (claim_ms if claim_ms is not None else 60_000):
                raise ConfigError(
                    f"heartbeat_interval ({heartbeat_interval} s) must be at most half of "
                    f"claim_timeout ({claim_ms / 1000 if claim_ms else 60:g} s), or live "
                    "consumers' messages look abandoned and are taken"
                )
        self._consumer_args: dict[str, Any] = {
            "consumer": consumer if consumer is not None else default_consumer_name(),
            "batch_size": count,
            "max_wait_ms": max_wait_ms,
            # a read returns what is there at once, as streamz_redis's XREADGROUP did; entries a
            # read holds back to fill its batch would wait unrenewed
            "linger_ms": 0,
            "start": "0" if start_from_backlog else "$",
            "encoding": encoding if convert else None,
            **({"claim_idle_ms": claim_ms} if claim_ms is not None else {}),
            **({"heartbeat_ms": beat_ms} if beat_ms is not None else {}),
            **options,
        }
        self._streams, self._group = names, group
        client, owns = _resolve_client(self._owner, url, client)
        try:
            #: the Consumer reading for this source (a new one after a restart)
            self.consumer = Consumer(client, names, group, **self._consumer_args)
        except BaseException:
            if owns:
                client.close()
            raise
        # On the loop: messages that left, and messages whose pipeline raised, to settle.
        self._done: list[Message] = []
        self._failed: list[tuple[Message, Exception]] = []
        super().__init__(
            client=client,
            owns_client=owns,
            max_wait_ms=max_wait_ms,
            start=start,
            asynchronous=asynchronous,
            streamz_options=streamz_options,
        )

    def _label(self) -> str:
        return f"consumer {self.consumer.name!r}"

    def _outage(self) -> Outage:
        return Outage(self.consumer.name)

    def _open(self) -> None:
        if self._consumer_closed:
            self.consumer = Consumer(self.client, self._streams, self._group, **self._consumer_args)
            self._consumer_closed = False

    _consumer_closed = False

    def _interrupt(self) -> None:
        self.consumer.stop()

    def _left(self, msg: Message) -> None:
        self._done.append(msg)

    def _raised(self, msg: Message, exc: Exception) -> None:
        log.error(
            "%s: the pipeline raised on message %s of %r (delivery %d): %r; failed, it comes "
            "back after a backoff",
            self._label(),
            msg.id,
            msg.stream,
            msg.deliveries,
            exc,
            exc_info=exc,
        )
        self._failed.append((msg, exc))

    async def _read(self) -> Sequence[Message]:
        await self._settle()
        batch: Sequence[Message] = await self._call(self.consumer.get_batch)
        return batch

    async def _settle(self) -> None:
        acks, fails = self._done, self._failed
        if not acks and not fails:
            return
        self._done, self._failed = [], []
        try:
            await self._call(self._settle_now, self.consumer, acks, fails)
        except BaseException:
            self._done[:0] = acks  # what was not settled goes again with the next round
            self._failed[:0] = fails
            raise

    @staticmethod
    def _settle_now(
        consumer: Consumer, acks: list[Message], fails: list[tuple[Message, Exception]]
    ) -> None:
        """In the read thread: one XACK per stream for what left, then the failures. What went
        out is removed from the lists, so a failure leaves only the rest in them."""
        if acks:
            consumer.ack_many(acks)
            acks.clear()
        while fails:
            msg, exc = fails[0]
            consumer.fail(msg, exc)
            del fails[0]

    async def _finish(self) -> None:
        try:
            await self._settle()
        except Exception as exc:
            log.warning(
                "%s: acknowledging on stop failed: %s; those messages stay pending",
                self._label(),
                exc,
            )
        self._consumer_closed = True  # closing marks it closed, whatever happens next
        await self._call(self._close, self.consumer)

    def _close(self, consumer: Consumer) -> None:
        consumer.close()
        if self._owns_client:
            self.client.close()


class from_redis_streams(_RedisSource):
    """Emit ``(stream, id, data)`` for each entry of ``streams``, read with plain XREAD (no
    group), from ``start`` (``"$"``: only entries added from now on; ``"0"``: all).

    ``Stream.from_redis_streams(streams, *, url=None, client=None, start="$", count=100,
    timeout=1.0, reader=None, convert=True, encoding="utf-8", asynchronous=None, **kwargs)``

    ``reader="name"`` keeps a checkpoint in Redis under that name: per stream, the id of the
    last entry that has left the pipeline with every entry before it. A restarted source with
    the same name resumes at the first entry that had not left. Without ``reader`` the
    position lives in memory only. An entry whose pipeline raised is logged and counts as
    passed (one bad entry must not hold the checkpoint back forever); for retries and dead
    letters use ``from_redis_consumer_group``.

    ``start=True`` or ``False`` (a bool) is streamz's: begin reading at once. ``streams`` may
    be redis-py's ``{name: id}`` dict; its ids, all the same, are the start.

    >>> Stream.from_redis_streams("orders", start="0", reader="audit").sink(print)  # doctest: +SKIP
    """

    _owner = "from_redis_streams"

    def __init__(
        self,
        streams: Any,
        *,
        url: str | None = None,
        client: Any = None,
        start: str | bool = "$",
        count: int = 100,
        timeout: float | None = 1.0,
        reader: str | None = None,
        convert: bool = True,
        encoding: str = "utf-8",
        asynchronous: bool | None = None,
        **kwargs: Any,
    ) -> None:
        names, starts = _stream_names(streams)
        autostart = False
        if isinstance(start, bool):
            autostart, start = start, "$"
        if starts:
            if len(set(starts.values())) > 1:
                raise ConfigError(
                    f"streams: one start id for every stream, got {starts}; read streams that "
                    "start elsewhere with sources of their own"
                )
            start = next(iter(starts.values()))
        for key in kwargs:
            if key not in _STREAMZ_OPTIONS:
                raise ConfigError(f"{self._owner} has no option {key!r}")
        check_int("count", count, 1, 1_000_000)
        max_wait_ms = _max_wait_ms(timeout)
        self._reader_args: dict[str, Any] = {
            "start": start,
            "batch_size": count,
            "max_wait_ms": max_wait_ms,
            "encoding": encoding if convert else None,
        }
        self._streams, self._name = names, reader
        client, owns = _resolve_client(self._owner, url, client)
        try:
            #: the StreamReader reading for this source (a new one after a restart)
            self.reader = StreamReader(client, self._stream_arg(), reader, **self._reader_args)
        except BaseException:
            if owns:
                client.close()
            raise
        # Per stream, on the loop: the entries emitted and not yet passed, in order, each
        # [id, left]; the checkpoint to commit (the last id passed with all before it).
        self._in_flight: dict[str, deque[list[Any]]] = {s: deque() for s in names}
        self._entries: dict[tuple[str, str], list[Any]] = {}
        self._passed: dict[str, str] = {}
        super().__init__(
            client=client,
            owns_client=owns,
            max_wait_ms=max_wait_ms,
            start=autostart,
            asynchronous=asynchronous,
            streamz_options=kwargs,
        )

    def _stream_arg(self) -> str | list[str]:
        return self._streams[0] if len(self._streams) == 1 else list(self._streams)

    def _label(self) -> str:
        return f"reader {self._name!r}" if self._name else "reader"

    def _outage(self) -> Outage:
        return Outage(self._name or "(unnamed)", "reader")

    def _open(self) -> None:
        if self._reader_closed:
            self.reader = StreamReader(
                self.client, self._stream_arg(), self._name, **self._reader_args
            )
            self._reader_closed = False
            for waiting in self._in_flight.values():
                waiting.clear()
            self._entries.clear()

    _reader_closed = False

    def _interrupt(self) -> None:
        self.reader.stop()

    def _emitting(self, msg: Message) -> None:
        entry = [msg.id, False]
        self._in_flight[msg.stream].append(entry)
        self._entries[msg.stream, msg.id] = entry

    def _left(self, msg: Message) -> None:
        entry = self._entries.pop((msg.stream, msg.id), None)
        if entry is None:  # emitted before a restart
            return
        entry[1] = True
        waiting = self._in_flight[msg.stream]
        while waiting and waiting[0][1]:
            self._passed[msg.stream] = waiting.popleft()[0]

    def _raised(self, msg: Message, exc: Exception) -> None:
        log.error(
            "%s: the pipeline raised on entry %s of %r: %r; the checkpoint moves past it",
            self._label(),
            msg.id,
            msg.stream,
            exc,
            exc_info=exc,
        )
        self._left(msg)

    async def _read(self) -> Sequence[Message]:
        await self._commit()
        batch: Sequence[Message] = await self._call(self.reader.get_batch)
        return batch

    async def _commit(self) -> None:
        if self._name is None or not self._passed:
            return
        position, self._passed = self._passed, {}
        try:
            await self._call(self.reader.commit, position)
        except BaseException:
            for stream, msg_id in position.items():  # later ids that passed meanwhile win
                self._passed.setdefault(stream, msg_id)
            raise

    async def _finish(self) -> None:
        try:
            await self._commit()
        except Exception as exc:
            log.warning("%s: saving the checkpoint on stop failed: %s", self._label(), exc)
        self._reader_closed = True
        await self._call(self._close, self.reader)

    def _close(self, reader: Any) -> None:
        reader.close()
        if self._owns_client:
            self.client.close()


class sink_to_redis_stream(Sink):  # type: ignore[misc]
    """Add each element to the stream ``stream_name`` (XADD through ``conveyor.Producer``).

    ``stream.sink_to_redis_stream(stream_name, *, url=None, client=None, maxlen=None)``

    An element is a mapping of fields, or a ``(stream, id, data)`` triple as the sources
    emit (its ``data`` is written). ``maxlen`` trims the stream (approximately) as it grows.
    The element is written before ``update`` returns, so a message from
    ``from_redis_consumer_group`` is acknowledged only once it is in the stream: forwarding is
    at least once.

    >>> source.map(enrich).sink_to_redis_stream("enriched", maxlen=100_000)  # doctest: +SKIP
    """

    def __init__(
        self,
        upstream: Any,
        stream_name: str,
        *,
        url: str | None = None,
        client: Any = None,
        maxlen: int | None = None,
        **kwargs: Any,
    ) -> None:
        for key in kwargs:
            if key not in ("loop", "asynchronous"):
                raise ConfigError(f"sink_to_redis_stream has no option {key!r}")
        client, self._owns_client = _resolve_client("sink_to_redis_stream", url, client)
        #: the Producer that writes the elements
        self.producer = Producer(client, stream_name, maxlen=maxlen)
        super().__init__(upstream, stream_name=stream_name, **kwargs)

    def update(self, x: Any, who: Any = None, metadata: Any = None) -> None:
        if isinstance(x, Mapping):
            fields = x
        elif isinstance(x, tuple | list) and len(x) == 3 and isinstance(x[2], Mapping):
            fields = x[2]
        else:
            raise FieldTypeError(
                f"sink_to_redis_stream({self.producer.stream!r}) takes a mapping of fields or "
                f"a (stream, id, data) triple, got {type(x).__name__}"
            )
        self.producer.send(fields)

    def destroy(self) -> None:
        super().destroy()
        if self._owns_client:
            self.producer.client.close()
