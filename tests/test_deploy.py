"""deploy/: the Grafana dashboard asks only for metrics that conveyor really serves, and the
Kubernetes files are well-formed objects whose ``conveyor`` command lines the real CLI accepts.

The dashboard is checked against a real exporter and a real worker, scraped over HTTP: every
metric an expression (or a template variable) selects must be served, with every label it
matches on. The KEDA ScaledObject is compared with what ``conveyor scale --keda`` prints.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conveyor.cli import main
from tests.test_cli import conveyor
from tests.test_cli_commands import free_port, processes, sample, scrape, start, stop, worker_env
from tests.workers import fill, wait_for

__all__ = ["processes", "worker_env"]  # fixtures, used by name

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "conveyor.json"
KUBERNETES = DEPLOY / "kubernetes"


# -- PromQL: which metrics an expression selects -------------------------------------------------


@dataclass(frozen=True)
class Selector:
    """One vector selector of an expression: the metric, the labels it matches on, and the
    function it is an argument of (the innermost call around it, "" for none)."""

    metric: str
    labels: tuple[str, ...] = ()
    function: str = ""


_TOKEN = re.compile(
    r"""
      (?P<space>\s+)
    | (?P<comment>\#[^\n]*)
    | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
    | (?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
    | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?(?:ms|[smhdwy])*)
    | (?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)
    | (?P<operator>=~|!~|!=|==|<=|>=|[-+*/%^=<>@])
    | (?P<punct>[(){}\[\],:])
    """,
    re.VERBOSE,
)

#: names that are never metrics outside braces: aggregations, binary and modifier keywords,
#: and the numbers that are spelt as words
_KEYWORDS = frozenset(
    (
        *("sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values"),
        *("bottomk", "topk", "quantile", "limitk", "limit_ratio"),
        *("and", "or", "unless", "atan2", "bool", "offset", "start", "end", "inf", "nan"),
        *("by", "without", "on", "ignoring", "group_left", "group_right"),
    )
)
#: keywords whose parenthesised list that follows holds label names
_LABEL_LISTS = frozenset(("by", "without", "on", "ignoring", "group_left", "group_right"))
_CLOSING = {"(": ")", "labels": ")", "[": "]", "{": "}"}


def _tokens(expr: str) -> list[tuple[str, str]]:
    tokens: list[tuple[str, str]] = []
    at = 0
    while at < len(expr):
        match = _TOKEN.match(expr, at)
        if match is None:
            raise ValueError(f"cannot read {expr[at:]!r} in {expr!r}")
        kind = match.lastgroup
        assert kind is not None
        if kind not in ("space", "comment"):
            tokens.append((kind, match.group()))
        at = match.end()
    return tokens


def selectors(expr: str) -> list[Selector]:
    """The vector selectors of a PromQL expression (Grafana variables allowed), in order.

    Names followed by ``(`` are functions; keywords, label names (in braces and in
    ``by (...)`` lists), strings, numbers, durations and variables are left out.

    >>> [(s.metric, s.labels) for s in selectors('sum by (g) (rate(x_total{s=~"$s"}[5m])) / y')]
    [('x_total', ('s',)), ('y', ())]
    """
    tokens = _tokens(expr)
    found: list[Selector] = []
    # each open bracket, and the function it holds the arguments of ("" for none); "labels"
    # is a by (...) list, whose function is the aggregation before it
    stack: list[tuple[str, str]] = []
    current: dict[str, Any] | None = None  # the selector whose braces are open
    body_of = ""  # the aggregation whose by (...) list just closed: its body comes next
    for i, (kind, text) in enumerate(tokens):
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        previous_kind, previous = tokens[i - 1] if i else ("", "")
        inside = stack[-1][0] if stack else ""
        aggregation, body_of = body_of, ""
        if kind == "punct" and text in ("(", "[", "{"):
            if text == "{" and current is None:
                raise ValueError(f"a selector without a metric name in {expr!r}")
            if text == "(" and previous.lower() in _LABEL_LISTS:
                before = tokens[i - 2] if i >= 2 else ("", "")
                stack.append(("labels", before[1] if before[0] == "name" else ""))
            elif text == "(" and previous_kind == "name":
                stack.append(("(", previous))
            else:
                stack.append((text, aggregation if text == "(" else ""))
        elif kind == "punct" and text in (")", "]", "}"):
            if not stack or _CLOSING[stack[-1][0]] != text:
                raise ValueError(f"unbalanced {text!r} in {expr!r}")
            opener, function = stack.pop()
            if opener == "labels":
                body_of = function
            elif opener == "{":
                assert current is not None
                found.append(Selector(current["metric"], tuple(current["labels"]), current["fn"]))
                current = None
        elif kind == "name" and inside == "{":
            assert current is not None
            current["labels"].append(text)
        elif kind == "name" and inside not in ("[", "labels"):
            if following == "(" or text.lower() in _KEYWORDS:
                continue
            function = next((f for _, f in reversed(stack) if f), "")
            if following == "{":
                current = {"metric": text, "labels": [], "fn": function}
            else:
                found.append(Selector(text, (), function))
    if stack:
        raise ValueError(f"unclosed {stack[-1][0]!r} in {expr!r}")
    return found


_LABEL_VALUES = re.compile(r"label_values\(\s*(?:(?P<query>.+),)?\s*(?P<label>\w+)\s*\)")


def variable_selectors(query: str) -> list[Selector]:
    """The selectors of a Grafana template query: ``label_values(SELECTOR, LABEL)`` asks for
    the metric with LABEL too.

    >>> variable_selectors('label_values(up{job="a"}, stream)')
    [Selector(metric='up', labels=('job', 'stream'), function='')]
    """
    match = _LABEL_VALUES.fullmatch(query.strip())
    if match is None:
        raise ValueError(f"not a label_values(...) query: {query!r}")
    if match["query"] is None:
        return []
    found = selectors(match["query"])
    return [Selector(s.metric, (*s.labels, match["label"]), s.function) for s in found]


def test_selectors_of_a_sample_expression() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, group) (rate(\n"
        '  conveyor_worker_batch_duration_seconds_bucket{stream=~"$stream", group!="a{b}"}'
        "[$__rate_interval])))\n"
        " / on(stream) group_left max(conveyor_up offset 5m) > bool 0.5e1"
        ' and count without (consumer) (x:recorded:rule{consumer="rate(y)"} @ start())'
        " + ignoring (group) z[5m:1m]  # a comment: not_a_metric"
    )

    assert selectors(expr) == [
        Selector(
            "conveyor_worker_batch_duration_seconds_bucket", ("stream", "group"), function="rate"
        ),
        Selector("conveyor_up", (), function="max"),
        Selector("x:recorded:rule", ("consumer",), function="count"),
        Selector("z"),
    ]


@pytest.mark.parametrize(
    "expr",
    [
        "sum(rate(x[5m])",
        'x{a="b"',
        "rate(x[5m]))",
        "rate(x[5m)]",
        '{__name__="x"}',
        "x ? y",
        "x{a='b}",
    ],
)
def test_selectors_refuse_what_they_cannot_read(expr: str) -> None:
    with pytest.raises(ValueError):
        selectors(expr)


# -- the dashboard ---------------------------------------------------------------------------


def load_dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) of every panel target."""
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]


def variable_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            yield (
                f"variable {variable['name']!r}",
                query if isinstance(query, str) else query["query"],
            )


def problems(dashboard: dict[str, Any], served: dict[str, set[str]]) -> list[str]:
    """What the dashboard asks for that ``served`` (metric name -> its label names) lacks."""
    found: list[str] = []
    asked = [(where, s) for where, expr in expressions(dashboard) for s in selectors(expr)]
    for where, query in variable_queries(dashboard):
        asked += [(where, s) for s in variable_selectors(query)]
    for where, selector in asked:
        if selector.metric not in served:
            found.append(f"{where}: {selector.metric} is not served")
            continue
        for label in selector.labels:
            if label not in served[selector.metric]:
                found.append(f"{where}: {selector.metric} has no label {label!r}")
    return found


def served_metrics(*expositions: str) -> dict[str, set[str]]:
    """Every sample name in Prometheus text expositions, with the label names it has."""
    served: dict[str, set[str]] = {}
    for text in expositions:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                served.setdefault(s.name, set()).update(s.labels)
    return served


def test_the_dashboard_is_an_importable_dashboard() -> None:
    dashboard = load_dashboard()

    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("stream", "group"):
        assert variables[name]["type"] == "query"
        assert variables[name]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"}
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]


