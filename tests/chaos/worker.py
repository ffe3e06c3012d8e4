"""A consumer process for crash tests: reads, reports what it read as JSON lines, then acts.

    python -m tests.chaos.worker URL STREAM GROUP NAME DRIVER MODE [BATCH]

MODE ``hang``: read one batch, report it, never ack (wait to be killed).
MODE ``ack``: read one batch, report it, ack it, exit.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

import conveyor


def report(batch: Any) -> None:
    rows = [{"id": m.id, "fields": m.fields, "deliveries": m.deliveries} for m in batch]
    print(json.dumps({"batch": rows}), flush=True)


def run_sync(url: str, stream: str, group: str, name: str, mode: str, size: int) -> None:
    c = conveyor.Consumer(
        conveyor.connect(url), stream, group, consumer=name, batch_size=size, max_wait_ms=2000
    )
    batch = c.get_batch()
    report(batch)
    if mode == "hang":
        time.sleep(3600)
    c.ack_many(batch)
    c.close()


async def run_async(url: str, stream: str, group: str, name: str, mode: str, size: int) -> None:
    client = conveyor.connect(url, asyncio=True)
    c = conveyor.AsyncConsumer(
        client, stream, group, consumer=name, batch_size=size, max_wait_ms=2000
    )
    batch = await c.get_batch()
    report(batch)
    if mode == "hang":
        await asyncio.sleep(3600)
    await c.ack_many(batch)
    await c.close()


def main() -> None:
    url, stream, group, name, driver, mode = sys.argv[1:7]
    size = int(sys.argv[7]) if len(sys.argv) > 7 else 50
    if driver == "sync":
        run_sync(url, stream, group, name, mode, size)
    else:
        asyncio.run(run_async(url, stream, group, name, mode, size))


if __name__ == "__main__":
    main()
