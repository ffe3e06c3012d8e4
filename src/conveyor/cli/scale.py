"""``conveyor scale``: how many consumers a group needs, and a KEDA ScaledObject for it."""

from __future__ import annotations

import time
from typing import Any

import click

from conveyor.cli import EXIT_INTERRUPTED, CliError, _sigterm_as_interrupt, main, redis_options
from conveyor.cli._common import (
    client_for,
    echo_json,
    group_info,
    group_option,
    json_option,
    stream_option,
)
from conveyor.models import ScaleDecision
from conveyor.scaler import Scaler, keda_scaled_object

#: seconds between samples while observing (--observe-s)
_SAMPLE_EVERY_S = 1.0


def decision_dict(d: ScaleDecision) -> dict[str, Any]:
    """A decision as a JSON-ready dict: the redis-streams Scaler's figures, ours, and what
    they came from."""
    return {
        "stream": d.stream,
        "group": d.group,
        "rate": d.rate,
        "suggestion": d.suggestion,
        "line": d.line,
        "scale_out_rate": d.scale_out_rate,
        "scale_in_rate": d.scale_in_rate,
        "recommended_consumers": d.recommended_consumers,
        "target_consumers": d.target_consumers,
        "reason": d.reason,
        "consumers": d.consumers,
        "lag": d.lag,
        "lag_exact": d.sample.lag_exact,
        "pending": d.pending,
        "stuck": d.sample.stuck,
        "arrival_rate": d.arrival_rate,
        "processing_rate": d.processing_rate,
        "per_consumer_rate": d.per_consumer_rate,
        "window_s": d.window_s,
    }


def recommendation_line(d: ScaleDecision) -> str:
    """Our answer, after the redis-streams line: the count, against the current one, and
    why."""
    return f"Recommended consumers: {d.recommended_consumers} (now {d.consumers}): {d.reason}"


@main.command()
@stream_option
@group_option
@click.option(
    "--scale-out-rate",
    metavar="PCT",
    type=click.FloatRange(0, 100),
    default=50,
    show_default=True,
    help="OUT when lag / pending, in percent, is at least this.",
)
@click.option(
    "--scale-in-rate",
    metavar="PCT",
    type=click.FloatRange(0, 100),
    default=10,
    show_default=True,
    help="IN when it is below this (and the group has more than one consumer).",
)
@click.option(
    "--observe-s",
    metavar="S",
    type=click.FloatRange(0, 3600),
    default=0,
    show_default=True,
    help="Sample the group every second for S seconds first, so the recommendation can use "
    "arrival and processing rates.",
)
@click.option(
    "--min-consumers",
    metavar="N",
    type=click.IntRange(min=0),
    default=1,
    show_default=True,
    help="Fewest consumers to recommend (KEDA: minReplicaCount).",
)
@click.option(
    "--max-consumers",
    metavar="N",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Most consumers to recommend (KEDA: maxReplicaCount).",
)
@click.option(
    "--target-drain-s",
    metavar="S",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    help="How soon a backlog should be gone.",
)
@click.option(
    "--per-consumer-rate",
    metavar="MSGS_PER_S",
    type=click.FloatRange(min=0, min_open=True),
    help="Entries per second one consumer handles, if known (else learnt while observing).",
)
@json_option
@click.option("--keda", is_flag=True, help="Print a KEDA ScaledObject (YAML) instead; no Redis.")
@click.option("--name", metavar="NAME", help="--keda: the ScaledObject's name.")
@click.option("--deployment", metavar="NAME", help="--keda: the Deployment to scale.")
@click.option("--namespace", metavar="NAME", help="--keda: the namespace.")
@click.option(
    "--lag-threshold",
    metavar="N",
    type=click.IntRange(min=1),
    default=100,
    show_default=True,
    help="--keda: undelivered entries per replica KEDA aims at.",
)
@click.option(
    "--address-env",
    metavar="VAR",
    default="REDIS_ADDRESS",
    show_default=True,
    help="--keda: the Deployment's variable holding the server's host:port.",
)
@click.option("--password-env", metavar="VAR", help="--keda: the variable holding the password.")
@click.option("--username-env", metavar="VAR", help="--keda: the variable holding the user.")
@click.option("--tls", is_flag=True, help="--keda: connect with TLS.")
@redis_options()
def scale(
    stream: str,
    group: str,
    scale_out_rate: float,
    scale_in_rate: float,
    observe_s: float,
    min_consumers: int,
    max_consumers: int,
    target_drain_s: float,
    per_consumer_rate: float | None,
    as_json: bool,
    keda: bool,
    name: str | None,
    deployment: str | None,
    namespace: str | None,
    lag_threshold: int,
    address_env: str,
    password_env: str | None,
    username_env: str | None,
    tls: bool,
    url: str | None,
) -> None:
    """Say whether a group needs more or fewer consumers, and how many.

    The first line is the verdict of the redis-streams Scaler, word for word: OUT, IN or
    NO_SCALE from the group's lag (entries not delivered yet, which it calls "stream length")
    per pending entry. The second is our recommendation, from the rates of arrival and processing
    (--observe-s measures them), the lag and --target-drain-s, within --min-consumers and
    --max-consumers; pending entries idle for a minute count as stuck: they need a reclaim,
    not consumers.

    --keda prints a ScaledObject for KEDA's redis-streams trigger (lagCount, Redis 7+) that
    scales --deployment between --min-consumers and --max-consumers replicas.

    \b
    Examples:
      conveyor scale --stream orders --group billing --scale-out-rate 60 --scale-in-rate 20
      conveyor scale -s orders -g billing --observe-s 30 --json
      conveyor scale -s orders -g billing --keda --name billing --deployment billing-worker
    """
    if keda:
        if not name or not deployment:
            raise CliError("--keda needs --name and --deployment")
        click.echo(
            keda_scaled_object(
                stream,
                group,
                name=name,
                deployment=deployment,
                namespace=namespace,
                lag_threshold=lag_threshold,
                min_replicas=min_consumers,
                max_replicas=max_consumers,
                address_env=address_env,
                password_env=password_env,
                username_env=username_env,
                enable_tls=tls,
            ),
            nl=False,
        )
        return
    with client_for(url) as client:
        group_info(client, stream, group)
        scaler = Scaler(
            client,
            stream,
            group,
            min_consumers=min_consumers,
            max_consumers=max_consumers,
            target_drain_s=target_drain_s,
            per_consumer_rate=per_consumer_rate,
            window_s=max(60.0, observe_s + 1),
        )
        if observe_s:
            _observe(scaler, observe_s)
        decision = scaler.decide(scale_out_rate=scale_out_rate, scale_in_rate=scale_in_rate)
    if as_json:
        echo_json(decision_dict(decision))
    else:
        click.echo(decision.line)
        click.echo(recommendation_line(decision))


def _observe(scaler: Scaler, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    try:
        with _sigterm_as_interrupt():
            while time.monotonic() < deadline:
                scaler.sample()
                time.sleep(min(_SAMPLE_EVERY_S, max(0.0, deadline - time.monotonic())))
    except KeyboardInterrupt:
        click.echo("interrupted while observing", err=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
