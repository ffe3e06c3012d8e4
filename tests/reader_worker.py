"""A worker for the reader's crash test: ``python -m tests.reader_worker URL STREAM NAME BATCH
DELAY_S``.

Runs ``StreamReader.run`` from the start of STREAM (or after NAME's checkpoint); its handler
prints the id of every entry of a batch (flushed), then sleeps DELAY_S before returning, so
the batch is committed only after that. Ends on SIGTERM/SIGINT and prints ``stopped``.
"""

from __future__ import annotations

import sys
import time

import conveyor
from conveyor import Message, StreamReader


def main() -> None:
    url, stream, name, batch, delay = sys.argv[1:6]
    delay_s = float(delay)

    def handler(batch: list[Message]) -> None:
        sys.stdout.write("".join(f"{m.id}\n" for m in batch))
        sys.stdout.flush()
        time.sleep(delay_s)

    reader = StreamReader(
        conveyor.connect(url), stream, name, start="0", batch_size=int(batch), max_wait_ms=100
    )
    reader.run(handler, grace_period_ms=5000)
    print("stopped", flush=True)


if __name__ == "__main__":
    main()
