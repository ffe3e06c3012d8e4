"""Messages of a consumer group, written to a file in batches, one JSON line per batch.

    python docs/examples/streamz_batches_to_file.py --url redis://localhost:6379/0 \
        --stream orders --group archive --consumer archive-1 --out orders.jsonl \
        --every 100 --seconds 5

A batch is written when it holds --every messages, or --seconds after its first message
arrived, whichever comes first. Each line is a JSON list of {"stream", "id", "data"}.

A message is acknowledged only once the batch holding it is written and flushed: if the
process dies before that, the same --consumer gets it again on restart (a batch may then be
written twice; nothing is lost). SIGTERM or Ctrl-C stops it; a batch not yet written stays
pending and comes again on the next start. Needs ``pip install 'conveyor[streamz]'``.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from typing import Any

from streamz import Stream  # conveyor's sources and sink are streamz plugins


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="Redis URL (default: $REDIS_URL)")
    parser.add_argument("--stream", required=True)
    parser.add_argument("--group", default="archive")
    parser.add_argument("--consumer", default="archive-1", help="keep it across restarts")
    parser.add_argument("--out", required=True, help="file the batches are appended to")
    parser.add_argument("--every", type=int, default=100, help="messages per batch")
    parser.add_argument("--seconds", type=float, default=5.0, help="longest wait for a batch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    source = Stream.from_redis_consumer_group(
        args.stream, args.group, args.consumer, url=args.url, count=args.every
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    with open(args.out, "a", encoding="utf-8") as out:

        def write(batch: tuple[tuple[str, str, dict[str, Any]], ...]) -> None:
            rows = [{"stream": s, "id": entry_id, "data": data} for s, entry_id, data in batch]
            out.write(json.dumps(rows) + "\n")
            out.flush()  # add os.fsync(out.fileno()) to survive a power cut, not just a crash

        # partition() holds each message until its batch has been written by write(): only
        # then has the message left the pipeline, and only then does the source acknowledge it.
        source.partition(args.every, timeout=args.seconds).sink(write)

        source.start()  # reads, and runs the pipeline, on streamz's event loop thread
        stop.wait()
        source.stop()  # acknowledges what was written; a partial batch stays pending


if __name__ == "__main__":
    main()
