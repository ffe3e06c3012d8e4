"""Scaler and AsyncScaler against a real server, and the KEDA ScaledObject they pair with."""

from __future__ import annotations

import asyncio
import doctest
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis

import conveyor
from conveyor import AsyncScaler, ConfigError, GroupMissingError, ScaleDecision, Scaler
from conveyor import scaler as scaler_module
from conveyor.scaler import keda_scaled_object
from tests.conftest import SyncFacade

Name = Callable[[str], str]

SEED_IN = "Consumers should be IN as stream length (11) / pending (83) rate is 13.253%"
SEED_NO_SCALE = "Consumers should be NO_SCALE as stream length (18) / pending (79) rate is 22.7848%"


class Twin:
    """A Scaler or an AsyncScaler (driven on its own loop) behind the same methods."""

    def __init__(self, kind: str, url: str, **client_options: Any) -> None:
        self.kind = kind
        self.url = url
        self.options = client_options
        self.loop = asyncio.new_event_loop() if kind == "async" else None
        self.clients: list[Any] = []

    def scaler(self, stream: str, group: str, **kw: Any) -> Any:
        if self.loop is None:
            client = conveyor.connect(self.url, **self.options)
            self.clients.append(client)
            return Scaler(client, stream, group, **kw)
        aclient = conveyor.connect(self.url, asyncio=True, **self.options)
        self.clients.append(aclient)
        return SyncFacade(AsyncScaler(aclient, stream, group, **kw), self.loop)

    def close(self) -> None:
        for client in self.clients:
            if self.loop is not None:
                self.loop.run_until_complete(client.aclose())
            else:
                client.close()
        if self.loop is not None:
            self.loop.close()


@pytest.fixture(params=["sync", "async"])
def twin(request: pytest.FixtureRequest, redis_url: str) -> Iterator[Twin]:
    t = Twin(request.param, redis_url)
    yield t
    t.close()


def build_group(r: redis.Redis, stream: str, lag: int, pending: int, consumers: int = 2) -> None:
    """A group with exactly ``pending`` entries delivered and unacked, spread over
    ``consumers``, and ``lag`` entries not delivered yet."""
    for i in range(lag + pending):
        r.xadd(stream, {"i": i})
    r.xgroup_create(stream, "g", "0", mkstream=True)
    share = pending // consumers
    for c in range(consumers):
        count = share if c < consumers - 1 else pending - share * (consumers - 1)
        if count:
            got = r.xreadgroup("g", f"c{c}", {stream: ">"}, count=count)
            assert len(got[0][1]) == count
        else:
            r.xgroup_createconsumer(stream, "g", f"c{c}")


def test_the_seed_line_end_to_end(twin: Twin, r: redis.Redis, name: Name) -> None:
    s = name("s")
    build_group(r, s, lag=11, pending=83)
    assert r.xlen(s) == 94
    d = twin.scaler(s, "g").decide(scale_out_rate=60, scale_in_rate=20)
    assert isinstance(d, ScaleDecision)
    assert d.line == SEED_IN and str(d) == SEED_IN
    assert (d.rate, d.suggestion, d.lag, d.pending, d.consumers) == (13.253, "IN", 11, 83, 2)
    assert d.sample.lag_exact and d.sample.length == 94 and d.stuck == 0
    assert d.recommended_consumers == 2  # one sample: no rates yet, keep what runs


def test_the_second_seed_line_end_to_end(twin: Twin, r: redis.Redis, name: Name) -> None:
    s = name("s")
    build_group(r, s, lag=18, pending=79, consumers=3)
    d = twin.scaler(s, "g").decide(scale_out_rate=60, scale_in_rate=20)
    assert d.line == SEED_NO_SCALE and d.rate == 22.7848


@pytest.mark.parametrize(("protocol", "decode"), [(2, True), (3, False), (3, True)])
def test_every_client_kind_gives_the_same_line(
    redis_url: str, r: redis.Redis, name: Name, protocol: int, decode: bool
) -> None:
    s = name("s")
    build_group(r, s, lag=11, pending=83)
    t = Twin("sync", redis_url, protocol=protocol, decode_responses=decode)
    try:
        assert t.scaler(s, "g").decide(60, 20).line == SEED_IN
    finally:
        t.close()


