"""Crash scenarios with real consumer processes, SIGKILL and a real server of their own.

Each scenario starts its own server (the embedded Valkey, or ``$CONVEYOR_TEST_SERVER``), runs
consumer processes (``tests.chaos.runner``), breaks things, and then accounts for every produced
message with ``tests.chaos.checker``. One summary line per scenario is printed (``pytest -s``)
and written as JSON into the test's tmp directory. Sizes: see ``conftest.py``.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

import conveyor
from conveyor import EmbeddedServer
from conveyor._keys import dead_letter_key, heartbeat_key
from tests.chaos.checker import (
    Kill,
    Record,
    Report,
    account,
    processings,
    read_logs,
    server_state,
)
from tests.chaos.fleet import Fleet, Worker, wait_until

pytestmark = pytest.mark.chaos

STREAM, GROUP = "chaos", "g"
HEARTBEAT_MS = 200  # dead after 600 ms: margin for a loaded 2-core CI machine
CLAIM_IDLE_MS = 2000
BATCH = 20


def server_binary() -> str | None:
    return os.environ.get("CONVEYOR_TEST_SERVER") or None


@contextlib.contextmanager
def own_server(*, appendonly: bool = False) -> Iterator[EmbeddedServer]:
    srv = EmbeddedServer(server_binary(), appendonly=appendonly).start()
    try:
        yield srv
    finally:
        srv.close()


def id_key(msg_id: str) -> tuple[int, int]:
    ms, _, seq = msg_id.partition("-")
    return int(ms), int(seq or 0)


def produce(r: redis.Redis, n: int, start: int = 0, chunk: int = 1000) -> list[str]:
    ids: list[str] = []
    for lo in range(start, start + n, chunk):
        pipe = r.pipeline(transaction=False)
        for i in range(lo, min(lo + chunk, start + n)):
            pipe.xadd(STREAM, {"n": str(i), "p": "x" * 32})
        ids.extend(pipe.execute())
    return ids


def group_info(r: redis.Redis) -> dict[str, Any] | None:
    try:
        for g in r.xinfo_groups(STREAM):
            if g["name"] == GROUP:
                return dict(g)
    except redis.ResponseError:  # no stream yet
        return None
    return None


def delivered_fraction(r: redis.Redis, produced: Sequence[str]) -> float:
    g = group_info(r)
    if g is None or not produced:
        return 0.0
    keys = [id_key(i) for i in produced]
    return bisect.bisect_right(keys, id_key(g["last-delivered-id"])) / len(produced)


def all_settled(r: redis.Redis, last_id: str) -> bool:
    """Everything up to ``last_id`` delivered, and nothing pending."""
    g = group_info(r)
    return g is not None and g["pending"] == 0 and id_key(g["last-delivered-id"]) >= id_key(last_id)


def consumer_names(r: redis.Redis) -> set[str]:
    return {c["name"] for c in r.xinfo_consumers(STREAM, GROUP)}


def worker_args(**overrides: Any) -> list[str]:
    options: dict[str, Any] = {
        "batch_size": BATCH,
        "max_wait_ms": 200,
        "claim_idle_ms": CLAIM_IDLE_MS,
        "heartbeat_ms": HEARTBEAT_MS,
        "max_deliveries": 1000,
        "retry_backoff_ms": 50,
        "retry_backoff_max_ms": 200,
    }
    options.update(overrides)
    args: list[str] = []
    for key, value in options.items():
        args += ["--" + key.replace("_", "-"), str(value)]
    return args


@dataclass
class Scenario:
    """One scenario's server, client, workers, kills, and the accounting at the end."""

    name: str
    server: EmbeddedServer
    tmp: Path
    r: redis.Redis
    fleet: Fleet
    batch_size: int = BATCH
    kills: list[Kill] = field(default_factory=list)
    slots: dict[int, Worker] = field(default_factory=dict)
    generation: int = 0
    t0: float = field(default_factory=time.monotonic)

    def start_workers(self, count: int, extra: Sequence[str] = ()) -> None:
        for slot in range(count):
            self.slots[slot] = self.fleet.start(f"c{slot}", extra)
        self.fleet.wait_ready()

    def kill_random(self, rng: random.Random, restart: str) -> None:
        """SIGKILL one consumer; note what it held; restart it (``new`` or ``same`` name)."""
        ready = [s for s, w in self.slots.items() if w.ready()] or list(self.slots)
        slot = rng.choice(sorted(ready))
        victim = self.slots[slot]
        t = self.fleet.kill(victim)
        rows = self.r.xpending_range(STREAM, GROUP, "-", "+", 100_000, consumername=victim.name)
        inflight = tuple(row["message_id"] for row in rows)
        self.kills.append(Kill(t, victim.name, inflight, restart))
        if restart == "same":
            name = victim.name
        else:
            self.generation += 1
            name = f"c{slot}-{self.generation}"
        self.slots[slot] = self.fleet.start(name)

    def chaos_loop(
        self,
        rng: random.Random,
        restart: str | Callable[[int], str],
        done: Callable[[], bool],
        *,
        every_s: float = 1.0,
        timeout_s: float,
    ) -> None:
        """Kill a random consumer every ``every_s`` until ``done()``."""
        deadline = time.monotonic() + timeout_s
        next_kill = time.monotonic() + every_s
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: not done after {timeout_s:.0f}s")
            self.fleet.check_alive()
            if time.monotonic() >= next_kill:
                mode = restart(len(self.kills)) if callable(restart) else restart
                self.kill_random(rng, mode)
                next_kill += every_s
            time.sleep(0.05)

    def live_names(self) -> set[str]:
        return {w.name for w in self.slots.values()}

    def wait_dead_removed(self, timeout_s: float = 15) -> None:
        """The group lists only the live consumers once their reclaim rounds removed the dead."""
        live = self.live_names()
        try:
            wait_until(lambda: consumer_names(self.r) == live, timeout_s, "dead consumers removed")
        except AssertionError:
            extra = consumer_names(self.r) - live
            raise AssertionError(
                f"{self.name}: consumers {sorted(extra)} still in the group after "
                f"{timeout_s:.0f}s; live: {sorted(live)}; "
                f"XINFO CONSUMERS: {self.r.xinfo_consumers(STREAM, GROUP)}; "
                f"heartbeats: {self.r.hgetall(heartbeat_key(STREAM, GROUP))}"
            ) from None

    def finish(self, produced: Sequence[str], **extra: Any) -> tuple[Report, list[Record]]:
        """Account, stop the workers (warm), check that they left, print and save the report."""
        state = server_state(self.r, STREAM, GROUP)
        records = read_logs(self.fleet.logs())
        codes = self.fleet.stop()
        stats = self.fleet.stats()
        report = account(
            scenario=self.name,
            produced=produced,
            records=records,
            state=state,
            kills=self.kills,
            batch_size=self.batch_size,
            wall_s=time.monotonic() - self.t0,
        )
        report.extra.update(extra)
        report.extra["lost"] = sum(s.get("lost_count") or 0 for s in stats)
        report.extra["stale_acks"] = sum(s.get("stale_ack_count") or 0 for s in stats)
        print("\n" + report.summary(), flush=True)
        report.details.update(exit_codes=codes, stats=stats, kills=self.kills)
        report.write(self.tmp / f"report-{self.name}.json")
        assert all(code == 0 for code in codes.values()), f"warm stop exit codes: {codes}"
        left = consumer_names(self.r)
        assert not left, f"consumers still in the group after a warm stop: {left}"
        return report, records


