"""Accounting for the crash suite: where did every produced message end up?

Inputs: the ids the producer got back, the workers' logs (see ``runner``), and the server's view
at the end: the group's pending list, the dead-letter stream, the consumers of the group and the
ids still in the stream. Every produced id lands in exactly one bucket:

- *processed*: logged as processed (``P``) at least once; more than once is a duplicate;
- *dead-lettered*: in the dead-letter stream (processed as well is reported apart);
- *pending*: still in the group's pending list;
- *trimmed*: never processed and no longer in the stream (removed by a trim);
- *missing*: none of the above: lost.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conveyor._keys import dead_letter_key


@dataclass(frozen=True, slots=True)
class Record:
    kind: str  # P processed, F failed on purpose, E empty message handed out
    id: str
    deliveries: int
    t_ms: int  # the handler received it
    done_ms: int  # the handler was done with it (the ack follows)
    worker: str


@dataclass(frozen=True, slots=True)
class Kill:
    """One SIGKILL of a consumer process: when, whom, and what it held unacked."""

    t_ms: int
    name: str
    inflight: tuple[str, ...]
    restart: str = ""  # "new" or "same": the name of the process started in its place


@dataclass(slots=True)
class ServerState:
    pending: dict[str, tuple[str, int]]  # id -> (consumer, deliveries)
    dead_letters: list[dict[str, str]]
    consumers: list[dict[str, Any]]
    in_stream: set[str]
    info: dict[str, Any] = field(default_factory=dict)


def read_logs(paths: Iterable[Path]) -> list[Record]:
    """Every complete line of every worker log (a line cut by SIGKILL is ignored: its message
    was not acked, so it comes again)."""
    records = []
    for path in sorted(set(paths)):
        worker = path.stem
        text = path.read_text(encoding="utf-8") if path.exists() else ""
        for line in text.splitlines(keepends=True):
            if not line.endswith("\n"):
                continue
            parts = line.split()
            if len(parts) != 5 or parts[0] not in ("P", "F", "E"):
                continue
            kind, msg_id, deliveries, received, done = parts
            records.append(Record(kind, msg_id, int(deliveries), int(received), int(done), worker))
    return records


def _text(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def server_state(r: Any, stream: str, group: str, dead_letter: str | None = None) -> ServerState:
    """What the server says at the end (``r`` a redis.Redis, any decode_responses)."""
    pending: dict[str, tuple[str, int]] = {}
    start = "-"
    while True:
        rows = r.xpending_range(stream, group, min=start, max="+", count=1000)
        for row in rows:
            pending[_text(row["message_id"])] = (
                _text(row["consumer"]),
                int(row["times_delivered"]),
            )
        if len(rows) < 1000:
            break
        start = "(" + _text(rows[-1]["message_id"])
    dead = []
    for _, fields in r.xrange(dead_letter or dead_letter_key(stream)):
        dead.append({_text(k): _text(v) for k, v in fields.items()})
    consumers = [
        {_text(k): _text(v) if isinstance(v, bytes) else v for k, v in c.items()}
        for c in r.xinfo_consumers(stream, group)
    ]
    in_stream: set[str] = set()
    start = "-"
    while True:
        entries = r.xrange(stream, min=start, max="+", count=5000)
        in_stream.update(_text(i) for i, _ in entries)
        if len(entries) < 5000:
            break
        start = "(" + _text(entries[-1][0])
    info = r.info("server")
    return ServerState(pending, dead, consumers, in_stream, info)


def server_label(info: dict[str, Any]) -> str:
    if "valkey_version" in info:
        return f"valkey-{info['valkey_version']}"
    return f"{info.get('server_name', 'redis')}-{info.get('redis_version', '?')}"


@dataclass
class Report:
    scenario: str
    server: str
    produced: int
    kills: int
    processed: int
    processed_once: int
    duplicates: int  # extra processings beyond the first
    duplicated_ids: int
    duplicate_bound: int
    inflight_at_kills: int
    duplicates_outside_kills: list[str]
    missing: list[str]
    dead_lettered: list[str]
    processed_and_dead_lettered: list[str]
    pending: list[str]
    trimmed: list[str]
    empty_messages: list[str]
    unknown_ids: list[str]
    reclaim_latency_ms: list[int]  # per kill: until its in-flight ids reached a handler again
    processed_latency_ms: list[int]  # per kill: until they were processed
    unrecovered_after_kill: list[str]
    consumers: list[str]
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)  # shown in the summary line
    details: dict[str, Any] = field(default_factory=dict)  # only in the JSON file

    def latency_text(self) -> str:
        lat, done = self.reclaim_latency_ms, self.processed_latency_ms
        if not lat:
            return "n/a"
        return (
            f"median={statistics.median(lat):.0f}ms p90={_quantile(lat, 0.9):.0f}ms "
            f"max={max(lat)}ms (n={len(lat)}; until processed: "
            f"median={statistics.median(done):.0f}ms max={max(done)}ms)"
        )

    def summary(self) -> str:
        parts = [
            f"chaos[{self.scenario}] server={self.server}",
            f"produced={self.produced}",
            f"kills={self.kills}",
            f"processed={self.processed}",
            f"duplicates={self.duplicates} (ids={self.duplicated_ids}, "
            f"bound={self.duplicate_bound}, in-flight at kills={self.inflight_at_kills})",
            f"missing={len(self.missing)}",
            f"dead-lettered={len(self.dead_lettered)}",
            f"pending={len(self.pending)}",
            f"trimmed={len(self.trimmed)}",
            f"empty={len(self.empty_messages)}",
            f"reclaim-latency={self.latency_text()}",
            f"consumers={len(self.consumers)}",
        ]
        parts += [f"{k}={v}" for k, v in self.extra.items()]
        parts.append(f"wall={self.wall_s:.1f}s")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["missing_count"] = len(self.missing)
        data["summary"] = self.summary()
        return data

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=1, sort_keys=True, default=_plain))


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"not serializable: {type(value).__name__}")


def _quantile(values: Sequence[int], q: float) -> float:
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


def reclaim_latencies(
    kills: Sequence[Kill], records: Sequence[Record]
) -> tuple[list[int], list[int], list[str]]:
    """Per kill with something in flight: ms from the SIGKILL until the last of the dead
    consumer's unacked ids reached a handler again, and until it was processed (the handler
    done with it). Also the ids never seen again after their kill."""
    seen: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for rec in records:
        seen[rec.id].append((rec.t_ms, rec.done_ms))
    for times in seen.values():
        times.sort()
    reached: list[int] = []
    processed: list[int] = []
    unrecovered: list[str] = []
    for kill in kills:
        if not kill.inflight:
            continue
        worst_reached = worst_done = 0
        complete = True
        for msg_id in kill.inflight:
            after = [t for t in seen.get(msg_id, ()) if t[0] >= kill.t_ms]
            if not after:
                complete = False
                unrecovered.append(msg_id)
                continue
            worst_reached = max(worst_reached, after[0][0] - kill.t_ms)
            worst_done = max(worst_done, after[0][1] - kill.t_ms)
        if complete:
            reached.append(worst_reached)
            processed.append(worst_done)
    return reached, processed, unrecovered


def account(
    *,
    scenario: str,
    produced: Sequence[str],
    records: Sequence[Record],
    state: ServerState,
    kills: Sequence[Kill] = (),
    batch_size: int = 0,
    wall_s: float = 0.0,
) -> Report:
    produced_set = set(produced)
    processed = Counter(r.id for r in records if r.kind == "P")
    dead = {d.get("conveyor.origin_id", "") for d in state.dead_letters}
    pending = set(state.pending)
    missing, trimmed = [], []
    for msg_id in produced:
        if msg_id in processed or msg_id in dead or msg_id in pending:
            continue
        if msg_id not in state.in_stream:
            trimmed.append(msg_id)
        else:
            missing.append(msg_id)
    inflight_ids = {i for k in kills for i in k.inflight}
    duplicated = sorted((i for i, n in processed.items() if n > 1), key=_id_key)
    latencies, processed_latencies, unrecovered = reclaim_latencies(kills, records)
    unknown = sorted({r.id for r in records} - produced_set, key=_id_key)
    return Report(
        scenario=scenario,
        server=server_label(state.info),
        produced=len(produced),
        kills=len(kills),
        processed=len(processed),
        processed_once=sum(1 for n in processed.values() if n == 1),
        duplicates=sum(n - 1 for n in processed.values()),
        duplicated_ids=len(duplicated),
        duplicate_bound=len(kills) * batch_size,
        inflight_at_kills=sum(len(k.inflight) for k in kills),
        duplicates_outside_kills=[i for i in duplicated if i not in inflight_ids],
        missing=sorted(missing, key=_id_key),
        dead_lettered=sorted(dead & produced_set, key=_id_key),
        processed_and_dead_lettered=sorted(dead & set(processed), key=_id_key),
        pending=sorted(pending, key=_id_key),
        trimmed=sorted(trimmed, key=_id_key),
        empty_messages=sorted({r.id for r in records if r.kind == "E"}, key=_id_key),
        unknown_ids=unknown,
        reclaim_latency_ms=latencies,
        processed_latency_ms=processed_latencies,
        unrecovered_after_kill=unrecovered,
        consumers=sorted(str(c.get("name")) for c in state.consumers),
        wall_s=wall_s,
    )


def _id_key(msg_id: str) -> tuple[int, int]:
    ms, _, seq = msg_id.partition("-")
    return int(ms), int(seq or 0)


def processings(records: Sequence[Record], kinds: str = "PF") -> dict[str, list[Record]]:
    """Records per id, in log time order, of the given kinds."""
    out: dict[str, list[Record]] = defaultdict(list)
    for rec in sorted(records, key=lambda r: r.t_ms):
        if rec.kind in kinds:
            out[rec.id].append(rec)
    return out
