"""The Scaler's arithmetic without a server: the seed's rule, the window, the hysteresis."""

from __future__ import annotations

import doctest
import itertools
from typing import Any

import pytest

from conveyor import ConfigError
from conveyor._core import scaling
from conveyor._core.scaling import (
    Hysteresis,
    Recommender,
    SampleWindow,
    ScalingPolicy,
    check_rates,
    seed_line,
    seed_rate,
    seed_suggestion,
    target_consumers,
)
from conveyor.models import ScaleSample


def sample(t_ms: int, **kw: Any) -> ScaleSample:
    values: dict[str, Any] = {
        "length": 0,
        "entries_added": 0,
        "lag": 0,
        "pending": 0,
        "consumers": 1,
    }
    values.update(kw)
    return ScaleSample(time_ms=t_ms, **values)


def test_doctests() -> None:
    assert doctest.testmod(scaling).failed == 0


# ---------------------------------------------------------------------------------------------
# The seed's rule


@pytest.mark.parametrize(
    ("lag", "pending", "line"),
    [
        (11, 83, "Consumers should be IN as stream length (11) / pending (83) rate is 13.253%"),
        (
            18,
            79,
            "Consumers should be NO_SCALE as stream length (18) / pending (79) rate is 22.7848%",
        ),
    ],
)
def test_the_seed_lines_word_for_word(lag: int, pending: int, line: str) -> None:
    rate = seed_rate(lag, pending)
    suggestion = seed_suggestion(rate, lag, 2, scale_out_rate=60, scale_in_rate=20)
    assert seed_line(suggestion, lag, pending, rate) == line


@pytest.mark.parametrize(
    ("lag", "pending", "shown"),
    [(0, 0, "0"), (5, 0, "0"), (0, 7, "1"), (1, 1000, "1"), (300, 3, "100"), (1, 2, "50.0")],
)
def test_rate_is_clamped_and_printed_as_the_seed_prints_it(
    lag: int, pending: int, shown: str
) -> None:
    assert str(seed_rate(lag, pending)) == shown


@pytest.mark.parametrize(
    ("rate", "lag", "consumers", "expected"),
    [
        (0, 0, 3, "NO_SCALE"),  # nothing pending, nothing waiting
        (0, 4, 3, "OUT"),  # entries wait and nothing is being worked on
        (13.253, 11, 2, "IN"),
        (13.253, 11, 1, "NO_SCALE"),  # IN needs more than one consumer
        (19.99, 1, 5, "IN"),
        (20, 1, 5, "NO_SCALE"),  # IN is strictly below scale_in_rate
        (59.99, 1, 5, "NO_SCALE"),
        (60, 1, 5, "OUT"),  # OUT from scale_out_rate on, as the seed does
        (100, 1, 1, "OUT"),
    ],
)
def test_suggestion_comparisons(rate: float, lag: int, consumers: int, expected: str) -> None:
    assert seed_suggestion(rate, lag, consumers, scale_out_rate=60, scale_in_rate=20) == expected