@contextlib.contextmanager
def scenario(
    name: str, tmp_path: Path, args: Sequence[str], *, appendonly: bool = False
) -> Iterator[Scenario]:
    with own_server(appendonly=appendonly) as srv:
        r = conveyor.connect(srv.url, decode_responses=True)
        fleet = Fleet(tmp_path / "workers", srv.url, STREAM, GROUP, args)
        try:
            yield Scenario(name, srv, tmp_path, r, fleet)
        finally:
            fleet.close()
            r.close()


def assert_kill_accounting(report: Report) -> None:
    assert report.unknown_ids == [], "handlers saw ids nobody produced"
    assert report.processed_and_dead_lettered == [], "processed, and dead-lettered as well"
    assert report.empty_messages == [], "handlers were given messages without fields"
    assert report.missing == [], f"{len(report.missing)} missing, first {report.missing[:10]}"
    assert report.pending == [], f"{len(report.pending)} still pending: {report.pending[:10]}"
    assert report.duplicates <= report.duplicate_bound, report.summary()
    assert report.duplicates_outside_kills == [], (
        f"ids processed twice that no killed consumer held: {report.duplicates_outside_kills[:10]}"
    )
    assert report.unrecovered_after_kill == [] or report.trimmed, report.unrecovered_after_kill


# -- 1 and 2: a random consumer SIGKILLed every second -----------------------------------------