def test_every_expression_selects_a_metric_and_counters_only_as_rates() -> None:
    for where, expr in expressions(load_dashboard()):
        found = selectors(expr)
        assert found, f"{where}: no metric in {expr!r}"
        for s in found:
            if s.metric.endswith(("_total", "_bucket", "_sum", "_count")):
                assert s.function in ("rate", "irate", "increase"), f"{where}: {s} not a rate"


def test_the_dashboard_shows_what_an_operator_needs() -> None:
    shown = {s.metric for _, expr in expressions(load_dashboard()) for s in selectors(expr)}

    assert shown >= {
        "conveyor_up",
        "conveyor_health",
        "conveyor_group_lag",
        "conveyor_group_pending",
        "conveyor_group_oldest_pending_age_seconds",
        "conveyor_group_consumers",
        "conveyor_dead_letter_length",
        "conveyor_consumer_idle_seconds",
        "conveyor_consumer_heartbeat_age_seconds",
        "conveyor_worker_messages_processed_total",
        "conveyor_worker_messages_failed_total",
    }


def test_the_dashboard_asks_only_for_metrics_the_exporter_and_a_worker_serve(
    r: redis.Redis,
    name: Any,
    worker_env: dict[str, str],
    processes: list[subprocess.Popen[str]],
) -> None:
    # A group with entries pending at a plain consumer, a worker that acks the rest and
    # dead-letters one: every family has samples.
    stream, group = name("orders"), "billing"
    r.xgroup_create(stream, group, id="0", mkstream=True)
    fill(r, stream, 3)
    r.xreadgroup(group, "holder", {stream: ">"}, count=3)
    good = fill(r, stream, 5)
    r.xadd(stream, {"bad": "1"})
    worker_port, exporter_port = free_port(), free_port()
    local = ("--metrics-addr", "127.0.0.1", "--max-wait-ms", "100")
    worker = start(
        processes,
        "run",
        "cli_handlers:handle",
        *("-s", stream, "-g", group, "--metrics-port", str(worker_port), *local),
        env=worker_env,
    )
    exporter = start(
        processes,
        "exporter",
        *("-p", str(exporter_port), "--addr", "127.0.0.1", "-s", stream, "-g", group),
        env=worker_env,
    )
    labels = {"stream": stream, "group": group}
    wait_for(
        lambda: (
            sample(scrape(worker_port), "conveyor_worker_messages_acked_total", **labels)
            == len(good)
        ),
        what="the worker acked every good message",
    )

    def exporter_sees_everything() -> bool:
        # every family has samples: the worker's heartbeats, the dead letter, the holder's 3
        text = scrape(exporter_port)
        if "conveyor_consumer_heartbeat_age_seconds" not in served_metrics(text):
            return False
        try:
            dead = sample(text, "conveyor_dead_letter_length", stream=stream)
            return (dead, sample(text, "conveyor_group_pending", **labels)) == (1, 3)
        except AssertionError:  # not read yet (conveyor_up 0)
            return False

    wait_for(exporter_sees_everything, what="the exporter saw the worker and the dead letter")
    served = served_metrics(scrape(worker_port), scrape(exporter_port))
    results = [stop(worker), stop(exporter)]

    assert [code for code, _ in results] == [0, 0], results
    dashboard = load_dashboard()
    assert problems(dashboard, served) == []
    # and a misspelt metric, or a label it does not have, in any expression is caught
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            first = selectors(target["expr"])[0].metric
            saved = target["expr"]
            target["expr"] = saved.replace(first, first + "s", 1)
            assert problems(dashboard, served), target["expr"]
            target["expr"] = saved
    typo = copy.deepcopy(dashboard)
    health = next(p for p in panels(typo) if p["title"] == "Health")
    health["targets"][0]["expr"] = 'max(conveyor_health{stream=~"$s", group="g"})'
    assert problems(typo, served) == ["panel 'Health' A: conveyor_health has no label 'group'"]


