"""``conveyor dashboard`` end to end: the real command on a free port against a real server.

Its JSON is checked against the server's own XINFO and XPENDING; its guards (read-only by
default, the CSRF token, the same origin, the Host name); a server that goes away and comes
back; bad input as one error line. Then the page itself in a real headless Chromium
(tests/browser.py): the consumers and pending counts it renders are the server's, a replay
clicked (and confirmed) empties the dead-letter stream, and a banner shows while the server is
gone and leaves when it is back.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

import conveyor
from conveyor import Consumer, EmbeddedServer
from conveyor._keys import dead_letter_key, heartbeat_key
from conveyor.contrib.dashboard.board import Board
from tests.browser import ensure_chromium, headless_chromium
from tests.test_cli import TIMEOUT_S, Running, _env, assert_clean_error
from tests.test_cli import conveyor as cli
from tests.workers import fill, wait_for

Name = Callable[[str], str]

#: the first browser test may install Chromium with apt-get: minutes, once per session
BROWSER_TIMEOUT_S = 900
#: the one URL app.js holds, a name, not a place to load from
SVG_NAMESPACE = "http://www.w3.org/2000/svg"
#: how long the page may take to show what is awaited (a busy 2-core machine)
PAGE_WAIT_S = 30


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the arrangement: a stream with consumers, pending entries and dead letters ----------------


def seed(r: redis.Redis, stream: str) -> None:
    """94 entries; group g with consumers a (42 pending) and b (41); 3 dead letters from
    consumer w1, which then leaves the group (it owns nothing); 8 entries undelivered."""
    fill(r, stream, 94)
    r.xgroup_create(stream, "g", "0")
    r.xreadgroup("g", "a", {stream: ">"}, count=42)
    r.xreadgroup("g", "b", {stream: ">"}, count=41)
    worker = Consumer(r, stream, "g", consumer="w1", batch_size=3, max_wait_ms=100)
    try:
        batch = worker.get_batch()
        assert len(batch) == 3
        for msg in batch:
            assert worker.dead_letter(msg, f"bad order {msg.fields['n']}")
    finally:
        worker.close()


@pytest.fixture
def seeded(r: redis.Redis, name: Name) -> Iterator[str]:
    stream = name("orders")
    seed(r, stream)
    yield stream
    r.delete(stream, dead_letter_key(stream), heartbeat_key(stream, "g"))


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def consumers_pending(r: redis.Redis, stream: str, group: str) -> dict[str, int]:
    """Each consumer's pending count, as XPENDING's summary has it."""
    summary: Any = r.xpending(stream, group)
    return {text(c["name"]): int(c["pending"]) for c in summary["consumers"]}


def group_row(r: redis.Redis, stream: str, group: str) -> dict[str, Any]:
    rows: Any = r.xinfo_groups(stream)
    return next(row for row in rows if text(row["name"]) == group)


# -- the dashboard process ---------------------------------------------------------------------


class Dashboard:
    """A ``conveyor dashboard`` process on a free port, and HTTP calls to it."""

    def __init__(self, url: str, *args: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = ("dashboard", "--port", str(self.port), "--interval", "0.5", *args)
        self.run = Running(*command, "--url", url)
        self.run.saw(
            rf"INFO conveyor\.cli: serving the dashboard of .* at {re.escape(self.base)}/ "
        )

    def request(
        self, method: str, path: str, body: bytes | None = None, **headers: str
    ) -> tuple[int, str]:
        call = urllib.request.Request(self.base + path, body, headers, method=method)
        try:
            with urllib.request.urlopen(call, timeout=TIMEOUT_S) as reply:
                return reply.status, reply.read().decode()
        except urllib.error.HTTPError as refused:
            with refused:
                return refused.code, refused.read().decode()

    def page(self) -> str:
        status, page = self.request("GET", "/")
        assert status == 200, page
        return page

    def snapshot(self) -> tuple[int, dict[str, Any]]:
        status, body = self.request("GET", "/api/snapshot")
        return status, json.loads(body)

    def token(self) -> str:
        found = re.search(r'data-csrf-token="([^"]*)"', self.page())
        assert found, "no token in the page"
        return found.group(1)

    def post(
        self, action: str, stream: str, token: str, **headers: str
    ) -> tuple[int, dict[str, Any]]:
        sent = {
            "Content-Type": "application/json",
            "Origin": self.base,
            "X-CSRF-Token": token,
            **headers,
        }
        sent = {k: v for k, v in sent.items() if v}  # "" leaves a header out
        body = json.dumps({"stream": stream}).encode()
        status, answer = self.request("POST", f"/api/actions/{action}", body, **sent)
        return status, json.loads(answer) if answer.startswith("{") else {"text": answer}

    def stop(self) -> tuple[int, str]:
        """SIGTERM, as a service manager stops it; its exit code and everything it printed."""
        self.run.proc.send_signal(signal.SIGTERM)
        return self.run.finish()


@pytest.fixture
def dashboards() -> Iterator[Callable[..., Dashboard]]:
    """Start dashboards; any left running at the end is killed."""
    started: list[Dashboard] = []

    def start(url: str, *args: str) -> Dashboard:
        started.append(Dashboard(url, *args))
        return started[-1]

    yield start
    for dash in started:
        dash.run.kill()


def view_of(view: dict[str, Any], stream: str) -> dict[str, Any]:
    return next(s for s in view["streams"] if s["name"] == stream)


# -- the JSON view -----------------------------------------------------------------------------


def test_snapshot_has_the_servers_numbers(
    r: redis.Redis, redis_url: str, seeded: str, dashboards: Callable[..., Dashboard]
) -> None:
    dash = dashboards(redis_url, "-s", seeded)

    status, view = dash.snapshot()
    returncode, output = dash.stop()

    assert status == 200, view
    assert view["reachable"] is True and view["server"] == redis_url
    stream = view_of(view, seeded)
    assert stream["error"] is None
    snap = stream["snapshot"]
    info: Any = r.xinfo_stream(seeded)
    assert snap["stream"]["length"] == r.xlen(seeded) == 94
    assert snap["stream"]["last_generated_id"] == text(info["last-generated-id"])
    [group] = snap["groups"]
    row = group_row(r, seeded, "g")
    assert group["name"] == "g"
    assert group["pending"] == row["pending"] == 83
    assert group["lag"] == row["lag"] == 8
    assert group["last_delivered_id"] == text(row["last-delivered-id"])
    assert group["consumers_count"] == row["consumers"] == 2
    summary: Any = r.xpending(seeded, "g")
    assert group["oldest_pending_id"] == text(summary["min"])
    shown = {c["name"]: c["pending"] for c in group["consumers"]}
    assert shown == consumers_pending(r, seeded, "g") == {"a": 42, "b": 41}
    assert stream["group_health"]["g"] == stream["health"]  # one group: the same verdict
    dead = stream["dead_letters"]
    assert dead["stream"] == dead_letter_key(seeded)
    assert dead["count"] == r.xlen(dead_letter_key(seeded)) == 3
    newest: Any = r.xrevrange(dead_letter_key(seeded), count=10)
    assert [d["id"] for d in dead["newest"]] == [text(entry_id) for entry_id, _ in newest]
    assert {d["error"] for d in dead["newest"]} == {f"bad order {n}" for n in (83, 84, 85)}
    assert {d["consumer"] for d in dead["newest"]} == {"w1"}
    assert returncode == 0, output
    assert "Traceback" not in output


def test_a_dead_letter_stream_of_the_consumers_own_choosing(
    r: redis.Redis, redis_url: str, seeded: str, name: Name, dashboards: Callable[..., Dashboard]
) -> None:
    dead = name("dead")  # consumers given dead_letter=dead
    r.xadd(dead, {"n": "1", "conveyor.origin_stream": seeded, "conveyor.error": "elsewhere"})
    dash = dashboards(redis_url, "-s", seeded, "--dead-letter", dead)

    status, view = dash.snapshot()
    returncode, output = dash.stop()

    assert status == 200, view
    shown = view_of(view, seeded)["dead_letters"]
    assert shown["stream"] == dead and shown["count"] == 1
    assert [d["error"] for d in shown["newest"]] == ["elsewhere"]
    assert returncode == 0, output


def test_read_only_by_default_no_buttons_and_actions_refused(
    r: redis.Redis, redis_url: str, seeded: str, dashboards: Callable[..., Dashboard]
) -> None:
    dash = dashboards(redis_url, "-s", seeded)

    page = dash.page()
    status, answer = dash.post("replay", seeded, "any-token")
    _, view = dash.snapshot()

    assert 'data-actions="false"' in page
    assert 'data-csrf-token=""' in page  # no token handed out: there is nothing to do with it
    assert status == 403
    assert "--allow-actions" in answer["error"]
    assert view["actions"] is False
    assert r.xlen(dead_letter_key(seeded)) == 3  # nothing replayed


def test_the_page_and_its_assets_come_from_the_dashboard_itself(
    redis_url: str, seeded: str, dashboards: Callable[..., Dashboard]
) -> None:
    dash = dashboards(redis_url, "-s", seeded, "--allowed-host", "dash.example")

    page = dash.page()
    assets = {path: dash.request("GET", path) for path in ("/static/app.js", "/static/style.css")}
    hosts = {
        host: dash.request("GET", "/", Host=f"{host}:{dash.port}")[0]
        for host in ("localhost", "dash.example", "[::1]", "rebound.example")
    }

    for found in re.findall(r'(?:src|href)="([^"]+)"', page):
        assert found.startswith("static/") or found == "data:,", f"{found} is not served here"
    for path, (status, body) in assets.items():
        assert status == 200 and body, path
        elsewhere = re.findall(r"https?://[^\s\"']+", body)
        assert set(elsewhere) <= {SVG_NAMESPACE}, f"{path} loads from {elsewhere}"
    # a name made to resolve to 127.0.0.1 (DNS rebinding) does not make a site this origin
    assert hosts == {"localhost": 200, "dash.example": 200, "[::1]": 200, "rebound.example": 400}


def test_actions_need_the_token_the_same_origin_and_json(
    r: redis.Redis, redis_url: str, seeded: str, dashboards: Callable[..., Dashboard]
) -> None:
    dead = dead_letter_key(seeded)
    dash = dashboards(redis_url, "-s", seeded, "--allow-actions")
    token = dash.token()
    wrong = token[:-1] + ("A" if token[-1] != "A" else "B")

    refused = {
        "no token": dash.post("purge", seeded, ""),
        "a wrong token": dash.post("purge", seeded, wrong),
        "another origin": dash.post("purge", seeded, token, Origin="http://evil.example"),
        "no origin": dash.post("purge", seeded, token, Origin=""),
        "a form": dash.post("purge", seeded, token, **{"Content-Type": "text/plain"}),
    }
    left_after_refusals = r.xlen(dead)
    unknown = dash.post("replay", "not-on-the-dashboard", token)
    replayed = dash.post("replay", seeded, token)
    cleaned = dash.post("cleanup", seeded, token)
    purged = dash.post("purge", seeded, token)
    returncode, output = dash.stop()

    for why, (status, answer) in refused.items():
        assert status == 403, f"{why}: {status} {answer}"
    assert left_after_refusals == 3
    assert unknown[0] == 404
    assert replayed == (200, {**replayed[1], "replayed": 3, "failed": 0})
    assert r.xlen(dead) == 0
    assert r.xlen(seeded) == 97
    back: Any = r.xrevrange(seeded, count=3)
    assert sorted(int(fields[b"n"]) for _, fields in back) == [83, 84, 85]  # w1's three
    assert cleaned[0] == 200 and cleaned[1]["removed"] == []  # a and b are alive
    assert purged == (200, {"action": "purge", "stream": seeded, "purged": 0})
    assert returncode == 0, output
    assert "Traceback" not in output


def test_an_unreachable_server_is_an_error_answer_until_it_is_back(
    name: Name, dashboards: Callable[..., Dashboard]
) -> None:
    password = "dashQpw7f3a9"
    server = EmbeddedServer(os.environ.get("CONVEYOR_TEST_SERVER") or None, appendonly=True)
    server.start()
    try:
        plain = conveyor.connect(server.url)
        plain.config_set("requirepass", password)
        plain.close()
        url = server.url.replace("redis://", f"redis://:{password}@")
        stream = name("orders")
        client = conveyor.connect(url)
        seed(client, stream)
        client.close()
        dash = dashboards(url, "-s", stream)
        bodies = [dash.page(), json.dumps(dash.snapshot()[1])]

        server.stop()
        wait_for(lambda: dash.snapshot()[0] == 503, PAGE_WAIT_S, "a 503 from /api/snapshot")
        down = dash.snapshot()[1]
        server.start()  # the same data directory: its AOF brings the stream back
        plain = conveyor.connect(server.url)
        plain.config_set("requirepass", password)
        plain.close()
        wait_for(lambda: dash.snapshot()[0] == 200, PAGE_WAIT_S, "the server back")
        up = dash.snapshot()[1]
        bodies += [json.dumps(down), json.dumps(up)]
        returncode, output = dash.stop()
    finally:
        server.close()

    assert down["reachable"] is False and down["streams"] == []
    assert down["error"].startswith("cannot reach the server at redis://")
    assert view_of(up, stream)["snapshot"]["stream"]["length"] == 94
    assert returncode == 0, output
    for body in (*bodies, output):
        assert password not in body
        assert "dashQ" not in body
    assert len([line for line in output.splitlines() if "cannot reach the server" in line]) == 1


# -- bad input ---------------------------------------------------------------------------------


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield int(busy.getsockname()[1])


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("unknown stream", "does not exist"),
        ("unknown group", "has no group 'nope' (groups: 'g')"),
        ("port in use", "cannot serve on 127.0.0.1:"),
        ("bad address", "cannot serve on 300.1.2.3:"),
        ("no server", "cannot connect to redis://127.0.0.1:1/0"),
    ],
)
def test_bad_input_is_one_error_line(
    redis_url: str, r: redis.Redis, name: Name, busy_port: int, case: str, says: str
) -> None:
    stream = name("orders")
    r.xgroup_create(stream, "g", "0", mkstream=True)
    port, url = str(free_port()), redis_url
    args = {
        "unknown stream": ("-s", name("missing")),
        "unknown group": ("-s", stream, "-g", "nope"),
        "port in use": ("-s", stream),
        "bad address": ("-s", stream, "--addr", "300.1.2.3"),
        "no server": ("-s", stream),
    }[case]
    if case == "port in use":
        port = str(busy_port)
    if case == "no server":
        url = "redis://127.0.0.1:1/0"

    result = cli("dashboard", "--port", port, *args, "--url", url)
    r.delete(stream)

    assert_clean_error(result)
    assert says in result.stderr


def test_without_starlette_the_error_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['starlette'] = None\n"
        "from conveyor.cli import main\n"
        "main(['dashboard', '-s', 'orders'], prog_name='conveyor')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=TIMEOUT_S,
        check=False,
    )

    assert_clean_error(result)
    assert "pip install 'conveyor[dashboard]'" in result.stderr


def test_help_names_the_options_with_examples() -> None:
    result = cli("dashboard", "--help")

    assert result.returncode == 0, result.stderr
    for word in ("--port", "--addr", "--stream", "--group", "--allow-actions", "--url", "Example"):
        assert word in result.stdout


# -- the Board, in process ---------------------------------------------------------------------


def test_a_stream_gone_since_the_start_is_unknown_and_the_others_still_show(
    r: redis.Redis, seeded: str, name: Name
) -> None:
    gone = name("gone")
    r.xgroup_create(gone, "g", "0", mkstream=True)
    board = Board(r, [gone, seeded], max_age_s=0)
    r.delete(gone)

    view = board.view()

    assert view["reachable"] is True
    assert view_of(view, gone)["error"] == f"stream {gone!r} does not exist"
    assert view_of(view, gone)["health"]["status"] == "UNKNOWN"
    assert view_of(view, seeded)["snapshot"]["stream"]["length"] == 94


# -- the page in a real browser ----------------------------------------------------------------


@pytest.fixture(scope="session")
def browser() -> Iterator[WebDriver]:
    ensure_chromium()
    with headless_chromium() as driver:
        yield driver


def page_wait(browser: WebDriver) -> WebDriverWait[WebDriver]:
    return WebDriverWait(
        browser,
        PAGE_WAIT_S,
        poll_frequency=0.1,
        ignored_exceptions=[StaleElementReferenceException],
    )


def rendered_consumers(browser: WebDriver, stream: str) -> dict[str, int]:
    """Each consumer row of the stream's section: its name and the pending count it shows."""
    rows = browser.find_elements(
        By.CSS_SELECTOR, f'section.stream[data-stream="{stream}"] table.consumers tbody tr'
    )
    return {
        str(row.get_attribute("data-consumer")): int(
            row.find_element(By.CSS_SELECTOR, "td.c-pending").text.replace(",", "")
        )
        for row in rows
    }


