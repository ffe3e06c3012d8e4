"""Workers for fault tests: ``Consumer.run()`` in a thread, or ``AsyncConsumer.run()`` on an
event loop of its own in a thread, with a handler that records what it saw."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

import conveyor
from conveyor import AsyncConsumer, Consumer
from conveyor.models import Batch


def wait_for(condition: Callable[[], bool], timeout_s: float = 30, what: str = "") -> None:
    """Wait until ``condition()`` holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what or condition}")
        time.sleep(0.01)


def fill(r: redis.Redis, stream: str, n: int, **fields: Any) -> list[str]:
    pipe = r.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(stream, {"n": str(i), **fields})
    return [x.decode() if isinstance(x, bytes) else x for x in pipe.execute()]


class Worker:
    """One consumer running ``run(handler)`` in the background.

    ``handler`` defaults to acking everything. ``seen`` lists ``(id, deliveries)`` of every
    message handed to the handler; ``processed`` the ids acked by the default handler.
    """

    def __init__(
        self,
        kind: str,
        url: str,
        stream: str | list[str],
        group: str,
        handler: Callable[[Worker, Batch], Any] | None = None,
        **options: Any,
    ) -> None:
        self.kind = kind
        self.url = url
        self.stream = stream
        self.group = group
        self.options = options
        self.user_handler = handler
        self.seen: list[tuple[str, int]] = []
        self.processed: set[str] = set()
        self.consumer: Any = None
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)

    def start(self) -> Worker:
        self._thread.start()
        self._ready.wait(10)
        return self

    def _record(self, batch: Batch) -> None:
        with self.lock:
            self.seen.extend((m.id, m.deliveries) for m in batch)

    def _default(self, batch: Batch) -> None:
        batch.ack_all()
        with self.lock:
            self.processed.update(m.id for m in batch)

    def handle(self, batch: Batch) -> Any:
        self._record(batch)
        if self.user_handler is not None:
            return self.user_handler(self, batch)
        return self._default(batch)

    def _main(self) -> None:
        try:
            if self.kind == "sync":
                client = conveyor.connect(self.url)
                self.consumer = Consumer(client, self.stream, self.group, **self.options)
                self._ready.set()
                self.consumer.run(self.handle, grace_period_ms=5_000)
                client.close()
            else:
                asyncio.run(self._amain())
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            self._ready.set()

    async def _amain(self) -> None:
        client = conveyor.connect(self.url, asyncio=True)
        self.consumer = AsyncConsumer(client, self.stream, self.group, **self.options)
        self._ready.set()

        async def handle(batch: Batch) -> Any:
            result = self.handle(batch)
            if asyncio.iscoroutine(result):
                return await result
            return result

        await self.consumer.run(handle, grace_period_ms=5_000)
        await client.aclose()

    def finish(self, ids: set[str], what: str = "every message processed") -> None:
        """Wait until every id in ``ids`` was processed, check that ``run()`` is still going,
        then stop it."""
        wait_for(lambda: self.processed >= ids, what=what)
        assert self.alive, "run() ended by itself"
        self.stop()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 30) -> None:
        if self.consumer is not None:
            self.consumer.stop()
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"{self.kind} worker did not stop"
        assert self.error is None, f"run() raised {self.error!r}"
