"""Scaler and AsyncScaler: how many consumers a group needs, and a KEDA ScaledObject for it.

``decide()`` gives two answers side by side:

- the seed's (``redis-streams``' Scaler), kept exactly: ``rate`` = the group's lag per pending
  entry in percent, clamped to 1..100, and ``OUT`` / ``IN`` / ``NO_SCALE`` against
  ``scale_out_rate`` / ``scale_in_rate``, with its sentence in ``line``;
- ours: ``recommended_consumers``, from the arrival and processing rates measured over a
  window of samples, the lag and a target drain time, held steady by hysteresis. Pending
  entries idle past ``stuck_idle_ms`` are counted apart: they need a reclaim, not consumers.

A sample is one atomic snapshot (MULTI/EXEC: server TIME, XINFO STREAM, XINFO GROUPS and the
stuck pending entries), so ``entries_added``, ``lag`` and ``pending`` agree with each other.
On a Redis Cluster the transaction goes whole to the node that owns the stream: its commands
read the stream, and MULTI, TIME and EXEC go with them (the clock is that node's).
Where the server has no lag (nil after XGROUP SETID or deletions; before Redis 7.0) or one
larger than the stream (undelivered entries were trimmed), it is counted with XRANGE from the
group's last delivered id, up to 10,000, and the sample says when that is an estimate.

The arithmetic lives in ``conveyor._core.scaling``; each method here is a *plan* that yields
the commands of a round trip, so the sync and asyncio twins only carry them.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, TypeVar

from redis.exceptions import ResponseError

from conveyor import _io
from conveyor._core import commands as cmd
from conveyor._core.scaling import (
    Recommender,
    ScalingPolicy,
    check_rates,
    seed_line,
    seed_rate,
    seed_suggestion,
)
from conveyor._io import Plan, server_error
from conveyor.config import check_int, check_name
from conveyor.errors import ConfigError, ConveyorError, GroupMissingError
from conveyor.models import ScaleDecision, ScaleSample

__all__ = ["AsyncScaler", "ScaleDecision", "ScaleSample", "Scaler", "keda_scaled_object"]

log = logging.getLogger("conveyor.scaler")

#: stuck pending entries counted at most per sample
STUCK_COUNT_LIMIT = 10_000
#: undelivered entries counted at most where the server reports no lag
LAG_COUNT_LIMIT = 10_000

_T = TypeVar("_T")


class _ScalerBase:
    _asyncio = False
    _twin = "AsyncScaler"

    def __init__(
        self,
        client: Any,
        stream: str,
        group: str,
        *,
        min_consumers: int = 1,
        max_consumers: int = 64,
        target_drain_s: float = 60.0,
        stuck_idle_ms: int = 60_000,
        window_s: float = 60.0,
        margin: float = 0.1,
        confirm: int = 3,
        scale_in_cooldown_s: float = 120.0,
        per_consumer_rate: float | None = None,
    ) -> None:
        check_name("stream", stream)
        check_name("group", group)
        _io.check_client(client, asyncio=self._asyncio, owner=type(self).__name__, twin=self._twin)
        self.client = client
        self.stream = stream
        self.group = group
        self.policy = ScalingPolicy(
            min_consumers=min_consumers,
            max_consumers=max_consumers,
            target_drain_s=target_drain_s,
            stuck_idle_ms=stuck_idle_ms,
            window_s=window_s,
            margin=margin,
            confirm=confirm,
            scale_in_cooldown_s=scale_in_cooldown_s,
            per_consumer_rate=per_consumer_rate,
        )
        self._recommender = Recommender(self.policy)
        #: the newest decision, None before the first
        self.last_decision: ScaleDecision | None = None

    def __repr__(self) -> str:
        d = self.last_decision
        shown = f" recommended={d.recommended_consumers}" if d is not None else ""
        return (
            f"<{type(self).__name__} stream={self.stream!r} group={self.group!r} "
            f"samples={len(self._recommender.window)}{shown}>"
        )

    def _failed(self, reply: Any, what: str) -> ConveyorError:
        if cmd.error_code(reply) == "NOGROUP":
            text = cmd.error_text(reply)
            return GroupMissingError(f"group {self.group!r} of stream {self.stream!r}: {text}")
        if "no such key" in str(reply).lower():
            return GroupMissingError(f"stream {self.stream!r} does not exist")
        return server_error(reply, f"{what} on stream {self.stream!r}")

    def _sample_plan(self) -> Plan[ScaleSample]:
        s, g = self.stream, self.group
        replies = yield [
            ("MULTI",),
            ("TIME",),
            cmd.xinfo_stream(s),
            cmd.xinfo_groups(s),
            cmd.scaler_stuck_pending(s, g, self.policy.stuck_idle_ms, STUCK_COUNT_LIMIT),
            ("EXEC",),
        ]
        executed = replies[-1]
        for reply in (*replies[:-1], executed):
            if isinstance(reply, ResponseError):
                raise self._failed(reply, "MULTI/EXEC")
        time_reply, stream_reply, groups_reply, stuck_reply = executed
        for reply, what in zip(executed, ("TIME", "XINFO STREAM", "XINFO GROUPS"), strict=False):
            if isinstance(reply, ResponseError):
                raise self._failed(reply, what)
        info = cmd.parse_xinfo_stream(stream_reply, s)
        found = [x for x in cmd.parse_xinfo_groups(groups_reply) if x.name == g]
        if not found:
            raise GroupMissingError(f"stream {s!r} has no group {g!r}")
        if isinstance(stuck_reply, ResponseError):
            raise self._failed(stuck_reply, "XPENDING")
        group = found[0]
        lag, exact = group.lag, True
        if lag is None or lag > info.length:
            # nil: the server cannot tell; above the length: undelivered entries were trimmed
            replies = yield [cmd.scaler_count_after(s, group.last_delivered_id, LAG_COUNT_LIMIT)]
            if isinstance(replies[0], ResponseError):
                raise self._failed(replies[0], "XRANGE")
            lag = len(replies[0] or ())
            exact = lag < LAG_COUNT_LIMIT
        sample = ScaleSample(
            time_ms=cmd.parse_time_ms(time_reply),
            length=info.length,
            entries_added=info.entries_added,
            lag=lag,
            pending=group.pending,
            consumers=group.consumers,
            stuck=len(stuck_reply or ()),
            lag_exact=exact,
            last_delivered_id=group.last_delivered_id,
        )
        self._recommender.observe(sample)
        return sample

    def _decide_plan(self, scale_out_rate: float, scale_in_rate: float) -> Plan[ScaleDecision]:
        check_rates(scale_out_rate, scale_in_rate)
        sample = yield from self._sample_plan()
        rate = seed_rate(sample.lag, sample.pending)
        suggestion = seed_suggestion(
            rate, sample.lag, sample.consumers, scale_out_rate, scale_in_rate
        )
        rec = self._recommender.recommend(sample)
        decision = ScaleDecision(
            stream=self.stream,
            group=self.group,
            rate=float(rate),
            suggestion=suggestion,
            line=seed_line(suggestion, sample.lag, sample.pending, rate),
            recommended_consumers=rec.consumers,
            target_consumers=rec.target,
            reason=rec.reason,
            sample=sample,
            arrival_rate=rec.arrival_rate,
            processing_rate=rec.processing_rate,
            per_consumer_rate=rec.per_consumer_rate,
            window_s=rec.window_s,
            scale_out_rate=scale_out_rate,
            scale_in_rate=scale_in_rate,
        )
        self.last_decision = decision
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s/%s: %s; recommended %d (%s)",
                self.stream,
                self.group,
                decision.line,
                decision.recommended_consumers,
                decision.reason,
            )
        return decision


class Scaler(_ScalerBase):
    """Watches one consumer group and says how many consumers it needs.

    Keep one Scaler and call ``decide()`` periodically (every 10-30 s): each call takes a
    sample, and the rates come from the samples of the last ``window_s``. ``sample()`` takes
    one without deciding (to fill the window faster).

    Options: ``min_consumers``/``max_consumers`` bound the recommendation; ``target_drain_s``
    is how soon a backlog should be gone; ``stuck_idle_ms``: pending entries idle this long
    are stuck; ``window_s``: the rate window; ``margin``, ``confirm`` and
    ``scale_in_cooldown_s``: the hysteresis (a new count needs ``confirm`` decisions in a row
    that differ by more than ``margin`` of the current one; fewer consumers also wait out the
    cooldown); ``per_consumer_rate``: entries/s one consumer handles, if known (else learnt).

    >>> scaler = Scaler(r, "orders", "billing")                          # doctest: +SKIP
    >>> d = scaler.decide(scale_out_rate=60, scale_in_rate=20)           # doctest: +SKIP
    >>> print(d.line)                                                    # doctest: +SKIP
    Consumers should be IN as stream length (11) / pending (83) rate is 13.253%
    >>> d.recommended_consumers, d.reason                                # doctest: +SKIP
    (2, 'throughput per consumer not known yet')
    """

    def sample(self) -> ScaleSample:
        """Take one sample of the group (one round trip; two where the lag must be counted)
        and keep it in the window."""
        return self._run(self._sample_plan())

    def decide(self, scale_out_rate: float = 50, scale_in_rate: float = 10) -> ScaleDecision:
        """Take a sample and decide: the seed's rate and suggestion, and our recommendation.

        ``scale_out_rate`` and ``scale_in_rate`` are percentages (0..100, in below out):
        ``OUT`` when the rate is at least ``scale_out_rate`` (or nothing is pending while
        entries wait), ``IN`` when it is below ``scale_in_rate`` and the group has more than
        one consumer, else ``NO_SCALE``.
        """
        return self._run(self._decide_plan(scale_out_rate, scale_in_rate))

    def _run(self, plan: Plan[_T]) -> _T:
        return _io.run_plan(self.client, plan)


class AsyncScaler(_ScalerBase):
    """Scaler for ``redis.asyncio`` clients: the same options, methods as coroutines.

    >>> d = await AsyncScaler(ar, "orders", "billing").decide()          # doctest: +SKIP
    """

    _asyncio = True
    _twin = "Scaler"

    async def sample(self) -> ScaleSample:
        """See ``Scaler.sample``."""
        return await self._run(self._sample_plan())

    async def decide(self, scale_out_rate: float = 50, scale_in_rate: float = 10) -> ScaleDecision:
        """See ``Scaler.decide``."""
        return await self._run(self._decide_plan(scale_out_rate, scale_in_rate))

    async def _run(self, plan: Plan[_T]) -> _T:
        return await _io.arun_plan(self.client, plan)


# ---------------------------------------------------------------------------------------------
# KEDA

_K8S_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_k8s_name(name: str, value: object) -> None:
    if not (isinstance(value, str) and len(value) <= 253 and _K8S_NAME.fullmatch(value)):
        raise ConfigError(
            f"{name} must be a Kubernetes name (lower case letters, digits, '-' and '.'), "
            f"got {value!r}"
        )


def _check_env(name: str, value: object) -> None:
    if not (isinstance(value, str) and _ENV_NAME.fullmatch(value)):
        raise ConfigError(f"{name} must be an environment variable name, got {value!r}")


def keda_scaled_object(
    stream: str,
    group: str,
    *,
    name: str,
    deployment: str,
    lag_threshold: int,
    min_replicas: int,
    max_replicas: int,
    address_env: str = "REDIS_ADDRESS",
    activation_lag_threshold: int = 0,
    namespace: str | None = None,
    password_env: str | None = None,
    username_env: str | None = None,
    enable_tls: bool = False,
    polling_interval_s: int | None = None,
    cooldown_period_s: int | None = None,
) -> str:
    """A KEDA ScaledObject (YAML) that scales ``deployment`` on the group's lag.

    KEDA's ``redis-streams`` trigger with ``lagCount`` (Redis 7+; KEDA documents it from 2.11)
    aims at ``lag_threshold`` undelivered entries per replica, from ``min_replicas`` (0 allowed: the
    lag trigger can scale to zero) to ``max_replicas``; below ``activation_lag_threshold`` it
    does not wake a deployment scaled to zero. KEDA reads the server's address from
    ``address_env``, an environment variable of the deployment holding ``host:port`` (not a
    URL), and the credentials from ``username_env``/``password_env`` if given. KEDA takes the
    lag from XINFO GROUPS as it is: where the server reports none (a group created at an
    arbitrary id, entries deleted), it cannot see the backlog, so keep ``min_replicas`` >= 1.

    >>> print(keda_scaled_object("orders", "billing", name="billing", deployment="worker",
    ...                          lag_threshold=100, min_replicas=0, max_replicas=10))
    apiVersion: keda.sh/v1alpha1
    kind: ScaledObject
    metadata:
      name: billing
    spec:
      scaleTargetRef:
        name: worker
      minReplicaCount: 0
      maxReplicaCount: 10
      triggers:
        - type: redis-streams
          metadata:
            addressFromEnv: "REDIS_ADDRESS"
            stream: "orders"
            consumerGroup: "billing"
            lagCount: "100"
            activationLagCount: "0"
    <BLANKLINE>
    """
    check_name("stream", stream)
    check_name("group", group)
    _check_k8s_name("name", name)
    _check_k8s_name("deployment", deployment)
    if namespace is not None:
        _check_k8s_name("namespace", namespace)
    _check_env("address_env", address_env)
    for option, env in (("password_env", password_env), ("username_env", username_env)):
        if env is not None:
            _check_env(option, env)
    check_int("lag_threshold", lag_threshold, 1)
    check_int("activation_lag_threshold", activation_lag_threshold, 0)
    check_int("min_replicas", min_replicas, 0)
    check_int("max_replicas", max_replicas, max(1, min_replicas))
    if not isinstance(enable_tls, bool):
        raise ConfigError(f"enable_tls must be True or False, got {enable_tls!r}")
    if polling_interval_s is not None:
        check_int("polling_interval_s", polling_interval_s, 1)
    if cooldown_period_s is not None:
        check_int("cooldown_period_s", cooldown_period_s, 0)

    lines = ["apiVersion: keda.sh/v1alpha1", "kind: ScaledObject", "metadata:", f"  name: {name}"]
    if namespace is not None:
        lines.append(f"  namespace: {namespace}")
    lines += ["spec:", "  scaleTargetRef:", f"    name: {deployment}"]
    lines += [f"  minReplicaCount: {min_replicas}", f"  maxReplicaCount: {max_replicas}"]
    if polling_interval_s is not None:
        lines.append(f"  pollingInterval: {polling_interval_s}")
    if cooldown_period_s is not None:
        lines.append(f"  cooldownPeriod: {cooldown_period_s}")
    lines += ["  triggers:", "    - type: redis-streams", "      metadata:"]
    metadata = [("addressFromEnv", address_env)]
    if username_env is not None:
        metadata.append(("usernameFromEnv", username_env))
    if password_env is not None:
        metadata.append(("passwordFromEnv", password_env))
    metadata += [
        ("stream", stream),
        ("consumerGroup", group),
        ("lagCount", str(lag_threshold)),
        ("activationLagCount", str(activation_lag_threshold)),
    ]
    if enable_tls:
        metadata.append(("enableTLS", "true"))
    # A JSON string is a YAML double-quoted scalar: any stream or group name stays intact.
    lines += [f"        {key}: {json.dumps(value)}" for key, value in metadata]
    return "\n".join(lines) + "\n"
