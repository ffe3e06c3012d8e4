"""Tail a stream without a consumer group, printing each entry as a JSON line; where it got
to is saved in Redis under --name, so a restart resumes right after the last batch printed.

    python docs/examples/tail_with_checkpoint.py --url redis://localhost:6379/0 \
        --stream orders --name orders-tail --start 0

--start says where to begin the first time only ("$": new entries from now on, "0": the
whole stream, or an id: after it); later runs begin at the checkpoint. SIGTERM or Ctrl-C
stops it after the batch in hand is printed and committed.
"""

from __future__ import annotations

import argparse
import json
import logging

import conveyor
from conveyor import Message, StreamReader


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="Redis URL (default: $REDIS_URL)")
    parser.add_argument("--stream", required=True)
    parser.add_argument("--name", default="tail", help="the checkpoint's name")
    parser.add_argument("--start", default="$", help="where a first run begins")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    reader = StreamReader(conveyor.connect(args.url), args.stream, args.name, start=args.start)

    def show(batch: list[Message]) -> None:
        for msg in batch:
            print(json.dumps({"stream": msg.stream, "id": msg.id, "data": msg.fields}), flush=True)

    # run() hands each batch to show() and commits the checkpoint after it returns; a crash
    # in between prints that batch again on restart (at least once). It returns on
    # SIGTERM/SIGINT, once the batch in hand is done.
    reader.run(show)


if __name__ == "__main__":
    main()
