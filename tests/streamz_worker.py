"""A streamz pipeline in a process of its own, for the crash test:
``python -m tests.streamz_worker URL STREAM CONSUMER OUT_FILE DELAY_S``.

``Stream.from_redis_consumer_group(STREAM, "g", CONSUMER)`` into a sink that sleeps DELAY_S
and appends each message's id to OUT_FILE (flushed, so a kill loses no line written). Prints
``started`` once the pipeline runs; SIGTERM stops the source (acks what left) and the process
prints ``stopped`` and exits 0.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

from streamz import Stream


def main() -> None:
    url, stream, consumer, out_file, delay = sys.argv[1:6]
    delay_s = float(delay)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())

    with open(out_file, "a", encoding="utf-8") as out:

        def handle(message: tuple[str, str, dict[str, Any]]) -> None:
            time.sleep(delay_s)
            out.write(message[1] + "\n")
            out.flush()

        source = Stream.from_redis_consumer_group(
            stream, "g", consumer, url=url, count=10, timeout=0.2, heartbeat_interval=0.1
        )
        source.sink(handle)
        source.start()
        print("started", flush=True)
        stop.wait()
        source.stop()
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