@pytest.mark.parametrize("restart", ["new", "same"])
def test_sigkill_every_second(restart: str, full: bool, tmp_path: Path) -> None:
    n = 20_000 if full else 4_000
    delay_ms = 150 if full else 200
    rng = random.Random(1 if restart == "new" else 2)
    name = f"kill-{restart}-name"
    with scenario(name, tmp_path, worker_args(delay_ms=delay_ms)) as sc:
        produced = produce(sc.r, n)
        sc.start_workers(4)
        sc.chaos_loop(
            rng, restart, lambda: all_settled(sc.r, produced[-1]), timeout_s=400 if full else 100
        )
        sc.wait_dead_removed()
        report, _ = sc.finish(produced)
    assert report.kills >= (10 if full else 4), "the run was too short to kill often"
    assert_kill_accounting(report)
    assert report.dead_lettered == []
    assert report.processed == n
    assert set(report.consumers) == sc.live_names()


# -- 3: poison messages -------------------------------------------------------------------------


def test_poison_messages_are_dead_lettered_after_three_deliveries(
    full: bool, tmp_path: Path
) -> None:
    n = 10_000 if full else 2_000
    args = worker_args(
        delay_ms=20, poison_mod=100, max_deliveries=3, retry_backoff_ms=50, retry_backoff_max_ms=200
    )
    with scenario("poison", tmp_path, args) as sc:
        produced = produce(sc.r, n)
        sc.start_workers(4)
        wait_until(
            lambda: sc.fleet.check_alive() or all_settled(sc.r, produced[-1]),
            120 if full else 60,
            "every message settled",
        )
        dead = [f for _, f in sc.r.xrange(dead_letter_key(STREAM))]
        report, records = sc.finish(produced)
    poison = {produced[i] for i in range(0, n, 100)}
    assert report.missing == [] and report.pending == [] and report.empty_messages == []
    assert set(report.dead_lettered) == poison, "exactly the poison messages are dead-lettered"
    assert len(dead) == len(poison), "one dead-letter entry per poison message"
    by_id = processings(records)
    for entry in dead:
        msg_id = entry["conveyor.origin_id"]
        assert entry["conveyor.deliveries"] == "3", entry
        assert entry["conveyor.origin_stream"] == STREAM and entry["conveyor.group"] == GROUP
        assert entry["n"] == str(produced.index(msg_id)) and "poison" in entry["conveyor.error"]
        seen = by_id[msg_id]
        assert [(r.kind, r.deliveries) for r in seen] == [("F", 1), ("F", 2), ("F", 3)], seen
    healthy = set(produced) - poison
    assert report.processed == len(healthy) and report.duplicates == 0
    assert not {r.id for r in records if r.kind == "P"} & poison
    # No consumer stalled: every consumer kept processing healthy messages.
    per_worker = Counter(r.worker for r in records if r.kind == "P")
    assert len(per_worker) == 4 and min(per_worker.values()) > 0, per_worker


# -- 4: the server SIGKILLed and restarted -------------------------------------------------------


def test_server_sigkill_and_restart(full: bool, tmp_path: Path) -> None:
    n = 20_000 if full else 4_000
    delay_ms = 100 if full else 150
    server_kills = 3 if full else 1
    downtime_s = 1.0
    with scenario("server-kill", tmp_path, worker_args(delay_ms=delay_ms), appendonly=True) as sc:
        produced = produce(sc.r, n)
        sc.start_workers(4)
        outages = []
        for k in range(server_kills):
            mark = (k + 1) / (server_kills + 1)
            wait_until(
                lambda mark=mark: (
                    sc.fleet.check_alive() or delivered_fraction(sc.r, produced) > mark
                ),
                120,
                f"{mark:.0%} delivered",
            )
            t = time.monotonic()
            sc.server.kill()
            time.sleep(downtime_s)
            sc.server.start()
            restarted_ms = time.time_ns() // 1_000_000
            sc.r.connection_pool.disconnect()
            outages.append(round(time.monotonic() - t, 2))

        def settled() -> bool:
            sc.fleet.check_alive()
            try:
                return all_settled(sc.r, produced[-1])
            except redis.ConnectionError:
                return False

        wait_until(settled, 300 if full else 90, "every message settled after the restarts")
        live = {f"{w.name}.{w.seq}" for w in sc.fleet.live}
        report, records = sc.finish(produced, server_kills=server_kills, outages_s=outages)
    # The same processes carried on: each reconnected by itself and processed after the restart.
    after = {r.worker for r in records if r.t_ms > restarted_ms}
    assert after == live, f"workers that processed nothing after the restart: {live - after}"
    assert report.missing == [] and report.pending == [] and report.empty_messages == []
    assert report.dead_lettered == [] and report.processed == n
    bound = server_kills * 4 * BATCH
    assert report.duplicates <= bound, f"{report.duplicates} duplicates > {bound}"