@pytest.mark.parametrize(
    ("out", "in_", "needle"),
    [
        (101, 10, "scale_out_rate"),
        (50, -1, "scale_in_rate"),
        ("50", 10, "scale_out_rate"),
        (True, 10, "scale_out_rate"),
        (50, float("nan"), "scale_in_rate"),
        (20, 20, "scale_in_rate .* below scale_out_rate"),
        (20, 60, "scale_in_rate .* below scale_out_rate"),
    ],
)
def test_rates_are_validated_naming_the_argument(out: Any, in_: Any, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        check_rates(out, in_)


# ---------------------------------------------------------------------------------------------
# Policy, window, target


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"min_consumers": -1}, "min_consumers"),
        ({"min_consumers": 5, "max_consumers": 4}, "max_consumers"),
        ({"max_consumers": 0}, "max_consumers"),
        ({"target_drain_s": 0}, "target_drain_s"),
        ({"target_drain_s": float("inf")}, "target_drain_s"),
        ({"stuck_idle_ms": 0}, "stuck_idle_ms"),
        ({"window_s": -1}, "window_s"),
        ({"margin": 1.5}, "margin"),
        ({"confirm": 0}, "confirm"),
        ({"scale_in_cooldown_s": -1}, "scale_in_cooldown_s"),
        ({"per_consumer_rate": 0}, "per_consumer_rate"),
    ],
)
def test_policy_is_validated_naming_the_argument(kw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ScalingPolicy(**kw)


def test_window_measures_arrival_and_processing() -> None:
    w = SampleWindow(60_000)
    w.add(sample(0, entries_added=100, lag=10, pending=5))  # processed 85
    w.add(sample(10_000, entries_added=600, lag=50, pending=20))  # processed 530
    arrival, processing, span_s = w.rates()
    assert (arrival, processing, span_s) == (50.0, 44.5, 10.0)


def test_window_keeps_its_span_but_at_least_two_samples() -> None:
    w = SampleWindow(10_000)
    for t in range(0, 60_001, 5_000):
        w.add(sample(t, entries_added=t))
    assert [s.time_ms for s in w.samples] == [50_000, 55_000, 60_000]
    w.add(sample(600_000, entries_added=600_000))  # decisions further apart than the window
    assert [s.time_ms for s in w.samples] == [60_000, 600_000]
    assert w.rates()[0] == 1000.0


def test_window_starts_over_when_the_stream_was_recreated() -> None:
    w = SampleWindow(60_000)
    w.add(sample(0, entries_added=500))
    w.add(sample(1_000, entries_added=3))
    assert len(w) == 1 and w.rates() == (None, None, 0.0)


def test_rates_unknown_without_counters() -> None:
    w = SampleWindow(60_000)
    w.add(sample(0, entries_added=None))
    w.add(sample(1_000, entries_added=None))
    assert w.rates() == (None, None, 1.0)
    w = SampleWindow(60_000)
    w.add(sample(0, entries_added=10, lag_exact=False, lag=10_000))
    w.add(sample(1_000, entries_added=20, lag_exact=False, lag=10_000))
    assert w.rates() == (10.0, None, 1.0)  # arrivals known, the processed count is not


def test_target_keeps_up_and_delivers_the_lag_within_the_target() -> None:
    p = ScalingPolicy(target_drain_s=100, max_consumers=1000)
    s = sample(0, lag=5_000, pending=1_000, consumers=4)
    # (50/s + 5000 / 100 s) / 10/s per consumer = 10
    assert target_consumers(p, s, 50.0, 10.0)[0] == 10
    assert target_consumers(p, s, 0.0, 10.0)[0] == 5


def test_pending_and_stuck_entries_are_no_reason_for_more_consumers() -> None:
    p = ScalingPolicy(min_consumers=0, target_drain_s=10)
    in_hand = sample(0, lag=0, pending=500, consumers=2)
    stuck = sample(0, lag=0, pending=500, stuck=500, consumers=2)
    assert target_consumers(p, in_hand, 0.0, 10.0)[0] == 1  # someone must finish them
    count, reason = target_consumers(p, stuck, 0.0, 10.0)
    assert count == 1 and "500 stuck pending entries need a reclaim" in reason
    assert target_consumers(p, sample(0, consumers=2), 0.0, 10.0)[0] == 0  # scale to zero


def test_target_without_a_known_capacity() -> None:
    p = ScalingPolicy(min_consumers=0, max_consumers=8)
    assert target_consumers(p, sample(0, consumers=3), 0.0, None) == (
        0,
        "idle: nothing arriving, nothing waiting",
    )
    assert target_consumers(p, sample(0, lag=9, consumers=0), None, None)[0] == 1
    assert target_consumers(p, sample(0, lag=9, consumers=3), 5.0, None)[0] == 3


def test_target_is_bounded_and_says_so() -> None:
    p = ScalingPolicy(min_consumers=2, max_consumers=4, target_drain_s=1)
    count, reason = target_consumers(p, sample(0, lag=1_000, consumers=4), 0.0, 10.0)
    assert count == 4 and "asks 100, bounded to 2..4" in reason
    assert target_consumers(p, sample(0, consumers=4), 0.0, 10.0)[0] == 2


# ---------------------------------------------------------------------------------------------
# Hysteresis, with an injected clock


def test_hysteresis_ignores_flapping() -> None:
    h = Hysteresis(margin=0.1, confirm=3, cooldown_ms=0)
    assert h.step(5, now_ms=0) == 5
    counts = [h.step(t, now_ms=i * 1000) for i, t in enumerate([7, 4, 7, 3, 8, 5, 9, 2], 1)]
    assert counts == [5] * 8


def test_hysteresis_needs_confirm_decisions_and_takes_the_smallest_change() -> None:
    h = Hysteresis(margin=0.1, confirm=3, cooldown_ms=0)
    h.step(4, now_ms=0)
    assert [h.step(t, now_ms=i) for i, t in enumerate([9, 7], 1)] == [4, 4]
    assert h.holding == "2 of 3 decisions agree"
    assert h.step(8, now_ms=3) == 7 and h.holding == ""
    assert h.current == 7 and h.changed_ms == 3


def test_hysteresis_margin_is_relative() -> None:
    h = Hysteresis(margin=0.25, confirm=1, cooldown_ms=0)
    h.step(20, now_ms=0)
    assert h.step(25, now_ms=1) == 20  # within 25 %
    assert h.step(26, now_ms=2) == 26
    small = Hysteresis(margin=0.25, confirm=1, cooldown_ms=0)
    small.step(1, now_ms=0)
    assert small.step(2, now_ms=1) == 2  # one consumer more is always a change


def test_scale_in_waits_for_the_cooldown_scale_out_does_not() -> None:
    h = Hysteresis(margin=0.0, confirm=2, cooldown_ms=60_000)
    h.step(10, now_ms=0)
    assert h.step(4, now_ms=10_000) == 10
    assert h.step(4, now_ms=20_000) == 10  # confirmed, but cooling down
    assert h.step(4, now_ms=59_999) == 10
    assert h.holding == "fewer consumers only 0.001s from now (cooldown)"
    assert h.step(4, now_ms=60_000) == 4
    assert h.step(6, now_ms=60_001) == 4
    assert h.step(6, now_ms=60_002) == 6  # more consumers: no cooldown


# ---------------------------------------------------------------------------------------------
# The recommender over time: a simulated group


class Group:
    """A stream and a group whose consumers each settle ``capacity`` entries per second."""

    def __init__(self, consumers: int, capacity: float, stuck: int = 0) -> None:
        self.consumers = consumers
        self.capacity = capacity
        self.added = self.lag = self.pending = 0
        self.stuck = stuck
        self.t_ms = 0

    def run(self, seconds: int, arrival: int) -> ScaleSample:
        for _ in range(seconds):
            self.added += arrival
            self.lag += arrival
            can = int(self.consumers * self.capacity)
            self.pending = min(self.lag, self.consumers * 5)  # in hand, working
            done = min(self.lag, can)
            self.lag -= done
            self.t_ms += 1000
        return sample(
            self.t_ms,
            entries_added=self.added,
            lag=self.lag,
            pending=self.pending + self.stuck,
            stuck=self.stuck,
            consumers=self.consumers,
        )


def test_recommender_learns_capacity_and_scales_out_then_in() -> None:
    policy = ScalingPolicy(
        max_consumers=50, target_drain_s=60, window_s=30, confirm=2, scale_in_cooldown_s=60
    )
    rec = Recommender(policy)
    group = Group(consumers=2, capacity=10)
    decisions = []
    for _ in range(8):  # 200/s arriving, 2 consumers of 10/s: saturated, backlog grows
        s = group.run(15, arrival=200)
        rec.observe(s)
        decisions.append(rec.recommend(s))
    assert rec.per_consumer_rate == pytest.approx(10.0)
    assert decisions[0].consumers == 2 and decisions[0].reason.startswith("throughput")
    assert decisions[-1].target >= 20 and decisions[-1].consumers >= 20
    group.consumers = decisions[-1].consumers
    counts = []
    for _ in range(30):  # the backlog drains, then 20/s arrive: 2 consumers will do
        s = group.run(15, arrival=20)
        rec.observe(s)
        counts.append(rec.recommend(s).consumers)
        group.consumers = counts[-1]
    assert counts[-1] == 2
    changes = sum(1 for a, b in itertools.pairwise(counts) if a != b)
    assert changes <= 4  # settles, does not flap


def test_recommender_with_a_known_consumer_rate() -> None:
    rec = Recommender(ScalingPolicy(per_consumer_rate=25.0, target_drain_s=10))
    s = sample(0, entries_added=0, lag=1_000, consumers=1)
    rec.observe(s)
    first = rec.recommend(s)
    assert first.target == 4 and first.consumers == 4  # backlog 1000 over 10 s at 25/s each
    assert first.arrival_rate is None and "arrival rate not known" in first.reason
