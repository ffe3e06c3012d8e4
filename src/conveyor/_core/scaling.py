"""The Scaler's arithmetic: the seed-compatible rate, and our recommendation with hysteresis.

Every state transition of the recommendation lives here: ``SampleWindow`` keeps the samples of
the rate window, ``Hysteresis`` decides when a new consumer count is adopted, ``Recommender``
combines them. No I/O and no clock: time comes from the samples (server time, ``time_ms``).

The seed's rule, kept exactly (the output of ``redis-streams``' Scaler)::

    rate = 0 if pending == 0 else round(clamp(lag / pending * 100, 1, 100), 4)
    OUT       when pending == 0 and lag > 0 (work waits and nothing is being worked on)
    NO_SCALE  when pending == 0 and lag == 0
    IN        when rate < scale_in_rate and the group has more than one consumer
    OUT       when rate >= scale_out_rate
    NO_SCALE  otherwise
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from conveyor.config import check_int
from conveyor.errors import ConfigError
from conveyor.models import NO_SCALE, SCALE_IN, SCALE_OUT, ScaleSample

__all__ = [
    "Hysteresis",
    "Recommendation",
    "Recommender",
    "SampleWindow",
    "ScalingPolicy",
    "check_rates",
    "seed_line",
    "seed_rate",
    "seed_suggestion",
    "target_consumers",
]

#: samples kept at most, whatever the window (a caller sampling in a tight loop)
MAX_SAMPLES = 10_000


# ---------------------------------------------------------------------------------------------
# The seed's rule


def _check_percent(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{name} must be a number from 0 to 100, got {value!r}")
    if not 0 <= value <= 100:
        raise ConfigError(f"{name} must be from 0 to 100, got {value}")
    return float(value)


def check_rates(scale_out_rate: object, scale_in_rate: object) -> None:
    """Both thresholds are percentages, ``scale_in_rate`` below ``scale_out_rate``.

    >>> check_rates(60, 20)
    >>> check_rates(20, 60)
    Traceback (most recent call last):
    conveyor.errors.ConfigError: scale_in_rate (60.0) must be below scale_out_rate (20.0)
    """
    out = _check_percent("scale_out_rate", scale_out_rate)
    in_ = _check_percent("scale_in_rate", scale_in_rate)
    if in_ >= out:
        raise ConfigError(f"scale_in_rate ({in_}) must be below scale_out_rate ({out})")


def seed_rate(lag: int, pending: int) -> int | float:
    """The seed's rate, as the seed computes it: undelivered per pending entry, in percent,
    clamped to 1..100 and rounded to 4 places (an int where a bound or 0 applies, which is how
    the seed prints it).

    >>> seed_rate(11, 83), seed_rate(18, 79), seed_rate(0, 5), seed_rate(500, 5), seed_rate(3, 0)
    (13.253, 22.7848, 1, 100, 0)
    """
    if pending == 0:
        return 0
    return round(max(min(lag / pending * 100, 100), 1), 4)


def seed_suggestion(
    rate: float, lag: int, consumers: int, scale_out_rate: float, scale_in_rate: float
) -> str:
    """``OUT``, ``IN`` or ``NO_SCALE`` by the seed's rule (see the module docstring).

    >>> seed_suggestion(13.253, 11, 2, 60, 20), seed_suggestion(13.253, 11, 1, 60, 20)
    ('IN', 'NO_SCALE')
    """
    if rate == 0:
        return SCALE_OUT if lag > 0 else NO_SCALE
    if rate < scale_in_rate and consumers > 1:
        return SCALE_IN
    if rate >= scale_out_rate:
        return SCALE_OUT
    return NO_SCALE


def seed_line(suggestion: str, lag: int, pending: int, rate: int | float) -> str:
    """The seed's sentence, word for word; what it calls "stream length" is the group's lag.

    >>> seed_line("IN", 11, 83, seed_rate(11, 83))
    'Consumers should be IN as stream length (11) / pending (83) rate is 13.253%'
    """
    return (
        f"Consumers should be {suggestion} as stream length ({lag}) / pending ({pending}) "
        f"rate is {rate}%"
    )


# ---------------------------------------------------------------------------------------------
# Our recommendation


@dataclass(frozen=True, kw_only=True, slots=True)
class ScalingPolicy:
    """How the Scaler turns rates into a consumer count.

    ``target_drain_s``: the backlog should be gone within this long, on top of keeping up with
    arrivals. ``stuck_idle_ms``: a pending entry idle this long is stuck (it needs a reclaim,
    not another consumer). ``window_s``: the span of samples the rates are measured over.
    ``margin``: a new count is considered only when it differs from the current one by more
    than this fraction of it (always at least by one); ``confirm``: ... for this many decisions
    in a row; ``scale_in_cooldown_s``: and never fewer consumers sooner than this after a change.
    ``per_consumer_rate``: entries per second one consumer handles, if known; otherwise it is
    learnt from the samples.

    >>> ScalingPolicy(max_consumers=8).target_drain_s
    60.0
    """

    min_consumers: int = 1
    max_consumers: int = 64
    target_drain_s: float = 60.0
    stuck_idle_ms: int = 60_000
    window_s: float = 60.0
    margin: float = 0.1
    confirm: int = 3
    scale_in_cooldown_s: float = 120.0
    per_consumer_rate: float | None = None

    def __post_init__(self) -> None:
        check_int("min_consumers", self.min_consumers, 0)
        check_int("max_consumers", self.max_consumers, max(1, self.min_consumers))
        _check_positive("target_drain_s", self.target_drain_s)
        check_int("stuck_idle_ms", self.stuck_idle_ms, 1)
        _check_positive("window_s", self.window_s)
        _check_number("margin", self.margin, 0.0, 1.0)
        check_int("confirm", self.confirm, 1, 1000)
        _check_number("scale_in_cooldown_s", self.scale_in_cooldown_s, 0.0, None)
        if self.per_consumer_rate is not None:
            _check_positive("per_consumer_rate", self.per_consumer_rate)


def _check_number(name: str, value: object, low: float, high: float | None) -> None:
    number = value if isinstance(value, int | float) and not isinstance(value, bool) else None
    if number is None or math.isnan(number) or number < low or (high is not None and number > high):
        upper = f" and <= {high}" if high is not None else ""
        raise ConfigError(f"{name} must be a number >= {low}{upper}, got {value!r}")


def _check_positive(name: str, value: object) -> None:
    _check_number(name, value, 0.0, None)
    if value in (0, math.inf):
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


class SampleWindow:
    """The samples of the last ``window_ms`` (at least the two newest, so rates exist even when
    decisions are further apart than the window), oldest first.

    >>> w = SampleWindow(60_000)
    >>> w.add(ScaleSample(time_ms=0, length=0, entries_added=0, lag=0, pending=0, consumers=1))
    >>> w.add(ScaleSample(time_ms=2_000, length=10, entries_added=10, lag=0, pending=4,
    ...                   consumers=1))
    >>> w.rates()
    (5.0, 3.0, 2.0)
    """

    def __init__(self, window_ms: int) -> None:
        self.window_ms = window_ms
        self.samples: deque[ScaleSample] = deque(maxlen=MAX_SAMPLES)

    def __len__(self) -> int:
        return len(self.samples)

    def add(self, sample: ScaleSample) -> None:
        if self.samples:
            last = self.samples[-1]
            added, before = sample.entries_added, last.entries_added
            # A clock or counter going backwards: another server, or the stream was recreated.
            if sample.time_ms < last.time_ms or (
                added is not None and before is not None and added < before
            ):
                self.samples.clear()
        self.samples.append(sample)
        start = sample.time_ms - self.window_ms
        while len(self.samples) > 2 and self.samples[1].time_ms <= start:
            self.samples.popleft()

    def rates(self) -> tuple[float | None, float | None, float]:
        """``(arrival, processing, span_s)``: entries added and settled per second between the
        oldest and the newest sample; a rate is None when the server does not report what it
        needs (Redis before 7.0, or a lag it could only estimate), or with one sample."""
        if len(self.samples) < 2:
            return None, None, 0.0
        first, last = self.samples[0], self.samples[-1]
        span_s = (last.time_ms - first.time_ms) / 1000
        if span_s <= 0:
            return None, None, 0.0
        arrival = processing = None
        if first.entries_added is not None and last.entries_added is not None:
            arrival = max(0.0, (last.entries_added - first.entries_added) / span_s)
        done_first, done_last = first.processed, last.processed
        if done_first is not None and done_last is not None:
            processing = max(0.0, (done_last - done_first) / span_s)
        return arrival, processing, span_s


class Hysteresis:
    """Adopts a new consumer count only when the targets of ``confirm`` decisions in a row all
    differ from the current count, in the same direction, by more than ``margin`` of it (and by
    at least one); the count adopted is the smallest change they all asked for. Fewer
    consumers also wait ``cooldown_ms`` after the last change; more do not (a backlog grows).
    The first decision is adopted as it is.

    >>> h = Hysteresis(margin=0.1, confirm=2, cooldown_ms=0)
    >>> [h.step(t, now_ms=i) for i, t in enumerate([4, 6, 4, 7, 8, 8])]
    [4, 4, 4, 4, 7, 7]
    """

    def __init__(self, *, margin: float, confirm: int, cooldown_ms: int) -> None:
        self.margin = margin
        self.confirm = confirm
        self.cooldown_ms = cooldown_ms
        #: the count in force, None before the first decision
        self.current: int | None = None
        self.changed_ms = 0
        #: why the last step kept the current count though the target differed ("" if not)
        self.holding = ""
        self._direction = 0
        self._streak: list[int] = []

    def step(self, target: int, now_ms: int) -> int:
        """The count in force after one more decision whose arithmetic asked for ``target``."""
        self.holding = ""
        if self.current is None:
            self.current, self.changed_ms = target, now_ms
            return target
        current = self.current
        direction = 0
        if abs(target - current) > self.margin * current and target != current:
            direction = 1 if target > current else -1
        if direction == 0:
            self._direction, self._streak = 0, []
            return current
        if direction != self._direction:
            self._direction, self._streak = direction, []
        self._streak.append(target)
        del self._streak[: -self.confirm]
        cooled = direction > 0 or now_ms - self.changed_ms >= self.cooldown_ms
        if len(self._streak) < self.confirm:
            self.holding = f"{len(self._streak)} of {self.confirm} decisions agree"
        elif not cooled:
            left_s = (self.changed_ms + self.cooldown_ms - now_ms) / 1000
            self.holding = f"fewer consumers only {left_s:g}s from now (cooldown)"
        else:
            self.current = min(self._streak) if direction > 0 else max(self._streak)
            self.changed_ms = now_ms
            self._direction, self._streak = 0, []
        return self.current


@dataclass(frozen=True, slots=True)
class Recommendation:
    """What ``Recommender.recommend`` worked out: the count in force (after hysteresis), what the
    arithmetic asked for, why, and the rates it used."""

    consumers: int
    target: int
    reason: str
    arrival_rate: float | None
    processing_rate: float | None
    window_s: float
    per_consumer_rate: float | None


def target_consumers(
    policy: ScalingPolicy,
    sample: ScaleSample,
    arrival: float | None,
    per_consumer: float | None,
) -> tuple[int, str]:
    """How many consumers keep up with ``arrival`` (entries/s) and deliver the lag within
    ``target_drain_s`` when each handles ``per_consumer`` entries/s; clamped to the policy's
    bounds, and at least one while anything is pending or waiting.

    The backlog is the lag alone: pending entries are in the hands of consumers already (more
    consumers cannot take them), and stuck ones need a reclaim, not a consumer.

    >>> p = ScalingPolicy(target_drain_s=10)
    >>> s = ScaleSample(time_ms=0, length=0, entries_added=0, lag=400, pending=100, consumers=2)
    >>> target_consumers(p, s, 20.0, 10.0)[0]   # (20/s + 400 / 10 s) / 10/s per consumer
    6
    """
    lag = sample.lag
    drain_s = policy.target_drain_s
    if per_consumer is None or per_consumer <= 0:
        if lag == 0 and sample.pending == 0 and not arrival:
            count, reason = policy.min_consumers, "idle: nothing arriving, nothing waiting"
        elif sample.consumers == 0:
            count, reason = 1, f"lag {lag}, pending {sample.pending} and no consumer"
        else:
            count, reason = sample.consumers, "throughput per consumer not known yet"
    elif arrival is None:
        count = max(sample.consumers, _ceil(lag / drain_s / per_consumer))
        reason = f"lag {lag} within {drain_s:g}s (arrival rate not known)"
    else:
        count = _ceil((arrival + lag / drain_s) / per_consumer)
        reason = (
            f"{arrival:.3g}/s arriving + lag {lag} within {drain_s:g}s, "
            f"{per_consumer:.3g}/s per consumer"
        )
    if count == 0 and (lag or sample.pending):
        count = 1
    bounded = min(policy.max_consumers, max(policy.min_consumers, count))
    if bounded != count:
        reason += f" (asks {count}, bounded to {policy.min_consumers}..{policy.max_consumers})"
    if sample.stuck:
        reason += f"; {sample.stuck} stuck pending entries need a reclaim, not consumers"
    return bounded, reason


def _ceil(x: float) -> int:
    return max(0, math.ceil(x - 1e-9))  # 3.0000000001 from float noise is 3


class Recommender:
    """The Scaler's memory between calls: the sample window, what one consumer was seen to
    handle, and the hysteresis. Feed it samples (``observe``); ask it to ``recommend`` on the
    newest.

    One consumer's capacity is learnt from windows in which the group was saturated (entries
    waited undelivered at both ends, so every consumer had work): processing rate over
    consumers. Outside such windows the observed rate is only a lower bound of the capacity.
    """

    def __init__(self, policy: ScalingPolicy) -> None:
        self.policy = policy
        self.window = SampleWindow(int(policy.window_s * 1000))
        self.hysteresis = Hysteresis(
            margin=policy.margin,
            confirm=policy.confirm,
            cooldown_ms=int(policy.scale_in_cooldown_s * 1000),
        )
        #: entries/s one consumer handles: given, or learnt (None until seen)
        self.per_consumer_rate: float | None = policy.per_consumer_rate

    def observe(self, sample: ScaleSample) -> None:
        """Add a sample to the window and learn from it."""
        self.window.add(sample)
        if self.policy.per_consumer_rate is not None or len(self.window) < 2:
            return
        _, processing, _ = self.window.rates()
        first, last = self.window.samples[0], self.window.samples[-1]
        consumers = last.consumers
        # Consumers that came or went within the window worked part of it: no clean figure.
        if not processing or consumers == 0 or consumers != first.consumers:
            return
        seen = processing / consumers
        saturated = first.lag > 0 and last.lag > 0
        if saturated or self.per_consumer_rate is None or seen > self.per_consumer_rate:
            self.per_consumer_rate = seen

    def recommend(self, sample: ScaleSample) -> Recommendation:
        """Recommend a consumer count for the group ``sample`` describes: one decision of the
        hysteresis. ``sample`` is the newest one observed."""
        arrival, processing, span_s = self.window.rates()
        target, reason = target_consumers(self.policy, sample, arrival, self.per_consumer_rate)
        consumers = self.hysteresis.step(target, sample.time_ms)
        if self.hysteresis.holding:
            reason += f"; staying at {consumers}: {self.hysteresis.holding}"
        return Recommendation(
            consumers=consumers,
            target=target,
            reason=reason,
            arrival_rate=arrival,
            processing_rate=processing,
            window_s=span_s,
            per_consumer_rate=self.per_consumer_rate,
        )