# -- 5: a handler three times slower than claim_idle_ms ------------------------------------------


def test_slow_handler_keeps_its_message(full: bool, tmp_path: Path) -> None:
    n = 3_000 if full else 1_500
    slow_n = 30
    slow_ms = 3 * CLAIM_IDLE_MS
    args = worker_args(delay_ms=40, slow_n=slow_n, slow_ms=slow_ms)
    with scenario("slow-handler", tmp_path, args) as sc:
        produced = produce(sc.r, n)
        sc.start_workers(4)
        wait_until(
            lambda: sc.fleet.check_alive() or all_settled(sc.r, produced[-1]),
            120,
            "every message settled",
        )
        report, records = sc.finish(produced)
    slow_id = produced[slow_n]
    seen = processings(records, "PFE")[slow_id]
    assert len(seen) == 1, f"the slow message was handled more than once: {seen}"
    slow = seen[0]
    assert slow.done_ms - slow.t_ms >= slow_ms
    assert report.missing == [] and report.pending == [] and report.dead_lettered == []
    assert report.duplicates == 0, f"duplicates without any crash: {report.summary()}"
    assert report.extra["lost"] == 0 and report.extra["stale_acks"] == 0
    # The others were working meanwhile (reclaim rounds included).
    others = [r for r in records if r.worker != slow.worker]
    assert any(slow.t_ms < r.t_ms < slow.done_ms for r in others)


# -- 6: trimming while entries are pending -------------------------------------------------------


class TrimmingProducer(threading.Thread):
    """Appends at a steady rate and trims the stream to ``maxlen`` entries as it goes."""

    def __init__(self, url: str, per_tick: int, tick_s: float, maxlen: int, trim_every: int):
        super().__init__(daemon=True)
        self.r = conveyor.connect(url, decode_responses=True)
        self.per_tick, self.tick_s = per_tick, tick_s
        self.maxlen, self.trim_every = maxlen, trim_every
        self.ids: list[str] = []
        self.trimmed = 0
        self.halt = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            tick = 0
            while not self.halt.wait(self.tick_s):
                self.ids += produce(self.r, self.per_tick, start=len(self.ids))
                tick += 1
                if tick % self.trim_every == 0:
                    self.trimmed += int(self.r.xtrim(STREAM, maxlen=self.maxlen, approximate=False))
        except BaseException as exc:
            self.error = exc
        finally:
            self.r.close()


def test_trimming_while_pending(full: bool, tmp_path: Path) -> None:
    produce_s = 30 if full else 10
    rng = random.Random(6)
    with scenario("trim", tmp_path, worker_args(delay_ms=150)) as sc:
        producer = TrimmingProducer(sc.server.url, 40, 0.05, maxlen=400, trim_every=4)
        sc.start_workers(4)
        producer.start()
        try:
            sc.chaos_loop(
                rng,
                lambda k: "same" if k % 2 else "new",
                lambda: not producer.is_alive() or time.monotonic() - sc.t0 > produce_s,
                timeout_s=produce_s + 30,
            )
        finally:
            producer.halt.set()
            producer.join(30)
        assert producer.error is None, producer.error
        produced = producer.ids
        wait_until(
            lambda: sc.fleet.check_alive() or all_settled(sc.r, produced[-1]),
            60,
            "every message settled after the producer stopped",
        )
        sc.wait_dead_removed()
        stats = sc.fleet.stats()
        report, _records = sc.finish(
            produced,
            xtrim_removed=producer.trimmed,
            deleted_seen=sum(s.get("deleted_count") or 0 for s in stats),
        )
    # Entries a killed consumer held unacked, by what happened to them after the kill.
    after_kill: Counter[str] = Counter()
    never, unrecovered = set(report.trimmed), set(report.unrecovered_after_kill)
    for kill in sc.kills:
        for msg_id in kill.inflight:
            if msg_id in never:
                fate = "trimmed"  # lost to trimming while pending
            elif msg_id in unrecovered:
                fate = "trimmed-after-processing"  # processed, killed before its ack, trimmed
            else:
                fate = "redelivered"
            after_kill[f"{fate}-{kill.restart}"] += 1
    lost_pending = sum(1 for kill in sc.kills for msg_id in kill.inflight if msg_id in never)
    print(
        f"chaos[trim] entries removed by XTRIM: {producer.trimmed}; trimmed before any handler "
        f"finished them: {len(report.trimmed)}, of which {lost_pending} while pending (held "
        f"unacked by a killed consumer); fate of killed consumers' entries: "
        f"{dict(sorted(after_kill.items()))}; consumers' deleted_count: "
        f"{report.extra['deleted_seen']}, stale acks: {report.extra['stale_acks']}",
        flush=True,
    )
    assert report.empty_messages == [], f"messages without fields: {report.empty_messages[:10]}"
    assert report.pending == [], f"trimmed entries left in the pending list: {report.pending[:10]}"
    assert_kill_accounting(report)
    assert report.trimmed, "the scenario trimmed nothing: it does not test what it should"
    assert lost_pending, "no pending entry was trimmed: the scenario missed its point"
    assert set(report.consumers) == sc.live_names()


