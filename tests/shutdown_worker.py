"""A worker for shutdown tests:
``python -m tests.shutdown_worker URL STREAM NAME DRIVER DELAY_S [noack]``.

Prints ``handling N`` when a batch of N arrives, sleeps DELAY_S in the handler, acks the batch,
prints ``acked N``; ``run()`` returns on SIGTERM/SIGINT and the process prints ``left``.
"""

from __future__ import annotations

import asyncio
import sys
import time

import conveyor
from conveyor import Batch


def main() -> None:
    url, stream, name, driver, delay = sys.argv[1:6]
    delay_s = float(delay)

    def handler(batch: Batch) -> None:
        print(f"handling {len(batch)}", flush=True)
        time.sleep(delay_s)
        batch.ack_all()
        print(f"acked {len(batch)}", flush=True)

    kw = {"consumer": name, "batch_size": 10, "max_wait_ms": 100, "heartbeat_ms": 100}
    if sys.argv[6:] == ["noack"]:
        kw["noack"] = True
    if driver == "sync":
        conveyor.Consumer(conveyor.connect(url), stream, "g", **kw).run(
            handler, grace_period_ms=5000
        )
    else:

        async def main_async() -> None:
            c = conveyor.AsyncConsumer(conveyor.connect(url, asyncio=True), stream, "g", **kw)

            async def ahandler(batch: Batch) -> None:
                print(f"handling {len(batch)}", flush=True)
                await asyncio.sleep(delay_s)
                batch.ack_all()
                print(f"acked {len(batch)}", flush=True)

            await c.run(ahandler, grace_period_ms=5000)

        asyncio.run(main_async())
    print("left", flush=True)


if __name__ == "__main__":
    main()