# -- Kubernetes ------------------------------------------------------------------------------


def kubernetes_files() -> list[Path]:
    return sorted(p for p in KUBERNETES.iterdir() if p.suffix in (".yaml", ".yml"))


def objects() -> list[tuple[str, dict[str, Any]]]:
    """(file name, object) of every document but kustomization.yaml."""
    found = []
    for path in kubernetes_files():
        if path.name != "kustomization.yaml":
            found += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return found


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for _, o in objects() if o["kind"] == kind}


def containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    return list(deployment["spec"]["template"]["spec"]["containers"])


def command_line(container: dict[str, Any]) -> list[str]:
    """The container's command line, ``$(VAR)`` replaced by the value of a variable it
    declares (Kubernetes leaves an undeclared one as it is: a test failure here)."""
    declared = {e["name"]: e for e in container.get("env", [])}

    def value(match: re.Match[str]) -> str:
        assert match[1] in declared, f"{container['name']}: $({match[1]}) is not declared"
        return declared[match[1]].get("value", f"{match[1].lower()}-value")

    line = [*container.get("command", []), *container.get("args", [])]
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, str(arg)) for arg in line]


def parse_conveyor(args: list[str]) -> click.Context:
    """Parse ``conveyor ARGS`` as the CLI would, without running it; a usage error raises."""
    takes_value = {
        opt
        for p in main.params
        if isinstance(p, click.Option) and not p.is_flag and not p.count
        for opt in p.opts
    }
    at = 0
    while at < len(args) and args[at].startswith("-"):
        at += 2 if args[at] in takes_value else 1
    assert at < len(args), f"no command in {args}"
    with main.make_context("conveyor", list(args)) as root:
        command = main.get_command(root, args[at])
        assert command is not None, f"conveyor has no command {args[at]!r}"
        return command.make_context(args[at], args[at + 1 :], parent=root)