def test_one_consumer_is_never_told_to_scale_in(twin: Twin, r: redis.Redis, name: Name) -> None:
    s = name("s")
    build_group(r, s, lag=11, pending=83, consumers=1)
    d = twin.scaler(s, "g").decide(60, 20)
    assert d.suggestion == "NO_SCALE"
    assert d.line == SEED_IN.replace(" IN ", " NO_SCALE ")


def test_nothing_pending_while_entries_wait_is_out(twin: Twin, r: redis.Redis, name: Name) -> None:
    s = name("s")
    build_group(r, s, lag=5, pending=0, consumers=1)
    d = twin.scaler(s, "g").decide()
    assert (d.rate, d.suggestion, d.lag) == (0.0, "OUT", 5)
    assert d.line.endswith("rate is 0%")


def test_lag_is_counted_where_the_server_has_none(twin: Twin, r: redis.Redis, name: Name) -> None:
    s = name("s")
    ids = [r.xadd(s, {"i": i}) for i in range(10)]
    r.xgroup_create(s, "g", ids[3])  # an arbitrary id: the server cannot tell the lag
    r.xdel(s, ids[7])
    assert r.xinfo_groups(s)[0]["lag"] is None
    sample = twin.scaler(s, "g").sample()
    assert (sample.lag, sample.lag_exact, sample.pending) == (5, True, 0)


def test_lag_above_the_length_is_counted_again(twin: Twin, r: redis.Redis, name: Name) -> None:
    s = name("s")
    for i in range(10):
        r.xadd(s, {"i": i})
    r.xgroup_create(s, "g", "0")
    r.xtrim(s, maxlen=3, approximate=False)  # trims entries the group never read
    sample = twin.scaler(s, "g").sample()
    assert sample.lag == 3 and sample.length == 3


def test_stuck_pending_entries_are_told_apart(twin: Twin, r: redis.Redis, name: Name) -> None:
    s = name("s")
    build_group(r, s, lag=0, pending=6)
    scaler = twin.scaler(s, "g", stuck_idle_ms=50)
    deadline = time.monotonic() + 5
    while (d := scaler.decide()).stuck < 6:
        assert time.monotonic() < deadline, d
    assert d.pending == 6 and "6 stuck pending entries need a reclaim" in d.reason


def test_rates_come_from_the_window(twin: Twin, r: redis.Redis, name: Name) -> None:
    s = name("s")
    build_group(r, s, lag=0, pending=0, consumers=1)
    scaler = twin.scaler(s, "g", window_s=60)
    first = scaler.sample()
    for i in range(30):
        r.xadd(s, {"i": i})
    got = r.xreadgroup("g", "c0", {s: ">"}, count=20)
    r.xack(s, "g", *[e[0] for e in got[0][1]])
    deadline = time.monotonic() + 5
    while (d := scaler.decide()).sample.time_ms == first.time_ms:
        assert time.monotonic() < deadline
    span_s = d.window_s
    assert span_s > 0
    assert d.arrival_rate == pytest.approx(30 / span_s)
    assert d.processing_rate == pytest.approx(20 / span_s)
    assert d.to_dict()["arrival_rate"] == d.arrival_rate
    json.dumps(d.to_dict())


def test_missing_group_or_stream(twin: Twin, r: redis.Redis, name: Name) -> None:
    s = name("s")
    with pytest.raises(GroupMissingError, match="does not exist"):
        twin.scaler(s, "g").decide()
    r.xadd(s, {"a": 1})
    with pytest.raises(GroupMissingError, match="no group 'g'"):
        twin.scaler(s, "g").sample()


@pytest.mark.parametrize(
    ("out", "in_", "needle"),
    [(150, 10, "scale_out_rate"), (50, -5, "scale_in_rate"), (30, 30, "below scale_out_rate")],
)
def test_bad_rates_are_refused_before_any_io(
    twin: Twin, name: Name, out: Any, in_: Any, needle: str
) -> None:
    scaler = twin.scaler(name("nothing-here"), "g")
    with pytest.raises(ConfigError, match=needle):
        scaler.decide(scale_out_rate=out, scale_in_rate=in_)


def test_options_and_clients_are_checked(redis_url: str, r: redis.Redis) -> None:
    with pytest.raises(ConfigError, match="max_consumers"):
        Scaler(r, "s", "g", min_consumers=3, max_consumers=2)
    with pytest.raises(ConfigError, match="group"):
        Scaler(r, "s", "")
    with pytest.raises(ConfigError, match="use AsyncScaler"):
        Scaler(conveyor.connect(redis_url, asyncio=True), "s", "g")
    with pytest.raises(ConfigError, match="use Scaler"):
        AsyncScaler(r, "s", "g")


