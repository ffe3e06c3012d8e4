"""Make docs/dashboard.png: the dashboard of a small live deployment, in headless Chromium.

    python docs/dashboard_screenshot.py [OUTPUT.png]

Starts an embedded server and, on it, a deployment at work: a producer adding orders at a
rate that changes, three billing workers (one order in forty has a currency they do not know:
a dead letter with its error), an audit worker that keeps up slowly, a shipping consumer that
died holding entries (its heartbeats stopped: the verdict is critical), and a payments
stream. Then ``conveyor dashboard --allow-actions`` on a free port, and Debian's Chromium
(``apt-get install -y chromium chromium-driver``) once the sparklines have some history.
Takes about 40 s.
"""

from __future__ import annotations

import math
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

import conveyor
from conveyor import Consumer, EmbeddedServer, Producer
from conveyor._keys import heartbeat_key
from conveyor.models import Batch

OUTPUT = Path(__file__).resolve().parent / "dashboard.png"
WIDTH = 1360
GROUPS = (
    ("orders", "billing"),
    ("orders", "audit"),
    ("orders", "shipping"),
    ("payments", "ledger"),
)
#: sparkline points wanted before the picture is taken (one per refresh)
POINTS = 45


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until_serving(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def produce(url: str, stopping: threading.Event) -> None:
    """Orders at 40-100 a second, in waves; payments at a steady trickle."""
    client = conveyor.connect(url)
    orders, payments = Producer(client, "orders"), Producer(client, "payments")
    started, n = time.monotonic(), 0
    while not stopping.is_set():
        elapsed = time.monotonic() - started
        per_tick = int(4 + 3 * math.sin(elapsed / 3) + random.random() * 3)
        rows = []
        for _ in range(per_tick):
            n += 1
            currency = "XYZ" if n % 40 == 0 else random.choice(["EUR", "USD", "GBP"])
            rows.append(
                {
                    "order_id": str(10_000 + n),
                    "amount": f"{random.uniform(5, 400):.2f}",
                    "currency": currency,
                }
            )
        orders.send_many(rows)
        if n % 3 == 0:
            payments.send({"order_id": str(10_000 + n), "status": "captured"})
        stopping.wait(0.1)
    client.close()


def bill(batch: Batch) -> None:
    time.sleep(0.01 * len(batch) / 10)
    for msg in batch:
        if msg.fields.get("currency") == "XYZ":
            batch.dead_letter(
                msg, ValueError(f"unknown currency 'XYZ' in order {msg.fields['order_id']}")
            )
        else:
            batch.ack(msg)


def audit(batch: Batch) -> None:
    time.sleep(0.25)  # a slow archive: it falls behind
    batch.ack_all()


def ledger(batch: Batch) -> None:
    batch.ack_all()


def work(url: str, stream: str, group: str, name: str, handler: Any, **options: Any) -> Worker:
    client = conveyor.connect(url)
    consumer = Consumer(client, stream, group, consumer=name, heartbeat_ms=1000, **options)
    thread = threading.Thread(target=consumer.run, args=(handler,), daemon=True)
    thread.start()
    return Worker(consumer, thread, client)


class Worker(NamedTuple):
    consumer: Consumer
    thread: threading.Thread
    client: Any

    def stop(self) -> None:
        self.consumer.stop()
        self.thread.join(30)
        self.client.close()


def dead_consumer(url: str) -> None:
    """shipping-w1 took 12 orders and died a minute ago (its heartbeats stopped); nobody else
    ships: its entries wait, and the lag grows."""
    client = conveyor.connect(url)
    while client.xlen("orders") < 12:
        time.sleep(0.05)
    client.xreadgroup("shipping", "shipping-w1", {"orders": ">"}, count=12)
    beat = int(client.time()[0]) * 1000 - 60_000
    client.hset(heartbeat_key("orders", "shipping"), "shipping-w1", f"{beat}:3000")
    client.close()


def browser(profile: str) -> webdriver.Chrome:
    options = Options()
    options.binary_location = "/usr/bin/chromium"
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        f"--window-size={WIDTH},900",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def main() -> None:
    output = Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT
    if not shutil.which("chromium") or not Path("/usr/bin/chromedriver").exists():
        sys.exit("needs Debian's Chromium: apt-get install -y chromium chromium-driver")
    stopping = threading.Event()
    with EmbeddedServer() as server:
        url = server.url
        client = conveyor.connect(url)
        for stream, group in GROUPS:
            client.xgroup_create(stream, group, "0", mkstream=True)
        client.close()
        threading.Thread(target=produce, args=(url, stopping), daemon=True).start()
        dead_consumer(url)
        workers = [
            work(url, "orders", "billing", f"billing-w{i}", bill, batch_size=50) for i in (1, 2, 3)
        ]
        workers.append(work(url, "orders", "audit", "audit-w1", audit, batch_size=20))
        workers.append(work(url, "payments", "ledger", "ledger-w1", ledger))
        port = free_port()
        dashboard = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "conveyor",
                "dashboard",
                "--port",
                str(port),
                "-s",
                "orders",
                "-s",
                "payments",
                "--interval",
                "0.5",
                "--allow-actions",
                "--url",
                url,
            ],
            stdin=subprocess.DEVNULL,
        )
        profile = tempfile.mkdtemp(prefix="conveyor-chromium-")
        driver = browser(profile)
        try:
            wait_until_serving(port)
            driver.get(f"http://127.0.0.1:{port}/")

            def drawn(_: Any) -> bool:
                lines = driver.find_elements(By.CSS_SELECTOR, ".s-in polyline")
                points = [str(line.get_attribute("points") or "").split() for line in lines]
                return len(points) == 2 and all(len(p) >= POINTS for p in points)

            WebDriverWait(driver, 120, poll_frequency=0.2).until(drawn)
            height = driver.execute_script(
                "return document.documentElement.scrollHeight + window.outerHeight"
                " - window.innerHeight"
            )
            driver.set_window_size(WIDTH, int(height))
            driver.save_screenshot(str(output))
        finally:
            driver.quit()
            shutil.rmtree(profile, ignore_errors=True)
            dashboard.send_signal(signal.SIGTERM)
            dashboard.wait(30)
            stopping.set()
            for worker in workers:
                worker.stop()
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