# -- 7: a forwarding stage: exactly one output per input ------------------------------------------

#: the forwarding stage's output stream, in the input stream's slot (so it also runs on a cluster)
FORWARDED = "{" + STREAM + "}:out"


def stall(sc: Scenario, rng: random.Random) -> int:
    """SIGSTOP a worker that holds entries until the others have reclaimed and finished every
    one of them, then SIGCONT it: it wakes up in the middle of its batch and finishes it late,
    as a consumer thought dead does. Returns how many entries it held."""
    for worker in rng.sample(list(sc.slots.values()), len(sc.slots)):
        worker.proc.send_signal(signal.SIGSTOP)
        rows = sc.r.xpending_range(STREAM, GROUP, "-", "+", 100_000, consumername=worker.name)
        held = {row["message_id"] for row in rows}
        if held:
            break
        worker.proc.send_signal(signal.SIGCONT)
    else:
        return 0

    def taken_and_done() -> bool:
        rows = sc.r.xpending_range(STREAM, GROUP, "-", "+", 100_000)
        return not held & {row["message_id"] for row in rows}

    try:
        wait_until(taken_and_done, 60, "the stalled worker's entries reclaimed and finished")
    finally:
        worker.proc.send_signal(signal.SIGCONT)
    return len(held)


def test_forwarding_stage_is_exactly_once_through_sigkills(full: bool, tmp_path: Path) -> None:
    """Three workers forward every message to the next stream (``batch.forward``); two of them
    are stalled (SIGSTOP) until the others have taken over and forwarded what they held, then
    resumed to finish late; then one at a time is SIGKILLed, six times (at full size: twenty).
    Every input id is in the output stream exactly once, whoever finished it, and nothing is
    pending."""
    n = 10_000 if full else 3_000
    kills = 20 if full else 6
    rng = random.Random(7)
    args = worker_args(delay_ms=100, forward=FORWARDED)
    with scenario("forward", tmp_path, args) as sc:
        produced = produce(sc.r, n)
        sc.start_workers(3)
        wait_until(lambda: delivered_fraction(sc.r, produced) > 0.05, 60, "work under way")
        stalled = [stall(sc, rng), stall(sc, rng)]
        sc.chaos_loop(
            rng,
            "new",
            lambda: len(sc.kills) >= kills and all_settled(sc.r, produced[-1]),
            every_s=0.7,
            timeout_s=400 if full else 120,
        )
        sc.wait_dead_removed()
        outputs = Counter(fields["src"] for _, fields in sc.r.xrange(FORWARDED))
        report, _records = sc.finish(produced, forwarded=sum(outputs.values()))
    missing = [i for i in produced if outputs[i] == 0]
    twice = {i: k for i, k in outputs.items() if k > 1}
    print(
        f"chaos[forward] {n} inputs, {len(sc.kills)} SIGKILLs, stalls holding {stalled}, "
        f"{sum(outputs.values())} outputs: "
        f"{len(missing)} missing, {len(twice)} duplicated, {len(report.pending)} pending; "
        f"handled twice (side effects outside Redis would repeat): {report.duplicates}",
        flush=True,
    )
    assert len(sc.kills) >= kills and all(stalled), stalled
    assert missing == [], f"{len(missing)} inputs never forwarded, first {missing[:10]}"
    assert twice == {}, f"{len(twice)} inputs forwarded more than once: {list(twice.items())[:10]}"
    assert set(outputs) == set(produced), "outputs of ids nobody produced"
    assert report.pending == [] and report.missing == [] and report.dead_lettered == []