def shown(browser: WebDriver, stream: str, css: str) -> str:
    found = browser.find_element(By.CSS_SELECTOR, f'section.stream[data-stream="{stream}"] {css}')
    return str(found.text)


@pytest.mark.timeout(BROWSER_TIMEOUT_S)
def test_the_page_shows_the_servers_consumers_and_replays_dead_letters(
    browser: WebDriver,
    r: redis.Redis,
    redis_url: str,
    seeded: str,
    dashboards: Callable[..., Dashboard],
) -> None:
    dead = dead_letter_key(seeded)
    dash = dashboards(redis_url, "-s", seeded, "--allow-actions")
    browser.get(dash.base + "/")
    wait = page_wait(browser)

    wait.until(lambda _: set(rendered_consumers(browser, seeded)) == {"a", "b"})
    consumers = rendered_consumers(browser, seeded)
    group_pending = shown(browser, seeded, "table.groups td.c-pending")
    group_lag = shown(browser, seeded, "table.groups td.c-lag")
    dead_count = shown(browser, seeded, ".s-dead")
    assert consumers == consumers_pending(r, seeded, "g")
    assert int(group_pending) == group_row(r, seeded, "g")["pending"]
    assert int(group_lag) == group_row(r, seeded, "g")["lag"]
    assert int(dead_count) == r.xlen(dead) == 3

    css = f'section.stream[data-stream="{seeded}"] button[data-action="replay"]'
    wait.until(expected_conditions.element_to_be_clickable((By.CSS_SELECTOR, css))).click()
    question = wait.until(expected_conditions.alert_is_present())
    asked = question.text
    question.accept()
    wait_for(lambda: r.xlen(dead) == 0, PAGE_WAIT_S, "the dead letters replayed")
    wait.until(lambda _: shown(browser, seeded, ".s-dead") == "0")
    notice = wait.until(expected_conditions.visibility_of_element_located((By.ID, "notice")))

    assert "Replay the 3 dead letters" in asked
    assert "replayed 3 of 3 dead letters" in notice.text
    assert r.xlen(seeded) == 97
    assert rendered_consumers(browser, seeded) == consumers_pending(r, seeded, "g")


@pytest.mark.timeout(BROWSER_TIMEOUT_S)
def test_the_page_shows_a_banner_while_the_server_is_gone(
    browser: WebDriver, name: Name, dashboards: Callable[..., Dashboard]
) -> None:
    server = EmbeddedServer(os.environ.get("CONVEYOR_TEST_SERVER") or None, appendonly=True)
    server.start()
    try:
        stream = name("orders")
        client = conveyor.connect(server.url)
        seed(client, stream)
        client.close()
        dash = dashboards(server.url, "-s", stream)
        browser.get(dash.base + "/")
        wait = page_wait(browser)
        banner = browser.find_element(By.ID, "banner")

        wait.until(lambda _: set(rendered_consumers(browser, stream)) == {"a", "b"})
        assert not banner.is_displayed()
        assert browser.find_elements(By.CSS_SELECTOR, "button.action") == []  # read-only

        server.stop()
        wait.until(lambda _: banner.is_displayed())
        said = banner.text
        server.start()  # its AOF brings the stream back
        wait.until(lambda _: not banner.is_displayed())
        wait.until(lambda _: rendered_consumers(browser, stream) == {"a": 42, "b": 41})
    finally:
        server.close()

    assert f"cannot reach the server at {server.url}" in said