def test_repr_shows_the_last_recommendation(r: redis.Redis, name: Name) -> None:
    s = name("s")
    build_group(r, s, lag=1, pending=2)
    scaler = Scaler(r, s, "g")
    assert "samples=0" in repr(scaler)
    scaler.decide()
    assert repr(scaler) == f"<Scaler stream={s!r} group='g' samples=1 recommended=2>"


# ---------------------------------------------------------------------------------------------
# KEDA


def parse_yaml(text: str) -> Any:
    """The block-style YAML subset keda_scaled_object writes: mappings, lists of mappings,
    plain scalars, integers and JSON-quoted strings."""
    rows = [
        (len(line) - len(line.lstrip(" ")), line.strip())
        for line in text.splitlines()
        if line.strip()
    ]

    def scalar(raw: str) -> Any:
        if raw.startswith('"'):
            return json.loads(raw)
        return int(raw) if raw.lstrip("-").isdigit() else raw

    def block(i: int, indent: int) -> tuple[Any, int]:
        if rows[i][1].startswith("- "):
            items = []
            while i < len(rows) and rows[i][0] == indent and rows[i][1].startswith("- "):
                rows[i] = (indent + 2, rows[i][1][2:])
                item, i = block(i, indent + 2)
                items.append(item)
            return items, i
        mapping: dict[str, Any] = {}
        while i < len(rows) and rows[i][0] == indent:
            key, _, rest = rows[i][1].partition(":")
            assert key not in mapping, key
            if rest.strip():
                mapping[key], i = scalar(rest.strip()), i + 1
            else:
                mapping[key], i = block(i + 1, rows[i + 1][0])
        return mapping, i

    doc, end = block(0, 0)
    assert end == len(rows), f"unparsed from line {end}"
    return doc


def test_keda_scaled_object_scales_on_the_lag() -> None:
    text = keda_scaled_object(
        "{shop}orders",
        'billing "eu"',
        name="orders-billing",
        deployment="billing-worker",
        lag_threshold=250,
        min_replicas=0,
        max_replicas=20,
        namespace="shop",
        password_env="REDIS_PASSWORD",
        enable_tls=True,
        polling_interval_s=15,
        cooldown_period_s=300,
    )
    doc = parse_yaml(text)
    assert doc["apiVersion"] == "keda.sh/v1alpha1" and doc["kind"] == "ScaledObject"
    assert doc["metadata"] == {"name": "orders-billing", "namespace": "shop"}
    spec = doc["spec"]
    assert spec["scaleTargetRef"] == {"name": "billing-worker"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (0, 20)
    assert (spec["pollingInterval"], spec["cooldownPeriod"]) == (15, 300)
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "redis-streams"
    assert trigger["metadata"] == {
        "addressFromEnv": "REDIS_ADDRESS",
        "passwordFromEnv": "REDIS_PASSWORD",
        "stream": "{shop}orders",
        "consumerGroup": 'billing "eu"',
        "lagCount": "250",
        "activationLagCount": "0",
        "enableTLS": "true",
    }


def test_keda_docstring_example() -> None:
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(scaler_module.keda_scaled_object, "keda_scaled_object"):
        runner.run(test)
    assert runner.failures == 0 and runner.tries > 0


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"name": "Orders_Billing"}, "name must be a Kubernetes name"),
        ({"deployment": ""}, "deployment"),
        ({"lag_threshold": 0}, "lag_threshold"),
        ({"min_replicas": -1}, "min_replicas"),
        ({"min_replicas": 5, "max_replicas": 4}, "max_replicas"),
        ({"address_env": "REDIS-ADDRESS"}, "address_env"),
        ({"namespace": "Shop"}, "namespace"),
        ({"enable_tls": "yes"}, "enable_tls"),
    ],
)
def test_keda_arguments_are_checked(kw: dict[str, Any], needle: str) -> None:
    args: dict[str, Any] = {
        "name": "a",
        "deployment": "b",
        "lag_threshold": 10,
        "min_replicas": 1,
        "max_replicas": 3,
    }
    args.update(kw)
    with pytest.raises(ConfigError, match=needle):
        keda_scaled_object("s", "g", **args)