def test_parse_conveyor_refuses_what_the_cli_refuses() -> None:
    ctx = parse_conveyor(["--log-format", "json", "exporter", "-p", "9121", "-s", "orders"])
    assert ctx.params["port"] == 9121 and ctx.params["streams"] == ("orders",)
    for bad in (["exporter", "-s", "orders"], ["run", "m:f", "-s", "x", "-g", "g", "--nope"]):
        with pytest.raises(click.UsageError):
            parse_conveyor(bad)
    with pytest.raises(AssertionError, match="no command 'runn'"):
        parse_conveyor(["runn", "m:f"])


def test_every_manifest_is_a_well_formed_object() -> None:
    kinds = {(o["apiVersion"], o["kind"]) for _, o in objects()}

    assert kinds == {
        ("v1", "Secret"),
        ("apps/v1", "Deployment"),
        ("v1", "Service"),
        ("keda.sh/v1alpha1", "ScaledObject"),
    }
    for file, o in objects():
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", o["metadata"]["name"]), file
        assert "namespace" not in o["metadata"], f"{file}: kustomization.yaml sets it"
    for name, deployment in of_kind("Deployment").items():
        template = deployment["spec"]["template"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= template["metadata"]["labels"].items(), name
        for container in containers(deployment):
            assert container["image"] and container["command"], name
            ports = {p["name"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    assert container[probe]["httpGet"]["port"] in ports, (name, probe)
    exporters = of_kind("Deployment")["conveyor-exporter"]["spec"]["template"]
    for service in of_kind("Service").values():
        assert service["spec"]["selector"].items() <= exporters["metadata"]["labels"].items()
        ports = {p["name"] for c in exporters["spec"]["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports


def test_every_conveyor_command_line_is_accepted_by_the_cli() -> None:
    lines = [command_line(c) for d in of_kind("Deployment").values() for c in containers(d)]

    assert len(lines) == 2
    for line in lines:
        assert line[0] == "conveyor"
        parse_conveyor(line[1:])


def test_the_secrets_the_containers_use_are_in_the_example_secret() -> None:
    secrets = of_kind("Secret")
    for deployment in of_kind("Deployment").values():
        for container in containers(deployment):
            for env in container.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in secrets[ref["name"]]["stringData"], env
    for secret in secrets.values():  # placeholders only: no secret in the repository
        assert "CHANGE-ME" in secret["stringData"]["url"]
        assert secret["stringData"]["password"] == "CHANGE-ME"


def test_the_scaled_object_is_what_conveyor_scale_prints() -> None:
    path = KUBERNETES / "keda-scaledobject.yaml"
    text = path.read_text()
    made_by = next(line for line in text.splitlines() if line.startswith("#   conveyor "))
    args = shlex.split(made_by.removeprefix("#").strip())[1:]
    body = "".join(line for line in text.splitlines(True) if not line.startswith("#"))

    result = conveyor(*args)

    assert result.returncode == 0, result.stderr
    assert body == result.stdout
    (scaled,) = of_kind("ScaledObject").values()
    worker = of_kind("Deployment")[scaled["spec"]["scaleTargetRef"]["name"]]
    (container,) = containers(worker)
    run = parse_conveyor(command_line(container)[1:])
    trigger = scaled["spec"]["triggers"][0]["metadata"]
    assert (trigger["stream"], trigger["consumerGroup"]) == (
        run.params["stream"],
        run.params["group"],
    )
    declared = {e["name"] for e in container["env"]}
    assert {trigger["addressFromEnv"], trigger["passwordFromEnv"]} <= declared


def test_the_kustomization_lists_every_file() -> None:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())

    assert kustomization["kind"] == "Kustomization"
    listed = sorted(kustomization["resources"])
    assert listed == sorted(p.name for p in kubernetes_files() if p.name != "kustomization.yaml")
    images = {c["image"] for d in of_kind("Deployment").values() for c in containers(d)}
    assert images == {i["name"] for i in kustomization["images"]}
