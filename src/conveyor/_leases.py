"""The entries a consumer holds and renews with its heartbeats, kept per batch, not per entry.

A batch's ids go in as the one list the batch and its ack share; settling the whole batch takes
that list out again. Entries settled one by one (an ack of a single message, a failure, a
dead-letter move, an entry another consumer took over) are noted as gone and left out of what
is renewed; the next ``renewable()`` call compacts them away. So the hot path (a batch in, the
same batch acked) costs a dict insert and a dict pop per batch, whatever its size, and nothing
per message.

>>> leases = Leases(("s",))
>>> ids = ["1-0", "2-0", "3-0"]
>>> leases.hold("s", ids)
>>> leases.forget("s", ["2-0"])
>>> leases.renewable()
{'s': ['1-0', '3-0']}
>>> leases.release("s", ids)
>>> leases.renewable()
{'s': []}
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

__all__ = ["Leases"]


class Leases:
    """Ids held per stream, as the lists they came in; thread-safe (heartbeats read them)."""

    def __init__(self, streams: Sequence[str]) -> None:
        self._held: dict[str, dict[int, list[str]]] = {s: {} for s in streams}
        self._gone: dict[str, set[str]] = {s: set() for s in streams}
        self._lock = threading.Lock()

    def __contains__(self, stream: object) -> bool:
        return stream in self._held

    def hold(self, stream: str, ids: list[str]) -> None:
        """Renew ``ids`` from now on. The list is kept as it is (not copied): the caller must
        not change it; ``release`` with the same list object ends the lease."""
        if ids:
            with self._lock:
                self._held[stream][id(ids)] = ids

    def release(self, stream: str, ids: list[str]) -> None:
        """Stop renewing ``ids``: the very list given to ``hold`` leaves at once; any other
        list is forgotten id by id."""
        with self._lock:
            held = self._held[stream]
            if held.get(id(ids)) is ids:
                del held[id(ids)]
                gone = self._gone[stream]
                if gone:
                    gone.difference_update(ids)
                return
        self.forget(stream, ids)

    def forget(self, stream: str, ids: Iterable[str]) -> None:
        """Stop renewing these ids, wherever they are held."""
        with self._lock:
            if self._held[stream]:
                self._gone[stream].update(ids)

    def renewable(self) -> dict[str, list[str]]:
        """Every id held, per stream, in the order held; compacts what was forgotten."""
        out: dict[str, list[str]] = {}
        with self._lock:
            for stream, held in self._held.items():
                gone = self._gone[stream]
                if not gone:
                    out[stream] = [i for ids in held.values() for i in ids]
                    continue
                kept: dict[int, list[str]] = {}
                for ids in held.values():
                    rest = [i for i in ids if i not in gone]
                    if len(rest) == len(ids):
                        kept[id(ids)] = ids
                    elif rest:
                        kept[id(rest)] = rest
                self._held[stream] = kept
                gone.clear()
                out[stream] = [i for ids in kept.values() for i in ids]
        return out

    def count(self) -> int:
        """How many ids are held (forgotten ones not yet compacted count too)."""
        with self._lock:
            return sum(len(ids) for held in self._held.values() for ids in held.values())
